//! A disk that fails requests on demand: the stand-in for fault-injection tests.
//!
//! [`FaultyDisk`] passes requests to the disk it wraps unless one of its [`Faults`]'
//! rules matches: then the request completes at once with an injected device error
//! (EIO) and the wrapped disk never sees it. A rule picks reads, writes or flushes,
//! optionally only those touching a sector range, lets a number of matching requests
//! through first, and fails once (the fault clears) or from then on. The test keeps
//! the [`Faults`] handle and adds rules while the layers above run.

use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

use crate::{BlockDevice, Busy, Command, Completion, DeviceInfo, ErrorCounts, IoError, Request};

/// The error an injected fault completes with.
pub const INJECTED: IoError = IoError::Device("injected fault");

/// The kind of request a rule fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Flush,
}

/// Which requests fail.
#[derive(Clone, Copy, Debug)]
pub struct FaultRule {
    pub op: FaultOp,
    /// Only requests touching these sectors (all when `None`).
    pub sectors: Option<(u64, u64)>,
    /// Matching requests to let through first.
    pub skip: u64,
    /// Keeps failing after the first failure (else the fault clears).
    pub permanent: bool,
}

impl FaultRule {
    /// The next request of kind `op`, once.
    pub fn every(op: FaultOp) -> Self {
        FaultRule {
            op,
            sectors: None,
            skip: 0,
            permanent: false,
        }
    }
}

/// The rules of a [`FaultyDisk`] and how many requests they failed.
#[derive(Default)]
pub struct Faults {
    pub rules: Vec<FaultRule>,
    pub injected: u64,
}

impl Faults {
    /// Adds a rule through the test's handle.
    pub fn fail(faults: &Rc<RefCell<Faults>>, rule: FaultRule) {
        faults.borrow_mut().rules.push(rule);
    }

    /// Whether `command` fails (counting it against the rules it matches).
    fn decide(&mut self, command: &Command) -> bool {
        let (op, range) = match command {
            Command::Read { sector, buf } => {
                (FaultOp::Read, Some((*sector, *sector + buf.sectors())))
            }
            Command::Write { sector, buf, .. } => {
                (FaultOp::Write, Some((*sector, *sector + buf.sectors())))
            }
            Command::Flush => (FaultOp::Flush, None),
            Command::Discard { .. } => return false,
        };
        let hit = self.rules.iter().position(|rule| {
            rule.op == op
                && match (rule.sectors, range) {
                    (Some((begin, end)), Some((s0, s1))) => s0 < end && begin < s1,
                    _ => true,
                }
        });
        let Some(index) = hit else {
            return false;
        };
        let rule = &mut self.rules[index];
        if rule.skip > 0 {
            rule.skip -= 1;
            return false;
        }
        if !rule.permanent {
            self.rules.remove(index);
        }
        self.injected += 1;
        true
    }
}

/// A disk whose requests fail as its [`Faults`] say.
pub struct FaultyDisk<D> {
    inner: D,
    faults: Rc<RefCell<Faults>>,
    failed: VecDeque<Completion>,
    /// The requests it failed, as a driver counts what its device failed.
    errors: ErrorCounts,
}

impl<D: BlockDevice> FaultyDisk<D> {
    /// Wraps `inner`; returns the disk and the handle to its faults.
    pub fn new(inner: D) -> (Self, Rc<RefCell<Faults>>) {
        let faults = Rc::new(RefCell::new(Faults::default()));
        let disk = FaultyDisk {
            inner,
            faults: Rc::clone(&faults),
            failed: VecDeque::new(),
            errors: ErrorCounts::default(),
        };
        (disk, faults)
    }
}

impl<D: BlockDevice> BlockDevice for FaultyDisk<D> {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        if self.faults.borrow_mut().decide(&request.command) {
            self.errors.count(&request.command, &Err(INJECTED));
            self.failed.push_back(Completion {
                tag: request.tag,
                result: Err(INJECTED),
                buf: request.command.into_buf(),
            });
            return Ok(());
        }
        self.inner.submit(request)
    }

    fn poll(&mut self) -> Option<Completion> {
        self.failed.pop_front().or_else(|| self.inner.poll())
    }

    fn in_flight(&self) -> usize {
        self.failed.len() + self.inner.in_flight()
    }

    fn errors(&self) -> ErrorCounts {
        self.inner.errors() + self.errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IoBuf, MemDisk, run_sync};

    fn write(disk: &mut dyn BlockDevice, sector: u64) -> Result<IoBuf, IoError> {
        let buf = IoBuf::with_sectors(2);
        run_sync(
            disk,
            Command::Write {
                sector,
                buf,
                fua: false,
            },
        )
    }

    #[test]
    fn rules_skip_match_ranges_and_clear_unless_permanent() {
        let (mut disk, faults) = FaultyDisk::new(MemDisk::new(64));
        Faults::fail(
            &faults,
            FaultRule {
                sectors: Some((8, 16)),
                skip: 1,
                ..FaultRule::every(FaultOp::Write)
            },
        );
        assert!(write(&mut disk, 0).is_ok(), "outside the range");
        assert!(write(&mut disk, 7).is_ok(), "skipped");
        assert_eq!(write(&mut disk, 15).unwrap_err(), INJECTED);
        assert!(write(&mut disk, 8).is_ok(), "the fault cleared");
        Faults::fail(
            &faults,
            FaultRule {
                permanent: true,
                ..FaultRule::every(FaultOp::Flush)
            },
        );
        for _ in 0..3 {
            assert_eq!(run_sync(&mut disk, Command::Flush).unwrap_err(), INJECTED);
        }
        assert_eq!(faults.borrow().injected, 4);
        assert_eq!(
            disk.errors(),
            ErrorCounts {
                writes: 1,
                flushes: 3,
                ..ErrorCounts::default()
            }
        );
    }
}
