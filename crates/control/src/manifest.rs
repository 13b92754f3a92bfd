//! App manifests (`maru.toml`): parsing and validation with errors that name the file, line,
//! column and field, and say how to fix the problem.
//!
//! Parsing is pure: text in, [`AppManifest`] or [`ManifestError`] out. Checks that need the
//! world (does the component file exist, does a route collide with another app's) are made
//! by the callers, which use [`AppManifest::error_at`] to point at the offending field.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use policy::data::Classification;
use runtime::{LivenessProbe, Origin, Probe, Signal};
use serde::Deserialize;
use toml::Spanned;

/// Limits on manifest values. Out-of-range values are rejected with the range in the hint.
pub const INSTANCES_MAX: u32 = 1000;
pub const QUEUE_MAX: u32 = 100_000;
pub const MEMORY_BYTES_MIN: u64 = 1 << 20;
pub const MEMORY_BYTES_MAX: u64 = 4 << 30;
pub const BODY_BYTES_MAX: u64 = 64 << 20;
pub const PROCESS_MEMORY_BYTES_MAX: u64 = 256 << 30;
const SIGNALS: [(&str, Signal); 6] = [
    ("SIGTERM", Signal::SIGTERM),
    ("SIGINT", Signal::SIGINT),
    ("SIGQUIT", Signal::SIGQUIT),
    ("SIGHUP", Signal::SIGHUP),
    ("SIGUSR1", Signal::SIGUSR1),
    ("SIGUSR2", Signal::SIGUSR2),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppManifest {
    pub name: String,
    /// The organisation that owns the app's data; `None`: the node's.
    pub organisation: Option<String>,
    pub services: BTreeMap<String, ServiceManifest>,
    /// Event topics this app declares, by name.
    pub topics: BTreeMap<String, TopicManifest>,
    /// Key-value buckets this app's components may open (`wasi:keyvalue`), by name.
    pub kv: BTreeMap<String, KvManifest>,
    /// Object buckets this app labels (`[bucket."NAME"]`), by name.
    pub buckets: BTreeMap<String, DataLabels>,
    file: String,
    text: String,
    spans: BTreeMap<String, Range<usize>>,
}

/// A key-value bucket an app declares, with its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvManifest {
    pub key_bytes_max: u64,
    pub value_bytes_max: u64,
    pub total_bytes_max: u64,
    pub labels: DataLabels,
}

/// How a dataset (topic, key-value bucket, object bucket) is labelled for access decisions
/// (docs/policy.md).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DataLabels {
    pub classification: Classification,
    /// `None`: the node's region.
    pub region: Option<String>,
    /// For personal data, never empty; empty otherwise.
    pub allowed_purposes: Vec<String>,
}

impl Default for DataLabels {
    fn default() -> Self {
        DataLabels {
            classification: Classification::Internal,
            region: None,
            allowed_purposes: Vec::new(),
        }
    }
}

/// Purposes a service may declare, and fields a trigger may pseudonymise.
pub const PURPOSES_MAX: usize = 16;
pub const PSEUDONYMISED_FIELDS_MAX: usize = 32;

/// Buckets one app may declare.
pub const KV_BUCKETS_MAX: usize = 32;

/// One service, with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceManifest {
    /// What runs: a component or a program.
    pub workload: Workload,
    pub routes: Vec<String>,
    pub hosts: Vec<String>,
    pub instances_min: u32,
    pub instances_max: u32,
    pub concurrency: u32,
    pub idle_timeout: Duration,
    /// Live traffic the anomaly detectors learn from before they judge anything.
    pub anomaly_warm_up: Duration,
    /// Components: always set (default 64 MiB). Processes: only if the manifest sets it.
    pub memory_bytes: Option<u64>,
    pub timeout: Duration,
    pub startup_timeout: Duration,
    pub queue: u32,
    pub body_limit_bytes: u64,
    pub outbound: Vec<Origin>,
    pub env: BTreeMap<String, String>,
    pub scaling: Scaling,
    /// Topics whose events are delivered to this service.
    pub triggers: Vec<TriggerManifest>,
    /// What the service uses data for (`purposes = ["traffic-signal-control"]`).
    pub purposes: Vec<String>,
    /// `isolation = "request"`: every request gets a fresh component instance.
    pub fresh_instance_per_request: bool,
    /// Where the service's instances may run in a cluster (a node alone runs them all).
    pub placement: Placement,
}

/// Where a service's instances may run in a cluster (`placement = { ... }`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// Only nodes of this region (`[node] region`); `None`: any region.
    pub region: Option<String>,
    pub spread: Spread,
    pub edge: EdgeRule,
}

/// How a service's instances are spread over the nodes allowed to run them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Spread {
    /// Over as many zones (failure domains) as possible, then over nodes.
    #[default]
    Zone,
    /// Over nodes, whatever their zone.
    Node,
}

/// Whether a service may run on edge nodes (`[node] edge = true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EdgeRule {
    /// On any node.
    #[default]
    Allowed,
    /// Only on edge nodes (near sensors and signals).
    Only,
    /// Never on edge nodes (they may lose their link to the cluster).
    Never,
}

/// A durable event topic (`[topic."NAME"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicManifest {
    /// `None` is `durability = "fsync"`; `Some(window)` is `"batch"` with its sync window.
    pub batch_window: Option<Duration>,
    pub retention: Duration,
    pub retention_bytes: u64,
    pub event_bytes_max: u64,
    pub segment_bytes: u64,
    pub labels: DataLabels,
}

/// Deliver a topic's events to the service (`[[service.NAME.trigger]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggerManifest {
    pub topic: String,
    /// Events per request: 1 sends CloudEvents binary mode, more sends a JSON batch.
    pub batch: u32,
    /// Requests in flight at once; events with the same key stay in order.
    pub parallel: u32,
    /// The request path.
    pub path: String,
    /// Attempts per request before the events go to `dead_letter`.
    pub max_attempts: u32,
    pub dead_letter: Option<String>,
    /// A successful response with a body is published to this topic.
    pub reply_to: Option<String>,
    /// JSON fields of each event replaced by pseudonyms before delivery.
    pub pseudonymise: Vec<String>,
}

/// Which policy scales the service, and its one knob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scaling {
    pub policy: ScalingPolicy,
    /// Target utilisation in percent, for `hpa`, `kpa` and `aws-predictive`.
    pub target_percent: Option<u32>,
    /// For `predictive`.
    pub caution: CautionLevel,
    /// The latency objective, for every policy: requests answered successfully within it
    /// are counted as met (`maru ps`, /metrics).
    pub slo: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalingPolicy {
    Reactive,
    Hpa,
    Kpa,
    AwsPredictive,
    Predictive,
}

impl ScalingPolicy {
    pub const ALL: [(&'static str, ScalingPolicy); 5] = [
        ("reactive", ScalingPolicy::Reactive),
        ("hpa", ScalingPolicy::Hpa),
        ("kpa", ScalingPolicy::Kpa),
        ("aws-predictive", ScalingPolicy::AwsPredictive),
        ("predictive", ScalingPolicy::Predictive),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, p)| *p == self)
            .map(|(n, _)| *n)
            .unwrap_or("reactive")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CautionLevel {
    Conservative,
    Normal,
    Aggressive,
    /// The knob `maru sim --tune` searches (0.05 cautious to 1.0 bold), in thousandths:
    /// target utilisation, with the forecast-error quantile moving with it.
    Knob(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// Path of a `wasi:http/proxy` component, relative to the manifest.
    Component {
        path: String,
    },
    Process(Box<ProcessManifest>),
}

/// An existing program run as supervised process instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessManifest {
    /// Program and arguments; `{port}` stands for the instance's port (also in `PORT`).
    pub command: Vec<String>,
    /// Working directory, relative to the manifest.
    pub workdir: String,
    pub ready: Probe,
    pub ready_timeout: Duration,
    pub liveness: Option<LivenessProbe>,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    /// Total CPU time one instance may use before the kernel kills it.
    pub cpu_time: Option<Duration>,
    /// Directories the program may write besides its working directory and `TMPDIR`,
    /// relative to the manifest.
    pub writable: Vec<String>,
    /// The user the program runs as (maru must run as root); `None`: maru's user.
    pub user: Option<String>,
    /// An object store bucket the program may use: its S3 endpoint and an access key
    /// limited to the bucket come in its environment.
    pub store_bucket: Option<String>,
}

impl ServiceManifest {
    /// The component path, for component services.
    pub fn component(&self) -> Option<&str> {
        match &self.workload {
            Workload::Component { path } => Some(path),
            Workload::Process(_) => None,
        }
    }
}

impl ServiceManifest {
    /// Names of the fields whose values differ, for "what changed" reports.
    pub fn changed_fields(&self, other: &ServiceManifest) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |name, differs: bool| {
            if differs {
                changed.push(name);
            }
        };
        match (&self.workload, &other.workload) {
            (Workload::Process(a), Workload::Process(b)) => {
                check("command", a.command != b.command);
                check("workdir", a.workdir != b.workdir);
                check("writable", a.writable != b.writable);
                check("user", a.user != b.user);
                check("store_bucket", a.store_bucket != b.store_bucket);
                check(
                    "ready",
                    (&a.ready, a.ready_timeout) != (&b.ready, b.ready_timeout),
                );
                check("liveness", a.liveness != b.liveness);
                check("stop_signal", a.stop_signal != b.stop_signal);
                check("stop_timeout", a.stop_timeout != b.stop_timeout);
                check("cpu_time", a.cpu_time != b.cpu_time);
            }
            (Workload::Component { .. }, Workload::Component { .. }) => {}
            _ => check("kind", true),
        }
        check("routes", self.routes != other.routes);
        check("trigger", self.triggers != other.triggers);
        check("hosts", self.hosts != other.hosts);
        check(
            "instances",
            (self.instances_min, self.instances_max) != (other.instances_min, other.instances_max),
        );
        check("concurrency", self.concurrency != other.concurrency);
        check("idle_timeout", self.idle_timeout != other.idle_timeout);
        check(
            "anomaly_warm_up",
            self.anomaly_warm_up != other.anomaly_warm_up,
        );
        check("memory", self.memory_bytes != other.memory_bytes);
        check("timeout", self.timeout != other.timeout);
        check(
            "startup_timeout",
            self.startup_timeout != other.startup_timeout,
        );
        check("queue", self.queue != other.queue);
        check(
            "body_limit",
            self.body_limit_bytes != other.body_limit_bytes,
        );
        check("outbound", self.outbound != other.outbound);
        check("env", self.env != other.env);
        check("scaling", self.scaling != other.scaling);
        check("purposes", self.purposes != other.purposes);
        check(
            "isolation",
            self.fresh_instance_per_request != other.fresh_instance_per_request,
        );
        check("placement", self.placement != other.placement);
        changed
    }
}

/// A manifest problem, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the field, e.g. `service.hello.memory`.
    pub field: String,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: `{}`: {}",
            self.file, self.line, self.column, self.field, self.message
        )?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    app: Spanned<RawApp>,
    #[serde(default)]
    service: BTreeMap<String, Spanned<RawService>>,
    #[serde(default)]
    topic: BTreeMap<String, Spanned<RawTopic>>,
    #[serde(default)]
    kv: BTreeMap<String, Spanned<RawKv>>,
    #[serde(default)]
    bucket: BTreeMap<String, Spanned<RawLabels>>,
}

/// The labels of a dataset, as any dataset's table may carry them.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLabels {
    classification: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    allowed_purposes: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKv {
    key_bytes_max: Option<Spanned<String>>,
    value_bytes_max: Option<Spanned<String>>,
    total_bytes_max: Option<Spanned<String>>,
    classification: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    allowed_purposes: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopic {
    durability: Option<Spanned<String>>,
    sync_window: Option<Spanned<String>>,
    retention: Option<Spanned<String>>,
    retention_size: Option<Spanned<String>>,
    event_limit: Option<Spanned<String>>,
    segment_size: Option<Spanned<String>>,
    classification: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    allowed_purposes: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    topic: Spanned<String>,
    batch: Option<Spanned<i64>>,
    parallel: Option<Spanned<i64>>,
    path: Option<Spanned<String>>,
    max_attempts: Option<Spanned<i64>>,
    dead_letter: Option<Spanned<String>>,
    reply_to: Option<Spanned<String>>,
    pseudonymise: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: Spanned<String>,
    organisation: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    component: Option<Spanned<String>>,
    routes: Option<Vec<Spanned<String>>>,
    hosts: Option<Vec<Spanned<String>>>,
    instances: Option<Spanned<RawInstances>>,
    concurrency: Option<Spanned<i64>>,
    idle_timeout: Option<Spanned<String>>,
    anomaly_warm_up: Option<Spanned<String>>,
    memory: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    startup_timeout: Option<Spanned<String>>,
    queue: Option<Spanned<i64>>,
    body_limit: Option<Spanned<String>>,
    outbound: Option<Vec<Spanned<String>>>,
    env: Option<BTreeMap<String, Spanned<String>>>,
    command: Option<Spanned<Vec<String>>>,
    workdir: Option<Spanned<String>>,
    writable: Option<Spanned<Vec<String>>>,
    user: Option<Spanned<String>>,
    store_bucket: Option<Spanned<String>>,
    ready: Option<Spanned<RawProbe>>,
    liveness: Option<Spanned<RawProbe>>,
    stop_signal: Option<Spanned<String>>,
    stop_timeout: Option<Spanned<String>>,
    cpu_time: Option<Spanned<String>>,
    scaling: Option<Spanned<RawScaling>>,
    trigger: Option<Vec<Spanned<RawTrigger>>>,
    purposes: Option<Spanned<Vec<String>>>,
    isolation: Option<Spanned<String>>,
    placement: Option<Spanned<RawPlacement>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    region: Option<Spanned<String>>,
    spread: Option<Spanned<String>>,
    edge: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScaling {
    policy: Option<Spanned<String>>,
    target: Option<Spanned<f64>>,
    caution: Option<Spanned<RawCaution>>,
    slo: Option<Spanned<String>>,
}

/// `caution = "normal"` or `caution = 0.62` (a tuned knob).
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "`caution` is a level (\"conservative\", \"normal\", \"aggressive\") or a tuned knob from 0.05 to 1.0"
)]
enum RawCaution {
    Level(String),
    Knob(f64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    http: Option<Spanned<String>>,
    tcp: Option<bool>,
    timeout: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    failures: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstances {
    min: Option<Spanned<i64>>,
    max: Option<Spanned<i64>>,
}

/// Collects the spans of fields as they are validated, so later checks can point at them.
struct Parser<'a> {
    file: &'a str,
    text: &'a str,
    spans: BTreeMap<String, Range<usize>>,
}

impl Parser<'_> {
    fn error(
        &self,
        field: &str,
        span: Range<usize>,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> ManifestError {
        let (line, column) = line_column(self.text, span.start);
        ManifestError {
            file: self.file.to_string(),
            line,
            column,
            field: field.to_string(),
            message: message.into(),
            hint,
        }
    }

    fn note<T>(&mut self, field: &str, value: &Spanned<T>) {
        self.spans.insert(field.to_string(), value.span());
    }

    fn duration(
        &mut self,
        field: &str,
        value: Option<&Spanned<String>>,
        default: Duration,
        range: (Duration, Duration),
    ) -> Result<Duration, ManifestError> {
        let Some(value) = value else {
            return Ok(default);
        };
        self.note(field, value);
        let parsed = parse_duration(value.get_ref()).map_err(|message| {
            self.error(
                field,
                value.span(),
                message,
                Some("write a number with a unit: \"250ms\", \"30s\", \"5m\", \"1h\"".into()),
            )
        })?;
        if parsed < range.0 || parsed > range.1 {
            return Err(self.error(
                field,
                value.span(),
                format!("{} is out of range", value.get_ref()),
                Some(format!("use a value from {:?} to {:?}", range.0, range.1)),
            ));
        }
        Ok(parsed)
    }

    fn size(
        &mut self,
        field: &str,
        value: Option<&Spanned<String>>,
        default: u64,
        range: (u64, u64),
    ) -> Result<u64, ManifestError> {
        let Some(value) = value else {
            return Ok(default);
        };
        self.note(field, value);
        let parsed = parse_size(value.get_ref()).map_err(|message| {
            self.error(
                field,
                value.span(),
                message,
                Some("write a number with a unit: \"512KiB\", \"64MiB\", \"1GiB\"".into()),
            )
        })?;
        if parsed < range.0 || parsed > range.1 {
            return Err(self.error(
                field,
                value.span(),
                format!("{} is out of range", value.get_ref()),
                Some(format!(
                    "use a size from {} to {}",
                    format_size(range.0),
                    format_size(range.1)
                )),
            ));
        }
        Ok(parsed)
    }

    fn count(
        &mut self,
        field: &str,
        value: Option<&Spanned<i64>>,
        default: u32,
        range: (u32, u32),
    ) -> Result<u32, ManifestError> {
        let Some(value) = value else {
            return Ok(default);
        };
        self.note(field, value);
        let raw = *value.get_ref();
        u32::try_from(raw)
            .ok()
            .filter(|n| (range.0..=range.1).contains(n))
            .ok_or_else(|| {
                self.error(
                    field,
                    value.span(),
                    format!("{raw} is out of range"),
                    Some(format!(
                        "use a whole number from {} to {}",
                        range.0, range.1
                    )),
                )
            })
    }
}

impl Parser<'_> {
    /// A list of labels (purposes): each checked, no repeats, at most `max`.
    fn label_list(
        &mut self,
        field: &str,
        value: Option<&Spanned<Vec<String>>>,
        max: usize,
    ) -> Result<Vec<String>, ManifestError> {
        let Some(value) = value else {
            return Ok(Vec::new());
        };
        self.note(field, value);
        let list = value.get_ref();
        if list.len() > max {
            return Err(self.error(
                field,
                value.span(),
                format!("{} entries; at most {max}", list.len()),
                None,
            ));
        }
        let mut seen = Vec::new();
        for item in list {
            policy::data::check_label(item).map_err(|why| {
                self.error(
                    field,
                    value.span(),
                    why,
                    Some("purposes are names such as \"traffic-signal-control\"".into()),
                )
            })?;
            if seen.contains(item) {
                return Err(self.error(
                    field,
                    value.span(),
                    format!("`{item}` is listed twice"),
                    None,
                ));
            }
            seen.push(item.clone());
        }
        Ok(seen)
    }

    /// A dataset's `classification`, `region` and `allowed_purposes` at `prefix`.
    fn labels(
        &mut self,
        prefix: &str,
        table: Range<usize>,
        classification: Option<&Spanned<String>>,
        region: Option<&Spanned<String>>,
        allowed_purposes: Option<&Spanned<Vec<String>>>,
    ) -> Result<DataLabels, ManifestError> {
        let at = |field: &str| format!("{prefix}.{field}");
        let classification = match classification {
            None => Classification::Internal,
            Some(value) => {
                self.note(&at("classification"), value);
                Classification::parse(value.get_ref()).ok_or_else(|| {
                    self.error(
                        &at("classification"),
                        value.span(),
                        format!("`{}` is not a classification", value.get_ref()),
                        Some("use \"public\", \"internal\" (the default) or \"personal\"".into()),
                    )
                })?
            }
        };
        let region = match region {
            None => None,
            Some(value) => {
                self.note(&at("region"), value);
                policy::data::check_label(value.get_ref()).map_err(|why| {
                    self.error(&at("region"), value.span(), why, Some("a region is a name such as \"eu-central\"; the node's is set in its config".into()))
                })?;
                Some(value.get_ref().clone())
            }
        };
        let allowed_purposes =
            self.label_list(&at("allowed_purposes"), allowed_purposes, PURPOSES_MAX)?;
        match (classification, allowed_purposes.is_empty()) {
            (Classification::Personal, true) => {
                return Err(self.error(
                    &at("allowed_purposes"),
                    table,
                    "personal data needs the purposes it may be used for",
                    Some("add allowed_purposes = [\"...\"]: only services declaring one of them may use it".into()),
                ));
            }
            (Classification::Public | Classification::Internal, false) => {
                return Err(self.error(
                    &at("allowed_purposes"),
                    self.spans[&at("allowed_purposes")].clone(),
                    "`allowed_purposes` applies to personal data",
                    Some("set classification = \"personal\", or remove allowed_purposes".into()),
                ));
            }
            _ => {}
        }
        Ok(DataLabels {
            classification,
            region,
            allowed_purposes,
        })
    }
}

/// Parse and validate a manifest. `file` is only used in error messages.
pub fn parse(file: &str, text: &str) -> Result<AppManifest, ManifestError> {
    let raw: RawManifest = toml::from_str(text).map_err(|error| {
        let span = error.span().unwrap_or(0..0);
        let (line, column) = line_column(text, span.start);
        let message = error.message().trim().to_string();
        let hint = if message.contains("unknown field") {
            Some("remove the field or fix its spelling; docs/manifest.md lists every field".into())
        } else if message.contains("missing field `app`") {
            Some("start the manifest with [app] and name = \"my-app\"".into())
        } else {
            Some("see docs/manifest.md for the manifest format".into())
        };
        ManifestError {
            file: file.to_string(),
            line,
            column,
            field: if message.contains("missing field `app`") {
                "app".to_string()
            } else {
                field_at(text, span.start)
            },
            message,
            hint,
        }
    })?;
    let mut parser = Parser {
        file,
        text,
        spans: BTreeMap::new(),
    };
    let name = raw.app.get_ref().name.get_ref().clone();
    parser.note("app.name", &raw.app.get_ref().name);
    check_name(&name).map_err(|why| {
        parser.error(
            "app.name",
            raw.app.get_ref().name.span(),
            why,
            Some("use 1 to 63 lowercase letters, digits and dashes, starting with a letter".into()),
        )
    })?;
    let organisation = match &raw.app.get_ref().organisation {
        None => None,
        Some(value) => {
            parser.note("app.organisation", value);
            policy::data::check_label(value.get_ref()).map_err(|why| {
                parser.error(
                    "app.organisation",
                    value.span(),
                    why,
                    Some("an organisation is a name such as \"transport\"".into()),
                )
            })?;
            Some(value.get_ref().clone())
        }
    };
    if raw.service.is_empty() {
        return Err(parser.error(
            "service",
            raw.app.span(),
            "the app has no services",
            Some("add a [service.NAME] table with at least `component` and `routes`".into()),
        ));
    }
    let mut topics = BTreeMap::new();
    for (topic_name, raw_topic) in &raw.topic {
        topics.insert(
            topic_name.clone(),
            self::topic(&mut parser, topic_name, raw_topic)?,
        );
    }
    if raw.kv.len() > KV_BUCKETS_MAX {
        let (_, first) = raw.kv.iter().next().expect("not empty");
        return Err(parser.error(
            "kv",
            first.span(),
            format!(
                "the app declares {} key-value buckets; at most {KV_BUCKETS_MAX}",
                raw.kv.len()
            ),
            None,
        ));
    }
    let mut kv = BTreeMap::new();
    for (bucket, raw_kv) in &raw.kv {
        let at = |field: &str| format!("kv.{bucket}.{field}");
        parser.note(&format!("kv.{bucket}"), raw_kv);
        check_name(bucket).map_err(|why| {
            parser.error(
                &format!("kv.{bucket}"),
                raw_kv.span(),
                why,
                Some(
                    "use 1 to 63 lowercase letters, digits and dashes, starting with a letter"
                        .into(),
                ),
            )
        })?;
        let limits = raw_kv.get_ref();
        let labels = parser.labels(
            &format!("kv.{bucket}"),
            raw_kv.span(),
            limits.classification.as_ref(),
            limits.region.as_ref(),
            limits.allowed_purposes.as_ref(),
        )?;
        kv.insert(
            bucket.clone(),
            KvManifest {
                key_bytes_max: parser.size(
                    &at("key_bytes_max"),
                    limits.key_bytes_max.as_ref(),
                    512,
                    (1, 4096),
                )?,
                value_bytes_max: parser.size(
                    &at("value_bytes_max"),
                    limits.value_bytes_max.as_ref(),
                    1 << 20,
                    (1, 16 << 20),
                )?,
                total_bytes_max: parser.size(
                    &at("total_bytes_max"),
                    limits.total_bytes_max.as_ref(),
                    64 << 20,
                    (1024, 64 << 30),
                )?,
                labels,
            },
        );
    }
    let mut buckets = BTreeMap::new();
    for (bucket, raw_labels) in &raw.bucket {
        parser.note(&format!("bucket.{bucket}"), raw_labels);
        store::engine::check_bucket_name(bucket).map_err(|why| {
            parser.error(
                &format!("bucket.{bucket}"),
                raw_labels.span(),
                why.to_string(),
                Some("use 3 to 63 lowercase letters, digits, `-` and `.`".into()),
            )
        })?;
        let labels = raw_labels.get_ref();
        buckets.insert(
            bucket.clone(),
            parser.labels(
                &format!("bucket.{bucket}"),
                raw_labels.span(),
                labels.classification.as_ref(),
                labels.region.as_ref(),
                labels.allowed_purposes.as_ref(),
            )?,
        );
    }
    let mut services = BTreeMap::new();
    let mut seen_routes: BTreeMap<(Option<String>, String), String> = BTreeMap::new();
    for (service_name, service) in &raw.service {
        let at = |field: &str| format!("service.{service_name}.{field}");
        parser.note(&format!("service.{service_name}"), service);
        check_name(service_name).map_err(|why| {
            parser.error(
                &format!("service.{service_name}"),
                service.span(),
                why,
                Some(
                    "use 1 to 63 lowercase letters, digits and dashes, starting with a letter"
                        .into(),
                ),
            )
        })?;
        let service = service.get_ref();
        let table_span = parser.spans[&format!("service.{service_name}")].clone();
        let workload = match (&service.component, &service.command) {
            (Some(_), Some(command)) => {
                return Err(parser.error(
                    &at("command"),
                    command.span(),
                    "a service has either `component` or `command`, not both",
                    Some("split it into two services".into()),
                ));
            }
            (Some(component), None) => {
                parser.note(&at("component"), component);
                if component.get_ref().trim().is_empty() {
                    return Err(parser.error(
                        &at("component"),
                        component.span(),
                        "the component path is empty",
                        None,
                    ));
                }
                for (field, present) in [
                    ("workdir", service.workdir.as_ref().map(|v| v.span())),
                    ("writable", service.writable.as_ref().map(|v| v.span())),
                    ("user", service.user.as_ref().map(|v| v.span())),
                    (
                        "store_bucket",
                        service.store_bucket.as_ref().map(|v| v.span()),
                    ),
                    ("ready", service.ready.as_ref().map(|v| v.span())),
                    ("liveness", service.liveness.as_ref().map(|v| v.span())),
                    (
                        "stop_signal",
                        service.stop_signal.as_ref().map(|v| v.span()),
                    ),
                    (
                        "stop_timeout",
                        service.stop_timeout.as_ref().map(|v| v.span()),
                    ),
                    ("cpu_time", service.cpu_time.as_ref().map(|v| v.span())),
                ] {
                    if let Some(span) = present {
                        return Err(parser.error(&at(field), span, format!("`{field}` applies to process services (with `command`), not components"), None));
                    }
                }
                Workload::Component {
                    path: component.get_ref().clone(),
                }
            }
            (None, Some(command)) => {
                Workload::Process(Box::new(process(&mut parser, &at, service, command)?))
            }
            (None, None) => {
                return Err(parser.error(
                    &at("component"),
                    table_span,
                    "the service has neither `component` nor `command`",
                    Some("add component = \"path/to/service.wasm\" (relative to this manifest), or command = [\"program\", \"arg\"] to run a program".into()),
                ));
            }
        };
        let is_process = matches!(workload, Workload::Process(_));
        let mut hosts = Vec::new();
        for host in service.hosts.iter().flatten() {
            let value = host.get_ref().to_ascii_lowercase();
            if !is_hostname(&value) {
                return Err(parser.error(&at("hosts"), host.span(), format!("`{}` is not a host name", host.get_ref()), Some("write a DNS name such as \"reservations.city.local\", without scheme or port".into())));
            }
            hosts.push(value);
        }
        let mut routes = Vec::new();
        for route in service.routes.iter().flatten() {
            let value = route.get_ref();
            check_route(value).map_err(|why| {
                parser.error(
                    &at("routes"),
                    route.span(),
                    why,
                    Some("write a path prefix such as \"/api\" or \"/\"".into()),
                )
            })?;
            let key = gateway::RouteKey::new(None, value).prefix;
            let route_hosts: Vec<Option<String>> = if hosts.is_empty() {
                vec![None]
            } else {
                hosts.iter().cloned().map(Some).collect()
            };
            for host in route_hosts {
                if let Some(other) =
                    seen_routes.insert((host.clone(), key.clone()), service_name.clone())
                {
                    return Err(parser.error(
                        &at("routes"),
                        route.span(),
                        format!(
                            "route {value} is also claimed by service `{other}` in this manifest"
                        ),
                        Some("give each service its own path prefix or host".into()),
                    ));
                }
            }
            routes.push(key);
        }
        if let Some(routes_span) = service.routes.as_ref().and_then(|r| r.first()) {
            parser.note(&at("routes"), routes_span);
        }
        let (instances_min, instances_max) = match &service.instances {
            None => (0, 10),
            Some(instances) => {
                parser.note(&at("instances"), instances);
                let min = parser.count(
                    &at("instances.min"),
                    instances.get_ref().min.as_ref(),
                    0,
                    (0, INSTANCES_MAX),
                )?;
                let max = parser.count(
                    &at("instances.max"),
                    instances.get_ref().max.as_ref(),
                    10.max(min),
                    (1, INSTANCES_MAX),
                )?;
                if min > max {
                    return Err(parser.error(
                        &at("instances"),
                        instances.span(),
                        format!("min ({min}) is greater than max ({max})"),
                        Some("make min at most max".into()),
                    ));
                }
                (min, max)
            }
        };
        let concurrency = if is_process {
            parser.count(
                &at("concurrency"),
                service.concurrency.as_ref(),
                10,
                (1, 10_000),
            )?
        } else {
            parser.count(&at("concurrency"), service.concurrency.as_ref(), 1, (1, 1)).map_err(|mut error| {
                error.hint = Some("a wasi:http component instance serves one request at a time; raise instances.max to serve more at once".into());
                error
            })?
        };
        let idle_timeout = parser.duration(
            &at("idle_timeout"),
            service.idle_timeout.as_ref(),
            Duration::from_secs(30),
            (Duration::from_secs(1), Duration::from_secs(24 * 3600)),
        )?;
        let anomaly_warm_up = parser.duration(
            &at("anomaly_warm_up"),
            service.anomaly_warm_up.as_ref(),
            Duration::from_secs(60),
            (Duration::from_secs(5), Duration::from_secs(24 * 3600)),
        )?;
        let memory_bytes = match (is_process, &service.memory) {
            (true, None) => None,
            (true, memory) => Some(parser.size(
                &at("memory"),
                memory.as_ref(),
                0,
                (16 << 20, PROCESS_MEMORY_BYTES_MAX),
            )?),
            (false, memory) => Some(parser.size(
                &at("memory"),
                memory.as_ref(),
                64 << 20,
                (MEMORY_BYTES_MIN, MEMORY_BYTES_MAX),
            )?),
        };
        let timeout = parser.duration(
            &at("timeout"),
            service.timeout.as_ref(),
            Duration::from_secs(10),
            (Duration::from_millis(10), Duration::from_secs(900)),
        )?;
        if let (true, Some(startup)) = (is_process, &service.startup_timeout) {
            return Err(parser.error(
                &at("startup_timeout"),
                startup.span(),
                "process services set their start-up limit with ready.timeout",
                Some("write ready = { http = \"/healthz\", timeout = \"30s\" }".into()),
            ));
        }
        let startup_timeout = parser.duration(
            &at("startup_timeout"),
            service.startup_timeout.as_ref(),
            Duration::from_secs(10),
            (Duration::from_millis(100), Duration::from_secs(600)),
        )?;
        let queue = parser.count(&at("queue"), service.queue.as_ref(), 1000, (1, QUEUE_MAX))?;
        let body_limit_bytes = parser.size(
            &at("body_limit"),
            service.body_limit.as_ref(),
            1 << 20,
            (0, BODY_BYTES_MAX),
        )?;
        let mut outbound = Vec::new();
        if let (true, Some(origin)) = (
            is_process,
            service.outbound.as_ref().and_then(|o| o.first()),
        ) {
            return Err(parser.error(
                &at("outbound"),
                origin.span(),
                "`outbound` applies to components; a process has the host's network",
                None,
            ));
        }
        for origin in service.outbound.iter().flatten() {
            parser.note(&at("outbound"), origin);
            let parsed = Origin::parse(origin.get_ref()).map_err(|error| {
                parser.error(&at("outbound"), origin.span(), error.to_string(), None)
            })?;
            outbound.push(parsed);
        }
        let mut env = BTreeMap::new();
        for (key, value) in service.env.iter().flatten() {
            if key.is_empty()
                || key.contains('=')
                || key.contains('\0')
                || value.get_ref().contains('\0')
            {
                return Err(parser.error(
                    &at("env"),
                    value.span(),
                    format!("`{key}` is not a valid environment variable"),
                    Some(
                        "names may not be empty or contain `=`; values may not contain NUL".into(),
                    ),
                ));
            }
            env.insert(key.clone(), value.get_ref().clone());
        }
        let scaling = scaling(&mut parser, &at, service.scaling.as_ref())?;
        let purposes =
            parser.label_list(&at("purposes"), service.purposes.as_ref(), PURPOSES_MAX)?;
        let fresh_instance_per_request = match &service.isolation {
            None => false,
            Some(value) => {
                parser.note(&at("isolation"), value);
                match (value.get_ref().as_str(), is_process) {
                    ("instance", false) => false,
                    ("request", false) => true,
                    (_, true) => {
                        return Err(parser.error(
                            &at("isolation"),
                            value.span(),
                            "`isolation` applies to components; a process keeps its own state",
                            None,
                        ));
                    }
                    (other, false) => {
                        return Err(parser.error(
                            &at("isolation"),
                            value.span(),
                            format!("`{other}` is not an isolation"),
                            Some("use \"instance\" (the default: an instance serves one request after another) or \"request\" (a fresh instance for every request)".into()),
                        ));
                    }
                }
            }
        };
        let placement = placement(&mut parser, &at, service.placement.as_ref())?;
        let mut triggers = Vec::new();
        for trigger in service.trigger.iter().flatten() {
            let parsed = self::trigger(&mut parser, &at, trigger, &raw.topic, instances_max)?;
            if triggers
                .iter()
                .any(|t: &TriggerManifest| t.topic == parsed.topic)
            {
                return Err(parser.error(
                    &at("trigger.topic"),
                    trigger.get_ref().topic.span(),
                    format!(
                        "the service already has a trigger on topic {}",
                        parsed.topic
                    ),
                    Some("one trigger per topic: raise its `parallel` or `batch` instead".into()),
                ));
            }
            triggers.push(parsed);
        }
        services.insert(
            service_name.clone(),
            ServiceManifest {
                scaling,
                triggers,
                purposes,
                fresh_instance_per_request,
                placement,
                workload,
                routes,
                hosts,
                instances_min,
                instances_max,
                concurrency,
                idle_timeout,
                anomaly_warm_up,
                memory_bytes,
                timeout,
                startup_timeout,
                queue,
                body_limit_bytes,
                outbound,
                env,
            },
        );
    }
    Ok(AppManifest {
        name,
        organisation,
        services,
        topics,
        kv,
        buckets,
        file: file.to_string(),
        text: text.to_string(),
        spans: parser.spans,
    })
}

fn topic(
    parser: &mut Parser<'_>,
    name: &str,
    raw: &Spanned<RawTopic>,
) -> Result<TopicManifest, ManifestError> {
    let at = |field: &str| format!("topic.{name}.{field}");
    parser.note(&format!("topic.{name}"), raw);
    events::check_topic_name(name).map_err(|error| {
        parser.error(
            &format!("topic.{name}"),
            raw.span(),
            error.to_string(),
            None,
        )
    })?;
    let topic = raw.get_ref();
    let batch = match &topic.durability {
        None => false,
        Some(value) => match value.get_ref().as_str() {
            "fsync" => false,
            "batch" => true,
            other => {
                return Err(parser.error(
                    &at("durability"),
                    value.span(),
                    format!("`{other}` is not a durability"),
                    Some("use \"fsync\" (acknowledge after fsync) or \"batch\" (acknowledge after write, fsync every sync_window)".into()),
                ));
            }
        },
    };
    if let (false, Some(window)) = (batch, &topic.sync_window) {
        return Err(parser.error(
            &at("sync_window"),
            window.span(),
            "`sync_window` applies to durability = \"batch\"",
            None,
        ));
    }
    let window = parser.duration(
        &at("sync_window"),
        topic.sync_window.as_ref(),
        Duration::from_millis(200),
        (Duration::from_millis(1), Duration::from_secs(60)),
    )?;
    let labels = parser.labels(
        &format!("topic.{name}"),
        raw.span(),
        topic.classification.as_ref(),
        topic.region.as_ref(),
        topic.allowed_purposes.as_ref(),
    )?;
    Ok(TopicManifest {
        labels,
        batch_window: batch.then_some(window),
        retention: parser.duration(
            &at("retention"),
            topic.retention.as_ref(),
            Duration::from_secs(7 * 24 * 3600),
            (
                Duration::from_secs(1),
                Duration::from_secs(10 * 365 * 24 * 3600),
            ),
        )?,
        retention_bytes: parser.size(
            &at("retention_size"),
            topic.retention_size.as_ref(),
            1 << 30,
            (1 << 20, 1 << 50),
        )?,
        event_bytes_max: parser.size(
            &at("event_limit"),
            topic.event_limit.as_ref(),
            1 << 20,
            (1024, 8 << 20),
        )?,
        segment_bytes: parser.size(
            &at("segment_size"),
            topic.segment_size.as_ref(),
            64 << 20,
            (64 << 10, 1 << 30),
        )?,
    })
}

fn trigger(
    parser: &mut Parser<'_>,
    at: &dyn Fn(&str) -> String,
    raw: &Spanned<RawTrigger>,
    declared: &BTreeMap<String, Spanned<RawTopic>>,
    instances_max: u32,
) -> Result<TriggerManifest, ManifestError> {
    parser.note(&at("trigger"), raw);
    let trigger = raw.get_ref();
    let mut topic_field = |field: &str, value: &Spanned<String>| {
        parser.note(&at(&format!("trigger.{field}")), value);
        events::check_topic_name(value.get_ref()).map_err(|error| {
            parser.error(
                &at(&format!("trigger.{field}")),
                value.span(),
                error.to_string(),
                None,
            )
        })?;
        if field != "topic" && !declared.contains_key(value.get_ref()) {
            return Err(parser.error(
                &at(&format!("trigger.{field}")),
                value.span(),
                format!(
                    "topic `{}` is not declared in this manifest",
                    value.get_ref()
                ),
                Some(format!("add a [topic.\"{}\"] table", value.get_ref())),
            ));
        }
        Ok(value.get_ref().clone())
    };
    let topic = topic_field("topic", &trigger.topic)?;
    let dead_letter = trigger
        .dead_letter
        .as_ref()
        .map(|v| topic_field("dead_letter", v))
        .transpose()?;
    let reply_to = trigger
        .reply_to
        .as_ref()
        .map(|v| topic_field("reply_to", v))
        .transpose()?;
    let mut pseudonymise = Vec::new();
    if let Some(fields) = &trigger.pseudonymise {
        parser.note(&at("trigger.pseudonymise"), fields);
        if fields.get_ref().len() > PSEUDONYMISED_FIELDS_MAX {
            return Err(parser.error(
                &at("trigger.pseudonymise"),
                fields.span(),
                format!(
                    "{} fields; at most {PSEUDONYMISED_FIELDS_MAX}",
                    fields.get_ref().len()
                ),
                None,
            ));
        }
        for field in fields.get_ref() {
            if field.is_empty() || field.len() > 256 || field.split('.').any(str::is_empty) {
                return Err(parser.error(
                    &at("trigger.pseudonymise"),
                    fields.span(),
                    format!("`{field}` is not a field name"),
                    Some("name a JSON field of the events, or a dotted path into nested objects: \"plate\", \"vehicle.id\"".into()),
                ));
            }
            pseudonymise.push(field.clone());
        }
    }
    let path = match &trigger.path {
        None => "/".to_string(),
        Some(path) => {
            let value = path.get_ref();
            if !value.starts_with('/')
                || value.contains(['#', ' ', '\t', '\\'])
                || value.chars().any(char::is_control)
            {
                return Err(parser.error(
                    &at("trigger.path"),
                    path.span(),
                    format!("`{value}` is not a request path"),
                    Some("write a path such as \"/events\" or \"/ingest?source=loops\"".into()),
                ));
            }
            value.clone()
        }
    };
    Ok(TriggerManifest {
        topic,
        batch: parser.count(&at("trigger.batch"), trigger.batch.as_ref(), 1, (1, 1000))?,
        parallel: parser.count(
            &at("trigger.parallel"),
            trigger.parallel.as_ref(),
            instances_max.min(64),
            (1, 1000),
        )?,
        path,
        max_attempts: parser.count(
            &at("trigger.max_attempts"),
            trigger.max_attempts.as_ref(),
            5,
            (1, 1000),
        )?,
        dead_letter,
        reply_to,
        pseudonymise,
    })
}

/// `placement = { region = "...", spread = "zone", edge = "never" }`.
fn placement(
    parser: &mut Parser<'_>,
    at: &dyn Fn(&str) -> String,
    raw: Option<&Spanned<RawPlacement>>,
) -> Result<Placement, ManifestError> {
    let Some(raw) = raw else {
        return Ok(Placement::default());
    };
    parser.note(&at("placement"), raw);
    let RawPlacement {
        region,
        spread,
        edge,
    } = raw.get_ref();
    let region = match region {
        None => None,
        Some(value) => {
            parser.note(&at("placement.region"), value);
            policy::data::check_label(value.get_ref()).map_err(|why| {
                parser.error(
                    &at("placement.region"),
                    value.span(),
                    why,
                    Some(
                        "a region is a name such as \"seoul\", as in the nodes' `[node] region`"
                            .into(),
                    ),
                )
            })?;
            Some(value.get_ref().clone())
        }
    };
    let spread = match spread.as_ref().map(|v| (v, v.get_ref().as_str())) {
        None | Some((_, "zone")) => Spread::Zone,
        Some((_, "node")) => Spread::Node,
        Some((value, other)) => {
            return Err(parser.error(
                &at("placement.spread"),
                value.span(),
                format!("`{other}` is not a spread"),
                Some("use \"zone\" (the default: over zones, then nodes) or \"node\"".into()),
            ));
        }
    };
    let edge = match edge.as_ref().map(|v| (v, v.get_ref().as_str())) {
        None | Some((_, "allowed")) => EdgeRule::Allowed,
        Some((_, "only")) => EdgeRule::Only,
        Some((_, "never")) => EdgeRule::Never,
        Some((value, other)) => {
            return Err(parser.error(
                &at("placement.edge"),
                value.span(),
                format!("`{other}` is not an edge rule"),
                Some("use \"allowed\" (the default), \"only\" or \"never\"".into()),
            ));
        }
    };
    Ok(Placement {
        region,
        spread,
        edge,
    })
}

fn scaling(
    parser: &mut Parser<'_>,
    at: &dyn Fn(&str) -> String,
    raw: Option<&Spanned<RawScaling>>,
) -> Result<Scaling, ManifestError> {
    let Some(raw) = raw else {
        return Ok(Scaling {
            policy: ScalingPolicy::Reactive,
            target_percent: None,
            caution: CautionLevel::Normal,
            slo: None,
        });
    };
    parser.note(&at("scaling"), raw);
    let policy = match &raw.get_ref().policy {
        None => ScalingPolicy::Reactive,
        Some(name) => ScalingPolicy::ALL
            .iter()
            .find(|(n, _)| n == name.get_ref())
            .map(|(_, p)| *p)
            .ok_or_else(|| {
                parser.error(
                    &at("scaling.policy"),
                    name.span(),
                    format!("`{}` is not a scaling policy", name.get_ref()),
                    Some(format!(
                        "use one of {}",
                        ScalingPolicy::ALL.map(|(n, _)| n).join(", ")
                    )),
                )
            })?,
    };
    let target_percent = match &raw.get_ref().target {
        None => None,
        Some(target)
            if !matches!(
                policy,
                ScalingPolicy::Hpa | ScalingPolicy::Kpa | ScalingPolicy::AwsPredictive
            ) =>
        {
            return Err(parser.error(
                &at("scaling.target"),
                target.span(),
                format!(
                    "`target` applies to hpa, kpa and aws-predictive, not {}",
                    policy.name()
                ),
                None,
            ));
        }
        Some(target) => {
            let value = *target.get_ref();
            if !autopilot::evaluate::KNOB_RANGE.contains(&value) {
                return Err(parser.error(
                    &at("scaling.target"),
                    target.span(),
                    format!("{value} is out of range"),
                    Some("a target utilisation from 0.05 to 1.0".into()),
                ));
            }
            Some((value * 100.0).round() as u32)
        }
    };
    let caution = match &raw.get_ref().caution {
        None => CautionLevel::Normal,
        Some(level) if policy != ScalingPolicy::Predictive => {
            return Err(parser.error(
                &at("scaling.caution"),
                level.span(),
                "`caution` applies to the predictive policy",
                None,
            ));
        }
        Some(level) => match level.get_ref() {
            RawCaution::Knob(knob) if autopilot::evaluate::KNOB_RANGE.contains(knob) => {
                CautionLevel::Knob((knob * 1000.0).round() as u32)
            }
            RawCaution::Knob(knob) => {
                return Err(parser.error(
                    &at("scaling.caution"),
                    level.span(),
                    format!("{knob} is out of range"),
                    Some("a tuned knob from 0.05 (cautious) to 1.0 (bold), as `maru sim --tune` reports it".into()),
                ));
            }
            RawCaution::Level(name) => match name.as_str() {
                "conservative" => CautionLevel::Conservative,
                "normal" => CautionLevel::Normal,
                "aggressive" => CautionLevel::Aggressive,
                other => {
                    return Err(parser.error(
                        &at("scaling.caution"),
                        level.span(),
                        format!("`{other}` is not a caution level"),
                        Some("use conservative, normal or aggressive, or a tuned knob from 0.05 to 1.0".into()),
                    ));
                }
            },
        },
    };
    let slo = match &raw.get_ref().slo {
        None => None,
        Some(slo) => Some(parser.duration(
            &at("scaling.slo"),
            Some(slo),
            Duration::ZERO,
            (Duration::from_millis(1), Duration::from_secs(3600)),
        )?),
    };
    Ok(Scaling {
        policy,
        target_percent,
        caution,
        slo,
    })
}

fn probe(
    parser: &mut Parser<'_>,
    field: &str,
    raw: &Spanned<RawProbe>,
) -> Result<Probe, ManifestError> {
    parser.note(field, raw);
    match (&raw.get_ref().http, raw.get_ref().tcp) {
        (Some(path), None | Some(false)) => {
            check_route(path.get_ref()).map_err(|why| {
                parser.error(
                    field,
                    path.span(),
                    why.replace("route", "probe path"),
                    Some("write a path such as \"/healthz\"".into()),
                )
            })?;
            Ok(Probe::Http(path.get_ref().clone()))
        }
        (None, Some(true)) => Ok(Probe::Tcp),
        _ => Err(parser.error(
            field,
            raw.span(),
            "a probe needs exactly one of http = \"/path\" or tcp = true",
            None,
        )),
    }
}

/// Directories one process service may list as `writable`.
const WRITABLE_MAX: usize = 32;

fn process(
    parser: &mut Parser<'_>,
    at: &dyn Fn(&str) -> String,
    service: &RawService,
    command: &Spanned<Vec<String>>,
) -> Result<ProcessManifest, ManifestError> {
    parser.note(&at("command"), command);
    let words = command.get_ref();
    if words.is_empty() || words[0].trim().is_empty() {
        return Err(parser.error(
            &at("command"),
            command.span(),
            "the command is empty",
            Some("write command = [\"program\", \"arg\", ...]".into()),
        ));
    }
    if words.iter().any(|w| w.contains('\0')) {
        return Err(parser.error(
            &at("command"),
            command.span(),
            "the command contains a NUL byte",
            None,
        ));
    }
    let workdir = match &service.workdir {
        Some(dir) => {
            parser.note(&at("workdir"), dir);
            dir.get_ref().clone()
        }
        None => ".".to_string(),
    };
    let (ready, ready_timeout) = match &service.ready {
        Some(raw) => {
            let probe = probe(parser, &at("ready"), raw)?;
            for (name, present) in [
                ("interval", raw.get_ref().interval.is_some()),
                ("failures", raw.get_ref().failures.is_some()),
            ] {
                if present {
                    return Err(parser.error(&at("ready"), raw.span(), format!("`{name}` belongs to the liveness probe; readiness is polled until it passes"), None));
                }
            }
            let timeout = parser.duration(
                &at("ready.timeout"),
                raw.get_ref().timeout.as_ref(),
                Duration::from_secs(30),
                (Duration::from_millis(100), Duration::from_secs(600)),
            )?;
            (probe, timeout)
        }
        None => (Probe::Tcp, Duration::from_secs(30)),
    };
    let liveness = match &service.liveness {
        Some(raw) => {
            let probe = probe(parser, &at("liveness"), raw)?;
            let interval = parser.duration(
                &at("liveness.interval"),
                raw.get_ref().interval.as_ref(),
                Duration::from_secs(10),
                (Duration::from_millis(100), Duration::from_secs(3600)),
            )?;
            let timeout = parser.duration(
                &at("liveness.timeout"),
                raw.get_ref().timeout.as_ref(),
                Duration::from_secs(1),
                (Duration::from_millis(10), Duration::from_secs(60)),
            )?;
            let failures = parser.count(
                &at("liveness.failures"),
                raw.get_ref().failures.as_ref(),
                3,
                (1, 100),
            )?;
            Some(LivenessProbe {
                probe,
                interval,
                timeout,
                failures,
            })
        }
        None => None,
    };
    let stop_signal = match &service.stop_signal {
        Some(name) => {
            parser.note(&at("stop_signal"), name);
            let wanted = name.get_ref().to_ascii_uppercase();
            let wanted = if wanted.starts_with("SIG") {
                wanted
            } else {
                format!("SIG{wanted}")
            };
            SIGNALS
                .iter()
                .find(|(n, _)| *n == wanted)
                .map(|(_, s)| *s)
                .ok_or_else(|| {
                    parser.error(
                        &at("stop_signal"),
                        name.span(),
                        format!("`{}` is not a stop signal Maru sends", name.get_ref()),
                        Some(format!("use one of {}", SIGNALS.map(|(n, _)| n).join(", "))),
                    )
                })?
        }
        None => Signal::SIGTERM,
    };
    let stop_timeout = parser.duration(
        &at("stop_timeout"),
        service.stop_timeout.as_ref(),
        Duration::from_secs(10),
        (Duration::ZERO, Duration::from_secs(600)),
    )?;
    let cpu_time = match &service.cpu_time {
        Some(value) => Some(parser.duration(
            &at("cpu_time"),
            Some(value),
            Duration::ZERO,
            (Duration::from_secs(1), Duration::from_secs(365 * 24 * 3600)),
        )?),
        None => None,
    };
    let writable = match &service.writable {
        Some(dirs) => {
            parser.note(&at("writable"), dirs);
            if let Some(bad) = dirs
                .get_ref()
                .iter()
                .find(|d| d.trim().is_empty() || d.contains('\0'))
            {
                return Err(parser.error(
                    &at("writable"),
                    dirs.span(),
                    format!("`{bad}` is not a directory path"),
                    Some("list directories, relative to this manifest or absolute: writable = [\"data\"]".into()),
                ));
            }
            if dirs.get_ref().len() > WRITABLE_MAX {
                return Err(parser.error(
                    &at("writable"),
                    dirs.span(),
                    format!("at most {WRITABLE_MAX} writable directories"),
                    None,
                ));
            }
            dirs.get_ref().clone()
        }
        None => Vec::new(),
    };
    let user = match &service.user {
        Some(name) => {
            parser.note(&at("user"), name);
            let text = name.get_ref();
            let valid = !text.is_empty()
                && text.len() <= 32
                && text
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
                && !text.starts_with('-');
            if !valid {
                return Err(parser.error(
                    &at("user"),
                    name.span(),
                    format!("`{text}` is not a user name"),
                    Some("name an existing account, e.g. user = \"nobody\"".into()),
                ));
            }
            Some(text.clone())
        }
        None => None,
    };
    let store_bucket = match &service.store_bucket {
        Some(name) => {
            parser.note(&at("store_bucket"), name);
            store::engine::check_bucket_name(name.get_ref()).map_err(|error| {
                parser.error(
                    &at("store_bucket"),
                    name.span(),
                    error.to_string(),
                    Some("name a bucket like \"traffic-archive\"".into()),
                )
            })?;
            Some(name.get_ref().clone())
        }
        None => None,
    };
    Ok(ProcessManifest {
        command: words.clone(),
        workdir,
        writable,
        user,
        store_bucket,
        ready,
        ready_timeout,
        liveness,
        stop_signal,
        stop_timeout,
        cpu_time,
    })
}

impl AppManifest {
    /// An error located at a field of this manifest (or the nearest enclosing one that was
    /// written out), for checks made after parsing.
    pub fn error_at(
        &self,
        field: &str,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> ManifestError {
        let mut key = field;
        let span = loop {
            if let Some(span) = self.spans.get(key) {
                break span.clone();
            }
            match key.rsplit_once('.') {
                Some((parent, _)) => key = parent,
                None => break 0..0,
            }
        };
        let (line, column) = line_column(&self.text, span.start);
        ManifestError {
            file: self.file.clone(),
            line,
            column,
            field: field.to_string(),
            message: message.into(),
            hint,
        }
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

/// Best guess at the dotted field a byte offset belongs to: the enclosing `[table]` header
/// plus the key on that line.
fn field_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("");
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().to_string())
        .filter(|k| !k.starts_with('['));
    match (table, key) {
        (Some(table), Some(key)) => format!("{table}.{key}"),
        (Some(table), None) => table,
        (None, Some(key)) => key,
        (None, None) => line
            .trim()
            .trim_matches(|c| c == '[' || c == ']')
            .to_string(),
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("`{name}` is not a valid name"))
    }
}

fn check_route(route: &str) -> Result<(), String> {
    if !route.starts_with('/') {
        return Err(format!("route `{route}` does not start with /"));
    }
    if route.contains(['?', '#', ' ', '\t', '\\', '%']) || route.chars().any(char::is_control) {
        return Err(format!(
            "route `{route}` may only contain a path (no query, fragment, spaces or escapes)"
        ));
    }
    if route
        .split('/')
        .any(|segment| segment == ".." || segment == ".")
    {
        return Err(format!("route `{route}` contains a `.` or `..` segment"));
    }
    if route.contains("//") {
        return Err(format!("route `{route}` contains an empty segment"));
    }
    if route == "/events" || route.starts_with("/events/") {
        return Err(format!(
            "route `{route}` is under /events, where the gateway takes events for topics"
        ));
    }
    Ok(())
}

fn is_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `"250ms"`, `"30s"`, `"5m"`, `"1h"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration"))?;
    let millis = match unit.trim() {
        "ms" => Some(number),
        "s" => number.checked_mul(1000),
        "m" | "min" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        "d" => number.checked_mul(86_400_000),
        "" => return Err(format!("`{text}` has no unit")),
        other => {
            return Err(format!(
                "`{other}` is not a duration unit (use ms, s, m, h or d)"
            ));
        }
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// `"512KiB"`, `"64MiB"`, `"1GiB"`, `"100MB"`, or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "`{other}` is not a size unit (use B, KiB, MiB, GiB, KB, MB or GB)"
            ));
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too large"))
}

pub fn format_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

#[cfg(test)]
mod tests;
