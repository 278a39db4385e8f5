//! `thin merge-origin NAME`: the thin device's own blocks are copied into its
//! external origin in the background while the device serves I/O (see the pool
//! engine's origin merge), until it maps nothing and reads entirely from the origin.
//!
//! The origin must be writable and used by no other device: it is written while it
//! is still the origin of NAME, and any other device reading it would see it
//! change. A `thin-merge-origin` record in the configuration, saved before the merge
//! starts and dropped when the pool reports it done, makes a restore (after a power
//! cut or a reboot) start it again; the pool's mappings are the merge's state, so
//! going on from the start loses nothing.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::Error;
use crate::config::{LinkKind, ThinLink};
use crate::device::State;
use crate::jobs::JobStatus;
use crate::mapper::DeviceMapper;
use crate::table::Target;
use crate::targets::TargetIo;

/// The id `jobs` gives the merge of thin device `name` into its external origin.
pub fn origin_merge_job_id(name: &str) -> String {
    format!("merge-origin/{name}")
}

impl DeviceMapper {
    /// `thin merge-origin NAME`: starts copying NAME's blocks into its external
    /// origin. Returns the origin's name.
    pub fn thin_merge_origin(&mut self, name: &str) -> Result<String, Error> {
        let device = self.device(name)?;
        let name = device.name.clone();
        let Target::Thin(thin) = device.table.target() else {
            return Err(format!(
                "thin merge-origin: {name} is a {} device, not a thin device",
                device.table.kind()
            )
            .into());
        };
        let Some(origin) = thin.origin_dev.clone() else {
            return Err(
                format!("thin merge-origin: {name} has no external origin to merge into").into(),
            );
        };
        let (pool, dev) = (thin.pool_dev.clone(), thin.dev_id);
        device.require_running("thin merge-origin")?;
        let others: Vec<&str> = self
            .users_of(&origin)
            .into_iter()
            .filter(|user| *user != name)
            .collect();
        if !others.is_empty() {
            return Err(format!(
                "thin merge-origin: {origin} is also used by {}; merging would change what {} read{}",
                others.join(", "),
                if others.len() == 1 { "it" } else { "they" },
                if others.len() == 1 { "s" } else { "" }
            )
            .into());
        }
        if let Some(origin_device) = self.find(&origin) {
            if origin_device.read_only {
                return Err(format!(
                    "thin merge-origin: {origin} is read-only (created with --readonly); the merge writes to it"
                )
                .into());
            }
            if let State::Active(active) = &origin_device.state
                && !active.clients.is_empty()
            {
                return Err(format!(
                    "thin merge-origin: {origin} has NBD clients connected; the merge would change their data"
                )
                .into());
            }
        }
        let windows = self
            .windows(&origin)
            .map_err(|why| format!("thin merge-origin: {why}"))?;
        if windows.iter().any(|window| window.read_only) {
            return Err(format!("thin merge-origin: {origin} is read-only").into());
        }
        let record = ThinLink {
            kind: LinkKind::IntoExternalOrigin,
            pool,
            snap: dev,
            origin: dev,
        };
        let recorded = self.thin_links.contains(&record);
        if !recorded {
            self.thin_links.push(record.clone());
            if let Err(error) = self.save() {
                self.thin_links.retain(|link| *link != record);
                return Err(error);
            }
        }
        if let Err(why) = self.start_origin_merge(&name, &origin) {
            if !recorded {
                self.thin_links.retain(|link| *link != record);
                // Without the record the configuration is as before; a failed save
                // only leaves a record that the next restore tries again.
                let _ = self.save();
            }
            return Err(format!("thin merge-origin: {why}").into());
        }
        Ok(origin)
    }

    /// Hands the running thin device `name` a writable view of `origin` to merge
    /// into.
    fn start_origin_merge(&mut self, name: &str, origin: &str) -> Result<(), String> {
        let target = self.span(&self.windows(origin)?, false);
        let id = self
            .device_id(name)
            .ok_or_else(|| format!("no device {name}"))?;
        let device = self.devices.get_mut(&id).expect("found above");
        let active = device.active_mut()?;
        let TargetIo::Thin(io) = &mut active.io else {
            return Err(format!("{name} is not a thin device"));
        };
        io.start_origin_merge(Box::new(target))
            .map_err(|error| error.text)
    }

    /// Merges into external origins under way, in the background-job shape.
    pub fn origin_merge_jobs(&self) -> Vec<JobStatus> {
        let mut jobs = Vec::new();
        for device in self.devices() {
            let State::Active(active) = &device.state else {
                continue;
            };
            let Some(pool) = active.io.pool() else {
                continue;
            };
            for progress in pool.origin_merges() {
                let name = self
                    .thin_device_name(&device.name, progress.dev)
                    .unwrap_or_else(|| format!("{}/{}", device.name, progress.dev));
                jobs.push(JobStatus {
                    id: origin_merge_job_id(&name),
                    what: format!("merge of {name} into its external origin"),
                    device: name,
                    done: progress.copied,
                    total: progress.total,
                    unit: "blocks",
                    started_ns: progress.started_ns,
                    cancellable: false,
                });
            }
        }
        jobs
    }

    /// The name of the device that is thin device `dev` of `pool`.
    pub(crate) fn thin_device_name(&self, pool: &str, dev: u64) -> Option<String> {
        self.devices()
            .find(|device| {
                matches!(device.table.target(), Target::Thin(thin)
                    if thin.pool_dev == pool && thin.dev_id == dev)
            })
            .map(|device| device.name.clone())
    }

    /// A pool reported thin device `dev`'s merge into its origin finished: its
    /// record goes.
    pub(crate) fn origin_merge_finished(&mut self, pool: &str, dev: u64) {
        let before = self.thin_links.len();
        self.thin_links.retain(|link| {
            !(link.kind == LinkKind::IntoExternalOrigin && link.pool == pool && link.snap == dev)
        });
        if self.thin_links.len() != before {
            // A failed save leaves the record: the next restore finds nothing to do.
            let _ = self.save();
        }
    }

    /// At restore: starts the merges into external origins the configuration
    /// records again.
    pub(crate) fn resume_origin_merges(&mut self, notes: &mut Vec<String>) {
        let records: Vec<ThinLink> = self
            .thin_links
            .iter()
            .filter(|link| link.kind == LinkKind::IntoExternalOrigin)
            .cloned()
            .collect();
        for link in records {
            let Some(name) = self.thin_device_name(&link.pool, link.snap) else {
                notes.push(format!(
                    "config: thin device {} of {} was being merged into its origin, but has no device",
                    link.snap, link.pool
                ));
                continue;
            };
            let origin = match self.find(&name).map(|device| device.table.target()) {
                Some(Target::Thin(thin)) => thin.origin_dev.clone(),
                _ => None,
            };
            let started = match origin {
                Some(origin) => self.start_origin_merge(&name, &origin),
                None => Err("it has no external origin".to_string()),
            };
            notes.push(match started {
                Ok(()) => format!("config: {name}: merging into its origin again"),
                Err(why) => {
                    format!("config: {name}: the merge into its origin cannot go on: {why}")
                }
            });
        }
    }
}
