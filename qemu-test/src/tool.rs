//! Running the real host clients (`qemu-img`, `nbdinfo`, ...) from tests.

use std::path::Path;
use std::process::Command;

/// Runs `program` with `args` and returns its standard output; panics, showing both
/// output streams, if it cannot start or fails. Meant for tests, where a failing
/// client is a failing test.
pub fn run_tool(program: &str, args: &[&str]) -> String {
    let mut command = Command::new(program);
    command.args(args);
    run_command(command)
}

/// Runs a Python `script` in `nbdsh` (see [`nbdsh_command`]) and returns what it
/// printed; panics like [`run_tool`].
pub fn run_nbdsh(uri: &str, script: &str) -> String {
    run_command(nbdsh_command(uri, script))
}

/// The command that runs a Python `script` in `nbdsh` connected to `uri` (the handle
/// is `h`), with the system's python3 first on `PATH`: Debian installs libnbd's
/// module for that one only.
pub fn nbdsh_command(uri: &str, script: &str) -> Command {
    let mut command = nbdsh();
    command.args(["-u", uri, "-c", script]);
    command
}

/// The command that runs a Python `script` in `nbdsh` with an unconnected handle
/// `h`, e.g. for a script that allows a URI to name local files (an `nbds://` URI's
/// `tls-certificates`) before it connects.
pub fn nbdsh_script(script: &str) -> Command {
    let mut command = nbdsh();
    command.args(["-c", script]);
    command
}

/// `nbdsh` with the system's python3 first on `PATH`.
fn nbdsh() -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut command = Command::new("nbdsh");
    command.env("PATH", format!("/usr/bin:{path}"));
    command
}

pub(crate) fn run_command(mut command: Command) -> String {
    let done = command
        .output()
        .unwrap_or_else(|error| panic!("running {command:?}: {error}"));
    assert!(
        done.status.success(),
        "{command:?} failed ({}):\n{}{}",
        done.status,
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    String::from_utf8_lossy(&done.stdout).into_owned()
}

/// Copies the bytes of `source` over the start of `target`, an existing image file or an
/// NBD URI, with `qemu-img convert -n` (raw on both sides).
pub fn qemu_img_write(source: &str, target: &str) {
    run_tool(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", source, target],
    );
}

/// Reads all of `source` (a file or an NBD URI) with `qemu-img convert` into a new raw
/// image at `file`, replacing it, and returns its bytes.
pub fn qemu_img_read(source: &str, file: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(file);
    run_tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            source,
            &file.to_string_lossy(),
        ],
    );
    std::fs::read(file).unwrap_or_else(|error| panic!("reading {}: {error}", file.display()))
}
