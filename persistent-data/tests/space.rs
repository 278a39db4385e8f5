//! Running out of metadata or data space is an error value; the committed metadata
//! stays intact and usable.

mod common;

use blockdev::MemDisk;
use common::*;
use persistent_data::Error;

#[test]
fn running_out_of_metadata_space_leaves_the_last_commit_intact() {
    // 4 MiB of metadata: the reserve is 10 %, 102 blocks.
    let disk = MemDisk::new(4 << 11);
    let mut md = open(&disk, 128);
    md.resize_data(1_000_000).unwrap();
    md.create_thin(1).unwrap();
    md.commit().unwrap();
    assert_eq!(md.metadata_reserve(), 102);
    let insert = |md: &mut persistent_data::ThinMetadata, v: u64| -> Result<(), Error> {
        let data = md.alloc_data_block()?;
        md.insert(1, v * 7, data)?;
        Ok(())
    };
    // As the pool engine does: commit regularly, stop provisioning when the free
    // count (without the reserve) reaches zero.
    let mut v = 0u64;
    while md.metadata_free_blocks_reported() > 0 {
        insert(&mut md, v).unwrap();
        v += 1;
        if v.is_multiple_of(1000) {
            md.commit().unwrap();
        }
    }
    md.commit().unwrap();
    let committed = v;
    assert!(committed > 50_000, "only {committed} mappings fit");
    // Going on into the reserve fails cleanly at some point.
    let error = loop {
        if let Err(error) = insert(&mut md, v) {
            break error;
        }
        v += 1;
    };
    assert_eq!(error, Error::NoMetadataSpace, "after {v} mappings");
    md.abort().unwrap();
    assert_eq!(md.mapped_blocks(1).unwrap(), committed);
    let report = persistent_data::check::check(&mut md).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
    // The reserve is enough to delete, and deleting frees space again.
    for run in md.remove_range(1, 0, 7 * (committed / 2)).unwrap() {
        for b in run.data_begin..run.data_begin + run.len {
            md.dec_data_block(b).unwrap();
        }
    }
    md.commit().unwrap();
    let reopened = open(&disk, 128);
    assert!(reopened.metadata_free_blocks_reported() > 100);
    let mut reopened = reopened;
    assert_eq!(
        reopened.mapped_blocks(1).unwrap(),
        committed - committed / 2
    );
}

#[test]
fn running_out_of_data_space_is_an_error_until_the_pool_grows() {
    let disk = MemDisk::new(4 << 11);
    let mut md = open(&disk, 128);
    md.resize_data(100).unwrap();
    md.create_thin(1).unwrap();
    for v in 0..100 {
        let data = md.alloc_data_block().unwrap();
        md.insert(1, v, data).unwrap();
    }
    assert_eq!(md.alloc_data_block(), Err(Error::NoDataSpace));
    assert_eq!(md.data_free_blocks(), 0);
    assert_eq!(
        md.resize_data(50),
        Err(Error::DataShrink {
            current: 100,
            requested: 50
        })
    );
    md.resize_data(20_000).unwrap();
    assert_eq!(md.alloc_data_block().unwrap(), 100);
    assert_eq!(md.data_free_blocks(), 19_899);
    md.commit().unwrap();
    let report = persistent_data::check::check(&mut md).unwrap();
    // Block 100 is allocated but unmapped: a leak the checker must see.
    assert!(!report.is_clean());
    md.dec_data_block(100).unwrap();
    md.commit().unwrap();
    assert!(persistent_data::check::check(&mut md).unwrap().is_clean());
    assert_eq!(
        md.insert(1, 5, 20_000),
        Err(Error::DataBlockOutOfRange {
            block: 20_000,
            nr_blocks: 20_000
        })
    );
}

#[test]
fn a_grown_metadata_device_adds_free_space() {
    let disk = MemDisk::new(1 << 11);
    let mut md = open(&disk, 128);
    md.resize_data(300_000).unwrap();
    md.create_thin(1).unwrap();
    for v in 0..20_000 {
        let b = md.alloc_data_block().unwrap();
        md.insert(1, v, b).unwrap();
    }
    md.commit().unwrap();
    assert_eq!(md.metadata_nr_blocks(), 256);
    drop(md);
    // Grow the device to 80 MiB (two bitmaps) and reopen.
    let grown = MemDisk::new(80 << 11);
    let mut image = vec![0u8; 1 << 20];
    disk.read_at(0, &mut image);
    grown.write_at(0, &image);
    let mut md = open(&grown, 128);
    assert_eq!(md.metadata_nr_blocks(), 256);
    let before = md.metadata_free_blocks();
    assert_eq!(md.resize_metadata().unwrap(), 20_480);
    assert_eq!(md.metadata_free_blocks(), before + 20_480 - 256);
    for v in 20_000..200_000 {
        let b = md.alloc_data_block().unwrap();
        md.insert(1, v, b).unwrap();
    }
    md.commit().unwrap();
    let report = persistent_data::check::check(&mut md).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
    let mut md = open(&grown, 128);
    assert_eq!(md.metadata_nr_blocks(), 20_480);
    assert_eq!(md.mapped_blocks(1).unwrap(), 200_000);
    require_tools();
    let scratch = Scratch::new("grown");
    let path = scratch.path("grown.bin");
    save(&grown, &path);
    assert_thin_check(&path, &[]);
}

/// Maps each of `blocks` of thin device 1 to a newly allocated data block.
fn map_blocks(md: &mut persistent_data::ThinMetadata, blocks: std::ops::Range<u64>) {
    for v in blocks {
        let b = md.alloc_data_block().unwrap();
        md.insert(1, v, b).unwrap();
    }
}

#[test]
fn live_metadata_moves_onto_a_grown_device() {
    let disk = MemDisk::new(1 << 11);
    let mut md = open(&disk, 128);
    md.resize_data(100_000).unwrap();
    md.create_thin(1).unwrap();
    map_blocks(&mut md, 0..10_000);
    md.commit().unwrap();
    assert_eq!(md.metadata_nr_blocks(), 256);
    // A smaller device is refused and the metadata stays where it was.
    let small = MemDisk::new(1 << 10);
    assert!(matches!(
        md.grow_onto(Box::new(small.handle())),
        Err(Error::DeviceTooSmall {
            device_blocks: 128,
            needed_blocks: 256
        })
    ));
    assert_eq!(md.metadata_nr_blocks(), 256);
    // The grown device holds the same blocks first (as a reloaded table's device does).
    let grown = MemDisk::new(40 << 11);
    let mut image = vec![0u8; 1 << 20];
    disk.read_at(0, &mut image);
    grown.write_at(0, &image);
    let (blocks, warning) = md.grow_onto(Box::new(grown.handle())).unwrap();
    assert_eq!((blocks, warning), (10_240, None));
    map_blocks(&mut md, 10_000..60_000);
    md.commit().unwrap();
    let report = persistent_data::check::check(&mut md).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
    let mut md = open(&grown, 128);
    assert_eq!(md.metadata_nr_blocks(), 10_240);
    assert_eq!(md.mapped_blocks(1).unwrap(), 60_000);
}

/// Index entries of the data space map are cached (64 at a time) and written back
/// when evicted or before a commit: touching many more bitmaps than that in one
/// transaction, with overflow counts, frees and an abort, keeps every count right.
#[test]
fn data_counts_survive_index_entry_evictions() {
    const BITMAPS: u64 = 150;
    const PER_BITMAP: u64 = 16_320;
    let disk = MemDisk::new(16 << 11);
    let mut md = open(&disk, 256);
    md.resize_data(BITMAPS * PER_BITMAP).unwrap();
    md.create_thin(1).unwrap();
    md.commit().unwrap();
    // One mapped block in each bitmap, visited in an order that evicts changed
    // entries long before the commit.
    let mut model = std::collections::BTreeMap::new();
    for round in 0..3u64 {
        for i in 0..BITMAPS {
            let k = (i * 37 + round * 11) % BITMAPS;
            let block = k * PER_BITMAP + round * 5 + 1;
            let count = model.entry(block).or_insert(0u32);
            if *count == 0 {
                md.insert(1, block, block).unwrap();
                md.inc_data_block(block).unwrap();
            }
            // Counts up to 4 go through the overflow tree.
            for _ in 0..=k % 4 {
                md.inc_data_block(block).unwrap();
                *count += 1;
            }
        }
        if round == 1 {
            md.commit().unwrap();
        }
    }
    // Drop the extra references of every other block again.
    for (i, (block, count)) in model.iter_mut().enumerate() {
        if i % 2 == 0 {
            while *count > 0 {
                assert_eq!(md.dec_data_block(*block).unwrap(), *count);
                *count -= 1;
            }
        }
    }
    md.commit().unwrap();
    let check_counts = |md: &mut persistent_data::ThinMetadata| {
        for (&block, &extra) in &model {
            assert_eq!(
                md.data_block_count(block).unwrap(),
                1 + extra,
                "block {block}"
            );
        }
        let mapped = model.len() as u64;
        assert_eq!(md.data_free_blocks(), BITMAPS * PER_BITMAP - mapped);
    };
    check_counts(&mut md);
    // Changes after the commit are thrown away by an abort, cached entries included.
    for i in 0..BITMAPS {
        md.alloc_data_block().unwrap();
        md.inc_data_block(i * PER_BITMAP + 1).unwrap();
    }
    md.abort().unwrap();
    check_counts(&mut md);
    // The extra references belong to no mapping: drop them so the checkers see
    // exactly one reference per mapped block.
    for (&block, &extra) in &model {
        for _ in 0..extra {
            md.dec_data_block(block).unwrap();
        }
    }
    md.commit().unwrap();
    let mut reopened = open(&disk, 256);
    for &block in model.keys() {
        assert_eq!(reopened.data_block_count(block).unwrap(), 1);
    }
    let report = persistent_data::check::check(&mut reopened).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
    require_tools();
    let scratch = Scratch::new("index-cache");
    let path = scratch.path("meta.bin");
    save(&disk, &path);
    assert_thin_check(&path, &[]);
}
