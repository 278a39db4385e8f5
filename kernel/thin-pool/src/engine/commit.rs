//! Commits (data flush, then metadata) and metadata failures (rollback,
//! needs_check, read-only or fail mode).

use super::*;

impl Core {
    pub(super) fn start_commit(&mut self) -> bool {
        if self.commit.flushing || (!self.commit.requested && self.commit.next.is_empty()) {
            return false;
        }
        self.commit.requested = false;
        self.commit.current = mem::take(&mut self.commit.next);
        self.commit.flushing = true;
        self.submit_data(DevOp::Flush, Command::Flush);
        true
    }

    pub(super) fn flush_done(&mut self, result: Result<(), IoError>) {
        self.commit.flushing = false;
        let outcome = match result {
            Err(error) => {
                let text = format!("data device flush failed ({error})");
                self.metadata_failed_text(text);
                Err(error)
            }
            Ok(()) if self.md_dirty && self.mode.metadata_writable() => {
                self.commit_metadata().map_err(|error| {
                    self.metadata_failed(&error);
                    EIO_METADATA
                })
            }
            // Writes may have been acknowledged on changes a rollback threw away.
            Ok(()) if self.changes_lost => Err(EIO_METADATA),
            Ok(()) => Ok(()),
        };
        self.commit.failed = outcome.is_err();
        self.commit.cycles += 1;
        for req in mem::take(&mut self.commit.current) {
            self.finish_unit(req, outcome);
        }
        for prep in mem::take(&mut self.deferred) {
            self.prep_done(prep);
        }
        self.after_commit();
    }

    pub(super) fn commit_metadata(&mut self) -> Result<(), MdError> {
        for block in mem::take(&mut self.quarantine) {
            self.md.dec_data_block(block)?;
        }
        let provisional: Vec<u64> = self.provisional.iter().copied().collect();
        for &block in &provisional {
            self.md.dec_data_block(block)?;
        }
        self.md.commit()?;
        self.uncommitted.clear();
        for passdown in mem::take(&mut self.discard_after_commit) {
            self.queue_passdown(passdown);
        }
        for &block in &provisional {
            self.md.inc_data_block(block)?;
        }
        self.md_dirty = false;
        self.frees_since_commit = false;
        self.last_commit_ns = self.now_ns;
        Ok(())
    }

    pub(super) fn after_commit(&mut self) {
        match self.mode {
            PoolMode::Write | PoolMode::OutOfDataSpace => {}
            PoolMode::OutOfMetadataSpace | PoolMode::ReadOnly | PoolMode::Fail => {
                self.fail_parked(EIO_READ_ONLY);
                return;
            }
        }
        if self.metadata_exhausted() {
            self.enter_out_of_metadata_space();
            return;
        }
        let free = self.md.data_free_blocks();
        if self.mode == PoolMode::OutOfDataSpace {
            if free > 0 {
                self.leave_out_of_data_space("free data blocks are available again");
            }
        } else if !self.no_space.is_empty() {
            if free > 0 {
                self.retry_parked();
            } else {
                self.enter_out_of_data_space();
            }
        }
    }

    pub(super) fn enter_out_of_metadata_space(&mut self) {
        self.set_mode(
            PoolMode::OutOfMetadataSpace,
            String::from(
                "free metadata is down to the reserve; writes needing new blocks fail, messages are refused (reload the pool with a larger metadata device)",
            ),
        );
        self.fail_parked(EIO_NO_METADATA);
    }

    pub(super) fn metadata_failed(&mut self, error: &MdError) {
        self.metadata_failed_text(format!("metadata operation failed ({error})"));
    }

    /// Rolls the transaction back, sets needs_check and goes read-only (or fails).
    pub(super) fn metadata_failed_text(&mut self, what: String) {
        if !self.mode.metadata_writable() {
            return;
        }
        self.generation += 1;
        self.changes_lost |= self.md_dirty || !self.uncommitted.is_empty();
        self.uncommitted.clear();
        self.provisional.clear();
        self.quarantine.clear();
        self.md_dirty = false;
        self.mappings.clear();
        self.drop_discards_after_commit(EIO_METADATA);
        let rolled_back = self.md.abort().and_then(|()| {
            self.md.set_needs_check();
            self.md.commit()
        });
        match rolled_back {
            Ok(()) => self.set_mode(
                PoolMode::ReadOnly,
                format!(
                    "{what}; changes since the last commit were rolled back and needs_check is set: check and repair the metadata offline"
                ),
            ),
            Err(error) => self.set_mode(
                PoolMode::Fail,
                format!("{what}; rolling back also failed ({error}): all I/O now fails"),
            ),
        }
        self.fail_parked(EIO_METADATA);
    }

    /// Runs a commit cycle (data flush, then metadata) to completion.
    pub fn commit_now(&mut self) -> Result<(), MessageError> {
        self.commit.requested = true;
        let target = self.commit.cycles + if self.commit.flushing { 2 } else { 1 };
        self.wait_until(|core| core.commit.cycles >= target);
        if self.commit.failed {
            return Err(MessageError::new(
                Errno::Eio,
                "commit failed; the pool is now read-only (see events)",
            ));
        }
        Ok(())
    }

    /// Commits when the metadata changed (and may change); a failure shows in the
    /// mode and the events.
    pub fn commit_if_dirty(&mut self) {
        if self.md_dirty && self.mode.metadata_writable() {
            // The error is already reported as a mode change.
            let _ = self.commit_now();
        }
    }

    /// Waits until no new block is being prepared and no commit is in flight.
    pub(super) fn drain_preps(&mut self) {
        self.wait_until(|core| {
            core.preps.is_empty() && core.deferred.is_empty() && !core.commit.flushing
        });
    }

    /// Waits until everything in flight is finished (requests waiting for space
    /// excepted).
    pub fn drain_all(&mut self) {
        self.wait_until(|core| {
            core.reqs.iter().all(|(_, r)| r.outstanding == r.parked)
                && core.passdowns.is_empty()
                && core.passdown_ranges.is_empty()
                && !core.commit.flushing
                && core.data.idle()
        });
    }
}
