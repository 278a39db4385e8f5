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

mod block_status;
mod commit;
mod deletion;
mod discard;
mod intake;
mod main_loop;
mod management;
mod merge;
mod origin_merge;
mod prep;
mod provision;
mod reconfigure;
mod space;
mod spans;
mod views;

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::mem;

use blockdev::{BlockDevice, Busy, Command, Completion, IoBuf, IoError, Request, SECTOR_SIZE};
use hashbrown::{HashMap, HashSet};
use persistent_data::Error as MdError;
use persistent_data::thin::{PendingDelete, Run, ThinMetadata};
use slab::Slab;

use crate::buffers::{BufferPool, Contents};
use crate::config::{COMMIT_PERIOD_NS, PoolConfig};
use crate::io::{NOT_FAST, ThinCompletion, ThinOp, ThinOutput, ThinRequest};
use crate::mapcache::{Cached, MappingCache};
use crate::message::{Errno, Message, MessageError};
use crate::status::{DiscardMode, PoolEvent, PoolMode, PoolStatus, ThinStatus};
use crate::uncommitted::Uncommitted;
use blockdev::{Extent, SectorRun};
pub use deletion::DeleteProgress;
pub use discard::DiscardProgress;
use origin_merge::OriginMerge;
pub use origin_merge::OriginMergeProgress;

/// Largest piece a prep copies or zeroes at once (1 MiB), bounding its memory.
const SEGMENT_SECTORS: u64 = 2048;
/// Segments of one prep in flight at once.
const PREP_WINDOW: u32 = 4;
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
    /// The pool's clock when it came in.
    accepted_ns: u64,
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
    /// A read of a block being merged into `dev`'s origin, for origin `sector`.
    MergeRead {
        dev: u64,
        sector: u64,
    },
    /// A write of that block to the origin, and the origin flush after a batch.
    MergeWrite {
        dev: u64,
    },
    MergeFlush {
        dev: u64,
    },
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
    /// Data ranges freed by changes the last commit does not have (discards,
    /// mappings replaced when breaking sharing, deleted devices): the committed
    /// metadata may still map them to data a power cut must find intact, so they are
    /// discarded on the data device only once the next commit is durable. A discard
    /// request waits for its own (it counts them as outstanding).
    discard_after_commit: Vec<Passdown>,
    /// Allocated for preps in flight, not mapped yet.
    provisional: HashSet<u64>,
    /// Allocated only to keep busy blocks away from preps; freed at the next commit.
    quarantine: Vec<u64>,
    ready: VecDeque<Span>,
    no_space: VecDeque<Span>,
    deferred: Vec<PrepId>,
    commit: CommitState,
    md_dirty: bool,
    /// Devices whose mappings are released in the background (their reserved id).
    deletes: VecDeque<(u64, DeleteProgress)>,
    /// Thin devices being merged into their external origins.
    origin_merges: Vec<OriginMerge>,
    /// Discards unmapped in part: the rest of each, unmapped in later steps.
    discards: VecDeque<Span>,
    /// While requests come in, no delete or discard step from the timer before
    /// this time.
    next_step_ns: u64,
    /// Requests accepted so far, and the count at the last timer step's check and
    /// at the last poll: different means I/O is flowing.
    requests_accepted: u64,
    requests_at_last_step: u64,
    requests_at_last_poll: u64,
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
        | MdError::ReservedDeviceId(_)
        | MdError::TimeExhausted
        | MdError::MergeIntoItself(_) => Errno::Einval,
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
            deletes: VecDeque::new(),
            origin_merges: Vec::new(),
            discards: VecDeque::new(),
            next_step_ns: 0,
            requests_accepted: 0,
            requests_at_last_step: 0,
            requests_at_last_poll: 0,
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
}
