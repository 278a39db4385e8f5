//! Merging a thin snapshot back into its origin: the origin takes the snapshot's
//! mapping tree in one transaction, and the snapshot is gone.
//!
//! No data moves and no mapping is rewritten: the origin's entry in the top-level
//! tree is set to the snapshot's bottom-tree root (the reference the snapshot's
//! entry held passes to it), and the origin's old tree is released like a deleted
//! device's — at once when small, otherwise parked at a reserved id for
//! [`ThinMetadata::release_mappings`], so a merge of any size commits in time
//! independent of the number of mappings.
//!
//! Times. A mapping reads as shared iff the device's `snapshotted_time` is greater
//! than the mapping's time. Every mapping of the snapshot's tree that another
//! device may also hold got there before the snapshot was created or before its
//! last snapshot was taken, so its time is below the snapshot's `snapshotted_time`;
//! mappings written into the snapshot since then are its own and have later times.
//! The origin therefore takes the snapshot's `snapshotted_time` together with its
//! tree (and its mapped count): every block reads as shared or exclusive exactly
//! as it did in the snapshot, so writes break sharing where they must and only
//! there, later snapshots of the origin (which raise its `snapshotted_time` as
//! usual) see all of it as shared, and the mapping times stay what they were. The
//! origin keeps its id, creation time and transaction id: it is still the same
//! device. Other devices — the origin's other snapshots, and snapshots of the
//! snapshot, which now share nodes with the origin — are not touched.

use super::*;

impl ThinMetadata {
    /// Gives `origin` the content of `snap` and deletes `snap`, in the current
    /// transaction. The origin's old mappings are released as
    /// [`ThinMetadata::start_delete`] releases a device's: returns the reserved id
    /// they are parked at when there are more than `at_once` of them. Both devices
    /// must be quiesced by the caller; nothing changes when either does not exist.
    pub fn merge_snapshot(
        &mut self,
        snap: u64,
        origin: u64,
        at_once: u64,
    ) -> Result<Option<PendingDelete>> {
        for dev in [snap, origin] {
            Self::check_dev_id(dev)?;
            if Self::is_reserved_id(dev) {
                return Err(Error::NoSuchDevice(dev));
            }
        }
        if snap == origin {
            return Err(Error::MergeIntoItself(snap));
        }
        let snap_details = self.device_details(snap)?;
        let origin_details = self.device_details(origin)?;
        let snap_root = self.detach(snap)?;
        let (mapping_root, old) = btree::insert(
            &mut self.tm,
            self.mapping_root,
            origin,
            &snap_root.to_le_bytes(),
            &mut SubtreeRefs(&mut self.dsm),
        )?;
        self.mapping_root = mapping_root;
        let old_root = old.ok_or(Error::NoSuchDevice(origin))?.u64();
        self.update_details(origin, |details| {
            details.mapped_blocks = snap_details.mapped_blocks;
            details.snapshotted_time = snap_details.snapshotted_time;
        })?;
        self.release_tree(origin, old_root, origin_details, at_once)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use blockdev::MemDisk;

    fn metadata() -> ThinMetadata {
        let (mut md, _) =
            ThinMetadata::open(Box::new(MemDisk::new(8 << 11)), &OpenOptions::new(128)).unwrap();
        md.resize_data(1 << 16).unwrap();
        md
    }

    fn map(md: &mut ThinMetadata, dev: u64, vblock: u64) -> u64 {
        let block = md.alloc_data_block().unwrap();
        if let Some(old) = md.insert(dev, vblock, block).unwrap() {
            md.dec_data_block(old).unwrap();
        }
        block
    }

    fn mapping(md: &mut ThinMetadata, dev: u64, vblock: u64) -> Option<(u64, bool)> {
        md.lookup(dev, vblock)
            .unwrap()
            .map(|m| (m.data_block, m.shared))
    }

    #[test]
    fn the_origin_reads_and_shares_as_the_snapshot_did() {
        let mut md = metadata();
        md.create_thin(1).unwrap();
        let kept = map(&mut md, 1, 0);
        let overwritten = map(&mut md, 1, 1);
        md.create_snap(2, 1).unwrap();
        let origin_only = map(&mut md, 1, 1);
        let snap_only = map(&mut md, 2, 2);
        md.create_snap(3, 2).unwrap();
        let before_3 = md.device_details(2).unwrap();
        md.commit().unwrap();

        assert_eq!(md.merge_snapshot(2, 1, 100).unwrap(), None);
        md.commit().unwrap();
        assert_eq!(md.devices().unwrap(), vec![1, 3]);
        assert_eq!(mapping(&mut md, 1, 0), Some((kept, true)));
        assert_eq!(mapping(&mut md, 1, 1), Some((overwritten, true)));
        assert_eq!(mapping(&mut md, 1, 2), Some((snap_only, true)));
        let details = md.device_details(1).unwrap();
        assert_eq!(details.mapped_blocks, 3);
        assert_eq!(details.snapshotted_time, before_3.snapshotted_time);
        assert_eq!(details.creation_time, 0);
        // Only the origin had its own block 1: it is free now.
        assert_eq!(md.data_block_count(origin_only).unwrap(), 0);
        assert_eq!(md.data_block_count(kept).unwrap(), 1);
        // A write after the merge lands in a new, exclusive block.
        let fresh = map(&mut md, 1, 3);
        assert_eq!(mapping(&mut md, 1, 3), Some((fresh, false)));
        assert_eq!(mapping(&mut md, 3, 2), Some((snap_only, true)));
    }

    #[test]
    fn a_large_old_tree_is_parked_for_release_and_refusals_change_nothing() {
        let mut md = metadata();
        md.create_thin(1).unwrap();
        for vblock in 0..50 {
            map(&mut md, 1, vblock);
        }
        md.create_snap(2, 1).unwrap();
        for vblock in 0..50 {
            map(&mut md, 1, vblock);
        }
        md.commit().unwrap();
        assert_eq!(md.merge_snapshot(1, 1, 10), Err(Error::MergeIntoItself(1)));
        assert_eq!(md.merge_snapshot(2, 7, 10), Err(Error::NoSuchDevice(7)));
        assert_eq!(md.merge_snapshot(7, 1, 10), Err(Error::NoSuchDevice(7)));
        assert_eq!(md.devices().unwrap(), vec![1, 2]);

        let pending = md.merge_snapshot(2, 1, 10).unwrap().unwrap();
        assert_eq!(pending.dev, 1);
        assert_eq!(pending.remaining, 50);
        md.commit().unwrap();
        assert_eq!(md.pending_deletes().unwrap(), vec![pending]);
        loop {
            let released = md.release_mappings(pending.id, 16).unwrap();
            if released.mappings == 0 {
                break;
            }
            for run in released.runs {
                for block in run.data_begin..run.data_begin + run.len {
                    assert_eq!(md.dec_data_block(block).unwrap(), 0);
                }
            }
        }
        md.commit().unwrap();
        assert!(md.pending_deletes().unwrap().is_empty());
        assert_eq!(md.mapped_blocks(1).unwrap(), 50);
        let report = crate::check::check(&mut md).unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
    }
}
