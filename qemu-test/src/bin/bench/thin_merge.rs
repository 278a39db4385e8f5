//! `bench --thin-merge`: the thin merges on the appliance.
//!
//! * `thin merge-origin` of a 256 MiB volume whose every block is its own: the merge
//!   alone in MB/s against `disk-test`'s write bandwidth on the image disk (measured
//!   first, on the same disk), and 4 KiB random reads at queue depth 16 on the
//!   volume during a merge against the same reads without one. With `--profile`,
//!   the guest's instruction pointer is sampled during both runs of reads (as
//!   `--network --profile` does) and the busiest functions of each are printed.
//! * `snap merge` of a thin snapshot at 1,000,000 mappings (metadata made by
//!   `thin_restore`, a sparse data disk): the command's round trip on the console,
//!   and the background release of the origin's old content.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{Appliance, KERNEL_ELF, Options, Scratch, wait_for_greeting};

use crate::delete::thin_restore;
use crate::network::disk_rates;
use crate::profile::{Profiler, Symbols};
use crate::{
    BLOCK_SECTORS, Client, EXPORT_BYTES, MIB, POOL_DATA_BYTES, Result, SECTOR, fio_iops, timed,
    write_random,
};

/// Mappings of the snapshot and its origin in the snapshot merge.
const MAPPINGS: u64 = 1_000_000;

fn boot(options: Options) -> Result<Appliance> {
    let appliance = Appliance::boot(options).map_err(|e| format!("boot: {e:?}"))?;
    let port = appliance.nbd_port().expect("booted with a forward");
    wait_for_greeting(port, Duration::from_secs(60))?;
    Ok(appliance)
}

fn console(appliance: &mut Appliance, command: &str) -> Result<String> {
    appliance
        .console_with_timeout(command, Duration::from_secs(900))
        .map_err(|e| format!("{command}: {e:?}"))
        .and_then(|output| match output.contains("error:") {
            true => Err(format!("{command}: {output}")),
            false => Ok(output),
        })
}

/// What the merge into an external origin achieved.
struct OriginFigures {
    disk_write: f64,
    merge_mib_s: f64,
    idle_iops: f64,
    merging_iops: f64,
    /// `jobs` right before and after the reads during the merge: how far the merge
    /// got meanwhile (it was still running).
    jobs_before: String,
    jobs_after: String,
}

/// Runs fio's random reads for `seconds` on `uri`; with a profiler, samples the
/// guest meanwhile and prints where it was, under `label`.
fn reads(uri: &str, seconds: u32, profile: Option<&Profiler>, label: &str) -> Result<f64> {
    match profile {
        Some(profiler) => profiler.fio(Client::Host, uri, "randread", seconds, label),
        None => fio_iops(Client::Host, uri, "randread", seconds),
    }
}

fn origin_merge(
    scratch: &Scratch,
    source: &Path,
    seconds: u32,
    profile: bool,
) -> Result<OriginFigures> {
    let disk = |name: &str, bytes: u64| {
        scratch
            .disk(name, bytes)
            .map_err(|e| format!("creating {name}: {e}"))
    };
    let mut options = Options::bios()
        .memory_mib(1024)
        .disk(disk("merge-meta.img", 64 * MIB)?)
        .disk(disk("merge-data.img", POOL_DATA_BYTES)?)
        .disk(disk("merge-image.img", EXPORT_BYTES)?)
        .nbd();
    let monitor = scratch.path().join("merge-monitor.sock");
    let symbols = match profile {
        true => {
            options = options.monitor(&monitor);
            Some(Symbols::read(Path::new(KERNEL_ELF))?)
        }
        false => None,
    };
    let mut appliance = boot(options)?;
    let profiler = symbols.as_ref().map(|symbols| Profiler {
        monitor: &monitor,
        qemu: appliance.pid(),
        symbols,
    });
    let profile = profiler.as_ref();
    let tested = console(
        &mut appliance,
        &format!("disk-test vdc {} --force", EXPORT_BYTES / MIB),
    )?;
    let (disk_write, _) = disk_rates(&tested)?;
    let sectors = EXPORT_BYTES / SECTOR;
    for command in [
        "pool create pool vda vdb".to_string(),
        format!("create image --table \"0 {sectors} linear vdc 0\""),
        "thin create vol pool --origin image".to_string(),
    ] {
        console(&mut appliance, &command)?;
    }
    let uri = appliance.nbd_uri("vol").expect("booted with a forward");
    let fill = || {
        eprintln!("merge: copying {} MiB into the volume", EXPORT_BYTES / MIB);
        let source = source.display().to_string();
        timed(Client::Host, &["nbdcopy", "--flush", &source, &uri])
    };
    fill()?;
    eprintln!("merge: merge-origin alone");
    let mut merge = || {
        let started = Instant::now();
        console(&mut appliance, "thin merge-origin vol")?;
        Ok(started.elapsed())
    };
    let took = match profile {
        Some(profiler) => {
            let (took, samples, cpu) = profiler.sample(merge)?;
            profiler.report(&format!("merge alone: {took:.2} s"), &samples, &cpu);
            took
        }
        None => merge()?.as_secs_f64(),
    };
    let merge_mib_s = (EXPORT_BYTES / MIB) as f64 / took;
    fill()?;
    eprintln!("merge: reads alone, {seconds} s");
    let idle_iops = reads(&uri, seconds, profile, "reads alone")?;
    console(&mut appliance, "thin merge-origin vol --background")?;
    let jobs_before = console(&mut appliance, "jobs")?;
    eprintln!("merge: reads during merge-origin, {seconds} s");
    let merging_iops = reads(&uri, seconds, profile, "reads during the merge")?;
    let jobs_after = console(&mut appliance, "jobs")?;
    appliance.kill();
    Ok(OriginFigures {
        disk_write,
        merge_mib_s,
        idle_iops,
        merging_iops,
        jobs_before,
        jobs_after,
    })
}

/// Metadata with thin device 0 mapping [`MAPPINGS`] blocks and device 1 a snapshot
/// of it (the same blocks, device 0 snapshotted at time 1), and a sparse data disk.
fn snapshot_pool(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let blocks = MAPPINGS + 1024;
    let device = |dev: u32, creation: u32| {
        format!(
            "<device dev_id=\"{dev}\" mapped_blocks=\"{MAPPINGS}\" transaction=\"0\" \
             creation_time=\"{creation}\" snap_time=\"1\">\n<range_mapping origin_begin=\"0\" \
             data_begin=\"0\" length=\"{MAPPINGS}\" time=\"0\"/>\n</device>\n"
        )
    };
    let xml = dir.join("snapshot-pool.xml");
    fs::write(
        &xml,
        format!(
            "<superblock uuid=\"\" time=\"1\" transaction=\"2\" flags=\"0\" version=\"2\" \
             data_block_size=\"{BLOCK_SECTORS}\" nr_data_blocks=\"{blocks}\">\n{}{}</superblock>\n",
            device(0, 0),
            device(1, 1)
        ),
    )
    .map_err(|e| format!("{}: {e}", xml.display()))?;
    let metadata = dir.join("snapshot-metadata.img");
    let data = dir.join("snapshot-data.img");
    qemu_test::create_disk(&metadata, 256 * MIB).map_err(|e| format!("metadata: {e}"))?;
    qemu_test::create_disk(&data, blocks * BLOCK_SECTORS * SECTOR)
        .map_err(|e| format!("data: {e}"))?;
    eprintln!("merge: thin_restore of a device and its snapshot, {MAPPINGS} mappings each");
    thin_restore(&xml, &metadata)?;
    Ok((metadata, data))
}

/// The console round trip of `snap merge` at [`MAPPINGS`] mappings, and the time
/// until the old content is released.
fn snapshot_merge(scratch: &Scratch) -> Result<(Duration, Duration)> {
    let (metadata, data) = snapshot_pool(scratch.path())?;
    let options = Options::bios()
        .memory_mib(1024)
        .disk(&metadata)
        .disk(&data)
        .nbd();
    let mut appliance = boot(options)?;
    let sectors = MAPPINGS * BLOCK_SECTORS;
    for command in [
        format!(
            "create pool --table \"0 {} thin-pool vda vdb {BLOCK_SECTORS} 0\"",
            (MAPPINGS + 1024) * BLOCK_SECTORS
        ),
        format!("create vol --table \"0 {sectors} thin pool 0\""),
        format!("create snap --table \"0 {sectors} thin pool 1\""),
    ] {
        console(&mut appliance, &command)?;
    }
    // The console's own round trip, to subtract.
    let started = Instant::now();
    console(&mut appliance, "uptime")?;
    let round_trip = started.elapsed();
    let started = Instant::now();
    let merged = console(&mut appliance, "snap merge snap --into vol")?;
    let merge = started.elapsed().saturating_sub(round_trip);
    eprintln!("merge: {}", merged.trim());
    let started = Instant::now();
    while !console(&mut appliance, "jobs")?.contains("no background jobs") {
        std::thread::sleep(Duration::from_millis(100));
    }
    let release = started.elapsed();
    appliance.kill();
    Ok((merge, release))
}

pub fn bench(seconds: u32, profile: bool) -> Result<()> {
    host_tools::require(&[Tool::Qemu, Tool::NbdCopy, Tool::Fio, Tool::ThinCheck])
        .map_err(|missing| format!("missing tools: {}", missing.install_command()))?;
    let scratch = Scratch::new().map_err(|e| format!("scratch directory: {e}"))?;
    let source = scratch.path().join("random.img");
    write_random(&source, EXPORT_BYTES)?;
    let origin = origin_merge(&scratch, &source, seconds, profile)?;
    let (merge, release) = snapshot_merge(&scratch)?;
    println!();
    println!(
        "thin merge-origin of a {} MiB volume on the appliance",
        EXPORT_BYTES / MIB
    );
    println!(
        "  disk-test write bandwidth of the image disk: {:.1} MiB/s",
        origin.disk_write
    );
    println!(
        "  merge alone: {:.1} MiB/s (ratio {:.2})",
        origin.merge_mib_s,
        origin.merge_mib_s / origin.disk_write
    );
    println!(
        "  4K random reads, queue depth 16: {:.0} IOPS alone, {:.0} during the merge (ratio {:.2})",
        origin.idle_iops,
        origin.merging_iops,
        origin.merging_iops / origin.idle_iops
    );
    println!("  jobs before the reads: {}", origin.jobs_before.trim());
    println!("  jobs after the reads: {}", origin.jobs_after.trim());
    println!("snap merge of a thin snapshot at {MAPPINGS} mappings on the appliance");
    println!(
        "  the command: {:.1} ms (console round trip subtracted); the old content released in {:.2} s",
        merge.as_secs_f64() * 1000.0,
        release.as_secs_f64()
    );
    Ok(())
}
