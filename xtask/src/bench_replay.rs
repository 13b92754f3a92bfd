//! `cargo xtask bench replay`: a real trace, time-compressed, replayed live against a process
//! service scaled by a policy; then `maru sim` on exactly the load the replay sent, with the
//! start-up time measured live; and the two compared.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::env;
use crate::node::MaruNode;

/// Time one request holds an instance (the legacy app's `WAIT_MS`), and the app's data
/// loading before it listens (`STARTUP_MS`).
const SERVICE_MS: u32 = 100;
const STARTUP_MS: u32 = 2000;

pub fn replay(
    policy: &str,
    knob: f64,
    minutes: u32,
    speed: f64,
    peak_rps: f64,
) -> anyhow::Result<()> {
    if minutes == 0 || speed <= 0.0 || peak_rps <= 0.0 {
        bail!("--minutes, --speed and --peak-rps must be more than zero");
    }
    let scaling = match policy {
        "predictive" => format!("{{ policy = \"predictive\", caution = {knob} }}"),
        "hpa" | "kpa" | "aws-predictive" => format!("{{ policy = \"{policy}\", target = {knob} }}"),
        "reactive" => "{ policy = \"reactive\" }".to_string(),
        other => bail!(
            "`{other}` cannot be replayed live; use predictive, hpa, kpa, aws-predictive or reactive"
        ),
    };
    let root = env::root();
    let trace = root.join("../shared/traces/worldcup98-per-second.csv");
    if !trace.exists() {
        bail!(
            "no trace at {}; the replay needs the shared World Cup 1998 trace",
            trace.display()
        );
    }
    let maru = env::build_maru_release()?;
    let dir = root.join("target/bench/replay");
    std::fs::create_dir_all(&dir)?;
    let mut node = MaruNode::start_in(&maru, &dir)?;
    let result = (|| {
        let manifest = dir.join("replay.toml");
        let app_dir = root.join("examples/legacy-app");
        std::fs::write(
            &manifest,
            format!(
                "[app]\nname = \"replay\"\n\n[service.registry]\ncommand = [\"python3\", \"app.py\"]\nworkdir = \"{}\"\nroutes = [\"/permits\"]\ninstances = {{ min = 0, max = 40 }}\nconcurrency = 1\nidle_timeout = \"30s\"\ntimeout = \"10s\"\nenv = {{ WAIT_MS = \"{SERVICE_MS}\", STARTUP_MS = \"{STARTUP_MS}\" }}\nready = {{ http = \"/healthz\", timeout = \"30s\" }}\nscaling = {scaling}\n",
                app_dir.display()
            ),
        )?;
        node.cli(&["deploy", manifest.to_str().context("non-UTF-8 path")?])?;
        println!(
            "Replaying {minutes} minutes of the World Cup 1998 trace at {speed}x (peak {peak_rps} req/s) against a process service (each request holds an instance {SERVICE_MS} ms; start-up {STARTUP_MS} ms + Python), policy {policy} {scaling}…"
        );
        let url = format!("http://{}/permits/1", node.gateway);
        let started = Instant::now();
        let report = std::thread::scope(|scope| -> anyhow::Result<serde_json::Value> {
            let replay = scope.spawn(|| {
                node.cli(&[
                    "replay",
                    "--trace",
                    trace.to_str().context("non-UTF-8 path")?,
                    "--speed",
                    &speed.to_string(),
                    "--duration",
                    &format!("{minutes}m"),
                    "--url",
                    &url,
                    "--service",
                    "replay/registry",
                    "--peak-rps",
                    &peak_rps.to_string(),
                    "--json",
                ])
            });
            // Progress: every 30 s, where the replay and the service are.
            let mut next_report = Duration::from_secs(30);
            while !replay.is_finished() {
                std::thread::sleep(Duration::from_millis(200));
                let elapsed = started.elapsed();
                if elapsed >= next_report {
                    next_report += Duration::from_secs(30);
                    let elapsed = elapsed.as_secs();
                    if let Ok(service) = node.service("replay", "registry") {
                        println!(
                            "  {:>3}:{:02} of {minutes}:00  {:>5.1} req/s  forecast {}  ready {}  starting {}",
                            elapsed / 60,
                            elapsed % 60,
                            service["requests_per_second"].as_f64().unwrap_or_default(),
                            service["forecast_requests_per_second"]
                                .as_f64()
                                .map_or("-".to_string(), |f| format!("{f:.1}")),
                            service["instances_ready"],
                            service["instances_starting"],
                        );
                    }
                }
            }
            let out = replay
                .join()
                .map_err(|_| anyhow::anyhow!("the replay thread panicked"))??;
            serde_json::from_str(&out).context("maru replay --json output")
        })?;
        let startup = mean_startup(&node)?;
        let rates: Vec<String> = report["rates"]
            .as_array()
            .context("replay report without rates")?
            .iter()
            .map(|r| format!("{:.3}", r.as_f64().unwrap_or_default()))
            .collect();
        // A per-second trace of what the replay sent (the simulator picks the format by name).
        let sent = dir.join("sent-per-second.txt");
        std::fs::write(&sent, rates.join(" "))?;
        let peak_instances = (peak_rps * f64::from(SERVICE_MS) / 1000.0).ceil().max(1.0);
        let sim = |startup: Duration| -> anyhow::Result<serde_json::Value> {
            let output = std::process::Command::new(&maru)
                .args([
                    "sim",
                    "--trace",
                    sent.to_str().context("non-UTF-8 path")?,
                    "--policy",
                    policy,
                    "--startup",
                    &format!("{}ms", startup.as_millis()),
                    "--service-time",
                    &format!("{SERVICE_MS}ms"),
                    "--concurrency",
                    "1",
                    "--peak-instances",
                    &peak_instances.to_string(),
                    "--slo",
                    "2s",
                    "--warm-up",
                    "0",
                    "--json",
                ])
                .output()
                .context("run maru sim")?;
            if !output.status.success() {
                bail!(
                    "maru sim failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            let report: serde_json::Value =
                serde_json::from_slice(&output.stdout).context("maru sim --json output")?;
            report["rows"]
                .as_array()
                .and_then(|rows| rows.first())
                .cloned()
                .context("maru sim reported no row")
        };
        // The simulator decides at the end of 1 s steps, so its effective start-up is up to
        // a second longer than the one given: both bounds are shown.
        let slow = sim(startup)?;
        let fast = sim(startup.saturating_sub(Duration::from_secs(1)))?;
        let live_availability = report["availability"].as_f64().unwrap_or_default() * 100.0;
        let live_instance_seconds = report["instance_seconds"].as_f64().unwrap_or_default();
        println!(
            "\n{} real seconds, {} requests; instance start-up measured live: mean {} ms\n",
            report["seconds"],
            report["requests"],
            startup.as_millis()
        );
        println!("| | availability (<= 2 s) | instance-seconds | cold starts |");
        println!("|---|---|---|---|");
        println!(
            "| live replay | {live_availability:.2} % | {live_instance_seconds:.0} | {} |",
            report["cold_starts"]
        );
        for (label, row) in [
            (
                format!("`maru sim`, start-up {} ms", startup.as_millis()),
                &slow,
            ),
            (
                format!(
                    "`maru sim`, start-up {} ms",
                    startup.saturating_sub(Duration::from_secs(1)).as_millis()
                ),
                &fast,
            ),
        ] {
            println!(
                "| {label} | {:.2} % | {:.0} | {} |",
                row["availability"].as_f64().unwrap_or_default() * 100.0,
                row["instance_seconds"].as_f64().unwrap_or_default(),
                row["cold_starts"]
            );
        }
        let gaps: Vec<(f64, f64)> = [&slow, &fast]
            .iter()
            .map(|row| {
                (
                    (live_availability - row["availability"].as_f64().unwrap_or_default() * 100.0)
                        .abs(),
                    live_instance_seconds / row["instance_seconds"].as_f64().unwrap_or(f64::NAN),
                )
            })
            .collect();
        let span = |a: f64, b: f64, digits: usize| {
            let (low, high) = (a.min(b), a.max(b));
            if format!("{low:.digits$}") == format!("{high:.digits$}") {
                format!("{low:.digits$}")
            } else {
                format!("{low:.digits$}-{high:.digits$}")
            }
        };
        println!(
            "\nAvailability differs by {} points (goal: within 0.5); live instance-seconds are {}x the simulation's (goal: within 10 %).",
            span(gaps[0].0, gaps[1].0, 2),
            span(gaps[0].1, gaps[1].1, 2),
        );
        Ok(())
    })();
    node.stop()?;
    result
}

/// Mean start-to-ready time of the service's instances, from /metrics.
fn mean_startup(node: &MaruNode) -> anyhow::Result<Duration> {
    let token =
        std::fs::read_to_string(node.data.join("token")).context("read the control token")?;
    let metrics = ureq::get(&format!("http://{}/metrics", node.control))
        .header("Authorization", &format!("Bearer {}", token.trim()))
        .call()
        .context("GET /metrics")?
        .body_mut()
        .read_to_string()
        .context("read /metrics")?;
    let value = |name: &str| {
        metrics
            .lines()
            .find(|line| line.starts_with(name) && line.contains("app=\"replay\""))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    match (
        value("maru_instance_startup_seconds_sum"),
        value("maru_instance_startup_seconds_count"),
    ) {
        (Some(sum), Some(count)) if count > 0.0 => Ok(Duration::from_secs_f64(sum / count)),
        _ => bail!("no instance of replay/registry was started; nothing to compare"),
    }
}
