//! What the metadata database keeps about buckets, objects and uploads.
//!
//! Records are JSON in redb tables. Nothing in them is an object's bytes; what a client
//! chose to say about an object (content type, user metadata) is sealed with a data key of
//! its own, so no plaintext of it reaches the disk either.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crypto::{CryptoError, Key};
use crate::keys::MasterKeys;
use crate::layout::{Geometry, Profile};
use crate::shard::VersionId;

/// A data key as stored: wrapped by one master key generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    pub master: u32,
    /// Hex of the wrapped bytes.
    pub wrapped: String,
}

impl WrappedKey {
    pub fn wrap(
        key: &Key,
        masters: &MasterKeys,
        context: &[u8],
    ) -> Result<WrappedKey, CryptoError> {
        let (master, master_key) = masters.current();
        Ok(WrappedKey {
            master,
            wrapped: hex(&key.wrap(master_key, context)?),
        })
    }

    pub fn unwrap(&self, masters: &MasterKeys, context: &[u8]) -> Result<Key, CryptoError> {
        let master = masters.get(self.master).ok_or(CryptoError::Open)?;
        Key::unwrap(
            master,
            context,
            &unhex(&self.wrapped).ok_or(CryptoError::Open)?,
        )
    }
}

/// One erasure-coded, encrypted run of bytes: a whole object, or one part of a multipart
/// object. Its shard files are named by its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    pub version: String,
    pub size: u64,
    pub data: u8,
    pub parity: u8,
    pub block_bytes: u32,
    /// The volume holding each shard; `None` where the volume was unavailable at write
    /// time (the part is degraded until healed).
    pub volumes: Vec<Option<u64>>,
    pub key: WrappedKey,
    /// Hex MD5 of the part's bytes.
    pub md5: String,
}

impl PartRecord {
    pub fn version(&self) -> VersionId {
        VersionId::parse(&self.version).expect("records hold versions they were given")
    }

    pub fn profile(&self) -> Profile {
        Profile::new(self.data, self.parity).expect("records hold profiles that were checked")
    }

    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.profile(), self.block_bytes as usize)
    }

    /// Check what a record read back claims before it is used.
    pub fn check(&self) -> Result<(), String> {
        let version = VersionId::parse(&self.version).ok_or("a version id is malformed")?;
        let profile = Profile::new(self.data, self.parity).map_err(|e| e.to_string())?;
        if self.volumes.len() != profile.shards() {
            return Err(format!(
                "version {version} names {} volumes for {} shards",
                self.volumes.len(),
                profile.shards()
            ));
        }
        if self.block_bytes < 64 || !self.block_bytes.is_multiple_of(64) {
            return Err(format!(
                "version {version} has a block size of {}",
                self.block_bytes
            ));
        }
        Ok(())
    }
}

/// What a client said about an object, sealed in its record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// Standard headers kept with the object (`content-type`, `cache-control`, ...).
    pub headers: BTreeMap<String, String>,
    /// `x-amz-meta-*` values, by name without the prefix.
    pub user: BTreeMap<String, String>,
}

/// Metadata sealed under a key of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedMeta {
    pub key: WrappedKey,
    /// Hex of the sealed JSON.
    pub sealed: String,
    /// A context of its own, bound to the key and the seal.
    pub context: String,
}

impl SealedMeta {
    pub fn seal(meta: &ObjectMeta, masters: &MasterKeys) -> Result<SealedMeta, CryptoError> {
        let context = VersionId::generate()?.to_string();
        let key = Key::generate()?;
        let json = serde_json::to_vec(meta).expect("metadata is plain data");
        Ok(SealedMeta {
            key: WrappedKey::wrap(&key, masters, context.as_bytes())?,
            sealed: hex(&key.seal(context.as_bytes(), &json)?),
            context,
        })
    }

    pub fn open(&self, masters: &MasterKeys) -> Result<ObjectMeta, CryptoError> {
        let key = self.key.unwrap(masters, self.context.as_bytes())?;
        let json = key.open(
            self.context.as_bytes(),
            &unhex(&self.sealed).ok_or(CryptoError::Open)?,
        )?;
        serde_json::from_slice(&json).map_err(|_| CryptoError::Open)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub parts: Vec<PartRecord>,
    pub size: u64,
    /// As S3 shows it, without quotes: the MD5 of a single-part object, or the MD5 of the
    /// parts' MD5s and `-N` for a multipart one.
    pub etag: String,
    pub modified_ms: u64,
    pub meta: SealedMeta,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRecord {
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    pub bucket: String,
    pub key: String,
    pub created_ms: u64,
    pub meta: SealedMeta,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadPartRecord {
    pub part: PartRecord,
    pub modified_ms: u64,
}

/// Where a garbage version's shards are, to delete them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GarbageRecord {
    pub volumes: Vec<Option<u64>>,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records are plain data")
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// An S3 access key: its secret (sealed: SigV4 needs it back, so it cannot be a hash) and
/// the buckets it may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKeyRecord {
    pub secret: SealedMeta,
    pub buckets: Vec<String>,
    pub created_ms: u64,
    pub description: String,
}
