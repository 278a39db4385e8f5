//! COM1, the appliance's console: a 16550 UART at 115200 baud, 8N1, polled for
//! input (its receive interrupt only wakes the CPU from `hlt`).

use core::fmt;

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
        port::write_u8(INTERRUPT_ENABLE, 0x01);
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

    fn write_byte(&mut self, byte: u8) {
        while port::read_u8(LINE_STATUS) & TRANSMIT_EMPTY == 0 {
            core::hint::spin_loop();
        }
        port::write_u8(DATA, byte);
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        text.bytes().for_each(|byte| self.write_byte(byte));
        Ok(())
    }
}
