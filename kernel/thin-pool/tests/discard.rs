//! Discards of many mappings: unmapped in bounded steps, so another volume's
//! requests are served between them, and crash-safe at every device I/O: a block
//! a discard freed is passed down to the data device (and may be reused) only once
//! the commit that unmaps it is durable.

mod common;

use std::collections::BTreeSet;

use blockdev::{CrashDisk, MemDisk, Unflushed};
use common::*;
use thin_pool::{DiscardProgress, Pool, PoolConfig, ThinOp, ThinRequest, ThinVolume};

/// Mappings a discard unmaps per step.
const STEP: u64 = 4096;
const MILLISECOND: u64 = 1_000_000;
const DISCARD_TAG: u64 = 7;

fn submit_discard(volume: &mut ThinVolume, sectors: u64) {
    volume
        .submit_op(ThinRequest {
            tag: DISCARD_TAG,
            op: ThinOp::Discard {
                sector: 0,
                sectors,
                fua: false,
            },
        })
        .expect("queue has room");
}

/// How many sectors of the discard are unmapped, or `None` once it is no longer
/// unmapping.
fn discarded(pool: &Pool) -> Option<u64> {
    match pool.discards().as_slice() {
        [] => None,
        [progress] => Some(progress.done),
        more => panic!("one discard expected: {more:?}"),
    }
}

#[test]
fn a_large_discard_unmaps_in_steps_between_another_volumes_reads() {
    require_tools();
    const MAPPINGS: u64 = 40_000;
    const META_SECTORS: u64 = 1 << 15;
    let (meta, data, config) = pool_disks(META_SECTORS, MAPPINGS, 64);
    let (pool, _) = Pool::open(Box::new(meta.handle()), Box::new(data.handle()), config).unwrap();
    pool.message("create_thin 1").unwrap();
    let mut big = pool.activate(0, MAPPINGS * BS, None).unwrap();
    let mut other = pool.activate(1, 8 * BS, None).unwrap();
    let content = pattern(1, 4096);
    write(&mut other, 0, &content).unwrap();

    submit_discard(&mut big, MAPPINGS * BS);
    assert_eq!(
        pool.discards(),
        vec![DiscardProgress {
            dev: 0,
            sector: 0,
            sectors: MAPPINGS * BS,
            done: STEP * BS,
            started_ns: 0,
        }],
        "the first step runs when the request comes in"
    );
    // While the other volume's reads keep coming, the discard goes on from the
    // timer (and the timer call's own poll, the pool being quiet then): a step or
    // two per call, never during a read.
    let mut now = 0;
    let mut done = STEP * BS;
    for _ in 0..4 {
        assert_eq!(read(&mut other, 0, 8), content);
        assert_eq!(discarded(&pool), Some(done), "a read took no step");
        now += MILLISECOND;
        pool.service(&|| now);
        let after = discarded(&pool).expect("still unmapping");
        assert!(
            (STEP * BS..=2 * STEP * BS).contains(&(after - done)),
            "a timer call took one or two steps: {done} -> {after}"
        );
        done = after;
    }
    // With nothing else to do, each poll takes one step.
    while let Some(now_done) = discarded(&pool) {
        assert_eq!(now_done, done);
        pool.poll();
        done += STEP * BS;
    }
    assert!((MAPPINGS * BS..(MAPPINGS + STEP) * BS).contains(&done));
    let finished = loop {
        if let Some(finished) = big.poll_op() {
            break finished;
        }
    };
    assert_eq!(finished.tag, DISCARD_TAG);
    finished.result.unwrap();
    assert_eq!(pool.thin_status(0).unwrap().mapped_sectors, 0);
    pool.commit().unwrap();
    assert_eq!(pool.status().data_used, 1, "only the other volume's block");
    assert_eq!(read(&mut other, 0, 8), content);
    drop((big, other));
    pool.close().map_err(|(_, e)| e).unwrap();
    let scratch = Scratch::new("discard-steps");
    let mut image = vec![0u8; (META_SECTORS * 512) as usize];
    meta.read_at(0, &mut image);
    std::fs::write(scratch.path("meta"), image).unwrap();
    thin_check(&scratch.path("meta"));
}

/// Virtual blocks of device 0 whose first 4 KiB hold a pattern (data block =
/// virtual block, as [`pool_disks`] maps them).
fn marked(mappings: u64) -> BTreeSet<u64> {
    (0..mappings).step_by(613).collect()
}

/// One discard of all of device 0 with the power failing at device I/O `cut`
/// (counted on both disks). Returns the disks, the I/O count when the discard was
/// submitted and at the end.
fn discard_run(
    meta: &MemDisk,
    data: &MemDisk,
    config: &PoolConfig,
    mappings: u64,
    cut: Option<u64>,
) -> (CrashDisk, CrashDisk, u64, u64) {
    let (meta, data, pool) = open_on_crash_disks(meta, data, config);
    let mut volume = pool.activate(0, mappings * BS, None).unwrap();
    let start = meta.operations();
    meta.fail_at(cut);
    submit_discard(&mut volume, mappings * BS);
    let mut now = 0;
    while !meta.power_lost() {
        if let Some(done) = volume.poll_op() {
            assert_eq!(done.tag, DISCARD_TAG);
            break;
        }
        now += MILLISECOND;
        pool.service(&|| now);
    }
    let _ = pool.commit();
    let end = meta.operations();
    drop(volume);
    drop(pool);
    (meta, data, start, end)
}

#[test]
fn a_power_cut_at_any_io_of_a_stepped_discard_keeps_every_mapped_blocks_data() {
    require_tools();
    const MAPPINGS: u64 = 2 * STEP + 100;
    let (meta, data, config) = pool_disks(1 << 14, MAPPINGS, 64);
    for &vblock in &marked(MAPPINGS) {
        data.write_at(vblock * BS * 512, &pattern(vblock, 4096));
    }
    let (_, _, start, end) = discard_run(&meta, &data, &config, MAPPINGS, None);
    let mut cuts = 0;
    for cut in start..=end {
        let (cut_meta, cut_data, _, _) = discard_run(&meta, &data, &config, MAPPINGS, Some(cut));
        for unflushed in [Unflushed::DropAll, Unflushed::Random(cut)] {
            // Discards sent down before the cut stay on the data device.
            let cut_data = CrashDisk::from_disk(&cut_data.after_power_loss(Unflushed::KeepAll));
            let (meta, _data, pool) =
                reopen_after_cut(&cut_meta, &cut_data, unflushed, &config, cut, "discard-cut");
            let mapped = pool.thin_status(0).unwrap().mapped_sectors / BS;
            assert_eq!(
                pool.status().data_used,
                mapped,
                "cut at I/O {cut}: blocks leaked"
            );
            let scratch = Scratch::new("discard-cut-dump");
            save(&meta, &scratch.path("meta"));
            let dump = thin_dump(&scratch.path("meta"), &[]);
            let still_mapped = dump.get(&0).cloned().unwrap_or_default();
            assert_eq!(still_mapped.len() as u64, mapped);
            let mut volume = pool.activate(0, MAPPINGS * BS, None).unwrap();
            for &vblock in &marked(MAPPINGS) {
                let expected = if still_mapped.contains_key(&vblock) {
                    pattern(vblock, 4096)
                } else {
                    vec![0; 4096]
                };
                assert!(
                    read(&mut volume, vblock * BS, 8) == expected,
                    "cut at I/O {cut}: block {vblock} (mapped: {}) lost its data",
                    still_mapped.contains_key(&vblock)
                );
            }
        }
        cuts += 1;
    }
    assert!(cuts >= 10, "only {cuts} cuts");
}
