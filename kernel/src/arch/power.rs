//! Leaving the machine: QEMU's isa-debug-exit device when present, ACPI S5 soft-off
//! otherwise, and a halt with a message as the last resort.

use core::fmt::Write;
use spin::Once;

use super::{port, serial::Serial};

/// QEMU's isa-debug-exit port; value v makes QEMU exit with status (v << 1) | 1.
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Clean power-off: QEMU exit status 33.
const EXIT_SUCCESS: u32 = 0x10;
/// Kernel panic: QEMU exit status 35.
const EXIT_FAILURE: u32 = 0x11;

/// How to enter ACPI S5, found in the FADT and DSDT at boot.
#[derive(Clone, Copy, Debug)]
pub struct AcpiSoftOff {
    pub pm1a_control: u16,
    pub pm1b_control: u16,
    pub sleep_type_a: u8,
    pub sleep_type_b: u8,
    /// SMI command port and the value that hands ACPI to the OS (0 when ACPI is
    /// already enabled or cannot be).
    pub smi_command: u16,
    pub acpi_enable: u8,
}

/// PM1 control register bits.
const SCI_ENABLED: u16 = 1 << 0;
const SLEEP_ENABLE: u16 = 1 << 13;

static SOFT_OFF: Once<AcpiSoftOff> = Once::new();

/// Remembers how to power off through ACPI.
pub fn set_acpi_soft_off(soft_off: AcpiSoftOff) {
    SOFT_OFF.call_once(|| soft_off);
}

fn acpi_soft_off() {
    let Some(soft_off) = SOFT_OFF.get() else {
        return;
    };
    let control = soft_off.pm1a_control;
    if port::read_u16(control) & SCI_ENABLED == 0
        && soft_off.smi_command != 0
        && soft_off.acpi_enable != 0
    {
        port::write_u8(soft_off.smi_command, soft_off.acpi_enable);
        for _ in 0..1_000_000 {
            if port::read_u16(control) & SCI_ENABLED != 0 {
                break;
            }
            core::hint::spin_loop();
        }
    }
    let sleep = |sleep_type: u8| u16::from(sleep_type & 0x7) << 10 | SLEEP_ENABLE;
    port::write_u16(control, sleep(soft_off.sleep_type_a));
    if soft_off.pm1b_control != 0 {
        port::write_u16(soft_off.pm1b_control, sleep(soft_off.sleep_type_b));
    }
}

fn halt_forever() -> ! {
    x86_64::instructions::interrupts::disable();
    loop {
        x86_64::instructions::hlt();
    }
}

/// Clean power-off (disks already flushed).
pub fn power_off() -> ! {
    port::write_u32(DEBUG_EXIT_PORT, EXIT_SUCCESS);
    acpi_soft_off();
    // Give the chipset a moment to act on the sleep request before giving up.
    let deadline = super::clock::now_ns() + 500_000_000;
    while super::clock::now_ns() < deadline {
        core::hint::spin_loop();
    }
    let _ = Serial::get().write_str("power-off failed: the machine may be switched off now\r\n");
    halt_forever()
}

/// Stops after a fatal error (the message is already printed).
pub fn exit_failure() -> ! {
    port::write_u32(DEBUG_EXIT_PORT, EXIT_FAILURE);
    let _ = Serial::get().write_str("halted: reset the machine to restart\r\n");
    halt_forever()
}
