//! The snapshot targets in the device table: their table lines, their activation with
//! dm's checks, the handover of a snapshot's store to `snapshot-merge`, merges
//! stepped from [`DeviceMapper::tick`], and merge progress for `jobs`.
//!
//! Every snapshot is registered under its origin's name (dm's origin table), so
//! that the origin's `snapshot-origin` or `snapshot-merge` device finds the
//! snapshots to copy out into, whatever order the devices were activated in.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;
use snapshot::{Snapshot, SnapshotTable};

use crate::device::State;
use crate::jobs::JobStatus;
use crate::mapper::DeviceMapper;
use crate::table::{Table, Target, bare_name};
use crate::targets::{CowIo, LinearIo, Role, Scope, SnapshotIo, SnapshotList, TargetIo};

/// The target of a `snapshot-origin`, `snapshot` or `snapshot-merge` segment.
pub(crate) fn parse_target(kind: &str, args: &[&str]) -> Result<Target, String> {
    if kind == "snapshot-origin" {
        return match args {
            [origin] => Ok(Target::SnapshotOrigin {
                origin: bare_name(origin).to_string(),
            }),
            _ => Err("snapshot-origin: origin: incorrect number of arguments".into()),
        };
    }
    let merge = kind == "snapshot-merge";
    let mut table =
        SnapshotTable::parse(args, merge).map_err(|error| format!("{kind}: {error}"))?;
    table.origin = bare_name(&table.origin).to_string();
    table.cow = bare_name(&table.cow).to_string();
    if table.origin == table.cow {
        return Err(format!(
            "{kind}: COW device cannot be the same as origin device"
        ));
    }
    Ok(if merge {
        Target::SnapshotMerge(table)
    } else {
        Target::Snapshot(table)
    })
}

impl DeviceMapper {
    /// The snapshots registered under origin `name`.
    fn snapshot_list(&self, name: &str) -> SnapshotList {
        let mut origins = self.snapshot_origins.borrow_mut();
        let list = origins.entry(name.to_string()).or_default();
        list.borrow_mut()
            .retain(|snapshot| snapshot.strong_count() > 0);
        Rc::clone(list)
    }

    /// Each active device running a snapshot target: its name, target, I/O and
    /// whether it is suspended.
    fn snapshot_devices(&self) -> impl Iterator<Item = (&str, &Target, &SnapshotIo, bool)> {
        self.devices().filter_map(|device| match &device.state {
            State::Active(active) => match &active.io {
                TargetIo::Snapshot(io) => Some((
                    device.name.as_str(),
                    device.table.target(),
                    io,
                    active.suspended,
                )),
                _ => None,
            },
            State::Inactive(_) => None,
        })
    }

    /// Starts a snapshot target for `table` (`reloading` names the device whose
    /// table it will replace). Returns it and what the kernel would log.
    pub(crate) fn snapshot_target(
        &self,
        reloading: Option<&str>,
        table: &Table,
        read_only: bool,
    ) -> Result<(SnapshotIo, Vec<String>), String> {
        let length = table.length();
        match table.target() {
            Target::SnapshotOrigin { origin } => {
                let span = self.span(&self.fit(origin, 0, length)?, read_only);
                let scope = Scope::Origin(self.snapshot_list(origin));
                let role = Role::Cow(Box::new(CowIo::new(scope, LinearIo::new(span))));
                Ok((SnapshotIo::new(role, length, read_only), Vec::new()))
            }
            Target::Snapshot(args) => {
                if let Some((user, ..)) = self
                    .snapshot_devices()
                    .find(|(_, target, ..)| cow_of(target) == Some(&args.cow))
                {
                    return Err(format!(
                        "snapshot: COW device {} is in use by {user} (remove it first)",
                        args.cow
                    ));
                }
                let (snapshot, notes) = self.open_snapshot(args, length, true)?;
                let shared = Rc::new(RefCell::new(snapshot));
                self.snapshot_list(&args.origin)
                    .borrow_mut()
                    .push(Rc::downgrade(&shared));
                // The device's own handles (the snapshot's carry its batches); the
                // origin is written only by discards passed down.
                let passdown = args.discard_passdown_origin && !read_only;
                let origin = self.span(&self.fit(&args.origin, 0, length)?, !passdown);
                let cow = self.span(&self.windows(&args.cow)?, read_only);
                let scope = Scope::Snapshot {
                    snapshot: shared,
                    cow: Box::new(LinearIo::new(cow)),
                    discard_zeroes_cow: args.discard_zeroes_cow,
                    discard_passdown_origin: passdown,
                };
                let role = Role::Cow(Box::new(CowIo::new(scope, LinearIo::new(origin))));
                Ok((SnapshotIo::new(role, length, read_only), notes))
            }
            Target::SnapshotMerge(args) => {
                let (io, notes) = self.merge_target(reloading, args, length, read_only)?;
                Ok((io, notes))
            }
            other => Err(format!("{} is not a snapshot target", other.kind())),
        }
    }

    /// Opens a snapshot's store over its origin (read-only unless it merges) and COW.
    fn open_snapshot(
        &self,
        args: &SnapshotTable,
        length: u64,
        origin_read_only: bool,
    ) -> Result<(Snapshot, Vec<String>), String> {
        let origin_windows = self.fit(&args.origin, 0, length)?;
        let cow_windows = self.windows(&args.cow)?;
        let shares = origin_windows.iter().any(|mine| {
            cow_windows.iter().any(|other| {
                mine.disk == other.disk
                    && mine.offset < other.offset + other.sectors
                    && other.offset < mine.offset + mine.sectors
            })
        });
        if shares {
            return Err("snapshot: COW device cannot be the same as origin device".into());
        }
        let origin = self.span(&origin_windows, origin_read_only);
        let cow = self.span(&cow_windows, false);
        Snapshot::open(
            Box::new(origin),
            Box::new(cow),
            args.store,
            args.chunk,
            length,
        )
        .map_err(|error| format!("snapshot: {error}"))
    }

    /// A `snapshot-merge` target: takes over the store of the active snapshot on the
    /// same COW (which must be suspended, and fails all I/O from then on), or reads
    /// the COW itself (a merge resumed at activation).
    fn merge_target(
        &self,
        reloading: Option<&str>,
        args: &SnapshotTable,
        length: u64,
        read_only: bool,
    ) -> Result<(SnapshotIo, Vec<String>), String> {
        if read_only {
            return Err("snapshot-merge: the origin device must be writable".into());
        }
        let merging = self.snapshot_devices().find(|(name, target, ..)| {
            Some(*name) != reloading
                && matches!(target, Target::SnapshotMerge(other) if other.origin == args.origin)
        });
        if let Some((name, ..)) = merging {
            return Err(format!(
                "snapshot-merge: A snapshot is already merging ({name} merges into {})",
                args.origin
            ));
        }
        let source = self
            .snapshot_devices()
            .find_map(|(name, target, io, suspended)| match (target, io.role()) {
                (Target::Snapshot(other), Role::Cow(cow_io))
                    if other.cow == args.cow && other.origin == args.origin =>
                {
                    Some((name, Rc::clone(cow_io.snapshot()?), suspended))
                }
                _ => None,
            });
        if let Some((name, _, false)) = &source {
            return Err(format!(
                "snapshot-merge: Unable to perform snapshot handover until source is \
                 suspended (suspend {name} first)"
            ));
        }
        let (mut snapshot, notes) = self.open_snapshot(args, length, false)?;
        snapshot
            .start_merge()
            .map_err(|why| format!("snapshot-merge: {why}"))?;
        if let Some((_, shared, _)) = source {
            shared.borrow_mut().hand_over();
        }
        let role = Role::Merge {
            merging: Rc::new(RefCell::new(snapshot)),
            others: self.snapshot_list(&args.origin),
            held: Default::default(),
            started_ns: None,
        };
        Ok((SnapshotIo::new(role, length, false), notes))
    }

    /// Steps every running merge for a bounded time and collects the snapshots'
    /// events (invalidation, merge finished or failed) as `NAME: event` lines.
    pub(crate) fn step_snapshot_targets(
        &mut self,
        clock: &dyn Fn() -> u64,
        events: &mut Vec<String>,
    ) {
        for device in self.devices.values_mut() {
            let State::Active(active) = &mut device.state else {
                continue;
            };
            let TargetIo::Snapshot(io) = &mut active.io else {
                continue;
            };
            if !active.suspended {
                io.paced_merge(clock);
            }
            if let Some(snapshot) = io.snapshot() {
                for event in snapshot.borrow_mut().take_events() {
                    events.push(format!("{}: {event}", device.name));
                }
            }
        }
    }

    /// The status fields of a snapshot target's segment.
    pub(crate) fn snapshot_status(&self, name: &str) -> Result<String, String> {
        let (_, target, io, _) = self
            .snapshot_devices()
            .find(|(device, ..)| *device == name)
            .ok_or_else(|| format!("{name} runs no snapshot target"))?;
        Ok(match (target, io.snapshot()) {
            (Target::SnapshotOrigin { .. }, _) | (_, None) => String::new(),
            (_, Some(snapshot)) => format!(" {}", snapshot.borrow().status()),
        })
    }

    /// Merges running into origin devices, with their progress in chunks.
    pub fn snapshot_merges(&self) -> Vec<JobStatus> {
        self.snapshot_devices()
            .filter_map(|(name, target, io, _)| {
                let (progress, started_ns) = io.merge_progress()?;
                let cow = cow_of(target)?;
                Some(JobStatus {
                    id: format!("merge/{name}"),
                    device: name.to_string(),
                    what: format!("merge of snapshot COW {cow} into {name}"),
                    done: progress.merged,
                    total: progress.total,
                    unit: "chunks",
                    started_ns,
                    // A merge runs to its end (dm has no way back either).
                    cancellable: false,
                })
            })
            .collect()
    }

    /// Whether `name` is a merging origin whose merge has finished.
    pub fn snapshot_merge_finished(&self, name: &str) -> bool {
        self.snapshot_devices()
            .any(|(device, _, io, _)| device == name && io.merge_finished())
    }
}

/// The COW device a snapshot or merge target uses.
fn cow_of(target: &Target) -> Option<&String> {
    match target {
        Target::Snapshot(args) | Target::SnapshotMerge(args) => Some(&args.cow),
        _ => None,
    }
}
