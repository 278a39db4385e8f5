//! Provisioning: new data blocks for the blocks a write touches, whole blocks
//! written together.

use super::*;

impl Core {
    /// New data blocks for the virtual blocks the span's sectors `s0..s1` touch.
    /// Blocks written whole need neither zeroing nor copying: consecutive ones whose
    /// new data blocks are consecutive too are written with one device request (with
    /// the request's own buffer when that is exactly what it carries).
    pub(super) fn provision_blocks(
        &mut self,
        span: Span,
        (s0, s1): (u64, u64),
        source: impl Fn(&Self, u64) -> Source,
    ) {
        let bs = self.block_sectors;
        let (b0, b1) = (s0 / bs, s1.div_ceil(bs));
        if b1 == b0 + 1 {
            if let Some(prep) = self.provision(span, s0, s1, b0, source(self, b0)) {
                self.pump_prep(prep);
            }
            return;
        }
        let max_group = (self.data.max_sectors() / bs).max(1) as usize;
        let mut group: Vec<PrepId> = Vec::new();
        for vblock in b0..b1 {
            let Some(prep) = self.provision(span, s0, s1, vblock, source(self, vblock)) else {
                self.write_whole_blocks(&mut group);
                continue;
            };
            if s0 > vblock * bs || (vblock + 1) * bs > s1 {
                self.write_whole_blocks(&mut group);
                self.pump_prep(prep);
                continue;
            }
            if let Some(&last) = group.last() {
                let (last, this) = (&self.preps[last], &self.preps[prep]);
                if last.new_block + 1 != this.new_block || group.len() >= max_group {
                    self.write_whole_blocks(&mut group);
                }
            }
            group.push(prep);
        }
        self.write_whole_blocks(&mut group);
    }

    /// Writes the preps of consecutive whole blocks (consecutive new data blocks)
    /// with one device request.
    pub(super) fn write_whole_blocks(&mut self, group: &mut Vec<PrepId>) {
        match group.len() {
            0 => return,
            1 => self.pump_prep(group[0]),
            _ => {
                let bs = self.block_sectors;
                let first = &self.preps[group[0]];
                let last = &self.preps[group[group.len() - 1]];
                let (v0, v1) = (first.vblock * bs, (last.vblock + 1) * bs);
                let (sector, req) = (first.new_block * bs, first.span.req);
                for &id in group.iter() {
                    let p = &mut self.preps[id];
                    p.next = bs;
                    p.in_flight += 1;
                }
                let (buf, used) = self.data_buf(req, v0, v1);
                self.submit_data(
                    DevOp::WholeBlocks {
                        preps: mem::take(group),
                        req,
                        buf: used,
                    },
                    Command::Write {
                        sector,
                        buf,
                        fua: false,
                    },
                );
            }
        }
        group.clear();
    }

    /// Starts a new data block for `vblock`, written with the span's sectors
    /// `s0..s1` inside it; the caller starts its I/O. `None` when the write could
    /// not get a block (it failed or waits for space).
    pub(super) fn provision(
        &mut self,
        span: Span,
        s0: u64,
        s1: u64,
        vblock: u64,
        source: Source,
    ) -> Option<PrepId> {
        let bs = self.block_sectors;
        let (w0, w1) = overlap((s0, s1), (vblock * bs, (vblock + 1) * bs));
        let part = Span {
            req: span.req,
            sector: w0,
            sectors: w1 - w0,
            op: span.op,
        };
        self.reqs[span.req].outstanding += 1;
        let refused = match self.mode {
            PoolMode::Fail => Some(EIO_FAILED),
            PoolMode::ReadOnly => Some(EIO_READ_ONLY),
            PoolMode::OutOfMetadataSpace => Some(EIO_NO_METADATA),
            PoolMode::Write | PoolMode::OutOfDataSpace => None,
        };
        if let Some(error) = refused {
            self.fail_span(part, error);
            return None;
        }
        if self.metadata_exhausted() {
            // Commit before using up the reserve; if that frees nothing the pool
            // goes out-of-metadata-space and this write fails.
            self.commit.requested = true;
            self.park(part);
            return None;
        }
        let new_block = match self.allocate() {
            Alloc::Block(block) => block,
            Alloc::NoSpace => {
                self.no_data_space(part);
                return None;
            }
            Alloc::Failed(error) => {
                self.metadata_failed(&error);
                self.fail_span(part, EIO_METADATA);
                return None;
            }
        };
        let dev = self.volumes[self.volume_of(&span)].dev;
        let volume = &self.volumes[self.volume_of(&span)];
        let origin_limit = volume.origin_sectors.saturating_sub(vblock * bs).min(bs);
        let segment = SEGMENT_SECTORS
            .min(bs)
            .min(self.data.max_sectors())
            .min(volume.origin.as_ref().map_or(u64::MAX, Queue::max_sectors));
        self.cells.insert((dev, vblock), Vec::new());
        let prep = self.preps.insert(Prep {
            span: part,
            dev,
            vblock,
            new_block,
            source,
            write_begin: w0 - vblock * bs,
            write_end: w1 - vblock * bs,
            origin_limit,
            segment,
            next: 0,
            in_flight: 0,
            error: None,
            generation: self.generation,
        });
        self.check_low_water();
        Some(prep)
    }
}
