//! Requests of a `snapshot-origin` or `snapshot` device, carried out concurrently
//! in Linux's pending-exception shape: a write that needs exceptions made (a
//! copy-out into the origin's snapshots, or a chunk of the snapshot's own) waits in
//! a queue while its snapshot's batch is copied and committed; every other request
//! goes straight to the origin or the COW device, so a copy-out holds only the
//! writes to the chunks it copies (and later writes that overlap them).
//!
//! A snapshot read that goes to the origin is tracked per chunk in the snapshot, so
//! an origin write to that chunk waits for it (Linux's tracked chunks). Discards
//! follow dm-snapshot: the origin has none (they complete and change nothing, as
//! on a device without discard); a snapshot with `discard_zeroes_cow` zeroes each
//! whole chunk that has an exception and passes a partial one to the COW, and
//! with `discard_passdown_origin` also discards the origin, with no copy-out.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::rc::Weak;
use alloc::vec;
use alloc::vec::Vec;
use blockdev::IoBuf;
use nbd::{BackendError, IoCompletion, IoOp, IoOutput};
use snapshot::{Health, SNAPSHOT_INVALID, Snapshot, Source, StartedWrite, chunk_pieces};

use super::linear::LinearIo;
use super::snapshot::{SharedSnapshot, SnapshotList};

/// Whose requests these are.
pub(crate) enum Scope {
    /// A `snapshot-origin` device: origin writes copy out into these snapshots.
    Origin(SnapshotList),
    /// A `snapshot` device.
    Snapshot {
        snapshot: SharedSnapshot,
        /// The COW device.
        cow: Box<LinearIo>,
        discard_zeroes_cow: bool,
        discard_passdown_origin: bool,
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
    /// The origin: writable for `snapshot-origin`, read-only for a snapshot (unless
    /// it passes discards down).
    origin: LinearIo,
    held: VecDeque<Held>,
    parts: BTreeMap<u64, Part>,
    requests: BTreeMap<u64, Assembly>,
    next_part: u64,
    done: VecDeque<IoCompletion>,
}

impl CowIo {
    pub(crate) fn new(scope: Scope, origin: LinearIo) -> Self {
        CowIo {
            scope,
            origin,
            held: VecDeque::new(),
            parts: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_part: 0,
            done: VecDeque::new(),
        }
    }

    /// The snapshot, for a snapshot device.
    pub(crate) fn snapshot(&self) -> Option<&SharedSnapshot> {
        match &self.scope {
            Scope::Snapshot { snapshot, .. } => Some(snapshot),
            Scope::Origin(_) => None,
        }
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
            Scope::Origin(list) => list.borrow().iter().filter_map(Weak::upgrade).collect(),
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
                self.begin(tag, None);
                match &mut self.scope {
                    Scope::Origin(_) => self.part(tag, Lane::Origin, IoOp::Flush, 0, None),
                    Scope::Snapshot { snapshot, .. } => {
                        if invalid(&snapshot.borrow()) {
                            self.fail(tag, SNAPSHOT_INVALID.into());
                        } else {
                            self.part(tag, Lane::Cow, IoOp::Flush, 0, None);
                        }
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
    /// [`CowIo::poll`]).
    pub(crate) fn drain(&mut self) {
        while !self.held.is_empty() || !self.requests.is_empty() {
            self.collect();
            core::hint::spin_loop();
        }
    }

    /// Makes completed writes durable; the device must be drained.
    pub(crate) fn flush(&mut self) -> Result<(), blockdev::IoError> {
        match &mut self.scope {
            Scope::Origin(_) => self.origin.flush(),
            Scope::Snapshot { cow, .. } => cow.flush(),
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
            if let Scope::Snapshot { cow, .. } = &mut self.scope {
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
        let pieces = match &self.scope {
            Scope::Origin(_) => vec![(Lane::Origin, sector, sectors, 0, None)],
            Scope::Snapshot { snapshot, .. } => {
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
                            None => {
                                snapshot.origin_read_started(at / chunk);
                                (Lane::Origin, at, piece, offset, Some(at / chunk))
                            }
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
        let writes = cow_writes(&snapshot, &self.held[index], &started.whole);
        drop(snapshot);
        self.begin(tag, None);
        if let Some(refusal) = started.refused {
            self.fail(tag, refusal.into());
        }
        for op in writes {
            self.part(tag, Lane::Cow, op, 0, None);
        }
        self.seal(tag);
        Outcome::Issued
    }

    /// An origin write goes once no snapshot copies or reads its chunks and none
    /// needs a copy-out of them (starting the copy-outs of idle snapshots).
    fn try_issue_origin(&mut self, index: usize, sector: u64, sectors: u64) -> Outcome {
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
        if wait {
            return Outcome::Waiting;
        }
        let held = &mut self.held[index];
        let op = write_op(sector, sectors, held.data.take(), held.fua);
        let tag = held.tag;
        self.begin(tag, None);
        self.part(tag, Lane::Origin, op, 0, None);
        self.seal(tag);
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
        match (lane, &mut self.scope) {
            (Lane::Cow, Scope::Snapshot { cow, .. }) => cow.submit(part, op),
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

/// The COW writes of a snapshot write whose exceptions exist: each chunk piece at
/// its exception, except the chunks its batch wrote whole (and chunks the COW had
/// no room for).
fn cow_writes(snapshot: &Snapshot, held: &Held, whole: &[u64]) -> Vec<IoOp> {
    let chunk = snapshot.chunk_sectors();
    chunk_pieces(held.sector, held.sectors, chunk)
        .filter_map(|(at, piece)| {
            let old = at / chunk;
            let new = snapshot.exception(old).filter(|_| !whole.contains(&old))?;
            let to = new * chunk + at % chunk;
            let data = held.data.as_ref().map(|buf| {
                let from = ((at - held.sector) * 512) as usize;
                IoBuf::from_slice(&buf[from..from + piece as usize * 512])
            });
            Some(write_op(to, piece, data, held.fua))
        })
        .collect()
}

fn invalid(snapshot: &Snapshot) -> bool {
    snapshot.health() == Health::Invalid
}
