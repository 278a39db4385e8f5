//! A full consistency check of the committed metadata, as strict as the union of
//! the kernel and thin_check 1.x: node checksums and shapes, key order and bounds,
//! fill rules, details vs mapping tree, mapped_blocks, data block range, and exact
//! metadata and data reference counts, allocation totals and index hints.
//!
//! It reads the last commit from disk (block 0 on), independently of the in-memory
//! transaction. Its memory grows with the metadata (it remembers every block and
//! data block it saw), so it is a test and offline tool, not something the running
//! pool calls.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::block::{Expect, le64};
use crate::btree::{Cursor, Node, min_entries};
use crate::error::Result;
use crate::space_map::{
    ENTRIES_PER_BITMAP, IndexEntry, OVERFLOW, SmRoot, bitmap_free_stats, bitmap_get, bitmaps_for,
};
use crate::superblock::Superblock;
use crate::thin::{ThinMetadata, unpack_block_time};
use crate::tm::Tm;

/// What the check found.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// One line per problem; empty when the metadata is consistent.
    pub problems: Vec<String>,
    pub devices: u64,
    pub mappings: u64,
    pub metadata_blocks_used: u64,
    pub data_blocks_used: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Leaf value kinds the walker understands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tree {
    Top,
    Bottom,
    Details,
    DataIndex,
    Overflow,
}

impl Tree {
    fn value_size(self) -> u32 {
        match self {
            Tree::Top | Tree::Bottom => 8,
            Tree::Details => 24,
            Tree::DataIndex => 16,
            Tree::Overflow => 4,
        }
    }
}

struct Walker<'a> {
    tm: &'a mut Tm,
    report: CheckReport,
    metadata: BTreeMap<u64, u32>,
    data: BTreeMap<u64, u32>,
    /// Entries below each node already walked (shared subtrees are walked once).
    entries: BTreeMap<u64, u64>,
    nr_data_blocks: u64,
}

impl Walker<'_> {
    fn problem(&mut self, text: String) {
        self.report.problems.push(text);
    }

    fn reference(&mut self, block: u64) -> bool {
        let count = self.metadata.entry(block).or_insert(0);
        *count += 1;
        *count == 1
    }

    /// Walks a tree; returns the number of entries in it.
    fn walk(&mut self, root: u64, tree: Tree) -> Result<u64> {
        self.walk_node(root, tree, true, 0, None, 0)
    }

    fn walk_node(
        &mut self,
        block: u64,
        tree: Tree,
        is_root: bool,
        low: u64,
        high: Option<u64>,
        depth: usize,
    ) -> Result<u64> {
        if !self.reference(block) {
            return Ok(self.entries.get(&block).copied().unwrap_or(0));
        }
        if depth > 16 {
            self.problem(format!("b-tree too deep at block {block}"));
            return Ok(0);
        }
        let data = match self.tm.read(
            block,
            Expect::Node {
                value_size: tree.value_size(),
            },
        ) {
            Ok(data) => data,
            Err(error) => {
                self.problem(format!("{error}"));
                return Ok(0);
            }
        };
        let node = Node(&data);
        let nr = node.nr_entries();
        if !is_root && nr < min_entries(node.max_entries()) {
            self.problem(format!("too few entries in b-tree node {block}: {nr}"));
        }
        if nr > 0 && (node.key(0) < low || high.is_some_and(|h| node.key(nr - 1) >= h)) {
            self.problem(format!(
                "keys of b-tree node {block} outside its parent's range"
            ));
        }
        let mut total = 0;
        for i in 0..nr {
            if node.is_leaf() {
                total += 1;
                self.leaf_value(tree, node.key(i), node.value(i))?;
            } else {
                let next = if i + 1 < nr {
                    Some(node.key(i + 1))
                } else {
                    high
                };
                total +=
                    self.walk_node(node.value_u64(i), tree, false, node.key(i), next, depth + 1)?;
            }
        }
        self.entries.insert(block, total);
        Ok(total)
    }

    fn leaf_value(&mut self, tree: Tree, key: u64, value: &[u8]) -> Result<()> {
        match tree {
            Tree::Bottom => {
                let (data, _) = unpack_block_time(le64(value, 0));
                if data >= self.nr_data_blocks {
                    self.problem(format!(
                        "mapping of block {key} to data block {data} past the data device end"
                    ));
                }
                *self.data.entry(data).or_insert(0) += 1;
            }
            Tree::Top => {
                self.walk(le64(value, 0), Tree::Bottom)?;
            }
            Tree::Details | Tree::DataIndex | Tree::Overflow => {}
        }
        Ok(())
    }

    /// Walks a tree for its references, then returns its leaf entries (read with a
    /// cursor: a shared tree's entries are wanted even when it was walked before).
    fn collect_tree(&mut self, root: u64, tree: Tree) -> Result<Vec<(u64, [u8; 24])>> {
        self.walk(root, tree)?;
        let mut out = Vec::new();
        let mut cursor = Cursor::seek(self.tm, root, 0, tree.value_size())?;
        while let Some((key, value)) = cursor.entry() {
            let mut bytes = [0u8; 24];
            bytes[..value.len()].copy_from_slice(value);
            out.push((key, bytes));
            cursor.advance(self.tm)?;
        }
        Ok(out)
    }

    /// Walks one view (live or snapshot): details tree, top level and bottom trees.
    fn walk_thin(&mut self, mapping_root: u64, details_root: u64, label: &str) -> Result<()> {
        let details = self.collect_tree(details_root, Tree::Details)?;
        let top = self.collect_tree(mapping_root, Tree::Top)?;
        let detail_ids: BTreeSet<u64> = details.iter().map(|(k, _)| *k).collect();
        let top_ids: BTreeSet<u64> = top.iter().map(|(k, _)| *k).collect();
        if detail_ids != top_ids {
            self.problem(format!(
                "{label}: details tree and mapping tree list different devices"
            ));
        }
        let mapped: BTreeMap<u64, u64> = details.iter().map(|(k, v)| (*k, le64(v, 0))).collect();
        for (dev, value) in top {
            let mappings = self.entries.get(&le64(&value, 0)).copied().unwrap_or(0);
            self.report.mappings += mappings;
            self.report.devices += 1;
            if let Some(&expected) = mapped.get(&dev)
                && expected != mappings
            {
                self.problem(format!(
                    "{label}: thin device {dev} has {mappings} mappings, details say {expected}"
                ));
            }
        }
        Ok(())
    }

    fn bitmap_bits(&mut self, bitmaps: &[u64], block: u64) -> Result<u32> {
        let k = (block / ENTRIES_PER_BITMAP) as usize;
        let bitmap = self.tm.read(bitmaps[k], Expect::Bitmap)?;
        Ok(bitmap_get(&bitmap, (block % ENTRIES_PER_BITMAP) as usize))
    }

    /// Compares a space map with the expected counts.
    fn compare(
        &mut self,
        label: &str,
        root: &SmRoot,
        entries: &[IndexEntry],
        overflow: &BTreeMap<u64, u32>,
        expected: &BTreeMap<u64, u32>,
    ) -> Result<()> {
        let bitmaps: Vec<u64> = entries.iter().map(|e| e.blocknr).collect();
        let mut allocated = 0;
        for (k, entry) in entries.iter().enumerate() {
            let bitmap = self.tm.read(entry.blocknr, Expect::Bitmap)?;
            let (free, first_free) = bitmap_free_stats(&bitmap);
            // The last bitmap's tail (past nr_blocks) counts as free for the kernel;
            // thin_restore 0.9.0 leaves it out. Both are accepted by every reader.
            let base = k as u64 * ENTRIES_PER_BITMAP;
            let tail = (base + ENTRIES_PER_BITMAP).saturating_sub(root.nr_blocks.max(base)) as u32;
            let free_ok = entry.nr_free == free || entry.nr_free == free - tail.min(free);
            if !free_ok || entry.none_free_before > first_free {
                self.problem(format!(
                    "{label} space map: index entry {k} says {} free from {}, bitmap has {free} from {first_free}",
                    entry.nr_free, entry.none_free_before
                ));
            }
            for e in 0..ENTRIES_PER_BITMAP {
                let block = base + e;
                let bits = bitmap_get(&bitmap, e as usize);
                if block >= root.nr_blocks {
                    if bits != 0 {
                        self.problem(format!(
                            "{label} space map: count beyond the end at {block}"
                        ));
                    }
                    continue;
                }
                if bits == OVERFLOW && overflow.get(&block).is_none_or(|&c| c < OVERFLOW) {
                    self.problem(format!(
                        "{label} space map: block {block} overflow count missing"
                    ));
                }
            }
        }
        for (&block, &count) in overflow {
            if block >= root.nr_blocks || self.bitmap_bits(&bitmaps, block)? != OVERFLOW {
                self.problem(format!(
                    "{label} space map: overflow entry for block {block} (count {count}) not marked in its bitmap"
                ));
            }
        }
        let mut block = 0;
        while block < root.nr_blocks {
            let k = (block / ENTRIES_PER_BITMAP) as usize;
            let bitmap = self.tm.read(bitmaps[k], Expect::Bitmap)?;
            let end = ((k as u64 + 1) * ENTRIES_PER_BITMAP).min(root.nr_blocks);
            while block < end {
                let bits = bitmap_get(&bitmap, (block % ENTRIES_PER_BITMAP) as usize);
                let actual = if bits == OVERFLOW {
                    overflow.get(&block).copied().unwrap_or(0)
                } else {
                    bits
                };
                let want = expected.get(&block).copied().unwrap_or(0);
                if actual != want {
                    self.problem(format!(
                        "{label} reference counts differ for block {block}, expected {want}, but got {actual}"
                    ));
                }
                if actual != 0 {
                    allocated += 1;
                }
                block += 1;
            }
        }
        if allocated != root.nr_allocated {
            self.problem(format!(
                "{label} space map: nr_allocated is {}, counted {allocated}",
                root.nr_allocated
            ));
        }
        Ok(())
    }
}

/// Checks the committed metadata of `metadata`.
pub fn check(metadata: &mut ThinMetadata) -> Result<CheckReport> {
    let tm = metadata.tm_mut();
    let block0 = tm.cache_mut().read_raw(0)?;
    let sb = Superblock::decode(0, &block0)?;
    let mut walker = Walker {
        tm,
        report: CheckReport::default(),
        metadata: BTreeMap::new(),
        data: BTreeMap::new(),
        entries: BTreeMap::new(),
        nr_data_blocks: sb.data_sm_root.nr_blocks,
    };
    walker.reference(0);
    walker.walk_thin(sb.data_mapping_root, sb.device_details_root, "live")?;
    if sb.held_root != 0 {
        walker.reference(sb.held_root);
        let copy_block = *walker.tm.read(sb.held_root, Expect::Superblock)?;
        let copy = Superblock::decode(sb.held_root, &copy_block)?;
        walker.walk_thin(
            copy.data_mapping_root,
            copy.device_details_root,
            "metadata snapshot",
        )?;
    }
    // Data space map structures.
    let data_root = sb.data_sm_root;
    let index = walker.collect_tree(data_root.bitmap_root, Tree::DataIndex)?;
    let data_entries: Vec<IndexEntry> = index.iter().map(|(_, v)| IndexEntry::decode(v)).collect();
    let keys: Vec<u64> = index.iter().map(|(k, _)| *k).collect();
    if keys != (0..bitmaps_for(data_root.nr_blocks)).collect::<Vec<u64>>() {
        walker.problem(format!("data space map index has keys {keys:?}"));
    }
    for entry in &data_entries {
        walker.reference(entry.blocknr);
    }
    // Metadata space map structures.
    let meta_root = sb.metadata_sm_root;
    walker.reference(meta_root.bitmap_root);
    let index_block = *walker.tm.read(meta_root.bitmap_root, Expect::Index)?;
    let meta_entries: Vec<IndexEntry> = (0..bitmaps_for(meta_root.nr_blocks) as usize)
        .map(|k| IndexEntry::decode(&index_block[16 + 16 * k..32 + 16 * k]))
        .collect();
    for entry in &meta_entries {
        walker.reference(entry.blocknr);
    }
    let data_overflow =
        overflow_counts(walker.collect_tree(data_root.ref_count_root, Tree::Overflow)?);
    let meta_overflow =
        overflow_counts(walker.collect_tree(meta_root.ref_count_root, Tree::Overflow)?);
    let data_expected = core::mem::take(&mut walker.data);
    walker.report.data_blocks_used = data_expected.len() as u64;
    walker.compare(
        "data",
        &data_root,
        &data_entries,
        &data_overflow,
        &data_expected,
    )?;
    let metadata_expected = core::mem::take(&mut walker.metadata);
    walker.report.metadata_blocks_used = metadata_expected.len() as u64;
    walker.compare(
        "metadata",
        &meta_root,
        &meta_entries,
        &meta_overflow,
        &metadata_expected,
    )?;
    Ok(walker.report)
}

fn overflow_counts(entries: Vec<(u64, [u8; 24])>) -> BTreeMap<u64, u32> {
    entries
        .into_iter()
        .map(|(k, v)| (k, u32::from_le_bytes(v[..4].try_into().expect("u32"))))
        .collect()
}
