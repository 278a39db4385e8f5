//! Edge cases: durability windows, running out of space, snapshots under load,
//! external origins, bad input, metadata limits and the thin tools' views.

mod common;

use std::collections::BTreeMap;

use blockdev::{BlockDevice, CrashDisk, IoBuf, IoError, MemDisk, Unflushed};
use common::*;
use thin_pool::{
    Errno, Extent, Pool, PoolConfig, PoolEvent, PoolMode, ThinOp, ThinOutput, ThinRequest,
    ThinVolume,
};

fn fill_garbage(disk: &CrashDisk) {
    disk.write_at(0, &pattern(0xBAD, disk.info().bytes() as usize));
}

fn events(pool: &Pool) -> Vec<PoolEvent> {
    std::iter::from_fn(|| pool.next_event()).collect()
}

/// A write whose data completes after a commit's data flush was submitted must not
/// have its mapping in that commit: after a power cut the block is either unmapped
/// or holds the write, never stale data.
#[test]
fn mapping_is_not_committed_before_its_data_is_flushed() {
    for seed in 0..8 {
        let mut rig = Rig::new(16, 4096);
        rig.reorder = false;
        fill_garbage(&rig.data);
        let pool = rig.open();
        pool.message("create_thin 0").unwrap();
        let mut vol = pool.activate(0, 4 * BS, None).unwrap();
        // The write's data goes to the device before the commit's flush is sent,
        // but completes after it: the flush does not cover it.
        rig.data.hold(true);
        let data = pattern(7, 8 * 512);
        submit_write(&mut vol, 1, 0, &data);
        vol.submit_op(ThinRequest {
            tag: 2,
            op: ThinOp::Flush,
        })
        .unwrap();
        pool.poll();
        rig.data.hold(false);
        complete_ok(&mut vol, 2);
        drop(vol);
        drop(pool);
        crash(&rig.meta, seed);
        crash(&rig.data, seed + 100);
        let pool = rig.open();
        let mut vol = pool.activate(0, 4 * BS, None).unwrap();
        let block = read(&mut vol, 0, BS);
        let zeros = block.iter().all(|&b| b == 0);
        let written = block[..8 * 512] == data[..] && block[8 * 512..].iter().all(|&b| b == 0);
        assert!(
            zeros || written,
            "stale data exposed after a power cut (seed {seed})"
        );
    }
}

#[test]
fn flushed_and_fua_writes_survive_power_cuts() {
    for seed in 0..8 {
        let mut rig = Rig::new(64, 4096);
        rig.seed = seed * 100;
        fill_garbage(&rig.data);
        let pool = rig.open();
        pool.message("create_thin 0").unwrap();
        let mut vol = pool.activate(0, 16 * BS, None).unwrap();
        let a = pattern(seed, (3 * BS * 512) as usize);
        write(&mut vol, 100, &a).unwrap();
        flush(&mut vol).unwrap();
        let b = pattern(seed + 50, 4096);
        let (result, _) = run(
            &mut vol,
            ThinOp::Write {
                sector: 10 * BS + 3,
                buf: IoBuf::from_slice(&b),
                fua: true,
            },
        );
        result.unwrap();
        // Unflushed: an overwrite of flushed data and a new block.
        write(&mut vol, 100, &pattern(seed + 99, 4096)).unwrap();
        write(&mut vol, 12 * BS, &pattern(seed + 98, 4096)).unwrap();
        drop(vol);
        drop(pool);
        crash(&rig.meta, seed);
        crash(&rig.data, seed + 1);
        let pool = rig.open();
        let mut vol = pool.activate(0, 16 * BS, None).unwrap();
        assert_eq!(read(&mut vol, 108, 3 * BS - 8), a[8 * 512..]);
        assert_eq!(read(&mut vol, 10 * BS + 3, 8), b);
        // Whatever survived of block 12 is the write or nothing, never garbage.
        let block = read(&mut vol, 12 * BS, BS);
        assert!(block[8 * 512..].iter().all(|&x| x == 0), "seed {seed}");
        let image = Scratch::new("crash");
        save(&rig.meta, &image.path("meta"));
        require_tools();
        thin_check(&image.path("meta"));
    }
}

fn overcommitted(error_if_no_space: bool) -> (Rig, Pool) {
    let mut rig = Rig::new(16, 4096);
    rig.config.length = 8 * BS;
    rig.config.low_water_mark = 2;
    rig.config.features.error_if_no_space = error_if_no_space;
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    (rig, pool)
}

#[test]
fn out_of_space_with_error_if_no_space_then_grow() {
    let (_rig, pool) = overcommitted(true);
    let mut vol = pool.activate(0, 64 * BS, None).unwrap();
    for block in 0..8 {
        write(&mut vol, block * BS, &[block as u8; 512]).unwrap();
    }
    assert_eq!(write(&mut vol, 8 * BS, &[9; 512]), Err(IoError::NoSpace));
    // Overwrites of provisioned blocks and reads still work.
    write(&mut vol, 0, &[7; 512]).unwrap();
    assert_eq!(read(&mut vol, 0, 1), vec![7; 512]);
    let status = pool.status();
    assert_eq!(status.mode, PoolMode::OutOfDataSpace);
    assert!(
        status
            .to_string()
            .contains("8/8 - out_of_data_space discard_passdown error_if_no_space"),
        "{status}"
    );
    let seen = events(&pool);
    assert!(matches!(
        seen[0],
        PoolEvent::LowWaterMark {
            free_blocks: 2,
            low_water_mark: 2
        }
    ));
    assert!(matches!(
        seen[1],
        PoolEvent::ModeChanged {
            mode: PoolMode::OutOfDataSpace,
            ..
        }
    ));
    pool.resize(16 * BS).unwrap();
    assert_eq!(pool.mode(), PoolMode::Write);
    write(&mut vol, 8 * BS, &[9; 512]).unwrap();
    assert_eq!(read(&mut vol, 8 * BS, 1), vec![9; 512]);
    assert!(pool.resize(4 * BS).unwrap_err().text.contains("too small"));
}

#[test]
fn a_volume_dropped_while_its_writes_wait_for_space_goes_quietly() {
    let (_rig, pool) = overcommitted(false);
    let mut vol = pool.activate(0, 64 * BS, None).unwrap();
    for block in 0..8 {
        write(&mut vol, block * BS, &[1; 512]).unwrap();
    }
    submit_write(&mut vol, 20, 20 * BS, &[20; 512]);
    submit_write(&mut vol, 21, 21 * BS, &[21; 512]);
    assert!(poll_some(&pool, &mut vol).is_empty(), "the writes wait");
    drop(vol);
    pool.resize(16 * BS).unwrap();
    let mut again = pool.activate(0, 64 * BS, None).unwrap();
    assert_eq!(
        read(&mut again, 20 * BS, 1),
        vec![0; 512],
        "the waiting write failed"
    );
    write(&mut again, 20 * BS, &[2; 512]).unwrap();
    assert_eq!(read(&mut again, 20 * BS, 1), vec![2; 512]);
}

fn poll_some(
    pool: &Pool,
    vol: &mut thin_pool::ThinVolume,
) -> Vec<(u64, Result<ThinOutput, IoError>)> {
    for _ in 0..50 {
        pool.poll();
    }
    std::iter::from_fn(|| vol.poll_op())
        .map(|c| (c.tag, c.result))
        .collect()
}

#[test]
fn out_of_space_queues_until_grown_or_timeout() {
    let (_rig, pool) = overcommitted(false);
    let mut vol = pool.activate(0, 64 * BS, None).unwrap();
    for block in 0..8 {
        write(&mut vol, block * BS, &[1; 512]).unwrap();
    }
    pool.service(&|| 1_000_000_000);
    submit_write(&mut vol, 20, 20 * BS, &[20; 512]);
    assert!(
        poll_some(&pool, &mut vol).is_empty(),
        "write should wait for space"
    );
    assert_eq!(pool.mode(), PoolMode::OutOfDataSpace);
    assert!(pool.status().to_string().contains("queue_if_no_space"));
    pool.resize(12 * BS).unwrap();
    let done = poll_some(&pool, &mut vol);
    assert_eq!(done.len(), 1);
    assert!(done[0].1.is_ok());
    assert_eq!(read(&mut vol, 20 * BS, 1), vec![20; 512]);
    for block in 9..12 {
        write(&mut vol, block * BS, &[1; 512]).unwrap();
    }
    // Full again: the write waits, and fails with ENOSPC after the timeout.
    pool.service(&|| 2_000_000_000);
    submit_write(&mut vol, 30, 30 * BS, &[30; 512]);
    assert!(poll_some(&pool, &mut vol).is_empty());
    pool.service(&|| 2_000_000_000 + 59_000_000_000);
    assert!(poll_some(&pool, &mut vol).is_empty());
    pool.service(&|| 2_000_000_000 + 61_000_000_000);
    let done = poll_some(&pool, &mut vol);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].1, Err(IoError::NoSpace));
    assert!(pool.status().to_string().contains("error_if_no_space"));
    assert!(
        events(&pool)
            .iter()
            .any(|e| matches!(e, PoolEvent::NoSpaceTimeout { failed_writes: 1 }))
    );
    assert_eq!(write(&mut vol, 31 * BS, &[1; 512]), Err(IoError::NoSpace));
    // Discarding frees space: the pool returns to write mode after the commit.
    discard(&mut vol, 0, 2 * BS).unwrap();
    pool.commit().unwrap();
    assert_eq!(pool.mode(), PoolMode::Write);
    write(&mut vol, 31 * BS, &[5; 512]).unwrap();
    assert!(!pool.status().error_if_no_space);
}

#[test]
fn discard_of_shared_blocks_keeps_the_snapshot() {
    let mut rig = Rig::new(64, 4096);
    let pool = rig.open();
    pool.message("create_thin 1").unwrap();
    let mut origin = pool.activate(1, 8 * BS, None).unwrap();
    let data = pattern(3, (4 * BS * 512) as usize);
    write(&mut origin, 0, &data).unwrap();
    pool.message("create_snap 2 1").unwrap();
    discard(&mut origin, 0, 4 * BS).unwrap();
    assert_eq!(pool.status().data_used, 4, "shared blocks stay allocated");
    assert_eq!(
        rig.data.stats().discards,
        0,
        "shared blocks are not discarded below"
    );
    assert!(read(&mut origin, 0, 4 * BS).iter().all(|&b| b == 0));
    let mut snap = pool.activate(2, 8 * BS, None).unwrap();
    assert_eq!(read(&mut snap, 0, 4 * BS), data);
    discard(&mut snap, 0, 2 * BS).unwrap();
    pool.commit().unwrap();
    assert_eq!(pool.status().data_used, 2);
    assert_eq!(rig.data.stats().discards, 1);
    assert_eq!(
        read(&mut snap, 2 * BS, 2 * BS),
        data[(2 * BS * 512) as usize..]
    );
}

#[test]
fn delete_origin_with_snapshot_chain() {
    require_tools();
    let mut rig = Rig::new(128, 4096);
    let pool = rig.open();
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, 8 * BS, None).unwrap();
    let mut expected = Vec::new();
    for generation in 0..5u64 {
        let data = pattern(generation, (8 * BS * 512) as usize);
        write(&mut vol, 0, &data[..(BS * 512) as usize]).unwrap();
        write(&mut vol, generation * BS, &data[..(BS * 512) as usize]).unwrap();
        pool.message(&format!("create_snap {} 1", 10 + generation))
            .unwrap();
        expected.push(read(&mut vol, 0, 8 * BS));
    }
    let error = pool.message("delete 1").unwrap_err();
    assert_eq!(error.errno, Errno::Ebusy);
    drop(vol);
    pool.message("delete 1").unwrap();
    // A snapshot of a snapshot, then delete the middle of the chain.
    pool.message("create_snap 20 12").unwrap();
    pool.message("delete 12").unwrap();
    for (generation, data) in expected.iter().enumerate() {
        let dev = if generation == 2 {
            20
        } else {
            10 + generation as u64
        };
        let mut snap = pool.activate(dev, 8 * BS, None).unwrap();
        assert_eq!(&read(&mut snap, 0, 8 * BS), data, "snapshot {dev}");
    }
    let scratch = Scratch::new("chain");
    save(&rig.meta, &scratch.path("meta"));
    thin_check(&scratch.path("meta"));
}

#[test]
fn origin_smaller_than_the_volume() {
    let mut rig = Rig::new(64, 4096);
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    let origin_sectors = 2 * BS + 40;
    let origin_data = pattern(11, (origin_sectors * 512) as usize);
    let origin = MemDisk::new(origin_sectors);
    origin.write_at(0, &origin_data);
    let mut info = origin.info().clone();
    info.read_only = true;
    let mut vol = pool
        .activate(0, 5 * BS, Some(Box::new(origin.handle_with_info(info))))
        .unwrap();
    // A read straddling the origin's end: origin below, zeros beyond.
    let (result, buf) = run(
        &mut vol,
        ThinOp::Read {
            sector: 2 * BS,
            buf: IoBuf::with_sectors(BS as usize),
        },
    );
    let Ok(ThinOutput::Read { zero_holes }) = result else {
        panic!("{result:?}")
    };
    assert_eq!(buf[..40 * 512], origin_data[(2 * BS * 512) as usize..]);
    assert!(buf[40 * 512..].iter().all(|&b| b == 0));
    assert_eq!(
        zero_holes,
        vec![thin_pool::SectorRun {
            start: 40,
            sectors: BS - 40
        }]
    );
    let (result, _) = run(
        &mut vol,
        ThinOp::BlockStatus {
            sector: 0,
            sectors: 5 * BS,
            max_extents: 10,
        },
    );
    assert_eq!(
        result.unwrap(),
        ThinOutput::Extents(vec![
            Extent {
                sectors: origin_sectors,
                hole: true,
                zero: false
            },
            Extent {
                sectors: 5 * BS - origin_sectors,
                hole: true,
                zero: true
            },
        ])
    );
    // A partial write to the straddling block copies the origin part, zeros the rest.
    write(&mut vol, 2 * BS + 100, &[0xEE; 512]).unwrap();
    let block = read(&mut vol, 2 * BS, BS);
    assert_eq!(block[..40 * 512], origin_data[(2 * BS * 512) as usize..]);
    assert!(block[40 * 512..100 * 512].iter().all(|&b| b == 0));
    assert_eq!(block[100 * 512..101 * 512], [0xEE; 512]);
    // A partial write below the end copies the whole origin block.
    write(&mut vol, 10, &[0xAA; 512]).unwrap();
    let block = read(&mut vol, 0, BS);
    assert_eq!(block[..10 * 512], origin_data[..10 * 512]);
    assert_eq!(
        block[11 * 512..],
        origin_data[11 * 512..(BS * 512) as usize]
    );
    // Discard: the origin shows through again.
    discard(&mut vol, 0, BS).unwrap();
    assert_eq!(read(&mut vol, 0, BS), origin_data[..(BS * 512) as usize]);
    // Write-zeroes with unmap must not let the origin show: it writes zeros.
    let (result, _) = run(
        &mut vol,
        ThinOp::WriteZeroes {
            sector: 0,
            sectors: BS,
            unmap: true,
            fua: false,
        },
    );
    result.unwrap();
    assert!(read(&mut vol, 0, BS).iter().all(|&b| b == 0));
    let mut now = vec![0u8; origin_data.len()];
    origin.read_at(0, &mut now);
    assert_eq!(now, origin_data, "the origin was written");
}

#[test]
fn reopen_with_a_different_block_size_is_refused() {
    let mut rig = Rig::new(64, 4096);
    drop(rig.open());
    rig.config.data_block_size = 256;
    let error = rig.try_open().err().unwrap();
    assert_eq!(
        error.to_string(),
        "changing the data block size (from 128 to 256) is not supported"
    );
    rig.config.data_block_size = 100;
    assert!(
        rig.try_open()
            .err()
            .unwrap()
            .to_string()
            .starts_with("Invalid block size")
    );
}

#[test]
fn oversized_metadata_device_is_capped_with_a_warning() {
    let meta = CrashDisk::new(17 << 21);
    let data = CrashDisk::new(64 * BS);
    let (pool, report) = Pool::open(
        Box::new(device(&meta, 1, false)),
        Box::new(device(&data, 2, false)),
        PoolConfig::new(64 * BS, BS as u32),
    )
    .unwrap();
    assert!(report.formatted);
    assert_eq!(report.warnings.len(), 1);
    assert!(
        report.warnings[0].contains("larger than 33292800 sectors: excess space will not be used"),
        "{}",
        report.warnings[0]
    );
    assert_eq!(pool.status().metadata_total, 4_161_600);
    assert!(matches!(
        events(&pool)[0],
        PoolEvent::MetadataDeviceTooLarge(_)
    ));
}

#[test]
fn bad_messages_are_refused_and_change_nothing() {
    let mut rig = Rig::new(64, 4096);
    let pool = rig.open();
    pool.message("create_thin 1").unwrap();
    pool.message("set_transaction_id 0 5").unwrap();
    let vol = pool.activate(1, BS, None).unwrap();
    let mut before = String::new();
    pool.dump_xml(&mut before, false).unwrap();
    let cases = [
        (
            "create_thin 1",
            Errno::Eexist,
            "Creation of new thinly-provisioned device with id 1 failed: thin device 1 already exists",
        ),
        (
            "create_thin 16777216",
            Errno::Einval,
            "Message received with invalid device id: 16777216",
        ),
        (
            "create_thin",
            Errno::Einval,
            "Message received with 1 arguments instead of 2.",
        ),
        (
            "create_snap 2 9",
            Errno::Enodata,
            "Creation of new snapshot 2 of device 9 failed: thin device 9 does not exist",
        ),
        (
            "create_snap 1 1",
            Errno::Eexist,
            "Creation of new snapshot 1 of device 1 failed",
        ),
        (
            "delete 9",
            Errno::Enodata,
            "Deletion of thin device 9 failed: thin device 9 does not exist",
        ),
        (
            "delete 1",
            Errno::Ebusy,
            "Deletion of thin device 1 failed: the device is active",
        ),
        (
            "set_transaction_id 4 6",
            Errno::Einval,
            "Failed to change transaction id from 4 to 6: mismatched transaction id",
        ),
        (
            "set_transaction_id 5",
            Errno::Einval,
            "Message received with 2 arguments instead of 3.",
        ),
        (
            "release_metadata_snap",
            Errno::Einval,
            "release_metadata_snap failed",
        ),
        (
            "frobnicate",
            Errno::Einval,
            "Unrecognised thin pool target message received: frobnicate",
        ),
    ];
    for (text, errno, prefix) in cases {
        let error = pool.message(text).unwrap_err();
        assert_eq!(error.errno, errno, "{text}: {error}");
        assert!(error.text.starts_with(prefix), "{text}: {}", error.text);
    }
    pool.message("reserve_metadata_snap").unwrap();
    let error = pool.message("reserve_metadata_snap").unwrap_err();
    assert_eq!(error.errno, Errno::Ebusy);
    pool.message("release_metadata_snap").unwrap();
    let mut after = String::new();
    pool.dump_xml(&mut after, false).unwrap();
    assert_eq!(before, after);
    assert_eq!(pool.status().transaction_id, 5);
    drop(vol);
}

#[test]
fn snapshot_while_writes_are_in_flight() {
    let mut rig = Rig::new(256, 8192);
    let pool = rig.open();
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, 32 * BS, None).unwrap();
    write(&mut vol, 0, &pattern(1, (16 * BS * 512) as usize)).unwrap();
    let mut expected = read(&mut vol, 0, 32 * BS);
    // Many writes in flight, to provisioned and unprovisioned blocks.
    for tag in 0..40u64 {
        let sector = (tag * 97) % (32 * BS - 8);
        let data = pattern(100 + tag, 8 * 512);
        expected[(sector * 512) as usize..((sector + 8) * 512) as usize].copy_from_slice(&data);
        submit_write(&mut vol, tag, sector, &data);
    }
    pool.message("create_snap 2 1").unwrap();
    complete_ok(&mut vol, 40);
    // Writes after the message change the origin only.
    write(&mut vol, 0, &pattern(999, (32 * BS * 512) as usize)).unwrap();
    let mut snap = pool.activate(2, 32 * BS, None).unwrap();
    assert!(
        read(&mut snap, 0, 32 * BS) == expected,
        "snapshot differs from the data as of the message"
    );
}

#[test]
fn concurrent_overlapping_writes_to_one_unprovisioned_block() {
    for (shared, reorder) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut rig = Rig::new(64, 4096);
        rig.reorder = reorder;
        let pool = rig.open();
        pool.message("create_thin 1").unwrap();
        let mut vol = pool.activate(1, 4 * BS, None).unwrap();
        if shared {
            write(&mut vol, 0, &[3; 512 * 128]).unwrap();
            pool.message("create_snap 2 1").unwrap();
        }
        let mut expected = if shared {
            vec![3u8; 512 * 128]
        } else {
            vec![0u8; 512 * 128]
        };
        // Per sector, the writes covering it: any of them may be the last to land.
        let mut covering: Vec<Vec<Vec<u8>>> = vec![Vec::new(); BS as usize];
        for tag in 0..12u64 {
            let sector = tag * 7 % 100;
            let data = pattern(tag, 20 * 512);
            expected[(sector * 512) as usize..((sector + 20) * 512) as usize]
                .copy_from_slice(&data);
            for s in 0..20usize {
                covering[sector as usize + s].push(data[s * 512..(s + 1) * 512].to_vec());
            }
            submit_write(&mut vol, tag, sector, &data);
        }
        complete_ok(&mut vol, 12);
        let now = read(&mut vol, 0, BS);
        if reorder {
            // Writes in flight together may land in any order, but each sector
            // holds one of the writes that covered it.
            for (s, values) in covering.iter().enumerate() {
                let got = &now[s * 512..(s + 1) * 512];
                let fine = if values.is_empty() {
                    *got == expected[s * 512..(s + 1) * 512]
                } else {
                    values.iter().any(|v| v[..] == *got)
                };
                assert!(
                    fine,
                    "sector {s} holds data no write put there (shared={shared})"
                );
            }
        } else {
            let first = (0..BS as usize)
                .find(|&s| now[s * 512..(s + 1) * 512] != expected[s * 512..(s + 1) * 512]);
            assert_eq!(first, None, "first wrong sector (shared={shared})");
        }
        assert_eq!(pool.thin_status(1).unwrap().mapped_sectors, BS);
        pool.commit().unwrap();
        assert_eq!(pool.status().data_used, 1 + u64::from(shared));
    }
}

/// thin_delta and thin_ls on a snapshot and its origin agree with what was written,
/// including the last blocks of the volume.
#[test]
fn thin_delta_and_thin_ls_match() {
    require_tools();
    let mut rig = Rig::new(128, 4096);
    let pool = rig.open();
    pool.message("create_thin 1").unwrap();
    let blocks = 20;
    let mut vol = pool.activate(1, blocks * BS, None).unwrap();
    for block in [0, 1, 2, 5, 6, 18, 19] {
        write(&mut vol, block * BS, &[1; 512]).unwrap();
    }
    pool.message("create_snap 2 1").unwrap();
    // Origin: overwrite 1 and 19 (different), new 9 (left_only), discard 5 (right_only).
    write(&mut vol, BS, &[2; 512]).unwrap();
    write(&mut vol, 19 * BS + 5, &[2; 512]).unwrap();
    write(&mut vol, 9 * BS, &[2; 512]).unwrap();
    discard(&mut vol, 5 * BS, BS).unwrap();
    pool.message("reserve_metadata_snap").unwrap();
    let scratch = Scratch::new("delta");
    let image = scratch.path("meta");
    save(&rig.meta, &image);
    let delta = thin_delta(&image, 1, 2, &["-m"]);
    let expect = |kind: &str, begin, length| (kind.to_string(), begin, length);
    assert_eq!(
        delta,
        vec![
            expect("same", 0, 1),
            expect("different", 1, 1),
            expect("same", 2, 1),
            expect("right_only", 5, 1),
            expect("same", 6, 1),
            expect("left_only", 9, 1),
            expect("same", 18, 1),
            expect("different", 19, 1),
        ]
    );
    let ls = thin_ls(&image, &["-m"]);
    let mut expected = BTreeMap::new();
    expected.insert(1, (7, 3, 4));
    expected.insert(2, (7, 3, 4));
    assert_eq!(ls, expected);
    let ours: Vec<(u64, u64, u64, u64)> = pool
        .usage()
        .unwrap()
        .iter()
        .map(|u| (u.dev, u.mapped, u.exclusive, u.shared))
        .collect();
    assert_eq!(ours, vec![(1, 7, 3, 4), (2, 7, 3, 4)]);
}

#[test]
fn metadata_snapshot_is_a_frozen_view() {
    require_tools();
    let mut rig = Rig::new(128, 4096);
    let pool = rig.open();
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, 32 * BS, None).unwrap();
    for block in 0..4 {
        write(&mut vol, block * BS, &[1; 512]).unwrap();
    }
    pool.message("reserve_metadata_snap").unwrap();
    let held = pool.status().held_root.unwrap();
    let used_with_snap = pool.status().metadata_used;
    for block in 4..20 {
        write(&mut vol, block * BS, &[2; 512]).unwrap();
    }
    discard(&mut vol, 0, BS).unwrap();
    pool.message("create_thin 2").unwrap();
    let scratch = Scratch::new("msnap");
    let image = scratch.path("meta");
    save(&rig.meta, &image);
    thin_check(&image);
    let frozen = thin_dump(&image, &["-m"]);
    assert_eq!(frozen.keys().copied().collect::<Vec<_>>(), vec![1]);
    assert_eq!(
        frozen[&1].keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    let live = thin_dump(&image, &[]);
    assert_eq!(live[&1].len(), 19);
    assert!(pool.status().to_string().contains(&format!(" {held} rw ")));
    pool.message("release_metadata_snap").unwrap();
    assert!(pool.status().metadata_used < used_with_snap + 3);
    save(&rig.meta, &image);
    thin_check(&image);
    let (status, _, stderr) = tool("thin_dump", &["-m", image.to_str().unwrap()]);
    assert_ne!(status, 0, "no snapshot should be held: {stderr}");
}

#[test]
fn read_only_pool() {
    let mut rig = Rig::new(64, 4096);
    rig.config.features.read_only = true;
    assert!(rig.try_open().err().unwrap().to_string().contains("blank"));
    rig.config.features.read_only = false;
    let pool = rig.open();
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, 8 * BS, None).unwrap();
    write(&mut vol, 0, &[1; 512]).unwrap();
    drop(vol);
    pool.close().map_err(|(_, e)| e).unwrap();
    rig.config.features.read_only = true;
    let pool = rig.open();
    assert!(pool.status().to_string().contains(" ro "));
    let error = pool.message("create_thin 2").unwrap_err();
    assert_eq!(error.errno, Errno::Eopnotsupp);
    let mut vol = pool.activate(1, 8 * BS, None).unwrap();
    write(&mut vol, 0, &[5; 512]).unwrap();
    assert_eq!(read(&mut vol, 0, 1), vec![5; 512]);
    assert!(matches!(
        write(&mut vol, BS, &[5; 512]),
        Err(IoError::Device(_))
    ));
    discard(&mut vol, 0, 8 * BS).unwrap();
    assert_eq!(read(&mut vol, 0, 1), vec![5; 512]);
    flush(&mut vol).unwrap();
}

/// Metadata that fills up stops new mappings (out-of-metadata-space) without
/// damage; reopening with the same device keeps that mode, reloading with a larger
/// metadata device ends it.
#[test]
fn metadata_exhaustion_then_a_larger_metadata_device() {
    require_tools();
    let (mut rig, pool, mut vol, mut expected) = metadata_exhausted();
    assert_eq!(pool.mode(), PoolMode::OutOfMetadataSpace);
    // New blocks are refused with EIO; exclusive blocks are still written in place.
    assert!(matches!(
        write(&mut vol, 700 * BS, &[1; 512]),
        Err(IoError::Device(_))
    ));
    let status = pool.status();
    assert!(status.to_string().contains(" ro "));
    assert_eq!(status.metadata_used, status.metadata_total);
    assert_eq!(
        pool.message("create_thin 999").unwrap_err().errno,
        Errno::Eopnotsupp
    );
    assert!(events(&pool).iter().any(|e| matches!(
        e,
        PoolEvent::ModeChanged {
            mode: PoolMode::OutOfMetadataSpace,
            ..
        }
    )));
    // Everything acknowledged is still there, and the metadata is sound.
    let check_data = |vol: &mut ThinVolume, expected: &[u32]| {
        for (block, value) in expected.iter().enumerate() {
            assert_eq!(
                read(vol, block as u64 * BS, 1),
                value.to_le_bytes().repeat(128)
            );
        }
    };
    check_data(&mut vol, &expected);
    flush(&mut vol).unwrap();
    drop(vol);
    pool.close().map_err(|(_, e)| e).unwrap();
    let scratch = Scratch::new("nometa");
    save(&rig.meta, &scratch.path("meta"));
    thin_check(&scratch.path("meta"));

    // Reopened on the same device: still out of metadata space.
    let pool = rig.open();
    assert_eq!(pool.mode(), PoolMode::OutOfMetadataSpace);
    pool.close().map_err(|(_, e)| e).unwrap();

    // Reloaded with a metadata device eight times larger: back to write mode.
    let grown = CrashDisk::new(1024 * 8);
    let mut image = vec![0u8; 128 * 4096];
    rig.meta.read_at(0, &mut image);
    grown.write_at(0, &image);
    rig.meta = grown;
    let (pool, report) = Pool::open(
        Box::new(device(&rig.meta, 5, false)),
        Box::new(device(&rig.data, 6, true)),
        rig.config.clone(),
    )
    .unwrap();
    assert_eq!(report.metadata_grown_from, Some(128));
    assert_eq!(pool.mode(), PoolMode::Write);
    let status = pool.status();
    assert_eq!(status.metadata_total, 1024);
    assert!(status.metadata_used < 300, "{status}");
    pool.message("create_snap 500 1").unwrap();
    let mut vol = pool.activate(1, 1024 * BS, None).unwrap();
    for block in [0u64, 700, 900] {
        let value = 7_000_000 + block as u32;
        write(&mut vol, block * BS, &value.to_le_bytes().repeat(128)).unwrap();
        if let Some(slot) = expected.get_mut(block as usize) {
            *slot = value;
        }
    }
    check_data(&mut vol, &expected);
    drop(vol);
    pool.close().map_err(|(_, e)| e).unwrap();
    save(&rig.meta, &scratch.path("grown"));
    thin_check(&scratch.path("grown"));
}

#[test]
fn block_zeroing_can_be_skipped() {
    for skip in [false, true] {
        let mut rig = Rig::new(16, 4096);
        fill_garbage(&rig.data);
        rig.config.features.skip_block_zeroing = skip;
        let pool = rig.open();
        pool.message("create_thin 1").unwrap();
        let mut vol = pool.activate(1, 4 * BS, None).unwrap();
        write(&mut vol, 8, &[1; 512]).unwrap();
        let block = read(&mut vol, 0, BS);
        assert_eq!(block[8 * 512..9 * 512], [1; 512]);
        assert_eq!(block[..8 * 512].iter().all(|&b| b == 0), !skip);
    }
}

#[test]
fn discard_policies() {
    let mut rig = Rig::new(16, 4096);
    rig.config.features.ignore_discard = true;
    let pool = rig.open();
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, 4 * BS, None).unwrap();
    assert!(!vol.info().discard);
    assert_eq!(discard(&mut vol, 0, BS), Err(IoError::Unsupported));
    assert!(pool.status().to_string().contains("ignore_discard"));
    drop(vol);
    drop(pool);

    let mut rig = Rig::new(16, 4096);
    rig.config.features.no_discard_passdown = true;
    let pool = rig.open();
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, 4 * BS, None).unwrap();
    write(&mut vol, 0, &[1; 512 * 128]).unwrap();
    discard(&mut vol, 0, BS).unwrap();
    assert_eq!(pool.thin_status(1).unwrap().mapped_sectors, 0);
    assert_eq!(rig.data.stats().discards, 0);
    assert!(pool.status().to_string().contains("no_discard_passdown"));
}

/// A discard of a huge, mostly empty volume runs in ranges (64-bit lengths, no
/// recursion per block) and sends one discard per freed run.
#[test]
fn huge_discard() {
    let mut rig = Rig::new(64, 4096);
    let pool = rig.open();
    pool.message("create_thin 1").unwrap();
    let sectors = 1u64 << 36;
    let mut vol = pool.activate(1, sectors, None).unwrap();
    for block in [0, 1, 2, 1 << 20, sectors / BS - 1] {
        write(&mut vol, block * BS, &[1; 512]).unwrap();
    }
    discard(&mut vol, 0, sectors).unwrap();
    assert_eq!(pool.thin_status(1).unwrap().to_string(), "0 -");
    pool.commit().unwrap();
    assert_eq!(pool.status().data_used, 0);
    // The freed blocks are contiguous on the data device: one discard.
    assert_eq!(rig.data.stats().discards, 1);
}

#[test]
fn delete_discards_freed_blocks() {
    let mut rig = Rig::new(64, 4096);
    let pool = rig.open();
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, 16 * BS, None).unwrap();
    write(&mut vol, 0, &[1; 512 * 128 * 6]).unwrap();
    pool.message("create_snap 2 1").unwrap();
    write(&mut vol, 0, &[2; 512 * 128 * 2]).unwrap();
    drop(vol);
    pool.message("delete 1").unwrap();
    pool.poll();
    // Blocks 0-1 of the origin were its own; the other four are the snapshot's.
    assert_eq!(rig.data.stats().discards, 1);
    assert_eq!(pool.status().data_used, 6);
}

/// Status commits first, as dm does unless asked not to flush: what it showed
/// survives a power cut. The no-flush status shows changes a power cut undoes.
#[test]
fn status_commits_first_unless_noflush() {
    for seed in 0..4 {
        let mut rig = Rig::new(64, 4096);
        rig.seed = seed;
        let pool = rig.open();
        pool.message("create_thin 1").unwrap();
        let mut vol = pool.activate(1, 64 * BS, None).unwrap();
        write(&mut vol, 0, &pattern(1, 4096)).unwrap();
        write(&mut vol, 5 * BS, &pattern(2, 4096)).unwrap();
        let committed = pool.status();
        assert_eq!(committed.data_used, 2);
        write(&mut vol, 9 * BS, &pattern(3, 4096)).unwrap();
        let live = pool.status_noflush();
        assert_eq!(live.data_used, 3);
        // A power cut with the third mapping not committed.
        drop(vol);
        drop(pool);
        crash(&rig.meta, seed);
        crash(&rig.data, seed + 10);
        let pool = rig.open();
        assert_eq!(pool.status_noflush(), committed);
        assert_eq!(pool.status(), committed, "nothing to commit");
        let mut vol = pool.activate(1, 64 * BS, None).unwrap();
        assert_eq!(read(&mut vol, 0, 8), pattern(1, 4096));
        assert_eq!(read(&mut vol, 5 * BS, 8), pattern(2, 4096));
        assert_eq!(read(&mut vol, 9 * BS, 8), vec![0; 4096]);
        assert_eq!(pool.thin_status(1).unwrap().mapped_sectors, 2 * BS);
    }
}

/// A block freed by breaking sharing (its snapshot was deleted, but the time rule
/// still copies once) is discarded on the data device like other freed blocks
/// (passdown only), and only after the commit that maps its replacement: a power
/// cut before that commit must find the old block's data intact.
#[test]
fn blocks_freed_by_breaking_sharing_are_discarded_after_the_commit() {
    for passdown in [true, false] {
        let mut rig = Rig::new(16, 4096);
        rig.config.features.no_discard_passdown = !passdown;
        let pool = rig.open();
        pool.message("create_thin 1").unwrap();
        let mut vol = pool.activate(1, 4 * BS, None).unwrap();
        let old = pattern(5, (BS * 512) as usize);
        write(&mut vol, 0, &old).unwrap();
        flush(&mut vol).unwrap();
        pool.message("create_snap 2 1").unwrap();
        pool.message("delete 2").unwrap();
        let discards = rig.data.stats().discards;
        assert_eq!(pool.status().data_used, 1);

        // Breaking sharing: the old block's count falls to zero, not discarded yet.
        write(&mut vol, 8, &[7; 512]).unwrap();
        assert_eq!(rig.data.stats().discards, discards);
        drop(vol);
        drop(pool);
        rig.meta.power_cut(Unflushed::DropAll);
        rig.data.power_cut(Unflushed::KeepAll);
        let pool = rig.open();
        let mut vol = pool.activate(1, 4 * BS, None).unwrap();
        assert_eq!(read(&mut vol, 0, BS), old, "the committed block is intact");

        // Again, with the commit: then the old block is discarded.
        write(&mut vol, 8, &[7; 512]).unwrap();
        assert_eq!(rig.data.stats().discards, discards);
        flush(&mut vol).unwrap();
        pool.poll();
        let expected = discards + u64::from(passdown);
        assert_eq!(rig.data.stats().discards, expected, "passdown {passdown}");
        let mut new = old.clone();
        new[8 * 512..9 * 512].fill(7);
        assert_eq!(read(&mut vol, 0, BS), new);
        assert_eq!(pool.status().data_used, 1);
        drop(vol);
        pool.close().map_err(|(_, e)| e).unwrap();
        let scratch = Scratch::new("freed-by-copy");
        save(&rig.meta, &scratch.path("meta"));
        thin_check(&scratch.path("meta"));
    }
}

/// Writes waiting for data space when their volume is snapshotted are ordered
/// after the snapshot: it holds exactly what reading the origin returned when the
/// message ran (parts of those writes already done included, parts still waiting
/// not), and once space comes they change the origin only.
#[test]
fn snapshot_with_writes_waiting_for_space() {
    let (mut rig, pool) = overcommitted(false);
    let mut vol = pool.activate(0, 64 * BS, None).unwrap();
    for block in 0..8 {
        write(&mut vol, block * BS, &pattern(block, (BS * 512) as usize)).unwrap();
    }
    // One write to an unprovisioned block, and one across a provisioned block
    // (written in place at once) and an unprovisioned one (waits).
    let waiting = [
        (20 * BS, pattern(101, 8 * 512)),
        (8 * BS - 8, pattern(102, 16 * 512)),
    ];
    for (tag, (sector, data)) in waiting.iter().enumerate() {
        submit_write(&mut vol, tag as u64, *sector, data);
    }
    assert!(poll_some(&pool, &mut vol).is_empty(), "both wait for space");
    assert_eq!(pool.mode(), PoolMode::OutOfDataSpace);
    let at_message = read(&mut vol, 0, 32 * BS);
    let done_part = (8 * BS - 8) as usize * 512..8 * BS as usize * 512;
    assert_eq!(at_message[done_part], waiting[1].1[..8 * 512]);
    assert!(
        at_message[8 * BS as usize * 512..9 * BS as usize * 512]
            .iter()
            .all(|&b| b == 0)
    );

    pool.message("create_snap 1 0").unwrap();
    pool.resize(16 * BS).unwrap();
    let done = poll_some(&pool, &mut vol);
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|(_, result)| result.is_ok()), "{done:?}");

    let mut snap = pool.activate(1, 64 * BS, None).unwrap();
    assert!(
        read(&mut snap, 0, 32 * BS) == at_message,
        "snapshot differs from the origin as read at the message"
    );
    let mut expected = at_message.clone();
    for (sector, data) in &waiting {
        let at = *sector as usize * 512;
        expected[at..at + data.len()].copy_from_slice(data);
    }
    assert!(read(&mut vol, 0, 32 * BS) == expected);
    drop((vol, snap));
    pool.close().map_err(|(_, e)| e).unwrap();
    let scratch = Scratch::new("snap-waiting");
    save(&rig.meta, &scratch.path("meta"));
    thin_check(&scratch.path("meta"));
    rig.config.length = 16 * BS;
    let pool = rig.open();
    let mut snap = pool.activate(1, 64 * BS, None).unwrap();
    assert!(read(&mut snap, 0, 32 * BS) == at_message, "after reopening");
}
