//! The disks devices are built on. Each is shared: pools, linear devices, external
//! origins, the configuration area and disk tests each use their own [`Region`] of it.

use alloc::boxed::Box;
use alloc::string::String;
use blockdev::{BlockDevice, DeviceInfo, ErrorCounts};

use crate::config::DiskRecord;
use crate::region::{Region, SharedDisk};

/// A disk handed to the device mapper: its name (`vda`, `nvme0n1`) and the device.
pub struct Disk {
    pub name: String,
    pub device: Box<dyn BlockDevice>,
}

/// A disk as the device mapper keeps it.
pub struct DiskEntry {
    pub(crate) name: String,
    pub(crate) disk: SharedDisk,
    /// Sectors at the start hidden from everything else (the configuration area).
    pub(crate) reserved: u64,
}

impl DiskEntry {
    pub(crate) fn new(disk: Disk) -> Self {
        DiskEntry {
            name: disk.name,
            disk: SharedDisk::new(disk.device),
            reserved: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The whole disk's description (model, serial, size before any reservation).
    pub fn info(&self) -> &DeviceInfo {
        self.disk.info()
    }

    /// The requests the disk failed and its resets so far.
    pub fn errors(&self) -> ErrorCounts {
        self.disk.errors()
    }

    /// Sectors offered to devices and commands.
    pub fn sectors(&self) -> u64 {
        self.disk.info().sectors - self.reserved
    }

    /// Whether the disk's first MiB holds the configuration area.
    pub fn holds_config(&self) -> bool {
        self.reserved > 0
    }

    /// A window of the usable part of the disk.
    pub(crate) fn region(&self, offset: u64, sectors: u64, read_only: bool) -> Region {
        self.disk.region(self.reserved + offset, sectors, read_only)
    }

    pub(crate) fn record(&self) -> DiskRecord {
        DiskRecord {
            name: self.name.clone(),
            sectors: self.sectors(),
            serial: self.disk.info().serial.clone(),
        }
    }
}
