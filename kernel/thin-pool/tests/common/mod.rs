//! Helpers for the engine's integration tests: pools on crash disks (which reorder
//! completions and lose unflushed writes), synchronous I/O on volumes, and the
//! thin-provisioning-tools.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use blockdev::{BlockDevice, CrashDisk, IoBuf, IoError, MemDisk, Unflushed};
use persistent_data::thin::{OpenOptions, ThinMetadata};
use thin_pool::{Errno, Pool, PoolConfig, PoolMode, ThinOp, ThinOutput, ThinRequest, ThinVolume};

/// A handle on a test disk as the pool sees it: at most 1 MiB per request, 32 in
/// flight, completions in random order when `reorder` is set.
pub fn device(disk: &CrashDisk, seed: u64, reorder: bool) -> CrashDisk {
    let mut info = disk.info().clone();
    info.max_transfer_sectors = 2048;
    info.queue_depth = 32;
    info.model = "test disk".into();
    let mut handle = disk.handle_with_info(info);
    if reorder {
        handle.shuffle_completions(seed);
    }
    handle
}

/// Saves a disk's current contents to a file (for the thin tools).
pub fn save(disk: &CrashDisk, path: &Path) {
    let len = disk.info().bytes();
    let mut data = vec![0u8; len as usize];
    disk.read_at(0, &mut data);
    std::fs::write(path, data).unwrap();
}

/// A power cut: each sector written since the last flush is kept or lost at random.
pub fn crash(disk: &CrashDisk, seed: u64) {
    disk.power_cut(Unflushed::Random(seed));
}

/// Data block size of most tests (64 KiB).
pub const BS: u64 = 128;

/// A pool on two fresh test disks.
pub struct Rig {
    pub meta: CrashDisk,
    pub data: CrashDisk,
    pub config: PoolConfig,
    pub reorder: bool,
    pub seed: u64,
}

impl Rig {
    /// `data_blocks` blocks of data, `meta_sectors` of metadata.
    pub fn new(data_blocks: u64, meta_sectors: u64) -> Self {
        let config = PoolConfig::new(data_blocks * BS, BS as u32);
        Rig {
            meta: CrashDisk::new(meta_sectors),
            data: CrashDisk::new(data_blocks * BS),
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
        let meta = Box::new(device(&self.meta, self.seed, false));
        let data = Box::new(device(&self.data, self.seed * 7919, self.reorder));
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

/// Submits a write without waiting for it.
pub fn submit_write(volume: &mut ThinVolume, tag: u64, sector: u64, data: &[u8]) {
    volume
        .submit_op(ThinRequest {
            tag,
            op: ThinOp::Write {
                sector,
                buf: IoBuf::from_slice(data),
                fua: false,
            },
        })
        .expect("queue has room");
}

/// Polls until `count` requests completed, each successfully.
pub fn complete_ok(volume: &mut ThinVolume, count: usize) {
    let mut completed = 0;
    while completed < count {
        if let Some(done) = volume.poll_op() {
            done.result.unwrap();
            completed += 1;
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
    run(
        volume,
        ThinOp::Discard {
            sector,
            sectors,
            fua: false,
        },
    )
    .0
    .map(drop)
}

/// A byte pattern that differs by `seed` and position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    fastrand::Rng::with_seed(seed).fill(&mut out);
    out
}

/// Metadata and data disks whose pool has device 0 mapping `mappings` blocks (built
/// through the metadata layer, which is much faster than writing them) and room
/// for `spare` more blocks.
pub fn pool_disks(meta_sectors: u64, mappings: u64, spare: u64) -> (MemDisk, MemDisk, PoolConfig) {
    let blocks = mappings + spare;
    let meta = MemDisk::new(meta_sectors);
    let data = MemDisk::new(blocks * BS);
    let (mut md, _) = ThinMetadata::open(Box::new(meta.handle()), &OpenOptions::new(BS as u32))
        .expect("formatting");
    md.resize_data(blocks).unwrap();
    md.create_thin(0).unwrap();
    for vblock in 0..mappings {
        let block = md.alloc_data_block().unwrap();
        md.insert(0, vblock, block).unwrap();
    }
    md.commit().unwrap();
    (meta, data, PoolConfig::new(blocks * BS, BS as u32))
}

/// Runs thin_check on what the disk holds now.
pub fn thin_check_disk(disk: &CrashDisk, name: &str) {
    let scratch = Scratch::new(name);
    save(disk, &scratch.path("meta"));
    thin_check(&scratch.path("meta"));
}

// ---------------------------------------------------------------------------------
// thin-provisioning-tools

/// A scratch directory removed on drop.
pub struct Scratch(tempfile::TempDir);

impl Scratch {
    pub fn new(name: &str) -> Self {
        Scratch(
            tempfile::Builder::new()
                .prefix(&format!("thin-pool-{name}-"))
                .tempdir()
                .unwrap(),
        )
    }
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.path().join(file)
    }
}

/// A pool opened on crash-disk copies of prepared disks sharing one power supply
/// (the data disk completing out of order), for sweeps that cut the power.
pub fn open_on_crash_disks(
    meta: &MemDisk,
    data: &MemDisk,
    config: &PoolConfig,
) -> (CrashDisk, CrashDisk, Pool) {
    let meta = CrashDisk::from_disk(meta);
    let data = CrashDisk::from_disk(data);
    meta.share_power(&data);
    let (pool, _) = Pool::open(
        Box::new(device(&meta, 1, false)),
        Box::new(device(&data, 2, true)),
        config.clone(),
    )
    .expect("opening");
    (meta, data, pool)
}

/// The pool's disks as a power loss at `cut` leaves them (`unflushed` saying which
/// unflushed writes land), checked with the real `thin_check` (`name` names the saved
/// image on failure) and the pool opened again over them.
pub fn reopen_after_cut(
    meta: &CrashDisk,
    data: &CrashDisk,
    unflushed: Unflushed,
    config: &PoolConfig,
    cut: u64,
    name: &str,
) -> (CrashDisk, CrashDisk, Pool) {
    let meta = CrashDisk::from_disk(&meta.after_power_loss(unflushed));
    let data = CrashDisk::from_disk(&data.after_power_loss(unflushed));
    thin_check_disk(&meta, name);
    let (pool, _) = Pool::open(
        Box::new(meta.handle()),
        Box::new(data.handle()),
        config.clone(),
    )
    .unwrap_or_else(|e| panic!("reopening after a cut at I/O {cut}: {e}"));
    (meta, data, pool)
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
    if let Err(why) = host_tools::thin_check(image) {
        panic!("{why}");
    }
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

/// A pool on a tiny metadata device (128 blocks) whose metadata is filled up:
/// snapshots make every round of writes copy mapping leaves until no more fit. Returns
/// the rig, the pool, thin device 1's volume and what each of its first 600 blocks
/// holds (a `u32` repeated).
pub fn metadata_exhausted() -> (Rig, Pool, ThinVolume, Vec<u32>) {
    let mut rig = Rig::new(1024, 128 * 8);
    let pool = rig.open();
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, 1024 * BS, None).unwrap();
    let mut expected = vec![0u32; 600];
    for block in 0..600u64 {
        write(&mut vol, block * BS, &[0; 512]).unwrap();
    }
    'rounds: for round in 1..200u32 {
        if pool.mode() == PoolMode::OutOfMetadataSpace {
            break;
        }
        if let Err(error) = pool.message(&format!("create_snap {} 1", round + 1)) {
            assert!(
                matches!(error.errno, Errno::Enospc | Errno::Eopnotsupp),
                "{error}"
            );
        }
        for block in [0u64, 150, 300, 450, 599] {
            let value = round * 1000 + block as u32;
            match write(&mut vol, block * BS, &value.to_le_bytes().repeat(128)) {
                Ok(()) => expected[block as usize] = value,
                Err(error) => {
                    assert!(matches!(error, IoError::Device(_)), "{error:?}");
                    break 'rounds;
                }
            }
        }
        flush(&mut vol).unwrap();
    }
    (rig, pool, vol, expected)
}
