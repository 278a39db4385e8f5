//! The model test's checks of comparing devices: `thin delta`'s XML against the real
//! `thin_delta -m`, and changed-block views against the model, for pairs of devices.

use std::collections::BTreeMap;
use std::path::Path;

use persistent_data::delta_xml::DeltaXml;
use thin_pool::Pool;

use crate::common::{BS, tool};

/// Per device: per block, None = unmapped, or a token naming the data block.
pub type Maps = BTreeMap<u64, Vec<Option<u64>>>;

/// Our XML of `left` against `right` in the held metadata snapshot, read in small
/// steps.
fn our_xml(pool: &Pool, left: u64, right: u64, verbose: bool) -> String {
    let mut delta = pool.snap_delta(left, right).unwrap();
    let mut xml = DeltaXml::new(verbose);
    let mut out = String::new();
    xml.begin(&delta.source, left, right, &mut out).unwrap();
    loop {
        let mut pieces = Vec::new();
        let done = pool
            .snap_delta_step(&mut delta, 5, &mut |piece| {
                pieces.push(piece);
                true
            })
            .unwrap();
        for piece in &pieces {
            xml.piece(piece, &mut out).unwrap();
        }
        if done {
            break;
        }
    }
    assert_eq!(delta.mappings_read(), delta.total_mappings());
    xml.finish(&mut out).unwrap();
    out
}

/// `pairs` random pairs of the snapshot's devices: our XML equals `thin_delta -m`
/// on `image` (saved while the snapshot is held), plain or verbose.
pub fn check_xml(pool: &Pool, image: &Path, held: &Maps, pairs: usize, rng: &mut fastrand::Rng) {
    let devs: Vec<u64> = held.keys().copied().collect();
    for _ in 0..pairs {
        let (left, right) = (devs[rng.usize(..devs.len())], devs[rng.usize(..devs.len())]);
        let verbose = rng.bool();
        let (l, r) = (left.to_string(), right.to_string());
        let mut args = vec!["-m", "--snap1", &l, "--snap2", &r];
        if verbose {
            args.push("--verbose");
        }
        args.push(image.to_str().unwrap());
        let (status, stdout, stderr) = tool("thin_delta", &args);
        assert_eq!(status, 0, "thin_delta: {stderr}");
        assert_eq!(our_xml(pool, left, right, verbose), stdout, "{args:?}");
    }
}

/// For `pairs` random ordered pairs of devices: a view of what changed, walked with
/// random request sizes and extent limits, marks exactly the blocks whose mapping
/// differs in the model.
pub fn check_views(pool: &Pool, maps: &Maps, sectors: u64, pairs: usize, rng: &mut fastrand::Rng) {
    let devs: Vec<(&u64, &Vec<Option<u64>>)> = maps.iter().collect();
    for _ in 0..pairs {
        let (&dev, map) = devs[rng.usize(..devs.len())];
        let (&base, base_map) = devs[rng.usize(..devs.len())];
        let view = pool.changed_view(dev, base).unwrap();
        let mut at = 0;
        while at < sectors {
            let len = rng.u64(1..=sectors - at);
            let max = rng.u32(1..6);
            let mut extents = Vec::new();
            view.extents(at, len, max, &mut |len, changed| {
                extents.push((len, changed))
            })
            .unwrap();
            assert!(!extents.is_empty() && extents.len() <= max as usize);
            for (len, changed) in extents {
                assert!(len > 0);
                let stop = (at + len).min(sectors);
                while at < stop {
                    let block = (at / BS) as usize;
                    let expected = map[block] != base_map[block];
                    assert_eq!(changed, expected, "{dev} against {base}: sector {at}");
                    at = ((block as u64 + 1) * BS).min(stop);
                }
            }
        }
    }
}
