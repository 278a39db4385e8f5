//! Engine throughput against the raw device it runs on, in the same run: in-memory
//! devices (the engine's own cost) and files. Prints a table; not a timed test.
//!
//! `cargo bench -p thin-pool --features std`

use std::time::Instant;

use blockdev::{BlockDevice, Command, FileDisk, IoBuf, MemDisk, Request};
use thin_pool::{Pool, PoolConfig};

const BS: u64 = 128;
const DATA_BLOCKS: u64 = 16384;
const DEPTH: usize = 32;
const RANDOM_OPS: u64 = 4096;
const SEQUENTIAL_MIB: u64 = 256;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs the commands keeping `DEPTH` in flight; returns seconds.
fn drive(device: &mut dyn BlockDevice, commands: Vec<Command>) -> f64 {
    let start = Instant::now();
    let mut pending = commands.into_iter();
    let mut waiting: Option<Request> = None;
    let mut in_flight = 0;
    let mut tag = 0;
    loop {
        while in_flight < DEPTH {
            let request = match waiting.take() {
                Some(request) => request,
                None => match pending.next() {
                    Some(command) => {
                        tag += 1;
                        Request { tag, command }
                    }
                    None => break,
                },
            };
            match device.submit(request) {
                Ok(()) => in_flight += 1,
                Err(blockdev::Busy(request)) => {
                    waiting = Some(request);
                    break;
                }
            }
        }
        if in_flight == 0 && waiting.is_none() {
            break;
        }
        while let Some(done) = device.poll() {
            done.result.expect("benchmark I/O failed");
            in_flight -= 1;
        }
    }
    start.elapsed().as_secs_f64()
}

/// 4 KiB operations on distinct blocks chosen by `seed` (the same seed touches the
/// same blocks), at a random 4 KiB offset inside each.
fn random_4k(seed: u64, blocks: u64, write: bool) -> Vec<Command> {
    let mut rng = Rng(seed | 1);
    (0..RANDOM_OPS)
        .map(|i| {
            // A distinct block per operation (a permutation step), random 4 KiB within it.
            let block = (i * 7919 + seed) % blocks;
            let sector = block * BS + (rng.next() % (BS / 8)) * 8;
            if write {
                Command::Write {
                    sector,
                    buf: IoBuf::from_slice(&[i as u8; 4096]),
                    fua: false,
                }
            } else {
                Command::Read {
                    sector,
                    buf: IoBuf::with_sectors(8),
                }
            }
        })
        .collect()
}

fn sequential_1m(write: bool) -> Vec<Command> {
    (0..SEQUENTIAL_MIB)
        .map(|i| {
            let sector = i * 2048;
            if write {
                Command::Write {
                    sector,
                    buf: IoBuf::from_slice(&vec![i as u8; 1 << 20]),
                    fua: false,
                }
            } else {
                Command::Read {
                    sector,
                    buf: IoBuf::with_sectors(2048),
                }
            }
        })
        .collect()
}

fn flushed(device: &mut dyn BlockDevice, mut commands: Vec<Command>) -> f64 {
    commands.push(Command::Flush);
    drive(device, commands)
}

struct Row {
    name: &'static str,
    unit: &'static str,
    thin: f64,
    raw: f64,
}

fn rate(ops: u64, bytes_per_op: u64, seconds: f64, mb: bool) -> f64 {
    if mb {
        (ops * bytes_per_op) as f64 / seconds / 1e6
    } else {
        ops as f64 / seconds
    }
}

type Maker = Box<dyn Fn(&str, u64) -> Box<dyn BlockDevice>>;

fn run_suite(label: &str, make: Maker) -> Vec<Row> {
    let mut rows = Vec::new();
    // Raw device numbers.
    let mut raw = make("raw", DATA_BLOCKS * BS);
    // The same blocks as the volume below: first writes, overwrites, reads.
    let raw_write = flushed(raw.as_mut(), random_4k(1, DATA_BLOCKS / 2, true));
    let raw_overwrite = flushed(raw.as_mut(), random_4k(1, DATA_BLOCKS / 2, true));
    let raw_read = drive(raw.as_mut(), random_4k(1, DATA_BLOCKS / 2, false));
    let raw_seq_write = flushed(raw.as_mut(), sequential_1m(true));
    let raw_seq_read = drive(raw.as_mut(), sequential_1m(false));
    drop(raw);

    let meta = make("meta", 262144);
    let data = make("data", DATA_BLOCKS * BS);
    let config = PoolConfig::new(DATA_BLOCKS * BS, BS as u32);
    let (pool, _) = Pool::open(meta, data, config).unwrap();
    pool.message("create_thin 1").unwrap();
    let volume_sectors = DATA_BLOCKS * BS;
    let mut vol = pool.activate(1, volume_sectors, None).unwrap();
    let provision = flushed(&mut vol, random_4k(1, DATA_BLOCKS / 2, true));
    let overwrite = flushed(&mut vol, random_4k(1, DATA_BLOCKS / 2, true));
    let read = drive(&mut vol, random_4k(1, DATA_BLOCKS / 2, false));
    pool.message("create_snap 2 1").unwrap();
    let break_sharing = flushed(&mut vol, random_4k(1, DATA_BLOCKS / 2, true));
    drop(vol);
    pool.message("create_thin 3").unwrap();
    let mut seq = pool.activate(3, volume_sectors, None).unwrap();
    let seq_write = flushed(&mut seq, sequential_1m(true));
    let seq_read = drive(&mut seq, sequential_1m(false));
    drop(seq);

    let iops = |name, thin: f64, raw_s: f64| Row {
        name,
        unit: "IOPS",
        thin: rate(RANDOM_OPS, 4096, thin, false),
        raw: rate(RANDOM_OPS, 4096, raw_s, false),
    };
    rows.push(iops("4K random write, unprovisioned", provision, raw_write));
    rows.push(iops(
        "4K random write, provisioned",
        overwrite,
        raw_overwrite,
    ));
    rows.push(iops(
        "4K random write, shared (break sharing)",
        break_sharing,
        raw_overwrite,
    ));
    rows.push(iops("4K random read, provisioned", read, raw_read));
    rows.push(Row {
        name: "1M sequential write (provisioning)",
        unit: "MB/s",
        thin: rate(SEQUENTIAL_MIB, 1 << 20, seq_write, true),
        raw: rate(SEQUENTIAL_MIB, 1 << 20, raw_seq_write, true),
    });
    rows.push(Row {
        name: "1M sequential read",
        unit: "MB/s",
        thin: rate(SEQUENTIAL_MIB, 1 << 20, seq_read, true),
        raw: rate(SEQUENTIAL_MIB, 1 << 20, raw_seq_read, true),
    });
    println!("\n{label}");
    print_rows(&rows);
    rows
}

fn print_rows(rows: &[Row]) {
    println!(
        "{:<42} {:>12} {:>12} {:>7}",
        "workload", "thin", "raw", "ratio"
    );
    for row in rows {
        println!(
            "{:<42} {:>7.0} {:<4} {:>7.0} {:<4} {:>6.2}",
            row.name,
            row.thin,
            row.unit,
            row.raw,
            row.unit,
            row.thin / row.raw
        );
    }
}

/// Random 4 KiB reads of a device at the end of a snapshot chain of `depth`, vs
/// the chain's first device.
fn snapshot_depth() {
    let meta = Box::new(MemDisk::new(262144));
    let data = Box::new(MemDisk::new(4096 * BS));
    let (pool, _) = Pool::open(meta, data, PoolConfig::new(4096 * BS, BS as u32)).unwrap();
    pool.message("create_thin 0").unwrap();
    let mut vol = pool.activate(0, 2048 * BS, None).unwrap();
    flushed(&mut vol, random_4k(11, 2048, true));
    drop(vol);
    for depth in 1..=1000 {
        pool.message(&format!("create_snap {depth} {}", depth - 1))
            .unwrap();
    }
    println!("\nlookup cost by snapshot depth (4K random reads, in-memory devices)");
    for dev in [1, 1000] {
        let mut vol = pool.activate(dev, 2048 * BS, None).unwrap();
        let seconds = drive(&mut vol, random_4k(11, 2048, false));
        println!(
            "  depth {dev:>4}: {:>9.0} IOPS",
            rate(RANDOM_OPS, 4096, seconds, false)
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    run_suite(
        "in-memory devices (engine cost)",
        Box::new(|_, sectors| Box::new(MemDisk::new(sectors))),
    );
    let dir = std::env::temp_dir().join(format!("thin-pool-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = dir.clone();
    run_suite(
        "files (page cache; flush = fdatasync)",
        Box::new(move |name, sectors| {
            Box::new(FileDisk::create(&files.join(name), sectors * 512).unwrap())
        }),
    );
    std::fs::remove_dir_all(&dir).ok();
    snapshot_depth();
}
