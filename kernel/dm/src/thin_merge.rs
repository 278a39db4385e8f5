//! `snap merge` for thin snapshots: the origin thin device takes the snapshot's
//! content and the snapshot device goes away, while the origin keeps its name, its
//! thin id and its NBD clients.
//!
//! Order, so that a power cut at any point ends in the merged state or the one
//! before: (1) the configuration is saved without the snapshot device and with a
//! `thin-merge` record; (2) the pool merges, one metadata commit; (3) the
//! configuration is saved without the record. A restore that finds the record
//! finishes the merge if the pool still has the snapshot (cut between 1 and 2) and
//! otherwise only drops the record. If the pool refuses the merge, the snapshot
//! device is brought back as it was.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::Error;
use crate::activate::Format;
use crate::config::{LinkKind, ThinLink};
use crate::device::{Device, State};
use crate::mapper::DeviceMapper;
use crate::table::Target;

impl Device {
    /// Refuses (for `command`) a device that is inactive or suspended.
    pub(crate) fn require_running(&self, command: &str) -> Result<(), Error> {
        match &self.state {
            State::Active(active) if active.suspended => {
                Err(format!("{command}: {} is suspended (resume it first)", self.name).into())
            }
            State::Inactive(why) => {
                Err(format!("{command}: {} is inactive ({why})", self.name).into())
            }
            State::Active(_) => Ok(()),
        }
    }
}

/// What a thin merge did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThinMerge {
    /// The device that now holds the snapshot's content.
    pub target: String,
    pub pool: String,
    /// Thin ids of the snapshot (gone now) and of the target.
    pub snap_id: u64,
    pub target_id: u64,
    /// The pool releases the target's old blocks in the background.
    pub releasing: bool,
    /// A problem that did not undo the merge (the last configuration save).
    pub warning: Option<String>,
}

impl DeviceMapper {
    /// Records a new thin device `dev` of `pool`, made as a snapshot of
    /// `snapshot_of` or not; saved with the next change. Records about an earlier
    /// device of that id are dropped.
    pub fn record_new_thin(&mut self, pool: &str, dev: u64, snapshot_of: Option<u64>) {
        self.forget_thin_id(pool, dev);
        if let Some(origin) = snapshot_of {
            self.thin_links.push(ThinLink {
                kind: LinkKind::SnapshotOf,
                pool: pool.to_string(),
                snap: dev,
                origin,
            });
        }
    }

    /// Thin device `dev` of `pool` is gone: no snapshot-origin record names it.
    pub(crate) fn forget_thin_id(&mut self, pool: &str, dev: u64) {
        self.thin_links.retain(|link| {
            !(link.kind == LinkKind::SnapshotOf
                && link.pool == pool
                && (link.snap == dev || link.origin == dev))
        });
    }

    /// The links the configuration holds, one line each, for `config show`.
    pub fn thin_link_lines(&self) -> Vec<String> {
        self.thin_links
            .iter()
            .map(|link| match link.kind {
                LinkKind::SnapshotOf => format!(
                    "thin device {} of {} is a snapshot of thin device {}",
                    link.snap, link.pool, link.origin
                ),
                LinkKind::Merging => format!(
                    "thin device {} of {} is being merged into thin device {}",
                    link.snap, link.pool, link.origin
                ),
                LinkKind::IntoExternalOrigin => format!(
                    "thin device {} of {} is being merged into its external origin",
                    link.snap, link.pool
                ),
            })
            .collect()
    }

    /// The thin id that thin device `snap` of `pool` was created as a snapshot of,
    /// when the configuration records it.
    pub fn snapshot_origin(&self, pool: &str, snap: u64) -> Option<u64> {
        self.thin_links
            .iter()
            .find(|link| {
                link.kind == LinkKind::SnapshotOf && link.pool == pool && link.snap == snap
            })
            .map(|link| link.origin)
    }

    /// `snap merge SNAP [--into THIN]` for a thin snapshot: `into`, or the device of
    /// the snapshot's recorded origin, takes the snapshot's content; the snapshot
    /// device is removed (its NBD clients get ESHUTDOWN, as with `remove --force`).
    pub fn thin_merge(&mut self, snap: &str, into: Option<&str>) -> Result<ThinMerge, Error> {
        let snap_device = self.device(snap)?;
        let snap_name = snap_device.name.clone();
        let Target::Thin(snap_thin) = snap_device.table.target() else {
            return Err(format!(
                "snap merge: {snap_name} is a {} device, not a thin snapshot",
                snap_device.table.kind()
            )
            .into());
        };
        let (pool, snap_id) = (snap_thin.pool_dev.clone(), snap_thin.dev_id);
        let snap_origin = snap_thin.origin_dev.clone();
        let (snap_table, snap_read_only) = (snap_device.table.to_string(), snap_device.read_only);
        let snap_sectors = snap_device.table.length();
        let target = match into {
            Some(name) => self.device(name)?,
            None => self.recorded_origin_device(&snap_name, &pool, snap_id)?,
        };
        let target_name = target.name.clone();
        let Target::Thin(target_thin) = target.table.target() else {
            return Err(format!(
                "snap merge: {target_name} is a {} device, not a thin device",
                target.table.kind()
            )
            .into());
        };
        let target_id = target_thin.dev_id;
        if target_name == snap_name {
            return Err(format!("snap merge: {snap_name} cannot be merged into itself").into());
        }
        if target_thin.pool_dev != pool {
            return Err(format!(
                "snap merge: {snap_name} is in pool {pool} and {target_name} in pool {}; only devices of one pool merge",
                target_thin.pool_dev
            )
            .into());
        }
        if target.table.length() != snap_sectors {
            return Err(format!(
                "snap merge: {snap_name} has {snap_sectors} sectors and {target_name} {}; only devices of the same size merge",
                target.table.length()
            )
            .into());
        }
        if target_thin.origin_dev != snap_origin {
            let reads = |origin: &Option<String>| match origin {
                Some(origin) => format!("from {origin}"),
                None => String::from("as zeros"),
            };
            return Err(format!(
                "snap merge: {snap_name} reads unprovisioned blocks {} and {target_name} {}; only devices with the same external origin merge",
                reads(&snap_origin),
                reads(&target_thin.origin_dev)
            )
            .into());
        }
        if target.read_only {
            return Err(format!(
                "snap merge: {target_name} is read-only; it cannot take {snap_name}'s content"
            )
            .into());
        }
        target.require_running("snap merge")?;
        let users = self.users_of(&snap_name);
        if !users.is_empty() {
            return Err(format!(
                "snap merge: {snap_name} is in use by {} (remove {} first)",
                users.join(", "),
                if users.len() == 1 { "it" } else { "them" }
            )
            .into());
        }
        self.pool(&pool)
            .map_err(|Error(why)| format!("snap merge: {why}"))?;

        // (1) The configuration without the snapshot, with the merge under way.
        let links_before = self.thin_links.clone();
        let device = self.record_merge(&snap_name, &pool, snap_id, target_id)?;
        self.shut_down(device)?;
        // (2) The merge itself.
        let pool_engine = self.pool(&pool)?;
        if let Err(error) = pool_engine.merge_snapshot(snap_id, target_id) {
            let why = format!(
                "snap merge: {pool} refused to merge thin device {snap_id} into {target_id}: {} ({})",
                error.text,
                error.errno.name()
            );
            self.thin_links = links_before;
            self.create(&snap_name, snap_read_only, &snap_table, Format::Never)
                .map_err(|again| {
                    format!("{why}; reactivating {snap_name} failed too: {}", again.0)
                })?;
            return Err(why.into());
        }
        let releasing = pool_engine
            .deletes()
            .iter()
            .any(|progress| progress.dev == target_id && progress.replaced);
        // (3) Done.
        self.thin_links.retain(|link| {
            !(link.kind == LinkKind::Merging && link.pool == pool && link.snap == snap_id)
        });
        let warning = self.save().err().map(|Error(why)| {
            format!("the merge is done, but {why}; the next restore finishes it again harmlessly")
        });
        Ok(ThinMerge {
            target: target_name,
            pool,
            snap_id,
            target_id,
            releasing,
            warning,
        })
    }

    /// Saves the configuration without the snapshot device `snap_name` (thin device
    /// `snap_id` of `pool`) and with the record of its merge into `target_id`;
    /// returns the device taken out of the table. Nothing changes if saving fails.
    fn record_merge(
        &mut self,
        snap_name: &str,
        pool: &str,
        snap_id: u64,
        target_id: u64,
    ) -> Result<Device, Error> {
        let id = self
            .device_id(snap_name)
            .ok_or_else(|| crate::mapper::unknown_device(snap_name))?;
        let device = self.devices.remove(&id).expect("found above");
        let links_before = self.thin_links.clone();
        self.relink_after_merge(pool, snap_id, target_id);
        self.thin_links.push(ThinLink {
            kind: LinkKind::Merging,
            pool: pool.to_string(),
            snap: snap_id,
            origin: target_id,
        });
        if let Err(error) = self.save() {
            self.devices.insert(id, device);
            self.thin_links = links_before;
            return Err(error);
        }
        Ok(device)
    }

    /// The device of the recorded origin of thin device `snap_id` of `pool`.
    fn recorded_origin_device(
        &self,
        snap_name: &str,
        pool: &str,
        snap_id: u64,
    ) -> Result<&Device, Error> {
        let Some(origin) = self.snapshot_origin(pool, snap_id) else {
            return Err(format!(
                "snap merge: the configuration does not say which device {snap_name} is a snapshot of; name it with --into THIN"
            )
            .into());
        };
        self.devices()
            .find(|device| {
                matches!(device.table.target(), Target::Thin(thin)
                    if thin.pool_dev == pool && thin.dev_id == origin)
            })
            .ok_or_else(|| {
                format!(
                    "snap merge: {snap_name} is a snapshot of thin device {origin} of {pool}, which has no device now; name the target with --into THIN"
                )
                .into()
            })
    }

    /// After `snap` merged into `target`: snapshots of `snap` count as snapshots of
    /// `target` (which holds the content they were taken of), and `snap`'s own
    /// record goes.
    fn relink_after_merge(&mut self, pool: &str, snap: u64, target: u64) {
        self.thin_links.retain(|link| {
            !(link.kind == LinkKind::SnapshotOf && link.pool == pool && link.snap == snap)
        });
        for link in &mut self.thin_links {
            if link.kind == LinkKind::SnapshotOf && link.pool == pool && link.origin == snap {
                link.origin = target;
            }
        }
    }

    /// At restore: finishes the merges a power cut interrupted (the pool still has
    /// the snapshot) and drops the records of the ones that were done.
    pub(crate) fn finish_thin_merges(&mut self, notes: &mut Vec<String>) {
        let merges: Vec<ThinLink> = self
            .thin_links
            .iter()
            .filter(|link| link.kind == LinkKind::Merging)
            .cloned()
            .collect();
        if merges.is_empty() {
            return;
        }
        for link in merges {
            let Ok(pool) = self.pool(&link.pool) else {
                notes.push(format!(
                    "config: the merge of thin device {} into {} waits for pool {} to be active",
                    link.snap, link.origin, link.pool
                ));
                continue;
            };
            match pool.devices() {
                Ok(devices) if devices.contains(&link.snap) => {
                    match pool.merge_snapshot(link.snap, link.origin) {
                        Ok(()) => notes.push(format!(
                            "config: {}: finished merging thin device {} into {}",
                            link.pool, link.snap, link.origin
                        )),
                        Err(error) => {
                            notes.push(format!(
                                "config: {}: merging thin device {} into {} failed: {}",
                                link.pool, link.snap, link.origin, error.text
                            ));
                            continue;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => continue,
            }
            self.thin_links.retain(|other| *other != link);
        }
        if let Err(Error(why)) = self.save() {
            notes.push(format!("config: {why}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use alloc::boxed::Box;
    use alloc::string::ToString;
    use blockdev::{IoBuf, MemDisk};
    use nbd::{Backend, IoOp, IoOutput, IoRequest};

    use super::*;
    use crate::Disk;

    const CLIENT: core::net::SocketAddr =
        core::net::SocketAddr::new(core::net::IpAddr::V4(core::net::Ipv4Addr::LOCALHOST), 40000);

    fn mapper(disks: &[(&str, &MemDisk)]) -> DeviceMapper {
        DeviceMapper::new(
            disks
                .iter()
                .map(|(name, disk)| Disk {
                    name: name.to_string(),
                    device: Box::new(disk.handle()),
                })
                .collect(),
        )
    }

    fn run(dm: &mut DeviceMapper, name: &str, op: IoOp) -> IoOutput {
        let (export, _) = dm.open(name, CLIENT).unwrap();
        dm.submit(IoRequest { tag: 1, export, op }).unwrap();
        let result = loop {
            if let Some(done) = dm.poll() {
                break done.result.unwrap();
            }
        };
        dm.close(export, CLIENT);
        result
    }

    fn write(dm: &mut DeviceMapper, name: &str, byte: u8) {
        let mut buf = IoBuf::with_sectors(8);
        buf.fill(byte);
        let op = IoOp::Write {
            sector: 0,
            buf,
            fua: false,
        };
        run(dm, name, op);
    }

    fn first_byte(dm: &mut DeviceMapper, name: &str) -> u8 {
        let op = IoOp::Read {
            sector: 0,
            buf: IoBuf::with_sectors(8),
        };
        match run(dm, name, op) {
            IoOutput::Read { buf, .. } => buf[0],
            other => panic!("{other:?}"),
        }
    }

    /// A power cut after the configuration recorded a merge and before the pool
    /// made it: the restore finishes it and drops the record.
    #[test]
    fn a_restore_finishes_a_merge_the_power_cut_interrupted() {
        let (meta, data, config) = (
            MemDisk::new(8 << 11),
            MemDisk::new(32 << 11),
            MemDisk::new(4 << 11),
        );
        let disks = [("vda", &meta), ("vdb", &data), ("vdd", &config)];
        let mut dm = mapper(&disks);
        dm.config_init("vdd", [7; 16], false).unwrap();
        dm.create(
            "pool",
            false,
            "0 65536 thin-pool vda vdb 128 0",
            Format::IfBlank,
        )
        .unwrap();
        dm.message("pool", "create_thin 0").unwrap();
        dm.create("vol", false, "0 16384 thin pool 0", Format::Never)
            .unwrap();
        write(&mut dm, "vol", 1);
        dm.message("pool", "create_snap 1 0").unwrap();
        dm.record_new_thin("pool", 1, Some(0));
        dm.create("snap", false, "0 16384 thin pool 1", Format::Never)
            .unwrap();
        write(&mut dm, "snap", 2);
        let device = dm.record_merge("snap", "pool", 1, 0).unwrap();
        dm.shut_down(device).unwrap();
        dm.flush_disks().unwrap();
        drop(dm);

        let mut dm = mapper(&disks);
        let notes = dm.restore();
        assert!(
            notes.contains(&"config: pool: finished merging thin device 1 into 0".to_string()),
            "{notes:?}"
        );
        assert!(dm.thin_link_lines().is_empty());
        assert_eq!(dm.pool("pool").unwrap().devices().unwrap(), [0]);
        assert_eq!(first_byte(&mut dm, "vol"), 2);
        drop(dm);
        // The record is gone from the saved configuration too.
        let mut dm = mapper(&disks);
        let notes = dm.restore();
        assert!(!notes.iter().any(|note| note.contains("merg")), "{notes:?}");
        assert_eq!(first_byte(&mut dm, "vol"), 2);
    }
}
