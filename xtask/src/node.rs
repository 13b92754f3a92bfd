//! A `maru up` process run by a task, and the CLI pointed at it.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

pub struct MaruNode {
    pub binary: PathBuf,
    pub data: PathBuf,
    pub gateway: String,
    pub control: String,
    pub mqtt: String,
    /// The object store's S3 endpoint (`host:port`).
    pub s3: String,
    child: Option<Child>,
}

impl MaruNode {
    /// Start `maru up` on the given addresses (port 0: any free port) in a fresh data dir.
    pub fn start(
        binary: &Path,
        data: &Path,
        gateway: &str,
        control: &str,
        mqtt: &str,
        s3: &str,
        log: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_with(binary, data, [gateway, control, mqtt, s3], log, &[])
    }

    /// [`MaruNode::start`] with more arguments for `maru up` (e.g. `--config FILE`).
    pub fn start_with(
        binary: &Path,
        data: &Path,
        [gateway, control, mqtt, s3]: [&str; 4],
        log: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        if data.exists() {
            std::fs::remove_dir_all(data).with_context(|| format!("clear {}", data.display()))?;
        }
        std::fs::create_dir_all(data)?;
        let log =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        // The benchmarks' and the demo's clients speak plain HTTP and MQTT on loopback; the
        // demo says so, and `bench gateway` measures TLS on its own.
        // `--plain control,mqtt,s3` in `extra` serves the gateway over TLS.
        let plain =
            (!extra.contains(&"--plain")).then_some(("MARU_PLAIN", "gateway,control,mqtt,s3"));
        let child = Command::new(binary)
            .env_remove("MARU_PLAIN")
            .envs(plain)
            .args(["up", "--gateway", gateway, "--control", control])
            .args(["--mqtt", mqtt, "--s3", s3])
            .args(extra)
            .arg("--data")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start maru up")?;
        let mut node = MaruNode {
            binary: binary.to_path_buf(),
            data: data.to_path_buf(),
            gateway: String::new(),
            control: String::new(),
            mqtt: String::new(),
            s3: String::new(),
            child: Some(child),
        };
        let started = Instant::now();
        loop {
            if let Some(found) = std::fs::read_to_string(data.join("node.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            {
                node.gateway = found["gateway"].as_str().unwrap_or_default().to_string();
                node.control = found["control"].as_str().unwrap_or_default().to_string();
                node.mqtt = found["mqtt"].as_str().unwrap_or_default().to_string();
                node.s3 = found["s3"].as_str().unwrap_or_default().to_string();
                return Ok(node);
            }
            if let Some(status) = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("maru up exited with {status} before it was up; see its log");
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("maru up did not come up within 60 s");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Start `maru up` on free loopback ports, with its data in `dir/data` (cleared) and its
    /// log in `dir/maru.log`: the benchmarks' node.
    pub fn start_in(binary: &Path, dir: &Path) -> anyhow::Result<Self> {
        let any = "127.0.0.1:0";
        Self::start(
            binary,
            &dir.join("data"),
            any,
            any,
            any,
            any,
            &dir.join("maru.log"),
        )
    }

    /// The process id of `maru up`.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The token producers present to the gateway's `/events/` and the MQTT listener.
    pub fn ingest_token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.data.join("ingest.token"))
            .context("read the ingest token")?
            .trim()
            .to_string())
    }

    /// Run a CLI command against this node; returns stdout.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new(&self.binary)
            .args(args)
            .arg("--data")
            .arg(&self.data)
            .output()
            .with_context(|| format!("run maru {args:?}"))?;
        if !output.status.success() {
            bail!(
                "maru {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    pub fn ps(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.cli(&["ps", "--json"])?)?)
    }

    pub fn service(&self, app: &str, service: &str) -> anyhow::Result<serde_json::Value> {
        self.ps()?
            .as_array()
            .and_then(|all| {
                all.iter()
                    .find(|s| s["app"] == app && s["service"] == service)
                    .cloned()
            })
            .with_context(|| format!("{app}/{service} is not running"))
    }

    /// Wait for the process to exit on its own (Ctrl-C reaches it directly).
    pub fn wait(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take()
            && !terminate(&mut child, Duration::from_secs(30))?
        {
            child.kill()?;
            bail!("maru did not stop within 30 s of SIGTERM; killed it");
        }
        Ok(())
    }
}

/// Send `child` SIGTERM and wait up to `within` for it to exit; whether it did.
fn terminate(child: &mut Child, within: Duration) -> std::io::Result<bool> {
    _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let started = Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() >= within {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(true)
}

impl Drop for MaruNode {
    /// On an early return: SIGTERM first, so that maru stops its process services (killed
    /// -9, it would leave them running), SIGKILL after 10 s.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            _ = terminate(&mut child, Duration::from_secs(10));
            _ = child.kill();
            _ = child.wait();
        }
    }
}

/// `port` if nothing listens on it, else 0 (any free port).
pub fn free_or_any(port: u16) -> String {
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => format!("127.0.0.1:{port}"),
        Err(_) => "127.0.0.1:0".into(),
    }
}

/// Latency quantile (0..=1) of sorted samples, in milliseconds.
pub fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

/// A keep-alive HTTP/1.1 connection, as the load generators hold one per client.
pub struct KeepAlive {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl KeepAlive {
    pub fn open(address: &str) -> anyhow::Result<KeepAlive> {
        let stream =
            TcpStream::connect(address).with_context(|| format!("connect to {address}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(KeepAlive {
            reader: BufReader::with_capacity(1 << 20, stream.try_clone()?),
            writer: stream,
        })
    }

    /// Send a request to `url` (`http://host/path`); returns the status and the body's
    /// length (the body is read and dropped).
    pub fn exchange(&mut self, method: &str, url: &str, body: &[u8]) -> anyhow::Result<(u16, u64)> {
        let (host, path) = url
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').map(|at| rest.split_at(at)))
            .context("a URL with a path")?;
        self.send(method, host, path, "", body)
    }

    /// Send a request with extra header lines (each ending in `\r\n`); returns the status
    /// and the body's length (the body is read and dropped).
    pub fn send(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, u64)> {
        write!(
            self.writer,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Content-Length: {}\r\n\r\n",
            body.len()
        )?;
        self.writer.write_all(body)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no HTTP status in {line:?}"))?;
        let mut length = 0u64;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut remaining = length;
        let mut sink = vec![0u8; 1 << 16];
        while remaining > 0 {
            let take = remaining.min(sink.len() as u64) as usize;
            self.reader.read_exact(&mut sink[..take])?;
            remaining -= take as u64;
        }
        Ok((status, length))
    }
}
