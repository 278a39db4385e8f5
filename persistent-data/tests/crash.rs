//! Power-loss simulation: a workload runs on a [`CrashDisk`] whose power fails at
//! every possible write or flush; the disk a reboot would see (unflushed writes
//! dropped, kept, or a random sector subset in random order) must open as exactly
//! the last committed transaction (or the one whose commit was in flight), with
//! exact reference counts.

mod common;

use blockdev::{CrashDisk, MemDisk, Unflushed};
use common::*;
use persistent_data::Result;
use persistent_data::thin::{FormatPolicy, OpenOptions, ThinMetadata};

/// What the workload managed to commit before the power failed.
#[derive(Default)]
struct Outcome {
    committed: Option<XmlDump>,
    in_flight: Option<XmlDump>,
}

fn commit(md: &mut ThinMetadata, outcome: &mut Outcome) -> Result<()> {
    let expected = our_dump(md);
    outcome.in_flight = Some(expected.clone());
    md.commit()?;
    outcome.committed = Some(expected);
    outcome.in_flight = None;
    Ok(())
}

fn workload(md: &mut ThinMetadata, seed: u64, outcome: &mut Outcome) -> Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed | 1);
    md.create_thin(1)?;
    for round in 0..6u64 {
        for _ in 0..150 + rng.u64(..200) {
            let v = rng.u64(..4000);
            let data = md.alloc_data_block()?;
            if let Some(old) = md.insert(1, v, data)? {
                md.dec_data_block(old)?;
            }
        }
        match round {
            1 => md.create_snap(2, 1)?,
            2 => {
                // Reserving commits first: record that commit.
                commit(md, outcome)?;
                md.reserve_metadata_snap()?;
            }
            3 => {
                let begin = rng.u64(..2000);
                for run in md.remove_range(2, begin, begin + 1500)? {
                    for i in 0..run.len {
                        md.dec_data_block(run.data_begin + i)?;
                    }
                }
            }
            4 => md.release_metadata_snap()?,
            5 => md.delete(2)?,
            _ => {}
        }
        md.set_transaction_id(round, round + 1)?;
        commit(md, outcome)?;
    }
    Ok(())
}

fn formatted_disk() -> MemDisk {
    let disk = MemDisk::new(4 << 11);
    let mut md = open(&disk, 64);
    md.resize_data(30_000).unwrap();
    md.commit().unwrap();
    disk
}

fn reopen(disk: MemDisk) -> ThinMetadata {
    let mut options = OpenOptions::new(DATA_BLOCK_SIZE);
    options.cache_blocks = 64;
    options.format = FormatPolicy::Never;
    ThinMetadata::open(Box::new(disk), &options)
        .expect("metadata must open after any power loss")
        .0
}

/// Runs the workload once with the power failing at `fail_at`; checks every loss mode.
fn crash_case(base: &MemDisk, seed: u64, fail_at: Option<u64>, modes: &[Unflushed]) -> u64 {
    let crash = CrashDisk::from_disk(base);
    let mut options = OpenOptions::new(DATA_BLOCK_SIZE);
    options.cache_blocks = 64;
    options.format = FormatPolicy::Never;
    let mut outcome = Outcome::default();
    let mut md = ThinMetadata::open(Box::new(crash.handle()), &options)
        .unwrap()
        .0;
    let initial = our_dump(&mut md);
    crash.fail_at(fail_at);
    let result = workload(&mut md, seed, &mut outcome);
    assert_eq!(
        result.is_err(),
        crash.power_lost(),
        "errors only from the power loss"
    );
    let operations = crash.operations();
    for &mode in modes {
        let mut back = reopen(crash.after_power_loss(mode));
        let got = our_dump(&mut back);
        let last = outcome.committed.clone().unwrap_or_else(|| initial.clone());
        assert!(
            got == last || outcome.in_flight.as_ref() == Some(&got),
            "seed {seed}, power lost at operation {fail_at:?}, {mode:?}: reopened metadata is neither the last commit nor the one in flight"
        );
        let report = persistent_data::check::check(&mut back).unwrap();
        assert!(
            report.is_clean(),
            "seed {seed} at {fail_at:?} {mode:?}: {:#?}",
            report.problems
        );
    }
    operations
}

#[test]
fn power_loss_at_every_write_keeps_the_last_commit() {
    let base = formatted_disk();
    let mut cases = 0;
    for seed in 1..=10u64 {
        let total = crash_case(&base, seed, None, &[Unflushed::DropAll]);
        assert!(total > 30, "workload too small: {total} operations");
        for fail_at in 0..total {
            let modes = [
                Unflushed::DropAll,
                Unflushed::KeepAll,
                Unflushed::Random(seed * 1_000_003 + fail_at),
            ];
            crash_case(&base, seed, Some(fail_at), &modes);
            cases += modes.len();
        }
    }
    assert!(cases > 1000, "only {cases} crash cases");
}

#[test]
fn abort_after_failed_commit_returns_to_the_last_commit() {
    let base = formatted_disk();
    let total = crash_case(&base, 5, None, &[Unflushed::DropAll]);
    for fail_at in (0..total).step_by(7) {
        let crash = CrashDisk::from_disk(&base);
        let mut options = OpenOptions::new(DATA_BLOCK_SIZE);
        options.cache_blocks = 64;
        options.format = FormatPolicy::Never;
        let mut md = ThinMetadata::open(Box::new(crash.handle()), &options)
            .unwrap()
            .0;
        crash.fail_at(Some(fail_at));
        let mut outcome = Outcome::default();
        if workload(&mut md, 5, &mut outcome).is_ok() {
            continue;
        }
        // The device came back (a transient failure): abort must restore the last
        // commit that reached the disk.
        crash.fail_at(None);
        md.abort().unwrap();
        let got = our_dump(&mut md);
        let durable = our_dump(&mut reopen(crash.after_power_loss(Unflushed::KeepAll)));
        assert_eq!(got, durable);
        let report = persistent_data::check::check(&mut md).unwrap();
        assert!(report.is_clean(), "{:#?}", report.problems);
    }
}
