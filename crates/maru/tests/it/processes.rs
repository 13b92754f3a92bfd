//! Process services: real programs (examples/legacy-app, Python) behind the same gateway,
//! scaling and healing.

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::{Node, raw_exchange};

fn app_py() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/legacy-app/app.py")
        .canonicalize()
        .expect("examples/legacy-app/app.py")
}

/// A manifest for the legacy app with extra service fields. It runs in its own directory
/// (the manifest's, the test's directory, holds the node's data, which a process may not
/// be given to write).
fn legacy(app: &str, route: &str, extra: &str) -> String {
    let app_py = app_py();
    format!(
        "[app]\nname = \"{app}\"\n\n[service.registry]\ncommand = [\"python3\", \"{}\"]\nworkdir = \"{}\"\nroutes = [\"{route}\"]\nready = {{ http = \"/healthz\", timeout = \"20s\" }}\n{extra}\n",
        app_py.display(),
        app_py.parent().expect("a directory").display()
    )
}

fn pid_of(body: &str) -> u32 {
    let value: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    value["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid in {body}")) as u32
}

fn alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would still count as alive here.
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_process_service_is_routed_and_scales_from_zero_waiting_for_readiness() {
    let node = Node::start();
    let out = node.deploy(
        "legacy.toml",
        &legacy(
            "permits",
            "/permits",
            "env = { STARTUP_MS = \"700\" }\nidle_timeout = \"1s\"\nmemory = \"512MiB\"\ncpu_time = \"1h\"",
        ),
    );
    assert!(out.contains("permits: revision 1 now serving"), "{out}");
    let service = node.service("permits", "registry");
    assert_eq!(
        (
            service["kind"].as_str(),
            service["instances_ready"].as_u64()
        ),
        (Some("process"), Some(0))
    );

    // The first request arrives with no instance; it waits for the program to load, not fails.
    let permit = node.get("/permits/7");
    assert_eq!(permit.status, 200, "{}", permit.body);
    assert!(permit.body.contains("\"id\": 7"), "{}", permit.body);
    let listing = node.get("/permits");
    let pid = pid_of(&listing.body);
    let limits =
        std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read the process's limits");
    let address_space = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))
        .expect("address space line");
    assert!(
        address_space.contains(&(512u64 << 20).to_string()),
        "memory = 512MiB is in force as RLIMIT_AS: {address_space}"
    );
    let cpu = limits
        .lines()
        .find(|l| l.starts_with("Max cpu time"))
        .expect("cpu time line");
    assert!(
        cpu.contains("3600"),
        "cpu_time = 1h is in force as RLIMIT_CPU: {cpu}"
    );

    let service = node.service("permits", "registry");
    let startup = service["startup_last_ms"]
        .as_f64()
        .expect("startup time measured");
    assert!(
        startup >= 700.0,
        "startup includes the program's 700 ms load: {service}"
    );
    let metrics = node
        .control_api("GET", "/metrics", Some(&node.token), None)
        .body;
    assert!(
        metrics.contains("maru_instance_startup_last_seconds{app=\"permits\",service=\"registry\""),
        "{metrics}"
    );
    let ps = node.cli_ok(&["ps"]);
    assert!(
        ps.contains("STARTUP ms") && ps.contains("permits/registry") && ps.contains("process"),
        "{ps}"
    );
    node.wait_for("program output in the log", Duration::from_secs(5), || {
        node.cli_ok(&["logs", "permits/registry"])
            .contains("listening on")
    });

    // Idle past idle_timeout: scaled to zero, and the program is gone.
    node.wait_for("scale down to zero", Duration::from_secs(15), || {
        node.service("permits", "registry")["instances_ready"] == 0
    });
    node.wait_for("the process to exit", Duration::from_secs(10), || {
        !alive(pid)
    });
    let logs = node.cli_ok(&["logs", "permits/registry"]);
    assert!(
        logs.contains("stopped (exit status: 0)") || logs.contains("stopped (signal: 15"),
        "{logs}"
    );
}

/// Hardening defect 8: a process service inherited maru's whole environment. It now gets
/// only `PATH`, `PORT`, its own `TMPDIR` and its manifest's `env`.
#[test]
fn a_process_sees_only_the_environment_its_manifest_gives() {
    let node = Node::start();
    node.deploy(
        "legacy.toml",
        &legacy(
            "permits",
            "/permits",
            "env = { STARTUP_MS = \"0\", CITY = \"Seoul\" }",
        ),
    );
    let answer = node.get("/permits/environment");
    assert_eq!(answer.status, 200, "{}", answer.body);
    let value: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
    let mut names: Vec<&str> = value["names"]
        .as_array()
        .expect("names")
        .iter()
        .filter_map(|n| n.as_str())
        // Python's runtime may add its own (LC_CTYPE under some locales).
        .filter(|n| !n.starts_with("LC_"))
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["CITY", "PATH", "PORT", "STARTUP_MS", "TMPDIR"],
        "maru's environment leaked"
    );
    // The data directory (token, state, artifacts maru executes) is private to maru's user,
    // though the test created it open.
    use std::os::unix::fs::PermissionsExt as _;
    for dir in [node.data.clone(), node.data.join("compiled")] {
        let mode = std::fs::metadata(&dir)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700, "{} has mode {mode:o}", dir.display());
    }
}

/// Hardening defect 10: a client's `X-Forwarded-For` passed through unchanged, headers named
/// in `Connection` reached the service, and a request with two `Host` headers was routed.
#[test]
fn the_gateway_names_the_client_strips_hop_by_hop_headers_and_refuses_two_hosts() {
    let node = Node::start();
    node.deploy(
        "legacy.toml",
        &legacy("permits", "/permits", "env = { STARTUP_MS = \"0\" }"),
    );
    let (answer, _) = raw_exchange(
        &mut node.connect(),
        b"GET /permits/headers HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\nForwarded: for=203.0.113.9\r\nConnection: close, X-Internal\r\nX-Internal: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\r\n",
        Duration::from_secs(30),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).expect("a body");
    let seen: serde_json::Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert_eq!(seen["forwarded"], "for=127.0.0.1", "{seen}");
    for hop in ["x-internal", "keep-alive", "te"] {
        assert!(seen.get(hop).is_none(), "{hop} was forwarded: {seen}");
    }
    let (answer, _) = raw_exchange(
        &mut node.connect(),
        b"GET /permits/headers HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(30),
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("2 Host headers"), "{answer}");
}

#[test]
fn a_crashed_process_is_replaced() {
    let node = Node::start();
    node.deploy(
        "legacy.toml",
        &legacy("crashy", "/c", "env = { STARTUP_MS = \"0\" }"),
    );
    let first = pid_of(&node.get("/c").body);
    let crash = node.get("/c/crash");
    assert_eq!(crash.status, 502, "{}", crash.body);
    assert!(
        crash.body.contains("\"code\":\"bad_gateway\""),
        "{}",
        crash.body
    );
    node.wait_for("a replacement to serve", Duration::from_secs(15), || {
        let response = node.get("/c");
        response.status == 200 && pid_of(&response.body) != first
    });
    let logs = node.cli_ok(&["logs", "crashy/registry"]);
    assert!(logs.contains("exited (exit status: 3)"), "{logs}");
    assert_eq!(node.service("crashy", "registry")["state"], "running");
}

#[test]
fn a_crash_loop_marks_the_service_failed_with_the_reason() {
    let node = Node::start();
    node.deploy(
        "legacy.toml",
        &legacy(
            "loopy",
            "/l",
            "env = { STARTUP_MS = \"0\", CRASH_AT_START = \"1\" }\ntimeout = \"30s\"",
        ),
    );
    let response = node.get("/l");
    assert_eq!(response.status, 503, "{}", response.body);
    assert!(
        response.body.contains("\"code\":\"service_failed\"")
            && response.body.contains("crash loop"),
        "{}",
        response.body
    );
    let service = node.service("loopy", "registry");
    assert_eq!(service["state"], "failed", "{service}");
    assert!(
        service["failure"]
            .as_str()
            .is_some_and(|f| f.contains("5 crashes")),
        "{service}"
    );
    let ps = node.cli_ok(&["ps"]);
    assert!(ps.contains("FAILED: crash loop"), "{ps}");
    let logs = node.cli_ok(&["logs", "loopy/registry"]);
    assert!(
        logs.contains("cannot open the permit database"),
        "the program's own stderr explains why: {logs}"
    );
    assert!(logs.contains("service failed: crash loop"), "{logs}");
    // Later requests are refused at once, not queued.
    assert_eq!(node.get("/l").status, 503);
}

#[test]
fn a_hung_process_is_killed_and_replaced() {
    let node = Node::start();
    node.deploy(
        "legacy.toml",
        &legacy(
            "hangs",
            "/h",
            "env = { STARTUP_MS = \"0\" }\ntimeout = \"2s\"\nliveness = { http = \"/healthz\", interval = \"200ms\", timeout = \"200ms\", failures = 2 }",
        ),
    );
    let first = pid_of(&node.get("/h").body);
    // The request that hung it fails when the liveness probe kills the process (well
    // before its 2 s deadline would give 504).
    let hang = node.get("/h/hang");
    assert!(
        hang.status == 502 || hang.status == 504,
        "{} {}",
        hang.status,
        hang.body
    );
    node.wait_for(
        "the liveness probe to kill it",
        Duration::from_secs(15),
        || {
            node.cli_ok(&["logs", "hangs/registry"])
                .contains("failed its liveness probe 2 times in a row; killed")
        },
    );
    node.wait_for(
        "the hung process to be gone",
        Duration::from_secs(10),
        || !alive(first),
    );
    node.wait_for("a replacement to serve", Duration::from_secs(15), || {
        let response = node.get("/h");
        response.status == 200 && pid_of(&response.body) != first
    });
}

#[test]
fn no_process_outlives_a_killed_maru_after_the_next_start() {
    let mut node = Node::start();
    node.deploy(
        "legacy.toml",
        &legacy(
            "sticky",
            "/s",
            "env = { STARTUP_MS = \"0\" }\ninstances = { min = 1, max = 2 }",
        ),
    );
    let pid = pid_of(&node.get("/s").body);
    node.kill();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        alive(pid),
        "with maru killed -9 its process is orphaned (this is what the next start must clean up)"
    );
    node.restart();
    node.wait_for("the orphan to be reaped", Duration::from_secs(10), || {
        !alive(pid)
    });
    assert!(
        node.log()
            .contains("killed a process left over from an earlier run"),
        "{}",
        node.log()
    );
    // And the service runs again, from a fresh process.
    node.wait_for(
        "the service to serve again",
        Duration::from_secs(15),
        || {
            let response = node.get("/s");
            response.status == 200 && pid_of(&response.body) != pid
        },
    );
}

#[test]
fn a_stopped_maru_stops_its_processes() {
    let mut node = Node::start();
    node.deploy(
        "legacy.toml",
        &legacy(
            "steady",
            "/st",
            "env = { STARTUP_MS = \"0\" }\ninstances = { min = 1, max = 2 }",
        ),
    );
    let pid = pid_of(&node.get("/st").body);
    node.stop();
    let started = std::time::Instant::now();
    while alive(pid) && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !alive(pid),
        "process {pid} outlived maru's SIGTERM shutdown"
    );
}

#[test]
fn a_command_that_does_not_exist_is_rejected_at_deploy() {
    let node = Node::start();
    let manifest = "[app]\nname = \"ghost\"\n\n[service.web]\ncommand = [\"no-such-program-maru-test\", \"--port\", \"{port}\"]\nroutes = [\"/ghost\"]\n";
    let path = node.manifest("ghost.toml", manifest);
    let output = node.cli(&["deploy", path.to_str().expect("utf-8")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ghost.toml:5:11: `service.web.command`: command `no-such-program-maru-test` was not found on the node's PATH"), "{stderr}");
    let relative = manifest.replace("no-such-program-maru-test", "./bin/missing");
    let path = node.manifest("ghost2.toml", &relative);
    let stderr =
        String::from_utf8_lossy(&node.cli(&["deploy", path.to_str().expect("utf-8")]).stderr)
            .into_owned();
    assert!(
        stderr.contains("command `./bin/missing` is not an executable file"),
        "{stderr}"
    );
    assert!(node.cli_ok(&["apps"]).contains("no apps deployed"));
}

/// A program that tries, on `GET /probe`, to reach what a process service must not, and
/// what it may; it answers with what happened to each attempt ("ok" or the error).
const PROBE_PY: &str = r#"
import http.server, json, os, tempfile

def attempt(action):
    try:
        result = action()
        return "ok" if result is None else result
    except OSError as error:
        return type(error).__name__

def write(path):
    with open(path, "w") as f:
        f.write("x")

def probe():
    data, other, writable = os.environ["NODE_DATA"], os.environ["OTHER_DIR"], os.environ["WRITABLE_DIR"]
    tmpdir = os.environ.get("TMPDIR", "/tmp")
    maru = int(os.environ["MARU_PID"])
    block = next((d for d in ["/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/xvda"] if os.path.exists(d)), None)
    status = open("/proc/self/status").read()
    return {
        "read_token": attempt(lambda: open(os.path.join(data, "token")).read() and None),
        "list_data": attempt(lambda: os.listdir(data) and None),
        "write_compiled": attempt(lambda: write(os.path.join(data, "compiled", "planted.cwasm"))),
        "read_other_app": attempt(lambda: open(os.path.join(other, "secret.txt")).read() and None),
        "write_beside_tmpdir": attempt(lambda: write(os.path.join(os.path.dirname(tmpdir), "escape"))),
        "write_tmp": attempt(lambda: write("/tmp/maru-probe-escape-%d" % os.getpid())),
        "signal_maru": attempt(lambda: os.kill(maru, 0)),
        "read_maru_environ": attempt(lambda: open("/proc/%d/environ" % maru, "rb").read() and None),
        "read_block_device": attempt(lambda: open(block, "rb").read(1) and None) if block else "PermissionError",
        "write_workdir": attempt(lambda: write("out.txt")),
        "write_tmpdir": attempt(lambda: tempfile.NamedTemporaryFile(dir=tmpdir).close()),
        "write_writable": attempt(lambda: write(os.path.join(writable, "out.txt"))),
        "read_system": attempt(lambda: open("/etc/hostname").read() and None),
        "null_device": attempt(lambda: write("/dev/null")),
        "capabilities": [line.split()[1] for line in status.splitlines() if line.startswith("CapEff")][0],
        "uid": str(os.getuid()),
    }

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(probe() if self.path.endswith("/probe") else {}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// Two apps' directories beside the node's data: `other-app/secret.txt`, and `probe-app`
/// with the probe program, plus a directory the probe may write.
fn probe_layout(node: &Node) -> (PathBuf, PathBuf, PathBuf) {
    let base = node.data.parent().expect("parent").to_path_buf();
    let (other, probe, writable) = (
        base.join("other-app"),
        base.join("probe-app"),
        base.join("probe-out"),
    );
    for dir in [&other, &probe, &writable] {
        std::fs::create_dir_all(dir).expect("create dir");
    }
    std::fs::write(other.join("secret.txt"), "another app's data").expect("write");
    std::fs::write(other.join("probe.py"), PROBE_PY).expect("write");
    std::fs::write(probe.join("probe.py"), PROBE_PY).expect("write");
    (other, probe, writable)
}

fn probe_manifest(app: &str, workdir: &str, extra: &str) -> String {
    format!(
        "[app]\nname = \"{app}\"\n\n[service.probe]\ncommand = [\"python3\", \"probe.py\"]\nworkdir = \"{workdir}\"\nroutes = [\"/{app}\"]\nready = {{ tcp = true, timeout = \"20s\" }}\n{extra}\n"
    )
}

fn probe(node: &Node, app: &str) -> serde_json::Value {
    let answer = node.get(&format!("/{app}/probe"));
    assert_eq!(answer.status, 200, "{}\n{}", answer.body, node.log());
    serde_json::from_str(&answer.body).expect("JSON")
}

fn maru_pid(node: &Node) -> u64 {
    let text = std::fs::read_to_string(node.data.join("node.json")).expect("node.json");
    serde_json::from_str::<serde_json::Value>(&text).expect("JSON")["pid"]
        .as_u64()
        .expect("pid")
}

/// Hardening defect 8: a process service ran with maru's privileges: it could read the
/// node's token and state, write `compiled/` (native code maru loads), read other apps'
/// files and signal maru. It now runs in a Landlock sandbox without capabilities.
#[test]
fn a_process_cannot_read_or_change_the_nodes_data_nor_other_apps() {
    let node = Node::start();
    let (other, _, writable) = probe_layout(&node);
    let env = |dir: &str| {
        format!(
            "env = {{ NODE_DATA = \"{}\", OTHER_DIR = \"{}\", WRITABLE_DIR = \"{}\", MARU_PID = \"{}\" }}",
            node.data.display(),
            other.display(),
            writable.display(),
            maru_pid(&node)
        ) + dir
    };
    node.deploy(
        "other.toml",
        &probe_manifest("other", "other-app", &env("")),
    );
    node.deploy(
        "probe.toml",
        &probe_manifest("probe", "probe-app", &env("\nwritable = [\"probe-out\"]")),
    );
    let seen = probe(&node, "probe");
    let denied = [
        "read_token",
        "list_data",
        "write_compiled",
        "read_other_app",
        "write_beside_tmpdir",
        "write_tmp",
        "signal_maru",
        "read_maru_environ",
        "read_block_device",
    ];
    for attempt in denied {
        assert_eq!(seen[attempt], "PermissionError", "{attempt}: {seen}");
    }
    for attempt in [
        "write_workdir",
        "write_tmpdir",
        "write_writable",
        "read_system",
        "null_device",
    ] {
        assert_eq!(seen[attempt], "ok", "{attempt}: {seen}");
    }
    assert_eq!(seen["capabilities"], "0000000000000000", "{seen}");
    assert!(!node.data.join("compiled/planted.cwasm").exists());
    // The other app may read its own directory.
    assert_eq!(probe(&node, "other")["read_other_app"], "ok");
    let log = node.cli_ok(&["logs", "probe/probe"]);
    assert!(log.contains("confinement: Landlock"), "{log}");
}

#[test]
fn writable_directories_and_users_are_checked_at_deploy() {
    let node = Node::start();
    probe_layout(&node);
    let refused = |manifest: &str, expected: &str| {
        let path = node.manifest("bad.toml", manifest);
        let output = node.cli(&["deploy", path.to_str().expect("utf-8")]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(expected),
            "{stderr}"
        );
    };
    refused(
        &probe_manifest("bad", "probe-app", "writable = [\"data/compiled\"]"),
        "holds or lies in the node's data directory",
    );
    refused(&probe_manifest("bad", ".", ""), "`service.probe.workdir`");
    refused(
        &probe_manifest("bad", "probe-app", "writable = [\"nowhere\"]"),
        "is not a directory on the node",
    );
    refused(
        &probe_manifest("bad", "probe-app", "user = \"no-such-user-maru\""),
        if nix_is_root() {
            "user `no-such-user-maru` does not exist on the node"
        } else {
            "maru does not run as root"
        },
    );
    assert!(node.cli_ok(&["apps"]).contains("no apps deployed"));
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// As root, `user` runs the program as that account.
#[test]
fn a_process_runs_as_the_user_its_manifest_names() {
    if !nix_is_root() {
        // Covered by the deploy check above: without root, `user` is refused.
        return;
    }
    let node = Node::start();
    let (other, probe_dir, writable) = probe_layout(&node);
    // nobody must reach its directory: the test's directory is private to root.
    use std::os::unix::fs::PermissionsExt as _;
    let base = node.data.parent().expect("parent");
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    std::fs::set_permissions(&probe_dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let env = format!(
        "env = {{ NODE_DATA = \"{}\", OTHER_DIR = \"{}\", WRITABLE_DIR = \"{}\", MARU_PID = \"{}\" }}\nuser = \"nobody\"\nwritable = [\"probe-out\"]",
        node.data.display(),
        other.display(),
        writable.display(),
        maru_pid(&node)
    );
    node.deploy("probe.toml", &probe_manifest("probe", "probe-app", &env));
    let seen = probe(&node, "probe");
    assert_eq!(seen["uid"], "65534", "{seen}");
    assert_eq!(seen["read_token"], "PermissionError", "{seen}");
    assert_eq!(seen["write_tmpdir"], "ok", "{seen}");
    assert_eq!(seen["write_writable"], "ok", "{seen}");
    assert_eq!(seen["capabilities"], "0000000000000000", "{seen}");
}

/// The control experiment: with isolation turned off, the same probe reads the token, so
/// the denials above come from the sandbox and not from the test's layout.
#[test]
fn without_isolation_the_probe_reads_the_token() {
    let node = Node::start_with_config("process_isolation = \"none\"");
    let (other, _, writable) = probe_layout(&node);
    let env = format!(
        "env = {{ NODE_DATA = \"{}\", OTHER_DIR = \"{}\", WRITABLE_DIR = \"{}\", MARU_PID = \"{}\" }}",
        node.data.display(),
        other.display(),
        writable.display(),
        maru_pid(&node)
    );
    node.deploy("probe.toml", &probe_manifest("probe", "probe-app", &env));
    let seen = probe(&node, "probe");
    assert_eq!(seen["read_token"], "ok", "{seen}");
    assert_eq!(seen["read_other_app"], "ok", "{seen}");
    assert!(node.log().contains("process services run unconfined"));
}
