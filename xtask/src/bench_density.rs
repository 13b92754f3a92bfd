//! `cargo xtask bench density`: how many deployed services fit in a node's memory.
//!
//! For each count N: a fresh release `maru up` (with `instances_total_max = N`); its
//! resident memory (VmRSS, after a settle) with nothing deployed; then N copies of
//! `examples/hello` deployed as separate apps at zero instances, through the control API
//! (the component uploaded once; each deploy is a `POST /v1/apps`, as `maru deploy` sends
//! it); resident memory again (per idle service); then one request to each app, which cold
//! starts its instance (time for all); resident memory once more (per warm instance).
//! The same for process services (a small Python HTTP server each, at most 100 by default):
//! their warm instances are processes of their own, so that row reads the proportional set
//! size (PSS) of maru and all its descendants, shared pages counted once.
//! Results go to stdout and `target/bench/density.json`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::env;
use crate::node::MaruNode;

/// Resident memory of `pid`, bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kib * 1024)
}

/// Memory after `settle`, the least of a few readings (allocator caches return): maru's
/// resident memory for components, the proportional set size of maru and its descendants
/// for process services.
fn settled(pid: u32, settle: Duration, kind: Kind) -> anyhow::Result<u64> {
    std::thread::sleep(settle);
    let mut least = u64::MAX;
    for _ in 0..5 {
        least = least.min(match kind {
            Kind::Component => rss(pid)?,
            Kind::Process => pss_with_descendants(pid)?,
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(least)
}

/// Proportional set size of `pid` (its resident memory, with each page shared with other
/// processes counted as its share), bytes.
fn pss(pid: u32) -> anyhow::Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let kib: u64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no Pss in /proc/PID/smaps_rollup")?;
    Ok(kib * 1024)
}

/// Proportional set size of `pid` and every process descended from it, bytes: what the
/// node and its process services hold together, shared pages (the Python interpreter's
/// code) counted once.
fn pss_with_descendants(pid: u32) -> anyhow::Result<u64> {
    let mut parents = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue; // exited meanwhile
        };
        // After the command name in parentheses: state, then the parent's pid.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(parent) = parent {
            parents.insert(child, parent);
        }
    }
    let descends = |mut process: u32| {
        for _ in 0..64 {
            if process == pid {
                return true;
            }
            match parents.get(&process) {
                Some(&parent) if parent != 0 => process = parent,
                _ => return false,
            }
        }
        false
    };
    let mut total = 0;
    for &process in parents.keys() {
        if descends(process) {
            total += pss(process).unwrap_or(0);
        }
    }
    Ok(total)
}

/// What each deployed app runs.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Component,
    Process,
}

/// A small HTTP server in Python, as a process service runs it (its port in PORT).
const PROCESS_SERVER: &str = r#"import http.server, os
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"Hello from a process\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Hello).serve_forever()
"#;

struct Row {
    kind: Kind,
    apps: usize,
    base_rss: u64,
    idle_rss: u64,
    warm_rss: u64,
    deploy_seconds: f64,
    cold_start_seconds: f64,
}

fn measure(maru: &Path, hello: &Path, dir: &Path, apps: usize, kind: Kind) -> anyhow::Result<Row> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("node.toml");
    std::fs::write(&config, format!("[node]\ninstances_total_max = {apps}\n"))?;
    let any = "127.0.0.1:0";
    let mut node = MaruNode::start_with(
        maru,
        &dir.join("data"),
        [any, any, any, any],
        &dir.join("maru.log"),
        &["--config", config.to_str().context("utf-8 path")?],
    )?;
    let pid = node.pid().context("maru is running")?;
    let base_rss = settled(pid, Duration::from_secs(3), kind)?;
    let workdir = dir.join("app");
    std::fs::create_dir_all(&workdir)?;
    std::fs::write(workdir.join("server.py"), PROCESS_SERVER)?;
    let token = std::fs::read_to_string(node.data.join("token"))?
        .trim()
        .to_string();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let bytes = std::fs::read(hello)?;
    let hash = blake3::hash(&bytes).to_hex().to_string();
    let control = format!("http://{}", node.control);
    let uploaded = agent
        .put(format!("{control}/v1/blobs/{hash}"))
        .header("Authorization", format!("Bearer {token}"))
        .send(&bytes[..])?;
    if !uploaded.status().is_success() {
        bail!("uploading hello.wasm failed: {}", uploaded.status());
    }
    let started = Instant::now();
    for i in 0..apps {
        let workload = match kind {
            Kind::Component => "component = \"hello.wasm\"".to_string(),
            Kind::Process => {
                "command = [\"python3\", \"server.py\"]\nworkdir = \".\"\nready = { http = \"/\", timeout = \"30s\" }\nmemory = \"256MiB\"".to_string()
            }
        };
        let manifest = format!(
            "[app]\nname = \"a{i}\"\n\n[service.hello]\n{workload}\nroutes = [\"/a{i}\"]\ninstances = {{ min = 0, max = 1 }}\nidle_timeout = \"1h\"\n"
        );
        let request = match kind {
            Kind::Component => serde_json::json!({
                "manifest_path": format!("a{i}.toml"),
                "manifest": manifest,
                "components": { "hello.wasm": hash },
            }),
            Kind::Process => serde_json::json!({
                "manifest_path": format!("a{i}.toml"),
                "manifest_dir": workdir.to_str().context("utf-8 path")?,
                "manifest": manifest,
                "components": {},
            }),
        };
        let mut response = agent
            .post(format!("{control}/v1/apps"))
            .header("Authorization", format!("Bearer {token}"))
            .send_json(&request)?;
        if !response.status().is_success() {
            bail!(
                "deploying app {i} failed: {}",
                response.body_mut().read_to_string().unwrap_or_default()
            );
        }
        if (i + 1) % 500 == 0 {
            println!(
                "xtask:   {} apps deployed ({:.1} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let deploy_seconds = started.elapsed().as_secs_f64();
    let idle_rss = settled(pid, Duration::from_secs(5), kind)?;
    let started = Instant::now();
    for i in 0..apps {
        let (_, response) = crate::bench::first_byte(&node.gateway, &format!("/a{i}"))?;
        if !response.starts_with("HTTP/1.1 200") {
            bail!(
                "app {i}'s first request: {}",
                response.lines().next().unwrap_or("")
            );
        }
    }
    let cold_start_seconds = started.elapsed().as_secs_f64();
    let warm_rss = settled(pid, Duration::from_secs(5), kind)?;
    node.stop()?;
    Ok(Row {
        kind,
        apps,
        base_rss,
        idle_rss,
        warm_rss,
        deploy_seconds,
        cold_start_seconds,
    })
}

pub fn density(counts: &str, process_apps: usize) -> anyhow::Result<()> {
    let counts: Vec<usize> = counts
        .split(',')
        .filter(|c| !c.trim().is_empty())
        .map(|c| {
            c.trim()
                .parse()
                .context("--apps is a comma-separated list of counts")
        })
        .collect::<Result<_, _>>()?;
    let components = env::build_examples()?;
    let maru = env::build_maru_release()?;
    let hello = components.join("hello.wasm");
    let bench_dir = env::root().join("target/bench/density");
    _ = std::fs::remove_dir_all(&bench_dir);
    let mut rows = Vec::new();
    for &apps in &counts {
        println!("xtask: {apps} apps of examples/hello, each a service at zero instances");
        rows.push(measure(
            &maru,
            &hello,
            &bench_dir.join(format!("n{apps}")),
            apps,
            Kind::Component,
        )?);
    }
    if process_apps > 0 {
        println!(
            "xtask: {process_apps} apps each a process service (python3, a small HTTP server) at zero instances"
        );
        rows.push(measure(
            &maru,
            &hello,
            &bench_dir.join(format!("p{process_apps}")),
            process_apps,
            Kind::Process,
        )?);
    }
    let kib = |b: f64| b / 1024.0;
    println!();
    println!(
        "| service | deployed apps | RSS empty | RSS idle | per idle service | RSS warm | per warm instance | deploy per app | cold-start all |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut json = Vec::new();
    for row in &rows {
        let n = row.apps as f64;
        let per_idle = (row.idle_rss.saturating_sub(row.base_rss)) as f64 / n;
        let per_warm = (row.warm_rss.saturating_sub(row.idle_rss)) as f64 / n;
        println!(
            "| {} | {} | {:.0} MiB | {:.0} MiB | {:.0} KiB | {:.0} MiB | {:.0} KiB | {:.1} ms | {:.2} s |",
            match row.kind {
                Kind::Component => "component",
                Kind::Process => "process (PSS, + its processes)",
            },
            row.apps,
            row.base_rss as f64 / 1048576.0,
            row.idle_rss as f64 / 1048576.0,
            kib(per_idle),
            row.warm_rss as f64 / 1048576.0,
            kib(per_warm),
            row.deploy_seconds * 1000.0 / n,
            row.cold_start_seconds
        );
        json.push(serde_json::json!({
            "kind": match row.kind {
                Kind::Component => "component",
                Kind::Process => "process",
            },
            "apps": row.apps,
            "rss_empty_bytes": row.base_rss,
            "rss_idle_bytes": row.idle_rss,
            "rss_warm_bytes": row.warm_rss,
            "per_idle_service_bytes": per_idle,
            "per_warm_instance_bytes": per_warm,
            "deploy_seconds": row.deploy_seconds,
            "cold_start_all_seconds": row.cold_start_seconds,
        }));
    }
    println!();
    println!("Targets (issue: density): <= 100 KiB per idle service, <= 50 KiB per warm instance.");
    std::fs::write(
        env::root().join("target/bench/density.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}
