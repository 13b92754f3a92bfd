//! Starting and stopping a `maru` node, and talking to it.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const MARU: &str = env!("CARGO_BIN_EXE_maru");

/// The examples workspace, built once per test run for wasm32-wasip2.
pub fn component(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").canonicalize().map_err(|e| e.to_string())?;
        let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--quiet", "--target", "wasm32-wasip2", "--manifest-path"])
            .arg(examples.join("Cargo.toml"))
            .output()
            .map_err(|e| format!("run cargo: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "building the example components failed (is the wasm32-wasip2 target installed? `cargo xtask test` installs it):\n{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(examples.join("target/wasm32-wasip2/release"))
    });
    match dir {
        Ok(dir) => dir.join(format!("{name}.wasm")),
        Err(error) => panic!("{error}"),
    }
}

/// An HTTP client for the node's listeners: trusting the node's CA when it serves TLS.
pub fn agent_for(node: &Node, timeout: Duration) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout));
    if node.tls {
        let pem = std::fs::read(node.data.join("tls/ca.pem")).expect("the node CA");
        let certificates = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect::<Vec<_>>();
        config = config.tls_config(
            ureq::tls::TlsConfig::builder()
                .provider(ureq::tls::TlsProvider::Rustls)
                .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(
                    certificates,
                )))
                .build(),
        );
    }
    config.build().into()
}

pub struct Node {
    child: Option<Child>,
    pub data: PathBuf,
    _dir: Option<tempfile::TempDir>,
    pub gateway: String,
    pub control: String,
    pub mqtt: String,
    /// The object store's S3 endpoint (`host:port`).
    pub s3: String,
    pub token: String,
    /// The token event producers present.
    pub ingest_token: String,
    /// Whether the listeners speak TLS (the node's default). Most tests run them plain
    /// (`MARU_PLAIN`), so their clients need no CA; `tls.rs` tests TLS itself.
    pub tls: bool,
    /// The network namespace it runs in (and its CLI with it), if not the test's own, and
    /// the address its listeners bind.
    netns: Option<String>,
    bind: String,
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

impl Node {
    /// Start a node in a fresh temporary data directory.
    pub fn start() -> Node {
        Self::start_with_config("")
    }

    /// Start a node whose data directory holds a `node.toml` with this `[node]` body.
    pub fn start_with_config(node_config: &str) -> Node {
        Self::start_configured(node_config, false)
    }

    /// A node with its defaults: every listener over TLS, with the node CA.
    pub fn start_tls(node_config: &str) -> Node {
        Self::start_configured(node_config, true)
    }

    /// A node run in the network namespace `netns`, listening on `ip` there (`ip netns
    /// exec`; the namespace is the test's to make).
    pub fn start_in_netns(netns: &str, ip: &str, node_config: &str) -> Node {
        Self::start_full(node_config, false, Some(netns.to_string()), ip)
    }

    fn start_configured(node_config: &str, tls: bool) -> Node {
        Self::start_full(node_config, tls, None, "127.0.0.1")
    }

    fn start_full(node_config: &str, tls: bool, netns: Option<String>, bind: &str) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("create data dir");
        std::fs::write(
            dir.path().join("node.toml"),
            format!("[node]\n{node_config}\n"),
        )
        .expect("write node config");
        let mut node = Node {
            child: None,
            data,
            _dir: Some(dir),
            gateway: String::new(),
            control: String::new(),
            mqtt: String::new(),
            s3: String::new(),
            token: String::new(),
            ingest_token: String::new(),
            tls,
            netns,
            bind: bind.to_string(),
        };
        node.launch();
        node
    }

    fn config_path(&self) -> PathBuf {
        self.data
            .parent()
            .expect("data dir has a parent")
            .join("node.toml")
    }

    /// Start `maru up` on this node's data directory, logging to the test's log file.
    fn spawn(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.join("../maru.log"))
            .expect("open node log");
        let any = format!("{}:0", self.bind);
        self.command()
            .args(["up", "--gateway", &any, "--control", &any])
            .args(["--mqtt", &any, "--s3", &any, "--data"])
            .arg(&self.data)
            .arg("--config")
            .arg(self.config_path())
            .env("MARU_LOG", "info")
            .env_remove("MARU_PLAIN")
            .envs((!self.tls).then_some(("MARU_PLAIN", "gateway,control,mqtt,s3")))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("start maru up")
    }

    fn launch(&mut self) {
        _ = std::fs::remove_file(self.data.join("node.json"));
        self.child = Some(self.spawn());
        let started = Instant::now();
        loop {
            if let Some(node) = std::fs::read_to_string(self.data.join("node.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            {
                self.gateway = node["gateway"]
                    .as_str()
                    .expect("gateway address")
                    .to_string();
                self.control = node["control"]
                    .as_str()
                    .expect("control address")
                    .to_string();
                self.mqtt = node["mqtt"].as_str().expect("mqtt address").to_string();
                self.s3 = node["s3"].as_str().expect("s3 address").to_string();
                break;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "maru up exited with {status} before it was up:\n{}",
                    self.log()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "maru up did not come up in 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.token = std::fs::read_to_string(self.data.join("token"))
            .expect("token file")
            .trim()
            .to_string();
        self.ingest_token = std::fs::read_to_string(self.data.join("ingest.token"))
            .expect("ingest token file")
            .trim()
            .to_string();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("../maru.log")).unwrap_or_default()
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("node is running");
        match terminate(&mut child, Duration::from_secs(30)) {
            Some(status) => assert!(
                status.success(),
                "maru exited with {status} after SIGTERM:\n{}",
                self.log()
            ),
            None => {
                _ = child.kill();
                panic!("maru did not exit within 30 s of SIGTERM:\n{}", self.log());
            }
        }
    }

    /// The running maru's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is running").id()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("node is running");
        child.kill().expect("SIGKILL maru");
        child.wait().expect("reap maru");
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the node first");
        self.launch();
    }

    /// Start maru and SIGKILL it `after` later, whatever it is doing then (recovering its
    /// topics, reconciling, serving): a crash during recovery.
    pub fn start_and_kill(&mut self, after: Duration) {
        assert!(self.child.is_none(), "stop or kill the node first");
        let mut child = self.spawn();
        std::thread::sleep(after);
        _ = child.kill();
        child.wait().expect("reap maru");
    }

    /// `maru`, in the node's network namespace if it has one (`ip netns exec` runs the
    /// program itself, so the child is maru).
    fn command(&self) -> Command {
        match &self.netns {
            None => Command::new(MARU),
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, MARU]);
                command
            }
        }
    }

    /// The CLI against this node, with its own config directory (where `maru login` keeps
    /// its token), never the machine's.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut command = self.command();
        command
            .args(args)
            .arg("--data")
            .arg(&self.data)
            .env_remove("MARU_TOKEN")
            .env_remove("MARU_CONTROL")
            .env("MARU_CONFIG_DIR", self.data.with_file_name("cli-config"));
        command
    }

    /// Run the CLI against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().expect("run maru CLI")
    }

    /// Run the CLI with `input` on its standard input.
    pub fn cli_input(&self, args: &[&str], input: &str, env: &[(&str, &str)]) -> Output {
        let mut command = self.cli_command(args);
        command.envs(env.iter().copied());
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run maru CLI");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("run maru CLI")
    }

    /// Run the CLI and insist that it succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "maru {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub fn ps(&self) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["ps", "--json"])).expect("ps --json is JSON")
    }

    pub fn service(&self, app: &str, service: &str) -> serde_json::Value {
        self.ps()
            .as_array()
            .expect("ps is a list")
            .iter()
            .find(|s| s["app"] == app && s["service"] == service)
            .cloned()
            .unwrap_or_else(|| panic!("{app}/{service} is not running:\n{}", self.log()))
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        let url = format!("http://{}{path}", self.gateway);
        let agent = agent();
        let response = match (method, body) {
            ("GET", _) => agent.get(&url).call(),
            ("POST", Some(body)) => agent.post(&url).send(body),
            ("POST", None) => agent.post(&url).send_empty(),
            _ => panic!("unsupported method {method}"),
        };
        finish(response.unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log())))
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    /// A control API call with the given token (None: no Authorization header).
    pub fn control_api(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Response {
        let url = format!("http://{}{path}", self.control);
        let agent = agent();
        let auth = token.map(|t| format!("Bearer {t}"));
        let response = match method {
            "GET" => {
                let request = agent.get(&url);
                match &auth {
                    Some(a) => request.header("Authorization", a).call(),
                    None => request.call(),
                }
            }
            "POST" => {
                let request = agent.post(&url).header("Content-Type", "application/json");
                let request = match &auth {
                    Some(a) => request.header("Authorization", a),
                    None => request,
                };
                request.send(body.unwrap_or("{}"))
            }
            "DELETE" => {
                let request = agent.delete(&url);
                match &auth {
                    Some(a) => request.header("Authorization", a).call(),
                    None => request.call(),
                }
            }
            _ => panic!("unsupported method {method}"),
        };
        finish(response.expect("control API call"))
    }

    /// Write a manifest into the test's directory and return its path.
    pub fn manifest(&self, name: &str, text: &str) -> PathBuf {
        let path = self.data.parent().expect("parent").join(name);
        std::fs::write(&path, text).expect("write manifest");
        path
    }

    pub fn deploy(&self, name: &str, text: &str) -> String {
        let path = self.manifest(name, text);
        self.cli_ok(&["deploy", path.to_str().expect("utf-8 path")])
    }

    /// Poll until `check` holds, for at most `limit`; panics with `what` otherwise.
    pub fn wait_for(&self, what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
        let started = Instant::now();
        while !check() {
            assert!(
                started.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A raw TCP connection to the gateway.
    pub fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(&self.gateway).expect("connect to gateway");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("set timeout");
        stream
    }
}

fn finish(mut response: ureq::http::Response<ureq::Body>) -> Response {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    Response {
        status,
        headers,
        body,
    }
}

/// Send raw bytes and read until the server closes or `limit` passes; returns what was read
/// and whether the server closed the connection.
pub fn raw_exchange(stream: &mut TcpStream, send: &[u8], limit: Duration) -> (String, bool) {
    stream.write_all(send).expect("send");
    stream.set_read_timeout(Some(limit)).expect("set timeout");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return (String::from_utf8_lossy(&received).into_owned(), true),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (String::from_utf8_lossy(&received).into_owned(), false);
            }
            Err(_reset) => return (String::from_utf8_lossy(&received).into_owned(), true),
        }
    }
}

/// Send `child` SIGTERM and wait up to `within` for it to exit; its status if it did.
fn terminate(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if started.elapsed() < within => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => return None,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first, so that maru stops its process services: a node killed -9
            // leaves them running until its next start reaps them, and a dropped node has
            // none. SIGKILL if it has not exited within 10 s.
            _ = terminate(&mut child, Duration::from_secs(10));
            _ = child.kill();
            _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- maru log ---\n{}", self.log());
        }
    }
}

/// A manifest for the test guest with the given extra service fields.
pub fn misbehave_manifest(app: &str, route: &str, extra: &str) -> String {
    format!(
        "[app]\nname = \"{app}\"\n\n[service.guest]\ncomponent = \"{}\"\nroutes = [\"{route}\"]\n{extra}\n",
        component("misbehave").display()
    )
}

pub fn hello_manifest(greeting: &str) -> String {
    format!(
        "[app]\nname = \"hello\"\n\n[service.hello]\ncomponent = \"{}\"\nroutes = [\"/hello\"]\nenv = {{ GREETING = \"{greeting}\" }}\n",
        component("hello").display()
    )
}
