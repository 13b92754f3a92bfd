//! `cargo xtask cluster`: a cluster on loopback to try: N NATS servers (a JetStream cluster
//! that syncs every write; nats-server from PyPI, pinned) and N Maru nodes joined to it,
//! examples/hello deployed on the first and served by every gateway. Serves until Ctrl-C
//! (or `--duration`), then stops everything. Files under target/cluster.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::env;
use crate::node::MaruNode;

#[derive(clap::Args)]
pub struct ClusterArgs {
    /// Nodes (and NATS servers): one NATS server and one Maru node each.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Stop after this long (e.g. 60s, 2m) instead of serving until Ctrl-C.
    #[arg(long)]
    duration: Option<String>,
}

/// `count` distinct free loopback ports (all held until every one is chosen).
fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let held = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// A cluster on loopback: its NATS servers and Maru nodes (stopped when dropped).
pub struct DevCluster {
    pub nodes: Vec<MaruNode>,
    pub servers: Vec<crate::bench_events::NatsServer>,
}

/// Start `count` NATS servers (a JetStream cluster that syncs every write) and as many
/// Maru nodes (`n1`, `n2`, …) joined to it, with their files under `dir`.
pub fn start(
    count: usize,
    dir: &std::path::Path,
    maru: &std::path::Path,
    nats: &std::path::Path,
) -> anyhow::Result<DevCluster> {
    let ports: Vec<(u16, u16, u16)> = free_ports(3 * count)?
        .chunks(3)
        .map(|p| (p[0], p[1], p[2]))
        .collect();
    let routes: Vec<String> = ports
        .iter()
        .map(|(_, route, _)| format!("\"nats-route://127.0.0.1:{route}\""))
        .collect();
    let mut servers = Vec::new();
    for (i, (client, route, http)) in ports.iter().enumerate() {
        let clustering = if count > 1 {
            format!(
                "cluster {{ name: maru-dev, listen: \"127.0.0.1:{route}\", routes: [{}] }}",
                routes.join(", ")
            )
        } else {
            String::new()
        };
        let config = dir.join(format!("nats-{i}.conf"));
        std::fs::write(
            &config,
            format!(
                "server_name: s{i}\nping_interval: \"1s\"\nping_max: 3\nlisten: \"127.0.0.1:{client}\"\nhttp: \"127.0.0.1:{http}\"\njetstream {{ store_dir: \"{}\", sync_interval: always }}\n{clustering}\n",
                dir.join(format!("nats-{i}")).display()
            ),
        )?;
        servers.push(crate::bench_events::NatsServer::spawn(
            nats,
            &config,
            &dir.join(format!("nats-{i}.log")),
        )?);
    }
    let urls: Vec<String> = ports
        .iter()
        .map(|(client, _, _)| format!("nats://127.0.0.1:{client}"))
        .collect();
    let monitors: Vec<String> = ports
        .iter()
        .map(|(_, _, http)| format!("http://127.0.0.1:{http}"))
        .collect();
    println!(
        "xtask: {} NATS servers (JetStream, sync_interval: always) at {}",
        count,
        urls.join(", ")
    );
    let (urls, monitors) = (urls.join(","), monitors.join(","));
    let mut nodes = Vec::new();
    for i in 1..=count {
        let name = format!("n{i}");
        let any = "127.0.0.1:0";
        let started = Instant::now();
        let node = MaruNode::start_with(
            maru,
            &dir.join(format!("{name}/data")),
            [any, any, any, any],
            &dir.join(format!("{name}.log")),
            &[
                "--name",
                &name,
                "--cluster",
                &urls,
                "--cluster-monitor",
                &monitors,
            ],
        )
        .with_context(|| {
            format!(
                "start node {name} (log: {})",
                dir.join(format!("{name}.log")).display()
            )
        })?;
        println!(
            "xtask: node {name} up in {:.1} s: gateway http://{}, control http://{}",
            started.elapsed().as_secs_f64(),
            node.gateway,
            node.control
        );
        nodes.push(node);
    }
    Ok(DevCluster { nodes, servers })
}

pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    if !(1..=9).contains(&args.nodes) {
        bail!("--nodes {} is out of range: use 1 to 9", args.nodes);
    }
    let duration = args
        .duration
        .as_deref()
        .map(crate::demo::parse_duration)
        .transpose()?;
    let nats = crate::bench_events::nats_syncing_server()?;
    let components = env::build_examples()?;
    let maru = env::build_maru_release()?;
    let dir = env::root().join("target/cluster");
    _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    let DevCluster { mut nodes, servers } = start(args.nodes, &dir, &maru, &nats)?;
    let hello = dir.join("hello.toml");
    std::fs::write(
        &hello,
        format!(
            "[app]\nname = \"hello\"\n\n[topic.\"demo.events\"]\n\n[service.hello]\ncomponent = \"{}\"\nroutes = [\"/hello\"]\n",
            components.join("hello.wasm").display()
        ),
    )?;
    print!(
        "{}",
        nodes[0].cli(&["deploy", hello.to_str().context("utf-8 path")?])?
    );
    for node in &nodes {
        let started = Instant::now();
        loop {
            let answer = ureq::get(&format!("http://{}/hello", node.gateway))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok());
            if let Some(body) = answer {
                println!(
                    "xtask: GET http://{}/hello -> {} (deployed on n1)",
                    node.gateway,
                    body.trim()
                );
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("{} did not serve /hello within 30 s", node.gateway);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Each node's list is as of its last heartbeat (every 2 s).
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let listed: serde_json::Value = serde_json::from_str(&nodes[0].cli(&["nodes", "--json"])?)?;
        if listed
            .as_array()
            .is_some_and(|all| all.len() == nodes.len())
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    print!("{}", nodes[0].cli(&["nodes"])?);
    // Topics are the cluster's: an event published on the first node is read on the last.
    let token = nodes[0].ingest_token()?;
    let posted = ureq::post(&format!("http://{}/events/demo.events", nodes[0].gateway))
        .header("Authorization", &format!("Bearer {token}"))
        .header("ce-partitionkey", "demo")
        .send("hello from n1".as_bytes())
        .context("publish an event on n1")?
        .status();
    println!("xtask: POST /events/demo.events on n1 -> {posted}");
    let last = nodes.last().context("one node at least")?;
    println!(
        "xtask: maru events tail demo.events on n{}:\n{}",
        nodes.len(),
        last.cli(&["events", "tail", "demo.events"])?
    );
    println!("\nTry (in another terminal):");
    println!(
        "  MARU_DATA={} target/release/maru nodes",
        dir.join("n2/data").display()
    );
    println!(
        "  MARU_DATA={} target/release/maru rm hello   # removed from every node",
        dir.join("n2/data").display()
    );
    println!(
        "  MARU_DATA={} target/release/maru events tail demo.events --follow   # events from every node",
        dir.join("n2/data").display()
    );
    match duration {
        Some(limit) => std::thread::sleep(limit),
        None => {
            println!("\nServing until Ctrl-C.");
            nodes[0].wait()?;
        }
    }
    for node in &mut nodes {
        _ = node.stop();
    }
    drop(servers);
    println!("xtask: cluster stopped");
    Ok(())
}
