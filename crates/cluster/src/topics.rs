//! The cluster's topics: each a JetStream stream, replicated on up to three servers, behind
//! the events crate's [`SharedLog`] seam, so ingest (HTTP, MQTT) on any node appends to the
//! same topic and one node's trigger delivers it.
//!
//! - **Messages carry many events.** JetStream syncs every message on every replica (with
//!   `sync_interval: always`, which [`crate::check_sync`] requires), so one event per message
//!   costs a replicated sync per event. Each node's writer for a topic instead takes every
//!   append waiting and publishes their events as one message (up to
//!   [`MESSAGE_BYTES_MAX`] and [`MESSAGE_EVENTS_MAX`]): one sync carries them all. An
//!   append resolves only once JetStream acknowledged the message(s) holding its events.
//! - **Offsets are dense**, as on a node alone: a message's events are the event records of
//!   a node's own log (checksummed) with consecutive offsets, the first following the last
//!   event of the message before it. Two nodes must not both write "the next" message, so
//!   each publish is conditional on the stream's last sequence being the one the writer
//!   knows (`Nats-Expected-Last-Sequence`); a writer that lost the race reads the new last
//!   message, numbers its events after it and publishes again. One message is in flight per
//!   node and topic; appends arriving meanwhile wait for the next.
//! - **Invariant**: the message with sequence `s` ends at or before offset
//!   `s × MESSAGE_EVENTS_MAX`. When retention has removed every message, the next offset is
//!   that bound for the stream's last sequence, so no offset is ever handed out twice (the
//!   gap reads as expired).
//! - **Order.** Appends made on one node are published in the order they were made; so the
//!   events acknowledged on one node, and so each key's, keep their order.
//! - **Reading** finds the message holding an offset (a cache of recent messages, else a
//!   binary search over the stream's sequences) and reads on from there, asking the stream's
//!   leader (a replica may not have caught up: seen with the node records after a
//!   partition). Reading from before the oldest stored event is [`ReadError::Expired`].
//! - **The next offset** each node knows grows with its own acknowledgements and with the
//!   stream's last message, asked when a message for the topic passes on the node's
//!   connection (a plain subscription to its subject), at least every [`LOOK_EVERY`], and
//!   before a read that may go past what the node knows.
//! - **Consumer groups' offsets** are keys `TOPIC/GROUP` of the bucket [`GROUPS_BUCKET`],
//!   read from its leader; a trigger that moves to another node continues from there.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use bytes::Bytes;
use events::record::{self, Decoded, Event, NewEvent};
use events::shared::{Pending, SharedLog, SharedLogs};
use events::{AppendError, ReadError, TopicConfig, TopicStats};
use futures_util::StreamExt as _;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::{CALL_TIMEOUT, ClusterError, leader_get, open_bucket, patiently};

/// The key-value bucket of consumer groups' committed offsets.
pub const GROUPS_BUCKET: &str = "maru-groups";
/// How often a node asks a topic's stream how far it goes when nothing passed.
pub const LOOK_EVERY: Duration = Duration::from_millis(500);
/// The largest message a writer publishes: under NATS's default `max_payload` (1 MB) with
/// room for the headers. An event larger than this is refused in a cluster.
pub const MESSAGE_BYTES_MAX: usize = 960 << 10;
/// The most events in one message (the invariant above depends on it).
pub const MESSAGE_EVENTS_MAX: u64 = 4096;
/// Appends waiting for a topic's writer, in bytes, before producers wait.
const PENDING_BYTES_MAX: usize = 64 << 20;
/// Appends a writer takes at once.
const APPENDS_AT_ONCE: usize = 1024;
/// How many times a writer publishes a message again after losing the race to another node.
const RACES_MAX: u32 = 64;
/// Recent messages remembered for finding offsets (first offset → sequence, end).
const INDEX_MAX: usize = 16_384;
/// Opens the cluster's topics in JetStream.
pub struct JetStreamTopics {
    jetstream: async_nats::jetstream::Context,
    replicas: usize,
    groups: async_nats::jetstream::kv::Store,
}

impl JetStreamTopics {
    /// Ready to open topics, with streams of `replicas` replicas (at most three).
    pub async fn open(
        jetstream: &async_nats::jetstream::Context,
        replicas: usize,
    ) -> Result<Arc<JetStreamTopics>, ClusterError> {
        let groups = open_bucket(
            jetstream,
            tokio::time::Instant::now(),
            GROUPS_BUCKET,
            "Maru: the committed offset of each consumer group of each topic",
            Duration::ZERO,
            replicas,
        )
        .await?;
        Ok(Arc::new(JetStreamTopics {
            jetstream: jetstream.clone(),
            replicas: replicas.clamp(1, 3),
            groups,
        }))
    }
}

/// The stream that keeps topic `name`: JetStream's stream names allow no `.`, so the
/// dots become `_` and a hash of the name keeps `a.b` and `a_b` apart.
pub fn stream_name(name: &str) -> String {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("maru-topic-{}-{hash:016x}", name.replace('.', "_"))
}

fn stream_config(name: &str, config: &TopicConfig, replicas: usize) -> stream::Config {
    let stream = stream_name(name);
    stream::Config {
        subjects: vec![format!("maru.topic.{stream}")],
        name: stream,
        description: Some(format!("Maru topic {name}")),
        num_replicas: replicas,
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_age: config.retention_age.unwrap_or(Duration::ZERO),
        max_bytes: config
            .retention_bytes
            .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
        max_message_size: i32::try_from(MESSAGE_BYTES_MAX + (64 << 10)).unwrap_or(i32::MAX),
        ..Default::default()
    }
}

impl SharedLogs for JetStreamTopics {
    fn open(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> Pending<'_, Result<Arc<dyn SharedLog>, String>> {
        let name = name.to_string();
        Box::pin(async move {
            let wanted = stream_config(&name, &config, self.replicas);
            let subject = wanted.subjects[0].clone();
            let jetstream = self.jetstream.clone();
            patiently(
                &format!("keep topic {name} in stream {}", wanted.name),
                tokio::time::Instant::now(),
                || {
                    let (jetstream, wanted) = (jetstream.clone(), wanted.clone());
                    async move {
                        tokio::time::timeout(CALL_TIMEOUT, jetstream.create_or_update_stream(wanted))
                            .await
                            .map_err(|_| "timed out".to_string())?
                            .map_err(|e| e.to_string())
                    }
                },
            )
            .await
            .map_err(|e| e.to_string())?;
            let stream = jetstream
                .get_stream(&wanted.name)
                .await
                .map_err(|e| format!("stream {}: {e}", wanted.name))?;
            let log = StreamLog::start(
                name,
                subject,
                self.jetstream.clone(),
                stream,
                self.groups.clone(),
            )
            .await;
            Ok(log as Arc<dyn SharedLog>)
        })
    }

    fn kind(&self) -> &'static str {
        "NATS JetStream"
    }
}

struct Append {
    events: Vec<NewEvent>,
    bytes: usize,
    reply: oneshot::Sender<Result<Range<u64>, AppendError>>,
}

/// The stream's last message as a writer knows it: its sequence and the offset after its
/// last event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tail {
    seq: u64,
    end: u64,
}

/// What the stream looked like when last asked, and what this node did.
#[derive(Default)]
struct Known {
    /// The oldest offset stored, and the sequences of the oldest and newest messages.
    first: u64,
    first_seq: u64,
    last_seq: u64,
    bytes: u64,
    appended_total: u64,
    messages_total: u64,
    groups: BTreeMap<String, u64>,
    /// Events appended here per second (unix second, count), the last few seconds.
    recent: VecDeque<(u64, u64)>,
    /// Why the last append or look failed, until one succeeds.
    broken: Option<String>,
    /// Recent messages: first offset → (sequence, end offset).
    index: BTreeMap<u64, (u64, u64)>,
}

impl Known {
    fn remember(&mut self, seq: u64, first: u64, end: u64) {
        assert!(first < end, "a message holds at least one event");
        assert!(
            end <= seq.saturating_mul(MESSAGE_EVENTS_MAX),
            "message {seq} ends at {end}, past its bound"
        );
        self.index.insert(first, (seq, end));
        while self.index.len() > INDEX_MAX {
            self.index.pop_first();
        }
    }
}

/// A message's events, verified: whole records, consecutive offsets, at least one.
fn decode_message(payload: &Bytes) -> Result<Vec<Event>, &'static str> {
    let mut events: Vec<Event> = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        match record::decode(&payload.slice(at..)) {
            Decoded::Record { event, len } => {
                if let Some(previous) = events.last()
                    && event.offset != previous.offset + 1
                {
                    return Err("the offsets of a message's events are not consecutive");
                }
                events.push(event);
                at += len;
            }
            Decoded::Incomplete => return Err("the message ends inside an event record"),
            Decoded::Corrupt(why) => return Err(why),
        }
    }
    if events.is_empty() {
        return Err("the message holds no event");
    }
    Ok(events)
}

/// One topic kept in a JetStream stream.
struct StreamLog {
    name: String,
    subject: String,
    stream: stream::Stream,
    groups_bucket: async_nats::jetstream::kv::Store,
    next: Arc<watch::Sender<u64>>,
    known: Arc<Mutex<Known>>,
    queue: Mutex<Option<mpsc::Sender<Append>>>,
    pending_bytes: Arc<Semaphore>,
    stop: CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// The parts of a [`StreamLog`] a read needs, without the log.
#[derive(Clone)]
struct Reader {
    name: String,
    subject: String,
    stream: stream::Stream,
    known: Arc<Mutex<Known>>,
    next: Arc<watch::Sender<u64>>,
}

impl Reader {
    /// The message with sequence `seq`, from the stream's leader (none: removed).
    async fn message(&self, seq: u64) -> Result<Option<(u64, Vec<Event>)>, ReadError> {
        let got = tokio::time::timeout(CALL_TIMEOUT, self.stream.get_raw_message(seq))
            .await
            .map_err(|_| self.io(format!("reading message {seq}: no answer within 5 s")))?;
        let message = match got {
            Ok(message) => message,
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None);
            }
            Err(error) => return Err(self.io(format!("reading message {seq}: {error}"))),
        };
        assert_eq!(message.sequence, seq, "the stream answers what was asked");
        let events = decode_message(&message.payload).map_err(|why| ReadError::Corrupt {
            topic: self.name.clone(),
            offset: seq,
            why,
        })?;
        let (first, end) = (events[0].offset, events[events.len() - 1].offset + 1);
        self.known
            .lock()
            .expect("never poisoned")
            .remember(seq, first, end);
        Ok(Some((seq, events)))
    }

    fn io(&self, message: String) -> ReadError {
        ReadError::Io {
            topic: self.name.clone(),
            message,
        }
    }

    /// The stream's newest message as its leader has it, or where the next one starts when
    /// retention removed them all.
    async fn tail(&self) -> Result<Tail, String> {
        let last = tokio::time::timeout(
            CALL_TIMEOUT,
            self.stream.get_last_raw_message_by_subject(&self.subject),
        )
        .await
        .map_err(|_| "the stream did not answer within 5 s".to_string())?;
        match last {
            Ok(message) => {
                let events = decode_message(&message.payload)
                    .map_err(|why| format!("message {}: {why}", message.sequence))?;
                let (first, end) = (events[0].offset, events[events.len() - 1].offset + 1);
                self.known
                    .lock()
                    .expect("never poisoned")
                    .remember(message.sequence, first, end);
                Ok(Tail {
                    seq: message.sequence,
                    end,
                })
            }
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
                let mut stream = self.stream.clone();
                let info = tokio::time::timeout(CALL_TIMEOUT, stream.info())
                    .await
                    .map_err(|_| "the stream did not answer within 5 s".to_string())?
                    .map_err(|e| e.to_string())?;
                let seq = info.state.last_sequence;
                Ok(Tail {
                    seq,
                    end: seq.saturating_mul(MESSAGE_EVENTS_MAX),
                })
            }
            Err(error) => Err(error.to_string()),
        }
    }

    /// Ask the stream how far it goes, and note it.
    async fn look(&self) {
        let mut stream = self.stream.clone();
        let info = match tokio::time::timeout(CALL_TIMEOUT, stream.info()).await {
            Ok(Ok(info)) => info.state.clone(),
            Ok(Err(error)) => {
                self.known.lock().expect("never poisoned").broken =
                    Some(format!("cannot read the stream: {error}"));
                return;
            }
            Err(_) => {
                self.known.lock().expect("never poisoned").broken =
                    Some("the stream did not answer within 5 s".into());
                return;
            }
        };
        let tail = match self.tail().await {
            Ok(tail) => tail,
            Err(error) => {
                self.known.lock().expect("never poisoned").broken = Some(error);
                return;
            }
        };
        // The oldest stored offset: the first event of the oldest message (read again only
        // when retention moved it).
        let first = if info.messages == 0 {
            Some(tail.end)
        } else if self.known.lock().expect("never poisoned").first_seq == info.first_sequence {
            None
        } else {
            match self.message(info.first_sequence).await {
                Ok(Some((_, events))) => Some(events[0].offset),
                _ => None,
            }
        };
        {
            let mut known = self.known.lock().expect("never poisoned");
            if let Some(first) = first {
                known.first = first;
                known.first_seq = info.first_sequence;
            }
            known.last_seq = known.last_seq.max(tail.seq);
            known.bytes = info.bytes;
        }
        advance(&self.next, tail.end);
    }

    /// The sequence of the message holding `from`, or of the first message after it.
    async fn locate(&self, from: u64) -> Result<u64, ReadError> {
        let (lo, hi) = {
            let known = self.known.lock().expect("never poisoned");
            if let Some((_, (seq, end))) = known.index.range(..=from).next_back()
                && from < *end
            {
                return Ok(*seq);
            }
            (known.first_seq.max(1), known.last_seq)
        };
        let (mut lo, mut hi) = (lo, hi.max(lo));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.message(mid).await? {
                // Retention removes the oldest messages: what is missing lies before.
                None => lo = mid + 1,
                Some((_, events)) => {
                    if events[events.len() - 1].offset < from {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
            }
        }
        Ok(lo)
    }

    async fn read(
        self,
        from: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Event>, ReadError> {
        if from.saturating_add(max_events as u64) > *self.next.borrow() {
            // Other nodes may have appended since this one last looked: a reader sees every
            // event acknowledged before it asked.
            self.look().await;
        }
        let (first, last_seq) = {
            let known = self.known.lock().expect("never poisoned");
            (known.first, known.last_seq)
        };
        if from >= *self.next.borrow() {
            return Ok(Vec::new());
        }
        if from < first {
            return Err(ReadError::Expired { from, first });
        }
        let mut seq = self.locate(from).await?;
        let (mut out, mut payload_bytes) = (Vec::new(), 0);
        while seq <= last_seq && out.len() < max_events && payload_bytes < max_bytes {
            if let Some((_, events)) = self.message(seq).await? {
                for event in events.into_iter().filter(|e| e.offset >= from) {
                    if out.len() >= max_events || payload_bytes >= max_bytes {
                        break;
                    }
                    payload_bytes += event.payload.len();
                    out.push(event);
                }
            }
            seq += 1;
        }
        Ok(out)
    }
}

impl StreamLog {
    async fn start(
        name: String,
        subject: String,
        jetstream: async_nats::jetstream::Context,
        stream: stream::Stream,
        groups_bucket: async_nats::jetstream::kv::Store,
    ) -> Arc<StreamLog> {
        let (queue, jobs) = mpsc::channel(APPENDS_AT_ONCE);
        let log = Arc::new(StreamLog {
            name,
            subject: subject.clone(),
            stream,
            groups_bucket,
            next: Arc::new(watch::Sender::new(0)),
            known: Arc::new(Mutex::new(Known::default())),
            queue: Mutex::new(Some(queue)),
            pending_bytes: Arc::new(Semaphore::new(PENDING_BYTES_MAX)),
            stop: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
        });
        log.reader().look().await;
        let writer = tokio::spawn(log.clone().write(jetstream.clone(), jobs));
        let watcher = tokio::spawn(log.clone().watch_stream(jetstream.client(), subject));
        log.tasks
            .lock()
            .expect("never poisoned")
            .extend([writer, watcher]);
        log
    }

    fn reader(&self) -> Reader {
        Reader {
            name: self.name.clone(),
            subject: self.subject.clone(),
            stream: self.stream.clone(),
            known: self.known.clone(),
            next: self.next.clone(),
        }
    }

    /// Look again whenever a message for the topic passes, and every [`LOOK_EVERY`].
    async fn watch_stream(self: Arc<Self>, client: async_nats::Client, subject: String) {
        let mut passing = match client.subscribe(subject).await {
            Ok(subscription) => Some(subscription),
            Err(error) => {
                tracing::warn!(topic = %self.name, %error, "cluster: cannot follow the topic's messages; looking every 500 ms");
                None
            }
        };
        let reader = self.reader();
        let mut every = tokio::time::interval(LOOK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = every.tick() => {}
                Some(_) = async {
                    match passing.as_mut() {
                        Some(subscription) => subscription.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    // The message reaches subscribers as the stream stores it: give the
                    // stream a moment, and take every message that passed meanwhile.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if let Some(subscription) = passing.as_mut() {
                        while let Some(Some(_)) = futures_util::FutureExt::now_or_never(subscription.next()) {}
                    }
                }
            }
            reader.look().await;
        }
    }

    /// The topic's one writer on this node: every append waiting goes into the next
    /// message (or messages, beyond [`MESSAGE_BYTES_MAX`]), published after the stream's
    /// last message as this writer knows it.
    async fn write(
        self: Arc<Self>,
        jetstream: async_nats::jetstream::Context,
        mut jobs: mpsc::Receiver<Append>,
    ) {
        let reader = self.reader();
        let mut tail: Option<Tail> = None;
        while let Some(first) = jobs.recv().await {
            let mut batch = vec![first];
            while batch.len() < APPENDS_AT_ONCE {
                match jobs.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            // Messages of whole events: (append, event) pairs, cut by size and count.
            let mut messages: Vec<Vec<(usize, &NewEvent)>> = vec![Vec::new()];
            let mut bytes = 0;
            for (i, append) in batch.iter().enumerate() {
                for event in &append.events {
                    let current = messages.last_mut().expect("one at least");
                    if !current.is_empty()
                        && (bytes + event.encoded_len() > MESSAGE_BYTES_MAX
                            || current.len() as u64 >= MESSAGE_EVENTS_MAX)
                    {
                        messages.push(Vec::new());
                        bytes = 0;
                    }
                    messages.last_mut().expect("one at least").push((i, event));
                    bytes += event.encoded_len();
                }
            }
            let mut offsets: Vec<Option<Range<u64>>> = vec![None; batch.len()];
            let mut failure: Option<String> = None;
            let mut published = 0;
            for message in &messages {
                match self
                    .publish(&jetstream, &reader, &mut tail, message)
                    .await
                {
                    Ok(first) => {
                        published = first + message.len() as u64;
                        for (k, (i, _)) in message.iter().enumerate() {
                            let offset = first + k as u64;
                            offsets[*i] = Some(match offsets[*i].take() {
                                None => offset..offset + 1,
                                Some(r) => r.start..offset + 1,
                            });
                        }
                    }
                    Err(error) => {
                        // What follows is not published: the appends fail, in order.
                        failure = Some(error);
                        break;
                    }
                }
            }
            for (append, offsets) in batch.into_iter().zip(offsets) {
                self.pending_bytes.add_permits(append.bytes);
                let count = append.events.len() as u64;
                let answer = match (offsets, &failure) {
                    (Some(offsets), _) if offsets.end - offsets.start >= count => {
                        assert!(offsets.end <= published, "acknowledged within the stream");
                        let mut known = self.known.lock().expect("never poisoned");
                        known.broken = None;
                        known.appended_total += count;
                        count_recent(&mut known.recent, count);
                        Ok(offsets)
                    }
                    (_, failure) => {
                        let message = failure.clone().unwrap_or_else(|| "not published".into());
                        self.known.lock().expect("never poisoned").broken =
                            Some(message.clone());
                        Err(AppendError::Io {
                            topic: self.name.clone(),
                            message: format!("JetStream did not acknowledge the events: {message}"),
                        })
                    }
                };
                _ = append.reply.send(answer);
            }
            advance(&self.next, published);
        }
    }

    /// Publish one message of `events` after the stream's last message: the offset of its
    /// first event once JetStream acknowledged it.
    async fn publish(
        &self,
        jetstream: &async_nats::jetstream::Context,
        reader: &Reader,
        tail: &mut Option<Tail>,
        events: &[(usize, &NewEvent)],
    ) -> Result<u64, String> {
        assert!(!events.is_empty() && events.len() as u64 <= MESSAGE_EVENTS_MAX);
        let time_ms = unix_ms();
        let mut payload = Vec::new();
        for race in 0.. {
            let known = match *tail {
                Some(known) => known,
                None => {
                    let known = reader.tail().await?;
                    *tail = Some(known);
                    known
                }
            };
            // Numbered after the last message; within the bound for the next sequence.
            let first = known.end;
            let end = first + events.len() as u64;
            assert!(
                end <= (known.seq + 1).saturating_mul(MESSAGE_EVENTS_MAX),
                "message {} would end at {end}, past its bound",
                known.seq + 1
            );
            payload.clear();
            for (k, (_, event)) in events.iter().enumerate() {
                record::encode(event, first + k as u64, time_ms, &mut payload);
            }
            let message = PublishMessage::build()
                .payload(Bytes::copy_from_slice(&payload))
                .expected_last_sequence(known.seq);
            let acked = match jetstream.send_publish(self.subject.clone(), message).await {
                Ok(ack) => ack.await,
                Err(error) => {
                    *tail = None;
                    return Err(error.to_string());
                }
            };
            match acked {
                Ok(ack) => {
                    assert_eq!(
                        ack.sequence,
                        known.seq + 1,
                        "published conditionally on the last sequence"
                    );
                    *tail = Some(Tail {
                        seq: ack.sequence,
                        end,
                    });
                    let mut state = self.known.lock().expect("never poisoned");
                    state.remember(ack.sequence, first, end);
                    state.last_seq = state.last_seq.max(ack.sequence);
                    state.messages_total += 1;
                    return Ok(first);
                }
                Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                    // Another node published first: number after its message and try again.
                    *tail = None;
                    if race >= RACES_MAX {
                        return Err(format!(
                            "lost the race for the stream's next message {RACES_MAX} times"
                        ));
                    }
                }
                Err(error) => {
                    // It may have been stored all the same: the next message starts after
                    // whatever the stream holds.
                    *tail = None;
                    return Err(error.to_string());
                }
            }
        }
        unreachable!("the loop returns")
    }

    fn group_key(&self, group: &str) -> String {
        format!("{}/{group}", self.name)
    }
}

/// The next offset is at least `at`; offsets only grow.
fn advance(next: &watch::Sender<u64>, at: u64) {
    next.send_if_modified(|current| {
        let grew = at > *current;
        *current = (*current).max(at);
        grew
    });
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn count_recent(recent: &mut VecDeque<(u64, u64)>, events: u64) {
    let second = unix_ms() / 1000;
    match recent.back_mut() {
        Some((at, n)) if *at == second => *n += events,
        _ => recent.push_back((second, events)),
    }
    while recent.front().is_some_and(|(at, _)| *at + 11 < second) {
        recent.pop_front();
    }
}

impl SharedLog for StreamLog {
    fn append(&self, events: Vec<NewEvent>) -> Pending<'static, Result<Range<u64>, AppendError>> {
        if let Some(event) = events.iter().find(|e| e.encoded_len() > MESSAGE_BYTES_MAX) {
            return Box::pin(std::future::ready(Err(AppendError::TooLarge(format!(
                "an event of {} bytes is larger than a cluster's topics take ({MESSAGE_BYTES_MAX} bytes, under NATS's max_payload)",
                event.encoded_len()
            )))));
        }
        let bytes: usize = events.iter().map(NewEvent::encoded_len).sum();
        let closed = || AppendError::Closed(self.name.clone());
        let Some(queue) = self.queue.lock().expect("never poisoned").clone() else {
            return Box::pin(std::future::ready(Err(closed())));
        };
        let (reply, answer) = oneshot::channel();
        let permits = u32::try_from(bytes.min(PENDING_BYTES_MAX)).expect("bounded");
        let append = Append {
            events,
            bytes: permits as usize,
            reply,
        };
        let name = self.name.clone();
        // Queued now when there is room, so appends made one after another keep their
        // order; else wait in line for room.
        let queued = match self.pending_bytes.try_acquire_many(permits) {
            Ok(permit) => {
                permit.forget();
                match queue.try_send(append) {
                    Ok(()) => None,
                    Err(mpsc::error::TrySendError::Full(append)) => {
                        self.pending_bytes.add_permits(permits as usize);
                        Some(append)
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        return Box::pin(std::future::ready(Err(closed())));
                    }
                }
            }
            Err(_) => Some(append),
        };
        let pending = self.pending_bytes.clone();
        Box::pin(async move {
            let closed = || AppendError::Closed(name.clone());
            if let Some(append) = queued {
                let permit = pending.acquire_many(permits).await.map_err(|_| closed())?;
                permit.forget();
                queue.send(append).await.map_err(|_| closed())?;
            }
            answer.await.unwrap_or_else(|_| Err(closed()))
        })
    }

    fn read(
        &self,
        from: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Pending<'static, Result<Vec<Event>, ReadError>> {
        Box::pin(self.reader().read(from, max_events, max_bytes))
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.next.subscribe()
    }

    fn first_offset(&self) -> u64 {
        self.known.lock().expect("never poisoned").first
    }

    fn group_offset(&self, group: &str) -> u64 {
        let known = self.known.lock().expect("never poisoned");
        known.groups.get(group).copied().unwrap_or(known.first)
    }

    fn group_offset_now(&self, group: &str) -> Pending<'_, Result<u64, String>> {
        let key = self.group_key(group);
        let group = group.to_string();
        Box::pin(async move {
            let value = tokio::time::timeout(CALL_TIMEOUT, leader_get(&self.groups_bucket, &key))
                .await
                .map_err(|_| "the groups bucket did not answer within 5 s".to_string())??;
            let offset = match value {
                Some(value) => std::str::from_utf8(&value)
                    .ok()
                    .and_then(|text| text.parse::<u64>().ok())
                    .ok_or_else(|| format!("the committed offset under {key} is not a number"))?,
                None => {
                    self.reader().look().await;
                    self.known.lock().expect("never poisoned").first
                }
            };
            self.known
                .lock()
                .expect("never poisoned")
                .groups
                .insert(group, offset);
            Ok(offset)
        })
    }

    fn commit(&self, group: &str, offset: u64) -> Pending<'_, Result<(), String>> {
        let key = self.group_key(group);
        let group = group.to_string();
        Box::pin(async move {
            tokio::time::timeout(
                CALL_TIMEOUT,
                self.groups_bucket.put(&key, offset.to_string().into()),
            )
            .await
            .map_err(|_| format!("committing {key}: no answer within 5 s"))?
            .map_err(|e| format!("committing {key}: {e}"))?;
            let mut known = self.known.lock().expect("never poisoned");
            known.groups.insert(group, offset);
            Ok(())
        })
    }

    fn stats(&self) -> TopicStats {
        let known = self.known.lock().expect("never poisoned");
        let second = unix_ms() / 1000;
        let last_10s: u64 = known
            .recent
            .iter()
            .filter(|(s, _)| *s + 10 >= second && *s < second)
            .map(|(_, n)| n)
            .sum();
        TopicStats {
            first: known.first,
            next: *self.next.borrow(),
            bytes: known.bytes,
            segments: 0,
            appended_total: known.appended_total,
            // Each message this node published was one replicated, synced write.
            commits_total: known.messages_total,
            syncs_total: known.messages_total,
            per_second_last_10s: last_10s as f64 / 10.0,
            groups: known.groups.iter().map(|(g, o)| (g.clone(), *o)).collect(),
            lost: Vec::new(),
        }
    }

    fn broken(&self) -> Option<String> {
        self.known.lock().expect("never poisoned").broken.clone()
    }

    fn close(&self) -> Pending<'_, ()> {
        Box::pin(async move {
            // The writer ends once the queued appends are answered and the queue is gone.
            self.queue.lock().expect("never poisoned").take();
            self.pending_bytes.close();
            let tasks = std::mem::take(&mut *self.tasks.lock().expect("never poisoned"));
            let mut tasks = tasks.into_iter();
            if let Some(writer) = tasks.next() {
                _ = writer.await;
            }
            self.stop.cancel();
            for task in tasks {
                _ = task.await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_topic_name_has_its_own_valid_stream_name() {
        let names = ["city.air", "city_air", "city.air.replies", "a", "a.", "a..b", "a_.b"];
        let streams: std::collections::BTreeSet<String> =
            names.iter().map(|n| stream_name(n)).collect();
        assert_eq!(streams.len(), names.len(), "{streams:?}");
        for stream in &streams {
            assert!(
                !stream.contains(['.', '*', '>', ' ', '/', '\\']),
                "{stream} is not a valid stream name"
            );
        }
        let longest = stream_name(&"a".repeat(events::TOPIC_NAME_BYTES_MAX));
        assert!(longest.len() <= 255, "JetStream names are at most 255 bytes");
    }

    fn event(i: u64) -> NewEvent {
        NewEvent {
            key: format!("k{i}"),
            payload: Bytes::from(format!("payload {i}")),
            ..NewEvent::default()
        }
    }

    #[test]
    fn a_message_is_whole_records_with_consecutive_offsets() {
        let mut payload = Vec::new();
        for i in 0..5 {
            record::encode(&event(i), 40 + i, 1, &mut payload);
        }
        let whole = Bytes::from(payload.clone());
        let events = decode_message(&whole).expect("decodes");
        assert_eq!(
            events.iter().map(|e| e.offset).collect::<Vec<_>>(),
            vec![40, 41, 42, 43, 44]
        );
        assert_eq!(events[3].key, "k3");
        // Cut short, a flipped bit, a gap in the offsets, nothing: refused.
        assert!(decode_message(&whole.slice(..whole.len() - 3)).is_err());
        let mut flipped = payload.clone();
        flipped[20] ^= 1;
        assert!(decode_message(&Bytes::from(flipped)).is_err());
        let mut gap = Vec::new();
        record::encode(&event(0), 7, 1, &mut gap);
        record::encode(&event(1), 9, 1, &mut gap);
        assert!(decode_message(&Bytes::from(gap)).is_err());
        assert!(decode_message(&Bytes::new()).is_err());
    }

    #[test]
    #[should_panic(expected = "past its bound")]
    fn a_message_past_its_bound_is_refused() {
        // Message 2 may end at 2 × MESSAGE_EVENTS_MAX at most.
        let mut known = Known::default();
        known.remember(2, 2 * MESSAGE_EVENTS_MAX - 1, 2 * MESSAGE_EVENTS_MAX + 1);
    }
}
