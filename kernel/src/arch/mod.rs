//! The x86_64 machine layer: CPU tables, interrupts, clock, real-time clock, serial
//! line, power, hardware randomness, and the memory copy loops.

pub mod clock;
pub mod gdt;
pub mod interrupts;
mod memory_copy;
pub mod port;
pub mod power;
pub mod random;
pub mod rtc;
pub mod serial;
