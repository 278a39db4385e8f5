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
/// Passes over the same blocks for workloads that allocate nothing (so they run long
/// enough to time).
const PASSES: u64 = 8;
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

/// Time a workload took: wall clock and time this thread spent on a CPU. On a busy
/// host the wall clock also measures the scheduler; CPU time is the engine's cost.
#[derive(Clone, Copy)]
struct Took {
    wall: f64,
    cpu: f64,
}

/// Nanoseconds this thread has run on a CPU (Linux).
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs the commands keeping `DEPTH` in flight.
fn drive(device: &mut dyn BlockDevice, commands: Vec<Command>) -> Took {
    let start = Instant::now();
    let cpu_start = cpu_ns();
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
    Took {
        wall: start.elapsed().as_secs_f64(),
        cpu: (cpu_ns() - cpu_start) as f64 / 1e9,
    }
}

/// 4 KiB operations on distinct blocks chosen by `seed` (the same seed touches the
/// same blocks), at a random 4 KiB offset inside each; `passes` times over them.
fn random_4k(seed: u64, blocks: u64, write: bool, passes: u64) -> Vec<Command> {
    let mut rng = Rng(seed | 1);
    (0..RANDOM_OPS * passes)
        .map(|n| {
            let i = n % RANDOM_OPS;
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

fn flushed(device: &mut dyn BlockDevice, mut commands: Vec<Command>) -> Took {
    commands.push(Command::Flush);
    drive(device, commands)
}

/// One workload on the thin volume and on the raw device; rates are per second of
/// CPU time (`cpu`) and of wall-clock time (`wall`).
struct Row {
    name: &'static str,
    unit: &'static str,
    thin: Rates,
    raw: Rates,
}

#[derive(Clone, Copy)]
struct Rates {
    cpu: f64,
    wall: f64,
}

impl Rates {
    fn of(took: Took, ops: u64, bytes_per_op: u64, mb: bool) -> Self {
        let amount = if mb {
            (ops * bytes_per_op) as f64 / 1e6
        } else {
            ops as f64
        };
        Rates {
            cpu: amount / took.cpu.max(1e-9),
            wall: amount / took.wall.max(1e-9),
        }
    }

    fn best(self, other: Rates) -> Rates {
        Rates {
            cpu: self.cpu.max(other.cpu),
            wall: self.wall.max(other.wall),
        }
    }
}

type Maker = Box<dyn Fn(&str, u64) -> Box<dyn BlockDevice>>;

fn run_suite(make: &Maker) -> Vec<Row> {
    // Raw device numbers.
    let mut raw = make("raw", DATA_BLOCKS * BS);
    // The same blocks as the volume below: first writes, overwrites, reads.
    let raw_write = flushed(raw.as_mut(), random_4k(1, DATA_BLOCKS / 2, true, 1));
    let raw_overwrite = flushed(raw.as_mut(), random_4k(1, DATA_BLOCKS / 2, true, PASSES));
    let raw_read = drive(raw.as_mut(), random_4k(1, DATA_BLOCKS / 2, false, PASSES));
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
    let provision = flushed(&mut vol, random_4k(1, DATA_BLOCKS / 2, true, 1));
    let overwrite = flushed(&mut vol, random_4k(1, DATA_BLOCKS / 2, true, PASSES));
    let read = drive(&mut vol, random_4k(1, DATA_BLOCKS / 2, false, PASSES));
    pool.message("create_snap 2 1").unwrap();
    let break_sharing = flushed(&mut vol, random_4k(1, DATA_BLOCKS / 2, true, 1));
    drop(vol);
    pool.message("create_thin 3").unwrap();
    let mut seq = pool.activate(3, volume_sectors, None).unwrap();
    let seq_write = flushed(&mut seq, sequential_1m(true));
    let seq_read = drive(&mut seq, sequential_1m(false));
    drop(seq);

    let iops = |name, thin, thin_passes, raw, raw_passes| Row {
        name,
        unit: "IOPS",
        thin: Rates::of(thin, RANDOM_OPS * thin_passes, 4096, false),
        raw: Rates::of(raw, RANDOM_OPS * raw_passes, 4096, false),
    };
    let mbps = |name, thin, raw| Row {
        name,
        unit: "MB/s",
        thin: Rates::of(thin, SEQUENTIAL_MIB, 1 << 20, true),
        raw: Rates::of(raw, SEQUENTIAL_MIB, 1 << 20, true),
    };
    vec![
        iops("4K random write, unprovisioned", provision, 1, raw_write, 1),
        iops(
            "4K random write, provisioned",
            overwrite,
            PASSES,
            raw_overwrite,
            PASSES,
        ),
        iops(
            "4K random write, shared (break sharing)",
            break_sharing,
            1,
            raw_overwrite,
            PASSES,
        ),
        iops(
            "4K random read, provisioned",
            read,
            PASSES,
            raw_read,
            PASSES,
        ),
        mbps(
            "1M sequential write (provisioning)",
            seq_write,
            raw_seq_write,
        ),
        mbps("1M sequential read", seq_read, raw_seq_read),
    ]
}

/// Runs a suite `runs` times and prints the best rates of each row.
fn report(label: &str, runs: usize, make: Maker) {
    let mut best = run_suite(&make);
    for _ in 1..runs {
        for (row, again) in best.iter_mut().zip(run_suite(&make)) {
            row.thin = row.thin.best(again.thin);
            row.raw = row.raw.best(again.raw);
        }
    }
    println!("\n{label} (best of {runs})");
    println!(
        "{:<42} {:>12} {:>12} {:>7} | {:>12} {:>12} {:>7}",
        "workload", "thin/cpu-s", "raw/cpu-s", "ratio", "thin/wall-s", "raw/wall-s", "ratio"
    );
    for row in &best {
        println!(
            "{:<42} {:>7.0} {:<4} {:>7.0} {:<4} {:>7.2} | {:>7.0} {:<4} {:>7.0} {:<4} {:>7.2}",
            row.name,
            row.thin.cpu,
            row.unit,
            row.raw.cpu,
            row.unit,
            row.thin.cpu / row.raw.cpu,
            row.thin.wall,
            row.unit,
            row.raw.wall,
            row.unit,
            row.thin.wall / row.raw.wall,
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
    flushed(&mut vol, random_4k(11, 2048, true, 1));
    drop(vol);
    for depth in 1..=1000 {
        pool.message(&format!("create_snap {depth} {}", depth - 1))
            .unwrap();
    }
    println!("\nlookup cost by snapshot depth (4K random reads, in-memory devices)");
    for dev in [1, 1000] {
        let mut vol = pool.activate(dev, 2048 * BS, None).unwrap();
        let took = drive(&mut vol, random_4k(11, 2048, false, PASSES));
        let rates = Rates::of(took, RANDOM_OPS * PASSES, 4096, false);
        println!(
            "  depth {dev:>4}: {:>9.0} IOPS per CPU-second, {:>9.0} IOPS per wall-second",
            rates.cpu, rates.wall
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // Suites named on the command line (`memory`, `files`, `depth`) run alone.
    let names: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let wanted = |suite: &str| names.is_empty() || names.iter().any(|n| suite.contains(n.as_str()));
    // Each suite runs several times (best rates kept) to ride out a busy host.
    let runs = std::env::var("THIN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3usize)
        .max(1);
    if wanted("memory") {
        report(
            "in-memory devices (engine cost)",
            runs,
            Box::new(|_, sectors| Box::new(MemDisk::new(sectors))),
        );
    }
    if wanted("files") {
        let dir = std::env::temp_dir().join(format!("thin-pool-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = dir.clone();
        report(
            "files (page cache; flush = fdatasync)",
            runs,
            Box::new(move |name, sectors| {
                Box::new(FileDisk::create(&files.join(name), sectors * 512).unwrap())
            }),
        );
        std::fs::remove_dir_all(&dir).ok();
    }
    if wanted("depth") {
        snapshot_depth();
    }
}
