//! Running the real host clients (`qemu-img`, `nbdinfo`, ...) from tests.

use std::process::Command;

/// Runs `program` with `args` and returns its standard output; panics, showing both
/// output streams, if it cannot start or fails. Meant for tests, where a failing
/// client is a failing test.
pub fn run_tool(program: &str, args: &[&str]) -> String {
    let done = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("running {program}: {error}"));
    assert!(
        done.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        done.status,
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    String::from_utf8_lossy(&done.stdout).into_owned()
}
