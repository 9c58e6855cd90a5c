//! An in-order stream over indexes whose items are fetched concurrently, with separate
//! bounds on the fetches running and the items held.
//!
//! Why not `StreamExt::buffered(n)`: its n slots hold running fetches and arrived items
//! alike, so one slow item at the head leaves the slots behind it filled with items that
//! have arrived and wait, and the link idles. Measured on an 8-node cold start, reads with
//! `buffered(8)` had 4.8 fetches running on average. Here `running` fetches keep going as
//! long as fewer than `held` items are held (running plus arrived and waiting), so a slow
//! head costs memory up to `held` items instead of throughput.
//!
//! Invariants: items come out in index order, each once; at most `running` fetches run and
//! at most `held` items are held at any time; dropping the stream drops the fetches; after
//! the last item the stream answers None, however often it is polled.

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Range;

use futures::stream::{FuturesUnordered, Stream, StreamExt};

struct Window<T, F, Fut> {
    next: usize,
    end: usize,
    head: usize,
    running: FuturesUnordered<Fut>,
    arrived: BTreeMap<usize, T>,
    fetch: F,
    running_max: usize,
    held_max: usize,
}

/// The items `fetch(i)` for `i` in `indexes`, in order, with at most `running` fetches
/// running and at most `held` items held at once (`held` is raised to `running`, and
/// both to at least 1).
pub fn ordered<T, F, Fut>(indexes: Range<usize>, running: usize, held: usize, fetch: F) -> impl Stream<Item = T>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = (usize, T)>,
{
    let running_max = running.max(1);
    let window = Window {
        next: indexes.start,
        end: indexes.end,
        head: indexes.start,
        running: FuturesUnordered::new(),
        arrived: BTreeMap::new(),
        fetch,
        running_max,
        held_max: held.max(running_max),
    };
    futures::stream::unfold(window, |mut window| async move {
        loop {
            while window.next < window.end
                && window.running.len() < window.running_max
                && window.running.len() + window.arrived.len() < window.held_max
            {
                window.running.push((window.fetch)(window.next));
                window.next += 1;
            }
            if let Some(item) = window.arrived.remove(&window.head) {
                window.head += 1;
                return Some((item, window));
            }
            let (index, item) = window.running.next().await?;
            window.arrived.insert(index, item);
        }
    })
    // Polling on after the end answers None again.
    .fuse()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use futures::FutureExt;
    use futures::channel::oneshot;

    use super::*;

    /// Fetches that finish when the test releases them, counting how many run at once.
    struct Gated {
        gates: Arc<Mutex<BTreeMap<usize, oneshot::Sender<()>>>>,
        started: Arc<AtomicUsize>,
        live: Arc<AtomicUsize>,
        peak: Arc<AtomicUsize>,
    }

    impl Gated {
        fn new() -> Self {
            Self { gates: Arc::default(), started: Arc::default(), live: Arc::default(), peak: Arc::default() }
        }

        fn fetch(&self) -> impl FnMut(usize) -> futures::future::BoxFuture<'static, (usize, usize)> + use<> {
            let (gates, started, live, peak) =
                (self.gates.clone(), self.started.clone(), self.live.clone(), self.peak.clone());
            move |index| {
                let (gate, release) = oneshot::channel();
                gates.lock().unwrap().insert(index, gate);
                started.fetch_add(1, Ordering::SeqCst);
                let (live, peak) = (live.clone(), peak.clone());
                async move {
                    let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let _ = release.await;
                    live.fetch_sub(1, Ordering::SeqCst);
                    (index, index * 10)
                }
                .boxed()
            }
        }

        fn release(&self, index: usize) {
            let gate = self.gates.lock().unwrap().remove(&index).expect("started");
            gate.send(()).unwrap();
        }

        fn running(&self) -> Vec<usize> {
            self.gates.lock().unwrap().keys().copied().collect()
        }
    }

    #[test]
    fn items_come_in_order_whatever_order_they_arrive_in() {
        let gated = Gated::new();
        let mut stream = Box::pin(ordered(3..40, 8, 16, gated.fetch()));
        let mut out = Vec::new();
        while out.len() < 37 {
            // Drive the stream until it waits, then let the running fetches finish in
            // reverse order.
            while let Some(Some(item)) = stream.next().now_or_never() {
                out.push(item);
            }
            for index in gated.running().into_iter().rev() {
                gated.release(index);
            }
        }
        assert_eq!(out, (3..40).map(|index| index * 10).collect::<Vec<_>>());
        assert_eq!(stream.next().now_or_never(), Some(None), "the stream ends after the last index");
        assert_eq!(gated.peak.load(Ordering::SeqCst), 8, "never more than 8 running");
    }

    #[test]
    fn a_slow_head_leaves_the_others_running_up_to_the_held_bound() {
        let gated = Gated::new();
        let mut stream = Box::pin(ordered(0..100, 8, 16, gated.fetch()));
        assert!(stream.next().now_or_never().is_none(), "nothing has arrived");
        assert_eq!(gated.running(), (0..8).collect::<Vec<_>>());
        // Everything but the head arrives: new fetches start until 16 are held.
        for round in 0..3 {
            for index in gated.running().into_iter().filter(|&index| index != 0) {
                gated.release(index);
            }
            assert!(stream.next().now_or_never().is_none(), "round {round}: the head is still out");
        }
        assert_eq!(gated.started.load(Ordering::SeqCst), 16, "the held bound stops new fetches");
        assert_eq!(gated.running(), vec![0], "only the head still runs");
        gated.release(0);
        let first: Vec<usize> = (0..16).map(|_| stream.next().now_or_never().flatten().unwrap()).collect();
        assert_eq!(first, (0..16).map(|index| index * 10).collect::<Vec<_>>());
        assert_eq!(gated.running(), (16..24).collect::<Vec<_>>(), "the next 8 start as the held ones leave");
        assert_eq!(gated.peak.load(Ordering::SeqCst), 8);
    }

    #[test]
    fn with_held_equal_to_running_it_behaves_like_buffered() {
        let gated = Gated::new();
        let mut stream = Box::pin(ordered(0..100, 8, 0, gated.fetch()));
        assert!(stream.next().now_or_never().is_none());
        for index in 1..8 {
            gated.release(index);
        }
        assert!(stream.next().now_or_never().is_none());
        assert_eq!(gated.started.load(Ordering::SeqCst), 8, "held is raised to running, no further");
    }

    #[test]
    fn an_empty_range_ends_at_once_and_errors_keep_their_place() {
        let mut none = Box::pin(ordered(5..5, 8, 16, |index| async move { (index, Ok::<_, String>(index)) }));
        assert_eq!(none.next().now_or_never(), Some(None));
        let items: Vec<Result<usize, String>> = ordered(0..4, 2, 4, |index| async move {
            (index, if index == 2 { Err("broken".to_string()) } else { Ok(index) })
        })
        .collect()
        .now_or_never()
        .unwrap();
        assert_eq!(items, vec![Ok(0), Ok(1), Err("broken".to_string()), Ok(3)]);
    }

    #[test]
    fn dropping_the_stream_drops_the_running_fetches() {
        let gated = Gated::new();
        let mut stream = Box::pin(ordered(0..10, 4, 8, gated.fetch()));
        assert!(stream.next().now_or_never().is_none());
        assert_eq!(gated.live.load(Ordering::SeqCst), 4);
        drop(stream);
        // A dropped fetch never finishes: its gate has no receiver any more.
        let gates = std::mem::take(&mut *gated.gates.lock().unwrap());
        assert!(gates.into_values().all(|gate| gate.send(()).is_err()));
    }
}
