//! One disk, many users: the pool's metadata and data regions, linear devices, an
//! external origin, the configuration area and `disk-test` may all sit on the same
//! disk, each with its own [`Region`] handle.
//!
//! A region is a window (`offset`, `sectors`) of the disk with its own request queue:
//! requests are checked against the window, shifted and submitted to the disk with a
//! tag of the disk's own; completions are sorted back to the region that asked, so a
//! synchronous user of one region (`run_sync`) is not confused by another region's
//! traffic.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::rc::Rc;
use blockdev::{BlockDevice, Busy, Command, Completion, DeviceInfo, ErrorCounts, IoBuf, Request};
use core::cell::RefCell;

/// Which region a request on the disk belongs to, and the tag it had there.
#[derive(Clone, Copy)]
struct Route {
    region: u64,
    tag: u64,
}

struct Shared {
    device: Box<dyn BlockDevice>,
    next_tag: u64,
    next_region: u64,
    routes: BTreeMap<u64, Route>,
    /// Completions waiting for their region to poll; a region's entry exists while
    /// its handle does.
    done: BTreeMap<u64, VecDeque<Completion>>,
}

impl Shared {
    /// Takes every finished request off the disk and queues it for its region.
    fn collect(&mut self) {
        while let Some(mut done) = self.device.poll() {
            let Some(route) = self.routes.remove(&done.tag) else {
                continue;
            };
            done.tag = route.tag;
            // A region dropped with requests in flight has no queue: its completions
            // are discarded.
            if let Some(queue) = self.done.get_mut(&route.region) {
                queue.push_back(done);
            }
        }
    }
}

/// A disk that hands out [`Region`]s.
#[derive(Clone)]
pub struct SharedDisk {
    shared: Rc<RefCell<Shared>>,
    info: DeviceInfo,
}

impl SharedDisk {
    pub fn new(device: Box<dyn BlockDevice>) -> Self {
        let info = device.info().clone();
        SharedDisk {
            shared: Rc::new(RefCell::new(Shared {
                device,
                next_tag: 0,
                next_region: 0,
                routes: BTreeMap::new(),
                done: BTreeMap::new(),
            })),
            info,
        }
    }

    /// The whole disk's description.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The requests the disk failed and its resets, as its driver counts them.
    pub fn errors(&self) -> ErrorCounts {
        self.shared.borrow().device.errors()
    }

    /// Whether the disk's driver can reset it.
    pub fn can_reset(&self) -> bool {
        self.shared.borrow().device.can_reset()
    }

    /// Requests submitted to the disk and not yet polled off it.
    pub(crate) fn in_flight(&self) -> usize {
        self.shared.borrow().device.in_flight()
    }

    /// Arms the disk to interrupt when a request it holds finishes (see
    /// [`BlockDevice::arm_wakeup`]); true when nothing is in flight on it either.
    /// False while completions wait for their regions to poll them.
    pub(crate) fn arm_wakeup(&self) -> bool {
        let mut shared = self.shared.borrow_mut();
        if shared.done.values().any(|queue| !queue.is_empty()) {
            return false;
        }
        shared.device.in_flight() == 0 || shared.device.arm_wakeup()
    }

    /// Polls the disk, handing completions to their regions, until nothing is in
    /// flight on it or `waiting` says to stop; returns the requests still in flight.
    pub(crate) fn settle(&self, waiting: &mut dyn FnMut() -> bool) -> usize {
        loop {
            let mut shared = self.shared.borrow_mut();
            shared.collect();
            let left = shared.device.in_flight();
            if left == 0 || !waiting() {
                return left;
            }
            drop(shared);
            core::hint::spin_loop();
        }
    }

    /// Resets the disk (see [`BlockDevice::reset`]) and hands the requests it failed
    /// to their regions.
    pub(crate) fn reset(&self) -> Result<(), blockdev::IoError> {
        let mut shared = self.shared.borrow_mut();
        let reset = shared.device.reset();
        shared.collect();
        reset
    }

    /// A handle on `sectors` sectors from `offset` on; `read_only` makes writes and
    /// discards through it fail even when the disk takes them.
    pub fn region(&self, offset: u64, sectors: u64, read_only: bool) -> Region {
        debug_assert!(offset + sectors <= self.info.sectors);
        let mut shared = self.shared.borrow_mut();
        let id = shared.next_region;
        shared.next_region += 1;
        shared.done.insert(id, VecDeque::new());
        let mut info = self.info.clone();
        info.sectors = sectors;
        info.read_only |= read_only;
        Region {
            shared: Rc::clone(&self.shared),
            id,
            offset,
            info,
            in_flight: 0,
            refused: VecDeque::new(),
        }
    }
}

/// A window of a [`SharedDisk`], itself a [`BlockDevice`].
pub struct Region {
    shared: Rc<RefCell<Shared>>,
    id: u64,
    offset: u64,
    info: DeviceInfo,
    in_flight: usize,
    /// Requests refused by the region's own checks, completed on the next poll.
    refused: VecDeque<Completion>,
}

impl BlockDevice for Region {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        if let Err(error) = request.command.validate(&self.info) {
            self.in_flight += 1;
            self.refused.push_back(Completion {
                tag: request.tag,
                result: Err(error),
                buf: request.command.into_buf(),
            });
            return Ok(());
        }
        let tag = request.tag;
        let command = shift(request.command, self.offset, true);
        let mut shared = self.shared.borrow_mut();
        let disk_tag = shared.next_tag;
        match shared.device.submit(Request {
            tag: disk_tag,
            command,
        }) {
            Ok(()) => {
                shared.next_tag += 1;
                shared.routes.insert(
                    disk_tag,
                    Route {
                        region: self.id,
                        tag,
                    },
                );
                self.in_flight += 1;
                Ok(())
            }
            Err(Busy(back)) => Err(Busy(Request {
                tag,
                command: shift(back.command, self.offset, false),
            })),
        }
    }

    fn poll(&mut self) -> Option<Completion> {
        if let Some(done) = self.refused.pop_front() {
            self.in_flight -= 1;
            return Some(done);
        }
        let mut shared = self.shared.borrow_mut();
        shared.collect();
        let done = shared.done.get_mut(&self.id)?.pop_front()?;
        self.in_flight -= 1;
        Some(done)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.shared.borrow_mut().done.remove(&self.id);
    }
}

/// Moves a command's address by `offset` sectors (forward onto the disk, or back).
fn shift(command: Command, offset: u64, forward: bool) -> Command {
    let moved = |sector: u64| {
        if forward {
            sector + offset
        } else {
            sector - offset
        }
    };
    match command {
        Command::Read { sector, buf } => Command::Read {
            sector: moved(sector),
            buf,
        },
        Command::Write { sector, buf, fua } => Command::Write {
            sector: moved(sector),
            buf,
            fua,
        },
        Command::Discard { sector, sectors } => Command::Discard {
            sector: moved(sector),
            sectors,
        },
        Command::Flush => Command::Flush,
    }
}

/// Reads `sectors` sectors at `sector` of a region that has nothing else in flight.
pub(crate) fn read_sectors(
    region: &mut dyn BlockDevice,
    sector: u64,
    sectors: usize,
) -> Result<IoBuf, blockdev::IoError> {
    blockdev::run_sync(
        region,
        Command::Read {
            sector,
            buf: IoBuf::with_sectors(sectors),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::{IoError, MemDisk, SECTOR_SIZE, run_sync};

    fn write(region: &mut Region, sector: u64, byte: u8) -> Result<(), IoError> {
        let mut buf = IoBuf::with_sectors(1);
        buf.fill(byte);
        run_sync(
            region,
            Command::Write {
                sector,
                buf,
                fua: false,
            },
        )
        .map(drop)
    }

    #[test]
    fn regions_are_shifted_bounded_windows() {
        let disk = MemDisk::new(100);
        let view = disk.handle();
        let shared = SharedDisk::new(Box::new(disk));
        let mut low = shared.region(0, 10, false);
        let mut high = shared.region(10, 90, false);
        write(&mut low, 9, 1).unwrap();
        write(&mut high, 0, 2).unwrap();
        assert_eq!(write(&mut low, 10, 3), Err(IoError::OutOfRange));
        let mut byte = [0u8; 1];
        view.read_at(9 * SECTOR_SIZE as u64, &mut byte);
        assert_eq!(byte, [1]);
        view.read_at(10 * SECTOR_SIZE as u64, &mut byte);
        assert_eq!(byte, [2]);
        assert_eq!(high.info().sectors, 90);
        let mut ro = shared.region(0, 100, true);
        assert_eq!(write(&mut ro, 0, 4), Err(IoError::ReadOnly));
        assert_eq!(read_sectors(&mut ro, 10, 1).unwrap()[0], 2);
    }

    #[test]
    fn completions_go_back_to_the_region_that_asked() {
        let shared = SharedDisk::new(Box::new({
            let mut disk = MemDisk::new(64);
            disk.shuffle_completions(7);
            disk
        }));
        let mut a = shared.region(0, 32, false);
        let mut b = shared.region(32, 32, false);
        for tag in 0..8 {
            for region in [&mut a, &mut b] {
                read(region, tag);
            }
        }
        assert_eq!((a.in_flight(), b.in_flight()), (8, 8));
        let mut tags_b = alloc::vec::Vec::new();
        while let Some(done) = b.poll() {
            tags_b.push(done.tag);
        }
        tags_b.sort_unstable();
        assert_eq!(tags_b, (0..8).collect::<alloc::vec::Vec<_>>());
        assert_eq!(a.in_flight(), 8);
        let mut count = 0;
        while a.poll().is_some() {
            count += 1;
        }
        assert_eq!((count, a.in_flight(), b.in_flight()), (8, 0, 0));
    }

    #[test]
    fn dropping_a_busy_region_does_not_disturb_the_others() {
        let shared = SharedDisk::new(Box::new(MemDisk::new(64)));
        let mut keep = shared.region(0, 64, false);
        let mut gone = shared.region(0, 64, false);
        gone.submit(Request {
            tag: 1,
            command: Command::Flush,
        })
        .unwrap();
        drop(gone);
        write(&mut keep, 3, 9).unwrap();
        assert_eq!(keep.in_flight(), 0);
    }

    /// A memory disk that can, or cannot, interrupt when a request finishes, and
    /// counts the times it was armed to.
    struct InterruptingDisk {
        inner: MemDisk,
        interrupts: bool,
        armed: alloc::rc::Rc<core::cell::Cell<u32>>,
    }

    impl BlockDevice for InterruptingDisk {
        fn info(&self) -> &DeviceInfo {
            self.inner.info()
        }
        fn submit(&mut self, request: Request) -> Result<(), Busy> {
            self.inner.submit(request)
        }
        fn poll(&mut self) -> Option<Completion> {
            self.inner.poll()
        }
        fn in_flight(&self) -> usize {
            self.inner.in_flight()
        }
        fn arm_wakeup(&mut self) -> bool {
            self.armed.set(self.armed.get() + 1);
            self.interrupts
        }
    }

    fn read(region: &mut Region, tag: u64) {
        region
            .submit(Request {
                tag,
                command: Command::Read {
                    sector: tag,
                    buf: IoBuf::with_sectors(1),
                },
            })
            .unwrap();
    }

    #[test]
    fn the_cpu_may_halt_only_for_requests_a_disk_will_announce() {
        for interrupts in [false, true] {
            let armed = alloc::rc::Rc::default();
            let shared = SharedDisk::new(Box::new(InterruptingDisk {
                inner: MemDisk::new(64),
                interrupts,
                armed: alloc::rc::Rc::clone(&armed),
            }));
            let mut first = shared.region(0, 32, false);
            let mut second = shared.region(32, 32, false);
            // Nothing in flight: nothing to wait for, and the disk is left alone.
            assert!(shared.arm_wakeup());
            assert_eq!(armed.get(), 0);
            // A request on the disk: halting is up to the disk.
            read(&mut first, 1);
            assert_eq!(shared.arm_wakeup(), interrupts);
            assert_eq!(armed.get(), 1);
            // The second region's poll takes the first region's completion off the
            // disk: it waits for the first region, which must poll, not halt.
            read(&mut second, 2);
            assert!(second.poll().is_some());
            assert_eq!(first.in_flight(), 1);
            assert!(!shared.arm_wakeup());
            assert_eq!(armed.get(), 1);
            assert!(first.poll().is_some());
            assert!(shared.arm_wakeup());
        }
    }
}
