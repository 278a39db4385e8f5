//! Model-based test: random operation sequences against an in-memory reference,
//! comparing every lookup, range lookup and full iteration, with commits, aborts,
//! reopens and metadata snapshots, and full consistency checks along the way
//! (our checker every commit, the real thin_check every few commits).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use blockdev::MemDisk;
use common::*;
use persistent_data::thin::{Run, ThinMetadata};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Dev {
    mappings: BTreeMap<u64, (u64, u32)>,
    transaction: u64,
    creation_time: u32,
    snap_time: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    devices: BTreeMap<u64, Dev>,
    time: u32,
    transaction: u64,
}

impl Model {
    fn referenced(&self) -> BTreeSet<u64> {
        self.devices
            .values()
            .flat_map(|d| d.mappings.values().map(|(b, _)| *b))
            .collect()
    }

    fn as_dump(&self, nr_data_blocks: u64) -> XmlDump {
        XmlDump {
            time: self.time,
            transaction: self.transaction,
            flags: 0,
            data_block_size: DATA_BLOCK_SIZE,
            nr_data_blocks,
            devices: self
                .devices
                .iter()
                .map(|(&id, d)| {
                    (
                        id,
                        XmlDevice {
                            mapped_blocks: d.mappings.len() as u64,
                            transaction: d.transaction,
                            creation_time: d.creation_time,
                            snap_time: d.snap_time,
                            mappings: d.mappings.clone(),
                        },
                    )
                })
                .collect(),
        }
    }
}

struct Harness {
    disk: MemDisk,
    md: ThinMetadata,
    model: Model,
    committed: Model,
    /// The model as of the held metadata snapshot.
    snapshot: Option<Model>,
    committed_snapshot: Option<Model>,
    cache_blocks: usize,
    nr_data_blocks: u64,
    committed_nr_data_blocks: u64,
    rng: fastrand::Rng,
    key_space: u64,
}

impl Harness {
    fn new(seed: u64, cache_blocks: usize, metadata_mib: u64) -> Self {
        let disk = MemDisk::new(metadata_mib << 11);
        let mut md = open(&disk, cache_blocks);
        let mut rng = fastrand::Rng::with_seed(seed);
        let nr_data_blocks = 20_000 + rng.u64(..20_000);
        md.resize_data(nr_data_blocks).unwrap();
        md.commit().unwrap();
        let key_space = [300, 3_000, 30_000][rng.u64(..3) as usize];
        Harness {
            disk,
            md,
            model: Model::default(),
            committed: Model::default(),
            snapshot: None,
            committed_snapshot: None,
            cache_blocks,
            nr_data_blocks,
            committed_nr_data_blocks: nr_data_blocks,
            rng,
            key_space,
        }
    }

    fn pick_dev(&mut self) -> Option<u64> {
        let ids: Vec<u64> = self.model.devices.keys().copied().collect();
        (!ids.is_empty()).then(|| ids[self.rng.u64(..ids.len() as u64) as usize])
    }

    fn free_id(&mut self) -> Option<u64> {
        if self.model.devices.len() >= 30 {
            return None;
        }
        loop {
            let id = self.rng.u64(..40);
            if !self.model.devices.contains_key(&id) {
                return Some(id);
            }
        }
    }

    fn insert(&mut self, dev: u64, v: u64) {
        let data = match self.md.alloc_data_block() {
            Ok(data) => data,
            Err(persistent_data::Error::NoDataSpace) => return,
            Err(e) => panic!("alloc: {e}"),
        };
        let old = self.md.insert(dev, v, data).unwrap();
        let time = self.model.time;
        let previous = self
            .model
            .devices
            .get_mut(&dev)
            .unwrap()
            .mappings
            .insert(v, (data, time));
        assert_eq!(old, previous.map(|(b, _)| b));
        if let Some(old) = old {
            self.md.dec_data_block(old).unwrap();
        }
    }

    fn step(&mut self) {
        let roll = self.rng.u64(..1000);
        match roll {
            0..=399 => {
                if let Some(dev) = self.pick_dev() {
                    let base = self.rng.u64(..self.key_space);
                    let burst = if self.rng.u64(..100) < 10 { 300 } else { 8 };
                    let n = 1 + self.rng.u64(..burst);
                    for v in base..base + n {
                        self.insert(dev, v);
                    }
                }
            }
            400..=519 => {
                if let Some(dev) = self.pick_dev() {
                    let v = self.rng.u64(..self.key_space);
                    let got = self.md.remove(dev, v).unwrap();
                    let want = self
                        .model
                        .devices
                        .get_mut(&dev)
                        .unwrap()
                        .mappings
                        .remove(&v);
                    assert_eq!(got.map(|m| (m.data_block, m.time)), want);
                    if let Some(m) = got {
                        self.md.dec_data_block(m.data_block).unwrap();
                    }
                }
            }
            520..=579 => {
                if let Some(dev) = self.pick_dev() {
                    let begin = self.rng.u64(..self.key_space);
                    let end = begin + self.rng.u64(..self.key_space / 4 + 1);
                    // Half of the time in bounded pieces: the lowest `budget` mappings.
                    let budget = self.rng.bool().then(|| 1 + self.rng.u64(..64));
                    let (runs, rest) = match budget {
                        Some(budget) => self
                            .md
                            .remove_range_bounded(dev, begin, end, budget)
                            .unwrap(),
                        None => (self.md.remove_range(dev, begin, end).unwrap(), end),
                    };
                    let mappings = &mut self.model.devices.get_mut(&dev).unwrap().mappings;
                    let in_range: Vec<(u64, u64)> = mappings
                        .range(begin..end)
                        .map(|(&v, &(b, _))| (v, b))
                        .collect();
                    let taken =
                        budget.map_or(in_range.len(), |budget| in_range.len().min(budget as usize));
                    let want = &in_range[..taken];
                    assert_eq!(rest, in_range.get(taken).map_or(end, |&(v, _)| v));
                    for (v, _) in want {
                        mappings.remove(v);
                    }
                    let got: Vec<(u64, u64)> = runs
                        .iter()
                        .flat_map(|r| (0..r.len).map(move |i| (r.begin + i, r.data_begin + i)))
                        .collect();
                    assert_eq!(got, want);
                    for (_, b) in got {
                        self.md.dec_data_block(b).unwrap();
                    }
                }
            }
            580..=699 => {
                if let Some(dev) = self.pick_dev() {
                    for _ in 0..20 {
                        let v = self.rng.u64(..self.key_space);
                        let got = self.md.lookup(dev, v).unwrap();
                        let d = &self.model.devices[&dev];
                        let want = d.mappings.get(&v).map(|&(b, t)| (b, t, d.snap_time > t));
                        assert_eq!(got.map(|m| (m.data_block, m.time, m.shared)), want);
                    }
                }
            }
            700..=739 => {
                if let Some(dev) = self.pick_dev() {
                    let begin = self.rng.u64(..self.key_space);
                    let end = begin + self.rng.u64(..self.key_space / 2 + 1);
                    self.check_range(dev, begin, end);
                }
            }
            740..=769 => {
                let Some(id) = self.free_id() else { return };
                self.md.create_thin(id).unwrap();
                if let Some(taken) = self.pick_dev() {
                    assert_eq!(
                        self.md.create_thin(taken),
                        Err(persistent_data::Error::DeviceExists(taken))
                    );
                }
                self.model.devices.insert(
                    id,
                    Dev {
                        mappings: BTreeMap::new(),
                        transaction: self.model.transaction,
                        creation_time: self.model.time,
                        snap_time: self.model.time,
                    },
                );
            }
            770..=799 => {
                if let (Some(origin), Some(id)) = (self.pick_dev(), self.free_id()) {
                    self.md.create_snap(id, origin).unwrap();
                    self.model.time += 1;
                    let time = self.model.time;
                    let mappings = self.model.devices[&origin].mappings.clone();
                    self.model.devices.get_mut(&origin).unwrap().snap_time = time;
                    self.model.devices.insert(
                        id,
                        Dev {
                            mappings,
                            transaction: self.model.transaction,
                            creation_time: time,
                            snap_time: time,
                        },
                    );
                }
            }
            800..=819 => {
                if self.model.devices.len() > 3 {
                    let dev = self.pick_dev().unwrap();
                    self.md.delete(dev).unwrap();
                    self.model.devices.remove(&dev);
                }
            }
            820..=839 => {
                let new = self.rng.u64(..1000);
                assert!(
                    self.md
                        .set_transaction_id(self.model.transaction + 1, new)
                        .is_err()
                );
                self.md
                    .set_transaction_id(self.model.transaction, new)
                    .unwrap();
                self.model.transaction = new;
            }
            840..=899 => self.commit(),
            900..=919 => self.reopen(),
            920..=934 => {
                self.md.abort().unwrap();
                self.model = self.committed.clone();
                self.snapshot = self.committed_snapshot.clone();
                self.nr_data_blocks = self.committed_nr_data_blocks;
            }
            935..=954 => {
                if self.snapshot.is_some() {
                    self.md.release_metadata_snap().unwrap();
                    self.snapshot = None;
                } else {
                    self.md.reserve_metadata_snap().unwrap();
                    // Reserving commits first.
                    self.committed = self.model.clone();
                    self.committed_nr_data_blocks = self.nr_data_blocks;
                    self.committed_snapshot = self.snapshot.clone();
                    self.snapshot = Some(self.model.clone());
                }
            }
            955..=964 => {
                self.nr_data_blocks += self.rng.u64(..20_000);
                self.md.resize_data(self.nr_data_blocks).unwrap();
            }
            _ => {
                if let Some(dev) = self.pick_dev() {
                    let want = self.model.devices[&dev]
                        .mappings
                        .keys()
                        .next_back()
                        .copied();
                    assert_eq!(self.md.highest_mapped(dev).unwrap(), want);
                    assert_eq!(
                        self.md.mapped_blocks(dev).unwrap(),
                        self.model.devices[&dev].mappings.len() as u64
                    );
                }
            }
        }
    }

    fn check_range(&mut self, dev: u64, begin: u64, end: u64) {
        let runs = self.md.lookup_range(dev, begin, end, usize::MAX).unwrap();
        let d = &self.model.devices[&dev];
        let mut position = begin;
        for run in &runs {
            match *run {
                Run::Unmapped { begin: b, len } => {
                    assert_eq!(b, position);
                    assert!(d.mappings.range(b..b + len).next().is_none());
                }
                Run::Mapped {
                    begin: b,
                    len,
                    data_begin,
                    shared,
                } => {
                    assert_eq!(b, position);
                    for i in 0..len {
                        let (data, time) = d.mappings[&(b + i)];
                        assert_eq!(data, data_begin + i);
                        assert_eq!(shared, d.snap_time > time);
                    }
                }
            }
            position = run.end();
        }
        assert_eq!(position, end.max(begin));
    }

    fn commit(&mut self) {
        self.md.commit().unwrap();
        self.committed = self.model.clone();
        self.committed_snapshot = self.snapshot.clone();
        self.committed_nr_data_blocks = self.nr_data_blocks;
        let report = persistent_data::check::check(&mut self.md).unwrap();
        assert!(report.is_clean(), "{:#?}", report.problems);
        let mut referenced = self.model.referenced();
        if let Some(snap) = &self.snapshot {
            referenced.extend(snap.referenced());
        }
        assert_eq!(
            self.md.data_nr_blocks() - self.md.data_free_blocks(),
            referenced.len() as u64,
            "allocated data blocks equal the blocks some mapping uses"
        );
    }

    fn reopen(&mut self) {
        let md = open(&self.disk, self.cache_blocks);
        self.md = md;
        self.model = self.committed.clone();
        self.snapshot = self.committed_snapshot.clone();
        self.nr_data_blocks = self.committed_nr_data_blocks;
        self.compare_all();
    }

    fn compare_all(&mut self) {
        assert_eq!(
            our_dump(&mut self.md),
            self.model.as_dump(self.nr_data_blocks)
        );
        assert_eq!(
            self.md.held_root().is_some(),
            self.snapshot.is_some(),
            "metadata snapshot presence"
        );
        if let Some(snap) = &self.snapshot {
            let mut xml = String::new();
            self.md.dump_metadata_snap_xml(&mut xml).unwrap();
            assert_eq!(parse_dump(&xml), snap.as_dump(0));
        }
    }
}

fn run_seed(seed: u64, steps: usize, cache_blocks: usize, tool_every: usize, scratch: &Scratch) {
    let mut h = Harness::new(seed, cache_blocks, 32);
    h.md.create_thin(0).unwrap();
    h.model.devices.insert(0, Dev::default());
    let mut commits = 0;
    for step in 0..steps {
        h.step();
        if step % 97 == 0 {
            h.compare_all();
        }
        if tool_every > 0 && step % tool_every == tool_every - 1 {
            h.commit();
            commits += 1;
            let path = scratch.path(&format!("model-{seed}.bin"));
            save(&h.disk, &path);
            assert_thin_check(&path, &[]);
            assert_eq!(
                thin_dump(&path, &[]),
                h.committed.as_dump(h.committed_nr_data_blocks)
            );
            if let Some(snap) = &h.committed_snapshot {
                assert_eq!(thin_dump(&path, &["-m"]), snap.as_dump(0));
            }
        }
    }
    h.commit();
    h.compare_all();
    let _ = commits;
}

#[test]
fn random_operations_match_the_model() {
    let scratch = Scratch::new("model");
    for seed in 1..=12 {
        run_seed(seed, 1500, 4096, 0, &scratch);
    }
}

#[test]
fn random_operations_with_a_tiny_cache() {
    let scratch = Scratch::new("model-tiny");
    for seed in 100..=105 {
        run_seed(seed, 1500, 64, 0, &scratch);
    }
}

#[test]
fn random_operations_pass_thin_check() {
    require_tools();
    let scratch = Scratch::new("model-tools");
    for seed in 200..=203 {
        run_seed(seed, 1200, 512, 300, &scratch);
    }
}
