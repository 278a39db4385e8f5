//! The device registry: the disks, the device-mapper style devices built on them
//! (one table line each), their persistent configuration, and the NBD exports they
//! offer.
//!
//! Every change is checked completely before anything happens, then saved to the
//! configuration area (when there is one) before it takes effect in memory, so a
//! failed command — a bad table, a missing disk, a full or failing configuration disk
//! — leaves devices, exports and configuration exactly as they were.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use blockdev::{BlockDevice, Command, SECTOR_SIZE};

use crate::config::{AREA_SECTORS, Area, DeviceRecord, DiskRecord, Snapshot};
use crate::device_io::DeviceIo;
use crate::linear::LinearIo;
use crate::shared::{Region, SharedDisk};
use crate::table::{Table, Target, bare_name, check_name};
use crate::thin::ThinIo;
use crate::units::human_bytes;
use crate::{CommandError, Disk};
use thin_pool::ThinTable;

/// A disk as the registry keeps it.
pub(crate) struct DiskEntry {
    pub name: String,
    pub disk: SharedDisk,
    /// Sectors at the start hidden from everything else (the configuration area).
    pub reserved: u64,
}

impl DiskEntry {
    /// Sectors offered to devices and commands.
    pub fn sectors(&self) -> u64 {
        self.disk.info().sectors - self.reserved
    }

    /// A window of the usable part of the disk.
    pub fn region(&self, offset: u64, sectors: u64, read_only: bool) -> Region {
        self.disk.region(self.reserved + offset, sectors, read_only)
    }

    fn record(&self) -> DiskRecord {
        DiskRecord {
            name: self.name.clone(),
            sectors: self.sectors(),
            serial: self.disk.info().serial.clone(),
        }
    }
}

/// A device and whether it is running.
pub(crate) struct Device {
    pub name: String,
    pub read_only: bool,
    pub table: Table,
    pub state: State,
}

pub(crate) enum State {
    Active(Box<Active>),
    /// Known from the configuration but not running; the text says why.
    Inactive(String),
}

/// A running device.
pub(crate) struct Active {
    /// Distinguishes this activation from a later device of the same name, so clients
    /// of a removed device never reach its successor.
    pub instance: u64,
    pub suspended: bool,
    pub io: DeviceIo,
    /// NBD requests that arrived while suspended.
    pub held: VecDeque<nbd::IoRequest>,
    /// NBD connections that have the device open.
    pub clients: usize,
}

/// Whether activating a pool may format its metadata device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
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
struct Window {
    disk: usize,
    offset: u64,
    sectors: u64,
    read_only: bool,
}

/// The configuration disk and the state of its area.
pub(crate) struct ConfigDisk {
    pub disk: usize,
    pub area: Area,
}

/// An NBD connection's open export.
struct OpenExport {
    device: String,
    instance: u64,
}

/// Disks, devices, configuration and exports.
pub struct Registry {
    pub(crate) disks: Vec<DiskEntry>,
    pub(crate) devices: Vec<Device>,
    pub(crate) config: Option<ConfigDisk>,
    exports: BTreeMap<u64, OpenExport>,
    next_export: u64,
    next_instance: u64,
    /// Completions decided without a device (unknown or removed exports).
    ready: VecDeque<nbd::IoCompletion>,
    /// Saved disks that were not found at boot, kept so saving the configuration again
    /// does not forget how to recognise them.
    missing_disks: Vec<DiskRecord>,
}

impl Registry {
    pub(crate) fn new(disks: Vec<Disk>) -> Self {
        Registry {
            disks: disks
                .into_iter()
                .map(|disk| DiskEntry {
                    name: disk.name,
                    disk: SharedDisk::new(disk.device),
                    reserved: 0,
                })
                .collect(),
            devices: Vec::new(),
            config: None,
            exports: BTreeMap::new(),
            next_export: 0,
            next_instance: 0,
            ready: VecDeque::new(),
            missing_disks: Vec::new(),
        }
    }

    pub(crate) fn disk_index(&self, name: &str) -> Option<usize> {
        let bare = bare_name(name);
        self.disks.iter().position(|disk| disk.name == bare)
    }

    pub(crate) fn device_index(&self, name: &str) -> Option<usize> {
        let bare = bare_name(name);
        self.devices.iter().position(|device| device.name == bare)
    }

    /// The device called `name`, or an error naming what exists.
    pub(crate) fn device(&self, name: &str) -> Result<&Device, CommandError> {
        self.device_index(name)
            .map(|index| &self.devices[index])
            .ok_or_else(|| unknown_device(name))
    }

    /// Names of the devices whose tables refer to `name`.
    pub(crate) fn users_of(&self, name: &str) -> Vec<&str> {
        self.devices
            .iter()
            .filter(|device| device.table.dependencies().contains(&name))
            .map(|device| device.name.as_str())
            .collect()
    }

    /// The disk window a disk or linear device stands for.
    fn window(&self, name: &str) -> Result<Window, String> {
        if let Some(index) = self.disk_index(name) {
            let disk = &self.disks[index];
            return Ok(Window {
                disk: index,
                offset: 0,
                sectors: disk.sectors(),
                read_only: disk.disk.info().read_only,
            });
        }
        let Some(index) = self.device_index(name) else {
            return Err(format!(
                "no disk or device is called '{name}' (see disks and ls)"
            ));
        };
        let device = &self.devices[index];
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

    /// Starts a device from its table without registering it. Returns the running
    /// device and what the operator should know (a formatted metadata device, warnings).
    fn activate(
        &mut self,
        table: &Table,
        read_only: bool,
        format: Format,
    ) -> Result<(Active, Vec<String>), String> {
        let mut notes = Vec::new();
        let io = match &table.target {
            Target::Linear { device, offset } => {
                let region = self.fit(device, *offset, table.length, read_only)?;
                DeviceIo::Linear(LinearIo::new(region))
            }
            Target::Pool(pool) => {
                let features = pool.config.features;
                let metadata = self.fit(
                    &pool.metadata_dev,
                    0,
                    self.window(&pool.metadata_dev)?.sectors,
                    false,
                )?;
                let data = self.fit(&pool.data_dev, 0, table.length, false)?;
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
                config.length = table.length;
                let (pool_engine, report) = thin_pool::Pool::open(
                    alloc::boxed::Box::new(metadata),
                    alloc::boxed::Box::new(data),
                    config,
                )
                .map_err(|error| error.0)?;
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
                DeviceIo::Pool(pool_engine)
            }
            Target::Thin(thin) => {
                let volume = self.thin_volume(thin, table.length)?;
                DeviceIo::Thin(ThinIo::new(volume, read_only))
            }
        };
        let instance = self.next_instance;
        self.next_instance += 1;
        Ok((
            Active {
                instance,
                suspended: false,
                io,
                held: VecDeque::new(),
                clients: 0,
            },
            notes,
        ))
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
        Ok(
            self.disks[base.disk].region(
                base.offset + offset,
                sectors,
                base.read_only || read_only,
            ),
        )
    }

    /// Refuses a pool whose metadata or data overlaps its own other half or a running
    /// pool's devices (dm: "metadata device already in use by a pool").
    fn check_pool_windows(&self, pool: &thin_pool::PoolTable) -> Result<(), String> {
        let metadata = self.window(&pool.metadata_dev)?;
        let data = self.window(&pool.data_dev)?;
        if overlap(&metadata, &data) {
            return Err(format!(
                "metadata device {} and data device {} overlap on disk {}",
                pool.metadata_dev, pool.data_dev, self.disks[metadata.disk].name
            ));
        }
        for device in &self.devices {
            let (Target::Pool(other), State::Active(_)) = (&device.table.target, &device.state)
            else {
                continue;
            };
            for name in [&other.metadata_dev, &other.data_dev] {
                let used = self.window(name)?;
                for (mine, window) in [(&pool.metadata_dev, &metadata), (&pool.data_dev, &data)] {
                    if overlap(window, &used) {
                        return Err(format!("{mine} is already in use by pool {}", device.name));
                    }
                }
            }
        }
        Ok(())
    }

    /// Activates a thin device of a running pool, over its external origin if any.
    fn thin_volume(&self, thin: &ThinTable, sectors: u64) -> Result<thin_pool::ThinVolume, String> {
        let pool_device = self
            .device(&thin.pool_dev)
            .map_err(|_| format!("no pool called '{}' (see ls)", thin.pool_dev))?;
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
                let window = self.window(name)?;
                let region = self.disks[window.disk].region(window.offset, window.sectors, true);
                Some(alloc::boxed::Box::new(region) as alloc::boxed::Box<dyn BlockDevice>)
            }
            None => None,
        };
        pool.activate(thin.dev_id, sectors, origin)
            .map_err(|error| error.0)
    }

    /// Checks that `name` can be given to a new device.
    pub(crate) fn check_new_name(&self, name: &str) -> Result<(), CommandError> {
        check_name(name)?;
        if self.device_index(name).is_some() {
            return Err(format!("device {name} already exists (see ls)").into());
        }
        if self.disk_index(name).is_some() {
            return Err(format!("{name} is a disk's name; choose another device name").into());
        }
        Ok(())
    }

    /// Sectors of a disk or linear device (what a table may use of it).
    pub(crate) fn size_of(&self, name: &str) -> Result<u64, CommandError> {
        self.window(name)
            .map(|window| window.sectors)
            .map_err(CommandError)
    }

    /// `create NAME [--readonly] --table LINE`.
    pub(crate) fn create(
        &mut self,
        name: &str,
        read_only: bool,
        line: &str,
        format: Format,
    ) -> Result<Vec<String>, CommandError> {
        self.check_new_name(name)?;
        let table = Table::parse(line).map_err(|why| format!("create {name}: {why}"))?;
        let (active, notes) = self
            .activate(&table, read_only, format)
            .map_err(|why| format!("create {name}: {why}"))?;
        self.devices.push(Device {
            name: name.to_string(),
            read_only,
            table,
            state: State::Active(Box::new(active)),
        });
        if let Err(error) = self.save() {
            self.devices.pop();
            return Err(error);
        }
        Ok(notes)
    }

    /// `remove NAME [--force]`.
    pub(crate) fn remove(&mut self, name: &str, force: bool) -> Result<(), CommandError> {
        let index = self
            .device_index(name)
            .ok_or_else(|| unknown_device(name))?;
        let name = self.devices[index].name.clone();
        let users = self.users_of(&name);
        if !users.is_empty() {
            return Err(format!(
                "{name} is in use by {} (remove {} first)",
                users.join(", "),
                if users.len() == 1 { "it" } else { "them" }
            )
            .into());
        }
        if let State::Active(active) = &self.devices[index].state
            && active.clients > 0
            && !force
        {
            return Err(format!(
                "{name} has {} NBD client{} connected (disconnect {} or use remove --force)",
                active.clients,
                if active.clients == 1 { "" } else { "s" },
                if active.clients == 1 { "it" } else { "them" }
            )
            .into());
        }
        let device = self.devices.remove(index);
        if let Err(error) = self.save() {
            self.devices.insert(index, device);
            return Err(error);
        }
        if let State::Active(mut active) = device.state {
            active.io.drain();
            while let Some(done) = active.io.poll() {
                self.ready.push_back(done);
            }
            if let DeviceIo::Pool(pool) = active.io {
                pool.close().map_err(|(_, error)| {
                    format!("{name} was removed, but closing its pool failed: {error}")
                })?;
                return Ok(());
            }
            for request in active.held {
                self.ready.push_back(nbd::IoCompletion {
                    tag: request.tag,
                    result: Err(nbd::BackendError::Gone),
                });
            }
        }
        Ok(())
    }

    /// `thin delete NAME`: removes the thin device and deletes it from its pool. If the
    /// pool refuses the delete, the device is activated again as it was.
    pub(crate) fn thin_delete(&mut self, name: &str) -> Result<(), CommandError> {
        let device = self.device(name)?;
        let Target::Thin(thin) = &device.table.target else {
            return Err(format!(
                "{} is a {} device; thin delete removes thin devices (use remove)",
                device.name,
                device.table.kind()
            )
            .into());
        };
        let (name, pool, dev) = (device.name.clone(), thin.pool_dev.clone(), thin.dev_id);
        let (table, read_only) = (device.table.to_string(), device.read_only);
        self.pool(&pool)?;
        self.remove(&name, false)?;
        if let Err(error) = self.message(&pool, &format!("delete {dev}")) {
            self.create(&name, read_only, &table, Format::Never)
                .map_err(|again| {
                    format!("{}; reactivating {name} failed too: {}", error.0, again.0)
                })?;
            return Err(error);
        }
        Ok(())
    }

    /// `suspend NAME`: finishes the device's I/O in flight, flushes, and holds new
    /// I/O until `resume`.
    pub(crate) fn suspend(&mut self, name: &str) -> Result<(), CommandError> {
        let index = self
            .device_index(name)
            .ok_or_else(|| unknown_device(name))?;
        let active = active_mut(&mut self.devices[index])?;
        if active.suspended {
            return Ok(());
        }
        active.io.drain();
        active.suspended = true;
        active
            .io
            .flush()
            .map_err(|error| format!("{name} is suspended, but flushing it failed: {error}"))?;
        Ok(())
    }

    /// `resume NAME`: releases the I/O held while suspended.
    pub(crate) fn resume(&mut self, name: &str) -> Result<(), CommandError> {
        let index = self
            .device_index(name)
            .ok_or_else(|| unknown_device(name))?;
        let active = active_mut(&mut self.devices[index])?;
        active.suspended = false;
        let ready = &mut self.ready;
        while let Some(request) = active.held.pop_front() {
            active
                .io
                .submit(request.tag, request.op, &mut |done| ready.push_back(done));
        }
        Ok(())
    }

    /// Timer work of every pool at the time `clock` gives; returns the events to
    /// print.
    pub(crate) fn tick(&mut self, clock: &dyn Fn() -> u64) -> Vec<String> {
        let mut events = Vec::new();
        for device in &self.devices {
            if let State::Active(active) = &device.state
                && let Some(pool) = active.io.pool()
            {
                pool.service(clock);
                while let Some(event) = pool.next_event() {
                    events.push(format!("{}: {event}", device.name));
                }
            }
        }
        events
    }

    /// The running pool called `name`.
    pub(crate) fn pool(&self, name: &str) -> Result<&thin_pool::Pool, CommandError> {
        let device = self.device(name)?;
        match &device.state {
            State::Active(active) => active.io.pool().ok_or_else(|| {
                format!(
                    "{} is a {} device, not a thin-pool",
                    device.name,
                    device.table.kind()
                )
                .into()
            }),
            State::Inactive(why) => Err(format!("{} is inactive ({why})", device.name).into()),
        }
    }

    /// `message NAME 0 TEXT`.
    pub(crate) fn message(&mut self, name: &str, text: &str) -> Result<(), CommandError> {
        let device = self.device(name)?;
        if !matches!(device.table.target, Target::Pool(_)) {
            return Err(format!(
                "{} is a {} device, which takes no messages (messages go to thin-pool devices)",
                device.name,
                device.table.kind()
            )
            .into());
        }
        let pool = self.pool(name)?;
        pool.message(text).map_err(|error| {
            format!(
                "{}: message '{text}' failed: {} ({})",
                device.name,
                error.text,
                error.errno.name()
            )
            .into()
        })
    }

    /// The status fields after `0 LENGTH TARGET` (dm's format).
    pub(crate) fn status_fields(&self, device: &Device) -> Result<String, String> {
        match &device.table.target {
            Target::Linear { .. } => Ok(String::new()),
            Target::Pool(_) => {
                let pool = self.pool(&device.name).map_err(|error| error.0)?;
                Ok(format!(" {}", pool.status()))
            }
            Target::Thin(thin) => {
                let pool = self.pool(&thin.pool_dev).map_err(|error| error.0)?;
                match pool.thin_status(thin.dev_id) {
                    Ok(status) => Ok(format!(" {status}")),
                    Err(error) => Err(error.text),
                }
            }
        }
    }

    /// Flushes every disk; the first failure is returned with the disk's name.
    pub(crate) fn flush_disks(&mut self) -> Result<(), (String, String)> {
        let mut first_failure = Ok(());
        for device in &mut self.devices {
            if let State::Active(active) = &mut device.state
                && let DeviceIo::Pool(pool) = &active.io
                && let Err(error) = pool.commit()
            {
                first_failure = first_failure.and(Err((device.name.clone(), error.text)));
            }
        }
        for entry in &self.disks {
            let mut region = entry.disk.region(0, entry.disk.info().sectors, false);
            if let Err(error) = blockdev::run_sync(&mut region, Command::Flush) {
                first_failure = first_failure.and(Err((entry.name.clone(), format!("{error}"))));
            }
        }
        first_failure
    }

    /// A block device for `disk-test`: a disk no device uses, or an active device.
    pub(crate) fn test_target(&self, name: &str) -> Result<(String, Box<dyn BlockDevice>), String> {
        if let Some(index) = self.disk_index(name) {
            let entry = &self.disks[index];
            let users = self.users_of(&entry.name);
            if !users.is_empty() {
                return Err(format!(
                    "{} is in use by {}; testing it would destroy their data",
                    entry.name,
                    users.join(", ")
                ));
            }
            let region = entry.region(0, entry.sectors(), false);
            return Ok((entry.name.clone(), Box::new(region)));
        }
        let Some(index) = self.device_index(name) else {
            return Err(format!(
                "unknown disk or device '{name}' (see disks and ls)"
            ));
        };
        let device = &self.devices[index];
        let users = self.users_of(&device.name);
        if !users.is_empty() {
            return Err(format!(
                "{} is in use by {}; testing it would destroy their data",
                device.name,
                users.join(", ")
            ));
        }
        match &device.state {
            State::Inactive(why) => Err(format!("{} is inactive ({why})", device.name)),
            State::Active(active) if active.suspended => {
                Err(format!("{} is suspended (resume it first)", device.name))
            }
            State::Active(active) if active.clients > 0 => Err(format!(
                "{} has NBD clients connected; testing it would destroy their data",
                device.name
            )),
            State::Active(_) => match &device.table.target {
                Target::Thin(thin) => {
                    let volume = self.thin_volume(thin, device.table.length)?;
                    Ok((device.name.clone(), Box::new(volume)))
                }
                Target::Pool(_) => Err(format!(
                    "{} is a thin-pool; test its disks before creating it, or a thin device of it",
                    device.name
                )),
                Target::Linear { .. } => {
                    let window = self.window(&device.name)?;
                    let region = self.disks[window.disk].region(
                        window.offset,
                        window.sectors,
                        window.read_only,
                    );
                    Ok((device.name.clone(), Box::new(region)))
                }
            },
        }
    }

    /// The disks the devices are built on, as the configuration records them.
    pub(crate) fn saved_disks(&self) -> Vec<DiskRecord> {
        self.snapshot().disks
    }

    /// The configuration as it stands in memory.
    fn snapshot(&self) -> Snapshot {
        let mut used: Vec<&str> = Vec::new();
        for device in &self.devices {
            for name in device.table.dependencies() {
                let known = self.disk_index(name).is_some()
                    || self.missing_disks.iter().any(|disk| disk.name == name);
                if known && !used.contains(&name) {
                    used.push(name);
                }
            }
        }
        let disks = used
            .iter()
            .filter_map(|name| {
                let missing = self.missing_disks.iter().find(|disk| disk.name == *name);
                match (missing, self.disk_index(name)) {
                    (Some(record), _) => Some(record.clone()),
                    (None, Some(index)) => Some(self.disks[index].record()),
                    (None, None) => None,
                }
            })
            .collect();
        let devices = self
            .devices
            .iter()
            .map(|device| DeviceRecord {
                name: device.name.clone(),
                read_only: device.read_only,
                table: device.table.to_string(),
            })
            .collect();
        Snapshot { disks, devices }
    }

    /// Writes the configuration as it stands in memory, if there is a configuration
    /// disk.
    fn save(&mut self) -> Result<(), CommandError> {
        let payload = self.snapshot().encode();
        let Some(config) = &mut self.config else {
            return Ok(());
        };
        let entry = &self.disks[config.disk];
        let mut region = entry.disk.region(0, AREA_SECTORS, false);
        config
            .area
            .save(&mut region, &payload)
            .map(drop)
            .map_err(|why| {
                format!(
                    "saving the configuration on {} failed, nothing was changed: {why}",
                    entry.name
                )
                .into()
            })
    }

    /// `config init DISK [--force]`.
    pub(crate) fn config_init(
        &mut self,
        name: &str,
        id: [u8; 16],
        force: bool,
    ) -> Result<(), CommandError> {
        let index = self
            .disk_index(name)
            .ok_or_else(|| format!("unknown disk '{name}' (see disks)"))?;
        let disk_name = self.disks[index].name.clone();
        if let Some(config) = &self.config {
            return Err(format!(
                "the configuration already lives on {}",
                self.disks[config.disk].name
            )
            .into());
        }
        let users = self.users_of(&disk_name);
        if !users.is_empty() {
            return Err(format!(
                "{disk_name} is in use by {}; the configuration area would shift its contents \
                 (choose a disk no device uses)",
                users.join(", ")
            )
            .into());
        }
        let entry = &self.disks[index];
        let info = entry.disk.info();
        if info.read_only {
            return Err(format!("{disk_name} is read-only").into());
        }
        if info.sectors < AREA_SECTORS * 2 {
            return Err(format!(
                "{disk_name} holds {}; the configuration needs a disk of at least 2 MiB",
                human_bytes(info.bytes())
            )
            .into());
        }
        let mut region = entry.disk.region(0, AREA_SECTORS, false);
        if !force {
            let start = crate::shared::read_sectors(&mut region, 0, AREA_SECTORS as usize)
                .map_err(|error| format!("reading {disk_name} failed: {error}"))?;
            if let Some(at) = start.iter().position(|&b| b != 0) {
                return Err(format!(
                    "{disk_name} holds data in its first MiB (sector {}), which the \
                     configuration area would overwrite; add --force to use it anyway",
                    at / SECTOR_SIZE
                )
                .into());
            }
        }
        let area = Area::format(&mut region, id).map_err(|why| format!("{disk_name}: {why}"))?;
        self.disks[index].reserved = AREA_SECTORS;
        self.config = Some(ConfigDisk { disk: index, area });
        if let Err(error) = self.save() {
            // Take the label back (best effort) so the disk is not found at boot.
            self.config = None;
            self.disks[index].reserved = 0;
            let _ = blockdev::run_sync(
                &mut region,
                Command::Write {
                    sector: 0,
                    buf: blockdev::IoBuf::with_sectors(8),
                    fua: true,
                },
            );
            return Err(error);
        }
        Ok(())
    }

    /// Finds the configuration on the disks and brings its devices up. Returns the
    /// lines to show the operator (what was found, what could not be started).
    pub(crate) fn restore(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        let mut found: Vec<(usize, Area)> = Vec::new();
        for (index, entry) in self.disks.iter().enumerate() {
            let mut region = entry.disk.region(0, entry.disk.info().sectors, true);
            match Area::probe(&mut region) {
                Ok(Some(area)) => found.push((index, area)),
                Ok(None) => {}
                Err(why) => notes.push(format!("config: ignoring {}: {why}", entry.name)),
            }
        }
        let newest = |area: &Area| area.current().map_or(0, |(_, generation, _)| generation);
        found.sort_by_key(|(_, area)| core::cmp::Reverse(newest(area)));
        let mut found = found.into_iter();
        let Some((disk, area)) = found.next() else {
            notes.push(
                "config: no configuration disk found; changes are not saved (see config init)"
                    .to_string(),
            );
            return notes;
        };
        for (other, _) in found {
            notes.push(format!(
                "config: {} also carries a configuration label; using the newer one on {}",
                self.disks[other].name, self.disks[disk].name
            ));
        }
        self.disks[disk].reserved = AREA_SECTORS;
        let text = match area.current() {
            Some((slot, generation, text)) => {
                let fallback = match &area.slots()[1 - slot] {
                    crate::config::SlotState::Damaged(why) => {
                        format!(" (the other copy is damaged: {why})")
                    }
                    _ => String::new(),
                };
                notes.push(format!(
                    "config: {} generation {generation}{fallback}",
                    self.disks[disk].name
                ));
                text.to_string()
            }
            None => {
                notes.push(format!(
                    "config: {} holds no saved configuration yet",
                    self.disks[disk].name
                ));
                String::new()
            }
        };
        self.config = Some(ConfigDisk { disk, area });
        match Snapshot::decode(&text) {
            Ok(snapshot) => self.bring_up(&snapshot, &mut notes),
            Err(why) => notes.push(format!("config: cannot read the configuration: {why}")),
        }
        notes
    }

    /// Activates the saved devices in order; a device whose disks or devices are
    /// missing stays inactive, and so does everything built on it.
    fn bring_up(&mut self, snapshot: &Snapshot, notes: &mut Vec<String>) {
        let (renames, missing) = self.match_disks(&snapshot.disks, notes);
        self.missing_disks = missing.clone();
        for record in &snapshot.devices {
            let mut table = match Table::parse(&record.table) {
                Ok(table) => table,
                Err(why) => {
                    notes.push(format!(
                        "config: device {} has an unreadable table ({why}); it was dropped",
                        record.name
                    ));
                    continue;
                }
            };
            for (from, to) in &renames {
                table.rename(from, to);
            }
            let blocked = table.dependencies().into_iter().find_map(|name| {
                if missing.iter().any(|disk| disk.name == name) {
                    return Some(format!("disk {name} is missing"));
                }
                match self.device(name).map(|device| &device.state) {
                    Ok(State::Inactive(_)) => Some(format!("{name} is inactive")),
                    _ => None,
                }
            });
            let state = match blocked {
                Some(why) => State::Inactive(why),
                None => match self.activate(&table, record.read_only, Format::Never) {
                    Ok((active, more)) => {
                        notes.extend(
                            more.into_iter()
                                .map(|note| format!("config: {}: {note}", record.name)),
                        );
                        State::Active(Box::new(active))
                    }
                    Err(why) => State::Inactive(why),
                },
            };
            if let State::Inactive(why) = &state {
                notes.push(format!("config: {} stays inactive: {why}", record.name));
            }
            self.devices.push(Device {
                name: record.name.clone(),
                read_only: record.read_only,
                table,
                state,
            });
        }
        let active = self
            .devices
            .iter()
            .filter(|device| matches!(device.state, State::Active(_)))
            .count();
        notes.push(format!(
            "config: {active} of {} device{} active",
            self.devices.len(),
            if self.devices.len() == 1 { "" } else { "s" }
        ));
    }

    /// Finds the saved disks among the present ones: by serial number when the disk
    /// has one, else by name (a disk with a different serial is another disk). A disk
    /// smaller than saved counts as missing. Returns the renames to apply to tables
    /// (saved name → present name, staged so swapped names do not collide) and the
    /// saved disks not found.
    fn match_disks(
        &self,
        saved: &[DiskRecord],
        notes: &mut Vec<String>,
    ) -> (Vec<(String, String)>, Vec<DiskRecord>) {
        let mut renames = Vec::new();
        let mut missing = Vec::new();
        let mut taken: Vec<usize> = Vec::new();
        for record in saved {
            let serial_of = |index: usize| &self.disks[index].disk.info().serial;
            let by_serial: Vec<usize> = (0..self.disks.len())
                .filter(|&index| !record.serial.is_empty() && *serial_of(index) == record.serial)
                .collect();
            let candidate = match by_serial.as_slice() {
                [one] => Some(*one),
                _ => self.disk_index(&record.name).filter(|&index| {
                    record.serial.is_empty()
                        || serial_of(index).is_empty()
                        || *serial_of(index) == record.serial
                }),
            };
            let Some(index) = candidate.filter(|index| !taken.contains(index)) else {
                notes.push(format!("config: disk {} is missing", describe(record)));
                missing.push(record.clone());
                continue;
            };
            let entry = &self.disks[index];
            if entry.sectors() < record.sectors {
                notes.push(format!(
                    "config: disk {} is missing (the disk now called {} holds {} sectors, {} \
                     were saved)",
                    describe(record),
                    entry.name,
                    entry.sectors(),
                    record.sectors
                ));
                missing.push(record.clone());
                continue;
            }
            taken.push(index);
            if entry.name != record.name {
                notes.push(format!(
                    "config: disk {} is now {}",
                    describe(record),
                    entry.name
                ));
                renames.push((record.name.clone(), entry.name.clone()));
            }
        }
        let staged = renames
            .iter()
            .map(|(from, _)| (from.clone(), format!("\u{0}{from}")))
            .chain(
                renames
                    .iter()
                    .map(|(from, to)| (format!("\u{0}{from}"), to.clone())),
            )
            .collect();
        (staged, missing)
    }

    /// Data-carrying active devices: what NBD exports.
    fn export_info(&self, device: &Device) -> Option<nbd::ExportInfo> {
        let State::Active(active) = &device.state else {
            return None;
        };
        let preferred_block_size = match &device.table.target {
            Target::Thin(thin) => self
                .device(&thin.pool_dev)
                .ok()
                .and_then(|pool| match &pool.table.target {
                    Target::Pool(table) => Some(table.config.data_block_size * SECTOR_SIZE as u32),
                    _ => None,
                })
                .unwrap_or(4096),
            _ => 4096,
        };
        Some(nbd::ExportInfo {
            name: device.name.clone(),
            description: format!("{} {}", device.table.kind(), device.table),
            sectors: active.io.data_sectors()?,
            read_only: active.io.read_only(),
            preferred_block_size,
            trim: active.io.discard() && !active.io.read_only(),
            write_zeroes: !active.io.read_only(),
            // A thin volume zeroes fast by unmapping; a linear device only by writing.
            fast_zero: matches!(device.table.target, Target::Thin(_)) && !active.io.read_only(),
            multi_conn: true,
        })
    }

    fn active_by_instance(&mut self, name: &str, instance: u64) -> Option<&mut Active> {
        self.devices
            .iter_mut()
            .find(|device| device.name == name)
            .and_then(|device| match &mut device.state {
                State::Active(active) if active.instance == instance => Some(&mut **active),
                _ => None,
            })
    }
}

impl nbd::Backend for Registry {
    fn exports(&self) -> Vec<nbd::ExportInfo> {
        self.devices
            .iter()
            .filter_map(|device| self.export_info(device))
            .collect()
    }

    fn open(&mut self, name: &str) -> Result<(nbd::ExportHandle, nbd::ExportInfo), nbd::OpenError> {
        let index = self
            .devices
            .iter()
            .position(|device| device.name == name)
            .ok_or(nbd::OpenError::NotFound)?;
        let info = self
            .export_info(&self.devices[index])
            .ok_or(nbd::OpenError::NotFound)?;
        let State::Active(active) = &mut self.devices[index].state else {
            return Err(nbd::OpenError::NotFound);
        };
        active.clients += 1;
        let handle = self.next_export;
        self.next_export += 1;
        self.exports.insert(
            handle,
            OpenExport {
                device: name.to_string(),
                instance: active.instance,
            },
        );
        Ok((nbd::ExportHandle(handle), info))
    }

    fn close(&mut self, export: nbd::ExportHandle) {
        if let Some(open) = self.exports.remove(&export.0)
            && let Some(active) = self.active_by_instance(&open.device, open.instance)
        {
            active.clients -= 1;
        }
    }

    fn submit(&mut self, request: nbd::IoRequest) -> Result<(), nbd::QueueFull> {
        let target = self
            .exports
            .get(&request.export.0)
            .map(|open| (open.device.clone(), open.instance));
        let Registry { devices, ready, .. } = self;
        let active = target.and_then(|(name, instance)| {
            devices
                .iter_mut()
                .find(|device| device.name == name)
                .and_then(|device| match &mut device.state {
                    State::Active(active) if active.instance == instance => Some(active),
                    _ => None,
                })
        });
        let Some(active) = active else {
            ready.push_back(nbd::IoCompletion {
                tag: request.tag,
                result: Err(nbd::BackendError::Gone),
            });
            return Ok(());
        };
        if active.suspended {
            active.held.push_back(request);
        } else if active.io.congested() {
            return Err(nbd::QueueFull(request));
        } else {
            active
                .io
                .submit(request.tag, request.op, &mut |done| ready.push_back(done));
        }
        Ok(())
    }

    fn poll(&mut self) -> Option<nbd::IoCompletion> {
        if let Some(done) = self.ready.pop_front() {
            return Some(done);
        }
        self.devices
            .iter_mut()
            .find_map(|device| match &mut device.state {
                State::Active(active) => active.io.poll(),
                State::Inactive(_) => None,
            })
    }
}

/// Whether two windows share sectors of one disk.
fn overlap(a: &Window, b: &Window) -> bool {
    a.disk == b.disk && a.offset < b.offset + b.sectors && b.offset < a.offset + a.sectors
}

/// Applies the format policy to a metadata device before the pool opens it: with
/// `Never`, a blank device is refused; with `Force`, its first block is zeroed so the
/// engine formats it.
fn prepare_metadata(metadata: &mut Region, name: &str, format: Format) -> Result<(), String> {
    const BLOCK_SECTORS: usize = 8;
    match format {
        Format::IfBlank => Ok(()),
        Format::Never => {
            let block = crate::shared::read_sectors(metadata, 0, BLOCK_SECTORS)
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

/// A saved disk for messages: its name and, when it has one, its serial.
fn describe(record: &DiskRecord) -> String {
    if record.serial.is_empty() {
        record.name.clone()
    } else {
        format!("{} (serial {})", record.name, record.serial)
    }
}

fn unknown_device(name: &str) -> CommandError {
    format!("no device called '{name}' (see ls)").into()
}

fn active_mut(device: &mut Device) -> Result<&mut Active, CommandError> {
    match &mut device.state {
        State::Active(active) => Ok(active),
        State::Inactive(why) => Err(format!("{} is inactive ({why})", device.name).into()),
    }
}

/// The registry as an NBD backend, shared with the console that manages it (the
/// appliance is single-threaded: the console and the NBD server take turns).
#[derive(Clone)]
pub struct RegistryBackend(pub(crate) alloc::rc::Rc<core::cell::RefCell<Registry>>);

impl nbd::Backend for RegistryBackend {
    fn exports(&self) -> Vec<nbd::ExportInfo> {
        self.0.borrow().exports()
    }

    fn open(&mut self, name: &str) -> Result<(nbd::ExportHandle, nbd::ExportInfo), nbd::OpenError> {
        self.0.borrow_mut().open(name)
    }

    fn close(&mut self, export: nbd::ExportHandle) {
        self.0.borrow_mut().close(export)
    }

    fn submit(&mut self, request: nbd::IoRequest) -> Result<(), nbd::QueueFull> {
        self.0.borrow_mut().submit(request)
    }

    fn poll(&mut self) -> Option<nbd::IoCompletion> {
        self.0.borrow_mut().poll()
    }
}
