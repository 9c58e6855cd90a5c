//! The read path for one chunk: local store -> peers that hold it -> its home node -> origin.
//!
//! Two coalescing tables keep each chunk's fetch single-flight within this node:
//! - `in_flight`: the full path for local readers (peers, home, origin);
//! - `home_in_flight`: the home path (local store, then origin) that serves peers asking
//!   this node to fetch as the chunk's home. It never forwards to another node, so home
//!   requests cannot loop between nodes whose membership views differ.
//!
//! A fetch hands its verified bytes to every waiting reader first, then stores the chunk,
//! and only then leaves its table: a reader arriving while the chunk is being written joins
//! the finished fetch and gets the bytes at once, and one arriving later finds the chunk
//! locally. Writing the chunk (temp file, `fdatasync`, rename, directory `fsync`) is thus
//! off the reader's path, but bounded: at most [`PENDING_WRITES_MAX`] fetched chunks wait
//! to be written, and a fetch that would exceed it holds its bytes until a write finishes,
//! so a disk slower than the network slows readers instead of growing memory.
//!
//! Invariants: every byte returned was hash-checked (by the store on read, by the data
//! plane for peers, by the origin client on download). A peer that sends corrupt bytes is
//! penalised by the mesh and the chunk is fetched elsewhere. A chunk that the store cannot
//! keep (no room, disk full) is still returned: the cache never makes a read fail.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use cachemesh_proto::{ChunkId, Manifest, ObjectId};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::{Semaphore, oneshot};

use crate::chunk::VerifiedChunk;
use crate::mesh::{Attempt, HOLDER_ATTEMPTS_MAX, Holders, Mesh, holder_order};
use crate::origin::{Origin, OriginError};
use crate::relay::{Relay, RelayReader, StripeReader};
use crate::store::{Store, StoreError};
use crate::stripe::{StripeEntry, StripeTable};
use crate::transport::{PeerTarget, StripeAnswer};
use cachemesh_proto::frames::{stripe_bytes, stripe_length, stripe_pieces};

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

/// Why this node could not answer a peer's stripe request.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// Reading the chunk, or fetching it as its home, failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// As a relayer: this node is the chunk's first home candidate in its own view of the
    /// DC (the asker's differs), or holds `STRIPES_HELD_MAX` stripes already.
    #[error("cannot relay this stripe: this node is the chunk's home in its view, or holds too many stripes")]
    CannotRelay,
    /// As a relayer: its fetch of the stripe from the chunk's home failed.
    #[error("fetching the stripe from the chunk's home failed")]
    FetchFailed,
}

/// Fetched chunks that may wait to be written to the store at once (64 MiB of 4 MiB chunks):
/// enough to keep a read window and a few home fetches moving while the disk syncs.
pub const PENDING_WRITES_MAX: usize = 16;

type SharedFetch = Shared<BoxFuture<'static, Result<(Bytes, Source), FetchError>>>;

/// What a fetch produced: the verified bytes, and the work left once readers have them.
struct Fetched {
    bytes: Bytes,
    source: Source,
    /// Storing the chunk (and announcing the object), run after the bytes are handed out.
    after: Option<BoxFuture<'static, ()>>,
}

impl Fetched {
    fn done(bytes: Bytes, source: Source) -> Self {
        Self { bytes, source, after: None }
    }
}

/// Resolves once a fetch's bytes are handed out and its chunk is written (or failed to be).
type Settled = Shared<BoxFuture<'static, ()>>;

/// One fetch in a coalescing table.
#[derive(Clone)]
struct InFlight {
    answer: SharedFetch,
    settled: Settled,
    /// The chunk as it arrives, for peers waiting on this node as its home.
    relay: Option<Arc<Relay>>,
}

/// What this node, as a chunk's home, answers a peer with.
pub enum HomeAnswer {
    /// The verified chunk.
    Whole(Bytes),
    /// The chunk while it arrives (see `relay`), and the fetch's verified answer.
    Arriving {
        /// The chunk's length.
        length: usize,
        /// The arriving bytes.
        reader: RelayReader,
        /// The fetch's verified bytes.
        answer: BoxFuture<'static, Result<Bytes, FetchError>>,
    },
}

#[derive(Clone)]
struct Coalescer {
    /// A std mutex: never held across an `.await`.
    table: Arc<Mutex<HashMap<ChunkId, InFlight>>>,
    /// Permits for fetched chunks waiting to be written; shared by the fetcher's tables.
    pending_writes: Arc<Semaphore>,
}

impl Coalescer {
    fn new(pending_writes: Arc<Semaphore>) -> Self {
        Self { table: Arc::default(), pending_writes }
    }

    /// Joins the fetch of `id` in flight, or starts one with `start`, which is given the
    /// new entry's relay when `relayed`.
    fn join_or_start<F>(&self, id: ChunkId, relayed: bool, start: impl FnOnce(Option<Arc<Relay>>) -> F) -> InFlight
    where
        F: std::future::Future<Output = Result<Fetched, FetchError>> + Send + 'static,
    {
        let mut table = self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(fetch) = table.get(&id) {
            return fetch.clone();
        }
        let relay = relayed.then(Relay::new);
        let work = start(relay.clone());
        let table_handle = self.table.clone();
        let pending_writes = self.pending_writes.clone();
        let (answer, answered) = oneshot::channel();
        let (settle, settled) = oneshot::channel::<()>();
        tokio::spawn(async move {
            // Dropped when this task ends, however it ends: that settles the entry.
            let _settle = settle;
            match work.await {
                Ok(Fetched { bytes, source, after }) => {
                    // Taken before the bytes are handed out: a full queue of writes holds
                    // this fetch's readers back, which bounds the bytes waiting for disk.
                    let permit = match &after {
                        Some(_) => pending_writes.acquire_owned().await.ok(),
                        None => None,
                    };
                    let _ = answer.send(Ok((bytes, source)));
                    if let Some(after) = after {
                        after.await;
                    }
                    drop(permit);
                }
                Err(error) => {
                    let _ = answer.send(Err(error));
                }
            }
            table_handle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
        });
        let answer = async move { answered.await.map_err(|_| FetchError::Interrupted(id))? }.boxed().shared();
        let settled = async move {
            let _ = settled.await;
        }
        .boxed()
        .shared();
        let entry = InFlight { answer, settled, relay };
        table.insert(id, entry.clone());
        entry
    }
}

/// What a read knows about the object it reads, shared by its chunk fetches.
#[derive(Debug)]
pub struct ObjectContext {
    /// The object.
    pub object: ObjectId,
    /// The object's length in bytes.
    length: u64,
    /// Bytes per chunk (all but the last).
    chunk_bytes: u32,
}

impl ObjectContext {
    /// The context of a read of `object`, as its manifest describes it.
    pub fn new(object: ObjectId, manifest: &Manifest) -> Self {
        Self { object, length: manifest.length(), chunk_bytes: manifest.chunk_bytes() }
    }

    /// The length of chunk `index`, None past the object's end.
    pub fn chunk_length(&self, index: usize) -> Option<usize> {
        let start = (index as u64).checked_mul(u64::from(self.chunk_bytes))?;
        (start < self.length).then(|| (self.length - start).min(u64::from(self.chunk_bytes)) as usize)
    }
}

/// Fetches chunks across the tiers.
#[derive(Clone)]
pub struct Fetcher {
    store: Store,
    origin: Arc<Origin>,
    mesh: Arc<OnceLock<Arc<Mesh>>>,
    in_flight: Coalescer,
    home_in_flight: Coalescer,
    pending_writes: Arc<Semaphore>,
    /// Stripes this node relays for peers (`crate::stripe`).
    stripes: StripeTable,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A fetcher over the local store and the origin; the mesh, if any, is attached later.
    pub fn new(store: Store, origin: Arc<Origin>) -> Self {
        let pending_writes = Arc::new(Semaphore::new(PENDING_WRITES_MAX));
        Self {
            store,
            origin,
            mesh: Arc::new(OnceLock::new()),
            in_flight: Coalescer::new(pending_writes.clone()),
            home_in_flight: Coalescer::new(pending_writes.clone()),
            pending_writes,
            stripes: StripeTable::default(),
        }
    }

    /// Waits until every fetched chunk handed out so far is written to the store (or failed
    /// to be): at shutdown, so that a clean stop keeps what was fetched.
    pub async fn flush_pending_writes(&self) {
        let permits = u32::try_from(PENDING_WRITES_MAX).unwrap_or(u32::MAX);
        let _ = self.pending_writes.acquire_many(permits).await;
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
        let (bytes, source, _) = self.fetch(id, context).await?;
        Ok((bytes, source))
    }

    /// Like [`Fetcher::chunk`], but returns only once the chunk is written to the local store
    /// (or its write failed): for prefetch and pin, whose point is the local copy.
    pub async fn warm(&self, id: ChunkId, context: Option<(&Arc<ObjectContext>, usize)>) -> Result<Source, FetchError> {
        let (bytes, source, settled) = self.fetch(id, context).await?;
        metrics::counter!("cachemesh_bytes_warmed_total", "source" => source.label()).increment(bytes.len() as u64);
        if let Some(settled) = settled {
            settled.await;
        }
        Ok(source)
    }

    async fn fetch(
        &self,
        id: ChunkId,
        context: Option<(&Arc<ObjectContext>, usize)>,
    ) -> Result<(Bytes, Source, Option<Settled>), FetchError> {
        let started = Instant::now();
        if let Some(bytes) = self.store.read_chunk(&id).await.map_err(|error| FetchError::Store(Arc::new(error)))? {
            record(Source::Local, started);
            return Ok((bytes, Source::Local, None));
        }
        let fetcher = self.clone();
        let context = context.map(|(context, index)| (context.clone(), index));
        let entry =
            self.in_flight.join_or_start(id, false, move |_| async move { fetcher.fetch_missing(id, context).await });
        let (bytes, source) = entry.answer.await?;
        record(source, started);
        Ok((bytes, source, Some(entry.settled)))
    }

    /// The home path: this node's copy, else one coalesced fetch from the holders of the
    /// object `of` names (chunk index given), else from the origin. Serves peers that ask
    /// this node to fetch as the chunk's home; never forwards to another home node, so home
    /// requests cannot loop.
    ///
    /// When the fetch has started receiving the chunk before it is done, the answer is the
    /// chunk as it arrives ([`HomeAnswer::Arriving`]), so the peer's copy follows this
    /// node's a few pieces behind instead of a whole chunk's transfer later.
    pub async fn home_chunk(&self, id: ChunkId, of: Option<(ObjectId, usize)>) -> Result<HomeAnswer, FetchError> {
        if let Some(bytes) = self.store.read_chunk(&id).await.map_err(|error| FetchError::Store(Arc::new(error)))? {
            return Ok(HomeAnswer::Whole(bytes));
        }
        let entry = self.home_in_flight_entry(id, of);
        let Some(relay) = entry.relay else { return Ok(HomeAnswer::Whole(entry.answer.await?.0)) };
        let mut reader = relay.reader();
        let answer = entry.answer;
        tokio::select! {
            biased;
            done = answer.clone() => Ok(HomeAnswer::Whole(done?.0)),
            length = reader.length() => match length {
                Ok(length) => {
                    let answer = async move { answer.await.map(|(bytes, _)| bytes) }.boxed();
                    Ok(HomeAnswer::Arriving { length, reader, answer })
                }
                Err(_) => Ok(HomeAnswer::Whole(answer.await?.0)),
            },
        }
    }

    /// Stripe `stripe` (of how many) of chunk `id` (the chunk at `of`) for a peer: as the
    /// chunk's home (`from_home`: this node's copy, else its home fetch as it arrives), or
    /// as the stripe's relayer (this node's copy, else the stripe fetched once from the
    /// chunk's home, as it arrives). See `crate::stripe`.
    pub async fn stripe_for_peer(
        &self,
        id: ChunkId,
        of: (ObjectId, usize),
        stripe: (u16, u16),
        from_home: bool,
    ) -> Result<StripeAnswer, StripeError> {
        // A stripe this node relays is answered from memory while it is kept, rather than
        // by reading (and checking) the whole chunk from disk once per reader.
        if !from_home
            && let Some(entry) = self.stripes.get(id, stripe)
            && let Some(reader) = entry.reader().await
        {
            return Ok(StripeAnswer::Arriving(reader));
        }
        if let Some(bytes) = self.store.read_chunk(&id).await.map_err(|error| FetchError::Store(Arc::new(error)))? {
            return Ok(StripeAnswer::Whole(stripe_bytes(&bytes, stripe.0, stripe.1).into()));
        }
        if from_home {
            return Ok(match self.home_chunk(id, Some(of)).await? {
                HomeAnswer::Whole(bytes) => StripeAnswer::Whole(stripe_bytes(&bytes, stripe.0, stripe.1).into()),
                HomeAnswer::Arriving { length, reader, .. } => {
                    StripeAnswer::Arriving(StripeReader::new(reader, stripe_pieces(length, stripe.0, stripe.1)))
                }
            });
        }
        let Some(entry) = self.relay_stripe(id, of, stripe, None) else {
            return Err(StripeError::CannotRelay);
        };
        entry.reader().await.map(StripeAnswer::Arriving).ok_or(StripeError::FetchFailed)
    }

    /// This node's relay of stripe `stripe` of chunk `id` (`length` bytes when known):
    /// joined, or started by asking the chunk's home for it. None when this node is the
    /// chunk's first home candidate (the asker's view of the DC differs; it asks the home
    /// itself) or holds too many stripes.
    fn relay_stripe(
        &self,
        id: ChunkId,
        of: (ObjectId, usize),
        stripe: (u16, u16),
        length: Option<usize>,
    ) -> Option<StripeEntry> {
        let mesh = self.mesh.get()?.clone();
        let home = mesh.object_home_order(&of.0, of.1, &[]).into_iter().next()??;
        let of = (of.0, u32::try_from(of.1).ok()?);
        self.stripes.join_or_start(id, stripe, move |relay| async move {
            mesh.fetch_stripe(&home, id, of, stripe, length, true, Some(&relay)).await
        })
    }

    /// Chunk `id` (at `of`, `length` bytes) assembled from its stripes, each from its
    /// relayer (this node's own from its relay), falling back to the home for a stripe its
    /// relayer cannot give; verified. None when the chunk is not striped (too few readers)
    /// or a stripe could not be had at all; the caller then asks the home for it whole.
    async fn fetch_striped(
        &self,
        mesh: &Arc<Mesh>,
        id: ChunkId,
        of: (ObjectId, usize),
        home: &PeerTarget,
        length: usize,
    ) -> Option<VerifiedChunk> {
        let relayers = mesh.stripe_relayers(&of.0, of.1, home).await?;
        let stripes = u16::try_from(relayers.len()).ok()?;
        let wire_of = (of.0, u32::try_from(of.1).ok()?);
        let parts =
            futures::future::join_all(relayers.iter().cloned().enumerate().map(|(stripe, relayer)| async move {
                let stripe = (stripe as u16, stripes);
                let stripe_bytes = stripe_length(length, stripe.0, stripe.1);
                let relayed = match &relayer {
                    None => match self.relay_stripe(id, of, stripe, Some(stripe_bytes)) {
                        Some(entry) => entry.done.await,
                        None => None,
                    },
                    Some(peer) => mesh.fetch_stripe(peer, id, wire_of, stripe, Some(stripe_bytes), false, None).await,
                };
                match relayed {
                    Some(bytes) => Some((bytes, relayer)),
                    None => {
                        metrics::counter!("cachemesh_stripes_total", "outcome" => "from_home").increment(1);
                        let bytes =
                            mesh.fetch_stripe(home, id, wire_of, stripe, Some(stripe_bytes), true, None).await?;
                        Some((bytes, Some(*home)))
                    }
                }
            }))
            .await;
        let (mut body, start) = crate::store::aligned_vec(length);
        body.resize(start + length, 0);
        let mut sources = Vec::with_capacity(parts.len());
        for (stripe, part) in parts.into_iter().enumerate() {
            let (bytes, source) = part?;
            let mut at = 0;
            for range in stripe_pieces(length, stripe as u16, stripes) {
                let end = at + range.len();
                body[start + range.start..start + range.end].copy_from_slice(bytes.get(at..end)?);
                at = end;
            }
            sources.push((stripe as u16, bytes, source));
        }
        match VerifiedChunk::check(id, Bytes::from(body).slice(start..)) {
            Ok(chunk) => {
                metrics::counter!("cachemesh_stripes_total", "outcome" => "assembled").increment(1);
                Some(chunk)
            }
            Err(_) => {
                metrics::counter!("cachemesh_verify_failures_total", "source" => "stripes").increment(1);
                tracing::warn!(chunk = %id, "a chunk assembled from stripes failed its check; fetching it whole");
                let whole = mesh.race(vec![Attempt::Home(*home, Some(of))], id, Some(of)).await?.0;
                // Whoever sent a stripe that differs from the checked chunk sent corrupt bytes.
                for (stripe, bytes, source) in &sources {
                    if stripe_bytes(whole.bytes(), *stripe, stripes) != bytes[..]
                        && let Some(peer) = source
                    {
                        mesh.penalise_corrupt(peer, id);
                    }
                }
                Some(whole)
            }
        }
    }

    fn home_in_flight_entry(&self, id: ChunkId, of: Option<(ObjectId, usize)>) -> InFlight {
        let fetcher = self.clone();
        self.home_in_flight.join_or_start(
            id,
            true,
            move |relay| async move { fetcher.fetch_for_home(id, of, relay).await },
        )
    }

    async fn home_fetch(
        &self,
        id: ChunkId,
        of: Option<(ObjectId, usize)>,
    ) -> Result<(Bytes, Source, Option<Settled>), FetchError> {
        if let Some(bytes) = self.store.read_chunk(&id).await.map_err(|error| FetchError::Store(Arc::new(error)))? {
            return Ok((bytes, Source::Local, None));
        }
        let entry = self.home_in_flight_entry(id, of);
        let (bytes, source) = entry.answer.await?;
        Ok((bytes, source, Some(entry.settled)))
    }

    /// The home fetch proper; whatever answers first feeds `relay`.
    async fn fetch_for_home(
        &self,
        id: ChunkId,
        of: Option<(ObjectId, usize)>,
        relay: Option<Arc<Relay>>,
    ) -> Result<Fetched, FetchError> {
        if let (Some(mesh), Some((object, index))) = (self.mesh.get().cloned(), of)
            && let Some(chunk) = mesh.fetch_from_holders(object, index, id, relay.as_ref()).await
        {
            return Ok(self.keep(chunk, Source::Peer, Some(object)));
        }
        tracing::debug!(chunk = %id, "home fetch: no holder gave the chunk; fetching it from the origin");
        self.fetch_from_origin(id, of.map(|(object, _)| object), relay.as_ref()).await
    }

    /// This node, as the chunk's home, gets it (coalesced with peers' home requests); the
    /// object is announced once the chunk is stored.
    async fn fetch_as_home(
        &self,
        id: ChunkId,
        of: Option<(ObjectId, usize)>,
        mesh: Arc<Mesh>,
    ) -> Result<Fetched, FetchError> {
        let (bytes, source, stored) = self.home_fetch(id, of).await?;
        let after = async move {
            if let Some(stored) = stored {
                stored.await;
            }
            if let Some((object, _)) = of {
                mesh.provide(object).await;
            }
        };
        Ok(Fetched { after: Some(after.boxed()), ..Fetched::done(bytes, source) })
    }

    async fn fetch_missing(
        &self,
        id: ChunkId,
        context: Option<(Arc<ObjectContext>, usize)>,
    ) -> Result<Fetched, FetchError> {
        let Some(mesh) = self.mesh.get().cloned() else {
            return self.fetch_from_origin(id, None, None).await;
        };
        let (context, index) = match context {
            Some((context, index)) => (Some(context), index),
            None => (None, 0),
        };
        let of = context.as_ref().map(|context| (context.object, index));
        if let Some((object, index)) = of {
            let Holders { partial, complete } = mesh.holders(object, index).await;
            if !partial.is_empty() {
                // Holders still fetching, with whole-object holders on faster links as the
                // first hedges (`holder_order` says why). When these fail, the home path
                // below still reaches the others.
                let faster = mesh.faster_than_self(&complete);
                let order = holder_order(partial, faster).into_iter().map(Attempt::Holder).collect();
                if let Some((chunk, source)) = mesh.race(order, id, None).await {
                    return Ok(self.keep(chunk, source, Some(object)));
                }
            } else if !complete.is_empty() {
                // Only hosts holding the whole object have it. When many hosts read the
                // object at once, all would ask those few, whose upload then carries every
                // copy; instead the chunk's first home candidate that is not one of them
                // fetches it once for the DC and serves it to the others (and they to each
                // other, as holders). But a whole holder on a faster link than this node's
                // can send it the chunk at its full rate and keep upload to spare: ask those
                // first. They answer a reader only from an upload slot that is free now
                // (Busy otherwise), so one whose link is taken still sends each chunk once,
                // to its home.
                let home = mesh.object_home_order(&object, index, &complete).into_iter().next();
                if let Some(None) = home {
                    return self.fetch_as_home(id, of, mesh).await;
                }
                let faster: Vec<_> = mesh.faster_than_self(&complete).into_iter().take(HOLDER_ATTEMPTS_MAX).collect();
                if !faster.is_empty()
                    && let Some(chunk) = mesh.race_holders(faster, id).await
                {
                    return Ok(self.keep(chunk, Source::Peer, Some(object)));
                }
                // Not in stripes: with a whole holder, striped reads let chunks leave the
                // origin (measured: 4 of 64 with a fast seed); not traced yet.
                if let Some(Some(home)) = home
                    && let Some((chunk, source)) = mesh.race(vec![Attempt::Home(home, of)], id, of).await
                {
                    return Ok(self.keep(chunk, source, Some(object)));
                }
                let order = complete.into_iter().take(HOLDER_ATTEMPTS_MAX).collect();
                if let Some(chunk) = mesh.race_holders(order, id).await {
                    return Ok(self.keep(chunk, Source::Peer, Some(object)));
                }
            }
        }
        let homes = match of {
            Some((object, index)) => mesh.object_home_order(&object, index, &[]),
            None => mesh.home_order(&id),
        };
        for (rank, home) in homes.into_iter().enumerate() {
            match home {
                // This node is the home: coalesce with peers' home requests.
                None => return self.fetch_as_home(id, of, mesh).await,
                // Striped only from the first home: the others are asked when it failed.
                Some(peer) if rank == 0 => {
                    if let Some((chunk, source)) = self.ask_home(&mesh, id, &context, index, peer).await {
                        return Ok(self.keep(chunk, source, of.map(|(object, _)| object)));
                    }
                }
                Some(peer) => {
                    if let Some((chunk, source)) = mesh.race(vec![Attempt::Home(peer, of)], id, of).await {
                        return Ok(self.keep(chunk, source, of.map(|(object, _)| object)));
                    }
                }
            }
        }
        // Every home candidate failed: go to the origin ourselves.
        tracing::debug!(chunk = %id, "every home candidate failed; fetching the chunk from the origin");
        self.fetch_from_origin(id, context.as_ref().map(|context| context.object), None).await
    }

    /// Chunk `id` from its home `home`: in stripes when the read names the object and
    /// enough hosts read it (`crate::stripe`), else (or when striping failed) whole.
    async fn ask_home(
        &self,
        mesh: &Arc<Mesh>,
        id: ChunkId,
        context: &Option<Arc<ObjectContext>>,
        index: usize,
        home: PeerTarget,
    ) -> Option<(VerifiedChunk, Source)> {
        if let Some(context) = context
            && let Some(length) = context.chunk_length(index)
            && let Some(chunk) = self.fetch_striped(mesh, id, (context.object, index), &home, length).await
        {
            return Some((chunk, Source::Home));
        }
        let of = context.as_ref().map(|context| (context.object, index));
        mesh.race(vec![Attempt::Home(home, of)], id, of).await
    }

    /// The fetched bytes, with storing them (then announcing `object` in a mesh) left to
    /// run after readers have them.
    fn keep(&self, chunk: VerifiedChunk, source: Source, object: Option<ObjectId>) -> Fetched {
        let (store, mesh, bytes, id) =
            (self.store.clone(), self.mesh.get().cloned(), chunk.bytes().clone(), chunk.id());
        let after = async move {
            match store.write_chunk(chunk).await {
                Ok(()) => {
                    if let (Some(mesh), Some(object)) = (mesh, object) {
                        mesh.provide(object).await;
                    }
                }
                Err(error) => {
                    tracing::warn!(chunk = %id, %error, "could not keep a fetched chunk in the local store");
                    metrics::counter!("cachemesh_store_write_errors_total").increment(1);
                }
            }
        };
        Fetched { after: Some(after.boxed()), ..Fetched::done(bytes, source) }
    }

    /// The chunk from the origin, feeding `relay` when given.
    async fn fetch_from_origin(
        &self,
        id: ChunkId,
        object: Option<ObjectId>,
        relay: Option<&Arc<Relay>>,
    ) -> Result<Fetched, FetchError> {
        let chunk = match self.origin.get_chunk(&id, relay).await {
            Ok(chunk) => chunk,
            Err(OriginError::NotFound { .. }) => return Err(FetchError::NotFound(id)),
            Err(error) => return Err(FetchError::Origin(Arc::new(error))),
        };
        Ok(self.keep(chunk, Source::Origin, object))
    }
}

fn record(source: Source, started: Instant) {
    metrics::histogram!("cachemesh_chunk_fetch_seconds", "source" => source.label())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("cachemesh_chunk_fetches_total", "source" => source.label()).increment(1);
}
