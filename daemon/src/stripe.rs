//! Stripes: a chunk that many hosts read at once leaves its home in parts, each passed on
//! by a different host.
//!
//! Why: without stripes, a chunk's home sends the whole chunk to every reader, so its
//! uplink carries one copy per reader while it fetches the chunk, and a home whose origin
//! download runs fast cannot pass it on any faster: the rest waits, and readers finish
//! late (docs/benchmarks.md, 2026-12-01 third: at equal rates half the homes' uplinks
//! idled while the others held a backlog). With stripes, the home sends each of up to
//! [`STRIPES_PER_CHUNK`] stripes of the chunk once, to that stripe's relayer, and the
//! relayer passes it on to the other readers as it arrives: every uplink carries a share
//! of every chunk. Stripe `s` of `M` is the chunk's pieces `s`, `s + M`, `s + 2M`...
//! (`cachemesh_proto::frames::stripe_pieces`), so all stripes advance together while the
//! chunk arrives at its home in order (contiguous stripes would keep one relayer busy at a
//! time; measured, no gain over whole chunks).
//!
//! When: a chunk read from its home is striped when no host is known to hold the whole
//! object (with a seed, striped reads let chunks leave the origin; not traced yet) and at
//! least [`STRIPE_READERS_MIN`] candidates are left. Who relays which stripe: this node and
//! the live members but the home, those avoided and those on slower links, ranked by
//! position and rotated by the chunk's index ([`relayer_order`]), so every reader names the
//! same relayers for a chunk and each host relays stripes of different chunks
//! (`Mesh::stripe_relayers`). A relayer that is asked for a stripe it does not have fetches
//! it from the chunk's home once ([`StripeTable`]) and answers every reader from that one
//! fetch, as it arrives. Relayers need not read the object themselves: a lone reader in a
//! large DC has its chunks relayed by idle members.
//!
//! Nothing unverified is kept or served to clients: a stripe cannot be checked alone, so
//! peers pass stripes on unchecked and each reader checks the chunk it assembles against
//! its id. A reader whose assembled chunk fails the check fetches the chunk whole from its
//! home (which checked it) and avoids every peer whose stripe differs from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use cachemesh_proto::ChunkId;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::placement::Position;
use crate::relay::{Relay, StripeReader};

/// Stripes a chunk is cut into, at most (each relayed by a different host).
///
/// Why 8: every reader asks each stripe of each chunk in its read window separately, so
/// the requests in flight grow with the stripes; with 8, a home sends a chunk read by 15
/// hosts once instead of 15 times, and each relayer passes on an eighth of it, so that a
/// chunk whose origin download runs fast leaves through 8 uplinks at once.
pub const STRIPES_PER_CHUNK: u16 = 8;

/// Relayer candidates (this node included, the home not) a chunk needs to be striped:
/// with fewer, a home's uplink is not what holds a read back.
pub const STRIPE_READERS_MIN: usize = 3;

/// How long a relayer keeps a stripe it fetched, for readers that ask after it arrived
/// (its own read of the chunk among them).
pub const STRIPE_KEPT_FOR: Duration = Duration::from_secs(30);

/// Stripes a relayer holds at once (fetching or kept); a request beyond is answered from
/// the home directly by the reader.
pub const STRIPES_HELD_MAX: usize = 512;

/// The relayers of the stripes of chunk `index`, in stripe order, out of the candidates
/// `ranked` (each with its position): ranked by position, rotated by the index, the first
/// [`STRIPES_PER_CHUNK`]. The order depends on the positions alone, so every reader that
/// knows the same candidates names the same relayers (each sees itself as a candidate too),
/// and the rotation gives each host stripes of different chunks.
pub fn relayer_order<T>(mut ranked: Vec<(Position, T)>, index: usize) -> Vec<T> {
    if ranked.is_empty() {
        return Vec::new();
    }
    ranked.sort_by_key(|(position, _)| *position);
    let stripes = usize::from(STRIPES_PER_CHUNK);
    let rotation = index.wrapping_mul(stripes) % ranked.len();
    ranked.rotate_left(rotation);
    ranked.into_iter().take(stripes).map(|(_, candidate)| candidate).collect()
}

type StripeFetch = Shared<BoxFuture<'static, Option<Bytes>>>;

/// A stripe: its chunk, which stripe, of how many.
type StripeKey = (ChunkId, u16, u16);

/// One stripe this node relays: its bytes as they arrive, and the fetch's result.
#[derive(Clone)]
pub struct StripeEntry {
    relay: Arc<Relay>,
    /// The stripe's bytes once fetched (unverified); None when the fetch failed.
    pub done: StripeFetch,
}

impl StripeEntry {
    /// A reader of the stripe's bytes as they arrive, once the fetch knows their length;
    /// None when the fetch failed first.
    pub async fn reader(&self) -> Option<StripeReader> {
        let mut reader = self.relay.reader();
        let length = reader.length().await.ok()?;
        Some(StripeReader::new(reader, std::iter::once(0..length)))
    }
}

/// The stripes this node relays, keyed by chunk and range: one fetch from the chunk's home
/// per stripe, however many readers ask.
#[derive(Clone, Default)]
pub struct StripeTable {
    /// A std mutex: never held across an `.await`.
    entries: Arc<Mutex<HashMap<StripeKey, StripeEntry>>>,
}

impl StripeTable {
    /// The stripe's entry, fetching or kept, when there is one.
    pub fn get(&self, id: ChunkId, (stripe, stripes): (u16, u16)) -> Option<StripeEntry> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).get(&(id, stripe, stripes)).cloned()
    }

    /// Joins the fetch of stripe `stripe` of `stripes` of `id`, or starts one with `start`
    /// (given the relay to feed); None when [`STRIPES_HELD_MAX`] stripes are held already.
    /// The entry stays [`STRIPE_KEPT_FOR`] after its fetch succeeds, and goes when it fails.
    pub fn join_or_start<F>(
        &self,
        id: ChunkId,
        (stripe, stripes): (u16, u16),
        start: impl FnOnce(Arc<Relay>) -> F,
    ) -> Option<StripeEntry>
    where
        F: std::future::Future<Output = Option<Bytes>> + Send + 'static,
    {
        let key = (id, stripe, stripes);
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = entries.get(&key) {
            return Some(entry.clone());
        }
        if entries.len() >= STRIPES_HELD_MAX {
            return None;
        }
        let relay = Relay::for_stripe();
        let work = start(relay.clone());
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let table = self.entries.clone();
        let task_key = key;
        let fed = relay.clone();
        tokio::spawn(async move {
            let bytes = work.await;
            fed.abandon_unclaimed();
            let failed = bytes.is_none();
            let _ = sender.send(bytes);
            // A failed fetch is forgotten at once: the next reader to ask starts another.
            if !failed {
                tokio::time::sleep(STRIPE_KEPT_FOR).await;
            }
            table.lock().unwrap_or_else(PoisonError::into_inner).remove(&task_key);
        });
        let done = async move { receiver.await.ok().flatten() }.boxed().shared();
        let entry = StripeEntry { relay, done };
        entries.insert(key, entry.clone());
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reader_names_the_same_relayers_and_each_host_relays_its_share() {
        // Goal: readers that see the same candidates (each counting itself) agree on every
        // chunk's relayers; over many chunks every candidate relays about the same number
        // of stripes.
        let hosts: Vec<Position> = (0..15u8).map(|host| Position::of_peer(&[host; 38])).collect();
        let mut relayed = vec![0usize; hosts.len()];
        for index in 0..150 {
            let orders: Vec<Vec<usize>> = (0..hosts.len())
                .map(|reader| {
                    // As `reader` sees them: itself as None, the others by number.
                    let candidates =
                        hosts.iter().enumerate().map(|(host, position)| (*position, (host != reader).then_some(host)));
                    relayer_order(candidates.collect(), index)
                        .into_iter()
                        .map(|relayer| relayer.unwrap_or(reader))
                        .collect()
                })
                .collect();
            assert!(orders.windows(2).all(|pair| pair[0] == pair[1]), "chunk {index}: {orders:?}");
            assert_eq!(orders[0].len(), usize::from(STRIPES_PER_CHUNK));
            for host in &orders[0] {
                relayed[*host] += 1;
            }
        }
        let (least, most) = (relayed.iter().min().unwrap(), relayed.iter().max().unwrap());
        assert!(most - least <= 1, "stripes relayed per host: {relayed:?}");
        assert!(relayer_order::<u8>(Vec::new(), 3).is_empty());
    }

    #[tokio::test]
    async fn one_fetch_per_stripe_however_many_ask() {
        let table = StripeTable::default();
        let id = ChunkId::of(b"chunk");
        let starts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut entries = Vec::new();
        for _ in 0..3 {
            let starts = starts.clone();
            entries.push(
                table
                    .join_or_start(id, (1, 4), move |_relay| {
                        starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        async { Some(Bytes::from_static(b"abcd")) }
                    })
                    .expect("room"),
            );
        }
        assert_eq!(starts.load(std::sync::atomic::Ordering::SeqCst), 1);
        for entry in entries {
            assert_eq!(entry.done.await, Some(Bytes::from_static(b"abcd")));
        }
    }
}
