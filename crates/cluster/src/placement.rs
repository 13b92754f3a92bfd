//! The cluster's placement: which nodes run each service ([`control::placement`] decides),
//! stored in the JetStream key-value bucket `maru-placement`, one key per app, written only
//! by the node holding the scheduler lease and read by every node.
//!
//! The scheduler looks again every [`SCHEDULE_EVERY`], and at once when it takes the lease:
//! at the apps the cluster shares (as its own node has applied them) and at the nodes whose
//! announcements stand. It writes only what changed, each write a compare-and-set on the
//! revision it last read, so a write based on an old view (a scheduler that lost its lease
//! while writing, a placement changed meanwhile) fails instead of overwriting. Before every
//! write it checks the time left on its lease and bounds the write by it.
//!
//! The scheduler places nothing until its list of nodes was read after its own
//! announcements had succeeded for [`STEADY`] without a break
//! ([`Membership::trusted_nodes`]): after JetStream was unavailable, every node's record may
//! have expired together, and a missing record says nothing until the live nodes have had
//! time to announce themselves again.
//!
//! Timing: a node that dies stops announcing; its record expires within [`NODE_TTL`], the
//! scheduler's node list is refreshed every [`crate::HEARTBEAT`] and the scheduler looks
//! every [`SCHEDULE_EVERY`], so its share is given to others within about 7 s (plus
//! JetStream's own election, up to about 9 s, when the node's NATS server went with it), and
//! started there at once for services with a minimum (on the first request otherwise).
//!
//! [`NODE_TTL`]: crate::NODE_TTL
//! [`STEADY`]: crate::STEADY

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Store};
use control::Node;
use control::placement::{AppPlacement, Candidate, ServicePlacement};
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::{CALL_TIMEOUT, ClusterError, JOIN_PATIENCE, Membership, Trouble};

pub const PLACEMENT_BUCKET: &str = "maru-placement";
/// How often the scheduler looks at the apps and nodes.
pub const SCHEDULE_EVERY: Duration = Duration::from_millis(500);

/// The placement bucket, what was last read from it, and the tasks reading and writing it.
pub struct Placements {
    bucket: Store,
    /// Each app's placement as last read or written, and its revision in the bucket.
    current: Mutex<BTreeMap<String, (u64, AppPlacement)>>,
    stop: CancellationToken,
    /// Whether the watch is up (else the placements are read by name every second).
    watching: std::sync::atomic::AtomicBool,
    /// The newest revision of the bucket this node has read (by the watch or by name).
    seen: std::sync::atomic::AtomicU64,
}

impl Placements {
    /// Open (or create) the bucket, replicated on up to three servers.
    pub async fn open(
        jetstream: &async_nats::jetstream::Context,
        replicas: usize,
    ) -> Result<Placements, ClusterError> {
        let bucket = crate::open_bucket(
            jetstream,
            tokio::time::Instant::now(),
            PLACEMENT_BUCKET,
            "Maru placement: each app's services' nodes and shares",
            Duration::ZERO,
            replicas,
        )
        .await?;
        Ok(Placements {
            bucket,
            current: Mutex::new(BTreeMap::new()),
            stop: CancellationToken::new(),
            watching: std::sync::atomic::AtomicBool::new(false),
            seen: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Watch the bucket and give `node` every app's placement, until stopped. Returns once
    /// the placements standing now have been applied, then goes on in the background.
    pub async fn follow(self: &Arc<Self>, node: Arc<Node>) -> Result<(), ClusterError> {
        let (caught_up, mut caught_up_rx) = tokio::sync::watch::channel(false);
        // While the watch is down (its consumer lost with a server; making another waits
        // for JetStream's meta leader, seconds after a server dies or is cut off), each app's
        // placement is read by name every second, so a share moved meanwhile is still
        // taken up at once.
        // A watch can also stall without an error after its server was lost (seen in the
        // partition test: no placement delivered for 30 s): the bucket's last revision is
        // asked every second, and when the watch has stayed behind it for two looks the
        // placements are read by name as well.
        let polling = self.clone();
        let polled = node.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut behind = false;
            loop {
                tokio::select! {
                    _ = polling.stop.cancelled() => return,
                    _ = every.tick() => {}
                }
                let mut last = None;
                if polling.watching.load(std::sync::atomic::Ordering::Acquire) {
                    let info =
                        tokio::time::timeout(CALL_TIMEOUT, polling.bucket.stream.get_info()).await;
                    let Ok(Ok(info)) = info else { continue };
                    let seen = polling.seen.load(std::sync::atomic::Ordering::Acquire);
                    let was_behind = behind;
                    behind = info.state.last_sequence > seen;
                    if !(behind && was_behind) {
                        continue;
                    }
                    last = Some(info.state.last_sequence);
                }
                for app in polled.shared_apps() {
                    let read = tokio::time::timeout(CALL_TIMEOUT, polling.bucket.entry(&app)).await;
                    let Ok(Ok(Some(entry))) = read else { continue };
                    polling.apply(&polled, &entry);
                }
                if let Some(last) = last {
                    // Every app this node runs was read as of `last` or later.
                    polling
                        .seen
                        .fetch_max(last, std::sync::atomic::Ordering::AcqRel);
                    behind = false;
                }
            }
        });
        let placements = self.clone();
        tokio::spawn(async move {
            let mut caught_up = Some(caught_up);
            loop {
                let result = placements.watch(&node, &mut caught_up).await;
                placements
                    .watching
                    .store(false, std::sync::atomic::Ordering::Release);
                if let Err(error) = result {
                    tracing::warn!(%error, "cluster: watching the placement failed; watching again in 1 s");
                }
                tokio::select! {
                    _ = placements.stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        tokio::time::timeout(JOIN_PATIENCE, caught_up_rx.wait_for(|done| *done))
            .await
            .map_err(|_| {
                ClusterError::JetStream(format!(
                    "the placement was not read within {} s",
                    JOIN_PATIENCE.as_secs()
                ))
            })?
            .map_err(|_| ClusterError::JetStream("the placement watcher stopped".into()))?;
        Ok(())
    }

    async fn watch(
        &self,
        node: &Node,
        caught_up: &mut Option<tokio::sync::watch::Sender<bool>>,
    ) -> Result<(), String> {
        let mut entries = self
            .bucket
            .watch_with_history(">")
            .await
            .map_err(|e| e.to_string())?;
        self.watching
            .store(true, std::sync::atomic::Ordering::Release);
        if self
            .bucket
            .status()
            .await
            .map_err(|e| e.to_string())?
            .values()
            == 0
            && let Some(done) = caught_up.take()
        {
            _ = done.send(true);
        }
        loop {
            let entry = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                entry = entries.next() => entry,
            };
            let Some(entry) = entry else {
                return Err("the watch ended".into());
            };
            let entry = entry.map_err(|e| e.to_string())?;
            self.apply(node, &entry);
            if entry.delta == 0
                && let Some(done) = caught_up.take()
            {
                _ = done.send(true);
            }
        }
    }

    /// Give `node` an app's placement read from the bucket, unless what it has is as new.
    fn apply(&self, node: &Node, entry: &async_nats::jetstream::kv::Entry) {
        self.seen
            .fetch_max(entry.revision, std::sync::atomic::Ordering::AcqRel);
        let app = entry.key.clone();
        let placement = match entry.operation {
            Operation::Put => match serde_json::from_slice::<AppPlacement>(&entry.value) {
                Ok(placement) => Some(placement),
                Err(error) => {
                    tracing::error!(%app, %error, "cluster: an app's placement does not decode; ignored");
                    return;
                }
            },
            Operation::Delete | Operation::Purge => None,
        };
        // Never back to an older revision: this node's own write (as scheduler) was recorded
        // and applied before the watch delivers it, and a read by name may return what the
        // watch delivered already.
        let newer = {
            let mut current = self.current.lock().expect("never poisoned");
            let newer = current.get(&app).is_none_or(|(r, _)| *r < entry.revision);
            match &placement {
                Some(placement) if newer => {
                    current.insert(app.clone(), (entry.revision, placement.clone()));
                }
                None if newer => {
                    current.remove(&app);
                }
                _ => {}
            }
            newer
        };
        if newer {
            node.set_placement(&app, placement);
        }
    }

    /// Place the cluster's services whenever this node holds the scheduler lease.
    pub fn schedule(self: &Arc<Self>, node: Arc<Node>, membership: Arc<Membership>) {
        let placements = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SCHEDULE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut trouble = Trouble::default();
            loop {
                tokio::select! {
                    _ = placements.stop.cancelled() => return,
                    _ = every.tick() => {}
                    _ = membership.took_lease() => {}
                }
                if !membership.is_scheduler() {
                    continue;
                }
                trouble.report(
                    &placements.schedule_once(&node, &membership).await,
                    "cluster: cannot write the placement; trying again every 500 ms",
                    "cluster: placing services again",
                );
            }
        });
    }

    async fn schedule_once(&self, node: &Node, membership: &Membership) -> Result<(), String> {
        let wants = node.placement_wants().map_err(|e| e.to_string())?;
        // Not while this node's list of nodes may lack live ones (`STEADY`).
        let Some(nodes) = membership.trusted_nodes() else {
            return Ok(());
        };
        // What each listed node runs, by `app/service`.
        let running: BTreeMap<String, BTreeMap<String, u32>> = nodes
            .iter()
            .map(|n| (n.name.clone(), n.running.clone()))
            .collect();
        let candidates: Vec<Candidate> = nodes
            .into_iter()
            // A node still starting (catching up with the cluster) gets work once it serves.
            .filter(|n| n.health == "up")
            .map(|n| Candidate {
                name: n.name,
                region: n.region,
                zone: n.zone,
                edge: n.edge,
                memory_bytes: n.memory_bytes,
                draining: n.draining,
            })
            .collect();
        let current = self.current.lock().expect("never poisoned").clone();
        let previous: BTreeMap<(String, String), ServicePlacement> = current
            .iter()
            .flat_map(|(app, (_, services))| {
                services
                    .iter()
                    .map(move |(service, p)| ((app.clone(), service.clone()), p.clone()))
            })
            .collect();
        let mut wanted: BTreeMap<String, AppPlacement> = BTreeMap::new();
        for ((app, service), mut placed) in
            control::placement::place(&wants, &candidates, &previous)
        {
            let id = format!("{app}/{service}");
            // Every listed node with the instances of this service it announced.
            let runs: BTreeMap<String, u32> = running
                .iter()
                .map(|(node, services)| (node.clone(), services.get(&id).copied().unwrap_or(0)))
                .collect();
            let held = control::placement::hold_growth(
                &mut placed,
                previous.get(&(app.clone(), service.clone())),
                &runs,
            );
            if held {
                tracing::debug!(service = %id, "cluster: a share grows once a node has given up its instances");
            }
            wanted.entry(app).or_default().insert(service, placed);
        }
        for (app, placement) in &wanted {
            let revision = match current.get(app) {
                Some((_, now)) if now == placement => continue,
                Some((revision, _)) => Some(*revision),
                None => None,
            };
            // The lease ran out meanwhile: the next holder places.
            let Some(left) = membership.lease_left() else {
                return Ok(());
            };
            let value = serde_json::to_vec(placement).expect("a placement serialises");
            let write = async {
                match revision {
                    Some(revision) => self
                        .bucket
                        .update(app, value.into(), revision)
                        .await
                        .map_err(|e| e.to_string()),
                    None => self
                        .bucket
                        .create(app, value.into())
                        .await
                        .map_err(|e| e.to_string()),
                }
            };
            let written = tokio::time::timeout(left.min(CALL_TIMEOUT), write)
                .await
                .map_err(|_| format!("writing app {app}'s placement timed out"))?
                .map_err(|e| format!("write app {app}'s placement: {e}"))?;
            self.current
                .lock()
                .expect("never poisoned")
                .insert(app.clone(), (written, placement.clone()));
            // Applied here at once; the other nodes read it from their watch.
            node.set_placement(app, Some(placement.clone()));
            tracing::info!(%app, placement = %describe(placement), "cluster: placed");
        }
        for (app, (revision, _)) in current.iter().filter(|(app, _)| !wanted.contains_key(*app)) {
            // This node may not have applied an app deployed elsewhere yet (its watch of
            // the apps lagging, or down with a server): a placement is removed only once
            // the app is gone from the cluster, else its services would go unplaced on
            // every node until this node caught up.
            let apps = tokio::time::timeout(
                CALL_TIMEOUT,
                membership
                    .jetstream()
                    .get_key_value(crate::shared::APPS_BUCKET),
            )
            .await
            .map_err(|_| "opening the apps bucket timed out".to_string())?
            .map_err(|e| format!("open the apps bucket: {e}"))?;
            let still = crate::leader_get(&apps, app)
                .await
                .map_err(|e| format!("read app {app}: {e}"))?;
            if still.is_some() {
                continue;
            }
            let Some(left) = membership.lease_left() else {
                return Ok(());
            };
            let delete = self.bucket.delete_expect_revision(app, Some(*revision));
            tokio::time::timeout(left.min(CALL_TIMEOUT), delete)
                .await
                .map_err(|_| format!("removing app {app}'s placement timed out"))?
                .map_err(|e| format!("remove app {app}'s placement: {e}"))?;
            self.current.lock().expect("never poisoned").remove(app);
            node.set_placement(app, None);
        }
        Ok(())
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// `service: n1 ×2, n2 ×1; other: nowhere (why)`, for the log.
fn describe(placement: &AppPlacement) -> String {
    placement
        .iter()
        .map(|(service, placed)| {
            let nodes = if placed.nodes.is_empty() {
                format!("nowhere ({})", placed.unplaced.as_deref().unwrap_or(""))
            } else {
                placed
                    .nodes
                    .iter()
                    .map(|(node, share)| format!("{node} {}..{}", share.min, share.max))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!("{service}: {nodes}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}
