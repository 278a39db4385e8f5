//! The thin-pool engine: Linux dm-thin's `thin-pool` and `thin` targets over
//! [`blockdev::BlockDevice`]s, with dm-thin's on-disk metadata (the
//! `persistent-data` crate).
//!
//! * [`Pool`] opens a pool from a metadata device and a data device with the
//!   parameters of a `thin-pool` table line ([`PoolConfig`], [`PoolTable`]), runs
//!   pool messages ([`Pool::message`]), reports status in dm's formats
//!   ([`PoolStatus`], [`ThinStatus`]) and per-volume usage ([`ThinUsage`]), and
//!   queues [`PoolEvent`]s for the console.
//! * [`Pool::activate`] gives a [`ThinVolume`]: a [`blockdev::BlockDevice`] with the
//!   extra operations NBD needs ([`ThinOp`]: write-zeroes, block status, reads that
//!   report their zero holes).
//! * [`Pool::snap_delta`] compares two thin devices in the held metadata snapshot
//!   in steps (`thin_delta`); [`Pool::changed_view`] freezes two devices' mappings
//!   for as long as a reader needs to ask what differs between them.
//!
//! The engine has no clock and no threads: callers poll volumes (or [`Pool::poll`])
//! to advance I/O and call [`Pool::service`] with the current time for timer work.
//! Everything is `no_std` + `alloc`.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

mod buffers;
pub mod config;
mod delta;
mod engine;
mod format;
pub mod io;
mod mapcache;
pub mod message;
mod pool;
pub mod status;
mod uncommitted;
mod usage;

pub use blockdev::{Extent, SectorRun};
pub use config::{Features, PoolConfig, PoolTable, TableError, ThinTable};
pub use delta::{ChangedView, SnapDelta};
pub use engine::{DeleteProgress, DiscardProgress, OriginMergeProgress};
pub use format::PoolFormat;
pub use io::{NOT_FAST, QueueFull, ThinCompletion, ThinOp, ThinOutput, ThinRequest};
pub use message::{Errno, Message, MessageError};
pub use persistent_data::delta_xml::DeltaXml;
pub use persistent_data::thin::is_format_marker;
pub use persistent_data::thin::{DeltaKind, DeltaPiece, DeltaSource};
pub use pool::{OpenReport, Pool, PoolError, ThinVolume};
pub use status::{DiscardMode, PoolEvent, PoolMode, PoolStatus, ThinStatus, ThinUsage};
