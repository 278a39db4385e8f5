//! Merging a thin snapshot into its origin while the origin's volume stays active
//! (see `persistent_data::thin::ThinMetadata::merge_snapshot` for the metadata side
//! and the choice of times).

use super::*;
use deletion::DELETE_STEP_MAPPINGS;

impl Core {
    /// Gives `origin` the snapshot `snap`'s content and deletes `snap`, committed as
    /// one transaction. The snapshot must not be active. The origin is quiesced
    /// first: every request of it in the engine finishes (writes waiting for data
    /// space excepted: as with `create_snap`, they are processed from scratch
    /// afterwards and so land on the merged content), so a read completes wholly
    /// before or wholly after the merge. The origin's old blocks are released in the
    /// background when there are many.
    pub fn merge_snapshot(&mut self, snap: u64, origin: u64) -> Result<(), MessageError> {
        self.require_writable_metadata()?;
        let context = format!("Merge of thin device {snap} into thin device {origin} failed");
        if snap == origin {
            return Err(md_error_to_message(
                &MdError::MergeIntoItself(snap),
                &context,
            ));
        }
        if self.origin_merging(snap) || self.origin_merging(origin) {
            return Err(MessageError::new(
                Errno::Ebusy,
                format!("{context}: a merge into an external origin is running on it"),
            ));
        }
        if self.volumes.iter().any(|(_, v)| v.dev == snap && v.open) {
            return Err(MessageError::new(
                Errno::Ebusy,
                format!("{context}: the snapshot is active (open); deactivate it first"),
            ));
        }
        self.wait_until(|core| {
            !core.device_active(snap)
                && core
                    .reqs
                    .iter()
                    .all(|(_, r)| core.volumes[r.vol].dev != origin || r.outstanding == r.parked)
        });
        self.drain_preps();
        self.require_writable_metadata()?;
        if self.md_dirty {
            self.commit_now()?;
        }
        let merged = self.md.merge_snapshot(snap, origin, DELETE_STEP_MAPPINGS);
        // The origin's mappings changed wholesale.
        self.mappings.clear();
        match merged {
            Ok(Some(pending)) => self.queue_delete(pending, true),
            Ok(None) => {}
            Err(error) => return Err(self.message_failed(&error, &context)),
        }
        self.frees_since_commit = true;
        self.md_dirty = true;
        self.commit_now()
    }
}
