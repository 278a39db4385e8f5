//! The device table: the disks, the devices built on them and the changes dmsetup
//! makes (`create`, `remove`, `suspend`, `message`; `reload`, `resume` and `rename`
//! are in the reload module), with `status` lines.
//!
//! Every change is checked completely before anything happens, then saved to the
//! configuration area (when there is one) before it takes effect in memory, so a
//! failed change — a bad table, a missing disk, a full or failing configuration disk
//! — leaves devices, exports and configuration exactly as they were.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use blockdev::{BlockDevice, Command};

use crate::Error;
use crate::access::AccessList;
use crate::activate::Format;
use crate::config::{ConfigDisk, DiskRecord, OriginRecord, ThinLink};
use crate::device::{Device, DeviceId, State};
use crate::disk::{Disk, DiskEntry};
use crate::jobs::{Job, Pacing};
use crate::table::{Table, Target, bare_name, check_name};
use crate::targets::{SnapshotList, TargetIo};
use core::cell::RefCell;

/// Disks, devices and their configuration.
pub struct DeviceMapper {
    pub(crate) disks: Vec<DiskEntry>,
    /// By id, which is creation order.
    pub(crate) devices: BTreeMap<DeviceId, Device>,
    next_id: u64,
    pub(crate) config: Option<ConfigDisk>,
    /// NBD completions decided without a device (removed exports).
    pub(crate) ready: VecDeque<nbd::IoCompletion>,
    /// Saved disks that were not found at boot, kept so saving the configuration again
    /// does not forget how to recognise them.
    pub(crate) missing_disks: Vec<DiskRecord>,
    pub(crate) imports: crate::import::Imports,
    /// Long work the device mapper drives itself (see [`DeviceMapper::start_job`]).
    pub(crate) jobs: Vec<Box<dyn Job>>,
    /// The snapshots of each origin, by the origin's name.
    pub(crate) snapshot_origins: RefCell<BTreeMap<String, SnapshotList>>,
    /// The external origin each thin device was created over (see the origins
    /// module).
    pub(crate) origins: Vec<OriginRecord>,
    /// NBD requests submitted so far: background steps give way while they come.
    pub(crate) requests_submitted: u64,
    pub(crate) pacing: Pacing,
    /// Snapshot origins and merges under way, by pool and thin id.
    pub(crate) thin_links: Vec<ThinLink>,
    /// Changed-block views NBD connections hold, by context handle.
    pub(crate) views: BTreeMap<u64, thin_pool::ChangedView>,
    pub(crate) next_view: u64,
    /// Which NBD clients may use which exports.
    pub(crate) access: AccessList,
    /// Counts changes of `access`, so the NBD server checks its open connections again.
    pub(crate) access_generation: u64,
    /// NBD over TLS: the saved policy and identity, and what the server offers.
    pub(crate) tls: crate::tls::TlsSettings,
    pub(crate) tls_offer: nbd::Tls,
    /// What client certificates' validity is checked against (see `set_wall_clock`).
    pub(crate) wall_clock: crate::tls::clock::WallClock,
    /// The record ciphers TLS offers (see `set_record_ciphers`).
    pub(crate) record_ciphers: Vec<nbd::rustls::SupportedCipherSuite>,
    /// Failed TLS sessions, reported to the operator.
    pub(crate) tls_failures: crate::tls::failures::TlsFailures,
}

impl DeviceMapper {
    /// A device mapper over `disks`, with no devices yet; [`DeviceMapper::restore`]
    /// brings up the saved configuration.
    pub fn new(disks: Vec<Disk>) -> Self {
        DeviceMapper {
            disks: disks.into_iter().map(DiskEntry::new).collect(),
            devices: BTreeMap::new(),
            next_id: 0,
            config: None,
            ready: VecDeque::new(),
            missing_disks: Vec::new(),
            imports: Default::default(),
            jobs: Vec::new(),
            snapshot_origins: RefCell::default(),
            origins: Vec::new(),
            requests_submitted: 0,
            pacing: Pacing::default(),
            thin_links: Vec::new(),
            views: BTreeMap::new(),
            next_view: 0,
            access: AccessList::default(),
            access_generation: 0,
            tls: Default::default(),
            tls_offer: nbd::Tls::Off,
            wall_clock: crate::tls::clock::unknown_time,
            record_ciphers: crate::tls::suites::rustcrypto(),
            tls_failures: Default::default(),
        }
    }

    /// Arms every disk with requests in flight to interrupt when one finishes
    /// (see [`blockdev::BlockDevice::arm_wakeup`]); true when the CPU may halt until
    /// an interrupt: no disk has a finished request waiting or a request it cannot
    /// announce.
    pub fn arm_disk_wakeups(&mut self) -> bool {
        self.disks.iter().all(|entry| entry.disk.arm_wakeup())
    }

    /// The disks, in the order they were given.
    pub fn disks(&self) -> &[DiskEntry] {
        &self.disks
    }

    /// The devices, in creation order.
    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.devices.values()
    }

    /// The devices, each after the devices its table refers to and otherwise in
    /// creation order: the order in which `create` brings them up again (a device
    /// may come to depend on a later one through a reload).
    pub fn devices_in_dependency_order(&self) -> Vec<&Device> {
        let mut ordered: Vec<&Device> = Vec::with_capacity(self.devices.len());
        while ordered.len() < self.devices.len() {
            let placed = |name: &str| ordered.iter().any(|device| device.name == name);
            let next = self
                .devices()
                .filter(|device| !placed(&device.name))
                .find(|device| {
                    device
                        .table
                        .dependencies()
                        .into_iter()
                        .all(|name| self.find(name).is_none() || placed(name))
                });
            // Tables never refer around a cycle (reload refuses one); if they did,
            // the rest would follow in creation order.
            let next = next.unwrap_or_else(|| {
                self.devices()
                    .find(|device| !placed(&device.name))
                    .expect("some device is left")
            });
            ordered.push(next);
        }
        ordered
    }

    pub(crate) fn disk_index(&self, name: &str) -> Option<usize> {
        let bare = bare_name(name);
        self.disks.iter().position(|disk| disk.name == bare)
    }

    pub(crate) fn device_id(&self, name: &str) -> Option<DeviceId> {
        let bare = bare_name(name);
        self.devices
            .iter()
            .find(|(_, device)| device.name == bare)
            .map(|(id, _)| *id)
    }

    pub(crate) fn find(&self, name: &str) -> Option<&Device> {
        self.device_id(name).map(|id| &self.devices[&id])
    }

    /// The device called `name`, or an error naming what exists.
    pub fn device(&self, name: &str) -> Result<&Device, Error> {
        self.find(name).ok_or_else(|| unknown_device(name))
    }

    /// Registers a device under a new id.
    pub(crate) fn register(&mut self, device: Device) -> DeviceId {
        let id = DeviceId(self.next_id);
        self.next_id += 1;
        self.devices.insert(id, device);
        id
    }

    /// Names of the devices whose live or inactive tables refer to `name`.
    pub fn users_of(&self, name: &str) -> Vec<&str> {
        self.devices()
            .filter(|device| {
                core::iter::once(&device.table)
                    .chain(&device.inactive)
                    .any(|table| table.dependencies().contains(&name))
            })
            .map(|device| device.name.as_str())
            .collect()
    }

    /// Checks that `name` can be given to a new device.
    pub fn check_new_name(&self, name: &str) -> Result<(), Error> {
        check_name(name)?;
        if self.device_id(name).is_some() {
            return Err(format!("device {name} already exists (see ls)").into());
        }
        if self.disk_index(name).is_some() {
            return Err(format!("{name} is a disk's name; choose another device name").into());
        }
        Ok(())
    }

    /// Sectors of a disk or linear device (what a table may use of it).
    pub fn size_of(&self, name: &str) -> Result<u64, Error> {
        self.windows(name)
            .map(|windows| windows.iter().map(|window| window.sectors).sum())
            .map_err(Error)
    }

    /// `create NAME [--readonly] --table LINE`: loads the table and resumes the device.
    /// Returns what the operator should know (a formatted metadata device, warnings).
    pub fn create(
        &mut self,
        name: &str,
        read_only: bool,
        line: &str,
        format: Format,
    ) -> Result<Vec<String>, Error> {
        self.check_new_name(name)?;
        let table = Table::parse(line).map_err(|why| format!("create {name}: {why}"))?;
        let (active, notes) = self
            .activate(&table, read_only, format)
            .map_err(|why| format!("create {name}: {why}"))?;
        let id = self.register(Device {
            name: name.to_string(),
            read_only,
            table: table.clone(),
            inactive: None,
            state: State::Active(Box::new(active)),
        });
        let recorded = self.record_origin(name, &table);
        if let Err(error) = self.save() {
            self.devices.remove(&id);
            if recorded {
                self.origins.pop();
            }
            return Err(error);
        }
        Ok(notes)
    }

    /// `remove NAME [--force]`.
    pub fn remove(&mut self, name: &str, force: bool) -> Result<(), Error> {
        let id = self.device_id(name).ok_or_else(|| unknown_device(name))?;
        let name = self.devices[&id].name.clone();
        let users = self.users_of(&name);
        if !users.is_empty() {
            return Err(format!(
                "{name} is in use by {} (remove {} first)",
                users.join(", "),
                if users.len() == 1 { "it" } else { "them" }
            )
            .into());
        }
        if let State::Active(active) = &self.devices[&id].state
            && !active.clients.is_empty()
            && !force
        {
            return Err(format!(
                "{name} has {} NBD client{} connected (disconnect {} or use remove --force)",
                active.clients.len(),
                if active.clients.len() == 1 { "" } else { "s" },
                if active.clients.len() == 1 {
                    "it"
                } else {
                    "them"
                }
            )
            .into());
        }
        let device = self.devices.remove(&id).expect("found above");
        if let Err(error) = self.save() {
            self.devices.insert(id, device);
            return Err(error);
        }
        self.shut_down(device)
    }

    /// Stops a device taken out of the table: its I/O in flight finishes, requests
    /// held while it was suspended fail as for a removed export, a pool is closed.
    pub(crate) fn shut_down(&mut self, device: Device) -> Result<(), Error> {
        let name = device.name;
        if let State::Active(mut active) = device.state {
            active.io.drain();
            while let Some(done) = active.io.poll() {
                self.ready.push_back(done);
            }
            if let TargetIo::Pool(pool) = active.io {
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
    /// pool refuses the delete, the device is activated again as it was. Returns the
    /// pool's name and the id, whose blocks the pool may go on releasing in the
    /// background (a job, see [`DeviceMapper::jobs`]).
    pub fn thin_delete(&mut self, name: &str) -> Result<(String, u64), Error> {
        let device = self.device(name)?;
        let Target::Thin(thin) = device.table.target() else {
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
        self.forget_thin_id(&pool, dev);
        Ok((pool, dev))
    }

    /// `suspend NAME`: finishes the device's I/O in flight, flushes, and holds new
    /// I/O until `resume`.
    pub fn suspend(&mut self, name: &str) -> Result<(), Error> {
        let id = self.device_id(name).ok_or_else(|| unknown_device(name))?;
        let device = self.devices.get_mut(&id).expect("found above");
        let active = device.active_mut()?;
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

    /// Releases the I/O held while the device was suspended.
    pub(crate) fn release_held(&mut self, id: DeviceId) -> Result<(), Error> {
        let device = self.devices.get_mut(&id).expect("a registered device");
        let active = device.active_mut()?;
        active.suspended = false;
        let ready = &mut self.ready;
        while let Some(request) = active.held.pop_front() {
            active
                .io
                .submit(request.tag, request.op, &mut |done| ready.push_back(done));
        }
        Ok(())
    }

    /// Timer work of every pool, a bounded step of every snapshot merge, and a step
    /// of each metadata format and background job, at the time `clock` gives; returns
    /// the events to print.
    pub fn tick(&mut self, clock: &dyn Fn() -> u64) -> Vec<String> {
        let mut events = Vec::new();
        let mut merged = Vec::new();
        for device in self.devices() {
            if let State::Active(active) = &device.state
                && let Some(pool) = active.io.pool()
            {
                pool.service(clock);
                while let Some(event) = pool.next_event() {
                    if let thin_pool::PoolEvent::OriginMergeFinished { dev, .. } = event {
                        merged.push((device.name.clone(), dev));
                    }
                    events.push(format!("{}: {event}", device.name));
                }
            }
        }
        for (pool, dev) in merged {
            self.origin_merge_finished(&pool, dev);
        }
        self.step_snapshot_targets(clock, &mut events);
        events.extend(self.background_steps(clock));
        events.extend(self.tls_failures.take_event(clock));
        events
    }

    /// The running pool called `name`.
    pub fn pool(&self, name: &str) -> Result<&thin_pool::Pool, Error> {
        let device = self.device(name)?;
        match &device.state {
            State::Active(active) if matches!(active.io, TargetIo::Formatting(_)) => {
                Err(crate::format::not_formatted_yet(&device.name).into())
            }
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
    pub fn message(&mut self, name: &str, text: &str) -> Result<(), Error> {
        let device = self.device(name)?;
        if !matches!(device.table.target(), Target::Pool(_)) {
            return Err(format!(
                "{} is a {} device, which takes no messages (messages go to thin-pool devices)",
                device.name,
                device.table.kind()
            )
            .into());
        }
        let name = device.name.clone();
        let pool = self.pool(&name)?;
        pool.message(text).map_err(|error| {
            Error(format!(
                "{name}: message '{text}' failed: {} ({})",
                error.text,
                error.errno.name()
            ))
        })?;
        if let Some(dev) = text
            .strip_prefix("delete ")
            .and_then(|id| id.trim().parse().ok())
        {
            let pool = bare_name(&name).to_string();
            self.forget_thin_id(&pool, dev);
        }
        self.origins_after_message(&name, text)
    }

    /// dm's status lines, one per segment: `START LENGTH TARGET` followed by the
    /// target's fields; or why there are none.
    pub fn status_lines(&self, device: &Device) -> Vec<String> {
        if let State::Inactive(why) = &device.state {
            return alloc::vec![format!("inactive ({why})")];
        }
        device
            .table
            .segments()
            .iter()
            .map(|segment| {
                let (start, length, kind) = (segment.start, segment.length, segment.target.kind());
                match self.status_fields(device, &segment.target) {
                    Ok(fields) => format!("{start} {length} {kind}{fields}"),
                    Err(why) => format!("{start} {length} {kind} Error ({why})"),
                }
            })
            .collect()
    }

    /// The status fields of a segment after `START LENGTH TARGET` (dm's format).
    fn status_fields(&self, device: &Device, target: &Target) -> Result<String, String> {
        match target {
            Target::Linear { .. } => Ok(String::new()),
            Target::Pool(_) => {
                let pool = self.pool(&device.name).map_err(String::from)?;
                Ok(format!(" {}", pool.status()))
            }
            Target::Thin(thin) => {
                let pool = self.pool(&thin.pool_dev).map_err(String::from)?;
                match pool.thin_status(thin.dev_id) {
                    Ok(status) => Ok(format!(" {status}")),
                    Err(error) => Err(error.text),
                }
            }
            Target::SnapshotOrigin { .. } | Target::Snapshot(_) | Target::SnapshotMerge(_) => {
                self.snapshot_status(&device.name)
            }
        }
    }

    /// Commits every pool and flushes every disk; the first failure is returned with
    /// the pool's or disk's name.
    pub fn flush_disks(&mut self) -> Result<(), (String, String)> {
        let mut first_failure = Ok(());
        for device in self.devices.values_mut() {
            if let State::Active(active) = &mut device.state
                && let TargetIo::Pool(pool) = &active.io
                && let Err(error) = pool.commit()
            {
                first_failure = first_failure.and(Err((device.name.clone(), error.text)));
            }
        }
        for entry in &self.disks {
            let mut region = entry.disk.region(0, entry.info().sectors, false);
            if let Err(error) = blockdev::run_sync(&mut region, Command::Flush) {
                first_failure = first_failure.and(Err((entry.name.clone(), format!("{error}"))));
            }
        }
        first_failure
    }

    /// A block device to test (`disk-test`): a disk no device uses, or an active device
    /// nothing is built on and no NBD client uses. Returns its name and the device.
    pub fn test_target(&self, name: &str) -> Result<(String, Box<dyn BlockDevice>), String> {
        if let Some(index) = self.disk_index(name) {
            let entry = &self.disks[index];
            self.refuse_users(&entry.name)?;
            let region = entry.region(0, entry.sectors(), false);
            return Ok((entry.name.clone(), Box::new(region)));
        }
        let Some(device) = self.find(name) else {
            return Err(format!(
                "unknown disk or device '{name}' (see disks and ls)"
            ));
        };
        self.refuse_users(&device.name)?;
        match &device.state {
            State::Inactive(why) => Err(format!("{} is inactive ({why})", device.name)),
            State::Active(active) if active.suspended => {
                Err(format!("{} is suspended (resume it first)", device.name))
            }
            State::Active(active) if !active.clients.is_empty() => Err(format!(
                "{} has NBD clients connected; testing it would destroy their data",
                device.name
            )),
            State::Active(_) => match device.table.target() {
                Target::Thin(thin) => {
                    let volume = self.thin_volume(thin, device.table.length())?;
                    Ok((device.name.clone(), Box::new(volume)))
                }
                Target::Pool(_) => Err(format!(
                    "{} is a thin-pool; test its disks before creating it, or a thin device of it",
                    device.name
                )),
                Target::Linear { .. } => {
                    let span = self.span(&self.windows(&device.name)?, false);
                    Ok((device.name.clone(), Box::new(span)))
                }
                kind @ (Target::SnapshotOrigin { .. }
                | Target::Snapshot(_)
                | Target::SnapshotMerge(_)) => Err(format!(
                    "{} is a {} device; test the disks under it before building snapshots",
                    device.name,
                    kind.kind()
                )),
            },
        }
    }
}

impl DeviceMapper {
    /// Refuses to test a disk or device that other devices are built on.
    fn refuse_users(&self, name: &str) -> Result<(), String> {
        let users = self.users_of(name);
        if users.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{name} is in use by {}; testing it would destroy their data",
            users.join(", ")
        ))
    }
}

pub(crate) fn unknown_device(name: &str) -> Error {
    format!("no device called '{name}' (see ls)").into()
}
