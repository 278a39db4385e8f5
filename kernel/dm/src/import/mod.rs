//! Imports and syncs: thin volumes filled from another NBD server's export or from
//! a thin device of this appliance, as background [`Job`]s (`import/NAME`,
//! `sync/NAME`) advanced by [`DeviceMapper::tick`]. A server that allows several
//! connections is read over several (see [`remote`]).
//!
//! `thin import` creates the volume once the source's size is known and copies only
//! what the source reports as data (`base:allocation`), so the copy stays thin. The
//! import's source and checkpoint are saved in the configuration at every window
//! (see [`copy`]), so `thin import --resume` continues after a power cut or a
//! dropped connection. `thin sync` copies into an existing volume only what the
//! server reports changed since a base (`thinbox:changed:BASE`), zeroing (unmapping)
//! the changed ranges that read as zeroes.

mod copy;
mod record;
mod remote;
mod source;

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use nbd::client::{NbdUri, Stream};

pub use record::ImportRecord;

use crate::Error;
use crate::device::State;
use crate::jobs::{Job, JobStatus, JobStep};
use crate::mapper::DeviceMapper;
use crate::table::{Target, bare_name};
use crate::units::human_bytes;
use copy::{Copier, Step};
use remote::Remote;
use source::Source;

/// How long a server may take to finish the handshake.
const HANDSHAKE_NS: u64 = 10_000_000_000;
/// How long a copy may go without any answer before it is given up.
const STALL_NS: u64 = 30_000_000_000;

/// The `base:allocation` context every copy reads.
const ALLOCATION: &str = nbd::wire::BASE_ALLOCATION;

/// Opens a stream to an NBD server (the platform's TCP; the stream may still be
/// connecting when returned); the error is one line.
pub type Connector<'a> = dyn FnMut(&NbdUri) -> Result<Box<dyn Stream>, String> + 'a;

/// Where to copy from.
pub enum ImportFrom {
    /// An export of an NBD server, reached through `connect` (the first connection
    /// is opened when the copy starts; more if the server allows several).
    Remote {
        uri: NbdUri,
        connect: Box<Connector<'static>>,
    },
    /// A thin device of this appliance.
    Local(String),
}

impl ImportFrom {
    fn describe(&self) -> String {
        match self {
            ImportFrom::Remote { uri, .. } => uri.to_string(),
            ImportFrom::Local(device) => String::from(device),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    /// A new volume in this pool, of this many sectors if the operator said so.
    Import {
        pool: String,
        sectors: Option<u64>,
    },
    /// An import continued from its saved checkpoint.
    Resume {
        from: u64,
    },
    Sync {
        base: String,
    },
}

enum Phase {
    /// Waiting for the source to say how big it is.
    Connecting(Source),
    Copying(Box<Copier>),
}

struct ImportJob {
    name: String,
    source_text: String,
    kind: Kind,
    phase: Option<Phase>,
    started_ns: u64,
    last_moved_ns: u64,
    cancelled: bool,
}

/// What the device mapper keeps of imports and syncs besides the jobs themselves.
#[derive(Default)]
pub(crate) struct Imports {
    /// Imports saved in the configuration (unfinished).
    pub(crate) records: Vec<ImportRecord>,
    /// Devices whose job a console command follows: it takes the outcome (see
    /// [`DeviceMapper::import_outcome`]) instead of an event line.
    watched: Vec<String>,
    /// Finished followed jobs: name → summary or reason.
    outcomes: VecDeque<(String, Result<String, String>)>,
}

impl DeviceMapper {
    /// `thin import NAME POOL --from SOURCE [--size SIZE]`: starts copying `from`
    /// into a new thin volume `name` of `pool` (created once the source's size is
    /// known; `sectors`, if given, must match it).
    pub fn import(
        &mut self,
        name: &str,
        pool: &str,
        from: ImportFrom,
        sectors: Option<u64>,
        now_ns: u64,
    ) -> Result<(), Error> {
        self.check_new_name(name)?;
        self.refuse_second_job(name)?;
        self.pool(pool)?;
        // A saved import into a device that no longer exists cannot be resumed.
        self.imports.records.retain(|record| record.name != name);
        let kind = Kind::Import {
            pool: String::from(bare_name(pool)),
            sectors,
        };
        self.start_copy(name, from, kind, now_ns)
    }

    /// `thin import --resume NAME`: continues a saved import from its checkpoint;
    /// `connect` opens streams to the saved server (not called for local sources).
    pub fn import_resume(
        &mut self,
        name: &str,
        connect: Box<Connector<'static>>,
        now_ns: u64,
    ) -> Result<(), Error> {
        self.refuse_second_job(name)?;
        let record = self
            .imports
            .records
            .iter()
            .find(|record| record.name == bare_name(name))
            .cloned()
            .ok_or_else(|| format!("no unfinished import into {name} is saved"))?;
        let from = match NbdUri::parse(&record.source) {
            Ok(uri) => ImportFrom::Remote { uri, connect },
            Err(_) => ImportFrom::Local(record.source.clone()),
        };
        let kind = Kind::Resume {
            from: record.checkpoint,
        };
        self.start_copy(&record.name, from, kind, now_ns)
    }

    /// `thin sync NAME --from nbd://… --changed-since BASE`: copies into the thin
    /// volume `name` what the server reports changed since `base`.
    pub fn sync(
        &mut self,
        name: &str,
        uri: NbdUri,
        connect: Box<Connector<'static>>,
        base: &str,
        now_ns: u64,
    ) -> Result<(), Error> {
        self.refuse_second_job(name)?;
        self.thin_destination(name)?;
        let kind = Kind::Sync {
            base: String::from(base),
        };
        self.start_copy(name, ImportFrom::Remote { uri, connect }, kind, now_ns)
    }

    /// The outcome of the watched job into `name`, once it has finished: a summary
    /// line or the reason it failed.
    pub fn import_outcome(&mut self, name: &str) -> Option<Result<String, String>> {
        let index = self
            .imports
            .outcomes
            .iter()
            .position(|(job, _)| job == name)?;
        self.imports
            .outcomes
            .remove(index)
            .map(|(_, outcome)| outcome)
    }

    /// Unfinished imports as the configuration saves them (`config show` lists them).
    pub fn saved_imports(&self) -> &[ImportRecord] {
        &self.imports.records
    }

    /// One line per unfinished import in the configuration, for the boot. Imports
    /// are not resumed by themselves: at activation the network has no address yet,
    /// and the server may serve another image by now (resuming would then mix two
    /// images into one volume), so the operator says when.
    pub(crate) fn unfinished_imports(&self) -> Vec<String> {
        self.imports
            .records
            .iter()
            .map(|record| {
                let size = self.find(&record.name).map_or(String::new(), |device| {
                    format!(" of {}", human_bytes(device.table.length() * 512))
                });
                format!(
                    "config: the import into {} from {} stopped after {}{size}; \
                     thin import --resume {} continues it",
                    record.name,
                    record.source,
                    human_bytes(record.checkpoint),
                    record.name
                )
            })
            .collect()
    }

    /// Stops following the job into `name`: its outcome becomes an event line.
    pub fn detach_import(&mut self, name: &str) {
        self.imports.watched.retain(|watched| watched != name);
    }

    /// The `jobs` id of the import or sync into `name`, if one runs.
    pub fn import_job_id(&self, name: &str) -> Option<String> {
        let ids = [format!("import/{name}"), format!("sync/{name}")];
        self.jobs()
            .into_iter()
            .map(|status| status.id)
            .find(|id| ids.contains(id))
    }

    fn refuse_second_job(&self, name: &str) -> Result<(), Error> {
        if self.import_job_id(bare_name(name)).is_some() {
            return Err(
                format!("an import or sync into {name} is running already (see jobs)").into(),
            );
        }
        Ok(())
    }

    fn start_copy(
        &mut self,
        name: &str,
        from: ImportFrom,
        kind: Kind,
        now_ns: u64,
    ) -> Result<(), Error> {
        let source_text = from.describe();
        let source = match from {
            ImportFrom::Remote { uri, connect } => {
                let contexts: &[&str] = match &kind {
                    Kind::Sync { base } => &[ALLOCATION, &format!("thinbox:changed:{base}")],
                    _ => &[ALLOCATION],
                };
                Source::Remote(Box::new(Remote::new(uri, contexts, connect)?))
            }
            ImportFrom::Local(device) => self.local_source(&device, name)?,
        };
        let mut job = ImportJob {
            name: String::from(bare_name(name)),
            source_text,
            kind,
            phase: Some(Phase::Connecting(source)),
            started_ns: now_ns,
            last_moved_ns: now_ns,
            cancelled: false,
        };
        // A local source knows its size at once: refuse a bad copy now, not later.
        if matches!(job.phase, Some(Phase::Connecting(Source::Local { .. }))) {
            self.step_job(&mut job, now_ns).map_err(Error)?;
        }
        self.imports.watched.push(job.name.clone());
        self.start_job(Box::new(job))
    }

    fn local_source(&self, device: &str, name: &str) -> Result<Source, Error> {
        let source = self.device(device)?;
        let Target::Thin(thin) = source.table.target() else {
            return Err(format!(
                "{} is a {} device; imports copy thin devices or NBD exports",
                source.name,
                source.table.kind()
            )
            .into());
        };
        if source.name == bare_name(name) {
            return Err("a device cannot be copied onto itself".into());
        }
        let volume = self.thin_volume(thin, source.table.length())?;
        Ok(Source::Local {
            volume,
            answers: VecDeque::new(),
            next_tag: 0,
        })
    }

    /// The thin volume `name` as a destination, checked to be running.
    fn thin_destination(&self, name: &str) -> Result<(thin_pool::ThinVolume, u64), Error> {
        let device = self.device(name)?;
        let Target::Thin(thin) = device.table.target() else {
            return Err(format!(
                "{} is a {} device; only thin devices are imported into",
                device.name,
                device.table.kind()
            )
            .into());
        };
        match &device.state {
            State::Active(active) if active.suspended => {
                Err(format!("{} is suspended (resume it first)", device.name).into())
            }
            State::Active(_) => {
                let sectors = device.table.length();
                Ok((self.thin_volume(thin, sectors)?, sectors))
            }
            State::Inactive(why) => Err(format!("{} is inactive ({why})", device.name).into()),
        }
    }

    /// One step of `job`: `Some(summary)` once it has finished.
    fn step_job(&mut self, job: &mut ImportJob, now_ns: u64) -> Result<Option<String>, String> {
        match job.phase.take() {
            Some(Phase::Connecting(mut source)) => {
                source.poll(0)?;
                if source.size().is_none() {
                    if now_ns.saturating_sub(job.started_ns) > HANDSHAKE_NS {
                        return Err(format!(
                            "no NBD handshake from {} within {} s",
                            job.source_text,
                            HANDSHAKE_NS / 1_000_000_000
                        ));
                    }
                    job.phase = Some(Phase::Connecting(source));
                    return Ok(None);
                }
                let copier = self.begin_copy(job, source)?;
                job.last_moved_ns = now_ns;
                job.phase = Some(Phase::Copying(Box::new(copier)));
                Ok(None)
            }
            Some(Phase::Copying(mut copier)) => {
                let step = copier.step()?;
                if step != Step::Idle {
                    job.last_moved_ns = now_ns;
                } else if now_ns.saturating_sub(job.last_moved_ns) > STALL_NS {
                    return Err(format!(
                        "{} stopped answering for {} s",
                        job.source_text,
                        STALL_NS / 1_000_000_000
                    ));
                }
                match step {
                    Step::Checkpoint(offset) => self.save_checkpoint(job, offset)?,
                    Step::Finished => return self.finish(job, &copier, now_ns).map(Some),
                    Step::Idle | Step::Busy => {}
                }
                job.phase = Some(Phase::Copying(copier));
                Ok(None)
            }
            None => Err(String::from("the job lost its state")),
        }
    }

    /// The source's size is known: checks it against the destination (creating the
    /// volume of an import) and starts copying.
    fn begin_copy(&mut self, job: &mut ImportJob, mut source: Source) -> Result<Copier, String> {
        let size = source.size().unwrap_or(0);
        let sectors = size.div_ceil(blockdev::SECTOR_SIZE as u64);
        let contexts = match &source {
            Source::Remote(remote) => {
                let export = remote.export().expect("connected");
                match (&job.kind, export.contexts.as_slice()) {
                    (Kind::Sync { base }, [_, false]) | (Kind::Sync { base }, [false, _]) => {
                        return Err(format!(
                            "{} offers no metadata context thinbox:changed:{base} together \
                             with base:allocation (is {base} a thin device of the same pool?)",
                            job.source_text
                        ));
                    }
                    (_, [true, ..]) => export.contexts.len(),
                    _ => 0,
                }
            }
            Source::Local { .. } => 1,
        };
        if size == 0 {
            return Err(format!("{} is empty", job.source_text));
        }
        let (dest, from, zero_changed) = match job.kind.clone() {
            Kind::Import {
                pool,
                sectors: asked,
            } => {
                if let Some(asked) = asked.filter(|&asked| asked != sectors) {
                    return Err(format!(
                        "{} holds {} ({size} bytes) but --size says {}",
                        job.source_text,
                        human_bytes(size),
                        human_bytes(asked * 512)
                    ));
                }
                self.imports.records.push(ImportRecord {
                    name: job.name.clone(),
                    source: job.source_text.clone(),
                    checkpoint: 0,
                });
                if let Err(error) = self.new_thin(&job.name, &pool, sectors, None, None) {
                    self.imports
                        .records
                        .retain(|record| record.name != job.name);
                    return Err(error.0);
                }
                let (dest, _) = self.thin_destination(&job.name).map_err(|error| error.0)?;
                (dest, 0, false)
            }
            Kind::Resume { from } => {
                let (dest, have) = self.thin_destination(&job.name).map_err(|error| error.0)?;
                check_size(&job.source_text, size, have)?;
                (dest, from.min(size), false)
            }
            Kind::Sync { .. } => {
                let (dest, have) = self.thin_destination(&job.name).map_err(|error| error.0)?;
                check_size(&job.source_text, size, have)?;
                (dest, 0, true)
            }
        };
        if let Source::Remote(remote) = &mut source {
            remote.widen();
        }
        Ok(Copier::new(
            source,
            dest,
            size,
            contexts,
            zero_changed,
            from,
        ))
    }

    fn save_checkpoint(&mut self, job: &ImportJob, offset: u64) -> Result<(), String> {
        if matches!(job.kind, Kind::Sync { .. }) {
            return Ok(());
        }
        let Some(record) = self
            .imports
            .records
            .iter_mut()
            .find(|record| record.name == job.name)
        else {
            return Err(String::from("its saved record is gone"));
        };
        record.checkpoint = offset;
        self.save().map_err(|error| error.0)
    }

    fn finish(&mut self, job: &ImportJob, copier: &Copier, now_ns: u64) -> Result<String, String> {
        self.imports
            .records
            .retain(|record| record.name != job.name);
        self.save().map_err(|error| error.0)?;
        let seconds = now_ns.saturating_sub(job.started_ns).max(1);
        let rate = u128::from(copier.written) * 1_000_000_000 / u128::from(seconds);
        let verb = match job.kind {
            Kind::Sync { .. } => "synced",
            _ => "imported",
        };
        Ok(format!(
            "{}: {verb} {} from {} in {}.{:03} s: {} copied ({}/s)",
            job.name,
            human_bytes(copier.size()),
            job.source_text,
            seconds / 1_000_000_000,
            seconds % 1_000_000_000 / 1_000_000,
            human_bytes(copier.written),
            human_bytes(rate as u64)
        ))
    }

    /// The reason a job stopped, with what the operator can do about it.
    fn job_stopped(&self, job: &ImportJob, why: &str) -> String {
        let resumable = self
            .imports
            .records
            .iter()
            .any(|record| record.name == job.name);
        if resumable {
            format!(
                "import from {} stopped: {why}; thin import --resume {} continues it",
                job.source_text, job.name
            )
        } else {
            match &job.kind {
                Kind::Sync { .. } => format!("sync from {} failed: {why}", job.source_text),
                _ => format!("import from {} failed: {why}", job.source_text),
            }
        }
    }
}

impl Job for ImportJob {
    fn status(&self) -> JobStatus {
        let (done, total) = match &self.phase {
            Some(Phase::Copying(copier)) => (copier.done(), copier.size()),
            _ => (0, 0),
        };
        let (prefix, what) = match &self.kind {
            Kind::Sync { base } => (
                "sync",
                format!("sync from {} changed since {base}", self.source_text),
            ),
            _ => ("import", format!("import from {}", self.source_text)),
        };
        JobStatus {
            id: format!("{prefix}/{}", self.name),
            device: self.name.clone(),
            what,
            done,
            total,
            unit: "bytes",
            started_ns: self.started_ns,
            cancellable: true,
        }
    }

    fn step(&mut self, dm: &mut DeviceMapper, clock: &dyn Fn() -> u64) -> JobStep {
        let outcome = if self.cancelled {
            Err(dm.job_stopped(self, "cancelled"))
        } else {
            match dm.step_job(self, clock()) {
                Ok(None) => return JobStep::Running,
                Ok(Some(summary)) => Ok(summary),
                Err(why) => Err(dm.job_stopped(self, &why)),
            }
        };
        let watched = &mut dm.imports.watched;
        if let Some(index) = watched.iter().position(|name| *name == self.name) {
            watched.remove(index);
            dm.imports.outcomes.push_back((self.name.clone(), outcome));
            return JobStep::Finished(Vec::new());
        }
        JobStep::Finished(alloc::vec![match outcome {
            Ok(summary) => summary,
            Err(why) => format!("{}: {why}", self.name),
        }])
    }

    fn cancel(&mut self, _dm: &mut DeviceMapper) -> Result<(), Error> {
        self.cancelled = true;
        Ok(())
    }
}

fn check_size(source: &str, size: u64, sectors: u64) -> Result<(), String> {
    if size.div_ceil(512) != sectors {
        return Err(format!(
            "{source} holds {size} bytes but the volume {} ({} sectors); sizes must match",
            human_bytes(sectors * 512),
            sectors
        ));
    }
    Ok(())
}
