//! Pinned views: a device's mappings frozen for a reader that outlives the
//! transaction (an NBD client asking what changed since a snapshot, for as long as
//! it stays connected).
//!
//! A view is a hidden clone of the device: one more reference on its mapping
//! tree's root, entered under a reserved id. It is ordinary dm-thin metadata — the
//! pool goes on writing and committing, writes to the device copy the b-tree nodes
//! they change instead of changing the shared ones, and the data blocks the view
//! still maps stay allocated while it is held — so `thin_check` finds every count
//! explained and nothing leaks. Unpinning deletes the clone; a pool opened after a
//! power cut unpins the views it finds.
//!
//! Views take ids from the same reserved range as devices being deleted and carry
//! their own creation-time mark; the transaction id field keeps the device's id.
//! A view being released is a device being deleted whose original id is its own
//! reserved id, so the pool can tell it from a delete the operator asked for.

use super::deletion::DELETING_MARK;
use super::*;

/// The creation time marking a pinned view.
const VIEW_MARK: u32 = u32::MAX - 1;

impl ThinMetadata {
    /// Pins device `dev`'s mappings as they are now; returns the view's id. Fails
    /// with [`Error::ReservedDeviceId`] when every reserved id is in use.
    pub fn pin_view(&mut self, dev: u64) -> Result<u64> {
        if Self::is_reserved_id(dev) {
            return Err(Error::NoSuchDevice(dev));
        }
        let root = self.bottom_root(dev)?;
        let details = self.device_details(dev)?;
        let id = self
            .free_reserved_id()?
            .ok_or(Error::ReservedDeviceId(MAX_DEV_ID))?;
        self.tm.inc(root)?;
        self.park_tree(id, root, dev, &details, VIEW_MARK)?;
        Ok(id)
    }

    /// The mapping-tree root of view `id`.
    pub fn view_root(&mut self, id: u64) -> Result<u64> {
        self.check_view(id)?;
        self.bottom_root(id)
    }

    fn check_view(&mut self, id: u64) -> Result<()> {
        if !Self::is_reserved_id(id) || self.device_details(id)?.creation_time != VIEW_MARK {
            return Err(Error::NoSuchDevice(id));
        }
        Ok(())
    }

    /// Drops view `id`. A view that still shares its whole tree with the device, or
    /// holds at most `at_once` mappings, is deleted here; otherwise it becomes a
    /// device being deleted, returned for the caller to release in steps
    /// ([`ThinMetadata::release_mappings`]).
    pub fn unpin_view(&mut self, id: u64, at_once: u64) -> Result<Option<PendingDelete>> {
        self.check_view(id)?;
        let root = self.bottom_root(id)?;
        let details = self.device_details(id)?;
        if self.tm.count(root)? > 1 || details.mapped_blocks <= at_once {
            self.delete(id)?;
            return Ok(None);
        }
        self.mark_deleting(id)?;
        Ok(Some(PendingDelete {
            id,
            dev: id,
            remaining: details.mapped_blocks,
        }))
    }

    /// Turns a view into a device being deleted whose original id is its own (no
    /// device the operator knows goes away).
    fn mark_deleting(&mut self, id: u64) -> Result<()> {
        self.update_details(id, |details| {
            details.creation_time = DELETING_MARK;
            details.transaction_id = id;
        })
    }

    /// The views in the metadata, e.g. left behind by a previous run of the pool
    /// (nobody reads them any more: unpin them).
    pub fn views(&mut self) -> Result<Vec<u64>> {
        let mut views = Vec::new();
        for id in self.devices_from(FIRST_DELETING_ID)? {
            if self.device_details(id)?.creation_time == VIEW_MARK {
                views.push(id);
            }
        }
        Ok(views)
    }
}
