//! COW snapshots through the console: the LVM-named stack under a linear volume whose
//! NBD client stays connected, a merge while the client writes, a merge resumed after
//! a reboot, `snap remove`, and the refusals.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{IoBuf, MemDisk};
use nbd::{Backend, ExportHandle, IoOp, IoOutput};

use crate::tests::CLIENT;
use crate::tests::{boot, error, io, lines, mem_disk, nbd_backend, ok, run};

/// 4 MiB volume.
const SECTORS: u64 = 8192;

fn machine() -> Vec<(&'static str, MemDisk)> {
    alloc::vec![
        ("vda", mem_disk(8, "disk", "serial-a")),
        ("vdb", mem_disk(4, "disk", "serial-b")),
        ("vdc", mem_disk(2, "disk", "serial-c")),
    ]
}

fn pattern(seed: u64, sectors: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = alloc::vec![0u8; sectors as usize * 512];
    rng.fill(&mut out);
    out
}

fn write(backend: &mut dyn Backend, export: ExportHandle, sector: u64, data: &[u8]) {
    let op = IoOp::Write {
        sector,
        buf: IoBuf::from_slice(data),
        fua: false,
    };
    io(backend, export, 1, op).expect("write");
}

fn read_all(backend: &mut dyn Backend, export: ExportHandle) -> Vec<u8> {
    let op = IoOp::Read {
        sector: 0,
        buf: IoBuf::with_sectors(SECTORS as usize),
    };
    match io(backend, export, 2, op) {
        Ok(IoOutput::Read { buf, .. }) => buf.to_vec(),
        other => panic!("read: {other:?}"),
    }
}

/// A volume with data and a snapshot of it on vdb; returns the snapshot's view.
fn volume_with_snapshot(console: &mut crate::Console<crate::tests::FakePlatform>) -> Vec<u8> {
    ok(console, "config init vdc");
    ok(
        console,
        &format!("create vol --table \"0 {SECTORS} linear vda 0\""),
    );
    let mut backend = nbd_backend(console);
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    write(&mut backend, vol, 0, &pattern(1, SECTORS));
    assert_eq!(
        ok(console, "snap create snap vol --cow vdb"),
        "snap: snapshot of vol on vdb: 0 8192 snapshot vol-real vdb P 8\r\n"
    );
    let view = read_all(&mut backend, vol);
    // The client wrote through the whole change and goes on: the snapshot keeps
    // the old data.
    for k in 0..100u64 {
        write(&mut backend, vol, (k * 80) % SECTORS, &pattern(10 + k, 8));
    }
    let (snap, _) = backend.open("snap", CLIENT).unwrap();
    assert_eq!(read_all(&mut backend, snap), view);
    backend.close(snap, CLIENT);
    backend.close(vol, CLIENT);
    view
}

#[test]
fn snapshot_stack_has_lvms_names_and_the_client_stays_connected() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    let mut backend = nbd_backend(&console);
    volume_with_snapshot(&mut console);
    assert_eq!(
        lines(&run(&mut console, "ls")),
        [
            "vol       (snapshot-origin)",
            "vol-real  (linear)",
            "snap      (snapshot)"
        ]
    );
    assert_eq!(
        lines(&run(&mut console, "table")),
        [
            "vol: 0 8192 snapshot-origin vol-real",
            "vol-real: 0 8192 linear vda 0",
            "snap: 0 8192 snapshot vol-real vdb P 8",
        ]
    );
    assert_eq!(
        run(&mut console, "status snap"),
        "0 8192 snapshot 816/8192 16\r\n"
    );
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    let before = read_all(&mut backend, vol);
    assert_eq!(
        ok(&mut console, "snap remove snap"),
        "snap removed\r\nvol: has no snapshots left: 0 8192 linear vda 0\r\n"
    );
    assert_eq!(lines(&run(&mut console, "ls")), ["vol  (linear)"]);
    assert_eq!(read_all(&mut backend, vol), before);
}

#[test]
fn merge_while_the_client_writes_then_the_volume_is_linear_again() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    let mut view = volume_with_snapshot(&mut console);
    let mut backend = nbd_backend(&console);
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    assert_eq!(
        ok(&mut console, "snap merge snap --background"),
        "snap: merging into vol (100 chunks); snap removed\r\n\
         vol: merging in the background (jobs shows it as merge/vol)\r\n"
    );
    assert!(
        ok(&mut console, "jobs")
            .starts_with("merge/vol  vol: merge of snapshot COW vdb into vol, ")
    );
    assert_eq!(
        read_all(&mut backend, vol),
        view,
        "the snapshot's content at once"
    );
    let mut round = 0u64;
    let mut events = String::new();
    loop {
        let jobs = ok(&mut console, "jobs");
        events.push_str(&jobs);
        if jobs.contains("no background jobs") {
            break;
        }
        let sector = (round * 136 + 3) % (SECTORS - 8);
        let data = pattern(500 + round, 8);
        write(&mut backend, vol, sector, &data);
        view[sector as usize * 512..][..data.len()].copy_from_slice(&data);
        assert!(read_all(&mut backend, vol) == view, "round {round}");
        round += 1;
        assert!(round < 1000);
    }
    assert!(round > 2, "the merge took several steps ({round})");
    assert_eq!(lines(&run(&mut console, "ls")), ["vol  (linear)"]);
    assert_eq!(run(&mut console, "table vol"), "0 8192 linear vda 0\r\n");
    assert!(read_all(&mut backend, vol) == view);
    let mut on_disk = alloc::vec![0u8; view.len()];
    disks[0].1.read_at(0, &mut on_disk);
    assert!(on_disk == view);
}

#[test]
fn a_merge_cut_by_a_reboot_resumes_and_completes() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    let view = volume_with_snapshot(&mut console);
    ok(&mut console, "snap merge snap --background");
    ok(&mut console, "jobs");
    let table = run(&mut console, "table");
    assert_eq!(
        lines(&table),
        [
            "vol: 0 8192 snapshot-merge vol-real vdb P 8",
            "vol-real: 0 8192 linear vda 0"
        ]
    );
    drop(console);
    let (mut console, notes) = boot(&disks);
    assert!(notes.contains("2 of 2 devices active"), "{notes}");
    let mut backend = nbd_backend(&console);
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    assert!(read_all(&mut backend, vol) == view);
    let mut polls = 0;
    while !ok(&mut console, "jobs").contains("no background jobs") {
        polls += 1;
        assert!(polls < 1000);
    }
    assert_eq!(run(&mut console, "table"), "vol: 0 8192 linear vda 0\r\n");
    assert!(read_all(&mut backend, vol) == view);
}

#[test]
fn a_merge_is_followed_until_complete() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    volume_with_snapshot(&mut console);
    let out = ok(&mut console, "snap merge snap");
    let printed = lines(&out);
    assert_eq!(
        printed[0],
        "snap: merging into vol (100 chunks); snap removed"
    );
    // The first step ran before the first progress line.
    assert!(
        printed[1].starts_with("vol: merge of snapshot COW vdb into vol: 1% (1 of 100 chunks), "),
        "{out}"
    );
    assert!(out.contains("event: vol: merge finished\r\n"), "{out}");
    assert!(
        out.contains("event: vol: merge complete, back on its table: 0 8192 linear vda 0\r\n"),
        "{out}"
    );
    assert!(out.ends_with("vol: merge complete\r\n"), "{out}");
}

#[test]
fn refusals_are_one_error_line_and_change_nothing() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "create vol --table \"0 8192 linear vda 0\"");
    ok(&mut console, "create small --table \"0 48 linear vdb 0\"");
    ok(
        &mut console,
        "create cow --table \"0 4096 linear vdb 1024\"",
    );
    let tables = run(&mut console, "table");
    let cases = [
        (
            "snap create s vda --cow cow",
            "disk vda is in use by vol; snapshot the device that uses it",
        ),
        (
            "snap create s vol --cow cow --chunk-size 24",
            "chunk size '24' must be a power of 2",
        ),
        ("snap create s vol --cow vdb", "vdb is in use by small, cow"),
        (
            "snap create s vol --cow vol",
            "the COW device cannot be the origin",
        ),
        (
            "snap create s vol --cow small --chunk-size 32",
            "COW device too small",
        ),
        (
            "snap create s vol --cow nothing",
            "unknown disk or device 'nothing'",
        ),
        (
            "snap create s vol",
            "vol is a linear device; snapshots are taken of thin devices",
        ),
    ];
    for (line, reason) in cases {
        let text = error(&mut console, line);
        assert!(text.contains(reason), "{line}: {text}");
        assert_eq!(run(&mut console, "table"), tables, "{line} changed nothing");
    }
    disks[1].1.write_at(1024 * 512, b"old data");
    let text = error(&mut console, "snap create s vol --cow cow");
    assert!(
        text.contains("cow holds data (its first 4 KiB are not zero); --force"),
        "{text}"
    );
    ok(&mut console, "snap create s vol --cow cow --force");
    // A full COW invalidates the snapshot; it cannot be merged.
    ok(&mut console, "snap create tiny vol --cow small");
    let mut backend = nbd_backend(&console);
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    for chunk in 0..8u64 {
        write(&mut backend, vol, chunk * 8, &pattern(chunk, 8));
    }
    let status = run(&mut console, "status tiny");
    assert!(
        status.starts_with("0 8192 snapshot Invalid\r\n"),
        "{status}"
    );
    assert!(
        status.ends_with("event: tiny: snapshot invalidated: Unable to allocate exception.\r\n"),
        "{status}"
    );
    let text = error(&mut console, "snap merge tiny");
    assert!(text.contains("tiny is invalid"), "{text}");
    ok(&mut console, "snap merge s --background");
    // The merge of s ends while the refusal is printed; tiny keeps vol stacked.
    let text = run(&mut console, "snap merge tiny");
    assert!(
        text.starts_with("error: snap merge: tiny is invalid"),
        "{text}"
    );
    assert!(
        text.contains(
            "event: vol: merge complete, back on its table: 0 8192 snapshot-origin vol-real"
        ),
        "{text}"
    );
}

#[test]
fn a_bare_disk_gets_a_linear_origin_device_stacked_as_lvm_would() {
    let disks = machine();
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdc");
    disks[1].1.write_at(0, &pattern(1, SECTORS));
    assert_eq!(
        ok(&mut console, "snap create snap vdb --cow vda"),
        "snap: snapshot of vdb-origin on vda: 0 8192 snapshot vdb-origin-real vda P 8\r\n"
    );
    assert_eq!(
        lines(&run(&mut console, "table")),
        [
            "vdb-origin: 0 8192 snapshot-origin vdb-origin-real",
            "vdb-origin-real: 0 8192 linear vdb 0",
            "snap: 0 8192 snapshot vdb-origin-real vda P 8",
        ]
    );
    let text = error(&mut console, "snap create again vdb --cow vda");
    assert!(
        text.contains(
            "disk vdb is in use by vdb-origin-real; snapshot the device that uses it (vdb-origin)"
        ),
        "{text}"
    );
    let mut backend = nbd_backend(&console);
    let (origin, _) = backend.open("vdb-origin", CLIENT).unwrap();
    let mut now = pattern(1, SECTORS);
    for k in 0..20u64 {
        let data = pattern(100 + k, 8);
        let sector = k * 200;
        write(&mut backend, origin, sector, &data);
        now[sector as usize * 512..][..data.len()].copy_from_slice(&data);
    }
    let (snap, _) = backend.open("snap", CLIENT).unwrap();
    assert!(read_all(&mut backend, snap) == pattern(1, SECTORS));
    assert!(read_all(&mut backend, origin) == now);
    backend.close(snap, CLIENT);
    // The stack survives a reboot; a merge takes the disk back to the snapshot and
    // leaves the origin device linear over all of it, under the same name.
    drop(console);
    let (mut console, notes) = boot(&disks);
    assert!(notes.contains("3 of 3 devices active"), "{notes}");
    let mut backend = nbd_backend(&console);
    let (origin, _) = backend.open("vdb-origin", CLIENT).unwrap();
    assert!(read_all(&mut backend, origin) == now);
    let out = ok(&mut console, "snap merge snap");
    assert!(
        out.contains(
            "event: vdb-origin: merge complete, back on its table: 0 8192 linear vdb 0\r\n"
        ),
        "{out}"
    );
    assert_eq!(lines(&run(&mut console, "ls")), ["vdb-origin  (linear)"]);
    assert!(read_all(&mut backend, origin) == pattern(1, SECTORS));
    let mut on_disk = alloc::vec![0u8; SECTORS as usize * 512];
    disks[1].1.read_at(0, &mut on_disk);
    assert!(on_disk == pattern(1, SECTORS));
}
