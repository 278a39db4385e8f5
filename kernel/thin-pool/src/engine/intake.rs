//! Thin volumes and request intake: activation, validation, splitting a request
//! into spans, and completing it when its last unit finishes.

use super::*;

impl Core {
    pub fn activate(
        &mut self,
        dev: u64,
        sectors: u64,
        origin: Option<alloc::boxed::Box<dyn BlockDevice>>,
    ) -> VolId {
        let origin_sectors = origin.as_ref().map_or(0, |o| o.info().sectors);
        self.volumes.insert(Volume {
            dev,
            sectors,
            origin: origin.map(Queue::new),
            origin_sectors,
            completions: VecDeque::new(),
            open: true,
            requests: 0,
        })
    }

    /// Gives a volume a new size; requests already taken keep going.
    pub fn resize_volume(&mut self, vol: VolId, sectors: u64) {
        self.volumes[vol].sectors = sectors;
    }

    pub fn has_origin(&self, vol: VolId) -> bool {
        self.volumes[vol].origin.is_some()
    }

    /// Whether any volume (open, or closed with requests still running) uses `dev`.
    pub fn device_active(&self, dev: u64) -> bool {
        self.volumes.iter().any(|(_, v)| v.dev == dev)
    }

    pub fn volume_in_flight(&self, vol: VolId) -> usize {
        let volume = &self.volumes[vol];
        volume.requests + volume.completions.len()
    }

    /// Whether every unfinished request of the volume waits only for data space.
    pub fn volume_only_parked(&self, vol: VolId) -> bool {
        self.reqs
            .iter()
            .filter(|(_, r)| r.vol == vol)
            .all(|(_, r)| r.outstanding == r.parked)
    }

    /// Whether no request of thin device `dev` that changes data is in flight, except
    /// parts waiting for data space (which only growing the pool or discarding
    /// releases): what a snapshot of the device waits for.
    pub fn writes_settled(&self, dev: u64) -> bool {
        self.reqs.iter().all(|(_, r)| {
            self.volumes[r.vol].dev != dev || !r.kind.changes_data() || r.outstanding == r.parked
        })
    }

    pub fn take_completion(&mut self, vol: VolId) -> Option<ThinCompletion> {
        self.volumes[vol].completions.pop_front()
    }

    /// The handle is gone: completions are dropped from now on, requests waiting for
    /// space fail, and the volume disappears once nothing of it is in flight.
    pub fn close_volume(&mut self, vol: VolId) {
        self.volumes[vol].open = false;
        self.volumes[vol].completions.clear();
        let waiting = mem::take(&mut self.no_space);
        for span in waiting {
            if self.reqs[span.req].vol == vol {
                self.reqs[span.req].parked -= 1;
                self.fail_span(span, IoError::Gone);
            } else {
                self.no_space.push_back(span);
            }
        }
        self.forget_volume_if_idle(vol);
    }

    /// Removes a closed volume once nothing of it is in flight (it may be gone
    /// already: failing its last request in [`Core::close_volume`] forgets it).
    pub(super) fn forget_volume_if_idle(&mut self, vol: VolId) {
        let idle = self
            .volumes
            .get(vol)
            .is_some_and(|volume| !volume.open && volume.requests == 0);
        if idle {
            self.volumes.remove(vol);
        }
    }

    pub fn submit(&mut self, vol: VolId, request: ThinRequest) {
        let ThinRequest { tag, op } = request;
        let volume_sectors = self.volumes[vol].sectors;
        let op = match op {
            ThinOp::FastZero {
                sector,
                sectors,
                fua,
            } => {
                let inside = sector
                    .checked_add(sectors)
                    .is_some_and(|end| end <= volume_sectors);
                if inside && let Some(error) = self.fast_zero_refused(vol, sector, sectors) {
                    self.volumes[vol].completions.push_back(ThinCompletion {
                        tag,
                        result: Err(error),
                        buf: IoBuf::empty(),
                    });
                    return;
                }
                // Only unmapping is left to do (range errors are reported below).
                ThinOp::WriteZeroes {
                    sector,
                    sectors,
                    unmap: true,
                    fua,
                }
            }
            other => other,
        };
        let (kind, sector, sectors, buf, fua, unmap) = match op {
            ThinOp::Read { sector, buf } => (Kind::Read, sector, buf.sectors(), buf, false, false),
            ThinOp::Write { sector, buf, fua } => {
                (Kind::Write, sector, buf.sectors(), buf, fua, false)
            }
            ThinOp::Flush => (Kind::Flush, 0, 0, IoBuf::empty(), false, false),
            ThinOp::Discard {
                sector,
                sectors,
                fua,
            } => (Kind::Discard, sector, sectors, IoBuf::empty(), fua, false),
            ThinOp::WriteZeroes {
                sector,
                sectors,
                unmap,
                fua,
            } => (
                Kind::WriteZeroes,
                sector,
                sectors,
                IoBuf::empty(),
                fua,
                unmap,
            ),
            ThinOp::FastZero { .. } => unreachable!("turned into write-zeroes above"),
            ThinOp::BlockStatus {
                sector,
                sectors,
                max_extents,
            } => {
                let result = if sector
                    .checked_add(sectors)
                    .is_none_or(|end| end > volume_sectors)
                {
                    Err(IoError::OutOfRange)
                } else {
                    self.block_status(vol, sector, sectors, max_extents)
                        .map(ThinOutput::Extents)
                };
                self.volumes[vol].completions.push_back(ThinCompletion {
                    tag,
                    result,
                    buf: IoBuf::empty(),
                });
                return;
            }
        };
        let invalid = if sector
            .checked_add(sectors)
            .is_none_or(|end| end > volume_sectors)
        {
            Some(IoError::OutOfRange)
        } else if kind == Kind::Discard && self.config.features.ignore_discard {
            Some(IoError::Unsupported)
        } else if self.mode == PoolMode::Fail {
            Some(EIO_FAILED)
        } else {
            None
        };
        if let Some(error) = invalid {
            self.volumes[vol].completions.push_back(ThinCompletion {
                tag,
                result: Err(error),
                buf,
            });
            return;
        }
        self.volumes[vol].requests += 1;
        self.requests_accepted += 1;
        let req = self.reqs.insert(Req {
            vol,
            tag,
            kind,
            sector,
            sectors,
            buf,
            fua,
            outstanding: 1,
            parked: 0,
            error: None,
            holes: Vec::new(),
            needs_commit: false,
            accepted_ns: self.now_ns,
        });
        let span = |sector, sectors, op| Span {
            req,
            sector,
            sectors,
            op,
        };
        let end = sector + sectors;
        let none = || span(0, 0, SpanOp::Flush);
        let (spans, count) = match kind {
            Kind::Read => ([span(sector, sectors, SpanOp::Read), none(), none()], 1),
            Kind::Write => ([span(sector, sectors, SpanOp::Write), none(), none()], 1),
            Kind::Flush => ([none(), none(), none()], 1),
            Kind::Discard => ([span(sector, sectors, SpanOp::Discard), none(), none()], 1),
            Kind::WriteZeroes
                if unmap
                    && self.volumes[vol].origin.is_none()
                    && !self.config.features.ignore_discard =>
            {
                let bs = self.block_sectors;
                let first_full = sector.div_ceil(bs) * bs;
                let last_full = end / bs * bs;
                if first_full >= last_full {
                    (
                        [span(sector, sectors, SpanOp::ZeroMapped), none(), none()],
                        1,
                    )
                } else {
                    let mut spans = [none(), none(), none()];
                    let mut count = 0;
                    for part in [
                        span(sector, first_full - sector, SpanOp::ZeroMapped),
                        span(first_full, last_full - first_full, SpanOp::Discard),
                        span(last_full, end - last_full, SpanOp::ZeroMapped),
                    ] {
                        if part.sectors > 0 {
                            spans[count] = part;
                            count += 1;
                        }
                    }
                    (spans, count)
                }
            }
            Kind::WriteZeroes => ([span(sector, sectors, SpanOp::Write), none(), none()], 1),
        };
        self.reqs[req].outstanding = count as u32;
        for span in &spans[..count] {
            self.process_span(*span);
        }
    }

    /// Why zeroing `sector..sector + sectors` cannot be done without data writes
    /// (`None`: it can, by unmapping whole blocks only).
    pub(super) fn fast_zero_refused(
        &mut self,
        vol: VolId,
        sector: u64,
        sectors: u64,
    ) -> Option<IoError> {
        if self.mode == PoolMode::Fail {
            // Failed like every request, below.
            return None;
        }
        if !self.mode.metadata_writable()
            || self.config.features.ignore_discard
            || self.volumes[vol].origin.is_some()
        {
            return Some(NOT_FAST);
        }
        let bs = self.block_sectors;
        let dev = self.volumes[vol].dev;
        let end = sector + sectors;
        let (first_full, last_full) = (sector.div_ceil(bs) * bs, end / bs * bs);
        // Blocks the range covers only in part must read as zeros already.
        let partial = if sectors == 0 {
            [None, None]
        } else if first_full >= last_full {
            // No whole block: the one or two blocks it touches.
            [Some(sector / bs), Some((end - 1) / bs)]
        } else {
            [
                (sector < first_full).then_some(sector / bs),
                (end > last_full).then_some(last_full / bs),
            ]
        };
        for vblock in partial.into_iter().flatten() {
            if self.held_cell(dev, vblock, vblock + 1).is_some() {
                return Some(NOT_FAST);
            }
            match self.lookup_block(dev, vblock) {
                Ok(None) => {}
                Ok(Some(_)) => return Some(NOT_FAST),
                Err(error) => {
                    self.metadata_failed(&error);
                    return Some(EIO_METADATA);
                }
            }
        }
        None
    }

    /// One unit of a request is done (a span or a device operation).
    pub(super) fn finish_unit(&mut self, req: ReqId, result: Result<(), IoError>) {
        let r = &mut self.reqs[req];
        if let Err(error) = result {
            r.error.get_or_insert(error);
        }
        r.outstanding -= 1;
        if r.outstanding > 0 {
            return;
        }
        if r.needs_commit && r.error.is_none() {
            r.needs_commit = false;
            r.outstanding = 1;
            self.commit.next.push(req);
            return;
        }
        let r = self.reqs.remove(req);
        let result = match r.error {
            Some(error) => Err(error),
            None if r.kind == Kind::Read => {
                let mut zero_holes = r.holes;
                zero_holes.sort_unstable();
                Ok(ThinOutput::Read { zero_holes })
            }
            None => Ok(ThinOutput::Done),
        };
        let volume = &mut self.volumes[r.vol];
        volume.requests -= 1;
        if volume.open {
            volume.completions.push_back(ThinCompletion {
                tag: r.tag,
                result,
                buf: r.buf,
            });
        }
        self.forget_volume_if_idle(r.vol);
    }

    pub(super) fn fail_span(&mut self, span: Span, error: IoError) {
        self.finish_unit(span.req, Err(error));
    }
}
