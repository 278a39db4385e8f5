//! Tables of several segments through the console: listing, I/O across a seam, dm's
//! rules for gaps, overlaps and targets that stand alone, a pool on a concatenated
//! data device, and persistence across reboots.

use alloc::vec::Vec;
use blockdev::{IoBuf, MemDisk};
use nbd::{Backend, ExportHandle, IoOp, IoOutput};

use crate::tests::{CLIENT, boot, error, io, lines, mem_disk, nbd_backend, ok, run};

/// vda 16 MiB (metadata), vdb and vdc 4 MiB each (data), vdd 4 MiB (configuration).
fn machine() -> Vec<(&'static str, MemDisk)> {
    alloc::vec![
        ("vda", mem_disk(16, "disk", "meta")),
        ("vdb", mem_disk(4, "disk", "data-1")),
        ("vdc", mem_disk(4, "disk", "data-2")),
        ("vdd", mem_disk(4, "disk", "config")),
    ]
}

fn sector_bytes(disk: &MemDisk, sector: u64, sectors: usize) -> Vec<u8> {
    let mut bytes = alloc::vec![0; sectors * 512];
    disk.read_at(sector * 512, &mut bytes);
    bytes
}

fn read(backend: &mut dyn Backend, export: ExportHandle, sector: u64, sectors: usize) -> Vec<u8> {
    let op = IoOp::Read {
        sector,
        buf: IoBuf::with_sectors(sectors),
    };
    match io(backend, export, 9, op) {
        Ok(IoOutput::Read { buf, .. }) => buf.to_vec(),
        other => panic!("read failed: {other:?}"),
    }
}

fn write(backend: &mut dyn Backend, export: ExportHandle, sector: u64, data: &[u8]) {
    let op = IoOp::Write {
        sector,
        buf: IoBuf::from_slice(data),
        fua: false,
    };
    io(backend, export, 8, op).unwrap();
}

#[test]
fn a_concatenation_lists_one_line_per_segment_and_serves_across_the_seam() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(
        &mut console,
        "create cat --table \"0 2048 linear vdb 1024; 2048 1024 linear /dev/vdc 0\"",
    );
    assert_eq!(
        run(&mut console, "table cat"),
        "0 2048 linear vdb 1024\r\n2048 1024 linear vdc 0\r\n"
    );
    assert_eq!(
        run(&mut console, "status cat"),
        "0 2048 linear\r\n2048 1024 linear\r\n"
    );
    ok(
        &mut console,
        "create inner --table \"0 16 linear cat 2040\"",
    );
    assert_eq!(
        lines(&run(&mut console, "table")),
        [
            "cat: 0 2048 linear vdb 1024",
            "cat: 2048 1024 linear vdc 0",
            "inner: 0 16 linear cat 2040",
        ]
    );
    assert_eq!(
        lines(&run(&mut console, "status")),
        [
            "cat: 0 2048 linear",
            "cat: 2048 1024 linear",
            "inner: 0 16 linear",
        ]
    );
    let info = run(&mut console, "info cat");
    for line in [
        "Size:              3072 sectors (1.50 MiB)",
        "Table:             0 2048 linear vdb 1024; 2048 1024 linear vdc 0",
        "Depends on:        vdb, vdc",
        "Used by:           inner",
    ] {
        assert!(lines(&info).contains(&line), "{line} in {info}");
    }
    assert_eq!(
        lines(&run(&mut console, "ls")),
        ["cat    (linear)", "inner  (linear)"]
    );

    // Segments may also be separated by newlines (e.g. in an offline --exec command).
    let mut out = alloc::string::String::new();
    console.run_line(
        "create lines --table \"0 8 linear vdb 0\n8 8 linear vdc 0\"",
        &mut out,
    );
    assert_eq!(out, "");
    assert_eq!(
        run(&mut console, "table lines"),
        "0 8 linear vdb 0\r\n8 8 linear vdc 0\r\n"
    );

    let mut backend = nbd_backend(&console);
    let (cat, info) = backend.open("cat", CLIENT).unwrap();
    assert_eq!(info.sectors, 3072);
    let data: Vec<u8> = (0..16 * 512).map(|i| (i / 512) as u8 + 1).collect();
    write(&mut backend, cat, 2040, &data);
    assert_eq!(sector_bytes(&disks[1].1, 1024 + 2040, 8), data[..8 * 512]);
    assert_eq!(sector_bytes(&disks[2].1, 0, 8), data[8 * 512..]);
    assert_eq!(read(&mut backend, cat, 2040, 16), data);
    let (inner, _) = backend.open("inner", CLIENT).unwrap();
    assert_eq!(read(&mut backend, inner, 0, 16), data);
}

#[test]
fn gaps_overlaps_and_mixed_pools_or_thins_are_refused_and_change_nothing() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdd");
    ok(
        &mut console,
        "create cat --table \"0 8 linear vdb 0; 8 8 linear vdc 0\"",
    );
    let (listed, saved) = (run(&mut console, "ls"), run(&mut console, "config show"));
    let cases = [
        (
            "create x --table \"0 8 linear vdb 16; 16 8 linear vdc 16\"",
            "error: create x: segment 2: Gap in table: this segment starts at sector 16, the \
             one before ends at sector 8",
        ),
        (
            "create x --table \"0 8 linear vdb 16; 4 8 linear vdc 16\"",
            "error: create x: segment 2: Gap in table: this segment starts at sector 4, the \
             one before ends at sector 8",
        ),
        (
            "create x --table \"0 8 linear vdb 16; 8 8192 thin-pool vda vdc 128 0\"",
            "error: create x: segment 2: singleton target type must appear alone in table \
             (thin-pool cannot follow other segments)",
        ),
        (
            "create x --table \"0 8 thin pool 0; 8 8 linear vdb 16\"",
            "error: create x: segment 2: target type thin must appear alone in table",
        ),
        (
            "create x --table \"0 8 linear vdb 16; 8 9000 linear vdc 0\"",
            "error: create x: vdc is too small for this table: it holds 8192 sectors, the \
             table needs 0+9000",
        ),
        (
            "create x --table \"0 8 linear vdb 16; 8 8 linear ghost 0\"",
            "error: create x: no disk or device is called 'ghost' (see disks and ls)",
        ),
    ];
    for (line, expected) in cases {
        assert_eq!(error(&mut console, line), expected, "{line}");
    }
    assert_eq!(run(&mut console, "ls"), listed);
    assert_eq!(run(&mut console, "config show"), saved);
}

#[test]
fn a_pool_on_a_concatenated_data_device_comes_back_after_a_reboot() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdd");
    ok(
        &mut console,
        "create data --table \"0 6144 linear vdb 0; 6144 6144 linear vdc 0\"",
    );
    assert_eq!(
        lines(&ok(&mut console, "pool create pool vda data")),
        [
            "pool: formatted new pool metadata on vda",
            "pool: 0 12288 thin-pool vda data 128 0 0"
        ]
    );
    assert_eq!(
        error(&mut console, "pool create other vdc vdd"),
        "error: create other: vdc is already in use by pool pool"
    );
    ok(&mut console, "thin create volume pool --size 6M");
    let pattern: Vec<u8> = (0..12288 * 512).map(|i| (i / 4096 % 251) as u8).collect();
    let mut backend = nbd_backend(&console);
    let (volume, _) = backend.open("volume", CLIENT).unwrap();
    write(&mut backend, volume, 0, &pattern);
    io(&mut backend, volume, 7, IoOp::Flush).unwrap();
    backend.close(volume, CLIENT);
    let status = ok(&mut console, "status pool");
    assert!(
        status.contains(" 96/96 "),
        "every data block is used: {status}"
    );
    let used = |disk: &MemDisk| sector_bytes(disk, 0, 6144).iter().any(|&b| b != 0);
    assert!(
        used(&disks[1].1) && used(&disks[2].1),
        "blocks on both disks"
    );
    let tables = run(&mut console, "table");
    drop((console, backend));

    let (mut console, notes) = boot(&disks);
    assert_eq!(
        lines(&notes),
        ["config: vdd generation 4", "config: 3 of 3 devices active"]
    );
    assert_eq!(run(&mut console, "table"), tables);
    assert_eq!(
        run(&mut console, "table data"),
        "0 6144 linear vdb 0\r\n6144 6144 linear vdc 0\r\n"
    );
    let mut backend = nbd_backend(&console);
    let (volume, _) = backend.open("volume", CLIENT).unwrap();
    assert!(read(&mut backend, volume, 0, 12288) == pattern);
}
