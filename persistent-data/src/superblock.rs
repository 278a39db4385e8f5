//! The thin superblock (block 0, and the metadata-snapshot copy of it).

use crate::block::{BLOCK_SIZE, Block, le32, le64, put32, put64};
use crate::checksum::{SUPERBLOCK_SALT, block_checksum, seal, stored_checksum};
use crate::error::{BlockKind, Error, Result};
use crate::space_map::{SM_ROOT_FIELD, SmRoot};

/// `magic` of every thin superblock.
pub const SUPERBLOCK_MAGIC: u64 = 27_022_010;
/// The on-disk version we write.
pub const METADATA_VERSION: u32 = 2;
/// `metadata_block_size` in sectors.
pub const METADATA_BLOCK_SECTORS: u32 = 8;
/// Superblock flag: the metadata must be checked before the pool is written again.
pub const NEEDS_CHECK: u32 = 1;

const DATA_SM_ROOT: usize = 0x40;
const METADATA_SM_ROOT: usize = 0xC0;

/// Every field of the superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub flags: u32,
    pub uuid: [u8; 16],
    pub version: u32,
    pub time: u32,
    pub trans_id: u64,
    /// Block of the metadata-snapshot copy, 0 when none is held.
    pub held_root: u64,
    pub data_sm_root: SmRoot,
    pub metadata_sm_root: SmRoot,
    pub data_mapping_root: u64,
    pub device_details_root: u64,
    pub data_block_size: u32,
    pub metadata_nr_blocks: u64,
    pub compat_flags: u32,
    pub compat_ro_flags: u32,
    pub incompat_flags: u32,
}

impl Superblock {
    /// Parses a superblock stored at `blocknr`: a foreign block is
    /// [`Error::NotThinMetadata`], a damaged one a bad-block error.
    pub fn decode(blocknr: u64, block: &Block) -> Result<Self> {
        if le64(block, 0x20) != SUPERBLOCK_MAGIC {
            return Err(Error::NotThinMetadata);
        }
        let bad = |reason| Error::BadBlock {
            block: blocknr,
            kind: BlockKind::Superblock,
            reason,
        };
        if stored_checksum(block) != block_checksum(block, SUPERBLOCK_SALT) {
            return Err(bad("checksum mismatch"));
        }
        if le64(block, 8) != blocknr {
            return Err(bad("block number field does not match its location"));
        }
        if le32(block, 0x154) != METADATA_BLOCK_SECTORS {
            return Err(bad("metadata block size is not 4096 bytes"));
        }
        Ok(Superblock {
            flags: le32(block, 4),
            uuid: block[0x10..0x20].try_into().expect("16 bytes"),
            version: le32(block, 0x28),
            time: le32(block, 0x2C),
            trans_id: le64(block, 0x30),
            held_root: le64(block, 0x38),
            data_sm_root: SmRoot::decode(&block[DATA_SM_ROOT..DATA_SM_ROOT + SM_ROOT_FIELD]),
            metadata_sm_root: SmRoot::decode(
                &block[METADATA_SM_ROOT..METADATA_SM_ROOT + SM_ROOT_FIELD],
            ),
            data_mapping_root: le64(block, 0x140),
            device_details_root: le64(block, 0x148),
            data_block_size: le32(block, 0x150),
            metadata_nr_blocks: le64(block, 0x158),
            compat_flags: le32(block, 0x160),
            compat_ro_flags: le32(block, 0x164),
            incompat_flags: le32(block, 0x168),
        })
    }

    /// The block image, sealed for location `blocknr`.
    pub fn encode(&self, blocknr: u64) -> Block {
        let mut block = [0u8; BLOCK_SIZE];
        put32(&mut block, 4, self.flags);
        block[0x10..0x20].copy_from_slice(&self.uuid);
        put64(&mut block, 0x20, SUPERBLOCK_MAGIC);
        put32(&mut block, 0x28, self.version);
        put32(&mut block, 0x2C, self.time);
        put64(&mut block, 0x30, self.trans_id);
        put64(&mut block, 0x38, self.held_root);
        block[DATA_SM_ROOT..DATA_SM_ROOT + SM_ROOT_FIELD]
            .copy_from_slice(&self.data_sm_root.encode());
        block[METADATA_SM_ROOT..METADATA_SM_ROOT + SM_ROOT_FIELD]
            .copy_from_slice(&self.metadata_sm_root.encode());
        put64(&mut block, 0x140, self.data_mapping_root);
        put64(&mut block, 0x148, self.device_details_root);
        put32(&mut block, 0x150, self.data_block_size);
        put32(&mut block, 0x154, METADATA_BLOCK_SECTORS);
        put64(&mut block, 0x158, self.metadata_nr_blocks);
        put32(&mut block, 0x160, self.compat_flags);
        put32(&mut block, 0x164, self.compat_ro_flags);
        put32(&mut block, 0x168, self.incompat_flags);
        seal(&mut block, blocknr, SUPERBLOCK_SALT);
        block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Format spec §18.1: the superblock of the worked example, byte for byte.
    #[test]
    fn worked_example_checksum() {
        let sb = Superblock {
            flags: 0,
            uuid: [0; 16],
            version: 2,
            time: 3,
            trans_id: 7,
            held_root: 0,
            data_sm_root: SmRoot {
                nr_blocks: 1000,
                nr_allocated: 5,
                bitmap_root: 4,
                ref_count_root: 5,
            },
            metadata_sm_root: SmRoot {
                nr_blocks: 2048,
                nr_allocated: 12,
                bitmap_root: 1,
                ref_count_root: 2,
            },
            data_mapping_root: 7,
            device_details_root: 6,
            data_block_size: 128,
            metadata_nr_blocks: 2048,
            compat_flags: 0,
            compat_ro_flags: 0,
            incompat_flags: 0,
        };
        let block = sb.encode(0);
        assert_eq!(&block[0..4], &[0x1a, 0x41, 0x19, 0xa3]);
        assert_eq!(
            block_checksum(&block, 0),
            0xA31B_351C,
            "register value before the salt"
        );
        assert_eq!(Superblock::decode(0, &block).unwrap(), sb);
        assert_eq!(&block[0x20..0x28], &[0xba, 0x52, 0x9c, 0x01, 0, 0, 0, 0]);
    }
}
