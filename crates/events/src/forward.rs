//! Forwarding an edge node's topics to the cluster.
//!
//! An edge node may lose its link to the cluster for minutes and must keep ingesting, so
//! its topics stay logs on its own disk (acknowledged once synced there, as on a node
//! alone) and one task per topic copies them, in order, into the cluster's topic of the
//! same name whenever the cluster answers ([`forward`]).
//!
//! What was forwarded is the topic's consumer group [`FORWARD_GROUP`], committed on the
//! edge node's disk after the cluster acknowledged the events, so `maru events stats`
//! shows the backlog as that group's lag and a restart goes on where it stopped. An event
//! is sent under an id made of the node's name and its offset here
//! ([`crate::shared::Origin`]): one sent again after a lost acknowledgement (the link cut
//! mid-send, or the node stopped between the cluster's acknowledgement and the commit) is
//! stored once by the cluster, within the store's window for repeats. Events keep the
//! time the edge node stored them and their per-key order; the cluster's offsets are its
//! own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Topic;
use crate::record::NewEvent;
use crate::shared::{Origin, SharedLog, SharedLogs};
use crate::topic::TopicConfig;

/// The consumer group whose committed offset is what the cluster holds.
pub const FORWARD_GROUP: &str = "maru-forward";

/// Events sent at once, at most; and their payload bytes (the last may cross it).
const BATCH_EVENTS: usize = 512;
const BATCH_BYTES: usize = 4 << 20;
/// How long one batch may take before it is sent again.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failure before asking the cluster again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Copy `topic` (kept on this node's disk) into the cluster's topic of the same name, for
/// ever: call it in a task and abort the task to stop. `origin` is this node's name.
pub(crate) async fn forward(
    topic: Arc<Topic>,
    logs: Arc<dyn SharedLogs>,
    config: TopicConfig,
    origin: String,
) {
    let name = topic.name().to_string();
    let mut grown = topic.subscribe();
    let mut shared: Option<Arc<dyn SharedLog>> = None;
    // Since when the cluster has not taken what waits, and how often it refused.
    let mut failing: Option<(Instant, u64)> = None;
    loop {
        let from = topic.group_offset(FORWARD_GROUP).max(topic.first_offset());
        if from >= topic.next_offset() {
            if grown.changed().await.is_err() {
                return;
            }
            continue;
        }
        let result = match &shared {
            Some(log) => send(&topic, log, from, &origin).await,
            None => match tokio::time::timeout(SEND_TIMEOUT, logs.open(&name, config)).await {
                Ok(Ok(log)) => {
                    shared = Some(log);
                    continue;
                }
                Ok(Err(error)) => Err(format!("cannot open the cluster's topic: {error}")),
                Err(_) => Err("the cluster did not open the topic within 30 s".to_string()),
            },
        };
        match result {
            Ok(forwarded) => {
                if let Some((since, refusals)) = failing.take() {
                    tracing::info!(
                        topic = %name,
                        after_s = since.elapsed().as_secs(),
                        refusals,
                        "events: the cluster takes this edge node's events again"
                    );
                }
                tracing::debug!(topic = %name, forwarded, "events: forwarded to the cluster");
            }
            Err(error) => {
                match &mut failing {
                    None => {
                        tracing::warn!(
                            topic = %name,
                            %error,
                            "events: cannot forward to the cluster; events stay on this node's disk and are sent when it answers"
                        );
                        failing = Some((Instant::now(), 1));
                    }
                    Some((_, refusals)) => *refusals += 1,
                }
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

/// Send the events from `from` on (one batch) and commit them: how many were forwarded.
async fn send(
    topic: &Arc<Topic>,
    log: &Arc<dyn SharedLog>,
    from: u64,
    origin: &str,
) -> Result<usize, String> {
    let events = topic
        .read(from, BATCH_EVENTS, BATCH_BYTES)
        .await
        .map_err(|error| format!("cannot read this node's log: {error}"))?;
    let Some(last) = events.last() else {
        // Nothing readable at `from`: a stretch lost to damage (counted by the topic).
        let past = topic.skip_lost(from);
        if past > from {
            topic.commit(FORWARD_GROUP, past).await?;
            return Ok(0);
        }
        return Err(format!("offset {from} of this node's log reads nothing"));
    };
    let end = last.offset + 1;
    assert!(
        events.windows(2).all(|w| w[0].offset < w[1].offset) && events[0].offset >= from,
        "a log reads its events in offset order from where it was asked"
    );
    let count = events.len();
    let mut origins = Vec::with_capacity(count);
    let mut new = Vec::with_capacity(count);
    for event in events {
        origins.push(Origin {
            time_ms: event.time_ms,
            id: format!("{origin}.{}", event.offset),
        });
        new.push(NewEvent {
            key: event.key,
            content_type: event.content_type,
            kind: event.kind,
            source: event.source,
            payload: event.payload,
        });
    }
    match tokio::time::timeout(SEND_TIMEOUT, log.append(new, origins)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => return Err(error.to_string()),
        Err(_) => return Err("the cluster did not acknowledge within 30 s".to_string()),
    }
    topic.commit(FORWARD_GROUP, end).await?;
    Ok(count)
}
