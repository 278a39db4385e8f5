//! Requests a thin volume accepts beyond the plain [`blockdev::Command`]s, and what
//! they complete with.

use alloc::vec::Vec;

use blockdev::{Extent, IoBuf, IoError, SectorRun};

/// One operation on a thin volume. Addresses and lengths are 512-byte sectors; any
/// size and alignment inside the volume is accepted.
#[derive(Debug)]
pub enum ThinOp {
    /// Fill `buf` from `sector` on.
    Read { sector: u64, buf: IoBuf },
    /// Store `buf` at `sector`; with `fua` it completes only once the data and any
    /// mapping it created are durable.
    Write { sector: u64, buf: IoBuf, fua: bool },
    /// Every write completed before this was submitted becomes durable (data device
    /// flushed, metadata committed).
    Flush,
    /// Unmap the whole data blocks inside the range (partial blocks are left alone);
    /// with `fua` it completes only once the unmapping is durable.
    Discard {
        sector: u64,
        sectors: u64,
        fua: bool,
    },
    /// Make the range read as zeros. `unmap`: whole blocks may be unmapped instead
    /// (only done when no external origin would show through); otherwise the range
    /// ends up provisioned.
    WriteZeroes {
        sector: u64,
        sectors: u64,
        unmap: bool,
        fua: bool,
    },
    /// Make the range read as zeros only if that needs no data written (NBD's
    /// "fast zero"): the whole blocks inside it are unmapped, and blocks it covers
    /// only in part must be unprovisioned already (they read as zeros). That needs
    /// discards (not `ignore_discard`), no external origin and writable metadata.
    /// Otherwise it completes with [`NOT_FAST`] at once and changes nothing.
    FastZero {
        sector: u64,
        sectors: u64,
        fua: bool,
    },
    /// Report which parts of the range are provisioned: consecutive extents from
    /// `sector` on, at most `max_extents` of them.
    BlockStatus {
        sector: u64,
        sectors: u64,
        max_extents: u32,
    },
}

/// The error of a [`ThinOp::FastZero`] that would need data writes (NBD: `ENOTSUP`).
pub const NOT_FAST: IoError = IoError::Unsupported;

/// An operation with the caller's tag, echoed in its completion.
#[derive(Debug)]
pub struct ThinRequest {
    pub tag: u64,
    pub op: ThinOp,
}

/// A finished [`ThinRequest`]: its outcome and its buffer (filled, for reads; empty
/// for operations without one).
#[derive(Debug)]
pub struct ThinCompletion {
    pub tag: u64,
    pub result: Result<ThinOutput, IoError>,
    pub buf: IoBuf,
}

/// What a successful request produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ThinOutput {
    Done,
    /// Reads: the sub-ranges (relative to the request's first sector, ascending)
    /// that were unprovisioned and read as zeros, decided in the same step that
    /// issued the read, so they cannot race a concurrent write. The buffer holds the
    /// zeros too.
    Read {
        zero_holes: Vec<SectorRun>,
    },
    /// Block status: consecutive extents starting at the requested sector.
    Extents(Vec<Extent>),
}

/// The volume's queue is full; the request is handed back. Poll, then resubmit.
#[derive(Debug)]
pub struct QueueFull(pub ThinRequest);
