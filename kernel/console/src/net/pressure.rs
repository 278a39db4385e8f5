//! The lines `net` shows about the NBD service's limits: how many sockets the
//! memory allows and how many are in use, clients held back in the listen backlog,
//! and the memory requests hold against their bound (with the requests that had to
//! wait for it).

use core::fmt::Write;

use super::human_bytes;
use crate::outln;

/// The NBD service's use of its socket pool and request memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NbdPressure {
    /// Sockets (listening and connected) now, and the most the memory allows.
    pub sockets: u64,
    pub max_sockets: u64,
    /// Bytes of socket buffers now.
    pub socket_bytes: u64,
    /// Connection requests (SYNs) left unanswered because no socket was free: the
    /// client sends them again, so they wait as in a listen backlog.
    pub syns_held: u64,
    /// Bytes request buffers and queued replies hold now, and their bound.
    pub request_bytes: u64,
    pub request_limit: u64,
    /// Connections whose next request waits for memory now.
    pub waiting: u64,
    /// Requests that waited for memory, and requests refused (larger than the bound
    /// with nothing else held), since start-up.
    pub waits: u64,
    pub refused: u64,
}

pub(super) fn show(pressure: &NbdPressure, out: &mut dyn Write) {
    outln!(
        out,
        "sockets: {} of {} ({} of buffers), {} connection attempts held back",
        pressure.sockets,
        pressure.max_sockets,
        human_bytes(pressure.socket_bytes),
        pressure.syns_held
    );
    outln!(
        out,
        "memory:  requests hold {} of {}, {} waiting ({} waits, {} refused)",
        human_bytes(pressure.request_bytes),
        human_bytes(pressure.request_limit),
        pressure.waiting,
        pressure.waits,
        pressure.refused
    );
}
