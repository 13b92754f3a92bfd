//! The cluster's topics: each a JetStream stream, replicated on up to three servers, behind
//! the events crate's [`SharedLog`] seam, so ingest (HTTP, MQTT) on any node appends to the
//! same topic and one node's trigger delivers it.
//!
//! - **Offsets** are stream sequences less one (JetStream counts from 1, topics from 0).
//! - **Appending**: one writer task per topic and node takes every append waiting, publishes
//!   all their events one after another on the node's connection without waiting, then
//!   awaits the acknowledgements. JetStream acknowledges a message once the stream's
//!   replicas have stored it (and, as [`crate::check_sync`] makes sure, synced it), and an
//!   append resolves only once every one of its events is acknowledged. Messages sent on one
//!   connection reach the stream in the order sent, so events appended on one node keep
//!   their order (and so their order per key); nodes' appends interleave.
//! - **Records**: each message is the event encoded as in a local topic's log (length,
//!   checksum, time, key, attributes, payload), so a read verifies what it got.
//! - **Reading** asks the stream's leader for each sequence (many requests in flight): a
//!   replica may not have caught up (seen with the node records after a partition).
//!   Sequences that hold nothing (removed) are passed over; reading from before the oldest
//!   stored sequence is [`ReadError::Expired`].
//! - **The next offset** each node knows grows with its own acknowledgements and with the
//!   stream's last sequence, asked when a message for the topic passes on the node's
//!   connection (a plain subscription to its subject) and at least every
//!   [`LOOK_EVERY`].
//! - **Consumer groups' offsets** are keys `TOPIC/GROUP` of the bucket [`GROUPS_BUCKET`], read
//!   from its leader; a trigger that moves to another node continues from there.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::kv::Operation;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use bytes::Bytes;
use events::record::{self, Decoded, Event, NewEvent};
use events::shared::{Origin, Pending, SharedLog, SharedLogs};
use events::{AppendError, ReadError, TopicConfig, TopicStats};
use futures_util::StreamExt as _;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::{CALL_TIMEOUT, ClusterError, leader_get, open_bucket, patiently};

/// The key-value bucket of consumer groups' committed offsets.
pub const GROUPS_BUCKET: &str = "maru-groups";
/// How often a node asks a topic's stream how far it goes when nothing passed.
pub const LOOK_EVERY: Duration = Duration::from_millis(500);
/// Appends waiting for a topic's writer, in bytes, before producers wait.
const PENDING_BYTES_MAX: usize = 64 << 20;
/// Sequences asked of the stream at once by a read.
const READS_IN_FLIGHT: usize = 64;
/// Appends a writer takes at once.
const APPENDS_AT_ONCE: usize = 1024;
/// Tries of a commit that finds the offset written by another node meanwhile.
const COMMIT_RACES_MAX: usize = 5;
/// Room for the id header of a forwarded event (`Nats-Msg-Id`): JetStream counts headers
/// against a message's size limits.
const ID_HEADER_BYTES_MAX: usize = 256;
/// How long a stream remembers the id of a forwarded event, so that one sent again is
/// stored once: an edge node whose link broke mid-send sends again when it returns
/// (JetStream's default is two minutes). Only events sent with an id are remembered.
const REPEATS_WINDOW: Duration = Duration::from_secs(3600);
/// Events a writer has published and not yet seen acknowledged, at most.
const ACKS_IN_FLIGHT: usize = 1024;
/// The topics' context's limit on acknowledgements awaited: far above ACKS_IN_FLIGHT times
/// any number of topics, so that it is never what a writer waits for.
const TOPIC_ACKS_MAX: usize = 1 << 24;

/// Opens the cluster's topics in JetStream.
pub struct JetStreamTopics {
    jetstream: async_nats::jetstream::Context,
    replicas: usize,
    groups: async_nats::jetstream::kv::Store,
    /// Whether each topic follows the stream's growth (its messages and a look every
    /// [`LOOK_EVERY`]): not for an edge node, which only forwards to the topics and should
    /// not receive every other node's events over its link.
    follow: bool,
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
        // A context of the topics' own: the client's limit on acknowledgements awaited is
        // per context, and a writer blocked on it while holding unread acknowledgements of
        // its own would wait for ever; each writer bounds itself (ACKS_IN_FLIGHT) instead,
        // and the node's heartbeats and leases never wait behind events.
        let jetstream = async_nats::jetstream::ContextBuilder::new()
            .max_ack_inflight(TOPIC_ACKS_MAX)
            .build(jetstream.client());
        Ok(Arc::new(JetStreamTopics {
            jetstream,
            replicas: replicas.clamp(1, 3),
            groups,
            follow: true,
        }))
    }

    /// The same for an edge node, which appends to the topics (forwarding its own) and does
    /// not follow what the others append: their messages do not cross its link.
    pub async fn open_for_forwarding(
        jetstream: &async_nats::jetstream::Context,
        replicas: usize,
    ) -> Result<Arc<JetStreamTopics>, ClusterError> {
        let topics = JetStreamTopics::open(jetstream, replicas).await?;
        let topics = Arc::into_inner(topics).expect("not shared yet");
        Ok(Arc::new(JetStreamTopics {
            follow: false,
            ..topics
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
        max_message_size: i32::try_from(
            config.event_bytes_max + record::HEADER_BYTES + ID_HEADER_BYTES_MAX,
        )
        .unwrap_or(i32::MAX),
        // No longer than the events are kept (JetStream requires it).
        duplicate_window: match config.retention_age {
            Some(age) if !age.is_zero() => REPEATS_WINDOW.min(age),
            _ => REPEATS_WINDOW,
        },
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
                        tokio::time::timeout(
                            CALL_TIMEOUT,
                            jetstream.create_or_update_stream(wanted),
                        )
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
                self.follow,
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
    /// Empty, or where each event was stored first (forwarded events).
    origins: Vec<Origin>,
    bytes: usize,
    reply: oneshot::Sender<Result<Range<u64>, AppendError>>,
}

/// What the stream looked like when last asked, and what this node did.
#[derive(Default)]
struct Known {
    first: u64,
    bytes: u64,
    appended_total: u64,
    groups: BTreeMap<String, u64>,
    /// Events appended here per second.
    recent: events::rate::Recent,
    /// Why the last append or look failed, until one succeeds.
    broken: Option<String>,
}

/// One topic kept in a JetStream stream.
struct StreamLog {
    name: String,
    /// The largest message the servers take (their `max_payload`, 0 if unknown), read when
    /// the topic opens rather than on every append.
    max_payload: usize,
    stream: stream::Stream,
    groups_bucket: async_nats::jetstream::kv::Store,
    next: Arc<watch::Sender<u64>>,
    known: Arc<Mutex<Known>>,
    queue: Mutex<Option<mpsc::Sender<Append>>>,
    pending_bytes: Arc<Semaphore>,
    stop: CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl StreamLog {
    async fn start(
        name: String,
        subject: String,
        jetstream: async_nats::jetstream::Context,
        stream: stream::Stream,
        groups_bucket: async_nats::jetstream::kv::Store,
        follow: bool,
    ) -> Arc<StreamLog> {
        let (queue, jobs) = mpsc::channel(APPENDS_AT_ONCE);
        let log = Arc::new(StreamLog {
            name,
            max_payload: jetstream.client().server_info().max_payload,
            stream,
            groups_bucket,
            next: Arc::new(watch::Sender::new(0)),
            known: Arc::new(Mutex::new(Known::default())),
            queue: Mutex::new(Some(queue)),
            pending_bytes: Arc::new(Semaphore::new(PENDING_BYTES_MAX)),
            stop: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
        });
        log.look().await;
        let writer = tokio::spawn(log.clone().write(jetstream.clone(), subject.clone(), jobs));
        let mut tasks = log.tasks.lock().expect("never poisoned");
        tasks.push(writer);
        if follow {
            tasks.push(tokio::spawn(
                log.clone().watch_stream(jetstream.client(), subject),
            ));
        }
        drop(tasks);
        log
    }

    /// Ask the stream's leader how far it goes.
    async fn look(&self) {
        look(&self.stream, &self.known, &self.next).await;
    }

    /// The next offset is at least `next`.
    fn advance(&self, next: u64) {
        advance(&self.next, next);
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
            self.look().await;
        }
    }

    /// The topic's one writer on this node. Events are published in the order their
    /// appends were queued, at most [`ACKS_IN_FLIGHT`] awaiting their acknowledgement (the
    /// client's own limit is shared by everything the node sends: waiting on it with our
    /// own acknowledgements unread would never end). Once one event of a batch is not
    /// acknowledged, every later append of the batch fails too, so a producer that sends
    /// again cannot have a later event acknowledged before an earlier one.
    async fn write(
        self: Arc<Self>,
        jetstream: async_nats::jetstream::Context,
        subject: String,
        mut jobs: mpsc::Receiver<Append>,
    ) {
        let mut encoded = Vec::new();
        while let Some(first) = jobs.recv().await {
            let mut batch = vec![first];
            while batch.len() < APPENDS_AT_ONCE {
                match jobs.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            let time_ms = unix_ms();
            let mut offsets: Vec<Option<Range<u64>>> = vec![None; batch.len()];
            // The first append with an event not acknowledged, and why.
            let mut failed: Option<(usize, String)> = None;
            // Each acknowledgement is awaited until CALL_TIMEOUT after its message was sent
            // (the client's own timeout starts only when it is awaited, so lost
            // acknowledgements awaited one after another would cost 5 s each).
            let mut in_flight: VecDeque<(usize, tokio::time::Instant, PublishAckFuture)> =
                VecDeque::new();
            'publishing: for (i, append) in batch.iter().enumerate() {
                for (j, event) in append.events.iter().enumerate() {
                    while in_flight.len() >= ACKS_IN_FLIGHT {
                        let (at, sent, ack) = in_flight.pop_front().expect("not empty");
                        note_ack(&mut offsets, &mut failed, at, await_ack(sent, ack).await);
                    }
                    if failed.is_some() {
                        break 'publishing;
                    }
                    encoded.clear();
                    let origin = append.origins.get(j);
                    record::encode(
                        event,
                        0,
                        origin.map_or(time_ms, |o| o.time_ms),
                        &mut encoded,
                    );
                    let payload = Bytes::copy_from_slice(&encoded);
                    let published = match origin {
                        None => jetstream.publish(subject.clone(), payload).await,
                        Some(origin) => {
                            let mut headers = async_nats::HeaderMap::new();
                            headers.insert(async_nats::header::NATS_MESSAGE_ID, origin.id.as_str());
                            jetstream
                                .publish_with_headers(subject.clone(), headers, payload)
                                .await
                        }
                    };
                    match published {
                        Ok(ack) => in_flight.push_back((i, tokio::time::Instant::now(), ack)),
                        Err(error) => {
                            failed.get_or_insert((i, error.to_string()));
                            break 'publishing;
                        }
                    }
                }
            }
            while let Some((at, sent, ack)) = in_flight.pop_front() {
                note_ack(&mut offsets, &mut failed, at, await_ack(sent, ack).await);
            }
            for (i, (append, offsets)) in batch.into_iter().zip(offsets).enumerate() {
                self.pending_bytes.add_permits(append.bytes);
                let count = append.events.len() as u64;
                let answer = match (&failed, offsets) {
                    (Some((at, message)), _) if i >= *at => {
                        self.known.lock().expect("never poisoned").broken = Some(message.clone());
                        Err(AppendError::Io {
                            topic: self.name.clone(),
                            message: format!(
                                "JetStream did not acknowledge every event: {message}"
                            ),
                        })
                    }
                    (_, Some(offsets)) => {
                        assert!(
                            offsets.end - offsets.start >= count,
                            "every event has its own offset"
                        );
                        self.advance(offsets.end);
                        let mut known = self.known.lock().expect("never poisoned");
                        known.broken = None;
                        known.appended_total += count;
                        known.recent.count(unix_ms() / 1000, count);
                        Ok(offsets)
                    }
                    (_, None) => unreachable!("an append before the first failure has its offsets"),
                };
                _ = append.reply.send(answer);
            }
        }
    }

    fn group_key(&self, group: &str) -> String {
        format!("{}/{group}", self.name)
    }
}

/// Ask the stream's leader how far it goes, and note it.
async fn look(stream: &stream::Stream, known: &Mutex<Known>, next: &watch::Sender<u64>) {
    let mut stream = stream.clone();
    let info = tokio::time::timeout(CALL_TIMEOUT, stream.info()).await;
    let mut known = known.lock().expect("never poisoned");
    match info {
        Ok(Ok(info)) => {
            let state = &info.state;
            known.first = state
                .first_sequence
                .saturating_sub(1)
                .min(state.last_sequence);
            known.bytes = state.bytes;
            // The stream answers again (an append that fails says so anew).
            known.broken = None;
            let last = state.last_sequence;
            drop(known);
            advance(next, last);
        }
        Ok(Err(error)) => known.broken = Some(format!("cannot read the stream: {error}")),
        Err(_) => known.broken = Some("the stream did not answer within 5 s".into()),
    }
}

/// The acknowledgement of a message sent at `sent`, awaited until [`CALL_TIMEOUT`] after.
async fn await_ack(
    sent: tokio::time::Instant,
    ack: PublishAckFuture,
) -> Result<async_nats::jetstream::publish::PublishAck, String> {
    match tokio::time::timeout_at(sent + CALL_TIMEOUT, ack).await {
        Ok(Ok(ack)) => Ok(ack),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no acknowledgement within 5 s".to_string()),
    }
}

/// Note the acknowledgement of an event of append `at`: its offset, or the first failure.
fn note_ack(
    offsets: &mut [Option<Range<u64>>],
    failed: &mut Option<(usize, String)>,
    at: usize,
    ack: Result<async_nats::jetstream::publish::PublishAck, String>,
) {
    let ack = ack.and_then(|ack| {
        // JetStream counts from 1; a server that answers 0 (as older ones did for a
        // repeat still being stored) has not said where the event is.
        if ack.sequence == 0 {
            Err("JetStream acknowledged without a sequence".to_string())
        } else {
            Ok(ack)
        }
    });
    match ack {
        Ok(ack) => {
            let offset = ack.sequence - 1;
            offsets[at] = Some(match offsets[at].take() {
                None => offset..offset + 1,
                Some(r) => r.start.min(offset)..r.end.max(offset + 1),
            });
        }
        Err(error) => {
            // Failures are noted in publishing order: the earliest append is the one kept.
            match failed {
                Some((first, _)) if *first <= at => {}
                _ => *failed = Some((at, error)),
            }
        }
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

impl SharedLog for StreamLog {
    fn append(
        &self,
        events: Vec<NewEvent>,
        origins: Vec<Origin>,
    ) -> Pending<'static, Result<Range<u64>, AppendError>> {
        assert!(
            origins.is_empty() || origins.len() == events.len(),
            "an origin for every forwarded event"
        );
        // Each event is one message: the servers take none larger than their max_payload
        // (1 MB by default), whatever the topic allows.
        let max_payload = self.max_payload;
        let headers = if origins.is_empty() {
            0
        } else {
            ID_HEADER_BYTES_MAX
        };
        if max_payload > 0
            && let Some(event) = events
                .iter()
                .find(|e| e.encoded_len() + headers > max_payload)
        {
            return Box::pin(std::future::ready(Err(AppendError::TooLarge(format!(
                "an event of {} bytes is larger than the cluster's NATS servers take \
                 (max_payload {max_payload} bytes{}): send smaller events, or raise max_payload \
                 in every server's configuration",
                event.encoded_len(),
                if headers > 0 {
                    ", less room for its id"
                } else {
                    ""
                }
            )))));
        }
        assert!(
            origins
                .iter()
                .all(|o| o.id.len() + 16 <= ID_HEADER_BYTES_MAX),
            "a forwarded event's id fits the room kept for it"
        );
        let bytes: usize = events.iter().map(NewEvent::encoded_len).sum();
        let closed = || AppendError::Closed(self.name.clone());
        let Some(queue) = self.queue.lock().expect("never poisoned").clone() else {
            return Box::pin(std::future::ready(Err(closed())));
        };
        let (reply, answer) = oneshot::channel();
        let permits = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .min(PENDING_BYTES_MAX as u32);
        let append = Append {
            events,
            origins,
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
        let stream = self.stream.clone();
        let name = self.name.clone();
        let (known, next) = (self.known.clone(), self.next.clone());
        Box::pin(async move {
            let wanted = from.saturating_add(max_events as u64);
            if wanted > *next.borrow() {
                // Other nodes may have appended since this one last looked: a reader sees
                // every event acknowledged before it asked.
                look(&stream, &known, &next).await;
            }
            let end = wanted.min(*next.borrow());
            let mut reads = futures_util::stream::iter((from..end).map(|offset| {
                let stream = stream.clone();
                async move {
                    let got =
                        tokio::time::timeout(CALL_TIMEOUT, stream.get_raw_message(offset + 1))
                            .await;
                    (offset, got)
                }
            }))
            .buffered(READS_IN_FLIGHT);
            let mut out = Vec::new();
            let mut payload_bytes = 0;
            while let Some((offset, got)) = reads.next().await {
                let message = match got {
                    Ok(Ok(message)) => message,
                    Ok(Err(error)) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
                        // Retention removes the oldest messages only: a missing one is gone
                        // if it now lies before the oldest stored, else the answer came from
                        // a server that has not caught up, and is not skipped.
                        if offset >= known.lock().expect("never poisoned").first {
                            look(&stream, &known, &next).await;
                        }
                        let first = known.lock().expect("never poisoned").first;
                        if offset < first {
                            if out.is_empty() {
                                return Err(ReadError::Expired { from, first });
                            }
                            continue; // removed by retention after the read began
                        }
                        if out.is_empty() {
                            return Err(ReadError::Unavailable {
                                topic: name,
                                message: format!("offset {offset} is not readable yet"),
                            });
                        }
                        break; // what was read before it, now
                    }
                    Ok(Err(error)) => {
                        return Err(ReadError::Unavailable {
                            topic: name,
                            message: format!("reading offset {offset}: {error}"),
                        });
                    }
                    Err(_) => {
                        return Err(ReadError::Unavailable {
                            topic: name,
                            message: format!("reading offset {offset}: no answer within 5 s"),
                        });
                    }
                };
                assert_eq!(
                    message.sequence,
                    offset + 1,
                    "the stream answers what was asked"
                );
                let event = match record::decode(&message.payload) {
                    Decoded::Record { mut event, len } if len == message.payload.len() => {
                        event.offset = offset;
                        event
                    }
                    _ => {
                        return Err(ReadError::Corrupt {
                            topic: name,
                            offset,
                            why: "the stream's message is not one whole event record",
                        });
                    }
                };
                payload_bytes += event.payload.len();
                out.push(event);
                if payload_bytes >= max_bytes {
                    break;
                }
            }
            Ok(out)
        })
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
                    self.look().await;
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
            // Never backwards: when the trigger moves, the node giving it up may commit
            // after the one taking over has gone further. Compare-and-set on the key's
            // revision, written only when the stored offset is lower.
            let bucket = &self.groups_bucket;
            let commit = async {
                for _ in 0..COMMIT_RACES_MAX {
                    let entry = bucket.entry(&key).await.map_err(|e| e.to_string())?;
                    let value = Bytes::from(offset.to_string());
                    let written = match entry {
                        Some(entry) if entry.operation == Operation::Put => {
                            let stored = std::str::from_utf8(&entry.value)
                                .ok()
                                .and_then(|text| text.parse::<u64>().ok());
                            if stored.is_some_and(|stored| stored >= offset) {
                                return Ok(());
                            }
                            bucket
                                .update(&key, value, entry.revision)
                                .await
                                .map_err(|e| e.to_string())
                        }
                        _ => bucket.create(&key, value).await.map_err(|e| e.to_string()),
                    };
                    if written.is_ok() {
                        return Ok(());
                    }
                }
                Err(format!(
                    "another node kept writing it ({COMMIT_RACES_MAX} tries)"
                ))
            };
            tokio::time::timeout(CALL_TIMEOUT, commit)
                .await
                .map_err(|_| format!("committing {key}: no answer within 5 s"))?
                .map_err(|e: String| format!("committing {key}: {e}"))?;
            let mut known = self.known.lock().expect("never poisoned");
            let committed = known.groups.entry(group).or_insert(offset);
            *committed = (*committed).max(offset);
            Ok(())
        })
    }

    fn stats(&self) -> TopicStats {
        let known = self.known.lock().expect("never poisoned");
        TopicStats {
            first: known.first,
            next: *self.next.borrow(),
            bytes: known.bytes,
            segments: 0,
            appended_total: known.appended_total,
            // A log's commits are its writes: here one JetStream message per event (a
            // consumer group's commit is not one). JetStream's syncs are its own.
            commits_total: known.appended_total,
            syncs_total: 0,
            per_second_last_10s: known.recent.per_second_last_10s(unix_ms() / 1000),
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
        let names = [
            "city.air",
            "city_air",
            "city.air.replies",
            "a",
            "a.",
            "a..b",
            "a_.b",
        ];
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
        assert!(
            longest.len() <= 255,
            "JetStream names are at most 255 bytes"
        );
    }
}
