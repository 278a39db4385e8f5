//! The x86_64 machine layer: CPU tables, interrupts, clock, real-time clock, serial
//! line, power, hardware randomness.

pub mod clock;
pub mod gdt;
pub mod interrupts;
pub mod port;
pub mod power;
pub mod random;
pub mod rtc;
pub mod serial;
