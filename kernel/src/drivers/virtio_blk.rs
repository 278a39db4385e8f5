//! virtio-blk disks through `virtio-drivers`' non-blocking request API.
//!
//! Every request's buffers (header, data, status byte) stay owned by its slot
//! until the device hands the descriptor chain back, so the device never sees
//! freed memory. The crate offers only a blocking flush, which needs an empty
//! queue: a flush (and any write with FUA, which virtio-blk lacks) therefore
//! waits for the requests ahead of it to finish, runs, and holds later
//! requests back until it is done.
//!
//! A device that hands back a descriptor it was never given has lost track of its
//! queue: it is reset (which stops its DMA), every request it held fails, and the
//! disk fails every later request rather than trusting the device again.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{BlockDevice, Busy, Command, Completion, DeviceInfo, IoBuf, IoError, Request};
use virtio_drivers::Error as VirtioError;
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
use virtio_drivers::transport::pci::PciTransport;

use super::virtio_hal::KernelHal;
use crate::pci::{Pci, PciFunction};

/// Largest read or write per request (one descriptor; the heap is contiguous).
const MAX_TRANSFER_SECTORS: u32 = 2048;

/// A request the device is working on.
struct Slot {
    tag: u64,
    command: Command,
    header: Box<BlkReq>,
    status: Box<BlkResp>,
    fua: bool,
}

pub struct VirtioBlk {
    /// `None` once the device was reset after a fault.
    device: Option<VirtIOBlk<KernelHal, PciTransport>>,
    info: DeviceInfo,
    /// Requests on the virtqueue, indexed by descriptor token.
    slots: Vec<Option<Slot>>,
    active: usize,
    /// Finished, not yet returned by `poll`.
    done: VecDeque<Completion>,
    /// Flush requests waiting for the queue to drain.
    flushes: Vec<u64>,
    /// FUA writes that finished and wait for the flush that makes them durable.
    unflushed_fua: Vec<Completion>,
    /// Requests submitted behind a pending flush.
    held: VecDeque<Request>,
}

/// What requests to a device that was reset after a fault fail with.
const DEVICE_RESET: IoError =
    IoError::Device("virtio-blk returned an unknown descriptor and was reset; the disk is offline");

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
        let mut device = VirtIOBlk::<KernelHal, _>::new(transport)
            .map_err(|_| "virtio-blk initialisation failed")?;
        device.disable_interrupts();
        let mut id = [0u8; 20];
        let serial = match device.device_id(&mut id) {
            Ok(len) => String::from_utf8_lossy(&id[..len]).trim().into(),
            Err(_) => String::new(),
        };
        let queue_size = device.virt_queue_size();
        let info = DeviceInfo {
            sectors: device.capacity(),
            read_only: device.readonly(),
            discard: false,
            max_transfer_sectors: MAX_TRANSFER_SECTORS,
            queue_depth: queue_size,
            model: String::from("virtio-blk"),
            serial,
        };
        Ok(VirtioBlk {
            device: Some(device),
            info,
            slots: (0..queue_size).map(|_| None).collect(),
            active: 0,
            done: VecDeque::new(),
            flushes: Vec::new(),
            unflushed_fua: Vec::new(),
            held: VecDeque::new(),
        })
    }

    fn barrier_pending(&self) -> bool {
        !self.flushes.is_empty() || !self.unflushed_fua.is_empty() || !self.held.is_empty()
    }

    /// Puts a read or write on the virtqueue, or queues a flush.
    fn dispatch(&mut self, request: Request) -> Result<(), Busy> {
        let Request { tag, mut command } = request;
        let Some(device) = self.device.as_mut() else {
            self.finish(tag, Err(DEVICE_RESET), command.into_buf());
            return Ok(());
        };
        let mut header = Box::new(BlkReq::default());
        let mut status = Box::new(BlkResp::default());
        let (started, fua) = match &mut command {
            Command::Flush => {
                self.flushes.push(tag);
                return Ok(());
            }
            Command::Read { buf, .. } | Command::Write { buf, .. } if buf.is_empty() => {
                self.finish(tag, Ok(()), command.into_buf());
                return Ok(());
            }
            // SAFETY: header, buffer and status live in the slot (boxes and the
            // IoBuf's heap pages do not move) until `complete_read_blocks` below.
            Command::Read { sector, buf } => (
                unsafe { device.read_blocks_nb(*sector as usize, &mut header, buf, &mut status) },
                false,
            ),
            // SAFETY: as for reads.
            Command::Write { sector, buf, fua } => (
                unsafe { device.write_blocks_nb(*sector as usize, &mut header, buf, &mut status) },
                *fua,
            ),
            Command::Discard { .. } => {
                self.finish(tag, Err(IoError::Unsupported), IoBuf::empty());
                return Ok(());
            }
        };
        match started {
            Ok(token) => {
                self.slots[usize::from(token)] = Some(Slot {
                    tag,
                    command,
                    header,
                    status,
                    fua,
                });
                self.active += 1;
                Ok(())
            }
            Err(VirtioError::QueueFull) => Err(Busy(Request { tag, command })),
            Err(error) => {
                self.finish(tag, Err(io_error(error)), command.into_buf());
                Ok(())
            }
        }
    }

    fn finish(&mut self, tag: u64, result: Result<(), IoError>, buf: IoBuf) {
        self.done.push_back(Completion { tag, result, buf });
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
            self.reset();
            return true;
        };
        self.active -= 1;
        let result = match &mut slot.command {
            // SAFETY: the same header, buffer and status that were queued with `token`.
            Command::Read { buf, .. } => unsafe {
                device.complete_read_blocks(token, &slot.header, buf, &mut slot.status)
            },
            // SAFETY: as for reads.
            Command::Write { buf, .. } => unsafe {
                device.complete_write_blocks(token, &slot.header, buf, &mut slot.status)
            },
            // Only reads and writes are put on the queue.
            Command::Flush | Command::Discard { .. } => Err(VirtioError::InvalidParam),
        };
        let completion = Completion {
            tag: slot.tag,
            result: result.map_err(io_error),
            buf: slot.command.into_buf(),
        };
        if slot.fua && completion.result.is_ok() {
            self.unflushed_fua.push(completion);
        } else {
            self.done.push_back(completion);
        }
        true
    }

    /// Resets a device that lost track of its queue (dropping the driver resets
    /// it, so it no longer touches the buffers) and fails every request it held.
    fn reset(&mut self) {
        self.device = None;
        self.active = 0;
        for slot in core::mem::take(&mut self.slots).into_iter().flatten() {
            self.finish(slot.tag, Err(DEVICE_RESET), slot.command.into_buf());
        }
    }

    /// Runs pending flushes once the queue is empty, then releases held requests.
    fn run_barrier(&mut self) {
        if self.active != 0 || (self.flushes.is_empty() && self.unflushed_fua.is_empty()) {
            return;
        }
        let result = match self.device.as_mut() {
            Some(device) => device.flush().map_err(io_error),
            None => Err(DEVICE_RESET),
        };
        for tag in core::mem::take(&mut self.flushes) {
            self.finish(tag, result, IoBuf::empty());
        }
        for mut completion in core::mem::take(&mut self.unflushed_fua) {
            completion.result = result;
            self.done.push_back(completion);
        }
        while self.flushes.is_empty() {
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

impl BlockDevice for VirtioBlk {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        if let Err(error) = request.command.validate(&self.info) {
            self.finish(request.tag, Err(error), request.command.into_buf());
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
}
