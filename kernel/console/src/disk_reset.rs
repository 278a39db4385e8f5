//! `disk-reset DISK`: resets a disk's device on a live appliance (like Linux's
//! `nvme reset`), to recover a wedged device or to exercise the driver's reset
//! path. The device mapper does the work ([`dm::DeviceMapper::reset_disk`]); this
//! parses the command and says what happened.

use alloc::format;
use alloc::string::String;
use core::fmt::Write;

use crate::units::seconds;
use crate::{CommandError, Console, Platform, outln};

/// How long the reset waits for the requests on the disk to finish.
const DRAIN_NS: u64 = 5_000_000_000;

impl<P: Platform> Console<P> {
    pub(crate) fn disk_reset(
        &mut self,
        args: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        let [name] = args else {
            return Err("usage: disk-reset DISK".into());
        };
        let platform = &self.platform;
        let deadline = platform.now_ns() + DRAIN_NS;
        let reset = self
            .dm
            .borrow_mut()
            .reset_disk(name, &mut || platform.now_ns() < deadline)
            .map_err(|why| format!("disk-reset: {why}"))?;
        let requests = |count: usize| {
            let plural = if count == 1 { "" } else { "s" };
            format!("{count} request{plural}")
        };
        let before = match (reset.failed, reset.flush) {
            (0, Some(Ok(()))) => format!(
                "{} in flight finished and the disk was flushed first",
                requests(reset.in_flight)
            ),
            (0, Some(Err(error))) => format!("the flush before it failed ({error})"),
            (failed, _) => format!(
                "{} did not finish within {} and failed",
                requests(failed),
                seconds(DRAIN_NS)
            ),
        };
        let plural = if reset.resets == 1 { "" } else { "s" };
        outln!(
            out,
            "{}: reset ({before}); {} reset{plural} so far",
            reset.name,
            reset.resets
        );
        Ok(())
    }
}
