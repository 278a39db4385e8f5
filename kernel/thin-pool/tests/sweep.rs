//! Seeded random workloads against power cuts at every device I/O.
//!
//! A workload mixes writes of every size and alignment (with and without FUA),
//! write-zeroes, trims, FLUSH, snapshots, deletes, metadata snapshots and running
//! out of data space (`error_if_no_space`), with several requests in flight on
//! different sectors. It runs on a pool whose metadata and data disks share one
//! power supply; it is run once to count its device I/O, then once per I/O index
//! with the power failing there. After each cut the disks are rebuilt with the
//! unflushed writes dropped, kept, or a random half kept (a multi-sector write may
//! be torn), `thin_check` must pass, and after reopening the pool every device the
//! workload was told exists must exist and read back, sector by sector, a version
//! that is allowed: the acknowledged-durable one or one written after it, for sectors
//! something was promised for; any version ever written (or zeros) otherwise — never
//! another device's data or stale blocks.
//!
//! `SWEEP_SEEDS=N` runs N workloads instead of the few CI runs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use blockdev::{CrashDisk, IoBuf, IoError, MemDisk, SECTOR_SIZE, Unflushed};
use common::*;
use thin_pool::{Pool, PoolConfig, ThinOp, ThinRequest, ThinVolume};

const DATA_BLOCKS: u64 = 20;
const META_SECTORS: u64 = 4096;
/// Every device's size: more than the pool holds, so it runs out of space.
const VOLUME_BLOCKS: u64 = 12;
const VOLUME_SECTORS: u64 = VOLUME_BLOCKS * BS;
const OPS: usize = 28;

type Sector = [u8; SECTOR_SIZE];
const ZERO: Sector = [0; SECTOR_SIZE];

/// What a device's sectors may hold: every version written to each, oldest first
/// (index 0: zeros), and the first version a power cut may not go back past.
#[derive(Clone, Default)]
struct DeviceModel {
    versions: BTreeMap<u64, Vec<Sector>>,
    durable_from: BTreeMap<u64, usize>,
    /// Per sector, the newest version written by a request that completed
    /// successfully (what a FLUSH or a snapshot makes durable).
    completed: BTreeMap<u64, usize>,
}

impl DeviceModel {
    /// Records a new version of `sector`; returns its index.
    fn write(&mut self, sector: u64, data: Sector) -> usize {
        let versions = self.versions.entry(sector).or_insert_with(|| vec![ZERO]);
        versions.push(data);
        versions.len() - 1
    }

    fn promise(&mut self, sector: u64, version: usize) {
        let from = self.durable_from.entry(sector).or_insert(0);
        *from = (*from).max(version);
    }

    /// Everything completed so far becomes durable (FLUSH, commit).
    fn promise_completed(&mut self) {
        for (&sector, &version) in &self.completed.clone() {
            self.promise(sector, version);
        }
    }

    fn allowed(&self, sector: u64) -> &[Sector] {
        match self.versions.get(&sector) {
            Some(versions) => &versions[self.durable_from.get(&sector).copied().unwrap_or(0)..],
            None => std::slice::from_ref(&ZERO),
        }
    }
}

/// One step of a workload.
#[derive(Clone, Debug)]
enum Op {
    Write {
        dev: u64,
        sector: u64,
        sectors: u64,
        fua: bool,
        seed: u64,
    },
    WriteZeroes {
        dev: u64,
        sector: u64,
        sectors: u64,
        unmap: bool,
        fua: bool,
    },
    Trim {
        dev: u64,
        sector: u64,
        sectors: u64,
        fua: bool,
    },
    Flush {
        dev: u64,
    },
    Wait,
    Snapshot {
        origin: u64,
    },
    Delete,
    ReserveMetadataSnap,
    ReleaseMetadataSnap,
}

fn workload(seed: u64) -> Vec<Op> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut devices = vec![0u64];
    let mut ops = Vec::new();
    for _ in 0..OPS {
        let dev = devices[rng.usize(..devices.len())];
        let sector = rng.u64(..VOLUME_SECTORS);
        let sectors = rng.u64(1..=(3 * BS).min(VOLUME_SECTORS - sector));
        let op = match rng.u32(..100) {
            0..40 => Op::Write {
                dev,
                sector,
                sectors,
                fua: rng.bool(),
                seed: rng.u64(..),
            },
            40..50 => Op::WriteZeroes {
                dev,
                sector,
                sectors,
                unmap: rng.bool(),
                fua: rng.bool(),
            },
            50..58 => Op::Trim {
                dev,
                sector,
                sectors,
                fua: rng.bool(),
            },
            58..68 => Op::Flush { dev },
            68..82 => Op::Wait,
            82..88 if devices.len() < 4 => {
                devices.push(devices.len() as u64);
                Op::Snapshot { origin: dev }
            }
            88..92 if devices.len() > 1 => Op::Delete,
            92..96 => Op::ReserveMetadataSnap,
            96..100 => Op::ReleaseMetadataSnap,
            _ => Op::Wait,
        };
        ops.push(op);
    }
    ops
}

/// A submitted request and what its success means.
struct Pending {
    dev: u64,
    /// (sector, version) of what it wrote.
    writes: Vec<(u64, usize)>,
    fua: bool,
    flush: bool,
}

struct Runner {
    pool: Pool,
    volumes: BTreeMap<u64, ThinVolume>,
    models: BTreeMap<u64, DeviceModel>,
    /// Devices the pool acknowledged creating and not deleting.
    live: BTreeSet<u64>,
    pending: BTreeMap<(u64, u64), Pending>,
    next_tag: u64,
    next_dev: u64,
    power: CrashDisk,
}

impl Runner {
    fn busy_sectors(&self, dev: u64) -> BTreeSet<u64> {
        self.pending
            .values()
            .filter(|p| p.dev == dev)
            .flat_map(|p| p.writes.iter().map(|&(sector, _)| sector))
            .collect()
    }

    /// Submits a data-changing request; `data` gives each sector's new contents.
    fn submit(&mut self, dev: u64, op: ThinOp, range: (u64, u64), data: impl Fn(u64) -> Sector) {
        if (range.0..range.1).any(|s| self.busy_sectors(dev).contains(&s)) {
            self.wait();
        }
        let (fua, flush) = match &op {
            ThinOp::Write { fua, .. }
            | ThinOp::WriteZeroes { fua, .. }
            | ThinOp::Discard { fua, .. } => (*fua, false),
            ThinOp::Flush => (false, true),
            _ => (false, false),
        };
        let model = self.models.get_mut(&dev).expect("a modelled device");
        let writes = (range.0..range.1)
            .map(|sector| (sector, model.write(sector, data(sector))))
            .collect();
        let tag = self.next_tag;
        self.next_tag += 1;
        self.pending.insert(
            (dev, tag),
            Pending {
                dev,
                writes,
                fua,
                flush,
            },
        );
        self.volumes
            .get_mut(&dev)
            .expect("an active device")
            .submit_op(ThinRequest { tag, op })
            .expect("queue has room");
    }

    fn wait(&mut self) {
        while !self.pending.is_empty() {
            let mut done = Vec::new();
            for (&dev, volume) in self.volumes.iter_mut() {
                while let Some(completion) = volume.poll_op() {
                    done.push((dev, completion));
                }
            }
            for (dev, completion) in done {
                let request = self
                    .pending
                    .remove(&(dev, completion.tag))
                    .expect("submitted");
                let model = self.models.get_mut(&dev).expect("modelled");
                match completion.result {
                    Ok(_) => {
                        for &(sector, version) in &request.writes {
                            model.completed.insert(sector, version);
                            if request.fua {
                                model.promise(sector, version);
                            }
                        }
                        if request.flush {
                            // A flush on one device covers the whole pool.
                            for model in self.models.values_mut() {
                                model.promise_completed();
                            }
                        }
                    }
                    Err(IoError::NoSpace) => {}
                    Err(error) => assert!(
                        self.power.power_lost(),
                        "a request failed with the power on: {error}"
                    ),
                }
            }
        }
    }

    fn message(&mut self, text: &str) -> bool {
        let ok = self.pool.message(text).is_ok();
        if ok {
            // A message commits: everything completed is durable.
            for model in self.models.values_mut() {
                model.promise_completed();
            }
        } else {
            assert!(
                self.power.power_lost() || text.ends_with("metadata_snap"),
                "message '{text}' failed with the power on"
            );
        }
        ok
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::Write {
                dev,
                sector,
                sectors,
                fua,
                seed,
            } => {
                if !self.volumes.contains_key(&dev) {
                    return;
                }
                let bytes = pattern(seed, (sectors as usize) * SECTOR_SIZE);
                let sector_data = |s: u64| {
                    let at = ((s - sector) as usize) * SECTOR_SIZE;
                    bytes[at..at + SECTOR_SIZE].try_into().unwrap()
                };
                let op = ThinOp::Write {
                    sector,
                    buf: IoBuf::from_slice(&bytes),
                    fua,
                };
                self.submit(dev, op, (sector, sector + sectors), sector_data);
            }
            Op::WriteZeroes {
                dev,
                sector,
                sectors,
                unmap,
                fua,
            } => {
                if !self.volumes.contains_key(&dev) {
                    return;
                }
                let op = ThinOp::WriteZeroes {
                    sector,
                    sectors,
                    unmap,
                    fua,
                };
                self.submit(dev, op, (sector, sector + sectors), |_| ZERO);
            }
            Op::Trim {
                dev,
                sector,
                sectors,
                fua,
            } => {
                if !self.volumes.contains_key(&dev) {
                    return;
                }
                // Only the whole blocks inside the range are unmapped (read as zeros).
                let (b0, b1) = (sector.div_ceil(BS) * BS, (sector + sectors) / BS * BS);
                if b0 >= b1 {
                    return;
                }
                let op = ThinOp::Discard {
                    sector,
                    sectors,
                    fua,
                };
                self.submit(dev, op, (b0, b1), |_| ZERO);
            }
            Op::Flush { dev } => {
                if self.volumes.contains_key(&dev) {
                    self.submit(dev, ThinOp::Flush, (0, 0), |_| ZERO);
                }
            }
            Op::Wait => self.wait(),
            Op::Snapshot { origin } => {
                self.wait();
                let dev = self.next_dev;
                self.next_dev += 1;
                if !self.live.contains(&origin)
                    || !self.message(&format!("create_snap {dev} {origin}"))
                {
                    return;
                }
                self.live.insert(dev);
                let mut model = self.models[&origin].clone();
                model.promise_completed();
                self.models.insert(dev, model);
                let volume = self.pool.activate(dev, VOLUME_SECTORS, None).unwrap();
                self.volumes.insert(dev, volume);
            }
            Op::Delete => {
                self.wait();
                let Some(&dev) = self.live.iter().next_back().filter(|&&d| d != 0) else {
                    return;
                };
                self.volumes.remove(&dev);
                // Whether or not the delete got through, the device is not checked.
                self.message(&format!("delete {dev}"));
                self.live.remove(&dev);
                self.models.remove(&dev);
            }
            Op::ReserveMetadataSnap => {
                self.wait();
                self.message("reserve_metadata_snap");
            }
            Op::ReleaseMetadataSnap => {
                self.wait();
                self.message("release_metadata_snap");
            }
        }
    }
}

fn config() -> PoolConfig {
    let mut config = PoolConfig::new(DATA_BLOCKS * BS, BS as u32);
    config.features.error_if_no_space = true;
    config
}

/// What a run leaves: the disks, the models, and its I/O count after setup and at
/// the end.
struct Outcome {
    meta: CrashDisk,
    data: CrashDisk,
    models: BTreeMap<u64, DeviceModel>,
    start: u64,
    end: u64,
}

fn run_workload(ops: &[Op], seed: u64, cut: Option<u64>) -> Outcome {
    let meta = CrashDisk::new(META_SECTORS);
    let data = CrashDisk::new(DATA_BLOCKS * BS);
    meta.share_power(&data);
    data.write_at(
        0,
        &pattern(!seed, (DATA_BLOCKS * BS) as usize * SECTOR_SIZE),
    );
    let (pool, _) = Pool::open(
        Box::new(device(&meta, seed, false)),
        Box::new(device(&data, seed + 1, true)),
        config(),
    )
    .unwrap();
    pool.message("create_thin 0").unwrap();
    let volume = pool.activate(0, VOLUME_SECTORS, None).unwrap();
    let start = meta.operations();
    meta.fail_at(cut);
    let mut runner = Runner {
        pool,
        volumes: BTreeMap::from([(0, volume)]),
        models: BTreeMap::from([(0, DeviceModel::default())]),
        live: BTreeSet::from([0]),
        pending: BTreeMap::new(),
        next_tag: 0,
        next_dev: 1,
        power: meta.handle(),
    };
    for op in ops {
        runner.run(op);
    }
    runner.wait();
    let models = std::mem::take(&mut runner.models);
    drop(runner);
    let end = meta.operations();
    Outcome {
        meta,
        data,
        models,
        start,
        end,
    }
}

fn check(name: &str, meta: &MemDisk, data: &MemDisk, models: &BTreeMap<u64, DeviceModel>) {
    let meta = CrashDisk::from_disk(meta);
    let data = CrashDisk::from_disk(data);
    let scratch = Scratch::new("sweep");
    save(&meta, &scratch.path("meta"));
    thin_check(&scratch.path("meta"));
    let (pool, _) = Pool::open(Box::new(meta.handle()), Box::new(data.handle()), config())
        .unwrap_or_else(|e| panic!("{name}: reopening failed: {e}"));
    for (&dev, model) in models {
        let mut volume = pool
            .activate(dev, VOLUME_SECTORS, None)
            .unwrap_or_else(|e| panic!("{name}: device {dev} is gone: {e}"));
        let contents = read(&mut volume, 0, VOLUME_SECTORS);
        for (sector, found) in contents.chunks(SECTOR_SIZE).enumerate() {
            let sector = sector as u64;
            assert!(
                model.allowed(sector).iter().any(|v| v[..] == *found),
                "{name}: device {dev} sector {sector} holds data it may not hold"
            );
        }
    }
}

/// Runs `seeds` workloads with a cut at every device I/O; returns the number of
/// rebuilt disks checked.
fn sweep(seeds: std::ops::Range<u64>) -> u64 {
    require_tools();
    let mut checked = 0;
    for seed in seeds {
        let ops = workload(seed);
        let whole = run_workload(&ops, seed, None);
        for cut in whole.start..=whole.end {
            let run = run_workload(&ops, seed, Some(cut));
            for unflushed in [
                Unflushed::DropAll,
                Unflushed::KeepAll,
                Unflushed::Random(cut),
            ] {
                let name = format!("seed {seed}, cut at I/O {cut}, {unflushed:?}");
                let meta = run.meta.after_power_loss(unflushed);
                let data = run.data.after_power_loss(match unflushed {
                    Unflushed::Random(n) => Unflushed::Random(!n),
                    other => other,
                });
                check(&name, &meta, &data, &run.models);
                checked += 1;
            }
        }
    }
    checked
}

#[test]
fn random_workloads_survive_a_power_cut_at_every_io() {
    let seeds: u64 = std::env::var("SWEEP_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    let started = Instant::now();
    let checked = sweep(0..seeds);
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{seeds} workloads: {checked} power cuts checked in {seconds:.1} s ({:.0} per second)",
        checked as f64 / seconds
    );
    assert!(checked >= seeds * 30, "only {checked} cuts");
}
