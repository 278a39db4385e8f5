//! Snapshot merge throughput against the disks' sequential bandwidth, and foreground
//! 4 KiB reads at queue depth 16 on the merging origin against the same reads with no
//! merge running. Files in a temporary directory (flush = `fdatasync`), the device
//! mapper driven as offline mode drives it: requests through the NBD backend, `tick`
//! between them. Prints a table; not a timed test.
//!
//! `cargo bench -p dm --bench snapshot_merge` (`MERGE_BENCH_MIB` sets the changed
//! data, default 16).

use std::time::Instant;

use blockdev::{Command, FileDisk, IoBuf};
use dm::{DeviceMapper, Disk, Format};
use nbd::{Backend, ExportHandle, IoOp, IoRequest};

/// The address NBD clients of these tests connect from.
const CLIENT: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

const ORIGIN_MIB: u64 = 256;
/// Requests in flight for the foreground reads and the disk reference.
const DEPTH: usize = 16;
const READS: usize = 20_000;

fn mib() -> u64 {
    std::env::var("MERGE_BENCH_MIB")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(16)
}

/// Sequential 1 MiB writes then a flush, and reads back: MB/s each.
fn disk_bandwidth(disk: &mut FileDisk, mib: u64) -> (f64, f64) {
    let mut rate = |write: bool| {
        let start = Instant::now();
        let commands = (0..mib).map(|n| {
            let buf = IoBuf::with_sectors(2048);
            if write {
                Command::Write {
                    sector: n * 2048,
                    buf,
                    fua: false,
                }
            } else {
                Command::Read {
                    sector: n * 2048,
                    buf,
                }
            }
        });
        blockdev::run_batch(disk, commands).unwrap();
        if write {
            blockdev::run_sync(disk, Command::Flush).unwrap();
        }
        (mib << 20) as f64 / start.elapsed().as_secs_f64() / 1e6
    };
    (rate(true), rate(false))
}

fn op_write(sector: u64, sectors: usize, byte: u8) -> IoOp {
    let mut buf = IoBuf::with_sectors(sectors);
    buf.fill(byte);
    IoOp::Write {
        sector,
        buf,
        fua: false,
    }
}

fn run(dm: &mut DeviceMapper, export: ExportHandle, op: IoOp) {
    dm.submit(IoRequest { tag: 0, export, op }).unwrap();
    loop {
        if let Some(done) = dm.poll() {
            done.result.unwrap();
            return;
        }
    }
}

/// `vol` on vda with a snapshot on vdb, as `snap create` builds it.
fn stack(dir: &std::path::Path, cow_mib: u64) -> (DeviceMapper, ExportHandle) {
    let origin = FileDisk::create(&dir.join("origin.img"), ORIGIN_MIB << 20).unwrap();
    let cow = FileDisk::create(&dir.join("cow.img"), cow_mib << 20).unwrap();
    let mut dm = DeviceMapper::new(vec![
        Disk {
            name: "vda".into(),
            device: Box::new(origin),
        },
        Disk {
            name: "vdb".into(),
            device: Box::new(cow),
        },
    ]);
    let sectors = ORIGIN_MIB * 2048;
    dm.create(
        "vol",
        false,
        &format!("0 {sectors} linear vda 0"),
        Format::IfBlank,
    )
    .unwrap();
    dm.create(
        "vol-real",
        false,
        &format!("0 {sectors} linear vda 0"),
        Format::IfBlank,
    )
    .unwrap();
    dm.suspend("vol").unwrap();
    let snap = format!("0 {sectors} snapshot vol-real vdb P 8");
    dm.create("snap", false, &snap, Format::IfBlank).unwrap();
    dm.reload("vol", &format!("0 {sectors} snapshot-origin vol-real"))
        .unwrap();
    dm.resume("vol").unwrap();
    let (vol, _) = dm.open("vol", CLIENT).unwrap();
    (dm, vol)
}

fn hand_over(dm: &mut DeviceMapper) {
    let sectors = ORIGIN_MIB * 2048;
    dm.suspend("vol").unwrap();
    dm.reload(
        "vol",
        &format!("0 {sectors} snapshot-merge vol-real vdb P 8"),
    )
    .unwrap();
    dm.suspend("snap").unwrap();
    dm.resume("vol").unwrap();
    dm.remove("snap", true).unwrap();
}

/// Ticks until the merge is complete; returns seconds.
fn merge_alone(dm: &mut DeviceMapper) -> f64 {
    let clock = Instant::now();
    let now = || clock.elapsed().as_nanos() as u64;
    while !dm.snapshot_merge_finished("vol") {
        dm.tick(&now);
    }
    clock.elapsed().as_secs_f64()
}

/// 4 KiB random reads at `DEPTH` in flight with a tick between batches, until `READS`
/// are done (or the merge ends, if `until_merged`). Returns IOPS and reads done.
fn foreground(dm: &mut DeviceMapper, vol: ExportHandle, until_merged: bool) -> (f64, usize) {
    let clock = Instant::now();
    let now = || clock.elapsed().as_nanos() as u64;
    let mut rng = fastrand::Rng::with_seed(5);
    let pages = ORIGIN_MIB * 256;
    let mut done = 0;
    while done < READS && !(until_merged && dm.snapshot_merge_finished("vol")) {
        dm.tick(&now);
        for tag in 0..DEPTH as u64 {
            let op = IoOp::Read {
                sector: rng.u64(..pages) * 8,
                buf: IoBuf::with_sectors(8),
            };
            dm.submit(IoRequest {
                tag,
                export: vol,
                op,
            })
            .unwrap();
        }
        let mut back = 0;
        while back < DEPTH {
            if let Some(reply) = dm.poll() {
                reply.result.unwrap();
                back += 1;
            }
        }
        done += DEPTH;
    }
    (done as f64 / clock.elapsed().as_secs_f64(), done)
}

/// One scenario: the snapshot changed by `make` (which returns the changed bytes),
/// then merged alone and, on a fresh stack, merged under foreground reads.
fn scenario(name: &str, seq_write: f64, make: &dyn Fn(&mut DeviceMapper, ExportHandle) -> u64) {
    let cow_mib = mib() * 2 + 16;
    let dir = tempfile::tempdir().unwrap();
    let (mut dm, vol) = stack(dir.path(), cow_mib);
    let bytes = make(&mut dm, vol);
    hand_over(&mut dm);
    let seconds = merge_alone(&mut dm);
    let rate = bytes as f64 / seconds / 1e6;
    let (idle, _) = foreground(&mut dm, vol, false);
    drop(dm);
    let dir = tempfile::tempdir().unwrap();
    let (mut dm, vol) = stack(dir.path(), cow_mib);
    make(&mut dm, vol);
    hand_over(&mut dm);
    let (busy, reads) = foreground(&mut dm, vol, true);
    println!(
        "| {name} | {:.1} MB in {seconds:.2} s: {rate:.2} MB/s | {:.3} | {idle:.0} | {busy:.0} ({reads} reads) | {:.2} |",
        bytes as f64 / 1e6,
        rate / seq_write,
        busy / idle
    );
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut disk = FileDisk::create(&dir.path().join("raw.img"), ORIGIN_MIB << 20).unwrap();
    let (write, read) = disk_bandwidth(&mut disk, mib());
    println!(
        "sequential 1 MiB requests on a file: write + flush {write:.0} MB/s, read {read:.0} MB/s"
    );
    println!();
    println!(
        "| changed data | merge alone | ratio to sequential write | 4K QD16 reads idle, IOPS | during the merge | ratio |"
    );
    println!("|---|---|---|---|---|---|");
    let mib = mib();
    scenario(
        "sequential 1 MiB writes to the snapshot",
        write,
        &|dm, _| {
            let (snap, _) = dm.open("snap", CLIENT).unwrap();
            for n in 0..mib {
                run(dm, snap, op_write(n * 2048, 2048, n as u8));
            }
            dm.close(snap, CLIENT);
            mib << 20
        },
    );
    scenario(
        "scattered 4 KiB origin writes (copy-outs)",
        write,
        &|dm, vol| {
            let pages = ORIGIN_MIB * 256;
            let count = mib * 256 / 4;
            for k in 0..count {
                let page = (k * 7919) % pages;
                run(dm, vol, op_write(page * 8, 8, k as u8));
            }
            count * 4096
        },
    );
}
