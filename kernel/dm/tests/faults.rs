//! Device faults seen through the device mapper and the NBD backend, as dm-thin
//! reacts to them: a failed metadata write turns the pool read-only with `needs_check`
//! and an event (the console prints it after `event:`), NBD writes and flushes fail
//! with EIO while reads go on, and after a restart the metadata passes `thin_check`
//! and still says `needs_check`; a failed data write fails only its request; a failed
//! external-origin read fails only that read.

use std::cell::RefCell;
use std::rc::Rc;

use blockdev::{FaultOp, FaultRule, Faults, FaultyDisk, IoBuf, MemDisk};
use dm::{DeviceMapper, Disk, Format, NbdBackend};
use nbd::{Backend, BackendError, ExportHandle, IoOp, IoOutput, IoRequest};

/// The address NBD clients of these tests connect from.
const CLIENT: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

/// Data block size (64 KiB).
const BS: u64 = 128;
const ORIGIN_SECTORS: u64 = 4 * BS;

fn pattern(seed: u8, sectors: u64) -> Vec<u8> {
    (0..sectors * 512)
        .map(|at| seed.wrapping_mul(31).wrapping_add((at % 251) as u8))
        .collect()
}

/// A pool on faulty metadata and data disks with thin device 0 (`thin`) over a
/// faulty external origin, exported over NBD.
struct Rig {
    disks: [MemDisk; 4],
    meta: Rc<RefCell<Faults>>,
    data: Rc<RefCell<Faults>>,
    origin: Rc<RefCell<Faults>>,
    dm: Rc<RefCell<DeviceMapper>>,
    nbd: NbdBackend,
    export: ExportHandle,
}

/// `sectors` sectors of `disk` from `sector` on.
fn bytes(disk: &MemDisk, sector: u64, sectors: u64) -> Vec<u8> {
    let mut out = vec![0; sectors as usize * 512];
    disk.read_at(sector * 512, &mut out);
    out
}

fn disk(name: &str, device: Box<dyn blockdev::BlockDevice>) -> Disk {
    Disk {
        name: name.to_string(),
        device,
    }
}

impl Rig {
    fn new() -> Self {
        let disks = [
            MemDisk::new(4096),
            MemDisk::new(4096),
            MemDisk::new(32 * BS),
            MemDisk::new(ORIGIN_SECTORS),
        ];
        disks[3].write_at(0, &pattern(9, ORIGIN_SECTORS));
        let (meta_disk, meta) = FaultyDisk::new(disks[1].handle());
        let (data_disk, data) = FaultyDisk::new(disks[2].handle());
        let (origin_disk, origin) = FaultyDisk::new(disks[3].handle());
        let mut dm = DeviceMapper::new(vec![
            disk("vda", Box::new(disks[0].handle())),
            disk("vdb", Box::new(meta_disk)),
            disk("vdc", Box::new(data_disk)),
            disk("vdd", Box::new(origin_disk)),
        ]);
        dm.config_init("vda", [5; 16], false).unwrap();
        let table = format!("0 {} thin-pool vdb vdc {BS} 0", 32 * BS);
        dm.create("pool", false, &table, Format::IfBlank).unwrap();
        dm.message("pool", "create_thin 0").unwrap();
        dm.create("thin", false, "0 16384 thin pool 0 vdd", Format::Never)
            .unwrap();
        let dm = Rc::new(RefCell::new(dm));
        let mut nbd = NbdBackend::new(Rc::clone(&dm));
        let (export, _) = nbd.open("thin", CLIENT).unwrap();
        Rig {
            disks,
            meta,
            data,
            origin,
            dm,
            nbd,
            export,
        }
    }

    fn request(&mut self, op: IoOp) -> Result<IoOutput, BackendError> {
        let export = self.export;
        self.nbd
            .submit(IoRequest { tag: 1, export, op })
            .expect("an idle device takes a request");
        loop {
            if let Some(done) = self.nbd.poll() {
                return done.result;
            }
        }
    }

    fn write(&mut self, sector: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        let buf = IoBuf::from_slice(data);
        self.request(IoOp::Write { sector, buf, fua }).map(drop)
    }

    fn read(&mut self, sector: u64, sectors: u64) -> Result<Vec<u8>, BackendError> {
        let buf = IoBuf::with_sectors(sectors as usize);
        match self.request(IoOp::Read { sector, buf })? {
            IoOutput::Read { buf, .. } => Ok(buf.to_vec()),
            other => panic!("a read answered {other:?}"),
        }
    }

    fn flush(&mut self) -> Result<(), BackendError> {
        self.request(IoOp::Flush).map(drop)
    }

    fn status(&self) -> String {
        let dm = self.dm.borrow();
        dm.status_lines(dm.device("pool").unwrap()).join("\n")
    }

    fn events(&self) -> Vec<String> {
        self.dm.borrow_mut().tick(&|| 0)
    }
}

fn is_eio(result: Result<impl std::fmt::Debug, BackendError>) -> bool {
    matches!(result, Err(BackendError::Io(_)))
}

#[test]
fn a_failed_metadata_write_turns_the_pool_read_only_and_nbd_writes_fail() {
    host_tools::require_for_test(&[host_tools::Tool::ThinCheck]);
    let mut rig = Rig::new();
    let kept = pattern(1, 8);
    rig.write(0, &kept, false).unwrap();
    rig.flush().unwrap();
    rig.write(2 * BS, &pattern(2, 8), false).unwrap();
    Faults::fail(&rig.meta, FaultRule::every(FaultOp::Write));
    assert!(
        is_eio(rig.write(2 * BS + 8, &pattern(3, 8), true)),
        "a FUA write acknowledged over a failed commit"
    );
    assert_eq!(rig.meta.borrow().injected, 1);
    let events = rig.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].starts_with("pool: switching pool to read-only mode: "),
        "{events:?}"
    );
    let status = rig.status();
    assert!(
        status.contains(" ro ") && status.contains(" needs_check "),
        "{status}"
    );
    // NBD: new blocks and flushes fail with EIO, reads go on.
    assert!(is_eio(rig.write(6 * BS, &pattern(4, 8), false)));
    assert!(is_eio(rig.flush()));
    assert_eq!(rig.read(0, 8).unwrap(), kept);
    assert_eq!(
        rig.read(2 * BS, 8).unwrap(),
        bytes(&rig.disks[3], 2 * BS, 8),
        "the rolled-back block reads from the origin again"
    );

    // Restarted over the same disks, without faults.
    let disks = rig.disks.each_ref().map(MemDisk::handle);
    drop(rig);
    let mut image = vec![0u8; 4096 * 512];
    disks[1].read_at(0, &mut image);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("meta"), &image).unwrap();
    let check = std::process::Command::new("thin_check")
        .arg(dir.path().join("meta"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let mut dm = DeviceMapper::new(
        ["vda", "vdb", "vdc", "vdd"]
            .iter()
            .zip(&disks)
            .map(|(name, memory)| disk(name, Box::new(memory.handle())))
            .collect(),
    );
    let notes = dm.restore();
    assert!(
        notes.contains(&"config: 2 of 2 devices active".to_string()),
        "{notes:?}"
    );
    let status = dm.status_lines(dm.device("pool").unwrap()).join("\n");
    assert!(status.contains(" needs_check "), "{status}");
    let (export, _) = dm.open("thin", CLIENT).unwrap();
    let op = IoOp::Read {
        sector: 0,
        buf: IoBuf::with_sectors(8),
    };
    dm.submit(IoRequest { tag: 2, export, op }).unwrap();
    let done = std::iter::repeat_with(|| dm.poll())
        .flatten()
        .next()
        .unwrap();
    let Ok(IoOutput::Read { buf, .. }) = done.result else {
        panic!("{:?}", done.result);
    };
    assert_eq!(buf.to_vec(), kept, "flushed data survived");
}

#[test]
fn a_failed_data_write_fails_only_its_request() {
    let mut rig = Rig::new();
    rig.write(0, &pattern(1, 8), false).unwrap();
    Faults::fail(&rig.data, FaultRule::every(FaultOp::Write));
    assert!(is_eio(rig.write(8, &pattern(2, 8), false)));
    Faults::fail(&rig.data, FaultRule::every(FaultOp::Write));
    assert!(is_eio(rig.write(5 * BS, &pattern(3, 8), true)));
    assert_eq!(rig.data.borrow().injected, 2);
    rig.write(6 * BS, &pattern(4, 8), true).unwrap();
    rig.flush().unwrap();
    assert_eq!(rig.read(0, 8).unwrap(), pattern(1, 8));
    assert_eq!(rig.read(6 * BS, 8).unwrap(), pattern(4, 8));
    assert!(rig.events().is_empty());
    assert!(rig.status().contains(" rw "), "{}", rig.status());
}

#[test]
fn a_failed_origin_read_fails_only_that_read() {
    let mut rig = Rig::new();
    Faults::fail(&rig.origin, FaultRule::every(FaultOp::Read));
    assert!(is_eio(rig.read(BS, 8)));
    let origin = bytes(&rig.disks[3], BS, 8);
    assert_eq!(rig.read(BS, 8).unwrap(), origin);
    // A partial write needs the rest of its block from the origin.
    Faults::fail(&rig.origin, FaultRule::every(FaultOp::Read));
    assert!(is_eio(rig.write(2 * BS, &pattern(5, 8), false)));
    rig.write(2 * BS, &pattern(5, 8), false).unwrap();
    assert_eq!(rig.read(2 * BS, 8).unwrap(), pattern(5, 8));
    assert_eq!(
        rig.read(2 * BS + 8, 8).unwrap(),
        bytes(&rig.disks[3], 2 * BS + 8, 8)
    );
    assert_eq!(rig.origin.borrow().injected, 2);
    assert!(rig.events().is_empty());
    assert!(rig.status().contains(" rw "), "{}", rig.status());
}
