//! A simulated disk that keeps what was written apart from what is durable, and a seeded
//! random number generator to drive simulations with.
//!
//! The model is POSIX's strict one, the least a real file system promises:
//! - A file's bytes become durable when the file is synced. At a power cut the unsynced
//!   bytes appended since the last sync are lost, except that a prefix of them may survive,
//!   cut at a 512-byte sector boundary (a torn write). Other unsynced changes (a shortened
//!   file) are undone.
//! - A directory entry (a created file or directory, a rename, a removal) becomes durable
//!   when its directory is synced. At a power cut each directory goes back to its entries as
//!   of its last sync, and what is no longer reachable is gone.
//! - A sync that fails loses the pages it was writing for good, even though reads still
//!   see them until the power goes (Linux marks them clean): a later successful sync does
//!   not write them again.
//!
//! Faults are armed by the simulation: a power cut after a number of mutating operations
//! (from then on every call fails until [`SimDisk::power_cut`]), a capacity after which
//! appends fail with `StorageFull` having written what fit, a number of syncs that fail,
//! and bit flips in stored bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{Clock, Disk, DiskFile, OpenMode};

/// The torn-write granularity.
pub const SECTOR_BYTES: usize = 512;

/// SplitMix64: small, fast, and the same sequence for the same seed everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0) has no value");
        self.next_u64() % n
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A clock that moves only when told.
#[derive(Debug, Default)]
pub struct SimClock(AtomicU64);

impl SimClock {
    pub fn new(now_ms: u64) -> SimClock {
        SimClock(AtomicU64::new(now_ms))
    }

    pub fn advance_ms(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::Relaxed);
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    File(u64),
    Dir,
}

#[derive(Debug, Default)]
struct Dir {
    entries: BTreeMap<String, Entry>,
    durable: BTreeMap<String, Entry>,
}

#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Bytes a failed sync was writing: they never become durable.
    poisoned: Vec<Range<usize>>,
}

#[derive(Debug, Default)]
struct State {
    dirs: BTreeMap<PathBuf, Dir>,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    /// Handles from before the last power cut are dead.
    generation: u64,
    /// Mutating operations left before the power goes.
    crash_after: Option<u64>,
    off: bool,
    capacity_bytes: Option<u64>,
    failing_syncs: u32,
    operations: u64,
}

fn off() -> io::Error {
    io::Error::other("simulated power cut: the disk is off")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

impl State {
    fn split(path: &Path) -> io::Result<(PathBuf, String)> {
        let parent = path
            .parent()
            .filter(|_| path.is_absolute())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the simulated disk takes absolute paths",
                )
            })?;
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?
            .to_string_lossy()
            .into_owned();
        Ok((parent.to_path_buf(), name))
    }

    fn entry(&self, path: &Path) -> io::Result<Entry> {
        if path == Path::new("/") {
            return Ok(Entry::Dir);
        }
        let (parent, name) = Self::split(path)?;
        self.dirs
            .get(&parent)
            .and_then(|d| d.entries.get(&name))
            .copied()
            .ok_or_else(|| not_found(path))
    }

    fn check_on(&self) -> io::Result<()> {
        if self.off { Err(off()) } else { Ok(()) }
    }

    /// Count one mutating operation; the power goes when the count runs out.
    fn step(&mut self) -> io::Result<()> {
        self.check_on()?;
        self.operations += 1;
        match &mut self.crash_after {
            Some(0) => {
                self.off = true;
                Err(off())
            }
            Some(left) => {
                *left -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Where a new entry at `path` goes: its parent must exist and the name be free. Counts
    /// as the mutating operation.
    fn new_entry(&mut self, path: &Path) -> io::Result<(PathBuf, String)> {
        let (parent, name) = Self::split(path)?;
        if !self.dirs.contains_key(&parent) {
            return Err(not_found(&parent));
        }
        if self.entry(path).is_ok() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists"));
        }
        self.step()?;
        Ok((parent, name))
    }

    fn used_bytes(&self) -> u64 {
        self.inodes.values().map(|i| i.data.len() as u64).sum()
    }
}

/// The simulated disk. Cheap to clone; clones share the disk.
#[derive(Debug, Clone)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl Default for SimDisk {
    fn default() -> Self {
        Self::new()
    }
}

impl SimDisk {
    /// An empty disk: only `/` exists.
    pub fn new() -> SimDisk {
        let mut state = State::default();
        state.dirs.insert(PathBuf::from("/"), Dir::default());
        SimDisk {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("the simulated disk's lock is never poisoned")
    }

    /// The power goes after `operations` more mutating operations (creations, appends,
    /// syncs, renames, removals, truncations): that one and every later call fail.
    pub fn crash_after(&self, operations: u64) {
        self.lock().crash_after = Some(operations);
    }

    /// Turn the disk off now: every call fails until [`SimDisk::power_cut`] or
    /// [`SimDisk::revive`].
    pub fn power_off(&self) {
        self.lock().off = true;
    }

    /// Turn the disk back on keeping everything written, synced or not: what a process
    /// killed with SIGKILL leaves (the kernel's page cache survives it). Open handles die.
    pub fn revive(&self) {
        let mut state = self.lock();
        state.generation += 1;
        state.off = false;
        state.crash_after = None;
        state.failing_syncs = 0;
    }

    /// Take back an armed crash and failing syncs that have not happened.
    pub fn disarm(&self) {
        let mut state = self.lock();
        state.crash_after = None;
        state.failing_syncs = 0;
    }

    /// Whether the power has gone (an armed crash was reached).
    pub fn is_off(&self) -> bool {
        self.lock().off
    }

    /// Mutating operations so far.
    pub fn operations(&self) -> u64 {
        self.lock().operations
    }

    /// Appends fail with `StorageFull` once the files hold this many bytes in all.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock().capacity_bytes = bytes;
    }

    pub fn used_bytes(&self) -> u64 {
        self.lock().used_bytes()
    }

    /// The next `count` file syncs fail (and lose what they were writing).
    pub fn fail_syncs(&self, count: u32) {
        self.lock().failing_syncs = count;
    }

    /// Cut the power: what was not durable is lost (a torn prefix of unsynced appends may
    /// survive), every open handle dies, and the disk comes back on with no fault armed.
    pub fn power_cut(&self, rng: &mut Rng) {
        let mut state = self.lock();
        for dir in state.dirs.values_mut() {
            dir.entries = dir.durable.clone();
        }
        // Directories whose own entry was lost are gone with everything in them.
        let mut reachable = BTreeSet::new();
        let mut stack = vec![PathBuf::from("/")];
        let mut files = BTreeSet::new();
        while let Some(path) = stack.pop() {
            if let Some(dir) = state.dirs.get(&path) {
                for (name, entry) in &dir.entries {
                    match entry {
                        Entry::Dir => stack.push(path.join(name)),
                        Entry::File(inode) => {
                            files.insert(*inode);
                        }
                    }
                }
            }
            reachable.insert(path);
        }
        state.dirs.retain(|path, _| reachable.contains(path));
        state.inodes.retain(|inode, _| files.contains(inode));
        let mut inodes: Vec<u64> = state.inodes.keys().copied().collect();
        inodes.sort_unstable();
        for id in inodes {
            let inode = state.inodes.get_mut(&id).expect("listed");
            let durable_len = inode.durable.len();
            let extends = inode.data.len() > durable_len
                && inode.data[..durable_len] == inode.durable[..]
                && inode.poisoned.is_empty();
            let kept = if extends {
                let extra = inode.data.len() - durable_len;
                match rng.below(4) {
                    0 => 0,
                    1 => extra,
                    _ => {
                        // Torn at a sector boundary of the file.
                        let end = durable_len + rng.below(extra as u64 + 1) as usize;
                        (end / SECTOR_BYTES * SECTOR_BYTES).max(durable_len) - durable_len
                    }
                }
            } else {
                0
            };
            let mut data = inode.durable.clone();
            data.extend_from_slice(&inode.data[durable_len..durable_len + kept]);
            inode.durable = data.clone();
            inode.data = data;
            inode.poisoned.clear();
        }
        state.generation += 1;
        state.off = false;
        state.crash_after = None;
        state.failing_syncs = 0;
    }

    /// Flip one bit of a stored file, in what is durable and what is read alike (damage at
    /// rest). Returns false if the file has no byte at `position`.
    pub fn flip_bit(&self, path: &Path, position: usize, bit: u8) -> bool {
        let mut state = self.lock();
        let Ok(Entry::File(id)) = state.entry(path) else {
            return false;
        };
        let inode = state.inodes.get_mut(&id).expect("entries name live inodes");
        if position >= inode.data.len() {
            return false;
        }
        inode.data[position] ^= 1 << (bit % 8);
        if position < inode.durable.len() {
            inode.durable[position] ^= 1 << (bit % 8);
        }
        true
    }

    /// The durable bytes of a file (what a power cut now would keep, torn tails aside).
    pub fn durable_bytes(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.lock();
        match state.entry(path) {
            Ok(Entry::File(id)) => Some(state.inodes[&id].durable.clone()),
            _ => None,
        }
    }
}

struct SimFile {
    disk: SimDisk,
    inode: u64,
    generation: u64,
    writable: bool,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
        let mut state = self.disk.lock();
        state.check_on()?;
        if state.generation != self.generation || !state.inodes.contains_key(&self.inode) {
            return Err(io::Error::other("a handle from before the power cut"));
        }
        f(&mut state, self.inode)
    }

    /// Like `with`, for a change: the handle must have been opened for writing.
    fn with_writable<T>(&self, f: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "opened for reading",
            ));
        }
        self.with(f)
    }
}

impl DiskFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        self.with(|state, id| {
            let data = &state.inodes[&id].data;
            let start = usize::try_from(position).map_err(io::Error::other)?;
            let bytes = data
                .get(start..start + buf.len())
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
            buf.copy_from_slice(bytes);
            Ok(())
        })
    }

    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        self.with_writable(|state, id| {
            state.step()?;
            let room = state
                .capacity_bytes
                .map(|cap| cap.saturating_sub(state.used_bytes()) as usize)
                .unwrap_or(usize::MAX);
            let inode = state.inodes.get_mut(&id).expect("checked");
            if bytes.len() > room {
                inode.data.extend_from_slice(&bytes[..room]);
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no space left on the simulated disk",
                ));
            }
            inode.data.extend_from_slice(bytes);
            Ok(())
        })
    }

    fn sync(&self) -> io::Result<()> {
        self.with(|state, id| {
            state.step()?;
            let failing = state.failing_syncs > 0;
            if failing {
                state.failing_syncs -= 1;
            }
            let inode = state.inodes.get_mut(&id).expect("checked");
            if failing {
                let from = inode.durable.len().min(inode.data.len());
                inode.poisoned.push(from..inode.data.len());
                return Err(io::Error::other("simulated I/O error while syncing"));
            }
            let mut durable = inode.data.clone();
            for range in inode.poisoned.drain(..) {
                for at in range {
                    if let Some(byte) = durable.get_mut(at) {
                        *byte = inode.durable.get(at).copied().unwrap_or(0);
                    }
                }
            }
            inode.durable = durable;
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with_writable(|state, id| {
            state.step()?;
            let len = usize::try_from(len).map_err(io::Error::other)?;
            state
                .inodes
                .get_mut(&id)
                .expect("checked")
                .data
                .resize(len, 0);
            Ok(())
        })
    }

    fn size(&self) -> io::Result<u64> {
        self.with(|state, id| Ok(state.inodes[&id].data.len() as u64))
    }
}

impl Disk for SimDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>> {
        let mut state = self.lock();
        state.check_on()?;
        let inode = match mode {
            OpenMode::Read | OpenMode::Append => match state.entry(path)? {
                Entry::File(id) => id,
                Entry::Dir => {
                    return Err(io::Error::new(io::ErrorKind::IsADirectory, "a directory"));
                }
            },
            OpenMode::CreateNew => {
                let (parent, name) = state.new_entry(path)?;
                let id = state.next_inode;
                state.next_inode += 1;
                state.inodes.insert(id, Inode::default());
                state
                    .dirs
                    .get_mut(&parent)
                    .expect("checked")
                    .entries
                    .insert(name, Entry::File(id));
                id
            }
        };
        Ok(Arc::new(SimFile {
            disk: self.clone(),
            inode,
            generation: state.generation,
            writable: mode != OpenMode::Read,
        }))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.lock();
        state.check_on()?;
        match state.entry(path)? {
            Entry::File(id) => Ok(state.inodes[&id].data.clone()),
            Entry::Dir => Err(io::Error::new(io::ErrorKind::IsADirectory, "a directory")),
        }
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.lock();
        state.check_on()?;
        state
            .dirs
            .get(dir)
            .map(|d| d.entries.keys().cloned().collect())
            .ok_or_else(|| not_found(dir))
    }

    fn exists(&self, path: &Path) -> bool {
        self.lock().entry(path).is_ok()
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check_on()?;
        let (parent, name) = state.new_entry(path)?;
        state
            .dirs
            .get_mut(&parent)
            .expect("checked")
            .entries
            .insert(name, Entry::Dir);
        state.dirs.insert(path.to_path_buf(), Dir::default());
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check_on()?;
        let (from_parent, from_name) = State::split(from)?;
        let (to_parent, to_name) = State::split(to)?;
        let Entry::File(id) = state.entry(from)? else {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "renames files only",
            ));
        };
        if !state.dirs.contains_key(&to_parent) {
            return Err(not_found(&to_parent));
        }
        state.step()?;
        state
            .dirs
            .get_mut(&from_parent)
            .expect("checked")
            .entries
            .remove(&from_name);
        state
            .dirs
            .get_mut(&to_parent)
            .expect("checked")
            .entries
            .insert(to_name, Entry::File(id));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check_on()?;
        let (parent, name) = State::split(path)?;
        let Entry::File(_) = state.entry(path)? else {
            return Err(io::Error::new(io::ErrorKind::IsADirectory, "a directory"));
        };
        state.step()?;
        state
            .dirs
            .get_mut(&parent)
            .expect("checked")
            .entries
            .remove(&name);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check_on()?;
        if !state.dirs.contains_key(dir) {
            return Err(not_found(dir));
        }
        state.step()?;
        let d = state.dirs.get_mut(dir).expect("checked");
        d.durable = d.entries.clone();
        Ok(())
    }

    fn blocks(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_appends_are_lost_or_torn_at_a_sector_and_synced_ones_kept() {
        for seed in 0..64 {
            let disk = SimDisk::new();
            let mut rng = Rng::new(seed);
            let path = Path::new("/f");
            let file = disk.open(path, OpenMode::CreateNew).expect("creates");
            disk.sync_dir(Path::new("/")).expect("syncs");
            file.append(&[1; 700]).expect("appends");
            file.sync().expect("syncs");
            file.append(&[2; 2000]).expect("appends");
            disk.power_cut(&mut rng);
            let bytes = disk.read(path).expect("reads");
            assert!(bytes.len() >= 700 && bytes.len() <= 2700, "{}", bytes.len());
            assert!(bytes[..700].iter().all(|b| *b == 1));
            assert!(bytes[700..].iter().all(|b| *b == 2));
            assert!(
                bytes.len() == 2700
                    || bytes.len() == 700
                    || bytes.len().is_multiple_of(SECTOR_BYTES)
            );
        }
    }

    #[test]
    fn a_failed_sync_loses_its_pages_even_after_a_later_sync() {
        let disk = SimDisk::new();
        let path = Path::new("/f");
        let file = disk.open(path, OpenMode::CreateNew).expect("creates");
        disk.sync_dir(Path::new("/")).expect("syncs");
        file.append(b"lost").expect("appends");
        disk.fail_syncs(1);
        assert!(file.sync().is_err());
        assert_eq!(
            disk.read(path).expect("reads"),
            b"lost",
            "still in the cache"
        );
        file.sync().expect("syncs");
        disk.power_cut(&mut Rng::new(0));
        assert_eq!(disk.read(path).expect("reads"), [0; 4]);
    }

    #[test]
    fn the_power_goes_after_the_armed_operation_count_and_comes_back() {
        let disk = SimDisk::new();
        disk.crash_after(1);
        disk.create_dir(Path::new("/a"))
            .expect("first operation runs");
        assert!(disk.create_dir(Path::new("/b")).is_err());
        assert!(disk.is_off());
        assert!(
            disk.list(Path::new("/")).is_err(),
            "everything fails while off"
        );
        disk.power_cut(&mut Rng::new(0));
        assert_eq!(
            disk.list(Path::new("/")).expect("lists"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_full_disk_writes_what_fits_and_says_so() {
        let disk = SimDisk::new();
        disk.set_capacity(Some(10));
        let file = disk
            .open(Path::new("/f"), OpenMode::CreateNew)
            .expect("creates");
        let error = file.append(&[7; 16]).expect_err("full");
        assert_eq!(error.kind(), io::ErrorKind::StorageFull);
        assert_eq!(file.size().expect("size"), 10);
    }
}
