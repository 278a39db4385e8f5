//! Block checksums: CRC-32C over bytes 4..4096, stored XOR a per-block-type salt.
//!
//! The stored value is the CRC-32C register without its final inversion, XOR the
//! salt (format spec §3), so a block of one type never verifies as another.

use crc::{CRC_32_ISCSI, Crc, Table};

use crate::block::{BLOCK_SIZE, Block};

/// Slice-by-16 tables: every block read from disk and written at commit is
/// checksummed, so this is on the metadata I/O path.
const CASTAGNOLI: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

/// Salt of the superblock (and of a metadata-snapshot copy of it).
pub const SUPERBLOCK_SALT: u32 = 160_774;
/// Salt of every b-tree node.
pub const NODE_SALT: u32 = 121_107;
/// Salt of a space-map bitmap block.
pub const BITMAP_SALT: u32 = 240_779;
/// Salt of the metadata space map's index block.
pub const INDEX_SALT: u32 = 160_478;

/// The checksum a block of the given type must carry at offset 0.
pub fn block_checksum(block: &Block, salt: u32) -> u32 {
    CASTAGNOLI.checksum(&block[4..BLOCK_SIZE]) ^ 0xFFFF_FFFF ^ salt
}

/// The checksum stored at offset 0.
pub fn stored_checksum(block: &Block) -> u32 {
    u32::from_le_bytes([block[0], block[1], block[2], block[3]])
}

/// Writes the self-location and then the checksum, the last step before a block
/// goes to disk.
pub fn seal(block: &mut Block, blocknr: u64, salt: u32) {
    block[8..16].copy_from_slice(&blocknr.to_le_bytes());
    let csum = block_checksum(block, salt);
    block[0..4].copy_from_slice(&csum.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_check_value() {
        assert_eq!(CASTAGNOLI.checksum(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn zero_block_checksums_differ_by_salt() {
        let block = [0u8; BLOCK_SIZE];
        let node = block_checksum(&block, NODE_SALT);
        let bitmap = block_checksum(&block, BITMAP_SALT);
        assert_eq!(node ^ bitmap, NODE_SALT ^ BITMAP_SALT);
    }
}
