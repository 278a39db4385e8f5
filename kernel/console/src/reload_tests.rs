//! dm's two tables through the console: `reload`, `table --inactive`, `clear`,
//! `resume` swapping the table in, `rename`, `thin resize` and `pool extend`, with
//! their errors, NBD clients that stay connected, and the configuration across
//! reboots.

use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{IoBuf, MemDisk};
use nbd::{Backend, ExportHandle, IoOp, IoOutput};

use crate::Console;
use crate::tests::{CLIENT, FakePlatform, boot, error, io, lines, mem_disk, nbd_backend, ok, run};

/// vda 16 MiB (metadata), vdb 8 MiB (data), vdc 16 MiB (more data), vdd 4 MiB
/// (configuration), vde 8 MiB (yet more data).
fn machine() -> Vec<(&'static str, MemDisk)> {
    alloc::vec![
        ("vda", mem_disk(16, "disk", "meta")),
        ("vdb", mem_disk(8, "disk", "data")),
        ("vdc", mem_disk(16, "disk", "more")),
        ("vdd", mem_disk(4, "disk", "config")),
        ("vde", mem_disk(8, "disk", "extra")),
    ]
}

fn write(backend: &mut dyn Backend, export: ExportHandle, sector: u64, byte: u8) {
    let mut buf = IoBuf::with_sectors(8);
    buf.fill(byte);
    let op = IoOp::Write {
        sector,
        buf,
        fua: false,
    };
    assert!(matches!(io(backend, export, 1, op), Ok(IoOutput::Done)));
}

fn read(backend: &mut dyn Backend, export: ExportHandle, sector: u64) -> Vec<u8> {
    let op = IoOp::Read {
        sector,
        buf: IoBuf::with_sectors(8),
    };
    match io(backend, export, 2, op) {
        Ok(IoOutput::Read { buf, .. }) => buf.to_vec(),
        other => panic!("{other:?}"),
    }
}

/// The `Tables present` line of `info`.
fn tables_present(console: &mut Console<FakePlatform>, name: &str) -> String {
    let info = ok(console, &alloc::format!("info {name}"));
    lines(&info)
        .into_iter()
        .find(|line| line.starts_with("Tables present:"))
        .expect("a Tables present line")
        .into()
}

#[test]
fn reload_loads_an_inactive_table_that_resume_swaps_in() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdd");
    ok(&mut console, "create lin --table \"0 2048 linear vdc 0\"");
    let mut backend = nbd_backend(&console);
    let (old, info) = backend.open("lin", CLIENT).unwrap();
    assert_eq!(info.sectors, 2048);
    write(&mut backend, old, 8, 0x3c);

    assert_eq!(
        ok(
            &mut console,
            "load lin --table \"0 2048 linear vdc 0; 2048 4096 linear vdb 0\""
        ),
        ""
    );
    assert_eq!(run(&mut console, "table lin"), "0 2048 linear vdc 0\r\n");
    assert_eq!(
        lines(&run(&mut console, "table --inactive lin")),
        ["0 2048 linear vdc 0", "2048 4096 linear vdb 0"]
    );
    assert_eq!(
        lines(&run(&mut console, "table --inactive")),
        ["lin: 0 2048 linear vdc 0", "lin: 2048 4096 linear vdb 0"]
    );
    assert_eq!(
        tables_present(&mut console, "lin"),
        "Tables present:    LIVE & INACTIVE"
    );
    assert!(
        run(&mut console, "config show").contains("create lin --table \"0 2048 linear vdc 0\"\r\n"),
        "only live tables are saved"
    );
    assert_eq!(backend.lookup("lin").unwrap().sectors, 2048);

    assert_eq!(ok(&mut console, "clear lin"), "");
    assert_eq!(
        tables_present(&mut console, "lin"),
        "Tables present:    LIVE"
    );
    assert_eq!(run(&mut console, "table --inactive lin"), "");
    assert_eq!(ok(&mut console, "resume lin"), "", "nothing to swap");
    assert_eq!(run(&mut console, "table lin"), "0 2048 linear vdc 0\r\n");

    ok(
        &mut console,
        "reload lin --table \"0 2048 linear vdc 0; 2048 4096 linear vdb 0\"",
    );
    assert_eq!(ok(&mut console, "resume lin"), "");
    assert_eq!(
        run(&mut console, "table lin"),
        "0 2048 linear vdc 0\r\n2048 4096 linear vdb 0\r\n"
    );
    assert_eq!(
        tables_present(&mut console, "lin"),
        "Tables present:    LIVE"
    );
    // The old connection goes on, and reaches the new segment; new ones see the size.
    assert_eq!(read(&mut backend, old, 8), [0x3c; 4096]);
    write(&mut backend, old, 2048, 0x4d);
    let mut byte = [0u8];
    disks[1].1.read_at(0, &mut byte);
    assert_eq!(byte, [0x4d]);
    let (new, info) = backend.open("lin", CLIENT).unwrap();
    assert_eq!(info.sectors, 6144);
    assert_eq!(read(&mut backend, new, 2048), [0x4d; 4096]);
    assert!(
        run(&mut console, "info lin")
            .contains("NBD export:        lin (2 clients: 127.0.0.1:40000, 127.0.0.1:40000)")
    );
    assert!(
        run(&mut console, "config show")
            .contains("create lin --table \"0 2048 linear vdc 0; 2048 4096 linear vdb 0\"")
    );
}

#[test]
fn refused_reloads_and_resumes_change_nothing() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdd");
    ok(&mut console, "create base --table \"0 4096 linear vdc 0\"");
    ok(
        &mut console,
        "create inner --table \"0 1024 linear base 8\"",
    );
    ok(&mut console, "pool create pool vda vdb");
    ok(&mut console, "thin create thin pool --size 1M");
    let config_before = run(&mut console, "config show");
    let tables_before = run(&mut console, "table");
    let cases = [
        (
            "reload nothing --table \"0 8 linear vdc 0\"",
            "error: no device called 'nothing' (see ls)",
        ),
        (
            "reload base",
            "error: reload: name and --table are both needed (usage: reload NAME --table \"0 \
             LENGTH TARGET ARGS...\")",
        ),
        (
            "reload base --readonly --table \"0 8 linear vdc 0\"",
            "error: reload: a reload keeps the device's read-only setting (remove the device \
             and create it with --readonly to change it)",
        ),
        (
            "reload base --table \"0 100\"",
            "error: reload base: table '0 100' is incomplete (expected START LENGTH TARGET \
             ARGS...)",
        ),
        (
            "reload base --table \"0 8 linear vdz 0\"",
            "error: reload base: no disk or device is called 'vdz' (see disks and ls)",
        ),
        (
            "reload base --table \"0 32769 linear vdc 0\"",
            "error: reload base: vdc is too small for this table: it holds 32768 sectors, the \
             table needs 0+32769",
        ),
        (
            "reload base --table \"0 8 linear inner 0\"",
            "error: reload base: base cannot be built on inner, which is built on base",
        ),
        (
            "reload base --table \"0 8 thin pool 0\"",
            "error: reload base: the table is thin, the live one linear: a reload keeps the \
             target type (remove base and create it again to change it)",
        ),
        (
            "reload thin --table \"0 2048 thin pool 7\"",
            "error: reload thin: a thin device's reload may change only its length (keep pool \
             pool, device id 0)",
        ),
        (
            "reload pool --table \"0 16512 thin-pool vda vdb 128 0 0\"",
            "error: reload pool: vdb is too small for this table: it holds 16384 sectors, the \
             table needs 0+16512",
        ),
        ("clear", "error: usage: clear NAME"),
        (
            "clear nothing",
            "error: no device called 'nothing' (see ls)",
        ),
        (
            "table --inactive a b",
            "error: table takes at most one device name (got 'b')",
        ),
        (
            "table --bogus",
            "error: table: unknown option '--bogus' (usage: table [--inactive] [NAME])",
        ),
        ("rename base", "error: usage: rename OLD_NAME NEW_NAME"),
        (
            "rename nothing other",
            "error: no device called 'nothing' (see ls)",
        ),
        (
            "rename base inner",
            "error: rename base: device inner already exists (see ls)",
        ),
        (
            "rename base vda",
            "error: rename base: vda is a disk's name; choose another device name",
        ),
        (
            "rename base a/b",
            "error: rename base: invalid device name 'a/b' (use up to 127 letters, digits, \
             '.', '_', '+' or '-', not starting with '-')",
        ),
    ];
    for (line, expected) in cases {
        assert_eq!(error(&mut console, line), expected, "{line}");
        assert_eq!(
            tables_present(&mut console, "base"),
            "Tables present:    LIVE"
        );
    }
    // Refused at resume: the live table stays serving (I/O held by an earlier suspend
    // runs), the inactive one stays loaded.
    let mut backend = nbd_backend(&console);
    let (handle, _) = backend.open("base", CLIENT).unwrap();
    ok(&mut console, "suspend base");
    let mut buf = IoBuf::with_sectors(8);
    buf.fill(0x5e);
    let op = IoOp::Write {
        sector: 4000,
        buf,
        fua: false,
    };
    backend
        .submit(nbd::IoRequest {
            tag: 77,
            export: handle,
            op,
        })
        .unwrap();
    assert!((0..100).all(|_| backend.poll().is_none()), "held");
    ok(&mut console, "reload base --table \"0 2048 linear vdc 0\"");
    assert_eq!(
        error(&mut console, "resume base"),
        "error: resume base: base is in use by inner: its new table must begin with the 4096 \
         sectors it maps now (it may only grow); the live table stays"
    );
    assert_eq!(
        tables_present(&mut console, "base"),
        "Tables present:    LIVE & INACTIVE"
    );
    let done = (0..100).find_map(|_| backend.poll()).expect("released");
    assert_eq!(done.tag, 77);
    assert!(done.result.is_ok());
    assert_eq!(read(&mut backend, handle, 4000), [0x5e; 4096]);
    assert_eq!(lines(&run(&mut console, "ls"))[0], "base   (linear)");
    ok(&mut console, "clear base");
    ok(
        &mut console,
        "reload pool --table \"0 8192 thin-pool vda vdb 128 0 0\"",
    );
    assert_eq!(
        error(&mut console, "resume pool"),
        "error: resume pool: pool target (64 blocks) too small: expected 128; the live table \
         stays"
    );
    ok(&mut console, "clear pool");
    ok(
        &mut console,
        "reload pool --table \"0 16384 thin-pool vda vdb 256 0 0\"",
    );
    assert_eq!(
        error(&mut console, "resume pool"),
        "error: resume pool: changing the data block size (from 128 to 256) is not supported; \
         the live table stays"
    );
    ok(&mut console, "clear pool");
    ok(
        &mut console,
        "reload pool --table \"0 16384 thin-pool vda vdb 128 0 1 ignore_discard\"",
    );
    assert_eq!(
        error(&mut console, "resume pool"),
        "error: resume pool: Discard support cannot be disabled once enabled; the live table \
         stays"
    );
    ok(&mut console, "clear pool");
    ok(&mut console, "create short --table \"0 1024 linear vda 0\"");
    ok(
        &mut console,
        "reload pool --table \"0 16384 thin-pool short vdb 128 0 0\"",
    );
    assert_eq!(
        error(&mut console, "resume pool"),
        "error: resume pool: metadata device (128 blocks) too small: expected 4096; the live \
         table stays"
    );
    ok(&mut console, "clear pool");
    ok(&mut console, "remove short");
    ok(
        &mut console,
        "reload pool --table \"0 16384 thin-pool vdc vdb 128 0 0\"",
    );
    assert_eq!(
        error(&mut console, "resume pool"),
        "error: resume pool: the new metadata device vdc must begin with the blocks the \
         metadata is on now; the live table stays"
    );
    ok(&mut console, "clear pool");
    ok(&mut console, "thin resize thin 2M");
    ok(&mut console, "reload thin --table \"0 2048 thin pool 0\"");
    assert_eq!(
        error(&mut console, "thin resize thin 4M"),
        "error: thin has an inactive table loaded (resume thin or clear thin first)"
    );
    ok(&mut console, "clear thin");
    ok(&mut console, "thin resize thin 1M");
    assert_eq!(
        error(&mut console, "thin resize base 4M"),
        "error: thin resize: base is a linear device; thin resize resizes thin devices (reload \
         other devices with a new table)"
    );
    assert_eq!(
        error(&mut console, "thin resize thin 4"),
        "error: size '4' is not a whole number with a unit: K, M, G, T (binary) or S \
         (sectors), e.g. 10G"
    );
    assert_eq!(
        error(&mut console, "thin resize thin"),
        "error: thin resize: name and size are needed (usage: thin create NAME POOL [--size \
         SIZE] [--origin DEVICE] | thin resize NAME SIZE | thin delete NAME [--background] | \
         thin ls POOL)"
    );
    assert_eq!(run(&mut console, "table"), tables_before);
    let creates = |config: &str| -> Vec<String> {
        lines(config)
            .into_iter()
            .filter(|line| line.starts_with("create "))
            .map(String::from)
            .collect()
    };
    assert_eq!(
        creates(&run(&mut console, "config show")),
        creates(&config_before)
    );
}

#[test]
fn thin_resize_shows_to_new_connections_while_old_ones_keep_working() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "pool create pool vda vdb");
    ok(&mut console, "thin create guest pool --size 1M");
    let mut backend = nbd_backend(&console);
    let (old, info) = backend.open("guest", CLIENT).unwrap();
    assert_eq!(info.sectors, 2048);
    write(&mut backend, old, 1024, 0x61);

    assert_eq!(
        ok(&mut console, "thin resize guest 4M"),
        "guest: 0 8192 thin pool 0\r\n"
    );
    assert_eq!(backend.lookup("guest").unwrap().sectors, 8192);
    let (new, info) = backend.open("guest", CLIENT).unwrap();
    assert_eq!(info.sectors, 8192);
    write(&mut backend, new, 6000, 0x62);
    assert_eq!(read(&mut backend, old, 1024), [0x61; 4096]);
    assert_eq!(read(&mut backend, old, 6000), [0x62; 4096]);
    assert_eq!(read(&mut backend, new, 1024), [0x61; 4096]);

    assert_eq!(
        ok(&mut console, "thin resize guest 512K"),
        "guest: 0 1024 thin pool 0\r\n"
    );
    let (small, info) = backend.open("guest", CLIENT).unwrap();
    assert_eq!(info.sectors, 1024);
    let beyond = io(
        &mut backend,
        small,
        3,
        IoOp::Read {
            sector: 1024,
            buf: IoBuf::with_sectors(8),
        },
    );
    assert!(beyond.is_err(), "{beyond:?}");
    // Growing again shows the blocks the pool kept mapped.
    ok(&mut console, "thin resize guest 4M");
    assert_eq!(read(&mut backend, old, 6000), [0x62; 4096]);
    assert_eq!(ok(&mut console, "status guest"), "0 8192 thin 256 6015\r\n");
}

#[test]
fn rename_keeps_clients_connected_and_follows_into_tables_and_reboots() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdd");
    ok(&mut console, "pool create pool vda vdb");
    ok(&mut console, "thin create guest pool --size 1M");
    let mut backend = nbd_backend(&console);
    let (handle, _) = backend.open("guest", CLIENT).unwrap();
    write(&mut backend, handle, 0, 0x71);

    assert_eq!(ok(&mut console, "rename guest web"), "");
    assert_eq!(ok(&mut console, "rename /dev/mapper/pool tank"), "");
    assert_eq!(
        lines(&run(&mut console, "ls")),
        ["tank  (thin-pool)", "web   (thin)"]
    );
    assert_eq!(run(&mut console, "table web"), "0 2048 thin tank 0\r\n");
    assert!(
        run(&mut console, "info web")
            .contains("NBD export:        web (1 client: 127.0.0.1:40000)")
    );
    write(&mut backend, handle, 8, 0x72);
    assert_eq!(read(&mut backend, handle, 0), [0x71; 4096]);
    let names: Vec<String> = backend.exports().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["web"]);
    assert!(backend.open("guest", CLIENT).is_err());
    let (again, _) = backend.open("web", CLIENT).unwrap();
    assert_eq!(read(&mut backend, again, 8), [0x72; 4096]);
    backend.close(handle, CLIENT);
    backend.close(again, CLIENT);
    ok(&mut console, "shutdown");
    drop(backend);
    drop(console);

    let (mut console, notes) = boot(&disks);
    assert_eq!(lines(&notes)[1], "config: 2 of 2 devices active");
    assert_eq!(run(&mut console, "table web"), "0 2048 thin tank 0\r\n");
    let mut backend = nbd_backend(&console);
    let (handle, _) = backend.open("web", CLIENT).unwrap();
    assert_eq!(read(&mut backend, handle, 8), [0x72; 4096]);
}

#[test]
fn pool_extend_adds_segments_that_survive_reboots() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdd");
    ok(&mut console, "pool create pool vda vdb");
    ok(&mut console, "thin create guest pool --size 64M");
    let mut backend = nbd_backend(&console);
    let (handle, _) = backend.open("guest", CLIENT).unwrap();
    write(&mut backend, handle, 0, 0x81);
    assert_eq!(
        lines(&ok(&mut console, "pool extend pool --data vdc")),
        [
            "pool_tdata: created over vdb so that the pool's data device can have a second \
             segment",
            "pool_tdata: 0 16384 linear vdb 0",
            "pool_tdata: 16384 32768 linear vdc 0",
            "pool: 0 49152 thin-pool vda pool_tdata 128 0 0",
            "pool: data space grown from 128 to 384 blocks",
        ]
    );
    // Blocks past the first disk's end are written (to vdc).
    for block in 0..200u64 {
        write(&mut backend, handle, block * 128 + 8, 0x82);
    }
    let status = ok(&mut console, "status pool");
    assert!(status.contains(" 200/384 "), "{status}");
    let cases = [
        (
            "pool extend pool --data vdc",
            "error: pool extend: vdc is in use by pool_tdata; give a disk or linear device \
             nothing uses",
        ),
        (
            "pool extend pool --data vdz",
            "error: pool extend: no disk or device is called 'vdz' (see disks and ls); the new \
             segment must be a disk or linear device",
        ),
        (
            "pool extend guest --data vdc",
            "error: pool extend: guest is a thin device, not a thin-pool",
        ),
        (
            "pool extend pool",
            "error: pool extend: give one of --data DEVICE or --metadata DEVICE (usage: pool \
             extend POOL --data DEVICE | pool extend POOL --metadata DEVICE)",
        ),
        (
            "pool extend pool --data vdc --metadata vdc",
            "error: pool extend: give one of --data DEVICE or --metadata DEVICE (usage: pool \
             extend POOL --data DEVICE | pool extend POOL --metadata DEVICE)",
        ),
        (
            "pool extend pool --data spare",
            "error: pool extend: spare has NBD clients connected; the pool would overwrite their \
             data (disconnect them and remove spare, or give another device)",
        ),
        (
            "pool extend pool --data pool",
            "error: pool extend: pool is a thin-pool device; only disks and linear devices can \
             be used here; the new segment must be a disk or linear device",
        ),
    ];
    ok(&mut console, "create spare --table \"0 2048 linear vde 0\"");
    let (spare, _) = backend.open("spare", CLIENT).unwrap();
    for (line, expected) in cases {
        assert_eq!(error(&mut console, line), expected, "{line}");
    }
    backend.close(spare, CLIENT);
    ok(&mut console, "remove spare");
    backend.close(handle, CLIENT);
    ok(&mut console, "shutdown");
    let config = run(&mut console, "config show");
    let creates: Vec<&str> = lines(&config)
        .into_iter()
        .filter(|line| line.starts_with("create "))
        .collect();
    assert_eq!(
        creates,
        [
            "create pool_tdata --table \"0 16384 linear vdb 0; 16384 32768 linear vdc 0\"",
            "create pool --table \"0 49152 thin-pool vda pool_tdata 128 0 0\"",
            "create guest --table \"0 131072 thin pool 0\"",
        ],
        "a device is saved after the devices it is built on"
    );
    drop(backend);
    drop(console);

    let (mut console, notes) = boot(&disks);
    assert_eq!(lines(&notes)[1], "config: 3 of 3 devices active");
    assert!(ok(&mut console, "status pool").contains(" 200/384 "));
    let mut backend = nbd_backend(&console);
    let (handle, _) = backend.open("guest", CLIENT).unwrap();
    assert_eq!(read(&mut backend, handle, 0), [0x81; 4096]);
    assert_eq!(read(&mut backend, handle, 199 * 128 + 8), [0x82; 4096]);
    // The data device is linear now: a third disk becomes its third segment.
    assert_eq!(
        lines(&ok(&mut console, "pool extend pool --data vde")),
        [
            "pool_tdata: 0 16384 linear vdb 0",
            "pool_tdata: 16384 32768 linear vdc 0",
            "pool_tdata: 49152 16384 linear vde 0",
            "pool: 0 65536 thin-pool vda pool_tdata 128 0 0",
            "pool: data space grown from 384 to 512 blocks",
        ]
    );
    for block in 200..500u64 {
        write(&mut backend, handle, block * 128, 0x83);
    }
    assert_eq!(read(&mut backend, handle, 0), [0x81; 4096]);
    assert_eq!(read(&mut backend, handle, 499 * 128), [0x83; 4096]);
    let status = ok(&mut console, "status pool");
    assert!(status.contains(" 500/512 "), "{status}");
}
