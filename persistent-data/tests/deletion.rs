//! Deleting a device over many transactions: every commit on the way is metadata
//! the real `thin_check` accepts, nothing leaks, and a reopened pool carries on.

mod common;

use blockdev::MemDisk;
use common::*;
use persistent_data::Error;
use persistent_data::thin::{FIRST_DELETING_ID, PendingDelete, ThinMetadata};

/// A pool with device 1 mapping `blocks` virtual blocks (every third) and device 2
/// mapping a few of its own.
fn pool(disk: &MemDisk, blocks: u64) -> ThinMetadata {
    let mut md = open(disk, 256);
    md.resize_data(blocks + 100).unwrap();
    md.create_thin(1).unwrap();
    for v in 0..blocks {
        let b = md.alloc_data_block().unwrap();
        md.insert(1, v * 3, b).unwrap();
    }
    md.create_thin(2).unwrap();
    for v in 0..10 {
        let b = md.alloc_data_block().unwrap();
        md.insert(2, v, b).unwrap();
    }
    md.commit().unwrap();
    md
}

fn check(disk: &MemDisk, name: &str) {
    let scratch = Scratch::new(name);
    let path = scratch.path("meta.bin");
    save(disk, &path);
    assert_thin_check(&path, &[]);
}

#[test]
fn a_delete_in_steps_frees_the_id_at_once_and_every_commit_checks_clean() {
    require_tools();
    let disk = MemDisk::new(16 << 11);
    let mut md = pool(&disk, 5000);
    let free_before = md.data_free_blocks();
    let pending = md.start_delete(1, 100).unwrap().expect("deleted in steps");
    assert_eq!(
        pending,
        PendingDelete {
            id: FIRST_DELETING_ID,
            dev: 1,
            remaining: 5000
        }
    );
    assert!(!md.device_exists(1).unwrap());
    md.create_thin(1).unwrap();
    md.commit().unwrap();
    check(&disk, "start");
    assert_eq!(md.pending_deletes().unwrap(), vec![pending]);
    let mut released = 0;
    let mut steps = 0;
    loop {
        let step = md.release_mappings(pending.id, 1500).unwrap();
        if step.mappings == 0 {
            break;
        }
        // Whole leaves (at most 252 mappings each) until the next could overrun.
        assert!(
            (1500 - 252..=1500).contains(&step.mappings) || released + step.mappings == 5000,
            "{} mappings in a step",
            step.mappings
        );
        let own: u64 = step.runs.iter().map(|run| run.len).sum();
        assert_eq!(own, step.mappings, "nothing is shared");
        released += step.mappings;
        for run in step.runs {
            for block in run.data_begin..run.data_begin + run.len {
                assert_eq!(md.dec_data_block(block).unwrap(), 0);
            }
        }
        steps += 1;
        md.commit().unwrap();
        check(&disk, "step");
        let left = md.pending_deletes().unwrap();
        assert_eq!(left[0].remaining, 5000 - released);
    }
    assert_eq!(released, 5000);
    assert!((4..=5).contains(&steps), "{steps} steps");
    md.commit().unwrap();
    check(&disk, "done");
    assert!(md.pending_deletes().unwrap().is_empty());
    assert!(!md.device_exists(pending.id).unwrap());
    assert_eq!(md.data_free_blocks(), free_before + 5000);
    assert_eq!(md.devices().unwrap(), vec![1, 2]);
}

#[test]
fn a_tree_sharing_all_but_one_leaf_is_released_a_leaf_at_a_time_in_few_steps() {
    require_tools();
    let disk = MemDisk::new(16 << 11);
    let mut md = pool(&disk, 20_000);
    md.create_snap(3, 1).unwrap();
    // One write to device 1 gives it a path of nodes of its own; every other leaf
    // stays shared with the snapshot.
    let written = md.alloc_data_block().unwrap();
    let replaced = md
        .insert(1, 0, written)
        .unwrap()
        .expect("block 0 was mapped");
    md.dec_data_block(replaced).unwrap();
    md.commit().unwrap();
    let free_before = md.data_free_blocks();
    let pending = md
        .start_delete(1, 100)
        .unwrap()
        .expect("its root is its own");
    md.commit().unwrap();
    let (mut released, mut own, mut steps) = (0, Vec::new(), 0);
    loop {
        let step = md.release_mappings(pending.id, 1024).unwrap();
        if step.mappings == 0 {
            break;
        }
        released += step.mappings;
        for run in step.runs {
            for block in run.data_begin..run.data_begin + run.len {
                own.push(block);
                md.dec_data_block(block).unwrap();
            }
        }
        steps += 1;
        md.commit().unwrap();
        check(&disk, "shared-step");
        assert_eq!(
            md.pending_deletes().unwrap()[0].remaining,
            20_000 - released
        );
    }
    assert_eq!(released, 20_000);
    // Only the leaf device 1 wrote was its own, and the last one, copied when it
    // became the root: the shared ones were dropped without a look at their
    // mappings, about 49 leaves for a budget of 1024 (a delete of its own
    // mappings would take 20 steps).
    assert!(own.len() <= 2 * 252, "{} mappings handed back", own.len());
    assert!(own.contains(&written));
    assert!(steps <= 3, "{steps} steps");
    md.commit().unwrap();
    check(&disk, "shared-done");
    assert_eq!(md.data_free_blocks(), free_before + 1);
    assert_eq!(md.devices().unwrap(), vec![2, 3]);
    assert_eq!(md.mapped_blocks(3).unwrap(), 20_000);
    assert_eq!(md.lookup(3, 0).unwrap().unwrap().data_block, replaced);
}

#[test]
fn a_reopened_pool_finds_the_delete_in_progress() {
    let disk = MemDisk::new(16 << 11);
    let mut md = pool(&disk, 3000);
    let pending = md.start_delete(1, 0).unwrap().unwrap();
    md.commit().unwrap();
    let released = md.release_mappings(pending.id, 1000).unwrap();
    for run in released.runs {
        for block in run.data_begin..run.data_begin + run.len {
            md.dec_data_block(block).unwrap();
        }
    }
    md.commit().unwrap();
    drop(md);
    let mut md = open(&disk, 256);
    assert_eq!(
        md.pending_deletes().unwrap(),
        vec![PendingDelete {
            id: pending.id,
            dev: 1,
            remaining: 3000 - released.mappings
        }]
    );
}

#[test]
fn small_and_shared_devices_are_deleted_at_once() {
    let disk = MemDisk::new(16 << 11);
    let mut md = pool(&disk, 300);
    assert_eq!(md.start_delete(2, 100).unwrap(), None, "10 mappings");
    md.create_snap(3, 1).unwrap();
    assert_eq!(md.start_delete(1, 100).unwrap(), None, "tree shared with 3");
    assert_eq!(md.devices().unwrap(), vec![3]);
    assert!(md.pending_deletes().unwrap().is_empty());
    assert_eq!(md.mapped_blocks(3).unwrap(), 300);
}

#[test]
fn reserved_ids_are_refused_for_new_devices() {
    let disk = MemDisk::new(16 << 11);
    let mut md = pool(&disk, 10);
    assert_eq!(
        md.create_thin(FIRST_DELETING_ID),
        Err(Error::ReservedDeviceId(FIRST_DELETING_ID))
    );
    let pending = md.start_delete(1, 0).unwrap().unwrap();
    assert_eq!(
        md.create_snap(5, pending.id),
        Err(Error::NoSuchDevice(pending.id))
    );
    assert_eq!(md.release_mappings(2, 10), Err(Error::NoSuchDevice(2)));
}
