//! The whole stack against a power cut at every device I/O.
//!
//! A seeded random workload runs through the NBD backend on the device mapper: a pool
//! (error_if_no_space or queueing writes when full) on a metadata and a data disk, thin
//! devices with and without an external origin, the configuration area on a fourth
//! disk, all four on one power supply. It writes with every size and alignment (with
//! and without FUA), zeroes (unmapping or not, and fast only), trims, flushes, reads
//! back and checks, snapshots, deletes (released in the background), reserves and
//! releases a metadata snapshot, lets the timer commit, runs out of data space and
//! grows the pool by reload and resume, imports a device into a new one (`thin import
//! --from DEVICE`) and merges the device over the external origin into that origin
//! (`thin merge-origin`), each job run to its end. Each workload runs once to count
//! its device I/O, then once per I/O index with the power failing there. The disks
//! are rebuilt four ways: unflushed writes dropped, all kept, a random subset of their
//! sectors kept, or all kept with the write the power failed at torn.
//!
//! After each cut the metadata passes the project's checker (every block referenced
//! exactly as counted: none leaked, none owned twice), and the real `thin_check` on
//! every [`THIN_CHECK_EVERY`]th cut and on any failure; a fresh device mapper brings the
//! devices back from the configuration area, and every device the workload was told
//! exists reads back, sector by sector, a version it may hold: the one a completed
//! FLUSH, a FUA write, a commit or the snapshot's creation made durable, or one written
//! after it (an imported device: zeros or the copy, until something commits it).
//!
//! CI runs at least [`CI_CUTS`] cuts; `SWEEP_CUTS=N` runs at least N and prints the
//! rate. A new kind of job is one more `Step` and its arm in `Runner::run` (in the
//! workload module).

#[path = "../cut_model/mod.rs"]
mod cut_model;
mod workload;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Instant;

use blockdev::{CrashDisk, IoBuf, MemDisk, SECTOR_SIZE};
use cut_model::{
    CLIENT, DeviceModel, crash_disks, cuts_wanted, handles, mapper, pattern, rebuild,
    rebuild_modes, restore, run_request,
};
use dm::{Format, State};
use nbd::{Backend, IoOp, IoOutput};
use persistent_data::thin::{FormatPolicy, OpenOptions, ThinMetadata};
use workload::{Policy, Runner, Step, pool_table, thin_table, workload};

/// Data block size (64 KiB).
const BS: u64 = 128;
const CONFIG_SECTORS: u64 = 4096;
const META_SECTORS: u64 = 4096;
/// The data disk; the pool starts on part of it and grows onto the rest.
const DATA_BLOCKS: u64 = 92;
const FIRST_POOL_BLOCKS: u64 = 12;
const GROWTH_BLOCKS: u64 = 20;
/// The external origin ends inside a block, and before the devices end.
const ORIGIN_SECTORS: u64 = 6 * BS + 37;
const VOLUME_SECTORS: u64 = 12 * BS;
const CI_CUTS: u64 = 5_000;
const THIN_CHECK_EVERY: u64 = 64;

/// The disks after setup: the configuration area holds a pool and two thin devices,
/// one over the external origin.
fn prepared(policy: Policy) -> Vec<MemDisk> {
    let disks = vec![
        MemDisk::new(CONFIG_SECTORS),
        MemDisk::new(META_SECTORS),
        MemDisk::new(DATA_BLOCKS * BS),
        MemDisk::new(ORIGIN_SECTORS),
    ];
    // Stale data a device must never show.
    disks[2].write_at(0, &pattern(2, (DATA_BLOCKS * BS) as usize * SECTOR_SIZE));
    disks[3].write_at(0, &origin_image());
    let mut dm = mapper(
        disks
            .iter()
            .map(|disk| Box::new(disk.handle()) as _)
            .collect(),
    );
    dm.config_init("vda", [7; 16], false).unwrap();
    dm.create(
        "pool",
        false,
        &pool_table(policy, FIRST_POOL_BLOCKS),
        Format::IfBlank,
    )
    .unwrap();
    for dev in [0, 1] {
        dm.message("pool", &format!("create_thin {dev}")).unwrap();
        dm.create(
            &format!("t{dev}"),
            false,
            &thin_table(dev, dev == 0),
            Format::Never,
        )
        .unwrap();
    }
    dm.flush_disks().unwrap();
    disks
}

fn origin_image() -> Vec<u8> {
    pattern(0x0816, ORIGIN_SECTORS as usize * SECTOR_SIZE)
}

/// What a run leaves: the disks, the models of the live devices, its I/O count
/// after setup and at the end, and the imports and merges into the origin that ran
/// to their end.
struct Outcome {
    disks: Vec<CrashDisk>,
    models: BTreeMap<u64, DeviceModel>,
    start: u64,
    end: u64,
    jobs: [u64; 3],
}

fn run_workload(
    prepared: &[MemDisk],
    policy: Policy,
    steps: &[Step],
    seed: u64,
    cut: Option<u64>,
) -> Outcome {
    let disks = crash_disks(prepared);
    let devices = handles(&disks, 2048, 32, |n| (n == 2).then_some(seed));
    let dm = Rc::new(RefCell::new(mapper(devices)));
    restore(&mut dm.borrow_mut());
    let start = disks[0].operations();
    disks[0].fail_at(cut);
    let mut runner = Runner::new(dm, policy, Rc::new(origin_image()), disks[0].handle());
    for step in steps {
        runner.run(step);
    }
    let jobs = [runner.imports, runner.merges, runner.job_ios];
    let models = runner.finish();
    let end = disks[0].operations();
    Outcome {
        disks,
        models,
        start,
        end,
        jobs,
    }
}

/// Checks disks rebuilt after a cut (bringing the devices back may write to them);
/// `Err` says what is wrong.
fn check_cut(
    disks: &[MemDisk],
    models: &BTreeMap<u64, DeviceModel>,
    origin: &[u8],
) -> Result<(), String> {
    let options = OpenOptions {
        data_block_size: BS as u32,
        cache_blocks: 1024,
        format: FormatPolicy::Never,
    };
    let (mut metadata, _) = ThinMetadata::open(Box::new(disks[1].handle()), &options)
        .map_err(|error| format!("the metadata does not open: {error}"))?;
    let report = persistent_data::check::check(&mut metadata)
        .map_err(|error| format!("the checker failed: {error}"))?;
    if !report.is_clean() {
        return Err(format!("the checker found {:?}", report.problems));
    }
    let mut dm = mapper(
        disks
            .iter()
            .map(|disk| Box::new(disk.handle()) as _)
            .collect(),
    );
    let notes = dm.restore();
    for (&dev, model) in models {
        let name = format!("t{dev}");
        match dm.device(&name).map(|device| device.state()) {
            Ok(State::Active(_)) => {}
            _ => return Err(format!("{name} did not come back: {notes:?}")),
        }
        let (export, _) = dm
            .open(&name, CLIENT)
            .map_err(|error| format!("{name}: {error:?}"))?;
        for at in (0..VOLUME_SECTORS).step_by(512) {
            let op = IoOp::Read {
                sector: at,
                buf: IoBuf::with_sectors(512),
            };
            let Ok(IoOutput::Read { buf, .. }) = run_request(&mut dm, export, op) else {
                return Err(format!("reading {name} failed"));
            };
            for (n, found) in buf.chunks(SECTOR_SIZE).enumerate() {
                let sector = at + n as u64;
                if !model.allows(origin, sector, found, &model.durable_from) {
                    let why = model.refusal(origin, sector, found);
                    return Err(format!("{name} sector {sector} {why}"));
                }
            }
        }
    }
    Ok(())
}

fn thin_check(metadata: &MemDisk) -> Result<(), String> {
    let mut image = vec![0u8; (META_SECTORS * 512) as usize];
    metadata.read_at(0, &mut image);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta");
    std::fs::write(&path, &image).unwrap();
    host_tools::thin_check(&path)
}

/// What a sweep did.
#[derive(Default)]
struct Tally {
    workloads: u64,
    cuts: u64,
    thin_checks: u64,
    /// Imports and merges into the origin in the workloads (cuts land inside them).
    imports: u64,
    merges: u64,
    /// Cuts at a device I/O of an import or merge step.
    job_cuts: u64,
}

/// Runs workloads from seed 0 on, each with a cut at every device I/O, until at least
/// `cuts` rebuilt disk sets were checked; long runs print their progress.
fn sweep(cuts: u64) -> Tally {
    let started = Instant::now();
    host_tools::require_for_test(&[host_tools::Tool::ThinCheck]);
    let prepared = [Policy::Queue, Policy::ErrorIfNoSpace].map(|policy| (policy, prepared(policy)));
    let origin = origin_image();
    let mut tally = Tally::default();
    for seed in 0.. {
        if tally.cuts >= cuts {
            break;
        }
        let (policy, disks) = &prepared[seed as usize % 2];
        let steps = workload(seed);
        let whole = run_workload(disks, *policy, &steps, seed, None);
        tally.imports += whole.jobs[0];
        tally.merges += whole.jobs[1];
        tally.job_cuts += whole.jobs[2] * 4;
        for cut in whole.start..=whole.end {
            let run = run_workload(disks, *policy, &steps, seed, Some(cut));
            for unflushed in rebuild_modes(seed, cut) {
                let sampled = tally.cuts % THIN_CHECK_EVERY == 0;
                let rebuilt = rebuild(&run.disks, unflushed);
                let tool = sampled.then(|| thin_check(&rebuilt[1]));
                let mut verdict = check_cut(&rebuilt, &run.models, &origin);
                if verdict.is_err() || sampled {
                    tally.thin_checks += 1;
                    // The check may have changed the disks: the tool gets them as rebuilt.
                    let tool =
                        tool.unwrap_or_else(|| thin_check(&rebuild(&run.disks, unflushed)[1]));
                    verdict = match (verdict, tool) {
                        (Ok(()), tool) => tool,
                        (Err(ours), Ok(())) => Err(format!("{ours} (thin_check passes)")),
                        (Err(ours), Err(tool)) => Err(format!("{ours}; {tool}")),
                    };
                }
                if let Err(why) = verdict {
                    panic!(
                        "{policy:?} seed {seed}, cut at I/O {cut}, {unflushed:?}: {why}\nsteps: {steps:?}"
                    );
                }
                tally.cuts += 1;
            }
        }
        tally.workloads += 1;
        if cuts > CI_CUTS && tally.workloads % 20 == 0 {
            tally.print(started.elapsed().as_secs_f64());
        }
    }
    tally
}

#[test]
fn the_whole_stack_survives_a_power_cut_at_every_io() {
    let cuts = cuts_wanted("SWEEP_CUTS", CI_CUTS);
    let started = Instant::now();
    let tally = sweep(cuts);
    tally.print(started.elapsed().as_secs_f64());
    assert!(tally.cuts >= cuts);
}

impl Tally {
    fn print(&self, seconds: f64) {
        println!(
            "{} workloads ({} imports, {} merges into the origin): {} power cuts checked ({} \
             inside those steps, {} with thin_check) in {seconds:.1} s ({:.0} per second)",
            self.workloads,
            self.imports,
            self.merges,
            self.cuts,
            self.job_cuts,
            self.thin_checks,
            self.cuts as f64 / seconds
        );
    }
}
