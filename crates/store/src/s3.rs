//! The S3 API over the store, with `s3s` (SigV4 headers and presigned URLs, aws-chunked
//! bodies with trailing checksums, XML): what the AWS CLI, boto3 and rclone use unchanged.
//!
//! What s3s leaves to us is done here: checking `Content-MD5` and `x-amz-checksum-*`
//! (headers or trailers) before an object is committed, size limits, conditional requests,
//! and which buckets an access key may use (each key names its buckets; `*` names all).
//! A body is committed only after its stream ended cleanly: s3s reports a bad signature,
//! payload hash or chunk as an error at the end of the stream.
//!
//! The engine is synchronous (disk and redb calls that may wait on a sync); every call to it
//! runs on a blocking thread, and bodies flow to and from it through bounded channels.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::TryStreamExt as _;
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::checksum::ChecksumHasher;
use s3s::dto::*;
use s3s::path::S3Path;
use s3s::stream::ByteStream as _;
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};

use crate::engine::{ObjectInfo, Store, StoreError};
use crate::records::ObjectMeta;

/// Limits on what one request may do.
#[derive(Debug, Clone)]
pub struct S3Limits {
    /// The largest object a single PUT (or a copy) may write.
    pub object_bytes_max: u64,
    /// The largest part of a multipart upload.
    pub part_bytes_max: u64,
    /// Bodies moving at once (PUTs, parts, GETs, copies): each holds about a stripe per
    /// shard in memory (a few MiB), so this bounds the store's memory. More wait up to
    /// `transfer_wait` for their turn, then get `503 SlowDown`.
    pub transfers_max: usize,
    pub transfer_wait: Duration,
    /// Requests per second one access key may make, sustained (a burst of a second's worth
    /// is allowed); more get `503 SlowDown`, which S3 clients retry with backoff.
    pub requests_per_second_per_key: u32,
}

impl Default for S3Limits {
    fn default() -> Self {
        S3Limits {
            // S3's own limits: 5 GiB in one PUT or part.
            object_bytes_max: 5 << 30,
            part_bytes_max: 5 << 30,
            transfers_max: 64,
            transfer_wait: Duration::from_secs(30),
            requests_per_second_per_key: 1000,
        }
    }
}

/// Build the S3 service over `store`; serve it with any hyper 1.x connection loop.
///
/// Requests naming a host under one of `domains` (`BUCKET.DOMAIN`, any port) use
/// virtual-hosted-style addressing; every other host (an IP address, `localhost`, the
/// domain itself) uses path-style addressing.
/// Decides object access beyond a key's bucket scope: the node's data policy.
pub trait ObjectGuard: Send + Sync {
    /// May `key` read (or write) `bucket`? Runs on a blocking thread; writes what belongs in
    /// the audit log before it answers. `Err` is the reason for refusing.
    fn admit(
        &self,
        key: &crate::engine::AccessKey,
        bucket: &str,
        write: bool,
    ) -> Result<(), String>;
}

pub fn service(
    store: Arc<Store>,
    limits: S3Limits,
    domains: &[String],
    guard: Option<Arc<dyn ObjectGuard>>,
) -> Result<s3s::service::S3Service, BadDomain> {
    let domains = Domains::new(domains)?;
    let rate = Arc::new(KeyRates::new(limits.requests_per_second_per_key));
    let mut builder = s3s::service::S3ServiceBuilder::new(Api {
        store: store.clone(),
        transfers: Arc::new(tokio::sync::Semaphore::new(limits.transfers_max.max(1))),
        limits,
        guard: guard.clone(),
    });
    builder.set_auth(Keys {
        store: store.clone(),
        rate: rate.clone(),
        guard: guard.clone(),
    });
    builder.set_access(Keys { store, rate, guard });
    if !domains.0.is_empty() {
        builder.set_host(domains);
    }
    Ok(builder.build())
}

/// Check domains for virtual-hosted-style addressing, as [`service`] will.
pub fn check_domains(domains: &[String]) -> Result<(), BadDomain> {
    Domains::new(domains).map(drop)
}

/// A domain for virtual-hosted-style addressing that is not a DNS name.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is not a domain for virtual-hosted-style addressing: give a DNS name such as \"s3.example.org\", without a port, a scheme or a leading dot"
)]
pub struct BadDomain(pub String);

/// The domains under which a host names a bucket (`BUCKET.DOMAIN`), lowercased, longest
/// first so that a nested domain wins.
struct Domains(Vec<String>);

impl Domains {
    fn new(domains: &[String]) -> Result<Domains, BadDomain> {
        let mut checked = Vec::with_capacity(domains.len());
        for domain in domains {
            let lower = domain.to_ascii_lowercase();
            let labels_ok = !lower.is_empty()
                && lower.len() <= 253
                && lower.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !labels_ok || lower.parse::<std::net::IpAddr>().is_ok() {
                return Err(BadDomain(domain.clone()));
            }
            checked.push(lower);
        }
        checked.sort_by_key(|d| std::cmp::Reverse(d.len()));
        checked.dedup();
        Ok(Domains(checked))
    }

    /// The bucket a `Host` header names, if any.
    fn bucket<'h>(&self, host: &'h str) -> Option<&'h str> {
        // A port, if any, follows the last colon (IP literals never reach here).
        let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
        let name = name.strip_suffix('.').unwrap_or(name);
        if self
            .0
            .iter()
            .any(|domain| name.eq_ignore_ascii_case(domain))
        {
            return None;
        }
        self.0.iter().find_map(|domain| {
            let split = name.len().checked_sub(domain.len() + 1)?;
            let (bucket, rest) = name.split_at(split);
            (rest.as_bytes()[0] == b'.'
                && rest[1..].eq_ignore_ascii_case(domain)
                && !bucket.is_empty())
            .then_some(bucket)
        })
    }
}

impl s3s::host::S3Host for Domains {
    fn parse_host_header<'a>(&'a self, host: &'a str) -> S3Result<s3s::host::VirtualHost<'a>> {
        let vh = s3s::host::VirtualHost::new(host);
        Ok(match self.bucket(host) {
            Some(bucket) => vh.with_bucket(bucket.to_ascii_lowercase()),
            None => vh,
        })
    }
}

/// A token bucket per access key. Only keys that signed a request correctly get an entry,
/// so the map is bounded by the keys the store holds; entries of keys idle long enough to
/// be full again are dropped when it grows.
struct KeyRates {
    per_second: f64,
    keys: std::sync::Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

/// Entries kept before idle ones are dropped.
const KEY_RATES_MAX: usize = 4096;

impl KeyRates {
    fn new(per_second: u32) -> KeyRates {
        KeyRates {
            per_second: f64::from(per_second.max(1)),
            keys: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Take a token for `key`; false when its bucket is empty.
    fn take(&self, key: &str) -> bool {
        let now = std::time::Instant::now();
        let capacity = self.per_second;
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.len() >= KEY_RATES_MAX && !keys.contains_key(key) {
            keys.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * capacity < capacity
            });
            if keys.len() >= KEY_RATES_MAX {
                keys.clear();
            }
        }
        let (tokens, at) = keys.entry(key.to_string()).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * capacity).min(capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Headers kept with an object, and given back on GET and HEAD.
const KEPT_HEADERS: [&str; 6] = [
    "content-type",
    "content-encoding",
    "content-disposition",
    "content-language",
    "cache-control",
    "expires",
];

fn error(error: StoreError) -> S3Error {
    let code = match &error {
        StoreError::NoSuchBucket(_) => S3ErrorCode::NoSuchBucket,
        StoreError::BucketExists(_) => S3ErrorCode::BucketAlreadyOwnedByYou,
        StoreError::BucketNotEmpty(_) => S3ErrorCode::BucketNotEmpty,
        StoreError::BadBucketName(_) => S3ErrorCode::InvalidBucketName,
        StoreError::NoSuchKey { .. } => S3ErrorCode::NoSuchKey,
        StoreError::NoSuchUpload(_) => S3ErrorCode::NoSuchUpload,
        StoreError::InvalidPart(_) => S3ErrorCode::InvalidPart,
        StoreError::InvalidPartOrder => S3ErrorCode::InvalidPartOrder,
        StoreError::EntityTooSmall { .. } => S3ErrorCode::EntityTooSmall,
        StoreError::IncompleteBody { .. } => S3ErrorCode::IncompleteBody,
        StoreError::BodyTooLong { .. } => S3ErrorCode::InvalidRequest,
        StoreError::InvalidRange { .. } => S3ErrorCode::InvalidRange,
        StoreError::BadAccessKey(_) => S3ErrorCode::InvalidArgument,
        StoreError::NotEnoughVolumes { .. } | StoreError::Full(_) => {
            S3ErrorCode::ServiceUnavailable
        }
        _ => S3ErrorCode::InternalError,
    };
    if code == S3ErrorCode::InternalError {
        tracing::error!(%error, "store request failed");
    }
    S3Error::with_message(code, error.to_string())
}

/// Run an engine call on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> S3Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| s3_error!(InternalError, "a store task failed: {e}"))?
        .map_err(error)
}

fn timestamp(ms: u64) -> Timestamp {
    Timestamp::from(UNIX_EPOCH + Duration::from_millis(ms))
}

fn system_time(timestamp: &Timestamp) -> Option<SystemTime> {
    let offset: time::OffsetDateTime = timestamp.clone().into();
    let nanos = offset.unix_timestamp_nanos();
    u64::try_from(nanos)
        .ok()
        .map(|n| UNIX_EPOCH + Duration::from_nanos(n))
}

fn etag(value: &str) -> ETag {
    ETag::Strong(value.to_string())
}

fn matches(condition: &ETagCondition, value: &str) -> bool {
    match condition {
        ETagCondition::Any => true,
        ETagCondition::ETag(tag) => tag.value() == value,
    }
}

/// Evaluate `If-*` headers against an object, as RFC 9110 orders them.
fn preconditions(
    info: &ObjectInfo,
    if_match: Option<&ETagCondition>,
    if_none_match: Option<&ETagCondition>,
    if_modified_since: Option<&Timestamp>,
    if_unmodified_since: Option<&Timestamp>,
) -> S3Result<()> {
    let modified = UNIX_EPOCH + Duration::from_millis(info.modified_ms / 1000 * 1000);
    if let Some(condition) = if_match {
        if !matches(condition, &info.etag) {
            return Err(s3_error!(
                PreconditionFailed,
                "the object's ETag does not match If-Match"
            ));
        }
    } else if let Some(since) = if_unmodified_since.and_then(system_time)
        && modified > since
    {
        return Err(s3_error!(
            PreconditionFailed,
            "the object was modified since If-Unmodified-Since"
        ));
    }
    if let Some(condition) = if_none_match {
        if matches(condition, &info.etag) {
            return Err(S3Error::new(S3ErrorCode::NotModified));
        }
    } else if let Some(since) = if_modified_since.and_then(system_time)
        && modified <= since
    {
        return Err(S3Error::new(S3ErrorCode::NotModified));
    }
    Ok(())
}

/// The declared size of a body: its Content-Length, or for aws-chunked bodies the decoded
/// length.
fn declared_size(body: &StreamingBlob, content_length: Option<i64>) -> S3Result<u64> {
    body.remaining_length()
        .exact()
        .map(|n| n as u64)
        .or_else(|| content_length.and_then(|n| u64::try_from(n).ok()))
        .ok_or_else(|| {
            s3_error!(
                MissingContentLength,
                "send Content-Length (or x-amz-decoded-content-length)"
            )
        })
}

/// The checksums a client declared for a body: in headers, or named by `x-amz-trailer` and
/// sent after it.
#[derive(Default)]
struct Expected {
    md5: Option<Vec<u8>>,
    declared: Checksum,
    algorithm: Option<String>,
}

impl Expected {
    fn new(
        content_md5: Option<&str>,
        declared: Checksum,
        algorithm: Option<&ChecksumAlgorithm>,
    ) -> S3Result<Expected> {
        let md5 = match content_md5 {
            Some(text) => {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .map_err(|_| s3_error!(InvalidDigest, "Content-MD5 is not base64"))?;
                if bytes.len() != 16 {
                    return Err(s3_error!(InvalidDigest, "Content-MD5 is not 16 bytes"));
                }
                Some(bytes)
            }
            None => None,
        };
        Ok(Expected {
            md5,
            declared,
            algorithm: algorithm.map(|a| a.as_str().to_ascii_uppercase()),
        })
    }

    /// A hasher for every checksum the client declared or announced.
    fn hasher(&self) -> ChecksumHasher {
        let wants = |value: &Option<String>, name: &str| {
            value.is_some() || self.algorithm.as_deref() == Some(name)
        };
        let mut hasher = ChecksumHasher::default();
        if wants(&self.declared.checksum_crc32, "CRC32") {
            hasher.crc32 = Some(Default::default());
        }
        if wants(&self.declared.checksum_crc32c, "CRC32C") {
            hasher.crc32c = Some(Default::default());
        }
        if wants(&self.declared.checksum_sha1, "SHA1") {
            hasher.sha1 = Some(Default::default());
        }
        if wants(&self.declared.checksum_sha256, "SHA256") {
            hasher.sha256 = Some(Default::default());
        }
        if wants(&self.declared.checksum_crc64nvme, "CRC64NVME") {
            hasher.crc64nvme = Some(Default::default());
        }
        hasher
    }

    /// Merge values that came in the trailer.
    fn trailer(&mut self, trailers: Option<&http::HeaderMap>) {
        let Some(trailers) = trailers else { return };
        let get = |name: &str| {
            trailers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let declared = &mut self.declared;
        for (slot, name) in [
            (&mut declared.checksum_crc32, "x-amz-checksum-crc32"),
            (&mut declared.checksum_crc32c, "x-amz-checksum-crc32c"),
            (&mut declared.checksum_sha1, "x-amz-checksum-sha1"),
            (&mut declared.checksum_sha256, "x-amz-checksum-sha256"),
            (&mut declared.checksum_crc64nvme, "x-amz-checksum-crc64nvme"),
        ] {
            if slot.is_none() {
                *slot = get(name);
            }
        }
    }

    /// Compare what was computed with what was declared; returns the computed checksums
    /// to echo back.
    fn verify(&self, md5: [u8; 16], computed: Checksum) -> S3Result<Checksum> {
        if let Some(expected) = &self.md5
            && expected[..] != md5
        {
            return Err(s3_error!(
                BadDigest,
                "the body does not match its Content-MD5"
            ));
        }
        for (name, expected, actual) in [
            (
                "CRC32",
                &self.declared.checksum_crc32,
                &computed.checksum_crc32,
            ),
            (
                "CRC32C",
                &self.declared.checksum_crc32c,
                &computed.checksum_crc32c,
            ),
            (
                "SHA1",
                &self.declared.checksum_sha1,
                &computed.checksum_sha1,
            ),
            (
                "SHA256",
                &self.declared.checksum_sha256,
                &computed.checksum_sha256,
            ),
            (
                "CRC64NVME",
                &self.declared.checksum_crc64nvme,
                &computed.checksum_crc64nvme,
            ),
        ] {
            if let (Some(expected), Some(actual)) = (expected, actual)
                && expected != actual
            {
                return Err(s3_error!(
                    BadDigest,
                    "the body's {name} checksum is {actual}, not the declared {expected}"
                ));
            }
            if expected.is_some() && actual.is_none() {
                return Err(s3_error!(
                    InvalidRequest,
                    "{name} was declared but not computed"
                ));
            }
        }
        Ok(computed)
    }
}

/// Something a body is written into: a new object, or a new part.
trait Sink: Send + 'static {
    type Done: Send + 'static;
    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError>;
    fn md5(&self) -> [u8; 16];
    fn commit(self) -> Result<Self::Done, StoreError>;
}

impl Sink for crate::engine::ObjectWriter {
    type Done = ObjectInfo;
    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        crate::engine::ObjectWriter::write(self, bytes)
    }
    fn md5(&self) -> [u8; 16] {
        crate::engine::ObjectWriter::md5(self)
    }
    fn commit(self) -> Result<ObjectInfo, StoreError> {
        self.finish()
    }
}

impl Sink for crate::engine::UploadPartWriter {
    type Done = String;
    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        crate::engine::UploadPartWriter::write(self, bytes)
    }
    fn md5(&self) -> [u8; 16] {
        crate::engine::UploadPartWriter::md5(self)
    }
    fn commit(self) -> Result<String, StoreError> {
        self.finish()
    }
}

enum Message {
    Data(Bytes),
    /// The body ended cleanly: verify against these and commit.
    Commit(Expected),
}

/// Stream `body` into `sink` on a blocking thread, verify its checksums, then commit.
async fn write_body<W: Sink>(
    sink: W,
    mut body: StreamingBlob,
    mut expected: Expected,
    trailers: Option<s3s::TrailingHeaders>,
) -> S3Result<(W::Done, Checksum)> {
    let (send, mut receive) = tokio::sync::mpsc::channel::<Message>(8);
    let hasher = expected.hasher();
    let writer = tokio::task::spawn_blocking(move || -> S3Result<Option<(W::Done, Checksum)>> {
        let mut sink = sink;
        let mut hasher = hasher;
        while let Some(message) = receive.blocking_recv() {
            match message {
                Message::Data(bytes) => {
                    hasher.update(&bytes);
                    sink.write(&bytes).map_err(error)?;
                }
                Message::Commit(expected) => {
                    let checksums = expected.verify(sink.md5(), hasher.finalize())?;
                    return Ok(Some((sink.commit().map_err(error)?, checksums)));
                }
            }
        }
        // The body failed: dropping the sink deletes what was written.
        Ok(None)
    });
    let pumped: S3Result<()> = async {
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| S3Error::with_message(S3ErrorCode::IncompleteBody, e.to_string()))?
        {
            if send.send(Message::Data(chunk)).await.is_err() {
                break;
            }
        }
        expected.trailer(trailers.as_ref().and_then(|t| t.take()).as_ref());
        _ = send.send(Message::Commit(expected)).await;
        Ok(())
    }
    .await;
    drop(send);
    let written = writer
        .await
        .map_err(|e| s3_error!(InternalError, "a store task failed: {e}"))?;
    pumped?;
    written?.ok_or_else(|| s3_error!(IncompleteBody, "the body ended early"))
}

/// An object's bytes as a response body, read on a blocking thread a stripe at a time; the
/// transfer's turn is held until the last byte is read or the response is dropped.
fn read_body(
    mut reader: crate::engine::ObjectReader,
    turn: tokio::sync::OwnedSemaphorePermit,
) -> StreamingBlob {
    let (send, receive) = tokio::sync::mpsc::channel::<Result<Bytes, StoreError>>(2);
    // The producer ends when the reader is done or the receiver (the response) is dropped.
    drop(tokio::task::spawn_blocking(move || {
        let _turn = turn;
        while let Some(chunk) = reader.next_chunk() {
            let failed = chunk.is_err();
            if send.blocking_send(chunk.map(Bytes::from)).is_err() || failed {
                return;
            }
        }
    }));
    StreamingBlob::wrap(Chunks(receive))
}

struct Chunks(tokio::sync::mpsc::Receiver<Result<Bytes, StoreError>>);

impl futures::Stream for Chunks {
    type Item = Result<Bytes, StoreError>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// What an object's metadata says, as S3 output fields.
struct Shown {
    content_type: Option<String>,
    content_encoding: Option<String>,
    content_disposition: Option<String>,
    content_language: Option<String>,
    cache_control: Option<String>,
    expires: Option<Timestamp>,
    metadata: Option<Metadata>,
}

fn shown(meta: &ObjectMeta) -> Shown {
    let header = |name: &str| meta.headers.get(name).cloned();
    Shown {
        content_type: header("content-type"),
        content_encoding: header("content-encoding"),
        content_disposition: header("content-disposition"),
        content_language: header("content-language"),
        cache_control: header("cache-control"),
        expires: header("expires")
            .and_then(|t| Timestamp::parse(TimestampFormat::HttpDate, &t).ok()),
        metadata: (!meta.user.is_empty()).then(|| {
            meta.user
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }),
    }
}

#[allow(clippy::too_many_arguments)]
fn meta_of(
    content_type: Option<String>,
    content_encoding: Option<String>,
    content_disposition: Option<String>,
    content_language: Option<String>,
    cache_control: Option<String>,
    expires: Option<Timestamp>,
    metadata: Option<Metadata>,
) -> ObjectMeta {
    let mut meta = ObjectMeta::default();
    for (name, value) in KEPT_HEADERS.iter().zip([
        content_type,
        content_encoding,
        content_disposition,
        content_language,
        cache_control,
        expires.and_then(|t| {
            let mut out = Vec::new();
            t.format(TimestampFormat::HttpDate, &mut out).ok()?;
            String::from_utf8(out).ok()
        }),
    ]) {
        if let Some(value) = value {
            meta.headers.insert(name.to_string(), value);
        }
    }
    meta.user = metadata.unwrap_or_default().into_iter().collect();
    meta
}

fn key_of<T>(req: &S3Request<T>) -> S3Result<String> {
    req.credentials
        .as_ref()
        .map(|c| c.access_key.clone())
        .ok_or_else(|| {
            s3_error!(
                AccessDenied,
                "sign the request with an access key (maru store keys create)"
            )
        })
}

/// Access keys authenticate requests and limit them to their buckets.
struct Keys {
    store: Arc<Store>,
    rate: Arc<KeyRates>,
    guard: Option<Arc<dyn ObjectGuard>>,
}

#[async_trait::async_trait]
impl S3Auth for Keys {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        let store = self.store.clone();
        let id = access_key.to_string();
        match blocking(move || store.access_key(&id)).await? {
            Some((_, secret)) => Ok(SecretKey::from(secret)),
            None => Err(s3_error!(
                InvalidAccessKeyId,
                "the access key is not known to this store"
            )),
        }
    }
}

#[async_trait::async_trait]
impl S3Access for Keys {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let Some(credentials) = cx.credentials() else {
            return Err(s3_error!(
                AccessDenied,
                "anonymous requests are refused: sign with an access key"
            ));
        };
        if !self.rate.take(&credentials.access_key) {
            return Err(s3_error!(
                SlowDown,
                "this access key is over its {} requests per second; retry with backoff",
                self.rate.per_second
            ));
        }
        let bucket = match cx.s3_path() {
            S3Path::Root => return Ok(()),
            S3Path::Bucket { bucket } | S3Path::Object { bucket, .. } => bucket.to_string(),
        };
        let write = !matches!(*cx.method(), http::Method::GET | http::Method::HEAD);
        allowed(
            &self.store,
            self.guard.as_ref(),
            &credentials.access_key,
            &bucket,
            write,
        )
        .await
    }
}

/// The key's scope, then the node's data policy.
async fn allowed(
    store: &Arc<Store>,
    guard: Option<&Arc<dyn ObjectGuard>>,
    access_key: &str,
    bucket: &str,
    write: bool,
) -> S3Result<()> {
    let store = store.clone();
    let id = access_key.to_string();
    let key = blocking(move || store.access_key(&id)).await?;
    let key = match key {
        Some((key, _)) if key.allows(bucket) => key,
        Some(_) => {
            return Err(s3_error!(
                AccessDenied,
                "this access key may not use bucket {bucket}"
            ));
        }
        None => return Err(s3_error!(InvalidAccessKeyId)),
    };
    let Some(guard) = guard.cloned() else {
        return Ok(());
    };
    let name = bucket.to_string();
    let decided = tokio::task::spawn_blocking(move || guard.admit(&key, &name, write))
        .await
        .map_err(|e| s3_error!(InternalError, "the access check failed: {e}"))?;
    decided.map_err(|why| s3_error!(AccessDenied, "{why}"))
}

struct Api {
    store: Arc<Store>,
    limits: S3Limits,
    transfers: Arc<tokio::sync::Semaphore>,
    guard: Option<Arc<dyn ObjectGuard>>,
}

impl Api {
    /// A turn to move a body, waiting at most `transfer_wait`.
    async fn transfer(&self) -> S3Result<tokio::sync::OwnedSemaphorePermit> {
        match tokio::time::timeout(
            self.limits.transfer_wait,
            self.transfers.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(s3_error!(
                SlowDown,
                "the store is moving {} bodies at once; retry",
                self.limits.transfers_max
            )),
        }
    }

    async fn read(
        &self,
        bucket: String,
        key: String,
        range: Option<Range>,
    ) -> S3Result<(
        ObjectInfo,
        ObjectMeta,
        crate::engine::ObjectReader,
        Option<(u64, u64)>,
    )> {
        let store = self.store.clone();
        let (info, _) = {
            let (store, bucket, key) = (store.clone(), bucket.clone(), key.clone());
            blocking(move || store.head(&bucket, &key)).await?
        };
        let span = match range {
            Some(range) if info.size > 0 => {
                let r = range.check(info.size)?;
                Some((r.start, r.end - 1))
            }
            Some(_) => return Err(s3_error!(InvalidRange, "the object is empty")),
            None => None,
        };
        let (info, meta, reader) = blocking(move || store.get(&bucket, &key, span)).await?;
        Ok((info, meta, reader, span))
    }

    /// Copy (a range of) `source` into `sink`.
    async fn copy_into<W: Sink>(
        &self,
        source: (String, String),
        range: Option<(u64, u64)>,
        sink: impl FnOnce(u64, ObjectMeta) -> Result<W, StoreError> + Send + 'static,
    ) -> S3Result<W::Done> {
        let _turn = self.transfer().await?;
        let store = self.store.clone();
        blocking(move || {
            let (_, meta, mut reader) = store.get(&source.0, &source.1, range)?;
            let mut sink = sink(reader.remaining(), meta)?;
            while let Some(chunk) = reader.next_chunk() {
                sink.write(&chunk?)?;
            }
            sink.commit()
        })
        .await
    }
}

fn copy_source(source: &CopySource) -> S3Result<(String, String)> {
    match source {
        CopySource::Bucket { bucket, key, .. } => Ok((bucket.to_string(), key.to_string())),
        _ => Err(s3_error!(NotImplemented, "copy sources must be BUCKET/KEY")),
    }
}

fn parse_copy_range(text: &str) -> S3Result<(u64, u64)> {
    let bad = || {
        s3_error!(
            InvalidArgument,
            "x-amz-copy-source-range must be bytes=FIRST-LAST"
        )
    };
    let (first, last) = text
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .ok_or_else(bad)?;
    let (first, last): (u64, u64) = (
        first.parse().map_err(|_| bad())?,
        last.parse().map_err(|_| bad())?,
    );
    if first > last {
        return Err(bad());
    }
    Ok((first, last))
}

fn max_keys(asked: Option<i32>) -> usize {
    asked.map(|n| n.clamp(0, 1000) as usize).unwrap_or(1000)
}

fn hex_token(key: &str) -> String {
    crate::records::hex(key.as_bytes())
}

fn unhex_token(token: &str) -> S3Result<String> {
    crate::records::unhex(token)
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            s3_error!(
                InvalidArgument,
                "the continuation token is not one this store gave"
            )
        })
}

fn object_entry(info: &ObjectInfo) -> Object {
    Object {
        key: Some(info.key.clone()),
        size: Some(info.size as i64),
        e_tag: Some(etag(&info.etag)),
        last_modified: Some(timestamp(info.modified_ms)),
        storage_class: Some(ObjectStorageClass::from_static(
            ObjectStorageClass::STANDARD,
        )),
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl S3 for Api {
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let access = key_of(&req)?;
        let store = self.store.clone();
        let (key, buckets) =
            blocking(move || Ok((store.access_key(&access)?, store.buckets()?))).await?;
        let key = key.ok_or_else(|| s3_error!(InvalidAccessKeyId))?.0;
        let buckets = buckets
            .into_iter()
            .filter(|(name, _)| key.allows(name))
            .map(|(name, record)| Bucket {
                name: Some(name),
                creation_date: Some(timestamp(record.created_ms)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            ..Default::default()
        }))
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let store = self.store.clone();
        let bucket = req.input.bucket.clone();
        blocking(move || store.create_bucket(&bucket)).await?;
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{}", req.input.bucket)),
        }))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        let store = self.store.clone();
        blocking(move || store.bucket(&req.input.bucket)).await?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        let store = self.store.clone();
        blocking(move || store.bucket(&req.input.bucket)).await?;
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    async fn get_bucket_versioning(
        &self,
        req: S3Request<GetBucketVersioningInput>,
    ) -> S3Result<S3Response<GetBucketVersioningOutput>> {
        let store = self.store.clone();
        blocking(move || store.bucket(&req.input.bucket)).await?;
        Ok(S3Response::new(GetBucketVersioningOutput::default()))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let store = self.store.clone();
        blocking(move || store.delete_bucket(&req.input.bucket)).await?;
        Ok(S3Response::new(DeleteBucketOutput::default()))
    }

    async fn put_object(
        &self,
        mut req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let input = &mut req.input;
        let body = input
            .body
            .take()
            .unwrap_or_else(|| StreamingBlob::from(s3s::Body::empty()));
        let size = declared_size(&body, input.content_length)?;
        if size > self.limits.object_bytes_max {
            return Err(s3_error!(
                EntityTooLarge,
                "{size} bytes is over this store's {} for one PUT; use a multipart upload",
                self.limits.object_bytes_max
            ));
        }
        if let Some(ETagCondition::Any) = input.if_none_match {
            let store = self.store.clone();
            let (bucket, key) = (input.bucket.clone(), input.key.clone());
            match blocking(move || store.head(&bucket, &key)).await {
                Ok(_) => {
                    return Err(s3_error!(
                        PreconditionFailed,
                        "the object exists (If-None-Match: *)"
                    ));
                }
                Err(e) if *e.code() == S3ErrorCode::NoSuchKey => {}
                Err(e) => return Err(e),
            }
        }
        let expected = Expected::new(
            input.content_md5.as_deref(),
            Checksum {
                checksum_crc32: input.checksum_crc32.clone(),
                checksum_crc32c: input.checksum_crc32c.clone(),
                checksum_sha1: input.checksum_sha1.clone(),
                checksum_sha256: input.checksum_sha256.clone(),
                checksum_crc64nvme: input.checksum_crc64nvme.clone(),
                ..Default::default()
            },
            input.checksum_algorithm.as_ref(),
        )?;
        let meta = meta_of(
            input.content_type.take(),
            input.content_encoding.take(),
            input.content_disposition.take(),
            input.content_language.take(),
            input.cache_control.take(),
            input.expires.take(),
            input.metadata.take(),
        );
        let _turn = self.transfer().await?;
        let store = self.store.clone();
        let (bucket, key) = (input.bucket.clone(), input.key.clone());
        let writer = blocking(move || store.put(&bucket, &key, size, meta)).await?;
        let (info, checksums) =
            write_body(writer, body, expected, req.trailing_headers.take()).await?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(etag(&info.etag)),
            checksum_crc32: checksums.checksum_crc32,
            checksum_crc32c: checksums.checksum_crc32c,
            checksum_sha1: checksums.checksum_sha1,
            checksum_sha256: checksums.checksum_sha256,
            checksum_crc64nvme: checksums.checksum_crc64nvme,
            size: Some(info.size as i64),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        let turn = self.transfer().await?;
        let (info, meta, reader, span) = self.read(input.bucket, input.key, input.range).await?;
        preconditions(
            &info,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        )?;
        let shown = shown(&meta);
        let length = reader.remaining();
        Ok(S3Response::new(GetObjectOutput {
            body: Some(read_body(reader, turn)),
            content_length: Some(length as i64),
            content_range: span.map(|(first, last)| format!("bytes {first}-{last}/{}", info.size)),
            accept_ranges: Some("bytes".into()),
            e_tag: Some(etag(&info.etag)),
            last_modified: Some(timestamp(info.modified_ms)),
            content_type: shown.content_type,
            content_encoding: shown.content_encoding,
            content_disposition: shown.content_disposition,
            content_language: shown.content_language,
            cache_control: shown.cache_control,
            expires: shown.expires,
            metadata: shown.metadata,
            parts_count: (info.parts > 1).then_some(info.parts as i32),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let input = req.input;
        let store = self.store.clone();
        let (bucket, key) = (input.bucket.clone(), input.key.clone());
        let (info, meta) = blocking(move || store.head(&bucket, &key)).await?;
        preconditions(
            &info,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        )?;
        let shown = shown(&meta);
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(info.size as i64),
            accept_ranges: Some("bytes".into()),
            e_tag: Some(etag(&info.etag)),
            last_modified: Some(timestamp(info.modified_ms)),
            content_type: shown.content_type,
            content_encoding: shown.content_encoding,
            content_disposition: shown.content_disposition,
            content_language: shown.content_language,
            cache_control: shown.cache_control,
            expires: shown.expires,
            metadata: shown.metadata,
            parts_count: (info.parts > 1).then_some(info.parts as i32),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let store = self.store.clone();
        blocking(move || store.delete(&req.input.bucket, &req.input.key)).await?;
        Ok(S3Response::with_status(
            DeleteObjectOutput::default(),
            http::StatusCode::NO_CONTENT,
        ))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let input = req.input;
        if input.delete.objects.len() > 1000 {
            return Err(s3_error!(
                MalformedXML,
                "at most 1000 keys per DeleteObjects"
            ));
        }
        let quiet = input.delete.quiet.unwrap_or(false);
        let store = self.store.clone();
        let bucket = input.bucket.clone();
        let keys: Vec<String> = input.delete.objects.into_iter().map(|o| o.key).collect();
        let results = blocking(move || {
            Ok(keys
                .into_iter()
                .map(|key| {
                    let result = store.delete(&bucket, &key);
                    (key, result)
                })
                .collect::<Vec<_>>())
        })
        .await?;
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for (key, result) in results {
            match result {
                Ok(()) => {
                    if !quiet {
                        deleted.push(DeletedObject {
                            key: Some(key),
                            ..Default::default()
                        });
                    }
                }
                Err(e) => {
                    let e = error(e);
                    errors.push(Error {
                        code: Some(e.code().as_str().to_string()),
                        key: Some(key),
                        message: e.message().map(str::to_string),
                        ..Default::default()
                    });
                }
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: (!errors.is_empty()).then_some(errors),
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let access = key_of(&req)?;
        let input = req.input;
        let source = copy_source(&input.copy_source)?;
        allowed(&self.store, self.guard.as_ref(), &access, &source.0, false).await?;
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        let new_meta = replace.then(|| {
            meta_of(
                input.content_type.clone(),
                input.content_encoding.clone(),
                input.content_disposition.clone(),
                input.content_language.clone(),
                input.cache_control.clone(),
                input.expires.clone(),
                input.metadata.clone(),
            )
        });
        if source == (input.bucket.clone(), input.key.clone()) && !replace {
            return Err(s3_error!(
                InvalidRequest,
                "copying an object onto itself needs x-amz-metadata-directive: REPLACE"
            ));
        }
        let store = self.store.clone();
        let (bucket, key) = (input.bucket.clone(), input.key.clone());
        let limit = self.limits.object_bytes_max;
        let info = self
            .copy_into(source, None, move |size, meta| {
                if size > limit {
                    return Err(StoreError::InvalidPart(format!(
                        "{size} bytes is over this store's {limit} for one copy; use UploadPartCopy"
                    )));
                }
                store.put(&bucket, &key, size, new_meta.unwrap_or(meta))
            })
            .await?;
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(etag(&info.etag)),
                last_modified: Some(timestamp(info.modified_ms)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        let after = match &input.continuation_token {
            Some(token) => Some(unhex_token(token)?),
            None => input.start_after.clone(),
        };
        let max = max_keys(input.max_keys);
        let store = self.store.clone();
        let (bucket, prefix, delimiter) = (
            input.bucket.clone(),
            input.prefix.clone().unwrap_or_default(),
            input.delimiter.clone(),
        );
        let listing = blocking(move || {
            store.list(
                &bucket,
                &prefix,
                delimiter.as_deref(),
                after.as_deref(),
                max,
            )
        })
        .await?;
        let count = listing.objects.len() + listing.common_prefixes.len();
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: input.prefix,
            delimiter: input.delimiter,
            max_keys: Some(max as i32),
            key_count: Some(count as i32),
            continuation_token: input.continuation_token,
            start_after: input.start_after,
            is_truncated: Some(listing.next.is_some()),
            next_continuation_token: listing.next.as_deref().map(hex_token),
            contents: Some(listing.objects.iter().map(object_entry).collect()),
            common_prefixes: Some(
                listing
                    .common_prefixes
                    .into_iter()
                    .map(|p| CommonPrefix { prefix: Some(p) })
                    .collect(),
            ),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let input = req.input;
        let max = max_keys(input.max_keys);
        let store = self.store.clone();
        let (bucket, prefix, delimiter, after) = (
            input.bucket.clone(),
            input.prefix.clone().unwrap_or_default(),
            input.delimiter.clone(),
            input.marker.clone(),
        );
        let listing = blocking(move || {
            store.list(
                &bucket,
                &prefix,
                delimiter.as_deref(),
                after.as_deref(),
                max,
            )
        })
        .await?;
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: input.prefix,
            delimiter: input.delimiter,
            marker: input.marker,
            max_keys: Some(max as i32),
            is_truncated: Some(listing.next.is_some()),
            next_marker: listing.next.clone(),
            contents: Some(listing.objects.iter().map(object_entry).collect()),
            common_prefixes: Some(
                listing
                    .common_prefixes
                    .into_iter()
                    .map(|p| CommonPrefix { prefix: Some(p) })
                    .collect(),
            ),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let input = req.input;
        let meta = meta_of(
            input.content_type,
            input.content_encoding,
            input.content_disposition,
            input.content_language,
            input.cache_control,
            input.expires,
            input.metadata,
        );
        let store = self.store.clone();
        let (bucket, key) = (input.bucket.clone(), input.key.clone());
        let upload = blocking(move || store.create_upload(&bucket, &key, meta)).await?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        mut req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let input = &mut req.input;
        let body = input
            .body
            .take()
            .unwrap_or_else(|| StreamingBlob::from(s3s::Body::empty()));
        let size = declared_size(&body, input.content_length)?;
        if size > self.limits.part_bytes_max {
            return Err(s3_error!(
                EntityTooLarge,
                "a part is at most {} bytes",
                self.limits.part_bytes_max
            ));
        }
        let number = u32::try_from(input.part_number)
            .map_err(|_| s3_error!(InvalidArgument, "part numbers are 1-10000"))?;
        let expected = Expected::new(
            input.content_md5.as_deref(),
            Checksum {
                checksum_crc32: input.checksum_crc32.clone(),
                checksum_crc32c: input.checksum_crc32c.clone(),
                checksum_sha1: input.checksum_sha1.clone(),
                checksum_sha256: input.checksum_sha256.clone(),
                checksum_crc64nvme: input.checksum_crc64nvme.clone(),
                ..Default::default()
            },
            input.checksum_algorithm.as_ref(),
        )?;
        let _turn = self.transfer().await?;
        let store = self.store.clone();
        let upload = input.upload_id.clone();
        let writer = blocking(move || store.put_part(&upload, number, size)).await?;
        let (etag_text, checksums) =
            write_body(writer, body, expected, req.trailing_headers.take()).await?;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(etag(&etag_text)),
            checksum_crc32: checksums.checksum_crc32,
            checksum_crc32c: checksums.checksum_crc32c,
            checksum_sha1: checksums.checksum_sha1,
            checksum_sha256: checksums.checksum_sha256,
            checksum_crc64nvme: checksums.checksum_crc64nvme,
            ..Default::default()
        }))
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        let access = key_of(&req)?;
        let input = req.input;
        let source = copy_source(&input.copy_source)?;
        allowed(&self.store, self.guard.as_ref(), &access, &source.0, false).await?;
        let range = input
            .copy_source_range
            .as_deref()
            .map(parse_copy_range)
            .transpose()?;
        let number = u32::try_from(input.part_number)
            .map_err(|_| s3_error!(InvalidArgument, "part numbers are 1-10000"))?;
        let store = self.store.clone();
        let upload = input.upload_id.clone();
        let limit = self.limits.part_bytes_max;
        let etag_text = self
            .copy_into(source, range, move |size, _| {
                if size > limit {
                    return Err(StoreError::InvalidPart(format!(
                        "a part is at most {limit} bytes"
                    )));
                }
                store.put_part(&upload, number, size)
            })
            .await?;
        Ok(S3Response::new(UploadPartCopyOutput {
            copy_part_result: Some(CopyPartResult {
                e_tag: Some(etag(&etag_text)),
                last_modified: Some(Timestamp::from(SystemTime::now())),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let input = req.input;
        let parts = input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default();
        let mut listed = Vec::with_capacity(parts.len());
        for part in parts {
            let number = part
                .part_number
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| s3_error!(InvalidPart, "a part has no number"))?;
            let tag = part
                .e_tag
                .map(|t| t.value().to_string())
                .ok_or_else(|| s3_error!(InvalidPart, "part {number} has no ETag"))?;
            listed.push((number, tag));
        }
        let store = self.store.clone();
        let upload = input.upload_id.clone();
        let info = blocking(move || store.complete_upload(&upload, &listed)).await?;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(info.key.clone()),
            e_tag: Some(etag(&info.etag)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let store = self.store.clone();
        blocking(move || store.abort_upload(&req.input.upload_id)).await?;
        Ok(S3Response::with_status(
            AbortMultipartUploadOutput::default(),
            http::StatusCode::NO_CONTENT,
        ))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let input = req.input;
        let store = self.store.clone();
        let upload = input.upload_id.clone();
        let (info, parts) = blocking(move || store.parts(&upload)).await?;
        let after = input.part_number_marker.unwrap_or(0).max(0) as u32;
        let max = max_keys(input.max_parts);
        let remaining: Vec<_> = parts.into_iter().filter(|p| p.number > after).collect();
        let truncated = remaining.len() > max;
        let page: Vec<_> = remaining.into_iter().take(max).collect();
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(info.bucket),
            key: Some(info.key),
            upload_id: Some(info.upload_id),
            max_parts: Some(max as i32),
            part_number_marker: input.part_number_marker,
            is_truncated: Some(truncated),
            next_part_number_marker: page.last().filter(|_| truncated).map(|p| p.number as i32),
            parts: Some(
                page.iter()
                    .map(|p| Part {
                        part_number: Some(p.number as i32),
                        size: Some(p.size as i64),
                        e_tag: Some(etag(&p.etag)),
                        last_modified: Some(timestamp(p.modified_ms)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let input = req.input;
        let store = self.store.clone();
        let bucket = input.bucket.clone();
        let uploads = blocking(move || store.uploads(&bucket)).await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max = max_keys(input.max_uploads);
        let matching: Vec<_> = uploads
            .into_iter()
            .filter(|u| u.key.starts_with(&prefix))
            .filter(|u| {
                input
                    .key_marker
                    .as_ref()
                    .is_none_or(|m| u.key.as_str() > m.as_str())
            })
            .collect();
        let truncated = matching.len() > max;
        let page: Vec<_> = matching.into_iter().take(max).collect();
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: input.prefix,
            max_uploads: Some(max as i32),
            is_truncated: Some(truncated),
            next_key_marker: page.last().filter(|_| truncated).map(|u| u.key.clone()),
            uploads: Some(
                page.into_iter()
                    .map(|u| MultipartUpload {
                        key: Some(u.key),
                        upload_id: Some(u.upload_id),
                        initiated: Some(timestamp(u.created_ms)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_under_a_domain_name_their_bucket() {
        let domains =
            Domains::new(&["s3.example.org".into(), "Example.org".into()]).expect("valid domains");
        assert_eq!(domains.bucket("photos.s3.example.org"), Some("photos"));
        assert_eq!(domains.bucket("photos.s3.example.org:9000"), Some("photos"));
        assert_eq!(domains.bucket("Photos.S3.Example.Org."), Some("Photos"));
        assert_eq!(domains.bucket("a.b.example.org"), Some("a.b"));
        assert_eq!(
            domains.bucket("s3.example.org"),
            None,
            "a domain itself is path-style"
        );
        assert_eq!(domains.bucket("example.org:9000"), None);
        assert_eq!(domains.bucket(".example.org"), None);
        assert_eq!(domains.bucket("localhost:9000"), None);
        assert_eq!(domains.bucket("photosexample.org"), None);
        assert_eq!(domains.bucket(""), None);
        for bad in [
            "",
            "http://x.org",
            ".x.org",
            "x.org:9000",
            "127.0.0.1",
            "a..b",
            "-a.b",
        ] {
            assert!(Domains::new(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_key_gets_a_seconds_worth_then_waits() {
        let rates = KeyRates::new(5);
        let granted = (0..20).filter(|_| rates.take("a")).count();
        assert_eq!(granted, 5);
        assert!(rates.take("b"), "another key has its own bucket");
        std::thread::sleep(Duration::from_millis(450));
        assert!(rates.take("a"), "tokens come back at the sustained rate");
    }

    #[test]
    fn the_rate_map_stays_bounded() {
        let rates = KeyRates::new(1000);
        for i in 0..(3 * KEY_RATES_MAX) {
            assert!(rates.take(&format!("key{i}")));
        }
        assert!(rates.keys.lock().expect("lock").len() <= KEY_RATES_MAX);
    }
}
