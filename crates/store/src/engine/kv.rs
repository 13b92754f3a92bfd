//! Key-value storage for services (`wasi:keyvalue`): buckets that an app declares, kept in
//! the store's metadata database, each write one transaction, durable before it returns.
//!
//! Values are encrypted (AES-256-GCM) with the store's key-value data key, wrapped by the
//! master key like every other data key, and bound to their app, bucket and key (a value
//! moved under another key does not open). Keys are kept in plaintext, as object names are:
//! they order the listings.

use super::*;

const KV: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("kv");
/// Bytes used per (app, bucket): keys and values.
const KV_USAGE: TableDefinition<(&str, &str), u64> = TableDefinition::new("kv_usage");
const KV_KEY: TableDefinition<&str, &[u8]> = TableDefinition::new("kv_key");
/// The context the key-value data key is wrapped under.
const KV_KEY_CONTEXT: &[u8] = b"maru key-value data key";
/// Keys a `list-keys` page holds at most.
pub const KV_PAGE: usize = 1000;

/// A bucket's limits, from its app's manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLimits {
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    pub total_bytes_max: u64,
}

/// Why a key-value call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("the key is {len} bytes; this bucket's keys are at most {max}")]
    KeyTooLong { len: usize, max: usize },
    #[error("the value is {len} bytes; this bucket's values are at most {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("the bucket would hold {would} bytes; it may hold {max}")]
    BucketFull { would: u64, max: u64 },
    #[error("the value under `{0}` is not a decimal number, so it cannot be incremented")]
    NotANumber(String),
    #[error("{0}")]
    Store(String),
}

impl From<StoreError> for KvError {
    fn from(error: StoreError) -> Self {
        KvError::Store(error.to_string())
    }
}

fn kv_db(error: impl Into<redb::Error>) -> KvError {
    KvError::Store(error.into().to_string())
}

fn context(app: &str, bucket: &str, key: &str) -> Vec<u8> {
    format!("{app}\0{bucket}\0{key}").into_bytes()
}

impl Store {
    /// The key-value data key, made on first use (a rotation re-wraps it; the key itself
    /// never changes, so it is kept once read).
    fn kv_key(&self) -> Result<Key, StoreError> {
        let mut cached = self.kv_key.lock().expect("the key lock is never poisoned");
        if let Some(key) = cached.as_ref() {
            return Ok(key.clone());
        }
        let txn = self.db.begin_write().map_err(db_error)?;
        let key = {
            let mut table = txn.open_table(KV_KEY).map_err(db_error)?;
            let stored = table
                .get("key")
                .map_err(db_error)?
                .map(|v| decode::<WrappedKey>(v.value()));
            match stored {
                Some(wrapped) => {
                    let wrapped = wrapped.map_err(StoreError::Metadata)?;
                    wrapped.unwrap(&self.masters(), KV_KEY_CONTEXT)?
                }
                None => {
                    let key = Key::generate()?;
                    let wrapped = WrappedKey::wrap(&key, &self.masters(), KV_KEY_CONTEXT)?;
                    table
                        .insert("key", encode(&wrapped).as_slice())
                        .map_err(db_error)?;
                    key
                }
            }
        };
        txn.commit().map_err(db_error)?;
        *cached = Some(key.clone());
        Ok(key)
    }

    fn kv_open(
        &self,
        app: &str,
        bucket: &str,
        key: &str,
        sealed: &[u8],
    ) -> Result<Vec<u8>, KvError> {
        let data = self.kv_key()?;
        data.open(&context(app, bucket, key), sealed).map_err(|_| {
            KvError::Store(format!(
                "the value under `{key}` in bucket `{bucket}` does not decrypt: it was changed on disk"
            ))
        })
    }

    pub fn kv_get(&self, app: &str, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let sealed = {
            let txn = self.db.begin_read().map_err(kv_db)?;
            let table = match txn.open_table(KV) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(kv_db(e)),
            };
            table
                .get((app, bucket, key))
                .map_err(kv_db)?
                .map(|v| v.value().to_vec())
        };
        sealed
            .map(|sealed| self.kv_open(app, bucket, key, &sealed))
            .transpose()
    }

    pub fn kv_exists(&self, app: &str, bucket: &str, key: &str) -> Result<bool, KvError> {
        let txn = self.db.begin_read().map_err(kv_db)?;
        let table = match txn.open_table(KV) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(kv_db(e)),
        };
        Ok(table.get((app, bucket, key)).map_err(kv_db)?.is_some())
    }

    /// Set several keys in one transaction: all are stored or none.
    pub fn kv_set_many(
        &self,
        app: &str,
        bucket: &str,
        entries: &[(String, Vec<u8>)],
        limits: KvLimits,
    ) -> Result<(), KvError> {
        for (key, value) in entries {
            if key.len() > limits.key_bytes_max {
                return Err(KvError::KeyTooLong {
                    len: key.len(),
                    max: limits.key_bytes_max,
                });
            }
            if value.len() > limits.value_bytes_max {
                return Err(KvError::ValueTooLarge {
                    len: value.len(),
                    max: limits.value_bytes_max,
                });
            }
        }
        let data = self.kv_key()?;
        let sealed: Vec<Vec<u8>> = entries
            .iter()
            .map(|(key, value)| data.seal(&context(app, bucket, key), value))
            .collect::<Result<_, _>>()
            .map_err(|e| KvError::Store(e.to_string()))?;
        let txn = self.db.begin_write().map_err(kv_db)?;
        {
            let mut table = txn.open_table(KV).map_err(kv_db)?;
            let mut usage = txn.open_table(KV_USAGE).map_err(kv_db)?;
            let mut used = usage
                .get((app, bucket))
                .map_err(kv_db)?
                .map(|v| v.value())
                .unwrap_or(0);
            for ((key, _), sealed) in entries.iter().zip(&sealed) {
                let old = table
                    .insert((app, bucket, key.as_str()), sealed.as_slice())
                    .map_err(kv_db)?
                    .map(|v| v.value().len() as u64);
                if let Some(old) = old {
                    used = used.saturating_sub(key.len() as u64 + old);
                }
                used += (key.len() + sealed.len()) as u64;
            }
            if used > limits.total_bytes_max {
                // Dropping the transaction uncommitted undoes every insert.
                return Err(KvError::BucketFull {
                    would: used,
                    max: limits.total_bytes_max,
                });
            }
            usage.insert((app, bucket), used).map_err(kv_db)?;
        }
        txn.commit().map_err(kv_db)
    }

    pub fn kv_set(
        &self,
        app: &str,
        bucket: &str,
        key: &str,
        value: Vec<u8>,
        limits: KvLimits,
    ) -> Result<(), KvError> {
        self.kv_set_many(app, bucket, &[(key.to_string(), value)], limits)
    }

    /// Delete keys in one transaction; missing keys are not an error.
    pub fn kv_delete_many(&self, app: &str, bucket: &str, keys: &[String]) -> Result<(), KvError> {
        let txn = self.db.begin_write().map_err(kv_db)?;
        {
            let mut table = txn.open_table(KV).map_err(kv_db)?;
            let mut usage = txn.open_table(KV_USAGE).map_err(kv_db)?;
            let mut used = usage
                .get((app, bucket))
                .map_err(kv_db)?
                .map(|v| v.value())
                .unwrap_or(0);
            for key in keys {
                if let Some(old) = table.remove((app, bucket, key.as_str())).map_err(kv_db)? {
                    used = used.saturating_sub(key.len() as u64 + old.value().len() as u64);
                }
            }
            usage.insert((app, bucket), used).map_err(kv_db)?;
        }
        txn.commit().map_err(kv_db)
    }

    /// Keys in order, a page at a time: `cursor` is how many keys earlier pages held.
    pub fn kv_list(
        &self,
        app: &str,
        bucket: &str,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), KvError> {
        let txn = self.db.begin_read().map_err(kv_db)?;
        let table = match txn.open_table(KV) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), None)),
            Err(e) => return Err(kv_db(e)),
        };
        let skip = cursor.unwrap_or(0) as usize;
        let mut keys = Vec::new();
        let mut more = false;
        for (index, entry) in table.range((app, bucket, "")..).map_err(kv_db)?.enumerate() {
            let (k, _) = entry.map_err(kv_db)?;
            let (a, b, key) = k.value();
            if a != app || b != bucket {
                break;
            }
            if index < skip {
                continue;
            }
            if keys.len() == KV_PAGE {
                more = true;
                break;
            }
            keys.push(key.to_string());
        }
        let next = more.then(|| (skip + keys.len()) as u64);
        Ok((keys, next))
    }

    /// Add `delta` to the decimal number stored under `key` (0 if absent), atomically.
    pub fn kv_increment(
        &self,
        app: &str,
        bucket: &str,
        key: &str,
        delta: u64,
        limits: KvLimits,
    ) -> Result<u64, KvError> {
        if key.len() > limits.key_bytes_max {
            return Err(KvError::KeyTooLong {
                len: key.len(),
                max: limits.key_bytes_max,
            });
        }
        let data = self.kv_key()?;
        let txn = self.db.begin_write().map_err(kv_db)?;
        let value = {
            let mut table = txn.open_table(KV).map_err(kv_db)?;
            let mut usage = txn.open_table(KV_USAGE).map_err(kv_db)?;
            let old = table
                .get((app, bucket, key))
                .map_err(kv_db)?
                .map(|v| v.value().to_vec());
            let (current, old_len) = match &old {
                Some(sealed) => {
                    let plain = data.open(&context(app, bucket, key), sealed).map_err(|_| {
                        KvError::Store(format!("the value under `{key}` does not decrypt"))
                    })?;
                    let text = String::from_utf8(plain)
                        .map_err(|_| KvError::NotANumber(key.to_string()))?;
                    let number: u64 = text
                        .trim()
                        .parse()
                        .map_err(|_| KvError::NotANumber(key.to_string()))?;
                    (number, sealed.len() as u64 + key.len() as u64)
                }
                None => (0, 0),
            };
            let value = current.wrapping_add(delta);
            let sealed = data
                .seal(&context(app, bucket, key), value.to_string().as_bytes())
                .map_err(|e| KvError::Store(e.to_string()))?;
            table
                .insert((app, bucket, key), sealed.as_slice())
                .map_err(kv_db)?;
            let used = usage
                .get((app, bucket))
                .map_err(kv_db)?
                .map(|v| v.value())
                .unwrap_or(0)
                .saturating_sub(old_len)
                + key.len() as u64
                + sealed.len() as u64;
            if used > limits.total_bytes_max {
                return Err(KvError::BucketFull {
                    would: used,
                    max: limits.total_bytes_max,
                });
            }
            usage.insert((app, bucket), used).map_err(kv_db)?;
            value
        };
        txn.commit().map_err(kv_db)?;
        Ok(value)
    }

    /// Bytes a bucket holds.
    pub fn kv_usage(&self, app: &str, bucket: &str) -> Result<u64, KvError> {
        let txn = self.db.begin_read().map_err(kv_db)?;
        let usage = match txn.open_table(KV_USAGE) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(kv_db(e)),
        };
        Ok(usage
            .get((app, bucket))
            .map_err(kv_db)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Re-wrap the key-value data key under the current master key (a rotation).
    pub(super) fn rewrap_kv_key(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        let count = {
            let mut table = txn.open_table(KV_KEY).map_err(db_error)?;
            let stored = table
                .get("key")
                .map_err(db_error)?
                .map(|v| decode::<WrappedKey>(v.value()));
            match stored {
                Some(wrapped) => {
                    let mut wrapped = wrapped.map_err(StoreError::Metadata)?;
                    let masters = self.masters();
                    let changed = heal::rewrap(&masters, &mut wrapped, KV_KEY_CONTEXT)?;
                    table
                        .insert("key", encode(&wrapped).as_slice())
                        .map_err(db_error)?;
                    changed
                }
                None => 0,
            }
        };
        txn.commit().map_err(db_error)?;
        Ok(count)
    }
}
