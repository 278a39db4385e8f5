//! Pinned views of thin devices' mappings (see `persistent_data::thin::views`), and
//! what changed between two of them, for block-status queries.

use super::deletion::DELETE_STEP_MAPPINGS;
use super::*;
use persistent_data::thin::{Delta, DeltaKind};

/// Mappings one changed-blocks query reads at most (a few milliseconds).
const VIEW_QUERY_MAPPINGS: u64 = 16_384;
/// Runs are cut at this length so each query makes progress within its budget.
const VIEW_QUERY_RUN: u64 = VIEW_QUERY_MAPPINGS / 4;

impl Core {
    /// Pins the current mappings of `devs` (in one transaction, committed before
    /// this returns, so a rollback cannot take the views away); returns their ids.
    pub fn pin_views(&mut self, devs: &[u64]) -> Result<Vec<u64>, MessageError> {
        const CONTEXT: &str = "pinning a view of the mappings failed";
        if !self.mode.metadata_writable() {
            return Err(MessageError::new(
                Errno::Eopnotsupp,
                format!(
                    "the pool is in {} mode: its mappings cannot be pinned for a view of what changed",
                    self.mode.status_word()
                ),
            ));
        }
        self.drain_preps();
        let mut ids = Vec::with_capacity(devs.len());
        for &dev in devs {
            match self.md.pin_view(dev) {
                Ok(id) => ids.push(id),
                Err(error) => {
                    let error = self.message_failed(&error, CONTEXT);
                    for id in ids {
                        self.unpin_view(id);
                    }
                    return Err(error);
                }
            }
        }
        self.md_dirty = true;
        self.commit_now()?;
        Ok(ids)
    }

    /// Drops a view; one that no longer shares its tree is released in the
    /// background like a deleted device. The change goes with the next commit.
    pub fn unpin_view(&mut self, id: u64) {
        if !self.mode.metadata_writable() {
            // The next run of the pool finds the view and releases it.
            return;
        }
        match self.md.unpin_view(id, DELETE_STEP_MAPPINGS) {
            Ok(pending) => {
                if let Some(pending) = pending {
                    self.queue_delete(pending, false);
                }
                self.md_dirty = true;
            }
            Err(MdError::NoSuchDevice(_)) => {}
            Err(error) => self.metadata_failed(&error),
        }
    }

    /// What differs between views `base` and `this` from `sector` on: consecutive
    /// (sectors, changed) extents, at most `max_extents` of them, reported through
    /// `extent`. Stops at `end` (the last extent may run past it) or when the query's
    /// budget of mappings is used up, having reported at least one extent.
    pub fn changed_extents(
        &mut self,
        base: u64,
        this: u64,
        (sector, end): (u64, u64),
        max_extents: u32,
        extent: &mut dyn FnMut(u64, bool),
    ) -> Result<(), IoError> {
        if self.mode == PoolMode::Fail {
            return Err(EIO_FAILED);
        }
        let roots = self
            .md
            .view_root(base)
            .and_then(|base| Ok((base, self.md.view_root(this)?)));
        let (base_root, this_root) = roots.map_err(|_| EIO_METADATA)?;
        let bs = self.block_sectors;
        let mut delta = Delta::with_run_limit(base_root, this_root, sector / bs, VIEW_QUERY_RUN);
        let mut extents = Extents {
            pending: None,
            reported: 0,
            max: max_extents.max(1),
            out: extent,
        };
        let mut position = sector;
        // Pieces beyond the range were reached: everything up to its end is known.
        let mut beyond = false;
        let done = delta
            .step(&mut self.md, VIEW_QUERY_MAPPINGS, &mut |piece| {
                let begin = (piece.begin * bs).max(position);
                if begin >= end {
                    beyond = true;
                    return false;
                }
                if begin > position {
                    if !extents.push(begin - position, false) {
                        return false;
                    }
                    position = begin;
                }
                let piece_end = piece.end() * bs;
                let more = extents.push(piece_end - begin, piece.kind != DeltaKind::Same);
                position = piece_end;
                more && position < end
            })
            .map_err(|_| EIO_METADATA)?;
        if (done || beyond) && position < end {
            extents.push(end - position, false);
        }
        if extents.pending.is_none() {
            // Nothing decided within the budget: the first block counts as changed,
            // which is safe for a reader that copies what changed.
            extents.push((bs - sector % bs).min(end - sector), true);
        }
        extents.finish();
        Ok(())
    }
}

/// Extents being reported: neighbours with one flag merged, at most `max`.
struct Extents<'a> {
    pending: Option<(u64, bool)>,
    reported: u32,
    max: u32,
    out: &'a mut dyn FnMut(u64, bool),
}

impl Extents<'_> {
    /// Adds an extent if there is room; returns whether another one would fit.
    fn push(&mut self, sectors: u64, changed: bool) -> bool {
        match &mut self.pending {
            Some((len, flag)) if *flag == changed => *len += sectors,
            Some(_) if self.reported + 1 >= self.max => return false,
            pending => {
                if let Some((len, flag)) = pending.replace((sectors, changed)) {
                    (self.out)(len, flag);
                    self.reported += 1;
                }
            }
        }
        self.reported + 1 < self.max
    }

    fn finish(self) {
        if let Some((len, flag)) = self.pending {
            (self.out)(len, flag);
        }
    }
}
