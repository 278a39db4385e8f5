//! virtio-blk disks through `virtio-drivers`' non-blocking request API: the device
//! half ([`Hardware`]) of an [`OrderedQueue`], which keeps requests in order around
//! flushes (the crate's only flush is blocking and needs an empty queue, and
//! virtio-blk has no FUA), counts what the device fails, and resets a device that
//! hands back a descriptor it was never given.
//!
//! Every request's buffers (header, data, status byte) stay in the queue's slot
//! until the device hands the descriptor chain back or is stopped, so the device
//! never sees freed memory. Stopping drops the crate's driver, which resets the
//! device (its DMA stops); a restart negotiates the features and creates the queue
//! again.

use alloc::boxed::Box;
use alloc::string::String;
use blockdev::ordered::{Hardware, OrderedQueue, Start};
use blockdev::{Command, DeviceInfo, IoError};
use virtio_drivers::Error as VirtioError;
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{DeviceFunction, PciRoot};

use super::virtio_hal::KernelHal;
use crate::pci::{ConfigAccess, Pci, PciFunction};

/// Largest read or write per request (one descriptor; the heap is contiguous).
const MAX_TRANSFER_SECTORS: u32 = 2048;

/// What the queue's calls get while the device is stopped (the queue makes none).
const STOPPED: IoError = IoError::Device("virtio-blk is stopped");

type Device = VirtIOBlk<KernelHal, PciTransport>;

/// A virtio-blk disk.
pub type VirtioDisk = OrderedQueue<VirtioBlk>;

/// The device and where it sits (to set it up again after a reset).
pub struct VirtioBlk {
    /// `None` while stopped.
    device: Option<Device>,
    root: PciRoot<ConfigAccess>,
    address: DeviceFunction,
    /// The capacity it had at boot: a device that comes back with another is not
    /// the same disk.
    sectors: u64,
}

/// What a request on the queue keeps besides its command: the request header and
/// the status byte the device writes.
pub struct Ticket {
    header: Box<BlkReq>,
    status: Box<BlkResp>,
}

/// Sets up the device at `address`: transport, features, queue; polled, no interrupts.
fn start(
    root: &mut PciRoot<ConfigAccess>,
    address: DeviceFunction,
) -> Result<Device, &'static str> {
    let transport = PciTransport::new::<KernelHal, _>(root, address)
        .map_err(|_| "virtio PCI transport setup failed")?;
    let mut device = VirtIOBlk::<KernelHal, _>::new(transport)
        .map_err(|_| "virtio-blk initialisation failed")?;
    device.disable_interrupts();
    Ok(device)
}

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
    pub fn probe(pci: &mut Pci, function: &PciFunction) -> Result<VirtioDisk, &'static str> {
        pci.enable(function.address);
        let mut root = pci.driver_root();
        let mut device = start(&mut root, function.address)?;
        let mut id = [0u8; 20];
        let serial = match device.device_id(&mut id) {
            Ok(len) => String::from_utf8_lossy(&id[..len]).trim().into(),
            Err(_) => String::new(),
        };
        let info = DeviceInfo {
            sectors: device.capacity(),
            read_only: device.readonly(),
            discard: false,
            max_transfer_sectors: MAX_TRANSFER_SECTORS,
            queue_depth: device.virt_queue_size(),
            model: String::from("virtio-blk"),
            serial,
        };
        let hardware = VirtioBlk {
            device: Some(device),
            root,
            address: function.address,
            sectors: info.sectors,
        };
        Ok(OrderedQueue::new(hardware, info))
    }
}

impl Hardware for VirtioBlk {
    type Ticket = Ticket;

    fn start(&mut self, command: &mut Command) -> Start<Ticket> {
        let Some(device) = self.device.as_mut() else {
            return Start::Failed(STOPPED);
        };
        let mut ticket = Ticket {
            header: Box::new(BlkReq::default()),
            status: Box::new(BlkResp::default()),
        };
        let started = match command {
            // SAFETY: the header and status boxes and the IoBuf's heap pages do not
            // move, and the queue keeps them (in the slot with the command and the
            // ticket) until `complete` gets this token or the device is stopped.
            Command::Read { sector, buf } => unsafe {
                device.read_blocks_nb(
                    *sector as usize,
                    &mut ticket.header,
                    buf,
                    &mut ticket.status,
                )
            },
            // SAFETY: as for reads.
            Command::Write { sector, buf, .. } => unsafe {
                device.write_blocks_nb(
                    *sector as usize,
                    &mut ticket.header,
                    buf,
                    &mut ticket.status,
                )
            },
            Command::Flush | Command::Discard { .. } => return Start::Failed(IoError::Unsupported),
        };
        match started {
            Ok(token) => Start::Queued { token, ticket },
            Err(VirtioError::QueueFull) => Start::Full,
            Err(error) => Start::Failed(io_error(error)),
        }
    }

    fn next_used(&mut self) -> Option<u16> {
        self.device.as_mut()?.peek_used()
    }

    fn complete(
        &mut self,
        token: u16,
        command: &mut Command,
        ticket: &mut Ticket,
    ) -> Result<(), IoError> {
        let Some(device) = self.device.as_mut() else {
            return Err(STOPPED);
        };
        let result = match command {
            // SAFETY: the same header, buffer and status that were queued with `token`.
            Command::Read { buf, .. } => unsafe {
                device.complete_read_blocks(token, &ticket.header, buf, &mut ticket.status)
            },
            // SAFETY: as for reads.
            Command::Write { buf, .. } => unsafe {
                device.complete_write_blocks(token, &ticket.header, buf, &mut ticket.status)
            },
            // Only reads and writes are put on the queue.
            Command::Flush | Command::Discard { .. } => Err(VirtioError::InvalidParam),
        };
        result.map_err(io_error)
    }

    fn flush(&mut self) -> Result<(), IoError> {
        match self.device.as_mut() {
            Some(device) => device.flush().map_err(io_error),
            None => Err(STOPPED),
        }
    }

    fn stop(&mut self) {
        self.device = None;
    }

    fn restart(&mut self) -> Option<u16> {
        let device = start(&mut self.root, self.address)
            .ok()
            .filter(|device| device.capacity() == self.sectors)?;
        let queue_size = device.virt_queue_size();
        self.device = Some(device);
        Some(queue_size)
    }
}
