//! Basic engine behaviour: provisioning, snapshots, discards, status, reopen.

mod common;

use blockdev::{IoBuf, IoError, MemDisk};
use common::*;
use thin_pool::{Extent, NOT_FAST, SectorRun, ThinOp, ThinOutput, ThinVolume};

#[test]
fn write_read_snapshot_and_reopen() {
    let mut rig = Rig::new(256, 16384);
    let pool = rig.open();
    assert_eq!(
        pool.status().to_string(),
        format!(
            "0 {}/2048 0/256 - rw discard_passdown queue_if_no_space - 512",
            pool.status().metadata_used
        )
    );
    pool.message("create_thin 1").unwrap();
    let sectors = 40 * BS + 17;
    let mut vol = pool.activate(1, sectors, None).unwrap();
    // Unwritten space reads as zeros and is reported as holes.
    let (result, buf) = run(
        &mut vol,
        ThinOp::Read {
            sector: 3,
            buf: IoBuf::with_sectors(300),
        },
    );
    assert_eq!(
        result.unwrap(),
        ThinOutput::Read {
            zero_holes: vec![SectorRun {
                start: 0,
                sectors: 300
            }]
        }
    );
    assert!(buf.iter().all(|&b| b == 0));

    // A write straddling two blocks, and one at the very end of the volume.
    let a = pattern(1, 200 * 512);
    write(&mut vol, BS - 100, &a).unwrap();
    let tail = pattern(2, 17 * 512);
    write(&mut vol, 40 * BS, &tail).unwrap();
    assert_eq!(read(&mut vol, BS - 100, 200), a);
    assert_eq!(read(&mut vol, 40 * BS, 17), tail);
    // The rest of the provisioned blocks was zeroed.
    assert!(read(&mut vol, 0, BS - 100).iter().all(|&b| b == 0));
    assert_eq!(
        pool.thin_status(1).unwrap().to_string(),
        format!("{} {}", 3 * BS, 41 * BS - 1)
    );

    pool.message("create_snap 2 1").unwrap();
    let b = pattern(3, 8 * 512);
    write(&mut vol, BS, &b).unwrap();
    let mut snap = pool.activate(2, sectors, None).unwrap();
    assert_eq!(read(&mut snap, BS - 100, 200), a);
    let mut expected = a.clone();
    expected[100 * 512..108 * 512].copy_from_slice(&b);
    assert_eq!(read(&mut vol, BS - 100, 200), expected);
    let usage = pool.usage().unwrap();
    assert_eq!(
        (usage[0].dev, usage[0].exclusive, usage[0].shared),
        (1, 1, 2)
    );
    assert_eq!(
        (usage[1].dev, usage[1].exclusive, usage[1].shared),
        (2, 1, 2)
    );

    flush(&mut vol).unwrap();
    drop(vol);
    drop(snap);
    pool.close().map_err(|(_, e)| e).unwrap();

    let pool = rig.open();
    let mut vol = pool.activate(1, sectors, None).unwrap();
    assert_eq!(read(&mut vol, BS - 100, 200), expected);
    assert_eq!(read(&mut vol, 40 * BS, 17), tail);
    let mut snap = pool.activate(2, sectors, None).unwrap();
    assert_eq!(read(&mut snap, BS - 100, 200), a);
}

#[test]
fn discard_unmaps_whole_blocks_and_passes_down() {
    let mut rig = Rig::new(64, 8192);
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    let mut vol = pool.activate(0, 10 * BS, None).unwrap();
    write(&mut vol, 0, &pattern(5, (4 * BS * 512) as usize)).unwrap();
    assert_eq!(pool.status().data_used, 4);
    // Partial blocks at both ends stay; blocks 1 and 2 go.
    discard(&mut vol, 10, 3 * BS).unwrap();
    assert_eq!(pool.status().data_used, 2);
    assert_eq!(pool.thin_status(0).unwrap().mapped_sectors, 2 * BS);
    assert!(read(&mut vol, BS, 2 * BS).iter().all(|&b| b == 0));
    assert_eq!(rig.data.stats().discards, 1);
    // Block status sees the hole.
    let (result, _) = run(
        &mut vol,
        ThinOp::BlockStatus {
            sector: 0,
            sectors: 10 * BS,
            max_extents: 8,
        },
    );
    assert_eq!(
        result.unwrap(),
        ThinOutput::Extents(vec![
            Extent {
                sectors: BS,
                hole: false,
                zero: false
            },
            Extent {
                sectors: 2 * BS,
                hole: true,
                zero: true
            },
            Extent {
                sectors: BS,
                hole: false,
                zero: false
            },
            Extent {
                sectors: 6 * BS,
                hole: true,
                zero: true
            },
        ])
    );
    // Discards past the end fail.
    assert_eq!(discard(&mut vol, 9 * BS, 2 * BS), Err(IoError::OutOfRange));
}

#[test]
fn write_zeroes_unmaps_or_provisions() {
    let mut rig = Rig::new(64, 8192);
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    let mut vol = pool.activate(0, 8 * BS, None).unwrap();
    write(&mut vol, 0, &pattern(9, (4 * BS * 512) as usize)).unwrap();
    let (result, _) = run(
        &mut vol,
        ThinOp::WriteZeroes {
            sector: BS / 2,
            sectors: 2 * BS,
            unmap: true,
            fua: false,
        },
    );
    result.unwrap();
    // Block 1 unmapped, halves of blocks 0 and 2 zeroed in place.
    assert_eq!(pool.thin_status(0).unwrap().mapped_sectors, 3 * BS);
    assert!(read(&mut vol, BS / 2, 2 * BS).iter().all(|&b| b == 0));
    let (result, _) = run(
        &mut vol,
        ThinOp::WriteZeroes {
            sector: 5 * BS,
            sectors: 2 * BS,
            unmap: false,
            fua: true,
        },
    );
    result.unwrap();
    assert_eq!(pool.thin_status(0).unwrap().mapped_sectors, 5 * BS);
    assert!(read(&mut vol, 5 * BS, 2 * BS).iter().all(|&b| b == 0));
}

fn fast_zero(vol: &mut ThinVolume, sector: u64, sectors: u64) -> Result<(), IoError> {
    run(
        vol,
        ThinOp::FastZero {
            sector,
            sectors,
            fua: false,
        },
    )
    .0
    .map(drop)
}

/// Fast zeroing succeeds exactly when it needs no data writes (whole blocks are
/// unmapped, partly covered blocks are unprovisioned already) and otherwise is
/// refused with NOT_FAST, changing nothing.
#[test]
fn fast_zero_only_unmaps() {
    let mut rig = Rig::new(64, 8192);
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    let mut vol = pool.activate(0, 16 * BS, None).unwrap();
    let data = pattern(4, (6 * BS * 512) as usize);
    write(&mut vol, 0, &data).unwrap();
    let writes = rig.data.stats().writes;
    // Inside a provisioned block: zeroing needs a data write.
    assert_eq!(fast_zero(&mut vol, 8, 8), Err(NOT_FAST));
    // Whole provisioned blocks plus part of a provisioned one: refused too.
    assert_eq!(fast_zero(&mut vol, BS, 2 * BS + 8), Err(NOT_FAST));
    assert_eq!(read(&mut vol, 0, 6 * BS), data, "nothing changed");
    assert_eq!(pool.thin_status(0).unwrap().mapped_sectors, 6 * BS);
    // Whole blocks: unmapped.
    fast_zero(&mut vol, BS, 2 * BS).unwrap();
    assert_eq!(pool.thin_status(0).unwrap().mapped_sectors, 4 * BS);
    // Whole blocks with parts of unprovisioned blocks around them.
    fast_zero(&mut vol, 3 * BS, 0).unwrap();
    fast_zero(&mut vol, 6 * BS + 8, 3 * BS).unwrap();
    fast_zero(&mut vol, 4 * BS, 2 * BS + 8).unwrap();
    assert_eq!(pool.thin_status(0).unwrap().mapped_sectors, 2 * BS);
    // Within unprovisioned space, across a block boundary.
    fast_zero(&mut vol, 10 * BS - 8, 16).unwrap();
    assert_eq!(rig.data.stats().writes, writes, "no data written");
    let mut expected = data.clone();
    for block in [1usize, 2, 4, 5] {
        let bytes = BS as usize * 512;
        expected[block * bytes..(block + 1) * bytes].fill(0);
    }
    assert_eq!(read(&mut vol, 0, 6 * BS), expected);
    assert_eq!(
        fast_zero(&mut vol, 15 * BS, 2 * BS),
        Err(IoError::OutOfRange)
    );
    drop(vol);

    // Over an external origin, unmapping shows the origin: never fast.
    let origin = MemDisk::new(16 * BS);
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, 16 * BS, Some(Box::new(origin))).unwrap();
    assert_eq!(fast_zero(&mut vol, 0, 4 * BS), Err(NOT_FAST));
    drop(vol);
    pool.close().map_err(|(_, e)| e).unwrap();

    // Without discards, or read-only, blocks cannot be unmapped.
    for (ignore_discard, read_only) in [(true, false), (false, true)] {
        rig.config.features.ignore_discard = ignore_discard;
        rig.config.features.read_only = read_only;
        let pool = rig.open();
        let mut vol = pool.activate(0, 16 * BS, None).unwrap();
        assert_eq!(fast_zero(&mut vol, 0, BS), Err(NOT_FAST));
        assert_eq!(pool.thin_status(0).unwrap().mapped_sectors, 2 * BS);
    }
}
