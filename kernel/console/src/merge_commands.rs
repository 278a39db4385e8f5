//! `snap merge` — a snapshot's content goes back into the device it was taken of —
//! dispatched on the snapshot's kind; thin snapshots merge by metadata alone. And
//! `thin merge-origin`, which copies a thin device's blocks into its external origin
//! in the background.

use alloc::string::String;
use core::fmt::Write;

use dm::{Target, bare_name};

use crate::pool_commands::Options;
use crate::{CommandError, Console, Platform, outln};

const SNAP_MERGE_USAGE: &str = "usage: snap merge SNAPSHOT [--into THIN_DEVICE]";

impl<P: Platform> Console<P> {
    /// `snap merge SNAPSHOT [--into DEVICE]`.
    pub(crate) fn snap_merge(
        &mut self,
        args: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        let (name, into) = match args {
            [name] => (bare_name(name), None),
            [name, flag, into] if flag == "--into" => (bare_name(name), Some(bare_name(into))),
            _ => return Err(SNAP_MERGE_USAGE.into()),
        };
        let kind = {
            let dm = self.dm.borrow();
            let device = dm.device(name)?;
            match device.table().target() {
                Target::Thin(_) => None,
                _ => Some(device.table().kind()),
            }
        };
        if let Some(kind) = kind {
            return Err(
                alloc::format!("snap merge: {name} is a {kind} device, not a snapshot").into(),
            );
        }
        self.thin_snap_merge(name, into, out)
    }

    /// `thin merge-origin NAME [--background]`: followed with progress lines until
    /// NAME maps nothing (Ctrl-C detaches) unless `--background`.
    pub(crate) fn thin_merge_origin(
        &mut self,
        args: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        const USAGE: &str = "usage: thin merge-origin NAME [--background]";
        let options = Options::parse(args, &[], &["--background"], USAGE)?;
        let [name] = options.positional.as_slice() else {
            return Err(USAGE.into());
        };
        let name = bare_name(name);
        let origin = self.dm.borrow_mut().thin_merge_origin(name)?;
        outln!(
            out,
            "{name}: merging its blocks into {origin}; it keeps serving I/O"
        );
        self.follow_job(
            name,
            &dm::origin_merge_job_id(name),
            options.flag("--background"),
            "merging in the background",
            &alloc::format!("merged into {origin}; it maps nothing now"),
            out,
        );
        Ok(())
    }

    fn thin_snap_merge(
        &mut self,
        name: &str,
        into: Option<&str>,
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        let merged = self.dm.borrow_mut().thin_merge(name, into)?;
        outln!(
            out,
            "{name}: merged into {} (thin device {} of {} now has {name}'s content); {name} is removed",
            merged.target,
            merged.target_id,
            merged.pool
        );
        if merged.releasing {
            outln!(
                out,
                "{}: releasing the blocks of {}'s old content in the background (jobs shows it as {})",
                merged.pool,
                merged.target,
                dm::merge_release_job_id(&merged.pool, merged.target_id)
            );
        }
        if let Some(warning) = merged.warning {
            outln!(out, "warning: {warning}");
        }
        Ok(())
    }
}
