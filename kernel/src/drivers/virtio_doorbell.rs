//! A virtio queue's doorbell as one register write.
//!
//! `virtio-drivers`' PCI transport selects the queue and reads its notification
//! offset every time it notifies: three register accesses, each a trap into QEMU
//! under TCG that waits for QEMU's global lock. The offset does not change once the
//! device is set up, so it is read once here and a doorbell is a single write.
//! The queue's MSI-X vector, which `virtio-drivers` does not set, is set here too.

use virtio_drivers::transport::pci::bus::DeviceFunction;

use crate::mmio::Mmio;
use crate::pci::Pci;

/// PCI capability ID of vendor-specific capabilities, which virtio's are.
const VENDOR_CAPABILITY: u8 = 0x09;
/// virtio capability types (`cfg_type`).
const COMMON_CFG: u8 = 1;
const NOTIFY_CFG: u8 = 2;
/// Offsets in a virtio capability: BAR, offset and length of the structure, then
/// (notification capability only) the notification offset multiplier.
const CAP_BAR: u8 = 4;
const CAP_OFFSET: u8 = 8;
const CAP_LENGTH: u8 = 12;
const CAP_NOTIFY_MULTIPLIER: u8 = 16;
/// Registers of the common configuration structure.
const QUEUE_SELECT: usize = 0x16;
const QUEUE_MSIX_VECTOR: usize = 0x1a;
const QUEUE_NOTIFY_OFF: usize = 0x1e;
/// The vector value meaning "no interrupt".
const NO_VECTOR: u16 = 0xffff;

/// Where a virtio structure lies: its BAR, and offset and length in it.
struct Structure {
    bar: u8,
    offset: u64,
    length: u64,
}

impl Structure {
    fn read(pci: &Pci, function: DeviceFunction, capability: u8) -> Structure {
        Structure {
            bar: pci.config_word(function, capability + CAP_BAR) as u8,
            offset: pci.config_word(function, capability + CAP_OFFSET).into(),
            length: pci.config_word(function, capability + CAP_LENGTH).into(),
        }
    }

    /// Maps the structure's registers.
    fn map(&self, pci: &mut Pci, function: DeviceFunction) -> Result<Mmio, &'static str> {
        let (address, size) = pci.memory_bar(function, self.bar)?;
        if self.length == 0 || self.offset + self.length > size {
            return Err("a virtio structure lies outside its BAR");
        }
        // SAFETY: the range is inside a memory BAR of the device, as its capability
        // describes it.
        unsafe { Mmio::map(address + self.offset, self.length as usize) }
            .ok_or("mapping a virtio structure failed")
    }
}

/// One queue's doorbell, and its interrupt vector.
pub struct Doorbell {
    registers: Mmio,
    common: Mmio,
    offset: usize,
    queue: u16,
}

impl Doorbell {
    /// Finds the doorbell of `queue` of the virtio device at `function`.
    pub fn find(
        pci: &mut Pci,
        function: DeviceFunction,
        queue: u16,
    ) -> Result<Doorbell, &'static str> {
        let mut common = None;
        let mut notify = None;
        for capability in pci.root.capabilities(function) {
            if capability.id != VENDOR_CAPABILITY {
                continue;
            }
            let structure = Structure::read(pci, function, capability.offset);
            match (capability.private_header >> 8) as u8 {
                COMMON_CFG if common.is_none() => common = Some(structure),
                NOTIFY_CFG if notify.is_none() => {
                    let multiplier =
                        pci.config_word(function, capability.offset + CAP_NOTIFY_MULTIPLIER);
                    notify = Some((structure, multiplier));
                }
                _ => {}
            }
        }
        let common = common.ok_or("no virtio common configuration")?;
        let (notify, multiplier) = notify.ok_or("no virtio notification structure")?;
        let common = common.map(pci, function)?;
        common.write_u16(QUEUE_SELECT, queue);
        let queue_offset = common.read_u16(QUEUE_NOTIFY_OFF);
        let offset = usize::from(queue_offset) * multiplier as usize;
        if !offset.is_multiple_of(2) || offset + 2 > notify.length as usize {
            return Err("a virtio doorbell lies outside its structure");
        }
        Ok(Doorbell {
            registers: notify.map(pci, function)?,
            common,
            offset,
            queue,
        })
    }

    /// Has the queue's used-buffer interrupts sent as MSI-X table entry 0 (set up
    /// with [`Pci::enable_msix`]); false when the device refuses. A device reset
    /// forgets the vector, so this follows every start of the device.
    pub fn route_interrupts(&self) -> bool {
        self.common.write_u16(QUEUE_SELECT, self.queue);
        self.common.write_u16(QUEUE_MSIX_VECTOR, 0);
        self.common.read_u16(QUEUE_MSIX_VECTOR) != NO_VECTOR
    }

    /// Tells the device that its queue has new buffers.
    pub fn ring(&self) {
        self.registers.write_u16(self.offset, self.queue);
    }
}
