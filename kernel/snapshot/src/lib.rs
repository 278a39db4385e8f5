//! Linux dm-snapshot over [`blockdev::BlockDevice`]s: the `snapshot-origin`,
//! `snapshot` and `snapshot-merge` targets and their exception stores.
//!
//! * [`SnapshotTable`] parses and prints the arguments of `snapshot` and
//!   `snapshot-merge` table lines with dm's rules and errors.
//! * [`Snapshot`] is one snapshot: its origin, its COW device and the exceptions
//!   (`origin chunk → COW chunk`) in a persistent store (Linux's on-disk format,
//!   byte for byte, so Linux and thinbox read each other's COW devices) or a
//!   transient one. It serves the snapshot device's reads and writes, the copy-out an
//!   origin write needs ([`copy_out`]), and as a merging snapshot the origin device's
//!   I/O and the merge itself in bounded steps ([`Snapshot::merge_step`]).
//!
//! Exceptions are made in batches (Linux's pending exceptions) that advance by
//! submitting to the snapshot's own device handles and polling
//! ([`Snapshot::start_copy_out`], [`Snapshot::start_write`], [`Snapshot::pump`]), so
//! that a device above can go on with requests that do not touch those chunks; the
//! synchronous calls ([`Snapshot::write`], [`copy_out`], the merge) run a batch to
//! its end. Durability follows Linux's order exactly: data, then a flush, then the
//! record that points at it (written with FUA), then the write that needed it.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod chunk_io;
mod format;
mod merge;
mod origin;
mod pending;
mod persistent;
mod snapshot;
mod table;
mod transient;

pub use format::{Header, MAGIC, area_chunk, records_per_area};
pub use merge::{MergeProgress, MergeStep};
pub use origin::{copy_out, write_origin};
pub use snapshot::{
    Health, LoadError, SNAPSHOT_INVALID, SNAPSHOT_OVERFLOW, Snapshot, Source, StartedWrite,
    chunk_pieces,
};
pub use table::{SnapshotTable, StoreKind, TableError, check_chunk_size};

/// The largest chunk size Linux accepts, in sectors (`INT_MAX >> 9` rounded down to
/// a power of two: 1 GiB).
pub const MAX_CHUNK_SECTORS: u32 = 1 << 21;

/// Chunk size a persistent store picks for a blank COW when the table says 0.
pub const DEFAULT_CHUNK_SECTORS: u32 = 32;
