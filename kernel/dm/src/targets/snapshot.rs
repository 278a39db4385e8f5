//! I/O of the snapshot targets: `snapshot-origin` (origin writes copy out into every
//! snapshot of the origin first), `snapshot` (the snapshot's view) and
//! `snapshot-merge` (the origin device while a snapshot merges into it; writes to
//! the run being merged wait until it is committed).
//!
//! Requests are carried out when submitted, one at a time: a write that needs
//! copy-outs returns once they are committed and it is written.

use alloc::collections::VecDeque;
use alloc::rc::{Rc, Weak};
use alloc::vec;
use alloc::vec::Vec;
use blockdev::IoError;
use core::cell::{RefCell, RefMut};
use nbd::{BackendError, Extent, IoCompletion, IoOp, IoOutput};
use snapshot::chunk_io::{flush, read_into};
use snapshot::{MergeProgress, MergeStep, Snapshot, write_origin};

use super::linear::in_range;
use crate::span::Span;

/// A snapshot shared by its device and its origin's list.
pub(crate) type SharedSnapshot = Rc<RefCell<Snapshot>>;

/// The snapshots of one origin (dm's origin table entry). Weak: a removed snapshot
/// device drops out by itself.
pub(crate) type SnapshotList = Rc<RefCell<Vec<Weak<RefCell<Snapshot>>>>>;

/// Sectors per piece of a write-zeroes.
const ZERO_PIECE_SECTORS: u64 = 2048;

/// Calls `f` with every live snapshot of `list`, mutably.
fn with_snapshots<R>(list: &SnapshotList, f: impl FnOnce(&mut [&mut Snapshot]) -> R) -> R {
    let live: Vec<SharedSnapshot> = list.borrow().iter().filter_map(Weak::upgrade).collect();
    let mut guards: Vec<RefMut<'_, Snapshot>> = live.iter().map(|s| s.borrow_mut()).collect();
    let mut snapshots: Vec<&mut Snapshot> = guards.iter_mut().map(|guard| &mut **guard).collect();
    f(&mut snapshots)
}

pub(crate) enum Role {
    Origin {
        origin: Span,
        snapshots: SnapshotList,
    },
    Snapshot(SharedSnapshot),
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
}

impl SnapshotIo {
    pub(crate) fn new(role: Role, sectors: u64, read_only: bool) -> Self {
        SnapshotIo {
            role,
            sectors,
            read_only,
            done: VecDeque::new(),
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
            Role::Snapshot(snapshot)
            | Role::Merge {
                merging: snapshot, ..
            } => Some(snapshot),
            Role::Origin { .. } => None,
        }
    }

    pub(crate) fn submit(&mut self, tag: u64, op: IoOp) {
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
        self.release_held();
        self.done.pop_front()
    }

    /// Finishes held writes (stepping the merge until their run is committed).
    pub(crate) fn drain(&mut self) {
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
            Role::Origin { origin, .. } => flush(origin),
            Role::Snapshot(snapshot) => snapshot.borrow_mut().flush(),
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

    /// Notes the platform clock at the merge's first step (for its rate).
    pub(crate) fn note_merge_start(&mut self, now_ns: u64) {
        if let Role::Merge { started_ns, .. } = &mut self.role {
            started_ns.get_or_insert(now_ns);
        }
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

    fn execute(&mut self, op: IoOp) -> Result<IoOutput, BackendError> {
        let writes = !matches!(
            op,
            IoOp::Read { .. } | IoOp::Flush | IoOp::Cache { .. } | IoOp::BlockStatus { .. }
        );
        if writes && self.read_only {
            return Err(BackendError::ReadOnly);
        }
        match op {
            IoOp::Read { sector, mut buf } => {
                in_range(sector, buf.sectors(), self.sectors)?;
                self.read(sector, &mut buf)?;
                Ok(IoOutput::Read {
                    buf,
                    zero_holes: vec![],
                })
            }
            IoOp::Write { sector, buf, fua } => {
                in_range(sector, buf.sectors(), self.sectors)?;
                self.write(sector, &buf, fua)?;
                Ok(IoOutput::Done)
            }
            IoOp::Flush => {
                self.flush()?;
                Ok(IoOutput::Done)
            }
            // No discard support: trim is advisory.
            IoOp::Trim { .. } => Ok(IoOutput::Done),
            IoOp::WriteZeroes {
                fast_only: true, ..
            } => Err(BackendError::NotFast),
            IoOp::WriteZeroes {
                sector,
                sectors,
                fua,
                ..
            } => {
                in_range(sector, sectors, self.sectors)?;
                let mut at = sector;
                while at < sector + sectors {
                    let piece = ZERO_PIECE_SECTORS.min(sector + sectors - at);
                    self.write(at, &vec![0u8; piece as usize * 512], fua)?;
                    at += piece;
                }
                Ok(IoOutput::Done)
            }
            IoOp::Cache { sector, sectors } => {
                in_range(sector, sectors, self.sectors).map(|()| IoOutput::Done)
            }
            IoOp::BlockStatus {
                sector, sectors, ..
            } => in_range(sector, sectors.max(1), self.sectors).map(|()| {
                IoOutput::Extents(vec![Extent {
                    sectors: self.sectors - sector,
                    hole: false,
                    zero: false,
                }])
            }),
        }
    }

    fn read(&mut self, sector: u64, out: &mut [u8]) -> Result<(), IoError> {
        match &mut self.role {
            Role::Origin { origin, .. } => read_into(origin, sector, out),
            Role::Snapshot(snapshot) => snapshot.borrow_mut().read(sector, out),
            Role::Merge { merging, .. } => merging.borrow_mut().merge_read(sector, out),
        }
    }

    fn write(&mut self, sector: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        match &mut self.role {
            Role::Origin { origin, snapshots } => with_snapshots(snapshots, |snapshots| {
                write_origin(origin, snapshots, sector, data, fua)
            }),
            Role::Snapshot(snapshot) => {
                let mut snapshot = snapshot.borrow_mut();
                snapshot.write(sector, data)?;
                if fua {
                    snapshot.flush()?;
                }
                Ok(())
            }
            Role::Merge {
                merging, others, ..
            } => {
                let mut merging = merging.borrow_mut();
                with_snapshots(others, |others| {
                    merging.merge_write(others, sector, data, fua)
                })
            }
        }
    }
}
