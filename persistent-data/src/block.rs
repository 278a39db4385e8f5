//! Metadata blocks: the 4 KiB unit of every metadata read and write, little-endian
//! field access, and the validation every block read from disk goes through.

use crate::checksum::{
    BITMAP_SALT, INDEX_SALT, NODE_SALT, SUPERBLOCK_SALT, block_checksum, stored_checksum,
};
use crate::error::{BlockKind, Error, Result};

/// Bytes in a metadata block.
pub const BLOCK_SIZE: usize = 4096;
/// 512-byte sectors in a metadata block.
pub const BLOCK_SECTORS: u64 = (BLOCK_SIZE / blockdev::SECTOR_SIZE) as u64;

/// One metadata block's bytes.
pub type Block = [u8; BLOCK_SIZE];

/// Reads a little-endian u32 at `at`.
pub fn le32(block: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes"))
}

/// Reads a little-endian u64 at `at`.
pub fn le64(block: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"))
}

/// Writes a little-endian u32 at `at`.
pub fn put32(block: &mut [u8], at: usize, value: u32) {
    block[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

/// Writes a little-endian u64 at `at`.
pub fn put64(block: &mut [u8], at: usize, value: u64) {
    block[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// What a caller expects to find in a block, so the read can be validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Superblock,
    /// A b-tree node whose leaves carry values of this many bytes.
    Node {
        value_size: u32,
    },
    Bitmap,
    Index,
}

impl Expect {
    /// The checksum salt of the block type.
    pub fn salt(self) -> u32 {
        match self {
            Expect::Superblock => SUPERBLOCK_SALT,
            Expect::Node { .. } => NODE_SALT,
            Expect::Bitmap => BITMAP_SALT,
            Expect::Index => INDEX_SALT,
        }
    }

    /// The block type, for error messages.
    pub fn kind(self) -> BlockKind {
        match self {
            Expect::Superblock => BlockKind::Superblock,
            Expect::Node { .. } => BlockKind::Node,
            Expect::Bitmap => BlockKind::Bitmap,
            Expect::Index => BlockKind::Index,
        }
    }
}

/// Checks a block just read from disk: checksum, self-location and, for nodes, a
/// header and key order that every later access can rely on.
pub fn validate(blocknr: u64, block: &Block, expect: Expect) -> Result<()> {
    let bad = |reason| Error::BadBlock {
        block: blocknr,
        kind: expect.kind(),
        reason,
    };
    if stored_checksum(block) != block_checksum(block, expect.salt()) {
        return Err(bad("checksum mismatch"));
    }
    if le64(block, 8) != blocknr {
        return Err(bad("block number field does not match its location"));
    }
    if let Expect::Node { value_size } = expect {
        validate_node(block, value_size).map_err(bad)?;
    }
    Ok(())
}

/// Structural checks of a node header and its keys (after the checksum passed, or
/// for blocks built in memory by a caller that wants the same guarantees).
pub fn validate_node(
    block: &Block,
    leaf_value_size: u32,
) -> core::result::Result<(), &'static str> {
    let flags = le32(block, 4);
    let nr = le32(block, 16) as usize;
    let max = le32(block, 20) as usize;
    let value_size = le32(block, 24);
    let expected_size = match flags {
        crate::btree::INTERNAL => 8,
        crate::btree::LEAF => leaf_value_size,
        _ => return Err("node flags are neither internal nor leaf"),
    };
    if value_size != expected_size {
        return Err("node value size does not match its tree");
    }
    if max < 3 || !max.is_multiple_of(3) || 32 + max * (8 + value_size as usize) > BLOCK_SIZE {
        return Err("node max_entries is impossible");
    }
    if nr > max {
        return Err("node has more entries than it can hold");
    }
    if flags == crate::btree::INTERNAL && nr == 0 {
        return Err("internal node without children");
    }
    let mut previous = None;
    for i in 0..nr {
        let key = le64(block, 32 + 8 * i);
        if previous.is_some_and(|p| key <= p) {
            return Err("node keys are not strictly increasing");
        }
        previous = Some(key);
    }
    Ok(())
}

/// Whether every byte of the block is zero (an unformatted superblock).
pub fn is_zero(block: &Block) -> bool {
    block.iter().all(|&b| b == 0)
}
