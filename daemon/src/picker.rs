//! Which chunk of an object to warm next, when the order is the node's to choose (pin):
//! rarest first among the chunks peers are known to hold, and a bounded number of fresh
//! chunks (held by no peer that is still fetching) at a time. A plain struct, no I/O.
//!
//! Why: when many nodes warm one object at once, its only holders at first are the node
//! that put it (or the origin), whose upload is the scarce supply of new chunks. Nodes that
//! all ask for chunks in index order ask for the same few at once; nodes that each start
//! somewhere else flood that supply with distinct requests and wait for it. Taking what
//! peers already hold first, rarest first, keeps every node's link busy trading, and asking
//! for only a few fresh chunks at a time lets the supply go to chunks nobody has yet,
//! each once (BitTorrent's rarest-first, with a bounded share for the seed).

use std::collections::BTreeSet;

/// Chunks of one object still to warm, and the choice of the next.
#[derive(Debug, Clone)]
pub struct Picker {
    /// Chunks in the object.
    chunk_count: usize,
    /// Indexes not yet started.
    pending: BTreeSet<usize>,
    /// Where fresh picks start looking, so that nodes take different fresh chunks.
    fresh_start: usize,
}

/// What [`Picker::next`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// A chunk some peer holds: the rarest such one.
    Held(usize),
    /// A chunk no fetching peer holds yet.
    Fresh(usize),
    /// Nothing to start now: too many fresh chunks in flight and no held one pending.
    Wait,
    /// Every chunk has been started.
    Done,
}

impl Picker {
    /// A picker over the `pending` indexes of an object of `chunk_count` chunks; fresh picks
    /// start at `fresh_start` and wrap round.
    pub fn new(chunk_count: usize, pending: impl IntoIterator<Item = usize>, fresh_start: usize) -> Self {
        let chunk_count = chunk_count.max(1);
        Self {
            chunk_count,
            pending: pending.into_iter().filter(|&index| index < chunk_count).collect(),
            fresh_start: fresh_start % chunk_count,
        }
    }

    /// The next chunk to start, given how many peers hold each chunk (`holders[i]`, peers
    /// still fetching the object only), how many fresh chunks are in flight and how many
    /// may be (at least one); the chunk picked leaves the pending set.
    pub fn next(&mut self, holders: &[u16], fresh_in_flight: usize, fresh_max: usize) -> Pick {
        if self.pending.is_empty() {
            return Pick::Done;
        }
        let count = |index: usize| holders.get(index).copied().unwrap_or(0);
        // Rarest first; among equals, the first from the fresh start, so that nodes with
        // the same view still spread over different chunks.
        let rotated = |index: usize| (index + self.chunk_count - self.fresh_start) % self.chunk_count;
        let held = self
            .pending
            .iter()
            .copied()
            .filter(|&index| count(index) > 0)
            .min_by_key(|&index| (count(index), rotated(index)));
        if let Some(index) = held {
            self.pending.remove(&index);
            return Pick::Held(index);
        }
        if fresh_in_flight >= fresh_max.max(1) {
            return Pick::Wait;
        }
        let fresh = self.pending.range(self.fresh_start..).next().or_else(|| self.pending.iter().next()).copied();
        match fresh {
            Some(index) => {
                self.pending.remove(&index);
                Pick::Fresh(index)
            }
            None => Pick::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_chunks_go_first_rarest_first() {
        // Goal: with chunks 2 (two holders) and 5 (one holder) available, 5 goes first,
        // then 2, then fresh ones from the node's own start.
        let mut picker = Picker::new(8, 0..8, 6);
        let holders = [0, 0, 2, 0, 0, 1, 0, 0];
        assert_eq!(picker.next(&holders, 0, 1), Pick::Held(5));
        assert_eq!(picker.next(&holders, 0, 1), Pick::Held(2));
        assert_eq!(picker.next(&holders, 0, 1), Pick::Fresh(6));
        assert_eq!(picker.next(&holders, 1, 1), Pick::Wait, "one fresh chunk at a time");
        assert_eq!(picker.next(&holders, 0, 1), Pick::Fresh(7));
        assert_eq!(picker.next(&holders, 0, 1), Pick::Fresh(0), "fresh picks wrap round");
        assert_eq!(picker.next(&holders, 0, 1), Pick::Fresh(1));
    }

    #[test]
    fn every_chunk_is_picked_once_then_done() {
        let mut picker = Picker::new(5, [1, 3, 4], 0);
        let mut picked = Vec::new();
        loop {
            match picker.next(&[0, 0, 0, 1, 0], 0, 2) {
                Pick::Held(index) | Pick::Fresh(index) => picked.push(index),
                Pick::Wait => panic!("nothing in flight, so no waiting"),
                Pick::Done => break,
            }
        }
        picked.sort_unstable();
        assert_eq!(picked, vec![1, 3, 4]);
        assert_eq!(picker.next(&[], 0, 2), Pick::Done);
    }

    #[test]
    fn equally_rare_chunks_are_taken_from_the_fresh_start_on() {
        // Nodes with the same view but different starts pick different held chunks.
        let holders = [1u16; 8];
        assert_eq!(Picker::new(8, 0..8, 5).next(&holders, 0, 1), Pick::Held(5));
        assert_eq!(Picker::new(8, 0..8, 2).next(&holders, 0, 1), Pick::Held(2));
        assert_eq!(Picker::new(8, [0, 1], 5).next(&holders, 0, 1), Pick::Held(0));
    }
}
