//! Background work for the operator, whatever its kind: `jobs` lists every job the
//! device mapper runs, `jobs cancel ID` stops one where that is safe, and a command
//! that starts a job follows it with a progress line every second until it is done
//! (Ctrl-C detaches; the job goes on), unless it was given `--background`.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use core::cell::RefCell;
use core::fmt::Write;

use dm::{DeviceMapper, JobStatus, human_bytes};

use crate::job::{Context, Job, Progress};
use crate::{CommandError, Console, Platform, outln};

/// At most this long between progress lines.
const PROGRESS_NS: u64 = 1_000_000_000;

/// An amount of `unit`: bytes in binary units, counts as they are.
fn amount(count: u64, unit: &str) -> String {
    if unit == "bytes" {
        human_bytes(count)
    } else {
        format!("{count} {unit}")
    }
}

/// A rate of `unit` per second: bytes in binary units, counts in K or M when large.
fn rate(per_second: u64, unit: &str) -> String {
    if unit == "bytes" {
        return format!("{}/s", human_bytes(per_second));
    }
    let (scale, prefix) = match per_second {
        0..1_000 => return format!("{per_second} {unit}/s"),
        1_000..1_000_000 => (1_000, "K"),
        _ => (1_000_000, "M"),
    };
    let hundredths = u128::from(per_second) * 100 / scale;
    format!(
        "{}.{:02} {prefix} {unit}/s",
        hundredths / 100,
        hundredths % 100
    )
}

/// "25% (250000 of 1000000 mappings), 500.00 K mappings/s, about 2 s left" at time
/// `now_ns` of the platform clock.
pub(crate) fn describe(status: &JobStatus, now_ns: u64) -> String {
    let per_second = status.per_second(now_ns);
    let left = match status.seconds_left(now_ns) {
        Some(seconds) => format!("about {seconds} s left"),
        None => String::from("time left unknown"),
    };
    let done = if status.unit == "bytes" {
        human_bytes(status.done)
    } else {
        format!("{}", status.done)
    };
    format!(
        "{}% ({done} of {}), {}, {left}",
        status.percent(),
        amount(status.total, status.unit),
        rate(per_second, status.unit)
    )
}

/// `jobs`: every background job, one line each.
pub(crate) fn list(dm: &DeviceMapper, now_ns: u64, out: &mut dyn Write) {
    let jobs = dm.jobs();
    if jobs.is_empty() {
        outln!(out, "no background jobs");
        return;
    }
    for status in jobs {
        outln!(
            out,
            "{}  {}: {}, {}",
            status.id,
            status.device,
            status.what,
            describe(&status, now_ns)
        );
    }
}

/// `jobs cancel ID`.
pub(crate) fn cancel(
    dm: &mut DeviceMapper,
    id: &str,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    dm.cancel_job(id)?;
    outln!(out, "{id}: cancelled");
    Ok(())
}

/// Follows one job until it is no longer listed.
pub(crate) struct JobWatch {
    dm: Rc<RefCell<DeviceMapper>>,
    /// What the command was about: the first word of each line.
    name: String,
    id: String,
    /// Printed when the job is gone.
    finished: String,
    last_report_ns: Option<u64>,
    detached: bool,
}

impl Job for JobWatch {
    fn step(&mut self, context: &mut Context<'_>, out: &mut dyn Write) -> Progress {
        let now_ns = (context.clock)();
        let status = self
            .dm
            .borrow()
            .jobs()
            .into_iter()
            .find(|status| status.id == self.id);
        let Some(status) = status else {
            outln!(out, "{}: {}", self.name, self.finished);
            return Progress::Finished(Ok(()));
        };
        if self.detached {
            outln!(
                out,
                "{}: detached; the {} goes on in the background (jobs shows it as {})",
                self.name,
                status.what,
                self.id
            );
            return Progress::Finished(Ok(()));
        }
        if self
            .last_report_ns
            .is_none_or(|last| now_ns.saturating_sub(last) >= PROGRESS_NS)
        {
            self.last_report_ns = Some(now_ns);
            outln!(
                out,
                "{}: {}: {}",
                self.name,
                status.what,
                describe(&status, now_ns)
            );
        }
        Progress::Running
    }

    fn cancel(&mut self) {
        self.detached = true;
    }
}

impl<P: Platform> Console<P> {
    /// After a command started background job `id` for `name`: returns at once with
    /// `started` printed when `background`, else follows the job with progress lines
    /// and prints `finished` when it is done. Nothing is printed for a job that is
    /// done already.
    pub(crate) fn follow_job(
        &mut self,
        name: &str,
        id: &str,
        background: bool,
        started: &str,
        finished: &str,
        out: &mut dyn Write,
    ) {
        if !self.dm.borrow().jobs().iter().any(|status| status.id == id) {
            return;
        }
        if background {
            outln!(out, "{name}: {started} (jobs shows it as {id})");
            return;
        }
        self.job = Some(alloc::boxed::Box::new(JobWatch {
            dm: Rc::clone(&self.dm),
            name: String::from(name),
            id: String::from(id),
            finished: String::from(finished),
            last_report_ns: None,
            detached: false,
        }));
    }
}

impl<P: Platform> Console<P> {
    /// After `create` of pool `name`: follows the format of its metadata, if that
    /// goes on in the background.
    pub(crate) fn follow_format(&mut self, name: &str, background: bool, out: &mut dyn Write) {
        self.follow_job(
            name,
            &dm::format_job_id(name),
            background,
            "usable once its metadata is formatted",
            "metadata formatted, the pool is ready",
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(done: u64, total: u64, unit: &'static str) -> JobStatus {
        JobStatus {
            id: "pool/5".into(),
            device: "pool".into(),
            what: "delete of thin device 5".into(),
            done,
            total,
            unit,
            started_ns: 1_000_000_000,
            cancellable: false,
        }
    }

    #[test]
    fn progress_is_described_with_rate_and_time_left() {
        assert_eq!(
            describe(&status(250_000, 1_000_000, "mappings"), 1_500_000_000),
            "25% (250000 of 1000000 mappings), 500.00 K mappings/s, about 2 s left"
        );
        assert_eq!(
            describe(&status(3_000_000, 4_000_000, "mappings"), 2_000_000_000),
            "75% (3000000 of 4000000 mappings), 3.00 M mappings/s, about 1 s left"
        );
        assert_eq!(
            describe(&status(0, 1_000_000, "mappings"), 1_000_000_000),
            "0% (0 of 1000000 mappings), 0 mappings/s, time left unknown"
        );
        assert_eq!(
            describe(&status(3 << 20, 12 << 20, "bytes"), 3_000_000_000),
            "25% (3.00 MiB of 12.00 MiB), 1.50 MiB/s, about 6 s left"
        );
    }
}
