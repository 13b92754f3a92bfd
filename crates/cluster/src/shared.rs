//! Desired state shared by a cluster's nodes: apps (their record and revisions) in the
//! JetStream key-value bucket `maru-apps`, one key per app, changed only by
//! compare-and-set on the key's revision; component bytes in the object store
//! `maru-components`, by BLAKE3 hash. Every node watches the bucket (from the last value of
//! every key, then each change) and applies what it reads: missing components are fetched
//! and checked against their hash, then the node's own state is replaced and reconciled. So
//! a deploy, rollback or removal made on any node reaches every node, and a node that joins
//! later (or comes back) catches up with the latest value of each app.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Store};
use async_nats::jetstream::object_store::ObjectStore;
use control::node::{ControlError, Node, Pending, SharedChange, SharedState, Updated};
use control::state::SharedApp;
use futures_util::StreamExt as _;
use runtime::ComponentHash;
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;

use crate::{CALL_TIMEOUT, ClusterError, JOIN_PATIENCE, patiently};

pub const APPS_BUCKET: &str = "maru-apps";
pub const COMPONENTS_BUCKET: &str = "maru-components";
/// Compare-and-set attempts before a change is refused as contended.
const ATTEMPTS: usize = 10;
/// The largest shared app record: JetStream's default message limit is 1 MiB.
const APP_BYTES_MAX: usize = 900 * 1024;

/// The shared desired state: the buckets, and the task applying what they hold.
pub struct Shared {
    apps: Store,
    components: ObjectStore,
    stop: CancellationToken,
}

impl Shared {
    /// Open (or create) the buckets, replicated on up to three servers.
    pub async fn open(
        jetstream: &async_nats::jetstream::Context,
        replicas: usize,
    ) -> Result<Shared, ClusterError> {
        let replicas = replicas.clamp(1, 3);
        let started = tokio::time::Instant::now();
        let apps_config = async_nats::jetstream::kv::Config {
            bucket: APPS_BUCKET.to_string(),
            description: "Maru apps: record and revisions, changed by compare-and-set".to_string(),
            history: 1,
            num_replicas: replicas,
            max_value_size: i32::try_from(APP_BYTES_MAX).unwrap_or(i32::MAX),
            ..Default::default()
        };
        let apps = patiently("open the apps bucket", started, || {
            jetstream.create_key_value(apps_config.clone())
        })
        .await?;
        let components_config = async_nats::jetstream::object_store::Config {
            bucket: COMPONENTS_BUCKET.to_string(),
            description: Some("Maru components by BLAKE3 hash".to_string()),
            num_replicas: replicas,
            ..Default::default()
        };
        let components = patiently("open the components store", started, || {
            jetstream.create_object_store(components_config.clone())
        })
        .await?;
        Ok(Shared {
            apps,
            components,
            stop: CancellationToken::new(),
        })
    }

    /// Watch the apps bucket and apply every app's latest value to `node`, until stopped.
    /// Returns once the values standing now have been applied (so a node that starts serves
    /// the cluster's apps), then goes on in the background.
    pub async fn follow(self: &Arc<Self>, node: Arc<Node>) -> Result<(), ClusterError> {
        let (caught_up, mut caught_up_rx) = tokio::sync::watch::channel(false);
        let shared = self.clone();
        tokio::spawn(async move {
            let mut caught_up = Some(caught_up);
            loop {
                if let Err(error) = shared.watch(&node, &mut caught_up).await {
                    tracing::warn!(%error, "cluster: watching the shared apps failed; watching again in 1 s");
                }
                tokio::select! {
                    _ = shared.stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        tokio::time::timeout(JOIN_PATIENCE, caught_up_rx.wait_for(|done| *done))
            .await
            .map_err(|_| {
                ClusterError::JetStream(format!(
                    "the shared apps were not read within {} s",
                    JOIN_PATIENCE.as_secs()
                ))
            })?
            .map_err(|_| ClusterError::JetStream("the apps watcher stopped".into()))?;
        Ok(())
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    async fn watch(
        &self,
        node: &Node,
        caught_up: &mut Option<tokio::sync::watch::Sender<bool>>,
    ) -> Result<(), String> {
        let mut entries = self
            .apps
            .watch_with_history(">")
            .await
            .map_err(|e| e.to_string())?;
        // An empty bucket sends nothing to watch: caught up at once if it has no keys.
        if self
            .apps
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
            let app = entry.key.clone();
            let applied = match entry.operation {
                Operation::Put => match serde_json::from_slice::<SharedApp>(&entry.value) {
                    Ok(shared) => self.apply(node, &app, &shared).await,
                    Err(error) => Err(format!(
                        "app {app}'s shared record does not decode: {error}"
                    )),
                },
                Operation::Delete | Operation::Purge => {
                    node.apply_removed(&app).await.map_err(|e| e.to_string())
                }
            };
            if let Err(error) = applied {
                tracing::error!(%app, %error, "cluster: could not apply the shared app on this node");
            }
            if entry.delta == 0
                && let Some(done) = caught_up.take()
            {
                _ = done.send(true);
            }
        }
    }

    /// Fetch the components the app needs and this node lacks, then apply it.
    async fn apply(&self, node: &Node, app: &str, shared: &SharedApp) -> Result<(), String> {
        for hash in node.missing_components(shared) {
            let bytes = self.fetch_component(&hash).await?;
            let cache = node.files.cache.clone();
            let stored = hash.clone();
            tokio::task::spawn_blocking(move || cache.put_component(&stored, &bytes))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("store component {hash}: {e}"))?;
        }
        node.apply_shared(app, shared)
            .await
            .map_err(|e| e.to_string())
    }

    async fn fetch_component(&self, hash: &ComponentHash) -> Result<Vec<u8>, String> {
        let read = async {
            let mut object = self
                .components
                .get(hash.as_str())
                .await
                .map_err(|e| format!("fetch component {hash}: {e}"))?;
            let mut bytes = Vec::new();
            object
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| format!("read component {hash}: {e}"))?;
            Ok::<_, String>(bytes)
        };
        let bytes = tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .map_err(|_| format!("fetching component {hash} timed out"))??;
        if ComponentHash::of(&bytes).as_str() != hash.as_str() {
            return Err(format!(
                "component {hash} from {COMPONENTS_BUCKET} does not match its hash"
            ));
        }
        Ok(bytes)
    }
}

impl SharedState for Shared {
    fn update<'a>(&'a self, app: &'a str, change: &'a SharedChange<'a>) -> Updated<'a> {
        Box::pin(async move {
            let unavailable = |what: &str, e: &dyn std::fmt::Display| {
                ControlError::ClusterUnavailable(format!("{what} app {app} in the cluster: {e}"))
            };
            for _ in 0..ATTEMPTS {
                let entry = tokio::time::timeout(CALL_TIMEOUT, self.apps.entry(app))
                    .await
                    .map_err(|_| unavailable("read", &"timed out"))?
                    .map_err(|e| unavailable("read", &e))?;
                let (current, revision) = match entry {
                    Some(entry) if entry.operation == Operation::Put => {
                        let shared: SharedApp = serde_json::from_slice(&entry.value)
                            .map_err(|e| unavailable("decode", &e))?;
                        (Some(shared), entry.revision)
                    }
                    // Deleted: a later create must expect the delete marker's revision.
                    Some(entry) => (None, entry.revision),
                    None => (None, 0),
                };
                let after = change(current.as_ref())?;
                let written = match &after {
                    Some(after) => {
                        let value = serde_json::to_vec(after).expect("a shared app serialises");
                        if value.len() > APP_BYTES_MAX {
                            return Err(ControlError::BadRequest {
                                message: format!(
                                    "app {app}'s record with its {} revisions is {} bytes, over the cluster's {} limit",
                                    after.revisions.len(),
                                    value.len(),
                                    APP_BYTES_MAX
                                ),
                                hint: Some("smaller manifests, or fewer revisions".into()),
                            });
                        }
                        tokio::time::timeout(
                            CALL_TIMEOUT,
                            self.apps.update(app, value.into(), revision),
                        )
                        .await
                        .map_err(|_| unavailable("write", &"timed out"))?
                        .map(drop)
                        .map_err(|e| (e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision, e.to_string()))
                    }
                    None => tokio::time::timeout(
                        CALL_TIMEOUT,
                        self.apps.delete_expect_revision(app, Some(revision)),
                    )
                    .await
                    .map_err(|_| unavailable("remove", &"timed out"))?
                    .map_err(|e| (e.to_string().contains("wrong last sequence"), e.to_string())),
                };
                match written {
                    Ok(()) => return Ok((current, after)),
                    Err((true, _)) => continue, // another node changed it: read again
                    Err((false, error)) => return Err(unavailable("write", &error)),
                }
            }
            Err(ControlError::ClusterUnavailable(format!(
                "app {app} was changed by other nodes {ATTEMPTS} times while this change was being made"
            )))
        })
    }

    fn put_component<'a>(&'a self, hash: &'a ComponentHash, bytes: Vec<u8>) -> Pending<'a, ()> {
        Box::pin(async move {
            if self.components.info(hash.as_str()).await.is_ok() {
                return Ok(());
            }
            let mut reader = bytes.as_slice();
            let put = self.components.put(hash.as_str(), &mut reader);
            tokio::time::timeout(Duration::from_secs(60), put)
                .await
                .map_err(|_| format!("storing component {hash} in the cluster timed out"))?
                .map_err(|e| format!("store component {hash} in the cluster: {e}"))?;
            Ok(())
        })
    }
}
