//! Wire types of the control API, shared by the server, the CLI and (later) the console.
//!
//! Invariant: this is the only crate that defines serde shapes of the control API. Changing
//! a field here changes the API; docs/api.md documents every type.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /v1/apps`: deploy a manifest whose components were uploaded first with
/// `PUT /v1/blobs/{hash}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// File name of the manifest, used in error messages.
    pub manifest_path: String,
    /// The manifest's TOML text.
    pub manifest: String,
    /// Absolute directory of the manifest on the deploying machine; process services'
    /// relative `workdir` and program paths are resolved against it.
    #[serde(default)]
    pub manifest_dir: Option<String>,
    /// Component path as written in the manifest → blake3 hash of its uploaded bytes.
    pub components: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployResponse {
    pub app: String,
    /// The revision now serving; unchanged if `changes` is empty.
    pub revision: u64,
    /// The revision that served before, if any.
    pub previous: Option<u64>,
    pub changes: Vec<ServiceChange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceChange {
    pub service: String,
    /// `added`, `removed` or `changed`.
    pub kind: String,
    /// What changed, e.g. `component`, `routes`, `memory`.
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppInfo {
    pub name: String,
    pub revision: u64,
    pub revisions: Vec<RevisionInfo>,
    pub services: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionInfo {
    pub number: u64,
    pub created_unix_ms: u64,
    pub manifest_path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackResponse {
    pub app: String,
    pub from: u64,
    pub to: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveResponse {
    pub app: String,
    pub services_stopped: Vec<String>,
}

/// One row of `maru ps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub app: String,
    pub service: String,
    pub revision: u64,
    /// `component` or `process`.
    pub kind: String,
    /// `running`, or `failed` (crash loop; see `failure`).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    pub routes: Vec<String>,
    pub instances_ready: u64,
    pub instances_starting: u64,
    pub instances_min: u32,
    pub instances_max: u32,
    /// In a cluster, where the service runs: `here 0..2` (this node's share of its
    /// instances), `on n2, n3` (forwarded there), or `unplaced: why`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    pub in_flight: u64,
    pub queued: u64,
    pub requests_total: u64,
    pub requests_per_second: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub cold_starts: u64,
    pub instance_starts: u64,
    pub instance_seconds: f64,
    /// Start-to-ready time of the most recently started instance.
    pub startup_last_ms: Option<f64>,
    /// The scaling policy: `reactive`, `hpa`, `kpa`, `aws-predictive` or `predictive`.
    pub policy: String,
    /// What a forecasting policy expects the arrival rate to be one start-up lead ahead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast_requests_per_second: Option<f64>,
    /// Which forecaster made it (predictive: the champion by rolling backtest):
    /// `short-term`, `seasonal`, `mstl` or `ets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecaster: Option<String>,
    /// The service's latency objective (manifest `scaling.slo`), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_ms: Option<f64>,
    /// Percent of requests since the service started answered with a 2xx or 3xx status
    /// within the SLO; none before the first request or without an SLO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_met_percent: Option<f64>,
}

/// `GET /v1/logs/{app}/{service}?after=N&limit=M`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsResponse {
    pub lines: Vec<LogLine>,
    /// Pass as `after` to read on from here.
    pub next: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub sequence: u64,
    pub unix_ms: u64,
    /// `stdout`, `stderr`, or `maru` for platform events.
    pub stream: String,
    pub text: String,
}

/// Every error from the control API has this body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub status: u16,
    /// Stable, machine-readable: `unauthorized`, `bad_manifest`, `conflict`, `not_found`, ...
    pub code: String,
    pub message: String,
    /// For `bad_manifest`: where the problem is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<ManifestLocation>,
    /// How to fix it, when there is something to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestLocation {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub field: String,
}

/// `GET /v1/anomalies`: one entry per anomaly found, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyInfo {
    pub app: String,
    pub service: String,
    /// `traffic` (requests per second), `latency` (mean ms) or `errors` (5xx fraction).
    pub signal: String,
    pub unix_ms: u64,
    pub value: f64,
    /// The forecast (traffic under a forecasting policy) or the signal's recent baseline.
    pub expected: f64,
    /// `above` or `below`.
    pub direction: String,
}

/// `GET /v1/history/{app}/{service}?resolution=seconds|minutes`: the last hour by second
/// (default) or 14 days by minute (means over each minute); kept across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryResponse {
    pub resolution: String,
    pub samples: Vec<HistorySample>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HistorySample {
    pub unix_s: u64,
    pub arrivals_per_second: f64,
    pub completions_per_second: f64,
    pub in_flight: f64,
    pub queued: f64,
    pub latency_ms: f64,
    pub instances: f64,
    pub cold_starts: f64,
    /// Start-up time of the instance that last became ready, ms; 0 until one has.
    #[serde(default)]
    pub startup_ms: f64,
}

/// `GET /v1/events`: one entry per open topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicInfo {
    pub name: String,
    /// The oldest offset still stored.
    pub first_offset: u64,
    /// The offset the next event will get.
    pub next_offset: u64,
    pub bytes: u64,
    pub segments: usize,
    pub appended_total: u64,
    /// Group commits since maru started: one write (and one fsync) for many events.
    pub commits_total: u64,
    /// fdatasyncs since maru started (one per group commit under `durability = "fsync"`,
    /// one per window under `"batch"`).
    #[serde(default)]
    pub syncs_total: u64,
    /// Events appended per second over the last 10 seconds.
    pub per_second: f64,
    pub groups: Vec<GroupInfo>,
    /// Why the topic refused its last appends, if it has not repaired itself since (a full
    /// disk or an I/O error; it tries again with every append).
    pub broken: Option<String>,
    /// Offset ranges `[start, end)` that cannot be read: damage recovery found, or offsets
    /// skipped so that none is ever handed out twice. Merged and ascending.
    #[serde(default)]
    pub lost: Vec<[u64; 2]>,
}

/// A consumer group of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub name: String,
    /// The first offset the group has not finished.
    pub committed: u64,
    /// Events stored but not yet finished by the group.
    pub lag: u64,
}

/// `GET /v1/events/{topic}?from=N&limit=M`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsResponse {
    pub topic: String,
    pub events: Vec<EventInfo>,
    /// Where the next read should start.
    pub next: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventInfo {
    pub offset: u64,
    pub unix_ms: u64,
    pub key: String,
    pub content_type: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    /// The payload, if it is UTF-8 text.
    pub data: Option<String>,
    /// The payload in base64, if it is not.
    pub data_base64: Option<String>,
}

/// `POST /v1/store/keys`: a new S3 access key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// The buckets the key may use; `*` for every bucket.
    pub buckets: Vec<String>,
    #[serde(default)]
    pub description: String,
}

/// An access key; `secret` only in the answer to its creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKeyInfo {
    pub access_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub buckets: Vec<String>,
    pub created_unix_ms: u64,
    pub description: String,
}

/// `GET /v1/store/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// The S3 endpoint, e.g. `http://127.0.0.1:9000`.
    pub endpoint: String,
    /// The erasure profile new objects get, e.g. `RS(4,2)`.
    pub profile: String,
    /// Volumes that may be lost without losing data.
    pub tolerates_volume_losses: usize,
    pub volumes: Vec<VolumeInfo>,
    pub buckets: u64,
    pub objects: u64,
    pub bytes: u64,
    pub uploads_in_progress: u64,
    pub scrub: ScrubInfo,
    /// Physical bytes written and user bytes read since the node started.
    pub bytes_written: u64,
    pub bytes_read: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub path: String,
    pub id: Option<String>,
    /// `online`, or what is wrong.
    pub state: String,
    pub shard_files: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScrubInfo {
    pub passes: u64,
    /// Whether a pass is under way, and how far it got.
    pub running: bool,
    pub objects_checked: u64,
    pub objects_total: u64,
    pub bytes_verified: u64,
    /// Recent verification rate of the background scrub, bytes per second.
    pub bytes_per_second: f64,
    pub last_pass_finished_unix_ms: Option<u64>,
    pub blocks_bad: u64,
    pub blocks_healed: u64,
    pub parts_healed: u64,
    /// Objects with shards not yet rebuilt (`bucket/key`, at most 1000).
    pub degraded: Vec<String>,
    /// Objects with a stripe that lost more shards than its profile survives.
    pub lost: Vec<String>,
}

/// `POST /v1/store/rotate-key`: what a master key rotation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotation {
    /// The master key generation now wrapping every data key.
    pub generation: u32,
    pub keys_rewrapped: u64,
    pub generations_retired: Vec<u32>,
}

/// One audit log entry (`GET /v1/audit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub unix_ms: u64,
    /// `action`, `data` or `log`.
    pub kind: String,
    pub actor: String,
    pub action: String,
    pub resource: String,
    /// `allow`, `deny` or `note`.
    pub decision: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// `GET /v1/audit`: the newest entries that match, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntries {
    pub entries: Vec<AuditEntry>,
    /// The newest durable entry's number.
    pub newest_seq: u64,
}

/// `GET /v1/audit/checkpoint`: the newest entry signed by the node's ed25519 key. Keep it
/// where the node cannot rewrite it; `maru audit verify --checkpoint FILE` checks the log
/// against it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCheckpoint {
    pub seq: u64,
    /// The entry's chain value, hex.
    pub hash: String,
    pub time_ms: u64,
    /// base64.
    pub public_key: String,
    /// base64.
    pub signature: String,
}

/// `POST /v1/admin/init` (with the node's bootstrap token, once) and `POST /v1/operators`
/// (an admin adding an operator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateOperatorRequest {
    pub name: String,
    pub password: String,
    /// Ignored by `admin/init` (the first operator is an admin).
    #[serde(default)]
    pub roles: Vec<String>,
}

/// The answer to creating an operator: the TOTP secret, shown only here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    pub name: String,
    pub roles: Vec<String>,
    /// `otpauth://totp/…` for an authenticator app (or its QR code).
    pub otpauth_url: String,
    /// The same secret, base32, for typing in.
    pub secret: String,
}

/// `POST /v1/login` (no bearer token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginRequest {
    pub name: String,
    pub password: String,
    /// The current TOTP code.
    pub code: String,
    /// Shorter than the default 12 h, if wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// A token and what it grants; `token` (the secret) only in the answer that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub subject: String,
    pub roles: Vec<String>,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    pub revoked: bool,
    #[serde(default)]
    pub description: String,
}

/// `POST /v1/tokens`: a machine token (for CI deploys, ingest, Prometheus scrapes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateTokenRequest {
    pub name: String,
    pub roles: Vec<String>,
    pub ttl_seconds: u64,
    #[serde(default)]
    pub description: String,
}

/// `GET /v1/whoami`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    pub subject: String,
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
}

/// `POST /v1/policy/test`: how the policies (the node's, or `policies` if given) decide
/// `subject` (`operator:NAME`, `machine:NAME`, `bootstrap`) with `roles` doing `action` on
/// `resource`. Nothing changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTestRequest {
    pub subject: String,
    pub roles: Vec<String>,
    pub action: String,
    #[serde(default = "node_resource")]
    pub resource: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<String>,
}

fn node_resource() -> String {
    "node".into()
}

/// The answer to `POST /v1/policy/test`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDecision {
    pub allowed: bool,
    /// The policies that decided (their `@id`).
    pub policies: Vec<String>,
    /// Evaluation errors (any makes the decision a denial).
    pub errors: Vec<String>,
    pub reason: String,
}

/// One row of `GET /v1/nodes` (`maru nodes`): a node of the cluster as it last announced
/// itself, or the one node without a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's name (`[node] name`, default the host name), unique in the cluster.
    pub name: String,
    pub region: String,
    /// Failure domain within the region (`[node] zone`), e.g. a rack or a building.
    pub zone: String,
    /// An edge node: near its sensors, may lose its link to the cluster.
    pub edge: bool,
    /// Memory the node offers to instances, bytes.
    pub memory_bytes: u64,
    pub cpus: u32,
    /// The gateway's address, as the node serves it.
    pub gateway: String,
    pub control: String,
    /// Services running on the node and their ready or starting instances.
    pub services: u32,
    pub instances: u32,
    /// When the node started and when it last announced itself (unix ms).
    pub started_unix_ms: u64,
    pub seen_unix_ms: u64,
    /// `up`: announced within the heartbeat timeout. A node that stops announcing is
    /// dropped from the list once its record expires.
    pub health: String,
    /// The Maru version it runs.
    pub version: String,
    /// In a cluster: this node holds the scheduler lease (one node at a time; another takes
    /// it within seconds of the holder's loss). False for a node alone.
    #[serde(default)]
    pub scheduler: bool,
    /// Being drained (`maru drain`): the scheduler places nothing on it and moves what it
    /// runs to other nodes.
    #[serde(default)]
    pub draining: bool,
    /// The PEM of the CA that signed the gateway's TLS certificate, for other nodes'
    /// gateways forwarding to it (none if the gateway speaks plain HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Ready or starting instances of each service the node runs (`app/service`), for the
    /// scheduler: a share grows only once the shares that shrink have been given up.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub running: BTreeMap<String, u32>,
}
