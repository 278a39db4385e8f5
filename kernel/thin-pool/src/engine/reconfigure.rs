//! A pool reloaded with a new table keeps running with the new low water mark and
//! features, as dm's pool target takes them at resume: only the data block size is
//! fixed for the pool's life, discard support cannot be switched on or off, and a
//! pool whose metadata needs checking does not return to write mode.

use super::*;

impl Core {
    /// Says why the running pool cannot take `new`'s block size and features, if it
    /// cannot (dm's errors).
    pub fn check_reconfigure(&self, new: &PoolConfig) -> Result<(), MessageError> {
        let old = &self.config;
        if new.data_block_size != old.data_block_size {
            return Err(MessageError::new(
                Errno::Einval,
                format!(
                    "changing the data block size (from {} to {}) is not supported",
                    old.data_block_size, new.data_block_size
                ),
            ));
        }
        if new.features.ignore_discard != old.features.ignore_discard {
            return Err(MessageError::new(
                Errno::Einval,
                String::from("Discard support cannot be disabled once enabled"),
            ));
        }
        if !new.features.read_only && self.md.needs_check() {
            return Err(MessageError::new(
                Errno::Einval,
                String::from("unable to switch pool to write mode until repaired"),
            ));
        }
        Ok(())
    }

    /// Takes `new`'s low water mark and features (after
    /// [`Core::check_reconfigure`]); the length is the caller's business.
    pub fn reconfigure(&mut self, new: &PoolConfig) -> Result<(), MessageError> {
        self.check_reconfigure(new)?;
        let features = new.features;
        self.config.low_water_mark = new.low_water_mark;
        self.config.features = features;
        self.passdown = !features.ignore_discard
            && !features.no_discard_passdown
            && self.data.device.info().discard
            && self.data.max_sectors() >= 1;
        self.low_water_armed = self.md.data_free_blocks() > new.low_water_mark;
        if features.read_only {
            if self.mode != PoolMode::Fail && self.mode != PoolMode::ReadOnly {
                self.set_mode(
                    PoolMode::ReadOnly,
                    String::from("the table was reloaded with read_only"),
                );
                // Writes waiting for space can no longer get it.
                self.fail_parked(EIO_READ_ONLY);
            }
            return Ok(());
        }
        if self.mode == PoolMode::ReadOnly {
            self.set_mode(
                PoolMode::Write,
                String::from("the table was reloaded without read_only"),
            );
        }
        self.error_if_no_space = features.error_if_no_space;
        if self.mode == PoolMode::OutOfDataSpace && self.error_if_no_space {
            self.fail_parked(IoError::NoSpace);
        }
        Ok(())
    }
}
