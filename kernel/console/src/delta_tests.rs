//! `thin delta` and the `thinbox:changed:BASE` context through the console's
//! device mapper: a volume written, snapshotted, written and trimmed again.

use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{IoBuf, MemDisk};
use nbd::{Backend, BackendError, ContextHandle, ExportHandle, IoOp};

use crate::Console;
use crate::tests::CLIENT;
use crate::tests::{FakePlatform, boot, error, io, lines, mem_disk, nbd_backend, ok};

/// 64 KiB blocks.
const BLOCK: u64 = 128;

fn machine() -> Vec<(&'static str, MemDisk)> {
    alloc::vec![
        ("vda", mem_disk(16, "disk", "meta")),
        ("vdb", mem_disk(64, "disk", "data")),
        ("vdc", mem_disk(16, "disk", "other")),
    ]
}

fn write_block(backend: &mut dyn Backend, export: ExportHandle, block: u64) {
    let mut buf = IoBuf::with_sectors(BLOCK as usize);
    buf.fill(block as u8 + 1);
    let op = IoOp::Write {
        sector: block * BLOCK,
        buf,
        fua: false,
    };
    io(backend, export, 1, op).unwrap();
}

/// vol: blocks 0, 1, 2, 5 written; s1 snapshotted; then vol's blocks 1 and 7
/// written and 5 trimmed.
fn written() -> (Console<FakePlatform>, Vec<(&'static str, MemDisk)>) {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "pool create pool vda vdb --block-size 128");
    ok(&mut console, "thin create vol pool --size 1M");
    let mut backend = nbd_backend(&console);
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    for block in [0, 1, 2, 5] {
        write_block(&mut backend, vol, block);
    }
    io(&mut backend, vol, 2, IoOp::Flush).unwrap();
    ok(&mut console, "snap create s1 vol");
    for block in [1, 7] {
        write_block(&mut backend, vol, block);
    }
    let trim = IoOp::Trim {
        sector: 5 * BLOCK,
        sectors: BLOCK,
        fua: false,
    };
    io(&mut backend, vol, 3, trim).unwrap();
    io(&mut backend, vol, 4, IoOp::Flush).unwrap();
    backend.close(vol, CLIENT);
    (console, disks)
}

fn held_root(console: &mut Console<FakePlatform>) -> String {
    let status = ok(console, "status pool");
    String::from(status.split_whitespace().nth(6).unwrap())
}

#[test]
fn the_table_shows_what_changed_and_the_snapshot_is_released() {
    let (mut console, _disks) = written();
    let out = ok(&mut console, "thin delta s1 vol");
    assert_eq!(
        lines(&out),
        [
            "s1 (thin device 1) against vol (thin device 0) in pool's metadata snapshot, 64.00 KiB blocks",
            "KIND                OFFSET          BYTES",
            "different            65536          65536",
            "left_only           327680          65536",
            "right_only          458752          65536",
            "same             2 ranges            2 blocks   128.00 KiB",
            "different        1 ranges            1 blocks    64.00 KiB",
            "left_only        1 ranges            1 blocks    64.00 KiB",
            "right_only       1 ranges            1 blocks    64.00 KiB",
            "changed: 3 ranges, 3 blocks, 192.00 KiB",
        ]
    );
    assert_eq!(held_root(&mut console), "-", "the snapshot was released");
    let verbose = ok(&mut console, "thin delta s1 vol --verbose");
    assert!(lines(&verbose).contains(&"same                     0          65536"));
}

#[test]
fn xml_reads_the_held_snapshot_when_asked_and_leaves_it_held() {
    let (mut console, _disks) = written();
    ok(&mut console, "message pool 0 reserve_metadata_snap");
    let block = held_root(&mut console);
    let out = ok(&mut console, "thin delta vol s1 --xml --metadata-snap");
    assert_eq!(
        lines(&out),
        [
            "<superblock uuid=\"\" time=\"1\" transaction=\"0\" data_block_size=\"128\" nr_data_blocks=\"0\">",
            "  <diff left=\"0\" right=\"1\">",
            "    <same begin=\"0\" length=\"1\"/>",
            "    <different begin=\"1\" length=\"1\"/>",
            "    <same begin=\"2\" length=\"1\"/>",
            "    <right_only begin=\"5\" length=\"1\"/>",
            "    <left_only begin=\"7\" length=\"1\"/>",
            "  </diff>",
            "</superblock>",
        ]
    );
    assert_eq!(held_root(&mut console), block);
    assert_eq!(
        error(&mut console, "thin delta vol s1"),
        alloc::format!(
            "error: thin delta: pool holds a metadata snapshot already (block {block}); read it \
             with --metadata-snap, or release it (message pool 0 release_metadata_snap)"
        )
    );
}

#[test]
fn bad_requests_are_one_error_line_and_change_nothing() {
    let (mut console, _disks) = written();
    ok(&mut console, "create m2 --table \"0 4096 linear vdc 0\"");
    ok(
        &mut console,
        "create d2 --table \"0 28672 linear vdc 4096\"",
    );
    ok(&mut console, "pool create pool2 m2 d2");
    ok(&mut console, "thin create far pool2 --size 1M");
    for (line, expected) in [
        (
            "thin delta vol",
            "usage: thin delta A B [--xml] [--verbose] [--metadata-snap]",
        ),
        (
            "thin delta vol s1 --json",
            "thin delta: unknown option '--json'",
        ),
        (
            "thin delta vol far",
            "vol is in pool pool and far in pool pool2",
        ),
        (
            "thin delta vol m2",
            "m2 is a linear device; deltas compare thin devices",
        ),
        ("thin delta vol nope", "nope"),
        (
            "thin delta vol s1 --metadata-snap",
            "pool holds no metadata snapshot",
        ),
    ] {
        let got = error(&mut console, line);
        assert!(got.contains(expected), "{line}: {got}");
    }
    assert_eq!(held_root(&mut console), "-");
}

fn changed(
    backend: &mut dyn Backend,
    context: ContextHandle,
    sector: u64,
    sectors: u64,
    max: u32,
) -> Vec<(u64, u32)> {
    let mut extents = Vec::new();
    backend
        .context_status(context, sector, sectors, max, &mut |len, flags| {
            extents.push((len, flags))
        })
        .unwrap();
    extents
}

#[test]
fn the_changed_context_is_frozen_when_opened_and_refuses_other_bases() {
    let (mut console, _disks) = written();
    ok(&mut console, "create lin --table \"0 128 linear vdc 0\"");
    let mut backend = nbd_backend(&console);
    assert_eq!(
        backend.meta_contexts("vol"),
        ["thinbox:changed:vol", "thinbox:changed:s1"]
    );
    assert!(backend.meta_contexts("lin").is_empty());
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    let context = backend.open_context(vol, "thinbox:changed:s1").unwrap();
    let expected = [
        (BLOCK, 0),
        (BLOCK, 1),
        (3 * BLOCK, 0),
        (BLOCK, 1),
        (BLOCK, 0),
        (BLOCK, 1),
        (8 * BLOCK, 0),
    ];
    assert_eq!(changed(&mut backend, context, 0, 16 * BLOCK, 64), expected);
    assert_eq!(
        changed(&mut backend, context, 0, 16 * BLOCK, 2),
        expected[..2]
    );
    assert_eq!(changed(&mut backend, context, 10, 4, 1), [(BLOCK - 10, 0)]);
    // A write after the view was taken does not show; a new view sees it.
    write_block(&mut backend, vol, 3);
    assert_eq!(changed(&mut backend, context, 0, 16 * BLOCK, 64), expected);
    let fresh = backend.open_context(vol, "thinbox:changed:s1").unwrap();
    assert_eq!(
        changed(&mut backend, fresh, 3 * BLOCK, BLOCK, 1),
        [(BLOCK, 1)]
    );
    for bad in [
        "thinbox:changed:nope",
        "thinbox:changed:lin",
        "base:allocation",
        "thinbox:changed:",
    ] {
        assert!(backend.open_context(vol, bad).is_err(), "{bad}");
    }
    backend.close_context(context);
    backend.close_context(fresh);
    assert_eq!(
        backend.context_status(context, 0, 8, 1, &mut |_, _| {}),
        Err(BackendError::Gone)
    );
    backend.close(vol, CLIENT);
    // The views are gone from the metadata once the pool commits.
    ok(&mut console, "message pool 0 reserve_metadata_snap");
    let dump = ok(&mut console, "dump pool --metadata-snap");
    assert_eq!(dump.matches("<device ").count(), 2, "{dump}");
}
