//! The node's side of data access (`policy::data`; docs/policy.md): the labels of the
//! deployed datasets and services, the checks a deploy must pass, and the guards that
//! decide each trigger delivery, key-value call and ingest publish.
//!
//! Where each access is decided:
//! - a deploy: every trigger's topic (`topic.consume`), its `reply_to` and `dead_letter`
//!   (`topic.publish`), and a process service's `store_bucket` (`bucket.read` and
//!   `bucket.write`). A denial refuses the deploy (403) and is in the audit log.
//! - every trigger delivery ([`TriggerGuard`]): decided again whenever the policies change,
//!   so a policy change stops (or resumes) a running trigger; each delivery of personal
//!   data is in the audit log before the service sees it.
//! - every key-value call ([`KvGuard`]): `kv.read` for reads, `kv.write` for writes; each
//!   call on a personal bucket is in the audit log before it runs.
//! - every publish over HTTP ingest and MQTT ([`Publishers`]): `topic.publish` by the
//!   producer's token; each publish to a personal topic is in the audit log before it is
//!   stored.
//!
//! Decisions are cached until [`DataGuard::generation`] moves (a policy change or a token
//! revocation). Denials are recorded once per generation per guard, so a client retrying
//! a refused publish does not flood the audit log.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use events::Event;
use policy::authz::Decision;
use policy::data::{
    Actor, DataAction, DataGuard, Dataset, DatasetKind, Labels, NodeLabels, Pseudonymiser,
    ServicePrincipal,
};
use policy::identity::{Identities, Principal};

use crate::manifest::{AppManifest, DataLabels};

/// What a node decides data access with.
pub struct DataPlane {
    pub guard: Arc<DataGuard>,
    /// HTTP ingest and MQTT producers (`None` when the node has no ingest).
    pub publishers: Option<Arc<Publishers>>,
    /// Object requests over S3 (`None` when the node serves no S3).
    pub objects: Option<Arc<Objects>>,
}

/// A dataset's labels with the node's defaults filled in.
pub fn labels(declared: &DataLabels, organisation: &str, node: &NodeLabels) -> Labels {
    Labels {
        classification: declared.classification,
        organisation: organisation.to_string(),
        region: declared
            .region
            .clone()
            .unwrap_or_else(|| node.region.clone()),
        allowed_purposes: declared.allowed_purposes.clone(),
    }
}

/// The organisation that owns an app's data.
pub fn organisation<'a>(app: &'a AppManifest, node: &'a NodeLabels) -> &'a str {
    app.organisation.as_deref().unwrap_or(&node.organisation)
}

/// A service of `app`, as it acts on data.
pub fn service_principal(app: &AppManifest, service: &str, node: &NodeLabels) -> ServicePrincipal {
    ServicePrincipal {
        app: app.name.clone(),
        service: service.to_string(),
        organisation: organisation(app, node).to_string(),
        purposes: app
            .services
            .get(service)
            .map(|s| s.purposes.clone())
            .unwrap_or_default(),
        region: node.region.clone(),
    }
}

/// Every topic the apps declare (the first declaring app owns it), labelled.
pub fn topics<'a>(
    apps: impl IntoIterator<Item = &'a AppManifest>,
    node: &NodeLabels,
) -> BTreeMap<String, Dataset> {
    let mut topics = BTreeMap::new();
    for app in apps {
        for (name, topic) in &app.topics {
            topics.entry(name.clone()).or_insert_with(|| Dataset {
                kind: DatasetKind::Topic,
                name: name.clone(),
                labels: labels(&topic.labels, organisation(app, node), node),
            });
        }
    }
    topics
}

/// An object bucket as `app` labels it (internal to the app's organisation unless a
/// `[bucket."NAME"]` table says otherwise).
pub fn bucket(app: &AppManifest, name: &str, node: &NodeLabels) -> Dataset {
    let declared = app.buckets.get(name).cloned().unwrap_or_default();
    Dataset {
        kind: DatasetKind::Bucket,
        name: name.to_string(),
        labels: labels(&declared, organisation(app, node), node),
    }
}

/// Every bucket the apps label or give a service (the first app to name it labels it).
pub fn buckets<'a>(
    apps: impl IntoIterator<Item = &'a AppManifest>,
    node: &NodeLabels,
) -> BTreeMap<String, Dataset> {
    let mut buckets = BTreeMap::new();
    for app in apps {
        let used = app.services.values().filter_map(|s| match &s.workload {
            crate::manifest::Workload::Process(p) => p.store_bucket.as_ref(),
            crate::manifest::Workload::Component { .. } => None,
        });
        for name in app.buckets.keys().chain(used) {
            buckets
                .entry(name.clone())
                .or_insert_with(|| bucket(app, name, node));
        }
    }
    buckets
}

/// One access a deploy would grant, and the manifest field that asks for it.
pub struct Access {
    pub service: ServicePrincipal,
    pub action: DataAction,
    pub dataset: Dataset,
    pub field: String,
}

/// The data accesses `app`'s manifest asks for, given the topics deployed elsewhere
/// (`others`, labelled; the app's own declarations win for its own topics).
pub fn accesses(
    app: &AppManifest,
    others: &BTreeMap<String, Dataset>,
    node: &NodeLabels,
) -> Vec<Access> {
    let own = topics([app], node);
    let topic = |name: &str| own.get(name).or_else(|| others.get(name)).cloned();
    let mut wanted = Vec::new();
    for (name, service) in &app.services {
        let principal = service_principal(app, name, node);
        for trigger in &service.triggers {
            let field = format!("service.{name}.trigger");
            let mut ask = |action, topic_name: &str| {
                if let Some(dataset) = topic(topic_name) {
                    wanted.push(Access {
                        service: principal.clone(),
                        action,
                        dataset,
                        field: field.clone(),
                    });
                }
            };
            ask(DataAction::TopicConsume, &trigger.topic);
            for published in [&trigger.reply_to, &trigger.dead_letter]
                .into_iter()
                .flatten()
            {
                ask(DataAction::TopicPublish, published);
            }
        }
        if let crate::manifest::Workload::Process(process) = &service.workload
            && let Some(name_of_bucket) = &process.store_bucket
        {
            for action in [DataAction::BucketRead, DataAction::BucketWrite] {
                wanted.push(Access {
                    service: principal.clone(),
                    action,
                    dataset: bucket(app, name_of_bucket, node),
                    field: format!("service.{name}.store_bucket"),
                });
            }
        }
    }
    wanted
}

/// A decision cached until the guard's generation moves.
struct Cached {
    generation: u64,
    decision: Decision,
}

/// Decisions by key, each valid while the guard's generation stands; at most `max` kept.
struct Decisions<K> {
    cached: Mutex<HashMap<K, Cached>>,
    max: usize,
}

impl<K: std::hash::Hash + Eq> Decisions<K> {
    fn new(max: usize) -> Decisions<K> {
        Decisions {
            cached: Mutex::new(HashMap::new()),
            max,
        }
    }

    /// The cached decision for `key` at `generation`, or `decide`'s (then `true`: made
    /// afresh, so a denial must be recorded).
    fn get_or_decide(
        &self,
        key: K,
        generation: u64,
        decide: impl FnOnce() -> Decision,
    ) -> (Decision, bool) {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.get(&key).filter(|c| c.generation == generation) {
            return (c.decision.clone(), false);
        }
        let decision = decide();
        if cached.len() >= self.max {
            cached.clear();
        }
        cached.insert(
            key,
            Cached {
                generation,
                decision: decision.clone(),
            },
        );
        (decision, true)
    }
}

/// Decides each delivery of one trigger (see the module docs).
pub struct TriggerGuard {
    guard: Arc<DataGuard>,
    service: ServicePrincipal,
    topic: Dataset,
    /// Topics the trigger writes to (reply_to, dead_letter).
    publishes: Vec<Dataset>,
    group: String,
    pseudonymise: Vec<String>,
    pseudonymiser: Pseudonymiser,
    decision: Decisions<()>,
}

impl TriggerGuard {
    pub fn new(
        guard: Arc<DataGuard>,
        service: ServicePrincipal,
        topic: Dataset,
        publishes: Vec<Dataset>,
        group: String,
        pseudonymise: Vec<String>,
    ) -> TriggerGuard {
        let pseudonymiser = guard.pseudonymiser(&service.app);
        TriggerGuard {
            guard,
            service,
            topic,
            publishes,
            group,
            pseudonymise,
            pseudonymiser,
            decision: Decisions::new(1),
        }
    }

    /// The decision for the whole trigger: reading its topic and writing its replies and
    /// dead letters (the first refusal, else the permission to read). `true` when it was
    /// made afresh (a denial must then be recorded).
    fn decision(&self) -> (Decision, bool) {
        self.decision
            .get_or_decide((), self.guard.generation(), || {
                let actor = Actor::Service(&self.service);
                let consume = self
                    .guard
                    .decide(&actor, DataAction::TopicConsume, &self.topic);
                if !consume.allowed {
                    return consume;
                }
                self.publishes
                    .iter()
                    .map(|published| {
                        self.guard
                            .decide(&actor, DataAction::TopicPublish, published)
                    })
                    .find(|publish| !publish.allowed)
                    .unwrap_or(consume)
            })
    }

    /// `None`: deliver as read.
    fn shape(&self, events: &[Event]) -> Option<Vec<Event>> {
        if self.pseudonymise.is_empty() {
            return None;
        }
        let mut shaped = Vec::with_capacity(events.len());
        for event in events {
            match self.pseudonymiser.apply(&event.payload, &self.pseudonymise) {
                Ok(payload) => {
                    let mut event = event.clone();
                    event.payload = payload.into();
                    shaped.push(event);
                }
                Err(error) => tracing::warn!(
                    trigger = %self.group,
                    topic = %self.topic.name,
                    offset = event.offset,
                    %error,
                    "event withheld: the trigger pseudonymises fields"
                ),
            }
        }
        Some(shaped)
    }
}

impl gateway::DeliveryGuard for TriggerGuard {
    fn admit<'a>(&'a self, events: &'a [Event]) -> gateway::Admitted<'a> {
        Box::pin(async move {
            let (decision, fresh) = self.decision();
            let personal = self.topic.is_personal();
            if decision.allowed && !personal {
                return Ok(self.shape(events));
            }
            if !decision.allowed && !fresh {
                return Err(format!("denied: {}", decision.reason()));
            }
            let mut details = serde_json::Map::new();
            details.insert("trigger".into(), self.group.clone().into());
            details.insert(
                "offsets".into(),
                format!(
                    "{}..={}",
                    events.first().map_or(0, |e| e.offset),
                    events.last().map_or(0, |e| e.offset)
                )
                .into(),
            );
            details.insert("events".into(), events.len().into());
            if !self.pseudonymise.is_empty() {
                details.insert("pseudonymised".into(), self.pseudonymise.clone().into());
            }
            let (guard, service, topic, recorded) = (
                self.guard.clone(),
                self.service.clone(),
                self.topic.clone(),
                decision.clone(),
            );
            tokio::task::spawn_blocking(move || {
                guard.record(
                    &Actor::Service(&service),
                    DataAction::TopicConsume,
                    &topic,
                    &recorded,
                    None,
                    details,
                )
            })
            .await
            .map_err(|e| format!("the audit task failed: {e}"))?
            .map_err(|e| e.to_string())?;
            if decision.allowed {
                Ok(self.shape(events))
            } else {
                Err(format!("denied: {}", decision.reason()))
            }
        })
    }
}

/// Decides each key-value call of one service (see the module docs).
pub struct KvGuard {
    guard: Arc<DataGuard>,
    service: ServicePrincipal,
    buckets: BTreeMap<String, Dataset>,
    decisions: Decisions<(String, bool)>,
}

/// Why a key-value call was refused.
pub enum KvRefusal {
    Denied(String),
    /// The audit log cannot take the entry.
    Unrecorded(String),
}

impl KvGuard {
    pub fn new(
        guard: Arc<DataGuard>,
        service: ServicePrincipal,
        buckets: BTreeMap<String, Dataset>,
    ) -> KvGuard {
        KvGuard {
            guard,
            service,
            decisions: Decisions::new(2 * crate::manifest::KV_BUCKETS_MAX),
            buckets,
        }
    }

    /// May the service read (or write) `bucket`? Records what belongs in the audit log;
    /// blocks on it (key-value calls run on blocking threads).
    pub fn check(&self, bucket: &str, write: bool, key: Option<&str>) -> Result<(), KvRefusal> {
        let Some(dataset) = self.buckets.get(bucket) else {
            return Err(KvRefusal::Denied(format!("no bucket {bucket}")));
        };
        let action = if write {
            DataAction::KvWrite
        } else {
            DataAction::KvRead
        };
        let (decision, fresh) = self.decisions.get_or_decide(
            (bucket.to_string(), write),
            self.guard.generation(),
            || {
                self.guard
                    .decide(&Actor::Service(&self.service), action, dataset)
            },
        );
        if dataset.is_personal() || (!decision.allowed && fresh) {
            let mut details = serde_json::Map::new();
            if let Some(key) = key {
                // Keys of personal data may name people: only a keyed hash is recorded.
                details.insert("key".into(), self.guard.redact(key).into());
            }
            self.guard
                .record(
                    &Actor::Service(&self.service),
                    action,
                    dataset,
                    &decision,
                    None,
                    details,
                )
                .map_err(|e| KvRefusal::Unrecorded(e.to_string()))?;
        }
        if decision.allowed {
            Ok(())
        } else {
            Err(KvRefusal::Denied(decision.reason()))
        }
    }

    /// May the service open `bucket` at all (read or write)?
    pub fn may_open(&self, bucket: &str) -> bool {
        let Some(dataset) = self.buckets.get(bucket) else {
            return false;
        };
        let actor = Actor::Service(&self.service);
        [DataAction::KvRead, DataAction::KvWrite]
            .into_iter()
            .any(|action| self.guard.decide(&actor, action, dataset).allowed)
    }
}

/// Who may publish over HTTP ingest and MQTT: the node's ingest token
/// (`machine:node-ingest`, role `ingest`) and machine tokens, each decided by Cedar per
/// topic (see the module docs).
pub struct Publishers {
    shared: Arc<Shared>,
    /// Producers by their secret's BLAKE3, so HTTP requests (one producer each) reuse the
    /// decisions made for earlier ones; at most [`PRODUCERS_CACHED_MAX`].
    producers: Mutex<HashMap<[u8; 32], Arc<Producer>>>,
}

/// Producers whose decisions are kept between HTTP requests.
const PRODUCERS_CACHED_MAX: usize = 1024;

struct Shared {
    guard: Arc<DataGuard>,
    identities: Arc<Identities>,
    ingest_token: String,
    /// The deployed topics, labelled; replaced after every reconcile.
    topics: Mutex<Arc<BTreeMap<String, Dataset>>>,
}

/// Topics whose decisions one producer keeps.
const PRODUCER_TOPICS_MAX: usize = 256;

impl Publishers {
    pub fn new(
        guard: Arc<DataGuard>,
        identities: Arc<Identities>,
        ingest_token: String,
    ) -> Publishers {
        Publishers {
            shared: Arc::new(Shared {
                guard,
                identities,
                ingest_token,
                topics: Mutex::new(Arc::new(BTreeMap::new())),
            }),
            producers: Mutex::new(HashMap::new()),
        }
    }

    /// The deployed topics changed: later decisions use these labels.
    pub fn set_topics(&self, topics: BTreeMap<String, Dataset>) {
        *self.shared.topics.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(topics);
        self.shared.guard.invalidate();
    }
}

impl Shared {
    /// Who `secret` is now, if anyone.
    fn principal(&self, secret: &str) -> Option<Principal> {
        if events::token_matches(&self.ingest_token, secret) {
            return Some(Principal {
                subject: "machine:node-ingest".into(),
                roles: vec!["ingest".into()],
                token_id: None,
                expires_ms: None,
            });
        }
        match self.identities.authenticate(secret) {
            Ok(found) => found,
            Err(error) => {
                tracing::error!(%error, "ingest: the identity database cannot be read; refusing the producer");
                None
            }
        }
    }
}

impl events::Publishers for Publishers {
    fn authenticate(&self, secret: &str) -> Option<Arc<dyn events::Producer>> {
        let id = *blake3::hash(secret.as_bytes()).as_bytes();
        let generation = self.shared.guard.generation();
        let known = self
            .producers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        if let Some(producer) = known {
            let current = {
                let state = producer.state.lock().unwrap_or_else(|p| p.into_inner());
                state.generation == generation && state.principal.is_some()
            };
            // Tokens may have been revoked since: ask again before answering as before.
            if current || self.shared.principal(secret).is_some() {
                return Some(producer);
            }
            self.producers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return None;
        }
        let principal = self.shared.principal(secret)?;
        let producer = Arc::new(Producer {
            shared: self.shared.clone(),
            secret: secret.to_string(),
            state: Mutex::new(ProducerState {
                generation,
                principal: Some(principal),
                topics: HashMap::new(),
            }),
        });
        let mut producers = self.producers.lock().unwrap_or_else(|p| p.into_inner());
        if producers.len() >= PRODUCERS_CACHED_MAX {
            producers.clear();
        }
        producers.insert(id, producer.clone());
        Some(producer)
    }
}

/// One authenticated producer (an MQTT connection, or one HTTP request).
struct Producer {
    shared: Arc<Shared>,
    /// Kept in memory only, to find out whether the token was revoked since.
    secret: String,
    state: Mutex<ProducerState>,
}

struct ProducerState {
    generation: u64,
    /// `None` once the token was revoked or expired.
    principal: Option<Principal>,
    /// Per topic name: the decision and the labelled topic it was made on.
    topics: HashMap<String, (Decision, Arc<Dataset>)>,
}

impl events::Producer for Producer {
    fn name(&self) -> String {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .principal
            .as_ref()
            .map_or_else(|| "a revoked token".to_string(), |p| p.subject.clone())
    }

    fn admit(&self, topic: &str, address: Option<std::net::IpAddr>) -> events::Admission {
        let guard = &self.shared.guard;
        let generation = guard.generation();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.generation != generation {
            // Policies, topics or tokens changed: who is this now, and decide again.
            state.generation = generation;
            state.principal = self.shared.principal(&self.secret);
            state.topics.clear();
        }
        let Some(expires) = state.principal.as_ref().map(|p| p.expires_ms) else {
            return events::Admission::Denied("the token was revoked or has expired".into());
        };
        if expires.is_some_and(|at| at <= now_ms()) {
            state.principal = None;
            return events::Admission::Denied("the token has expired".into());
        }
        // The common case, a topic this producer published to before: nothing allocated.
        if let Some((decision, dataset)) = state.topics.get(topic) {
            match (decision.allowed, dataset.is_personal()) {
                (true, false) => return events::Admission::Allowed,
                (false, _) => return events::Admission::Denied(decision.reason()),
                (true, true) => {}
            }
        }
        let principal = state.principal.clone().expect("checked above");
        let (decision, dataset, fresh) = match state.topics.get(topic) {
            Some((decision, dataset)) => (decision.clone(), dataset.clone(), false),
            None => {
                let Some(dataset) = self
                    .shared
                    .topics
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(topic)
                    .cloned()
                else {
                    // Open in the events crate but not (yet) labelled here: refuse rather
                    // than let data through undecided.
                    return events::Admission::Denied(format!(
                        "topic {topic} is not deployed (or is being deployed); try again"
                    ));
                };
                let dataset = Arc::new(dataset);
                let decision = guard.decide(
                    &Actor::Caller(&principal),
                    DataAction::TopicPublish,
                    &dataset,
                );
                if state.topics.len() >= PRODUCER_TOPICS_MAX {
                    state.topics.clear();
                }
                state
                    .topics
                    .insert(topic.to_string(), (decision.clone(), dataset.clone()));
                (decision, dataset, true)
            }
        };
        drop(state);
        let personal = dataset.is_personal();
        match (decision.allowed, personal, fresh) {
            (true, false, _) => events::Admission::Allowed,
            (false, _, false) => events::Admission::Denied(decision.reason()),
            _ => {
                let guard = guard.clone();
                events::Admission::Blocking(Box::new(move || {
                    guard
                        .record(
                            &Actor::Caller(&principal),
                            DataAction::TopicPublish,
                            &dataset,
                            &decision,
                            address.map(|a| a.to_string()),
                            serde_json::Map::new(),
                        )
                        .map_err(|e| e.to_string())?;
                    if decision.allowed {
                        Ok(())
                    } else {
                        Err(decision.reason())
                    }
                }))
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Object requests over S3 ([`store::s3::ObjectGuard`]): a service's key acts as its
/// service (purposes, organisation, region); a key made with `maru store keys create` is
/// `machine:store-key:ID` with the role `store`. Buckets are labelled by the apps that
/// declare them (`[bucket."NAME"]`); an undeclared bucket is internal to the node's
/// organisation.
pub struct Objects {
    guard: Arc<DataGuard>,
    state: Mutex<Arc<ObjectLabels>>,
    decisions: Decisions<(String, String, bool)>,
}

/// What object decisions are made on, replaced after every reconcile.
#[derive(Default)]
pub struct ObjectLabels {
    pub buckets: BTreeMap<String, Dataset>,
    pub services: BTreeMap<(String, String), ServicePrincipal>,
}

/// Decisions kept per key, bucket and direction; cleared when full.
const OBJECT_DECISIONS_MAX: usize = 4096;

impl Objects {
    pub fn new(guard: Arc<DataGuard>) -> Objects {
        Objects {
            guard,
            state: Mutex::new(Arc::default()),
            decisions: Decisions::new(OBJECT_DECISIONS_MAX),
        }
    }

    pub fn set_labels(&self, labels: ObjectLabels) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(labels);
        self.guard.invalidate();
    }

    fn dataset(&self, labels: &ObjectLabels, bucket: &str) -> Dataset {
        labels
            .buckets
            .get(bucket)
            .cloned()
            .unwrap_or_else(|| Dataset {
                kind: policy::data::DatasetKind::Bucket,
                name: bucket.to_string(),
                labels: Labels {
                    classification: policy::data::Classification::Internal,
                    organisation: self.guard.node().organisation.clone(),
                    region: self.guard.node().region.clone(),
                    allowed_purposes: Vec::new(),
                },
            })
    }
}

impl store::s3::ObjectGuard for Objects {
    fn admit(
        &self,
        key: &store::engine::AccessKey,
        bucket: &str,
        write: bool,
    ) -> Result<(), String> {
        let labels = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let dataset = self.dataset(&labels, bucket);
        let service = key
            .description
            .strip_prefix("service ")
            .and_then(|s| s.split_once('/'))
            .and_then(|(app, name)| labels.services.get(&(app.to_string(), name.to_string())));
        let caller = Principal {
            subject: format!("machine:store-key:{}", key.id),
            roles: vec!["store".into()],
            token_id: None,
            expires_ms: None,
        };
        let actor = match service {
            Some(service) => Actor::Service(service),
            None => Actor::Caller(&caller),
        };
        let action = if write {
            DataAction::BucketWrite
        } else {
            DataAction::BucketRead
        };
        let (decision, fresh) = self.decisions.get_or_decide(
            (key.id.clone(), bucket.to_string(), write),
            self.guard.generation(),
            || self.guard.decide(&actor, action, &dataset),
        );
        if dataset.is_personal() || (!decision.allowed && fresh) {
            let mut details = serde_json::Map::new();
            details.insert("access_key".into(), key.id.clone().into());
            self.guard
                .record(&actor, action, &dataset, &decision, None, details)
                .map_err(|e| e.to_string())?;
        }
        if decision.allowed {
            Ok(())
        } else {
            Err(format!(
                "{} may not {} {}: {}",
                actor.name(),
                action.name(),
                dataset.resource(),
                decision.reason()
            ))
        }
    }
}
