//! Discards: unmapping whole blocks and passing the freed range down to the data
//! device once no I/O to it is in flight.

use super::*;

impl Core {
    pub(super) fn discard_span(
        &mut self,
        span: Span,
        dev: u64,
        b0: u64,
        b1: u64,
    ) -> Result<(), MdError> {
        let kind = self.reqs[span.req].kind;
        if !self.mode.metadata_writable() {
            if kind == Kind::WriteZeroes {
                // The blocks cannot be unmapped: zero them where possible instead.
                let write = Span {
                    op: SpanOp::Write,
                    ..span
                };
                return self.write_span(write, dev, b0, b1);
            }
            // Read-only modes complete discards without effect.
            self.finish_unit(span.req, Ok(()));
            return Ok(());
        }
        let mut freed: Vec<(u64, u64)> = Vec::new();
        let mut unmapped = false;
        let mut chunk = b0;
        while chunk < b1 {
            let end = b1.min(chunk.saturating_add(DISCARD_CHUNK_BLOCKS));
            for run in self.md.remove_range(dev, chunk, end)? {
                unmapped = true;
                self.uncommitted.mark(dev, run.begin, run.begin + run.len);
                for block in run.data_begin..run.data_begin + run.len {
                    if self.md.dec_data_block(block)? == 0 {
                        match freed.last_mut() {
                            Some((_, last_end)) if *last_end == block => *last_end += 1,
                            _ => freed.push((block, block + 1)),
                        }
                    }
                }
            }
            chunk = end;
        }
        if b1 - b0 <= FORGET_ONE_BY_ONE {
            for vblock in b0..b1 {
                self.mappings.forget(dev, vblock);
            }
        } else {
            self.mappings.clear();
        }
        if unmapped {
            self.md_dirty = true;
            let r = &mut self.reqs[span.req];
            r.needs_commit |= r.fua;
        }
        if !freed.is_empty() {
            self.frees_since_commit = true;
            if self.mode == PoolMode::OutOfDataSpace {
                self.commit.requested = true;
            }
            if self.passdown {
                for (begin, end) in freed {
                    self.reqs[span.req].outstanding += 1;
                    self.discard_after_commit.push(Passdown {
                        req: Some(span.req),
                        begin,
                        end,
                    });
                }
                self.commit.requested = true;
            }
        }
        self.finish_unit(span.req, Ok(()));
        Ok(())
    }

    /// Data blocks `begin..end` are free after a change the last commit does not
    /// have: discarded on the data device after the next commit (passdown only).
    pub(super) fn freed_by_change(&mut self, begin: u64, end: u64) {
        if !self.passdown {
            return;
        }
        match self.discard_after_commit.last_mut() {
            Some(last) if last.req.is_none() && last.end == begin => last.end = end,
            _ => self.discard_after_commit.push(Passdown {
                req: None,
                begin,
                end,
            }),
        }
    }

    /// The commit that freed the blocks is durable: their passdown may go.
    pub(super) fn queue_passdown(&mut self, passdown: Passdown) {
        self.passdown_ranges.insert(passdown.begin, passdown.end);
        self.passdowns.push(passdown);
    }

    /// The changes that freed blocks were rolled back: no passdown, and the discard
    /// requests waiting for one fail with `error`.
    pub(super) fn drop_discards_after_commit(&mut self, error: IoError) {
        for passdown in mem::take(&mut self.discard_after_commit) {
            if let Some(req) = passdown.req {
                self.finish_unit(req, Err(error));
            }
        }
    }

    /// Sends queued passdown discards whose blocks have no I/O in flight.
    pub(super) fn issue_passdowns(&mut self) -> bool {
        if self.passdowns.is_empty() {
            return false;
        }
        let mut issued = false;
        let mut waiting = Vec::new();
        for passdown in mem::take(&mut self.passdowns) {
            let busy = if (passdown.end - passdown.begin) < self.busy.len() as u64 {
                (passdown.begin..passdown.end).any(|b| self.busy.contains_key(&b))
            } else {
                self.busy
                    .keys()
                    .any(|&b| (passdown.begin..passdown.end).contains(&b))
            };
            if busy {
                waiting.push(passdown);
                continue;
            }
            issued = true;
            let bs = self.block_sectors;
            self.submit_data(
                DevOp::Passdown {
                    req: passdown.req,
                    begin: passdown.begin,
                },
                Command::Discard {
                    sector: passdown.begin * bs,
                    sectors: (passdown.end - passdown.begin) * bs,
                },
            );
        }
        self.passdowns = waiting;
        issued
    }
}
