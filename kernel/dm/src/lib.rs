//! Device-mapper's core, free of hardware so it is tested on the host.
//!
//! A [`DeviceMapper`] holds the disks it was given and the devices built on them: each
//! device has a name, a live [`Table`] (`linear` segments end to end, or one
//! `thin-pool` or `thin` segment) and perhaps an inactive one loaded by `reload`, an
//! open count (devices built on it and NBD clients), its dependencies and whether it
//! is suspended. Changes are made the way `dmsetup` makes them — `create` (load a
//! table and resume), `reload`, `clear`, `remove`, `suspend`, `resume` (swapping in
//! the inactive table), `rename`, `message` — and every change is checked completely, then saved in the configuration area
//! (when one was designated) before it takes effect, so a failed change leaves
//! devices, exports and configuration exactly as they were.
//!
//! Data-carrying devices are NBD exports: [`NbdBackend`] serves them to
//! `nbd::Server`, to the clients the [`access`] list lets in. An export handle is the device's id, so a request reaches its
//! device's target without a name lookup, and a request for a removed device fails
//! with `ESHUTDOWN`.
//!
//! Devices share disks through regions: windows of a disk with their own request
//! queues. A linear device's windows, end to end, form one block device (a span),
//! which is what its NBD clients, a pool over it or a device above it use.
//!
//! Long work — a pool releasing a deleted device's blocks, and the like — runs in
//! bounded steps from [`DeviceMapper::tick`] between requests, and is listed and
//! cancelled as [jobs](JobStatus) whatever its kind.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod access;
mod activate;
mod changed;
pub mod config;
mod device;
mod disk;
mod disk_reset;
mod format;
mod grow;
mod import;
mod jobs;
mod mapper;
mod nbd_backend;
mod new_thin;
mod origin_merge;
mod origins;
mod quiesce;
mod region;
mod reload;
mod snapshots;
mod span;
pub mod table;
mod targets;
mod thin_merge;
pub mod tls;
mod units;

pub use activate::Format;
pub use changed::CHANGED_CONTEXT_PREFIX;
pub use device::{Active, Device, State};
pub use disk::{Disk, DiskEntry};
pub use disk_reset::DiskReset;
pub use format::format_job_id;
pub use grow::PoolPart;
pub use import::{Connector, ImportFrom, ImportRecord};
pub use jobs::{Job, JobStatus, JobStep, delete_job_id, merge_release_job_id};
pub use mapper::DeviceMapper;
pub use nbd_backend::NbdBackend;
pub use origin_merge::origin_merge_job_id;
pub use quiesce::Quiesce;
pub use table::{Segment, Table, Target, bare_name};
pub use thin_merge::ThinMerge;
pub use thin_pool::{DeleteProgress, DeltaKind, DeltaPiece, DeltaXml, SnapDelta};
pub use units::human_bytes;

use alloc::string::String;

/// A refused or failed change: one line saying what was wrong and how to fix it.
#[derive(Debug, PartialEq, Eq)]
pub struct Error(pub String);

impl From<String> for Error {
    fn from(text: String) -> Self {
        Error(text)
    }
}

impl From<&str> for Error {
    fn from(text: &str) -> Self {
        Error(text.into())
    }
}

impl From<Error> for String {
    fn from(error: Error) -> Self {
        error.0
    }
}
