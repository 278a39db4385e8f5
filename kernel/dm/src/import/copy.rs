//! The copy behind imports and syncs, in bounded steps: the source is walked in
//! windows; each window's block status decides what is read and written (data),
//! left alone (zeroes on a fresh volume, unchanged ranges of a sync) or zeroed
//! (zeroes and holes a sync finds changed, which unmaps whole blocks); reads stay
//! several in flight, each written as it arrives. Once a window's writes are done the
//! destination is flushed, so everything below the window's end survives a power cut:
//! that offset is the checkpoint an import resumes from. The next window is copied
//! while that flush runs (one flush at a time), so the copy does not stall on it.
//! The checkpoint is thus the lowest offset below which nothing is in flight, however
//! many connections the reads went over. When the source fails, the flush in
//! progress still finishes and its checkpoint is saved before the copy stops. A read's buffer is the buffer of its write
//! (no copy), and the buffers of finished writes take the next reads' data.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{IoBuf, SECTOR_SIZE};
use thin_pool::{ThinOp, ThinRequest, ThinVolume};

use super::source::{Answer, Run, Source};

/// Bytes of the source described and copied between two checkpoints.
pub(crate) const WINDOW: u64 = 64 << 20;
/// Largest read.
const MAX_READ: u64 = 1 << 20;
/// Reads and writes kept in flight.
const DEPTH: usize = 64;
/// Rounds of reaping and issuing per step.
const ROUNDS: usize = 32;
/// Tag of the destination's checkpoint flush (writes are numbered from 0).
const FLUSH_TAG: u64 = u64::MAX;

const SECTOR: u64 = SECTOR_SIZE as u64;

/// What to do with a range of the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Copy,
    Zero,
    Skip,
}

/// What one step achieved.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing moved; call again later.
    Idle,
    Busy,
    /// Everything below this offset is on the destination, durably.
    Checkpoint(u64),
    Finished,
}

pub(crate) struct Copier {
    pub(crate) source: Source,
    dest: ThinVolume,
    size: u64,
    /// Metadata contexts the source answers block status in (0: read everything).
    contexts: usize,
    /// Zero ranges are written as zeroes (syncs) instead of left alone (imports,
    /// whose destination is fresh).
    zero_changed: bool,
    /// Durable below this.
    checkpoint: u64,
    /// The window being copied: everything below its start is written (and durable
    /// once the flush in progress, if any, finishes).
    window_start: u64,
    window_end: u64,
    /// Next offset of the window to ask block status for.
    status_at: u64,
    status_tag: Option<u64>,
    /// Ranges described and not yet issued.
    plan: VecDeque<(u64, u64, Action)>,
    /// Source reads in flight: tag → (offset read from, bytes of the plan it
    /// finishes).
    reads: BTreeMap<u64, (u64, u64)>,
    /// Destination writes in flight: tag → bytes.
    writes: BTreeMap<u64, u64>,
    next_write: u64,
    /// The offset the flush in progress makes durable.
    flushing: Option<u64>,
    /// Bytes of the current window finished.
    window_done: u64,
    /// Buffers of finished writes, for the next reads.
    spare: Vec<IoBuf>,
    /// Why the copy cannot go on; it stops once the flush in progress, if any, has
    /// made its checkpoint.
    failed: Option<String>,
    /// Bytes written to the destination (data and zeroes), for rate reports.
    pub(crate) written: u64,
}

impl Copier {
    /// A copy of `source` (of `size` bytes) onto `dest` from offset `from` on (a
    /// checkpoint, a multiple of [`WINDOW`]).
    pub(crate) fn new(
        source: Source,
        dest: ThinVolume,
        size: u64,
        contexts: usize,
        zero_changed: bool,
        from: u64,
    ) -> Self {
        let mut copier = Copier {
            source,
            dest,
            size,
            contexts,
            zero_changed,
            checkpoint: from,
            window_start: from,
            window_end: from,
            status_at: from,
            status_tag: None,
            plan: VecDeque::new(),
            reads: BTreeMap::new(),
            writes: BTreeMap::new(),
            next_write: 0,
            flushing: None,
            window_done: 0,
            spare: Vec::new(),
            failed: None,
            written: 0,
        };
        copier.open_window(from);
        copier
    }

    /// Size of the source in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of the source finished.
    pub(crate) fn done(&self) -> u64 {
        self.window_start + self.window_done
    }

    fn open_window(&mut self, start: u64) {
        self.window_start = start;
        self.window_end = (start + WINDOW).min(self.size);
        self.status_at = start;
        self.window_done = 0;
        if self.contexts == 0 {
            let length = self.window_end - start;
            self.plan.push_back((start, length, Action::Copy));
            self.status_at = self.window_end;
        }
    }

    /// Does what is ready without waiting.
    pub(crate) fn step(&mut self) -> Result<Step, String> {
        if self.checkpoint >= self.size {
            return Ok(Step::Finished);
        }
        let mut busy = false;
        for _ in 0..ROUNDS {
            let mut moved = false;
            if self.failed.is_none() {
                match self.read_source() {
                    Ok(read) => moved |= read,
                    Err(why) => self.failed = Some(why),
                }
            }
            if self.flushing.is_none()
                && let Some(why) = self.failed.take()
            {
                return Err(why);
            }
            while let Some(done) = self.dest.poll_op() {
                moved = true;
                if let Err(error) = done.result {
                    return Err(format!("writing the destination failed: {error}"));
                }
                if done.tag == FLUSH_TAG {
                    self.checkpoint = self.flushing.take().unwrap_or(self.checkpoint);
                    if self.checkpoint >= self.size {
                        return Ok(Step::Finished);
                    }
                    return Ok(Step::Checkpoint(self.checkpoint));
                }
                let bytes = self.writes.remove(&done.tag).unwrap_or(0);
                self.window_done += bytes;
                if !done.buf.is_empty() && self.spare.len() < DEPTH {
                    self.spare.push(done.buf);
                }
            }
            if self.failed.is_none() {
                match self.issue() {
                    Ok(issued) => moved |= issued,
                    Err(why) => self.failed = Some(why),
                }
            }
            busy |= moved;
            if !moved {
                break;
            }
        }
        Ok(if busy { Step::Busy } else { Step::Idle })
    }

    /// Takes the source's answers; returns whether there were any.
    fn read_source(&mut self) -> Result<bool, String> {
        let mut read = false;
        while let Some(answer) = self.source.poll(self.contexts)? {
            read = true;
            self.answer(answer)?;
        }
        Ok(read)
    }

    fn answer(&mut self, answer: Answer) -> Result<(), String> {
        match answer {
            Answer::Status { tag, runs } => {
                if self.status_tag != Some(tag) {
                    return Err(String::from(
                        "the source answered a block status not asked for",
                    ));
                }
                self.status_tag = None;
                self.describe(&runs)
            }
            Answer::Data { tag, data } => {
                let (offset, counted) = self
                    .reads
                    .remove(&tag)
                    .ok_or("the source answered a read not asked for")?;
                self.written += data.len() as u64;
                let op = ThinOp::Write {
                    sector: offset / SECTOR,
                    buf: data,
                    fua: false,
                };
                self.write(op, counted)
            }
        }
    }

    /// Plans the runs of a block-status answer from `status_at` on.
    fn describe(&mut self, runs: &[Run]) -> Result<(), String> {
        if runs.is_empty() {
            return Err(String::from("the source's block status described nothing"));
        }
        for run in runs {
            if self.status_at >= self.window_end {
                break;
            }
            let length = run.length.min(self.window_end - self.status_at);
            let action = match (run.changed, run.zero) {
                (false, _) => Action::Skip,
                (true, true) if self.zero_changed => Action::Zero,
                (true, true) => Action::Skip,
                (true, false) => Action::Copy,
            };
            match self.plan.back_mut() {
                Some((start, planned, last))
                    if *last == action && *start + *planned == self.status_at =>
                {
                    *planned += length;
                }
                _ => self.plan.push_back((self.status_at, length, action)),
            }
            self.status_at += length;
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.reads.len() + self.writes.len()
    }

    /// Issues block status, reads and zeroing while there is room; returns whether
    /// anything was issued.
    fn issue(&mut self) -> Result<bool, String> {
        let mut issued = false;
        if self.status_tag.is_none() && self.status_at < self.window_end && self.plan.len() < DEPTH
        {
            let length =
                (self.window_end - self.status_at).min(u64::from(nbd::client::MAX_REQUEST));
            self.status_tag = Some(self.source.status(self.status_at, length)?);
            issued = true;
        }
        while self.in_flight() < DEPTH {
            if matches!(self.plan.front(), Some((_, _, Action::Copy))) && !self.source.can_read() {
                break;
            }
            let Some((start, length, action)) = self.plan.pop_front() else {
                break;
            };
            issued = true;
            match action {
                Action::Skip => self.window_done += length,
                Action::Copy => {
                    // Reads end on multiples of the read size, so they stay aligned
                    // to pool blocks whatever the runs look like.
                    let limit = MAX_READ.min(self.source.max_read()).max(SECTOR);
                    let aligned_start = start / SECTOR * SECTOR;
                    let end = (start + length).min(self.size);
                    let piece_end = ((aligned_start / limit + 1) * limit).min(end);
                    let read_end = piece_end.next_multiple_of(SECTOR).min(self.size);
                    let buf = self.spare.pop().unwrap_or_default();
                    let tag = self
                        .source
                        .read(aligned_start, read_end - aligned_start, buf)?;
                    self.reads.insert(tag, (aligned_start, piece_end - start));
                    if piece_end < end {
                        self.plan
                            .push_front((piece_end, end - piece_end, Action::Copy));
                    }
                }
                Action::Zero => {
                    let first = start.div_ceil(SECTOR);
                    let last = (start + length) / SECTOR;
                    if last > first {
                        let op = ThinOp::WriteZeroes {
                            sector: first,
                            sectors: last - first,
                            unmap: true,
                            fua: false,
                        };
                        self.write(op, 0)?;
                        self.written += (last - first) * SECTOR;
                    }
                    self.window_done += length;
                }
            }
        }
        let window_written = self.status_at >= self.window_end
            && self.plan.is_empty()
            && self.status_tag.is_none()
            && self.in_flight() == 0;
        if window_written && self.flushing.is_none() && self.checkpoint < self.window_end {
            self.flushing = Some(self.window_end);
            self.submit(FLUSH_TAG, ThinOp::Flush)?;
            if self.window_end < self.size {
                self.open_window(self.window_end);
            }
            issued = true;
        }
        Ok(issued)
    }

    fn write(&mut self, op: ThinOp, bytes: u64) -> Result<(), String> {
        let tag = self.next_write;
        self.next_write += 1;
        self.writes.insert(tag, bytes);
        self.submit(tag, op)
    }

    fn submit(&mut self, tag: u64, op: ThinOp) -> Result<(), String> {
        self.dest
            .submit_op(ThinRequest { tag, op })
            .map_err(|_| String::from("the destination's queue is full"))
    }
}
