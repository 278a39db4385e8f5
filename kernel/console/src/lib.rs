//! The appliance's operator console, free of hardware so it is tested on the host:
//! line editor, tokenizer, command grammar and output. Devices are device-mapper's
//! ([`dm`]); the console only asks it for changes and reports.
//!
//! The kernel hands the [`Console`] the device mapper (shared with the NBD server,
//! which reaches the devices through [`dm::NbdBackend`] without the console) and a
//! [`Platform`] (clock, memory figures, power), then feeds it the bytes that arrive on
//! the serial line and calls [`Console::poll`] while it reports work in progress.
//! Everything the console prints goes to a [`core::fmt::Write`]; lines end with
//! `\r\n`.
//!
//! Long operations (`disk-test`) run as [`jobs`](job) that advance a step per poll,
//! so the appliance keeps serving other work between steps; Ctrl-C cancels them.
//!
//! Commands are listed by `help`. One more, `debug panic|page-fault|stack-overflow`,
//! is left out of `help` on purpose: it crashes the kernel deliberately (a Rust
//! panic, a CPU exception, a double fault on the exception stack) so tests can check
//! that each kind of crash is reported on the console and stops the machine.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

mod acl_commands;
mod background;
mod clientcert_commands;
mod commands;
mod cow_commands;
mod delta_commands;
mod disk_reset;
mod disk_test;
mod dm_commands;
mod editor;
mod import_commands;
mod job;
mod merge_commands;
mod net;
mod pool_commands;
mod snap_create;
mod tls_commands;
mod tokenize;
mod units;

pub use editor::{Edit, LineEditor, MAX_LINE, PROMPT};
pub use net::{
    AddressMode, CpuCycles, Ipv4Config, LinkSettings, NbdPressure, NetCounters, NetStatus, Network,
    NicCounters,
};
pub use tokenize::{TokenizeError, tokenize};

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt::Write;
use dm::DeviceMapper;

use job::{Job, Progress};

/// Writes one console line (format arguments plus `\r\n`). Output goes to a serial
/// line or a test string; neither can fail in a way worth reporting, so write
/// errors are dropped here.
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {{
        let _ = write!($out, $($arg)*);
        let _ = $out.write_str("\r\n");
    }};
}
pub(crate) use outln;

/// `a`…`z`, then `aa`, `ab`, …: the letters Linux gives its `vd` disks, in order.
pub fn disk_letters(index: usize) -> String {
    let mut letters = Vec::new();
    let mut n = index;
    loop {
        letters.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    String::from_utf8(letters).expect("ASCII letters")
}

/// Heap and DMA-memory figures for `mem`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub heap_used: usize,
    pub heap_free: usize,
    pub dma_frames_used: usize,
    pub dma_frames_free: usize,
    /// Bytes per DMA frame.
    pub frame_size: usize,
}

/// What the console needs from the machine it runs on.
pub trait Platform {
    /// Monotonic nanoseconds since boot.
    fn now_ns(&self) -> u64;
    /// Current memory figures; `None` where memory is not the appliance's own to
    /// account (offline mode runs in an ordinary host process).
    fn memory(&self) -> Option<MemoryStats>;
    /// Turns the machine off; called after every disk was flushed and `powering
    /// off` printed. On the appliance it does not return.
    fn power_off(&mut self);
    /// Crashes the machine on purpose (`debug ...`), the way a kernel bug would.
    fn crash(&mut self, how: Crash);
    /// The network interface, if the machine has one (for `net`).
    fn network(&mut self) -> Option<&mut dyn Network> {
        None
    }
    /// Opens TCP connections to NBD servers for `thin import` and `thin sync`, as
    /// many as a copy wants (the server's address is in the `nbd://` URI).
    fn connector(&mut self) -> alloc::boxed::Box<dm::Connector<'static>> {
        alloc::boxed::Box::new(
            |_: &nbd::client::NbdUri| -> Result<alloc::boxed::Box<dyn nbd::client::Stream>, String> {
                Err(String::from("this machine cannot open network connections"))
            },
        )
    }
}

/// Ways to crash the appliance on purpose, one per kind of fatal error the kernel
/// must report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// A Rust panic.
    Panic,
    /// A CPU exception: a read from an unmapped address.
    PageFault,
    /// Unbounded recursion until the stack's guard page stops it (a double fault).
    StackOverflow,
}

/// A failed command: exactly one line saying what was wrong and how to fix it,
/// printed as `error: <text>`.
#[derive(Debug, PartialEq, Eq)]
pub struct CommandError(pub String);

/// Texts and device-mapper errors are both one line.
impl<T: Into<String>> From<T> for CommandError {
    fn from(text: T) -> Self {
        CommandError(text.into())
    }
}

/// Prints a command failure line.
fn report_error(error: &CommandError, out: &mut dyn Write) {
    debug_assert!(!error.0.contains(['\r', '\n']), "error text is one line");
    outln!(out, "error: {}", error.0);
}

/// The serial console: line editor, command interpreter, running job, and the
/// device mapper it manages.
pub struct Console<P: Platform> {
    platform: P,
    dm: Rc<RefCell<DeviceMapper>>,
    editor: LineEditor,
    job: Option<Box<dyn Job>>,
    /// Bytes typed while a job ran; replayed into the editor when it finishes.
    typeahead: VecDeque<u8>,
    /// Commands that failed so far (scripted callers check it).
    failures: u64,
    /// PEM text being pasted for `nbd tls import` or `nbd tls clients`, until a line
    /// `end`.
    pasting: Option<tls_commands::Paste>,
}

impl<P: Platform> Console<P> {
    /// A console managing `dm`; [`Console::start`] brings up the saved configuration.
    pub fn new(platform: P, dm: Rc<RefCell<DeviceMapper>>) -> Self {
        Console {
            platform,
            dm,
            editor: LineEditor::new(),
            job: None,
            typeahead: VecDeque::new(),
            failures: 0,
            pasting: None,
        }
    }

    pub fn platform(&self) -> &P {
        &self.platform
    }

    pub fn platform_mut(&mut self) -> &mut P {
        &mut self.platform
    }

    /// Commands that have failed since the console was made.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Finds the saved configuration and brings its devices up, saying what happened,
    /// then prints the first prompt.
    pub fn start(&mut self, out: &mut dyn Write) {
        let notes = self.dm.borrow_mut().restore();
        for note in notes {
            outln!(out, "{note}");
        }
        let _ = self.editor.prompt(out);
    }

    /// Handles one byte from the serial line.
    pub fn input(&mut self, byte: u8, out: &mut dyn Write) {
        if let Some(job) = &mut self.job {
            if byte == 0x03 {
                job.cancel();
            } else if self.typeahead.len() < MAX_LINE {
                self.typeahead.push_back(byte);
            }
            return;
        }
        // Pasted PEM (a private key among it) is not echoed, and gets no prompts.
        let mut unseen = String::new();
        let echo: &mut dyn Write = if self.pasting() { &mut unseen } else { out };
        if let Ok(Edit::Line(line)) = self.editor.feed(byte, echo) {
            self.run_line(&line, out);
            if self.job.is_none() && !self.pasting() {
                let _ = self.editor.prompt(out);
            }
        }
    }

    /// True while `nbd tls import` or `nbd tls clients` gathers pasted lines: callers
    /// must not echo them.
    pub fn pasting(&self) -> bool {
        self.pasting.is_some()
    }

    /// Advances the running job, if any. Returns true while work is in progress
    /// (call again soon, without sleeping); false when the console is idle.
    pub fn poll(&mut self, out: &mut dyn Write) -> bool {
        let platform = &self.platform;
        let mut events = self.dm.borrow_mut().tick(&|| platform.now_ns());
        events.extend(cow_commands::finish_merges(&mut self.dm.borrow_mut()));
        for event in events {
            self.event(&event, out);
        }
        let Some(job) = &mut self.job else {
            return false;
        };
        let platform = &self.platform;
        let mut context = job::Context {
            clock: &|| platform.now_ns(),
        };
        match job.step(&mut context, out) {
            Progress::Running => true,
            Progress::Finished(result) => {
                self.job = None;
                if let Err(error) = result {
                    self.failures += 1;
                    report_error(&error, out);
                }
                let _ = self.editor.prompt(out);
                while self.job.is_none() {
                    let Some(byte) = self.typeahead.pop_front() else {
                        break;
                    };
                    self.input(byte, out);
                }
                true
            }
        }
    }

    /// True while a job runs (input is queued, not echoed).
    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    /// Prints an asynchronous event line; when the prompt is on screen it is redrawn
    /// with the partially typed line.
    pub fn event(&mut self, text: &str, out: &mut dyn Write) {
        if self.job.is_some() {
            outln!(out, "event: {text}");
        } else {
            let _ = self.editor.show_event(text, out);
        }
    }

    /// Runs one command line (without prompt handling).
    pub fn run_line(&mut self, line: &str, out: &mut dyn Write) {
        let result = match tokenize(line) {
            _ if self.pasting.is_some() => self.paste_line(line, out),
            Ok(words) => self.run_words(&words, out),
            Err(error) => Err(CommandError(alloc::format!("{error}"))),
        };
        if let Err(error) = result {
            self.failures += 1;
            report_error(&error, out);
        }
    }
}

#[cfg(test)]
mod acl_tests;
#[cfg(test)]
mod clientcert_tests;
#[cfg(test)]
mod cow_tests;
#[cfg(test)]
mod delete_tests;
#[cfg(test)]
mod delta_tests;
#[cfg(test)]
mod disk_reset_tests;
#[cfg(test)]
mod dm_tests;
#[cfg(test)]
mod format_tests;
#[cfg(test)]
mod merge_tests;
#[cfg(test)]
mod pool_tests;
#[cfg(test)]
mod reload_tests;
#[cfg(test)]
mod segment_tests;
#[cfg(test)]
mod tests;
