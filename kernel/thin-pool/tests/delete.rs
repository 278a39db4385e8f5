//! Deleting thin devices with many mappings: the id is free at once, the blocks are
//! released in bounded steps between requests while other volumes keep serving
//! I/O, and a power cut at any device I/O of the delete leaves metadata that the
//! real `thin_check` accepts and a pool that finishes the delete when reopened.

mod common;

use std::collections::BTreeMap;

use blockdev::{CrashDisk, MemDisk, Unflushed};
use common::*;
use persistent_data::thin::{OpenOptions, ThinMetadata};
use thin_pool::{DeleteProgress, Pool, PoolConfig, PoolEvent};

const MILLISECOND: u64 = 1_000_000;
#[test]
fn a_million_mappings_are_released_in_steps_while_another_volume_serves_io() {
    require_tools();
    const MAPPINGS: u64 = 1_000_000;
    const SPARE: u64 = 4096;
    const META_SECTORS: u64 = 1 << 18;
    let (meta, data, config) = pool_disks(META_SECTORS, MAPPINGS, SPARE);
    let (pool, _) = Pool::open(Box::new(meta.handle()), Box::new(data.handle()), config).unwrap();
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, SPARE * BS, None).unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut exercise = |vol: &mut thin_pool::ThinVolume, model: &mut BTreeMap<u64, Vec<u8>>| {
        let page = rng.u64(..SPARE / 4 * 16);
        let data = pattern(rng.u64(..), 4096);
        write(vol, page * 8, &data).unwrap();
        model.insert(page, data);
        let (&check, expected) = model.iter().nth(rng.usize(..model.len())).unwrap();
        assert_eq!(&read(vol, check * 8, 8), expected, "page {check}");
    };
    for _ in 0..64 {
        exercise(&mut vol, &mut model);
    }

    pool.message("delete 0").unwrap();
    // The id is free at once, and a device deleted at once does not wait in line.
    assert_eq!(pool.devices().unwrap(), vec![1]);
    pool.message("create_thin 0").unwrap();
    pool.message("delete 0").unwrap();
    assert_eq!(
        pool.deletes(),
        vec![DeleteProgress {
            dev: 0,
            total: MAPPINGS,
            released: 0,
            started_ns: 0,
            replaced: false
        }]
    );
    let mut now = 0;
    let mut steps = 0;
    let mut released = 0;
    while !pool.deletes().is_empty() {
        now += MILLISECOND;
        pool.service(&|| now);
        steps += 1;
        exercise(&mut vol, &mut model);
        if let Some(progress) = pool.deletes().first() {
            // Whole leaves (at most 252 mappings) while the next cannot overrun.
            let step = progress.released - released;
            assert!(
                (4096 - 252..=4096).contains(&step) || progress.released == MAPPINGS,
                "{step} in a step"
            );
            released = progress.released;
        }
    }
    // Every step released at least 3844 mappings, and one found none left.
    assert!(steps <= MAPPINGS.div_ceil(4096 - 252) + 1, "{steps} steps");
    let events: Vec<PoolEvent> = std::iter::from_fn(|| pool.next_event()).collect();
    assert!(
        events.contains(&PoolEvent::DeleteFinished { dev: 0 }),
        "{events:?}"
    );
    pool.commit().unwrap();
    let status = pool.status();
    assert_eq!(
        status.data_used,
        pool.thin_status(1).unwrap().mapped_sectors / BS
    );
    for (&page, expected) in &model {
        assert_eq!(&read(&mut vol, page * 8, 8), expected);
    }
    drop(vol);
    pool.close().map_err(|(_, e)| e).unwrap();
    let scratch = Scratch::new("delete-million");
    let mut image = vec![0u8; (META_SECTORS * 512) as usize];
    meta.read_at(0, &mut image);
    std::fs::write(scratch.path("meta"), image).unwrap();
    thin_check(&scratch.path("meta"));
}

/// One run of the delete from the prepared disks, with the power failing at
/// device I/O `cut` (counted on both disks from the start). Returns the disks, the
/// I/O count after the pool was opened, the count at the end, and whether the
/// delete message was answered successfully.
fn delete_run(
    meta: &MemDisk,
    data: &MemDisk,
    config: &PoolConfig,
    cut: Option<u64>,
) -> (CrashDisk, CrashDisk, u64, u64, bool) {
    let (meta, data, pool) = open_on_crash_disks(meta, data, config);
    let start = meta.operations();
    meta.fail_at(cut);
    let deleted = pool.message("delete 0").is_ok();
    let mut now = 0;
    while !pool.deletes().is_empty() && !meta.power_lost() {
        now += 400 * MILLISECOND;
        pool.service(&|| now);
    }
    let _ = pool.commit();
    let end = meta.operations();
    drop(pool);
    (meta, data, start, end, deleted)
}

#[test]
fn a_power_cut_at_any_io_of_a_delete_leaves_a_pool_that_finishes_it() {
    require_tools();
    const MAPPINGS: u64 = 10_000;
    let (meta, data, config) = pool_disks(1 << 14, MAPPINGS, 64);
    // Device 1 keeps a few blocks of its own through the delete.
    {
        let (mut md, _) =
            ThinMetadata::open(Box::new(meta.handle()), &OpenOptions::new(BS as u32)).unwrap();
        md.create_thin(1).unwrap();
        for vblock in 0..5 {
            let block = md.alloc_data_block().unwrap();
            md.insert(1, vblock, block).unwrap();
        }
        md.commit().unwrap();
    }
    let (_, _, start, end, deleted) = delete_run(&meta, &data, &config, None);
    assert!(deleted);
    let mut cuts = 0;
    for cut in start..=end {
        let (cut_meta, cut_data, _, _, acknowledged) = delete_run(&meta, &data, &config, Some(cut));
        for unflushed in [Unflushed::DropAll, Unflushed::Random(cut)] {
            let (meta, _data, pool) =
                reopen_after_cut(&cut_meta, &cut_data, unflushed, &config, cut, "delete-cut");
            let devices = pool.devices().unwrap();
            if acknowledged {
                assert_eq!(devices, vec![1], "cut at I/O {cut}: the deleted id is back");
            }
            let mut now = 0;
            while !pool.deletes().is_empty() {
                now += 400 * MILLISECOND;
                pool.service(&|| now);
            }
            pool.commit().unwrap();
            let status = pool.status();
            let expected = if pool.devices().unwrap().contains(&0) {
                MAPPINGS + 5
            } else {
                5
            };
            assert_eq!(
                status.data_used, expected,
                "cut at I/O {cut}: leaked blocks"
            );
            let mut vol = pool.activate(1, 8 * BS, None).unwrap();
            assert_eq!(read(&mut vol, 0, 8), vec![0; 4096]);
            drop(vol);
            drop(pool);
            thin_check_disk(&meta, "delete-after");
        }
        cuts += 1;
    }
    assert!(cuts >= 10, "only {cuts} cuts");
}

/// While requests keep coming, a delete step is followed by three times its own
/// time without steps; with no requests it steps on every call.
#[test]
fn delete_steps_give_way_to_requests() {
    let (meta, data, config) = pool_disks(1 << 14, 40_000, 64);
    let (pool, _) = Pool::open(Box::new(meta.handle()), Box::new(data.handle()), config).unwrap();
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, 8 * BS, None).unwrap();
    pool.message("delete 0").unwrap();
    // Each reading of the clock moves it 1 ms on: the pool reads it when called and
    // after a step, so a step is measured as 1 ms long and is followed by 3 ms
    // without steps, which the next two calls (1 ms apart) are inside of.
    let time = std::cell::Cell::new(0u64);
    let clock = || {
        time.set(time.get() + MILLISECOND);
        time.get()
    };
    let released = |pool: &Pool| pool.deletes()[0].released;
    let mut stepped = Vec::new();
    for _ in 0..9 {
        let before = released(&pool);
        write(&mut vol, 0, &[1; 512]).unwrap();
        pool.service(&clock);
        stepped.push(released(&pool) > before);
    }
    assert_eq!(
        stepped,
        [true, false, false, true, false, false, true, false, false]
    );
    let before = released(&pool);
    for _ in 0..3 {
        pool.service(&clock);
    }
    let idle = released(&pool) - before;
    assert!(
        (3 * (4096 - 252)..=3 * 4096).contains(&idle),
        "idle: a step per call ({idle} released)"
    );
}
