//! The monotonic clock: the TSC, calibrated once against the PIT.

use core::sync::atomic::{AtomicU64, Ordering};

use super::{interrupts::PIT_HZ, port};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);
/// TSC ticks the CPU spent halted, waiting for an interrupt.
static HALTED: AtomicU64 = AtomicU64::new(0);

/// PIT ticks per calibration run (about 25 ms, well before the count runs out).
const CALIBRATION_PIT_TICKS: u16 = 30_000;
/// Calibration runs; the median wins.
const CALIBRATION_RUNS: usize = 3;
/// Most PIT ticks allowed between the two counter reads around a TSC read: more
/// means the CPU was taken away in between (a loaded host, an SMI), and the sample
/// is retried.
const MAX_SAMPLE_SPREAD: u16 = 50;

fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter, present on every x86_64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// PIT channel 2's current count.
fn pit_count() -> u16 {
    // Latch channel 2, then read low and high byte.
    port::write_u8(0x43, 0x80);
    let low = port::read_u8(0x42);
    let high = port::read_u8(0x42);
    u16::from_le_bytes([low, high])
}

/// Attempts at a step of the calibration before deciding the PIT does not work.
const MAX_ATTEMPTS: u32 = 10_000_000;

/// A TSC reading paired with the PIT count at the same moment: the TSC is read
/// between two counter reads that are close together.
fn sample() -> Option<(u64, u16)> {
    (0..MAX_ATTEMPTS).find_map(|_| {
        let before = pit_count();
        let tsc = rdtsc();
        let after = pit_count();
        (before.wrapping_sub(after) <= MAX_SAMPLE_SPREAD)
            .then(|| (tsc, before - (before - after) / 2))
    })
}

/// One calibration run's outcome.
enum Run {
    Measured(u64),
    /// The CPU was away so long that the count ran out: the elapsed time is
    /// unknown, try again.
    Overran,
    /// The PIT does not count.
    NoPit,
}

/// TSC ticks per second measured over part of a countdown of PIT channel 2.
fn measure_tsc_hz() -> Run {
    const OUT2_HIGH: u8 = 0x20;
    let gate = port::read_u8(0x61);
    // Gate high, speaker off.
    port::write_u8(0x61, (gate & !0x02) | 0x01);
    // Channel 2, low then high byte, mode 0 (OUT2 rises at the terminal count);
    // counting starts with the high byte.
    port::write_u8(0x43, 0xb0);
    port::write_u8(0x42, 0xff);
    port::write_u8(0x42, 0xff);
    let Some((start_tsc, start_count)) = sample() else {
        return Run::NoPit;
    };
    let Some((end_tsc, end_count)) = (0..MAX_ATTEMPTS)
        .filter_map(|_| sample())
        .find(|&(_, count)| start_count.saturating_sub(count) >= CALIBRATION_PIT_TICKS)
    else {
        return Run::NoPit;
    };
    if port::read_u8(0x61) & OUT2_HIGH != 0 {
        return Run::Overran;
    }
    let ticks = u128::from(start_count - end_count);
    Run::Measured((u128::from(end_tsc - start_tsc) * u128::from(PIT_HZ) / ticks) as u64)
}

/// The processor's base frequency from CPUID leaf 0x16, for machines without a
/// working PIT.
fn cpuid_base_hz() -> Option<u64> {
    let max_leaf = core::arch::x86_64::__cpuid(0).eax;
    let mhz = (max_leaf >= 0x16).then(|| core::arch::x86_64::__cpuid(0x16).eax & 0xffff)?;
    (mhz != 0).then(|| u64::from(mhz) * 1_000_000)
}

/// Where the TSC frequency came from, for the boot log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Calibration {
    Pit,
    Cpuid,
    /// Neither worked: 1 GHz is assumed and times will be off.
    Guess,
}

/// Measures the TSC frequency against the PIT (CPUID's figure, or a guess, when
/// there is no working PIT); must run before anything else uses PIT channel 2.
pub fn init() -> Calibration {
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
    let mut runs = [0u64; CALIBRATION_RUNS];
    let mut measured = 0;
    for _ in 0..CALIBRATION_RUNS * 10 {
        match measure_tsc_hz() {
            Run::Measured(hz) => {
                runs[measured] = hz;
                measured += 1;
                if measured == CALIBRATION_RUNS {
                    break;
                }
            }
            Run::Overran => {}
            Run::NoPit => break,
        }
    }
    let (hz, calibration) = if measured == CALIBRATION_RUNS {
        runs.sort_unstable();
        (runs[CALIBRATION_RUNS / 2], Calibration::Pit)
    } else if let Some(hz) = cpuid_base_hz() {
        (hz, Calibration::Cpuid)
    } else {
        (1_000_000_000, Calibration::Guess)
    };
    TSC_HZ.store(hz.max(1), Ordering::Relaxed);
    calibration
}

/// TSC ticks per second.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Runs `halt` (which waits for an interrupt) and counts the time it took as
/// halted.
pub fn halted(halt: impl FnOnce()) {
    let start = rdtsc();
    halt();
    HALTED.fetch_add(rdtsc().saturating_sub(start), Ordering::Relaxed);
}

/// TSC ticks since [`init`], and how many of them the CPU spent halted.
pub fn cycles() -> (u64, u64) {
    let total = rdtsc().saturating_sub(TSC_AT_BOOT.load(Ordering::Relaxed));
    (total, HALTED.load(Ordering::Relaxed))
}

/// Nanoseconds since [`init`].
pub fn now_ns() -> u64 {
    let ticks = rdtsc().saturating_sub(TSC_AT_BOOT.load(Ordering::Relaxed));
    (u128::from(ticks) * 1_000_000_000 / u128::from(tsc_hz())) as u64
}
