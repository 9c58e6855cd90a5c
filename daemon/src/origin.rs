//! The origin: the object store behind the cache, through the `object_store` crate.
//!
//! `file:///dir` (or a bare absolute path) is a local directory, the default;
//! `s3://bucket/prefix` is S3 or an S3-compatible store, configured by the usual `AWS_*`
//! environment variables (`AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP` for S3-compatible stores).
//!
//! Layout: chunks at `chunks/<chunk id>`, manifests at `objects/<object id>`. Both are
//! written create-only (`PutMode::Create`): content addressing makes an existing key
//! already right, so a lost race is success, and a chunk the origin has is not sent again.
//! Volumes keep their logs and snapshots under `volumes/` (see `crate::volume`); for those
//! keys a lost create race is *not* success, so [`Origin::create`] reports it.
//!
//! Invariants:
//! - Every chunk and manifest read from the origin is hash-checked here; a mismatch is
//!   [`OriginError::Corrupt`], never returned bytes.
//! - At most `concurrency` requests are in flight; reads are bounded by
//!   `CHUNK_BYTES_MAX` / `MANIFEST_BYTES_MAX` before the body is collected.
//! - Transient failures of S3 are retried by `object_store` with exponential backoff,
//!   bounded by [`ORIGIN_RETRIES_MAX`] and [`ORIGIN_RETRY_TIMEOUT`], so an outage becomes a
//!   clear error within seconds rather than a hang.
//! - A read fails when the origin sends nothing for [`ORIGIN_STALL_TIMEOUT`] (`crate::stall`),
//!   [`ORIGIN_STALL_RESUMES_MAX`] + 1 times in a row: a body that keeps arriving is never cut
//!   off, however many requests share the origin's link; one that stops is resumed on a fresh
//!   request from the first byte not yet received (objects are immutable), and given up
//!   when that stalls too. Every request as a whole is
//!   bounded only by the generous [`ORIGIN_REQUEST_TIMEOUT`], which is what bounds a write.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachemesh_proto::limits::{CHUNK_BYTES_MAX, MANIFEST_BYTES_MAX};
use cachemesh_proto::{ChunkId, Manifest, ObjectId};
use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tokio::sync::Semaphore;

use crate::chunk::VerifiedChunk;
use crate::relay::{Relay, RelayFeed};
use crate::stall::{Progress, Stalled, until_stalled};
use crate::store::{DIRECT_IO_ALIGN, aligned_vec, direct_eligible};

/// Retries of one origin request after a transient failure.
pub const ORIGIN_RETRIES_MAX: usize = 3;
/// Longest time spent retrying one origin request.
pub const ORIGIN_RETRY_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for a read's answer or the next quantum of its body before it fails as
/// stalled. On a slow or busy origin link a 4 MiB chunk may take minutes while still
/// moving; cutting it off at a fixed time (the S3 client's default is 30 s) throws away
/// what arrived and fails the reads waiting on it.
pub const ORIGIN_STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Fresh requests for the rest of a read whose body stalled, before the read fails.
///
/// Why: on a busy origin link one of many TCP connections can lose its packets again and
/// again and back off for tens of seconds while the link stays busy with the others; a
/// fresh connection asking for the remaining bytes is served at once. Measured: 16 hosts
/// reading a fresh 256 MiB object through a 25 Mbit origin link (64 chunk downloads at
/// once) lost a reader to a chunk whose body stopped for 15 s (docs/benchmarks.md,
/// 2026-12-01). One resume: a second stall in a row is taken for an origin that is down.
pub const ORIGIN_STALL_RESUMES_MAX: usize = 1;
/// Longest time for any one S3 request, reads and writes alike: a safety net for a request
/// that hangs, not a pace to keep (a 4 MiB chunk needs only about 110 kbit/s to make it).
pub const ORIGIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Default cap on origin requests in flight.
pub const ORIGIN_CONCURRENCY_DEFAULT: usize = 16;

/// Errors talking to the origin, each naming the key concerned.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The origin URL or its settings are unusable.
    #[error("origin {url}: {detail}")]
    Config {
        /// The URL.
        url: String,
        /// What is wrong.
        detail: String,
    },
    /// The key does not exist.
    #[error("origin has no {key}")]
    NotFound {
        /// The key.
        key: String,
    },
    /// The origin could not be reached or failed the request.
    #[error("origin request for {key} failed: {source}")]
    Unavailable {
        /// The key.
        key: String,
        /// The cause.
        source: object_store::Error,
    },
    /// The origin returned bytes that do not match their id.
    #[error("origin returned corrupt bytes for {key}")]
    Corrupt {
        /// The key.
        key: String,
    },
    /// The origin holds a value larger than its limit.
    #[error("origin value {key} has {size} bytes, over its limit")]
    TooLarge {
        /// The key.
        key: String,
        /// Its size.
        size: u64,
    },
}

/// The origin object store.
pub struct Origin {
    store: Arc<dyn ObjectStore>,
    description: String,
    permits: Semaphore,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin").field("description", &self.description).finish()
    }
}

fn chunk_key(id: &ChunkId) -> StorePath {
    StorePath::from(format!("chunks/{id}"))
}

fn manifest_key(id: &ObjectId) -> StorePath {
    StorePath::from(format!("objects/{id}"))
}

/// `AmazonS3Builder::from_env`, with [`ORIGIN_REQUEST_TIMEOUT`] for a whole request instead
/// of the client's 30 s; `AWS_TIMEOUT` still overrides it. (The client's own read timeout
/// is no stall guard: it also fires while a slow upload is still sending its body.)
fn s3_builder_from_env() -> object_store::aws::AmazonS3Builder {
    let options = object_store::ClientOptions::new().with_timeout(ORIGIN_REQUEST_TIMEOUT);
    let mut builder = object_store::aws::AmazonS3Builder::new().with_client_options(options);
    for (key, value) in std::env::vars() {
        if key.starts_with("AWS_")
            && let Ok(key) = key.to_ascii_lowercase().parse::<object_store::aws::AmazonS3ConfigKey>()
        {
            builder = builder.with_config(key, value);
        }
    }
    builder
}

fn config_error(url: &str, detail: impl std::fmt::Display) -> OriginError {
    OriginError::Config { url: url.to_string(), detail: detail.to_string() }
}

impl Origin {
    /// Opens the origin at `url` with at most `concurrency` requests in flight.
    pub fn open(url: &str, concurrency: usize) -> Result<Self, OriginError> {
        let (store, description): (Arc<dyn ObjectStore>, String) = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(config_error(url, "an s3:// URL names a bucket: s3://BUCKET/PREFIX"));
            }
            let retry = object_store::RetryConfig {
                max_retries: ORIGIN_RETRIES_MAX,
                retry_timeout: ORIGIN_RETRY_TIMEOUT,
                backoff: object_store::BackoffConfig::default(),
            };
            let s3 = s3_builder_from_env()
                .with_bucket_name(bucket)
                .with_retry(retry)
                .build()
                .map_err(|error| config_error(url, error))?;
            let prefix = prefix.trim_matches('/');
            let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
            };
            (store, format!("s3://{bucket}/{prefix}"))
        } else {
            let path = match url.strip_prefix("file://") {
                Some(path) => path,
                None if url.starts_with('/') => url,
                None => {
                    return Err(config_error(
                        url,
                        "the origin is file:///ABSOLUTE/DIR, /ABSOLUTE/DIR or s3://BUCKET/PREFIX",
                    ));
                }
            };
            if !path.starts_with('/') {
                return Err(config_error(url, "a file origin needs an absolute path (file:///dir)"));
            }
            std::fs::create_dir_all(path)
                .map_err(|error| config_error(url, format!("cannot create the directory: {error}")))?;
            let local = object_store::local::LocalFileSystem::new_with_prefix(path)
                .map_err(|error| config_error(url, error))?;
            (Arc::new(local), format!("file://{path}"))
        };
        Ok(Self { store, description, permits: Semaphore::new(concurrency.max(1)) })
    }

    /// The origin URL, without credentials.
    pub fn description(&self) -> &str {
        &self.description
    }

    async fn permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        // The semaphore is never closed.
        match self.permits.acquire().await {
            Ok(permit) => permit,
            Err(_) => unreachable_closed(),
        }
    }

    async fn get_bounded(&self, key: &StorePath, limit: u64) -> Result<Bytes, OriginError> {
        Ok(self.get_bounded_relayed(key, limit, None).await?.0)
    }

    /// Like `get_bounded`; when `relay` is given and not fed yet, the body also feeds it
    /// as it arrives (the feed is returned, for the caller to finish once it verified).
    async fn get_bounded_relayed(
        &self,
        key: &StorePath,
        limit: u64,
        relay: Option<&Arc<Relay>>,
    ) -> Result<(Bytes, Option<RelayFeed>), OriginError> {
        let _permit = self.permit().await;
        let started = Instant::now();
        // The body (aligned, so the store can write the chunk past the page cache; `start`
        // is where it begins) once the size is known, and the relay feed, across resumes.
        let mut body: Option<(Vec<u8>, usize, u64)> = None;
        let mut feed: Option<RelayFeed> = None;
        let mut resumes = 0;
        let result = loop {
            metrics::counter!("cachemesh_origin_requests_total", "op" => "get").increment(1);
            let received = body.as_ref().map_or(0, |(bytes, start, _)| bytes.len() - start) as u64;
            let progress = Progress::new(tokio::time::Instant::now());
            let read = async {
                let options =
                    GetOptions { range: (received > 0).then_some(GetRange::Offset(received)), ..GetOptions::default() };
                let response = self.store.get_opts(key, options).await?;
                progress.mark(tokio::time::Instant::now());
                let size = response.meta.size;
                if size > limit {
                    return Ok(Err(size));
                }
                if response.range.start != received {
                    return Err(object_store::Error::Generic {
                        store: "origin",
                        source: format!("asked for bytes from {received}, got {:?}", response.range).into(),
                    });
                }
                if let Some((_, _, known)) = &body
                    && *known != size
                {
                    return Err(object_store::Error::Generic {
                        store: "origin",
                        source: format!("the object was {known} bytes, and {size} when resumed").into(),
                    });
                }
                // `size <= limit`, and every limit here fits in memory.
                let (bytes, start, _) = body.get_or_insert_with(|| {
                    feed = relay.and_then(|relay| relay.claim(size as usize));
                    let (bytes, start) = aligned_vec(size as usize);
                    (bytes, start, size)
                });
                let mut stream = response.into_stream();
                while let Some(piece) = stream.next().await {
                    let piece = piece?;
                    progress.advance(piece.len() as u64, tokio::time::Instant::now());
                    metrics::counter!("cachemesh_origin_bytes_total", "direction" => "download")
                        .increment(piece.len() as u64);
                    let received = (bytes.len() - *start + piece.len()) as u64;
                    if received > limit {
                        return Ok(Err(received));
                    }
                    bytes.extend_from_slice(&piece);
                    if let Some(feed) = feed.as_mut() {
                        feed.push(&bytes[*start..]);
                    }
                }
                Ok(Ok(()))
            };
            match until_stalled(ORIGIN_STALL_TIMEOUT, &progress, read).await {
                Ok(outcome) => break outcome,
                // Every byte arrived; only the end of the body did not.
                Err(Stalled)
                    if body.as_ref().is_some_and(|(bytes, start, size)| (bytes.len() - start) as u64 == *size) =>
                {
                    break Ok(Ok(()));
                }
                Err(Stalled) if resumes < ORIGIN_STALL_RESUMES_MAX => {
                    resumes += 1;
                    metrics::counter!("cachemesh_origin_stall_resumes_total").increment(1);
                    let received = body.as_ref().map_or(0, |(bytes, start, _)| bytes.len() - start);
                    tracing::debug!(%key, received, "origin read stalled; asking afresh for the rest");
                }
                Err(Stalled) => {
                    break Err(object_store::Error::Generic {
                        store: "origin",
                        source: format!(
                            "no bytes for {} s, {} times in a row: the read stalled",
                            ORIGIN_STALL_TIMEOUT.as_secs(),
                            resumes + 1
                        )
                        .into(),
                    });
                }
            }
        };
        let result = result.map(|outcome| {
            outcome.map(|()| {
                let (bytes, start, _) = body.unwrap_or_else(|| (Vec::new(), 0, 0));
                (Bytes::from(bytes).slice(start..), feed)
            })
        });
        metrics::histogram!("cachemesh_origin_request_seconds", "op" => "get").record(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok((bytes, feed))) => Ok((bytes, feed)),
            Ok(Err(size)) => Err(OriginError::TooLarge { key: key.to_string(), size }),
            Err(object_store::Error::NotFound { .. }) => Err(OriginError::NotFound { key: key.to_string() }),
            Err(source) => {
                metrics::counter!("cachemesh_origin_errors_total", "op" => "get").increment(1);
                Err(OriginError::Unavailable { key: key.to_string(), source })
            }
        }
    }

    /// Fetches a chunk and checks its hash.
    /// With `relay`, the chunk also feeds it while it downloads (see [`Relay::claim`]); the
    /// feed ends verified only if the chunk checks.
    pub async fn get_chunk(&self, id: &ChunkId, relay: Option<&Arc<Relay>>) -> Result<VerifiedChunk, OriginError> {
        let key = chunk_key(id);
        let (bytes, feed) = self.get_bounded_relayed(&key, u64::from(CHUNK_BYTES_MAX), relay).await?;
        let bytes = aligned_for_store(bytes);
        let chunk = VerifiedChunk::check(*id, bytes).map_err(|_| {
            metrics::counter!("cachemesh_verify_failures_total", "source" => "origin").increment(1);
            OriginError::Corrupt { key: key.to_string() }
        })?;
        if let Some(feed) = feed {
            feed.finish(&chunk);
        }
        Ok(chunk)
    }

    /// Fetches a manifest, checks it hashes to `id` and decodes it.
    pub async fn get_manifest(&self, id: &ObjectId) -> Result<Manifest, OriginError> {
        let key = manifest_key(id);
        let bytes = self.get_bounded(&key, MANIFEST_BYTES_MAX as u64).await?;
        if ObjectId::of(&bytes) != *id {
            metrics::counter!("cachemesh_verify_failures_total", "source" => "origin").increment(1);
            return Err(OriginError::Corrupt { key: key.to_string() });
        }
        Manifest::decode(&bytes).map_err(|_| OriginError::Corrupt { key: key.to_string() })
    }

    async fn exists(&self, key: &StorePath) -> Result<bool, OriginError> {
        let _permit = self.permit().await;
        metrics::counter!("cachemesh_origin_requests_total", "op" => "head").increment(1);
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => {
                metrics::counter!("cachemesh_origin_errors_total", "op" => "head").increment(1);
                Err(OriginError::Unavailable { key: key.to_string(), source })
            }
        }
    }

    /// Writes `data` at `key` unless it exists; true when it was uploaded.
    async fn put_create(&self, key: StorePath, data: Bytes) -> Result<bool, OriginError> {
        if self.exists(&key).await? {
            return Ok(false);
        }
        // Content-addressed: whoever wrote it first wrote the same bytes.
        Ok(self.create_at(key, data).await? == Created::Written)
    }

    /// Uploads a chunk unless the origin has it; true when it was uploaded.
    pub async fn put_chunk(&self, id: &ChunkId, data: Bytes) -> Result<bool, OriginError> {
        self.put_create(chunk_key(id), data).await
    }

    /// Publishes a manifest. Callers upload every chunk first.
    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<ObjectId, OriginError> {
        let encoded = Bytes::from(manifest.encode());
        let id = ObjectId::of(&encoded);
        self.put_create(manifest_key(&id), encoded).await?;
        Ok(id)
    }
}

/// `bytes` in memory the store can write past the page cache (see `store::io`): as they
/// are when they already are, else copied when they are whole blocks (a full chunk; one
/// memory copy costs less than the page cache copy of a buffered write); a short last
/// chunk as it is.
fn aligned_for_store(bytes: Bytes) -> Bytes {
    if !bytes.len().is_multiple_of(DIRECT_IO_ALIGN) || direct_eligible(&bytes) {
        return bytes;
    }
    let (mut buffer, start) = aligned_vec(bytes.len());
    buffer.extend_from_slice(&bytes);
    Bytes::from(buffer).slice(start..)
}

/// Outcome of [`Origin::create`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// This call wrote the key.
    Written,
    /// The key existed already; nothing was written.
    AlreadyExists,
}

impl Origin {
    /// Writes `data` at `key` only if the key does not exist (one conditional put, no HEAD
    /// first), and says which happened. The atomic step of a volume log append.
    pub async fn create(&self, key: &str, data: Bytes) -> Result<Created, OriginError> {
        self.create_at(StorePath::from(key), data).await
    }

    async fn create_at(&self, key: StorePath, data: Bytes) -> Result<Created, OriginError> {
        let _permit = self.permit().await;
        let started = Instant::now();
        let length = data.len() as u64;
        metrics::counter!("cachemesh_origin_requests_total", "op" => "put").increment(1);
        let options = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        let result = self.store.put_opts(&key, PutPayload::from_bytes(data), options).await;
        metrics::histogram!("cachemesh_origin_request_seconds", "op" => "put").record(started.elapsed().as_secs_f64());
        match result {
            Ok(_) => {
                metrics::counter!("cachemesh_origin_bytes_total", "direction" => "upload").increment(length);
                Ok(Created::Written)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::AlreadyExists),
            Err(source) => {
                metrics::counter!("cachemesh_origin_errors_total", "op" => "put").increment(1);
                Err(OriginError::Unavailable { key: key.to_string(), source })
            }
        }
    }

    /// The value at `key`, refused with [`OriginError::TooLarge`] before its body is read
    /// when it is over `limit` bytes. Not hash-checked: the caller validates it.
    pub async fn get_value(&self, key: &str, limit: u64) -> Result<Bytes, OriginError> {
        self.get_bounded(&StorePath::from(key), limit).await
    }

    /// The greatest key under `prefix` (keys compared as strings), or `None` when there is
    /// none. Streams the listing, so memory stays constant however many keys there are.
    pub async fn last_key(&self, prefix: &str) -> Result<Option<String>, OriginError> {
        use futures::TryStreamExt;
        let prefix = StorePath::from(prefix);
        let _permit = self.permit().await;
        let started = Instant::now();
        metrics::counter!("cachemesh_origin_requests_total", "op" => "list").increment(1);
        let mut listing = self.store.list(Some(&prefix));
        let mut last: Option<String> = None;
        let result = async {
            while let Some(meta) = listing.try_next().await? {
                let key = meta.location.to_string();
                if last.as_ref().is_none_or(|last| key > *last) {
                    last = Some(key);
                }
            }
            Ok::<_, object_store::Error>(())
        }
        .await;
        metrics::histogram!("cachemesh_origin_request_seconds", "op" => "list").record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => Ok(last),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => {
                metrics::counter!("cachemesh_origin_errors_total", "op" => "list").increment(1);
                Err(OriginError::Unavailable { key: prefix.to_string(), source })
            }
        }
    }
}

#[cold]
fn unreachable_closed() -> ! {
    // Our own invariant: `permits` is owned here and never closed.
    panic!("origin semaphore closed")
}
