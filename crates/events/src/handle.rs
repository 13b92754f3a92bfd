//! [`Topic`]: one handle for a topic, whichever store keeps it (this node's disk, or the
//! cluster's through [`crate::shared`]).

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use disk::Env;
use tokio::sync::watch;

use crate::record::{Event, NewEvent};
use crate::shared::SharedLog;
use crate::topic::{
    AppendError, Appending, Local, ReadError, TopicConfig, TopicStats, checked_bytes,
};

/// A topic: append, read, watch, and its consumer groups' offsets.
pub struct Topic {
    name: String,
    store: Store,
}

enum Store {
    Local(Arc<Local>),
    Shared {
        log: Arc<dyn SharedLog>,
        config: TopicConfig,
    },
}

impl Topic {
    /// Open (recovering) or create the topic stored in `dir`, on the machine's disk.
    pub fn open(name: &str, dir: &Path, config: TopicConfig) -> Result<Arc<Topic>, String> {
        Topic::open_in(Env::os(), name, dir, config)
    }

    /// Open (recovering) or create the topic stored in `dir` on `env`'s disk and clock.
    /// Must be called within a tokio runtime (the writer is a task).
    pub fn open_in(
        env: Env,
        name: &str,
        dir: &Path,
        config: TopicConfig,
    ) -> Result<Arc<Topic>, String> {
        let local = Local::open_in(env, name, dir, config)?;
        Ok(Arc::new(Topic {
            name: name.to_string(),
            store: Store::Local(local),
        }))
    }

    /// A topic kept by the cluster.
    pub fn shared(name: &str, config: TopicConfig, log: Arc<dyn SharedLog>) -> Arc<Topic> {
        Arc::new(Topic {
            name: name.to_string(),
            store: Store::Shared { log, config },
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the cluster keeps this topic (not this node's disk).
    pub fn is_shared(&self) -> bool {
        matches!(self.store, Store::Shared { .. })
    }

    /// Append events; resolves once they are durable, with their offsets (in a cluster the
    /// range may also hold events other nodes appended meanwhile).
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Range<u64>, AppendError> {
        match &self.store {
            Store::Local(local) => local.append(events).await,
            Store::Shared { log, config } => self.append_shared(log, config, events).await,
        }
    }

    /// Like [`Topic::append`], but the events are queued before this returns whenever the
    /// writer has room, so a caller can start many appends in order and await them later
    /// without a task each. When the writer is behind, the returned future waits for room.
    pub fn append_soon(self: &Arc<Self>, events: Vec<NewEvent>) -> Appending {
        match &self.store {
            Store::Local(local) => local.append_soon(events),
            Store::Shared { log, config } => self.append_shared(log, config, events),
        }
    }

    /// An append to a shared log, queued (when there is room) before this returns.
    fn append_shared(
        &self,
        log: &Arc<dyn SharedLog>,
        config: &TopicConfig,
        events: Vec<NewEvent>,
    ) -> Appending {
        if let Err(error) = checked_bytes(&self.name, config.event_bytes_max, &events) {
            return Box::pin(std::future::ready(Err(error)));
        }
        if events.is_empty() {
            let next = *log.subscribe().borrow();
            return Box::pin(std::future::ready(Ok(next..next)));
        }
        log.append(events, Vec::new())
    }

    /// The offset after the last durable event (in a cluster: as this node knows it).
    pub fn next_offset(&self) -> u64 {
        match &self.store {
            Store::Local(local) => local.next_offset(),
            Store::Shared { log, .. } => *log.subscribe().borrow(),
        }
    }

    /// The oldest offset still stored.
    pub fn first_offset(&self) -> u64 {
        match &self.store {
            Store::Local(local) => local.first_offset(),
            Store::Shared { log, .. } => log.first_offset(),
        }
    }

    /// Watch the next offset grow.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        match &self.store {
            Store::Local(local) => local.subscribe(),
            Store::Shared { log, .. } => log.subscribe(),
        }
    }

    /// Read durable events from `from`: at most `max_events`, and stop after the event that
    /// crosses `max_bytes` of payload.
    pub async fn read(
        self: &Arc<Self>,
        from: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Event>, ReadError> {
        match &self.store {
            Store::Local(local) => local.read(from, max_events, max_bytes).await,
            Store::Shared { log, .. } => log.read(from, max_events, max_bytes).await,
        }
    }

    /// The first offset at or after `from` that is not in a stretch known to be lost, so a
    /// consumer that read nothing from `from` can move past the loss. Never past
    /// [`Topic::next_offset`].
    pub fn skip_lost(&self, from: u64) -> u64 {
        match &self.store {
            Store::Local(local) => local.skip_lost(from),
            // A shared log's reads pass over offsets that hold nothing.
            Store::Shared { .. } => from.min(self.next_offset()),
        }
    }

    /// Offsets that cannot be read, merged and ascending: damage recovery found, and offsets
    /// skipped so that none is handed out twice.
    pub fn lost(&self) -> Vec<Range<u64>> {
        match &self.store {
            Store::Local(local) => local.lost(),
            Store::Shared { .. } => Vec::new(),
        }
    }

    /// The committed offset of a consumer group: the first event it has not finished.
    /// A new group starts at the oldest stored event. In a cluster: as last read or
    /// written by this node; see [`Topic::group_offset_now`].
    pub fn group_offset(&self, group: &str) -> u64 {
        match &self.store {
            Store::Local(local) => local.group_offset(group),
            Store::Shared { log, .. } => log.group_offset(group),
        }
    }

    /// The committed offset of a consumer group as the store has it now: in a cluster,
    /// another node may have delivered and committed since this node last looked.
    pub async fn group_offset_now(&self, group: &str) -> Result<u64, String> {
        match &self.store {
            Store::Local(local) => Ok(local.group_offset(group)),
            Store::Shared { log, .. } => log.group_offset_now(group).await,
        }
    }

    /// Record durably that `group` has finished every event before `offset`, which must
    /// not lie past [`Topic::next_offset`].
    pub async fn commit(&self, group: &str, offset: u64) -> Result<(), String> {
        match &self.store {
            Store::Local(local) => local.commit(group, offset).await,
            Store::Shared { log, .. } => {
                crate::topic::check_group_name(group)?;
                log.commit(group, offset).await
            }
        }
    }

    pub fn stats(&self) -> TopicStats {
        match &self.store {
            Store::Local(local) => local.stats(),
            Store::Shared { log, .. } => log.stats(),
        }
    }

    /// Why appends fail, if the topic has stopped accepting them after an I/O error.
    pub fn broken(&self) -> Option<String> {
        match &self.store {
            Store::Local(local) => local.broken(),
            Store::Shared { log, .. } => log.broken(),
        }
    }

    /// Stop the writer after it has answered every append queued before this call.
    pub async fn close(&self) {
        match &self.store {
            Store::Local(local) => local.close().await,
            Store::Shared { log, .. } => log.close().await,
        }
    }
}
