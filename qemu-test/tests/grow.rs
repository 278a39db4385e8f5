//! Growing a pool on the booted appliance while an NBD client's writes wait for
//! space: the pool runs out of data space on its first disk, `pool extend` adds a
//! second disk, every waiting write completes and reads back, and the metadata
//! passes the real `thin_check` after shutdown.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{Appliance, Options, Scratch, nbdsh_command, wait_for_greeting};

const MIB: u64 = 1 << 20;

/// Writes 12 MiB of 64 KiB blocks, each filled with its number, eight in flight,
/// then flushes and reads every block back; prints `verified` at the end.
const CLIENT: &str = r#"
blocks = 192
pending = {}
for n in range(blocks):
    while h.aio_in_flight() >= 8:
        h.poll(-1)
    buffer = nbd.Buffer.from_bytearray(bytearray([n % 251 + 1]) * 65536)
    pending[n] = buffer
    h.aio_pwrite(buffer, n * 65536, completion=lambda error, n=n: pending.pop(n) and 1)
while h.aio_in_flight():
    h.poll(-1)
h.flush()
for n in range(blocks):
    data = h.pread(65536, n * 65536)
    assert data == bytes([n % 251 + 1]) * 65536, f'block {n} reads back wrong'
print('verified')
"#;

#[test]
fn a_pool_grows_onto_a_second_disk_while_writes_wait_for_space() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::ThinCheck, Tool::NbdSh]);
    let scratch = Scratch::new().unwrap();
    let metadata = scratch.disk("metadata.img", 16 * MIB).unwrap();
    let first = scratch.disk("first.img", 4 * MIB).unwrap();
    let second = scratch.disk("second.img", 16 * MIB).unwrap();
    let options = Options::bios()
        .disk(&metadata)
        .disk(&first)
        .disk(&second)
        .nbd();
    let mut appliance = Appliance::boot(options).unwrap();
    wait_for_greeting(appliance.nbd_port().unwrap(), Duration::from_secs(60)).unwrap();
    appliance.console_ok("pool create pool vda vdb").unwrap();
    appliance
        .console_ok("thin create vol pool --size 16M")
        .unwrap();

    // 192 blocks of writes against a pool of 64: the client waits for space.
    let mut client = nbdsh_command(&appliance.nbd_uri("vol").unwrap(), CLIENT);
    let client = client
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let status = appliance.console_ok("status pool").unwrap();
        if status.contains("out_of_data_space") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the pool never ran out of space: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let extended = appliance.console_ok("pool extend pool --data vdc").unwrap();
    assert!(
        extended.contains("pool_tdata: 8192 32768 linear vdc 0"),
        "{extended}"
    );
    let done = client.wait_with_output().unwrap();
    let printed = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success() && printed.contains("verified"),
        "the client failed: {printed}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let status = appliance.console_ok("status pool").unwrap();
    assert!(status.contains(" rw "), "{status}");
    appliance.shutdown().unwrap();
    let checked = Command::new("thin_check").arg(&metadata).output().unwrap();
    assert!(
        checked.status.success(),
        "thin_check: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
}
