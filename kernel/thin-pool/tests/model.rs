//! Model-based test: long random sequences of I/O (many requests in flight, devices
//! completing out of order), messages, reopen and power cuts, checked after every step
//! against an in-memory model, byte for byte, and at checkpoints with thin_check,
//! thin_dump and thin_ls.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use blockdev::{BlockDevice, IoBuf, MemDisk};
use common::*;
use persistent_data::thin::{FormatPolicy, OpenOptions, ThinMetadata};
use thin_pool::{Errno, Pool, ThinOp, ThinOutput, ThinRequest, ThinVolume};

/// Volume size: 24 whole blocks and a partial one.
const SECTORS: u64 = 24 * BS + 40;
const BLOCKS: usize = 25;
/// The external origin ends inside block 10.
const ORIGIN_SECTORS: u64 = 10 * BS + 64;
const MAX_DEVICES: usize = 9;

/// What the model knows about one thin device.
#[derive(Clone)]
struct Dev {
    origin: bool,
    /// What reads return now.
    data: Vec<u8>,
    /// Sectors written or discarded since the last durable point: unknown after a
    /// power cut.
    dirty: Vec<bool>,
    /// Per block: None = unmapped, or a token; equal tokens at the same block of two
    /// devices mean the same data block.
    map: Vec<Option<u64>>,
    /// The mapping as of the last commit the model is sure of.
    committed: Vec<Option<u64>>,
    /// Blocks whose mapping may have changed since then.
    touched: Vec<bool>,
}

struct Model {
    devs: BTreeMap<u64, Dev>,
    origin: Vec<u8>,
    next_token: u64,
}

impl Model {
    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn new_dev(&self, origin: bool) -> Dev {
        Dev {
            origin,
            data: if origin {
                self.origin.clone()
            } else {
                vec![0; (SECTORS * 512) as usize]
            },
            dirty: vec![false; SECTORS as usize],
            map: vec![None; BLOCKS],
            committed: vec![None; BLOCKS],
            touched: vec![false; BLOCKS],
        }
    }

    fn shared(&self, dev: u64, block: usize) -> bool {
        let token = self.devs[&dev].map[block];
        token.is_some()
            && self
                .devs
                .iter()
                .any(|(&other, d)| other != dev && d.map[block] == token)
    }

    fn write(&mut self, dev: u64, sector: u64, data: &[u8]) {
        let end = sector + (data.len() / 512) as u64;
        for block in (sector / BS) as usize..end.div_ceil(BS) as usize {
            if self.devs[&dev].map[block].is_none() || self.shared(dev, block) {
                let token = self.token();
                self.devs.get_mut(&dev).unwrap().map[block] = Some(token);
            }
            self.devs.get_mut(&dev).unwrap().touched[block] = true;
        }
        let d = self.devs.get_mut(&dev).unwrap();
        d.data[(sector * 512) as usize..(end * 512) as usize].copy_from_slice(data);
        d.dirty[sector as usize..end as usize].fill(true);
    }

    /// Unmaps the whole blocks inside the range.
    fn unmap(&mut self, dev: u64, sector: u64, sectors: u64) {
        let origin = self.origin.clone();
        let d = self.devs.get_mut(&dev).unwrap();
        for block in sector.div_ceil(BS)..(sector + sectors) / BS {
            let b = block as usize;
            d.map[b] = None;
            d.touched[b] = true;
            let (s0, s1) = (block * BS, ((block + 1) * BS).min(SECTORS));
            let range = (s0 * 512) as usize..(s1 * 512) as usize;
            if d.origin {
                d.data[range.clone()].copy_from_slice(&origin[range]);
            } else {
                d.data[range].fill(0);
            }
            d.dirty[s0 as usize..s1 as usize].fill(true);
        }
    }

    fn write_zeroes(&mut self, dev: u64, sector: u64, sectors: u64, unmap: bool) {
        if !unmap || self.devs[&dev].origin {
            self.write(dev, sector, &vec![0; (sectors * 512) as usize]);
            return;
        }
        let end = sector + sectors;
        let (first, last) = (sector.div_ceil(BS) * BS, end / BS * BS);
        let partials = if first >= last {
            vec![(sector, end)]
        } else {
            vec![(sector, first), (last, end)]
        };
        for (s0, s1) in partials {
            let mut at = s0;
            while at < s1 {
                let next = ((at / BS + 1) * BS).min(s1);
                if self.devs[&dev].map[(at / BS) as usize].is_some() {
                    self.write(dev, at, &vec![0; ((next - at) * 512) as usize]);
                }
                at = next;
            }
        }
        if first < last {
            self.unmap(dev, first, last - first);
        }
    }

    /// Everything so far is durable (a completed flush or commit).
    fn durable(&mut self) {
        for d in self.devs.values_mut() {
            d.dirty.fill(false);
            d.committed = d.map.clone();
            d.touched.fill(false);
        }
    }

    fn snapshot(&mut self, dev: u64, origin: u64) {
        let copy = self.devs[&origin].clone();
        self.devs.insert(dev, copy);
    }

    /// `origin` takes `snap`'s content, `snap` is gone.
    fn merge(&mut self, snap: u64, origin: u64) {
        let merged = self.devs.remove(&snap).unwrap();
        self.devs.insert(origin, merged);
    }
}

/// One generated I/O operation.
#[derive(Clone, Debug)]
enum Io {
    Read(u64, u64),
    Write(u64, Vec<u8>, bool),
    Discard(u64, u64),
    Zeroes(u64, u64, bool),
}

struct Harness {
    rig: Rig,
    pool: Option<Pool>,
    volumes: BTreeMap<u64, ThinVolume>,
    model: Model,
    origin_disk: MemDisk,
    rng: fastrand::Rng,
    next_dev: u64,
    now: u64,
    scratch: Scratch,
    /// Device mappings the held metadata snapshot must show.
    held: Option<BTreeMap<u64, Vec<Option<u64>>>>,
    stats: BTreeMap<&'static str, u64>,
}

impl Harness {
    fn new(seed: u64) -> Self {
        let mut rig = Rig::new(512, 16384);
        rig.seed = seed;
        let origin_data = pattern(seed ^ 0xABCD, (ORIGIN_SECTORS * 512) as usize);
        let origin_disk = MemDisk::new(ORIGIN_SECTORS);
        origin_disk.write_at(0, &origin_data);
        let mut origin = origin_data;
        origin.resize((SECTORS * 512) as usize, 0);
        let pool = rig.open();
        Harness {
            rig,
            pool: Some(pool),
            volumes: BTreeMap::new(),
            model: Model {
                devs: BTreeMap::new(),
                origin,
                next_token: 1 << 48,
            },
            origin_disk,
            rng: fastrand::Rng::with_seed(seed),
            next_dev: 0,
            now: 0,
            scratch: Scratch::new(&format!("model-{seed}")),
            held: None,
            stats: BTreeMap::new(),
        }
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().unwrap()
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_insert(0) += 1;
    }

    fn activate(&mut self, dev: u64) {
        let origin = self.model.devs[&dev].origin.then(|| {
            let mut info = self.origin_disk.info().clone();
            info.read_only = true;
            let mut handle = self.origin_disk.handle_with_info(info);
            handle.shuffle_completions(self.rng.u64(..));
            Box::new(handle) as Box<dyn BlockDevice>
        });
        let volume = self.pool().activate(dev, SECTORS, origin).unwrap();
        self.volumes.insert(dev, volume);
        self.verify(dev);
    }

    /// Reads the whole volume in random pieces and compares with the model,
    /// including the reported zero holes.
    fn verify(&mut self, dev: u64) {
        let mut at = 0;
        while at < SECTORS {
            let len = (1 + self.rng.u64(..3 * BS)).min(SECTORS - at);
            let volume = self.volumes.get_mut(&dev).unwrap();
            let (result, buf) = run(
                volume,
                ThinOp::Read {
                    sector: at,
                    buf: IoBuf::with_sectors(len as usize),
                },
            );
            let Ok(ThinOutput::Read { zero_holes }) = result else {
                panic!("read failed: {result:?}");
            };
            let d = &self.model.devs[&dev];
            let expected = &d.data[(at * 512) as usize..((at + len) * 512) as usize];
            if buf[..] != *expected {
                let first = buf.iter().zip(expected).position(|(a, b)| a != b).unwrap();
                panic!(
                    "dev {dev}: data differs at sector {} (block {})",
                    at + first as u64 / 512,
                    (at + first as u64 / 512) / BS
                );
            }
            let holes: BTreeSet<u64> = zero_holes
                .iter()
                .flat_map(|run| run.start..run.start + run.sectors)
                .collect();
            let expected_holes: BTreeSet<u64> = (0..len)
                .filter(|&s| {
                    let sector = at + s;
                    d.map[(sector / BS) as usize].is_none()
                        && (!d.origin || sector >= ORIGIN_SECTORS)
                })
                .collect();
            assert_eq!(holes, expected_holes, "dev {dev}: zero holes at {at}+{len}");
            at += len;
        }
    }

    fn random_io(&mut self, taken: &mut BTreeMap<u64, Vec<(u64, u64)>>, dev: u64) -> Option<Io> {
        let len = match self.rng.u64(..10) {
            0..=5 => 1 + self.rng.u64(..64),
            6..=8 => 1 + self.rng.u64(..3 * BS),
            _ => 1 + self.rng.u64(..SECTORS),
        };
        let len = len.min(SECTORS);
        let sector = self.rng.u64(..SECTORS - len + 1);
        let ranges = taken.entry(dev).or_default();
        if ranges.iter().any(|&(s, e)| sector < e && s < sector + len) {
            return None;
        }
        ranges.push((sector, sector + len));
        Some(match self.rng.u64(..10) {
            0..=2 => Io::Read(sector, len),
            3..=6 => {
                let data = pattern(self.rng.u64(..), (len * 512) as usize);
                Io::Write(sector, data, self.rng.u64(..100) < 20)
            }
            7 | 8 => Io::Discard(sector, len),
            _ => Io::Zeroes(sector, len, self.rng.u64(..100) < 60),
        })
    }

    /// Submits a batch of non-overlapping operations on the active volumes and waits
    /// for `complete` of them (all when None).
    fn batch(&mut self, complete: Option<usize>) {
        if self.volumes.is_empty() {
            return;
        }
        let devs: Vec<u64> = self.volumes.keys().copied().collect();
        let mut taken = BTreeMap::new();
        let mut ops: Vec<(u64, Io)> = Vec::new();
        for _ in 0..1 + self.rng.u64(..16) {
            let dev = devs[self.rng.u64(..devs.len() as u64) as usize];
            if let Some(io) = self.random_io(&mut taken, dev) {
                ops.push((dev, io));
            }
        }
        // Reads see the state before the batch.
        let expected: Vec<Option<Vec<u8>>> = ops
            .iter()
            .map(|(dev, io)| match io {
                Io::Read(s, n) => Some(
                    self.model.devs[dev].data[(s * 512) as usize..((s + n) * 512) as usize]
                        .to_vec(),
                ),
                _ => None,
            })
            .collect();
        for (tag, (dev, io)) in ops.iter().enumerate() {
            let op = match io.clone() {
                Io::Read(sector, n) => ThinOp::Read {
                    sector,
                    buf: IoBuf::with_sectors(n as usize),
                },
                Io::Write(sector, data, fua) => ThinOp::Write {
                    sector,
                    buf: IoBuf::from_slice(&data),
                    fua,
                },
                Io::Discard(sector, sectors) => ThinOp::Discard {
                    sector,
                    sectors,
                    fua: false,
                },
                Io::Zeroes(sector, sectors, unmap) => ThinOp::WriteZeroes {
                    sector,
                    sectors,
                    unmap,
                    fua: false,
                },
            };
            self.volumes
                .get_mut(dev)
                .unwrap()
                .submit_op(ThinRequest {
                    tag: tag as u64,
                    op,
                })
                .unwrap();
        }
        let want = complete.unwrap_or(ops.len()).min(ops.len());
        let mut done = 0;
        while done < want {
            let mut progressed = false;
            for volume in self.volumes.values_mut() {
                while let Some(completion) = volume.poll_op() {
                    progressed = true;
                    done += 1;
                    let tag = completion.tag as usize;
                    completion
                        .result
                        .unwrap_or_else(|e| panic!("{:?} failed: {e}", ops[tag]));
                    if let Some(expected) = &expected[tag] {
                        assert!(
                            completion.buf[..] == expected[..],
                            "batch read {:?} on dev {} returned wrong data",
                            ops[tag].1,
                            ops[tag].0
                        );
                    }
                }
            }
            assert!(progressed || done >= want, "I/O stalled");
        }
        for (dev, io) in ops {
            self.count(match io {
                Io::Read(..) => "reads",
                Io::Write(..) => "writes",
                Io::Discard(..) => "discards",
                Io::Zeroes(..) => "write-zeroes",
            });
            match io {
                Io::Read(..) => {}
                Io::Write(sector, data, _) => self.model.write(dev, sector, &data),
                Io::Discard(sector, sectors) => self.model.unmap(dev, sector, sectors),
                Io::Zeroes(sector, sectors, unmap) => {
                    self.model.write_zeroes(dev, sector, sectors, unmap)
                }
            }
        }
    }

    fn barrier(&mut self) {
        if let Some(volume) = self.volumes.values_mut().next() {
            flush(volume).unwrap();
        } else {
            self.pool().commit().unwrap();
        }
        self.model.durable();
    }

    fn message(&mut self, text: &str) {
        self.pool()
            .message(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"));
        self.model.durable();
        self.count("messages");
    }

    fn create(&mut self) {
        if self.model.devs.len() >= MAX_DEVICES {
            return;
        }
        let dev = self.next_dev;
        self.next_dev += 1;
        let origin = self.rng.u64(..100) < 35;
        self.message(&format!("create_thin {dev}"));
        let fresh = self.model.new_dev(origin);
        self.model.devs.insert(dev, fresh);
        self.activate(dev);
    }

    fn snapshot(&mut self) {
        if self.model.devs.is_empty() || self.model.devs.len() >= MAX_DEVICES {
            return;
        }
        let devs: Vec<u64> = self.model.devs.keys().copied().collect();
        let origin = devs[self.rng.u64(..devs.len() as u64) as usize];
        let dev = self.next_dev;
        self.next_dev += 1;
        self.message(&format!("create_snap {dev} {origin}"));
        self.model.snapshot(dev, origin);
        self.count("snapshots");
        if self.rng.u64(..100) < 70 {
            self.activate(dev);
        }
    }

    fn delete(&mut self) {
        if self.model.devs.len() < 2 {
            return;
        }
        let devs: Vec<u64> = self.model.devs.keys().copied().collect();
        let dev = devs[self.rng.u64(..devs.len() as u64) as usize];
        if self.volumes.contains_key(&dev) {
            let error = self.pool().message(&format!("delete {dev}")).unwrap_err();
            assert_eq!(error.errno, Errno::Ebusy);
            self.volumes.remove(&dev);
        }
        self.message(&format!("delete {dev}"));
        self.model.devs.remove(&dev);
    }

    /// Merges a device into another one with the same external origin (often its
    /// origin); the target stays active if it was, the merged one is deactivated.
    fn merge(&mut self) {
        let devs: Vec<u64> = self.model.devs.keys().copied().collect();
        if devs.len() < 2 {
            return;
        }
        let snap = devs[self.rng.u64(..devs.len() as u64) as usize];
        let targets: Vec<u64> = devs
            .iter()
            .copied()
            .filter(|&d| d != snap && self.model.devs[&d].origin == self.model.devs[&snap].origin)
            .collect();
        if targets.is_empty() {
            return;
        }
        let origin = targets[self.rng.u64(..targets.len() as u64) as usize];
        if self.volumes.contains_key(&snap) {
            let error = self.pool().merge_snapshot(snap, origin).unwrap_err();
            assert_eq!(error.errno, Errno::Ebusy);
            self.volumes.remove(&snap);
        }
        self.pool()
            .merge_snapshot(snap, origin)
            .unwrap_or_else(|e| panic!("merge {snap} into {origin}: {e}"));
        self.model.merge(snap, origin);
        self.model.durable();
        self.count("merges");
    }

    fn toggle(&mut self) {
        let devs: Vec<u64> = self.model.devs.keys().copied().collect();
        if devs.is_empty() {
            return;
        }
        let dev = devs[self.rng.u64(..devs.len() as u64) as usize];
        if self.volumes.remove(&dev).is_none() {
            self.activate(dev);
        }
    }

    fn reopen(&mut self) {
        let active: Vec<u64> = self.volumes.keys().copied().collect();
        self.volumes.clear();
        self.pool
            .take()
            .unwrap()
            .close()
            .map_err(|(_, e)| e)
            .unwrap();
        self.model.durable();
        self.pool = Some(self.rig.open());
        for dev in active {
            self.activate(dev);
        }
        self.count("reopens");
    }

    /// A power cut with a batch partly done, then a reopen: whatever was durable
    /// must be intact; the rest is taken from what the pool now shows.
    fn power_cut(&mut self) {
        let complete = self.rng.u64(..8) as usize;
        self.batch(Some(complete));
        let active: Vec<u64> = self.volumes.keys().copied().collect();
        self.volumes.clear();
        self.pool = None;
        let seed = self.rng.u64(..);
        crash(&self.rig.meta, seed);
        crash(&self.rig.data, seed ^ 1);
        self.count("power cuts");

        let image = self.scratch.path("meta");
        save(&self.rig.meta, &image);
        thin_check(&image);
        let dump = thin_dump(&image, &[]);
        assert_eq!(
            dump.keys().copied().collect::<Vec<_>>(),
            self.model.devs.keys().copied().collect::<Vec<_>>()
        );
        for (&dev, d) in &self.model.devs {
            for block in 0..BLOCKS {
                if !d.touched[block] {
                    assert_eq!(
                        dump[&dev].contains_key(&(block as u64)),
                        d.committed[block].is_some(),
                        "dev {dev} block {block}: mapping lost or resurrected by the power cut"
                    );
                }
            }
        }
        self.check_partition(&dump, true);
        self.adopt(&dump);

        self.pool = Some(self.rig.open());
        for dev in self.model.devs.keys().copied().collect::<Vec<_>>() {
            let volume = self.activate_adopting(dev);
            if active.contains(&dev) {
                self.volumes.insert(dev, volume);
            }
        }
        self.model.durable();
    }

    /// Activates a device after a power cut, taking its unknown sectors from it and
    /// checking the rest.
    fn activate_adopting(&mut self, dev: u64) -> ThinVolume {
        let origin = self.model.devs[&dev].origin.then(|| {
            let mut info = self.origin_disk.info().clone();
            info.read_only = true;
            Box::new(self.origin_disk.handle_with_info(info)) as Box<dyn BlockDevice>
        });
        let mut volume = self.pool().activate(dev, SECTORS, origin).unwrap();
        let now = read(&mut volume, 0, SECTORS);
        let d = self.model.devs.get_mut(&dev).unwrap();
        for sector in 0..SECTORS as usize {
            let range = sector * 512..(sector + 1) * 512;
            if d.dirty[sector] {
                d.data[range.clone()].copy_from_slice(&now[range]);
            } else {
                assert!(
                    d.data[range.clone()] == now[range],
                    "dev {dev}: durable sector {sector} changed by the power cut"
                );
            }
        }
        volume
    }

    /// For every block, devices map the same data block exactly when the model
    /// gives them the same token (only untouched blocks when `untouched_only`).
    fn check_partition(&self, dump: &BTreeMap<u64, Mappings>, untouched_only: bool) {
        for block in 0..BLOCKS {
            let entries: Vec<(u64, u64, u64)> = self
                .model
                .devs
                .iter()
                .filter(|(_, d)| !untouched_only || !d.touched[block])
                .filter_map(|(&dev, d)| {
                    let token = if untouched_only {
                        d.committed[block]
                    } else {
                        d.map[block]
                    }?;
                    Some((dev, token, dump[&dev][&(block as u64)]))
                })
                .collect();
            for a in &entries {
                for b in &entries {
                    assert_eq!(
                        a.1 == b.1,
                        a.2 == b.2,
                        "block {block}: devices {} and {} sharing differs from the model",
                        a.0,
                        b.0
                    );
                }
            }
        }
    }

    /// Takes the mapping from a dump (tokens become data block numbers).
    fn adopt(&mut self, dump: &BTreeMap<u64, Mappings>) {
        for (dev, d) in self.model.devs.iter_mut() {
            for (block, slot) in d.map.iter_mut().enumerate() {
                *slot = dump[dev].get(&(block as u64)).copied();
            }
            d.committed = d.map.clone();
        }
    }

    /// Commits, then checks the metadata with thin_check, our own checker,
    /// thin_dump (mappings and sharing) and thin_ls (usage).
    fn checkpoint(&mut self) {
        self.barrier();
        let image = self.scratch.path("meta");
        save(&self.rig.meta, &image);
        thin_check(&image);
        let mut copy = MemDisk::new(self.rig.meta.info().sectors);
        copy.write_at(0, &std::fs::read(&image).unwrap());
        copy.shuffle_completions(3);
        let mut options = OpenOptions::new(BS as u32);
        options.format = FormatPolicy::Never;
        let (mut md, _) = ThinMetadata::open(Box::new(copy), &options).unwrap();
        let report = persistent_data::check::check(&mut md).unwrap();
        assert!(report.is_clean(), "metadata check: {:?}", report.problems);

        let dump = thin_dump(&image, &[]);
        assert_eq!(
            dump.keys().copied().collect::<Vec<_>>(),
            self.model.devs.keys().copied().collect::<Vec<_>>()
        );
        for (&dev, d) in &self.model.devs {
            let mapped: Vec<u64> = (0..BLOCKS as u64)
                .filter(|&b| d.map[b as usize].is_some())
                .collect();
            assert_eq!(
                dump[&dev].keys().copied().collect::<Vec<_>>(),
                mapped,
                "dev {dev}: mapped blocks differ from the model"
            );
        }
        self.check_partition(&dump, false);
        self.adopt(&dump);

        let expected: BTreeMap<u64, (u64, u64, u64)> = self
            .model
            .devs
            .iter()
            .map(|(&dev, d)| {
                let mapped = d.map.iter().flatten().count() as u64;
                let shared = (0..BLOCKS).filter(|&b| self.model.shared(dev, b)).count() as u64;
                (dev, (mapped, mapped - shared, shared))
            })
            .collect();
        assert_eq!(thin_ls(&image, &[]), expected, "thin_ls");
        let ours: BTreeMap<u64, (u64, u64, u64)> = self
            .pool()
            .usage()
            .unwrap()
            .into_iter()
            .map(|u| (u.dev, (u.mapped, u.exclusive, u.shared)))
            .collect();
        assert_eq!(ours, expected, "Pool::usage");

        if let Some(held) = &self.held {
            let frozen = thin_dump(&image, &["-m"]);
            assert_eq!(
                frozen.keys().copied().collect::<Vec<_>>(),
                held.keys().copied().collect::<Vec<_>>()
            );
            for (dev, map) in held {
                let mapped: Vec<u64> = (0..BLOCKS as u64)
                    .filter(|&b| map[b as usize].is_some())
                    .collect();
                assert_eq!(frozen[dev].keys().copied().collect::<Vec<_>>(), mapped);
            }
        }
        self.count("checkpoints");
    }

    fn metadata_snap(&mut self) {
        if self.held.take().is_some() {
            self.message("release_metadata_snap");
            assert_eq!(self.pool().status().held_root, None);
        } else {
            self.message("reserve_metadata_snap");
            assert!(self.pool().status().held_root.is_some());
            self.held = Some(
                self.model
                    .devs
                    .iter()
                    .map(|(&dev, d)| (dev, d.map.clone()))
                    .collect(),
            );
        }
    }

    fn step(&mut self, step: u64) {
        let touched_before: Vec<u64> = self.volumes.keys().copied().collect();
        match self.rng.u64(..100) {
            0..=54 => self.batch(None),
            55..=62 => {
                self.barrier();
                self.count("flushes");
            }
            63..=67 => self.create(),
            68..=74 => self.snapshot(),
            75..=77 => self.delete(),
            78 => self.merge(),
            79..=82 => self.toggle(),
            83..=88 => {
                self.now += 1_200_000_000;
                self.pool().service(&|| self.now);
                self.count("timer ticks");
            }
            89..=91 => self.reopen(),
            92..=96 => self.power_cut(),
            _ => self.metadata_snap(),
        }
        if self.model.devs.is_empty() {
            self.create();
        }
        // Check the volumes the step could have changed (all of them now and then).
        let all = step.is_multiple_of(10);
        for dev in self.volumes.keys().copied().collect::<Vec<_>>() {
            if all || touched_before.contains(&dev) {
                self.verify(dev);
            }
        }
        if let Some(event) = self.pool().next_event() {
            panic!("unexpected event with an ample pool: {event}");
        }
    }
}

fn run_model(seed: u64, steps: u64) {
    require_tools();
    let mut harness = Harness::new(seed);
    harness.create();
    for step in 1..=steps {
        harness.step(step);
        if step % 40 == 0 {
            harness.checkpoint();
        }
    }
    harness.checkpoint();
    eprintln!("seed {seed}: {steps} steps, {:?}", harness.stats);
}

#[test]
fn random_sequences_match_the_model_seed_1() {
    run_model(1, 400);
}

#[test]
fn random_sequences_match_the_model_seed_2() {
    run_model(2, 400);
}

#[test]
fn random_sequences_match_the_model_seed_3() {
    run_model(3, 400);
}
