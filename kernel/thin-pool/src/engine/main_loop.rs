//! The main loop: reaping device completions, timer work, submitting device
//! requests, and the busy-block accounting that keeps freed blocks from being reused
//! under I/O in flight.

use super::*;

impl Core {
    /// Reaps device completions and runs everything that became ready, then takes
    /// one step of the merges into external origins and, when the pool is quiet,
    /// one of the discards. Returns whether anything happened.
    pub fn progress(&mut self) -> bool {
        let mut any = self.run_ready();
        if self.origin_merge_steps(None) {
            self.run_ready();
            any = true;
        }
        if self.quiet_discard_step() {
            self.run_ready();
            any = true;
        }
        any
    }

    /// Reaps device completions and runs everything that became ready, until
    /// nothing is left to do. Returns whether anything happened.
    fn run_ready(&mut self) -> bool {
        let mut any = false;
        loop {
            let mut did = false;
            while let Some(completion) = self.data.device.poll() {
                self.on_completion(completion);
                did = true;
            }
            let mut origin_done = Vec::new();
            for (_, volume) in self.volumes.iter_mut() {
                if let Some(origin) = volume.origin.as_mut() {
                    while let Some(completion) = origin.device.poll() {
                        origin_done.push(completion);
                    }
                    did |= origin.pump();
                }
            }
            did |= !origin_done.is_empty();
            for completion in origin_done {
                self.on_completion(completion);
            }
            did |= self.data.pump();
            did |= self.poll_merge_targets();
            while let Some(span) = self.ready.pop_front() {
                self.process_span(span);
                did = true;
            }
            did |= self.issue_passdowns();
            did |= self.start_commit();
            if !did {
                return any;
            }
            any = true;
        }
    }

    /// Timer work: periodic commit, no-space timeout, held-snapshot warning.
    pub fn service(&mut self, clock: &dyn Fn() -> u64) {
        let now_ns = clock();
        self.now_ns = now_ns;
        if self.md_dirty && now_ns.saturating_sub(self.last_commit_ns) >= COMMIT_PERIOD_NS {
            self.commit.requested = true;
        }
        let timeout_ns = self
            .config
            .no_space_timeout_secs
            .saturating_mul(1_000_000_000);
        if let Some(since) = self.out_of_space_since
            && self.mode == PoolMode::OutOfDataSpace
            && !self.error_if_no_space
            && timeout_ns > 0
            && now_ns.saturating_sub(since) >= timeout_ns
        {
            self.error_if_no_space = true;
            let failed = self.fail_parked(IoError::NoSpace);
            self.events.push_back(PoolEvent::NoSpaceTimeout {
                failed_writes: failed,
            });
        }
        if let (Some(block), Some(since)) = (self.md.held_root(), self.snap_held_since) {
            let seconds = now_ns.saturating_sub(since) / 1_000_000_000;
            if !self.snap_warned && seconds >= self.config.metadata_snap_warning_secs {
                self.snap_warned = true;
                self.events
                    .push_back(PoolEvent::MetadataSnapHeldTooLong { block, seconds });
            }
        }
        self.paced_step(clock);
        if self.origin_merge_steps(Some(now_ns)) {
            self.run_ready();
        }
        self.progress();
    }

    /// Runs I/O until `done`; discards go on unpaced meanwhile, since what is
    /// waited for may be one of them.
    pub(super) fn wait_until(&mut self, mut done: impl FnMut(&Self) -> bool) {
        while !done(self) {
            if !self.progress() && !self.discard_step() {
                core::hint::spin_loop();
            }
        }
    }

    pub(super) fn on_completion(&mut self, completion: Completion) {
        let Completion { tag, result, buf } = completion;
        match self.ops.remove(tag as usize) {
            DevOp::Read {
                req,
                offset,
                buf: used,
                busy,
            } => {
                self.unbusy(busy);
                self.read_done(req, offset, used, buf, result);
            }
            DevOp::OriginRead {
                req,
                offset,
                buf: used,
            } => self.read_done(req, offset, used, buf, result),
            DevOp::Write {
                req,
                buf: used,
                busy,
            } => {
                self.unbusy(busy);
                self.buffer_back(used, buf, Some(req));
                self.finish_unit(req, result);
            }
            DevOp::PrepRead {
                prep,
                segment,
                busy,
            } => {
                if let Some(block) = busy {
                    self.unbusy((block, block + 1));
                }
                self.prep_read_done(prep, segment, buf, result);
            }
            DevOp::PrepWrite { prep, buf: used } => {
                let p = &mut self.preps[prep];
                p.in_flight -= 1;
                if let Err(error) = result {
                    p.error.get_or_insert(error);
                }
                let req = p.span.req;
                self.buffer_back(used, buf, Some(req));
                self.pump_prep(prep);
            }
            DevOp::WholeBlocks {
                preps,
                req,
                buf: used,
            } => {
                // Each prep holds a unit of the request, so it is still there.
                self.buffer_back(used, buf, Some(req));
                for prep in preps {
                    let p = &mut self.preps[prep];
                    p.in_flight -= 1;
                    if let Err(error) = result {
                        p.error.get_or_insert(error);
                    }
                    self.pump_prep(prep);
                }
            }
            DevOp::Passdown { req, begin } => {
                self.passdown_ranges.remove(&begin);
                if let Some(req) = req {
                    // A failed passdown is ignored: the unmapping stands.
                    self.finish_unit(req, Ok(()));
                }
            }
            DevOp::Flush => self.flush_done(result),
            DevOp::MergeRead { dev, sector } => self.merge_read_done(dev, sector, buf, result),
            DevOp::MergeWrite { dev } => self.merge_write_done(dev, result, false),
            DevOp::MergeFlush { dev } => self.merge_write_done(dev, result, true),
        }
    }

    pub(super) fn read_done(
        &mut self,
        req: ReqId,
        offset: usize,
        used: BufUse,
        buf: IoBuf,
        result: Result<(), IoError>,
    ) {
        if used != BufUse::Lent && result.is_ok() {
            self.reqs[req].buf[offset..offset + buf.len()].copy_from_slice(&buf);
        }
        self.buffer_back(used, buf, Some(req));
        self.finish_unit(req, result);
    }

    /// A device request's buffer is back: to its request when lent, else to the pool.
    pub(super) fn buffer_back(&mut self, used: BufUse, buf: IoBuf, req: Option<ReqId>) {
        match (used, req) {
            (BufUse::Lent, Some(req)) => self.reqs[req].buf = buf,
            (BufUse::Lent, None) => {}
            (BufUse::Pooled(contents), _) => self.buffers.give(buf, contents),
        }
    }

    pub(super) fn submit_data(&mut self, op: DevOp, command: Command) {
        let tag = self.ops.insert(op) as u64;
        self.data.submit(Request { tag, command });
    }

    pub(super) fn submit_origin(&mut self, vol: VolId, op: DevOp, command: Command) {
        let tag = self.ops.insert(op) as u64;
        self.volumes[vol]
            .origin
            .as_mut()
            .expect("origin reads only for volumes with an origin")
            .submit(Request { tag, command });
    }

    pub(super) fn make_busy(&mut self, (begin, end): (u64, u64)) {
        for block in begin..end {
            *self.busy.entry(block).or_insert(0) += 1;
        }
    }

    pub(super) fn unbusy(&mut self, (begin, end): (u64, u64)) {
        for block in begin..end {
            if let Some(count) = self.busy.get_mut(&block) {
                *count -= 1;
                if *count == 0 {
                    self.busy.remove(&block);
                }
            }
        }
    }

    pub(super) fn is_busy(&self, block: u64) -> bool {
        self.busy.contains_key(&block)
            || self
                .passdown_ranges
                .range(..=block)
                .next_back()
                .is_some_and(|(_, &end)| end > block)
    }
}
