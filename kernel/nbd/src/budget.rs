//! The memory all connections of a server may hold in request buffers, queued
//! replies and TLS buffers, shared between them.
//!
//! The per-connection [`Limits`](crate::Limits) bound one client; this bounds them
//! all, so that many clients on a small machine wait for memory instead of
//! exhausting it. A request is checked when its header has arrived and its size is
//! known: one that does not fit parks its connection (the header is kept, nothing
//! more is read from that connection) until completions of other requests free
//! enough. Connections in the handshake, connections sending a payload whose buffer
//! they already hold, and connections with requests in flight are never stopped by
//! it, so some connection can always finish and free memory.

/// The server-wide memory figures.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MemoryBudget {
    /// Bytes connections may hold in all; the transport adjusts it.
    pub limit: usize,
    /// Bytes held now by every connection except the one lent this budget.
    pub others: usize,
    /// Requests that had to wait for memory since start-up.
    pub waits: u64,
    /// Requests refused with `ENOMEM`: larger than the limit with nothing else held.
    pub refused: u64,
}

/// What to do with a request that needs a buffer of some size.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    Take,
    Wait,
    /// It cannot fit even when nothing else holds memory.
    Refuse,
}

impl MemoryBudget {
    pub fn new() -> Self {
        MemoryBudget {
            limit: usize::MAX,
            others: 0,
            waits: 0,
            refused: 0,
        }
    }

    /// Whether a connection holding `held` bytes may take `bytes` more; counts the
    /// refusals (the server counts waits, once per parked request).
    pub fn admit(&mut self, held: usize, bytes: usize) -> Admission {
        let total = self.others.saturating_add(held).saturating_add(bytes);
        if total <= self.limit {
            Admission::Take
        } else if self.others == 0 && held == 0 {
            self.refused += 1;
            Admission::Refuse
        } else {
            Admission::Wait
        }
    }
}

/// Memory figures of a server, for the transport's status display.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Bytes of request buffers, queued replies and TLS sessions' buffers held now.
    pub held: usize,
    /// The limit in force.
    pub limit: usize,
    /// Connections waiting for memory now.
    pub waiting: usize,
    /// Requests that waited for memory since start-up.
    pub waits: u64,
    /// Requests refused with `ENOMEM` since start-up.
    pub refused: u64,
}
