//! The delta of two devices against the real `thin_delta` 0.9.0, byte for byte, and
//! pinned views against a model of the mappings they froze.

mod common;

use std::collections::BTreeMap;

use blockdev::MemDisk;
use common::*;
use persistent_data::delta_xml::DeltaXml;
use persistent_data::thin::{Delta, DeltaKind, ThinMetadata};

/// Device id -> virtual block -> data block.
type Pool = BTreeMap<u64, BTreeMap<u64, u64>>;

/// Our XML for `left` against `right`, walked in random small steps.
fn our_delta(
    md: &mut ThinMetadata,
    left: u64,
    right: u64,
    verbose: bool,
    metadata_snap: bool,
    rng: &mut fastrand::Rng,
) -> String {
    let source = md.delta_source(left, right, metadata_snap).unwrap();
    let mut xml = DeltaXml::new(verbose);
    let mut out = String::new();
    xml.begin(&source, left, right, &mut out).unwrap();
    let mut delta = Delta::new(source.left_root, source.right_root, 0);
    loop {
        let budget = rng.u64(0..40);
        let mut pieces = Vec::new();
        let done = delta
            .step(md, budget, &mut |piece| {
                pieces.push(piece);
                true
            })
            .unwrap();
        for piece in pieces {
            xml.piece(&piece, &mut out).unwrap();
        }
        if done {
            break;
        }
    }
    xml.finish(&mut out).unwrap();
    out
}

fn real_delta(path: &std::path::Path, left: u64, right: u64, extra: &[&str]) -> String {
    let (l, r) = (left.to_string(), right.to_string());
    let mut args = extra.to_vec();
    args.extend(["--snap1", &l, "--snap2", &r, path.to_str().unwrap()]);
    let out = run("thin_delta", &args);
    assert_eq!(out.status, 0, "thin_delta {args:?}: {}", out.stderr);
    out.stdout
}

/// Maps `v` in `dev`, giving back the block it replaces.
fn map(md: &mut ThinMetadata, pool: &mut Pool, dev: u64, v: u64) {
    let data = md.alloc_data_block().unwrap();
    if let Some(old) = md.insert(dev, v, data).unwrap() {
        md.dec_data_block(old).unwrap();
    }
    pool.get_mut(&dev).unwrap().insert(v, data);
}

fn unmap(md: &mut ThinMetadata, pool: &mut Pool, dev: u64, begin: u64, end: u64) {
    for run in md.remove_range(dev, begin, end).unwrap() {
        for i in 0..run.len {
            md.dec_data_block(run.data_begin + i).unwrap();
        }
    }
    let gone: Vec<u64> = pool[&dev].range(begin..end).map(|(v, _)| *v).collect();
    for v in gone {
        pool.get_mut(&dev).unwrap().remove(&v);
    }
}

/// Random writes (runs of consecutive blocks, which the allocator places
/// consecutively unless blocks were freed), discards and snapshots.
fn random_changes(md: &mut ThinMetadata, pool: &mut Pool, rng: &mut fastrand::Rng, rounds: u32) {
    for _ in 0..rounds {
        let devs: Vec<u64> = pool.keys().copied().collect();
        let dev = devs[rng.usize(..devs.len())];
        match rng.u32(..10) {
            0..=5 => {
                let start = rng.u64(..3000);
                for v in start..start + rng.u64(1..200) {
                    map(md, pool, dev, v);
                }
            }
            6..=7 => {
                let start = rng.u64(..3000);
                unmap(md, pool, dev, start, start + rng.u64(1..300));
            }
            _ if pool.len() < 6 => {
                let new = pool.keys().max().unwrap() + 1;
                md.create_snap(new, dev).unwrap();
                pool.insert(new, pool[&dev].clone());
            }
            _ => {}
        }
    }
}

fn random_pool(disk: &MemDisk, seed: u64) -> (ThinMetadata, Pool, fastrand::Rng) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut md = open(disk, 256);
    md.resize_data(200_000).unwrap();
    let mut pool = Pool::new();
    md.create_thin(0).unwrap();
    pool.insert(0, BTreeMap::new());
    random_changes(&mut md, &mut pool, &mut rng, 30);
    (md, pool, rng)
}

#[test]
fn xml_equals_thin_delta_on_random_pools() {
    require_tools();
    let scratch = Scratch::new("delta");
    for seed in 1..=4 {
        let disk = MemDisk::new(8 << 11);
        let (mut md, mut pool, mut rng) = random_pool(&disk, seed);
        md.set_transaction_id(0, seed).unwrap();
        md.reserve_metadata_snap().unwrap();
        random_changes(&mut md, &mut pool, &mut rng, 20);
        md.commit().unwrap();
        let path = scratch.path("meta.bin");
        save(&disk, &path);
        let devs: Vec<u64> = pool.keys().copied().collect();
        // Each pair once, in a random form (a run of the tool costs ~40 ms).
        for &left in &devs {
            for &right in &devs {
                let verbose = rng.bool();
                let snap = rng.bool() && md.delta_source(left, right, true).is_ok();
                let mut args: Vec<&str> = Vec::new();
                if verbose {
                    args.push("--verbose");
                }
                if snap {
                    args.push("-m");
                }
                let ours = our_delta(&mut md, left, right, verbose, snap, &mut rng);
                assert_eq!(
                    ours,
                    real_delta(&path, left, right, &args),
                    "seed {seed} {args:?}"
                );
            }
        }
    }
}

/// Every block's class, from the pieces of a walk started at `from`.
fn classes(md: &mut ThinMetadata, left: u64, right: u64, from: u64) -> BTreeMap<u64, DeltaKind> {
    let mut out = BTreeMap::new();
    let mut delta = Delta::new(left, right, from);
    while !delta
        .step(md, 7, &mut |piece| {
            for v in piece.begin..piece.end() {
                out.insert(v, piece.kind);
            }
            true
        })
        .unwrap()
    {}
    out
}

fn model_classes(
    left: &BTreeMap<u64, u64>,
    right: &BTreeMap<u64, u64>,
    from: u64,
) -> BTreeMap<u64, DeltaKind> {
    let mut out = BTreeMap::new();
    for (&v, &l) in left.range(from..) {
        let kind = match right.get(&v) {
            Some(&r) if r == l => DeltaKind::Same,
            Some(_) => DeltaKind::Different,
            None => DeltaKind::LeftOnly,
        };
        out.insert(v, kind);
    }
    for &v in right.range(from..).map(|(v, _)| v) {
        out.entry(v).or_insert(DeltaKind::RightOnly);
    }
    out
}

/// Releases a device being deleted, dropping the references it hands back.
fn release(md: &mut ThinMetadata, id: u64) {
    loop {
        let released = md.release_mappings(id, 100).unwrap();
        if released.mappings == 0 {
            return;
        }
        for run in released.runs {
            for i in 0..run.len {
                md.dec_data_block(run.data_begin + i).unwrap();
            }
        }
    }
}

#[test]
fn views_stay_as_pinned_while_the_pool_changes_and_leave_nothing_behind() {
    require_tools();
    let scratch = Scratch::new("views");
    let disk = MemDisk::new(32 << 11);
    let (mut md, mut pool, mut rng) = random_pool(&disk, 9);
    let devs: Vec<u64> = pool.keys().copied().collect();
    let views: Vec<(u64, u64)> = devs
        .iter()
        .map(|&dev| (dev, md.pin_view(dev).unwrap()))
        .collect();
    let frozen = pool.clone();
    md.commit().unwrap();
    random_changes(&mut md, &mut pool, &mut rng, 40);
    md.delete(devs[0]).unwrap();
    md.commit().unwrap();
    let path = scratch.path("meta.bin");
    save(&disk, &path);
    assert_thin_check(&path, &[]);
    for &(left_dev, left_view) in &views {
        for &(right_dev, right_view) in &views {
            let (l, r) = (
                md.view_root(left_view).unwrap(),
                md.view_root(right_view).unwrap(),
            );
            let from = rng.u64(..2000);
            assert_eq!(
                classes(&mut md, l, r, from),
                model_classes(&frozen[&left_dev], &frozen[&right_dev], from),
                "views of {left_dev} and {right_dev} from {from}"
            );
        }
    }
    // A power cut with views held: the next open finds and unpins them.
    let reopened = load(&path);
    let mut again = open(&reopened, 256);
    let left_behind = again.views().unwrap();
    assert_eq!(
        left_behind,
        views.iter().map(|(_, view)| *view).collect::<Vec<_>>()
    );
    for view in left_behind {
        if let Some(delete) = again.unpin_view(view, 10).unwrap() {
            release(&mut again, delete.id);
        }
    }
    again.commit().unwrap();
    let report = persistent_data::check::check(&mut again).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    // Unpinned in this run: nothing is left either.
    for (_, view) in views {
        if let Some(delete) = md.unpin_view(view, 10).unwrap() {
            release(&mut md, delete.id);
        }
    }
    md.commit().unwrap();
    save(&disk, &path);
    assert_thin_check(&path, &[]);
    let live: Vec<u64> = md.devices().unwrap();
    assert_eq!(
        live,
        pool.keys()
            .copied()
            .filter(|&d| d != devs[0])
            .collect::<Vec<_>>()
    );
    assert!(persistent_data::check::check(&mut md).unwrap().is_clean());
}
