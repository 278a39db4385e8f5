//! `disk-reset` on the booted appliance: the data disk (virtio-blk, or NVMe) and then
//! the metadata disk of a pool are reset while a libnbd writer (16 writes in flight,
//! a FLUSH every 4 MiB) fills a thin volume of it. Every write and flush succeeds,
//! the volume reads back byte for byte, `disks` counts one reset on each disk, and
//! the metadata passes the real `thin_check` after shutdown.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{
    Appliance, Options, Scratch, disk_errors, nbdsh_command, qemu_img_read, run_tool,
    wait_for_greeting,
};

const MIB: usize = 1 << 20;
/// The volume, which the copy fills.
const VOLUME_MIB: usize = 64;
/// The writer is this far before the resets, and is held before its last part
/// until they are done, so they happen in the middle of its work.
const BEFORE_RESETS_MIB: usize = 16;
const HELD_FROM_MIB: usize = 48;

/// Writes `@SOURCE@` over the volume in 64 KiB writes, 16 in flight and a FLUSH
/// after every 4 MiB; says `started` after the first @BEFORE@ MiB, waits for a line
/// on its input before the part from @HELD@ MiB on, and says `done` once all is
/// written and flushed. A failed write raises (`aio_command_completed`).
const WRITER: &str = r#"
import sys
MIB = 1 << 20
BLOCK = 65536
data = open('@SOURCE@', 'rb').read()
pending = []

def retire(limit):
    while len(pending) > limit:
        h.poll(-1)
        pending[:] = [(c, b) for (c, b) in pending if not h.aio_command_completed(c)]

def write(first_mib, last_mib):
    for offset in range(first_mib * MIB, last_mib * MIB, BLOCK):
        retire(15)
        buffer = nbd.Buffer.from_bytearray(bytearray(data[offset:offset + BLOCK]))
        pending.append((h.aio_pwrite(buffer, offset), buffer))
        if (offset + BLOCK) % (4 * MIB) == 0:
            pending.append((h.aio_flush(), None))

write(0, @BEFORE@)
print('started', flush=True)
write(@BEFORE@, @HELD@)
retire(0)
sys.stdin.readline()
write(@HELD@, @TOTAL@)
retire(0)
h.flush()
print('done')
"#;

/// The requests in flight on `disk` that a reset let finish, from what it printed
/// when all of them finished and the disk was flushed before it.
fn finished_before_reset(printed: &str, disk: &str) -> u64 {
    printed
        .trim()
        .strip_prefix(&format!("{disk}: reset ("))
        .and_then(|rest| {
            rest.strip_suffix(" in flight finished and the disk was flushed first); 1 reset so far")
        })
        .and_then(|count| {
            let number = count
                .strip_suffix(" requests")
                .or_else(|| count.strip_suffix(" request"))?;
            number.parse().ok()
        })
        .unwrap_or_else(|| panic!("disk-reset {disk} printed {printed}"))
}

#[test]
fn the_virtio_disks_of_a_pool_are_reset_under_a_writer_and_lose_nothing() {
    reset_under_a_writer(false);
}

#[test]
fn an_nvme_data_disk_is_reset_under_a_writer_and_loses_nothing() {
    reset_under_a_writer(true);
}

/// A pool with its metadata on virtio-blk disk vda and its data on virtio-blk disk
/// vdb, or NVMe disk nvme0n1 with `nvme`; the data disk, then the metadata disk, is
/// reset while the writer runs.
fn reset_under_a_writer(nvme: bool) {
    host_tools::require_for_test(&[Tool::Qemu, Tool::NbdSh, Tool::QemuImg, Tool::ThinCheck]);
    let scratch = Scratch::new().unwrap();
    let metadata = scratch.disk("metadata.img", 16 << 20).unwrap();
    let data = scratch.disk("data.img", 96 << 20).unwrap();
    let options = Options::bios().disk(&metadata).nbd();
    let (options, data_disk) = if nvme {
        (options.nvme(&data), "nvme0n1")
    } else {
        (options.disk(&data), "vdb")
    };
    let mut appliance = Appliance::boot(options).unwrap();
    if let Err(why) = wait_for_greeting(appliance.nbd_port().unwrap(), Duration::from_secs(60)) {
        panic!("{why}\n{}", appliance.transcript());
    }
    appliance
        .console_ok(&format!("pool create pool vda {data_disk}"))
        .unwrap();
    appliance
        .console_ok(&format!("thin create vol pool --size {VOLUME_MIB}M"))
        .unwrap();
    let uri = appliance.nbd_uri("vol").unwrap();

    let mut content = vec![0u8; VOLUME_MIB * MIB];
    fastrand::Rng::with_seed(0x5eed).fill(&mut content);
    let source = scratch.path().join("source.img");
    std::fs::write(&source, &content).unwrap();
    let script = WRITER
        .replace("@SOURCE@", &source.display().to_string())
        .replace("@BEFORE@", &BEFORE_RESETS_MIB.to_string())
        .replace("@HELD@", &HELD_FROM_MIB.to_string())
        .replace("@TOTAL@", &VOLUME_MIB.to_string());
    let mut writer = nbdsh_command(&uri, &script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    BufReader::new(writer.stdout.as_mut().unwrap())
        .read_line(&mut said)
        .unwrap();
    assert_eq!(said.trim(), "started", "{}", appliance.transcript());
    let mut finished = 0;
    for disk in [data_disk, "vda"] {
        let printed = appliance.console_ok(&format!("disk-reset {disk}")).unwrap();
        let count = finished_before_reset(&printed, disk);
        eprintln!("disk-reset {disk}: {count} requests in flight finished first");
        finished += count;
    }
    writer.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let started = Instant::now();
    while writer.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            writer.kill().unwrap();
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let written = writer.wait_with_output().unwrap();
    assert!(
        written.status.success() && String::from_utf8_lossy(&written.stdout).trim() == "done",
        "the writer failed ({}): {}{}\n{}",
        written.status,
        String::from_utf8_lossy(&written.stdout),
        String::from_utf8_lossy(&written.stderr),
        appliance.transcript()
    );
    eprintln!("{finished} requests were in flight on the disks when they were reset");

    let read_back = qemu_img_read(&uri, &scratch.path().join("vol.img"));
    assert_eq!(read_back.len(), content.len());
    if let Some(at) = read_back.iter().zip(&content).position(|(a, b)| a != b) {
        panic!("the volume differs from what was copied at byte {at}");
    }
    let one_reset = "errors: 0 reads, 0 writes, 0 flushes, 0 discards failed; 1 reset";
    for disk in ["vda", data_disk] {
        assert_eq!(
            disk_errors(&mut appliance, disk).as_deref(),
            Some(one_reset)
        );
    }
    let status = appliance.console_ok("status pool").unwrap();
    assert!(status.contains(" rw "), "{status}");
    appliance.shutdown().unwrap();
    run_tool("thin_check", &[&metadata.display().to_string()]);
}
