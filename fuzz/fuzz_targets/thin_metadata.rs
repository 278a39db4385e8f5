//! Arbitrary bytes as a thin-pool metadata device: opening it, checking it, dumping
//! it and looking mappings up either works or fails with an error, never a panic,
//! whatever the superblock, b-tree nodes, bitmaps and index blocks hold.
//!
//! Checksums would stop almost every input at the first block read, so each block
//! is sealed with a valid one before use: block 0 as a superblock, the others as the
//! kind their first byte picks (b-tree node, bitmap or index block).
#![no_main]

use blockdev::MemDisk;
use libfuzzer_sys::fuzz_target;
use persistent_data::checksum::{BITMAP_SALT, INDEX_SALT, NODE_SALT, SUPERBLOCK_SALT, seal};
use persistent_data::thin::{FormatPolicy, OpenOptions, ThinMetadata};

/// Metadata blocks the fuzzed device has (4 KiB each).
const BLOCKS: usize = 64;
const BLOCK: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let disk = MemDisk::new((BLOCKS * BLOCK / 512) as u64);
    for (index, chunk) in data.chunks(BLOCK).take(BLOCKS).enumerate() {
        let mut block = [0u8; BLOCK];
        block[..chunk.len()].copy_from_slice(chunk);
        let salt = match (index, block[0] % 3) {
            (0, _) => SUPERBLOCK_SALT,
            (_, 0) => NODE_SALT,
            (_, 1) => BITMAP_SALT,
            _ => INDEX_SALT,
        };
        seal(&mut block, index as u64, salt);
        disk.write_at((index * BLOCK) as u64, &block);
    }
    let options = OpenOptions {
        data_block_size: 128,
        cache_blocks: 64,
        format: FormatPolicy::Never,
    };
    let Ok((mut md, _)) = ThinMetadata::open(Box::new(disk), &options) else {
        return;
    };
    let _ = persistent_data::check::check(&mut md);
    let mut xml = String::new();
    let _ = md.dump_xml(&mut xml);
    let Ok(devices) = md.devices() else {
        return;
    };
    for dev in devices.into_iter().take(8) {
        let _ = md.lookup_range(dev, 0, 1 << 20, 64);
        let _ = md.highest_mapped(dev);
        let _ = md.device_details(dev);
    }
    let _ = md.pending_deletes();
});
