//! The data plane: chunks and have-sets between nodes over raw QUIC (quinn), ALPN `cachemesh/1`.
//!
//! One UDP endpoint per node both serves peers ([`DataPlane::start`], answering from a
//! [`ChunkService`]) and fetches from them ([`DataPlane::have_set`], [`DataPlane::get_chunk`],
//! [`DataPlane::home_fetch`]). The wire format is `cachemesh_proto::frames`; the protocol is
//! described in `docs/protocol.md`.
//!
//! Goals:
//! - Move 4 MiB chunks at datacenter speed: flow-control windows, stream counts, initial RTT,
//!   congestion control and socket buffers are set here for chunk-sized transfers on a
//!   low-latency link, not left at quinn's internet defaults (each setting says why).
//! - Admit only cluster members: the first stream of every connection carries a [`Hello`]
//!   from each side, signed by the node key and MACed with the cluster's admission key, both
//!   over a transcript bound to this TLS session by an exported secret. TLS itself only
//!   encrypts (self-signed certificate per start, any certificate accepted, handshake
//!   signatures still checked); the Hello is the authentication.
//! - Never let a peer cost unbounded memory or time: every queue, read, request and
//!   connection count has a named limit below, and uploads share one bandwidth budget.
//!
//! Non-goals: choosing peers, hedging, retrying elsewhere, penalising peers (the fetch path
//! does that with the typed [`PeerError`]s); storing chunks; membership.
//!
//! Invariants:
//! - Nothing is served on a connection before the peer's Hello checked out, and a
//!   connection whose peer fails a check is closed with [`CLOSE_ADMISSION_REFUSED`].
//! - Nothing unverified leaves this module: [`DataPlane::get_chunk`] and
//!   [`DataPlane::home_fetch`] return bytes only when they hash to the chunk id asked for.
//! - The client never allocates more than a head's announced length, which the decoder has
//!   bounded by `CHUNK_BYTES_MAX` (or `HAVE_SET_BYTES_MAX`) before any allocation.
//! - Locks: the connection-cache map and the upload budget sit behind `std` mutexes that are
//!   never held across an `.await`; a per-peer `tokio` mutex serialises connecting to that
//!   peer so concurrent requests share one connection attempt.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cachemesh_proto::frames::{
    ADMISSION_TAG_BYTES, ALPN, FrameError, Hello, PUBLIC_KEY_BYTES, Request, ResponseHead, Role, SIGNATURE_BYTES,
    Status,
};
use cachemesh_proto::limits::{CHUNK_BYTES_MAX, DC_NAME_BYTES_MAX, FRAME_MESSAGE_BYTES_MAX, HAVE_SET_BYTES_MAX};
use cachemesh_proto::{ChunkId, ObjectId};
use libp2p::PeerId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    ClientConfig, Connection, ConnectionError, Endpoint, EndpointConfig, IdleTimeout, Incoming, MtuDiscoveryConfig,
    ReadError, RecvStream, SendStream, ServerConfig, TransportConfig, VarInt, WriteError,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chunk::VerifiedChunk;
use crate::downlink::DownlinkMeter;
use crate::identity::{NodeIdentity, verify_signature};
use crate::relay::{Relay, RelayFeed, RelayReader, StripeReader};
use crate::stall::{Progress, until_stalled};
use crate::upload_line::{UploadLine, UploadSlot, tune_periodically};

// ---------------------------------------------------------------------------------------
// Limits and transport settings.
// ---------------------------------------------------------------------------------------

/// Chunks one peer connection may be downloading at once before the sender waits for window.
/// Sized for the fetch path's per-object window spread over a few holders.
pub const DOWNLOAD_CHUNKS_IN_FLIGHT_PER_PEER: u32 = 8;

/// Per-stream receive window for chunk answers (client side).
///
/// Why: quinn's default (1.25 MB) is below one chunk, so every 4 MiB chunk would stall on
/// window updates. Two chunks let a whole chunk plus its head be in flight without the
/// sender ever waiting for credit, even when the reader is a little behind.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 2 * CHUNK_BYTES_MAX;

/// Per-connection receive window (client side): all chunks in flight from one peer.
///
/// Why: bounds the memory one serving peer can make us buffer, while letting
/// [`DOWNLOAD_CHUNKS_IN_FLIGHT_PER_PEER`] chunks stream concurrently at full speed (quinn's
/// default is unbounded).
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = DOWNLOAD_CHUNKS_IN_FLIGHT_PER_PEER * CHUNK_BYTES_MAX;

/// Bytes quinn may hold from our writes on one connection (acknowledged or not).
///
/// Why: matches what a peer's [`CONNECTION_RECEIVE_WINDOW_BYTES`] lets us send, so serving is
/// never limited by our own buffer; the bytes are slices of chunks we already hold, and the
/// number of chunks held is bounded by [`SERVE_REQUESTS_MAX`].
pub const SEND_WINDOW_BYTES: u64 = CONNECTION_RECEIVE_WINDOW_BYTES as u64;

/// Requests one peer may have in service at once, over all its connections; more are
/// answered `Busy`, so one peer cannot take every serving slot.
pub const REQUESTS_PER_PEER_MAX: usize = 16;

/// Bidirectional streams a peer may open at once on an admitted connection.
///
/// Why: above [`REQUESTS_PER_PEER_MAX`] so that excess requests reach us and get a quick
/// `Busy` (the client then asks elsewhere) instead of queueing invisibly in QUIC; but
/// bounded, so a peer cannot make us hold unboundedly many streams.
pub const REQUEST_STREAMS_PER_CONNECTION_MAX: u32 = 2 * REQUESTS_PER_PEER_MAX as u32;

/// Requests in service across all connections; more are answered `Busy`. Each may pin one
/// chunk in memory, so this bounds what serving holds to this many chunks.
pub const SERVE_REQUESTS_MAX: usize = 64;
/// Stripe answers in service at once across all peers, bounded apart from
/// [`SERVE_REQUESTS_MAX`]: a relayer answers every reader of a DC for each chunk in flight
/// (about 130 at once for 16 hosts), and each answer holds at most one stripe (an eighth
/// of a chunk; most read a relay that all who want the stripe share), so 256 of them pin at
/// most as much memory as 32 chunks.
pub const STRIPE_ANSWERS_MAX: usize = 256;

/// Admitted inbound connections; a peer admitted beyond it is closed with [`CLOSE_BUSY`].
pub const CONNECTIONS_MAX: usize = 1024;

/// Admitted inbound connections from one peer (ours keep one; a restart briefly makes two).
pub const CONNECTIONS_PER_PEER_MAX: usize = 4;

/// Inbound connections still in their handshake or Hello exchange; more are refused.
/// Separate from [`CONNECTIONS_MAX`] so that a flood of strangers cannot crowd out members.
pub const ADMISSIONS_IN_PROGRESS_MAX: usize = 64;

/// Peers the client keeps a connection to; beyond it, closed entries are dropped first.
pub const PEER_CONNECTIONS_MAX: usize = 1024;

/// Per-stream receive window on the serving side: peers send us only requests and Hellos.
///
/// Why: a peer can make us buffer at most this per stream before we read it, so a hostile
/// peer's junk costs at most [`SERVER_RECEIVE_WINDOW_BYTES`] per connection.
pub const SERVER_STREAM_RECEIVE_WINDOW_BYTES: u32 = 4 * 1024;

/// Per-connection receive window on the serving side.
pub const SERVER_RECEIVE_WINDOW_BYTES: u32 = REQUEST_STREAMS_PER_CONNECTION_MAX * SERVER_STREAM_RECEIVE_WINDOW_BYTES;

/// Largest Hello: magic, dc length, dc, key, signature, tag.
pub const HELLO_BYTES_MAX: usize = 5 + DC_NAME_BYTES_MAX + PUBLIC_KEY_BYTES + SIGNATURE_BYTES + ADMISSION_TAG_BYTES;

/// Bytes of a request read before giving up on it.
pub const REQUEST_BYTES_MAX: usize = Request::ENCODED_BYTES_MAX;

/// Largest answer head: a have-set of the largest object (an error head is smaller).
pub const RESPONSE_HEAD_BYTES_MAX: usize = 5 + HAVE_SET_BYTES_MAX;

/// Time for the QUIC/TLS handshake of a new connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed connect to a peer is remembered and returned to other callers at once.
/// Short: a peer that restarts is retried within about this long.
pub const CONNECT_FAILURE_MEMORY: Duration = Duration::from_secs(1);

/// Time for the Hello exchange once the handshake is done.
pub const ADMISSION_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a peer has to send its whole request once it opened a stream.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a have-set or chunk request may go without progress (both sides): until its
/// answer's head, then between quanta of its body (`crate::stall`). No deadline bounds a
/// transfer that keeps moving, so a slow or busy link never turns into a failed one.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Like [`REQUEST_TIMEOUT`], for a home fetch. Its head may wait for the whole chunk to
/// reach the home (when the home's relay slots are taken), and a chunk from a thin origin
/// link shared by many homes' fetches can take minutes to arrive (64 chunks at once over
/// 25 Mbit: 86 s each). A requester that gives up asks the next home candidate, which
/// fetches the chunk from the origin again, so this is long; a dead home is found sooner
/// anyway, when its connection is lost (see [`IDLE_TIMEOUT`]).
pub const HOME_FETCH_TIMEOUT: Duration = Duration::from_secs(180);

/// Time to deliver a refusal (`Busy`, `BadRequest`) before abandoning the stream.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// RTT assumed before the first sample.
///
/// Why: quinn's default is 333 ms (internet, per RFC 9002); a datacenter round trip is well
/// under a millisecond, and a high initial guess makes the first loss recovery and pacing of
/// every new connection hundreds of times too slow.
pub const INITIAL_RTT: Duration = Duration::from_millis(1);

/// Keep-alive on client connections.
///
/// Why: a cached connection stays warm (no handshake + Hello before the next chunk), and a
/// dead peer shows up within [`IDLE_TIMEOUT`] even while a request waits on it.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// Silence after which a connection is dropped.
///
/// Why: datacenter peers answer in microseconds, and a saturated link still carries ACKs and
/// keep-alives; 4 s of complete silence means the peer is gone. A request in flight to a
/// peer that died (a home fetch, say) waits this long before the reader moves on, so it is
/// kept short (quinn's default is 30 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Cubic's initial congestion window.
///
/// Why: quinn's default (about 14.7 KB) takes a dozen round trips to reach chunk speed on a
/// new connection; 256 KiB gets there in four on a 1 ms path, while staying small enough that
/// a hundred hosts starting at once do not overflow shallow datacenter switch buffers.
pub const CONGESTION_INITIAL_WINDOW_BYTES: u64 = 256 * 1024;

/// Largest UDP payload MTU discovery probes for: 6550 bytes.
///
/// Why: bigger packets cut per-packet CPU, which bounds QUIC throughput, and datacenter
/// fabrics often carry 9000-byte jumbo frames; paths that do not just fail the probes and
/// stay at the smaller size. It is not the full 8952 a jumbo frame holds because quinn sends
/// up to [`QUINN_GSO_SEGMENTS_MAX`] packets in one segmentation-offload send, Linux refuses a
/// send of more than [`UDP_GSO_SEND_BYTES_MAX`], and quinn then turns segmentation offload
/// off for the socket for good: one system call per packet, slower than small packets
/// (measured: a 1 GiB peer fetch took 20-30% longer with 8952).
pub const MTU_DISCOVERY_UPPER_BOUND_BYTES: u16 = (UDP_GSO_SEND_BYTES_MAX / QUINN_GSO_SEGMENTS_MAX) as u16;

/// Packets quinn 0.11 puts in one segmentation-offload send (its `MAX_TRANSMIT_SEGMENTS`).
pub const QUINN_GSO_SEGMENTS_MAX: usize = 10;

/// UDP payload bytes one Linux segmentation-offload send may carry over IPv4: 65,535 less
/// the IPv4 and UDP headers (IPv6 allows 20 bytes more).
pub const UDP_GSO_SEND_BYTES_MAX: usize = 65_535 - 20 - 8;

/// Largest UDP payload this node accepts, announced to peers in the handshake.
///
/// Why: a peer's MTU discovery never probes above what this node announces, and quinn
/// announces 1472 unless told otherwise, which kept [`MTU_DISCOVERY_UPPER_BOUND_BYTES`] from
/// ever taking effect. Announcing the same bound lets two jumbo-frame hosts use jumbo packets.
pub const MAX_UDP_PAYLOAD_BYTES: u16 = MTU_DISCOVERY_UPPER_BOUND_BYTES;

/// UDP socket receive buffer asked of the kernel (capped by `net.core.rmem_max`).
///
/// Why: the default (about 208 KiB) is less than one chunk, so bursts from several peers
/// are dropped at the socket and retransmitted.
pub const UDP_RECEIVE_BUFFER_BYTES: usize = 2 * CONNECTION_RECEIVE_WINDOW_BYTES as usize;

/// UDP socket send buffer asked of the kernel (capped by `net.core.wmem_max`).
pub const UDP_SEND_BUFFER_BYTES: usize = 2 * CHUNK_BYTES_MAX as usize;

pub use crate::upload_line::UPLOAD_SLOTS;

/// Answers a home sends while their chunk is still arriving (cut-through), besides the
/// upload slots. Such an answer goes at the pace of the home's own download, which may be
/// a small share of a busy origin's link: in an upload slot it would keep the slot from
/// chunks that are all here. Requesters beyond these wait in the line for the whole chunk.
/// Why 15: when N hosts read an object from the origin at once, N homes download a chunk
/// each, every download at about 1/N of the origin's link, and each home has N - 1
/// requesters; an upload as fast as the origin's link carries all N - 1 at that pace, so a
/// DC of up to 16 hosts needs no requester to wait for the whole chunk. Measured
/// (docs/benchmarks.md, 2026-11-30 eighth), 16 hosts reading from the origin: 7 slots left
/// 8 requesters per chunk waiting, and 15 took 117-120 s against 132-166 s at 25 Mbit, and
/// 121 s against 130-133 s at 100 Mbit. Earlier, with 8 hosts, 7 slots were about 7% faster
/// than 2 (mean 29.5 s against 31.7 s over 7 pairs of runs).
pub const RELAY_SLOTS: usize = 15;

/// Bytes of a chunk written between two draws on the upload budget.
pub const UPLOAD_SLICE_BYTES: usize = 64 * 1024;

/// Bytes the upload budget lets through at once after a quiet period.
pub const UPLOAD_BURST_BYTES: u64 = 1024 * 1024;

/// When the upload budget already has this much sending queued, new chunk requests are
/// answered `Busy` (the peer asks elsewhere) rather than queued behind it.
pub const UPLOAD_BACKLOG_BUSY_AFTER: Duration = Duration::from_secs(1);

/// Label of the TLS exporter that binds Hellos to a session.
pub const ADMISSION_EXPORTER_LABEL: &[u8] = b"cachemesh/1 admission";

/// Length of the exported secret.
pub const ADMISSION_EXPORTER_BYTES: usize = 32;

/// Name the client puts in its TLS ClientHello (any certificate is accepted).
const SERVER_NAME: &str = "cachemesh";

/// Connection close code: this node is shutting down.
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);
/// Connection close code: the peer failed admission.
pub const CLOSE_ADMISSION_REFUSED: VarInt = VarInt::from_u32(1);
/// Connection close code: the client replaced a connection to a peer that moved.
pub const CLOSE_REPLACED: VarInt = VarInt::from_u32(2);
/// Connection close code: admitted, but at [`CONNECTIONS_MAX`] or [`CONNECTIONS_PER_PEER_MAX`].
pub const CLOSE_BUSY: VarInt = VarInt::from_u32(3);
/// Connection close code: the control plane saw the peer's connection break.
pub const CLOSE_PEER_GONE: VarInt = VarInt::from_u32(4);
/// Stream reset code: the request was abandoned (timeout, malformed, shutting down).
pub const STREAM_ABANDONED: VarInt = VarInt::from_u32(1);
/// Stream reset code: a home gave up a chunk it was passing on while it arrived (its source
/// sent corrupt bytes, and its verified copy differs from what was sent); asking the home
/// again gets the verified copy.
pub const STREAM_RELAY_FAILED: VarInt = VarInt::from_u32(2);

/// Priority of have-set answers over chunk bytes on one connection: they are small and
/// steer where the next chunks are fetched from.
const HAVE_SET_PRIORITY: i32 = 1;

const _: () = assert!(MTU_DISCOVERY_UPPER_BOUND_BYTES as usize * QUINN_GSO_SEGMENTS_MAX <= UDP_GSO_SEND_BYTES_MAX);
const _: () = assert!(STREAM_RECEIVE_WINDOW_BYTES >= 2 * CHUNK_BYTES_MAX);
const _: () = assert!(CONNECTION_RECEIVE_WINDOW_BYTES >= STREAM_RECEIVE_WINDOW_BYTES);
const _: () = assert!((REQUEST_STREAMS_PER_CONNECTION_MAX as usize) > REQUESTS_PER_PEER_MAX);
const _: () = assert!(SERVE_REQUESTS_MAX >= REQUESTS_PER_PEER_MAX);
const _: () = assert!(CONNECTIONS_PER_PEER_MAX >= 2 && CONNECTIONS_PER_PEER_MAX <= CONNECTIONS_MAX);
const _: () = assert!(SERVER_STREAM_RECEIVE_WINDOW_BYTES as usize >= HELLO_BYTES_MAX);
const _: () = assert!(SERVER_STREAM_RECEIVE_WINDOW_BYTES as usize >= REQUEST_BYTES_MAX);
const _: () = assert!(UPLOAD_BURST_BYTES >= UPLOAD_SLICE_BYTES as u64);
const _: () = assert!(RESPONSE_HEAD_BYTES_MAX >= 4 + FRAME_MESSAGE_BYTES_MAX);
const _: () = assert!(KEEP_ALIVE_INTERVAL.as_millis() * 3 <= IDLE_TIMEOUT.as_millis());
const _: () = assert!(CONNECT_TIMEOUT.as_secs() + ADMISSION_TIMEOUT.as_secs() < REQUEST_TIMEOUT.as_secs());
const _: () = assert!(REQUEST_TIMEOUT.as_secs() <= HOME_FETCH_TIMEOUT.as_secs());

// ---------------------------------------------------------------------------------------
// Public types.
// ---------------------------------------------------------------------------------------

/// What the serving side answers from: the node's store, have-sets and home fetches.
pub trait ChunkService: Send + Sync + 'static {
    /// Chunks of `object` this node holds: (chunk_count, bitmap LSB-first), None if unknown object.
    /// `peer` is the admitted peer asking: it is fetching the object, so it will soon hold
    /// chunks of it too (the mesh uses that as a hint of a holder).
    fn have_set(&self, peer: PeerId, object: ObjectId) -> impl Future<Output = Option<(u32, Vec<u8>)>> + Send;
    /// A verified local chunk, None if not held.
    fn local_chunk(&self, id: ChunkId) -> impl Future<Output = Option<Bytes>> + Send;
    /// As home node: the chunk from the local store, else (when `of` names an object and
    /// the chunk's index in it) from holders of that object, else the origin; coalesced,
    /// verified, or passed on while it arrives ([`HomeChunk::Arriving`]).
    fn home_fetch(
        &self,
        id: ChunkId,
        of: Option<(ObjectId, u32)>,
    ) -> impl Future<Output = Result<HomeChunk, HomeFetchError>> + Send;
    /// Stripe `stripe` of `stripes` of chunk `id` (the chunk at `of`), unverified, as it
    /// arrives: with `from_home`, as the chunk's home (fetching it as
    /// [`ChunkService::home_fetch`] does); else as the stripe's relayer (`crate::stripe`).
    fn stripe(
        &self,
        id: ChunkId,
        of: (ObjectId, u32),
        stripe: (u16, u16),
        from_home: bool,
    ) -> impl Future<Output = Result<StripeAnswer, HomeFetchError>> + Send;
}

/// What a stripe request answers a peer with.
#[derive(Debug)]
pub enum StripeAnswer {
    /// The stripe's bytes, all here.
    Whole(Bytes),
    /// The stripe's bytes as they arrive at this node.
    Arriving(StripeReader),
}

/// What a home fetch answers a peer with.
pub enum HomeChunk {
    /// The verified chunk.
    Whole(Bytes),
    /// The chunk as it arrives at this node (cut-through): sent on piece by piece, the last
    /// only once this node verified it.
    Arriving {
        /// The chunk's length.
        length: usize,
        /// The arriving bytes.
        reader: RelayReader,
        /// The fetch's verified answer, to finish from when the relay fails part way (its
        /// feed lost a race or broke, and another source answered).
        answer: futures::future::BoxFuture<'static, Result<Bytes, HomeFetchError>>,
    },
}

impl std::fmt::Debug for HomeChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Whole(bytes) => f.debug_tuple("Whole").field(&bytes.len()).finish(),
            Self::Arriving { length, .. } => f.debug_struct("Arriving").field("length", length).finish_non_exhaustive(),
        }
    }
}

/// Why a home fetch failed on the serving node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HomeFetchError {
    /// The origin does not have the chunk.
    #[error("the chunk is not at the origin")]
    NotFound,
    /// The origin could not be reached or failed.
    #[error("the origin is unavailable: {0}")]
    OriginUnavailable(String),
    /// A fault in this node.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A peer to talk to: who it must prove to be, and where its data plane listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerTarget {
    /// The peer id the peer's Hello must prove.
    pub peer_id: PeerId,
    /// Its data-plane UDP address.
    pub addr: SocketAddr,
}

/// How to run the data plane.
pub struct DataPlaneConfig {
    /// UDP address to listen on (port 0 picks one; see [`DataPlane::local_addr`]).
    pub listen: SocketAddr,
    /// This node's datacenter; peers of other DCs are refused.
    pub dc: String,
    /// This node's identity, which signs its Hellos.
    pub identity: NodeIdentity,
    /// The cluster's admission MAC key (`ClusterKey::admission_key`).
    pub admission_key: [u8; 32],
    /// Upload budget shared by all peers, in bytes per second; None for unlimited.
    pub upload_limit_bytes_per_second: Option<u64>,
    /// This node's link rate in bytes per second (`--link-rate`), when known: the upload
    /// line adds slots while uploads leave the link idle ([`crate::upload_line`]).
    pub link_rate_bytes_per_second: Option<u64>,
    /// Test fault: chunks served to peers (GetChunk and home fetches) have one byte flipped.
    #[cfg(feature = "test-faults")]
    pub corrupt_served_chunks: bool,
    /// Test fault: chunks served to peers wait this long before their first byte (a slow peer).
    #[cfg(feature = "test-faults")]
    pub delay_served_chunks: Duration,
}

impl DataPlaneConfig {
    /// A config with no upload limit (and no faults).
    pub fn new(listen: SocketAddr, dc: String, identity: NodeIdentity, admission_key: [u8; 32]) -> Self {
        Self {
            listen,
            dc,
            identity,
            admission_key,
            upload_limit_bytes_per_second: None,
            link_rate_bytes_per_second: None,
            #[cfg(feature = "test-faults")]
            corrupt_served_chunks: false,
            #[cfg(feature = "test-faults")]
            delay_served_chunks: Duration::ZERO,
        }
    }
}

impl std::fmt::Debug for DataPlaneConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the admission key.
        f.debug_struct("DataPlaneConfig")
            .field("listen", &self.listen)
            .field("dc", &self.dc)
            .field("identity", &self.identity)
            .field("upload_limit_bytes_per_second", &self.upload_limit_bytes_per_second)
            .finish_non_exhaustive()
    }
}

/// Why the data plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The configuration is unusable.
    #[error("data plane configuration: {0}")]
    Config(String),
    /// The UDP socket could not be bound.
    #[error("data plane cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// The TLS setup (certificate, rustls or quinn crypto config) failed.
    #[error("data plane TLS setup: {0}")]
    Tls(String),
}

/// Which admission check failed (the `reason` label of
/// `cachemesh_peer_admission_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionFailure {
    /// The Hello was not a Hello, too long, or the stream ended early.
    #[error("malformed hello")]
    Malformed,
    /// The peer belongs to another datacenter.
    #[error("peer is in another datacenter")]
    WrongDc,
    /// The admission tag does not match: the peer lacks the cluster key.
    #[error("admission tag does not match (no cluster key)")]
    BadTag,
    /// The signature does not verify under the key the peer presented.
    #[error("signature does not verify")]
    BadSignature,
    /// The peer proved an identity other than the one we meant to reach.
    #[error("peer is not the node we meant to reach")]
    WrongPeer,
    /// The peer closed the connection because we failed its checks.
    #[error("refused by the peer")]
    RefusedByPeer,
    /// The Hello exchange took longer than [`ADMISSION_TIMEOUT`].
    #[error("hello exchange timed out")]
    Timeout,
    /// The connection failed during the exchange, or no session secret could be exported.
    #[error("connection failed during the hello exchange")]
    Disconnected,
}

impl AdmissionFailure {
    /// The metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::WrongDc => "wrong_dc",
            Self::BadTag => "bad_tag",
            Self::BadSignature => "bad_signature",
            Self::WrongPeer => "wrong_peer",
            Self::RefusedByPeer => "refused_by_peer",
            Self::Timeout => "timeout",
            Self::Disconnected => "disconnected",
        }
    }
}

/// Why a request to a peer failed. The fetch path decides from this whether to try another
/// peer, penalise this one, or fall back to the origin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The peer could not be reached, or the connection was lost.
    #[error("cannot reach the peer: {0}")]
    Connect(String),
    /// The Hello exchange failed (either side's checks).
    #[error("peer admission failed: {0}")]
    Admission(AdmissionFailure),
    /// The peer is at its request or upload limit; ask elsewhere.
    #[error("the peer is busy")]
    Busy,
    /// The peer does not hold it (or, for a home fetch, the origin does not).
    #[error("the peer does not have it")]
    NotFound,
    /// The peer sent bytes that do not hash to the chunk id.
    #[error("the peer sent chunk {chunk} with the wrong bytes")]
    Corrupt {
        /// The chunk asked for.
        chunk: ChunkId,
    },
    /// The request did not finish within its time limit.
    #[error("the request timed out")]
    Timeout,
    /// The peer broke the protocol.
    #[error("protocol violation by the peer: {0}")]
    Protocol(String),
    /// The home gave up a chunk it passed on while it arrived; asking again gets the
    /// verified copy.
    #[error("the home gave up relaying the chunk")]
    RelayFailed,
    /// The peer refused with another status.
    #[error("the peer refused ({status:?}): {message}")]
    Remote {
        /// The status.
        status: Status,
        /// The peer's message, for logs.
        message: String,
    },
}

impl PeerError {
    /// The metrics label (`cachemesh_peer_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Admission(_) => "admission",
            Self::Busy => "busy",
            Self::NotFound => "not_found",
            Self::Corrupt { .. } => "corrupt",
            Self::Timeout => "timeout",
            Self::Protocol(_) => "protocol",
            Self::RelayFailed => "relay_failed",
            Self::Remote { .. } => "remote",
        }
    }
}

/// Describes this module's metrics (called by `crate::metrics` with the others).
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!("cachemesh_peer_upload_bytes_total", Unit::Bytes, "Chunk bytes sent to peers.");
    describe_counter!(
        "cachemesh_relayed_chunks_total",
        "Home fetches answered while the chunk arrived (cut-through), by outcome: relayed, finished_whole (the relay failed, the verified answer finished it), abandoned."
    );
    describe_counter!("cachemesh_peer_download_bytes_total", Unit::Bytes, "Chunk bytes received from peers.");
    describe_counter!(
        "cachemesh_stripes_total",
        "Chunks assembled from stripes (assembled), and stripes asked of the chunk's home because their relayer did not give them (from_home)."
    );
    describe_counter!(
        "cachemesh_peer_requests_served_total",
        "Data-plane requests answered, by kind (have_set, get_chunk, get_chunk_for_home, home_fetch, stripe, stripe_from_home, unknown) and status."
    );
    describe_counter!("cachemesh_peer_errors_total", "Failed requests to peers, by kind of PeerError.");
    describe_counter!(
        "cachemesh_peer_admission_failures_total",
        "Data-plane connections closed because a Hello check failed, by reason."
    );
    describe_counter!(
        "cachemesh_peer_connections_refused_total",
        "Inbound data-plane connections refused for capacity, by limit (admissions, connections, per_peer)."
    );
    describe_gauge!("cachemesh_peer_inbound_connections", "Admitted inbound data-plane connections.");
    describe_gauge!("cachemesh_upload_slots", "Whole-chunk answers this node may send to peers at once.");
}

// ---------------------------------------------------------------------------------------
// The data plane.
// ---------------------------------------------------------------------------------------

/// A running data plane: serves peers until the shutdown token fires, and fetches from them.
/// Cheap to clone (shared state).
#[derive(Clone)]
pub struct DataPlane {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("local_addr", &self.shared.local_addr)
            .field("peer_id", &self.shared.local.identity.peer_id())
            .finish_non_exhaustive()
    }
}

/// What is known about reaching one peer.
#[derive(Default)]
struct PeerSlotState {
    connection: Option<Connection>,
    /// The last failed connect, while younger than [`CONNECT_FAILURE_MEMORY`]: callers
    /// queued behind a failing connect get its error at once instead of each waiting out
    /// their own [`CONNECT_TIMEOUT`] one after another.
    /// Kept with the address that failed: a peer that restarted elsewhere is tried at once.
    failed: Option<(Instant, PeerError, SocketAddr)>,
}

/// A slot per peer; the tokio mutex serialises (re)connecting to that peer.
type PeerSlot = Arc<tokio::sync::Mutex<PeerSlotState>>;

struct Shared {
    endpoint: Endpoint,
    local_addr: SocketAddr,
    local: Arc<LocalHello>,
    /// `std` mutex, never held across an `.await`.
    peers: Mutex<HashMap<PeerId, PeerSlot>>,
    /// Connection attempts made, for tests of the connect path.
    connects_started: AtomicU64,
    /// Chunk bytes received from peers, against the link's rate.
    downlink: Arc<DownlinkMeter>,
    /// The upload budget the server draws on, when limited (for tests of the serve path).
    #[cfg(test)]
    upload: Option<Arc<Mutex<UploadBudget>>>,
    tracker: TaskTracker,
}

/// What this node needs to produce and check Hellos.
struct LocalHello {
    dc: String,
    identity: NodeIdentity,
    admission_key: [u8; 32],
}

impl DataPlane {
    /// Binds the endpoint and serves `service` to admitted peers until `shutdown` fires.
    pub async fn start<S: ChunkService>(
        config: DataPlaneConfig,
        service: Arc<S>,
        shutdown: CancellationToken,
    ) -> Result<DataPlane, TransportError> {
        if config.dc.len() > DC_NAME_BYTES_MAX {
            return Err(TransportError::Config(format!("dc name is longer than {DC_NAME_BYTES_MAX} bytes")));
        }
        let upload = match config.upload_limit_bytes_per_second {
            Some(0) => return Err(TransportError::Config("the upload limit must be above zero".into())),
            Some(rate) => Some(Arc::new(Mutex::new(UploadBudget::new(rate, UPLOAD_BURST_BYTES, Instant::now())))),
            None => None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = server_config(provider.clone())?;
        let client_config = client_config(provider)?;

        let socket = bind_socket(config.listen)?;
        let mut endpoint =
            Endpoint::new(endpoint_config()?, Some(server_config), socket, Arc::new(quinn::TokioRuntime))
                .map_err(|source| TransportError::Bind { addr: config.listen, source })?;
        endpoint.set_default_client_config(client_config);
        let local_addr =
            endpoint.local_addr().map_err(|source| TransportError::Bind { addr: config.listen, source })?;

        let local =
            Arc::new(LocalHello { dc: config.dc, identity: config.identity, admission_key: config.admission_key });
        let tracker = TaskTracker::new();
        let upload_line = Arc::new(UploadLine::new(UPLOAD_SLOTS));
        metrics::gauge!("cachemesh_upload_slots").set(upload_line.slots() as f64);
        if let Some(link) = config.link_rate_bytes_per_second.filter(|link| *link > 0) {
            tracker.spawn(tune_periodically(upload_line.clone(), link, shutdown.clone()));
        }
        let server = Arc::new(Server {
            service,
            local: local.clone(),
            #[cfg(test)]
            upload: upload.clone(),
            #[cfg(not(test))]
            upload,
            serving: Arc::new(Semaphore::new(SERVE_REQUESTS_MAX)),
            stripe_answers: Arc::new(Semaphore::new(STRIPE_ANSWERS_MAX)),
            upload_line: upload_line.clone(),
            relay_slots: Arc::new(Semaphore::new(RELAY_SLOTS)),
            connections: Arc::new(Semaphore::new(CONNECTIONS_MAX)),
            peer_loads: Arc::new(Mutex::new(HashMap::new())),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            #[cfg(feature = "test-faults")]
            corrupt_served_chunks: config.corrupt_served_chunks,
            #[cfg(feature = "test-faults")]
            delay_served_chunks: config.delay_served_chunks,
        });
        tracker.spawn(accept_loop(endpoint.clone(), server, shutdown));
        tracing::info!(addr = %local_addr, peer_id = %local.identity.peer_id(), "data plane listening");
        Ok(DataPlane {
            shared: Arc::new(Shared {
                endpoint,
                local_addr,
                local,
                peers: Mutex::new(HashMap::new()),
                connects_started: AtomicU64::new(0),
                downlink: Arc::new(DownlinkMeter::new(config.link_rate_bytes_per_second, Instant::now())),
                #[cfg(test)]
                upload,
                tracker,
            }),
        })
    }

    /// Whether an admitted connection to `peer` is open and not closed (as far as QUIC
    /// knows: a dead peer's connection closes within [`IDLE_TIMEOUT`]), or one is being set
    /// up (its slot is busy connecting). Never waits. A peer not yet asked anything, or
    /// whose connection closed, is neither.
    pub fn is_connected_or_connecting(&self, peer: &PeerId) -> bool {
        let slot = self.shared.peers.lock().unwrap_or_else(PoisonError::into_inner).get(peer).cloned();
        slot.is_some_and(|slot| match slot.try_lock() {
            Err(_) => true,
            Ok(state) => state.connection.as_ref().is_some_and(|connection| connection.close_reason().is_none()),
        })
    }

    /// Closes the connection to `peer`, if any: requests in flight on it fail at once (the
    /// peer is known to be gone). Never waits on a slot that is busy connecting.
    pub fn close_peer(&self, peer: &PeerId) {
        let slot = self.shared.peers.lock().unwrap_or_else(PoisonError::into_inner).get(peer).cloned();
        if let Some(slot) = slot
            && let Ok(mut state) = slot.try_lock()
            && let Some(connection) = state.connection.take()
        {
            connection.close(CLOSE_PEER_GONE, b"peer gone");
            // Requests already holding its old address fail fast instead of each waiting
            // out a connect to a dead address.
            let gone = PeerError::Connect("the peer's control-plane connection broke".into());
            state.failed = Some((Instant::now(), gone, connection.remote_address()));
        }
    }

    /// Whether this node's downlink carried more than `downlink::DOWNLINK_FULL_ABOVE` of
    /// its `--link-rate` in chunk bytes from peers lately (never, with no link rate set).
    pub fn downlink_full(&self) -> bool {
        self.shared.downlink.full(Instant::now())
    }

    /// The UDP address the data plane listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// This node's peer id, as its Hellos prove it.
    pub fn peer_id(&self) -> PeerId {
        self.shared.local.identity.peer_id()
    }

    /// Waits until the serving tasks have stopped (after the shutdown token fired).
    pub async fn stopped(&self) {
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
        self.shared.endpoint.wait_idle().await;
    }

    /// The have-set of `object` at `peer`: (chunk_count, bitmap LSB-first).
    pub async fn have_set(&self, peer: &PeerTarget, object: ObjectId) -> Result<(u32, Vec<u8>), PeerError> {
        let answer = self.request(peer, Request::HaveSet(object), REQUEST_TIMEOUT, None).await;
        let result = match answer {
            Ok(Answer::HaveSet { chunk_count, bitmap }) => Ok((chunk_count, bitmap)),
            Ok(Answer::Chunk(..)) => Err(PeerError::Protocol("a chunk answered a have-set request".into())),
            Err(error) => Err(error),
        };
        count_peer_error(peer, result)
    }

    /// Chunk `id`, whole, from `peer`; verified against its id.
    pub async fn get_chunk(&self, peer: &PeerTarget, id: ChunkId) -> Result<VerifiedChunk, PeerError> {
        let request = Request::GetChunk { id, offset: 0, length: 0 };
        let result = self.request(peer, request, REQUEST_TIMEOUT, None).await.and_then(|answer| verified(answer, id));
        count_peer_error(peer, result)
    }

    /// Chunk `id`, whole and verified, from `peer`, for this node as the chunk's home: the
    /// peer serves it when an upload slot is free, however long its line, and never answers
    /// `Busy` for the line's sake. When `relay` is given and no other attempt feeds it yet,
    /// the bytes are also fed into it as they arrive, for the peers waiting on this node.
    pub async fn get_chunk_for_home(
        &self,
        peer: &PeerTarget,
        id: ChunkId,
        relay: Option<&Arc<Relay>>,
    ) -> Result<VerifiedChunk, PeerError> {
        let request = Request::GetChunkForHome(id);
        let result =
            self.request(peer, request, HOME_FETCH_TIMEOUT, relay).await.and_then(|answer| verified(answer, id));
        count_peer_error(peer, result)
    }

    /// Chunk `id` from `peer` acting as its home node (its store, the holders of `of`'s
    /// object when given, or the origin); verified.
    pub async fn home_fetch(
        &self,
        peer: &PeerTarget,
        id: ChunkId,
        of: Option<(ObjectId, u32)>,
    ) -> Result<VerifiedChunk, PeerError> {
        let request = match of {
            Some((object, index)) => Request::HomeFetchOf { id, object, index },
            None => Request::HomeFetch(id),
        };
        let ask = || async {
            self.request(peer, request, HOME_FETCH_TIMEOUT, None).await.and_then(|answer| verified(answer, id))
        };
        let result = match ask().await {
            // Once: the home has the verified chunk by now.
            Err(PeerError::RelayFailed) => ask().await,
            other => other,
        };
        count_peer_error(peer, result)
    }

    /// Stripe `stripe` (of `stripes`) of chunk `id`, the chunk at `of`, `length` bytes when
    /// known (unverified: the caller checks the chunk it assembles from its stripes), from `peer`
    /// as the chunk's home (`from_home`) or as the stripe's relayer; fed into `relay` as it
    /// arrives when given.
    #[allow(clippy::too_many_arguments)]
    pub async fn stripe(
        &self,
        peer: &PeerTarget,
        id: ChunkId,
        of: (ObjectId, u32),
        (stripe, stripes): (u16, u16),
        length: Option<usize>,
        from_home: bool,
        relay: Option<&Arc<Relay>>,
    ) -> Result<Bytes, PeerError> {
        let request = Request::Stripe { id, object: of.0, index: of.1, stripe, stripes, from_home };
        let result = match self.request(peer, request, HOME_FETCH_TIMEOUT, relay).await {
            Ok(Answer::Chunk(bytes, feed)) if length.is_none_or(|length| bytes.len() == length) => {
                if let Some(feed) = feed {
                    feed.finish_stripe(&bytes);
                }
                Ok(bytes)
            }
            Ok(Answer::Chunk(..)) => Err(PeerError::Protocol("a stripe of the wrong length".into())),
            Ok(Answer::HaveSet { .. }) => Err(PeerError::Protocol("a have-set answered a stripe request".into())),
            Err(error) => Err(error),
        };
        count_peer_error(peer, result)
    }

    /// One request, retried once on a fresh connection when a cached one turns out dead;
    /// a chunk answer feeds `relay` when given (see [`Relay::claim`]).
    async fn request(
        &self,
        peer: &PeerTarget,
        request: Request,
        limit: Duration,
        relay: Option<&Arc<Relay>>,
    ) -> Result<Answer, PeerError> {
        let progress = Progress::new(Instant::now());
        let trace = ExchangeTrace { downlink: Some(self.shared.downlink.clone()), ..ExchangeTrace::default() };
        let attempt = async {
            let (connection, fresh) = self.connection(peer).await?;
            match exchange(&connection, request, relay, &progress, &trace).await {
                Err(ExchangeError::Lost(detail)) if !fresh => {
                    tracing::debug!(peer = %peer.peer_id, %detail, "cached connection was dead; reconnecting");
                    let (connection, _) = self.connection(peer).await?;
                    exchange(&connection, request, relay, &progress, &trace)
                        .await
                        .map_err(ExchangeError::into_peer_error)
                }
                other => other.map_err(ExchangeError::into_peer_error),
            }
        };
        let result = until_stalled(limit, &progress, attempt).await.unwrap_or(Err(PeerError::Timeout));
        if matches!(result, Err(PeerError::Timeout)) {
            let bytes = progress.bytes_so_far();
            let stats = trace.connection.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(Connection::stats);
            tracing::debug!(
                peer = %peer.peer_id,
                request = request_kind(&request),
                stage = trace.stage().name(),
                bytes,
                limit_s = limit.as_secs(),
                rtt_ms = stats.as_ref().map(|s| s.path.rtt.as_millis() as u64),
                cwnd = stats.as_ref().map(|s| s.path.cwnd),
                lost_packets = stats.as_ref().map(|s| s.path.lost_packets),
                sent_packets = stats.as_ref().map(|s| s.path.sent_packets),
                congestion_events = stats.as_ref().map(|s| s.path.congestion_events),
                data_blocked_rx = stats.as_ref().map(|s| s.frame_rx.data_blocked),
                stream_data_blocked_rx = stats.as_ref().map(|s| s.frame_rx.stream_data_blocked),
                streams_blocked_tx = stats.as_ref().map(|s| s.frame_tx.streams_blocked_bidi),
                data_blocked_tx = stats.as_ref().map(|s| s.frame_tx.data_blocked),
                "request made no progress for its limit"
            );
        }
        result
    }

    /// The cached admitted connection to `peer`, or a new one; `true` when new.
    async fn connection(&self, peer: &PeerTarget) -> Result<(Connection, bool), PeerError> {
        let slot = {
            let mut peers = self.shared.peers.lock().unwrap_or_else(PoisonError::into_inner);
            if !peers.contains_key(&peer.peer_id) && peers.len() >= PEER_CONNECTIONS_MAX {
                // Drop peers whose connection is gone and that nobody is connecting to.
                peers.retain(|_, slot| match slot.try_lock() {
                    Ok(state) => state.connection.as_ref().is_some_and(|c| c.close_reason().is_none()),
                    Err(_) => true,
                });
                if peers.len() >= PEER_CONNECTIONS_MAX {
                    return Err(PeerError::Connect(format!("already connected to {PEER_CONNECTIONS_MAX} peers")));
                }
            }
            peers.entry(peer.peer_id).or_default().clone()
        };
        let mut state = slot.lock().await;
        if let Some(connection) = state.connection.as_ref() {
            if connection.close_reason().is_none() && same_address(connection.remote_address(), peer.addr) {
                return Ok((connection.clone(), false));
            }
            if connection.close_reason().is_none() {
                connection.close(CLOSE_REPLACED, b"peer moved");
            }
        }
        state.connection = None;
        if let Some((at, error, addr)) = &state.failed
            && at.elapsed() < CONNECT_FAILURE_MEMORY
            && same_address(*addr, peer.addr)
        {
            return Err(error.clone());
        }
        match self.connect(peer).await {
            Ok(connection) => {
                state.failed = None;
                state.connection = Some(connection.clone());
                Ok((connection, true))
            }
            Err(error) => {
                state.failed = Some((Instant::now(), error.clone(), peer.addr));
                Err(error)
            }
        }
    }

    /// Connects to `peer` and runs the client side of the Hello exchange.
    async fn connect(&self, peer: &PeerTarget) -> Result<Connection, PeerError> {
        self.shared.connects_started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let connecting = self
            .shared
            .endpoint
            .connect(peer.addr, SERVER_NAME)
            .map_err(|error| PeerError::Connect(format!("{}: {error}", peer.addr)))?;
        let connection = match timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return Err(PeerError::Connect(format!("{}: {error}", peer.addr))),
            Err(_) => return Err(PeerError::Connect(format!("{}: handshake timed out", peer.addr))),
        };
        let admitted = timeout(ADMISSION_TIMEOUT, admit_server(&connection, &self.shared.local, peer.peer_id)).await;
        match admitted.unwrap_or(Err(AdmissionFailure::Timeout)) {
            Ok(()) => Ok(connection),
            Err(_) if closed_busy(&connection) => Err(PeerError::Busy),
            Err(failure) => {
                refuse(&connection, failure, peer.addr);
                Err(PeerError::Admission(failure))
            }
        }
    }
}

fn closed_busy(connection: &Connection) -> bool {
    matches!(connection.close_reason(), Some(ConnectionError::ApplicationClosed(close)) if close.error_code == CLOSE_BUSY)
}

/// Whether two socket addresses name the same endpoint (IPv4-mapped IPv6 equals IPv4).
fn same_address(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

fn count_peer_error<T>(peer: &PeerTarget, result: Result<T, PeerError>) -> Result<T, PeerError> {
    if let Err(error) = &result {
        metrics::counter!("cachemesh_peer_errors_total", "kind" => error.kind()).increment(1);
        tracing::debug!(peer = %peer.peer_id, addr = %peer.addr, %error, "peer request failed");
    }
    result
}

fn verified(answer: Answer, id: ChunkId) -> Result<VerifiedChunk, PeerError> {
    match answer {
        Answer::Chunk(bytes, feed) => {
            // A feed dropped unfinished (corrupt bytes) fails its relay.
            let chunk = VerifiedChunk::check(id, bytes).map_err(|_| PeerError::Corrupt { chunk: id })?;
            if let Some(feed) = feed {
                feed.finish(&chunk);
            }
            Ok(chunk)
        }
        Answer::HaveSet { .. } => Err(PeerError::Protocol("a have-set answered a chunk request".into())),
    }
}

// ---------------------------------------------------------------------------------------
// Endpoint setup.
// ---------------------------------------------------------------------------------------

fn bind_socket(addr: SocketAddr) -> Result<UdpSocket, TransportError> {
    let socket = UdpSocket::bind(addr).map_err(|source| TransportError::Bind { addr, source })?;
    // Larger buffers are an optimisation: the kernel caps them at rmem_max/wmem_max, and a
    // failure to raise them is logged, not fatal.
    match quinn::udp::UdpSocketState::new((&socket).into()) {
        Ok(state) => {
            if let Err(error) = state.set_recv_buffer_size((&socket).into(), UDP_RECEIVE_BUFFER_BYTES) {
                tracing::warn!(%error, "cannot raise the data plane's UDP receive buffer");
            }
            if let Err(error) = state.set_send_buffer_size((&socket).into(), UDP_SEND_BUFFER_BYTES) {
                tracing::warn!(%error, "cannot raise the data plane's UDP send buffer");
            }
            let receive = state.recv_buffer_size((&socket).into()).unwrap_or(0);
            let send = state.send_buffer_size((&socket).into()).unwrap_or(0);
            if receive < UDP_RECEIVE_BUFFER_BYTES {
                tracing::info!(
                    asked = UDP_RECEIVE_BUFFER_BYTES,
                    got = receive,
                    "UDP receive buffer capped by the kernel (raise net.core.rmem_max)"
                );
            }
            tracing::debug!(receive, send, "data plane UDP buffers");
        }
        Err(error) => tracing::warn!(%error, "cannot configure the data plane's UDP socket"),
    }
    Ok(socket)
}

/// Endpoint-wide settings: the largest UDP payload announced to peers.
fn endpoint_config() -> Result<EndpointConfig, TransportError> {
    let mut endpoint = EndpointConfig::default();
    endpoint
        .max_udp_payload_size(MAX_UDP_PAYLOAD_BYTES)
        .map_err(|error| TransportError::Config(format!("max UDP payload: {error}")))?;
    Ok(endpoint)
}

/// Settings both directions share.
fn base_transport_config() -> TransportConfig {
    let mut transport = TransportConfig::default();
    transport
        .initial_rtt(INITIAL_RTT)
        .send_window(SEND_WINDOW_BYTES)
        // Finish one chunk before the next on a connection: a reader waits on whole chunks,
        // so round-robin interleaving would only delay every chunk in flight.
        .send_fairness(false)
        // Cubic rather than quinn's BBR, which quinn marks experimental; loss-based control
        // suits shallow-buffered datacenter links with a raised initial window.
        .congestion_controller_factory(Arc::new({
            let mut cubic = quinn::congestion::CubicConfig::default();
            cubic.initial_window(CONGESTION_INITIAL_WINDOW_BYTES);
            cubic
        }))
        .mtu_discovery_config(Some({
            let mut mtu = MtuDiscoveryConfig::default();
            mtu.upper_bound(MTU_DISCOVERY_UPPER_BOUND_BYTES);
            mtu
        }))
        // No unreliable datagrams and no unidirectional streams in this protocol.
        .datagram_receive_buffer_size(None)
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    if let Ok(idle) = IdleTimeout::try_from(IDLE_TIMEOUT) {
        transport.max_idle_timeout(Some(idle));
    }
    transport
}

/// Transport for connections we accept: peers send us small requests, we send chunks.
fn server_transport_config() -> TransportConfig {
    let mut transport = base_transport_config();
    transport
        // One stream (the Hello) until the peer is admitted; raised to
        // REQUEST_STREAMS_PER_CONNECTION_MAX afterwards.
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .stream_receive_window(VarInt::from_u32(SERVER_STREAM_RECEIVE_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(SERVER_RECEIVE_WINDOW_BYTES));
    transport
}

/// Transport for connections we open: we receive chunks, the peer never opens streams.
fn client_transport_config() -> TransportConfig {
    let mut transport = base_transport_config();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    transport
}

fn server_config(provider: Arc<CryptoProvider>) -> Result<ServerConfig, TransportError> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
        .map_err(|error| TransportError::Tls(format!("self-signed certificate: {error}")))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TransportError::Tls(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .map_err(|error| TransportError::Tls(error.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|error| TransportError::Tls(error.to_string()))?;
    let mut config = ServerConfig::with_crypto(Arc::new(crypto));
    config
        .transport_config(Arc::new(server_transport_config()))
        // Datacenter hosts do not roam; refusing migration removes a class of spoofing.
        .migration(false)
        .max_incoming(ADMISSIONS_IN_PROGRESS_MAX);
    Ok(config)
}

fn client_config(provider: Arc<CryptoProvider>) -> Result<ClientConfig, TransportError> {
    let verifier = Arc::new(AnyCertificate { provider: provider.clone() });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TransportError::Tls(error.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|error| TransportError::Tls(error.to_string()))?;
    let mut config = ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(client_transport_config()));
    Ok(config)
}

/// Accepts any server certificate (self-signed, per start) but still checks that the server
/// holds its key: the TLS 1.3 handshake signature is verified. Who the server is, is proved
/// by its Hello, bound to this session by the exporter.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs offer TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------
// Admission.
// ---------------------------------------------------------------------------------------

fn exporter(connection: &Connection) -> Result<[u8; ADMISSION_EXPORTER_BYTES], AdmissionFailure> {
    let mut out = [0u8; ADMISSION_EXPORTER_BYTES];
    connection
        .export_keying_material(&mut out, ADMISSION_EXPORTER_LABEL, b"")
        .map_err(|_| AdmissionFailure::Disconnected)?;
    Ok(out)
}

fn make_hello(local: &LocalHello, role: Role, exporter: &[u8; ADMISSION_EXPORTER_BYTES]) -> Hello {
    let public_key = local.identity.public_key();
    let transcript = Hello::transcript(role, exporter, &public_key, &local.dc);
    Hello {
        dc: local.dc.clone(),
        public_key,
        signature: local.identity.sign(&transcript),
        admission_tag: *blake3::keyed_hash(&local.admission_key, &transcript).as_bytes(),
    }
}

/// Checks a peer's Hello spoken in `role`; returns the peer id it proves.
fn check_hello(
    local: &LocalHello,
    role: Role,
    exporter: &[u8; ADMISSION_EXPORTER_BYTES],
    hello: &Hello,
) -> Result<PeerId, AdmissionFailure> {
    if hello.dc != local.dc {
        return Err(AdmissionFailure::WrongDc);
    }
    let transcript = Hello::transcript(role, exporter, &hello.public_key, &hello.dc);
    // blake3::Hash equality is constant-time.
    if blake3::keyed_hash(&local.admission_key, &transcript) != blake3::Hash::from_bytes(hello.admission_tag) {
        return Err(AdmissionFailure::BadTag);
    }
    verify_signature(&hello.public_key, &transcript, &hello.signature).ok_or(AdmissionFailure::BadSignature)
}

/// A client Hello that checked out, waiting for our answer.
struct ClientAdmitted {
    peer_id: PeerId,
    exporter: [u8; ADMISSION_EXPORTER_BYTES],
    send: SendStream,
}

/// Server side, first half: reads and checks the client's Hello.
async fn check_client(connection: &Connection, local: &LocalHello) -> Result<ClientAdmitted, AdmissionFailure> {
    let (send, mut recv) = connection.accept_bi().await.map_err(|error| connection_failure(&error))?;
    let exporter = exporter(connection)?;
    let (hello, _) = read_frame(&mut recv, HELLO_BYTES_MAX, Hello::decode).await.map_err(hello_read_failure)?;
    let peer_id = check_hello(local, Role::Client, &exporter, &hello)?;
    Ok(ClientAdmitted { peer_id, exporter, send })
}

/// Server side, second half: opens the stream limit and answers our Hello.
async fn answer_client(
    connection: &Connection,
    local: &LocalHello,
    admitted: ClientAdmitted,
) -> Result<PeerId, AdmissionFailure> {
    let ClientAdmitted { peer_id, exporter, mut send } = admitted;
    connection.set_max_concurrent_bi_streams(VarInt::from_u32(REQUEST_STREAMS_PER_CONNECTION_MAX));
    let answer = make_hello(local, Role::Server, &exporter).encode();
    send.write_all(&answer).await.map_err(|_| AdmissionFailure::Disconnected)?;
    send.finish().map_err(|_| AdmissionFailure::Disconnected)?;
    Ok(peer_id)
}

/// Client side: sends our Hello, reads and checks the server's, which must prove `expected`.
async fn admit_server(connection: &Connection, local: &LocalHello, expected: PeerId) -> Result<(), AdmissionFailure> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(|error| connection_failure(&error))?;
    let exporter = exporter(connection)?;
    let hello = make_hello(local, Role::Client, &exporter).encode();
    send.write_all(&hello).await.map_err(|_| AdmissionFailure::Disconnected)?;
    send.finish().map_err(|_| AdmissionFailure::Disconnected)?;
    let (answer, _) = read_frame(&mut recv, HELLO_BYTES_MAX, Hello::decode).await.map_err(hello_read_failure)?;
    let peer_id = check_hello(local, Role::Server, &exporter, &answer)?;
    if peer_id != expected {
        return Err(AdmissionFailure::WrongPeer);
    }
    Ok(())
}

fn connection_failure(error: &ConnectionError) -> AdmissionFailure {
    match error {
        ConnectionError::ApplicationClosed(close) if close.error_code == CLOSE_ADMISSION_REFUSED => {
            AdmissionFailure::RefusedByPeer
        }
        _ => AdmissionFailure::Disconnected,
    }
}

fn hello_read_failure(error: FrameReadError) -> AdmissionFailure {
    match error {
        FrameReadError::Read(ReadError::ConnectionLost(error)) => connection_failure(&error),
        FrameReadError::Read(_) => AdmissionFailure::Disconnected,
        FrameReadError::Malformed(_) | FrameReadError::TooLong | FrameReadError::Ended => AdmissionFailure::Malformed,
    }
}

/// Closes a connection whose peer failed admission, and counts it.
fn refuse(connection: &Connection, failure: AdmissionFailure, remote: SocketAddr) {
    metrics::counter!("cachemesh_peer_admission_failures_total", "reason" => failure.reason()).increment(1);
    tracing::warn!(%remote, reason = failure.reason(), "data plane peer failed admission");
    connection.close(CLOSE_ADMISSION_REFUSED, failure.reason().as_bytes());
}

// ---------------------------------------------------------------------------------------
// Reading frames.
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
enum FrameReadError {
    Malformed(FrameError),
    TooLong,
    Ended,
    Read(ReadError),
}

/// Reads one frame of at most `limit` bytes; returns it and whatever bytes followed it in
/// the same read (at most `limit` in all).
async fn read_frame<T>(
    recv: &mut RecvStream,
    limit: usize,
    decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, FrameError>,
) -> Result<(T, Bytes), FrameReadError> {
    let mut buffer = BytesMut::new();
    loop {
        if let Some((frame, used)) = decode(&buffer).map_err(FrameReadError::Malformed)? {
            return Ok((frame, buffer.split_off(used).freeze()));
        }
        let room = limit.saturating_sub(buffer.len());
        if room == 0 {
            return Err(FrameReadError::TooLong);
        }
        match recv.read_chunk(room, true).await {
            Ok(Some(chunk)) => buffer.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(FrameReadError::Ended),
            Err(error) => return Err(FrameReadError::Read(error)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client exchange.
// ---------------------------------------------------------------------------------------

enum Answer {
    /// The body (unverified), and the relay it was fed into, if any.
    Chunk(Bytes, Option<RelayFeed>),
    HaveSet {
        chunk_count: u32,
        bitmap: Vec<u8>,
    },
}

enum ExchangeError {
    /// The connection died before the peer answered: worth one retry on a new connection.
    Lost(String),
    Peer(PeerError),
}

impl ExchangeError {
    fn into_peer_error(self) -> PeerError {
        match self {
            Self::Lost(detail) => PeerError::Connect(detail),
            Self::Peer(error) => error,
        }
    }
}

impl From<PeerError> for ExchangeError {
    fn from(error: PeerError) -> Self {
        Self::Peer(error)
    }
}

fn read_error(error: ReadError) -> PeerError {
    match error {
        ReadError::ConnectionLost(error) => PeerError::Connect(format!("connection lost: {error}")),
        ReadError::Reset(code) if code == STREAM_RELAY_FAILED => PeerError::RelayFailed,
        ReadError::Reset(code) => PeerError::Protocol(format!("the peer abandoned the answer (code {code})")),
        other => PeerError::Protocol(other.to_string()),
    }
}

/// What one request's exchanges share besides the request: how far it got, for the log
/// line of a request that stalled (its stage, and the connection whose QUIC statistics,
/// round trip, window, losses and flow-control blocks, tell a saturated link from a blocked
/// stream), and the meter its body bytes are counted on.
#[derive(Default)]
struct ExchangeTrace {
    /// The latest [`Stage`] reached, as its `u8`.
    stage: std::sync::atomic::AtomicU8,
    connection: Mutex<Option<Connection>>,
    /// Counts the answer's body bytes as they arrive (None: not counted).
    downlink: Option<Arc<DownlinkMeter>>,
}

/// How far one request got, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Stage {
    Connecting = 0,
    OpeningStream,
    WritingRequest,
    AwaitingHead,
    ReadingBody,
}

impl Stage {
    const ALL: [Stage; 5] =
        [Stage::Connecting, Stage::OpeningStream, Stage::WritingRequest, Stage::AwaitingHead, Stage::ReadingBody];

    fn name(self) -> &'static str {
        match self {
            Stage::Connecting => "connecting",
            Stage::OpeningStream => "opening_stream",
            Stage::WritingRequest => "writing_request",
            Stage::AwaitingHead => "awaiting_head",
            Stage::ReadingBody => "reading_body",
        }
    }
}

impl ExchangeTrace {
    fn reached(&self, stage: Stage) {
        self.stage.store(stage as u8, std::sync::atomic::Ordering::Relaxed);
    }

    fn stage(&self) -> Stage {
        let stage = self.stage.load(std::sync::atomic::Ordering::Relaxed);
        Stage::ALL.get(usize::from(stage)).copied().unwrap_or(Stage::ReadingBody)
    }
}

/// Sends one request on a new stream and reads the answer (unverified); a chunk's bytes
/// also feed `relay` if this answer is the first to claim it.
async fn exchange(
    connection: &Connection,
    request: Request,
    relay: Option<&Arc<Relay>>,
    progress: &Progress,
    trace: &ExchangeTrace,
) -> Result<Answer, ExchangeError> {
    *trace.connection.lock().unwrap_or_else(PoisonError::into_inner) = Some(connection.clone());
    trace.reached(Stage::OpeningStream);
    let (mut send, mut recv) =
        connection.open_bi().await.map_err(|error| ExchangeError::Lost(format!("connection lost: {error}")))?;
    trace.reached(Stage::WritingRequest);
    match send.write_all(&request.encode()).await {
        // A server that refuses without reading (Busy) may stop our side first; its answer
        // is still there to read.
        Ok(()) | Err(WriteError::Stopped(_)) => {}
        Err(WriteError::ConnectionLost(error)) => return Err(ExchangeError::Lost(format!("connection lost: {error}"))),
        Err(error) => return Err(PeerError::Protocol(error.to_string()).into()),
    }
    // Finishing fails only if the stream was already stopped, handled above.
    let _ = send.finish();
    trace.reached(Stage::AwaitingHead);

    let (head, rest) = match read_frame(&mut recv, RESPONSE_HEAD_BYTES_MAX, ResponseHead::decode).await {
        Ok(read) => read,
        Err(FrameReadError::Read(ReadError::ConnectionLost(error))) => {
            return Err(ExchangeError::Lost(format!("connection lost: {error}")));
        }
        Err(FrameReadError::Read(error)) => return Err(read_error(error).into()),
        Err(FrameReadError::Malformed(error)) => return Err(PeerError::Protocol(error.to_string()).into()),
        Err(FrameReadError::TooLong) => return Err(PeerError::Protocol("answer head too long".into()).into()),
        Err(FrameReadError::Ended) => return Err(PeerError::Protocol("stream ended before an answer".into()).into()),
    };
    progress.mark(Instant::now());
    trace.reached(Stage::ReadingBody);
    match head {
        ResponseHead::Chunk { length } => {
            let mut feed = relay.and_then(|relay| relay.claim(length as usize));
            let body = read_body(&mut recv, length, rest, feed.as_mut(), progress, trace.downlink.as_deref()).await?;
            Ok(Answer::Chunk(body, feed))
        }
        ResponseHead::HaveSet { chunk_count, bitmap } => {
            if !rest.is_empty() {
                return Err(PeerError::Protocol("bytes after a have-set".into()).into());
            }
            Ok(Answer::HaveSet { chunk_count, bitmap })
        }
        ResponseHead::Error { status, message } => Err(match status {
            Status::Busy => PeerError::Busy,
            Status::NotFound => PeerError::NotFound,
            Status::Forbidden => PeerError::Admission(AdmissionFailure::RefusedByPeer),
            status => PeerError::Remote { status, message },
        }
        .into()),
    }
}

/// Reads exactly `length` body bytes (of which `first` arrived with the head), then the end
/// of the stream, copying them into `feed` as they come. Allocates `length` once, aligned
/// for a direct write to the store (`store::io::aligned_vec`); the decoder bounded it by
/// `CHUNK_BYTES_MAX`.
async fn read_body(
    recv: &mut RecvStream,
    length: u32,
    first: Bytes,
    mut feed: Option<&mut RelayFeed>,
    progress: &Progress,
    downlink: Option<&DownlinkMeter>,
) -> Result<Bytes, PeerError> {
    let length = length as usize;
    if first.len() > length {
        return Err(PeerError::Protocol("more bytes than the head announced".into()));
    }
    let (mut body, start) = crate::store::aligned_vec(length);
    body.extend_from_slice(&first);
    if let Some(feed) = feed.as_deref_mut() {
        feed.push(&body[start..]);
    }
    while body.len() - start < length {
        match recv.read_chunk(length - (body.len() - start), true).await.map_err(read_error)? {
            Some(chunk) => {
                let now = Instant::now();
                progress.advance(chunk.bytes.len() as u64, now);
                if let Some(downlink) = downlink {
                    downlink.record(chunk.bytes.len() as u64, now);
                }
                body.extend_from_slice(&chunk.bytes);
                if let Some(feed) = feed.as_deref_mut() {
                    feed.push(&body[start..]);
                }
            }
            None => {
                let received = body.len() - start;
                return Err(PeerError::Protocol(format!("stream ended after {received} of {length} bytes")));
            }
        }
    }
    if recv.read_chunk(1, true).await.map_err(read_error)?.is_some() {
        return Err(PeerError::Protocol("more bytes than the head announced".into()));
    }
    metrics::counter!("cachemesh_peer_download_bytes_total").increment(length as u64);
    Ok(Bytes::from(body).slice(start..))
}

// ---------------------------------------------------------------------------------------
// Serving.
// ---------------------------------------------------------------------------------------

struct Server<S> {
    service: Arc<S>,
    local: Arc<LocalHello>,
    /// `std` mutex, never held across an `.await`. Shared with [`Shared::upload`].
    upload: Option<Arc<Mutex<UploadBudget>>>,
    /// Requests in service across all connections ([`SERVE_REQUESTS_MAX`]).
    serving: Arc<Semaphore>,
    /// Stripe answers in service across all connections ([`STRIPE_ANSWERS_MAX`]).
    stripe_answers: Arc<Semaphore>,
    /// Whole-chunk answers being transmitted at once, and homes waiting for a slot.
    upload_line: Arc<UploadLine>,
    /// See [`RELAY_SLOTS`].
    relay_slots: Arc<Semaphore>,
    /// Admitted inbound connections ([`CONNECTIONS_MAX`]).
    connections: Arc<Semaphore>,
    /// Per-peer connection counts and request slots; `std` mutex, never held across an `.await`.
    peer_loads: Arc<Mutex<HashMap<PeerId, PeerLoad>>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    #[cfg(feature = "test-faults")]
    corrupt_served_chunks: bool,
    #[cfg(feature = "test-faults")]
    delay_served_chunks: Duration,
}

/// One peer's share of the serving side.
struct PeerLoad {
    connections: usize,
    requests: Arc<Semaphore>,
}

/// Counts one admitted connection against its peer until dropped.
struct PeerLoadGuard {
    peer_loads: Arc<Mutex<HashMap<PeerId, PeerLoad>>>,
    peer_id: PeerId,
}

impl PeerLoadGuard {
    /// Registers a connection from `peer_id`; None when it already has
    /// [`CONNECTIONS_PER_PEER_MAX`]. Returns the peer's request slots.
    fn register(peer_loads: &Arc<Mutex<HashMap<PeerId, PeerLoad>>>, peer_id: PeerId) -> Option<(Self, Arc<Semaphore>)> {
        let mut loads = peer_loads.lock().unwrap_or_else(PoisonError::into_inner);
        let load = loads
            .entry(peer_id)
            .or_insert_with(|| PeerLoad { connections: 0, requests: Arc::new(Semaphore::new(REQUESTS_PER_PEER_MAX)) });
        if load.connections >= CONNECTIONS_PER_PEER_MAX {
            return None;
        }
        load.connections += 1;
        let requests = load.requests.clone();
        Some((Self { peer_loads: peer_loads.clone(), peer_id }, requests))
    }
}

impl Drop for PeerLoadGuard {
    fn drop(&mut self) {
        let mut loads = self.peer_loads.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(load) = loads.get_mut(&self.peer_id) {
            load.connections = load.connections.saturating_sub(1);
            if load.connections == 0 {
                loads.remove(&self.peer_id);
            }
        }
    }
}

async fn accept_loop<S: ChunkService>(endpoint: Endpoint, server: Arc<Server<S>>, shutdown: CancellationToken) {
    let admissions = Arc::new(Semaphore::new(ADMISSIONS_IN_PROGRESS_MAX));
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let Ok(permit) = admissions.clone().try_acquire_owned() else {
            metrics::counter!("cachemesh_peer_connections_refused_total", "limit" => "admissions").increment(1);
            tracing::warn!(remote = %incoming.remote_address(), "refusing a data plane connection: at ADMISSIONS_IN_PROGRESS_MAX");
            incoming.refuse();
            continue;
        };
        server.tracker.spawn(server.clone().serve_connection(incoming, permit));
    }
    endpoint.close(CLOSE_SHUTDOWN, b"shutting down");
}

/// Why serving one request stopped short of a complete answer.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("writing the answer: {0}")]
    Write(#[from] WriteError),
    #[error("timed out")]
    TimedOut,
    #[error("shutting down")]
    ShuttingDown,
    #[error("the peer stopped waiting for the answer")]
    Abandoned,
    #[error("the chunk being relayed failed to arrive or to verify")]
    RelayFailed,
}

fn refusal(status: Status, message: &str) -> ResponseHead {
    ResponseHead::Error { status, message: message.to_string() }
}

/// A chunk answer's length as its head carries it; None (logged) above `CHUNK_BYTES_MAX`,
/// which this node never stores, so only a fault here gets there.
fn head_length(bytes: usize) -> Option<u32> {
    let length = u32::try_from(bytes).ok().filter(|length| *length <= CHUNK_BYTES_MAX);
    if length.is_none() {
        tracing::error!(bytes, "refusing to serve a chunk above CHUNK_BYTES_MAX");
    }
    length
}

/// The answer to a home fetch that failed on this node.
fn home_refusal(error: HomeFetchError) -> ResponseHead {
    match error {
        HomeFetchError::NotFound => refusal(Status::NotFound, "chunk not at the origin"),
        HomeFetchError::OriginUnavailable(message) => refusal(Status::OriginUnavailable, &message),
        HomeFetchError::Internal(message) => refusal(Status::Internal, &message),
    }
}

fn status_label(status: Status) -> &'static str {
    match status {
        Status::Ok => "ok",
        Status::NotFound => "not_found",
        Status::Busy => "busy",
        Status::BadRequest => "bad_request",
        Status::OriginUnavailable => "origin_unavailable",
        Status::Internal => "internal",
        Status::Forbidden => "forbidden",
    }
}

fn count_served(kind: &'static str, status: &'static str) {
    metrics::counter!("cachemesh_peer_requests_served_total", "kind" => kind, "status" => status).increment(1);
}

fn request_kind(request: &Request) -> &'static str {
    match request {
        Request::HaveSet(_) => "have_set",
        Request::GetChunk { .. } => "get_chunk",
        Request::GetChunkForHome(_) => "get_chunk_for_home",
        Request::HomeFetch(_) | Request::HomeFetchOf { .. } => "home_fetch",
        Request::Stripe { from_home: true, .. } => "stripe_from_home",
        Request::Stripe { from_home: false, .. } => "stripe",
    }
}

/// The byte range a GetChunk asks of a chunk of `chunk_length` bytes (`length` 0 = to the end).
fn chunk_range(chunk_length: usize, offset: u32, length: u32) -> Option<Range<usize>> {
    let start = offset as usize;
    let end = if length == 0 { chunk_length } else { start.checked_add(length as usize)? };
    (start <= end && end <= chunk_length).then_some(start..end)
}

/// Writes a refusal head, bounded by [`REFUSAL_TIMEOUT`].
async fn send_refusal(mut send: SendStream, head: ResponseHead) {
    let written = timeout(REFUSAL_TIMEOUT, async {
        send.write_all(&head.encode()).await?;
        send.finish().map_err(|_| WriteError::ClosedStream)
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        let _ = send.reset(STREAM_ABANDONED);
    }
}

impl<S: ChunkService> Server<S> {
    async fn serve_connection(self: Arc<Self>, incoming: Incoming, admission: OwnedSemaphorePermit) {
        let remote = incoming.remote_address();
        let connecting = match incoming.accept() {
            Ok(connecting) => connecting,
            Err(error) => {
                tracing::debug!(%remote, %error, "data plane handshake failed");
                return;
            }
        };
        let connection = match timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                tracing::debug!(%remote, %error, "data plane handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%remote, "data plane handshake timed out");
                return;
            }
        };
        let admitted = timeout(ADMISSION_TIMEOUT, async {
            let admitted = check_client(&connection, &self.local).await?;
            // Capacity is checked before our Hello goes out, so the client learns it as
            // CLOSE_BUSY during admission rather than as a dead connection afterwards.
            let Some(capacity) = self.take_capacity(admitted.peer_id) else { return Ok(None) };
            let peer_id = answer_client(&connection, &self.local, admitted).await?;
            Ok(Some((peer_id, capacity)))
        })
        .await;
        drop(admission);
        let (peer_id, (_slot, _load, requests)) = match admitted.unwrap_or(Err(AdmissionFailure::Timeout)) {
            Ok(Some(admitted)) => admitted,
            Ok(None) => {
                connection.close(CLOSE_BUSY, b"too many connections");
                return;
            }
            Err(failure) => {
                refuse(&connection, failure, remote);
                return;
            }
        };
        tracing::debug!(%remote, %peer_id, "data plane peer admitted");
        metrics::gauge!("cachemesh_peer_inbound_connections").increment(1.0);
        loop {
            let (send, recv) = tokio::select! {
                () = self.shutdown.cancelled() => {
                    connection.close(CLOSE_SHUTDOWN, b"shutting down");
                    break;
                }
                accepted = connection.accept_bi() => match accepted {
                    Ok(streams) => streams,
                    Err(error) => {
                        tracing::debug!(%remote, %peer_id, %error, "data plane connection ended");
                        break;
                    }
                },
            };
            match requests.clone().try_acquire_owned() {
                Ok(permit) => {
                    self.tracker.spawn(self.clone().serve_stream(peer_id, send, recv, permit));
                }
                Err(_) => {
                    // Answered without reading the request; the number of these in flight
                    // is bounded by REQUEST_STREAMS_PER_CONNECTION_MAX per connection.
                    count_served("unknown", status_label(Status::Busy));
                    let head = refusal(Status::Busy, "too many requests from this peer");
                    self.tracker.spawn(async move {
                        send_refusal(send, head).await;
                        drop(recv);
                    });
                }
            }
        }
        metrics::gauge!("cachemesh_peer_inbound_connections").decrement(1.0);
    }

    /// A slot under [`CONNECTIONS_MAX`] and [`CONNECTIONS_PER_PEER_MAX`] for an admitted
    /// peer, and that peer's request slots; None (counted) when either limit is reached.
    fn take_capacity(&self, peer_id: PeerId) -> Option<(OwnedSemaphorePermit, PeerLoadGuard, Arc<Semaphore>)> {
        let Ok(slot) = self.connections.clone().try_acquire_owned() else {
            metrics::counter!("cachemesh_peer_connections_refused_total", "limit" => "connections").increment(1);
            tracing::warn!(%peer_id, "refusing a data plane connection: at CONNECTIONS_MAX");
            return None;
        };
        let Some((load, requests)) = PeerLoadGuard::register(&self.peer_loads, peer_id) else {
            metrics::counter!("cachemesh_peer_connections_refused_total", "limit" => "per_peer").increment(1);
            tracing::warn!(%peer_id, "refusing a data plane connection: at CONNECTIONS_PER_PEER_MAX");
            return None;
        };
        Some((slot, load, requests))
    }

    async fn serve_stream(
        self: Arc<Self>,
        peer_id: PeerId,
        mut send: SendStream,
        mut recv: RecvStream,
        _permit: OwnedSemaphorePermit,
    ) {
        let read = timeout(REQUEST_READ_TIMEOUT, read_frame(&mut recv, REQUEST_BYTES_MAX, Request::decode)).await;
        let request = match read {
            Ok(Ok((request, _))) => request,
            Ok(Err(FrameReadError::Malformed(error))) => {
                count_served("unknown", status_label(Status::BadRequest));
                send_refusal(send, refusal(Status::BadRequest, &error.to_string())).await;
                return;
            }
            Ok(Err(_)) | Err(_) => {
                count_served("unknown", "abandoned");
                let _ = send.reset(STREAM_ABANDONED);
                return;
            }
        };
        drop(recv);
        let kind = request_kind(&request);
        // Stripes are small and many (one per chunk, stripe and reader), and hold no chunk
        // of their own in memory: they have their own bound.
        let serving = if matches!(request, Request::Stripe { .. }) { &self.stripe_answers } else { &self.serving };
        let Ok(_serving) = serving.clone().try_acquire_owned() else {
            count_served(kind, status_label(Status::Busy));
            send_refusal(send, refusal(Status::Busy, "serving too many requests")).await;
            return;
        };
        // A home's GetChunkForHome waits in the line for upload slots, as long as a home fetch.
        let limit = if matches!(
            request,
            Request::HomeFetch(_) | Request::HomeFetchOf { .. } | Request::GetChunkForHome(_) | Request::Stripe { .. }
        ) {
            HOME_FETCH_TIMEOUT
        } else {
            REQUEST_TIMEOUT
        };
        let mut slot = None;
        let progress = Progress::new(Instant::now());
        let outcome = tokio::select! {
            () = self.shutdown.cancelled() => Err(ServeError::ShuttingDown),
            answered = until_stalled(limit, &progress, self.answer(peer_id, request, &mut send, &mut slot, &progress)) => answered.unwrap_or(Err(ServeError::TimedOut)),
        };
        match outcome.and_then(|status| send.finish().map(|()| status).map_err(|_| WriteError::ClosedStream.into())) {
            Ok(status) => {
                // An upload slot is held until the peer has every byte of the chunk, not
                // only until quinn has buffered it.
                if slot.is_some() {
                    let _ = timeout(REQUEST_TIMEOUT, send.stopped()).await;
                }
                count_served(kind, status_label(status));
            }
            Err(error) => {
                tracing::debug!(kind, %error, "data plane request abandoned");
                count_served(kind, "abandoned");
                let code =
                    if matches!(error, ServeError::RelayFailed) { STREAM_RELAY_FAILED } else { STREAM_ABANDONED };
                let _ = send.reset(code);
            }
        }
    }

    /// Answers one request; returns the status sent. A chunk answer leaves its upload slot
    /// in `slot`, to be held until the peer has acknowledged the chunk.
    async fn answer(
        &self,
        peer_id: PeerId,
        request: Request,
        send: &mut SendStream,
        slot: &mut Option<UploadSlot>,
        progress: &Progress,
    ) -> Result<Status, ServeError> {
        match request {
            Request::HaveSet(object) => {
                let head = match self.service.have_set(peer_id, object).await {
                    Some((chunk_count, bitmap))
                        if bitmap.len() == (chunk_count as usize).div_ceil(8) && bitmap.len() <= HAVE_SET_BYTES_MAX =>
                    {
                        ResponseHead::HaveSet { chunk_count, bitmap }
                    }
                    Some((chunk_count, bitmap)) => {
                        tracing::error!(%object, chunk_count, bitmap_bytes = bitmap.len(), "have-set of the wrong size");
                        refusal(Status::Internal, "have-set of the wrong size")
                    }
                    None => refusal(Status::NotFound, "unknown object"),
                };
                let _ = send.set_priority(HAVE_SET_PRIORITY);
                write_head(send, &head).await
            }
            Request::GetChunk { .. } | Request::GetChunkForHome(_) => {
                let (id, offset, length, for_home) = match request {
                    Request::GetChunk { id, offset, length } => (id, offset, length, false),
                    Request::GetChunkForHome(id) => (id, 0, 0, true),
                    _ => unreachable!("matched above"),
                };
                if let Some(busy) = self.upload_backlog_refusal() {
                    return write_head(send, &busy).await;
                }
                // A reader may go elsewhere (other holders, the home node): it takes a slot
                // that is free now or is turned away. A home fetching for the DC may not, so
                // it waits its turn.
                let reader_slot = if for_home {
                    None
                } else {
                    match self.upload_line.reader_slot(peer_id) {
                        Ok(slot) => Some(slot),
                        Err(no_slot) => return write_head(send, &refusal(Status::Busy, no_slot.message())).await,
                    }
                };
                let Some(chunk) = self.service.local_chunk(id).await else {
                    return write_head(send, &refusal(Status::NotFound, "chunk not held")).await;
                };
                let Some(range) = chunk_range(chunk.len(), offset, length) else {
                    let message = format!("range {offset}+{length} outside a chunk of {} bytes", chunk.len());
                    return write_head(send, &refusal(Status::BadRequest, &message)).await;
                };
                let body = self.fault(chunk.slice(range)).await;
                if let Some(reader_slot) = reader_slot {
                    *slot = Some(reader_slot);
                }
                self.send_chunk(send, body, slot, progress).await
            }
            Request::HomeFetch(_) | Request::HomeFetchOf { .. } => {
                let (id, of) = match request {
                    Request::HomeFetchOf { id, object, index } => (id, Some((object, index))),
                    Request::HomeFetch(id) => (id, None),
                    _ => unreachable!("matched above"),
                };
                if let Some(busy) = self.upload_backlog_refusal() {
                    return write_head(send, &busy).await;
                }
                tracing::debug!(%peer_id, chunk = %id, "home fetch asked");
                match self.service.home_fetch(id, of).await {
                    Ok(HomeChunk::Whole(chunk)) => {
                        let body = self.fault(chunk).await;
                        self.send_chunk(send, body, slot, progress).await
                    }
                    Ok(HomeChunk::Arriving { length, reader, answer }) => {
                        self.send_arriving(send, length, reader, answer, slot, progress).await
                    }
                    Err(error) => write_head(send, &home_refusal(error)).await,
                }
            }
            Request::Stripe { id, object, index, stripe, stripes, from_home } => {
                match self.service.stripe(id, (object, index), (stripe, stripes), from_home).await {
                    Ok(StripeAnswer::Whole(bytes)) => {
                        let Some(length) = head_length(bytes.len()) else {
                            return write_head(send, &refusal(Status::Internal, "stripe too large")).await;
                        };
                        write_head(send, &ResponseHead::Chunk { length }).await?;
                        progress.mark(Instant::now());
                        let body = self.fault(bytes).await;
                        self.write_body(send, &body, progress).await?;
                        Ok(Status::Ok)
                    }
                    Ok(StripeAnswer::Arriving(mut reader)) => {
                        let Some(length) = head_length(reader.len()) else {
                            return write_head(send, &refusal(Status::Internal, "stripe too large")).await;
                        };
                        write_head(send, &ResponseHead::Chunk { length }).await?;
                        progress.mark(Instant::now());
                        let mut first = true;
                        while let Some(piece) = reader.next().await.map_err(|_| ServeError::RelayFailed)? {
                            let piece = if first { self.fault(piece).await } else { piece };
                            first = false;
                            self.write_body(send, &piece, progress).await?;
                        }
                        Ok(Status::Ok)
                    }
                    Err(error) => write_head(send, &home_refusal(error)).await,
                }
            }
        }
    }

    /// `Busy` when the upload budget already has more than [`UPLOAD_BACKLOG_BUSY_AFTER`] queued.
    fn upload_backlog_refusal(&self) -> Option<ResponseHead> {
        let budget = self.upload.as_ref()?;
        let backlog = budget.lock().unwrap_or_else(PoisonError::into_inner).backlog(Instant::now());
        (backlog > UPLOAD_BACKLOG_BUSY_AFTER).then(|| refusal(Status::Busy, "upload budget exhausted"))
    }

    /// Waits for an upload slot (left in `slot`) unless `slot` already holds one, then
    /// writes a chunk head and its bytes, drawing on the upload budget slice by slice.
    async fn send_chunk(
        &self,
        send: &mut SendStream,
        body: Bytes,
        slot: &mut Option<UploadSlot>,
        progress: &Progress,
    ) -> Result<Status, ServeError> {
        let Some(length) = head_length(body.len()) else {
            return write_head(send, &refusal(Status::Internal, "chunk too large")).await;
        };
        // A requester that got the chunk elsewhere while waiting resets its stream: give up
        // its turn rather than take a slot to find that out.
        if slot.is_none() {
            *slot = Some(tokio::select! {
                turn = self.upload_line.turn() => turn.ok_or(ServeError::ShuttingDown)?,
                _ = send.stopped() => return Err(ServeError::Abandoned),
            });
        }
        write_head(send, &ResponseHead::Chunk { length }).await?;
        progress.mark(Instant::now());
        self.write_body(send, &body, progress).await?;
        Ok(Status::Ok)
    }

    /// Like [`Server::send_chunk`] for a chunk that is still arriving: its pieces are sent
    /// as the relay releases them. When the relay fails part way, the rest comes from the
    /// fetch's verified answer, provided it extends what was sent; otherwise the stream is
    /// abandoned (reset), and the peer, which never got a whole chunk, asks again.
    async fn send_arriving(
        &self,
        send: &mut SendStream,
        length: usize,
        mut reader: RelayReader,
        answer: futures::future::BoxFuture<'static, Result<Bytes, HomeFetchError>>,
        slot: &mut Option<UploadSlot>,
        progress: &Progress,
    ) -> Result<Status, ServeError> {
        let Some(head_length) = head_length(length) else {
            return write_head(send, &refusal(Status::Internal, "chunk too large")).await;
        };
        let Ok(relay_slot) = self.relay_slots.clone().try_acquire_owned() else {
            // Every relay slot is taken: wait for the whole chunk, then for an upload slot.
            // The chunk arriving here is this request's progress meanwhile: a home fetch
            // from a slow origin is waited for as long as it moves.
            let arriving = async {
                while let Ok(Some(piece)) = reader.next().await {
                    progress.advance(piece.len() as u64, Instant::now());
                }
                std::future::pending::<()>().await;
            };
            let answer = tokio::select! {
                answer = answer => answer,
                () = arriving => unreachable!("waits forever once the relay ends"),
            };
            return match answer {
                Ok(whole) => {
                    let body = self.fault(whole).await;
                    self.send_chunk(send, body, slot, progress).await
                }
                Err(error) => write_head(send, &home_refusal(error)).await,
            };
        };
        *slot = Some(relay_slot.into());
        write_head(send, &ResponseHead::Chunk { length: head_length }).await?;
        progress.mark(Instant::now());
        let mut first = true;
        loop {
            match reader.next().await {
                Ok(Some(piece)) => {
                    let piece = if first { self.fault(piece).await } else { piece };
                    first = false;
                    self.write_body(send, &piece, progress).await?;
                }
                Ok(None) => {
                    metrics::counter!("cachemesh_relayed_chunks_total", "outcome" => "relayed").increment(1);
                    return Ok(Status::Ok);
                }
                Err(_) => {
                    let whole = answer.await.map_err(|_| ServeError::RelayFailed)?;
                    if whole.len() != length || !reader.sent_prefix_matches(&whole) {
                        metrics::counter!("cachemesh_relayed_chunks_total", "outcome" => "abandoned").increment(1);
                        return Err(ServeError::RelayFailed);
                    }
                    metrics::counter!("cachemesh_relayed_chunks_total", "outcome" => "finished_whole").increment(1);
                    let rest = whole.slice(reader.sent()..);
                    let rest = if first { self.fault(rest).await } else { rest };
                    self.write_body(send, &rest, progress).await?;
                    return Ok(Status::Ok);
                }
            }
        }
    }

    /// Writes `body` in [`UPLOAD_SLICE_BYTES`] slices, drawing on the upload budget.
    async fn write_body(&self, send: &mut SendStream, body: &Bytes, progress: &Progress) -> Result<(), ServeError> {
        let mut at = 0;
        while at < body.len() {
            let end = body.len().min(at + UPLOAD_SLICE_BYTES);
            let slice = body.slice(at..end);
            if let Some(budget) = &self.upload {
                let wait =
                    budget.lock().unwrap_or_else(PoisonError::into_inner).reserve(Instant::now(), slice.len() as u64);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            send.write_chunk(slice).await?;
            progress.advance((end - at) as u64, Instant::now());
            metrics::counter!("cachemesh_peer_upload_bytes_total").increment((end - at) as u64);
            self.upload_line.count_sent((end - at) as u64);
            at = end;
        }
        Ok(())
    }

    #[cfg(feature = "test-faults")]
    async fn fault(&self, body: Bytes) -> Bytes {
        if !self.delay_served_chunks.is_zero() {
            tokio::time::sleep(self.delay_served_chunks).await;
        }
        if !self.corrupt_served_chunks {
            return body;
        }
        let mut corrupt = body.to_vec();
        if let Some(byte) = corrupt.first_mut() {
            *byte ^= 0xff;
        }
        Bytes::from(corrupt)
    }

    #[cfg(not(feature = "test-faults"))]
    async fn fault(&self, body: Bytes) -> Bytes {
        body
    }
}

async fn write_head(send: &mut SendStream, head: &ResponseHead) -> Result<Status, ServeError> {
    send.write_all(&head.encode()).await?;
    Ok(match head {
        ResponseHead::Error { status, .. } => *status,
        ResponseHead::Chunk { .. } | ResponseHead::HaveSet { .. } => Status::Ok,
    })
}

// ---------------------------------------------------------------------------------------
// Upload budget: a plain struct fed the time.
// ---------------------------------------------------------------------------------------

/// A token bucket in bytes, shared by every upload. Reservations may run it into debt; the
/// caller then waits until the debt is paid, so reservations are served in the order they
/// were made and the bytes sent by any time `t` after a full bucket never exceed
/// `burst + rate * t`.
#[derive(Debug)]
struct UploadBudget {
    rate_bytes_per_second: f64,
    burst_bytes: f64,
    /// Negative when reservations are waiting.
    tokens: f64,
    refilled_at: Instant,
    /// Every byte ever reserved: what the budget has let through or is holding back.
    reserved_bytes: u64,
}

impl UploadBudget {
    fn new(rate_bytes_per_second: u64, burst_bytes: u64, now: Instant) -> Self {
        Self {
            rate_bytes_per_second: rate_bytes_per_second as f64,
            burst_bytes: burst_bytes as f64,
            tokens: burst_bytes as f64,
            refilled_at: now,
            reserved_bytes: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate_bytes_per_second).min(self.burst_bytes);
        self.refilled_at = self.refilled_at.max(now);
    }

    fn debt_wait(&self) -> Duration {
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64(-self.tokens / self.rate_bytes_per_second).unwrap_or(Duration::MAX)
    }

    /// Takes `bytes`; returns how long to wait before sending them.
    fn reserve(&mut self, now: Instant, bytes: u64) -> Duration {
        self.refill(now);
        self.tokens -= bytes as f64;
        self.reserved_bytes += bytes;
        self.debt_wait()
    }

    /// How long sending already reserved has yet to wait.
    fn backlog(&mut self, now: Instant) -> Duration {
        self.refill(now);
        self.debt_wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use cachemesh_proto::frames::{STRIPE_PIECE_BYTES, stripe_bytes, stripe_length, stripe_pieces};
    use futures::FutureExt;
    use tokio::sync::oneshot;

    const DC: &str = "test-dc";
    const CLUSTER: [u8; 32] = [7; 32];
    const OTHER_CLUSTER: [u8; 32] = [8; 32];

    /// Deterministic pseudo-random bytes from a seed (BLAKE3 in XOF mode).
    fn test_bytes(seed: &str, length: usize) -> Bytes {
        let mut out = vec![0u8; length];
        blake3::Hasher::new().update(seed.as_bytes()).finalize_xof().fill(&mut out);
        Bytes::from(out)
    }

    fn identity() -> NodeIdentity {
        NodeIdentity::from_keypair(libp2p::identity::Keypair::generate_ed25519()).unwrap()
    }

    type SharedAnswer = futures::future::Shared<futures::future::BoxFuture<'static, Result<Bytes, HomeFetchError>>>;

    #[derive(Default)]
    struct FakeService {
        have: HashMap<ObjectId, (u32, Vec<u8>)>,
        /// Served as-is under the given id, whether or not they match it.
        chunks: HashMap<ChunkId, Bytes>,
        origin: HashMap<ChunkId, Result<Bytes, HomeFetchError>>,
        /// Home fetches answered as arriving: the relay, and the fetch's answer to come.
        arriving: HashMap<ChunkId, (Arc<Relay>, SharedAnswer)>,
        calls: AtomicUsize,
        /// Who asked for have-sets, in order.
        have_set_askers: Mutex<Vec<PeerId>>,
        /// The object named by each home fetch, in order.
        home_fetch_objects: Mutex<Vec<Option<(ObjectId, u32)>>>,
        /// When set, `local_chunk` reports its start and waits for a permit.
        gate: Option<Gate>,
    }

    struct Gate {
        started: Semaphore,
        release: Semaphore,
    }

    impl ChunkService for FakeService {
        async fn have_set(&self, peer: PeerId, object: ObjectId) -> Option<(u32, Vec<u8>)> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.have_set_askers.lock().unwrap().push(peer);
            self.have.get(&object).cloned()
        }

        async fn local_chunk(&self, id: ChunkId) -> Option<Bytes> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.started.add_permits(1);
                gate.release.acquire().await.unwrap().forget();
            }
            self.chunks.get(&id).cloned()
        }

        async fn stripe(
            &self,
            id: ChunkId,
            _of: (ObjectId, u32),
            (stripe, stripes): (u16, u16),
            _from_home: bool,
        ) -> Result<StripeAnswer, HomeFetchError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(chunk) = self.chunks.get(&id) {
                return Ok(StripeAnswer::Whole(stripe_bytes(chunk, stripe, stripes).into()));
            }
            if let Some((relay, _)) = self.arriving.get(&id) {
                let mut reader = relay.reader();
                let length = reader.length().await.map_err(|_| HomeFetchError::Internal("relay failed".into()))?;
                return Ok(StripeAnswer::Arriving(StripeReader::new(reader, stripe_pieces(length, stripe, stripes))));
            }
            Err(HomeFetchError::NotFound)
        }

        async fn home_fetch(&self, id: ChunkId, of: Option<(ObjectId, u32)>) -> Result<HomeChunk, HomeFetchError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.home_fetch_objects.lock().unwrap().push(of);
            if let Some((relay, answer)) = self.arriving.get(&id) {
                let mut reader = relay.reader();
                let Ok(length) = reader.length().await else { return answer.clone().await.map(HomeChunk::Whole) };
                return Ok(HomeChunk::Arriving { length, reader, answer: answer.clone().boxed() });
            }
            self.origin.get(&id).cloned().unwrap_or(Err(HomeFetchError::NotFound)).map(HomeChunk::Whole)
        }
    }

    struct Node {
        plane: DataPlane,
        service: Arc<FakeService>,
        shutdown: CancellationToken,
    }

    impl Node {
        fn target(&self) -> PeerTarget {
            PeerTarget { peer_id: self.plane.peer_id(), addr: self.plane.local_addr() }
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    fn loopback() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
    }

    async fn start_with(config: DataPlaneConfig, service: FakeService) -> Node {
        let service = Arc::new(service);
        let shutdown = CancellationToken::new();
        let plane = DataPlane::start(config, service.clone(), shutdown.clone()).await.unwrap();
        Node { plane, service, shutdown }
    }

    /// A service holding one chunk of `seed` whose serving waits at a gate, and the chunk.
    fn gated_service(seed: &str) -> (FakeService, ChunkId, Bytes) {
        let chunk = test_bytes(seed, 10_000);
        let id = ChunkId::of(&chunk);
        let mut service = FakeService::default();
        service.chunks.insert(id, chunk.clone());
        service.gate = Some(Gate { started: Semaphore::new(0), release: Semaphore::new(0) });
        (service, id, chunk)
    }

    async fn start(admission_key: [u8; 32], service: FakeService) -> Node {
        start_with(DataPlaneConfig::new(loopback(), DC.into(), identity(), admission_key), service).await
    }

    fn metrics_handle() -> &'static metrics_exporter_prometheus::PrometheusHandle {
        static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();
        HANDLE.get_or_init(|| metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().unwrap())
    }

    #[tokio::test]
    async fn a_home_passes_a_chunk_on_while_it_arrives_and_never_completes_an_unverified_one() {
        // Goal: cut-through. A peer asking a home for a chunk the home is still receiving
        // gets its first bytes before the home has the last ones, but its answer completes
        // only once the home verified the chunk; when the home's source sent corrupt bytes
        // (already partly passed on), the peer's stream is reset and asking again gets the
        // verified chunk.
        let chunk = test_bytes("relayed", 3 * crate::relay::RELAY_PIECE_BYTES);
        let id = ChunkId::of(&chunk);
        let corrupt_chunk = test_bytes("relayed, then corrupt", 3 * crate::relay::RELAY_PIECE_BYTES);
        let corrupt_id = ChunkId::of(&corrupt_chunk);
        let lost = test_bytes("relayed, then lost", 3 * crate::relay::RELAY_PIECE_BYTES);
        let lost_id = ChunkId::of(&lost);
        let (good_relay, corrupt_relay, lost_relay) = (Relay::new(), Relay::new(), Relay::new());
        let (good_done, good_answer) = oneshot::channel::<Bytes>();
        let (corrupt_done, corrupt_answer) = oneshot::channel::<Bytes>();
        let (lost_done, lost_answer) = oneshot::channel::<Bytes>();
        let shared = |answer: oneshot::Receiver<Bytes>| -> SharedAnswer {
            async move { answer.await.map_err(|_| HomeFetchError::Internal("gone".into())) }.boxed().shared()
        };
        let mut service = FakeService::default();
        service.arriving.insert(id, (good_relay.clone(), shared(good_answer)));
        service.arriving.insert(corrupt_id, (corrupt_relay.clone(), shared(corrupt_answer)));
        service.arriving.insert(lost_id, (lost_relay.clone(), shared(lost_answer)));
        let server = start(CLUSTER, service).await;
        let client = start(CLUSTER, FakeService::default()).await;
        let peer = server.target();

        // The home has two thirds of the chunk: the peer is answered, but not completed.
        let mut feed = good_relay.claim(chunk.len()).unwrap();
        feed.push(&chunk[..2 * crate::relay::RELAY_PIECE_BYTES]);
        let fetch = client.plane.home_fetch(&peer, id, None);
        tokio::pin!(fetch);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut fetch).await.is_err(),
            "no answer may complete before the home has verified the chunk"
        );
        feed.push(&chunk);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut fetch).await.is_err(),
            "all bytes arrived, but the last piece waits for the check"
        );
        feed.finish(&VerifiedChunk::check(id, chunk.clone()).unwrap());
        assert_eq!(fetch.await.map(VerifiedChunk::into_bytes), Ok(chunk.clone()));
        drop(good_done);

        // The source sends corrupt bytes for the second chunk; the first piece goes out.
        let mut feed = corrupt_relay.claim(corrupt_chunk.len()).unwrap();
        let mut bad = corrupt_chunk.to_vec();
        bad[0] ^= 0xff;
        let fetch = tokio::spawn({
            let plane = client.plane.clone();
            async move { plane.home_fetch(&peer, corrupt_id, None).await }
        });
        // Once the peer waits on the relay, the bytes arrive (a relay nobody reads copies nothing).
        wait_for_reader(&corrupt_relay).await;
        feed.push(&bad);
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(feed); // the home's check failed
        // The home then got the chunk whole elsewhere; what was sent does not match it.
        corrupt_done.send(corrupt_chunk.clone()).unwrap();
        // The reset makes the peer ask again, and the second answer is the verified chunk
        // (the fake's relay is failed now, so it answers with the fetch's result).
        assert_eq!(fetch.await.unwrap().map(VerifiedChunk::into_bytes), Ok(corrupt_chunk.clone()));
        assert_eq!(server.service.home_fetch_objects.lock().unwrap().len(), 3, "the peer asked the home twice");

        // The home's source breaks off part way (correct bytes so far), and the home gets the
        // chunk whole elsewhere: the answer goes on from that copy, in one ask.
        let mut feed = lost_relay.claim(lost.len()).unwrap();
        let fetch = tokio::spawn({
            let plane = client.plane.clone();
            async move { plane.home_fetch(&peer, lost_id, None).await }
        });
        wait_for_reader(&lost_relay).await;
        feed.push(&lost[..2 * crate::relay::RELAY_PIECE_BYTES]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(feed);
        lost_done.send(lost.clone()).unwrap();
        assert_eq!(fetch.await.unwrap().map(VerifiedChunk::into_bytes), Ok(lost.clone()));
        assert_eq!(server.service.home_fetch_objects.lock().unwrap().len(), 4, "asked once");
    }

    /// Waits (10 s at most) until a peer's answer reads `relay`.
    #[tokio::test]
    async fn stripes_come_whole_from_a_holder_and_as_they_arrive_from_a_home() {
        // Goal: the stripes of a held chunk, asked of a holder, put together give the chunk;
        // a stripe of a chunk still arriving at its home is answered as it arrives and holds
        // exactly that stripe's pieces; a stripe that does not exist is refused as a bad
        // request, and one the node cannot give as not found.
        let held = test_bytes("held", 5 * STRIPE_PIECE_BYTES + 17);
        let held_id = ChunkId::of(&held);
        let arriving = test_bytes("arriving", 32 * STRIPE_PIECE_BYTES);
        let arriving_id = ChunkId::of(&arriving);
        let relay = Relay::new();
        let (_done, answer) = oneshot::channel::<Bytes>();
        let mut service = FakeService::default();
        service.chunks.insert(held_id, held.clone());
        service.arriving.insert(
            arriving_id,
            (
                relay.clone(),
                async move { answer.await.map_err(|_| HomeFetchError::Internal("gone".into())) }.boxed().shared(),
            ),
        );
        let server = start(CLUSTER, service).await;
        let client = start(CLUSTER, FakeService::default()).await;
        let peer = server.target();
        let object = ObjectId::from_bytes([7; 32]);

        let stripes = 3u16;
        let mut assembled = vec![0u8; held.len()];
        for stripe in 0..stripes {
            let length = stripe_length(held.len(), stripe, stripes);
            let bytes = client
                .plane
                .stripe(&peer, held_id, (object, 0), (stripe, stripes), Some(length), false, None)
                .await
                .expect("a holder gives every stripe");
            let mut at = 0;
            for range in stripe_pieces(held.len(), stripe, stripes) {
                assembled[range.clone()].copy_from_slice(&bytes[at..at + range.len()]);
                at += range.len();
            }
            assert_eq!(at, bytes.len());
        }
        assert_eq!(assembled, held.to_vec());

        // Stripe 1 of 2 of a chunk the home is still receiving; a relay fed by the answer
        // (as a relayer's is) gets its bytes as they come.
        let mut feed = relay.claim(arriving.len()).unwrap();
        let relayed = Relay::for_stripe();
        let fetch = tokio::spawn({
            let (plane, relayed) = (client.plane.clone(), relayed.clone());
            async move { plane.stripe(&peer, arriving_id, (object, 1), (1, 2), None, true, Some(&relayed)).await }
        });
        let mut relayed_reader = relayed.reader();
        wait_for_reader(&relay).await;
        feed.push(&arriving[..arriving.len() / 2]);
        let first = tokio::time::timeout(Duration::from_secs(5), relayed_reader.next())
            .await
            .expect("the first pieces of the stripe are passed on before the chunk is in")
            .expect("the relay goes on")
            .expect("bytes");
        assert_eq!(&first[..], &arriving[STRIPE_PIECE_BYTES..STRIPE_PIECE_BYTES + first.len()]);
        feed.push(&arriving);
        feed.finish(&VerifiedChunk::check(arriving_id, arriving.clone()).unwrap());
        let stripe = fetch.await.unwrap().expect("the stripe comes once the chunk is in");
        let expected: Vec<u8> =
            stripe_pieces(arriving.len(), 1, 2).flat_map(|range| arriving[range].to_vec()).collect();
        assert_eq!(stripe.to_vec(), expected);

        let peer = server.target();
        let bad = client.plane.stripe(&peer, held_id, (object, 0), (3, 3), None, false, None).await;
        assert!(matches!(bad, Err(PeerError::Remote { status: Status::BadRequest, .. })), "{bad:?}");
        let unknown = ChunkId::of(b"nobody has this");
        let missing = client.plane.stripe(&peer, unknown, (object, 0), (0, 2), None, false, None).await;
        assert!(matches!(missing, Err(PeerError::NotFound)), "{missing:?}");
    }

    async fn wait_for_reader(relay: &Relay) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !relay.has_readers() {
            assert!(Instant::now() < deadline, "no peer came to read the relay");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn peers_on_a_jumbo_path_send_jumbo_packets() {
        // Goal: MTU discovery reaches the configured bound where the path carries it.
        // Loopback carries 64 KiB packets, so after a chunk the path's MTU must be the
        // bound, not the 1472 bytes quinn announces by default (which silently capped it).
        let chunk = test_bytes("jumbo", CHUNK_BYTES_MAX as usize);
        let id = ChunkId::of(&chunk);
        let mut service = FakeService::default();
        service.chunks.insert(id, chunk.clone());
        let server = start(CLUSTER, service).await;
        let client = start(CLUSTER, FakeService::default()).await;
        let peer = server.target();
        let (connection, _) = client.plane.connection(&peer).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while connection.stats().path.current_mtu < MTU_DISCOVERY_UPPER_BOUND_BYTES && Instant::now() < deadline {
            assert_eq!(client.plane.get_chunk(&peer, id).await.map(VerifiedChunk::into_bytes), Ok(chunk.clone()));
        }
        assert_eq!(connection.stats().path.current_mtu, MTU_DISCOVERY_UPPER_BOUND_BYTES);
    }

    #[test]
    fn an_exchange_trace_reads_back_each_stage_it_reached() {
        let trace = ExchangeTrace::default();
        assert_eq!(trace.stage(), Stage::Connecting);
        for stage in Stage::ALL {
            trace.reached(stage);
            assert_eq!(trace.stage(), stage);
        }
    }

    #[tokio::test]
    async fn chunk_bytes_received_fill_the_downlink_only_of_a_node_that_knows_its_link_rate() {
        // Goal: every body byte a request reads is counted against the node's link rate, so
        // a node whose fetches fill its link holds its hedges back; a node with no link rate
        // never counts as full.
        let chunk = test_bytes("chunk", CHUNK_BYTES_MAX as usize);
        let id = ChunkId::of(&chunk);
        let mut service = FakeService::default();
        service.chunks.insert(id, chunk.clone());
        let server = start(CLUSTER, service).await;
        let peer = server.target();
        // 4 MiB in well under 4 s is above 80% of 1 MB/s, and nowhere near it for 1 GB/s.
        for (link, full) in [(Some(1_000_000), true), (Some(1_000_000_000), false), (None, false)] {
            let mut config = DataPlaneConfig::new(loopback(), DC.into(), identity(), CLUSTER);
            config.link_rate_bytes_per_second = link;
            let client = start_with(config, FakeService::default()).await;
            assert!(!client.plane.downlink_full(), "nothing received yet");
            assert_eq!(client.plane.get_chunk(&peer, id).await.map(VerifiedChunk::into_bytes), Ok(chunk.clone()));
            assert_eq!(client.plane.downlink_full(), full, "link rate {link:?}");
        }
    }

    #[tokio::test]
    async fn have_set_chunk_slice_and_home_fetch_round_trip() {
        // Goal: every request kind crosses real QUIC endpoints intact, including a whole
        // 4 MiB chunk (bigger than quinn's default stream window), slices of it, and each
        // refusal the fetch path must tell apart.
        let chunk = test_bytes("chunk", CHUNK_BYTES_MAX as usize);
        let id = ChunkId::of(&chunk);
        let homed = test_bytes("homed", 1000);
        let homed_id = ChunkId::of(&homed);
        let unavailable_id = ChunkId::of(b"origin down");
        let object = ObjectId::of(b"object");
        let mut service = FakeService::default();
        service.have.insert(object, (10, vec![0b1010_0101, 0b10]));
        service.chunks.insert(id, chunk.clone());
        service.origin.insert(homed_id, Ok(homed.clone()));
        service.origin.insert(unavailable_id, Err(HomeFetchError::OriginUnavailable("s3 is down".into())));
        let server = start(CLUSTER, service).await;
        let client = start(CLUSTER, FakeService::default()).await;
        let peer = server.target();

        assert_eq!(client.plane.have_set(&peer, object).await, Ok((10, vec![0b1010_0101, 0b10])));
        assert_eq!(client.plane.have_set(&peer, ObjectId::of(b"unknown")).await, Err(PeerError::NotFound));
        // The service is told who asked: the admitted identity, not an address.
        assert_eq!(*server.service.have_set_askers.lock().unwrap(), vec![client.plane.peer_id(); 2]);
        assert_eq!(client.plane.get_chunk(&peer, id).await.map(VerifiedChunk::into_bytes), Ok(chunk.clone()));
        assert_eq!(client.plane.get_chunk(&peer, ChunkId::of(b"absent")).await, Err(PeerError::NotFound));
        // A home's fetch feeds its relay as the bytes arrive; the relay ends verified.
        let relay = Relay::new();
        let relayed = relay.reader();
        let fetched = client.plane.get_chunk_for_home(&peer, id, Some(&relay)).await;
        assert_eq!(fetched.map(VerifiedChunk::into_bytes), Ok(chunk.clone()));
        let mut relayed = relayed;
        let mut passed_on = Vec::new();
        while let Some(piece) = relayed.next().await.expect("a verified feed") {
            passed_on.extend_from_slice(&piece);
        }
        assert_eq!(passed_on, chunk.to_vec());
        assert_eq!(
            client.plane.get_chunk_for_home(&peer, ChunkId::of(b"absent"), None).await,
            Err(PeerError::NotFound)
        );
        assert_eq!(
            client.plane.home_fetch(&peer, homed_id, None).await.map(VerifiedChunk::into_bytes),
            Ok(homed.clone())
        );
        assert_eq!(
            client.plane.home_fetch(&peer, homed_id, Some((object, 7))).await.map(VerifiedChunk::into_bytes),
            Ok(homed)
        );
        // The service learns which object the chunk was fetched for, when it is named.
        assert_eq!(*server.service.home_fetch_objects.lock().unwrap(), vec![None, Some((object, 7))]);
        assert_eq!(client.plane.home_fetch(&peer, ChunkId::of(b"nowhere"), None).await, Err(PeerError::NotFound));
        assert!(matches!(
            client.plane.home_fetch(&peer, unavailable_id, None).await,
            Err(PeerError::Remote { status: Status::OriginUnavailable, message }) if message == "s3 is down"
        ));

        // Slices, through the raw exchange (get_chunk only hands out verified whole chunks).
        let (connection, _) = client.plane.connection(&peer).await.unwrap();
        let progress = Progress::new(Instant::now());
        let trace = ExchangeTrace::default();
        let slice =
            |offset, length| exchange(&connection, Request::GetChunk { id, offset, length }, None, &progress, &trace);
        let Ok(Answer::Chunk(middle, _)) = slice(1000, 5000).await else { panic!("no slice") };
        assert_eq!(middle, chunk.slice(1000..6000));
        let Ok(Answer::Chunk(tail, _)) = slice(CHUNK_BYTES_MAX - 10, 0).await else { panic!("no tail") };
        assert_eq!(tail, chunk.slice(chunk.len() - 10..));
        let Err(ExchangeError::Peer(PeerError::Remote { status, .. })) = slice(CHUNK_BYTES_MAX - 10, 11).await else {
            panic!("a range past the end was served")
        };
        assert_eq!(status, Status::BadRequest);

        // All of it went over one cached connection.
        assert_eq!(client.plane.shared.endpoint.open_connections(), 1);
    }

    #[tokio::test]
    async fn foreign_admission_key_is_refused_both_ways_and_fetches_nothing() {
        // Goal: a node without the cluster key can neither fetch from a member nor pass as
        // one when a member connects to it, the member's service is never asked, and the
        // refusals are counted by reason.
        let handle = metrics_handle();
        let chunk = test_bytes("member chunk", 5000);
        let id = ChunkId::of(&chunk);
        let object = ObjectId::of(b"object");
        let mut service = FakeService::default();
        service.chunks.insert(id, chunk);
        service.have.insert(object, (1, vec![1]));
        service.origin.insert(id, Ok(test_bytes("member chunk", 5000)));
        let member = start(CLUSTER, service).await;
        let outsider = start(OTHER_CLUSTER, FakeService::default()).await;

        let refused = PeerError::Admission(AdmissionFailure::RefusedByPeer);
        assert_eq!(outsider.plane.have_set(&member.target(), object).await, Err(refused.clone()));
        assert_eq!(outsider.plane.get_chunk(&member.target(), id).await, Err(refused.clone()));
        assert_eq!(outsider.plane.home_fetch(&member.target(), id, None).await, Err(refused.clone()));
        assert_eq!(member.service.calls.load(Ordering::SeqCst), 0);

        // The other direction: the outsider, which checks first, refuses the member.
        assert_eq!(member.plane.have_set(&outsider.target(), object).await, Err(refused));
        assert_eq!(outsider.service.calls.load(Ordering::SeqCst), 0);

        // And a server that lets anyone in but lacks the key is refused by the member's own
        // check of its Hello.
        let lenient = LocalHello { dc: DC.into(), identity: identity(), admission_key: OTHER_CLUSTER };
        let lenient = start_lenient_server(lenient, HelloAnswer::Own);
        let result = member.plane.have_set(&lenient, object).await;
        assert_eq!(result, Err(PeerError::Admission(AdmissionFailure::BadTag)));

        let rendered = handle.render();
        assert!(rendered.contains(r#"cachemesh_peer_admission_failures_total{reason="bad_tag"}"#), "{rendered}");
    }

    #[tokio::test]
    async fn another_datacenter_is_refused() {
        // Goal: same cluster key, different DC: refused before anything is served.
        let member = start(CLUSTER, FakeService::default()).await;
        let elsewhere = start_with(
            DataPlaneConfig::new(loopback(), "other-dc".into(), identity(), CLUSTER),
            FakeService::default(),
        )
        .await;
        let result = elsewhere.plane.have_set(&member.target(), ObjectId::of(b"o")).await;
        assert_eq!(result, Err(PeerError::Admission(AdmissionFailure::RefusedByPeer)));
        let result = member.plane.have_set(&elsewhere.target(), ObjectId::of(b"o")).await;
        assert_eq!(result, Err(PeerError::Admission(AdmissionFailure::RefusedByPeer)));
        // The client's own check, against a server that lets anyone in.
        let lenient = LocalHello { dc: "other-dc".into(), identity: identity(), admission_key: CLUSTER };
        let lenient = start_lenient_server(lenient, HelloAnswer::Own);
        let result = member.plane.have_set(&lenient, ObjectId::of(b"o")).await;
        assert_eq!(result, Err(PeerError::Admission(AdmissionFailure::WrongDc)));
    }

    #[tokio::test]
    async fn a_reflected_hello_is_refused() {
        // Goal: a server that echoes the client's own Hello back (valid tag and signature,
        // but spoken as the client) is refused by the role byte of the transcript.
        let member = start(CLUSTER, FakeService::default()).await;
        let reflector = LocalHello { dc: DC.into(), identity: identity(), admission_key: CLUSTER };
        let mut reflector = start_lenient_server(reflector, HelloAnswer::Echo);
        reflector.peer_id = member.plane.peer_id();
        let result = member.plane.have_set(&reflector, ObjectId::of(b"o")).await;
        assert_eq!(result, Err(PeerError::Admission(AdmissionFailure::BadTag)));
    }

    enum HelloAnswer {
        /// A Hello made with the server's own settings.
        Own,
        /// The client's Hello, sent back.
        Echo,
    }

    /// A hostile server on a raw endpoint: accepts one connection, ignores the client's
    /// Hello and answers as told, so the client's own checks are what is tested.
    fn start_lenient_server(local: LocalHello, answer: HelloAnswer) -> PeerTarget {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let endpoint = Endpoint::server(server_config(provider).unwrap(), loopback()).unwrap();
        let target = PeerTarget { peer_id: local.identity.peer_id(), addr: endpoint.local_addr().unwrap() };
        tokio::spawn(async move {
            let connection = endpoint.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = connection.accept_bi().await.unwrap();
            let (client_hello, _) = read_frame(&mut recv, HELLO_BYTES_MAX, Hello::decode).await.unwrap();
            let exporter = exporter(&connection).unwrap();
            let hello = match answer {
                HelloAnswer::Own => make_hello(&local, Role::Server, &exporter),
                HelloAnswer::Echo => client_hello,
            };
            send.write_all(&hello.encode()).await.unwrap();
            send.finish().unwrap();
            connection.closed().await;
        });
        target
    }

    #[tokio::test]
    async fn a_request_instead_of_a_hello_is_not_served() {
        // Goal: a peer that skips the Hello and sends a request on the first stream gets its
        // connection closed, and the service is never asked.
        let mut service = FakeService::default();
        service.have.insert(ObjectId::of(b"o"), (1, vec![1]));
        let member = start(CLUSTER, service).await;
        let intruder = start(OTHER_CLUSTER, FakeService::default()).await;
        let connection = intruder.plane.shared.endpoint.connect(member.plane.local_addr(), SERVER_NAME).unwrap();
        let connection = connection.await.unwrap();
        let answer = exchange(
            &connection,
            Request::HaveSet(ObjectId::of(b"o")),
            None,
            &Progress::new(Instant::now()),
            &ExchangeTrace::default(),
        )
        .await;
        assert!(answer.is_err());
        let ConnectionError::ApplicationClosed(close) = connection.closed().await else { panic!("not refused") };
        assert_eq!(close.error_code, CLOSE_ADMISSION_REFUSED);
        assert_eq!(member.service.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_restarted_peer_is_reached_on_a_new_connection() {
        // Goal: when the cached connection to a peer is gone (the peer restarted, here on
        // another port with the same identity), the next request connects afresh.
        let object = ObjectId::of(b"o");
        let have = || {
            let mut service = FakeService::default();
            service.have.insert(object, (1, vec![1]));
            service
        };
        let server_identity = identity();
        let config = || DataPlaneConfig::new(loopback(), DC.into(), server_identity.clone(), CLUSTER);
        let first = start_with(config(), have()).await;
        let client = start(CLUSTER, FakeService::default()).await;
        assert_eq!(client.plane.have_set(&first.target(), object).await, Ok((1, vec![1])));
        first.shutdown.cancel();
        first.plane.stopped().await;

        let second = start_with(config(), have()).await;
        assert_eq!(second.target().peer_id, first.target().peer_id);
        assert_eq!(client.plane.have_set(&second.target(), object).await, Ok((1, vec![1])));
        assert_eq!(client.plane.have_set(&second.target(), object).await, Ok((1, vec![1])));
        assert_eq!(second.service.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn callers_queued_behind_a_dead_peer_fail_together() {
        // Goal (regression: waiters for a dead peer's connection each waited out their own
        // CONNECT_TIMEOUT, one after another): concurrent requests to a peer that never
        // answers cost one connect attempt, and all of them get its error.
        let black_hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = PeerTarget { peer_id: identity().peer_id(), addr: black_hole.local_addr().unwrap() };
        let client = start(CLUSTER, FakeService::default()).await;
        let object = ObjectId::of(b"o");
        let results = futures::future::join_all((0..8).map(|_| client.plane.have_set(&target, object))).await;
        for result in results {
            assert!(matches!(result, Err(PeerError::Connect(_))), "{result:?}");
        }
        assert_eq!(client.plane.shared.connects_started.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn wrong_expected_peer_id_is_refused() {
        // Goal: a member answering in place of the node we meant to reach is refused, even
        // though it holds the cluster key.
        let member = start(CLUSTER, FakeService::default()).await;
        let client = start(CLUSTER, FakeService::default()).await;
        let impostor = PeerTarget { peer_id: identity().peer_id(), addr: member.plane.local_addr() };
        let result = client.plane.have_set(&impostor, ObjectId::of(b"o")).await;
        assert_eq!(result, Err(PeerError::Admission(AdmissionFailure::WrongPeer)));
    }

    #[tokio::test]
    async fn corrupt_chunk_from_the_server_is_reported_corrupt() {
        // Goal: bytes that do not hash to the id asked for never leave the module, whether
        // from the peer's store or from its home fetch.
        let id = ChunkId::of(b"the real bytes");
        let mut service = FakeService::default();
        service.chunks.insert(id, Bytes::from_static(b"other bytes"));
        service.origin.insert(id, Ok(Bytes::from_static(b"other bytes")));
        let server = start(CLUSTER, service).await;
        let client = start(CLUSTER, FakeService::default()).await;
        assert_eq!(client.plane.get_chunk(&server.target(), id).await, Err(PeerError::Corrupt { chunk: id }));
        assert_eq!(client.plane.home_fetch(&server.target(), id, None).await, Err(PeerError::Corrupt { chunk: id }));
    }

    #[cfg(feature = "test-faults")]
    #[tokio::test]
    async fn corrupt_served_chunks_fault_is_caught_by_the_client() {
        // Goal: the test fault really corrupts what is served, and the client catches it.
        let chunk = test_bytes("faulty", 100_000);
        let id = ChunkId::of(&chunk);
        let mut service = FakeService::default();
        service.chunks.insert(id, chunk);
        let mut config = DataPlaneConfig::new(loopback(), DC.into(), identity(), CLUSTER);
        config.corrupt_served_chunks = true;
        let server = start_with(config, service).await;
        let client = start(CLUSTER, FakeService::default()).await;
        assert_eq!(client.plane.get_chunk(&server.target(), id).await, Err(PeerError::Corrupt { chunk: id }));
    }

    #[tokio::test]
    async fn a_chunk_that_keeps_moving_outlives_the_request_limit() {
        // Goal: a request's limit bounds time without progress, not the transfer: a 4 MiB
        // chunk paced by the server's upload budget at 1 MiB/s takes about 3 s, three times
        // the client's 1 s limit, and arrives whole (each 64 KiB slice comes within about
        // 62 ms). An end-to-end deadline fails this with a timeout.
        const RATE_BYTES_PER_SECOND: u64 = 1024 * 1024;
        let limit = Duration::from_secs(1);
        let chunk = test_bytes("paced", CHUNK_BYTES_MAX as usize);
        let id = ChunkId::of(&chunk);
        let mut service = FakeService::default();
        service.chunks.insert(id, chunk.clone());
        let mut config = DataPlaneConfig::new(loopback(), DC.into(), identity(), CLUSTER);
        config.upload_limit_bytes_per_second = Some(RATE_BYTES_PER_SECOND);
        let server = start_with(config, service).await;
        let client = start(CLUSTER, FakeService::default()).await;
        let request = Request::GetChunk { id, offset: 0, length: 0 };
        match client.plane.request(&server.target(), request, limit, None).await {
            Ok(Answer::Chunk(body, _)) => assert_eq!(body, chunk),
            Ok(_) => panic!("not a chunk answer"),
            Err(error) => panic!("a paced chunk failed: {error}"),
        }
    }

    #[cfg(feature = "test-faults")]
    #[tokio::test]
    async fn a_peer_that_sends_nothing_is_given_up_after_the_limit() {
        // Goal: the other side of the same rule: a server that holds its answer back (the
        // slow-peer fault, 5 s) makes a request with a 300 ms limit fail as timed out.
        let chunk = test_bytes("held back", 100_000);
        let id = ChunkId::of(&chunk);
        let mut service = FakeService::default();
        service.chunks.insert(id, chunk);
        let mut config = DataPlaneConfig::new(loopback(), DC.into(), identity(), CLUSTER);
        config.delay_served_chunks = Duration::from_secs(5);
        let server = start_with(config, service).await;
        let client = start(CLUSTER, FakeService::default()).await;
        let request = Request::GetChunk { id, offset: 0, length: 0 };
        let answer = client.plane.request(&server.target(), request, Duration::from_millis(300), None).await;
        assert!(matches!(answer, Err(PeerError::Timeout)), "expected a timeout, got {:?}", answer.map(|_| "an answer"));
    }

    #[tokio::test]
    async fn requests_beyond_the_per_peer_limit_get_busy() {
        // Goal: with REQUESTS_PER_PEER_MAX requests held in service, the next one from
        // the same peer is answered Busy at once rather than queued; the held ones complete.
        let (service, id, chunk) = gated_service("held");
        let server = start(CLUSTER, service).await;
        let client_identity = identity();
        let config = DataPlaneConfig::new(loopback(), DC.into(), client_identity.clone(), CLUSTER);
        let client = start_with(config, FakeService::default()).await;
        let peer = server.target();

        // Held as a home's requests: a reader's beyond UPLOAD_SLOTS_PER_PEER would be
        // answered Busy by the upload line before they reach the gate.
        let mut held = tokio::task::JoinSet::new();
        for _ in 0..REQUESTS_PER_PEER_MAX {
            let plane = client.plane.clone();
            held.spawn(async move { plane.get_chunk_for_home(&peer, id, None).await });
        }
        let gate = server.service.gate.as_ref().unwrap();
        gate.started.acquire_many(REQUESTS_PER_PEER_MAX as u32).await.unwrap().forget();

        assert_eq!(client.plane.get_chunk(&peer, id).await, Err(PeerError::Busy));
        assert_eq!(client.plane.have_set(&peer, ObjectId::of(b"o")).await, Err(PeerError::Busy));
        // The limit is per peer, not per connection: a second connection does not get around it.
        let same_identity = DataPlaneConfig::new(loopback(), DC.into(), client_identity, CLUSTER);
        let second_client = start_with(same_identity, FakeService::default()).await;
        assert_eq!(second_client.plane.get_chunk(&peer, id).await, Err(PeerError::Busy));

        gate.release.add_permits(REQUESTS_PER_PEER_MAX);
        while let Some(result) = held.join_next().await {
            assert_eq!(result.unwrap().map(VerifiedChunk::into_bytes), Ok(chunk.clone()));
        }
    }

    #[tokio::test]
    async fn a_reader_beyond_its_share_of_upload_slots_is_turned_away_and_a_home_waits() {
        // Goal: a reader's chunk requests take upload slots that are free now; beyond
        // UPLOAD_SLOTS_PER_PEER at once the next is answered Busy rather than queued, while
        // a home's request from the same peer waits its turn and is served.
        let (service, id, chunk) = gated_service("share");
        let server = start(CLUSTER, service).await;
        let client = start(CLUSTER, FakeService::default()).await;
        let peer = server.target();

        let mut held = tokio::task::JoinSet::new();
        for _ in 0..crate::upload_line::UPLOAD_SLOTS_PER_PEER {
            let plane = client.plane.clone();
            held.spawn(async move { plane.get_chunk(&peer, id).await });
        }
        let gate = server.service.gate.as_ref().unwrap();
        gate.started.acquire_many(crate::upload_line::UPLOAD_SLOTS_PER_PEER as u32).await.unwrap().forget();
        assert_eq!(client.plane.get_chunk(&peer, id).await, Err(PeerError::Busy), "a reader beyond its share");

        let home = {
            let plane = client.plane.clone();
            tokio::spawn(async move { plane.get_chunk_for_home(&peer, id, None).await })
        };
        gate.started.acquire().await.unwrap().forget();
        gate.release.add_permits(crate::upload_line::UPLOAD_SLOTS_PER_PEER + 1);
        while let Some(result) = held.join_next().await {
            assert_eq!(result.unwrap().map(VerifiedChunk::into_bytes), Ok(chunk.clone()));
        }
        assert_eq!(home.await.unwrap().map(VerifiedChunk::into_bytes), Ok(chunk.clone()), "the home is served");
    }

    #[tokio::test]
    async fn a_node_with_its_link_rate_set_adds_upload_slots_while_readers_are_turned_away() {
        // Goal: with --link-rate set and every upload slot held (the link idle), a reader
        // turned away soon finds a slot the tuner added; without a link rate it never would.
        use crate::upload_line::{UPLOAD_SLOTS, UPLOAD_SLOTS_PER_PEER};
        let (service, id, chunk) = gated_service("tuned");
        let mut config = DataPlaneConfig::new(loopback(), DC.into(), identity(), CLUSTER);
        config.link_rate_bytes_per_second = Some(1 << 30);
        let server = start_with(config, service).await;
        let peer = server.target();
        let mut readers = Vec::new();
        let mut held = tokio::task::JoinSet::new();
        for _ in 0..UPLOAD_SLOTS.div_ceil(UPLOAD_SLOTS_PER_PEER) {
            readers.push(start(CLUSTER, FakeService::default()).await);
        }
        let holders =
            readers.iter().flat_map(|reader| std::iter::repeat_n(reader.plane.clone(), UPLOAD_SLOTS_PER_PEER));
        for plane in holders.take(UPLOAD_SLOTS) {
            held.spawn(async move { plane.get_chunk(&peer, id).await });
        }
        let gate = server.service.gate.as_ref().unwrap();
        gate.started.acquire_many(UPLOAD_SLOTS as u32).await.unwrap().forget();

        let late = start(CLUSTER, FakeService::default()).await;
        assert_eq!(late.plane.get_chunk(&peer, id).await, Err(PeerError::Busy), "every slot is held");
        let asking = {
            let plane = late.plane.clone();
            tokio::spawn(async move {
                loop {
                    match plane.get_chunk(&peer, id).await {
                        Err(PeerError::Busy) => tokio::time::sleep(Duration::from_millis(50)).await,
                        other => return other,
                    }
                }
            })
        };
        // A tuning step every 250 ms: 20 s is far beyond what one added slot takes.
        timeout(Duration::from_secs(20), gate.started.acquire())
            .await
            .expect("no slot was added for the turned-away reader")
            .unwrap()
            .forget();
        gate.release.add_permits(UPLOAD_SLOTS + 1);
        assert_eq!(asking.await.unwrap().map(VerifiedChunk::into_bytes), Ok(chunk.clone()));
        while let Some(result) = held.join_next().await {
            assert_eq!(result.unwrap().map(VerifiedChunk::into_bytes), Ok(chunk.clone()));
        }
    }

    #[tokio::test]
    async fn connections_beyond_the_per_peer_limit_get_busy() {
        // Goal: one identity cannot hold more than CONNECTIONS_PER_PEER_MAX admitted
        // connections; the next is refused as Busy during admission.
        let object = ObjectId::of(b"o");
        let mut service = FakeService::default();
        service.have.insert(object, (1, vec![1]));
        let server = start(CLUSTER, service).await;
        let shared_identity = identity();
        let mut clients = Vec::new();
        for _ in 0..CONNECTIONS_PER_PEER_MAX {
            let config = DataPlaneConfig::new(loopback(), DC.into(), shared_identity.clone(), CLUSTER);
            let client = start_with(config, FakeService::default()).await;
            assert_eq!(client.plane.have_set(&server.target(), object).await, Ok((1, vec![1])));
            clients.push(client);
        }
        let config = DataPlaneConfig::new(loopback(), DC.into(), shared_identity, CLUSTER);
        let one_too_many = start_with(config, FakeService::default()).await;
        assert_eq!(one_too_many.plane.have_set(&server.target(), object).await, Err(PeerError::Busy));
        // Another peer is not affected.
        let other = start(CLUSTER, FakeService::default()).await;
        assert_eq!(other.plane.have_set(&server.target(), object).await, Ok((1, vec![1])));
    }

    #[tokio::test]
    async fn every_byte_served_under_an_upload_limit_is_drawn_from_the_budget() {
        // Goal: with an upload budget, the server draws every byte of every chunk it serves
        // from the budget (the pacing itself is checked in virtual time by
        // upload_budget_never_exceeds_burst_plus_rate), and the chunks arrive intact. A
        // path that served without drawing, or drew twice, fails the byte count.
        const RATE_BYTES_PER_SECOND: u64 = 64 * 1024 * 1024;
        let mut service = FakeService::default();
        let mut ids = Vec::new();
        for seed in ["a", "b", "c"] {
            let chunk = test_bytes(seed, CHUNK_BYTES_MAX as usize);
            ids.push(ChunkId::of(&chunk));
            service.chunks.insert(ChunkId::of(&chunk), chunk);
        }
        let mut config = DataPlaneConfig::new(loopback(), DC.into(), identity(), CLUSTER);
        config.upload_limit_bytes_per_second = Some(RATE_BYTES_PER_SECOND);
        let server = start_with(config, service).await;
        let client = start(CLUSTER, FakeService::default()).await;

        // As a home's requests, which all wait their turn (a reader's beyond
        // UPLOAD_SLOTS_PER_PEER would be answered Busy).
        let mut fetches = tokio::task::JoinSet::new();
        for id in ids {
            let (plane, peer) = (client.plane.clone(), server.target());
            fetches.spawn(async move { (id, plane.get_chunk_for_home(&peer, id, None).await) });
        }
        let mut bytes = 0u64;
        while let Some(result) = fetches.join_next().await {
            let (id, chunk) = result.unwrap();
            let chunk = chunk.unwrap().into_bytes();
            assert_eq!(ChunkId::of(&chunk), id);
            bytes += chunk.len() as u64;
        }
        assert_eq!(bytes, 3 * u64::from(CHUNK_BYTES_MAX));
        let budget = server.plane.shared.upload.as_ref().expect("an upload budget is configured");
        let reserved = budget.lock().unwrap().reserved_bytes;
        assert_eq!(reserved, bytes, "bytes drawn from the upload budget");
    }

    #[test]
    fn upload_budget_never_exceeds_burst_plus_rate() {
        // Goal: in virtual time, senders that wait as told never send more than
        // burst + rate * t, and a lone sender is not held far below the rate.
        const RATE: u64 = 1_000_000;
        let start = Instant::now();
        let mut budget = UploadBudget::new(RATE, UPLOAD_BURST_BYTES, start);
        let mut now = start;
        let mut sent = 0u64;
        for _ in 0..1000 {
            let wait = budget.reserve(now, UPLOAD_SLICE_BYTES as u64);
            now += wait;
            sent += UPLOAD_SLICE_BYTES as u64;
            let elapsed = (now - start).as_secs_f64();
            assert!(sent as f64 <= UPLOAD_BURST_BYTES as f64 + RATE as f64 * elapsed + 1.0);
        }
        let elapsed = (now - start).as_secs_f64();
        assert!(sent as f64 >= RATE as f64 * elapsed, "sent {sent} in {elapsed} s");

        // Two reservations at the same instant queue behind each other.
        let mut budget = UploadBudget::new(RATE, 0, start);
        let first = budget.reserve(start, 500_000);
        let second = budget.reserve(start, 500_000);
        assert_eq!((first, second), (Duration::from_millis(500), Duration::from_secs(1)));
        assert_eq!(budget.backlog(start + Duration::from_millis(250)), Duration::from_millis(750));
    }

    #[test]
    fn hellos_are_bound_to_role_session_and_key() {
        // Goal: a Hello checks out only in the role, session and cluster it was made for, so
        // it cannot be reflected, replayed on another connection or forged without the key.
        let member = LocalHello { dc: DC.into(), identity: identity(), admission_key: CLUSTER };
        let checker = LocalHello { dc: DC.into(), identity: identity(), admission_key: CLUSTER };
        let exporter = [3u8; 32];
        let hello = make_hello(&member, Role::Client, &exporter);
        assert_eq!(check_hello(&checker, Role::Client, &exporter, &hello), Ok(member.identity.peer_id()));
        assert_eq!(check_hello(&checker, Role::Server, &exporter, &hello), Err(AdmissionFailure::BadTag));
        assert_eq!(check_hello(&checker, Role::Client, &[4u8; 32], &hello), Err(AdmissionFailure::BadTag));
        let outsider = LocalHello { dc: DC.into(), identity: identity(), admission_key: OTHER_CLUSTER };
        assert_eq!(check_hello(&outsider, Role::Client, &exporter, &hello), Err(AdmissionFailure::BadTag));
        // A member that lends its tag to another key still fails the signature.
        let mut stolen = hello.clone();
        stolen.public_key = checker.identity.public_key();
        let transcript = Hello::transcript(Role::Client, &exporter, &stolen.public_key, DC);
        stolen.admission_tag = *blake3::keyed_hash(&CLUSTER, &transcript).as_bytes();
        assert_eq!(check_hello(&checker, Role::Client, &exporter, &stolen), Err(AdmissionFailure::BadSignature));
    }

    #[test]
    fn chunk_ranges_stay_inside_the_chunk() {
        assert_eq!(chunk_range(100, 0, 0), Some(0..100));
        assert_eq!(chunk_range(100, 10, 0), Some(10..100));
        assert_eq!(chunk_range(100, 10, 90), Some(10..100));
        assert_eq!(chunk_range(100, 10, 91), None);
        assert_eq!(chunk_range(100, 101, 0), None);
    }
}
