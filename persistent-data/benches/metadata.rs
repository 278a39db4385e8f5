//! Metadata benchmarks: prints a table of rates and latencies.
//!
//! `cargo bench -p persistent-data` (set `PDATA_BENCH_MAPPINGS` to change the
//! mapping count, default 1,000,000).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockdev::{FileDisk, MemDisk};
use persistent_data::delta_xml::DeltaXml;
use persistent_data::thin::{Delta, OpenOptions, ThinMetadata};

const DATA_BLOCK_SIZE: u32 = 128;

fn open_with(device: Box<dyn blockdev::BlockDevice>, cache_blocks: usize) -> ThinMetadata {
    let mut options = OpenOptions::new(DATA_BLOCK_SIZE);
    options.cache_blocks = cache_blocks;
    ThinMetadata::open(device, &options).unwrap().0
}

fn rate(count: u64, elapsed: Duration) -> String {
    format!("{:.0}/s", count as f64 / elapsed.as_secs_f64())
}

fn row(name: &str, value: String) {
    println!("| {name:<58} | {value:>22} |");
}

/// Maps `count` blocks of device `dev` with fresh data blocks, committing every
/// `commit_every` inserts.
fn fill(md: &mut ThinMetadata, dev: u64, count: u64, commit_every: u64) {
    for v in 0..count {
        let data = md.alloc_data_block().unwrap();
        md.insert(dev, v, data).unwrap();
        if (v + 1) % commit_every == 0 {
            md.commit().unwrap();
        }
    }
    md.commit().unwrap();
}

fn inserts_and_lookups(mappings: u64, cache_blocks: usize) {
    let disk = MemDisk::new(1 << 21);
    let mut md = open_with(Box::new(disk.handle()), cache_blocks);
    md.resize_data(mappings * 2).unwrap();
    md.create_thin(1).unwrap();
    let start = Instant::now();
    fill(&mut md, 1, mappings, 100_000);
    let insert_time = start.elapsed();
    row(
        &format!(
            "insert {mappings} mappings (alloc + insert, cache {} MiB)",
            cache_blocks / 256
        ),
        rate(mappings, insert_time),
    );
    let mut rng = fastrand::Rng::with_seed(7);
    let lookups = 1_000_000;
    let start = Instant::now();
    for _ in 0..lookups {
        let v = rng.u64(..mappings);
        assert!(md.lookup(1, v).unwrap().is_some());
    }
    row("random lookups over them", rate(lookups, start.elapsed()));
    let stats = md.cache_stats();
    row(
        "  cache hit ratio / dirty blocks written early",
        format!(
            "{:.1} % / {}",
            100.0 * stats.hits as f64 / (stats.hits + stats.misses) as f64,
            stats.early_writes
        ),
    );
    // Commit latency: transactions of 1,000 random overwrites each.
    let mut total = Duration::ZERO;
    let rounds = 20;
    for _ in 0..rounds {
        for _ in 0..1000 {
            let v = rng.u64(..mappings);
            let data = md.alloc_data_block().unwrap();
            if let Some(old) = md.insert(1, v, data).unwrap() {
                md.dec_data_block(old).unwrap();
            }
        }
        let start = Instant::now();
        md.commit().unwrap();
        total += start.elapsed();
    }
    row(
        "commit latency (1,000 random overwrites per transaction)",
        format!("{:.2} ms", total.as_secs_f64() * 1000.0 / rounds as f64),
    );
    // What `thin delete` of a fully written volume costs: every data block's count drops.
    let start = Instant::now();
    md.delete(1).unwrap();
    md.commit().unwrap();
    row(
        &format!("delete the {mappings}-mapping device and commit"),
        format!("{:.2} s", start.elapsed().as_secs_f64()),
    );
}

fn snapshot_depth() {
    let disk = MemDisk::new(1 << 19);
    let mut md = open_with(Box::new(disk.handle()), 4096);
    let mappings = 100_000;
    md.resize_data(mappings * 2).unwrap();
    md.create_thin(0).unwrap();
    fill(&mut md, 0, mappings, 100_000);
    let mut rng = fastrand::Rng::with_seed(99);
    for depth in 1..=1000u64 {
        md.create_snap(depth, depth - 1).unwrap();
        for _ in 0..20 {
            let v = rng.u64(..mappings);
            let data = md.alloc_data_block().unwrap();
            if let Some(old) = md.insert(depth, v, data).unwrap() {
                md.dec_data_block(old).unwrap();
            }
        }
        if depth % 100 == 0 {
            md.commit().unwrap();
        }
    }
    md.commit().unwrap();
    let lookups = 500_000;
    for dev in [1u64, 1000] {
        let mut rng = fastrand::Rng::with_seed(5);
        let start = Instant::now();
        for _ in 0..lookups {
            assert!(md.lookup(dev, rng.u64(..mappings)).unwrap().is_some());
        }
        let elapsed = start.elapsed();
        row(
            &format!("lookups on snapshot #{dev} of a 1000-deep chain"),
            format!(
                "{} ({:.2} µs)",
                rate(lookups, elapsed),
                elapsed.as_secs_f64() * 1e6 / lookups as f64
            ),
        );
    }
}

fn build_versus_thin_restore(mappings: u64) {
    host_tools::require(&[host_tools::Tool::ThinCheck]).expect("thin-provisioning-tools");
    let dir = std::env::temp_dir().join(format!("pdata-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ours = dir.join("ours.bin");
    let size = 256 << 20;
    let start = Instant::now();
    let mut md = open_with(Box::new(FileDisk::create(&ours, size).unwrap()), 4096);
    md.resize_data(mappings * 2).unwrap();
    md.create_thin(1).unwrap();
    fill(&mut md, 1, mappings, mappings);
    let ours_time = start.elapsed();
    let xml = dir.join("pool.xml");
    let mut text = String::new();
    md.dump_xml(&mut text).unwrap();
    // Restore from single mappings, as a pool with scattered data would have.
    let expanded = expand_ranges(&text);
    std::fs::write(&xml, expanded).unwrap();
    drop(md);
    let theirs = dir.join("theirs.bin");
    std::fs::File::create(&theirs)
        .unwrap()
        .set_len(size)
        .unwrap();
    let start = Instant::now();
    let status = Command::new("thin_restore")
        .args(["-i", path(&xml), "-o", path(&theirs)])
        .status()
        .unwrap();
    let theirs_time = start.elapsed();
    assert!(status.success());
    row(
        &format!("build {mappings}-mapping metadata: ours (format+insert+commit)"),
        format!("{:.2} s", ours_time.as_secs_f64()),
    );
    row(
        "  thin_restore 0.9.0 from XML (same mappings)",
        format!("{:.2} s", theirs_time.as_secs_f64()),
    );
    row(
        "  ratio thin_restore / ours",
        format!(
            "{:.2}x",
            theirs_time.as_secs_f64() / ours_time.as_secs_f64()
        ),
    );
    let check = Command::new("thin_check")
        .args(["-q", path(&ours)])
        .status()
        .unwrap();
    row(
        "  thin_check of our image",
        (if check.success() { "pass" } else { "FAIL" }).to_string(),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `thin delta` of a device and its snapshot after 1 % of its blocks were rewritten:
/// our walk and XML against `thin_delta` 0.9.0 on the same metadata file.
fn delta_versus_thin_delta(mappings: u64) {
    let dir = std::env::temp_dir().join(format!("pdata-delta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("meta.bin");
    let mut md = open_with(Box::new(FileDisk::create(&file, 256 << 20).unwrap()), 4096);
    md.resize_data(mappings * 2).unwrap();
    md.create_thin(1).unwrap();
    fill(&mut md, 1, mappings, mappings);
    md.create_snap(2, 1).unwrap();
    let mut rng = fastrand::Rng::with_seed(11);
    for _ in 0..mappings / 100 {
        let data = md.alloc_data_block().unwrap();
        if let Some(old) = md.insert(1, rng.u64(..mappings), data).unwrap() {
            md.dec_data_block(old).unwrap();
        }
    }
    md.commit().unwrap();
    let start = Instant::now();
    let source = md.delta_source(2, 1, false).unwrap();
    let mut xml = DeltaXml::new(false);
    let mut ours = String::new();
    xml.begin(&source, 2, 1, &mut ours).unwrap();
    let mut delta = Delta::new(source.left_root, source.right_root, 0);
    let mut pieces = Vec::new();
    while !delta
        .step(&mut md, 16_384, &mut |piece| {
            pieces.push(piece);
            true
        })
        .unwrap()
    {
        for piece in pieces.drain(..) {
            xml.piece(&piece, &mut ours).unwrap();
        }
    }
    for piece in pieces.drain(..) {
        xml.piece(&piece, &mut ours).unwrap();
    }
    xml.finish(&mut ours).unwrap();
    let ours_time = start.elapsed();
    let start = Instant::now();
    let theirs = Command::new("thin_delta")
        .args(["--snap1", "2", "--snap2", "1", path(&file)])
        .output()
        .unwrap();
    let theirs_time = start.elapsed();
    assert!(theirs.status.success());
    let same = String::from_utf8_lossy(&theirs.stdout) == ours;
    row(
        &format!("thin delta of {mappings} mappings and a snapshot, 1 % rewritten"),
        format!("{:.3} s", ours_time.as_secs_f64()),
    );
    row(
        "  thin_delta 0.9.0 on the same metadata file",
        format!("{:.3} s", theirs_time.as_secs_f64()),
    );
    row("  same XML", (if same { "yes" } else { "NO" }).to_string());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Rewrites range mappings as single mappings.
fn expand_ranges(xml: &str) -> String {
    let mut out = String::with_capacity(xml.len() * 4);
    for line in xml.lines() {
        if let Some(rest) = line.trim().strip_prefix("<range_mapping ") {
            let field = |name: &str| -> u64 {
                let at = rest.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                rest[at..].split('"').next().unwrap().parse().unwrap()
            };
            let (origin, data, len, time) = (
                field("origin_begin"),
                field("data_begin"),
                field("length"),
                field("time"),
            );
            for i in 0..len {
                out += &format!(
                    "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"{time}\"/>\n",
                    origin + i,
                    data + i
                );
            }
        } else {
            out += line;
            out.push('\n');
        }
    }
    out
}

fn main() {
    let mappings: u64 = std::env::var("PDATA_BENCH_MAPPINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    println!("| {:<58} | {:>22} |", "persistent-data benchmark", "result");
    println!("|{:-<60}|{:-<24}|", "", "");
    inserts_and_lookups(mappings, 1024);
    inserts_and_lookups(mappings, 4096);
    inserts_and_lookups(mappings, 16384);
    snapshot_depth();
    build_versus_thin_restore(mappings);
    delta_versus_thin_delta(mappings);
}
