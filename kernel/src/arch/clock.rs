//! The monotonic clock: the TSC, calibrated once against the PIT.

use core::sync::atomic::{AtomicU64, Ordering};

use super::{interrupts::PIT_HZ, port};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);

/// PIT ticks counted during calibration (40 ms).
const CALIBRATION_PIT_TICKS: u16 = 47_727;

fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter, present on every x86_64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Measures the TSC frequency by counting TSC ticks across a PIT channel 2
/// one-shot countdown; must run before anything else uses the PIT's gate.
pub fn init() {
    let gate = port::read_u8(0x61);
    // Gate high, speaker off.
    port::write_u8(0x61, (gate & !0x02) | 0x01);
    // Channel 2, low then high byte, mode 0 (interrupt on terminal count).
    port::write_u8(0x43, 0xb0);
    port::write_u8(0x42, CALIBRATION_PIT_TICKS as u8);
    port::write_u8(0x42, (CALIBRATION_PIT_TICKS >> 8) as u8);
    // Restart the count by pulsing the gate.
    let gate = port::read_u8(0x61) & !0x01;
    port::write_u8(0x61, gate);
    port::write_u8(0x61, gate | 0x01);
    let start = rdtsc();
    while port::read_u8(0x61) & 0x20 == 0 {
        core::hint::spin_loop();
    }
    let elapsed = rdtsc() - start;
    let hz = u128::from(elapsed) * u128::from(PIT_HZ) / u128::from(CALIBRATION_PIT_TICKS);
    TSC_HZ.store((hz as u64).max(1), Ordering::Relaxed);
    TSC_AT_BOOT.store(start, Ordering::Relaxed);
}

/// TSC ticks per second.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Nanoseconds since [`init`].
pub fn now_ns() -> u64 {
    let ticks = rdtsc().saturating_sub(TSC_AT_BOOT.load(Ordering::Relaxed));
    (u128::from(ticks) * 1_000_000_000 / u128::from(tsc_hz())) as u64
}
