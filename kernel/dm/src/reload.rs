//! dm's two tables: `reload` loads an inactive table next to the live one, `resume`
//! swaps it in (suspending first, so I/O in flight finishes and is flushed), `clear`
//! drops it; and `rename`.
//!
//! A swap keeps the device's id, so its NBD clients stay connected and see the new
//! table from their next request. What a swap may change follows from what is
//! running on the device:
//! - a linear device may map anything, but while other devices are built on it the
//!   new table must begin with the sectors it maps now (it may only grow);
//! - a thin device may only change its length (its pool, device id and origin stay):
//!   the running volume takes the new length, which needs no data space, so it works
//!   while the pool is out of space and its writes wait;
//! - a pool may change its devices, length, low water mark and features, never its
//!   block size (nor switch discard support, nor leave read-only while its metadata
//!   needs checking, as dm refuses): the new metadata device must begin with the
//!   blocks the metadata is on and the new data device with the sectors the pool
//!   uses; the running pool is handed the larger devices and grows onto them (never
//!   shrinks, as dm refuses), then takes the new mark and features.
//!
//! Everything is checked before anything changes, so a refused swap leaves the live
//! table serving and the inactive one loaded.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::Error;
use crate::activate::{Window, slice};
use crate::device::{DeviceId, PoolWindows, State};
use crate::mapper::{DeviceMapper, unknown_device};
use crate::span::Span;
use crate::table::{Table, Target};
use crate::targets::{LinearIo, TargetIo};

/// What a checked swap will put in place.
enum Swap {
    Linear(Span),
    /// A thin device's new length: the running volume is resized in place, so the
    /// writes it holds (waiting for pool space too) go on.
    ThinLength(u64),
    /// A pool's devices, and its new low water mark and features.
    Pool(PoolWindows, thin_pool::PoolConfig),
    Snapshot(crate::targets::SnapshotIo),
}

impl DeviceMapper {
    /// `reload NAME --table LINE` (`load`): checks the table as `create` does and keeps
    /// it as the device's inactive table; the live table is untouched.
    pub fn reload(&mut self, name: &str, line: &str) -> Result<(), Error> {
        let id = self.device_id(name).ok_or_else(|| unknown_device(name))?;
        let name = self.devices[&id].name.clone();
        let table = Table::parse(line).map_err(|why| format!("reload {name}: {why}"))?;
        self.check_references(&name, &table)
            .map_err(|why| format!("reload {name}: {why}"))?;
        let device = self.devices.get_mut(&id).expect("found above");
        device.inactive = Some(table);
        Ok(())
    }

    /// `clear NAME`: drops the inactive table, if there is one.
    pub fn clear(&mut self, name: &str) -> Result<(), Error> {
        let id = self.device_id(name).ok_or_else(|| unknown_device(name))?;
        self.devices.get_mut(&id).expect("found above").inactive = None;
        Ok(())
    }

    /// `resume NAME`: swaps in the inactive table if there is one, then releases the
    /// I/O held while suspended — also when the swap was refused, so the live table
    /// goes on serving (the inactive one stays loaded). Returns what the operator
    /// should know (how a pool grew).
    pub fn resume(&mut self, name: &str) -> Result<Vec<String>, Error> {
        let id = self.device_id(name).ok_or_else(|| unknown_device(name))?;
        let swapped = match self.devices[&id].inactive {
            Some(_) => self.swap(id),
            None => Ok(Vec::new()),
        };
        self.release_held(id)?;
        swapped
    }

    /// `rename OLD NEW`: the device and every table that refers to it take the new
    /// name; its id stays, so NBD clients stay connected.
    pub fn rename(&mut self, old: &str, new: &str) -> Result<(), Error> {
        let id = self.device_id(old).ok_or_else(|| unknown_device(old))?;
        self.check_new_name(new)
            .map_err(|Error(why)| format!("rename {old}: {why}"))?;
        let from = self.devices[&id].name.clone();
        self.rename_everywhere(id, &from, new);
        if let Err(error) = self.save() {
            self.rename_everywhere(id, new, &from);
            return Err(error);
        }
        Ok(())
    }

    fn rename_everywhere(&mut self, id: DeviceId, from: &str, to: &str) {
        for device in self.devices.values_mut() {
            device.table.rename(from, to);
            if let Some(inactive) = &mut device.inactive {
                inactive.rename(from, to);
            }
        }
        for link in &mut self.thin_links {
            if link.pool == from {
                link.pool = to.to_string();
            }
        }
        self.access.rename(from, to);
        self.devices.get_mut(&id).expect("renamed device").name = to.to_string();
        self.rename_in_origins(from, to);
    }

    /// What `reload` checks, as dm's table load does: the table's devices exist and
    /// hold its sectors, the target type stays, and no device is built on itself.
    fn check_references(&self, name: &str, table: &Table) -> Result<(), String> {
        let live = &self.devices[&self.device_id(name).expect("checked")];
        if let State::Inactive(why) = &live.state {
            return Err(format!(
                "{name} is inactive ({why}); remove it and create it again"
            ));
        }
        if table.kind() != live.table.kind() && !origin_kinds(table.kind(), live.table.kind()) {
            return Err(format!(
                "the table is {}, the live one {}: a reload keeps the target type (remove \
                 {name} and create it again to change it)",
                table.kind(),
                live.table.kind()
            ));
        }
        if let Some(below) = table
            .dependencies()
            .into_iter()
            .find(|dependency| self.built_on(dependency, name))
        {
            return Err(format!(
                "{name} cannot be built on {below}, which is built on {name}"
            ));
        }
        match table.target() {
            Target::Linear { .. } => self.linear_windows(table, false).map(drop),
            Target::Thin(thin) => match live.table.target() {
                Target::Thin(now)
                    if (&now.pool_dev, now.dev_id, &now.origin_dev)
                        == (&thin.pool_dev, thin.dev_id, &thin.origin_dev) =>
                {
                    Ok(())
                }
                Target::Thin(now) => Err(format!(
                    "a thin device's reload may change only its length (keep pool {}, device \
                     id {}{})",
                    now.pool_dev,
                    now.dev_id,
                    now.origin_dev
                        .as_ref()
                        .map_or(String::new(), |origin| format!(", origin {origin}"))
                )),
                _ => unreachable!("the target type was compared above"),
            },
            Target::Pool(pool) => {
                self.windows(&pool.metadata_dev)?;
                self.fit(&pool.data_dev, 0, table.length()).map(drop)
            }
            Target::SnapshotOrigin { origin } => self.fit(origin, 0, table.length()).map(drop),
            Target::Snapshot(_) => {
                Err("a snapshot device keeps its table (remove it and create it again)".into())
            }
            Target::SnapshotMerge(args) => {
                self.fit(&args.origin, 0, table.length())?;
                self.windows(&args.cow).map(drop)
            }
        }
    }

    /// Whether device `name` is `target` or built on it, through any chain of tables.
    fn built_on(&self, name: &str, target: &str) -> bool {
        name == target
            || self.find(name).is_some_and(|device| {
                device
                    .table
                    .dependencies()
                    .into_iter()
                    .any(|below| self.built_on(below, target))
            })
    }

    /// Checks the inactive table against what runs now, saves the configuration with
    /// it, suspends the device and swaps it in.
    fn swap(&mut self, id: DeviceId) -> Result<Vec<String>, Error> {
        let device = &self.devices[&id];
        let name = device.name.clone();
        let table = device.inactive.clone().expect("checked by resume");
        let fail = |why: String| Error(format!("resume {name}: {why}; the live table stays"));
        self.check_references(&name, &table).map_err(fail)?;
        let swap = self.prepare_swap(id, &table).map_err(fail)?;
        let device = self.devices.get_mut(&id).expect("found above");
        let old = core::mem::replace(&mut device.table, table);
        device.inactive = None;
        if let Err(error) = self.save() {
            let device = self.devices.get_mut(&id).expect("found above");
            device.inactive = Some(core::mem::replace(&mut device.table, old));
            return Err(error);
        }
        let swapped = self
            .suspend(&name)
            .map_err(String::from)
            .and_then(|()| self.put_in_place(id, swap));
        match swapped {
            Ok(notes) => Ok(notes),
            Err(why) => {
                let device = self.devices.get_mut(&id).expect("found above");
                device.inactive = Some(core::mem::replace(&mut device.table, old));
                self.save()?;
                Err(fail(why))
            }
        }
    }

    /// Builds what the new table needs, checking it against the running device.
    fn prepare_swap(&self, id: DeviceId, table: &Table) -> Result<Swap, String> {
        let device = &self.devices[&id];
        let State::Active(active) = &device.state else {
            return Err(format!("{} is inactive", device.name));
        };
        match (table.target(), device.table.target()) {
            (Target::Linear { .. }, _) => {
                let windows = self.linear_windows(table, false)?;
                let users = self.users_of(&device.name);
                if !users.is_empty() {
                    let now = self.linear_windows(&device.table, false)?;
                    if !begins_with(&windows, &now) {
                        return Err(format!(
                            "{} is in use by {}: its new table must begin with the {} sectors \
                             it maps now (it may only grow)",
                            device.name,
                            users.join(", "),
                            device.table.length()
                        ));
                    }
                }
                Ok(Swap::Linear(self.span(&windows, device.read_only)))
            }
            (Target::Thin(thin), _) => {
                // The origin is looked at again, as at every activation.
                let origin_sectors = match &thin.origin_dev {
                    Some(origin) => Some(self.size_of(origin).map_err(String::from)?),
                    None => None,
                };
                self.check_origin(thin, origin_sectors)?;
                Ok(Swap::ThinLength(table.length()))
            }
            (Target::Pool(new), Target::Pool(_)) => {
                let engine = self.pool(&device.name).map_err(String::from)?;
                engine
                    .check_reconfigure(&new.config)
                    .map_err(|error| error.text)?;
                let used = engine.status().data_total;
                let blocks = table.length() / u64::from(new.config.data_block_size);
                if blocks < used {
                    return Err(format!(
                        "pool target ({blocks} blocks) too small: expected {used}"
                    ));
                }
                let current = active
                    .pool_windows
                    .as_ref()
                    .expect("a running pool's windows");
                let windows = self.pool_windows(new, table.length(), Some(&device.name))?;
                let metadata_blocks = engine.status().metadata_total;
                let offered = sectors(&windows.metadata) / 8;
                if offered < metadata_blocks {
                    return Err(format!(
                        "metadata device ({offered} blocks) too small: expected {metadata_blocks}"
                    ));
                }
                if !begins_with(&windows.metadata, &current.metadata) {
                    return Err(format!(
                        "the new metadata device {} must begin with the blocks the metadata is \
                         on now",
                        new.metadata_dev
                    ));
                }
                if !begins_with(&windows.data, &current.data) {
                    return Err(format!(
                        "the new data device {} must begin with the sectors the pool uses now",
                        new.data_dev
                    ));
                }
                Ok(Swap::Pool(windows, new.config.clone()))
            }
            (Target::SnapshotOrigin { .. } | Target::Snapshot(_) | Target::SnapshotMerge(_), _) => {
                let (io, _) = self.snapshot_target(Some(&device.name), table, device.read_only)?;
                Ok(Swap::Snapshot(io))
            }
            (_, kind) => Err(format!("{} is not a thin-pool", kind.kind())),
        }
    }

    /// Puts the prepared target in place on the suspended device.
    fn put_in_place(&mut self, id: DeviceId, swap: Swap) -> Result<Vec<String>, String> {
        let spans = match &swap {
            Swap::Pool(windows, _) => Some((
                self.span(&windows.metadata, false),
                self.span(&windows.data, false),
            )),
            _ => None,
        };
        let length = self.devices[&id].table.length();
        let DeviceMapper { devices, ready, .. } = self;
        let device = devices.get_mut(&id).expect("found above");
        let active = device.active_mut()?;
        let io = match swap {
            Swap::Linear(span) => TargetIo::Linear(LinearIo::new(span)),
            Swap::ThinLength(sectors) => {
                if let TargetIo::Thin(io) = &mut active.io {
                    io.resize(sectors);
                }
                return Ok(Vec::new());
            }
            Swap::Snapshot(io) => TargetIo::Snapshot(io),
            Swap::Pool(windows, config) => {
                let (metadata, data) = spans.expect("built above");
                let pool = active.io.pool().expect("a pool device runs a pool");
                let current = active
                    .pool_windows
                    .as_ref()
                    .expect("a running pool's windows");
                let mut notes = Vec::new();
                let (old_metadata, old_data) = (sectors(&current.metadata), sectors(&current.data));
                if sectors(&windows.metadata) > old_metadata {
                    let before = pool.status().metadata_total;
                    let (after, warning) = pool
                        .grow_metadata_onto(alloc::boxed::Box::new(metadata))
                        .map_err(|error| error.text)?;
                    notes.push(format!("metadata grown from {before} to {after} blocks"));
                    notes.extend(warning);
                }
                if sectors(&windows.data) > old_data {
                    let before = pool.status().data_total;
                    pool.grow_onto(alloc::boxed::Box::new(data), length)
                        .map_err(|error| error.text)?;
                    notes.push(format!(
                        "data space grown from {before} to {} blocks",
                        pool.status().data_total
                    ));
                }
                let before = pool.config();
                pool.reconfigure(&config).map_err(|error| error.text)?;
                if (before.low_water_mark, before.features)
                    != (config.low_water_mark, config.features)
                {
                    let words = config.features.words();
                    notes.push(format!(
                        "low water mark {} blocks, features: {}",
                        config.low_water_mark,
                        if words.is_empty() {
                            String::from("none")
                        } else {
                            words.join(" ")
                        }
                    ));
                }
                active.pool_windows = Some(windows);
                return Ok(notes);
            }
        };
        while let Some(done) = active.io.poll() {
            ready.push_back(done);
        }
        active.io = io;
        Ok(Vec::new())
    }
}

/// Whether a reload may turn one of these target types into the other: an origin
/// device goes from `linear` to `snapshot-origin` when it gets a snapshot, to
/// `snapshot-merge` for a merge and back to `linear` after it (LVM's sequences).
fn origin_kinds(new: &str, live: &str) -> bool {
    let origin = |kind| matches!(kind, "linear" | "snapshot-origin" | "snapshot-merge");
    origin(new) && origin(live)
}

fn sectors(windows: &[Window]) -> u64 {
    windows.iter().map(|window| window.sectors).sum()
}

/// Runs of disk sectors (disk, first sector, sectors), adjacent windows of one disk
/// merged, so that two ways of cutting the same sectors compare equal.
fn runs(windows: &[Window]) -> Vec<(usize, u64, u64)> {
    let mut runs: Vec<(usize, u64, u64)> = Vec::new();
    for window in windows {
        match runs.last_mut() {
            Some((disk, offset, length))
                if *disk == window.disk && *offset + *length == window.offset =>
            {
                *length += window.sectors;
            }
            _ => runs.push((window.disk, window.offset, window.sectors)),
        }
    }
    runs
}

/// Whether `new` maps first exactly the sectors `now` maps.
fn begins_with(new: &[Window], now: &[Window]) -> bool {
    slice(new, 0, sectors(now)).is_some_and(|prefix| runs(&prefix) == runs(now))
}
