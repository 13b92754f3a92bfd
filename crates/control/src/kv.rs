//! An app's key-value buckets, as one of its components reaches them
//! (`runtime::keyvalue`): the buckets its manifest declares, with their limits, stored in
//! the node's store, each call decided by the data policy ([`KvGuard`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use runtime::keyvalue::KvFailure;
use store::engine::KvLimits;

use crate::data::{KvGuard, KvRefusal};
use crate::manifest::KvManifest;

pub struct AppKv {
    store: Arc<store::Store>,
    app: String,
    buckets: BTreeMap<String, KvLimits>,
    guard: KvGuard,
}

fn other(error: impl std::fmt::Display) -> KvFailure {
    KvFailure::Other(error.to_string())
}

impl AppKv {
    pub fn new(
        store: Arc<store::Store>,
        app: &str,
        declared: &BTreeMap<String, KvManifest>,
        guard: KvGuard,
    ) -> AppKv {
        let buckets = declared
            .iter()
            .map(|(name, kv)| {
                (
                    name.clone(),
                    KvLimits {
                        key_bytes_max: kv.key_bytes_max as usize,
                        value_bytes_max: kv.value_bytes_max as usize,
                        total_bytes_max: kv.total_bytes_max,
                    },
                )
            })
            .collect();
        AppKv {
            store,
            app: app.to_string(),
            buckets,
            guard,
        }
    }

    /// The bucket's limits, once the call is allowed (and recorded, for personal data).
    fn allow(&self, bucket: &str, write: bool, key: Option<&str>) -> Result<KvLimits, KvFailure> {
        let limits = self
            .buckets
            .get(bucket)
            .copied()
            .ok_or(KvFailure::NoSuchStore)?;
        match self.guard.check(bucket, write, key) {
            Ok(()) => Ok(limits),
            Err(KvRefusal::Denied(why)) => {
                tracing::info!(app = %self.app, bucket, write, %why, "key-value call denied");
                Err(KvFailure::AccessDenied)
            }
            Err(KvRefusal::Unrecorded(why)) => Err(KvFailure::Other(why)),
        }
    }
}

impl runtime::keyvalue::KeyValue for AppKv {
    fn open(&self, bucket: &str) -> Result<(), KvFailure> {
        if !self.buckets.contains_key(bucket) {
            return Err(KvFailure::NoSuchStore);
        }
        if self.guard.may_open(bucket) {
            Ok(())
        } else {
            // Recorded as the denial of a read.
            self.allow(bucket, false, None).map(drop)
        }
    }

    fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvFailure> {
        self.allow(bucket, false, Some(key))?;
        self.store.kv_get(&self.app, bucket, key).map_err(other)
    }

    fn exists(&self, bucket: &str, key: &str) -> Result<bool, KvFailure> {
        self.allow(bucket, false, Some(key))?;
        self.store.kv_exists(&self.app, bucket, key).map_err(other)
    }

    fn set_many(&self, bucket: &str, entries: Vec<(String, Vec<u8>)>) -> Result<(), KvFailure> {
        let limits = self.allow(bucket, true, entries.first().map(|(k, _)| k.as_str()))?;
        self.store
            .kv_set_many(&self.app, bucket, &entries, limits)
            .map_err(other)
    }

    fn delete_many(&self, bucket: &str, keys: Vec<String>) -> Result<(), KvFailure> {
        self.allow(bucket, true, keys.first().map(String::as_str))?;
        self.store
            .kv_delete_many(&self.app, bucket, &keys)
            .map_err(other)
    }

    fn list(
        &self,
        bucket: &str,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), KvFailure> {
        self.allow(bucket, false, None)?;
        self.store.kv_list(&self.app, bucket, cursor).map_err(other)
    }

    fn increment(&self, bucket: &str, key: &str, delta: u64) -> Result<u64, KvFailure> {
        let limits = self.allow(bucket, true, Some(key))?;
        self.store
            .kv_increment(&self.app, bucket, key, delta, limits)
            .map_err(other)
    }
}
