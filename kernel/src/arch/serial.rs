//! COM1, the appliance's console: a 16550 UART at 115200 baud, 8N1, polled for
//! input (its receive interrupt only wakes the CPU from `hlt`).
//!
//! Output waits for the transmitter by halting, not by spinning on the line status:
//! when the host side of the line does not take bytes (QEMU's `-serial stdio` into a
//! full pipe), QEMU sends the rest from its main loop, which must take the lock that
//! every emulated port access also takes. A CPU reading the line status in a tight
//! loop kept that lock busy enough to starve the main loop on a loaded host, and the
//! console stopped in the middle of a long reply for minutes. Halting until the
//! transmitter-empty interrupt (or the timer) gives the lock back.

use core::fmt;
use x86_64::instructions::interrupts;

use super::port;

const COM1: u16 = 0x3f8;
const DATA: u16 = COM1;
const INTERRUPT_ENABLE: u16 = COM1 + 1;
const FIFO_CONTROL: u16 = COM1 + 2;
const LINE_CONTROL: u16 = COM1 + 3;
const MODEM_CONTROL: u16 = COM1 + 4;
const LINE_STATUS: u16 = COM1 + 5;

const DATA_READY: u8 = 0x01;
const TRANSMIT_EMPTY: u8 = 0x20;
/// Interrupt-enable bits: a byte was received; the transmit FIFO is empty.
const RECEIVED_INTERRUPT: u8 = 0x01;
const TRANSMIT_EMPTY_INTERRUPT: u8 = 0x02;
/// Bytes the transmit FIFO takes once it reports empty.
const FIFO_BYTES: usize = 16;

/// Handle on COM1. It holds no state (the UART is the state), so a copy may be
/// made anywhere, including in the panic handler.
#[derive(Clone, Copy)]
pub struct Serial(());

impl Serial {
    /// Programs the UART: 115200 baud (divisor 1), 8N1, FIFOs on, receive
    /// interrupt enabled.
    pub fn init() -> Serial {
        port::write_u8(INTERRUPT_ENABLE, 0x00);
        port::write_u8(LINE_CONTROL, 0x80);
        port::write_u8(DATA, 0x01);
        port::write_u8(INTERRUPT_ENABLE, 0x00);
        port::write_u8(LINE_CONTROL, 0x03);
        port::write_u8(FIFO_CONTROL, 0xc7);
        // DTR, RTS and OUT2 (which gates the interrupt line to the PIC).
        port::write_u8(MODEM_CONTROL, 0x0b);
        port::write_u8(INTERRUPT_ENABLE, RECEIVED_INTERRUPT);
        Serial(())
    }

    /// A handle on the already initialised port.
    pub fn get() -> Serial {
        Serial(())
    }

    /// A received byte is waiting.
    pub fn has_input(&self) -> bool {
        port::read_u8(LINE_STATUS) & DATA_READY != 0
    }

    /// The next received byte, if one is waiting.
    pub fn try_read(&mut self) -> Option<u8> {
        self.has_input().then(|| port::read_u8(DATA))
    }

    fn transmitter_empty(&self) -> bool {
        port::read_u8(LINE_STATUS) & TRANSMIT_EMPTY != 0
    }

    /// Waits until the transmit FIFO is empty. With interrupts on (the console, not
    /// boot or the panic handler) the CPU halts until the UART says so or the timer
    /// ticks; interrupts are off between the last check and `hlt`, whose `sti`
    /// shadow covers the gap, so the wake-up cannot be missed.
    fn wait_until_empty(&mut self) {
        while !self.transmitter_empty() {
            if !interrupts::are_enabled() {
                core::hint::spin_loop();
                continue;
            }
            port::write_u8(
                INTERRUPT_ENABLE,
                RECEIVED_INTERRUPT | TRANSMIT_EMPTY_INTERRUPT,
            );
            interrupts::disable();
            if self.transmitter_empty() {
                interrupts::enable();
            } else {
                interrupts::enable_and_hlt();
            }
            port::write_u8(INTERRUPT_ENABLE, RECEIVED_INTERRUPT);
        }
    }
}

impl fmt::Write for Serial {
    /// Sends the text a FIFO's worth at a time, each after the FIFO reported empty.
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for chunk in text.as_bytes().chunks(FIFO_BYTES) {
            self.wait_until_empty();
            chunk.iter().for_each(|&byte| port::write_u8(DATA, byte));
        }
        Ok(())
    }
}
