//! Comparing thin devices: [`SnapDelta`] walks two devices of the held metadata
//! snapshot in bounded steps (what `thin_delta -m` reads), [`ChangedView`] answers
//! "what differs from that device" over views pinned when it was taken, for as long
//! as it is held.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use core::cell::RefCell;

use blockdev::IoError;
use persistent_data::Error as MdError;
use persistent_data::thin::{Delta, DeltaPiece, DeltaSource};

use crate::engine::Core;
use crate::message::{Errno, MessageError};
use crate::pool::Pool;

/// A delta of two thin devices of the held metadata snapshot, in progress.
pub struct SnapDelta {
    pub source: DeltaSource,
    delta: Delta,
    /// The snapshot read: if it is released (or replaced) the walk cannot go on.
    held: u64,
}

impl SnapDelta {
    /// Mappings of both devices read so far, of [`SnapDelta::total_mappings`].
    pub fn mappings_read(&self) -> u64 {
        self.delta.mappings_read()
    }

    pub fn total_mappings(&self) -> u64 {
        self.source.left_mapped + self.source.right_mapped
    }
}

fn read_failed(error: &MdError) -> MessageError {
    let errno = match error {
        MdError::NoSuchDevice(_) | MdError::BadDeviceId(_) | MdError::NoSnapshot => Errno::Einval,
        _ => Errno::Eio,
    };
    let text = match error {
        MdError::NoSuchDevice(dev) => {
            format!("thin device {dev} is not in the metadata snapshot")
        }
        MdError::NoSnapshot => String::from("no metadata snapshot is held"),
        other => format!("reading the metadata snapshot failed: {other}"),
    };
    MessageError::new(errno, text)
}

impl Pool {
    /// Starts comparing thin devices `left` and `right` as the held metadata
    /// snapshot has them.
    pub fn snap_delta(&self, left: u64, right: u64) -> Result<SnapDelta, MessageError> {
        let mut core = self.core.borrow_mut();
        let held = core
            .md
            .held_root()
            .ok_or_else(|| read_failed(&MdError::NoSnapshot))?;
        let source = core
            .md
            .delta_source(left, right, true)
            .map_err(|error| read_failed(&error))?;
        Ok(SnapDelta {
            delta: Delta::new(source.left_root, source.right_root, 0),
            source,
            held,
        })
    }

    /// Goes on with `delta`, reading at most `budget` mappings; `piece` gets the
    /// pieces in order (returning false stops the step there). Returns whether the
    /// delta is complete.
    pub fn snap_delta_step(
        &self,
        delta: &mut SnapDelta,
        budget: u64,
        piece: &mut dyn FnMut(DeltaPiece) -> bool,
    ) -> Result<bool, MessageError> {
        let mut core = self.core.borrow_mut();
        if core.md.held_root() != Some(delta.held) {
            return Err(MessageError::new(
                Errno::Einval,
                "the metadata snapshot was released while the delta read it",
            ));
        }
        delta
            .delta
            .step(&mut core.md, budget, piece)
            .map_err(|error| read_failed(&error))
    }

    /// Freezes thin devices `dev` and `base` as they are now (committing), for
    /// [`ChangedView::extents`]. A pool whose metadata cannot change (read-only)
    /// needs no pinning, but then cannot take views either: it refuses.
    pub fn changed_view(&self, dev: u64, base: u64) -> Result<ChangedView, MessageError> {
        let ids = self.core.borrow_mut().pin_views(&[base, dev])?;
        Ok(ChangedView {
            core: Rc::clone(&self.core),
            base: ids[0],
            this: ids[1],
        })
    }
}

/// What differs between two thin devices as they were when the view was taken;
/// dropping it releases the pinned mappings.
pub struct ChangedView {
    core: Rc<RefCell<Core>>,
    base: u64,
    this: u64,
}

impl ChangedView {
    /// Consecutive `(sectors, changed)` extents from `sector` on, at most
    /// `max_extents`, at least one; the last may run past `sector + sectors`, and
    /// a large range may be answered only in part (ask again from where it ends).
    pub fn extents(
        &self,
        sector: u64,
        sectors: u64,
        max_extents: u32,
        extent: &mut dyn FnMut(u64, bool),
    ) -> Result<(), IoError> {
        self.core.borrow_mut().changed_extents(
            self.base,
            self.this,
            (sector, sector + sectors),
            max_extents,
            extent,
        )
    }
}

impl Drop for ChangedView {
    fn drop(&mut self) {
        if Rc::strong_count(&self.core) == 1 {
            // The pool was shut down (its metadata device may serve another pool by
            // now): leave the views to the next open of this one, which unpins them.
            return;
        }
        let mut core = self.core.borrow_mut();
        core.unpin_view(self.base);
        core.unpin_view(self.this);
    }
}
