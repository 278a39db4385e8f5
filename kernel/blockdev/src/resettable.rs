//! A memory disk with a reset: the stand-in for a driver's reset in tests of the
//! layers above (`disk-reset`).
//!
//! Requests complete a given number of polls after the last submission, or never
//! (a wedged device). A reset fails the requests still held, like a driver's reset
//! fails the requests its device held, and is counted. What the disk was asked to
//! do is logged, in order, for the test that keeps the log's handle.

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

use crate::{
    BlockDevice, Busy, Command, Completion, DeviceInfo, ErrorCounts, IoError, MemDisk, Request,
};

/// What the requests held when a [`ResettableDisk`] is reset fail with.
pub const LOST_IN_RESET: IoError = IoError::Device("lost in the reset");

/// The kinds of request a [`ResettableDisk`] took and its resets, in order:
/// `read`, `write`, `flush`, `discard`, `reset`.
pub type ResetLog = Rc<RefCell<Vec<&'static str>>>;

pub struct ResettableDisk {
    inner: MemDisk,
    /// Polls after the last submission before completions come; `None`: never.
    delay: Option<u32>,
    polls: u32,
    log: ResetLog,
    resets: u64,
    failed: Vec<Completion>,
}

impl ResettableDisk {
    /// Wraps `inner`; completions come `delay` polls after the last submission
    /// (never when `None`). Returns the disk and its log.
    pub fn new(inner: MemDisk, delay: Option<u32>) -> (Self, ResetLog) {
        let log = ResetLog::default();
        let disk = ResettableDisk {
            inner,
            delay,
            polls: 0,
            log: Rc::clone(&log),
            resets: 0,
            failed: Vec::new(),
        };
        (disk, log)
    }
}

impl BlockDevice for ResettableDisk {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        self.log.borrow_mut().push(match request.command {
            Command::Read { .. } => "read",
            Command::Write { .. } => "write",
            Command::Flush => "flush",
            Command::Discard { .. } => "discard",
        });
        self.polls = 0;
        self.inner.submit(request)
    }

    fn poll(&mut self) -> Option<Completion> {
        if let Some(done) = self.failed.pop() {
            return Some(done);
        }
        self.polls = self.polls.saturating_add(1);
        match self.delay {
            Some(delay) if self.polls > delay => self.inner.poll(),
            _ => None,
        }
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.failed.len()
    }

    fn errors(&self) -> ErrorCounts {
        ErrorCounts {
            resets: self.resets,
            ..ErrorCounts::default()
        }
    }

    fn can_reset(&self) -> bool {
        true
    }

    fn reset(&mut self) -> Result<(), IoError> {
        self.log.borrow_mut().push("reset");
        self.resets += 1;
        while let Some(mut done) = self.inner.poll() {
            done.result = Err(LOST_IN_RESET);
            self.failed.push(done);
        }
        Ok(())
    }
}
