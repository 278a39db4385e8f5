//! Long work, listed and cancelled in one place whatever it is: a pool releasing a
//! deleted device's blocks today, copies, merges and imports to come. Every job runs
//! in bounded steps from [`DeviceMapper::tick`], between requests, so none stalls
//! another device's I/O.
//!
//! Work of a running target (a pool's deletes) is reported by the target; work the
//! device mapper drives itself, across devices, is a [`Job`] given to
//! [`DeviceMapper::start_job`].

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::Error;
use crate::device::State;
use crate::format::format_job_id;
use crate::mapper::DeviceMapper;
use crate::targets::TargetIo;

/// One line of `jobs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobStatus {
    /// Stable while the job runs, e.g. `pool/5`: what `jobs cancel ID` takes.
    pub id: String,
    /// The device the work is for.
    pub device: String,
    /// What is being done, e.g. "delete of thin device 5".
    pub what: String,
    pub done: u64,
    pub total: u64,
    /// What `done` and `total` count: "mappings", "chunks", "bytes", ...
    pub unit: &'static str,
    /// The platform clock when the work started, for its rate and time left.
    pub started_ns: u64,
    pub cancellable: bool,
}

impl JobStatus {
    /// Whole percent done (100 for work of nothing).
    pub fn percent(&self) -> u64 {
        if self.total == 0 {
            return 100;
        }
        let percent = u128::from(self.done.min(self.total)) * 100 / u128::from(self.total);
        percent as u64
    }

    /// Units done per second since the start, at time `now_ns`.
    pub fn per_second(&self, now_ns: u64) -> u64 {
        let elapsed_ns = now_ns.saturating_sub(self.started_ns).max(1);
        let rate = u128::from(self.done) * 1_000_000_000 / u128::from(elapsed_ns);
        u64::try_from(rate).unwrap_or(u64::MAX)
    }

    /// Whole seconds left at the rate so far, rounded up; `None` before any progress.
    pub fn seconds_left(&self, now_ns: u64) -> Option<u64> {
        let rate = self.per_second(now_ns);
        (rate > 0).then(|| self.total.saturating_sub(self.done).div_ceil(rate))
    }
}

/// How a step of a [`Job`] ended.
pub enum JobStep {
    /// More to do: step again at the next tick.
    Running,
    /// Done (or failed, or cancelled): the job is dropped and these `event:` lines
    /// are printed.
    Finished(Vec<String>),
}

/// Long work the device mapper drives itself, across devices.
pub trait Job {
    fn status(&self) -> JobStatus;
    /// Does a bounded piece of the work (a few milliseconds of CPU, a bounded number
    /// of I/Os), with the devices at hand; `clock` gives the platform's time.
    fn step(&mut self, dm: &mut DeviceMapper, clock: &dyn Fn() -> u64) -> JobStep;
    /// Stops the work where that is safe (the job is dropped at its next step), or
    /// says why it cannot be stopped.
    fn cancel(&mut self, dm: &mut DeviceMapper) -> Result<(), Error>;
}

impl DeviceMapper {
    /// Every running job: the targets' in device order, then the device mapper's own
    /// in the order they started.
    pub fn jobs(&self) -> Vec<JobStatus> {
        let mut jobs = Vec::new();
        for device in self.devices() {
            if let State::Active(active) = &device.state {
                let name_of = |dev| self.thin_device_name(&device.name, dev);
                target_jobs(&device.name, &active.io, &name_of, &mut jobs);
            }
        }
        jobs.extend(self.snapshot_merges());
        jobs.extend(self.origin_merge_jobs());
        jobs.extend(self.jobs.iter().map(|job| job.status()));
        jobs
    }

    /// `jobs cancel ID`: stops the job where that is safe, or says why not.
    pub fn cancel_job(&mut self, id: &str) -> Result<(), Error> {
        if let Some(index) = self.jobs.iter().position(|job| job.status().id == id) {
            let mut job = self.jobs.remove(index);
            let result = job.cancel(self);
            self.jobs.insert(index.min(self.jobs.len()), job);
            return result;
        }
        let Some(status) = self.jobs().into_iter().find(|status| status.id == id) else {
            return Err(format!("no background job {id} (jobs lists them)").into());
        };
        Err(target_refusal(&status).into())
    }

    /// Starts `job`, stepped from [`DeviceMapper::tick`] until it finishes; refuses a
    /// second job under the same id.
    pub fn start_job(&mut self, job: Box<dyn Job>) -> Result<(), Error> {
        let id = job.status().id;
        if self.jobs().iter().any(|status| status.id == id) {
            return Err(format!("a job {id} is running already (see jobs)").into());
        }
        self.jobs.push(job);
        Ok(())
    }

    /// One step of each of the device mapper's own jobs; returns the events of the
    /// ones that finished.
    fn step_jobs(&mut self, clock: &dyn Fn() -> u64) -> Vec<String> {
        let mut events = Vec::new();
        let mut running = core::mem::take(&mut self.jobs);
        running.retain_mut(|job| match job.step(self, clock) {
            JobStep::Running => true,
            JobStep::Finished(lines) => {
                events.extend(lines);
                false
            }
        });
        // Jobs started during the steps come after the ones that were running.
        running.append(&mut self.jobs);
        self.jobs = running;
        events
    }
}

/// The id `jobs` gives a pool's delete of thin device `dev`.
pub fn delete_job_id(pool: &str, dev: u64) -> String {
    format!("{pool}/{dev}")
}

/// The id `jobs` gives a pool's release of the old content of thin device `dev`,
/// which a snapshot merged into it replaced.
pub fn merge_release_job_id(pool: &str, dev: u64) -> String {
    format!("{pool}/{dev}-replaced")
}

/// The work of the target of device `name`; `name_of` names the device of a thin
/// id when it has one.
fn target_jobs(
    name: &str,
    io: &TargetIo,
    name_of: &dyn Fn(u64) -> Option<String>,
    jobs: &mut Vec<JobStatus>,
) {
    match io {
        TargetIo::Pool(pool) => {
            for delete in pool.deletes() {
                let (id, what) = if delete.replaced {
                    let device = match name_of(delete.dev) {
                        Some(device) => format!("{device} (thin device {})", delete.dev),
                        None => format!("thin device {}", delete.dev),
                    };
                    (
                        merge_release_job_id(name, delete.dev),
                        format!(
                            "release of the old content of {device}, replaced by a snapshot merge"
                        ),
                    )
                } else {
                    (
                        delete_job_id(name, delete.dev),
                        format!("delete of thin device {}", delete.dev),
                    )
                };
                jobs.push(JobStatus {
                    id,
                    device: String::from(name),
                    what,
                    done: delete.released,
                    total: delete.total,
                    unit: "mappings",
                    started_ns: delete.started_ns,
                    cancellable: false,
                });
            }
            for discard in pool.discards() {
                jobs.push(JobStatus {
                    id: format!("{name}/discard-{}@{}", discard.dev, discard.sector),
                    device: String::from(name),
                    what: format!(
                        "discard of thin device {}, sectors {}..{}",
                        discard.dev,
                        discard.sector,
                        discard.sector + discard.sectors
                    ),
                    done: discard.done,
                    total: discard.sectors,
                    unit: "sectors",
                    started_ns: discard.started_ns,
                    cancellable: false,
                });
            }
        }
        TargetIo::Formatting(formatting) => jobs.push(formatting.status(name)),
        TargetIo::Linear(_) | TargetIo::Thin(_) | TargetIo::Snapshot(_) => {}
    }
}

/// Why a target's job cannot be cancelled.
fn target_refusal(status: &JobStatus) -> String {
    if status.id == format_job_id(&status.device) {
        return format!(
            "{} cannot be cancelled: a half-formatted pool is of no use; remove {} to stop \
             it (its metadata device is formatted again when the pool is created again)",
            status.id, status.device
        );
    }
    if status.what.starts_with("discard") {
        return format!(
            "{} cannot be cancelled: an NBD client waits for this discard; it finishes on its own",
            status.id
        );
    }
    if status.id.ends_with("-replaced") {
        return format!(
            "{} cannot be cancelled: the merge is done and only the blocks of the old content \
             are left to release; it finishes on its own",
            status.id
        );
    }
    format!(
        "{} cannot be cancelled: the thin device is deleted already and only its blocks are \
         left to release; it finishes on its own",
        status.id
    )
}

/// While NBD requests come in, a round of background steps is followed by three
/// times its own time without steps, so the steps take at most a quarter of the
/// time from I/O (as a pool's deletes do).
const BUSY_PAUSE_FACTOR: u64 = 3;

/// When the device mapper's own background steps may run again.
#[derive(Default)]
pub(crate) struct Pacing {
    next_step_ns: u64,
    requests_at_last_step: u64,
}

impl DeviceMapper {
    /// A step of each metadata format and each of the device mapper's own jobs,
    /// unless requests came in since the last round and it was too recent. Returns
    /// the events to print.
    pub(crate) fn background_steps(&mut self, clock: &dyn Fn() -> u64) -> Vec<String> {
        let formatting = self.devices().any(|device| {
            matches!(&device.state, State::Active(active)
                if matches!(active.io, TargetIo::Formatting(_)))
        });
        if !formatting && self.jobs.is_empty() {
            return Vec::new();
        }
        let start = clock();
        let busy = self.requests_submitted != self.pacing.requests_at_last_step;
        if busy && start < self.pacing.next_step_ns {
            return Vec::new();
        }
        self.pacing.requests_at_last_step = self.requests_submitted;
        let mut events = self.step_formats(start);
        events.extend(self.step_jobs(clock));
        let end = clock();
        self.pacing.next_step_ns = end + end.saturating_sub(start) * BUSY_PAUSE_FACTOR;
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::rc::Rc;
    use alloc::vec;
    use core::cell::Cell;

    fn status(done: u64, total: u64, started_ns: u64) -> JobStatus {
        JobStatus {
            id: "copy/a".into(),
            device: "a".into(),
            what: "copy of a".into(),
            done,
            total,
            unit: "chunks",
            started_ns,
            cancellable: true,
        }
    }

    #[test]
    fn percent_rate_and_time_left_follow_progress() {
        let quarter = status(250_000, 1_000_000, 1_000_000_000);
        assert_eq!(quarter.percent(), 25);
        assert_eq!(quarter.per_second(1_500_000_000), 500_000);
        assert_eq!(quarter.seconds_left(1_500_000_000), Some(2));
        let fresh = status(0, 1_000_000, 1_000_000_000);
        assert_eq!(fresh.per_second(1_000_000_000), 0);
        assert_eq!(fresh.seconds_left(2_000_000_000), None);
        assert_eq!(status(0, 0, 0).percent(), 100);
        assert_eq!(status(2, 3, 0).percent(), 66);
        // One unit left at three a second is still a second away.
        assert_eq!(status(3, 4, 0).seconds_left(1_000_000_000), Some(1));
    }

    /// Counts to `total`, one unit per step, and stops where it is when cancelled.
    struct Counter {
        done: u64,
        total: u64,
        cancelled: bool,
        steps: Rc<Cell<u64>>,
    }

    impl Job for Counter {
        fn status(&self) -> JobStatus {
            JobStatus {
                done: self.done,
                total: self.total,
                ..status(0, 0, 0)
            }
        }

        fn step(&mut self, _: &mut DeviceMapper, _: &dyn Fn() -> u64) -> JobStep {
            self.steps.set(self.steps.get() + 1);
            if self.cancelled {
                return JobStep::Finished(vec![format!("a: copy cancelled at {}", self.done)]);
            }
            self.done += 1;
            if self.done == self.total {
                return JobStep::Finished(vec!["a: copied".into()]);
            }
            JobStep::Running
        }

        fn cancel(&mut self, _: &mut DeviceMapper) -> Result<(), Error> {
            self.cancelled = true;
            Ok(())
        }
    }

    fn counter(total: u64, steps: &Rc<Cell<u64>>) -> Box<Counter> {
        Box::new(Counter {
            done: 0,
            total,
            cancelled: false,
            steps: Rc::clone(steps),
        })
    }

    #[test]
    fn a_job_runs_one_step_per_tick_until_it_finishes() {
        let mut dm = DeviceMapper::new(Vec::new());
        let steps = Rc::new(Cell::new(0));
        dm.start_job(counter(3, &steps)).unwrap();
        assert_eq!(
            dm.start_job(counter(3, &steps)),
            Err("a job copy/a is running already (see jobs)".into())
        );
        let clock = || 0;
        assert!(dm.tick(&clock).is_empty());
        assert_eq!(dm.jobs(), vec![status(1, 3, 0)]);
        assert!(dm.tick(&clock).is_empty());
        assert_eq!(dm.tick(&clock), vec![String::from("a: copied")]);
        assert_eq!(steps.get(), 3);
        assert!(dm.jobs().is_empty());
        assert!(dm.tick(&clock).is_empty());
        assert_eq!(steps.get(), 3);
    }

    #[test]
    fn a_cancelled_job_stops_at_its_next_step() {
        let mut dm = DeviceMapper::new(Vec::new());
        let steps = Rc::new(Cell::new(0));
        dm.start_job(counter(10, &steps)).unwrap();
        let clock = || 0;
        dm.tick(&clock);
        assert_eq!(
            dm.cancel_job("copy/b"),
            Err("no background job copy/b (jobs lists them)".into())
        );
        dm.cancel_job("copy/a").unwrap();
        assert_eq!(dm.jobs(), vec![status(1, 10, 0)]);
        assert_eq!(
            dm.tick(&clock),
            vec![String::from("a: copy cancelled at 1")]
        );
        assert!(dm.jobs().is_empty());
    }
}
