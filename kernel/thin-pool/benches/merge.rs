//! Merge benchmarks; prints numbers, not a timed test.
//!
//! `cargo bench -p thin-pool --features std --bench merge [-- snapshot|origin]`
//!
//! * `snapshot`: merging a thin snapshot into its origin at 1,000,000 mappings — the
//!   merge call (one commit) and the background release of the origin's old blocks.
//! * `origin`: merging a thin volume of 256 MiB into its external origin on files
//!   (as `thinbox offline` has its disks), idle and under 4 KiB random reads at queue
//!   depth 16, against the sequential write bandwidth of the same kind of file, and
//!   the reads' rate during the merge against their rate without it.

use std::time::{Duration, Instant};

use blockdev::{BlockDevice, Command, FileDisk, IoBuf, MemDisk, Request};
use persistent_data::thin::{OpenOptions, ThinMetadata};
use thin_pool::{Pool, PoolConfig, ThinVolume};

const BS: u64 = 128;
const MAPPINGS: u64 = 1_000_000;
/// The volume merged into its origin: 256 MiB.
const ORIGIN_MIB: u64 = 256;
const READ_DEPTH: usize = 16;

/// Device 0 maps `MAPPINGS` blocks; device 1 is a snapshot of it (`snapshot`) or
/// another device with `MAPPINGS` blocks of its own.
fn million_mapping_pool(snapshot: bool) -> Pool {
    let blocks = 2 * MAPPINGS + 1024;
    let meta = MemDisk::new(1 << 19);
    let data = MemDisk::new(blocks * BS);
    {
        let options = OpenOptions::new(BS as u32);
        let (mut md, _) = ThinMetadata::open(Box::new(meta.handle()), &options).unwrap();
        md.resize_data(blocks).unwrap();
        for dev in [0u64, 1] {
            if dev == 1 && snapshot {
                md.create_snap(1, 0).unwrap();
                continue;
            }
            md.create_thin(dev).unwrap();
            for vblock in 0..MAPPINGS {
                let block = md.alloc_data_block().unwrap();
                md.insert(dev, vblock, block).unwrap();
            }
        }
        md.commit().unwrap();
    }
    let config = PoolConfig::new(blocks * BS, BS as u32);
    Pool::open(Box::new(meta.handle()), Box::new(data.handle()), config)
        .unwrap()
        .0
}

fn snapshot_merge() {
    println!("\nThin snapshot merge at 1,000,000 mappings (in-memory devices)");
    for (snapshot, what) in [
        (
            true,
            "snapshot of the origin, one block written in each since",
        ),
        (false, "both devices with 1,000,000 blocks of their own"),
    ] {
        let pool = million_mapping_pool(snapshot);
        let mut origin = pool.activate(0, MAPPINGS * BS, None).unwrap();
        if snapshot {
            let mut snap = pool.activate(1, MAPPINGS * BS, None).unwrap();
            for volume in [&mut origin, &mut snap] {
                write_and_wait(volume, 0, IoBuf::with_sectors(8));
            }
        }
        let start = Instant::now();
        pool.merge_snapshot(1, 0).unwrap();
        let merged = start.elapsed();
        let epoch = Instant::now();
        let clock = || epoch.elapsed().as_nanos() as u64;
        let release = Instant::now();
        let (mut steps, mut longest) = (0, Duration::ZERO);
        while !pool.deletes().is_empty() {
            let step = Instant::now();
            pool.service(&clock);
            longest = longest.max(step.elapsed());
            steps += 1;
        }
        println!(
            "  {what}: merge {:.1} ms (one commit); the origin's old blocks released in the background in {:.3} s, {steps} steps, the longest {:.1} ms",
            merged.as_secs_f64() * 1000.0,
            release.elapsed().as_secs_f64(),
            longest.as_secs_f64() * 1000.0
        );
    }
}

fn write_and_wait(volume: &mut ThinVolume, sector: u64, buf: IoBuf) {
    let command = Command::Write {
        sector,
        buf,
        fua: false,
    };
    volume.submit(Request { tag: 0, command }).unwrap();
    while volume.poll().is_none() {}
}

/// Sequential 1 MiB writes over `mib` MiB at queue depth 16, then a flush.
fn sequential_write(device: &mut dyn BlockDevice, mib: u64) -> Duration {
    let start = Instant::now();
    let mut next = 0;
    let mut in_flight = 0;
    while next < mib || in_flight > 0 {
        while next < mib && in_flight < 16 {
            let command = Command::Write {
                sector: next * 2048,
                buf: IoBuf::from_slice(&vec![next as u8 | 1; 1 << 20]),
                fua: false,
            };
            device.submit(Request { tag: next, command }).unwrap();
            next += 1;
            in_flight += 1;
        }
        while let Some(done) = device.poll() {
            done.result.unwrap();
            in_flight -= 1;
        }
    }
    device
        .submit(Request {
            tag: 0,
            command: Command::Flush,
        })
        .unwrap();
    loop {
        if let Some(done) = device.poll() {
            done.result.unwrap();
            break;
        }
    }
    start.elapsed()
}

/// 4 KiB random reads at queue depth 16, the pool's timer called between polls,
/// until `done` says so. Returns reads per second.
fn random_reads(pool: &Pool, volume: &mut ThinVolume, done: &dyn Fn(&Pool, u64) -> bool) -> f64 {
    let epoch = Instant::now();
    let clock = || epoch.elapsed().as_nanos() as u64;
    let mut rng = fastrand::Rng::with_seed(17);
    let pages = ORIGIN_MIB * 256;
    let mut buffers: Vec<IoBuf> = (0..READ_DEPTH).map(|_| IoBuf::with_sectors(8)).collect();
    let mut in_flight = 0;
    let mut reads = 0u64;
    let start = Instant::now();
    while !done(pool, reads) {
        while let Some(buf) = buffers.pop() {
            let command = Command::Read {
                sector: rng.u64(..pages) * 8,
                buf,
            };
            volume.submit(Request { tag: 0, command }).unwrap();
            in_flight += 1;
        }
        while let Some(completion) = volume.poll() {
            completion.result.unwrap();
            buffers.push(completion.buf);
            in_flight -= 1;
            reads += 1;
        }
        pool.service(&clock);
    }
    let rate = reads as f64 / start.elapsed().as_secs_f64();
    while in_flight > 0 {
        if volume.poll().is_some() {
            in_flight -= 1;
        }
    }
    rate
}

/// Waits for the merge into the origin to finish, calling the timer; returns how
/// long it took.
fn merge_idle(pool: &Pool) -> Duration {
    let epoch = Instant::now();
    let clock = || epoch.elapsed().as_nanos() as u64;
    let start = Instant::now();
    while !pool.origin_merges().is_empty() {
        pool.poll();
        pool.service(&clock);
    }
    start.elapsed()
}

fn origin_merge() {
    let dir = std::env::temp_dir().join(format!("thin-merge-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sectors = ORIGIN_MIB * 2048;
    let file = |name: &str, sectors: u64| FileDisk::create(&dir.join(name), sectors * 512).unwrap();
    let mut reference = file("reference", sectors);
    let bandwidth = ORIGIN_MIB as f64 / sequential_write(&mut reference, ORIGIN_MIB).as_secs_f64();
    drop(file("origin", sectors));
    let blocks = sectors / BS + 64;
    let config = PoolConfig::new(blocks * BS, BS as u32);
    let (pool, _) = Pool::open(
        Box::new(file("meta", 1 << 16)),
        Box::new(file("data", blocks * BS)),
        config,
    )
    .unwrap();
    pool.message("create_thin 0").unwrap();
    let reader = FileDisk::open(&dir.join("origin"), true).unwrap();
    let mut volume = pool.activate(0, sectors, Some(Box::new(reader))).unwrap();
    let writer =
        || Box::new(FileDisk::open(&dir.join("origin"), false).unwrap()) as Box<dyn BlockDevice>;

    println!(
        "\nMerging a 256 MiB thin volume into its external origin (files, as `thinbox offline` has its disks)"
    );
    println!("  sequential 1 MiB writes + flush to a file of the same kind: {bandwidth:.0} MB/s");
    sequential_write(&mut volume, ORIGIN_MIB);
    volume.start_origin_merge(writer()).unwrap();
    let took = merge_idle(&pool);
    let idle_rate = ORIGIN_MIB as f64 / took.as_secs_f64();
    println!(
        "  merge with no other I/O: {:.2} s, {idle_rate:.0} MB/s (ratio {:.2} of the write bandwidth)",
        took.as_secs_f64(),
        idle_rate / bandwidth
    );

    sequential_write(&mut volume, ORIGIN_MIB);
    let alone = random_reads(&pool, &mut volume, &|_, reads| reads >= 200_000);
    volume.start_origin_merge(writer()).unwrap();
    let start = Instant::now();
    let during = random_reads(&pool, &mut volume, &|pool, _| {
        pool.origin_merges().is_empty()
    });
    let loaded = ORIGIN_MIB as f64 / start.elapsed().as_secs_f64();
    println!(
        "  4K random reads, queue depth {READ_DEPTH}: {alone:.0} IOPS alone, {during:.0} IOPS during the merge (ratio {:.2}); the merge took {:.2} s, {loaded:.0} MB/s (ratio {:.2})",
        during / alone,
        start.elapsed().as_secs_f64(),
        loaded / bandwidth
    );
    drop(volume);
    drop(pool);
    std::fs::remove_dir_all(&dir).ok();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let names: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let wanted = |suite: &str| names.is_empty() || names.iter().any(|n| suite.contains(n.as_str()));
    if wanted("snapshot") {
        snapshot_merge();
    }
    if wanted("origin") {
        origin_merge();
    }
}
