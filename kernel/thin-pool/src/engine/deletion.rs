//! Deleting thin devices. The `delete` message frees the id at once; a device with
//! many mappings of its own is then released in bounded steps, one per timer call,
//! between requests, so no delete stalls the pool's I/O (see
//! `persistent_data::thin::ThinMetadata::start_delete`). Each step's changes are
//! committed like any others; a pool opened after a power cut resumes the deletes
//! it finds.

use super::*;

/// Mappings a delete releases per step (and a device may have to be deleted in one
/// go): about a millisecond of CPU on a desktop core.
pub(super) const DELETE_STEP_MAPPINGS: u64 = 4096;
/// While requests come in, a step (of a delete or a discard) is followed by three
/// times its own time without steps, so that work takes at most a quarter of the
/// time from I/O.
const BUSY_PAUSE_FACTOR: u64 = 3;

/// How far a background delete has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeleteProgress {
    /// The id the device had.
    pub dev: u64,
    /// Mappings it had when this run of the pool started releasing them.
    pub total: u64,
    pub released: u64,
    /// When this run of the pool started releasing them (the pool's clock).
    pub started_ns: u64,
    /// The device still exists: what is released is the content a snapshot merged
    /// into it replaced, not a deleted device.
    pub replaced: bool,
}

impl Core {
    /// Queues the deletes a previous run of the pool left unfinished.
    /// Views pinned by a previous run are released the same way.
    pub fn resume_deletes(&mut self) -> Result<(), MdError> {
        if self.mode.metadata_writable() {
            for view in self.md.views()? {
                self.unpin_view(view);
            }
        }
        for pending in self.md.pending_deletes()? {
            // (A tree parked by a merge belongs to a device that is still there.)
            let replaced =
                !ThinMetadata::is_reserved_id(pending.dev) && self.md.device_exists(pending.dev)?;
            self.queue_delete(pending, replaced);
        }
        Ok(())
    }

    /// Deletes still releasing mappings, oldest first.
    pub fn deletes(&self) -> impl Iterator<Item = &DeleteProgress> {
        self.deletes.iter().map(|(_, progress)| progress)
    }

    /// Queues the release of the tree parked as `pending`, which a snapshot merge
    /// `replaced` or a delete left.
    pub(super) fn queue_delete(&mut self, pending: PendingDelete, replaced: bool) {
        let progress = DeleteProgress {
            dev: pending.dev,
            total: pending.remaining,
            released: 0,
            started_ns: self.now_ns,
            replaced,
        };
        self.deletes.push_back((pending.id, progress));
    }

    pub(super) fn delete(&mut self, dev: u64) -> Result<(), MessageError> {
        let context = format!("Deletion of thin device {dev} failed");
        if self.device_active(dev) || self.origin_merging(dev) {
            return Err(MessageError::new(
                Errno::Ebusy,
                format!("{context}: the device is active (open); deactivate it first"),
            ));
        }
        let exists = self
            .md
            .device_exists(dev)
            .map_err(|e| self.message_failed(&e, &context))?;
        if !exists || ThinMetadata::is_reserved_id(dev) {
            return Err(md_error_to_message(&MdError::NoSuchDevice(dev), &context));
        }
        // A small device is deleted here: its blocks are looked up first so the ones
        // only it used can be discarded on the data device too.
        let mapped_blocks = self
            .md
            .mapped_blocks(dev)
            .map_err(|e| self.message_failed(&e, &context))?;
        let mut mapped: Vec<(u64, u64)> = Vec::new();
        if self.passdown && mapped_blocks <= DELETE_STEP_MAPPINGS {
            let end = self
                .md
                .highest_mapped(dev)
                .map_err(|e| self.message_failed(&e, &context))?
                .map_or(0, |h| h + 1);
            let mut position = 0;
            while position < end {
                let runs = self
                    .md
                    .lookup_range(dev, position, end, LOOKUP_RUNS)
                    .map_err(|e| self.message_failed(&e, &context))?;
                position = runs.last().map_or(end, Run::end);
                for run in runs {
                    if let Run::Mapped {
                        len, data_begin, ..
                    } = run
                    {
                        mapped.push((data_begin, data_begin + len));
                    }
                }
            }
        }
        let started = self
            .md
            .start_delete(dev, DELETE_STEP_MAPPINGS)
            .map_err(|e| self.message_failed(&e, &context))?;
        if let Some(pending) = started {
            self.queue_delete(pending, false);
            return Ok(());
        }
        mapped.sort_unstable();
        let mut freed: Vec<(u64, u64)> = Vec::new();
        for (begin, end) in mapped {
            for block in begin..end {
                let count = self
                    .md
                    .data_block_count(block)
                    .map_err(|e| self.message_failed(&e, &context))?;
                if count == 0 {
                    match freed.last_mut() {
                        Some((_, last)) if *last == block => *last += 1,
                        _ => freed.push((block, block + 1)),
                    }
                }
            }
        }
        for (begin, end) in freed {
            self.freed_by_change(begin, end);
        }
        self.frees_since_commit = true;
        Ok(())
    }

    /// From the timer: one step of the discard that waited longest (a client waits
    /// for it), else of the oldest background delete, unless requests other than
    /// the discards came in since the last step and it was too recent.
    pub(super) fn paced_step(&mut self, clock: &dyn Fn() -> u64) {
        if self.deletes.is_empty() && self.discards.is_empty() {
            return;
        }
        let start = self.now_ns;
        let busy = self.reqs.len() > self.discards.len()
            || self.requests_accepted != self.requests_at_last_step;
        if busy && start < self.next_step_ns {
            return;
        }
        self.requests_at_last_step = self.requests_accepted;
        if let Some((_, first)) = self.deletes.front_mut()
            && first.released == 0
        {
            // Rates count from the first step (a delete resumed at open waited).
            first.started_ns = start;
        }
        if self.discard_step() || self.delete_step() {
            let end = clock();
            self.next_step_ns = end + end.saturating_sub(start) * BUSY_PAUSE_FACTOR;
        }
    }

    /// Releases one step of the oldest background delete; returns whether there was
    /// one to work on.
    fn delete_step(&mut self) -> bool {
        let Some(&(id, _)) = self.deletes.front() else {
            return false;
        };
        if !self.mode.metadata_writable() {
            return false;
        }
        let released = match self.md.release_mappings(id, DELETE_STEP_MAPPINGS) {
            Ok(released) => released,
            Err(error) => {
                self.metadata_failed(&error);
                return false;
            }
        };
        self.md_dirty = true;
        if released.mappings == 0 {
            if let Some((_, done)) = self.deletes.pop_front()
                && !ThinMetadata::is_reserved_id(done.dev)
            {
                // (Released views are housekeeping, not an operator's delete.)
                let event = if done.replaced {
                    PoolEvent::MergeReleased { dev: done.dev }
                } else {
                    PoolEvent::DeleteFinished { dev: done.dev }
                };
                self.events.push_back(event);
            }
            return true;
        }
        self.deletes[0].1.released += released.mappings;
        for run in released.runs {
            for block in run.data_begin..run.data_begin + run.len {
                match self.md.dec_data_block(block) {
                    Ok(0) => self.freed_by_change(block, block + 1),
                    Ok(_) => {}
                    Err(error) => {
                        self.metadata_failed(&error);
                        return false;
                    }
                }
            }
        }
        self.frees_since_commit = true;
        if self.mode == PoolMode::OutOfDataSpace {
            self.commit.requested = true;
        }
        true
    }
}
