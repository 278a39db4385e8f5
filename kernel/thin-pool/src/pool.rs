//! The public face of the engine: [`Pool`] for management, [`ThinVolume`] for I/O.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;

use blockdev::{BlockDevice, Busy, Command, Completion, DeviceInfo, Request};
use persistent_data::Error as MdError;
use persistent_data::thin::{FormatPolicy, OpenOptions, ThinMetadata};

use crate::config::{MAX_DATA_BLOCK_SIZE, MIN_DATA_BLOCK_SIZE, PoolConfig, valid_block_size};
use crate::engine::{Core, DeleteProgress, DiscardProgress, OriginMergeProgress, VolId};
use crate::io::{QueueFull, ThinCompletion, ThinOp, ThinOutput, ThinRequest};
use crate::message::{Errno, Message, MessageError};
use crate::status::{PoolEvent, PoolMode, PoolStatus, ThinStatus, ThinUsage};

/// Requests a thin volume accepts before its queue reports full.
const VOLUME_QUEUE_DEPTH: u16 = 256;

/// Why a pool could not be opened or a volume activated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolError(pub String);

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<MessageError> for PoolError {
    fn from(error: MessageError) -> Self {
        PoolError(error.text)
    }
}

/// What opening a pool did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The metadata device was blank and has been formatted.
    pub formatted: bool,
    /// The data space grew to the pool length (from this many blocks).
    pub grown_from: Option<u64>,
    /// The metadata grew to a larger metadata device (from this many blocks).
    pub metadata_grown_from: Option<u64>,
    /// Things the operator should know (also queued as events).
    pub warnings: Vec<String>,
}

/// A thin pool: a metadata device and a data device, and the thin devices in them.
///
/// One thread of control drives everything: management calls here, I/O through
/// [`ThinVolume`]s, and [`Pool::service`] with the current time for timer work.
/// Dropping a pool without [`Pool::close`] is like a power cut: the metadata stays at
/// its last commit.
pub struct Pool {
    pub(crate) core: Rc<RefCell<Core>>,
}

impl Pool {
    /// Opens a pool: formats a blank metadata device (all-zero first block), opens
    /// an existing one (never reformatting it; its data block size must match) and
    /// grows the data space when `config.length` is larger than before.
    pub fn open(
        metadata: Box<dyn BlockDevice>,
        data: Box<dyn BlockDevice>,
        config: PoolConfig,
    ) -> Result<(Pool, OpenReport), PoolError> {
        check_open(&config, data.as_ref())?;
        let options = OpenOptions {
            data_block_size: config.data_block_size,
            cache_blocks: config.cache_blocks,
            format: if config.features.read_only {
                FormatPolicy::Never
            } else {
                FormatPolicy::IfBlank
            },
        };
        let (md, opened) = ThinMetadata::open(metadata, &options).map_err(open_error)?;
        Pool::assemble(md, &opened, data, config)
    }

    /// The pool over opened (or just formatted) metadata: grows the metadata onto a
    /// larger device and the data space to the pool length, and resumes deletes.
    pub(crate) fn assemble(
        mut md: ThinMetadata,
        opened: &persistent_data::OpenReport,
        data: Box<dyn BlockDevice>,
        config: PoolConfig,
    ) -> Result<(Pool, OpenReport), PoolError> {
        let blocks = config.data_blocks();
        let read_only = config.features.read_only;
        let mut report = OpenReport {
            formatted: opened.formatted,
            ..OpenReport::default()
        };
        let current = md.data_nr_blocks();
        if blocks < current {
            return Err(PoolError(format!(
                "pool target ({blocks} blocks) too small: expected {current}"
            )));
        }
        let needs_check = md.needs_check();
        let mut grew_metadata = None;
        if !read_only && !needs_check {
            // A larger metadata device (table reload) is taken into use here.
            let before = md.metadata_nr_blocks();
            let grown = md
                .resize_metadata()
                .and_then(|after| md.commit().map(|()| after))
                .map_err(|error| PoolError(format!("growing the metadata failed: {error}")))?;
            if grown > before {
                grew_metadata = Some(before);
            }
        }
        report.metadata_grown_from = grew_metadata;
        let usable = opened
            .device_blocks
            .min(persistent_data::space_map::MAX_METADATA_BLOCKS);
        if (read_only || needs_check) && usable > md.metadata_nr_blocks() {
            report.warnings.push(format!(
                "the metadata device has room for {usable} blocks but the metadata stays at {} while the pool is {}",
                md.metadata_nr_blocks(),
                if needs_check { "marked needs_check" } else { "read_only" }
            ));
        }
        let mut core = Core::new(md, data, config);
        if let Some(warning) = opened.warning {
            let text = format!(
                "Metadata device is larger than {} sectors: excess space will not be used ({warning})",
                warning.used_sectors
            );
            report.warnings.push(text.clone());
            core.push_event(PoolEvent::MetadataDeviceTooLarge(text));
        }
        core.check_metadata_space_at_open();
        core.resume_deletes()
            .map_err(|error| PoolError(format!("Error opening metadata: {error}")))?;
        if needs_check {
            let text = String::from(
                "metadata has needs_check set: the pool stays read-only until it is checked and repaired",
            );
            report.warnings.push(text.clone());
            core.push_event(PoolEvent::ModeChanged {
                mode: PoolMode::ReadOnly,
                reason: text,
            });
        }
        if blocks > current {
            if core.mode.metadata_writable() {
                core.grow_data(blocks)?;
                if !report.formatted {
                    report.grown_from = Some(current);
                }
            } else if !report.formatted {
                report.warnings.push(format!(
                    "the pool is read-only: data space stays at {current} blocks instead of {blocks}"
                ));
            }
        }
        Ok((
            Pool {
                core: Rc::new(RefCell::new(core)),
            },
            report,
        ))
    }

    /// Runs a pool message (`create_thin 1`, `create_snap 2 1`, `delete 1`,
    /// `set_transaction_id 0 1`, `reserve_metadata_snap`, `release_metadata_snap`).
    /// A successful message is committed before this returns; a failed one changed
    /// nothing.
    ///
    /// `create_snap` quiesces an active origin: it waits for the writes in flight on
    /// it, and the snapshot then holds exactly what reading the origin returns at
    /// that moment. Writes waiting for data space (`queue_if_no_space`) are not
    /// waited for, since only growing the pool or discarding can release them:
    /// they are ordered after the snapshot. Parts of them already done (blocks
    /// written in place) are in it, as reads show them; the parts still waiting
    /// are not, and when space comes they change the origin only.
    pub fn message(&self, text: &str) -> Result<(), MessageError> {
        let mut core = self.core.borrow_mut();
        // dm checks the mode before it looks at the message.
        core.require_writable_metadata()?;
        let message = Message::parse(text)?;
        core.message(message)
    }

    /// Merges thin snapshot `snap` into `origin`: the origin takes the snapshot's
    /// content (and keeps its id; an active volume of it stays active and reads the
    /// new content from the moment this returns) and `snap` is deleted, in one
    /// commit, so a power cut leaves either both devices as they were or the merged
    /// origin. No data is copied. The snapshot must not be active; the origin's
    /// requests in flight finish first. Blocks only the origin's old content used
    /// are released in the background when there are many (see [`Pool::deletes`]).
    /// `snap` need not be a snapshot of `origin`: any device of the pool may be
    /// merged into any other of the same size (the caller checks sizes).
    pub fn merge_snapshot(&self, snap: u64, origin: u64) -> Result<(), MessageError> {
        self.core.borrow_mut().merge_snapshot(snap, origin)
    }

    /// Grows the pool to `length` sectors (the data device must be that large).
    pub fn resize(&self, length: u64) -> Result<(), MessageError> {
        let mut core = self.core.borrow_mut();
        let bs = core.block_sectors();
        core.grow_data(length / bs)?;
        core.config.length = length;
        Ok(())
    }

    /// Says why the pool cannot take `config`'s block size and features while it
    /// runs, if it cannot (dm's errors); nothing changes.
    pub fn check_reconfigure(&self, config: &PoolConfig) -> Result<(), MessageError> {
        self.core.borrow().check_reconfigure(config)
    }

    /// Takes `config`'s low water mark and features (a reloaded table): read-only
    /// and write mode, queueing or failing writes when out of space, zeroing and
    /// discard passdown. Writes waiting for space fail once they cannot get it.
    pub fn reconfigure(&self, config: &PoolConfig) -> Result<(), MessageError> {
        self.core.borrow_mut().reconfigure(config)
    }

    /// Grows the pool to `length` sectors onto `data`, a larger data device that
    /// begins with the current one's sectors (what reloading the pool with an
    /// extended data device does). The current device's I/O in flight finishes
    /// first; writes waiting for space proceed once the space has grown.
    pub fn grow_onto(&self, data: Box<dyn BlockDevice>, length: u64) -> Result<(), MessageError> {
        let data_sectors = data.info().sectors;
        if length > data_sectors {
            return Err(MessageError::new(
                Errno::Einval,
                format!(
                    "data device ({data_sectors} sectors) is smaller than the pool length ({length} sectors)"
                ),
            ));
        }
        let mut core = self.core.borrow_mut();
        let bs = core.block_sectors();
        core.grow_data_onto(data, length / bs)?;
        core.config.length = length;
        Ok(())
    }

    /// Moves the metadata onto `metadata`, a larger device that begins with the
    /// current one's blocks, and grows the metadata space onto it (up to the
    /// format's 15.875 GiB). Returns the number of metadata blocks and, for a
    /// device larger than 16 GiB, the warning that the excess is unused.
    pub fn grow_metadata_onto(
        &self,
        metadata: Box<dyn BlockDevice>,
    ) -> Result<(u64, Option<String>), MessageError> {
        self.core.borrow_mut().grow_metadata_onto(metadata)
    }

    /// The pool status in dm's format (its [`fmt::Display`]). As dm does, the pool
    /// first commits when its metadata changed since the last commit, so the
    /// numbers are those of a commit (plus the blocks of writes still being
    /// provisioned) and no power cut can go back behind what status showed. A
    /// failed commit shows in the mode.
    pub fn status(&self) -> PoolStatus {
        let mut core = self.core.borrow_mut();
        core.commit_if_dirty();
        core.status()
    }

    /// The status without committing first (dm's `--noflush`): the counts include
    /// changes not committed yet, which a power cut would undo.
    pub fn status_noflush(&self) -> PoolStatus {
        self.core.borrow().status()
    }

    /// A thin device's status (`<mapped sectors> <highest mapped sector>`).
    pub fn thin_status(&self, dev: u64) -> Result<ThinStatus, MessageError> {
        self.core.borrow_mut().thin_status(dev)
    }

    /// Mapped / exclusive / shared blocks of every thin device (what `thin_ls`
    /// shows). Walks all mappings, so it costs time in proportion to them.
    pub fn usage(&self) -> Result<Vec<ThinUsage>, MessageError> {
        let mut core = self.core.borrow_mut();
        crate::usage::usage(&mut core.md)
            .map_err(|e| MessageError::new(Errno::Eio, format!("reading usage failed: {e}")))
    }

    /// Thin device ids in the pool (devices whose deletion is still releasing
    /// blocks are gone already, see [`Pool::deletes`]).
    pub fn devices(&self) -> Result<Vec<u64>, MessageError> {
        let mut devices =
            self.core.borrow_mut().md.devices().map_err(|e| {
                MessageError::new(Errno::Eio, format!("listing devices failed: {e}"))
            })?;
        devices.retain(|&dev| !ThinMetadata::is_reserved_id(dev));
        Ok(devices)
    }

    /// Deletes whose blocks are still being released in the background (one step
    /// per [`Pool::service`] call), oldest first.
    pub fn deletes(&self) -> Vec<DeleteProgress> {
        // Released views of what changed (reserved ids) are housekeeping, not deletes.
        let core = self.core.borrow();
        let deletes = core
            .deletes()
            .filter(|d| !ThinMetadata::is_reserved_id(d.dev));
        deletes.copied().collect()
    }

    /// Discards whose ranges are still being unmapped in steps (the poll takes one
    /// while the pool has nothing else to do, the timer one paced like a delete's
    /// while requests come in), oldest first.
    pub fn discards(&self) -> Vec<DiscardProgress> {
        self.core.borrow().discards()
    }

    /// Thin devices being merged into their external origins (see
    /// [`ThinVolume::start_origin_merge`]).
    pub fn origin_merges(&self) -> Vec<OriginMergeProgress> {
        self.core.borrow_mut().origin_merges()
    }

    /// The live metadata (`metadata_snap = false`) or the held metadata snapshot as
    /// `thin_dump` XML.
    pub fn dump_xml(
        &self,
        out: &mut dyn fmt::Write,
        metadata_snap: bool,
    ) -> Result<(), MessageError> {
        let mut core = self.core.borrow_mut();
        let result = if metadata_snap {
            core.md.dump_metadata_snap_xml(out)
        } else {
            core.md.dump_xml(out)
        };
        result.map_err(|e| MessageError::new(Errno::Eio, format!("dumping metadata failed: {e}")))
    }

    pub fn mode(&self) -> PoolMode {
        self.core.borrow().mode
    }

    pub fn config(&self) -> PoolConfig {
        self.core.borrow().config.clone()
    }

    /// The next event to report, oldest first.
    pub fn next_event(&self) -> Option<PoolEvent> {
        self.core.borrow_mut().next_event()
    }

    /// Activates thin device `dev` as a volume of `sectors` sectors, optionally over
    /// a read-only external origin (unprovisioned blocks read from it; it is never
    /// written).
    pub fn activate(
        &self,
        dev: u64,
        sectors: u64,
        origin: Option<Box<dyn BlockDevice>>,
    ) -> Result<ThinVolume, PoolError> {
        let mut core = self.core.borrow_mut();
        if core.mode == PoolMode::Fail {
            return Err(PoolError(String::from(
                "Couldn't open thin device, Pool is in fail mode",
            )));
        }
        if dev > persistent_data::thin::MAX_DEV_ID {
            return Err(PoolError(String::from("Invalid device id")));
        }
        match core.md.device_exists(dev) {
            Ok(true) => {}
            Ok(false) => {
                return Err(PoolError(format!(
                    "Couldn't open thin internal device: thin device {dev} does not exist"
                )));
            }
            Err(error) => {
                return Err(PoolError(format!(
                    "Couldn't open thin internal device: {error}"
                )));
            }
        }
        let discard = !core.config.features.ignore_discard;
        let vol = core.activate(dev, sectors, origin);
        let info = DeviceInfo {
            sectors,
            read_only: false,
            discard,
            max_transfer_sectors: u32::MAX,
            queue_depth: VOLUME_QUEUE_DEPTH,
            model: String::from("thin volume"),
            serial: dev.to_string(),
        };
        Ok(ThinVolume {
            core: Rc::clone(&self.core),
            vol,
            dev,
            info,
        })
    }

    /// Timer work at the time `clock` gives (monotonic nanoseconds): the periodic
    /// commit, the no-space timeout, the held-metadata-snapshot warning, a step of a
    /// background delete (timed with `clock`, so that while requests are in flight
    /// deleting takes at most a quarter of the time); then runs whatever I/O is ready.
    pub fn service(&self, clock: &dyn Fn() -> u64) {
        self.core.borrow_mut().service(clock);
    }

    /// Reaps device completions and advances I/O; returns whether anything happened.
    pub fn poll(&self) -> bool {
        self.core.borrow_mut().progress()
    }

    /// Commits now (data device flushed first).
    pub fn commit(&self) -> Result<(), MessageError> {
        let mut core = self.core.borrow_mut();
        if !core.mode.metadata_writable() {
            return Ok(());
        }
        core.commit_now()
    }

    /// Shuts the pool down cleanly: waits for I/O in flight, commits. Refused while
    /// volumes are active (the pool is handed back).
    pub fn close(self) -> Result<(), (Pool, PoolError)> {
        {
            let mut core = self.core.borrow_mut();
            if !core.volumes.is_empty() {
                drop(core);
                return Err((
                    self,
                    PoolError(String::from(
                        "the pool has active thin volumes; deactivate them first",
                    )),
                ));
            }
            core.drain_all();
            if core.mode.metadata_writable()
                && let Err(error) = core.commit_now()
            {
                drop(core);
                return Err((self, error.into()));
            }
        }
        Ok(())
    }
}

/// An active thin device: a [`BlockDevice`] of its own, plus the extra operations
/// of [`ThinOp`] (write-zeroes, block status, reads that report holes) through
/// [`ThinVolume::submit_op`] and [`ThinVolume::poll_op`]. Dropping it deactivates the
/// volume (requests still in flight finish; their completions are dropped).
pub struct ThinVolume {
    core: Rc<RefCell<Core>>,
    vol: VolId,
    dev: u64,
    info: DeviceInfo,
}

impl ThinVolume {
    /// The thin device id.
    pub fn dev_id(&self) -> u64 {
        self.dev
    }

    /// Grows or shrinks the volume to `sectors`: metadata-only, so it needs no data
    /// space, and the requests it holds — writes waiting for space too — go on.
    pub fn resize(&mut self, sectors: u64) {
        self.core.borrow_mut().resize_volume(self.vol, sectors);
        self.info.sectors = sectors;
    }

    /// Whether unprovisioned blocks read from an external origin.
    pub fn has_origin(&self) -> bool {
        self.core.borrow().has_origin(self.vol)
    }

    /// Starts merging this thin device into its external origin in the background
    /// (steps run from [`Pool::poll`] and [`Pool::service`]): every provisioned
    /// block is copied to `target` — the origin's sectors, writable — and then
    /// unmapped, until the device maps nothing; an event says when it is done.
    /// Requests go on meanwhile (a block being copied holds them back briefly).
    /// Refused when a mapped block ends past the origin's end. The merge state is
    /// the mappings themselves: after a power cut, starting again goes on.
    pub fn start_origin_merge(&mut self, target: Box<dyn BlockDevice>) -> Result<(), MessageError> {
        self.core.borrow_mut().start_origin_merge(self.vol, target)
    }

    /// Queues a request; refused only when the volume's queue is full.
    pub fn submit_op(&mut self, request: ThinRequest) -> Result<(), QueueFull> {
        let mut core = self.core.borrow_mut();
        if core.volume_in_flight(self.vol) >= usize::from(self.info.queue_depth) {
            return Err(QueueFull(request));
        }
        core.submit(self.vol, request);
        Ok(())
    }

    /// Whether no request of this thin device that changes data is in flight (parts
    /// of writes waiting for data space excepted): a `create_snap` of it then has
    /// nothing to wait for. Advancing the I/O is up to the caller's polls.
    pub fn writes_settled(&self) -> bool {
        self.core.borrow().writes_settled(self.dev)
    }

    /// Whether every request of this volume still in the engine waits for data
    /// space (queue_if_no_space): only growing the pool or discarding finishes them,
    /// so waiting for them to drain would wait for ever.
    pub fn only_waiting_for_space(&self) -> bool {
        self.core.borrow().volume_only_parked(self.vol)
    }

    /// One finished request, if any (advances the engine first).
    pub fn poll_op(&mut self) -> Option<ThinCompletion> {
        let mut core = self.core.borrow_mut();
        if let Some(done) = core.take_completion(self.vol) {
            return Some(done);
        }
        core.progress();
        core.take_completion(self.vol)
    }
}

impl BlockDevice for ThinVolume {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        let Request { tag, command } = request;
        let op = match command {
            Command::Read { sector, buf } => ThinOp::Read { sector, buf },
            Command::Write { sector, buf, fua } => ThinOp::Write { sector, buf, fua },
            Command::Flush => ThinOp::Flush,
            Command::Discard { sector, sectors } => ThinOp::Discard {
                sector,
                sectors,
                fua: false,
            },
        };
        self.submit_op(ThinRequest { tag, op })
            .map_err(|QueueFull(request)| {
                let command = match request.op {
                    ThinOp::Read { sector, buf } => Command::Read { sector, buf },
                    ThinOp::Write { sector, buf, fua } => Command::Write { sector, buf, fua },
                    ThinOp::Discard {
                        sector, sectors, ..
                    } => Command::Discard { sector, sectors },
                    _ => Command::Flush,
                };
                Busy(Request { tag, command })
            })
    }

    fn poll(&mut self) -> Option<Completion> {
        self.poll_op().map(|done| Completion {
            tag: done.tag,
            result: done.result.map(|_: ThinOutput| ()),
            buf: done.buf,
        })
    }

    fn in_flight(&self) -> usize {
        self.core.borrow().volume_in_flight(self.vol)
    }
}

impl Drop for ThinVolume {
    fn drop(&mut self) {
        self.core.borrow_mut().close_volume(self.vol);
    }
}

/// Checks a pool's parameters against its data device, as dm does before it reads
/// the metadata.
pub(crate) fn check_open(config: &PoolConfig, data: &dyn BlockDevice) -> Result<(), PoolError> {
    if !valid_block_size(config.data_block_size) {
        return Err(PoolError(format!(
            "Invalid block size {} (sectors: a multiple of {MIN_DATA_BLOCK_SIZE} from {MIN_DATA_BLOCK_SIZE} to {MAX_DATA_BLOCK_SIZE})",
            config.data_block_size
        )));
    }
    if config.data_blocks() == 0 {
        return Err(PoolError(format!(
            "pool length {} sectors is smaller than one data block ({} sectors)",
            config.length, config.data_block_size
        )));
    }
    let data_sectors = data.info().sectors;
    if config.length > data_sectors {
        return Err(PoolError(format!(
            "data device ({data_sectors} sectors) is smaller than the pool length ({} sectors)",
            config.length
        )));
    }
    Ok(())
}

/// Says why metadata could not be opened or formatted, as dm does.
pub(crate) fn open_error(error: MdError) -> PoolError {
    match error {
        MdError::Unformatted => PoolError(String::from(
            "metadata device is blank and the pool is read_only: it can only be formatted by a read-write load",
        )),
        MdError::DataBlockSizeMismatch { on_disk, requested } => PoolError(format!(
            "changing the data block size (from {on_disk} to {requested}) is not supported"
        )),
        other => PoolError(format!("Error opening metadata: {other}")),
    }
}
