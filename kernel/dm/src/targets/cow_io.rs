//! Requests of a `snapshot-origin`, `snapshot` or `snapshot-merge` device, carried
//! out concurrently in Linux's pending-exception shape: a write that needs
//! exceptions made (a copy-out into the origin's snapshots, or a chunk of the
//! snapshot's own) waits in a queue while its snapshot's batch is copied and
//! committed, and a write to the run a merge is copying waits until it is
//! committed; every other request goes straight to the origin or the COW device, so
//! a copy-out holds only the writes to the chunks it copies (and later writes that
//! overlap them). A merge step runs after the requests in flight have finished, so
//! none of them races its copy.
//!
//! A snapshot read that goes to the origin is tracked per chunk in the snapshot, so
//! an origin write to that chunk waits for it (Linux's tracked chunks). Discards
//! follow dm-snapshot: the origin and a merging origin have none (they complete and
//! change nothing, as on a device without discard); a snapshot with
//! `discard_zeroes_cow` zeroes each whole chunk that has an exception and passes a
//! partial one to the COW, and with `discard_passdown_origin` also discards the
//! origin, with no copy-out.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::rc::Weak;
use alloc::vec;
use alloc::vec::Vec;
use blockdev::IoBuf;
use nbd::{BackendError, IoCompletion, IoOp, IoOutput};
use snapshot::{
    Health, MergeProgress, MergeStep, SNAPSHOT_INVALID, Snapshot, Source, StartedWrite,
    chunk_pieces,
};

use super::linear::LinearIo;
use super::snapshot::{SharedSnapshot, SnapshotList, with_snapshots};

/// Whose requests these are.
pub(crate) enum Scope {
    /// A `snapshot-origin` device: origin writes copy out into these snapshots.
    Origin(SnapshotList),
    /// A `snapshot` device.
    Snapshot {
        snapshot: SharedSnapshot,
        discard_zeroes_cow: bool,
        discard_passdown_origin: bool,
    },
    /// A `snapshot-merge` device: chunks not merged yet are read and written in
    /// the COW, the others in the origin after copy-outs into its other snapshots.
    Merge {
        merging: SharedSnapshot,
        others: SnapshotList,
    },
}

/// A write waiting for exceptions.
struct Held {
    tag: u64,
    sector: u64,
    sectors: u64,
    /// The data (`None`: zeros).
    data: Option<IoBuf>,
    fua: bool,
    /// The snapshot's batch this write started (snapshot devices).
    started: Option<StartedWrite>,
}

impl Held {
    fn overlaps(&self, other: &Held) -> bool {
        self.sector < other.sector + other.sectors && other.sector < self.sector + self.sectors
    }
}

/// What became of a held write.
enum Outcome {
    Waiting,
    Issued,
    Failed(BackendError),
}

/// A request whose parts are in flight.
struct Assembly {
    /// Read data is gathered here.
    buf: Option<IoBuf>,
    parts_left: usize,
    /// Every part has been issued.
    sealed: bool,
    error: Option<BackendError>,
}

/// One part of a request, on the origin or the COW.
struct Part {
    request: u64,
    /// Byte offset of a read part in the request's buffer.
    offset: usize,
    /// The origin chunk a snapshot read is tracked on.
    tracked: Option<u64>,
}

pub(crate) struct CowIo {
    scope: Scope,
    /// The origin: writable for `snapshot-origin` and `snapshot-merge`, read-only
    /// for a snapshot (unless it passes discards down).
    origin: LinearIo,
    /// The COW device (none for `snapshot-origin`).
    cow: Option<Box<LinearIo>>,
    held: VecDeque<Held>,
    parts: BTreeMap<u64, Part>,
    requests: BTreeMap<u64, Assembly>,
    next_part: u64,
    done: VecDeque<IoCompletion>,
}

impl CowIo {
    pub(crate) fn new(scope: Scope, origin: LinearIo, cow: Option<LinearIo>) -> Self {
        CowIo {
            scope,
            origin,
            cow: cow.map(Box::new),
            held: VecDeque::new(),
            parts: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_part: 0,
            done: VecDeque::new(),
        }
    }

    /// The snapshot a snapshot device serves or a merging origin merges.
    pub(crate) fn snapshot(&self) -> Option<&SharedSnapshot> {
        match &self.scope {
            Scope::Snapshot { snapshot, .. }
            | Scope::Merge {
                merging: snapshot, ..
            } => Some(snapshot),
            Scope::Origin(_) => None,
        }
    }

    /// The merge's progress, for a merging origin.
    pub(crate) fn merge_progress(&self) -> Option<MergeProgress> {
        match &self.scope {
            Scope::Merge { merging, .. } => merging.borrow().merge_progress(),
            _ => None,
        }
    }

    /// Whether writes wait (for exceptions, or for the run being merged).
    pub(crate) fn holds_writes(&self) -> bool {
        !self.held.is_empty()
    }

    /// One bounded merge step, once the requests in flight have finished; a failed
    /// merge fails the writes that waited for it. `None` unless this merges.
    pub(crate) fn merge_step(&mut self, budget: u64) -> Option<MergeStep> {
        let Scope::Merge { merging, others } = &self.scope else {
            return None;
        };
        let (merging, others) = (SharedSnapshot::clone(merging), others.clone());
        if merging.borrow().merge_finished() {
            return Some(MergeStep::Finished);
        }
        self.drain();
        let step = with_snapshots(&others, |others| {
            merging.borrow_mut().merge_step(others, budget)
        });
        if step == MergeStep::Failed {
            for held in core::mem::take(&mut self.held) {
                self.done.push_back(IoCompletion {
                    tag: held.tag,
                    result: Err(BackendError::Io("snapshot merge failed")),
                });
            }
        }
        self.advance();
        Some(step)
    }

    /// Whether the device takes discards (a snapshot with `discard_zeroes_cow`).
    pub(crate) fn discard(&self) -> bool {
        matches!(
            self.scope,
            Scope::Snapshot {
                discard_zeroes_cow: true,
                ..
            }
        )
    }

    /// The live snapshots this device makes exceptions in.
    fn snapshots(&self) -> Vec<SharedSnapshot> {
        match &self.scope {
            Scope::Origin(list) | Scope::Merge { others: list, .. } => {
                list.borrow().iter().filter_map(Weak::upgrade).collect()
            }
            Scope::Snapshot { snapshot, .. } => vec![SharedSnapshot::clone(snapshot)],
        }
    }

    /// Accepts a request whose range and mode the caller has checked; it completes
    /// through [`CowIo::poll`].
    pub(crate) fn submit(&mut self, tag: u64, op: IoOp) {
        match op {
            IoOp::Read { sector, buf } => self.read(tag, sector, buf),
            IoOp::Write { sector, buf, fua } => {
                let sectors = buf.sectors();
                self.hold(tag, sector, sectors, Some(buf), fua);
            }
            IoOp::WriteZeroes {
                sector,
                sectors,
                fua,
                ..
            } => self.hold(tag, sector, sectors, None, fua),
            IoOp::Flush => {
                // dm's flushes: a snapshot's go to the COW, an origin's to the
                // origin, a merging origin's to both.
                self.begin(tag, None);
                let invalid = self.snapshot().is_some_and(|s| invalid(&s.borrow()));
                match &self.scope {
                    _ if invalid => self.fail(tag, SNAPSHOT_INVALID.into()),
                    Scope::Origin(_) => self.part(tag, Lane::Origin, IoOp::Flush, 0, None),
                    Scope::Snapshot { .. } => self.part(tag, Lane::Cow, IoOp::Flush, 0, None),
                    Scope::Merge { .. } => {
                        self.part(tag, Lane::Origin, IoOp::Flush, 0, None);
                        self.part(tag, Lane::Cow, IoOp::Flush, 0, None);
                    }
                }
                self.seal(tag);
            }
            IoOp::Trim {
                sector, sectors, ..
            } => self.discard_range(tag, sector, sectors),
            IoOp::Cache { .. } | IoOp::BlockStatus { .. } => {
                self.done.push_back(IoCompletion {
                    tag,
                    result: Ok(IoOutput::Done),
                });
            }
        }
        self.advance();
    }

    /// Returns one finished request.
    pub(crate) fn poll(&mut self) -> Option<IoCompletion> {
        self.collect();
        self.done.pop_front()
    }

    /// Finishes every accepted request (completions stay queued for
    /// [`CowIo::poll`]), except writes that wait for a merge step.
    pub(crate) fn drain(&mut self) {
        loop {
            self.collect();
            let batches = self.snapshots().iter().any(|s| !s.borrow().idle());
            if self.requests.is_empty() && (self.held.is_empty() || !batches && self.merging()) {
                return;
            }
            core::hint::spin_loop();
        }
    }

    fn merging(&self) -> bool {
        matches!(self.scope, Scope::Merge { .. })
    }

    /// Makes completed writes durable; the device must be drained.
    pub(crate) fn flush(&mut self) -> Result<(), blockdev::IoError> {
        match (&self.scope, &mut self.cow) {
            (Scope::Origin(_), _) | (_, None) => self.origin.flush(),
            (Scope::Snapshot { .. }, Some(cow)) => cow.flush(),
            (Scope::Merge { .. }, Some(cow)) => {
                self.origin.flush()?;
                cow.flush()
            }
        }
    }

    /// Advances the snapshots' batches and the parts in flight, then the held
    /// writes, until nothing moves.
    fn collect(&mut self) {
        loop {
            for snapshot in self.snapshots() {
                snapshot.borrow_mut().pump();
            }
            let mut finished = Vec::new();
            while let Some(done) = self.origin.poll() {
                finished.push(done);
            }
            if let Some(cow) = &mut self.cow {
                while let Some(done) = cow.poll() {
                    finished.push(done);
                }
            }
            let moved = !finished.is_empty();
            for done in finished {
                self.part_done(done);
            }
            let held = self.held.len();
            self.advance();
            if !moved && held == self.held.len() {
                return;
            }
        }
    }

    fn read(&mut self, tag: u64, sector: u64, buf: IoBuf) {
        let sectors = buf.sectors();
        self.begin(tag, Some(buf));
        // A snapshot's reads of the origin are tracked; a merging origin's need not
        // be (it writes the origin itself).
        let track = matches!(self.scope, Scope::Snapshot { .. });
        let pieces = match self.snapshot() {
            None => vec![(Lane::Origin, sector, sectors, 0, None)],
            Some(snapshot) => {
                let mut snapshot = snapshot.borrow_mut();
                if invalid(&snapshot) {
                    drop(snapshot);
                    self.fail(tag, SNAPSHOT_INVALID.into());
                    self.seal(tag);
                    return;
                }
                let chunk = snapshot.chunk_sectors();
                chunk_pieces(sector, sectors, chunk)
                    .map(|(at, piece)| {
                        let offset = ((at - sector) * 512) as usize;
                        match snapshot.exception(at / chunk) {
                            Some(new) => (Lane::Cow, new * chunk + at % chunk, piece, offset, None),
                            None if track => {
                                snapshot.origin_read_started(at / chunk);
                                (Lane::Origin, at, piece, offset, Some(at / chunk))
                            }
                            None => (Lane::Origin, at, piece, offset, None),
                        }
                    })
                    .collect()
            }
        };
        for (lane, at, piece, offset, tracked) in pieces {
            let op = IoOp::Read {
                sector: at,
                buf: IoBuf::with_sectors(piece as usize),
            };
            self.part(tag, lane, op, offset, tracked);
        }
        self.seal(tag);
    }

    fn hold(&mut self, tag: u64, sector: u64, sectors: u64, data: Option<IoBuf>, fua: bool) {
        if sectors == 0 {
            self.done.push_back(IoCompletion {
                tag,
                result: Ok(IoOutput::Done),
            });
            return;
        }
        self.held.push_back(Held {
            tag,
            sector,
            sectors,
            data,
            fua,
            started: None,
        });
    }

    /// Issues the held writes that may go now, in order; a write never passes an
    /// earlier one it overlaps.
    fn advance(&mut self) {
        let mut index = 0;
        while index < self.held.len() {
            if self
                .held
                .range(..index)
                .any(|earlier| earlier.overlaps(&self.held[index]))
            {
                index += 1;
                continue;
            }
            match self.try_issue(index) {
                Outcome::Waiting => index += 1,
                Outcome::Issued => {
                    self.held.remove(index);
                }
                Outcome::Failed(error) => {
                    let held = self.held.remove(index).expect("held write");
                    self.done.push_back(IoCompletion {
                        tag: held.tag,
                        result: Err(error),
                    });
                }
            }
        }
    }

    fn try_issue(&mut self, index: usize) -> Outcome {
        let (sector, sectors) = (self.held[index].sector, self.held[index].sectors);
        let snapshot = match &self.scope {
            Scope::Origin(_) => return self.try_issue_origin(index, sector, sectors),
            Scope::Merge { merging, .. } => {
                return self.try_issue_merging(index, SharedSnapshot::clone(merging));
            }
            Scope::Snapshot { snapshot, .. } => SharedSnapshot::clone(snapshot),
        };
        let mut snapshot = snapshot.borrow_mut();
        let held = &mut self.held[index];
        if held.started.is_none() {
            if let Some(refusal) = snapshot.write_refusal() {
                return Outcome::Failed(refusal.into());
            }
            if snapshot.write_needs_exceptions(sector, sectors) {
                if !snapshot.idle() {
                    return Outcome::Waiting;
                }
                let source = match &held.data {
                    Some(buf) => Source::Data(buf),
                    None => Source::Zeros,
                };
                held.started = Some(snapshot.start_write(sector, sectors, source));
            }
        }
        if held.started.is_some() && !snapshot.idle() {
            return Outcome::Waiting;
        }
        if invalid(&snapshot) {
            return Outcome::Failed(SNAPSHOT_INVALID.into());
        }
        let started = held.started.take().unwrap_or_default();
        let tag = held.tag;
        let writes = chunk_writes(&snapshot, &self.held[index], &started.whole, false);
        drop(snapshot);
        self.issue(tag, writes, started.refused.map(BackendError::from));
        Outcome::Issued
    }

    /// A write of a merging origin goes once the run being merged is not in its way
    /// and the other snapshots have their copy-outs; chunks not merged yet are
    /// written in the COW.
    fn try_issue_merging(&mut self, index: usize, merging: SharedSnapshot) -> Outcome {
        let (sector, sectors) = (self.held[index].sector, self.held[index].sectors);
        if merging.borrow().merge_blocks(sector, sectors) || self.copy_outs_wait(sector, sectors) {
            return Outcome::Waiting;
        }
        let writes = chunk_writes(&merging.borrow(), &self.held[index], &[], true);
        self.issue(self.held[index].tag, writes, None);
        Outcome::Issued
    }

    /// Issues a held write's parts.
    fn issue(&mut self, tag: u64, writes: Vec<(Lane, IoOp)>, error: Option<BackendError>) {
        self.begin(tag, None);
        if let Some(error) = error {
            self.fail(tag, error);
        }
        for (lane, op) in writes {
            self.part(tag, lane, op, 0, None);
        }
        self.seal(tag);
    }

    /// Whether an origin write to the range must wait for the snapshots' batches
    /// (starting the copy-outs it needs in idle ones).
    fn copy_outs_wait(&self, sector: u64, sectors: u64) -> bool {
        let mut wait = false;
        for snapshot in self.snapshots() {
            let mut snapshot = snapshot.borrow_mut();
            if snapshot.busy(sector, sectors) {
                wait = true;
            } else if snapshot.needs_copy_out(sector, sectors) {
                wait = true;
                if snapshot.idle() {
                    snapshot.start_copy_out(sector, sectors);
                }
            }
        }
        wait
    }

    /// An origin write goes once no snapshot copies or reads its chunks and none
    /// needs a copy-out of them (starting the copy-outs of idle snapshots).
    fn try_issue_origin(&mut self, index: usize, sector: u64, sectors: u64) -> Outcome {
        if self.copy_outs_wait(sector, sectors) {
            return Outcome::Waiting;
        }
        let held = &mut self.held[index];
        let op = write_op(sector, sectors, held.data.take(), held.fua);
        let tag = held.tag;
        self.issue(tag, vec![(Lane::Origin, op)], None);
        Outcome::Issued
    }

    /// A discard (see the module's description).
    fn discard_range(&mut self, tag: u64, sector: u64, sectors: u64) {
        self.begin(tag, None);
        let Scope::Snapshot {
            snapshot,
            discard_zeroes_cow: true,
            discard_passdown_origin,
            ..
        } = &self.scope
        else {
            self.seal(tag);
            return;
        };
        let passdown = *discard_passdown_origin;
        let snapshot = snapshot.borrow();
        if invalid(&snapshot) {
            drop(snapshot);
            self.fail(tag, SNAPSHOT_INVALID.into());
            self.seal(tag);
            return;
        }
        let chunk = snapshot.chunk_sectors();
        let cow_ops: Vec<IoOp> = chunk_pieces(sector, sectors, chunk)
            .filter_map(|(at, piece)| {
                let new = snapshot.exception(at / chunk)?;
                let at = new * chunk + at % chunk;
                Some(if piece == chunk {
                    IoOp::WriteZeroes {
                        sector: at,
                        sectors: piece,
                        fua: false,
                        may_unmap: false,
                        fast_only: false,
                    }
                } else {
                    IoOp::Trim {
                        sector: at,
                        sectors: piece,
                        fua: false,
                    }
                })
            })
            .collect();
        drop(snapshot);
        for op in cow_ops {
            self.part(tag, Lane::Cow, op, 0, None);
        }
        if passdown {
            let op = IoOp::Trim {
                sector,
                sectors,
                fua: false,
            };
            self.part(tag, Lane::Origin, op, 0, None);
        }
        self.seal(tag);
    }

    fn begin(&mut self, tag: u64, buf: Option<IoBuf>) {
        self.requests.insert(
            tag,
            Assembly {
                buf,
                parts_left: 0,
                sealed: false,
                error: None,
            },
        );
    }

    fn fail(&mut self, tag: u64, error: BackendError) {
        if let Some(assembly) = self.requests.get_mut(&tag) {
            assembly.error.get_or_insert(error);
        }
    }

    fn part(&mut self, tag: u64, lane: Lane, op: IoOp, offset: usize, tracked: Option<u64>) {
        let part = self.next_part;
        self.next_part += 1;
        self.parts.insert(
            part,
            Part {
                request: tag,
                offset,
                tracked,
            },
        );
        self.requests
            .get_mut(&tag)
            .expect("a part of a live request")
            .parts_left += 1;
        match (lane, &mut self.cow) {
            (Lane::Cow, Some(cow)) => cow.submit(part, op),
            _ => self.origin.submit(part, op),
        }
    }

    /// Every part of `tag` is issued: it completes when they have.
    fn seal(&mut self, tag: u64) {
        let assembly = self.requests.get_mut(&tag).expect("a live request");
        assembly.sealed = true;
        self.finish_if_done(tag);
    }

    fn part_done(&mut self, done: IoCompletion) {
        let Some(part) = self.parts.remove(&done.tag) else {
            return;
        };
        if let (Some(chunk), Some(snapshot)) = (part.tracked, self.snapshot()) {
            snapshot.borrow_mut().origin_read_done(chunk);
        }
        let assembly = self
            .requests
            .get_mut(&part.request)
            .expect("a part of a live request");
        assembly.parts_left -= 1;
        match done.result {
            Err(error) => {
                assembly.error.get_or_insert(error);
            }
            Ok(IoOutput::Read { buf, .. }) => {
                if let Some(whole) = &mut assembly.buf {
                    whole[part.offset..part.offset + buf.len()].copy_from_slice(&buf);
                }
            }
            Ok(_) => {}
        }
        self.finish_if_done(part.request);
    }

    fn finish_if_done(&mut self, tag: u64) {
        let assembly = &self.requests[&tag];
        if !assembly.sealed || assembly.parts_left > 0 {
            return;
        }
        let assembly = self.requests.remove(&tag).expect("just seen");
        let result = match (assembly.error, assembly.buf) {
            (Some(error), _) => Err(error),
            (None, Some(buf)) => Ok(IoOutput::Read {
                buf,
                zero_holes: vec![],
            }),
            (None, None) => Ok(IoOutput::Done),
        };
        self.done.push_back(IoCompletion { tag, result });
    }
}

#[derive(Clone, Copy)]
enum Lane {
    Origin,
    Cow,
}

/// A write of `data` (or zeros) at `sector`.
fn write_op(sector: u64, sectors: u64, data: Option<IoBuf>, fua: bool) -> IoOp {
    match data {
        Some(buf) => IoOp::Write { sector, buf, fua },
        None => IoOp::WriteZeroes {
            sector,
            sectors,
            fua,
            may_unmap: false,
            fast_only: false,
        },
    }
}

/// The writes of a held write, chunk by chunk: a chunk with an exception in the COW
/// at it, except the chunks a batch wrote whole; a chunk without one in the origin
/// (a merging origin) or not at all (a snapshot's chunk the COW had no room for).
fn chunk_writes(
    snapshot: &Snapshot,
    held: &Held,
    whole: &[u64],
    origin_otherwise: bool,
) -> Vec<(Lane, IoOp)> {
    let chunk = snapshot.chunk_sectors();
    chunk_pieces(held.sector, held.sectors, chunk)
        .filter_map(|(at, piece)| {
            let old = at / chunk;
            let (lane, to) = match snapshot.exception(old) {
                Some(_) if whole.contains(&old) => return None,
                Some(new) => (Lane::Cow, new * chunk + at % chunk),
                None if origin_otherwise => (Lane::Origin, at),
                None => return None,
            };
            let data = held.data.as_ref().map(|buf| {
                let from = ((at - held.sector) * 512) as usize;
                IoBuf::from_slice(&buf[from..from + piece as usize * 512])
            });
            Some((lane, write_op(to, piece, data, held.fua)))
        })
        .collect()
}

fn invalid(snapshot: &Snapshot) -> bool {
    snapshot.health() == Health::Invalid
}
