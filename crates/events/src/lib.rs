//! Durable events: topics stored as segmented logs, consumer groups with committed
//! offsets, and ingest over MQTT.
//!
//! Invariant: nothing is acknowledged before it is durable. [`Topic::append`] resolves
//! only after the events are written and (for `durability = "fsync"`) synced; the HTTP
//! and MQTT front ends answer from that result and never before.
//!
//! The topic and consumer interfaces ([`Events`], [`Topic`]) do not expose files: in a
//! cluster the topics are kept by the cluster's store behind the same calls ([`shared`]).

pub mod access;
mod broker;
pub mod forward;
mod handle;
pub mod mqtt;
pub mod rate;
pub mod record;
pub mod shared;
mod topic;

pub use access::{Admission, Gate, Producer, Publishers};
pub use broker::{Events, TOPIC_NAME_BYTES_MAX, TopicError, check_topic_name};
pub use handle::Topic;
pub use record::{Event, NewEvent};
pub use topic::{AppendError, Appending, Durability, ReadError, TopicConfig, TopicStats};

/// Whether a producer presented the ingest token `expected`, compared in time independent
/// of where the first difference is. An empty expected token matches nothing.
pub fn token_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    !a.is_empty()
        && a.len() == b.len()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
