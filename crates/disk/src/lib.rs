//! The storage seam: every file Maru writes itself goes through [`Disk`], so the same code
//! runs on the operating system's files ([`OsDisk`]) and on a simulated disk that loses
//! what was not synced at a power cut ([`sim::SimDisk`]).
//!
//! The rule this crate enforces for its callers (and the simulation checks): a file's
//! bytes are durable only once the file was synced, and a file or directory *exists*
//! durably only once the directory holding it was synced after it was created or renamed
//! (POSIX promises no more). [`create_dir_all`] and [`write_atomically`] follow that rule,
//! so callers that use them cannot forget a directory sync.
//!
//! The crate also carries the clock ([`Clock`]) as a value for the same reason: persistence
//! code that stamps or expires records runs under a simulated clock in tests.

pub mod database;
pub mod sim;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// How [`Disk::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, for reading.
    Read,
    /// An existing file, for reading and appending at its end.
    Append,
    /// A new, empty file for appending; fails with `AlreadyExists` if the name is taken.
    CreateNew,
    /// An existing file, for reading and writing anywhere ([`DiskFile::write_at`]), as a
    /// database's pages are.
    Write,
}

/// A file system as persistence code needs it. Paths are absolute or relative to the
/// process's working directory, as for `std::fs`.
pub trait Disk: Send + Sync + 'static {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>>;
    /// The whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The names of a directory's entries, sorted.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Whether a file or directory exists at `path`.
    fn exists(&self, path: &Path) -> bool;
    /// Create one directory; its parent must exist. Not durable until the parent is synced.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Rename a file, replacing `to`. Not durable until the directories are synced.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Make the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// The permission bits of a file or directory (`0o777` at most).
    fn mode(&self, path: &Path) -> io::Result<u32>;
    /// Whether calls may block the thread for long (a real disk), so async callers should
    /// make them on a blocking thread. The simulated disk answers at once, which keeps a
    /// simulation on one thread and deterministic.
    fn blocks(&self) -> bool;
}

/// An open file.
pub trait DiskFile: Send + Sync {
    /// Fill `buf` from `position`; an error if the file ends first.
    fn read_exact_at(&self, buf: &mut [u8], position: u64) -> io::Result<()>;
    /// Write all of `bytes` at the end of the file. On error a prefix may have been written.
    fn append(&self, bytes: &[u8]) -> io::Result<()>;
    /// Write all of `bytes` at `position`, growing the file (with zeros) if it ends before.
    /// Only for files opened with [`OpenMode::Write`].
    fn write_at(&self, bytes: &[u8], position: u64) -> io::Result<()>;
    /// Make the file's bytes and length durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Take an advisory lock on the whole file, exclusive or shared, without waiting:
    /// `Ok(false)` if another open file holds a conflicting one. Released by
    /// [`DiskFile::unlock`] or when the file is closed (or its process dies).
    fn try_lock(&self, shared: bool) -> io::Result<bool>;
    fn unlock(&self) -> io::Result<()>;
    /// A hint that bytes `position..position + len` will be read soon: a real disk starts
    /// reading them into the page cache (`POSIX_FADV_WILLNEED`) and returns at once. It
    /// changes no contents; errors are ignored.
    fn will_need(&self, position: u64, len: u64) {
        let _ = (position, len);
    }
}

/// Milliseconds since the Unix epoch, as a value persistence code is handed.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The machine's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// What persistence code runs on: a disk and a clock.
#[derive(Clone)]
pub struct Env {
    pub disk: Arc<dyn Disk>,
    pub clock: Arc<dyn Clock>,
}

impl Env {
    /// The operating system's files and the wall clock.
    pub fn os() -> Env {
        Env {
            disk: Arc::new(OsDisk),
            clock: Arc::new(SystemClock),
        }
    }
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("simulated", &!self.disk.blocks())
            .finish()
    }
}

/// An I/O error with what was being done and to which path.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct Error {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl Error {
    pub fn new(action: &'static str, path: &Path, source: io::Error) -> Error {
        Error {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the disk was full: the caller may succeed once space returns.
    pub fn is_full(&self) -> bool {
        self.source.kind() == io::ErrorKind::StorageFull
    }
}

/// Create `dir` and any missing parents, and make each of them durable: every directory on
/// the way has its parent synced, whether this call created it or an earlier run did (an
/// earlier run may have stopped before its sync).
pub fn create_dir_all(disk: &dyn Disk, dir: &Path) -> Result<(), Error> {
    let mut chain: Vec<&Path> = dir
        .ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    chain.reverse();
    for path in chain {
        if !disk.exists(path) {
            match disk.create_dir(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::new("create directory", path, e)),
            }
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            match disk.sync_dir(parent) {
                Ok(()) => {}
                // Ancestors this process may not open (say `/` under a sandbox) were not
                // created by Maru; what Maru creates below them is still synced.
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
                Err(e) => return Err(Error::new("sync directory", parent, e)),
            }
        }
    }
    Ok(())
}

/// The prefix of temporary files [`write_atomically`] leaves if it is interrupted.
pub const TEMPORARY_PREFIX: &str = ".tmp-";

/// Write a file so that readers (and a power cut) see either the old contents or all of the
/// new: a temporary file of its own, synced, renamed over `path`, then the directory synced.
/// Concurrent calls never share a temporary file, even for different targets.
pub fn write_atomically(disk: &dyn Disk, path: &Path, bytes: &[u8]) -> Result<(), Error> {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        "{TEMPORARY_PREFIX}{}-{}-{name}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let file = disk
            .open(&tmp, OpenMode::CreateNew)
            .map_err(|e| Error::new("create temporary file for", path, e))?;
        file.append(bytes)
            .map_err(|e| Error::new("write", &tmp, e))?;
        file.sync().map_err(|e| Error::new("sync", &tmp, e))?;
        drop(file);
        disk.rename(&tmp, path)
            .map_err(|e| Error::new("rename into place", path, e))?;
        disk.sync_dir(dir)
            .map_err(|e| Error::new("sync directory of", path, e))
    })();
    if result.is_err() {
        _ = disk.remove_file(&tmp);
    }
    result
}

/// Delete what interrupted [`write_atomically`] calls left in `dir`.
pub fn remove_temporaries(disk: &dyn Disk, dir: &Path) -> Result<(), Error> {
    let names = disk.list(dir).map_err(|e| Error::new("list", dir, e))?;
    for name in names.iter().filter(|n| n.starts_with(TEMPORARY_PREFIX)) {
        let path = dir.join(name);
        disk.remove_file(&path)
            .map_err(|e| Error::new("remove temporary file", &path, e))?;
    }
    Ok(())
}

/// The operating system's file system. What it creates is private to the node's user:
/// files `0600`, directories `0700` (the data directory holds the control token and state
/// with manifests' `env` values, and artifacts maru loads as native code).
#[derive(Debug, Default, Clone, Copy)]
pub struct OsDisk;

impl Disk for OsDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>> {
        let file = match mode {
            OpenMode::Read => File::open(path)?,
            OpenMode::Append => OpenOptions::new().read(true).append(true).open(path)?,
            OpenMode::CreateNew => OpenOptions::new()
                .read(true)
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?,
            // Not O_APPEND: Linux's pwrite on an appending descriptor ignores its offset.
            OpenMode::Write => OpenOptions::new().read(true).write(true).open(path)?,
        };
        Ok(Arc::new(OsFile {
            file,
            appending: matches!(mode, OpenMode::Append | OpenMode::CreateNew),
        }))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort_unstable();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::DirBuilder::new().mode(0o700).create(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn mode(&self, path: &Path) -> io::Result<u32> {
        use std::os::unix::fs::PermissionsExt as _;
        Ok(fs::metadata(path)?.permissions().mode() & 0o777)
    }

    fn blocks(&self) -> bool {
        true
    }
}

struct OsFile {
    file: File,
    /// Opened with O_APPEND: every write goes to the end.
    appending: bool,
}

impl DiskFile for OsFile {
    fn read_exact_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, position)
    }

    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        if self.appending {
            (&self.file).write_all(bytes)
        } else {
            self.file.write_all_at(bytes, self.size()?)
        }
    }

    fn write_at(&self, bytes: &[u8], position: u64) -> io::Result<()> {
        if self.appending {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a file opened for appending cannot be written at a position",
            ));
        }
        self.file.write_all_at(bytes, position)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn try_lock(&self, shared: bool) -> io::Result<bool> {
        let result = if shared {
            self.file.try_lock_shared()
        } else {
            self.file.try_lock()
        };
        match result {
            Ok(()) => Ok(true),
            Err(fs::TryLockError::WouldBlock) => Ok(false),
            Err(fs::TryLockError::Error(error)) => Err(error),
        }
    }

    fn unlock(&self) -> io::Result<()> {
        self.file.unlock()
    }

    fn will_need(&self, position: u64, len: u64) {
        let (Ok(position), Ok(len)) = (i64::try_from(position), i64::try_from(len)) else {
            return;
        };
        // Only a hint: a failure leaves the reads to come to wait for the disk as before.
        let _ = nix::fcntl::posix_fadvise(
            &self.file,
            position,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_atomic_writes_never_share_a_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = OsDisk;
        std::thread::scope(|scope| {
            for writer in 0..4 {
                let dir = dir.path();
                scope.spawn(move || {
                    for i in 0..50 {
                        let text = format!("{writer} {i}");
                        write_atomically(&disk, &dir.join(format!("f{writer}")), text.as_bytes())
                            .expect("writes");
                    }
                });
            }
        });
        for writer in 0..4 {
            let text = fs::read_to_string(dir.path().join(format!("f{writer}"))).expect("reads");
            assert_eq!(text, format!("{writer} 49"));
        }
        assert_eq!(
            OsDisk.list(dir.path()).expect("lists"),
            ["f0", "f1", "f2", "f3"],
            "no temporary file is left"
        );
    }

    #[test]
    fn created_directories_survive_a_power_cut_and_unsynced_ones_do_not() {
        let disk = sim::SimDisk::new();
        let mut rng = sim::Rng::new(1);
        create_dir_all(&disk, Path::new("/other")).expect("creates");
        disk.create_dir(Path::new("/other/lost")).expect("creates");
        create_dir_all(&disk, Path::new("/data/events/t")).expect("creates");
        write_atomically(&disk, Path::new("/data/events/t/state"), b"one").expect("writes");
        disk.power_cut(&mut rng);
        assert!(disk.exists(Path::new("/other")));
        assert!(
            !disk.exists(Path::new("/other/lost")),
            "its directory was never synced"
        );
        assert_eq!(
            disk.read(Path::new("/data/events/t/state")).expect("kept"),
            b"one"
        );
    }
}
