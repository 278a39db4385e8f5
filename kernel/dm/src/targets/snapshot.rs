//! I/O of the snapshot targets: `snapshot-origin` (origin writes copy out into every
//! snapshot of the origin first), `snapshot` (the snapshot's view) and
//! `snapshot-merge` (the origin device while a snapshot merges into it), carried out
//! concurrently by [`CowIo`], and the merge's pacing: steps from the main loop, each
//! after the requests in flight have finished.

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

/// Sectors a merge step copies at most.
const MERGE_STEP_SECTORS: u64 = 2048;

/// Time one call of [`SnapshotIo::paced_merge`] may step an unloaded merge for.
const MERGE_TICK_NS: u64 = 2_000_000;

/// Steps per call at most (bounds a call whatever the clock says).
const MERGE_STEPS_PER_TICK: usize = 64;

/// While requests come in, a merge step is followed by three times its own time
/// without steps, so merging takes at most a quarter of the time from I/O (the
/// pool's delete pacing).
const BUSY_PAUSE_FACTOR: u64 = 3;

/// Calls `f` with every live snapshot of `list`, mutably.
pub(crate) fn with_snapshots<R>(
    list: &SnapshotList,
    f: impl FnOnce(&mut [&mut Snapshot]) -> R,
) -> R {
    let live: Vec<SharedSnapshot> = list.borrow().iter().filter_map(Weak::upgrade).collect();
    let mut guards: Vec<RefMut<'_, Snapshot>> = live.iter().map(|s| s.borrow_mut()).collect();
    let mut snapshots: Vec<&mut Snapshot> = guards.iter_mut().map(|guard| &mut **guard).collect();
    f(&mut snapshots)
}

pub(crate) struct SnapshotIo {
    io: Box<CowIo>,
    sectors: u64,
    read_only: bool,
    done: VecDeque<IoCompletion>,
    /// Requests submitted so far, and as many at the last merge step.
    requests: u64,
    requests_at_last_step: u64,
    /// While requests come in, no merge step before this time.
    next_step_ns: u64,
    /// The platform clock at the first merge step.
    started_ns: Option<u64>,
}

impl SnapshotIo {
    pub(crate) fn new(io: CowIo, sectors: u64, read_only: bool) -> Self {
        SnapshotIo {
            io: Box::new(io),
            sectors,
            read_only,
            done: VecDeque::new(),
            requests: 0,
            requests_at_last_step: 0,
            next_step_ns: 0,
            started_ns: None,
        }
    }

    pub(crate) fn sectors(&self) -> u64 {
        self.sectors
    }

    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    /// The snapshot this device serves or merges.
    pub(crate) fn snapshot(&self) -> Option<&SharedSnapshot> {
        self.io.snapshot()
    }

    /// Whether the device takes discards.
    pub(crate) fn discard(&self) -> bool {
        self.io.discard()
    }

    pub(crate) fn submit(&mut self, tag: u64, op: IoOp) {
        self.requests += 1;
        match self.check(op) {
            Ok(op) => self.io.submit(tag, op),
            Err(result) => self.done.push_back(IoCompletion { tag, result }),
        }
    }

    pub(crate) fn poll(&mut self) -> Option<IoCompletion> {
        self.done.pop_front().or_else(|| self.io.poll())
    }

    /// Finishes the requests in flight, stepping a merge until the writes that wait
    /// for its run can go.
    pub(crate) fn drain(&mut self) {
        loop {
            self.io.drain();
            if !self.io.holds_writes() {
                return;
            }
            self.merge_step(MERGE_STEP_SECTORS);
        }
    }

    pub(crate) fn flush(&mut self) -> Result<(), IoError> {
        self.io.flush()
    }

    /// One bounded merge step (copying at most `budget` sectors); `None` unless this
    /// is a merging origin.
    pub(crate) fn merge_step(&mut self, budget: u64) -> Option<MergeStep> {
        self.io.merge_step(budget)
    }

    /// Steps a merge for a bounded time: unloaded, for a couple of milliseconds;
    /// while requests come in, one step and then a pause of three times its length
    /// (unless writes wait for the run being merged, which must end first).
    pub(crate) fn paced_merge(&mut self, clock: &dyn Fn() -> u64) {
        if self.io.merge_progress().is_none() {
            return;
        }
        let start = clock();
        self.started_ns.get_or_insert(start);
        let busy = self.requests != self.requests_at_last_step;
        if busy && start < self.next_step_ns && !self.io.holds_writes() {
            return;
        }
        self.requests_at_last_step = self.requests;
        let steps = if busy { 1 } else { MERGE_STEPS_PER_TICK };
        for _ in 0..steps {
            let working = self.merge_step(MERGE_STEP_SECTORS) == Some(MergeStep::Working);
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
        self.io.merge_progress().is_some()
            && self
                .snapshot()
                .is_some_and(|merging| merging.borrow().merge_finished())
    }

    /// The merge's progress and when it started, for a merging origin.
    pub(crate) fn merge_progress(&self) -> Option<(MergeProgress, u64)> {
        let progress = self.io.merge_progress()?;
        Some((progress, self.started_ns.unwrap_or(0)))
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
}
