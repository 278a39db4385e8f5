//! Disk drivers. Each implements [`blockdev::BlockDevice`] with several requests in
//! flight and completions found by polling. The NIC drivers serve smoltcp.

pub mod e1000e;
pub mod nvme;
pub mod virtio_blk;
mod virtio_blk_queue;
mod virtio_doorbell;
mod virtio_hal;
pub mod virtio_net;
mod virtio_offload;

use alloc::boxed::Box;
use alloc::format;
use alloc::vec::Vec;
use core::fmt::Write;
use dm::Disk;
use virtio_drivers::transport::DeviceType;
use virtio_drivers::transport::pci::virtio_device_type;

use crate::pci::Pci;

/// PCI class, subclass and programming interface of an NVMe controller.
const NVME_CLASS: (u8, u8, u8) = (0x01, 0x08, 0x02);

/// The disks found, and what must be told about power-off.
pub struct Storage {
    pub disks: Vec<Disk>,
    pub nvme_controllers: Vec<nvme::ShutdownHandle>,
}

/// Finds and sets up every disk, in PCI order: virtio-blk disks become `vda`,
/// `vdb`, …; NVMe namespaces `nvme<controller>n<namespace id>`. A device that
/// fails to start is reported on `log` and skipped.
pub fn discover(pci: &mut Pci, log: &mut dyn Write) -> Storage {
    let mut disks = Vec::new();
    let mut nvme_controllers = Vec::new();
    let mut virtio_disks = 0;
    let mut nvme_count = 0;
    for function in pci.functions() {
        let info = &function.info;
        if virtio_device_type(info) == Some(DeviceType::Block) {
            let name = format!("vd{}", console::disk_letters(virtio_disks));
            virtio_disks += 1;
            match virtio_blk::VirtioBlk::probe(pci, &function) {
                Ok(device) => disks.push(Disk {
                    name,
                    device: Box::new(device),
                }),
                Err(why) => {
                    let _ = write!(log, "thinbox: {name} at {}: {why}\r\n", function.address);
                }
            }
        } else if (info.class, info.subclass, info.prog_if) == NVME_CLASS {
            let controller = nvme_count;
            nvme_count += 1;
            match nvme::probe(pci, &function) {
                Ok(nvme::Probed {
                    namespaces,
                    shutdown,
                }) => {
                    disks.extend(namespaces.into_iter().map(|(nsid, device)| Disk {
                        name: format!("nvme{controller}n{nsid}"),
                        device: Box::new(device),
                    }));
                    nvme_controllers.push(shutdown);
                }
                Err(why) => {
                    let _ = write!(
                        log,
                        "thinbox: nvme{controller} at {}: {why}\r\n",
                        function.address
                    );
                }
            }
        }
    }
    Storage {
        disks,
        nvme_controllers,
    }
}
