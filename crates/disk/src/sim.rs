//! A simulated disk that keeps what was written apart from what is durable, and a seeded
//! random number generator to drive simulations with.
//!
//! The model is POSIX's strict one, the least a real file system promises:
//! - A file's bytes and length become durable when the file is synced. At a power cut each
//!   512-byte sector written since the last sync independently keeps its old or its new
//!   contents (disks reorder writes), and the length is the old one, the new one, or for a
//!   file that grew, any sector boundary between: a grown file may come back longer with
//!   zeros where its new sectors did not reach the disk.
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
    /// What reads see (the page cache).
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Sectors written since the last sync: only these may change at a power cut. A failed
    /// sync clears them without making them durable (the kernel marks the pages clean), so
    /// what it was writing is lost for good.
    dirty: BTreeSet<usize>,
    /// The lengths the file took since the last sync, in order: one for a truncation or an
    /// extension by `set_len` (a single metadata change), a range for a write that grew the
    /// file (its size may have reached the disk part-way, at a sector boundary).
    lengths: Vec<Range<usize>>,
}

impl Inode {
    /// Mark the sectors holding `range` as written.
    fn touch(&mut self, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        self.dirty
            .extend(range.start / SECTOR_BYTES..=(range.end - 1) / SECTOR_BYTES);
    }

    /// The sector at `start`, up to `end`, as the disk holds it durably (zeros past the
    /// durable end: a grown file's new sectors).
    fn old(&self, start: usize, end: usize, into: &mut Vec<u8>) {
        let held = end.min(self.durable.len()).max(start);
        into.extend_from_slice(self.durable.get(start..held).unwrap_or_default());
        into.resize(into.len() + (end - held), 0);
    }

    /// The sector at `start`, up to `end`, as the disk would hold it were it written back
    /// now: the cache's bytes if it is dirty (the old ones past the cache's end, where the
    /// file was shortened).
    fn current(&self, start: usize, end: usize, into: &mut Vec<u8>) {
        if !self.dirty.contains(&(start / SECTOR_BYTES)) || start >= self.data.len() {
            return self.old(start, end, into);
        }
        let cached = end.min(self.data.len()).max(start);
        into.extend_from_slice(&self.data[start..cached]);
        if cached < end {
            let mut rest = Vec::new();
            self.old(start, end, &mut rest);
            into.extend_from_slice(&rest[cached - start..]);
        }
    }

    /// A successful sync: every dirty sector and the length reach the disk.
    fn sync(&mut self) {
        let len = self.data.len();
        let mut durable = Vec::with_capacity(len);
        for start in (0..len).step_by(SECTOR_BYTES) {
            self.current(start, (start + SECTOR_BYTES).min(len), &mut durable);
        }
        self.durable = durable;
        self.dirty.clear();
        self.lengths.clear();
    }

    /// What a power cut leaves of the file.
    fn after_power_cut(&self, rng: &mut Rng) -> Vec<u8> {
        // Any length the file took since its last sync, or the durable one.
        let pick = rng.below(self.lengths.len() as u64 + 1) as usize;
        let len = match self.lengths.get(pick) {
            None => self.durable.len(),
            Some(range) if range.len() <= 1 || rng.percent(50) => range.end - 1,
            Some(range) => {
                let end = range.start + rng.below(range.len() as u64) as usize;
                (end / SECTOR_BYTES * SECTOR_BYTES).max(range.start)
            }
        };
        // Whole files often come back all old or all new; otherwise sector by sector.
        let choice = rng.below(3);
        let mut bytes = Vec::with_capacity(len);
        for start in (0..len).step_by(SECTOR_BYTES) {
            let end = (start + SECTOR_BYTES).min(len);
            let new = self.dirty.contains(&(start / SECTOR_BYTES))
                && match choice {
                    0 => false,
                    1 => true,
                    _ => rng.percent(50),
                };
            if new {
                self.current(start, end, &mut bytes);
            } else {
                self.old(start, end, &mut bytes);
            }
        }
        bytes
    }
}

/// Who holds a file's advisory lock.
#[derive(Debug, Default)]
struct Lock {
    exclusive: Option<u64>,
    shared: BTreeSet<u64>,
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
    /// Syncs that succeed before the failing ones start.
    syncs_before_failing: u32,
    operations: u64,
    /// Advisory locks by inode, held by open handles; a power cut or a killed process
    /// releases them all.
    locks: HashMap<u64, Lock>,
    next_handle: u64,
    /// A planted bug, to show a simulation's checks can fail: directory syncs do nothing.
    forget_directory_syncs: bool,
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

    /// Whether this sync is one of the armed failures.
    fn sync_fails(&mut self) -> bool {
        if self.failing_syncs == 0 {
            return false;
        }
        if self.syncs_before_failing > 0 {
            self.syncs_before_failing -= 1;
            return false;
        }
        self.failing_syncs -= 1;
        true
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
        state.locks.clear();
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

    /// After `skip` more syncs succeed, the `count` that follow fail.
    pub fn fail_syncs_after(&self, skip: u32, count: u32) {
        let mut state = self.lock();
        state.syncs_before_failing = skip;
        state.failing_syncs = count;
    }

    /// Appends fail with `StorageFull` once the files hold this many bytes in all.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock().capacity_bytes = bytes;
    }

    pub fn used_bytes(&self) -> u64 {
        self.lock().used_bytes()
    }

    /// Plant a bug in the code under test: from now on its directory syncs succeed without
    /// making anything durable. A simulation that still passes cannot see missing syncs.
    pub fn forget_directory_syncs(&self) {
        self.lock().forget_directory_syncs = true;
    }

    /// The next `count` syncs fail: a file's lose what they were writing; a directory's leave
    /// its entries as they were on the disk.
    pub fn fail_syncs(&self, count: u32) {
        self.fail_syncs_after(0, count);
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
            let bytes = inode.after_power_cut(rng);
            *inode = Inode {
                data: bytes.clone(),
                durable: bytes,
                ..Inode::default()
            };
        }
        state.locks.clear();
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
    mode: OpenMode,
    /// Names this handle as a lock holder.
    handle: u64,
}

impl Drop for SimFile {
    fn drop(&mut self) {
        let mut state = self.disk.lock();
        if state.generation == self.generation {
            release(&mut state, self.inode, self.handle);
        }
    }
}

fn release(state: &mut State, inode: u64, handle: u64) {
    if let Some(lock) = state.locks.get_mut(&inode) {
        if lock.exclusive == Some(handle) {
            lock.exclusive = None;
        }
        lock.shared.remove(&handle);
        if lock.exclusive.is_none() && lock.shared.is_empty() {
            state.locks.remove(&inode);
        }
    }
}

/// Write `bytes` at `position` of an inode, within the disk's capacity.
fn write_bytes(state: &mut State, id: u64, bytes: &[u8], position: usize) -> io::Result<()> {
    state.step()?;
    let len = state.inodes[&id].data.len();
    let growth = (position + bytes.len()).saturating_sub(len);
    let room = state
        .capacity_bytes
        .map(|cap| cap.saturating_sub(state.used_bytes()) as usize)
        .unwrap_or(usize::MAX);
    let inode = state.inodes.get_mut(&id).expect("checked");
    let fits = if growth > room {
        bytes.len() - (growth - room)
    } else {
        bytes.len()
    };
    let end = position + fits;
    if inode.data.len() < end {
        let before = inode.data.len();
        inode.data.resize(end, 0);
        inode.touch(before..end);
        inode.lengths.push(before..end + 1);
    }
    inode.data[position..end].copy_from_slice(&bytes[..fits]);
    inode.touch(position..end);
    if fits < bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::StorageFull,
            "no space left on the simulated disk",
        ));
    }
    Ok(())
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
        if self.mode == OpenMode::Read {
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
            let end = state.inodes[&id].data.len();
            write_bytes(state, id, bytes, end)
        })
    }

    fn write_at(&self, bytes: &[u8], position: u64) -> io::Result<()> {
        if self.mode != OpenMode::Write {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a file opened for appending cannot be written at a position",
            ));
        }
        self.with_writable(|state, id| {
            let position = usize::try_from(position).map_err(io::Error::other)?;
            write_bytes(state, id, bytes, position)
        })
    }

    fn sync(&self) -> io::Result<()> {
        self.with(|state, id| {
            state.step()?;
            let failing = state.sync_fails();
            let inode = state.inodes.get_mut(&id).expect("checked");
            if failing {
                inode.dirty.clear();
                inode.lengths.clear();
                return Err(io::Error::other("simulated I/O error while syncing"));
            }
            inode.sync();
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with_writable(|state, id| {
            state.step()?;
            let len = usize::try_from(len).map_err(io::Error::other)?;
            let inode = state.inodes.get_mut(&id).expect("checked");
            let before = inode.data.len();
            inode.data.resize(len, 0);
            inode.touch(before.min(len)..before.max(len));
            inode.lengths.push(len..len + 1);
            Ok(())
        })
    }

    fn size(&self) -> io::Result<u64> {
        self.with(|state, id| Ok(state.inodes[&id].data.len() as u64))
    }

    fn try_lock(&self, shared: bool) -> io::Result<bool> {
        let handle = self.handle;
        self.with(|state, id| {
            release(state, id, handle);
            let lock = state.locks.entry(id).or_default();
            let free = lock.exclusive.is_none() && (shared || lock.shared.is_empty());
            if free {
                if shared {
                    lock.shared.insert(handle);
                } else {
                    lock.exclusive = Some(handle);
                }
            }
            Ok(free)
        })
    }

    fn unlock(&self) -> io::Result<()> {
        let handle = self.handle;
        self.with(|state, id| {
            release(state, id, handle);
            Ok(())
        })
    }
}

impl Disk for SimDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>> {
        let mut state = self.lock();
        state.check_on()?;
        let inode = match mode {
            OpenMode::Read | OpenMode::Append | OpenMode::Write => match state.entry(path)? {
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
        let handle = state.next_handle;
        state.next_handle += 1;
        Ok(Arc::new(SimFile {
            disk: self.clone(),
            inode,
            generation: state.generation,
            mode,
            handle,
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
        if state.sync_fails() {
            // The entries stay as they were on the disk; a later sync may still persist them.
            return Err(io::Error::other(
                "simulated I/O error while syncing a directory",
            ));
        }
        if state.forget_directory_syncs {
            return Ok(());
        }
        let d = state.dirs.get_mut(dir).expect("checked");
        d.durable = d.entries.clone();
        Ok(())
    }

    fn mode(&self, path: &Path) -> io::Result<u32> {
        let state = self.lock();
        state.check_on()?;
        // What `OsDisk` creates; the simulation has no other users to keep out.
        match state.entry(path)? {
            Entry::File(_) => Ok(0o600),
            Entry::Dir => Ok(0o700),
        }
    }

    fn blocks(&self) -> bool {
        false
    }
}

/// Run a seeded simulation over many schedules, as every power-cut test does:
/// `{prefix}_SEED=S` replays schedule `S` alone (printing its summary), `{prefix}_SCHEDULES=N`
/// runs `N` schedules (`default` otherwise). Panics with up to five violations and how to
/// replay them (`replay` is the cargo command that runs the test); returns the summaries of
/// the schedules run.
pub fn run_schedules<S: std::fmt::Debug>(
    prefix: &str,
    default: u64,
    replay: &str,
    run: impl Fn(u64) -> Result<S, String>,
) -> Vec<S> {
    let seed_var = format!("{prefix}_SEED");
    let schedules_var = format!("{prefix}_SCHEDULES");
    if let Ok(seed) = std::env::var(&seed_var) {
        let seed: u64 = seed
            .parse()
            .unwrap_or_else(|_| panic!("{seed_var} is a number"));
        return match run(seed) {
            Ok(summary) => {
                println!("seed {seed}: {summary:?}");
                vec![summary]
            }
            Err(violation) => panic!("seed {seed}: {violation}"),
        };
    }
    let schedules: u64 = std::env::var(&schedules_var)
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("{schedules_var} is a number"))
        })
        .unwrap_or(default);
    let mut violations = Vec::new();
    let mut summaries = Vec::new();
    for seed in 0..schedules {
        match run(seed) {
            Ok(summary) => summaries.push(summary),
            Err(violation) => {
                violations.push(format!("seed {seed}: {violation}"));
                if violations.len() >= 5 {
                    break;
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "{} violation(s); replay one with {seed_var}=SEED {replay}:\n{}",
        violations.len(),
        violations.join("\n")
    );
    summaries
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
            assert!(bytes[..700].iter().all(|b| *b == 1), "synced bytes kept");
            assert!(
                bytes.len() == 2700
                    || bytes.len() == 700
                    || bytes.len().is_multiple_of(SECTOR_BYTES)
            );
            // The sector holding the synced end is shared: its new part is 2 or 0 as a whole.
            for (index, sector) in bytes.chunks(SECTOR_BYTES).enumerate() {
                let new =
                    &sector[(700usize.saturating_sub(index * SECTOR_BYTES)).min(sector.len())..];
                assert!(
                    new.iter().all(|b| *b == 2) || new.iter().all(|b| *b == 0),
                    "seed {seed}: sector {index} is old or new as a whole"
                );
            }
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

    #[test]
    fn overwritten_sectors_come_back_old_or_new_each_and_synced_ones_new() {
        let mut outcomes = BTreeSet::new();
        for seed in 0..64 {
            let disk = SimDisk::new();
            let mut rng = Rng::new(seed);
            let path = Path::new("/db");
            drop(disk.open(path, OpenMode::CreateNew).expect("creates"));
            disk.sync_dir(Path::new("/")).expect("syncs");
            let file = disk.open(path, OpenMode::Write).expect("opens");
            file.write_at(&[1; 2048], 0).expect("writes");
            file.sync().expect("syncs");
            file.write_at(&[2; 1024], 512).expect("writes");
            file.write_at(&[3; 10], 2040).expect("grows");
            disk.power_cut(&mut rng);
            let bytes = disk.read(path).expect("reads");
            assert!(
                bytes.len() == 2048 || bytes.len() == 2050,
                "{}",
                bytes.len()
            );
            assert!(
                bytes[..512].iter().all(|b| *b == 1),
                "untouched sector kept"
            );
            let middle: Vec<u8> = [512, 1024].iter().map(|at| bytes[*at]).collect();
            for (at, value) in [512usize, 1024].iter().zip(&middle) {
                assert!(
                    bytes[*at..*at + 512].iter().all(|b| b == value),
                    "whole sectors"
                );
            }
            outcomes.insert(middle);
        }
        assert_eq!(
            outcomes.len(),
            4,
            "every mix of the two rewritten sectors happens"
        );
    }

    #[test]
    fn locks_exclude_each_other_until_released_or_the_power_goes() {
        let disk = SimDisk::new();
        let path = Path::new("/db");
        drop(disk.open(path, OpenMode::CreateNew).expect("creates"));
        let one = disk.open(path, OpenMode::Write).expect("opens");
        let two = disk.open(path, OpenMode::Write).expect("opens");
        assert!(one.try_lock(false).expect("locks"));
        assert!(!two.try_lock(true).expect("asks"), "held exclusively");
        drop(one);
        assert!(two.try_lock(true).expect("locks"), "released when closed");
        let three = disk.open(path, OpenMode::Read).expect("opens");
        assert!(three.try_lock(true).expect("shares"));
        assert!(
            !three.try_lock(false).expect("asks"),
            "another holds it shared"
        );
        disk.revive();
        let four = disk.open(path, OpenMode::Write).expect("opens");
        assert!(
            four.try_lock(false).expect("locks"),
            "a killed process holds nothing"
        );
    }
}
