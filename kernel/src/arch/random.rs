//! The CPU's random number instructions, checked once at boot: RDSEED (entropy
//! straight from the conditioner, what key generation wants) when the CPU has it,
//! RDRAND otherwise. Without either, or when the instruction fails the health check,
//! the appliance has no source of randomness and says so.

use core::arch::x86_64::{__cpuid, __cpuid_count};
use core::num::NonZeroU32;
use spin::Once;

/// The source `probe` found at boot (none if it found none).
static SOURCE: Once<Option<Source>> = Once::new();

getrandom::register_custom_getrandom!(fill);

/// Which instruction supplies the randomness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Rdseed,
    Rdrand,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Rdseed => "RDSEED",
            Source::Rdrand => "RDRAND",
        }
    }
}

/// Attempts per value before the instruction counts as failed: Intel's guidance is
/// 10 for RDRAND; RDSEED may run dry for a while under load, so it gets more.
const RDRAND_RETRIES: usize = 10;
const RDSEED_RETRIES: usize = 1_000;
/// Values drawn by the health check.
const HEALTH_CHECK_VALUES: usize = 64;

/// The best instruction the CPU offers that passes the health check, or why there
/// is none.
pub fn probe() -> Result<Source, &'static str> {
    let found = find();
    SOURCE.call_once(|| found.ok());
    found
}

fn find() -> Result<Source, &'static str> {
    let rdrand = __cpuid(1).ecx & (1 << 30) != 0;
    let rdseed = __cpuid(0).eax >= 7 && __cpuid_count(7, 0).ebx & (1 << 18) != 0;
    let source = match (rdseed, rdrand) {
        (true, _) => Source::Rdseed,
        (false, true) => Source::Rdrand,
        (false, false) => return Err("the CPU has neither RDSEED nor RDRAND"),
    };
    health_check(source)?;
    Ok(source)
}

/// Fills `buffer` for `getrandom` (TLS keys, handshakes); fails when the CPU has no
/// source or it stops delivering, so no key is ever made from anything weaker.
fn fill(buffer: &mut [u8]) -> Result<(), getrandom::Error> {
    /// getrandom's first custom error code: "no hardware randomness".
    const NO_SOURCE: NonZeroU32 = NonZeroU32::new(getrandom::Error::CUSTOM_START).unwrap();
    let failed = getrandom::Error::from(NO_SOURCE);
    let Some(Some(source)) = SOURCE.get() else {
        return Err(failed);
    };
    for chunk in buffer.chunks_mut(8) {
        let value = draw(*source).ok_or(failed)?;
        chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
    }
    Ok(())
}

/// Draws values and refuses a source that fails to deliver or repeats itself
/// (some CPUs' RDRAND has returned the same value, e.g. all ones, forever).
fn health_check(source: Source) -> Result<(), &'static str> {
    let mut previous = None;
    for _ in 0..HEALTH_CHECK_VALUES {
        let value = draw(source).ok_or("the instruction keeps failing")?;
        if previous == Some(value) {
            return Err("the instruction returned the same value twice in a row");
        }
        previous = Some(value);
    }
    Ok(())
}

/// One 64-bit value, retrying as the instruction's rules allow.
fn draw(source: Source) -> Option<u64> {
    let retries = match source {
        Source::Rdseed => RDSEED_RETRIES,
        Source::Rdrand => RDRAND_RETRIES,
    };
    (0..retries).find_map(|_| {
        let mut value = 0;
        let ok = match source {
            // SAFETY: `probe` picks RDSEED only when CPUID says the CPU implements it,
            // which is what the function's target feature requires.
            Source::Rdseed => unsafe { rdseed(&mut value) },
            // SAFETY: `probe` picks RDRAND only when CPUID says the CPU implements it,
            // which is what the function's target feature requires.
            Source::Rdrand => unsafe { rdrand(&mut value) },
        };
        if ok {
            Some(value)
        } else {
            core::hint::spin_loop();
            None
        }
    })
}

/// One RDSEED step; only to be called once CPUID has shown the instruction.
#[target_feature(enable = "rdseed")]
fn rdseed(value: &mut u64) -> bool {
    core::arch::x86_64::_rdseed64_step(value) == 1
}

/// One RDRAND step; only to be called once CPUID has shown the instruction.
#[target_feature(enable = "rdrand")]
fn rdrand(value: &mut u64) -> bool {
    core::arch::x86_64::_rdrand64_step(value) == 1
}
