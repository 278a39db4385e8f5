//! Feeds arbitrary bytes to the block decoders, and as one block of a small valid
//! pool to the whole library (open, lookups, dump, check): any panic is a bug.

#![no_main]

use blockdev::MemDisk;
use libfuzzer_sys::fuzz_target;
use persistent_data::block::{BLOCK_SIZE, Expect, validate};
use persistent_data::btree::Node;
use persistent_data::checksum::{BITMAP_SALT, INDEX_SALT, NODE_SALT, SUPERBLOCK_SALT, seal};
use persistent_data::superblock::Superblock;
use persistent_data::thin::{FormatPolicy, OpenOptions, ThinMetadata};

fn pool() -> MemDisk {
    let disk = MemDisk::new(1 << 13);
    let (mut md, _) = ThinMetadata::open(Box::new(disk.handle()), &OpenOptions::new(128)).unwrap();
    md.resize_data(10_000).unwrap();
    md.create_thin(1).unwrap();
    for v in 0..600 {
        let b = md.alloc_data_block().unwrap();
        md.insert(1, v, b).unwrap();
    }
    md.create_snap(2, 1).unwrap();
    md.reserve_metadata_snap().unwrap();
    md.commit().unwrap();
    disk
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (control, bytes) = data.split_at(2);
    let mut block = [0u8; BLOCK_SIZE];
    let n = bytes.len().min(BLOCK_SIZE);
    block[..n].copy_from_slice(&bytes[..n]);
    let target = u64::from(control[0] % 24);
    let salt = [
        None,
        Some(SUPERBLOCK_SALT),
        Some(NODE_SALT),
        Some(BITMAP_SALT),
        Some(INDEX_SALT),
    ][usize::from(control[1] % 5)];
    if let Some(salt) = salt {
        seal(&mut block, target, salt);
    }
    let _ = Superblock::decode(target, &block);
    for value_size in [4, 8, 16, 24] {
        if validate(target, &block, Expect::Node { value_size }).is_ok() {
            let node = Node(&block);
            for i in 0..node.nr_entries() {
                let _ = (node.key(i), node.value(i));
            }
            let _ = node.find_le(12345);
        }
    }
    thread_local!(static POOL: MemDisk = pool());
    POOL.with(|pool| {
        let disk = pool.snapshot();
        disk.write_at(target * BLOCK_SIZE as u64, &block);
        let mut options = OpenOptions::new(128);
        options.format = FormatPolicy::Never;
        if let Ok((mut md, _)) = ThinMetadata::open(Box::new(disk.handle()), &options) {
            let _ = md.lookup(1, 5);
            let _ = md.lookup_range(2, 0, 1000, 50);
            let mut out = String::new();
            let _ = md.dump_xml(&mut out);
            let _ = md.dump_metadata_snap_xml(&mut out);
            let _ = persistent_data::check::check(&mut md);
            let _ = md.remove_range(1, 0, 300);
            let _ = md.commit();
        }
    });
});
