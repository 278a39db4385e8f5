//! The transaction manager: copy-on-write block access over the cache, and the
//! metadata space map that counts every metadata block (itself included).
//!
//! During a transaction the metadata space map keeps the committed bitmaps on disk
//! untouched and records every changed count in memory (a map keyed by block, so its
//! size follows the transaction, not the pool). A block may be allocated only if it
//! is free both in the committed bitmaps and in that map, so nothing the last commit
//! (or a held metadata snapshot) reaches is ever overwritten. At commit the new counts
//! are folded into freshly allocated bitmap blocks, overflow-tree nodes and index
//! block; allocating those changes counts again, so the commit iterates until every
//! changed bitmap has been rewritten exactly once.

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::vec::Vec;

use crate::block::{BLOCK_SIZE, Block, Expect};
use crate::btree::{self, NoRefs};
use crate::cache::{Cache, CacheStats};
use crate::error::{Error, Result};
use crate::space_map::{
    ENTRIES_PER_BITMAP, IndexEntry, MAX_METADATA_BITMAPS, OVERFLOW, SmRoot, bitmap_free_stats,
    bitmap_get, bitmap_set, bitmaps_for, find_free,
};

/// Overflow-tree values are u32 counts.
pub const COUNT_VALUE_SIZE: u32 = 4;

/// A metadata block's count in the last commit and now.
#[derive(Clone, Copy, Debug)]
struct Delta {
    committed: u32,
    current: u32,
}

/// The metadata space map's in-memory state.
struct MetadataSm {
    nr_blocks: u64,
    /// Index entries of the last commit (one per bitmap).
    committed: Vec<IndexEntry>,
    committed_index_block: u64,
    /// The overflow tree; it only changes during a commit.
    overflow_root: u64,
    committed_overflow_root: u64,
    nr_allocated: u64,
    deltas: BTreeMap<u64, Delta>,
    search_from: u64,
    /// Set while a commit runs: it may use the blocks kept back for it.
    committing: bool,
}

impl MetadataSm {
    fn new(root: SmRoot, committed: Vec<IndexEntry>) -> Self {
        MetadataSm {
            nr_blocks: root.nr_blocks,
            committed,
            committed_index_block: root.bitmap_root,
            overflow_root: root.ref_count_root,
            committed_overflow_root: root.ref_count_root,
            nr_allocated: root.nr_allocated,
            deltas: BTreeMap::new(),
            search_from: 0,
            committing: false,
        }
    }
}

/// What a metadata space-map commit produced, applied once the superblock is down.
pub struct PreparedCommit {
    pub root: SmRoot,
    entries: Vec<IndexEntry>,
}

/// Copy-on-write access to metadata blocks within one transaction.
pub struct Tm {
    cache: Cache,
    msm: MetadataSm,
}

impl Tm {
    /// A transaction manager over `cache` for the committed metadata space map
    /// `root` (from the superblock); reads and checks its index block.
    pub fn open(cache: Cache, root: SmRoot) -> Result<Self> {
        let mut tm = Tm::with_state(cache, SmRoot::default(), Vec::new());
        tm.reload(root)?;
        Ok(tm)
    }

    /// Drops the transaction (every cached block, every count change) and starts
    /// over from the committed space map `root`.
    pub fn reload(&mut self, root: SmRoot) -> Result<()> {
        self.cache.clear();
        let bitmaps = bitmaps_for(root.nr_blocks) as usize;
        if bitmaps > MAX_METADATA_BITMAPS || root.nr_allocated > root.nr_blocks {
            return Err(Error::Corrupt {
                block: 0,
                reason: "metadata space map root is impossible",
            });
        }
        if root.bitmap_root == 0 || root.bitmap_root >= root.nr_blocks {
            return Err(Error::Corrupt {
                block: 0,
                reason: "metadata index block outside the metadata area",
            });
        }
        let index = self.cache.read(root.bitmap_root, Expect::Index)?;
        let entries: Vec<IndexEntry> = (0..bitmaps)
            .map(|k| IndexEntry::decode(&index[16 + 16 * k..32 + 16 * k]))
            .collect();
        if entries
            .iter()
            .any(|entry| entry.blocknr == 0 || entry.blocknr >= root.nr_blocks)
        {
            return Err(Error::Corrupt {
                block: root.bitmap_root,
                reason: "metadata index entry points outside the metadata area",
            });
        }
        // Count allocated blocks from the bitmaps (tail entries are zero) rather than
        // trusting the root:
        // thin_restore 0.9.0 writes a value one too high, and status wants it exact.
        let mut allocated = 0;
        for entry in &entries {
            let bitmap = self.cache.read(entry.blocknr, Expect::Bitmap)?;
            allocated += ENTRIES_PER_BITMAP - u64::from(bitmap_free_stats(&bitmap).0);
        }
        self.msm = MetadataSm::new(
            SmRoot {
                nr_allocated: allocated,
                ..root
            },
            entries,
        );
        Ok(())
    }

    fn with_state(cache: Cache, root: SmRoot, entries: Vec<IndexEntry>) -> Self {
        Tm {
            cache,
            msm: MetadataSm::new(root, entries),
        }
    }

    /// A transaction manager for formatting `nr_blocks` blocks: nothing committed,
    /// every block free. The caller creates the overflow tree and sets its root.
    pub fn blank(cache: Cache, nr_blocks: u64) -> Self {
        let entries = alloc::vec![IndexEntry::default(); bitmaps_for(nr_blocks) as usize];
        let root = SmRoot {
            nr_blocks,
            ..SmRoot::default()
        };
        Tm::with_state(cache, root, entries)
    }

    /// Grows the space map to `nr_blocks` (the metadata device grew). New bitmaps
    /// are written at the next commit.
    pub fn grow(&mut self, nr_blocks: u64) {
        let msm = &mut self.msm;
        msm.nr_blocks = nr_blocks.max(msm.nr_blocks);
        msm.committed
            .resize(bitmaps_for(msm.nr_blocks) as usize, IndexEntry::default());
    }

    /// Sets the overflow-tree root (format only, before the first commit).
    pub fn set_overflow_root(&mut self, root: u64) {
        self.msm.overflow_root = root;
    }

    /// The cache, for reads that happen before the space map is known.
    pub fn cache_mut(&mut self) -> &mut Cache {
        &mut self.cache
    }

    /// Cache counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Metadata blocks managed by the space map.
    pub fn nr_blocks(&self) -> u64 {
        self.msm.nr_blocks
    }

    /// Metadata blocks in use now.
    pub fn nr_allocated(&self) -> u64 {
        self.msm.nr_allocated
    }

    /// Blocks the allocator keeps back so that a commit can always complete: one per
    /// bitmap that may need rewriting, the index block, and overflow-tree growth.
    pub fn commit_reserve(&self) -> u64 {
        self.msm.committed.len() as u64 + 16 + self.msm.deltas.len() as u64 / 32
    }

    fn check_block(&self, block: u64) -> Result<()> {
        if block == 0 || block >= self.msm.nr_blocks {
            return Err(Error::Corrupt {
                block,
                reason: "reference to a block outside the metadata area",
            });
        }
        Ok(())
    }

    /// A validated block.
    pub fn read(&mut self, block: u64, expect: Expect) -> Result<Rc<Block>> {
        self.check_block(block)?;
        self.cache.read(block, expect)
    }

    /// Mutable access to a block allocated in this transaction.
    pub fn write(&mut self, block: u64, expect: Expect) -> Result<&mut Block> {
        debug_assert!(
            self.is_fresh(block),
            "in-place write of committed block {block}"
        );
        self.cache.write(block, expect)
    }

    /// Allocates a zero-filled block.
    pub fn new_block(&mut self, expect: Expect) -> Result<(u64, &mut Block)> {
        let block = self.alloc()?;
        let data = self.cache.install(block, [0; BLOCK_SIZE], expect)?;
        Ok((block, data))
    }

    /// Makes `block` writable: returns it unchanged when it was allocated in this
    /// transaction and nothing else refers to it, otherwise a copy in a new block
    /// (the original loses one reference). The flag says the original was shared, in
    /// which case the caller must add a reference for everything the copy points to.
    pub fn shadow(&mut self, block: u64, expect: Expect) -> Result<(u64, bool)> {
        let count = self.count(block)?;
        if count == 1 && self.is_fresh(block) {
            return Ok((block, false));
        }
        let data = self.read(block, expect)?;
        let copy = self.alloc()?;
        self.cache.install(copy, *data, expect)?;
        self.dec(block)?;
        Ok((copy, count > 1))
    }

    /// Whether the block was allocated in this transaction.
    pub fn is_fresh(&self, block: u64) -> bool {
        self.msm
            .deltas
            .get(&block)
            .is_some_and(|d| d.committed == 0)
    }

    /// The block's reference count now.
    pub fn count(&mut self, block: u64) -> Result<u32> {
        if let Some(delta) = self.msm.deltas.get(&block) {
            return Ok(delta.current);
        }
        self.committed_count(block)
    }

    /// The block's reference count in the last commit.
    fn committed_count(&mut self, block: u64) -> Result<u32> {
        if block >= self.msm.nr_blocks {
            return Err(Error::Corrupt {
                block,
                reason: "reference to a block outside the metadata area",
            });
        }
        let k = (block / ENTRIES_PER_BITMAP) as usize;
        let bitmap_block = self.msm.committed[k].blocknr;
        if bitmap_block == 0 {
            return Ok(0);
        }
        let bitmap = self.cache.read(bitmap_block, Expect::Bitmap)?;
        let count = bitmap_get(&bitmap, (block % ENTRIES_PER_BITMAP) as usize);
        if count < OVERFLOW {
            return Ok(count);
        }
        let root = self.msm.committed_overflow_root;
        match btree::lookup(self, root, block, COUNT_VALUE_SIZE)? {
            Some(value) => Ok(u32::from_le_bytes(
                value.bytes()[..4].try_into().expect("u32"),
            )),
            None => Err(Error::Corrupt {
                block: root,
                reason: "metadata count marked as overflow but missing from the overflow tree",
            }),
        }
    }

    fn delta(&mut self, block: u64) -> Result<&mut Delta> {
        if !self.msm.deltas.contains_key(&block) {
            let committed = self.committed_count(block)?;
            self.msm.deltas.insert(
                block,
                Delta {
                    committed,
                    current: committed,
                },
            );
        }
        Ok(self.msm.deltas.get_mut(&block).expect("just inserted"))
    }

    /// Adds a reference to a metadata block.
    pub fn inc(&mut self, block: u64) -> Result<()> {
        self.check_block(block)?;
        let delta = self.delta(block)?;
        delta.current += 1;
        if delta.current == 1 {
            self.msm.nr_allocated += 1;
        }
        Ok(())
    }

    /// Drops a reference to a metadata block; at zero it is free (reusable after the
    /// commit, or at once if it was allocated in this transaction).
    pub fn dec(&mut self, block: u64) -> Result<()> {
        self.check_block(block)?;
        let delta = self.delta(block)?;
        if delta.current == 0 {
            return Err(Error::CountUnderflow { block, data: false });
        }
        delta.current -= 1;
        if delta.current == 0 {
            let fresh = delta.committed == 0;
            self.msm.nr_allocated -= 1;
            if fresh {
                self.cache.forget(block);
            }
        }
        Ok(())
    }

    /// Allocates a block that is free now and was free at the last commit.
    pub fn alloc(&mut self) -> Result<u64> {
        let free = self.msm.nr_blocks - self.msm.nr_allocated;
        if !self.msm.committing && free <= self.commit_reserve() {
            return Err(Error::NoMetadataSpace);
        }
        let nr = self.msm.nr_blocks;
        let start = self.msm.search_from.min(nr);
        let found = match self.search(start, nr)? {
            Some(block) => Some(block),
            None => self.search(1, start)?,
        };
        let block = found.ok_or(Error::NoMetadataSpace)?;
        self.msm.search_from = block + 1;
        self.msm.deltas.insert(
            block,
            Delta {
                committed: 0,
                current: 1,
            },
        );
        self.msm.nr_allocated += 1;
        Ok(block)
    }

    fn search(&mut self, from: u64, to: u64) -> Result<Option<u64>> {
        let mut position = from.max(1);
        while position < to {
            let k = (position / ENTRIES_PER_BITMAP) as usize;
            let base = k as u64 * ENTRIES_PER_BITMAP;
            let limit = (to - base).min(ENTRIES_PER_BITMAP) as usize;
            let entry = self.msm.committed[k];
            let bitmap = if entry.blocknr == 0 {
                None
            } else if entry.nr_free == 0 {
                position = base + ENTRIES_PER_BITMAP;
                continue;
            } else {
                Some(self.cache.read(entry.blocknr, Expect::Bitmap)?)
            };
            let mut e = ((position - base) as usize).max(match &bitmap {
                Some(_) => entry.none_free_before as usize,
                None => 0,
            });
            loop {
                let candidate = match &bitmap {
                    Some(bitmap) => find_free(bitmap, None, e, limit),
                    None => (e < limit).then_some(e),
                };
                let Some(found) = candidate else { break };
                let block = base + found as u64;
                if self.msm.deltas.get(&block).is_none_or(|d| d.current == 0) {
                    return Ok(Some(block));
                }
                e = found + 1;
            }
            position = base + ENTRIES_PER_BITMAP;
        }
        Ok(None)
    }

    /// Starts a commit: from now on allocations may use the commit reserve.
    pub fn begin_commit(&mut self) {
        self.msm.committing = true;
    }

    /// Folds the transaction's count changes into new overflow-tree nodes, bitmaps
    /// and index block (all dirty in the cache) and returns the space-map root the
    /// superblock must carry.
    pub fn prepare_commit(&mut self) -> Result<PreparedCommit> {
        self.msm.committing = true;
        let changes: Vec<(u64, u32)> = self
            .msm
            .deltas
            .iter()
            .filter(|(_, d)| {
                d.current != d.committed && (d.current >= OVERFLOW || d.committed >= OVERFLOW)
            })
            .map(|(&block, d)| (block, d.current))
            .collect();
        let mut overflow = self.msm.overflow_root;
        let mut refs = NoRefs(COUNT_VALUE_SIZE);
        for (block, count) in changes {
            if count >= OVERFLOW {
                overflow = btree::insert(self, overflow, block, &count.to_le_bytes(), &mut refs)?.0;
            } else {
                overflow = btree::remove(self, overflow, block, &mut refs)?.0;
            }
        }
        self.msm.overflow_root = overflow;

        let index_block = self.alloc()?;
        if self.msm.committed_index_block != 0 {
            self.dec(self.msm.committed_index_block)?;
        }
        let mut rewritten: BTreeMap<usize, u64> = BTreeMap::new();
        loop {
            let mut touched: Vec<usize> = self
                .msm
                .deltas
                .iter()
                .filter(|(_, d)| d.current != d.committed)
                .map(|(&block, _)| (block / ENTRIES_PER_BITMAP) as usize)
                .chain(
                    self.msm
                        .committed
                        .iter()
                        .enumerate()
                        .filter(|(_, entry)| entry.blocknr == 0)
                        .map(|(k, _)| k),
                )
                .filter(|k| !rewritten.contains_key(k))
                .collect();
            touched.sort_unstable();
            touched.dedup();
            if touched.is_empty() {
                break;
            }
            for k in touched {
                if rewritten.contains_key(&k) {
                    continue;
                }
                let block = self.alloc()?;
                rewritten.insert(k, block);
                let old = self.msm.committed[k].blocknr;
                if old != 0 {
                    self.dec(old)?;
                }
            }
        }

        let mut entries = self.msm.committed.clone();
        for (&k, &block) in &rewritten {
            let old = self.msm.committed[k].blocknr;
            let mut bitmap: Block = if old == 0 {
                [0; BLOCK_SIZE]
            } else {
                *self.cache.read(old, Expect::Bitmap)?
            };
            bitmap[..16].fill(0);
            let base = k as u64 * ENTRIES_PER_BITMAP;
            for (&b, delta) in self.msm.deltas.range(base..base + ENTRIES_PER_BITMAP) {
                bitmap_set(&mut bitmap, (b - base) as usize, delta.current);
            }
            let (nr_free, none_free_before) = bitmap_free_stats(&bitmap);
            entries[k] = IndexEntry {
                blocknr: block,
                nr_free,
                none_free_before,
            };
            self.cache.install(block, bitmap, Expect::Bitmap)?;
        }
        self.cache
            .install(index_block, encode_index(&entries), Expect::Index)?;
        self.msm.committed_index_block = index_block;
        Ok(PreparedCommit {
            root: SmRoot {
                nr_blocks: self.msm.nr_blocks,
                nr_allocated: self.msm.nr_allocated,
                bitmap_root: index_block,
                ref_count_root: self.msm.overflow_root,
            },
            entries,
        })
    }

    /// Writes every dirty block and flushes: the pre-commit barrier.
    pub fn write_dirty_and_flush(&mut self) -> Result<()> {
        self.cache.write_dirty()?;
        self.cache.flush_device()
    }

    /// Writes a sealed superblock (block 0 or a snapshot copy) and flushes.
    pub fn write_superblock(&mut self, block: u64, data: &Block) -> Result<()> {
        self.cache.forget(block);
        self.cache.write_raw(block, data)?;
        self.cache.flush_device()
    }

    /// Makes the prepared state the committed one (after the superblock is durable).
    pub fn finish_commit(&mut self, prepared: PreparedCommit) {
        let msm = &mut self.msm;
        msm.committed = prepared.entries;
        msm.committed_overflow_root = msm.overflow_root;
        msm.deltas.clear();
        msm.search_from = 0;
        msm.committing = false;
    }

    /// Counts block 0 (the superblock) as allocated: formatting only.
    pub fn claim_superblock(&mut self) {
        self.msm.deltas.insert(
            0,
            Delta {
                committed: 0,
                current: 1,
            },
        );
        self.msm.nr_allocated += 1;
    }
}

/// The metadata space map's index block holding `entries` (unused entries zero).
pub fn encode_index(entries: &[IndexEntry]) -> Block {
    let mut index = [0u8; BLOCK_SIZE];
    for (k, entry) in entries.iter().enumerate() {
        index[16 + 16 * k..32 + 16 * k].copy_from_slice(&entry.encode());
    }
    index
}
