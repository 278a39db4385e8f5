//! Engine throughput against the raw device it runs on, in the same run: in-memory
//! devices (the engine's own cost) and files. Prints a table; not a timed test.
//!
//! `cargo bench -p thin-pool --features std [-- memory|files|depth|fua|delete|discard]`
//! (`THIN_BENCH_RUNS` sets how many runs the best rates are taken from, default 3).
//!
//! Each thin workload is compared with the raw-device workload that moves the same
//! data: a 4 KiB write to an unprovisioned block with zeroing writes a whole 64 KiB
//! block, so its reference is a 64 KiB write; breaking sharing copies a block, so its
//! reference also writes 64 KiB. Memory disks are filled before use (untimed): a
//! memory disk backs never-written space lazily, and first writes would measure the
//! host's page faults rather than the engine.
//!
//! Rates are given per second of CPU time (what the engine costs, steady on a busy
//! host) and per second of wall-clock time.

use std::time::Instant;

use blockdev::{BlockDevice, Command, CrashDisk, FileDisk, IoBuf, MemDisk, Request};
use thin_pool::{Pool, PoolConfig};

const BS: u64 = 128;
const DATA_BLOCKS: u64 = 16384;
const DEPTH: usize = 32;
const RANDOM_OPS: u64 = 4096;
/// Passes over the same blocks for workloads that allocate nothing (so they run long
/// enough to time).
const PASSES: u64 = 8;
const SEQUENTIAL_MIB: u64 = 256;

/// Time a workload took: wall clock and time this thread spent on a CPU.
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
    drive_at(device, commands, DEPTH)
}

/// Runs the commands keeping `depth` in flight.
fn drive_at(device: &mut dyn BlockDevice, commands: Vec<Command>, depth: usize) -> Took {
    let start = Instant::now();
    let cpu_start = cpu_ns();
    let mut pending = commands.into_iter();
    let mut waiting: Option<Request> = None;
    let mut in_flight = 0;
    let mut tag = 0;
    loop {
        while in_flight < depth {
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

/// Random operations of `sectors` sectors on distinct blocks among `first..first +
/// blocks` chosen by `seed` (the same seed touches the same blocks), at a random
/// aligned offset inside each; `passes` times over them.
fn random_ops(
    seed: u64,
    (first, blocks): (u64, u64),
    sectors: u64,
    write: bool,
    passes: u64,
) -> Vec<Command> {
    let mut rng = fastrand::Rng::with_seed(seed | 1);
    (0..RANDOM_OPS * passes)
        .map(|n| {
            let i = n % RANDOM_OPS;
            // A distinct block per operation (a permutation step).
            let block = first + (i * 7919 + seed) % blocks;
            let sector = block * BS + rng.u64(..BS / sectors) * sectors;
            if write {
                Command::Write {
                    sector,
                    buf: IoBuf::from_slice(&vec![i as u8; sectors as usize * 512]),
                    fua: false,
                }
            } else {
                Command::Read {
                    sector,
                    buf: IoBuf::with_sectors(sectors as usize),
                }
            }
        })
        .collect()
}

/// The same commands with FUA on every write.
fn with_fua(commands: Vec<Command>) -> Vec<Command> {
    commands
        .into_iter()
        .map(|command| match command {
            Command::Write { sector, buf, .. } => Command::Write {
                sector,
                buf,
                fua: true,
            },
            other => other,
        })
        .collect()
}

/// 4 KiB operations on the first half of the device.
fn random_4k(seed: u64, blocks: u64, write: bool, passes: u64) -> Vec<Command> {
    random_ops(seed, (0, blocks), 8, write, passes)
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

/// One workload on the thin volume and its reference on the raw device.
struct Row {
    name: &'static str,
    reference: &'static str,
    unit: &'static str,
    thin: Rates,
    raw: Rates,
}

/// Rates per second of CPU time and of wall-clock time.
#[derive(Clone, Copy)]
struct Rates {
    cpu: f64,
    wall: f64,
}

impl Rates {
    fn of(took: Took, amount: f64) -> Self {
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

/// The disk with every byte written once (zeros), so no write finds unbacked memory.
fn filled(disk: MemDisk) -> MemDisk {
    let zeros = vec![0u8; 1 << 20];
    let bytes = disk.info().bytes();
    let mut offset = 0;
    while offset < bytes {
        let len = (bytes - offset).min(zeros.len() as u64) as usize;
        disk.write_at(offset, &zeros[..len]);
        offset += len as u64;
    }
    disk
}

/// A pool on fresh devices with one thin device `1` activated over all of it.
fn pool_with_volume(make: &Maker, skip_block_zeroing: bool) -> (Pool, thin_pool::ThinVolume) {
    let meta = make("meta", 262144);
    let data = make("data", DATA_BLOCKS * BS);
    let mut config = PoolConfig::new(DATA_BLOCKS * BS, BS as u32);
    config.features.skip_block_zeroing = skip_block_zeroing;
    let (pool, _) = Pool::open(meta, data, config).unwrap();
    pool.message("create_thin 1").unwrap();
    let volume = pool.activate(1, DATA_BLOCKS * BS, None).unwrap();
    (pool, volume)
}

fn run_suite(make: &Maker) -> Vec<Row> {
    let half = DATA_BLOCKS / 2;
    let mut raw = make("raw", DATA_BLOCKS * BS);
    // First writes of 4 KiB to the first half, then the same blocks again.
    let raw_fresh_4k = flushed(raw.as_mut(), random_4k(1, half, true, 1));
    let raw_overwrite = flushed(raw.as_mut(), random_4k(1, half, true, PASSES));
    let raw_read = drive(raw.as_mut(), random_4k(1, half, false, PASSES));
    // Writes of whole 64 KiB blocks to the second half.
    let raw_64k = flushed(raw.as_mut(), random_ops(1, (half, half), BS, true, 1));
    let raw_seq_write = flushed(raw.as_mut(), sequential_1m(true));
    let raw_seq_read = drive(raw.as_mut(), sequential_1m(false));
    drop(raw);

    let (pool, mut vol) = pool_with_volume(make, false);
    let provision = flushed(&mut vol, random_4k(1, half, true, 1));
    let overwrite = flushed(&mut vol, random_4k(1, half, true, PASSES));
    let read = drive(&mut vol, random_4k(1, half, false, PASSES));
    pool.message("create_snap 2 1").unwrap();
    let break_sharing = flushed(&mut vol, random_4k(1, half, true, 1));
    drop(vol);
    pool.message("create_thin 3").unwrap();
    let mut seq = pool.activate(3, DATA_BLOCKS * BS, None).unwrap();
    let seq_write = flushed(&mut seq, sequential_1m(true));
    let seq_read = drive(&mut seq, sequential_1m(false));
    drop(seq);
    drop(pool);

    let (pool, mut vol) = pool_with_volume(make, true);
    let provision_unzeroed = flushed(&mut vol, random_4k(1, half, true, 1));
    drop(vol);
    drop(pool);

    let ops = |passes: u64| (RANDOM_OPS * passes) as f64;
    let iops = |name, reference, thin, thin_passes, raw, raw_passes| Row {
        name,
        reference,
        unit: "IOPS",
        thin: Rates::of(thin, ops(thin_passes)),
        raw: Rates::of(raw, ops(raw_passes)),
    };
    let megabytes = (SEQUENTIAL_MIB << 20) as f64 / 1e6;
    let mbps = |name, reference, thin, raw| Row {
        name,
        reference,
        unit: "MB/s",
        thin: Rates::of(thin, megabytes),
        raw: Rates::of(raw, megabytes),
    };
    vec![
        iops(
            "4K random write, unprovisioned (zeroing)",
            "64K random write",
            provision,
            1,
            raw_64k,
            1,
        ),
        iops(
            "4K random write, unprovisioned, no zeroing",
            "4K random write, first",
            provision_unzeroed,
            1,
            raw_fresh_4k,
            1,
        ),
        iops(
            "4K random write, provisioned",
            "4K random write",
            overwrite,
            PASSES,
            raw_overwrite,
            PASSES,
        ),
        iops(
            "4K random write, shared (break sharing)",
            "64K random write",
            break_sharing,
            1,
            raw_64k,
            1,
        ),
        iops(
            "4K random read, provisioned",
            "4K random read",
            read,
            PASSES,
            raw_read,
            PASSES,
        ),
        mbps(
            "1M sequential write (provisioning)",
            "1M sequential write, first",
            seq_write,
            raw_seq_write,
        ),
        mbps(
            "1M sequential read",
            "1M sequential read",
            seq_read,
            raw_seq_read,
        ),
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
    println!("\n{label} (best of {runs}; rates per CPU-second | per wall-second)");
    println!(
        "{:<43} {:<27} {:>12} {:>12} {:>6} | {:>12} {:>12} {:>6}",
        "thin workload", "raw reference", "thin", "raw", "ratio", "thin", "raw", "ratio"
    );
    for row in &best {
        let cell = |value: f64| format!("{value:.0} {}", row.unit);
        println!(
            "{:<43} {:<27} {:>12} {:>12} {:>6.2} | {:>12} {:>12} {:>6.2}",
            row.name,
            row.reference,
            cell(row.thin.cpu),
            cell(row.raw.cpu),
            row.thin.cpu / row.raw.cpu,
            cell(row.thin.wall),
            cell(row.raw.wall),
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
        let rates = Rates::of(took, (RANDOM_OPS * PASSES) as f64);
        println!(
            "  depth {dev:>4}: {:>9.0} IOPS per CPU-second, {:>9.0} IOPS per wall-second",
            rates.cpu, rates.wall
        );
    }
}

/// 4 KiB random FUA writes at queue depth 16 (in-memory crash disks) and the commit
/// cycles they cost: none on blocks mapped in an earlier commit, shared by the writes
/// waiting for one otherwise.
fn fua() {
    const FUA_DEPTH: usize = 16;
    let meta = CrashDisk::new(262144);
    let data = CrashDisk::new(DATA_BLOCKS * BS);
    let config = PoolConfig::new(DATA_BLOCKS * BS, BS as u32);
    let (pool, _) = Pool::open(Box::new(meta.handle()), Box::new(data.handle()), config).unwrap();
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, DATA_BLOCKS * BS, None).unwrap();
    let blocks = DATA_BLOCKS / 4;
    let run = |name: &str, commands: Vec<Command>, vol: &mut thin_pool::ThinVolume| {
        let writes = commands.len() as f64;
        let fua_writes = commands
            .iter()
            .filter(|c| matches!(c, Command::Write { fua: true, .. }))
            .count() as f64;
        let before = data.stats().flushes;
        let took = drive_at(vol, commands, FUA_DEPTH);
        let commits = (data.stats().flushes - before) as f64;
        println!(
            "  {name:<44} {:>7.0} IOPS per CPU-second, {:>7.0} per wall-second, {:.3} commits per FUA write",
            writes / took.cpu.max(1e-9),
            writes / took.wall.max(1e-9),
            commits / fua_writes
        );
    };
    println!(
        "
4K random FUA writes, queue depth {FUA_DEPTH} (in-memory crash disks)"
    );
    run(
        "unprovisioned (each provisions)",
        with_fua(random_4k(3, blocks, true, 1)),
        &mut vol,
    );
    run(
        "provisioned in an earlier commit",
        with_fua(random_4k(5, blocks, true, PASSES)),
        &mut vol,
    );
    // A plain write provisions a fresh block and a FUA write to the same block
    // follows at once: the FUA write waits for the commit that maps the block.
    let pairs = random_ops(7, (blocks, blocks), 8, true, 1)
        .into_iter()
        .zip(with_fua(random_ops(7, (blocks, blocks), 8, true, 1)))
        .flat_map(|(plain, fua)| [plain, fua])
        .collect();
    run("plain + FUA write to the same new block", pairs, &mut vol);
}

/// Work that unmaps a 1,000,000-mapping device in steps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unmap {
    /// `delete` of the device: its blocks are released in the background.
    Delete,
    /// One discard of the whole device through its volume, which a client waits for.
    Discard,
}

/// 4 KiB random reads at queue depth 16 on one volume while a 1,000,000-mapping
/// device of the same pool is deleted in the background (or discarded whole),
/// against the same reads with no such work running. Between polls the loop calls
/// `Pool::service`, as the appliance's main loop does, which takes the paced steps.
fn unmap_while_reading(work: Unmap) {
    const MAPPINGS: u64 = 1_000_000;
    const READ_DEPTH: usize = 16;
    let meta = MemDisk::new(1 << 18);
    let data = MemDisk::new((MAPPINGS + DATA_BLOCKS) * BS);
    {
        let options = persistent_data::thin::OpenOptions::new(BS as u32);
        let (mut md, _) =
            persistent_data::thin::ThinMetadata::open(Box::new(meta.handle()), &options).unwrap();
        md.resize_data(MAPPINGS + DATA_BLOCKS).unwrap();
        md.create_thin(0).unwrap();
        for vblock in 0..MAPPINGS {
            let block = md.alloc_data_block().unwrap();
            md.insert(0, vblock, block).unwrap();
        }
        md.commit().unwrap();
    }
    let config = PoolConfig::new((MAPPINGS + DATA_BLOCKS) * BS, BS as u32);
    let (pool, _) = Pool::open(Box::new(meta.handle()), Box::new(data.handle()), config).unwrap();
    pool.message("create_thin 1").unwrap();
    let mut vol = pool.activate(1, DATA_BLOCKS * BS, None).unwrap();
    flushed(&mut vol, random_4k(13, DATA_BLOCKS / 2, true, 1));
    let epoch = Instant::now();
    let clock = || epoch.elapsed().as_nanos() as u64;
    // Reads until `finished` says so, each completed read's buffer going straight
    // into the next read.
    let mut rng = fastrand::Rng::with_seed(13);
    let mut read = |vol: &mut thin_pool::ThinVolume, finished: &mut dyn FnMut(u64) -> bool| {
        let start = Instant::now();
        let mut reads = 0u64;
        let mut buffers: Vec<IoBuf> = (0..READ_DEPTH).map(|_| IoBuf::with_sectors(8)).collect();
        let mut in_flight = 0;
        loop {
            while let Some(buf) = buffers.pop() {
                let sector = rng.u64(..DATA_BLOCKS / 2 * BS / 8) * 8;
                let command = Command::Read { sector, buf };
                vol.submit(Request { tag: 0, command }).unwrap();
                in_flight += 1;
            }
            while let Some(done) = vol.poll() {
                done.result.unwrap();
                buffers.push(done.buf);
                in_flight -= 1;
                reads += 1;
            }
            pool.service(&clock);
            if finished(reads) {
                break;
            }
        }
        while in_flight > 0 {
            if vol.poll().is_some() {
                in_flight -= 1;
            }
        }
        (
            reads as f64 / start.elapsed().as_secs_f64(),
            start.elapsed(),
        )
    };
    let (idle, _) = read(&mut vol, &mut |reads| reads >= 200_000);
    let (busy, took) = match work {
        Unmap::Delete => {
            pool.message("delete 0").unwrap();
            read(&mut vol, &mut |_| pool.deletes().is_empty())
        }
        Unmap::Discard => {
            let mut big = pool.activate(0, MAPPINGS * BS, None).unwrap();
            let command = Command::Discard {
                sector: 0,
                sectors: MAPPINGS * BS,
            };
            big.submit(Request { tag: 1, command }).unwrap();
            read(&mut vol, &mut |_| big.poll().is_some())
        }
    };
    let what = match work {
        Unmap::Delete => "deleted",
        Unmap::Discard => "discarded whole",
    };
    println!(
        "\n4K random reads, queue depth {READ_DEPTH}, while a 1,000,000-mapping device is {what} (in-memory devices)"
    );
    println!(
        "  alone: {idle:.0} IOPS; meanwhile: {busy:.0} IOPS (ratio {:.2}); the work took {:.2} s",
        busy / idle,
        took.as_secs_f64()
    );
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
            Box::new(|_, sectors| Box::new(filled(MemDisk::new(sectors)))),
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
    if wanted("fua") {
        fua();
    }
    if wanted("delete") {
        unmap_while_reading(Unmap::Delete);
    }
    if wanted("discard") {
        unmap_while_reading(Unmap::Discard);
    }
}
