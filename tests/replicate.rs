//! Replication between two offline instances, as the README's walk-through does it:
//! the source serves a thin volume and takes a snapshot after each round of random
//! writes and trims; the destination pulls the first snapshot with `thin import` and
//! every later one with `thin sync --changed-since` the one before. After each round
//! the replica reads what the source's snapshot reads, the sync copied exactly the
//! blocks a model says changed, and what crossed the wire is those blocks' data plus
//! the protocol's few bytes.

use host_tools::Tool;
use qemu_test::{CountingRelay, Scratch, qemu_img_read, run_nbdsh};

mod common;

use common::*;

const VOLUME: u64 = 32 << 20;
const BLOCKS: usize = (VOLUME / BLOCK) as usize;
const PAGE: u64 = 4096;

/// A pool block of the source's volume, against the last snapshot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mapping {
    Unmapped,
    /// Still the snapshot's block.
    Shared,
    /// Written since the snapshot: a block of its own.
    Own,
}

/// The source volume as the test wrote it.
struct Model {
    image: Vec<u8>,
    blocks: Vec<Mapping>,
    /// Which blocks the last snapshot maps.
    in_snapshot: Vec<bool>,
}

impl Model {
    fn new() -> Self {
        Model {
            image: vec![0; VOLUME as usize],
            blocks: vec![Mapping::Unmapped; BLOCKS],
            in_snapshot: vec![false; BLOCKS],
        }
    }

    /// A snapshot of the volume was taken.
    fn snapshot(&mut self) {
        for (block, mapping) in self.blocks.iter_mut().enumerate() {
            self.in_snapshot[block] = *mapping != Mapping::Unmapped;
            if *mapping == Mapping::Own {
                *mapping = Mapping::Shared;
            }
        }
    }

    /// Blocks that differ from the last snapshot, and of those the ones holding data.
    fn changed(&self) -> (u64, u64) {
        let mut changed = 0;
        let mut data = 0;
        for (block, &mapping) in self.blocks.iter().enumerate() {
            let differs = match mapping {
                Mapping::Shared => false,
                Mapping::Own => true,
                Mapping::Unmapped => self.in_snapshot[block],
            };
            changed += u64::from(differs);
            data += u64::from(differs && mapping == Mapping::Own);
        }
        (changed, data)
    }

    fn mapped(&self) -> u64 {
        self.blocks
            .iter()
            .filter(|&&mapping| mapping != Mapping::Unmapped)
            .count() as u64
    }

    /// `operations` random writes (4 KiB pages, up to 256 KiB, crossing blocks) and
    /// whole-block trims, applied here and returned as a libnbd script.
    fn random_round(&mut self, rng: &mut Lcg, operations: usize) -> String {
        let mut script = String::new();
        for _ in 0..operations {
            if rng.below(5) == 0 {
                let first = rng.below(BLOCKS as u64 - 4);
                let count = rng.below(4) + 1;
                let (offset, length) = (first * BLOCK, count * BLOCK);
                script.push_str(&format!("h.trim({length}, {offset})\n"));
                self.image[offset as usize..(offset + length) as usize].fill(0);
                for block in first..first + count {
                    self.blocks[block as usize] = Mapping::Unmapped;
                }
            } else {
                let pages = VOLUME / PAGE;
                let count = rng.below(64) + 1;
                let first = rng.below(pages - count);
                let fill = rng.below(255) + 1;
                let (offset, length) = (first * PAGE, count * PAGE);
                script.push_str(&format!("h.pwrite(bytes([{fill}]) * {length}, {offset})\n"));
                self.image[offset as usize..(offset + length) as usize].fill(fill as u8);
                for block in offset / BLOCK..(offset + length).div_ceil(BLOCK) {
                    self.blocks[block as usize] = Mapping::Own;
                }
            }
        }
        script.push_str("h.flush()\nprint('written')\n");
        script
    }
}

#[test]
fn three_rounds_of_snapshots_replicate_with_only_the_changed_blocks_copied() {
    host_tools::require_for_test(&[Tool::QemuImg, Tool::NbdSh]);
    let scratch = Scratch::new().unwrap();
    let source = appliance(&scratch, "src");
    let replica = appliance(&scratch, "dst");
    let output = exec(
        &source,
        &[SETUP[0], SETUP[1], "thin create vol pool --size 32M"],
    );
    assert!(output.status.success(), "{}", text(&output));
    assert!(exec(&replica, &SETUP).status.success());

    let mut rng = Lcg(1302);
    let mut model = Model::new();
    let server = serve(&source, &[]);
    let script = model.random_round(&mut rng, 120);
    assert!(run_nbdsh(&server.uri("vol"), &script).contains("written"));
    drop(server);

    for round in 0..4 {
        let snapshot = format!("s{round}");
        let server = serve(&source, &[format!("snap create {snapshot} vol")]);
        let (changed, data) = model.changed();
        model.snapshot();
        let relay = CountingRelay::start(server.port()).unwrap();
        let uri = format!("nbd://127.0.0.1:{}/{snapshot}", relay.port());
        let copy = if round == 0 {
            format!("thin import replica pool --from {uri}")
        } else {
            format!(
                "thin sync replica --from {uri} --changed-since s{}",
                round - 1
            )
        };
        let keep = format!("snap create replica-{snapshot} replica");
        let output = exec(&replica, &[&copy, &keep, "thin ls pool"]);
        let transcript = text(&output);
        assert!(output.status.success(), "round {round}: {transcript}");
        // An import copies the data blocks; a sync every changed block, data read and
        // trimmed ones unmapped.
        let (expected, read) = if round == 0 {
            (model.mapped(), model.mapped())
        } else {
            (changed, data)
        };
        assert_eq!(
            copied(&transcript),
            dm::human_bytes(expected * BLOCK),
            "round {round}: {transcript}"
        );
        assert_eq!(
            mapped_column(ls_row(&transcript, "replica")),
            dm::human_bytes(model.mapped() * BLOCK),
            "round {round}: mapped like the source"
        );
        let wire = relay.from_server();
        let payload = read * BLOCK;
        assert!(
            wire >= payload && wire <= payload + payload / 100 + (4 << 10),
            "round {round}: {wire} bytes came over the wire for {payload} bytes of data"
        );

        let theirs = qemu_img_read(&server.uri(&snapshot), &scratch.path().join("snapshot.raw"));
        assert!(theirs == model.image, "round {round}: the source differs");
        let ours = volume_content(&scratch, &replica, &format!("replica-{snapshot}"));
        assert!(ours == model.image, "round {round}: the replica differs");

        if round < 3 {
            // The source goes on changing while it serves.
            let script = model.random_round(&mut rng, 40);
            assert!(run_nbdsh(&server.uri("vol"), &script).contains("written"));
        }
    }
}
