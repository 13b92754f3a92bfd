//! Who may publish: the producer a secret (an MQTT password, an HTTP bearer token) names,
//! and whether it may publish to a topic. The node decides by its data policy
//! ([`Publishers`], implemented outside this crate); [`Gate::Token`] is one shared token
//! that may publish anywhere (tests, and nodes embedding the crate without policies).

use std::net::IpAddr;
use std::sync::Arc;

/// The node's producers and their rights.
pub trait Publishers: Send + Sync {
    /// The producer `secret` belongs to, or `None`.
    fn authenticate(&self, secret: &str) -> Option<Arc<dyn Producer>>;
}

/// One authenticated producer.
pub trait Producer: Send + Sync {
    /// How logs name it.
    fn name(&self) -> String;
    /// May it publish to `topic` (a declared topic's name) from `address`?
    fn admit(&self, topic: &str, address: Option<IpAddr>) -> Admission;
}

/// A producer's answer.
pub enum Admission {
    Allowed,
    Denied(String),
    /// Decided once this has run on a blocking thread (it writes an audit entry and may
    /// wait for a disk sync): `Ok` allows, `Err` refuses with the reason.
    Blocking(Box<dyn FnOnce() -> Result<(), String> + Send>),
}

impl Admission {
    /// Resolve the answer, running a blocking one off the async threads.
    pub async fn resolve(self) -> Result<(), String> {
        match self {
            Admission::Allowed => Ok(()),
            Admission::Denied(why) => Err(why),
            Admission::Blocking(work) => tokio::task::spawn_blocking(work)
                .await
                .map_err(|e| format!("the admission task failed: {e}"))?,
        }
    }
}

/// How producers are let in.
#[derive(Clone)]
pub enum Gate {
    /// One secret, allowed to publish to every topic.
    Token(String),
    Publishers(Arc<dyn Publishers>),
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gate::Token(_) => f.write_str("Gate::Token(..)"),
            Gate::Publishers(_) => f.write_str("Gate::Publishers(..)"),
        }
    }
}

struct TokenHolder;

impl Producer for TokenHolder {
    fn name(&self) -> String {
        "the ingest token".into()
    }

    fn admit(&self, _: &str, _: Option<IpAddr>) -> Admission {
        Admission::Allowed
    }
}

impl Gate {
    pub fn authenticate(&self, secret: &str) -> Option<Arc<dyn Producer>> {
        match self {
            Gate::Token(token) => crate::token_matches(token, secret)
                .then(|| Arc::new(TokenHolder) as Arc<dyn Producer>),
            Gate::Publishers(publishers) => publishers.authenticate(secret),
        }
    }
}
