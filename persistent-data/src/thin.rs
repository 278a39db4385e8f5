//! Thin-pool metadata: the `dm-thin-metadata.c` equivalent the pool engine builds on.
//!
//! One [`ThinMetadata`] owns the metadata device. Every change happens in the current
//! transaction and becomes durable at [`ThinMetadata::commit`]; a crash or
//! [`ThinMetadata::abort`] returns to the last commit. After any error from a
//! mutating call, call `abort` before going on (the on-disk metadata is intact, the
//! in-memory transaction may not be).
//!
//! Reference counts of data blocks belong to the caller, as in dm-thin:
//! * [`ThinMetadata::alloc_data_block`] returns a block with count 1, which
//!   [`ThinMetadata::insert`] then maps (inserting does not add a count);
//! * a mapping taken out of a tree is a count the caller now owns: when `insert`
//!   returns the block it replaced, or `remove`/`remove_range` return what they
//!   unmapped, call [`ThinMetadata::dec_data_block`] for each block (a result of 0
//!   means nothing refers to it any more and it may be discarded on the data device);
//! * counts that sharing needs (copying a shared b-tree node, deleting a device or
//!   releasing the metadata snapshot) are handled here.
//!
//! ```
//! use blockdev::MemDisk;
//! use persistent_data::thin::{OpenOptions, ThinMetadata};
//!
//! let disk = MemDisk::new(8 << 11); // 8 MiB metadata device
//! let (mut md, report) = ThinMetadata::open(Box::new(disk), &OpenOptions::new(128))?;
//! assert!(report.formatted);
//! md.resize_data(1 << 20)?; // data device size in data blocks
//! md.create_thin(1)?;
//! // A write to an unprovisioned block: allocate, then map.
//! let block = md.alloc_data_block()?;
//! assert_eq!(md.insert(1, 42, block)?, None);
//! md.commit()?;
//! // A snapshot shares the origin's mappings; both now see them as shared.
//! md.create_snap(2, 1)?;
//! assert!(md.lookup(1, 42)?.unwrap().shared);
//! // Breaking sharing in the origin: a new block replaces the old mapping, whose
//! // reference the caller then drops (the snapshot still holds the old block).
//! let copy = md.alloc_data_block()?;
//! let old = md.insert(1, 42, copy)?.unwrap();
//! assert_eq!(md.dec_data_block(old)?, 1);
//! md.commit()?;
//! # Ok::<(), persistent_data::Error>(())
//! ```

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use blockdev::BlockDevice;

use crate::block::{Block, Expect, is_zero, le32, le64, put32, put64};
use crate::btree::{self, Cursor, NoRefs, ValueRefs};
use crate::cache::{Cache, CacheStats, DEFAULT_CACHE_BLOCKS};
use crate::data_sm::DataSm;
use crate::error::{Error, Result};
use crate::space_map::{MAX_METADATA_BLOCKS, SmRoot};
use crate::superblock::{METADATA_VERSION, NEEDS_CHECK, Superblock};
use crate::tm::{COUNT_VALUE_SIZE, Tm};

mod deletion;
mod delta;
mod format;
mod merge;
mod views;
pub use deletion::{FIRST_DELETING_ID, PendingDelete, Released, SHARED_LEAF_COST};
pub use delta::{Delta, DeltaKind, DeltaPiece, DeltaSource};
pub use format::{MetadataFormat, is_format_marker};

/// Largest thin device id (24 bits).
pub const MAX_DEV_ID: u64 = (1 << 24) - 1;
/// Mapping times are 24 bits wide.
pub const MAX_TIME: u32 = (1 << 24) - 1;
/// Largest data block number a mapping can hold (40 bits).
pub const MAX_DATA_BLOCK: u64 = (1 << 40) - 1;
/// A metadata device larger than this (16 GiB) gets a warning that the excess is unused.
pub const METADATA_WARNING_BYTES: u64 = 16 << 30;
/// The smallest metadata device we format (256 KiB).
pub const MIN_METADATA_BLOCKS: u64 = 64;
/// Metadata blocks one mapping change may allocate: copies of a top-level and a
/// bottom-level path, node splits on the way, a data bitmap and overflow-tree nodes.
const CHANGE_HEADROOM: u64 = 24;
/// Values of the mapping trees (block_time, bottom roots) are u64.
const MAPPING_VALUE_SIZE: u32 = 8;
/// Device-details records are 24 bytes.
const DETAILS_VALUE_SIZE: u32 = 24;

/// What to do with a device that holds no metadata yet, or holds some.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatPolicy {
    /// Open existing metadata only; a blank device is [`Error::Unformatted`].
    Never,
    /// Format a blank device (all-zero block 0); open anything else.
    IfBlank,
    /// Format whatever is there (destroys existing metadata).
    Force,
}

/// How to open a metadata device.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// The pool's data block size in sectors; must match existing metadata.
    pub data_block_size: u32,
    /// Cache capacity in 4 KiB blocks.
    pub cache_blocks: usize,
    pub format: FormatPolicy,
}

impl OpenOptions {
    /// Default cache (16 MiB), format only a blank device.
    pub fn new(data_block_size: u32) -> Self {
        OpenOptions {
            data_block_size,
            cache_blocks: DEFAULT_CACHE_BLOCKS,
            format: FormatPolicy::IfBlank,
        }
    }
}

/// What opening found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenReport {
    /// The device was formatted by this open.
    pub formatted: bool,
    /// Size of the device in 4 KiB blocks.
    pub device_blocks: u64,
    /// Blocks the metadata uses (at most 4,161,600).
    pub metadata_blocks: u64,
    /// Set when the device is larger than 16 GiB: the excess is not used.
    pub warning: Option<SizeWarning>,
}

/// The metadata device is larger than the format can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeWarning {
    pub device_sectors: u64,
    pub used_sectors: u64,
}

impl fmt::Display for SizeWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "metadata device is {} sectors, larger than {} sectors: excess space will not be used",
            self.device_sectors, self.used_sectors
        )
    }
}

/// Per-device record of the details tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceDetails {
    /// Number of mapped virtual blocks.
    pub mapped_blocks: u64,
    /// Pool transaction id when the device was created.
    pub transaction_id: u64,
    /// Pool time when the device was created.
    pub creation_time: u32,
    /// Pool time of the latest snapshot of (or creating) this device.
    pub snapshotted_time: u32,
}

impl DeviceDetails {
    pub(crate) fn decode(bytes: &[u8]) -> Self {
        DeviceDetails {
            mapped_blocks: le64(bytes, 0),
            transaction_id: le64(bytes, 8),
            creation_time: le32(bytes, 16),
            snapshotted_time: le32(bytes, 20),
        }
    }

    fn encode(&self) -> [u8; 24] {
        let mut out = [0; 24];
        put64(&mut out, 0, self.mapped_blocks);
        put64(&mut out, 8, self.transaction_id);
        put32(&mut out, 16, self.creation_time);
        put32(&mut out, 20, self.snapshotted_time);
        out
    }
}

/// Where a virtual block lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub data_block: u64,
    /// Pool time when the mapping was made.
    pub time: u32,
    /// The device was snapshotted after the mapping was made: a write must break
    /// sharing (copy to a new block). Advisory, as in dm-thin; counts decide freeing.
    pub shared: bool,
}

/// Packs a mapping value: data block in the upper 40 bits, time in the lower 24.
pub fn pack_block_time(data_block: u64, time: u32) -> u64 {
    (data_block << 24) | u64::from(time & MAX_TIME)
}

/// Unpacks a mapping value into (data block, time).
pub fn unpack_block_time(value: u64) -> (u64, u32) {
    (value >> 24, (value & u64::from(MAX_TIME)) as u32)
}

/// A stretch of virtual blocks that are all mapped or all unmapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    Unmapped {
        begin: u64,
        len: u64,
    },
    /// Virtual `begin..begin+len` maps to data `data_begin..data_begin+len`, all
    /// with the same sharing state.
    Mapped {
        begin: u64,
        len: u64,
        data_begin: u64,
        shared: bool,
    },
}

impl Run {
    /// One past the last virtual block of the run.
    pub fn end(&self) -> u64 {
        match *self {
            Run::Unmapped { begin, len } | Run::Mapped { begin, len, .. } => begin + len,
        }
    }
}

/// Mappings removed by [`ThinMetadata::remove_range`]: virtual `begin..begin+len`
/// mapped to data `data_begin..data_begin+len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemovedRun {
    pub begin: u64,
    pub data_begin: u64,
    pub len: u64,
}

/// Adds the unmapped entry `key` → `value` (a bottom-level value) to `runs`, which
/// are in key order.
fn push_removed(runs: &mut Vec<RemovedRun>, key: u64, value: &[u8]) {
    let data = unpack_block_time(le64(value, 0)).0;
    match runs.last_mut() {
        Some(run) if run.begin + run.len == key && run.data_begin + run.len == data => run.len += 1,
        _ => runs.push(RemovedRun {
            begin: key,
            data_begin: data,
            len: 1,
        }),
    }
}

/// Leaf values of bottom-level mapping trees refer to data blocks.
pub(crate) struct DataRefs<'a>(pub &'a mut DataSm);

impl ValueRefs for DataRefs<'_> {
    fn value_size(&self) -> u32 {
        MAPPING_VALUE_SIZE
    }
    fn inc(&mut self, tm: &mut Tm, value: &[u8]) -> Result<()> {
        self.0
            .inc(tm, unpack_block_time(le64(value, 0)).0)
            .map(drop)
    }
    fn dec(&mut self, tm: &mut Tm, value: &[u8]) -> Result<()> {
        self.0
            .dec(tm, unpack_block_time(le64(value, 0)).0)
            .map(drop)
    }
}

/// Leaf values of the top-level mapping tree are bottom-tree roots.
pub(crate) struct SubtreeRefs<'a>(pub &'a mut DataSm);

impl ValueRefs for SubtreeRefs<'_> {
    fn value_size(&self) -> u32 {
        MAPPING_VALUE_SIZE
    }
    fn inc(&mut self, tm: &mut Tm, value: &[u8]) -> Result<()> {
        tm.inc(le64(value, 0))
    }
    fn dec(&mut self, tm: &mut Tm, value: &[u8]) -> Result<()> {
        btree::delete_tree(tm, le64(value, 0), &mut DataRefs(&mut *self.0))
    }
}

#[derive(Clone, Copy, Debug)]
struct CachedDetails {
    details: DeviceDetails,
    dirty: bool,
}

/// The roots and counters of one view of the metadata (live or snapshot), for
/// readers such as the XML dump and the checker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roots {
    pub mapping_root: u64,
    pub details_root: u64,
    pub time: u32,
    pub trans_id: u64,
    pub flags: u32,
    pub data_block_size: u32,
    pub nr_data_blocks: u64,
}

/// An open thin-pool metadata device.
pub struct ThinMetadata {
    tm: Tm,
    dsm: DataSm,
    /// The superblock as of the current transaction (roots updated at commit).
    sb: Superblock,
    mapping_root: u64,
    details_root: u64,
    details: BTreeMap<u64, CachedDetails>,
}

impl ThinMetadata {
    /// Opens (or, per `options.format`, formats) the metadata on `device`. A device
    /// whose format was interrupted counts as blank.
    pub fn open(device: Box<dyn BlockDevice>, options: &OpenOptions) -> Result<(Self, OpenReport)> {
        let (mut cache, geometry) = open_device(device, options)?;
        let block0 = cache.read_raw(0)?;
        let blank = is_zero(&block0) || is_format_marker(&block0);
        let format = match options.format {
            FormatPolicy::Force => true,
            FormatPolicy::IfBlank => blank,
            FormatPolicy::Never if blank => return Err(Error::Unformatted),
            FormatPolicy::Never => false,
        };
        if format {
            return MetadataFormat::begin(cache, &geometry, options.data_block_size, 0)?.run();
        }
        let sb = Superblock::decode(0, &block0)?;
        let metadata = ThinMetadata::from_superblock(
            cache,
            sb,
            options.data_block_size,
            geometry.device_blocks,
        )?;
        let report = OpenReport {
            formatted: false,
            device_blocks: geometry.device_blocks,
            metadata_blocks: metadata.tm.nr_blocks(),
            warning: geometry.warning,
        };
        Ok((metadata, report))
    }

    /// Empty metadata of `nr_blocks` blocks and no data blocks, not yet written.
    fn empty(cache: Cache, nr_blocks: u64, data_block_size: u32) -> Result<Self> {
        let mut tm = Tm::blank(cache, nr_blocks);
        tm.claim_superblock();
        let overflow = btree::empty_tree(&mut tm, COUNT_VALUE_SIZE)?;
        tm.set_overflow_root(overflow);
        let dsm = DataSm::create(&mut tm)?;
        let mapping_root = btree::empty_tree(&mut tm, MAPPING_VALUE_SIZE)?;
        let details_root = btree::empty_tree(&mut tm, DETAILS_VALUE_SIZE)?;
        let sb = Superblock {
            flags: 0,
            uuid: [0; 16],
            version: METADATA_VERSION,
            time: 0,
            trans_id: 0,
            held_root: 0,
            data_sm_root: SmRoot::default(),
            metadata_sm_root: SmRoot::default(),
            data_mapping_root: mapping_root,
            device_details_root: details_root,
            data_block_size,
            metadata_nr_blocks: nr_blocks,
            compat_flags: 0,
            compat_ro_flags: 0,
            incompat_flags: 0,
        };
        Ok(ThinMetadata {
            tm,
            dsm,
            sb,
            mapping_root,
            details_root,
            details: BTreeMap::new(),
        })
    }

    fn from_superblock(
        cache: Cache,
        sb: Superblock,
        data_block_size: u32,
        device_blocks: u64,
    ) -> Result<Self> {
        check_superblock(&sb, data_block_size, device_blocks)?;
        let tm = Tm::open(cache, sb.metadata_sm_root)?;
        Ok(ThinMetadata {
            tm,
            dsm: DataSm::open(&sb.data_sm_root),
            mapping_root: sb.data_mapping_root,
            details_root: sb.device_details_root,
            sb,
            details: BTreeMap::new(),
        })
    }

    /// Makes the current transaction durable: writes every changed block, flushes,
    /// writes the superblock, flushes.
    pub fn commit(&mut self) -> Result<()> {
        self.seal_transaction(true)
    }

    /// Writes every changed block and starts a new transaction as a commit does,
    /// but leaves block 0 alone: for a format, whose last step writes the superblock.
    fn write_transaction(&mut self) -> Result<()> {
        self.seal_transaction(false)
    }

    fn seal_transaction(&mut self, superblock: bool) -> Result<()> {
        // Deferred index entries are ordinary changes of this transaction: they are
        // written before the commit may use the blocks kept back for it.
        self.dsm.write_back(&mut self.tm)?;
        self.tm.begin_commit();
        self.flush_details()?;
        let prepared = self.tm.prepare_commit()?;
        let mut sb = self.sb.clone();
        sb.data_sm_root = self.dsm.root();
        sb.metadata_sm_root = prepared.root;
        sb.data_mapping_root = self.mapping_root;
        sb.device_details_root = self.details_root;
        if superblock {
            self.tm.write_dirty_and_flush()?;
            self.tm.write_superblock(0, &sb.encode(0))?;
        } else {
            self.tm.cache_mut().write_dirty()?;
        }
        self.sb = sb;
        self.tm.finish_commit(prepared);
        self.dsm.finish_commit();
        self.details.clear();
        Ok(())
    }

    /// Throws the current transaction away and returns to the last commit (re-reads
    /// block 0).
    pub fn abort(&mut self) -> Result<()> {
        self.details.clear();
        let block0 = self.tm.cache_mut().read_raw(0)?;
        let sb = Superblock::decode(0, &block0)?;
        let device_blocks = self.tm.cache_mut().device_blocks();
        check_superblock(&sb, sb.data_block_size, device_blocks)?;
        self.tm.reload(sb.metadata_sm_root)?;
        self.dsm = DataSm::open(&sb.data_sm_root);
        self.mapping_root = sb.data_mapping_root;
        self.details_root = sb.device_details_root;
        self.sb = sb;
        Ok(())
    }

    /// The userland transaction id.
    pub fn transaction_id(&self) -> u64 {
        self.sb.trans_id
    }

    /// Compare-and-swap of the transaction id (persisted at the next commit).
    pub fn set_transaction_id(&mut self, current: u64, new: u64) -> Result<()> {
        if current != self.sb.trans_id {
            return Err(Error::TransactionIdMismatch {
                expected: current,
                actual: self.sb.trans_id,
            });
        }
        self.sb.trans_id = new;
        Ok(())
    }

    /// The pool time (number of snapshots taken).
    pub fn time(&self) -> u32 {
        self.sb.time
    }

    /// The data block size in sectors.
    pub fn data_block_size(&self) -> u32 {
        self.sb.data_block_size
    }

    /// Whether the needs_check flag is set.
    pub fn needs_check(&self) -> bool {
        self.sb.flags & NEEDS_CHECK != 0
    }

    /// Sets the needs_check flag (persisted at the next commit; after a failed
    /// operation: `abort`, then this, then `commit`).
    pub fn set_needs_check(&mut self) {
        self.sb.flags |= NEEDS_CHECK;
    }

    /// Clears the needs_check flag (after an offline check).
    pub fn clear_needs_check(&mut self) {
        self.sb.flags &= !NEEDS_CHECK;
    }

    fn check_dev_id(dev: u64) -> Result<()> {
        if dev > MAX_DEV_ID {
            return Err(Error::BadDeviceId(dev));
        }
        Ok(())
    }

    /// An id a new device may take: in range and not reserved for deletions.
    fn check_new_dev_id(dev: u64) -> Result<()> {
        Self::check_dev_id(dev)?;
        if Self::is_reserved_id(dev) {
            return Err(Error::ReservedDeviceId(dev));
        }
        Ok(())
    }

    fn bottom_root(&mut self, dev: u64) -> Result<u64> {
        Self::check_dev_id(dev)?;
        btree::lookup(&mut self.tm, self.mapping_root, dev, MAPPING_VALUE_SIZE)?
            .map(|value| value.u64())
            .ok_or(Error::NoSuchDevice(dev))
    }

    /// Whether the device exists.
    pub fn device_exists(&mut self, dev: u64) -> Result<bool> {
        match self.bottom_root(dev) {
            Ok(_) => Ok(true),
            Err(Error::NoSuchDevice(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }

    fn details_entry(&mut self, dev: u64) -> Result<&mut CachedDetails> {
        if !self.details.contains_key(&dev) {
            let value = btree::lookup(&mut self.tm, self.details_root, dev, DETAILS_VALUE_SIZE)?
                .ok_or(Error::NoSuchDevice(dev))?;
            self.details.insert(
                dev,
                CachedDetails {
                    details: DeviceDetails::decode(value.bytes()),
                    dirty: false,
                },
            );
        }
        Ok(self.details.get_mut(&dev).expect("just loaded"))
    }

    /// The device's details record.
    pub fn device_details(&mut self, dev: u64) -> Result<DeviceDetails> {
        Self::check_dev_id(dev)?;
        Ok(self.details_entry(dev)?.details)
    }

    fn update_details(&mut self, dev: u64, f: impl FnOnce(&mut DeviceDetails)) -> Result<()> {
        let entry = self.details_entry(dev)?;
        f(&mut entry.details);
        entry.dirty = true;
        Ok(())
    }

    /// Every thin device id, ascending.
    pub fn devices(&mut self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let mut cursor = Cursor::seek(&mut self.tm, self.mapping_root, 0, MAPPING_VALUE_SIZE)?;
        while let Some((dev, _)) = cursor.entry() {
            out.push(dev);
            cursor.advance(&mut self.tm)?;
        }
        Ok(out)
    }

    /// Creates an empty thin device.
    pub fn create_thin(&mut self, dev: u64) -> Result<()> {
        Self::check_new_dev_id(dev)?;
        if self.device_exists(dev)? {
            return Err(Error::DeviceExists(dev));
        }
        let root = btree::empty_tree(&mut self.tm, MAPPING_VALUE_SIZE)?;
        self.add_device(dev, root, 0, self.sb.time)
    }

    fn add_device(&mut self, dev: u64, root: u64, mapped_blocks: u64, time: u32) -> Result<()> {
        self.mapping_root = btree::insert(
            &mut self.tm,
            self.mapping_root,
            dev,
            &root.to_le_bytes(),
            &mut SubtreeRefs(&mut self.dsm),
        )?
        .0;
        self.details.insert(
            dev,
            CachedDetails {
                details: DeviceDetails {
                    mapped_blocks,
                    transaction_id: self.sb.trans_id,
                    creation_time: time,
                    snapshotted_time: time,
                },
                dirty: true,
            },
        );
        Ok(())
    }

    /// Creates `dev` as a snapshot of `origin`: it shares the origin's mapping tree
    /// (one more reference on its root), and the pool time advances. The origin must
    /// be quiesced by the caller.
    pub fn create_snap(&mut self, dev: u64, origin: u64) -> Result<()> {
        Self::check_new_dev_id(dev)?;
        if Self::is_reserved_id(origin) {
            return Err(Error::NoSuchDevice(origin));
        }
        if self.device_exists(dev)? {
            return Err(Error::DeviceExists(dev));
        }
        let root = self.bottom_root(origin)?;
        if self.sb.time >= MAX_TIME {
            return Err(Error::TimeExhausted);
        }
        let origin_mapped = self.device_details(origin)?.mapped_blocks;
        self.tm.inc(root)?;
        self.sb.time += 1;
        let time = self.sb.time;
        self.add_device(dev, root, origin_mapped, time)?;
        self.update_details(origin, |details| details.snapshotted_time = time)
    }

    /// Deletes a device and drops its references (its blocks become free at the next
    /// commit unless something else still maps them).
    pub fn delete(&mut self, dev: u64) -> Result<()> {
        let root = self.detach(dev)?;
        btree::delete_tree(&mut self.tm, root, &mut DataRefs(&mut self.dsm))
    }

    /// Takes device `dev` out of both trees; returns its mapping tree's root, whose
    /// reference the caller now owns.
    fn detach(&mut self, dev: u64) -> Result<u64> {
        Self::check_dev_id(dev)?;
        let (mapping_root, removed) = btree::remove(
            &mut self.tm,
            self.mapping_root,
            dev,
            &mut SubtreeRefs(&mut self.dsm),
        )?;
        let root = removed.ok_or(Error::NoSuchDevice(dev))?.u64();
        self.mapping_root = mapping_root;
        self.details.remove(&dev);
        self.details_root = btree::remove(
            &mut self.tm,
            self.details_root,
            dev,
            &mut NoRefs(DETAILS_VALUE_SIZE),
        )?
        .0;
        Ok(root)
    }

    /// The mapping of one virtual block.
    pub fn lookup(&mut self, dev: u64, vblock: u64) -> Result<Option<Mapping>> {
        let root = self.bottom_root(dev)?;
        let Some(value) = btree::lookup(&mut self.tm, root, vblock, MAPPING_VALUE_SIZE)? else {
            return Ok(None);
        };
        let (data_block, time) = unpack_block_time(value.u64());
        let snapshotted = self.device_details(dev)?.snapshotted_time;
        Ok(Some(Mapping {
            data_block,
            time,
            shared: snapshotted > time,
        }))
    }

    /// Runs of mapped and unmapped blocks covering `begin..end`, in order, at most
    /// `max_runs` of them (continue from the last run's end for more). Mapped runs
    /// are contiguous on the data device and have one sharing state.
    pub fn lookup_range(
        &mut self,
        dev: u64,
        begin: u64,
        end: u64,
        max_runs: usize,
    ) -> Result<Vec<Run>> {
        let root = self.bottom_root(dev)?;
        let snapshotted = self.device_details(dev)?.snapshotted_time;
        let mut runs: Vec<Run> = Vec::new();
        let mut position = begin;
        let mut cursor = Cursor::seek(&mut self.tm, root, begin, MAPPING_VALUE_SIZE)?;
        while position < end && runs.len() < max_runs.max(1) {
            let next = cursor.entry().map(|(key, value)| (key, le64(value, 0)));
            match next {
                Some((key, value)) if key < end => {
                    if key > position {
                        runs.push(Run::Unmapped {
                            begin: position,
                            len: key - position,
                        });
                        if runs.len() >= max_runs.max(1) {
                            break;
                        }
                    }
                    let (data, time) = unpack_block_time(value);
                    let shared = snapshotted > time;
                    match runs.last_mut() {
                        Some(Run::Mapped {
                            begin,
                            len,
                            data_begin,
                            shared: run_shared,
                        }) if *begin + *len == key
                            && *data_begin + *len == data
                            && *run_shared == shared =>
                        {
                            *len += 1
                        }
                        _ => runs.push(Run::Mapped {
                            begin: key,
                            len: 1,
                            data_begin: data,
                            shared,
                        }),
                    }
                    position = key + 1;
                    cursor.advance(&mut self.tm)?;
                }
                _ => {
                    runs.push(Run::Unmapped {
                        begin: position,
                        len: end - position,
                    });
                    position = end;
                }
            }
        }
        Ok(runs)
    }

    /// Maps `vblock` to `data_block` at the current pool time. Returns the data block
    /// it was mapped to before, whose reference the caller now owns (see the module
    /// doc); the new block's reference passes to the mapping.
    pub fn insert(&mut self, dev: u64, vblock: u64, data_block: u64) -> Result<Option<u64>> {
        if data_block >= self.dsm.nr_blocks() {
            return Err(Error::DataBlockOutOfRange {
                block: data_block,
                nr_blocks: self.dsm.nr_blocks(),
            });
        }
        let value = pack_block_time(data_block, self.sb.time);
        let mut old = None;
        self.with_bottom_tree(dev, |tm, dsm, root| {
            let (root, previous) =
                btree::insert(tm, root, vblock, &value.to_le_bytes(), &mut DataRefs(dsm))?;
            old = previous.map(|v| unpack_block_time(v.u64()).0);
            Ok(root)
        })?;
        if old.is_none() {
            self.update_details(dev, |details| details.mapped_blocks += 1)?;
        }
        Ok(old)
    }

    /// Unmaps one virtual block; returns what it was mapped to (the caller owns that
    /// reference).
    pub fn remove(&mut self, dev: u64, vblock: u64) -> Result<Option<Mapping>> {
        let snapshotted = self.device_details(dev)?.snapshotted_time;
        let mut removed = None;
        self.with_bottom_tree(dev, |tm, dsm, root| {
            let (root, value) = btree::remove(tm, root, vblock, &mut DataRefs(dsm))?;
            removed = value.map(|v| {
                let (data_block, time) = unpack_block_time(v.u64());
                Mapping {
                    data_block,
                    time,
                    shared: snapshotted > time,
                }
            });
            Ok(root)
        })?;
        if removed.is_some() {
            self.update_details(dev, |details| {
                details.mapped_blocks = details.mapped_blocks.saturating_sub(1)
            })?;
        }
        Ok(removed)
    }

    /// Unmaps every block in `begin..end`; returns what was unmapped as runs (the
    /// caller owns those references).
    pub fn remove_range(&mut self, dev: u64, begin: u64, end: u64) -> Result<Vec<RemovedRun>> {
        let mut runs: Vec<RemovedRun> = Vec::new();
        if begin >= end {
            self.bottom_root(dev)?;
            return Ok(runs);
        }
        let mut count = 0u64;
        self.with_bottom_tree(dev, |tm, dsm, root| {
            btree::remove_range(
                tm,
                root,
                begin,
                end - 1,
                &mut DataRefs(dsm),
                &mut |key, value| {
                    count += 1;
                    push_removed(&mut runs, key, value);
                    Ok(())
                },
            )
        })?;
        if count > 0 {
            self.update_details(dev, |details| {
                details.mapped_blocks = details.mapped_blocks.saturating_sub(count)
            })?;
        }
        Ok(runs)
    }

    /// Unmaps the lowest `budget` mappings (at least one) in `begin..end`, so that
    /// a long range is unmapped in bounded pieces. Returns what was unmapped (as
    /// [`ThinMetadata::remove_range`] does) and the virtual block the rest of the
    /// range starts at (`end` once nothing is left in it).
    pub fn remove_range_bounded(
        &mut self,
        dev: u64,
        begin: u64,
        end: u64,
        budget: u64,
    ) -> Result<(Vec<RemovedRun>, u64)> {
        let root = self.bottom_root(dev)?;
        let mut cursor = Cursor::seek(&mut self.tm, root, begin, MAPPING_VALUE_SIZE)?;
        let (mut found, mut rest) = (0, end);
        while let Some((key, _)) = cursor.entry() {
            if key >= end {
                break;
            }
            if found == budget.max(1) {
                rest = key;
                break;
            }
            found += 1;
            cursor.advance(&mut self.tm)?;
        }
        drop(cursor);
        if found == 0 {
            return Ok((Vec::new(), end));
        }
        Ok((self.remove_range(dev, begin, rest)?, rest))
    }

    /// Runs `f` on the device's bottom tree after shadowing the top-level path to it
    /// (so sharing of the top level is broken first), then stores the new root.
    fn with_bottom_tree(
        &mut self,
        dev: u64,
        f: impl FnOnce(&mut Tm, &mut DataSm, u64) -> Result<u64>,
    ) -> Result<()> {
        Self::check_dev_id(dev)?;
        let (mapping_root, leaf) = btree::shadow_path(
            &mut self.tm,
            self.mapping_root,
            dev,
            &mut SubtreeRefs(&mut self.dsm),
        )?;
        self.mapping_root = mapping_root;
        let (leaf, index) = leaf.ok_or(Error::NoSuchDevice(dev))?;
        let expect = Expect::Node {
            value_size: MAPPING_VALUE_SIZE,
        };
        let root = btree::Node(&*self.tm.read(leaf, expect)?).value_u64(index);
        let new_root = f(&mut self.tm, &mut self.dsm, root)?;
        if new_root != root {
            btree::NodeMut(self.tm.write(leaf, expect)?).set_value(index, &new_root.to_le_bytes());
        }
        Ok(())
    }

    /// Number of mapped blocks of the device.
    pub fn mapped_blocks(&mut self, dev: u64) -> Result<u64> {
        Ok(self.device_details(dev)?.mapped_blocks)
    }

    /// The highest mapped virtual block of the device.
    pub fn highest_mapped(&mut self, dev: u64) -> Result<Option<u64>> {
        let root = self.bottom_root(dev)?;
        btree::last_key(&mut self.tm, root, MAPPING_VALUE_SIZE)
    }

    /// Allocates a data block (count 1) that is free now and was free at the last
    /// commit. [`Error::NoDataSpace`] when none is left (a commit may free some).
    pub fn alloc_data_block(&mut self) -> Result<u64> {
        self.dsm.alloc(&mut self.tm)
    }

    /// Adds a reference to a data block; returns the new count.
    pub fn inc_data_block(&mut self, block: u64) -> Result<u32> {
        self.dsm.inc(&mut self.tm, block)
    }

    /// Drops a reference to a data block; returns the new count (0: free).
    pub fn dec_data_block(&mut self, block: u64) -> Result<u32> {
        self.dsm.dec(&mut self.tm, block)
    }

    /// The reference count of a data block.
    pub fn data_block_count(&mut self, block: u64) -> Result<u32> {
        self.dsm.count(&mut self.tm, block)
    }

    /// Data blocks in the pool.
    pub fn data_nr_blocks(&self) -> u64 {
        self.dsm.nr_blocks()
    }

    /// Data blocks not in use.
    pub fn data_free_blocks(&self) -> u64 {
        self.dsm.nr_blocks().saturating_sub(self.dsm.nr_allocated())
    }

    /// Grows the data space map to `nr_blocks` data blocks.
    pub fn resize_data(&mut self, nr_blocks: u64) -> Result<()> {
        if nr_blocks > MAX_DATA_BLOCK + 1 {
            return Err(Error::DataBlockOutOfRange {
                block: nr_blocks,
                nr_blocks: MAX_DATA_BLOCK + 1,
            });
        }
        self.dsm.resize(&mut self.tm, nr_blocks)
    }

    /// Uses a grown metadata device: the space map grows to the device's size (at
    /// most 4,161,600 blocks); persisted at the next commit. Returns the new number
    /// of metadata blocks. The metadata never shrinks.
    pub fn resize_metadata(&mut self) -> Result<u64> {
        let device_blocks = self.tm.cache_mut().device_blocks();
        let nr_blocks = device_blocks.min(MAX_METADATA_BLOCKS);
        if nr_blocks < self.tm.nr_blocks() {
            return Err(Error::DeviceTooSmall {
                device_blocks,
                needed_blocks: self.tm.nr_blocks(),
            });
        }
        self.tm.grow(nr_blocks);
        self.sb.metadata_nr_blocks = nr_blocks;
        Ok(nr_blocks)
    }

    /// Moves the metadata onto `device`, a larger device that begins with the
    /// current one's blocks (a live pool's metadata device grown by a table reload),
    /// and grows the space map onto it as [`ThinMetadata::resize_metadata`] does.
    /// Returns the new number of metadata blocks and, above 16 GiB, the warning that
    /// the excess is unused. A device smaller than the metadata is refused and the
    /// current one kept.
    pub fn grow_onto(
        &mut self,
        device: Box<dyn BlockDevice>,
    ) -> Result<(u64, Option<SizeWarning>)> {
        let device_sectors = device.info().sectors;
        let old = core::mem::replace(self.tm.cache_mut().device_mut(), device);
        match self.resize_metadata() {
            Ok(nr_blocks) => {
                let warning =
                    (device_sectors * 512 > METADATA_WARNING_BYTES).then_some(SizeWarning {
                        device_sectors,
                        used_sectors: MAX_METADATA_BLOCKS * 8,
                    });
                Ok((nr_blocks, warning))
            }
            Err(error) => {
                *self.tm.cache_mut().device_mut() = old;
                Err(error)
            }
        }
    }

    /// Metadata blocks managed (the usable size of the metadata device).
    pub fn metadata_nr_blocks(&self) -> u64 {
        self.tm.nr_blocks()
    }

    /// Metadata blocks not in use.
    pub fn metadata_free_blocks(&self) -> u64 {
        self.tm.nr_blocks().saturating_sub(self.tm.nr_allocated())
    }

    /// Free metadata blocks kept out of the reported free count: dm-thin's reserve
    /// (min(4096 blocks, 10 % of the metadata)) or, when larger (small devices), the
    /// blocks a commit needs (which allocation never hands out) plus room for one
    /// more change. Status shows used = total − (free − reserve); the pool stops
    /// making new mappings (out-of-metadata-space) when the reported free count
    /// reaches zero, so changes and commits always find the blocks they need.
    pub fn metadata_reserve(&self) -> u64 {
        let dm_reserve = (self.tm.nr_blocks() / 10).min(4096);
        dm_reserve.max(self.tm.commit_reserve() + CHANGE_HEADROOM)
    }

    /// Free metadata blocks as dm reports them (the reserve counted as used).
    pub fn metadata_free_blocks_reported(&self) -> u64 {
        self.metadata_free_blocks()
            .saturating_sub(self.metadata_reserve())
    }

    /// Block of the held metadata snapshot, if any.
    pub fn held_root(&self) -> Option<u64> {
        (self.sb.held_root != 0).then_some(self.sb.held_root)
    }

    /// Takes the metadata snapshot: commits, then pins the committed mapping and
    /// details trees under a copy of the superblock. The snapshot is part of the
    /// current transaction: commit to make it durable. Returns its block.
    pub fn reserve_metadata_snap(&mut self) -> Result<u64> {
        if let Some(held) = self.held_root() {
            return Err(Error::SnapshotHeld(held));
        }
        self.commit()?;
        let mut copy = self.sb.clone();
        copy.held_root = 0;
        copy.data_sm_root = SmRoot::default();
        copy.metadata_sm_root = SmRoot::default();
        let (block, data) = self.tm.new_block(Expect::Superblock)?;
        *data = copy.encode(block);
        self.tm.inc(copy.data_mapping_root)?;
        self.tm.inc(copy.device_details_root)?;
        self.sb.held_root = block;
        Ok(block)
    }

    /// Releases the metadata snapshot, dropping its references (commit to persist).
    pub fn release_metadata_snap(&mut self) -> Result<()> {
        let held = self.held_root().ok_or(Error::NoSnapshot)?;
        let copy = self.read_snapshot(held)?;
        self.sb.held_root = 0;
        btree::delete_tree(
            &mut self.tm,
            copy.data_mapping_root,
            &mut SubtreeRefs(&mut self.dsm),
        )?;
        btree::delete_tree(
            &mut self.tm,
            copy.device_details_root,
            &mut NoRefs(DETAILS_VALUE_SIZE),
        )?;
        self.tm.dec(held)
    }

    fn read_snapshot(&mut self, held: u64) -> Result<Superblock> {
        let data: Block = *self.tm.read(held, Expect::Superblock)?;
        Superblock::decode(held, &data)
    }

    /// Roots of the live metadata (the current transaction; dirty device details
    /// are written into the details tree first).
    pub fn live_roots(&mut self) -> Result<Roots> {
        self.flush_details()?;
        Ok(Roots {
            mapping_root: self.mapping_root,
            details_root: self.details_root,
            time: self.sb.time,
            trans_id: self.sb.trans_id,
            flags: self.sb.flags,
            data_block_size: self.sb.data_block_size,
            nr_data_blocks: self.dsm.nr_blocks(),
        })
    }

    /// Roots of the held metadata snapshot ([`Error::NoSnapshot`] when none).
    pub fn snapshot_roots(&mut self) -> Result<Roots> {
        let held = self.held_root().ok_or(Error::NoSnapshot)?;
        let copy = self.read_snapshot(held)?;
        Ok(Roots {
            mapping_root: copy.data_mapping_root,
            details_root: copy.device_details_root,
            time: copy.time,
            trans_id: copy.trans_id,
            flags: copy.flags,
            data_block_size: copy.data_block_size,
            nr_data_blocks: copy.data_sm_root.nr_blocks,
        })
    }

    fn flush_details(&mut self) -> Result<()> {
        let mut refs = NoRefs(DETAILS_VALUE_SIZE);
        for (&dev, cached) in self.details.iter_mut() {
            if cached.dirty {
                self.details_root = btree::insert(
                    &mut self.tm,
                    self.details_root,
                    dev,
                    &cached.details.encode(),
                    &mut refs,
                )?
                .0;
                cached.dirty = false;
            }
        }
        Ok(())
    }

    /// The transaction manager, for readers in this crate.
    pub(crate) fn tm_mut(&mut self) -> &mut Tm {
        &mut self.tm
    }

    /// Cache counters (hits, misses, early and commit writes).
    pub fn cache_stats(&self) -> CacheStats {
        self.tm.cache_stats()
    }
}

fn check_superblock(sb: &Superblock, data_block_size: u32, device_blocks: u64) -> Result<()> {
    if sb.incompat_flags != 0 || sb.compat_ro_flags != 0 {
        return Err(Error::UnsupportedFeatures {
            incompat: sb.incompat_flags,
            compat_ro: sb.compat_ro_flags,
        });
    }
    if sb.data_block_size != data_block_size {
        return Err(Error::DataBlockSizeMismatch {
            on_disk: sb.data_block_size,
            requested: data_block_size,
        });
    }
    let needed = sb.metadata_sm_root.nr_blocks;
    if needed > device_blocks {
        return Err(Error::DeviceTooSmall {
            device_blocks,
            needed_blocks: needed,
        });
    }
    if needed > MAX_METADATA_BLOCKS {
        return Err(Error::Corrupt {
            block: 0,
            reason: "metadata space map larger than the format allows",
        });
    }
    Ok(())
}

/// The size of a metadata device and what the format can use of it.
struct Geometry {
    device_blocks: u64,
    warning: Option<SizeWarning>,
}

impl Geometry {
    /// Blocks the metadata may use (at most the format's limit).
    fn usable_blocks(&self) -> u64 {
        self.device_blocks.min(MAX_METADATA_BLOCKS)
    }
}

/// Checks the options against `device` and puts a cache in front of it.
fn open_device(device: Box<dyn BlockDevice>, options: &OpenOptions) -> Result<(Cache, Geometry)> {
    let size = options.data_block_size;
    if !(128..=2_097_152).contains(&size) || !size.is_multiple_of(128) {
        return Err(Error::BadDataBlockSize(size));
    }
    let cache = Cache::new(device, options.cache_blocks);
    let device_blocks = cache.device_blocks();
    if device_blocks == 0 {
        return Err(Error::DeviceTooSmall {
            device_blocks,
            needed_blocks: MIN_METADATA_BLOCKS,
        });
    }
    let device_bytes = device_blocks * crate::block::BLOCK_SIZE as u64;
    let warning = (device_bytes > METADATA_WARNING_BYTES).then_some(SizeWarning {
        device_sectors: device_bytes / 512,
        used_sectors: MAX_METADATA_BLOCKS * 8,
    });
    Ok((
        cache,
        Geometry {
            device_blocks,
            warning,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Format spec §17.1 item 5 and §18.2: value packing and the details record.
    #[test]
    fn worked_example_values() {
        assert_eq!(pack_block_time(20, 1), 0x0000_0000_1400_0001);
        assert_eq!(pack_block_time(39_999, 16_777_215), 0x0000_009C_3FFF_FFFF);
        assert_eq!(
            unpack_block_time(0x0000_009C_3FFF_FFFF),
            (39_999, 16_777_215)
        );
        let details = DeviceDetails {
            mapped_blocks: 5,
            transaction_id: 2,
            creation_time: 0,
            snapshotted_time: 1,
        };
        let bytes = details.encode();
        assert_eq!(
            &bytes[..],
            &[
                5, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0
            ]
        );
        assert_eq!(DeviceDetails::decode(&bytes), details);
    }
}
