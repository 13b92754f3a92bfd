//! The seam for topics kept by a cluster instead of this node's disk.
//!
//! In a cluster every node ingests into and delivers from the same topics, so their log
//! and their consumer groups' offsets live in the cluster's store (the `cluster` crate
//! puts them in NATS JetStream). [`crate::Events`] opens such a topic through
//! [`SharedLogs`] once it has been given one, and [`crate::Topic`] forwards its calls to
//! the [`SharedLog`] it got, so ingest, triggers and the control API do not know which
//! kind of topic they hold.
//!
//! The same promises hold as for a local topic: an append resolves only once the store
//! holds its events durably (for JetStream: acknowledged by a replicated stream that syncs
//! every write); appends made through one topic handle keep their order; offsets only grow.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use crate::record::{Event, NewEvent};
use crate::topic::{AppendError, ReadError, TopicConfig, TopicStats};

/// Where a forwarded event was stored first: an edge node appends to its own log, then
/// forwards ([`crate::Events::forward_through`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// When the first log stored it (milliseconds since the Unix epoch): the event keeps it.
    pub time_ms: u64,
    /// Names the event among everything forwarded to the topic (the node and its offset
    /// there): the store keeps one copy of events sent again under the same id, within its
    /// window for repeats.
    pub id: String,
}

/// A call under way on a shared log.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One topic kept by the cluster.
pub trait SharedLog: Send + Sync + 'static {
    /// Queue `events` before returning (so appends made one after another keep their
    /// order) and resolve once they are durable, with the offsets of the first and after
    /// the last. Other nodes append to the same topic meanwhile, so the range may hold
    /// their events too. The events have been checked against the topic's limits.
    /// `origins` is empty for new events, else one per event: events forwarded from the
    /// log that stored them first, which keep its time and are not stored twice.
    fn append(
        &self,
        events: Vec<NewEvent>,
        origins: Vec<Origin>,
    ) -> Pending<'static, Result<Range<u64>, AppendError>>;

    /// Durable events from `from`: at most `max_events`, stopping after the event that
    /// crosses `max_bytes` of payload. Offsets that hold nothing (removed) are passed over.
    fn read(
        &self,
        from: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Pending<'static, Result<Vec<Event>, ReadError>>;

    /// The offset after the last durable event, as this node knows it, growing.
    fn subscribe(&self) -> watch::Receiver<u64>;

    /// The oldest offset still stored, as last read.
    fn first_offset(&self) -> u64;

    /// The committed offset of `group` as last read or written here (a new group: the
    /// oldest stored event).
    fn group_offset(&self, group: &str) -> u64;

    /// The committed offset of `group` as the cluster has it now.
    fn group_offset_now(&self, group: &str) -> Pending<'_, Result<u64, String>>;

    /// Record durably that `group` has finished every event before `offset`.
    fn commit(&self, group: &str, offset: u64) -> Pending<'_, Result<(), String>>;

    fn stats(&self) -> TopicStats;

    /// Why the topic cannot be used now, if it cannot.
    fn broken(&self) -> Option<String>;

    /// Stop its tasks after answering the appends already queued.
    fn close(&self) -> Pending<'_, ()>;
}

/// Opens topics kept by the cluster.
pub trait SharedLogs: Send + Sync + 'static {
    /// Open (or create) topic `name`, or change its configuration; stored events are kept.
    fn open(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> Pending<'_, Result<Arc<dyn SharedLog>, String>>;

    /// Where the topics are kept, for messages (`NATS JetStream`).
    fn kind(&self) -> &'static str;
}
