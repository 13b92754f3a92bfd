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
//! is sent under an id made of the node's name, its offset here and the time it was stored
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
    let mut shared: Option<Opened> = None;
    // Since when the cluster has not taken what waits, and how often it refused.
    let mut failing: Option<(Instant, u64)> = None;
    // Events before this offset go one at a time: a batch was refused as too large, and
    // the one event that is gets set aside alone.
    let mut singly_until = 0;
    loop {
        let (committed, first) = (topic.group_offset(FORWARD_GROUP), topic.first_offset());
        if committed < first {
            // Retention removed events before the link let them through.
            tracing::warn!(
                topic = %name,
                events = first - committed,
                "events: removed by retention before they could be forwarded to the cluster"
            );
            topic.commit(FORWARD_GROUP, first).await.ok();
        }
        let from = committed.max(first);
        if from >= topic.next_offset() {
            if grown.changed().await.is_err() {
                return;
            }
            continue;
        }
        let result = match &shared {
            Some(log) => {
                let at_most = if from < singly_until { 1 } else { BATCH_EVENTS };
                send(&topic, &log.0, from, at_most, &origin).await
            }
            None => match tokio::time::timeout(SEND_TIMEOUT, logs.open(&name, config)).await {
                Ok(Ok(log)) => {
                    shared = Some(Opened(log));
                    continue;
                }
                Ok(Err(error)) => Err(Refused::Again(format!(
                    "cannot open the cluster's topic: {error}"
                ))),
                Err(_) => Err(Refused::Again(
                    "the cluster did not open the topic within 30 s".to_string(),
                )),
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
            Err(Refused::TooLarge { end, message }) if end > from + 1 => {
                // Find the event alone.
                singly_until = end;
                tracing::debug!(topic = %name, %message, "events: a batch is too large for the cluster; sending its events one at a time");
            }
            Err(Refused::TooLarge { message, .. }) => {
                // The cluster will never take this one: leave it on this node's disk
                // rather than hold back every later event.
                tracing::error!(
                    topic = %name,
                    offset = from,
                    %message,
                    "events: an event is too large for the cluster's NATS servers; it stays on this node's disk only (read it with `maru events tail` here), and forwarding goes on after it"
                );
                if let Err(error) = topic.commit(FORWARD_GROUP, from + 1).await {
                    tracing::warn!(topic = %name, %error, "events: cannot commit past an event too large to forward");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
            Err(Refused::Again(error)) => {
                let refusals = match &mut failing {
                    None => {
                        tracing::warn!(
                            topic = %name,
                            %error,
                            "events: cannot forward to the cluster; events stay on this node's disk and are sent when it answers"
                        );
                        failing = Some((Instant::now(), 1));
                        1
                    }
                    Some((_, refusals)) => {
                        *refusals += 1;
                        *refusals
                    }
                };
                // The topic's writer may be stuck or gone (the stream removed): open it
                // anew now and then.
                if refusals % REOPEN_AFTER == 0 {
                    shared = None;
                }
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

/// Refused failures open the cluster's topic again after this many in a row.
const REOPEN_AFTER: u64 = 10;

/// The cluster's topic as opened here: closed (its writer stopped) when dropped, so a
/// forwarder stopped or opening anew leaves no writer behind.
struct Opened(Arc<dyn SharedLog>);

impl Drop for Opened {
    fn drop(&mut self) {
        let log = self.0.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { log.close().await });
        }
    }
}

/// Why a batch was not forwarded.
enum Refused {
    /// The events from `from` up to `end` hold one too large for the cluster.
    TooLarge { end: u64, message: String },
    /// Anything else: ask again.
    Again(String),
}

/// Send up to `at_most` events from `from` on (one batch) and commit them: how many were
/// forwarded.
async fn send(
    topic: &Arc<Topic>,
    log: &Arc<dyn SharedLog>,
    from: u64,
    at_most: usize,
    origin: &str,
) -> Result<usize, Refused> {
    let again = Refused::Again;
    let events = topic
        .read(from, at_most, BATCH_BYTES)
        .await
        .map_err(|error| again(format!("cannot read this node's log: {error}")))?;
    let Some(last) = events.last() else {
        // Nothing readable at `from`: a stretch lost to damage (counted by the topic).
        let past = topic.skip_lost(from);
        if past > from {
            topic.commit(FORWARD_GROUP, past).await.map_err(again)?;
            return Ok(0);
        }
        return Err(again(format!(
            "offset {from} of this node's log reads nothing"
        )));
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
            id: event_id(origin, event.offset, event.time_ms),
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
        Ok(Err(crate::AppendError::TooLarge(message))) => {
            return Err(Refused::TooLarge { end, message });
        }
        Ok(Err(error)) => return Err(again(error.to_string())),
        Err(_) => {
            return Err(again(
                "the cluster did not acknowledge within 30 s".to_string(),
            ));
        }
    }
    topic.commit(FORWARD_GROUP, end).await.map_err(again)?;
    Ok(count)
}

/// The id an event is forwarded under: this node, its offset here and the time it was
/// stored. The time tells apart two events that got the same offset (one lost at a power
/// cut before it was synced, under `durability = "batch"`, and the next one stored, or a
/// node replaced under the same name), which the cluster would otherwise take for one.
fn event_id(origin: &str, offset: u64, time_ms: u64) -> String {
    format!("{origin}.{offset}.{time_ms}")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::ops::Range;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    use bytes::Bytes;
    use tokio::sync::watch;

    use super::*;
    use crate::shared::Pending;
    use crate::topic::{AppendError, ReadError, TopicStats};
    use crate::{Event, Events};

    /// A cluster's topic in memory that keeps one copy per id, as JetStream does within its
    /// window for repeats; it can refuse appends, or store them and lose the answer.
    #[derive(Default)]
    struct Cluster {
        stored: Mutex<Vec<(Origin, NewEvent)>>,
        ids: Mutex<BTreeSet<String>>,
        /// Appends refused outright (the link is down), then appends stored but answered
        /// with an error (the acknowledgement lost), and opens refused.
        refuse: AtomicU32,
        lose_answer: AtomicU32,
        refuse_open: AtomicU32,
    }

    struct Log(Arc<Cluster>);

    fn take_one(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    impl SharedLog for Log {
        fn append(
            &self,
            events: Vec<NewEvent>,
            origins: Vec<Origin>,
        ) -> Pending<'static, Result<Range<u64>, AppendError>> {
            let cluster = self.0.clone();
            Box::pin(async move {
                let failed = |message: &str| AppendError::Io {
                    topic: "t".into(),
                    message: message.into(),
                };
                if take_one(&cluster.refuse) {
                    return Err(failed("no route to the cluster"));
                }
                if events.iter().any(|e| e.payload.starts_with(b"BIG")) {
                    return Err(AppendError::TooLarge("larger than max_payload".into()));
                }
                assert_eq!(origins.len(), events.len(), "forwarded events have origins");
                let mut stored = cluster.stored.lock().expect("never poisoned");
                let start = stored.len() as u64;
                for (origin, event) in origins.into_iter().zip(events) {
                    if cluster
                        .ids
                        .lock()
                        .expect("never poisoned")
                        .insert(origin.id.clone())
                    {
                        stored.push((origin, event));
                    }
                }
                if take_one(&cluster.lose_answer) {
                    return Err(failed("timed out waiting for the acknowledgement"));
                }
                Ok(start..stored.len() as u64)
            })
        }
        fn read(
            &self,
            _: u64,
            _: usize,
            _: usize,
        ) -> Pending<'static, Result<Vec<Event>, ReadError>> {
            unreachable!("the forwarder only appends")
        }
        fn subscribe(&self) -> watch::Receiver<u64> {
            watch::channel(0).1
        }
        fn first_offset(&self) -> u64 {
            0
        }
        fn group_offset(&self, _: &str) -> u64 {
            0
        }
        fn group_offset_now(&self, _: &str) -> Pending<'_, Result<u64, String>> {
            unreachable!("the forwarder only appends")
        }
        fn commit(&self, _: &str, _: u64) -> Pending<'_, Result<(), String>> {
            unreachable!("the forwarder only appends")
        }
        fn stats(&self) -> TopicStats {
            unreachable!("the forwarder only appends")
        }
        fn broken(&self) -> Option<String> {
            None
        }
        fn close(&self) -> Pending<'_, ()> {
            Box::pin(async {})
        }
    }

    impl SharedLogs for Log {
        fn open(&self, _: &str, _: TopicConfig) -> Pending<'_, Result<Arc<dyn SharedLog>, String>> {
            let cluster = self.0.clone();
            Box::pin(async move {
                if take_one(&cluster.refuse_open) {
                    return Err("no route to the cluster".to_string());
                }
                Ok(Arc::new(Log(cluster)) as Arc<dyn SharedLog>)
            })
        }
        fn kind(&self) -> &'static str {
            "memory"
        }
    }

    fn event(i: usize) -> NewEvent {
        NewEvent {
            key: format!("k{}", i % 3),
            content_type: "text/plain".into(),
            kind: String::new(),
            source: "test".into(),
            payload: Bytes::from(format!("e{i}")),
        }
    }

    async fn until_stored(cluster: &Cluster, count: usize) {
        for _ in 0..400 {
            if cluster.stored.lock().expect("never poisoned").len() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "forwarded {} of {count}",
            cluster.stored.lock().expect("never poisoned").len()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_event_reaches_the_cluster_once_in_order_through_refusals_and_lost_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = Arc::new(Cluster::default());
        // The cluster cannot be reached at first, then refuses a send, then stores two
        // sends but their answers are lost.
        cluster.refuse_open.store(2, Ordering::SeqCst);
        cluster.refuse.store(1, Ordering::SeqCst);
        cluster.lose_answer.store(2, Ordering::SeqCst);
        let events = Events::new(dir.path());
        events.forward_through(Arc::new(Log(cluster.clone())), "e1");
        let topic = events
            .declare("street.counts", TopicConfig::default())
            .await
            .expect("declares");
        for chunk in 0..10 {
            let batch = (chunk * 70..(chunk + 1) * 70).map(event).collect();
            topic
                .append(batch)
                .await
                .expect("stored on this node's disk");
        }
        until_stored(&cluster, 700).await;
        // Nothing more comes (no copy of a batch whose answer was lost).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let local = topic.read(0, 1000, usize::MAX).await.expect("reads");
        {
            let stored = cluster.stored.lock().expect("never poisoned");
            assert_eq!(stored.len(), 700, "each event once");
            for ((origin, forwarded), original) in stored.iter().zip(&local) {
                assert_eq!(origin.id, event_id("e1", original.offset, original.time_ms));
                assert_eq!(
                    origin.time_ms, original.time_ms,
                    "the time it was stored first"
                );
                assert_eq!(
                    forwarded.payload, original.payload,
                    "in the order stored here"
                );
                assert_eq!(forwarded.key, original.key);
            }
        }
        assert_eq!(topic.group_offset(FORWARD_GROUP), 700, "committed here");
        events.close_all().await;

        // Started again on the same disk: what was forwarded is not sent again; what is
        // appended now is.
        let again = Arc::new(Cluster::default());
        let events = Events::new(dir.path());
        events.forward_through(Arc::new(Log(again.clone())), "e1");
        let topic = events
            .declare("street.counts", TopicConfig::default())
            .await
            .expect("declares");
        topic.append(vec![event(700)]).await.expect("stored");
        until_stored(&again, 1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        {
            let stored = again.stored.lock().expect("never poisoned");
            assert_eq!(stored.len(), 1);
            assert!(stored[0].0.id.starts_with("e1.700."), "{}", stored[0].0.id);
        }
        events.close_all().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_the_cluster_will_never_take_stays_here_and_the_rest_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = Arc::new(Cluster::default());
        let events = Events::new(dir.path());
        events.forward_through(Arc::new(Log(cluster.clone())), "e1");
        let topic = events
            .declare("street.counts", TopicConfig::default())
            .await
            .expect("declares");
        let mut batch: Vec<NewEvent> = (0..100).map(event).collect();
        batch[40].payload = Bytes::from_static(b"BIG");
        topic
            .append(batch)
            .await
            .expect("stored on this node's disk");
        until_stored(&cluster, 99).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        {
            let stored = cluster.stored.lock().expect("never poisoned");
            let payloads: Vec<&[u8]> = stored.iter().map(|(_, e)| &e.payload[..]).collect();
            let expected: Vec<Vec<u8>> = (0..100)
                .filter(|i| *i != 40)
                .map(|i| format!("e{i}").into_bytes())
                .collect();
            assert_eq!(
                payloads,
                expected.iter().map(|p| &p[..]).collect::<Vec<_>>()
            );
        }
        assert_eq!(topic.group_offset(FORWARD_GROUP), 100);
        events.close_all().await;
    }
}
