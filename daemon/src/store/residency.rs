//! Which chunks are resident, in what recency order, and which may be evicted.
//!
//! A plain struct with no I/O: the store feeds it events (insert, read lease, pin) and
//! performs the deletions it decides on, so the policy is tested without disks or time.
//!
//! Invariants kept here:
//! - `used_bytes` is the sum of resident chunk sizes plus reservations of writes in flight.
//! - A chunk with a read lease or a pin is never chosen as a victim.
//! - Eviction starts when a write would take `used_bytes` above the budget (the high
//!   watermark) and frees down to the low watermark, so that evictions come in batches
//!   rather than one per write.

use std::collections::HashMap;

use cachemesh_proto::ChunkId;
use lru::LruCache;

/// The low watermark, as a share of the budget in percent.
pub const LOW_WATERMARK_PERCENT: u64 = 90;
const _: () = assert!(LOW_WATERMARK_PERCENT > 0 && LOW_WATERMARK_PERCENT <= 100);

#[derive(Debug, Clone, Copy)]
struct Resident {
    size: u32,
    leases: u32,
}

/// A write could not reserve space: every other chunk is pinned or being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom {
    /// Bytes the write needs.
    pub needed: u64,
    /// Bytes that could be freed.
    pub evictable: u64,
}

/// The residency and eviction policy of the chunk store.
#[derive(Debug)]
pub struct Residency {
    lru: LruCache<ChunkId, Resident>,
    pins: HashMap<ChunkId, u32>,
    used_bytes: u64,
    budget_bytes: u64,
}

impl Residency {
    /// An empty store with this byte budget.
    pub fn new(budget_bytes: u64) -> Self {
        Self { lru: LruCache::unbounded(), pins: HashMap::new(), used_bytes: 0, budget_bytes }
    }

    /// Bytes held or reserved.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// The byte budget.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Chunks resident.
    pub fn chunk_count(&self) -> u64 {
        self.lru.len() as u64
    }

    /// Resident chunks that are pinned.
    pub fn pinned_resident_count(&self) -> u64 {
        self.pins.keys().filter(|id| self.lru.contains(id)).count() as u64
    }

    /// Whether `id` is resident.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lru.contains(id)
    }

    /// Adds a chunk found on disk at start-up, least recent first, without any budget check.
    pub fn load(&mut self, id: ChunkId, size: u32) {
        if self.lru.put(id, Resident { size, leases: 0 }).is_none() {
            self.used_bytes += u64::from(size);
        }
    }

    /// Marks `id` as being read (and most recently used); false when it is not resident.
    pub fn lease(&mut self, id: &ChunkId) -> bool {
        match self.lru.get_mut(id) {
            Some(resident) => {
                resident.leases += 1;
                true
            }
            None => false,
        }
    }

    /// Ends a read lease taken with [`Residency::lease`].
    pub fn release(&mut self, id: &ChunkId) {
        if let Some(resident) = self.lru.peek_mut(id) {
            resident.leases = resident.leases.saturating_sub(1);
        }
    }

    /// Adds a pin on `id` (resident or not: a pinned chunk fetched later is pinned too).
    pub fn pin(&mut self, id: ChunkId) {
        *self.pins.entry(id).or_insert(0) += 1;
    }

    /// Removes a pin on `id`.
    pub fn unpin(&mut self, id: &ChunkId) {
        if let Some(count) = self.pins.get_mut(id) {
            *count -= 1;
            if *count == 0 {
                self.pins.remove(id);
            }
        }
    }

    fn evictable(&self, id: &ChunkId, resident: &Resident) -> bool {
        resident.leases == 0 && !self.pins.contains_key(id)
    }

    /// Reserves `size` bytes for a write, choosing victims when the budget would be
    /// exceeded. The victims are no longer resident when this returns; the caller deletes
    /// them. On `Err` nothing changed.
    pub fn reserve(&mut self, size: u32) -> Result<Vec<(ChunkId, u32)>, NoRoom> {
        let size = u64::from(size);
        if self.used_bytes + size <= self.budget_bytes {
            self.used_bytes += size;
            return Ok(Vec::new());
        }
        let low_watermark = self.budget_bytes / 100 * LOW_WATERMARK_PERCENT;
        let target = low_watermark.max(size).min(self.budget_bytes);
        let must_free = self.used_bytes + size - target;
        let must_free_for_budget = (self.used_bytes + size).saturating_sub(self.budget_bytes);
        let mut victims = Vec::new();
        let mut freed = 0u64;
        // Least recently used first.
        for (id, resident) in self.lru.iter().rev() {
            if freed >= must_free {
                break;
            }
            if self.evictable(id, resident) {
                victims.push((*id, resident.size));
                freed += u64::from(resident.size);
            }
        }
        if freed < must_free_for_budget || size > self.budget_bytes {
            return Err(NoRoom { needed: size, evictable: freed });
        }
        for (id, size) in &victims {
            self.lru.pop(id);
            self.used_bytes -= u64::from(*size);
        }
        self.used_bytes += size;
        Ok(victims)
    }

    /// Records that a write reserved with [`Residency::reserve`] is durable.
    pub fn commit(&mut self, id: ChunkId, size: u32) {
        if self.lru.put(id, Resident { size, leases: 0 }).is_some() {
            // Another write of the same chunk won the race; keep one copy's bytes.
            self.used_bytes -= u64::from(size);
        }
    }

    /// Gives back a reservation whose write failed.
    pub fn abort(&mut self, size: u32) {
        self.used_bytes -= u64::from(size);
    }

    /// Forgets a resident chunk (found corrupt or missing); false when it was not resident.
    pub fn remove(&mut self, id: &ChunkId) -> bool {
        match self.lru.pop(id) {
            Some(resident) => {
                self.used_bytes -= u64::from(resident.size);
                true
            }
            None => false,
        }
    }

    /// Resident chunks from most to least recently used.
    pub fn ids_by_recency(&self) -> impl Iterator<Item = &ChunkId> {
        self.lru.iter().map(|(id, _)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u32) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    #[test]
    fn evicts_least_recent_down_to_low_watermark() {
        // Goal: a write past the budget evicts the least recently used chunks, in a batch.
        let mut residency = Residency::new(1000);
        for n in 0..10 {
            assert!(residency.reserve(100).unwrap().is_empty());
            residency.commit(id(n), 100);
        }
        assert!(residency.lease(&id(0)));
        residency.release(&id(0));
        let victims = residency.reserve(100).unwrap();
        let victims: Vec<_> = victims.into_iter().map(|(v, _)| v).collect();
        // Target is 900 bytes after the write: 1100 - 900 = 200 freed, chunk 0 was touched.
        assert_eq!(victims, vec![id(1), id(2)]);
        residency.commit(id(10), 100);
        assert_eq!(residency.used_bytes(), 900);
    }

    #[test]
    fn pinned_and_leased_chunks_are_never_victims() {
        // Goal: pins and read leases protect chunks; a write that cannot fit fails cleanly.
        let mut residency = Residency::new(300);
        for n in 0..3 {
            residency.reserve(100).unwrap();
            residency.commit(id(n), 100);
        }
        residency.pin(id(0));
        assert!(residency.lease(&id(1)));
        let victims = residency.reserve(100).unwrap();
        assert_eq!(victims, vec![(id(2), 100)]);
        residency.commit(id(3), 100);
        residency.pin(id(3));
        assert_eq!(residency.reserve(100), Err(NoRoom { needed: 100, evictable: 0 }));
        assert_eq!(residency.used_bytes(), 300);
        residency.release(&id(1));
        assert_eq!(residency.reserve(100).unwrap(), vec![(id(1), 100)]);
    }

    #[test]
    fn duplicate_commit_keeps_one_copy() {
        // Goal: two racing writes of one chunk count its bytes once.
        let mut residency = Residency::new(1000);
        residency.reserve(100).unwrap();
        residency.reserve(100).unwrap();
        residency.commit(id(1), 100);
        residency.commit(id(1), 100);
        assert_eq!(residency.used_bytes(), 100);
        assert_eq!(residency.chunk_count(), 1);
    }

    proptest! {
        #[test]
        fn budget_holds_under_any_sequence(ops in proptest::collection::vec((0u32..40, 1u32..300, 0u8..4), 1..300)) {
            // Goal: whatever the sequence, used bytes never exceed the budget and match the
            // sum of resident sizes once writes are committed; pinned chunks stay resident.
            let mut residency = Residency::new(2000);
            let mut sizes = HashMap::new();
            for (n, size, action) in ops {
                match action {
                    0 | 1 => {
                        let size = *sizes.entry(n).or_insert(size);
                        if residency.contains(&id(n)) { continue; }
                        if let Ok(victims) = residency.reserve(size) {
                            for (victim, _) in victims {
                                prop_assert!(!residency.pins.contains_key(&victim));
                            }
                            residency.commit(id(n), size);
                        }
                    }
                    2 => residency.pin(id(n)),
                    _ => residency.unpin(&id(n)),
                }
                prop_assert!(residency.used_bytes() <= residency.budget_bytes());
                let sum: u64 = residency.lru.iter().map(|(_, r)| u64::from(r.size)).sum();
                prop_assert_eq!(sum, residency.used_bytes());
            }
        }
    }
}
