//! One topic: an append-only log of segment files with group commit, recovery, retention
//! and the committed offsets of its consumer groups.
//!
//! Appends go through one writer task per topic. It takes every append waiting in its
//! queue, writes them with one `write`, syncs once (`fdatasync`) and only then answers
//! them all, so an acknowledged event is on disk and fsync costs are shared by everyone
//! who arrived while the previous sync ran. The next group is gathered and encoded while
//! a sync runs, and starts as soon as it returns. Readers see only what is durable.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::record::{self, Decoded, Event, NewEvent};

/// A sparse index entry every this many bytes of a segment.
const INDEX_EVERY_BYTES: u64 = 4096;
/// One group commit writes at most this much.
const GROUP_BYTES_MAX: usize = 8 << 20;
/// Appends waiting for the writer, in bytes, before producers wait (backpressure).
const PENDING_BYTES_MAX: usize = 64 << 20;
/// How often an idle topic's writer applies retention (a busy one does every 10 s).
const RETENTION_IDLE_CHECK: Duration = Duration::from_secs(60);
/// A consumer group name: at most this many bytes of `[a-z0-9._-]`.
const GROUP_NAME_BYTES_MAX: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge after `fdatasync`: nothing acknowledged is lost, even on power loss.
    Fsync,
    /// Acknowledge after `write`; sync at least every `window`. A crash of the process
    /// loses nothing; a power loss can lose the acknowledged events of the last window.
    Batch { window: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicConfig {
    pub durability: Durability,
    /// Whole sealed segments whose newest event is older than this are deleted.
    pub retention_age: Option<Duration>,
    /// Oldest sealed segments are deleted while the topic is larger than this.
    pub retention_bytes: Option<u64>,
    /// A segment is sealed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// The largest event (payload plus attributes) an append accepts.
    pub event_bytes_max: usize,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            durability: Durability::Fsync,
            retention_age: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_bytes: Some(1 << 30),
            segment_bytes: 64 << 20,
            event_bytes_max: 1 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// An event, or the batch, is over a size limit; nothing was stored.
    #[error("{0}")]
    TooLarge(String),
    #[error("topic {0} is closed")]
    Closed(String),
    #[error("topic {topic} cannot be written: {message}; events were not stored")]
    Io { topic: String, message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("offset {from} has been deleted by retention; the oldest offset is {first}")]
    Expired { from: u64, first: u64 },
    #[error("topic {topic}: {message}")]
    Io { topic: String, message: String },
    #[error("topic {topic}: the record at offset {offset} is corrupt ({why})")]
    Corrupt {
        topic: String,
        offset: u64,
        why: &'static str,
    },
}

struct Segment {
    base: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Offset after the last durable record.
    end: u64,
    /// Bytes of durable records.
    durable_bytes: u64,
    newest_time_ms: u64,
    /// (offset, position) of a record every `INDEX_EVERY_BYTES` or so, ascending.
    index: Vec<(u64, u64)>,
}

struct Log {
    segments: Vec<Segment>,
    /// Events appended per second over the last minute: (second, count).
    recent: VecDeque<(u64, u64)>,
    appended_total: u64,
    /// Group commits (one write, and one fdatasync under `fsync` durability).
    commits_total: u64,
    /// fdatasyncs of the newest segment (group commits under `fsync`, window syncs under
    /// `batch`).
    syncs_total: u64,
    broken: Option<String>,
}

enum Job {
    Append(Append),
    Stop,
}

/// An append under way; see [`Topic::append_soon`].
pub type Appending =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Range<u64>, AppendError>> + Send>>;

struct Append {
    events: Vec<NewEvent>,
    bytes: usize,
    reply: oneshot::Sender<Result<Range<u64>, AppendError>>,
}

impl Append {
    /// A job for the writer, and where its answer will arrive.
    fn job(
        events: Vec<NewEvent>,
        bytes: usize,
    ) -> (Job, oneshot::Receiver<Result<Range<u64>, AppendError>>) {
        let (reply, answer) = oneshot::channel();
        (
            Job::Append(Append {
                events,
                bytes,
                reply,
            }),
            answer,
        )
    }
}

/// A snapshot of a topic for stats.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicStats {
    pub first: u64,
    pub next: u64,
    pub bytes: u64,
    pub segments: usize,
    pub appended_total: u64,
    pub commits_total: u64,
    pub syncs_total: u64,
    pub per_second_last_10s: f64,
    /// (group, committed offset).
    pub groups: Vec<(String, u64)>,
}

pub struct Topic {
    name: String,
    dir: PathBuf,
    log: Arc<Mutex<Log>>,
    committed: watch::Receiver<u64>,
    queue: mpsc::Sender<Job>,
    pending_bytes: Arc<Semaphore>,
    groups: Mutex<BTreeMap<String, u64>>,
    event_bytes_max: usize,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn io_message(action: &str, path: &Path, error: std::io::Error) -> String {
    format!("{action} {}: {error}", path.display())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What recovery found in one segment file.
struct Scanned {
    segment: Segment,
    /// Bytes after the last valid record, and why they are not a record.
    invalid_tail: Option<(u64, &'static str)>,
}

fn scan_segment(path: &Path, base: u64) -> std::io::Result<Scanned> {
    let bytes = Bytes::from(fs::read(path)?);
    let mut position = 0u64;
    let mut expected = base;
    let mut index = Vec::new();
    let mut last_indexed = None;
    let mut newest_time_ms = 0;
    let mut invalid_tail = None;
    while (position as usize) < bytes.len() {
        let rest = bytes.slice(position as usize..);
        match record::decode(&rest) {
            Decoded::Record { event, len } => {
                if event.offset != expected {
                    invalid_tail = Some((rest.len() as u64, "offsets out of sequence"));
                    break;
                }
                if last_indexed.is_none_or(|at| position - at >= INDEX_EVERY_BYTES) {
                    index.push((event.offset, position));
                    last_indexed = Some(position);
                }
                newest_time_ms = newest_time_ms.max(event.time_ms);
                expected += 1;
                position += len as u64;
            }
            Decoded::Incomplete => {
                invalid_tail = Some((rest.len() as u64, "torn tail"));
                break;
            }
            Decoded::Corrupt(why) => {
                invalid_tail = Some((rest.len() as u64, why));
                break;
            }
        }
    }
    Ok(Scanned {
        segment: Segment {
            base,
            path: path.to_path_buf(),
            file: Arc::new(File::open(path)?),
            end: expected,
            durable_bytes: position,
            newest_time_ms,
            index,
        },
        invalid_tail,
    })
}

/// Open the segments in `dir`, truncating an invalid tail of the newest one.
fn recover(name: &str, dir: &Path) -> Result<Vec<Segment>, String> {
    fs::create_dir_all(dir).map_err(|e| io_message("create topic directory", dir, e))?;
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_message("list", dir, e))? {
        let entry = entry.map_err(|e| io_message("list", dir, e))?;
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if let Some(base) = file_name
            .strip_suffix(".log")
            .and_then(|stem| stem.parse::<u64>().ok())
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    if bases.is_empty() {
        let path = segment_path(dir, 0);
        File::create(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_message("create segment", &path, e))?;
        sync_dir(dir).map_err(|e| io_message("sync", dir, e))?;
        bases.push(0);
    }
    let mut segments: Vec<Segment> = Vec::with_capacity(bases.len());
    for (i, base) in bases.iter().enumerate() {
        let path = segment_path(dir, *base);
        let scanned =
            scan_segment(&path, *base).map_err(|e| io_message("read segment", &path, e))?;
        let newest = i + 1 == bases.len();
        if let Some((bytes, why)) = scanned.invalid_tail {
            if newest {
                // Only the newest segment can have a torn tail; what follows the last valid
                // record was never acknowledged (acks wait for fsync), so it is cut off.
                tracing::warn!(topic = name, segment = %path.display(), bytes, why, "truncating the invalid tail of the newest segment");
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| {
                        f.set_len(scanned.segment.durable_bytes)?;
                        f.sync_all()
                    })
                    .map_err(|e| io_message("truncate torn tail of", &path, e))?;
            } else {
                let next_base = bases[i + 1];
                tracing::error!(
                    topic = name, segment = %path.display(), bytes, why,
                    lost = ?(scanned.segment.end..next_base),
                    "a sealed segment is damaged; the events in the lost range cannot be read"
                );
            }
        }
        if let Some(previous) = segments.last()
            && previous.end > *base
        {
            return Err(format!(
                "segments {} and {} overlap; move one aside after checking which is right",
                previous.path.display(),
                path.display()
            ));
        }
        segments.push(scanned.segment);
    }
    Ok(segments)
}

impl Topic {
    /// Open (recovering) or create the topic stored in `dir`.
    pub fn open(name: &str, dir: &Path, config: TopicConfig) -> Result<Arc<Topic>, String> {
        let segments = recover(name, dir)?;
        let next = segments.last().map(|s| s.end).unwrap_or(0);
        let groups = read_groups(&dir.join("groups"))?;
        let (committed_tx, committed) = watch::channel(next);
        let log = Arc::new(Mutex::new(Log {
            segments,
            recent: VecDeque::new(),
            appended_total: 0,
            commits_total: 0,
            syncs_total: 0,
            broken: None,
        }));
        let (queue, rx) = mpsc::channel(1024);
        let writer = Writer {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            config,
            log: log.clone(),
            committed: committed_tx,
            next,
            last_retention_ms: 0,
        };
        let pending_bytes = Arc::new(Semaphore::new(PENDING_BYTES_MAX));
        let handle = tokio::spawn(writer.run(rx, pending_bytes.clone()));
        Ok(Arc::new(Topic {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            log,
            committed,
            queue,
            pending_bytes,
            groups: Mutex::new(groups),
            event_bytes_max: config.event_bytes_max,
            writer: Mutex::new(Some(handle)),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Append events; resolves once they are durable, with their offsets.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Range<u64>, AppendError> {
        let bytes = self.checked_bytes(&events)?;
        if events.is_empty() {
            let next = *self.committed.borrow();
            return Ok(next..next);
        }
        // Producers wait here while the writer is behind: memory stays bounded.
        let permit = self
            .pending_bytes
            .acquire_many(u32::try_from(bytes).expect("bounded by checked_bytes"))
            .await
            .map_err(|_| AppendError::Closed(self.name.clone()))?;
        permit.forget();
        let (job, answer) = Append::job(events, bytes);
        if self.queue.send(job).await.is_err() {
            return Err(AppendError::Closed(self.name.clone()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(AppendError::Closed(self.name.clone())))
    }

    /// Like [`Topic::append`], but the events are queued before this returns whenever the
    /// writer has room, so a caller can start many appends in order and await them later
    /// without a task each. When the writer is behind, the returned future waits for room.
    pub fn append_soon(self: &Arc<Self>, events: Vec<NewEvent>) -> Appending {
        let bytes = match self.checked_bytes(&events) {
            Ok(bytes) => bytes,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        if !events.is_empty()
            && let Ok(permit) = self
                .pending_bytes
                .try_acquire_many(u32::try_from(bytes).expect("bounded by checked_bytes"))
        {
            permit.forget();
            let (job, answer) = Append::job(events, bytes);
            match self.queue.try_send(job) {
                Ok(()) => {
                    let topic = self.clone();
                    return Box::pin(async move {
                        answer
                            .await
                            .unwrap_or_else(|_| Err(AppendError::Closed(topic.name.clone())))
                    });
                }
                Err(error) => {
                    // The queue is full (or closed): give the room back and wait in line.
                    self.pending_bytes.add_permits(bytes);
                    let Job::Append(append) = error.into_inner() else {
                        return Box::pin(std::future::ready(Err(AppendError::Closed(
                            self.name.clone(),
                        ))));
                    };
                    let topic = self.clone();
                    return Box::pin(async move { topic.append(append.events).await });
                }
            }
        }
        let topic = self.clone();
        Box::pin(async move { topic.append(events).await })
    }

    /// The bytes `events` take in the log, or why they cannot be appended.
    fn checked_bytes(&self, events: &[NewEvent]) -> Result<usize, AppendError> {
        let mut bytes = 0;
        for event in events {
            event.check().map_err(AppendError::TooLarge)?;
            let size = event.encoded_len() - record::HEADER_BYTES;
            if size > self.event_bytes_max {
                return Err(AppendError::TooLarge(format!(
                    "an event of {size} bytes exceeds topic {}'s limit of {} bytes",
                    self.name, self.event_bytes_max
                )));
            }
            bytes += event.encoded_len();
        }
        if bytes > PENDING_BYTES_MAX / 2 {
            return Err(AppendError::TooLarge(format!(
                "a batch of {bytes} bytes is too large; send at most {} bytes at once",
                PENDING_BYTES_MAX / 2
            )));
        }
        Ok(bytes)
    }

    /// The offset after the last durable event.
    pub fn next_offset(&self) -> u64 {
        *self.committed.borrow()
    }

    /// The oldest offset still stored.
    pub fn first_offset(&self) -> u64 {
        let log = self.log.lock().expect("log lock is never poisoned");
        log.segments.first().map(|s| s.base).unwrap_or(0)
    }

    /// Watch the next offset grow.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Read durable events from `from`: at most `max_events`, and stop after the event that
    /// crosses `max_bytes` of payload.
    pub async fn read(
        self: &Arc<Self>,
        from: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Event>, ReadError> {
        let topic = self.clone();
        tokio::task::spawn_blocking(move || topic.read_blocking(from, max_events, max_bytes))
            .await
            .unwrap_or_else(|e| {
                Err(ReadError::Io {
                    topic: self.name.clone(),
                    message: format!("reader failed: {e}"),
                })
            })
    }

    fn read_blocking(
        &self,
        mut from: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Event>, ReadError> {
        let mut out = Vec::new();
        let mut payload_bytes = 0;
        let committed = self.next_offset();
        while out.len() < max_events && payload_bytes < max_bytes && from < committed {
            // Find where to start, under the lock; read outside it.
            let (file, path, mut position, end_bytes, segment_end) = {
                let log = self.log.lock().expect("log lock is never poisoned");
                let first = log.segments.first().map(|s| s.base).unwrap_or(0);
                if from < first {
                    if out.is_empty() {
                        return Err(ReadError::Expired { from, first });
                    }
                    break;
                }
                let at = log.segments.partition_point(|s| s.base <= from) - 1;
                let segment = &log.segments[at];
                if from >= segment.end {
                    // A gap left by a damaged sealed segment: skip to the next one.
                    match log.segments.get(at + 1) {
                        Some(next) => {
                            from = next.base;
                            continue;
                        }
                        None => break,
                    }
                }
                let index_at = segment.index.partition_point(|(o, _)| *o <= from);
                let position = if index_at == 0 {
                    0
                } else {
                    segment.index[index_at - 1].1
                };
                (
                    segment.file.clone(),
                    segment.path.clone(),
                    position,
                    segment.durable_bytes,
                    segment.end,
                )
            };
            let mut chunk = 256 * 1024;
            'segment: while position < end_bytes {
                let len = chunk.min((end_bytes - position) as usize);
                let mut buffer = vec![0; len];
                file.read_exact_at(&mut buffer, position)
                    .map_err(|e| ReadError::Io {
                        topic: self.name.clone(),
                        message: io_message("read", &path, e),
                    })?;
                let mut bytes = Bytes::from(buffer);
                let mut progressed = false;
                loop {
                    match record::decode(&bytes) {
                        Decoded::Record { event, len } => {
                            progressed = true;
                            position += len as u64;
                            bytes = bytes.slice(len..);
                            if event.offset < from {
                                continue;
                            }
                            if event.offset != from {
                                return Err(ReadError::Corrupt {
                                    topic: self.name.clone(),
                                    offset: from,
                                    why: "offsets out of sequence",
                                });
                            }
                            from += 1;
                            payload_bytes += event.payload.len();
                            out.push(event);
                            if out.len() >= max_events
                                || payload_bytes >= max_bytes
                                || from >= segment_end
                            {
                                break 'segment;
                            }
                        }
                        Decoded::Incomplete => break,
                        Decoded::Corrupt(why) => {
                            return Err(ReadError::Corrupt {
                                topic: self.name.clone(),
                                offset: from,
                                why,
                            });
                        }
                    }
                }
                if !progressed {
                    // One record larger than the chunk: read more at once.
                    chunk = (chunk * 2).min(record::BODY_BYTES_MAX + record::HEADER_BYTES);
                }
            }
            if from < segment_end && position >= end_bytes {
                return Err(ReadError::Corrupt {
                    topic: self.name.clone(),
                    offset: from,
                    why: "segment ends before its last durable record",
                });
            }
        }
        Ok(out)
    }

    /// The committed offset of a consumer group: the first event it has not finished.
    /// A new group starts at the oldest stored event.
    pub fn group_offset(&self, group: &str) -> u64 {
        let groups = self.groups.lock().expect("groups lock is never poisoned");
        groups
            .get(group)
            .copied()
            .unwrap_or_else(|| self.first_offset())
    }

    /// Record durably that `group` has finished every event before `offset`.
    pub async fn commit(&self, group: &str, offset: u64) -> Result<(), String> {
        check_group_name(group)?;
        let path = self.dir.join("groups").join(group);
        let text = format!(
            "{offset}\n{}\n",
            blake3::hash(offset.to_string().as_bytes())
        );
        tokio::task::spawn_blocking(move || write_atomically(&path, text.as_bytes()))
            .await
            .map_err(|e| format!("commit task failed: {e}"))??;
        self.groups
            .lock()
            .expect("groups lock is never poisoned")
            .insert(group.to_string(), offset);
        Ok(())
    }

    pub fn stats(&self) -> TopicStats {
        let groups = self
            .groups
            .lock()
            .expect("groups lock is never poisoned")
            .iter()
            .map(|(g, o)| (g.clone(), *o))
            .collect();
        let log = self.log.lock().expect("log lock is never poisoned");
        let second = now_ms() / 1000;
        let last_10s: u64 = log
            .recent
            .iter()
            .filter(|(s, _)| *s + 10 >= second && *s < second)
            .map(|(_, n)| n)
            .sum();
        TopicStats {
            first: log.segments.first().map(|s| s.base).unwrap_or(0),
            next: *self.committed.borrow(),
            bytes: log.segments.iter().map(|s| s.durable_bytes).sum(),
            segments: log.segments.len(),
            appended_total: log.appended_total,
            commits_total: log.commits_total,
            syncs_total: log.syncs_total,
            per_second_last_10s: last_10s as f64 / 10.0,
            groups,
        }
    }

    /// Why appends fail, if the topic has stopped accepting them after an I/O error.
    pub fn broken(&self) -> Option<String> {
        self.log
            .lock()
            .expect("log lock is never poisoned")
            .broken
            .clone()
    }

    /// Stop the writer after it has answered every append queued before this call.
    pub async fn close(&self) {
        let handle = self
            .writer
            .lock()
            .expect("writer lock is never poisoned")
            .take();
        self.pending_bytes.close();
        if let Some(handle) = handle {
            _ = self.queue.send(Job::Stop).await;
            _ = handle.await;
        }
    }
}

pub(crate) fn check_group_name(group: &str) -> Result<(), String> {
    if group.is_empty()
        || group.len() > GROUP_NAME_BYTES_MAX
        || !group
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        || group.starts_with('.')
    {
        return Err(format!(
            "consumer group {group:?} is not a valid name: use 1 to {GROUP_NAME_BYTES_MAX} of a-z, 0-9, '.', '_' and '-', not starting with '.'"
        ));
    }
    Ok(())
}

fn read_groups(dir: &Path) -> Result<BTreeMap<String, u64>, String> {
    fs::create_dir_all(dir).map_err(|e| io_message("create", dir, e))?;
    let mut groups = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(|e| io_message("list", dir, e))? {
        let entry = entry.map_err(|e| io_message("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if check_group_name(&name).is_err() {
            continue; // temporary files of an interrupted commit
        }
        let path = entry.path();
        let text = fs::read_to_string(&path).map_err(|e| io_message("read", &path, e))?;
        let mut lines = text.lines();
        let (Some(offset), Some(sum)) = (lines.next(), lines.next()) else {
            return Err(format!(
                "{} is not a committed offset; delete it to restart the group from the oldest event",
                path.display()
            ));
        };
        match offset.parse::<u64>() {
            Ok(offset) if blake3::hash(offset.to_string().as_bytes()).to_string() == sum => {
                groups.insert(name, offset);
            }
            _ => {
                return Err(format!(
                    "{} fails its checksum; delete it to restart the group from the oldest event",
                    path.display()
                ));
            }
        }
    }
    Ok(groups)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".commit-{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    result.map_err(|e| io_message("write", path, e))
}

/// The single writer of a topic's log.
struct Writer {
    name: String,
    dir: PathBuf,
    config: TopicConfig,
    log: Arc<Mutex<Log>>,
    committed: watch::Sender<u64>,
    next: u64,
    last_retention_ms: u64,
}

/// Appends taken from the queue and encoded, waiting for their turn to be written.
#[derive(Default)]
struct Prepared {
    buffer: Vec<u8>,
    /// Each append's reply and the offsets it got.
    replies: Vec<(Reply, Range<u64>)>,
    /// (offset, position within `buffer`) of every record.
    positions: Vec<(u64, u64)>,
    /// The appends' share of the pending-bytes budget, given back once they are answered.
    permits: usize,
    /// When the newest record was stamped.
    time_ms: u64,
}

type Reply = oneshot::Sender<Result<Range<u64>, AppendError>>;

impl Prepared {
    fn is_empty(&self) -> bool {
        self.replies.is_empty()
    }

    fn fail(self, topic: &str, message: &str, pending: &Semaphore) {
        pending.add_permits(self.permits);
        for (reply, _) in self.replies {
            _ = reply.send(Err(AppendError::Io {
                topic: topic.to_string(),
                message: message.to_string(),
            }));
        }
    }
}

/// A group's write (and sync) running on a blocking thread.
struct InFlight {
    task: tokio::task::JoinHandle<(File, std::io::Result<()>)>,
    /// The group, its buffer handed to the task.
    group: Prepared,
    written: u64,
    /// Where in the newest segment the group starts.
    start_position: u64,
    synced: bool,
}

impl Writer {
    /// Group commit, pipelined: while one group is written and synced on a blocking
    /// thread, the appends arriving meanwhile are encoded into the next group, which starts
    /// the moment the previous one is done. Nobody waits for a group to fill: a sync is
    /// always running while there is something to sync, and each one carries everything
    /// that arrived during the one before.
    async fn run(mut self, mut queue: mpsc::Receiver<Job>, pending: Arc<Semaphore>) {
        let mut file = match self.open_newest() {
            Ok(file) => Some(file),
            Err(message) => {
                self.log.lock().expect("log lock is never poisoned").broken = Some(message);
                None
            }
        };
        let mut unsynced_since: Option<tokio::time::Instant> = None;
        let mut next_group = Prepared::default();
        let mut in_flight: Option<InFlight> = None;
        let mut stopping = false;
        loop {
            if in_flight.is_none() && !next_group.is_empty() {
                let group = std::mem::take(&mut next_group);
                match file.take() {
                    Some(f) => {
                        let sync = match self.config.durability {
                            Durability::Fsync => true,
                            Durability::Batch { window } => {
                                unsynced_since.is_some_and(|since| since.elapsed() >= window)
                            }
                        };
                        in_flight = Some(self.launch(f, group, sync));
                    }
                    None => {
                        let message = self.broken_message();
                        group.fail(&self.name, &message, &pending);
                    }
                }
            }
            let idle = in_flight.is_none() && next_group.is_empty();
            if stopping && idle {
                break;
            }
            let room = !stopping && next_group.buffer.len() < GROUP_BYTES_MAX;
            let batch_deadline = match (self.config.durability, unsynced_since) {
                (Durability::Batch { window }, Some(since)) => Some(since + window),
                _ => None,
            };
            tokio::select! {
                biased;
                outcome = async { (&mut in_flight.as_mut().expect("checked").task).await }, if in_flight.is_some() => {
                    let done = in_flight.take().expect("checked");
                    let synced = done.synced;
                    file = self.finish(done, outcome, &pending).await;
                    if synced {
                        unsynced_since = None;
                    } else if unsynced_since.is_none() {
                        unsynced_since = Some(tokio::time::Instant::now());
                    }
                }
                job = queue.recv(), if room => {
                    match job {
                        Some(Job::Append(append)) => {
                            self.prepare(&mut next_group, append);
                            while next_group.buffer.len() < GROUP_BYTES_MAX {
                                match queue.try_recv() {
                                    Ok(Job::Append(append)) => self.prepare(&mut next_group, append),
                                    Ok(Job::Stop) => {
                                        stopping = true;
                                        break;
                                    }
                                    Err(_) => break,
                                }
                            }
                        }
                        Some(Job::Stop) | None => stopping = true,
                    }
                }
                _ = tokio::time::sleep_until(batch_deadline.unwrap_or_else(tokio::time::Instant::now)), if idle && batch_deadline.is_some() => {
                    if let Some(f) = file.take() {
                        file = self.sync(f).await;
                    }
                    unsynced_since = None;
                }
                // An idle topic still ages: look at retention once a minute.
                _ = tokio::time::sleep(RETENTION_IDLE_CHECK), if idle && batch_deadline.is_none() => {
                    let now = now_ms();
                    self.last_retention_ms = now;
                    self.apply_retention(now);
                }
            }
        }
        if let Some(f) = file {
            _ = self.sync(f).await;
        }
    }

    fn broken_message(&self) -> String {
        self.log
            .lock()
            .expect("log lock is never poisoned")
            .broken
            .clone()
            .unwrap_or_else(|| "the log is not open".into())
    }

    fn open_newest(&self) -> Result<File, String> {
        let log = self.log.lock().expect("log lock is never poisoned");
        let newest = log.segments.last().expect("recovery leaves a segment");
        OpenOptions::new()
            .append(true)
            .open(&newest.path)
            .map_err(|e| io_message("open for append", &newest.path, e))
    }

    async fn sync(&self, file: File) -> Option<File> {
        match tokio::task::spawn_blocking(move || file.sync_data().map(|()| file)).await {
            Ok(Ok(file)) => {
                self.log
                    .lock()
                    .expect("log lock is never poisoned")
                    .syncs_total += 1;
                Some(file)
            }
            Ok(Err(error)) => {
                self.break_log(format!("fsync failed: {error}"));
                None
            }
            Err(error) => {
                self.break_log(format!("sync task failed: {error}"));
                None
            }
        }
    }

    /// After a failed write or sync the page cache cannot be trusted (a later sync may
    /// report success for lost data), so the topic refuses appends until a restart
    /// recovers it from what is on disk.
    fn break_log(&self, message: String) {
        tracing::error!(topic = self.name, %message, "topic stops accepting events until maru restarts");
        self.log.lock().expect("log lock is never poisoned").broken = Some(message);
    }

    /// Encode an append's events into the next group, giving them their offsets.
    fn prepare(&mut self, group: &mut Prepared, append: Append) {
        let time_ms = now_ms();
        let first = self.next;
        for event in &append.events {
            group.positions.push((self.next, group.buffer.len() as u64));
            record::encode(event, self.next, time_ms, &mut group.buffer);
            self.next += 1;
        }
        group.replies.push((append.reply, first..self.next));
        group.permits += append.bytes;
        group.time_ms = time_ms;
    }

    /// Start writing (and, if `sync`, syncing) a group on a blocking thread.
    fn launch(&self, file: File, mut group: Prepared, sync: bool) -> InFlight {
        let buffer = std::mem::take(&mut group.buffer);
        let written = buffer.len() as u64;
        let start_position = {
            let log = self.log.lock().expect("log lock is never poisoned");
            log.segments.last().expect("a segment").durable_bytes
        };
        let task = tokio::task::spawn_blocking(move || {
            let mut file = file;
            let result = file
                .write_all(&buffer)
                .and_then(|()| if sync { file.sync_data() } else { Ok(()) });
            (file, result)
        });
        InFlight {
            task,
            group,
            written,
            start_position,
            synced: sync,
        }
    }

    /// A group's write is done: make it visible and answer its appends, or break the log.
    async fn finish(
        &mut self,
        done: InFlight,
        outcome: Result<(File, std::io::Result<()>), tokio::task::JoinError>,
        pending: &Semaphore,
    ) -> Option<File> {
        let InFlight {
            group,
            written,
            start_position,
            synced,
            ..
        } = done;
        let message = match outcome {
            Ok((file, Ok(()))) => {
                return self
                    .finish_written(file, group, written, start_position, synced, pending)
                    .await;
            }
            Ok((_, Err(error))) => format!("write failed: {error}"),
            Err(error) => format!("write task failed: {error}"),
        };
        self.break_log(message.clone());
        group.fail(&self.name, &message, pending);
        None
    }

    async fn finish_written(
        &mut self,
        file: File,
        group: Prepared,
        written: u64,
        start_position: u64,
        synced: bool,
        pending: &Semaphore,
    ) -> Option<File> {
        let end = group.replies.last().expect("a group is never empty").1.end;
        let first = group.replies[0].1.start;
        let count = end - first;
        let roll = {
            let mut log = self.log.lock().expect("log lock is never poisoned");
            let segment = log.segments.last_mut().expect("a segment");
            let mut last_indexed = segment.index.last().map(|(_, p)| *p);
            for (offset, relative) in group.positions {
                let position = start_position + relative;
                if last_indexed.is_none_or(|at| position - at >= INDEX_EVERY_BYTES) {
                    segment.index.push((offset, position));
                    last_indexed = Some(position);
                }
            }
            segment.durable_bytes += written;
            segment.end = end;
            segment.newest_time_ms = group.time_ms;
            let roll = segment.durable_bytes >= self.config.segment_bytes;
            log.appended_total += count;
            log.commits_total += 1;
            log.syncs_total += u64::from(synced);
            let second = group.time_ms / 1000;
            match log.recent.back_mut() {
                Some((s, n)) if *s == second => *n += count,
                _ => log.recent.push_back((second, count)),
            }
            while log.recent.len() > 60 {
                log.recent.pop_front();
            }
            roll
        };
        self.committed.send_replace(end);
        // A full segment is sealed before the answers go out (the group is durable either
        // way), so whoever is answered sees the new segment.
        let file = if roll {
            match self.roll(file, end).await {
                Ok(file) => Some(file),
                Err(message) => {
                    self.break_log(message);
                    None
                }
            }
        } else {
            Some(file)
        };
        pending.add_permits(group.permits);
        for (reply, range) in group.replies {
            _ = reply.send(Ok(range));
        }
        let now = now_ms();
        if now.saturating_sub(self.last_retention_ms) > 10_000 {
            self.last_retention_ms = now;
            self.apply_retention(now);
        }
        file
    }

    /// Seal the newest segment and start the next.
    /// `base` is the offset of the new segment's first record.
    async fn roll(&mut self, file: File, base: u64) -> Result<File, String> {
        let path = segment_path(&self.dir, base);
        let dir = self.dir.clone();
        let new_path = path.clone();
        let new_file = tokio::task::spawn_blocking(move || {
            file.sync_data()?;
            let new_file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&new_path)?;
            sync_dir(&dir)?;
            Ok::<_, std::io::Error>(new_file)
        })
        .await
        .map_err(|e| format!("roll task failed: {e}"))?
        .map_err(|e| io_message("start segment", &path, e))?;
        let read = File::open(&path).map_err(|e| io_message("open", &path, e))?;
        let mut log = self.log.lock().expect("log lock is never poisoned");
        log.segments.push(Segment {
            base,
            path,
            file: Arc::new(read),
            end: base,
            durable_bytes: 0,
            newest_time_ms: 0,
            index: Vec::new(),
        });
        Ok(new_file)
    }

    /// Delete whole sealed segments past the topic's age or size limit.
    fn apply_retention(&self, now_ms: u64) {
        let mut doomed = Vec::new();
        {
            let mut log = self.log.lock().expect("log lock is never poisoned");
            let mut total: u64 = log.segments.iter().map(|s| s.durable_bytes).sum();
            while log.segments.len() > 1 {
                let oldest = &log.segments[0];
                let too_old = self
                    .config
                    .retention_age
                    .is_some_and(|age| oldest.newest_time_ms + (age.as_millis() as u64) < now_ms);
                let too_big = self.config.retention_bytes.is_some_and(|max| total > max);
                if !(too_old || too_big) {
                    break;
                }
                total -= oldest.durable_bytes;
                doomed.push(log.segments.remove(0));
            }
        }
        for segment in doomed {
            tracing::info!(topic = self.name, segment = %segment.path.display(), events = ?(segment.base..segment.end), "retention deletes a segment");
            if let Err(error) = fs::remove_file(&segment.path) {
                tracing::warn!(topic = self.name, %error, "could not delete a segment");
            }
        }
    }
}

#[cfg(test)]
mod tests;
