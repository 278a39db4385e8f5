//! A COW snapshot merged back into its volume on the booted appliance: an NBD client
//! changes the volume after `snap create`, `snap merge` starts, the power is cut
//! mid-merge, and after the reboot the merge resumes at activation while the client
//! reads the snapshot's content and writes; at the end the volume is linear again and
//! holds the snapshot's content plus the writes made during the merge.

use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{Appliance, Options, Scratch, monitor_command, run_nbdsh, wait_for_greeting};

const MIB: u64 = 1 << 20;

/// Fills the 16 MiB volume: page `p` holds the byte `p % 251 + 1`.
const FILL: &str = r#"
for block in range(256):
    data = b''.join(bytes([(block * 16 + i) % 251 + 1]) * 4096 for i in range(16))
    h.pwrite(data, block * 65536)
h.flush()
print('filled')
"#;

/// The change to roll back: 1000 scattered pages overwritten.
const CHANGE: &str = r#"
for k in range(1000):
    h.pwrite(b'\xee' * 4096, (k * 7 % 4096) * 4096)
h.flush()
print('changed')
"#;

/// During (or right after) the resumed merge: every page reads as before the change; then pages 0-63 are
/// written with 0x77 and read back.
const DURING: &str = r#"
for block in range(256):
    data = h.pread(65536, block * 65536)
    for i in range(16):
        p = block * 16 + i
        assert data[i * 4096:(i + 1) * 4096] == bytes([p % 251 + 1]) * 4096, f'page {p}'
h.pwrite(b'\x77' * 65536 * 4, 0)
h.flush()
assert h.pread(65536 * 4, 0) == b'\x77' * 65536 * 4
print('verified')
"#;

/// After the merge: pages 0-63 hold 0x77, every other page its original content.
const AFTER: &str = r#"
for block in range(256):
    data = h.pread(65536, block * 65536)
    for i in range(16):
        p = block * 16 + i
        want = b'\x77' * 4096 if p < 64 else bytes([p % 251 + 1]) * 4096
        assert data[i * 4096:(i + 1) * 4096] == want, f'page {p}'
print('verified')
"#;

fn boot(options: &Options) -> Appliance {
    let appliance = Appliance::boot(options.clone()).unwrap();
    wait_for_greeting(appliance.nbd_port().unwrap(), Duration::from_secs(60)).unwrap();
    appliance
}

#[test]
fn a_merge_cut_by_a_power_loss_resumes_at_boot_while_a_client_works() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::NbdSh]);
    let scratch = Scratch::new().unwrap();
    let volume = scratch.disk("volume.img", 16 * MIB).unwrap();
    let cow = scratch.disk("cow.img", 16 * MIB).unwrap();
    let config = scratch.disk("config.img", 8 * MIB).unwrap();
    let options = Options::bios().disk(&volume).disk(&cow).disk(&config).nbd();
    let monitor = scratch.path().join("monitor.sock");
    let mut appliance = boot(&options.clone().monitor(&monitor));
    appliance.console_ok("config init vdc").unwrap();
    appliance
        .console_ok("create vol --table \"0 32768 linear vda 0\"")
        .unwrap();
    let vol = appliance.nbd_uri("vol").unwrap();
    assert!(run_nbdsh(&vol, FILL).contains("filled"));
    let created = appliance
        .console_ok("snap create before vol --cow vdb")
        .unwrap();
    assert!(
        created.contains("0 32768 snapshot vol-real vdb P 8"),
        "{created}"
    );
    assert!(run_nbdsh(&vol, CHANGE).contains("changed"));
    let status = appliance.console_ok("status before").unwrap();
    assert!(
        status.contains("0 32768 snapshot 8040/32768 40"),
        "{status}"
    );
    // The COW disk slowed to 50 requests a second: the merge's 1000 one-chunk runs
    // then take far longer than the power cut below needs to land mid-merge, however
    // fast the host is.
    let throttled = monitor_command(&monitor, "block_set_io_throttle vd1 0 0 0 50 0 0").unwrap();
    assert_eq!(throttled, "", "QEMU did not slow the COW disk down");
    let merging = appliance
        .console_ok("snap merge before --background")
        .unwrap();
    assert!(
        merging.contains("merging into vol (1000 chunks)"),
        "{merging}"
    );
    let jobs = appliance.console_ok("jobs").unwrap();
    assert!(jobs.contains("merge/vol"), "the merge is under way: {jobs}");
    appliance.kill();

    // The merge resumes when `vol` is activated at boot, on an unthrottled disk: it
    // may be done before the client gets in, so the client's reads and writes come
    // during or after it, and `vol` is `snapshot-merge` or back on its own table.
    let mut appliance = boot(&options);
    let vol = appliance.nbd_uri("vol").unwrap();
    let table = appliance.console_ok("table vol").unwrap();
    assert!(
        table.contains("snapshot-merge vol-real vdb P 8") || table.contains("0 32768 linear vda 0"),
        "{table}"
    );
    assert!(run_nbdsh(&vol, DURING).contains("verified"));
    let started = Instant::now();
    while !appliance
        .console_ok("jobs")
        .unwrap()
        .contains("no background jobs")
    {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the merge ends"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let table = appliance.console_ok("table").unwrap();
    assert_eq!(table.trim(), "vol: 0 32768 linear vda 0");
    assert!(run_nbdsh(&vol, AFTER).contains("verified"));
    appliance.shutdown().unwrap();
}
