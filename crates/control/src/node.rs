//! A node: the desired state, the runtime and the gateway wired together, and the reconcile
//! step that makes the running services match the desired state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use autopilot::policies::{AwsPredictive, Caution, Hpa, Kpa, Predictive};
use autopilot::{Paced, Policy, Reactive, ScalingBounds};
use events::Events;
use gateway::{Backend, Gateway, RouteKey, RouteTable, Service, ServiceConfig};
use maru_api::{
    AppInfo, DeployRequest, DeployResponse, RevisionInfo, ServiceChange, ServiceStatus,
};
use runtime::sandbox::Sandbox;
use runtime::{
    ArtifactError, ComponentHash, InstanceSpec, Isolation, ProcessSpec, Runtime, ServiceLog,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod cluster;

pub use cluster::PLACEMENT_WAIT;

use crate::files::NodeFiles;
use crate::manifest::{
    self, AppManifest, CautionLevel, ManifestError, Scaling, ScalingPolicy, ServiceManifest,
    TopicManifest, TriggerManifest, Workload,
};
use crate::state::{AppRecord, RevisionRecord, SharedApp, StateError};
use policy::data::{Actor, Classification, DataGuard, Dataset, NodeLabels, ServicePrincipal};

/// Errors of control operations, shaped for the API to map to statuses.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    BadManifest(ManifestError),
    #[error("{message}")]
    BadRequest {
        message: String,
        hint: Option<String>,
    },
    #[error("{message}")]
    Conflict {
        message: String,
        hint: Option<String>,
    },
    /// The data policy refuses what the manifest asks for.
    #[error("{message}")]
    Forbidden {
        message: String,
        hint: Option<String>,
    },
    /// The audit log cannot take the entry the change needs.
    #[error("{0}")]
    AuditUnavailable(String),
    /// The cluster's shared state cannot take the change now (NATS unreachable, JetStream
    /// electing a leader, or changed by another node too often meanwhile).
    #[error("{0}")]
    ClusterUnavailable(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Internal(String),
}

pub use crate::files::ServiceKey;

/// One service as the stored state wants it.
#[derive(Clone, PartialEq, Eq)]
struct Desired {
    revision: u64,
    manifest: ServiceManifest,
    /// For components.
    component: Option<ComponentHash>,
    /// For processes: the resolved working directory.
    workdir: Option<PathBuf>,
    /// For processes: the resolved `writable` directories.
    writable: Vec<PathBuf>,
    /// The app's key-value buckets (a change restarts its components).
    kv: BTreeMap<String, manifest::KvManifest>,
    /// The service as it acts on data (organisation, purposes, region).
    principal: ServicePrincipal,
}

impl Desired {
    fn kv_datasets(&self, app: &str, node: &NodeLabels) -> BTreeMap<String, Dataset> {
        self.kv
            .iter()
            .map(|(name, kv)| {
                (
                    name.clone(),
                    Dataset {
                        kind: policy::data::DatasetKind::Kv,
                        name: format!("{app}/{name}"),
                        labels: crate::data::labels(&kv.labels, &self.principal.organisation, node),
                    },
                )
            })
            .collect()
    }
}

struct Running {
    desired: Desired,
    service: Arc<Service>,
}

/// An app's serving revision and its parsed manifest.
struct Deployed {
    app: String,
    revision: RevisionRecord,
    manifest: AppManifest,
}

/// The trigger tasks of one running service.
struct Triggers {
    service: Arc<Service>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

/// How soon a topic that failed to open is opened again ([`Node::reopen_failed_topics`]).
const TOPIC_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two attempts to open a topic.
const TOPIC_RETRY_MAX: Duration = Duration::from_secs(30);

pub struct Node {
    pub files: NodeFiles,
    /// The object store, and where its S3 endpoint listens once it does.
    pub store: Arc<store::Store>,
    s3_endpoint: Mutex<(String, Option<PathBuf>)>,
    /// How process services are confined; `None` with `process_isolation = "none"`.
    sandbox: Option<Sandbox>,
    pub runtime: Arc<Runtime>,
    pub gateway: Arc<Gateway>,
    /// Serialises deploys, rollbacks and removals, so validation sees the state it commits on.
    change: tokio::sync::Mutex<()>,
    running: Mutex<BTreeMap<ServiceKey, Running>>,
    /// Logs outlive revisions: `maru logs` shows the old and the new one across a deploy.
    logs: Mutex<BTreeMap<ServiceKey, Arc<ServiceLog>>>,
    /// Services replaced or removed, draining; awaited at shutdown.
    retiring: tokio::sync::Mutex<JoinSet<()>>,
    pub events: Arc<Events>,
    /// Topics open now, as declared.
    topics: tokio::sync::Mutex<BTreeMap<String, TopicManifest>>,
    triggers: tokio::sync::Mutex<BTreeMap<ServiceKey, Triggers>>,
    /// Data access decisions and their audit entries.
    pub data: Arc<DataGuard>,
    /// HTTP ingest and MQTT producers; told the labelled topics after every reconcile.
    publishers: Option<Arc<crate::data::Publishers>>,
    /// Object requests over S3; told the labelled buckets and services after every
    /// reconcile.
    objects: Option<Arc<crate::data::Objects>>,
    /// The deployed topics, labelled, as of the last reconcile.
    datasets: Mutex<Arc<BTreeMap<String, Dataset>>>,
    /// The nodes `GET /v1/nodes` lists: this one alone, or the cluster's; set once at start.
    directory: std::sync::OnceLock<Arc<dyn Directory>>,
    /// In a cluster: where deploys, rollbacks and removals are made; set once at start.
    shared: std::sync::OnceLock<Arc<dyn SharedState>>,
    /// In a cluster: its name, shared apps and their placement (`None` alone).
    cluster: Mutex<Option<cluster::ClusterView>>,
    /// Told when a placement arrives.
    placed: tokio::sync::Notify,
    /// Reconciles wait while the node catches up with the cluster at start.
    reconcile_held: std::sync::atomic::AtomicBool,
}

/// A future a [`SharedState`] returns.
pub type Pending<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send + 'a>>;

/// A shared app before and after a change ([`SharedState::update`]).
pub type Updated<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<(Option<SharedApp>, Option<SharedApp>), ControlError>,
            > + Send
            + 'a,
    >,
>;

/// What a change makes of an app as the cluster shares it: its new value (`None`: removed),
/// or the reason it cannot be made.
pub type SharedChange<'a> =
    dyn Fn(Option<&SharedApp>) -> Result<Option<SharedApp>, ControlError> + Send + Sync + 'a;

/// Desired state shared by a cluster's nodes (JetStream key-value in `cluster`): deploys,
/// rollbacks and removals are made there, by compare-and-set, and every node applies what
/// it reads back ([`Node::apply_shared`]).
pub trait SharedState: Send + Sync + 'static {
    /// Apply `change` to the app's shared value if nobody changed it meanwhile, trying again
    /// on a conflict; returns (before, after). A refusal by `change` is returned as it is.
    fn update<'a>(&'a self, app: &'a str, change: &'a SharedChange<'a>) -> Updated<'a>;
    /// Make a component (by its BLAKE3 hash) available to every node.
    fn put_component<'a>(&'a self, hash: &'a ComponentHash, bytes: Vec<u8>) -> Pending<'a, ()>;
}

/// Where the list of nodes comes from: this node alone, or the cluster's membership.
pub trait Directory: Send + Sync + 'static {
    fn nodes(&self) -> Vec<maru_api::NodeStatus>;
    /// Drain a node of the cluster (`drain`), or stop draining it.
    fn drain<'a>(&'a self, node: &'a str, drain: bool) -> Pending<'a, ()>;
}

impl Node {
    /// A node over its opened files. Process groups left by a `maru` that was killed before
    /// it could stop them are killed first.
    pub fn open(
        files: NodeFiles,
        store: Arc<store::Store>,
        sandbox: Option<Sandbox>,
        runtime: Arc<Runtime>,
        gateway: Arc<Gateway>,
        events: Arc<Events>,
        data: crate::data::DataPlane,
    ) -> Arc<Self> {
        for reaped in runtime::reap_leftovers(&files.data().join("processes")) {
            tracing::warn!(%reaped, "killed a process left over from an earlier run");
        }
        Arc::new(Node {
            files,
            store,
            s3_endpoint: Mutex::new((String::new(), None)),
            sandbox,
            runtime,
            gateway,
            change: tokio::sync::Mutex::new(()),
            running: Mutex::new(BTreeMap::new()),
            logs: Mutex::new(BTreeMap::new()),
            retiring: tokio::sync::Mutex::new(JoinSet::new()),
            events,
            topics: tokio::sync::Mutex::new(BTreeMap::new()),
            triggers: tokio::sync::Mutex::new(BTreeMap::new()),
            data: data.guard,
            publishers: data.publishers,
            objects: data.objects,
            datasets: Mutex::new(Arc::new(BTreeMap::new())),
            directory: std::sync::OnceLock::new(),
            shared: std::sync::OnceLock::new(),
            cluster: Mutex::new(None),
            placed: tokio::sync::Notify::new(),
            reconcile_held: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Make changes through the cluster's shared state from now on (once, at start).
    pub fn set_shared(&self, shared: Arc<dyn SharedState>) {
        _ = self.shared.set(shared);
    }

    /// Apply an app as the cluster shares it (read back from JetStream): its record and
    /// revisions replace this node's, then the node reconciles. Nothing happens if this node
    /// already has exactly that record (it made the change itself).
    pub async fn apply_shared(&self, app: &str, shared: &SharedApp) -> Result<(), ControlError> {
        let _change = self.change.lock().await;
        self.mark_shared(app, true);
        if self.files.state.app(app).ok().as_ref() == Some(&shared.record) {
            return Ok(());
        }
        self.files.state.replace(app, shared)?;
        self.reconcile().await
    }

    /// Apply an app's removal read back from the cluster.
    pub async fn apply_removed(&self, app: &str) -> Result<(), ControlError> {
        let _change = self.change.lock().await;
        self.mark_shared(app, false);
        match self.files.state.app(app) {
            Ok(_) => self.remove_here(app).await.map(drop),
            Err(StateError::NotFound(_)) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// The components (by hash) an app's revisions use, which this node does not have.
    pub fn missing_components(&self, shared: &SharedApp) -> Vec<ComponentHash> {
        let mut missing: Vec<ComponentHash> = shared
            .revisions
            .iter()
            .flat_map(|r| r.components.values())
            .filter_map(|hash| ComponentHash::parse(hash).ok())
            .filter(|hash| !self.files.cache.has_component(hash))
            .collect();
        missing.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        missing.dedup_by(|a, b| a.as_str() == b.as_str());
        missing
    }

    /// Say where the list of nodes comes from (once, at start; later calls are ignored).
    pub fn set_directory(&self, directory: Arc<dyn Directory>) {
        _ = self.directory.set(directory);
    }

    /// The nodes known: the cluster's, or this one (empty before the node has started).
    pub fn nodes(&self) -> Vec<maru_api::NodeStatus> {
        self.directory.get().map_or_else(Vec::new, |d| d.nodes())
    }

    /// What a process service with `store_bucket` finds in its environment: the S3
    /// endpoint, the bucket, and an access key limited to it.
    fn bucket_environment(
        &self,
        key: &ServiceKey,
        bucket: &str,
    ) -> Result<Vec<(String, String)>, String> {
        let (access, secret) = self
            .store
            .service_access_key(&key.0, &key.1, bucket)
            .map_err(|error| format!("no object store key for bucket {bucket}: {error}"))?;
        let (endpoint, ca) = self.s3_endpoint.lock().expect("never poisoned").clone();
        let mut environment = vec![
            ("AWS_ACCESS_KEY_ID".into(), access.id),
            ("AWS_SECRET_ACCESS_KEY".into(), secret),
            ("AWS_DEFAULT_REGION".into(), "us-east-1".into()),
            ("AWS_ENDPOINT_URL".into(), endpoint),
            ("MARU_BUCKET".into(), bucket.to_string()),
        ];
        if let Some(ca) = ca {
            // The AWS CLI and SDKs trust the node CA through it.
            environment.push(("AWS_CA_BUNDLE".into(), ca.display().to_string()));
        }
        Ok(environment)
    }

    /// Where the S3 endpoint listens (for `maru store status` and process services), and
    /// where they find the CA that signed its certificate (with TLS).
    pub fn set_s3_endpoint(&self, endpoint: String, ca: Option<PathBuf>) {
        *self.s3_endpoint.lock().expect("never poisoned") = (endpoint, ca);
    }

    pub fn s3_endpoint(&self) -> String {
        self.s3_endpoint.lock().expect("never poisoned").0.clone()
    }

    /// Every app's serving revision with its parsed manifest, read once per decision. An app
    /// whose stored manifest no longer parses is reported and left out.
    fn deployed(&self) -> Result<Vec<Deployed>, ControlError> {
        let mut deployed = Vec::new();
        for (app, record) in self.files.state.apps()? {
            let revision = self.files.state.revision(&app, record.current)?;
            match manifest::parse(&revision.manifest_path, &revision.manifest) {
                Ok(manifest) => deployed.push(Deployed {
                    app,
                    revision,
                    manifest,
                }),
                Err(error) => {
                    tracing::error!(%app, revision = record.current, %error, "stored manifest no longer parses; app not started");
                }
            }
        }
        Ok(deployed)
    }

    /// A running service as it acts on data.
    pub fn service_principal(&self, app: &str, service: &str) -> Option<ServicePrincipal> {
        self.running
            .lock()
            .expect("running lock is never poisoned")
            .get(&(app.to_string(), service.to_string()))
            .map(|r| r.desired.principal.clone())
    }

    /// A deployed dataset by its resource name: `topic/NAME` or `kv/APP/NAME`.
    pub fn dataset(&self, resource: &str) -> Option<Dataset> {
        if let Some(topic) = resource.strip_prefix("topic/") {
            return self.topic_dataset(topic);
        }
        let (app, bucket) = resource.strip_prefix("kv/")?.split_once('/')?;
        let node = self.data.node().clone();
        self.running
            .lock()
            .expect("running lock is never poisoned")
            .iter()
            .find(|((a, _), _)| a == app)
            .and_then(|(_, r)| r.desired.kv_datasets(app, &node).remove(bucket))
    }

    /// A deployed topic, labelled (`None` if no deployed app declares it).
    pub fn topic_dataset(&self, name: &str) -> Option<Dataset> {
        self.datasets
            .lock()
            .expect("never poisoned")
            .get(name)
            .cloned()
    }

    fn desired_state(deployed: &[Deployed], node: &NodeLabels) -> BTreeMap<ServiceKey, Desired> {
        let mut desired = BTreeMap::new();
        for Deployed {
            app,
            revision,
            manifest: parsed,
        } in deployed
        {
            for (name, service) in &parsed.services {
                let (component, workdir, writable) = match &service.workload {
                    Workload::Component { path } => match revision
                        .components
                        .get(path)
                        .and_then(|h| ComponentHash::parse(h).ok())
                    {
                        Some(hash) => (Some(hash), None, Vec::new()),
                        None => {
                            tracing::error!(%app, service = %name, "revision has no component hash for the service; not started");
                            continue;
                        }
                    },
                    Workload::Process(process) => (
                        None,
                        Some(resolve_workdir(
                            revision.manifest_dir.as_deref(),
                            &process.workdir,
                        )),
                        (process.writable.iter())
                            .map(|dir| resolve_workdir(revision.manifest_dir.as_deref(), dir))
                            .collect(),
                    ),
                };
                desired.insert(
                    (app.clone(), name.clone()),
                    Desired {
                        revision: revision.number,
                        manifest: service.clone(),
                        component,
                        workdir,
                        writable,
                        kv: parsed.kv.clone(),
                        principal: crate::data::service_principal(parsed, name, node),
                    },
                );
            }
        }
        desired
    }

    /// Bring the running services in line with the stored state; called at start and after
    /// every change. A service that cannot be started is reported and skipped, so one
    /// broken app never keeps the others from serving.
    pub async fn reconcile(&self) -> Result<(), ControlError> {
        if self
            .reconcile_held
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Ok(());
        }
        let deployed = self.deployed()?;
        // Labels first: a topic is never open without them.
        let node = self.data.node().clone();
        let datasets = crate::data::topics(deployed.iter().map(|d| &d.manifest), &node);
        *self.datasets.lock().expect("never poisoned") = Arc::new(datasets.clone());
        if let Some(publishers) = &self.publishers {
            publishers.set_topics(datasets);
        }
        let topics_changed = self.reconcile_topics(Self::desired_topics(&deployed)).await;
        let desired = Self::desired_state(&deployed, &node);
        if let Some(objects) = &self.objects {
            objects.set_labels(crate::data::ObjectLabels {
                buckets: crate::data::buckets(deployed.iter().map(|d| &d.manifest), &node),
                services: desired
                    .iter()
                    .map(|(key, want)| (key.clone(), want.principal.clone()))
                    .collect(),
            });
        }
        let mut retired = Vec::new();
        let table = {
            let mut running = self.running.lock().expect("running lock is never poisoned");
            let keys: Vec<ServiceKey> = running.keys().cloned().collect();
            for key in keys {
                let keep = desired.get(&key).is_some_and(|want| {
                    let have = &running[&key].desired;
                    (
                        &have.manifest,
                        &have.component,
                        &have.workdir,
                        &have.writable,
                        &have.kv,
                        &have.principal,
                    ) == (
                        &want.manifest,
                        &want.component,
                        &want.workdir,
                        &want.writable,
                        &want.kv,
                        &want.principal,
                    )
                });
                if keep {
                    if let (Some(current), Some(want)) = (running.get_mut(&key), desired.get(&key))
                    {
                        current.desired.revision = want.revision;
                    }
                } else if let Some(old) = running.remove(&key) {
                    // The replacement (if any) carries on from this history.
                    if desired.contains_key(&key) {
                        self.save_history_of(&key, &old.service);
                    }
                    retired.push(old.service);
                }
            }
            for (key, want) in &desired {
                if running.contains_key(key) {
                    continue;
                }
                match self.start_service(key, want, &desired) {
                    Ok(service) => {
                        running.insert(
                            key.clone(),
                            Running {
                                desired: want.clone(),
                                service,
                            },
                        );
                    }
                    Err(error) => {
                        tracing::error!(app = %key.0, service = %key.1, %error, "service not started")
                    }
                }
            }
            let mut routes = Vec::new();
            for running in running.values() {
                for key in route_keys(&running.desired.manifest) {
                    routes.push((key, running.service.clone()));
                }
            }
            RouteTable::new(routes).with_named(running.iter().map(|((app, service), running)| {
                (format!("{app}/{service}"), running.service.clone())
            }))
        };
        self.gateway.install(table);
        // Apps that became shared since their services started now run as placed.
        self.apply_localities();
        self.reconcile_triggers(topics_changed).await;
        let mut retiring = self.retiring.lock().await;
        while retiring.try_join_next().is_some() {}
        for service in retired {
            retiring.spawn(async move { service.shutdown().await });
        }
        Ok(())
    }

    /// Every topic declared by a deployed app, and which app declares it.
    fn desired_topics(deployed: &[Deployed]) -> BTreeMap<String, (String, TopicManifest)> {
        let mut topics = BTreeMap::new();
        for Deployed { app, manifest, .. } in deployed {
            for (name, topic) in &manifest.topics {
                topics
                    .entry(name.clone())
                    .or_insert((app.clone(), topic.clone()));
            }
        }
        topics
    }

    /// Open declared topics and close undeclared ones (their data stays on disk). Returns
    /// whether any topic was opened, reopened or closed. A topic that fails to open is
    /// answered as not open yet ([`events::TopicError::NotOpen`]) and opened again by
    /// [`Node::reopen_failed_topics`]; a failure that changes nothing is no change.
    async fn reconcile_topics(&self, want: BTreeMap<String, (String, TopicManifest)>) -> bool {
        let mut open = self.topics.lock().await;
        let mut changed = false;
        for (name, (app, topic)) in &want {
            if open.get(name) == Some(topic) {
                continue;
            }
            match self.events.declare(name, topic_config(topic)).await {
                Ok(_) => {
                    open.insert(name.clone(), topic.clone());
                    changed = true;
                }
                Err(error) => {
                    // A topic open with its old configuration was closed to reopen it.
                    changed |= open.remove(name).is_some();
                    tracing::error!(%app, topic = %name, %error, "topic not opened; the node tries again");
                }
            }
        }
        for name in self.events.unopened() {
            if !want.contains_key(&name) {
                self.events.retire(&name).await;
            }
        }
        let gone: Vec<String> = open
            .keys()
            .filter(|name| !want.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            changed = true;
            self.events.retire(&name).await;
            open.remove(&name);
        }
        changed
    }

    /// Open the topics that failed to open again, until they open or are no longer
    /// declared: a second after a failure is seen, then after twice the wait each time, at
    /// most [`TOPIC_RETRY_MAX`] apart. Runs until `shutdown`.
    pub async fn reopen_failed_topics(self: Arc<Self>, shutdown: CancellationToken) {
        let mut wait = TOPIC_RETRY_FIRST;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let unopened = self.events.unopened();
            if unopened.is_empty() {
                wait = TOPIC_RETRY_FIRST;
                continue;
            }
            tracing::info!(topics = ?unopened, "opening topics that failed to open");
            if let Err(error) = self.reconcile().await {
                tracing::warn!(%error, "reconcile to open topics failed");
            }
            wait = if self.events.unopened().is_empty() {
                TOPIC_RETRY_FIRST
            } else {
                (wait * 2).min(TOPIC_RETRY_MAX)
            };
        }
    }

    /// Start the triggers of services that have none yet; restart all if topics changed.
    async fn reconcile_triggers(&self, topics_changed: bool) {
        let datasets = self.datasets.lock().expect("never poisoned").clone();
        let running: Vec<(
            ServiceKey,
            Arc<Service>,
            Vec<TriggerManifest>,
            ServicePrincipal,
        )> = self
            .running
            .lock()
            .expect("running lock is never poisoned")
            .iter()
            .map(|(key, r)| {
                (
                    key.clone(),
                    r.service.clone(),
                    r.desired.manifest.triggers.clone(),
                    r.desired.principal.clone(),
                )
            })
            .collect();
        let mut triggers = self.triggers.lock().await;
        let stale: Vec<ServiceKey> = triggers
            .iter()
            .filter(|(key, t)| {
                topics_changed
                    || !running
                        .iter()
                        .any(|(k, service, _, _)| k == *key && Arc::ptr_eq(service, &t.service))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(mut old) = triggers.remove(&key) {
                old.cancel.cancel();
                while old.tasks.join_next().await.is_some() {}
            }
        }
        for (key, service, wanted, principal) in running {
            if wanted.is_empty() || triggers.contains_key(&key) {
                continue;
            }
            let cancel = CancellationToken::new();
            let mut tasks = JoinSet::new();
            for trigger in wanted {
                let lookup = |name: &Option<String>| -> Result<Option<Arc<events::Topic>>, String> {
                    name.as_ref()
                        .map(|n| self.events.topic(n).map_err(|e| e.to_string()))
                        .transpose()
                };
                let topics = self
                    .events
                    .topic(&trigger.topic)
                    .map_err(|e| e.to_string())
                    .and_then(|topic| {
                        Ok((
                            topic,
                            lookup(&trigger.dead_letter)?,
                            lookup(&trigger.reply_to)?,
                        ))
                    });
                let (topic, dead_letter, reply_to) = match topics {
                    Ok(found) => found,
                    Err(error) => {
                        service.log(&format!(
                            "trigger on topic {} not started: {error}",
                            trigger.topic
                        ));
                        continue;
                    }
                };
                let group = format!("{}.{}", key.0, key.1);
                let Some(dataset) = datasets.get(&trigger.topic).cloned() else {
                    service.log(&format!(
                        "trigger on topic {} not started: no deployed app declares it",
                        trigger.topic
                    ));
                    continue;
                };
                let publishes = [&trigger.reply_to, &trigger.dead_letter]
                    .into_iter()
                    .flatten()
                    .filter_map(|name| datasets.get(name).cloned())
                    .collect();
                let guard = crate::data::TriggerGuard::new(
                    self.data.clone(),
                    principal.clone(),
                    dataset,
                    publishes,
                    group.clone(),
                    trigger.pseudonymise.clone(),
                );
                let config = gateway::TriggerConfig {
                    guard: Some(Arc::new(guard)),
                    group,
                    batch: trigger.batch as usize,
                    parallel: trigger.parallel as usize,
                    path: trigger.path.clone(),
                    max_attempts: trigger.max_attempts,
                    dead_letter,
                    reply_to,
                    peers: self.gateway.peers().clone(),
                };
                tasks.spawn(gateway::run_trigger(
                    topic,
                    service.clone(),
                    config,
                    cancel.clone(),
                ));
            }
            triggers.insert(
                key,
                Triggers {
                    service,
                    cancel,
                    tasks,
                },
            );
        }
    }

    fn save_history_of(&self, key: &ServiceKey, service: &Service) {
        if let Err(error) = self.files.save_history(key, &service.history_text()) {
            tracing::warn!(app = %key.0, service = %key.1, %error, "could not save metrics history");
        }
    }

    /// Save every running service's metrics history (also called every few minutes).
    pub fn save_history(&self) {
        let services: Vec<(ServiceKey, Arc<Service>)> = self
            .running
            .lock()
            .expect("running lock is never poisoned")
            .iter()
            .map(|(key, running)| (key.clone(), running.service.clone()))
            .collect();
        for (key, service) in services {
            self.save_history_of(&key, &service);
        }
    }

    /// A service's history: (by second, by minute).
    pub fn history(
        &self,
        app: &str,
        service: &str,
    ) -> Option<(
        Vec<autopilot::history::Sample>,
        Vec<autopilot::history::Sample>,
    )> {
        let running = self.running.lock().expect("running lock is never poisoned");
        running
            .get(&(app.to_string(), service.to_string()))
            .map(|r| r.service.history())
    }

    fn log_for(&self, key: &ServiceKey) -> Arc<ServiceLog> {
        self.logs
            .lock()
            .expect("logs lock is never poisoned")
            .entry(key.clone())
            .or_default()
            .clone()
    }

    fn start_service(
        &self,
        key: &ServiceKey,
        want: &Desired,
        desired: &BTreeMap<ServiceKey, Desired>,
    ) -> Result<Arc<Service>, String> {
        let manifest = &want.manifest;
        let log = self.log_for(key);
        let env: Vec<(String, String)> = manifest
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let backend = match (&manifest.workload, &want.component, &want.workdir) {
            (Workload::Process(process), _, Some(workdir)) => {
                let mut env = env;
                if let Some(bucket) = &process.store_bucket {
                    env.extend(self.bucket_environment(key, bucket)?);
                }
                let confinement = match (&self.sandbox, &process.user) {
                    (Some(_), Some(user)) => format!("Landlock (the node's data and other apps' directories hidden; writes only to workdir, TMPDIR and `writable`), no capabilities, as user {user}"),
                    (Some(_), None) => "Landlock (the node's data and other apps' directories hidden; writes only to workdir, TMPDIR and `writable`), no capabilities".to_string(),
                    (None, _) => "none (process_isolation = \"none\")".to_string(),
                };
                log.push(
                    runtime::LogStream::Platform,
                    &format!(
                        "limits in force: {}; confinement: {confinement}",
                        runtime::limits_in_force()
                    ),
                );
                Backend::Process(ProcessSpec {
                    command: process.command.clone(),
                    workdir: workdir.clone(),
                    env,
                    ready: process.ready.clone(),
                    ready_timeout: process.ready_timeout,
                    liveness: process.liveness.clone(),
                    stop_signal: process.stop_signal,
                    stop_timeout: process.stop_timeout,
                    memory_bytes_max: manifest.memory_bytes,
                    cpu_seconds_max: process.cpu_time.map(|t| t.as_secs().max(1)),
                    log: log.clone(),
                    registry: self.files.data().join("processes"),
                    isolation: self.sandbox.as_ref().map(|sandbox| {
                        Arc::new(Isolation {
                            sandbox: sandbox.clone(),
                            hidden: other_apps_directories(&key.0, desired),
                            writable: want.writable.clone(),
                            user: process.user.clone(),
                        })
                    }),
                })
            }
            (_, Some(hash), _) => Backend::Component {
                component: self
                    .runtime
                    .load(&self.files.cache, hash)
                    .map_err(|e| e.to_string())?,
                instance: InstanceSpec {
                    env,
                    memory_bytes_max: manifest.memory_bytes.unwrap_or(64 << 20),
                    outbound: manifest.outbound.clone().into(),
                    log: log.clone(),
                    kv: (!want.kv.is_empty()).then(|| {
                        let guard = crate::data::KvGuard::new(
                            self.data.clone(),
                            want.principal.clone(),
                            want.kv_datasets(&key.0, self.data.node()),
                        );
                        Arc::new(crate::kv::AppKv::new(
                            self.store.clone(),
                            &key.0,
                            &want.kv,
                            guard,
                        )) as Arc<dyn runtime::keyvalue::KeyValue>
                    }),
                },
            },
            _ => return Err("the service has no component".into()),
        };
        let startup_timeout = match &manifest.workload {
            Workload::Process(process) => process.ready_timeout,
            Workload::Component { .. } => manifest.startup_timeout,
        };
        let config = ServiceConfig {
            app: key.0.clone(),
            name: key.1.clone(),
            revision: want.revision,
            bounds: ScalingBounds {
                instances_min: manifest.instances_min,
                instances_max: manifest.instances_max,
                concurrency: manifest.concurrency,
                idle_timeout: manifest.idle_timeout,
            },
            timeout: manifest.timeout,
            queue_max: manifest.queue as usize,
            body_bytes_max: manifest.body_limit_bytes,
            startup_timeout,
            backend,
            log,
            history: self.files.load_history(key),
            slo: manifest.scaling.slo,
            anomaly_warm_up: manifest.anomaly_warm_up,
            fresh_instance_per_request: manifest.fresh_instance_per_request,
            locality: self.locality(key),
        };
        Ok(Service::start(
            config,
            self.runtime.clone(),
            policy_for(&manifest.scaling),
        ))
    }

    /// Validate, compile and commit a new revision, then start serving it.
    pub async fn deploy(&self, request: DeployRequest) -> Result<DeployResponse, ControlError> {
        let _change = self.change.lock().await;
        let parsed = manifest::parse(&request.manifest_path, &request.manifest)
            .map_err(ControlError::BadManifest)?;
        {
            // Every deployed app, parsed: dropped before `reconcile` parses them again, so
            // two copies are never held at once (at 5,000 apps each is tens of MiB).
            let deployed = self.deployed()?;
            Self::check_routes_free(&parsed, &deployed)?;
            Self::check_topics(&parsed, &deployed)?;
            self.check_data_access(&parsed, &deployed).await?;
        }
        // Every component must be uploaded, compile, and be a wasi:http proxy, and every
        // command must exist, before the revision is committed; compiling here is what lets
        // scaling never compile.
        let mut components = BTreeMap::new();
        let mut checked = Vec::new();
        for (name, service) in &parsed.services {
            match &service.workload {
                Workload::Component { path } => {
                    let hash = self.check_component(&parsed, name, path, &request)?;
                    components.insert(path.clone(), hash.to_string());
                    checked.push(hash);
                }
                Workload::Process(process) => {
                    let workdir =
                        resolve_workdir(request.manifest_dir.as_deref(), &process.workdir);
                    check_command(&parsed, name, &process.command, &workdir)?;
                    self.check_confinement(&parsed, name, process, &workdir, &request)?;
                }
            }
        }

        let previous = match self.files.state.app(&parsed.name) {
            Ok(record) => Some(self.files.state.revision(&parsed.name, record.current)?),
            Err(StateError::NotFound(_)) => None,
            Err(error) => return Err(error.into()),
        };
        let changes = match &previous {
            Some(previous) => diff(
                previous,
                &parsed,
                &components,
                request.manifest_dir.as_deref(),
            ),
            None => parsed
                .services
                .keys()
                .map(|name| ServiceChange {
                    service: name.clone(),
                    kind: "added".into(),
                    fields: Vec::new(),
                })
                .collect(),
        };
        if let (Some(previous), true) = (&previous, changes.is_empty()) {
            return Ok(DeployResponse {
                app: parsed.name,
                revision: previous.number,
                previous: Some(previous.number),
                changes,
            });
        }
        let revision = match self.shared.get() {
            None => self.files.state.deploy(
                &parsed.name,
                &request.manifest_path,
                request.manifest_dir.as_deref(),
                &request.manifest,
                components,
            )?,
            Some(shared) => {
                for hash in &checked {
                    let bytes = self.files.cache.read_component(hash).map_err(|e| {
                        ControlError::Internal(format!("read component {hash}: {e}"))
                    })?;
                    shared
                        .put_component(hash, bytes)
                        .await
                        .map_err(ControlError::ClusterUnavailable)?;
                }
                let created_unix_ms = self.files.env().clock.now_ms();
                let change = |current: Option<&SharedApp>| {
                    let (record, number) = AppRecord::deployed(current.map(|c| &c.record));
                    let mut known = current.map(|c| c.revisions.clone()).unwrap_or_default();
                    known.push(RevisionRecord {
                        number,
                        manifest_path: request.manifest_path.clone(),
                        manifest_dir: request.manifest_dir.clone(),
                        manifest: request.manifest.clone(),
                        components: components.clone(),
                        created_unix_ms,
                    });
                    SharedApp::new(record, &known)
                        .map(Some)
                        .map_err(ControlError::Internal)
                };
                let (_, after) = shared.update(&parsed.name, &change).await?;
                let after = after.expect("a deploy leaves the app deployed");
                self.files.state.replace(&parsed.name, &after)?;
                self.mark_shared(&parsed.name, true);
                after.record.current
            }
        };
        self.reconcile().await?;
        if self.shared.get().is_some() {
            let services: Vec<(String, u32, u32)> = parsed
                .services
                .iter()
                .map(|(name, s)| (name.clone(), s.instances_min, s.instances_max))
                .collect();
            if !self.wait_placed(&parsed.name, &services).await {
                tracing::warn!(app = %parsed.name, "deployed, but the cluster's scheduler has not placed every service within {} s; they are served once it does", PLACEMENT_WAIT.as_secs());
            }
        }
        Ok(DeployResponse {
            app: parsed.name,
            revision,
            previous: previous.map(|p| p.number),
            changes,
        })
    }

    /// Every data access the manifest asks for must be allowed by the data policy; each
    /// denial (and each grant of personal data) is in the audit log.
    async fn check_data_access(
        &self,
        parsed: &AppManifest,
        deployed: &[Deployed],
    ) -> Result<(), ControlError> {
        let node = self.data.node().clone();
        let others = crate::data::topics(
            deployed
                .iter()
                .filter(|d| d.app != parsed.name)
                .map(|d| &d.manifest),
            &node,
        );
        let wanted = crate::data::accesses(parsed, &others, &node);
        if wanted.is_empty() {
            return Ok(());
        }
        let guard = self.data.clone();
        let denied = tokio::task::spawn_blocking(move || {
            for access in wanted {
                let mut details = serde_json::Map::new();
                details.insert("at".into(), "deploy".into());
                details.insert("field".into(), access.field.clone().into());
                let decision = guard.check(
                    &Actor::Service(&access.service),
                    access.action,
                    &access.dataset,
                    None,
                    details,
                )?;
                if !decision.allowed {
                    return Ok(Some((access, decision)));
                }
            }
            Ok(None)
        })
        .await
        .map_err(|e| ControlError::Internal(format!("the data policy check failed: {e}")))?
        .map_err(|e: policy::audit::AuditError| ControlError::AuditUnavailable(e.to_string()))?;
        let Some((access, decision)) = denied else {
            return Ok(());
        };
        let labels = &access.dataset.labels;
        let hint = match labels.classification {
            Classification::Personal if access.service.region != labels.region => format!(
                "{} is personal data of region {}; this node is in region {}: run the service on a node in that region",
                access.dataset.resource(),
                labels.region,
                access.service.region
            ),
            Classification::Personal => format!(
                "{} is personal data that may be used only for {}; declare the purpose the service really has in `service.{}.purposes` (only if it is one of those), or read a public aggregate instead",
                access.dataset.resource(),
                labels.allowed_purposes.join(", "),
                access.service.service
            ),
            _ => "the node's data policies decide which services may use which data; see docs/policy.md and `maru policy show`".to_string(),
        };
        Err(ControlError::Forbidden {
            message: format!(
                "{}: service {}/{} may not {} {}: {}",
                access.field,
                access.service.app,
                access.service.service,
                access.action.name(),
                access.dataset.resource(),
                decision.reason()
            ),
            hint: Some(hint),
        })
    }

    fn check_component(
        &self,
        parsed: &AppManifest,
        name: &str,
        path: &str,
        request: &DeployRequest,
    ) -> Result<ComponentHash, ControlError> {
        let field = format!("service.{name}.component");
        let hash_text = request.components.get(path).ok_or_else(|| {
            ControlError::BadManifest(parsed.error_at(
                &field,
                format!("component `{path}` was not uploaded with the deploy"),
                Some("deploy with `maru deploy`, which uploads components".into()),
            ))
        })?;
        let hash = ComponentHash::parse(hash_text).map_err(|e| ControlError::BadRequest {
            message: e.to_string(),
            hint: None,
        })?;
        let check = tokio::task::block_in_place(|| {
            self.runtime
                .compile(&self.files.cache, &hash)
                .and_then(|()| self.runtime.load(&self.files.cache, &hash).map(drop))
        });
        if let Err(error) = check {
            let hint = match &error {
                ArtifactError::Missing(_) => Some("upload it first: PUT /v1/blobs/{hash}".to_string()),
                _ => Some("build it for the wasi:http/proxy world, e.g. `cargo build --target wasm32-wasip2`".to_string()),
            };
            return Err(ControlError::BadManifest(parsed.error_at(
                &field,
                error.to_string(),
                hint,
            )));
        }
        Ok(hash)
    }

    /// A process service's directories and user must let it be confined: nothing it may
    /// write can hold the data directory or lie in it, and `user` needs a root maru and an
    /// existing account.
    fn check_confinement(
        &self,
        parsed: &AppManifest,
        name: &str,
        process: &manifest::ProcessManifest,
        workdir: &Path,
        request: &DeployRequest,
    ) -> Result<(), ControlError> {
        let bad = |field: &str, message: String, hint: &str| {
            ControlError::BadManifest(parsed.error_at(
                &format!("service.{name}.{field}"),
                message,
                Some(hint.to_string()),
            ))
        };
        let data = runtime::sandbox::canonical(self.files.data());
        let mut dirs = vec![("workdir", workdir.to_path_buf())];
        for dir in &process.writable {
            let resolved = resolve_workdir(request.manifest_dir.as_deref(), dir);
            if !resolved.is_dir() {
                return Err(bad(
                    "writable",
                    format!("{} is not a directory on the node", resolved.display()),
                    "create it first; writable directories are relative to the manifest's directory",
                ));
            }
            dirs.push(("writable", resolved));
        }
        for (field, dir) in dirs {
            let dir = runtime::sandbox::canonical(&dir);
            if dir.starts_with(&data) || data.starts_with(&dir) {
                return Err(bad(
                    field,
                    format!(
                        "{} holds or lies in the node's data directory {}, which a process may never write",
                        dir.display(),
                        data.display()
                    ),
                    "give the service a directory of its own outside the data directory",
                ));
            }
        }
        if let Some(bucket) = &process.store_bucket {
            self.store.ensure_bucket(bucket).map_err(|error| {
                bad(
                    "store_bucket",
                    format!("the bucket cannot be made: {error}"),
                    "see `maru store status`",
                )
            })?;
        }
        if let Some(user) = &process.user {
            if self.sandbox.is_none() {
                return Err(bad(
                    "user",
                    "`user` needs process isolation, which this node has turned off".into(),
                    "remove `user`, or set process_isolation = \"landlock\" in [node]",
                ));
            }
            if !nix::unistd::geteuid().is_root() {
                return Err(bad(
                    "user",
                    format!("maru does not run as root, so it cannot start processes as `{user}`"),
                    "remove `user` (processes then run as maru's own user), or run maru as root",
                ));
            }
            if !matches!(nix::unistd::User::from_name(user), Ok(Some(_))) {
                return Err(bad(
                    "user",
                    format!("user `{user}` does not exist on the node"),
                    "create the account (useradd --system NAME) or name an existing one",
                ));
            }
        }
        Ok(())
    }

    fn check_routes_free(parsed: &AppManifest, deployed: &[Deployed]) -> Result<(), ControlError> {
        let mut taken: BTreeMap<RouteKey, String> = BTreeMap::new();
        for Deployed {
            app,
            manifest: other,
            ..
        } in deployed
        {
            if *app == parsed.name {
                continue;
            }
            for (name, service) in &other.services {
                for key in route_keys(service) {
                    taken.insert(key, format!("{app}/{name}"));
                }
            }
        }
        for (name, service) in &parsed.services {
            for key in route_keys(service) {
                if let Some(owner) = taken.get(&key) {
                    let host = key
                        .host
                        .as_deref()
                        .map(|h| format!(" on host {h}"))
                        .unwrap_or_default();
                    return Err(ControlError::BadManifest(
                        parsed.error_at(
                            &format!("service.{name}.routes"),
                            format!("route {}{host} is already served by {owner}", key.prefix),
                            Some(
                                "choose another path prefix or host, or remove the other app first"
                                    .into(),
                            ),
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A topic belongs to one app; a trigger's topic must be declared by some app.
    fn check_topics(parsed: &AppManifest, deployed: &[Deployed]) -> Result<(), ControlError> {
        let others = Self::desired_topics(deployed);
        for name in parsed.topics.keys() {
            if let Some((owner, _)) = others.get(name)
                && *owner != parsed.name
            {
                return Err(ControlError::BadManifest(parsed.error_at(
                    &format!("topic.{name}"),
                    format!("topic {name} is already declared by app {owner}"),
                    Some("choose another topic name; an app can trigger on another app's topic without declaring it".into()),
                )));
            }
        }
        for (service_name, service) in &parsed.services {
            for trigger in &service.triggers {
                let declared = parsed.topics.contains_key(&trigger.topic)
                    || others
                        .get(&trigger.topic)
                        .is_some_and(|(owner, _)| *owner != parsed.name);
                if !declared {
                    return Err(ControlError::BadManifest(parsed.error_at(
                        &format!("service.{service_name}.trigger.topic"),
                        format!(
                            "topic {} is not declared by this or any deployed app",
                            trigger.topic
                        ),
                        Some(format!(
                            "add a [topic.\"{}\"] table to this manifest",
                            trigger.topic
                        )),
                    )));
                }
            }
        }
        Ok(())
    }

    pub async fn rollback(&self, app: &str) -> Result<(u64, u64), ControlError> {
        let _change = self.change.lock().await;
        let moved = match self.shared.get() {
            None => self.files.state.rollback(app)?,
            Some(shared) => {
                let change = |current: Option<&SharedApp>| {
                    let current = current.ok_or_else(|| StateError::NotFound(app.to_string()))?;
                    let (record, _) = current.record.rolled_back(app)?;
                    SharedApp::new(record, &current.revisions)
                        .map(Some)
                        .map_err(ControlError::Internal)
                };
                let (before, after) = shared.update(app, &change).await?;
                let (before, after) = (
                    before.expect("a rollback needs the app"),
                    after.expect("a rollback leaves the app deployed"),
                );
                self.files.state.replace(app, &after)?;
                (before.record.current, after.record.current)
            }
        };
        self.reconcile().await?;
        Ok(moved)
    }

    pub async fn remove(&self, app: &str) -> Result<Vec<String>, ControlError> {
        let _change = self.change.lock().await;
        if let Some(shared) = self.shared.get() {
            let change = |current: Option<&SharedApp>| match current {
                Some(_) => Ok(None),
                None => Err(StateError::NotFound(app.to_string()).into()),
            };
            shared.update(app, &change).await?;
            self.mark_shared(app, false);
        }
        self.remove_here(app).await
    }

    /// Remove an app from this node: its state, services, keys, logs and history.
    async fn remove_here(&self, app: &str) -> Result<Vec<String>, ControlError> {
        let record = self.files.state.app(app)?;
        let revision = self.files.state.revision(app, record.current)?;
        self.files.state.remove(app)?;
        self.reconcile().await?;
        match self.store.revoke_service_keys(app) {
            Ok(0) => {}
            Ok(revoked) => {
                tracing::info!(%app, revoked, "revoked the removed app's object store keys")
            }
            Err(error) => {
                tracing::warn!(%app, %error, "could not revoke the removed app's object store keys")
            }
        }
        let services: Vec<String> = manifest::parse(&revision.manifest_path, &revision.manifest)
            .map(|m| m.services.into_keys().collect())
            .unwrap_or_default();
        let mut logs = self.logs.lock().expect("logs lock is never poisoned");
        for service in &services {
            let key = (app.to_string(), service.clone());
            logs.remove(&key);
            self.files.remove_history(&key);
        }
        Ok(services)
    }

    pub fn apps(&self) -> Result<Vec<AppInfo>, ControlError> {
        let mut apps = Vec::new();
        for (name, record) in self.files.state.apps()? {
            let revisions = self.files.state.revisions(&name)?;
            let services = revisions
                .iter()
                .find(|r| r.number == record.current)
                .and_then(|r| manifest::parse(&r.manifest_path, &r.manifest).ok())
                .map(|m| m.services.into_keys().collect())
                .unwrap_or_default();
            apps.push(AppInfo {
                name,
                revision: record.current,
                revisions: revisions
                    .into_iter()
                    .map(|r| RevisionInfo {
                        number: r.number,
                        created_unix_ms: r.created_unix_ms,
                        manifest_path: r.manifest_path,
                    })
                    .collect(),
                services,
            });
        }
        Ok(apps)
    }

    pub fn services(&self) -> Vec<ServiceStatus> {
        let running = self.running.lock().expect("running lock is never poisoned");
        running
            .iter()
            .map(|((app, name), running)| {
                let (gauges, metrics) = running.service.snapshot();
                let manifest = &running.desired.manifest;
                let failure = running.service.failure();
                ServiceStatus {
                    app: app.clone(),
                    service: name.clone(),
                    revision: running.desired.revision,
                    kind: if manifest.component().is_some() {
                        "component".into()
                    } else {
                        "process".into()
                    },
                    state: if failure.is_some() {
                        "failed".into()
                    } else {
                        "running".into()
                    },
                    failure,
                    routes: manifest.routes.clone(),
                    instances_ready: gauges.ready,
                    instances_starting: gauges.starting,
                    instances_min: manifest.instances_min,
                    instances_max: manifest.instances_max,
                    placement: match running.service.locality() {
                        gateway::Locality::Alone => None,
                        gateway::Locality::Here { min, max, .. } => {
                            Some(format!("here {min}..{max}"))
                        }
                        gateway::Locality::Elsewhere(nodes) => {
                            Some(format!("on {}", nodes.join(", ")))
                        }
                        gateway::Locality::Unplaced(why) => Some(format!("unplaced: {why}")),
                    },
                    in_flight: running
                        .service
                        .metrics
                        .in_flight
                        .load(std::sync::atomic::Ordering::Relaxed),
                    queued: gauges.queued,
                    requests_total: metrics.requests_total,
                    requests_per_second: metrics.requests_per_second,
                    latency_p50_ms: metrics.latency_p50_ms,
                    latency_p99_ms: metrics.latency_p99_ms,
                    cold_starts: metrics.cold_starts,
                    instance_starts: metrics.instance_starts,
                    instance_seconds: metrics.instance_seconds,
                    startup_last_ms: metrics.startup_last_ms,
                    policy: manifest.scaling.policy.name().into(),
                    forecast_requests_per_second: running.service.metrics.forecast(),
                    forecaster: running.service.metrics.forecaster().map(str::to_string),
                    slo_ms: metrics.slo_ms,
                    slo_met_percent: metrics.slo_met_ratio.map(|ratio| ratio * 100.0),
                }
            })
            .collect()
    }

    /// Anomalies of every running service, oldest first.
    pub fn anomalies(&self) -> Vec<maru_api::AnomalyInfo> {
        let running = self.running.lock().expect("running lock is never poisoned");
        let mut all: Vec<maru_api::AnomalyInfo> = running
            .iter()
            .flat_map(|((app, name), running)| {
                running
                    .service
                    .anomalies()
                    .into_iter()
                    .map(move |a| maru_api::AnomalyInfo {
                        app: app.clone(),
                        service: name.clone(),
                        signal: a.signal.into(),
                        unix_ms: a.unix_ms,
                        value: a.value,
                        expected: a.expected,
                        direction: if a.high {
                            "above".into()
                        } else {
                            "below".into()
                        },
                    })
            })
            .collect();
        all.sort_by_key(|a| a.unix_ms);
        all
    }

    pub fn log(&self, app: &str, service: &str) -> Option<Arc<ServiceLog>> {
        self.logs
            .lock()
            .expect("logs lock is never poisoned")
            .get(&(app.to_string(), service.to_string()))
            .cloned()
    }

    /// Prometheus text for every running service.
    pub fn metrics_text(&self) -> String {
        let mut samples = String::new();
        let now = Instant::now();
        let running = self.running.lock().expect("running lock is never poisoned");
        for ((app, name), running) in running.iter() {
            let labels = format!(
                "app=\"{app}\",service=\"{name}\",revision=\"{}\"",
                running.desired.revision
            );
            running
                .service
                .metrics
                .render(&mut samples, &labels, &running.service.gauges(), now);
        }
        drop(running);
        let mut out = String::new();
        gateway::render_families(&mut out, &samples);
        out.push_str("# HELP maru_unrouted_requests_total Requests that matched no route.\n# TYPE maru_unrouted_requests_total counter\n");
        out.push_str(&format!(
            "maru_unrouted_requests_total {}\n",
            self.gateway.unrouted()
        ));
        // The nodes as this node knows them (`maru nodes`); names and labels are checked at
        // start to be plain words, so they need no escaping.
        let nodes = self.nodes();
        out.push_str("# HELP maru_cluster_nodes Nodes whose announcement stands (1 for a node alone).\n# TYPE maru_cluster_nodes gauge\n");
        out.push_str(&format!("maru_cluster_nodes {}\n", nodes.len()));
        out.push_str("# HELP maru_node_info A node's labels and role; always 1.\n# TYPE maru_node_info gauge\n");
        for n in &nodes {
            out.push_str(&format!(
                "maru_node_info{{node=\"{}\",region=\"{}\",zone=\"{}\",edge=\"{}\",scheduler=\"{}\"}} 1\n",
                n.name, n.region, n.zone, n.edge, n.scheduler
            ));
        }
        out.push_str("# HELP maru_node_instances Instances ready or starting on a node, as it last announced.\n# TYPE maru_node_instances gauge\n");
        for n in &nodes {
            out.push_str(&format!(
                "maru_node_instances{{node=\"{}\"}} {}\n",
                n.name, n.instances
            ));
        }
        // Each family's samples together, as the exposition format asks.
        let topics = self.topics();
        type Family = (
            &'static str,
            &'static str,
            &'static str,
            fn(&maru_api::TopicInfo) -> u64,
        );
        let families: [Family; 4] = [
            (
                "maru_events_appended_total",
                "counter",
                "Events appended to a topic since maru started.",
                |t| t.appended_total,
            ),
            (
                "maru_events_syncs_total",
                "counter",
                "fdatasyncs of a topic's log since maru started.",
                |t| t.syncs_total,
            ),
            (
                "maru_events_next_offset",
                "gauge",
                "The offset the next event of a topic will get.",
                |t| t.next_offset,
            ),
            (
                "maru_events_stored_bytes",
                "gauge",
                "Bytes a topic's segments hold.",
                |t| t.bytes,
            ),
        ];
        for (family, kind, help, value) in families {
            out.push_str(&format!("# HELP {family} {help}\n# TYPE {family} {kind}\n"));
            for topic in &topics {
                out.push_str(&format!(
                    "{family}{{topic=\"{}\"}} {}\n",
                    topic.name,
                    value(topic)
                ));
            }
        }
        out.push_str("# HELP maru_events_consumer_lag Events of a topic a consumer group has not finished.\n# TYPE maru_events_consumer_lag gauge\n");
        for topic in &topics {
            for group in &topic.groups {
                out.push_str(&format!(
                    "maru_events_consumer_lag{{topic=\"{}\",group=\"{}\"}} {}\n",
                    topic.name, group.name, group.lag
                ));
            }
        }
        out
    }

    /// Every open topic with its consumer groups.
    pub fn topics(&self) -> Vec<maru_api::TopicInfo> {
        self.events
            .topics()
            .into_iter()
            .map(|topic| {
                let stats = topic.stats();
                maru_api::TopicInfo {
                    name: topic.name().to_string(),
                    first_offset: stats.first,
                    next_offset: stats.next,
                    bytes: stats.bytes,
                    segments: stats.segments,
                    appended_total: stats.appended_total,
                    commits_total: stats.commits_total,
                    syncs_total: stats.syncs_total,
                    per_second: stats.per_second_last_10s,
                    groups: stats
                        .groups
                        .into_iter()
                        .map(|(name, committed)| maru_api::GroupInfo {
                            name,
                            committed,
                            lag: stats.next.saturating_sub(committed),
                        })
                        .collect(),
                    broken: topic.broken(),
                    lost: stats.lost.iter().map(|r| [r.start, r.end]).collect(),
                }
            })
            .collect()
    }

    /// Stop every service, letting admitted requests finish.
    pub async fn shutdown(&self) {
        self.save_history();
        {
            let mut triggers = self.triggers.lock().await;
            for (_, mut trigger) in std::mem::take(&mut *triggers) {
                trigger.cancel.cancel();
                while trigger.tasks.join_next().await.is_some() {}
            }
        }
        let services: Vec<Arc<Service>> = {
            let mut running = self.running.lock().expect("running lock is never poisoned");
            std::mem::take(&mut *running)
                .into_values()
                .map(|r| r.service)
                .collect()
        };
        self.gateway.install(RouteTable::default());
        let mut retiring = self.retiring.lock().await;
        for service in services {
            retiring.spawn(async move { service.shutdown().await });
        }
        while retiring.join_next().await.is_some() {}
        self.events.close_all().await;
        // Every instance has stopped and removed its own temporary directory; what the
        // node published there (the CA certificate) goes too.
        if let Some(sandbox) = &self.sandbox {
            for published in &sandbox.readable {
                _ = std::fs::remove_file(published);
            }
            _ = std::fs::remove_dir(&sandbox.temporary_root);
        }
    }
}

fn topic_config(topic: &TopicManifest) -> events::TopicConfig {
    events::TopicConfig {
        durability: match topic.batch_window {
            None => events::Durability::Fsync,
            Some(window) => events::Durability::Batch { window },
        },
        retention_age: Some(topic.retention),
        retention_bytes: Some(topic.retention_bytes),
        segment_bytes: topic.segment_bytes,
        event_bytes_max: usize::try_from(topic.event_bytes_max).unwrap_or(usize::MAX),
    }
}

/// The policy a service's manifest asks for. Policies with time windows observe once a
/// second (see `autopilot::Paced`); the reactive one on every wake-up.
fn policy_for(scaling: &Scaling) -> Box<dyn Policy> {
    let second = std::time::Duration::from_secs(1);
    let target = |default: f64| {
        scaling
            .target_percent
            .map_or(default, |p| f64::from(p) / 100.0)
    };
    match scaling.policy {
        ScalingPolicy::Reactive => Box::new(Reactive),
        ScalingPolicy::Hpa => Box::new(Paced::new(Hpa::new(target(0.5)), second)),
        ScalingPolicy::Kpa => Box::new(Paced::new(Kpa::new(target(0.7)), second)),
        ScalingPolicy::AwsPredictive => {
            Box::new(Paced::new(AwsPredictive::new(target(0.5)), second))
        }
        ScalingPolicy::Predictive => {
            let caution = match scaling.caution {
                CautionLevel::Conservative => Caution::CONSERVATIVE,
                CautionLevel::Normal => Caution::NORMAL,
                CautionLevel::Aggressive => Caution::AGGRESSIVE,
                CautionLevel::Knob(thousandths) => {
                    autopilot::evaluate::predictive_caution(f64::from(thousandths) / 1000.0)
                }
            };
            // The horizon grows to the measured start-up time once instances have started.
            Box::new(Paced::new(
                Predictive::new(caution, second).with_slo(scaling.slo),
                second,
            ))
        }
    }
}

/// The working directory of a process service: relative paths are relative to the directory
/// the manifest was deployed from.
fn resolve_workdir(manifest_dir: Option<&str>, workdir: &str) -> PathBuf {
    let workdir = Path::new(workdir);
    match manifest_dir {
        Some(dir) if workdir.is_relative() => Path::new(dir).join(workdir),
        _ => workdir.to_path_buf(),
    }
}

/// The program must exist and be executable on this node.
fn check_command(
    parsed: &AppManifest,
    name: &str,
    command: &[String],
    workdir: &Path,
) -> Result<(), ControlError> {
    use std::os::unix::fs::PermissionsExt as _;
    let field = format!("service.{name}.command");
    if !workdir.is_dir() {
        return Err(ControlError::BadManifest(parsed.error_at(
            &format!("service.{name}.workdir"),
            format!(
                "the working directory {} does not exist on the node",
                workdir.display()
            ),
            Some("workdir is relative to the manifest's directory".into()),
        )));
    }
    let program = &command[0];
    let executable = |path: &Path| {
        path.is_file()
            && path
                .metadata()
                .is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        executable(&workdir.join(program))
    } else {
        std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| executable(&dir.join(program)))
        })
    };
    if found {
        return Ok(());
    }
    let (message, hint) = if program.contains('/') {
        (format!("command `{program}` is not an executable file (looked in {})", workdir.display()), "a path with a `/` is relative to workdir; check it exists and is executable (chmod +x)".to_string())
    } else {
        (
            format!("command `{program}` was not found on the node's PATH"),
            "install the program on the node, or give its path".to_string(),
        )
    };
    Err(ControlError::BadManifest(parsed.error_at(
        &field,
        message,
        Some(hint),
    )))
}

/// The working and writable directories of other apps' process services, which a service's
/// instances may not read. (Services of one app share what their app's directories hold.)
fn other_apps_directories(app: &str, desired: &BTreeMap<ServiceKey, Desired>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = desired
        .iter()
        .filter(|((other, _), _)| other != app)
        .flat_map(|(_, want)| want.workdir.iter().chain(&want.writable))
        .map(|dir| runtime::sandbox::canonical(dir))
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

fn route_keys(service: &ServiceManifest) -> Vec<RouteKey> {
    let hosts: Vec<Option<&str>> = if service.hosts.is_empty() {
        vec![None]
    } else {
        service.hosts.iter().map(|h| Some(h.as_str())).collect()
    };
    hosts
        .iter()
        .flat_map(|host| {
            service
                .routes
                .iter()
                .map(move |route| RouteKey::new(*host, route))
        })
        .collect()
}

fn diff(
    previous: &RevisionRecord,
    next: &AppManifest,
    next_components: &BTreeMap<String, String>,
    next_dir: Option<&str>,
) -> Vec<ServiceChange> {
    let Ok(old) = manifest::parse(&previous.manifest_path, &previous.manifest) else {
        return next
            .services
            .keys()
            .map(|name| ServiceChange {
                service: name.clone(),
                kind: "changed".into(),
                fields: vec!["manifest".into()],
            })
            .collect();
    };
    let mut changes = Vec::new();
    for (name, service) in &next.services {
        match old.services.get(name) {
            None => changes.push(ServiceChange {
                service: name.clone(),
                kind: "added".into(),
                fields: Vec::new(),
            }),
            Some(before) => {
                let mut fields: Vec<String> = before
                    .changed_fields(service)
                    .into_iter()
                    .map(str::to_string)
                    .collect();
                match (before.component(), service.component()) {
                    (Some(a), Some(b)) if previous.components.get(a) != next_components.get(b) => {
                        fields.insert(0, "component".into())
                    }
                    _ => {}
                }
                if let (Workload::Process(a), Workload::Process(b)) =
                    (&before.workload, &service.workload)
                    && resolve_workdir(previous.manifest_dir.as_deref(), &a.workdir)
                        != resolve_workdir(next_dir, &b.workdir)
                    && !fields.iter().any(|f| f == "workdir")
                {
                    fields.push("workdir".into());
                }
                // The app's key-value buckets reach its components.
                if old.kv != next.kv && service.component().is_some() {
                    fields.push("kv".into());
                }
                if !fields.is_empty() {
                    changes.push(ServiceChange {
                        service: name.clone(),
                        kind: "changed".into(),
                        fields,
                    });
                }
            }
        }
    }
    for name in old.services.keys() {
        if !next.services.contains_key(name) {
            changes.push(ServiceChange {
                service: name.clone(),
                kind: "removed".into(),
                fields: Vec::new(),
            });
        }
    }
    // The app's own labels (its organisation, its buckets' labels) change what its
    // services may reach.
    let mut app_fields = Vec::new();
    if old.organisation != next.organisation {
        app_fields.push("organisation".to_string());
    }
    if old.buckets != next.buckets {
        app_fields.push("bucket".to_string());
    }
    if !app_fields.is_empty() {
        changes.push(ServiceChange {
            service: "app".into(),
            kind: "changed".into(),
            fields: app_fields,
        });
    }
    // Topics are reported as `topic NAME` beside the services.
    let names: std::collections::BTreeSet<&String> =
        old.topics.keys().chain(next.topics.keys()).collect();
    for name in names {
        let kind = match (old.topics.get(name), next.topics.get(name)) {
            (None, Some(_)) => "added",
            (Some(_), None) => "removed",
            (Some(a), Some(b)) if a != b => "changed",
            _ => continue,
        };
        changes.push(ServiceChange {
            service: format!("topic {name}"),
            kind: kind.into(),
            fields: Vec::new(),
        });
    }
    changes
}
