//! Formatting a new pool's metadata a step at a time, so that creating a pool on a
//! large metadata device never holds up other devices' I/O (see
//! `persistent_data::thin::MetadataFormat`). The pool exists once the last step has
//! written the superblock; a power cut before that leaves a device that is formatted
//! again at its next activation.

use alloc::boxed::Box;

use blockdev::BlockDevice;
use persistent_data::thin::{MetadataFormat, OpenOptions};

use crate::config::PoolConfig;
use crate::pool::{OpenReport, Pool, PoolError, check_open, open_error};

/// A pool whose metadata is being formatted.
pub struct PoolFormat {
    format: MetadataFormat,
    data: Box<dyn BlockDevice>,
    config: PoolConfig,
}

impl PoolFormat {
    /// Starts formatting `metadata` (whatever it holds) for a pool over `data`: the
    /// first, bounded, step. A read-only pool is never formatted.
    pub fn start(
        metadata: Box<dyn BlockDevice>,
        data: Box<dyn BlockDevice>,
        config: PoolConfig,
    ) -> Result<PoolFormat, PoolError> {
        check_open(&config, data.as_ref())?;
        if config.features.read_only {
            return Err(open_error(persistent_data::Error::Unformatted));
        }
        let options = OpenOptions {
            cache_blocks: config.cache_blocks,
            ..OpenOptions::new(config.data_block_size)
        };
        let format = MetadataFormat::start(metadata, &options, config.data_blocks())
            .map_err(|error| PoolError(alloc::format!("Formatting metadata failed: {error}")))?;
        Ok(PoolFormat {
            format,
            data,
            config,
        })
    }

    /// Formats a few more bitmaps; returns whether the metadata is complete.
    pub fn step(&mut self) -> Result<bool, PoolError> {
        self.format
            .step()
            .map_err(|error| PoolError(alloc::format!("Formatting metadata failed: {error}")))
    }

    /// Space-map bitmaps written so far and in all.
    pub fn progress(&self) -> (u64, u64) {
        self.format.progress()
    }

    /// The pool, once [`PoolFormat::step`] returned true.
    pub fn finish(self) -> Result<(Pool, OpenReport), PoolError> {
        let (md, opened) = self.format.finish().map_err(open_error)?;
        Pool::assemble(md, &opened, self.data, self.config)
    }
}
