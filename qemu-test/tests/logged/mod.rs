//! The appliance with its metadata and data disks (`vda`, `vdb`) recorded by QEMU's
//! `blklogwrites`, for the power-cut tests.

use std::fs::File;
use std::path::PathBuf;
use std::time::Duration;

use qemu_test::write_log::{Unflushed, WriteLog};
use qemu_test::{Appliance, Options, Scratch, wait_for_greeting};

pub struct Logged {
    pub appliance: Appliance,
    pub metadata: PathBuf,
    pub data: PathBuf,
    pub metadata_log: PathBuf,
    pub data_log: PathBuf,
}

/// Boots with fresh metadata and data disks of the given sizes, both logged, and
/// waits for the NBD server.
pub fn boot(scratch: &Scratch, metadata_bytes: u64, data_bytes: u64) -> Logged {
    let metadata = scratch.disk("metadata.img", metadata_bytes).unwrap();
    let data = scratch.disk("data.img", data_bytes).unwrap();
    let metadata_log = scratch.disk("metadata.log", 0).unwrap();
    let data_log = scratch.disk("data.log", 0).unwrap();
    let options = Options::bios()
        .logged_disk(&metadata, &metadata_log)
        .logged_disk(&data, &data_log)
        .nbd();
    let appliance = Appliance::boot(options).unwrap();
    wait_for_greeting(appliance.nbd_port().unwrap(), Duration::from_secs(60)).unwrap();
    Logged {
        appliance,
        metadata,
        data,
        metadata_log,
        data_log,
    }
}

/// A disk image of `bytes` at `path` as `log` leaves it after a power cut behind
/// `entries`, with `unflushed` deciding what happens to the writes not yet flushed.
pub fn rebuilt(
    path: PathBuf,
    bytes: u64,
    log: &WriteLog,
    entries: usize,
    unflushed: Unflushed,
) -> PathBuf {
    let image = File::create(&path).unwrap();
    image.set_len(bytes).unwrap();
    log.rebuild(&image, entries, unflushed).unwrap();
    path
}
