//! Merging thin snapshots into their origins: up a chain of more than a hundred
//! snapshots with siblings, checked against a model of every device's blocks and
//! sharing (and with thin_check and thin_ls); with the origin active and requests
//! in flight; and with the power failing at every device I/O of the merge.

mod common;

use std::collections::BTreeMap;

use blockdev::{CrashDisk, MemDisk, Unflushed};
use common::*;
use persistent_data::thin::{OpenOptions, ThinMetadata};
use thin_pool::{Errno, Pool, PoolEvent, ThinVolume};

const MILLISECOND: u64 = 1_000_000;
/// Blocks of every volume of the chain test.
const BLOCKS: u64 = 16;
const LEVELS: u64 = 120;
/// Ids of sibling snapshots: this plus the level they branch off.
const SIBLINGS: u64 = 1000;

/// One block as the model sees it: the seed of its pattern (its content) and a
/// token (equal tokens at the same block of two devices: one shared data block).
type Block = Option<(u64, u64)>;

#[derive(Default)]
struct Model {
    devs: BTreeMap<u64, Vec<Block>>,
    next_token: u64,
}

impl Model {
    fn shared(&self, dev: u64, block: usize) -> bool {
        let Some((_, token)) = self.devs[&dev][block] else {
            return false;
        };
        self.devs
            .iter()
            .any(|(&other, blocks)| other != dev && blocks[block].is_some_and(|b| b.1 == token))
    }

    /// A whole-block write: in place when the block is the device's alone, else into
    /// a new block.
    fn write(&mut self, dev: u64, block: usize, seed: u64) {
        let token = match self.devs[&dev][block] {
            Some((_, token)) if !self.shared(dev, block) => token,
            _ => {
                self.next_token += 1;
                self.next_token
            }
        };
        self.devs.get_mut(&dev).unwrap()[block] = Some((seed, token));
    }

    fn expected(&self, dev: u64) -> Vec<u8> {
        self.devs[&dev]
            .iter()
            .flat_map(|block| match block {
                Some((seed, _)) => pattern(*seed, (BS * 512) as usize),
                None => vec![0; (BS * 512) as usize],
            })
            .collect()
    }

    /// (mapped, exclusive, shared) per device, as thin_ls counts them.
    fn usage(&self) -> BTreeMap<u64, (u64, u64, u64)> {
        self.devs
            .iter()
            .map(|(&dev, blocks)| {
                let mapped = blocks.iter().flatten().count() as u64;
                let shared = (0..blocks.len()).filter(|&b| self.shared(dev, b)).count() as u64;
                (dev, (mapped, mapped - shared, shared))
            })
            .collect()
    }
}

struct Chain {
    rig: Rig,
    pool: Pool,
    model: Model,
    rng: fastrand::Rng,
    scratch: Scratch,
}

impl Chain {
    fn volume(&self, dev: u64) -> ThinVolume {
        self.pool.activate(dev, BLOCKS * BS, None).unwrap()
    }

    fn write(&mut self, volume: &mut ThinVolume, block: u64) {
        let seed = self.rng.u64(..);
        write(volume, block * BS, &pattern(seed, (BS * 512) as usize)).unwrap();
        self.model.write(volume.dev_id(), block as usize, seed);
    }

    fn snapshot(&mut self, dev: u64, origin: u64) {
        self.pool
            .message(&format!("create_snap {dev} {origin}"))
            .unwrap();
        let blocks = self.model.devs[&origin].clone();
        self.model.devs.insert(dev, blocks);
    }

    fn verify(&self, volume: &mut ThinVolume) {
        let dev = volume.dev_id();
        assert!(
            read(volume, 0, BLOCKS * BS) == self.model.expected(dev),
            "device {dev} differs from the model"
        );
    }

    /// Commits; thin_check, then thin_ls and the pool's own usage against the model.
    fn checkpoint(&mut self) {
        self.pool.commit().unwrap();
        let image = self.scratch.path("meta");
        save(&self.rig.meta, &image);
        thin_check(&image);
        let expected = self.model.usage();
        assert_eq!(thin_ls(&image, &[]), expected, "thin_ls");
        let ours: BTreeMap<u64, (u64, u64, u64)> = self
            .pool
            .usage()
            .unwrap()
            .into_iter()
            .map(|u| (u.dev, (u.mapped, u.exclusive, u.shared)))
            .collect();
        assert_eq!(ours, expected, "Pool::usage");
    }
}

/// A chain of 120 snapshots, each changing two blocks of its origin, with a sibling
/// snapshot every tenth level; then each level is merged into the one below it, from
/// the top, with the target active (and written after the merge, and snapshotted
/// once halfway), until device 0 holds the top's content. Siblings keep theirs.
#[test]
fn merging_down_a_chain_of_120_snapshots_keeps_content_and_sharing() {
    require_tools();
    let mut rig = Rig::new(2048, 1 << 14);
    let pool = rig.open();
    let mut chain = Chain {
        rig,
        pool,
        model: Model::default(),
        rng: fastrand::Rng::with_seed(12),
        scratch: Scratch::new("merge-chain"),
    };
    chain.pool.message("create_thin 0").unwrap();
    chain.model.devs.insert(0, vec![None; BLOCKS as usize]);
    let mut base = chain.volume(0);
    for block in 0..BLOCKS {
        chain.write(&mut base, block);
    }
    drop(base);
    for level in 1..=LEVELS {
        chain.snapshot(level, level - 1);
        let mut volume = chain.volume(level);
        for _ in 0..2 {
            let block = chain.rng.u64(..BLOCKS);
            chain.write(&mut volume, block);
        }
        if level % 10 == 0 {
            chain.snapshot(SIBLINGS + level, level - 1);
            let mut sibling = chain.volume(SIBLINGS + level);
            let block = chain.rng.u64(..BLOCKS);
            chain.write(&mut sibling, block);
        }
    }
    chain.checkpoint();

    let later_snapshot = 5000;
    for level in (1..=LEVELS).rev() {
        let target = level - 1;
        let mut volume = chain.volume(target);
        chain.pool.merge_snapshot(level, target).unwrap();
        let merged = chain.model.devs.remove(&level).unwrap();
        chain.model.devs.insert(target, merged);
        chain.verify(&mut volume);
        if level == LEVELS / 2 {
            chain.snapshot(later_snapshot, target);
        }
        let block = chain.rng.u64(..BLOCKS);
        chain.write(&mut volume, block);
        chain.verify(&mut volume);
        if level % 20 == 0 {
            chain.checkpoint();
        }
    }
    chain.checkpoint();
    let devices: Vec<u64> = chain.model.devs.keys().copied().collect();
    assert_eq!(chain.pool.devices().unwrap(), devices);
    assert_eq!(devices.len(), 1 + (LEVELS / 10) as usize + 1);
    for dev in devices {
        let mut volume = chain.volume(dev);
        chain.verify(&mut volume);
    }
}

/// Refusals change nothing: an active snapshot, a device merged into itself, ids
/// that do not exist.
#[test]
fn refused_merges_change_nothing() {
    let mut rig = Rig::new(64, 1 << 12);
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    let mut origin = pool.activate(0, 8 * BS, None).unwrap();
    write(&mut origin, 0, &[1; 512]).unwrap();
    pool.message("create_snap 1 0").unwrap();
    let mut snap = pool.activate(1, 8 * BS, None).unwrap();
    write(&mut snap, 0, &[2; 512]).unwrap();
    let refusals = [
        (1, 0, Errno::Ebusy),
        (0, 0, Errno::Einval),
        (7, 0, Errno::Enodata),
    ];
    for (from, into, errno) in refusals {
        let error = pool.merge_snapshot(from, into).unwrap_err();
        assert_eq!(error.errno, errno, "{error}");
    }
    assert_eq!(pool.devices().unwrap(), vec![0, 1]);
    assert_eq!(read(&mut origin, 0, 1), vec![1; 512]);
    assert_eq!(read(&mut snap, 0, 1), vec![2; 512]);
    drop(snap);
    pool.merge_snapshot(1, 0).unwrap();
    assert_eq!(read(&mut origin, 0, 1), vec![2; 512]);
}

/// Requests submitted to the origin before the merge finish first (the merge waits
/// for them); from the moment it returns, the origin reads the snapshot's content.
#[test]
fn requests_in_flight_on_the_origin_finish_before_the_merge() {
    let mut rig = Rig::new(256, 1 << 12);
    let pool = rig.open();
    pool.message("create_thin 0").unwrap();
    let mut origin = pool.activate(0, 32 * BS, None).unwrap();
    for block in 0..32 {
        write(
            &mut origin,
            block * BS,
            &pattern(block, (BS * 512) as usize),
        )
        .unwrap();
    }
    pool.message("create_snap 1 0").unwrap();
    let mut snap = pool.activate(1, 32 * BS, None).unwrap();
    for block in (0..32).step_by(3) {
        write(&mut snap, block * BS, &pattern(100 + block, 512)).unwrap();
    }
    let expected = read(&mut snap, 0, 32 * BS);
    drop(snap);
    for tag in 0..16u64 {
        submit_write(
            &mut origin,
            tag,
            tag * 2 * BS + 5,
            &pattern(200 + tag, 4096),
        );
    }
    pool.merge_snapshot(1, 0).unwrap();
    complete_ok(&mut origin, 16);
    assert!(read(&mut origin, 0, 32 * BS) == expected);
    assert_eq!(pool.devices().unwrap(), vec![0]);
    // Only the snapshot's blocks are left in use.
    pool.commit().unwrap();
    assert_eq!(pool.status().data_used, 32);
}

/// Device 0 maps `MAPPINGS` blocks (so its old content is released in the
/// background), snapshot 1 and sibling 2 branch off it, and 0 and 1 then change a
/// few blocks each. Returns the prepared disks and config.
fn crash_disks() -> (MemDisk, MemDisk, thin_pool::PoolConfig) {
    let (meta, data, config) = pool_disks(1 << 14, MAPPINGS, 64);
    let (pool, _) = Pool::open(
        Box::new(meta.handle()),
        Box::new(data.handle()),
        config.clone(),
    )
    .unwrap();
    let mut origin = pool.activate(0, MAPPINGS * BS, None).unwrap();
    for &(block, seed) in &BEFORE {
        write(&mut origin, block * BS, &pattern(seed, 512)).unwrap();
    }
    pool.message("create_snap 1 0").unwrap();
    pool.message("create_snap 2 0").unwrap();
    let mut snap = pool.activate(1, MAPPINGS * BS, None).unwrap();
    for &(block, seed) in &SNAP_WRITES {
        write(&mut snap, block * BS, &pattern(seed, 512)).unwrap();
    }
    for &(block, seed) in &ORIGIN_WRITES {
        write(&mut origin, block * BS, &pattern(seed, 512)).unwrap();
    }
    drop((origin, snap));
    pool.close().map_err(|(_, e)| e).unwrap();
    (meta, data, config)
}

const MAPPINGS: u64 = 6000;
const BEFORE: [(u64, u64); 3] = [(0, 1), (10, 2), (5999, 3)];
const SNAP_WRITES: [(u64, u64); 2] = [(10, 4), (20, 5)];
const ORIGIN_WRITES: [(u64, u64); 2] = [(0, 6), (30, 7)];

/// The first sector of the blocks the test wrote, as device `dev` should read them
/// (`merged`: after the merge).
fn expected_sectors(dev: u64, merged: bool) -> Vec<(u64, Vec<u8>)> {
    let mut content: BTreeMap<u64, u64> = BEFORE.iter().copied().collect();
    let writes: &[(u64, u64)] = match (dev, merged) {
        (0, false) => &ORIGIN_WRITES,
        (0, true) | (1, _) => &SNAP_WRITES,
        _ => &[],
    };
    content.extend(writes.iter().copied());
    [0, 10, 20, 30, 5999]
        .iter()
        .map(|&block| {
            let sector = match content.get(&block) {
                Some(&seed) => pattern(seed, 512),
                None => vec![0; 512],
            };
            (block, sector)
        })
        .collect()
}

fn reads_as(volume: &mut ThinVolume, expected: &[(u64, Vec<u8>)]) -> bool {
    expected
        .iter()
        .all(|(block, sector)| read(volume, block * BS, 1) == *sector)
}

/// One merge of 1 into 0 from the prepared disks with the origin active, the power
/// failing at device I/O `cut`. Returns the disks, the I/O count when the merge
/// began and when it ended, and whether the merge was acknowledged.
fn merge_run(
    meta: &MemDisk,
    data: &MemDisk,
    config: &thin_pool::PoolConfig,
    cut: Option<u64>,
) -> (CrashDisk, CrashDisk, u64, u64, bool) {
    let (meta, data, pool) = open_on_crash_disks(meta, data, config);
    let origin = pool.activate(0, MAPPINGS * BS, None).unwrap();
    let start = meta.operations();
    meta.fail_at(cut.map(|cut| start + cut));
    let merged = pool.merge_snapshot(1, 0).is_ok();
    let end = meta.operations();
    drop(origin);
    drop(pool);
    (meta, data, start, end, merged)
}

/// A power cut at every device I/O of a merge (unflushed writes dropped, or a random
/// part kept): thin_check passes, and the reopened pool has either both devices as
/// they were or the merged origin, which then releases its old blocks. The sibling
/// never changes.
#[test]
fn a_power_cut_at_any_io_of_a_merge_leaves_the_old_or_the_merged_state() {
    require_tools();
    let (meta, data, config) = crash_disks();
    let (_, _, start, end, merged) = merge_run(&meta, &data, &config, None);
    assert!(merged);
    let ios = end - start;
    assert!(ios >= 4, "only {ios} I/Os");
    eprintln!("a merge of a {MAPPINGS}-mapping origin: {ios} device I/Os, each one cut");
    let mut outcomes = [0; 2];
    for cut in 0..=ios {
        let (cut_meta, cut_data, _, _, acknowledged) = merge_run(&meta, &data, &config, Some(cut));
        for unflushed in [Unflushed::DropAll, Unflushed::Random(cut)] {
            let (meta, _data, pool) =
                reopen_after_cut(&cut_meta, &cut_data, unflushed, &config, cut, "merge-cut");
            let devices = pool.devices().unwrap();
            let done = devices == [0, 2];
            assert!(
                done || devices == [0, 1, 2],
                "cut at I/O {cut}: devices {devices:?}"
            );
            assert!(
                done || !acknowledged,
                "cut at I/O {cut}: acknowledged merge lost"
            );
            outcomes[usize::from(done)] += 1;
            let mut now = 0;
            while !pool.deletes().is_empty() {
                now += 400 * MILLISECOND;
                pool.service(&|| now);
            }
            let mut expected_devices = vec![(0, expected_sectors(0, done))];
            if !done {
                expected_devices.push((1, expected_sectors(1, false)));
            }
            expected_devices.push((2, expected_sectors(2, false)));
            for (dev, expected) in expected_devices {
                let mut volume = pool.activate(dev, MAPPINGS * BS, None).unwrap();
                assert!(
                    reads_as(&mut volume, &expected),
                    "cut at I/O {cut}: device {dev} reads wrong data"
                );
            }
            pool.commit().unwrap();
            drop(pool);
            thin_check_disk(&meta, "merge-after");
        }
    }
    assert!(
        outcomes[0] > 0 && outcomes[1] > 0,
        "outcomes (old, merged): {outcomes:?}"
    );
}

/// The old content of a large origin is released in the background, and the event
/// says so.
#[test]
fn a_large_old_content_is_released_in_the_background() {
    let (meta, data, config) = crash_disks();
    let (pool, _) = Pool::open(Box::new(meta.handle()), Box::new(data.handle()), config).unwrap();
    let mut origin = pool.activate(0, MAPPINGS * BS, None).unwrap();
    pool.merge_snapshot(1, 0).unwrap();
    assert!(reads_as(&mut origin, &expected_sectors(0, true)));
    let pending = pool.deletes();
    assert_eq!(pending.len(), 1);
    assert_eq!((pending[0].dev, pending[0].total), (0, MAPPINGS));
    let mut now = 0;
    while !pool.deletes().is_empty() {
        now += 400 * MILLISECOND;
        pool.service(&|| now);
    }
    let events: Vec<PoolEvent> = std::iter::from_fn(|| pool.next_event()).collect();
    assert_eq!(events, vec![PoolEvent::MergeReleased { dev: 0 }]);
    pool.commit().unwrap();
    // The merged origin and the sibling share all but the snapshot's two blocks.
    assert_eq!(pool.status().data_used, MAPPINGS + 2);
    let (mut md, _) = {
        drop(origin);
        pool.close().map_err(|(_, e)| e).unwrap();
        ThinMetadata::open(Box::new(meta.handle()), &OpenOptions::new(BS as u32)).unwrap()
    };
    assert_eq!(md.mapped_blocks(0).unwrap(), MAPPINGS);
    assert!(md.pending_deletes().unwrap().is_empty());
}
