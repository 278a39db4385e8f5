//! The device mapper through the console: dm commands, configuration persistence
//! across reboots and power cuts, and the NBD backend.

use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{BlockDevice, Busy, Command, Completion, DeviceInfo, IoBuf, MemDisk, Request};
use core::cell::Cell;
use nbd::{Backend, BackendError, ExportHandle, IoOp, IoOutput, IoRequest};

use crate::Console;
use crate::tests::{
    FakePlatform, NO_CONFIG, boot, console_over, disk, error, io, lines, mem_disk, nbd_backend, ok,
    run,
};

/// Three disks with serials: a 64 MiB one (vda), a 32 MiB one (vdb), an 8 MiB one
/// (vdc). Returns the disks' contents to boot again from.
fn machine() -> Vec<(&'static str, MemDisk)> {
    alloc::vec![
        ("vda", mem_disk(64, "disk", "serial-a")),
        ("vdb", mem_disk(32, "disk", "serial-b")),
        ("vdc", mem_disk(8, "disk", "serial-c")),
    ]
}

#[test]
fn linear_devices_seen_through_every_listing() {
    let disks = machine();
    let (mut console, notes) = boot(&disks);
    assert_eq!(notes, alloc::format!("{NO_CONFIG}\r\n"));
    assert_eq!(run(&mut console, "ls"), "No devices found\r\n");
    assert_eq!(
        ok(
            &mut console,
            "dmsetup create base --readonly --table \"0 4096 linear /dev/vdb 2048\""
        ),
        ""
    );
    ok(
        &mut console,
        "create /dev/mapper/inner --table 0 1024 linear /dev/mapper/base 8",
    );
    assert_eq!(
        lines(&run(&mut console, "ls")),
        ["base   (linear)", "inner  (linear)"]
    );
    assert_eq!(
        run(&mut console, "table base"),
        "0 4096 linear vdb 2048\r\n"
    );
    assert_eq!(
        lines(&run(&mut console, "dmsetup table")),
        [
            "base: 0 4096 linear vdb 2048",
            "inner: 0 1024 linear base 8"
        ]
    );
    assert_eq!(
        run(&mut console, "status /dev/mapper/inner"),
        "0 1024 linear\r\n"
    );
    assert_eq!(
        lines(&run(&mut console, "info base")),
        [
            "Name:              base",
            "State:             ACTIVE",
            "Tables present:    LIVE",
            "Read only:         yes",
            "Size:              4096 sectors (2.00 MiB)",
            "Table:             0 4096 linear vdb 2048",
            "Open count:        1",
            "Depends on:        vdb",
            "Used by:           inner",
            "NBD export:        base (0 clients)",
        ]
    );
    assert_eq!(
        error(&mut console, "remove base"),
        "error: base is in use by inner (remove it first)"
    );
    ok(&mut console, "suspend inner");
    assert_eq!(
        run(&mut console, "ls"),
        "base   (linear)\r\ninner  (linear, suspended)\r\n"
    );
    ok(&mut console, "resume inner");
    ok(&mut console, "remove inner");
    ok(&mut console, "remove /dev/mapper/base");
    assert_eq!(run(&mut console, "ls"), "No devices found\r\n");
}

#[test]
fn refused_creates_leave_nothing_behind() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdc");
    ok(&mut console, "create a --table \"0 8 linear vda 0\"");
    let config_before = run(&mut console, "config show");
    let cases = [
        (
            "create b --table \"0 131073 linear vda 0\"",
            "error: create b: vda is too small for this table: it holds 131072 sectors, the \
             table needs 0+131073",
        ),
        (
            "create b --table \"0 8 linear vdz 0\"",
            "error: create b: no disk or device is called 'vdz' (see disks and ls)",
        ),
        (
            "create b --table \"0 8 striped 2 8 vda 0 vdb 0\"",
            "error: create b: unknown target type 'striped' (use linear, thin-pool, thin, snapshot-origin, snapshot or snapshot-merge)",
        ),
        (
            "create b --table \"0 8 thin-pool vda vdb 100 0\"",
            "error: create b: thin-pool: Invalid block size (sectors: a multiple of 128 from 128 \
             to 2097152)",
        ),
        (
            "create b --table \"1 8 linear vda 0\"",
            "error: create b: Gap in table: the first segment starts at sector 1; a table \
             starts at sector 0",
        ),
        (
            "create a --table \"0 8 linear vda 0\"",
            "error: device a already exists (see ls)",
        ),
        (
            "create vdb --table \"0 8 linear vda 0\"",
            "error: vdb is a disk's name; choose another device name",
        ),
        (
            "create b/c --table \"0 8 linear vda 0\"",
            "error: invalid device name 'b/c' (use up to 127 letters, digits, '.', '_', '+' or \
             '-', not starting with '-')",
        ),
        (
            "create b",
            "error: create: name and --table are both needed (usage: create NAME [--readonly] \
             --table \"0 LENGTH TARGET ARGS...\")",
        ),
        (
            "create b --table \"0 8 linear vdc 0\" --bogus",
            "error: create b: linear takes 2 arguments, DEVICE OFFSET (got 3)",
        ),
        (
            "remove nothing",
            "error: no device called 'nothing' (see ls)",
        ),
        ("suspend", "error: usage: suspend NAME"),
        (
            "message a 0 create_thin 0",
            "error: a is a linear device, which takes no messages (messages go to thin-pool \
             devices)",
        ),
        (
            "message a 8 \"create_thin 0\"",
            "error: message: sector '8' must be 0 (messages go to the device's only segment; \
             usage: message NAME 0 \"MESSAGE\")",
        ),
    ];
    for (line, expected) in cases {
        assert_eq!(error(&mut console, line), expected, "{line}");
    }
    assert_eq!(run(&mut console, "ls"), "a  (linear)\r\n");
    assert_eq!(run(&mut console, "config show"), config_before);
}

#[test]
fn configuration_survives_reboots_and_follows_disks_by_serial() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdc");
    ok(
        &mut console,
        "create base --readonly --table \"0 4096 linear vdb 0\"",
    );
    ok(
        &mut console,
        "create scratch --table \"0 2048 linear vda 100\"",
    );
    ok(&mut console, "create inner --table \"0 8 linear base 8\"");
    let tables = run(&mut console, "table");
    drop(console);

    let (mut console, notes) = boot(&disks);
    assert_eq!(
        notes,
        "config: vdc generation 4\r\nconfig: 3 of 3 devices active\r\n"
    );
    assert_eq!(run(&mut console, "table"), tables);
    assert!(run(&mut console, "info base").contains("Read only:         yes"));
    assert!(lines(&run(&mut console, "disks"))[2].ends_with("(first MiB holds the configuration)"));
    drop(console);

    // The disks come back in another order: found by serial, tables follow them.
    let reordered = [
        ("vda", disks[2].1.handle()),
        ("vdb", disks[0].1.handle()),
        ("vdc", disks[1].1.handle()),
    ];
    let (mut console, notes) = boot(&reordered);
    assert_eq!(
        lines(&notes),
        [
            "config: vda generation 4",
            "config: disk vdb (serial serial-b) is now vdc",
            "config: disk vda (serial serial-a) is now vdb",
            "config: 3 of 3 devices active",
        ]
    );
    assert_eq!(
        lines(&run(&mut console, "table")),
        [
            "base: 0 4096 linear vdc 0",
            "scratch: 0 2048 linear vdb 100",
            "inner: 0 8 linear base 8",
        ]
    );
    drop(console);

    // A disk is missing: what is built on it stays inactive, the rest comes up.
    let partial = [("vda", disks[0].1.handle()), ("vdc", disks[2].1.handle())];
    let (mut console, notes) = boot(&partial);
    assert_eq!(
        lines(&notes),
        [
            "config: vdc generation 4",
            "config: disk vdb (serial serial-b) is missing",
            "config: base stays inactive: disk vdb is missing",
            "config: inner stays inactive: base is inactive",
            "config: 1 of 3 devices active",
        ]
    );
    assert_eq!(
        lines(&run(&mut console, "ls")),
        [
            "base     (linear, inactive)",
            "scratch  (linear)",
            "inner    (linear, inactive)",
        ]
    );
    assert_eq!(
        error(&mut console, "status base"),
        "error: base is inactive (disk vdb is missing)"
    );
    assert!(nbd_names(&console).eq(["scratch"]));
    // Changes made meanwhile keep the inactive devices and how to find their disk.
    ok(&mut console, "remove scratch");
    ok(&mut console, "create other --table \"0 16 linear vda 0\"");
    assert!(run(&mut console, "config show").contains("disk vdb: 65536 sectors, serial serial-b"));
    drop(console);

    let (mut console, notes) = boot(&disks);
    assert_eq!(
        notes,
        "config: vdc generation 6\r\nconfig: 3 of 3 devices active\r\n"
    );
    assert_eq!(
        lines(&run(&mut console, "table")),
        [
            "base: 0 4096 linear vdb 0",
            "inner: 0 8 linear base 8",
            "other: 0 16 linear vda 0",
        ]
    );
}

/// A disk whose power can be cut: once armed, the next write stores only its first
/// sector and every later write is lost, though all report success (the machine is
/// going down and never sees them fail).
struct PowerCutDisk {
    inner: MemDisk,
    armed: Rc<Cell<bool>>,
    dead: bool,
}

impl BlockDevice for PowerCutDisk {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn submit(&mut self, mut request: Request) -> Result<(), Busy> {
        if let Command::Write { sector, buf, .. } = &mut request.command {
            if self.dead {
                request.command = Command::Flush;
            } else if self.armed.get() {
                self.dead = true;
                let first = IoBuf::from_slice(&buf[..512]);
                request.command = Command::Write {
                    sector: *sector,
                    buf: first,
                    fua: true,
                };
            }
        }
        self.inner.submit(request)
    }
    fn poll(&mut self) -> Option<Completion> {
        self.inner.poll()
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}

#[test]
fn a_power_cut_during_a_configuration_update_falls_back_to_the_previous_copy() {
    let disks = machine();
    let armed = Rc::new(Cell::new(false));
    let mut console = console_over(
        FakePlatform::default(),
        alloc::vec![
            disk("vda", disks[0].1.handle()),
            disk("vdb", disks[1].1.handle()),
            disk(
                "vdc",
                PowerCutDisk {
                    inner: disks[2].1.handle(),
                    armed: Rc::clone(&armed),
                    dead: false,
                }
            ),
        ],
    );
    console.start(&mut String::new());
    ok(&mut console, "config init vdc");
    ok(&mut console, "create kept --table \"0 8 linear vda 0\"");
    ok(&mut console, "create second --table \"0 8 linear vda 8\"");
    armed.set(true);
    ok(&mut console, "create lost --table \"0 8 linear vda 16\"");
    drop(console);

    let (mut console, notes) = boot(&disks);
    assert_eq!(
        lines(&notes),
        [
            "config: vdc generation 3 (the other copy is damaged: payload fails its checksum)",
            "config: 2 of 2 devices active",
        ]
    );
    assert_eq!(
        lines(&run(&mut console, "ls")),
        ["kept    (linear)", "second  (linear)"]
    );
    assert!(lines(&run(&mut console, "config show"))[2].starts_with("copy 1: damaged"));
    // The next update overwrites the damaged copy and keeps generation 3 as fallback.
    ok(&mut console, "remove second");
    let shown = run(&mut console, "config show");
    assert_eq!(
        lines(&shown)[..3],
        [
            "configuration disk: vdc (first MiB), generation 4",
            "copy 0: generation 3",
            "copy 1: generation 4",
        ]
    );
}

#[test]
fn config_init_protects_data_and_devices() {
    let disks = machine();
    disks[2].1.write_at(4096, b"old label");
    let (mut console, _) = boot(&disks);
    ok(&mut console, "create a --table \"0 8 linear vda 0\"");
    assert_eq!(
        error(&mut console, "config init vda"),
        "error: vda is in use by a; the configuration area would shift its contents (choose a \
         disk no device uses)"
    );
    assert_eq!(
        error(&mut console, "config init vdc"),
        "error: vdc holds data in its first MiB (sector 8), which the configuration area would \
         overwrite; add --force to use it anyway"
    );
    assert_eq!(
        run(&mut console, "config show"),
        "no configuration disk: changes are not saved (config init DISK designates one)\r\n\
         disk vda: 131072 sectors, serial serial-a\r\n\
         create a --table \"0 8 linear vda 0\"\r\n"
    );
    assert_eq!(
        ok(&mut console, "config init vdc --force"),
        "configuration area written on vdc: its first MiB is reserved, vdc now offers 14336 \
         sectors; changes are saved from now on\r\n"
    );
    assert_eq!(
        error(&mut console, "config init vdb"),
        "error: the configuration already lives on vdc"
    );
    assert_eq!(
        lines(&run(&mut console, "config show")),
        [
            "configuration disk: vdc (first MiB), generation 1",
            "copy 0: generation 1",
            "copy 1: empty",
            "disk vda: 131072 sectors, serial serial-a",
            "create a --table \"0 8 linear vda 0\"",
        ]
    );
    // The configuration area is hidden: sector 0 of vdc is sector 2048 of the disk.
    ok(&mut console, "create tail --table \"0 14336 linear vdc 0\"");
    assert!(
        error(&mut console, "create big --table \"0 14337 linear vdc 0\"").contains("too small")
    );
}

#[test]
fn disk_test_runs_on_devices_and_refuses_disks_in_use() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "create t --table \"0 4096 linear vdb 8192\"");
    assert_eq!(
        error(&mut console, "disk-test vdb 1"),
        "error: disk-test: vdb is in use by t; testing it would destroy their data"
    );
    let out = ok(&mut console, "disk-test /dev/mapper/t 2");
    assert!(
        lines(&out)
            .last()
            .unwrap()
            .starts_with("disk-test t: OK, 2 MiB"),
        "{out}"
    );
    // The test wrote exactly the device's window of vdb.
    let mut byte = [0u8; 1];
    disks[1].1.read_at(8192 * 512 - 1, &mut byte);
    assert_eq!(byte, [0]);
    disks[1].1.read_at(8192 * 512, &mut byte);
    assert_ne!(byte, [0]);
    assert_eq!(
        error(&mut console, "disk-test t 3"),
        "error: disk-test: t holds only 2.00 MiB; choose at most 2 MiB"
    );
}

fn nbd_names(console: &Console<FakePlatform>) -> impl Iterator<Item = String> {
    nbd_backend(console)
        .exports()
        .into_iter()
        .map(|export| export.name)
}

fn read(backend: &mut dyn Backend, export: ExportHandle, sector: u64) -> Vec<u8> {
    match io(
        backend,
        export,
        99,
        IoOp::Read {
            sector,
            buf: IoBuf::with_sectors(1),
        },
    ) {
        Ok(IoOutput::Read { buf, zero_holes }) => {
            assert!(zero_holes.is_empty());
            buf.to_vec()
        }
        other => panic!("read failed: {other:?}"),
    }
}

#[test]
fn devices_are_nbd_exports() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    let mut backend = nbd_backend(&console);
    assert_eq!(backend.exports(), []);
    disks[1].1.write_at(512, b"base image");
    ok(
        &mut console,
        "create base --readonly --table \"0 4096 linear vdb 0\"",
    );
    ok(&mut console, "create guest --table \"0 2048 linear vda 0\"");
    let exports = backend.exports();
    assert_eq!(
        exports
            .iter()
            .map(|e| (e.name.as_str(), e.sectors, e.read_only))
            .collect::<Vec<_>>(),
        [("base", 4096, true), ("guest", 2048, false)]
    );
    assert_eq!(exports[0].description, "linear 0 4096 linear vdb 0");

    let (base, info) = backend.open("base").unwrap();
    assert!(info.read_only);
    assert_eq!(&read(&mut backend, base, 1)[..10], b"base image");
    let write = |sector| IoOp::Write {
        sector,
        buf: IoBuf::from_slice(&[7; 512]),
        fua: false,
    };
    assert_eq!(
        io(&mut backend, base, 1, write(0)).unwrap_err(),
        BackendError::ReadOnly
    );
    assert!(run(&mut console, "info base").contains("NBD export:        base (1 client)"));

    let (guest, _) = backend.open("guest").unwrap();
    io(&mut backend, guest, 2, write(5)).unwrap();
    assert_eq!(read(&mut backend, guest, 5), [7; 512]);

    // Suspended: I/O waits, resume releases it.
    ok(&mut console, "suspend guest");
    backend
        .submit(IoRequest {
            tag: 3,
            export: guest,
            op: IoOp::Flush,
        })
        .unwrap();
    assert!(backend.poll().is_none());
    ok(&mut console, "resume guest");
    let done = core::iter::repeat_with(|| backend.poll())
        .flatten()
        .next()
        .unwrap();
    assert_eq!(done.tag, 3);

    // Removal: refused while a client is connected, forced removal fails its I/O.
    assert_eq!(
        error(&mut console, "remove guest"),
        "error: guest has 1 NBD client connected (disconnect it or use remove --force)"
    );
    ok(&mut console, "suspend guest");
    backend
        .submit(IoRequest {
            tag: 4,
            export: guest,
            op: IoOp::Flush,
        })
        .unwrap();
    ok(&mut console, "remove guest --force");
    assert_eq!(
        backend.poll().unwrap().result.unwrap_err(),
        BackendError::Gone
    );
    assert_eq!(
        io(&mut backend, guest, 5, write(0)).unwrap_err(),
        BackendError::Gone
    );
    // A new device of the same name is not reachable through the old handle.
    ok(&mut console, "create guest --table \"0 2048 linear vda 0\"");
    assert_eq!(
        io(&mut backend, guest, 6, IoOp::Flush).unwrap_err(),
        BackendError::Gone
    );
    backend.close(guest);
    assert!(run(&mut console, "info guest").contains("(0 clients)"));
    assert!(backend.open("nothing").is_err());
    backend.close(base);
    ok(&mut console, "remove base");
    assert!(nbd_names(&console).eq(["guest"]));
}

#[test]
fn a_power_loss_at_any_point_of_an_update_leaves_the_old_or_the_new_configuration() {
    use blockdev::{CrashDisk, Unflushed};
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdc");
    ok(&mut console, "create kept --table \"0 8 linear vda 0\"");
    drop(console);
    let mut index = 0;
    loop {
        let config = CrashDisk::from_disk(&disks[2].1);
        let mut console = console_over(
            FakePlatform::default(),
            alloc::vec![
                disk("vda", disks[0].1.handle()),
                disk("vdb", disks[1].1.handle()),
                disk("vdc", config.handle()),
            ],
        );
        console.start(&mut String::new());
        let before = config.operations();
        config.fail_at(Some(before + index));
        let answer = run(&mut console, "create new --table \"0 8 linear vda 8\"");
        // The update is one FUA write: a power loss at it fails the command; once it
        // has completed, the new configuration is durable.
        let crashed = answer.starts_with("error:");
        assert_eq!(crashed, config.operations() == before, "{answer}");
        drop(console);
        let after = config.after_power_loss(Unflushed::Random(index));
        let rebooted = [
            ("vda", disks[0].1.handle()),
            ("vdb", disks[1].1.handle()),
            ("vdc", after),
        ];
        let (mut console, notes) = boot(&rebooted);
        let listed = run(&mut console, "ls");
        if crashed {
            assert!(
                answer.starts_with(
                    "error: saving the configuration on vdc failed, nothing was changed"
                ),
                "{answer}"
            );
            assert!(notes.starts_with("config: vdc generation 2"), "{notes}");
            assert_eq!(listed, "kept  (linear)\r\n");
        } else {
            assert!(notes.starts_with("config: vdc generation 3"), "{notes}");
            assert_eq!(listed, "kept  (linear)\r\nnew   (linear)\r\n");
            break;
        }
        index += 1;
    }
    assert!(index > 0, "the update was interrupted at least once");
}
