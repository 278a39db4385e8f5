//! I/O of a `thin` device: NBD operations handed to the pool engine's volume, whose
//! answers (holes, zero runs, block status) come from the pool's mappings.

use alloc::collections::VecDeque;
use blockdev::BlockDevice;
use nbd::{BackendError, IoCompletion, IoOp, IoOutput};
use thin_pool::{NOT_FAST, ThinCompletion, ThinOp, ThinOutput, ThinRequest, ThinVolume};

/// The tag of the flush a suspend sends (NBD requests never use it: the server
/// numbers its requests from 0).
const FLUSH_TAG: u64 = u64::MAX;

pub(crate) struct ThinIo {
    volume: ThinVolume,
    read_only: bool,
    /// Requests the volume refused as full, submitted again first, in order.
    waiting: VecDeque<ThinRequest>,
    /// Completions decided here, or collected while draining.
    done: VecDeque<IoCompletion>,
}

impl ThinIo {
    pub(crate) fn new(volume: ThinVolume, read_only: bool) -> Self {
        ThinIo {
            volume,
            read_only,
            waiting: VecDeque::new(),
            done: VecDeque::new(),
        }
    }

    pub(crate) fn sectors(&self) -> u64 {
        self.volume.info().sectors
    }

    /// A new length from a reloaded table (same pool, device and origin).
    pub(crate) fn resize(&mut self, sectors: u64) {
        self.volume.resize(sectors);
    }

    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    pub(crate) fn discard(&self) -> bool {
        self.volume.info().discard
    }

    /// Starts merging the thin device into its external origin, written through
    /// `target`.
    pub(crate) fn start_origin_merge(
        &mut self,
        target: alloc::boxed::Box<dyn BlockDevice>,
    ) -> Result<(), thin_pool::MessageError> {
        self.volume.start_origin_merge(target)
    }

    pub(crate) fn congested(&self) -> bool {
        !self.waiting.is_empty()
    }

    pub(crate) fn submit(&mut self, tag: u64, op: IoOp) {
        let writes = !matches!(
            op,
            IoOp::Read { .. } | IoOp::Flush | IoOp::Cache { .. } | IoOp::BlockStatus { .. }
        );
        if writes && self.read_only {
            return self.finish(tag, Err(BackendError::ReadOnly));
        }
        let op = match op {
            IoOp::Read { sector, buf } => ThinOp::Read { sector, buf },
            IoOp::Write { sector, buf, fua } => ThinOp::Write { sector, buf, fua },
            IoOp::Flush => ThinOp::Flush,
            IoOp::Trim {
                sector,
                sectors,
                fua,
            } => {
                if !self.discard() {
                    return self.finish(tag, Ok(IoOutput::Done));
                }
                ThinOp::Discard {
                    sector,
                    sectors,
                    fua,
                }
            }
            // Fast zeroing unmaps; with NO_HOLE nothing is faster than writing.
            IoOp::WriteZeroes {
                sector,
                sectors,
                fua,
                may_unmap: true,
                fast_only: true,
            } => ThinOp::FastZero {
                sector,
                sectors,
                fua,
            },
            IoOp::WriteZeroes {
                fast_only: true, ..
            } => return self.finish(tag, Err(BackendError::NotFast)),
            IoOp::WriteZeroes {
                sector,
                sectors,
                fua,
                may_unmap,
                ..
            } => ThinOp::WriteZeroes {
                sector,
                sectors,
                unmap: may_unmap,
                fua,
            },
            IoOp::Cache { sector, sectors } => {
                let inside = sector
                    .checked_add(sectors)
                    .is_some_and(|end| end <= self.sectors());
                let result = if inside {
                    Ok(IoOutput::Done)
                } else {
                    Err(BackendError::Invalid)
                };
                return self.finish(tag, result);
            }
            IoOp::BlockStatus {
                sector,
                sectors,
                max_extents,
            } => ThinOp::BlockStatus {
                sector,
                sectors,
                max_extents,
            },
        };
        self.waiting.push_back(ThinRequest { tag, op });
        self.pump();
    }

    pub(crate) fn poll(&mut self) -> Option<IoCompletion> {
        self.pump();
        match self.done.pop_front() {
            Some(done) => Some(done),
            None => self.volume_completion(),
        }
    }

    /// The volume's next completion, in NBD terms.
    fn volume_completion(&mut self) -> Option<IoCompletion> {
        self.volume.poll_op().map(nbd_completion)
    }

    /// Waits until every request handed to the volume has finished (completions stay
    /// queued for [`ThinIo::poll`]), except writes waiting for pool space: those stay
    /// queued in the pool, as dm keeps them across a suspend, and finish once the pool
    /// grows.
    pub(crate) fn drain(&mut self) {
        loop {
            self.pump();
            if let Some(done) = self.volume_completion() {
                self.done.push_back(done);
                continue;
            }
            if self.waiting.is_empty() && self.volume.in_flight() == 0 {
                return;
            }
            if self.volume.only_waiting_for_space() {
                return;
            }
            core::hint::spin_loop();
        }
    }

    /// One bounded step towards a quiet device: requests queued here go to the
    /// volume, one completion is collected (kept for [`ThinIo::poll`]). Returns
    /// whether nothing that changes data is in flight any more (parts of writes
    /// waiting for pool space excepted, as [`ThinIo::drain`] leaves them).
    pub(crate) fn settle_writes(&mut self) -> bool {
        self.pump();
        if let Some(done) = self.volume_completion() {
            self.done.push_back(done);
        }
        self.waiting.is_empty() && self.volume.writes_settled()
    }

    /// Makes completed writes durable (data flushed, metadata committed). Writes
    /// still waiting for pool space may be in flight; their completions, if any come
    /// meanwhile, are kept for [`ThinIo::poll`].
    pub(crate) fn flush(&mut self) -> Result<(), blockdev::IoError> {
        let request = ThinRequest {
            tag: FLUSH_TAG,
            op: ThinOp::Flush,
        };
        if self.volume.submit_op(request).is_err() {
            return Err(blockdev::IoError::Device(
                "the volume's queue is full of writes waiting for pool space",
            ));
        }
        loop {
            match self.volume.poll_op() {
                Some(done) if done.tag == FLUSH_TAG => return done.result.map(drop),
                Some(done) => self.done.push_back(nbd_completion(done)),
                None => core::hint::spin_loop(),
            }
        }
    }

    fn finish(&mut self, tag: u64, result: Result<IoOutput, BackendError>) {
        self.done.push_back(IoCompletion { tag, result });
    }

    fn pump(&mut self) {
        while let Some(request) = self.waiting.pop_front() {
            if let Err(thin_pool::QueueFull(request)) = self.volume.submit_op(request) {
                self.waiting.push_front(request);
                return;
            }
        }
    }
}

/// A volume's completion in NBD terms.
fn nbd_completion(done: ThinCompletion) -> IoCompletion {
    let result = match done.result {
        // Only fast zeroing completes with NOT_FAST.
        Err(NOT_FAST) => Err(BackendError::NotFast),
        Err(error) => Err(BackendError::from(error)),
        Ok(ThinOutput::Done) => Ok(IoOutput::Done),
        Ok(ThinOutput::Read { zero_holes }) => Ok(IoOutput::Read {
            buf: done.buf,
            zero_holes,
        }),
        Ok(ThinOutput::Extents(extents)) => Ok(IoOutput::Extents(extents)),
    };
    IoCompletion {
        tag: done.tag,
        result,
    }
}
