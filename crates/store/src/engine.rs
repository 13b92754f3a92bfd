//! The object store: buckets, objects, multipart uploads, over the node's volumes.
//!
//! Writing an object version: its bytes are cut into stripes, each sealed with a fresh data
//! key and erasure-coded into one block per shard; each shard's blocks go to a new file on
//! its own volume. Only when every shard file is synced (and its directory) does one redb
//! transaction make the version the object's: that commit is the moment an object appears,
//! changes or goes, so a crash or power cut leaves the old object or the new one, whole.
//! A replaced version's files are listed as garbage in the same transaction and deleted
//! after it; files that no record names (a write a crash interrupted) are deleted when the
//! store opens.
//!
//! Reading verifies every block's hash; a block that is missing or damaged is rebuilt from
//! the others (and counted, for the scrub to heal), and a stripe with fewer good blocks than
//! data shards fails the read with a clear error rather than serving anything wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use disk::{Disk, Env};
use md5::{Digest as _, Md5};
use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};

use crate::codec::Codec;
use crate::crypto::{CryptoError, Key};
use crate::keys::{KeysError, MasterKeys};
use crate::layout::{self, Geometry, Profile, TAG_BYTES, VolumeId};
use crate::records::{
    self, AccessKeyRecord, BucketRecord, GarbageRecord, ObjectMeta, ObjectRecord, PartRecord,
    SealedMeta, UploadPartRecord, UploadRecord, WrappedKey, decode, encode,
};
use crate::shard::{self, Header, ShardError, ShardReader, ShardWriter, VersionId};

mod heal;
mod kv;
pub use heal::{Health, Rotation, ScrubState, StoreStatus, VolumeStatus, run_scrub};
pub use kv::{KV_PAGE, KvError, KvLimits};

const BUCKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("buckets");
const OBJECTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("objects");
const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
const UPLOAD_PARTS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("upload_parts");
const GARBAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("garbage");
const ACCESS_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("access_keys");
/// Access keys a store may have, at most.
pub const ACCESS_KEYS_MAX: usize = 10_000;

/// The file in each volume that names it.
const VOLUME_ID_FILE: &str = "volume.id";
/// Blocks of at most this size by default; smaller objects get smaller blocks.
pub const BLOCK_BYTES_MAX: usize = 256 << 10;
/// S3's smallest part, but for the last.
pub const PART_BYTES_MIN: u64 = 5 << 20;
/// S3's part numbers.
pub const PARTS_MAX: u32 = 10_000;

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The store's own directory: the metadata database and the master keys.
    pub dir: PathBuf,
    /// One directory per volume, ideally each on its own disk.
    pub volumes: Vec<PathBuf>,
    /// `None`: [`Profile::for_volumes`].
    pub profile: Option<Profile>,
    pub block_bytes_max: usize,
    /// The smallest part of a multipart upload, but for the last ([`PART_BYTES_MIN`], S3's
    /// rule, unless a test wants smaller).
    pub part_bytes_min: u64,
}

impl StoreConfig {
    /// The store of a node: its directory and volumes, every other setting its default.
    pub fn new(dir: PathBuf, volumes: Vec<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir,
            volumes,
            profile: None,
            block_bytes_max: BLOCK_BYTES_MAX,
            part_bytes_min: PART_BYTES_MIN,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bucket `{0}` does not exist")]
    NoSuchBucket(String),
    #[error("bucket `{0}` already exists")]
    BucketExists(String),
    #[error("bucket `{0}` is not empty")]
    BucketNotEmpty(String),
    #[error(
        "`{0}` is not a valid bucket name (3-63 characters: lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit)"
    )]
    BadBucketName(String),
    #[error("object `{key}` does not exist in bucket `{bucket}`")]
    NoSuchKey { bucket: String, key: String },
    #[error("upload `{0}` does not exist (it was completed or aborted)")]
    NoSuchUpload(String),
    #[error("{0}")]
    InvalidPart(String),
    #[error("the parts are not in ascending order of part number")]
    InvalidPartOrder,
    #[error("part {part} is {size} bytes; every part but the last must be at least {min} bytes")]
    EntityTooSmall { part: u32, size: u64, min: u64 },
    #[error("the body ended after {got} of the {expected} bytes its length announced")]
    IncompleteBody { got: u64, expected: u64 },
    #[error("the body is longer than the {expected} bytes its length announced")]
    BodyTooLong { expected: u64 },
    #[error("the range starts at byte {start}, past the object's {size} bytes")]
    InvalidRange { start: u64, size: u64 },
    #[error("only {online} of the {needed} volumes a write needs are available ({reasons})")]
    NotEnoughVolumes {
        online: usize,
        needed: usize,
        reasons: String,
    },
    #[error(
        "object `{key}` in bucket `{bucket}` cannot be read: stripe {stripe} has {good} good shards and needs {needed} (more volumes were lost than its profile survives)"
    )]
    DataLost {
        bucket: String,
        key: String,
        stripe: u64,
        good: usize,
        needed: usize,
    },
    #[error("the store's volumes are full: {0}")]
    Full(String),
    #[error("{0}")]
    BadAccessKey(String),
    #[error("store I/O: {0}")]
    Io(String),
    #[error("store metadata: {0}")]
    Metadata(String),
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error("encryption: {0}")]
    Crypto(#[from] CryptoError),
}

fn db_error(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Metadata(error.into().to_string())
}

fn io_error(error: disk::Error) -> StoreError {
    if error.is_full() {
        StoreError::Full(error.to_string())
    } else {
        StoreError::Io(error.to_string())
    }
}

fn shard_error(error: ShardError) -> StoreError {
    match &error {
        ShardError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
            StoreError::Full(error.to_string())
        }
        _ => StoreError::Io(error.to_string()),
    }
}

/// A bucket name S3 clients accept with either addressing style.
pub fn check_bucket_name(name: &str) -> Result<(), StoreError> {
    let bytes = name.as_bytes();
    let valid = (3..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.')
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && !name.contains("..")
        && name.parse::<std::net::Ipv4Addr>().is_err();
    if valid {
        Ok(())
    } else {
        Err(StoreError::BadBucketName(name.chars().take(80).collect()))
    }
}

struct Volume {
    root: PathBuf,
    id: Option<VolumeId>,
    /// Why the volume cannot be used, if it cannot.
    problem: Option<String>,
}

/// What the store has done since it opened, for `maru store status`.
#[derive(Debug, Default)]
pub struct Counters {
    pub bytes_written: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Blocks found missing or damaged by reads and scrubs.
    pub blocks_bad: AtomicU64,
    /// Blocks rewritten by heals.
    pub blocks_healed: AtomicU64,
}

pub struct Store {
    env: Env,
    volumes: Vec<Volume>,
    profile: Profile,
    block_bytes_max: usize,
    part_bytes_min: u64,
    db: redb::Database,
    masters: RwLock<MasterKeys>,
    pub counters: Counters,
    /// Degraded versions seen by reads, for the scrub to heal first.
    suspects: Mutex<BTreeSet<(String, String)>>,
    scrub: Mutex<ScrubState>,
    /// The key-value data key, once read.
    kv_key: Mutex<Option<Key>>,
}

/// What a listing or a read shows of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub modified_ms: u64,
    pub parts: usize,
}

impl ObjectInfo {
    fn of(key: &str, record: &ObjectRecord) -> ObjectInfo {
        ObjectInfo {
            key: key.to_string(),
            size: record.size,
            etag: record.etag.clone(),
            modified_ms: record.modified_ms,
            parts: record.parts.len(),
        }
    }
}

/// A page of a bucket's listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub objects: Vec<ObjectInfo>,
    pub common_prefixes: Vec<String>,
    /// The last key or prefix this page covers, when there is more.
    pub next: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadInfo {
    pub upload_id: String,
    pub bucket: String,
    pub key: String,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartInfo {
    pub number: u32,
    pub size: u64,
    pub etag: String,
    pub modified_ms: u64,
}

impl Store {
    /// Open the store (creating it on first use): its directory, volumes, metadata and
    /// keys; then delete what interrupted writes left and finish deleting garbage.
    pub fn open(env: Env, config: StoreConfig) -> Result<Store, StoreError> {
        let disk = env.disk.as_ref();
        disk::create_dir_all(disk, &config.dir).map_err(io_error)?;
        if config.volumes.is_empty() {
            return Err(StoreError::NotEnoughVolumes {
                online: 0,
                needed: 1,
                reasons: "no volume is configured".into(),
            });
        }
        let profile = config
            .profile
            .unwrap_or_else(|| Profile::for_volumes(config.volumes.len()));
        profile
            .check_fits(config.volumes.len())
            .map_err(|e| StoreError::NotEnoughVolumes {
                online: config.volumes.len(),
                needed: profile.shards(),
                reasons: e.to_string(),
            })?;
        let volumes: Vec<Volume> = config
            .volumes
            .iter()
            .map(|root| open_volume(disk, root))
            .collect();
        let masters = MasterKeys::open(disk, &config.dir)?;
        let db = disk::database::open(disk, &config.dir.join("meta.redb"))
            .map_err(|e| StoreError::Metadata(e.to_string()))?;
        let txn = db.begin_write().map_err(db_error)?;
        for table in [BUCKETS, UPLOADS, GARBAGE, ACCESS_KEYS] {
            txn.open_table(table).map_err(db_error)?;
        }
        txn.open_table(OBJECTS).map_err(db_error)?;
        txn.open_table(UPLOAD_PARTS).map_err(db_error)?;
        txn.commit().map_err(db_error)?;
        let store = Store {
            env,
            volumes,
            profile,
            block_bytes_max: config.block_bytes_max.max(64) / 64 * 64,
            part_bytes_min: config.part_bytes_min,
            db,
            masters: RwLock::new(masters),
            counters: Counters::default(),
            suspects: Mutex::new(BTreeSet::new()),
            scrub: Mutex::new(ScrubState::default()),
            kv_key: Mutex::new(None),
        };
        store.collect_garbage()?;
        store.delete_unreferenced()?;
        Ok(store)
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    fn now_ms(&self) -> u64 {
        self.env.clock.now_ms()
    }

    fn disk(&self) -> &dyn Disk {
        self.env.disk.as_ref()
    }

    fn masters(&self) -> std::sync::RwLockReadGuard<'_, MasterKeys> {
        self.masters
            .read()
            .expect("the keys lock is never poisoned")
    }

    fn volume_by_id(&self, id: u64) -> Option<&Volume> {
        self.volumes
            .iter()
            .find(|v| v.id == Some(VolumeId(id)) && v.problem.is_none())
    }

    // ---- buckets ----

    pub fn create_bucket(&self, name: &str) -> Result<(), StoreError> {
        check_bucket_name(name)?;
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut buckets = txn.open_table(BUCKETS).map_err(db_error)?;
            if buckets.get(name).map_err(db_error)?.is_some() {
                return Err(StoreError::BucketExists(name.to_string()));
            }
            let record = BucketRecord {
                created_ms: self.now_ms(),
            };
            buckets
                .insert(name, encode(&record).as_slice())
                .map_err(db_error)?;
        }
        txn.commit().map_err(db_error)
    }

    pub fn bucket(&self, name: &str) -> Result<BucketRecord, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let buckets = txn.open_table(BUCKETS).map_err(db_error)?;
        let record = buckets
            .get(name)
            .map_err(db_error)?
            .ok_or_else(|| StoreError::NoSuchBucket(name.to_string()))?;
        decode(record.value()).map_err(StoreError::Metadata)
    }

    pub fn buckets(&self) -> Result<Vec<(String, BucketRecord)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let buckets = txn.open_table(BUCKETS).map_err(db_error)?;
        let mut out = Vec::new();
        for entry in buckets.iter().map_err(db_error)? {
            let (name, record) = entry.map_err(db_error)?;
            out.push((
                name.value().to_string(),
                decode(record.value()).map_err(StoreError::Metadata)?,
            ));
        }
        Ok(out)
    }

    /// Delete an empty bucket (no objects and no uploads in progress).
    pub fn delete_bucket(&self, name: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let objects = txn.open_table(OBJECTS).map_err(db_error)?;
            if objects
                .range((name, "")..)
                .map_err(db_error)?
                .next()
                .transpose()
                .map_err(db_error)?
                .is_some_and(|(k, _)| k.value().0 == name)
            {
                return Err(StoreError::BucketNotEmpty(name.to_string()));
            }
            let uploads = txn.open_table(UPLOADS).map_err(db_error)?;
            for entry in uploads.iter().map_err(db_error)? {
                let (_, record) = entry.map_err(db_error)?;
                let upload: UploadRecord = decode(record.value()).map_err(StoreError::Metadata)?;
                if upload.bucket == name {
                    return Err(StoreError::BucketNotEmpty(name.to_string()));
                }
            }
            let mut buckets = txn.open_table(BUCKETS).map_err(db_error)?;
            if buckets.remove(name).map_err(db_error)?.is_none() {
                return Err(StoreError::NoSuchBucket(name.to_string()));
            }
        }
        txn.commit().map_err(db_error)
    }

    // ---- objects ----

    /// Start writing a new version of `bucket/key` of exactly `size` bytes. Nothing is
    /// visible until [`ObjectWriter::finish`].
    pub fn put(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        size: u64,
        meta: ObjectMeta,
    ) -> Result<ObjectWriter, StoreError> {
        self.bucket(bucket)?;
        let part = PartWriter::new(self.clone(), size)?;
        Ok(ObjectWriter {
            part,
            bucket: bucket.to_string(),
            key: key.to_string(),
            meta,
        })
    }

    fn record(&self, bucket: &str, key: &str) -> Result<ObjectRecord, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let objects = txn.open_table(OBJECTS).map_err(db_error)?;
        let record = match objects.get((bucket, key)).map_err(db_error)? {
            Some(record) => decode::<ObjectRecord>(record.value()).map_err(StoreError::Metadata)?,
            None => {
                drop(objects);
                let buckets = txn.open_table(BUCKETS).map_err(db_error)?;
                if buckets.get(bucket).map_err(db_error)?.is_none() {
                    return Err(StoreError::NoSuchBucket(bucket.to_string()));
                }
                return Err(StoreError::NoSuchKey {
                    bucket: bucket.to_string(),
                    key: key.to_string(),
                });
            }
        };
        for part in &record.parts {
            part.check().map_err(StoreError::Metadata)?;
        }
        Ok(record)
    }

    /// An object's information and metadata.
    pub fn head(&self, bucket: &str, key: &str) -> Result<(ObjectInfo, ObjectMeta), StoreError> {
        let record = self.record(bucket, key)?;
        let meta = record.meta.open(&self.masters())?;
        Ok((ObjectInfo::of(key, &record), meta))
    }

    /// Read bytes `range` (inclusive; all of it if `None`) of an object.
    pub fn get(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> Result<(ObjectInfo, ObjectMeta, ObjectReader), StoreError> {
        let record = self.record(bucket, key)?;
        let meta = record.meta.open(&self.masters())?;
        let info = ObjectInfo::of(key, &record);
        let (first, last) = match range {
            Some((first, last)) => {
                if first >= record.size {
                    return Err(StoreError::InvalidRange {
                        start: first,
                        size: record.size,
                    });
                }
                (first, last.min(record.size - 1))
            }
            None => (0, record.size.saturating_sub(1)),
        };
        let reader = ObjectReader {
            store: self.clone(),
            bucket: bucket.to_string(),
            key: key.to_string(),
            parts: record.parts,
            next: first,
            end: if record.size == 0 { 0 } else { last + 1 },
            open: None,
        };
        Ok((info, meta, reader))
    }

    /// Delete an object; deleting one that does not exist succeeds (as in S3).
    pub fn delete(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        self.bucket(bucket)?;
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut objects = txn.open_table(OBJECTS).map_err(db_error)?;
            let old = objects
                .remove((bucket, key))
                .map_err(db_error)?
                .map(|r| decode::<ObjectRecord>(r.value()));
            if let Some(old) = old {
                let old = old.map_err(StoreError::Metadata)?;
                let mut garbage = txn.open_table(GARBAGE).map_err(db_error)?;
                for part in &old.parts {
                    add_garbage(&mut garbage, part)?;
                }
            }
        }
        txn.commit().map_err(db_error)?;
        self.collect_garbage()
    }

    /// List `bucket`'s objects whose keys start with `prefix`, after `after`, grouping keys
    /// that contain `delimiter` after the prefix into common prefixes; at most `max` entries.
    pub fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        after: Option<&str>,
        max: usize,
    ) -> Result<Listing, StoreError> {
        self.bucket(bucket)?;
        let txn = self.db.begin_read().map_err(db_error)?;
        let objects = txn.open_table(OBJECTS).map_err(db_error)?;
        let start = match after {
            Some(after) if after >= prefix => after,
            _ => prefix,
        };
        let mut listing = Listing::default();
        let mut last_prefix: Option<String> = None;
        let mut count = 0;
        for entry in objects.range((bucket, start)..).map_err(db_error)? {
            let (k, record) = entry.map_err(db_error)?;
            let (b, key) = k.value();
            if b != bucket || !key.starts_with(prefix) {
                break;
            }
            if Some(key) == after {
                continue;
            }
            if let Some(delimiter) = delimiter.filter(|d| !d.is_empty())
                && let Some(at) = key[prefix.len()..].find(delimiter)
            {
                let common = &key[..prefix.len() + at + delimiter.len()];
                if last_prefix.as_deref() == Some(common)
                    || after.is_some_and(|a| a.starts_with(common))
                {
                    continue;
                }
                if count == max {
                    listing.next = last_key(&listing);
                    return Ok(listing);
                }
                last_prefix = Some(common.to_string());
                listing.common_prefixes.push(common.to_string());
                count += 1;
                continue;
            }
            if count == max {
                listing.next = last_key(&listing);
                return Ok(listing);
            }
            let record: ObjectRecord = decode(record.value()).map_err(StoreError::Metadata)?;
            listing.objects.push(ObjectInfo::of(key, &record));
            count += 1;
        }
        Ok(listing)
    }

    // ---- multipart ----

    pub fn create_upload(
        &self,
        bucket: &str,
        key: &str,
        meta: ObjectMeta,
    ) -> Result<String, StoreError> {
        self.bucket(bucket)?;
        let id = VersionId::generate()?.to_string();
        let record = UploadRecord {
            bucket: bucket.to_string(),
            key: key.to_string(),
            created_ms: self.now_ms(),
            meta: SealedMeta::seal(&meta, &self.masters())?,
        };
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut uploads = txn.open_table(UPLOADS).map_err(db_error)?;
            uploads
                .insert(id.as_str(), encode(&record).as_slice())
                .map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        Ok(id)
    }

    fn upload(&self, upload_id: &str) -> Result<UploadRecord, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let uploads = txn.open_table(UPLOADS).map_err(db_error)?;
        let record = uploads
            .get(upload_id)
            .map_err(db_error)?
            .ok_or_else(|| StoreError::NoSuchUpload(upload_id.chars().take(80).collect()))?;
        decode(record.value()).map_err(StoreError::Metadata)
    }

    /// Start writing part `number` of an upload.
    pub fn put_part(
        self: &Arc<Self>,
        upload_id: &str,
        number: u32,
        size: u64,
    ) -> Result<UploadPartWriter, StoreError> {
        if !(1..=PARTS_MAX).contains(&number) {
            return Err(StoreError::InvalidPart(format!(
                "part number {number} is outside 1-{PARTS_MAX}"
            )));
        }
        self.upload(upload_id)?;
        Ok(UploadPartWriter {
            part: PartWriter::new(self.clone(), size)?,
            upload_id: upload_id.to_string(),
            number,
        })
    }

    pub fn parts(&self, upload_id: &str) -> Result<(UploadInfo, Vec<PartInfo>), StoreError> {
        let upload = self.upload(upload_id)?;
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(UPLOAD_PARTS).map_err(db_error)?;
        let mut parts = Vec::new();
        for entry in table
            .range((upload_id, 0)..=(upload_id, u32::MAX))
            .map_err(db_error)?
        {
            let (k, record) = entry.map_err(db_error)?;
            let record: UploadPartRecord = decode(record.value()).map_err(StoreError::Metadata)?;
            parts.push(PartInfo {
                number: k.value().1,
                size: record.part.size,
                etag: record.part.md5.clone(),
                modified_ms: record.modified_ms,
            });
        }
        Ok((
            UploadInfo {
                upload_id: upload_id.to_string(),
                bucket: upload.bucket,
                key: upload.key,
                created_ms: upload.created_ms,
            },
            parts,
        ))
    }

    pub fn uploads(&self, bucket: &str) -> Result<Vec<UploadInfo>, StoreError> {
        self.bucket(bucket)?;
        let txn = self.db.begin_read().map_err(db_error)?;
        let uploads = txn.open_table(UPLOADS).map_err(db_error)?;
        let mut out = Vec::new();
        for entry in uploads.iter().map_err(db_error)? {
            let (id, record) = entry.map_err(db_error)?;
            let record: UploadRecord = decode(record.value()).map_err(StoreError::Metadata)?;
            if record.bucket == bucket {
                out.push(UploadInfo {
                    upload_id: id.value().to_string(),
                    bucket: record.bucket,
                    key: record.key,
                    created_ms: record.created_ms,
                });
            }
        }
        out.sort_by(|a, b| (&a.key, a.created_ms).cmp(&(&b.key, b.created_ms)));
        Ok(out)
    }

    /// Make the listed parts (number and ETag, ascending) the object, atomically; parts
    /// not listed are discarded.
    pub fn complete_upload(
        &self,
        upload_id: &str,
        listed: &[(u32, String)],
    ) -> Result<ObjectInfo, StoreError> {
        if listed.is_empty() {
            return Err(StoreError::InvalidPart("the list of parts is empty".into()));
        }
        if listed.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(StoreError::InvalidPartOrder);
        }
        let txn = self.db.begin_write().map_err(db_error)?;
        let info = {
            let mut uploads = txn.open_table(UPLOADS).map_err(db_error)?;
            let upload: UploadRecord = match uploads.get(upload_id).map_err(db_error)? {
                Some(r) => decode(r.value()).map_err(StoreError::Metadata)?,
                None => {
                    return Err(StoreError::NoSuchUpload(
                        upload_id.chars().take(80).collect(),
                    ));
                }
            };
            let mut table = txn.open_table(UPLOAD_PARTS).map_err(db_error)?;
            let mut stored = BTreeMap::new();
            for entry in table
                .range((upload_id, 0)..=(upload_id, u32::MAX))
                .map_err(db_error)?
            {
                let (k, record) = entry.map_err(db_error)?;
                let record: UploadPartRecord =
                    decode(record.value()).map_err(StoreError::Metadata)?;
                stored.insert(k.value().1, record.part);
            }
            let mut parts = Vec::new();
            let mut md5s = Md5::new();
            for (index, (number, etag)) in listed.iter().enumerate() {
                let part = stored.remove(number).ok_or_else(|| {
                    StoreError::InvalidPart(format!("part {number} was not uploaded"))
                })?;
                if etag.trim_matches('"') != part.md5 {
                    return Err(StoreError::InvalidPart(format!(
                        "part {number}'s ETag is {}, not {etag}",
                        part.md5
                    )));
                }
                if index + 1 < listed.len() && part.size < self.part_bytes_min {
                    return Err(StoreError::EntityTooSmall {
                        part: *number,
                        size: part.size,
                        min: self.part_bytes_min,
                    });
                }
                md5s.update(records::unhex(&part.md5).unwrap_or_default());
                parts.push(part);
            }
            let record = ObjectRecord {
                size: parts.iter().map(|p| p.size).sum(),
                etag: format!("{}-{}", records::hex(&md5s.finalize()), parts.len()),
                modified_ms: self.now_ms(),
                meta: upload.meta.clone(),
                parts,
            };
            let mut garbage = txn.open_table(GARBAGE).map_err(db_error)?;
            for unlisted in stored.values() {
                add_garbage(&mut garbage, unlisted)?;
            }
            table
                .retain_in((upload_id, 0)..=(upload_id, u32::MAX), |_, _| false)
                .map_err(db_error)?;
            uploads.remove(upload_id).map_err(db_error)?;
            let mut objects = txn.open_table(OBJECTS).map_err(db_error)?;
            let key = (upload.bucket.as_str(), upload.key.as_str());
            if let Some(old) = objects
                .insert(key, encode(&record).as_slice())
                .map_err(db_error)?
            {
                let old: ObjectRecord = decode(old.value()).map_err(StoreError::Metadata)?;
                for part in &old.parts {
                    add_garbage(&mut garbage, part)?;
                }
            }
            ObjectInfo::of(&upload.key, &record)
        };
        txn.commit().map_err(db_error)?;
        self.collect_garbage()?;
        Ok(info)
    }

    pub fn abort_upload(&self, upload_id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut uploads = txn.open_table(UPLOADS).map_err(db_error)?;
            if uploads.remove(upload_id).map_err(db_error)?.is_none() {
                return Err(StoreError::NoSuchUpload(
                    upload_id.chars().take(80).collect(),
                ));
            }
            let mut table = txn.open_table(UPLOAD_PARTS).map_err(db_error)?;
            let mut garbage = txn.open_table(GARBAGE).map_err(db_error)?;
            let mut parts = Vec::new();
            for entry in table
                .range((upload_id, 0)..=(upload_id, u32::MAX))
                .map_err(db_error)?
            {
                let (_, record) = entry.map_err(db_error)?;
                let record: UploadPartRecord =
                    decode(record.value()).map_err(StoreError::Metadata)?;
                parts.push(record.part);
            }
            for part in &parts {
                add_garbage(&mut garbage, part)?;
            }
            table
                .retain_in((upload_id, 0)..=(upload_id, u32::MAX), |_, _| false)
                .map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        self.collect_garbage()
    }

    // ---- access keys ----

    /// A new access key for `buckets` (`*` for every bucket). Returns the key and its secret,
    /// which is kept only sealed and shown this once.
    pub fn create_access_key(
        &self,
        buckets: &[String],
        description: &str,
    ) -> Result<(AccessKey, String), StoreError> {
        for bucket in buckets.iter().filter(|b| *b != "*") {
            check_bucket_name(bucket)?;
        }
        if buckets.is_empty() {
            return Err(StoreError::BadAccessKey(
                "name at least one bucket the key may use (or `*` for all)".into(),
            ));
        }
        let id = format!(
            "MARU{}",
            random_text(16, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")?
        );
        let secret = random_text(
            40,
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
        )?;
        let record = AccessKeyRecord {
            secret: SealedMeta::seal(
                &ObjectMeta {
                    headers: BTreeMap::from([("secret".to_string(), secret.clone())]),
                    ..ObjectMeta::default()
                },
                &self.masters(),
            )?,
            buckets: buckets.to_vec(),
            created_ms: self.now_ms(),
            description: description.chars().take(200).collect(),
        };
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut keys = txn.open_table(ACCESS_KEYS).map_err(db_error)?;
            if keys.iter().map_err(db_error)?.count() >= ACCESS_KEYS_MAX {
                return Err(StoreError::BadAccessKey(format!(
                    "the store has {ACCESS_KEYS_MAX} access keys already; revoke some first"
                )));
            }
            keys.insert(id.as_str(), encode(&record).as_slice())
                .map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        Ok((AccessKey::of(&id, &record), secret))
    }

    pub fn access_keys(&self) -> Result<Vec<AccessKey>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let keys = txn.open_table(ACCESS_KEYS).map_err(db_error)?;
        let mut out = Vec::new();
        for entry in keys.iter().map_err(db_error)? {
            let (id, record) = entry.map_err(db_error)?;
            let record: AccessKeyRecord = decode(record.value()).map_err(StoreError::Metadata)?;
            out.push(AccessKey::of(id.value(), &record));
        }
        Ok(out)
    }

    /// An access key and its secret, if it exists.
    pub fn access_key(&self, id: &str) -> Result<Option<(AccessKey, String)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let keys = txn.open_table(ACCESS_KEYS).map_err(db_error)?;
        let Some(record) = keys.get(id).map_err(db_error)? else {
            return Ok(None);
        };
        let record: AccessKeyRecord = decode(record.value()).map_err(StoreError::Metadata)?;
        let mut sealed = record.secret.open(&self.masters())?;
        let secret = sealed.headers.remove("secret").unwrap_or_default();
        Ok(Some((AccessKey::of(id, &record), secret)))
    }

    /// The access key a process service uses for its bucket: the one made for it before, or
    /// a new one (keys it had for another bucket are revoked). Returns the key and secret.
    pub fn service_access_key(
        &self,
        app: &str,
        service: &str,
        bucket: &str,
    ) -> Result<(AccessKey, String), StoreError> {
        let description = format!("service {app}/{service}");
        let mut found = None;
        for key in self.access_keys()? {
            if key.description != description {
                continue;
            }
            if key.buckets == [bucket] && found.is_none() {
                found = Some(key.id);
            } else {
                self.revoke_access_key(&key.id)?;
            }
        }
        if let Some(id) = found
            && let Some(key) = self.access_key(&id)?
        {
            return Ok(key);
        }
        self.create_access_key(&[bucket.to_string()], &description)
    }

    /// Revoke the keys made for an app's process services (the app was removed).
    pub fn revoke_service_keys(&self, app: &str) -> Result<usize, StoreError> {
        let prefix = format!("service {app}/");
        let mut revoked = 0;
        for key in self.access_keys()? {
            if key.description.starts_with(&prefix) {
                self.revoke_access_key(&key.id)?;
                revoked += 1;
            }
        }
        Ok(revoked)
    }

    /// Create a bucket unless it exists.
    pub fn ensure_bucket(&self, name: &str) -> Result<(), StoreError> {
        match self.create_bucket(name) {
            Ok(()) | Err(StoreError::BucketExists(_)) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Revoke a key: from this call's return it authenticates nothing.
    pub fn revoke_access_key(&self, id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut keys = txn.open_table(ACCESS_KEYS).map_err(db_error)?;
            if keys.remove(id).map_err(db_error)?.is_none() {
                return Err(StoreError::BadAccessKey(format!(
                    "there is no access key `{}`",
                    id.chars().take(40).collect::<String>()
                )));
            }
        }
        txn.commit().map_err(db_error)
    }

    // ---- garbage ----

    /// Delete the files of versions listed as garbage, then forget them.
    pub fn collect_garbage(&self) -> Result<(), StoreError> {
        let entries: Vec<(String, GarbageRecord)> = {
            let txn = self.db.begin_read().map_err(db_error)?;
            let garbage = txn.open_table(GARBAGE).map_err(db_error)?;
            let mut out = Vec::new();
            for entry in garbage.iter().map_err(db_error)? {
                let (version, record) = entry.map_err(db_error)?;
                out.push((
                    version.value().to_string(),
                    decode(record.value()).map_err(StoreError::Metadata)?,
                ));
            }
            out
        };
        if entries.is_empty() {
            return Ok(());
        }
        let mut dirs = BTreeSet::new();
        let mut done = Vec::new();
        for (version_text, record) in entries {
            let Some(version) = VersionId::parse(&version_text) else {
                done.push(version_text);
                continue;
            };
            let mut complete = true;
            for (shard, volume) in record.volumes.iter().enumerate() {
                let Some(id) = volume else { continue };
                let Some(volume) = self.volume_by_id(*id) else {
                    // A volume that is gone (replaced) took its files with it; one that is
                    // unavailable now keeps them until it returns and the store opens again.
                    complete &= !self.knows_volume(*id);
                    continue;
                };
                let path = shard::path(&volume.root, version, shard);
                match self.disk().remove_file(&path) {
                    Ok(()) => {
                        dirs.insert(path.parent().expect("in a directory").to_path_buf());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(_) => complete = false,
                }
            }
            if complete {
                done.push(version_text);
            }
        }
        for dir in dirs {
            self.disk()
                .sync_dir(&dir)
                .map_err(|e| io_error(disk::Error::new("sync", &dir, e)))?;
        }
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut garbage = txn.open_table(GARBAGE).map_err(db_error)?;
            for version in &done {
                garbage.remove(version.as_str()).map_err(db_error)?;
            }
        }
        txn.commit().map_err(db_error)
    }

    fn knows_volume(&self, id: u64) -> bool {
        self.volumes.iter().any(|v| v.id == Some(VolumeId(id)))
    }

    /// Every version some record names (objects, upload parts, garbage).
    fn referenced_versions(&self) -> Result<BTreeSet<String>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let mut versions = BTreeSet::new();
        let objects = txn.open_table(OBJECTS).map_err(db_error)?;
        for entry in objects.iter().map_err(db_error)? {
            let (_, record) = entry.map_err(db_error)?;
            let record: ObjectRecord = decode(record.value()).map_err(StoreError::Metadata)?;
            versions.extend(record.parts.into_iter().map(|p| p.version));
        }
        let parts = txn.open_table(UPLOAD_PARTS).map_err(db_error)?;
        for entry in parts.iter().map_err(db_error)? {
            let (_, record) = entry.map_err(db_error)?;
            let record: UploadPartRecord = decode(record.value()).map_err(StoreError::Metadata)?;
            versions.insert(record.part.version);
        }
        let garbage = txn.open_table(GARBAGE).map_err(db_error)?;
        for entry in garbage.iter().map_err(db_error)? {
            let (version, _) = entry.map_err(db_error)?;
            versions.insert(version.value().to_string());
        }
        Ok(versions)
    }

    /// Shard files no record names, and garbage versions not yet collected (both are empty
    /// after an open; tests and the status use this).
    pub fn leftovers(&self) -> Result<(Vec<PathBuf>, usize), StoreError> {
        let referenced = self.referenced_versions()?;
        let mut orphans = Vec::new();
        for volume in self.volumes.iter().filter(|v| v.problem.is_none()) {
            let objects = volume.root.join("objects");
            for fan in self.disk().list(&objects).unwrap_or_default() {
                let dir = objects.join(&fan);
                for name in self.disk().list(&dir).unwrap_or_default() {
                    let orphan = shard::parse_name(&name)
                        .is_none_or(|(version, _)| !referenced.contains(&version.to_string()));
                    if orphan {
                        orphans.push(dir.join(name));
                    }
                }
            }
        }
        let txn = self.db.begin_read().map_err(db_error)?;
        let garbage = txn.open_table(GARBAGE).map_err(db_error)?;
        let pending = garbage.iter().map_err(db_error)?.count();
        Ok((orphans, pending))
    }

    /// Delete shard files no record names: writes a crash interrupted before their commit.
    /// Only while nothing writes (at open).
    fn delete_unreferenced(&self) -> Result<(), StoreError> {
        let referenced = self.referenced_versions()?;
        for volume in self.volumes.iter().filter(|v| v.problem.is_none()) {
            let objects = volume.root.join("objects");
            for fan in self.disk().list(&objects).unwrap_or_default() {
                let dir = objects.join(&fan);
                let mut removed = false;
                for name in self.disk().list(&dir).unwrap_or_default() {
                    let orphan = match shard::parse_name(&name) {
                        Some((version, _)) => !referenced.contains(&version.to_string()),
                        None => name.starts_with(disk::TEMPORARY_PREFIX),
                    };
                    if orphan {
                        let path = dir.join(&name);
                        self.disk()
                            .remove_file(&path)
                            .map_err(|e| io_error(disk::Error::new("remove", &path, e)))?;
                        removed = true;
                    }
                }
                if removed {
                    self.disk()
                        .sync_dir(&dir)
                        .map_err(|e| io_error(disk::Error::new("sync", &dir, e)))?;
                }
            }
        }
        Ok(())
    }

    // ---- reading blocks ----

    /// Read stripe `stripe` of `part`, rebuilding missing or damaged blocks.
    fn read_stripe(
        &self,
        bucket: &str,
        key: &str,
        open: &mut OpenPart,
        stripe: u64,
        last: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let profile = open.record.profile();
        let geometry = open.record.geometry();
        let size = open.record.size;
        let block_bytes = geometry.block_bytes();
        // The common case: every data block reads and verifies straight into the stripe.
        // On a real disk the blocks are read at once (one thread each): the shard files are
        // separate sequential streams, and a cold read waits for each.
        let mut sealed = vec![0u8; profile.data() * block_bytes];
        for shard in 0..profile.data() {
            open.block_header(self, shard);
        }
        let readers: Vec<Option<&ShardReader>> = (0..profile.data())
            .map(|shard| open.readers[shard].as_ref().and_then(Option::as_ref))
            .collect();
        // Read ahead: while this stripe is decrypted and sent, the disk already reads the
        // next few that the reader will want (never past `last`).
        let ahead =
            (stripe + 1).max(open.prefetched)..(stripe + 1 + READ_AHEAD_STRIPES).min(last + 1);
        if !ahead.is_empty() {
            for reader in readers.iter().flatten() {
                reader.prefetch(ahead.clone());
            }
            open.prefetched = ahead.end;
        }
        let direct = if readers.iter().all(Option::is_some) && self.disk().blocks() {
            std::thread::scope(|scope| {
                let reads: Vec<_> = sealed
                    .chunks_mut(block_bytes)
                    .zip(&readers)
                    .map(|(into, reader)| {
                        let reader = reader.expect("checked");
                        scope.spawn(move || reader.block_into(stripe, into).is_ok())
                    })
                    .collect();
                reads.into_iter().all(|read| read.join().unwrap_or(false))
            })
        } else {
            sealed
                .chunks_mut(block_bytes)
                .zip(&readers)
                .all(|(into, reader)| reader.is_some_and(|r| r.block_into(stripe, into).is_ok()))
        };
        if direct {
            return self.open_stripe(bucket, key, open, stripe, sealed, size);
        }
        let mut blocks: Vec<Option<Vec<u8>>> = vec![None; profile.shards()];
        let mut good = 0;
        // Data shards first; parity only when a data block is bad.
        for (shard, slot) in blocks.iter_mut().enumerate() {
            if good == profile.data() {
                break;
            }
            match open.block(self, shard, stripe) {
                Some(block) => {
                    *slot = Some(block);
                    good += 1;
                }
                None => {
                    self.counters.blocks_bad.fetch_add(1, Ordering::Relaxed);
                    self.suspects
                        .lock()
                        .expect("the suspects lock is never poisoned")
                        .insert((bucket.to_string(), key.to_string()));
                }
            }
        }
        if good < profile.data() {
            return Err(StoreError::DataLost {
                bucket: bucket.to_string(),
                key: key.to_string(),
                stripe,
                good,
                needed: profile.data(),
            });
        }
        if blocks[..profile.data()].iter().any(Option::is_none) {
            let rebuilt = open.codec.rebuild(&mut blocks);
            assert!(rebuilt, "enough good blocks were read");
        }
        let mut sealed = Vec::with_capacity(profile.data() * block_bytes);
        for block in &blocks[..profile.data()] {
            sealed.extend_from_slice(block.as_ref().expect("data blocks are present"));
        }
        self.open_stripe(bucket, key, open, stripe, sealed, size)
    }

    /// Decrypt a stripe's sealed bytes (its data blocks, in order).
    fn open_stripe(
        &self,
        bucket: &str,
        key: &str,
        open: &OpenPart,
        stripe: u64,
        mut sealed: Vec<u8>,
        size: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let len = open.record.geometry().stripe_len(stripe, size);
        sealed.truncate(len + TAG_BYTES);
        open.key
            .open_stripe(open.version.bytes(), stripe, &mut sealed)
            .map_err(|_| StoreError::Io(format!(
                "stripe {stripe} of object `{key}` in bucket `{bucket}` verified block by block but does not decrypt: the metadata and the shards disagree"
            )))?;
        self.counters
            .bytes_read
            .fetch_add(sealed.len() as u64, Ordering::Relaxed);
        Ok(sealed)
    }

    fn open_part(&self, record: &PartRecord) -> Result<OpenPart, StoreError> {
        let version = record.version();
        let key = record
            .key
            .unwrap(&self.masters(), version.bytes())
            .map_err(StoreError::Crypto)?;
        Ok(OpenPart {
            record: record.clone(),
            version,
            key,
            readers: (0..record.volumes.len()).map(|_| None).collect(),
            codec: Codec::new(record.profile(), record.block_bytes as usize),
            prefetched: 0,
        })
    }
}

/// An access key as listed (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessKey {
    pub id: String,
    pub buckets: Vec<String>,
    pub created_ms: u64,
    pub description: String,
}

impl AccessKey {
    fn of(id: &str, record: &AccessKeyRecord) -> AccessKey {
        AccessKey {
            id: id.to_string(),
            buckets: record.buckets.clone(),
            created_ms: record.created_ms,
            description: record.description.clone(),
        }
    }

    /// Whether the key may use `bucket`.
    pub fn allows(&self, bucket: &str) -> bool {
        self.buckets.iter().any(|b| b == "*" || b == bucket)
    }
}

fn random_text(len: usize, alphabet: &[u8]) -> Result<String, StoreError> {
    // Bytes at or above the largest multiple of the alphabet's size are skipped, so every
    // symbol is equally likely.
    let limit = 256 - 256 % alphabet.len();
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let mut chunk = [0u8; 64];
        crate::crypto::random(&mut chunk)?;
        for byte in chunk.into_iter().filter(|b| usize::from(*b) < limit) {
            if out.len() < len {
                out.push(alphabet[usize::from(byte) % alphabet.len()] as char);
            }
        }
    }
    Ok(out)
}

fn last_key(listing: &Listing) -> Option<String> {
    let object = listing.objects.last().map(|o| o.key.clone());
    let prefix = listing.common_prefixes.last().cloned();
    object.max(prefix)
}

fn add_garbage(
    garbage: &mut redb::Table<&str, &[u8]>,
    part: &PartRecord,
) -> Result<(), StoreError> {
    let record = GarbageRecord {
        volumes: part.volumes.clone(),
    };
    garbage
        .insert(part.version.as_str(), encode(&record).as_slice())
        .map_err(db_error)?;
    Ok(())
}

fn open_volume(disk: &dyn Disk, root: &Path) -> Volume {
    let attempt = || -> Result<VolumeId, String> {
        disk::create_dir_all(disk, root).map_err(|e| e.to_string())?;
        let id_path = root.join(VOLUME_ID_FILE);
        let id = match disk.read(&id_path) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| "volume.id is not text")?;
                let value = u64::from_str_radix(text.trim(), 16)
                    .map_err(|_| format!("volume.id holds `{}`, not an id", text.trim()))?;
                VolumeId(value)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 8];
                crate::crypto::random(&mut bytes).map_err(|e| e.to_string())?;
                let id = VolumeId(u64::from_le_bytes(bytes));
                disk::write_atomically(disk, &id_path, format!("{:016x}\n", id.0).as_bytes())
                    .map_err(|e| e.to_string())?;
                id
            }
            Err(e) => return Err(format!("read volume.id: {e}")),
        };
        let objects = root.join("objects");
        disk::create_dir_all(disk, &objects).map_err(|e| e.to_string())?;
        let existing: BTreeSet<String> = disk
            .list(&objects)
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
        let mut created = false;
        for fan in 0..=255u8 {
            let name = format!("{fan:02x}");
            if !existing.contains(&name) {
                match disk.create_dir(&objects.join(&name)) {
                    Ok(()) => created = true,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        if created {
            disk.sync_dir(&objects).map_err(|e| e.to_string())?;
        }
        Ok(id)
    };
    match attempt() {
        Ok(id) => Volume {
            root: root.to_path_buf(),
            id: Some(id),
            problem: None,
        },
        Err(problem) => {
            tracing::error!(volume = %root.display(), %problem, "volume unavailable; objects with shards on it are read from the others");
            Volume {
                root: root.to_path_buf(),
                id: None,
                problem: Some(problem),
            }
        }
    }
}

/// A part being read: its key, and each shard's file once opened.
struct OpenPart {
    record: PartRecord,
    version: VersionId,
    key: Key,
    /// `Some(None)`: tried and unusable.
    readers: Vec<Option<Option<ShardReader>>>,
    codec: Codec,
    /// Stripes before this one were already asked of the disk ahead of reading.
    prefetched: u64,
}

/// Stripes the disk is asked to read ahead of a reader (each a block per data shard: with
/// 256 KiB blocks, 2 MiB per shard file).
const READ_AHEAD_STRIPES: u64 = 8;

impl OpenPart {
    /// Open shard `shard`'s file if it was not tried yet (its header verified).
    fn block_header(&mut self, store: &Store, shard: usize) {
        if self.readers[shard].is_none() {
            let reader = self.record.volumes[shard]
                .and_then(|id| store.volume_by_id(id))
                .and_then(|volume| {
                    ShardReader::open(
                        store.disk(),
                        shard::path(&volume.root, self.version, shard),
                        self.version,
                        shard,
                    )
                    .ok()
                })
                .filter(|reader| {
                    let header = reader.header();
                    header.size == self.record.size
                        && header.profile == self.record.profile()
                        && header.block_bytes == self.record.block_bytes
                });
            self.readers[shard] = Some(reader);
        }
    }

    /// Shard `shard`'s verified block of `stripe`, or `None` if it is missing or damaged.
    fn block(&mut self, store: &Store, shard: usize, stripe: u64) -> Option<Vec<u8>> {
        self.block_header(store, shard);
        let reader = self.readers[shard].as_ref().expect("set above").as_ref()?;
        reader.block(stripe).ok()
    }
}

/// Reads an object's bytes, stripe by stripe.
pub struct ObjectReader {
    store: Arc<Store>,
    bucket: String,
    key: String,
    parts: Vec<PartRecord>,
    /// The next byte to return, and the end (exclusive), in the object's bytes.
    next: u64,
    end: u64,
    open: Option<(usize, u64, OpenPart)>,
}

impl ObjectReader {
    /// Bytes still to come.
    pub fn remaining(&self) -> u64 {
        self.end - self.next
    }

    /// The next run of bytes (at most one stripe), or `None` at the end.
    pub fn next_chunk(&mut self) -> Option<Result<Vec<u8>, StoreError>> {
        if self.next >= self.end {
            return None;
        }
        // Which part holds `next`, and where it starts.
        let mut start = 0;
        let mut index = 0;
        while index < self.parts.len() && start + self.parts[index].size <= self.next {
            start += self.parts[index].size;
            index += 1;
        }
        assert!(
            index < self.parts.len(),
            "the parts hold every byte of the object"
        );
        if self.open.as_ref().is_none_or(|(i, _, _)| *i != index) {
            match self.store.open_part(&self.parts[index]) {
                Ok(open) => self.open = Some((index, start, open)),
                Err(error) => {
                    self.next = self.end;
                    return Some(Err(error));
                }
            }
        }
        let (_, part_start, open) = self.open.as_mut().expect("opened above");
        let geometry = open.record.geometry();
        let within = self.next - *part_start;
        let stripe = within / geometry.stripe_plaintext_bytes() as u64;
        let stripe_start = geometry.stripe_start(stripe);
        let part_last = (self.end - *part_start).min(open.record.size) - 1;
        let last = *geometry.stripes_for(within, part_last).end();
        let result = self
            .store
            .read_stripe(&self.bucket, &self.key, open, stripe, last);
        match result {
            Ok(mut bytes) => {
                let from = (within - stripe_start) as usize;
                let until = ((self.end - *part_start - stripe_start) as usize).min(bytes.len());
                // The whole stripe, the common case, is handed on without a copy.
                bytes.truncate(until);
                if from > 0 {
                    bytes.drain(..from);
                }
                self.next += bytes.len() as u64;
                Some(Ok(bytes))
            }
            Err(error) => {
                self.next = self.end;
                Some(Err(error))
            }
        }
    }

    /// Everything that remains.
    pub fn read_all(mut self) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(self.remaining() as usize);
        while let Some(chunk) = self.next_chunk() {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }
}

/// Apply `work` to every item, on a thread each when `parallel`, in order otherwise (the
/// simulated disk stays on one thread, deterministic); the first error wins.
fn each<T: Send, R: Send>(
    parallel: bool,
    items: Vec<T>,
    work: impl Fn(T) -> Result<R, StoreError> + Sync,
) -> Result<Vec<R>, StoreError> {
    if !parallel || items.len() < 2 {
        return items.into_iter().map(&work).collect();
    }
    std::thread::scope(|scope| {
        let work = &work;
        let running: Vec<_> = items
            .into_iter()
            .map(|item| scope.spawn(move || work(item)))
            .collect();
        running
            .into_iter()
            .map(|r| {
                r.join()
                    .unwrap_or_else(|_| Err(StoreError::Io("a sync thread panicked".into())))
            })
            .collect()
    })
}

/// Writes one erasure-coded version (a whole object or one part).
pub struct PartWriter {
    store: Arc<Store>,
    version: VersionId,
    key: Key,
    size: u64,
    geometry: Geometry,
    volumes: Vec<Option<u64>>,
    writers: Vec<Option<ShardWriter>>,
    /// Plaintext of the stripe being filled.
    stripe: Vec<u8>,
    next_stripe: u64,
    written: u64,
    md5: Md5,
    codec: Codec,
    finished: bool,
}

impl PartWriter {
    fn new(store: Arc<Store>, size: u64) -> Result<PartWriter, StoreError> {
        let profile = store.profile;
        let geometry = Geometry::for_object(profile, size, store.block_bytes_max);
        let block_bytes = geometry.block_bytes();
        let version = VersionId::generate()?;
        let ids: Vec<VolumeId> = store
            .volumes
            .iter()
            .map(|v| v.id.unwrap_or(VolumeId(0)))
            .collect();
        let placed = layout::place(version.bytes(), &ids, profile.shards());
        let online: Vec<bool> = placed
            .iter()
            .map(|i| store.volumes[*i].problem.is_none())
            .collect();
        let needed = profile.data() + usize::from(profile.parity() > 0);
        let available = online.iter().filter(|o| **o).count();
        if available < needed {
            let reasons: Vec<String> = store
                .volumes
                .iter()
                .filter_map(|v| {
                    v.problem
                        .as_ref()
                        .map(|p| format!("{}: {p}", v.root.display()))
                })
                .collect();
            return Err(StoreError::NotEnoughVolumes {
                online: available,
                needed,
                reasons: reasons.join("; "),
            });
        }
        let key = Key::generate()?;
        let mut volumes = Vec::new();
        let mut writers = Vec::new();
        for (shard, index) in placed.iter().enumerate() {
            let volume = &store.volumes[*index];
            if volume.problem.is_some() {
                volumes.push(None);
                writers.push(None);
                continue;
            }
            let header = Header {
                version,
                shard: shard as u16,
                profile,
                block_bytes: block_bytes as u32,
                size,
            };
            let path = shard::path(&volume.root, version, shard);
            let writer = ShardWriter::create(store.disk(), path, header).map_err(shard_error)?;
            volumes.push(volume.id.map(|id| id.0));
            writers.push(Some(writer));
        }
        Ok(PartWriter {
            stripe: Vec::with_capacity(geometry.stripe_plaintext_bytes() + TAG_BYTES),
            codec: Codec::new(profile, block_bytes),
            store,
            version,
            key,
            size,
            geometry,
            volumes,
            writers,
            next_stripe: 0,
            written: 0,
            md5: Md5::new(),
            finished: false,
        })
    }

    /// Take more of the body.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<(), StoreError> {
        if self.written + bytes.len() as u64 > self.size {
            return Err(StoreError::BodyTooLong {
                expected: self.size,
            });
        }
        self.written += bytes.len() as u64;
        self.md5.update(bytes);
        let per = self.geometry.stripe_plaintext_bytes();
        while !bytes.is_empty() {
            let take = (per - self.stripe.len()).min(bytes.len());
            self.stripe.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.stripe.len() == per {
                self.emit_stripe()?;
            }
        }
        Ok(())
    }

    fn emit_stripe(&mut self) -> Result<(), StoreError> {
        let profile = self.geometry.profile();
        let block_bytes = self.geometry.block_bytes();
        let mut sealed = std::mem::take(&mut self.stripe);
        let plaintext = sealed.len();
        self.key
            .seal_stripe(self.version.bytes(), self.next_stripe, &mut sealed);
        assert_eq!(sealed.len(), plaintext + TAG_BYTES, "the seal adds its tag");
        sealed.resize(profile.data() * block_bytes, 0);
        let data: Vec<&[u8]> = sealed.chunks(block_bytes).collect();
        let parity = self.codec.encode(&data);
        for (shard, writer) in self.writers.iter_mut().enumerate() {
            if let Some(writer) = writer {
                let block = if shard < profile.data() {
                    data[shard]
                } else {
                    &parity[shard - profile.data()]
                };
                writer.append(block).map_err(shard_error)?;
            }
        }
        self.store
            .counters
            .bytes_written
            .fetch_add((profile.shards() * block_bytes) as u64, Ordering::Relaxed);
        self.next_stripe += 1;
        sealed.clear();
        self.stripe = sealed;
        Ok(())
    }

    /// Write the last stripe and make every shard file durable; returns the record that
    /// names them (not yet committed anywhere).
    fn finish(&mut self) -> Result<PartRecord, StoreError> {
        if self.written != self.size {
            return Err(StoreError::IncompleteBody {
                got: self.written,
                expected: self.size,
            });
        }
        if !self.stripe.is_empty() {
            self.emit_stripe()?;
        }
        assert_eq!(
            self.next_stripe,
            self.geometry.stripes(self.size),
            "every stripe was written"
        );
        let writers: Vec<ShardWriter> = self.writers.iter_mut().filter_map(Option::take).collect();
        let disk = self.store.disk();
        // Each shard is on its own volume (disk): on a real disk their syncs, then their
        // directories' syncs, run at once rather than one after another.
        let parallel = disk.blocks();
        let paths = each(parallel, writers, |writer| {
            writer.finish().map_err(shard_error)
        })?;
        let dirs: BTreeSet<PathBuf> = paths
            .iter()
            .map(|path| path.parent().expect("in a directory").to_path_buf())
            .collect();
        each(parallel, dirs.into_iter().collect(), |dir: PathBuf| {
            disk.sync_dir(&dir)
                .map_err(|e| io_error(disk::Error::new("sync", &dir, e)))
        })?;
        let profile = self.geometry.profile();
        Ok(PartRecord {
            version: self.version.to_string(),
            size: self.size,
            data: profile.data() as u8,
            parity: profile.parity() as u8,
            block_bytes: self.geometry.block_bytes() as u32,
            volumes: self.volumes.clone(),
            key: WrappedKey::wrap(&self.key, &self.store.masters(), self.version.bytes())?,
            md5: records::hex(&self.md5.clone().finalize()),
        })
    }

    /// Delete what was written: the version will never be committed.
    fn discard(&mut self) {
        self.writers.iter_mut().for_each(|w| drop(w.take()));
        for (shard, volume) in self.volumes.iter().enumerate() {
            if let Some(volume) = volume.and_then(|id| self.store.volume_by_id(id)) {
                _ = self
                    .store
                    .disk()
                    .remove_file(&shard::path(&volume.root, self.version, shard));
            }
        }
    }
}

impl Drop for PartWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.discard();
        }
    }
}

/// Writes a new version of an object; [`ObjectWriter::finish`] makes it the object.
pub struct ObjectWriter {
    part: PartWriter,
    bucket: String,
    key: String,
    meta: ObjectMeta,
}

impl ObjectWriter {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.part.write(bytes)
    }

    /// The MD5 of what was written so far.
    pub fn md5(&self) -> [u8; 16] {
        self.part.md5.clone().finalize().into()
    }

    /// Commit: from this call's return the object is the new version, whole.
    pub fn finish(mut self) -> Result<ObjectInfo, StoreError> {
        let part = self.part.finish()?;
        let store = self.part.store.clone();
        let record = ObjectRecord {
            size: part.size,
            etag: part.md5.clone(),
            modified_ms: store.now_ms(),
            meta: SealedMeta::seal(&self.meta, &store.masters())?,
            parts: vec![part],
        };
        let txn = store.db.begin_write().map_err(db_error)?;
        {
            let buckets = txn.open_table(BUCKETS).map_err(db_error)?;
            if buckets
                .get(self.bucket.as_str())
                .map_err(db_error)?
                .is_none()
            {
                return Err(StoreError::NoSuchBucket(self.bucket.clone()));
            }
            let mut objects = txn.open_table(OBJECTS).map_err(db_error)?;
            let old = objects
                .insert(
                    (self.bucket.as_str(), self.key.as_str()),
                    encode(&record).as_slice(),
                )
                .map_err(db_error)?
                .map(|old| decode::<ObjectRecord>(old.value()));
            if let Some(old) = old {
                let old = old.map_err(StoreError::Metadata)?;
                let mut garbage = txn.open_table(GARBAGE).map_err(db_error)?;
                for part in &old.parts {
                    add_garbage(&mut garbage, part)?;
                }
            }
        }
        // From here the files are never deleted by this writer: a commit that fails may
        // still have landed, and only the next open can tell (it deletes them if no record
        // names them).
        self.part.finished = true;
        txn.commit().map_err(db_error)?;
        store.collect_garbage()?;
        Ok(ObjectInfo::of(&self.key, &record))
    }
}

/// Writes one part of a multipart upload.
pub struct UploadPartWriter {
    part: PartWriter,
    upload_id: String,
    number: u32,
}

impl UploadPartWriter {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.part.write(bytes)
    }

    /// The MD5 of what was written so far.
    pub fn md5(&self) -> [u8; 16] {
        self.part.md5.clone().finalize().into()
    }

    /// Commit the part (replacing an earlier upload of the same number); returns its ETag.
    pub fn finish(mut self) -> Result<String, StoreError> {
        let part = self.part.finish()?;
        let store = self.part.store.clone();
        let etag = part.md5.clone();
        let txn = store.db.begin_write().map_err(db_error)?;
        {
            let uploads = txn.open_table(UPLOADS).map_err(db_error)?;
            if uploads
                .get(self.upload_id.as_str())
                .map_err(db_error)?
                .is_none()
            {
                return Err(StoreError::NoSuchUpload(self.upload_id.clone()));
            }
            let mut parts = txn.open_table(UPLOAD_PARTS).map_err(db_error)?;
            let record = UploadPartRecord {
                part,
                modified_ms: store.now_ms(),
            };
            let old = parts
                .insert(
                    (self.upload_id.as_str(), self.number),
                    encode(&record).as_slice(),
                )
                .map_err(db_error)?
                .map(|old| decode::<UploadPartRecord>(old.value()));
            if let Some(old) = old {
                let old = old.map_err(StoreError::Metadata)?;
                let mut garbage = txn.open_table(GARBAGE).map_err(db_error)?;
                add_garbage(&mut garbage, &old.part)?;
            }
        }
        self.part.finished = true;
        txn.commit().map_err(db_error)?;
        store.collect_garbage()?;
        Ok(etag)
    }
}
