//! The engine behind [`Pool`](crate::Pool) and [`ThinVolume`](crate::ThinVolume):
//! request splitting, the bio prison, provisioning, breaking sharing, discards,
//! commits and the pool modes.
//!
//! Everything runs in one thread of control. A request becomes one or more *spans*
//! (sector ranges of the request); a span is processed in one step against the
//! metadata (synchronous, cached) and issues asynchronous I/O to the data device or
//! the external origin. A span that touches a virtual block whose new mapping is
//! being prepared waits in that block's *cell* and is processed again when the
//! mapping is in place. Preparing a block (zeroing it, copying the old block or the
//! origin's block, then writing the new data) is a *prep*; its mapping is inserted
//! only when its I/O has completed.
//!
//! FLUSH and FUA: a FLUSH completes after the next commit cycle. A FUA request
//! completes after that cycle too when it depends on a mapping change the last
//! commit does not have (its own provisioning or unmapping, or one made earlier in
//! the transaction: [`Uncommitted`]); otherwise its data written with FUA is enough.
//! Requests waiting for a commit whose changes are rolled back fail with EIO.
//!
//! Commits: the data device is flushed first, then the metadata is committed. Mapping
//! inserts are held back while that flush is in flight, so every mapping a commit
//! makes durable points at data that was written before the flush. Blocks allocated
//! for preps still in flight are given back to the space map for the commit and
//! taken again right after it, so a crash never leaves them allocated but unmapped.
//!
//! Reuse safety: every data-device I/O marks its data blocks busy until it completes,
//! and discards sent down to the data device mark their range. The allocator never
//! hands out a busy block (it is set aside until the next commit instead), so a block
//! freed while a read, write or passdown discard of it is in flight cannot be
//! reallocated and overwritten under it.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::mem;

use blockdev::{BlockDevice, Busy, Command, Completion, IoBuf, IoError, Request, SECTOR_SIZE};
use hashbrown::{HashMap, HashSet};
use persistent_data::Error as MdError;
use persistent_data::thin::{Run, ThinMetadata};
use slab::Slab;

use crate::buffers::{BufferPool, Contents};
use crate::config::{COMMIT_PERIOD_NS, PoolConfig};
use crate::io::{NOT_FAST, ThinCompletion, ThinOp, ThinOutput, ThinRequest};
use crate::mapcache::{Cached, MappingCache};
use crate::message::{Errno, Message, MessageError};
use crate::status::{DiscardMode, PoolEvent, PoolMode, PoolStatus, ThinStatus};
use crate::uncommitted::Uncommitted;
use blockdev::{Extent, SectorRun};

/// Largest piece a prep copies or zeroes at once (1 MiB), bounding its memory.
const SEGMENT_SECTORS: u64 = 2048;
/// Segments of one prep in flight at once.
const PREP_WINDOW: u32 = 4;
/// Virtual blocks unmapped per metadata call while discarding.
const DISCARD_CHUNK_BLOCKS: u64 = 1 << 16;
/// Runs fetched per metadata range lookup.
const LOOKUP_RUNS: usize = 64;
/// Discards of at most this many blocks update the mapping cache block by block;
/// larger ones flush it.
const FORGET_ONE_BY_ONE: u64 = 64;

const EIO_READ_ONLY: IoError = IoError::Device("thin pool is read-only: no new blocks");
const EIO_NO_METADATA: IoError =
    IoError::Device("thin pool is out of metadata space: no new blocks");
const EIO_FAILED: IoError = IoError::Device("thin pool has failed");
const EIO_METADATA: IoError = IoError::Device("thin pool metadata operation failed");

pub(crate) type VolId = usize;
type ReqId = usize;
type PrepId = usize;

/// A device and the requests it refused while its queue was full.
pub(crate) struct Queue {
    pub device: alloc::boxed::Box<dyn BlockDevice>,
    backlog: VecDeque<Request>,
}

impl Queue {
    pub fn new(device: alloc::boxed::Box<dyn BlockDevice>) -> Self {
        Queue {
            device,
            backlog: VecDeque::new(),
        }
    }

    fn submit(&mut self, request: Request) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(request);
            return;
        }
        if let Err(Busy(request)) = self.device.submit(request) {
            self.backlog.push_back(request);
        }
    }

    fn pump(&mut self) -> bool {
        let mut moved = false;
        while let Some(request) = self.backlog.pop_front() {
            match self.device.submit(request) {
                Ok(()) => moved = true,
                Err(Busy(request)) => {
                    self.backlog.push_front(request);
                    break;
                }
            }
        }
        moved
    }

    fn max_sectors(&self) -> u64 {
        u64::from(self.device.info().max_transfer_sectors).max(8)
    }

    fn idle(&self) -> bool {
        self.backlog.is_empty() && self.device.in_flight() == 0
    }
}

/// An active thin volume.
pub(crate) struct Volume {
    pub dev: u64,
    pub sectors: u64,
    origin: Option<Queue>,
    /// Origin size, sampled at activation.
    origin_sectors: u64,
    completions: VecDeque<ThinCompletion>,
    /// The handle still exists.
    open: bool,
    /// Requests accepted and not yet completed.
    requests: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl Kind {
    fn changes_data(self) -> bool {
        matches!(self, Kind::Write | Kind::Discard | Kind::WriteZeroes)
    }
}

/// A request in progress.
struct Req {
    vol: VolId,
    tag: u64,
    kind: Kind,
    sector: u64,
    sectors: u64,
    buf: IoBuf,
    fua: bool,
    /// Spans, device operations and commit waits not finished yet.
    outstanding: u32,
    /// Of those, spans waiting for data space.
    parked: u32,
    error: Option<IoError>,
    holes: Vec<SectorRun>,
    /// A FUA request that depends on uncommitted metadata: complete it after the
    /// next commit.
    needs_commit: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SpanOp {
    Read,
    Write,
    /// Write zeros, but leave unmapped blocks alone (they already read as zeros).
    ZeroMapped,
    Discard,
    Flush,
}

/// Part of a request, processed as one unit.
#[derive(Clone, Copy, Debug)]
struct Span {
    req: ReqId,
    sector: u64,
    sectors: u64,
    op: SpanOp,
}

impl Span {
    fn end(&self) -> u64 {
        self.sector + self.sectors
    }
}

/// Where the part of a new block that the write does not cover comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Leave whatever the data device holds (`skip_block_zeroing`).
    Nothing,
    Zero,
    /// Copy from this data block (breaking sharing).
    Data(u64),
    /// Copy from the external origin (zeros past its end).
    Origin,
}

/// Preparation of a new data block for a write.
struct Prep {
    span: Span,
    dev: u64,
    vblock: u64,
    new_block: u64,
    source: Source,
    /// The written sectors, relative to the block.
    write_begin: u64,
    write_end: u64,
    /// Origin sectors available inside this block.
    origin_limit: u64,
    segment: u64,
    next: u64,
    in_flight: u32,
    error: Option<IoError>,
    generation: u64,
}

/// Where a device request's buffer goes when the request completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BufUse {
    /// It is the request's own buffer: give it back to the request.
    Lent,
    /// It came from the buffer pool and returns there.
    Pooled(Contents),
}

/// Why a device request was sent.
enum DevOp {
    Read {
        req: ReqId,
        offset: usize,
        buf: BufUse,
        busy: (u64, u64),
    },
    OriginRead {
        req: ReqId,
        offset: usize,
        buf: BufUse,
    },
    Write {
        req: ReqId,
        buf: BufUse,
        busy: (u64, u64),
    },
    PrepRead {
        prep: PrepId,
        segment: (u64, u64),
        busy: Option<u64>,
    },
    PrepWrite {
        prep: PrepId,
        buf: BufUse,
    },
    /// Whole new blocks of one request written together.
    WholeBlocks {
        preps: Vec<PrepId>,
        req: ReqId,
        buf: BufUse,
    },
    Passdown {
        req: Option<ReqId>,
        begin: u64,
    },
    Flush,
}

/// A discard for the data device, waiting until no I/O to its blocks is in flight.
struct Passdown {
    req: Option<ReqId>,
    begin: u64,
    end: u64,
}

#[derive(Default)]
struct CommitState {
    /// The data-device flush of a commit is in flight.
    flushing: bool,
    /// Someone wants a commit even without waiting requests.
    requested: bool,
    /// Requests waiting for the next commit / for the one in flight.
    next: Vec<ReqId>,
    current: Vec<ReqId>,
    /// Commit cycles finished (data flushed, metadata committed if it changed).
    cycles: u64,
    /// The last cycle failed.
    failed: bool,
}

/// Result of trying to get a data block.
enum Alloc {
    Block(u64),
    NoSpace,
    Failed(MdError),
}

pub(crate) struct Core {
    pub md: ThinMetadata,
    data: Queue,
    /// Segment-sized buffers for preps and split requests.
    buffers: BufferPool,
    /// Reused for the mapping runs of each span.
    run_buffer: Vec<Run>,
    /// Recent single-block lookups (kept equal to what the metadata answers).
    mappings: MappingCache,
    pub config: PoolConfig,
    block_sectors: u64,
    passdown: bool,
    pub mode: PoolMode,
    error_if_no_space: bool,
    pub volumes: Slab<Volume>,
    reqs: Slab<Req>,
    ops: Slab<DevOp>,
    preps: Slab<Prep>,
    /// The bio prison: virtual blocks whose new mapping is being prepared, with the
    /// spans waiting for them.
    cells: HashMap<(u64, u64), Vec<Span>>,
    /// Data blocks with I/O in flight, and how many requests.
    busy: HashMap<u64, u32>,
    /// Data ranges freed and queued or in flight as passdown discards (begin → end).
    passdown_ranges: BTreeMap<u64, u64>,
    passdowns: Vec<Passdown>,
    /// Data ranges freed by changes the last commit does not have (mappings
    /// replaced when breaking sharing, deleted devices): the committed metadata may
    /// still map them to data a power cut must find intact, so they are discarded on
    /// the data device only once the next commit is durable.
    discard_after_commit: Vec<(u64, u64)>,
    /// Allocated for preps in flight, not mapped yet.
    provisional: HashSet<u64>,
    /// Allocated only to keep busy blocks away from preps; freed at the next commit.
    quarantine: Vec<u64>,
    ready: VecDeque<Span>,
    no_space: VecDeque<Span>,
    deferred: Vec<PrepId>,
    commit: CommitState,
    md_dirty: bool,
    /// Virtual blocks whose mapping the last commit does not have.
    uncommitted: Uncommitted,
    /// A rollback threw away changes that writes may have been acknowledged on:
    /// no FLUSH or commit-dependent FUA can succeed any more.
    changes_lost: bool,
    frees_since_commit: bool,
    /// Bumped when the metadata transaction is thrown away.
    generation: u64,
    events: VecDeque<PoolEvent>,
    now_ns: u64,
    last_commit_ns: u64,
    out_of_space_since: Option<u64>,
    snap_held_since: Option<u64>,
    snap_warned: bool,
    low_water_armed: bool,
    metadata_low_water_armed: bool,
}

fn md_error_to_message(error: &MdError, context: &str) -> MessageError {
    let errno = match error {
        MdError::DeviceExists(_) => Errno::Eexist,
        MdError::NoSuchDevice(_) => Errno::Enodata,
        MdError::SnapshotHeld(_) => Errno::Ebusy,
        MdError::NoSnapshot
        | MdError::TransactionIdMismatch { .. }
        | MdError::BadDeviceId(_)
        | MdError::TimeExhausted => Errno::Einval,
        MdError::NoMetadataSpace => Errno::Enospc,
        _ => Errno::Eio,
    };
    MessageError::new(errno, format!("{context}: {error}"))
}

/// The sector range two ranges share.
fn overlap(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0.max(b.0), a.1.min(b.1))
}

impl Core {
    pub fn new(
        md: ThinMetadata,
        data: alloc::boxed::Box<dyn BlockDevice>,
        config: PoolConfig,
    ) -> Self {
        let data = Queue::new(data);
        let features = config.features;
        let passdown = !features.ignore_discard
            && !features.no_discard_passdown
            && data.device.info().discard
            && data.max_sectors() >= 1;
        let mode = if features.read_only || md.needs_check() {
            PoolMode::ReadOnly
        } else {
            PoolMode::Write
        };
        let block_sectors = u64::from(config.data_block_size);
        Core {
            buffers: BufferPool::new(SEGMENT_SECTORS.min(block_sectors).min(data.max_sectors())),
            run_buffer: Vec::new(),
            mappings: MappingCache::new(),
            block_sectors,
            error_if_no_space: features.error_if_no_space,
            md,
            data,
            passdown,
            mode,
            config,
            volumes: Slab::new(),
            reqs: Slab::new(),
            ops: Slab::new(),
            preps: Slab::new(),
            cells: HashMap::new(),
            busy: HashMap::new(),
            passdown_ranges: BTreeMap::new(),
            passdowns: Vec::new(),
            discard_after_commit: Vec::new(),
            provisional: HashSet::new(),
            quarantine: Vec::new(),
            ready: VecDeque::new(),
            no_space: VecDeque::new(),
            deferred: Vec::new(),
            commit: CommitState::default(),
            md_dirty: false,
            uncommitted: Uncommitted::default(),
            changes_lost: false,
            frees_since_commit: false,
            generation: 0,
            events: VecDeque::new(),
            now_ns: 0,
            last_commit_ns: 0,
            out_of_space_since: None,
            snap_held_since: None,
            snap_warned: false,
            low_water_armed: true,
            metadata_low_water_armed: true,
        }
    }

    pub fn block_sectors(&self) -> u64 {
        self.block_sectors
    }

    pub fn push_event(&mut self, event: PoolEvent) {
        self.events.push_back(event);
    }

    pub fn next_event(&mut self) -> Option<PoolEvent> {
        self.events.pop_front()
    }

    fn set_mode(&mut self, mode: PoolMode, reason: String) {
        if self.mode == mode || self.mode == PoolMode::Fail {
            return;
        }
        self.mode = mode;
        self.events
            .push_back(PoolEvent::ModeChanged { mode, reason });
    }

    // ----------------------------------------------------------------------------
    // Volumes and request intake

    pub fn activate(
        &mut self,
        dev: u64,
        sectors: u64,
        origin: Option<alloc::boxed::Box<dyn BlockDevice>>,
    ) -> VolId {
        let origin_sectors = origin.as_ref().map_or(0, |o| o.info().sectors);
        self.volumes.insert(Volume {
            dev,
            sectors,
            origin: origin.map(Queue::new),
            origin_sectors,
            completions: VecDeque::new(),
            open: true,
            requests: 0,
        })
    }

    pub fn has_origin(&self, vol: VolId) -> bool {
        self.volumes[vol].origin.is_some()
    }

    /// Whether any volume (open, or closed with requests still running) uses `dev`.
    pub fn device_active(&self, dev: u64) -> bool {
        self.volumes.iter().any(|(_, v)| v.dev == dev)
    }

    pub fn volume_in_flight(&self, vol: VolId) -> usize {
        let volume = &self.volumes[vol];
        volume.requests + volume.completions.len()
    }

    pub fn take_completion(&mut self, vol: VolId) -> Option<ThinCompletion> {
        self.volumes[vol].completions.pop_front()
    }

    /// The handle is gone: completions are dropped from now on, requests waiting for
    /// space fail, and the volume disappears once nothing of it is in flight.
    pub fn close_volume(&mut self, vol: VolId) {
        self.volumes[vol].open = false;
        self.volumes[vol].completions.clear();
        let waiting = mem::take(&mut self.no_space);
        for span in waiting {
            if self.reqs[span.req].vol == vol {
                self.reqs[span.req].parked -= 1;
                self.fail_span(span, IoError::Gone);
            } else {
                self.no_space.push_back(span);
            }
        }
        self.forget_volume_if_idle(vol);
    }

    fn forget_volume_if_idle(&mut self, vol: VolId) {
        let volume = &self.volumes[vol];
        if !volume.open && volume.requests == 0 {
            self.volumes.remove(vol);
        }
    }

    pub fn submit(&mut self, vol: VolId, request: ThinRequest) {
        let ThinRequest { tag, op } = request;
        let volume_sectors = self.volumes[vol].sectors;
        let op = match op {
            ThinOp::FastZero {
                sector,
                sectors,
                fua,
            } => {
                let inside = sector
                    .checked_add(sectors)
                    .is_some_and(|end| end <= volume_sectors);
                if inside && let Some(error) = self.fast_zero_refused(vol, sector, sectors) {
                    self.volumes[vol].completions.push_back(ThinCompletion {
                        tag,
                        result: Err(error),
                        buf: IoBuf::empty(),
                    });
                    return;
                }
                // Only unmapping is left to do (range errors are reported below).
                ThinOp::WriteZeroes {
                    sector,
                    sectors,
                    unmap: true,
                    fua,
                }
            }
            other => other,
        };
        let (kind, sector, sectors, buf, fua, unmap) = match op {
            ThinOp::Read { sector, buf } => (Kind::Read, sector, buf.sectors(), buf, false, false),
            ThinOp::Write { sector, buf, fua } => {
                (Kind::Write, sector, buf.sectors(), buf, fua, false)
            }
            ThinOp::Flush => (Kind::Flush, 0, 0, IoBuf::empty(), false, false),
            ThinOp::Discard {
                sector,
                sectors,
                fua,
            } => (Kind::Discard, sector, sectors, IoBuf::empty(), fua, false),
            ThinOp::WriteZeroes {
                sector,
                sectors,
                unmap,
                fua,
            } => (
                Kind::WriteZeroes,
                sector,
                sectors,
                IoBuf::empty(),
                fua,
                unmap,
            ),
            ThinOp::FastZero { .. } => unreachable!("turned into write-zeroes above"),
            ThinOp::BlockStatus {
                sector,
                sectors,
                max_extents,
            } => {
                let result = if sector
                    .checked_add(sectors)
                    .is_none_or(|end| end > volume_sectors)
                {
                    Err(IoError::OutOfRange)
                } else {
                    self.block_status(vol, sector, sectors, max_extents)
                        .map(ThinOutput::Extents)
                };
                self.volumes[vol].completions.push_back(ThinCompletion {
                    tag,
                    result,
                    buf: IoBuf::empty(),
                });
                return;
            }
        };
        let invalid = if sector
            .checked_add(sectors)
            .is_none_or(|end| end > volume_sectors)
        {
            Some(IoError::OutOfRange)
        } else if kind == Kind::Discard && self.config.features.ignore_discard {
            Some(IoError::Unsupported)
        } else if self.mode == PoolMode::Fail {
            Some(EIO_FAILED)
        } else {
            None
        };
        if let Some(error) = invalid {
            self.volumes[vol].completions.push_back(ThinCompletion {
                tag,
                result: Err(error),
                buf,
            });
            return;
        }
        self.volumes[vol].requests += 1;
        let req = self.reqs.insert(Req {
            vol,
            tag,
            kind,
            sector,
            sectors,
            buf,
            fua,
            outstanding: 1,
            parked: 0,
            error: None,
            holes: Vec::new(),
            needs_commit: false,
        });
        let span = |sector, sectors, op| Span {
            req,
            sector,
            sectors,
            op,
        };
        let end = sector + sectors;
        let none = || span(0, 0, SpanOp::Flush);
        let (spans, count) = match kind {
            Kind::Read => ([span(sector, sectors, SpanOp::Read), none(), none()], 1),
            Kind::Write => ([span(sector, sectors, SpanOp::Write), none(), none()], 1),
            Kind::Flush => ([none(), none(), none()], 1),
            Kind::Discard => ([span(sector, sectors, SpanOp::Discard), none(), none()], 1),
            Kind::WriteZeroes
                if unmap
                    && self.volumes[vol].origin.is_none()
                    && !self.config.features.ignore_discard =>
            {
                let bs = self.block_sectors;
                let first_full = sector.div_ceil(bs) * bs;
                let last_full = end / bs * bs;
                if first_full >= last_full {
                    (
                        [span(sector, sectors, SpanOp::ZeroMapped), none(), none()],
                        1,
                    )
                } else {
                    let mut spans = [none(), none(), none()];
                    let mut count = 0;
                    for part in [
                        span(sector, first_full - sector, SpanOp::ZeroMapped),
                        span(first_full, last_full - first_full, SpanOp::Discard),
                        span(last_full, end - last_full, SpanOp::ZeroMapped),
                    ] {
                        if part.sectors > 0 {
                            spans[count] = part;
                            count += 1;
                        }
                    }
                    (spans, count)
                }
            }
            Kind::WriteZeroes => ([span(sector, sectors, SpanOp::Write), none(), none()], 1),
        };
        self.reqs[req].outstanding = count as u32;
        for span in &spans[..count] {
            self.process_span(*span);
        }
    }

    /// Why zeroing `sector..sector + sectors` cannot be done without data writes
    /// (`None`: it can, by unmapping whole blocks only).
    fn fast_zero_refused(&mut self, vol: VolId, sector: u64, sectors: u64) -> Option<IoError> {
        if self.mode == PoolMode::Fail {
            // Failed like every request, below.
            return None;
        }
        if !self.mode.metadata_writable()
            || self.config.features.ignore_discard
            || self.volumes[vol].origin.is_some()
        {
            return Some(NOT_FAST);
        }
        let bs = self.block_sectors;
        let dev = self.volumes[vol].dev;
        let end = sector + sectors;
        let (first_full, last_full) = (sector.div_ceil(bs) * bs, end / bs * bs);
        // Blocks the range covers only in part must read as zeros already.
        let partial = if sectors == 0 {
            [None, None]
        } else if first_full >= last_full {
            // No whole block: the one or two blocks it touches.
            [Some(sector / bs), Some((end - 1) / bs)]
        } else {
            [
                (sector < first_full).then_some(sector / bs),
                (end > last_full).then_some(last_full / bs),
            ]
        };
        for vblock in partial.into_iter().flatten() {
            if self.held_cell(dev, vblock, vblock + 1).is_some() {
                return Some(NOT_FAST);
            }
            match self.lookup_block(dev, vblock) {
                Ok(None) => {}
                Ok(Some(_)) => return Some(NOT_FAST),
                Err(error) => {
                    self.metadata_failed(&error);
                    return Some(EIO_METADATA);
                }
            }
        }
        None
    }

    /// One unit of a request is done (a span or a device operation).
    fn finish_unit(&mut self, req: ReqId, result: Result<(), IoError>) {
        let r = &mut self.reqs[req];
        if let Err(error) = result {
            r.error.get_or_insert(error);
        }
        r.outstanding -= 1;
        if r.outstanding > 0 {
            return;
        }
        if r.needs_commit && r.error.is_none() {
            r.needs_commit = false;
            r.outstanding = 1;
            self.commit.next.push(req);
            return;
        }
        let r = self.reqs.remove(req);
        let result = match r.error {
            Some(error) => Err(error),
            None if r.kind == Kind::Read => {
                let mut zero_holes = r.holes;
                zero_holes.sort_unstable();
                Ok(ThinOutput::Read { zero_holes })
            }
            None => Ok(ThinOutput::Done),
        };
        let volume = &mut self.volumes[r.vol];
        volume.requests -= 1;
        if volume.open {
            volume.completions.push_back(ThinCompletion {
                tag: r.tag,
                result,
                buf: r.buf,
            });
        }
        self.forget_volume_if_idle(r.vol);
    }

    fn fail_span(&mut self, span: Span, error: IoError) {
        self.finish_unit(span.req, Err(error));
    }

    // ----------------------------------------------------------------------------
    // The main loop

    /// Reaps device completions and runs everything that became ready. Returns
    /// whether anything happened.
    pub fn progress(&mut self) -> bool {
        let mut any = false;
        loop {
            let mut did = false;
            while let Some(completion) = self.data.device.poll() {
                self.on_completion(completion);
                did = true;
            }
            let mut origin_done = Vec::new();
            for (_, volume) in self.volumes.iter_mut() {
                if let Some(origin) = volume.origin.as_mut() {
                    while let Some(completion) = origin.device.poll() {
                        origin_done.push(completion);
                    }
                    did |= origin.pump();
                }
            }
            did |= !origin_done.is_empty();
            for completion in origin_done {
                self.on_completion(completion);
            }
            did |= self.data.pump();
            while let Some(span) = self.ready.pop_front() {
                self.process_span(span);
                did = true;
            }
            did |= self.issue_passdowns();
            did |= self.start_commit();
            if !did {
                return any;
            }
            any = true;
        }
    }

    /// Timer work: periodic commit, no-space timeout, held-snapshot warning.
    pub fn service(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
        if self.md_dirty && now_ns.saturating_sub(self.last_commit_ns) >= COMMIT_PERIOD_NS {
            self.commit.requested = true;
        }
        let timeout_ns = self
            .config
            .no_space_timeout_secs
            .saturating_mul(1_000_000_000);
        if let Some(since) = self.out_of_space_since
            && self.mode == PoolMode::OutOfDataSpace
            && !self.error_if_no_space
            && timeout_ns > 0
            && now_ns.saturating_sub(since) >= timeout_ns
        {
            self.error_if_no_space = true;
            let failed = self.fail_parked(IoError::NoSpace);
            self.events.push_back(PoolEvent::NoSpaceTimeout {
                failed_writes: failed,
            });
        }
        if let (Some(block), Some(since)) = (self.md.held_root(), self.snap_held_since) {
            let seconds = now_ns.saturating_sub(since) / 1_000_000_000;
            if !self.snap_warned && seconds >= self.config.metadata_snap_warning_secs {
                self.snap_warned = true;
                self.events
                    .push_back(PoolEvent::MetadataSnapHeldTooLong { block, seconds });
            }
        }
        self.progress();
    }

    fn wait_until(&mut self, mut done: impl FnMut(&Self) -> bool) {
        while !done(self) {
            if !self.progress() {
                core::hint::spin_loop();
            }
        }
    }

    fn on_completion(&mut self, completion: Completion) {
        let Completion { tag, result, buf } = completion;
        match self.ops.remove(tag as usize) {
            DevOp::Read {
                req,
                offset,
                buf: used,
                busy,
            } => {
                self.unbusy(busy);
                self.read_done(req, offset, used, buf, result);
            }
            DevOp::OriginRead {
                req,
                offset,
                buf: used,
            } => self.read_done(req, offset, used, buf, result),
            DevOp::Write {
                req,
                buf: used,
                busy,
            } => {
                self.unbusy(busy);
                self.buffer_back(used, buf, Some(req));
                self.finish_unit(req, result);
            }
            DevOp::PrepRead {
                prep,
                segment,
                busy,
            } => {
                if let Some(block) = busy {
                    self.unbusy((block, block + 1));
                }
                self.prep_read_done(prep, segment, buf, result);
            }
            DevOp::PrepWrite { prep, buf: used } => {
                let p = &mut self.preps[prep];
                p.in_flight -= 1;
                if let Err(error) = result {
                    p.error.get_or_insert(error);
                }
                let req = p.span.req;
                self.buffer_back(used, buf, Some(req));
                self.pump_prep(prep);
            }
            DevOp::WholeBlocks {
                preps,
                req,
                buf: used,
            } => {
                // Each prep holds a unit of the request, so it is still there.
                self.buffer_back(used, buf, Some(req));
                for prep in preps {
                    let p = &mut self.preps[prep];
                    p.in_flight -= 1;
                    if let Err(error) = result {
                        p.error.get_or_insert(error);
                    }
                    self.pump_prep(prep);
                }
            }
            DevOp::Passdown { req, begin } => {
                self.passdown_ranges.remove(&begin);
                if let Some(req) = req {
                    // A failed passdown is ignored: the unmapping stands.
                    self.finish_unit(req, Ok(()));
                }
            }
            DevOp::Flush => self.flush_done(result),
        }
    }

    fn read_done(
        &mut self,
        req: ReqId,
        offset: usize,
        used: BufUse,
        buf: IoBuf,
        result: Result<(), IoError>,
    ) {
        if used != BufUse::Lent && result.is_ok() {
            self.reqs[req].buf[offset..offset + buf.len()].copy_from_slice(&buf);
        }
        self.buffer_back(used, buf, Some(req));
        self.finish_unit(req, result);
    }

    /// A device request's buffer is back: to its request when lent, else to the pool.
    fn buffer_back(&mut self, used: BufUse, buf: IoBuf, req: Option<ReqId>) {
        match (used, req) {
            (BufUse::Lent, Some(req)) => self.reqs[req].buf = buf,
            (BufUse::Lent, None) => {}
            (BufUse::Pooled(contents), _) => self.buffers.give(buf, contents),
        }
    }

    fn submit_data(&mut self, op: DevOp, command: Command) {
        let tag = self.ops.insert(op) as u64;
        self.data.submit(Request { tag, command });
    }

    fn submit_origin(&mut self, vol: VolId, op: DevOp, command: Command) {
        let tag = self.ops.insert(op) as u64;
        self.volumes[vol]
            .origin
            .as_mut()
            .expect("origin reads only for volumes with an origin")
            .submit(Request { tag, command });
    }

    fn make_busy(&mut self, (begin, end): (u64, u64)) {
        for block in begin..end {
            *self.busy.entry(block).or_insert(0) += 1;
        }
    }

    fn unbusy(&mut self, (begin, end): (u64, u64)) {
        for block in begin..end {
            if let Some(count) = self.busy.get_mut(&block) {
                *count -= 1;
                if *count == 0 {
                    self.busy.remove(&block);
                }
            }
        }
    }

    fn is_busy(&self, block: u64) -> bool {
        self.busy.contains_key(&block)
            || self
                .passdown_ranges
                .range(..=block)
                .next_back()
                .is_some_and(|(_, &end)| end > block)
    }

    // ----------------------------------------------------------------------------
    // Spans

    fn volume_of(&self, span: &Span) -> VolId {
        self.reqs[span.req].vol
    }

    /// The virtual blocks a span must lock (discards: the whole blocks only).
    fn span_blocks(&self, span: &Span) -> (u64, u64) {
        let bs = self.block_sectors;
        match span.op {
            SpanOp::Discard => (span.sector.div_ceil(bs), span.end() / bs),
            _ => (span.sector / bs, span.end().div_ceil(bs)),
        }
    }

    fn process_span(&mut self, span: Span) {
        if self.mode == PoolMode::Fail {
            self.fail_span(span, EIO_FAILED);
            return;
        }
        if span.op == SpanOp::Flush {
            self.commit.next.push(span.req);
            return;
        }
        let dev = self.volumes[self.volume_of(&span)].dev;
        let (b0, b1) = self.span_blocks(&span);
        if let Some(key) = self.held_cell(dev, b0, b1) {
            // Processed again when that block's mapping is in place (and parked in
            // another held cell of its range, if any).
            self.cells.get_mut(&key).expect("found above").push(span);
            return;
        }
        let r = &self.reqs[span.req];
        if r.fua && !r.needs_commit && self.uncommitted.any(dev, b0, b1) {
            // It lands on a mapping (or an unmapping) the last commit does not have.
            self.reqs[span.req].needs_commit = true;
        }
        let result = match span.op {
            SpanOp::Read => self.read_span(span, dev, b0, b1),
            SpanOp::Write | SpanOp::ZeroMapped => self.write_span(span, dev, b0, b1),
            SpanOp::Discard => self.discard_span(span, dev, b0, b1),
            SpanOp::Flush => unreachable!("handled above"),
        };
        if let Err(error) = result {
            self.metadata_failed(&error);
            self.fail_span(span, EIO_METADATA);
        }
    }

    /// A cell held for one of the device's blocks `b0..b1`, if any.
    fn held_cell(&self, dev: u64, b0: u64, b1: u64) -> Option<(u64, u64)> {
        if self.cells.is_empty() || b0 >= b1 {
            return None;
        }
        if b1 - b0 <= self.cells.len() as u64 {
            (b0..b1)
                .map(|vblock| (dev, vblock))
                .find(|key| self.cells.contains_key(key))
        } else {
            self.cells
                .keys()
                .find(|&&(d, vblock)| d == dev && (b0..b1).contains(&vblock))
                .copied()
        }
    }

    /// Mapped and unmapped runs covering virtual blocks `b0..b1`, in a vector to
    /// hand back with [`Core::recycle_runs`].
    fn runs(&mut self, dev: u64, b0: u64, b1: u64) -> Result<Vec<Run>, MdError> {
        let mut runs = mem::take(&mut self.run_buffer);
        if b1 == b0 + 1 {
            // One block (most requests): the mapping cache, else a point lookup.
            runs.push(match self.lookup_block(dev, b0)? {
                Some(mapping) => Run::Mapped {
                    begin: b0,
                    len: 1,
                    data_begin: mapping.data_block,
                    shared: mapping.shared,
                },
                None => Run::Unmapped { begin: b0, len: 1 },
            });
            return Ok(runs);
        }
        let mut position = b0;
        while position < b1 {
            let batch = self.md.lookup_range(dev, position, b1, LOOKUP_RUNS)?;
            position = batch.last().map_or(b1, Run::end);
            runs.extend(batch);
        }
        Ok(runs)
    }

    /// One block's mapping, from the mapping cache or the metadata.
    fn lookup_block(&mut self, dev: u64, vblock: u64) -> Result<Option<Cached>, MdError> {
        if let Some(hit) = self.mappings.get(dev, vblock) {
            return Ok(hit);
        }
        let found = self.md.lookup(dev, vblock)?.map(|m| Cached {
            data_block: m.data_block,
            shared: m.shared,
        });
        self.mappings.put(dev, vblock, found);
        Ok(found)
    }

    fn recycle_runs(&mut self, mut runs: Vec<Run>) {
        runs.clear();
        self.run_buffer = runs;
    }

    /// The volume sectors of `run` inside `span`, and the first data sector of that
    /// part (mapped runs).
    fn clip(&self, run: &Run, span: &Span) -> (u64, u64, Option<u64>) {
        let bs = self.block_sectors;
        let (run_begin, data) = match *run {
            Run::Unmapped { begin, .. } => (begin, None),
            Run::Mapped {
                begin, data_begin, ..
            } => (begin, Some(data_begin)),
        };
        let (s0, s1) = overlap((run_begin * bs, run.end() * bs), (span.sector, span.end()));
        (s0, s1, data.map(|d| d * bs + (s0 - run_begin * bs)))
    }

    fn is_whole_request(&self, span: &Span) -> bool {
        let r = &self.reqs[span.req];
        span.sector == r.sector && span.sectors == r.sectors
    }

    fn read_span(&mut self, span: Span, dev: u64, b0: u64, b1: u64) -> Result<(), MdError> {
        let runs = self.runs(dev, b0, b1)?;
        let vol = self.volume_of(&span);
        let req_sector = self.reqs[span.req].sector;
        let data_max = self.data.max_sectors();
        let single = runs.len() == 1 && self.is_whole_request(&span);
        let bs = self.block_sectors;
        for run in &runs {
            let (s0, s1, data) = self.clip(run, &span);
            match data {
                Some(data_sector) => {
                    let lend = single && s1 - s0 <= data_max;
                    let mut at = s0;
                    while at < s1 {
                        let len = (s1 - at).min(data_max);
                        let first = data_sector + (at - s0);
                        let busy = (first / bs, (first + len).div_ceil(bs));
                        self.make_busy(busy);
                        let (buf, used) = self.read_buf(span.req, lend, len);
                        self.reqs[span.req].outstanding += 1;
                        self.submit_data(
                            DevOp::Read {
                                req: span.req,
                                offset: ((at - req_sector) as usize) * SECTOR_SIZE,
                                buf: used,
                                busy,
                            },
                            Command::Read { sector: first, buf },
                        );
                        at += len;
                    }
                }
                None => self.read_unmapped(span, vol, s0, s1, single),
            }
        }
        self.recycle_runs(runs);
        self.finish_unit(span.req, Ok(()));
        Ok(())
    }

    /// Unprovisioned sectors `s0..s1`: from the origin below its end, zeros beyond.
    fn read_unmapped(&mut self, span: Span, vol: VolId, s0: u64, s1: u64, single: bool) {
        let req_sector = self.reqs[span.req].sector;
        let volume = &self.volumes[vol];
        let origin_end = if volume.origin.is_some() {
            volume.origin_sectors.clamp(s0, s1)
        } else {
            s0
        };
        if origin_end > s0 {
            let max = volume.origin.as_ref().map_or(8, Queue::max_sectors);
            let lend = single && origin_end == s1 && s1 - s0 <= max;
            let mut at = s0;
            while at < origin_end {
                let len = (origin_end - at).min(max);
                let (buf, used) = self.read_buf(span.req, lend, len);
                self.reqs[span.req].outstanding += 1;
                self.submit_origin(
                    vol,
                    DevOp::OriginRead {
                        req: span.req,
                        offset: ((at - req_sector) as usize) * SECTOR_SIZE,
                        buf: used,
                    },
                    Command::Read { sector: at, buf },
                );
                at += len;
            }
        }
        if origin_end < s1 {
            let r = &mut self.reqs[span.req];
            let from = ((origin_end - req_sector) as usize) * SECTOR_SIZE;
            let to = ((s1 - req_sector) as usize) * SECTOR_SIZE;
            r.buf[from..to].fill(0);
            r.holes.push(SectorRun {
                start: origin_end - req_sector,
                sectors: s1 - origin_end,
            });
        }
    }

    /// A buffer for a device read of `sectors` on behalf of `req`: the request's own
    /// buffer when the read fills it exactly (`lend`), else a pooled one to copy from.
    fn read_buf(&mut self, req: ReqId, lend: bool, sectors: u64) -> (IoBuf, BufUse) {
        if lend {
            (mem::take(&mut self.reqs[req].buf), BufUse::Lent)
        } else {
            (self.buffers.take(sectors), BufUse::Pooled(Contents::Stale))
        }
    }

    /// A buffer with the data a request writes at volume sectors `s0..s1` (zeros for
    /// write-zeroes): the request's own buffer when it holds exactly that, else a
    /// pooled copy.
    fn data_buf(&mut self, req: ReqId, s0: u64, s1: u64) -> (IoBuf, BufUse) {
        let r = &mut self.reqs[req];
        if r.kind == Kind::Write
            && r.sector == s0
            && r.sectors == s1 - s0
            && r.buf.len() == (s1 - s0) as usize * SECTOR_SIZE
        {
            return (mem::take(&mut r.buf), BufUse::Lent);
        }
        if self.reqs[req].kind != Kind::Write {
            let buf = self.buffers.take_zeroed(s1 - s0);
            return (buf, BufUse::Pooled(Contents::ZeroOutside(0, 0)));
        }
        let mut buf = self.buffers.take(s1 - s0);
        let r = &self.reqs[req];
        let from = ((s0 - r.sector) as usize) * SECTOR_SIZE;
        let len = buf.len();
        buf.copy_from_slice(&r.buf[from..from + len]);
        (buf, BufUse::Pooled(Contents::Stale))
    }

    fn write_span(&mut self, span: Span, dev: u64, b0: u64, b1: u64) -> Result<(), MdError> {
        let runs = self.runs(dev, b0, b1)?;
        let bs = self.block_sectors;
        let data_max = self.data.max_sectors();
        let fua = self.reqs[span.req].fua;
        for run in &runs {
            let (s0, s1, data) = self.clip(run, &span);
            match *run {
                Run::Mapped { shared: false, .. } => {
                    let data_sector = data.expect("mapped run");
                    let mut at = s0;
                    while at < s1 {
                        let len = (s1 - at).min(data_max);
                        let first = data_sector + (at - s0);
                        let busy = (first / bs, (first + len).div_ceil(bs));
                        self.make_busy(busy);
                        let (buf, used) = self.data_buf(span.req, at, at + len);
                        self.reqs[span.req].outstanding += 1;
                        self.submit_data(
                            DevOp::Write {
                                req: span.req,
                                buf: used,
                                busy,
                            },
                            Command::Write {
                                sector: first,
                                buf,
                                fua,
                            },
                        );
                        at += len;
                    }
                }
                Run::Mapped {
                    begin, data_begin, ..
                } => self.provision_blocks(span, (s0, s1), |_, vblock| {
                    Source::Data(data_begin + (vblock - begin))
                }),
                Run::Unmapped { .. } if span.op == SpanOp::ZeroMapped => {}
                Run::Unmapped { .. } => self.provision_blocks(span, (s0, s1), |core, vblock| {
                    core.unmapped_source(span, vblock)
                }),
            }
        }
        self.recycle_runs(runs);
        self.finish_unit(span.req, Ok(()));
        Ok(())
    }

    fn unmapped_source(&self, span: Span, vblock: u64) -> Source {
        let volume = &self.volumes[self.volume_of(&span)];
        if volume.origin.is_some() && vblock * self.block_sectors < volume.origin_sectors {
            Source::Origin
        } else if self.config.features.skip_block_zeroing {
            Source::Nothing
        } else {
            Source::Zero
        }
    }

    /// New data blocks for the virtual blocks the span's sectors `s0..s1` touch.
    /// Blocks written whole need neither zeroing nor copying: consecutive ones whose
    /// new data blocks are consecutive too are written with one device request (with
    /// the request's own buffer when that is exactly what it carries).
    fn provision_blocks(
        &mut self,
        span: Span,
        (s0, s1): (u64, u64),
        source: impl Fn(&Self, u64) -> Source,
    ) {
        let bs = self.block_sectors;
        let (b0, b1) = (s0 / bs, s1.div_ceil(bs));
        if b1 == b0 + 1 {
            if let Some(prep) = self.provision(span, s0, s1, b0, source(self, b0)) {
                self.pump_prep(prep);
            }
            return;
        }
        let max_group = (self.data.max_sectors() / bs).max(1) as usize;
        let mut group: Vec<PrepId> = Vec::new();
        for vblock in b0..b1 {
            let Some(prep) = self.provision(span, s0, s1, vblock, source(self, vblock)) else {
                self.write_whole_blocks(&mut group);
                continue;
            };
            if s0 > vblock * bs || (vblock + 1) * bs > s1 {
                self.write_whole_blocks(&mut group);
                self.pump_prep(prep);
                continue;
            }
            if let Some(&last) = group.last() {
                let (last, this) = (&self.preps[last], &self.preps[prep]);
                if last.new_block + 1 != this.new_block || group.len() >= max_group {
                    self.write_whole_blocks(&mut group);
                }
            }
            group.push(prep);
        }
        self.write_whole_blocks(&mut group);
    }

    /// Writes the preps of consecutive whole blocks (consecutive new data blocks)
    /// with one device request.
    fn write_whole_blocks(&mut self, group: &mut Vec<PrepId>) {
        match group.len() {
            0 => return,
            1 => self.pump_prep(group[0]),
            _ => {
                let bs = self.block_sectors;
                let first = &self.preps[group[0]];
                let last = &self.preps[group[group.len() - 1]];
                let (v0, v1) = (first.vblock * bs, (last.vblock + 1) * bs);
                let (sector, req) = (first.new_block * bs, first.span.req);
                for &id in group.iter() {
                    let p = &mut self.preps[id];
                    p.next = bs;
                    p.in_flight += 1;
                }
                let (buf, used) = self.data_buf(req, v0, v1);
                self.submit_data(
                    DevOp::WholeBlocks {
                        preps: mem::take(group),
                        req,
                        buf: used,
                    },
                    Command::Write {
                        sector,
                        buf,
                        fua: false,
                    },
                );
            }
        }
        group.clear();
    }

    /// Starts a new data block for `vblock`, written with the span's sectors
    /// `s0..s1` inside it; the caller starts its I/O. `None` when the write could
    /// not get a block (it failed or waits for space).
    fn provision(
        &mut self,
        span: Span,
        s0: u64,
        s1: u64,
        vblock: u64,
        source: Source,
    ) -> Option<PrepId> {
        let bs = self.block_sectors;
        let (w0, w1) = overlap((s0, s1), (vblock * bs, (vblock + 1) * bs));
        let part = Span {
            req: span.req,
            sector: w0,
            sectors: w1 - w0,
            op: span.op,
        };
        self.reqs[span.req].outstanding += 1;
        let refused = match self.mode {
            PoolMode::Fail => Some(EIO_FAILED),
            PoolMode::ReadOnly => Some(EIO_READ_ONLY),
            PoolMode::OutOfMetadataSpace => Some(EIO_NO_METADATA),
            PoolMode::Write | PoolMode::OutOfDataSpace => None,
        };
        if let Some(error) = refused {
            self.fail_span(part, error);
            return None;
        }
        if self.metadata_exhausted() {
            // Commit before using up the reserve; if that frees nothing the pool
            // goes out-of-metadata-space and this write fails.
            self.commit.requested = true;
            self.park(part);
            return None;
        }
        let new_block = match self.allocate() {
            Alloc::Block(block) => block,
            Alloc::NoSpace => {
                self.no_data_space(part);
                return None;
            }
            Alloc::Failed(error) => {
                self.metadata_failed(&error);
                self.fail_span(part, EIO_METADATA);
                return None;
            }
        };
        let dev = self.volumes[self.volume_of(&span)].dev;
        let volume = &self.volumes[self.volume_of(&span)];
        let origin_limit = volume.origin_sectors.saturating_sub(vblock * bs).min(bs);
        let segment = SEGMENT_SECTORS
            .min(bs)
            .min(self.data.max_sectors())
            .min(volume.origin.as_ref().map_or(u64::MAX, Queue::max_sectors));
        self.cells.insert((dev, vblock), Vec::new());
        let prep = self.preps.insert(Prep {
            span: part,
            dev,
            vblock,
            new_block,
            source,
            write_begin: w0 - vblock * bs,
            write_end: w1 - vblock * bs,
            origin_limit,
            segment,
            next: 0,
            in_flight: 0,
            error: None,
            generation: self.generation,
        });
        self.check_low_water();
        Some(prep)
    }

    fn allocate(&mut self) -> Alloc {
        loop {
            match self.md.alloc_data_block() {
                Ok(block) => {
                    self.md_dirty = true;
                    if self.is_busy(block) {
                        self.quarantine.push(block);
                        continue;
                    }
                    self.provisional.insert(block);
                    return Alloc::Block(block);
                }
                Err(MdError::NoDataSpace) => return Alloc::NoSpace,
                Err(error) => return Alloc::Failed(error),
            }
        }
    }

    fn check_low_water(&mut self) {
        let free = self.md.data_free_blocks();
        let mark = self.config.low_water_mark;
        if self.low_water_armed && free <= mark {
            self.low_water_armed = false;
            self.events.push_back(PoolEvent::LowWaterMark {
                free_blocks: free,
                low_water_mark: mark,
            });
        }
    }

    fn metadata_low_watermark(&self) -> u64 {
        (self.md.metadata_nr_blocks() / 4).min(1024)
    }

    fn check_metadata_space(&mut self) {
        let free = self.md.metadata_free_blocks_reported();
        let mark = self.metadata_low_watermark();
        if free < mark {
            if self.metadata_low_water_armed {
                self.metadata_low_water_armed = false;
                self.events.push_back(PoolEvent::MetadataLowWaterMark {
                    free_blocks: free,
                    watermark: mark,
                });
            }
        } else {
            self.metadata_low_water_armed = true;
        }
        if self.metadata_exhausted() {
            self.commit.requested = true;
        }
    }

    /// At open: a pool whose metadata is (still) down to the reserve starts
    /// out-of-metadata-space; growing the metadata device is what brings it back.
    pub fn check_metadata_space_at_open(&mut self) {
        if self.mode.metadata_writable() && self.metadata_exhausted() {
            self.enter_out_of_metadata_space();
        }
    }

    /// Free metadata is down to the reserve: stop making new mappings.
    fn metadata_exhausted(&self) -> bool {
        self.md.metadata_free_blocks_reported() == 0
    }

    fn park(&mut self, part: Span) {
        self.reqs[part.req].parked += 1;
        self.no_space.push_back(part);
    }

    /// Fails every span waiting for space; returns how many there were.
    fn fail_parked(&mut self, error: IoError) -> u64 {
        let waiting = mem::take(&mut self.no_space);
        let count = waiting.len() as u64;
        for span in waiting {
            self.reqs[span.req].parked -= 1;
            self.fail_span(span, error);
        }
        count
    }

    fn retry_parked(&mut self) {
        while let Some(span) = self.no_space.pop_front() {
            self.reqs[span.req].parked -= 1;
            self.ready.push_back(span);
        }
    }

    fn no_data_space(&mut self, part: Span) {
        if self.mode == PoolMode::Write
            && (self.frees_since_commit || !self.quarantine.is_empty() || self.commit.flushing)
        {
            // Blocks freed in this transaction become usable after a commit.
            self.commit.requested = true;
            self.park(part);
            return;
        }
        if self.mode == PoolMode::Write {
            self.enter_out_of_data_space();
        }
        if self.error_if_no_space {
            self.fail_span(part, IoError::NoSpace);
        } else {
            self.park(part);
        }
    }

    fn enter_out_of_data_space(&mut self) {
        let policy = if self.error_if_no_space {
            String::from(
                "no free data blocks; writes needing space fail with ENOSPC (error_if_no_space)",
            )
        } else {
            format!(
                "no free data blocks; writes needing space wait up to {} s for the pool to grow or space to be discarded, then fail with ENOSPC",
                self.config.no_space_timeout_secs
            )
        };
        self.set_mode(PoolMode::OutOfDataSpace, policy);
        self.out_of_space_since = Some(self.now_ns);
        if self.error_if_no_space {
            self.fail_parked(IoError::NoSpace);
        }
    }

    fn leave_out_of_data_space(&mut self, reason: &str) {
        self.set_mode(PoolMode::Write, String::from(reason));
        self.out_of_space_since = None;
        self.error_if_no_space = self.config.features.error_if_no_space;
        self.retry_parked();
    }

    // ----------------------------------------------------------------------------
    // Preps: zero / copy, write, then map

    fn pump_prep(&mut self, id: PrepId) {
        loop {
            let p = &self.preps[id];
            if p.in_flight >= PREP_WINDOW || p.next >= self.block_sectors {
                break;
            }
            let s0 = p.next;
            let s1 = (s0 + p.segment).min(self.block_sectors);
            self.preps[id].next = s1;
            self.start_segment(id, s0, s1);
        }
        let p = &self.preps[id];
        if p.next >= self.block_sectors && p.in_flight == 0 {
            self.prep_done(id);
        }
    }

    /// Copies the written part of the segment `s0..s1` (block-relative) into `buf`,
    /// which holds the segment; returns the byte range of `buf` it wrote.
    fn overlay(&self, id: PrepId, s0: u64, s1: u64, buf: &mut IoBuf) -> (usize, usize) {
        let p = &self.preps[id];
        let (o0, o1) = overlap((s0, s1), (p.write_begin, p.write_end));
        if o0 >= o1 {
            return (0, 0);
        }
        let r = &self.reqs[p.span.req];
        let at = ((o0 - s0) as usize) * SECTOR_SIZE;
        let len = ((o1 - o0) as usize) * SECTOR_SIZE;
        if r.kind == Kind::Write {
            let from = ((p.vblock * self.block_sectors + o0 - r.sector) as usize) * SECTOR_SIZE;
            buf[at..at + len].copy_from_slice(&r.buf[from..from + len]);
        } else {
            buf[at..at + len].fill(0);
        }
        (at, at + len)
    }

    fn prep_write(&mut self, id: PrepId, s0: u64, buf: IoBuf, used: BufUse) {
        let p = &mut self.preps[id];
        p.in_flight += 1;
        let sector = p.new_block * self.block_sectors + s0;
        self.submit_data(
            DevOp::PrepWrite {
                prep: id,
                buf: used,
            },
            Command::Write {
                sector,
                buf,
                fua: false,
            },
        );
    }

    fn start_segment(&mut self, id: PrepId, s0: u64, s1: u64) {
        let p = &self.preps[id];
        let (w0, w1) = (p.write_begin, p.write_end);
        let bs = self.block_sectors;
        let span = p.span;
        if w0 <= s0 && s1 <= w1 {
            let base = p.vblock * bs;
            let (buf, used) = self.data_buf(span.req, base + s0, base + s1);
            self.prep_write(id, s0, buf, used);
            return;
        }
        let source = match p.source {
            Source::Origin if s0 >= p.origin_limit => {
                if self.config.features.skip_block_zeroing {
                    Source::Nothing
                } else {
                    Source::Zero
                }
            }
            other => other,
        };
        match source {
            Source::Nothing => {
                let (o0, o1) = overlap((s0, s1), (w0, w1));
                if o0 < o1 {
                    let base = p.vblock * bs;
                    let (buf, used) = self.data_buf(span.req, base + o0, base + o1);
                    self.prep_write(id, o0, buf, used);
                }
            }
            Source::Zero => {
                let mut buf = self.buffers.take_zeroed(s1 - s0);
                let (from, to) = self.overlay(id, s0, s1, &mut buf);
                self.prep_write(id, s0, buf, BufUse::Pooled(Contents::ZeroOutside(from, to)));
            }
            Source::Data(old) => {
                self.make_busy((old, old + 1));
                self.preps[id].in_flight += 1;
                let buf = self.buffers.take(s1 - s0);
                self.submit_data(
                    DevOp::PrepRead {
                        prep: id,
                        segment: (s0, s1),
                        busy: Some(old),
                    },
                    Command::Read {
                        sector: old * bs + s0,
                        buf,
                    },
                );
            }
            Source::Origin => {
                let end = s1.min(p.origin_limit);
                let sector = p.vblock * bs + s0;
                let vol = self.volume_of(&span);
                self.preps[id].in_flight += 1;
                let buf = self.buffers.take(end - s0);
                self.submit_origin(
                    vol,
                    DevOp::PrepRead {
                        prep: id,
                        segment: (s0, s1),
                        busy: None,
                    },
                    Command::Read { sector, buf },
                );
            }
        }
    }

    fn prep_read_done(
        &mut self,
        id: PrepId,
        (s0, s1): (u64, u64),
        read: IoBuf,
        result: Result<(), IoError>,
    ) {
        self.preps[id].in_flight -= 1;
        if let Err(error) = result {
            self.preps[id].error.get_or_insert(error);
            self.buffers.give(read, Contents::Stale);
            self.pump_prep(id);
            return;
        }
        let mut buf = if read.sectors() == s1 - s0 {
            read
        } else {
            // The origin ends inside the segment: zeros after its end.
            let mut full = self.buffers.take_zeroed(s1 - s0);
            full[..read.len()].copy_from_slice(&read);
            self.buffers.give(read, Contents::Stale);
            full
        };
        self.overlay(id, s0, s1, &mut buf);
        self.prep_write(id, s0, buf, BufUse::Pooled(Contents::Stale));
    }

    fn release_cell(&mut self, dev: u64, vblock: u64) {
        if let Some(waiting) = self.cells.remove(&(dev, vblock)) {
            self.ready.extend(waiting);
        }
    }

    fn prep_done(&mut self, id: PrepId) {
        let p = &self.preps[id];
        if p.generation != self.generation {
            // The transaction that allocated the block was rolled back.
            let p = self.preps.remove(id);
            self.release_cell(p.dev, p.vblock);
            return self.fail_span(p.span, EIO_METADATA);
        }
        if let Some(error) = p.error {
            let p = self.preps.remove(id);
            self.provisional.remove(&p.new_block);
            if let Err(md_error) = self.md.dec_data_block(p.new_block) {
                self.metadata_failed(&md_error);
            }
            self.release_cell(p.dev, p.vblock);
            return self.fail_span(p.span, error);
        }
        if self.commit.flushing {
            self.deferred.push(id);
            return;
        }
        let p = self.preps.remove(id);
        let result = self
            .md
            .insert(p.dev, p.vblock, p.new_block)
            .and_then(|old| {
                self.provisional.remove(&p.new_block);
                self.md_dirty = true;
                self.uncommitted.mark(p.dev, p.vblock, p.vblock + 1);
                // A mapping made now is never shared: the device's last snapshot
                // is not later than the current time.
                let mapping = Cached {
                    data_block: p.new_block,
                    shared: false,
                };
                self.mappings.put(p.dev, p.vblock, Some(mapping));
                if let Some(old) = old
                    && self.md.dec_data_block(old)? == 0
                {
                    self.frees_since_commit = true;
                    self.freed_by_change(old, old + 1);
                }
                Ok(())
            });
        self.release_cell(p.dev, p.vblock);
        match result {
            Ok(()) => {
                let r = &mut self.reqs[p.span.req];
                r.needs_commit |= r.fua;
                self.check_metadata_space();
                self.finish_unit(p.span.req, Ok(()));
            }
            Err(error) => {
                self.metadata_failed(&error);
                self.fail_span(p.span, EIO_METADATA);
            }
        }
    }

    // ----------------------------------------------------------------------------
    // Discards

    fn discard_span(&mut self, span: Span, dev: u64, b0: u64, b1: u64) -> Result<(), MdError> {
        let kind = self.reqs[span.req].kind;
        if !self.mode.metadata_writable() {
            if kind == Kind::WriteZeroes {
                // The blocks cannot be unmapped: zero them where possible instead.
                let write = Span {
                    op: SpanOp::Write,
                    ..span
                };
                return self.write_span(write, dev, b0, b1);
            }
            // Read-only modes complete discards without effect.
            self.finish_unit(span.req, Ok(()));
            return Ok(());
        }
        let mut freed: Vec<(u64, u64)> = Vec::new();
        let mut unmapped = false;
        let mut chunk = b0;
        while chunk < b1 {
            let end = b1.min(chunk.saturating_add(DISCARD_CHUNK_BLOCKS));
            for run in self.md.remove_range(dev, chunk, end)? {
                unmapped = true;
                self.uncommitted.mark(dev, run.begin, run.begin + run.len);
                for block in run.data_begin..run.data_begin + run.len {
                    if self.md.dec_data_block(block)? == 0 {
                        match freed.last_mut() {
                            Some((_, last_end)) if *last_end == block => *last_end += 1,
                            _ => freed.push((block, block + 1)),
                        }
                    }
                }
            }
            chunk = end;
        }
        if b1 - b0 <= FORGET_ONE_BY_ONE {
            for vblock in b0..b1 {
                self.mappings.forget(dev, vblock);
            }
        } else {
            self.mappings.clear();
        }
        if unmapped {
            self.md_dirty = true;
            let r = &mut self.reqs[span.req];
            r.needs_commit |= r.fua;
        }
        if !freed.is_empty() {
            self.frees_since_commit = true;
            if self.mode == PoolMode::OutOfDataSpace {
                self.commit.requested = true;
            }
            if self.passdown {
                for (begin, end) in freed {
                    self.queue_passdown(Some(span.req), begin, end);
                }
            }
        }
        self.finish_unit(span.req, Ok(()));
        Ok(())
    }

    /// Data blocks `begin..end` are free after a change the last commit does not
    /// have: discarded on the data device after the next commit (passdown only).
    fn freed_by_change(&mut self, begin: u64, end: u64) {
        if !self.passdown {
            return;
        }
        match self.discard_after_commit.last_mut() {
            Some((_, last)) if *last == begin => *last = end,
            _ => self.discard_after_commit.push((begin, end)),
        }
    }

    fn queue_passdown(&mut self, req: Option<ReqId>, begin: u64, end: u64) {
        if let Some(req) = req {
            self.reqs[req].outstanding += 1;
        }
        self.passdown_ranges.insert(begin, end);
        self.passdowns.push(Passdown { req, begin, end });
    }

    /// Sends queued passdown discards whose blocks have no I/O in flight.
    fn issue_passdowns(&mut self) -> bool {
        if self.passdowns.is_empty() {
            return false;
        }
        let mut issued = false;
        let mut waiting = Vec::new();
        for passdown in mem::take(&mut self.passdowns) {
            let busy = if (passdown.end - passdown.begin) < self.busy.len() as u64 {
                (passdown.begin..passdown.end).any(|b| self.busy.contains_key(&b))
            } else {
                self.busy
                    .keys()
                    .any(|&b| (passdown.begin..passdown.end).contains(&b))
            };
            if busy {
                waiting.push(passdown);
                continue;
            }
            issued = true;
            let bs = self.block_sectors;
            self.submit_data(
                DevOp::Passdown {
                    req: passdown.req,
                    begin: passdown.begin,
                },
                Command::Discard {
                    sector: passdown.begin * bs,
                    sectors: (passdown.end - passdown.begin) * bs,
                },
            );
        }
        self.passdowns = waiting;
        issued
    }

    // ----------------------------------------------------------------------------
    // Block status

    fn block_status(
        &mut self,
        vol: VolId,
        sector: u64,
        sectors: u64,
        max_extents: u32,
    ) -> Result<Vec<Extent>, IoError> {
        if self.mode == PoolMode::Fail {
            return Err(EIO_FAILED);
        }
        let bs = self.block_sectors;
        let dev = self.volumes[vol].dev;
        let origin_end = if self.volumes[vol].origin.is_some() {
            self.volumes[vol].origin_sectors
        } else {
            0
        };
        let end = sector + sectors;
        let mut extents: Vec<Extent> = Vec::new();
        let push = |extents: &mut Vec<Extent>, sectors: u64, hole: bool, zero: bool| match extents
            .last_mut()
        {
            Some(last) if last.hole == hole && last.zero == zero => last.sectors += sectors,
            _ => extents.push(Extent {
                sectors,
                hole,
                zero,
            }),
        };
        let mut position = sector / bs;
        let last = end.div_ceil(bs);
        while position < last && extents.len() <= max_extents as usize {
            let runs = self
                .md
                .lookup_range(dev, position, last, LOOKUP_RUNS)
                .map_err(|error| {
                    self.metadata_failed(&error);
                    EIO_METADATA
                })?;
            position = runs.last().map_or(last, Run::end);
            for run in runs {
                let (s0, s1) = overlap((run_begin(&run) * bs, run.end() * bs), (sector, end));
                if matches!(run, Run::Mapped { .. }) {
                    push(&mut extents, s1 - s0, false, false);
                    continue;
                }
                let split = origin_end.clamp(s0, s1);
                if split > s0 {
                    push(&mut extents, split - s0, true, false);
                }
                if s1 > split {
                    push(&mut extents, s1 - split, true, true);
                }
            }
        }
        extents.truncate((max_extents as usize).max(1));
        Ok(extents)
    }

    // ----------------------------------------------------------------------------
    // Commits and metadata failures

    fn start_commit(&mut self) -> bool {
        if self.commit.flushing || (!self.commit.requested && self.commit.next.is_empty()) {
            return false;
        }
        self.commit.requested = false;
        self.commit.current = mem::take(&mut self.commit.next);
        self.commit.flushing = true;
        self.submit_data(DevOp::Flush, Command::Flush);
        true
    }

    fn flush_done(&mut self, result: Result<(), IoError>) {
        self.commit.flushing = false;
        let outcome = match result {
            Err(error) => {
                let text = format!("data device flush failed ({error})");
                self.metadata_failed_text(text);
                Err(error)
            }
            Ok(()) if self.md_dirty && self.mode.metadata_writable() => {
                self.commit_metadata().map_err(|error| {
                    self.metadata_failed(&error);
                    EIO_METADATA
                })
            }
            // Writes may have been acknowledged on changes a rollback threw away.
            Ok(()) if self.changes_lost => Err(EIO_METADATA),
            Ok(()) => Ok(()),
        };
        self.commit.failed = outcome.is_err();
        self.commit.cycles += 1;
        for req in mem::take(&mut self.commit.current) {
            self.finish_unit(req, outcome);
        }
        for prep in mem::take(&mut self.deferred) {
            self.prep_done(prep);
        }
        self.after_commit();
    }

    fn commit_metadata(&mut self) -> Result<(), MdError> {
        for block in mem::take(&mut self.quarantine) {
            self.md.dec_data_block(block)?;
        }
        let provisional: Vec<u64> = self.provisional.iter().copied().collect();
        for &block in &provisional {
            self.md.dec_data_block(block)?;
        }
        self.md.commit()?;
        self.uncommitted.clear();
        for (begin, end) in mem::take(&mut self.discard_after_commit) {
            self.queue_passdown(None, begin, end);
        }
        for &block in &provisional {
            self.md.inc_data_block(block)?;
        }
        self.md_dirty = false;
        self.frees_since_commit = false;
        self.last_commit_ns = self.now_ns;
        Ok(())
    }

    fn after_commit(&mut self) {
        match self.mode {
            PoolMode::Write | PoolMode::OutOfDataSpace => {}
            PoolMode::OutOfMetadataSpace | PoolMode::ReadOnly | PoolMode::Fail => {
                self.fail_parked(EIO_READ_ONLY);
                return;
            }
        }
        if self.metadata_exhausted() {
            self.enter_out_of_metadata_space();
            return;
        }
        let free = self.md.data_free_blocks();
        if self.mode == PoolMode::OutOfDataSpace {
            if free > 0 {
                self.leave_out_of_data_space("free data blocks are available again");
            }
        } else if !self.no_space.is_empty() {
            if free > 0 {
                self.retry_parked();
            } else {
                self.enter_out_of_data_space();
            }
        }
    }

    fn enter_out_of_metadata_space(&mut self) {
        self.set_mode(
            PoolMode::OutOfMetadataSpace,
            String::from(
                "free metadata is down to the reserve; writes needing new blocks fail, messages are refused (reload the pool with a larger metadata device)",
            ),
        );
        self.fail_parked(EIO_NO_METADATA);
    }

    fn metadata_failed(&mut self, error: &MdError) {
        self.metadata_failed_text(format!("metadata operation failed ({error})"));
    }

    /// Rolls the transaction back, sets needs_check and goes read-only (or fails).
    fn metadata_failed_text(&mut self, what: String) {
        if !self.mode.metadata_writable() {
            return;
        }
        self.generation += 1;
        self.changes_lost |= self.md_dirty || !self.uncommitted.is_empty();
        self.uncommitted.clear();
        self.provisional.clear();
        self.quarantine.clear();
        self.md_dirty = false;
        self.mappings.clear();
        self.discard_after_commit.clear();
        let rolled_back = self.md.abort().and_then(|()| {
            self.md.set_needs_check();
            self.md.commit()
        });
        match rolled_back {
            Ok(()) => self.set_mode(
                PoolMode::ReadOnly,
                format!(
                    "{what}; changes since the last commit were rolled back and needs_check is set: check and repair the metadata offline"
                ),
            ),
            Err(error) => self.set_mode(
                PoolMode::Fail,
                format!("{what}; rolling back also failed ({error}): all I/O now fails"),
            ),
        }
        self.fail_parked(EIO_METADATA);
    }

    /// Runs a commit cycle (data flush, then metadata) to completion.
    pub fn commit_now(&mut self) -> Result<(), MessageError> {
        self.commit.requested = true;
        let target = self.commit.cycles + if self.commit.flushing { 2 } else { 1 };
        self.wait_until(|core| core.commit.cycles >= target);
        if self.commit.failed {
            return Err(MessageError::new(
                Errno::Eio,
                "commit failed; the pool is now read-only (see events)",
            ));
        }
        Ok(())
    }

    /// Commits when the metadata changed (and may change); a failure shows in the
    /// mode and the events.
    pub fn commit_if_dirty(&mut self) {
        if self.md_dirty && self.mode.metadata_writable() {
            // The error is already reported as a mode change.
            let _ = self.commit_now();
        }
    }

    /// Waits until no new block is being prepared and no commit is in flight.
    fn drain_preps(&mut self) {
        self.wait_until(|core| {
            core.preps.is_empty() && core.deferred.is_empty() && !core.commit.flushing
        });
    }

    /// Waits until everything in flight is finished (requests waiting for space
    /// excepted).
    pub fn drain_all(&mut self) {
        self.wait_until(|core| {
            core.reqs.iter().all(|(_, r)| r.outstanding == r.parked)
                && core.passdowns.is_empty()
                && core.passdown_ranges.is_empty()
                && !core.commit.flushing
                && core.data.idle()
        });
    }

    // ----------------------------------------------------------------------------
    // Messages

    pub fn message(&mut self, message: Message) -> Result<(), MessageError> {
        self.require_writable_metadata()?;
        if let Message::CreateSnap { origin, .. } = message {
            // Quiesce the origin: no new writes can arrive during this call; wait for
            // the ones in flight. Parts of writes waiting for space stay queued: they
            // are processed from scratch afterwards, see the blocks shared with the
            // snapshot, and so change the origin only.
            self.wait_until(|core| {
                core.reqs.iter().all(|(_, r)| {
                    core.volumes[r.vol].dev != origin
                        || !r.kind.changes_data()
                        || r.outstanding == r.parked
                })
            });
        }
        self.drain_preps();
        self.require_writable_metadata()?;
        if self.md_dirty {
            self.commit_now()?;
        }
        let applied = self.apply(message);
        // Snapshots change what is shared; deleted ids can come back; a failed
        // message may have rolled the transaction back.
        self.mappings.clear();
        applied?;
        self.md_dirty = true;
        self.commit_now()
    }

    pub fn require_writable_metadata(&self) -> Result<(), MessageError> {
        if self.mode.metadata_writable() {
            return Ok(());
        }
        Err(MessageError::new(
            Errno::Eopnotsupp,
            format!(
                "unable to service pool target messages in READ_ONLY or FAIL mode (pool is {})",
                self.mode.status_word()
            ),
        ))
    }

    fn apply(&mut self, message: Message) -> Result<(), MessageError> {
        match message {
            Message::CreateThin { dev } => {
                let context =
                    format!("Creation of new thinly-provisioned device with id {dev} failed");
                self.md
                    .create_thin(dev)
                    .map_err(|e| self.message_failed(&e, &context))
            }
            Message::CreateSnap { dev, origin } => {
                let context = format!("Creation of new snapshot {dev} of device {origin} failed");
                self.md
                    .create_snap(dev, origin)
                    .map_err(|e| self.message_failed(&e, &context))
            }
            Message::Delete { dev } => self.delete(dev),
            Message::SetTransactionId { current, new } => {
                let context = format!("Failed to change transaction id from {current} to {new}");
                self.md
                    .set_transaction_id(current, new)
                    .map_err(|e| self.message_failed(&e, &context))
            }
            Message::ReserveMetadataSnap => {
                self.md
                    .reserve_metadata_snap()
                    .map_err(|e| self.message_failed(&e, "reserve_metadata_snap failed"))?;
                self.snap_held_since = Some(self.now_ns);
                self.snap_warned = false;
                Ok(())
            }
            Message::ReleaseMetadataSnap => {
                self.md.release_metadata_snap().map_err(|e| {
                    self.message_failed(&e, "release_metadata_snap failed (nothing to release)")
                })?;
                self.snap_held_since = None;
                Ok(())
            }
        }
    }

    /// Turns a metadata error of a message into its message error; a failure after
    /// changes started rolls them back (to the commit made just before).
    fn message_failed(&mut self, error: &MdError, context: &str) -> MessageError {
        let refused = matches!(
            error,
            MdError::DeviceExists(_)
                | MdError::NoSuchDevice(_)
                | MdError::SnapshotHeld(_)
                | MdError::NoSnapshot
                | MdError::TransactionIdMismatch { .. }
                | MdError::BadDeviceId(_)
                | MdError::TimeExhausted
        );
        if !refused {
            self.mappings.clear();
            self.uncommitted.clear();
            self.discard_after_commit.clear();
            match self.md.abort() {
                Ok(()) if *error == MdError::NoMetadataSpace => self.after_commit(),
                _ => self.metadata_failed(error),
            }
        }
        md_error_to_message(error, context)
    }

    fn delete(&mut self, dev: u64) -> Result<(), MessageError> {
        let context = format!("Deletion of thin device {dev} failed");
        if self.device_active(dev) {
            return Err(MessageError::new(
                Errno::Ebusy,
                format!("{context}: the device is active (open); deactivate it first"),
            ));
        }
        let exists = self
            .md
            .device_exists(dev)
            .map_err(|e| self.message_failed(&e, &context))?;
        if !exists {
            return Err(md_error_to_message(&MdError::NoSuchDevice(dev), &context));
        }
        // Blocks only this device used are discarded on the data device too.
        let mut mapped: Vec<(u64, u64)> = Vec::new();
        if self.passdown {
            let end = self
                .md
                .highest_mapped(dev)
                .map_err(|e| self.message_failed(&e, &context))?
                .map_or(0, |h| h + 1);
            let mut position = 0;
            while position < end {
                let runs = self
                    .md
                    .lookup_range(dev, position, end, LOOKUP_RUNS)
                    .map_err(|e| self.message_failed(&e, &context))?;
                position = runs.last().map_or(end, Run::end);
                for run in runs {
                    if let Run::Mapped {
                        len, data_begin, ..
                    } = run
                    {
                        mapped.push((data_begin, data_begin + len));
                    }
                }
            }
        }
        self.md
            .delete(dev)
            .map_err(|e| self.message_failed(&e, &context))?;
        mapped.sort_unstable();
        let mut freed: Vec<(u64, u64)> = Vec::new();
        for (begin, end) in mapped {
            for block in begin..end {
                let count = self
                    .md
                    .data_block_count(block)
                    .map_err(|e| self.message_failed(&e, &context))?;
                if count == 0 {
                    match freed.last_mut() {
                        Some((_, last)) if *last == block => *last += 1,
                        _ => freed.push((block, block + 1)),
                    }
                }
            }
        }
        for (begin, end) in freed {
            self.freed_by_change(begin, end);
        }
        self.frees_since_commit = true;
        Ok(())
    }

    // ----------------------------------------------------------------------------
    // Size changes and status

    /// Grows the data space to `blocks` (never shrinks) and commits.
    pub fn grow_data(&mut self, blocks: u64) -> Result<(), MessageError> {
        let current = self.md.data_nr_blocks();
        if blocks < current {
            return Err(MessageError::new(
                Errno::Einval,
                format!("pool target ({blocks} blocks) too small: expected {current}"),
            ));
        }
        if blocks == current {
            return Ok(());
        }
        if self.md.needs_check() {
            return Err(MessageError::new(
                Errno::Einval,
                "unable to grow the data device until the metadata is repaired (needs_check)",
            ));
        }
        self.require_writable_metadata()?;
        self.drain_preps();
        self.md
            .resize_data(blocks)
            .map_err(|e| self.message_failed(&e, "growing the data space failed"))?;
        self.md_dirty = true;
        self.commit_now()?;
        if self.md.data_free_blocks() > self.config.low_water_mark {
            self.low_water_armed = true;
        }
        if self.mode == PoolMode::OutOfDataSpace && self.md.data_free_blocks() > 0 {
            self.leave_out_of_data_space("the pool was grown");
        }
        Ok(())
    }

    pub fn status(&self) -> PoolStatus {
        let metadata_total = self.md.metadata_nr_blocks();
        let data_total = self.md.data_nr_blocks();
        let discard = if self.config.features.ignore_discard {
            DiscardMode::Ignore
        } else if self.passdown {
            DiscardMode::Passdown
        } else {
            DiscardMode::NoPassdown
        };
        PoolStatus {
            mode: self.mode,
            transaction_id: self.md.transaction_id(),
            metadata_used: metadata_total - self.md.metadata_free_blocks_reported(),
            metadata_total,
            data_used: data_total - self.md.data_free_blocks(),
            data_total,
            held_root: self.md.held_root(),
            discard,
            error_if_no_space: self.error_if_no_space,
            needs_check: self.md.needs_check(),
            metadata_low_watermark: self.metadata_low_watermark(),
        }
    }

    pub fn thin_status(&mut self, dev: u64) -> Result<ThinStatus, MessageError> {
        let context = format!("status of thin device {dev}");
        if self.mode == PoolMode::Fail {
            return Ok(ThinStatus {
                failed: true,
                mapped_sectors: 0,
                highest_mapped_sector: None,
            });
        }
        let mapped = self
            .md
            .mapped_blocks(dev)
            .map_err(|e| md_error_to_message(&e, &context))?;
        let highest = self
            .md
            .highest_mapped(dev)
            .map_err(|e| md_error_to_message(&e, &context))?;
        let bs = self.block_sectors;
        Ok(ThinStatus {
            failed: false,
            mapped_sectors: mapped * bs,
            highest_mapped_sector: highest.map(|h| (h + 1) * bs - 1),
        })
    }
}

fn run_begin(run: &Run) -> u64 {
    match *run {
        Run::Unmapped { begin, .. } | Run::Mapped { begin, .. } => begin,
    }
}
