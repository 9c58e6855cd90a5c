//! The mesh: this node's place in its datacenter, joining discovery (who is alive, who
//! holds which object) with the QUIC data plane (moving chunks).
//!
//! - Provider records are per object: a node provides an object as soon as it holds any
//!   chunk of it (after a put, after the first chunk fetched), again at start-up for every
//!   object it still holds, and withdraws it when a sweep finds none of its chunks left.
//! - To fetch a chunk from holders it asks up to [`HAVE_SET_FANOUT_MAX`] of the object's
//!   holders, the least loaded and up to [`WHOLE_HOLDERS_KEPT_MAX`] last seen holding all
//!   of it, for their have-set (a bitmap; one request per holder and object in flight,
//!   answers cached: a set bit for [`HAVE_SET_POSITIVE_TTL`], a clear one for
//!   [`HAVE_SET_TTL`]) and asks those that hold the chunk, least loaded first: only holders
//!   still fetching, when any has it, since whole-object holders are the DC's source of new
//!   chunks and are reached through the chunks' homes. When the first is slower than the
//!   hedge delay ([`crate::hedge`]) the next is asked too and the first verified answer
//!   wins. A peer that sends corrupt bytes is penalised for [`PEER_PENALTY`].
//! - While a reader waits on a chunk's home node, it looks again for holders now and then
//!   ([`Mesh::race`]): readers served before it hold the chunk too. A home fetching from
//!   holders waits its turn in their lines for upload slots rather than go to the origin,
//!   and passes the chunk on to the peers waiting on it while it arrives ([`crate::relay`]).
//! - Holders of an object are its DHT providers plus the peers that asked this node for
//!   its have-set: a peer asking is fetching the object and serves what it has so far.
//! - The home order of a chunk (rendezvous hashing over the live members and this node)
//!   says which node fetches it from the origin for the whole DC.
//!
//! Non-goals: deciding what to prefetch; that is the caller's.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachemesh_proto::api::{MeshStatus, PeerStatus};
use cachemesh_proto::frames::have_set_contains;
use cachemesh_proto::{ChunkId, ObjectId};
use futures::future::{BoxFuture, Shared};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use libp2p::{Multiaddr, PeerId};
use lru::LruCache;
use tokio_util::sync::CancellationToken;

use crate::chunk::VerifiedChunk;
pub use crate::discovery::parse_listen_addr;
use crate::discovery::{BootstrapAddr, Discovery, DiscoveryConfig};
use crate::fetch::{FetchError, Fetcher, HomeAnswer, Source, StripeError};
use crate::hedge::HedgePolicy;
use crate::identity::{ClusterKey, NodeIdentity};
use crate::placement::{Position, home_order, object_home_order};
use crate::relay::Relay;
use crate::stripe::{STRIPE_READERS_MIN, relayer_order};
use crate::transport::{
    ChunkService, DataPlane, DataPlaneConfig, HomeChunk, HomeFetchError, PeerError, PeerTarget, StripeAnswer,
};

/// How long a have-set answer is trusted to say a holder lacks a chunk: holders that are
/// still downloading gain chunks quickly.
pub const HAVE_SET_TTL: Duration = Duration::from_secs(2);
/// How long a have-set answer is trusted to say a holder has a chunk: holders rarely evict
/// what they just fetched, and a wrong guess costs one NotFound answer.
pub const HAVE_SET_POSITIVE_TTL: Duration = Duration::from_secs(30);
/// How long a provider lookup is trusted when it found at least [`HAVE_SET_FANOUT_MAX`]
/// other holders.
pub const PROVIDERS_TTL: Duration = Duration::from_secs(5);
/// How long a provider lookup is trusted when it found fewer: early in a cold start the
/// first lookups see only the seeder, and readers must find each other within a short run.
pub const PROVIDERS_TTL_FEW: Duration = Duration::from_secs(1);
/// Holders asked for their have-set per chunk fetch, at most.
pub const HAVE_SET_FANOUT_MAX: usize = 8;
/// Of those, places kept for holders last seen holding the whole object, however loaded.
///
/// Why: the fanout takes the least loaded holders first, and the node that put an object
/// is the busiest of all in a storm, so with more than [`HAVE_SET_FANOUT_MAX`] other
/// holders it was left out: a home looking for a chunk only it had found no holder and
/// fetched the chunk from the origin. Measured, 16 nodes reading a 256 MiB object from
/// one seed: the origin sent 16% to 25% of the object.
pub const WHOLE_HOLDERS_KEPT_MAX: usize = 2;
/// Holders remembered per object (from lookups and from peers asking for have-sets).
pub const PROVIDERS_PER_OBJECT_MAX: usize = 64;
/// Objects whose have-sets / providers are cached.
pub const HOLDER_CACHE_OBJECTS_MAX: usize = 1024;
/// How long a have-set answer is trusted for an object's availability: chunks picked on it
/// should be the ones peers hold now, since a peer gains a chunk every few hundred
/// milliseconds while it warms the object.
pub const AVAILABILITY_TTL: Duration = Duration::from_millis(500);
/// Peers whose have-sets make up an object's availability, at most.
pub const AVAILABILITY_HOLDERS_MAX: usize = 16;
/// Holders of each kind (still fetching; whole-object holders on faster links) tried for
/// one chunk, hedges included, before moving on to its home node (see [`holder_order`]).
pub const HOLDER_ATTEMPTS_MAX: usize = 3;
/// Times one chunk fetch looks again for holders while its requests wait (see [`Mesh::race`]).
pub const HOLDER_REFRESHES_MAX: usize = 4;
/// Home candidates tried (this node counts) before going to the origin directly.
pub const HOME_CANDIDATES_MAX: usize = 3;
/// How long a peer that sent corrupt bytes is avoided.
pub const PEER_PENALTY: Duration = Duration::from_secs(60);
/// How long a peer that could not be reached (connect failure, timeout) is skipped.
pub const PEER_UNREACHABLE_BACKOFF: Duration = Duration::from_secs(10);
/// Longest wait for holders' have-sets before choosing among those that answered.
pub const HAVE_SET_WAIT: Duration = Duration::from_millis(500);
/// How often provided objects are checked for withdrawal.
pub const PROVIDE_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

const _: () = assert!(HAVE_SET_TTL.as_nanos() <= HAVE_SET_POSITIVE_TTL.as_nanos());
const _: () = assert!(PROVIDERS_TTL_FEW.as_nanos() <= PROVIDERS_TTL.as_nanos());
const _: () = assert!(HAVE_SET_FANOUT_MAX <= PROVIDERS_PER_OBJECT_MAX);

/// Errors starting the mesh.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The identity or cluster key could not be loaded.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// Discovery failed to start.
    #[error("discovery: {0}")]
    Discovery(String),
    /// The data plane failed to start.
    #[error("data plane: {0}")]
    Transport(String),
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
}

/// What the mesh needs to start.
#[derive(Debug, Clone)]
pub struct MeshSettings {
    /// Datacenter name.
    pub dc: String,
    /// Node identity.
    pub identity: NodeIdentity,
    /// Cluster key.
    pub cluster_key: ClusterKey,
    /// p2p listen addresses.
    pub p2p_listen: Vec<Multiaddr>,
    /// Data-plane listen address.
    pub data_listen: SocketAddr,
    /// Bootstrap peers.
    pub bootstrap: Vec<BootstrapAddr>,
    /// Upload budget, bytes per second.
    pub upload_limit_bytes_per_second: Option<u64>,
    /// This host's link rate in bytes per second, announced for home placement (0: not set).
    pub link_rate_bytes_per_second: u64,
    /// Test-only fault: serve corrupt chunks.
    pub corrupt_served_chunks: bool,
    /// Test-only fault: wait this long before serving each chunk.
    pub slow_served_chunks: Duration,
}

#[derive(Debug, Default)]
struct PeerLoad {
    in_flight: usize,
    penalised_until: Option<Instant>,
    corrupt_chunks: u64,
}

/// A have-set bitmap and when it was fetched.
type CachedHaveSet = (Instant, Arc<HaveSet>);

struct HolderCache {
    providers: LruCache<ObjectId, (Instant, Vec<PeerId>)>,
    have_sets: LruCache<(PeerId, ObjectId), CachedHaveSet>,
}

/// Concurrent callers asking for the same key share one spawned task. The task runs to
/// completion even if every caller gives up, then leaves the table, so the table holds
/// only work in progress (each bounded by its own timeout).
struct SingleFlight<K, V: Clone> {
    /// A std mutex: never held across an `.await`.
    table: Arc<Mutex<HashMap<K, Flight<V>>>>,
}

/// One shared piece of work in progress; `None` when its task died.
type Flight<V> = Shared<BoxFuture<'static, Option<V>>>;

/// A have-set answer as shared between callers.
type HaveSetAnswer = Result<Arc<HaveSet>, PeerError>;

impl<K, V> SingleFlight<K, V>
where
    K: std::hash::Hash + Eq + Copy + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn new() -> Self {
        Self { table: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// The shared result of `work` for `key`; `None` when the task died.
    fn run<F>(&self, key: K, work: impl FnOnce() -> F) -> Flight<V>
    where
        F: std::future::Future<Output = V> + Send + 'static,
    {
        let mut table = self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(flight) = table.get(&key) {
            return flight.clone();
        }
        let work = work();
        let handle = self.table.clone();
        let task = tokio::spawn(async move {
            let value = work.await;
            handle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
            value
        });
        let flight = async move { task.await.ok() }.boxed().shared();
        table.insert(key, flight.clone());
        flight
    }
}

/// Counts a request in its peer's load while it lives, also when its future is dropped
/// (a hedge that lost).
struct InFlight<'a> {
    mesh: &'a Mesh,
    peer: PeerId,
}

impl<'a> InFlight<'a> {
    fn start(mesh: &'a Mesh, peer: PeerId) -> Self {
        mesh.lock_load().entry(peer).or_default().in_flight += 1;
        Self { mesh, peer }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(state) = self.mesh.lock_load().get_mut(&self.peer) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
    }
}

/// Members holding a chunk, least loaded first.
#[derive(Debug, Default)]
pub struct Holders {
    /// Holders that lack some chunks of the object (still fetching it, or partly evicted).
    pub partial: Vec<PeerTarget>,
    /// Holders of the whole object: in a storm, the node that put it and the first to finish.
    pub complete: Vec<PeerTarget>,
}

/// What a chunk request asks of a peer.
#[derive(Debug, Clone)]
enum Ask {
    /// A reader asks a holder (which may answer `Busy`).
    Holder,
    /// A home node asks a holder (which serves it in turn, never `Busy` for its line); the
    /// answer feeds the home's relay.
    HolderForHome(Option<Arc<Relay>>),
    /// A reader asks the chunk's home node, naming the object and index if known.
    Home(Option<(ObjectId, u32)>),
}

/// One way [`Mesh::race`] may get a chunk.
#[derive(Debug, Clone)]
pub enum Attempt {
    /// Ask a peer that holds it.
    Holder(PeerTarget),
    /// Ask a peer that holds it, for this node as the chunk's home (waits in its line),
    /// feeding the relay of the home fetch if given.
    HolderForHome(PeerTarget, Option<Arc<Relay>>),
    /// Ask the chunk's home node, naming the object and index it is read for if known.
    Home(PeerTarget, Option<(ObjectId, usize)>),
}

impl Attempt {
    fn peer(&self) -> &PeerTarget {
        match self {
            Self::Holder(peer) | Self::HolderForHome(peer, _) | Self::Home(peer, _) => peer,
        }
    }
}

/// A peer's have-set of one object: which of its `chunk_count` chunks it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HaveSet {
    chunk_count: u32,
    bitmap: Vec<u8>,
    /// Every chunk is set; worked out once, since it is asked per chunk fetched.
    complete: bool,
}

impl HaveSet {
    fn new(chunk_count: u32, bitmap: Vec<u8>) -> Self {
        let count = chunk_count as usize;
        let (full, rest) = (count / 8, count % 8);
        let complete = count > 0
            && bitmap.len() >= count.div_ceil(8)
            && bitmap[..full].iter().all(|byte| *byte == 0xff)
            && (rest == 0 || bitmap[full] & ((1u8 << rest) - 1) == (1u8 << rest) - 1);
        Self { chunk_count, bitmap, complete }
    }

    fn contains(&self, index: usize) -> bool {
        index < self.chunk_count as usize && have_set_contains(&self.bitmap, index)
    }

    /// Whether the peer holds every chunk. Exact: a reader that has read all but the last
    /// few chunks in order is still fetching them, and a reader that took it for a whole
    /// holder would route around the chunks' homes (measured: duplicate origin fetches at
    /// the end of a cold start).
    fn is_complete(&self) -> bool {
        self.complete
    }
}

/// What peers hold of one object, as [`Mesh::availability`] sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Availability {
    /// Per chunk, how many peers still fetching the object hold it.
    pub holders: Vec<u16>,
    /// Peers still fetching the object (holding part of it).
    pub fetching_peers: usize,
    /// Peers holding all of it: the supply of chunks nobody fetching holds yet.
    pub whole_holders: usize,
}

/// This node's membership in its DC's mesh.
pub struct Mesh {
    identity: NodeIdentity,
    dc: String,
    discovery: Discovery,
    data_plane: DataPlane,
    self_position: Position,
    /// This host's link rate as set (0: not set), weighting its share of homes.
    self_link_rate: u64,
    /// std mutexes below are never held across an `.await`.
    provided: Mutex<HashSet<ObjectId>>,
    holders: Mutex<HolderCache>,
    load: Mutex<HashMap<PeerId, PeerLoad>>,
    hedge: Mutex<HedgePolicy>,
    provider_lookups: SingleFlight<ObjectId, Vec<PeerId>>,
    have_set_requests: SingleFlight<(PeerId, ObjectId), HaveSetAnswer>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("peer_id", &self.identity.peer_id()).field("dc", &self.dc).finish()
    }
}

/// Serves this node's chunks to peers.
struct Serve {
    fetcher: Fetcher,
}

impl ChunkService for Serve {
    async fn have_set(&self, peer: PeerId, object: ObjectId) -> Option<(u32, Vec<u8>)> {
        if let Some(mesh) = self.fetcher.mesh() {
            mesh.note_fetching(peer, object);
        }
        let manifest = self.fetcher.store().manifest(&object).await.ok().flatten()?;
        let count = manifest.chunks().len();
        let mut bitmap = vec![0u8; count.div_ceil(8)];
        for (index, chunk) in manifest.chunks().iter().enumerate() {
            if self.fetcher.store().contains(chunk) {
                bitmap[index / 8] |= 1 << (index % 8);
            }
        }
        Some((count as u32, bitmap))
    }

    async fn local_chunk(&self, id: ChunkId) -> Option<Bytes> {
        self.fetcher.store().read_chunk(&id).await.ok().flatten()
    }

    async fn stripe(
        &self,
        id: ChunkId,
        of: (ObjectId, u32),
        stripe: (u16, u16),
        from_home: bool,
    ) -> Result<StripeAnswer, HomeFetchError> {
        self.fetcher.stripe_for_peer(id, (of.0, of.1 as usize), stripe, from_home).await.map_err(|error| match error {
            StripeError::Fetch(error) => home_fetch_error(error),
            other => HomeFetchError::Internal(other.to_string()),
        })
    }

    async fn home_fetch(&self, id: ChunkId, of: Option<(ObjectId, u32)>) -> Result<HomeChunk, HomeFetchError> {
        let of = of.map(|(object, index)| (object, index as usize));
        match self.fetcher.home_chunk(id, of).await.map_err(home_fetch_error)? {
            HomeAnswer::Whole(bytes) => Ok(HomeChunk::Whole(bytes)),
            HomeAnswer::Arriving { length, reader, answer } => Ok(HomeChunk::Arriving {
                length,
                reader,
                answer: answer.map(|answer| answer.map_err(home_fetch_error)).boxed(),
            }),
        }
    }
}

fn home_fetch_error(error: FetchError) -> HomeFetchError {
    match error {
        FetchError::NotFound(_) => HomeFetchError::NotFound,
        FetchError::Origin(origin) => HomeFetchError::OriginUnavailable(origin.to_string()),
        other => HomeFetchError::Internal(other.to_string()),
    }
}

impl Mesh {
    /// Starts discovery and the data plane, attaches the mesh to `fetcher`, and announces
    /// every object the store still holds.
    pub async fn start(
        settings: MeshSettings,
        fetcher: Fetcher,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, MeshError> {
        let mut data_config = DataPlaneConfig::new(
            settings.data_listen,
            settings.dc.clone(),
            settings.identity.clone(),
            settings.cluster_key.admission_key(),
        );
        data_config.upload_limit_bytes_per_second = settings.upload_limit_bytes_per_second;
        data_config.link_rate_bytes_per_second =
            (settings.link_rate_bytes_per_second > 0).then_some(settings.link_rate_bytes_per_second);
        #[cfg(feature = "test-faults")]
        {
            data_config.corrupt_served_chunks = settings.corrupt_served_chunks;
            data_config.delay_served_chunks = settings.slow_served_chunks;
        }
        let data_plane = DataPlane::start(data_config, Arc::new(Serve { fetcher: fetcher.clone() }), shutdown.clone())
            .await
            .map_err(|error| MeshError::Transport(error.to_string()))?;
        let mut data_addr = data_plane.local_addr();
        if data_addr.ip().is_unspecified() {
            // Peers need an address they can reach; a wildcard bind is announced as loopback
            // only when nothing better is known (tests, single host). Real deployments bind a
            // concrete address.
            data_addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let discovery = Discovery::start(
            DiscoveryConfig {
                dc: settings.dc.clone(),
                identity: settings.identity.clone(),
                private_network_key: settings.cluster_key.private_network_key(&settings.dc),
                listen: settings.p2p_listen.clone(),
                bootstrap: settings.bootstrap.clone(),
                data_addr,
                link_rate: settings.link_rate_bytes_per_second,
            },
            shutdown.clone(),
        )
        .await
        .map_err(|error| MeshError::Discovery(error.to_string()))?;
        let capacity = NonZeroUsize::new(HOLDER_CACHE_OBJECTS_MAX).unwrap_or(NonZeroUsize::MIN);
        let mesh = Arc::new(Self {
            self_position: Position::of_peer(&settings.identity.peer_id().to_bytes()),
            self_link_rate: settings.link_rate_bytes_per_second,
            identity: settings.identity,
            dc: settings.dc,
            discovery,
            data_plane,
            provided: Mutex::new(HashSet::new()),
            holders: Mutex::new(HolderCache {
                providers: LruCache::new(capacity),
                have_sets: LruCache::new(capacity.saturating_mul(NonZeroUsize::new(8).unwrap_or(NonZeroUsize::MIN))),
            }),
            load: Mutex::new(HashMap::new()),
            hedge: Mutex::new(HedgePolicy::new()),
            provider_lookups: SingleFlight::new(),
            have_set_requests: SingleFlight::new(),
        });
        fetcher.attach_mesh(mesh.clone());
        tokio::spawn(mesh.clone().abandon_lost_members(shutdown.clone()));
        tokio::spawn(mesh.clone().announce_held_objects(fetcher.clone()));
        tokio::spawn(mesh.clone().sweep_provided(fetcher, shutdown));
        tracing::info!(peer_id = %mesh.identity.peer_id(), dc = %mesh.dc, data = %data_addr, "joined the mesh");
        Ok(mesh)
    }

    /// Closes the data-plane connection to each member whose control-plane connection
    /// broke, so requests in flight to a dead peer fail now instead of at the QUIC idle
    /// timeout, and readers move on to other holders or homes.
    async fn abandon_lost_members(self: Arc<Self>, shutdown: CancellationToken) {
        let mut lost = self.discovery.lost_members();
        loop {
            let peer = tokio::select! {
                () = shutdown.cancelled() => return,
                peer = lost.recv() => peer,
            };
            match peer {
                Ok(peer) => self.data_plane.close_peer(&peer),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// The discovery service: membership, provider records, volume head announcements.
    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    async fn announce_held_objects(self: Arc<Self>, fetcher: Fetcher) {
        let objects = match fetcher.store().manifest_ids().await {
            Ok(objects) => objects,
            Err(error) => {
                tracing::warn!(%error, "cannot list held objects to re-announce them");
                return;
            }
        };
        let mut announced = 0usize;
        for object in objects {
            if let Ok(Some(manifest)) = fetcher.store().manifest(&object).await
                && manifest.chunks().iter().any(|chunk| fetcher.store().contains(chunk))
            {
                self.provide(object).await;
                announced += 1;
            }
        }
        tracing::info!(announced, "re-announced held objects");
    }

    async fn sweep_provided(self: Arc<Self>, fetcher: Fetcher, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(PROVIDE_SWEEP_INTERVAL);
        interval.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            let provided: Vec<ObjectId> = self.lock_provided().iter().copied().collect();
            for object in provided {
                let held = match fetcher.store().manifest(&object).await {
                    Ok(Some(manifest)) => manifest.chunks().iter().any(|chunk| fetcher.store().contains(chunk)),
                    _ => false,
                };
                if !held {
                    self.lock_provided().remove(&object);
                    self.discovery.unprovide(object).await;
                }
            }
        }
    }

    fn lock_provided(&self) -> std::sync::MutexGuard<'_, HashSet<ObjectId>> {
        self.provided.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_holders(&self) -> std::sync::MutexGuard<'_, HolderCache> {
        self.holders.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_load(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, PeerLoad>> {
        self.load.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_hedge(&self) -> std::sync::MutexGuard<'_, HedgePolicy> {
        self.hedge.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Announces that this node holds (some of) `object`; cheap when already announced.
    pub async fn provide(&self, object: ObjectId) {
        if self.lock_provided().insert(object) {
            self.discovery.provide(object).await;
        }
    }

    /// Home candidates for `chunk`, best first: `None` is this node.
    pub fn home_order(&self, chunk: &ChunkId) -> Vec<Option<PeerTarget>> {
        self.home_candidates(&[], |ranked| {
            let positions: Vec<(Option<PeerId>, Position)> =
                ranked.iter().map(|&(key, position, _)| (key, position)).collect();
            home_order(chunk, &positions)
        })
    }

    /// Home candidates for chunk `index` of `object`, best first (`None` is this node),
    /// leaving out the members in `excluding`: homes balanced over the object's chunks and
    /// weighted by announced link rates (see [`crate::placement`]).
    pub fn object_home_order(
        &self,
        object: &ObjectId,
        index: usize,
        excluding: &[PeerTarget],
    ) -> Vec<Option<PeerTarget>> {
        self.home_candidates(excluding, |ranked| object_home_order(object, index, ranked))
    }

    fn home_candidates(
        &self,
        excluding: &[PeerTarget],
        order: impl FnOnce(&[(Option<PeerId>, Position, u64)]) -> Vec<Option<PeerId>>,
    ) -> Vec<Option<PeerTarget>> {
        let members = self.discovery.members();
        let mut ranked: Vec<(Option<PeerId>, Position, u64)> = vec![(None, self.self_position, self.self_link_rate)];
        let mut addresses = HashMap::new();
        for member in members {
            if excluding.iter().any(|excluded| excluded.peer_id == member.peer_id) {
                continue;
            }
            ranked.push((Some(member.peer_id), Position::of_peer(&member.peer_id.to_bytes()), member.link_rate));
            addresses.insert(member.peer_id, member.data_addr);
        }
        order(&ranked)
            .into_iter()
            .take(HOME_CANDIDATES_MAX)
            .map(|peer| peer.and_then(|peer_id| addresses.get(&peer_id).map(|&addr| PeerTarget { peer_id, addr })))
            .collect()
    }

    /// The members among `holders` whose announced link is faster than this node's (both
    /// set): they can send this node a chunk at its full rate and keep upload to spare.
    pub fn faster_than_self(&self, holders: &[PeerTarget]) -> Vec<PeerTarget> {
        if self.self_link_rate == 0 {
            return Vec::new();
        }
        let faster: HashSet<PeerId> = self
            .discovery
            .members()
            .into_iter()
            .filter(|member| member.link_rate > self.self_link_rate)
            .map(|member| member.peer_id)
            .collect();
        holders.iter().filter(|holder| faster.contains(&holder.peer_id)).cloned().collect()
    }

    fn member_target(&self, peer_id: PeerId) -> Option<PeerTarget> {
        self.discovery
            .members()
            .into_iter()
            .find(|member| member.peer_id == peer_id)
            .map(|member| PeerTarget { peer_id, addr: member.data_addr })
    }

    /// Holders of `object` other than this node: DHT providers plus peers that asked for
    /// its have-set. Lookups are single-flight per object and cached ([`PROVIDERS_TTL`],
    /// or [`PROVIDERS_TTL_FEW`] while few are known).
    async fn providers(self: &Arc<Self>, object: ObjectId) -> Vec<PeerId> {
        if let Some((at, peers)) = self.lock_holders().providers.get(&object) {
            let ttl = if peers.len() >= HAVE_SET_FANOUT_MAX { PROVIDERS_TTL } else { PROVIDERS_TTL_FEW };
            if at.elapsed() < ttl {
                return peers.clone();
            }
        }
        let mesh = self.clone();
        let lookup = self.provider_lookups.run(object, move || async move {
            let me = mesh.identity.peer_id();
            let mut peers: Vec<PeerId> =
                mesh.discovery.providers(object).await.into_iter().filter(|peer| *peer != me).collect();
            let mut holders = mesh.lock_holders();
            // Keep peers learnt since the last lookup (they may not have published yet).
            if let Some((_, known)) = holders.providers.peek(&object) {
                for peer in known {
                    if !peers.contains(peer) {
                        peers.push(*peer);
                    }
                }
            }
            peers.truncate(PROVIDERS_PER_OBJECT_MAX);
            holders.providers.put(object, (Instant::now(), peers.clone()));
            peers
        });
        lookup.await.unwrap_or_default()
    }

    /// Notes that `peer` is fetching `object` (it asked for this node's have-set): it will
    /// hold chunks of it and can serve them before its provider record is published.
    pub fn note_fetching(&self, peer: PeerId, object: ObjectId) {
        let mut holders = self.lock_holders();
        // Only added to a lookup's answer, never as a fresh entry: an entry holding just
        // this peer would hide the DHT's providers until it expired.
        if let Some((_, peers)) = holders.providers.peek_mut(&object)
            && !peers.contains(&peer)
            && peers.len() < PROVIDERS_PER_OBJECT_MAX
        {
            peers.push(peer);
        }
    }

    /// `peer`'s have-set of `object`, from the cache when it can still answer for chunk
    /// `index`, else from one request shared by concurrent callers.
    async fn have_set(&self, peer: &PeerTarget, object: ObjectId, index: usize) -> Option<Arc<HaveSet>> {
        self.have_set_within(peer, object, index, HAVE_SET_TTL).await
    }

    /// [`Mesh::have_set`], trusting a cached answer for at most `ttl` (unless it has chunk
    /// `index` and is younger than [`HAVE_SET_POSITIVE_TTL`]).
    async fn have_set_within(
        &self,
        peer: &PeerTarget,
        object: ObjectId,
        index: usize,
        ttl: Duration,
    ) -> Option<Arc<HaveSet>> {
        if let Some((at, have_set)) = self.lock_holders().have_sets.get(&(peer.peer_id, object)) {
            let age = at.elapsed();
            if age < ttl || (age < HAVE_SET_POSITIVE_TTL && have_set.contains(index)) {
                return Some(have_set.clone());
            }
        }
        let plane = self.data_plane.clone();
        let target = *peer;
        let request = self.have_set_requests.run((peer.peer_id, object), move || async move {
            metrics::counter!("cachemesh_have_set_requests_total").increment(1);
            plane
                .have_set(&target, object)
                .await
                .map(|(chunk_count, bitmap)| Arc::new(HaveSet::new(chunk_count, bitmap)))
        });
        match request.await {
            Some(Ok(bitmap)) => {
                self.lock_holders().have_sets.put((peer.peer_id, object), (Instant::now(), bitmap.clone()));
                Some(bitmap)
            }
            Some(Err(error)) => {
                tracing::debug!(peer = %peer.peer_id, %error, "have-set request failed");
                if have_set_failure_is_unreachable(&error, || self.data_plane.is_connected_or_connecting(&peer.peer_id))
                {
                    self.avoid(&peer.peer_id, PEER_UNREACHABLE_BACKOFF);
                }
                None
            }
            None => None,
        }
    }

    /// The chunk at `index` of `object` from a peer that holds it, verified; `None` when no
    /// holder could give it. Holders still fetching the object are asked before those that
    /// hold all of it.
    ///
    /// This is the home path: the requests wait their turn in each holder's line for upload
    /// slots (`GetChunkForHome`) rather than being turned away, since the alternative is the
    /// origin for a chunk the DC holds. The first answer to arrive feeds `relay`.
    pub async fn fetch_from_holders(
        self: &Arc<Self>,
        object: ObjectId,
        index: usize,
        chunk: ChunkId,
        relay: Option<&Arc<Relay>>,
    ) -> Option<VerifiedChunk> {
        let Holders { mut partial, complete } = self.holders(object, index).await;
        partial.extend(complete);
        let attempts = partial
            .into_iter()
            .take(HOLDER_ATTEMPTS_MAX)
            .map(|holder| Attempt::HolderForHome(holder, relay.cloned()))
            .collect();
        self.race(attempts, chunk, None).await.map(|(chunk, _)| chunk)
    }

    /// What peers hold of `object` ([`Availability`]), from their have-sets (cached as
    /// [`Mesh::holders`] caches them).
    pub async fn availability(self: &Arc<Self>, object: ObjectId, chunk_count: usize) -> Availability {
        let mut availability = Availability { holders: vec![0u16; chunk_count], ..Availability::default() };
        let now = Instant::now();
        let targets: Vec<PeerTarget> = self
            .providers(object)
            .await
            .into_iter()
            .filter_map(|peer| self.member_target(peer))
            .filter(|target| !self.avoided(&target.peer_id, now))
            .take(AVAILABILITY_HOLDERS_MAX)
            .collect();
        let have_sets = futures::future::join_all(targets.iter().map(|target| async move {
            let have_set = self.have_set_within(target, object, usize::MAX, AVAILABILITY_TTL);
            tokio::time::timeout(HAVE_SET_WAIT, have_set).await.ok().flatten()
        }))
        .await;
        for have_set in have_sets.into_iter().flatten() {
            if have_set.is_complete() {
                availability.whole_holders += 1;
                continue;
            }
            availability.fetching_peers += 1;
            for (index, count) in availability.holders.iter_mut().enumerate() {
                if have_set.contains(index) {
                    *count = count.saturating_add(1);
                }
            }
        }
        availability
    }

    /// Where this node starts taking fresh chunks of an object of `chunk_count` chunks
    /// when the order is its own to choose: the members and this node, ranked by position,
    /// start at evenly spaced chunks, rotated per object.
    pub fn spread_start(&self, object: &ObjectId, chunk_count: usize) -> usize {
        if chunk_count == 0 {
            return 0;
        }
        let mut positions: Vec<Position> =
            self.discovery.members().into_iter().map(|member| Position::of_peer(&member.peer_id.to_bytes())).collect();
        positions.push(self.self_position);
        positions.sort();
        let rank = positions.iter().position(|position| *position == self.self_position).unwrap_or(0);
        let rotation = u64::from_le_bytes(object.as_bytes()[..8].try_into().unwrap_or_default()) as usize;
        (rank * chunk_count / positions.len() + rotation) % chunk_count
    }

    /// Live, unpenalised members that hold chunk `index` of `object`, least loaded first,
    /// split by whether they hold the whole object.
    pub async fn holders(self: &Arc<Self>, object: ObjectId, index: usize) -> Holders {
        let providers = self.providers(object).await;
        if providers.is_empty() {
            return Holders::default();
        }
        let now = Instant::now();
        // Only live members that are not being avoided: a killed holder stays in provider
        // records until they expire, and must not hold up the fetch.
        let mut targets: Vec<PeerTarget> = providers
            .into_iter()
            .filter_map(|peer| self.member_target(peer))
            .filter(|target| !self.avoided(&target.peer_id, now))
            .collect();
        if targets.is_empty() {
            return Holders::default();
        }
        // Ask a bounded number of holders, least loaded first; rotating by chunk index
        // spreads equally loaded holders over the chunks of an object.
        let rotation = index % targets.len();
        targets.rotate_left(rotation);
        {
            let load = self.lock_load();
            targets.sort_by_key(|target| load.get(&target.peer_id).map_or(0, |state| state.in_flight));
        }
        let whole_holders: HashSet<PeerId> = {
            let cache = self.lock_holders();
            targets
                .iter()
                .filter(|target| {
                    cache.have_sets.peek(&(target.peer_id, object)).is_some_and(|(_, have_set)| have_set.is_complete())
                })
                .map(|target| target.peer_id)
                .collect()
        };
        let (mut kept, others): (Vec<PeerTarget>, Vec<PeerTarget>) =
            targets.into_iter().partition(|target| whole_holders.contains(&target.peer_id));
        kept.truncate(WHOLE_HOLDERS_KEPT_MAX);
        let room = HAVE_SET_FANOUT_MAX - kept.len();
        kept.extend(others.into_iter().take(room));
        let targets = kept;
        let whole_holders = &whole_holders;
        let have_sets = futures::future::join_all(targets.iter().map(|target| async move {
            match tokio::time::timeout(HAVE_SET_WAIT, self.have_set(target, object, index)).await {
                Ok(bitmap) => bitmap,
                Err(_) => {
                    // Too slow to answer a tiny request: gone, or busy on a saturated link,
                    // or still being connected to. Skip it this time either way; avoid it
                    // for a while only when its connection is gone, since avoiding a live
                    // peer sends readers past it: to the next home for chunks it is home
                    // to, which fetches them from the origin a second time (measured: up
                    // to 12 of 64 chunks twice when the first requests of a cold start were
                    // still connecting).
                    if !self.data_plane.is_connected_or_connecting(&target.peer_id) {
                        self.avoid(&target.peer_id, PEER_UNREACHABLE_BACKOFF);
                        return None;
                    }
                    // A live holder of the whole object that answers late still holds it (a
                    // whole object shrinks only by eviction, which a chunk request then
                    // finds out): keep it. Skipping it sent homes whose only other source
                    // it was to the origin (measured: 3 to 5 chunks of a 64-chunk object,
                    // 16 readers on 25 Mbit links taking chunks from a fast seed).
                    if whole_holders.contains(&target.peer_id) {
                        return self
                            .lock_holders()
                            .have_sets
                            .peek(&(target.peer_id, object))
                            .map(|(_, have_set)| have_set.clone());
                    }
                    None
                }
            }
        }))
        .await;
        let mut candidates: Vec<(usize, bool, PeerTarget)> = {
            let load = self.lock_load();
            targets
                .into_iter()
                .zip(have_sets)
                .filter_map(|(target, bitmap)| {
                    let have_set = bitmap.filter(|have_set| have_set.contains(index))?;
                    let state = load.get(&target.peer_id);
                    let penalised = state.and_then(|state| state.penalised_until).is_some_and(|until| until > now);
                    let in_flight = state.map_or(0, |state| state.in_flight);
                    (!penalised).then(|| (in_flight, have_set.is_complete(), target))
                })
                .collect()
        };
        candidates.sort_by_key(|(in_flight, _, _)| *in_flight);
        let mut holders = Holders::default();
        for (_, complete, target) in candidates {
            if complete { holders.complete.push(target) } else { holders.partial.push(target) }
        }
        holders
    }

    /// Asks `holders` in order for `chunk`: the next one when the previous fails, or when it
    /// is slower than the hedge delay (then both race and the first verified answer wins;
    /// the loser's stream is reset when its future drops).
    pub async fn race_holders(self: &Arc<Self>, holders: Vec<PeerTarget>, chunk: ChunkId) -> Option<VerifiedChunk> {
        let attempts = holders.into_iter().map(Attempt::Holder).collect();
        self.race(attempts, chunk, None).await.map(|(chunk, _)| chunk)
    }

    /// Makes `attempts` in order for `chunk`, as [`Mesh::race_holders`] does; with `refresh`
    /// (the object and index the chunk is read for), once the attempts are all under way
    /// and the latest is slower than the hedge delay, looks again for holders of the chunk
    /// (at most [`HOLDER_REFRESHES_MAX`] times) and asks one it has not asked yet.
    ///
    /// Why: when many nodes want one chunk at once, its first holders (its home after the
    /// fetch, the node that put it) send it to a few requesters at a time and the others
    /// wait in line; meanwhile the first receivers hold it too. A waiting requester that
    /// asks one of them as well gets it sooner, and the chunk spreads like a tree instead
    /// of as a star around its first holder.
    pub async fn race(
        self: &Arc<Self>,
        attempts: Vec<Attempt>,
        chunk: ChunkId,
        refresh: Option<(ObjectId, usize)>,
    ) -> Option<(VerifiedChunk, Source)> {
        let mut asked: HashSet<PeerId> = attempts.iter().map(|attempt| attempt.peer().peer_id).collect();
        let mut waiting: std::collections::VecDeque<Attempt> = attempts.into();
        let mut refreshes_left = if refresh.is_some() { HOLDER_REFRESHES_MAX } else { 0 };
        let mut racing = FuturesUnordered::new();
        // Counted once per chunk, however often the hedge delay passes.
        let mut hedge_skipped = false;
        loop {
            if racing.is_empty() {
                let next = waiting.pop_front()?;
                racing.push(self.attempt(next, chunk, false));
            }
            let delay = self.lock_hedge().delay();
            let hedge_timer = tokio::time::sleep(delay);
            tokio::select! {
                Some((result, was_hedge)) = racing.next() => {
                    if let Some(answer) = result {
                        if was_hedge {
                            metrics::counter!("cachemesh_hedge_wins_total").increment(1);
                        }
                        return Some(answer);
                    }
                }
                () = hedge_timer, if !waiting.is_empty() || refreshes_left > 0 => {
                    if waiting.is_empty()
                        && let Some((object, index)) = refresh
                    {
                        refreshes_left -= 1;
                        let Holders { partial, complete } = self.holders(object, index).await;
                        let fresh = fresh_hedges(self.faster_than_self(&complete), partial, &asked);
                        for holder in fresh {
                            asked.insert(holder.peer_id);
                            waiting.push_back(Attempt::Holder(holder));
                        }
                    }
                    // A first holder that is slow while this node's downlink is full is
                    // slow because the link is shared: a second copy would come through
                    // the same link (`crate::downlink`). Asked again after the next delay.
                    if self.data_plane.downlink_full() {
                        if !hedge_skipped {
                            hedge_skipped = true;
                            metrics::counter!("cachemesh_hedges_skipped_total", "reason" => "downlink_full")
                                .increment(1);
                        }
                        continue;
                    }
                    if let Some(next) = waiting.pop_front() {
                        metrics::counter!("cachemesh_hedged_requests_total").increment(1);
                        racing.push(self.attempt(next, chunk, true));
                    }
                }
            }
        }
    }

    /// One attempt of [`Mesh::race`]; `is_hedge` is handed back with the result.
    async fn attempt(
        &self,
        attempt: Attempt,
        chunk: ChunkId,
        is_hedge: bool,
    ) -> (Option<(VerifiedChunk, Source)>, bool) {
        let (peer, ask, source) = match attempt {
            Attempt::Holder(peer) => (peer, Ask::Holder, Source::Peer),
            Attempt::HolderForHome(peer, relay) => (peer, Ask::HolderForHome(relay), Source::Peer),
            Attempt::Home(peer, of) => {
                if self.avoided(&peer.peer_id, Instant::now()) {
                    return (None, is_hedge);
                }
                let of = of.and_then(|(object, index)| Some((object, u32::try_from(index).ok()?)));
                (peer, Ask::Home(of), Source::Home)
            }
        };
        let started = Instant::now();
        let bytes = self.request(&peer, chunk, ask).await;
        // Only holder requests feed the hedge delay: a home's answer may include its origin fetch.
        if bytes.is_some() && source == Source::Peer {
            self.lock_hedge().record_success(started.elapsed());
        }
        (bytes.map(|bytes| (bytes, source)), is_hedge)
    }

    /// The hosts that relay the stripes of chunk `index` of `object` read from `home`, in
    /// stripe order (`None` is this node), or None when the chunk is not striped
    /// (`crate::stripe`): when a host is known to hold the whole object, or fewer than
    /// [`STRIPE_READERS_MIN`] candidates are left. The candidates are this node and the
    /// live members but `home`, those avoided and those on slower links than this node's,
    /// in `stripe::relayer_order`. Members, not the object's providers: every reader must
    /// name the same relayers for a chunk, and the members are known alike everywhere,
    /// while providers are learnt at different moments (measured: choosing among providers
    /// made homes send 2.3 times as many stripes, and some chunks left the origin twice).
    pub async fn stripe_relayers(
        self: &Arc<Self>,
        object: &ObjectId,
        index: usize,
        home: &PeerTarget,
    ) -> Option<Vec<Option<PeerTarget>>> {
        let now = Instant::now();
        let members = self.discovery.members();
        let whole: HashSet<PeerId> = {
            let cache = self.lock_holders();
            members
                .iter()
                .filter(|member| {
                    cache.have_sets.peek(&(member.peer_id, *object)).is_some_and(|(_, have_set)| have_set.is_complete())
                })
                .map(|member| member.peer_id)
                .collect()
        };
        // Not while a host is known to hold the whole object (a seed): striped reads then let
        // chunks leave the origin (measured: 4 to 5 of 64 with a fast seed), not yet traced.
        if !whole.is_empty() {
            return None;
        }
        let mut ranked: Vec<(Position, Option<PeerTarget>)> = vec![(self.self_position, None)];
        for member in members {
            // A host on a slower link than this node's would hold this node's chunks to
            // its pace (measured: half the hosts at a quarter of the rate, 114 s against
            // 96-98 s without stripes).
            let slower = self.self_link_rate > 0 && member.link_rate > 0 && member.link_rate < self.self_link_rate;
            if member.peer_id == home.peer_id
                || whole.contains(&member.peer_id)
                || slower
                || self.avoided(&member.peer_id, now)
            {
                continue;
            }
            let target = PeerTarget { peer_id: member.peer_id, addr: member.data_addr };
            ranked.push((Position::of_peer(&member.peer_id.to_bytes()), Some(target)));
        }
        if ranked.len() < STRIPE_READERS_MIN {
            return None;
        }
        Some(relayer_order(ranked, index))
    }

    /// Stripe `stripe` of chunk `id`, `length` bytes when known, from `peer` (see
    /// `DataPlane::stripe`); None when it failed. An unreachable peer is avoided as for
    /// chunk requests.
    #[allow(clippy::too_many_arguments)]
    pub async fn fetch_stripe(
        &self,
        peer: &PeerTarget,
        id: ChunkId,
        of: (ObjectId, u32),
        stripe: (u16, u16),
        length: Option<usize>,
        from_home: bool,
        relay: Option<&Arc<Relay>>,
    ) -> Option<Bytes> {
        let in_flight = InFlight::start(self, peer.peer_id);
        let result = self.data_plane.stripe(peer, id, of, stripe, length, from_home, relay).await;
        drop(in_flight);
        match result {
            Ok(bytes) => Some(bytes),
            Err(error) => {
                tracing::debug!(peer = %peer.peer_id, chunk = %id, from_home, %error, "stripe request failed");
                if matches!(error, PeerError::Connect(_) | PeerError::Timeout) {
                    self.avoid(&peer.peer_id, PEER_UNREACHABLE_BACKOFF);
                }
                None
            }
        }
    }

    /// Avoids `peer` for [`PEER_PENALTY`]: it sent corrupt bytes of chunk `id`.
    pub fn penalise_corrupt(&self, peer: &PeerTarget, id: ChunkId) {
        tracing::warn!(peer = %peer.peer_id, chunk = %id, "peer sent a corrupt stripe; avoiding it");
        metrics::counter!("cachemesh_verify_failures_total", "source" => "peer").increment(1);
        let mut load = self.lock_load();
        let state = load.entry(peer.peer_id).or_default();
        state.corrupt_chunks += 1;
        state.penalised_until = Some(Instant::now() + PEER_PENALTY);
    }

    fn avoid(&self, peer: &PeerId, duration: Duration) {
        let until = Instant::now() + duration;
        let mut load = self.lock_load();
        let state = load.entry(*peer).or_default();
        state.penalised_until = Some(state.penalised_until.map_or(until, |current| current.max(until)));
    }

    /// Whether `peer` is being avoided (corrupt bytes, or unreachable) at `now`.
    fn avoided(&self, peer: &PeerId, now: Instant) -> bool {
        self.lock_load().get(peer).and_then(|state| state.penalised_until).is_some_and(|until| until > now)
    }

    /// One chunk request as `ask` says (to a holder, for this node as a home, or to the
    /// chunk's home node); records the peer's load, penalises corrupt or unreachable peers.
    async fn request(&self, peer: &PeerTarget, chunk: ChunkId, ask: Ask) -> Option<VerifiedChunk> {
        let in_flight = InFlight::start(self, peer.peer_id);
        let home = matches!(ask, Ask::Home(_));
        let result = match ask {
            Ask::Home(of) => self.data_plane.home_fetch(peer, chunk, of).await,
            Ask::Holder => self.data_plane.get_chunk(peer, chunk).await,
            Ask::HolderForHome(relay) => self.data_plane.get_chunk_for_home(peer, chunk, relay.as_ref()).await,
        };
        drop(in_flight);
        let mut load = self.lock_load();
        let state = load.entry(peer.peer_id).or_default();
        match result {
            Ok(bytes) => Some(bytes),
            Err(PeerError::Corrupt { .. }) => {
                tracing::warn!(peer = %peer.peer_id, chunk = %chunk, "peer sent a corrupt chunk; avoiding it");
                metrics::counter!("cachemesh_verify_failures_total", "source" => "peer").increment(1);
                state.corrupt_chunks += 1;
                state.penalised_until = Some(Instant::now() + PEER_PENALTY);
                None
            }
            Err(error) => {
                tracing::debug!(peer = %peer.peer_id, chunk = %chunk, home, %error, "peer request failed");
                if matches!(error, PeerError::Connect(_) | PeerError::Timeout) {
                    let until = Instant::now() + PEER_UNREACHABLE_BACKOFF;
                    state.penalised_until = Some(state.penalised_until.map_or(until, |current| current.max(until)));
                }
                None
            }
        }
    }

    /// Peers as `/v1/peers` shows them.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let now = Instant::now();
        let load = self.lock_load();
        self.discovery
            .members()
            .into_iter()
            .map(|member| {
                let state = load.get(&member.peer_id);
                PeerStatus {
                    node_id: member.peer_id.to_string(),
                    data_addr: member.data_addr.to_string(),
                    last_seen_seconds_ago: now.saturating_duration_since(member.last_seen).as_secs_f64(),
                    requests_in_flight: state.map_or(0, |state| state.in_flight as u64),
                    corrupt_chunks: state.map_or(0, |state| state.corrupt_chunks),
                    penalised: state.and_then(|state| state.penalised_until).is_some_and(|until| until > now),
                    link_rate: (member.link_rate > 0).then_some(member.link_rate),
                }
            })
            .collect()
    }

    /// The mesh part of `status`.
    pub async fn status(&self) -> MeshStatus {
        let peer_id = self.identity.peer_id();
        MeshStatus {
            node_id: peer_id.to_string(),
            dc: self.dc.clone(),
            p2p_listen: self
                .discovery
                .listen_addrs()
                .await
                .into_iter()
                .map(|addr| format!("{addr}/p2p/{peer_id}"))
                .collect(),
            data_listen: self.data_plane.local_addr().to_string(),
            members: self.discovery.members().len() as u64,
            provided_objects: self.lock_provided().len() as u64,
        }
    }
}

/// The holders a reader asks for a chunk, in [`Mesh::race`]'s order (the first asked at once,
/// each next one as a hedge when the ones before are slow): the first holder still fetching
/// the object, then whole-object holders on faster links than this node's (`faster`), then
/// the other holders still fetching; at most [`HOLDER_ATTEMPTS_MAX`] of each kind.
///
/// Whole-object holders (the node that put the object, say) are the DC's only source of
/// the chunks nobody else has yet, and their upload goes to those through the chunks'
/// homes; so only faster ones are asked, and not first. But such a one is the best hedge
/// when the first holder is slow: it answers a reader from an upload slot that is free now
/// or says Busy at once, so it never queues readers ahead of homes, and it sends at this
/// node's full rate. Without it, a reader on a thin link behind a busy holder waited while
/// a fast seed's link idled (docs/benchmarks.md, 2026-12-01 fourth).
pub fn holder_order(partial: Vec<PeerTarget>, faster: Vec<PeerTarget>) -> Vec<PeerTarget> {
    let mut order: Vec<PeerTarget> = partial.into_iter().take(HOLDER_ATTEMPTS_MAX).collect();
    let at = order.len().min(1);
    order.splice(at..at, faster.into_iter().take(HOLDER_ATTEMPTS_MAX));
    order
}

/// The hedges a [`Mesh::race`] adds once its own attempts are all under way: whole-object
/// holders on faster links first (see [`holder_order`]), then holders still fetching, none
/// already asked; at most [`HOLDER_ATTEMPTS_MAX`].
fn fresh_hedges(faster: Vec<PeerTarget>, partial: Vec<PeerTarget>, asked: &HashSet<PeerId>) -> Vec<PeerTarget> {
    faster
        .into_iter()
        .chain(partial)
        .filter(|holder| !asked.contains(&holder.peer_id))
        .take(HOLDER_ATTEMPTS_MAX)
        .collect()
}

/// Whether a failed have-set request shows its peer unreachable, so that it is avoided for
/// [`PEER_UNREACHABLE_BACKOFF`] (also as the home of its chunks): a failed connect does, and
/// a request with no answer for its limit does only when the peer's connection is gone too.
///
/// Why: a live peer on a saturated link answers late, not never. Measured on 25 Mbit links
/// carrying a 16-host cold start (docs/benchmarks.md, 2026-12-01): have-set answers took a
/// median 0.12 s but 15 s at the 90th percentile and over 30 s for about 1 in 200, all on
/// connections that carried chunks all the while. Avoiding such a peer sent readers past
/// it as a home for 10 s.
fn have_set_failure_is_unreachable(error: &PeerError, connected: impl FnOnce() -> bool) -> bool {
    match error {
        PeerError::Connect(_) => true,
        PeerError::Timeout => !connected(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(count: usize) -> Vec<PeerTarget> {
        (0..count)
            .map(|index| PeerTarget { peer_id: PeerId::random(), addr: ([10, 0, 0, index as u8], 7000).into() })
            .collect()
    }

    fn ids(targets: &[PeerTarget]) -> Vec<PeerId> {
        targets.iter().map(|target| target.peer_id).collect()
    }

    #[test]
    fn a_faster_whole_holder_is_the_first_hedge() {
        // Goal: a read asks a holder still fetching first, then (as its first hedges) whole
        // holders on faster links, then the other holders still fetching; a few of each.
        let (partial, faster) = (targets(5), targets(4));
        let order = holder_order(partial.clone(), faster.clone());
        let expected: Vec<PeerId> = [&partial[..1], &faster[..HOLDER_ATTEMPTS_MAX], &partial[1..HOLDER_ATTEMPTS_MAX]]
            .concat()
            .iter()
            .map(|t| t.peer_id)
            .collect();
        assert_eq!(ids(&order), expected);
        assert_eq!(ids(&holder_order(partial.clone(), Vec::new())), ids(&partial[..HOLDER_ATTEMPTS_MAX]));
        assert_eq!(ids(&holder_order(Vec::new(), faster.clone())), ids(&faster[..HOLDER_ATTEMPTS_MAX]));
    }

    #[test]
    fn fresh_hedges_put_faster_whole_holders_first_and_skip_the_asked() {
        let (faster, partial) = (targets(2), targets(3));
        let asked: HashSet<PeerId> = [faster[0].peer_id, partial[0].peer_id].into();
        let fresh = fresh_hedges(faster.clone(), partial.clone(), &asked);
        assert_eq!(ids(&fresh), vec![faster[1].peer_id, partial[1].peer_id, partial[2].peer_id]);
        assert_eq!(fresh_hedges(Vec::new(), targets(9), &HashSet::new()).len(), HOLDER_ATTEMPTS_MAX);
    }

    #[test]
    fn a_late_have_set_avoids_its_peer_only_when_the_connection_is_gone_too() {
        let timeout = PeerError::Timeout;
        assert!(!have_set_failure_is_unreachable(&timeout, || true));
        assert!(have_set_failure_is_unreachable(&timeout, || false));
        assert!(have_set_failure_is_unreachable(&PeerError::Connect("refused".into()), || true));
        // Answers that came (busy, unknown object) say nothing about reachability.
        assert!(!have_set_failure_is_unreachable(&PeerError::Busy, || false));
        assert!(!have_set_failure_is_unreachable(&PeerError::NotFound, || false));
    }

    #[test]
    fn complete_have_sets_hold_every_chunk() {
        let have = |chunk_count, bitmap: &[u8]| HaveSet::new(chunk_count, bitmap.to_vec());
        assert!(have(19, &[0xff, 0xff, 0x07]).is_complete());
        assert!(have(1, &[0x01]).is_complete());
        assert!(have(8, &[0xff]).is_complete());
        assert!(!have(0, &[]).is_complete());
        assert!(!have(16, &[0xff, 0x00]).is_complete());
        assert!(!have(11, &[0xfe, 0x07]).is_complete());
        assert!(!have(11, &[0xff, 0x05]).is_complete());
        assert!(!have(16, &[0xff]).is_complete(), "a bitmap too short for its count");
        // A reader that has read 61 of 64 chunks in order is not a whole holder.
        assert!(!have(64, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f]).is_complete());
        assert!(have(64, &[0xff; 8]).is_complete());
        assert!(!have(3, &[0x07]).contains(3) && have(3, &[0x07]).contains(2));
    }
}
