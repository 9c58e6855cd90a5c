//! Datacenter-scoped discovery: who is in this DC's mesh, and who holds which object.
//!
//! One libp2p swarm per node, owned by an actor task driven by a bounded channel of one
//! `Command` enum; [`Discovery`] is the cloneable handle. The swarm runs three protocols:
//!
//! - **Kademlia**, under the DC's own protocol name (`/cachemesh/<dc>/kad/1.0.0`), always in
//!   server mode, holding **one provider record per object** (never per chunk: see "Why
//!   per-object records" in the design). Timings and store limits are set for a datacenter,
//!   not left at libp2p's internet defaults (constants below say why).
//! - **identify** (protocol version `/cachemesh/<dc>/id/1.0.0`): a peer's listen addresses
//!   enter the Kademlia routing table only when it speaks our DC's identify and Kademlia
//!   protocols, so inbound peers become routable too.
//! - **gossipsub** on `/cachemesh/<dc>/members/1`, with signed messages: every node
//!   announces itself every [`ANNOUNCE_INTERVAL`] (peer id, data-plane address, p2p listen
//!   addresses), and once more as soon as a new peer subscribes, so a joining node appears
//!   at once. A node that stops gracefully announces that it leaves. Receivers keep the
//!   table in [`Membership`], a plain struct fed explicit instants.
//! - **gossipsub** on `/cachemesh/<dc>/volumes/1`: after a node appends a record to a
//!   volume's log it announces the volume's new head ([`VolumeHead`]), so the other nodes
//!   of the DC catch up at once instead of at their next poll. A hint only: receivers read
//!   the records from the origin, so a lost or forged head costs at most one extra poll.
//!
//! **Reconnecting.** Bootstrap peers are redialled while a node has almost no peers; a
//! peer whose last connection broke is redialled with backoff ([`Redial`]) until it is
//! back or announces its leave, so the halves of a healed partition find each other even
//! when the cut outlasted TCP.
//!
//! **Admission.** The control plane runs on TCP wrapped in libp2p's pre-shared-key private
//! network (`pnet`), then noise and yamux. The key is derived from the cluster key and the
//! DC name (`ClusterKey::private_network_key`), so a node without the cluster key, or of
//! another DC, cannot complete a connection: its bytes never reach Kademlia or gossipsub.
//! `pnet` does not work over QUIC, which is why the control plane is TCP while the bulk
//! data plane is QUIC with its own admission check (`transport`).
//!
//! Non-goals: carrying chunk or have-set traffic (the data plane does); NAT traversal,
//! relays and internet-scale peer scoring (a DC is one flat, admitted network); value
//! records (cachemesh stores none, so the store keeps only a token allowance for them);
//! ordering announcements across a node's restarts (a stale "alive" that overtakes a
//! "leave" re-adds the node for at most [`MEMBER_EXPIRY`]).
//!
//! Invariants:
//! - Everything is bounded: the command channel, concurrent provider lookups, queued
//!   provider publications, the provider store, announcements, the membership table, and
//!   the peers kept for redialling.
//! - An announcement is accepted only from the peer it names (gossipsub signs messages and
//!   the decoder checks the signer against the announced peer id); this node never lists
//!   itself as a member.
//! - A `providers` answer never contains this node, and arrives within
//!   [`PROVIDER_QUERY_TIMEOUT`] (plus the time to queue the command).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachemesh_proto::ObjectId;
use cachemesh_proto::limits::DC_NAME_BYTES_MAX;
use cachemesh_proto::volume::VolumeHead;
use futures::StreamExt;
use libp2p::core::transport::upgrade::Version;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::kad::store::{self, RecordStore};
use libp2p::kad::{self, Mode, ProviderRecord, QueryId, QueryResult, Record, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, Transport, identify, noise, tcp, yamux};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::identity::NodeIdentity;

mod redial;
pub use redial::{LOST_PEER_MEMORY, REDIAL_DELAY_MAX, REDIAL_DELAY_MIN, Redial};

// ---------------------------------------------------------------------------------------
// Limits and timings.

/// How often a node announces itself on the membership topic. A few seconds: a DC learns
/// of a new node within one interval even when the announcement on subscription is lost,
/// and with a thousand nodes the topic carries a few hundred small messages a second.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(2);
/// A member not heard from for this long is dropped: three announcements, so one or two
/// lost messages do not evict a live node, and a crashed node is gone within seconds.
pub const MEMBER_EXPIRY: Duration = Duration::from_secs(6);
/// The least time between two announcements of this node: a burst of peers subscribing
/// (a rack booting) costs one announcement per gap, not one per peer.
const ANNOUNCE_GAP_MIN: Duration = Duration::from_millis(250);
/// The most members a node keeps. All members of a DC fit in memory (home nodes are chosen
/// from this table without network lookups); beyond this, new members are refused.
pub const MEMBERS_MAX: usize = 8192;
/// How long the sequence number of a peer that is not a member (it left, or expired) is
/// remembered: longer than gossipsub keeps a message for re-delivery (its cache holds 5
/// heartbeats of 1 s), so a stale announcement cannot outlive it.
pub const SEQUENCE_MEMORY: Duration = Duration::from_secs(60);
/// Most peers whose sequence numbers are remembered.
const SEQUENCES_MAX: usize = 2 * MEMBERS_MAX;

/// The most bytes of an encoded announcement; a longer message is refused before decoding.
pub const ANNOUNCEMENT_BYTES_MAX: usize = 2048;
/// The most p2p listen addresses carried in one announcement (extra ones are left out).
const ANNOUNCEMENT_ADDRS_MAX: usize = 16;
/// The most bytes of one encoded multiaddr in an announcement (IP listen addresses with a
/// port take under 30; longer ones are left out).
const ANNOUNCEMENT_ADDR_BYTES_MAX: usize = 112;
/// The most bytes of an encoded peer id (identity multihash of an ed25519 key: 38).
const PEER_ID_BYTES_MAX: usize = 66;
/// Version byte of the announcement encoding.
const ANNOUNCEMENT_VERSION: u8 = 2;
// version + kind + peer id length + peer id + data address (tag, 16 bytes, port) + address
// count + addresses with their 2-byte lengths.
const _: () = assert!(
    3 + PEER_ID_BYTES_MAX + 19 + 1 + ANNOUNCEMENT_ADDRS_MAX * (2 + ANNOUNCEMENT_ADDR_BYTES_MAX)
        <= ANNOUNCEMENT_BYTES_MAX
);
/// gossipsub's largest frame: announcements plus control messages, well above one
/// announcement.
const GOSSIP_TRANSMIT_BYTES_MAX: usize = 64 * 1024;
const _: () = assert!(4 * ANNOUNCEMENT_BYTES_MAX <= GOSSIP_TRANSMIT_BYTES_MAX);

/// A provider record lives this long on the nodes that store it unless republished. It
/// bounds how long a node that evicted an object stays listed (a wasted have-set request,
/// never a wrong chunk); nodes that die are filtered sooner by membership. libp2p's 48 h
/// is for the internet, where churn is slow to notice.
pub const PROVIDER_RECORD_TTL: Duration = Duration::from_secs(60 * 60);
/// How often this node republishes its provider records. A third of the TTL, so a record
/// survives two missed republications. Each republication is one lookup plus one message to
/// each of the K closest nodes per object: at the sizing target of
/// [`DHT_PROVIDED_KEYS_MAX`] objects that is about 100 publications a second, at a more
/// typical ten thousand objects about 8. New records are published at once by `provide`,
/// not by this job.
pub const PROVIDER_PUBLICATION_INTERVAL: Duration = Duration::from_secs(20 * 60);
const _: () = assert!(PROVIDER_PUBLICATION_INTERVAL.as_secs() * 3 <= PROVIDER_RECORD_TTL.as_secs());
/// A whole Kademlia query (many requests) gives up after this. DC round trips are well
/// under a millisecond; libp2p's 60 s default is for the internet.
const DHT_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// One Kademlia request gives up after this: a peer that takes longer is overloaded or gone.
const DHT_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// `providers` answers with what it found within this time, even if the lookup goes on.
pub const PROVIDER_QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const _: () = assert!(PROVIDER_QUERY_TIMEOUT.as_millis() < DHT_QUERY_TIMEOUT.as_millis());
/// `providers` answers as soon as it has this many holders: enough to spread a fetch.
const PROVIDERS_RESULT_MAX: usize = 20;
/// The most `providers` lookups in flight from one node; further callers wait.
const PROVIDER_LOOKUPS_CONCURRENT_MAX: usize = 64;
/// The most provider publications (from `provide`) in flight; the rest wait in a queue, so
/// a node that re-provides its whole store at start-up does not start 100k queries at once.
const PROVIDE_QUERIES_CONCURRENT_MAX: usize = 32;

/// The most objects this node provides. Sized for 100k objects per node with headroom.
/// The queue of publications waiting for peers has the same bound.
pub const DHT_PROVIDED_KEYS_MAX: usize = 131_072;
/// The most keys provided by *other* nodes that this node stores. In a DC of up to K (20)
/// nodes every node stores every object key of the DC; nodes mostly hold the same objects
/// (the same models and images), so twice one node's target leaves room for the DC's own.
pub const DHT_PROVIDER_KEYS_MAX: usize = 2 * DHT_PROVIDED_KEYS_MAX;
/// The most providers stored per key: Kademlia's K. A lookup that finds more holders than
/// this does not spread a fetch any better.
const DHT_PROVIDERS_PER_KEY_MAX: usize = 20;
/// The most provider records stored in all. A record costs 152 bytes here (its addresses
/// are not kept) plus a key's map entry and vector slack: about 25 MiB for 100k keys with
/// one provider each, and at most about 300 MiB however full.
pub const DHT_PROVIDER_RECORDS_MAX: usize = 1 << 20;
const _: () = assert!(DHT_PROVIDER_RECORDS_MAX >= DHT_PROVIDED_KEYS_MAX + DHT_PROVIDER_KEYS_MAX);
/// Value records: cachemesh puts none; a small allowance keeps the protocol answerable.
const DHT_RECORDS_MAX: usize = 256;
/// The largest value record accepted.
const DHT_RECORD_VALUE_BYTES_MAX: usize = 1024;

/// A bootstrap peer that is not connected is dialled again after this, so a node started
/// before its bootstrap peer still joins.
pub const BOOTSTRAP_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Bootstrap peers are redialled only while this node has fewer connected peers than this:
/// once it is in the mesh, gossipsub and Kademlia keep it there, and the bootstrap nodes of
/// a large DC are not redialled by every node every few seconds.
const BOOTSTRAP_REDIAL_BELOW_PEERS: usize = 4;
/// A connection no protocol uses is closed after this.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// TCP connect, pnet, noise and yamux negotiation must finish within this.
const CONNECTION_UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// `start` fails if a listen address is not bound within this.
const LISTEN_START_TIMEOUT: Duration = Duration::from_secs(5);
/// After publishing its leave announcement, the actor keeps driving the swarm this long so
/// the message leaves the host before the connections close.
const LEAVE_FLUSH_TIMEOUT: Duration = Duration::from_millis(500);
/// Membership expiry, metrics and queued publications are looked at this often.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
const _: () = assert!(HOUSEKEEPING_INTERVAL.as_millis() < ANNOUNCE_INTERVAL.as_millis());
const _: () = assert!(ANNOUNCE_INTERVAL.as_millis() * 3 == MEMBER_EXPIRY.as_millis());
/// Commands waiting for the actor.
const COMMAND_CHANNEL_CAPACITY: usize = 256;
/// Volume head announcements buffered for a slow receiver. A receiver that lags loses the
/// oldest, which only delays its catch-up to the next poll.
pub const VOLUME_HEADS_BUFFERED: usize = 256;
/// Lost-member notices buffered for a slow receiver (a lagging one only reacts later).
pub const LOST_MEMBERS_BUFFERED: usize = 64;
/// The most listen addresses of a peer (from identify) added to the routing table.
const IDENTIFY_ADDRS_MAX: usize = 16;

// ---------------------------------------------------------------------------------------
// Errors.

/// Why the discovery service could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The DC name cannot be part of a protocol name.
    #[error("invalid datacenter name {dc:?}: {reason}")]
    InvalidDc {
        /// The name given.
        dc: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No listen address was configured.
    #[error("the discovery service needs at least one listen address")]
    NoListenAddress,
    /// The swarm could not be built.
    #[error("building the libp2p swarm: {detail}")]
    Build {
        /// The cause.
        detail: String,
    },
    /// A listen address could not be bound.
    #[error("listening on {address}: {detail}")]
    Listen {
        /// The address.
        address: Multiaddr,
        /// The cause.
        detail: String,
    },
}

/// Why a `--bootstrap` entry is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapAddrError {
    /// Not a multiaddr.
    #[error("{text:?} is not a multiaddr: {detail}")]
    Multiaddr {
        /// The entry.
        text: String,
        /// The parser's complaint.
        detail: String,
    },
    /// A multiaddr without a TCP port (the control plane runs on TCP only).
    #[error("{text:?} has no /tcp/ port (the discovery protocols run on TCP)")]
    NotTcp {
        /// The entry.
        text: String,
    },
    /// Neither a multiaddr nor `host:port`.
    #[error("{text:?} is neither a multiaddr nor host:port ({reason})")]
    HostPort {
        /// The entry.
        text: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Why an announcement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnouncementError {
    /// Longer than [`ANNOUNCEMENT_BYTES_MAX`].
    #[error("announcement of {bytes} bytes exceeds the limit")]
    TooLong {
        /// Its length.
        bytes: usize,
    },
    /// Ends before a field does.
    #[error("announcement truncated")]
    Truncated,
    /// An unknown encoding version.
    #[error("unknown announcement version {0}")]
    Version(u8),
    /// A field holds a value it may not.
    #[error("invalid announcement field: {0}")]
    Invalid(&'static str),
    /// Bytes after the last field.
    #[error("{0} bytes after the announcement")]
    Trailing(usize),
}

// ---------------------------------------------------------------------------------------
// Bootstrap addresses.

/// A `--bootstrap` entry: a full multiaddr (`/ip4/10.0.0.1/tcp/4001/p2p/12D3...`, the peer
/// id checked on connect) or `host:port` (the identity learned on connect). IPv6 hosts are
/// written in brackets: `[fd00::1]:4001`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapAddr {
    address: Multiaddr,
    peer_id: Option<PeerId>,
}

impl BootstrapAddr {
    /// Parses one entry.
    pub fn parse(text: &str) -> Result<Self, BootstrapAddrError> {
        let text = text.trim();
        if text.starts_with('/') { Self::parse_multiaddr(text) } else { Self::parse_host_port(text, false) }
    }

    fn parse_multiaddr(text: &str) -> Result<Self, BootstrapAddrError> {
        let mut address = Multiaddr::from_str(text)
            .map_err(|error| BootstrapAddrError::Multiaddr { text: text.to_string(), detail: error.to_string() })?;
        let peer_id = match address.iter().last() {
            Some(Protocol::P2p(peer_id)) => {
                address.pop();
                Some(peer_id)
            }
            _ => None,
        };
        let has_tcp = address.iter().any(|protocol| matches!(protocol, Protocol::Tcp(_)));
        let has_inner_p2p = address.iter().any(|protocol| matches!(protocol, Protocol::P2p(_)));
        if !has_tcp || has_inner_p2p {
            return Err(BootstrapAddrError::NotTcp { text: text.to_string() });
        }
        Ok(Self { address, peer_id })
    }

    fn parse_host_port(text: &str, allow_port_zero: bool) -> Result<Self, BootstrapAddrError> {
        let invalid = |reason| BootstrapAddrError::HostPort { text: text.to_string(), reason };
        let (host, port) = text.rsplit_once(':').ok_or_else(|| invalid("no :port"))?;
        let port: u16 = port.parse().map_err(|_| invalid("the port is not a number from 1 to 65535"))?;
        if port == 0 && !allow_port_zero {
            return Err(invalid("the port is not a number from 1 to 65535"));
        }
        let first = if let Some(inner) = host.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or_else(|| invalid("unclosed [ around an IPv6 address"))?;
            let ip: std::net::Ipv6Addr = inner.parse().map_err(|_| invalid("not an IPv6 address inside [ ]"))?;
            Protocol::Ip6(ip)
        } else if host.contains(':') {
            return Err(invalid("write an IPv6 address in brackets: [addr]:port"));
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            match ip {
                IpAddr::V4(ip) => Protocol::Ip4(ip),
                IpAddr::V6(ip) => Protocol::Ip6(ip),
            }
        } else {
            let valid_name = !host.is_empty()
                && host.len() <= 253
                && host.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.')
                && !host.starts_with('.')
                && !host.starts_with('-');
            if !valid_name {
                return Err(invalid("the host is neither an IP address nor a DNS name"));
            }
            Protocol::Dns(Cow::Owned(host.to_string()))
        };
        let address = Multiaddr::empty().with(first).with(Protocol::Tcp(port));
        Ok(Self { address, peer_id: None })
    }

    /// The address to dial, without any `/p2p/` suffix.
    pub fn address(&self) -> &Multiaddr {
        &self.address
    }

    /// The expected peer id, when the entry named one.
    pub fn peer_id(&self) -> Option<PeerId> {
        self.peer_id
    }
}

/// Parses a p2p listen address written as a TCP multiaddr (`/ip4/0.0.0.0/tcp/7946`) or as
/// `ip:port` (`0.0.0.0:7946`, `[::]:7946`); port 0 picks a free port.
pub fn parse_listen_addr(text: &str) -> Result<Multiaddr, BootstrapAddrError> {
    let text = text.trim();
    let parsed = if text.starts_with('/') {
        BootstrapAddr::parse_multiaddr(text)?
    } else {
        BootstrapAddr::parse_host_port(text, true)?
    };
    let is_ip = matches!(parsed.address.iter().next(), Some(Protocol::Ip4(_) | Protocol::Ip6(_)));
    if parsed.peer_id.is_some() || !is_ip {
        return Err(BootstrapAddrError::HostPort {
            text: text.to_string(),
            reason: "a listen address is an IP address and a port",
        });
    }
    Ok(parsed.address)
}

fn is_loopback(address: &Multiaddr) -> bool {
    match address.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        Some(Protocol::Dns(name) | Protocol::Dns4(name) | Protocol::Dns6(name)) => name == "localhost",
        _ => false,
    }
}

/// The addresses worth telling other hosts: loopback ones only when there is nothing else
/// (a node listening on 0.0.0.0 also listens on 127.0.0.1, which names the dialler itself).
fn routable_addrs(addresses: impl Iterator<Item = Multiaddr>) -> Vec<Multiaddr> {
    let (loopback, routable): (Vec<Multiaddr>, Vec<Multiaddr>) = addresses.partition(is_loopback);
    if routable.is_empty() { loopback } else { routable }
}

impl FromStr for BootstrapAddr {
    type Err = BootstrapAddrError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl fmt::Display for BootstrapAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.peer_id {
            Some(peer_id) => write!(f, "{}/p2p/{peer_id}", self.address),
            None => write!(f, "{}", self.address),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Announcements.

/// What an announcement says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnouncementKind {
    /// The node is up (sent every [`ANNOUNCE_INTERVAL`]).
    Alive,
    /// The node is stopping.
    Leave,
}

/// One membership message. Encoding (all integers big-endian): version `u8` (2), kind `u8`
/// (0 alive, 1 leave), peer id length `u8` and bytes, data address (`4` + 4 bytes or `6` +
/// 16 bytes, then port `u16`), link rate `u64` (bytes per second, 0 when not set), address
/// count `u8`, then each p2p address as length `u16` and multiaddr bytes. At most
/// [`ANNOUNCEMENT_BYTES_MAX`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// Alive or leaving.
    pub kind: AnnouncementKind,
    /// The announcing node.
    pub peer_id: PeerId,
    /// Where its data plane (QUIC) listens.
    pub data_addr: SocketAddr,
    /// Its link rate in bytes per second as its operator set it; 0 when not set.
    pub link_rate: u64,
    /// Where its swarm listens.
    pub p2p_addrs: Vec<Multiaddr>,
}

impl Announcement {
    /// The encoding; addresses beyond the limits are left out, so this always fits.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.push(ANNOUNCEMENT_VERSION);
        out.push(match self.kind {
            AnnouncementKind::Alive => 0,
            AnnouncementKind::Leave => 1,
        });
        let peer_id = self.peer_id.to_bytes();
        // A PeerId's multihash holds at most 64 digest bytes plus its code and length.
        debug_assert!(peer_id.len() <= PEER_ID_BYTES_MAX);
        out.push(u8::try_from(peer_id.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(&peer_id);
        match self.data_addr.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&self.data_addr.port().to_be_bytes());
        out.extend_from_slice(&self.link_rate.to_be_bytes());
        let addrs: Vec<Vec<u8>> = self
            .p2p_addrs
            .iter()
            .map(Multiaddr::to_vec)
            .filter(|bytes| bytes.len() <= ANNOUNCEMENT_ADDR_BYTES_MAX)
            .take(ANNOUNCEMENT_ADDRS_MAX)
            .collect();
        out.push(u8::try_from(addrs.len()).unwrap_or(0));
        for bytes in addrs {
            out.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(&bytes);
        }
        debug_assert!(out.len() <= ANNOUNCEMENT_BYTES_MAX);
        out
    }

    /// Decodes bytes from a peer; the length is checked before anything else.
    pub fn decode(bytes: &[u8]) -> Result<Self, AnnouncementError> {
        if bytes.len() > ANNOUNCEMENT_BYTES_MAX {
            return Err(AnnouncementError::TooLong { bytes: bytes.len() });
        }
        let mut reader = Reader(bytes);
        let version = reader.u8()?;
        if version != ANNOUNCEMENT_VERSION {
            return Err(AnnouncementError::Version(version));
        }
        let kind = match reader.u8()? {
            0 => AnnouncementKind::Alive,
            1 => AnnouncementKind::Leave,
            _ => return Err(AnnouncementError::Invalid("kind")),
        };
        let peer_id_len = usize::from(reader.u8()?);
        if peer_id_len > PEER_ID_BYTES_MAX {
            return Err(AnnouncementError::Invalid("peer id length"));
        }
        let peer_id =
            PeerId::from_bytes(reader.take(peer_id_len)?).map_err(|_| AnnouncementError::Invalid("peer id"))?;
        let ip = match reader.u8()? {
            4 => {
                let octets: [u8; 4] = reader.take(4)?.try_into().map_err(|_| AnnouncementError::Truncated)?;
                IpAddr::from(octets)
            }
            6 => {
                let octets: [u8; 16] = reader.take(16)?.try_into().map_err(|_| AnnouncementError::Truncated)?;
                IpAddr::from(octets)
            }
            _ => return Err(AnnouncementError::Invalid("data address family")),
        };
        let port = reader.u16()?;
        let link_rate = u64::from_be_bytes(reader.take(8)?.try_into().map_err(|_| AnnouncementError::Truncated)?);
        let count = usize::from(reader.u8()?);
        if count > ANNOUNCEMENT_ADDRS_MAX {
            return Err(AnnouncementError::Invalid("address count"));
        }
        let mut p2p_addrs = Vec::with_capacity(count);
        for _ in 0..count {
            let len = usize::from(reader.u16()?);
            if len > ANNOUNCEMENT_ADDR_BYTES_MAX {
                return Err(AnnouncementError::Invalid("address length"));
            }
            let address = Multiaddr::try_from(reader.take(len)?.to_vec())
                .map_err(|_| AnnouncementError::Invalid("p2p address"))?;
            p2p_addrs.push(address);
        }
        if !reader.0.is_empty() {
            return Err(AnnouncementError::Trailing(reader.0.len()));
        }
        Ok(Self { kind, peer_id, data_addr: SocketAddr::new(ip, port), link_rate, p2p_addrs })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], AnnouncementError> {
        if self.0.len() < len {
            return Err(AnnouncementError::Truncated);
        }
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, AnnouncementError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, AnnouncementError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }
}

// ---------------------------------------------------------------------------------------
// Membership: the decision logic, without sockets or clocks.

/// A live member of the DC, as last announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its identity.
    pub peer_id: PeerId,
    /// Where its data plane listens.
    pub data_addr: SocketAddr,
    /// Its announced link rate in bytes per second; 0 when not set.
    pub link_rate: u64,
    /// When its last announcement arrived.
    pub last_seen: Instant,
}

/// What an announcement did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipUpdate {
    /// A new member.
    Joined,
    /// A known member announced again.
    Refreshed,
    /// A member left.
    Left,
    /// Nothing changed, for this reason.
    Ignored(IgnoredReason),
}

/// Why an announcement changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoredReason {
    /// The message was signed by another peer than the one it names.
    SourceMismatch,
    /// It names this node.
    Local,
    /// A leave from a node that was not a member.
    NotAMember,
    /// The table holds [`MEMBERS_MAX`] members.
    TableFull,
    /// Older than an announcement already applied from the same peer: a gossip peer
    /// re-delivered it, possibly after the node left (a node that joins is sent the
    /// messages its gossip peers saw in the last seconds, in no particular order).
    Stale,
}

impl MembershipUpdate {
    fn label(self) -> &'static str {
        match self {
            Self::Joined => "joined",
            Self::Refreshed => "refreshed",
            Self::Left => "left",
            Self::Ignored(IgnoredReason::SourceMismatch) => "source_mismatch",
            Self::Ignored(IgnoredReason::Local) => "local",
            Self::Ignored(IgnoredReason::NotAMember) => "not_a_member",
            Self::Ignored(IgnoredReason::TableFull) => "table_full",
            Self::Ignored(IgnoredReason::Stale) => "stale",
        }
    }
}

/// The DC's members as this node knows them: fed announcements and the time, drained by
/// [`Membership::members`]. Holds at most [`MEMBERS_MAX`] members, never this node.
///
/// Announcements are applied in each sender's order: gossipsub numbers a sender's messages
/// (from its start time in nanoseconds, then one by one, so a restarted node numbers above
/// its previous run), and one numbered at or below the last applied from that peer is
/// ignored. Without that, a node that left could be re-added by its last "alive" arriving
/// after its "leave": measured in a 16-node storm, a node restarted on an empty data dir
/// took its predecessor for a member for 6 s, waited 5 s to reach it as two chunks' home,
/// and those chunks left the origin twice. (A node restarted after its clock stepped back
/// numbers below its previous run; it is taken back once its old number is forgotten,
/// [`SEQUENCE_MEMORY`] after it stopped being a member.)
#[derive(Debug)]
pub struct Membership {
    local: PeerId,
    members: HashMap<PeerId, Member>,
    /// Per peer, the sequence number of the last announcement applied and when it came.
    sequences: HashMap<PeerId, (u64, Instant)>,
}

impl Membership {
    /// An empty table for the node `local`.
    pub fn new(local: PeerId) -> Self {
        Self { local, members: HashMap::new(), sequences: HashMap::new() }
    }

    /// Whether `peer` is a member.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.members.contains_key(peer)
    }

    /// Removes `peer` (its connection broke); true when it was a member.
    pub fn remove(&mut self, peer: &PeerId) -> bool {
        self.members.remove(peer).is_some()
    }

    /// Applies an announcement signed by `source`, numbered `sequence` by it (gossipsub's
    /// sequence number; `None` applies it in no order), received at `now`; ignores it when
    /// an announcement numbered as high or higher from `source` was applied before.
    pub fn handle_numbered(
        &mut self,
        now: Instant,
        source: PeerId,
        sequence: Option<u64>,
        announcement: &Announcement,
    ) -> MembershipUpdate {
        if announcement.peer_id != source {
            return MembershipUpdate::Ignored(IgnoredReason::SourceMismatch);
        }
        if source == self.local {
            return MembershipUpdate::Ignored(IgnoredReason::Local);
        }
        if let Some(sequence) = sequence {
            let room = self.sequences.len() < SEQUENCES_MAX;
            match self.sequences.get_mut(&source) {
                Some((last, _)) if sequence <= *last => return MembershipUpdate::Ignored(IgnoredReason::Stale),
                Some(entry) => *entry = (sequence, now),
                // Past the bound the peer's announcements are applied unordered, as before.
                None if room => {
                    self.sequences.insert(source, (sequence, now));
                }
                None => {}
            }
        }
        match announcement.kind {
            AnnouncementKind::Leave => match self.members.remove(&source) {
                Some(_) => MembershipUpdate::Left,
                None => MembershipUpdate::Ignored(IgnoredReason::NotAMember),
            },
            AnnouncementKind::Alive => {
                if let Some(member) = self.members.get_mut(&source) {
                    member.data_addr = announcement.data_addr;
                    member.link_rate = announcement.link_rate;
                    member.last_seen = member.last_seen.max(now);
                    return MembershipUpdate::Refreshed;
                }
                if self.members.len() >= MEMBERS_MAX {
                    return MembershipUpdate::Ignored(IgnoredReason::TableFull);
                }
                self.members.insert(
                    source,
                    Member {
                        peer_id: source,
                        data_addr: announcement.data_addr,
                        link_rate: announcement.link_rate,
                        last_seen: now,
                    },
                );
                MembershipUpdate::Joined
            }
        }
    }

    /// Drops members not heard from for [`MEMBER_EXPIRY`], and the sequence numbers of
    /// non-members older than [`SEQUENCE_MEMORY`]; returns the members dropped.
    pub fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        let mut expired = Vec::new();
        self.members.retain(|peer_id, member| {
            let live = now.saturating_duration_since(member.last_seen) < MEMBER_EXPIRY;
            if !live {
                expired.push(*peer_id);
            }
            live
        });
        let members = &self.members;
        self.sequences.retain(|peer_id, (_, at)| {
            members.contains_key(peer_id) || now.saturating_duration_since(*at) < SEQUENCE_MEMORY
        });
        expired
    }

    /// The members, ordered by peer id.
    pub fn members(&self) -> Vec<Member> {
        let mut members: Vec<Member> = self.members.values().cloned().collect();
        members.sort_by_key(|member| member.peer_id);
        members
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

// ---------------------------------------------------------------------------------------
// The provider store.

/// Kademlia's record store, bounded for a DC. Replaces libp2p's `MemoryStore`, which keeps
/// an inline array of K provider records per key (measured: 3056 bytes per key even when a
/// key has one provider, so 100k keys cost 300 MiB) and cannot say how many provider
/// records it holds. Here a key costs its providers only, provider addresses are not kept
/// (peers are reached through membership's data-plane addresses, and Kademlia finds a
/// provider's p2p address through its routing table), and every count is exact.
///
/// Limits: [`DHT_PROVIDED_KEYS_MAX`] keys of this node's own, [`DHT_PROVIDER_KEYS_MAX`] keys
/// in all for other providers' records, [`DHT_PROVIDERS_PER_KEY_MAX`] providers per key
/// (this node's record always fits: it displaces another's), [`DHT_PROVIDER_RECORDS_MAX`]
/// records in all, and [`DHT_RECORDS_MAX`] value records.
struct ProviderStore {
    local: PeerId,
    records: HashMap<RecordKey, Record>,
    providers: HashMap<RecordKey, Vec<ProviderRecord>>,
    /// This node's own records, also present in `providers`.
    provided: HashMap<RecordKey, ProviderRecord>,
    provider_records: usize,
}

impl fmt::Debug for ProviderStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderStore")
            .field("provider_keys", &self.providers.len())
            .field("provider_records", &self.provider_records)
            .field("provided_keys", &self.provided.len())
            .finish_non_exhaustive()
    }
}

impl ProviderStore {
    /// An empty store for the node `local`.
    fn new(local: PeerId) -> Self {
        Self {
            local,
            records: HashMap::new(),
            providers: HashMap::new(),
            provided: HashMap::new(),
            provider_records: 0,
        }
    }

    /// Provider records held, this node's own included.
    fn provider_records(&self) -> usize {
        self.provider_records
    }

    /// Keys with at least one provider record.
    fn provider_keys(&self) -> usize {
        self.providers.len()
    }

    /// Keys this node provides.
    fn provided_keys(&self) -> usize {
        self.provided.len()
    }

    /// Value records held.
    fn value_records(&self) -> usize {
        self.records.len()
    }

    /// Whether this node provides `key`.
    fn is_provided(&self, key: &RecordKey) -> bool {
        self.provided.contains_key(key)
    }
}

type ProvidedIter<'a> = std::iter::Map<
    std::collections::hash_map::Values<'a, RecordKey, ProviderRecord>,
    fn(&'a ProviderRecord) -> Cow<'a, ProviderRecord>,
>;
type RecordsIter<'a> =
    std::iter::Map<std::collections::hash_map::Values<'a, RecordKey, Record>, fn(&'a Record) -> Cow<'a, Record>>;

impl RecordStore for ProviderStore {
    type RecordsIter<'a> = RecordsIter<'a>;
    type ProvidedIter<'a> = ProvidedIter<'a>;

    fn get(&self, key: &RecordKey) -> Option<Cow<'_, Record>> {
        self.records.get(key).map(Cow::Borrowed)
    }

    fn put(&mut self, record: Record) -> store::Result<()> {
        if record.value.len() > DHT_RECORD_VALUE_BYTES_MAX {
            return Err(store::Error::ValueTooLarge);
        }
        if !self.records.contains_key(&record.key) && self.records.len() >= DHT_RECORDS_MAX {
            return Err(store::Error::MaxRecords);
        }
        self.records.insert(record.key.clone(), record);
        Ok(())
    }

    fn remove(&mut self, key: &RecordKey) {
        self.records.remove(key);
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.records.values().map(Cow::Borrowed)
    }

    fn add_provider(&mut self, mut record: ProviderRecord) -> store::Result<()> {
        let is_local = record.provider == self.local;
        // Addresses are not needed (see the type's notes) and would be the bulk of a record.
        record.addresses = Vec::new();
        let key_known = self.providers.contains_key(&record.key);
        if is_local {
            if !self.provided.contains_key(&record.key) && self.provided.len() >= DHT_PROVIDED_KEYS_MAX {
                return Err(store::Error::MaxProvidedKeys);
            }
        } else if !key_known && self.providers.len() >= DHT_PROVIDER_KEYS_MAX {
            return Err(store::Error::MaxProvidedKeys);
        }
        // Most keys have one provider; a default Vec would reserve room for four.
        let providers = self.providers.entry(record.key.clone()).or_insert_with(|| Vec::with_capacity(1));
        if let Some(existing) = providers.iter_mut().find(|existing| existing.provider == record.provider) {
            *existing = record.clone();
        } else if is_local {
            if providers.len() >= DHT_PROVIDERS_PER_KEY_MAX
                && let Some(position) = providers.iter().position(|existing| existing.provider != self.local)
            {
                providers.swap_remove(position);
                self.provider_records -= 1;
            }
            providers.push(record.clone());
            self.provider_records += 1;
        } else if providers.len() < DHT_PROVIDERS_PER_KEY_MAX && self.provider_records < DHT_PROVIDER_RECORDS_MAX {
            providers.push(record.clone());
            self.provider_records += 1;
        } else if providers.is_empty() {
            // Refused a new key's only record: do not leave an empty entry behind.
            self.providers.remove(&record.key);
            return Err(store::Error::MaxProvidedKeys);
        }
        // Else the key is full: the record is ignored, as libp2p's MemoryStore does, which
        // also keeps a flood of records for one key from crowding out the others.
        if is_local {
            self.provided.insert(record.key.clone(), record);
        }
        Ok(())
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.providers.get(key).cloned().unwrap_or_default()
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.provided.values().map(Cow::Borrowed)
    }

    fn remove_provider(&mut self, key: &RecordKey, provider: &PeerId) {
        if let Some(providers) = self.providers.get_mut(key) {
            if let Some(position) = providers.iter().position(|existing| &existing.provider == provider) {
                providers.swap_remove(position);
                self.provider_records -= 1;
            }
            if providers.is_empty() {
                self.providers.remove(key);
            }
        }
        if provider == &self.local {
            self.provided.remove(key);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Publications waiting for a slot (or for the first peer).

/// Keys to publish as provided, in order, each once, at most [`DHT_PROVIDED_KEYS_MAX`].
#[derive(Debug, Default)]
struct PublishQueue {
    order: VecDeque<RecordKey>,
    queued: HashSet<RecordKey>,
}

impl PublishQueue {
    /// Queues `key`; false when it is already queued or the queue is full.
    fn push(&mut self, key: RecordKey) -> bool {
        if self.queued.contains(&key) || self.queued.len() >= DHT_PROVIDED_KEYS_MAX {
            return false;
        }
        if self.order.len() >= DHT_PROVIDED_KEYS_MAX {
            // Only removed keys can make `order` longer than `queued`: drop them.
            let queued = &self.queued;
            self.order.retain(|key| queued.contains(key));
        }
        self.queued.insert(key.clone());
        self.order.push_back(key);
        true
    }

    fn remove(&mut self, key: &RecordKey) {
        self.queued.remove(key);
    }

    fn pop(&mut self) -> Option<RecordKey> {
        while let Some(key) = self.order.pop_front() {
            if self.queued.remove(&key) {
                return Some(key);
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.queued.len()
    }

    fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }
}

// ---------------------------------------------------------------------------------------
// The swarm.

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<ProviderStore>,
    identify: identify::Behaviour,
    gossipsub: gossipsub::Behaviour,
}

struct Protocols {
    kad: StreamProtocol,
    identify_version: String,
    members_topic: IdentTopic,
    volumes_topic: IdentTopic,
}

impl Protocols {
    fn for_dc(dc: &str) -> Result<Self, DiscoveryError> {
        let invalid = |reason| DiscoveryError::InvalidDc { dc: dc.to_string(), reason };
        if dc.is_empty() || dc.len() > DC_NAME_BYTES_MAX {
            return Err(invalid("a DC name is 1 to 64 characters"));
        }
        if !dc.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.')) {
            return Err(invalid("a DC name holds only letters, digits, '-', '_' and '.'"));
        }
        let kad = StreamProtocol::try_from_owned(format!("/cachemesh/{dc}/kad/1.0.0"))
            .map_err(|_| invalid("not usable in a protocol name"))?;
        Ok(Self {
            kad,
            identify_version: format!("/cachemesh/{dc}/id/1.0.0"),
            members_topic: IdentTopic::new(format!("/cachemesh/{dc}/members/1")),
            volumes_topic: IdentTopic::new(format!("/cachemesh/{dc}/volumes/1")),
        })
    }
}

fn build_error(error: impl fmt::Display) -> DiscoveryError {
    DiscoveryError::Build { detail: error.to_string() }
}

fn build_swarm(config: &DiscoveryConfig, protocols: &Protocols) -> Result<Swarm<Behaviour>, DiscoveryError> {
    let psk = PreSharedKey::new(config.private_network_key);
    let kad_protocol = protocols.kad.clone();
    let identify_version = protocols.identify_version.clone();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.identity.keypair().clone())
        .with_tokio()
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            // pnet first, on the raw socket: without the DC's key not even noise completes.
            let transport = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                .upgrade(Version::V1)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default())
                .timeout(CONNECTION_UPGRADE_TIMEOUT);
            Ok(transport)
        })
        .map_err(build_error)?
        // Resolves the /dns/ addresses that `host:port` bootstrap entries become.
        .with_dns()
        .map_err(build_error)?
        .with_behaviour(|key| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
            let peer_id = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(kad_protocol);
            kad_config
                .set_query_timeout(DHT_QUERY_TIMEOUT)
                .set_substreams_timeout(DHT_REQUEST_TIMEOUT)
                .set_provider_record_ttl(Some(PROVIDER_RECORD_TTL))
                .set_provider_publication_interval(Some(PROVIDER_PUBLICATION_INTERVAL));
            let mut kad = kad::Behaviour::with_config(peer_id, ProviderStore::new(peer_id), kad_config);
            // Every node of a DC is reachable: serve the DHT without waiting for a confirmed
            // external address (libp2p's default would keep a node a client).
            kad.set_mode(Some(Mode::Server));

            let identify = identify::Behaviour::new(
                identify::Config::new(identify_version, key.public())
                    .with_agent_version(format!("cachemesh/{}", env!("CARGO_PKG_VERSION"))),
            );

            let gossip_config = gossipsub::ConfigBuilder::default()
                .max_transmit_size(GOSSIP_TRANSMIT_BYTES_MAX)
                .validation_mode(gossipsub::ValidationMode::Strict)
                // We check each announcement before it is forwarded.
                .validate_messages()
                .build()?;
            let gossipsub =
                gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossip_config)?;
            Ok(Behaviour { kad, identify, gossipsub })
        })
        .map_err(build_error)?
        .with_swarm_config(|swarm_config| swarm_config.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    Ok(swarm)
}

// ---------------------------------------------------------------------------------------
// The handle.

/// What the discovery service needs.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// The datacenter: scopes every protocol name.
    pub dc: String,
    /// This node's identity.
    pub identity: NodeIdentity,
    /// The DC's libp2p private-network key (`ClusterKey::private_network_key(dc)`).
    pub private_network_key: [u8; 32],
    /// TCP multiaddrs to listen on (port 0 picks one; see [`Discovery::listen_addrs`]).
    pub listen: Vec<Multiaddr>,
    /// Peers to join through.
    pub bootstrap: Vec<BootstrapAddr>,
    /// Where this node's data plane listens, announced to the DC.
    pub data_addr: SocketAddr,
    /// This host's link rate in bytes per second, announced to the DC; 0 when not set.
    pub link_rate: u64,
}

/// Counters and sizes, for the API and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryStats {
    /// Provider records held for the DHT (this node's own included).
    pub provider_records_stored: usize,
    /// Keys those records are for.
    pub provider_keys_stored: usize,
    /// Objects this node provides (published or being published).
    pub provided_keys: usize,
    /// Objects waiting to be published.
    pub provide_queue: usize,
    /// Value records held (cachemesh puts none).
    pub value_records_stored: usize,
    /// Peers with an open connection.
    pub connected_peers: usize,
    /// Live members, this node excluded.
    pub members: usize,
    /// Kademlia requests answered since start.
    pub kad_inbound_requests: u64,
    /// Kademlia queries (lookups, publications, bootstraps) finished since start.
    pub kad_outbound_queries: u64,
    /// Kademlia requests those finished queries sent to peers (a publication is a
    /// closest-peers lookup plus one ADD_PROVIDER per closest peer).
    pub kad_outbound_requests: u64,
    /// Members removed because they announced that they leave.
    pub members_left: u64,
    /// Members removed because nothing was heard from them for [`MEMBER_EXPIRY`].
    pub members_expired: u64,
    /// Members removed because the last connection to them broke.
    pub members_lost: u64,
}

enum Command {
    ListenAddrs { reply: oneshot::Sender<Vec<Multiaddr>> },
    Provide { object: ObjectId },
    Unprovide { object: ObjectId },
    Providers { object: ObjectId, reply: oneshot::Sender<Vec<PeerId>> },
    Stats { reply: oneshot::Sender<DiscoveryStats> },
    AnnounceVolumeHead { head: VolumeHead },
}

/// The discovery service of one node. Cheap to clone; the service stops on shutdown or
/// when every handle is dropped, announcing that it leaves either way.
#[derive(Clone)]
pub struct Discovery {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    members: watch::Receiver<Arc<[Member]>>,
    provider_lookups: Arc<Semaphore>,
    volume_heads: broadcast::Sender<VolumeHead>,
    lost_members: broadcast::Sender<PeerId>,
    stopped: CancellationToken,
}

impl fmt::Debug for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery").field("peer_id", &self.peer_id).finish_non_exhaustive()
    }
}

impl Discovery {
    /// Builds the swarm, binds every listen address, and starts the actor; bootstrap peers
    /// are dialled from then on. Fails on a bad DC name, a transport that cannot be built,
    /// or an address that cannot be bound within a few seconds.
    pub async fn start(config: DiscoveryConfig, shutdown: CancellationToken) -> Result<Discovery, DiscoveryError> {
        let protocols = Protocols::for_dc(&config.dc)?;
        if config.listen.is_empty() {
            return Err(DiscoveryError::NoListenAddress);
        }
        let mut swarm = build_swarm(&config, &protocols)?;
        swarm.behaviour_mut().gossipsub.subscribe(&protocols.members_topic).map_err(build_error)?;
        swarm.behaviour_mut().gossipsub.subscribe(&protocols.volumes_topic).map_err(build_error)?;

        let mut pending = HashMap::new();
        for address in &config.listen {
            let listener = swarm
                .listen_on(address.clone())
                .map_err(|error| DiscoveryError::Listen { address: address.clone(), detail: error.to_string() })?;
            pending.insert(listener, address.clone());
        }
        let deadline = tokio::time::Instant::now() + LISTEN_START_TIMEOUT;
        while !pending.is_empty() {
            let event = tokio::time::timeout_at(deadline, swarm.select_next_some()).await.map_err(|_| {
                let address = pending.values().next().cloned().unwrap_or_else(Multiaddr::empty);
                DiscoveryError::Listen { address, detail: "not bound in time".to_string() }
            })?;
            match event {
                SwarmEvent::NewListenAddr { listener_id, .. } => {
                    pending.remove(&listener_id);
                }
                SwarmEvent::ListenerError { listener_id, error } => {
                    if let Some(address) = pending.remove(&listener_id) {
                        return Err(DiscoveryError::Listen { address, detail: error.to_string() });
                    }
                }
                SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                    if let Some(address) = pending.remove(&listener_id) {
                        let detail = match reason {
                            Ok(()) => "closed".to_string(),
                            Err(error) => error.to_string(),
                        };
                        return Err(DiscoveryError::Listen { address, detail });
                    }
                }
                _ => {}
            }
        }

        let peer_id = config.identity.peer_id();
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
        let (members_tx, members_rx) = watch::channel(Arc::from(Vec::new()));
        let (volume_heads, _) = broadcast::channel(VOLUME_HEADS_BUFFERED);
        let (lost_members, _) = broadcast::channel(LOST_MEMBERS_BUFFERED);
        let stopped = CancellationToken::new();
        let bootstraps = config
            .bootstrap
            .iter()
            .filter(|entry| entry.peer_id() != Some(peer_id))
            .map(|entry| BootstrapState {
                entry: entry.clone(),
                peer_id: entry.peer_id(),
                dialing: None,
                is_self: false,
            })
            .collect();
        let actor = Actor {
            swarm,
            commands: commands_rx,
            shutdown,
            local_peer_id: peer_id,
            data_addr: config.data_addr,
            link_rate: config.link_rate,
            protocols,
            membership: Membership::new(peer_id),
            members: members_tx,
            volume_heads: volume_heads.clone(),
            bootstraps,
            publish_queue: PublishQueue::default(),
            publishing: HashSet::new(),
            lookups: HashMap::new(),
            lookup_deadlines: VecDeque::new(),
            members_dirty: false,
            last_announce: None,
            kad_inbound_requests: 0,
            kad_outbound_queries: 0,
            kad_outbound_requests: 0,
            members_left: 0,
            members_expired: 0,
            members_lost: 0,
            redial: Redial::default(),
            lost_members: lost_members.clone(),
        };
        let guard = stopped.clone().drop_guard();
        tokio::spawn(async move {
            let _stopped_on_exit = guard;
            actor.run().await;
        });
        tracing::info!(%peer_id, dc = %config.dc, "discovery started");
        Ok(Discovery {
            peer_id,
            commands: commands_tx,
            members: members_rx,
            provider_lookups: Arc::new(Semaphore::new(PROVIDER_LOOKUPS_CONCURRENT_MAX)),
            volume_heads,
            lost_members,
            stopped,
        })
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses the swarm listens on (port 0 resolved); empty once stopped.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::ListenAddrs { reply }).await.is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// Announces in the DHT that this node holds (some of) `object`. Published at once when
    /// peers are known, else as soon as they are; failures are logged and counted
    /// (`cachemesh_dht_provide_refused_total`), never returned: a missing record costs
    /// peers a trip to the origin, not correctness.
    pub async fn provide(&self, object: ObjectId) {
        // A stopped service has nothing to publish to.
        let _ = self.commands.send(Command::Provide { object }).await;
    }

    /// Stops announcing `object`. Records already stored by peers expire within
    /// [`PROVIDER_RECORD_TTL`].
    pub async fn unprovide(&self, object: ObjectId) {
        let _ = self.commands.send(Command::Unprovide { object }).await;
    }

    /// Nodes that announced they hold `object`, this node excluded: what the lookup found
    /// within [`PROVIDER_QUERY_TIMEOUT`]. Empty when none answered or the service stopped.
    pub async fn providers(&self, object: ObjectId) -> Vec<PeerId> {
        let Ok(_permit) = self.provider_lookups.acquire().await else {
            return Vec::new();
        };
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Providers { object, reply }).await.is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// The live members of the DC, this node excluded, ordered by peer id.
    pub fn members(&self) -> Vec<Member> {
        let now = Instant::now();
        self.members
            .borrow()
            .iter()
            .filter(|member| now.saturating_duration_since(member.last_seen) < MEMBER_EXPIRY)
            .cloned()
            .collect()
    }

    /// Sizes and counters; all zero once stopped.
    pub async fn stats(&self) -> DiscoveryStats {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Stats { reply }).await.is_err() {
            return DiscoveryStats::default();
        }
        answer.await.unwrap_or_default()
    }

    /// Tells the DC that this node appended record `head.seq` to `head.volume`. Never
    /// waits: when the command channel is full the announcement is dropped (receivers
    /// still poll).
    pub fn announce_volume_head(&self, head: VolumeHead) {
        if self.commands.try_send(Command::AnnounceVolumeHead { head }).is_err() {
            metrics::counter!("cachemesh_volume_heads_sent_total", "outcome" => "dropped").increment(1);
        }
    }

    /// Volume heads announced by other nodes of the DC, from now on. A receiver that falls
    /// more than [`VOLUME_HEADS_BUFFERED`] behind loses the oldest (it sees `Lagged`).
    pub fn volume_heads(&self) -> broadcast::Receiver<VolumeHead> {
        self.volume_heads.subscribe()
    }

    /// Members whose last connection broke, from now on (they were dropped from the table).
    pub fn lost_members(&self) -> broadcast::Receiver<PeerId> {
        self.lost_members.subscribe()
    }

    /// Waits until the service has announced its leave and closed its connections.
    pub async fn stopped(&self) {
        self.stopped.cancelled().await;
    }
}

/// Describes the metrics this module exports; call once after installing the recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(
        "cachemesh_dht_provider_records",
        "Provider records this node stores for the DHT, its own included."
    );
    describe_gauge!("cachemesh_dht_provider_keys", "Object keys with provider records stored on this node.");
    describe_gauge!("cachemesh_dht_provided_keys", "Objects this node announces as provided.");
    describe_gauge!("cachemesh_dht_provide_queue", "Objects waiting to be published as provided.");
    describe_gauge!("cachemesh_p2p_connected_peers", "Peers with an open discovery connection.");
    describe_gauge!(
        "cachemesh_p2p_lost_peers",
        "Peers whose discovery connection broke and that are being dialled again."
    );
    describe_counter!("cachemesh_p2p_redials_total", "Dials to peers whose discovery connection broke.");
    describe_gauge!("cachemesh_members", "Live members of the DC, this node excluded.");
    describe_counter!("cachemesh_dht_inbound_requests_total", "Kademlia requests answered, by kind.");
    describe_counter!("cachemesh_dht_outbound_queries_total", "Kademlia queries finished, by kind.");
    describe_counter!("cachemesh_dht_provide_refused_total", "Objects that could not be announced, by reason.");
    describe_counter!("cachemesh_membership_announcements_total", "Announcements received, by outcome.");
    describe_counter!(
        "cachemesh_members_lost_total",
        "Members dropped at once because the last connection to them broke (not by leave or expiry)."
    );
    describe_counter!("cachemesh_volume_heads_sent_total", "Volume head announcements, by outcome.");
    describe_counter!("cachemesh_volume_heads_received_total", "Volume head announcements received, by outcome.");
    describe_counter!(
        "cachemesh_p2p_inbound_connections_failed_total",
        "Inbound discovery connections that failed to set up, such as peers without the DC's key."
    );
}

// ---------------------------------------------------------------------------------------
// The actor.

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

struct BootstrapState {
    entry: BootstrapAddr,
    /// Known from the entry or learned on the first connection.
    peer_id: Option<PeerId>,
    dialing: Option<ConnectionId>,
    /// The entry turned out to be this node.
    is_self: bool,
}

struct Lookup {
    reply: oneshot::Sender<Vec<PeerId>>,
    found: Vec<PeerId>,
}

struct Actor {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
    local_peer_id: PeerId,
    data_addr: SocketAddr,
    link_rate: u64,
    protocols: Protocols,
    membership: Membership,
    members: watch::Sender<Arc<[Member]>>,
    volume_heads: broadcast::Sender<VolumeHead>,
    bootstraps: Vec<BootstrapState>,
    publish_queue: PublishQueue,
    /// `start_providing` queries in flight, at most [`PROVIDE_QUERIES_CONCURRENT_MAX`].
    publishing: HashSet<QueryId>,
    /// `providers` lookups waiting for answers, at most [`PROVIDER_LOOKUPS_CONCURRENT_MAX`]
    /// (the handle's semaphore).
    lookups: HashMap<QueryId, Lookup>,
    /// When each entry of `lookups` must answer; in start order, since every lookup has
    /// the same [`PROVIDER_QUERY_TIMEOUT`].
    lookup_deadlines: VecDeque<(tokio::time::Instant, QueryId)>,
    /// Members were refreshed since the handles' snapshot was last replaced.
    members_dirty: bool,
    last_announce: Option<Instant>,
    kad_inbound_requests: u64,
    kad_outbound_queries: u64,
    kad_outbound_requests: u64,
    members_left: u64,
    members_expired: u64,
    members_lost: u64,
    lost_members: broadcast::Sender<PeerId>,
    /// Lost peers to dial again, and members' addresses to dial them at.
    redial: Redial,
}

impl Actor {
    async fn run(mut self) {
        let mut announce = tokio::time::interval(ANNOUNCE_INTERVAL);
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut redial = tokio::time::interval(BOOTSTRAP_RETRY_INTERVAL);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_lookup_deadline = self.lookup_deadlines.front().map(|(deadline, _)| *deadline);
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    None => break,
                },
                event = self.swarm.select_next_some() => {
                    if self.handle_swarm_event(event) {
                        // A peer subscribed: answer with an announcement soon, at most one
                        // per ANNOUNCE_GAP_MIN.
                        let earliest = self.last_announce.map_or_else(Instant::now, |last| last + ANNOUNCE_GAP_MIN);
                        announce.reset_at(tokio::time::Instant::from_std(earliest));
                    }
                }
                () = sleep_until_some(next_lookup_deadline) => self.expire_lookups(),
                _ = announce.tick() => self.announce(AnnouncementKind::Alive),
                _ = redial.tick() => {
                    self.redial_bootstraps();
                    self.redial_lost();
                }
                _ = housekeeping.tick() => self.housekeeping(),
            }
        }
        self.leave().await;
    }

    async fn leave(&mut self) {
        self.announce(AnnouncementKind::Leave);
        // Handles that outlive the service see no members rather than a frozen table.
        self.members.send_replace(Arc::from(Vec::new()));
        for (_, lookup) in self.lookups.drain() {
            let _ = lookup.reply.send(lookup.found);
        }
        let swarm = &mut self.swarm;
        // Drive the swarm so the leave message is written out; no event says it was.
        let _ = tokio::time::timeout(LEAVE_FLUSH_TIMEOUT, async {
            loop {
                swarm.select_next_some().await;
            }
        })
        .await;
        tracing::info!(peer_id = %self.local_peer_id, "discovery stopped");
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Provide { object } => self.provide(RecordKey::from(object.as_bytes().to_vec())),
            Command::Unprovide { object } => {
                let key = RecordKey::from(object.as_bytes().to_vec());
                self.publish_queue.remove(&key);
                self.swarm.behaviour_mut().kad.stop_providing(&key);
            }
            Command::Providers { object, reply } => {
                let key = RecordKey::from(object.as_bytes().to_vec());
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                self.lookups.insert(id, Lookup { reply, found: Vec::new() });
                self.lookup_deadlines.push_back((tokio::time::Instant::now() + PROVIDER_QUERY_TIMEOUT, id));
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Command::AnnounceVolumeHead { head } => {
                let topic = self.protocols.volumes_topic.clone();
                let outcome = match self.swarm.behaviour_mut().gossipsub.publish(topic, head.encode()) {
                    Ok(_) => "sent",
                    // Alone in the DC: nobody to tell.
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => "no_peers",
                    Err(error) => {
                        tracing::debug!(%error, volume = %head.volume, "volume head announcement not sent");
                        "failed"
                    }
                };
                metrics::counter!("cachemesh_volume_heads_sent_total", "outcome" => outcome).increment(1);
            }
        }
    }

    fn stats(&mut self) -> DiscoveryStats {
        let connected_peers = self.swarm.connected_peers().count();
        let store = self.swarm.behaviour_mut().kad.store_mut();
        DiscoveryStats {
            provider_records_stored: store.provider_records(),
            provider_keys_stored: store.provider_keys(),
            provided_keys: store.provided_keys() + self.publish_queue.len(),
            provide_queue: self.publish_queue.len(),
            value_records_stored: store.value_records(),
            connected_peers,
            members: self.membership.len(),
            kad_inbound_requests: self.kad_inbound_requests,
            kad_outbound_queries: self.kad_outbound_queries,
            kad_outbound_requests: self.kad_outbound_requests,
            members_left: self.members_left,
            members_expired: self.members_expired,
            members_lost: self.members_lost,
        }
    }

    fn provide(&mut self, key: RecordKey) {
        if self.swarm.behaviour_mut().kad.store_mut().is_provided(&key) {
            return;
        }
        if !self.publish_queue.push(key) {
            if self.publish_queue.len() >= DHT_PROVIDED_KEYS_MAX {
                tracing::warn!("the provide queue is full; an object is not announced");
                metrics::counter!("cachemesh_dht_provide_refused_total", "reason" => "queue_full").increment(1);
            }
            return;
        }
        self.pump_publications();
    }

    /// Starts queued publications while slots are free and the routing table has peers
    /// (a publication without peers would reach nobody until the next republication).
    fn pump_publications(&mut self) {
        if self.publish_queue.is_empty() || self.publishing.len() >= PROVIDE_QUERIES_CONCURRENT_MAX {
            return;
        }
        let kad = &mut self.swarm.behaviour_mut().kad;
        if !kad.kbuckets().any(|bucket| bucket.num_entries() > 0) {
            return;
        }
        while self.publishing.len() < PROVIDE_QUERIES_CONCURRENT_MAX {
            let Some(key) = self.publish_queue.pop() else { break };
            match kad.start_providing(key) {
                Ok(id) => {
                    self.publishing.insert(id);
                }
                Err(error) => {
                    tracing::warn!(%error, "an object could not be announced");
                    metrics::counter!("cachemesh_dht_provide_refused_total", "reason" => "store_full").increment(1);
                }
            }
        }
    }

    fn expire_lookups(&mut self) {
        let now = tokio::time::Instant::now();
        while let Some(&(deadline, id)) = self.lookup_deadlines.front() {
            if deadline > now {
                break;
            }
            self.lookup_deadlines.pop_front();
            self.finish_lookup(id);
        }
    }

    fn finish_lookup(&mut self, id: QueryId) {
        if let Some(lookup) = self.lookups.remove(&id) {
            self.lookup_deadlines.retain(|(_, pending)| *pending != id);
            if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                query.finish();
            }
            let _ = lookup.reply.send(lookup.found);
        }
    }

    fn announcement(&mut self, kind: AnnouncementKind) -> Announcement {
        Announcement {
            kind,
            peer_id: self.local_peer_id,
            data_addr: self.data_addr,
            link_rate: self.link_rate,
            p2p_addrs: routable_addrs(self.swarm.listeners().cloned()),
        }
    }

    fn announce(&mut self, kind: AnnouncementKind) {
        let bytes = self.announcement(kind).encode();
        let topic = self.protocols.members_topic.clone();
        self.last_announce = Some(Instant::now());
        match self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
            Ok(_) => {}
            // Alone, or before any peer has subscribed: nothing to do.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
            Err(error) => tracing::debug!(%error, "membership announcement not sent"),
        }
    }

    fn redial_bootstraps(&mut self) {
        if self.swarm.connected_peers().count() >= BOOTSTRAP_REDIAL_BELOW_PEERS {
            return;
        }
        for bootstrap in &mut self.bootstraps {
            if bootstrap.is_self || bootstrap.dialing.is_some() {
                continue;
            }
            if bootstrap.peer_id.is_some_and(|peer_id| self.swarm.is_connected(&peer_id)) {
                continue;
            }
            let address = bootstrap.entry.address().clone();
            let options = match bootstrap.peer_id {
                Some(peer_id) => DialOpts::peer_id(peer_id).addresses(vec![address]).build(),
                None => DialOpts::unknown_peer_id().address(address).build(),
            };
            let connection_id = options.connection_id();
            match self.swarm.dial(options) {
                Ok(()) => bootstrap.dialing = Some(connection_id),
                Err(error) => tracing::debug!(bootstrap = %bootstrap.entry, %error, "bootstrap dial not started"),
            }
        }
    }

    /// Dials the lost peers that are due ([`Redial`]): how the two sides of a healed
    /// partition find each other again once their connections were given up.
    fn redial_lost(&mut self) {
        let (membership, swarm) = (&self.membership, &self.swarm);
        self.redial.prune(|peer| membership.contains(peer) || swarm.is_connected(peer));
        for (peer_id, addrs) in self.redial.due(Instant::now()) {
            let options =
                DialOpts::peer_id(peer_id).addresses(addrs).condition(PeerCondition::DisconnectedAndNotDialing).build();
            metrics::counter!("cachemesh_p2p_redials_total").increment(1);
            if let Err(error) = self.swarm.dial(options) {
                tracing::debug!(%peer_id, %error, "redial of a lost peer not started");
            }
        }
    }

    fn housekeeping(&mut self) {
        let expired = self.membership.expire(Instant::now());
        self.members_expired += expired.len() as u64;
        if !expired.is_empty() {
            tracing::info!(?expired, "members expired");
        }
        if !expired.is_empty() || self.members_dirty {
            self.publish_members();
        }
        self.pump_publications();
        let connected_peers = self.swarm.connected_peers().count();
        let store = self.swarm.behaviour_mut().kad.store_mut();
        metrics::gauge!("cachemesh_dht_provider_records").set(store.provider_records() as f64);
        metrics::gauge!("cachemesh_dht_provider_keys").set(store.provider_keys() as f64);
        metrics::gauge!("cachemesh_dht_provided_keys").set(store.provided_keys() as f64);
        metrics::gauge!("cachemesh_dht_provide_queue").set(self.publish_queue.len() as f64);
        metrics::gauge!("cachemesh_p2p_connected_peers").set(connected_peers as f64);
        metrics::gauge!("cachemesh_p2p_lost_peers").set(self.redial.lost_count() as f64);
        metrics::gauge!("cachemesh_members").set(self.membership.len() as f64);
    }

    fn publish_members(&mut self) {
        self.members_dirty = false;
        let members: Arc<[Member]> = Arc::from(self.membership.members());
        self.members.send_replace(members);
    }

    /// Handles one swarm event; true when a peer subscribed to the membership topic.
    fn handle_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) -> bool {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.handle_kad_event(event),
            // pnet already admitted the peer; checking its protocols keeps other libp2p
            // services that might share the key (none today) out of our routing table.
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }))
                if info.protocol_version == self.protocols.identify_version
                    && info.protocols.contains(&self.protocols.kad) =>
            {
                // Its loopback addresses are its own only if we reached it over loopback.
                let over_loopback = is_loopback(&info.observed_addr);
                let kad = &mut self.swarm.behaviour_mut().kad;
                for address in info
                    .listen_addrs
                    .into_iter()
                    .filter(|address| over_loopback || !is_loopback(address))
                    .take(IDENTIFY_ADDRS_MAX)
                {
                    kad.add_address(&peer_id, address);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(_)) => {}
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => return self.handle_gossip_event(event),
            // The last connection to a member broke (not closed for idleness): the process
            // died or the network between us did. Drop it from the table at once, rather than
            // after MEMBER_EXPIRY, and tell the handles, so that requests in flight to it can
            // be abandoned; its next announcement adds it back.
            // A member may have expired before its connection broke (announcements stop
            // at once in a cut, TCP gives up later): it is redialled all the same.
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, cause: Some(cause), .. } => {
                if self.redial.broke(peer_id, Instant::now()) {
                    tracing::debug!(%peer_id, "lost peer will be dialled again");
                }
                if self.membership.remove(&peer_id) {
                    self.members_lost += 1;
                    metrics::counter!("cachemesh_members_lost_total").increment(1);
                    tracing::info!(%peer_id, %cause, "member lost: its connection broke");
                    self.publish_members();
                    let _ = self.lost_members.send(peer_id);
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                self.redial.connected(&peer_id);
                let mut joined_bootstrap = false;
                for bootstrap in &mut self.bootstraps {
                    if bootstrap.dialing == Some(connection_id) {
                        bootstrap.dialing = None;
                        bootstrap.peer_id = Some(peer_id);
                        joined_bootstrap = true;
                    }
                }
                if joined_bootstrap {
                    tracing::info!(%peer_id, address = %endpoint.get_remote_address(), "connected to a bootstrap peer");
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    kad.add_address(&peer_id, endpoint.get_remote_address().clone());
                    // Fill the routing table now rather than at the periodic bootstrap.
                    if let Err(error) = kad.bootstrap() {
                        tracing::debug!(%error, "kademlia bootstrap not started");
                    }
                    self.pump_publications();
                }
            }
            SwarmEvent::OutgoingConnectionError { connection_id, error, .. } => {
                for bootstrap in &mut self.bootstraps {
                    if bootstrap.dialing == Some(connection_id) {
                        bootstrap.dialing = None;
                        if matches!(error, DialError::LocalPeerId { .. }) {
                            // Shared bootstrap lists name the node itself; skip it from now on.
                            bootstrap.is_self = true;
                        } else {
                            tracing::debug!(bootstrap = %bootstrap.entry, %error, "bootstrap peer unreachable");
                        }
                    }
                }
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                // Among others: peers without the DC's key fail here, in the pnet handshake.
                tracing::debug!(%send_back_addr, %error, "inbound connection refused");
                metrics::counter!("cachemesh_p2p_inbound_connections_failed_total").increment(1);
            }
            _ => {}
        }
        false
    }

    fn handle_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest { request } => {
                self.kad_inbound_requests += 1;
                let kind = match request {
                    kad::InboundRequest::FindNode { .. } => "find_node",
                    kad::InboundRequest::GetProvider { .. } => "get_providers",
                    kad::InboundRequest::AddProvider { .. } => "add_provider",
                    kad::InboundRequest::GetRecord { .. } => "get_record",
                    kad::InboundRequest::PutRecord { .. } => "put_record",
                };
                metrics::counter!("cachemesh_dht_inbound_requests_total", "kind" => kind).increment(1);
            }
            kad::Event::OutboundQueryProgressed { id, result, step, stats } => {
                if step.last {
                    self.kad_outbound_queries += 1;
                    // On the last step the stats cover the whole query, both phases of a
                    // publication included.
                    self.kad_outbound_requests += u64::from(stats.num_requests());
                    let kind = match &result {
                        QueryResult::Bootstrap(_) => "bootstrap",
                        QueryResult::GetClosestPeers(_) => "get_closest_peers",
                        QueryResult::GetProviders(_) => "get_providers",
                        QueryResult::StartProviding(_) => "start_providing",
                        QueryResult::RepublishProvider(_) => "republish_provider",
                        QueryResult::GetRecord(_) => "get_record",
                        QueryResult::PutRecord(_) => "put_record",
                        QueryResult::RepublishRecord(_) => "republish_record",
                    };
                    metrics::counter!("cachemesh_dht_outbound_queries_total", "kind" => kind).increment(1);
                }
                match result {
                    QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders { providers, .. })) => {
                        if let Some(lookup) = self.lookups.get_mut(&id) {
                            for provider in providers {
                                if provider != self.local_peer_id && !lookup.found.contains(&provider) {
                                    lookup.found.push(provider);
                                }
                            }
                            if lookup.found.len() >= PROVIDERS_RESULT_MAX {
                                self.finish_lookup(id);
                            }
                        }
                    }
                    // The record is kept and republished; peers may find it later.
                    QueryResult::StartProviding(Err(error)) => {
                        tracing::debug!(%error, "provider record publication incomplete");
                    }
                    _ => {}
                }
                if step.last {
                    if self.publishing.remove(&id) {
                        self.pump_publications();
                    }
                    self.finish_lookup(id);
                }
            }
            kad::Event::RoutingUpdated { is_new_peer: true, .. } => self.pump_publications(),
            _ => {}
        }
    }

    fn handle_announcement(
        &mut self,
        source: PeerId,
        sequence: Option<u64>,
        announcement: Announcement,
    ) -> (MessageAcceptance, &'static str) {
        let update = self.membership.handle_numbered(Instant::now(), source, sequence, &announcement);
        match update {
            MembershipUpdate::Joined => {
                tracing::info!(peer_id = %announcement.peer_id, data_addr = %announcement.data_addr, "member joined");
                self.redial.learn(announcement.peer_id, &announcement.p2p_addrs);
                let kad = &mut self.swarm.behaviour_mut().kad;
                for address in announcement.p2p_addrs {
                    kad.add_address(&announcement.peer_id, address);
                }
                self.publish_members();
            }
            MembershipUpdate::Left => {
                self.members_left += 1;
                self.redial.left(&announcement.peer_id);
                tracing::info!(peer_id = %announcement.peer_id, "member left");
                self.publish_members();
            }
            // Published at the next housekeeping tick: refreshes are the bulk of the traffic.
            MembershipUpdate::Refreshed => self.members_dirty = true,
            MembershipUpdate::Ignored(_) => {}
        }
        let acceptance = match update {
            MembershipUpdate::Ignored(IgnoredReason::SourceMismatch) => MessageAcceptance::Reject,
            _ => MessageAcceptance::Accept,
        };
        (acceptance, update.label())
    }

    fn handle_gossip_event(&mut self, event: gossipsub::Event) -> bool {
        match event {
            gossipsub::Event::Message { propagation_source, message_id, message }
                if message.topic == self.protocols.volumes_topic.hash() =>
            {
                let (acceptance, outcome) = match (VolumeHead::decode(&message.data), message.source) {
                    (Ok(head), Some(_)) => {
                        // No receiver (volumes not running yet) is not an error.
                        let _ = self.volume_heads.send(head);
                        (MessageAcceptance::Accept, "accepted")
                    }
                    (Ok(_), None) => (MessageAcceptance::Reject, "unsigned"),
                    (Err(error), _) => {
                        tracing::debug!(%error, %propagation_source, "malformed volume head announcement");
                        (MessageAcceptance::Reject, "malformed")
                    }
                };
                metrics::counter!("cachemesh_volume_heads_received_total", "outcome" => outcome).increment(1);
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
                false
            }
            gossipsub::Event::Message { propagation_source, message_id, message } => {
                let (acceptance, outcome) = if message.topic != self.protocols.members_topic.hash() {
                    (MessageAcceptance::Ignore, "wrong_topic")
                } else {
                    match (Announcement::decode(&message.data), message.source) {
                        (Ok(announcement), Some(source)) => {
                            self.handle_announcement(source, message.sequence_number, announcement)
                        }
                        (Ok(_), None) => (MessageAcceptance::Reject, "unsigned"),
                        (Err(error), _) => {
                            tracing::debug!(%error, %propagation_source, "malformed membership announcement");
                            (MessageAcceptance::Reject, "malformed")
                        }
                    }
                };
                metrics::counter!("cachemesh_membership_announcements_total", "outcome" => outcome).increment(1);
                // Only accepted announcements are forwarded to the rest of the mesh.
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
                false
            }
            gossipsub::Event::Subscribed { topic, .. } => topic == self.protocols.members_topic.hash(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    fn peer() -> PeerId {
        PeerId::random()
    }

    fn alive(peer_id: PeerId, port: u16) -> Announcement {
        Announcement {
            kind: AnnouncementKind::Alive,
            peer_id,
            data_addr: SocketAddr::from(([10, 0, 0, 1], port)),
            link_rate: 0,
            p2p_addrs: vec!["/ip4/10.0.0.1/tcp/4001".parse().unwrap()],
        }
    }

    // ---- BootstrapAddr -------------------------------------------------------------------

    #[test]
    fn bootstrap_entries_parse_as_multiaddrs_or_host_port() {
        // Goal: every documented form parses to the address dialled and the expected peer id.
        let peer_id = PeerId::from(Keypair::generate_ed25519().public());
        let full = BootstrapAddr::parse(&format!("/ip4/1.2.3.4/tcp/4001/p2p/{peer_id}")).unwrap();
        assert_eq!(full.address().to_string(), "/ip4/1.2.3.4/tcp/4001");
        assert_eq!(full.peer_id(), Some(peer_id));
        assert_eq!(full.to_string(), format!("/ip4/1.2.3.4/tcp/4001/p2p/{peer_id}"));

        let bare = BootstrapAddr::parse("/dns/cache-a.dc1/tcp/4001").unwrap();
        assert_eq!(bare.address().to_string(), "/dns/cache-a.dc1/tcp/4001");
        assert_eq!(bare.peer_id(), None);

        let cases = [
            ("10.1.2.3:4001", "/ip4/10.1.2.3/tcp/4001"),
            (" 127.0.0.1:9 ", "/ip4/127.0.0.1/tcp/9"),
            ("[fd00::1]:4001", "/ip6/fd00::1/tcp/4001"),
            ("cache-a.dc1.example:4001", "/dns/cache-a.dc1.example/tcp/4001"),
            ("localhost:4001", "/dns/localhost/tcp/4001"),
        ];
        for (text, expected) in cases {
            let parsed: BootstrapAddr = text.parse().unwrap();
            assert_eq!(parsed.address().to_string(), expected, "{text}");
            assert_eq!(parsed.peer_id(), None, "{text}");
        }
    }

    #[test]
    fn bootstrap_entries_that_cannot_be_dialled_are_refused() {
        // Goal: a typo gives an error naming the entry, never a node that silently joins nothing.
        for text in [
            "",
            "host",
            "host:",
            ":4001",
            "host:0",
            "host:65536",
            "host:port",
            "fd00::1:4001",
            "[fd00::1:4001",
            "-bad:1",
            "a b:1",
        ] {
            assert!(matches!(BootstrapAddr::parse(text), Err(BootstrapAddrError::HostPort { .. })), "{text:?}");
        }
        assert!(matches!(BootstrapAddr::parse("/ip4/1.2.3.4/udp/1/quic-v1"), Err(BootstrapAddrError::NotTcp { .. })));
        assert!(matches!(BootstrapAddr::parse("/ip4/1.2.3.4"), Err(BootstrapAddrError::NotTcp { .. })));
        assert!(matches!(
            BootstrapAddr::parse("/ip4/1.2.3.4/tcp/1/p2p/garbage"),
            Err(BootstrapAddrError::Multiaddr { .. })
        ));
        assert!(matches!(BootstrapAddr::parse("/nonsense"), Err(BootstrapAddrError::Multiaddr { .. })));
    }

    #[test]
    fn listen_addresses_parse_as_ip_port_or_tcp_multiaddrs() {
        // Goal: the forms config accepts for p2p_listen become TCP multiaddrs; port 0 is fine
        // for listening; names and peer ids are not listen addresses.
        let cases = [
            ("0.0.0.0:7946", "/ip4/0.0.0.0/tcp/7946"),
            ("127.0.0.1:0", "/ip4/127.0.0.1/tcp/0"),
            ("[::]:7946", "/ip6/::/tcp/7946"),
            ("/ip4/10.0.0.1/tcp/7946", "/ip4/10.0.0.1/tcp/7946"),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_listen_addr(text).unwrap().to_string(), expected, "{text}");
        }
        let peer_id = PeerId::random();
        for text in ["host:7946", "/dns/host/tcp/1", "/ip4/1.2.3.4/udp/1", &format!("/ip4/1.2.3.4/tcp/1/p2p/{peer_id}")]
        {
            assert!(parse_listen_addr(text).is_err(), "{text}");
        }
    }

    #[test]
    fn loopback_addresses_are_announced_only_when_there_is_nothing_else() {
        // Goal: a node on 0.0.0.0 does not tell other hosts to dial 127.0.0.1 (themselves).
        let addr = |text: &str| -> Multiaddr { text.parse().unwrap() };
        let mixed = [addr("/ip4/127.0.0.1/tcp/1"), addr("/ip4/10.0.0.5/tcp/1"), addr("/ip6/::1/tcp/1")];
        assert_eq!(routable_addrs(mixed.into_iter()), vec![addr("/ip4/10.0.0.5/tcp/1")]);
        let only_loopback = [addr("/ip4/127.0.0.1/tcp/1")];
        assert_eq!(routable_addrs(only_loopback.clone().into_iter()), only_loopback);
    }

    // ---- Announcements -------------------------------------------------------------------

    #[test]
    fn announcements_round_trip_and_stay_within_their_limit() {
        // Goal: both kinds, both address families and a link rate (set or not) survive
        // encoding; a node with more listen addresses than fit still produces a bounded,
        // decodable announcement.
        let peer_id = PeerId::from(Keypair::generate_ed25519().public());
        let mut announcement = alive(peer_id, 7000);
        assert_eq!(Announcement::decode(&announcement.encode()).unwrap(), announcement);
        announcement.kind = AnnouncementKind::Leave;
        announcement.data_addr = "[fd00::7]:7001".parse().unwrap();
        announcement.link_rate = 3_125_000;
        assert_eq!(Announcement::decode(&announcement.encode()).unwrap(), announcement);
        announcement.link_rate = u64::MAX;
        assert_eq!(Announcement::decode(&announcement.encode()).unwrap(), announcement);

        announcement.p2p_addrs = (0..100u16)
            .map(|port| format!("/ip6/fd00::1/tcp/{}/p2p/{peer_id}", 1000 + port).parse().unwrap())
            .collect();
        let bytes = announcement.encode();
        assert!(bytes.len() <= ANNOUNCEMENT_BYTES_MAX);
        let decoded = Announcement::decode(&bytes).unwrap();
        assert_eq!(decoded.p2p_addrs, announcement.p2p_addrs[..ANNOUNCEMENT_ADDRS_MAX]);
    }

    #[test]
    fn malformed_announcements_are_errors() {
        // Goal: bytes from a peer never panic the decoder; each defect has its own error.
        let bytes = alive(peer(), 1).encode();
        assert_eq!(
            Announcement::decode(&[1; ANNOUNCEMENT_BYTES_MAX + 1]),
            Err(AnnouncementError::TooLong { bytes: ANNOUNCEMENT_BYTES_MAX + 1 })
        );
        for len in 0..bytes.len() {
            assert!(Announcement::decode(&bytes[..len]).is_err(), "prefix of {len} bytes");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(Announcement::decode(&trailing), Err(AnnouncementError::Trailing(1)));
        let mut version = bytes.clone();
        version[0] = 9;
        assert_eq!(Announcement::decode(&version), Err(AnnouncementError::Version(9)));
        let mut kind = bytes.clone();
        kind[1] = 7;
        assert_eq!(Announcement::decode(&kind), Err(AnnouncementError::Invalid("kind")));
        let mut peer_id = bytes;
        peer_id[3] ^= 0xff;
        assert!(Announcement::decode(&peer_id).is_err());
    }

    // ---- Membership ----------------------------------------------------------------------

    #[test]
    fn members_join_refresh_and_expire_after_three_silent_intervals() {
        // Goal: a member stays while it announces and is dropped exactly MEMBER_EXPIRY after
        // its last announcement.
        let t0 = Instant::now();
        let (local, a, b) = (peer(), peer(), peer());
        let mut membership = Membership::new(local);
        assert_eq!(membership.handle_numbered(t0, a, None, &alive(a, 1)), MembershipUpdate::Joined);
        assert_eq!(membership.handle_numbered(t0, b, None, &alive(b, 2)), MembershipUpdate::Joined);
        let later = t0 + ANNOUNCE_INTERVAL;
        let refresh = Announcement { link_rate: 3_125_000, ..alive(a, 3) };
        assert_eq!(membership.handle_numbered(later, a, None, &refresh), MembershipUpdate::Refreshed);
        assert_eq!(membership.members().len(), 2);
        let a_member = membership.members().into_iter().find(|member| member.peer_id == a).unwrap();
        assert_eq!(a_member.data_addr.port(), 3, "a refresh carries the latest data address");
        assert_eq!(a_member.link_rate, 3_125_000, "and the latest link rate");
        assert_eq!(a_member.last_seen, later);

        assert!(membership.expire(t0 + MEMBER_EXPIRY - Duration::from_millis(1)).is_empty());
        assert_eq!(membership.expire(t0 + MEMBER_EXPIRY), vec![b]);
        assert!(membership.expire(later + MEMBER_EXPIRY - Duration::from_millis(1)).is_empty());
        assert_eq!(membership.expire(later + MEMBER_EXPIRY), vec![a]);
        assert!(membership.is_empty());
    }

    #[test]
    fn a_leave_removes_a_member_at_once() {
        // Goal: a graceful stop is seen without waiting for expiry; a second leave is a no-op.
        let now = Instant::now();
        let (local, a) = (peer(), peer());
        let mut membership = Membership::new(local);
        membership.handle_numbered(now, a, None, &alive(a, 1));
        let leave = Announcement { kind: AnnouncementKind::Leave, ..alive(a, 1) };
        assert_eq!(membership.handle_numbered(now, a, None, &leave), MembershipUpdate::Left);
        assert!(membership.members().is_empty());
        assert_eq!(
            membership.handle_numbered(now, a, None, &leave),
            MembershipUpdate::Ignored(IgnoredReason::NotAMember)
        );
    }

    #[test]
    fn an_alive_delivered_after_the_leave_does_not_bring_the_node_back() {
        // Goal: announcements apply in the sender's order. A node's last "alive", sent before
        // its "leave" but delivered after it (to a member, or to a node that joined and was
        // sent both from its gossip peers' cache, the leave first), is ignored; the node
        // restarted with the same identity numbers above its previous run and is back at once.
        let now = Instant::now();
        let (local, a) = (peer(), peer());
        let leave = Announcement { kind: AnnouncementKind::Leave, ..alive(a, 1) };

        let mut member_view = Membership::new(local);
        assert_eq!(member_view.handle_numbered(now, a, Some(100), &alive(a, 1)), MembershipUpdate::Joined);
        assert_eq!(member_view.handle_numbered(now, a, Some(102), &leave), MembershipUpdate::Left);
        assert_eq!(
            member_view.handle_numbered(now, a, Some(101), &alive(a, 1)),
            MembershipUpdate::Ignored(IgnoredReason::Stale)
        );
        assert!(member_view.members().is_empty());

        let mut newcomer_view = Membership::new(local);
        assert_eq!(
            newcomer_view.handle_numbered(now, a, Some(102), &leave),
            MembershipUpdate::Ignored(IgnoredReason::NotAMember)
        );
        assert_eq!(
            newcomer_view.handle_numbered(now, a, Some(101), &alive(a, 1)),
            MembershipUpdate::Ignored(IgnoredReason::Stale)
        );
        assert!(newcomer_view.members().is_empty());
        // Unordered (no sequence number), the same late alive would have re-added it.
        assert_eq!(newcomer_view.handle_numbered(now, a, None, &alive(a, 1)), MembershipUpdate::Joined);

        // Restarted: numbered from its new start time, above everything before.
        let restarted = 1_000_000;
        assert_eq!(member_view.handle_numbered(now, a, Some(restarted), &alive(a, 2)), MembershipUpdate::Joined);
        // A duplicate of an applied announcement is stale too.
        assert_eq!(
            member_view.handle_numbered(now, a, Some(restarted), &alive(a, 2)),
            MembershipUpdate::Ignored(IgnoredReason::Stale)
        );
    }

    #[test]
    fn sequence_numbers_of_non_members_are_forgotten_after_a_while() {
        // Goal: the per-peer memory is bounded in time: a left node's number is kept for
        // SEQUENCE_MEMORY, then dropped; members' numbers stay.
        let t0 = Instant::now();
        let (local, gone, stays) = (peer(), peer(), peer());
        let mut membership = Membership::new(local);
        membership.handle_numbered(t0, gone, Some(5), &alive(gone, 1));
        membership.handle_numbered(
            t0,
            gone,
            Some(6),
            &Announcement { kind: AnnouncementKind::Leave, ..alive(gone, 1) },
        );
        membership.handle_numbered(t0, stays, Some(9), &alive(stays, 1));
        let later = t0 + SEQUENCE_MEMORY - Duration::from_secs(1);
        membership.handle_numbered(later, stays, Some(10), &alive(stays, 1));
        membership.expire(later);
        assert_eq!(
            membership.handle_numbered(later, gone, Some(5), &alive(gone, 1)),
            MembershipUpdate::Ignored(IgnoredReason::Stale)
        );
        let after = t0 + SEQUENCE_MEMORY + Duration::from_secs(1);
        membership.handle_numbered(after, stays, Some(11), &alive(stays, 1));
        membership.expire(after);
        assert_eq!(membership.sequences.len(), 1, "only the member's number is kept");
        assert_eq!(membership.handle_numbered(after, gone, Some(5), &alive(gone, 1)), MembershipUpdate::Joined);
    }

    #[test]
    fn announcements_for_another_peer_or_this_node_change_nothing() {
        // Goal: a peer cannot announce (or remove) someone else, and a node never lists itself.
        let now = Instant::now();
        let (local, a, mallory) = (peer(), peer(), peer());
        let mut membership = Membership::new(local);
        assert_eq!(
            membership.handle_numbered(now, mallory, None, &alive(a, 1)),
            MembershipUpdate::Ignored(IgnoredReason::SourceMismatch)
        );
        assert_eq!(
            membership.handle_numbered(now, local, None, &alive(local, 1)),
            MembershipUpdate::Ignored(IgnoredReason::Local)
        );
        membership.handle_numbered(now, a, None, &alive(a, 1));
        let forged_leave = Announcement { kind: AnnouncementKind::Leave, ..alive(a, 1) };
        assert_eq!(
            membership.handle_numbered(now, mallory, None, &forged_leave),
            MembershipUpdate::Ignored(IgnoredReason::SourceMismatch)
        );
        assert_eq!(membership.members().len(), 1);
    }

    #[test]
    fn the_membership_table_is_bounded() {
        // Goal: past MEMBERS_MAX new members are refused while known ones still refresh.
        let now = Instant::now();
        let mut membership = Membership::new(peer());
        let first = peer();
        membership.handle_numbered(now, first, None, &alive(first, 1));
        while membership.len() < MEMBERS_MAX {
            let next = peer();
            membership.handle_numbered(now, next, None, &alive(next, 1));
        }
        let late = peer();
        assert_eq!(
            membership.handle_numbered(now, late, None, &alive(late, 1)),
            MembershipUpdate::Ignored(IgnoredReason::TableFull)
        );
        assert_eq!(membership.handle_numbered(now, first, None, &alive(first, 2)), MembershipUpdate::Refreshed);
        assert_eq!(membership.len(), MEMBERS_MAX);
    }

    // ---- ProviderStore and PublishQueue --------------------------------------------------

    fn key(n: u32) -> RecordKey {
        RecordKey::from(n.to_be_bytes().to_vec())
    }

    fn record(key: RecordKey, provider: PeerId) -> ProviderRecord {
        ProviderRecord { key, provider, expires: None, addresses: vec!["/ip4/10.0.0.1/tcp/1".parse().unwrap()] }
    }

    #[test]
    fn the_provider_store_counts_records_and_keeps_its_own_first() {
        // Goal: counts stay exact through adds, updates and removals; addresses are not kept;
        // a key full of others' records still takes this node's record.
        let local = peer();
        let mut store = ProviderStore::new(local);
        let others: Vec<PeerId> = (0..DHT_PROVIDERS_PER_KEY_MAX + 1).map(|_| peer()).collect();
        for other in &others {
            store.add_provider(record(key(1), *other)).unwrap();
        }
        assert_eq!(store.provider_records(), DHT_PROVIDERS_PER_KEY_MAX, "a full key ignores more providers");
        assert!(store.providers(&key(1)).iter().all(|record| record.addresses.is_empty()));
        store.add_provider(record(key(1), others[0])).unwrap();
        assert_eq!(store.provider_records(), DHT_PROVIDERS_PER_KEY_MAX, "an update is not a new record");

        store.add_provider(record(key(1), local)).unwrap();
        assert_eq!(store.provider_records(), DHT_PROVIDERS_PER_KEY_MAX);
        assert!(store.providers(&key(1)).iter().any(|record| record.provider == local));
        assert!(store.is_provided(&key(1)));
        assert_eq!(store.provided().count(), 1);

        store.remove_provider(&key(1), &local);
        assert!(!store.is_provided(&key(1)));
        assert_eq!(store.provided().count(), 0);
        assert_eq!(store.provider_records(), DHT_PROVIDERS_PER_KEY_MAX - 1);
        for other in &others {
            store.remove_provider(&key(1), other);
        }
        assert_eq!((store.provider_records(), store.provider_keys()), (0, 0));
    }

    #[test]
    fn the_provider_store_refuses_keys_beyond_its_limits() {
        // Goal: others' keys stop at DHT_PROVIDER_KEYS_MAX, while this node's own keys still
        // fit up to DHT_PROVIDED_KEYS_MAX; a refused key leaves nothing behind.
        let local = peer();
        let other = peer();
        let mut store = ProviderStore::new(local);
        for n in 0..u32::try_from(DHT_PROVIDER_KEYS_MAX).unwrap() {
            store.add_provider(record(key(n), other)).unwrap();
        }
        let overflow = key(u32::MAX);
        assert!(matches!(store.add_provider(record(overflow.clone(), other)), Err(store::Error::MaxProvidedKeys)));
        assert!(store.providers(&overflow).is_empty());
        assert_eq!(store.provider_keys(), DHT_PROVIDER_KEYS_MAX);
        store.add_provider(record(overflow.clone(), local)).unwrap();
        assert!(store.is_provided(&overflow));
        assert_eq!(store.provider_records(), DHT_PROVIDER_KEYS_MAX + 1);

        let mut value = Record::new(key(1), vec![0; DHT_RECORD_VALUE_BYTES_MAX + 1]);
        assert!(matches!(store.put(value.clone()), Err(store::Error::ValueTooLarge)));
        value.value.truncate(DHT_RECORD_VALUE_BYTES_MAX);
        store.put(value).unwrap();
        assert_eq!(store.value_records(), 1);
    }

    #[test]
    fn the_publish_queue_keeps_order_and_drops_withdrawn_keys() {
        // Goal: each key is queued once, in order; a withdrawn key is never popped.
        let mut queue = PublishQueue::default();
        assert!(queue.push(key(1)));
        assert!(queue.push(key(2)));
        assert!(!queue.push(key(1)));
        queue.remove(&key(1));
        assert!(queue.push(key(3)));
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.pop(), Some(key(2)));
        assert_eq!(queue.pop(), Some(key(3)));
        assert_eq!(queue.pop(), None);
        assert!(queue.is_empty());
    }

    #[test]
    fn dc_names_are_checked_before_they_become_protocol_names() {
        // Goal: a DC name with a slash or nothing at all is refused with a clear error.
        assert!(Protocols::for_dc("eu-west-1a").is_ok());
        for dc in ["", "a/b", "a b", "x".repeat(DC_NAME_BYTES_MAX + 1).as_str()] {
            assert!(matches!(Protocols::for_dc(dc), Err(DiscoveryError::InvalidDc { .. })), "{dc:?}");
        }
    }

    // ---- Real swarms on loopback ---------------------------------------------------------

    /// Long enough for a loaded 2-core machine; the checks themselves finish in about a second.
    const CONVERGENCE_DEADLINE: Duration = Duration::from_secs(30);
    const POLL_INTERVAL: Duration = Duration::from_millis(50);

    struct TestNode {
        discovery: Discovery,
        shutdown: CancellationToken,
    }

    async fn start_node(dc: &str, network_key: [u8; 32], bootstrap: Vec<BootstrapAddr>, data_port: u16) -> TestNode {
        let identity = NodeIdentity::from_keypair(Keypair::generate_ed25519()).unwrap();
        let shutdown = CancellationToken::new();
        let config = DiscoveryConfig {
            dc: dc.to_string(),
            identity,
            private_network_key: network_key,
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap,
            data_addr: SocketAddr::from(([127, 0, 0, 1], data_port)),
            link_rate: 0,
        };
        let discovery = Discovery::start(config, shutdown.clone()).await.unwrap();
        TestNode { discovery, shutdown }
    }

    async fn host_port_of(node: &TestNode) -> BootstrapAddr {
        let addrs = node.discovery.listen_addrs().await;
        let port = addrs
            .iter()
            .flat_map(|addr| addr.iter())
            .find_map(|protocol| match protocol {
                Protocol::Tcp(port) => Some(port),
                _ => None,
            })
            .expect("a TCP listen address");
        assert_ne!(port, 0, "listen_addrs reports the bound port");
        BootstrapAddr::parse(&format!("127.0.0.1:{port}")).unwrap()
    }

    fn member_ids(node: &TestNode) -> HashSet<PeerId> {
        node.discovery.members().into_iter().map(|member| member.peer_id).collect()
    }

    async fn poll_until<F, Fut>(what: &str, mut condition: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + CONVERGENCE_DEADLINE;
        while !condition().await {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dc_forms_from_host_port_bootstraps_finds_providers_and_keeps_strangers_out() {
        // Goal: three nodes sharing the DC key, two bootstrapping from the first by host:port,
        // all see each other as members; a provided object is found by a node that did not
        // provide it; a node with another key, bootstrapping from the same node, never
        // connects, never becomes a member and finds no providers; a graceful stop is seen
        // at once through the leave announcement.
        let key: [u8; 32] = rand::random();
        let a = start_node("dc1", key, Vec::new(), 7001).await;
        let via_a = host_port_of(&a).await;
        let b = start_node("dc1", key, vec![via_a.clone()], 7002).await;
        let c = start_node("dc1", key, vec![via_a.clone()], 7003).await;
        let ids = [a.discovery.peer_id(), b.discovery.peer_id(), c.discovery.peer_id()];
        let nodes = [&a, &b, &c];

        poll_until("every node lists the two others", || async {
            nodes.iter().zip(ids).all(|(node, own)| {
                let members = member_ids(node);
                members.len() == 2 && ids.iter().all(|id| *id == own || members.contains(id))
            })
        })
        .await;
        let b_member = a.discovery.members().into_iter().find(|member| member.peer_id == ids[1]).unwrap();
        assert_eq!(b_member.data_addr, SocketAddr::from(([127, 0, 0, 1], 7002)));

        let object = ObjectId::of(b"an object only A holds");
        a.discovery.provide(object).await;
        poll_until("C finds A among the providers", || async { c.discovery.providers(object).await.contains(&ids[0]) })
            .await;
        assert!(!a.discovery.providers(object).await.contains(&ids[0]), "a node never lists itself");
        let a_stats = a.discovery.stats().await;
        assert_eq!(a_stats.provided_keys, 1);
        assert!(a_stats.connected_peers >= 2, "{a_stats:?}");
        let c_stats = c.discovery.stats().await;
        assert!(c_stats.kad_outbound_queries > 0 && c_stats.members == 2, "{c_stats:?}");
        assert!(c_stats.kad_outbound_requests > 0, "a lookup that found A sent requests: {c_stats:?}");

        // A stranger: same DC name, another key, bootstrapping from A.
        let stranger = start_node("dc1", rand::random(), vec![via_a], 7004).await;
        let stranger_id = stranger.discovery.peer_id();
        // Observe past one bootstrap retry and one full member expiry: the DC keeps
        // refreshing itself while the stranger keeps knocking.
        let observe_until = Instant::now() + MEMBER_EXPIRY.max(BOOTSTRAP_RETRY_INTERVAL) + Duration::from_secs(1);
        while Instant::now() < observe_until {
            for (node, own) in nodes.iter().zip(ids) {
                let members = member_ids(node);
                assert!(!members.contains(&stranger_id), "the stranger became a member of {own}");
                assert_eq!(members.len(), 2, "{own} lost a legitimate member: {members:?}");
            }
            assert!(stranger.discovery.members().is_empty());
            assert_eq!(stranger.discovery.stats().await.connected_peers, 0, "the stranger completed a connection");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        assert!(stranger.discovery.providers(object).await.is_empty());

        // Unproviding is local and immediate.
        a.discovery.unprovide(object).await;
        assert_eq!(a.discovery.stats().await.provided_keys, 0);

        // B stops gracefully: A and C drop it well before MEMBER_EXPIRY would.
        b.shutdown.cancel();
        b.discovery.stopped().await;
        poll_until("A and C drop B", || async {
            !member_ids(&a).contains(&ids[1]) && !member_ids(&c).contains(&ids[1])
        })
        .await;
        // Dropped because of its leave, not because it went quiet.
        for (node, name) in [(&a, "A"), (&c, "C")] {
            let stats = node.discovery.stats().await;
            assert_eq!(stats.members_left, 1, "{name} handled B's leave: {stats:?}");
            assert_eq!(stats.members_expired, 0, "{name} expired a member instead: {stats:?}");
        }

        for node in [&a, &c, &stranger] {
            node.shutdown.cancel();
            node.discovery.stopped().await;
        }
        assert!(a.discovery.members().is_empty(), "a stopped service lists no members");
        assert_eq!(a.discovery.stats().await, DiscoveryStats::default());
        assert!(a.discovery.providers(object).await.is_empty());
    }
}
