//! A disk that can lose power: the stand-in for crash tests.
//!
//! [`CrashDisk`] wraps a [`MemDisk`] and remembers which writes are durable: those
//! completed before the last completed flush (and FUA writes). After a chosen number
//! of writes and flushes the power "fails": that request and every later one
//! complete with [`IoError::Gone`]. [`CrashDisk::after_power_loss`] then builds the
//! disk a reboot would see: the durable contents plus any subset of the writes since
//! the last flush, applied sector by sector in any order (a volatile write cache may
//! persist some, reorder them, or tear them at sector boundaries).

use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

use crate::{
    BlockDevice, Busy, Command, Completion, DeviceInfo, IoError, MemDisk, Request, SECTOR_SIZE,
};

/// What a power loss keeps of the writes that were not yet flushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unflushed {
    /// None of them.
    DropAll,
    /// All of them, in order (the cache happened to drain).
    KeepAll,
    /// A pseudo-random subset of their sectors, applied in a pseudo-random order.
    Random(u64),
}

struct State {
    /// What reads see while the power is on.
    live: MemDisk,
    /// What survives a power loss for sure.
    durable: MemDisk,
    /// Writes since the last completed flush: (sector, data).
    unflushed: Vec<(u64, Vec<u8>)>,
    /// Writes and flushes executed so far.
    operations: u64,
    /// Power fails at the write or flush with this index (0-based).
    fail_at: Option<u64>,
}

/// A memory disk with a volatile write cache and a power switch. Handles made with
/// [`CrashDisk::handle`] share the state.
pub struct CrashDisk {
    info: DeviceInfo,
    state: Rc<RefCell<State>>,
    done: VecDeque<Completion>,
}

impl CrashDisk {
    /// A zero-filled disk of `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        Self::from_disk(&MemDisk::new(sectors))
    }

    /// A crash disk starting from a copy of `disk`'s contents, all durable.
    pub fn from_disk(disk: &MemDisk) -> Self {
        let info = disk.info().clone();
        CrashDisk {
            info,
            state: Rc::new(RefCell::new(State {
                live: disk.snapshot(),
                durable: disk.snapshot(),
                unflushed: Vec::new(),
                operations: 0,
                fail_at: None,
            })),
            done: VecDeque::new(),
        }
    }

    /// Another handle on the same disk, with its own queue.
    pub fn handle(&self) -> Self {
        CrashDisk {
            info: self.info.clone(),
            state: Rc::clone(&self.state),
            done: VecDeque::new(),
        }
    }

    /// Writes and flushes executed so far.
    pub fn operations(&self) -> u64 {
        self.state.borrow().operations
    }

    /// Makes the power fail at the `index`-th write or flush from the start (that one
    /// and everything after it fail with [`IoError::Gone`]); `None` keeps it on.
    pub fn fail_at(&self, index: Option<u64>) {
        self.state.borrow_mut().fail_at = index;
    }

    /// Whether the power has failed.
    pub fn power_lost(&self) -> bool {
        let state = self.state.borrow();
        state.fail_at.is_some_and(|at| state.operations >= at)
    }

    /// The disk as a reboot would find it now.
    pub fn after_power_loss(&self, unflushed: Unflushed) -> MemDisk {
        let state = self.state.borrow();
        let disk = state.durable.snapshot();
        match unflushed {
            Unflushed::DropAll => {}
            Unflushed::KeepAll => {
                for (sector, data) in &state.unflushed {
                    disk.write_at(sector * SECTOR_SIZE as u64, data);
                }
            }
            Unflushed::Random(seed) => {
                let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut order: Vec<usize> = (0..state.unflushed.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, (next() % (i as u64 + 1)) as usize);
                }
                for i in order {
                    let (sector, data) = &state.unflushed[i];
                    for (n, piece) in data.chunks(SECTOR_SIZE).enumerate() {
                        if next() & 1 == 0 {
                            disk.write_at((sector + n as u64) * SECTOR_SIZE as u64, piece);
                        }
                    }
                }
            }
        }
        disk
    }

    fn execute(&self, command: &mut Command) -> Result<(), IoError> {
        command.validate(&self.info)?;
        let mut state = self.state.borrow_mut();
        if matches!(
            command,
            Command::Write { .. } | Command::Flush | Command::Discard { .. }
        ) {
            if state.fail_at.is_some_and(|at| state.operations >= at) {
                return Err(IoError::Gone);
            }
            state.operations += 1;
        } else if state.fail_at.is_some_and(|at| state.operations >= at) {
            return Err(IoError::Gone);
        }
        match command {
            Command::Read { sector, buf } => state.live.read_at(*sector * SECTOR_SIZE as u64, buf),
            Command::Write { sector, buf, fua } => {
                state.live.write_at(*sector * SECTOR_SIZE as u64, buf);
                if *fua {
                    state.durable.write_at(*sector * SECTOR_SIZE as u64, buf);
                } else {
                    state.unflushed.push((*sector, buf.to_vec()));
                }
            }
            Command::Flush => {
                let unflushed = core::mem::take(&mut state.unflushed);
                for (sector, data) in unflushed {
                    state.durable.write_at(sector * SECTOR_SIZE as u64, &data);
                }
            }
            Command::Discard { sector, sectors } => {
                let zeros = alloc::vec![0u8; (*sectors as usize) * SECTOR_SIZE];
                state.live.write_at(*sector * SECTOR_SIZE as u64, &zeros);
                state.unflushed.push((*sector, zeros));
            }
        }
        Ok(())
    }
}

impl BlockDevice for CrashDisk {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        if self.done.len() >= usize::from(self.info.queue_depth) {
            return Err(Busy(request));
        }
        let Request { tag, mut command } = request;
        let result = self.execute(&mut command);
        self.done.push_back(Completion {
            tag,
            result,
            buf: command.into_buf(),
        });
        Ok(())
    }

    fn poll(&mut self) -> Option<Completion> {
        self.done.pop_front()
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IoBuf, run_sync};

    fn write(disk: &mut CrashDisk, sector: u64, byte: u8) -> Result<IoBuf, IoError> {
        run_sync(
            disk,
            Command::Write {
                sector,
                buf: IoBuf::from_slice(&[byte; 1024]),
                fua: false,
            },
        )
    }

    fn byte_at(disk: &MemDisk, sector: u64) -> u8 {
        let mut out = [0u8; 1];
        disk.read_at(sector * 512, &mut out);
        out[0]
    }

    #[test]
    fn only_flushed_writes_survive_drop_all() {
        let mut disk = CrashDisk::new(64);
        write(&mut disk, 0, 1).unwrap();
        run_sync(&mut disk, Command::Flush).unwrap();
        write(&mut disk, 8, 2).unwrap();
        disk.fail_at(Some(3));
        assert_eq!(write(&mut disk, 16, 3).unwrap_err(), IoError::Gone);
        assert!(disk.power_lost());
        let after = disk.after_power_loss(Unflushed::DropAll);
        assert_eq!(byte_at(&after, 0), 1);
        assert_eq!(byte_at(&after, 8), 0);
        assert_eq!(byte_at(&after, 16), 0);
        let kept = disk.after_power_loss(Unflushed::KeepAll);
        assert_eq!(byte_at(&kept, 8), 2);
        assert_eq!(byte_at(&kept, 16), 0);
    }

    #[test]
    fn random_loss_keeps_some_sectors() {
        let mut disk = CrashDisk::new(4096);
        for i in 0..200 {
            write(&mut disk, i * 2, 7).unwrap();
        }
        let after = disk.after_power_loss(Unflushed::Random(5));
        let kept = (0..400).filter(|&s| byte_at(&after, s) == 7).count();
        assert!(kept > 100 && kept < 300, "kept {kept} of 400 sectors");
    }
}
