//! PCI: configuration-space access through the ECAM window from ACPI's MCFG (q35)
//! or the legacy 0xCF8/0xCFC ports (i440fx), enumeration, and BAR setup.
//!
//! The access type plugs into `virtio-drivers`' `PciRoot`, whose enumeration and
//! BAR sizing every driver shares.

use alloc::vec::Vec;
use core::ops::RangeInclusive;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Command, ConfigurationAccess, DeviceFunction, DeviceFunctionInfo, PciRoot,
};

use crate::acpi::EcamWindow;
use crate::arch::port;
use crate::mmio::Mmio;

/// How configuration space is reached.
pub enum ConfigAccess {
    /// Memory-mapped, 4 KiB per function (bus 0 at offset 0).
    Ecam(Mmio),
    /// Legacy configuration mechanism #1.
    Ports,
}

const CONFIG_ADDRESS: u16 = 0xcf8;
/// Interrupt line (low byte) and interrupt pin (next byte) in the configuration header.
const INTERRUPT_REGISTER: u8 = 0x3c;
/// Capability ID of message-signalled interrupts.
const CAPABILITY_MSI: u8 = 0x05;
/// MSI message control: 64-bit address capable, enable, multiple-message enable.
const MSI_64_BIT: u16 = 1 << 7;
const MSI_ENABLE: u16 = 1;
const MSI_MULTIPLE: u16 = 0x7 << 4;
/// Capability ID of MSI-X, and its message control's enable and function-mask bits.
const CAPABILITY_MSIX: u8 = 0x11;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Bytes of one MSI-X table entry: address (low, high), data, vector control.
const MSIX_ENTRY_BYTES: usize = 16;
/// An MSI-X entry's vector control word, whose bit 0 masks the entry.
const MSIX_VECTOR_CONTROL: usize = 12;
const CONFIG_DATA: u16 = 0xcfc;

impl ConfigAccess {
    fn ecam_offset(function: DeviceFunction, register: u8) -> usize {
        (usize::from(function.bus) << 20)
            | (usize::from(function.device) << 15)
            | (usize::from(function.function) << 12)
            | usize::from(register & 0xfc)
    }

    fn port_address(function: DeviceFunction, register: u8) -> u32 {
        0x8000_0000
            | u32::from(function.bus) << 16
            | u32::from(function.device) << 11
            | u32::from(function.function) << 8
            | u32::from(register & 0xfc)
    }
}

impl ConfigurationAccess for ConfigAccess {
    fn read_word(&self, function: DeviceFunction, register: u8) -> u32 {
        match self {
            ConfigAccess::Ecam(mmio) => mmio.read_u32(Self::ecam_offset(function, register)),
            ConfigAccess::Ports => {
                port::write_u32(CONFIG_ADDRESS, Self::port_address(function, register));
                port::read_u32(CONFIG_DATA)
            }
        }
    }

    fn write_word(&mut self, function: DeviceFunction, register: u8, data: u32) {
        match self {
            ConfigAccess::Ecam(mmio) => mmio.write_u32(Self::ecam_offset(function, register), data),
            ConfigAccess::Ports => {
                port::write_u32(CONFIG_ADDRESS, Self::port_address(function, register));
                port::write_u32(CONFIG_DATA, data);
            }
        }
    }

    // SAFETY: a copy reaches the same configuration space the same way (port I/O,
    // or an ECAM mapping that is never unmapped), and every access is one whole
    // register, so two copies in use cannot corrupt each other's accesses.
    unsafe fn unsafe_clone(&self) -> Self {
        match self {
            ConfigAccess::Ecam(mmio) => ConfigAccess::Ecam(mmio.clone()),
            ConfigAccess::Ports => ConfigAccess::Ports,
        }
    }
}

/// A function found on the bus.
#[derive(Clone, Debug)]
pub struct PciFunction {
    pub address: DeviceFunction,
    pub info: DeviceFunctionInfo,
}

/// The PCI segment the appliance drives (segment 0).
pub struct Pci {
    pub root: PciRoot<ConfigAccess>,
    /// Direct register access for what `PciRoot` does not expose.
    config: ConfigAccess,
    buses: RangeInclusive<u8>,
    /// "ECAM" or "port I/O", for the boot log.
    pub mechanism: &'static str,
}

impl Pci {
    /// Uses segment 0's ECAM window when ACPI names one, else legacy ports.
    pub fn new(ecam: &[EcamWindow]) -> Pci {
        if let Some(window) = ecam.iter().find(|w| w.segment == 0) {
            let len = (usize::from(window.end_bus) + 1) << 20;
            // SAFETY: the MCFG names this range as the ECAM window: device memory.
            if let Some(mmio) = unsafe { Mmio::map(window.base, len) } {
                return Pci {
                    config: ConfigAccess::Ecam(mmio.clone()),
                    root: PciRoot::new(ConfigAccess::Ecam(mmio)),
                    buses: window.start_bus..=window.end_bus,
                    mechanism: "ECAM",
                };
            }
        }
        Pci {
            config: ConfigAccess::Ports,
            root: PciRoot::new(ConfigAccess::Ports),
            buses: 0..=255,
            mechanism: "port I/O",
        }
    }

    /// Every function on every bus, in bus/device/function order.
    pub fn functions(&self) -> Vec<PciFunction> {
        self.buses
            .clone()
            .flat_map(|bus| self.root.enumerate_bus(bus))
            .map(|(address, info)| PciFunction { address, info })
            .collect()
    }

    /// A 32-bit register of `function`'s configuration space (`register` a
    /// multiple of 4).
    pub fn config_word(&self, function: DeviceFunction, register: u8) -> u32 {
        self.config.read_word(function, register)
    }

    /// The physical address and size of memory BAR `index`, with memory decoding
    /// and bus mastering switched on. The firmware assigns the addresses; a BAR it
    /// left unassigned is reported, not guessed.
    pub fn memory_bar(
        &mut self,
        function: DeviceFunction,
        index: u8,
    ) -> Result<(u64, u64), &'static str> {
        let bar = self
            .root
            .bar_info(function, index)
            .map_err(|_| "invalid BAR")?;
        let Some((address, size)) = bar.as_ref().and_then(BarInfo::memory_address_size) else {
            return Err("BAR is not a memory BAR");
        };
        if address == 0 || size == 0 {
            return Err("the firmware left the BAR unassigned");
        }
        self.enable(function);
        Ok((address, size))
    }

    /// The legacy (INTx) interrupt line the firmware routed the function to, with
    /// INTx delivery switched on; `None` when the function has no interrupt pin or
    /// the firmware left it unrouted.
    pub fn legacy_interrupt_line(&mut self, function: DeviceFunction) -> Option<u8> {
        let register = self.config.read_word(function, INTERRUPT_REGISTER);
        let (line, pin) = (register as u8, (register >> 8) as u8);
        if pin == 0 || line == 0xff {
            return None;
        }
        let (_, command) = self.root.get_status_command(function);
        self.root
            .set_command(function, command - Command::INTERRUPT_DISABLE);
        Some(line)
    }

    /// Points the function's MSI capability at `address` with `data` (one vector)
    /// and switches MSI on and INTx off; false when the function has no MSI.
    pub fn enable_msi(&mut self, function: DeviceFunction, address: u64, data: u32) -> bool {
        let Some((at, control)) = self.capability(function, CAPABILITY_MSI) else {
            return false;
        };
        self.config.write_word(function, at + 4, address as u32);
        if control & MSI_64_BIT != 0 {
            self.config
                .write_word(function, at + 8, (address >> 32) as u32);
            self.config.write_word(function, at + 12, data);
        } else {
            self.config.write_word(function, at + 8, data);
        }
        self.switch_to_messages(function, at, (control & !MSI_MULTIPLE) | MSI_ENABLE);
        true
    }

    /// The offset and message control of the function's capability `id`.
    fn capability(&self, function: DeviceFunction, id: u8) -> Option<(u8, u16)> {
        self.root
            .capabilities(function)
            .find(|capability| capability.id == id)
            .map(|capability| (capability.offset, capability.private_header))
    }

    /// Writes the message control of the MSI or MSI-X capability at `at` and
    /// switches INTx off.
    fn switch_to_messages(&mut self, function: DeviceFunction, at: u8, control: u16) {
        let header = self.config.read_word(function, at) & 0xffff;
        self.config
            .write_word(function, at, header | u32::from(control) << 16);
        let (_, command) = self.root.get_status_command(function);
        self.root
            .set_command(function, command | Command::INTERRUPT_DISABLE);
    }

    /// Points entry 0 of the function's MSI-X table at `address` with `data`,
    /// unmasked, and switches MSI-X on and INTx off; `None` when the function has
    /// no MSI-X or its table cannot be mapped. The device then sends entry 0 for the
    /// sources its driver routes there; the entry returned masks it.
    pub fn enable_msix(
        &mut self,
        function: DeviceFunction,
        address: u64,
        data: u32,
    ) -> Option<MsixEntry> {
        let (at, control) = self.capability(function, CAPABILITY_MSIX)?;
        let table = self.config.read_word(function, at + 4);
        let (bar, offset) = ((table & 0x7) as u8, u64::from(table & !0x7));
        let (base, size) = self.memory_bar(function, bar).ok()?;
        if offset + MSIX_ENTRY_BYTES as u64 > size {
            return None;
        }
        // SAFETY: the first entry of the table lies inside a memory BAR of the
        // device, where its MSI-X capability says the table is.
        let entry = unsafe { Mmio::map(base + offset, MSIX_ENTRY_BYTES) }?;
        entry.write_u32(0, address as u32);
        entry.write_u32(4, (address >> 32) as u32);
        entry.write_u32(8, data);
        entry.write_u32(MSIX_VECTOR_CONTROL, 0);
        self.switch_to_messages(function, at, (control & !MSIX_FUNCTION_MASK) | MSIX_ENABLE);
        Some(MsixEntry(entry))
    }

    /// Stops every function but `except` that the firmware routed to `line` from
    /// raising legacy interrupts. The disk drivers poll, but a virtio device still
    /// asserts its line on completions until its interrupt status is read, so on a
    /// shared line it would keep waking the CPU meant for `except`.
    pub fn silence_legacy_interrupts(&mut self, line: u8, except: DeviceFunction) {
        for function in self.functions() {
            let register = self.config.read_word(function.address, INTERRUPT_REGISTER);
            if function.address == except || register as u8 != line {
                continue;
            }
            let (_, command) = self.root.get_status_command(function.address);
            self.root
                .set_command(function.address, command | Command::INTERRUPT_DISABLE);
        }
    }

    /// A root of its own for a driver that sets its device up again later (after
    /// resetting it). It reaches the same configuration space the same way.
    pub fn driver_root(&self) -> PciRoot<ConfigAccess> {
        // SAFETY: see `unsafe_clone` above: the copies are used one at a time (the
        // kernel is single-threaded and no interrupt handler touches PCI), each
        // access a whole register.
        PciRoot::new(unsafe { self.config.unsafe_clone() })
    }

    /// Switches on memory decoding and bus mastering (DMA).
    pub fn enable(&mut self, function: DeviceFunction) {
        let (_, command) = self.root.get_status_command(function);
        self.root.set_command(
            function,
            command | Command::MEMORY_SPACE | Command::BUS_MASTER,
        );
    }
}

/// Entry 0 of a function's MSI-X table. While it is masked the function holds a
/// message it would send (its pending bit) and sends it once unmasked, so masking
/// defers interrupts without losing one.
pub struct MsixEntry(Mmio);

impl MsixEntry {
    pub fn set_masked(&self, masked: bool) {
        self.0.write_u32(MSIX_VECTOR_CONTROL, u32::from(masked));
    }
}
