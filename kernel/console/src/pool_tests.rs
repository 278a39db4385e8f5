//! Pools and thin devices through the console: the seed documents' dmsetup workflows
//! verbatim, every message's errors, status and table formats, the conveniences,
//! persistence across reboots, events, and thin exports over the NBD backend.

use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{IoBuf, MemDisk};
use nbd::{Backend, BackendError, ExportHandle, Extent, IoOp, IoOutput, IoRequest};

use crate::Console;
use crate::tests::{FakePlatform, boot, error, io, lines, mem_disk, nbd_backend, ok};

/// vda 16 MiB (metadata), vdb 64 MiB (data), vdc 8 MiB (base image), vdd 4 MiB
/// (configuration).
fn machine() -> Vec<(&'static str, MemDisk)> {
    alloc::vec![
        ("vda", mem_disk(16, "disk", "meta")),
        ("vdb", mem_disk(64, "disk", "data")),
        ("vdc", mem_disk(8, "disk", "image")),
        ("vdd", mem_disk(4, "disk", "config")),
    ]
}

/// The fields of a pool status line after `0 LENGTH thin-pool`.
fn pool_status(console: &mut Console<FakePlatform>, name: &str) -> Vec<String> {
    let line = ok(console, &alloc::format!("status {name}"));
    line.split_whitespace().skip(3).map(String::from).collect()
}

#[test]
fn seed_workflow_pool_thin_external_origin_snapshots_metadata_snap_transaction_id() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(
        &mut console,
        "dmsetup create pool --table \"0 131072 thin-pool /dev/vda /dev/vdb 128 0\"",
    );
    assert_eq!(
        ok(&mut console, "table pool"),
        "0 131072 thin-pool vda vdb 128 0 0\r\n"
    );
    let status = pool_status(&mut console, "pool");
    assert_eq!(status[0], "0", "transaction id");
    assert!(status[2].ends_with("/1024"), "data blocks: {status:?}");
    // These memory disks take no discards, so passdown is off, as dm turns it off.
    assert_eq!(
        status[3..8],
        ["-", "rw", "no_discard_passdown", "queue_if_no_space", "-"]
    );

    ok(
        &mut console,
        "dmsetup message /dev/mapper/pool 0 \"create_thin 0\"",
    );
    ok(
        &mut console,
        "dmsetup create thin --table \"0 2097152 thin /dev/mapper/pool 0\"",
    );
    assert_eq!(ok(&mut console, "status thin"), "0 2097152 thin 0 -\r\n");
    assert_eq!(ok(&mut console, "table thin"), "0 2097152 thin pool 0\r\n");

    // A thin device over a read-only external origin, and snapshots of it.
    ok(
        &mut console,
        "dmsetup create image --readonly --table \"0 16384 linear /dev/vdc 0\"",
    );
    ok(&mut console, "message pool 0 create_thin 1");
    ok(
        &mut console,
        "dmsetup create snap --table \"0 16384 thin /dev/mapper/pool 1 /dev/image\"",
    );
    assert_eq!(
        ok(&mut console, "table snap"),
        "0 16384 thin pool 1 image\r\n"
    );
    ok(&mut console, "message pool 0 \"create_snap 2 1\"");
    ok(
        &mut console,
        "create snap2 --table \"0 16384 thin pool 2 image\"",
    );
    assert!(
        ok(&mut console, "info image").contains("Used by:           snap, snap2"),
        "image is the external origin of both"
    );

    // Metadata snapshot: reserve, refused twice, shows in status, release.
    ok(&mut console, "message pool 0 reserve_metadata_snap");
    let held = pool_status(&mut console, "pool")[3].clone();
    assert!(held.parse::<u64>().is_ok(), "held root {held}");
    assert!(error(&mut console, "message pool 0 reserve_metadata_snap").ends_with("(EBUSY)"));
    ok(&mut console, "message pool 0 release_metadata_snap");
    assert_eq!(pool_status(&mut console, "pool")[3], "-");
    assert!(error(&mut console, "message pool 0 release_metadata_snap").ends_with("(EINVAL)"));

    ok(&mut console, "message pool 0 set_transaction_id 0 1");
    assert_eq!(pool_status(&mut console, "pool")[0], "1");
    assert!(error(&mut console, "message pool 0 set_transaction_id 0 2").ends_with("(EINVAL)"));
    assert_eq!(
        lines(&ok(&mut console, "ls")),
        [
            "pool   (thin-pool)",
            "thin   (thin)",
            "image  (linear)",
            "snap   (thin)",
            "snap2  (thin)",
        ]
    );
    assert!(ok(&mut console, "info pool").contains("NBD export:        - (pools carry no data"));
    assert_eq!(
        error(&mut console, "remove pool"),
        "error: pool is in use by thin, snap, snap2 (remove them first)"
    );
}

#[test]
fn message_errors_carry_dm_errnos_and_change_nothing() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(
        &mut console,
        "create pool --table \"0 131072 thin-pool vda vdb 128 0\"",
    );
    ok(&mut console, "message pool 0 create_thin 0");
    ok(&mut console, "create t0 --table \"0 8192 thin pool 0\"");
    let before = ok(&mut console, "dump pool");
    let cases = [
        ("message pool 0 create_thin 0", "(EEXIST)"),
        ("message pool 0 create_thin 16777216", "(EINVAL)"),
        ("message pool 0 create_thin", "(EINVAL)"),
        ("message pool 0 create_snap 5 77", "(ENODATA)"),
        ("message pool 0 create_snap 0 0", "(EEXIST)"),
        ("message pool 0 delete 99", "(ENODATA)"),
        ("message pool 0 delete 0", "(EBUSY)"),
        ("message pool 0 frobnicate", "(EINVAL)"),
        ("message pool 0 set_transaction_id 1 2", "(EINVAL)"),
        ("message pool 0 set_transaction_id x 2", "(EINVAL)"),
    ];
    for (line, errno) in cases {
        let answer = error(&mut console, line);
        assert!(
            answer.starts_with("error: pool: message '"),
            "{line}: {answer}"
        );
        assert!(answer.ends_with(errno), "{line}: {answer}");
    }
    assert_eq!(ok(&mut console, "dump pool"), before);
    assert_eq!(
        error(&mut console, "message t0 0 create_thin 1"),
        "error: t0 is a thin device, which takes no messages (messages go to thin-pool devices)"
    );
    assert_eq!(
        error(&mut console, "create t9 --table \"0 8 thin pool 9\""),
        "error: create t9: Couldn't open thin internal device: thin device 9 does not exist"
    );
    assert_eq!(
        error(
            &mut console,
            "create p2 --table \"0 16384 thin-pool vda vdc 128 0\""
        ),
        "error: create p2: vda is already in use by pool pool"
    );
}

#[test]
fn conveniences_write_the_same_tables_and_messages() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    assert_eq!(
        ok(
            &mut console,
            "pool create pool vda vdb --block-size 256 --low-water-mark 4"
        ),
        "pool: formatted new pool metadata on vda\r\npool: 0 131072 thin-pool vda vdb 256 4 0\r\n"
    );
    ok(
        &mut console,
        "create image --readonly --table \"0 16384 linear vdc 0\"",
    );
    assert_eq!(
        ok(&mut console, "thin create base pool --origin image"),
        "base: thin device 0 of pool, 8.00 MiB: 0 16384 thin pool 0 image\r\n"
    );
    assert_eq!(
        ok(&mut console, "thin create data pool --size 1G"),
        "data: thin device 1 of pool, 1.00 GiB: 0 2097152 thin pool 1\r\n"
    );
    assert_eq!(
        ok(&mut console, "snap create guest1 base"),
        "guest1: snapshot 2 of thin device 0 in pool: 0 16384 thin pool 2 image\r\n"
    );
    assert_eq!(
        error(&mut console, "snap create x image"),
        "error: snap create: image is a linear device; snapshots are taken of thin devices"
    );
    assert!(error(&mut console, "thin create data pool --size 1G").contains("already exists"));
    assert!(error(&mut console, "thin create nosize pool").contains("give --size"));
    let dump = ok(&mut console, "dump pool");
    assert!(
        dump.starts_with("<superblock uuid=\"\" time=\"1\" transaction=\"0\""),
        "{dump}"
    );
    for dev in 0..3 {
        assert!(
            dump.contains(&alloc::format!("<device dev_id=\"{dev}\"")),
            "{dump}"
        );
    }
    assert_eq!(
        lines(&ok(&mut console, "thin ls pool")),
        [
            "     DEV  NAME                   MAPPED    EXCLUSIVE       SHARED",
            "       0  base                      0 B          0 B          0 B",
            "       1  data                      0 B          0 B          0 B",
            "       2  guest1                    0 B          0 B          0 B",
        ]
    );
    ok(&mut console, "thin delete data");
    assert!(!ok(&mut console, "dump pool").contains("dev_id=\"1\""));
    assert!(error(&mut console, "thin delete image").contains("use remove"));
    assert!(error(&mut console, "dump pool --metadata-snap").starts_with("error: dump pool: "));
    ok(&mut console, "message pool 0 reserve_metadata_snap");
    let snap = ok(&mut console, "dump pool --metadata-snap");
    assert!(snap.contains("<device dev_id=\"2\""), "{snap}");
}

fn write(backend: &mut dyn Backend, export: ExportHandle, sector: u64, sectors: usize, byte: u8) {
    let mut buf = IoBuf::with_sectors(sectors);
    buf.fill(byte);
    io(
        backend,
        export,
        1,
        IoOp::Write {
            sector,
            buf,
            fua: false,
        },
    )
    .unwrap();
}

#[test]
fn thin_exports_report_holes_and_origin_data_and_survive_reboots() {
    let disks = machine();
    disks[2].1.write_at(0, &[0xAB; 65536]);
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdd");
    ok(&mut console, "pool create pool vda vdb");
    ok(
        &mut console,
        "create image --readonly --table \"0 16384 linear vdc 0\"",
    );
    ok(&mut console, "thin create guest pool --origin image");
    ok(&mut console, "thin create empty pool --size 8M");
    let mut backend = nbd_backend(&console);
    let names: Vec<String> = backend.exports().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["image", "guest", "empty"]);
    let guest_info = backend.lookup("guest").unwrap();
    assert_eq!(guest_info.preferred_block_size, 65536);

    let (guest, _) = backend.open("guest").unwrap();
    write(&mut backend, guest, 256, 128, 0x11);
    io(&mut backend, guest, 2, IoOp::Flush).unwrap();
    let status = io(
        &mut backend,
        guest,
        3,
        IoOp::BlockStatus {
            sector: 0,
            sectors: 1024,
            max_extents: 8,
        },
    );
    let Ok(IoOutput::Extents(extents)) = status else {
        panic!("{status:?}");
    };
    assert_eq!(
        extents[..2],
        [
            Extent {
                sectors: 256,
                hole: true,
                zero: false
            },
            Extent {
                sectors: 128,
                hole: false,
                zero: false
            },
        ]
    );
    let read = io(
        &mut backend,
        guest,
        4,
        IoOp::Read {
            sector: 0,
            buf: IoBuf::with_sectors(2),
        },
    );
    let Ok(IoOutput::Read { buf, zero_holes }) = read else {
        panic!("{read:?}");
    };
    assert!(
        buf.iter().all(|&b| b == 0xAB),
        "unprovisioned reads show the origin"
    );
    assert!(zero_holes.is_empty(), "origin data is not a zero hole");

    let (empty, _) = backend.open("empty").unwrap();
    let read = io(
        &mut backend,
        empty,
        5,
        IoOp::Read {
            sector: 8,
            buf: IoBuf::with_sectors(8),
        },
    );
    let Ok(IoOutput::Read { zero_holes, .. }) = read else {
        panic!("{read:?}");
    };
    assert_eq!(zero_holes.len(), 1);
    assert_eq!((zero_holes[0].start, zero_holes[0].sectors), (0, 8));
    assert_eq!(ok(&mut console, "status guest"), "0 16384 thin 128 383\r\n");
    backend.close(guest);
    backend.close(empty);
    ok(&mut console, "shutdown");
    drop(backend);
    drop(console);

    let (mut console, notes) = boot(&disks);
    assert_eq!(
        lines(&notes),
        ["config: vdd generation 5", "config: 4 of 4 devices active"]
    );
    assert_eq!(ok(&mut console, "status guest"), "0 16384 thin 128 383\r\n");
    let mut backend = nbd_backend(&console);
    let (guest, _) = backend.open("guest").unwrap();
    let read = io(
        &mut backend,
        guest,
        6,
        IoOp::Read {
            sector: 256,
            buf: IoBuf::with_sectors(1),
        },
    );
    let Ok(IoOutput::Read { buf, .. }) = read else {
        panic!("{read:?}");
    };
    assert!(buf.iter().all(|&b| b == 0x11));
}

fn write_zeroes(
    backend: &mut dyn Backend,
    export: ExportHandle,
    sector: u64,
    sectors: u64,
    may_unmap: bool,
) -> Result<IoOutput, BackendError> {
    let op = IoOp::WriteZeroes {
        sector,
        sectors,
        fua: false,
        may_unmap,
        fast_only: true,
    };
    io(backend, export, 9, op)
}

#[test]
fn fast_zero_unmaps_whole_blocks_of_thin_exports_and_refuses_the_rest() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "pool create pool vda vdb");
    ok(&mut console, "thin create t pool --size 1M");
    ok(&mut console, "create lin --table \"0 64 linear vdc 0\"");
    let mut backend = nbd_backend(&console);
    assert!(backend.lookup("t").unwrap().fast_zero);
    assert!(!backend.lookup("lin").unwrap().fast_zero);

    let (t, _) = backend.open("t").unwrap();
    write(&mut backend, t, 0, 256, 0x22);
    // Blocks 0 and 1 are provisioned: zeroing all of block 1 unmaps it at once.
    assert!(matches!(
        write_zeroes(&mut backend, t, 128, 128, true),
        Ok(IoOutput::Done)
    ));
    assert_eq!(ok(&mut console, "status t"), "0 2048 thin 128 127\r\n");
    // Part of a provisioned block would need a data write; NO_HOLE forbids unmapping.
    for (sector, sectors, may_unmap) in [(0, 8, true), (0, 128, false)] {
        assert_eq!(
            write_zeroes(&mut backend, t, sector, sectors, may_unmap).unwrap_err(),
            BackendError::NotFast
        );
    }
    assert_eq!(ok(&mut console, "status t"), "0 2048 thin 128 127\r\n");
    let read = io(
        &mut backend,
        t,
        10,
        IoOp::Read {
            sector: 0,
            buf: IoBuf::with_sectors(256),
        },
    );
    let Ok(IoOutput::Read { buf, .. }) = read else {
        panic!("{read:?}");
    };
    assert!(buf[..128 * 512].iter().all(|&b| b == 0x22));
    assert!(buf[128 * 512..].iter().all(|&b| b == 0));
}

#[test]
fn a_blank_metadata_disk_at_boot_is_not_formatted() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdd");
    ok(&mut console, "pool create pool vda vdb");
    ok(&mut console, "thin create t pool --size 4M");
    ok(&mut console, "shutdown");
    drop(console);
    // The metadata disk is replaced by a blank one with the same serial.
    let mut replaced = machine();
    replaced[1] = ("vdb", disks[1].1.handle());
    replaced[3] = ("vdd", disks[3].1.handle());
    let (mut console, notes) = boot(&replaced);
    assert_eq!(
        lines(&notes),
        [
            "config: vdd generation 3",
            "config: pool stays inactive: metadata device vda is blank (was the disk replaced?); \
             it is not formatted automatically: remove the pool and create it again to start \
             empty",
            "config: t stays inactive: pool is inactive",
            "config: 0 of 2 devices active",
        ]
    );
    assert!(
        replaced[0].1.resident_bytes() == 0,
        "nothing was written to the blank disk"
    );
    assert!(error(&mut console, "message pool 0 create_thin 5").contains("inactive"));
}

#[test]
fn low_water_mark_event_interrupts_the_prompt_without_garbling_the_line() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    // 64 blocks of 1 MiB; the event fires when 60 or fewer are free.
    ok(
        &mut console,
        "pool create pool vda vdb --block-size 2048 --low-water-mark 60",
    );
    ok(&mut console, "thin create t pool --size 32M");
    let mut backend = nbd_backend(&console);
    let (t, _) = backend.open("t").unwrap();
    let mut out = String::new();
    for byte in b"stat" {
        console.input(*byte, &mut out);
    }
    out.clear();
    write(&mut backend, t, 0, 4 * 2048, 0x5A);
    console.poll(&mut out);
    assert!(
        out.starts_with("\r\x1b[Kevent: pool: data low water mark reached: 60 data blocks free"),
        "{out:?}"
    );
    assert!(out.ends_with("\r\nthinbox> stat"), "{out:?}");
    out.clear();
    for byte in b"us t\r" {
        console.input(*byte, &mut out);
    }
    assert!(out.contains("0 65536 thin 8192 8191"), "{out:?}");
}

#[test]
fn existing_pools_are_reopened_and_only_format_starts_them_empty() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "pool create pool vda vdb");
    ok(&mut console, "thin create t pool --size 4M");
    ok(&mut console, "remove t");
    ok(&mut console, "remove pool");
    assert_eq!(
        ok(&mut console, "pool create pool vda vdb"),
        "pool: 0 131072 thin-pool vda vdb 128 0 0\r\n",
        "no formatting of existing metadata"
    );
    assert!(ok(&mut console, "dump pool").contains("<device dev_id=\"0\""));
    ok(&mut console, "remove pool");
    assert_eq!(
        ok(&mut console, "pool create pool vda vdb --format"),
        "pool: formatted new pool metadata on vda\r\npool: 0 131072 thin-pool vda vdb 128 0 0\r\n"
    );
    assert!(!ok(&mut console, "dump pool").contains("<device"));
}

#[test]
fn thin_exports_wait_while_suspended_and_fail_once_removed() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "pool create pool vda vdb");
    ok(&mut console, "thin create t pool --size 4M");
    let mut backend = nbd_backend(&console);
    let (t, _) = backend.open("t").unwrap();
    ok(&mut console, "suspend t");
    assert!(ok(&mut console, "ls").contains("t     (thin, suspended)"));
    let mut buf = IoBuf::with_sectors(8);
    buf.fill(3);
    backend
        .submit(IoRequest {
            tag: 7,
            export: t,
            op: IoOp::Write {
                sector: 0,
                buf,
                fua: true,
            },
        })
        .unwrap();
    for _ in 0..10 {
        assert!(backend.poll().is_none(), "held while suspended");
    }
    ok(&mut console, "resume t");
    let done = core::iter::repeat_with(|| backend.poll())
        .flatten()
        .next()
        .unwrap();
    assert_eq!((done.tag, done.result.is_ok()), (7, true));
    assert_eq!(ok(&mut console, "status t"), "0 8192 thin 128 127\r\n");
    assert_eq!(
        error(&mut console, "thin delete t"),
        "error: t has 1 NBD client connected (disconnect it or use remove --force)"
    );
    ok(&mut console, "remove t --force");
    assert_eq!(
        io(&mut backend, t, 8, IoOp::Flush).unwrap_err(),
        BackendError::Gone
    );
    backend.close(t);
    ok(&mut console, "message pool 0 delete 0");
}

/// A thin device with more blocks of its own than a delete releases in one step:
/// `thin delete` follows the release with progress lines until it is done, and with
/// `--background` returns at once while `jobs` shows the work.
#[test]
fn thin_delete_of_a_large_device_follows_the_release_of_its_blocks() {
    let disks = alloc::vec![
        ("vda", mem_disk(16, "disk", "meta")),
        ("vdb", mem_disk(544, "disk", "data")),
    ];
    let (mut console, _) = boot(&disks);
    // No discards, so disk-test leaves what it wrote mapped.
    ok(
        &mut console,
        "create pool --table \"0 1114112 thin-pool vda vdb 128 0 1 ignore_discard\"",
    );
    ok(&mut console, "thin create big pool --size 264M");
    ok(&mut console, "thin create other pool --size 264M");
    // 264 MiB of 64 KiB blocks: 4224 mappings each.
    ok(&mut console, "disk-test big 264");
    ok(&mut console, "disk-test other 264");
    assert_eq!(ok(&mut console, "jobs"), "no background jobs\r\n");

    let out = ok(&mut console, "thin delete big");
    let printed = lines(&out);
    assert!(
        printed[0].starts_with("big: delete of thin device 0: ")
            && printed[0].contains(" of 4224 mappings), "),
        "{printed:?}"
    );
    assert!(printed.contains(&"event: pool: thin device 0 deleted: all its blocks are released"));
    assert_eq!(
        printed.last().copied(),
        Some("big: thin device 0 deleted, all its blocks released")
    );
    assert!(error(&mut console, "thin delete big").contains("big"));

    let out = ok(&mut console, "thin delete other --background");
    assert!(
        out.starts_with(
            "other: deleted; pool releases its blocks in the background (jobs shows it as pool/1)"
        ),
        "{out}"
    );
    let jobs = ok(&mut console, "jobs");
    assert!(
        jobs.starts_with("pool/1  pool: delete of thin device 1, "),
        "{jobs}"
    );
    // (Events of the delete finishing may follow the answer.)
    let refused = crate::tests::run(&mut console, "jobs cancel pool/1");
    assert!(
        refused.starts_with("error: pool/1 cannot be cancelled"),
        "{refused}"
    );
    assert_eq!(
        error(&mut console, "jobs cancel pool/9"),
        "error: no background job pool/9 (jobs lists them)"
    );
    let mut rounds = 0;
    while !ok(&mut console, "jobs").contains("no background jobs") {
        rounds += 1;
        assert!(rounds < 10, "the delete never finished");
    }
    let status = pool_status(&mut console, "pool");
    assert!(
        status[2].starts_with("0/"),
        "data blocks in use: {status:?}"
    );
}
