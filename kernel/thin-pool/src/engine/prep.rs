//! Preps: a new block is zeroed or copied (from the shared block or the external
//! origin) with the written data laid over it, then mapped.

use super::*;

impl Core {
    pub(super) fn pump_prep(&mut self, id: PrepId) {
        loop {
            let p = &self.preps[id];
            if p.in_flight >= PREP_WINDOW || p.next >= self.block_sectors {
                break;
            }
            let s0 = p.next;
            let s1 = (s0 + p.segment).min(self.block_sectors);
            self.preps[id].next = s1;
            self.start_segment(id, s0, s1);
        }
        let p = &self.preps[id];
        if p.next >= self.block_sectors && p.in_flight == 0 {
            self.prep_done(id);
        }
    }

    /// Copies the written part of the segment `s0..s1` (block-relative) into `buf`,
    /// which holds the segment; returns the byte range of `buf` it wrote.
    pub(super) fn overlay(&self, id: PrepId, s0: u64, s1: u64, buf: &mut IoBuf) -> (usize, usize) {
        let p = &self.preps[id];
        let (o0, o1) = overlap((s0, s1), (p.write_begin, p.write_end));
        if o0 >= o1 {
            return (0, 0);
        }
        let r = &self.reqs[p.span.req];
        let at = ((o0 - s0) as usize) * SECTOR_SIZE;
        let len = ((o1 - o0) as usize) * SECTOR_SIZE;
        if r.kind == Kind::Write {
            let from = ((p.vblock * self.block_sectors + o0 - r.sector) as usize) * SECTOR_SIZE;
            buf[at..at + len].copy_from_slice(&r.buf[from..from + len]);
        } else {
            buf[at..at + len].fill(0);
        }
        (at, at + len)
    }

    pub(super) fn prep_write(&mut self, id: PrepId, s0: u64, buf: IoBuf, used: BufUse) {
        let p = &mut self.preps[id];
        p.in_flight += 1;
        let sector = p.new_block * self.block_sectors + s0;
        self.submit_data(
            DevOp::PrepWrite {
                prep: id,
                buf: used,
            },
            Command::Write {
                sector,
                buf,
                fua: false,
            },
        );
    }

    pub(super) fn start_segment(&mut self, id: PrepId, s0: u64, s1: u64) {
        let p = &self.preps[id];
        let (w0, w1) = (p.write_begin, p.write_end);
        let bs = self.block_sectors;
        let span = p.span;
        if w0 <= s0 && s1 <= w1 {
            let base = p.vblock * bs;
            let (buf, used) = self.data_buf(span.req, base + s0, base + s1);
            self.prep_write(id, s0, buf, used);
            return;
        }
        let source = match p.source {
            Source::Origin if s0 >= p.origin_limit => {
                if self.config.features.skip_block_zeroing {
                    Source::Nothing
                } else {
                    Source::Zero
                }
            }
            other => other,
        };
        match source {
            Source::Nothing => {
                let (o0, o1) = overlap((s0, s1), (w0, w1));
                if o0 < o1 {
                    let base = p.vblock * bs;
                    let (buf, used) = self.data_buf(span.req, base + o0, base + o1);
                    self.prep_write(id, o0, buf, used);
                }
            }
            Source::Zero => {
                let mut buf = self.buffers.take_zeroed(s1 - s0);
                let (from, to) = self.overlay(id, s0, s1, &mut buf);
                self.prep_write(id, s0, buf, BufUse::Pooled(Contents::ZeroOutside(from, to)));
            }
            Source::Data(old) => {
                self.make_busy((old, old + 1));
                self.preps[id].in_flight += 1;
                let buf = self.buffers.take(s1 - s0);
                self.submit_data(
                    DevOp::PrepRead {
                        prep: id,
                        segment: (s0, s1),
                        busy: Some(old),
                    },
                    Command::Read {
                        sector: old * bs + s0,
                        buf,
                    },
                );
            }
            Source::Origin => {
                let end = s1.min(p.origin_limit);
                let sector = p.vblock * bs + s0;
                let vol = self.volume_of(&span);
                self.preps[id].in_flight += 1;
                let buf = self.buffers.take(end - s0);
                self.submit_origin(
                    vol,
                    DevOp::PrepRead {
                        prep: id,
                        segment: (s0, s1),
                        busy: None,
                    },
                    Command::Read { sector, buf },
                );
            }
        }
    }

    pub(super) fn prep_read_done(
        &mut self,
        id: PrepId,
        (s0, s1): (u64, u64),
        read: IoBuf,
        result: Result<(), IoError>,
    ) {
        self.preps[id].in_flight -= 1;
        if let Err(error) = result {
            self.preps[id].error.get_or_insert(error);
            self.buffers.give(read, Contents::Stale);
            self.pump_prep(id);
            return;
        }
        let mut buf = if read.sectors() == s1 - s0 {
            read
        } else {
            // The origin ends inside the segment: zeros after its end.
            let mut full = self.buffers.take_zeroed(s1 - s0);
            full[..read.len()].copy_from_slice(&read);
            self.buffers.give(read, Contents::Stale);
            full
        };
        self.overlay(id, s0, s1, &mut buf);
        self.prep_write(id, s0, buf, BufUse::Pooled(Contents::Stale));
    }

    pub(super) fn release_cell(&mut self, dev: u64, vblock: u64) {
        if let Some(waiting) = self.cells.remove(&(dev, vblock)) {
            self.ready.extend(waiting);
        }
    }

    pub(super) fn prep_done(&mut self, id: PrepId) {
        let p = &self.preps[id];
        if p.generation != self.generation {
            // The transaction that allocated the block was rolled back.
            let p = self.preps.remove(id);
            self.release_cell(p.dev, p.vblock);
            return self.fail_span(p.span, EIO_METADATA);
        }
        if let Some(error) = p.error {
            let p = self.preps.remove(id);
            self.provisional.remove(&p.new_block);
            if let Err(md_error) = self.md.dec_data_block(p.new_block) {
                self.metadata_failed(&md_error);
            }
            self.release_cell(p.dev, p.vblock);
            return self.fail_span(p.span, error);
        }
        if self.commit.flushing {
            self.deferred.push(id);
            return;
        }
        let p = self.preps.remove(id);
        let result = self
            .md
            .insert(p.dev, p.vblock, p.new_block)
            .and_then(|old| {
                self.provisional.remove(&p.new_block);
                self.md_dirty = true;
                self.uncommitted.mark(p.dev, p.vblock, p.vblock + 1);
                // A mapping made now is never shared: the device's last snapshot
                // is not later than the current time.
                let mapping = Cached {
                    data_block: p.new_block,
                    shared: false,
                };
                self.mappings.put(p.dev, p.vblock, Some(mapping));
                if let Some(old) = old
                    && self.md.dec_data_block(old)? == 0
                {
                    self.frees_since_commit = true;
                    self.freed_by_change(old, old + 1);
                }
                Ok(())
            });
        self.release_cell(p.dev, p.vblock);
        match result {
            Ok(()) => {
                let r = &mut self.reqs[p.span.req];
                r.needs_commit |= r.fua;
                self.check_metadata_space();
                self.finish_unit(p.span.req, Ok(()));
            }
            Err(error) => {
                self.metadata_failed(&error);
                self.fail_span(p.span, EIO_METADATA);
            }
        }
    }
}
