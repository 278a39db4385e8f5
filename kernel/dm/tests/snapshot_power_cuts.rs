//! The dm-snapshot stack against a power cut at every device I/O, with requests in
//! flight.
//!
//! LVM's stack on four crash disks on one power supply (the configuration area, the
//! origin, and two COW devices): `base` (`snapshot-origin` over `base-real`), `s1`
//! (`snapshot ... P 8`) made at setup, and `s2` (`snapshot ... P 2`, 1 KiB chunks,
//! so commits cross metadata areas) added under the live origin during the
//! workload. A seeded workload sends rounds of concurrent requests — origin writes
//! that copy out into both snapshots, snapshot writes, reads checked against the
//! model, flushes, FUA — then hands `s1` over to `snapshot-merge` as LVM does and
//! goes on writing to the merging origin and to `s2` while the merge runs to its end.
//! Each workload runs once to count its device I/O, then once per I/O index with the
//! power failing there, and the disks are rebuilt four ways (unflushed writes
//! dropped, all kept, a random subset kept, the last write torn).
//!
//! After each cut: each COW device the configuration uses parses as Linux reads it
//! (header, areas, records up to the end marker, every record pointing at a data
//! chunk of its own inside the device); a fresh device mapper restores the stack from
//! the configuration area; every device reads back, sector by sector, a version the
//! workload may have left (what a completed FLUSH or FUA write made durable, or
//! newer); no snapshot is invalid (the COW devices never fill up); `base` reads the
//! origin's model while it is `snapshot-origin` and `s1`'s (with the later writes)
//! once it is `snapshot-merge`; and an interrupted merge then runs to its end on the
//! restored stack, after which `base` reads what it read before.
//!
//! CI runs at least [`CI_CUTS`] cuts; `SNAPSHOT_SWEEP_CUTS=N` runs at least N.

#[path = "cut_model/mod.rs"]
mod cut_model;

use std::collections::BTreeMap;
use std::time::Instant;

use blockdev::{BlockDevice, CrashDisk, IoBuf, MemDisk, SECTOR_SIZE};
use cut_model::{
    CLIENT, DeviceModel, Sector, crash_disks, cuts_wanted, handles, mapper, pattern, rebuild,
    rebuild_modes, restore, run_request,
};
use dm::{DeviceMapper, Format, State};
use nbd::{Backend, ExportHandle, IoCompletion, IoOp, IoOutput, IoRequest};
use snapshot::{Header, MAGIC, area_chunk, records_per_area};

const CONFIG_SECTORS: u64 = 4096;
const ORIGIN_SECTORS: u64 = 512;
/// Room for every chunk of the origin in either COW device, with its metadata.
const COW_SECTORS: u64 = 1024;
const S1_TABLE: &str = "0 512 snapshot base-real vdc P 8";
const S2_TABLE: &str = "0 512 snapshot base-real vdd P 2";
const MERGE_TABLE: &str = "0 512 snapshot-merge base-real vdc P 8";
/// Five workloads, about 7 s.
const CI_CUTS: u64 = 5_000;
/// Polls without a completion after which requests count as stuck.
const STALL_POLLS: u32 = 4_000;
/// Timer calls (a millisecond apart) the merge may take with the power on.
const MERGE_TICKS: u32 = 20_000;

fn origin_image() -> Vec<u8> {
    pattern(0x5a17, ORIGIN_SECTORS as usize * SECTOR_SIZE)
}

/// The disks after setup: `base` as `snapshot-origin` of `base-real` with the
/// snapshot `s1`, all in the configuration area.
fn prepared() -> Vec<MemDisk> {
    let disks = vec![
        MemDisk::new(CONFIG_SECTORS),
        MemDisk::new(ORIGIN_SECTORS),
        MemDisk::new(COW_SECTORS),
        MemDisk::new(COW_SECTORS),
    ];
    disks[1].write_at(0, &origin_image());
    // Stale data a snapshot must never show.
    for cow in &disks[2..] {
        cow.write_at(4096, &pattern(9, (COW_SECTORS - 8) as usize * SECTOR_SIZE));
    }
    let mut dm = mapper(
        disks
            .iter()
            .map(|disk| Box::new(disk.handle()) as _)
            .collect(),
    );
    dm.config_init("vda", [5; 16], false).unwrap();
    dm.create("base", false, "0 512 linear vdb 0", Format::Never)
        .unwrap();
    dm.create("base-real", false, "0 512 linear vdb 0", Format::Never)
        .unwrap();
    dm.suspend("base").unwrap();
    dm.create("s1", false, S1_TABLE, Format::IfBlank).unwrap();
    dm.reload("base", "0 512 snapshot-origin base-real")
        .unwrap();
    dm.resume("base").unwrap();
    dm.flush_disks().unwrap();
    disks
}

/// One request of a round.
#[derive(Clone, Debug)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        fua: bool,
        seed: u64,
    },
    Read {
        sector: u64,
        sectors: u64,
    },
    Flush,
}

/// One step of a workload; requests name their device.
#[derive(Clone, Debug)]
enum Step {
    /// Requests sent together, then waited for.
    Round(Vec<(&'static str, Op)>),
    /// `s2` added under the live origin.
    CreateS2,
    /// `s1` handed over to `snapshot-merge` of `base`.
    HandOver,
    /// Timer calls while the merge runs.
    Ticks(u32),
    /// The merge run to its end.
    FinishMerge,
}

fn round(rng: &mut fastrand::Rng, seed: u64, devices: &[&'static str]) -> Step {
    let mut planned: Vec<(&'static str, Op)> = Vec::new();
    for n in 0..rng.usize(1..7) {
        let device = devices[rng.usize(..devices.len())];
        let sectors = rng.u64(1..25);
        let sector = rng.u64(..ORIGIN_SECTORS - sectors);
        let op = match rng.u8(..20) {
            0..=10 => Op::Write {
                sector,
                sectors,
                fua: rng.u8(..4) == 0,
                seed: seed * 1000 + n as u64,
            },
            11..=16 => Op::Read { sector, sectors },
            _ => Op::Flush,
        };
        // Overlapping requests of one device in one round have no defined order:
        // a round has none that involve a write.
        let span = |op: &Op| match *op {
            Op::Write {
                sector, sectors, ..
            } => Some((sector, sectors, true)),
            Op::Read { sector, sectors } => Some((sector, sectors, false)),
            Op::Flush => None,
        };
        let clash = planned.iter().any(|(other_device, other)| {
            let (Some(a), Some(b)) = (span(&op), span(other)) else {
                return false;
            };
            *other_device == device && (a.2 || b.2) && a.0 < b.0 + b.1 && b.0 < a.0 + a.1
        });
        if !clash {
            planned.push((device, op));
        }
    }
    Step::Round(planned)
}

fn workload(seed: u64) -> Vec<Step> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut steps = Vec::new();
    let mut rounds = 0;
    let mut rounds_of = |rng: &mut fastrand::Rng, count: usize, devices: &[&'static str]| {
        let mut out = Vec::new();
        for _ in 0..count {
            rounds += 1;
            out.push(round(rng, seed * 100 + rounds, devices));
        }
        out
    };
    steps.extend(rounds_of(&mut rng, 3, &["base", "s1"]));
    steps.push(Step::CreateS2);
    steps.extend(rounds_of(&mut rng, 3, &["base", "s1", "s2"]));
    steps.push(Step::HandOver);
    for step in rounds_of(&mut rng, 3, &["base", "s2"]) {
        steps.push(step);
        steps.push(Step::Ticks(rng.u32(1..4)));
    }
    steps.push(Step::FinishMerge);
    steps
}

/// What the workload did to `s1` and `base` at the hand-over.
#[derive(Clone)]
struct HandOver {
    /// `base`'s model up to the hand-over.
    origin: DeviceModel,
    /// The configuration saved the merge (the hand-over went through).
    saved: bool,
}

/// A request in flight and what its success means.
struct Pending {
    device: &'static str,
    writes: Vec<(u64, usize)>,
    fua: bool,
    /// For a flush: what had completed on its device when it was sent.
    flush: Option<BTreeMap<u64, usize>>,
    /// For a read: its first sector.
    read: Option<u64>,
}

/// One step of a `dm` sequence.
type DmCall<'a> = &'a dyn Fn(&mut DeviceMapper) -> Result<(), dm::Error>;

struct Runner {
    dm: DeviceMapper,
    origin: Vec<u8>,
    exports: BTreeMap<&'static str, ExportHandle>,
    models: BTreeMap<&'static str, DeviceModel>,
    pending: BTreeMap<u64, Pending>,
    next_tag: u64,
    clock: u64,
    power: CrashDisk,
    hand_over: Option<HandOver>,
    /// `s2` exists (its creation went through).
    s2: bool,
    /// What a snapshot made under the live origin showed of it at its creation.
    inherited: BTreeMap<&'static str, BTreeMap<u64, usize>>,
}

impl Runner {
    fn power_on(&self) -> bool {
        !self.power.power_lost()
    }

    fn open(&mut self, device: &'static str) {
        let (export, _) = self.dm.open(device, CLIENT).expect("an export");
        self.exports.insert(device, export);
    }

    fn tick(&mut self) {
        self.clock += 1_000_000;
        let clock = self.clock;
        self.dm.tick(&move || clock);
    }

    fn submit(&mut self, device: &'static str, op: &Op) {
        let model = self.models.get_mut(device).expect("a modelled device");
        let (io, pending) = match *op {
            Op::Write {
                sector,
                sectors,
                fua,
                seed,
            } => {
                let bytes = pattern(seed, sectors as usize * SECTOR_SIZE);
                let writes = (0..sectors)
                    .map(|n| {
                        let at = n as usize * SECTOR_SIZE;
                        let data: Sector = bytes[at..at + SECTOR_SIZE].try_into().unwrap();
                        (sector + n, model.write(&self.origin, sector + n, data))
                    })
                    .collect();
                let io = IoOp::Write {
                    sector,
                    buf: IoBuf::from_slice(&bytes),
                    fua,
                };
                (
                    io,
                    Pending {
                        device,
                        writes,
                        fua,
                        flush: None,
                        read: None,
                    },
                )
            }
            Op::Read { sector, sectors } => {
                let io = IoOp::Read {
                    sector,
                    buf: IoBuf::with_sectors(sectors as usize),
                };
                (
                    io,
                    Pending {
                        device,
                        writes: Vec::new(),
                        fua: false,
                        flush: None,
                        read: Some(sector),
                    },
                )
            }
            Op::Flush => {
                // A snapshot's flush goes to its COW device only: what it shows of
                // the origin stays as durable as the origin made it.
                let inherited = self.inherited.get(device);
                let own = model
                    .completed
                    .iter()
                    .filter(|(sector, version)| {
                        inherited.and_then(|from| from.get(sector)) != Some(version)
                    })
                    .map(|(&sector, &version)| (sector, version))
                    .collect();
                (
                    IoOp::Flush,
                    Pending {
                        device,
                        writes: Vec::new(),
                        fua: false,
                        flush: Some(own),
                        read: None,
                    },
                )
            }
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        self.pending.insert(tag, pending);
        let request = IoRequest {
            tag,
            export: self.exports[device],
            op: io,
        };
        self.dm.submit(request).expect("room for a round");
    }

    /// Waits for the requests in flight; after a cut, gives up on those stuck.
    fn wait(&mut self) {
        let mut idle = 0;
        while !self.pending.is_empty() {
            match self.dm.poll() {
                Some(done) => {
                    idle = 0;
                    self.complete(done);
                }
                None => {
                    idle += 1;
                    if idle % 64 == 63 {
                        self.tick();
                    }
                    if idle == STALL_POLLS {
                        assert!(
                            !self.power_on(),
                            "{} requests stuck with the power on",
                            self.pending.len()
                        );
                        self.pending.clear();
                    }
                }
            }
        }
    }

    fn complete(&mut self, done: IoCompletion) {
        let request = self.pending.remove(&done.tag).expect("a request in flight");
        let model = self.models.get_mut(request.device).expect("modelled");
        let output = match done.result {
            Ok(output) => output,
            Err(error) => {
                assert!(
                    self.power.power_lost(),
                    "a request on {} failed with the power on: {error:?}",
                    request.device
                );
                return;
            }
        };
        for &(sector, version) in &request.writes {
            model.completed.insert(sector, version);
            if request.fua {
                model.promise(sector, version);
            }
        }
        if let Some(completed) = &request.flush {
            model.promise_all(completed);
        }
        // (A read answered after the cut has nothing to say.)
        if let (Some(at), IoOutput::Read { buf, .. }, true) =
            (request.read, &output, !self.power.power_lost())
        {
            for (n, found) in buf.chunks(SECTOR_SIZE).enumerate() {
                let sector = at + n as u64;
                assert!(
                    model.content(&self.origin, sector)[..] == *found,
                    "{} sector {sector} reads what it does not hold",
                    request.device
                );
            }
        }
    }

    /// `dm` calls in LVM's order; false once one failed (after the power did).
    fn sequence(&mut self, calls: &[DmCall]) -> bool {
        for call in calls {
            if let Err(error) = call(&mut self.dm) {
                assert!(!self.power_on(), "{}", error.0);
                return false;
            }
        }
        true
    }

    fn run(&mut self, step: &Step) {
        match step {
            Step::Round(requests) => {
                for (device, op) in requests {
                    self.submit(device, op);
                }
                self.wait();
            }
            Step::CreateS2 => {
                let model = self.models["base"].clone();
                self.inherited.insert("s2", model.completed.clone());
                self.models.insert("s2", model);
                let created = self.sequence(&[
                    &|dm: &mut DeviceMapper| dm.suspend("base"),
                    &|dm: &mut DeviceMapper| {
                        dm.create("s2", false, S2_TABLE, Format::IfBlank).map(drop)
                    },
                    &|dm: &mut DeviceMapper| dm.resume("base").map(drop),
                ]);
                if created {
                    self.s2 = true;
                    self.open("s2");
                }
            }
            Step::HandOver => {
                let s1 = self.models["s1"].clone();
                let origin = self.models.insert("base", s1).expect("base");
                self.hand_over = Some(HandOver {
                    origin,
                    saved: false,
                });
                let saved = self.sequence(&[
                    &|dm: &mut DeviceMapper| dm.suspend("base"),
                    &|dm: &mut DeviceMapper| dm.reload("base", MERGE_TABLE),
                    &|dm: &mut DeviceMapper| dm.suspend("s1"),
                    &|dm: &mut DeviceMapper| dm.resume("base").map(drop),
                ]);
                if let Some(hand_over) = &mut self.hand_over {
                    hand_over.saved = saved;
                }
                if saved {
                    let export = self.exports.remove("s1").expect("s1");
                    self.dm.close(export, CLIENT);
                    self.models.remove("s1");
                    self.sequence(&[&|dm: &mut DeviceMapper| dm.remove("s1", true)]);
                }
            }
            Step::Ticks(count) => {
                for _ in 0..*count {
                    self.tick();
                }
            }
            Step::FinishMerge => {
                for _ in 0..MERGE_TICKS {
                    if !self.power_on() || self.dm.snapshot_merge_finished("base") {
                        return;
                    }
                    self.tick();
                }
                panic!("the merge did not end within {MERGE_TICKS} timer calls");
            }
        }
    }
}

/// What a run leaves: the disks, the runner's view, and its I/O count after setup
/// and at the end.
struct Outcome {
    disks: Vec<CrashDisk>,
    models: BTreeMap<&'static str, DeviceModel>,
    hand_over: Option<HandOver>,
    s2: bool,
    start: u64,
    end: u64,
}

fn run_workload(prepared: &[MemDisk], steps: &[Step], seed: u64, cut: Option<u64>) -> Outcome {
    let disks = crash_disks(prepared);
    let devices = handles(&disks, 64, 8, |n| (n > 0).then_some(seed * 4 + n as u64));
    let mut dm = mapper(devices);
    restore(&mut dm);
    let start = disks[0].operations();
    disks[0].fail_at(cut);
    let base = DeviceModel {
        with_origin: true,
        ..DeviceModel::default()
    };
    let mut runner = Runner {
        dm,
        origin: origin_image(),
        exports: BTreeMap::new(),
        models: [("base", base.clone()), ("s1", base)].into(),
        pending: BTreeMap::new(),
        next_tag: 0,
        clock: 0,
        power: disks[0].handle(),
        hand_over: None,
        s2: false,
        inherited: BTreeMap::new(),
    };
    runner.open("base");
    runner.open("s1");
    for step in steps {
        runner.run(step);
        if !runner.power_on() {
            break;
        }
    }
    let end = disks[0].operations();
    Outcome {
        disks,
        models: runner.models,
        hand_over: runner.hand_over,
        s2: runner.s2,
        start,
        end,
    }
}

/// Reads the COW device `cow` with chunks of `chunk` sectors as Linux reads it;
/// `Err` says how the store breaks Linux's format (or this store's rules: one
/// record per chunk, each at a data chunk of its own).
fn check_linux_format(cow: &MemDisk, chunk: u64) -> Result<(), String> {
    let mut block = vec![0u8; (chunk * 512) as usize];
    cow.read_at(0, &mut block);
    let header = Header::decode(&block);
    if header.magic != MAGIC || header.valid == 0 || header.version != 1 {
        return Err(format!("the header is not a valid one: {header:?}"));
    }
    if u64::from(header.chunk_size) != chunk {
        return Err(format!("the header says chunk size {}", header.chunk_size));
    }
    let chunks = cow.info().sectors / chunk;
    let per_area = records_per_area(chunk);
    let (mut olds, mut news) = (BTreeMap::new(), BTreeMap::new());
    for area in 0.. {
        let at = area_chunk(chunk, area);
        if at >= chunks {
            return Err(format!("area {area} would start past the device's end"));
        }
        cow.read_at(at * chunk * 512, &mut block);
        for (index, record) in block.chunks(16).enumerate() {
            let old = u64::from_le_bytes(record[..8].try_into().unwrap());
            let new = u64::from_le_bytes(record[8..].try_into().unwrap());
            if new == 0 {
                return Ok(());
            }
            if new >= chunks || (new - 1) % (per_area + 1) == 0 {
                return Err(format!("area {area} record {index}: chunk {old} at {new}"));
            }
            if let Some(other) = news.insert(new, old) {
                return Err(format!("chunks {other} and {old} both at COW chunk {new}"));
            }
            if olds.insert(old, new).is_some() {
                return Err(format!("chunk {old} has two records"));
            }
        }
    }
    unreachable!("the areas end at the device's end")
}

/// Reads all of device `name` of `dm`.
fn read_device(dm: &mut DeviceMapper, name: &str) -> Result<Vec<u8>, String> {
    let (export, _) = dm
        .open(name, CLIENT)
        .map_err(|error| format!("{name}: {error:?}"))?;
    let op = IoOp::Read {
        sector: 0,
        buf: IoBuf::with_sectors(ORIGIN_SECTORS as usize),
    };
    let read = run_request(dm, export, op);
    dm.close(export, CLIENT);
    match read {
        Ok(IoOutput::Read { buf, .. }) => Ok(buf.to_vec()),
        other => Err(format!("reading {name}: {other:?}")),
    }
}

fn check_content(
    name: &str,
    found: &[u8],
    model: &DeviceModel,
    origin: &[u8],
) -> Result<(), String> {
    for (sector, found) in found.chunks(SECTOR_SIZE).enumerate() {
        if !model.allows(origin, sector as u64, found, &model.durable_from) {
            let why = model.refusal(origin, sector as u64, found);
            return Err(format!("{name} sector {sector} {why}"));
        }
    }
    Ok(())
}

/// Checks disks rebuilt after a cut; `Err` says what is wrong.
fn check_cut(disks: &[MemDisk], run: &Outcome, origin: &[u8]) -> Result<(), String> {
    let mut dm = mapper(
        disks
            .iter()
            .map(|disk| Box::new(disk.handle()) as _)
            .collect(),
    );
    let notes = dm.restore();
    let table = |dm: &DeviceMapper, name: &str| {
        dm.device(name)
            .ok()
            .filter(|device| matches!(device.state(), State::Active(_)))
            .map(|device| device.table().to_string())
    };
    let Some(base_table) = table(&dm, "base") else {
        return Err(format!("base did not come back: {notes:?}"));
    };
    let merging = base_table.contains("snapshot-merge");
    let s1 = table(&dm, "s1");
    let s2 = table(&dm, "s2");
    for (name, live, chunk, disk) in [("s1", &s1, 8, 2), ("s2", &s2, 2, 3)] {
        // The snapshot `base` merges stays inactive if the configuration still has
        // it: `base` holds its COW device.
        let merged = name == "s1" && merging;
        if dm.device(name).is_ok() && live.is_none() && !merged {
            return Err(format!("{name} did not come back: {notes:?}"));
        }
        if live.is_some() || merged {
            check_linux_format(&disks[disk], chunk)
                .map_err(|why| format!("{name}'s COW device: {why}"))?;
        }
        if live.is_some() && dm.status_lines(dm.device(name).unwrap())[0].ends_with("Invalid") {
            return Err(format!("{name} is invalid: {notes:?}"));
        }
    }
    let before = run.hand_over.as_ref().map(|hand_over| &hand_over.origin);
    let base_model = match (merging, before) {
        (true, Some(_)) => &run.models["base"],
        (true, None) => return Err("base is merging before the hand-over".into()),
        (false, Some(before)) => before,
        (false, None) => &run.models["base"],
    };
    if run.hand_over.as_ref().is_some_and(|h| h.saved) && !merging {
        return Err(format!("the saved merge did not come back: {base_table}"));
    }
    let base = read_device(&mut dm, "base")?;
    check_content("base", &base, base_model, origin)?;
    match (&s1, merging) {
        (Some(_), false) => {
            let model = run
                .models
                .get("s1")
                .expect("s1 is modelled until the hand-over");
            check_content("s1", &read_device(&mut dm, "s1")?, model, origin)?;
        }
        (None, false) => return Err(format!("s1 did not come back: {notes:?}")),
        _ => {}
    }
    match (&s2, run.s2) {
        (Some(_), _) => check_content(
            "s2",
            &read_device(&mut dm, "s2")?,
            &run.models["s2"],
            origin,
        )?,
        (None, true) => return Err(format!("s2 did not come back: {notes:?}")),
        (None, false) => {}
    }
    if merging {
        let mut ticks = 0;
        while !dm.snapshot_merge_finished("base") {
            dm.tick(&|| ticks * 1_000_000);
            ticks += 1;
            if ticks == u64::from(MERGE_TICKS) {
                return Err("the merge did not end after the restore".into());
            }
        }
        if read_device(&mut dm, "base")? != base {
            return Err("base reads otherwise after its merge ended".into());
        }
        let mut on_origin = vec![0u8; base.len()];
        disks[1].read_at(0, &mut on_origin);
        if on_origin != base {
            return Err("the origin disk does not hold the merged content".into());
        }
    }
    Ok(())
}

/// What a sweep did.
#[derive(Default)]
struct Tally {
    workloads: u64,
    cuts: u64,
    /// Cuts after the hand-over started (inside the merge).
    merge_cuts: u64,
}

fn sweep(cuts: u64) -> Tally {
    let prepared = prepared();
    let origin = origin_image();
    let mut tally = Tally::default();
    for seed in 0.. {
        if tally.cuts >= cuts {
            break;
        }
        let steps = workload(seed);
        let whole = run_workload(&prepared, &steps, seed, None);
        for cut in whole.start..=whole.end {
            let run = run_workload(&prepared, &steps, seed, Some(cut));
            for unflushed in rebuild_modes(seed, cut) {
                let rebuilt = rebuild(&run.disks, unflushed);
                if let Err(why) = check_cut(&rebuilt, &run, &origin) {
                    panic!("seed {seed}, cut at I/O {cut}, {unflushed:?}: {why}\nsteps: {steps:?}");
                }
                tally.cuts += 1;
                tally.merge_cuts += u64::from(run.hand_over.is_some());
            }
        }
        tally.workloads += 1;
    }
    tally
}

#[test]
fn the_snapshot_stack_survives_a_power_cut_at_every_io() {
    let cuts = cuts_wanted("SNAPSHOT_SWEEP_CUTS", CI_CUTS);
    let started = Instant::now();
    let tally = sweep(cuts);
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{} workloads: {} power cuts checked ({} after the merge's hand-over began) in \
         {seconds:.1} s ({:.0} per second)",
        tally.workloads,
        tally.cuts,
        tally.merge_cuts,
        tally.cuts as f64 / seconds
    );
    assert!(tally.cuts >= cuts);
}
