//! The audit log: every decision on a control action and every access to personal data,
//! written and synced before the answer, each entry chained to the one before by hash,
//! with checkpoints signed by the node's key.
//!
//! Files in the log's directory (`DATA/audit`):
//! - `NNNNNNNNNNNNNNNNNNNN.log`: segments named by their first sequence number
//!   ([`format`] has the bytes). A segment is created whole (header written, synced,
//!   renamed into place, directory synced) and then only appended to; a new one starts at
//!   64 MiB.
//! - `checkpoints`: signed checkpoints, one JSON line each, appended and synced.
//! - `signing.key` (ed25519, PKCS#8) and `redact.key` (the key of [`AuditLog::redact`]),
//!   mode 0600.
//!
//! **Group commit.** Appenders add their frames to a shared batch; one of them writes and
//! syncs the batch while the others wait, so a sync carries every entry that arrived during
//! the one before. [`AuditLog::append`] returns only once its entry is durable.
//!
//! **Failures close the log.** If a write or sync fails, every waiting append and every
//! later one fails ([`AuditError::Unavailable`]), so callers refuse the action (503), as
//! Vault's audit devices do. A failed sync may have lost writes the page cache still shows,
//! so the log stays closed until maru restarts (after an fsync error, restart the machine,
//! docs/node.md); a failed write (a full disk) is retried by reopening the log at most
//! once a second.
//!
//! **Recovery never deletes.** Opening walks the newest segment's chain. If bytes follow
//! the last whole, chained entry (a write cut short by a crash, never acknowledged, or
//! damage), they stay where they are, and a new segment starts whose header names them
//! (segment, offset, length, BLAKE3) and whose sequence numbers start past any the bytes can
//! hold, so a number is never given twice. Verification then reports a recorded crash, not
//! tampering; an edit elsewhere still breaks the chain.

pub mod checkpoint;
pub mod format;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use disk::{DiskFile, Env, OpenMode};
use serde::{Deserialize, Serialize};

pub use checkpoint::Checkpoint;
use checkpoint::Signer;
use format::{ChainEnd, Frame, GENESIS, Hash, SEGMENT_HEADER_BYTES, SegmentHeader, Tail};
pub use verify::{Problem, ProblemKind, Report, Resumed, verify};

/// A segment is closed and a new one started once it holds this many bytes.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;

/// What an entry is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A control action (deploy, key management, ...).
    Action,
    /// An access to data.
    Data,
    /// The log's own events (started, resumed after a crash).
    Log,
}

/// The decision recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
    /// Not a decision: something that happened.
    Note,
}

/// What a caller records. Secret values never belong here: pass them through
/// [`AuditLog::redact`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: Kind,
    /// Who: `token:<redacted>`, `operator:NAME`, `service:APP/SERVICE`, `maru`.
    pub actor: String,
    /// What: `deploy`, `store.keys.create`, `topic.read`, ...
    pub action: String,
    /// On what: `app/traffic`, `topic/traffic.loops`, ...
    pub resource: String,
    pub decision: Decision,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The client's address, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// An entry as stored: the event with its sequence number and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub time_ms: u64,
    #[serde(flatten)]
    pub event: Event,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log cannot take entries now; the action must be refused.
    #[error("the audit log cannot be written, so the action is refused: {0}")]
    Unavailable(String),
    #[error("the audit log in {}: {message}", dir.display())]
    Open { dir: PathBuf, message: String },
    #[error("an audit entry is larger than {max} bytes ({len})")]
    TooLarge { len: usize, max: usize },
}

/// What opening the log found and did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Opened {
    /// Entries in the newest segment's chain.
    pub entries_in_newest_segment: u64,
    /// Bytes after the last whole entry that a new segment now names.
    pub tail: Option<Tail>,
}

struct Segment {
    file: Arc<dyn DiskFile>,
    bytes: u64,
}

struct State {
    segment: Segment,
    /// The next sequence number to give, and the chain value it chains from (including
    /// entries not yet durable).
    next_seq: u64,
    last_hash: Hash,
    /// Frames waiting for the next write, and the last entry among them.
    batch: Vec<u8>,
    batch_last: Option<(u64, Hash)>,
    /// Entries up to this one are durable.
    durable_seq: u64,
    durable_hash: Hash,
    /// A writer is writing and syncing a batch.
    writing: bool,
    failed: Option<Failure>,
    last_checkpoint_seq: u64,
}

#[derive(Clone)]
struct Failure {
    message: String,
    /// A sync failed: only a restart recovers.
    permanent: bool,
    at: Instant,
}

/// The audit log (see the module docs).
pub struct AuditLog {
    env: Env,
    dir: PathBuf,
    segment_bytes_max: u64,
    signer: Signer,
    redact_key: [u8; 32],
    state: Mutex<State>,
    written: Condvar,
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

/// The segments in `dir`, by first sequence number.
fn segments(env: &Env, dir: &Path) -> Result<Vec<u64>, String> {
    let names = env
        .disk
        .list(dir)
        .map_err(|e| format!("list {}: {e}", dir.display()))?;
    let mut firsts: Vec<u64> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".log"))
        .filter(|n| n.len() == 20)
        .filter_map(|n| n.parse().ok())
        .collect();
    firsts.sort_unstable();
    Ok(firsts)
}

/// A key file's bytes, made (whole, 0600, durable) with `make` if it does not exist yet.
fn key_file(
    env: &Env,
    path: &Path,
    make: impl FnOnce() -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, String> {
    if !env.disk.exists(path) {
        let bytes = make()?;
        disk::write_atomically(env.disk.as_ref(), path, &bytes).map_err(|e| e.to_string())?;
    }
    env.disk
        .read(path)
        .map_err(|e| format!("read {}: {e}", path.display()))
}

/// Create a segment whole: header to a temporary file, synced, renamed, directory synced.
fn create_segment(env: &Env, dir: &Path, header: &SegmentHeader) -> Result<Segment, String> {
    let path = dir.join(segment_name(header.first_seq));
    let bytes = header.encode();
    disk::write_atomically(env.disk.as_ref(), &path, &bytes).map_err(|e| e.to_string())?;
    let file = env
        .disk
        .open(&path, OpenMode::Append)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    Ok(Segment {
        file,
        bytes: bytes.len() as u64,
    })
}

impl AuditLog {
    /// Open (or create) the log in `dir`, recovering after a crash (module docs).
    pub fn open(env: Env, dir: &Path) -> Result<(AuditLog, Opened), AuditError> {
        Self::open_with_segment_bytes(env, dir, SEGMENT_BYTES_MAX)
    }

    /// [`AuditLog::open`], starting new segments at `segment_bytes_max` (tests use small
    /// ones to cover the change of segment).
    pub fn open_with_segment_bytes(
        env: Env,
        dir: &Path,
        segment_bytes_max: u64,
    ) -> Result<(AuditLog, Opened), AuditError> {
        let failed = |message: String| AuditError::Open {
            dir: dir.to_path_buf(),
            message,
        };
        disk::create_dir_all(env.disk.as_ref(), dir).map_err(|e| failed(e.to_string()))?;
        disk::remove_temporaries(env.disk.as_ref(), dir).map_err(|e| failed(e.to_string()))?;
        let signing = key_file(&env, &dir.join("signing.key"), Signer::generate).map_err(failed)?;
        let signer =
            Signer::from_pkcs8(&signing).map_err(|e| failed(format!("signing.key: {e}")))?;
        let redact = key_file(&env, &dir.join("redact.key"), || {
            crate::random_bytes::<32>().map(|key| key.to_vec())
        })
        .map_err(failed)?;
        let redact_key: [u8; 32] = redact
            .as_slice()
            .try_into()
            .map_err(|_| failed("redact.key is not 32 bytes".into()))?;
        let (segment, end, opened) = recover(&env, dir).map_err(failed)?;
        let last_checkpoint_seq = read_checkpoints(&env, dir)
            .map_err(failed)?
            .last()
            .map_or(0, |c| c.seq);
        let log = AuditLog {
            env,
            dir: dir.to_path_buf(),
            segment_bytes_max,
            signer,
            redact_key,
            state: Mutex::new(State {
                segment,
                next_seq: end.next_seq,
                last_hash: end.last_hash,
                batch: Vec::new(),
                batch_last: None,
                durable_seq: end.last_seq,
                durable_hash: end.last_hash,
                writing: false,
                failed: None,
                last_checkpoint_seq,
            }),
            written: Condvar::new(),
        };
        Ok((log, opened))
    }

    /// A keyed hash of a secret value, safe to record: equal secrets give equal values, and
    /// nobody without the node's `redact.key` can test a guess.
    pub fn redact(&self, secret: &str) -> String {
        let hash = blake3::keyed_hash(&self.redact_key, secret.as_bytes());
        format!("hmac:{}", &checkpoint::hex(hash.as_bytes())[..32])
    }

    /// The public half of the key that signs checkpoints, base64.
    pub fn public_key(&self) -> String {
        self.signer.public_key()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Record `event`; returns its sequence number once it is durable.
    pub fn append(&self, event: Event) -> Result<u64, AuditError> {
        let time_ms = self.env.clock.now_ms();
        let mut state = self.lock();
        self.usable(&mut state)?;
        let seq = state.next_seq;
        let payload = serde_json::to_vec(&Entry {
            seq,
            time_ms,
            event,
        })
        .expect("entries serialise");
        if payload.len() > format::PAYLOAD_BYTES_MAX {
            return Err(AuditError::TooLarge {
                len: payload.len(),
                max: format::PAYLOAD_BYTES_MAX,
            });
        }
        let hash = format::chain(&state.last_hash, seq, &payload);
        Frame {
            seq,
            hash,
            payload: &payload,
        }
        .encode_into(&mut state.batch);
        state.next_seq = seq + 1;
        state.last_hash = hash;
        state.batch_last = Some((seq, hash));
        loop {
            if state.durable_seq >= seq {
                return Ok(seq);
            }
            if let Some(failure) = &state.failed {
                return Err(AuditError::Unavailable(failure.message.clone()));
            }
            if state.writing {
                state = self
                    .written
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            state = self.write_batch(state);
        }
    }

    /// Write and sync the waiting batch, without holding the lock while the disk works.
    fn write_batch<'a>(&'a self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let batch = std::mem::take(&mut state.batch);
        let Some((last_seq, last_hash)) = state.batch_last.take() else {
            return state;
        };
        state.writing = true;
        let file = state.segment.file.clone();
        let roll = state.segment.bytes + batch.len() as u64 >= self.segment_bytes_max;
        drop(state);
        let result = file
            .append(&batch)
            .map_err(|e| (format!("write: {e}"), false))
            .and_then(|()| {
                file.sync()
                    .map_err(|e| (format!("sync: {e}; restart the machine, then maru"), true))
            });
        let rolled = match (&result, roll) {
            (Ok(()), true) => Some(create_segment(
                &self.env,
                &self.dir,
                &SegmentHeader {
                    first_seq: last_seq + 1,
                    prev_seq: last_seq,
                    prev: last_hash,
                    tail: None,
                },
            )),
            _ => None,
        };
        let mut state = self.lock();
        state.writing = false;
        match result {
            Ok(()) => {
                assert!(
                    last_seq > state.durable_seq,
                    "durability only moves forward"
                );
                state.durable_seq = last_seq;
                state.durable_hash = last_hash;
                state.segment.bytes += batch.len() as u64;
                match rolled {
                    Some(Ok(segment)) => state.segment = segment,
                    // The batch is durable; the next one fails until a segment exists.
                    Some(Err(message)) => self.fail(&mut state, message, false),
                    None => {}
                }
            }
            Err((message, permanent)) => self.fail(&mut state, message, permanent),
        }
        self.written.notify_all();
        state
    }

    fn fail(&self, state: &mut State, message: String, permanent: bool) {
        tracing::error!(dir = %self.dir.display(), %message, "the audit log failed: actions are refused until it can be written");
        // Entries not yet written are dropped with the failure: their appends fail.
        state.batch.clear();
        state.batch_last = None;
        state.failed = Some(Failure {
            message,
            permanent,
            at: Instant::now(),
        });
    }

    /// Fail if the log is closed; a closed log whose failure was a write is reopened (at
    /// most once a second) from what is on disk.
    fn usable(&self, state: &mut MutexGuard<'_, State>) -> Result<(), AuditError> {
        let Some(failure) = state.failed.clone() else {
            return Ok(());
        };
        if failure.permanent || state.writing || failure.at.elapsed() < Duration::from_secs(1) {
            return Err(AuditError::Unavailable(failure.message));
        }
        match recover(&self.env, &self.dir) {
            Ok((segment, end, _)) => {
                tracing::info!(dir = %self.dir.display(), "the audit log is writable again");
                state.segment = segment;
                state.next_seq = end.next_seq;
                state.last_hash = end.last_hash;
                state.durable_seq = end.last_seq;
                state.durable_hash = end.last_hash;
                state.failed = None;
                Ok(())
            }
            Err(message) => {
                state.failed = Some(Failure {
                    message: message.clone(),
                    permanent: false,
                    at: Instant::now(),
                });
                Err(AuditError::Unavailable(message))
            }
        }
    }

    /// Sign the newest durable entry and append the checkpoint to `checkpoints` (synced);
    /// `None` if no entry was added since the last one.
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        let mut state = self.lock();
        if state.durable_seq == 0 || state.durable_seq == state.last_checkpoint_seq {
            return Ok(None);
        }
        let signed = self.signer.sign(
            state.durable_seq,
            &state.durable_hash,
            self.env.clock.now_ms(),
        );
        let mut line = serde_json::to_vec(&signed).expect("checkpoints serialise");
        line.push(b'\n');
        let path = self.dir.join("checkpoints");
        let unavailable = |e: String| AuditError::Unavailable(format!("checkpoint: {e}"));
        if !self.env.disk.exists(&path) {
            disk::write_atomically(self.env.disk.as_ref(), &path, b"")
                .map_err(|e| unavailable(e.to_string()))?;
        }
        let file = self
            .env
            .disk
            .open(&path, OpenMode::Append)
            .map_err(|e| unavailable(e.to_string()))?;
        file.append(&line).map_err(|e| unavailable(e.to_string()))?;
        file.sync().map_err(|e| unavailable(e.to_string()))?;
        state.last_checkpoint_seq = signed.seq;
        Ok(Some(signed))
    }

    /// The newest checkpoint, signing one first if entries were added since.
    pub fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        if let Some(fresh) = self.checkpoint()? {
            return Ok(Some(fresh));
        }
        Ok(read_checkpoints(&self.env, &self.dir)
            .map_err(AuditError::Unavailable)?
            .pop())
    }

    /// The sequence number of the newest durable entry (0 for none).
    pub fn durable_seq(&self) -> u64 {
        self.lock().durable_seq
    }

    /// Durable entries, oldest first, for which `keep` holds, after `after_seq`; at most
    /// `limit` of the newest of them. Reads the segments from disk.
    pub fn entries(
        &self,
        after_seq: u64,
        limit: usize,
        keep: impl Fn(&Entry) -> bool,
    ) -> Result<Vec<Entry>, AuditError> {
        let durable = self.durable_seq();
        read_entries(&self.env, &self.dir, after_seq, durable, limit, keep)
            .map_err(AuditError::Unavailable)
    }
}

/// Open the newest segment for appending, or start one (module docs: recovery).
fn recover(env: &Env, dir: &Path) -> Result<(Segment, ChainEnd, Opened), String> {
    let firsts = segments(env, dir)?;
    let Some(&newest) = firsts.last() else {
        let header = SegmentHeader {
            first_seq: 1,
            prev_seq: 0,
            prev: GENESIS,
            tail: None,
        };
        let segment = create_segment(env, dir, &header)?;
        let end = format::chain_end(&header, &header.encode());
        return Ok((segment, end, Opened::default()));
    };
    let path = dir.join(segment_name(newest));
    let bytes = env
        .disk
        .read(&path)
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    let header = SegmentHeader::decode(&bytes).filter(|h| h.first_seq == newest).ok_or_else(|| {
        format!(
            "segment {} has a damaged header (segments are created whole, so this is damage, not a crash): run `maru audit verify`, then move the file out of the directory to start a new segment",
            path.display()
        )
    })?;
    let end = format::chain_end(&header, &bytes);
    // Invariant: the chain never runs past the bytes, and holds at least the header.
    assert!(end.valid_bytes <= bytes.len() && end.valid_bytes >= SEGMENT_HEADER_BYTES);
    let entries_in_newest_segment = end.entries;
    if end.valid_bytes == bytes.len() {
        // What recovery accepts is made durable: a process killed before its sync leaves
        // writes only the page cache holds.
        let file = env
            .disk
            .open(&path, OpenMode::Append)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        file.sync()
            .map_err(|e| format!("sync {}: {e}", path.display()))?;
        env.disk
            .sync_dir(dir)
            .map_err(|e| format!("sync {}: {e}", dir.display()))?;
        let segment = Segment {
            file,
            bytes: bytes.len() as u64,
        };
        return Ok((
            segment,
            end,
            Opened {
                entries_in_newest_segment,
                tail: None,
            },
        ));
    }
    let rest = &bytes[end.valid_bytes..];
    let tail = Tail {
        segment: newest,
        offset: end.valid_bytes as u64,
        bytes: rest.len() as u64,
        hash: *blake3::hash(rest).as_bytes(),
    };
    let first_seq = format::seq_after_tail(end.next_seq, tail.bytes);
    tracing::warn!(
        segment = %path.display(),
        offset = tail.offset,
        bytes = tail.bytes,
        last_seq = end.last_seq,
        "the audit log ends in bytes that are not a whole entry (a write cut short by a crash, or damage); they are kept, and a new segment starts after them"
    );
    let header = SegmentHeader {
        first_seq,
        prev_seq: end.last_seq,
        prev: end.last_hash,
        tail: Some(tail),
    };
    let segment = create_segment(env, dir, &header)?;
    let resumed = format::chain_end(&header, &header.encode());
    Ok((
        segment,
        resumed,
        Opened {
            entries_in_newest_segment,
            tail: Some(tail),
        },
    ))
}

/// The checkpoints in `dir/checkpoints`, oldest first (a torn last line is skipped).
pub fn read_checkpoints(env: &Env, dir: &Path) -> Result<Vec<Checkpoint>, String> {
    let path = dir.join("checkpoints");
    if !env.disk.exists(&path) {
        return Ok(Vec::new());
    }
    let bytes = env
        .disk
        .read(&path)
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    Ok(bytes
        .split(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice(line).ok())
        .collect())
}

/// Entries after `after_seq` up to `until_seq`, at most the newest `limit` that `keep`
/// accepts, walking every segment's chain.
fn read_entries(
    env: &Env,
    dir: &Path,
    after_seq: u64,
    until_seq: u64,
    limit: usize,
    keep: impl Fn(&Entry) -> bool,
) -> Result<Vec<Entry>, String> {
    let mut out = std::collections::VecDeque::new();
    let firsts = segments(env, dir)?;
    for (index, &first) in firsts.iter().enumerate() {
        // Every entry of a segment comes before the next segment's first: a segment whose
        // successor starts at or before `after_seq + 1` holds nothing wanted.
        if firsts
            .get(index + 1)
            .is_some_and(|next| *next <= after_seq + 1)
        {
            continue;
        }
        let path = dir.join(segment_name(first));
        let bytes = env
            .disk
            .read(&path)
            .map_err(|e| format!("read {}: {e}", path.display()))?;
        let Some(header) = SegmentHeader::decode(&bytes) else {
            continue;
        };
        let end = format::chain_end(&header, &bytes);
        if end.next_seq <= after_seq + 1 {
            continue;
        }
        let mut at = SEGMENT_HEADER_BYTES;
        while at < end.valid_bytes {
            let frame = Frame::decode(&bytes[at..]).expect("the chain walked these frames");
            at += frame.encoded_len();
            if frame.seq <= after_seq || frame.seq > until_seq {
                continue;
            }
            let entry: Entry = serde_json::from_slice(frame.payload)
                .map_err(|e| format!("entry {} in {}: {e}", frame.seq, path.display()))?;
            assert_eq!(
                entry.seq, frame.seq,
                "an entry's payload names its own number"
            );
            if keep(&entry) {
                out.push_back(entry);
                if out.len() > limit {
                    out.pop_front();
                }
            }
        }
    }
    Ok(out.into())
}
