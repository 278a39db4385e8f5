//! A data disk that fails every read (QEMU's `blkdebug` under it, EIO on each read):
//! a client reading a mapped block gets EIO for that request only. Writes, flushes
//! and reads of unmapped blocks go on, the appliance keeps answering its console,
//! a new client is served, and `disks` counts each failed read as it happens.

use std::fs;
use std::time::Duration;

use host_tools::Tool;
use qemu_test::{Appliance, Options, Scratch, disk_errors, run_nbdsh, run_tool, wait_for_greeting};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// Every read of the disk fails with EIO (5): the rule is armed by the first read
/// (the appliance's search for a configuration area at boot) and matches reads only.
const RULES: &str = r#"[inject-error]
event = "read_aio"
iotype = "read"
errno = "5"
"#;

/// Writes and flushes a block, then tries a read of it, a read of an unmapped
/// block and another write; prints what each did (libnbd names the errno).
const CLIENT: &str = r#"
def attempt(name, action):
    try:
        result = action()
        print(name, 'ok' if result is None or result == b'\0' * len(result) else 'data')
    except nbd.Error as error:
        print(name, 'failed', error.errno)

attempt('write', lambda: h.pwrite(b'\x5a' * 65536, 0))
attempt('flush', lambda: h.flush())
attempt('read-mapped', lambda: h.pread(65536, 0))
attempt('read-unmapped', lambda: h.pread(65536, 1 << 20))
attempt('write-again', lambda: h.pwrite(b'\xa5' * 65536, 2 << 20))
attempt('read-mapped-again', lambda: h.pread(4096, 2 << 20))
"#;

/// What `disks` says when only reads failed.
fn failed_reads(reads: u64) -> String {
    let plural = if reads == 1 { "" } else { "s" };
    format!("errors: {reads} read{plural}, 0 writes, 0 flushes, 0 discards failed; 0 resets")
}

#[test]
fn a_failing_data_read_fails_its_request_and_the_appliance_stays_up() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::NbdSh, Tool::NbdInfo]);
    let scratch = Scratch::new().unwrap();
    let metadata = scratch.disk("metadata.img", 16 * MIB).unwrap();
    let data = scratch.disk("data.img", 64 * MIB).unwrap();
    let rules = scratch.path().join("data.rules");
    fs::write(&rules, RULES).unwrap();
    let options = Options::bios()
        .disk(&metadata)
        .faulty_disk(&data, &rules)
        .nbd();
    let mut appliance = Appliance::boot(options).unwrap();
    if let Err(why) = wait_for_greeting(appliance.nbd_port().unwrap(), Duration::from_secs(60)) {
        panic!("{why}\n{}", appliance.transcript());
    }
    appliance
        .console_ok(&format!(
            "create pool --table \"0 {} thin-pool vda vdb 128 0\"",
            64 * MIB / SECTOR
        ))
        .unwrap();
    appliance
        .console_ok("message pool 0 \"create_thin 0\"")
        .unwrap();
    appliance
        .console_ok(&format!(
            "create vol --table \"0 {} thin pool 0\"",
            4 * MIB / SECTOR
        ))
        .unwrap();
    assert_eq!(disk_errors(&mut appliance, "vda"), None);
    // The search for a configuration area read the disk at boot, and failed.
    let at_boot = disk_errors(&mut appliance, "vdb").expect("an errors line for vdb");
    let reads_at_boot: u64 = at_boot
        .strip_prefix("errors: ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("{at_boot}"));
    assert_eq!(at_boot, failed_reads(reads_at_boot));
    let uri = appliance.nbd_uri("vol").unwrap();
    let printed = run_nbdsh(&uri, CLIENT);
    assert_eq!(
        printed.lines().collect::<Vec<_>>(),
        [
            "write ok",
            "flush ok",
            "read-mapped failed EIO",
            "read-unmapped ok",
            "write-again ok",
            "read-mapped-again failed EIO",
        ],
        "{}",
        appliance.transcript()
    );
    assert_eq!(
        disk_errors(&mut appliance, "vdb"),
        Some(failed_reads(reads_at_boot + 2)),
        "the two reads of mapped blocks failed on the disk"
    );
    assert_eq!(disk_errors(&mut appliance, "vda"), None);
    let status = appliance.console_ok("status pool").unwrap();
    assert!(status.contains(" rw "), "{status}");
    let listed = run_tool("nbdinfo", &["--list", &uri]);
    assert!(listed.contains("export=\"vol\""), "{listed}");
    appliance.shutdown().unwrap();
}
