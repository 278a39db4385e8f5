//! virtio-blk disks, requests queued through [`BlkQueue`](super::virtio_blk_queue).
//!
//! Every request's buffers (header, data, status byte) stay owned by its slot
//! until the device hands the descriptor chain back, so the device never sees
//! freed memory. Flushes go on the queue like reads and writes, without holding
//! other requests back: a flush covers the writes completed before it was
//! submitted, as the block-device interface asks. virtio-blk has no FUA, so a FUA
//! write completes only after a flush queued once the write finished; the FUA
//! writes that finish between two polls share one flush. Requests submitted between
//! two polls share one doorbell, rung at the next poll.
//!
//! The CPU halts while requests are on the device only if it can interrupt: its
//! queue's interrupts go through MSI-X to the disks' vector, and are on from
//! [`BlockDevice::arm_wakeup`] to the next poll, so a busy loop is not interrupted.
//!
//! A device that hands back a descriptor it was never given has lost track of its
//! queue: it is reset (which stops its DMA), every request it held fails, and it is
//! set up again so later requests work. After [`MAX_RESETS`] such resets, or when
//! it does not come back as the same disk, the disk is offline and every request
//! fails. The operator's reset (`disk-reset`, through [`BlockDevice::reset`]) takes
//! the same path; it does not count towards giving up. Failed requests and resets
//! are counted ([`ErrorCounts`]).

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{
    BlockDevice, Busy, Command, Completion, DeviceInfo, ErrorCounts, IoBuf, IoError, Request,
};
use virtio_drivers::Error as VirtioError;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{DeviceFunction, PciRoot};

use super::virtio_blk_queue::{BlkQueue, Data, Header, QUEUE, QUEUE_SIZE, Status};
use super::virtio_doorbell::Doorbell;
use super::virtio_hal::KernelHal;
use crate::arch::interrupts;
use crate::pci::{ConfigAccess, Pci, PciFunction};

/// Largest read or write per request (one descriptor; the heap is contiguous).
const MAX_TRANSFER_SECTORS: u32 = 2048;

/// A request the device is working on.
struct Slot {
    /// The caller's tag; `None` for a flush queued for FUA writes.
    tag: Option<u64>,
    command: Command,
    header: Box<Header>,
    status: Box<Status>,
    fua: bool,
    /// FUA writes that finished before this flush was queued: they complete with it.
    fua_writes: Vec<Completion>,
}

pub struct VirtioBlk {
    /// `None` once the device was given up after a fault.
    device: Option<BlkQueue>,
    /// Where the device sits, to set it up again after a reset.
    root: PciRoot<ConfigAccess>,
    address: DeviceFunction,
    info: DeviceInfo,
    /// Requests on the virtqueue, indexed by descriptor token.
    slots: Vec<Option<Slot>>,
    active: usize,
    /// Finished, not yet returned by `poll`.
    done: VecDeque<Completion>,
    /// FUA writes that finished and wait for a flush to be queued for them.
    unflushed_fua: Vec<Completion>,
    errors: ErrorCounts,
    /// Resets after the device lost track of its queue (operator resets excluded).
    fault_resets: u64,
    /// The device's MSI-X sends the disks' vector: it can wake a halted CPU.
    interrupts: bool,
    /// Interrupts are on until the next poll.
    armed: bool,
}

/// Resets after which a device that keeps losing track of its queue is given up.
const MAX_RESETS: u64 = 8;

/// What the requests a device held when it was reset fail with.
const LOST_IN_RESET: IoError = IoError::Device(
    "virtio-blk returned a descriptor it was never given and was reset; this request was lost",
);

/// What the requests a device held when the operator reset it fail with (only
/// those that did not finish in the time the reset waits for them).
const LOST_IN_OPERATOR_RESET: IoError =
    IoError::Device("virtio-blk was reset by the operator before this request finished");

/// What requests to a disk whose device was given up fail with.
const OFFLINE: IoError =
    IoError::Device("virtio-blk did not come back after resets; the disk is offline");

fn io_error(error: VirtioError) -> IoError {
    match error {
        VirtioError::IoError => IoError::Device("virtio-blk reported an I/O error"),
        VirtioError::Unsupported => IoError::Unsupported,
        VirtioError::NotReady => IoError::Device("virtio-blk device not ready"),
        _ => IoError::Device("virtio queue error"),
    }
}

impl VirtioBlk {
    /// Sets up the virtio-blk device at `function`.
    pub fn probe(pci: &mut Pci, function: &PciFunction) -> Result<VirtioBlk, &'static str> {
        pci.enable(function.address);
        let transport = PciTransport::new::<KernelHal, _>(&mut pci.root, function.address)
            .map_err(|_| "virtio PCI transport setup failed")?;
        let doorbell = Doorbell::find(pci, function.address, QUEUE)?;
        let mut device =
            BlkQueue::new(transport, doorbell).map_err(|_| "virtio-blk initialisation failed")?;
        let interrupts = interrupts::enable_disk_msi()
            .and_then(|(address, data)| pci.enable_msix(function.address, address, data))
            .is_some()
            && device.route_interrupts();
        let serial = match device.device_id() {
            Ok(id) => {
                let len = id.iter().position(|&byte| byte == 0).unwrap_or(id.len());
                String::from_utf8_lossy(&id[..len]).trim().into()
            }
            Err(_) => String::new(),
        };
        let info = DeviceInfo {
            sectors: device.capacity(),
            read_only: device.read_only(),
            discard: false,
            max_transfer_sectors: MAX_TRANSFER_SECTORS,
            queue_depth: QUEUE_SIZE,
            model: String::from("virtio-blk"),
            serial,
        };
        Ok(VirtioBlk {
            device: Some(device),
            root: pci.driver_root(),
            address: function.address,
            info,
            slots: empty_slots(),
            active: 0,
            done: VecDeque::new(),
            unflushed_fua: Vec::new(),
            errors: ErrorCounts::default(),
            fault_resets: 0,
            interrupts,
            armed: false,
        })
    }

    /// Puts a read, write or flush on the virtqueue.
    fn dispatch(&mut self, request: Request) -> Result<(), Busy> {
        let Request { tag, command } = request;
        let Some(device) = self.device.as_ref() else {
            self.fail(Some(tag), command, Vec::new(), OFFLINE);
            return Ok(());
        };
        let flushes = device.flushes();
        let fua = match &command {
            Command::Read { buf, .. } | Command::Write { buf, .. } if buf.is_empty() => {
                self.finish(tag, Ok(()), command.into_buf());
                return Ok(());
            }
            // Without the feature, writes are durable when they complete.
            Command::Flush if !flushes => {
                self.finish(tag, Ok(()), IoBuf::empty());
                return Ok(());
            }
            Command::Discard { .. } => {
                self.finish(tag, Err(IoError::Unsupported), IoBuf::empty());
                return Ok(());
            }
            Command::Write { fua, .. } => *fua,
            Command::Read { .. } | Command::Flush => false,
        };
        self.enqueue(Some(tag), command, fua, Vec::new())
            .map_err(|(command, _)| Busy(Request { tag, command }))
    }

    /// Adds a request to the virtqueue (the doorbell rings at the next poll); gives
    /// the command and the FUA writes riding on it back when the queue is full.
    /// Discards are not queued (the device was not offered the feature).
    fn enqueue(
        &mut self,
        tag: Option<u64>,
        mut command: Command,
        fua: bool,
        fua_writes: Vec<Completion>,
    ) -> Result<(), (Command, Vec<Completion>)> {
        let Some(device) = self.device.as_mut() else {
            self.fail(tag, command, fua_writes, OFFLINE);
            return Ok(());
        };
        let header = Box::new(match &command {
            Command::Read { sector, .. } => Header::read(*sector),
            Command::Write { sector, .. } => Header::write(*sector),
            Command::Flush | Command::Discard { .. } => Header::flush(),
        });
        let mut status = Box::new(Status::pending());
        // SAFETY: header, buffer and status live in the slot (boxes and the IoBuf's
        // heap pages do not move) until `reap` completes the request with them.
        let added = unsafe { device.add(&header, data(&mut command), &mut status) };
        match added {
            Ok(token) => {
                self.slots[usize::from(token)] = Some(Slot {
                    tag,
                    command,
                    header,
                    status,
                    fua,
                    fua_writes,
                });
                self.active += 1;
                Ok(())
            }
            Err(VirtioError::QueueFull) => Err((command, fua_writes)),
            Err(error) => {
                self.fail(tag, command, fua_writes, io_error(error));
                Ok(())
            }
        }
    }

    fn finish(&mut self, tag: u64, result: Result<(), IoError>, buf: IoBuf) {
        self.done.push_back(Completion { tag, result, buf });
    }

    /// Completes a request that never reached the device, and the FUA writes
    /// waiting for it, with `error`.
    fn fail(
        &mut self,
        tag: Option<u64>,
        command: Command,
        fua_writes: Vec<Completion>,
        error: IoError,
    ) {
        self.errors.count(&command, &Err(error));
        if let Some(tag) = tag {
            self.finish(tag, Err(error), command.into_buf());
        }
        for mut completion in fua_writes {
            completion.result = Err(error);
            self.done.push_back(completion);
        }
    }

    /// Takes one finished request off the used ring.
    fn reap(&mut self) -> bool {
        let Some(device) = self.device.as_mut() else {
            return false;
        };
        let Some(token) = device.peek_used() else {
            return false;
        };
        let Some(mut slot) = self
            .slots
            .get_mut(usize::from(token))
            .and_then(Option::take)
        else {
            self.fault_resets += 1;
            self.restart(LOST_IN_RESET);
            return true;
        };
        self.active -= 1;
        // SAFETY: the same header, buffer and status that were queued with `token`.
        let result = unsafe {
            device.complete(
                token,
                &slot.header,
                data(&mut slot.command),
                &mut slot.status,
            )
        }
        .map_err(io_error);
        self.errors.count(&slot.command, &result);
        for mut completion in slot.fua_writes {
            completion.result = result;
            self.done.push_back(completion);
        }
        let Some(tag) = slot.tag else {
            return true;
        };
        let completion = Completion {
            tag,
            result,
            buf: slot.command.into_buf(),
        };
        if slot.fua && completion.result.is_ok() && device.flushes() {
            self.unflushed_fua.push(completion);
        } else {
            self.done.push_back(completion);
        }
        true
    }

    /// Resets the device (it then no longer touches the buffers), fails every
    /// request it held with `lost`, and sets it up again unless it lost track of its
    /// queue too often or comes back as another disk.
    fn restart(&mut self, lost: IoError) {
        let Some(device) = self.device.take() else {
            return;
        };
        let doorbell = device.stop();
        self.errors.resets += 1;
        self.active = 0;
        self.armed = false;
        for slot in core::mem::replace(&mut self.slots, empty_slots())
            .into_iter()
            .flatten()
        {
            self.fail(slot.tag, slot.command, slot.fua_writes, lost);
        }
        if self.fault_resets <= MAX_RESETS {
            self.device = PciTransport::new::<KernelHal, _>(&mut self.root, self.address)
                .ok()
                .and_then(|transport| BlkQueue::new(transport, doorbell).ok())
                .filter(|device| device.capacity() == self.info.sectors);
            self.interrupts &= self.device.as_ref().is_some_and(BlkQueue::route_interrupts);
        }
    }

    /// Queues one flush for the FUA writes that finished since the last one.
    fn flush_fua_writes(&mut self) {
        if self.unflushed_fua.is_empty() {
            return;
        }
        let fua_writes = core::mem::take(&mut self.unflushed_fua);
        if let Err((_, fua_writes)) = self.enqueue(None, Command::Flush, false, fua_writes) {
            self.unflushed_fua = fua_writes;
        }
    }
}

fn empty_slots() -> Vec<Option<Slot>> {
    (0..QUEUE_SIZE).map(|_| None).collect()
}

/// The data buffer a queued command's request carries.
fn data(command: &mut Command) -> Data<'_> {
    match command {
        Command::Read { buf, .. } => Data::Read(buf),
        Command::Write { buf, .. } => Data::Write(buf),
        Command::Flush | Command::Discard { .. } => Data::None,
    }
}

impl BlockDevice for VirtioBlk {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        if let Err(error) = request.command.validate(&self.info) {
            self.finish(request.tag, Err(error), request.command.into_buf());
            return Ok(());
        }
        self.dispatch(request)
    }

    fn poll(&mut self) -> Option<Completion> {
        if self.armed {
            self.armed = false;
            if let Some(device) = self.device.as_mut() {
                device.set_interrupts(false);
            }
        }
        if self.done.is_empty() {
            while self.reap() {}
            self.flush_fua_writes();
        }
        if let Some(device) = self.device.as_mut() {
            device.kick();
        }
        self.done.pop_front()
    }

    fn in_flight(&self) -> usize {
        self.active + self.done.len() + self.unflushed_fua.len()
    }

    fn errors(&self) -> ErrorCounts {
        self.errors
    }

    fn can_reset(&self) -> bool {
        true
    }

    fn arm_wakeup(&mut self) -> bool {
        let Some(device) = self.device.as_mut() else {
            return false;
        };
        if !self.interrupts || !self.done.is_empty() {
            return false;
        }
        device.kick();
        self.armed = true;
        device.set_interrupts(true)
    }

    fn reset(&mut self) -> Result<(), IoError> {
        if self.device.is_none() {
            return Err(OFFLINE);
        }
        self.restart(LOST_IN_OPERATOR_RESET);
        match self.device {
            Some(_) => Ok(()),
            None => Err(OFFLINE),
        }
    }
}
