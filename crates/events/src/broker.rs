//! The node's topics by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::topic::{Topic, TopicConfig};

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
}

/// Every declared topic. Topics live in `DIR/NAME/`.
pub struct Events {
    dir: PathBuf,
    topics: RwLock<BTreeMap<String, (TopicConfig, Arc<Topic>)>>,
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
        }
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
        if let Some((old_config, topic)) = existing {
            if old_config == config {
                return Ok(topic);
            }
            topic.close().await;
        }
        let dir = self.dir.join(name);
        let topic =
            tokio::task::block_in_place(|| Topic::open(name, &dir, config)).map_err(|message| {
                TopicError::Open {
                    name: name.to_string(),
                    message,
                }
            })?;
        self.topics
            .write()
            .expect("topics lock is never poisoned")
            .insert(name.to_string(), (config, topic.clone()));
        Ok(topic)
    }

    /// Stop accepting events for a topic. Its stored events stay on disk.
    pub async fn retire(&self, name: &str) {
        let removed = self
            .topics
            .write()
            .expect("topics lock is never poisoned")
            .remove(name);
        if let Some((_, topic)) = removed {
            topic.close().await;
        }
    }

    pub fn topic(&self, name: &str) -> Result<Arc<Topic>, TopicError> {
        self.topics
            .read()
            .expect("topics lock is never poisoned")
            .get(name)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| TopicError::Unknown(name.to_string()))
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
        let levels: Vec<&str> = mqtt_topic.split('/').collect();
        let topics = self.topics.read().expect("topics lock is never poisoned");
        for take in (1..=levels.len()).rev() {
            let name = levels[..take].join(".");
            if let Some((_, topic)) = topics.get(&name) {
                return Ok((topic.clone(), levels[take..].join("/")));
            }
        }
        Err(TopicError::Unknown(mqtt_topic.replace('/', ".")))
    }

    /// Close every topic, answering the appends already queued.
    pub async fn close_all(&self) {
        let topics: Vec<_> =
            std::mem::take(&mut *self.topics.write().expect("topics lock is never poisoned"))
                .into_values()
                .collect();
        for (_, topic) in topics {
            topic.close().await;
        }
    }
}
