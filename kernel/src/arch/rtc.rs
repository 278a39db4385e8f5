//! The wall clock: the CMOS real-time clock (ports 0x70/0x71), read once at boot and
//! then carried forward by the monotonic clock, so the registers are not polled at
//! every TLS handshake. The RTC is taken to hold UTC (QEMU's default). A reading
//! that is no date, or one before 2025 (an RTC that was never set, or lost its
//! battery), counts as no time at all.
//!
//! The RTC counts whole seconds, so the boot reading is up to a second behind. The
//! main loop then watches the seconds register ([`watch_second_edge`]) and, at the
//! first change it sees moments after the previous look, takes that instant as the
//! start of the new second: from then on the clock is as right as the RTC itself.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use super::{clock, port};

const INDEX_PORT: u16 = 0x70;
const DATA_PORT: u16 = 0x71;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;

/// Status A: the RTC is updating its registers (they may be half-written).
const UPDATE_IN_PROGRESS: u8 = 0x80;
/// Status B: values are binary, not BCD.
const BINARY: u8 = 0x04;
/// Status B: hours count 0 to 23, not 1 to 12 with a PM bit.
const HOURS_24: u8 = 0x02;
/// The hours register's PM bit in 12-hour mode.
const PM: u8 = 0x80;

/// Readings tried before giving up on two identical ones in a row.
const MAX_READS: usize = 100;
/// Status polls while an update is in progress (one lasts under 2 ms).
const MAX_UPDATE_POLLS: usize = 100_000;
/// The earliest plausible time: 2025-01-01 00:00:00 UTC.
const EARLIEST: u64 = 1_735_689_600;

/// Longest gap between two looks at the seconds register for a change between them
/// to date the start of a second (the main loop looks at every 10 ms timer tick).
const EDGE_PRECISION_NS: u64 = 20_000_000;

/// Unix seconds at boot (0: unknown) and the monotonic clock then; moved to the
/// start of a second once one is seen.
static BOOT_SECONDS: AtomicU64 = AtomicU64::new(0);
static BOOT_NS: AtomicU64 = AtomicU64::new(0);
/// The seconds register at the last look and the monotonic clock then.
static LAST_SECOND: AtomicU8 = AtomicU8::new(0);
static LAST_LOOK_NS: AtomicU64 = AtomicU64::new(0);
/// The start of a second has been seen: the clock needs no more watching.
static ON_EDGE: AtomicBool = AtomicBool::new(false);

fn register(index: u8) -> u8 {
    port::write_u8(INDEX_PORT, index);
    port::read_u8(DATA_PORT)
}

/// Date and time registers, read once no update is under way.
fn registers() -> Option<[u8; 6]> {
    (0..MAX_UPDATE_POLLS).find(|_| register(STATUS_A) & UPDATE_IN_PROGRESS == 0)?;
    Some([SECONDS, MINUTES, HOURS, DAY, MONTH, YEAR].map(register))
}

/// Two identical readings in a row, so none straddles an update.
fn stable_registers() -> Option<[u8; 6]> {
    let mut previous = registers()?;
    for _ in 0..MAX_READS {
        let reading = registers()?;
        if reading == previous {
            return Some(reading);
        }
        previous = reading;
    }
    None
}

/// Reads the RTC and remembers the time; returns it (Unix seconds) if it is one.
pub fn init() -> Option<u64> {
    let (seconds, raw_second) = read()?;
    let now = clock::now_ns();
    BOOT_NS.store(now, Ordering::Relaxed);
    BOOT_SECONDS.store(seconds, Ordering::Relaxed);
    LAST_SECOND.store(raw_second, Ordering::Relaxed);
    LAST_LOOK_NS.store(now, Ordering::Relaxed);
    Some(seconds)
}

/// Called from the main loop: looks at the seconds register until a second is seen
/// to start, then sets the clock to that instant. A change seen long after the
/// previous look (the CPU was busy or away) dates nothing, and the next is awaited.
pub fn watch_second_edge() {
    if ON_EDGE.load(Ordering::Relaxed)
        || BOOT_SECONDS.load(Ordering::Relaxed) == 0
        || register(STATUS_A) & UPDATE_IN_PROGRESS != 0
    {
        return;
    }
    let second = register(SECONDS);
    let now = clock::now_ns();
    let last_look = LAST_LOOK_NS.swap(now, Ordering::Relaxed);
    if LAST_SECOND.swap(second, Ordering::Relaxed) == second
        || now.saturating_sub(last_look) > EDGE_PRECISION_NS
    {
        return;
    }
    if let Some((seconds, _)) = read() {
        BOOT_NS.store(now, Ordering::Relaxed);
        BOOT_SECONDS.store(seconds, Ordering::Relaxed);
        ON_EDGE.store(true, Ordering::Relaxed);
    }
}

/// The RTC's time (Unix seconds), if it is one, and its raw seconds register.
fn read() -> Option<(u64, u8)> {
    let [second, minute, hour, day, month, year] = stable_registers()?;
    let status = register(STATUS_B);
    let value = |raw: u8| {
        if status & BINARY != 0 {
            u32::from(raw)
        } else {
            u32::from(raw >> 4) * 10 + u32::from(raw & 0x0f)
        }
    };
    let hour = if status & HOURS_24 != 0 {
        value(hour)
    } else {
        // 12 AM is 0, 12 PM is 12.
        value(hour & !PM) % 12 + if hour & PM != 0 { 12 } else { 0 }
    };
    let seconds = dm::tls::clock::unix_seconds(
        2000 + value(year),
        value(month),
        value(day),
        hour,
        value(minute),
        value(second),
    )
    .filter(|seconds| *seconds >= EARLIEST)?;
    Some((seconds, second))
}

/// The wall clock now (Unix seconds), if the RTC gave a time at boot.
pub fn unix_time() -> Option<u64> {
    let boot = BOOT_SECONDS.load(Ordering::Relaxed);
    let since_boot = clock::now_ns().saturating_sub(BOOT_NS.load(Ordering::Relaxed));
    (boot != 0).then(|| boot + since_boot / 1_000_000_000)
}
