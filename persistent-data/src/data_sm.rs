//! The data ("disk") space map: reference counts of data-device blocks.
//!
//! Stored like the kernel's: an index b-tree (bitmap number → 16-byte index entry),
//! bitmap blocks, and an overflow b-tree for counts ≥ 3, all ordinary copy-on-write
//! metadata blocks. Bitmaps are shadowed on their first change in a transaction, so
//! the committed bitmaps stay readable: a block is handed out only if it is free both
//! now and at the last commit, which keeps blocks freed in this transaction (still
//! mapped by the committed metadata) from being overwritten before the commit.

use crate::block::Expect;
use crate::btree::{self, Cursor, NoRefs};
use crate::error::{Error, Result};
use crate::space_map::{
    ENTRIES_PER_BITMAP, IndexEntry, OVERFLOW, SmRoot, bitmap_get, bitmap_set, bitmaps_for,
    find_free,
};
use crate::tm::{COUNT_VALUE_SIZE, Tm};

/// Index-tree values are 16-byte index entries.
pub const INDEX_VALUE_SIZE: u32 = IndexEntry::SIZE as u32;

/// In-memory state of the data space map (its roots and counters).
#[derive(Clone, Debug)]
pub struct DataSm {
    nr_blocks: u64,
    nr_allocated: u64,
    index_root: u64,
    overflow_root: u64,
    committed_nr_blocks: u64,
    committed_index_root: u64,
    search_from: u64,
}

impl DataSm {
    /// An empty space map (0 blocks) with new, empty trees.
    pub fn create(tm: &mut Tm) -> Result<Self> {
        let index_root = btree::empty_tree(tm, INDEX_VALUE_SIZE)?;
        let overflow_root = btree::empty_tree(tm, COUNT_VALUE_SIZE)?;
        Ok(DataSm {
            nr_blocks: 0,
            nr_allocated: 0,
            index_root,
            overflow_root,
            committed_nr_blocks: 0,
            committed_index_root: index_root,
            search_from: 0,
        })
    }

    /// The space map described by a committed superblock root.
    pub fn open(root: &SmRoot) -> Self {
        DataSm {
            nr_blocks: root.nr_blocks,
            nr_allocated: root.nr_allocated,
            index_root: root.bitmap_root,
            overflow_root: root.ref_count_root,
            committed_nr_blocks: root.nr_blocks,
            committed_index_root: root.bitmap_root,
            search_from: 0,
        }
    }

    /// The root to store in the superblock.
    pub fn root(&self) -> SmRoot {
        SmRoot {
            nr_blocks: self.nr_blocks,
            nr_allocated: self.nr_allocated,
            bitmap_root: self.index_root,
            ref_count_root: self.overflow_root,
        }
    }

    /// Makes the current state the committed one (after the superblock is durable).
    pub fn finish_commit(&mut self) {
        self.committed_nr_blocks = self.nr_blocks;
        self.committed_index_root = self.index_root;
    }

    /// Data blocks tracked.
    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    /// Data blocks with a non-zero count.
    pub fn nr_allocated(&self) -> u64 {
        self.nr_allocated
    }

    fn entry(&self, tm: &mut Tm, root: u64, k: u64) -> Result<IndexEntry> {
        match btree::lookup(tm, root, k, INDEX_VALUE_SIZE)? {
            Some(value) => Ok(IndexEntry::decode(value.bytes())),
            None => Err(Error::Corrupt {
                block: root,
                reason: "data space map index has no entry for a bitmap",
            }),
        }
    }

    fn check_range(&self, block: u64) -> Result<()> {
        if block >= self.nr_blocks {
            return Err(Error::DataBlockOutOfRange {
                block,
                nr_blocks: self.nr_blocks,
            });
        }
        Ok(())
    }

    /// The block's reference count.
    pub fn count(&self, tm: &mut Tm, block: u64) -> Result<u32> {
        self.check_range(block)?;
        let entry = self.entry(tm, self.index_root, block / ENTRIES_PER_BITMAP)?;
        let bitmap = tm.read(entry.blocknr, Expect::Bitmap)?;
        let count = bitmap_get(&bitmap, (block % ENTRIES_PER_BITMAP) as usize);
        if count < OVERFLOW {
            return Ok(count);
        }
        match btree::lookup(tm, self.overflow_root, block, COUNT_VALUE_SIZE)? {
            Some(value) => Ok(u32::from_le_bytes(
                value.bytes()[..4].try_into().expect("u32"),
            )),
            None => Err(Error::Corrupt {
                block: self.overflow_root,
                reason: "data count marked as overflow but missing from the overflow tree",
            }),
        }
    }

    /// Sets the block's count, returning the previous one.
    fn set_count(&mut self, tm: &mut Tm, block: u64, count: u32) -> Result<u32> {
        let old = self.count(tm, block)?;
        if old == count {
            return Ok(old);
        }
        let k = block / ENTRIES_PER_BITMAP;
        let e = (block % ENTRIES_PER_BITMAP) as usize;
        let mut entry = self.entry(tm, self.index_root, k)?;
        let (bitmap_block, _) = tm.shadow(entry.blocknr, Expect::Bitmap)?;
        let old_bits = bitmap_get(&*tm.read(bitmap_block, Expect::Bitmap)?, e);
        bitmap_set(tm.write(bitmap_block, Expect::Bitmap)?, e, count);
        let mut refs = NoRefs(COUNT_VALUE_SIZE);
        if count >= OVERFLOW {
            self.overflow_root = btree::insert(
                tm,
                self.overflow_root,
                block,
                &count.to_le_bytes(),
                &mut refs,
            )?
            .0;
        } else if old_bits == OVERFLOW {
            self.overflow_root = btree::remove(tm, self.overflow_root, block, &mut refs)?.0;
        }
        let before = entry;
        entry.blocknr = bitmap_block;
        entry.account(e as u32, old, count);
        if old == 0 {
            self.nr_allocated += 1;
        } else if count == 0 {
            self.nr_allocated = self.nr_allocated.saturating_sub(1);
        }
        if entry != before {
            let mut refs = NoRefs(INDEX_VALUE_SIZE);
            self.index_root = btree::insert(tm, self.index_root, k, &entry.encode(), &mut refs)?.0;
        }
        Ok(old)
    }

    /// Adds a reference; returns the new count.
    pub fn inc(&mut self, tm: &mut Tm, block: u64) -> Result<u32> {
        let old = self.count(tm, block)?;
        self.set_count(tm, block, old + 1)?;
        Ok(old + 1)
    }

    /// Drops a reference; returns the new count (0: the block is free after commit).
    pub fn dec(&mut self, tm: &mut Tm, block: u64) -> Result<u32> {
        let old = self.count(tm, block)?;
        if old == 0 {
            return Err(Error::CountUnderflow { block, data: true });
        }
        self.set_count(tm, block, old - 1)?;
        Ok(old - 1)
    }

    /// Allocates a block free now and at the last commit; its count becomes 1.
    pub fn alloc(&mut self, tm: &mut Tm) -> Result<u64> {
        let start = self.search_from.min(self.nr_blocks);
        let found = match self.search(tm, start, self.nr_blocks)? {
            Some(block) => Some(block),
            None => self.search(tm, 0, start)?,
        };
        let block = found.ok_or(Error::NoDataSpace)?;
        self.set_count(tm, block, 1)?;
        self.search_from = block + 1;
        Ok(block)
    }

    fn search(&self, tm: &mut Tm, from: u64, to: u64) -> Result<Option<u64>> {
        let mut position = from;
        while position < to {
            let k = position / ENTRIES_PER_BITMAP;
            let base = k * ENTRIES_PER_BITMAP;
            let next = base + ENTRIES_PER_BITMAP;
            let entry = self.entry(tm, self.index_root, k)?;
            if entry.nr_free == 0 {
                position = next;
                continue;
            }
            let current = tm.read(entry.blocknr, Expect::Bitmap)?;
            let committed = if base < self.committed_nr_blocks {
                let old = self.entry(tm, self.committed_index_root, k)?;
                (old.blocknr != entry.blocknr)
                    .then(|| tm.read(old.blocknr, Expect::Bitmap))
                    .transpose()?
            } else {
                None
            };
            let from_entry = ((position - base) as usize).max(entry.none_free_before as usize);
            let limit = (to - base).min(ENTRIES_PER_BITMAP) as usize;
            if let Some(e) = find_free(&current, committed.as_deref(), from_entry, limit) {
                return Ok(Some(base + e as u64));
            }
            position = next;
        }
        Ok(None)
    }

    /// Grows the map to `nr_blocks` (new bitmaps start empty). Shrinking is refused.
    pub fn resize(&mut self, tm: &mut Tm, nr_blocks: u64) -> Result<()> {
        if nr_blocks < self.nr_blocks {
            return Err(Error::DataShrink {
                current: self.nr_blocks,
                requested: nr_blocks,
            });
        }
        let mut refs = NoRefs(INDEX_VALUE_SIZE);
        for k in bitmaps_for(self.nr_blocks)..bitmaps_for(nr_blocks) {
            let (bitmap, _) = tm.new_block(Expect::Bitmap)?;
            let entry = IndexEntry {
                blocknr: bitmap,
                nr_free: ENTRIES_PER_BITMAP as u32,
                none_free_before: 0,
            };
            self.index_root = btree::insert(tm, self.index_root, k, &entry.encode(), &mut refs)?.0;
        }
        self.nr_blocks = nr_blocks;
        Ok(())
    }

    /// Calls `f` for every block with a non-zero count, in block order (checkers).
    pub fn for_each_allocated(
        &self,
        tm: &mut Tm,
        f: &mut dyn FnMut(u64, u32) -> Result<()>,
    ) -> Result<()> {
        let mut cursor = Cursor::seek(tm, self.index_root, 0, INDEX_VALUE_SIZE)?;
        while let Some((k, value)) = cursor.entry() {
            let entry = IndexEntry::decode(value);
            let bitmap = tm.read(entry.blocknr, Expect::Bitmap)?;
            let base = k * ENTRIES_PER_BITMAP;
            for e in 0..ENTRIES_PER_BITMAP.min(self.nr_blocks.saturating_sub(base)) {
                if bitmap_get(&bitmap, e as usize) != 0 {
                    f(base + e, self.count(tm, base + e)?)?;
                }
            }
            cursor.advance(tm)?;
        }
        Ok(())
    }
}
