//! Devices that fail: the pool reacts as dm-thin does, never panics and never
//! reports a failed operation as done.
//!
//! * A metadata write or commit that fails rolls the transaction back, sets
//!   `needs_check` and turns the pool read-only (an event says so); the requests that
//!   waited for that commit, and every later FLUSH, fail with EIO; reads go on.
//! * A data-device flush that fails does the same (the commit it belonged to fails).
//! * A data write or an external-origin read that fails fails only its request.

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use blockdev::{CrashDisk, FaultOp as Op, FaultRule as Rule, Faults, FaultyDisk, IoBuf, IoError};
use common::*;
use persistent_data::thin::{OpenOptions, ThinMetadata};
use thin_pool::{Pool, PoolConfig, PoolEvent, PoolMode, ThinOp, ThinVolume};

/// A pool whose metadata and data disks can fail, and the handles to make them.
struct FaultyPool {
    rig: Rig,
    pool: Pool,
    meta_faults: Rc<RefCell<Faults>>,
    data_faults: Rc<RefCell<Faults>>,
}

fn faulty_pool() -> FaultyPool {
    let rig = Rig::new(64, 4096);
    let (meta, meta_faults) = FaultyDisk::new(device(&rig.meta, 1, false));
    let (data, data_faults) = FaultyDisk::new(device(&rig.data, 2, true));
    let (pool, _) = Pool::open(Box::new(meta), Box::new(data), rig.config.clone()).unwrap();
    pool.message("create_thin 0").unwrap();
    FaultyPool {
        rig,
        pool,
        meta_faults,
        data_faults,
    }
}

fn fua_write(vol: &mut ThinVolume, sector: u64, data: &[u8]) -> Result<(), IoError> {
    let op = ThinOp::Write {
        sector,
        buf: IoBuf::from_slice(data),
        fua: true,
    };
    run(vol, op).0.map(drop)
}

fn mode_events(pool: &Pool) -> Vec<PoolMode> {
    std::iter::from_fn(|| pool.next_event())
        .filter_map(|event| match event {
            PoolEvent::ModeChanged { mode, .. } => Some(mode),
            _ => None,
        })
        .collect()
}

#[test]
fn a_failed_metadata_commit_rolls_back_and_turns_the_pool_read_only() {
    require_tools();
    let FaultyPool {
        mut rig,
        pool,
        meta_faults,
        ..
    } = faulty_pool();
    let mut vol = pool.activate(0, 16 * BS, None).unwrap();
    let kept = pattern(1, 4096);
    write(&mut vol, 0, &kept).unwrap();
    flush(&mut vol).unwrap();
    write(&mut vol, 2 * BS, &pattern(2, 4096)).unwrap();
    // The commit's first metadata write fails.
    Faults::fail(&meta_faults, Rule::every(Op::Write));
    assert!(
        fua_write(&mut vol, 2 * BS + 8, &pattern(3, 4096)).is_err(),
        "a FUA write acknowledged over a failed commit"
    );
    assert_eq!(mode_events(&pool), [PoolMode::ReadOnly]);
    let status = pool.status_noflush();
    assert_eq!(status.mode, PoolMode::ReadOnly);
    assert!(status.needs_check);
    // Reads go on; the rolled-back block reads as unprovisioned.
    assert_eq!(read(&mut vol, 0, 8), kept);
    assert_eq!(read(&mut vol, 2 * BS, 8), vec![0; 4096]);
    // A write to a block committed earlier still works, as in dm; new blocks fail.
    write(&mut vol, 8, &pattern(4, 4096)).unwrap();
    assert!(write(&mut vol, 4 * BS, &pattern(5, 4096)).is_err());
    assert!(flush(&mut vol).is_err(), "writes may have been lost");
    assert!(pool.message("create_thin 1").is_err());
    assert_eq!(meta_faults.borrow().injected, 1);
    drop(vol);
    drop(pool);
    // Restarted: the metadata checks clean, and the pool stays read-only.
    let image = Scratch::new("faults");
    save(&rig.meta, &image.path("meta"));
    thin_check(&image.path("meta"));
    let pool = rig.open();
    assert_eq!(pool.mode(), PoolMode::ReadOnly);
    let mut vol = pool.activate(0, 16 * BS, None).unwrap();
    assert_eq!(read(&mut vol, 0, 8), kept);
}

#[test]
fn a_commit_that_cannot_even_roll_back_fails_the_pool() {
    let FaultyPool {
        pool, meta_faults, ..
    } = faulty_pool();
    let mut vol = pool.activate(0, 16 * BS, None).unwrap();
    write(&mut vol, 0, &pattern(1, 4096)).unwrap();
    Faults::fail(
        &meta_faults,
        Rule {
            permanent: true,
            ..Rule::every(Op::Write)
        },
    );
    assert!(flush(&mut vol).is_err());
    assert_eq!(mode_events(&pool), [PoolMode::Fail]);
    let (result, _) = run(
        &mut vol,
        ThinOp::Read {
            sector: 0,
            buf: IoBuf::with_sectors(8),
        },
    );
    assert!(result.is_err(), "I/O of a failed pool fails");
}

#[test]
fn a_failed_metadata_read_rolls_back_and_turns_the_pool_read_only() {
    // Far more mappings than the smallest metadata cache holds (built through the
    // metadata layer), so lookups read the metadata device.
    const MAPPINGS: u64 = 40_000;
    let meta_disk = CrashDisk::new(1 << 15);
    let data_disk = CrashDisk::new(MAPPINGS * BS);
    {
        let options = OpenOptions::new(BS as u32);
        let (mut md, _) = ThinMetadata::open(Box::new(meta_disk.handle()), &options).unwrap();
        md.resize_data(MAPPINGS).unwrap();
        md.create_thin(0).unwrap();
        for vblock in 0..MAPPINGS {
            let block = md.alloc_data_block().unwrap();
            md.insert(0, vblock, block).unwrap();
        }
        md.commit().unwrap();
    }
    let mut config = PoolConfig::new(MAPPINGS * BS, BS as u32);
    config.cache_blocks = 64;
    let (meta, meta_faults) = FaultyDisk::new(meta_disk.handle());
    let (pool, _) = Pool::open(Box::new(meta), Box::new(data_disk.handle()), config).unwrap();
    let mut vol = pool.activate(0, MAPPINGS * BS, None).unwrap();
    Faults::fail(&meta_faults, Rule::every(Op::Read));
    let failed = (0..MAPPINGS)
        .step_by(997)
        .filter(|&block| {
            let op = ThinOp::Read {
                sector: block * BS,
                buf: IoBuf::with_sectors(1),
            };
            run(&mut vol, op).0.is_err()
        })
        .count();
    assert_eq!(meta_faults.borrow().injected, 1);
    assert_eq!(failed, 1, "exactly the read whose lookup failed");
    assert_eq!(mode_events(&pool), [PoolMode::ReadOnly]);
    assert!(pool.status_noflush().needs_check);
}

#[test]
fn a_failed_data_write_fails_only_its_request() {
    let FaultyPool {
        pool, data_faults, ..
    } = faulty_pool();
    let mut vol = pool.activate(0, 16 * BS, None).unwrap();
    write(&mut vol, 0, &pattern(1, 4096)).unwrap();
    flush(&mut vol).unwrap();
    let used = pool.status().data_used;
    // A write to a provisioned block, then one that provisions a new block.
    Faults::fail(&data_faults, Rule::every(Op::Write));
    assert!(write(&mut vol, 8, &pattern(2, 4096)).is_err());
    Faults::fail(&data_faults, Rule::every(Op::Write));
    assert!(write(&mut vol, 3 * BS, &pattern(3, 4096)).is_err());
    assert_eq!(data_faults.borrow().injected, 2);
    assert_eq!(pool.mode(), PoolMode::Write);
    assert_eq!(read(&mut vol, 0, 8), pattern(1, 4096));
    assert_eq!(read(&mut vol, 3 * BS, 8), vec![0; 4096], "not mapped");
    flush(&mut vol).unwrap();
    assert_eq!(
        pool.status().data_used,
        used,
        "the failed block was given back"
    );
    write(&mut vol, 3 * BS, &pattern(4, 4096)).unwrap();
    assert_eq!(read(&mut vol, 3 * BS, 8), pattern(4, 4096));
    assert!(mode_events(&pool).is_empty());
}

#[test]
fn a_failed_data_flush_fails_the_commit_and_turns_the_pool_read_only() {
    let FaultyPool {
        pool, data_faults, ..
    } = faulty_pool();
    let mut vol = pool.activate(0, 16 * BS, None).unwrap();
    write(&mut vol, 0, &pattern(1, 4096)).unwrap();
    Faults::fail(&data_faults, Rule::every(Op::Flush));
    assert!(flush(&mut vol).is_err());
    assert_eq!(mode_events(&pool), [PoolMode::ReadOnly]);
    assert!(pool.status_noflush().needs_check);
}

#[test]
fn a_failed_origin_read_fails_only_that_request() {
    let FaultyPool { pool, .. } = faulty_pool();
    let origin_disk = CrashDisk::new(16 * BS);
    origin_disk.write_at(0, &pattern(9, (16 * BS * 512) as usize));
    let (origin, origin_faults) = FaultyDisk::new(origin_disk.handle());
    let mut vol = pool.activate(0, 16 * BS, Some(Box::new(origin))).unwrap();
    Faults::fail(&origin_faults, Rule::every(Op::Read));
    let (result, _) = run(
        &mut vol,
        ThinOp::Read {
            sector: 0,
            buf: IoBuf::with_sectors(8),
        },
    );
    assert!(result.is_err());
    assert_eq!(read(&mut vol, 0, 8), pattern(9, 4096 * 2)[..4096]);
    // A partial write needs the rest of the block from the origin.
    Faults::fail(&origin_faults, Rule::every(Op::Read));
    assert!(write(&mut vol, BS, &pattern(5, 4096)).is_err());
    assert_eq!(
        read(&mut vol, BS, 8),
        pattern(9, (16 * BS * 512) as usize)[(BS * 512) as usize..(BS * 512) as usize + 4096]
    );
    assert_eq!(pool.mode(), PoolMode::Write);
    assert!(mode_events(&pool).is_empty());
}
