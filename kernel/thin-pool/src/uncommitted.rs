//! Which virtual blocks changed their mapping since the last commit.
//!
//! A FUA request (a write, write-zeroes or discard) is durable when it completes,
//! but only if the mapping it lands on is durable too: a block provisioned, given a
//! new block by breaking sharing, or unmapped in the current transaction reverts at
//! a power cut. Such a request therefore waits for the next commit, while a FUA
//! write to a block whose mapping was committed earlier needs only its data on
//! stable storage.
//!
//! Blocks are tracked one by one up to a bound; a device with more changes than
//! that counts as changed everywhere until the commit (dm's per-device rule), so a
//! huge discard costs no memory.

use hashbrown::HashSet;

/// Blocks tracked one by one before whole devices count as changed
/// (about 1.5 MiB of table).
const TRACKED_BLOCKS: usize = 1 << 16;

#[derive(Default)]
pub(crate) struct Uncommitted {
    blocks: HashSet<(u64, u64)>,
    /// Devices whose every block counts as changed.
    devices: HashSet<u64>,
}

impl Uncommitted {
    /// Virtual blocks `b0..b1` of `dev` changed their mapping.
    pub fn mark(&mut self, dev: u64, b0: u64, b1: u64) {
        if b0 >= b1 || self.devices.contains(&dev) {
            return;
        }
        if b1 - b0 > (TRACKED_BLOCKS - self.blocks.len().min(TRACKED_BLOCKS)) as u64 {
            self.blocks.retain(|&(d, _)| d != dev);
            self.devices.insert(dev);
            return;
        }
        self.blocks.extend((b0..b1).map(|vblock| (dev, vblock)));
    }

    /// Whether any of `dev`'s blocks `b0..b1` changed since the last commit.
    pub fn any(&self, dev: u64, b0: u64, b1: u64) -> bool {
        if b0 >= b1 {
            return false;
        }
        if self.devices.contains(&dev) {
            return true;
        }
        if b1 - b0 <= self.blocks.len() as u64 {
            (b0..b1).any(|vblock| self.blocks.contains(&(dev, vblock)))
        } else {
            self.blocks
                .iter()
                .any(|&(d, vblock)| d == dev && (b0..b1).contains(&vblock))
        }
    }

    /// The changes are committed (or rolled back).
    pub fn clear(&mut self) {
        self.blocks.clear();
        self.devices.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.devices.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_tracked_per_device_until_cleared() {
        let mut changed = Uncommitted::default();
        assert!(changed.is_empty());
        changed.mark(1, 10, 12);
        assert!(changed.any(1, 11, 12));
        assert!(changed.any(1, 0, 1_000_000));
        assert!(!changed.any(1, 12, 20));
        assert!(!changed.any(2, 10, 12));
        changed.clear();
        assert!(!changed.any(1, 10, 12));
        assert!(changed.is_empty());
    }

    #[test]
    fn too_many_blocks_mark_the_whole_device() {
        let mut changed = Uncommitted::default();
        changed.mark(2, 5, 6);
        changed.mark(1, 0, TRACKED_BLOCKS as u64 + 1);
        assert!(changed.any(1, 1 << 40, (1 << 40) + 1));
        assert!(changed.any(2, 5, 6));
        assert!(!changed.any(2, 6, 7));
        // Once the table is full, further devices are marked whole too.
        changed.mark(3, 0, TRACKED_BLOCKS as u64 - 1);
        changed.mark(4, 7, 9);
        assert!(changed.any(4, 100, 101));
        assert!(changed.any(3, 0, 1));
        assert!(!changed.any(3, TRACKED_BLOCKS as u64, TRACKED_BLOCKS as u64 + 1));
    }
}
