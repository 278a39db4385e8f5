//! Discards: unmapping whole blocks and passing the freed range down to the data
//! device once no I/O to it is in flight.
//!
//! A discard unmaps at most [`DISCARD_STEP_MAPPINGS`] mappings per step, as a
//! delete releases them: the first step when the request is processed, the next
//! ones from the poll while the pool has nothing else to do, or from the timer,
//! paced as deletes are, while other requests come in. Each step's unmappings are
//! committed like any other change, and the blocks they free are neither reused
//! (the space map hands out only blocks free at the last commit) nor passed down
//! before the commit that unmaps them.

use super::*;

/// Mappings a discard unmaps per step (about a millisecond of CPU, as a delete's).
pub(super) const DISCARD_STEP_MAPPINGS: u64 = deletion::DELETE_STEP_MAPPINGS;

/// How far a discard has unmapped its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardProgress {
    /// The thin device and the discarded sectors.
    pub dev: u64,
    pub sector: u64,
    pub sectors: u64,
    /// Sectors from `sector` on that are unmapped (or were not mapped).
    pub done: u64,
    /// The pool's clock when the request came in.
    pub started_ns: u64,
}

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
        // One bounded piece of the range; the rest waits for a later step.
        let (runs, rest) = self
            .md
            .remove_range_bounded(dev, b0, b1, DISCARD_STEP_MAPPINGS)?;
        let unmapped: u64 = runs.iter().map(|run| run.len).sum();
        let mut freed: Vec<(u64, u64)> = Vec::new();
        for run in &runs {
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
        // The cache holds what the metadata says: only the unmapped blocks change.
        if unmapped <= FORGET_ONE_BY_ONE {
            for run in &runs {
                for vblock in run.begin..run.begin + run.len {
                    self.mappings.forget(dev, vblock);
                }
            }
        } else {
            self.mappings.clear();
        }
        if unmapped > 0 {
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
        if rest < b1 {
            let sector = rest * self.block_sectors;
            self.discards.push_back(Span {
                sector,
                sectors: span.end() - sector,
                ..span
            });
            return Ok(());
        }
        self.finish_unit(span.req, Ok(()));
        Ok(())
    }

    /// Unmaps the next piece of the discard that waited longest; returns whether
    /// there was one.
    pub(super) fn discard_step(&mut self) -> bool {
        let Some(span) = self.discards.pop_front() else {
            return false;
        };
        self.process_span(span);
        true
    }

    /// A step of the discards still unmapping, when nothing but them (and writes
    /// waiting for space) is in the pool and no request came in since the last
    /// call: a pool busy with other requests unmaps only from the timer, paced.
    pub(super) fn quiet_discard_step(&mut self) -> bool {
        let quiet = self.requests_accepted == self.requests_at_last_poll
            && self.reqs.len() <= self.discards.len() + self.no_space.len();
        self.requests_at_last_poll = self.requests_accepted;
        quiet && self.discard_step()
    }

    /// Discards still unmapping their range, oldest first.
    pub fn discards(&self) -> Vec<DiscardProgress> {
        self.discards
            .iter()
            .map(|span| {
                let r = &self.reqs[span.req];
                DiscardProgress {
                    dev: self.volumes[r.vol].dev,
                    sector: r.sector,
                    sectors: r.sectors,
                    done: span.sector - r.sector,
                    started_ns: r.accepted_ns,
                }
            })
            .collect()
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
