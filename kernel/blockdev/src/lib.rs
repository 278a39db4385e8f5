//! The block-device interface that every layer of the appliance speaks.
//!
//! Drivers (virtio-blk, NVMe), host stand-ins (memory, files) and higher layers
//! (linear regions, thin volumes) all implement [`BlockDevice`]: requests are
//! *submitted* and later *completed* by polling, so a caller can keep many of them in
//! flight on a device's queues. A request owns its buffer ([`IoBuf`]) and gets it back in
//! its [`Completion`]; nothing is borrowed across the asynchronous gap, which keeps the
//! interface safe for DMA.
//!
//! Callers that need one answer at a time (the metadata layer) use [`run_sync`] and
//! [`run_batch`], which submit and then poll until their own requests finish.
//!
//! Devices count the requests they failed and their resets ([`ErrorCounts`]).

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod buf;
mod crash;
mod errors;
mod faulty;
#[cfg(feature = "std")]
mod file;
mod memory;
mod resettable;

pub use buf::IoBuf;
pub use crash::{CrashDisk, CrashStats, Unflushed};
pub use errors::ErrorCounts;
pub use faulty::{FaultOp, FaultRule, Faults, FaultyDisk, INJECTED};
#[cfg(feature = "std")]
pub use file::{FileDisk, SyncWake};
pub use memory::MemDisk;
pub use resettable::{LOST_IN_RESET, ResetLog, ResettableDisk};

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Bytes in a sector: the unit of every address and length in this interface.
pub const SECTOR_SIZE: usize = 512;

/// A run of sectors, relative to the start of the request it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SectorRun {
    pub start: u64,
    pub sectors: u64,
}

/// One allocation extent of a provisioned device, as NBD's `base:allocation` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub sectors: u64,
    /// Nothing is allocated here: a write may need space.
    pub hole: bool,
    /// Reads return zeros. A hole of a thin volume with an external origin is a hole
    /// but not zero: it reads the origin's data.
    pub zero: bool,
}

/// What a device is and what it accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// Writes and discards fail with [`IoError::ReadOnly`].
    pub read_only: bool,
    /// The device understands [`Command::Discard`] (otherwise it fails with
    /// [`IoError::Unsupported`]).
    pub discard: bool,
    /// Largest read or write, in sectors, that one request may carry.
    pub max_transfer_sectors: u32,
    /// Requests the device keeps in flight before [`BlockDevice::submit`] reports
    /// [`Busy`].
    pub queue_depth: u16,
    /// Human-readable model string (empty when the device has none).
    pub model: String,
    /// Serial number (empty when the device has none).
    pub serial: String,
}

impl DeviceInfo {
    /// Capacity in bytes.
    pub fn bytes(&self) -> u64 {
        self.sectors * SECTOR_SIZE as u64
    }
}

/// One operation on a device.
#[derive(Debug)]
pub enum Command {
    /// Fill `buf` from `sector` on.
    Read { sector: u64, buf: IoBuf },
    /// Write `buf` at `sector`; with `fua` the data is durable when the request
    /// completes.
    Write { sector: u64, buf: IoBuf, fua: bool },
    /// Make every write completed before this request was submitted durable.
    Flush,
    /// The contents of the range are no longer needed.
    Discard { sector: u64, sectors: u64 },
}

impl Command {
    /// The first sector and the number of sectors the command touches (flush: none).
    pub fn range(&self) -> (u64, u64) {
        match self {
            Command::Read { sector, buf } | Command::Write { sector, buf, .. } => {
                (*sector, buf.sectors())
            }
            Command::Discard { sector, sectors } => (*sector, *sectors),
            Command::Flush => (0, 0),
        }
    }

    /// Checks the command against a device: in range, writable, supported, not too
    /// large. Devices call this before doing anything.
    pub fn validate(&self, info: &DeviceInfo) -> Result<(), IoError> {
        let (sector, sectors) = self.range();
        if sector
            .checked_add(sectors)
            .is_none_or(|end| end > info.sectors)
        {
            return Err(IoError::OutOfRange);
        }
        match self {
            Command::Read { buf, .. } | Command::Write { buf, .. }
                if buf.sectors() > u64::from(info.max_transfer_sectors) =>
            {
                Err(IoError::TooLarge)
            }
            Command::Write { .. } | Command::Discard { .. } if info.read_only => {
                Err(IoError::ReadOnly)
            }
            Command::Discard { .. } if !info.discard => Err(IoError::Unsupported),
            _ => Ok(()),
        }
    }

    /// Takes the buffer out of the command (empty for flush and discard).
    pub fn into_buf(self) -> IoBuf {
        match self {
            Command::Read { buf, .. } | Command::Write { buf, .. } => buf,
            Command::Flush | Command::Discard { .. } => IoBuf::empty(),
        }
    }
}

/// A command with the caller's tag, which comes back in the completion.
#[derive(Debug)]
pub struct Request {
    /// Chosen by the submitter; devices only echo it.
    pub tag: u64,
    pub command: Command,
}

/// A finished request: its tag, its outcome and its buffer (filled, for reads).
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    pub result: Result<(), IoError>,
    pub buf: IoBuf,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// The range runs past the end of the device.
    OutOfRange,
    /// A read or write larger than [`DeviceInfo::max_transfer_sectors`].
    TooLarge,
    /// Write or discard on a read-only device.
    ReadOnly,
    /// The device does not implement this command.
    Unsupported,
    /// No space left to satisfy a write (thin volumes).
    NoSpace,
    /// The device is gone (removed or shut down).
    Gone,
    /// The device reported a failure; the text says what it reported.
    Device(&'static str),
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::OutOfRange => f.write_str("request past the end of the device"),
            IoError::TooLarge => f.write_str("request larger than the device accepts"),
            IoError::ReadOnly => f.write_str("device is read-only"),
            IoError::Unsupported => f.write_str("operation not supported by the device"),
            IoError::NoSpace => f.write_str("no space left"),
            IoError::Gone => f.write_str("device is gone"),
            IoError::Device(what) => write!(f, "device error: {what}"),
        }
    }
}

/// The device's queue is full; the request is handed back unchanged. Poll for
/// completions, then submit it again.
#[derive(Debug)]
pub struct Busy(pub Request);

/// A block device with an asynchronous request queue.
pub trait BlockDevice {
    /// Geometry and capabilities; constant while the device exists.
    fn info(&self) -> &DeviceInfo;

    /// Queues a request. Invalid requests are accepted and complete with an error;
    /// only a full queue is refused, with [`Busy`].
    fn submit(&mut self, request: Request) -> Result<(), Busy>;

    /// Returns one finished request, if any, without blocking. Completions may come
    /// in any order.
    fn poll(&mut self) -> Option<Completion>;

    /// Requests submitted and not yet returned by [`BlockDevice::poll`].
    fn in_flight(&self) -> usize;

    /// Requests the device failed and resets it went through since it started
    /// (drivers and fault-injecting disks count them; others never fail that way).
    fn errors(&self) -> ErrorCounts {
        ErrorCounts::default()
    }

    /// Whether [`BlockDevice::reset`] can reset the device (drivers whose hardware
    /// has a reset say so; stand-ins and higher layers have nothing to reset).
    fn can_reset(&self) -> bool {
        false
    }

    /// Resets the device and sets it up again, like the driver does when the
    /// device breaks its queue protocol; counted in [`ErrorCounts::resets`]. Every
    /// request still in flight fails, so callers let them finish first. Fails with
    /// [`IoError::Unsupported`] unless [`BlockDevice::can_reset`], or with the
    /// driver's error when the device did not come back.
    fn reset(&mut self) -> Result<(), IoError> {
        Err(IoError::Unsupported)
    }

    /// Has the device interrupt the CPU when a request it holds finishes, so that
    /// the caller may halt instead of polling; true when it will. False when it
    /// cannot interrupt (stand-ins and polled drivers) or a finished request is
    /// already waiting: poll instead. Requests submitted since the last poll are
    /// handed to the device first. The next [`BlockDevice::poll`] turns the
    /// interrupts off again.
    fn arm_wakeup(&mut self) -> bool {
        false
    }
}

impl<D: BlockDevice + ?Sized> BlockDevice for alloc::boxed::Box<D> {
    fn info(&self) -> &DeviceInfo {
        (**self).info()
    }
    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        (**self).submit(request)
    }
    fn poll(&mut self) -> Option<Completion> {
        (**self).poll()
    }
    fn in_flight(&self) -> usize {
        (**self).in_flight()
    }
    fn errors(&self) -> ErrorCounts {
        (**self).errors()
    }
    fn can_reset(&self) -> bool {
        (**self).can_reset()
    }
    fn reset(&mut self) -> Result<(), IoError> {
        (**self).reset()
    }
    fn arm_wakeup(&mut self) -> bool {
        (**self).arm_wakeup()
    }
}

/// Runs one command to completion and returns its buffer.
///
/// The device must have nothing else in flight: completions of other requests would
/// be consumed here.
pub fn run_sync(device: &mut dyn BlockDevice, command: Command) -> Result<IoBuf, IoError> {
    let mut results = run_batch(device, core::iter::once(command))?;
    Ok(results.pop().expect("one command gives one buffer"))
}

/// Runs several commands, keeping the device's queue full, and returns their buffers
/// in command order. Stops at the first failure (after the requests already in flight
/// have finished) and returns that error.
///
/// The device must have nothing else in flight.
pub fn run_batch(
    device: &mut dyn BlockDevice,
    commands: impl IntoIterator<Item = Command>,
) -> Result<Vec<IoBuf>, IoError> {
    debug_assert_eq!(device.in_flight(), 0, "run_batch needs an idle device");
    let mut results: Vec<Option<IoBuf>> = Vec::new();
    let mut failure = None;
    let mut pending = commands.into_iter();
    let mut waiting: Option<Request> = None;
    loop {
        if failure.is_none() {
            if waiting.is_none() {
                waiting = pending.next().map(|command| {
                    results.push(None);
                    Request {
                        tag: results.len() as u64 - 1,
                        command,
                    }
                });
            }
            if let Some(request) = waiting.take() {
                match device.submit(request) {
                    Ok(()) => continue,
                    Err(Busy(request)) => waiting = Some(request),
                }
            }
        }
        if device.in_flight() == 0 && (waiting.is_none() || failure.is_some()) {
            break;
        }
        if let Some(done) = device.poll() {
            if let Err(error) = done.result {
                failure.get_or_insert(error);
            }
            results[done.tag as usize] = Some(done.buf);
        } else {
            core::hint::spin_loop();
        }
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(results
            .into_iter()
            .map(|buf| buf.expect("every request completed"))
            .collect()),
    }
}
