//! What the appliance's `disks` says a disk failed.

use crate::Appliance;

/// The `errors:` line `disks` prints under `disk` (trimmed), if it prints one;
/// panics, like the tests that call it, when `disks` fails or does not list `disk`.
pub fn disk_errors(appliance: &mut Appliance, disk: &str) -> Option<String> {
    let listing = appliance.console_ok("disks").unwrap();
    let mut lines = listing
        .lines()
        .skip_while(|line| line.split_whitespace().next() != Some(disk));
    lines
        .next()
        .unwrap_or_else(|| panic!("no {disk} in {listing}"));
    let next = lines.next()?.trim();
    next.starts_with("errors: ").then(|| next.to_string())
}
