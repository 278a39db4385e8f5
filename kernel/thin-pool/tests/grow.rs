//! Growing a live pool onto larger devices, as a table reload does: the data device
//! (writes waiting for space proceed) and the metadata device.

mod common;

use blockdev::{BlockDevice, CrashDisk};
use common::*;
use thin_pool::{PoolEvent, PoolMode, ThinOutput};

/// A copy of `disk`'s sectors at the start of a larger disk of `sectors` sectors
/// (what a reloaded table's device holds: the old sectors first, then new ones).
fn grown(disk: &CrashDisk, sectors: u64) -> CrashDisk {
    let bigger = CrashDisk::new(sectors);
    let mut image = vec![0u8; disk.info().bytes() as usize];
    disk.read_at(0, &mut image);
    bigger.write_at(0, &image);
    bigger
}

/// Reopens the pool on the rig's devices, checks that thin device `dev` reads
/// `pattern(block)` at each of `blocks`, closes it and runs `thin_check`.
fn reopen_and_check(rig: &mut Rig, dev: u64, blocks: impl Iterator<Item = u64>) {
    let pool = rig.open();
    let mut vol = pool.activate(dev, 1024 * BS, None).unwrap();
    for block in blocks {
        assert_eq!(read(&mut vol, block * BS, 1), pattern(block, 512));
    }
    drop(vol);
    pool.close().map_err(|(_, e)| e).unwrap();
    require_tools();
    let scratch = Scratch::new("grown");
    save(&rig.meta, &scratch.path("meta"));
    thin_check(&scratch.path("meta"));
}

#[test]
fn a_live_pool_grows_onto_a_larger_data_device_and_waiting_writes_proceed() {
    let mut rig = Rig::new(8, 4096);
    rig.config.low_water_mark = 2;
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    let mut vol = pool.activate(0, 64 * BS, None).unwrap();
    for block in 0..8 {
        write(&mut vol, block * BS, &pattern(block, 512)).unwrap();
    }
    submit_write(&mut vol, 20, 20 * BS, &pattern(20, 512));
    for _ in 0..50 {
        pool.poll();
    }
    assert!(vol.poll_op().is_none(), "the write waits for space");
    assert_eq!(pool.mode(), PoolMode::OutOfDataSpace);

    let bigger = grown(&rig.data, 16 * BS);
    let error = pool
        .grow_onto(Box::new(device(&bigger, 3, true)), 4 * BS)
        .unwrap_err();
    assert_eq!(error.text, "pool target (4 blocks) too small: expected 8");
    let error = pool
        .grow_onto(Box::new(device(&bigger, 3, true)), 32 * BS)
        .unwrap_err();
    assert_eq!(
        error.text,
        "data device (2048 sectors) is smaller than the pool length (4096 sectors)"
    );
    assert_eq!(
        pool.mode(),
        PoolMode::OutOfDataSpace,
        "refusals change nothing"
    );

    pool.grow_onto(Box::new(device(&bigger, 4, true)), 16 * BS)
        .unwrap();
    assert_eq!(pool.mode(), PoolMode::Write);
    let done = loop {
        pool.poll();
        if let Some(done) = vol.poll_op() {
            break done;
        }
    };
    assert_eq!((done.tag, done.result), (20, Ok(ThinOutput::Done)));
    assert_eq!(pool.status().data_total, 16);
    assert_eq!(pool.config().length, 16 * BS);
    for block in 0..8 {
        assert_eq!(read(&mut vol, block * BS, 1), pattern(block, 512));
    }
    assert_eq!(read(&mut vol, 20 * BS, 1), pattern(20, 512));
    for block in 30..36 {
        write(&mut vol, block * BS, &pattern(block, 512)).unwrap();
    }
    drop(vol);
    pool.close().map_err(|(_, e)| e).unwrap();
    rig.data = bigger;
    rig.config.length = 16 * BS;
    reopen_and_check(&mut rig, 0, (0..8).chain([20]).chain(30..36));
}

#[test]
fn a_live_pool_grows_its_metadata_onto_a_larger_device() {
    let mut rig = Rig::new(1024, 128 * 8);
    let pool = rig.open();
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, 1024 * BS, None).unwrap();
    for block in 0..300 {
        write(&mut vol, block * BS, &pattern(block, 512)).unwrap();
    }
    pool.commit().unwrap();
    assert_eq!(pool.status().metadata_total, 128);

    let smaller = CrashDisk::new(64 * 8);
    let error = pool
        .grow_metadata_onto(Box::new(device(&smaller, 2, false)))
        .unwrap_err();
    assert!(
        error.text.starts_with("growing the metadata failed"),
        "{error}"
    );
    assert_eq!(pool.status().metadata_total, 128);

    let bigger = grown(&rig.meta, 1024 * 8);
    let grown_to = pool
        .grow_metadata_onto(Box::new(device(&bigger, 3, false)))
        .unwrap();
    assert_eq!(grown_to, (1024, None));
    assert_eq!(pool.status().metadata_total, 1024);
    assert_eq!(pool.mode(), PoolMode::Write);
    pool.message("create_snap 2 1").unwrap();
    for block in 300..900 {
        write(&mut vol, block * BS, &pattern(block, 512)).unwrap();
    }
    drop(vol);
    pool.close().map_err(|(_, e)| e).unwrap();
    rig.meta = bigger;
    let pool = rig.open();
    assert_eq!(pool.status().metadata_total, 1024);
    pool.close().map_err(|(_, e)| e).unwrap();
    reopen_and_check(&mut rig, 1, [0, 299, 300, 899].into_iter());
}

#[test]
fn a_live_pool_out_of_metadata_space_writes_again_once_its_metadata_grows() {
    let (mut rig, pool, mut vol, expected) = metadata_exhausted();
    assert_eq!(pool.mode(), PoolMode::OutOfMetadataSpace);
    assert!(write(&mut vol, 700 * BS, &[1; 512]).is_err());
    let bigger = grown(&rig.meta, 1024 * 8);
    let (blocks, warning) = pool
        .grow_metadata_onto(Box::new(device(&bigger, 3, false)))
        .unwrap();
    assert_eq!((blocks, warning), (1024, None));
    assert_eq!(pool.mode(), PoolMode::Write);
    assert!(
        std::iter::from_fn(|| pool.next_event()).any(|event| matches!(
            event,
            PoolEvent::ModeChanged {
                mode: PoolMode::Write,
                ..
            }
        ))
    );
    pool.message("create_snap 500 1").unwrap();
    write(&mut vol, 700 * BS, &pattern(700, 512)).unwrap();
    for (block, value) in expected.iter().enumerate() {
        assert_eq!(
            read(&mut vol, block as u64 * BS, 1),
            value.to_le_bytes().repeat(128)
        );
    }
    drop(vol);
    pool.close().map_err(|(_, e)| e).unwrap();
    rig.meta = bigger;
    reopen_and_check(&mut rig, 1, [700].into_iter());
}
