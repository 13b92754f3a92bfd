//! An app's key-value buckets, as its components reach them (`runtime::keyvalue`): the
//! buckets its manifest declares, with their limits, stored in the node's store.

use std::collections::BTreeMap;
use std::sync::Arc;

use store::engine::KvLimits;

use crate::manifest::KvManifest;

pub struct AppKv {
    store: Arc<store::Store>,
    app: String,
    buckets: BTreeMap<String, KvLimits>,
}

impl AppKv {
    pub fn new(
        store: Arc<store::Store>,
        app: &str,
        declared: &BTreeMap<String, KvManifest>,
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
        }
    }

    fn limits(&self, bucket: &str) -> Result<KvLimits, String> {
        self.buckets
            .get(bucket)
            .copied()
            .ok_or_else(|| format!("app `{}` declares no key-value bucket `{bucket}`", self.app))
    }
}

impl runtime::keyvalue::KeyValue for AppKv {
    fn has_bucket(&self, bucket: &str) -> bool {
        self.buckets.contains_key(bucket)
    }

    fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.limits(bucket)?;
        self.store
            .kv_get(&self.app, bucket, key)
            .map_err(|e| e.to_string())
    }

    fn exists(&self, bucket: &str, key: &str) -> Result<bool, String> {
        self.limits(bucket)?;
        self.store
            .kv_exists(&self.app, bucket, key)
            .map_err(|e| e.to_string())
    }

    fn set_many(&self, bucket: &str, entries: Vec<(String, Vec<u8>)>) -> Result<(), String> {
        let limits = self.limits(bucket)?;
        self.store
            .kv_set_many(&self.app, bucket, &entries, limits)
            .map_err(|e| e.to_string())
    }

    fn delete_many(&self, bucket: &str, keys: Vec<String>) -> Result<(), String> {
        self.limits(bucket)?;
        self.store
            .kv_delete_many(&self.app, bucket, &keys)
            .map_err(|e| e.to_string())
    }

    fn list(
        &self,
        bucket: &str,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), String> {
        self.limits(bucket)?;
        self.store
            .kv_list(&self.app, bucket, cursor)
            .map_err(|e| e.to_string())
    }

    fn increment(&self, bucket: &str, key: &str, delta: u64) -> Result<u64, String> {
        let limits = self.limits(bucket)?;
        self.store
            .kv_increment(&self.app, bucket, key, delta, limits)
            .map_err(|e| e.to_string())
    }
}
