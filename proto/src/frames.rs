//! Data-plane frames: what two nodes say to each other over QUIC (ALPN `cachemesh/1`).
//!
//! Each request travels on its own bidirectional stream: the client writes one
//! [`Request`] and finishes its side; the server answers one [`ResponseHead`], followed
//! for chunk answers by exactly `length` raw bytes. The first stream of a connection
//! carries the [`Hello`] exchange that admits the peer; nothing else is served before it.
//!
//! Every decoder takes the bytes received so far and returns `Ok(None)` when it needs more
//! ("need more bytes" is normal, not an error), `Ok(Some((frame, consumed)))` once a whole
//! frame is there, or a typed error. Lengths are checked against the limits before any
//! allocation.
//!
//! Encoding: a one-byte tag, then fixed-size fields, integers little-endian.

use crate::limits::{CHUNK_BYTES_MAX, DC_NAME_BYTES_MAX, FRAME_MESSAGE_BYTES_MAX, HAVE_SET_BYTES_MAX, ID_BYTES};
use crate::{ChunkId, ObjectId};

/// ALPN protocol id of the data plane.
pub const ALPN: &[u8] = b"cachemesh/1";

const HELLO_MAGIC: [u8; 4] = *b"CMH1";
/// Length of an ed25519 public key.
pub const PUBLIC_KEY_BYTES: usize = 32;
/// Length of an ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
/// Length of the admission tag (keyed BLAKE3).
pub const ADMISSION_TAG_BYTES: usize = 32;

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Unknown frame tag.
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    /// Unknown status code.
    #[error("unknown status {0}")]
    UnknownStatus(u8),
    /// A Hello does not start with its magic.
    #[error("not a cachemesh hello")]
    BadMagic,
    /// A length field exceeds its limit.
    #[error("{field} length {length} exceeds its limit {limit}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// The length announced.
        length: u64,
        /// The limit.
        limit: u64,
    },
    /// A chunk range is empty or reaches past `CHUNK_BYTES_MAX`.
    #[error("chunk range {offset}+{length} is not within a chunk")]
    BadRange {
        /// Offset.
        offset: u32,
        /// Length.
        length: u32,
    },
    /// A text field is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    /// A stripe request names a stripe that does not exist.
    #[error("stripe {stripe} of {stripes} does not exist")]
    BadStripe {
        /// The stripe asked for.
        stripe: u16,
        /// The stripes announced.
        stripes: u16,
    },
}

/// Bytes of a chunk's pieces that stripes interleave (see [`Request::Stripe`]).
pub const STRIPE_PIECE_BYTES: usize = 32 * 1024;

/// Stripes a chunk may be cut into: one per piece of a [`CHUNK_BYTES_MAX`] chunk.
pub const STRIPES_MAX: u16 = (CHUNK_BYTES_MAX as usize / STRIPE_PIECE_BYTES) as u16;

/// The byte ranges of a chunk of `length` bytes that stripe `stripe` of `stripes` carries,
/// in order: pieces `stripe`, `stripe + stripes`... of [`STRIPE_PIECE_BYTES`] (the chunk's
/// last piece may be shorter). Empty for a stripe that does not exist.
pub fn stripe_pieces(length: usize, stripe: u16, stripes: u16) -> impl Iterator<Item = std::ops::Range<usize>> {
    let pieces = length.div_ceil(STRIPE_PIECE_BYTES);
    let (stripe, step) = (usize::from(stripe), usize::from(stripes).max(1));
    let first = if stripe < usize::from(stripes) { stripe } else { pieces };
    (first..pieces)
        .step_by(step)
        .map(move |piece| piece * STRIPE_PIECE_BYTES..((piece + 1) * STRIPE_PIECE_BYTES).min(length))
}

/// The bytes of stripe `stripe` of `stripes` of `chunk`, joined in order.
pub fn stripe_bytes(chunk: &[u8], stripe: u16, stripes: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(stripe_length(chunk.len(), stripe, stripes));
    for range in stripe_pieces(chunk.len(), stripe, stripes) {
        out.extend_from_slice(&chunk[range]);
    }
    out
}

/// Bytes in stripe `stripe` of `stripes` of a chunk of `length` bytes.
pub fn stripe_length(length: usize, stripe: u16, stripes: u16) -> usize {
    stripe_pieces(length, stripe, stripes).map(|range| range.len()).sum()
}

/// Who speaks a Hello: binds the signature to a direction so it cannot be reflected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that opened the connection.
    Client = 0,
    /// The side that accepted it.
    Server = 1,
}

/// The admission handshake, one from each side.
///
/// `signature` is the node's ed25519 signature and `admission_tag` a BLAKE3 MAC keyed by
/// the cluster key, both over [`Hello::transcript`]: the role, the TLS session's exported
/// keying material and the node's public key. The exporter ties both to this one QUIC
/// connection, so a Hello cannot be replayed or relayed on another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The datacenter the node belongs to.
    pub dc: String,
    /// The node's ed25519 public key (its identity).
    pub public_key: [u8; PUBLIC_KEY_BYTES],
    /// Signature by that key over the transcript.
    pub signature: [u8; SIGNATURE_BYTES],
    /// MAC by the cluster key over the transcript.
    pub admission_tag: [u8; ADMISSION_TAG_BYTES],
}

impl Hello {
    /// Bytes signed and MACed: a domain string, the role, the exporter, the public key, the dc.
    pub fn transcript(role: Role, exporter: &[u8; 32], public_key: &[u8; PUBLIC_KEY_BYTES], dc: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + 1 + 32 + PUBLIC_KEY_BYTES + dc.len());
        out.extend_from_slice(b"cachemesh/1 hello");
        out.push(role as u8);
        out.extend_from_slice(exporter);
        out.extend_from_slice(public_key);
        out.extend_from_slice(dc.as_bytes());
        out
    }

    /// Encodes the Hello.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&HELLO_MAGIC);
        // `decode` and the node config bound dc names by DC_NAME_BYTES_MAX (< 256).
        out.push(self.dc.len() as u8);
        out.extend_from_slice(self.dc.as_bytes());
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&self.signature);
        out.extend_from_slice(&self.admission_tag);
        out
    }

    /// Decodes a Hello from the bytes received so far.
    pub fn decode(bytes: &[u8]) -> Result<Option<(Self, usize)>, FrameError> {
        if bytes.len() < 5 {
            return Ok(None);
        }
        if bytes[..4] != HELLO_MAGIC {
            return Err(FrameError::BadMagic);
        }
        let dc_len = usize::from(bytes[4]);
        if dc_len > DC_NAME_BYTES_MAX {
            return Err(FrameError::TooLong { field: "dc", length: dc_len as u64, limit: DC_NAME_BYTES_MAX as u64 });
        }
        let total = 5 + dc_len + PUBLIC_KEY_BYTES + SIGNATURE_BYTES + ADMISSION_TAG_BYTES;
        if bytes.len() < total {
            return Ok(None);
        }
        let mut at = 5;
        let dc = std::str::from_utf8(&bytes[at..at + dc_len]).map_err(|_| FrameError::NotUtf8("dc"))?.to_string();
        at += dc_len;
        let mut public_key = [0u8; PUBLIC_KEY_BYTES];
        public_key.copy_from_slice(&bytes[at..at + PUBLIC_KEY_BYTES]);
        at += PUBLIC_KEY_BYTES;
        let mut signature = [0u8; SIGNATURE_BYTES];
        signature.copy_from_slice(&bytes[at..at + SIGNATURE_BYTES]);
        at += SIGNATURE_BYTES;
        let mut admission_tag = [0u8; ADMISSION_TAG_BYTES];
        admission_tag.copy_from_slice(&bytes[at..at + ADMISSION_TAG_BYTES]);
        Ok(Some((Self { dc, public_key, signature, admission_tag }, total)))
    }
}

/// A request, one per stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Which chunks of this object do you hold? Answered with a have-set bitmap.
    HaveSet(ObjectId),
    /// Send bytes `offset..offset+length` of this chunk (`length` 0 means to its end).
    GetChunk {
        /// The chunk.
        id: ChunkId,
        /// First byte.
        offset: u32,
        /// Bytes wanted; 0 for the rest of the chunk.
        length: u32,
    },
    /// Send this whole chunk, waiting for an upload slot if every one is taken: asked by a
    /// chunk's home node fetching it for the DC, which has nowhere else to turn but the
    /// origin. (A plain [`Request::GetChunk`] may be answered `Busy` when the line for upload
    /// slots is long, and its sender asks elsewhere.)
    GetChunkForHome(ChunkId),
    /// As the chunk's home node, get it (from your store or the origin) and send it whole.
    HomeFetch(ChunkId),
    /// As the chunk's home node, get it (from your store, the holders of `object`, or the
    /// origin) and send it whole; `index` is the chunk's place in the object.
    HomeFetchOf {
        /// The chunk.
        id: ChunkId,
        /// An object it belongs to, whose holders the home may ask.
        object: ObjectId,
        /// The chunk's index in that object.
        index: u32,
    },
    /// Send stripe `stripe` of `stripes` of this chunk as it arrives: the chunk's
    /// [`STRIPE_PIECE_BYTES`] pieces `stripe`, `stripe + stripes`, `stripe + 2 * stripes`...
    /// one after the other ([`stripe_pieces`]). Not verified: a stripe cannot be checked
    /// alone; the requester checks the chunk it assembles. With `from_home` the receiver is
    /// asked as the chunk's home (it fetches the chunk as for [`Request::HomeFetchOf`]);
    /// without, as the stripe's relayer (it gets the stripe from the chunk's home once and
    /// passes it on to every requester).
    Stripe {
        /// The chunk.
        id: ChunkId,
        /// The object it is read for.
        object: ObjectId,
        /// The chunk's index in that object.
        index: u32,
        /// Which stripe, below `stripes`.
        stripe: u16,
        /// How many stripes the chunk is cut into, 1 to [`STRIPES_MAX`].
        stripes: u16,
        /// Asked of the chunk's home rather than of a relayer.
        from_home: bool,
    },
}

const TAG_HAVE_SET: u8 = 1;
const TAG_GET_CHUNK: u8 = 2;
const TAG_HOME_FETCH: u8 = 3;
const TAG_HOME_FETCH_OF: u8 = 4;
const TAG_GET_CHUNK_FOR_HOME: u8 = 5;
const TAG_STRIPE_FROM_RELAYER: u8 = 6;
const TAG_STRIPE_FROM_HOME: u8 = 7;

fn id_at(bytes: &[u8], at: usize) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    id.copy_from_slice(&bytes[at..at + ID_BYTES]);
    id
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

impl Request {
    /// Largest encoded request.
    pub const ENCODED_BYTES_MAX: usize = 1 + 2 * ID_BYTES + 8;

    /// Encodes the request.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::ENCODED_BYTES_MAX);
        match self {
            Self::HaveSet(id) => {
                out.push(TAG_HAVE_SET);
                out.extend_from_slice(id.as_bytes());
            }
            Self::GetChunk { id, offset, length } => {
                out.push(TAG_GET_CHUNK);
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&length.to_le_bytes());
            }
            Self::GetChunkForHome(id) => {
                out.push(TAG_GET_CHUNK_FOR_HOME);
                out.extend_from_slice(id.as_bytes());
            }
            Self::HomeFetch(id) => {
                out.push(TAG_HOME_FETCH);
                out.extend_from_slice(id.as_bytes());
            }
            Self::HomeFetchOf { id, object, index } => {
                out.push(TAG_HOME_FETCH_OF);
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(object.as_bytes());
                out.extend_from_slice(&index.to_le_bytes());
            }
            Self::Stripe { id, object, index, stripe, stripes, from_home } => {
                out.push(if *from_home { TAG_STRIPE_FROM_HOME } else { TAG_STRIPE_FROM_RELAYER });
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(object.as_bytes());
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&stripe.to_le_bytes());
                out.extend_from_slice(&stripes.to_le_bytes());
            }
        }
        out
    }

    /// Decodes a request from the bytes received so far.
    pub fn decode(bytes: &[u8]) -> Result<Option<(Self, usize)>, FrameError> {
        let Some(&tag) = bytes.first() else { return Ok(None) };
        let needed = match tag {
            TAG_HAVE_SET | TAG_HOME_FETCH | TAG_GET_CHUNK_FOR_HOME => 1 + ID_BYTES,
            TAG_GET_CHUNK => 1 + ID_BYTES + 8,
            TAG_HOME_FETCH_OF => 1 + 2 * ID_BYTES + 4,
            TAG_STRIPE_FROM_RELAYER | TAG_STRIPE_FROM_HOME => 1 + 2 * ID_BYTES + 8,
            other => return Err(FrameError::UnknownTag(other)),
        };
        if bytes.len() < needed {
            return Ok(None);
        }
        let id = id_at(bytes, 1);
        let request = match tag {
            TAG_HAVE_SET => Self::HaveSet(ObjectId::from_bytes(id)),
            TAG_HOME_FETCH => Self::HomeFetch(ChunkId::from_bytes(id)),
            TAG_GET_CHUNK_FOR_HOME => Self::GetChunkForHome(ChunkId::from_bytes(id)),
            TAG_HOME_FETCH_OF => Self::HomeFetchOf {
                id: ChunkId::from_bytes(id),
                object: ObjectId::from_bytes(id_at(bytes, 1 + ID_BYTES)),
                index: u32_at(bytes, 1 + 2 * ID_BYTES),
            },
            TAG_STRIPE_FROM_RELAYER | TAG_STRIPE_FROM_HOME => {
                let at = 1 + 2 * ID_BYTES;
                let stripe = u16::from_le_bytes([bytes[at + 4], bytes[at + 5]]);
                let stripes = u16::from_le_bytes([bytes[at + 6], bytes[at + 7]]);
                if stripes == 0 || stripes > STRIPES_MAX || stripe >= stripes {
                    return Err(FrameError::BadStripe { stripe, stripes });
                }
                Self::Stripe {
                    id: ChunkId::from_bytes(id),
                    object: ObjectId::from_bytes(id_at(bytes, 1 + ID_BYTES)),
                    index: u32_at(bytes, at),
                    stripe,
                    stripes,
                    from_home: tag == TAG_STRIPE_FROM_HOME,
                }
            }
            _ => {
                let (offset, length) = (u32_at(bytes, 1 + ID_BYTES), u32_at(bytes, 5 + ID_BYTES));
                let end = u64::from(offset) + u64::from(length);
                if offset >= CHUNK_BYTES_MAX || end > u64::from(CHUNK_BYTES_MAX) {
                    return Err(FrameError::BadRange { offset, length });
                }
                Self::GetChunk { id: ChunkId::from_bytes(id), offset, length }
            }
        };
        Ok(Some((request, needed)))
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Success; the body follows.
    Ok = 0,
    /// The node does not hold it (or the origin does not, for a home fetch).
    NotFound = 1,
    /// Too many requests in flight from this peer, or upload budget exhausted; try elsewhere.
    Busy = 2,
    /// The request was malformed.
    BadRequest = 3,
    /// The home node could not reach the origin.
    OriginUnavailable = 4,
    /// A fault in the serving node.
    Internal = 5,
    /// The connection has not been admitted.
    Forbidden = 6,
}

impl Status {
    fn from_u8(value: u8) -> Result<Self, FrameError> {
        Ok(match value {
            0 => Self::Ok,
            1 => Self::NotFound,
            2 => Self::Busy,
            3 => Self::BadRequest,
            4 => Self::OriginUnavailable,
            5 => Self::Internal,
            6 => Self::Forbidden,
            other => return Err(FrameError::UnknownStatus(other)),
        })
    }
}

/// The head of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseHead {
    /// `length` raw chunk bytes follow.
    Chunk {
        /// Bytes that follow.
        length: u32,
    },
    /// A have-set: bit `i` (LSB first within each byte) set when chunk `i` is held.
    HaveSet {
        /// Chunks of the object.
        chunk_count: u32,
        /// `ceil(chunk_count / 8)` bytes.
        bitmap: Vec<u8>,
    },
    /// A refusal with a short message.
    Error {
        /// Why.
        status: Status,
        /// For logs.
        message: String,
    },
}

const TAG_CHUNK: u8 = 0x81;
const TAG_HAVE_SET_ANSWER: u8 = 0x82;
const TAG_ERROR: u8 = 0x83;

impl ResponseHead {
    /// Encodes the head.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Self::Chunk { length } => {
                out.push(TAG_CHUNK);
                out.extend_from_slice(&length.to_le_bytes());
            }
            Self::HaveSet { chunk_count, bitmap } => {
                out.push(TAG_HAVE_SET_ANSWER);
                out.extend_from_slice(&chunk_count.to_le_bytes());
                out.extend_from_slice(bitmap);
            }
            Self::Error { status, message } => {
                let message = truncate_utf8(message, FRAME_MESSAGE_BYTES_MAX);
                out.push(TAG_ERROR);
                out.push(*status as u8);
                out.extend_from_slice(&(message.len() as u16).to_le_bytes());
                out.extend_from_slice(message.as_bytes());
            }
        }
        out
    }

    /// Decodes a head from the bytes received so far.
    pub fn decode(bytes: &[u8]) -> Result<Option<(Self, usize)>, FrameError> {
        let Some(&tag) = bytes.first() else { return Ok(None) };
        match tag {
            TAG_CHUNK => {
                if bytes.len() < 5 {
                    return Ok(None);
                }
                let length = u32_at(bytes, 1);
                if length > CHUNK_BYTES_MAX {
                    return Err(FrameError::TooLong {
                        field: "chunk",
                        length: length.into(),
                        limit: CHUNK_BYTES_MAX.into(),
                    });
                }
                Ok(Some((Self::Chunk { length }, 5)))
            }
            TAG_HAVE_SET_ANSWER => {
                if bytes.len() < 5 {
                    return Ok(None);
                }
                let chunk_count = u32_at(bytes, 1);
                let bitmap_len = (chunk_count as usize).div_ceil(8);
                if bitmap_len > HAVE_SET_BYTES_MAX {
                    return Err(FrameError::TooLong {
                        field: "have-set",
                        length: bitmap_len as u64,
                        limit: HAVE_SET_BYTES_MAX as u64,
                    });
                }
                if bytes.len() < 5 + bitmap_len {
                    return Ok(None);
                }
                Ok(Some((Self::HaveSet { chunk_count, bitmap: bytes[5..5 + bitmap_len].to_vec() }, 5 + bitmap_len)))
            }
            TAG_ERROR => {
                if bytes.len() < 4 {
                    return Ok(None);
                }
                let status = Status::from_u8(bytes[1])?;
                let length = usize::from(u16::from_le_bytes([bytes[2], bytes[3]]));
                if length > FRAME_MESSAGE_BYTES_MAX {
                    return Err(FrameError::TooLong {
                        field: "message",
                        length: length as u64,
                        limit: FRAME_MESSAGE_BYTES_MAX as u64,
                    });
                }
                if bytes.len() < 4 + length {
                    return Ok(None);
                }
                let message = std::str::from_utf8(&bytes[4..4 + length]).map_err(|_| FrameError::NotUtf8("message"))?;
                Ok(Some((Self::Error { status, message: message.to_string() }, 4 + length)))
            }
            other => Err(FrameError::UnknownTag(other)),
        }
    }
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Whether bit `index` of a have-set bitmap is set.
pub fn have_set_contains(bitmap: &[u8], index: usize) -> bool {
    bitmap.get(index / 8).is_some_and(|byte| byte & (1 << (index % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request_strategy() -> impl Strategy<Value = Request> {
        prop_oneof![
            any::<[u8; 32]>().prop_map(|b| Request::HaveSet(ObjectId::from_bytes(b))),
            any::<[u8; 32]>().prop_map(|b| Request::HomeFetch(ChunkId::from_bytes(b))),
            any::<[u8; 32]>().prop_map(|b| Request::GetChunkForHome(ChunkId::from_bytes(b))),
            (any::<[u8; 32]>(), any::<[u8; 32]>(), any::<u32>()).prop_map(|(c, o, index)| Request::HomeFetchOf {
                id: ChunkId::from_bytes(c),
                object: ObjectId::from_bytes(o),
                index
            }),
            (any::<[u8; 32]>(), 0..CHUNK_BYTES_MAX)
                .prop_flat_map(|(b, offset)| { (Just(b), Just(offset), 0..=(CHUNK_BYTES_MAX - offset)) })
                .prop_map(|(b, offset, length)| Request::GetChunk { id: ChunkId::from_bytes(b), offset, length }),
            (any::<[u8; 32]>(), any::<[u8; 32]>(), any::<u32>(), 1..=STRIPES_MAX, any::<bool>())
                .prop_flat_map(|(c, o, index, stripes, from_home)| {
                    (Just(c), Just(o), Just(index), 0..stripes, Just(stripes), Just(from_home))
                })
                .prop_map(|(c, o, index, stripe, stripes, from_home)| Request::Stripe {
                    id: ChunkId::from_bytes(c),
                    object: ObjectId::from_bytes(o),
                    index,
                    stripe,
                    stripes,
                    from_home
                }),
        ]
    }

    fn head_strategy() -> impl Strategy<Value = ResponseHead> {
        prop_oneof![
            (0..=CHUNK_BYTES_MAX).prop_map(|length| ResponseHead::Chunk { length }),
            (0u32..5000)
                .prop_flat_map(|count| {
                    (Just(count), proptest::collection::vec(any::<u8>(), (count as usize).div_ceil(8)))
                })
                .prop_map(|(chunk_count, bitmap)| ResponseHead::HaveSet { chunk_count, bitmap }),
            (0u8..=6, ".{0,40}").prop_map(|(status, message)| ResponseHead::Error {
                status: Status::from_u8(status).unwrap(),
                message
            }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip_at_every_split(request in request_strategy()) {
            // Goal: a request decodes back whole, and every proper prefix asks for more.
            let bytes = request.encode();
            prop_assert!(bytes.len() <= Request::ENCODED_BYTES_MAX);
            for cut in 0..bytes.len() {
                prop_assert_eq!(Request::decode(&bytes[..cut]), Ok(None));
            }
            prop_assert_eq!(Request::decode(&bytes), Ok(Some((request, bytes.len()))));
        }

        #[test]
        fn heads_round_trip_at_every_split(head in head_strategy()) {
            let bytes = head.encode();
            for cut in 0..bytes.len() {
                prop_assert_eq!(ResponseHead::decode(&bytes[..cut]), Ok(None));
            }
            let mut extended = bytes.clone();
            extended.extend_from_slice(b"trailing body bytes");
            prop_assert_eq!(ResponseHead::decode(&extended), Ok(Some((head, bytes.len()))));
        }

        #[test]
        fn hello_round_trips(dc in "[a-z0-9-]{0,64}", key in any::<[u8; 32]>(), tag in any::<[u8; 32]>()) {
            let hello = Hello { dc, public_key: key, signature: [7; 64], admission_tag: tag };
            let bytes = hello.encode();
            for cut in 0..bytes.len() {
                prop_assert_eq!(Hello::decode(&bytes[..cut]), Ok(None));
            }
            prop_assert_eq!(Hello::decode(&bytes), Ok(Some((hello, bytes.len()))));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Request::decode(&bytes);
            let _ = ResponseHead::decode(&bytes);
            let _ = Hello::decode(&bytes);
        }
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocating() {
        // Goal: a peer announcing a huge chunk, have-set or message gets a typed error.
        let mut chunk = vec![TAG_CHUNK];
        chunk.extend_from_slice(&(CHUNK_BYTES_MAX + 1).to_le_bytes());
        assert!(matches!(ResponseHead::decode(&chunk), Err(FrameError::TooLong { field: "chunk", .. })));
        let mut have = vec![TAG_HAVE_SET_ANSWER];
        have.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(ResponseHead::decode(&have), Err(FrameError::TooLong { field: "have-set", .. })));
        let error = [TAG_ERROR, 1, 0xff, 0xff];
        assert!(matches!(ResponseHead::decode(&error), Err(FrameError::TooLong { field: "message", .. })));
        let mut range = Request::GetChunk { id: ChunkId::of(b"x"), offset: 0, length: 0 }.encode();
        range[33..37].copy_from_slice(&CHUNK_BYTES_MAX.to_le_bytes());
        assert!(matches!(Request::decode(&range), Err(FrameError::BadRange { .. })));
        // A stripe request names a stripe that exists.
        let stripe = |stripe: u16, stripes: u16| {
            let request = Request::Stripe {
                id: ChunkId::of(b"x"),
                object: ObjectId::from_bytes([1; 32]),
                index: 0,
                stripe,
                stripes,
                from_home: false,
            };
            Request::decode(&request.encode())
        };
        assert!(matches!(stripe(0, 0), Err(FrameError::BadStripe { .. })));
        assert!(matches!(stripe(4, 4), Err(FrameError::BadStripe { .. })));
        assert!(matches!(stripe(0, STRIPES_MAX + 1), Err(FrameError::BadStripe { .. })));
        assert!(matches!(stripe(STRIPES_MAX - 1, STRIPES_MAX), Ok(Some(_))));
        assert_eq!(Request::decode(&[9]), Err(FrameError::UnknownTag(9)));
    }

    proptest! {
        #[test]
        fn the_stripes_of_a_chunk_share_its_pieces_out_exactly_once(length in 1usize..=CHUNK_BYTES_MAX as usize, stripes in 1..=STRIPES_MAX) {
            // Goal: every byte of the chunk is in exactly one stripe, each stripe's ranges
            // come in order, and stripe_length adds them up.
            let mut covered = vec![0u8; length.div_ceil(STRIPE_PIECE_BYTES)];
            let mut total = 0;
            for stripe in 0..stripes {
                let ranges: Vec<_> = stripe_pieces(length, stripe, stripes).collect();
                prop_assert!(ranges.windows(2).all(|pair| pair[0].end <= pair[1].start));
                for range in &ranges {
                    prop_assert!(range.start % STRIPE_PIECE_BYTES == 0 && !range.is_empty() && range.end <= length);
                    covered[range.start / STRIPE_PIECE_BYTES] += 1;
                }
                let bytes: usize = ranges.iter().map(|range| range.len()).sum();
                prop_assert_eq!(stripe_length(length, stripe, stripes), bytes);
                total += bytes;
            }
            prop_assert_eq!(total, length);
            prop_assert!(covered.iter().all(|count| *count == 1));
            prop_assert_eq!(stripe_pieces(length, stripes, stripes).count(), 0);
        }
    }

    #[test]
    fn have_set_bits_are_lsb_first() {
        assert!(have_set_contains(&[0b0000_0010], 1));
        assert!(!have_set_contains(&[0b0000_0010], 0));
        assert!(!have_set_contains(&[0xff], 8));
    }
}
