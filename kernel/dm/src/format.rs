//! A new pool's metadata formatted in the background: `create` returns once the
//! first step is written, the pool is listed by `jobs` while its space maps are
//! built a few bitmaps per tick, and it takes messages and thin devices once the
//! superblock is written. Until then it is a pool that cannot be used yet.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use thin_pool::PoolFormat;

use crate::device::State;
use crate::jobs::JobStatus;
use crate::mapper::DeviceMapper;
use crate::targets::TargetIo;

/// The metadata of a pool being formatted.
pub(crate) struct Formatting {
    format: PoolFormat,
    /// The metadata device's name, for `jobs`.
    metadata_dev: String,
    /// When the first step in the background ran.
    started_ns: Option<u64>,
    /// Bitmaps written before that (by `create`), which `jobs` does not count, so
    /// that the rate is the background's.
    done_before: u64,
}

impl Formatting {
    pub(crate) fn new(format: PoolFormat, metadata_dev: &str) -> Self {
        Formatting {
            done_before: format.progress().0,
            format,
            metadata_dev: String::from(metadata_dev),
            started_ns: None,
        }
    }

    /// The line `jobs` shows for pool `name`.
    pub(crate) fn status(&self, name: &str) -> JobStatus {
        let (done, total) = self.format.progress();
        JobStatus {
            id: format_job_id(name),
            device: String::from(name),
            what: format!("format of metadata device {}", self.metadata_dev),
            done: done - self.done_before,
            total: total - self.done_before,
            unit: "bitmaps",
            started_ns: self.started_ns.unwrap_or(0),
            cancellable: false,
        }
    }
}

/// The id `jobs` gives the metadata format of pool `name`.
pub fn format_job_id(name: &str) -> String {
    format!("{name}/format")
}

/// Why a pool being formatted cannot be used yet.
pub(crate) fn not_formatted_yet(name: &str) -> String {
    format!(
        "pool {name} is still formatting its metadata (jobs shows it as {}); try again when it \
         is done",
        format_job_id(name)
    )
}

impl DeviceMapper {
    /// One step of every metadata format; a finished one turns into its running
    /// pool. Returns the events to print.
    pub(crate) fn step_formats(&mut self, now_ns: u64) -> Vec<String> {
        let mut events = Vec::new();
        for device in self.devices.values_mut() {
            let State::Active(active) = &mut device.state else {
                continue;
            };
            let TargetIo::Formatting(formatting) = &mut active.io else {
                continue;
            };
            formatting.started_ns.get_or_insert(now_ns);
            let failure = match formatting.format.step() {
                Ok(false) => continue,
                Ok(true) => {
                    let State::Active(active) =
                        core::mem::replace(&mut device.state, State::Inactive(String::new()))
                    else {
                        unreachable!("active above");
                    };
                    let mut active = *active;
                    let TargetIo::Formatting(formatting) = active.io else {
                        unreachable!("formatting above");
                    };
                    match formatting.format.finish() {
                        Ok((pool, report)) => {
                            active.io = TargetIo::Pool(pool);
                            device.state = State::Active(Box::new(active));
                            events.push(format!(
                                "{}: metadata formatted on {}; the pool is ready",
                                device.name, formatting.metadata_dev
                            ));
                            events.extend(
                                report
                                    .warnings
                                    .into_iter()
                                    .map(|warning| format!("{}: {warning}", device.name)),
                            );
                            continue;
                        }
                        Err(error) => error,
                    }
                }
                Err(error) => error,
            };
            let why = format!("formatting its metadata failed: {failure}");
            events.push(format!("{}: {why}", device.name));
            device.state = State::Inactive(why);
        }
        events
    }
}
