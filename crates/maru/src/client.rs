//! Client commands: talk to a node's control API and print what happened.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use maru_api::{
    ApiError, AppInfo, DeployRequest, DeployResponse, LogsResponse, RemoveResponse,
    RollbackResponse, ServiceStatus,
};
use serde::de::DeserializeOwned;

use crate::Target;

pub(crate) struct Client {
    pub(crate) agent: ureq::Agent,
    base: String,
    token: String,
}

impl Client {
    /// A client with the token to use, in order: `--token` / `MARU_TOKEN`, the CLI's login
    /// for this node (`maru login`), the node's bootstrap token in `DATA/token`.
    pub(crate) fn new(target: &Target) -> anyhow::Result<Self> {
        let mut client = Self::anonymous(target)?;
        client.token = match &target.token {
            Some(token) => token.clone(),
            None => match crate::identity_cli::session_token(&client.base) {
                Some(token) => token,
                None => {
                    let path = target.data.join(control::token::TOKEN_FILE);
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("read the control token from {} (log in with `maru login`, set MARU_TOKEN, or give --data the node's data directory)", path.display()))?
                        .trim()
                        .to_string()
                }
            },
        };
        Ok(client)
    }

    /// A client without a token (for `maru login`).
    pub(crate) fn anonymous(target: &Target) -> anyhow::Result<Self> {
        let node_file = std::fs::read_to_string(target.data.join(crate::up::NODE_FILE))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        let control_tls = node_file.as_ref().is_none_or(|n| {
            n["tls"]
                .as_array()
                .is_some_and(|l| l.iter().any(|v| v == "control"))
        });
        let scheme = if control_tls { "https" } else { "http" };
        let base = match (
            &target.control,
            node_file.as_ref().and_then(|n| n["control"].as_str()),
        ) {
            (Some(explicit), _) => explicit.clone(),
            (None, Some(found)) => format!("{scheme}://{found}"),
            (None, None) => "https://127.0.0.1:8090".to_string(),
        };
        let base = if base.starts_with("http://") || base.starts_with("https://") {
            base
        } else {
            format!("{scheme}://{base}")
        };
        // Trust, in order: --ca / MARU_CA, the node's CA in its data directory, the web's.
        let ca = target
            .ca
            .clone()
            .or_else(|| Some(target.data.join("tls").join("ca.pem")).filter(|p| p.exists()));
        let roots = match &ca {
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("read the CA certificate {}", path.display()))?;
                let certificates = ureq::tls::parse_pem(&pem)
                    .filter_map(|item| match item {
                        Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
                ureq::tls::RootCerts::Specific(std::sync::Arc::new(certificates))
            }
            None => ureq::tls::RootCerts::WebPki,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .provider(ureq::tls::TlsProvider::Rustls)
                    .root_certs(roots)
                    .build(),
            )
            .build()
            .into();
        Ok(Client {
            agent,
            base: base.trim_end_matches('/').to_string(),
            token: String::new(),
        })
    }

    /// The body of a successful answer as text (errors as [`Client::finish`] reports them).
    pub(crate) fn finish_text(
        &self,
        what: &str,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<String> {
        let mut response = response.with_context(|| {
            format!(
                "{what}: cannot reach the control API at {} (is `maru up` running?)",
                self.base
            )
        })?;
        if response.status().is_success() {
            return response
                .body_mut()
                .read_to_string()
                .with_context(|| format!("{what}: read the response"));
        }
        self.finish::<serde_json::Value>(what, Ok(response))
            .map(|v| v.to_string())
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn delete<T: DeserializeOwned>(&self, what: &str, path: &str) -> anyhow::Result<T> {
        self.finish(
            what,
            self.agent
                .delete(self.url(path))
                .header("Authorization", self.auth())
                .call(),
        )
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    pub(crate) fn finish<T: DeserializeOwned>(
        &self,
        what: &str,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<T> {
        let mut response = response.with_context(|| {
            format!(
                "{what}: cannot reach the control API at {} (is `maru up` running?)",
                self.base
            )
        })?;
        let status = response.status();
        let body = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("{what}: read the response"))?;
        if !status.is_success() {
            return Err(match serde_json::from_str::<ApiError>(&body) {
                Ok(api) => {
                    let error = api.error;
                    let mut text = String::new();
                    if let Some(at) = error.location {
                        text.push_str(&format!(
                            "{}:{}:{}: `{}`: ",
                            at.file, at.line, at.column, at.field
                        ));
                    }
                    text.push_str(&error.message);
                    if let Some(hint) = error.hint {
                        text.push_str(&format!("\n  hint: {hint}"));
                    }
                    anyhow::anyhow!("{what} failed ({}): {text}", status.as_u16())
                }
                Err(_) => anyhow::anyhow!("{what} failed ({}): {}", status.as_u16(), body.trim()),
            });
        }
        // An empty answer (204) reads as JSON `null`, which is `()`.
        let body = if body.trim().is_empty() {
            "null"
        } else {
            body.as_str()
        };
        serde_json::from_str(body)
            .with_context(|| format!("{what}: the control API answered with unexpected JSON"))
    }

    pub(crate) fn get<T: DeserializeOwned>(&self, what: &str, path: &str) -> anyhow::Result<T> {
        self.finish(
            what,
            self.agent
                .get(self.url(path))
                .header("Authorization", self.auth())
                .call(),
        )
    }

    pub(crate) fn post<T: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        body: &impl serde::Serialize,
    ) -> anyhow::Result<T> {
        self.finish(
            what,
            self.agent
                .post(self.url(path))
                .header("Authorization", self.auth())
                .send_json(body),
        )
    }
}

pub(crate) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn deploy(target: &Target, manifest_path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(manifest_path)
        .with_context(|| format!("read manifest {}", manifest_path.display()))?;
    let shown = manifest_path.display().to_string();
    let manifest = control::manifest::parse(&shown, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let base = manifest_path.parent().unwrap_or(Path::new("."));
    let client = Client::new(target)?;
    let mut components = BTreeMap::new();
    for (name, service) in &manifest.services {
        let Some(component) = service.component() else {
            continue;
        };
        if components.contains_key(component) {
            continue;
        }
        let path = base.join(component);
        let bytes = std::fs::read(&path).map_err(|error| {
            let hint = Some(format!(
                "the path is relative to the manifest; build the component first (looked for {})",
                path.display()
            ));
            anyhow::anyhow!(
                "{}",
                manifest.error_at(
                    &format!("service.{name}.component"),
                    format!("cannot read component `{component}`: {error}"),
                    hint
                )
            )
        })?;
        let hash = blake3::hash(&bytes).to_hex().to_string();
        let url = client.url(&format!("/v1/blobs/{hash}"));
        let present = client
            .agent
            .head(&url)
            .header("Authorization", client.auth())
            .call()
            .map(|r| r.status().as_u16() == 200)
            .unwrap_or(false);
        if !present {
            if !target.json {
                eprintln!("uploading {component} ({} KiB)", bytes.len() / 1024);
            }
            let response = client
                .agent
                .put(&url)
                .header("Authorization", client.auth())
                .header("Content-Type", "application/wasm")
                .send(&bytes[..]);
            let mut response = response.with_context(|| {
                format!(
                    "upload {component}: cannot reach the control API at {}",
                    client.base
                )
            })?;
            if !response.status().is_success() {
                bail!(
                    "upload {component} failed ({}): {}",
                    response.status(),
                    response.body_mut().read_to_string().unwrap_or_default()
                );
            }
        }
        components.insert(component.to_string(), hash);
    }
    // The node resolves process services' relative paths against this directory.
    let manifest_dir = std::fs::canonicalize(if base.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base
    })
    .ok()
    .map(|dir| dir.display().to_string());
    let request = DeployRequest {
        manifest_path: shown,
        manifest: text,
        manifest_dir,
        components,
    };
    let response: DeployResponse = client.post("deploy", "/v1/apps", &request)?;
    if target.json {
        return print_json(&response);
    }
    if response.changes.is_empty() {
        println!(
            "{}: nothing changed; revision {} keeps serving",
            response.app, response.revision
        );
        return Ok(());
    }
    match response.previous {
        Some(previous) => println!(
            "{}: revision {} now serving (was {previous})",
            response.app, response.revision
        ),
        None => println!(
            "{}: revision {} now serving (new app)",
            response.app, response.revision
        ),
    }
    for change in &response.changes {
        let mark = match change.kind.as_str() {
            "added" => "+",
            "removed" => "-",
            _ => "~",
        };
        let fields = if change.fields.is_empty() {
            String::new()
        } else {
            format!(": {}", change.fields.join(", "))
        };
        println!("  {mark} {} {}{fields}", change.service, change.kind);
    }
    Ok(())
}

pub fn apps(target: &Target) -> anyhow::Result<()> {
    let apps: Vec<AppInfo> = Client::new(target)?.get("list apps", "/v1/apps")?;
    if target.json {
        return print_json(&apps);
    }
    if apps.is_empty() {
        println!("no apps deployed; deploy one with `maru deploy path/to/maru.toml`");
        return Ok(());
    }
    println!(
        "{:<24} {:>8} {:>9}  SERVICES",
        "APP", "REVISION", "REVISIONS"
    );
    for app in apps {
        println!(
            "{:<24} {:>8} {:>9}  {}",
            app.name,
            app.revision,
            app.revisions.len(),
            app.services.join(", ")
        );
    }
    Ok(())
}

pub fn services(target: &Target) -> anyhow::Result<Vec<ServiceStatus>> {
    Client::new(target)?.get("list services", "/v1/services")
}

pub fn nodes(target: &Target) -> anyhow::Result<()> {
    let client = Client::new(target)?;
    let nodes: Vec<maru_api::NodeStatus> = client.get("list nodes", "/v1/nodes")?;
    if target.json {
        return print_json(&nodes);
    }
    println!(
        "{:<20} {:<12} {:<12} {:<5} {:>5} {:>9} {:>9} {:>10} {:<8} {:<10} {:<28}",
        "NODE",
        "REGION",
        "ZONE",
        "EDGE",
        "CPUS",
        "MEMORY",
        "SERVICES",
        "INSTANCES",
        "HEALTH",
        "ROLE",
        "GATEWAY"
    );
    for n in nodes {
        println!(
            "{:<20} {:<12} {:<12} {:<5} {:>5} {:>9} {:>9} {:>10} {:<8} {:<10} {:<28}",
            n.name,
            n.region,
            n.zone,
            if n.edge { "yes" } else { "no" },
            n.cpus,
            format!("{:.1} GiB", n.memory_bytes as f64 / f64::from(1u32 << 30)),
            n.services,
            n.instances,
            if n.draining { "draining" } else { &n.health },
            if n.scheduler { "scheduler" } else { "-" },
            n.gateway
        );
    }
    Ok(())
}

/// How long `maru drain` waits for a node's instances to move.
const DRAIN_WAIT: Duration = Duration::from_secs(120);

/// How long after `maru drain` asked a node's announcement must be before its instance
/// count says it is drained.
const DRAIN_SETTLE_MS: u64 = 2_000;

pub fn drain(target: &Target, node: &str, undo: bool, no_wait: bool) -> anyhow::Result<()> {
    let client = Client::new(target)?;
    let path = format!("/v1/nodes/{node}/drain");
    let auth = client.auth();
    let asked_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let response = if undo {
        (client.agent.delete(client.url(&path)))
            .header("Authorization", &auth)
            .call()
    } else {
        (client.agent.put(client.url(&path)))
            .header("Authorization", &auth)
            .send_empty()
    };
    client.finish_text(
        if undo {
            "stop draining the node"
        } else {
            "drain the node"
        },
        response,
    )?;
    if undo {
        println!("{node}: no longer draining; the scheduler may place instances on it again");
        return Ok(());
    }
    println!("{node}: draining; the scheduler moves its instances to other nodes");
    if no_wait {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut last = None;
    loop {
        let nodes: Vec<maru_api::NodeStatus> = client.get("list nodes", "/v1/nodes")?;
        let Some(status) = nodes.iter().find(|n| n.name == node) else {
            println!("{node}: no longer listed (stopped, or its announcement expired)");
            return Ok(());
        };
        if last != Some(status.instances) {
            println!("{node}: {} instances left", status.instances);
            last = Some(status.instances);
        }
        // Counted only from an announcement made after the scheduler has had time to move
        // the node's shares (it looks every 500 ms) and the node to apply that: before, a
        // node running nothing at the moment could still be given work.
        let settled = status.draining && status.seen_unix_ms >= asked_unix_ms + DRAIN_SETTLE_MS;
        if status.instances == 0 && settled {
            println!("{node}: drained");
            return Ok(());
        }
        if started.elapsed() > DRAIN_WAIT {
            anyhow::bail!(
                "{node} still runs {} instances after {} s: they are busy with long requests, or belong to apps deployed on it before it joined the cluster (those stay); `maru ps` on it shows which",
                status.instances,
                DRAIN_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

pub fn ps(target: &Target) -> anyhow::Result<()> {
    let services = self::services(target)?;
    if target.json {
        return print_json(&services);
    }
    if services.is_empty() {
        println!("no services running");
        return Ok(());
    }
    println!(
        "{:<28} {:<24} {:>4} {:>9} {:>5} {:>6} {:>6} {:>8} {:>18} {:>8} {:>8} {:>16} {:>5} {:>9} {:>10}",
        "SERVICE",
        "KIND/POLICY",
        "REV",
        "READY",
        "START",
        "FLIGHT",
        "QUEUED",
        "REQ/S",
        "FORECAST",
        "P50 ms",
        "P99 ms",
        "SLO MET",
        "COLD",
        "INST-S",
        "STARTUP ms"
    );
    for s in services {
        println!(
            "{:<28} {:<24} {:>4} {:>9} {:>5} {:>6} {:>6} {:>8.1} {:>18} {:>8.2} {:>8.2} {:>16} {:>5} {:>9.1} {:>10}",
            format!("{}/{}", s.app, s.service),
            format!("{} {}", s.kind, s.policy),
            s.revision,
            format!("{}/{}", s.instances_ready, s.instances_max),
            s.instances_starting,
            s.in_flight,
            s.queued,
            s.requests_per_second,
            match (s.forecast_requests_per_second, &s.forecaster) {
                (Some(f), Some(by)) => format!("{f:.1} ({by})"),
                (Some(f), None) => format!("{f:.1}"),
                (None, _) => "-".into(),
            },
            s.latency_p50_ms,
            s.latency_p99_ms,
            slo_met(s.slo_ms, s.slo_met_percent),
            s.cold_starts,
            s.instance_seconds,
            s.startup_last_ms
                .map(|ms| format!("{ms:.1}"))
                .unwrap_or_else(|| "-".into())
        );
        if let Some(failure) = &s.failure {
            println!("  FAILED: {failure}");
        }
        if let Some(placement) = &s.placement {
            println!("  placement: {placement}");
        }
    }
    Ok(())
}

/// `maru ps`'s SLO column: "99.95% <=200ms", "- <=200ms" before any request, "-" without an
/// SLO.
fn slo_met(slo_ms: Option<f64>, met_percent: Option<f64>) -> String {
    match (slo_ms, met_percent) {
        (Some(slo), Some(met)) => format!("{met:.2}% <={slo}ms"),
        (Some(slo), None) => format!("- <={slo}ms"),
        _ => "-".into(),
    }
}

pub fn logs(target: &Target, service: &str, follow: bool) -> anyhow::Result<()> {
    let client = Client::new(target)?;
    let (app, name) = match service.split_once('/') {
        Some((app, name)) => (app.to_string(), name.to_string()),
        None => {
            let services: Vec<ServiceStatus> = client.get("list services", "/v1/services")?;
            let matching: Vec<&ServiceStatus> =
                services.iter().filter(|s| s.service == service).collect();
            match matching.as_slice() {
                [one] => (one.app.clone(), one.service.clone()),
                [] => bail!(
                    "no running service is named `{service}`; `maru ps` lists them (use APP/SERVICE for a stopped one)"
                ),
                many => bail!(
                    "`{service}` is ambiguous: {}; name it as APP/SERVICE",
                    many.iter()
                        .map(|s| format!("{}/{}", s.app, s.service))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    let mut after = 0;
    loop {
        let page: LogsResponse =
            client.get("read logs", &format!("/v1/logs/{app}/{name}?after={after}"))?;
        let mut out = std::io::stdout().lock();
        for line in &page.lines {
            if target.json {
                writeln!(out, "{}", serde_json::to_string(line)?)?;
            } else {
                writeln!(
                    out,
                    "{} {:<6} {}",
                    clock(line.unix_ms),
                    line.stream,
                    line.text
                )?;
            }
        }
        out.flush()?;
        after = page.next;
        if !follow {
            return Ok(());
        }
        if page.lines.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// UTC wall-clock time of day with milliseconds.
fn clock(unix_ms: u64) -> String {
    let day_ms = unix_ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

pub fn remove(target: &Target, app: &str) -> anyhow::Result<()> {
    let client = Client::new(target)?;
    let response: RemoveResponse = client.finish(
        "remove app",
        client
            .agent
            .delete(client.url(&format!("/v1/apps/{app}")))
            .header("Authorization", client.auth())
            .call(),
    )?;
    if target.json {
        return print_json(&response);
    }
    println!(
        "{}: removed; stopped {}",
        response.app,
        if response.services_stopped.is_empty() {
            "no services".into()
        } else {
            response.services_stopped.join(", ")
        }
    );
    Ok(())
}

pub fn rollback(target: &Target, app: &str) -> anyhow::Result<()> {
    let response: RollbackResponse = Client::new(target)?.post(
        "roll back",
        &format!("/v1/apps/{app}/rollback"),
        &serde_json::json!({}),
    )?;
    if target.json {
        return print_json(&response);
    }
    println!(
        "{}: revision {} now serving (rolled back from {})",
        response.app, response.to, response.from
    );
    Ok(())
}

pub fn anomalies(target: &Target) -> anyhow::Result<()> {
    let anomalies: Vec<maru_api::AnomalyInfo> =
        Client::new(target)?.get("list anomalies", "/v1/anomalies")?;
    if target.json {
        return print_json(&anomalies);
    }
    if anomalies.is_empty() {
        println!("no anomalies found");
        return Ok(());
    }
    println!(
        "{:<12} {:<28} {:<8} {:>12} {:>12}  DIRECTION",
        "TIME (UTC)", "SERVICE", "SIGNAL", "VALUE", "EXPECTED"
    );
    for a in anomalies {
        println!(
            "{:<12} {:<28} {:<8} {:>12.3} {:>12.3}  {}",
            clock(a.unix_ms),
            format!("{}/{}", a.app, a.service),
            a.signal,
            a.value,
            a.expected,
            a.direction
        );
    }
    Ok(())
}

pub fn events_stats(target: &Target) -> anyhow::Result<()> {
    let topics: Vec<maru_api::TopicInfo> = Client::new(target)?.get("list topics", "/v1/events")?;
    if target.json {
        return print_json(&topics);
    }
    if topics.is_empty() {
        println!("no topics; declare one in an app manifest with [topic.\"NAME\"]");
        return Ok(());
    }
    println!(
        "{:<28} {:>12} {:>12} {:>10} {:>10} {:>9}  GROUPS (committed, lag)",
        "TOPIC", "EVENTS", "NEXT", "SIZE", "PER SEC", "PER SYNC"
    );
    for topic in topics {
        let groups: Vec<String> = topic
            .groups
            .iter()
            .map(|g| format!("{} ({}, lag {})", g.name, g.committed, g.lag))
            .collect();
        // Events each fdatasync carried since maru started: how well group commit shares them.
        let per_sync = if topic.syncs_total == 0 {
            "-".to_string()
        } else {
            format!(
                "{:.1}",
                topic.appended_total as f64 / topic.syncs_total as f64
            )
        };
        println!(
            "{:<28} {:>12} {:>12} {:>10} {:>10.1} {:>9}  {}{}",
            topic.name,
            topic.next_offset - topic.first_offset,
            topic.next_offset,
            control::manifest::format_size(topic.bytes),
            topic.per_second,
            per_sync,
            if groups.is_empty() {
                "-".to_string()
            } else {
                groups.join(", ")
            },
            topic
                .broken
                .map(|why| format!("  BROKEN: {why}"))
                .unwrap_or_default()
        );
        if !topic.lost.is_empty() {
            let ranges: Vec<String> = topic
                .lost
                .iter()
                .map(|[start, end]| format!("{start}..{end}"))
                .collect();
            println!("{:<28} LOST (cannot be read): {}", "", ranges.join(", "));
        }
    }
    Ok(())
}

pub fn events_tail(
    target: &Target,
    topic: &str,
    from: Option<u64>,
    count: usize,
    follow: bool,
) -> anyhow::Result<()> {
    let client = Client::new(target)?;
    let mut path = match from {
        Some(from) => format!("/v1/events/{topic}?from={from}&limit=1000"),
        None => format!("/v1/events/{topic}?limit={}", count.clamp(1, 10_000)),
    };
    loop {
        let page: maru_api::EventsResponse = client.get("read events", &path)?;
        for event in &page.events {
            if target.json {
                println!("{}", serde_json::to_string(event)?);
            } else {
                let data = event.data.clone().unwrap_or_else(|| {
                    format!("base64:{}", event.data_base64.clone().unwrap_or_default())
                });
                println!(
                    "{:>10} {} {:<20} {}",
                    event.offset,
                    clock(event.unix_ms),
                    if event.key.is_empty() {
                        "-"
                    } else {
                        &event.key
                    },
                    data
                );
            }
        }
        path = format!("/v1/events/{topic}?from={}&limit=1000", page.next);
        if !follow {
            return Ok(());
        }
        if page.events.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
}
