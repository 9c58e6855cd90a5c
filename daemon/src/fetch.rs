//! The read path for one chunk: local store -> peers that hold it -> its home node -> origin.
//!
//! Two coalescing tables keep each chunk's fetch single-flight within this node:
//! - `in_flight`: the full path for local readers (peers, home, origin);
//! - `home_in_flight`: the home path (local store, then origin) that serves peers asking
//!   this node to fetch as the chunk's home. It never forwards to another node, so home
//!   requests cannot loop between nodes whose membership views differ.
//!
//! A fetch task stores the chunk before it leaves its table, so a reader arriving later
//! finds it locally.
//!
//! Invariants: every byte returned was hash-checked (by the store on read, by the data
//! plane for peers, by the origin client on download). A peer that sends corrupt bytes is
//! penalised by the mesh and the chunk is fetched elsewhere. A chunk that the store cannot
//! keep (no room, disk full) is still returned: the cache never makes a read fail.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use cachemesh_proto::{ChunkId, ObjectId};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::mesh::Mesh;
use crate::origin::{Origin, OriginError};
use crate::store::{Store, StoreError};

/// Where a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The local store.
    Local,
    /// A peer that held it.
    Peer,
    /// The chunk's home node (which had it or fetched it from the origin).
    Home,
    /// The origin, directly.
    Origin,
}

impl Source {
    /// Label used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Peer => "peer",
            Self::Home => "home",
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

type SharedFetch = Shared<BoxFuture<'static, Result<(Bytes, Source), FetchError>>>;

#[derive(Clone, Default)]
struct Coalescer {
    /// A std mutex: never held across an `.await`.
    table: Arc<Mutex<HashMap<ChunkId, SharedFetch>>>,
}

impl Coalescer {
    fn join_or_start<F>(&self, id: ChunkId, start: impl FnOnce() -> F) -> SharedFetch
    where
        F: std::future::Future<Output = Result<(Bytes, Source), FetchError>> + Send + 'static,
    {
        let mut table = self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(fetch) = table.get(&id) {
            return fetch.clone();
        }
        let work = start();
        let table_handle = self.table.clone();
        let task = tokio::spawn(async move {
            let result = work.await;
            table_handle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
            result
        });
        let fetch = async move { task.await.map_err(|_| FetchError::Interrupted(id))? }.boxed().shared();
        table.insert(id, fetch.clone());
        fetch
    }
}

/// What a read knows about the object it reads, shared by its chunk fetches.
#[derive(Debug)]
pub struct ObjectContext {
    /// The object.
    pub object: ObjectId,
}

/// Fetches chunks across the tiers.
#[derive(Clone)]
pub struct Fetcher {
    store: Store,
    origin: Arc<Origin>,
    mesh: Arc<OnceLock<Arc<Mesh>>>,
    in_flight: Coalescer,
    home_in_flight: Coalescer,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A fetcher over the local store and the origin; the mesh, if any, is attached later.
    pub fn new(store: Store, origin: Arc<Origin>) -> Self {
        Self {
            store,
            origin,
            mesh: Arc::new(OnceLock::new()),
            in_flight: Coalescer::default(),
            home_in_flight: Coalescer::default(),
        }
    }

    /// Attaches the mesh (once, at start-up).
    pub fn attach_mesh(&self, mesh: Arc<Mesh>) {
        let _ = self.mesh.set(mesh);
    }

    /// The mesh, when this node is part of one.
    pub fn mesh(&self) -> Option<&Arc<Mesh>> {
        self.mesh.get()
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
    ///
    /// `context` names the object and the chunk's index in it, so that peers holding the
    /// object can be asked for it.
    pub async fn chunk(
        &self,
        id: ChunkId,
        context: Option<(&Arc<ObjectContext>, usize)>,
    ) -> Result<(Bytes, Source), FetchError> {
        let started = Instant::now();
        if let Some(bytes) = self.store.read_chunk(&id).await.map_err(|error| FetchError::Store(Arc::new(error)))? {
            record(Source::Local, started);
            return Ok((bytes, Source::Local));
        }
        let fetcher = self.clone();
        let context = context.map(|(context, index)| (context.clone(), index));
        let (bytes, source) =
            self.in_flight.join_or_start(id, move || async move { fetcher.fetch_missing(id, context).await }).await?;
        record(source, started);
        Ok((bytes, source))
    }

    /// The home path: this node's copy, or one coalesced origin fetch. Serves peers that ask
    /// this node to fetch as the chunk's home; never forwards to another node.
    pub async fn home_chunk(&self, id: ChunkId) -> Result<Bytes, FetchError> {
        if let Some(bytes) = self.store.read_chunk(&id).await.map_err(|error| FetchError::Store(Arc::new(error)))? {
            return Ok(bytes);
        }
        let fetcher = self.clone();
        let (bytes, _) = self
            .home_in_flight
            .join_or_start(id, move || async move {
                let bytes = fetcher.fetch_from_origin(id).await?;
                Ok((bytes, Source::Origin))
            })
            .await?;
        Ok(bytes)
    }

    async fn fetch_missing(
        &self,
        id: ChunkId,
        context: Option<(Arc<ObjectContext>, usize)>,
    ) -> Result<(Bytes, Source), FetchError> {
        let Some(mesh) = self.mesh.get().cloned() else {
            return Ok((self.fetch_from_origin(id).await?, Source::Origin));
        };
        let (context, index) = match context {
            Some((context, index)) => (Some(context), index),
            None => (None, 0),
        };
        if let Some(context) = &context
            && let Some(bytes) = mesh.fetch_from_holders(context.object, index, id).await
        {
            self.keep(id, &bytes, context.object, &mesh).await;
            return Ok((bytes, Source::Peer));
        }
        for home in mesh.home_order(&id) {
            match home {
                None => {
                    // This node is the home: coalesce with peers' home requests.
                    let bytes = self.home_chunk(id).await?;
                    if let Some(context) = &context {
                        mesh.provide(context.object).await;
                    }
                    return Ok((bytes, Source::Origin));
                }
                Some(peer) => {
                    if let Some(bytes) = mesh.fetch_from_home(&peer, id).await {
                        if let Some(context) = &context {
                            self.keep(id, &bytes, context.object, &mesh).await;
                        } else {
                            self.store_quietly(id, &bytes).await;
                        }
                        return Ok((bytes, Source::Home));
                    }
                }
            }
        }
        // Every home candidate failed: go to the origin ourselves.
        let bytes = self.fetch_from_origin(id).await?;
        if let Some(context) = &context {
            mesh.provide(context.object).await;
        }
        Ok((bytes, Source::Origin))
    }

    async fn keep(&self, id: ChunkId, bytes: &Bytes, object: ObjectId, mesh: &Mesh) {
        if self.store_quietly(id, bytes).await {
            mesh.provide(object).await;
        }
    }

    async fn store_quietly(&self, id: ChunkId, bytes: &Bytes) -> bool {
        match self.store.write_chunk(id, bytes.clone()).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(chunk = %id, %error, "could not keep a fetched chunk in the local store");
                metrics::counter!("cachemesh_store_write_errors_total").increment(1);
                false
            }
        }
    }

    async fn fetch_from_origin(&self, id: ChunkId) -> Result<Bytes, FetchError> {
        let bytes = match self.origin.get_chunk(&id).await {
            Ok(bytes) => bytes,
            Err(OriginError::NotFound { .. }) => return Err(FetchError::NotFound(id)),
            Err(error) => return Err(FetchError::Origin(Arc::new(error))),
        };
        self.store_quietly(id, &bytes).await;
        Ok(bytes)
    }
}

fn record(source: Source, started: Instant) {
    metrics::histogram!("cachemesh_chunk_fetch_seconds", "source" => source.label())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("cachemesh_chunk_fetches_total", "source" => source.label()).increment(1);
}
