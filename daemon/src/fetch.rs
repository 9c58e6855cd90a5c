//! The read path for one chunk: local store, then the origin.
//!
//! Concurrent requests for one chunk within this node are coalesced: the first starts a
//! fetch task, the others wait on the same shared result, so a chunk is fetched from the
//! origin once however many readers want it at the same moment. The fetch task stores the
//! chunk before it leaves the in-flight table, so a reader arriving later finds it locally.
//!
//! Invariants: every byte returned was hash-checked (by the store on read, by the origin
//! client on download). A chunk that the store cannot keep (no room, disk full) is still
//! returned to the reader: the cache is an optimisation, never a reason to fail a read.
//!
//! Non-goals (yet): peers and home nodes; they slot in between the two tiers here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use cachemesh_proto::ChunkId;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::origin::{Origin, OriginError};
use crate::store::{Store, StoreError};

/// Where a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The local store.
    Local,
    /// The origin.
    Origin,
}

impl Source {
    /// Label used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Origin => "origin",
        }
    }
}

/// Why a chunk could not be had. Cloneable: one failure reaches every coalesced reader.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// No tier has the chunk.
    #[error("chunk {0} is in no cache and not in the origin")]
    NotFound(ChunkId),
    /// The origin failed.
    #[error(transparent)]
    Origin(Arc<OriginError>),
    /// The local store failed.
    #[error(transparent)]
    Store(Arc<StoreError>),
    /// The fetch task died.
    #[error("fetch of chunk {0} was interrupted")]
    Interrupted(ChunkId),
}

type SharedFetch = Shared<BoxFuture<'static, Result<Bytes, FetchError>>>;

/// Fetches chunks across the tiers.
#[derive(Clone)]
pub struct Fetcher {
    store: Store,
    origin: Arc<Origin>,
    /// A std mutex: never held across an `.await`.
    in_flight: Arc<Mutex<HashMap<ChunkId, SharedFetch>>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A fetcher over these tiers.
    pub fn new(store: Store, origin: Arc<Origin>) -> Self {
        Self { store, origin, in_flight: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// The local store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The origin.
    pub fn origin(&self) -> &Arc<Origin> {
        &self.origin
    }

    /// Returns the verified bytes of chunk `id` and where they came from.
    pub async fn chunk(&self, id: ChunkId) -> Result<(Bytes, Source), FetchError> {
        let started = Instant::now();
        if let Some(bytes) = self.store.read_chunk(&id).await.map_err(|error| FetchError::Store(Arc::new(error)))? {
            record(Source::Local, started);
            return Ok((bytes, Source::Local));
        }
        let fetch = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match in_flight.get(&id) {
                Some(fetch) => fetch.clone(),
                None => {
                    let fetch = self.start_fetch(id);
                    in_flight.insert(id, fetch.clone());
                    fetch
                }
            }
        };
        let bytes = fetch.await?;
        record(Source::Origin, started);
        Ok((bytes, Source::Origin))
    }

    fn start_fetch(&self, id: ChunkId) -> SharedFetch {
        let fetcher = self.clone();
        let task = tokio::spawn(async move {
            let result = fetcher.fetch_from_origin(id).await;
            fetcher.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
            result
        });
        async move { task.await.map_err(|_| FetchError::Interrupted(id))? }.boxed().shared()
    }

    async fn fetch_from_origin(&self, id: ChunkId) -> Result<Bytes, FetchError> {
        let bytes = match self.origin.get_chunk(&id).await {
            Ok(bytes) => bytes,
            Err(OriginError::NotFound { .. }) => return Err(FetchError::NotFound(id)),
            Err(error) => return Err(FetchError::Origin(Arc::new(error))),
        };
        if let Err(error) = self.store.write_chunk(id, bytes.clone()).await {
            tracing::warn!(chunk = %id, %error, "could not keep a fetched chunk in the local store");
            metrics::counter!("cachemesh_store_write_errors_total").increment(1);
        }
        Ok(bytes)
    }
}

fn record(source: Source, started: Instant) {
    metrics::histogram!("cachemesh_chunk_fetch_seconds", "source" => source.label())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("cachemesh_chunk_fetches_total", "source" => source.label()).increment(1);
}
