//! Work the pools do in the background, for the operator: `jobs` lists it, and
//! `thin delete` follows its own delete with a progress line every second until the
//! blocks are released (Ctrl-C detaches; the delete goes on).

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use core::cell::RefCell;
use core::fmt::Write;

use dm::{DeleteProgress, DeviceMapper};

use crate::job::{Context, Job, Progress};
use crate::{CommandError, outln};

/// At most this long between progress lines.
const PROGRESS_NS: u64 = 1_000_000_000;

/// The name `jobs` gives a pool's delete of thin device `dev`.
fn job_id(pool: &str, dev: u64) -> String {
    format!("{pool}/{dev}")
}

/// "34% (340000 of 1000000 mappings), 1.20 M mappings/s, about 2 s left" at time
/// `now_ns` of the pool's clock.
fn describe(progress: &DeleteProgress, now_ns: u64) -> String {
    let DeleteProgress {
        total,
        released,
        started_ns,
        ..
    } = *progress;
    let percent = released * 100 / total.max(1);
    let elapsed_ns = now_ns.saturating_sub(started_ns).max(1);
    let per_second = u128::from(released) * 1_000_000_000 / u128::from(elapsed_ns);
    let left = if per_second == 0 {
        String::from("time left unknown")
    } else {
        let seconds = u128::from(total - released).div_ceil(per_second);
        format!("about {seconds} s left")
    };
    format!(
        "{percent}% ({released} of {total} mappings), {}.{:02} M mappings/s, {left}",
        per_second / 1_000_000,
        per_second % 1_000_000 / 10_000
    )
}

/// `jobs`: the background work of every pool, one line each.
pub(crate) fn list(dm: &DeviceMapper, now_ns: u64, out: &mut dyn Write) {
    let deletes = dm.background_deletes();
    let copies = dm.imports();
    for copy in &copies {
        outln!(
            out,
            "{}  {}: {}",
            copy.id,
            copy.what,
            crate::import_commands::describe(copy, now_ns)
        );
    }
    if deletes.is_empty() && copies.is_empty() {
        outln!(out, "no background jobs");
        return;
    }
    for (pool, progress) in deletes {
        outln!(
            out,
            "{}  delete of thin device {}: releasing its blocks, {}",
            job_id(&pool, progress.dev),
            progress.dev,
            describe(&progress, now_ns)
        );
    }
}

/// `jobs cancel ID`: imports and syncs stop (an import stays resumable); a delete
/// cannot be cancelled (its device is gone already), which is said.
pub(crate) fn cancel(dm: &mut DeviceMapper, id: &str) -> Result<(), CommandError> {
    if let Some(copy) = dm.imports().into_iter().find(|copy| copy.id == id) {
        return Ok(dm.cancel_import(&copy.device)?);
    }
    let deleting = dm
        .background_deletes()
        .into_iter()
        .any(|(pool, progress)| job_id(&pool, progress.dev) == id);
    if deleting {
        return Err(format!(
            "{id} cannot be cancelled: the thin device is deleted already and only its blocks \
             are left to release; it finishes on its own"
        )
        .into());
    }
    Err(format!("no background job {id} (jobs lists them)").into())
}

/// Follows one pool's delete of one thin device until its blocks are released.
pub(crate) struct DeleteWatch {
    dm: Rc<RefCell<DeviceMapper>>,
    name: String,
    pool: String,
    dev: u64,
    last_report_ns: Option<u64>,
    detached: bool,
}

impl DeleteWatch {
    pub(crate) fn new(dm: Rc<RefCell<DeviceMapper>>, name: &str, pool: &str, dev: u64) -> Self {
        DeleteWatch {
            dm,
            name: String::from(name),
            pool: String::from(pool),
            dev,
            last_report_ns: None,
            detached: false,
        }
    }
}

impl Job for DeleteWatch {
    fn step(&mut self, context: &mut Context<'_>, out: &mut dyn Write) -> Progress {
        let now_ns = (context.clock)();
        let progress = self
            .dm
            .borrow()
            .background_deletes()
            .into_iter()
            .find(|(pool, progress)| *pool == self.pool && progress.dev == self.dev);
        let Some((_, progress)) = progress else {
            outln!(
                out,
                "{}: thin device {} deleted, all its blocks released",
                self.name,
                self.dev
            );
            return Progress::Finished(Ok(()));
        };
        if self.detached {
            outln!(
                out,
                "{}: detached; {} goes on releasing the blocks in the background (jobs shows it as {})",
                self.name,
                self.pool,
                job_id(&self.pool, self.dev)
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
                "{}: releasing blocks: {}",
                self.name,
                describe(&progress, now_ns)
            );
        }
        Progress::Running
    }

    fn cancel(&mut self) {
        self.detached = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_described_with_rate_and_time_left() {
        let progress = DeleteProgress {
            dev: 5,
            total: 1_000_000,
            released: 250_000,
            started_ns: 1_000_000_000,
        };
        assert_eq!(
            describe(&progress, 1_500_000_000),
            "25% (250000 of 1000000 mappings), 0.50 M mappings/s, about 2 s left"
        );
        let fresh = DeleteProgress {
            released: 0,
            ..progress
        };
        assert_eq!(
            describe(&fresh, 1_000_000_000),
            "0% (0 of 1000000 mappings), 0.00 M mappings/s, time left unknown"
        );
    }
}
