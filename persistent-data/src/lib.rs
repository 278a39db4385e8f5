//! Transactional copy-on-write metadata in the Linux dm-thin on-disk format.
//!
//! The metadata device of a thin pool, byte-compatible with the kernel's
//! `dm-thin-metadata` and with thin-provisioning-tools (`thin_check`, `thin_dump`,
//! `thin_restore` read and write the same bytes). The pool engine uses
//! [`thin::ThinMetadata`]; everything below it mirrors the kernel's persistent-data
//! library.
//!
//! # Layers
//!
//! * [`block`], [`checksum`]: 4 KiB blocks; CRC-32C with a per-type salt and the
//!   self-location field; every block read from disk is validated before use and a
//!   bad block is an [`error::Error`] naming the block and the reason.
//! * [`cache`]: a bounded write-back block cache (CLOCK eviction). Its size is fixed
//!   in blocks, so memory does not grow with the pool; dirty blocks may be written
//!   before their commit because they always live in blocks the committed
//!   superblock does not reach.
//! * [`tm`]: the transaction manager. Blocks are shadowed (copied) before they are
//!   changed unless they were allocated in this transaction and are unshared. It
//!   also holds the metadata space map, which keeps this transaction's count changes
//!   in memory and folds them into new bitmaps and a new index block at commit.
//! * [`btree`]: the CoW b-tree (insert, lookup, remove, range remove, cursors,
//!   deletion) with the format's node layout and fill rules, and reference counting
//!   of shared nodes and of what their values point to.
//! * [`data_sm`]: the data space map (index b-tree, bitmaps, overflow b-tree).
//! * [`superblock`], [`thin`]: the superblock, the device-details tree, the
//!   two-level mapping tree, snapshots, the metadata snapshot and the commit.
//! * [`thin::Delta`], [`delta_xml`]: the delta of two devices' mappings in bounded
//!   steps, and `thin_delta`'s XML of it; pinned views of a device's mappings for
//!   readers that outlive a transaction.
//! * [`xml`]: `thin_dump`-compatible output; [`check`]: a full consistency check
//!   (exact metadata and data reference counts), for tests and offline use.
//!
//! # Commit protocol
//!
//! Write every dirty block (several in flight), flush, write the superblock (which
//! fits in one sector, so its write is atomic), flush. Until the superblock write is
//! durable the previous transaction is the one on disk, and nothing it reaches was
//! overwritten: allocation only hands out blocks that were free at the last commit.
//!
//! Everything is `no_std` + `alloc`; the `std` feature only adds host conveniences.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod block;
pub mod btree;
pub mod cache;
pub mod check;
pub mod checksum;
pub mod data_sm;
pub mod delta_xml;
pub mod error;
pub mod space_map;
pub mod superblock;
pub mod thin;
pub mod tm;
pub mod xml;

pub use error::{Error, Result};
pub use thin::{
    DeviceDetails, FormatPolicy, Mapping, OpenOptions, OpenReport, RemovedRun, Run, ThinMetadata,
};
