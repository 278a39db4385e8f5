//! What a running device is: a data device (`linear`, `thin`) that serves I/O, or a
//! pool that thin devices are activated from.

use nbd::{BackendError, IoCompletion, IoOp};
use thin_pool::Pool;

use crate::linear::LinearIo;
use crate::thin::ThinIo;

pub(crate) enum DeviceIo {
    Linear(LinearIo),
    Thin(ThinIo),
    Pool(Pool),
}

impl DeviceIo {
    /// Size in sectors, for devices that carry data.
    pub(crate) fn data_sectors(&self) -> Option<u64> {
        match self {
            DeviceIo::Linear(io) => Some(io.sectors()),
            DeviceIo::Thin(io) => Some(io.sectors()),
            DeviceIo::Pool(_) => None,
        }
    }

    pub(crate) fn read_only(&self) -> bool {
        match self {
            DeviceIo::Linear(io) => io.read_only(),
            DeviceIo::Thin(io) => io.read_only(),
            DeviceIo::Pool(pool) => pool.config().features.read_only,
        }
    }

    pub(crate) fn discard(&self) -> bool {
        match self {
            DeviceIo::Linear(io) => io.discard(),
            DeviceIo::Thin(io) => io.discard(),
            DeviceIo::Pool(_) => false,
        }
    }

    pub(crate) fn congested(&self) -> bool {
        match self {
            DeviceIo::Linear(io) => io.congested(),
            DeviceIo::Thin(io) => io.congested(),
            DeviceIo::Pool(_) => false,
        }
    }

    /// The pool, for pool devices.
    pub(crate) fn pool(&self) -> Option<&Pool> {
        match self {
            DeviceIo::Pool(pool) => Some(pool),
            _ => None,
        }
    }

    pub(crate) fn submit(&mut self, tag: u64, op: IoOp, refused: &mut impl FnMut(IoCompletion)) {
        match self {
            DeviceIo::Linear(io) => io.submit(tag, op),
            DeviceIo::Thin(io) => io.submit(tag, op),
            DeviceIo::Pool(_) => refused(IoCompletion {
                tag,
                result: Err(BackendError::Invalid),
            }),
        }
    }

    pub(crate) fn poll(&mut self) -> Option<IoCompletion> {
        match self {
            DeviceIo::Linear(io) => io.poll(),
            DeviceIo::Thin(io) => io.poll(),
            DeviceIo::Pool(pool) => {
                pool.poll();
                None
            }
        }
    }

    /// Finishes the I/O in flight (completions stay queued for [`DeviceIo::poll`]).
    pub(crate) fn drain(&mut self) {
        match self {
            DeviceIo::Linear(io) => io.drain(),
            DeviceIo::Thin(io) => io.drain(),
            DeviceIo::Pool(pool) => while pool.poll() {},
        }
    }

    /// Makes what was written durable: data flushed (pools and thin devices also
    /// commit their metadata).
    pub(crate) fn flush(&mut self) -> Result<(), alloc::string::String> {
        match self {
            DeviceIo::Linear(io) => io.flush().map_err(|error| alloc::format!("{error}")),
            DeviceIo::Thin(io) => io.flush().map_err(|error| alloc::format!("{error}")),
            DeviceIo::Pool(pool) => pool.commit().map_err(|error| error.text),
        }
    }
}
