//! `snap create` of a thin device as a job: the origin is quiesced in steps (its
//! new requests held, those in flight finishing) while every other device keeps
//! serving; then the snapshot is created and the held requests go on.

use alloc::rc::Rc;
use alloc::string::String;
use core::cell::RefCell;
use core::fmt::Write;

use dm::{DeviceMapper, Quiesce};

use crate::job::{Context, Job, Progress};
use crate::outln;

/// What the snapshot is made of, once its origin is quiet.
pub(crate) struct SnapCreate {
    pub dm: Rc<RefCell<DeviceMapper>>,
    pub quiesce: Option<Quiesce>,
    pub name: String,
    pub pool: String,
    pub sectors: u64,
    pub external: Option<String>,
    pub origin_id: u64,
    pub cancelled: bool,
}

impl SnapCreate {
    /// Ends the quiesce: the origin's held requests go on.
    fn release(&mut self, dm: &mut DeviceMapper) {
        if let Some(quiesce) = self.quiesce.take() {
            dm.end_quiesce(quiesce);
        }
    }
}

impl Job for SnapCreate {
    fn step(&mut self, _: &mut Context<'_>, out: &mut dyn Write) -> Progress {
        let dm = Rc::clone(&self.dm);
        let mut dm = dm.borrow_mut();
        if self.cancelled {
            self.release(&mut dm);
            return Progress::Finished(Err(
                "snap create: cancelled while the origin's writes finished; nothing changed".into(),
            ));
        }
        let quiet = match self.quiesce.as_ref().map(|q| dm.quiesce_step(q)) {
            None | Some(Ok(true)) => true,
            Some(Ok(false)) => false,
            Some(Err(error)) => {
                self.release(&mut dm);
                return Progress::Finished(Err(error.into()));
            }
        };
        if !quiet {
            return Progress::Running;
        }
        let created = dm.new_thin(
            &self.name,
            &self.pool,
            self.sectors,
            self.external.as_deref(),
            Some(self.origin_id),
        );
        self.release(&mut dm);
        let (dev, table) = match created {
            Ok(created) => created,
            Err(error) => return Progress::Finished(Err(error.into())),
        };
        outln!(
            out,
            "{}: snapshot {dev} of thin device {} in {}: {table}",
            self.name,
            self.origin_id,
            self.pool
        );
        Progress::Finished(Ok(()))
    }

    fn cancel(&mut self) {
        self.cancelled = true;
    }
}
