//! The request bookkeeping of a disk whose device has one queue, no FUA, and a
//! flush that only runs on an empty queue (virtio-blk through `virtio-drivers`).
//! The driver supplies the [`Hardware`]; this half is free of it, so it is tested
//! on the host.
//!
//! A flush (and a write with FUA, made durable by one) waits for the requests
//! ahead of it to finish, runs, and holds later requests back until it is done.
//! Held requests go out again as far as the queue takes them; the rest wait for
//! later polls, never for another flush.
//!
//! A device that hands back a request it was never given has lost track of its
//! queue: the driver stops it (so it lets go of every buffer), every request it
//! held fails, and it is set up again so later requests work. After more than
//! [`MAX_RESETS`] resets, or when it does not come back, the disk is offline and
//! every request fails. Failed requests and resets are counted ([`ErrorCounts`]).

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::{BlockDevice, Busy, Command, Completion, DeviceInfo, ErrorCounts, IoError, Request};

/// Resets after which a device that keeps losing track of its queue is given up.
pub const MAX_RESETS: u64 = 8;

/// What the requests a device held when it was reset fail with.
pub const LOST_IN_RESET: IoError = IoError::Device(
    "the device returned a request it was never given and was reset; this request was lost",
);

/// What requests to a disk whose device did not come back fail with.
pub const OFFLINE: IoError =
    IoError::Device("the device did not come back after resets; the disk is offline");

/// What putting a request on the device's queue did.
pub enum Start<T> {
    /// The device has it under `token` and the driver keeps `ticket` with it.
    Queued { token: u16, ticket: T },
    /// The queue has no room; the request is untouched.
    Full,
    /// The request cannot be sent.
    Failed(IoError),
}

/// The device half of a driver.
pub trait Hardware {
    /// What the driver keeps with a request while the device has it.
    type Ticket;

    /// Puts a read or write on the device's queue. [`OrderedQueue`] keeps the
    /// command and the ticket, neither moved out nor dropped, until the same token
    /// is passed to [`Hardware::complete`] or the device is stopped.
    fn start(&mut self, command: &mut Command) -> Start<Self::Ticket>;

    /// The token of the next request the device handed back, if any. The device
    /// chooses it: it may name a request that is not on the queue.
    fn next_used(&mut self) -> Option<u16>;

    /// Takes request `token` off the queue, with the command and ticket it was
    /// started with; returns its outcome.
    fn complete(
        &mut self,
        token: u16,
        command: &mut Command,
        ticket: &mut Self::Ticket,
    ) -> Result<(), IoError>;

    /// Makes completed writes durable; called only while nothing is on the queue.
    fn flush(&mut self) -> Result<(), IoError>;

    /// Stops the device: from the return on it touches no buffer it was given.
    fn stop(&mut self);

    /// Sets the stopped device up again; returns its queue size (tokens are below
    /// it), or `None` when it did not come back.
    fn restart(&mut self) -> Option<u16>;
}

/// A request the device is working on.
struct Slot<T> {
    tag: u64,
    command: Command,
    ticket: T,
    fua: bool,
}

/// A [`BlockDevice`] over a driver's [`Hardware`].
pub struct OrderedQueue<H: Hardware> {
    hardware: H,
    /// False once the device was given up.
    online: bool,
    info: DeviceInfo,
    /// Requests on the device's queue, by token.
    slots: Vec<Option<Slot<H::Ticket>>>,
    active: usize,
    /// Finished, not yet returned by `poll`.
    done: VecDeque<Completion>,
    /// Flush requests waiting for the queue to drain.
    flushes: Vec<u64>,
    /// FUA writes that finished and wait for the flush that makes them durable.
    unflushed_fua: Vec<(u64, Command)>,
    /// Requests submitted behind a pending flush.
    held: VecDeque<Request>,
    errors: ErrorCounts,
}

fn empty_slots<T>(queue_size: u16) -> Vec<Option<Slot<T>>> {
    (0..queue_size).map(|_| None).collect()
}

impl<H: Hardware> OrderedQueue<H> {
    /// A disk over `hardware`, whose queue has `info.queue_depth` tokens.
    pub fn new(hardware: H, info: DeviceInfo) -> Self {
        OrderedQueue {
            hardware,
            online: true,
            slots: empty_slots(info.queue_depth),
            info,
            active: 0,
            done: VecDeque::new(),
            flushes: Vec::new(),
            unflushed_fua: Vec::new(),
            held: VecDeque::new(),
            errors: ErrorCounts::default(),
        }
    }

    fn barrier_pending(&self) -> bool {
        !self.flushes.is_empty() || !self.unflushed_fua.is_empty() || !self.held.is_empty()
    }

    /// Hands a finished request back (counting it if the device failed it).
    fn finish(&mut self, tag: u64, command: Command, result: Result<(), IoError>) {
        self.errors.count(&command, &result);
        self.done.push_back(Completion {
            tag,
            result,
            buf: command.into_buf(),
        });
    }

    /// Puts a read or write on the queue, or queues a flush.
    fn dispatch(&mut self, request: Request) -> Result<(), Busy> {
        let Request { tag, mut command } = request;
        if !self.online {
            self.finish(tag, command, Err(OFFLINE));
            return Ok(());
        }
        let fua = match &command {
            Command::Flush => {
                self.flushes.push(tag);
                return Ok(());
            }
            Command::Read { buf, .. } | Command::Write { buf, .. } if buf.is_empty() => {
                self.finish(tag, command, Ok(()));
                return Ok(());
            }
            Command::Discard { .. } => {
                self.finish(tag, command, Err(IoError::Unsupported));
                return Ok(());
            }
            Command::Read { .. } => false,
            Command::Write { fua, .. } => *fua,
        };
        match self.hardware.start(&mut command) {
            Start::Queued { token, ticket } => {
                match self.slots.get_mut(usize::from(token)) {
                    Some(slot @ None) => {
                        *slot = Some(Slot {
                            tag,
                            command,
                            ticket,
                            fua,
                        });
                        self.active += 1;
                    }
                    // A token past the queue size or already in use: the device is
                    // stopped before the buffers it was given are handed back.
                    _ => {
                        self.reset();
                        self.finish(tag, command, Err(LOST_IN_RESET));
                    }
                }
                Ok(())
            }
            Start::Full => Err(Busy(Request { tag, command })),
            Start::Failed(error) => {
                self.finish(tag, command, Err(error));
                Ok(())
            }
        }
    }

    /// Takes one finished request off the device; false when there is none.
    fn reap(&mut self) -> bool {
        if !self.online {
            return false;
        }
        let Some(token) = self.hardware.next_used() else {
            return false;
        };
        let Some(mut slot) = self
            .slots
            .get_mut(usize::from(token))
            .and_then(Option::take)
        else {
            self.reset();
            return true;
        };
        self.active -= 1;
        let result = self
            .hardware
            .complete(token, &mut slot.command, &mut slot.ticket);
        if slot.fua && result.is_ok() {
            self.unflushed_fua.push((slot.tag, slot.command));
        } else {
            self.finish(slot.tag, slot.command, result);
        }
        true
    }

    /// Stops the device, fails what it held, counts the reset and sets the device
    /// up again (or gives it up). Flushes and held requests wait for the device
    /// that comes back, or fail if none does.
    fn reset(&mut self) {
        self.hardware.stop();
        self.errors.resets += 1;
        self.active = 0;
        for slot in core::mem::take(&mut self.slots).into_iter().flatten() {
            self.finish(slot.tag, slot.command, Err(LOST_IN_RESET));
        }
        let restarted = if self.errors.resets > MAX_RESETS {
            None
        } else {
            self.hardware.restart()
        };
        match restarted {
            Some(queue_size) => self.slots = empty_slots(queue_size),
            None => self.online = false,
        }
    }

    /// Runs pending flushes once the queue is empty, then releases held requests
    /// while no flush is pending, as many as the queue takes.
    fn run_barrier(&mut self) {
        if self.active == 0 && (!self.flushes.is_empty() || !self.unflushed_fua.is_empty()) {
            let result = if self.online {
                self.hardware.flush()
            } else {
                Err(OFFLINE)
            };
            for tag in core::mem::take(&mut self.flushes) {
                self.finish(tag, Command::Flush, result);
            }
            for (tag, command) in core::mem::take(&mut self.unflushed_fua) {
                self.finish(tag, command, result);
            }
        }
        while self.flushes.is_empty() && self.unflushed_fua.is_empty() {
            let Some(request) = self.held.pop_front() else {
                break;
            };
            if let Err(Busy(request)) = self.dispatch(request) {
                self.held.push_front(request);
                break;
            }
        }
    }
}

impl<H: Hardware> BlockDevice for OrderedQueue<H> {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        if let Err(error) = request.command.validate(&self.info) {
            self.finish(request.tag, request.command, Err(error));
            return Ok(());
        }
        if self.barrier_pending() {
            if self.held.len() >= usize::from(self.info.queue_depth) {
                return Err(Busy(request));
            }
            self.held.push_back(request);
            return Ok(());
        }
        self.dispatch(request)
    }

    fn poll(&mut self) -> Option<Completion> {
        if self.done.is_empty() {
            while self.reap() {}
            self.run_barrier();
        }
        self.done.pop_front()
    }

    fn in_flight(&self) -> usize {
        self.active
            + self.done.len()
            + self.flushes.len()
            + self.unflushed_fua.len()
            + self.held.len()
    }

    fn errors(&self) -> ErrorCounts {
        self.errors
    }
}

#[cfg(test)]
#[path = "ordered_tests.rs"]
mod tests;
