//! The on-disk pieces both space maps share: 2-bit reference counts in bitmap
//! blocks, 16-byte index entries and the 32-byte root kept in the superblock.
//!
//! Bit order (format spec §7.1): for entry `e`, bit `2e` carries the value 2 and bit
//! `2e + 1` the value 1, counting bits little-endian from byte 16 of the block.
//! Count 3 means "look the real count up in the overflow b-tree".

use crate::block::{Block, le32, le64, put32, put64};

/// Reference counts per bitmap block: (4096 − 16) × 4.
pub const ENTRIES_PER_BITMAP: u64 = 16_320;
/// Bytes before the first count in a bitmap block.
const BITMAP_HEADER: usize = 16;
/// The 2-bit count value meaning "3 or more, see the overflow tree".
pub const OVERFLOW: u32 = 3;
/// Index entries in the metadata space map's index block.
pub const MAX_METADATA_BITMAPS: usize = 255;
/// The most metadata blocks one index block can describe.
pub const MAX_METADATA_BLOCKS: u64 = MAX_METADATA_BITMAPS as u64 * ENTRIES_PER_BITMAP;
/// Bytes of a space-map root inside the superblock (32 used, the rest zero).
pub const SM_ROOT_FIELD: usize = 128;

/// The 2-bit count of entry `e` (0..=3).
pub fn bitmap_get(bitmap: &Block, e: usize) -> u32 {
    let word = le64(bitmap, BITMAP_HEADER + (e / 32) * 8);
    let shift = (e % 32) * 2;
    let high = (word >> shift) & 1;
    let low = (word >> (shift + 1)) & 1;
    ((high << 1) | low) as u32
}

/// Sets the 2-bit count of entry `e` to `min(count, 3)`.
pub fn bitmap_set(bitmap: &mut Block, e: usize, count: u32) {
    let at = BITMAP_HEADER + (e / 32) * 8;
    let shift = (e % 32) * 2;
    let value = u64::from(count.min(OVERFLOW));
    let bits = ((value >> 1) & 1) << shift | (value & 1) << (shift + 1);
    let word = le64(bitmap, at) & !(3 << shift) | bits;
    put64(bitmap, at, word);
}

/// Mask of the "value 2" bit of every entry that is zero in `word`.
fn zero_entries(word: u64) -> u64 {
    !(word | (word >> 1)) & 0x5555_5555_5555_5555
}

/// The first entry at or after `from` and before `limit` whose count is zero in both
/// bitmaps (`committed` may be the same block as `current`, or absent).
pub fn find_free(
    current: &Block,
    committed: Option<&Block>,
    from: usize,
    limit: usize,
) -> Option<usize> {
    let mut e = from;
    while e < limit {
        let word_index = e / 32;
        let at = BITMAP_HEADER + word_index * 8;
        let mut mask = zero_entries(le64(current, at));
        if let Some(old) = committed {
            mask &= zero_entries(le64(old, at));
        }
        mask &= !0u64 << ((e % 32) * 2);
        if mask != 0 {
            let found = word_index * 32 + mask.trailing_zeros() as usize / 2;
            return (found < limit).then_some(found);
        }
        e = (word_index + 1) * 32;
    }
    None
}

/// Number of zero entries and the first zero entry (or the entry count when full).
pub fn bitmap_free_stats(bitmap: &Block) -> (u32, u32) {
    let mut free = 0;
    let mut first = None;
    for word_index in 0..(ENTRIES_PER_BITMAP as usize / 32) {
        let mask = zero_entries(le64(bitmap, BITMAP_HEADER + word_index * 8));
        if mask != 0 && first.is_none() {
            first = Some(word_index * 32 + mask.trailing_zeros() as usize / 2);
        }
        free += mask.count_ones();
    }
    (free, first.unwrap_or(ENTRIES_PER_BITMAP as usize) as u32)
}

/// Where bitmap `k` lives and allocation hints for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexEntry {
    pub blocknr: u64,
    /// Zero entries in the bitmap.
    pub nr_free: u32,
    /// Every entry before this one is in use.
    pub none_free_before: u32,
}

impl IndexEntry {
    pub const SIZE: usize = 16;

    pub fn decode(bytes: &[u8]) -> Self {
        IndexEntry {
            blocknr: le64(bytes, 0),
            nr_free: le32(bytes, 8),
            none_free_before: le32(bytes, 12),
        }
    }

    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0; 16];
        put64(&mut out, 0, self.blocknr);
        put32(&mut out, 8, self.nr_free);
        put32(&mut out, 12, self.none_free_before);
        out
    }

    /// Accounts for entry `e` going from `old` to `new` (kernel rules: the hint only
    /// moves forward past an allocation at it, and back to a freed entry).
    pub fn account(&mut self, e: u32, old: u32, new: u32) {
        if old == 0 && new != 0 {
            self.nr_free = self.nr_free.saturating_sub(1);
            if self.none_free_before == e {
                self.none_free_before = e.saturating_add(1);
            }
        } else if old != 0 && new == 0 {
            self.nr_free = self.nr_free.saturating_add(1);
            self.none_free_before = self.none_free_before.min(e);
        }
    }
}

/// A space map's root as stored in the superblock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmRoot {
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    /// Metadata map: the index block. Data map: the index b-tree's root.
    pub bitmap_root: u64,
    /// Root of the overflow b-tree (counts ≥ 3).
    pub ref_count_root: u64,
}

impl SmRoot {
    pub fn decode(bytes: &[u8]) -> Self {
        SmRoot {
            nr_blocks: le64(bytes, 0),
            nr_allocated: le64(bytes, 8),
            bitmap_root: le64(bytes, 16),
            ref_count_root: le64(bytes, 24),
        }
    }

    pub fn encode(&self) -> [u8; SM_ROOT_FIELD] {
        let mut out = [0; SM_ROOT_FIELD];
        put64(&mut out, 0, self.nr_blocks);
        put64(&mut out, 8, self.nr_allocated);
        put64(&mut out, 16, self.bitmap_root);
        put64(&mut out, 24, self.ref_count_root);
        out
    }
}

/// Number of bitmaps needed for `nr_blocks` entries.
pub fn bitmaps_for(nr_blocks: u64) -> u64 {
    nr_blocks.div_ceil(ENTRIES_PER_BITMAP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BLOCK_SIZE;

    #[test]
    fn bit_order_matches_the_format() {
        let mut bitmap = [0u8; BLOCK_SIZE];
        for e in 0..4 {
            bitmap_set(&mut bitmap, e, 1);
        }
        assert_eq!(bitmap[16], 0xAA);
        for e in 4..8 {
            bitmap_set(&mut bitmap, e, 2);
        }
        assert_eq!(bitmap[17], 0x55);
        for e in 8..12 {
            bitmap_set(&mut bitmap, e, 7);
        }
        assert_eq!(bitmap[18], 0xFF);
        assert_eq!(bitmap_get(&bitmap, 5), 2);
        assert_eq!(bitmap_get(&bitmap, 9), 3);
        bitmap_set(&mut bitmap, 9, 0);
        assert_eq!(bitmap_get(&bitmap, 9), 0);
        assert_eq!(bitmap_get(&bitmap, 10), 3);
    }

    #[test]
    fn worked_example_data_bitmap() {
        // Format spec §18.3: blocks 10, 11, 12 at count 2; 20, 21 at count 1.
        let mut bitmap = [0u8; BLOCK_SIZE];
        for e in [10, 11, 12] {
            bitmap_set(&mut bitmap, e, 2);
        }
        for e in [20, 21] {
            bitmap_set(&mut bitmap, e, 1);
        }
        assert_eq!(&bitmap[16..22], &[0x00, 0x00, 0x50, 0x01, 0x00, 0x0a]);
        // Metadata bitmap: blocks 0-7 and 9-11 at count 1: `aa aa a8 00`; making 10
        // overflow turns the third byte into b8.
        let mut meta = [0u8; BLOCK_SIZE];
        for e in (0..8).chain(9..12) {
            bitmap_set(&mut meta, e, 1);
        }
        assert_eq!(&meta[16..20], &[0xaa, 0xaa, 0xa8, 0x00]);
        bitmap_set(&mut meta, 10, 3);
        assert_eq!(meta[18], 0xb8);
    }

    #[test]
    fn free_search_and_stats() {
        let mut bitmap = [0u8; BLOCK_SIZE];
        for e in 0..40 {
            bitmap_set(&mut bitmap, e, 1);
        }
        let mut old = [0u8; BLOCK_SIZE];
        bitmap_set(&mut old, 40, 2);
        assert_eq!(find_free(&bitmap, None, 0, 16320), Some(40));
        assert_eq!(find_free(&bitmap, Some(&old), 0, 16320), Some(41));
        assert_eq!(find_free(&bitmap, Some(&old), 0, 41), None);
        assert_eq!(find_free(&bitmap, None, 100, 16320), Some(100));
        assert_eq!(bitmap_free_stats(&bitmap), (16320 - 40, 40));
    }

    #[test]
    fn index_entry_bytes() {
        // Format spec §18.4: bitmap at block 3, nr_free 2036, none_free_before 12.
        let entry = IndexEntry {
            blocknr: 3,
            nr_free: 2036,
            none_free_before: 12,
        };
        assert_eq!(
            entry.encode(),
            [3, 0, 0, 0, 0, 0, 0, 0, 0xf4, 0x07, 0, 0, 0x0c, 0, 0, 0]
        );
        assert_eq!(IndexEntry::decode(&entry.encode()), entry);
    }
}
