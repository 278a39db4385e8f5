//! Formatting a metadata device in bounded steps.
//!
//! The space maps of a large pool are thousands of bitmap blocks (a 16 GiB metadata
//! device has 255, a 4 TiB data device of 64 KiB blocks 4,112), too many to build and
//! write in one call without stalling other devices' I/O. A [`MetadataFormat`] first
//! puts a marker in block 0 and makes it durable, so the device is neither blank nor
//! valid metadata from then on; each step then grows the metadata space map and the
//! data space map by a few bitmaps and writes the new blocks (a transaction in all
//! but its superblock); the last step writes the superblock over the marker.
//!
//! A power cut before the end leaves the marker, which no tool takes for metadata and
//! which [`is_format_marker`] recognises, so the device is formatted again at the next
//! activation. The marker fills only the first sector and the superblock's fields fit
//! in it too (the rest of both blocks is zero), so even a torn write of the
//! superblock leaves one or the other, never a mixture.

use super::*;
use crate::space_map::{ENTRIES_PER_BITMAP, bitmaps_for};

/// Bitmaps of each space map one step adds (about 130 KiB of writes for both).
const STEP_BITMAPS: u64 = 16;
/// Blocks those bitmaps cover.
const STEP_BLOCKS: u64 = STEP_BITMAPS * ENTRIES_PER_BITMAP;
/// The start of block 0 while a format is under way (the rest is zero).
const FORMAT_MARKER: &[u8] = b"thinbox: metadata format in progress";

/// Whether `block` (block 0 of a metadata device) says a format was interrupted.
pub fn is_format_marker(block: &Block) -> bool {
    block.starts_with(FORMAT_MARKER) && block[FORMAT_MARKER.len()..].iter().all(|&b| b == 0)
}

/// A format under way (see the module documentation).
pub struct MetadataFormat {
    md: ThinMetadata,
    /// Blocks the metadata space map covers when done.
    metadata_blocks: u64,
    /// Blocks the data space map covers when done.
    data_blocks: u64,
    report: OpenReport,
    finished: bool,
}

impl MetadataFormat {
    /// Starts formatting `device` (whatever it holds) for a data device of
    /// `data_blocks` blocks: marks block 0 durably, then writes the first, smallest
    /// transaction of empty metadata.
    pub fn start(
        device: Box<dyn BlockDevice>,
        options: &OpenOptions,
        data_blocks: u64,
    ) -> Result<Self> {
        let (cache, geometry) = open_device(device, options)?;
        Self::begin(cache, &geometry, options.data_block_size, data_blocks)
    }

    pub(super) fn begin(
        mut cache: Cache,
        geometry: &Geometry,
        data_block_size: u32,
        data_blocks: u64,
    ) -> Result<Self> {
        let metadata_blocks = geometry.usable_blocks();
        if metadata_blocks < MIN_METADATA_BLOCKS {
            return Err(Error::DeviceTooSmall {
                device_blocks: metadata_blocks,
                needed_blocks: MIN_METADATA_BLOCKS,
            });
        }
        if data_blocks > MAX_DATA_BLOCK + 1 {
            return Err(Error::DataBlockOutOfRange {
                block: data_blocks,
                nr_blocks: MAX_DATA_BLOCK + 1,
            });
        }
        let mut marker = [0; crate::block::BLOCK_SIZE];
        marker[..FORMAT_MARKER.len()].copy_from_slice(FORMAT_MARKER);
        cache.forget(0);
        cache.write_raw(0, &marker)?;
        cache.flush_device()?;
        let mut md = ThinMetadata::empty(cache, metadata_blocks.min(STEP_BLOCKS), data_block_size)?;
        md.resize_data(data_blocks.min(STEP_BLOCKS))?;
        let report = OpenReport {
            formatted: true,
            device_blocks: geometry.device_blocks,
            metadata_blocks,
            warning: geometry.warning,
        };
        let mut format = MetadataFormat {
            md,
            metadata_blocks,
            data_blocks,
            report,
            finished: false,
        };
        format.write_step()?;
        Ok(format)
    }

    /// Grows the space maps by a step and writes it; the step that reaches the full
    /// size writes the superblock. Returns whether the format is complete.
    pub fn step(&mut self) -> Result<bool> {
        if self.finished {
            return Ok(true);
        }
        let metadata = self.md.tm.nr_blocks();
        if metadata < self.metadata_blocks {
            let grown = (metadata + STEP_BLOCKS).min(self.metadata_blocks);
            self.md.tm.grow(grown);
            self.md.sb.metadata_nr_blocks = grown;
        }
        let data = self.md.data_nr_blocks();
        if data < self.data_blocks {
            self.md
                .resize_data((data + STEP_BLOCKS).min(self.data_blocks))?;
        }
        self.write_step()?;
        Ok(self.finished)
    }

    /// Writes what the steps so far built: the superblock too once it is all built.
    fn write_step(&mut self) -> Result<()> {
        let complete = self.md.tm.nr_blocks() == self.metadata_blocks
            && self.md.data_nr_blocks() == self.data_blocks;
        if complete {
            self.md.commit()?;
            self.finished = true;
        } else {
            self.md.write_transaction()?;
        }
        Ok(())
    }

    /// Bitmaps of both space maps written so far, and how many there are in all.
    pub fn progress(&self) -> (u64, u64) {
        let total = bitmaps_for(self.metadata_blocks) + bitmaps_for(self.data_blocks);
        if self.finished {
            return (total, total);
        }
        let done = bitmaps_for(self.md.tm.nr_blocks()) + bitmaps_for(self.md.data_nr_blocks());
        // The last bitmaps are only done once the superblock is written.
        (done.min(total.saturating_sub(1)), total)
    }

    /// Runs the remaining steps at once.
    pub fn run(mut self) -> Result<(ThinMetadata, OpenReport)> {
        while !self.step()? {}
        self.finish()
    }

    /// The formatted metadata, once [`MetadataFormat::step`] returned true.
    pub fn finish(self) -> Result<(ThinMetadata, OpenReport)> {
        if !self.finished {
            return Err(Error::Unformatted);
        }
        Ok((self.md, self.report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::check;
    use blockdev::MemDisk;

    /// Formats `meta_blocks` of metadata for `data_blocks`, step by step, checking that
    /// block 0 holds the marker until the last step; returns the disk and the number
    /// of transactions written.
    fn format_in_steps(meta_blocks: u64, data_blocks: u64) -> (MemDisk, u64) {
        let disk = MemDisk::new(meta_blocks * 8);
        let options = OpenOptions::new(128);
        let mut format =
            MetadataFormat::start(Box::new(disk.handle()), &options, data_blocks).unwrap();
        // Starting wrote the first transaction.
        let mut transactions = 1;
        let mut last = format.progress();
        let mut block0 = [0; crate::block::BLOCK_SIZE];
        loop {
            transactions += 1;
            if format.step().unwrap() {
                break;
            }
            let progress = format.progress();
            assert!(
                progress.0 > last.0 && progress.0 < progress.1,
                "{progress:?}"
            );
            last = progress;
            disk.read_at(0, &mut block0);
            assert!(is_format_marker(&block0));
        }
        assert_eq!(format.progress().0, format.progress().1);
        let (md, report) = format.finish().unwrap();
        assert!(report.formatted);
        assert_eq!(md.data_nr_blocks(), data_blocks);
        assert_eq!(md.metadata_nr_blocks(), meta_blocks);
        (disk, transactions)
    }

    #[test]
    fn a_large_format_takes_bounded_steps_and_ends_in_valid_metadata() {
        let data_blocks = 40 * ENTRIES_PER_BITMAP + 7;
        let meta_blocks = 20 * ENTRIES_PER_BITMAP;
        let (disk, transactions) = format_in_steps(meta_blocks, data_blocks);
        // 41 data bitmaps at 16 a transaction.
        assert_eq!(transactions, 3);
        let (mut md, opened) =
            ThinMetadata::open(Box::new(disk.handle()), &OpenOptions::new(128)).unwrap();
        assert!(!opened.formatted);
        assert_eq!(md.data_nr_blocks(), data_blocks);
        let report = check(&mut md).unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
    }

    #[test]
    fn an_interrupted_format_is_formatted_again() {
        let disk = MemDisk::new(20 * ENTRIES_PER_BITMAP * 8);
        let options = OpenOptions::new(128);
        let mut format =
            MetadataFormat::start(Box::new(disk.handle()), &options, 100 * ENTRIES_PER_BITMAP)
                .unwrap();
        format.step().unwrap();
        drop(format);
        let never = OpenOptions {
            format: FormatPolicy::Never,
            ..OpenOptions::new(128)
        };
        assert!(matches!(
            ThinMetadata::open(Box::new(disk.handle()), &never),
            Err(Error::Unformatted)
        ));
        let (_, report) = ThinMetadata::open(Box::new(disk.handle()), &options).unwrap();
        assert!(report.formatted);
    }
}
