//! Merging a thin device into its external origin: every block the device has
//! provisioned is copied to the same place on the origin, and then unmapped, so
//! that in the end the device maps nothing and reads entirely from the origin —
//! while its volume keeps serving I/O.
//!
//! The work goes in batches of a few blocks. A batch locks its virtual blocks in
//! the bio prison (requests touching them wait, as for a block being provisioned),
//! after the I/O already in flight on their data blocks has finished; reads each
//! block from the data device and writes it to the origin; flushes the origin; then
//! unmaps the blocks in the current transaction (committed with the next commit) and
//! releases the waiting requests, which now find the blocks unmapped: reads go to the origin,
//! writes provision again (copying from the origin, which has the data). So at any
//! power cut the committed metadata either still maps a block — whose data block is
//! untouched — or the origin has durably received it before the unmapping was
//! committed. Blocks provisioned again after their copy are found by the next pass
//! over the device; the merge is complete when a pass finds no mapping at all.
//!
//! Each poll of the pool takes at most one step (finishing a batch, starting the
//! next). While clients have requests in the pool, a batch starts only from the
//! timer (`service`), and not before three times the last batch's duration has
//! passed, so copying takes at most about a quarter of the devices' time. The
//! unmappings are committed with the pool's next commit, not one per batch.

use super::*;

/// Sectors copied per batch, at most (each batch ends with an origin flush), and
/// at most this many blocks.
const BATCH_SECTORS: u64 = 8192;
const BATCH_BLOCKS: u64 = 64;
/// While requests come in, a batch is followed by three times its own time
/// without batches, as deletes are paced.
const BUSY_PAUSE_FACTOR: u64 = 3;

/// How far a merge into an external origin has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginMergeProgress {
    pub dev: u64,
    /// Blocks copied to the origin and unmapped so far.
    pub copied: u64,
    /// `copied` plus the blocks mapped now (blocks written again count again).
    pub total: u64,
    /// The pool's clock when the merge started.
    pub started_ns: u64,
}

/// A merge of thin device `dev` into its external origin.
pub(crate) struct OriginMerge {
    dev: u64,
    /// The origin, writable.
    target: Queue,
    origin_sectors: u64,
    copied: u64,
    started_ns: u64,
    /// The next virtual block this pass looks at.
    cursor: u64,
    /// The batch: (virtual block, data block), locked and marked busy.
    batch: Vec<(u64, u64)>,
    /// Reads, writes and the flush of the batch not finished yet.
    in_flight: u32,
    /// When the batch started (the pool's clock at the last timer call); the last
    /// batch ended since the last timer call; while requests come in, no batch
    /// before `next_batch_ns`.
    batch_started_ns: u64,
    pause_pending: bool,
    next_batch_ns: u64,
    /// Requests the pool had accepted when the batch started: more now means
    /// clients are doing I/O, even if none is in the pool at this moment.
    requests_at_batch: u64,
    flushed: bool,
    error: Option<IoError>,
}

impl Core {
    /// Starts merging the device of volume `vol` into its external origin, written
    /// through `target` (the same sectors as the origin the volume reads).
    pub fn start_origin_merge(
        &mut self,
        vol: VolId,
        target: alloc::boxed::Box<dyn BlockDevice>,
    ) -> Result<(), MessageError> {
        self.require_writable_metadata()?;
        let (dev, origin_sectors) = {
            let volume = &self.volumes[vol];
            (volume.dev, volume.origin_sectors)
        };
        let context = format!("Merge of thin device {dev} into its origin failed");
        if self.volumes[vol].origin.is_none() {
            return Err(MessageError::new(
                Errno::Einval,
                format!("{context}: the volume has no external origin"),
            ));
        }
        if self.origin_merges.iter().any(|job| job.dev == dev) {
            return Err(MessageError::new(
                Errno::Ebusy,
                format!("{context}: a merge into the origin is running already"),
            ));
        }
        if target.info().sectors != origin_sectors || target.info().read_only {
            return Err(MessageError::new(
                Errno::Einval,
                format!(
                    "{context}: the target must be the origin's {origin_sectors} sectors, writable"
                ),
            ));
        }
        let highest = self
            .md
            .highest_mapped(dev)
            .map_err(|e| md_error_to_message(&e, &context))?;
        if let Some(block) = highest
            && (block + 1) * self.block_sectors > origin_sectors
        {
            return Err(MessageError::new(
                Errno::Einval,
                format!(
                    "{context}: block {block} is mapped and ends past the origin's end (sector {origin_sectors})"
                ),
            ));
        }
        self.origin_merges.push(OriginMerge {
            dev,
            target: Queue::new(target),
            origin_sectors,
            copied: 0,
            started_ns: self.now_ns,
            cursor: 0,
            batch: Vec::new(),
            in_flight: 0,
            batch_started_ns: 0,
            pause_pending: false,
            next_batch_ns: 0,
            requests_at_batch: self.requests_accepted,
            flushed: false,
            error: None,
        });
        Ok(())
    }

    /// Merges into external origins under way.
    pub fn origin_merges(&mut self) -> Vec<OriginMergeProgress> {
        let mut out = Vec::new();
        for index in 0..self.origin_merges.len() {
            let job = &self.origin_merges[index];
            let (dev, copied, started_ns) = (job.dev, job.copied, job.started_ns);
            let mapped = self.md.mapped_blocks(dev).unwrap_or(0);
            out.push(OriginMergeProgress {
                dev,
                copied,
                total: copied + mapped,
                started_ns,
            });
        }
        out
    }

    /// Whether thin device `dev` is being merged into its origin.
    pub(super) fn origin_merging(&self, dev: u64) -> bool {
        self.origin_merges.iter().any(|job| job.dev == dev)
    }

    /// Reaps the origins' completions; returns whether there were any.
    pub(super) fn poll_merge_targets(&mut self) -> bool {
        let mut done = Vec::new();
        let mut moved = false;
        for job in &mut self.origin_merges {
            while let Some(completion) = job.target.device.poll() {
                done.push(completion);
            }
            moved |= job.target.pump();
        }
        let any = moved || !done.is_empty();
        for completion in done {
            self.on_completion(completion);
        }
        any
    }

    /// Finishes batches whose I/O is done and starts new ones (while requests are
    /// in the pool, only from the timer, which gives the time `timer_ns`, and
    /// paced). Returns whether anything happened.
    pub(super) fn origin_merge_steps(&mut self, timer_ns: Option<u64>) -> bool {
        let mut did = false;
        let mut index = 0;
        while index < self.origin_merges.len() {
            let job = &self.origin_merges[index];
            if job.in_flight > 0 {
                index += 1;
                continue;
            }
            let dev = job.dev;
            if !job.batch.is_empty() {
                did = true;
                if !self.finish_batch(index) {
                    continue;
                }
            }
            let job = &mut self.origin_merges[index];
            let idle = self.reqs.is_empty() && self.requests_accepted == job.requests_at_batch;
            if let Some(now) = timer_ns
                && job.pause_pending
            {
                // The batch took at most from its start to this timer call.
                let took = now.saturating_sub(job.batch_started_ns);
                job.next_batch_ns = now + took * BUSY_PAUSE_FACTOR;
                job.pause_pending = false;
            }
            let paced = timer_ns.is_some_and(|now| !job.pause_pending && now >= job.next_batch_ns);
            if (idle || paced) && self.mode.metadata_writable() {
                match self.start_batch(index) {
                    Ok(true) => did = true,
                    Ok(false) => {}
                    Err(why) => {
                        self.end_origin_merge(index, Some(why));
                        did = true;
                        continue;
                    }
                }
            }
            if self
                .origin_merges
                .get(index)
                .is_some_and(|job| job.dev == dev)
            {
                index += 1;
            }
        }
        did
    }

    /// Collects and starts the next batch of the merge at `index`; returns whether
    /// one started. A pass that reaches the end with nothing left ends the merge.
    fn start_batch(&mut self, index: usize) -> Result<bool, String> {
        let (dev, origin_sectors, cursor) = {
            let job = &self.origin_merges[index];
            (job.dev, job.origin_sectors, job.cursor)
        };
        let md_error = |e: MdError| format!("reading the mappings failed: {e}");
        let end = self
            .md
            .highest_mapped(dev)
            .map_err(md_error)?
            .map_or(0, |h| h + 1);
        let bs = self.block_sectors;
        let most = (BATCH_SECTORS / bs).clamp(1, BATCH_BLOCKS) as usize;
        let mut batch = Vec::new();
        let mut position = cursor;
        'runs: while position < end && batch.len() < most {
            let runs = self
                .md
                .lookup_range(dev, position, end, LOOKUP_RUNS)
                .map_err(md_error)?;
            for run in runs {
                let Run::Mapped {
                    begin,
                    len,
                    data_begin,
                    ..
                } = run
                else {
                    position = run.end();
                    continue;
                };
                for k in 0..len {
                    let (vblock, data) = (begin + k, data_begin + k);
                    position = vblock + 1;
                    if (vblock + 1) * bs > origin_sectors {
                        return Err(format!(
                            "block {vblock} was written past the origin's end (sector {origin_sectors})"
                        ));
                    }
                    // Blocks being provisioned or with I/O in flight wait for the
                    // next pass.
                    if self.cells.contains_key(&(dev, vblock)) || self.is_busy(data) {
                        continue;
                    }
                    batch.push((vblock, data));
                    if batch.len() == most {
                        break 'runs;
                    }
                }
            }
        }
        self.origin_merges[index].cursor = position;
        if batch.is_empty() {
            if position < end {
                return Ok(false);
            }
            self.origin_merges[index].cursor = 0;
            // Done when nothing is mapped and no request of the device is in the
            // engine (one could be provisioning a block right now).
            let requests = self
                .reqs
                .iter()
                .any(|(_, r)| self.volumes[r.vol].dev == dev);
            if !requests && self.md.mapped_blocks(dev).map_err(md_error)? == 0 {
                self.end_origin_merge(index, None);
                return Ok(true);
            }
            return Ok(false);
        }
        let segment = SEGMENT_SECTORS.min(bs).min(self.data.max_sectors());
        for &(vblock, data) in &batch {
            self.cells.insert((dev, vblock), Vec::new());
            self.make_busy((data, data + 1));
            let mut offset = 0;
            while offset < bs {
                let sectors = segment.min(bs - offset);
                self.origin_merges[index].in_flight += 1;
                self.submit_data(
                    DevOp::MergeRead {
                        dev,
                        sector: vblock * bs + offset,
                    },
                    Command::Read {
                        sector: data * bs + offset,
                        buf: IoBuf::with_sectors(sectors as usize),
                    },
                );
                offset += sectors;
            }
        }
        let job = &mut self.origin_merges[index];
        job.batch = batch;
        job.flushed = false;
        job.batch_started_ns = self.now_ns;
        job.requests_at_batch = self.requests_accepted;
        Ok(true)
    }

    /// A read of the batch is done: its data goes to the origin.
    pub(super) fn merge_read_done(
        &mut self,
        dev: u64,
        sector: u64,
        buf: IoBuf,
        result: Result<(), IoError>,
    ) {
        let Some(index) = self.origin_merges.iter().position(|job| job.dev == dev) else {
            return;
        };
        if let Err(error) = result {
            let job = &mut self.origin_merges[index];
            job.in_flight -= 1;
            job.error.get_or_insert(error);
            return;
        }
        let tag = self.ops.insert(DevOp::MergeWrite { dev }) as u64;
        let command = Command::Write {
            sector,
            buf,
            fua: false,
        };
        self.origin_merges[index]
            .target
            .submit(Request { tag, command });
    }

    /// A write or the flush of the batch is done; after the last write, the flush.
    pub(super) fn merge_write_done(&mut self, dev: u64, result: Result<(), IoError>, flush: bool) {
        let Some(index) = self.origin_merges.iter().position(|job| job.dev == dev) else {
            return;
        };
        let job = &mut self.origin_merges[index];
        job.in_flight -= 1;
        if let Err(error) = result {
            job.error.get_or_insert(error);
        }
        if flush {
            job.flushed = true;
        } else if job.in_flight == 0 && job.error.is_none() {
            job.in_flight = 1;
            let tag = self.ops.insert(DevOp::MergeFlush { dev }) as u64;
            self.origin_merges[index].target.submit(Request {
                tag,
                command: Command::Flush,
            });
        }
    }

    /// The batch's I/O is over: with its copy flushed to the origin, its blocks
    /// are unmapped (committed soon) and the requests waiting for them go on.
    /// Returns whether the merge is still there.
    fn finish_batch(&mut self, index: usize) -> bool {
        let job = &mut self.origin_merges[index];
        let dev = job.dev;
        let batch = mem::take(&mut job.batch);
        let failure = match (job.error.take(), job.flushed) {
            (Some(error), _) => Some(format!("copying to the origin failed: {error}")),
            (None, false) => Some(String::from("the origin flush did not happen")),
            (None, true) if !self.mode.metadata_writable() => {
                Some(String::from("the pool's metadata is not writable any more"))
            }
            (None, true) => None,
        };
        let mut unmapped = 0;
        let mut md_failure = None;
        for &(vblock, data) in &batch {
            if failure.is_none() && md_failure.is_none() {
                match self.unmap_merged(dev, vblock) {
                    Ok(()) => unmapped += 1,
                    Err(error) => {
                        self.metadata_failed(&error);
                        md_failure = Some(format!("unmapping block {vblock} failed: {error}"));
                    }
                }
            }
            self.unbusy((data, data + 1));
            self.release_cell(dev, vblock);
        }
        if unmapped > 0 {
            // Committed with the next commit (periodic, or one a request needs):
            // until then the mappings stand, over data the origin has too.
            self.md_dirty = true;
            self.frees_since_commit = true;
            self.origin_merges[index].copied += unmapped;
        }
        self.origin_merges[index].pause_pending = true;
        match failure.or(md_failure) {
            Some(why) => {
                self.end_origin_merge(index, Some(why));
                false
            }
            None => true,
        }
    }

    fn unmap_merged(&mut self, dev: u64, vblock: u64) -> Result<(), MdError> {
        self.mappings.forget(dev, vblock);
        if let Some(mapping) = self.md.remove(dev, vblock)? {
            self.uncommitted.mark(dev, vblock, vblock + 1);
            if self.md.dec_data_block(mapping.data_block)? == 0 {
                self.freed_by_change(mapping.data_block, mapping.data_block + 1);
            }
        }
        Ok(())
    }

    /// Ends the merge at `index`: done, or failed for the reason given (what was
    /// copied and unmapped so far stays so).
    fn end_origin_merge(&mut self, index: usize, failure: Option<String>) {
        let job = self.origin_merges.remove(index);
        // What was unmapped becomes durable soon, whatever comes next.
        self.commit.requested |= self.md_dirty;
        self.events.push_back(match failure {
            None => PoolEvent::OriginMergeFinished {
                dev: job.dev,
                blocks: job.copied,
            },
            Some(why) => PoolEvent::OriginMergeFailed { dev: job.dev, why },
        });
    }
}
