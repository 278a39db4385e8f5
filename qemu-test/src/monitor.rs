//! Commands to QEMU's human monitor over the Unix socket [`crate::Options::monitor`]
//! names: what a test does to the machine from outside (a link going down, a disk
//! slowing down) while the appliance runs.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const PROMPT: &str = "(qemu) ";

/// Sends `command` to the monitor listening on `socket`; returns what QEMU answered
/// (empty for a command that succeeded silently, else its message).
pub fn monitor_command(socket: &Path, command: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    read_to_prompt(&mut stream)?;
    writeln!(stream, "{command}")?;
    let reply = read_to_prompt(&mut stream)?;
    // The monitor echoes the command (with terminal codes) on the first line.
    let answer = reply.split_once('\n').map_or("", |(_, rest)| rest);
    Ok(answer.trim().to_string())
}

/// Reads until the monitor's prompt; returns what came before it.
fn read_to_prompt(stream: &mut UnixStream) -> io::Result<String> {
    let mut text = Vec::new();
    let mut byte = [0u8; 1];
    while !text.ends_with(PROMPT.as_bytes()) {
        if stream.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "QEMU's monitor closed",
            ));
        }
        text.push(byte[0]);
    }
    text.truncate(text.len() - PROMPT.len());
    Ok(String::from_utf8_lossy(&text).into_owned())
}
