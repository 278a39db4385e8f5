//! FLUSH and FUA against power cuts at every device I/O.
//!
//! Each scenario runs on a fresh pool whose metadata and data disks share one power
//! supply. It is run once to count the device I/O of its measured part, then again
//! for every I/O index of that part with the power failing there (and once more with
//! the power failing right after the last reply). After each cut the disks are
//! rebuilt three ways (unflushed writes dropped, kept, a random half kept), the pool
//! is reopened, and everything the scenario was promised must read back: the data
//! of every FUA request that completed successfully, and of every write completed
//! before a FLUSH that completed successfully (or what a request submitted later
//! wrote over it). The metadata must pass `thin_check`.

mod common;

use std::collections::BTreeMap;

use blockdev::{CrashDisk, IoBuf, MemDisk, Unflushed};
use common::*;
use thin_pool::{Pool, ThinOp, ThinRequest, ThinVolume};

/// One 4 KiB page, in sectors.
const PAGE: u64 = 8;
/// Pool data blocks (64 KiB each) and metadata sectors of every scenario.
const DATA_BLOCKS: u64 = 32;
const META_SECTORS: u64 = 4096;
const VOLUME_SECTORS: u64 = 16 * BS;

/// Sector of page `page` of virtual block `block`.
fn at(block: u64, page: u64) -> u64 {
    block * BS + page * PAGE
}

/// What a request will have made durable once it completes successfully.
#[derive(Clone)]
struct Content {
    sector: u64,
    bytes: Vec<u8>,
}

/// A submitted request.
struct Pending {
    /// Index of what it writes in [`Session::history`].
    content: Option<usize>,
    fua: bool,
    flush: bool,
    /// For a flush: writes completed before it was submitted.
    covers: Vec<usize>,
}

/// A scenario's view of the pool: submits requests, waits for them, and records
/// what their successful completions promise.
struct Session<'a> {
    pool: &'a Pool,
    vol: &'a mut ThinVolume,
    next_tag: u64,
    pending: BTreeMap<u64, Pending>,
    /// What every write-like request wrote, in submission order.
    history: Vec<Content>,
    /// Those that completed successfully (a later FLUSH covers them).
    completed: Vec<usize>,
    /// Those acknowledged as durable.
    promised: Vec<usize>,
    /// The device I/O index where the measured part starts.
    start: Option<u64>,
    disk: CrashDisk,
}

impl Session<'_> {
    /// The part before this is set-up; power cuts are swept over the rest.
    fn measure(&mut self) {
        self.start = Some(self.disk.operations());
    }

    fn submit(&mut self, op: ThinOp, content: Option<Content>) {
        let (fua, flush) = match &op {
            ThinOp::Write { fua, .. }
            | ThinOp::WriteZeroes { fua, .. }
            | ThinOp::Discard { fua, .. } => (*fua, false),
            ThinOp::Flush => (false, true),
            _ => (false, false),
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        let covers = if flush {
            self.completed.clone()
        } else {
            Vec::new()
        };
        let content = content.map(|content| {
            self.history.push(content);
            self.history.len() - 1
        });
        self.pending.insert(
            tag,
            Pending {
                content,
                fua,
                flush,
                covers,
            },
        );
        self.vol
            .submit_op(ThinRequest { tag, op })
            .expect("queue has room");
    }

    fn write(&mut self, sector: u64, bytes: &[u8], fua: bool) {
        let content = Content {
            sector,
            bytes: bytes.to_vec(),
        };
        let buf = IoBuf::from_slice(bytes);
        self.submit(ThinOp::Write { sector, buf, fua }, Some(content));
    }

    fn write_zeroes(&mut self, sector: u64, sectors: u64, fua: bool) {
        let content = Content {
            sector,
            bytes: vec![0; (sectors * 512) as usize],
        };
        let op = ThinOp::WriteZeroes {
            sector,
            sectors,
            unmap: true,
            fua,
        };
        self.submit(op, Some(content));
    }

    /// Discards whole blocks, which then read as zeros (no external origin).
    fn discard(&mut self, sector: u64, sectors: u64, fua: bool) {
        let content = Content {
            sector,
            bytes: vec![0; (sectors * 512) as usize],
        };
        let op = ThinOp::Discard {
            sector,
            sectors,
            fua,
        };
        self.submit(op, Some(content));
    }

    fn flush(&mut self) {
        self.submit(ThinOp::Flush, None);
    }

    /// Waits until every submitted request has completed, successfully or not.
    fn wait(&mut self) {
        while !self.pending.is_empty() {
            let Some(done) = self.vol.poll_op() else {
                continue;
            };
            let request = self.pending.remove(&done.tag).expect("a submitted tag");
            if done.result.is_err() {
                assert!(
                    self.disk.power_lost(),
                    "a request failed with the power on: {:?}",
                    done.result
                );
                continue;
            }
            if request.flush {
                self.promised.extend(request.covers);
            }
            if let Some(content) = request.content {
                if request.fua {
                    self.promised.push(content);
                }
                self.completed.push(content);
            }
        }
    }

    /// A snapshot of device 0 as device `dev`.
    fn snapshot(&mut self, dev: u64) {
        self.pool
            .message(&format!("create_snap {dev} 0"))
            .expect("snapshot");
    }
}

type Scenario = fn(&mut Session);

/// What one run of a scenario left behind.
struct Run {
    meta: CrashDisk,
    data: CrashDisk,
    promises: Promises,
    start: u64,
    end: u64,
}

/// For each sector some acknowledged request made durable: the versions it may
/// hold after a power cut (the acknowledged one, or one written by a request
/// submitted after it).
#[derive(Default)]
struct Promises(BTreeMap<u64, Vec<Vec<u8>>>);

impl Promises {
    fn new(history: &[Content], promised: &[usize]) -> Self {
        let mut latest: BTreeMap<u64, usize> = BTreeMap::new();
        for &index in promised {
            let content = &history[index];
            for n in 0..content.bytes.len() as u64 / 512 {
                let entry = latest.entry(content.sector + n).or_insert(index);
                *entry = (*entry).max(index);
            }
        }
        let mut versions: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
        for (&sector, &from) in &latest {
            for content in &history[from..] {
                let first = content.sector;
                let count = content.bytes.len() as u64 / 512;
                if (first..first + count).contains(&sector) {
                    let at = ((sector - first) * 512) as usize;
                    versions
                        .entry(sector)
                        .or_default()
                        .push(content.bytes[at..at + 512].to_vec());
                }
            }
        }
        Promises(versions)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn run_scenario(scenario: Scenario, cut: Option<u64>) -> Run {
    let mut rig = Rig::new(DATA_BLOCKS, META_SECTORS);
    rig.meta.share_power(&rig.data);
    rig.data
        .write_at(0, &pattern(0xdead, (DATA_BLOCKS * BS * 512) as usize));
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    let mut vol = pool.activate(0, VOLUME_SECTORS, None).unwrap();
    rig.meta.fail_at(cut);
    let mut session = Session {
        pool: &pool,
        vol: &mut vol,
        next_tag: 0,
        pending: BTreeMap::new(),
        history: Vec::new(),
        completed: Vec::new(),
        promised: Vec::new(),
        start: None,
        disk: rig.meta.handle(),
    };
    scenario(&mut session);
    session.wait();
    let start = session.start.expect("the scenario says where it starts");
    let promises = Promises::new(&session.history, &session.promised);
    let end = rig.meta.operations();
    drop(vol);
    drop(pool);
    Run {
        meta: rig.meta,
        data: rig.data,
        promises,
        start,
        end,
    }
}

/// Reopens the pool on the disks a power cut left and checks every promise.
fn check_after_cut(name: &str, cut: u64, meta: &MemDisk, data: &MemDisk, promises: &Promises) {
    let context = format!("{name}, power cut at I/O {cut}");
    let mut rig = Rig::new(DATA_BLOCKS, META_SECTORS);
    rig.meta = CrashDisk::from_disk(meta);
    rig.data = CrashDisk::from_disk(data);
    let image = Scratch::new("fua");
    save(&rig.meta, &image.path("meta"));
    thin_check(&image.path("meta"));
    let pool = rig
        .try_open()
        .unwrap_or_else(|e| panic!("{context}: reopening failed: {e}"));
    let mut vol = pool.activate(0, VOLUME_SECTORS, None).unwrap();
    for (&sector, versions) in &promises.0 {
        let found = read(&mut vol, sector, 1);
        assert!(
            versions.contains(&found),
            "{context}: sector {sector}, acknowledged as durable, is lost"
        );
    }
}

/// Sweeps power cuts over the measured part of `scenario`.
fn sweep(name: &str, scenario: Scenario) {
    require_tools();
    let whole = run_scenario(scenario, None);
    assert!(
        !whole.promises.is_empty(),
        "{name}: nothing was acknowledged as durable"
    );
    let mut checked = 0;
    for cut in whole.start..=whole.end {
        let run = run_scenario(scenario, Some(cut));
        if run.promises.is_empty() {
            continue;
        }
        checked += 1;
        for (n, unflushed) in [
            Unflushed::DropAll,
            Unflushed::KeepAll,
            Unflushed::Random(cut),
        ]
        .into_iter()
        .enumerate()
        {
            let meta = run.meta.after_power_loss(unflushed);
            let data = run.data.after_power_loss(match unflushed {
                Unflushed::Random(seed) => Unflushed::Random(seed + 1000 + n as u64),
                other => other,
            });
            check_after_cut(
                &format!("{name} ({unflushed:?})"),
                cut,
                &meta,
                &data,
                &run.promises,
            );
        }
    }
    assert!(checked > 0, "{name}: no cut came after an acknowledgement");
}

/// Fills a page with bytes that differ by `seed`.
fn page(seed: u64) -> Vec<u8> {
    pattern(seed, (PAGE * 512) as usize)
}

/// Writes block `block` whole and makes it durable (set-up).
fn committed_block(session: &mut Session, block: u64) {
    session.write(at(block, 0), &pattern(block, (BS * 512) as usize), false);
    session.wait();
    session.flush();
    session.wait();
}

#[test]
fn fua_write_behind_an_in_flight_write_to_the_same_new_block() {
    sweep("in flight", |s| {
        s.measure();
        s.write(at(3, 0), &page(1), false);
        s.write(at(3, 13), &page(2), true);
    });
}

#[test]
fn fua_write_to_a_block_provisioned_earlier_in_the_transaction() {
    sweep("provisioned earlier", |s| {
        s.measure();
        s.write(at(4, 0), &page(3), false);
        s.wait();
        s.write(at(4, 13), &page(4), true);
    });
}

#[test]
fn fua_write_to_a_fresh_block() {
    sweep("fresh block", |s| {
        s.measure();
        s.write(at(5, 13), &page(5), true);
    });
}

#[test]
fn fua_write_behind_an_in_flight_write_breaking_sharing() {
    sweep("sharing, in flight", |s| {
        committed_block(s, 6);
        s.snapshot(1);
        s.measure();
        s.write(at(6, 0), &page(6), false);
        s.write(at(6, 13), &page(7), true);
    });
}

#[test]
fn fua_write_after_sharing_was_broken_in_the_transaction() {
    sweep("sharing, earlier", |s| {
        committed_block(s, 7);
        s.snapshot(1);
        s.measure();
        s.write(at(7, 0), &page(8), false);
        s.wait();
        s.write(at(7, 13), &page(9), true);
    });
}

/// After a power cut a write-zeroes on a block provisioned in the lost transaction
/// would read as zeros anyway; with sharing broken it would read the snapshot's data.
#[test]
fn fua_write_zeroes_after_sharing_was_broken_in_the_transaction() {
    sweep("write-zeroes, sharing", |s| {
        committed_block(s, 8);
        s.snapshot(1);
        s.measure();
        s.write(at(8, 0), &page(10), false);
        s.wait();
        s.write_zeroes(at(8, 1), PAGE, true);
    });
}

#[test]
fn fua_write_zeroes_on_a_block_unmapped_in_the_transaction() {
    sweep("write-zeroes, unmapped", |s| {
        committed_block(s, 9);
        s.measure();
        s.discard(at(9, 0), BS, false);
        s.wait();
        s.write_zeroes(at(9, 3), PAGE, true);
    });
}

#[test]
fn fua_trim_of_a_committed_block_and_of_one_trimmed_in_the_transaction() {
    sweep("trim", |s| {
        committed_block(s, 10);
        committed_block(s, 11);
        s.measure();
        s.discard(at(10, 0), BS, true);
        s.wait();
        s.discard(at(11, 0), BS, false);
        s.wait();
        s.discard(at(11, 0), BS, true);
    });
}

#[test]
fn flush_after_writes_to_new_blocks() {
    sweep("flush", |s| {
        s.measure();
        s.write(at(12, 2), &page(11), false);
        s.write(at(13, 0), &pattern(12, (BS * 512) as usize), false);
        s.wait();
        s.flush();
    });
}

/// A FUA write to a block committed in an earlier transaction needs its data only:
/// no metadata commit, even with other changes pending.
#[test]
fn fua_write_to_a_committed_block_does_not_commit() {
    let mut rig = Rig::new(DATA_BLOCKS, META_SECTORS);
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    let mut vol = pool.activate(0, VOLUME_SECTORS, None).unwrap();
    write(&mut vol, at(1, 0), &page(1)).unwrap();
    flush(&mut vol).unwrap();
    // An uncommitted change elsewhere.
    write(&mut vol, at(2, 0), &page(2)).unwrap();
    let before = rig.meta.stats();
    let (result, _) = run(
        &mut vol,
        ThinOp::Write {
            sector: at(1, 5),
            buf: IoBuf::from_slice(&page(3)),
            fua: true,
        },
    );
    result.unwrap();
    assert_eq!(rig.meta.stats(), before, "the metadata was written");
    // The block written in this transaction does need the commit.
    let (result, _) = run(
        &mut vol,
        ThinOp::Write {
            sector: at(2, 5),
            buf: IoBuf::from_slice(&page(4)),
            fua: true,
        },
    );
    result.unwrap();
    assert!(rig.meta.stats().writes > before.writes, "no commit");
}

/// With changes pending and no further I/O, the periodic commit makes them durable
/// within the commit period (1 s), driven only by the clock; without the clock they
/// stay volatile.
#[test]
fn an_idle_pool_commits_within_the_period() {
    const SECOND: u64 = 1_000_000_000;
    for (idle_ns, survives) in [(0, false), (SECOND + SECOND / 10, true)] {
        let mut rig = Rig::new(DATA_BLOCKS, META_SECTORS);
        let pool = rig.open();
        pool.service(&|| 10 * SECOND);
        pool.message("create_thin 0").unwrap();
        let mut vol = pool.activate(0, VOLUME_SECTORS, None).unwrap();
        pool.service(&|| 20 * SECOND);
        write(&mut vol, at(1, 0), &page(1)).unwrap();
        if idle_ns > 0 {
            pool.service(&|| 20 * SECOND + idle_ns);
        }
        while pool.poll() {}
        drop(vol);
        drop(pool);
        rig.meta.power_cut(Unflushed::DropAll);
        rig.data.power_cut(Unflushed::DropAll);
        let pool = rig.open();
        let mut vol = pool.activate(0, VOLUME_SECTORS, None).unwrap();
        let found = read(&mut vol, at(1, 0), PAGE) == page(1);
        assert_eq!(found, survives, "after {idle_ns} ns idle");
    }
}

/// Requests waiting for a commit whose changes were rolled back fail: a metadata
/// write error during the commit rolls back the transaction, so the FUA write's
/// mapping is gone and it must not be acknowledged.
#[test]
fn fua_write_waiting_for_a_failed_commit_fails() {
    let mut rig = Rig::new(DATA_BLOCKS, META_SECTORS);
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    let mut vol = pool.activate(0, VOLUME_SECTORS, None).unwrap();
    write(&mut vol, at(1, 0), &page(1)).unwrap();
    // The metadata disk fails at its next write: the commit's.
    rig.meta.fail_at(Some(rig.meta.operations()));
    let (result, _) = run(
        &mut vol,
        ThinOp::Write {
            sector: at(1, 13),
            buf: IoBuf::from_slice(&page(2)),
            fua: true,
        },
    );
    assert!(result.is_err(), "acknowledged over a failed commit");
    assert!(flush(&mut vol).is_err(), "a later flush succeeded");
}
