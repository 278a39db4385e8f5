//! `disk-test`: writes a pattern over the start of a disk with many requests in
//! flight, flushes, reads it back and compares, reporting throughput.
//!
//! Unless forced it first reads the start of the disk and a sample of every MiB it
//! would overwrite, and refuses when any of that holds data. When the disk takes
//! discards, the tested range is discarded at the end, which also exercises that
//! path of the driver.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use blockdev::{BlockDevice, Busy, Command, Completion, IoBuf, Request, SECTOR_SIZE};
use core::fmt::Write;

use crate::job::{Context, Job, Progress};
use crate::units::{mib_per_second, seconds};
use crate::{CommandError, outln};

/// Sectors per test request (256 KiB), unless the device takes less.
const CHUNK_SECTORS: u64 = 512;
/// Most requests the test keeps in flight, unless the device takes fewer.
const MAX_DEPTH: usize = 64;
/// Sectors in a MiB.
const MIB_SECTORS: u64 = (1 << 20) / SECTOR_SIZE as u64;
/// Sectors read at the start of every MiB when checking for data.
const SAMPLE_SECTORS: u64 = 8;
/// Submit-and-reap rounds per step: enough to keep a fast device busy, few enough
/// that a step returns quickly to the caller's other work.
const ROUNDS_PER_STEP: usize = 4;
/// At most this long between progress lines.
const PROGRESS_NS: u64 = 1_000_000_000;

/// What the operator asked for.
pub(crate) struct DiskTestOptions {
    /// Sectors to test, from sector 0.
    pub sectors: u64,
    /// Skip the check for existing data.
    pub force: bool,
    /// Makes each run's pattern different, so stale data from an earlier run
    /// cannot pass for a good read.
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Check,
    Write,
    Flush,
    Verify,
    Discard,
}

impl Phase {
    fn verb(self) -> &'static str {
        match self {
            Phase::Check => "checking",
            Phase::Write => "writing",
            Phase::Flush => "flushing",
            Phase::Verify => "verifying",
            Phase::Discard => "discarding",
        }
    }
}

pub(crate) struct DiskTest {
    options: DiskTestOptions,
    name: String,
    /// The disk or device under test (a handle of its own).
    device: Box<dyn BlockDevice>,
    chunk: u64,
    depth: usize,
    phase: Phase,
    /// Index (see [`DiskTest::request_range`]) of the current phase's next request.
    next: u64,
    /// A request the device refused as busy, to submit first next time.
    retry: Option<Request>,
    in_flight: usize,
    peak_in_flight: usize,
    /// Sectors of the current phase completed.
    completed: u64,
    failure: Option<CommandError>,
    cancelled: bool,
    started_ns: Option<u64>,
    phase_started_ns: u64,
    last_progress_ns: u64,
    write_ns: u64,
    read_ns: u64,
    /// The device takes discards.
    discard: bool,
    /// Lowest sector the check found data in.
    data_at: Option<u64>,
}

impl DiskTest {
    pub(crate) fn new(
        name: String,
        device: Box<dyn BlockDevice>,
        options: DiskTestOptions,
    ) -> Self {
        let info = device.info();
        let chunk = CHUNK_SECTORS.min(u64::from(info.max_transfer_sectors).max(1));
        let depth = MAX_DEPTH.min(usize::from(info.queue_depth).max(1));
        let discard = info.discard;
        let mut test = DiskTest {
            name,
            device,
            chunk,
            depth,
            phase: Phase::Check,
            next: 0,
            retry: None,
            in_flight: 0,
            peak_in_flight: 0,
            completed: 0,
            failure: None,
            cancelled: false,
            started_ns: None,
            phase_started_ns: 0,
            last_progress_ns: 0,
            write_ns: 0,
            read_ns: 0,
            discard,
            data_at: None,
            options,
        };
        if test.options.force {
            test.enter(Phase::Write, 0);
        }
        test
    }

    /// Starts `phase` at time `now_ns`.
    fn enter(&mut self, phase: Phase, now_ns: u64) {
        self.phase = phase;
        self.next = 0;
        self.completed = 0;
        self.phase_started_ns = now_ns;
    }

    /// The current phase's `index`-th request as (first sector, sectors), or `None`
    /// past its last. Computed rather than listed, so a test of any size needs no
    /// memory for its plan.
    fn request_range(&self, index: u64) -> Option<(u64, u64)> {
        let total = self.options.sectors;
        let chunk_at =
            |start: u64, end: u64| (start < end).then(|| (start, self.chunk.min(end - start)));
        match self.phase {
            // The first MiB in full, then the start of every further MiB.
            Phase::Check => {
                let first = MIB_SECTORS.min(total);
                let first_requests = first.div_ceil(self.chunk);
                if index < first_requests {
                    chunk_at(index * self.chunk, first)
                } else {
                    let sector = (index - first_requests + 1) * MIB_SECTORS;
                    (sector < total).then(|| (sector, SAMPLE_SECTORS.min(total - sector)))
                }
            }
            Phase::Write | Phase::Verify => chunk_at(index * self.chunk, total),
            Phase::Flush => (index == 0).then_some((0, 0)),
            Phase::Discard => (index == 0).then_some((0, total)),
        }
    }

    fn command(&self, sector: u64, sectors: u64) -> Command {
        match self.phase {
            Phase::Check | Phase::Verify => Command::Read {
                sector,
                buf: IoBuf::with_sectors(sectors as usize),
            },
            Phase::Write => {
                let mut buf = IoBuf::with_sectors(sectors as usize);
                fill_pattern(&mut buf, sector, self.options.seed);
                // The last write goes out with FUA so drivers' FUA paths get tested too.
                Command::Write {
                    sector,
                    buf,
                    fua: sector + sectors == self.options.sectors,
                }
            }
            Phase::Flush => Command::Flush,
            Phase::Discard => Command::Discard { sector, sectors },
        }
    }

    /// Checks one completed request; records the first problem.
    fn complete(&mut self, done: Completion) {
        self.in_flight -= 1;
        let sector = done.tag;
        self.completed += done.buf.sectors().max(1);
        if self.failure.is_some() {
            return;
        }
        if let Err(error) = done.result {
            self.failure = Some(
                format!(
                    "disk-test {}: {} at sector {sector} failed: {error}",
                    self.name,
                    self.phase.verb()
                )
                .into(),
            );
            return;
        }
        match self.phase {
            Phase::Check => {
                if let Some(at) = done.buf.iter().position(|&b| b != 0) {
                    let found = sector + (at / SECTOR_SIZE) as u64;
                    self.data_at = Some(self.data_at.map_or(found, |known| known.min(found)));
                }
            }
            Phase::Verify => {
                if let Some(bad) = first_mismatch(&done.buf, sector, self.options.seed) {
                    self.failure = Some(
                        format!(
                            "disk-test {}: data read back from sector {bad} differs from what \
                             was written; the disk or its driver corrupts data",
                            self.name
                        )
                        .into(),
                    );
                }
            }
            Phase::Write | Phase::Flush | Phase::Discard => {}
        }
    }

    /// Submits queued requests until the device or the depth limit says stop.
    fn submit(&mut self) {
        while self.in_flight < self.depth && self.failure.is_none() && !self.cancelled {
            let request = match self.retry.take() {
                Some(request) => request,
                None => match self.request_range(self.next) {
                    Some((sector, sectors)) => {
                        self.next += 1;
                        Request {
                            tag: sector,
                            command: self.command(sector, sectors),
                        }
                    }
                    None => break,
                },
            };
            match self.device.submit(request) {
                Ok(()) => {
                    self.in_flight += 1;
                    self.peak_in_flight = self.peak_in_flight.max(self.in_flight);
                }
                Err(Busy(request)) => {
                    self.retry = Some(request);
                    break;
                }
            }
        }
    }

    fn report_progress(&mut self, now_ns: u64, out: &mut dyn Write) {
        if now_ns.saturating_sub(self.last_progress_ns) < PROGRESS_NS {
            return;
        }
        self.last_progress_ns = now_ns;
        let total = match self.phase {
            Phase::Write | Phase::Verify => self.options.sectors,
            Phase::Check | Phase::Flush | Phase::Discard => return,
        };
        outln!(
            out,
            "disk-test {}: {} {}/{} MiB",
            self.name,
            self.phase.verb(),
            self.completed / MIB_SECTORS,
            total / MIB_SECTORS
        );
    }

    /// Moves to the next phase when this one is done; returns the final result once
    /// the last phase is.
    fn advance(&mut self, now_ns: u64, out: &mut dyn Write) -> Option<Result<(), CommandError>> {
        if self.in_flight > 0 || self.retry.is_some() {
            return None;
        }
        if let Some(failure) = self.failure.take() {
            return Some(Err(failure));
        }
        if self.cancelled {
            return Some(Err(format!(
                "disk-test {} interrupted; the tested range holds partial test data",
                self.name
            )
            .into()));
        }
        if self.request_range(self.next).is_some() {
            return None;
        }
        let elapsed = now_ns.saturating_sub(self.phase_started_ns);
        match self.phase {
            Phase::Check => {
                if let Some(sector) = self.data_at {
                    return Some(Err(format!(
                        "disk-test: {} holds data (non-zero bytes in sector {sector}) that the \
                         test would overwrite; add --force to test it anyway",
                        self.name
                    )
                    .into()));
                }
                self.enter(Phase::Write, now_ns);
            }
            Phase::Write => {
                self.write_ns = elapsed;
                self.enter(Phase::Flush, now_ns);
            }
            Phase::Flush => {
                self.write_ns += elapsed;
                self.enter(Phase::Verify, now_ns);
            }
            Phase::Verify => {
                self.read_ns = elapsed;
                if self.discard {
                    self.enter(Phase::Discard, now_ns);
                } else {
                    self.report(out);
                    return Some(Ok(()));
                }
            }
            Phase::Discard => {
                self.report(out);
                return Some(Ok(()));
            }
        }
        None
    }
}

impl DiskTest {
    fn report(&self, out: &mut dyn Write) {
        let bytes = self.options.sectors * SECTOR_SIZE as u64;
        outln!(
            out,
            "disk-test {}: OK, {} MiB written and flushed in {} ({}), read back in {} ({}), \
             up to {} requests of {} KiB in flight{}",
            self.name,
            self.options.sectors / MIB_SECTORS,
            seconds(self.write_ns),
            mib_per_second(bytes, self.write_ns),
            seconds(self.read_ns),
            mib_per_second(bytes, self.read_ns),
            self.peak_in_flight,
            self.chunk * SECTOR_SIZE as u64 / 1024,
            if self.discard {
                ", range discarded"
            } else {
                ""
            }
        );
    }
}

impl Job for DiskTest {
    fn step(&mut self, context: &mut Context<'_>, out: &mut dyn Write) -> Progress {
        let now_ns = (context.clock)();
        if self.started_ns.is_none() {
            self.started_ns = Some(now_ns);
            self.last_progress_ns = now_ns;
            self.phase_started_ns = now_ns;
        }
        for _ in 0..ROUNDS_PER_STEP {
            self.submit();
            let mut reaped = false;
            while let Some(done) = self.device.poll() {
                self.complete(done);
                reaped = true;
            }
            if let Some(result) = self.advance((context.clock)(), out) {
                return Progress::Finished(result);
            }
            if !reaped {
                break;
            }
        }
        self.report_progress(now_ns, out);
        Progress::Running
    }

    fn cancel(&mut self) {
        self.cancelled = true;
        self.retry = None;
    }
}

/// The pattern word for byte offset `offset` (a multiple of 8) of the disk: unique
/// per position and per run (splitmix64 of position and seed).
fn pattern_word(offset: u64, seed: u64) -> u64 {
    let mut z = (offset / 8) ^ seed.rotate_left(17);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill_pattern(buf: &mut [u8], sector: u64, seed: u64) {
    let base = sector * SECTOR_SIZE as u64;
    for (i, word) in buf.as_chunks_mut::<8>().0.iter_mut().enumerate() {
        *word = pattern_word(base + i as u64 * 8, seed).to_le_bytes();
    }
}

/// The first sector in `buf` (read from `sector` on) that does not hold the pattern.
fn first_mismatch(buf: &[u8], sector: u64, seed: u64) -> Option<u64> {
    let base = sector * SECTOR_SIZE as u64;
    buf.as_chunks::<8>()
        .0
        .iter()
        .enumerate()
        .position(|(i, word)| *word != pattern_word(base + i as u64 * 8, seed).to_le_bytes())
        .map(|word| sector + (word * 8 / SECTOR_SIZE) as u64)
}
