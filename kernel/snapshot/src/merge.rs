//! `snapshot-merge`: the snapshot's exceptions copied back into the origin in Linux's
//! order and batch shape, while the origin device shows the snapshot's content.
//!
//! One run at a time: the last record of the current area and the records before
//! it that continue it (consecutive `old` and `new`), at most one area. The run is
//! copied COW → origin (a bounded number of sectors per [`Snapshot::merge_step`]),
//! the origin is flushed, then the records are cleared and the area is written
//! (flush before, FUA). The COW is the only progress record, so a power cut at any
//! point repeats at most one run's copy when the merge is loaded again. Writes to
//! the chunks of the run being copied wait ([`Snapshot::merge_blocks`]).

use alloc::format;
use blockdev::{BlockDevice, IoError};

use crate::Snapshot;
use crate::chunk_io::{copy, flush, write_from};
use crate::origin::copy_out;
use crate::snapshot::{Store, chunk_pieces};

/// The run being copied: origin chunks `old..old+count` from COW chunks
/// `new..new+count`.
#[derive(Clone, Copy, Debug)]
struct Run {
    old: u64,
    new: u64,
    count: usize,
    /// Sectors to copy (the last chunk may stop at the origin's end) and copied.
    sectors: u64,
    copied: u64,
}

pub(crate) struct MergeState {
    run: Option<Run>,
    /// Exceptions when the merge started.
    total: u64,
    pub(crate) failed: bool,
    finished: bool,
}

/// What a merge step left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeStep {
    /// More to do.
    Working,
    /// Every exception is merged: the origin holds the snapshot's content.
    Finished,
    /// Stopped on an I/O error (status `Merge failed`).
    Failed,
}

/// A merge's progress in chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeProgress {
    pub merged: u64,
    pub total: u64,
}

impl Snapshot {
    /// Makes this snapshot a merging one: the origin device's I/O goes through
    /// [`Snapshot::merge_read`] and [`Snapshot::merge_write`] from now on, and
    /// [`Snapshot::merge_step`] copies. The origin handle must be writable.
    pub fn start_merge(&mut self) -> Result<(), &'static str> {
        if self.health() == crate::Health::Invalid {
            return Err("Snapshot is invalid: can't merge");
        }
        if !matches!(self.store, Store::Persistent(_)) {
            return Err("Snapshot exception store does not support snapshot-merge.");
        }
        self.merge = Some(MergeState {
            run: None,
            total: self.exceptions.len() as u64,
            failed: false,
            finished: false,
        });
        Ok(())
    }

    pub fn merging(&self) -> bool {
        self.merge.is_some()
    }

    /// Whether the merge has found nothing left to merge.
    pub fn merge_finished(&self) -> bool {
        self.merge.as_ref().is_some_and(|merge| merge.finished)
    }

    pub fn merge_progress(&self) -> Option<MergeProgress> {
        self.merge.as_ref().map(|merge| MergeProgress {
            merged: merge.total - (self.exceptions.len() as u64).min(merge.total),
            total: merge.total,
        })
    }

    /// Whether a write to `sector..sector+sectors` must wait for the run being
    /// copied.
    pub fn merge_blocks(&self, sector: u64, sectors: u64) -> bool {
        let Some(run) = self.merge.as_ref().and_then(|merge| merge.run) else {
            return false;
        };
        let chunk = self.chunk_sectors();
        let (first, last) = (sector / chunk, (sector + sectors).div_ceil(chunk));
        sectors > 0 && first < run.old + run.count as u64 && run.old < last
    }

    /// A read of the merging origin device: the snapshot's content.
    pub fn merge_read(&mut self, sector: u64, out: &mut [u8]) -> Result<(), IoError> {
        self.read_view(sector, out)
    }

    /// A write to the merging origin device: chunks not yet merged are written in
    /// the COW (and merged later), the rest in the origin after copy-out into the
    /// origin's other snapshots. The caller holds writes that
    /// [`Snapshot::merge_blocks`] until the run is merged.
    pub fn merge_write(
        &mut self,
        others: &mut [&mut Snapshot],
        sector: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), IoError> {
        let chunk = self.chunk_sectors();
        for (at, piece) in chunk_pieces(sector, (data.len() / 512) as u64, chunk) {
            let bytes = &data[((at - sector) * 512) as usize..][..(piece * 512) as usize];
            match self.exceptions.get(&(at / chunk)) {
                Some(&new) => write_from(self.cow.as_mut(), new * chunk + at % chunk, bytes, fua)?,
                None => {
                    copy_out(others, at, piece);
                    write_from(self.origin.as_mut(), at, bytes, fua)?;
                }
            }
        }
        Ok(())
    }

    /// A flush of the merging origin device: origin and COW.
    pub fn merge_flush(&mut self) -> Result<(), IoError> {
        flush(self.origin.as_mut())?;
        flush(self.cow.as_mut())
    }

    /// Copies at most `budget` sectors of the current run (choosing the next run
    /// first if none is under way; the origin's `others` snapshots get their
    /// copy-out of its range before it changes), and commits the run once it is
    /// copied.
    pub fn merge_step(&mut self, others: &mut [&mut Snapshot], budget: u64) -> MergeStep {
        let Some(merge) = &self.merge else {
            return MergeStep::Failed;
        };
        if merge.failed {
            return MergeStep::Failed;
        }
        if merge.finished {
            return MergeStep::Finished;
        }
        match self.advance(others, budget) {
            Ok(step) => step,
            Err(why) => {
                let merge = self.merge.as_mut().expect("merging");
                merge.failed = true;
                merge.run = None;
                self.events.push(format!("merge failed: {why}"));
                MergeStep::Failed
            }
        }
    }

    fn advance(
        &mut self,
        others: &mut [&mut Snapshot],
        budget: u64,
    ) -> Result<MergeStep, alloc::string::String> {
        let chunk = self.chunk_sectors();
        let run = match self.merge.as_ref().and_then(|merge| merge.run) {
            Some(run) => run,
            None => {
                let Store::Persistent(store) = &mut self.store else {
                    return Err("the store cannot merge".into());
                };
                let next = store
                    .prepare_merge(self.cow.as_mut())
                    .map_err(|error| format!("Read error in exception store: {error}"))?;
                let Some((old, new, count)) = next else {
                    self.merge.as_mut().expect("merging").finished = true;
                    self.events.push("merge finished".into());
                    return Ok(MergeStep::Finished);
                };
                for index in 0..count as u64 {
                    if self.exceptions.get(&(old + index)) != Some(&(new + index)) {
                        return Err(format!(
                            "Corruption detected: exception for block {} is on disk but not \
                             in memory",
                            old + index
                        ));
                    }
                }
                let start = old * chunk;
                let sectors =
                    (count as u64 * chunk).min(self.origin.info().sectors.saturating_sub(start));
                copy_out(others, start, count as u64 * chunk);
                let run = Run {
                    old,
                    new,
                    count,
                    sectors,
                    copied: 0,
                };
                self.merge.as_mut().expect("merging").run = Some(run);
                run
            }
        };
        let now = budget.max(1).min(run.sectors - run.copied);
        copy(
            self.cow.as_mut(),
            run.new * chunk + run.copied,
            self.origin.as_mut(),
            run.old * chunk + run.copied,
            now,
        )
        .map_err(|error| format!("copy to the origin failed: {error}"))?;
        let copied = run.copied + now;
        if copied < run.sectors {
            self.merge.as_mut().expect("merging").run = Some(Run { copied, ..run });
            return Ok(MergeStep::Working);
        }
        flush(self.origin.as_mut())
            .map_err(|error| format!("Flush after merge failed: {error}"))?;
        let Store::Persistent(store) = &mut self.store else {
            return Err("the store cannot merge".into());
        };
        store
            .commit_merge(self.cow.as_mut(), run.count)
            .map_err(|error| format!("Write error in exception store: {error}"))?;
        for old in run.old..run.old + run.count as u64 {
            self.exceptions.remove(&old);
        }
        self.merge.as_mut().expect("merging").run = None;
        Ok(MergeStep::Working)
    }
}
