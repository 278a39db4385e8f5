//! Errors of the metadata layer, worded for an operator console.

use core::fmt;

use blockdev::IoError;

/// Which kind of metadata block a problem was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Superblock,
    Node,
    Bitmap,
    Index,
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockKind::Superblock => "superblock",
            BlockKind::Node => "btree node",
            BlockKind::Bitmap => "space map bitmap",
            BlockKind::Index => "metadata index block",
        })
    }
}

/// Everything that can go wrong. A mutating call that fails leaves the transaction
/// in an unknown state: call `abort` (which re-reads the last commit) before going
/// on. The committed metadata on disk is never damaged by a failed call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The metadata device failed a request for `block`.
    Io { block: u64, error: IoError },
    /// A flush of the metadata device failed.
    Flush(IoError),
    /// A block on disk does not verify.
    BadBlock {
        block: u64,
        kind: BlockKind,
        reason: &'static str,
    },
    /// A tree points outside the metadata device or has an impossible shape.
    Corrupt { block: u64, reason: &'static str },
    /// Block 0 is all zeros: the device was never formatted.
    Unformatted,
    /// Block 0 holds something that is not dm-thin metadata.
    NotThinMetadata,
    /// The superblock uses features this implementation does not know.
    UnsupportedFeatures { incompat: u32, compat_ro: u32 },
    /// The pool's data block size differs from the one the metadata was made with.
    DataBlockSizeMismatch { on_disk: u32, requested: u32 },
    /// A data block size outside 128..=2097152 sectors or not a multiple of 128.
    BadDataBlockSize(u32),
    /// The metadata device is smaller than the metadata written on it says.
    DeviceTooSmall {
        device_blocks: u64,
        needed_blocks: u64,
    },
    /// No free metadata block is left for this transaction.
    NoMetadataSpace,
    /// No free data block is left until the pool grows or a commit frees some.
    NoDataSpace,
    /// A thin device id that is already taken.
    DeviceExists(u64),
    /// A thin device id that does not exist.
    NoSuchDevice(u64),
    /// Thin device ids are 24 bits.
    BadDeviceId(u64),
    /// The id is one of those kept for devices being deleted.
    ReservedDeviceId(u64),
    /// `set_transaction_id` was given the wrong current value.
    TransactionIdMismatch { expected: u64, actual: u64 },
    /// A metadata snapshot is already held.
    SnapshotHeld(u64),
    /// There is no metadata snapshot to use or release.
    NoSnapshot,
    /// The data space map only grows.
    DataShrink { current: u64, requested: u64 },
    /// A data block number past the end of the data device.
    DataBlockOutOfRange { block: u64, nr_blocks: u64 },
    /// A reference count would drop below zero (a caller bug or corrupt metadata).
    CountUnderflow { block: u64, data: bool },
    /// The pool's time counter is at its 24-bit limit.
    TimeExhausted,
    /// A device cannot be merged into itself.
    MergeIntoItself(u64),
    /// The writer an XML dump was going to failed.
    Output,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { block, error } => write!(f, "metadata I/O error at block {block}: {error}"),
            Error::Flush(error) => write!(f, "metadata device flush failed: {error}"),
            Error::BadBlock {
                block,
                kind,
                reason,
            } => write!(f, "bad {kind} at metadata block {block}: {reason}"),
            Error::Corrupt { block, reason } => {
                write!(f, "corrupt metadata at block {block}: {reason}")
            }
            Error::Unformatted => f.write_str("metadata device is blank (not formatted)"),
            Error::NotThinMetadata => f.write_str(
                "metadata device holds something else (no thin superblock magic); refusing to touch it",
            ),
            Error::UnsupportedFeatures {
                incompat,
                compat_ro,
            } => write!(
                f,
                "metadata uses unsupported features (incompat {incompat:#x}, compat_ro {compat_ro:#x})"
            ),
            Error::DataBlockSizeMismatch { on_disk, requested } => write!(
                f,
                "data block size mismatch: metadata says {on_disk} sectors, pool asks for {requested}; changing it is not supported"
            ),
            Error::BadDataBlockSize(size) => write!(
                f,
                "data block size {size} sectors is invalid (128..2097152, multiple of 128)"
            ),
            Error::DeviceTooSmall {
                device_blocks,
                needed_blocks,
            } => write!(
                f,
                "metadata device too small: {device_blocks} blocks, metadata needs {needed_blocks}"
            ),
            Error::NoMetadataSpace => f.write_str("out of metadata space"),
            Error::NoDataSpace => f.write_str("out of data space"),
            Error::DeviceExists(id) => write!(f, "thin device {id} already exists"),
            Error::NoSuchDevice(id) => write!(f, "thin device {id} does not exist"),
            Error::BadDeviceId(id) => write!(f, "thin device id {id} is out of range (0..16777215)"),
            Error::ReservedDeviceId(id) => write!(
                f,
                "thin device id {id} is reserved for deletions in progress (new devices take ids 0..{})",
                crate::thin::FIRST_DELETING_ID - 1
            ),
            Error::TransactionIdMismatch { expected, actual } => write!(
                f,
                "mismatched transaction id: given {expected}, metadata has {actual}"
            ),
            Error::SnapshotHeld(block) => write!(
                f,
                "a metadata snapshot is already held (block {block}); release it before taking another"
            ),
            Error::NoSnapshot => f.write_str("no metadata snapshot is held"),
            Error::DataShrink { current, requested } => write!(
                f,
                "data device cannot shrink from {current} to {requested} blocks"
            ),
            Error::DataBlockOutOfRange { block, nr_blocks } => write!(
                f,
                "data block {block} is past the end of the data device ({nr_blocks} blocks)"
            ),
            Error::CountUnderflow { block, data } => write!(
                f,
                "reference count of {} block {block} would drop below zero",
                if *data { "data" } else { "metadata" }
            ),
            Error::TimeExhausted => f.write_str("pool time counter exhausted (2^24 snapshots)"),
            Error::MergeIntoItself(id) => write!(f, "thin device {id} cannot be merged into itself"),
            Error::Output => f.write_str("writing the metadata dump failed"),
        }
    }
}

impl core::error::Error for Error {}

/// Results of this crate.
pub type Result<T> = core::result::Result<T, Error>;
