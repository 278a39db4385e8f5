//! One snapshot: its origin and COW devices, its store and the exception table, and
//! the snapshot device's I/O.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{BlockDevice, IoBuf, IoError};
use core::fmt;

use crate::chunk_io::{flush, read_into, transfer_sectors, write_from};
use crate::merge::MergeState;
use crate::pending::{Fill, Pending, Piece, Progress};
use crate::persistent::PersistentStore;
use crate::table::StoreKind;
use crate::transient::TransientStore;

/// Why a snapshot's request failed: the snapshot is invalid, or overflowed for
/// writes (dm answers EIO in both cases).
pub const SNAPSHOT_INVALID: IoError = IoError::Device("snapshot is invalid");
pub const SNAPSHOT_OVERFLOW: IoError = IoError::Device("snapshot overflowed");

/// A COW device that cannot be loaded (each is dm's "Failed to read snapshot
/// metadata" with the store's reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    Io(IoError),
    /// The magic is neither zero nor `SnAp`.
    Corrupt,
    Version(u32),
    ChunkSize(u32, &'static str),
    /// A blank COW smaller than the header and the first area.
    TooSmall {
        sectors: u64,
        chunk: u64,
    },
    /// The list runs on into an area past the end of the COW.
    AreaOutside(u64),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Failed to read snapshot metadata: ")?;
        match self {
            LoadError::Io(error) => write!(f, "{error}"),
            LoadError::Corrupt => f.write_str("Invalid or corrupt snapshot"),
            LoadError::Version(version) => {
                write!(f, "unable to handle snapshot disk version {version}")
            }
            LoadError::ChunkSize(chunk, why) => {
                write!(f, "invalid on-disk chunk size {chunk}: {why}.")
            }
            LoadError::TooSmall { sectors, chunk } => write!(
                f,
                "COW device too small: {sectors} sectors cannot hold the header and the first \
                 metadata area ({} sectors)",
                2 * chunk
            ),
            LoadError::AreaOutside(area) => write!(
                f,
                "metadata area {area} lies beyond the end of the COW device"
            ),
        }
    }
}

/// What the status line reports besides usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Valid,
    /// Full without `O`, an I/O error, handed over or marked invalid on disk.
    Invalid,
    /// `PO` and a snapshot write found no space: reads work, writes fail.
    Overflow,
    /// A merge stopped on an I/O error.
    MergeFailed,
}

pub(crate) enum Store {
    Persistent(PersistentStore),
    Transient(TransientStore),
}

impl Store {
    fn chunk(&self) -> u64 {
        match self {
            Store::Persistent(store) => store.chunk(),
            Store::Transient(store) => store.chunk(),
        }
    }
}

/// A snapshot of an origin.
pub struct Snapshot {
    pub(crate) origin: Box<dyn BlockDevice>,
    pub(crate) cow: Box<dyn BlockDevice>,
    pub(crate) store: Store,
    /// Completed exceptions: origin chunk → COW chunk.
    pub(crate) exceptions: BTreeMap<u64, u64>,
    /// Sectors of the origin the snapshot covers (origin writes past it copy nothing).
    length: u64,
    valid: bool,
    overflow_allowed: bool,
    overflowed: bool,
    pub(crate) merge: Option<MergeState>,
    pub(crate) events: Vec<String>,
    /// Exceptions being made (one batch at a time).
    pending: Option<Pending>,
    /// Reads of the snapshot device in flight on the origin, per origin chunk: an
    /// origin write to such a chunk waits for them (Linux's tracked chunks).
    origin_reads: BTreeMap<u64, u32>,
}

/// The data of a snapshot write that starts exceptions.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// The write's bytes, from its first sector on.
    Data(&'a [u8]),
    /// Zeros (a write-zeroes).
    Zeros,
}

/// What [`Snapshot::start_write`] did.
#[derive(Debug, Default)]
pub struct StartedWrite {
    /// Chunks the batch writes whole from the write's own data: the write need not
    /// write them again.
    pub whole: Vec<u64>,
    /// Why the write fails once the batch is done, if it does: the COW filled up at
    /// one of its chunks (the chunks before it are still written).
    pub refused: Option<IoError>,
}

impl Snapshot {
    /// Loads the snapshot's store from `cow` (formatting a blank persistent one).
    /// Returns the snapshot and what the kernel would log about it.
    pub fn open(
        origin: Box<dyn BlockDevice>,
        mut cow: Box<dyn BlockDevice>,
        kind: StoreKind,
        table_chunk: u32,
        length: u64,
    ) -> Result<(Snapshot, Vec<String>), LoadError> {
        let (store, exceptions, valid, notes) = match kind {
            StoreKind::Persistent { .. } => {
                let opened = PersistentStore::open(cow.as_mut(), table_chunk)?;
                let mut notes = opened.notes;
                if opened.invalid {
                    notes.push("Snapshot is marked invalid.".into());
                }
                (
                    Store::Persistent(opened.store),
                    opened.exceptions,
                    !opened.invalid,
                    notes,
                )
            }
            StoreKind::Transient => (
                Store::Transient(TransientStore::new(u64::from(table_chunk))),
                Vec::new(),
                true,
                Vec::new(),
            ),
        };
        let snapshot = Snapshot {
            origin,
            cow,
            store,
            exceptions: exceptions.into_iter().collect(),
            length,
            valid,
            overflow_allowed: kind == StoreKind::Persistent { overflow: true },
            overflowed: false,
            merge: None,
            events: Vec::new(),
            pending: None,
            origin_reads: BTreeMap::new(),
        };
        Ok((snapshot, notes))
    }

    /// Chunk size in sectors (the header's, for a persistent store).
    pub fn chunk_sectors(&self) -> u64 {
        self.store.chunk()
    }

    /// Exceptions in the table (not yet merged, while merging).
    pub fn exception_count(&self) -> usize {
        self.exceptions.len()
    }

    /// The COW chunk holding origin chunk `chunk`, if it has an exception.
    pub fn exception(&self, chunk: u64) -> Option<u64> {
        self.exceptions.get(&chunk).copied()
    }

    pub fn health(&self) -> Health {
        if !self.valid {
            Health::Invalid
        } else if self.merge.as_ref().is_some_and(|merge| merge.failed) {
            Health::MergeFailed
        } else if self.overflowed {
            Health::Overflow
        } else {
            Health::Valid
        }
    }

    /// The fields of dm's status line after the target name.
    pub fn status(&self) -> String {
        match self.health() {
            Health::Invalid => "Invalid".into(),
            Health::MergeFailed => "Merge failed".into(),
            Health::Overflow => "Overflow".into(),
            Health::Valid => {
                let (allocated, metadata) = match &self.store {
                    Store::Persistent(store) => store.usage(),
                    Store::Transient(store) => store.usage(),
                };
                format!("{allocated}/{} {metadata}", self.cow.info().sectors)
            }
        }
    }

    /// Events since the last call (invalidation, merge finished or failed), for the
    /// console's `event:` lines.
    pub fn take_events(&mut self) -> Vec<String> {
        core::mem::take(&mut self.events)
    }

    /// Makes the snapshot invalid as Linux does: header rewritten with `valid = 0`
    /// (persistent stores), an event, and every later request fails.
    pub(crate) fn invalidate(&mut self, why: &str) {
        if !self.valid {
            return;
        }
        self.valid = false;
        let mut event = format!("snapshot invalidated: {why}");
        if let Store::Persistent(store) = &self.store
            && store.invalidate(self.cow.as_mut()).is_err()
        {
            event.push_str(" (writing the header failed)");
        }
        self.events.push(event);
    }

    /// A handover: another target took this snapshot's store over (a merge), so
    /// this one fails every request from now on. Nothing is written: the store
    /// stays valid on disk for its new owner.
    pub fn hand_over(&mut self) {
        self.valid = false;
    }

    /// Reads the snapshot device: chunks with an exception from the COW, the rest
    /// from the origin.
    pub fn read(&mut self, sector: u64, out: &mut [u8]) -> Result<(), IoError> {
        self.settle();
        if !self.valid {
            return Err(SNAPSHOT_INVALID);
        }
        self.read_view(sector, out)
    }

    /// The snapshot's view, valid or not (a merging origin reads through it).
    pub(crate) fn read_view(&mut self, sector: u64, out: &mut [u8]) -> Result<(), IoError> {
        let chunk = self.chunk_sectors();
        for (at, piece) in chunk_pieces(sector, (out.len() / 512) as u64, chunk) {
            let buf = &mut out[((at - sector) * 512) as usize..][..(piece * 512) as usize];
            match self.exceptions.get(&(at / chunk)) {
                Some(&new) => read_into(self.cow.as_mut(), new * chunk + at % chunk, buf)?,
                None => read_into(self.origin.as_mut(), at, buf)?,
            }
        }
        Ok(())
    }

    /// Writes the snapshot device: chunks without an exception get one first (the
    /// origin's data copied unless the write covers the whole chunk), committed
    /// before the write is acknowledged; the origin is never written.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), IoError> {
        self.settle();
        if let Some(refusal) = self.write_refusal() {
            return Err(refusal);
        }
        let sectors = (data.len() / 512) as u64;
        let started = self.start_write(sector, sectors, Source::Data(data));
        self.settle();
        if !self.valid {
            return Err(SNAPSHOT_INVALID);
        }
        let chunk = self.chunk_sectors();
        for (at, piece) in chunk_pieces(sector, sectors, chunk) {
            let old = at / chunk;
            let Some(&new) = self.exceptions.get(&old) else {
                continue;
            };
            if !started.whole.contains(&old) {
                let bytes = &data[((at - sector) * 512) as usize..][..(piece * 512) as usize];
                write_from(self.cow.as_mut(), new * chunk + at % chunk, bytes, false)?;
            }
        }
        started.refused.map_or(Ok(()), Err)
    }

    /// Why a write to the snapshot device fails at once, if it does.
    pub fn write_refusal(&self) -> Option<IoError> {
        if !self.valid {
            Some(SNAPSHOT_INVALID)
        } else if self.overflowed {
            Some(SNAPSHOT_OVERFLOW)
        } else {
            None
        }
    }

    /// Whether a write to the snapshot device at `sector..sector+sectors` needs
    /// exceptions made first.
    pub fn write_needs_exceptions(&self, sector: u64, sectors: u64) -> bool {
        let chunk = self.chunk_sectors();
        chunk_pieces(sector, sectors, chunk)
            .any(|(at, _)| !self.exceptions.contains_key(&(at / chunk)))
    }

    /// Starts the exceptions a snapshot write needs (no batch may be under way):
    /// whole chunks are written from `source`, partial ones copied from the origin.
    /// The write's own data goes to the COW once [`Snapshot::pump`] has committed
    /// them. A COW without room stops the allocation at that chunk.
    pub fn start_write(&mut self, sector: u64, sectors: u64, source: Source<'_>) -> StartedWrite {
        debug_assert!(self.pending.is_none(), "one batch at a time");
        let chunk = self.chunk_sectors();
        let mut records: Vec<(u64, u64)> = Vec::new();
        let mut copies = Vec::new();
        let mut started = StartedWrite::default();
        for (at, piece) in chunk_pieces(sector, sectors, chunk) {
            let old = at / chunk;
            if self.exceptions.contains_key(&old) || records.iter().any(|&(o, _)| o == old) {
                continue;
            }
            let Some(new) = self.allocate() else {
                started.refused = Some(if self.overflow_allowed {
                    self.overflowed = true;
                    SNAPSHOT_OVERFLOW
                } else {
                    self.invalidate("Unable to allocate exception.");
                    SNAPSHOT_INVALID
                });
                break;
            };
            if piece == chunk {
                let buf = match source {
                    Source::Data(data) => IoBuf::from_slice(
                        &data[((at - sector) * 512) as usize..][..(chunk * 512) as usize],
                    ),
                    Source::Zeros => IoBuf::with_sectors(chunk as usize),
                };
                copies.push(Piece {
                    fill: Fill::Data(buf),
                    to: new * chunk,
                    sectors: chunk,
                });
                started.whole.push(old);
            } else {
                copies.extend(self.origin_copy(old, new));
            }
            records.push((old, new));
        }
        if self.valid && !records.is_empty() {
            self.pending = Some(Pending::new(records, copies));
        }
        started
    }

    /// Whether an origin write to `sector..sector+sectors` needs a copy-out into
    /// this snapshot.
    pub fn needs_copy_out(&self, sector: u64, sectors: u64) -> bool {
        let end = (sector + sectors).min(self.length);
        if !self.valid || self.merge.is_some() || sector >= end {
            return false;
        }
        let chunk = self.chunk_sectors();
        (sector / chunk..end.div_ceil(chunk)).any(|old| !self.exceptions.contains_key(&old))
    }

    /// Starts the copy-out an origin write to `sector..sector+sectors` needs (no
    /// batch may be under way). A COW without room invalidates the snapshot (the
    /// origin write goes on).
    pub fn start_copy_out(&mut self, sector: u64, sectors: u64) {
        debug_assert!(self.pending.is_none(), "one batch at a time");
        if !self.needs_copy_out(sector, sectors) {
            return;
        }
        let chunk = self.chunk_sectors();
        let end = (sector + sectors).min(self.length);
        let mut records = Vec::new();
        let mut copies = Vec::new();
        for old in sector / chunk..end.div_ceil(chunk) {
            if self.exceptions.contains_key(&old) {
                continue;
            }
            let Some(new) = self.allocate() else {
                self.invalidate("Unable to allocate exception.");
                return;
            };
            copies.extend(self.origin_copy(old, new));
            records.push((old, new));
        }
        self.pending = Some(Pending::new(records, copies));
    }

    /// Whether no batch of exceptions is under way.
    pub fn idle(&self) -> bool {
        self.pending.is_none()
    }

    /// Whether origin writes to `sector..sector+sectors` must wait: a chunk there
    /// is being copied out, or read through the snapshot device.
    pub fn busy(&self, sector: u64, sectors: u64) -> bool {
        let chunk = self.chunk_sectors();
        let (first, end) = (sector / chunk, (sector + sectors).div_ceil(chunk));
        self.pending.as_ref().is_some_and(|pending| {
            pending
                .records
                .iter()
                .any(|&(old, _)| (first..end).contains(&old))
        }) || self.origin_reads.range(first..end).next().is_some()
    }

    /// Advances the batch under way without waiting; true while one is.
    pub fn pump(&mut self) -> bool {
        let Some(pending) = &mut self.pending else {
            return false;
        };
        match pending.pump(self.origin.as_mut(), self.cow.as_mut()) {
            Progress::Working => true,
            Progress::Copied => {
                let commands = match &mut self.store {
                    Store::Persistent(store) => store.plan_commit(&pending.records),
                    Store::Transient(_) => Vec::new(),
                };
                pending.start_commit(commands);
                self.pump()
            }
            Progress::Done => {
                let done = self.pending.take().expect("seen above");
                self.exceptions.extend(done.records);
                false
            }
            Progress::Failed(_) => {
                self.pending = None;
                self.invalidate("Error reading/writing.");
                false
            }
        }
    }

    /// Finishes the batch under way.
    pub fn settle(&mut self) {
        while self.pump() {
            core::hint::spin_loop();
        }
    }

    /// A read of the snapshot device went to origin chunk `chunk`: origin writes to
    /// it wait until [`Snapshot::origin_read_done`].
    pub fn origin_read_started(&mut self, chunk: u64) {
        *self.origin_reads.entry(chunk).or_default() += 1;
    }

    pub fn origin_read_done(&mut self, chunk: u64) {
        if let Some(count) = self.origin_reads.get_mut(&chunk) {
            *count -= 1;
            if *count == 0 {
                self.origin_reads.remove(&chunk);
            }
        }
    }

    /// Makes the snapshot's completed writes durable (a flush of the COW).
    pub fn flush(&mut self) -> Result<(), IoError> {
        self.settle();
        if !self.valid {
            return Err(SNAPSHOT_INVALID);
        }
        flush(self.cow.as_mut())
    }

    pub(crate) fn allocate(&mut self) -> Option<u64> {
        let cow_sectors = self.cow.info().sectors;
        match &mut self.store {
            Store::Persistent(store) => store.allocate(cow_sectors),
            Store::Transient(store) => store.allocate(cow_sectors),
        }
    }

    /// The pieces of a copy of origin chunk `old` into COW chunk `new`, up to the
    /// origin's end.
    fn origin_copy(&self, old: u64, new: u64) -> impl Iterator<Item = Piece> + use<> {
        let chunk = self.chunk_sectors();
        let sectors = chunk.min(self.origin.info().sectors.saturating_sub(old * chunk));
        let piece = transfer_sectors(self.origin.as_ref(), self.cow.as_ref());
        Piece::copies(old * chunk, new * chunk, sectors, piece)
    }

    /// Before origin sectors `sector..sector+sectors` change: copies every chunk
    /// they touch that has no exception yet into the COW and commits. Never fails
    /// the origin write: a snapshot that cannot keep up is invalidated.
    pub(crate) fn copy_out_range(&mut self, sector: u64, sectors: u64) {
        self.settle();
        self.start_copy_out(sector, sectors);
        self.settle();
    }
}

/// Splits `sector..sector+sectors` at chunk boundaries: `(start, sectors)` pieces.
pub fn chunk_pieces(sector: u64, sectors: u64, chunk: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = sector + sectors;
    let mut at = sector;
    core::iter::from_fn(move || {
        (at < end).then(|| {
            let piece = (chunk - at % chunk).min(end - at);
            at += piece;
            (at - piece, piece)
        })
    })
}
