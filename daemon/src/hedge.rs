//! When to hedge a chunk request to a holder: a plain struct fed the durations of peer
//! chunk requests that succeeded, answering how long to wait for the first holder before
//! asking a second one as well.
//!
//! The delay is the [`HEDGE_PERCENTILE`]-th percentile of the last [`HEDGE_SAMPLES_MAX`]
//! successful requests, so that only requests slower than nearly all recent ones are
//! hedged (about 1 - percentile of them: a bounded amount of extra load), clamped to
//! [`HEDGE_DELAY_MIN`]..[`HEDGE_DELAY_MAX`]. Until [`HEDGE_SAMPLES_MIN`] samples exist it
//! answers [`HEDGE_DELAY_INITIAL`].
//!
//! Non-goals: choosing which holder to ask second (the mesh's candidate order does), and
//! cancelling the loser (dropping its future resets the stream).

use std::collections::VecDeque;
use std::time::Duration;

/// Recent request durations kept.
pub const HEDGE_SAMPLES_MAX: usize = 256;
/// Samples needed before the percentile is trusted.
pub const HEDGE_SAMPLES_MIN: usize = 16;
/// Percentile of recent durations after which a request is hedged, in percent.
pub const HEDGE_PERCENTILE: usize = 95;
/// Shortest hedge delay: below it a hedge mostly doubles load on a healthy mesh.
pub const HEDGE_DELAY_MIN: Duration = Duration::from_millis(20);
/// Longest hedge delay: a holder this slow is worth racing whatever history says.
pub const HEDGE_DELAY_MAX: Duration = Duration::from_secs(2);
/// Delay before enough samples exist: several 4 MiB transfers on a datacenter link.
pub const HEDGE_DELAY_INITIAL: Duration = Duration::from_millis(250);

const _: () = assert!(HEDGE_SAMPLES_MIN <= HEDGE_SAMPLES_MAX);
const _: () = assert!(HEDGE_PERCENTILE > 50 && HEDGE_PERCENTILE < 100);
const _: () = assert!(HEDGE_DELAY_MIN.as_nanos() <= HEDGE_DELAY_INITIAL.as_nanos());
const _: () = assert!(HEDGE_DELAY_INITIAL.as_nanos() <= HEDGE_DELAY_MAX.as_nanos());

/// Recent request durations and the hedge delay they imply.
#[derive(Debug, Default)]
pub struct HedgePolicy {
    samples: VecDeque<Duration>,
}

impl HedgePolicy {
    /// A policy with no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records how long a successful request to a holder took.
    pub fn record_success(&mut self, took: Duration) {
        if self.samples.len() == HEDGE_SAMPLES_MAX {
            self.samples.pop_front();
        }
        self.samples.push_back(took);
    }

    /// How long to wait for a holder before asking the next one too.
    pub fn delay(&self) -> Duration {
        if self.samples.len() < HEDGE_SAMPLES_MIN {
            return HEDGE_DELAY_INITIAL;
        }
        let mut sorted: Vec<Duration> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        // Nearest-rank percentile.
        let rank = (sorted.len() * HEDGE_PERCENTILE).div_ceil(100).clamp(1, sorted.len());
        sorted[rank - 1].clamp(HEDGE_DELAY_MIN, HEDGE_DELAY_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    #[test]
    fn without_history_the_initial_delay_holds() {
        // Goal: a fresh node neither hedges instantly nor waits forever.
        let mut policy = HedgePolicy::new();
        assert_eq!(policy.delay(), HEDGE_DELAY_INITIAL);
        for _ in 0..HEDGE_SAMPLES_MIN - 1 {
            policy.record_success(ms(1));
        }
        assert_eq!(policy.delay(), HEDGE_DELAY_INITIAL);
        policy.record_success(ms(1));
        assert_eq!(policy.delay(), HEDGE_DELAY_MIN);
    }

    #[test]
    fn the_delay_is_the_percentile_of_recent_requests() {
        // Goal: 100 requests of 1..=100 ms hedge after the 95th (95 ms); a slow tail
        // beyond the percentile does not move it.
        let mut policy = HedgePolicy::new();
        for value in 1..=100 {
            policy.record_success(ms(value));
        }
        assert_eq!(policy.delay(), ms(95));
        for _ in 0..4 {
            policy.record_success(ms(10_000));
        }
        assert_eq!(policy.delay(), ms(99));
    }

    #[test]
    fn old_samples_age_out() {
        // Goal: after the mesh gets faster, the delay follows within HEDGE_SAMPLES_MAX requests.
        let mut policy = HedgePolicy::new();
        for _ in 0..HEDGE_SAMPLES_MAX {
            policy.record_success(ms(900));
        }
        assert_eq!(policy.delay(), ms(900));
        for _ in 0..HEDGE_SAMPLES_MAX {
            policy.record_success(ms(40));
        }
        assert_eq!(policy.delay(), ms(40));
    }

    proptest! {
        #[test]
        fn delay_stays_within_bounds_and_memory_is_bounded(samples in proptest::collection::vec(0u64..10_000, 0..600)) {
            let mut policy = HedgePolicy::new();
            for value in &samples {
                policy.record_success(ms(*value));
                let delay = policy.delay();
                prop_assert!(delay >= HEDGE_DELAY_MIN && delay <= HEDGE_DELAY_MAX);
                prop_assert!(policy.samples.len() <= HEDGE_SAMPLES_MAX);
            }
            // At most (100 - HEDGE_PERCENTILE)% of the recorded window is slower than the delay.
            if policy.samples.len() >= HEDGE_SAMPLES_MIN {
                let delay = policy.delay();
                let slower = policy.samples.iter().filter(|took| **took > delay).count();
                prop_assert!(
                    delay == HEDGE_DELAY_MAX || slower * 100 <= policy.samples.len() * (100 - HEDGE_PERCENTILE)
                );
            }
        }
    }
}
