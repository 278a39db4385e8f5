//! Keeping thin devices on the external origin they were created over. The first
//! activation of a thin device records its origin (or that it has none) in the
//! configuration; a snapshot inherits its origin's record; every later activation of
//! the device must name the same origin, of the same size. dm itself cannot tell.

use alloc::format;
use alloc::string::String;
use thin_pool::{Message, ThinTable};

use crate::Error;
use crate::config::OriginRecord;
use crate::mapper::DeviceMapper;
use crate::table::{Table, Target};

impl DeviceMapper {
    /// The records of the external origins of thin devices.
    pub fn origin_records(&self) -> &[OriginRecord] {
        &self.origins
    }

    fn origin_record(&self, pool: &str, dev_id: u64) -> Option<usize> {
        self.origins
            .iter()
            .position(|record| record.pool == pool && record.dev_id == dev_id)
    }

    /// Refuses to activate `thin` over an origin of `origin_sectors` (`None`: without
    /// one) other than the one its record names.
    pub(crate) fn check_origin(
        &self,
        thin: &ThinTable,
        origin_sectors: Option<u64>,
    ) -> Result<(), String> {
        let given = thin.origin_dev.as_deref().zip(origin_sectors);
        match self.origin_record(&thin.pool_dev, thin.dev_id) {
            Some(index) => self.origins[index].refuses(given).map_or(Ok(()), Err),
            None => Ok(()),
        }
    }

    /// Records the origin of a thin device activated with `table` if it has no record
    /// yet; returns whether it added one. For a pool, forgets the records of thin
    /// devices the pool does not hold (metadata formatted anew).
    pub(crate) fn record_origin(&mut self, name: &str, table: &Table) -> bool {
        match table.target() {
            Target::Thin(thin) => {
                if self.origin_record(&thin.pool_dev, thin.dev_id).is_some() {
                    return false;
                }
                let origin = thin.origin_dev.as_ref().map(|origin| {
                    let sectors = self.size_of(origin).unwrap_or(0);
                    (origin.clone(), sectors)
                });
                self.origins.push(OriginRecord {
                    pool: thin.pool_dev.clone(),
                    dev_id: thin.dev_id,
                    origin,
                });
                true
            }
            Target::Pool(_) => {
                if let Ok(held) = self
                    .pool(name)
                    .and_then(|pool| pool.devices().map_err(|error| Error(error.text)))
                {
                    self.origins
                        .retain(|record| record.pool != name || held.contains(&record.dev_id));
                }
                false
            }
            Target::Linear { .. }
            | Target::SnapshotOrigin { .. }
            | Target::Snapshot(_)
            | Target::SnapshotMerge(_) => false,
        }
    }

    /// Follows a pool message that succeeded: a snapshot inherits its origin's
    /// record, a new or deleted device has none. Saves the configuration if a record
    /// changed.
    pub(crate) fn origins_after_message(&mut self, pool: &str, text: &str) -> Result<(), Error> {
        let before = self.origins.clone();
        match Message::parse(text) {
            Ok(Message::CreateSnap { dev, origin }) => {
                self.forget_origin(pool, dev);
                if let Some(index) = self.origin_record(pool, origin) {
                    let mut record = self.origins[index].clone();
                    record.dev_id = dev;
                    self.origins.push(record);
                }
            }
            Ok(Message::CreateThin { dev } | Message::Delete { dev }) => {
                self.forget_origin(pool, dev)
            }
            _ => {}
        }
        if self.origins == before {
            return Ok(());
        }
        self.save().map_err(|Error(why)| {
            Error(format!(
                "{pool}: the message '{text}' was carried out, but recording external \
                 origins failed: {why}"
            ))
        })
    }

    fn forget_origin(&mut self, pool: &str, dev_id: u64) {
        self.origins
            .retain(|record| record.pool != pool || record.dev_id != dev_id);
    }

    /// A disk or device was renamed: the records follow.
    pub(crate) fn rename_in_origins(&mut self, from: &str, to: &str) {
        for record in &mut self.origins {
            record.rename(from, to);
        }
    }
}
