//! A 1,000-deep snapshot chain: writes at random depths, reads at random depths
//! checked against a model, a snapshot deleted from the middle of the chain, a
//! metadata snapshot taken and dumped on the way, and the real `thin_check` and
//! `thin_dump -m` at the end.

mod common;

use std::collections::BTreeMap;

use common::*;

const DEPTH: u64 = 1000;
const PAGES: u64 = 64;
const VOLUME_SECTORS: u64 = PAGES * 8;

/// Page → seed of the pattern it holds (pages not in the map read as zeros).
type Contents = BTreeMap<u64, u64>;

fn check_device(pool: &thin_pool::Pool, dev: u64, model: &Contents) {
    let mut vol = pool.activate(dev, VOLUME_SECTORS, None).unwrap();
    let all = read(&mut vol, 0, VOLUME_SECTORS);
    for (page, chunk) in all.chunks(4096).enumerate() {
        let expected = model
            .get(&(page as u64))
            .map_or_else(|| vec![0; 4096], |&seed| pattern(seed, 4096));
        assert!(chunk == expected, "device {dev} page {page}");
    }
}

#[test]
fn a_thousand_deep_snapshot_chain_reads_back_at_every_depth() {
    require_tools();
    let mut rig = Rig::new(1024, 1 << 15);
    let pool = rig.open();
    let mut rng = fastrand::Rng::with_seed(42);
    let mut models: BTreeMap<u64, Contents> = BTreeMap::new();
    pool.message("create_thin 0").unwrap();
    models.insert(0, Contents::new());
    let mut held_dump = None;
    for dev in 1..=DEPTH {
        // A few writes at random depths of the chain so far.
        if dev % 8 == 0 {
            let target = rng.u64(..dev);
            let page = rng.u64(..PAGES);
            let seed = rng.u64(..);
            let mut vol = pool.activate(target, VOLUME_SECTORS, None).unwrap();
            write(&mut vol, page * 8, &pattern(seed, 4096)).unwrap();
            models.get_mut(&target).unwrap().insert(page, seed);
        }
        pool.message(&format!("create_snap {dev} {}", dev - 1))
            .unwrap();
        let copy = models[&(dev - 1)].clone();
        models.insert(dev, copy);
        if dev == DEPTH / 2 {
            pool.message("reserve_metadata_snap").unwrap();
            let mut xml = String::new();
            pool.dump_xml(&mut xml, true).unwrap();
            held_dump = Some(xml);
        }
    }
    for _ in 0..40 {
        let dev = rng.u64(..=DEPTH);
        check_device(&pool, dev, &models[&dev]);
    }
    // A snapshot from the middle of the chain goes; its neighbours are unchanged.
    pool.message(&format!("delete {}", DEPTH / 3)).unwrap();
    models.remove(&(DEPTH / 3));
    for dev in [DEPTH / 3 - 1, DEPTH / 3 + 1, DEPTH] {
        check_device(&pool, dev, &models[&dev]);
    }
    // The metadata snapshot still dumps as it was when taken.
    let mut xml = String::new();
    pool.dump_xml(&mut xml, true).unwrap();
    assert_eq!(Some(xml), held_dump);
    pool.commit().unwrap();
    drop(pool);
    let image = Scratch::new("deep-chain");
    save(&rig.meta, &image.path("meta"));
    thin_check(&image.path("meta"));
    let devices = thin_dump(&image.path("meta"), &[]);
    assert_eq!(
        devices.len() as u64,
        DEPTH,
        "every device but the deleted one"
    );
    let held = thin_dump(&image.path("meta"), &["-m"]);
    assert_eq!(
        held.len() as u64,
        DEPTH / 2 + 1,
        "the chain as it was half way"
    );
    let pool = rig.open();
    pool.message("release_metadata_snap").unwrap();
    for dev in [0, DEPTH / 2, DEPTH] {
        check_device(&pool, dev, &models[&dev]);
    }
}
