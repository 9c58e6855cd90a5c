//! The mesh: this node's place in its datacenter, joining discovery (who is alive, who
//! holds which object) with the QUIC data plane (moving chunks).
//!
//! - Provider records are per object: a node provides an object as soon as it holds any
//!   chunk of it (after a put, after the first chunk fetched), again at start-up for every
//!   object it still holds, and withdraws it when a sweep finds none of its chunks left.
//! - To fetch a chunk from holders it asks the object's providers for their have-set (a
//!   bitmap, cached for [`HAVE_SET_TTL`]) and tries those that hold the chunk, least loaded
//!   first; a peer that sends corrupt bytes is penalised for [`PEER_PENALTY`].
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
use libp2p::{Multiaddr, PeerId};
use lru::LruCache;
use tokio_util::sync::CancellationToken;

pub use crate::discovery::parse_listen_addr;
use crate::discovery::{BootstrapAddr, Discovery, DiscoveryConfig};
use crate::fetch::{FetchError, Fetcher};
use crate::identity::{ClusterKey, NodeIdentity};
use crate::placement::{Position, home_order};
use crate::transport::{ChunkService, DataPlane, DataPlaneConfig, HomeFetchError, PeerError, PeerTarget};

/// How long a have-set answer is trusted.
pub const HAVE_SET_TTL: Duration = Duration::from_secs(2);
/// How long a provider lookup is trusted.
pub const PROVIDERS_TTL: Duration = Duration::from_secs(5);
/// Objects whose have-sets / providers are cached.
pub const HOLDER_CACHE_OBJECTS_MAX: usize = 1024;
/// Holders tried for one chunk before moving on to its home node.
pub const HOLDER_ATTEMPTS_MAX: usize = 3;
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
    /// Test-only fault: serve corrupt chunks.
    pub corrupt_served_chunks: bool,
}

#[derive(Debug, Default)]
struct PeerLoad {
    in_flight: usize,
    penalised_until: Option<Instant>,
    corrupt_chunks: u64,
}

/// A have-set bitmap and when it was fetched.
type CachedHaveSet = (Instant, Arc<Vec<u8>>);

struct HolderCache {
    providers: LruCache<ObjectId, (Instant, Vec<PeerId>)>,
    have_sets: LruCache<(PeerId, ObjectId), CachedHaveSet>,
}

/// This node's membership in its DC's mesh.
pub struct Mesh {
    identity: NodeIdentity,
    dc: String,
    discovery: Discovery,
    data_plane: DataPlane,
    self_position: Position,
    /// std mutexes below are never held across an `.await`.
    provided: Mutex<HashSet<ObjectId>>,
    holders: Mutex<HolderCache>,
    load: Mutex<HashMap<PeerId, PeerLoad>>,
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
    async fn have_set(&self, object: ObjectId) -> Option<(u32, Vec<u8>)> {
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

    async fn home_fetch(&self, id: ChunkId) -> Result<Bytes, HomeFetchError> {
        self.fetcher.home_chunk(id).await.map_err(|error| match error {
            FetchError::NotFound(_) => HomeFetchError::NotFound,
            FetchError::Origin(origin) => HomeFetchError::OriginUnavailable(origin.to_string()),
            other => HomeFetchError::Internal(other.to_string()),
        })
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
        #[cfg(feature = "test-faults")]
        {
            data_config.corrupt_served_chunks = settings.corrupt_served_chunks;
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
            },
            shutdown.clone(),
        )
        .await
        .map_err(|error| MeshError::Discovery(error.to_string()))?;
        let capacity = NonZeroUsize::new(HOLDER_CACHE_OBJECTS_MAX).unwrap_or(NonZeroUsize::MIN);
        let mesh = Arc::new(Self {
            self_position: Position::of_peer(&settings.identity.peer_id().to_bytes()),
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
        });
        fetcher.attach_mesh(mesh.clone());
        tokio::spawn(mesh.clone().announce_held_objects(fetcher.clone()));
        tokio::spawn(mesh.clone().sweep_provided(fetcher, shutdown));
        tracing::info!(peer_id = %mesh.identity.peer_id(), dc = %mesh.dc, data = %data_addr, "joined the mesh");
        Ok(mesh)
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

    /// Announces that this node holds (some of) `object`; cheap when already announced.
    pub async fn provide(&self, object: ObjectId) {
        if self.lock_provided().insert(object) {
            self.discovery.provide(object).await;
        }
    }

    /// Home candidates for `chunk`, best first: `None` is this node.
    pub fn home_order(&self, chunk: &ChunkId) -> Vec<Option<PeerTarget>> {
        let members = self.discovery.members();
        let mut ranked: Vec<(Option<PeerId>, Position)> = vec![(None, self.self_position)];
        let mut addresses = HashMap::new();
        for member in members {
            ranked.push((Some(member.peer_id), Position::of_peer(&member.peer_id.to_bytes())));
            addresses.insert(member.peer_id, member.data_addr);
        }
        home_order(chunk, &ranked)
            .into_iter()
            .take(HOME_CANDIDATES_MAX)
            .map(|peer| peer.and_then(|peer_id| addresses.get(&peer_id).map(|&addr| PeerTarget { peer_id, addr })))
            .collect()
    }

    fn member_target(&self, peer_id: PeerId) -> Option<PeerTarget> {
        self.discovery
            .members()
            .into_iter()
            .find(|member| member.peer_id == peer_id)
            .map(|member| PeerTarget { peer_id, addr: member.data_addr })
    }

    async fn providers(&self, object: ObjectId) -> Vec<PeerId> {
        let now = Instant::now();
        if let Some((at, peers)) = self.lock_holders().providers.get(&object)
            && now.duration_since(*at) < PROVIDERS_TTL
        {
            return peers.clone();
        }
        let me = self.identity.peer_id();
        let peers: Vec<PeerId> =
            self.discovery.providers(object).await.into_iter().filter(|peer| *peer != me).collect();
        self.lock_holders().providers.put(object, (now, peers.clone()));
        peers
    }

    async fn have_set(&self, peer: &PeerTarget, object: ObjectId) -> Option<Arc<Vec<u8>>> {
        let now = Instant::now();
        if let Some((at, bitmap)) = self.lock_holders().have_sets.get(&(peer.peer_id, object))
            && now.duration_since(*at) < HAVE_SET_TTL
        {
            return Some(bitmap.clone());
        }
        match self.data_plane.have_set(peer, object).await {
            Ok((_, bitmap)) => {
                let bitmap = Arc::new(bitmap);
                self.lock_holders().have_sets.put((peer.peer_id, object), (now, bitmap.clone()));
                Some(bitmap)
            }
            Err(error) => {
                tracing::debug!(peer = %peer.peer_id, %error, "have-set request failed");
                if matches!(error, PeerError::Connect(_) | PeerError::Timeout) {
                    self.avoid(&peer.peer_id, PEER_UNREACHABLE_BACKOFF);
                }
                None
            }
        }
    }

    /// The chunk at `index` of `object` from a peer that holds it, verified; `None` when no
    /// holder could give it.
    pub async fn fetch_from_holders(&self, object: ObjectId, index: usize, chunk: ChunkId) -> Option<Bytes> {
        let providers = self.providers(object).await;
        if providers.is_empty() {
            return None;
        }
        let now = Instant::now();
        // Only live members that are not being avoided: a killed holder stays in provider
        // records until they expire, and must not hold up the fetch.
        let targets: Vec<PeerTarget> = providers
            .into_iter()
            .filter_map(|peer| self.member_target(peer))
            .filter(|target| !self.avoided(&target.peer_id, now))
            .collect();
        let have_sets = futures::future::join_all(targets.iter().map(|target| async move {
            match tokio::time::timeout(HAVE_SET_WAIT, self.have_set(target, object)).await {
                Ok(bitmap) => bitmap,
                Err(_) => {
                    // Too slow to answer a tiny request: busy or gone. Others serve meanwhile.
                    self.avoid(&target.peer_id, PEER_UNREACHABLE_BACKOFF);
                    None
                }
            }
        }))
        .await;
        let mut candidates: Vec<(usize, PeerTarget)> = {
            let load = self.lock_load();
            targets
                .into_iter()
                .zip(have_sets)
                .filter(|(_, bitmap)| bitmap.as_ref().is_some_and(|bitmap| have_set_contains(bitmap, index)))
                .filter_map(|(target, _)| {
                    let state = load.get(&target.peer_id);
                    let penalised = state.and_then(|state| state.penalised_until).is_some_and(|until| until > now);
                    (!penalised).then(|| (state.map_or(0, |state| state.in_flight), target))
                })
                .collect()
        };
        candidates.sort_by_key(|(in_flight, _)| *in_flight);
        for (_, target) in candidates.into_iter().take(HOLDER_ATTEMPTS_MAX) {
            if let Some(bytes) = self.request(&target, chunk, false).await {
                return Some(bytes);
            }
        }
        None
    }

    /// The chunk from its home node `peer` (which fetches it from the origin if needed).
    pub async fn fetch_from_home(&self, peer: &PeerTarget, chunk: ChunkId) -> Option<Bytes> {
        if self.avoided(&peer.peer_id, Instant::now()) {
            return None;
        }
        self.request(peer, chunk, true).await
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

    async fn request(&self, peer: &PeerTarget, chunk: ChunkId, home: bool) -> Option<Bytes> {
        self.lock_load().entry(peer.peer_id).or_default().in_flight += 1;
        let result = if home {
            self.data_plane.home_fetch(peer, chunk).await
        } else {
            self.data_plane.get_chunk(peer, chunk).await
        };
        let mut load = self.lock_load();
        let state = load.entry(peer.peer_id).or_default();
        state.in_flight = state.in_flight.saturating_sub(1);
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
