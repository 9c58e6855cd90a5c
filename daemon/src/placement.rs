//! Home-node placement: which member of the datacenter fetches a chunk from the origin.
//!
//! Every member has a 256-bit position, the BLAKE3 of its peer id. A chunk's home is the
//! live member with the highest score BLAKE3(position || chunk id) (rendezvous, or
//! highest-random-weight, hashing); the next highest are its fallbacks. Every node computes
//! the same order from the same membership, with no network lookup, so concurrent misses of
//! one chunk across the DC converge on one node, which coalesces them into one origin fetch.
//!
//! Why not XOR distance between position and chunk id: it is as stable, but members own
//! regions of very unequal size. Measured with 16 members and 16,000 chunks, XOR placement
//! gave homes between 132 and 4,003 chunks each; rendezvous hashing gives each member an
//! equal chance per chunk (the test below bounds the spread).
//!
//! Chunks of an object read by many hosts at once are placed differently
//! ([`object_home_order`]): rendezvous hashing gives each member an equal chance per chunk,
//! but not an equal share of one object. With 8 members and a 64-chunk object it gave one
//! member 18 chunks and another 3; in a cold-start storm a home serves its chunks to every
//! reader, so the member with 18 carried six times the upload of the one with 3 and set the
//! pace of the whole fleet. Within each block of [`PLACEMENT_BLOCK_CHUNKS`] consecutive
//! chunks, every member is home to at most its fair share (rounded up), so the homes of the
//! chunks a reader has in flight at once are spread over the members.
//!
//! Plain functions over plain data: no I/O, no clock.

use cachemesh_proto::{ChunkId, ObjectId};

/// Consecutive chunks of an object over which homes are balanced: the chunks a read has in
/// flight at once (`objects::FETCH_WINDOW_CHUNKS`). Each member is home to at most
/// `ceil(PLACEMENT_BLOCK_CHUNKS / members)` chunks of a block.
pub const PLACEMENT_BLOCK_CHUNKS: usize = 8;

/// A member's position on the XOR ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position([u8; 32]);

impl Position {
    /// The position of the node with this peer id (its canonical bytes).
    pub fn of_peer(peer_id_bytes: &[u8]) -> Self {
        Self(*blake3::hash(peer_id_bytes).as_bytes())
    }

    fn score(&self, chunk: &ChunkId) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.0);
        hasher.update(chunk.as_bytes());
        *hasher.finalize().as_bytes()
    }

    fn score_in_object(&self, object: &ObjectId, index: usize) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.0);
        hasher.update(object.as_bytes());
        hasher.update(&(index as u64).to_le_bytes());
        *hasher.finalize().as_bytes()
    }
}

/// Members ordered by score for `chunk`: the home first, then its fallbacks.
///
/// `members` pairs each member's key (any identifier the caller uses) with its position;
/// ties (identical positions) are broken by key so the order is total and shared.
pub fn home_order<K: Clone + Ord>(chunk: &ChunkId, members: &[(K, Position)]) -> Vec<K> {
    let mut ranked: Vec<(std::cmp::Reverse<[u8; 32]>, &K)> =
        members.iter().map(|(key, position)| (std::cmp::Reverse(position.score(chunk)), key)).collect();
    ranked.sort();
    ranked.into_iter().map(|(_, key)| key.clone()).collect()
}

/// Members ordered for chunk `index` of `object`: the home first, then its fallbacks.
///
/// The home is chosen block by block: the chunks of the block that holds `index` are taken
/// in order, each by the member ranked highest for it (rendezvous score of the object and
/// index) among those still below `ceil(PLACEMENT_BLOCK_CHUNKS / members)` homes in the
/// block. The fallbacks are the other members in score order. Like [`home_order`], the
/// result depends only on the membership set, not on how it is listed.
///
/// Not as stable as plain rendezvous hashing: when a member leaves, the chunks it was home
/// to move, and in their blocks others may move with them: about 8% of an object's chunks
/// with 16 members, about 44% from 8 members to 7, where a member's share of a block grows
/// from 1 to 2 (the tests below bound both). A moved home costs at most a second origin
/// fetch of a chunk that was in flight when the membership changed; the new home asks
/// the chunk's holders first.
pub fn object_home_order<K: Clone + Ord>(object: &ObjectId, index: usize, members: &[(K, Position)]) -> Vec<K> {
    if members.is_empty() {
        return Vec::new();
    }
    let cap = PLACEMENT_BLOCK_CHUNKS.div_ceil(members.len());
    let mut homes = vec![0usize; members.len()];
    let ranked = |chunk: usize| {
        let mut ranked: Vec<(std::cmp::Reverse<[u8; 32]>, &K, usize)> = members
            .iter()
            .enumerate()
            .map(|(slot, (key, position))| (std::cmp::Reverse(position.score_in_object(object, chunk)), key, slot))
            .collect();
        ranked.sort();
        ranked
    };
    for chunk in index - index % PLACEMENT_BLOCK_CHUNKS..index {
        // Some member is below the cap: the chunks before `index` in the block are fewer
        // than PLACEMENT_BLOCK_CHUNKS <= cap * members.
        if let Some(&(_, _, slot)) = ranked(chunk).iter().find(|(_, _, slot)| homes[*slot] < cap) {
            homes[slot] += 1;
        }
    }
    let ranked = ranked(index);
    let home = ranked.iter().position(|(_, _, slot)| homes[*slot] < cap).unwrap_or(0);
    let mut order = Vec::with_capacity(ranked.len());
    order.push(ranked[home].1.clone());
    order.extend(ranked.iter().enumerate().filter(|(at, _)| *at != home).map(|(_, (_, key, _))| (*key).clone()));
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(count: u32) -> Vec<(u32, Position)> {
        (0..count).map(|n| (n, Position::of_peer(&n.to_le_bytes()))).collect()
    }

    #[test]
    fn every_node_agrees_on_the_home_whatever_order_it_lists_members() {
        // Goal: the order depends only on the membership set, not on how it is listed.
        let mut listed = members(50);
        let chunk = ChunkId::of(b"some chunk");
        let first = home_order(&chunk, &listed);
        listed.reverse();
        assert_eq!(home_order(&chunk, &listed), first);
        assert_eq!(first.len(), 50);
    }

    #[test]
    fn homes_spread_over_members() {
        // Goal: homes are spread evenly: each of 16 members gets 1,000 of 16,000 chunks on
        // average; allow 6 standard deviations (about 190) either way.
        let listed = members(16);
        let mut counts = [0u32; 16];
        for n in 0..16_000u32 {
            let home = home_order(&ChunkId::of(&n.to_le_bytes()), &listed)[0];
            counts[home as usize] += 1;
        }
        assert!(counts.iter().all(|&count| (810..=1190).contains(&count)), "{counts:?}");
    }

    fn object_homes(object: &ObjectId, chunks: usize, listed: &[(u32, Position)]) -> Vec<u32> {
        (0..chunks).map(|index| object_home_order(object, index, listed)[0]).collect()
    }

    #[test]
    fn homes_of_an_object_are_balanced_in_every_block() {
        // Goal: in every block of PLACEMENT_BLOCK_CHUNKS chunks no member is home to more than
        // its share rounded up, so a 64-chunk object over 8 members gives each exactly 8
        // (plain rendezvous hashing gave one of them 18 in a measured storm).
        for count in 1..=20u32 {
            let listed = members(count);
            for seed in 0..20u32 {
                let object = ObjectId::from_bytes(*blake3::hash(&seed.to_le_bytes()).as_bytes());
                let homes = object_homes(&object, 64, &listed);
                let cap = PLACEMENT_BLOCK_CHUNKS.div_ceil(count as usize);
                for block in homes.chunks(PLACEMENT_BLOCK_CHUNKS) {
                    for member in 0..count {
                        let homed = block.iter().filter(|&&home| home == member).count();
                        assert!(
                            homed <= cap,
                            "{count} members, seed {seed}: member {member} homes {homed} of {block:?}"
                        );
                    }
                }
                if count == 8 {
                    for member in 0..count {
                        assert_eq!(homes.iter().filter(|&&home| home == member).count(), 8, "seed {seed}: {homes:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn object_homes_depend_on_the_membership_set_only() {
        // Goal: every node computes the same home and fallbacks whatever order it lists
        // members in; every member appears once.
        let mut listed = members(13);
        let object = ObjectId::from_bytes([7; 32]);
        let first: Vec<Vec<u32>> = (0..40).map(|index| object_home_order(&object, index, &listed)).collect();
        listed.reverse();
        listed.swap(2, 9);
        let again: Vec<Vec<u32>> = (0..40).map(|index| object_home_order(&object, index, &listed)).collect();
        assert_eq!(first, again);
        for order in &first {
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, (0..13).collect::<Vec<_>>());
        }
        assert!(object_home_order(&object, 3, &Vec::<(u32, Position)>::new()).is_empty());
    }

    #[test]
    fn a_member_leaving_moves_few_other_homes() {
        // Goal: when one member leaves, its own chunks move (1/N of them) and the cascade
        // within their blocks moves some others, not the whole object. Over 100 objects of
        // 64 chunks: with 16 members (a member's share of a block stays 1) at most an eighth
        // of all chunks change home; from 8 members to 7 the share grows from 1 to 2, which
        // re-ranks more, and at most half change (measured: 44%). Plain rendezvous moves
        // only the 1/N; reshuffling everything would move (N-1)/N.
        for (count, bound) in [(16u32, 8usize), (8, 2)] {
            let all = members(count);
            let (mut moved, mut total) = (0usize, 0usize);
            for seed in 0..100u32 {
                let object = ObjectId::from_bytes(*blake3::hash(&seed.to_le_bytes()).as_bytes());
                let gone = seed % count;
                let rest: Vec<_> = all.iter().copied().filter(|(key, _)| *key != gone).collect();
                let before = object_homes(&object, 64, &all);
                let after = object_homes(&object, 64, &rest);
                assert!(after.iter().all(|&home| home != gone));
                moved += before.iter().zip(&after).filter(|(b, a)| b != a).count();
                total += before.len();
            }
            eprintln!("{count} members: moved {moved} of {total}");
            assert!(moved * bound <= total, "{count} members: moved {moved} of {total}");
        }
    }

    proptest! {
        #[test]
        fn removing_a_member_only_moves_its_own_chunks(chunk in any::<[u8; 32]>(), gone in 0u32..20) {
            // Goal: when a member leaves, chunks homed elsewhere keep their home (stable
            // placement), and its own chunks move to their previous first fallback.
            let chunk = ChunkId::from_bytes(chunk);
            let all = members(20);
            let before = home_order(&chunk, &all);
            let rest: Vec<_> = all.iter().copied().filter(|(key, _)| *key != gone).collect();
            let after = home_order(&chunk, &rest);
            let expected: Vec<u32> = before.into_iter().filter(|key| *key != gone).collect();
            prop_assert_eq!(after, expected);
        }
    }
}
