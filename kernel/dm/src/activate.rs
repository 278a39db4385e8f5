//! Activation: turning a table into a running target over regions of the disks, with
//! dm's checks (sizes, read-only devices, pools sharing no sectors).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::BlockDevice;
use thin_pool::{PoolTable, ThinTable};

use crate::device::{Active, PoolWindows, State};
use crate::format::Formatting;
use crate::mapper::DeviceMapper;
use crate::region::read_sectors;
use crate::span::Span;
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

/// A run of a disk's sectors that a device occupies.
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

/// Sectors `offset..offset + sectors` of a device made of `windows` (in its sector
/// order), or `None` when the device is shorter.
pub(crate) fn slice(windows: &[Window], offset: u64, sectors: u64) -> Option<Vec<Window>> {
    let end = offset.checked_add(sectors)?;
    let mut pieces = Vec::new();
    let mut at = 0;
    for window in windows {
        let (from, to) = (offset.max(at), end.min(at + window.sectors));
        if from < to {
            pieces.push(Window {
                offset: window.offset + (from - at),
                sectors: to - from,
                ..*window
            });
        }
        at += window.sectors;
    }
    (end <= at).then_some(pieces)
}

impl DeviceMapper {
    /// The disk windows a disk or linear device stands for, in its sector order.
    pub(crate) fn windows(&self, name: &str) -> Result<Vec<Window>, String> {
        if let Some(index) = self.disk_index(name) {
            let disk = &self.disks[index];
            return Ok(alloc::vec![Window {
                disk: index,
                offset: 0,
                sectors: disk.sectors(),
                read_only: disk.info().read_only,
            }]);
        }
        let Some(device) = self.find(name) else {
            return Err(format!(
                "no disk or device is called '{name}' (see disks and ls)"
            ));
        };
        if let State::Inactive(why) = &device.state {
            return Err(format!("device {name} is inactive ({why})"));
        }
        if !matches!(device.table.target(), Target::Linear { .. }) {
            return Err(format!(
                "{name} is a {} device; only disks and linear devices can be used here",
                device.table.kind()
            ));
        }
        self.linear_windows(&device.table, device.read_only)
    }

    /// The disk windows of a linear table's segments, end to end.
    pub(crate) fn linear_windows(
        &self,
        table: &Table,
        read_only: bool,
    ) -> Result<Vec<Window>, String> {
        let mut windows = Vec::new();
        for segment in table.segments() {
            let Target::Linear { device, offset } = &segment.target else {
                return Err(format!("{} is not linear", segment.target.kind()));
            };
            windows.extend(self.fit(device, *offset, segment.length)?);
        }
        for window in &mut windows {
            window.read_only |= read_only;
        }
        Ok(windows)
    }

    /// The windows of `sectors` sectors at `offset` in a disk or linear device.
    pub(crate) fn fit(
        &self,
        device: &str,
        offset: u64,
        sectors: u64,
    ) -> Result<Vec<Window>, String> {
        let base = self.windows(device)?;
        slice(&base, offset, sectors).ok_or_else(|| {
            format!(
                "{device} is too small for this table: it holds {} sectors, the table needs \
                 {offset}+{sectors}",
                base.iter().map(|window| window.sectors).sum::<u64>()
            )
        })
    }

    /// A device over windows, end to end; `read_only` makes all of it read-only.
    pub(crate) fn span(&self, windows: &[Window], read_only: bool) -> Span {
        Span::new(
            windows
                .iter()
                .map(|window| {
                    self.disks[window.disk].region(
                        window.offset,
                        window.sectors,
                        window.read_only || read_only,
                    )
                })
                .collect(),
        )
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
        let mut pool_windows = None;
        let io = match table.target() {
            Target::Linear { .. } => {
                let windows = self.linear_windows(table, false)?;
                TargetIo::Linear(LinearIo::new(self.span(&windows, read_only)))
            }
            Target::Pool(pool) => {
                let (io, windows, more) = self.open_pool(pool, table.length(), format)?;
                notes = more;
                pool_windows = Some(windows);
                io
            }
            Target::Thin(thin) => {
                let volume = self.thin_volume(thin, table.length())?;
                TargetIo::Thin(ThinIo::new(volume, read_only))
            }
            Target::SnapshotOrigin { .. } | Target::Snapshot(_) | Target::SnapshotMerge(_) => {
                let (io, more) = self.snapshot_target(None, table, read_only)?;
                notes = more;
                TargetIo::Snapshot(io)
            }
        };
        let mut active = Active::new(io);
        active.pool_windows = pool_windows;
        Ok((active, notes))
    }

    /// The windows of a pool table's metadata device (all of it) and data device (its
    /// first `length` sectors), checked as dm checks a pool's devices: writable unless
    /// the pool is read-only, not overlapping each other or another running pool's
    /// devices (`except` names the pool being reloaded).
    pub(crate) fn pool_windows(
        &self,
        pool: &PoolTable,
        length: u64,
        except: Option<&str>,
    ) -> Result<PoolWindows, String> {
        let windows = PoolWindows {
            metadata: self.windows(&pool.metadata_dev)?,
            data: self.fit(&pool.data_dev, 0, length)?,
        };
        for (name, part) in [
            (&pool.metadata_dev, &windows.metadata),
            (&pool.data_dev, &windows.data),
        ] {
            if !pool.config.features.read_only && part.iter().any(|window| window.read_only) {
                return Err(format!(
                    "{name} is read-only; a pool needs writable devices (or the read_only \
                     feature)"
                ));
            }
        }
        self.check_pool_windows(pool, except)?;
        Ok(windows)
    }

    /// Opens a pool's metadata over its devices, or starts formatting it (a format
    /// small enough for one step is done at once).
    fn open_pool(
        &self,
        pool: &PoolTable,
        length: u64,
        format: Format,
    ) -> Result<(TargetIo, PoolWindows, Vec<String>), String> {
        let windows = self.pool_windows(pool, length, None)?;
        let mut metadata = self.span(&windows.metadata, false);
        let data = self.span(&windows.data, false);
        let mut config = pool.config.clone();
        config.length = length;
        let name = &pool.metadata_dev;
        if needs_format(&mut metadata, name, format)? {
            let format = thin_pool::PoolFormat::start(Box::new(metadata), Box::new(data), config)
                .map_err(|error| error.0)?;
            if format.progress().0 < format.progress().1 {
                let note = format!("formatting new pool metadata on {name}");
                let io = TargetIo::Formatting(Box::new(Formatting::new(format, name)));
                return Ok((io, windows, alloc::vec![note]));
            }
            let (engine, report) = format.finish().map_err(|error| error.0)?;
            let mut notes = alloc::vec![format!("formatted new pool metadata on {name}")];
            notes.extend(report.warnings);
            return Ok((TargetIo::Pool(engine), windows, notes));
        }
        let (engine, report) = thin_pool::Pool::open(Box::new(metadata), Box::new(data), config)
            .map_err(|error| error.0)?;
        let mut notes = Vec::new();
        if report.formatted {
            notes.push(format!("formatted new pool metadata on {name}"));
        }
        if let Some(blocks) = report.grown_from {
            notes.push(format!("data space grown from {blocks} blocks"));
        }
        notes.extend(report.warnings);
        Ok((TargetIo::Pool(engine), windows, notes))
    }

    /// Refuses a pool whose metadata or data overlaps its own other half or a running
    /// pool's devices (dm: "metadata device already in use by a pool").
    fn check_pool_windows(&self, pool: &PoolTable, except: Option<&str>) -> Result<(), String> {
        let metadata = self.windows(&pool.metadata_dev)?;
        let data = self.windows(&pool.data_dev)?;
        if let Some(shared) = overlap(&metadata, &data) {
            return Err(format!(
                "metadata device {} and data device {} overlap on disk {}",
                pool.metadata_dev, pool.data_dev, self.disks[shared].name
            ));
        }
        for device in self.devices() {
            let (Target::Pool(other), State::Active(_)) = (device.table.target(), &device.state)
            else {
                continue;
            };
            if except == Some(device.name.as_str()) {
                continue;
            }
            for name in [&other.metadata_dev, &other.data_dev] {
                let used = self.windows(name)?;
                for (mine, windows) in [(&pool.metadata_dev, &metadata), (&pool.data_dev, &data)] {
                    if overlap(windows, &used).is_some() {
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
        if matches!(active.io, TargetIo::Formatting(_)) {
            return Err(crate::format::not_formatted_yet(&pool_device.name));
        }
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
            Some(name) => Some(self.span(&self.windows(name)?, true)),
            None => None,
        };
        self.check_origin(thin, origin.as_ref().map(|span| span.info().sectors))?;
        let origin = origin.map(|span| Box::new(span) as Box<dyn BlockDevice>);
        pool.activate(thin.dev_id, sectors, origin)
            .map_err(|error| error.0)
    }
}

/// The disk two sets of windows share sectors of, if any.
fn overlap(a: &[Window], b: &[Window]) -> Option<usize> {
    a.iter()
        .find(|one| b.iter().any(|other| one.overlaps(other)))
        .map(|window| window.disk)
}

/// Whether a pool's metadata device is to be formatted under `format`: with
/// `Never` only when a format was interrupted (a blank device is refused), with
/// `IfBlank` also when it is blank, with `Force` always.
fn needs_format(metadata: &mut Span, name: &str, format: Format) -> Result<bool, String> {
    if format == Format::Force {
        return Ok(true);
    }
    let block = read_sectors(metadata, 0, 8)
        .map_err(|error| format!("reading metadata device {name} failed: {error}"))?;
    let first: &[u8; 4096] = block[..].try_into().expect("eight sectors");
    if thin_pool::is_format_marker(first) {
        return Ok(true);
    }
    let blank = first.iter().all(|&b| b == 0);
    if blank && format == Format::Never {
        return Err(format!(
            "metadata device {name} is blank (was the disk replaced?); it is not formatted \
             automatically: remove the pool and create it again to start empty"
        ));
    }
    Ok(blank)
}
