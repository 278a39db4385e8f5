//! The workload of the power-cut sweep: its steps, the model of what each device may
//! hold, and the runner that carries the steps out through the NBD backend.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use blockdev::{CrashDisk, IoBuf, SECTOR_SIZE};

use dm::{DeviceMapper, Format, ImportFrom, NbdBackend};
use nbd::{Backend, BackendError, ExportHandle, IoCompletion, IoOp, IoOutput, IoRequest};
use thin_pool::PoolMode;

use crate::cut_model::{CLIENT, DeviceModel, Sector, ZERO, base, pattern};
use crate::{BS, DATA_BLOCKS, FIRST_POOL_BLOCKS, GROWTH_BLOCKS, ORIGIN_SECTORS, VOLUME_SECTORS};

/// Steps per workload: at most 3 new blocks each (a request covers at most 2
/// blocks' worth of sectors) and one import of a whole volume, so the data disk
/// always has room for what a queueing pool waits for.
const STEPS: usize = 26;
/// Polls without a completion after which requests count as stuck.
const STALL_POLLS: u32 = 4_000;
/// Timer calls (a millisecond apart) a job may take with the power on.
const JOB_TICKS: u32 = 200_000;

/// How the pool meets a full data device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Writes that need a block wait until the pool grows.
    Queue,
    ErrorIfNoSpace,
}

pub fn pool_table(policy: Policy, blocks: u64) -> String {
    let features = match policy {
        Policy::Queue => "",
        Policy::ErrorIfNoSpace => " 1 error_if_no_space",
    };
    format!("0 {} thin-pool vdb vdc {BS} 0{features}", blocks * BS)
}

pub fn thin_table(dev: u64, with_origin: bool) -> String {
    let origin = if with_origin { " vdd" } else { "" };
    format!("0 {VOLUME_SECTORS} thin pool {dev}{origin}")
}

/// One step of a workload. Devices are picked by position among the live ones when
/// the step runs.
#[derive(Clone, Debug)]
pub enum Step {
    Write {
        pick: usize,
        sector: u64,
        sectors: u64,
        fua: bool,
        seed: u64,
    },
    WriteZeroes {
        pick: usize,
        sector: u64,
        sectors: u64,
        unmap: bool,
        fua: bool,
    },
    FastZero {
        pick: usize,
        sector: u64,
        sectors: u64,
    },
    Trim {
        pick: usize,
        sector: u64,
        sectors: u64,
        fua: bool,
    },
    Flush {
        pick: usize,
    },
    Read {
        pick: usize,
        sector: u64,
        sectors: u64,
    },
    Wait,
    /// The pool's timer runs a second later (periodic commit, background deletes).
    Tick,
    Snapshot {
        pick: usize,
    },
    Delete {
        pick: usize,
    },
    ReserveMetadataSnap,
    ReleaseMetadataSnap,
    Grow,
    /// `thin import` of a live device into a new one, run to its end.
    Import {
        pick: usize,
    },
    /// `thin merge-origin` of device 0 into the external origin, run to its end,
    /// after deleting the other devices that read the origin and trimming device 0's
    /// blocks past the origin's last whole block (the merge refuses both).
    MergeOrigin,
}

pub fn workload(seed: u64) -> Vec<Step> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut imported = false;
    (0..STEPS)
        .map(|_| {
            let pick = rng.usize(..8);
            let sector = rng.u64(..VOLUME_SECTORS);
            let sectors = rng.u64(1..=(2 * BS).min(VOLUME_SECTORS - sector));
            match rng.u32(..100) {
                0..34 => Step::Write {
                    pick,
                    sector,
                    sectors,
                    fua: rng.bool(),
                    seed: rng.u64(..),
                },
                34..41 => Step::WriteZeroes {
                    pick,
                    sector,
                    sectors,
                    unmap: rng.bool(),
                    fua: rng.bool(),
                },
                41..44 => Step::FastZero {
                    pick,
                    sector,
                    sectors,
                },
                44..50 => Step::Trim {
                    pick,
                    sector,
                    sectors,
                    fua: rng.bool(),
                },
                50..58 => Step::Flush { pick },
                58..63 => Step::Read {
                    pick,
                    sector,
                    sectors,
                },
                63..68 => Step::Wait,
                68..72 => Step::Tick,
                72..79 => Step::Snapshot { pick },
                79..83 => Step::Delete { pick },
                83..86 => Step::ReserveMetadataSnap,
                86..89 => Step::ReleaseMetadataSnap,
                89..93 => Step::Grow,
                93..97 if !imported => {
                    imported = true;
                    Step::Import { pick }
                }
                93..97 => Step::Wait,
                _ => Step::MergeOrigin,
            }
        })
        .collect()
}

/// A request in flight and what its success means.
struct Pending {
    dev: u64,
    /// (sector, version) of what it writes.
    writes: Vec<(u64, usize)>,
    fua: bool,
    /// For a flush: what had completed on each device when it was submitted.
    flush: Option<BTreeMap<u64, BTreeMap<u64, usize>>>,
    /// For a read: the range it reads and the versions it may find.
    read: Option<(u64, BTreeMap<u64, usize>)>,
}

pub struct Runner {
    dm: Rc<RefCell<DeviceMapper>>,
    nbd: NbdBackend,
    policy: Policy,
    origin: Rc<Vec<u8>>,
    /// Devices created and not deleted, with their exports and models.
    exports: BTreeMap<u64, ExportHandle>,
    models: BTreeMap<u64, DeviceModel>,
    pending: BTreeMap<u64, Pending>,
    next_tag: u64,
    next_dev: u64,
    pool_blocks: u64,
    clock: Rc<Cell<u64>>,
    power: CrashDisk,
    /// Imports and merges into the origin that ran to their end with the power on.
    pub imports: u64,
    pub merges: u64,
    /// Device I/Os of the import and merge steps: power cuts there land inside them.
    pub job_ios: u64,
}

impl Runner {
    /// A runner on a device mapper that has brought back the prepared pool and its
    /// thin devices 0 (over the external origin) and 1.
    pub fn new(
        dm: Rc<RefCell<DeviceMapper>>,
        policy: Policy,
        origin: Rc<Vec<u8>>,
        power: CrashDisk,
    ) -> Self {
        let mut nbd = NbdBackend::new(Rc::clone(&dm));
        let exports = [0, 1]
            .map(|dev| (dev, nbd.open(&format!("t{dev}"), CLIENT).expect("export").0))
            .into();
        let models = [0, 1]
            .map(|dev| {
                let model = DeviceModel {
                    with_origin: dev == 0,
                    ..DeviceModel::default()
                };
                (dev, model)
            })
            .into();
        Runner {
            dm,
            nbd,
            policy,
            origin,
            exports,
            models,
            pending: BTreeMap::new(),
            next_tag: 0,
            next_dev: 2,
            pool_blocks: FIRST_POOL_BLOCKS,
            clock: Rc::new(Cell::new(0)),
            power,
            imports: 0,
            merges: 0,
            job_ios: 0,
        }
    }

    /// Waits for the requests in flight; returns the models of the live devices.
    pub fn finish(mut self) -> BTreeMap<u64, DeviceModel> {
        self.wait();
        std::mem::take(&mut self.models)
    }

    fn pick(&self, pick: usize) -> u64 {
        *self
            .exports
            .keys()
            .nth(pick % self.exports.len())
            .expect("a live device")
    }

    fn power_on(&self) -> bool {
        !self.power.power_lost()
    }

    fn tick(&self, nanoseconds: u64) {
        self.clock.set(self.clock.get() + nanoseconds);
        let clock = Rc::clone(&self.clock);
        self.dm.borrow_mut().tick(&move || clock.get());
    }

    fn completed_everywhere(&self) -> BTreeMap<u64, BTreeMap<u64, usize>> {
        self.models
            .iter()
            .map(|(&dev, model)| (dev, model.completed.clone()))
            .collect()
    }

    /// Everything completed so far is durable (a message or a commit).
    fn promise_completed(&mut self) {
        for model in self.models.values_mut() {
            let completed = model.completed.clone();
            model.promise_all(&completed);
        }
    }

    /// Whether a request in flight on `dev` writes or reads a sector of `range`.
    fn busy(&self, dev: u64, range: (u64, u64)) -> bool {
        let touches = |sector: u64| (range.0..range.1).contains(&sector);
        self.pending.values().any(|p| {
            p.dev == dev
                && (p.writes.iter().any(|&(sector, _)| touches(sector))
                    || p.read
                        .as_ref()
                        .is_some_and(|(_, from)| from.keys().any(|&s| touches(s))))
        })
    }

    /// Submits `op` on `dev`, which touches the sectors in `range`; `data` gives their
    /// new contents if it changes them.
    fn submit(
        &mut self,
        dev: u64,
        op: IoOp,
        range: (u64, u64),
        data: Option<&dyn Fn(u64) -> Sector>,
    ) {
        if self.busy(dev, range) {
            self.wait();
        }
        let (fua, flush, read) = match &op {
            IoOp::Write { fua, .. } | IoOp::WriteZeroes { fua, .. } | IoOp::Trim { fua, .. } => {
                (*fua, None, None)
            }
            IoOp::Flush => (false, Some(self.completed_everywhere()), None),
            IoOp::Read { sector, buf } => {
                let model = &self.models[&dev];
                let from = (0..buf.len() as u64 / SECTOR_SIZE as u64)
                    .map(|n| {
                        (
                            sector + n,
                            model.completed.get(&(sector + n)).copied().unwrap_or(0),
                        )
                    })
                    .collect();
                (false, None, Some((*sector, from)))
            }
            _ => (false, None, None),
        };
        let origin = Rc::clone(&self.origin);
        let model = self.models.get_mut(&dev).expect("a modelled device");
        let writes = match data {
            Some(data) => (range.0..range.1)
                .map(|sector| (sector, model.write(&origin, sector, data(sector))))
                .collect(),
            None => Vec::new(),
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        self.pending.insert(
            tag,
            Pending {
                dev,
                writes,
                fua,
                flush,
                read,
            },
        );
        let mut request = IoRequest {
            tag,
            export: self.exports[&dev],
            op,
        };
        loop {
            match self.nbd.submit(request) {
                Ok(()) => return,
                Err(nbd::QueueFull(back)) => {
                    request = back;
                    self.progress();
                }
            }
        }
    }

    fn wait(&mut self) {
        while !self.pending.is_empty() {
            self.progress();
        }
    }

    /// Polls until a request completes. Requests stuck waiting for pool space grow
    /// the pool; stuck otherwise is a failure while the power is on, and after a cut
    /// they are given up on.
    fn progress(&mut self) {
        for polls in 0..STALL_POLLS {
            let done = self.nbd.poll();
            if let Some(done) = done {
                return self.complete(done);
            }
            if polls % 64 == 63 {
                self.tick(1_000_000);
            }
        }
        if self.power_on() {
            let mode = self.dm.borrow().pool("pool").map(|pool| pool.mode());
            assert!(
                self.policy == Policy::Queue && mode == Ok(PoolMode::OutOfDataSpace),
                "{} requests stuck with the power on, pool mode {mode:?}",
                self.pending.len()
            );
            if self.grow() {
                return;
            }
            assert!(
                !self.power_on(),
                "a queueing pool is full and cannot grow further"
            );
        }
        self.pending.clear();
    }

    fn complete(&mut self, done: IoCompletion) {
        let Some(request) = self.pending.remove(&done.tag) else {
            assert!(!self.power_on(), "a completion nobody waits for");
            return;
        };
        let Some(model) = self.models.get_mut(&request.dev) else {
            return;
        };
        match done.result {
            Ok(output) => {
                for &(sector, version) in &request.writes {
                    model.completed.insert(sector, version);
                    if request.fua {
                        model.promise(sector, version);
                    }
                }
                if let (Some((at, from)), IoOutput::Read { buf, .. }) = (&request.read, &output) {
                    for (n, found) in buf.chunks(SECTOR_SIZE).enumerate() {
                        let sector = at + n as u64;
                        assert!(
                            model.allows(&self.origin, sector, found, from),
                            "device {} sector {sector} reads data it may not hold",
                            request.dev
                        );
                    }
                }
                if let Some(flushed) = &request.flush {
                    for (dev, completed) in flushed {
                        if let Some(model) = self.models.get_mut(dev) {
                            model.promise_all(completed);
                        }
                    }
                }
            }
            Err(BackendError::NoSpace) if self.policy == Policy::ErrorIfNoSpace => {}
            Err(BackendError::NotFast) if request.read.is_none() => {}
            Err(error) => assert!(
                !self.power_on(),
                "a request on device {} failed with the power on: {error:?}",
                request.dev
            ),
        }
    }

    /// Sends a pool message; a success commits.
    fn message(&mut self, text: &str) -> bool {
        let result = self.dm.borrow_mut().message("pool", text);
        match result {
            Ok(()) => {
                self.promise_completed();
                true
            }
            Err(error) => {
                assert!(
                    !self.power_on() || text.ends_with("metadata_snap"),
                    "{}",
                    error.0
                );
                false
            }
        }
    }

    /// Reloads the pool with more of the data disk and resumes it; false when it
    /// has all of it already or the power failed.
    fn grow(&mut self) -> bool {
        if self.pool_blocks >= DATA_BLOCKS {
            return false;
        }
        let blocks = (self.pool_blocks + GROWTH_BLOCKS).min(DATA_BLOCKS);
        let mut dm = self.dm.borrow_mut();
        let grown = dm
            .reload("pool", &pool_table(self.policy, blocks))
            .and_then(|()| dm.resume("pool"));
        match grown {
            Ok(_) => {
                self.pool_blocks = blocks;
                true
            }
            Err(error) => {
                assert!(self.power.power_lost(), "growing failed: {}", error.0);
                false
            }
        }
    }

    /// Calls the timer until `ended` says the job is over, growing a queueing pool
    /// that runs out of space on the way; false if the power failed first.
    fn run_job(&mut self, ended: &dyn Fn(&mut DeviceMapper) -> bool) -> bool {
        for ticks in 0..JOB_TICKS {
            if !self.power_on() {
                return false;
            }
            if ended(&mut self.dm.borrow_mut()) {
                return true;
            }
            self.tick(1_000_000);
            let full = self
                .dm
                .borrow()
                .pool("pool")
                .is_ok_and(|pool| pool.mode() == PoolMode::OutOfDataSpace);
            if ticks % 1_000 == 999 && full && self.policy == Policy::Queue {
                self.grow();
            }
        }
        panic!("a job did not end within {JOB_TICKS} timer calls");
    }

    /// Reads all of `dev`, checked against what completed there.
    fn read_all(&mut self, dev: u64) {
        for sector in (0..VOLUME_SECTORS).step_by(2 * BS as usize) {
            let sectors = (2 * BS).min(VOLUME_SECTORS - sector);
            let op = IoOp::Read {
                sector,
                buf: IoBuf::with_sectors(sectors as usize),
            };
            self.submit(dev, op, (sector, sector + sectors), None);
        }
        self.wait();
    }

    /// What `dev` reads at `sector` once its requests have completed.
    fn content(&self, dev: u64, sector: u64) -> Sector {
        self.models[&dev].content(&self.origin, sector)
    }

    /// `thin import` of device `source` into a new device (no origin), which may
    /// hold zeros or the copy until the next commit.
    fn import(&mut self, source: u64) {
        self.wait();
        // The id the import's new volume takes: one past the highest.
        let devices = self.dm.borrow().pool("pool").map(|pool| pool.devices());
        let Ok(Ok(devices)) = devices else {
            assert!(!self.power_on(), "the pool lists no devices");
            return;
        };
        let dev = devices.into_iter().max().map_or(0, |highest| highest + 1);
        let name = format!("t{dev}");
        let from = ImportFrom::Local(format!("t{source}"));
        let started = self
            .dm
            .borrow_mut()
            .import(&name, "pool", from, None, self.clock.get());
        if let Err(error) = started {
            assert!(!self.power_on(), "{}", error.0);
            return;
        }
        self.next_dev = self.next_dev.max(dev + 1);
        let origin = Rc::clone(&self.origin);
        let mut model = DeviceModel::default();
        let mut copied = BTreeMap::new();
        for sector in 0..VOLUME_SECTORS {
            let data = self.content(source, sector);
            if data != ZERO {
                copied.insert(sector, model.write(&origin, sector, data));
            }
        }
        let (export, _) = self.nbd.open(&name, CLIENT).expect("a new export");
        self.exports.insert(dev, export);
        self.models.insert(dev, model);
        if !self.run_job(&|dm| dm.import_job_id(&name).is_none()) {
            return;
        }
        let outcome = self.dm.borrow_mut().import_outcome(&name);
        match outcome {
            Some(Ok(_)) => {
                self.models.get_mut(&dev).expect("imported").completed = copied;
                self.imports += 1;
                self.read_all(dev);
            }
            Some(Err(why)) => assert!(
                !self.power_on() || self.policy == Policy::ErrorIfNoSpace,
                "{why}"
            ),
            None => assert!(!self.power_on(), "the import of {name} has no outcome"),
        }
    }

    /// `thin delete` of `dev`.
    fn delete(&mut self, dev: u64) {
        self.wait();
        let export = self.exports.remove(&dev).expect("live");
        self.models.remove(&dev);
        self.nbd.close(export, CLIENT);
        // Whether or not the delete got through, the device is not checked.
        let deleted = self.dm.borrow_mut().thin_delete(&format!("t{dev}"));
        if let Err(error) = deleted {
            assert!(!self.power_on(), "{}", error.0);
        }
    }

    /// `thin merge-origin` of device 0: its content does not change, the origin
    /// takes it.
    fn merge_origin(&mut self) {
        if !self.models.contains_key(&0) {
            return;
        }
        let others: Vec<u64> = self
            .models
            .iter()
            .filter(|&(&dev, model)| dev != 0 && model.with_origin)
            .map(|(&dev, _)| dev)
            .collect();
        for dev in others {
            self.delete(dev);
        }
        let first = ORIGIN_SECTORS / BS * BS;
        self.run(&Step::Trim {
            pick: self.exports.keys().position(|&dev| dev == 0).expect("live"),
            sector: first,
            sectors: VOLUME_SECTORS - first,
            fua: false,
        });
        self.wait();
        let started = self.dm.borrow_mut().thin_merge_origin("t0");
        if let Err(error) = started {
            assert!(!self.power_on(), "{}", error.0);
            return;
        }
        let ended = |dm: &mut DeviceMapper| {
            dm.pool("pool")
                .is_ok_and(|pool| pool.origin_merges().is_empty())
        };
        if !self.run_job(&ended) {
            return;
        }
        let mut origin = self.origin.to_vec();
        for sector in 0..ORIGIN_SECTORS {
            let at = sector as usize * SECTOR_SIZE;
            origin[at..at + SECTOR_SIZE].copy_from_slice(&self.content(0, sector));
        }
        self.origin = Rc::new(origin);
        self.merges += 1;
        self.read_all(0);
    }

    pub fn run(&mut self, step: &Step) {
        let origin = Rc::clone(&self.origin);
        match *step {
            Step::Write {
                pick,
                sector,
                sectors,
                fua,
                seed,
            } => {
                let dev = self.pick(pick);
                let bytes = pattern(seed, sectors as usize * SECTOR_SIZE);
                let data = |s: u64| {
                    let at = (s - sector) as usize * SECTOR_SIZE;
                    bytes[at..at + SECTOR_SIZE].try_into().expect("one sector")
                };
                let op = IoOp::Write {
                    sector,
                    buf: IoBuf::from_slice(&bytes),
                    fua,
                };
                self.submit(dev, op, (sector, sector + sectors), Some(&data));
            }
            Step::WriteZeroes {
                pick,
                sector,
                sectors,
                unmap,
                fua,
            } => {
                let dev = self.pick(pick);
                let op = IoOp::WriteZeroes {
                    sector,
                    sectors,
                    fua,
                    may_unmap: unmap,
                    fast_only: false,
                };
                self.submit(dev, op, (sector, sector + sectors), Some(&|_| ZERO));
            }
            Step::FastZero {
                pick,
                sector,
                sectors,
            } => {
                let dev = self.pick(pick);
                let op = IoOp::WriteZeroes {
                    sector,
                    sectors,
                    fua: false,
                    may_unmap: true,
                    fast_only: true,
                };
                self.submit(dev, op, (sector, sector + sectors), Some(&|_| ZERO));
            }
            Step::Trim {
                pick,
                sector,
                sectors,
                fua,
            } => {
                let dev = self.pick(pick);
                // Only the whole blocks inside the range are unmapped.
                let (first, last) = (sector.div_ceil(BS) * BS, (sector + sectors) / BS * BS);
                let op = IoOp::Trim {
                    sector,
                    sectors,
                    fua,
                };
                let with_origin = self.models[&dev].with_origin;
                let data = |s| base(&origin, with_origin, s);
                self.submit(dev, op, (first, last.max(first)), Some(&data));
            }
            Step::Flush { pick } => {
                let dev = self.pick(pick);
                self.submit(dev, IoOp::Flush, (0, 0), None);
            }
            Step::Read {
                pick,
                sector,
                sectors,
            } => {
                let dev = self.pick(pick);
                let op = IoOp::Read {
                    sector,
                    buf: IoBuf::with_sectors(sectors as usize),
                };
                self.submit(dev, op, (sector, sector + sectors), None);
            }
            Step::Wait => self.wait(),
            Step::Tick => self.tick(1_100_000_000),
            Step::Snapshot { pick } => {
                self.wait();
                let origin = self.pick(pick);
                let dev = self.next_dev;
                self.next_dev += 1;
                if !self.message(&format!("create_snap {dev} {origin}")) {
                    return;
                }
                let mut model = self.models[&origin].clone();
                let completed = model.completed.clone();
                model.promise_all(&completed);
                let table = thin_table(dev, model.with_origin);
                let created =
                    self.dm
                        .borrow_mut()
                        .create(&format!("t{dev}"), false, &table, Format::Never);
                match created {
                    Ok(_) => {
                        let (export, _) = self
                            .nbd
                            .open(&format!("t{dev}"), CLIENT)
                            .expect("a new export");
                        self.exports.insert(dev, export);
                        self.models.insert(dev, model);
                    }
                    Err(error) => assert!(!self.power_on(), "{}", error.0),
                }
            }
            Step::Delete { pick } => {
                if self.exports.len() >= 2 {
                    self.delete(self.pick(pick));
                }
            }
            Step::ReserveMetadataSnap => {
                self.wait();
                self.message("reserve_metadata_snap");
            }
            Step::ReleaseMetadataSnap => {
                self.wait();
                self.message("release_metadata_snap");
            }
            Step::Grow => {
                self.grow();
            }
            Step::Import { pick } => {
                let before = self.power.operations();
                self.import(self.pick(pick));
                self.job_ios += self.power.operations() - before;
            }
            Step::MergeOrigin => {
                let before = self.power.operations();
                self.merge_origin();
                self.job_ios += self.power.operations() - before;
            }
        }
    }
}
