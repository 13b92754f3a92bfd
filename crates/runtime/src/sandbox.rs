//! The confinement of process services: what a program Maru starts may touch on the node.
//!
//! A process instance is not started directly: Maru starts its own binary as a small
//! launcher (`maru sandbox-exec`), which confines itself and then executes the program in
//! its place (same pid, same process group). The launcher:
//! 1. sets the resource limits (`RLIMIT_AS` for `memory`, `RLIMIT_CPU` for `cpu_time`);
//! 2. builds a Landlock ruleset (Linux's unprivileged file-system sandbox): the program may
//!    read and execute everything on the machine except the *hidden* directories (the node's
//!    data directory, every instance's private temporary directory, the working and
//!    writable directories of other apps' process services) and the device files; it may
//!    read and write only its own working directory, its private `TMPDIR` and the
//!    directories its manifest lists as `writable`, plus `/dev/null`, `/dev/zero`,
//!    `/dev/full` and, for reading, `/dev/random` and `/dev/urandom`. It may not signal
//!    or trace processes outside its sandbox (maru among them), nor reach their abstract
//!    Unix sockets;
//! 3. drops privileges: to the manifest's `user` if one is given (maru must then run as
//!    root), and in any case every capability, with `no_new_privs` set, so neither root
//!    nor a set-uid program gets them back;
//! 4. enforces the ruleset and executes the program.
//!
//! Landlock rules grant access beneath a directory, so "everything but the hidden
//! directories" is the set of siblings along the way down to each hidden directory,
//! taken when the instance starts: an entry created later directly beside a hidden
//! directory (say a new file in `/tmp` when the data directory is in `/tmp`) is not
//! readable by instances started before it. Symbolic links are not followed when the
//! rules are built; what a link points to is reached through its real place.
//!
//! If the kernel has no Landlock, the launcher refuses to start the program (nothing is
//! run unconfined unless the node is configured with `process_isolation = "none"`).

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, CompatLevel, Compatible as _, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use serde::{Deserialize, Serialize};

/// The launcher's subcommand of the `maru` binary.
pub const SUBCOMMAND: &str = "sandbox-exec";

/// The Landlock ABI whose rights are asked for; an older kernel enforces what it has.
const ABI_ASKED: ABI = ABI::V6;

/// Beyond this many rules the node's layout is unusual enough to stop and say so.
const RULES_MAX: usize = 20_000;

/// Device files a program may read and write.
const DEVICES_READ_WRITE: [&str; 3] = ["/dev/null", "/dev/zero", "/dev/full"];
/// Device files a program may read.
const DEVICES_READ: [&str; 2] = ["/dev/random", "/dev/urandom"];

/// What one instance may touch. It travels from maru to its launcher as JSON on the
/// command line (a format between two copies of the same binary, not an API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Neither readable nor writable (nor listed), with everything beneath.
    pub hidden: Vec<PathBuf>,
    /// Readable and writable, with everything beneath: the working directory, the private
    /// temporary directory and the manifest's `writable` directories.
    pub writable: Vec<PathBuf>,
    /// Files readable even where they are hidden (the node CA's certificate).
    #[serde(default)]
    pub readable: Vec<PathBuf>,
    /// The user to run as (maru must be root).
    pub user: Option<String>,
    pub memory_bytes_max: Option<u64>,
    pub cpu_seconds_max: Option<u64>,
}

/// How process services are confined on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// The `maru` binary, which runs the launcher.
    pub launcher: PathBuf,
    /// Hidden from every instance: the data directory and the private temporary
    /// directories' root.
    pub hidden: Vec<PathBuf>,
    /// Where each instance gets its own private temporary directory (`TMPDIR`).
    pub temporary_root: PathBuf,
    /// Public files every instance may read ([`Sandbox::publish`]).
    pub readable: Vec<PathBuf>,
}

impl Sandbox {
    /// The node's sandbox: `launcher` runs it, `data` and `also_hidden` (the object store's
    /// volumes) are hidden, and a fresh root for the instances' private temporary
    /// directories is made in the system's temporary directory (what a killed maru left
    /// there is removed first).
    pub fn prepare(
        launcher: PathBuf,
        data: &Path,
        also_hidden: &[PathBuf],
    ) -> Result<Sandbox, SandboxError> {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        if !supported() {
            return Err(SandboxError::Unsupported);
        }
        let data = canonical(data);
        let tag = blake3::hash(data.as_os_str().as_encoded_bytes()).to_hex();
        let temporary_root = std::env::temp_dir().join(format!("maru-instances-{}", &tag[..16]));
        let failed = |action, source| SandboxError::Path {
            action,
            path: temporary_root.clone(),
            source,
        };
        match std::fs::remove_dir_all(&temporary_root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed("remove", e)),
        }
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&temporary_root)
            .map_err(|e| failed("create", e))?;
        // The umask may have taken bits away; instances of other users must reach their own
        // directory inside by name (they cannot list it).
        std::fs::set_permissions(&temporary_root, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| failed("set the permissions of", e))?;
        let mut hidden = vec![data, canonical(&temporary_root)];
        hidden.extend(also_hidden.iter().map(|p| canonical(p)));
        Ok(Sandbox {
            launcher,
            hidden,
            temporary_root,
            readable: Vec::new(),
        })
    }

    /// Put a public file (the node CA's certificate) where every instance, as any user, may
    /// read it by name: the temporary root (which they cannot list), mode 0644.
    pub fn publish(&mut self, name: &str, bytes: &[u8]) -> Result<PathBuf, SandboxError> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.temporary_root.join(name);
        std::fs::write(&path, bytes)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)))
            .map_err(|source| SandboxError::Path {
                action: "write",
                path: path.clone(),
                source,
            })?;
        self.readable.push(path.clone());
        Ok(path)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "this kernel does not enforce Landlock, so process services cannot be kept out of the node's data; use a kernel with Landlock (Linux 5.13+, `lsm=landlock` at boot) or set process_isolation = \"none\" in [node] to run them unconfined"
    )]
    Unsupported,
    #[error("the sandbox: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("the sandbox: {action} {}: {source}", path.display())]
    Path {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "the sandbox would need more than {RULES_MAX} rules to hide {}: move the data directory (or that path) somewhere with fewer neighbours",
        path.display()
    )]
    TooManyRules { path: PathBuf },
    #[error("user `{0}` does not exist on this machine")]
    NoSuchUser(String),
    #[error(
        "switch to user `{user}`: {source} (maru must run as root to start processes as another user)"
    )]
    User { user: String, source: nix::Error },
    #[error("drop capabilities: {0}")]
    Capabilities(String),
    #[error("set {limit}: {source}")]
    Limit {
        limit: &'static str,
        source: nix::Error,
    },
    #[error("execute `{program}`: {source}")]
    Exec { program: String, source: io::Error },
}

/// Whether this kernel enforces Landlock.
pub fn supported() -> bool {
    Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(ABI::V1))
        .and_then(|ruleset| ruleset.create())
        .is_ok()
}

/// The directories beneath which a program may read: every entry along the way from `/`
/// down to each hidden path, but for the hidden paths themselves. Paths must be absolute
/// and canonical.
pub fn readable_roots(hidden: &[PathBuf]) -> Result<Vec<PathBuf>, SandboxError> {
    let mut roots = Vec::new();
    if hidden.iter().any(|h| h == Path::new("/")) {
        return Ok(roots);
    }
    descend(Path::new("/"), hidden, &mut roots)?;
    Ok(roots)
}

fn descend(dir: &Path, hidden: &[PathBuf], roots: &mut Vec<PathBuf>) -> Result<(), SandboxError> {
    let entries = std::fs::read_dir(dir).map_err(|source| SandboxError::Path {
        action: "list",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut names: Vec<(PathBuf, std::fs::FileType)> = entries
        .flatten()
        .filter_map(|e| e.file_type().ok().map(|t| (e.path(), t)))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, kind) in names {
        if kind.is_symlink() || hidden.contains(&path) {
            continue;
        }
        if hidden.iter().any(|h| h.starts_with(&path)) {
            if kind.is_dir() {
                descend(&path, hidden, roots)?;
            }
            continue;
        }
        if roots.len() >= RULES_MAX {
            return Err(SandboxError::TooManyRules {
                path: hidden
                    .iter()
                    .find(|h| h.starts_with(dir))
                    .cloned()
                    .unwrap_or_else(|| dir.to_path_buf()),
            });
        }
        roots.push(path);
    }
    Ok(())
}

/// The canonical form of a path that exists; the path itself if it does not (it cannot be
/// reached then, and a hidden path created later under that name is still matched).
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Confine this process by `policy` and execute `program`. Returns only on failure. Must
/// run in a process of its own with a single thread (the launcher).
pub fn exec(policy: &Policy, program: &OsString, args: &[OsString]) -> SandboxError {
    match confine(policy) {
        Ok(()) => {
            let source = std::process::Command::new(program).args(args).exec();
            SandboxError::Exec {
                program: program.to_string_lossy().into_owned(),
                source,
            }
        }
        Err(error) => error,
    }
}

fn confine(policy: &Policy) -> Result<(), SandboxError> {
    use nix::sys::resource::{Resource, setrlimit};
    if let Some(bytes) = policy.memory_bytes_max {
        setrlimit(Resource::RLIMIT_AS, bytes, bytes).map_err(|source| SandboxError::Limit {
            limit: "the memory limit (RLIMIT_AS)",
            source,
        })?;
    }
    if let Some(seconds) = policy.cpu_seconds_max {
        setrlimit(Resource::RLIMIT_CPU, seconds, seconds).map_err(|source| {
            SandboxError::Limit {
                limit: "the CPU time limit (RLIMIT_CPU)",
                source,
            }
        })?;
    }

    let hidden: Vec<PathBuf> = policy
        .hidden
        .iter()
        .map(|p| canonical(p))
        .chain([PathBuf::from("/dev")])
        .collect();
    let read = AccessFs::from_read(ABI_ASKED);
    let all = AccessFs::from_all(ABI_ASKED);
    let file = AccessFs::from_file(ABI_ASKED);
    let mut rules: Vec<(PathBuf, BitFlags<AccessFs>)> = readable_roots(&hidden)?
        .into_iter()
        .map(|root| (root, read))
        .collect();
    for device in DEVICES_READ_WRITE {
        rules.push((PathBuf::from(device), file));
    }
    for device in DEVICES_READ {
        rules.push((PathBuf::from(device), read));
    }
    rules.extend(policy.writable.iter().map(|dir| (canonical(dir), all)));
    rules.extend(policy.readable.iter().map(|path| (canonical(path), read)));
    let ruleset = Ruleset::default()
        .handle_access(all)?
        .scope(Scope::from_all(ABI_ASKED))?
        .create()?
        .add_rules(rules.iter().filter(|(path, _)| path.exists()).map(
            |(path, access)| -> Result<_, SandboxError> {
                let fd = PathFd::new(path).map_err(|e| SandboxError::Path {
                    action: "open",
                    path: path.clone(),
                    source: io::Error::other(e.to_string()),
                })?;
                // Rights that only directories have are refused on a file.
                let is_dir = std::fs::metadata(path).is_ok_and(|m| m.is_dir());
                let access = if is_dir { *access } else { *access & file };
                Ok(PathBeneath::new(fd, access))
            },
        ))?;

    drop_privileges(policy.user.as_deref())?;
    let status = ruleset.restrict_self()?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(SandboxError::Unsupported);
    }
    Ok(())
}

/// Become `user` if given; give up every capability either way.
fn drop_privileges(user: Option<&str>) -> Result<(), SandboxError> {
    use caps::CapSet;
    let root = nix::unistd::geteuid().is_root();
    if root {
        // Without the bounding set, no later exec can grant a capability again.
        caps::clear(None, CapSet::Bounding)
            .map_err(|e| SandboxError::Capabilities(e.to_string()))?;
    }
    if let Some(name) = user {
        let found = nix::unistd::User::from_name(name)
            .map_err(|source| SandboxError::User {
                user: name.to_string(),
                source,
            })?
            .ok_or_else(|| SandboxError::NoSuchUser(name.to_string()))?;
        let failed = |source| SandboxError::User {
            user: name.to_string(),
            source,
        };
        nix::unistd::setgroups(&[found.gid]).map_err(failed)?;
        nix::unistd::setgid(found.gid).map_err(failed)?;
        nix::unistd::setuid(found.uid).map_err(failed)?;
    }
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|e| SandboxError::Capabilities(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_is_readable_but_what_is_hidden() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = canonical(dir.path());
        for name in ["a", "b/c", "b/d", "e"] {
            std::fs::create_dir_all(base.join(name)).expect("creates");
        }
        std::fs::write(base.join("b/file"), "x").expect("writes");
        std::os::unix::fs::symlink(base.join("b/c"), base.join("b/link")).expect("links");
        let roots = readable_roots(&[base.join("b/c"), base.join("e")]).expect("walks");
        let under: Vec<&Path> = roots
            .iter()
            .filter_map(|r| r.strip_prefix(&base).ok())
            .collect();
        assert_eq!(
            under,
            [Path::new("a"), Path::new("b/d"), Path::new("b/file")],
            "siblings along the way, not the hidden paths, their parents, nor links"
        );
        assert!(
            roots.contains(&PathBuf::from("/usr")),
            "the rest of the machine"
        );
        assert!(
            !roots.iter().any(|r| base.starts_with(r)),
            "no ancestor is granted whole"
        );
    }
}
