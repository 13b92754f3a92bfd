//! `cargo xtask bench control`: what the control API's guard costs per call.
//!
//! The same node serves two handlers that do almost nothing: `GET /v1/health` (no token,
//! no Cedar decision, not audited) and `GET /v1/whoami` (the bearer token checked, a Cedar
//! decision, and an audit entry written and synced before the answer; the handler then
//! returns the caller's name and roles). The difference between the two is the guard.
//! `clients` threads each hold a keep-alive connection and send one request after another,
//! alternating rounds; every guarded call's audit entry is counted afterwards.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::env;
use crate::node::{KeepAlive, MaruNode, quantile_ms};

struct Round {
    requests: usize,
    seconds: f64,
    latencies: Vec<Duration>,
}

fn load(
    address: &str,
    path: &str,
    token: &str,
    clients: u32,
    seconds: u32,
) -> anyhow::Result<Round> {
    let until = Instant::now() + Duration::from_secs(u64::from(seconds));
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (address, path, token) = (address.to_string(), path.to_string(), token.to_string());
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut connection = KeepAlive::open(&address)?;
                let authorization = format!("Authorization: Bearer {token}\r\n");
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    let sent = Instant::now();
                    let (status, _) = connection.send("GET", "maru", &path, &authorization, &[])?;
                    if status != 200 {
                        bail!("GET {path} answered {status}");
                    }
                    latencies.push(sent.elapsed());
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??,
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok(Round {
        requests: latencies.len(),
        seconds,
        latencies,
    })
}

pub fn control(seconds: u32, clients: u32, rounds: u32) -> anyhow::Result<()> {
    let maru = env::build_maru_release()?;
    let dir = env::root().join("target/bench/control");
    std::fs::create_dir_all(&dir)?;
    let node = MaruNode::start_in(&maru, &dir)?;
    let token = std::fs::read_to_string(node.data.join("token"))?
        .trim()
        .to_string();
    let audited_before = audit_entries(&node)?;
    let mut results: Vec<(&str, Vec<Round>)> =
        vec![("/v1/health", Vec::new()), ("/v1/whoami", Vec::new())];
    for round in 0..rounds {
        for (path, rounds_of) in results.iter_mut() {
            println!(
                "xtask: round {} of {rounds}: GET {path}, {clients} clients, {seconds} s",
                round + 1
            );
            rounds_of.push(load(&node.control, path, &token, clients, seconds)?);
        }
    }
    let audited = audit_entries(&node)? - audited_before;
    let guarded: usize = results[1].1.iter().map(|r| r.requests).sum();
    println!();
    println!("| call | guard | requests/s | p50 | p99 |");
    println!("|---|---|---|---|---|");
    let mut rates = Vec::new();
    for (path, rounds_of) in &results {
        let requests: usize = rounds_of.iter().map(|r| r.requests).sum();
        let seconds: f64 = rounds_of.iter().map(|r| r.seconds).sum();
        let mut all: Vec<Duration> = rounds_of.iter().flat_map(|r| r.latencies.clone()).collect();
        all.sort_unstable();
        let rate = requests as f64 / seconds;
        rates.push((rate, quantile_ms(&all, 0.99)));
        println!(
            "| `GET {path}` | {} | {rate:.0} | {:.2} ms | {:.2} ms |",
            if *path == "/v1/health" {
                "none"
            } else {
                "token + Cedar + audit (synced)"
            },
            quantile_ms(&all, 0.5),
            quantile_ms(&all, 0.99)
        );
    }
    println!();
    println!(
        "guarded / unguarded: {:.2}x requests per second, p99 {:.2} ms against {:.2} ms",
        rates[1].0 / rates[0].0,
        rates[1].1,
        rates[0].1
    );
    println!(
        "audit entries written during the run: {audited} for {guarded} guarded calls (plus the runs' own audit reads)"
    );
    if (audited as usize) < guarded {
        bail!("fewer audit entries ({audited}) than guarded calls ({guarded})");
    }
    Ok(())
}

/// The newest audit entry's number, through the API (itself an audited call).
fn audit_entries(node: &MaruNode) -> anyhow::Result<u64> {
    let out = node.cli(&["audit", "tail", "-n", "1", "--json"])?;
    let entries: serde_json::Value = serde_json::from_str(&out)?;
    Ok(entries[0]["seq"].as_u64().unwrap_or(0))
}
