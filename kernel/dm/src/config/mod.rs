//! The persistent configuration: which devices exist (their table lines) and which
//! disks they were built on, saved in the configuration area of one disk after every
//! change, so the appliance comes back after a reboot with the same devices.

mod acl;
mod area;
mod clientcert;
mod origins;
mod snapshot;
mod thin_links;
mod tls;

pub use area::{AREA_SECTORS, Area, MAX_PAYLOAD, SlotState};
pub use origins::OriginRecord;
pub use snapshot::{DeviceRecord, DiskRecord, Snapshot};
pub use thin_links::{LinkKind, ThinLink};

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use blockdev::{Command, SECTOR_SIZE};

use crate::Error;
use crate::activate::Format;
use crate::device::{Device, State};
use crate::disk::DiskEntry;
use crate::mapper::DeviceMapper;
use crate::region::read_sectors;
use crate::table::Table;
use crate::units::human_bytes;

/// The configuration disk and the state of its area.
pub(crate) struct ConfigDisk {
    pub disk: usize,
    pub area: Area,
}

impl DeviceMapper {
    /// The configuration disk and its area, once one is designated or found.
    pub fn config(&self) -> Option<(&DiskEntry, &Area)> {
        self.config
            .as_ref()
            .map(|config| (&self.disks[config.disk], &config.area))
    }

    /// The disks the devices are built on, as the configuration records them.
    pub fn saved_disks(&self) -> Vec<DiskRecord> {
        self.snapshot().disks
    }

    /// The configuration as it stands in memory.
    fn snapshot(&self) -> Snapshot {
        let mut used: Vec<&str> = Vec::new();
        for device in self.devices() {
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
            .devices_in_dependency_order()
            .into_iter()
            .map(|device| DeviceRecord {
                name: device.name.clone(),
                read_only: device.read_only,
                table: device.table.to_string(),
            })
            .collect();
        Snapshot {
            disks,
            devices,
            imports: self.imports.records.clone(),
            origins: self.origins.clone(),
            thin_links: self.thin_links.clone(),
            access: self.access.clone(),
            tls: self.tls.clone(),
        }
    }

    /// Writes the configuration as it stands in memory, if there is a configuration
    /// disk.
    pub(crate) fn save(&mut self) -> Result<(), Error> {
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

    /// `config init DISK [--force]`: formats the configuration area in the first MiB of
    /// `name` with area id `id` and saves the devices there from now on.
    pub fn config_init(&mut self, name: &str, id: [u8; 16], force: bool) -> Result<(), Error> {
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
        let info = entry.info();
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
            let start = read_sectors(&mut region, 0, AREA_SECTORS as usize)
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
    pub fn restore(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        let mut found: Vec<(usize, Area)> = Vec::new();
        for (index, entry) in self.disks.iter().enumerate() {
            let mut region = entry.disk.region(0, entry.info().sectors, true);
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
                    SlotState::Damaged(why) => {
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
            Ok(snapshot) => {
                self.access = snapshot.access.clone();
                self.restore_tls(snapshot.tls.clone(), &mut notes);
                self.bring_up(&snapshot, &mut notes);
                self.thin_links = snapshot.thin_links;
                self.finish_thin_merges(&mut notes);
                self.resume_origin_merges(&mut notes);
                self.imports.records = snapshot.imports;
                notes.extend(self.unfinished_imports());
            }
            Err(why) => notes.push(format!("config: cannot read the configuration: {why}")),
        }
        notes
    }

    /// Activates the saved devices in order; a device whose disks or devices are
    /// missing stays inactive, and so does everything built on it.
    fn bring_up(&mut self, snapshot: &Snapshot, notes: &mut Vec<String>) {
        let (renames, missing) = self.match_disks(&snapshot.disks, notes);
        self.missing_disks = missing.clone();
        self.origins = snapshot.origins.clone();
        for (from, to) in &renames {
            self.rename_in_origins(from, to);
        }
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
                match self.find(name).map(|device| &device.state) {
                    Some(State::Inactive(_)) => Some(format!("{name} is inactive")),
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
            let active = matches!(state, State::Active(_));
            self.register(Device {
                name: record.name.clone(),
                read_only: record.read_only,
                table: table.clone(),
                inactive: None,
                state,
            });
            if active {
                // Records what a configuration saved before origins were recorded
                // lacks.
                self.record_origin(&record.name, &table);
            }
        }
        let active = self
            .devices()
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
            let serial_of = |index: usize| &self.disks[index].info().serial;
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
}

/// A saved disk for messages: its name and, when it has one, its serial.
fn describe(record: &DiskRecord) -> String {
    if record.serial.is_empty() {
        record.name.clone()
    } else {
        format!("{} (serial {})", record.name, record.serial)
    }
}
