//! What a pool reports: its mode, dm-format status lines, per-volume usage and the
//! events a console prints.

use alloc::string::String;
use core::fmt;

/// The pool's operating mode, from healthy to degraded (dm-thin's order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PoolMode {
    /// Everything works.
    Write,
    /// No free data block: writes that need one wait (or fail with ENOSPC).
    OutOfDataSpace,
    /// Free metadata is down to the reserve: no new mappings, messages refused.
    OutOfMetadataSpace,
    /// Metadata is not changed (table feature, or after a metadata failure).
    ReadOnly,
    /// Metadata could not even be rolled back: every I/O fails.
    Fail,
}

impl PoolMode {
    /// The mode word of the status line.
    pub fn status_word(self) -> &'static str {
        match self {
            PoolMode::Write => "rw",
            PoolMode::OutOfDataSpace => "out_of_data_space",
            PoolMode::OutOfMetadataSpace | PoolMode::ReadOnly => "ro",
            PoolMode::Fail => "Fail",
        }
    }

    /// Whether metadata may change.
    pub(crate) fn metadata_writable(self) -> bool {
        self <= PoolMode::OutOfDataSpace
    }
}

/// How discards are handled (status field 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscardMode {
    Ignore,
    NoPassdown,
    Passdown,
}

impl DiscardMode {
    pub fn word(self) -> &'static str {
        match self {
            DiscardMode::Ignore => "ignore_discard",
            DiscardMode::NoPassdown => "no_discard_passdown",
            DiscardMode::Passdown => "discard_passdown",
        }
    }
}

/// The pool status (`dmsetup status`, INFO), fields after `<start> <length> thin-pool`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStatus {
    pub mode: PoolMode,
    pub transaction_id: u64,
    /// Used metadata blocks, the hidden reserve included (as dm reports it).
    pub metadata_used: u64,
    pub metadata_total: u64,
    pub data_used: u64,
    pub data_total: u64,
    /// Block of the held metadata snapshot.
    pub held_root: Option<u64>,
    pub discard: DiscardMode,
    /// `error_if_no_space` is in force (by the table, or after the no-space timeout).
    pub error_if_no_space: bool,
    pub needs_check: bool,
    /// Metadata low watermark in blocks: min(1024, a quarter of the metadata).
    pub metadata_low_watermark: u64,
}

impl fmt::Display for PoolStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mode == PoolMode::Fail {
            return f.write_str("Fail");
        }
        write!(
            f,
            "{} {}/{} {}/{} ",
            self.transaction_id,
            self.metadata_used,
            self.metadata_total,
            self.data_used,
            self.data_total
        )?;
        match self.held_root {
            Some(block) => write!(f, "{block} ")?,
            None => f.write_str("- ")?,
        }
        write!(
            f,
            "{} {} {} {} {}",
            self.mode.status_word(),
            self.discard.word(),
            if self.error_if_no_space {
                "error_if_no_space"
            } else {
                "queue_if_no_space"
            },
            if self.needs_check { "needs_check" } else { "-" },
            self.metadata_low_watermark
        )
    }
}

/// A thin volume's status: `<mapped sectors> <highest mapped sector|->`, or `Fail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThinStatus {
    pub failed: bool,
    pub mapped_sectors: u64,
    /// Last sector of the highest mapped block.
    pub highest_mapped_sector: Option<u64>,
}

impl fmt::Display for ThinStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.failed {
            return f.write_str("Fail");
        }
        match self.highest_mapped_sector {
            Some(sector) => write!(f, "{} {sector}", self.mapped_sectors),
            None => write!(f, "{} -", self.mapped_sectors),
        }
    }
}

/// What one thin device uses, as `thin_ls` reports it (all in data blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThinUsage {
    pub dev: u64,
    pub mapped: u64,
    /// Mapped blocks no other device maps: what deleting this device would free.
    pub exclusive: u64,
    /// Mapped blocks at least one other device also maps.
    pub shared: u64,
    pub highest_mapped: Option<u64>,
    pub transaction_id: u64,
    pub creation_time: u32,
    pub snapshotted_time: u32,
}

/// Something the operator should hear about; the console prints these as they come.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolEvent {
    /// Free data blocks fell to the low water mark (once until space is added).
    LowWaterMark {
        free_blocks: u64,
        low_water_mark: u64,
    },
    /// Free metadata (reserve excluded) fell below the metadata low watermark.
    MetadataLowWaterMark { free_blocks: u64, watermark: u64 },
    /// The mode changed; the text says why and what it means.
    ModeChanged { mode: PoolMode, reason: String },
    /// Writes waited for space longer than the no-space timeout and were failed; the
    /// pool now fails such writes at once until space is added.
    NoSpaceTimeout { failed_writes: u64 },
    /// A metadata snapshot has been held this long (it slows the pool down).
    MetadataSnapHeldTooLong { block: u64, seconds: u64 },
    /// The metadata device is larger than the format can use.
    MetadataDeviceTooLarge(String),
    /// A deleted thin device's blocks are all released.
    DeleteFinished { dev: u64 },
    /// The blocks only a merged origin's old content used are all released.
    MergeReleased { dev: u64 },
}

impl fmt::Display for PoolEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolEvent::LowWaterMark {
                free_blocks,
                low_water_mark,
            } => write!(
                f,
                "data low water mark reached: {free_blocks} data blocks free (mark {low_water_mark}); grow the pool or discard unused space"
            ),
            PoolEvent::MetadataLowWaterMark {
                free_blocks,
                watermark,
            } => write!(
                f,
                "metadata low water mark reached: {free_blocks} metadata blocks free (mark {watermark})"
            ),
            PoolEvent::ModeChanged { mode, reason } => {
                let name = match mode {
                    PoolMode::Write => "write",
                    PoolMode::OutOfDataSpace => "out-of-data-space",
                    PoolMode::OutOfMetadataSpace => "out-of-metadata-space",
                    PoolMode::ReadOnly => "read-only",
                    PoolMode::Fail => "fail",
                };
                write!(f, "switching pool to {name} mode: {reason}")
            }
            PoolEvent::NoSpaceTimeout { failed_writes } => write!(
                f,
                "no data space came within the no-space timeout: {failed_writes} waiting writes failed with ENOSPC; further writes needing space fail at once"
            ),
            PoolEvent::MetadataSnapHeldTooLong { block, seconds } => write!(
                f,
                "metadata snapshot at block {block} held for {seconds} s; release it (release_metadata_snap) to stop extra copy-on-write"
            ),
            PoolEvent::MetadataDeviceTooLarge(text) => f.write_str(text),
            PoolEvent::DeleteFinished { dev } => {
                write!(f, "thin device {dev} deleted: all its blocks are released")
            }
            PoolEvent::MergeReleased { dev } => write!(
                f,
                "thin device {dev} merged: the blocks of its content before the merge are released"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn pool_status_format() {
        let mut status = PoolStatus {
            mode: PoolMode::Write,
            transaction_id: 1,
            metadata_used: 461,
            metadata_total: 4096,
            data_used: 250,
            data_total: 163840,
            held_root: None,
            discard: DiscardMode::Passdown,
            error_if_no_space: false,
            needs_check: false,
            metadata_low_watermark: 1024,
        };
        assert_eq!(
            status.to_string(),
            "1 461/4096 250/163840 - rw discard_passdown queue_if_no_space - 1024"
        );
        status.mode = PoolMode::OutOfMetadataSpace;
        status.held_root = Some(77);
        status.needs_check = true;
        status.error_if_no_space = true;
        assert_eq!(
            status.to_string(),
            "1 461/4096 250/163840 77 ro discard_passdown error_if_no_space needs_check 1024"
        );
        status.mode = PoolMode::Fail;
        assert_eq!(status.to_string(), "Fail");
    }

    #[test]
    fn thin_status_format() {
        let empty = ThinStatus {
            failed: false,
            mapped_sectors: 0,
            highest_mapped_sector: None,
        };
        assert_eq!(empty.to_string(), "0 -");
        let some = ThinStatus {
            mapped_sectors: 256,
            highest_mapped_sector: Some(1279),
            ..empty
        };
        assert_eq!(some.to_string(), "256 1279");
    }
}
