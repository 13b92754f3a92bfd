//! One topic: an append-only log of segment files with group commit, recovery, retention
//! and the committed offsets of its consumer groups.
//!
//! Appends go through one writer task per topic. It takes every append waiting in its
//! queue, writes them with one `write`, syncs once (`fdatasync`) and only then answers
//! them all, so an acknowledged event is on disk and fsync costs are shared by everyone
//! who arrived while the previous sync ran. The next group is gathered and encoded while
//! a sync runs, and starts as soon as it returns. Readers see only what is durable.
//!
//! Every file goes through [`disk::Disk`], so the same code runs under the simulated disk
//! in the power-cut simulation (`tests/it/powercut.rs`). How a topic is recovered is in
//! `recovery`. When a write or a sync fails (a full disk, an I/O error), the group's appends
//! are answered with an error and the topic repairs itself before the next append, so it
//! works again once space returns:
//! - after a failed **write**, the newest segment is cut back to its last synced record and
//!   synced (those bytes were never acknowledged);
//! - after a failed **sync**, the page cache cannot be trusted (Linux marks the pages it
//!   failed to write as clean, so a later sync may report success for lost data), so the
//!   segment is sealed as it stands and appends continue in a new segment at the next
//!   offset; the failed group's offsets are never handed out again.
//!
//! A repair that fails (the disk is still full) fails that append and is tried again with
//! the next one.

mod groups;
mod recovery;

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use disk::{DiskFile, Env, OpenMode};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

pub(crate) use groups::check_group_name;

use crate::record::{self, Decoded, Event, NewEvent};

/// A sparse index entry every this many bytes of a segment.
const INDEX_EVERY_BYTES: u64 = 4096;
/// One group commit writes at most this much.
const GROUP_BYTES_MAX: usize = 8 << 20;
/// Appends waiting for the writer, in bytes, before producers wait (backpressure).
const PENDING_BYTES_MAX: usize = 64 << 20;
/// How often an idle topic's writer applies retention (a busy one does every 10 s).
const RETENTION_IDLE_CHECK: Duration = Duration::from_secs(60);
/// Lost ranges a topic remembers for reporting (merged; the oldest beyond are dropped).
const LOST_RANGES_MAX: usize = 1024;

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
    /// The store cannot answer for now (in a cluster: JetStream electing a leader, a
    /// server out of reach); the same read may succeed in a few seconds.
    #[error("topic {topic} cannot be read now: {message}; try again in a few seconds")]
    Unavailable { topic: String, message: String },
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
    file: Arc<dyn DiskFile>,
    /// Offset after the last durable record.
    end: u64,
    /// Position after the last durable record.
    durable_bytes: u64,
    newest_time_ms: u64,
    /// (offset, position) of a record every `INDEX_EVERY_BYTES` or so, ascending, and of
    /// the first record after each gap.
    index: Vec<(u64, u64)>,
    /// Damaged stretches recovery found inside the segment, ascending.
    gaps: Vec<Gap>,
}

/// Damaged bytes inside a segment: readers jump from `at` to `resume`, and the offsets
/// `lost` cannot be read.
#[derive(Debug, Clone, PartialEq)]
struct Gap {
    at: u64,
    resume: u64,
    lost: Range<u64>,
    why: &'static str,
}

struct Log {
    segments: Vec<Segment>,
    /// Every offset range that cannot be read (merged, ascending), for reporting.
    lost: Vec<Range<u64>>,
    /// Events appended per second over the last minute.
    recent: crate::rate::Recent,
    appended_total: u64,
    /// Group commits (one write, and one fdatasync under `fsync` durability).
    commits_total: u64,
    /// fdatasyncs of the newest segment (group commits under `fsync`, window syncs under
    /// `batch`).
    syncs_total: u64,
    /// Why the last write failed, while the topic has not repaired itself yet.
    broken: Option<String>,
}

impl Log {
    fn add_lost(&mut self, range: Range<u64>) {
        let mut all = std::mem::take(&mut self.lost);
        all.push(range);
        self.lost = newest_lost(recovery::merge(all));
    }
}

/// At most [`LOST_RANGES_MAX`] of merged lost ranges, the newest.
fn newest_lost(mut merged: Vec<Range<u64>>) -> Vec<Range<u64>> {
    if merged.len() > LOST_RANGES_MAX {
        merged.drain(..merged.len() - LOST_RANGES_MAX);
    }
    merged
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
    /// Offsets that cannot be read (damage found by recovery, or skipped so that no offset
    /// is handed out twice), merged and ascending.
    pub lost: Vec<Range<u64>>,
}

pub(crate) struct Local {
    name: String,
    dir: PathBuf,
    env: Env,
    log: Arc<Mutex<Log>>,
    committed: watch::Receiver<u64>,
    queue: mpsc::Sender<Job>,
    pending_bytes: Arc<Semaphore>,
    groups: Mutex<BTreeMap<String, u64>>,
    event_bytes_max: usize,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn io_message(action: &str, path: &Path, error: std::io::Error) -> String {
    format!("{action} {}: {error}", path.display())
}

/// Run `work` on a blocking thread when the disk can block, inline when it cannot (the
/// simulated disk), so a simulation stays on one thread.
fn off_thread<T: Send + 'static>(
    env: &Env,
    work: impl FnOnce() -> T + Send + 'static,
) -> Pin<Box<dyn Future<Output = Result<T, tokio::task::JoinError>> + Send>> {
    if env.disk.blocks() {
        Box::pin(tokio::task::spawn_blocking(work))
    } else {
        Box::pin(std::future::ready(Ok(work())))
    }
}

impl Local {
    /// Open (recovering) or create the topic stored in `dir` on `env`'s disk and clock.
    /// Must be called within a tokio runtime (the writer is a task).
    pub fn open_in(
        env: Env,
        name: &str,
        dir: &Path,
        config: TopicConfig,
    ) -> Result<Arc<Local>, String> {
        // Creates `dir` too, with every directory above it made durable.
        let groups = groups::read_groups(&env, &dir.join("groups"))?;
        let recovered = recovery::recover(&env, name, dir, &groups)?;
        let next = recovered.segments.last().map(|s| s.end).unwrap_or(0);
        assert!(
            groups.values().all(|offset| *offset <= next),
            "recovery continues past every committed offset"
        );
        let log = Log {
            segments: recovered.segments,
            lost: newest_lost(recovered.lost),
            recent: crate::rate::Recent::default(),
            appended_total: 0,
            commits_total: 0,
            syncs_total: 0,
            broken: None,
        };
        let (committed_tx, committed) = watch::channel(next);
        let log = Arc::new(Mutex::new(log));
        let (queue, rx) = mpsc::channel(1024);
        let writer = Writer {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            env: env.clone(),
            config,
            log: log.clone(),
            committed: committed_tx,
            next,
            last_retention_ms: 0,
            repair: None,
        };
        let pending_bytes = Arc::new(Semaphore::new(PENDING_BYTES_MAX));
        let handle = tokio::spawn(writer.run(rx, pending_bytes.clone()));
        Ok(Arc::new(Local {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            env,
            log,
            committed,
            queue,
            pending_bytes,
            groups: Mutex::new(groups),
            event_bytes_max: config.event_bytes_max,
            writer: Mutex::new(Some(handle)),
        }))
    }

    /// Append events; resolves once they are durable, with their offsets.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Range<u64>, AppendError> {
        let bytes = checked_bytes(&self.name, self.event_bytes_max, &events)?;
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
        let bytes = match checked_bytes(&self.name, self.event_bytes_max, &events) {
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
        off_thread(&self.env, move || {
            topic.read_blocking(from, max_events, max_bytes)
        })
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
            let (file, path, mut position, end_bytes, segment_end, gaps) = {
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
                    // Past a segment's last record (a damaged or cut-short tail, or offsets
                    // skipped after one): go on in the next segment.
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
                let gaps: Vec<Gap> = segment
                    .gaps
                    .iter()
                    .filter(|g| g.at >= position)
                    .cloned()
                    .collect();
                (
                    segment.file.clone(),
                    segment.path.clone(),
                    position,
                    segment.durable_bytes,
                    segment.end,
                    gaps,
                )
            };
            let mut gaps = gaps.into_iter().peekable();
            let mut chunk = 256 * 1024;
            'segment: while position < end_bytes {
                // Read up to the next damaged stretch, then jump over it.
                if let Some(gap) = gaps.next_if(|g| g.at == position) {
                    position = gap.resume;
                    from = from.max(gap.lost.end);
                    if from >= segment_end {
                        break;
                    }
                    continue;
                }
                let limit = gaps.peek().map_or(end_bytes, |g| g.at.min(end_bytes));
                let len = chunk.min((limit - position) as usize);
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
                            // Recovery verified these bytes; they changed since.
                            return Err(ReadError::Corrupt {
                                topic: self.name.clone(),
                                offset: from,
                                why,
                            });
                        }
                    }
                }
                if !progressed {
                    if len as u64 == limit - position {
                        // Recovery verified these bytes; they changed since.
                        return Err(ReadError::Corrupt {
                            topic: self.name.clone(),
                            offset: from,
                            why: "a record runs past the bytes recovery verified",
                        });
                    }
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

    /// The first offset at or after `from` that is not in a stretch known to be lost, so a
    /// consumer that read nothing from `from` can move past the loss. Never past
    /// [`Topic::next_offset`].
    pub fn skip_lost(&self, mut from: u64) -> u64 {
        let log = self.log.lock().expect("log lock is never poisoned");
        let next = self.next_offset();
        loop {
            let Some(at) = log
                .segments
                .partition_point(|s| s.base <= from)
                .checked_sub(1)
            else {
                return from.min(next);
            };
            let segment = &log.segments[at];
            if let Some(gap) = segment.gaps.iter().find(|g| g.lost.contains(&from)) {
                from = gap.lost.end;
            } else if from >= segment.end
                && let Some(following) = log.segments.get(at + 1)
            {
                from = following.base;
            } else {
                return from.min(next);
            }
        }
    }

    /// Offsets that cannot be read, merged and ascending: damage recovery found, and offsets
    /// skipped so that none is handed out twice.
    pub fn lost(&self) -> Vec<Range<u64>> {
        self.log
            .lock()
            .expect("log lock is never poisoned")
            .lost
            .clone()
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

    /// Record durably that `group` has finished every event before `offset`, which must
    /// not lie past [`Topic::next_offset`].
    pub async fn commit(&self, group: &str, offset: u64) -> Result<(), String> {
        check_group_name(group)?;
        let next = self.next_offset();
        if offset > next {
            return Err(format!(
                "consumer group {group} cannot commit offset {offset} of topic {}: the log ends at {next}",
                self.name
            ));
        }
        let path = self.dir.join("groups").join(group);
        let text = groups::encode(group, offset);
        let disk = self.env.disk.clone();
        off_thread(&self.env, move || {
            disk::write_atomically(disk.as_ref(), &path, text.as_bytes()).map_err(|e| e.to_string())
        })
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
        let second = self.env.clock.now_ms() / 1000;
        TopicStats {
            first: log.segments.first().map(|s| s.base).unwrap_or(0),
            next: *self.committed.borrow(),
            bytes: log.segments.iter().map(|s| s.durable_bytes).sum(),
            segments: log.segments.len(),
            appended_total: log.appended_total,
            commits_total: log.commits_total,
            syncs_total: log.syncs_total,
            per_second_last_10s: log.recent.per_second_last_10s(second),
            groups,
            lost: log.lost.clone(),
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

/// The bytes `events` take in a log, or why they cannot be appended to topic `name`, whose
/// events may be at most `event_bytes_max` bytes each.
pub(crate) fn checked_bytes(
    name: &str,
    event_bytes_max: usize,
    events: &[NewEvent],
) -> Result<usize, AppendError> {
    let mut bytes = 0;
    for event in events {
        event.check().map_err(AppendError::TooLarge)?;
        let size = event.encoded_len() - record::HEADER_BYTES;
        if size > event_bytes_max {
            return Err(AppendError::TooLarge(format!(
                "an event of {size} bytes exceeds topic {name}'s limit of {event_bytes_max} bytes"
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

/// The single writer of a topic's log.
struct Writer {
    name: String,
    dir: PathBuf,
    env: Env,
    config: TopicConfig,
    log: Arc<Mutex<Log>>,
    committed: watch::Sender<u64>,
    next: u64,
    last_retention_ms: u64,
    /// What must be done before the next write, after a failed one.
    repair: Option<Repair>,
}

/// How the writer recovers from a failed write or sync; see the module's docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repair {
    /// Cut the newest segment back to its last durable record.
    Truncate,
    /// Seal the newest segment and continue in a new one at the next offset.
    NewSegment,
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

/// Why a group's write failed.
enum Failure {
    Write(std::io::Error),
    Sync(std::io::Error),
}

type Outcome = Result<Result<(), Failure>, tokio::task::JoinError>;

/// A group's write (and sync) under way, on a blocking thread for a real disk.
struct InFlight {
    task: Pin<Box<dyn Future<Output = Outcome> + Send>>,
    file: Arc<dyn DiskFile>,
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
                self.break_log(message, Repair::Truncate);
                None
            }
        };
        let mut unsynced_since: Option<tokio::time::Instant> = None;
        let mut next_group = Prepared::default();
        let mut in_flight: Option<InFlight> = None;
        let mut stopping = false;
        loop {
            if in_flight.is_none() && !next_group.is_empty() {
                let mut group = std::mem::take(&mut next_group);
                if file.is_none() {
                    file = self.repair(&mut group).await;
                }
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
                    let now = self.env.clock.now_ms();
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

    fn open_newest(&self) -> Result<Arc<dyn DiskFile>, String> {
        let log = self.log.lock().expect("log lock is never poisoned");
        let newest = log.segments.last().expect("recovery leaves a segment");
        let file = self
            .env
            .disk
            .open(&newest.path, OpenMode::Append)
            .map_err(|e| io_message("open for append", &newest.path, e))?;
        let len = file
            .size()
            .map_err(|e| io_message("stat", &newest.path, e))?;
        if len != newest.durable_bytes {
            return Err(format!(
                "{} holds {len} bytes where {} were recovered",
                newest.path.display(),
                newest.durable_bytes
            ));
        }
        Ok(file)
    }

    /// Make the log writable again after a failed write or sync, before `group` is
    /// written: see the module's docs. `group` was encoded before the failure was known;
    /// it is renumbered to start where the repaired log continues.
    async fn repair(&mut self, group: &mut Prepared) -> Option<Arc<dyn DiskFile>> {
        let repair = self.repair?;
        let (newest_path, durable_bytes, newest_end) = {
            let log = self.log.lock().expect("log lock is never poisoned");
            let newest = log.segments.last().expect("a segment");
            (newest.path.clone(), newest.durable_bytes, newest.end)
        };
        let result: Result<(Arc<dyn DiskFile>, u64), String> = match repair {
            Repair::Truncate => {
                let disk = self.env.disk.clone();
                off_thread(&self.env, move || {
                    let path = newest_path;
                    let file = disk
                        .open(&path, OpenMode::Append)
                        .map_err(|e| io_message("open for append", &path, e))?;
                    file.set_len(durable_bytes)
                        .and_then(|()| file.sync())
                        .map_err(|e| io_message("cut back the failed write in", &path, e))?;
                    Ok(file)
                })
                .await
                .unwrap_or_else(|e| Err(format!("repair task failed: {e}")))
                .map(|file| (file, newest_end))
            }
            Repair::NewSegment => {
                // Past every offset handed out, the failed group's included.
                let base = group.replies.first().map_or(self.next, |(_, r)| r.start);
                let (env, dir) = (self.env.clone(), self.dir.clone());
                off_thread(&self.env, move || {
                    recovery::create_segment(&env, &dir, base)
                })
                .await
                .unwrap_or_else(|e| Err(format!("repair task failed: {e}")))
                .map(|segment| {
                    let file = segment.file.clone();
                    let mut log = self.log.lock().expect("log lock is never poisoned");
                    if newest_end < base {
                        log.add_lost(newest_end..base);
                    }
                    log.segments.push(segment);
                    (file, base)
                })
            }
        };
        match result {
            Ok((file, base)) => {
                tracing::info!(
                    topic = self.name,
                    ?repair,
                    next = base,
                    "topic repaired after a failed write; accepting events again"
                );
                self.repair = None;
                self.log.lock().expect("log lock is never poisoned").broken = None;
                group.renumber(base);
                self.next = group.replies.last().map_or(base, |(_, r)| r.end);
                Some(file)
            }
            Err(message) => {
                tracing::warn!(topic = self.name, %message, "topic repair failed; trying again with the next append");
                self.log.lock().expect("log lock is never poisoned").broken =
                    Some(format!("{message} (maru tries again with the next append)"));
                None
            }
        }
    }

    /// Sync the newest segment (a `batch` window's sync).
    async fn sync(&mut self, file: Arc<dyn DiskFile>) -> Option<Arc<dyn DiskFile>> {
        let task_file = file.clone();
        match off_thread(&self.env, move || task_file.sync()).await {
            Ok(Ok(())) => {
                self.log
                    .lock()
                    .expect("log lock is never poisoned")
                    .syncs_total += 1;
                Some(file)
            }
            Ok(Err(error)) => {
                self.break_log(format!("fsync failed: {error}"), Repair::NewSegment);
                None
            }
            Err(error) => {
                self.break_log(format!("sync task failed: {error}"), Repair::NewSegment);
                None
            }
        }
    }

    /// Refuse appends until `repair` has run (before the next group).
    fn break_log(&mut self, message: String, repair: Repair) {
        tracing::error!(topic = self.name, %message, ?repair, "a write to the topic failed; its appends are refused and the topic repairs itself before the next one");
        self.log.lock().expect("log lock is never poisoned").broken = Some(message);
        // A sync failure outranks a write failure: the page cache is not to be trusted.
        if self.repair != Some(Repair::NewSegment) {
            self.repair = Some(repair);
        }
    }

    /// Encode an append's events into the next group, giving them their offsets.
    fn prepare(&mut self, group: &mut Prepared, append: Append) {
        let time_ms = self.env.clock.now_ms();
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

    /// Start writing (and, if `sync`, syncing) a group, on a blocking thread for a real
    /// disk.
    fn launch(&self, file: Arc<dyn DiskFile>, mut group: Prepared, sync: bool) -> InFlight {
        let buffer = std::mem::take(&mut group.buffer);
        let written = buffer.len() as u64;
        let start_position = {
            let log = self.log.lock().expect("log lock is never poisoned");
            let newest = log.segments.last().expect("a segment");
            assert_eq!(
                group.replies.first().map(|(_, r)| r.start),
                Some(newest.end),
                "a group continues the log"
            );
            newest.durable_bytes
        };
        let task_file = file.clone();
        let task = off_thread(&self.env, move || {
            task_file.append(&buffer).map_err(Failure::Write)?;
            if sync {
                task_file.sync().map_err(Failure::Sync)?;
            }
            Ok(())
        });
        InFlight {
            task,
            file,
            group,
            written,
            start_position,
            synced: sync,
        }
    }

    /// A group's write is done: make it visible and answer its appends, or fail them and
    /// arrange the repair.
    async fn finish(
        &mut self,
        done: InFlight,
        outcome: Outcome,
        pending: &Semaphore,
    ) -> Option<Arc<dyn DiskFile>> {
        let InFlight {
            file,
            group,
            written,
            start_position,
            synced,
            ..
        } = done;
        let (message, repair) = match outcome {
            Ok(Ok(())) => {
                return self
                    .finish_written(file, group, written, start_position, synced, pending)
                    .await;
            }
            Ok(Err(Failure::Write(error))) => (format!("write failed: {error}"), Repair::Truncate),
            Ok(Err(Failure::Sync(error))) => (format!("fsync failed: {error}"), Repair::NewSegment),
            Err(error) => (format!("write task failed: {error}"), Repair::NewSegment),
        };
        self.break_log(message.clone(), repair);
        group.fail(&self.name, &message, pending);
        None
    }

    async fn finish_written(
        &mut self,
        file: Arc<dyn DiskFile>,
        group: Prepared,
        written: u64,
        start_position: u64,
        synced: bool,
        pending: &Semaphore,
    ) -> Option<Arc<dyn DiskFile>> {
        let end = group.replies.last().expect("a group is never empty").1.end;
        let first = group.replies[0].1.start;
        let count = end - first;
        let roll = {
            let mut log = self.log.lock().expect("log lock is never poisoned");
            let segment = log.segments.last_mut().expect("a segment");
            assert_eq!(segment.end, first, "groups are written in offset order");
            assert_eq!(
                segment.durable_bytes, start_position,
                "nothing else wrote the segment"
            );
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
            log.recent.count(group.time_ms / 1000, count);
            roll
        };
        self.committed.send_replace(end);
        // A full segment is sealed before the answers go out (the group is durable either
        // way), so whoever is answered sees the new segment. A roll that fails (a full disk)
        // is tried again after the next group.
        let file = if roll {
            match self.roll(&file, end).await {
                Ok(new_file) => Some(new_file),
                Err(RollError::Sync(message)) => {
                    self.break_log(message, Repair::NewSegment);
                    None
                }
                Err(RollError::Create(message)) => {
                    tracing::warn!(topic = self.name, %message, "could not start a new segment; the current one grows until it can");
                    Some(file)
                }
            }
        } else {
            Some(file)
        };
        // Retention runs before the answers too, so whoever is answered sees its effect.
        let now = self.env.clock.now_ms();
        if now.saturating_sub(self.last_retention_ms) > 10_000 {
            self.last_retention_ms = now;
            self.apply_retention(now);
        }
        pending.add_permits(group.permits);
        for (reply, range) in group.replies {
            _ = reply.send(Ok(range));
        }
        file
    }

    /// Seal the newest segment and start the next at `base`, the offset of its first
    /// record.
    async fn roll(
        &mut self,
        file: &Arc<dyn DiskFile>,
        base: u64,
    ) -> Result<Arc<dyn DiskFile>, RollError> {
        let sealed = file.clone();
        let (env, dir) = (self.env.clone(), self.dir.clone());
        let segment = off_thread(&self.env, move || {
            // Under `batch` durability the sealed segment may hold unsynced writes.
            sealed
                .sync()
                .map_err(|e| RollError::Sync(format!("fsync failed: {e}")))?;
            recovery::create_segment(&env, &dir, base).map_err(RollError::Create)
        })
        .await
        .map_err(|e| RollError::Create(format!("roll task failed: {e}")))??;
        let file = self
            .env
            .disk
            .open(&segment.path, OpenMode::Append)
            .map_err(|e| RollError::Create(io_message("open for append", &segment.path, e)))?;
        self.log
            .lock()
            .expect("log lock is never poisoned")
            .segments
            .push(segment);
        Ok(file)
    }

    /// Delete whole sealed segments past the topic's age or size limit, oldest first, the
    /// directory synced after each: a power cut can bring back a deleted segment, but never
    /// one older than a segment it keeps deleted.
    fn apply_retention(&self, now_ms: u64) {
        loop {
            let doomed = {
                let mut log = self.log.lock().expect("log lock is never poisoned");
                let total: u64 = log.segments.iter().map(|s| s.durable_bytes).sum();
                if log.segments.len() <= 1 {
                    return;
                }
                let oldest = &log.segments[0];
                let too_old = self
                    .config
                    .retention_age
                    .is_some_and(|age| oldest.newest_time_ms + (age.as_millis() as u64) < now_ms);
                let too_big = self.config.retention_bytes.is_some_and(|max| total > max);
                if !(too_old || too_big) {
                    return;
                }
                log.segments.remove(0)
            };
            tracing::info!(topic = self.name, segment = %doomed.path.display(), events = ?(doomed.base..doomed.end), "retention deletes a segment");
            let removed = self
                .env
                .disk
                .remove_file(&doomed.path)
                .and_then(|()| self.env.disk.sync_dir(&self.dir));
            if let Err(error) = removed {
                tracing::warn!(topic = self.name, %error, "could not delete a segment");
                return;
            }
        }
    }
}

enum RollError {
    /// The sealed segment could not be synced: its unsynced writes may be lost.
    Sync(String),
    /// The new segment could not be made; nothing was lost.
    Create(String),
}

impl Prepared {
    /// Give the group's records offsets from `first` on (after a repair moved the log's
    /// end), checksums and replies included.
    fn renumber(&mut self, first: u64) {
        let Some(old_first) = self.replies.first().map(|(_, r)| r.start) else {
            return;
        };
        if old_first == first {
            return;
        }
        let shift = |offset: u64| offset - old_first + first;
        let ends: Vec<usize> = self
            .positions
            .iter()
            .skip(1)
            .map(|(_, p)| *p as usize)
            .chain([self.buffer.len()])
            .collect();
        for ((offset, position), end) in self.positions.iter_mut().zip(ends) {
            *offset = shift(*offset);
            record::renumber(&mut self.buffer[*position as usize..end], *offset);
        }
        for (_, range) in &mut self.replies {
            *range = shift(range.start)..shift(range.end);
        }
    }
}

#[cfg(test)]
mod tests;
