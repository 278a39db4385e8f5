//! Compatibility with the real thin-provisioning-tools (0.9.0).

mod common;

use blockdev::MemDisk;
use common::*;

#[test]
fn simple_pool_passes_thin_check_and_dumps() {
    require_tools();
    let scratch = Scratch::new("simple");
    let disk = MemDisk::new(8 << 11);
    let mut md = open(&disk, 256);
    md.resize_data(1000).unwrap();
    md.create_thin(1).unwrap();
    for v in [0u64, 1, 2, 100, 101] {
        let b = md.alloc_data_block().unwrap();
        assert_eq!(md.insert(1, v, b).unwrap(), None);
    }
    md.create_snap(2, 1).unwrap();
    md.set_transaction_id(0, 7).unwrap();
    md.commit().unwrap();
    let path = scratch.path("meta.bin");
    save(&disk, &path);
    assert_thin_check(&path, &[]);
    let dump = thin_dump(&path, &[]);
    assert_eq!(dump, our_dump(&mut md));
    assert_eq!(dump.devices.len(), 2);
    assert_eq!(dump.devices[&2].mappings.len(), 5);
}

#[test]
fn our_checker_agrees_on_simple_pool() {
    let disk = MemDisk::new(8 << 11);
    let mut md = open(&disk, 256);
    md.resize_data(1000).unwrap();
    md.create_thin(1).unwrap();
    for v in 0..1000u64 {
        let b = md.alloc_data_block().unwrap();
        md.insert(1, v * 3, b).unwrap();
    }
    md.create_snap(2, 1).unwrap();
    md.create_snap(3, 1).unwrap();
    md.create_snap(4, 2).unwrap();
    md.commit().unwrap();
    let report = persistent_data::check::check(&mut md).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
}

#[test]
fn metadata_snapshot_counts() {
    let disk = MemDisk::new(8 << 11);
    let mut md = open(&disk, 256);
    md.resize_data(1000).unwrap();
    md.create_thin(1).unwrap();
    md.commit().unwrap();
    eprintln!("live before {:?}", md.live_roots().unwrap());
    let s = md.reserve_metadata_snap().unwrap();
    eprintln!("snap block {s} live {:?}", md.live_roots().unwrap());
    md.commit().unwrap();
    eprintln!("snap {:?}", md.snapshot_roots().unwrap());
    let report = persistent_data::check::check(&mut md).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
}
