//! Why booting or driving the appliance failed.
//!
//! `Display` is the short form for a user (one line, plus QEMU's own complaint when it
//! stopped); `Debug`, which a failing test prints, adds QEMU's stderr and the end of
//! the serial transcript.

use std::fmt;
use std::io;
use std::time::Duration;

/// A failure of the appliance or of the harness around it.
pub enum Error {
    /// The options cannot work (missing disk, port in use, ...); nothing was started.
    Config(String),
    /// Host programs are missing and could not be installed here.
    MissingTools(host_tools::Missing),
    /// Starting QEMU or talking to it failed on the host side.
    Io { context: String, source: io::Error },
    /// The appliance did not answer in time.
    Timeout {
        waiting_for: String,
        after: Duration,
        tail: String,
    },
    /// The kernel printed a `KERNEL PANIC: ` line.
    Panic {
        message: String,
        status: Option<i32>,
        tail: String,
    },
    /// QEMU exited while the appliance was expected to keep running.
    Exited {
        waiting_for: String,
        /// QEMU's exit status; `None` when a signal killed it.
        status: Option<i32>,
        stderr: String,
        tail: String,
    },
    /// A command answered with an `error: ` line where success was expected.
    Command { command: String, line: String },
}

impl Error {
    /// The last lines the appliance printed before the failure, if it had started.
    pub fn transcript_tail(&self) -> Option<&str> {
        match self {
            Error::Timeout { tail, .. }
            | Error::Panic { tail, .. }
            | Error::Exited { tail, .. } => Some(tail),
            _ => None,
        }
    }

    /// QEMU's exit status, if QEMU exited.
    pub fn exit_status(&self) -> Option<i32> {
        match self {
            Error::Panic { status, .. } | Error::Exited { status, .. } => *status,
            _ => None,
        }
    }
}

/// The line of QEMU's stderr that says what went wrong: its first own complaint, else
/// the last thing it printed.
pub fn qemu_complaint(stderr: &str) -> Option<&str> {
    let lines = || {
        stderr
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
    };
    lines()
        .find(|line| line.starts_with("qemu-system-") && !line.contains("warning:"))
        .or_else(|| lines().next_back())
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(message) => f.write_str(message),
            Error::MissingTools(missing) => write!(f, "{missing}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Timeout {
                waiting_for, after, ..
            } => write!(
                f,
                "no answer from the appliance after {} s while waiting for {waiting_for}",
                after.as_secs_f32()
            ),
            Error::Panic { message, .. } => write!(f, "the appliance panicked: {message}"),
            Error::Exited {
                waiting_for,
                status,
                stderr,
                ..
            } => {
                match status {
                    Some(status) => write!(f, "QEMU exited with status {status}")?,
                    None => f.write_str("QEMU was killed by a signal")?,
                }
                write!(f, " while waiting for {waiting_for}")?;
                match qemu_complaint(stderr) {
                    Some(line) => write!(f, "\n{line}"),
                    None => Ok(()),
                }
            }
            Error::Command { command, line } => write!(f, "`{command}` answered: {line}"),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        if let Error::Exited { stderr, .. } = self
            && !stderr.trim().is_empty()
        {
            write!(f, "\n--- QEMU stderr ---\n{}", stderr.trim_end())?;
        }
        if let Some(tail) = self.transcript_tail() {
            write!(f, "\n--- last serial output ---\n{tail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::MissingTools(missing) => Some(missing),
            _ => None,
        }
    }
}
