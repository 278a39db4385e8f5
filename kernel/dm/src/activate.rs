//! Activation: turning a table into a running target over regions of the disks, with
//! dm's checks (sizes, read-only devices, pools sharing no sectors).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{BlockDevice, Command};
use thin_pool::{PoolTable, ThinTable};

use crate::device::{Active, State};
use crate::mapper::DeviceMapper;
use crate::region::{Region, read_sectors};
use crate::table::{Table, Target};
use crate::targets::{LinearIo, TargetIo, ThinIo};

/// Whether activating a pool may format its metadata device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Open existing metadata only (bringing up the saved configuration: a blank
    /// metadata device there means the disk was replaced, not that it is new).
    Never,
    /// Format an all-zero metadata device, as dm does.
    IfBlank,
    /// Format whatever is there (`pool create --format`).
    Force,
}

/// A window of a disk that a device occupies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    pub disk: usize,
    pub offset: u64,
    pub sectors: u64,
    pub read_only: bool,
}

impl Window {
    /// Whether two windows share sectors of one disk.
    fn overlaps(&self, other: &Window) -> bool {
        self.disk == other.disk
            && self.offset < other.offset + other.sectors
            && other.offset < self.offset + self.sectors
    }
}

impl DeviceMapper {
    /// The disk window a disk or linear device stands for.
    pub(crate) fn window(&self, name: &str) -> Result<Window, String> {
        if let Some(index) = self.disk_index(name) {
            let disk = &self.disks[index];
            return Ok(Window {
                disk: index,
                offset: 0,
                sectors: disk.sectors(),
                read_only: disk.info().read_only,
            });
        }
        let Some(device) = self.find(name) else {
            return Err(format!(
                "no disk or device is called '{name}' (see disks and ls)"
            ));
        };
        if let State::Inactive(why) = &device.state {
            return Err(format!("device {name} is inactive ({why})"));
        }
        match &device.table.target {
            Target::Linear {
                device: below,
                offset,
            } => {
                let base = self.window(below)?;
                Ok(Window {
                    disk: base.disk,
                    offset: base.offset + offset,
                    sectors: device.table.length,
                    read_only: base.read_only || device.read_only,
                })
            }
            Target::Pool(_) | Target::Thin(_) => Err(format!(
                "{name} is a {} device; only disks and linear devices can be used here",
                device.table.kind()
            )),
        }
    }

    /// A region over a window.
    pub(crate) fn region_of(&self, window: Window, read_only: bool) -> Region {
        self.disks[window.disk].region(window.offset, window.sectors, window.read_only || read_only)
    }

    /// Starts a device from its table without registering it. Returns the running
    /// device and what the operator should know (a formatted metadata device, warnings).
    pub(crate) fn activate(
        &mut self,
        table: &Table,
        read_only: bool,
        format: Format,
    ) -> Result<(Active, Vec<String>), String> {
        let mut notes = Vec::new();
        let io = match &table.target {
            Target::Linear { device, offset } => {
                let region = self.fit(device, *offset, table.length, read_only)?;
                TargetIo::Linear(LinearIo::new(region))
            }
            Target::Pool(pool) => {
                let (engine, more) = self.open_pool(pool, table.length, format)?;
                notes = more;
                TargetIo::Pool(engine)
            }
            Target::Thin(thin) => {
                let volume = self.thin_volume(thin, table.length)?;
                TargetIo::Thin(ThinIo::new(volume, read_only))
            }
        };
        Ok((Active::new(io), notes))
    }

    /// Opens (or formats) a pool's metadata over its devices.
    fn open_pool(
        &self,
        pool: &PoolTable,
        length: u64,
        format: Format,
    ) -> Result<(thin_pool::Pool, Vec<String>), String> {
        let features = pool.config.features;
        let metadata = self.fit(
            &pool.metadata_dev,
            0,
            self.window(&pool.metadata_dev)?.sectors,
            false,
        )?;
        let data = self.fit(&pool.data_dev, 0, length, false)?;
        for (name, region) in [(&pool.metadata_dev, &metadata), (&pool.data_dev, &data)] {
            if region.info().read_only && !features.read_only {
                return Err(format!(
                    "{name} is read-only; a pool needs writable devices (or the read_only \
                     feature)"
                ));
            }
        }
        self.check_pool_windows(pool)?;
        let mut metadata = metadata;
        prepare_metadata(&mut metadata, &pool.metadata_dev, format)?;
        let mut config = pool.config.clone();
        config.length = length;
        let (engine, report) = thin_pool::Pool::open(Box::new(metadata), Box::new(data), config)
            .map_err(|error| error.0)?;
        let mut notes = Vec::new();
        if report.formatted {
            notes.push(format!(
                "formatted new pool metadata on {}",
                pool.metadata_dev
            ));
        }
        if let Some(blocks) = report.grown_from {
            notes.push(format!("data space grown from {blocks} blocks"));
        }
        notes.extend(report.warnings);
        Ok((engine, notes))
    }

    /// A region of `sectors` sectors at `offset` in a disk or linear device.
    fn fit(
        &self,
        device: &str,
        offset: u64,
        sectors: u64,
        read_only: bool,
    ) -> Result<Region, String> {
        let base = self.window(device)?;
        if offset
            .checked_add(sectors)
            .is_none_or(|end| end > base.sectors)
        {
            return Err(format!(
                "{device} is too small for this table: it holds {} sectors, the table needs \
                 {offset}+{sectors}",
                base.sectors
            ));
        }
        Ok(self.region_of(
            Window {
                offset: base.offset + offset,
                sectors,
                ..base
            },
            read_only,
        ))
    }

    /// Refuses a pool whose metadata or data overlaps its own other half or a running
    /// pool's devices (dm: "metadata device already in use by a pool").
    fn check_pool_windows(&self, pool: &PoolTable) -> Result<(), String> {
        let metadata = self.window(&pool.metadata_dev)?;
        let data = self.window(&pool.data_dev)?;
        if metadata.overlaps(&data) {
            return Err(format!(
                "metadata device {} and data device {} overlap on disk {}",
                pool.metadata_dev, pool.data_dev, self.disks[metadata.disk].name
            ));
        }
        for device in self.devices() {
            let (Target::Pool(other), State::Active(_)) = (&device.table.target, &device.state)
            else {
                continue;
            };
            for name in [&other.metadata_dev, &other.data_dev] {
                let used = self.window(name)?;
                for (mine, window) in [(&pool.metadata_dev, &metadata), (&pool.data_dev, &data)] {
                    if window.overlaps(&used) {
                        return Err(format!("{mine} is already in use by pool {}", device.name));
                    }
                }
            }
        }
        Ok(())
    }

    /// Activates a thin device of a running pool, over its external origin if any.
    pub(crate) fn thin_volume(
        &self,
        thin: &ThinTable,
        sectors: u64,
    ) -> Result<thin_pool::ThinVolume, String> {
        let pool_device = self
            .find(&thin.pool_dev)
            .ok_or_else(|| format!("no pool called '{}' (see ls)", thin.pool_dev))?;
        let active = match &pool_device.state {
            State::Active(active) => active,
            State::Inactive(why) => {
                return Err(format!("pool {} is inactive ({why})", pool_device.name));
            }
        };
        let Some(pool) = active.io.pool() else {
            return Err(format!(
                "{} is a {} device, not a thin-pool",
                pool_device.name,
                pool_device.table.kind()
            ));
        };
        if active.suspended {
            return Err(format!(
                "Unable to activate thin device while pool {} is suspended (resume it first)",
                pool_device.name
            ));
        }
        let origin = match &thin.origin_dev {
            Some(name) => {
                let region = self.region_of(self.window(name)?, true);
                Some(Box::new(region) as Box<dyn BlockDevice>)
            }
            None => None,
        };
        pool.activate(thin.dev_id, sectors, origin)
            .map_err(|error| error.0)
    }
}

/// Applies the format policy to a metadata device before the pool opens it: with
/// `Never`, a blank device is refused; with `Force`, its first block is zeroed so the
/// engine formats it.
fn prepare_metadata(metadata: &mut Region, name: &str, format: Format) -> Result<(), String> {
    const BLOCK_SECTORS: usize = 8;
    match format {
        Format::IfBlank => Ok(()),
        Format::Never => {
            let block = read_sectors(metadata, 0, BLOCK_SECTORS)
                .map_err(|error| format!("reading metadata device {name} failed: {error}"))?;
            if block.iter().all(|&b| b == 0) {
                return Err(format!(
                    "metadata device {name} is blank (was the disk replaced?); it is not \
                     formatted automatically: remove the pool and create it again to start empty"
                ));
            }
            Ok(())
        }
        Format::Force => blockdev::run_sync(
            metadata,
            Command::Write {
                sector: 0,
                buf: blockdev::IoBuf::with_sectors(BLOCK_SECTORS),
                fua: true,
            },
        )
        .map(drop)
        .map_err(|error| format!("clearing metadata device {name} failed: {error}")),
    }
}
