//! DHT load per node as chunks per node grow: the real discovery layer (libp2p swarms over
//! loopback TCP with pnet, noise and yamux, the DC's Kademlia, the bounded `ProviderStore`,
//! gossipsub membership) driven with the holdings a node would have.
//!
//! ```text
//! dht_load [--nodes 8] [--objects-per-node 100] [--replicas 2] [--levels 1000,10000,100000]
//!          [--per-chunk-levels 1000,10000,100000] [--lookups-per-node 10] [--seed 1]
//!          [--publish-budget-seconds 900] [--json OUT]
//! ```
//!
//! For each level C (chunks per node) it starts `--nodes` fresh `Discovery` services in this
//! process (node 0 is every other node's bootstrap peer) and runs up to two modes:
//!
//! - **per-object** (what cachemesh does): every node holds `--objects-per-node` objects
//!   whose chunk counts add up to exactly C, and calls `provide` once per object, as
//!   `Mesh::provide` does (it deduplicates per object, whatever the number of chunks
//!   stored). Then every node looks up the providers of `--lookups-per-node` objects it
//!   does not hold, one lookup per object, as a reader fetching them would (`Mesh::providers`
//!   is single-flight and cached per object, not per chunk).
//! - **per-chunk** (the baseline, `--per-chunk-levels`): the same holdings and the same
//!   readers, but one key per chunk, so one `provide` per chunk held and one lookup per chunk
//!   of each object read. The keys go through the same `provide`/`providers` calls; a key is
//!   32 bytes either way, so every message has the size a chunk id would give it.
//!
//! Objects are shared: nodes form `nodes / replicas` groups and the `replicas` nodes of a
//! group hold the same objects (the same model on several hosts). Object sizes follow a
//! seeded log-uniform spread over three decades (a config file next to a model shard), the
//! same profile at every level, scaled so that each node holds exactly C chunks.
//!
//! Figures per node come from `DiscoveryStats` (provider records and keys stored, keys
//! provided, Kademlia requests answered, queries finished and the requests they sent), byte
//! counts from the kernel's TCP counters of each node's sockets (`ss -tin`; all discovery
//! traffic, membership gossip included, framing and encryption included), and request
//! kinds from the daemon's `cachemesh_dht_*` metrics, captured by a small in-process
//! recorder (summed over the nodes, since they share the process). The have-set bitmap,
//! which does grow with chunks, is computed, not measured: it travels on the data plane.
//!
//! It reports and never asserts; a set-up failure (a mesh that does not form) panics.
//! A publication phase that exceeds `--publish-budget-seconds` is cut short and reported
//! as partial, with the rate seen so far and the time the whole phase would take at it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cachemesh_daemon::discovery::{
    BootstrapAddr, Discovery, DiscoveryConfig, DiscoveryStats, PROVIDER_PUBLICATION_INTERVAL,
};
use cachemesh_daemon::identity::NodeIdentity;
use cachemesh_proto::ObjectId;
use clap::Parser;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Kademlia's replication factor (libp2p's default; discovery does not change it): a
/// provider record is stored on the publisher and on the K peers closest to its key.
const KADEMLIA_K: usize = libp2p::kad::K_VALUE.get();
/// Longest wait for every node to list every other as a member.
const MESH_FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// Time given to the start-up Kademlia bootstrap queries before the counters are read.
const SETTLE: Duration = Duration::from_secs(2);
/// The idle sample (membership gossip, periodic queries) taken before each run.
const IDLE_SAMPLE: Duration = Duration::from_secs(3);
/// How often the nodes' counters are read while waiting for a phase to end.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// A phase has ended when no node answered a Kademlia request for this long.
const QUIET_PERIOD: Duration = Duration::from_millis(600);
/// Provider lookups in flight per node in the lookup phase (discovery allows 64).
const LOOKUPS_CONCURRENT_PER_NODE: usize = 16;
/// Longest wait for a node's discovery service to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Log-uniform object size weights span this ratio (three decades).
const OBJECT_SIZE_SPREAD: f64 = 1000.0;
/// Bytes of a have-set answer besides its bitmap: tag `0x82` and `chunk_count: u32`.
const HAVE_SET_HEADER_BYTES: u64 = 5;
/// Chunk size, for describing a level in bytes.
const CHUNK_BYTES: u64 = cachemesh_proto::limits::CHUNK_BYTES_MAX as u64;

#[derive(Parser, Debug)]
#[command(about = "DHT records and messages per node as chunks per node grow (per-object vs per-chunk keys)")]
struct Args {
    /// Discovery nodes started in this process.
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    /// Objects each node holds, the same at every level.
    #[arg(long, default_value_t = 100)]
    objects_per_node: usize,
    /// Nodes holding each object (must divide --nodes).
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Chunks per node, one run per level.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    levels: Vec<u64>,
    /// Levels at which the per-chunk baseline also runs.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    per_chunk_levels: Vec<u64>,
    /// Objects each node looks up (objects it does not hold).
    #[arg(long, default_value_t = 10)]
    lookups_per_node: usize,
    /// Seed of node identities, object sizes and lookup samples.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A publication phase longer than this is cut short and reported as partial.
    #[arg(long, default_value_t = 900)]
    publish_budget_seconds: u64,
    /// Also write every figure as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------
// Deterministic randomness.

/// SplitMix64: small, seedable, good enough to pick sizes and samples.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        Self(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------
// The workload.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    PerObject,
    PerChunk,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Self::PerObject => "per-object",
            Self::PerChunk => "per-chunk",
        }
    }
}

/// Object `index` of group `group`: its id and its chunk count at the current level.
#[derive(Clone, Copy)]
struct ObjectSpec {
    group: usize,
    index: usize,
    id: ObjectId,
    chunks: u64,
}

struct Workload {
    seed: u64,
    groups: usize,
    /// `objects[group]`: the objects every node of the group holds.
    objects: Vec<Vec<ObjectSpec>>,
}

/// Sizes in chunks for one node's objects: the weights' shape, at least one chunk each,
/// adding up to exactly `chunks_per_node`.
fn object_sizes(weights: &[f64], chunks_per_node: u64) -> Vec<u64> {
    assert!(chunks_per_node >= weights.len() as u64, "fewer chunks per node than objects per node");
    let total: f64 = weights.iter().sum();
    let mut sizes: Vec<u64> =
        weights.iter().map(|weight| ((chunks_per_node as f64 * weight / total).floor() as u64).max(1)).collect();
    let sum: u64 = sizes.iter().sum();
    if sum < chunks_per_node {
        let largest = (0..sizes.len()).max_by_key(|&i| sizes[i]).unwrap();
        sizes[largest] += chunks_per_node - sum;
    }
    let mut excess = sizes.iter().sum::<u64>().saturating_sub(chunks_per_node);
    while excess > 0 {
        let largest = (0..sizes.len()).max_by_key(|&i| sizes[i]).unwrap();
        let take = excess.min(sizes[largest] - 1);
        sizes[largest] -= take;
        excess -= take;
    }
    debug_assert_eq!(sizes.iter().sum::<u64>(), chunks_per_node);
    sizes
}

impl Workload {
    fn new(args: &Args, chunks_per_node: u64) -> Self {
        let groups = args.nodes / args.replicas;
        let mut rng = Rng::new(args.seed, 1);
        let weights: Vec<f64> = (0..args.objects_per_node).map(|_| OBJECT_SIZE_SPREAD.powf(rng.unit())).collect();
        let sizes = object_sizes(&weights, chunks_per_node);
        let objects = (0..groups)
            .map(|group| {
                sizes
                    .iter()
                    .enumerate()
                    .map(|(index, &chunks)| ObjectSpec {
                        group,
                        index,
                        id: ObjectId::of(
                            format!("dht_load seed {} group {group} object {index}", args.seed).as_bytes(),
                        ),
                        chunks,
                    })
                    .collect()
            })
            .collect();
        Self { seed: args.seed, groups, objects }
    }

    fn group_of(&self, node: usize) -> usize {
        node % self.groups
    }

    fn chunk_key(&self, object: &ObjectSpec, chunk: u64) -> ObjectId {
        let text = format!("dht_load seed {} group {} object {} chunk {chunk}", self.seed, object.group, object.index);
        ObjectId::of(text.as_bytes())
    }

    /// The keys node `node` provides in `mode`.
    fn provided_keys(&self, node: usize, mode: Mode) -> Vec<ObjectId> {
        let objects = &self.objects[self.group_of(node)];
        match mode {
            Mode::PerObject => objects.iter().map(|object| object.id).collect(),
            Mode::PerChunk => objects
                .iter()
                .flat_map(|object| (0..object.chunks).map(move |chunk| (object, chunk)))
                .map(|(object, chunk)| self.chunk_key(object, chunk))
                .collect(),
        }
    }

    /// The objects node `node` reads: `count` objects of other groups, the same at every
    /// level and in both modes.
    fn lookup_sample(&self, node: usize, count: usize) -> Vec<ObjectSpec> {
        let own = self.group_of(node);
        let mut candidates: Vec<ObjectSpec> =
            self.objects.iter().enumerate().filter(|(group, _)| *group != own).flat_map(|(_, o)| o.clone()).collect();
        let mut rng = Rng::new(self.seed, 1000 + node as u64);
        for i in (1..candidates.len()).rev() {
            let j = rng.below(i + 1);
            candidates.swap(i, j);
        }
        candidates.truncate(count);
        candidates
    }

    /// The keys a reader of `object` looks up in `mode`: once per object, or once per chunk.
    fn lookup_keys(&self, object: &ObjectSpec, mode: Mode) -> Vec<ObjectId> {
        match mode {
            Mode::PerObject => vec![object.id],
            Mode::PerChunk => (0..object.chunks).map(|chunk| self.chunk_key(object, chunk)).collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Metrics: a recorder that keeps the daemon's counters, summed over the in-process nodes.

#[derive(Default)]
struct CounterRecorder {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

fn counter_name(key: &metrics::Key) -> String {
    let mut labels: Vec<String> = key.labels().map(|label| format!("{}={}", label.key(), label.value())).collect();
    labels.sort();
    if labels.is_empty() { key.name().to_string() } else { format!("{}{{{}}}", key.name(), labels.join(",")) }
}

impl metrics::Recorder for CounterRecorder {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let name = counter_name(key);
        let counter = self.counters.lock().unwrap().entry(name).or_default().clone();
        metrics::Counter::from_arc(counter)
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

fn counters_snapshot(recorder: &CounterRecorder) -> BTreeMap<String, u64> {
    recorder
        .counters
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| name.starts_with("cachemesh_dht_"))
        .map(|(name, value)| (name.clone(), value.load(Ordering::Relaxed)))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Bytes: the kernel's per-socket TCP counters.

/// `(bytes_sent, bytes_received)` of every established TCP socket, by "local peer".
fn tcp_sockets() -> Option<HashMap<(SocketAddr, SocketAddr), (u64, u64)>> {
    let output = std::process::Command::new("ss").args(["-tinH", "state", "established"]).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut sockets = HashMap::new();
    let mut current: Option<(SocketAddr, SocketAddr)> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            current = match fields.as_slice() {
                [_, _, local, peer, ..] => local.parse().ok().zip(peer.parse().ok()),
                _ => None,
            };
        } else if let Some(pair) = current.take() {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|word| word.strip_prefix(name))
                    .and_then(|value| value.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            sockets.insert(pair, (field("bytes_sent:"), field("bytes_received:")));
        }
    }
    Some(sockets)
}

// ---------------------------------------------------------------------------------------
// Nodes.

struct Node {
    discovery: Discovery,
    shutdown: CancellationToken,
    port: u16,
}

fn identity(seed: u64, node: usize) -> NodeIdentity {
    let mut rng = Rng::new(seed, 500 + node as u64);
    let mut secret = [0u8; 32];
    for chunk in secret.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    NodeIdentity::from_keypair(Keypair::ed25519_from_bytes(secret).unwrap()).unwrap()
}

async fn tcp_port(discovery: &Discovery) -> u16 {
    discovery
        .listen_addrs()
        .await
        .iter()
        .flat_map(|addr| addr.iter())
        .find_map(|protocol| match protocol {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .expect("a TCP listen address")
}

async fn start_nodes(args: &Args) -> Vec<Node> {
    let network_key = *blake3::hash(format!("dht_load network {}", args.seed).as_bytes()).as_bytes();
    let mut nodes: Vec<Node> = Vec::with_capacity(args.nodes);
    for index in 0..args.nodes {
        let bootstrap = match nodes.first() {
            Some(first) => vec![BootstrapAddr::parse(&format!("127.0.0.1:{}", first.port)).unwrap()],
            None => Vec::new(),
        };
        let config = DiscoveryConfig {
            dc: "dht-load".to_string(),
            identity: identity(args.seed, index),
            private_network_key: network_key,
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap,
            // Nothing listens there: the data plane is not part of this measurement.
            data_addr: SocketAddr::from(([127, 0, 0, 1], 9)),
            link_rate: 0,
        };
        let shutdown = CancellationToken::new();
        let discovery = Discovery::start(config, shutdown.clone()).await.expect("discovery starts");
        let port = tcp_port(&discovery).await;
        nodes.push(Node { discovery, shutdown, port });
    }
    let deadline = Instant::now() + MESH_FORM_TIMEOUT;
    while !nodes.iter().all(|node| node.discovery.members().len() == args.nodes - 1) {
        assert!(
            Instant::now() < deadline,
            "the {} nodes did not all see each other within {MESH_FORM_TIMEOUT:?}",
            args.nodes
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    nodes
}

async fn stop_nodes(nodes: Vec<Node>) {
    for node in &nodes {
        node.shutdown.cancel();
    }
    for node in &nodes {
        let _ = tokio::time::timeout(STOP_TIMEOUT, node.discovery.stopped()).await;
    }
}

// ---------------------------------------------------------------------------------------
// Snapshots and phases.

struct Snapshot {
    at: Instant,
    stats: Vec<DiscoveryStats>,
    sockets: Option<HashMap<(SocketAddr, SocketAddr), (u64, u64)>>,
    counters: BTreeMap<String, u64>,
}

async fn all_stats(nodes: &[Node]) -> Vec<DiscoveryStats> {
    let mut stats = Vec::with_capacity(nodes.len());
    for node in nodes {
        stats.push(node.discovery.stats().await);
    }
    stats
}

async fn snapshot(nodes: &[Node], recorder: &CounterRecorder) -> Snapshot {
    let stats = all_stats(nodes).await;
    Snapshot { at: Instant::now(), stats, sockets: tcp_sockets(), counters: counters_snapshot(recorder) }
}

/// What happened between two snapshots, per node.
#[derive(Default)]
struct Phase {
    seconds: f64,
    inbound_requests: Vec<u64>,
    outbound_requests: Vec<u64>,
    outbound_queries: Vec<u64>,
    /// `None` when `ss` is not available.
    bytes: Option<PhaseBytes>,
    /// Counter deltas summed over the nodes.
    counters: BTreeMap<String, u64>,
}

#[derive(Default)]
struct PhaseBytes {
    sent: Vec<u64>,
    received: Vec<u64>,
    /// Sockets that dialled one of our nodes from a port that is no node's listen port
    /// (libp2p usually, not always, dials from its listen port): the dialling node is not
    /// known, so their bytes count in the mean per node but not in any one node's figure.
    unattributed_sockets: usize,
    /// Bytes sent plus received on those sockets.
    unattributed_bytes: u64,
    /// Sockets open at the start and gone at the end: their bytes are missing.
    closed_sockets: usize,
}

fn phase(start: &Snapshot, end: &Snapshot, ports: &HashMap<u16, usize>) -> Phase {
    let delta = |field: fn(&DiscoveryStats) -> u64| -> Vec<u64> {
        start.stats.iter().zip(&end.stats).map(|(a, b)| field(b).saturating_sub(field(a))).collect()
    };
    let bytes = match (&start.sockets, &end.sockets) {
        (Some(before), Some(after)) => {
            let nodes = start.stats.len();
            let mut bytes = PhaseBytes { sent: vec![0; nodes], received: vec![0; nodes], ..PhaseBytes::default() };
            for (pair, &(sent, received)) in after {
                let (base_sent, base_received) = before.get(pair).copied().unwrap_or((0, 0));
                if let Some(&node) = ports.get(&pair.0.port()) {
                    bytes.sent[node] += sent.saturating_sub(base_sent);
                    bytes.received[node] += received.saturating_sub(base_received);
                } else if ports.contains_key(&pair.1.port()) {
                    bytes.unattributed_sockets += 1;
                    bytes.unattributed_bytes += sent.saturating_sub(base_sent) + received.saturating_sub(base_received);
                }
            }
            bytes.closed_sockets =
                before.keys().filter(|pair| ports.contains_key(&pair.0.port()) && !after.contains_key(pair)).count();
            Some(bytes)
        }
        _ => None,
    };
    Phase {
        seconds: end.at.duration_since(start.at).as_secs_f64(),
        inbound_requests: delta(|stats| stats.kad_inbound_requests),
        outbound_requests: delta(|stats| stats.kad_outbound_requests),
        outbound_queries: delta(|stats| stats.kad_outbound_queries),
        bytes,
        counters: end
            .counters
            .iter()
            .map(|(name, value)| (name.clone(), value - start.counters.get(name).copied().unwrap_or(0)))
            .filter(|(_, value)| *value > 0)
            .collect(),
    }
}

fn mean(values: &[u64]) -> f64 {
    if values.is_empty() { 0.0 } else { values.iter().sum::<u64>() as f64 / values.len() as f64 }
}

fn max(values: &[u64]) -> u64 {
    values.iter().copied().max().unwrap_or(0)
}

fn phase_json(phase: &Phase) -> Value {
    let bytes = phase.bytes.as_ref().map(|bytes| {
        let (mean, max) = bytes_per_node_mean_max(phase).unwrap_or_default();
        json!({
            "sent_per_node": bytes.sent,
            "received_per_node": bytes.received,
            "sent_plus_received_mean": mean,
            "sent_plus_received_max": max,
            "unattributed_sockets": bytes.unattributed_sockets,
            "unattributed_bytes": bytes.unattributed_bytes,
            "closed_sockets": bytes.closed_sockets,
        })
    });
    json!({
        "seconds": phase.seconds,
        "inbound_requests_per_node": phase.inbound_requests,
        "outbound_requests_per_node": phase.outbound_requests,
        "outbound_queries_per_node": phase.outbound_queries,
        "bytes": bytes,
        "counters_summed_over_nodes": phase.counters,
    })
}

/// Bytes sent plus received per node: the mean over every socket of the nodes, the max over
/// the sockets that could be told apart by node (a lower bound when some could not).
fn bytes_per_node_mean_max(phase: &Phase) -> Option<(f64, u64)> {
    phase.bytes.as_ref().map(|bytes| {
        let total: Vec<u64> = bytes.sent.iter().zip(&bytes.received).map(|(s, r)| s + r).collect();
        let all = total.iter().sum::<u64>() + bytes.unattributed_bytes;
        (all as f64 / total.len().max(1) as f64, max(&total))
    })
}

/// Waits until `done` holds for the latest stats and then no node answers a Kademlia
/// request for [`QUIET_PERIOD`]; false when `deadline` passes first.
async fn wait_for_quiet(nodes: &[Node], deadline: Instant, mut done: impl FnMut(&[DiscoveryStats]) -> bool) -> bool {
    let mut last_inbound = None;
    let mut quiet_since = Instant::now();
    loop {
        let stats = all_stats(nodes).await;
        let inbound: u64 = stats.iter().map(|stats| stats.kad_inbound_requests).sum();
        if last_inbound != Some(inbound) {
            last_inbound = Some(inbound);
            quiet_since = Instant::now();
        }
        if done(&stats) && quiet_since.elapsed() >= QUIET_PERIOD {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

// ---------------------------------------------------------------------------------------
// One run: one level, one mode, fresh nodes.

struct RunResult {
    level: u64,
    mode: Mode,
    keys_per_node: Vec<u64>,
    /// Records each node would hold if every publication reached every node it should.
    records_ideal_per_node: u64,
    records_stored: Vec<u64>,
    provider_keys_stored: Vec<u64>,
    provided_keys: Vec<u64>,
    idle: Phase,
    publish: Phase,
    publish_complete: bool,
    publications_done: u64,
    lookup: Option<Phase>,
    lookups_per_node: Vec<u64>,
    lookups_found_holder: u64,
    lookups_total: u64,
    wall_seconds: f64,
}

impl RunResult {
    fn publications_total(&self) -> u64 {
        self.keys_per_node.iter().sum()
    }

    /// Requests sent per publication, measured (all nodes' publications together).
    fn requests_per_publication(&self) -> f64 {
        let requests: u64 = self.publish.outbound_requests.iter().sum();
        if self.publications_done == 0 { 0.0 } else { requests as f64 / self.publications_done as f64 }
    }

    /// Requests each node sends per second to republish everything it provides, forever
    /// (one republication per key per PROVIDER_PUBLICATION_INTERVAL); about as many arrive.
    fn steady_requests_per_second(&self) -> f64 {
        mean(&self.keys_per_node) * self.requests_per_publication() / PROVIDER_PUBLICATION_INTERVAL.as_secs_f64()
    }

    /// Seconds the whole publication phase would take at the rate seen.
    fn publish_seconds_projected(&self) -> f64 {
        if self.publications_done == 0 {
            return f64::INFINITY;
        }
        self.publish.seconds * self.publications_total() as f64 / self.publications_done as f64
    }
}

async fn run(args: &Args, recorder: &CounterRecorder, workload: &Workload, level: u64, mode: Mode) -> RunResult {
    let started = Instant::now();
    let nodes = start_nodes(args).await;
    let ports: HashMap<u16, usize> = nodes.iter().enumerate().map(|(index, node)| (node.port, index)).collect();
    let peer_ids: Vec<PeerId> = nodes.iter().map(|node| node.discovery.peer_id()).collect();
    tokio::time::sleep(SETTLE).await;
    let idle_start = snapshot(&nodes, recorder).await;
    tokio::time::sleep(IDLE_SAMPLE).await;
    let publish_start = snapshot(&nodes, recorder).await;
    let idle = phase(&idle_start, &publish_start, &ports);

    // Publication: every node provides each key it holds once, as Mesh::provide does.
    let keys: Vec<Vec<ObjectId>> = (0..args.nodes).map(|node| workload.provided_keys(node, mode)).collect();
    let keys_per_node: Vec<u64> = keys.iter().map(|keys| keys.len() as u64).collect();
    let mut providers = Vec::new();
    for (node, keys) in nodes.iter().zip(keys) {
        let discovery = node.discovery.clone();
        providers.push(tokio::spawn(async move {
            for key in keys {
                discovery.provide(key).await;
            }
        }));
    }
    let base_queries: Vec<u64> = publish_start.stats.iter().map(|stats| stats.kad_outbound_queries).collect();
    let deadline = Instant::now() + Duration::from_secs(args.publish_budget_seconds);
    let expected = keys_per_node.clone();
    let providers_done = || providers.iter().all(|task| task.is_finished());
    let publish_complete = wait_for_quiet(&nodes, deadline, |stats| {
        providers_done()
            && stats.iter().zip(&base_queries).zip(&expected).all(|((stats, base), expected)| {
                stats.provide_queue == 0 && stats.kad_outbound_queries - base >= *expected
            })
    })
    .await;
    let publish_end = snapshot(&nodes, recorder).await;
    let mut publish = phase(&publish_start, &publish_end, &ports);
    if publish_complete {
        // The quiet period that confirmed the end is not publication time.
        publish.seconds = (publish.seconds - QUIET_PERIOD.as_secs_f64()).max(0.0);
    }
    // Publications finished: the StartProviding queries (the few bootstrap queries in the
    // same window are not told apart here; the metrics split them by kind).
    let publications_done = publish
        .counters
        .get("cachemesh_dht_outbound_queries_total{kind=start_providing}")
        .copied()
        .unwrap_or_else(|| publish.outbound_queries.iter().sum());
    let records_stored = publish_end.stats.iter().map(|stats| stats.provider_records_stored as u64).collect();
    let provider_keys_stored = publish_end.stats.iter().map(|stats| stats.provider_keys_stored as u64).collect();
    let provided_keys = publish_end.stats.iter().map(|stats| stats.provided_keys as u64).collect();

    // Lookups: each reader looks up the objects it reads, once per key of the mode.
    let mut lookup = None;
    let mut lookups_per_node = vec![0; args.nodes];
    let (mut lookups_found_holder, mut lookups_total) = (0, 0);
    if publish_complete {
        let mut readers = Vec::new();
        for (index, node) in nodes.iter().enumerate() {
            let jobs: Vec<(ObjectId, Vec<PeerId>)> = workload
                .lookup_sample(index, args.lookups_per_node)
                .iter()
                .flat_map(|object| {
                    let holders: Vec<PeerId> = (0..args.nodes)
                        .filter(|&other| workload.group_of(other) == object.group)
                        .map(|other| peer_ids[other])
                        .collect();
                    workload.lookup_keys(object, mode).into_iter().map(move |key| (key, holders.clone()))
                })
                .collect();
            lookups_per_node[index] = jobs.len() as u64;
            let discovery = node.discovery.clone();
            readers.push(tokio::spawn(async move {
                let slots = Arc::new(Semaphore::new(LOOKUPS_CONCURRENT_PER_NODE));
                let mut tasks = Vec::with_capacity(jobs.len());
                for (key, holders) in jobs {
                    let permit = slots.clone().acquire_owned().await.unwrap();
                    let discovery = discovery.clone();
                    tasks.push(tokio::spawn(async move {
                        let found = discovery.providers(key).await;
                        drop(permit);
                        found.iter().any(|peer| holders.contains(peer))
                    }));
                }
                let mut found = 0u64;
                for task in tasks {
                    found += u64::from(task.await.unwrap());
                }
                found
            }));
        }
        let lookup_start = publish_end.at;
        for reader in readers {
            lookups_found_holder += reader.await.unwrap();
        }
        lookups_total = lookups_per_node.iter().sum();
        let deadline = Instant::now() + Duration::from_secs(args.publish_budget_seconds);
        wait_for_quiet(&nodes, deadline, |_| true).await;
        let lookup_end = snapshot(&nodes, recorder).await;
        let mut lookup_phase = phase(&publish_end, &lookup_end, &ports);
        // The quiet period is not lookup time.
        lookup_phase.seconds =
            (lookup_end.at.duration_since(lookup_start).as_secs_f64() - QUIET_PERIOD.as_secs_f64()).max(0.0);
        lookup = Some(lookup_phase);
    }
    stop_nodes(nodes).await;
    for task in providers {
        task.abort();
    }
    RunResult {
        level,
        mode,
        records_ideal_per_node: keys_per_node.iter().sum::<u64>() / args.nodes as u64
            * args.nodes.min(KADEMLIA_K + 1) as u64,
        keys_per_node,
        records_stored,
        provider_keys_stored,
        provided_keys,
        idle,
        publish,
        publish_complete,
        publications_done,
        lookup,
        lookups_per_node,
        lookups_found_holder,
        lookups_total,
        wall_seconds: started.elapsed().as_secs_f64(),
    }
}

// ---------------------------------------------------------------------------------------
// Report.

fn kib(bytes: f64) -> String {
    format!("{:.0}", bytes / 1024.0)
}

fn print_tables(results: &[RunResult], workloads: &BTreeMap<u64, Workload>) {
    println!();
    println!("Advertise: every node provides what it holds (fresh DC per row)");
    println!(
        "{:>7} {:>10} {:>8} {:>16} {:>15} {:>16} {:>9} {:>9} {:>15} {:>8}",
        "chunks", "mode", "keys", "records", "records", "inbound req", "out req", "out qry", "KiB sent+recv", "wall"
    );
    println!(
        "{:>7} {:>10} {:>8} {:>16} {:>15} {:>16} {:>9} {:>9} {:>15} {:>8}",
        "/node",
        "",
        "/node",
        "/node mean/max",
        "ideal /node",
        "/node mean/max",
        "/node",
        "/node",
        "/node mean/max",
        "s"
    );
    for result in results {
        let bytes = bytes_per_node_mean_max(&result.publish)
            .map_or_else(|| "n/a".to_string(), |(mean, max)| format!("{}/{}", kib(mean), kib(max as f64)));
        println!(
            "{:>7} {:>10} {:>8.0} {:>16} {:>15} {:>16} {:>9.0} {:>9.0} {:>15} {:>8.1}{}",
            result.level,
            result.mode.label(),
            mean(&result.keys_per_node),
            format!("{:.0}/{}", mean(&result.records_stored), max(&result.records_stored)),
            result.records_ideal_per_node,
            format!("{:.0}/{}", mean(&result.publish.inbound_requests), max(&result.publish.inbound_requests)),
            mean(&result.publish.outbound_requests),
            mean(&result.publish.outbound_queries),
            bytes,
            result.publish.seconds,
            if result.publish_complete { String::new() } else { "  PARTIAL".to_string() },
        );
    }

    println!();
    println!("Look up: every node reads its sample of objects held by others");
    println!(
        "{:>7} {:>10} {:>9} {:>16} {:>9} {:>9} {:>15} {:>12} {:>8}",
        "chunks", "mode", "lookups", "inbound req", "out req", "out qry", "KiB sent+recv", "found a", "wall"
    );
    println!(
        "{:>7} {:>10} {:>9} {:>16} {:>9} {:>9} {:>15} {:>12} {:>8}",
        "/node", "", "/node", "/node mean/max", "/node", "/node", "/node mean/max", "holder", "s"
    );
    for result in results {
        match &result.lookup {
            Some(lookup) => {
                let bytes = bytes_per_node_mean_max(lookup)
                    .map_or_else(|| "n/a".to_string(), |(mean, max)| format!("{}/{}", kib(mean), kib(max as f64)));
                println!(
                    "{:>7} {:>10} {:>9.0} {:>16} {:>9.0} {:>9.0} {:>15} {:>12} {:>8.1}",
                    result.level,
                    result.mode.label(),
                    mean(&result.lookups_per_node),
                    format!("{:.0}/{}", mean(&lookup.inbound_requests), max(&lookup.inbound_requests)),
                    mean(&lookup.outbound_requests),
                    mean(&lookup.outbound_queries),
                    bytes,
                    format!("{}/{}", result.lookups_found_holder, result.lookups_total),
                    lookup.seconds,
                );
            }
            None => println!(
                "{:>7} {:>10}   not run: the publication phase did not finish",
                result.level,
                result.mode.label()
            ),
        }
    }

    println!();
    println!(
        "Steady state (derived: keys/node x measured requests per publication / {} s republication interval)",
        PROVIDER_PUBLICATION_INTERVAL.as_secs()
    );
    println!(
        "{:>7} {:>10} {:>12} {:>14} {:>14} {:>14}",
        "chunks", "mode", "req per", "republish", "idle inbound", "idle KiB/s"
    );
    println!(
        "{:>7} {:>10} {:>12} {:>14} {:>14} {:>14}",
        "/node", "", "publication", "req/s /node", "req/s /node", "/node"
    );
    for result in results {
        let idle_bytes = bytes_per_node_mean_max(&result.idle)
            .map_or_else(|| "n/a".to_string(), |(mean, _)| format!("{:.2}", mean / 1024.0 / result.idle.seconds));
        println!(
            "{:>7} {:>10} {:>12.1} {:>14.2} {:>14.2} {:>14}",
            result.level,
            result.mode.label(),
            result.requests_per_publication(),
            result.steady_requests_per_second(),
            mean(&result.idle.inbound_requests) / result.idle.seconds,
            idle_bytes,
        );
    }

    println!();
    println!("Data plane (computed, not DHT): have-set answer bytes (0x82 header + ceil(chunks/8) bitmap)");
    println!(
        "{:>7} {:>8} {:>13} {:>13} {:>14} {:>16}",
        "chunks", "objects", "chunks/object", "chunks/object", "have-set B", "have-sets of all"
    );
    println!(
        "{:>7} {:>8} {:>13} {:>13} {:>14} {:>16}",
        "/node", "/node", "min..max", "mean", "mean/max", "objects B /node"
    );
    for (level, workload) in workloads {
        let objects = &workload.objects[0];
        let have_set = |object: &ObjectSpec| HAVE_SET_HEADER_BYTES + object.chunks.div_ceil(8);
        let sizes: Vec<u64> = objects.iter().map(|object| object.chunks).collect();
        let have_sets: Vec<u64> = objects.iter().map(have_set).collect();
        println!(
            "{:>7} {:>8} {:>13} {:>13.0} {:>14} {:>16}",
            level,
            objects.len(),
            format!("{}..{}", sizes.iter().min().unwrap(), max(&sizes)),
            mean(&sizes),
            format!("{:.0}/{}", mean(&have_sets), max(&have_sets)),
            have_sets.iter().sum::<u64>(),
        );
    }

    for result in results {
        if !result.publish_complete {
            println!();
            println!(
                "PARTIAL {} {}: {} of {} publications finished in {:.0} s; at that rate the phase would take \
                 {:.0} s. Records stored then: mean {:.0}, ideal {}.",
                result.level,
                result.mode.label(),
                result.publications_done,
                result.publications_total(),
                result.publish.seconds,
                result.publish_seconds_projected(),
                mean(&result.records_stored),
                result.records_ideal_per_node,
            );
        }
    }
    println!();
    println!("Request kinds during publication and lookup (summed over nodes, divided by node count):");
    for result in results {
        let nodes = result.keys_per_node.len() as f64;
        let describe = |phase: &Phase| -> String {
            phase
                .counters
                .iter()
                .filter(|(name, _)| name.starts_with("cachemesh_dht_inbound_requests_total"))
                .map(|(name, value)| {
                    let kind = name.split("kind=").nth(1).unwrap_or(name).trim_end_matches('}');
                    format!("{kind} {:.0}", *value as f64 / nodes)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  {:>7} {:>10}: publish [{}]; lookup [{}]",
            result.level,
            result.mode.label(),
            describe(&result.publish),
            result.lookup.as_ref().map(describe).unwrap_or_default()
        );
        if let Some(bytes) = &result.publish.bytes
            && (bytes.unattributed_sockets > 0 || bytes.closed_sockets > 0)
        {
            println!(
                "           note: {} dialling sockets ({} KiB) not attributable to one node (in the mean, not \
                 the max); {} sockets closed mid-phase (bytes missing)",
                bytes.unattributed_sockets,
                kib(bytes.unattributed_bytes as f64),
                bytes.closed_sockets
            );
        }
    }
}

fn result_json(result: &RunResult) -> Value {
    json!({
        "chunks_per_node": result.level,
        "mode": result.mode.label(),
        "keys_provided_per_node": result.keys_per_node,
        "provided_keys_stat_per_node": result.provided_keys,
        "provider_records_stored_per_node": result.records_stored,
        "provider_keys_stored_per_node": result.provider_keys_stored,
        "provider_records_ideal_per_node": result.records_ideal_per_node,
        "publish_complete": result.publish_complete,
        "publications_done": result.publications_done,
        "publications_total": result.publications_total(),
        "publish_seconds_projected": result.publish_seconds_projected(),
        "requests_per_publication": result.requests_per_publication(),
        "steady_republish_requests_per_second_per_node": result.steady_requests_per_second(),
        "idle": phase_json(&result.idle),
        "publish": phase_json(&result.publish),
        "lookup": result.lookup.as_ref().map(phase_json),
        "lookups_per_node": result.lookups_per_node,
        "lookups_found_a_holder": result.lookups_found_holder,
        "lookups_total": result.lookups_total,
        "wall_seconds": result.wall_seconds,
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    assert!(args.nodes >= 2, "--nodes must be at least 2");
    assert!(args.replicas >= 1 && args.nodes % args.replicas == 0, "--replicas must divide --nodes");
    assert!(args.nodes / args.replicas >= 2, "at least two groups of holders are needed (nodes / replicas >= 2)");
    let recorder: &'static CounterRecorder = Box::leak(Box::default());
    metrics::set_global_recorder(recorder).expect("no other metrics recorder is installed");
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    println!(
        "dht_load: nodes={} objects_per_node={} replicas={} levels={:?} per_chunk_levels={:?} lookups_per_node={} \
         seed={} publish_budget_seconds={} (K={KADEMLIA_K}, republication every {} s)",
        args.nodes,
        args.objects_per_node,
        args.replicas,
        args.levels,
        args.per_chunk_levels,
        args.lookups_per_node,
        args.seed,
        args.publish_budget_seconds,
        PROVIDER_PUBLICATION_INTERVAL.as_secs(),
    );
    let started = Instant::now();
    let mut results = Vec::new();
    let mut workloads = BTreeMap::new();
    for &level in &args.levels {
        let workload = Workload::new(&args, level);
        let mut modes = vec![Mode::PerObject];
        if args.per_chunk_levels.contains(&level) {
            modes.push(Mode::PerChunk);
        }
        for mode in modes {
            eprintln!(
                "[{:>6.0} s] level {level} chunks/node ({:.0} GiB of 4 MiB chunks), {}",
                started.elapsed().as_secs_f64(),
                (level * CHUNK_BYTES) as f64 / f64::from(1u32 << 30),
                mode.label()
            );
            let result = run(&args, recorder, &workload, level, mode).await;
            eprintln!(
                "[{:>6.0} s]   publish {:.1} s{}, records/node {:.0}, inbound/node {:.0}, lookups found a holder {}/{}",
                started.elapsed().as_secs_f64(),
                result.publish.seconds,
                if result.publish_complete { "" } else { " (partial)" },
                mean(&result.records_stored),
                mean(&result.publish.inbound_requests),
                result.lookups_found_holder,
                result.lookups_total,
            );
            results.push(result);
        }
        workloads.insert(level, workload);
    }
    print_tables(&results, &workloads);
    println!();
    println!("total wall {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = &args.json {
        let report = json!({
            "command": command,
            "nodes": args.nodes,
            "objects_per_node": args.objects_per_node,
            "replicas": args.replicas,
            "lookups_per_node": args.lookups_per_node,
            "seed": args.seed,
            "kademlia_k": KADEMLIA_K,
            "provider_publication_interval_seconds": PROVIDER_PUBLICATION_INTERVAL.as_secs(),
            "object_chunks_per_level": workloads
                .iter()
                .map(|(level, workload)| (level.to_string(), workload.objects[0].iter().map(|o| o.chunks).collect::<Vec<_>>()))
                .collect::<BTreeMap<_, _>>(),
            "runs": results.iter().map(result_json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap())
            .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
        println!("wrote {}", path.display());
    }
}
