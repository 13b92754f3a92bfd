//! `cargo xtask bench …`: each benchmark runs Maru and its baseline in the same run on the
//! same machine and prints the ratio. Results go into BENCHMARKS.md by hand, with the date.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::env;
use crate::node::{MaruNode, quantile_ms};

const WASMTIME_VERSION: &str = "48.0.8";

#[derive(clap::Subcommand)]
pub enum Which {
    /// Throughput and latency of Maru against `wasmtime serve` on examples/hello, and the
    /// cold-start overhead against a bare wasmtime instantiate-and-call.
    Gateway {
        /// Seconds of load per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Open connections held by the load generator.
        #[arg(long, default_value_t = 32)]
        connections: u32,
        /// Alternating rounds (Maru, wasmtime serve, Maru, …).
        #[arg(long, default_value_t = 2)]
        rounds: u32,
    },
    /// Durable event ingest (1 KiB, fsync before ack) against nats-server -js and against a
    /// raw write + fdatasync loop.
    Events {
        /// Seconds of load per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Producers, each with one connection, each waiting for its ack before the next send.
        #[arg(long, default_value_t = 64)]
        producers: u32,
        /// Alternating rounds of every system; the median round and the median of the
        /// per-round ratios are reported.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
    /// A compressed real trace (World Cup 1998) replayed live against a process service
    /// scaled by a policy, then `maru sim` on the load the replay sent with the start-up
    /// time measured live: do the live platform and the simulator agree?
    Replay {
        /// The policy the service scales with: predictive, hpa, kpa, aws-predictive or
        /// reactive.
        #[arg(long, default_value = "predictive")]
        policy: String,
        /// Its knob: caution for predictive (0.05 cautious to 1.0 bold), target utilisation
        /// for the others; the simulator's default for each.
        #[arg(long)]
        knob: Option<f64>,
        /// Minutes of real time to replay.
        #[arg(long, default_value_t = 10)]
        minutes: u32,
        /// Trace seconds per real second (288: two days of the trace in ten minutes).
        #[arg(long, default_value_t = 288.0)]
        speed: f64,
        /// Requests per second in the trace's busiest (compressed) second.
        #[arg(long, default_value_t = 80.0)]
        peak_rps: f64,
    },
    /// What the control API's guard (token, Cedar decision, synced audit entry) costs per
    /// call: `GET /v1/whoami` against the unguarded `GET /v1/health` on the same node.
    Control {
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        #[arg(long, default_value_t = 16)]
        clients: u32,
        #[arg(long, default_value_t = 2)]
        rounds: u32,
    },
    /// Resident memory per deployed idle service and per warm instance, deploy time per app
    /// and the time to cold-start them all, for N copies of examples/hello, and for process
    /// services.
    Density {
        /// Counts of apps to deploy, comma-separated (a fresh node for each).
        #[arg(long, default_value = "1000,5000")]
        apps: String,
        /// Process services (a small Python HTTP server each) for the process row; 0 skips
        /// it.
        #[arg(long, default_value_t = 100)]
        process_apps: usize,
    },
    /// Object PUT and GET through the S3 API against the disk's raw sequential bandwidth,
    /// and the per-core speed of erasure coding, encryption and hashing.
    Store {
        /// Clients sending at once.
        #[arg(long, default_value_t = 4)]
        clients: u32,
    },
    /// Requests and durable events per second through three cluster nodes (with three NATS
    /// servers) against one node alone, and forwarded between gateways against served
    /// directly.
    Cluster {
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        #[arg(long, default_value_t = 32)]
        connections: u32,
        /// Event producers over HTTP (each waits for its 202 before the next event), split
        /// over the nodes' gateways.
        #[arg(long, default_value_t = 64)]
        producers: u32,
        #[arg(long, default_value_t = 2)]
        rounds: u32,
    },
    /// Every scaling policy on every shared trace, each tuned on the first 70 % to the
    /// cheapest setting holding 99.9 % availability, reported on the last 30 %, for several
    /// instance start-up times. Prints a Markdown table for BENCHMARKS.md.
    Autoscale {
        /// Start-up times to sweep, comma-separated.
        #[arg(long, default_value = "1s,30s,120s")]
        startups: String,
        /// Simulate at most this many days of each trace (the long per-second traces would
        /// otherwise take hours to tune).
        #[arg(long, default_value_t = 7.0)]
        limit_days: f64,
        /// Only traces whose file name contains this.
        #[arg(long)]
        only: Option<String>,
    },
}

pub fn run(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Store { clients } => crate::bench_store::store(clients),
        Which::Cluster {
            seconds,
            connections,
            producers,
            rounds,
        } => crate::bench_cluster::cluster(seconds, connections, producers, rounds),
        Which::Density { apps, process_apps } => crate::bench_density::density(&apps, process_apps),
        Which::Control {
            seconds,
            clients,
            rounds,
        } => crate::bench_control::control(seconds, clients, rounds),
        Which::Gateway {
            seconds,
            connections,
            rounds,
        } => gateway(seconds, connections, rounds),
        Which::Events {
            seconds,
            producers,
            rounds,
        } => crate::bench_events::events(seconds, producers, rounds),
        Which::Autoscale {
            startups,
            limit_days,
            only,
        } => autoscale(&startups, limit_days, only.as_deref()),
        Which::Replay {
            policy,
            knob,
            minutes,
            speed,
            peak_rps,
        } => {
            // The simulator's defaults (autopilot::evaluate::default_knob), so that the
            // live service and `maru sim` run the same setting.
            let knob = knob.unwrap_or(match policy.as_str() {
                "kpa" => 0.7,
                _ => 0.5,
            });
            crate::bench_replay::replay(&policy, knob, minutes, speed, peak_rps)
        }
    }
}

fn wasmtime_cli() -> anyhow::Result<PathBuf> {
    let root = env::root().join(format!("target/tools/wasmtime-{WASMTIME_VERSION}"));
    let binary = root.join("bin/wasmtime");
    if binary.exists() {
        return Ok(binary);
    }
    eprintln!(
        "xtask: installing wasmtime-cli {WASMTIME_VERSION} into {} (once; this takes a while)",
        root.display()
    );
    env::run(
        Command::new(env::cargo_bin())
            .args([
                "install",
                "wasmtime-cli",
                "--locked",
                "--version",
                WASMTIME_VERSION,
                "--root",
            ])
            .arg(&root),
    )?;
    Ok(binary)
}

pub(crate) struct Load {
    pub(crate) requests_per_second: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) errors: u64,
}

impl Load {
    /// The mean of each figure over `runs` (errors summed).
    pub(crate) fn mean(runs: &[Load]) -> Load {
        let n = runs.len().max(1) as f64;
        let mean = |f: fn(&Load) -> f64| runs.iter().map(f).sum::<f64>() / n;
        Load {
            requests_per_second: mean(|l| l.requests_per_second),
            p50_ms: mean(|l| l.p50_ms),
            p99_ms: mean(|l| l.p99_ms),
            errors: runs.iter().map(|l| l.errors).sum(),
        }
    }

    /// `req/s  p50  p99` as the summary prints it.
    pub(crate) fn row(&self) -> String {
        format!(
            "{:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
            self.requests_per_second, self.p50_ms, self.p99_ms
        )
    }
}

pub(crate) fn wrk(url: &str, seconds: u32, connections: u32) -> anyhow::Result<Load> {
    let output = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            url,
        ])
        .output()
        .context("run wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let find = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
            .map(str::to_string)
    };
    let latency_ms = |value: &str| -> anyhow::Result<f64> {
        let split = value
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(value.len());
        let number: f64 = value[..split]
            .parse()
            .with_context(|| format!("wrk latency `{value}`"))?;
        Ok(match &value[split..] {
            "us" => number / 1000.0,
            "ms" => number,
            "s" => number * 1000.0,
            other => bail!("wrk latency unit `{other}`"),
        })
    };
    let errors = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum::<u64>()
        + if text.contains("Socket errors") { 1 } else { 0 };
    Ok(Load {
        requests_per_second: find("Requests/sec:")
            .context("wrk printed no Requests/sec")?
            .parse()?,
        p50_ms: latency_ms(&find("50%").context("wrk printed no 50% latency")?)?,
        p99_ms: latency_ms(&find("99%").context("wrk printed no 99% latency")?)?,
        errors,
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One GET over a fresh connection; returns the time from sending to the first response
/// byte, and the whole response.
pub(crate) fn first_byte(address: &str, path: &str) -> anyhow::Result<(Duration, String)> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let sent = Instant::now();
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut first = [0u8; 1];
    stream.read_exact(&mut first)?;
    let elapsed = sent.elapsed();
    let mut rest = String::new();
    stream.read_to_string(&mut rest)?;
    Ok((elapsed, format!("{}{rest}", first[0] as char)))
}

fn status_and_body(response: &str) -> (String, String) {
    let status = response.lines().next().unwrap_or("").to_string();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    // Both servers may chunk the body; compare the payload, not the framing.
    let payload: String = if response
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 || after.len() < size {
                break;
            }
            out.push_str(&after[..size]);
            rest = after[size..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_string()
    };
    (status, payload)
}

fn wait_listening(address: &str, child: &mut Child) -> anyhow::Result<()> {
    let started = Instant::now();
    while TcpStream::connect(address).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("the server exited ({status}) before listening on {address}");
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("nothing listened on {address} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn gateway(seconds: u32, connections: u32, rounds: u32) -> anyhow::Result<()> {
    env::ensure_debian_package("wrk", "wrk")?;
    let wasmtime = wasmtime_cli()?;
    let components = env::build_examples()?;
    let maru = env::build_maru_release()?;
    let hello = components.join("hello.wasm");
    let root = env::root();
    let bench_dir = root.join("target/bench");
    std::fs::create_dir_all(&bench_dir)?;

    let node = MaruNode::start_in(&maru, &bench_dir)?;
    let manifest = bench_dir.join("hello.toml");
    std::fs::write(
        &manifest,
        format!(
            "[app]\nname = \"bench\"\n\n[service.hello]\ncomponent = \"{}\"\nroutes = [\"/hello\"]\ninstances = {{ min = 0, max = {} }}\nidle_timeout = \"60s\"\n\n[service.isolated]\ncomponent = \"{}\"\nroutes = [\"/isolated\"]\ninstances = {{ min = 0, max = {} }}\nidle_timeout = \"60s\"\nisolation = \"request\"\n\n[service.cold]\ncomponent = \"{}\"\nroutes = [\"/cold\"]\ninstances = {{ min = 0, max = 1 }}\nidle_timeout = \"1s\"\n",
            hello.display(),
            connections.max(1),
            hello.display(),
            connections.max(1),
            hello.display()
        ),
    )?;
    node.cli(&["deploy", manifest.to_str().context("non-UTF-8 path")?])?;
    // The same node again with its gateway over TLS (the node's default; the control API,
    // MQTT and S3 stay plain here), for the cost of TLS on the same requests.
    let tls_dir = bench_dir.join("tls");
    std::fs::create_dir_all(&tls_dir)?;
    let any = "127.0.0.1:0";
    let mut tls_node = Some(MaruNode::start_with(
        &maru,
        &tls_dir.join("data"),
        [any, any, any, any],
        &tls_dir.join("maru.log"),
        &["--plain", "control,mqtt,s3"],
    )?);
    if let Some(tls_node) = &tls_node {
        tls_node.cli(&["deploy", manifest.to_str().context("non-UTF-8 path")?])?;
    }

    let wasmtime_address = format!("127.0.0.1:{}", free_port()?);
    let wasmtime_log = std::fs::File::create(bench_dir.join("wasmtime-serve.log"))?;
    let mut serve = Command::new(&wasmtime)
        .args(["serve", "--addr", &wasmtime_address, "-Scli"])
        .arg(&hello)
        .stdout(wasmtime_log.try_clone()?)
        .stderr(wasmtime_log)
        .stdin(Stdio::null())
        .spawn()
        .context("start wasmtime serve")?;
    let result = (|| {
        wait_listening(&wasmtime_address, &mut serve)?;
        let (_, from_maru) = first_byte(&node.gateway, "/hello")?;
        let (_, from_wasmtime) = first_byte(&wasmtime_address, "/hello")?;
        let (maru_answer, wasmtime_answer) =
            (status_and_body(&from_maru), status_and_body(&from_wasmtime));
        if maru_answer != wasmtime_answer {
            bail!(
                "the same component answers differently:\n  maru:           {maru_answer:?}\n  wasmtime serve: {wasmtime_answer:?}"
            );
        }
        println!(
            "Same component, same answer from both: {} {:?}",
            maru_answer.0, maru_answer.1
        );

        let maru_url = format!("http://{}/hello", node.gateway);
        // The same component with a fresh instance for every request (`isolation =
        // "request"`), as `wasmtime serve` gives: the like-for-like row.
        let isolated_url = format!("http://{}/isolated", node.gateway);
        let tls_url = format!(
            "https://{}/hello",
            tls_node.as_ref().context("the TLS node")?.gateway
        );
        let wasmtime_url = format!("http://{wasmtime_address}/hello");
        println!("Warming up the servers…");
        wrk(&maru_url, 2, connections)?;
        wrk(&isolated_url, 2, connections)?;
        wrk(&tls_url, 2, connections)?;
        wrk(&wasmtime_url, 2, connections)?;
        let mut maru_runs = Vec::new();
        let mut isolated_runs = Vec::new();
        let mut tls_runs = Vec::new();
        let mut wasmtime_runs = Vec::new();
        for round in 1..=rounds {
            for (name, url, runs) in [
                ("maru", &maru_url, &mut maru_runs),
                ("maru isolated", &isolated_url, &mut isolated_runs),
                ("maru TLS", &tls_url, &mut tls_runs),
                ("wasmtime serve", &wasmtime_url, &mut wasmtime_runs),
            ] {
                let load = wrk(url, seconds, connections)?;
                println!(
                    "  round {round} {name:<15} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  errors {}",
                    load.requests_per_second, load.p50_ms, load.p99_ms, load.errors
                );
                runs.push(load);
            }
        }
        let (m, w, i, t) = (
            Load::mean(&maru_runs),
            Load::mean(&wasmtime_runs),
            Load::mean(&isolated_runs),
            Load::mean(&tls_runs),
        );
        println!("\nThroughput (wrk -t2 -c{connections} -d{seconds}s, mean of {rounds} rounds):");
        println!("  maru           {}", m.row());
        println!("  wasmtime serve {}", w.row());
        println!(
            "  ratio maru / wasmtime serve: throughput {:.2}×, p99 {:.2}× (target: throughput ≥ 1.0, p99 ≤ 1.0)",
            m.requests_per_second / w.requests_per_second,
            m.p99_ms / w.p99_ms
        );
        println!(
            "  maru, a fresh instance per request (isolation = \"request\", like wasmtime serve)"
        );
        println!("                 {}", i.row());
        println!(
            "  ratio maru isolated / wasmtime serve: throughput {:.2}×, p99 {:.2}× (target: throughput ≥ 1.0, p99 ≤ 1.0)",
            i.requests_per_second / w.requests_per_second,
            i.p99_ms / w.p99_ms
        );
        println!("  maru TLS       {}", t.row());
        println!(
            "  ratio maru TLS / maru plain: throughput {:.2}×, p99 {:.2}× (TLS 1.3 on wrk's kept-alive connections: the handshake once per connection, encryption on every request)",
            t.requests_per_second / m.requests_per_second,
            t.p99_ms / m.p99_ms
        );
        // The rest measures one node alone.
        if let Some(mut tls_node) = tls_node.take() {
            tls_node.stop()?;
        }
        cold_start(&node, &hello)?;
        noisy_neighbours(&node, &components.join("misbehave.wasm"), &bench_dir)
    })();
    _ = serve.kill();
    _ = serve.wait();
    result
}

/// Latency of another service, of the control API and of HTTP ingest while twice as many
/// guests as cores compute without pause, against the same calls on a quiet node: guests
/// yield to the node at every epoch tick, so the limit is one second (the hardening issue's
/// acceptance), and the ratio to quiet shows what the spinning costs.
fn noisy_neighbours(node: &MaruNode, misbehave: &Path, bench_dir: &Path) -> anyhow::Result<()> {
    let spinners = 2 * std::thread::available_parallelism().map_or(2, |n| n.get());
    let manifest = bench_dir.join("noisy.toml");
    std::fs::write(
        &manifest,
        format!(
            "[app]\nname = \"noisy\"\n\n[topic.\"bench.load\"]\n\n[service.spin]\ncomponent = \"{}\"\nroutes = [\"/spin\"]\ntimeout = \"20s\"\ninstances = {{ min = 0, max = {spinners} }}\n",
            misbehave.display()
        ),
    )?;
    node.cli(&["deploy", manifest.to_str().context("non-UTF-8 path")?])?;
    let token = std::fs::read_to_string(node.data.join("token"))
        .context("read the control token")?
        .trim()
        .to_string();
    let ingest_token = node.ingest_token()?;
    let timed = |address: &str, request: String| -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut stream = TcpStream::connect(address)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.write_all(request.as_bytes())?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        let text = String::from_utf8_lossy(&answer);
        if !(text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.1 202")) {
            bail!("{}", text.lines().next().unwrap_or_default());
        }
        Ok(started.elapsed())
    };
    let sample = || -> anyhow::Result<[Vec<Duration>; 3]> {
        let mut out: [Vec<Duration>; 3] = Default::default();
        for _ in 0..40 {
            out[0].push(timed(
                &node.gateway,
                "GET /hello HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".into(),
            )?);
            out[1].push(timed(
                &node.control,
                format!("GET /v1/apps HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
            )?);
            out[2].push(timed(
                &node.gateway,
                format!("POST /events/bench.load HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {ingest_token}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n42"),
            )?);
            std::thread::sleep(Duration::from_millis(20));
        }
        for series in &mut out {
            series.sort();
        }
        Ok(out)
    };
    println!(
        "\nNoisy neighbours: {spinners} guests spinning on {} cores",
        spinners / 2
    );
    let quiet = sample()?;
    let gateway = node.gateway.clone();
    let spinning: Vec<_> = (0..spinners)
        .map(|_| {
            let gateway = gateway.clone();
            std::thread::spawn(move || {
                // Each spins until its 20 s timeout; 504 is the expected answer.
                _ = first_byte(&gateway, "/spin");
            })
        })
        .collect();
    let started = Instant::now();
    while node.service("noisy", "spin")?["in_flight"].as_u64() != Some(spinners as u64) {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("the guests did not all start spinning");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let noisy = sample()?;
    let still = node.service("noisy", "spin")?["in_flight"].as_u64();
    for thread in spinning {
        _ = thread.join();
    }
    if still != Some(spinners as u64) {
        bail!("the guests stopped spinning before the measurement ended ({still:?} in flight)");
    }
    for (i, name) in [
        "another service (GET /hello)",
        "control API (GET /v1/apps)",
        "HTTP ingest (POST /events)",
    ]
    .iter()
    .enumerate()
    {
        let (q50, q99) = (quantile_ms(&quiet[i], 0.5), quantile_ms(&quiet[i], 0.99));
        let (n50, n99, nmax) = (
            quantile_ms(&noisy[i], 0.5),
            quantile_ms(&noisy[i], 0.99),
            quantile_ms(&noisy[i], 1.0),
        );
        println!(
            "  {name:<30} quiet p50 {q50:>6.2} ms p99 {q99:>6.2} ms | spinning p50 {n50:>6.2} ms p99 {n99:>6.2} ms max {nmax:>6.2} ms | max / 1 s limit {:.3}",
            nmax / 1000.0
        );
    }
    Ok(())
}

fn cold_start(node: &MaruNode, hello: &Path) -> anyhow::Result<()> {
    println!(
        "\nCold start: scale-from-zero to first byte, against a bare wasmtime instantiate-and-call"
    );
    // Built together with maru so both share one feature set (and one wasmtime build).
    env::step(
        "build the bare instantiate baseline",
        env::cargo(&[
            "build",
            "--release",
            "--quiet",
            "-p",
            "maru",
            "-p",
            "runtime",
            "--bin",
            "maru",
            "--example",
            "bare_instantiate",
        ]),
    )?;
    let output = Command::new(env::root().join("target/release/examples/bare_instantiate"))
        .arg(hello)
        .arg("300")
        .output()
        .context("run the bare instantiate baseline")?;
    if !output.status.success() {
        bail!(
            "bare_instantiate failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let bare: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("bare_instantiate output")?;
    let bare_p50_ms = bare["p50_us"].as_f64().unwrap_or(0.0) / 1000.0;

    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for _ in 0..15 {
        let started = Instant::now();
        loop {
            let service = node.service("bench", "cold")?;
            if service["instances_ready"] == 0 && service["instances_starting"] == 0 {
                break;
            }
            if started.elapsed() > Duration::from_secs(15) {
                bail!("the cold service did not scale to zero");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (elapsed, response) = first_byte(&node.gateway, "/cold")?;
        if !response.starts_with("HTTP/1.1 200") {
            bail!("cold request failed: {response}");
        }
        cold.push(elapsed);
        warm.push(first_byte(&node.gateway, "/cold")?.0);
    }
    cold.sort();
    warm.sort();
    let (cold_p50, warm_p50) = (quantile_ms(&cold, 0.5), quantile_ms(&warm, 0.5));
    println!(
        "  bare wasmtime instantiate + call (no HTTP): p50 {bare_p50_ms:.3} ms, p99 {:.3} ms ({} samples)",
        bare["p99_us"].as_f64().unwrap_or(0.0) / 1000.0,
        bare["samples"]
    );
    println!(
        "  maru, warm instance, HTTP first byte:       p50 {warm_p50:.3} ms ({} samples)",
        warm.len()
    );
    println!(
        "  maru, from zero instances, first byte:      p50 {cold_p50:.3} ms, max {:.3} ms ({} samples)",
        quantile_ms(&cold, 1.0),
        cold.len()
    );
    println!(
        "  overhead over bare instantiate-and-call: {:.3} ms (target < 1 ms)",
        cold_p50 - bare_p50_ms
    );
    Ok(())
}

fn autoscale(startups: &str, limit_days: f64, only: Option<&str>) -> anyhow::Result<()> {
    let maru = env::build_maru_release()?;
    let traces_dir = env::root().join("../shared/traces");
    let mut traces: Vec<PathBuf> = std::fs::read_dir(&traces_dir)
        .with_context(|| format!("read {} (the shared demand traces)", traces_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv" || x == "txt"))
        .filter(|p| {
            only.is_none_or(|o| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(o))
            })
        })
        .collect();
    traces.sort();
    let bench_dir = env::root().join("target/bench/autoscale");
    std::fs::create_dir_all(&bench_dir)?;
    let mut table = String::from(
        "| trace | startup | policy | knob (tuned) | availability % (held-out) | p99 ms | instance-s vs hpa | vs oracle | cold starts |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for trace in &traces {
        let name = trace
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for startup in startups.split(',').map(str::trim) {
            eprintln!("xtask: {name}, startup {startup}");
            let stem = format!("{}-{startup}", name.split('.').next().unwrap_or("trace"));
            let output = Command::new(&maru)
                .args([
                    "sim",
                    "--tune",
                    "--json",
                    "--startup",
                    startup,
                    "--limit-days",
                    &limit_days.to_string(),
                    "--plot",
                ])
                .arg(bench_dir.join(format!("{stem}.svg")))
                .arg("--trace")
                .arg(trace)
                .output()
                .context("run maru sim")?;
            if !output.status.success() {
                bail!(
                    "maru sim on {name} failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            std::fs::write(bench_dir.join(format!("{stem}.json")), &output.stdout)?;
            let report: serde_json::Value =
                serde_json::from_slice(&output.stdout).context("maru sim output")?;
            for row in report["rows"].as_array().into_iter().flatten() {
                let missed = if row["tuned_reached_target"] == false {
                    " (missed 99.9 % in training)"
                } else {
                    ""
                };
                let ratio = |key: &str| {
                    row[key]
                        .as_f64()
                        .map(|r| format!("{r:.2}"))
                        .unwrap_or_else(|| "-".into())
                };
                let line = format!(
                    "| {name} | {startup} | {} | {}{missed} | {:.3} | {:.0} | {} | {} | {} |\n",
                    row["policy"].as_str().unwrap_or(""),
                    row["knob"].as_str().unwrap_or(""),
                    row["availability"].as_f64().unwrap_or(0.0) * 100.0,
                    row["latency_p99_ms"].as_f64().unwrap_or(0.0),
                    ratio("instance_seconds_vs_hpa"),
                    ratio("instance_seconds_vs_oracle"),
                    row["cold_starts"]
                );
                print!("{line}");
                table.push_str(&line);
            }
        }
    }
    std::fs::write(bench_dir.join("table.md"), &table)?;
    println!(
        "\nTable written to {}; plots and JSON beside it.",
        bench_dir.join("table.md").display()
    );
    Ok(())
}
