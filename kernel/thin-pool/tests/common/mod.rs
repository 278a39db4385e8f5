//! Helpers for the engine's integration tests: a disk that reorders and loses
//! unflushed writes, synchronous I/O on volumes, and the thin-provisioning-tools.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::rc::Rc;

use blockdev::{
    BlockDevice, Busy, Command, Completion, DeviceInfo, IoBuf, IoError, MemDisk, Request,
    SECTOR_SIZE,
};
use thin_pool::{Pool, PoolConfig, ThinOp, ThinOutput, ThinRequest, ThinVolume};

/// A tiny deterministic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

enum Logged {
    Write {
        offset: u64,
        data: Vec<u8>,
        keep: bool,
    },
    Discard {
        offset: u64,
        len: u64,
    },
}

/// Contents of a [`TestDisk`]: what reads see now, and what survives a power cut.
pub struct DiskState {
    live: MemDisk,
    durable: MemDisk,
    /// Writes and discards executed and not yet made durable, in order, with their
    /// execution sequence numbers.
    log: Vec<(u64, Logged)>,
    executed: u64,
    /// While set, nothing completes (requests stay queued).
    pub held: bool,
    pub flushes: u64,
    pub discards: u64,
    pub writes: u64,
}

/// The test's hold on a disk it gave to the pool.
#[derive(Clone)]
pub struct DiskControl(pub Rc<RefCell<DiskState>>);

impl DiskControl {
    pub fn new(sectors: u64) -> Self {
        DiskControl(Rc::new(RefCell::new(DiskState {
            live: MemDisk::new(sectors),
            durable: MemDisk::new(sectors),
            log: Vec::new(),
            executed: 0,
            held: false,
            flushes: 0,
            discards: 0,
            writes: 0,
        })))
    }

    pub fn sectors(&self) -> u64 {
        self.0.borrow().live.info().sectors
    }

    /// A device on this disk. With `reorder`, requests run when they complete, in
    /// random order; otherwise in submission order.
    pub fn device(&self, seed: u64, reorder: bool) -> TestDisk {
        let sectors = self.sectors();
        TestDisk {
            state: self.clone(),
            info: DeviceInfo {
                sectors,
                read_only: false,
                discard: true,
                max_transfer_sectors: 2048,
                queue_depth: 32,
                model: "test disk".into(),
                serial: String::new(),
            },
            pending: Vec::new(),
            failed: Vec::new(),
            rng: Rng::new(seed),
            reorder,
        }
    }

    /// A power cut: every write and discard since the last flush is kept or lost at
    /// random (FUA writes are kept), in order.
    pub fn crash(&self, seed: u64) {
        let mut rng = Rng::new(seed);
        let mut state = self.0.borrow_mut();
        let log = std::mem::take(&mut state.log);
        for (_, entry) in &log {
            let keep = matches!(entry, Logged::Write { keep: true, .. });
            if keep || rng.chance(50) {
                entry.apply(&state.durable);
            }
        }
        for (_, entry) in &log {
            let (offset, len) = match entry {
                Logged::Write { offset, data, .. } => (*offset, data.len() as u64),
                Logged::Discard { offset, len } => (*offset, *len),
            };
            let mut copy = vec![0u8; len as usize];
            state.durable.read_at(offset, &mut copy);
            state.live.write_at(offset, &copy);
        }
    }

    pub fn hold(&self, held: bool) {
        self.0.borrow_mut().held = held;
    }

    pub fn read_at(&self, offset: u64, out: &mut [u8]) {
        self.0.borrow().live.read_at(offset, out);
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) {
        let state = self.0.borrow();
        state.live.write_at(offset, data);
        state.durable.write_at(offset, data);
    }

    /// Saves the current contents to a file (for the thin tools).
    pub fn save(&self, path: &Path) {
        let len = self.sectors() * SECTOR_SIZE as u64;
        let mut data = vec![0u8; len as usize];
        self.read_at(0, &mut data);
        std::fs::write(path, data).unwrap();
    }
}

impl Logged {
    fn apply(&self, disk: &MemDisk) {
        match self {
            Logged::Write { offset, data, .. } => disk.write_at(*offset, data),
            Logged::Discard { offset, len } => disk.write_at(*offset, &vec![0u8; *len as usize]),
        }
    }
}

/// A [`BlockDevice`] over a [`DiskControl`].
pub struct TestDisk {
    state: DiskControl,
    info: DeviceInfo,
    /// Requests not executed yet; a flush carries the sequence number of the first
    /// write it does not cover (it covers only writes completed before its
    /// submission).
    pending: Vec<(Request, u64)>,
    failed: Vec<Completion>,
    rng: Rng,
    reorder: bool,
}

impl TestDisk {
    pub fn set_info(&mut self, change: impl FnOnce(&mut DeviceInfo)) {
        change(&mut self.info);
    }

    fn execute(&mut self, command: &mut Command, covered: u64) {
        let mut state = self.state.0.borrow_mut();
        let seq = state.executed;
        state.executed += 1;
        match command {
            Command::Read { sector, buf } => state.live.read_at(*sector * 512, buf),
            Command::Write { sector, buf, fua } => {
                state.writes += 1;
                state.live.write_at(*sector * 512, buf);
                let entry = Logged::Write {
                    offset: *sector * 512,
                    data: buf.to_vec(),
                    keep: *fua,
                };
                state.log.push((seq, entry));
            }
            Command::Flush => {
                state.flushes += 1;
                let log = std::mem::take(&mut state.log);
                for (seq, entry) in log {
                    if seq < covered {
                        entry.apply(&state.durable);
                    } else {
                        state.log.push((seq, entry));
                    }
                }
            }
            Command::Discard { sector, sectors } => {
                state.discards += 1;
                let (offset, len) = (*sector * 512, *sectors * 512);
                state.live.write_at(offset, &vec![0u8; len as usize]);
                state.log.push((seq, Logged::Discard { offset, len }));
            }
        }
    }
}

impl BlockDevice for TestDisk {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        if self.pending.len() >= usize::from(self.info.queue_depth) {
            return Err(Busy(request));
        }
        if let Err(error) = request.command.validate(&self.info) {
            self.failed.push(Completion {
                tag: request.tag,
                result: Err(error),
                buf: request.command.into_buf(),
            });
            return Ok(());
        }
        let covered = self.state.0.borrow().executed;
        self.pending.push((request, covered));
        Ok(())
    }

    fn poll(&mut self) -> Option<Completion> {
        if let Some(done) = self.failed.pop() {
            return Some(done);
        }
        if self.pending.is_empty() || self.state.0.borrow().held {
            return None;
        }
        let pick = if self.reorder {
            self.rng.below(self.pending.len() as u64) as usize
        } else {
            0
        };
        let (Request { tag, mut command }, covered) = self.pending.remove(pick);
        self.execute(&mut command, covered);
        Some(Completion {
            tag,
            result: Ok(()),
            buf: command.into_buf(),
        })
    }

    fn in_flight(&self) -> usize {
        self.pending.len() + self.failed.len()
    }
}

/// Data block size of most tests (64 KiB).
pub const BS: u64 = 128;

/// A pool on two fresh test disks.
pub struct Rig {
    pub meta: DiskControl,
    pub data: DiskControl,
    pub config: PoolConfig,
    pub reorder: bool,
    pub seed: u64,
}

impl Rig {
    /// `data_blocks` blocks of data, `meta_sectors` of metadata.
    pub fn new(data_blocks: u64, meta_sectors: u64) -> Self {
        let config = PoolConfig::new(data_blocks * BS, BS as u32);
        Rig {
            meta: DiskControl::new(meta_sectors),
            data: DiskControl::new(data_blocks * BS),
            config,
            reorder: true,
            seed: 1,
        }
    }

    pub fn open(&mut self) -> Pool {
        self.try_open()
            .unwrap_or_else(|e| panic!("open failed: {e}"))
    }

    pub fn try_open(&mut self) -> Result<Pool, thin_pool::PoolError> {
        self.seed += 1;
        let meta = Box::new(self.meta.device(self.seed, false));
        let data = Box::new(self.data.device(self.seed * 7919, self.reorder));
        Pool::open(meta, data, self.config.clone()).map(|(pool, _)| pool)
    }
}

/// Runs one operation on a volume to completion.
pub fn run(volume: &mut ThinVolume, op: ThinOp) -> (Result<ThinOutput, IoError>, IoBuf) {
    const TAG: u64 = u64::MAX;
    volume
        .submit_op(ThinRequest { tag: TAG, op })
        .expect("queue has room");
    loop {
        if let Some(done) = volume.poll_op() {
            assert_eq!(done.tag, TAG, "unexpected completion");
            return (done.result, done.buf);
        }
    }
}

pub fn write(volume: &mut ThinVolume, sector: u64, data: &[u8]) -> Result<(), IoError> {
    let buf = IoBuf::from_slice(data);
    run(
        volume,
        ThinOp::Write {
            sector,
            buf,
            fua: false,
        },
    )
    .0
    .map(drop)
}

pub fn read(volume: &mut ThinVolume, sector: u64, sectors: u64) -> Vec<u8> {
    let (result, buf) = run(
        volume,
        ThinOp::Read {
            sector,
            buf: IoBuf::with_sectors(sectors as usize),
        },
    );
    result.unwrap_or_else(|e| panic!("read failed: {e}"));
    buf.to_vec()
}

pub fn flush(volume: &mut ThinVolume) -> Result<(), IoError> {
    run(volume, ThinOp::Flush).0.map(drop)
}

pub fn discard(volume: &mut ThinVolume, sector: u64, sectors: u64) -> Result<(), IoError> {
    run(volume, ThinOp::Discard { sector, sectors }).0.map(drop)
}

/// A byte pattern that differs by `seed` and position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------------
// thin-provisioning-tools

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "thin-pool-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn require_tools() {
    host_tools::require_for_test(&[host_tools::Tool::ThinCheck]);
}

/// Runs a tool; returns (exit status, stdout, stderr).
pub fn tool(program: &str, args: &[&str]) -> (i32, String, String) {
    let out = Process::new(program).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn thin_check(image: &Path) {
    let (status, stdout, stderr) = tool("thin_check", &[image.to_str().unwrap()]);
    assert_eq!(status, 0, "thin_check failed:\n{stdout}\n{stderr}");
}

/// One device of a thin_dump: virtual block → data block.
pub type Mappings = BTreeMap<u64, u64>;

/// thin_dump (with extra arguments such as `-m`), parsed into per-device mappings.
pub fn thin_dump(image: &Path, extra: &[&str]) -> BTreeMap<u64, Mappings> {
    let mut args = extra.to_vec();
    args.push(image.to_str().unwrap());
    let (status, stdout, stderr) = tool("thin_dump", &args);
    assert_eq!(status, 0, "thin_dump failed: {stderr}");
    parse_dump(&stdout)
}

fn attr(node: roxmltree::Node, name: &str) -> u64 {
    node.attribute(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .parse()
        .unwrap()
}

pub fn parse_dump(xml: &str) -> BTreeMap<u64, Mappings> {
    let doc = roxmltree::Document::parse(xml).unwrap();
    let mut devices = BTreeMap::new();
    for dev in doc.root_element().children().filter(|n| n.is_element()) {
        let mut mappings = Mappings::new();
        for m in dev.children().filter(|n| n.is_element()) {
            match m.tag_name().name() {
                "single_mapping" => {
                    mappings.insert(attr(m, "origin_block"), attr(m, "data_block"));
                }
                "range_mapping" => {
                    let (origin, data) = (attr(m, "origin_begin"), attr(m, "data_begin"));
                    for i in 0..attr(m, "length") {
                        mappings.insert(origin + i, data + i);
                    }
                }
                other => panic!("unexpected element {other}"),
            }
        }
        devices.insert(attr(dev, "dev_id"), mappings);
    }
    devices
}

/// thin_delta between two devices: (kind, begin, length) runs in block order.
pub fn thin_delta(image: &Path, thin1: u64, thin2: u64, extra: &[&str]) -> Vec<(String, u64, u64)> {
    let (t1, t2) = (thin1.to_string(), thin2.to_string());
    let mut args = extra.to_vec();
    args.extend(["--thin1", &t1, "--thin2", &t2, image.to_str().unwrap()]);
    let (status, stdout, stderr) = tool("thin_delta", &args);
    assert_eq!(status, 0, "thin_delta failed: {stderr}");
    let doc = roxmltree::Document::parse(&stdout).unwrap();
    let diff = doc
        .descendants()
        .find(|n| n.has_tag_name("diff"))
        .expect("diff element");
    diff.children()
        .filter(|n| n.is_element())
        .map(|n| {
            (
                n.tag_name().name().to_string(),
                attr(n, "begin"),
                attr(n, "length"),
            )
        })
        .collect()
}

/// thin_ls rows: dev → (mapped, exclusive, shared) blocks.
pub fn thin_ls(image: &Path, extra: &[&str]) -> BTreeMap<u64, (u64, u64, u64)> {
    let mut args = extra.to_vec();
    args.extend([
        "--no-headers",
        "-o",
        "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS",
        image.to_str().unwrap(),
    ]);
    let (status, stdout, stderr) = tool("thin_ls", &args);
    assert_eq!(status, 0, "thin_ls failed: {stderr}");
    stdout
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let v: Vec<u64> = line
                .split_whitespace()
                .map(|w| w.parse().unwrap())
                .collect();
            (v[0], (v[1], v[2], v[3]))
        })
        .collect()
}
