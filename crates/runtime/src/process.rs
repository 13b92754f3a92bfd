//! Process instances: an existing program, started on a free loopback port, supervised, and
//! reached over HTTP.
//!
//! Every instance runs in its own process group, so stopping it stops everything it started.
//! Each live group is recorded in `DATA/processes/<pid>.json` until it is stopped; if `maru`
//! itself dies without stopping them, the next `maru up` finds the records and kills the
//! leftover groups ([`reap_leftovers`]) before it starts anything. A record names the boot
//! it was written in: after a reboot its pid belongs to somebody else.
//!
//! A group is only ever signalled while its leader is alive or an unreaped zombie: Linux
//! does not hand out a pid (nor so a group id) while its process has not been reaped, so
//! the signal cannot reach a group that a reused pid leads. The leader's exit is watched
//! with `waitid(WNOWAIT)`, the rest of its group killed, and only then is it reaped.
//!
//! Limits: memory (`RLIMIT_AS`) and total CPU time (`RLIMIT_CPU`) are set before the program
//! executes, by the sandbox's launcher ([`crate::sandbox`]), which also confines it, or,
//! with isolation turned off, by util-linux `prlimit`. cgroup v2 is detected ([`limits_in_force`]) but not
//! used yet, so there is no CPU *share* limit.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

use crate::logs::{LogStream, ServiceLog};
use crate::sandbox::{Policy, Sandbox};

/// How readiness or liveness is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET path` must answer 2xx or 3xx.
    Http(String),
    /// A TCP connection to the port must succeed.
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivenessProbe {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures before the instance is killed and replaced.
    pub failures: u32,
}

/// Everything needed to start instances of one process service.
#[derive(Clone)]
pub struct ProcessSpec {
    /// Program and arguments; `{port}` is replaced by the instance's port.
    pub command: Vec<String>,
    pub workdir: PathBuf,
    pub env: Vec<(String, String)>,
    pub ready: Probe,
    pub ready_timeout: Duration,
    pub liveness: Option<LivenessProbe>,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    pub memory_bytes_max: Option<u64>,
    /// Total CPU seconds one instance may use (`RLIMIT_CPU`); a runaway guard, not a share.
    pub cpu_seconds_max: Option<u64>,
    pub log: Arc<ServiceLog>,
    /// `DATA/processes`, which must exist: where live process groups are recorded.
    pub registry: PathBuf,
    /// How instances are confined; `None` runs them unconfined (`process_isolation =
    /// "none"`), with the limits set through util-linux `prlimit`.
    pub isolation: Option<Arc<Isolation>>,
}

/// One service's confinement: the node's sandbox and what this service adds to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    pub sandbox: Sandbox,
    /// Hidden from this service besides the node's own hidden paths: other apps' working
    /// and writable directories.
    pub hidden: Vec<PathBuf>,
    /// The manifest's `writable` directories, resolved.
    pub writable: Vec<PathBuf>,
    pub user: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("start `{program}`: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("exited before it was ready ({0})")]
    ExitedEarly(String),
    #[error("not ready within {0:?} (readiness probe: {1})")]
    NotReady(Duration, String),
    #[error(
        "port {0} was taken by another program before this one listened on it; retrying on another port"
    )]
    PortTaken(u16),
    #[error("{0}")]
    Io(String),
}

/// Which mechanisms enforce process limits on this machine, for `maru ps` and the logs.
pub fn limits_in_force() -> &'static str {
    static ANSWER: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    ANSWER.get_or_init(|| {
        let controllers = ["/sys/fs/cgroup/cgroup.controllers", "/sys/fs/cgroup/unified/cgroup.controllers"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .find(|c| !c.trim().is_empty());
        match controllers {
            Some(_) => "rlimits (RLIMIT_AS for memory, RLIMIT_CPU for cpu_time); cgroup v2 controllers are present but Maru does not use them yet",
            None => "rlimits (RLIMIT_AS for memory, RLIMIT_CPU for cpu_time); no cgroup v2 controllers available, so no CPU share limit",
        }
    })
}

/// A live process instance.
pub struct ProcessInstance {
    child: Child,
    pid: u32,
    port: u16,
    client: Client<HttpConnector, Full<Bytes>>,
    record: PathBuf,
    output: JoinSet<()>,
    startup: Duration,
    /// Set once the leader has been reaped; from then on its group id may be reused.
    exit: Option<ExitStatus>,
    /// Removed with the instance.
    _private_tmp: Option<PrivateTmp>,
}

/// Whether `pid` (our child) has exited, without reaping it.
fn leader_exited(pid: u32) -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(Id::Pid(Pid::from_raw(pid as i32)), flags) {
        Ok(WaitStatus::StillAlive) => false,
        Ok(_) => true,
        // ECHILD: already reaped (by us; nobody else reaps our children).
        Err(_) => true,
    }
}

/// Whether a socket listening on `port` (IPv4 or IPv6) belongs to no process of the group
/// `group`. `None` when the kernel's tables cannot be read (the check is then skipped).
fn port_held_by_other(port: u16, group: u32) -> Option<bool> {
    let mut listening = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let on_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            // 0A: LISTEN.
            if on_port && *state == "0A" {
                listening.push(format!("socket:[{inode}]"));
            }
        }
    }
    if listening.is_empty() {
        return None;
    }
    let mut owned = vec![false; listening.len()];
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let in_group = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let after_name = stat.get(stat.rfind(')')? + 2..)?.to_string();
                after_name.split_whitespace().nth(2)?.parse::<u32>().ok()
            })
            == Some(group);
        if !in_group {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let target = target.to_string_lossy();
                for (i, socket) in listening.iter().enumerate() {
                    if *socket == target {
                        owned[i] = true;
                    }
                }
            }
        }
    }
    Some(owned.iter().any(|o| !o))
}

/// This machine's boot, from the kernel; records from another boot name pids that are
/// somebody else's now.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_string())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Field 22 of /proc/PID/stat, the start time in clock ticks since boot; with the pid it
/// identifies a process across pid reuse.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// `PATH` for a process service whose manifest sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ProcessInstance {
    /// Start the program and wait until its readiness probe passes.
    pub async fn start(spec: &ProcessSpec) -> Result<Self, ProcessError> {
        let started = Instant::now();
        let port = free_port().map_err(|e| ProcessError::Io(format!("find a free port: {e}")))?;
        let args: Vec<String> = spec
            .command
            .iter()
            .map(|a| a.replace("{port}", &port.to_string()))
            .collect();
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| ProcessError::Io("the command is empty".into()))?;
        let private_tmp = match &spec.isolation {
            Some(isolation) => Some(PrivateTmp::create(isolation)?),
            None => None,
        };
        let mut command = match (&spec.isolation, &private_tmp) {
            (Some(isolation), Some(tmp)) => {
                let mut writable = vec![spec.workdir.clone(), tmp.path.clone()];
                writable.extend(isolation.writable.iter().cloned());
                let policy = Policy {
                    hidden: (isolation.sandbox.hidden.iter())
                        .chain(&isolation.hidden)
                        .cloned()
                        .collect(),
                    writable,
                    readable: isolation.sandbox.readable.clone(),
                    user: isolation.user.clone(),
                    memory_bytes_max: spec.memory_bytes_max,
                    cpu_seconds_max: spec.cpu_seconds_max,
                };
                let mut command = Command::new(&isolation.sandbox.launcher);
                command
                    .arg(crate::sandbox::SUBCOMMAND)
                    .arg("--policy")
                    .arg(serde_json::to_string(&policy).expect("a policy is plain data"))
                    .arg("--")
                    .arg(program);
                command
            }
            _ if spec.memory_bytes_max.is_some() || spec.cpu_seconds_max.is_some() => {
                let mut command = Command::new("prlimit");
                if let Some(bytes) = spec.memory_bytes_max {
                    command.arg(format!("--as={bytes}"));
                }
                if let Some(seconds) = spec.cpu_seconds_max {
                    command.arg(format!("--cpu={seconds}"));
                }
                command.arg("--").arg(program);
                command
            }
            _ => Command::new(program),
        };
        // Only what the manifest and Maru give: maru's own environment (its log settings,
        // whatever its service manager or shell passed it) is not the service's business.
        command
            .args(rest)
            .current_dir(&spec.workdir)
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("PORT", port.to_string())
            .envs(private_tmp.iter().map(|tmp| ("TMPDIR", &tmp.path)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
            program: program.clone(),
            source,
        })?;
        let pid = child
            .id()
            .ok_or_else(|| ProcessError::Io("the process exited at once".into()))?;
        let record = spec.registry.join(format!("{pid}.json"));
        let entry = serde_json::json!({
            "pid": pid,
            "start_ticks": start_ticks(pid),
            "boot_id": boot_id(),
            "command": spec.command,
        });
        // Durable before the process does anything: a power cut must not forget a group
        // that the next start has to reap. (The registry directory is the node's to make.)
        if let Err(error) =
            disk::write_atomically(&disk::OsDisk, &record, entry.to_string().as_bytes())
        {
            _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            return Err(ProcessError::Io(format!(
                "record process {pid} in {}: {error}",
                spec.registry.display()
            )));
        }
        let mut output = JoinSet::new();
        if let Some(mut stdout) = child.stdout.take() {
            let mut writer = spec.log.writer(LogStream::Stdout);
            output.spawn(async move {
                _ = tokio::io::copy(&mut stdout, &mut writer).await;
            });
        }
        if let Some(mut stderr) = child.stderr.take() {
            let mut writer = spec.log.writer(LogStream::Stderr);
            output.spawn(async move {
                _ = tokio::io::copy(&mut stderr, &mut writer).await;
            });
        }
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        let mut instance = ProcessInstance {
            child,
            pid,
            port,
            client,
            record,
            output,
            startup: Duration::ZERO,
            exit: None,
            _private_tmp: private_tmp,
        };
        let deadline = started + spec.ready_timeout;
        loop {
            if let Some(status) = instance.try_exited() {
                return Err(ProcessError::ExitedEarly(status.to_string()));
            }
            if instance
                .probe(&spec.ready, Duration::from_millis(500))
                .await
            {
                // The free port was chosen before the program bound it; another program
                // may have taken it meanwhile, and must never be sent this service's
                // traffic.
                if port_held_by_other(port, pid) == Some(true) {
                    return Err(ProcessError::PortTaken(port));
                }
                break;
            }
            if Instant::now() >= deadline {
                return Err(ProcessError::NotReady(
                    spec.ready_timeout,
                    describe(&spec.ready),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        instance.startup = started.elapsed();
        Ok(instance)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// From spawn to the first passing readiness probe.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The exit status, if the process has exited. What it left in its group is killed
    /// before it is reaped (see the module's docs).
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() && leader_exited(self.pid) {
            _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Wait up to `limit` for the leader to exit, without reaping it.
    async fn leader_exits_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if leader_exited(self.pid) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn probe(&self, probe: &Probe, timeout: Duration) -> bool {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let check = async {
            match probe {
                Probe::Tcp => tokio::net::TcpStream::connect(address).await.is_ok(),
                Probe::Http(path) => {
                    let Ok(request) =
                        http::Request::get(format!("http://127.0.0.1:{}{path}", self.port))
                            .body(Full::new(Bytes::new()))
                    else {
                        return false;
                    };
                    self.client
                        .request(request)
                        .await
                        .is_ok_and(|r| r.status().is_success() || r.status().is_redirection())
                }
            }
        };
        tokio::time::timeout(timeout, check).await.unwrap_or(false)
    }

    /// Forward a request; the returned future owns everything it needs.
    pub fn forward(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> impl Future<Output = Result<http::Response<Incoming>, String>> + Send + 'static {
        let client = self.client.clone();
        let port = self.port;
        async move {
            let (mut parts, body) = request.into_parts();
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            parts.uri = format!("http://127.0.0.1:{port}{path}")
                .parse()
                .map_err(|e| format!("build upstream URI: {e}"))?;
            remove_hop_by_hop(&mut parts.headers);
            let mut response = client
                .request(http::Request::from_parts(parts, body))
                .await
                .map_err(|e| format!("the process did not answer: {e}"))?;
            // The answer is the gateway's to the client, on the client's connection: not an
            // HTTP/1.0 status line or a `Connection: close` because the process (Python's
            // http.server, say) speaks HTTP/1.0 to the gateway.
            *response.version_mut() = http::Version::HTTP_11;
            remove_hop_by_hop(response.headers_mut());
            Ok(response)
        }
    }

    /// Ask the process group to stop with `signal`; after `timeout`, kill it.
    pub async fn stop(mut self, signal: Signal, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_none() {
            let group = Pid::from_raw(self.pid as i32);
            _ = killpg(group, signal);
            if !self.leader_exits_within(timeout).await {
                _ = killpg(group, Signal::SIGKILL);
                // SIGKILL cannot be caught; the bound only guards against a kernel stuck
                // in uninterruptible I/O.
                self.leader_exits_within(Duration::from_secs(30)).await;
            }
            // The leader is a zombie (its id cannot be reused yet): what it left in its
            // group goes too, then it is reaped.
            _ = killpg(group, Signal::SIGKILL);
            self.exit = self.child.wait().await.ok();
        }
        self.output.shutdown().await;
        self.exit
    }
}

impl Drop for ProcessInstance {
    fn drop(&mut self) {
        if self.exit.is_none() {
            // Not reaped yet, so the group id is still this leader's.
            _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
        _ = std::fs::remove_file(&self.record);
    }
}

/// Remove the headers that belong to one connection (RFC 9110 section 7.6.1), including
/// those the `Connection` header names, so they are not passed from one connection to the
/// other.
fn remove_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<http::HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for hop in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(hop);
    }
}

/// An instance's own temporary directory (its `TMPDIR`), inside the sandbox's hidden
/// temporary root, private to the instance's user and removed with the instance.
struct PrivateTmp {
    path: PathBuf,
}

impl PrivateTmp {
    fn create(isolation: &Isolation) -> Result<PrivateTmp, ProcessError> {
        use std::os::unix::fs::DirBuilderExt as _;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let path = isolation.sandbox.temporary_root.join(format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let shown = path.display().to_string();
        let failed = |e: &dyn std::fmt::Display| {
            ProcessError::Io(format!(
                "create the instance's temporary directory {shown}: {e}"
            ))
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| failed(&e))?;
        let tmp = PrivateTmp { path };
        if let Some(name) = &isolation.user {
            let user = nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| failed(&format!("user `{name}` does not exist")))?;
            nix::unistd::chown(&tmp.path, Some(user.uid), Some(user.gid))
                .map_err(|e| failed(&e))?;
        }
        Ok(tmp)
    }
}

impl Drop for PrivateTmp {
    fn drop(&mut self) {
        _ = std::fs::remove_dir_all(&self.path);
    }
}

fn describe(probe: &Probe) -> String {
    match probe {
        Probe::Http(path) => format!("GET {path}"),
        Probe::Tcp => "TCP connect".into(),
    }
}

/// Kill process groups recorded by an earlier `maru` that did not stop them (it was killed).
/// Returns one line per group killed.
pub fn reap_leftovers(registry: &Path) -> Vec<String> {
    let mut reaped = Vec::new();
    let Ok(entries) = std::fs::read_dir(registry) else {
        return reaped;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(record) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        else {
            _ = std::fs::remove_file(&path);
            continue;
        };
        let Some(pid) = record["pid"].as_u64().and_then(|p| i32::try_from(p).ok()) else {
            _ = std::fs::remove_file(&path);
            continue;
        };
        // Linux never hands out a pid still in use as a process group id, so a live group with
        // this id is ours, unless its leader is a different process that started later, or
        // the record is from before a reboot.
        let other_boot = match (record["boot_id"].as_str(), boot_id()) {
            (Some(recorded), Some(now)) => recorded != now,
            _ => false,
        };
        let leader_is_other = other_boot
            || match (start_ticks(pid as u32), record["start_ticks"].as_u64()) {
                (Some(now), Some(recorded)) => now != recorded,
                _ => false,
            };
        if !leader_is_other && killpg(Pid::from_raw(pid), None).is_ok() {
            _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            reaped.push(format!("process group {pid} ({})", record["command"]));
        }
        _ = std::fs::remove_file(&path);
    }
    reaped
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt as _;

    use super::*;

    #[test]
    fn headers_of_one_connection_are_not_passed_on() {
        let mut headers = http::HeaderMap::new();
        headers.insert("connection", "close, x-private".parse().expect("value"));
        headers.insert("x-private", "1".parse().expect("value"));
        headers.insert("keep-alive", "timeout=5".parse().expect("value"));
        headers.insert("transfer-encoding", "chunked".parse().expect("value"));
        headers.insert("content-type", "text/plain".parse().expect("value"));
        remove_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-type"]);
    }

    fn alive(pid: u32) -> bool {
        // Not reaped and not a zombie.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
    }

    /// Hardening defect 9: a leftover record was trusted without knowing which boot wrote it;
    /// after a reboot its pid (and start time, counted from boot) may be another program's.
    #[test]
    fn a_record_from_another_boot_kills_nothing() {
        let registry = tempfile::tempdir().expect("tempdir");
        let mut bystander = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("start sleep");
        let pid = bystander.id();
        let record = |boot: &str| {
            serde_json::json!({
                "pid": pid,
                "start_ticks": start_ticks(pid),
                "boot_id": boot,
                "command": ["sleep", "30"],
            })
            .to_string()
        };
        std::fs::write(
            registry.path().join(format!("{pid}.json")),
            record("another-boot"),
        )
        .expect("write record");
        assert!(reap_leftovers(registry.path()).is_empty());
        assert!(
            alive(pid),
            "a group named by another boot's record was killed"
        );
        // The same record from this boot is ours to reap.
        let this_boot = boot_id().expect("Linux has a boot id");
        std::fs::write(
            registry.path().join(format!("{pid}.json")),
            record(&this_boot),
        )
        .expect("write record");
        assert_eq!(reap_leftovers(registry.path()).len(), 1);
        bystander.wait().expect("reaped");
        assert!(!alive(pid));
    }

    /// Hardening defect 9: the free port is chosen before the program binds it, so another
    /// program could take it and be sent the service's traffic. A listener is checked to
    /// belong to the instance's process group.
    #[test]
    fn a_port_held_outside_the_group_is_noticed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let our_group = nix::unistd::getpgrp().as_raw() as u32;
        assert_eq!(port_held_by_other(port, our_group), Some(false));
        assert_eq!(port_held_by_other(port, our_group + 1), Some(true));
        drop(listener);
        assert_eq!(port_held_by_other(port, our_group), None, "nobody listens");
    }

    #[test]
    fn an_exited_leader_is_seen_without_being_reaped() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("start true");
        let pid = child.id();
        let started = Instant::now();
        while !leader_exited(pid) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "true never exited"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Still a zombie: its pid is held until we reap it.
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        assert!(child.try_wait().expect("waits").is_some());
    }
}
