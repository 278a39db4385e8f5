//! Several snapshots of one origin (persistent, overflow-aware, transient, a tiny
//! chunk size crossing area boundaries, one covering half the origin) under random
//! origin and snapshot writes, checked against a model after every operation: every
//! view, the origin, status lines (allocation as Linux counts it, `Invalid`,
//! `Overflow`), and after reloading from disk.

mod common;

use std::collections::BTreeSet;

use blockdev::{BlockDevice, MemDisk};
use common::{PERSISTENT, view};
use snapshot::{Snapshot, StoreKind, area_chunk, records_per_area, write_origin};

const ORIGIN_SECTORS: u64 = 4096;

/// What a snapshot should show and how full its store should be.
struct Model {
    kind: StoreKind,
    chunk: u64,
    cow: MemDisk,
    length: u64,
    view: Vec<u8>,
    excepted: BTreeSet<u64>,
    valid: bool,
    overflowed: bool,
    live: Snapshot,
}

impl Model {
    fn new(origin: &MemDisk, kind: StoreKind, chunk: u64, cow_sectors: u64, length: u64) -> Model {
        let cow = MemDisk::new(cow_sectors);
        let live = Snapshot::open(
            Box::new(origin.handle()),
            Box::new(cow.handle()),
            kind,
            chunk as u32,
            length,
        )
        .unwrap()
        .0;
        let mut view = vec![0u8; ORIGIN_SECTORS as usize * 512];
        origin.read_at(0, &mut view);
        Model {
            kind,
            chunk,
            cow,
            length,
            view,
            excepted: BTreeSet::new(),
            valid: true,
            overflowed: false,
            live,
        }
    }

    fn persistent(&self) -> bool {
        self.kind != StoreKind::Transient
    }

    fn per_area(&self) -> u64 {
        records_per_area(self.chunk)
    }

    /// Linux's `next_free` with `n` exceptions allocated in order.
    fn next_free(&self) -> u64 {
        let n = self.excepted.len() as u64;
        2 + n + n / self.per_area()
    }

    fn has_room(&self) -> bool {
        let cow = self.cow.info().sectors;
        if self.persistent() {
            (self.next_free() + 1) * self.chunk <= cow
        } else {
            (self.excepted.len() as u64 + 1) * self.chunk <= cow
        }
    }

    /// Adds exceptions for `chunks` in order as a commit would; false when the
    /// snapshot ran out of room (`None` left at the failing chunk) or a full area's
    /// successor lies past the COW's end.
    fn add(&mut self, chunks: &[u64]) -> Result<(), u64> {
        for &chunk in chunks {
            if !self.has_room() {
                return Err(chunk);
            }
            self.excepted.insert(chunk);
        }
        Ok(())
    }

    /// Whether committing from `before` exceptions to now fills an area whose
    /// successor does not fit.
    fn commit_fails(&self, before: usize) -> bool {
        if !self.persistent() {
            return false;
        }
        let e = self.per_area();
        let cow_chunks = self.cow.info().sectors / self.chunk;
        (before as u64 + 1..=self.excepted.len() as u64)
            .filter(|n| n % e == 0)
            .any(|n| area_chunk(self.chunk, n / e) + 1 > cow_chunks)
    }

    fn status(&self) -> String {
        if !self.valid {
            return "Invalid".into();
        }
        if self.overflowed {
            return "Overflow".into();
        }
        let cow = self.cow.info().sectors;
        let n = self.excepted.len() as u64;
        if self.persistent() {
            let meta = (n / self.per_area() + 2) * self.chunk;
            format!("{}/{cow} {meta}", self.next_free() * self.chunk)
        } else {
            format!("{}/{cow} 0", n * self.chunk)
        }
    }

    fn chunks(&self, sector: u64, sectors: u64) -> Vec<u64> {
        (sector / self.chunk..(sector + sectors).div_ceil(self.chunk)).collect()
    }

    /// An origin write of `sectors` at `sector` as this snapshot sees it.
    fn origin_write(&mut self, sector: u64, sectors: u64) {
        let end = (sector + sectors).min(self.length);
        if !self.valid || sector >= end {
            return;
        }
        let before = self.excepted.len();
        let needed: Vec<u64> = self
            .chunks(sector, end - sector)
            .into_iter()
            .filter(|c| !self.excepted.contains(c))
            .collect();
        if self.add(&needed).is_err() || self.commit_fails(before) {
            self.valid = false;
        }
    }

    /// A snapshot write; returns whether it should succeed.
    fn snapshot_write(&mut self, sector: u64, data: &[u8]) -> bool {
        if !self.valid || self.overflowed {
            return false;
        }
        let sectors = (data.len() / 512) as u64;
        let before = self.excepted.len();
        let needed: Vec<u64> = self
            .chunks(sector, sectors)
            .into_iter()
            .filter(|c| !self.excepted.contains(c))
            .collect();
        let mut ok = true;
        if self.add(&needed).is_err() {
            ok = false;
            if self.kind == (StoreKind::Persistent { overflow: true }) {
                self.overflowed = true;
            } else {
                self.valid = false;
                return false;
            }
        }
        if self.commit_fails(before) {
            self.valid = false;
            return false;
        }
        for s in sector..sector + sectors {
            if self.excepted.contains(&(s / self.chunk)) {
                let at = s as usize * 512;
                let from = (s - sector) as usize * 512;
                self.view[at..at + 512].copy_from_slice(&data[from..from + 512]);
            }
        }
        ok
    }
}

fn random_data(rng: &mut fastrand::Rng, sectors: u64) -> Vec<u8> {
    let mut data = vec![0u8; sectors as usize * 512];
    rng.fill(&mut data);
    data
}

fn check(models: &mut [Model], origin: &MemDisk, model_origin: &[u8], context: &str) {
    let mut seen = vec![0u8; model_origin.len()];
    origin.read_at(0, &mut seen);
    assert!(seen == model_origin, "{context}: origin differs");
    for (n, model) in models.iter_mut().enumerate() {
        assert_eq!(
            model.live.status(),
            model.status(),
            "{context}: snapshot {n}"
        );
        if model.valid {
            let seen = view(&mut model.live, model.length, false);
            let want = &model.view[..model.length as usize * 512];
            assert!(seen == want, "{context}: snapshot {n} view differs");
        } else {
            let mut buf = [0u8; 512];
            assert!(
                model.live.read(0, &mut buf).is_err(),
                "{context}: {n} readable"
            );
        }
    }
}

/// Runs the workload; returns the final status of every snapshot.
fn run(seed: u64, operations: usize) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let origin = MemDisk::new(ORIGIN_SECTORS);
    let mut model_origin = random_data(&mut rng, ORIGIN_SECTORS);
    origin.write_at(0, &model_origin);
    let overflow = StoreKind::Persistent { overflow: true };
    let mut models = vec![
        Model::new(&origin, PERSISTENT, 8, 8192, ORIGIN_SECTORS),
        Model::new(&origin, overflow, 16, 40 * 16, ORIGIN_SECTORS),
        Model::new(&origin, StoreKind::Transient, 8, 512, ORIGIN_SECTORS),
        Model::new(&origin, PERSISTENT, 1, 100, ORIGIN_SECTORS),
        Model::new(&origin, PERSISTENT, 8, 4096, ORIGIN_SECTORS / 2),
        Model::new(&origin, PERSISTENT, 32, 70 * 32, ORIGIN_SECTORS),
    ];
    let mut writer = origin.handle();
    for step in 0..operations {
        let sectors = rng.u64(1..=48);
        let sector = rng.u64(0..=ORIGIN_SECTORS - sectors);
        let data = random_data(&mut rng, sectors);
        let context = format!("seed {seed} step {step}");
        if rng.bool() {
            let mut live: Vec<&mut Snapshot> = models.iter_mut().map(|m| &mut m.live).collect();
            write_origin(&mut writer, &mut live, sector, &data, false).unwrap();
            for model in &mut models {
                model.origin_write(sector, sectors);
            }
            let at = sector as usize * 512;
            model_origin[at..at + data.len()].copy_from_slice(&data);
        } else {
            let n = rng.usize(..models.len());
            let model = &mut models[n];
            let sector = sector.min(model.length - sectors);
            let expected = model.snapshot_write(sector, &data);
            let result = model.live.write(sector, &data);
            assert_eq!(
                result.is_ok(),
                expected,
                "{context}: write to {n}: {result:?}"
            );
        }
        if step % 8 == 0 || step + 1 == operations {
            check(&mut models, &origin, &model_origin, &context);
        }
    }
    let statuses = models.iter().map(Model::status).collect();
    for (n, model) in models
        .iter_mut()
        .enumerate()
        .filter(|(_, m)| m.persistent())
    {
        let (mut again, _) = Snapshot::open(
            Box::new(origin.handle()),
            Box::new(model.cow.handle()),
            model.kind,
            0,
            model.length,
        )
        .unwrap();
        // Overflow is not stored: a reload shows the usage again.
        model.overflowed = false;
        assert_eq!(again.status(), model.status(), "seed {seed}: reloaded {n}");
        if model.valid {
            let want = &model.view[..model.length as usize * 512];
            assert!(
                view(&mut again, model.length, false) == want,
                "reloaded {n}"
            );
        }
    }
    statuses
}

#[test]
fn random_origin_and_snapshot_writes_match_the_model() {
    for seed in 1..=12 {
        let statuses = run(seed, 300);
        assert_ne!(statuses[0], "Invalid", "seed {seed}: {statuses:?}");
    }
}

#[test]
fn every_snapshot_kind_fills_up_as_linux() {
    // Long runs drive every small store to its end.
    for seed in 100..103 {
        let statuses = run(seed, 1500);
        assert!(
            statuses[1] == "Overflow" || statuses[1] == "Invalid",
            "{statuses:?}"
        );
        assert_eq!(statuses[2..4], ["Invalid", "Invalid"], "{statuses:?}");
        assert_ne!(statuses[0], "Invalid", "the large store kept up");
    }
}
