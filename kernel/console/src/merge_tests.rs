//! `snap merge` of thin snapshots through the console: online with NBD clients on
//! both devices, the refusals, a configuration without origin records, and the
//! merged state after a reboot.

use alloc::vec::Vec;
use blockdev::IoBuf;
use nbd::{Backend, BackendError, ExportHandle, IoOp, IoOutput};

use crate::tests::CLIENT;
use crate::tests::{boot, error, io, mem_disk, nbd_backend, ok};

/// 4 KiB pages of the 8 MiB volumes.
const PAGES: u64 = 2048;

fn write_page(backend: &mut dyn Backend, export: ExportHandle, page: u64, byte: u8) {
    let mut buf = IoBuf::with_sectors(8);
    buf.fill(byte);
    let op = IoOp::Write {
        sector: page * 8,
        buf,
        fua: false,
    };
    io(backend, export, 1, op).unwrap();
}

fn read_page(
    backend: &mut dyn Backend,
    export: ExportHandle,
    page: u64,
) -> Result<Vec<u8>, BackendError> {
    let op = IoOp::Read {
        sector: page * 8,
        buf: IoBuf::with_sectors(8),
    };
    match io(backend, export, 2, op)? {
        IoOutput::Read { buf, .. } => Ok(buf.to_vec()),
        other => panic!("{other:?}"),
    }
}

/// Every page of an export, one byte per page (pages are written whole).
fn pages(backend: &mut dyn Backend, export: ExportHandle) -> Vec<u8> {
    (0..PAGES)
        .map(|page| {
            let data = read_page(backend, export, page).unwrap();
            assert!(data.iter().all(|&b| b == data[0]), "page {page} is torn");
            data[0]
        })
        .collect()
}

#[test]
fn a_thin_snapshot_merges_into_its_origin_under_connected_clients_and_stays_merged() {
    let disks = alloc::vec![
        ("vda", mem_disk(16, "disk", "meta")),
        ("vdb", mem_disk(64, "disk", "data")),
        ("vdc", mem_disk(8, "disk", "image")),
        ("vdd", mem_disk(4, "disk", "config")),
    ];
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdd");
    ok(&mut console, "pool create pool vda vdb");
    ok(&mut console, "thin create vol pool --size 8M");
    let mut backend = nbd_backend(&console);
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    let mut expected_vol = alloc::vec![0u8; PAGES as usize];
    for page in (0..PAGES).step_by(3) {
        write_page(&mut backend, vol, page, 1);
        expected_vol[page as usize] = 1;
    }
    assert_eq!(
        ok(&mut console, "snap create snap vol"),
        "snap: snapshot 1 of thin device 0 in pool: 0 16384 thin pool 1\r\n"
    );
    let (snap, _) = backend.open("snap", CLIENT).unwrap();
    let mut expected_snap = expected_vol.clone();
    for page in (0..PAGES).step_by(5) {
        write_page(&mut backend, snap, page, 2);
        expected_snap[page as usize] = 2;
    }
    for page in (0..PAGES).step_by(7) {
        write_page(&mut backend, vol, page, 3);
        expected_vol[page as usize] = 3;
    }
    assert_eq!(pages(&mut backend, vol), expected_vol);
    let config = ok(&mut console, "config show");
    assert!(
        config.contains("\r\nthin device 1 of pool is a snapshot of thin device 0\r\n"),
        "{config}"
    );

    assert_eq!(
        ok(&mut console, "snap merge snap"),
        "snap: merged into vol (thin device 0 of pool now has snap's content); snap is removed\r\n"
    );
    // The origin's client reads the snapshot's content at once; the snapshot's
    // client is told the export is gone.
    assert_eq!(pages(&mut backend, vol), expected_snap);
    assert_eq!(read_page(&mut backend, snap, 0), Err(BackendError::Gone));
    write_page(&mut backend, vol, 1, 4);
    expected_snap[1] = 4;
    let listing = ok(&mut console, "ls");
    assert!(!listing.contains("snap"), "{listing}");
    let usage = ok(&mut console, "thin ls pool");
    assert!(usage.contains(" vol "), "{usage}");
    assert!(!usage.contains("snap"), "{usage}");
    let config = ok(&mut console, "config show");
    assert!(!config.contains("snapshot"), "{config}");
    drop(backend);
    drop(console);

    let (mut console, notes) = boot(&disks);
    assert!(!notes.contains("merg"), "{notes}");
    let mut backend = nbd_backend(&console);
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    assert_eq!(pages(&mut backend, vol), expected_snap);
    assert!(error(&mut console, "snap merge snap").contains("no device called 'snap'"));
}

#[test]
fn thin_merges_refuse_what_cannot_merge_and_name_the_target_when_unrecorded() {
    let disks = alloc::vec![
        ("vda", mem_disk(8, "disk", "meta")),
        ("vdb", mem_disk(32, "disk", "data")),
        ("vdc", mem_disk(8, "disk", "image")),
        ("vde", mem_disk(8, "disk", "meta2")),
        ("vdf", mem_disk(16, "disk", "data2")),
    ];
    let (mut console, _) = boot(&disks);
    ok(&mut console, "pool create pool vda vdb");
    ok(&mut console, "pool create other vde vdf");
    ok(&mut console, "thin create vol pool --size 8M");
    ok(&mut console, "thin create small pool --size 4M");
    ok(&mut console, "thin create far other --size 8M");
    ok(
        &mut console,
        "create image --table \"0 16384 linear vdc 0\"",
    );
    ok(&mut console, "thin create over pool --origin image");
    ok(&mut console, "snap create snap vol");
    ok(&mut console, "message pool 0 create_thin 9");
    ok(
        &mut console,
        "create frozen --readonly --table \"0 16384 thin pool 9\"",
    );
    let refusals = [
        (
            "snap merge image",
            "error: snap merge: image is a linear device, not a snapshot",
        ),
        (
            "snap merge snap --into image",
            "error: snap merge: image is a linear device, not a thin device",
        ),
        (
            "snap merge snap --into far",
            "error: snap merge: snap is in pool pool and far in pool other; only devices of one pool merge",
        ),
        (
            "snap merge snap --into small",
            "error: snap merge: snap has 16384 sectors and small 8192; only devices of the same size merge",
        ),
        (
            "snap merge snap --into over",
            "error: snap merge: snap reads unprovisioned blocks as zeros and over from image; only devices with the same external origin merge",
        ),
        (
            "snap merge snap --into frozen",
            "error: snap merge: frozen is read-only; it cannot take snap's content",
        ),
        (
            "snap merge snap --into snap",
            "error: snap merge: snap cannot be merged into itself",
        ),
        (
            "snap merge snap --onto vol",
            "error: usage: snap merge SNAPSHOT [--into THIN_DEVICE]",
        ),
    ];
    for (line, expected) in refusals {
        assert_eq!(error(&mut console, line), expected, "{line}");
    }
    let listing = ok(&mut console, "ls");
    assert!(listing.contains("snap"), "{listing}");

    // A snapshot made by messages (or before origins were recorded) needs --into.
    ok(&mut console, "message pool 0 create_snap 7 0");
    ok(&mut console, "create old --table \"0 16384 thin pool 7\"");
    assert_eq!(
        error(&mut console, "snap merge old"),
        "error: snap merge: the configuration does not say which device old is a snapshot of; name it with --into THIN"
    );
    ok(&mut console, "snap merge old --into vol");
    // The recorded origin of snap is still vol.
    ok(&mut console, "snap merge snap");
    let listing = ok(&mut console, "ls");
    assert!(
        !listing.contains("snap") && !listing.contains("old"),
        "{listing}"
    );
}

/// The image disk's first 8 MiB, one byte per page.
fn image_pages(image: &blockdev::MemDisk) -> Vec<u8> {
    let mut bytes = alloc::vec![0u8; (PAGES * 4096) as usize];
    image.read_at(0, &mut bytes);
    bytes.chunks(4096).map(|page| page[0]).collect()
}

#[test]
fn a_thin_device_merges_into_its_external_origin_while_serving_and_across_a_reboot() {
    let disks = alloc::vec![
        ("vda", mem_disk(8, "disk", "meta")),
        ("vdb", mem_disk(32, "disk", "data")),
        ("vdc", mem_disk(8, "disk", "image")),
        ("vdd", mem_disk(4, "disk", "config")),
        ("vde", mem_disk(8, "disk", "other")),
    ];
    let image = disks[2].1.handle();
    let mut model: Vec<u8> = (0..PAGES).map(|page| (page % 200) as u8 + 1).collect();
    for (page, &byte) in model.iter().enumerate() {
        image.write_at(page as u64 * 4096, &[byte; 4096]);
    }
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vdd");
    ok(&mut console, "pool create pool vda vdb");
    ok(
        &mut console,
        "create image --table \"0 16384 linear vdc 0\"",
    );
    ok(
        &mut console,
        "create frozen --readonly --table \"0 16384 linear vde 0\"",
    );
    ok(&mut console, "thin create vol pool --origin image");
    ok(&mut console, "thin create other pool --origin image");
    ok(&mut console, "thin create cold pool --origin frozen");
    ok(&mut console, "thin create plain pool --size 8M");
    let refusals = [
        (
            "thin merge-origin image",
            "error: thin merge-origin: image is a linear device, not a thin device",
        ),
        (
            "thin merge-origin plain",
            "error: thin merge-origin: plain has no external origin to merge into",
        ),
        (
            "thin merge-origin vol",
            "error: thin merge-origin: image is also used by other; merging would change what it reads",
        ),
        (
            "thin merge-origin cold",
            "error: thin merge-origin: frozen is read-only (created with --readonly); the merge writes to it",
        ),
    ];
    for (line, expected) in refusals {
        assert_eq!(error(&mut console, line), expected, "{line}");
    }
    ok(&mut console, "thin delete other");
    let mut backend = nbd_backend(&console);
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    let mut rng = fastrand::Rng::with_seed(8);
    for _ in 0..300 {
        let page = rng.u64(..PAGES);
        let byte = rng.u8(1..);
        write_page(&mut backend, vol, page, byte);
        model[page as usize] = byte;
    }
    assert_eq!(
        ok(&mut console, "thin merge-origin vol --background"),
        "vol: merging its blocks into image; it keeps serving I/O\r\n\
         vol: merging in the background (jobs shows it as merge-origin/vol)\r\n"
    );
    // Looked at without polling (which would let the merge go on).
    let jobs = console.dm.borrow().origin_merge_jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (jobs[0].id.as_str(), jobs[0].what.as_str(), jobs[0].unit),
        (
            "merge-origin/vol",
            "merge of vol into its external origin",
            "blocks"
        )
    );
    assert!(jobs[0].done < jobs[0].total, "{:?}", jobs[0]);
    assert_eq!(
        console.dm.borrow().thin_link_lines(),
        ["thin device 0 of pool is being merged into its external origin"]
    );
    // A reboot in the middle: the merge starts again and completes.
    drop(backend);
    drop(console);
    let (mut console, notes) = boot(&disks);
    assert!(
        notes.contains("config: vol: merging into its origin again"),
        "{notes}"
    );
    let mut backend = nbd_backend(&console);
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    // Writes and reads while the merge runs, then only reads until it is done (a
    // write after it finished would be an ordinary write again).
    let mut events = alloc::string::String::new();
    let mut writes_during = 0;
    for round in 0..10_000 {
        let jobs = ok(&mut console, "jobs");
        events.push_str(&jobs);
        if jobs.contains("no background jobs") {
            break;
        }
        // Checked without polling: once a write is in the pool, the merge cannot
        // finish before it has copied that block again.
        for _ in 0..4 {
            if round >= 40 || console.dm.borrow().origin_merge_jobs().is_empty() {
                break;
            }
            let page = rng.u64(..PAGES);
            let byte = rng.u8(1..);
            write_page(&mut backend, vol, page, byte);
            model[page as usize] = byte;
            writes_during += 1;
        }
        let check = rng.u64(..PAGES);
        let data = read_page(&mut backend, vol, check).unwrap();
        assert!(
            data.iter().all(|&b| b == model[check as usize]),
            "page {check}"
        );
    }
    assert!(
        writes_during >= 4,
        "only {writes_during} writes during the merge"
    );
    assert!(
        events.contains("pool: thin device 0 is merged into its origin ("),
        "{events}"
    );
    assert_eq!(pages(&mut backend, vol), model);
    assert_eq!(image_pages(&image), model);
    let status = ok(&mut console, "status vol");
    assert_eq!(status, "0 16384 thin 0 -\r\n");
    let config = ok(&mut console, "config show");
    assert!(
        !config.contains("merged into its external origin"),
        "{config}"
    );
}

/// Console, NBD backend and export of a thin volume `vol` over external origin
/// `image` (vdc), whose pages hold `model`; `writes` random pages are written to
/// `vol` (and to `model`).
fn origin_merge_setup(
    disks: &[(&str, blockdev::MemDisk)],
    model: &mut [u8],
    writes: usize,
) -> (
    crate::Console<crate::tests::FakePlatform>,
    dm::NbdBackend,
    ExportHandle,
) {
    let image = disks[2].1.handle();
    for (page, &byte) in model.iter().enumerate() {
        image.write_at(page as u64 * 4096, &[byte; 4096]);
    }
    let (mut console, _) = boot(disks);
    ok(&mut console, "pool create pool vda vdb");
    ok(
        &mut console,
        "create image --table \"0 16384 linear vdc 0\"",
    );
    ok(&mut console, "thin create vol pool --origin image");
    let mut backend = nbd_backend(&console);
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    write_random_pages(&mut backend, vol, model, writes, 5);
    (console, backend, vol)
}

fn write_random_pages(
    backend: &mut dyn Backend,
    vol: ExportHandle,
    model: &mut [u8],
    writes: usize,
    seed: u64,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    for _ in 0..writes {
        let page = rng.u64(..PAGES);
        let byte = rng.u8(1..);
        write_page(backend, vol, page, byte);
        model[page as usize] = byte;
    }
}

#[test]
fn a_followed_merge_into_the_origin_prints_progress_until_done_and_ctrl_c_detaches() {
    let disks = alloc::vec![
        ("vda", mem_disk(8, "disk", "meta")),
        ("vdb", mem_disk(32, "disk", "data")),
        ("vdc", mem_disk(8, "disk", "image")),
    ];
    let image = disks[2].1.handle();
    let mut model: Vec<u8> = (0..PAGES).map(|page| (page % 97) as u8 + 1).collect();
    let (mut console, mut backend, vol) = origin_merge_setup(&disks, &mut model, 400);

    let out = ok(&mut console, "thin merge-origin vol");
    let printed = crate::tests::lines(&out);
    assert_eq!(
        printed.first(),
        Some(&"vol: merging its blocks into image; it keeps serving I/O"),
        "{out}"
    );
    assert_eq!(
        printed.last(),
        Some(&"vol: merged into image; it maps nothing now"),
        "{out}"
    );
    let progress: Vec<&&str> = printed
        .iter()
        .filter(|line| line.starts_with("vol: merge of vol into its external origin: "))
        .collect();
    assert!(!progress.is_empty(), "no progress line: {out}");
    assert!(
        progress.iter().all(|line| line.contains(" blocks), ")),
        "{out}"
    );
    assert!(out.contains("event: pool: thin device 0 is merged into its origin ("));
    assert_eq!(image_pages(&image), model);

    // Followed again, and detached with Ctrl-C: the merge goes on.
    write_random_pages(&mut backend, vol, &mut model, 400, 6);
    let mut out = alloc::string::String::new();
    for byte in b"thin merge-origin vol\r" {
        console.input(*byte, &mut out);
    }
    assert!(console.busy());
    console.input(0x03, &mut out);
    while console.poll(&mut out) {}
    assert!(
        out.contains(
            "vol: detached; the merge of vol into its external origin goes on in the \
             background (jobs shows it as merge-origin/vol)\r\n"
        ),
        "{out}"
    );
    assert!(!out.contains("merged into image"), "{out}");
    while !ok(&mut console, "jobs").contains("no background jobs") {}
    assert_eq!(pages(&mut backend, vol), model);
    assert_eq!(image_pages(&image), model);
}

/// A merge into a device whose old content is too large to release at once: `jobs`
/// shows the release for what it is, and it cannot be cancelled.
#[test]
fn the_release_of_an_old_content_is_labelled_as_such_in_jobs() {
    const MAPPINGS: u64 = 20_000;
    let meta = mem_disk(16, "disk", "meta");
    let data = mem_disk(MAPPINGS / 16 + 64, "disk", "data");
    {
        let options = persistent_data::thin::OpenOptions::new(128);
        let (mut md, _) = persistent_data::thin::ThinMetadata::open(
            alloc::boxed::Box::new(meta.handle()),
            &options,
        )
        .unwrap();
        md.resize_data(MAPPINGS + 1024).unwrap();
        md.create_thin(0).unwrap();
        md.create_thin(1).unwrap();
        for vblock in 0..MAPPINGS {
            let block = md.alloc_data_block().unwrap();
            md.insert(0, vblock, block).unwrap();
        }
        md.commit().unwrap();
    }
    let disks = alloc::vec![("vda", meta), ("vdb", data)];
    let (mut console, _) = boot(&disks);
    let sectors = MAPPINGS * 128;
    ok(
        &mut console,
        &alloc::format!(
            "create pool --table \"0 {} thin-pool vda vdb 128 0\"",
            (MAPPINGS + 1024) * 128
        ),
    );
    ok(
        &mut console,
        &alloc::format!("create vol --table \"0 {sectors} thin pool 0\""),
    );
    ok(
        &mut console,
        &alloc::format!("create other --table \"0 {sectors} thin pool 1\""),
    );
    let merged = ok(&mut console, "snap merge other --into vol");
    assert!(
        merged.ends_with(
            "pool: releasing the blocks of vol's old content in the background (jobs shows it as pool/0-replaced)\r\n"
        ),
        "{merged}"
    );
    let jobs = ok(&mut console, "jobs");
    assert!(
        jobs.starts_with(
            "pool/0-replaced  pool: release of the old content of vol (thin device 0), replaced by a snapshot merge, "
        ),
        "{jobs}"
    );
    assert_eq!(
        error(&mut console, "jobs cancel pool/0-replaced"),
        "error: pool/0-replaced cannot be cancelled: the merge is done and only the blocks of the old content are left to release; it finishes on its own"
    );
    let mut printed = alloc::string::String::new();
    loop {
        let jobs = ok(&mut console, "jobs");
        printed.push_str(&jobs);
        if jobs.contains("no background jobs") {
            break;
        }
    }
    assert!(
        printed.contains(
            "event: pool: thin device 0 merged: the blocks of its content before the merge are released"
        ),
        "{printed}"
    );
    let status = ok(&mut console, "status pool");
    assert_eq!(
        status.split_whitespace().nth(5),
        Some("0/21024"),
        "{status}"
    );
}
