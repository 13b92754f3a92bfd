//! `cargo xtask bench cluster`: requests per second through three cluster nodes (three NATS
//! servers, JetStream syncing every write) against one node alone, on examples/hello with
//! the same cluster-wide maximum of instances, in alternating rounds of one run; and what
//! forwarding between gateways costs: a service placed on one node, loaded through a node
//! that does not run it, against the same load sent to the node that does.
//!
//! Events: 1 KiB events over HTTP ingest, each producer waiting for its 202 before the next,
//! to the node alone (its own log, fsync with group commit) and split over the three nodes
//! (a JetStream stream of three replicas, every write synced).
//!
//! Overflow: a service whose requests wait without CPU (the misbehave guest's `sleep`, 20 ms,
//! three instances always up), loaded through one gateway only: on the node alone its three
//! instances serve; in the cluster that gateway's node holds one and the other two nodes one
//! each, reached only by what that node's share cannot take (overflow). Without overflow
//! the cluster's rate would be a third of the node alone's.
//!
//! On one machine the three nodes share its cores, so the ratios measure what the cluster
//! costs (placement, heartbeats, NATS beside the nodes, replication), not what more machines
//! would add.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::bench::{Load, wrk};
use crate::bench_events::{Measured, http_connect, http_send, load};
use crate::env;
use crate::node::MaruNode;

fn write_manifest(
    dir: &Path,
    components: &Path,
    name: &str,
    route: &str,
    max: u32,
) -> anyhow::Result<String> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[app]\nname = \"{name}\"\n\n[topic.\"bench.{name}\"]\n\n[service.hello]\ncomponent = \"{}\"\nroutes = [\"{route}\"]\ninstances = {{ min = 1, max = {max} }}\n",
            components.join("hello.wasm").display()
        ),
    )?;
    Ok(path.to_str().context("utf-8 path")?.to_string())
}

/// The misbehave guest as app `slow` at `/slow`, with exactly `instances` instances.
fn write_slow_manifest(dir: &Path, components: &Path, instances: u32) -> anyhow::Result<String> {
    let path = dir.join("slow.toml");
    std::fs::write(
        &path,
        format!(
            "[app]\nname = \"slow\"\n\n[service.guest]\ncomponent = \"{}\"\nroutes = [\"/slow\"]\ninstances = {{ min = {instances}, max = {instances} }}\n",
            components.join("misbehave.wasm").display()
        ),
    )?;
    Ok(path.to_str().context("utf-8 path")?.to_string())
}

/// The path that holds a `slow` instance for 20 ms without CPU.
const SLOW_PATH: &str = "/slow/sleep?ms=20";

/// Until `GET http://{gateway}{path}` answers 200.
fn wait_served(gateway: &str, path: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let ok = ureq::get(&format!("http://{gateway}{path}"))
            .call()
            .is_ok_and(|r| r.status() == 200);
        if ok {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("{gateway} did not serve {path} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where `app`'s service runs as `node` says: `here …`, `on …` or `unplaced: …`.
fn placement(node: &MaruNode, app: &str) -> anyhow::Result<String> {
    let services: serde_json::Value = serde_json::from_str(&node.cli(&["ps", "--json"])?)?;
    Ok(services
        .as_array()
        .and_then(|all| all.iter().find(|s| s["app"] == app))
        .and_then(|s| s["placement"].as_str())
        .unwrap_or("")
        .to_string())
}

/// wrk against every gateway at once, `connections` split between them; requests per
/// second summed, latencies the mean of the gateways'.
fn wrk_all(urls: &[String], seconds: u32, connections: u32) -> anyhow::Result<Load> {
    let each = (connections / urls.len() as u32).max(1);
    let runs = std::thread::scope(|scope| {
        let handles: Vec<_> = urls
            .iter()
            .map(|url| scope.spawn(move || wrk(url, seconds, each)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a wrk thread panicked")))
            .collect::<anyhow::Result<Vec<Load>>>()
    })?;
    let mut load = Load::mean(&runs);
    load.requests_per_second = runs.iter().map(|l| l.requests_per_second).sum();
    Ok(load)
}

pub fn cluster(seconds: u32, connections: u32, producers: u32, rounds: u32) -> anyhow::Result<()> {
    env::ensure_debian_package("wrk", "wrk")?;
    let nats = crate::bench_events::nats_syncing_server()?;
    let components = env::build_examples()?;
    let maru = env::build_maru_release()?;
    let dir = env::root().join("target/bench-cluster");
    _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let any = "127.0.0.1:0";

    println!("xtask: one node alone");
    let single = MaruNode::start_with(
        &maru,
        &dir.join("single/data"),
        [any, any, any, any],
        &dir.join("single.log"),
        &[],
    )?;
    single.cli(&[
        "deploy",
        &write_manifest(&dir, &components, "hello", "/hello", 4)?,
    ])?;
    wait_served(&single.gateway, "/hello")?;
    single.cli(&["deploy", &write_slow_manifest(&dir, &components, 3)?])?;
    wait_served(&single.gateway, SLOW_PATH)?;

    println!("xtask: three nodes and three NATS servers");
    let cluster_dir = dir.join("cluster");
    std::fs::create_dir_all(&cluster_dir)?;
    let cluster = crate::cluster::start(3, &cluster_dir, &maru, &nats)?;
    let nodes = &cluster.nodes;
    nodes[0].cli(&[
        "deploy",
        &write_manifest(&dir, &components, "hello", "/hello", 4)?,
    ])?;
    // One instance at most: placed on one node, forwarded to by the others.
    nodes[0].cli(&[
        "deploy",
        &write_manifest(&dir, &components, "solo", "/solo", 1)?,
    ])?;
    // Three instances in all: one on each node.
    nodes[0].cli(&["deploy", &write_slow_manifest(&dir, &components, 3)?])?;
    for node in nodes {
        wait_served(&node.gateway, "/hello")?;
        wait_served(&node.gateway, "/solo")?;
        wait_served(&node.gateway, SLOW_PATH)?;
    }
    let started = Instant::now();
    while !nodes
        .iter()
        .map(|node| placement(node, "slow"))
        .collect::<anyhow::Result<Vec<_>>>()?
        .iter()
        .all(|placed| placed == "here 1..1")
    {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("slow was not placed one instance on each node within 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut here = None;
    let mut elsewhere = None;
    let started = Instant::now();
    while here.is_none() || elsewhere.is_none() {
        for node in nodes {
            let placed = placement(node, "solo")?;
            if placed.starts_with("here") {
                here = Some(node);
            } else if placed.starts_with("on ") {
                elsewhere = Some(node);
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("solo was not placed on one node within 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (here, elsewhere) = (here.context("placed")?, elsewhere.context("forwarding")?);
    println!(
        "xtask: hello on every node (max 4 in all), solo placed on {} and forwarded to from {}",
        here.gateway, elsewhere.gateway
    );

    let gateways: Vec<String> = nodes
        .iter()
        .map(|n| format!("http://{}/hello", n.gateway))
        .collect();
    let (mut alone, mut three, mut direct, mut forwarded) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut slow_alone, mut slow_three) = (Vec::new(), Vec::new());
    let (mut events_alone, mut events_three) = (Vec::new(), Vec::new());
    let single_token = single.ingest_token()?;
    let cluster_producers: Vec<(String, String)> = nodes
        .iter()
        .map(|n| Ok((n.gateway.clone(), n.ingest_token()?)))
        .collect::<anyhow::Result<_>>()?;
    for round in 1..=rounds {
        let a = wrk(
            &format!("http://{}/hello", single.gateway),
            seconds,
            connections,
        )?;
        println!("round {round}: one node       {}", a.row());
        let t = wrk_all(&gateways, seconds, connections)?;
        println!("round {round}: three nodes    {}", t.row());
        let d = wrk(
            &format!("http://{}/solo", here.gateway),
            seconds,
            connections,
        )?;
        println!("round {round}: solo, direct   {}", d.row());
        let f = wrk(
            &format!("http://{}/solo", elsewhere.gateway),
            seconds,
            connections,
        )?;
        println!("round {round}: solo, forwarded {}", f.row());
        let sa = wrk(
            &format!("http://{}{SLOW_PATH}", single.gateway),
            seconds,
            connections,
        )?;
        println!("round {round}: slow, node alone (3 instances) {}", sa.row());
        let st = wrk(
            &format!("http://{}{SLOW_PATH}", nodes[0].gateway),
            seconds,
            connections,
        )?;
        println!(
            "round {round}: slow, one gateway of three nodes (1 instance each) {}",
            st.row()
        );
        slow_alone.push(sa);
        slow_three.push(st);
        let ea = load(
            "events, one node alone (fsync)",
            seconds,
            producers,
            |_| http_connect(&single.gateway, "bench.hello", &single_token),
            http_send,
        )?;
        let et = load(
            "events, three nodes (JetStream R3, synced)",
            seconds,
            producers,
            |i| {
                let (gateway, token) = &cluster_producers[i as usize % cluster_producers.len()];
                http_connect(gateway, "bench.hello", token)
            },
            http_send,
        )?;
        events_alone.push(ea);
        events_three.push(et);
        alone.push(a);
        three.push(t);
        direct.push(d);
        forwarded.push(f);
    }
    let (alone, three, direct, forwarded) = (
        Load::mean(&alone),
        Load::mean(&three),
        Load::mean(&direct),
        Load::mean(&forwarded),
    );
    let (slow_alone, slow_three) = (Load::mean(&slow_alone), Load::mean(&slow_three));
    let errors = alone.errors
        + three.errors
        + direct.errors
        + forwarded.errors
        + slow_alone.errors
        + slow_three.errors;
    println!("\nmean of {rounds} rounds, {seconds} s each, {connections} connections:");
    println!("  one node alone             {}", alone.row());
    println!("  three nodes (every gateway) {}", three.row());
    println!("  solo through its own node  {}", direct.row());
    println!("  solo forwarded             {}", forwarded.row());
    println!("  slow, node alone (3 inst.)  {}", slow_alone.row());
    println!("  slow, one gateway, 3 nodes  {}", slow_three.row());
    println!(
        "three nodes / one node: {:.2}x requests/s (same machine: the cluster's cost, not scale-out); forwarded / direct: {:.2}x requests/s, p50 {:.2}x, p99 {:.2}x; non-2xx or socket errors: {errors}",
        three.requests_per_second / alone.requests_per_second,
        forwarded.requests_per_second / direct.requests_per_second,
        forwarded.p50_ms / direct.p50_ms,
        forwarded.p99_ms / direct.p99_ms,
    );
    println!(
        "overflow: slow through one gateway of three nodes (one instance each) / node alone (three instances): {:.2}x requests/s, p50 {:.2}x, p99 {:.2}x (without overflow at most 0.33x)",
        slow_three.requests_per_second / slow_alone.requests_per_second,
        slow_three.p50_ms / slow_alone.p50_ms,
        slow_three.p99_ms / slow_alone.p99_ms,
    );
    let median = |mut runs: Vec<Measured>| -> Measured {
        runs.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
        runs.swap_remove(runs.len() / 2)
    };
    let (ea, et) = (median(events_alone), median(events_three));
    println!("events, {producers} producers over HTTP, 1 KiB each, median round:");
    for (name, m) in [
        ("one node alone (its log, fsync)", &ea),
        ("three nodes (JetStream R3, sync always)", &et),
    ] {
        println!(
            "  {name:<40} {:>8.0} events/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
            m.per_second(),
            m.p50_ms(),
            m.p99_ms()
        );
    }
    println!(
        "events: three nodes / one node: {:.2}x events/s, p99 {:.2}x",
        et.per_second() / ea.per_second(),
        et.p99_ms() / ea.p99_ms()
    );
    drop(single);
    drop(cluster);
    Ok(())
}
