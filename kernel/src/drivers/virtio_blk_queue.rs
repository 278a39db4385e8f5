//! virtio-blk's request queue, driven on `virtio-drivers`' virtqueue and PCI
//! transport directly rather than through its `VirtIOBlk`, for two things that
//! driver does not offer:
//!
//! - a flush queued like reads and writes (it has only a blocking flush, which
//!   needs an otherwise idle queue and spins until the device answers);
//! - one doorbell for all the requests added since the last one ([`BlkQueue::kick`]):
//!   it rings the doorbell for each request as it adds it. Under TCG QEMU's device
//!   model takes every request on the queue inside the doorbell's register write,
//!   so with or without event indices each request cost a doorbell.
//!
//! `VIRTIO_F_RING_EVENT_IDX` is not negotiated, as for virtio-net (see
//! [`virtio_offload`](super::virtio_offload)): the device's no-notify flag says when
//! a doorbell is not needed.

use virtio_drivers::Error;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, Transport};

use super::virtio_doorbell::Doorbell;
use super::virtio_hal::KernelHal;

/// The request queue's index.
pub const QUEUE: u16 = 0;
/// Descriptors on the queue; with indirect descriptors, requests in flight.
pub const QUEUE_SIZE: u16 = 16;

/// `VIRTIO_BLK_F_RO`: the disk is read-only.
const FEATURE_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_FLUSH`: the device takes flush requests (without it writes are
/// durable when they complete).
const FEATURE_FLUSH: u64 = 1 << 9;
/// `VIRTIO_F_INDIRECT_DESC`: a request's buffers take one descriptor on the queue.
const FEATURE_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_F_VERSION_1`, which a driver must accept when offered.
const FEATURE_VERSION_1: u64 = 1 << 32;
const FEATURES: u64 = FEATURE_RO | FEATURE_FLUSH | FEATURE_INDIRECT_DESC | FEATURE_VERSION_1;

/// Request types.
const TYPE_IN: u32 = 0;
const TYPE_OUT: u32 = 1;
const TYPE_FLUSH: u32 = 4;
const TYPE_GET_ID: u32 = 8;

/// Request status values (anything else is treated as an I/O error).
const STATUS_OK: u8 = 0;
const STATUS_UNSUPPORTED: u8 = 2;
const STATUS_NOT_READY: u8 = 3;

/// The device-readable header that starts every request: type, reserved, sector.
pub struct Header([u8; 16]);

impl Header {
    fn new(kind: u32, sector: u64) -> Header {
        let mut bytes = [0; 16];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        Header(bytes)
    }

    pub fn read(sector: u64) -> Header {
        Header::new(TYPE_IN, sector)
    }

    pub fn write(sector: u64) -> Header {
        Header::new(TYPE_OUT, sector)
    }

    pub fn flush() -> Header {
        Header::new(TYPE_FLUSH, 0)
    }
}

/// The device-writable status byte that ends every request.
pub struct Status([u8; 1]);

impl Status {
    /// Not yet written by the device.
    pub fn pending() -> Status {
        Status([STATUS_NOT_READY])
    }

    fn result(&self) -> Result<(), Error> {
        match self.0[0] {
            STATUS_OK => Ok(()),
            STATUS_UNSUPPORTED => Err(Error::Unsupported),
            STATUS_NOT_READY => Err(Error::NotReady),
            _ => Err(Error::IoError),
        }
    }
}

/// The data a request moves between its header and its status.
pub enum Data<'a> {
    /// The device fills the buffer.
    Read(&'a mut [u8]),
    /// The device reads the buffer.
    Write(&'a [u8]),
    /// A flush.
    None,
}

/// A virtio-blk device's queue, set up and running.
pub struct BlkQueue {
    /// Declared first so that it is dropped first: dropping the transport resets
    /// the device, which then no longer touches the queue's memory.
    transport: PciTransport,
    queue: VirtQueue<KernelHal, { QUEUE_SIZE as usize }>,
    doorbell: Doorbell,
    features: u64,
    capacity: u64,
    /// Requests were added since the doorbell last rang.
    unannounced: bool,
}

impl BlkQueue {
    /// Negotiates features, sets up the queue and starts the device, with used-buffer
    /// interrupts off (the driver polls, and turns them on only before the CPU
    /// halts: [`BlkQueue::set_interrupts`]); `doorbell` is the queue's.
    pub fn new(mut transport: PciTransport, doorbell: Doorbell) -> Result<BlkQueue, Error> {
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let features = transport.read_device_features() & FEATURES;
        transport.write_driver_features(features);
        transport.set_status(
            DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK,
        );
        if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            return Err(Error::Unsupported);
        }
        let capacity = transport.read_consistent(|| {
            let low = transport.read_config_space::<u32>(0)?;
            let high = transport.read_config_space::<u32>(4)?;
            Ok(u64::from(low) | u64::from(high) << 32)
        })?;
        let mut queue = VirtQueue::new(
            &mut transport,
            QUEUE,
            features & FEATURE_INDIRECT_DESC != 0,
            false,
        )?;
        queue.set_dev_notify(false);
        transport.finish_init();
        Ok(BlkQueue {
            transport,
            queue,
            doorbell,
            features,
            capacity,
            unannounced: false,
        })
    }

    /// Resets the device (its DMA stops) before the queue's memory is freed, and
    /// gives back the doorbell for the device's next start.
    pub fn stop(self) -> Doorbell {
        let BlkQueue {
            transport,
            queue,
            doorbell,
            ..
        } = self;
        drop(transport);
        drop(queue);
        doorbell
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn read_only(&self) -> bool {
        self.features & FEATURE_RO != 0
    }

    /// Whether the device takes flush requests.
    pub fn flushes(&self) -> bool {
        self.features & FEATURE_FLUSH != 0
    }

    /// The device's serial number, waiting for the answer (only before any other
    /// request is queued: it takes the first used buffer as its own).
    pub fn device_id(&mut self) -> Result<[u8; 20], Error> {
        let header = Header::new(TYPE_GET_ID, 0);
        let mut id = [0; 20];
        let mut status = Status::pending();
        self.queue.add_notify_wait_pop(
            &[header.0.as_slice()],
            &mut [id.as_mut_slice(), status.0.as_mut_slice()],
            &mut self.transport,
        )?;
        status.result().map(|()| id)
    }

    /// Puts a request on the queue without ringing the doorbell ([`BlkQueue::kick`]
    /// does); returns its token.
    ///
    /// # Safety
    /// `header`, `data` and `status` must stay valid, unmoved and untouched until
    /// [`BlkQueue::complete`] takes the request back with the same buffers.
    pub unsafe fn add(
        &mut self,
        header: &Header,
        data: Data<'_>,
        status: &mut Status,
    ) -> Result<u16, Error> {
        let queue = &mut self.queue;
        let token = with_buffers(header, data, status, |inputs, outputs| {
            // SAFETY: the caller keeps the buffers as `add` requires until `complete`.
            unsafe { queue.add(inputs, outputs) }
        })?;
        self.unannounced = true;
        Ok(token)
    }

    /// Rings the doorbell if requests were added since it last rang, unless the
    /// device said it will look at the queue anyway.
    pub fn kick(&mut self) {
        if self.unannounced {
            self.unannounced = false;
            if self.queue.should_notify() {
                self.doorbell.ring();
            }
        }
    }

    /// Has the queue's used-buffer interrupts sent as MSI-X entry 0 (see
    /// [`Doorbell::route_interrupts`]); false when the device refuses.
    pub fn route_interrupts(&self) -> bool {
        self.doorbell.route_interrupts()
    }

    /// Turns used-buffer interrupts on or off. Turning them on returns whether
    /// the device will interrupt for the next finished request: false when one
    /// finished before they were on (it was not announced; poll it).
    pub fn set_interrupts(&mut self, on: bool) -> bool {
        self.queue.set_dev_notify(on);
        if !on {
            return false;
        }
        // The flag's store must reach memory before the used ring is read: a
        // request the device finishes after this sees interrupts on.
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        self.queue.peek_used().is_none()
    }

    /// The token of the next request the device finished, if any.
    pub fn peek_used(&self) -> Option<u16> {
        self.queue.peek_used()
    }

    /// Takes the finished request `token` off the queue and returns its outcome.
    ///
    /// # Safety
    /// `header`, `data` and `status` must be the buffers `token` was added with.
    pub unsafe fn complete(
        &mut self,
        token: u16,
        header: &Header,
        data: Data<'_>,
        status: &mut Status,
    ) -> Result<(), Error> {
        let queue = &mut self.queue;
        with_buffers(header, data, status, |inputs, outputs| {
            // SAFETY: the caller passes the buffers `token` was added with.
            unsafe { queue.pop_used(token, inputs, outputs) }
        })?;
        status.result()
    }
}

/// Calls `f` with a request's device-readable and device-writable buffers, in the
/// order the queue takes them.
fn with_buffers<R>(
    header: &Header,
    data: Data<'_>,
    status: &mut Status,
    f: impl for<'b> FnOnce(&'b [&'b [u8]], &'b mut [&'b mut [u8]]) -> R,
) -> R {
    let header = header.0.as_slice();
    let status = status.0.as_mut_slice();
    match data {
        Data::Read(buf) => f(&[header], &mut [buf, status]),
        Data::Write(buf) => f(&[header, buf], &mut [status]),
        Data::None => f(&[header], &mut [status]),
    }
}
