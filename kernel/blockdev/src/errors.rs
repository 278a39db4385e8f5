//! What went wrong on a disk: the requests it failed, by kind, and its resets.
//! Drivers keep these counters (the console's `disks` shows them); they only grow.

use core::fmt;

use crate::{Command, IoError};

/// Failed requests by kind, and device resets, since the device started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    /// Discards count here too: a failed discard, like a failed write, changed
    /// what the disk holds in a way nobody asked for.
    pub discards: u64,
    /// Times the device was reset: after it broke its queue protocol, or because
    /// the operator asked (`disk-reset`).
    pub resets: u64,
}

impl ErrorCounts {
    /// Counts a finished `command` if the device failed it. Requests refused
    /// before they reached the device (out of range, too large, read-only,
    /// unsupported) are the caller's mistakes, not the disk's, and are not counted.
    pub fn count(&mut self, command: &Command, result: &Result<(), IoError>) {
        if !matches!(result, Err(IoError::Device(_))) {
            return;
        }
        let counter = match command {
            Command::Read { .. } => &mut self.reads,
            Command::Write { .. } => &mut self.writes,
            Command::Flush => &mut self.flushes,
            Command::Discard { .. } => &mut self.discards,
        };
        *counter += 1;
    }

    /// Whether anything was counted.
    pub fn any(&self) -> bool {
        *self != ErrorCounts::default()
    }
}

/// The counts of two layers that each fail requests of their own.
impl core::ops::Add for ErrorCounts {
    type Output = ErrorCounts;
    fn add(self, other: ErrorCounts) -> ErrorCounts {
        ErrorCounts {
            reads: self.reads + other.reads,
            writes: self.writes + other.writes,
            flushes: self.flushes + other.flushes,
            discards: self.discards + other.discards,
            resets: self.resets + other.resets,
        }
    }
}

/// `3 reads, 0 writes, 1 flush, 0 discards failed; 1 reset`.
impl fmt::Display for ErrorCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: u64| if n == 1 { "" } else { "s" };
        let flushes = if self.flushes == 1 {
            "flush"
        } else {
            "flushes"
        };
        write!(
            f,
            "{} read{}, {} write{}, {} {flushes}, {} discard{} failed; {} reset{}",
            self.reads,
            plural(self.reads),
            self.writes,
            plural(self.writes),
            self.flushes,
            self.discards,
            plural(self.discards),
            self.resets,
            plural(self.resets)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IoBuf;
    use alloc::string::ToString;

    #[test]
    fn only_failures_the_device_reported_are_counted_by_kind() {
        let mut counts = ErrorCounts::default();
        let read = Command::Read {
            sector: 0,
            buf: IoBuf::with_sectors(1),
        };
        let eio = Err(IoError::Device("I/O error"));
        counts.count(&read, &eio);
        counts.count(&read, &eio);
        counts.count(&read, &Ok(()));
        counts.count(&read, &Err(IoError::OutOfRange));
        counts.count(&Command::Flush, &eio);
        counts.count(&Command::Flush, &Err(IoError::Unsupported));
        assert_eq!(
            counts,
            ErrorCounts {
                reads: 2,
                flushes: 1,
                ..ErrorCounts::default()
            }
        );
        counts.resets = 1;
        assert_eq!(
            counts.to_string(),
            "2 reads, 0 writes, 1 flush, 0 discards failed; 1 reset"
        );
        assert!(counts.any());
        assert!(!ErrorCounts::default().any());
    }
}
