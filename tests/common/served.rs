//! What the offline TLS tests share: `thinbox offline --nbd` fed console lines on
//! standard input (so PEM can be pasted), its disks, and pasted PEM.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use qemu_test::Scratch;

/// A running `offline --nbd 127.0.0.1:0` that ran the lines it was fed; killed when
/// dropped.
pub struct Served {
    child: Child,
    /// Where it serves, `127.0.0.1:PORT`.
    pub address: String,
    /// What it printed up to "still serving NBD".
    pub transcript: String,
    /// The lines it prints after that (events), as they come.
    later: Receiver<String>,
}

impl Served {
    /// The `error:` lines of the transcript.
    pub fn errors(&self) -> Vec<&str> {
        self.transcript
            .lines()
            .filter(|line| line.starts_with("error:"))
            .collect()
    }

    pub fn start(disks: &[PathBuf], lines: &[String]) -> Served {
        let mut command = Command::new(env!("CARGO_BIN_EXE_thinbox"));
        command.args(["offline", "--nbd", "127.0.0.1:0"]);
        for disk in disks {
            command.arg("--disk").arg(disk);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        for line in lines {
            writeln!(stdin, "{line}").unwrap();
        }
        drop(stdin);
        let mut output = BufReader::new(child.stdout.take().unwrap());
        let mut transcript = String::new();
        while !transcript.contains("still serving NBD") {
            assert!(
                output.read_line(&mut transcript).unwrap() > 0,
                "no 'still serving NBD' in {transcript}"
            );
        }
        let (sender, later) = channel();
        std::thread::spawn(move || {
            for line in output.lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let address = transcript
            .lines()
            .find_map(|line| line.strip_prefix("serving NBD on "))
            .unwrap()
            .to_string();
        Served {
            child,
            address,
            transcript,
            later,
        }
    }

    /// The next line printed after the transcript that holds `text`, from there on
    /// (an event line comes after the codes that clear the prompt's line), waiting up
    /// to `timeout` for it; lines before it are dropped.
    pub fn printed_later(&self, text: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.later.recv_timeout(left).ok()?;
            if let Some(at) = line.find(text) {
                return Some(line[at..].to_string());
            }
        }
    }

    pub fn port(&self) -> &str {
        self.address.rsplit(':').next().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two sparse 32 MiB disks (configuration, data) in `scratch`.
pub fn disks(scratch: &Scratch) -> Vec<PathBuf> {
    (0..2)
        .map(|index| {
            let path = scratch.path().join(format!("disk{index}.img"));
            fs::File::create(&path).unwrap().set_len(32 << 20).unwrap();
            path
        })
        .collect()
}

/// `command`, the lines of `pem`, `end`: PEM pasted after a console command.
pub fn paste(command: &str, pem: &str) -> Vec<String> {
    let mut lines = vec![String::from(command)];
    lines.extend(pem.lines().map(String::from));
    lines.push(String::from("end"));
    lines
}
