//! The trial's object: seeded bytes generated as they are sent, and digests of what comes back.
//!
//! [`Pattern`] is a seeded, random-access byte stream (BLAKE3 in XOF mode keyed by the
//! seed), so a multi-GiB object is never held in memory and a run with the same seed puts
//! the same bytes (and so the same object id). [`Digest`] is what every stream is
//! compared by: its length and its BLAKE3.
//!
//! Non-goal: naming objects the way the daemon does (chunk ids, manifests). The daemon's
//! answer names the object; the testnet only checks that the bytes that come back are the
//! bytes that went in.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Bytes generated per step when streaming a pattern.
pub const PIECE_BYTES: usize = 1024 * 1024;

/// Pieces buffered between the generator and the upload.
const BODY_CHANNEL_PIECES: usize = 4;

/// A seeded, random-access stream of pseudo-random bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    seed: u64,
}

impl Pattern {
    /// The pattern of this seed.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// Fills `buffer` with the pattern's bytes starting at `offset`.
    pub fn fill(&self, offset: u64, buffer: &mut [u8]) {
        let key = blake3::derive_key("cachemesh-testnet pattern v1", &self.seed.to_le_bytes());
        let mut reader = blake3::Hasher::new_keyed(&key).finalize_xof();
        reader.set_position(offset);
        reader.fill(buffer);
    }
}

/// Length and BLAKE3 of a byte stream, built as it passes.
#[derive(Debug, Clone, Default)]
pub struct Digest {
    hasher: blake3::Hasher,
    length: u64,
}

impl Digest {
    /// An empty digest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.length += bytes.len() as u64;
    }

    /// Bytes seen.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// BLAKE3 of the bytes seen, in hex.
    pub fn hex(&self) -> String {
        self.hasher.finalize().to_hex().to_string()
    }
}

/// A request body of known length whose bytes come from a generator task.
#[derive(Debug)]
pub struct PatternBody {
    receiver: mpsc::Receiver<Bytes>,
    length: u64,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.receiver.poll_recv(cx).map(|piece| piece.map(|bytes| Ok(Frame::data(bytes))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.length)
    }
}

/// A body of the first `length` bytes of `pattern` (sent with `Content-Length`), and the
/// generator task, which returns the digest of what it sent, or `None` when the body was
/// dropped before the end.
pub fn pattern_body(pattern: Pattern, length: u64) -> (PatternBody, JoinHandle<Option<Digest>>) {
    let (sender, receiver) = mpsc::channel(BODY_CHANNEL_PIECES);
    let task = tokio::spawn(async move {
        let mut digest = Digest::new();
        let mut offset = 0u64;
        while offset < length {
            let piece = (length - offset).min(PIECE_BYTES as u64) as usize;
            let mut buffer = vec![0; piece];
            pattern.fill(offset, &mut buffer);
            digest.update(&buffer);
            if sender.send(Bytes::from(buffer)).await.is_err() {
                return None;
            }
            offset += piece as u64;
        }
        Some(digest)
    });
    (PatternBody { receiver, length }, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_random_access_and_seeded() {
        // Goal: any range of a pattern can be regenerated alone, and seeds differ.
        let pattern = Pattern::new(7);
        let mut whole = vec![0; 5000];
        pattern.fill(0, &mut whole);
        let mut part = vec![0; 1000];
        pattern.fill(3000, &mut part);
        assert_eq!(&whole[3000..4000], &part[..]);
        let mut other = vec![0; 1000];
        Pattern::new(8).fill(3000, &mut other);
        assert_ne!(part, other);
    }

    #[tokio::test]
    async fn body_digest_matches_the_bytes() {
        // Goal: the generator's digest is the digest of exactly the bytes of the body.
        use http_body_util::BodyExt;
        let length = 2 * PIECE_BYTES as u64 + 123;
        let (body, task) = pattern_body(Pattern::new(1), length);
        let bytes = body.collect().await.unwrap().to_bytes();
        let sent = task.await.unwrap().unwrap();
        let mut digest = Digest::new();
        digest.update(&bytes);
        assert_eq!(digest.length(), length);
        assert_eq!(sent.hex(), digest.hex());
    }
}
