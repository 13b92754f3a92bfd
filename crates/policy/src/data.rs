//! Data access by classification, purpose and region.
//!
//! Every topic, key-value bucket and object bucket is a [`Dataset`] labelled by the app
//! that declares it: its organisation, a [`Classification`] (`public`, `internal`,
//! `personal`), the region it belongs to and, for personal data, the purposes it was
//! collected for. A service acting on data is a [`ServicePrincipal`]: its app's
//! organisation, the purposes its manifest declares and the region of its node. Cedar
//! decides each access ([`crate::authz::Policies::decide_data`]; the default policies are in
//! `authz/default.cedar`).
//!
//! [`DataGuard`] is where the node asks: it decides, and writes the audit entries that
//! belong — every denial, and every allowed access to personal data — before the caller
//! goes on; if the audit log cannot take the entry, the access is refused. Decisions may be
//! cached by callers as long as [`DataGuard::generation`] has not moved (it moves whenever
//! the policies change or a token is revoked).
//!
//! [`Pseudonymiser`] replaces personal fields of JSON events with keyed hashes: a consumer
//! can link events about the same person without learning who it is, and two consumers'
//! pseudonyms cannot be joined.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use disk::Env;
use serde::{Deserialize, Serialize};

use crate::audit::{AuditError, AuditLog, Decision as Recorded, Event, Kind};
use crate::authz::{Decision, Policies};
use crate::identity::Principal;

/// How sensitive a dataset is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Classification {
    /// Anyone authenticated may read it (traffic counts, timetables).
    Public,
    /// The owning organisation's services and the node's operators.
    Internal,
    /// About people: only for the purposes it was collected for, in its region, audited.
    Personal,
}

impl Classification {
    pub const NAMES: [&'static str; 3] = ["public", "internal", "personal"];

    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Public => "public",
            Classification::Internal => "internal",
            Classification::Personal => "personal",
        }
    }

    pub fn parse(text: &str) -> Option<Classification> {
        match text {
            "public" => Some(Classification::Public),
            "internal" => Some(Classification::Internal),
            "personal" => Some(Classification::Personal),
            _ => None,
        }
    }
}

/// A dataset's labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Labels {
    pub classification: Classification,
    /// The organisation of the app that declares it.
    pub organisation: String,
    pub region: String,
    /// For personal data: what it may be used for (never empty then). Empty otherwise.
    pub allowed_purposes: Vec<String>,
}

/// What kind of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DatasetKind {
    Topic,
    Kv,
    Bucket,
}

impl DatasetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetKind::Topic => "topic",
            DatasetKind::Kv => "kv",
            DatasetKind::Bucket => "bucket",
        }
    }
}

/// A topic (`city.traffic`), a key-value bucket (`APP/NAME`) or an object bucket, with its
/// labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Dataset {
    pub kind: DatasetKind,
    pub name: String,
    pub labels: Labels,
}

impl Dataset {
    /// `topic/NAME`, `kv/APP/NAME`, `bucket/NAME`: the Cedar id and the audit resource.
    pub fn resource(&self) -> String {
        format!("{}/{}", self.kind.as_str(), self.name)
    }

    pub fn is_personal(&self) -> bool {
        self.labels.classification == Classification::Personal
    }
}

/// A deployed service, as it acts on data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePrincipal {
    pub app: String,
    pub service: String,
    pub organisation: String,
    pub purposes: Vec<String>,
    pub region: String,
}

/// Who accesses data: a service, or an authenticated caller (an operator or a machine
/// token, over the control API, HTTP ingest or MQTT).
#[derive(Debug, Clone, Copy)]
pub enum Actor<'a> {
    Service(&'a ServicePrincipal),
    Caller(&'a Principal),
}

impl Actor<'_> {
    /// How the audit log names it.
    pub fn name(&self) -> String {
        match self {
            Actor::Service(service) => format!("service:{}/{}", service.app, service.service),
            Actor::Caller(principal) => principal.subject.clone(),
        }
    }
}

/// A data action (the schema's `data` group).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataAction {
    TopicPublish,
    TopicConsume,
    KvRead,
    KvWrite,
    BucketRead,
    BucketWrite,
}

impl DataAction {
    pub const ALL: [DataAction; 6] = [
        DataAction::TopicPublish,
        DataAction::TopicConsume,
        DataAction::KvRead,
        DataAction::KvWrite,
        DataAction::BucketRead,
        DataAction::BucketWrite,
    ];

    /// The action a schema name (`topic.consume`) stands for, if it is a data action.
    pub fn from_name(name: &str) -> Option<DataAction> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            DataAction::TopicPublish => "topic.publish",
            DataAction::TopicConsume => "topic.consume",
            DataAction::KvRead => "kv.read",
            DataAction::KvWrite => "kv.write",
            DataAction::BucketRead => "bucket.read",
            DataAction::BucketWrite => "bucket.write",
        }
    }
}

/// The node's own labels: the region its services run in and the organisation its
/// operators belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLabels {
    pub region: String,
    pub organisation: String,
}

/// Purposes, regions and organisations are names: 1-63 lowercase letters, digits and `-`,
/// starting with a letter.
pub fn check_label(text: &str) -> Result<(), String> {
    let valid = (1..=63).contains(&text.len())
        && text.starts_with(|c: char| c.is_ascii_lowercase())
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{text}` is not a label: use 1 to 63 lowercase letters, digits and `-`, starting with a letter"
        ))
    }
}

/// Decisions on data, with their audit entries (see the module docs).
pub struct DataGuard {
    policies: Arc<Policies>,
    audit: Arc<AuditLog>,
    node: NodeLabels,
    pseudonym_key: [u8; 32],
    generation: AtomicU64,
}

impl DataGuard {
    pub fn new(
        policies: Arc<Policies>,
        audit: Arc<AuditLog>,
        node: NodeLabels,
        pseudonym_key: [u8; 32],
    ) -> DataGuard {
        DataGuard {
            policies,
            audit,
            node,
            pseudonym_key,
            generation: AtomicU64::new(1),
        }
    }

    pub fn node(&self) -> &NodeLabels {
        &self.node
    }

    pub fn policies(&self) -> &Arc<Policies> {
        &self.policies
    }

    /// A keyed hash of `value` for the audit log (keys of personal data may name people).
    pub fn redact(&self, value: &str) -> String {
        self.audit.redact(value)
    }

    /// Moves whenever a cached decision may have become wrong.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The policies changed or a token was revoked: cached decisions must be made again.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Decide, without recording anything.
    pub fn decide(&self, actor: &Actor<'_>, action: DataAction, dataset: &Dataset) -> Decision {
        let decision = self
            .policies
            .decide_data(actor, action, dataset, &self.node);
        if !decision.errors.is_empty() {
            tracing::error!(actor = actor.name(), action = action.name(), resource = dataset.resource(), errors = ?decision.errors, "ALERT: a Cedar policy failed while deciding a data access; denied");
        }
        decision
    }

    /// Decide and record what belongs in the audit log: a denial always, an allowed access
    /// to personal data always. `Err` when the entry cannot be written (refuse the access).
    /// Blocks until the entry is durable: call it from a blocking thread.
    pub fn check(
        &self,
        actor: &Actor<'_>,
        action: DataAction,
        dataset: &Dataset,
        address: Option<String>,
        details: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Decision, AuditError> {
        let decision = self.decide(actor, action, dataset);
        if !decision.allowed || dataset.is_personal() {
            self.record(actor, action, dataset, &decision, address, details)?;
        }
        Ok(decision)
    }

    /// Record a decision already made (an access to personal data under a cached
    /// decision, or a denial). Blocks until durable.
    pub fn record(
        &self,
        actor: &Actor<'_>,
        action: DataAction,
        dataset: &Dataset,
        decision: &Decision,
        address: Option<String>,
        mut details: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), AuditError> {
        let labels = &dataset.labels;
        details.insert(
            "classification".into(),
            labels.classification.as_str().into(),
        );
        if let Actor::Service(service) = actor {
            details.insert("purposes".into(), service.purposes.clone().into());
            details.insert("service_region".into(), service.region.clone().into());
        }
        if dataset.is_personal() {
            details.insert(
                "allowed_purposes".into(),
                labels.allowed_purposes.clone().into(),
            );
            details.insert("data_region".into(), labels.region.clone().into());
        }
        self.audit
            .append(Event {
                kind: Kind::Data,
                actor: actor.name(),
                action: action.name().to_string(),
                resource: dataset.resource(),
                decision: if decision.allowed {
                    Recorded::Allow
                } else {
                    Recorded::Deny
                },
                reason: decision.reason(),
                address,
                details,
            })
            .map(drop)
    }

    /// The pseudonymiser for one consuming app: the same value always gives the same
    /// pseudonym for that app, and a different one for any other app.
    pub fn pseudonymiser(&self, app: &str) -> Pseudonymiser {
        let mut material = Vec::with_capacity(32 + app.len());
        material.extend_from_slice(&self.pseudonym_key);
        material.extend_from_slice(app.as_bytes());
        Pseudonymiser {
            key: blake3::derive_key("maru pseudonym v1", &material),
        }
    }
}

/// The node's pseudonym key (`DATA/pseudonym.key`, 32 random bytes, mode 0600), made at
/// first use.
pub fn pseudonym_key(env: &Env, data: &Path) -> Result<[u8; 32], String> {
    let path = data.join("pseudonym.key");
    match env.disk.read(&path) {
        Ok(bytes) => {
            <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
                format!(
                    "{} is {} bytes, not 32: it was damaged; restore it from a backup (pseudonyms made with another key do not match)",
                    path.display(),
                    bytes.len()
                )
            })
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let key = crate::random_bytes::<32>()?;
            disk::write_atomically(env.disk.as_ref(), &path, &key)
                .map_err(|e| format!("write {}: {e}", path.display()))?;
            Ok(key)
        }
        Err(error) => Err(format!("read {}: {error}", path.display())),
    }
}

/// Replaces fields of JSON objects with keyed hashes (see the module docs).
#[derive(Clone)]
pub struct Pseudonymiser {
    key: [u8; 32],
}

/// Why an event could not be pseudonymised: it is withheld rather than passed on whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PseudonymError {
    #[error("the payload is not a JSON object, so its personal fields cannot be found")]
    NotAnObject,
}

impl Pseudonymiser {
    /// `pn_` and 26 base32 characters (128 bits) of the keyed hash of `value`.
    pub fn pseudonym(&self, value: &[u8]) -> String {
        const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
        let hash = blake3::keyed_hash(&self.key, value);
        let bytes = &hash.as_bytes()[..16];
        let mut out = String::with_capacity(3 + 26);
        out.push_str("pn_");
        let (mut buffer, mut bits) = (0u32, 0u32);
        for byte in bytes {
            buffer = (buffer << 8) | u32::from(*byte);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
            }
        }
        if bits > 0 {
            out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
        }
        out
    }

    /// Replace each of `fields` (top-level names, or dotted paths into nested objects) of
    /// the JSON object `payload` by its pseudonym. Strings are hashed as their text, other
    /// values as their JSON; `null` and absent fields stay as they are.
    pub fn apply(&self, payload: &[u8], fields: &[String]) -> Result<Vec<u8>, PseudonymError> {
        let mut value: serde_json::Value =
            serde_json::from_slice(payload).map_err(|_| PseudonymError::NotAnObject)?;
        if !value.is_object() {
            return Err(PseudonymError::NotAnObject);
        }
        for field in fields {
            let mut at = &mut value;
            let mut path = field.split('.').peekable();
            while let Some(part) = path.next() {
                let Some(next) = at.as_object_mut().and_then(|o| o.get_mut(part)) else {
                    break;
                };
                if path.peek().is_some() {
                    at = next;
                    continue;
                }
                let pseudonym = match &*next {
                    serde_json::Value::Null => break,
                    serde_json::Value::String(text) => self.pseudonym(text.as_bytes()),
                    other => self.pseudonym(other.to_string().as_bytes()),
                };
                *next = serde_json::Value::String(pseudonym);
                break;
            }
        }
        Ok(serde_json::to_vec(&value).expect("a JSON value serialises"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::DEFAULT_POLICIES;

    fn labels(classification: Classification, region: &str, purposes: &[&str]) -> Labels {
        Labels {
            classification,
            organisation: "transport".into(),
            region: region.into(),
            allowed_purposes: purposes.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn topic(name: &str, labels: Labels) -> Dataset {
        Dataset {
            kind: DatasetKind::Topic,
            name: name.into(),
            labels,
        }
    }

    fn service(
        name: &str,
        organisation: &str,
        purposes: &[&str],
        region: &str,
    ) -> ServicePrincipal {
        ServicePrincipal {
            app: "traffic".into(),
            service: name.into(),
            organisation: organisation.into(),
            purposes: purposes.iter().map(|p| p.to_string()).collect(),
            region: region.into(),
        }
    }

    use crate::authz::who as caller;

    #[test]
    fn the_default_policies_decide_by_classification_purpose_and_region() {
        let policies = Policies::new(DEFAULT_POLICIES).expect("the defaults validate");
        let node = NodeLabels {
            region: "eu-central".into(),
            organisation: "transport".into(),
        };
        let loops = topic(
            "city.traffic",
            labels(Classification::Public, "eu-central", &[]),
        );
        let plans = topic(
            "city.plans",
            labels(Classification::Internal, "eu-central", &[]),
        );
        let movements = topic(
            "city.movements",
            labels(
                Classification::Personal,
                "eu-central",
                &["traffic-signal-control"],
            ),
        );
        let abroad = topic(
            "city.movements-north",
            labels(
                Classification::Personal,
                "eu-north",
                &["traffic-signal-control"],
            ),
        );
        let signals = service(
            "signals",
            "transport",
            &["traffic-signal-control"],
            "eu-central",
        );
        let analytics = service("analytics", "transport", &["statistics"], "eu-central");
        let outsider = service("tourism", "culture", &["statistics"], "eu-central");
        let viewer = caller("operator:bob", &["viewer"]);
        let metrics = caller("machine:prometheus", &["metrics"]);
        let ingest = caller("machine:sensors", &["ingest"]);
        let admin = caller("operator:ana", &["admin"]);
        use DataAction::*;
        for (actor, action, dataset, allowed) in [
            (Actor::Service(&signals), TopicConsume, &movements, true),
            (Actor::Service(&analytics), TopicConsume, &movements, false),
            (Actor::Service(&signals), TopicConsume, &abroad, false),
            (Actor::Service(&analytics), TopicConsume, &loops, true),
            (Actor::Service(&outsider), TopicConsume, &loops, true),
            (Actor::Service(&outsider), TopicPublish, &loops, false),
            (Actor::Service(&analytics), TopicPublish, &loops, true),
            (Actor::Service(&analytics), TopicConsume, &plans, true),
            (Actor::Service(&outsider), TopicConsume, &plans, false),
            (Actor::Caller(&viewer), TopicConsume, &plans, true),
            (Actor::Caller(&viewer), TopicConsume, &movements, false),
            (Actor::Caller(&metrics), TopicConsume, &loops, true),
            (Actor::Caller(&metrics), TopicConsume, &plans, false),
            (Actor::Caller(&ingest), TopicPublish, &movements, true),
            (Actor::Caller(&ingest), TopicPublish, &abroad, false),
            (Actor::Caller(&ingest), TopicConsume, &plans, false),
            (Actor::Caller(&viewer), TopicPublish, &loops, false),
            (Actor::Caller(&admin), TopicConsume, &movements, true),
        ] {
            let decision = policies.decide_data(&actor, action, dataset, &node);
            assert_eq!(
                decision.allowed,
                allowed,
                "{} {} {}: {decision:?}",
                actor.name(),
                action.name(),
                dataset.resource()
            );
            assert!(decision.errors.is_empty(), "{decision:?}");
        }
        let decision =
            policies.decide_data(&Actor::Service(&signals), TopicConsume, &movements, &node);
        assert_eq!(decision.policies, ["personal-data-by-purpose"]);
    }

    #[test]
    fn a_control_action_is_not_a_data_action() {
        let policies = Policies::new(DEFAULT_POLICIES).expect("valid");
        let admin = caller("operator:ana", &["admin"]);
        let node = NodeLabels {
            region: "r".into(),
            organisation: "o".into(),
        };
        // Data decisions on control resources, and control decisions on data, are refused.
        let decision = policies.decide(&admin, "topic.consume", "node");
        assert!(!decision.allowed, "{decision:?}");
        let movements = topic("m", labels(Classification::Public, "r", &[]));
        let _ = policies.decide_data(
            &Actor::Caller(&admin),
            DataAction::TopicConsume,
            &movements,
            &node,
        );
    }

    #[test]
    fn pseudonyms_link_within_an_app_and_not_across() {
        let a = Pseudonymiser { key: [1; 32] };
        let b = Pseudonymiser { key: [2; 32] };
        let fields = vec![
            "plate".to_string(),
            "where.cell".to_string(),
            "gone".to_string(),
        ];
        let event =
            br#"{"plate":"B-XY 123","speed":42,"where":{"cell":17,"road":"A1"},"gone":null}"#;
        let once = a.apply(event, &fields).expect("an object");
        let twice = a.apply(event, &fields).expect("an object");
        let other = b.apply(event, &fields).expect("an object");
        assert_eq!(once, twice, "the same value gives the same pseudonym");
        assert_ne!(once, other, "another app's pseudonyms differ");
        let value: serde_json::Value = serde_json::from_slice(&once).expect("JSON");
        let plate = value["plate"].as_str().expect("a string");
        assert!(plate.starts_with("pn_") && plate.len() == 29, "{plate}");
        assert!(!String::from_utf8_lossy(&once).contains("B-XY"));
        assert_eq!(value["speed"], 42);
        assert_eq!(value["where"]["road"], "A1");
        assert!(
            value["where"]["cell"]
                .as_str()
                .is_some_and(|c| c.starts_with("pn_"))
        );
        assert!(value["gone"].is_null());
        assert_eq!(a.apply(b"[1,2]", &fields), Err(PseudonymError::NotAnObject));
        assert_eq!(
            a.apply(b"not json", &fields),
            Err(PseudonymError::NotAnObject)
        );
    }
}
