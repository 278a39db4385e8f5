//! Basic engine behaviour: provisioning, snapshots, discards, status, reopen.

mod common;

use blockdev::{IoBuf, IoError};
use common::*;
use thin_pool::{Extent, SectorRun, ThinOp, ThinOutput};

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
    assert_eq!(rig.data.0.borrow().discards, 1);
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
