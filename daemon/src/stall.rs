//! Deadlines that move with progress, for transfers whose length in time depends on links
//! the node does not control.
//!
//! A 4 MiB chunk takes 3 ms on a 10 Gbit link to itself and over a minute when a slow
//! host's link is shared by dozens of transfers. A fixed end-to-end deadline either cuts
//! off slow transfers that were still moving (and the bytes already sent are thrown away
//! and fetched again) or waits far too long on a dead one. A transfer here fails when it
//! has made no progress for its limit: every [`PROGRESS_QUANTUM_BYTES`] moved push the
//! deadline out to `limit` from then.
//!
//! Progress is counted in quanta, not in reads, so a peer cannot hold a transfer open by
//! trickling a byte now and then: it must move a quantum per limit (64 KiB per 10 s is
//! about 52 kbit/s, far below any datacenter link's share).
//!
//! Invariant: a transfer with no progress fails within `limit` of its start or of its last
//! quantum, whichever is later.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Bytes that count as one step of progress.
pub const PROGRESS_QUANTUM_BYTES: u64 = 64 * 1024;

/// The progress of one transfer: when it last moved a quantum.
#[derive(Debug)]
pub struct Progress {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Start, or when the last quantum completed.
    moved_at: Instant,
    /// Bytes since the last quantum.
    pending: u64,
    /// Bytes moved so far.
    bytes: u64,
}

impl Progress {
    /// A transfer starting at `now`.
    pub fn new(now: Instant) -> Self {
        Self { state: Mutex::new(State { moved_at: now, pending: 0, bytes: 0 }) }
    }

    /// Records `bytes` moved at `now`.
    pub fn advance(&self, bytes: u64, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.pending += bytes;
        state.bytes += bytes;
        if state.pending >= PROGRESS_QUANTUM_BYTES {
            state.pending %= PROGRESS_QUANTUM_BYTES;
            state.moved_at = now;
        }
    }

    /// Records a step that counts as a whole quantum (an answer's head arriving, say).
    pub fn mark(&self, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.moved_at = now;
    }

    /// Bytes moved so far, to say where a stalled transfer stood.
    pub fn bytes_so_far(&self) -> u64 {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).bytes
    }

    /// When the transfer stalls unless it moves a quantum first.
    pub fn deadline(&self, limit: Duration) -> Instant {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).moved_at + limit
    }
}

/// The transfer stopped moving for its whole limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled;

/// Runs `work` until it ends, or until `progress` has not moved for `limit`.
pub async fn until_stalled<T>(
    limit: Duration,
    progress: &Progress,
    work: impl Future<Output = T>,
) -> Result<T, Stalled> {
    let watchdog = async {
        loop {
            let deadline = progress.deadline(limit);
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        done = work => Ok(done),
        () = watchdog => Err(Stalled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    #[test]
    fn a_quantum_moves_the_deadline_and_less_does_not() {
        let start = Instant::now();
        let progress = Progress::new(start);
        assert_eq!(progress.deadline(LIMIT), start + LIMIT);

        // Trickling: many small reads that add up to less than a quantum move nothing.
        for second in 1..=9 {
            progress.advance(100, start + Duration::from_secs(second));
        }
        assert_eq!(progress.deadline(LIMIT), start + LIMIT);

        // The read that completes the quantum moves the deadline to `limit` after it.
        let later = start + Duration::from_secs(9);
        progress.advance(PROGRESS_QUANTUM_BYTES, later);
        assert_eq!(progress.deadline(LIMIT), later + LIMIT);

        // What was over the quantum counts towards the next one.
        let pending = (900 + PROGRESS_QUANTUM_BYTES) % PROGRESS_QUANTUM_BYTES;
        let next = later + Duration::from_secs(5);
        progress.advance(PROGRESS_QUANTUM_BYTES - pending - 1, next);
        assert_eq!(progress.deadline(LIMIT), later + LIMIT);
        progress.advance(1, next);
        assert_eq!(progress.deadline(LIMIT), next + LIMIT);
    }

    #[test]
    fn a_mark_counts_as_a_quantum() {
        let start = Instant::now();
        let progress = Progress::new(start);
        let head = start + Duration::from_secs(3);
        progress.mark(head);
        assert_eq!(progress.deadline(LIMIT), head + LIMIT);
    }

    #[test]
    fn bytes_so_far_counts_every_byte_and_no_mark() {
        let start = Instant::now();
        let progress = Progress::new(start);
        assert_eq!(progress.bytes_so_far(), 0);
        progress.mark(start);
        progress.advance(10, start);
        progress.advance(PROGRESS_QUANTUM_BYTES, start);
        assert_eq!(progress.bytes_so_far(), PROGRESS_QUANTUM_BYTES + 10, "bytes short of a quantum count too");
    }

    #[tokio::test]
    async fn work_that_never_moves_stalls() {
        let progress = Progress::new(Instant::now());
        let outcome = until_stalled(Duration::from_millis(50), &progress, std::future::pending::<()>()).await;
        assert_eq!(outcome, Err(Stalled));
    }

    #[tokio::test]
    async fn work_that_keeps_moving_outlives_its_limit_many_times_over() {
        // Limit 1 s; the work moves a quantum every 50 ms for 3 s in all. The outcome, not
        // the time taken, is checked: a 20-fold margin keeps a loaded machine from failing it.
        let limit = Duration::from_secs(1);
        let progress = Progress::new(Instant::now());
        let work = async {
            for _ in 0..60 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                progress.advance(PROGRESS_QUANTUM_BYTES, Instant::now());
            }
            "done"
        };
        assert_eq!(until_stalled(limit, &progress, work).await, Ok("done"));
    }

    #[tokio::test]
    async fn finished_work_is_returned_at_once() {
        let progress = Progress::new(Instant::now());
        assert_eq!(until_stalled(LIMIT, &progress, async { 7 }).await, Ok(7));
    }
}
