//! Maru in a cluster: nodes coordinated through NATS JetStream.
//!
//! What is here so far (docs/cluster.md says what is not):
//! - [`check_sync`]: a cluster's JetStream must sync every write before it acknowledges
//!   (`sync_interval: always`); by default JetStream syncs every two minutes, and Jepsen's
//!   analysis of NATS 2.12.1 found acknowledged writes lost at power loss that way. Read from
//!   each server's monitoring endpoint (`/varz`, `jetstream.config.sync_always`) before a
//!   node joins.
//! - [`Membership`]: each node announces itself (name, region, zone, edge, capacity,
//!   addresses, what it runs) in the JetStream key-value bucket `maru-nodes`, every
//!   [`HEARTBEAT`]. The bucket's records expire [`NODE_TTL`] after they were written, so a
//!   node that stops announcing (killed, cut off) drops out of every node's list within
//!   that time. Losing the connection to NATS is not the node dying: the node keeps serving
//!   what it runs and announces itself again once the connection returns.
//! - The scheduler lease ([`Lease`]): one node at a time holds the key `scheduler` in the
//!   bucket `maru-leases`, whose records expire [`LEASE_TTL`] after they were written. The
//!   holder renews it every heartbeat by compare-and-set on the revision it wrote; the others
//!   try to create it. The holder counts on its lease only until [`LEASE_TTL`] −
//!   [`LEASE_MARGIN`] after it sent its last successful renewal, so a holder cut off stops
//!   acting as scheduler before anyone else can take the key; the scheduler
//!   ([`placement`]) checks the time left before every write and bounds the write by it. A
//!   node takes the lease only once it serves (not while it is still catching up).
//! - Listing the nodes avoids what a lost server stalls: the keys come from the stream's
//!   information (no consumer, which needs JetStream's meta leader), each record from the
//!   stream's leader (not a replica that may lag), and nodes known already are read by name
//!   when the key listing fails. The scheduler trusts a list only when it was read after its
//!   own announcements had succeeded for [`STEADY`] ([`Membership::trusted_nodes`]). The
//!   NATS client pings every second, so a silently cut link is noticed in seconds.
//!
//! Timing: the constants below are chosen so that a node killed together with its NATS
//! server has its work placed elsewhere well within 15 s. JetStream itself needs up to about
//! 9 s to elect a new leader for a bucket whose leader was on the lost server (its RAFT
//! election timeout is 4 to 9 s); the node record and the lease expire within 5 s, and a
//! node looks every second.

pub mod placement;
pub mod shared;
pub mod topics;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use maru_api::NodeStatus;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// How often a node announces itself (and renews or tries to take the scheduler lease).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a node's announcement stands: four missed heartbeats and a margin.
pub const NODE_TTL: Duration = Duration::from_secs(5);
/// The key-value bucket of node records.
pub const NODES_BUCKET: &str = "maru-nodes";
/// The key-value bucket of leases.
pub const LEASES_BUCKET: &str = "maru-leases";
/// The key-value bucket of drained nodes (one key per node being drained).
pub const DRAINS_BUCKET: &str = "maru-drains";
/// How long a lease stands after it was last renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// A holder stops counting on its lease this long before others may take it, for the time
/// its renewal took to reach the servers and for clocks running at different rates. The
/// holder renews every [`HEARTBEAT`], so a renewal may take up to
/// `LEASE_TTL - LEASE_MARGIN - HEARTBEAT` (2 s) before the holder pauses scheduling.
pub const LEASE_MARGIN: Duration = Duration::from_secs(2);
/// The key-value bucket of cluster-wide settings: the forwarding key.
pub const CLUSTER_BUCKET: &str = "maru-cluster";
/// How long joining waits for NATS to answer and for JetStream to be able to serve the node bucket.
pub const JOIN_PATIENCE: Duration = Duration::from_secs(30);
/// How long any one call to NATS may take before it counts as failed.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the NATS client pings its server. A link cut without a word (a partition, a
/// cable) leaves the connection open and silent: the client takes it for dead after three
/// unanswered pings and connects to another server, so about 3 s, not the client's default
/// of minutes (seen in the partition test: a node on the majority side, connected to the
/// server cut off, could not announce itself for 53 s).
const PING_EVERY: Duration = Duration::from_secs(1);
/// The bound on each JetStream call that announces this node (lease, announcement), so
/// that a slow call delays the next announcement by little: a live node whose JetStream
/// answers announces itself at least every few seconds, well within [`NODE_TTL`].
const BEAT_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long this node's own announcements must have succeeded without a break before, as
/// scheduler, it reads a node's missing record as that node gone
/// ([`Membership::trusted_nodes`]). When JetStream was
/// unavailable to everyone (electing a leader after a server died), every record may have
/// expired at once; the live nodes announce again within a heartbeat or two of its return,
/// and until then the scheduler changes nothing (it would otherwise give a live node's
/// share to another and run more than a service's maximum).
pub const STEADY: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "the JetStream server at {monitor} does not sync every write before acknowledging it \
         (sync_always is not set): acknowledged writes can be lost at a power cut. Set \
         `jetstream {{ sync_interval: always }}` in every server's configuration and restart it"
    )]
    NotSyncing { monitor: String },
    #[error(
        "the NATS server at {monitor} has no JetStream: start it with a `jetstream {{ ... }}` \
         block (with `sync_interval: always`)"
    )]
    NoJetStream { monitor: String },
    #[error(
        "cannot read the NATS monitoring endpoint {monitor}: {reason}. Give each server's \
         monitoring address (its `http` setting) with --cluster-monitor"
    )]
    Monitor { monitor: String, reason: String },
    #[error(
        "the JetStream cluster has {size} servers but only {checked} monitoring endpoints were \
         given: give every server's with --cluster-monitor, so that each is checked to sync \
         every write"
    )]
    Unchecked { size: usize, checked: usize },
    #[error("cannot connect to NATS at {servers}: {reason}")]
    Connect { servers: String, reason: String },
    #[error("NATS JetStream: {0}")]
    JetStream(String),
    #[error("a node record in {bucket} is not valid: {reason}")]
    Record {
        bucket: &'static str,
        reason: String,
    },
}

/// What the monitoring endpoints say about the JetStream cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncReport {
    /// Servers checked: (monitoring URL, server name, version).
    pub servers: Vec<(String, String, String)>,
    /// Servers in the JetStream meta group (1 without clustering).
    pub cluster_size: usize,
}

#[derive(Deserialize)]
struct Varz {
    #[serde(default)]
    server_name: String,
    #[serde(default)]
    version: String,
    jetstream: Option<VarzJetStream>,
    /// Nanoseconds between pings on the server's connections, routes to other servers
    /// included, and how many may go unanswered.
    #[serde(default)]
    ping_interval: u64,
    #[serde(default)]
    ping_max: u64,
}

/// Longer than this for a server to notice a silent link to another server (pings every
/// `ping_interval`, `ping_max` unanswered) is warned of at join (docs/cluster.md).
const SILENT_LINK_NOTICED: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
struct VarzJetStream {
    config: Option<VarzJetStreamConfig>,
    meta: Option<VarzMeta>,
}

#[derive(Deserialize)]
struct VarzJetStreamConfig {
    #[serde(default)]
    sync_always: bool,
}

#[derive(Deserialize)]
struct VarzMeta {
    #[serde(default)]
    cluster_size: usize,
}

/// Check that every JetStream server of the cluster syncs every write: each monitoring
/// endpoint's `/varz` must show JetStream with `sync_always`, and as many endpoints must be
/// given as the JetStream meta group has servers. A server that does not answer yet, or
/// whose JetStream is not up yet, is asked again for up to `patience` (NATS starting beside
/// the node); a server that answers that it does not sync is refused at once. Blocking
/// (plain HTTP requests).
pub fn check_sync(monitors: &[String], patience: Duration) -> Result<SyncReport, ClusterError> {
    let started = std::time::Instant::now();
    loop {
        match check_sync_once(monitors) {
            Err(error @ (ClusterError::Monitor { .. } | ClusterError::NoJetStream { .. }))
                if started.elapsed() < patience =>
            {
                tracing::info!(%error, "cluster: NATS is not ready yet; asking again");
                std::thread::sleep(Duration::from_millis(500));
            }
            result => return result,
        }
    }
}

fn check_sync_once(monitors: &[String]) -> Result<SyncReport, ClusterError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(CALL_TIMEOUT))
        .build()
        .into();
    let mut report = SyncReport {
        servers: Vec::new(),
        cluster_size: 1,
    };
    for monitor in monitors {
        let url = format!("{}/varz", monitor.trim_end_matches('/'));
        let failed = |reason: String| ClusterError::Monitor {
            monitor: monitor.clone(),
            reason,
        };
        let varz: Varz = agent
            .get(&url)
            .call()
            .map_err(|e| failed(e.to_string()))?
            .body_mut()
            .read_json()
            .map_err(|e| failed(format!("not the JSON of /varz: {e}")))?;
        let jetstream = varz.jetstream.ok_or_else(|| ClusterError::NoJetStream {
            monitor: monitor.clone(),
        })?;
        let config = jetstream.config.ok_or_else(|| ClusterError::NoJetStream {
            monitor: monitor.clone(),
        })?;
        if !config.sync_always {
            return Err(ClusterError::NotSyncing {
                monitor: monitor.clone(),
            });
        }
        if let Some(meta) = jetstream.meta {
            report.cluster_size = report.cluster_size.max(meta.cluster_size);
        }
        let noticed = Duration::from_nanos(varz.ping_interval.saturating_mul(varz.ping_max + 1));
        if noticed > SILENT_LINK_NOTICED {
            tracing::warn!(
                %monitor,
                ping_interval = ?Duration::from_nanos(varz.ping_interval),
                ping_max = varz.ping_max,
                "cluster: this NATS server notices a silently cut link to another server (a partition) only after {noticed:?}, and until then JetStream reads can fail on every node: set `ping_interval: \"1s\"` and `ping_max: 3` in every server's configuration (docs/cluster.md)"
            );
        }
        report
            .servers
            .push((monitor.clone(), varz.server_name, varz.version));
    }
    if monitors.is_empty() || report.servers.len() < report.cluster_size {
        return Err(ClusterError::Unchecked {
            size: report.cluster_size.max(1),
            checked: report.servers.len(),
        });
    }
    Ok(report)
}

/// What a node announces about itself, refreshed before every heartbeat.
pub trait Announce: Send + Sync + 'static {
    fn status(&self) -> NodeStatus;
}

/// This node's membership: its heartbeat task and the last list of nodes seen.
pub struct Membership {
    jetstream: async_nats::jetstream::Context,
    drains: async_nats::jetstream::kv::Store,
    /// Wakes the heartbeat for an announcement now.
    nudge: Arc<tokio::sync::Notify>,
    /// Until when this node counts on the scheduler lease, if it holds it.
    lease_until: Arc<Mutex<Option<tokio::time::Instant>>>,
    /// Since when this node's heartbeats have succeeded without a break.
    steady_since: Arc<Mutex<Option<tokio::time::Instant>>>,
    /// Notified when this node takes the scheduler lease.
    took_lease: Arc<tokio::sync::Notify>,
    listed: Arc<Mutex<Listed>>,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    name: String,
}

impl Membership {
    /// Connect to `servers` (NATS URLs), make sure the node bucket exists (replicated on up
    /// to three servers), announce this node and keep announcing it.
    pub async fn join(
        servers: &[String],
        replicas: usize,
        announce: Arc<dyn Announce>,
    ) -> Result<Membership, ClusterError> {
        let addresses = servers
            .iter()
            .map(|url| {
                url.parse::<async_nats::ServerAddr>()
                    .map_err(|e| ClusterError::Connect {
                        servers: url.clone(),
                        reason: format!("not a NATS URL (nats://HOST:PORT): {e}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let client = async_nats::ConnectOptions::new()
            .ping_interval(PING_EVERY)
            .connection_timeout(CALL_TIMEOUT)
            .request_timeout(Some(CALL_TIMEOUT))
            // Keep trying for ever: a node cut off from NATS keeps serving and rejoins.
            .max_reconnects(None)
            .connect(addresses)
            .await
            .map_err(|e| ClusterError::Connect {
                servers: servers.join(","),
                reason: e.to_string(),
            })?;
        let jetstream = async_nats::jetstream::new(client);
        let started = tokio::time::Instant::now();
        let bucket = open_bucket(
            &jetstream,
            started,
            NODES_BUCKET,
            "Maru nodes: each node's announcement, expiring unless renewed",
            NODE_TTL,
            replicas,
        )
        .await?;
        let leases = open_bucket(
            &jetstream,
            started,
            LEASES_BUCKET,
            "Maru leases: one holder each, expiring unless renewed",
            LEASE_TTL,
            replicas,
        )
        .await?;
        let drains = open_bucket(
            &jetstream,
            started,
            DRAINS_BUCKET,
            "Maru nodes being drained (maru drain)",
            Duration::ZERO,
            replicas,
        )
        .await?;
        let name = announce.status().name;
        let lease_until = Arc::new(Mutex::new(None));
        let steady_since = Arc::new(Mutex::new(Some(tokio::time::Instant::now())));
        let took_lease = Arc::new(tokio::sync::Notify::new());
        let lease = Lease::new(leases, "scheduler", &name);
        let listed = Arc::new(Mutex::new(Listed::default()));
        let stop = CancellationToken::new();
        // Announce once before returning, so the node is listed as soon as it has joined. A
        // bucket just made may not take writes on every server yet (its stream is still
        // being placed): tried again within the same patience.
        patiently("announce this node", started, || async {
            announce_once(&bucket, announce.as_ref(), false).await?;
            refresh(&bucket, &drains, &listed).await
        })
        .await?;
        let nudge = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(heartbeat(Heartbeat {
            nudge: nudge.clone(),
            bucket,
            drains: drains.clone(),
            announce,
            listed: listed.clone(),
            lease,
            lease_until: lease_until.clone(),
            steady_since: steady_since.clone(),
            took_lease: took_lease.clone(),
            stop: stop.clone(),
        }));
        Ok(Membership {
            jetstream,
            drains,
            nudge,
            lease_until,
            steady_since,
            took_lease,
            listed,
            stop,
            task: Mutex::new(Some(task)),
            name,
        })
    }

    /// The nodes whose announcements stand, as last read (normally a heartbeat ago).
    pub fn nodes(&self) -> Vec<NodeStatus> {
        let listed = self.listed.lock().expect("never poisoned");
        listed.nodes.values().cloned().collect()
    }

    /// The nodes whose announcements stand, if the list may be trusted to have lost only
    /// nodes that are gone: it was read after this node's own announcements had succeeded
    /// for [`STEADY`] without a break (a list read soon after JetStream was unavailable may
    /// lack live nodes whose records expired meanwhile).
    pub fn trusted_nodes(&self) -> Option<Vec<NodeStatus>> {
        let since = (*self.steady_since.lock().expect("never poisoned"))?;
        let listed = self.listed.lock().expect("never poisoned");
        let read_at = listed.read_at?;
        (read_at >= since + STEADY).then(|| listed.nodes.values().cloned().collect())
    }

    /// The JetStream context the node joined through.
    pub fn jetstream(&self) -> &async_nats::jetstream::Context {
        &self.jetstream
    }

    /// Whether this node holds the scheduler lease now.
    pub fn is_scheduler(&self) -> bool {
        self.lease_left().is_some()
    }

    /// How long this node may still act on the scheduler lease, if it holds it now.
    pub fn lease_left(&self) -> Option<Duration> {
        let until = (*self.lease_until.lock().expect("never poisoned"))?;
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Wait until this node takes the scheduler lease (from not holding it).
    pub async fn took_lease(&self) {
        self.took_lease.notified().await;
    }

    /// This node's name in the cluster.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drain `node` (the scheduler moves its instances to other nodes and places nothing
    /// more on it), or stop draining it.
    pub async fn set_draining(&self, node: &str, drain: bool) -> Result<(), ClusterError> {
        if !valid_name(node) {
            return Err(ClusterError::JetStream(format!(
                "`{node}` is not a node name"
            )));
        }
        let written = if drain {
            let since = serde_json::json!({ "since_unix_ms": unix_ms() }).to_string();
            tokio::time::timeout(CALL_TIMEOUT, self.drains.put(node, since.into()))
                .await
                .map(|r| r.map(drop).map_err(|e| e.to_string()))
        } else {
            tokio::time::timeout(CALL_TIMEOUT, self.drains.delete(node))
                .await
                .map(|r| r.map_err(|e| e.to_string()))
        };
        written
            .map_err(|_| ClusterError::JetStream("changing the drain timed out".into()))?
            .map_err(|e| ClusterError::JetStream(format!("change the drain of {node}: {e}")))?;
        // Seen in the node list at once, not a heartbeat later.
        if let Some(status) = self
            .listed
            .lock()
            .expect("never poisoned")
            .nodes
            .get_mut(node)
        {
            status.draining = drain;
        }
        Ok(())
    }

    /// Announce this node now rather than at the next heartbeat (its state changed: it
    /// started serving).
    pub fn announce_now(&self) {
        self.nudge.notify_one();
    }

    /// Whether [`Membership::leave`] was called.
    pub fn stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Stop announcing (the record expires within [`NODE_TTL`]).
    pub async fn leave(&self) {
        self.stop.cancel();
        let task = self.task.lock().expect("never poisoned").take();
        if let Some(task) = task {
            _ = task.await;
        }
    }
}

/// The cluster's forwarding key, which every request one node's gateway forwards to another
/// carries (gateway::peers): made by the first node that asks (256 random bits), read by
/// the others. Only the cluster's nodes read it (the control API never shows it).
pub async fn forward_key(
    jetstream: &async_nats::jetstream::Context,
    replicas: usize,
) -> Result<String, ClusterError> {
    const KEY: &str = "forward-key";
    let started = tokio::time::Instant::now();
    let bucket = open_bucket(
        jetstream,
        started,
        CLUSTER_BUCKET,
        "Maru cluster-wide settings",
        Duration::ZERO,
        replicas,
    )
    .await?;
    let mut made = [0u8; 32];
    getrandom::fill(&mut made)
        .map_err(|e| ClusterError::JetStream(format!("no randomness: {e}")))?;
    let made: String = made.iter().map(|b| format!("{b:02x}")).collect();
    patiently("read the forwarding key", started, || async {
        if let Some(key) = bucket.get(KEY).await.map_err(|e| e.to_string())? {
            let key = String::from_utf8(key.to_vec()).map_err(|e| e.to_string())?;
            if key.len() < 32 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("the forwarding key in {CLUSTER_BUCKET} is damaged"));
            }
            return Ok(key);
        }
        // Two nodes starting at once: one creates it, the other reads it on the next try.
        bucket
            .create(KEY, made.clone().into())
            .await
            .map_err(|e| e.to_string())?;
        Ok(made.clone())
    })
    .await
}

/// `attempt` until it succeeds, every 500 ms while JetStream cannot yet (electing leaders,
/// placing a new stream), until [`JOIN_PATIENCE`] after `started`; then its last error.
pub(crate) async fn patiently<T, E, F>(
    what: &str,
    started: tokio::time::Instant,
    mut attempt: impl FnMut() -> F,
) -> Result<T, ClusterError>
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
{
    loop {
        match attempt().await {
            Ok(made) => return Ok(made),
            Err(error) if started.elapsed() < JOIN_PATIENCE => {
                tracing::info!(%error, "cluster: cannot {what} yet; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => {
                return Err(ClusterError::JetStream(format!(
                    "{what} (tried for {} s): {error}",
                    JOIN_PATIENCE.as_secs()
                )));
            }
        }
    }
}

/// Node names are keys: letters, digits, `-` and `_` only, as JetStream keys allow.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

async fn announce_once(
    bucket: &async_nats::jetstream::kv::Store,
    announce: &dyn Announce,
    scheduler: bool,
) -> Result<(), ClusterError> {
    let mut status = announce.status();
    status.scheduler = scheduler;
    assert!(valid_name(&status.name), "node names are checked at start");
    let value = serde_json::to_vec(&status).expect("a node status serialises");
    tokio::time::timeout(BEAT_CALL_TIMEOUT, bucket.put(&status.name, value.into()))
        .await
        .map_err(|_| ClusterError::JetStream("announcing this node timed out".into()))?
        .map_err(|e| ClusterError::JetStream(format!("announce this node: {e}")))?;
    Ok(())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Open (or create) the key-value bucket `name`, one value a key, replicated on up to three
/// servers; its values expire after `max_age` unless zero. JetStream may still be electing
/// its leaders (a cluster just started, a server just lost): tried again until
/// [`JOIN_PATIENCE`] after `started`.
pub(crate) async fn open_bucket(
    jetstream: &async_nats::jetstream::Context,
    started: tokio::time::Instant,
    name: &str,
    description: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<async_nats::jetstream::kv::Store, ClusterError> {
    let config = async_nats::jetstream::kv::Config {
        bucket: name.to_string(),
        description: description.to_string(),
        history: 1,
        max_age,
        num_replicas: replicas.clamp(1, 3),
        ..Default::default()
    };
    patiently(&format!("open the bucket {name}"), started, || {
        jetstream.create_key_value(config.clone())
    })
    .await
}

/// The nodes whose records stood when last read, and when that read began.
#[derive(Default)]
struct Listed {
    nodes: BTreeMap<String, NodeStatus>,
    read_at: Option<tokio::time::Instant>,
}

/// At most this many keys are read from a membership bucket (nodes, drains): far more
/// nodes than a cluster has; more is an error, not an unbounded list.
const KEYS_MAX: usize = 10_000;

/// The keys of `bucket` that hold a message now (an expired record is gone; a deleted key
/// still holds its delete marker, so callers read each key). Asked of the bucket's stream
/// (its information with its subjects), not through a consumer: creating a consumer needs
/// JetStream's meta leader, which is elected anew for seconds when a server dies, while
/// announcements go on.
async fn standing_keys(bucket: &async_nats::jetstream::kv::Store) -> Result<Vec<String>, String> {
    let prefix = bucket.prefix.clone();
    let mut subjects = bucket
        .stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    while let Some(subject) = subjects.next().await {
        let (subject, _) = subject.map_err(|e| e.to_string())?;
        if let Some(key) = subject.strip_prefix(prefix.as_str()) {
            keys.push(key.to_string());
        }
        if keys.len() > KEYS_MAX {
            return Err(format!("more than {KEYS_MAX} keys"));
        }
    }
    Ok(keys)
}

/// The value under `key` in `bucket` as its stream's leader has it (none if the key holds
/// no value: never written, expired, deleted). Not a direct get, which any replica answers,
/// one just back from a partition included: it has not caught up yet and may lack records
/// the others hold (seen in the partition test: a live node read as gone).
pub(crate) async fn leader_get(
    bucket: &async_nats::jetstream::kv::Store,
    key: &str,
) -> Result<Option<bytes::Bytes>, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let subject = format!("{}{key}", bucket.prefix);
    match bucket
        .stream
        .get_last_raw_message_by_subject(&subject)
        .await
    {
        Ok(message) => {
            let deleted = message
                .headers
                .get("KV-Operation")
                .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
            Ok((!deleted).then_some(message.payload))
        }
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(error) => Err(error.to_string()),
    }
}

/// Read every standing node record into `listed`, each marked if it is being drained.
async fn refresh(
    bucket: &async_nats::jetstream::kv::Store,
    drains: &async_nats::jetstream::kv::Store,
    listed: &Mutex<Listed>,
) -> Result<(), ClusterError> {
    let started = tokio::time::Instant::now();
    let read = async {
        // Which keys the bucket holds finds nodes that joined. It can fail for tens of
        // seconds after a server was cut off while records are still read and written
        // (seen in the partition test): then the nodes known already are read by name, so
        // that one gone is still seen gone, and new ones are found once it works again.
        let mut names = match tokio::time::timeout(BEAT_CALL_TIMEOUT, standing_keys(bucket)).await {
            Ok(Ok(names)) => names,
            Ok(Err(error)) => {
                tracing::debug!(%error, "cluster: listing the node keys failed; reading the known nodes by name");
                Vec::new()
            }
            Err(_) => {
                tracing::debug!(
                    "cluster: listing the node keys timed out; reading the known nodes by name"
                );
                Vec::new()
            }
        };
        // A node listed before is read by name too: a node seen once counts as gone only
        // when its record is.
        for name in listed.lock().expect("never poisoned").nodes.keys() {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let mut seen = BTreeMap::new();
        for name in names {
            let Some(value) = leader_get(bucket, &name)
                .await
                .map_err(|e| ClusterError::JetStream(format!("read node {name}: {e}")))?
            else {
                continue; // expired meanwhile
            };
            let status: NodeStatus =
                serde_json::from_slice(&value).map_err(|e| ClusterError::Record {
                    bucket: NODES_BUCKET,
                    reason: format!("{name}: {e}"),
                })?;
            if status.name != name {
                return Err(ClusterError::Record {
                    bucket: NODES_BUCKET,
                    reason: format!("the record under {name} is {}'s", status.name),
                });
            }
            seen.insert(name, status);
        }
        // Each node's drain mark, read by name (a deleted mark reads as none).
        let names: Vec<String> = seen.keys().cloned().collect();
        for name in names {
            let marked = leader_get(drains, &name)
                .await
                .map_err(|e| ClusterError::JetStream(format!("read the drain of {name}: {e}")))?;
            if marked.is_some()
                && let Some(status) = seen.get_mut(&name)
            {
                status.draining = true;
            }
        }
        Ok::<_, ClusterError>(seen)
    };
    let seen = tokio::time::timeout(CALL_TIMEOUT, read)
        .await
        .map_err(|_| ClusterError::JetStream("listing nodes timed out".into()))??;
    *listed.lock().expect("never poisoned") = Listed {
        nodes: seen,
        read_at: Some(started),
    };
    Ok(())
}

/// What the heartbeat task works with.
struct Heartbeat {
    nudge: Arc<tokio::sync::Notify>,
    bucket: async_nats::jetstream::kv::Store,
    drains: async_nats::jetstream::kv::Store,
    announce: Arc<dyn Announce>,
    listed: Arc<Mutex<Listed>>,
    lease: Lease,
    lease_until: Arc<Mutex<Option<tokio::time::Instant>>>,
    steady_since: Arc<Mutex<Option<tokio::time::Instant>>>,
    took_lease: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
}

/// Announce this node (and renew or take the lease) every heartbeat, and list the nodes
/// every heartbeat, each in its own loop: a slow listing never delays an announcement.
async fn heartbeat(beat: Heartbeat) {
    let Heartbeat {
        nudge,
        bucket,
        drains,
        announce,
        listed,
        mut lease,
        lease_until,
        steady_since,
        took_lease,
        stop,
    } = beat;
    let announcing = async {
        let mut every = tokio::time::interval(HEARTBEAT);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut trouble = Trouble::default();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
                _ = nudge.notified() => {}
            }
            let was = lease.holds();
            // A node still catching up (not serving yet) does not take the lease.
            let serving = announce.status().health == "up";
            lease.renew(was || serving).await;
            let holds = lease.holds();
            *lease_until.lock().expect("never poisoned") = lease.until();
            if holds != was {
                tracing::info!(
                    scheduler = holds,
                    "cluster: this node {} the scheduler lease",
                    if holds { "holds" } else { "no longer holds" }
                );
                if holds {
                    took_lease.notify_waiters();
                }
            }
            let result = announce_once(&bucket, announce.as_ref(), holds).await;
            {
                let mut since = steady_since.lock().expect("never poisoned");
                match (&result, *since) {
                    (Ok(()), None) => *since = Some(tokio::time::Instant::now()),
                    (Err(_), Some(_)) => *since = None,
                    _ => {}
                }
            }
            trouble.report(
                &result,
                "cluster: cannot announce this node; it keeps serving what it runs and tries again every heartbeat",
                "cluster: announcing this node again",
            );
        }
    };
    let listing = async {
        let mut every = tokio::time::interval(HEARTBEAT);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut trouble = Trouble::default();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            trouble.report(
                &refresh(&bucket, &drains, &listed).await,
                "cluster: cannot list the nodes; going on with the last list",
                "cluster: listing the nodes again",
            );
        }
    };
    tokio::join!(announcing, listing);
}

/// Whether a task that retries the same work is failing: it logs when the work starts
/// failing and when it works again, not on every try.
#[derive(Default)]
pub(crate) struct Trouble {
    failing: bool,
}

impl Trouble {
    pub(crate) fn report<E: std::fmt::Display>(
        &mut self,
        result: &Result<(), E>,
        lost: &str,
        back: &str,
    ) {
        match result {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("{back}");
            }
            Err(error) if !self.failing => {
                self.failing = true;
                tracing::warn!(%error, "{lost}");
            }
            _ => {}
        }
    }
}

/// A lease: a key one node at a time writes (module docs).
pub struct Lease {
    bucket: async_nats::jetstream::kv::Store,
    key: String,
    holder: String,
    /// The revision this node last wrote, and until when it counts on the lease.
    held: Option<(u64, tokio::time::Instant)>,
}

impl Lease {
    pub fn new(bucket: async_nats::jetstream::kv::Store, key: &str, holder: &str) -> Lease {
        Lease {
            bucket,
            key: key.to_string(),
            holder: holder.to_string(),
            held: None,
        }
    }

    /// Renew the lease if held, else try to take it if `take`; whether it was written (see
    /// [`Lease::holds`] for whether this node may act on it).
    pub async fn renew(&mut self, take: bool) -> bool {
        let sent = tokio::time::Instant::now();
        let value = bytes::Bytes::from(self.holder.clone());
        let written = match self.held {
            None if !take => return false,
            Some((revision, _)) => tokio::time::timeout(
                BEAT_CALL_TIMEOUT,
                self.bucket.update(&self.key, value, revision),
            )
            .await
            .map_err(|_| "timed out".to_string())
            .and_then(|r| r.map_err(|e| e.to_string())),
            None => tokio::time::timeout(BEAT_CALL_TIMEOUT, self.bucket.create(&self.key, value))
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
        };
        match written {
            Ok(revision) => {
                self.held = Some((revision, sent + LEASE_TTL - LEASE_MARGIN));
                true
            }
            Err(_) => {
                // Not renewed (JetStream electing a leader, or another holds it): the holder
                // keeps its revision for a later compare-and-set but does not extend the
                // time it counts on; once that has passed, it tries to take the key afresh.
                // A lost acknowledgement leaves the key to expire and be taken again, never
                // two holders.
                if self.until().is_none() {
                    self.held = None;
                }
                false
            }
        }
    }

    /// Whether this node holds the lease now (and may act on it).
    pub fn holds(&self) -> bool {
        self.until().is_some()
    }

    /// Until when this node may act on the lease, if it holds it now.
    pub fn until(&self) -> Option<tokio::time::Instant> {
        self.held
            .map(|(_, until)| until)
            .filter(|until| tokio::time::Instant::now() < *until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_keys() {
        assert!(valid_name("node-1"));
        assert!(valid_name("edge_harbour"));
        assert!(!valid_name(""));
        assert!(!valid_name("a.b"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(64)));
    }

    #[test]
    fn a_monitor_that_does_not_answer_is_a_clear_error() {
        let error = check_sync(&["http://127.0.0.1:1".to_string()], Duration::ZERO)
            .expect_err("nothing there");
        assert!(matches!(error, ClusterError::Monitor { .. }), "{error}");
        assert!(error.to_string().contains("--cluster-monitor"), "{error}");
        let none = check_sync(&[], Duration::ZERO).expect_err("none given");
        assert!(matches!(none, ClusterError::Unchecked { .. }), "{none}");
    }
}
