//! A running appliance and its serial console.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::options::{ConsoleMode, Options, PORT_ATTEMPTS, Timeouts};
use crate::protocol::{self, Reply};
use crate::{EXIT_SHUTDOWN, Error};

/// How many transcript lines an error carries.
const TAIL_LINES: usize = 40;
/// How long to collect the rest of a panic report, or QEMU's exit status after its
/// output ended.
const AFTERMATH: Duration = Duration::from_secs(10);

/// A booted appliance: a QEMU process whose serial console this value drives.
///
/// Dropping it kills QEMU, and QEMU dies with the process that started it, so no test
/// leaves a machine behind.
pub struct Appliance {
    child: Child,
    stdin: ChildStdin,
    /// Serial output in the order it arrived; closed when QEMU's stdout ends.
    output: Receiver<Vec<u8>>,
    /// Taken by [`Appliance::hold_output`]; the thread reading QEMU's stdout waits
    /// for it before each read.
    output_gate: Arc<Mutex<()>>,
    output_ended: bool,
    stderr: Option<JoinHandle<String>>,
    stderr_text: String,
    /// Everything the serial port printed.
    transcript: Vec<u8>,
    /// Printed but not yet consumed by a reply, boot prompt or `read_until`.
    pending: Vec<u8>,
    events: Vec<String>,
    boot_log: Vec<String>,
    nbd_port: Option<u16>,
    timeouts: Timeouts,
    status: Option<ExitStatus>,
}

impl Appliance {
    /// Checks `options`, makes sure QEMU is installed, boots, and waits for the first
    /// prompt.
    pub fn boot(options: Options) -> Result<Appliance, Error> {
        options.validate()?;
        crate::require_host_tools(options.firmware)?;
        let mut attempt = 1;
        loop {
            let (command, nbd_port) = options.qemu_command(ConsoleMode::Pipes)?;
            match Appliance::start(command, nbd_port, options.timeouts) {
                Err(Error::Exited { stderr, .. })
                    if attempt < PORT_ATTEMPTS
                        && options.nbd.is_some_and(|nbd| nbd.lost_its_port(&stderr)) =>
                {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Starts `command`, a program that speaks the serial console contract on its
    /// stdin/stdout (QEMU, or a stand-in in tests), and waits for its first prompt.
    /// `nbd_port` is what [`Appliance::nbd_port`] will report.
    pub fn start(
        mut command: Command,
        nbd_port: Option<u16>,
        timeouts: Timeouts,
    ) -> Result<Appliance, Error> {
        let program = command.get_program().to_string_lossy().into_owned();
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = crate::spawn_tied(command).map_err(|source| Error::Io {
            context: format!("starting {program}"),
            source,
        })?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let (sender, output) = mpsc::channel();
        let output_gate = Arc::new(Mutex::new(()));
        let gate = Arc::clone(&output_gate);
        thread::spawn(move || forward_output(stdout, sender, &gate));
        let stderr = thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        });
        let mut appliance = Appliance {
            child,
            stdin,
            output,
            output_gate,
            output_ended: false,
            stderr: Some(stderr),
            stderr_text: String::new(),
            transcript: Vec::new(),
            pending: Vec::new(),
            events: Vec::new(),
            boot_log: Vec::new(),
            nbd_port,
            timeouts,
            status: None,
        };
        appliance.boot_log = appliance.wait_for(
            "the first prompt after boot",
            timeouts.boot,
            protocol::find_prompt,
        )?;
        Ok(appliance)
    }

    /// Runs a console command and returns its output lines (without the echoed command
    /// and the prompt), waiting at most the default command timeout.
    pub fn console(&mut self, command: &str) -> Result<String, Error> {
        self.console_with_timeout(command, self.timeouts.command)
    }

    /// Like [`Appliance::console`], with its own deadline.
    pub fn console_with_timeout(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> Result<String, Error> {
        if command.contains(['\r', '\n']) {
            return Err(Error::Config(format!(
                "console command {command:?} spans several lines; send one line at a time"
            )));
        }
        self.send(&format!("{command}\r"))?;
        let Reply { output, events } =
            self.wait_for(&format!("the reply to `{command}`"), timeout, |pending| {
                protocol::find_reply(pending, command)
            })?;
        self.events.extend(events);
        Ok(output.join("\n"))
    }

    /// Runs a console command that must succeed: an `error: ` line in its output is an
    /// [`Error::Command`].
    pub fn console_ok(&mut self, command: &str) -> Result<String, Error> {
        let output = self.console(command)?;
        succeeded(command, output)
    }

    /// Runs a console command that reads pasted text (`nbd tls import`, `nbd tls
    /// clients`): `command`, the lines of `text`, then a line `end`. Pasted lines are
    /// not echoed; returns what the command printed up to the prompt, as
    /// [`Appliance::console_ok`] does.
    pub fn console_paste(&mut self, command: &str, text: &str) -> Result<String, Error> {
        if command.contains(['\r', '\n']) {
            return Err(Error::Config(format!(
                "console command {command:?} spans several lines"
            )));
        }
        let mut typed = format!("{command}\r");
        for line in text.lines() {
            typed.push_str(line);
            typed.push('\r');
        }
        typed.push_str("end\r");
        self.send(&typed)?;
        let Reply { output, events } = self.wait_for(
            &format!("the reply to `{command}` and its pasted text"),
            self.timeouts.command,
            |pending| protocol::find_reply(pending, command),
        )?;
        self.events.extend(events);
        succeeded(command, output.join("\n"))
    }

    /// Types `text` without pressing Enter (control characters such as Ctrl-C `\x03`
    /// included); read the echo with [`Appliance::read_until`].
    pub fn type_partial(&mut self, text: &str) -> Result<(), Error> {
        self.send(text)
    }

    /// Waits for `pattern` in the output not yet consumed and returns that output up to
    /// and including it (raw, with `\r\n` line endings), for asynchronous output such as
    /// events.
    pub fn read_until(&mut self, pattern: &str, timeout: Duration) -> Result<String, Error> {
        let pattern = pattern.as_bytes();
        self.wait_for(
            &format!("{:?}", String::from_utf8_lossy(pattern)),
            timeout,
            |pending| {
                let start = pending
                    .windows(pattern.len())
                    .position(|window| window == pattern)?;
                let end = start + pattern.len();
                Some((end, String::from_utf8_lossy(&pending[..end]).into_owned()))
            },
        )
    }

    /// Stops reading QEMU's serial output for `duration`, as a host that is slow to
    /// read does: once the pipe is full the appliance's console waits for it. Runs
    /// `meanwhile` during the hold and returns its result.
    pub fn hold_output<T>(&mut self, duration: Duration, meanwhile: impl FnOnce() -> T) -> T {
        let held = self
            .output_gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        let result = meanwhile();
        thread::sleep(duration.saturating_sub(started.elapsed()));
        drop(held);
        result
    }

    /// `event: ` lines seen during console commands since the last call.
    pub fn take_events(&mut self) -> Vec<String> {
        std::mem::take(&mut self.events)
    }

    /// Shuts the appliance down with the `shutdown` command and waits for QEMU to exit
    /// with the clean-power-off status; returns what the command printed.
    pub fn shutdown(self) -> Result<String, Error> {
        let timeout = self.timeouts.shutdown;
        self.shutdown_with_timeout(timeout)
    }

    /// Like [`Appliance::shutdown`], with its own deadline.
    pub fn shutdown_with_timeout(mut self, timeout: Duration) -> Result<String, Error> {
        self.send("shutdown\r")?;
        let nothing = |_: &[u8]| None::<(usize, Infallible)>;
        let Err(error) = self.wait_for("shutdown to power off", timeout, nothing);
        match error {
            Error::Exited {
                status: Some(EXIT_SHUTDOWN),
                ..
            } => {
                let printed = self.pending.split(|&byte| byte == b'\n');
                let lines: Vec<String> = printed
                    .map(protocol::clean_line)
                    .skip_while(|line| !line.ends_with("shutdown"))
                    .skip(1)
                    .filter(|line| !line.is_empty())
                    .collect();
                Ok(lines.join("\n"))
            }
            error => Err(error),
        }
    }

    /// Cuts the power: kills QEMU at once (anything not yet written to the disk
    /// images is lost) and returns the transcript.
    pub fn kill(mut self) -> String {
        self.stop();
        self.transcript()
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The host port forwarded to the appliance's NBD server, if any.
    pub fn nbd_port(&self) -> Option<u16> {
        self.nbd_port
    }

    /// `nbd://127.0.0.1:PORT/EXPORT` for clients such as `qemu-img` and `nbdinfo`.
    pub fn nbd_uri(&self, export: &str) -> Option<String> {
        self.nbd_port
            .map(|port| format!("nbd://127.0.0.1:{port}/{export}"))
    }

    /// Everything the serial console printed so far, raw (`\r\n` line endings).
    pub fn transcript(&self) -> String {
        String::from_utf8_lossy(&self.transcript).into_owned()
    }

    /// The lines printed before the first prompt (firmware output and the banner).
    pub fn boot_log(&self) -> &[String] {
        &self.boot_log
    }

    /// The kernel's `thinbox <version> ready` line, if it printed one.
    pub fn banner(&self) -> Option<&str> {
        self.boot_log
            .iter()
            .rev()
            .find(|line| line.starts_with("thinbox ") && line.ends_with(" ready"))
            .map(String::as_str)
    }

    fn send(&mut self, text: &str) -> Result<(), Error> {
        let written = self
            .stdin
            .write_all(text.as_bytes())
            .and_then(|()| self.stdin.flush());
        match written {
            Ok(()) => Ok(()),
            Err(_) => Err(self.exited(&format!("the console to accept {text:?}"))),
        }
    }

    /// Reads serial output until `parse` finds what it is looking for at the start of
    /// the unconsumed output, which it then consumes. A panic, QEMU's exit or the
    /// deadline end the wait with an error.
    fn wait_for<T>(
        &mut self,
        waiting_for: &str,
        timeout: Duration,
        mut parse: impl FnMut(&[u8]) -> Option<(usize, T)>,
    ) -> Result<T, Error> {
        let deadline = Instant::now() + timeout;
        // Where the lines not yet checked for a panic start.
        let mut unchecked = 0;
        loop {
            if protocol::panic_line(&self.pending[unchecked..]).is_some() {
                return Err(self.panicked());
            }
            unchecked = self
                .pending
                .iter()
                .rposition(|&byte| byte == b'\n')
                .map_or(0, |at| at + 1);
            if let Some((consumed, found)) = parse(&self.pending) {
                self.pending.drain(..consumed);
                return Ok(found);
            }
            if self.output_ended {
                return Err(self.exited(waiting_for));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    waiting_for: waiting_for.to_string(),
                    after: timeout,
                    tail: self.tail(),
                });
            }
            self.receive(deadline - now);
        }
    }

    /// Takes in the output that arrives within `timeout`, and everything else already
    /// read. QEMU writes the serial output a byte at a time, so the reader thread
    /// often forwards tiny chunks; parsing after each of them made a long reply cost
    /// time in the square of its length (a 140 KiB dump on a loaded host took longer
    /// than the command timeout), so chunks are taken in together.
    fn receive(&mut self, timeout: Duration) {
        let mut next = self.output.recv_timeout(timeout);
        loop {
            match next {
                Ok(chunk) => {
                    self.transcript.extend_from_slice(&chunk);
                    self.pending.extend_from_slice(&chunk);
                }
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => {
                    self.output_ended = true;
                    return;
                }
            }
            next = match self.output.try_recv() {
                Ok(chunk) => Ok(chunk),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
            };
        }
    }

    /// The error for a kernel panic, once the rest of the report has arrived.
    fn panicked(&mut self) -> Error {
        self.drain_output();
        let status = self.wait_exit(AFTERMATH).and_then(|status| status.code());
        let message = protocol::panic_line(&self.pending).unwrap_or_default();
        Error::Panic {
            message,
            status,
            tail: self.tail(),
        }
    }

    /// The error for QEMU having stopped (or about to) while we waited for something.
    fn exited(&mut self, waiting_for: &str) -> Error {
        let status = self.wait_exit(AFTERMATH);
        if status.is_none() {
            self.stop();
        }
        Error::Exited {
            waiting_for: waiting_for.to_string(),
            status: status.and_then(|status| status.code()),
            stderr: self.stderr(),
            tail: self.tail(),
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
            if self.status.is_none() {
                if Instant::now() >= deadline {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        self.status
    }

    /// What QEMU wrote to stderr; complete once it has exited.
    fn stderr(&mut self) -> String {
        if let Some(reader) = self.stderr.take() {
            self.stderr_text = reader.join().unwrap_or_default();
        }
        self.stderr_text.clone()
    }

    fn stop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.drain_output();
    }

    /// Takes in the output until it ends (QEMU exited) or for at most [`AFTERMATH`].
    fn drain_output(&mut self) {
        let deadline = Instant::now() + AFTERMATH;
        while !self.output_ended && Instant::now() < deadline {
            self.receive(deadline.saturating_duration_since(Instant::now()));
        }
    }

    fn tail(&self) -> String {
        protocol::tail(&self.transcript, TAIL_LINES)
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn forward_output(mut stdout: impl Read, sender: mpsc::Sender<Vec<u8>>, gate: &Mutex<()>) {
    let mut buffer = [0u8; 4096];
    loop {
        drop(gate.lock().unwrap_or_else(PoisonError::into_inner));
        match stdout.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(count) => {
                if sender.send(buffer[..count].to_vec()).is_err() {
                    return;
                }
            }
        }
    }
}

/// `output` of `command` if it has no `error: ` line, else that line as an
/// [`Error::Command`].
fn succeeded(command: &str, output: String) -> Result<String, Error> {
    match output.lines().find(|line| line.starts_with("error: ")) {
        Some(line) => Err(Error::Command {
            command: command.to_string(),
            line: line.to_string(),
        }),
        None => Ok(output),
    }
}
