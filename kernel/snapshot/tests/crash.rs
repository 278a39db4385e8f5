//! Power cuts at every device I/O: during exception commits (origin writes with
//! copy-out into two snapshots, snapshot writes) and during a merge (with another
//! snapshot of the origin taking copy-outs). Each cut is followed by a reboot that
//! keeps a random part of the unflushed writes; the snapshots are loaded again and
//! compared with the model, and an interrupted merge is resumed to the end.

mod common;

use blockdev::{BlockDevice, CrashDisk, MemDisk, Unflushed};
use common::{PERSISTENT, contents};
use snapshot::{MergeStep, Snapshot, write_origin};

/// A handle as a driver would give it: 1 MiB per request, 32 in flight.
fn handle(disk: &CrashDisk) -> Box<dyn BlockDevice> {
    let mut info = disk.info().clone();
    info.max_transfer_sectors = 2048;
    info.queue_depth = 32;
    Box::new(disk.handle_with_info(info))
}

fn bytes(disk: &CrashDisk) -> Vec<u8> {
    let mut out = vec![0u8; disk.info().bytes() as usize];
    disk.read_at(0, &mut out);
    out
}

/// Disks on one power supply, started from `images`.
fn boot(images: &[&MemDisk]) -> Vec<CrashDisk> {
    let disks: Vec<CrashDisk> = images
        .iter()
        .map(|image| CrashDisk::from_disk(image))
        .collect();
    for disk in &disks[1..] {
        disks[0].share_power(disk);
    }
    disks
}

fn open(origin: &CrashDisk, cow: &CrashDisk, chunk: u32) -> Snapshot {
    let length = origin.info().sectors;
    Snapshot::open(handle(origin), handle(cow), PERSISTENT, chunk, length)
        .unwrap_or_else(|error| panic!("open: {error}"))
        .0
}

fn read_all(snapshot: &mut Snapshot, sectors: u64, merging: bool) -> Vec<u8> {
    let mut out = vec![0u8; sectors as usize * 512];
    if merging {
        snapshot.merge_read(0, &mut out).unwrap();
    } else {
        snapshot.read(0, &mut out).unwrap();
    }
    out
}

/// Each 512-byte sector of `seen` equals `before` or, inside `range`, `after`.
fn assert_old_or_new(seen: &[u8], before: &[u8], after: &[u8], range: (u64, u64), what: &str) {
    for (sector, piece) in seen.chunks(512).enumerate() {
        let at = sector * 512..sector * 512 + 512;
        let inside = (range.0..range.0 + range.1).contains(&(sector as u64));
        let ok = piece == &before[at.clone()] || (inside && piece == &after[at]);
        assert!(ok, "{what}: sector {sector} is neither old nor new");
    }
}

#[derive(Clone, Copy)]
enum Op {
    Origin {
        sector: u64,
        sectors: u64,
        seed: u64,
    },
    Snap {
        which: usize,
        sector: u64,
        sectors: u64,
        seed: u64,
    },
}

fn data(seed: u64, sectors: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = vec![0u8; sectors as usize * 512];
    rng.fill(&mut out);
    out
}

const ORIGIN: u64 = 1024;

/// Makes the power fail at the `cut`-th write, flush or discard from now on.
fn cut_power(disks: &[CrashDisk], cut: Option<u64>) {
    disks[0].fail_at(cut.map(|cut| disks[0].operations() + cut));
}

/// Loads both snapshots, then runs `ops` with the power failing at I/O `cut`;
/// returns how many completed (all, or up to the one the power cut failed).
fn run_ops(disks: &[CrashDisk], ops: &[Op], cut: Option<u64>) -> usize {
    let [origin, cow_a, cow_b] = disks else {
        unreachable!()
    };
    let mut snaps = [open(origin, cow_a, 1), open(origin, cow_b, 8)];
    cut_power(disks, cut);
    let mut writer = handle(origin);
    for (done, op) in ops.iter().enumerate() {
        let result = match *op {
            Op::Origin {
                sector,
                sectors,
                seed,
            } => {
                let [a, b] = &mut snaps;
                write_origin(
                    writer.as_mut(),
                    &mut [a, b],
                    sector,
                    &data(seed, sectors),
                    false,
                )
                .and_then(|()| blockdev::run_sync(writer.as_mut(), blockdev::Command::Flush))
                .map(drop)
            }
            Op::Snap {
                which,
                sector,
                sectors,
                seed,
            } => snaps[which]
                .write(sector, &data(seed, sectors))
                .and_then(|()| snaps[which].flush()),
        };
        if result.is_err() {
            return done;
        }
    }
    ops.len()
}

#[test]
fn power_cut_at_every_io_of_exception_commits() {
    let mut rng = fastrand::Rng::with_seed(7);
    let ops: Vec<Op> = (0..24)
        .map(|_| {
            let sectors = rng.u64(1..=16);
            let sector = rng.u64(0..=ORIGIN - sectors);
            let seed = rng.u64(..);
            if rng.bool() {
                Op::Origin {
                    sector,
                    sectors,
                    seed,
                }
            } else {
                Op::Snap {
                    which: rng.usize(..2),
                    sector,
                    sectors,
                    seed,
                }
            }
        })
        .collect();
    let origin = MemDisk::new(ORIGIN);
    origin.write_at(0, &data(1, ORIGIN));
    let (cow_a, cow_b) = (MemDisk::new(1024), MemDisk::new(2048));
    // Format both stores first: the sweep cuts I/O of the operations.
    let disks = boot(&[&origin, &cow_a, &cow_b]);
    assert_eq!(run_ops(&disks, &[], None), 0);
    let (cow_a, cow_b) = (disks[1].contents(), disks[2].contents());
    // The model after each prefix of operations: origin and both views.
    let mut states = vec![[contents(&origin), contents(&origin), contents(&origin)]];
    for op in &ops {
        let mut next = states.last().unwrap().clone();
        match *op {
            Op::Origin {
                sector,
                sectors,
                seed,
            } => next[0][sector as usize * 512..][..sectors as usize * 512]
                .copy_from_slice(&data(seed, sectors)),
            Op::Snap {
                which,
                sector,
                sectors,
                seed,
            } => next[1 + which][sector as usize * 512..][..sectors as usize * 512]
                .copy_from_slice(&data(seed, sectors)),
        }
        states.push(next);
    }
    let disks = boot(&[&origin, &cow_a, &cow_b]);
    let before = disks[0].operations();
    assert_eq!(run_ops(&disks, &ops, None), ops.len());
    let total = disks[0].operations() - before;
    assert!(total > 200, "{total} I/Os");
    for cut in 0..total {
        let disks = boot(&[&origin, &cow_a, &cow_b]);
        let done = run_ops(&disks, &ops, Some(cut));
        assert!(done < ops.len(), "cut {cut} hit no operation");
        let after: Vec<MemDisk> = disks
            .iter()
            .map(|disk| disk.after_power_loss(Unflushed::Random(cut)))
            .collect();
        let rebooted = boot(&after.iter().collect::<Vec<_>>());
        let (before, later) = (&states[done], &states[done + 1]);
        let range = match ops[done] {
            Op::Origin {
                sector, sectors, ..
            } => [(sector, sectors), (0, 0), (0, 0)],
            Op::Snap {
                which,
                sector,
                sectors,
                ..
            } => {
                let mut ranges = [(0, 0); 3];
                ranges[1 + which] = (sector, sectors);
                ranges
            }
        };
        let what = format!("cut {cut} in operation {done}");
        assert_old_or_new(&bytes(&rebooted[0]), &before[0], &later[0], range[0], &what);
        for (which, chunk) in [(1, 1), (2, 8)] {
            let mut snap = open(&rebooted[0], &rebooted[which], chunk);
            let seen = read_all(&mut snap, ORIGIN, false);
            let what = format!("{what}, snapshot {which}");
            assert_old_or_new(&seen, &before[which], &later[which], range[which], &what);
        }
    }
}

/// A merge set-up with `P 1` (32 records per area): 60 shuffled origin copy-outs and
/// a run of 20 snapshot writes, so three areas and runs of one and many chunks.
/// Returns origin, the merging COW, the other snapshot's COW, and the views.
fn merge_setup() -> (MemDisk, MemDisk, MemDisk, Vec<u8>, Vec<u8>) {
    let origin = MemDisk::new(512);
    origin.write_at(0, &data(3, 512));
    let cow = MemDisk::new(256);
    let mut snap = Snapshot::open(
        Box::new(origin.handle()),
        Box::new(cow.handle()),
        PERSISTENT,
        1,
        512,
    )
    .unwrap()
    .0;
    let mut writer = origin.handle();
    for k in 0..60u64 {
        let chunk = (k * 7) % 300;
        write_origin(
            &mut writer,
            &mut [&mut snap],
            chunk,
            &data(100 + k, 1),
            false,
        )
        .unwrap();
    }
    snap.write(400, &data(4, 20)).unwrap();
    assert_eq!(snap.exception_count(), 80);
    let mut view = vec![0u8; 512 * 512];
    snap.read(0, &mut view).unwrap();
    let other_view = contents(&origin);
    (origin, cow, MemDisk::new(2048), view, other_view)
}

/// Loads the merging snapshot and the other one, and steps the merge until it ends
/// or fails (the power failing at its I/O `cut`).
fn merge(disks: &[CrashDisk], budget: u64, want: &[u8], cut: Option<u64>) -> MergeStep {
    let [origin, cow, other_cow] = disks else {
        unreachable!()
    };
    let mut merging = open(origin, cow, 1);
    let mut other = open(origin, other_cow, 8);
    merging.start_merge().unwrap();
    assert!(read_all(&mut merging, 512, true) == want, "view at load");
    cut_power(disks, cut);
    loop {
        match merging.merge_step(&mut [&mut other], budget) {
            MergeStep::Working => {}
            end => return end,
        }
    }
}

#[test]
fn power_cut_at_every_io_of_a_merge_then_resume() {
    let (origin, cow, other_cow, view, other_view) = merge_setup();
    // The other snapshot exists (formatted) before the merge starts.
    let other_cow = {
        let disks = boot(&[&origin, &other_cow]);
        drop(open(&disks[0], &disks[1], 8));
        disks[1].contents()
    };
    let disks = boot(&[&origin, &cow, &other_cow]);
    assert_eq!(merge(&disks, 4, &view, None), MergeStep::Finished);
    assert!(bytes(&disks[0]) == view);
    let total = disks[0].operations();
    assert!(total > 250, "{total} I/Os");
    for cut in 0..total {
        let disks = boot(&[&origin, &cow, &other_cow]);
        assert_eq!(
            merge(&disks, 4, &view, Some(cut)),
            MergeStep::Failed,
            "cut {cut}"
        );
        let after: Vec<MemDisk> = disks
            .iter()
            .map(|disk| disk.after_power_loss(Unflushed::Random(cut)))
            .collect();
        let rebooted = boot(&after.iter().collect::<Vec<_>>());
        assert_eq!(
            merge(&rebooted, 4, &view, None),
            MergeStep::Finished,
            "cut {cut}"
        );
        assert!(
            bytes(&rebooted[0]) == view,
            "cut {cut}: merged origin differs"
        );
        let mut other = open(&rebooted[0], &rebooted[2], 8);
        assert!(
            read_all(&mut other, 512, false) == other_view,
            "cut {cut}: the other snapshot changed"
        );
    }
}

#[test]
fn writes_during_a_merge_land_in_the_merged_origin() {
    let (origin, cow, other_cow, mut view, other_view) = merge_setup();
    let disks = boot(&[&origin, &cow, &other_cow]);
    let mut merging = open(&disks[0], &disks[1], 1);
    let mut other = open(&disks[0], &disks[2], 8);
    merging.start_merge().unwrap();
    let mut rng = fastrand::Rng::with_seed(11);
    let mut held: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut blocked = 0;
    loop {
        let step = merging.merge_step(&mut [&mut other], 2);
        held.retain(|(sector, bytes)| {
            if merging.merge_blocks(*sector, (bytes.len() / 512) as u64) {
                return true;
            }
            merging
                .merge_write(&mut [&mut other], *sector, bytes, false)
                .unwrap();
            false
        });
        for _ in 0..2 {
            let sectors = rng.u64(1..=8);
            let sector = rng.u64(0..=512 - sectors);
            let bytes = data(rng.u64(..), sectors);
            view[sector as usize * 512..][..bytes.len()].copy_from_slice(&bytes);
            if merging.merge_blocks(sector, sectors) {
                blocked += 1;
                held.push((sector, bytes));
            } else {
                merging
                    .merge_write(&mut [&mut other], sector, &bytes, false)
                    .unwrap();
            }
        }
        assert!(read_all(&mut merging, 512, true) == view || !held.is_empty());
        if step == MergeStep::Finished && held.is_empty() {
            break;
        }
    }
    assert!(blocked > 0, "some writes met the run being merged");
    assert_eq!(merging.status(), "2/256 2");
    assert!(bytes(&disks[0]) == view, "the origin holds every write");
    assert!(read_all(&mut other, 512, false) == other_view);
    let progress = merging.merge_progress().unwrap();
    assert_eq!((progress.merged, progress.total), (80, 80));
}

/// Queue room for one copy-out batch's requests on each device, and the write, flush
/// or discard (from now on) the power fails at.
struct Squeeze {
    origin_depth: u16,
    origin_transfer: u32,
    cow_depth: u16,
    fail_after: u64,
}

/// Writes the origin's first chunk (a batch copying it out of the snapshot's way)
/// with the power failing as `squeeze` says: the write must fail and the snapshot
/// turn invalid. (Run on a thread, so that a batch that never ends fails the test
/// instead of hanging it.)
fn assert_copy_out_fails_with_the_power(squeeze: Squeeze) {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let origin = MemDisk::new(256);
        origin.write_at(0, &data(3, 256));
        let disks = boot(&[&origin, &MemDisk::new(512)]);
        let mut origin_info = disks[0].info().clone();
        origin_info.queue_depth = squeeze.origin_depth;
        origin_info.max_transfer_sectors = squeeze.origin_transfer;
        let mut cow_info = disks[1].info().clone();
        cow_info.queue_depth = squeeze.cow_depth;
        let (mut snapshot, _) = Snapshot::open(
            Box::new(disks[0].handle_with_info(origin_info)),
            Box::new(disks[1].handle_with_info(cow_info)),
            PERSISTENT,
            8,
            256,
        )
        .unwrap();
        disks[0].fail_at(Some(disks[0].operations() + squeeze.fail_after));
        let written = write_origin(
            handle(&disks[0]).as_mut(),
            &mut [&mut snapshot],
            0,
            &data(4, 64),
            false,
        );
        sender.send((written.is_err(), snapshot.health())).unwrap();
    });
    let outcome = receiver
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the failed batch ends");
    assert_eq!(outcome, (true, snapshot::Health::Invalid));
}

/// A copy that fails while the batch's other requests still wait for room on the
/// COW device ends the batch (the snapshot turns invalid) rather than waiting for
/// requests that were never sent: the power fails at the second copy, with room
/// for one request at a time on the COW device.
#[test]
fn a_failed_copy_with_requests_still_queued_ends_the_batch() {
    let squeeze = Squeeze {
        origin_depth: 32,
        origin_transfer: 64,
        cow_depth: 1,
        fail_after: 1,
    };
    assert_copy_out_fails_with_the_power(squeeze);
}

/// The same with an origin read waiting for room on the origin when the copy
/// fails: the chunk is read in four pieces, two at a time, and the first copy
/// fails. The waiting read is dropped with its place among the reads in flight.
#[test]
fn a_failed_copy_with_an_origin_read_still_waiting_ends_the_batch() {
    let squeeze = Squeeze {
        origin_depth: 2,
        origin_transfer: 2,
        cow_depth: 1,
        fail_after: 0,
    };
    assert_copy_out_fails_with_the_power(squeeze);
}
