//! `cargo xtask demo`: Maru with its example city apps, under a booking stampede.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::env;
use crate::node::{MaruNode, free_or_any, quantile_ms};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Stop after this long in all (e.g. 60s, 2m) instead of serving until Ctrl-C.
    #[arg(long)]
    duration: Option<String>,
    /// Requests in the reservation stampede.
    #[arg(long, default_value_t = 3000)]
    requests: u32,
    /// Concurrent clients in the stampede.
    #[arg(long, default_value_t = 48)]
    clients: u32,
    /// CPU milliseconds each reservation request burns (models real work).
    #[arg(long, default_value_t = 2)]
    work_ms: u32,
}

pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number: u64 = text[..split]
        .parse()
        .with_context(|| format!("`{text}` is not a duration like 60s or 2m"))?;
    Ok(match &text[split..] {
        "s" | "" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        "ms" => Duration::from_millis(number),
        other => bail!("`{other}` is not a duration unit; use ms, s or m"),
    })
}

struct Sample {
    at: Duration,
    ready: u64,
    starting: u64,
    queued: u64,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let duration = args.duration.as_deref().map(parse_duration).transpose()?;
    env::build_examples()?;
    let maru = env::build_maru_release()?;
    let root = env::root();
    let data = root.join("target/demo/data");
    let log = root.join("target/demo/maru.log");
    std::fs::create_dir_all(root.join("target/demo"))?;
    let mut node = MaruNode::start(
        &maru,
        &data,
        &free_or_any(8080),
        &free_or_any(8090),
        &free_or_any(1883),
        &free_or_any(9000),
        &log,
    )?;
    // --duration counts from here, not from before the build, which can take minutes.
    let started = Instant::now();
    println!(
        "\nMaru is up: gateway http://{}  control http://{}  MQTT {}  (log: {})",
        node.gateway,
        node.control,
        node.mqtt,
        log.display()
    );
    println!(
        "(The demo serves plain HTTP and MQTT on loopback, asked for with MARU_PLAIN, so curl and\n mosquitto need no CA. A node serves every listener over TLS by default: docs/node.md#tls.)"
    );
    env::ensure_debian_package("python3", "python3")?;
    for manifest in [
        "examples/hello/maru.toml",
        "examples/reservations/maru.toml",
        "examples/legacy-app/maru.toml",
        "examples/traffic/maru.toml",
    ] {
        print!(
            "{}",
            node.cli(&[
                "deploy",
                root.join(manifest).to_str().context("non-UTF-8 path")?
            ])?
        );
    }
    let hello = ureq::get(&format!("http://{}/hello", node.gateway))
        .call()
        .context("call the hello service")?
        .into_body()
        .read_to_string()?;
    println!("GET /hello → {}", hello.trim());
    let started_legacy = Instant::now();
    let permit = ureq::get(&format!("http://{}/permits/42", node.gateway))
        .call()
        .context("call the permit registry (a Python process service)")?
        .into_body()
        .read_to_string()?;
    println!(
        "GET /permits/42 → {} (the legacy app is a Python process: this first request waited {:.1} s for it to load and pass its readiness probe)",
        permit.trim(),
        started_legacy.elapsed().as_secs_f64()
    );

    println!(
        "\nBooking opens: {} requests from {} clients at the reservations service (each burns {} ms of CPU)…",
        args.requests, args.clients, args.work_ms
    );
    let (samples, results, elapsed) = stampede(&node, &args)?;
    report(&node, &args, &samples, &results, elapsed)?;

    replay_a_day(&node, &root)?;
    let rush_over = Instant::now();

    traffic(&node)?;

    storage(&node)?;

    after_the_rush(&node, rush_over)?;

    println!("\nExplore (in another terminal):");
    println!("  export MARU_DATA={}", data.display());
    println!("  target/release/maru ps                      # services, instances, load, latency");
    println!("  target/release/maru logs reservations/api   # guest output and platform events");
    println!("  target/release/maru apps                    # apps and revisions");
    println!("  target/release/maru events stats            # topics, rates, consumer lag");
    println!("  target/release/maru events tail city.congestion --follow");
    println!("  target/release/maru store status             # volumes, objects, scrub and heal");
    println!(
        "  target/release/maru audit tail               # every control action, who asked and the decision"
    );
    println!(
        "  target/release/maru audit verify             # the hash chain and signed checkpoints"
    );
    println!(
        "  target/release/maru policy show              # the Cedar policies that decide each action"
    );
    println!(
        "  mosquitto_pub -h {} -p {} -u sensor -P $(cat $MARU_DATA/ingest.token) -q 1 -t city/traffic/harbour-gate -m '{{\"loop\":\"x\",\"vehicles\":500,\"at_ms\":0}}'",
        node.mqtt.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h),
        node.mqtt.rsplit_once(':').map_or("1883", |(_, p)| p)
    );
    println!("  curl http://{}/hello", node.gateway);
    println!(
        "  curl -H \"Authorization: Bearer $(cat $MARU_DATA/token)\" http://{}/metrics",
        node.control
    );
    match duration {
        Some(limit) => {
            println!(
                "\nServing until {limit:?} after start-up; watch the instances go back to zero after their idle timeout (reservations, under the predictive policy, keeps what its forecast asked for a minute, ten if its bursts have been coming back within ten, and capacity for forecast errors as large as its stampede's until minutes of calmer ones outweigh them):"
            );
            while started.elapsed() < limit {
                std::thread::sleep(
                    Duration::from_secs(5).min(limit.saturating_sub(started.elapsed())),
                );
                let line: Vec<String> = node
                    .ps()?
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        format!(
                            "{}/{} ready={} starting={}",
                            s["app"].as_str().unwrap_or(""),
                            s["service"].as_str().unwrap_or(""),
                            s["instances_ready"],
                            s["instances_starting"]
                        )
                    })
                    .collect();
                println!(
                    "  t={:>4.0}s  {}",
                    started.elapsed().as_secs_f64(),
                    line.join("  ")
                );
            }
            node.stop()?;
            println!("Stopped after {:.0} s.", started.elapsed().as_secs_f64());
        }
        None => {
            println!("\nServing until Ctrl-C.");
            node.wait()?;
        }
    }
    Ok(())
}

type Results = Vec<(u16, Duration)>;

fn stampede(node: &MaruNode, args: &DemoArgs) -> anyhow::Result<(Vec<Sample>, Results, Duration)> {
    let remaining = AtomicU32::new(args.requests);
    let results = Mutex::new(Vec::with_capacity(args.requests as usize));
    let done = AtomicBool::new(false);
    let samples = Mutex::new(Vec::new());
    let bar = ProgressBar::new(u64::from(args.requests)).with_style(
        ProgressStyle::with_template("  {bar:40} {pos}/{len} requests  {per_sec}  {msg}")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let base = format!("http://{}/reservations", node.gateway);
    let start = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if let Ok(service) = node.service("reservations", "api") {
                    let sample = Sample {
                        at: start.elapsed(),
                        ready: service["instances_ready"].as_u64().unwrap_or(0),
                        starting: service["instances_starting"].as_u64().unwrap_or(0),
                        queued: service["queued"].as_u64().unwrap_or(0),
                    };
                    bar.set_message(format!(
                        "instances: {} ready, {} starting, {} queued",
                        sample.ready, sample.starting, sample.queued
                    ));
                    samples.lock().expect("samples lock").push(sample);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let clients: Vec<_> = (0..args.clients)
            .map(|client| {
                let (remaining, results, bar, base) = (&remaining, &results, &bar, &base);
                scope.spawn(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(30))).build().into();
                    let mut n = 0u32;
                    while remaining.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1)).is_ok() {
                        n += 1;
                        let sent = Instant::now();
                        let url = format!("{base}?work_ms={}", args.work_ms);
                        let response = if n.is_multiple_of(10) {
                            let booking = format!("{{\"slot\":\"2026-12-01T{:02}:{:02}\",\"name\":\"citizen {client}\"}}", n % 24, client % 60);
                            agent.post(&url).header("Content-Type", "application/json").send(booking.as_str())
                        } else {
                            agent.get(&url).call()
                        };
                        let status = match response {
                            Ok(mut response) => {
                                _ = response.body_mut().read_to_string();
                                response.status().as_u16()
                            }
                            Err(_) => 0,
                        };
                        results.lock().expect("results lock").push((status, sent.elapsed()));
                        bar.inc(1);
                    }
                })
            })
            .collect();
        for client in clients {
            _ = client.join();
        }
        done.store(true, Ordering::Relaxed);
    });
    let elapsed = start.elapsed();
    bar.finish_with_message("done");
    Ok((
        samples.into_inner().expect("samples lock"),
        results.into_inner().expect("results lock"),
        elapsed,
    ))
}

fn report(
    node: &MaruNode,
    args: &DemoArgs,
    samples: &[Sample],
    results: &Results,
    elapsed: Duration,
) -> anyhow::Result<()> {
    let mut statuses: BTreeMap<u16, u32> = BTreeMap::new();
    for (status, _) in results {
        *statuses.entry(*status).or_default() += 1;
    }
    let mut latencies: Vec<Duration> = results.iter().map(|(_, latency)| *latency).collect();
    latencies.sort();
    let service = node.service("reservations", "api")?;
    println!("\nReport: reservations/api");
    println!(
        "  {} requests in {:.1} s ({:.0} req/s)",
        results.len(),
        elapsed.as_secs_f64(),
        results.len() as f64 / elapsed.as_secs_f64()
    );
    let shown: Vec<String> = statuses
        .iter()
        .map(|(status, count)| {
            if *status == 0 {
                format!("connection error×{count}")
            } else {
                format!("{status}×{count}")
            }
        })
        .collect();
    println!(
        "  responses: {}   (201 booked, 409 slot already taken)",
        shown.join("  ")
    );
    println!(
        "  latency seen by clients: p50 {:.1} ms, p99 {:.1} ms (includes waiting while instances start)",
        quantile_ms(&latencies, 0.5),
        quantile_ms(&latencies, 0.99)
    );
    println!(
        "  cold starts (scale from zero): {}   instance starts: {}   instance-seconds so far: {:.1}",
        service["cold_starts"],
        service["instance_starts"],
        service["instance_seconds"].as_f64().unwrap_or(0.0)
    );
    let max = service["instances_max"].as_u64().unwrap_or(16).max(1);
    println!("  instances over time (█ ready, ░ starting; max {max}):");
    let step = (samples.len() / 12).max(1);
    for sample in samples.iter().step_by(step) {
        let ready = "█".repeat(sample.ready as usize);
        let starting = "░".repeat(sample.starting as usize);
        println!(
            "    {:>5.1}s {ready}{starting} {} ready, {} starting, {} queued",
            sample.at.as_secs_f64(),
            sample.ready,
            sample.starting,
            sample.queued
        );
    }
    let failures: u32 = statuses
        .iter()
        .filter(|(status, _)| **status == 0 || **status >= 500)
        .map(|(_, count)| count)
        .sum();
    if failures > 0 {
        bail!(
            "{failures} of {} requests failed; see {}",
            args.requests,
            node.data.join("../maru.log").display()
        );
    }
    Ok(())
}

/// Replay a day of the World Cup 1998 trace, compressed to 30 seconds, against the
/// reservations service (which scales with the predictive policy).
fn replay_a_day(node: &MaruNode, root: &std::path::Path) -> anyhow::Result<()> {
    let trace = root.join("../shared/traces/worldcup98-per-second.csv");
    if !trace.exists() {
        println!(
            "\n(No demand trace at {}; skipping the replay of a real day.)",
            trace.display()
        );
        return Ok(());
    }
    println!(
        "\nA real day, compressed: 24 hours of the World Cup 1998 web site's traffic in 30 s against reservations/api (predictive policy)…"
    );
    let url = format!("http://{}/reservations?work_ms=2", node.gateway);
    let out = node.cli(&[
        "replay",
        "--trace",
        trace.to_str().context("non-UTF-8 path")?,
        "--speed",
        "2880",
        "--duration",
        "30s",
        "--url",
        &url,
        "--service",
        "reservations/api",
        "--peak-rps",
        "150",
    ])?;
    print!("{out}");
    Ok(())
}

/// Capacity after the rush: with no more requests for reservations/api, its instances go
/// back to zero once calm minutes outweigh the forecast errors of the stampede and the
/// replayed day (five minutes of them at the normal caution), plus the hold and the idle
/// timeout. Watched for at most ten minutes; printed every 15 s.
fn after_the_rush(node: &MaruNode, rush_over: Instant) -> anyhow::Result<()> {
    const PATIENCE: Duration = Duration::from_secs(600);
    println!(
        "\nAfter the rush: reservations/api has no more requests; its capacity should come back down within minutes (the error margin its stampede taught fades once five minutes of calm show the forecast right again)…"
    );
    let mut last_print: Option<Instant> = None;
    loop {
        let service = node.service("reservations", "api")?;
        let ready = service["instances_ready"].as_u64().unwrap_or(0);
        let starting = service["instances_starting"].as_u64().unwrap_or(0);
        let since = rush_over.elapsed();
        let back = ready + starting == 0;
        if back || last_print.is_none_or(|at| at.elapsed() >= Duration::from_secs(15)) {
            let forecast = service["forecast_requests_per_second"]
                .as_f64()
                .map_or("-".to_string(), |f| format!("{f:.1} req/s"));
            println!(
                "  {:>3.0} s after the last request: {ready} ready, {starting} starting (forecast {forecast})",
                since.as_secs_f64()
            );
            last_print = Some(Instant::now());
        }
        if back {
            println!(
                "  back to zero instances {:.1} minutes after the rush (the stampede's errors stay in the policy's error window for half an hour; calm outweighed them sooner)",
                since.as_secs_f64() / 60.0
            );
            return Ok(());
        }
        if since > PATIENCE {
            bail!(
                "reservations/api still holds {} instances {} minutes after its last request; see `maru ps` and {}",
                ready + starting,
                PATIENCE.as_secs() / 60,
                node.data.join("../maru.log").display()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The loop-detector pipeline: simulated sensors publish ten minutes of vehicle counts over
/// MQTT; the traffic component sums them per intersection and minute, and its congestion
/// flags arrive as events in `city.congestion`.
fn traffic(node: &MaruNode) -> anyhow::Result<()> {
    const INTERSECTIONS: [&str; 6] = [
        "main-and-5th",
        "harbour-gate",
        "station-square",
        "river-bridge",
        "market-street",
        "north-ring",
    ];
    const LOOPS: [&str; 4] = ["north", "south", "east", "west"];
    let token = node.ingest_token()?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let start_ms = (now_ms / 60_000 - 10) * 60_000;
    println!(
        "\nTraffic: {} loop detectors at {} intersections publish 10 minutes of counts over MQTT (every 15 s); harbour-gate jams in minutes 4 to 6…",
        INTERSECTIONS.len() * LOOPS.len(),
        INTERSECTIONS.len()
    );
    let mut sensor = crate::bench_events::mqtt_connect(&node.mqtt, 0, &token)?;
    let mut seed: u64 = 0x7aff1c;
    let mut published = 0;
    let started = Instant::now();
    for tick in 0..40u64 {
        let at_ms = start_ms + tick * 15_000;
        let minute = tick / 4;
        for intersection in INTERSECTIONS {
            let jammed = intersection == "harbour-gate" && (4..=6).contains(&minute);
            for detector in LOOPS {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // About 24 vehicles a minute per loop (96 per intersection); jammed: 48.
                let base = if jammed { 12 } else { 6 };
                let vehicles = base - 2 + seed % 5;
                let payload = format!(
                    "{{\"loop\":\"{detector}\",\"vehicles\":{vehicles},\"at_ms\":{at_ms}}}"
                );
                crate::bench_events::mqtt_publish_to(
                    &mut sensor,
                    format!("city/traffic/{intersection}").as_bytes(),
                    payload.as_bytes(),
                )?;
                published += 1;
            }
        }
    }
    println!(
        "  {published} readings acknowledged (each durable before its PUBACK) in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let waited = Instant::now();
    loop {
        let stats: serde_json::Value =
            serde_json::from_str(&node.cli(&["events", "stats", "--json"])?)?;
        let lag = stats
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["name"] == "city.traffic")
            .and_then(|t| {
                t["groups"]
                    .as_array()?
                    .iter()
                    .find(|g| g["name"] == "traffic.flow")
                    .and_then(|g| g["lag"].as_u64())
            });
        if lag == Some(0) {
            break;
        }
        if waited.elapsed() > Duration::from_secs(60) {
            println!(
                "  the flow service still lags ({lag:?} events) after 60 s; see `maru logs traffic/flow`"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "  the flow service consumed them in batches of up to 100 (CloudEvents) within {:.1} s",
        waited.elapsed().as_secs_f64()
    );
    print!("{}", indent(&node.cli(&["events", "stats"])?));
    println!("  congestion flags (topic city.congestion, also at GET /v1/events/city.congestion):");
    print!(
        "{}",
        indent(&node.cli(&["events", "tail", "city.congestion", "-n", "10"])?)
    );
    Ok(())
}

/// What the apps stored: the bookings in the reservations app's key-value bucket, the
/// traffic archive's hourly objects, and the store's health.
fn storage(node: &MaruNode) -> anyhow::Result<()> {
    println!("\nStorage:");
    let bookings: serde_json::Value = ureq::get(&format!("http://{}/reservations", node.gateway))
        .call()
        .context("list the bookings")?
        .into_body()
        .read_json()?;
    println!(
        "  reservations: {} bookings kept in its key-value bucket (wasi:keyvalue; shared by every instance, kept across restarts)",
        bookings["total"]
    );
    // Wait for the archive to have counted what the sensors sent (it runs beside the flow
    // service, on the same topic).
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(30) {
        let stats: serde_json::Value =
            serde_json::from_str(&node.cli(&["events", "stats", "--json"])?)?;
        let lag = stats
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["name"] == "city.traffic")
            .and_then(|t| {
                t["groups"]
                    .as_array()?
                    .iter()
                    .find(|g| g["name"] == "traffic.archive")
                    .and_then(|g| g["lag"].as_u64())
            });
        if lag == Some(0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "  traffic/archive keeps each hour's counts as an object in bucket traffic-archive (S3 at http://{}; key for it: `maru store keys create --bucket traffic-archive`)",
        node.s3
    );
    println!("  the object store:");
    print!("{}", indent(&node.cli(&["store", "status"])?));
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
