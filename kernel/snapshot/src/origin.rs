//! `snapshot-origin`: before a write changes origin chunks, every snapshot of the
//! origin gets its copy of the old data, committed.
//!
//! Unlike Linux, which checks only the first chunk of each (split) write, every chunk
//! a write touches is checked, so a snapshot added under a live origin is safe.

use blockdev::{BlockDevice, IoError};

use crate::Snapshot;
use crate::chunk_io::write_from;

/// Copies out `sector..sector+sectors` into every snapshot that needs it (each
/// commits before this returns).
pub fn copy_out(snapshots: &mut [&mut Snapshot], sector: u64, sectors: u64) {
    for snapshot in snapshots {
        snapshot.copy_out_range(sector, sectors);
    }
}

/// An origin write: the copy-outs first, then the data.
pub fn write_origin(
    origin: &mut dyn BlockDevice,
    snapshots: &mut [&mut Snapshot],
    sector: u64,
    data: &[u8],
    fua: bool,
) -> Result<(), IoError> {
    copy_out(snapshots, sector, (data.len() / 512) as u64);
    write_from(origin, sector, data, fua)
}
