//! A disk that reorders completions, holds them back and loses power: the stand-in
//! for crash and ordering tests.
//!
//! [`CrashDisk`] keeps two images of its contents: what reads see while the power
//! is on (*live*) and what would survive a power cut (*durable*), plus a log of the
//! writes and discards not yet durable. Its semantics are those of a disk with a
//! volatile write cache:
//!
//! * A request takes effect when it completes (when [`BlockDevice::poll`] returns
//!   it), not when it is submitted. Completions come in submission order, or in a
//!   pseudo-random order on a handle made with [`CrashDisk::shuffle_completions`].
//!   While [`CrashDisk::hold`] is on, nothing completes.
//! * A flush makes durable exactly the writes (and discards) that had *completed
//!   before the flush was submitted*; a write completing after that, even before the
//!   flush itself completes, is not covered.
//! * A FUA write is durable when it completes.
//! * A discard makes its range read as zeros (and, until flushed, may be lost).
//! * A power cut keeps any subset of the unflushed writes, sector by sector (a write
//!   can be torn at sector boundaries), applied in order, so a sector ends up with
//!   its durable contents or one of the versions written since, never an older
//!   version over a newer durable one. [`CrashDisk::fail_at`] makes the power fail
//!   at a chosen write, flush or discard (that one and every later request fail with
//!   [`IoError::Gone`]); [`CrashDisk::after_power_loss`] builds the disk a reboot
//!   would see, [`CrashDisk::power_cut`] turns this disk into it.
//!
//! Handles made with [`CrashDisk::handle`] share contents, power and counters but
//! have their own queues (one for the metadata layer, one for a test's own view).
//! Separate disks can share one power supply ([`CrashDisk::share_power`]): then
//! [`CrashDisk::fail_at`] counts the requests of all of them, so a sweep can cut the
//! power at every I/O of a pool's metadata and data disks together.

use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

use crate::{
    BlockDevice, Busy, Command, Completion, DeviceInfo, IoError, MemDisk, Request, SECTOR_SIZE,
};

/// What a power loss keeps of the writes that were not yet durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unflushed {
    /// None of them.
    DropAll,
    /// All of them (the cache happened to drain).
    KeepAll,
    /// A pseudo-random subset of their sectors (seeded).
    Random(u64),
    /// All of them, and the write the power failed at lands in part: its sectors up
    /// to a seeded one (at least one, never all), as a disk writes a multi-sector
    /// request sector by sector. Without such a write, the same as `KeepAll`.
    Torn(u64),
}

/// Requests the disk has carried out since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashStats {
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
}

/// A write or discard not yet durable.
struct Logged {
    /// Completion order among writes and discards.
    seq: u64,
    sector: u64,
    /// The bytes written (zeros for a discard).
    data: Vec<u8>,
    /// Durable already (FUA): a power cut always keeps it.
    durable: bool,
}

/// The power supply of one or more disks.
#[derive(Default)]
struct Power {
    /// Writes, flushes and discards carried out by the disks on this supply.
    operations: u64,
    /// Power fails at the operation with this index (0-based).
    fail_at: Option<u64>,
    /// Whether an operation has met the failed power yet (the first one is the one
    /// the power failed at).
    hit: bool,
}

impl Power {
    fn lost(&self) -> bool {
        self.fail_at.is_some_and(|at| self.operations >= at)
    }
}

struct State {
    live: MemDisk,
    durable: MemDisk,
    unflushed: Vec<Logged>,
    /// Writes and discards completed so far (the next one's `seq`).
    completed: u64,
    stats: CrashStats,
    power: Rc<RefCell<Power>>,
    held: bool,
    /// The write the power failed at, if it was on this disk.
    cut_write: Option<Logged>,
}

/// A queued request and, for a flush, the writes it covers (those with a smaller
/// `seq`).
struct Queued {
    request: Request,
    covers: u64,
}

/// A memory disk with a volatile write cache, reordering and a power switch.
pub struct CrashDisk {
    info: DeviceInfo,
    state: Rc<RefCell<State>>,
    queue: VecDeque<Queued>,
    /// Completions decided at submission (invalid requests).
    failed: VecDeque<Completion>,
    /// xorshift state when completions are shuffled.
    shuffle: Option<u64>,
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

impl CrashDisk {
    /// A zero-filled disk of `sectors` sectors (a [`MemDisk`]'s geometry).
    pub fn new(sectors: u64) -> Self {
        Self::from_disk(&MemDisk::new(sectors))
    }

    /// A disk starting from a copy of `disk`'s contents, all durable.
    pub fn from_disk(disk: &MemDisk) -> Self {
        CrashDisk {
            info: disk.info().clone(),
            state: Rc::new(RefCell::new(State {
                live: disk.snapshot(),
                durable: disk.snapshot(),
                unflushed: Vec::new(),
                completed: 0,
                stats: CrashStats::default(),
                power: Rc::default(),
                held: false,
                cut_write: None,
            })),
            queue: VecDeque::new(),
            failed: VecDeque::new(),
            shuffle: None,
        }
    }

    /// Another handle on the same disk, with its own queue (in order).
    pub fn handle(&self) -> Self {
        self.handle_with_info(self.info.clone())
    }

    /// Another handle with other limits (transfer size, queue depth, discard
    /// support) on the same contents; the size must stay the same.
    pub fn handle_with_info(&self, info: DeviceInfo) -> Self {
        assert_eq!(
            info.sectors, self.info.sectors,
            "a handle has the disk's size"
        );
        CrashDisk {
            info,
            state: Rc::clone(&self.state),
            queue: VecDeque::new(),
            failed: VecDeque::new(),
            shuffle: None,
        }
    }

    /// Completes this handle's requests in a pseudo-random order from `seed`.
    pub fn shuffle_completions(&mut self, seed: u64) {
        self.shuffle = Some(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    }

    /// While on, no request completes (they stay queued).
    pub fn hold(&self, held: bool) {
        self.state.borrow_mut().held = held;
    }

    /// Writes, flushes and discards carried out so far by the disks on this disk's
    /// power supply.
    pub fn operations(&self) -> u64 {
        self.state.borrow().power.borrow().operations
    }

    /// Puts `other` on this disk's power supply (its own counts start from there).
    pub fn share_power(&self, other: &CrashDisk) {
        let power = Rc::clone(&self.state.borrow().power);
        other.state.borrow_mut().power = power;
    }

    pub fn stats(&self) -> CrashStats {
        self.state.borrow().stats
    }

    /// Makes the power fail at the `index`-th write, flush or discard from the start
    /// (that one and every later request fail with [`IoError::Gone`]); `None` keeps
    /// it on.
    pub fn fail_at(&self, index: Option<u64>) {
        let state = self.state.borrow();
        let mut power = state.power.borrow_mut();
        power.fail_at = index;
        power.hit = false;
    }

    /// Whether the power has failed.
    pub fn power_lost(&self) -> bool {
        self.state.borrow().power.borrow().lost()
    }

    /// The disk a reboot would find now.
    pub fn after_power_loss(&self, unflushed: Unflushed) -> MemDisk {
        let state = self.state.borrow();
        let disk = state.durable.snapshot();
        let mut rng = match unflushed {
            Unflushed::DropAll => return disk,
            Unflushed::KeepAll | Unflushed::Torn(_) => None,
            Unflushed::Random(seed) => Some(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
        };
        for entry in &state.unflushed {
            for (n, piece) in entry.data.chunks(SECTOR_SIZE).enumerate() {
                let keep = entry.durable || rng.as_mut().is_none_or(|r| xorshift(r) & 1 == 0);
                if keep {
                    disk.write_at((entry.sector + n as u64) * SECTOR_SIZE as u64, piece);
                }
            }
        }
        if let (Unflushed::Torn(seed), Some(cut)) = (unflushed, &state.cut_write) {
            let sectors = (cut.data.len() / SECTOR_SIZE) as u64;
            if sectors > 1 {
                let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let landed = 1 + xorshift(&mut rng) % (sectors - 1);
                let bytes = landed as usize * SECTOR_SIZE;
                disk.write_at(cut.sector * SECTOR_SIZE as u64, &cut.data[..bytes]);
            }
        }
        disk
    }

    /// A power cut now: the contents become what [`CrashDisk::after_power_loss`]
    /// gives, all durable, and the power is on again. Requests still queued on
    /// handles are the caller's to drop.
    pub fn power_cut(&self, unflushed: Unflushed) {
        let after = self.after_power_loss(unflushed);
        let mut state = self.state.borrow_mut();
        state.durable = after.snapshot();
        state.live = after;
        state.unflushed.clear();
        state.cut_write = None;
        let mut power = state.power.borrow_mut();
        power.fail_at = None;
        power.hit = false;
    }

    /// Copies bytes from byte `offset` of the live contents (no queue).
    pub fn read_at(&self, offset: u64, out: &mut [u8]) {
        self.state.borrow().live.read_at(offset, out);
    }

    /// Stores bytes at byte `offset`, durable at once (test setup, no queue).
    pub fn write_at(&self, offset: u64, data: &[u8]) {
        let state = self.state.borrow();
        state.live.write_at(offset, data);
        state.durable.write_at(offset, data);
    }

    /// A copy of the live contents.
    pub fn contents(&self) -> MemDisk {
        self.state.borrow().live.snapshot()
    }

    /// Carries out a request that completes now.
    fn execute(&self, command: &mut Command, covers: u64) -> Result<(), IoError> {
        let mut state = self.state.borrow_mut();
        {
            let mut power = state.power.borrow_mut();
            if power.lost() {
                let first = !power.hit;
                power.hit = true;
                drop(power);
                if let (true, Command::Write { sector, buf, .. }) = (first, command) {
                    state.cut_write = Some(Logged {
                        seq: state.completed,
                        sector: *sector,
                        data: buf.to_vec(),
                        durable: false,
                    });
                }
                return Err(IoError::Gone);
            }
            if !matches!(command, Command::Read { .. }) {
                power.operations += 1;
            }
        }
        match command {
            Command::Read { sector, buf } => {
                state.live.read_at(*sector * SECTOR_SIZE as u64, buf);
            }
            Command::Write { sector, buf, fua } => {
                state.stats.writes += 1;
                state.live.write_at(*sector * SECTOR_SIZE as u64, buf);
                if *fua {
                    state.durable.write_at(*sector * SECTOR_SIZE as u64, buf);
                }
                let seq = state.completed;
                state.completed += 1;
                state.unflushed.push(Logged {
                    seq,
                    sector: *sector,
                    data: buf.to_vec(),
                    durable: *fua,
                });
            }
            Command::Discard { sector, sectors } => {
                state.stats.discards += 1;
                let zeros = alloc::vec![0u8; *sectors as usize * SECTOR_SIZE];
                state.live.write_at(*sector * SECTOR_SIZE as u64, &zeros);
                let seq = state.completed;
                state.completed += 1;
                state.unflushed.push(Logged {
                    seq,
                    sector: *sector,
                    data: zeros,
                    durable: false,
                });
            }
            Command::Flush => {
                state.stats.flushes += 1;
                let log = core::mem::take(&mut state.unflushed);
                for entry in log {
                    if entry.seq < covers {
                        state
                            .durable
                            .write_at(entry.sector * SECTOR_SIZE as u64, &entry.data);
                    } else {
                        state.unflushed.push(entry);
                    }
                }
                // FUA writes that completed after the flush was submitted are newer
                // than everything it made durable: they stay on top.
                for entry in state.unflushed.iter().filter(|entry| entry.durable) {
                    state
                        .durable
                        .write_at(entry.sector * SECTOR_SIZE as u64, &entry.data);
                }
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
        if self.queue.len() + self.failed.len() >= usize::from(self.info.queue_depth) {
            return Err(Busy(request));
        }
        if let Err(error) = request.command.validate(&self.info) {
            self.failed.push_back(Completion {
                tag: request.tag,
                result: Err(error),
                buf: request.command.into_buf(),
            });
            return Ok(());
        }
        let covers = self.state.borrow().completed;
        self.queue.push_back(Queued { request, covers });
        Ok(())
    }

    fn poll(&mut self) -> Option<Completion> {
        if let Some(done) = self.failed.pop_front() {
            return Some(done);
        }
        if self.queue.is_empty() || self.state.borrow().held {
            return None;
        }
        let pick = match &mut self.shuffle {
            Some(rng) => (xorshift(rng) % self.queue.len() as u64) as usize,
            None => 0,
        };
        let Queued {
            request: Request { tag, mut command },
            covers,
        } = self.queue.remove(pick).expect("picked inside the queue");
        let result = self.execute(&mut command, covers);
        Some(Completion {
            tag,
            result,
            buf: command.into_buf(),
        })
    }

    fn in_flight(&self) -> usize {
        self.queue.len() + self.failed.len()
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

    fn submit(disk: &mut CrashDisk, tag: u64, command: Command) {
        disk.submit(Request { tag, command }).unwrap();
    }

    fn write_command(sector: u64, byte: u8, fua: bool) -> Command {
        Command::Write {
            sector,
            buf: IoBuf::from_slice(&[byte; 512]),
            fua,
        }
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
        assert_eq!(
            disk.stats(),
            CrashStats {
                writes: 2,
                flushes: 1,
                discards: 0
            }
        );
    }

    #[test]
    fn disks_on_one_power_supply_fail_together() {
        let mut first = CrashDisk::new(64);
        let mut second = CrashDisk::new(64);
        first.share_power(&second);
        write(&mut first, 0, 1).unwrap();
        write(&mut second, 0, 2).unwrap();
        run_sync(
            &mut second,
            Command::Read {
                sector: 0,
                buf: IoBuf::with_sectors(1),
            },
        )
        .unwrap();
        assert_eq!((first.operations(), second.operations()), (2, 2));
        first.fail_at(Some(3));
        write(&mut second, 8, 3).unwrap();
        assert_eq!(write(&mut first, 8, 4).unwrap_err(), IoError::Gone);
        assert!(first.power_lost() && second.power_lost());
        assert_eq!(write(&mut second, 16, 5).unwrap_err(), IoError::Gone);
        assert_eq!(second.stats().writes, 2);
        second.power_cut(Unflushed::KeepAll);
        first.power_cut(Unflushed::DropAll);
        assert!(!first.power_lost());
        write(&mut first, 0, 6).unwrap();
        let mut out = [0u8; 1];
        second.read_at(8 * 512, &mut out);
        assert_eq!(out[0], 3, "kept by the cut");
        first.read_at(0, &mut out);
        assert_eq!(out[0], 6, "power is back");
    }

    #[test]
    fn a_torn_write_lands_in_part_over_the_kept_ones() {
        let mut disk = CrashDisk::new(64);
        write(&mut disk, 0, 1).unwrap();
        disk.fail_at(Some(1));
        assert_eq!(write(&mut disk, 0, 2).unwrap_err(), IoError::Gone);
        // A later request that fails is not the one the power failed at.
        assert_eq!(write(&mut disk, 8, 3).unwrap_err(), IoError::Gone);
        for seed in 0..16 {
            let after = disk.after_power_loss(Unflushed::Torn(seed));
            assert_eq!(
                (byte_at(&after, 0), byte_at(&after, 1), byte_at(&after, 8)),
                (2, 1, 0),
                "seed {seed}: the first of two sectors landed over the kept write"
            );
        }
        assert_eq!(byte_at(&disk.after_power_loss(Unflushed::KeepAll), 0), 1);
        disk.power_cut(Unflushed::Torn(0));
        let mut out = [0u8; 2];
        disk.read_at(511, &mut out);
        assert_eq!(out, [2, 1]);
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

    #[test]
    fn requests_take_effect_when_they_complete() {
        let mut disk = CrashDisk::new(64);
        let view = disk.handle();
        disk.hold(true);
        submit(&mut disk, 1, write_command(0, 5, false));
        assert!(disk.poll().is_none(), "held");
        let mut out = [0u8; 1];
        view.read_at(0, &mut out);
        assert_eq!(out[0], 0, "not written before it completes");
        disk.hold(false);
        assert_eq!(disk.poll().unwrap().tag, 1);
        view.read_at(0, &mut out);
        assert_eq!(out[0], 5);
    }

    #[test]
    fn a_flush_covers_only_writes_completed_before_it_was_submitted() {
        let mut disk = CrashDisk::new(64);
        submit(&mut disk, 1, write_command(0, 1, false));
        assert_eq!(disk.poll().unwrap().tag, 1);
        // Write 2 is submitted before the flush but completes after its submission.
        submit(&mut disk, 2, write_command(8, 2, false));
        submit(&mut disk, 3, Command::Flush);
        while disk.poll().is_some() {}
        let after = disk.after_power_loss(Unflushed::DropAll);
        assert_eq!(byte_at(&after, 0), 1, "completed before the flush");
        assert_eq!(
            byte_at(&after, 8),
            0,
            "completed after the flush was submitted"
        );
    }

    #[test]
    fn fua_writes_stay_durable_over_older_unflushed_versions() {
        let mut disk = CrashDisk::new(64);
        write(&mut disk, 0, 1).unwrap();
        run_sync(&mut disk, write_command(0, 2, true)).unwrap();
        run_sync(&mut disk, write_command(0, 3, false)).unwrap();
        for seed in 0..32 {
            let after = disk.after_power_loss(Unflushed::Random(seed));
            assert!(matches!(byte_at(&after, 0), 2 | 3), "seed {seed}");
        }
        assert_eq!(byte_at(&disk.after_power_loss(Unflushed::DropAll), 0), 2);
    }

    /// A flush that makes an older write durable after a newer FUA write of the same
    /// sector completed leaves the FUA write's data there.
    #[test]
    fn a_flush_never_takes_a_sector_back_past_a_fua_write() {
        let mut disk = CrashDisk::new(64);
        write(&mut disk, 0, 1).unwrap();
        // The FUA write completes between the flush's submission and its execution.
        submit(&mut disk, 2, write_command(0, 2, true));
        submit(&mut disk, 3, Command::Flush);
        while disk.poll().is_some() {}
        for unflushed in [Unflushed::DropAll, Unflushed::KeepAll, Unflushed::Random(7)] {
            let after = disk.after_power_loss(unflushed);
            assert_eq!(byte_at(&after, 0), 2, "{unflushed:?}");
        }
    }

    #[test]
    fn shuffled_completions_and_in_place_power_cut() {
        let mut disk = CrashDisk::new(4096);
        disk.shuffle_completions(9);
        for i in 0..32u64 {
            submit(&mut disk, i, write_command(i, i as u8 + 1, false));
        }
        let order: Vec<u64> = core::iter::from_fn(|| disk.poll().map(|c| c.tag)).collect();
        assert_eq!(order.len(), 32);
        assert_ne!(order, (0..32).collect::<Vec<_>>(), "completions reordered");
        disk.power_cut(Unflushed::DropAll);
        let mut out = [0u8; 1];
        disk.read_at(5 * 512, &mut out);
        assert_eq!(out[0], 0, "unflushed write lost");
        assert!(!disk.power_lost());
        write(&mut disk, 5, 9).unwrap();
        disk.read_at(5 * 512, &mut out);
        assert_eq!(out[0], 9, "the disk works after the cut");
    }

    #[test]
    fn discards_read_as_zeros_and_can_be_lost() {
        let mut disk = CrashDisk::new(64);
        disk.write_at(0, &[4; 4096]);
        run_sync(
            &mut disk,
            Command::Discard {
                sector: 0,
                sectors: 8,
            },
        )
        .unwrap();
        let mut out = [1u8; 1];
        disk.read_at(0, &mut out);
        assert_eq!(out[0], 0);
        assert_eq!(byte_at(&disk.after_power_loss(Unflushed::DropAll), 0), 4);
        assert_eq!(disk.stats().discards, 1);
    }
}
