//! A metadata disk that starts failing writes while the appliance runs: QEMU's
//! `blkdebug` driver sits under the metadata disk with a rule that fails every write
//! with EIO once a monitor command (a write-zeroes of an unused sector through
//! `qemu-io`, which the appliance never sends) has switched it on. The pool's next
//! commit fails: the console prints the event, `status` shows the pool read-only
//! with `needs_check`, NBD flushes and writes to new blocks fail while reads go on,
//! and the appliance keeps answering. After a reboot on the plain disk the metadata
//! passes the real `thin_check`, the pool still says `needs_check`, and the data
//! flushed before the fault reads back.

use std::fs;
use std::process::Command;
use std::time::Duration;

use host_tools::Tool;
use qemu_test::{Appliance, Options, Scratch, monitor_command, run_nbdsh, wait_for_greeting};

const MIB: u64 = 1 << 20;
const METADATA_BYTES: u64 = 16 * MIB;

/// blkdebug starts in state 1; the first write-zeroes request moves it to state 2,
/// where the next write fails with EIO (5), once: the pool can still record
/// `needs_check`, so it turns read-only rather than failing everything (a disk that
/// fails every write leaves it nothing but fail mode, as in dm).
const RULES: &str = r#"[set-state]
event = "pwritev_zero"
state = "1"
new_state = "2"

[inject-error]
event = "write_aio"
state = "2"
iotype = "write"
errno = "5"
once = "on"
"#;

/// The first MiB of the volume, filled with 0x5a and flushed before the fault.
const BEFORE: &str = r#"
h.pwrite(b'\x5a' * (1 << 20), 0)
h.flush()
print('flushed')
"#;

/// Writes to a new block and flushes (the commit that fails), then tries another
/// new block, then reads the flushed MiB; prints what each did (libnbd names the
/// errno).
const DURING: &str = r#"
def attempt(name, action):
    try:
        action()
        print(name, 'ok')
    except nbd.Error as error:
        print(name, 'failed', error.errno)

attempt('write', lambda: h.pwrite(b'\xa5' * 65536, 4 << 20))
attempt('flush', lambda: h.flush())
attempt('fua-write', lambda: h.pwrite(b'\xa6' * 65536, 8 << 20, nbd.CMD_FLAG_FUA))
attempt('flush', lambda: h.flush())
print('read', 'same' if h.pread(1 << 20, 0) == b'\x5a' * (1 << 20) else 'different')
"#;

/// Reads the flushed MiB after the reboot.
const AFTER: &str = r#"
print('read', 'same' if h.pread(1 << 20, 0) == b'\x5a' * (1 << 20) else 'different')
"#;

fn boot(options: Options) -> Appliance {
    let appliance = Appliance::boot(options).unwrap();
    wait_for_greeting(appliance.nbd_port().unwrap(), Duration::from_secs(60)).unwrap();
    appliance
}

#[test]
fn a_metadata_disk_failing_at_runtime_makes_the_pool_read_only_and_the_next_boot_clean() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::ThinCheck, Tool::NbdSh]);
    let scratch = Scratch::new().unwrap();
    let metadata = scratch.disk("metadata.img", METADATA_BYTES).unwrap();
    let data = scratch.disk("data.img", 64 * MIB).unwrap();
    let config = scratch.disk("config.img", 8 * MIB).unwrap();
    let rules = scratch.path().join("metadata.rules");
    fs::write(&rules, RULES).unwrap();
    let monitor = scratch.path().join("monitor.sock");
    let faulty = Options::bios()
        .faulty_disk(&metadata, &rules)
        .disk(&data)
        .disk(&config)
        .nbd()
        .monitor(&monitor);
    let mut appliance = boot(faulty);
    appliance.console_ok("config init vdc").unwrap();
    appliance.console_ok("pool create pool vda vdb").unwrap();
    appliance
        .console_ok("thin create vol pool --size 16M")
        .unwrap();
    let vol = appliance.nbd_uri("vol").unwrap();
    assert_eq!(run_nbdsh(&vol, BEFORE).trim(), "flushed");
    let status = appliance.console_ok("status pool").unwrap();
    assert!(
        status.contains(" rw ") && status.contains(" - "),
        "{status}"
    );

    // Quiet (`-q`): qemu-io prints on QEMU's standard output, the serial console.
    let zeroed = monitor_command(
        &monitor,
        &format!("qemu-io vd0 \"write -q -z {} 512\"", METADATA_BYTES - 512),
    )
    .unwrap();
    assert_eq!(zeroed, "", "the monitor's qemu-io failed");
    let during = run_nbdsh(&vol, DURING);
    let event = appliance
        .read_until("switching pool to read-only mode", Duration::from_secs(30))
        .unwrap();
    let event = event
        .split_once("event: pool: ")
        .map(|(_, text)| format!("event: pool: {text}"))
        .unwrap_or_else(|| panic!("no event line: {event:?}"));
    // The plain write may land before the failed commit (its block is then given
    // back); everything that needs a commit after it fails with EIO.
    let lines: Vec<&str> = during.lines().collect();
    assert!(
        matches!(lines[0], "write ok" | "write failed EIO"),
        "{during}"
    );
    assert_eq!(
        lines[1..],
        [
            "flush failed EIO",
            "fua-write failed EIO",
            "flush failed EIO",
            "read same"
        ],
        "{during}"
    );
    let status = appliance.console_ok("status pool").unwrap();
    println!("{event}\nthinbox> status pool\n{status}");
    assert!(
        status.contains(" ro ") && status.contains(" needs_check "),
        "{status}"
    );
    // Still serving: the console answers and a new client reads.
    assert_eq!(run_nbdsh(&vol, AFTER).trim(), "read same");
    appliance.console_ok("ls").unwrap();
    appliance.shutdown().unwrap();

    let checked = Command::new("thin_check").arg(&metadata).output().unwrap();
    assert!(
        checked.status.success(),
        "thin_check: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let mut appliance = boot(
        Options::bios()
            .disk(&metadata)
            .disk(&data)
            .disk(&config)
            .nbd(),
    );
    let status = appliance.console_ok("status pool").unwrap();
    println!("after the reboot:\nthinbox> status pool\n{status}");
    assert!(status.contains(" needs_check "), "{status}");
    let vol = appliance.nbd_uri("vol").unwrap();
    assert_eq!(run_nbdsh(&vol, AFTER).trim(), "read same");
    appliance.shutdown().unwrap();
}
