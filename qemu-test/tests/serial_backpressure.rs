//! The serial console when the host reads it slowly: a long reply fills the pipe
//! from QEMU's `-serial stdio`, QEMU sends the rest from its main loop, and the
//! appliance must wait for it without taking that loop's turn. A kernel that spun
//! on the line status register starved QEMU's main loop (its monitor stopped
//! answering too), and the console stopped in the middle of the reply.

use std::time::Duration;

use qemu_test::{Appliance, Options, PROMPT, Scratch, monitor_command};

/// More output than a pipe holds (64 KiB on Linux), with room to spare.
const HELD_BYTES: usize = 256 << 10;

#[test]
fn a_long_reply_the_host_stops_reading_finishes_once_it_reads_again() {
    let scratch = Scratch::new().unwrap();
    let monitor = scratch.path().join("monitor.sock");
    let mut appliance = Appliance::boot(Options::bios().monitor(&monitor)).unwrap();
    let help = appliance.console_ok("help").unwrap();
    let last_line = help.lines().last().unwrap().to_string();
    let commands = HELD_BYTES / help.len() + 1;
    for _ in 0..commands {
        appliance.type_partial("help\r").unwrap();
    }
    // While nothing is read, QEMU's main loop must keep running: its monitor answers.
    let answers: Vec<Result<String, String>> =
        appliance.hold_output(Duration::from_secs(8), || {
            (0..3)
                .map(|_| {
                    std::thread::sleep(Duration::from_secs(1));
                    monitor_command(&monitor, "info status").map_err(|error| error.to_string())
                })
                .collect()
        });
    for answer in &answers {
        assert_eq!(
            answer.as_deref(),
            Ok("VM status: running"),
            "QEMU's monitor while the console waited for the host: {answers:?}"
        );
    }
    for n in 0..commands {
        let reply = appliance
            .read_until(PROMPT, Duration::from_secs(60))
            .unwrap_or_else(|error| panic!("reply {n} of {commands}: {error}"));
        assert!(
            reply.contains(&last_line),
            "reply {n} of {commands} lacks the end of `help`: {reply}"
        );
    }
    assert_eq!(appliance.console_ok("help").unwrap(), help);
    appliance.shutdown().unwrap();
}
