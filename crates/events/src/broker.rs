//! The node's topics by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::Topic;
use crate::shared::SharedLogs;
use crate::topic::TopicConfig;

/// The longest topic name.
pub const TOPIC_NAME_BYTES_MAX: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("no topic is named {0:?}; declare it in an app manifest with [topic.\"{0}\"]")]
    Unknown(String),
    #[error(
        "{0:?} is not a valid topic name: use 1 to 128 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error("topic {name}: {message}")]
    Open { name: String, message: String },
    /// Declared, but its last opening failed (why: `message`, for the node's log; not
    /// shown to producers); the node tries again.
    #[error(
        "topic {name} is declared but could not be opened yet; the node tries again (its log says why)"
    )]
    NotOpen { name: String, message: String },
}

impl TopicError {
    /// Whether asking again later may succeed (the topic is declared but not open yet).
    pub fn is_transient(&self) -> bool {
        matches!(self, TopicError::NotOpen { .. })
    }
}

/// Every declared topic. Topics live in `DIR/NAME/`, or in the cluster's store once
/// [`Events::share_through`] was called.
pub struct Events {
    dir: PathBuf,
    topics: RwLock<BTreeMap<String, (TopicConfig, Arc<Topic>)>>,
    shared: OnceLock<Arc<dyn SharedLogs>>,
    /// An edge node's: where its topics are forwarded, and its name.
    forward: OnceLock<(Arc<dyn SharedLogs>, String)>,
    /// The task forwarding each topic, on an edge node.
    forwarders: Mutex<BTreeMap<String, tokio::task::AbortHandle>>,
    /// Declared topics whose last opening failed, with the reason: asked for, they answer
    /// [`TopicError::NotOpen`] (a producer may retry) rather than [`TopicError::Unknown`].
    /// Bounded by the declared topics: entries leave when the topic opens or is retired.
    unopened: Mutex<BTreeMap<String, String>>,
}

pub fn check_topic_name(name: &str) -> Result<(), TopicError> {
    let valid = !name.is_empty()
        && name.len() <= TOPIC_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if valid {
        Ok(())
    } else {
        Err(TopicError::BadName(name.to_string()))
    }
}

impl Events {
    pub fn new(dir: &Path) -> Self {
        Events {
            dir: dir.to_path_buf(),
            topics: RwLock::new(BTreeMap::new()),
            shared: OnceLock::new(),
            forward: OnceLock::new(),
            forwarders: Mutex::new(BTreeMap::new()),
            unopened: Mutex::new(BTreeMap::new()),
        }
    }

    /// Keep topics declared from now on in the cluster's store (once, when the node joins
    /// a cluster, before its apps start). A topic this node kept on its disk before is kept
    /// by the cluster too from then on: the events stored on the disk stay there, unread.
    pub fn share_through(&self, logs: Arc<dyn SharedLogs>) {
        if self.shared.set(logs).is_err() {
            tracing::warn!("events: topics are already kept by a cluster; ignored");
        }
    }

    /// Keep topics on this node's disk and forward what they store to the cluster's topics
    /// of the same names (once, when an edge node joins a cluster, before its apps start;
    /// `origin` is the node's name): ingest goes on while the link to the cluster is down,
    /// and what was stored meanwhile reaches the cluster when it returns
    /// ([`crate::forward`]). Reads and triggers here see this node's events only.
    pub fn forward_through(&self, logs: Arc<dyn SharedLogs>, origin: &str) {
        if self.shared.get().is_some() || self.forward.set((logs, origin.to_string())).is_err() {
            tracing::warn!("events: topics are already kept by a cluster; ignored");
        }
    }

    /// Stop forwarding topic `name`, if it was.
    fn stop_forwarding(&self, name: &str) {
        if let Some(task) = self
            .forwarders
            .lock()
            .expect("forwarders lock is never poisoned")
            .remove(name)
        {
            task.abort();
        }
    }

    /// Where declared topics are kept, for messages.
    pub fn kept_by(&self) -> &'static str {
        if self.forward.get().is_some() {
            return "this node's disk, forwarded to the cluster";
        }
        self.shared
            .get()
            .map_or("this node's disk", |logs| logs.kind())
    }

    /// Open a topic, or reopen it if its configuration changed. Stored events are kept.
    pub async fn declare(&self, name: &str, config: TopicConfig) -> Result<Arc<Topic>, TopicError> {
        check_topic_name(name)?;
        let existing = self
            .topics
            .read()
            .expect("topics lock is never poisoned")
            .get(name)
            .cloned();
        let reopening = existing.is_some();
        if let Some((old_config, topic)) = existing {
            if old_config == config {
                return Ok(topic);
            }
            self.stop_forwarding(name);
            topic.close().await;
        }
        let opened = match self.shared.get() {
            Some(logs) => logs
                .open(name, config)
                .await
                .map(|log| Topic::shared(name, config, log)),
            None => {
                let dir = self.dir.join(name);
                tokio::task::block_in_place(|| Topic::open(name, &dir, config))
            }
        };
        let topic = match opened {
            Ok(topic) => topic,
            Err(message) => {
                // Marked unopened before the old handle goes, so that it is never taken
                // for undeclared meanwhile.
                self.unopened
                    .lock()
                    .expect("unopened lock is never poisoned")
                    .insert(name.to_string(), message.clone());
                if reopening {
                    // The old handle was closed above: it must not be handed out again.
                    self.topics
                        .write()
                        .expect("topics lock is never poisoned")
                        .remove(name);
                }
                return Err(TopicError::Open {
                    name: name.to_string(),
                    message,
                });
            }
        };
        if let Some((logs, origin)) = self.forward.get() {
            let task = tokio::spawn(crate::forward::forward(
                topic.clone(),
                logs.clone(),
                config,
                origin.clone(),
            ));
            self.forwarders
                .lock()
                .expect("forwarders lock is never poisoned")
                .insert(name.to_string(), task.abort_handle());
        }
        self.topics
            .write()
            .expect("topics lock is never poisoned")
            .insert(name.to_string(), (config, topic.clone()));
        // Open before it stops being unopened: never taken for undeclared meanwhile.
        self.unopened
            .lock()
            .expect("unopened lock is never poisoned")
            .remove(name);
        Ok(topic)
    }

    /// Declared topics whose last opening failed, by name.
    pub fn unopened(&self) -> Vec<String> {
        self.unopened
            .lock()
            .expect("unopened lock is never poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// Stop accepting events for a topic (also one that failed to open). Its stored events
    /// stay on disk.
    pub async fn retire(&self, name: &str) {
        self.unopened
            .lock()
            .expect("unopened lock is never poisoned")
            .remove(name);
        let removed = self
            .topics
            .write()
            .expect("topics lock is never poisoned")
            .remove(name);
        self.stop_forwarding(name);
        if let Some((_, topic)) = removed {
            if self.forward.get().is_some() {
                let waiting = topic
                    .next_offset()
                    .saturating_sub(topic.group_offset(crate::forward::FORWARD_GROUP));
                if waiting > 0 {
                    tracing::warn!(
                        topic = name,
                        events = waiting,
                        "events: topic retired before its events reached the cluster; they stay on this node's disk (declare the topic again to forward them)"
                    );
                }
            }
            topic.close().await;
        }
    }

    pub fn topic(&self, name: &str) -> Result<Arc<Topic>, TopicError> {
        if let Some((_, topic)) = self
            .topics
            .read()
            .expect("topics lock is never poisoned")
            .get(name)
        {
            return Ok(topic.clone());
        }
        Err(self.missing(name))
    }

    /// Why `name` has no open topic: it failed to open, or it is not declared.
    fn missing(&self, name: &str) -> TopicError {
        match self
            .unopened
            .lock()
            .expect("unopened lock is never poisoned")
            .get(name)
        {
            Some(message) => TopicError::NotOpen {
                name: name.to_string(),
                message: message.clone(),
            },
            None => TopicError::Unknown(name.to_string()),
        }
    }

    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.topics
            .read()
            .expect("topics lock is never poisoned")
            .values()
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// The topic an MQTT topic name publishes to, and the event key: the MQTT levels are
    /// joined with '.', the longest declared topic made of leading levels takes the event,
    /// and the remaining levels (joined with '/') become its key. `city/traffic/loop-17`
    /// goes to `city.traffic` with key `loop-17` if `city.traffic` is declared, or to
    /// `city.traffic.loop-17` with an empty key if that is.
    pub fn route_mqtt(&self, mqtt_topic: &str) -> Result<(Arc<Topic>, String), TopicError> {
        // Only leading levels that fit in a topic name can name one: the candidates are
        // built once, outside the lock, and there are at most a few dozen of them however
        // long or deep the MQTT topic is.
        let mut candidates: Vec<(String, usize)> = Vec::new();
        let mut name = String::new();
        let mut consumed = 0;
        for level in mqtt_topic.split('/') {
            if !name.is_empty() {
                name.push('.');
            }
            name.push_str(level);
            consumed += level.len() + 1;
            if name.len() > TOPIC_NAME_BYTES_MAX {
                break;
            }
            candidates.push((name.clone(), consumed.min(mqtt_topic.len())));
        }
        // The longest declared prefix wins, open or not: a declared topic that has not
        // opened yet is not reported as unknown (the producer may publish again), and its
        // events never go to a shorter topic meanwhile.
        let topics = self.topics.read().expect("topics lock is never poisoned");
        let unopened = self
            .unopened
            .lock()
            .expect("unopened lock is never poisoned");
        for (name, rest_from) in candidates.iter().rev() {
            if let Some((_, topic)) = topics.get(name) {
                return Ok((topic.clone(), mqtt_topic[*rest_from..].to_string()));
            }
            if let Some(message) = unopened.get(name) {
                return Err(TopicError::NotOpen {
                    name: name.clone(),
                    message: message.clone(),
                });
            }
        }
        drop(unopened);
        drop(topics);
        let shown: String = mqtt_topic.chars().take(TOPIC_NAME_BYTES_MAX).collect();
        Err(TopicError::Unknown(shown.replace('/', ".")))
    }

    /// Close every topic, answering the appends already queued.
    pub async fn close_all(&self) {
        let forwarders = std::mem::take(
            &mut *self
                .forwarders
                .lock()
                .expect("forwarders lock is never poisoned"),
        );
        for task in forwarders.into_values() {
            task.abort();
        }
        let topics: Vec<_> =
            std::mem::take(&mut *self.topics.write().expect("topics lock is never poisoned"))
                .into_values()
                .collect();
        for (_, topic) in topics {
            topic.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mqtt_topics_map_to_the_longest_declared_prefix_with_bounded_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let events = Events::new(dir.path());
        events
            .declare("city.traffic", TopicConfig::default())
            .await
            .expect("declares");
        let route = |mqtt: &str| {
            events
                .route_mqtt(mqtt)
                .map(|(topic, key)| (topic.name().to_string(), key))
        };
        assert_eq!(
            route("city/traffic/harbour-gate/3").expect("routes"),
            ("city.traffic".to_string(), "harbour-gate/3".to_string())
        );
        assert_eq!(
            route("city/traffic").expect("routes"),
            ("city.traffic".to_string(), String::new())
        );
        assert!(route("city/water").is_err());
        // Deep and long names are looked up by their first levels only (hardening defect 6:
        // each level used to cost a join of all before it, under the topics lock).
        let deep = format!("city/traffic/{}", "a/".repeat(30_000));
        assert_eq!(route(&deep).expect("routes").0, "city.traffic");
        let unknown = "x/".repeat(30_000);
        let error = route(&unknown).expect_err("unknown").to_string();
        assert!(
            error.len() < 400,
            "the error quotes a bounded name: {error}"
        );
        events.close_all().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_declared_topic_that_failed_to_open_is_reported_as_not_open_until_it_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let events = Events::new(dir.path());
        // A file where the topic's directory belongs: opening fails.
        std::fs::write(dir.path().join("city.air"), b"in the way").expect("write");
        let failed = events
            .declare("city.air", TopicConfig::default())
            .await
            .map(drop)
            .expect_err("cannot open over a file");
        assert!(matches!(failed, TopicError::Open { .. }), "{failed}");
        assert_eq!(events.unopened(), ["city.air"]);
        let asked = events.topic("city.air").map(drop).expect_err("not open");
        assert!(asked.is_transient(), "{asked}");
        assert!(asked.to_string().contains("tries again"), "{asked}");
        let routed = events
            .route_mqtt("city/air/sensor-4")
            .map(drop)
            .expect_err("not open");
        assert!(routed.is_transient(), "{routed}");
        assert!(
            !events
                .topic("city.water")
                .map(drop)
                .expect_err("undeclared")
                .is_transient()
        );
        // An open shorter topic does not take the events of the one that is not open.
        events
            .declare("city", TopicConfig::default())
            .await
            .expect("opens");
        let routed = events
            .route_mqtt("city/air/sensor-4")
            .map(drop)
            .expect_err("not open");
        assert!(routed.is_transient(), "{routed}");
        assert!(events.route_mqtt("city/water/sensor-1").is_ok());
        // Once the way is clear, the next declaration opens it.
        std::fs::remove_file(dir.path().join("city.air")).expect("remove");
        events
            .declare("city.air", TopicConfig::default())
            .await
            .expect("opens");
        assert!(events.unopened().is_empty());
        assert!(events.topic("city.air").is_ok());
        // A topic that is retired while it cannot open is forgotten.
        std::fs::write(dir.path().join("city.noise"), b"in the way").expect("write");
        _ = events.declare("city.noise", TopicConfig::default()).await;
        events.retire("city.noise").await;
        assert!(events.unopened().is_empty());
        assert!(
            !events
                .topic("city.noise")
                .map(drop)
                .expect_err("retired")
                .is_transient()
        );
        events.close_all().await;
    }
}
