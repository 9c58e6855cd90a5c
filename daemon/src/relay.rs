//! A chunk that is still arriving, readable by the peers waiting for it (cut-through).
//!
//! When this node fetches a chunk as its home, every peer that asked for it waits. Without
//! a relay they wait for the whole chunk to arrive, be verified and only then start to
//! receive it: each hop of the DC's distribution costs a whole chunk's transfer time. With
//! one, the fetch ([`RelayFeed`], one per relay, claimed by whichever attempt receives the
//! first bytes) copies what arrives into the relay while anyone reads it, and the answers
//! to waiting peers ([`RelayReader`]) send it on as it comes.
//!
//! Nothing unverified is passed on whole: a reader holds back the latest piece until the
//! feed has ended verified ([`RelayFeed::finish`] takes the [`VerifiedChunk`] as proof), so
//! a peer never receives the last byte of a chunk this node did not check. A feed that
//! fails (corrupt bytes, a broken stream, a lost race) ends the relay as failed; readers
//! then fall back to the fetch's verified answer, which must extend what they sent
//! ([`RelayReader::sent_prefix_matches`]), or give up on their stream.
//!
//! Bounds: at most one copy of the chunk per relay (`CHUNK_BYTES_MAX`), in pieces of
//! [`RELAY_PIECE_BYTES`] but the last; none when nobody reads it.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use crate::chunk::VerifiedChunk;

/// Arriving bytes are handed to readers in pieces of this size (the last may be shorter):
/// small enough to keep the relay close behind the feed, large enough that readers wake
/// a few dozen times per chunk rather than once per packet.
pub const RELAY_PIECE_BYTES: usize = 128 * 1024;

/// Like [`RELAY_PIECE_BYTES`], for a stripe's relay ([`Relay::for_stripe`]).
pub const STRIPE_RELAY_PIECE_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Open,
    Verified,
    Failed,
}

#[derive(Debug)]
struct State {
    /// The chunk's length, once a feed has claimed the relay (one feed per relay).
    length: Option<usize>,
    pieces: Vec<Bytes>,
    end: End,
}

/// One chunk's relay: shared by its feed and its readers.
#[derive(Debug)]
pub struct Relay {
    state: Mutex<State>,
    /// Bumped on every change, so readers can wait for one.
    changed: watch::Sender<u64>,
    /// Bytes handed to readers at once (the last piece may be shorter).
    piece_bytes: usize,
    /// Whether readers wait for the feed's verified end before the latest piece.
    hold_back: bool,
}

impl Default for Relay {
    fn default() -> Self {
        Self {
            state: Mutex::new(State { length: None, pieces: Vec::new(), end: End::Open }),
            changed: watch::Sender::new(0),
            piece_bytes: RELAY_PIECE_BYTES,
            hold_back: true,
        }
    }
}

impl Relay {
    /// A relay nobody feeds yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A relay of a stripe (`crate::stripe`): pieces of [`STRIPE_RELAY_PIECE_BYTES`], none
    /// held back. A stripe cannot be verified alone, and it arrives at a fraction of the
    /// chunk's pace, so pieces as large as a chunk relay's would hold its readers back for
    /// seconds at each hop.
    pub fn for_stripe() -> Arc<Self> {
        Arc::new(Self { piece_bytes: STRIPE_RELAY_PIECE_BYTES, hold_back: false, ..Self::default() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changed.send_modify(|version| *version = version.wrapping_add(1));
    }

    /// The feed of a chunk of `length` bytes, for the first caller only: later attempts at
    /// the same chunk (hedges, retries) fetch without feeding.
    pub fn claim(self: &Arc<Self>, length: usize) -> Option<RelayFeed> {
        {
            let mut state = self.lock();
            if state.length.is_some() || state.end != End::Open {
                return None;
            }
            state.length = Some(length);
        }
        self.notify();
        Some(RelayFeed {
            relay: self.clone(),
            pending: BytesMut::new(),
            received: 0,
            copied: 0,
            length,
            finished: false,
        })
    }

    /// Fails the relay if no feed ever claimed it (its fetch ended before any answer), so
    /// that its readers stop waiting; does nothing once claimed.
    pub fn abandon_unclaimed(&self) {
        {
            let mut state = self.lock();
            if state.length.is_some() || state.end != End::Open {
                return;
            }
            state.end = End::Failed;
        }
        self.notify();
    }

    /// Whether any reader (a peer's answer in progress) holds this relay.
    pub fn has_readers(&self) -> bool {
        self.changed.receiver_count() > 0
    }

    /// A reader from the first byte.
    pub fn reader(self: &Arc<Self>) -> RelayReader {
        RelayReader { relay: self.clone(), changes: self.changed.subscribe(), next: 0, sent: 0 }
    }
}

/// Writes what arrives into a relay. Dropped without [`RelayFeed::finish`], it fails the
/// relay.
///
/// Bytes are copied into the relay only while it has readers: a fetch nobody else waits
/// for (a read of this node's own, in a DC where it is the chunk's home) costs no copy.
/// A reader that joins later is caught up from the received prefix at the next
/// [`RelayFeed::push`], or from the verified chunk at [`RelayFeed::finish`] (no copy).
#[derive(Debug)]
pub struct RelayFeed {
    relay: Arc<Relay>,
    pending: BytesMut,
    /// Bytes received so far.
    received: usize,
    /// Bytes of the received prefix copied into the relay (pending or in pieces).
    copied: usize,
    length: usize,
    finished: bool,
}

impl RelayFeed {
    /// Takes note of what has arrived: `received` is every byte received so far, in order
    /// (not yet verified), of which the bytes beyond the last call are new. A prefix past the
    /// claimed length fails the relay.
    pub fn push(&mut self, received: &[u8]) {
        if received.len() > self.length || received.len() < self.received {
            self.fail();
            return;
        }
        self.received = received.len();
        if !self.relay.has_readers() {
            return;
        }
        self.pending.extend_from_slice(&received[self.copied..]);
        self.copied = received.len();
        let piece_bytes = self.relay.piece_bytes;
        if self.pending.len() >= piece_bytes {
            let mut state = self.relay.lock();
            while self.pending.len() >= piece_bytes {
                state.pieces.push(self.pending.split_to(piece_bytes).freeze());
            }
            drop(state);
            self.relay.notify();
        }
    }

    /// Ends the relay verified: `chunk` is what was fed, checked against its id. What was
    /// not copied (nobody was reading) is handed out from `chunk` itself.
    pub fn finish(self, chunk: &VerifiedChunk) {
        self.complete(chunk.bytes());
    }

    /// Ends the relay of a stripe (some pieces of a chunk, see `crate::stripe`) complete:
    /// `bytes` is what was fed. A stripe cannot be verified alone; whoever assembles the
    /// chunk verifies it, so the relay lets its readers have the last piece too.
    pub fn finish_stripe(self, bytes: &Bytes) {
        self.complete(bytes);
    }

    /// Ends the relay with every byte handed out: `bytes` is what was fed.
    fn complete(mut self, bytes: &Bytes) {
        if bytes.len() != self.received || self.received != self.length {
            self.fail();
            return;
        }
        let mut state = self.relay.lock();
        if !self.pending.is_empty() {
            state.pieces.push(self.pending.split().freeze());
        }
        if self.copied < self.length {
            state.pieces.push(bytes.slice(self.copied..));
        }
        state.end = End::Verified;
        drop(state);
        self.finished = true;
        self.relay.notify();
    }

    fn fail(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let mut state = self.relay.lock();
        if state.end == End::Open {
            state.end = End::Failed;
        }
        drop(state);
        self.relay.notify();
    }
}

impl Drop for RelayFeed {
    fn drop(&mut self) {
        self.fail();
    }
}

/// Why a relay could not be read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the relayed fetch failed before its chunk was verified")]
pub struct RelayFailed;

/// Reads a relay in order, holding back the latest piece until the feed ended verified.
#[derive(Debug)]
pub struct RelayReader {
    relay: Arc<Relay>,
    changes: watch::Receiver<u64>,
    next: usize,
    sent: usize,
}

impl RelayReader {
    /// The chunk's length once a feed claimed the relay; `Err` when the relay failed first.
    /// Waits while nobody feeds it.
    pub async fn length(&mut self) -> Result<usize, RelayFailed> {
        loop {
            {
                let state = self.relay.lock();
                if state.end == End::Failed {
                    return Err(RelayFailed);
                }
                if let Some(length) = state.length {
                    return Ok(length);
                }
            }
            // The sender lives in the relay, which this reader holds: this cannot end.
            let _ = self.changes.changed().await;
        }
    }

    /// The next piece that may be passed on; `Ok(None)` once the whole verified chunk was
    /// read; `Err` when the feed failed (what was read so far stays counted in
    /// [`RelayReader::sent`]).
    pub async fn next(&mut self) -> Result<Option<Bytes>, RelayFailed> {
        loop {
            {
                let state = self.relay.lock();
                match state.end {
                    End::Failed => return Err(RelayFailed),
                    End::Verified if self.next == state.pieces.len() => return Ok(None),
                    End::Verified | End::Open => {}
                }
                // Until the feed is verified, the latest piece waits for the next one.
                let releasable = state.end == End::Verified
                    || (self.next < state.pieces.len() && !self.relay.hold_back)
                    || self.next + 1 < state.pieces.len();
                if releasable {
                    let piece = state.pieces[self.next].clone();
                    self.next += 1;
                    self.sent += piece.len();
                    return Ok(Some(piece));
                }
            }
            let _ = self.changes.changed().await;
        }
    }

    /// Bytes handed out so far.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// Whether `whole` (the fetch's verified answer) starts with the bytes handed out, so
    /// the rest of it can follow them.
    pub fn sent_prefix_matches(&self, whole: &[u8]) -> bool {
        let state = self.relay.lock();
        let mut at = 0;
        for piece in &state.pieces[..self.next] {
            let end = at + piece.len();
            if end > whole.len() || whole[at..end] != piece[..] {
                return false;
            }
            at = end;
        }
        true
    }
}

/// Reads some byte ranges of a relay's chunk (a stripe's pieces, see `crate::stripe`), in
/// order, as [`RelayReader`] releases them; each call hands out what one released piece
/// holds of them, joined.
#[derive(Debug)]
pub struct StripeReader {
    reader: RelayReader,
    /// The ranges still to hand out, in order, not overlapping.
    ranges: std::collections::VecDeque<std::ops::Range<usize>>,
    length: usize,
    /// Offset in the chunk of the next byte the inner reader hands out.
    at: usize,
}

impl StripeReader {
    /// The bytes of `ranges` (in order, not overlapping) of what `reader` reads.
    pub fn new(reader: RelayReader, ranges: impl IntoIterator<Item = std::ops::Range<usize>>) -> Self {
        let ranges: std::collections::VecDeque<_> = ranges.into_iter().filter(|range| !range.is_empty()).collect();
        let length = ranges.iter().map(|range| range.len()).sum();
        let at = reader.sent();
        Self { reader, ranges, length, at }
    }

    /// Bytes it hands out in all.
    pub fn len(&self) -> usize {
        self.length
    }

    /// Whether it hands out nothing.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// The next bytes; `Ok(None)` once all were handed out; `Err` when the feed failed
    /// first, or ended short of them.
    pub async fn next(&mut self) -> Result<Option<Bytes>, RelayFailed> {
        while !self.ranges.is_empty() {
            let Some(piece) = self.reader.next().await? else { return Err(RelayFailed) };
            let (start, end) = (self.at, self.at + piece.len());
            self.at = end;
            let mut parts: Vec<Bytes> = Vec::new();
            while let Some(range) = self.ranges.front_mut() {
                if range.start >= end {
                    break;
                }
                let (from, to) = (range.start.max(start), range.end.min(end));
                if from < to {
                    parts.push(piece.slice(from - start..to - start));
                }
                if range.end <= end {
                    self.ranges.pop_front();
                } else {
                    range.start = range.start.max(end);
                    break;
                }
            }
            match parts.len() {
                0 => continue,
                1 => return Ok(parts.pop()),
                _ => {
                    let mut joined = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
                    for part in parts {
                        joined.extend_from_slice(&part);
                    }
                    return Ok(Some(joined.freeze()));
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn chunk(length: usize) -> VerifiedChunk {
        VerifiedChunk::hash(Bytes::from((0..length).map(|index| (index % 251) as u8).collect::<Vec<u8>>()))
    }

    async fn read_all(mut reader: RelayReader) -> Result<Vec<u8>, RelayFailed> {
        let mut out = Vec::new();
        while let Some(piece) = reader.next().await? {
            out.extend_from_slice(&piece);
        }
        Ok(out)
    }

    /// Whether `future` is still pending after the other tasks had a chance to run.
    async fn pending<F: std::future::Future>(future: F) -> bool {
        tokio::time::timeout(Duration::from_millis(20), future).await.is_err()
    }

    #[tokio::test]
    async fn a_stripe_reader_hands_out_exactly_its_ranges_and_a_stripe_relay_ends_complete() {
        // Goal: any set of ranges of an arriving chunk comes out whole and in order, also
        // ranges that start or end inside a relay piece or share one; a stripe's relay (no
        // verification possible) releases its last piece once its feed ends complete.
        let chunk = chunk(3 * RELAY_PIECE_BYTES + 5);
        let bytes = chunk.bytes().clone();
        let length = bytes.len();
        let sets: Vec<Vec<std::ops::Range<usize>>> = vec![
            vec![0..length],
            vec![0..1, 3..9, RELAY_PIECE_BYTES - 1..RELAY_PIECE_BYTES + 1],
            vec![7..RELAY_PIECE_BYTES + 3, 2 * RELAY_PIECE_BYTES..length],
            vec![length - 5..length],
            vec![],
        ];
        let relay = Relay::new();
        let tasks: Vec<_> = sets
            .iter()
            .map(|ranges| {
                let mut reader = StripeReader::new(relay.reader(), ranges.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    while let Some(piece) = reader.next().await? {
                        out.extend_from_slice(&piece);
                    }
                    Ok::<_, RelayFailed>(out)
                })
            })
            .collect();
        let mut feed = relay.claim(length).expect("the first claim feeds");
        for end in (0..=length).step_by(1000).chain([length]) {
            feed.push(&bytes[..end]);
            tokio::task::yield_now().await;
        }
        feed.finish_stripe(&bytes);
        for (task, ranges) in tasks.into_iter().zip(sets) {
            let expected: Vec<u8> = ranges.iter().flat_map(|range| bytes[range.clone()].to_vec()).collect();
            assert_eq!(task.await.expect("no panic").expect("complete"), expected);
        }
        // A stripe relay whose feed ends short fails its readers.
        let relay = Relay::new();
        let mut reader = StripeReader::new(relay.reader(), std::iter::once(0..10));
        let mut feed = relay.claim(10).expect("feeds");
        feed.push(&bytes[..4]);
        feed.finish_stripe(&bytes.slice(..4));
        assert_eq!(reader.next().await, Err(RelayFailed));
        // So does one that nobody ever fed.
        let relay = Relay::new();
        let mut reader = StripeReader::new(relay.reader(), std::iter::once(0..10));
        relay.abandon_unclaimed();
        assert_eq!(reader.next().await, Err(RelayFailed));
    }

    #[tokio::test]
    async fn readers_get_the_verified_chunk_whole_whenever_they_join() {
        let chunk = chunk(3 * RELAY_PIECE_BYTES + 5);
        let relay = Relay::new();
        let early = relay.reader();
        let mut feed = relay.claim(chunk.bytes().len()).expect("the first claim feeds");
        assert!(relay.claim(chunk.bytes().len()).is_none(), "one feed per relay");
        let early = tokio::spawn(read_all(early));
        let length = chunk.bytes().len();
        for end in (1000..length).step_by(1000).chain([length]) {
            feed.push(&chunk.bytes()[..end]);
        }
        let late = relay.reader();
        feed.finish(&chunk);
        assert_eq!(early.await.unwrap().unwrap(), chunk.bytes().to_vec());
        assert_eq!(read_all(late).await.unwrap(), chunk.bytes().to_vec());
    }

    #[tokio::test]
    async fn a_relay_nobody_reads_copies_nothing_and_late_readers_catch_up() {
        // Goal: a fetch no peer waits on costs no copy; a reader joining part way gets the
        // prefix it missed at the next push, and one joining after the last push gets the
        // verified chunk itself. Every reader gets exactly the chunk.
        let chunk = chunk(4 * RELAY_PIECE_BYTES + 7);
        let bytes = chunk.bytes().clone();
        let relay = Relay::new();
        let mut feed = relay.claim(bytes.len()).unwrap();
        feed.push(&bytes[..RELAY_PIECE_BYTES + 3]);
        assert_eq!((feed.copied, relay.lock().pieces.len()), (0, 0), "nobody reads: nothing copied");
        let middle = relay.reader();
        feed.push(&bytes[..3 * RELAY_PIECE_BYTES]);
        assert_eq!(feed.copied, 3 * RELAY_PIECE_BYTES, "the reader's arrival made the feed catch up");
        let middle = tokio::spawn(read_all(middle));
        feed.push(&bytes);
        let late = relay.reader();
        feed.finish(&chunk);
        assert_eq!(middle.await.unwrap().unwrap(), bytes.to_vec());
        assert_eq!(read_all(late).await.unwrap(), bytes.to_vec());

        // A reader that leaves stops the copying; the next one is caught up again.
        let relay = Relay::new();
        let mut feed = relay.claim(bytes.len()).unwrap();
        let gone = relay.reader();
        feed.push(&bytes[..RELAY_PIECE_BYTES]);
        assert_eq!(feed.copied, RELAY_PIECE_BYTES);
        drop(gone);
        feed.push(&bytes[..2 * RELAY_PIECE_BYTES]);
        assert_eq!(feed.copied, RELAY_PIECE_BYTES, "nobody reads: nothing more copied");
        let next = relay.reader();
        feed.push(&bytes);
        assert_eq!(feed.copied, bytes.len());
        feed.finish(&chunk);
        assert_eq!(read_all(next).await.unwrap(), bytes.to_vec());

        // Nobody ever read it: finishing hands the verified chunk out whole, without a copy.
        let relay = Relay::new();
        let mut feed = relay.claim(bytes.len()).unwrap();
        feed.push(&bytes);
        assert_eq!(feed.copied, 0);
        let late = relay.reader();
        feed.finish(&chunk);
        let pieces = relay.lock().pieces.clone();
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].as_ptr(), bytes.as_ptr(), "the piece is the verified chunk's own bytes");
        assert_eq!(read_all(late).await.unwrap(), bytes.to_vec());
    }

    #[tokio::test]
    async fn the_last_piece_waits_for_verification() {
        let chunk = chunk(2 * RELAY_PIECE_BYTES);
        let relay = Relay::new();
        let mut reader = relay.reader();
        let mut feed = relay.claim(chunk.bytes().len()).unwrap();
        assert_eq!(reader.length().await, Ok(chunk.bytes().len()));
        feed.push(chunk.bytes());
        // Every byte has arrived, but none is verified: one piece may go, the last may not.
        let first = reader.next().await.unwrap().unwrap();
        assert_eq!(first.len(), RELAY_PIECE_BYTES);
        assert!(pending(reader.next()).await, "the last piece is held back");
        feed.finish(&chunk);
        assert_eq!(reader.next().await.unwrap().unwrap().len(), RELAY_PIECE_BYTES);
        assert_eq!(reader.next().await, Ok(None));
        assert_eq!(reader.sent(), chunk.bytes().len());
    }

    #[tokio::test]
    async fn a_failed_feed_never_completes_a_reader() {
        let good = chunk(2 * RELAY_PIECE_BYTES);
        let mut corrupt = good.bytes().to_vec();
        corrupt[10] ^= 1;
        let relay = Relay::new();
        let mut reader = relay.reader();
        let mut feed = relay.claim(corrupt.len()).unwrap();
        feed.push(&corrupt);
        let first = reader.next().await.unwrap().unwrap();
        // The fetch's check fails: the feed is dropped unfinished.
        drop(feed);
        assert_eq!(reader.next().await, Err(RelayFailed));
        assert_eq!(reader.sent(), first.len());
        assert!(!reader.sent_prefix_matches(good.bytes()), "the corrupt prefix is detected");
        assert!(relay.claim(1).is_none(), "a failed relay is not fed again");
    }

    #[tokio::test]
    async fn a_reader_of_a_failed_relay_can_continue_from_the_verified_answer() {
        let chunk = chunk(3 * RELAY_PIECE_BYTES);
        let relay = Relay::new();
        let mut reader = relay.reader();
        let mut feed = relay.claim(chunk.bytes().len()).unwrap();
        feed.push(&chunk.bytes()[..2 * RELAY_PIECE_BYTES]);
        assert!(reader.next().await.unwrap().is_some());
        drop(feed); // say, the stream broke; another holder then gave the chunk whole
        assert_eq!(reader.next().await, Err(RelayFailed));
        assert!(reader.sent_prefix_matches(chunk.bytes()));
        assert_eq!(reader.sent(), RELAY_PIECE_BYTES);
    }

    #[tokio::test]
    async fn feeds_that_overrun_or_end_short_fail() {
        let chunk = chunk(1000);
        let relay = Relay::new();
        let mut feed = relay.claim(999).unwrap();
        feed.push(chunk.bytes());
        assert_eq!(relay.reader().next().await, Err(RelayFailed));

        let relay = Relay::new();
        let mut feed = relay.claim(1000).unwrap();
        feed.push(&chunk.bytes()[..500]);
        feed.finish(&chunk);
        assert_eq!(relay.reader().next().await, Err(RelayFailed));
    }

    #[tokio::test]
    async fn length_waits_for_a_feed_and_reports_failure() {
        let relay = Relay::new();
        let mut reader = relay.reader();
        assert!(pending(reader.length()).await, "nobody feeds it yet");
        let feed = relay.claim(7).unwrap();
        assert_eq!(reader.length().await, Ok(7));
        drop(feed);
        assert_eq!(relay.reader().length().await, Err(RelayFailed));
    }
}
