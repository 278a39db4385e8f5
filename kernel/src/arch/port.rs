//! x86 I/O ports. Every port the kernel touches is a fixed PC device (UART, PIC,
//! PIT, CMOS real-time clock, PCI configuration, QEMU's exit device) or an ACPI
//! register the firmware named, so these wrappers are safe to call; the audit is the
//! list of callers.

use x86_64::instructions::port::Port;

pub fn read_u8(port: u16) -> u8 {
    // SAFETY: port I/O has no memory-safety effect on this machine's devices (see
    // module docs); callers only name PC-standard or firmware-described ports.
    unsafe { Port::<u8>::new(port).read() }
}

pub fn write_u8(port: u16, value: u8) {
    // SAFETY: as in `read_u8`.
    unsafe { Port::<u8>::new(port).write(value) }
}

pub fn read_u16(port: u16) -> u16 {
    // SAFETY: as in `read_u8`.
    unsafe { Port::<u16>::new(port).read() }
}

pub fn write_u16(port: u16, value: u16) {
    // SAFETY: as in `read_u8`.
    unsafe { Port::<u16>::new(port).write(value) }
}

pub fn read_u32(port: u16) -> u32 {
    // SAFETY: as in `read_u8`.
    unsafe { Port::<u32>::new(port).read() }
}

pub fn write_u32(port: u16, value: u32) {
    // SAFETY: as in `read_u8`.
    unsafe { Port::<u32>::new(port).write(value) }
}
