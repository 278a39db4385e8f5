//! Merging a thin volume into its external origin while it serves I/O: checked
//! against a model of the volume's content with writes and reads in flight the
//! whole time, refused when a mapped block lies past the origin's end, and swept
//! with a power cut at every device I/O of the copy, after which thin_check passes,
//! the volume reads as before and running the merge again completes it.

mod common;

use blockdev::{BlockDevice, CrashDisk, MemDisk, Unflushed};
use common::*;
use thin_pool::{Errno, Pool, PoolConfig, PoolEvent};

const MILLISECOND: u64 = 1_000_000;
/// The volume: 48 blocks, all inside the origin.
const BLOCKS: u64 = 48;
const SECTORS: u64 = BLOCKS * BS;

/// A read-only handle on the origin for the volume, and a writable one for the merge.
fn origin_handles(origin: &CrashDisk) -> (Box<dyn BlockDevice>, Box<dyn BlockDevice>) {
    let mut info = origin.info().clone();
    info.read_only = true;
    let reader = origin.handle_with_info(info);
    (Box::new(reader), Box::new(origin.handle()))
}

/// Runs timer steps until no merge is left; returns the events.
fn finish(pool: &Pool, now: &mut u64) -> Vec<PoolEvent> {
    while !pool.origin_merges().is_empty() {
        *now += 10 * MILLISECOND;
        pool.service(&|| *now);
    }
    std::iter::from_fn(|| pool.next_event()).collect()
}

#[test]
fn writes_and_reads_during_a_merge_into_the_origin_match_the_model() {
    let mut rig = Rig::new(256, 1 << 12);
    let origin = CrashDisk::new(SECTORS + 100);
    let mut model = pattern(99, (SECTORS * 512) as usize);
    origin.write_at(0, &model);
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    let (reader, writer) = origin_handles(&origin);
    let mut volume = pool.activate(0, SECTORS, Some(reader)).unwrap();
    let mut rng = fastrand::Rng::with_seed(5);
    for _ in 0..40 {
        let sector = rng.u64(..SECTORS - 64);
        let data = pattern(rng.u64(..), (1 + rng.usize(..64)) * 512);
        write(&mut volume, sector, &data).unwrap();
        let at = (sector * 512) as usize;
        model[at..at + data.len()].copy_from_slice(&data);
    }
    flush(&mut volume).unwrap();
    let mapped_before = pool.thin_status(0).unwrap().mapped_sectors / BS;
    assert!(mapped_before > 20, "{mapped_before}");

    volume.start_origin_merge(writer).unwrap();
    let error = volume
        .start_origin_merge(Box::new(origin.handle()))
        .unwrap_err();
    assert_eq!(error.errno, Errno::Ebusy);
    // Rounds of writes (non-overlapping, four in flight, up to three blocks each)
    // with a timer step while they are in flight, then a full read, until the merge
    // is done: blocks are copied, written again, copied again.
    let mut now = 0;
    let mut rounds = 0;
    for round in 0..60u64 {
        if pool.origin_merges().is_empty() {
            break;
        }
        rounds += 1;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut submitted = 0;
        while submitted < 4 {
            let len = 1 + rng.u64(..3 * BS);
            let sector = rng.u64(..SECTORS - len);
            if ranges.iter().any(|&(s, e)| sector < e && s < sector + len) {
                continue;
            }
            ranges.push((sector, sector + len));
            let data = pattern(rng.u64(..), (len * 512) as usize);
            submit_write(&mut volume, round * 10 + submitted, sector, &data);
            let at = (sector * 512) as usize;
            model[at..at + data.len()].copy_from_slice(&data);
            submitted += 1;
        }
        now += 10 * MILLISECOND;
        pool.service(&|| now);
        complete_ok(&mut volume, 4);
        assert!(
            read(&mut volume, 0, SECTORS) == model,
            "round {round}: the volume differs from the model"
        );
    }
    assert!(rounds >= 5, "the merge was done after {rounds} rounds");
    let events = finish(&pool, &mut now);
    let Some(PoolEvent::OriginMergeFinished { dev: 0, blocks }) = events.last() else {
        panic!("{events:?}");
    };
    assert!(
        *blocks > mapped_before,
        "{blocks} copied, {mapped_before} mapped at the start"
    );
    eprintln!(
        "{rounds} rounds of writes during the merge; {blocks} blocks copied, {mapped_before} mapped at the start"
    );
    assert_eq!(pool.thin_status(0).unwrap().mapped_sectors, 0);
    assert!(read(&mut volume, 0, SECTORS) == model);
    let mut on_origin = vec![0u8; model.len()];
    origin.read_at(0, &mut on_origin);
    assert!(on_origin == model, "the origin holds other data");
    drop(volume);
    pool.commit().unwrap();
    assert_eq!(pool.status().data_used, 0);
}

#[test]
fn a_block_mapped_past_the_origin_end_is_refused_up_front() {
    let mut rig = Rig::new(64, 1 << 12);
    let origin = CrashDisk::new(8 * BS + 8);
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    let (reader, writer) = origin_handles(&origin);
    let mut volume = pool.activate(0, 16 * BS, Some(reader)).unwrap();
    write(&mut volume, 8 * BS, &[7; 512]).unwrap();
    let error = volume.start_origin_merge(writer).unwrap_err();
    assert_eq!(error.errno, Errno::Einval);
    assert!(
        error
            .text
            .ends_with("block 8 is mapped and ends past the origin's end (sector 1032)"),
        "{}",
        error.text
    );
    assert!(pool.origin_merges().is_empty());
    // Without an origin there is nothing to merge into.
    pool.message("create_thin 1").unwrap();
    let mut plain = pool.activate(1, 16 * BS, None).unwrap();
    let error = plain
        .start_origin_merge(Box::new(origin.handle()))
        .unwrap_err();
    assert_eq!(error.errno, Errno::Einval);
}

/// The prepared disks: a pool whose device 0 has `BLOCKS` blocks over an origin,
/// 30 of them written (committed), and the volume's content.
fn sweep_disks() -> (MemDisk, MemDisk, MemDisk, PoolConfig, Vec<u8>) {
    let mut rig = Rig::new(128, 1 << 12);
    rig.reorder = false;
    let origin = CrashDisk::new(SECTORS);
    let mut model = pattern(3, (SECTORS * 512) as usize);
    origin.write_at(0, &model);
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    let (reader, _) = origin_handles(&origin);
    let mut volume = pool.activate(0, SECTORS, Some(reader)).unwrap();
    for block in 0..30u64 {
        let sector = (block * 37) % BLOCKS * BS + block % 5;
        let data = pattern(1000 + block, 3 * 512);
        write(&mut volume, sector, &data).unwrap();
        let at = (sector * 512) as usize;
        model[at..at + data.len()].copy_from_slice(&data);
    }
    drop(volume);
    let config = rig.config.clone();
    pool.close().map_err(|(_, e)| e).unwrap();
    (
        rig.meta.contents(),
        rig.data.contents(),
        origin.contents(),
        config,
        model,
    )
}

/// One merge from the prepared disks with the power failing at I/O `cut` of the
/// merge (metadata, data and origin disks share the supply). Returns the disks and
/// the number of I/Os the merge took.
fn merge_run(
    disks: (&MemDisk, &MemDisk, &MemDisk),
    config: &PoolConfig,
    cut: Option<u64>,
) -> ([CrashDisk; 3], u64) {
    let meta = CrashDisk::from_disk(disks.0);
    let data = CrashDisk::from_disk(disks.1);
    let origin = CrashDisk::from_disk(disks.2);
    meta.share_power(&data);
    meta.share_power(&origin);
    let (pool, _) = Pool::open(
        Box::new(device(&meta, 1, false)),
        Box::new(device(&data, 2, false)),
        config.clone(),
    )
    .unwrap();
    let (reader, writer) = origin_handles(&origin);
    let mut volume = pool.activate(0, SECTORS, Some(reader)).unwrap();
    let start = meta.operations();
    meta.fail_at(cut.map(|cut| start + cut));
    if volume.start_origin_merge(writer).is_err() {
        assert!(meta.power_lost(), "the merge was refused with the power on");
    }
    let mut now = 0;
    while !pool.origin_merges().is_empty() {
        now += 10 * MILLISECOND;
        pool.service(&|| now);
    }
    let _ = pool.commit();
    let ios = meta.operations() - start;
    drop(volume);
    drop(pool);
    ([meta, data, origin], ios)
}

#[test]
fn a_power_cut_at_any_io_of_a_merge_into_the_origin_loses_nothing_and_a_rerun_completes() {
    require_tools();
    let (meta, data, origin, config, model) = sweep_disks();
    let disks = (&meta, &data, &origin);
    let (_, ios) = merge_run(disks, &config, None);
    assert!(ios > 60, "only {ios} I/Os");
    eprintln!("a merge of 30 blocks into the origin: {ios} device I/Os, each one cut");
    for cut in 0..ios {
        let (cut_disks, _) = merge_run(disks, &config, Some(cut));
        let unflushed = if cut % 2 == 0 {
            Unflushed::DropAll
        } else {
            Unflushed::Random(cut)
        };
        let [meta, data, origin] =
            cut_disks.map(|disk| CrashDisk::from_disk(&disk.after_power_loss(unflushed)));
        thin_check_disk(&meta, "origin-merge-cut");
        let (pool, _) = Pool::open(
            Box::new(meta.handle()),
            Box::new(data.handle()),
            config.clone(),
        )
        .unwrap_or_else(|e| panic!("reopening after a cut at I/O {cut}: {e}"));
        let (reader, writer) = origin_handles(&origin);
        let mut volume = pool.activate(0, SECTORS, Some(reader)).unwrap();
        assert!(
            read(&mut volume, 0, SECTORS) == model,
            "cut at I/O {cut}: the volume changed"
        );
        volume.start_origin_merge(writer).unwrap();
        let mut now = 0;
        let events = finish(&pool, &mut now);
        assert!(
            matches!(
                events.last(),
                Some(PoolEvent::OriginMergeFinished { dev: 0, .. })
            ),
            "cut at I/O {cut}: {events:?}"
        );
        assert!(read(&mut volume, 0, SECTORS) == model);
        let mut on_origin = vec![0u8; model.len()];
        origin.read_at(0, &mut on_origin);
        assert!(on_origin == model, "cut at I/O {cut}: the origin differs");
        drop(volume);
        pool.commit().unwrap();
        assert_eq!(pool.status().data_used, 0, "cut at I/O {cut}");
        drop(pool);
        thin_check_disk(&meta, "origin-merge-after");
    }
}
