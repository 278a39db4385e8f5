//! `disk-reset`: the operator resets a disk's device while the devices on it keep
//! their requests, the way the driver resets a device that broke its queue protocol.
//!
//! Nothing new reaches the disk while this runs: the reset is one step of the
//! appliance's single loop, so NBD requests, pools and jobs wait until it returns.
//! The requests already on the disk are let finish (for as long as the caller's
//! `waiting` allows), then the disk is flushed, so every write that completed is on
//! stable storage, not in a write cache, when the device resets. Only requests that
//! do not finish in time (a wedged device) are failed by the reset, as the driver's
//! fault path fails them. Their completions, and every other, go back to the regions that
//! submitted them, so the pools and devices on the disk carry on afterwards.

use alloc::format;
use alloc::string::String;
use blockdev::{BlockDevice, Command, IoError, Request};

use crate::mapper::DeviceMapper;

/// What a reset did.
#[derive(Debug, PartialEq, Eq)]
pub struct DiskReset {
    /// The disk's name.
    pub name: String,
    /// Requests on the disk when the reset was asked for.
    pub in_flight: usize,
    /// Requests that had not finished when the wait ended; the reset failed them.
    pub failed: usize,
    /// The flush before the reset: `None` when requests were still in flight (it was
    /// not sent) or it did not finish in time.
    pub flush: Option<Result<(), IoError>>,
    /// The disk's resets so far, this one included.
    pub resets: u64,
}

impl DeviceMapper {
    /// Resets disk `name`: waits for its requests in flight while `waiting` returns
    /// true, flushes it, resets it, and sets it up again.
    pub fn reset_disk(
        &mut self,
        name: &str,
        waiting: &mut dyn FnMut() -> bool,
    ) -> Result<DiskReset, String> {
        let Some(index) = self.disk_index(name) else {
            return Err(format!("no disk called '{name}' (see disks)"));
        };
        let entry = &self.disks[index];
        let name = entry.name.clone();
        if !entry.disk.can_reset() {
            return Err(format!(
                "disk {name} cannot be reset (its driver has no reset)"
            ));
        }
        let in_flight = entry.disk.in_flight();
        let mut failed = entry.disk.settle(waiting);
        let mut flush = None;
        if failed == 0 {
            let mut region = entry.disk.region(0, entry.info().sectors, false);
            let sent = region.submit(Request {
                tag: 0,
                command: Command::Flush,
            });
            debug_assert!(sent.is_ok(), "an idle disk takes a flush");
            failed = entry.disk.settle(waiting);
            flush = region.poll().map(|done| done.result);
        }
        entry
            .disk
            .reset()
            .map_err(|error| format!("{name}: the reset failed ({error})"))?;
        Ok(DiskReset {
            resets: entry.errors().resets,
            name,
            in_flight,
            failed,
            flush,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Disk;
    use crate::region::SharedDisk;
    use alloc::boxed::Box;
    use alloc::vec;
    use alloc::vec::Vec;
    use blockdev::{IoBuf, LOST_IN_RESET, MemDisk, ResetLog, ResettableDisk};

    /// A device mapper over `vda` (the resettable disk) and `vdb` (a plain memory
    /// disk), and the handle of `vda`'s contents.
    fn mapper(delay: Option<u32>) -> (DeviceMapper, MemDisk, ResetLog) {
        let inner = MemDisk::new(64);
        let view = inner.handle();
        let (vda, log) = ResettableDisk::new(inner, delay);
        let dm = DeviceMapper::new(vec![
            Disk {
                name: "vda".into(),
                device: Box::new(vda),
            },
            Disk {
                name: "vdb".into(),
                device: Box::new(MemDisk::new(64)),
            },
        ]);
        (dm, view, log)
    }

    fn shared(dm: &DeviceMapper) -> SharedDisk {
        dm.disks[0].disk.clone()
    }

    /// Submits a one-sector write of `byte` at `sector` with tag `sector`.
    fn write(region: &mut dyn BlockDevice, sector: u64, byte: u8) {
        let mut buf = IoBuf::with_sectors(1);
        buf.fill(byte);
        region
            .submit(Request {
                tag: sector,
                command: Command::Write {
                    sector,
                    buf,
                    fua: false,
                },
            })
            .unwrap();
    }

    fn results(region: &mut dyn BlockDevice) -> Vec<(u64, Result<(), IoError>)> {
        let mut results = Vec::new();
        while let Some(done) = region.poll() {
            results.push((done.tag, done.result));
        }
        results.sort_by_key(|(tag, _)| *tag);
        results
    }

    #[test]
    fn writes_in_flight_finish_and_are_flushed_before_the_reset() {
        let (mut dm, view, log) = mapper(Some(3));
        let mut region = shared(&dm).region(8, 8, false);
        for sector in 0..3 {
            write(&mut region, sector, sector as u8 + 1);
        }
        let report = dm.reset_disk("/dev/vda", &mut || true).unwrap();
        assert_eq!(
            report,
            DiskReset {
                name: "vda".into(),
                in_flight: 3,
                failed: 0,
                flush: Some(Ok(())),
                resets: 1,
            }
        );
        assert_eq!(*log.borrow(), ["write", "write", "write", "flush", "reset"]);
        assert_eq!(
            results(&mut region),
            [(0, Ok(())), (1, Ok(())), (2, Ok(()))]
        );
        let mut byte = [0];
        view.read_at(10 * 512, &mut byte);
        assert_eq!(byte, [3]);
        // The disk serves the region as before.
        let buf = blockdev::run_sync(
            &mut region,
            Command::Write {
                sector: 5,
                buf: IoBuf::with_sectors(1),
                fua: false,
            },
        );
        assert!(buf.is_ok());
        assert_eq!(dm.disks()[0].errors().resets, 1);
    }

    #[test]
    fn requests_that_never_finish_fail_with_the_reset_when_the_wait_ends() {
        let (mut dm, _, log) = mapper(None);
        let mut region = shared(&dm).region(0, 64, false);
        write(&mut region, 1, 1);
        write(&mut region, 2, 2);
        let mut polls_left = 100;
        let mut waiting = || {
            polls_left -= 1;
            polls_left > 0
        };
        let report = dm.reset_disk("vda", &mut waiting).unwrap();
        assert_eq!(
            (report.in_flight, report.failed, report.flush, report.resets),
            (2, 2, None, 1)
        );
        assert_eq!(polls_left, 0, "the reset waited as long as it was allowed");
        assert_eq!(*log.borrow(), ["write", "write", "reset"]);
        assert_eq!(
            results(&mut region),
            [(1, Err(LOST_IN_RESET)), (2, Err(LOST_IN_RESET))]
        );
    }

    #[test]
    fn unknown_disks_and_disks_without_a_reset_are_refused() {
        let (mut dm, _, log) = mapper(Some(0));
        assert_eq!(
            dm.reset_disk("vdz", &mut || true),
            Err(String::from("no disk called 'vdz' (see disks)"))
        );
        assert_eq!(
            dm.reset_disk("vdb", &mut || true),
            Err(String::from(
                "disk vdb cannot be reset (its driver has no reset)"
            ))
        );
        assert!(log.borrow().is_empty());
        assert_eq!(dm.disks()[1].errors().resets, 0);
    }
}
