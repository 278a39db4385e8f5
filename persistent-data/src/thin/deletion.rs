//! Deleting a device over many transactions.
//!
//! Releasing a device's mappings costs time in proportion to how many it has
//! (0.15 s per million here, more on slow CPUs), so a large delete would stall
//! everything else if it ran in one call. Instead [`ThinMetadata::start_delete`]
//! moves the device's mapping tree and details to a reserved id at once — the
//! original id is free again — and [`ThinMetadata::release_mappings`] then takes
//! its lowest leaves off a bounded number at a time, in as many transactions as it
//! takes. A leaf the device shares with another (the old content a snapshot merge
//! replaced shares nearly all of them) only loses a reference, so such a tree goes
//! in a few steps whatever its number of mappings.
//! Every commit in between is ordinary dm-thin metadata: the device being deleted is
//! a thin device like any other, holding exactly the blocks it still maps, so
//! `thin_check` finds nothing leaked, and a pool opened after a power cut finds it
//! with [`ThinMetadata::pending_deletes`] and carries on.
//!
//! A device being deleted has an id in the reserved range at the top of the 24-bit
//! id space and a creation time no live device can have (times are 24 bits); its
//! details record keeps the original id in the transaction id field.

use super::*;

/// First of the ids reserved for devices being deleted (the last 256 ids).
pub const FIRST_DELETING_ID: u64 = MAX_DEV_ID - 255;
/// The creation time marking a device being deleted.
pub(super) const DELETING_MARK: u32 = u32::MAX;

/// What releasing a leaf shared with another device costs against a step's budget,
/// in mappings of the device's own: about the work of its removal from the tree.
pub const SHARED_LEAF_COST: u64 = 16;

/// What one call of [`ThinMetadata::release_mappings`] released.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// The device's own mappings that went, as runs.
    pub runs: Vec<RemovedRun>,
    /// Every mapping that went, its own and those of leaves it shared.
    pub mappings: u64,
}

/// A device whose mappings are being released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingDelete {
    /// Where its mappings live now (a reserved id).
    pub id: u64,
    /// The id it had.
    pub dev: u64,
    /// Mappings still to release.
    pub remaining: u64,
}

impl ThinMetadata {
    /// Whether `dev` is one of the ids reserved for devices being deleted.
    pub fn is_reserved_id(dev: u64) -> bool {
        (FIRST_DELETING_ID..=MAX_DEV_ID).contains(&dev)
    }

    /// Starts deleting `dev`. A device with at most `at_once` mappings, or whose
    /// mapping tree is shared as a whole with a snapshot (deleting it only drops a
    /// reference), is deleted here and `None` returned. Otherwise its mappings move
    /// to a free reserved id, returned for [`ThinMetadata::release_mappings`]; `dev`
    /// no longer exists either way.
    pub fn start_delete(&mut self, dev: u64, at_once: u64) -> Result<Option<PendingDelete>> {
        Self::check_dev_id(dev)?;
        let details = self.device_details(dev)?;
        let root = self.detach(dev)?;
        self.release_tree(dev, root, details, at_once)
    }

    /// Releases the mapping tree `root`, whose reference the caller owns, that
    /// device `dev` had with `details`: at once when it has at most `at_once`
    /// mappings or is shared as a whole, else by parking it at a free reserved id,
    /// which is returned for [`ThinMetadata::release_mappings`].
    pub(super) fn release_tree(
        &mut self,
        dev: u64,
        root: u64,
        details: DeviceDetails,
        at_once: u64,
    ) -> Result<Option<PendingDelete>> {
        let spare = if details.mapped_blocks > at_once && self.tm.count(root)? == 1 {
            self.free_reserved_id()?
        } else {
            None
        };
        let Some(id) = spare else {
            btree::delete_tree(&mut self.tm, root, &mut DataRefs(&mut self.dsm))?;
            return Ok(None);
        };
        // The reference the caller owns passes to the new entry.
        self.park_tree(id, root, dev, &details, DELETING_MARK)?;
        Ok(Some(PendingDelete {
            id,
            dev,
            remaining: details.mapped_blocks,
        }))
    }

    /// Enters mapping tree `root` (a reference the caller owns) at reserved id `id`,
    /// recording device `dev`'s details with creation time `mark`, which says what
    /// the hidden entry is for (a delete in progress, a pinned view).
    pub(super) fn park_tree(
        &mut self,
        id: u64,
        root: u64,
        dev: u64,
        details: &DeviceDetails,
        mark: u32,
    ) -> Result<()> {
        self.mapping_root = btree::insert(
            &mut self.tm,
            self.mapping_root,
            id,
            &root.to_le_bytes(),
            &mut SubtreeRefs(&mut self.dsm),
        )?
        .0;
        self.details.insert(
            id,
            CachedDetails {
                details: DeviceDetails {
                    mapped_blocks: details.mapped_blocks,
                    transaction_id: dev,
                    creation_time: mark,
                    snapshotted_time: details.snapshotted_time,
                },
                dirty: true,
            },
        );
        Ok(())
    }

    /// The lowest reserved id not in use.
    pub(super) fn free_reserved_id(&mut self) -> Result<Option<u64>> {
        let used = self.devices_from(FIRST_DELETING_ID)?;
        Ok((FIRST_DELETING_ID..=MAX_DEV_ID).find(|id| !used.contains(id)))
    }

    /// Device ids from `first` on, ascending.
    pub(super) fn devices_from(&mut self, first: u64) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let mut cursor = Cursor::seek(&mut self.tm, self.mapping_root, first, MAPPING_VALUE_SIZE)?;
        while let Some((dev, _)) = cursor.entry() {
            out.push(dev);
            cursor.advance(&mut self.tm)?;
        }
        Ok(out)
    }

    /// Devices being deleted, in id order.
    pub fn pending_deletes(&mut self) -> Result<Vec<PendingDelete>> {
        let mut pending = Vec::new();
        for id in self.devices_from(FIRST_DELETING_ID)? {
            let details = self.device_details(id)?;
            if details.creation_time == DELETING_MARK {
                pending.push(PendingDelete {
                    id,
                    dev: details.transaction_id,
                    remaining: details.mapped_blocks,
                });
            }
        }
        Ok(pending)
    }

    /// Releases the lowest leaves of the device being deleted as `id` until about
    /// `budget` is spent (at least one leaf, never more than `budget` after it): a
    /// mapping of a leaf only this device has costs one and is returned in
    /// [`Released::runs`] (the caller owns their references, as with
    /// [`ThinMetadata::remove_range`]); a leaf another device shares costs
    /// [`SHARED_LEAF_COST`], however many mappings it holds, and only its
    /// reference is dropped. When the device has no mappings left it is removed
    /// itself and nothing is released.
    pub fn release_mappings(&mut self, id: u64, budget: u64) -> Result<Released> {
        if !Self::is_reserved_id(id) || self.device_details(id)?.creation_time != DELETING_MARK {
            return Err(Error::NoSuchDevice(id));
        }
        let mut released = Released::default();
        let mut spent = 0;
        let mut emptied = false;
        self.with_bottom_tree(id, |tm, dsm, mut root| {
            let mut refs = DataRefs(dsm);
            let max_leaf = u64::from(btree::max_entries(MAPPING_VALUE_SIZE));
            loop {
                let runs = &mut released.runs;
                let (new_root, leaf) =
                    btree::remove_first_leaf(tm, root, &mut refs, &mut |key, value| {
                        push_removed(runs, key, value);
                        Ok(())
                    })?;
                root = new_root;
                let Some(leaf) = leaf else {
                    emptied = released.mappings == 0;
                    return Ok(root);
                };
                released.mappings += leaf.entries;
                spent += if leaf.shared {
                    SHARED_LEAF_COST
                } else {
                    leaf.entries
                };
                // The next leaf is taken only while it cannot go past the budget.
                if spent + max_leaf > budget {
                    return Ok(root);
                }
            }
        })?;
        if emptied {
            self.delete(id)?;
        } else {
            self.update_details(id, |details| {
                details.mapped_blocks = details.mapped_blocks.saturating_sub(released.mappings)
            })?;
        }
        Ok(released)
    }
}
