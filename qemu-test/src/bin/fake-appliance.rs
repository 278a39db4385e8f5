//! A stand-in for the appliance that speaks the serial console contract on
//! stdin/stdout, so the harness's reader, deadlines and failure handling are tested
//! without QEMU.
//!
//! `fake-appliance [console|silent|boot-panic|fail-early]`; in `console` mode it knows
//! `help`, `echo TEXT`, `fail`, `hang`, `panic`, `event MILLISECONDS` (an event at the
//! prompt that much later), `busy-event` (an event while it runs), `lines N` (N lines,
//! written a byte at a time), `exit STATUS` and `shutdown`. Events look like the kernel's: plain lines while a command runs; at the
//! prompt, the prompt line is erased and redrawn after the event.

use std::io::{self, Read, Write};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

const PROMPT: &str = "thinbox> ";
const BANNER: &str = "thinbox 0.0.0-fake ready\r\n";

fn main() {
    let mode = std::env::args()
        .nth(1)
        .unwrap_or_else(|| String::from("console"));
    match mode.as_str() {
        "console" => console(),
        "silent" => {
            say(&format!("firmware\r\n{BANNER}"));
            thread::sleep(Duration::from_secs(3600));
        }
        "boot-panic" => panic_exit("KERNEL PANIC: page fault at 0xdeadbeef"),
        "fail-early" => {
            eprintln!("qemu-system-x86_64: warning: nothing to see");
            eprintln!(
                "qemu-system-x86_64: -netdev user,id=n0,hostfwd=tcp:127.0.0.1:1-:10809: \
                 could not set up host forwarding rule 'tcp:127.0.0.1:1-:10809'"
            );
            std::process::exit(1);
        }
        other => {
            eprintln!("fake-appliance: unknown mode {other}");
            std::process::exit(2);
        }
    }
}

fn say(text: &str) {
    let mut stdout = io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

fn panic_exit(message: &str) -> ! {
    say(&format!(
        "\r\n{message}\r\nrip=0x0000000000201000 rsp=0x0000000000400000\r\n"
    ));
    std::process::exit(35);
}

/// A line editor and a handful of commands, like the kernel's.
fn console() {
    let (keys, typed) = mpsc::channel();
    thread::spawn(move || {
        for byte in io::stdin().lock().bytes() {
            let Ok(byte) = byte else { return };
            if keys.send(byte).is_err() {
                return;
            }
        }
    });
    say(&format!("firmware noise\r\n{BANNER}{PROMPT}"));
    let mut line = String::new();
    let mut event_at: Option<Instant> = None;
    loop {
        let wait = event_at.map_or(Duration::from_secs(3600), |at| {
            at.saturating_duration_since(Instant::now())
        });
        match typed.recv_timeout(wait) {
            Ok(b'\r' | b'\n') => {
                say("\r\n");
                let command = std::mem::take(&mut line);
                if let Some(delay) = run(&command) {
                    event_at = Some(Instant::now() + delay);
                }
                say(PROMPT);
            }
            Ok(0x03) => {
                line.clear();
                say(&format!("^C\r\n{PROMPT}"));
            }
            Ok(0x08 | 0x7f) => {
                if line.pop().is_some() {
                    say("\x08 \x08");
                }
            }
            Ok(byte) => {
                line.push(char::from(byte));
                say(&line[line.len() - 1..]);
            }
            Err(RecvTimeoutError::Timeout) => {
                if event_at.take().is_some() {
                    say(&format!(
                        "\r\x1b[Kevent: pool 0 low water mark\r\n{PROMPT}{line}"
                    ));
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Runs one command; returns the delay of an event it schedules.
fn run(command: &str) -> Option<Duration> {
    let (name, argument) = command.split_once(' ').unwrap_or((command, ""));
    match name {
        "" => {}
        "help" => say("commands:\r\n  help\r\n  echo TEXT\r\n  shutdown\r\n"),
        "echo" => say(&format!("{argument}\r\n")),
        "fail" => say("error: fail failed as asked\r\n"),
        "hang" => thread::sleep(Duration::from_secs(3600)),
        "panic" => panic_exit("KERNEL PANIC: panicked at console.rs:1:1: as asked"),
        "event" => return argument.parse().ok().map(Duration::from_millis),
        "busy-event" => say("working\r\nevent: pool 0 low water mark\r\ndone\r\n"),
        "lines" => {
            // As QEMU passes on serial output: one write per byte.
            for n in 0..argument.parse().unwrap_or(0) {
                for byte in format!("line {n}\r\n").bytes() {
                    say(&char::from(byte).to_string());
                }
            }
        }
        "exit" => std::process::exit(argument.parse().unwrap_or(0)),
        "shutdown" => {
            say("flushing disks\r\npowering off\r\n");
            std::process::exit(33);
        }
        _ => say(&format!("error: unknown command '{name}' (try help)\r\n")),
    }
    None
}
