//! `cargo xtask bench store`: object PUT and GET throughput through the S3 API against the
//! same disk's raw sequential bandwidth, measured in the same run.
//!
//! - The store: a release `maru up` with its default volumes (six directories on this
//!   disk, RS(4,2)), so every byte is encrypted, erasure-coded, hashed and fsynced.
//! - The client: boto3 (the real client) signs presigned PUT and GET URLs; threads of this
//!   task send them over keep-alive HTTP/1.1 connections, so the load generator costs
//!   little CPU and the signing is exactly a client's.
//! - Raw disk: right after each phase, plain files carrying the same physical bytes (a
//!   file per shard, from as many threads, each fdatasynced), read back after the page
//!   cache was dropped (as GETs are measured). This machine's disk swings between ~100 MiB/s and
//!   ~2 GiB/s from minute to minute, so only a raw figure taken next to the store's means
//!   anything; `sync` and a pause come before each measurement.
//! - Physical bytes: what the store wrote to its volumes (data and parity blocks), from
//!   `maru store status`; compared with the raw write bandwidth.
//! - The CPU side: `cargo run --release -p store --example erasure_speed`, per core.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::env;
use crate::node::{KeepAlive, MaruNode};

const MIB: u64 = 1 << 20;

struct Rate {
    bytes: u64,
    seconds: f64,
}

impl Rate {
    fn per_second(&self) -> f64 {
        self.bytes as f64 / self.seconds
    }
}

fn mib(bytes_per_second: f64) -> String {
    format!("{:.0} MiB/s", bytes_per_second / MIB as f64)
}

/// Drop the page cache, so that reads come from the disk. Needs root; says so if not.
fn drop_caches() -> bool {
    let synced = Command::new("sync").status().is_ok_and(|s| s.success());
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// The raw disk doing what the store's PUTs and GETs do, in the same place: `clients`
/// threads each writing whole files (`count` files of `file_bytes`, each fdatasynced, a new
/// file every time), then reading them back cold.
fn raw_disk(dir: &Path, clients: u32, count: u64, file_bytes: u64) -> anyhow::Result<(Rate, Rate)> {
    let raw = dir.join("raw");
    _ = std::fs::remove_dir_all(&raw);
    std::fs::create_dir_all(&raw)?;
    settle();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let run = |write: bool| -> anyhow::Result<Rate> {
        let started = Instant::now();
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let (next, raw) = (next.clone(), raw.clone());
                std::thread::spawn(move || -> anyhow::Result<u64> {
                    let block = vec![0x5au8; 1 << 20];
                    let mut moved = 0;
                    loop {
                        let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if index >= count {
                            return Ok(moved);
                        }
                        let path = raw.join(format!("f{index}"));
                        if write {
                            let mut file = std::fs::File::create(&path)?;
                            let mut left = file_bytes;
                            while left > 0 {
                                let take = left.min(block.len() as u64) as usize;
                                file.write_all(&block[..take])?;
                                left -= take as u64;
                            }
                            file.sync_data()?;
                        } else {
                            let mut file = std::fs::File::open(&path)?;
                            let mut sink = vec![0u8; 1 << 20];
                            while file.read(&mut sink)? > 0 {}
                        }
                        moved += file_bytes;
                    }
                })
            })
            .collect();
        let mut bytes = 0;
        for worker in workers {
            bytes += worker
                .join()
                .map_err(|_| anyhow::anyhow!("a raw disk thread panicked"))??;
        }
        Ok(Rate {
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    };
    let write = run(true)?;
    next.store(0, std::sync::atomic::Ordering::Relaxed);
    if !drop_caches() {
        bail!("the raw read must be cold: run the benchmark as root (it drops the page cache)");
    }
    let read = run(false)?;
    _ = std::fs::remove_dir_all(&raw);
    Ok((write, read))
}

/// Let the disk finish writing what is dirty, so one measurement does not pay for another.
fn settle() {
    _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_secs(2));
}

/// Presigned URLs from boto3: for each key, a PUT and a GET.
fn presign(
    node: &MaruNode,
    key: &(String, String),
    keys: &[String],
) -> anyhow::Result<Vec<(String, String)>> {
    let script = r#"
import json, sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
try:
    s3.create_bucket(Bucket="bench")
except s3.exceptions.BucketAlreadyOwnedByYou:
    pass
out = []
for key in json.load(sys.stdin):
    put = s3.generate_presigned_url("put_object", Params={"Bucket": "bench", "Key": key}, ExpiresIn=3600)
    get = s3.generate_presigned_url("get_object", Params={"Bucket": "bench", "Key": key}, ExpiresIn=3600)
    out.append([put, get])
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .env("AWS_ACCESS_KEY_ID", &key.0)
        .env("AWS_SECRET_ACCESS_KEY", &key.1)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", format!("http://{}", node.s3))
        .env_remove("AWS_CA_BUNDLE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("run python3 with boto3")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(serde_json::to_string(keys)?.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("boto3 could not presign the URLs");
    }
    let pairs: Vec<(String, String)> = serde_json::from_slice(&output.stdout)?;
    Ok(pairs)
}

/// Send every request in `urls` from `clients` threads; returns the bytes moved and time.
fn drive(
    address: &str,
    clients: u32,
    method: &'static str,
    urls: Vec<String>,
    body: Arc<Vec<u8>>,
) -> anyhow::Result<Rate> {
    let queue = Arc::new(Mutex::new(urls));
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (queue, body, address) = (queue.clone(), body.clone(), address.to_string());
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut connection = KeepAlive::open(&address)?;
                let mut moved = 0;
                loop {
                    let Some(url) = queue.lock().expect("never poisoned").pop() else {
                        return Ok(moved);
                    };
                    let sent: &[u8] = if method == "PUT" { &body } else { &[] };
                    let (status, length) = connection.exchange(method, &url, sent)?;
                    if status != 200 {
                        bail!("{method} answered {status}");
                    }
                    moved += if method == "PUT" {
                        body.len() as u64
                    } else {
                        length
                    };
                }
            })
        })
        .collect();
    let mut bytes = 0;
    for worker in workers {
        bytes += worker
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    Ok(Rate {
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Shards per object in the store's profile (`RS(k,m)`: k+m).
fn shard_count(status: &serde_json::Value) -> u64 {
    status["profile"]
        .as_str()
        .and_then(|p| p.strip_prefix("RS(")?.strip_suffix(')')?.split_once(','))
        .and_then(|(k, m)| Some(k.trim().parse::<u64>().ok()? + m.trim().parse::<u64>().ok()?))
        .unwrap_or(1)
}

fn status(node: &MaruNode) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(
        &node.cli(&["store", "status", "--json"])?,
    )?)
}

pub fn store(clients: u32) -> anyhow::Result<()> {
    env::ensure_pip_packages(&["python3", "-c", "import boto3"], &["boto3==1.43.11"])?;
    let maru = env::build_maru_release()?;
    let root = env::root();
    let dir = root.join("target/bench/store");
    std::fs::create_dir_all(&dir)?;
    eprintln!("xtask: measuring the CPU side (erasure_speed example, one core)");
    let speed = Command::new(env::cargo_bin())
        .args([
            "run",
            "--release",
            "--quiet",
            "-p",
            "store",
            "--example",
            "erasure_speed",
            "--",
            "4",
            "2",
        ])
        .current_dir(&root)
        .output()
        .context("run the erasure_speed example")?;
    if !speed.status.success() {
        bail!(
            "erasure_speed failed: {}",
            String::from_utf8_lossy(&speed.stderr)
        );
    }
    let speed: serde_json::Value = serde_json::from_slice(&speed.stdout)?;
    let node = MaruNode::start_in(&maru, &dir)?;
    let created: serde_json::Value = serde_json::from_str(
        &node.cli(&["store", "keys", "create", "--bucket", "bench", "--json"])?,
    )?;
    let key = (
        created["access_key"].as_str().context("a key")?.to_string(),
        created["secret"].as_str().context("a secret")?.to_string(),
    );
    let mut rows = Vec::new();
    for (size, count) in [(MIB, 512u64), (64 * MIB, 16)] {
        let keys: Vec<String> = (0..count).map(|i| format!("object-{size}-{i}")).collect();
        let urls = presign(&node, &key, &keys)?;
        let body = Arc::new((0..size).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>());
        let before = status(&node)?["bytes_written"].as_u64().unwrap_or(0);
        settle();
        eprintln!(
            "xtask: PUT {count} objects of {} MiB from {clients} clients",
            size / MIB
        );
        let put = drive(
            &node.s3,
            clients,
            "PUT",
            urls.iter().map(|u| u.0.clone()).collect(),
            body.clone(),
        )?;
        let physical = status(&node)?["bytes_written"].as_u64().unwrap_or(0) - before;
        if !drop_caches() {
            bail!("GETs must read the disk: run the benchmark as root (it drops the page cache)");
        }
        eprintln!("xtask: GET them back (page cache dropped)");
        let get = drive(
            &node.s3,
            clients,
            "GET",
            urls.iter().map(|u| u.1.clone()).collect(),
            Arc::new(Vec::new()),
        )?;
        // The raw disk writes the same physical bytes the same way: a file per shard, from
        // as many threads, each synced.
        let shards = shard_count(&status(&node)?);
        eprintln!(
            "xtask: the raw disk, the same bytes ({} MiB in {} files)",
            physical / MIB,
            count * shards
        );
        let (raw_write, raw_read) =
            raw_disk(&dir, clients, count * shards, physical / (count * shards))?;
        let physical_rate = physical as f64 / put.seconds;
        rows.push(format!(
            "| {} MiB × {count}, {clients} clients | {} | {} | {} ({:.2}×) | {} | {} | {} ({:.2}×) |",
            size / MIB,
            mib(put.per_second()),
            mib(physical_rate),
            mib(raw_write.per_second()),
            physical_rate / raw_write.per_second(),
            (physical as f64 / (size * count) as f64 * 100.0).round() / 100.0,
            mib(get.per_second()),
            mib(raw_read.per_second()),
            get.per_second() / raw_read.per_second(),
        ));
    }
    let profile = status(&node)?["profile"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    println!();
    println!(
        "Store profile {profile}; physical = data and parity blocks written to the volumes; raw = the same bytes written (fdatasync) and read (cold) as plain files, one per shard, in the same directory, from as many threads"
    );
    println!();
    println!(
        "| objects | PUT user | PUT physical | raw write (PUT physical / raw) | physical / user | GET | raw read | GET / raw read |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    println!();
    let per = |name: &str| mib(speed[name].as_f64().unwrap_or(0.0));
    println!(
        "One core: RS(4,2) encode {}, rebuild of two lost data blocks {}, AES-256-GCM {}, BLAKE3 {}, MD5 {}",
        per("encode_bytes_per_second"),
        per("decode_bytes_per_second_losing_parity"),
        per("aes_gcm_seal_bytes_per_second"),
        per("blake3_bytes_per_second"),
        per("md5_bytes_per_second"),
    );
    Ok(())
}
