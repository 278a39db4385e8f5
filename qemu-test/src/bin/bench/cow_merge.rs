//! `bench --cow-merge`: a dm-snapshot merge on the booted appliance. A 256 MiB linear
//! volume gets a COW snapshot (`snap create --cow`), the snapshot is written with
//! `nbdcopy` (sequential, so the merge's runs are whole metadata areas), then merged
//! back (`snap merge --background`) while `jobs` is polled. The merge's throughput
//! is set against `disk-test`'s sequential bandwidth on a spare disk of the same
//! kind, and 4 KiB random reads at queue depth 16 on the volume during a second,
//! larger merge against the same reads with no merge running.

use std::path::Path;
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{Appliance, Options, Scratch, wait_for_greeting};

use crate::{Client, EXPORT_BYTES, MIB, Result, SECTOR, fio_iops, timed, write_random};

/// Data written to the snapshot before the timed merge, and before the merge that
/// runs under reads (larger, so that it outlasts them).
const ALONE_BYTES: u64 = 64 * MIB;
const LOADED_BYTES: u64 = 160 * MIB;

/// COW disk: the larger change plus its metadata (one 4 KiB area per 1 MiB).
const COW_BYTES: u64 = 192 * MIB;

/// How often `jobs` is asked whether the merge is over.
const POLL: Duration = Duration::from_millis(100);

fn console(appliance: &mut Appliance, command: &str) -> Result<String> {
    appliance
        .console_ok(command)
        .map_err(|e| format!("{command}: {e:?}"))
}

/// Sequential write (with the flush) and read bandwidth of `disk-test`, MiB/s.
fn disk_test(appliance: &mut Appliance, disk: &str) -> Result<(f64, f64)> {
    let text = console(
        appliance,
        &format!("disk-test {disk} {}", EXPORT_BYTES / MIB),
    )?;
    let rates: Vec<f64> = text
        .split('(')
        .filter_map(|part| part.split_once(" MiB/s)"))
        .filter_map(|(rate, _)| rate.trim().parse().ok())
        .collect();
    match rates.as_slice() {
        [write, read, ..] => Ok((*write, *read)),
        _ => Err(format!("unexpected disk-test output: {text}")),
    }
}

/// Creates snapshot `name` of `vol`, writes `source` into it from the start, starts
/// the merge in the background and returns the bytes it merges.
fn start_merge(appliance: &mut Appliance, name: &str, source: &Path, port: u16) -> Result<u64> {
    console(
        appliance,
        &format!("snap create {name} vol --cow vdb --force"),
    )?;
    let uri = format!("nbd://127.0.0.1:{port}/{name}");
    let copy = timed(
        Client::Host,
        &["nbdcopy", "--flush", &source.display().to_string(), &uri],
    )?;
    let status = console(appliance, &format!("status {name}"))?;
    eprintln!(
        "cow-merge: {name} written in {:.1} s: {}",
        copy.as_secs_f64(),
        status.trim()
    );
    let started = console(appliance, &format!("snap merge {name} --background"))?;
    // "NAME: merging into vol (N chunks); ...": 4 KiB chunks.
    let chunks: u64 = started
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(" chunks"))
        .and_then(|(count, _)| count.parse().ok())
        .ok_or_else(|| format!("unexpected snap merge output: {started}"))?;
    Ok(chunks * 8 * SECTOR)
}

/// Polls `jobs` until the merge is over.
fn wait_for_merge(appliance: &mut Appliance) -> Result<()> {
    let limit = Instant::now() + Duration::from_secs(1800);
    while !console(appliance, "jobs")?.contains("no background jobs") {
        if Instant::now() > limit {
            return Err("the merge did not end within 30 minutes".into());
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

pub fn bench(seconds: u32) -> Result<()> {
    host_tools::require(&[Tool::Qemu, Tool::NbdCopy, Tool::Fio])
        .map_err(|missing| format!("missing tools: {}", missing.install_command()))?;
    let scratch = Scratch::new().map_err(|e| format!("scratch directory: {e}"))?;
    let disk = |name: &str, bytes: u64| {
        scratch
            .disk(name, bytes)
            .map_err(|e| format!("creating {name}: {e}"))
    };
    let volume = disk("volume.img", EXPORT_BYTES)?;
    let cow = disk("cow.img", COW_BYTES)?;
    let spare = disk("spare.img", EXPORT_BYTES)?;
    let alone_source = scratch.path().join("alone.img");
    let loaded_source = scratch.path().join("loaded.img");
    write_random(&alone_source, ALONE_BYTES)?;
    write_random(&loaded_source, LOADED_BYTES)?;
    let options = Options::bios()
        .memory_mib(1024)
        .disk(&volume)
        .disk(&cow)
        .disk(&spare)
        .nbd();
    let mut appliance = Appliance::boot(options).map_err(|e| format!("boot: {e:?}"))?;
    let port = appliance.nbd_port().expect("booted with a forward");
    wait_for_greeting(port, Duration::from_secs(60))?;

    eprintln!("cow-merge: disk-test vdc");
    let (seq_write, seq_read) = disk_test(&mut appliance, "vdc")?;
    let sectors = EXPORT_BYTES / SECTOR;
    console(
        &mut appliance,
        &format!("create vol --table \"0 {sectors} linear vda 0\""),
    )?;
    let vol = format!("nbd://127.0.0.1:{port}/vol");

    eprintln!("cow-merge: merge of {} MiB alone", ALONE_BYTES / MIB);
    let merged = start_merge(&mut appliance, "alone", &alone_source, port)?;
    let started = Instant::now();
    wait_for_merge(&mut appliance)?;
    let alone_mb_s = merged as f64 / 1e6 / started.elapsed().as_secs_f64();

    eprintln!("cow-merge: reads, no merge running");
    let idle = fio_iops(Client::Host, &vol, "randread", seconds)?;
    eprintln!(
        "cow-merge: reads during a merge of {} MiB",
        LOADED_BYTES / MIB
    );
    let merged = start_merge(&mut appliance, "loaded", &loaded_source, port)?;
    let started = Instant::now();
    let during = fio_iops(Client::Host, &vol, "randread", seconds)?;
    let jobs = console(&mut appliance, "jobs")?;
    let outlasted = !jobs.contains("no background jobs");
    wait_for_merge(&mut appliance)?;
    let loaded_mb_s = merged as f64 / 1e6 / started.elapsed().as_secs_f64();
    appliance.kill();

    let seq_write_mb_s = seq_write * MIB as f64 / 1e6;
    println!();
    println!("snapshot-merge of a P 8 snapshot on the appliance (virtio-blk, image files)");
    println!(
        "disk-test vdc {} MiB: write + flush {seq_write:.0} MiB/s ({seq_write_mb_s:.1} MB/s), \
         read {seq_read:.0} MiB/s",
        EXPORT_BYTES / MIB
    );
    println!(
        "merge of {} MiB alone: {alone_mb_s:.1} MB/s, {:.3} of sequential write",
        ALONE_BYTES / MIB,
        alone_mb_s / seq_write_mb_s
    );
    println!(
        "merge of {} MiB under reads: {loaded_mb_s:.1} MB/s{}",
        LOADED_BYTES / MIB,
        if outlasted {
            ""
        } else {
            " (it ended before the reads did)"
        }
    );
    println!(
        "4 KiB random reads, queue depth 16, on vol: idle {idle:.0} IOPS, during the merge \
         {during:.0} IOPS, ratio {:.2}",
        during / idle
    );
    Ok(())
}
