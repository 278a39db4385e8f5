//! The targets of a running device: a data device (`linear`, `thin`, the snapshot
//! targets) that serves I/O, or a pool (`thin-pool`) that thin devices are activated
//! from — once its metadata is formatted.

mod cow_io;
mod linear;
mod snapshot;
mod thin;

use alloc::boxed::Box;
use nbd::{BackendError, IoCompletion, IoOp};
use thin_pool::Pool;

use crate::format::Formatting;

pub(crate) use cow_io::{CowIo, Scope};
pub(crate) use linear::LinearIo;
pub(crate) use snapshot::{Role, SnapshotIo, SnapshotList};
pub(crate) use thin::ThinIo;

pub(crate) enum TargetIo {
    Linear(LinearIo),
    Thin(ThinIo),
    Pool(Pool),
    Snapshot(SnapshotIo),
    /// A pool whose metadata is being formatted (in the background).
    Formatting(Box<Formatting>),
}

impl TargetIo {
    /// Size in sectors, for devices that carry data.
    pub(crate) fn data_sectors(&self) -> Option<u64> {
        match self {
            TargetIo::Linear(io) => Some(io.sectors()),
            TargetIo::Thin(io) => Some(io.sectors()),
            TargetIo::Snapshot(io) => Some(io.sectors()),
            TargetIo::Pool(_) | TargetIo::Formatting(_) => None,
        }
    }

    pub(crate) fn read_only(&self) -> bool {
        match self {
            TargetIo::Linear(io) => io.read_only(),
            TargetIo::Thin(io) => io.read_only(),
            TargetIo::Snapshot(io) => io.read_only(),
            TargetIo::Pool(pool) => pool.config().features.read_only,
            TargetIo::Formatting(_) => false,
        }
    }

    pub(crate) fn discard(&self) -> bool {
        match self {
            TargetIo::Linear(io) => io.discard(),
            TargetIo::Thin(io) => io.discard(),
            TargetIo::Snapshot(io) => io.discard(),
            TargetIo::Pool(_) | TargetIo::Formatting(_) => false,
        }
    }

    pub(crate) fn congested(&self) -> bool {
        match self {
            TargetIo::Linear(io) => io.congested(),
            TargetIo::Thin(io) => io.congested(),
            TargetIo::Snapshot(_) | TargetIo::Pool(_) | TargetIo::Formatting(_) => false,
        }
    }

    /// The pool, for pool devices.
    pub(crate) fn pool(&self) -> Option<&Pool> {
        match self {
            TargetIo::Pool(pool) => Some(pool),
            _ => None,
        }
    }

    pub(crate) fn submit(&mut self, tag: u64, op: IoOp, refused: &mut impl FnMut(IoCompletion)) {
        match self {
            TargetIo::Linear(io) => io.submit(tag, op),
            TargetIo::Thin(io) => io.submit(tag, op),
            TargetIo::Snapshot(io) => io.submit(tag, op),
            TargetIo::Pool(_) | TargetIo::Formatting(_) => refused(IoCompletion {
                tag,
                result: Err(BackendError::Invalid),
            }),
        }
    }

    pub(crate) fn poll(&mut self) -> Option<IoCompletion> {
        match self {
            TargetIo::Linear(io) => io.poll(),
            TargetIo::Thin(io) => io.poll(),
            TargetIo::Snapshot(io) => io.poll(),
            TargetIo::Pool(pool) => {
                pool.poll();
                None
            }
            TargetIo::Formatting(_) => None,
        }
    }

    /// Finishes the I/O in flight (completions stay queued for [`TargetIo::poll`]).
    pub(crate) fn drain(&mut self) {
        match self {
            TargetIo::Linear(io) => io.drain(),
            TargetIo::Thin(io) => io.drain(),
            TargetIo::Snapshot(io) => io.drain(),
            TargetIo::Pool(pool) => while pool.poll() {},
            TargetIo::Formatting(_) => {}
        }
    }

    /// Makes what was written durable: data flushed (pools and thin devices also
    /// commit their metadata).
    pub(crate) fn flush(&mut self) -> Result<(), alloc::string::String> {
        match self {
            TargetIo::Linear(io) => io.flush().map_err(|error| alloc::format!("{error}")),
            TargetIo::Thin(io) => io.flush().map_err(|error| alloc::format!("{error}")),
            TargetIo::Snapshot(io) => io.flush().map_err(|error| alloc::format!("{error}")),
            TargetIo::Pool(pool) => pool.commit().map_err(|error| error.text),
            // Each step is written before the next; the superblock comes last.
            TargetIo::Formatting(_) => Ok(()),
        }
    }
}
