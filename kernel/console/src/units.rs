//! Durations and rates for console output (sizes are `dm::human_bytes`).

use alloc::format;
use alloc::string::String;

/// A duration in seconds with three decimals.
pub(crate) fn seconds(ns: u64) -> String {
    let ms = ns / 1_000_000;
    format!("{}.{:03} s", ms / 1000, ms % 1000)
}

/// Throughput in MiB/s with two decimals (`bytes` moved in `ns`).
pub(crate) fn mib_per_second(bytes: u64, ns: u64) -> String {
    let hundredths = u128::from(bytes) * 100 * 1_000_000_000 / (u128::from(ns.max(1)) << 20);
    format!("{}.{:02} MiB/s", hundredths / 100, hundredths % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rates() {
        assert_eq!(seconds(1_234_567_890), "1.234 s");
        assert_eq!(seconds(5_000_000), "0.005 s");
        assert_eq!(mib_per_second(16 << 20, 2_000_000_000), "8.00 MiB/s");
        assert_eq!(mib_per_second(1 << 20, 0), "1000000000.00 MiB/s");
    }
}
