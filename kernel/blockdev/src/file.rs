//! A disk image file on the host (offline mode, benchmarks, tool interoperability).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::string::String;

use alloc::collections::VecDeque;
use rustix::fs::{FallocateFlags, fallocate};

use crate::{BlockDevice, Busy, Command, Completion, DeviceInfo, IoError, Request, SECTOR_SIZE};

/// A file used as a disk. Requests run when submitted; completions are queued so the
/// file behaves like any other [`BlockDevice`]. FUA writes complete at the next poll
/// after one `fdatasync` for all of them, so a queue of FUA writes costs one sync, not
/// one each.
pub struct FileDisk {
    file: File,
    info: DeviceInfo,
    done: VecDeque<Completion>,
    /// FUA writes written but not yet synced.
    unsynced: VecDeque<Completion>,
}

impl FileDisk {
    /// Opens an existing image; its size (rounded down to whole sectors) is the disk's.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let sectors = file.metadata()?.len() / SECTOR_SIZE as u64;
        let model = String::from("disk image file");
        let serial = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let info = DeviceInfo {
            sectors,
            read_only,
            discard: !read_only,
            max_transfer_sectors: 1 << 16,
            queue_depth: 128,
            model,
            serial,
        };
        Ok(FileDisk {
            file,
            info,
            done: VecDeque::new(),
            unsynced: VecDeque::new(),
        })
    }

    /// Creates (or truncates) a sparse image of `bytes` bytes.
    pub fn create(path: &Path, bytes: u64) -> io::Result<Self> {
        let file = File::create(path)?;
        file.set_len(bytes)?;
        drop(file);
        Self::open(path, false)
    }

    fn execute(&self, command: &mut Command) -> Result<(), IoError> {
        command.validate(&self.info)?;
        let result = match command {
            Command::Read { sector, buf } => {
                self.file.read_exact_at(buf, *sector * SECTOR_SIZE as u64)
            }
            Command::Write { sector, buf, .. } => {
                self.file.write_all_at(buf, *sector * SECTOR_SIZE as u64)
            }
            Command::Flush => self.file.sync_data(),
            Command::Discard { sector, sectors } => punch_hole(
                &self.file,
                *sector * SECTOR_SIZE as u64,
                *sectors * SECTOR_SIZE as u64,
            ),
        };
        result.map_err(|_| IoError::Device("host file I/O failed"))
    }
}

/// Deallocates a byte range of the file, keeping its size; it then reads as zeros.
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(io::Error::from)
}

impl BlockDevice for FileDisk {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        if self.in_flight() >= usize::from(self.info.queue_depth) {
            return Err(Busy(request));
        }
        let Request { tag, mut command } = request;
        let result = self.execute(&mut command);
        let fua = matches!(command, Command::Write { fua: true, .. });
        let completion = Completion {
            tag,
            result,
            buf: command.into_buf(),
        };
        if fua && completion.result.is_ok() {
            self.unsynced.push_back(completion);
        } else {
            self.done.push_back(completion);
        }
        Ok(())
    }

    fn poll(&mut self) -> Option<Completion> {
        if self.done.is_empty() && !self.unsynced.is_empty() {
            let synced = self
                .file
                .sync_data()
                .map_err(|_| IoError::Device("host file sync failed"));
            for mut completion in self.unsynced.drain(..) {
                completion.result = synced;
                self.done.push_back(completion);
            }
        }
        self.done.pop_front()
    }

    fn in_flight(&self) -> usize {
        self.done.len() + self.unsynced.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IoBuf, run_sync};
    use std::format;

    #[test]
    fn queued_fua_writes_complete_together_after_the_plain_ones() {
        let dir = std::env::temp_dir().join(format!("blockdev-fua-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        let mut disk = FileDisk::create(&path, 1 << 20).unwrap();
        for (tag, fua) in [(1, true), (2, false), (3, true)] {
            let command = Command::Write {
                sector: tag * 8,
                buf: IoBuf::from_slice(&[tag as u8; 4096]),
                fua,
            };
            disk.submit(Request { tag, command }).unwrap();
        }
        assert_eq!(disk.in_flight(), 3);
        let order: std::vec::Vec<(u64, bool)> =
            core::iter::from_fn(|| disk.poll().map(|c| (c.tag, c.result.is_ok()))).collect();
        assert_eq!(order, [(2, true), (1, true), (3, true)]);
        assert_eq!(disk.in_flight(), 0);
        let back = std::fs::read(&path).unwrap();
        assert!(back[3 * 4096..4 * 4096].iter().all(|&b| b == 3));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_round_trip_and_hole_punch() {
        let dir = std::env::temp_dir().join(format!("blockdev-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        let mut disk = FileDisk::create(&path, 1 << 20).unwrap();
        assert_eq!(disk.info().sectors, 2048);
        let buf = IoBuf::from_slice(&[0x5a; 4096]);
        run_sync(
            &mut disk,
            Command::Write {
                sector: 8,
                buf,
                fua: true,
            },
        )
        .unwrap();
        run_sync(&mut disk, Command::Flush).unwrap();
        let back = run_sync(
            &mut disk,
            Command::Read {
                sector: 8,
                buf: IoBuf::with_sectors(8),
            },
        )
        .unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
        run_sync(
            &mut disk,
            Command::Discard {
                sector: 8,
                sectors: 8,
            },
        )
        .unwrap();
        let back = run_sync(
            &mut disk,
            Command::Read {
                sector: 8,
                buf: IoBuf::with_sectors(8),
            },
        )
        .unwrap();
        assert!(back.iter().all(|&b| b == 0));
        let past_end = Command::Read {
            sector: 2047,
            buf: IoBuf::with_sectors(2),
        };
        assert_eq!(
            run_sync(&mut disk, past_end).unwrap_err(),
            IoError::OutOfRange
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
