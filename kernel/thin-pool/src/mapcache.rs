//! Recently looked-up block mappings, so I/O to provisioned blocks does not walk
//! two b-trees every time.
//!
//! Direct-mapped: a fixed array of slots, each holding one (device, virtual block)
//! and what it maps to (or that it is unmapped), so memory is fixed and a lookup is
//! one hash and one compare. The engine keeps every entry equal to what the
//! metadata would answer: it records the mappings it inserts, forgets blocks it
//! unmaps, and flushes everything ([`MappingCache::clear`], an epoch bump) after
//! anything else that changes lookups: messages (a snapshot changes what counts as
//! shared, a deleted id can be reused) and transaction aborts.

use alloc::vec::Vec;

/// Slots (a power of two): 16,384 × 32 bytes = 512 KiB.
const SLOTS: usize = 1 << 14;

/// What a virtual block maps to, as far as I/O cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cached {
    pub data_block: u64,
    /// A write must break sharing.
    pub shared: bool,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    vblock: u64,
    /// Data block, or `UNMAPPED`.
    data_block: u64,
    dev: u32,
    /// Valid only when equal to the cache's epoch (0 is never current).
    epoch: u32,
    shared: bool,
}

const UNMAPPED: u64 = u64::MAX;

pub(crate) struct MappingCache {
    slots: Vec<Slot>,
    epoch: u32,
}

impl MappingCache {
    pub fn new() -> Self {
        MappingCache {
            slots: alloc::vec![Slot::default(); SLOTS],
            epoch: 1,
        }
    }

    fn index(dev: u64, vblock: u64) -> usize {
        let key = vblock ^ dev.rotate_left(40);
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SLOTS.trailing_zeros())) as usize
    }

    /// `Some(mapping or None for unmapped)` when the block is cached.
    pub fn get(&self, dev: u64, vblock: u64) -> Option<Option<Cached>> {
        let slot = &self.slots[Self::index(dev, vblock)];
        if slot.epoch != self.epoch || slot.vblock != vblock || u64::from(slot.dev) != dev {
            return None;
        }
        Some((slot.data_block != UNMAPPED).then_some(Cached {
            data_block: slot.data_block,
            shared: slot.shared,
        }))
    }

    /// Records what the metadata says about the block now.
    pub fn put(&mut self, dev: u64, vblock: u64, mapping: Option<Cached>) {
        let epoch = self.epoch;
        self.slots[Self::index(dev, vblock)] = Slot {
            vblock,
            data_block: mapping.map_or(UNMAPPED, |m| m.data_block),
            dev: dev as u32,
            epoch,
            shared: mapping.is_some_and(|m| m.shared),
        };
    }

    /// Forgets one block (its mapping changed in a way not recorded here).
    pub fn forget(&mut self, dev: u64, vblock: u64) {
        let slot = &mut self.slots[Self::index(dev, vblock)];
        if slot.vblock == vblock && u64::from(slot.dev) == dev {
            slot.epoch = 0;
        }
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.slots.fill(Slot::default());
            self.epoch = 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_forget_clear() {
        let mut cache = MappingCache::new();
        let mapped = Cached {
            data_block: 7,
            shared: true,
        };
        assert_eq!(cache.get(1, 100), None);
        cache.put(1, 100, Some(mapped));
        cache.put(1, 101, None);
        assert_eq!(cache.get(1, 100), Some(Some(mapped)));
        assert_eq!(cache.get(1, 101), Some(None));
        assert_eq!(cache.get(2, 100), None, "another device");
        cache.forget(1, 100);
        assert_eq!(cache.get(1, 100), None);
        assert_eq!(cache.get(1, 101), Some(None));
        cache.clear();
        assert_eq!(cache.get(1, 101), None);
    }

    #[test]
    fn colliding_blocks_replace_each_other() {
        let mut cache = MappingCache::new();
        let target = MappingCache::index(3, 0);
        let other = (1..)
            .find(|&v| MappingCache::index(3, v) == target)
            .expect("a collision exists");
        let a = Cached {
            data_block: 1,
            shared: false,
        };
        cache.put(3, 0, Some(a));
        cache.put(3, other, None);
        assert_eq!(cache.get(3, 0), None);
        assert_eq!(cache.get(3, other), Some(None));
        // Forgetting the evicted block leaves the occupant alone.
        cache.forget(3, 0);
        assert_eq!(cache.get(3, other), Some(None));
    }

    #[test]
    fn epoch_wrap_forgets_everything() {
        let mut cache = MappingCache::new();
        cache.epoch = u32::MAX;
        cache.put(1, 5, None);
        cache.clear();
        assert_eq!(cache.epoch, 1);
        assert_eq!(cache.get(1, 5), None);
    }
}
