//! fio with its nbd engine against a thin volume, on both NICs through QEMU's port
//! forward: random writes of mixed sizes at queue depth 16, each block carrying a
//! crc32c fio checks when it reads the data back; then a second fio run, on a new
//! connection, checks every block again without writing.

use std::path::PathBuf;
use std::time::Duration;

use host_tools::Tool;
use qemu_test::{Appliance, Nic, Options, Scratch, run_tool, wait_for_greeting};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// What fio writes and verifies (the volume is twice as large).
const SPAN: u64 = 24 * MIB;

/// One fio job's settings: the same seed, sizes and span in both runs, so the
/// verifying run expects exactly what the writing run wrote.
fn fio_args(uri: &str, verify_only: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "--name=interop",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        // No state file in the working directory: the second run has the same seed.
        "--verify_state_save=0",
        "--randseed=16",
        "--minimal",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("--uri={uri}"));
    args.push(format!("--size={SPAN}"));
    if verify_only {
        args.push(String::from("--verify_only"));
    }
    args
}

/// fio's terse (version 3) figures: (error, KiB read, KiB written).
fn terse_figures(output: &str) -> (u64, u64, u64) {
    let line = output
        .lines()
        .find(|line| line.starts_with("3;"))
        .unwrap_or_else(|| panic!("no terse line in fio's output:\n{output}"));
    let fields: Vec<&str> = line.split(';').collect();
    let number = |index: usize| -> u64 { fields[index].parse().unwrap() };
    (number(4), number(5), number(46))
}

fn fio_verifies_its_writes(nic: Nic) {
    host_tools::require_for_test(&[Tool::Qemu, Tool::Fio]);
    let scratch = Scratch::new().unwrap();
    let disks: Vec<PathBuf> = [("metadata.img", 16 * MIB), ("data.img", 128 * MIB)]
        .iter()
        .map(|(name, bytes)| scratch.disk(name, *bytes).unwrap())
        .collect();
    let options = Options::bios()
        .nic(nic)
        .nbd()
        .disk(&disks[0])
        .disk(&disks[1]);
    let mut appliance = Appliance::boot(options).unwrap();
    let port = appliance.nbd_port().unwrap();
    if let Err(why) = wait_for_greeting(port, Duration::from_secs(60)) {
        panic!("{why}\n{}", appliance.transcript());
    }
    for command in [
        format!(
            "create pool --table \"0 {} thin-pool vda vdb 128 0\"",
            128 * MIB / SECTOR
        ),
        String::from("message pool 0 \"create_thin 0\""),
        format!("create vol --table \"0 {} thin pool 0\"", 2 * SPAN / SECTOR),
    ] {
        appliance.console_ok(&command).unwrap();
    }
    let uri = appliance.nbd_uri("vol").unwrap();
    let kib = SPAN / 1024;

    // Writes the span once, then reads every block back and checks its crc32c.
    let args = fio_args(&uri, false);
    let written = run_tool("fio", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(terse_figures(&written), (0, kib, kib), "{written}");

    // A new connection reads it all again; fio fails on any block that differs.
    let args = fio_args(&uri, true);
    let verified = run_tool("fio", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(terse_figures(&verified).0, 0, "{verified}");
    assert_eq!(terse_figures(&verified).1, kib, "{verified}");

    // fio wrote every block of the span once: the pool mapped it all and no more.
    let sectors = SPAN / SECTOR;
    assert_eq!(
        appliance.console_ok("status vol").unwrap(),
        format!("0 {} thin {sectors} {}", 2 * sectors, sectors - 1)
    );
    appliance.shutdown().unwrap();
}

#[test]
fn fio_verifies_its_writes_on_virtio_net() {
    fio_verifies_its_writes(Nic::Virtio);
}

#[test]
fn fio_verifies_its_writes_on_e1000e() {
    fio_verifies_its_writes(Nic::E1000e);
}
