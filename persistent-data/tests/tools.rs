//! Compatibility with the real thin-provisioning-tools (0.9.0).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use blockdev::MemDisk;
use common::*;
use persistent_data::Error;
use persistent_data::thin::ThinMetadata;

#[test]
fn simple_pool_passes_thin_check_and_dumps() {
    require_tools();
    let scratch = Scratch::new("simple");
    let disk = MemDisk::new(8 << 11);
    let mut md = open(&disk, 256);
    md.resize_data(1000).unwrap();
    md.create_thin(1).unwrap();
    for v in [0u64, 1, 2, 100, 101] {
        let b = md.alloc_data_block().unwrap();
        assert_eq!(md.insert(1, v, b).unwrap(), None);
    }
    md.create_snap(2, 1).unwrap();
    md.set_transaction_id(0, 7).unwrap();
    md.commit().unwrap();
    let path = scratch.path("meta.bin");
    save(&disk, &path);
    assert_thin_check(&path, &[]);
    let dump = thin_dump(&path, &[]);
    assert_eq!(dump, our_dump(&mut md));
    assert_eq!(dump.devices.len(), 2);
    assert_eq!(dump.devices[&2].mappings.len(), 5);
}

#[test]
fn our_checker_agrees_on_simple_pool() {
    let disk = MemDisk::new(8 << 11);
    let mut md = open(&disk, 256);
    md.resize_data(1000).unwrap();
    md.create_thin(1).unwrap();
    for v in 0..1000u64 {
        let b = md.alloc_data_block().unwrap();
        md.insert(1, v * 3, b).unwrap();
    }
    md.create_snap(2, 1).unwrap();
    md.create_snap(3, 1).unwrap();
    md.create_snap(4, 2).unwrap();
    md.commit().unwrap();
    let report = persistent_data::check::check(&mut md).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
}

#[test]
fn metadata_snapshot_counts() {
    let disk = MemDisk::new(8 << 11);
    let mut md = open(&disk, 256);
    md.resize_data(1000).unwrap();
    md.create_thin(1).unwrap();
    md.commit().unwrap();
    md.reserve_metadata_snap().unwrap();
    md.commit().unwrap();
    let report = persistent_data::check::check(&mut md).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
}

/// Device id -> virtual block -> (data block, time).
type Pool = BTreeMap<u64, BTreeMap<u64, (u64, u32)>>;

fn map(md: &mut ThinMetadata, pool: &mut Pool, dev: u64, v: u64) {
    let data = md.alloc_data_block().unwrap();
    if let Some(old) = md.insert(dev, v, data).unwrap() {
        md.dec_data_block(old).unwrap();
    }
    pool.get_mut(&dev).unwrap().insert(v, (data, md.time()));
}

fn expected_mappings(dump: &XmlDump) -> Pool {
    dump.devices
        .iter()
        .map(|(&id, d)| (id, d.mappings.clone()))
        .collect()
}

/// thin_ls: (mapped, exclusive, shared) per device, computed from the mappings.
fn ls_model(pool: &Pool) -> BTreeMap<u64, (u64, u64, u64)> {
    let mut users: BTreeMap<u64, u64> = BTreeMap::new();
    for mappings in pool.values() {
        for (data, _) in mappings.values() {
            *users.entry(*data).or_default() += 1;
        }
    }
    pool.iter()
        .map(|(&dev, mappings)| {
            let shared = mappings.values().filter(|(d, _)| users[d] > 1).count() as u64;
            let mapped = mappings.len() as u64;
            (dev, (mapped, mapped - shared, shared))
        })
        .collect()
}

fn thin_ls(path: &std::path::Path) -> BTreeMap<u64, (u64, u64, u64)> {
    let out = run(
        "thin_ls",
        &[
            "-o",
            "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS",
            path.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status, 0, "thin_ls: {}", out.stderr);
    out.stdout
        .lines()
        .skip(1)
        .map(|line| {
            let f: Vec<u64> = line
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect();
            (f[0], (f[1], f[2], f[3]))
        })
        .collect()
}

/// thin_delta's classification of every virtual block.
fn delta_model(
    left: &BTreeMap<u64, (u64, u32)>,
    right: &BTreeMap<u64, (u64, u32)>,
) -> BTreeMap<u64, &'static str> {
    let keys: BTreeSet<u64> = left.keys().chain(right.keys()).copied().collect();
    keys.into_iter()
        .map(|v| {
            let class = match (left.get(&v), right.get(&v)) {
                (Some(a), Some(b)) if a.0 == b.0 => "same",
                (Some(_), Some(_)) => "different",
                (Some(_), None) => "left_only",
                _ => "right_only",
            };
            (v, class)
        })
        .collect()
}

fn thin_delta(path: &std::path::Path, left: u64, right: u64) -> BTreeMap<u64, &'static str> {
    let out = run(
        "thin_delta",
        &[
            "--thin1",
            &left.to_string(),
            "--thin2",
            &right.to_string(),
            path.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status, 0, "thin_delta: {}", out.stderr);
    let doc = roxmltree::Document::parse(&out.stdout).unwrap();
    let mut classes = BTreeMap::new();
    for node in doc
        .descendants()
        .filter(|n| n.is_element() && n.has_attribute("length"))
    {
        let class = match node.tag_name().name() {
            "same" => "same",
            "different" => "different",
            "left_only" => "left_only",
            "right_only" => "right_only",
            other => panic!("unexpected thin_delta element {other}"),
        };
        let begin: u64 = node.attribute("begin").unwrap().parse().unwrap();
        let len: u64 = node.attribute("length").unwrap().parse().unwrap();
        for v in begin..begin + len {
            classes.insert(v, class);
        }
    }
    classes
}

#[test]
fn large_pool_with_snapshots_matches_every_tool() {
    require_tools();
    let scratch = Scratch::new("large");
    let disk = MemDisk::new(64 << 11);
    let mut md = open(&disk, 1024);
    md.resize_data(400_000).unwrap();
    let mut pool = Pool::new();
    md.create_thin(1).unwrap();
    pool.insert(1, BTreeMap::new());
    for v in 0..110_000u64 {
        map(&mut md, &mut pool, 1, v * 2 + (v % 7) / 3);
    }
    md.commit().unwrap();
    md.create_snap(2, 1).unwrap();
    pool.insert(2, pool[&1].clone());
    for v in (0..220_000u64).step_by(97) {
        map(&mut md, &mut pool, 2, v);
    }
    for v in (5..220_000u64).step_by(1013) {
        map(&mut md, &mut pool, 1, v);
    }
    md.create_thin(3).unwrap();
    pool.insert(3, BTreeMap::new());
    for v in 0..3000u64 {
        map(&mut md, &mut pool, 3, 1_000_000 + v * 5);
    }
    md.create_snap(4, 2).unwrap();
    pool.insert(4, pool[&2].clone());
    md.set_transaction_id(0, 42).unwrap();
    md.commit().unwrap();
    md.reserve_metadata_snap().unwrap();
    md.commit().unwrap();
    let frozen = pool.clone();
    // Change the live trees after the snapshot.
    for run in md.remove_range(4, 10_000, 60_000).unwrap() {
        for i in 0..run.len {
            md.dec_data_block(run.data_begin + i).unwrap();
        }
    }
    let removed: Vec<u64> = pool[&4].range(10_000..60_000).map(|(v, _)| *v).collect();
    for v in removed {
        pool.get_mut(&4).unwrap().remove(&v);
    }
    for v in (100_000..150_000u64).step_by(3) {
        map(&mut md, &mut pool, 1, v);
    }
    md.delete(3).unwrap();
    pool.remove(&3);
    md.commit().unwrap();

    let path = scratch.path("large.bin");
    save(&disk, &path);
    assert_thin_check(&path, &[]);
    let dump = thin_dump(&path, &[]);
    assert_eq!(expected_mappings(&dump), pool);
    assert_eq!(dump.transaction, 42);
    for (dev, d) in &dump.devices {
        assert_eq!(d.mapped_blocks, pool[dev].len() as u64);
    }
    let snap = thin_dump(&path, &["-m"]);
    assert_eq!(expected_mappings(&snap), frozen);
    assert_eq!(snap.nr_data_blocks, 0);
    assert_eq!(thin_ls(&path), ls_model(&pool));
    assert_eq!(thin_delta(&path, 1, 2), delta_model(&pool[&1], &pool[&2]));
    assert_eq!(thin_delta(&path, 2, 4), delta_model(&pool[&2], &pool[&4]));
    let report = persistent_data::check::check(&mut md).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
    assert!(report.mappings > 300_000);

    // Releasing the snapshot frees what only it held.
    md.release_metadata_snap().unwrap();
    md.commit().unwrap();
    save(&disk, &path);
    assert_thin_check(&path, &[]);
    let used: BTreeSet<u64> = pool
        .values()
        .flat_map(|m| m.values().map(|(d, _)| *d))
        .collect();
    assert_eq!(
        md.data_nr_blocks() - md.data_free_blocks(),
        used.len() as u64
    );
}

fn pool_xml(pool: &Pool, nr_data_blocks: u64) -> String {
    let mut xml = format!(
        "<superblock uuid=\"\" time=\"5\" transaction=\"9\" flags=\"0\" version=\"2\" data_block_size=\"{DATA_BLOCK_SIZE}\" nr_data_blocks=\"{nr_data_blocks}\">\n"
    );
    for (dev, mappings) in pool {
        xml += &format!(
            "  <device dev_id=\"{dev}\" mapped_blocks=\"{}\" transaction=\"3\" creation_time=\"1\" snap_time=\"4\">\n",
            mappings.len()
        );
        for (v, (d, t)) in mappings {
            xml += &format!(
                "    <single_mapping origin_block=\"{v}\" data_block=\"{d}\" time=\"{t}\"/>\n"
            );
        }
        xml += "  </device>\n";
    }
    xml + "</superblock>\n"
}

#[test]
fn we_open_and_modify_what_thin_restore_writes() {
    require_tools();
    let scratch = Scratch::new("restore");
    let mut pool = Pool::new();
    let mut next_data = 0;
    for dev in [0u64, 7, 100] {
        let mut mappings = BTreeMap::new();
        for i in 0..(dev + 1) * 300 {
            mappings.insert(i * 3 + dev, (next_data, (i % 5) as u32));
            next_data += 1;
        }
        pool.insert(dev, mappings);
    }
    // Two devices mapping the same data blocks (as after broken-out snapshots).
    pool.insert(8, pool[&7].clone());
    let xml_path = scratch.path("in.xml");
    std::fs::write(&xml_path, pool_xml(&pool, 200_000)).unwrap();
    let path = scratch.path("restored.bin");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let out = run(
        "thin_restore",
        &[
            "-i",
            xml_path.to_str().unwrap(),
            "-o",
            path.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status, 0, "thin_restore: {}", out.stderr);

    let disk = load(&path);
    let mut options = persistent_data::OpenOptions::new(DATA_BLOCK_SIZE);
    options.format = persistent_data::FormatPolicy::Never;
    let (mut md, report) = ThinMetadata::open(Box::new(disk.handle()), &options).unwrap();
    assert!(!report.formatted);
    assert_eq!(md.transaction_id(), 9);
    assert_eq!(md.time(), 5);
    for (dev, mappings) in &pool {
        for (v, (d, t)) in mappings {
            let m = md.lookup(*dev, *v).unwrap().unwrap();
            assert_eq!((m.data_block, m.time, m.shared), (*d, *t, 4 > *t));
        }
        assert_eq!(md.lookup(*dev, 1_000_000).unwrap(), None);
    }
    assert_eq!(expected_mappings(&our_dump(&mut md)), pool);
    assert_eq!(md.data_block_count(pool[&7][&7].0).unwrap(), 2);

    // Modify and check again.
    for v in 0..500 {
        map(&mut md, &mut pool, 0, 5_000 + v);
    }
    md.create_snap(9, 100).unwrap();
    pool.insert(9, pool[&100].clone());
    for v in 0..200 {
        map(&mut md, &mut pool, 9, v * 3 + 100);
    }
    md.delete(7).unwrap();
    pool.remove(&7);
    md.commit().unwrap();
    save(&disk, &path);
    assert_thin_check(&path, &[]);
    assert_eq!(expected_mappings(&thin_dump(&path, &[])), pool);
    let report = persistent_data::check::check(&mut md).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
}

#[test]
fn corrupt_node_is_reported_by_us_and_by_thin_check() {
    require_tools();
    let scratch = Scratch::new("corrupt");
    let disk = MemDisk::new(16 << 11);
    let mut md = open(&disk, 256);
    md.resize_data(10_000).unwrap();
    md.create_thin(1).unwrap();
    let mut pool = Pool::new();
    pool.insert(1, BTreeMap::new());
    for v in 0..2000 {
        map(&mut md, &mut pool, 1, v);
    }
    md.commit().unwrap();
    drop(md);
    // Follow block 0 -> top-level leaf -> device 1's bottom root -> its first child.
    let read_block = |b: u64| {
        let mut block = vec![0u8; 4096];
        disk.read_at(b * 4096, &mut block);
        block
    };
    let le = |bytes: &[u8], at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    let top = read_block(le(&read_block(0), 0x140));
    let bottom_root = le(&top, 32 + 252 * 8);
    let root = read_block(bottom_root);
    assert_eq!(root[4], 1, "2000 mappings make an internal root");
    let leaf = le(&root, 32 + 252 * 8);
    disk.write_at(leaf * 4096 + 100, &[0xde, 0xad]);

    let mut md = open(&disk, 256);
    let error = md.lookup(1, 0).unwrap_err();
    assert!(
        matches!(error, Error::BadBlock { block, .. } if block == leaf),
        "got {error}"
    );
    assert!(
        error.to_string().contains(&format!("block {leaf}")),
        "{error}"
    );
    let report = persistent_data::check::check(&mut md).unwrap();
    assert!(!report.is_clean());
    let path = scratch.path("corrupt.bin");
    save(&disk, &path);
    let out = run("thin_check", &[path.to_str().unwrap()]);
    assert_ne!(out.status, 0, "thin_check accepted a corrupt node");
}
