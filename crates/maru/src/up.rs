//! `maru up`: configuration, wiring and the lifecycle of a node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use control::Node;
use gateway::{Gateway, GatewayConfig};
use runtime::{Runtime, RuntimeConfig};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct UpArgs {
    /// Data directory: state, components, compiled code, token.
    #[arg(long, env = "MARU_DATA")]
    data: Option<PathBuf>,
    /// Gateway listen address.
    #[arg(long, env = "MARU_GATEWAY")]
    gateway: Option<SocketAddr>,
    /// Control API listen address.
    #[arg(long, env = "MARU_CONTROL_LISTEN")]
    control: Option<SocketAddr>,
    /// Where the MQTT listener for sensors listens [default: 127.0.0.1:1883]
    #[arg(long, env = "MARU_MQTT")]
    mqtt: Option<SocketAddr>,
    /// Where the object store's S3 API listens [default: 127.0.0.1:9000]
    #[arg(long, env = "MARU_S3")]
    s3: Option<SocketAddr>,
    /// Log format: text or json.
    #[arg(long, env = "MARU_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Node config file. Default: ./maru.toml if it has a [node] table.
    #[arg(long, env = "MARU_CONFIG")]
    config: Option<PathBuf>,
    /// Listeners to serve without TLS, comma-separated: gateway, control, mqtt, s3
    /// (overrides `[tls] plain`). Everything is TLS by default.
    #[arg(long, env = "MARU_PLAIN", value_delimiter = ',')]
    plain: Option<Vec<Listener>>,
    /// This node's name in a cluster [default: `[node] name`, else the host name].
    #[arg(long, env = "MARU_NODE_NAME")]
    name: Option<String>,
    /// Join a cluster through these NATS servers (comma-separated nats:// URLs; overrides
    /// `[cluster] servers`). Without it the node runs alone, with its state embedded.
    #[arg(long, env = "MARU_CLUSTER", value_delimiter = ',')]
    cluster: Option<Vec<String>>,
    /// Monitoring endpoints (http://HOST:PORT, each server's `http` setting) of every NATS
    /// server of the cluster, checked to sync every write (overrides `[cluster] monitors`).
    #[arg(long, env = "MARU_CLUSTER_MONITOR", value_delimiter = ',')]
    cluster_monitor: Option<Vec<String>>,
}

/// The node's listeners, as `[tls] plain` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Listener {
    Gateway,
    Control,
    Mqtt,
    S3,
}

impl Listener {
    const ALL: [Listener; 4] = [
        Listener::Gateway,
        Listener::Control,
        Listener::Mqtt,
        Listener::S3,
    ];

    fn name(self) -> &'static str {
        match self {
            Listener::Gateway => "gateway",
            Listener::Control => "control",
            Listener::Mqtt => "mqtt",
            Listener::S3 => "s3",
        }
    }
}

/// The `[tls]` table of a node config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    /// Listeners served without TLS.
    plain: Option<Vec<Listener>>,
    /// The operator's certificate chain and key (PEM); without them the node CA's.
    certificate: Option<PathBuf>,
    key: Option<PathBuf>,
    /// More names for the node CA's server certificate.
    names: Option<Vec<String>>,
}

/// TLS as resolved.
struct TlsSettings {
    plain: Vec<Listener>,
    own: Option<(PathBuf, PathBuf)>,
    names: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    Text,
    Json,
}

/// The `[node]` table of a node config file. Every field is optional; flags and environment
/// variables override it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    data: Option<PathBuf>,
    gateway: Option<SocketAddr>,
    control: Option<SocketAddr>,
    mqtt: Option<SocketAddr>,
    mqtt_connections_max: Option<usize>,
    log_format: Option<LogFormat>,
    instances_total_max: Option<u32>,
    header_read_timeout: Option<String>,
    shutdown_grace: Option<String>,
    trusted_proxies: Option<Vec<std::net::IpAddr>>,
    request_bodies_max: Option<String>,
    process_isolation: Option<ProcessIsolation>,
    region: Option<String>,
    organisation: Option<String>,
    name: Option<String>,
    zone: Option<String>,
    edge: Option<bool>,
}

/// The `[cluster]` table of a node config file (docs/cluster.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    servers: Option<Vec<String>>,
    monitors: Option<Vec<String>>,
}

/// How this node joins a cluster.
struct ClusterSettings {
    servers: Vec<String>,
    monitors: Vec<String>,
}

/// What the node is called and where it stands, for `maru nodes` and placement.
#[derive(Clone)]
struct Identity {
    name: String,
    zone: String,
    edge: bool,
}

/// How process services are confined (docs/node.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ProcessIsolation {
    /// Landlock, no capabilities, `user` honoured; refuses to start without Landlock.
    #[default]
    Landlock,
    /// Unconfined: processes can read the node's data.
    None,
}

/// The `[store]` table of a node config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    listen: Option<SocketAddr>,
    volumes: Option<Vec<PathBuf>>,
    profile: Option<String>,
    scrub_bytes_per_second: Option<String>,
    scrub_interval: Option<String>,
    domains: Option<Vec<String>>,
    requests_per_second_per_key: Option<u32>,
    transfers_max: Option<usize>,
    transfer_wait: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    node: Option<NodeFile>,
    store: Option<StoreFile>,
    tls: Option<TlsFile>,
    cluster: Option<ClusterFile>,
    // An app manifest in the same directory is not a node config; its tables are ignored.
    #[serde(default, rename = "app")]
    _app: Option<toml::Value>,
    #[serde(default, rename = "service")]
    _service: Option<toml::Value>,
    #[serde(default, rename = "topic")]
    _topic: Option<toml::Value>,
    #[serde(default, rename = "kv")]
    _kv: Option<toml::Value>,
    #[serde(default, rename = "bucket")]
    _bucket: Option<toml::Value>,
}

fn read_config(explicit: Option<&Path>) -> anyhow::Result<ConfigFile> {
    let (path, required) = match explicit {
        Some(path) => (path.to_path_buf(), true),
        None => (PathBuf::from("maru.toml"), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if !required && error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(ConfigFile::default());
        }
        Err(error) => {
            return Err(error).with_context(|| format!("read node config {}", path.display()));
        }
    };
    let parsed: ConfigFile = toml::from_str(&text).map_err(|error| {
        let span = error.span().unwrap_or(0..0);
        let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
        anyhow::anyhow!(
            "{}:{line}: {} (see docs/node.md)",
            path.display(),
            error.message().trim()
        )
    })?;
    Ok(parsed)
}

/// A node's resolved settings.
struct Settings {
    data: PathBuf,
    gateway: SocketAddr,
    control: SocketAddr,
    mqtt: SocketAddr,
    mqtt_connections_max: usize,
    log_format: LogFormat,
    runtime: RuntimeConfig,
    gateway_config: GatewayConfig,
    process_isolation: ProcessIsolation,
    store: StoreSettings,
    labels: policy::data::NodeLabels,
    tls: TlsSettings,
    identity: Identity,
    cluster: Option<ClusterSettings>,
}

/// The object store's resolved settings.
struct StoreSettings {
    listen: SocketAddr,
    volumes: Vec<PathBuf>,
    /// Whether the volumes are the default directories under the data directory.
    default_volumes: bool,
    profile: Option<store::layout::Profile>,
    scrub_bytes_per_second: u64,
    scrub_interval: Duration,
    /// Domains for virtual-hosted-style addressing (`BUCKET.DOMAIN`).
    domains: Vec<String>,
    limits: store::s3::S3Limits,
}

/// Volumes a node gets by default: six directories in the data directory, so the
/// erasure-coded path (RS(4,2)) is what runs; they protect against damaged blocks, not a
/// lost disk.
const DEFAULT_VOLUMES: usize = 6;

fn store_settings(
    file: StoreFile,
    flag: Option<SocketAddr>,
    data: &Path,
) -> anyhow::Result<StoreSettings> {
    let default_volumes = file.volumes.is_none();
    let volumes = file.volumes.unwrap_or_else(|| {
        (0..DEFAULT_VOLUMES)
            .map(|i| data.join("store").join("volumes").join(format!("v{i}")))
            .collect()
    });
    if volumes.is_empty() {
        bail!("[store] volumes is empty; list at least one directory (ideally one per disk)");
    }
    let profile = match file.profile {
        None => None,
        Some(text) => {
            let parsed = text
                .trim()
                .strip_prefix("RS(")
                .and_then(|t| t.strip_suffix(')'))
                .and_then(|t| t.split_once(','))
                .and_then(|(k, m)| {
                    Some((k.trim().parse::<u8>().ok()?, m.trim().parse::<u8>().ok()?))
                });
            let Some((data_shards, parity)) = parsed else {
                bail!("[store] profile = {text:?} is not RS(DATA,PARITY), e.g. \"RS(4,2)\"");
            };
            let profile = store::layout::Profile::new(data_shards, parity)
                .map_err(|e| anyhow::anyhow!("[store] profile = {text:?}: {e}"))?;
            profile.check_fits(volumes.len()).map_err(|e| {
                anyhow::anyhow!(
                    "[store] profile = {text:?}: {e}; list more volumes or choose a smaller profile"
                )
            })?;
            Some(profile)
        }
    };
    let scrub_bytes_per_second = match file.scrub_bytes_per_second {
        None => 16 << 20,
        Some(text) => control::manifest::parse_size(&text)
            .map_err(|e| anyhow::anyhow!("[store] scrub_bytes_per_second: {e}"))?
            .max(1 << 20),
    };
    let scrub_interval = match file.scrub_interval {
        None => Duration::from_secs(24 * 3600),
        Some(text) => control::manifest::parse_duration(&text)
            .map_err(|e| anyhow::anyhow!("[store] scrub_interval: {e}"))?
            .max(Duration::from_secs(60)),
    };
    let defaults = store::s3::S3Limits::default();
    let limits = store::s3::S3Limits {
        requests_per_second_per_key: match file.requests_per_second_per_key {
            Some(0) => bail!("[store] requests_per_second_per_key must be at least 1"),
            Some(rate) => rate,
            None => defaults.requests_per_second_per_key,
        },
        transfers_max: match file.transfers_max {
            Some(0) => bail!("[store] transfers_max must be at least 1"),
            Some(max) => max,
            None => defaults.transfers_max,
        },
        transfer_wait: match file.transfer_wait {
            None => defaults.transfer_wait,
            Some(text) => control::manifest::parse_duration(&text)
                .map_err(|e| anyhow::anyhow!("[store] transfer_wait: {e}"))?,
        },
        ..defaults
    };
    let domains = file.domains.unwrap_or_default();
    store::s3::check_domains(&domains).map_err(|e| anyhow::anyhow!("[store] domains: {e}"))?;
    Ok(StoreSettings {
        domains,
        limits,
        listen: flag
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9000))),
        volumes,
        default_volumes,
        profile,
        scrub_bytes_per_second,
        scrub_interval,
    })
}

fn settings(args: UpArgs) -> anyhow::Result<Settings> {
    let config = read_config(args.config.as_deref())?;
    let file = config.node.unwrap_or_default();
    let data = args
        .data
        .clone()
        .or(file.data.clone())
        .unwrap_or_else(|| PathBuf::from("./maru-data"));
    let store = store_settings(config.store.unwrap_or_default(), args.s3, &data)?;
    let tls_file = config.tls.unwrap_or_default();
    let own = match (tls_file.certificate, tls_file.key) {
        (Some(certificate), Some(key)) => Some((certificate, key)),
        (None, None) => None,
        _ => bail!(
            "[tls] certificate and key go together: give both (PEM files), or neither to use the node's own CA"
        ),
    };
    let tls = TlsSettings {
        plain: args.plain.clone().or(tls_file.plain).unwrap_or_default(),
        own,
        names: tls_file.names.unwrap_or_default(),
    };
    let duration =
        |field: &str, value: Option<String>, default: Duration| -> anyhow::Result<Duration> {
            value.map_or(Ok(default), |text| {
                control::manifest::parse_duration(&text)
                    .map_err(|e| anyhow::anyhow!("node config `{field}`: {e}"))
            })
        };
    let defaults = GatewayConfig::default();
    let instances_total_max = file
        .instances_total_max
        .unwrap_or(RuntimeConfig::default().instances_total_max);
    if !(1..=100_000).contains(&instances_total_max) {
        bail!(
            "node config `instances_total_max` = {instances_total_max} is out of range; use 1 to 100000"
        );
    }
    let label = |field: &str, value: Option<String>, default: &str| -> anyhow::Result<String> {
        let value = value.unwrap_or_else(|| default.to_string());
        policy::data::check_label(&value)
            .map_err(|why| anyhow::anyhow!("node config `{field}`: {why}"))?;
        Ok(value)
    };
    let labels = policy::data::NodeLabels {
        region: label("region", file.region, "local")?,
        organisation: label("organisation", file.organisation, "default")?,
    };
    let name = match args.name.clone().or(file.name.clone()) {
        Some(name) => name,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
    };
    if !cluster::valid_name(&name) {
        bail!(
            "the node name {name:?} is not usable: use 1 to 63 letters, digits, `-` or `_` (set `[node] name` or --name)"
        );
    }
    let identity = Identity {
        name,
        zone: label("zone", file.zone, "default")?,
        edge: file.edge.unwrap_or(false),
    };
    let cluster_file = config.cluster.unwrap_or_default();
    let servers = args
        .cluster
        .clone()
        .or(cluster_file.servers)
        .unwrap_or_default();
    let monitors = args
        .cluster_monitor
        .clone()
        .or(cluster_file.monitors)
        .unwrap_or_default();
    let cluster = if servers.is_empty() {
        if !monitors.is_empty() {
            bail!(
                "cluster monitors are given but no NATS servers: add --cluster nats://HOST:4222 (or `[cluster] servers`)"
            );
        }
        None
    } else {
        if monitors.is_empty() {
            bail!(
                "--cluster needs the NATS servers' monitoring endpoints, to check that they sync every write: add --cluster-monitor http://HOST:8222,... (or `[cluster] monitors`)"
            );
        }
        Some(ClusterSettings { servers, monitors })
    };
    Ok(Settings {
        data,
        gateway: args
            .gateway
            .or(file.gateway)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
        control: args
            .control
            .or(file.control)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8090))),
        mqtt: args
            .mqtt
            .or(file.mqtt)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1883))),
        mqtt_connections_max: file
            .mqtt_connections_max
            .unwrap_or(events::mqtt::MqttConfig::default().connections_max)
            .max(1),
        log_format: args
            .log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Text),
        runtime: RuntimeConfig {
            instances_total_max,
            ..RuntimeConfig::default()
        },
        gateway_config: GatewayConfig {
            header_read_timeout: duration(
                "header_read_timeout",
                file.header_read_timeout,
                defaults.header_read_timeout,
            )?,
            shutdown_grace: duration(
                "shutdown_grace",
                file.shutdown_grace,
                defaults.shutdown_grace,
            )?,
            trusted_proxies: file.trusted_proxies.unwrap_or_default(),
            buffered_body_bytes_max: match file.request_bodies_max {
                None => defaults.buffered_body_bytes_max,
                Some(text) => {
                    let bytes = control::manifest::parse_size(&text)
                        .map_err(|e| anyhow::anyhow!("node config `request_bodies_max`: {e}"))?;
                    if bytes < 1 << 20 {
                        bail!(
                            "node config `request_bodies_max` = {text:?} is too small; use at least \"1MiB\""
                        );
                    }
                    bytes
                }
            },
            ..defaults
        },
        process_isolation: file.process_isolation.unwrap_or_default(),
        store,
        labels,
        tls,
        identity,
        cluster,
    })
}

/// Task polls between two looks at the I/O driver; see [`run`].
const RUNTIME_EVENT_INTERVAL: u32 = 7;

/// At most this many malloc arenas per core, unless `MALLOC_ARENA_MAX` says otherwise.
///
/// glibc gives threads up to eight arenas per core, and memory freed in one arena is not
/// reused by threads of another. A node's deploys and reconciles run on whichever worker or
/// blocking thread picks them up, so with the default the temporary copies of every
/// deployed manifest were left spread over many arenas: `cargo xtask bench density`
/// measured 58 KiB per idle service at 1,000 apps with the default against 35 KiB with two
/// arenas on this 2-core machine (BENCHMARKS.md), and warm instances no costlier.
const MALLOC_ARENAS_PER_CORE: usize = 1;

fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = i32::try_from((cores * MALLOC_ARENAS_PER_CORE).max(2)).unwrap_or(i32::MAX);
        // SAFETY: `mallopt` only sets a parameter of glibc's allocator; called before the
        // node starts its threads. A refusal (0) leaves glibc's default, which is harmless.
        #[allow(unsafe_code)]
        let set = unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
        if set == 0 {
            tracing::warn!(
                arenas,
                "could not limit malloc arenas; memory per idle service will be higher"
            );
        }
    }
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let settings = settings(args)?;
    init_tracing(settings.log_format);
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        // Look for ready sockets every 7 task polls instead of tokio's 61: with many
        // connections each doing a little work per wake-up (an MQTT publish, a PUBACK),
        // readiness is noticed sooner and group commits fill while a sync runs
        // (`cargo xtask bench events`: about +10 % events/s; BENCHMARKS.md).
        .event_interval(RUNTIME_EVENT_INTERVAL)
        .enable_all()
        .build()
        .context("start the async runtime")?
        .block_on(serve(settings))
}

/// The audit log (DATA/audit), with a note that the node started.
fn open_audit(data: &Path) -> anyhow::Result<Arc<policy::audit::AuditLog>> {
    use policy::audit::{AuditLog, Decision, Event, Kind};
    let (audit, opened) =
        AuditLog::open(disk::Env::os(), &data.join("audit")).context("open the audit log")?;
    let mut details = serde_json::Map::new();
    details.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    if let Some(tail) = opened.tail {
        details.insert(
            "crash_tail".into(),
            serde_json::json!({ "segment": tail.segment, "offset": tail.offset, "bytes": tail.bytes }),
        );
    }
    audit
        .append(Event {
            kind: Kind::Log,
            actor: "maru".into(),
            action: "node.start".into(),
            resource: "node".into(),
            decision: Decision::Note,
            reason: String::new(),
            address: None,
            details,
        })
        .context("write to the audit log")?;
    Ok(Arc::new(audit))
}

fn init_tracing(format: LogFormat) {
    // s3s logs every client error (a missing key, a retried SlowDown) at ERROR; the store
    // logs its own failures, so s3s speaks only when MARU_LOG asks for it.
    let filter = tracing_subscriber::EnvFilter::try_from_env("MARU_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,s3s=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn bind(address: SocketAddr, what: &str, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).await.with_context(|| format!("listen for the {what} on {address} (is another maru running? choose another address with {flag})"))
}

/// The data directory holds the control token, the state (with manifests' `env` values) and
/// artifacts maru loads as native code: nobody but maru's user may read or change it, so it
/// is made `0700` at every start (directories maru creates are `0700` already).
fn make_data_directory_private(data: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(data)
        .with_context(|| format!("read the data directory {}", data.display()))?
        .permissions()
        .mode()
        & 0o777;
    if mode != 0o700 {
        std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700)).with_context(
            || {
                format!(
                    "make the data directory {} private (chmod 700)",
                    data.display()
                )
            },
        )?;
        tracing::info!(data = %data.display(), was = format!("{mode:o}"), "made the data directory private (mode 700)");
    }
    Ok(())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    // A cluster whose JetStream does not sync every write is refused before anything else.
    let sync = match &settings.cluster {
        Some(cluster) => {
            let monitors = cluster.monitors.clone();
            let report = tokio::task::spawn_blocking(move || {
                cluster::check_sync(&monitors, cluster::JOIN_PATIENCE)
            })
            .await?
            .context("cluster mode refused")?;
            tracing::info!(
                servers = report.servers.len(),
                cluster_size = report.cluster_size,
                "cluster: every JetStream server syncs every write"
            );
            Some(report)
        }
        None => None,
    };
    disk::create_dir_all(&disk::OsDisk, &settings.data)
        .with_context(|| format!("create data directory {}", settings.data.display()))?;
    make_data_directory_private(&settings.data)?;
    let files = control::files::NodeFiles::open(disk::Env::os(), &settings.data)?;
    let audit = open_audit(&settings.data)?;
    let identities = Arc::new(
        policy::identity::Identities::open(disk::Env::os(), &settings.data)
            .context("open the identity database")?,
    );
    let policies = Arc::new(
        control::authz::load(&disk::Env::os(), &settings.data)
            .map_err(|e| anyhow::anyhow!("load the Cedar policies: {e}"))?,
    );
    if files.token.created {
        eprintln!(
            "maru: created the control API token {} (kept in {}; the CLI finds it there or in MARU_TOKEN)",
            files.token.value,
            settings.data.join(control::token::TOKEN_FILE).display()
        );
    }
    if files.ingest_token.created {
        eprintln!(
            "maru: created the event ingest token (kept in {}; producers send it over HTTP as a bearer token and over MQTT as the password)",
            settings
                .data
                .join(control::token::INGEST_TOKEN_FILE)
                .display()
        );
    }
    let token = files.token.value.clone();
    let ingest_token = files.ingest_token.value.clone();
    let store = open_store(&settings)?;
    let tls = node_tls(&settings)?;
    let acceptor = |listener: Listener| {
        tls.as_ref()
            .filter(|_| !settings.tls.plain.contains(&listener))
            .map(|t| t.acceptor.clone())
    };
    let ca_pem = match tls.as_ref().and_then(|t| t.ca.as_ref()) {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("read {}", path.display()))?)
        }
        None => None,
    };
    // Where process services find the CA that signed the S3 endpoint's certificate.
    let mut ca_for_processes = tls
        .as_ref()
        .and_then(|t| t.ca.clone())
        .filter(|_| !settings.tls.plain.contains(&Listener::S3));
    // Removed however `serve` ends: a start that fails after this (the cluster refusing,
    // a port taken) left it in the system's temporary directory.
    let mut _sandbox_root = None;
    let sandbox = match settings.process_isolation {
        ProcessIsolation::Landlock => {
            let launcher = std::env::current_exe().context("find maru's own binary")?;
            let mut sandbox = runtime::sandbox::Sandbox::prepare(
                launcher,
                &settings.data,
                &settings.store.volumes,
            )
            .context("prepare the sandbox for process services")?;
            _sandbox_root = Some(RemovedAtExit(sandbox.temporary_root.clone()));
            if let (Some(pem), Some(_)) = (&ca_pem, &ca_for_processes) {
                // The data directory is hidden from them; the CA is public.
                ca_for_processes = Some(
                    sandbox
                        .publish("maru-ca.pem", pem)
                        .context("give process services the node CA")?,
                );
            }
            Some(sandbox)
        }
        ProcessIsolation::None => {
            tracing::warn!(
                "process_isolation = \"none\": process services run unconfined, as maru's user, and can read and change the node's data (its tokens, state and compiled code)"
            );
            None
        }
    };
    let runtime = Runtime::new(settings.runtime).context("start the WebAssembly runtime")?;
    let gateway = Gateway::new(settings.gateway_config.clone());
    let events = Arc::new(events::Events::new(&settings.data.join("events")));
    let pseudonym_key = policy::data::pseudonym_key(&disk::Env::os(), &settings.data)
        .map_err(|e| anyhow::anyhow!("the pseudonym key: {e}"))?;
    let data_guard = Arc::new(policy::data::DataGuard::new(
        policies.clone(),
        audit.clone(),
        settings.labels.clone(),
        pseudonym_key,
    ));
    let publishers = Arc::new(control::data::Publishers::new(
        data_guard.clone(),
        identities.clone(),
        ingest_token.clone(),
    ));
    let gate = events::Gate::Publishers(publishers.clone());
    let objects = Arc::new(control::data::Objects::new(data_guard.clone()));
    gateway.enable_ingest(events.clone(), gate.clone());
    let node = Node::open(
        files,
        store.clone(),
        sandbox,
        runtime,
        gateway.clone(),
        events.clone(),
        control::data::DataPlane {
            guard: data_guard,
            publishers: Some(publishers),
            objects: Some(objects.clone()),
        },
    );

    let gateway_listener = bind(settings.gateway, "gateway", "--gateway").await?;
    let control_listener = bind(settings.control, "control API", "--control").await?;
    let mqtt_listener = bind(settings.mqtt, "MQTT listener", "--mqtt").await?;
    let s3_listener = bind(settings.store.listen, "S3 API", "--s3").await?;
    let gateway_address = gateway_listener.local_addr()?;
    let control_address = control_listener.local_addr()?;
    let mqtt_address = mqtt_listener.local_addr()?;
    let s3_address = s3_listener.local_addr()?;
    let scheme = |listener: Listener| {
        if acceptor(listener).is_some() {
            "https"
        } else {
            "http"
        }
    };
    node.set_s3_endpoint(
        format!("{}://{s3_address}", scheme(Listener::S3)),
        ca_for_processes,
    );
    // After the listeners are bound: process services are told where the S3 API is, and
    // requests that arrive while the apps start wait in the listeners' backlogs. In a
    // cluster, the apps start once the cluster's apps and placement have been read, so a
    // node never runs what the cluster placed elsewhere, not even for a moment.
    if settings.cluster.is_some() {
        node.join_cluster(&settings.identity.name);
        node.hold_reconcile(true);
    } else {
        node.reconcile().await.context("start the deployed apps")?;
    }
    let tls_listeners: Vec<&str> = Listener::ALL
        .into_iter()
        .filter(|l| acceptor(*l).is_some())
        .map(Listener::name)
        .collect();
    let gateway_tls = acceptor(Listener::Gateway).is_some();
    let local = Arc::new(LocalStatus {
        node: node.clone(),
        identity: settings.identity.clone(),
        region: settings.labels.region.clone(),
        gateway: format!("{}://{gateway_address}", scheme(Listener::Gateway)),
        control: format!("{}://{control_address}", scheme(Listener::Control)),
        started_unix_ms: unix_ms(),
        memory_bytes: memory_bytes(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        ca_pem: ca_pem
            .as_ref()
            .filter(|_| gateway_tls)
            .map(|pem| String::from_utf8_lossy(pem).into_owned()),
        serving: std::sync::atomic::AtomicBool::new(false),
    });
    let membership = match (&settings.cluster, &sync) {
        (Some(cluster), Some(sync)) => {
            let membership =
                cluster::Membership::join(&cluster.servers, sync.cluster_size, local.clone())
                    .await
                    .context("join the cluster")?;
            tracing::info!(name = %settings.identity.name, nodes = membership.nodes().len(), "cluster: joined");
            let membership = Arc::new(membership);
            node.set_directory(Arc::new(ClusterDirectory(membership.clone())));
            // Desired state from now on is the cluster's: apps deployed anywhere run here,
            // where the scheduler places them.
            let shared = Arc::new(
                cluster::shared::Shared::open(membership.jetstream(), sync.cluster_size)
                    .await
                    .context("open the cluster's shared apps")?,
            );
            let placements = Arc::new(
                cluster::placement::Placements::open(membership.jetstream(), sync.cluster_size)
                    .await
                    .context("open the cluster's placement")?,
            );
            // Requests forwarded between nodes carry the cluster's key (gateway::peers).
            let key = cluster::forward_key(membership.jetstream(), sync.cluster_size)
                .await
                .context("read the cluster's forwarding key")?;
            gateway.peers().set_key(&key);
            // Topics are the cluster's too: every node ingests into and reads the same
            // streams (before the first reconcile declares any). An edge node keeps its
            // topics on its disk, so that it ingests while its link is down, and forwards
            // them to the cluster's streams.
            if settings.identity.edge {
                let topics = cluster::topics::JetStreamTopics::open_for_forwarding(
                    membership.jetstream(),
                    sync.cluster_size,
                )
                .await
                .context("open the cluster's topics")?;
                events.forward_through(topics, &settings.identity.name);
            } else {
                let topics = cluster::topics::JetStreamTopics::open(
                    membership.jetstream(),
                    sync.cluster_size,
                )
                .await
                .context("open the cluster's topics")?;
                events.share_through(topics);
            }
            node.set_shared(shared.clone());
            shared
                .follow(node.clone())
                .await
                .context("read the cluster's apps")?;
            placements
                .follow(node.clone())
                .await
                .context("read the cluster's placement")?;
            node.hold_reconcile(false);
            node.reconcile().await.context("start the deployed apps")?;
            placements.schedule(node.clone(), membership.clone());
            let (peers, watched, name) = (
                gateway.peers().clone(),
                membership.clone(),
                settings.identity.name.clone(),
            );
            // The node list is read every heartbeat; looked at four times as often, so a
            // node that came back on a new address is reached within a heartbeat of it.
            tokio::spawn(async move {
                let mut every = tokio::time::interval(cluster::HEARTBEAT / 4);
                loop {
                    every.tick().await;
                    let nodes = watched.nodes();
                    peers.set(&name, cluster_peers(&nodes));
                    peers.set_seen(
                        nodes
                            .iter()
                            .map(|n| (n.name.clone(), n.seen_unix_ms))
                            .collect(),
                    );
                    if watched.stopped() {
                        return;
                    }
                }
            });
            Some((membership, shared, placements))
        }
        _ => {
            node.set_directory(Arc::new(LocalDirectory(local.clone())));
            None
        }
    };
    // Written once the node serves what it should (in a cluster: the cluster's apps), so
    // whoever waits for it finds the node ready.
    write_node_file(
        &node.files,
        [gateway_address, control_address, mqtt_address, s3_address],
        &tls_listeners,
        tls.as_ref().and_then(|t| t.ca.as_deref()),
    )?;
    tracing::info!(gateway = %gateway_address, control = %control_address, mqtt = %mqtt_address, s3 = %s3_address, data = %settings.data.display(), "maru is up");

    let shutdown = CancellationToken::new();
    let mut servers = JoinSet::new();
    servers.spawn(gateway.serve(
        gateway_listener,
        acceptor(Listener::Gateway),
        shutdown.clone(),
    ));
    local
        .serving
        .store(true, std::sync::atomic::Ordering::Release);
    if let Some((membership, ..)) = &membership {
        membership.announce_now();
    }
    let mqtt_config = events::mqtt::MqttConfig {
        gate,
        connections_max: settings.mqtt_connections_max,
        ..events::mqtt::MqttConfig::default()
    };
    let mqtt_shutdown = shutdown.clone();
    let mqtt_tls = acceptor(Listener::Mqtt);
    servers.spawn(async move {
        events::mqtt::serve(events, mqtt_listener, mqtt_config, mqtt_tls, mqtt_shutdown).await;
        Ok(())
    });
    let s3 = store::s3::service(
        store.clone(),
        settings.store.limits.clone(),
        &settings.store.domains,
        Some(objects as Arc<dyn store::s3::ObjectGuard>),
    )
    .map_err(|e| anyhow::anyhow!("[store] domains: {e}"))?;
    // S3 clients open a connection per transfer thread (the AWS CLI 10, rclone 4 per file).
    let s3_limits = gateway::ConnectionLimits {
        connections_max: 1024,
        header_read_timeout: settings.gateway_config.header_read_timeout,
        header_bytes_max: 64 * 1024,
        shutdown_grace: settings.gateway_config.shutdown_grace,
    };
    let s3_shutdown = shutdown.clone();
    let s3_tls = acceptor(Listener::S3);
    servers.spawn(async move {
        gateway::serve_connections(s3_listener, s3_limits, s3_tls, s3_shutdown, |_peer| {
            s3.clone()
        })
        .await;
        Ok(())
    });
    let scrub_shutdown = shutdown.clone();
    let (scrub_rate, scrub_interval) = (
        settings.store.scrub_bytes_per_second,
        settings.store.scrub_interval,
    );
    let scrubbed = store.clone();
    servers.spawn(async move {
        store::engine::run_scrub(scrubbed, scrub_rate, scrub_interval, scrub_shutdown).await;
        Ok(())
    });
    let checkpoint_shutdown = shutdown.clone();
    let signer = audit.clone();
    servers.spawn(async move {
        control::audit_api::checkpoints(signer, Duration::from_secs(60), checkpoint_shutdown).await;
        Ok(())
    });
    let api = control::api::router(
        node.clone(),
        token,
        control::api::Guards {
            audit,
            identities,
            policies,
            data: settings.data.clone(),
        },
    );
    let api_shutdown = shutdown.clone();
    let api_config = gateway::ConnectionLimits {
        header_read_timeout: settings.gateway_config.header_read_timeout,
        shutdown_grace: settings.gateway_config.shutdown_grace,
        ..control::listener::default_limits()
    };
    let control_tls = acceptor(Listener::Control);
    servers.spawn(async move {
        control::listener::serve(control_listener, api, api_config, control_tls, api_shutdown)
            .await;
        Ok(())
    });

    // A topic that failed to open (say, its stream could not be made while JetStream was
    // electing) is opened again; meanwhile producers are told to retry (503).
    let reopen = node.clone().reopen_failed_topics(shutdown.clone());
    servers.spawn(async move {
        reopen.await;
        Ok(())
    });

    // Metrics history is saved at shutdown; also every 10 minutes, so a crash loses little.
    let saver_node = node.clone();
    let saver_shutdown = shutdown.clone();
    servers.spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(600));
        every.tick().await;
        loop {
            tokio::select! {
                _ = saver_shutdown.cancelled() => return Ok(()),
                _ = every.tick() => saver_node.save_history(),
            }
        }
    });

    let mut failed = None;
    tokio::select! {
        signal = wait_for_signal() => tracing::info!(signal = signal?, "shutting down: no new connections; finishing requests in flight"),
        Some(joined) = servers.join_next() => failed = Some(joined.map_err(anyhow::Error::from).and_then(|r| r).err().unwrap_or_else(|| anyhow::anyhow!("a server stopped unexpectedly"))),
    }
    shutdown.cancel();
    if let Some((membership, shared, placements)) = &membership {
        placements.stop();
        shared.stop();
        membership.leave().await;
    }
    while let Some(joined) = servers.join_next().await {
        if let Ok(Err(error)) | Err(error) = joined.map_err(anyhow::Error::from) {
            tracing::warn!(%error, "server stopped with an error");
        }
    }
    node.shutdown().await;
    _ = std::fs::remove_file(settings.data.join(NODE_FILE));
    match failed {
        Some(error) => Err(error),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

pub const NODE_FILE: &str = "node.json";

/// A directory removed with everything in it when this is dropped.
struct RemovedAtExit(PathBuf);

impl Drop for RemovedAtExit {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %self.0.display(), %error, "could not remove the instances' temporary root")
            }
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Memory of the machine (MemTotal), bytes; 0 if unknown.
fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// This node as `maru nodes` shows it, and as it announces itself to a cluster.
struct LocalStatus {
    node: Arc<Node>,
    identity: Identity,
    region: String,
    gateway: String,
    control: String,
    started_unix_ms: u64,
    /// The machine's, read once at start.
    memory_bytes: u64,
    cpus: u32,
    /// The CA that signed the gateway's certificate (if it speaks TLS).
    ca_pem: Option<String>,
    /// Set once the node serves what it should.
    serving: std::sync::atomic::AtomicBool,
}

impl cluster::Announce for LocalStatus {
    fn status(&self) -> maru_api::NodeStatus {
        let services = self.node.services();
        // Ready or starting instances of each service, by `app/service`.
        let running: std::collections::BTreeMap<String, u32> = services
            .iter()
            .map(|s| {
                (
                    format!("{}/{}", s.app, s.service),
                    (s.instances_ready + s.instances_starting) as u32,
                )
            })
            .collect();
        maru_api::NodeStatus {
            name: self.identity.name.clone(),
            region: self.region.clone(),
            zone: self.identity.zone.clone(),
            edge: self.identity.edge,
            memory_bytes: self.memory_bytes,
            cpus: self.cpus,
            gateway: self.gateway.clone(),
            control: self.control.clone(),
            services: services.len() as u32,
            instances: running.values().sum(),
            started_unix_ms: self.started_unix_ms,
            seen_unix_ms: unix_ms(),
            // `starting` until the node serves: the scheduler places nothing on it before.
            health: if self.serving.load(std::sync::atomic::Ordering::Acquire) {
                "up".into()
            } else {
                "starting".into()
            },
            version: env!("CARGO_PKG_VERSION").into(),
            scheduler: false,
            draining: false,
            ca_pem: self.ca_pem.clone(),
            running,
        }
    }
}

/// The node list of a node that runs alone: itself.
struct LocalDirectory(Arc<LocalStatus>);

impl control::node::Directory for LocalDirectory {
    fn nodes(&self) -> Vec<maru_api::NodeStatus> {
        vec![cluster::Announce::status(self.0.as_ref())]
    }

    fn drain<'a>(&'a self, _node: &'a str, _drain: bool) -> control::node::Pending<'a, ()> {
        Box::pin(async { Err("this node is not in a cluster".to_string()) })
    }
}

/// Where the other nodes' gateways are, as they announce them.
fn cluster_peers(
    nodes: &[maru_api::NodeStatus],
) -> std::collections::BTreeMap<String, gateway::peers::PeerAddress> {
    nodes
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                gateway::peers::PeerAddress {
                    url: n.gateway.clone(),
                    ca_pem: n.ca_pem.clone(),
                },
            )
        })
        .collect()
}

/// The node list of a cluster member: every node whose announcement stands.
struct ClusterDirectory(Arc<cluster::Membership>);

impl control::node::Directory for ClusterDirectory {
    fn nodes(&self) -> Vec<maru_api::NodeStatus> {
        self.0.nodes()
    }

    fn drain<'a>(&'a self, node: &'a str, drain: bool) -> control::node::Pending<'a, ()> {
        Box::pin(async move {
            self.0
                .set_draining(node, drain)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Where a running node listens, for the CLI and tests to find it.
fn write_node_file(
    files: &control::files::NodeFiles,
    [gateway, control, mqtt, s3]: [SocketAddr; 4],
    tls: &[&str],
    ca: Option<&Path>,
) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "gateway": gateway.to_string(),
        "control": control.to_string(),
        "mqtt": mqtt.to_string(),
        "s3": s3.to_string(),
        "tls": tls,
        "ca": ca.map(|p| p.display().to_string()),
        "pid": std::process::id(),
    });
    files
        .write(NODE_FILE, body.to_string().as_bytes())
        .context("write node.json")
}

/// The node's TLS certificate and acceptor, unless every listener is plain. Says what it
/// made, and warns about plain listeners.
fn node_tls(settings: &Settings) -> anyhow::Result<Option<gateway::tls::NodeTls>> {
    for listener in &settings.tls.plain {
        tracing::warn!(
            listener = listener.name(),
            "serving without TLS ([tls] plain or --plain): anyone on the path can read and change this traffic, tokens included"
        );
    }
    if Listener::ALL.iter().all(|l| settings.tls.plain.contains(l)) {
        return Ok(None);
    }
    let dir = settings.data.join("tls");
    let source = match &settings.tls.own {
        Some((certificate, key)) => gateway::tls::Source::Files { certificate, key },
        None => gateway::tls::Source::NodeCa {
            dir: &dir,
            names: &settings.tls.names,
        },
    };
    let tls = gateway::tls::node_tls(&disk::Env::os(), source)
        .context("set up TLS (docs/node.md#tls)")?;
    for made in &tls.made {
        eprintln!("maru: made {made}");
    }
    Ok(Some(tls))
}

/// Open the object store on its volumes (creating them on first start).
fn open_store(settings: &Settings) -> anyhow::Result<Arc<store::Store>> {
    let config = store::StoreConfig {
        profile: settings.store.profile,
        ..store::StoreConfig::new(settings.data.join("store"), settings.store.volumes.clone())
    };
    let opened = store::Store::open(disk::Env::os(), config).context("open the object store")?;
    if settings.store.default_volumes {
        tracing::warn!(volumes = DEFAULT_VOLUMES, profile = %opened.profile(), "the object store's volumes are directories in the data directory, on one disk: they guard against damaged blocks, not a lost disk; list volumes on separate disks in [store] volumes (docs/store.md)");
    }
    Ok(Arc::new(opened))
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => Ok("SIGTERM"),
        _ = interrupt.recv() => Ok("SIGINT"),
    }
}
