//! The upload line: how many whole-chunk answers a node transmits at once, and who may wait
//! for one. No I/O; the data plane's server takes slots from it and reports what it sent.
//!
//! Why a line at all: when one node holds a chunk many peers want (its home after an origin
//! fetch, the node that put a fresh object), sharing its link among all of them makes every
//! copy arrive at the same late moment, and none of the receivers can pass the chunk on
//! meanwhile. Sending a few at a time at full speed makes the first copies arrive early;
//! their receivers serve it too.
//!
//! Rules:
//! - A home's request (`GetChunkForHome`, or a home fetch answered from a whole chunk) waits
//!   its turn, first come first served: the home has nowhere else to go.
//! - A reader's request takes a slot that is free now, or is answered `Busy`: it can ask
//!   another holder or the chunk's home. So readers never stand in front of a home, and a
//!   reader never waits (without progress) in a line.
//! - One peer gets at most [`UPLOAD_SLOTS_PER_PEER`] reader answers at once.
//! - With the node's link rate known, [`UploadLine::tune`] adds slots while requests are
//!   waiting or turned away and the uploads leave the link idle, and takes them back when
//!   the link is full or the demand is gone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Chunk answers a node transmits at once before any tuning, and always at least.
///
/// Why 3: see the module doc; measured against 1 and 2 on equal links (docs/benchmarks.md,
/// 2026-11-29): one slot was slower everywhere, two slowed 4-node trials.
pub const UPLOAD_SLOTS: usize = 3;

/// Most slots the tuner may add to [`UPLOAD_SLOTS`].
///
/// Why: every slot holds one chunk in memory (at most `CHUNK_BYTES_MAX`) until the peer has
/// it, so slots bound the memory uploads take: 32 slots are 128 MiB. A node on a 400 Mbit
/// link serving 25 Mbit readers fills its link with 16.
pub const UPLOAD_SLOTS_EXTRA_MAX: usize = 29;

/// Reader answers one peer may have in slots at once.
///
/// Why: a reader asks for a window of chunks at once; sending it many of them side by side
/// only splits its downlink between them and takes slots other readers could use.
pub const UPLOAD_SLOTS_PER_PEER: usize = 2;

/// How often [`tune_periodically`] looks at the upload rate.
pub const UPLOAD_TUNE_INTERVAL: Duration = Duration::from_millis(250);

/// Weight of the latest interval in the smoothed upload rate (a time constant of about 1 s
/// at [`UPLOAD_TUNE_INTERVAL`]).
const RATE_SMOOTHING: f64 = 0.25;

/// A slot is added while the smoothed upload rate is below this share of the link.
pub const UPLOAD_LINK_IDLE_BELOW: f64 = 0.8;

/// A free added slot is taken back while the smoothed upload rate is above this share of
/// the link (the uploads fill it).
pub const UPLOAD_LINK_FULL_ABOVE: f64 = 0.95;

/// Why a reader's request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// Every slot is taken (or homes wait for one).
    Full,
    /// The peer already has [`UPLOAD_SLOTS_PER_PEER`] answers in slots.
    PeerAtLimit,
}

impl NoSlot {
    /// The message of the `Busy` answer.
    pub fn message(self) -> &'static str {
        match self {
            NoSlot::Full => "every upload slot is taken",
            NoSlot::PeerAtLimit => "already sending this peer UPLOAD_SLOTS_PER_PEER chunks",
        }
    }
}

/// See the module doc.
#[derive(Debug)]
pub struct UploadLine {
    slots: Arc<Semaphore>,
    /// Slots added by the tuner (and not yet taken back).
    extra: AtomicUsize,
    /// Requests waiting for a slot (homes only).
    waiting: Arc<AtomicUsize>,
    /// Reader requests turned away for want of a free slot since the last tune.
    turned_away: AtomicU64,
    /// Reader answers in slots, per peer.
    per_peer: Arc<Mutex<HashMap<PeerId, usize>>>,
    /// Chunk bytes written to peers.
    sent: AtomicU64,
}

/// A slot held for one answer; freed when dropped.
#[derive(Debug)]
pub struct UploadSlot {
    _permit: OwnedSemaphorePermit,
    _peer: Option<PeerShare>,
}

impl From<OwnedSemaphorePermit> for UploadSlot {
    fn from(permit: OwnedSemaphorePermit) -> Self {
        Self { _permit: permit, _peer: None }
    }
}

/// One of a peer's reader answers; uncounted when dropped.
#[derive(Debug)]
struct PeerShare {
    per_peer: Arc<Mutex<HashMap<PeerId, usize>>>,
    peer: PeerId,
}

impl Drop for PeerShare {
    fn drop(&mut self) {
        let mut per_peer = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = per_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

/// Uncounts a waiter when its wait ends, however it ends.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl UploadLine {
    /// A line of `slots` slots.
    pub fn new(slots: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            extra: AtomicUsize::new(0),
            waiting: Arc::new(AtomicUsize::new(0)),
            turned_away: AtomicU64::new(0),
            per_peer: Arc::new(Mutex::new(HashMap::new())),
            sent: AtomicU64::new(0),
        }
    }

    /// A slot for a reader's answer to `peer`, now, or why not.
    pub fn reader_slot(&self, peer: PeerId) -> Result<UploadSlot, NoSlot> {
        let mut per_peer = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
        let count = per_peer.entry(peer).or_insert(0);
        if *count >= UPLOAD_SLOTS_PER_PEER {
            return Err(NoSlot::PeerAtLimit);
        }
        // Permits released while homes wait go to them, so a free permit means none waits.
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(permit) if self.waiting.load(Ordering::Relaxed) == 0 => permit,
            other => {
                drop(other);
                if *count == 0 {
                    per_peer.remove(&peer);
                }
                self.turned_away.fetch_add(1, Ordering::Relaxed);
                return Err(NoSlot::Full);
            }
        };
        *count += 1;
        Ok(UploadSlot { _permit: permit, _peer: Some(PeerShare { per_peer: self.per_peer.clone(), peer }) })
    }

    /// Waits for a slot, first come first served (None when the line is closed).
    pub async fn turn(&self) -> Option<UploadSlot> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(self.waiting.clone());
        self.slots.clone().acquire_owned().await.ok().map(UploadSlot::from)
    }

    /// Counts `bytes` of chunk answers written to peers.
    pub fn count_sent(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Chunk bytes written to peers so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Slots the line has now.
    pub fn slots(&self) -> usize {
        UPLOAD_SLOTS + self.extra.load(Ordering::Relaxed)
    }

    /// One tuning step, given the smoothed upload rate and the link's rate (bytes per
    /// second): adds a slot while requests wait or were turned away and the link is idle
    /// enough; takes a free added slot back when the link is full, or when nothing wants it.
    pub fn tune(&self, rate: f64, link: f64) {
        let turned_away = self.turned_away.swap(0, Ordering::Relaxed);
        let demand = turned_away > 0 || self.waiting.load(Ordering::Relaxed) > 0;
        let extra = self.extra.load(Ordering::Relaxed);
        if demand && rate < UPLOAD_LINK_IDLE_BELOW * link && extra < UPLOAD_SLOTS_EXTRA_MAX {
            self.slots.add_permits(1);
            self.extra.store(extra + 1, Ordering::Relaxed);
        } else if extra > 0 && (rate > UPLOAD_LINK_FULL_ABOVE * link || !demand) && self.slots.forget_permits(1) == 1 {
            self.extra.store(extra - 1, Ordering::Relaxed);
        }
    }
}

/// Tunes `line` every [`UPLOAD_TUNE_INTERVAL`] against a link of `link` bytes per second,
/// until `shutdown`.
pub async fn tune_periodically(line: Arc<UploadLine>, link: u64, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(UPLOAD_TUNE_INTERVAL);
    let mut last = line.sent();
    let mut rate = 0.0f64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let sent = line.sent();
        let interval_rate = sent.saturating_sub(last) as f64 / UPLOAD_TUNE_INTERVAL.as_secs_f64();
        last = sent;
        rate += RATE_SMOOTHING * (interval_rate - rate);
        line.tune(rate, link as f64);
        metrics::gauge!("cachemesh_upload_slots").set(line.slots() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[tokio::test]
    async fn readers_take_free_slots_or_are_turned_away_and_homes_wait_in_order() {
        let line = Arc::new(UploadLine::new(2));
        let (a, b) = (peer(), peer());
        let first = line.reader_slot(a).expect("a free slot");
        let second = line.reader_slot(b).expect("a second free slot");
        assert_eq!(line.reader_slot(peer()).unwrap_err(), NoSlot::Full);

        // Two homes wait; they are served in order as slots free up.
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut homes = Vec::new();
        for home in 0..2 {
            let (home_line, order_tx) = (line.clone(), order_tx.clone());
            homes.push(tokio::spawn(async move {
                let slot = home_line.turn().await.unwrap();
                order_tx.send(home).unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(slot);
            }));
            while line.waiting.load(Ordering::Relaxed) <= home {
                tokio::task::yield_now().await;
            }
        }
        // A home that gives up leaves the line.
        let gave_up = {
            let line = line.clone();
            tokio::spawn(async move { line.turn().await.map(drop) })
        };
        while line.waiting.load(Ordering::Relaxed) < 3 {
            tokio::task::yield_now().await;
        }
        gave_up.abort();
        let _ = gave_up.await;
        assert_eq!(line.waiting.load(Ordering::Relaxed), 2, "a waiter that gave up left the line");
        drop(first);
        // A slot freed while homes wait goes to them, not to a reader asking now.
        assert_eq!(line.reader_slot(peer()).unwrap_err(), NoSlot::Full);
        drop(second);
        for home in homes {
            home.await.unwrap();
        }
        assert_eq!(order_rx.recv().await, Some(0));
        assert_eq!(order_rx.recv().await, Some(1));
        assert!(line.reader_slot(a).is_ok(), "the line is free again");
    }

    #[test]
    fn one_peer_gets_at_most_its_share_of_slots() {
        let line = UploadLine::new(8);
        let reader = peer();
        let held: Vec<UploadSlot> =
            (0..UPLOAD_SLOTS_PER_PEER).map(|_| line.reader_slot(reader).expect("within the share")).collect();
        assert_eq!(line.reader_slot(reader).unwrap_err(), NoSlot::PeerAtLimit);
        assert!(line.reader_slot(peer()).is_ok(), "other peers still get slots");
        drop(held);
        assert!(line.reader_slot(reader).is_ok(), "the share is back once its answers end");
        assert!(line.per_peer.lock().unwrap().len() <= 2, "no entry outlives its answers for long");
    }

    #[test]
    fn slots_grow_while_the_link_is_idle_and_wanted_and_shrink_when_it_is_full_or_unwanted() {
        const LINK: f64 = 1_000_000.0;
        let line = UploadLine::new(UPLOAD_SLOTS);
        let held: Vec<UploadSlot> = (0..UPLOAD_SLOTS).map(|_| line.reader_slot(peer()).unwrap()).collect();

        // Turned away with the link half idle: a slot is added, and a reader gets it.
        assert!(line.reader_slot(peer()).is_err());
        line.tune(0.5 * LINK, LINK);
        assert_eq!(line.slots(), UPLOAD_SLOTS + 1);
        let added = line.reader_slot(peer()).expect("the added slot");

        // Turned away with the link nearly full: nothing added.
        assert!(line.reader_slot(peer()).is_err());
        line.tune(0.9 * LINK, LINK);
        assert_eq!(line.slots(), UPLOAD_SLOTS + 1);

        // No demand and a free added slot: taken back; never below UPLOAD_SLOTS.
        drop(added);
        line.tune(0.5 * LINK, LINK);
        assert_eq!(line.slots(), UPLOAD_SLOTS);
        drop(held);
        line.tune(0.0, LINK);
        assert_eq!(line.slots(), UPLOAD_SLOTS);

        // Demand without end: growth stops at UPLOAD_SLOTS_EXTRA_MAX.
        for _ in 0..2 * UPLOAD_SLOTS_EXTRA_MAX {
            line.turned_away.fetch_add(1, Ordering::Relaxed);
            line.tune(0.0, LINK);
        }
        assert_eq!(line.slots(), UPLOAD_SLOTS + UPLOAD_SLOTS_EXTRA_MAX);

        // A full link gives free added slots back even while readers are turned away.
        line.turned_away.fetch_add(1, Ordering::Relaxed);
        line.tune(LINK, LINK);
        assert_eq!(line.slots(), UPLOAD_SLOTS + UPLOAD_SLOTS_EXTRA_MAX - 1);
    }
}
