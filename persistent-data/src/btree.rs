//! Copy-on-write b-trees in the dm persistent-data node format.
//!
//! Every node is one block: a 32-byte header, `max_entries` u64 keys, then
//! `max_entries` values. Internal nodes hold child block numbers (value size 8,
//! max 252); leaves hold the tree's values. Key `i` of an internal node is a lower
//! bound of child `i`'s subtree. Non-root nodes stay at least a third full: inserts
//! split full nodes on the way down (a full root splits beneath itself, so the root
//! block only changes by shadowing), removes merge or rebalance a child that is at
//! the minimum before descending into it, and an internal root left with one child
//! gives way to that child.
//!
//! Every node on a modified path is shadowed through the transaction manager. When a
//! shadowed node was shared (a snapshot, the held metadata snapshot), the copy adds
//! a reference to everything it points to: children for internal nodes, and for
//! leaves whatever [`ValueRefs`] says the values refer to (data blocks for mapping
//! leaves, bottom-tree roots for the top-level mapping tree).

use alloc::rc::Rc;
use alloc::vec::Vec;

use crate::block::{BLOCK_SIZE, Block, Expect, le32, le64, put32, put64};
use crate::error::{Error, Result};
use crate::tm::Tm;

/// Node flag: the values are child block numbers.
pub const INTERNAL: u32 = 1;
/// Node flag: the values are the tree's values.
pub const LEAF: u32 = 2;
/// Bytes of the node header.
pub const NODE_HEADER: usize = 32;
/// No valid tree is deeper than this (a third-full tree of 2^40 keys has 8 levels);
/// deeper means a cycle or garbage.
const MAX_DEPTH: usize = 16;
/// Largest leaf value any tree of the format uses (device details).
pub const MAX_VALUE_SIZE: usize = 24;

/// Capacity of a node with `value_size`-byte values.
pub fn max_entries(value_size: u32) -> u32 {
    let total = (BLOCK_SIZE as u32 - NODE_HEADER as u32) / (8 + value_size);
    total / 3 * 3
}

/// Fewest entries a non-root node may hold.
pub fn min_entries(max: usize) -> usize {
    max / 3
}

/// A leaf value copied out of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Value {
    bytes: [u8; MAX_VALUE_SIZE],
    len: u8,
}

impl Value {
    /// A copy of `bytes` (at most [`MAX_VALUE_SIZE`]).
    pub fn new(bytes: &[u8]) -> Self {
        let mut out = [0; MAX_VALUE_SIZE];
        out[..bytes.len()].copy_from_slice(bytes);
        Value {
            bytes: out,
            len: bytes.len() as u8,
        }
    }

    /// The value's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The first 8 bytes as a little-endian u64.
    pub fn u64(&self) -> u64 {
        le64(&self.bytes, 0)
    }
}

/// What a tree's leaf values refer to, so sharing can be counted.
pub trait ValueRefs {
    /// Bytes per leaf value.
    fn value_size(&self) -> u32;
    /// A new reference to what `value` refers to (a shared leaf was copied).
    fn inc(&mut self, tm: &mut Tm, value: &[u8]) -> Result<()>;
    /// A reference to what `value` refers to is gone (its leaf was deleted).
    fn dec(&mut self, tm: &mut Tm, value: &[u8]) -> Result<()>;
}

/// Values that refer to nothing (details, space-map index and overflow trees).
pub struct NoRefs(pub u32);

impl ValueRefs for NoRefs {
    fn value_size(&self) -> u32 {
        self.0
    }
    fn inc(&mut self, _: &mut Tm, _: &[u8]) -> Result<()> {
        Ok(())
    }
    fn dec(&mut self, _: &mut Tm, _: &[u8]) -> Result<()> {
        Ok(())
    }
}

/// Read access to a node's fields (the node was validated when read).
#[derive(Clone, Copy)]
pub struct Node<'a>(pub &'a Block);

impl<'a> Node<'a> {
    pub fn flags(&self) -> u32 {
        le32(self.0, 4)
    }
    pub fn is_leaf(&self) -> bool {
        self.flags() == LEAF
    }
    pub fn nr_entries(&self) -> usize {
        le32(self.0, 16) as usize
    }
    pub fn max_entries(&self) -> usize {
        le32(self.0, 20) as usize
    }
    pub fn value_size(&self) -> usize {
        le32(self.0, 24) as usize
    }
    pub fn key(&self, i: usize) -> u64 {
        le64(self.0, NODE_HEADER + 8 * i)
    }
    fn value_offset(&self, i: usize) -> usize {
        NODE_HEADER + 8 * self.max_entries() + self.value_size() * i
    }
    pub fn value(&self, i: usize) -> &'a [u8] {
        let at = self.value_offset(i);
        &self.0[at..at + self.value_size()]
    }
    pub fn value_u64(&self, i: usize) -> u64 {
        le64(self.0, self.value_offset(i))
    }
    /// The first entry whose key is ≥ `key` (`nr_entries` when none).
    pub fn lower_bound(&self, key: u64) -> usize {
        let (mut lo, mut hi) = (0, self.nr_entries());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.key(mid) < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
    /// The last entry whose key is ≤ `key`.
    pub fn find_le(&self, key: u64) -> Option<usize> {
        let upper = self.lower_bound(key);
        if upper < self.nr_entries() && self.key(upper) == key {
            Some(upper)
        } else {
            upper.checked_sub(1)
        }
    }
}

/// Write access to a node.
pub struct NodeMut<'a>(pub &'a mut Block);

impl NodeMut<'_> {
    fn view(&self) -> Node<'_> {
        Node(self.0)
    }
    /// Resets the block to an empty node.
    pub fn init(&mut self, flags: u32, value_size: u32) {
        self.0.fill(0);
        put32(self.0, 4, flags);
        put32(self.0, 20, max_entries(value_size));
        put32(self.0, 24, value_size);
    }
    pub fn set_nr_entries(&mut self, nr: usize) {
        put32(self.0, 16, nr as u32);
    }
    pub fn set_key(&mut self, i: usize, key: u64) {
        put64(self.0, NODE_HEADER + 8 * i, key);
    }
    pub fn set_value(&mut self, i: usize, value: &[u8]) {
        let at = self.view().value_offset(i);
        self.0[at..at + value.len()].copy_from_slice(value);
    }
    /// Inserts an entry at `i`, shifting the later ones up (room must exist).
    pub fn insert_at(&mut self, i: usize, key: u64, value: &[u8]) {
        let node = self.view();
        let (nr, vs) = (node.nr_entries(), node.value_size());
        let keys = NODE_HEADER + 8 * i;
        self.0.copy_within(keys..NODE_HEADER + 8 * nr, keys + 8);
        let values = node_value_offset(self.0, i);
        let values_end = node_value_offset(self.0, nr);
        self.0.copy_within(values..values_end, values + vs);
        self.set_key(i, key);
        self.set_value(i, value);
        self.set_nr_entries(nr + 1);
    }
    /// Removes entries `from..to`, shifting the later ones down.
    pub fn remove_range(&mut self, from: usize, to: usize) {
        let nr = self.view().nr_entries();
        self.0.copy_within(
            NODE_HEADER + 8 * to..NODE_HEADER + 8 * nr,
            NODE_HEADER + 8 * from,
        );
        let (values_from, values_to, values_end) = (
            node_value_offset(self.0, from),
            node_value_offset(self.0, to),
            node_value_offset(self.0, nr),
        );
        self.0.copy_within(values_to..values_end, values_from);
        self.set_nr_entries(nr - (to - from));
    }
    /// Appends entries `from..to` of `other`.
    pub fn append(&mut self, other: Node<'_>, from: usize, to: usize) {
        for i in from..to {
            let nr = self.view().nr_entries();
            self.insert_at(nr, other.key(i), other.value(i));
        }
    }
}

fn node_value_offset(block: &Block, i: usize) -> usize {
    Node(block).value_offset(i)
}

fn node_expect(value_size: u32) -> Expect {
    Expect::Node { value_size }
}

fn too_deep(block: u64) -> Error {
    Error::Corrupt {
        block,
        reason: "b-tree deeper than any valid tree (cycle or garbage)",
    }
}

/// Creates an empty tree (one empty leaf) and returns its root.
pub fn empty_tree(tm: &mut Tm, value_size: u32) -> Result<u64> {
    let (block, data) = tm.new_block(node_expect(value_size))?;
    NodeMut(data).init(LEAF, value_size);
    Ok(block)
}

/// Looks `key` up.
pub fn lookup(tm: &mut Tm, root: u64, key: u64, value_size: u32) -> Result<Option<Value>> {
    let expect = node_expect(value_size);
    let mut block = root;
    for _ in 0..MAX_DEPTH {
        let data = tm.read(block, expect)?;
        let node = Node(&data);
        if node.is_leaf() {
            let i = node.lower_bound(key);
            return Ok(
                (i < node.nr_entries() && node.key(i) == key).then(|| Value::new(node.value(i)))
            );
        }
        match node.find_le(key) {
            Some(i) => block = node.value_u64(i),
            None => return Ok(None),
        }
    }
    Err(too_deep(root))
}

/// The highest key in the tree.
pub fn last_key(tm: &mut Tm, root: u64, value_size: u32) -> Result<Option<u64>> {
    let expect = node_expect(value_size);
    let mut block = root;
    for _ in 0..MAX_DEPTH {
        let data = tm.read(block, expect)?;
        let node = Node(&data);
        let nr = node.nr_entries();
        if nr == 0 {
            return Ok(None);
        }
        if node.is_leaf() {
            return Ok(Some(node.key(nr - 1)));
        }
        block = node.value_u64(nr - 1);
    }
    Err(too_deep(root))
}

/// Shadows a node; if it was shared, the copy's referents gain a reference.
fn shadow_node(tm: &mut Tm, block: u64, refs: &mut dyn ValueRefs) -> Result<u64> {
    let expect = node_expect(refs.value_size());
    let (copy, shared) = tm.shadow(block, expect)?;
    if shared {
        let data = tm.read(copy, expect)?;
        let node = Node(&data);
        for i in 0..node.nr_entries() {
            if node.is_leaf() {
                refs.inc(tm, node.value(i))?;
            } else {
                tm.inc(node.value_u64(i))?;
            }
        }
    }
    Ok(copy)
}

/// Inserts or overwrites `key`. Returns the new root and the value it replaced.
/// Replacing a value does not drop the old value's references: the caller owns them.
pub fn insert(
    tm: &mut Tm,
    root: u64,
    key: u64,
    value: &[u8],
    refs: &mut dyn ValueRefs,
) -> Result<(u64, Option<Value>)> {
    let value_size = refs.value_size();
    debug_assert_eq!(value.len(), value_size as usize);
    let expect = node_expect(value_size);
    let root = shadow_node(tm, root, refs)?;
    if is_full(&*tm.read(root, expect)?) {
        split_beneath(tm, root, value_size)?;
    }
    let mut block = root;
    for _ in 0..MAX_DEPTH {
        let data = tm.read(block, expect)?;
        let node = Node(&data);
        if node.is_leaf() {
            let i = node.lower_bound(key);
            let exists = i < node.nr_entries() && node.key(i) == key;
            let old = exists.then(|| Value::new(node.value(i)));
            // The cache copies a block someone still reads: let go first.
            drop(data);
            let mut writer = NodeMut(tm.write(block, expect)?);
            if exists {
                writer.set_value(i, value);
            } else {
                writer.insert_at(i, key, value);
            }
            return Ok((root, old));
        }
        let (i, lower_first) = match node.find_le(key) {
            Some(i) => (i, false),
            None => (0, true),
        };
        let child = node.value_u64(i);
        drop(data);
        let new_child = shadow_node(tm, child, refs)?;
        {
            let mut writer = NodeMut(tm.write(block, expect)?);
            if lower_first {
                writer.set_key(0, key);
            }
            writer.set_value(i, &new_child.to_le_bytes());
        }
        block = if is_full(&*tm.read(new_child, expect)?) {
            let (sibling, sibling_key) = split_off_sibling(tm, new_child, value_size, key)?;
            NodeMut(tm.write(block, expect)?).insert_at(i + 1, sibling_key, &sibling.to_le_bytes());
            if key >= sibling_key {
                sibling
            } else {
                new_child
            }
        } else {
            new_child
        };
    }
    Err(too_deep(root))
}

fn is_full(data: &Block) -> bool {
    let node = Node(data);
    node.nr_entries() >= node.max_entries()
}

/// Moves the upper part of a full node into a new sibling; returns it and its first
/// key. Normally half moves; when `key` goes past the node's last key (appending, as
/// provisioning in order does) only a third moves, so appended trees end up two
/// thirds full instead of half.
fn split_off_sibling(tm: &mut Tm, block: u64, value_size: u32, key: u64) -> Result<(u64, u64)> {
    let expect = node_expect(value_size);
    let data = tm.read(block, expect)?;
    let node = Node(&data);
    let nr = node.nr_entries();
    let appending = nr > 0 && key > node.key(nr - 1);
    let mid = if appending {
        nr - min_entries(node.max_entries()).max(1)
    } else {
        nr / 2
    };
    let (sibling, sibling_data) = tm.new_block(expect)?;
    let mut writer = NodeMut(sibling_data);
    writer.init(node.flags(), node.value_size() as u32);
    writer.append(node, mid, nr);
    let sibling_key = node.key(mid);
    drop(data);
    NodeMut(tm.write(block, expect)?).remove_range(mid, nr);
    Ok((sibling, sibling_key))
}

/// Turns a full root into an internal node over two new children holding its entries.
fn split_beneath(tm: &mut Tm, root: u64, value_size: u32) -> Result<()> {
    let expect = node_expect(value_size);
    let data = tm.read(root, expect)?;
    let node = Node(&data);
    let (nr, mid) = (node.nr_entries(), node.nr_entries() / 2);
    let mut children = [(0u64, 0u64); 2];
    for (slot, (from, to)) in [(0, mid), (mid, nr)].into_iter().enumerate() {
        let (child, child_data) = tm.new_block(expect)?;
        let mut writer = NodeMut(child_data);
        writer.init(node.flags(), node.value_size() as u32);
        writer.append(node, from, to);
        children[slot] = (node.key(from), child);
    }
    drop(data);
    let mut writer = NodeMut(tm.write(root, expect)?);
    writer.init(INTERNAL, 8);
    for (i, (key, child)) in children.into_iter().enumerate() {
        writer.insert_at(i, key, &child.to_le_bytes());
    }
    Ok(())
}

/// Shadows every node on the path to the leaf that would hold `key`, so the caller
/// may change that leaf's value in place (two-level trees: update a bottom-tree root
/// after changing the bottom tree). Returns the new root and, when `key` exists, the
/// leaf block and the entry's index.
pub fn shadow_path(
    tm: &mut Tm,
    root: u64,
    key: u64,
    refs: &mut dyn ValueRefs,
) -> Result<(u64, Option<(u64, usize)>)> {
    let expect = node_expect(refs.value_size());
    let root = shadow_node(tm, root, refs)?;
    let mut block = root;
    for _ in 0..MAX_DEPTH {
        let data = tm.read(block, expect)?;
        let node = Node(&data);
        if node.is_leaf() {
            let i = node.lower_bound(key);
            let found = i < node.nr_entries() && node.key(i) == key;
            return Ok((root, found.then_some((block, i))));
        }
        let Some(i) = node.find_le(key) else {
            return Ok((root, None));
        };
        let child = node.value_u64(i);
        drop(data);
        let new_child = shadow_node(tm, child, refs)?;
        if new_child != child {
            NodeMut(tm.write(block, expect)?).set_value(i, &new_child.to_le_bytes());
        }
        block = new_child;
    }
    Err(too_deep(root))
}

/// Removes `key`; returns the new root and the removed value. The caller owns the
/// removed value's references.
pub fn remove(
    tm: &mut Tm,
    root: u64,
    key: u64,
    refs: &mut dyn ValueRefs,
) -> Result<(u64, Option<Value>)> {
    if lookup(tm, root, key, refs.value_size())?.is_none() {
        return Ok((root, None));
    }
    let mut removed = None;
    let root = remove_step(tm, root, key, key, refs, &mut |_, value| {
        removed = Some(Value::new(value));
        Ok(())
    })?;
    Ok((root, removed))
}

/// Removes every key in `first..=last`, calling `on_removed` for each removed entry
/// in key order; returns the new root. The caller owns the removed values'
/// references.
pub fn remove_range(
    tm: &mut Tm,
    mut root: u64,
    first: u64,
    last: u64,
    refs: &mut dyn ValueRefs,
    on_removed: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<u64> {
    let value_size = refs.value_size();
    loop {
        let cursor = Cursor::seek(tm, root, first, value_size)?;
        let Some((key, _)) = cursor.entry() else {
            return Ok(root);
        };
        if key > last {
            return Ok(root);
        }
        drop(cursor);
        root = remove_step(tm, root, key, last, refs, on_removed)?;
    }
}

/// One descent: rebalances on the way down, then removes the keys in `key..=last`
/// from the leaf holding `key`, as many as the leaf can lose.
fn remove_step(
    tm: &mut Tm,
    root: u64,
    key: u64,
    last: u64,
    refs: &mut dyn ValueRefs,
    on_removed: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<u64> {
    let value_size = refs.value_size();
    let expect = node_expect(value_size);
    let mut root = shadow_node(tm, root, refs)?;
    let mut block = root;
    for _ in 0..MAX_DEPTH {
        let data = tm.read(block, expect)?;
        let node = Node(&data);
        if node.is_leaf() {
            let nr = node.nr_entries();
            let from = node.lower_bound(key);
            let mut to = from;
            while to < nr && node.key(to) <= last {
                to += 1;
            }
            if block != root {
                let spare = nr.saturating_sub(min_entries(node.max_entries())).max(1);
                to = to.min(from + spare);
            }
            for i in from..to {
                on_removed(node.key(i), node.value(i))?;
            }
            drop(data);
            NodeMut(tm.write(block, expect)?).remove_range(from, to);
            return Ok(root);
        }
        let i = node.find_le(key).unwrap_or(0);
        drop(data);
        let child = rebalance_child(tm, block, i, key, refs)?;
        if block == root {
            let data = tm.read(root, expect)?;
            let node = Node(&data);
            if node.nr_entries() == 1 {
                let only = node.value_u64(0);
                drop(data);
                tm.dec(root)?;
                root = only;
            }
        }
        block = child;
    }
    Err(too_deep(root))
}

/// Makes child `i` of `parent` safe to lose an entry (merging with or borrowing from
/// a sibling when it is at the minimum) and returns the child now covering `key`.
fn rebalance_child(
    tm: &mut Tm,
    parent: u64,
    i: usize,
    key: u64,
    refs: &mut dyn ValueRefs,
) -> Result<u64> {
    let expect = node_expect(refs.value_size());
    let parent_data = tm.read(parent, expect)?;
    let parent_node = Node(&parent_data);
    let nr = parent_node.nr_entries();
    let child = parent_node.value_u64(i);
    let child_data = tm.read(child, expect)?;
    let child_node = Node(&child_data);
    if child_node.nr_entries() > min_entries(child_node.max_entries()) || nr == 1 {
        drop((parent_data, child_data));
        let new_child = shadow_node(tm, child, refs)?;
        NodeMut(tm.write(parent, expect)?).set_value(i, &new_child.to_le_bytes());
        return Ok(new_child);
    }
    let (left_index, right_index) = if i + 1 < nr { (i, i + 1) } else { (i - 1, i) };
    let (left_old, right_old) = (
        parent_node.value_u64(left_index),
        parent_node.value_u64(right_index),
    );
    drop((parent_data, child_data));
    let left = shadow_node(tm, left_old, refs)?;
    let right = shadow_node(tm, right_old, refs)?;
    let left_data: Rc<Block> = tm.read(left, expect)?;
    let right_data: Rc<Block> = tm.read(right, expect)?;
    let (left_node, right_node) = (Node(&left_data), Node(&right_data));
    let (left_nr, right_nr) = (left_node.nr_entries(), right_node.nr_entries());
    let total = left_nr + right_nr;
    if total <= left_node.max_entries() {
        // Writing a block that is still read would copy it.
        drop(left_data);
        NodeMut(tm.write(left, expect)?).append(right_node, 0, right_nr);
        drop(right_data);
        tm.dec(right)?;
        let mut parent_writer = NodeMut(tm.write(parent, expect)?);
        parent_writer.set_value(left_index, &left.to_le_bytes());
        parent_writer.remove_range(right_index, right_index + 1);
        return Ok(left);
    }
    let target_left = (total / 2)
        .min(left_node.max_entries())
        .max(total.saturating_sub(right_node.max_entries()));
    let mut left_copy: Block = *left_data;
    let mut right_copy: Block = *right_data;
    drop((left_data, right_data));
    if left_nr > target_left {
        let mut rebuilt: Block = [0; BLOCK_SIZE];
        let mut writer = NodeMut(&mut rebuilt);
        writer.init(
            Node(&right_copy).flags(),
            Node(&right_copy).value_size() as u32,
        );
        writer.append(Node(&left_copy), target_left, left_nr);
        writer.append(Node(&right_copy), 0, right_nr);
        right_copy = rebuilt;
        NodeMut(&mut left_copy).remove_range(target_left, left_nr);
    } else {
        let take = target_left - left_nr;
        NodeMut(&mut left_copy).append(Node(&right_copy), 0, take);
        NodeMut(&mut right_copy).remove_range(0, take);
    }
    let right_first = Node(&right_copy).key(0);
    *tm.write(left, expect)? = left_copy;
    *tm.write(right, expect)? = right_copy;
    let mut parent_writer = NodeMut(tm.write(parent, expect)?);
    parent_writer.set_value(left_index, &left.to_le_bytes());
    parent_writer.set_value(right_index, &right.to_le_bytes());
    parent_writer.set_key(right_index, right_first);
    Ok(if key >= right_first { right } else { left })
}

/// Drops one reference to a tree; a node whose count reaches zero releases its
/// children (or its values' referents) in turn, so shared subtrees only lose a count.
pub fn delete_tree(tm: &mut Tm, root: u64, refs: &mut dyn ValueRefs) -> Result<()> {
    delete_node(tm, root, refs, 0)
}

fn delete_node(tm: &mut Tm, block: u64, refs: &mut dyn ValueRefs, depth: usize) -> Result<()> {
    if depth >= MAX_DEPTH {
        return Err(too_deep(block));
    }
    if tm.count(block)? > 1 {
        return tm.dec(block);
    }
    let data = tm.read(block, node_expect(refs.value_size()))?;
    let node = Node(&data);
    for i in 0..node.nr_entries() {
        if node.is_leaf() {
            refs.dec(tm, node.value(i))?;
        } else {
            delete_node(tm, node.value_u64(i), refs, depth + 1)?;
        }
    }
    drop(data);
    tm.dec(block)
}

/// What [`remove_first_leaf`] took out of a tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemovedLeaf {
    /// Entries the leaf held.
    pub entries: u64,
    /// The leaf is still part of another tree: only this tree's reference went, and
    /// its values kept theirs.
    pub shared: bool,
}

/// Removes the tree's lowest leaf whole (or empties a root leaf); returns the new
/// root and what went, nothing when the tree is empty. The entries of a leaf of
/// this tree alone are passed to `on_removed` in key order (the caller owns their
/// references); a leaf another tree shares is dropped without reading its values,
/// so releasing a tree that shares most of its leaves costs a step per leaf, not
/// per entry. Internal nodes on the way are rebalanced as a removal does, and an
/// internal root left with one child gives way to it.
pub fn remove_first_leaf(
    tm: &mut Tm,
    root: u64,
    refs: &mut dyn ValueRefs,
    on_removed: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<(u64, Option<RemovedLeaf>)> {
    let expect = node_expect(refs.value_size());
    let mut root = shadow_node(tm, root, refs)?;
    let mut block = root;
    for _ in 0..MAX_DEPTH {
        let data = tm.read(block, expect)?;
        let node = Node(&data);
        let nr = node.nr_entries();
        if node.is_leaf() {
            // Only a root is reached as a leaf: the lowest leaf under an internal
            // node is taken from its parent below.
            if nr == 0 {
                return Ok((root, None));
            }
            for i in 0..nr {
                on_removed(node.key(i), node.value(i))?;
            }
            drop(data);
            NodeMut(tm.write(block, expect)?).remove_range(0, nr);
            let entries = nr as u64;
            let removed = RemovedLeaf {
                entries,
                shared: false,
            };
            return Ok((root, Some(removed)));
        }
        let first = node.value_u64(0);
        drop(data);
        if block == root && nr == 1 {
            let only = shadow_node(tm, first, refs)?;
            tm.dec(root)?;
            root = only;
            block = only;
            continue;
        }
        let child_data = tm.read(first, expect)?;
        let child = Node(&child_data);
        if !child.is_leaf() {
            drop(child_data);
            block = rebalance_child(tm, block, 0, 0, refs)?;
            continue;
        }
        let shared = tm.count(first)? > 1;
        if !shared {
            for i in 0..child.nr_entries() {
                on_removed(child.key(i), child.value(i))?;
            }
        }
        let entries = child.nr_entries() as u64;
        drop(child_data);
        tm.dec(first)?;
        NodeMut(tm.write(block, expect)?).remove_range(0, 1);
        return Ok((root, Some(RemovedLeaf { entries, shared })));
    }
    Err(too_deep(root))
}

/// A position in a tree, for ordered iteration without loading the whole tree.
/// It holds the nodes of its path; it does not see changes made after it was
/// created (seek again after modifying the tree).
pub struct Cursor {
    path: Vec<(Rc<Block>, usize)>,
    value_size: u32,
}

impl Cursor {
    /// A cursor at the first entry whose key is ≥ `key`.
    pub fn seek(tm: &mut Tm, root: u64, key: u64, value_size: u32) -> Result<Self> {
        let mut cursor = Cursor {
            path: Vec::new(),
            value_size,
        };
        let mut block = root;
        loop {
            if cursor.path.len() >= MAX_DEPTH {
                return Err(too_deep(root));
            }
            let data = tm.read(block, node_expect(value_size))?;
            let node = Node(&data);
            if node.is_leaf() {
                let i = node.lower_bound(key);
                cursor.path.push((data, i));
                break;
            }
            let i = node.find_le(key).unwrap_or(0);
            block = node.value_u64(i);
            cursor.path.push((data, i));
        }
        cursor.settle(tm)?;
        Ok(cursor)
    }

    /// The entry under the cursor, or `None` past the last entry.
    pub fn entry(&self) -> Option<(u64, &[u8])> {
        let (data, i) = self.path.last()?;
        let node = Node(data);
        Some((node.key(*i), node.value(*i)))
    }

    /// Moves to the next entry.
    pub fn advance(&mut self, tm: &mut Tm) -> Result<()> {
        if let Some((_, i)) = self.path.last_mut() {
            *i += 1;
        }
        self.settle(tm)
    }

    /// Moves off exhausted nodes to the next entry (or empties the path at the end).
    fn settle(&mut self, tm: &mut Tm) -> Result<()> {
        loop {
            let Some((data, i)) = self.path.last() else {
                return Ok(());
            };
            let node = Node(data);
            if *i < node.nr_entries() {
                if node.is_leaf() {
                    return Ok(());
                }
                if self.path.len() >= MAX_DEPTH {
                    return Err(too_deep(node.value_u64(*i)));
                }
                let child = tm.read(node.value_u64(*i), node_expect(self.value_size))?;
                self.path.push((child, 0));
                continue;
            }
            self.path.pop();
            if let Some((_, parent_index)) = self.path.last_mut() {
                *parent_index += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_match_the_format() {
        assert_eq!(max_entries(8), 252);
        assert_eq!(max_entries(24), 126);
        assert_eq!(max_entries(16), 168);
        assert_eq!(max_entries(4), 336);
    }
}

#[cfg(test)]
mod tree_tests {
    use super::*;
    use crate::cache::Cache;
    use crate::checksum::{NODE_SALT, seal};
    use alloc::boxed::Box;
    use alloc::collections::BTreeMap;
    use blockdev::MemDisk;

    fn tm(blocks: u64) -> Tm {
        let cache = Cache::new(Box::new(MemDisk::new(blocks * 8)), 128);
        let mut tm = Tm::blank(cache, blocks);
        tm.claim_superblock();
        tm
    }

    /// Collects a tree's entries while checking order, key bounds, equal leaf depth
    /// and the one-third fill rule.
    struct ShapeCheck {
        leaf_depth: Option<usize>,
        out: Vec<(u64, u64)>,
    }

    impl ShapeCheck {
        fn walk(
            &mut self,
            tm: &mut Tm,
            block: u64,
            is_root: bool,
            bounds: (u64, Option<u64>),
            depth: usize,
        ) {
            let data = tm.read(block, node_expect(8)).unwrap();
            let node = Node(&data);
            let nr = node.nr_entries();
            if !is_root {
                assert!(
                    nr >= min_entries(node.max_entries()),
                    "node {block} has {nr} entries"
                );
            }
            for i in 0..nr {
                assert!(node.key(i) >= bounds.0 && bounds.1.is_none_or(|h| node.key(i) < h));
                if node.is_leaf() {
                    self.out.push((node.key(i), node.value_u64(i)));
                } else {
                    let next = if i + 1 < nr {
                        Some(node.key(i + 1))
                    } else {
                        bounds.1
                    };
                    self.walk(tm, node.value_u64(i), false, (node.key(i), next), depth + 1);
                }
            }
            if node.is_leaf() {
                assert_eq!(
                    *self.leaf_depth.get_or_insert(depth),
                    depth,
                    "leaves at different depths"
                );
            }
        }
    }

    /// A tree of keys `0..count`, each mapped to itself.
    fn sequential_tree(tm: &mut Tm, count: u64) -> u64 {
        let mut root = empty_tree(tm, 8).unwrap();
        for key in 0..count {
            root = insert(tm, root, key, &key.to_le_bytes(), &mut NoRefs(8))
                .unwrap()
                .0;
        }
        root
    }

    fn contents(tm: &mut Tm, root: u64) -> Vec<(u64, u64)> {
        let mut check = ShapeCheck {
            leaf_depth: None,
            out: Vec::new(),
        };
        check.walk(tm, root, true, (0, None), 0);
        check.out
    }

    #[test]
    fn random_inserts_and_removes_keep_the_shape() {
        let mut tm = tm(4096);
        let mut refs = NoRefs(8);
        let mut root = empty_tree(&mut tm, 8).unwrap();
        let mut model = BTreeMap::new();
        let mut rng = fastrand::Rng::with_seed(12345);
        for round in 0..6 {
            for _ in 0..6000 {
                let key = rng.u64(..20_000);
                let value = rng.u64(..1 << 40);
                let (new_root, old) =
                    insert(&mut tm, root, key, &value.to_le_bytes(), &mut refs).unwrap();
                root = new_root;
                assert_eq!(old.map(|v| v.u64()), model.insert(key, value));
            }
            for _ in 0..(3000 + round * 1000) {
                let key = rng.u64(..20_000);
                let (new_root, old) = remove(&mut tm, root, key, &mut refs).unwrap();
                root = new_root;
                assert_eq!(old.map(|v| v.u64()), model.remove(&key));
            }
            let begin = rng.u64(..20_000);
            let end = begin + rng.u64(..3000);
            let mut removed = Vec::new();
            root = remove_range(&mut tm, root, begin, end, &mut refs, &mut |k, v| {
                removed.push((k, le64(v, 0)));
                Ok(())
            })
            .unwrap();
            let want: Vec<(u64, u64)> = model.range(begin..=end).map(|(k, v)| (*k, *v)).collect();
            assert_eq!(removed, want);
            model.retain(|k, _| *k < begin || *k > end);
            assert_eq!(
                contents(&mut tm, root),
                model.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>()
            );
            assert_eq!(
                last_key(&mut tm, root, 8).unwrap(),
                model.keys().next_back().copied()
            );
            let from = rng.u64(..20_000);
            let mut cursor = Cursor::seek(&mut tm, root, from, 8).unwrap();
            for (k, v) in model.range(from..).take(500) {
                assert_eq!(
                    cursor.entry().map(|(ck, cv)| (ck, le64(cv, 0))),
                    Some((*k, *v))
                );
                cursor.advance(&mut tm).unwrap();
            }
        }
        // Removing everything collapses the tree back to one leaf.
        root = remove_range(&mut tm, root, 0, u64::MAX, &mut refs, &mut |_, _| Ok(())).unwrap();
        assert!(contents(&mut tm, root).is_empty());
        assert!(Node(&tm.read(root, node_expect(8)).unwrap()).is_leaf());
    }

    #[test]
    fn sequential_inserts_fill_two_thirds() {
        let mut tm = tm(2048);
        let root = sequential_tree(&mut tm, 10_000);
        let entries = contents(&mut tm, root);
        assert_eq!(entries.len(), 10_000);
        // 10,000 entries at 168 per leaf need 60 leaves (half-full splits: 80).
        let leaves = tm.nr_allocated() - 1 - 1; // superblock and the root
        assert!(leaves < 66, "{leaves} nodes");
    }

    #[test]
    fn shadowing_a_shared_node_counts_its_children() {
        let mut tm = tm(2048);
        let root = sequential_tree(&mut tm, 1000);
        tm.inc(root).unwrap();
        let (copy, _) = insert(&mut tm, root, 5000, &[1; 8], &mut NoRefs(8)).unwrap();
        assert_ne!(copy, root);
        assert_eq!(tm.count(root).unwrap(), 1);
        let children: Vec<u64> = {
            let data = tm.read(root, node_expect(8)).unwrap();
            let node = Node(&data);
            (0..node.nr_entries()).map(|i| node.value_u64(i)).collect()
        };
        let last = *children.last().unwrap();
        for child in &children[..children.len() - 1] {
            assert_eq!(
                tm.count(*child).unwrap(),
                2,
                "child {child} shared by both roots"
            );
        }
        assert_eq!(tm.count(last).unwrap(), 1, "the changed child was copied");
        delete_tree(&mut tm, copy, &mut NoRefs(8)).unwrap();
        for child in &children {
            assert_eq!(tm.count(*child).unwrap(), 1);
        }
    }

    /// Format spec §18.2: device 1's bottom-level leaf of the worked example.
    #[test]
    fn worked_example_leaf_bytes() {
        let mut block = [0u8; BLOCK_SIZE];
        let mut node = NodeMut(&mut block);
        node.init(LEAF, 8);
        for (i, (key, data, time)) in [
            (0u64, 10u64, 0u64),
            (1, 11, 0),
            (2, 12, 0),
            (100, 20, 1),
            (101, 21, 1),
        ]
        .into_iter()
        .enumerate()
        {
            node.insert_at(i, key, &((data << 24) | time).to_le_bytes());
        }
        seal(&mut block, 10, NODE_SALT);
        assert_eq!(&block[0..4], &[0x88, 0xb2, 0xc3, 0x8e]);
        assert_eq!(&block[0x10..0x1C], &[5, 0, 0, 0, 0xfc, 0, 0, 0, 8, 0, 0, 0]);
        assert_eq!(&block[0x818..0x820], &[1, 0, 0, 0x14, 0, 0, 0, 0]);
    }
}
