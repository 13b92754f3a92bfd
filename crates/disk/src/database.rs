//! redb databases on a [`Disk`], so the node's state runs on the simulated disk in tests
//! exactly as on the machine's files.
//!
//! redb keeps its own promise (a commit is durable once `commit` returns, and a power cut
//! leaves the last durable commit) as long as its backend syncs when asked; what it cannot do
//! through a backend is make the database file's *name* durable, so [`open`] syncs the
//! directory after creating the file. Locking is the whole file's advisory lock, which is
//! what redb's default `ExclusiveWriter` mode needs: a second process opening the same
//! database is refused.

use std::fmt;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use redb::{BackendError, StorageBackend};

use crate::{Disk, DiskFile, Error, OpenMode, TEMPORARY_PREFIX};

/// Why a database did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Disk(#[from] Error),
    #[error("{} is already open in another process (is another maru using this data directory?)", path.display())]
    InUse { path: std::path::PathBuf },
    #[error("create database {}: {message}", path.display())]
    Create {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("open database {}: {source}", path.display())]
    Database {
        path: std::path::PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
}

/// Open the redb database at `path`, creating it if there is none. The parent directory must
/// exist.
///
/// A new database is made whole under a temporary name (created, a first transaction
/// committed, synced) and only then renamed into place and its directory synced: a power cut
/// during redb's own initialisation leaves a file redb refuses to open ("not a redb
/// database"), so a database that is not complete must never carry the real name.
pub fn open(disk: &dyn Disk, path: &Path) -> Result<redb::Database, OpenError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let creating = dir.join(format!("{TEMPORARY_PREFIX}create-{name}"));
    if !disk.exists(path) {
        // What an interrupted creation left.
        match disk.remove_file(&creating) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::new("remove", &creating, e).into()),
        }
        let file = disk
            .open(&creating, OpenMode::CreateNew)
            .and_then(|file| {
                drop(file);
                disk.open(&creating, OpenMode::Write)
            })
            .map_err(|e| Error::new("create database file", &creating, e))?;
        let db = build(file, &creating)?;
        let txn = db.begin_write().map_err(|e| database_error(&creating, e))?;
        txn.commit().map_err(|e| database_error(&creating, e))?;
        drop(db);
        disk.rename(&creating, path)
            .map_err(|e| Error::new("rename into place", path, e))?;
    }
    // Also when the file existed: an earlier start may have stopped before this sync.
    disk.sync_dir(dir)
        .map_err(|e| Error::new("sync directory of", path, e))?;
    let file = disk
        .open(path, OpenMode::Write)
        .map_err(|e| Error::new("open database file", path, e))?;
    build(file, path)
}

fn build(file: Arc<dyn DiskFile>, path: &Path) -> Result<redb::Database, OpenError> {
    redb::Builder::new()
        .create_with_backend(DiskBackend { file })
        .map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => OpenError::InUse {
                path: path.to_path_buf(),
            },
            source => OpenError::Database {
                path: path.to_path_buf(),
                source,
            },
        })
}

fn database_error(path: &Path, error: impl Into<redb::Error>) -> OpenError {
    OpenError::Create {
        path: path.to_path_buf(),
        message: error.into().to_string(),
    }
}

/// A [`DiskFile`] as redb's storage.
pub struct DiskBackend {
    file: Arc<dyn DiskFile>,
}

impl fmt::Debug for DiskBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DiskBackend")
    }
}

fn whole_file(start: Bound<u64>, end: Bound<u64>) -> bool {
    matches!(start, Bound::Unbounded | Bound::Included(0)) && end == Bound::Unbounded
}

impl DiskBackend {
    fn lock(&self, start: Bound<u64>, end: Bound<u64>, shared: bool) -> Result<bool, BackendError> {
        if !whole_file(start, end) {
            return Err(BackendError::Unsupported);
        }
        self.file.try_lock(shared).map_err(BackendError::Io)
    }
}

impl StorageBackend for DiskBackend {
    fn len(&self) -> io::Result<u64> {
        self.file.size()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(out, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_at(data, offset)
    }

    fn close(&self) -> io::Result<()> {
        self.file.unlock()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.lock(start, end, false)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.lock(start, end, true)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        if !whole_file(start, end) {
            return Err(BackendError::Unsupported);
        }
        self.file.unlock().map_err(BackendError::Io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Rng, SimDisk};
    use redb::{ReadableDatabase as _, TableDefinition};

    const TABLE: TableDefinition<u64, u64> = TableDefinition::new("t");

    #[test]
    fn a_second_open_is_refused_while_the_first_holds_the_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        let first = open(&crate::OsDisk, &path).expect("opens");
        assert!(matches!(
            open(&crate::OsDisk, &path),
            Err(OpenError::InUse { .. })
        ));
        drop(first);
        open(&crate::OsDisk, &path).expect("opens again once closed");
    }

    /// Commits on the simulated disk with the power cut at every step: a returned commit
    /// is always there afterwards, and the database always opens.
    #[test]
    fn committed_transactions_survive_a_power_cut_at_any_step() {
        for seed in 0..40u64 {
            let disk = SimDisk::new();
            let mut rng = Rng::new(seed);
            let path = Path::new("/state.redb");
            disk.crash_after(rng.below(400));
            let mut committed = 0u64;
            if let Ok(db) = open(&disk, path) {
                for value in 1..=20u64 {
                    let Ok(txn) = db.begin_write() else { break };
                    let written = match txn.open_table(TABLE) {
                        Ok(mut table) => table.insert(0, value).is_ok(),
                        Err(_) => false,
                    };
                    if !written || txn.commit().is_err() {
                        break;
                    }
                    committed = value;
                }
            }
            disk.power_cut(&mut rng);
            let db = open(&disk, path).expect("opens after the power cut");
            let read = db.begin_read().expect("reads");
            let value = match read.open_table(TABLE) {
                Ok(table) => table.get(0).expect("gets").map(|v| v.value()).unwrap_or(0),
                Err(_) => 0,
            };
            // The commit the power cut interrupted may or may not have landed.
            assert!(
                value == committed || value == committed + 1,
                "seed {seed}: committed {committed}, found {value}"
            );
        }
    }
}
