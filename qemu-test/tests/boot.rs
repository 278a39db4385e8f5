//! The real kernel under QEMU, without disks: the console contract (line editing,
//! one-line errors, clock, memory figures), crash reporting and power-off.

use std::time::{Duration, Instant};

use qemu_test::{Appliance, Error, Options};

/// Seconds since boot from `uptime`'s `up 12.345 s (0d 00:00:12)`.
fn uptime_seconds(appliance: &mut Appliance) -> f64 {
    let line = appliance.console_ok("uptime").unwrap();
    let seconds = line
        .strip_prefix("up ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("unexpected uptime line {line:?}"));
    seconds.parse().unwrap()
}

/// The one line a failing command prints.
fn error_line(appliance: &mut Appliance, command: &str) -> String {
    let output = appliance.console(command).unwrap();
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 1, "{command:?} printed {output:?}");
    assert!(
        lines[0].starts_with("error: "),
        "{command:?} printed {output:?}"
    );
    lines[0].to_string()
}

#[test]
fn console_commands_line_editing_and_errors() {
    let mut appliance = Appliance::boot(Options::bios()).unwrap();
    let banner = appliance.banner().unwrap().to_string();
    assert!(
        banner.starts_with("thinbox ") && banner.ends_with(" ready"),
        "{banner}"
    );

    let help = appliance.console_ok("help").unwrap();
    for command in ["help", "disks", "mem", "uptime", "disk-test", "shutdown"] {
        assert!(
            help.lines().any(|line| line.starts_with(command)),
            "{command} missing from {help}"
        );
    }
    assert!(!help.contains("debug"));
    assert_eq!(appliance.console_ok("disks").unwrap(), "no disks found");

    let mem = appliance.console_ok("mem").unwrap();
    assert!(
        mem.starts_with("heap: ") && mem.contains("\ndma:  "),
        "{mem}"
    );

    // The clock runs at the right rate (TSC calibrated against the PIT). Each guest
    // reading is taken somewhere between sending `uptime` and its reply, so the
    // guest's interval must lie between the host's inner and outer intervals,
    // however slow a loaded host makes the round trips.
    let before_first = Instant::now();
    let first = uptime_seconds(&mut appliance);
    let after_first = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let before_second = Instant::now();
    let second = uptime_seconds(&mut appliance);
    let after_second = Instant::now();
    let guest = second - first;
    let inner = (before_second - after_first).as_secs_f64();
    let outer = (after_second - before_first).as_secs_f64();
    assert!(
        guest > inner * 0.95 - 0.01 && guest < outer * 1.05 + 0.01,
        "guest clock moved {guest} s while the host's moved between {inner} and {outer} s"
    );

    let failures = [
        (
            "frobnicate",
            "error: unknown command 'frobnicate' (try help)",
        ),
        (
            "disk-test \"vda",
            "error: unterminated \" quote opened at column 11 (close it with \")",
        ),
        (
            "disk-test /dev/vda",
            "error: disk-test: unknown disk or device '/dev/vda' (see disks and ls)",
        ),
        ("mem now", "error: mem takes no arguments (got 'now')"),
        ("shutdown now", "error: usage: shutdown [--force]"),
    ];
    for (command, expected) in failures {
        assert_eq!(error_line(&mut appliance, command), expected);
    }

    // Backspace and delete erase; Ctrl-C drops the line and prompts again.
    appliance.type_partial("frob\x03").unwrap();
    appliance
        .read_until("^C\r\nthinbox> ", Duration::from_secs(30))
        .unwrap();
    appliance.type_partial("uptimx\x08e\x7fe\r").unwrap();
    let echoed = appliance
        .read_until("\r\nthinbox> ", Duration::from_secs(30))
        .unwrap();
    assert!(echoed.contains("\r\nup "), "{echoed:?}");

    assert_eq!(appliance.shutdown().unwrap(), "powering off");
}

/// Crashes the appliance with `debug <how>` and returns the `KERNEL PANIC` line.
fn crash(how: &str) -> String {
    let mut appliance = Appliance::boot(Options::bios()).unwrap();
    let asked = Instant::now();
    let error = appliance.console(&format!("debug {how}")).unwrap_err();
    let Error::Panic {
        message, status, ..
    } = &error
    else {
        panic!("debug {how}: not a panic: {error:?}");
    };
    assert_eq!(*status, Some(qemu_test::EXIT_PANIC), "{error:?}");
    assert!(asked.elapsed() < Duration::from_secs(60));
    message.clone()
}

#[test]
fn every_kind_of_crash_is_reported_and_stops_the_machine() {
    let cases = [
        (
            "panic",
            "KERNEL PANIC: deliberate panic requested on the console at ",
            "",
        ),
        (
            "page-fault",
            "KERNEL PANIC: page fault at 0x",
            "(error code 0x0) accessing 0x8, rsp 0x",
        ),
        (
            "stack-overflow",
            "KERNEL PANIC: double fault (kernel stack overflow?) at 0x",
            ", rsp 0x",
        ),
    ];
    for (how, starts, contains) in cases {
        let message = crash(how);
        assert!(
            message.starts_with(starts) && message.contains(contains),
            "debug {how}: {message}"
        );
    }
}
