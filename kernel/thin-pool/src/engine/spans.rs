//! Spans: locking their blocks in the bio prison, looking up their mappings, and
//! reading or writing mapped blocks (unmapped and shared ones go to provisioning).

use super::*;

impl Core {
    pub(super) fn volume_of(&self, span: &Span) -> VolId {
        self.reqs[span.req].vol
    }

    /// The virtual blocks a span must lock (discards: the whole blocks only).
    pub(super) fn span_blocks(&self, span: &Span) -> (u64, u64) {
        let bs = self.block_sectors;
        match span.op {
            SpanOp::Discard => (span.sector.div_ceil(bs), span.end() / bs),
            _ => (span.sector / bs, span.end().div_ceil(bs)),
        }
    }

    pub(super) fn process_span(&mut self, span: Span) {
        if self.mode == PoolMode::Fail {
            self.fail_span(span, EIO_FAILED);
            return;
        }
        if span.op == SpanOp::Flush {
            self.commit.next.push(span.req);
            return;
        }
        let dev = self.volumes[self.volume_of(&span)].dev;
        let (b0, b1) = self.span_blocks(&span);
        if let Some(key) = self.held_cell(dev, b0, b1) {
            // Processed again when that block's mapping is in place (and parked in
            // another held cell of its range, if any).
            self.cells.get_mut(&key).expect("found above").push(span);
            return;
        }
        let r = &self.reqs[span.req];
        if r.fua && !r.needs_commit && self.uncommitted.any(dev, b0, b1) {
            // It lands on a mapping (or an unmapping) the last commit does not have.
            self.reqs[span.req].needs_commit = true;
        }
        let result = match span.op {
            SpanOp::Read => self.read_span(span, dev, b0, b1),
            SpanOp::Write | SpanOp::ZeroMapped => self.write_span(span, dev, b0, b1),
            SpanOp::Discard => self.discard_span(span, dev, b0, b1),
            SpanOp::Flush => unreachable!("handled above"),
        };
        if let Err(error) = result {
            self.metadata_failed(&error);
            self.fail_span(span, EIO_METADATA);
        }
    }

    /// A cell held for one of the device's blocks `b0..b1`, if any.
    pub(super) fn held_cell(&self, dev: u64, b0: u64, b1: u64) -> Option<(u64, u64)> {
        if self.cells.is_empty() || b0 >= b1 {
            return None;
        }
        if b1 - b0 <= self.cells.len() as u64 {
            (b0..b1)
                .map(|vblock| (dev, vblock))
                .find(|key| self.cells.contains_key(key))
        } else {
            self.cells
                .keys()
                .find(|&&(d, vblock)| d == dev && (b0..b1).contains(&vblock))
                .copied()
        }
    }

    /// Mapped and unmapped runs covering virtual blocks `b0..b1`, in a vector to
    /// hand back with [`Core::recycle_runs`].
    pub(super) fn runs(&mut self, dev: u64, b0: u64, b1: u64) -> Result<Vec<Run>, MdError> {
        let mut runs = mem::take(&mut self.run_buffer);
        if b1 == b0 + 1 {
            // One block (most requests): the mapping cache, else a point lookup.
            runs.push(match self.lookup_block(dev, b0)? {
                Some(mapping) => Run::Mapped {
                    begin: b0,
                    len: 1,
                    data_begin: mapping.data_block,
                    shared: mapping.shared,
                },
                None => Run::Unmapped { begin: b0, len: 1 },
            });
            return Ok(runs);
        }
        let mut position = b0;
        while position < b1 {
            let batch = self.md.lookup_range(dev, position, b1, LOOKUP_RUNS)?;
            position = batch.last().map_or(b1, Run::end);
            runs.extend(batch);
        }
        Ok(runs)
    }

    /// One block's mapping, from the mapping cache or the metadata.
    pub(super) fn lookup_block(
        &mut self,
        dev: u64,
        vblock: u64,
    ) -> Result<Option<Cached>, MdError> {
        if let Some(hit) = self.mappings.get(dev, vblock) {
            return Ok(hit);
        }
        let found = self.md.lookup(dev, vblock)?.map(|m| Cached {
            data_block: m.data_block,
            shared: m.shared,
        });
        self.mappings.put(dev, vblock, found);
        Ok(found)
    }

    pub(super) fn recycle_runs(&mut self, mut runs: Vec<Run>) {
        runs.clear();
        self.run_buffer = runs;
    }

    /// The volume sectors of `run` inside `span`, and the first data sector of that
    /// part (mapped runs).
    pub(super) fn clip(&self, run: &Run, span: &Span) -> (u64, u64, Option<u64>) {
        let bs = self.block_sectors;
        let (run_begin, data) = match *run {
            Run::Unmapped { begin, .. } => (begin, None),
            Run::Mapped {
                begin, data_begin, ..
            } => (begin, Some(data_begin)),
        };
        let (s0, s1) = overlap((run_begin * bs, run.end() * bs), (span.sector, span.end()));
        (s0, s1, data.map(|d| d * bs + (s0 - run_begin * bs)))
    }

    pub(super) fn is_whole_request(&self, span: &Span) -> bool {
        let r = &self.reqs[span.req];
        span.sector == r.sector && span.sectors == r.sectors
    }

    pub(super) fn read_span(
        &mut self,
        span: Span,
        dev: u64,
        b0: u64,
        b1: u64,
    ) -> Result<(), MdError> {
        let runs = self.runs(dev, b0, b1)?;
        let vol = self.volume_of(&span);
        let req_sector = self.reqs[span.req].sector;
        let data_max = self.data.max_sectors();
        let single = runs.len() == 1 && self.is_whole_request(&span);
        let bs = self.block_sectors;
        for run in &runs {
            let (s0, s1, data) = self.clip(run, &span);
            match data {
                Some(data_sector) => {
                    let lend = single && s1 - s0 <= data_max;
                    let mut at = s0;
                    while at < s1 {
                        let len = (s1 - at).min(data_max);
                        let first = data_sector + (at - s0);
                        let busy = (first / bs, (first + len).div_ceil(bs));
                        self.make_busy(busy);
                        let (buf, used) = self.read_buf(span.req, lend, len);
                        self.reqs[span.req].outstanding += 1;
                        self.submit_data(
                            DevOp::Read {
                                req: span.req,
                                offset: ((at - req_sector) as usize) * SECTOR_SIZE,
                                buf: used,
                                busy,
                            },
                            Command::Read { sector: first, buf },
                        );
                        at += len;
                    }
                }
                None => self.read_unmapped(span, vol, s0, s1, single),
            }
        }
        self.recycle_runs(runs);
        self.finish_unit(span.req, Ok(()));
        Ok(())
    }

    /// Unprovisioned sectors `s0..s1`: from the origin below its end, zeros beyond.
    pub(super) fn read_unmapped(&mut self, span: Span, vol: VolId, s0: u64, s1: u64, single: bool) {
        let req_sector = self.reqs[span.req].sector;
        let volume = &self.volumes[vol];
        let origin_end = if volume.origin.is_some() {
            volume.origin_sectors.clamp(s0, s1)
        } else {
            s0
        };
        if origin_end > s0 {
            let max = volume.origin.as_ref().map_or(8, Queue::max_sectors);
            let lend = single && origin_end == s1 && s1 - s0 <= max;
            let mut at = s0;
            while at < origin_end {
                let len = (origin_end - at).min(max);
                let (buf, used) = self.read_buf(span.req, lend, len);
                self.reqs[span.req].outstanding += 1;
                self.submit_origin(
                    vol,
                    DevOp::OriginRead {
                        req: span.req,
                        offset: ((at - req_sector) as usize) * SECTOR_SIZE,
                        buf: used,
                    },
                    Command::Read { sector: at, buf },
                );
                at += len;
            }
        }
        if origin_end < s1 {
            let r = &mut self.reqs[span.req];
            let from = ((origin_end - req_sector) as usize) * SECTOR_SIZE;
            let to = ((s1 - req_sector) as usize) * SECTOR_SIZE;
            r.buf[from..to].fill(0);
            r.holes.push(SectorRun {
                start: origin_end - req_sector,
                sectors: s1 - origin_end,
            });
        }
    }

    /// A buffer for a device read of `sectors` on behalf of `req`: the request's own
    /// buffer when the read fills it exactly (`lend`), else a pooled one to copy from.
    pub(super) fn read_buf(&mut self, req: ReqId, lend: bool, sectors: u64) -> (IoBuf, BufUse) {
        if lend {
            (mem::take(&mut self.reqs[req].buf), BufUse::Lent)
        } else {
            (self.buffers.take(sectors), BufUse::Pooled(Contents::Stale))
        }
    }

    /// A buffer with the data a request writes at volume sectors `s0..s1` (zeros for
    /// write-zeroes): the request's own buffer when it holds exactly that, else a
    /// pooled copy.
    pub(super) fn data_buf(&mut self, req: ReqId, s0: u64, s1: u64) -> (IoBuf, BufUse) {
        let r = &mut self.reqs[req];
        if r.kind == Kind::Write
            && r.sector == s0
            && r.sectors == s1 - s0
            && r.buf.len() == (s1 - s0) as usize * SECTOR_SIZE
        {
            return (mem::take(&mut r.buf), BufUse::Lent);
        }
        if self.reqs[req].kind != Kind::Write {
            let buf = self.buffers.take_zeroed(s1 - s0);
            return (buf, BufUse::Pooled(Contents::ZeroOutside(0, 0)));
        }
        let mut buf = self.buffers.take(s1 - s0);
        let r = &self.reqs[req];
        let from = ((s0 - r.sector) as usize) * SECTOR_SIZE;
        let len = buf.len();
        buf.copy_from_slice(&r.buf[from..from + len]);
        (buf, BufUse::Pooled(Contents::Stale))
    }

    pub(super) fn write_span(
        &mut self,
        span: Span,
        dev: u64,
        b0: u64,
        b1: u64,
    ) -> Result<(), MdError> {
        let runs = self.runs(dev, b0, b1)?;
        let bs = self.block_sectors;
        let data_max = self.data.max_sectors();
        let fua = self.reqs[span.req].fua;
        for run in &runs {
            let (s0, s1, data) = self.clip(run, &span);
            match *run {
                Run::Mapped { shared: false, .. } => {
                    let data_sector = data.expect("mapped run");
                    let mut at = s0;
                    while at < s1 {
                        let len = (s1 - at).min(data_max);
                        let first = data_sector + (at - s0);
                        let busy = (first / bs, (first + len).div_ceil(bs));
                        self.make_busy(busy);
                        let (buf, used) = self.data_buf(span.req, at, at + len);
                        self.reqs[span.req].outstanding += 1;
                        self.submit_data(
                            DevOp::Write {
                                req: span.req,
                                buf: used,
                                busy,
                            },
                            Command::Write {
                                sector: first,
                                buf,
                                fua,
                            },
                        );
                        at += len;
                    }
                }
                Run::Mapped {
                    begin, data_begin, ..
                } => self.provision_blocks(span, (s0, s1), |_, vblock| {
                    Source::Data(data_begin + (vblock - begin))
                }),
                Run::Unmapped { .. } if span.op == SpanOp::ZeroMapped => {}
                Run::Unmapped { .. } => self.provision_blocks(span, (s0, s1), |core, vblock| {
                    core.unmapped_source(span, vblock)
                }),
            }
        }
        self.recycle_runs(runs);
        self.finish_unit(span.req, Ok(()));
        Ok(())
    }

    pub(super) fn unmapped_source(&self, span: Span, vblock: u64) -> Source {
        let volume = &self.volumes[self.volume_of(&span)];
        if volume.origin.is_some() && vblock * self.block_sectors < volume.origin_sectors {
            Source::Origin
        } else if self.config.features.skip_block_zeroing {
            Source::Nothing
        } else {
            Source::Zero
        }
    }
}
