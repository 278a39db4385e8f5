//! Counts the appliance's `net` command prints.

use crate::Appliance;

/// Where `net`'s `cpu:` line has its counts of NBD requests and disk interrupts
/// (`32 % busy since start-up (4210 M of 12800 M cycles), 48211 NBD requests,
/// 30112 disk interrupts`).
pub const NBD_REQUESTS_WORD: usize = 11;
pub const DISK_INTERRUPTS_WORD: usize = 14;

/// A number from the `net` line starting with `label`, the `index`th word after
/// it; panics, like the tests that call it, when `net` fails or has no such line.
pub fn net_figure(appliance: &mut Appliance, label: &str, index: usize) -> u64 {
    let shown = appliance.console_ok("net").unwrap();
    let line = shown
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label} line in {shown}"));
    let word = line.split_whitespace().nth(index).unwrap();
    word.trim_end_matches(',').parse().unwrap()
}
