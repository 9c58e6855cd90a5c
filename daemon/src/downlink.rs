//! How fast this node has been receiving chunk bytes from peers, against its link's rate
//! (`--link-rate`): whether its own downlink is what its fetches wait on.
//!
//! Why: a hedge asks a second holder for a chunk the first is slow to send. When the node's
//! downlink is already nearly full, the first holder is slow because the link is shared,
//! and the second copy comes through the same link: it cannot arrive sooner, and every byte
//! of it is taken from the first copy and from the node's other transfers. Measured (16
//! readers on 25 Mbit links taking a 256 MiB object from a fast seed, docs/benchmarks.md
//! 2026-12-01): readers' downlinks carried 264-308 MiB for the 256 MiB object, 31 hedges
//! at one of them and 8 won.
//!
//! A plain struct fed the time: bytes are summed in [`DOWNLINK_BUCKETS`] buckets covering
//! the last [`DOWNLINK_WINDOW`].

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How far back the receive rate looks.
pub const DOWNLINK_WINDOW: Duration = Duration::from_secs(4);
/// Buckets the window is counted in (250 ms each).
pub const DOWNLINK_BUCKETS: usize = 16;
/// Above this share of the link's rate the downlink counts as full: the share below which
/// the upload tuner counts a link as idle (`upload_line::UPLOAD_LINK_IDLE_BELOW`).
pub const DOWNLINK_FULL_ABOVE: f64 = crate::upload_line::UPLOAD_LINK_IDLE_BELOW;

const BUCKET: Duration = Duration::from_millis(DOWNLINK_WINDOW.as_millis() as u64 / DOWNLINK_BUCKETS as u64);
const _: () = assert!(BUCKET.as_millis() as u64 * DOWNLINK_BUCKETS as u64 == DOWNLINK_WINDOW.as_millis() as u64);

/// The bytes received over the last [`DOWNLINK_WINDOW`], and the link they came over.
#[derive(Debug)]
pub struct DownlinkMeter {
    /// The link's rate in bytes per second (None: not known, never full).
    link: Option<u64>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    epoch: Instant,
    /// Index (since `epoch`) of the newest bucket.
    newest: u64,
    buckets: [u64; DOWNLINK_BUCKETS],
}

impl DownlinkMeter {
    /// A meter for a link of `link` bytes per second (None or 0: unknown).
    pub fn new(link: Option<u64>, now: Instant) -> Self {
        Self {
            link: link.filter(|link| *link > 0),
            state: Mutex::new(State { epoch: now, newest: 0, buckets: [0; DOWNLINK_BUCKETS] }),
        }
    }

    /// Counts `bytes` received at `now`.
    pub fn record(&self, bytes: u64, now: Instant) {
        let mut state = self.lock();
        let index = state.advance(now);
        state.buckets[index] += bytes;
    }

    /// Bytes per second received over the last [`DOWNLINK_WINDOW`].
    pub fn rate(&self, now: Instant) -> f64 {
        let mut state = self.lock();
        state.advance(now);
        state.buckets.iter().sum::<u64>() as f64 / DOWNLINK_WINDOW.as_secs_f64()
    }

    /// Whether the link is known and carried more than [`DOWNLINK_FULL_ABOVE`] of its rate
    /// over the last [`DOWNLINK_WINDOW`].
    pub fn full(&self, now: Instant) -> bool {
        self.link.is_some_and(|link| self.rate(now) > DOWNLINK_FULL_ABOVE * link as f64)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl State {
    /// Moves the window to `now`, emptying the buckets it leaves; the index of `now`'s bucket.
    fn advance(&mut self, now: Instant) -> usize {
        let at = (now.saturating_duration_since(self.epoch).as_millis() / BUCKET.as_millis()) as u64;
        if at > self.newest {
            let stale = (at - self.newest).min(DOWNLINK_BUCKETS as u64);
            for step in 1..=stale {
                self.buckets[((self.newest + step) % DOWNLINK_BUCKETS as u64) as usize] = 0;
            }
            self.newest = at;
        }
        (self.newest % DOWNLINK_BUCKETS as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn the_rate_covers_the_window_and_forgets_older_bytes() {
        let start = Instant::now();
        let meter = DownlinkMeter::new(Some(10 * MB), start);
        // 10 MB/s for 4 s, in 100 ms steps.
        for step in 0..40 {
            meter.record(MB, start + Duration::from_millis(100 * step));
        }
        let at = start + Duration::from_millis(3_999);
        assert_eq!(meter.rate(at), 10.0 * MB as f64);
        assert!(meter.full(at));
        // Two seconds of silence: half the window left.
        let later = at + Duration::from_secs(2);
        assert!((meter.rate(later) - 5.0 * MB as f64).abs() <= 1.0 * MB as f64, "{}", meter.rate(later));
        assert!(!meter.full(later), "5 MB/s of a 10 MB/s link is not full");
        // A long silence empties it, however long.
        assert_eq!(meter.rate(later + Duration::from_secs(3600)), 0.0);
        meter.record(MB, later + Duration::from_secs(3600));
        assert_eq!(meter.rate(later + Duration::from_secs(3600)), MB as f64 / 4.0);
    }

    #[test]
    fn full_needs_a_known_link_and_more_than_its_share() {
        let start = Instant::now();
        let at = start + Duration::from_millis(3_999);
        let fill = |meter: &DownlinkMeter, bytes_per_second: u64| {
            for second in 0..4 {
                meter.record(bytes_per_second, start + Duration::from_secs(second));
            }
        };
        let busy = DownlinkMeter::new(Some(10 * MB), start);
        fill(&busy, 9 * MB);
        assert!(busy.full(at));
        let idle = DownlinkMeter::new(Some(10 * MB), start);
        fill(&idle, 7 * MB);
        assert!(!idle.full(at));
        for link in [None, Some(0)] {
            let unknown = DownlinkMeter::new(link, start);
            fill(&unknown, 100 * MB);
            assert!(!unknown.full(at), "an unknown link is never full");
        }
    }
}
