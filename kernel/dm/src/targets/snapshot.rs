//! I/O of the snapshot targets: `snapshot-origin` (origin writes copy out into every
//! snapshot of the origin first) and `snapshot` (the snapshot's view), both carried
//! out concurrently by [`CowIo`], and `snapshot-merge` (the origin device while a
//! snapshot merges into it; writes to the run being merged wait until it is
//! committed, the others are carried out when submitted, one at a time).

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::rc::{Rc, Weak};
use alloc::vec;
use alloc::vec::Vec;
use blockdev::IoError;
use core::cell::{RefCell, RefMut};
use nbd::{BackendError, Extent, IoCompletion, IoOp, IoOutput};
use snapshot::{MergeProgress, MergeStep, Snapshot};

use super::cow_io::CowIo;
use super::linear::in_range;

/// A snapshot shared by its device and its origin's list.
pub(crate) type SharedSnapshot = Rc<RefCell<Snapshot>>;

/// The snapshots of one origin (dm's origin table entry). Weak: a removed snapshot
/// device drops out by itself.
pub(crate) type SnapshotList = Rc<RefCell<Vec<Weak<RefCell<Snapshot>>>>>;

/// Sectors per piece of a write-zeroes, and at most per merge step.
const ZERO_PIECE_SECTORS: u64 = 2048;

/// Time one call of [`SnapshotIo::paced_merge`] may step an unloaded merge for.
const MERGE_TICK_NS: u64 = 2_000_000;

/// Steps per call at most (bounds a call whatever the clock says).
const MERGE_STEPS_PER_TICK: usize = 64;

/// While requests come in, a merge step is followed by three times its own time
/// without steps, so merging takes at most a quarter of the time from I/O (the
/// pool's delete pacing).
const BUSY_PAUSE_FACTOR: u64 = 3;

/// Calls `f` with every live snapshot of `list`, mutably.
fn with_snapshots<R>(list: &SnapshotList, f: impl FnOnce(&mut [&mut Snapshot]) -> R) -> R {
    let live: Vec<SharedSnapshot> = list.borrow().iter().filter_map(Weak::upgrade).collect();
    let mut guards: Vec<RefMut<'_, Snapshot>> = live.iter().map(|s| s.borrow_mut()).collect();
    let mut snapshots: Vec<&mut Snapshot> = guards.iter_mut().map(|guard| &mut **guard).collect();
    f(&mut snapshots)
}

pub(crate) enum Role {
    /// `snapshot-origin` or `snapshot`.
    Cow(Box<CowIo>),
    Merge {
        merging: SharedSnapshot,
        /// The origin's other snapshots, which get copy-outs of what changes.
        others: SnapshotList,
        /// Writes waiting for the run being merged, in arrival order.
        held: VecDeque<(u64, IoOp)>,
        /// The platform clock at the first merge step.
        started_ns: Option<u64>,
    },
}

pub(crate) struct SnapshotIo {
    role: Role,
    sectors: u64,
    read_only: bool,
    done: VecDeque<IoCompletion>,
    /// Requests submitted so far, and as many at the last merge step.
    requests: u64,
    requests_at_last_step: u64,
    /// While requests come in, no merge step before this time.
    next_step_ns: u64,
}

impl SnapshotIo {
    pub(crate) fn new(role: Role, sectors: u64, read_only: bool) -> Self {
        SnapshotIo {
            role,
            sectors,
            read_only,
            done: VecDeque::new(),
            requests: 0,
            requests_at_last_step: 0,
            next_step_ns: 0,
        }
    }

    pub(crate) fn sectors(&self) -> u64 {
        self.sectors
    }

    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    pub(crate) fn role(&self) -> &Role {
        &self.role
    }

    /// The snapshot this device serves or merges.
    pub(crate) fn snapshot(&self) -> Option<&SharedSnapshot> {
        match &self.role {
            Role::Cow(io) => io.snapshot(),
            Role::Merge { merging, .. } => Some(merging),
        }
    }

    /// Whether the device takes discards.
    pub(crate) fn discard(&self) -> bool {
        matches!(&self.role, Role::Cow(io) if io.discard())
    }

    pub(crate) fn submit(&mut self, tag: u64, op: IoOp) {
        self.requests += 1;
        let op = match self.check(op) {
            Ok(op) => op,
            Err(result) => {
                self.done.push_back(IoCompletion { tag, result });
                return;
            }
        };
        if let Role::Cow(io) = &mut self.role {
            io.submit(tag, op);
            return;
        }
        if let Role::Merge { merging, held, .. } = &mut self.role {
            let range = match &op {
                IoOp::Write { sector, buf, .. } => Some((*sector, buf.sectors())),
                IoOp::WriteZeroes {
                    sector, sectors, ..
                } => Some((*sector, *sectors)),
                _ => None,
            };
            let blocked = range
                .is_some_and(|(sector, sectors)| merging.borrow().merge_blocks(sector, sectors));
            if blocked || (range.is_some() && !held.is_empty()) {
                held.push_back((tag, op));
                return;
            }
        }
        let result = self.execute(op);
        self.done.push_back(IoCompletion { tag, result });
    }

    pub(crate) fn poll(&mut self) -> Option<IoCompletion> {
        if let Some(done) = self.done.pop_front() {
            return Some(done);
        }
        if let Role::Cow(io) = &mut self.role {
            return io.poll();
        }
        self.release_held();
        self.done.pop_front()
    }

    /// Finishes held writes (stepping the merge until their run is committed).
    pub(crate) fn drain(&mut self) {
        if let Role::Cow(io) = &mut self.role {
            io.drain();
        }
        while self.holds_writes() {
            if self
                .merge_step(ZERO_PIECE_SECTORS)
                .is_none_or(|step| step != MergeStep::Working)
            {
                self.fail_held();
            }
            self.release_held();
        }
    }

    fn holds_writes(&self) -> bool {
        matches!(&self.role, Role::Merge { held, .. } if !held.is_empty())
    }

    pub(crate) fn flush(&mut self) -> Result<(), IoError> {
        match &mut self.role {
            Role::Cow(io) => io.flush(),
            Role::Merge { merging, .. } => merging.borrow_mut().merge_flush(),
        }
    }

    /// One bounded merge step (copying at most `budget` sectors); `None` unless this
    /// is a merging origin.
    pub(crate) fn merge_step(&mut self, budget: u64) -> Option<MergeStep> {
        let Role::Merge {
            merging, others, ..
        } = &mut self.role
        else {
            return None;
        };
        let mut merging = merging.borrow_mut();
        let step = with_snapshots(others, |others| merging.merge_step(others, budget));
        drop(merging);
        self.release_held();
        Some(step)
    }

    /// Steps a merge for a bounded time: unloaded, for a couple of milliseconds;
    /// while requests come in, one step and then a pause of three times its length
    /// (unless writes wait for the run being merged, which must end first).
    pub(crate) fn paced_merge(&mut self, clock: &dyn Fn() -> u64) {
        let Role::Merge { started_ns, .. } = &mut self.role else {
            return;
        };
        let start = clock();
        started_ns.get_or_insert(start);
        let busy = self.requests != self.requests_at_last_step;
        if busy && start < self.next_step_ns && !self.holds_writes() {
            return;
        }
        self.requests_at_last_step = self.requests;
        let steps = if busy { 1 } else { MERGE_STEPS_PER_TICK };
        for _ in 0..steps {
            let working = self.merge_step(ZERO_PIECE_SECTORS) == Some(MergeStep::Working);
            if !working || clock().saturating_sub(start) > MERGE_TICK_NS {
                break;
            }
        }
        if busy {
            let end = clock();
            self.next_step_ns = end + end.saturating_sub(start) * BUSY_PAUSE_FACTOR;
        }
    }

    /// Whether this is a merging origin whose merge is complete.
    pub(crate) fn merge_finished(&self) -> bool {
        matches!(&self.role, Role::Merge { merging, .. } if merging.borrow().merge_finished())
    }

    /// The merge's progress and when it started, for a merging origin.
    pub(crate) fn merge_progress(&self) -> Option<(MergeProgress, u64)> {
        let Role::Merge {
            merging,
            started_ns,
            ..
        } = &self.role
        else {
            return None;
        };
        let progress = merging.borrow().merge_progress()?;
        Some((progress, started_ns.unwrap_or(0)))
    }

    /// Runs the held writes whose run has been merged, in order.
    fn release_held(&mut self) {
        loop {
            let Role::Merge { merging, held, .. } = &mut self.role else {
                return;
            };
            let Some((_, op)) = held.front() else {
                return;
            };
            let (sector, sectors) = match op {
                IoOp::Write { sector, buf, .. } => (*sector, buf.sectors()),
                IoOp::WriteZeroes {
                    sector, sectors, ..
                } => (*sector, *sectors),
                _ => (0, 0),
            };
            if merging.borrow().merge_blocks(sector, sectors) {
                return;
            }
            let (tag, op) = held.pop_front().expect("seen above");
            let result = self.execute(op);
            self.done.push_back(IoCompletion { tag, result });
        }
    }

    /// A failed merge keeps nothing waiting: held writes fail as dm fails them.
    fn fail_held(&mut self) {
        if let Role::Merge { held, .. } = &mut self.role {
            for (tag, _) in held.drain(..) {
                self.done.push_back(IoCompletion {
                    tag,
                    result: Err(BackendError::Io("snapshot merge failed")),
                });
            }
        }
    }

    /// Checks a request against the device (range, mode) and answers the ones that
    /// need no I/O; the others come back to be carried out.
    fn check(&self, op: IoOp) -> Result<IoOp, Result<IoOutput, BackendError>> {
        let writes = !matches!(
            op,
            IoOp::Read { .. } | IoOp::Flush | IoOp::Cache { .. } | IoOp::BlockStatus { .. }
        );
        if writes && self.read_only {
            return Err(Err(BackendError::ReadOnly));
        }
        let (sector, sectors) = match &op {
            IoOp::Read { sector, buf } | IoOp::Write { sector, buf, .. } => {
                (*sector, buf.sectors())
            }
            IoOp::Trim {
                sector, sectors, ..
            }
            | IoOp::WriteZeroes {
                sector, sectors, ..
            } => (*sector, *sectors),
            IoOp::Cache { sector, sectors } => {
                return Err(in_range(*sector, *sectors, self.sectors).map(|()| IoOutput::Done));
            }
            IoOp::BlockStatus {
                sector, sectors, ..
            } => {
                let extent = Extent {
                    sectors: self.sectors.saturating_sub(*sector),
                    hole: false,
                    zero: false,
                };
                return Err(in_range(*sector, (*sectors).max(1), self.sectors)
                    .map(|()| IoOutput::Extents(vec![extent])));
            }
            IoOp::Flush => return Ok(op),
        };
        if let Err(error) = in_range(sector, sectors, self.sectors) {
            return Err(Err(error));
        }
        if let IoOp::WriteZeroes {
            fast_only: true, ..
        } = op
        {
            return Err(Err(BackendError::NotFast));
        }
        Ok(op)
    }

    /// A request of the merging origin, carried out now.
    fn execute(&mut self, op: IoOp) -> Result<IoOutput, BackendError> {
        let Role::Merge {
            merging, others, ..
        } = &mut self.role
        else {
            return Err(BackendError::Invalid);
        };
        let mut merging = merging.borrow_mut();
        let mut write = |sector: u64, data: &[u8], fua: bool| {
            with_snapshots(others, |others| {
                merging.merge_write(others, sector, data, fua)
            })
        };
        match op {
            IoOp::Read { sector, mut buf } => {
                drop(write);
                merging.merge_read(sector, &mut buf)?;
                Ok(IoOutput::Read {
                    buf,
                    zero_holes: vec![],
                })
            }
            IoOp::Write { sector, buf, fua } => {
                write(sector, &buf, fua)?;
                Ok(IoOutput::Done)
            }
            IoOp::WriteZeroes {
                sector,
                sectors,
                fua,
                ..
            } => {
                let mut at = sector;
                while at < sector + sectors {
                    let piece = ZERO_PIECE_SECTORS.min(sector + sectors - at);
                    write(at, &vec![0u8; piece as usize * 512], fua)?;
                    at += piece;
                }
                Ok(IoOutput::Done)
            }
            IoOp::Flush => {
                drop(write);
                merging.merge_flush()?;
                Ok(IoOutput::Done)
            }
            // Discards complete without effect while merging, as dm's do.
            IoOp::Trim { .. } | IoOp::Cache { .. } | IoOp::BlockStatus { .. } => Ok(IoOutput::Done),
        }
    }
}
