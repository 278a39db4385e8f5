//! The snapshot targets in the device table, driven as LVM drives dm: a snapshot
//! added under a live origin, origin writes copied out, the merge hand-over
//! (suspend, load `snapshot-merge`, suspend the snapshot, resume), the merge stepped
//! by `tick` while an NBD client writes, a merge resumed after a power cut, and the
//! refusals with dm's messages.

use std::cell::RefCell;
use std::rc::Rc;

use blockdev::{BlockDevice, Busy, Command, Completion, DeviceInfo, IoBuf, MemDisk, Request};
use dm::{DeviceMapper, Disk, Format};
use nbd::{Backend, BackendError, ExportHandle, IoCompletion, IoOp, IoOutput, IoRequest};

/// The address NBD clients of these tests connect from.
const CLIENT: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

const SECTORS: u64 = 4096;

fn mapper(disks: &[(&str, &MemDisk)]) -> DeviceMapper {
    DeviceMapper::new(
        disks
            .iter()
            .map(|(name, disk)| Disk {
                name: name.to_string(),
                device: Box::new(disk.handle()),
            })
            .collect(),
    )
}

fn run(dm: &mut DeviceMapper, export: ExportHandle, op: IoOp) -> Result<IoOutput, BackendError> {
    dm.submit(IoRequest { tag: 7, export, op }).expect("room");
    loop {
        if let Some(done) = dm.poll() {
            return done.result;
        }
        dm.tick(&|| 0);
    }
}

fn write(dm: &mut DeviceMapper, export: ExportHandle, sector: u64, data: &[u8]) {
    let op = IoOp::Write {
        sector,
        buf: IoBuf::from_slice(data),
        fua: false,
    };
    run(dm, export, op).expect("write");
}

fn read(dm: &mut DeviceMapper, export: ExportHandle, sector: u64, sectors: usize) -> Vec<u8> {
    let op = IoOp::Read {
        sector,
        buf: IoBuf::with_sectors(sectors),
    };
    match run(dm, export, op) {
        Ok(IoOutput::Read { buf, .. }) => buf.to_vec(),
        other => panic!("read: {other:?}"),
    }
}

fn status(dm: &DeviceMapper, name: &str) -> String {
    dm.status_lines(dm.device(name).unwrap()).join("\n")
}

/// Pseudo-random bytes from `seed`.
fn pattern(seed: u64, sectors: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = vec![0u8; sectors as usize * 512];
    rng.fill(&mut out);
    out
}

/// `base` (linear over vda) with data, then LVM's snapshot set-up with COW vdb.
fn with_snapshot(origin: &MemDisk, cow: &MemDisk) -> (DeviceMapper, ExportHandle) {
    with_snapshot_args(origin, cow, "P 8")
}

/// [`with_snapshot`] whose snapshot table ends with `args` (store, chunk, features).
fn with_snapshot_args(origin: &MemDisk, cow: &MemDisk, args: &str) -> (DeviceMapper, ExportHandle) {
    origin.write_at(0, &pattern(1, SECTORS));
    let mut dm = mapper(&[("vda", origin), ("vdb", cow)]);
    dm.create("base", false, "0 4096 linear vda 0", Format::IfBlank)
        .unwrap();
    let (client, _) = dm.open("base", CLIENT).unwrap();
    dm.create("base-real", false, "0 4096 linear vda 0", Format::IfBlank)
        .unwrap();
    dm.suspend("base").unwrap();
    dm.create(
        "snap",
        false,
        &format!("0 4096 snapshot base-real vdb {args}"),
        Format::IfBlank,
    )
    .unwrap();
    dm.reload("base", "0 4096 snapshot-origin /dev/mapper/base-real")
        .unwrap();
    dm.resume("base").unwrap();
    (dm, client)
}

#[test]
fn origin_writes_copy_out_and_the_snapshot_keeps_the_old_data() {
    let (origin, cow) = (MemDisk::new(SECTORS), MemDisk::new(2048));
    let (mut dm, client) = with_snapshot(&origin, &cow);
    assert_eq!(status(&dm, "snap"), "0 4096 snapshot 16/2048 16");
    assert_eq!(status(&dm, "base"), "0 4096 snapshot-origin");
    assert_eq!(
        dm.device("base").unwrap().table().to_string(),
        "0 4096 snapshot-origin base-real"
    );
    write(&mut dm, client, 12, &pattern(2, 16));
    assert_eq!(status(&dm, "snap"), "0 4096 snapshot 40/2048 16");
    let (snap, _) = dm.open("snap", CLIENT).unwrap();
    assert_eq!(read(&mut dm, snap, 0, 64), pattern(1, 64));
    assert_eq!(read(&mut dm, client, 12, 16), pattern(2, 16));
    write(&mut dm, snap, 96, &pattern(3, 8));
    assert_eq!(read(&mut dm, snap, 96, 8), pattern(3, 8));
    assert_eq!(status(&dm, "snap"), "0 4096 snapshot 48/2048 16");
    let mut on_disk = vec![0u8; 4096];
    origin.read_at(96 * 512, &mut on_disk);
    assert_eq!(on_disk, pattern(1, SECTORS)[96 * 512..104 * 512]);
}

#[test]
fn merge_hand_over_runs_in_the_background_while_the_client_writes() {
    let (origin, cow) = (MemDisk::new(SECTORS), MemDisk::new(2048));
    let (mut dm, client) = with_snapshot(&origin, &cow);
    let (snap, _) = dm.open("snap", CLIENT).unwrap();
    let mut view = pattern(1, SECTORS);
    for k in 0..40u64 {
        let sector = (k * 56) % SECTORS;
        write(&mut dm, client, sector, &pattern(10 + k, 8));
        write(
            &mut dm,
            snap,
            (k * 24 + 1000) % SECTORS,
            &pattern(100 + k, 8),
        );
        let at = ((k * 24 + 1000) % SECTORS) as usize * 512;
        view[at..at + 4096].copy_from_slice(&pattern(100 + k, 8));
    }
    let mut view_now = read(&mut dm, snap, 0, SECTORS as usize);
    assert_eq!(view_now, view);
    let before = status(&dm, "snap");
    let allocated: u64 = before["0 4096 snapshot ".len()..]
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let exceptions = allocated / 8 - 2;
    dm.suspend("base").unwrap();
    dm.reload("base", "0 4096 snapshot-merge base-real vdb P 8")
        .unwrap();
    let refused = dm.resume("base").unwrap_err();
    assert!(
        refused
            .0
            .contains("Unable to perform snapshot handover until source is suspended"),
        "{refused:?}"
    );
    dm.suspend("base").unwrap();
    dm.suspend("snap").unwrap();
    dm.resume("base").unwrap();
    dm.resume("snap").unwrap();
    assert_eq!(status(&dm, "snap"), "0 4096 snapshot Invalid");
    let failed = run(
        &mut dm,
        snap,
        IoOp::Read {
            sector: 0,
            buf: IoBuf::with_sectors(8),
        },
    );
    assert!(matches!(failed, Err(BackendError::Io(_))), "{failed:?}");
    let jobs = dm.snapshot_merges();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (jobs[0].id.as_str(), jobs[0].unit),
        ("merge/base", "chunks")
    );
    assert_eq!((jobs[0].done, jobs[0].total), (0, exceptions));
    // The client sees the snapshot's content at once and writes during the merge.
    assert_eq!(read(&mut dm, client, 0, SECTORS as usize), view);
    let mut events = Vec::new();
    let mut round = 0u64;
    while !dm.snapshot_merge_finished("base") {
        events.extend(dm.tick(&|| 0));
        let sector = (round * 40 + 7) % (SECTORS - 8);
        let data = pattern(1000 + round, 8);
        write(&mut dm, client, sector, &data);
        view[sector as usize * 512..][..4096].copy_from_slice(&data);
        view_now = read(&mut dm, client, 0, SECTORS as usize);
        assert!(
            view_now == view,
            "round {round}: the origin shows the snapshot"
        );
        round += 1;
        assert!(round < 10_000, "the merge ends");
    }
    events.extend(dm.tick(&|| 0));
    assert_eq!(events, ["base: merge finished"]);
    assert_eq!(status(&dm, "base"), "0 4096 snapshot-merge 16/2048 16");
    // LVM's end of a merge: the origin back on a plain table.
    dm.remove("snap", true).unwrap();
    dm.suspend("base").unwrap();
    dm.reload("base", "0 4096 linear vda 0").unwrap();
    dm.resume("base").unwrap();
    dm.remove("base-real", false).unwrap();
    assert_eq!(read(&mut dm, client, 0, SECTORS as usize), view);
    let mut on_disk = vec![0u8; SECTORS as usize * 512];
    origin.read_at(0, &mut on_disk);
    assert!(on_disk == view);
}

#[test]
fn a_merge_cut_by_a_reboot_resumes_at_activation() {
    let (origin, cow) = (MemDisk::new(SECTORS), MemDisk::new(2048));
    let (mut dm, _) = with_snapshot(&origin, &cow);
    let (snap, _) = dm.open("snap", CLIENT).unwrap();
    for k in 0..200u64 {
        write(&mut dm, snap, k * 72 % SECTORS, &pattern(k, 8));
    }
    let view = read(&mut dm, snap, 0, SECTORS as usize);
    dm.suspend("base").unwrap();
    dm.suspend("snap").unwrap();
    dm.reload("base", "0 4096 snapshot-merge base-real vdb P 8")
        .unwrap();
    dm.resume("base").unwrap();
    dm.tick(&|| 0);
    let progress = dm.snapshot_merges()[0].clone();
    assert!(
        progress.done > 0 && progress.done < progress.total,
        "{progress:?}"
    );
    drop(dm);
    // After the reboot the origin is loaded directly as snapshot-merge.
    let mut dm = mapper(&[("vda", &origin), ("vdb", &cow)]);
    dm.create("base-real", false, "0 4096 linear vda 0", Format::IfBlank)
        .unwrap();
    dm.create(
        "base",
        false,
        "0 4096 snapshot-merge base-real vdb P 0",
        Format::IfBlank,
    )
    .unwrap();
    let (client, _) = dm.open("base", CLIENT).unwrap();
    assert_eq!(read(&mut dm, client, 0, SECTORS as usize), view);
    let mut ticks = 0;
    while !dm.snapshot_merge_finished("base") {
        dm.tick(&|| 0);
        ticks += 1;
        assert!(ticks < 1000);
    }
    let mut on_disk = vec![0u8; SECTORS as usize * 512];
    origin.read_at(0, &mut on_disk);
    assert!(on_disk == view);
}

fn create_error(dm: &mut DeviceMapper, name: &str, line: &str) -> String {
    let error = dm.create(name, false, line, Format::IfBlank).unwrap_err().0;
    assert!(dm.device(name).is_err(), "{name} was not created");
    error
}

#[test]
fn bad_tables_are_refused_with_dms_reasons() {
    let (origin, cow, small) = (MemDisk::new(SECTORS), MemDisk::new(2048), MemDisk::new(8));
    let mut dm = mapper(&[("vda", &origin), ("vdb", &cow), ("vdc", &small)]);
    let cases = [
        ("0 4096 snapshot vda vdb P", "requires 4 or more arguments"),
        (
            "0 4096 snapshot vda vdb P 24",
            "Chunk size is not a power of 2",
        ),
        (
            "0 4096 snapshot vda vdb P 4194304",
            "Chunk size is too high",
        ),
        ("0 4096 snapshot vda vdb N 0", "Chunk size not set"),
        (
            "0 4096 snapshot vda /dev/vda P 8",
            "COW device cannot be the same as origin",
        ),
        (
            "0 4096 snapshot-origin vda vdb",
            "origin: incorrect number of arguments",
        ),
        (
            "0 4096 snapshot-merge vda vdb N 8",
            "does not support snapshot-merge",
        ),
        ("0 4096 snapshot vda vdc P 8", "COW device too small"),
        (
            "0 4096 snapshot vda nothing P 8",
            "no disk or device is called 'nothing'",
        ),
        (
            "0 8192 snapshot vda vdb P 8",
            "vda is too small for this table",
        ),
    ];
    for (line, reason) in cases {
        let error = create_error(&mut dm, "s", line);
        assert!(error.contains(reason), "{line}: {error}");
    }
    cow.write_at(0, b"XFSB");
    let error = create_error(&mut dm, "s", "0 4096 snapshot vda vdb P 8");
    assert!(error.contains("Invalid or corrupt snapshot"), "{error}");
}

#[test]
fn a_second_merge_and_a_merge_of_an_invalid_snapshot_are_refused() {
    let (origin, cow, cow2) = (
        MemDisk::new(SECTORS),
        MemDisk::new(2048),
        MemDisk::new(2048),
    );
    let mut dm = mapper(&[("vda", &origin), ("vdb", &cow), ("vdc", &cow2)]);
    dm.create("base-real", false, "0 4096 linear vda 0", Format::IfBlank)
        .unwrap();
    dm.create(
        "m1",
        false,
        "0 4096 snapshot-merge base-real vdb P 8",
        Format::IfBlank,
    )
    .unwrap();
    let error = create_error(&mut dm, "m2", "0 4096 snapshot-merge base-real vdc P 8");
    assert!(error.contains("A snapshot is already merging"), "{error}");
    dm.remove("m1", false).unwrap();
    cow2.write_at(0, b"SnAp\0\0\0\0\x01\0\0\0\x08\0\0\0");
    let error = create_error(&mut dm, "m2", "0 4096 snapshot-merge base-real vdc P 8");
    assert!(
        error.contains("Snapshot is invalid: can't merge"),
        "{error}"
    );
}

/// A disk double that holds the writes to a window while its gate is closed: they
/// stay in flight (not written, not completed) until it opens.
struct Gated {
    disk: MemDisk,
    gate: Rc<RefCell<Gate>>,
}

#[derive(Default)]
struct Gate {
    /// Sectors whose writes are held, while closed.
    closed: Option<std::ops::Range<u64>>,
    held: Vec<Request>,
}

impl BlockDevice for Gated {
    fn info(&self) -> &DeviceInfo {
        self.disk.info()
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        let mut gate = self.gate.borrow_mut();
        if let (Some(window), Command::Write { sector, buf, .. }) = (&gate.closed, &request.command)
            && *sector < window.end
            && window.start < sector + buf.sectors()
        {
            gate.held.push(request);
            return Ok(());
        }
        if !gate.closed.is_some() {
            for held in std::mem::take(&mut gate.held) {
                self.disk.submit(held).expect("room for a held write");
            }
        }
        self.disk.submit(request)
    }

    fn poll(&mut self) -> Option<Completion> {
        let mut gate = self.gate.borrow_mut();
        if gate.closed.is_none() {
            for held in std::mem::take(&mut gate.held) {
                self.disk.submit(held).expect("room for a held write");
            }
        }
        self.disk.poll()
    }

    fn in_flight(&self) -> usize {
        self.disk.in_flight() + self.gate.borrow().held.len()
    }
}

/// Polls until the request tagged `tag` completes (at most `rounds` ticks), keeping
/// the completions of the others.
fn wait_for(
    dm: &mut DeviceMapper,
    tag: u64,
    kept: &mut Vec<IoCompletion>,
    rounds: usize,
) -> Option<Result<IoOutput, BackendError>> {
    if let Some(at) = kept.iter().position(|done| done.tag == tag) {
        return Some(kept.remove(at).result);
    }
    for _ in 0..rounds {
        while let Some(done) = dm.poll() {
            if done.tag == tag {
                return Some(done.result);
            }
            kept.push(done);
        }
        dm.tick(&|| 0);
    }
    None
}

#[test]
fn a_copy_out_holds_only_the_write_that_needs_it() {
    let origin = MemDisk::new(SECTORS);
    origin.write_at(0, &pattern(1, SECTORS));
    let cow = MemDisk::new(2048);
    let gate = Rc::new(RefCell::new(Gate::default()));
    let gated = Gated {
        disk: cow.handle(),
        gate: Rc::clone(&gate),
    };
    let mut dm = DeviceMapper::new(vec![
        Disk {
            name: "vda".into(),
            device: Box::new(origin.handle()),
        },
        Disk {
            name: "vdb".into(),
            device: Box::new(gated),
        },
    ]);
    dm.create("base-real", false, "0 4096 linear vda 0", Format::IfBlank)
        .unwrap();
    dm.create(
        "snap",
        false,
        "0 4096 snapshot base-real vdb P 8",
        Format::IfBlank,
    )
    .unwrap();
    dm.create(
        "base",
        false,
        "0 4096 snapshot-origin base-real",
        Format::IfBlank,
    )
    .unwrap();
    let (base, _) = dm.open("base", CLIENT).unwrap();
    let (snap, _) = dm.open("snap", CLIENT).unwrap();
    // A write to chunk 1 of the origin needs a copy-out; the COW holds every write.
    gate.borrow_mut().closed = Some(0..2048);
    let submit = |dm: &mut DeviceMapper, tag, export, op| {
        dm.submit(IoRequest { tag, export, op }).expect("room");
    };
    let new_data = pattern(2, 8);
    let write = |sector, data: &[u8]| IoOp::Write {
        sector,
        buf: IoBuf::from_slice(data),
        fua: false,
    };
    let read_op = |sector, sectors| IoOp::Read {
        sector,
        buf: IoBuf::with_sectors(sectors),
    };
    submit(&mut dm, 1, base, write(8, &new_data));
    // Reads of other chunks of both devices and of the chunk being copied through
    // the snapshot complete while the copy waits at the COW; a write to another
    // chunk that needs a copy-out waits for the snapshot's batch.
    submit(&mut dm, 2, base, read_op(80, 16));
    submit(&mut dm, 3, snap, read_op(160, 8));
    submit(&mut dm, 4, snap, read_op(8, 8));
    submit(&mut dm, 5, base, write(400, &pattern(3, 8)));
    let mut kept = Vec::new();
    let data_of = |result: Option<Result<IoOutput, BackendError>>| match result {
        Some(Ok(IoOutput::Read { buf, .. })) => buf.to_vec(),
        other => panic!("read: {other:?}"),
    };
    assert_eq!(
        data_of(wait_for(&mut dm, 2, &mut kept, 50)),
        pattern(1, SECTORS)[80 * 512..96 * 512]
    );
    assert_eq!(
        data_of(wait_for(&mut dm, 3, &mut kept, 50)),
        pattern(1, SECTORS)[160 * 512..168 * 512]
    );
    assert_eq!(
        data_of(wait_for(&mut dm, 4, &mut kept, 50)),
        pattern(1, SECTORS)[8 * 512..16 * 512],
        "the chunk being copied reads its old data through the snapshot"
    );
    assert!(
        wait_for(&mut dm, 1, &mut kept, 50).is_none() && kept.is_empty(),
        "the writes wait: {kept:?}"
    );
    assert!(
        !gate.borrow().held.is_empty(),
        "the copy is held at the COW"
    );
    let mut on_origin = vec![0u8; 8 * 512];
    origin.read_at(8 * 512, &mut on_origin);
    assert_eq!(on_origin, pattern(1, SECTORS)[8 * 512..16 * 512]);
    // The first copy-out's chunk is allocated; the second waits for its batch.
    assert_eq!(status(&dm, "snap"), "0 4096 snapshot 24/2048 16");
    // Open the gate: both copy-outs commit, then both writes go to the origin.
    gate.borrow_mut().closed = None;
    assert!(matches!(wait_for(&mut dm, 1, &mut kept, 200), Some(Ok(_))));
    assert!(matches!(wait_for(&mut dm, 5, &mut kept, 200), Some(Ok(_))));
    assert_eq!(status(&dm, "snap"), "0 4096 snapshot 32/2048 16");
    assert_eq!(read(&mut dm, base, 8, 8), new_data);
    assert_eq!(read(&mut dm, base, 400, 8), pattern(3, 8));
    assert_eq!(
        read(&mut dm, snap, 8, 8),
        pattern(1, SECTORS)[8 * 512..16 * 512]
    );
    assert_eq!(
        read(&mut dm, snap, 400, 8),
        pattern(1, SECTORS)[400 * 512..408 * 512]
    );
}

/// A request of a concurrency round: on which device, what, and where.
struct Planned {
    snapshot: bool,
    write: bool,
    sector: u64,
    sectors: u64,
}

fn overlaps(a: &Planned, b: &Planned) -> bool {
    a.snapshot == b.snapshot && a.sector < b.sector + b.sectors && b.sector < a.sector + a.sectors
}

#[test]
fn concurrent_requests_to_origin_and_snapshot_agree_with_a_model() {
    let info = |sectors| DeviceInfo {
        sectors,
        read_only: false,
        discard: true,
        max_transfer_sectors: 64,
        queue_depth: 4,
        model: "m".into(),
        serial: "s".into(),
    };
    for seed in 1..=4u64 {
        let (origin, cow) = (
            MemDisk::with_info(info(SECTORS)),
            MemDisk::with_info(info(8192)),
        );
        origin.write_at(0, &pattern(seed, SECTORS));
        let shuffled = |disk: &MemDisk, salt| {
            let mut handle = disk.handle();
            handle.shuffle_completions(seed * 10 + salt);
            Box::new(handle)
        };
        let mut dm = DeviceMapper::new(vec![
            Disk {
                name: "vda".into(),
                device: shuffled(&origin, 1),
            },
            Disk {
                name: "vdb".into(),
                device: shuffled(&cow, 2),
            },
        ]);
        dm.create("base-real", false, "0 4096 linear vda 0", Format::IfBlank)
            .unwrap();
        dm.create(
            "snap",
            false,
            "0 4096 snapshot base-real vdb P 16",
            Format::IfBlank,
        )
        .unwrap();
        dm.create(
            "base",
            false,
            "0 4096 snapshot-origin base-real",
            Format::IfBlank,
        )
        .unwrap();
        let (base, _) = dm.open("base", CLIENT).unwrap();
        let (snap, _) = dm.open("snap", CLIENT).unwrap();
        let mut models = [pattern(seed, SECTORS), pattern(seed, SECTORS)];
        let mut rng = fastrand::Rng::with_seed(seed);
        for round in 0..60u64 {
            let mut planned: Vec<Planned> = Vec::new();
            for _ in 0..rng.usize(1..8) {
                let sectors = rng.u64(1..40);
                let candidate = Planned {
                    snapshot: rng.bool(),
                    write: rng.u8(..3) == 0,
                    sector: rng.u64(..SECTORS - sectors),
                    sectors,
                };
                // Overlapping requests of one device in one round have no defined order.
                let clash = planned
                    .iter()
                    .any(|other| (other.write || candidate.write) && overlaps(other, &candidate));
                if !clash {
                    planned.push(candidate);
                }
            }
            for (tag, request) in planned.iter().enumerate() {
                let op = if request.write {
                    IoOp::Write {
                        sector: request.sector,
                        buf: IoBuf::from_slice(&pattern(round * 100 + tag as u64, request.sectors)),
                        fua: rng.bool(),
                    }
                } else {
                    IoOp::Read {
                        sector: request.sector,
                        buf: IoBuf::with_sectors(request.sectors as usize),
                    }
                };
                let export = if request.snapshot { snap } else { base };
                dm.submit(IoRequest {
                    tag: tag as u64,
                    export,
                    op,
                })
                .expect("room");
            }
            let mut kept = Vec::new();
            for (tag, request) in planned.iter().enumerate() {
                let result = wait_for(&mut dm, tag as u64, &mut kept, 1000).expect("completes");
                let (start, end) = (
                    request.sector as usize * 512,
                    (request.sector + request.sectors) as usize * 512,
                );
                let model = &models[usize::from(request.snapshot)];
                match result {
                    Ok(IoOutput::Read { buf, .. }) => assert!(
                        buf[..] == model[start..end],
                        "seed {seed} round {round}: read {}..+{} of {}",
                        request.sector,
                        request.sectors,
                        if request.snapshot { "snap" } else { "base" }
                    ),
                    Ok(_) => {}
                    Err(error) => panic!("seed {seed} round {round}: {error:?}"),
                }
            }
            for (tag, request) in planned.iter().enumerate().filter(|(_, r)| r.write) {
                let (start, end) = (
                    request.sector as usize * 512,
                    (request.sector + request.sectors) as usize * 512,
                );
                models[usize::from(request.snapshot)][start..end]
                    .copy_from_slice(&pattern(round * 100 + tag as u64, request.sectors));
            }
        }
        assert!(read(&mut dm, base, 0, SECTORS as usize) == models[0]);
        assert!(read(&mut dm, snap, 0, SECTORS as usize) == models[1]);
        // What is on the disks loads again with the same content.
        drop(dm);
        let mut dm = mapper(&[("vda", &origin), ("vdb", &cow)]);
        dm.create(
            "snap",
            false,
            "0 4096 snapshot vda vdb P 16",
            Format::IfBlank,
        )
        .unwrap();
        let (snap, _) = dm.open("snap", CLIENT).unwrap();
        assert!(read(&mut dm, snap, 0, SECTORS as usize) == models[1]);
        let mut on_origin = vec![0u8; SECTORS as usize * 512];
        origin.read_at(0, &mut on_origin);
        assert!(on_origin == models[0]);
    }
}

fn trim(dm: &mut DeviceMapper, export: ExportHandle, sector: u64, sectors: u64) {
    let op = IoOp::Trim {
        sector,
        sectors,
        fua: false,
    };
    run(dm, export, op).expect("trim");
}

#[test]
fn discards_do_what_dm_snapshot_does_with_them() {
    let old = pattern(1, SECTORS);
    let chunk = |n: usize| &old[n * 4096..(n + 1) * 4096];
    let zeros = vec![0u8; 4096];
    for features in [
        "",
        " 1 discard_zeroes_cow",
        " 2 discard_zeroes_cow discard_passdown_origin",
    ] {
        let (origin, cow) = (MemDisk::new(SECTORS), MemDisk::new(2048));
        let (mut dm, base) = with_snapshot_args(&origin, &cow, &format!("P 8{features}"));
        let (snap, _) = dm.open("snap", CLIENT).unwrap();
        // Chunk 40 has an exception (an origin write copied it out), 41 too (the
        // snapshot's own write), 42 has none.
        write(&mut dm, base, 40 * 8, &pattern(2, 8));
        write(&mut dm, snap, 41 * 8, &pattern(3, 8));
        let before = status(&dm, "snap");
        // The origin has no discard: a trim completes and changes nothing.
        trim(&mut dm, base, 0, 4096);
        assert_eq!(read(&mut dm, base, 40 * 8, 8), pattern(2, 8));
        assert_eq!(read(&mut dm, base, 42 * 8, 8), chunk(42));
        trim(&mut dm, snap, 40 * 8, 3 * 8);
        assert_eq!(status(&dm, "snap"), before, "{features}");
        let (c40, c41, c42) = (
            read(&mut dm, snap, 40 * 8, 8),
            read(&mut dm, snap, 41 * 8, 8),
            read(&mut dm, snap, 42 * 8, 8),
        );
        let mut on_origin = vec![0u8; 3 * 4096];
        origin.read_at(40 * 4096, &mut on_origin);
        match features {
            // No discard support: nothing changes.
            "" => {
                assert_eq!(
                    (c40.as_slice(), c41.as_slice()),
                    (chunk(40), &pattern(3, 8)[..])
                );
                assert_eq!(c42, chunk(42));
                assert_eq!(on_origin[4096..8192], *chunk(41));
            }
            // Whole chunks with an exception read zeros; the others read the origin.
            " 1 discard_zeroes_cow" => {
                assert_eq!((c40.as_slice(), c41.as_slice()), (&zeros[..], &zeros[..]));
                assert_eq!(c42, chunk(42));
                assert_eq!(on_origin[..4096], pattern(2, 8)[..]);
                assert_eq!(on_origin[8192..], *chunk(42));
            }
            // And the origin is discarded too, with no copy-out.
            _ => {
                assert_eq!((c40.as_slice(), c41.as_slice()), (&zeros[..], &zeros[..]));
                assert_eq!(c42, zeros, "chunk 42 reads the discarded origin");
                assert!(on_origin.iter().all(|&byte| byte == 0));
            }
        }
    }
}
