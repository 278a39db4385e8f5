//! `thin import` and `thin sync`: the appliance as an NBD client (or copying a local
//! thin device), as background work of the device mapper that the command follows
//! with a progress line every second (Ctrl-C detaches; `--background` returns at
//! once; `jobs` lists it).

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use core::cell::RefCell;
use core::fmt::Write;

use dm::{DeviceMapper, ImportFrom, bare_name};
use nbd::client::NbdUri;

use crate::background::describe;
use crate::job::{Context, Job, Progress};
use crate::pool_commands::{Options, parse_size};
use crate::{CommandError, Console, Platform, outln};

/// At most this long between progress lines.
const PROGRESS_NS: u64 = 1_000_000_000;

const IMPORT_USAGE: &str = "usage: thin import NAME POOL --from nbd://HOST[:PORT]/EXPORT|DEVICE \
                            [--size SIZE] [--background] | thin import --resume NAME \
                            [--background]";
const SYNC_USAGE: &str =
    "usage: thin sync NAME --from nbd://HOST[:PORT]/EXPORT --changed-since BASE [--background]";

impl<P: Platform> Console<P> {
    /// `thin import ...`.
    pub(crate) fn thin_import(
        &mut self,
        args: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        let options = Options::parse(
            args,
            &["--from", "--size", "--resume"],
            &["--background"],
            IMPORT_USAGE,
        )?;
        let now = self.platform.now_ns();
        let name = if let Some(name) = options.value("--resume") {
            if !options.positional.is_empty() || options.value("--from").is_some() {
                return Err(IMPORT_USAGE.into());
            }
            let connect = self.platform.connector();
            self.dm
                .borrow_mut()
                .import_resume(name, connect, now)
                .map_err(|error| format!("thin import: {}", error.0))?;
            name
        } else {
            let [name, pool] = options.positional.as_slice() else {
                return Err(
                    format!("thin import: name and pool are needed ({IMPORT_USAGE})").into(),
                );
            };
            let Some(from) = options.value("--from") else {
                return Err(
                    format!("thin import: copy from where? give --from ({IMPORT_USAGE})").into(),
                );
            };
            let sectors = options.value("--size").map(parse_size).transpose()?;
            // Refuse a taken name before connecting anywhere.
            self.dm.borrow().check_new_name(name)?;
            let from = self.source(from)?;
            self.dm
                .borrow_mut()
                .import(name, bare_name(pool), from, sectors, now)
                .map_err(|error| format!("thin import: {}", error.0))?;
            name
        };
        self.follow(bare_name(name), options.flag("--background"), out);
        Ok(())
    }

    /// `thin sync NAME --from nbd://... --changed-since BASE`.
    pub(crate) fn thin_sync(
        &mut self,
        args: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        let options = Options::parse(
            args,
            &["--from", "--changed-since"],
            &["--background"],
            SYNC_USAGE,
        )?;
        let ([name], Some(from), Some(base)) = (
            options.positional.as_slice(),
            options.value("--from"),
            options.value("--changed-since"),
        ) else {
            return Err(SYNC_USAGE.into());
        };
        let uri = NbdUri::parse(from).map_err(|why| format!("thin sync: {why}"))?;
        let connect = self.platform.connector();
        let now = self.platform.now_ns();
        self.dm
            .borrow_mut()
            .sync(bare_name(name), uri, connect, base, now)
            .map_err(|error| format!("thin sync: {}", error.0))?;
        self.follow(bare_name(name), options.flag("--background"), out);
        Ok(())
    }

    /// An `nbd://` address or a device name.
    fn source(&mut self, from: &str) -> Result<ImportFrom, CommandError> {
        if !from.contains("://") {
            return Ok(ImportFrom::Local(String::from(bare_name(from))));
        }
        let uri = NbdUri::parse(from).map_err(|why| format!("thin import: {why}"))?;
        let connect = self.platform.connector();
        Ok(ImportFrom::Remote { uri, connect })
    }

    fn follow(&mut self, name: &str, background: bool, out: &mut dyn Write) {
        if background {
            self.dm.borrow_mut().detach_import(name);
            outln!(out, "{name}: copying in the background (see jobs)");
            return;
        }
        self.job = Some(Box::new(CopyWatch {
            dm: Rc::clone(&self.dm),
            name: String::from(name),
            last_report_ns: None,
            detached: false,
        }));
    }
}

/// Follows one import or sync until it finishes.
struct CopyWatch {
    dm: Rc<RefCell<DeviceMapper>>,
    name: String,
    last_report_ns: Option<u64>,
    detached: bool,
}

impl Job for CopyWatch {
    fn step(&mut self, context: &mut Context<'_>, out: &mut dyn Write) -> Progress {
        let now_ns = (context.clock)();
        let mut dm = self.dm.borrow_mut();
        if let Some(outcome) = dm.import_outcome(&self.name) {
            return match outcome {
                Ok(summary) => {
                    outln!(out, "{summary}");
                    Progress::Finished(Ok(()))
                }
                Err(why) => Progress::Finished(Err(why.into())),
            };
        }
        let id = dm.import_job_id(&self.name);
        let Some(status) = dm
            .jobs()
            .into_iter()
            .find(|status| Some(&status.id) == id.as_ref())
        else {
            return Progress::Finished(Err(format!("{}: the copy vanished", self.name).into()));
        };
        if self.detached {
            dm.detach_import(&self.name);
            outln!(
                out,
                "{}: detached; the copy goes on in the background (jobs shows it as {})",
                self.name,
                status.id
            );
            return Progress::Finished(Ok(()));
        }
        if self
            .last_report_ns
            .is_none_or(|last| now_ns.saturating_sub(last) >= PROGRESS_NS)
        {
            self.last_report_ns = Some(now_ns);
            let progress = if status.total == 0 {
                String::from("connecting")
            } else {
                describe(&status, now_ns)
            };
            outln!(out, "{}: {}: {progress}", self.name, status.what);
        }
        Progress::Running
    }

    fn cancel(&mut self) {
        self.detached = true;
    }
}
