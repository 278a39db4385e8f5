//! virtio-net checksum offload, which `virtio-drivers` does not negotiate itself: a
//! transport that passes everything through to the PCI transport but adds the
//! checksum features to what the driver accepts (when the device offers them), and
//! the header fields that carry a frame's checksum either way.
//!
//! The transport also hides `VIRTIO_F_RING_EVENT_IDX` from the driver. With event
//! indices `virtio-drivers` notifies the device on every buffer it adds past the
//! device's last announced index (rather than once on crossing it), and QEMU moves
//! that index only as it takes buffers: while the device is behind, every frame
//! sent and every receive buffer returned was a register write, each a trap into
//! QEMU that waits for the device's own thread. Without event indices the device
//! sets its no-notify flag while it works through a queue, and the driver stays
//! quiet until it clears it.
//!
//! Doorbells the driver rings are only recorded ([`Doorbells`]); the NIC rings
//! each queue's once per poll. Under TCG a doorbell is a trap into QEMU that waits
//! for QEMU's global lock, and the driver rang one for every frame it queued while
//! the device's flag allowed it.

use alloc::rc::Rc;
use core::cell::Cell;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// `VIRTIO_NET_F_CSUM`: the device completes checksums of frames the driver sends.
pub const FEATURE_CSUM: u64 = 1 << 0;
/// `VIRTIO_NET_F_GUEST_CSUM`: the driver accepts frames with partial checksums.
pub const FEATURE_GUEST_CSUM: u64 = 1 << 1;
/// `VIRTIO_F_RING_EVENT_IDX`, which the driver is not shown (see above).
const FEATURE_RING_EVENT_IDX: u64 = 1 << 29;
/// Header flag: the checksum from `csum_start` on is still to be computed.
pub const NEEDS_CSUM: u8 = 1;
/// Header flag: the device checked the checksum.
pub const DATA_VALID: u8 = 2;
/// Header offsets of `flags`, `csum_start` and `csum_offset`.
pub const HEADER_FLAGS: usize = 0;
pub const HEADER_CSUM_START: usize = 6;
pub const HEADER_CSUM_OFFSET: usize = 8;

/// The queues whose doorbell the driver rang since they were last taken.
#[derive(Clone, Default)]
pub struct Doorbells(Rc<Cell<u32>>);

impl Doorbells {
    fn ring(&self, queue: u16) {
        self.0.set(self.0.get() | 1 << queue);
    }

    /// The queues rung, each once, forgetting them.
    pub fn take(&self) -> impl Iterator<Item = u16> {
        let rung = self.0.take();
        (0..u32::BITS as u16).filter(move |queue| rung & 1 << queue != 0)
    }
}

/// The PCI transport, accepting the checksum features too, and recording doorbells.
pub struct OffloadTransport {
    inner: PciTransport,
    /// The checksum features the device offers (both, or none is used).
    offered: u64,
    doorbells: Doorbells,
}

impl OffloadTransport {
    /// The transport over `inner`; the doorbells the driver rings are recorded
    /// in `doorbells`.
    pub fn new(mut inner: PciTransport, doorbells: Doorbells) -> OffloadTransport {
        let both = FEATURE_CSUM | FEATURE_GUEST_CSUM;
        let offered = if inner.read_device_features() & both == both {
            both
        } else {
            0
        };
        OffloadTransport {
            inner,
            offered,
            doorbells,
        }
    }

    /// Whether checksum offload is negotiated.
    pub fn offloads(&self) -> bool {
        self.offered != 0
    }
}

impl Transport for OffloadTransport {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features() & !FEATURE_RING_EVENT_IDX
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner
            .write_driver_features(driver_features | self.offered)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        self.doorbells.ring(queue)
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue)
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<()> {
        self.inner.write_config_space(offset, value)
    }
}
