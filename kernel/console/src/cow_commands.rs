//! COW snapshots of a linear origin, built from dm-snapshot's targets the way LVM
//! builds them: `snap create NAME ORIGIN --cow DEVICE`, `snap merge NAME` and
//! `snap remove NAME`.
//!
//! The stack, under LVM's names: `ORIGIN-real` takes the origin's table, `ORIGIN`
//! becomes `snapshot-origin ORIGIN-real` (same device, so its NBD clients stay
//! connected), `NAME` is `snapshot ORIGIN-real COW P CHUNK`. A bare disk as ORIGIN
//! first gets a linear device over all of it, `DISK-origin`, which is stacked so. Each step is a dm change,
//! saved in the configuration. A merge is handed over as LVM does it (suspend the
//! origin, load `snapshot-merge`, suspend the snapshot, resume the origin, remove the
//! snapshot); when it ends, the origin goes back to its own table.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use blockdev::{Command, IoBuf};
use core::fmt::Write;
use dm::{DeviceMapper, Format, JobStatus, Target};
use snapshot::StoreKind;

use crate::{CommandError, Console, Platform, outln};

/// Chunk size of a new COW snapshot unless `--chunk-size` says otherwise (LVM's
/// default, 4 KiB).
const DEFAULT_CHUNK: u32 = 8;

/// Bytes at the start of a COW device that must be blank (or are cleared with
/// `--force`): a stale snapshot header there would be taken over.
const HEADER_SECTORS: usize = 8;

impl<P: Platform> Console<P> {
    /// The `snap` commands for COW snapshots; `None` when `args` are about thin
    /// snapshots.
    pub(crate) fn cow_snap_command(
        &mut self,
        args: &[String],
        out: &mut dyn Write,
    ) -> Option<Result<(), CommandError>> {
        let (verb, rest) = args.split_first()?;
        match verb.as_str() {
            "create" if rest.iter().any(|word| word == "--cow") => Some(self.cow_create(rest, out)),
            "merge" | "remove" => {
                let name = rest.first()?;
                let cow = matches!(
                    self.dm
                        .borrow()
                        .device(name)
                        .map(|device| device.table().target()),
                    Ok(Target::Snapshot(_))
                );
                if !cow {
                    return None;
                }
                Some(if verb == "merge" {
                    self.cow_merge(rest, out)
                } else {
                    self.cow_remove(rest, out)
                })
            }
            _ => None,
        }
    }

    fn cow_create(&mut self, args: &[String], out: &mut dyn Write) -> Result<(), CommandError> {
        const USAGE: &str =
            "usage: snap create NAME ORIGIN --cow DEVICE [--chunk-size SECTORS] [--force]";
        let mut positional = Vec::new();
        let (mut cow, mut chunk, mut force) = (None, DEFAULT_CHUNK, false);
        let mut words = args.iter();
        while let Some(word) = words.next() {
            match word.as_str() {
                "--cow" => cow = Some(words.next().ok_or(USAGE)?.clone()),
                "--chunk-size" => {
                    let text = words.next().ok_or(USAGE)?;
                    chunk = text
                        .parse()
                        .ok()
                        .filter(|&c: &u32| snapshot::check_chunk_size(u64::from(c)).is_ok())
                        .ok_or_else(|| {
                            format!(
                                "snap create: chunk size '{text}' must be a power of 2 from 1 \
                                 to {} sectors",
                                snapshot::MAX_CHUNK_SECTORS
                            )
                        })?;
                }
                "--force" => force = true,
                flag if flag.starts_with("--") => {
                    return Err(format!("snap create: unknown option '{flag}' ({USAGE})").into());
                }
                _ => positional.push(word.as_str()),
            }
        }
        let ([name, origin], Some(cow)) = (positional.as_slice(), cow) else {
            return Err(USAGE.into());
        };
        let mut dm = self.dm.borrow_mut();
        let plan = plan_create(&dm, name, origin, &cow)?;
        clear_cow(&dm, &cow, force)?;
        let table = build_stack(&mut dm, name, &plan, &cow, chunk)?;
        outln!(out, "{name}: snapshot of {} on {cow}: {table}", plan.origin);
        Ok(())
    }

    fn cow_merge(&mut self, args: &[String], out: &mut dyn Write) -> Result<(), CommandError> {
        let (name, background) = match args {
            [name] => (name, false),
            [name, flag] if flag == "--background" => (name, true),
            _ => return Err("usage: snap merge NAME [--background]".into()),
        };
        let (origin, id) = {
            let mut dm = self.dm.borrow_mut();
            let origin = hand_over(&mut dm, name)?;
            let job = merge_of(&dm, &origin).ok_or("the merge did not start")?;
            outln!(
                out,
                "{name}: merging into {origin} ({} chunks); {name} removed",
                job.total
            );
            (origin, job.id)
        };
        self.follow_job(
            &origin,
            &id,
            background,
            "merging in the background",
            "merge complete",
            out,
        );
        Ok(())
    }

    fn cow_remove(&mut self, args: &[String], out: &mut dyn Write) -> Result<(), CommandError> {
        let (name, force) = match args {
            [name] => (name, false),
            [name, flag] if flag == "--force" => (name, true),
            _ => return Err("usage: snap remove NAME [--force]".into()),
        };
        let mut dm = self.dm.borrow_mut();
        let real = match dm.device(name)?.table().target() {
            Target::Snapshot(args) => args.origin.clone(),
            _ => return Err(format!("snap remove: {name} is not a COW snapshot").into()),
        };
        dm.remove(name, force)?;
        outln!(out, "{name} removed");
        if let Some(origin) = origin_of(&dm, &real)
            && snapshots_of(&dm, &real) == 0
        {
            let table = unstack(&mut dm, &origin, &real)?;
            outln!(out, "{origin}: has no snapshots left: {table}");
        }
        Ok(())
    }
}

/// What `snap create` builds on.
struct CreatePlan {
    origin: String,
    /// The origin's table length.
    length: u64,
    /// The `-real` device, and whether it is made now (the origin is linear).
    real: String,
    new_real: bool,
    /// The table of the origin device when it is made now (over a disk).
    new_origin: Option<String>,
}

fn plan_create(
    dm: &DeviceMapper,
    name: &str,
    origin: &str,
    cow: &str,
) -> Result<CreatePlan, CommandError> {
    dm.check_new_name(name)?;
    if let Some(disk) = dm
        .disks()
        .iter()
        .find(|disk| disk.name() == dm::bare_name(origin))
    {
        return plan_disk_origin(dm, disk.name(), disk.sectors(), cow);
    }
    let device = dm.device(origin)?;
    let origin = device.name().to_string();
    let (real, new_real) = match device.table().target() {
        Target::Linear { .. } => (format!("{origin}-real"), true),
        Target::SnapshotOrigin { origin: real } => (real.clone(), false),
        Target::Thin(_) => {
            return Err(format!(
                "snap create: {origin} is a thin device; its snapshots are thin too (snap \
                 create {name} {origin}, without --cow)"
            )
            .into());
        }
        other => {
            return Err(format!(
                "snap create: {origin} is a {} device; COW snapshots are taken of linear devices",
                other.kind()
            )
            .into());
        }
    };
    if new_real {
        dm.check_new_name(&real)
            .map_err(|why| format!("snap create: {}", why.0))?;
        let users = dm.users_of(&origin);
        if !users.is_empty() {
            return Err(format!(
                "snap create: {origin} is in use by {}; only a device nothing is built on can \
                 get snapshots",
                users.join(", ")
            )
            .into());
        }
    }
    if dm::bare_name(cow) == origin || dm::bare_name(cow) == real {
        return Err("snap create: the COW device cannot be the origin".into());
    }
    Ok(CreatePlan {
        origin,
        length: device.table().length(),
        real,
        new_real,
        new_origin: None,
    })
}

/// A disk as the origin: a linear device over all of it, `DISK-origin`, is made
/// first and then stacked as any linear origin (`DISK-origin-real` takes its table);
/// it is the device clients use from then on. The disk must have no other users.
fn plan_disk_origin(
    dm: &DeviceMapper,
    disk: &str,
    sectors: u64,
    cow: &str,
) -> Result<CreatePlan, CommandError> {
    let origin = format!("{disk}-origin");
    let real = format!("{origin}-real");
    let users = dm.users_of(disk);
    if !users.is_empty() {
        return Err(format!(
            "snap create: disk {disk} is in use by {}; snapshot the device that uses it{}",
            users.join(", "),
            if users.contains(&real.as_str()) {
                format!(" ({origin})")
            } else {
                String::new()
            }
        )
        .into());
    }
    for new in [&origin, &real] {
        dm.check_new_name(new)
            .map_err(|why| format!("snap create: {}", why.0))?;
    }
    if dm::bare_name(cow) == disk {
        return Err("snap create: the COW device cannot be the origin".into());
    }
    Ok(CreatePlan {
        length: sectors,
        new_origin: Some(format!("0 {sectors} linear {disk} 0")),
        origin,
        real,
        new_real: true,
    })
}

/// Checks that the COW device is unused and blank at its start; `--force` blanks it.
fn clear_cow(dm: &DeviceMapper, cow: &str, force: bool) -> Result<(), CommandError> {
    let (name, mut device) = dm
        .test_target(cow)
        .map_err(|why| format!("snap create: COW device: {why}"))?;
    let start = blockdev::run_sync(
        device.as_mut(),
        Command::Read {
            sector: 0,
            buf: IoBuf::with_sectors(HEADER_SECTORS),
        },
    )
    .map_err(|error| format!("snap create: reading {name} failed: {error}"))?;
    if start.iter().all(|&byte| byte == 0) {
        return Ok(());
    }
    if !force {
        return Err(format!(
            "snap create: {name} holds data (its first 4 KiB are not zero); --force \
             overwrites it"
        )
        .into());
    }
    blockdev::run_sync(
        device.as_mut(),
        Command::Write {
            sector: 0,
            buf: IoBuf::with_sectors(HEADER_SECTORS),
            fua: true,
        },
    )
    .map(drop)
    .map_err(|error| format!("snap create: clearing {name} failed: {error}").into())
}

/// LVM's sequence: `-real` gets the origin's table, the origin is suspended, the
/// snapshot created, the origin loaded with `snapshot-origin` and resumed. A failed
/// step undoes the ones before. Returns the snapshot's table.
fn build_stack(
    dm: &mut DeviceMapper,
    name: &str,
    plan: &CreatePlan,
    cow: &str,
    chunk: u32,
) -> Result<String, CommandError> {
    let CreatePlan {
        origin,
        length,
        real,
        new_real,
        new_origin,
    } = plan;
    let undo_real = |dm: &mut DeviceMapper| {
        if *new_real {
            let _ = dm.remove(real, false);
        }
        if new_origin.is_some() {
            let _ = dm.remove(origin, false);
        }
    };
    if let Some(table) = new_origin {
        dm.create(origin, false, table, Format::IfBlank)?;
    }
    if *new_real {
        let device = dm.device(origin)?;
        let (table, read_only) = (device.table().to_string(), device.read_only());
        if let Err(error) = dm.create(real, read_only, &table, Format::IfBlank) {
            if new_origin.is_some() {
                let _ = dm.remove(origin, false);
            }
            return Err(error.into());
        }
    }
    if let Err(error) = dm.suspend(origin) {
        let _ = dm.resume(origin);
        undo_real(dm);
        return Err(error.into());
    }
    let table = format!(
        "0 {length} snapshot {real} {} P {chunk}",
        dm::bare_name(cow)
    );
    let stacked = dm
        .create(name, false, &table, Format::IfBlank)
        .map(drop)
        .and_then(|()| match new_real {
            true => dm.reload(origin, &format!("0 {length} snapshot-origin {real}")),
            false => Ok(()),
        })
        .and_then(|()| dm.resume(origin).map(drop));
    if let Err(error) = stacked {
        let _ = dm.remove(name, true);
        let _ = dm.clear(origin);
        let _ = dm.resume(origin);
        undo_real(dm);
        return Err(error.into());
    }
    Ok(table)
}

/// The device running `snapshot-origin` (or `snapshot-merge`) over `real`.
fn origin_of(dm: &DeviceMapper, real: &str) -> Option<String> {
    dm.devices()
        .find(|device| match device.table().target() {
            Target::SnapshotOrigin { origin } => origin == real,
            Target::SnapshotMerge(args) => args.origin == real,
            _ => false,
        })
        .map(|device| device.name().to_string())
}

/// Snapshot devices of `real`.
fn snapshots_of(dm: &DeviceMapper, real: &str) -> usize {
    dm.devices()
        .filter(|device| matches!(device.table().target(), Target::Snapshot(args) if args.origin == real))
        .count()
}

/// Puts `origin` back on the table of `real` (its own, before the snapshots) and
/// removes `real`. Returns the table.
fn unstack(dm: &mut DeviceMapper, origin: &str, real: &str) -> Result<String, CommandError> {
    let table = dm.device(real)?.table().to_string();
    dm.suspend(origin)?;
    if let Err(error) = dm
        .reload(origin, &table)
        .and_then(|()| dm.resume(origin).map(drop))
    {
        let _ = dm.clear(origin);
        let _ = dm.resume(origin);
        return Err(error.into());
    }
    dm.remove(real, false)?;
    Ok(table)
}

/// LVM's merge hand-over for snapshot `name`: suspend the origin, load
/// `snapshot-merge`, suspend the snapshot, resume the origin (which takes the
/// snapshot's exceptions over), remove the snapshot. Returns the origin's name.
fn hand_over(dm: &mut DeviceMapper, name: &str) -> Result<String, CommandError> {
    let device = dm.device(name)?;
    let name = device.name().to_string();
    let Target::Snapshot(args) = device.table().target() else {
        return Err(format!("snap merge: {name} is not a COW snapshot").into());
    };
    let args = args.clone();
    let length = device.table().length();
    if args.store == StoreKind::Transient {
        return Err(format!(
            "snap merge: {name} keeps its exceptions in memory (N); only persistent snapshots \
             can be merged"
        )
        .into());
    }
    let status = dm.status_lines(device).join(" ");
    if status.ends_with("Invalid") {
        return Err(format!(
            "snap merge: {name} is invalid (its COW device filled up or failed) and cannot be \
             merged; snap remove {name} drops it"
        )
        .into());
    }
    let origin = origin_of(dm, &args.origin).ok_or_else(|| {
        format!(
            "snap merge: no device runs snapshot-origin over {}; the snapshot's origin is not \
             active",
            args.origin
        )
    })?;
    if let Some(job) = merge_of(dm, &origin) {
        return Err(format!("snap merge: {} is running already", job.what).into());
    }
    let table = format!(
        "0 {length} snapshot-merge {} {} P {}",
        args.origin, args.cow, args.chunk
    );
    dm.suspend(&origin)?;
    let handed = dm
        .reload(&origin, &table)
        .and_then(|()| dm.suspend(&name))
        .and_then(|()| dm.resume(&origin).map(drop));
    if let Err(error) = handed {
        let _ = dm.clear(&origin);
        let _ = dm.resume(&origin);
        let _ = dm.resume(&name);
        return Err(error.into());
    }
    dm.remove(&name, true)?;
    Ok(origin)
}

fn merge_of(dm: &DeviceMapper, origin: &str) -> Option<JobStatus> {
    dm.snapshot_merges()
        .into_iter()
        .find(|job| job.device == origin)
}

/// Finished merges of stacks `snap create` built: the origin goes back to its own
/// table (or to `snapshot-origin` while other snapshots remain) and `-real` goes.
/// Returns the event lines.
pub(crate) fn finish_merges(dm: &mut DeviceMapper) -> Vec<String> {
    let finished: Vec<(String, String)> = dm
        .devices()
        .filter_map(|device| match device.table().target() {
            Target::SnapshotMerge(args)
                if args.origin == format!("{}-real", device.name())
                    && dm.snapshot_merge_finished(device.name()) =>
            {
                Some((device.name().to_string(), args.origin.clone()))
            }
            _ => None,
        })
        .collect();
    let mut events = Vec::new();
    for (origin, real) in finished {
        let result = if snapshots_of(dm, &real) > 0 {
            let length = dm.device(&origin).map(|d| d.table().length()).unwrap_or(0);
            let table = format!("0 {length} snapshot-origin {real}");
            dm.suspend(&origin)
                .and_then(|()| dm.reload(&origin, &table))
                .and_then(|()| dm.resume(&origin).map(drop))
                .map(|()| table)
                .map_err(CommandError::from)
        } else {
            unstack(dm, &origin, &real)
        };
        events.push(match result {
            Ok(table) => format!("{origin}: merge complete, back on its table: {table}"),
            Err(error) => format!(
                "{origin}: merge complete, but restoring its table failed: {}",
                error.0
            ),
        });
    }
    events
}
