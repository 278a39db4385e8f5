//! Data and metadata space: allocation, low-water events, and writes waiting for
//! space (out-of-data-space and out-of-metadata-space modes).

use super::*;

impl Core {
    pub(super) fn allocate(&mut self) -> Alloc {
        loop {
            match self.md.alloc_data_block() {
                Ok(block) => {
                    self.md_dirty = true;
                    if self.is_busy(block) {
                        self.quarantine.push(block);
                        continue;
                    }
                    self.provisional.insert(block);
                    return Alloc::Block(block);
                }
                Err(MdError::NoDataSpace) => return Alloc::NoSpace,
                Err(error) => return Alloc::Failed(error),
            }
        }
    }

    pub(super) fn check_low_water(&mut self) {
        let free = self.md.data_free_blocks();
        let mark = self.config.low_water_mark;
        if self.low_water_armed && free <= mark {
            self.low_water_armed = false;
            self.events.push_back(PoolEvent::LowWaterMark {
                free_blocks: free,
                low_water_mark: mark,
            });
        }
    }

    pub(super) fn metadata_low_watermark(&self) -> u64 {
        (self.md.metadata_nr_blocks() / 4).min(1024)
    }

    pub(super) fn check_metadata_space(&mut self) {
        let free = self.md.metadata_free_blocks_reported();
        let mark = self.metadata_low_watermark();
        if free < mark {
            if self.metadata_low_water_armed {
                self.metadata_low_water_armed = false;
                self.events.push_back(PoolEvent::MetadataLowWaterMark {
                    free_blocks: free,
                    watermark: mark,
                });
            }
        } else {
            self.metadata_low_water_armed = true;
        }
        if self.metadata_exhausted() {
            self.commit.requested = true;
        }
    }

    /// At open: a pool whose metadata is (still) down to the reserve starts
    /// out-of-metadata-space; growing the metadata device is what brings it back.
    pub fn check_metadata_space_at_open(&mut self) {
        if self.mode.metadata_writable() && self.metadata_exhausted() {
            self.enter_out_of_metadata_space();
        }
    }

    /// Free metadata is down to the reserve: stop making new mappings.
    pub(super) fn metadata_exhausted(&self) -> bool {
        self.md.metadata_free_blocks_reported() == 0
    }

    pub(super) fn park(&mut self, part: Span) {
        self.reqs[part.req].parked += 1;
        self.no_space.push_back(part);
    }

    /// Fails every span waiting for space; returns how many there were.
    pub(super) fn fail_parked(&mut self, error: IoError) -> u64 {
        let waiting = mem::take(&mut self.no_space);
        let count = waiting.len() as u64;
        for span in waiting {
            self.reqs[span.req].parked -= 1;
            self.fail_span(span, error);
        }
        count
    }

    pub(super) fn retry_parked(&mut self) {
        while let Some(span) = self.no_space.pop_front() {
            self.reqs[span.req].parked -= 1;
            self.ready.push_back(span);
        }
    }

    pub(super) fn no_data_space(&mut self, part: Span) {
        if self.mode == PoolMode::Write
            && (self.frees_since_commit || !self.quarantine.is_empty() || self.commit.flushing)
        {
            // Blocks freed in this transaction become usable after a commit.
            self.commit.requested = true;
            self.park(part);
            return;
        }
        if self.mode == PoolMode::Write {
            self.enter_out_of_data_space();
        }
        if self.error_if_no_space {
            self.fail_span(part, IoError::NoSpace);
        } else {
            self.park(part);
        }
    }

    pub(super) fn enter_out_of_data_space(&mut self) {
        let policy = if self.error_if_no_space {
            String::from(
                "no free data blocks; writes needing space fail with ENOSPC (error_if_no_space)",
            )
        } else {
            format!(
                "no free data blocks; writes needing space wait up to {} s for the pool to grow or space to be discarded, then fail with ENOSPC",
                self.config.no_space_timeout_secs
            )
        };
        self.set_mode(PoolMode::OutOfDataSpace, policy);
        self.out_of_space_since = Some(self.now_ns);
        if self.error_if_no_space {
            self.fail_parked(IoError::NoSpace);
        }
    }

    pub(super) fn leave_out_of_data_space(&mut self, reason: &str) {
        self.set_mode(PoolMode::Write, String::from(reason));
        self.out_of_space_since = None;
        self.error_if_no_space = self.config.features.error_if_no_space;
        self.retry_parked();
    }
}
