//! A bounded write-back cache of metadata blocks over a [`BlockDevice`].
//!
//! Capacity is a number of blocks fixed at open; memory never grows with the pool.
//! Eviction is CLOCK (one "recently used" bit per slot). Blocks changed in the
//! current transaction are *dirty*: they are written at commit, or earlier when the
//! cache needs room. Writing early is safe because a dirty block is always a block
//! allocated in this transaction, which the committed superblock does not reach.
//! Blocks are handed out as `Rc` snapshots, so a reader keeps a stable copy while the
//! cache evicts or a writer changes the slot (copy-on-write of the buffer).

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec::Vec;

use blockdev::{BlockDevice, Command, IoBuf, run_batch};
use hashbrown::HashMap;

use crate::block::{BLOCK_SECTORS, BLOCK_SIZE, Block, Expect, validate};
use crate::checksum::seal;
use crate::error::{Error, Result};

/// Default capacity: 16 MiB of 4 KiB blocks.
pub const DEFAULT_CACHE_BLOCKS: usize = 4096;
/// The smallest capacity that lets a b-tree operation hold its working set.
pub const MIN_CACHE_BLOCKS: usize = 64;

struct Slot {
    block: u64,
    data: Rc<Block>,
    /// What the block was validated as (or built as, for new blocks).
    expect: Expect,
    dirty: bool,
    referenced: bool,
}

/// Counters for benchmarks and status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Dirty blocks written before their commit to make room.
    pub early_writes: u64,
    /// Blocks written by commits.
    pub commit_writes: u64,
}

/// A reference-counted copy of a block's bytes, made with a single copy (no
/// intermediate block on the stack).
pub fn shared_copy(bytes: &[u8]) -> Rc<Block> {
    Rc::<[u8]>::from(&bytes[..BLOCK_SIZE])
        .try_into()
        .expect("exactly one block")
}

/// The cache and the device under it.
pub struct Cache {
    device: Box<dyn BlockDevice>,
    slots: Vec<Option<Slot>>,
    index: HashMap<u64, usize>,
    free_slots: Vec<usize>,
    hand: usize,
    capacity: usize,
    stats: CacheStats,
}

impl Cache {
    /// A cache of `capacity` blocks (at least [`MIN_CACHE_BLOCKS`]) over `device`.
    pub fn new(device: Box<dyn BlockDevice>, capacity: usize) -> Self {
        let capacity = capacity.max(MIN_CACHE_BLOCKS);
        Cache {
            device,
            slots: Vec::new(),
            index: HashMap::new(),
            free_slots: Vec::new(),
            hand: 0,
            capacity,
            stats: CacheStats::default(),
        }
    }

    /// The device's size in whole metadata blocks.
    pub fn device_blocks(&self) -> u64 {
        self.device.info().sectors / BLOCK_SECTORS
    }

    /// The device under the cache (its I/O is synchronous, so it may be replaced by
    /// one holding the same blocks between any two calls).
    pub fn device_mut(&mut self) -> &mut Box<dyn BlockDevice> {
        &mut self.device
    }

    /// Counters since open.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Capacity in blocks.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Reads a block without the cache and without validation (block 0 at open).
    pub fn read_raw(&mut self, block: u64) -> Result<Rc<Block>> {
        let buf = blockdev::run_sync(
            self.device.as_mut(),
            Command::Read {
                sector: block * BLOCK_SECTORS,
                buf: IoBuf::zeroed(BLOCK_SIZE),
            },
        )
        .map_err(|error| Error::Io { block, error })?;
        Ok(shared_copy(&buf))
    }

    /// Writes an already sealed block straight to the device (the superblock).
    pub fn write_raw(&mut self, block: u64, data: &Block) -> Result<()> {
        blockdev::run_sync(
            self.device.as_mut(),
            Command::Write {
                sector: block * BLOCK_SECTORS,
                buf: IoBuf::from_slice(data),
                fua: false,
            },
        )
        .map(drop)
        .map_err(|error| Error::Io { block, error })
    }

    /// Makes every completed write durable.
    pub fn flush_device(&mut self) -> Result<()> {
        blockdev::run_sync(self.device.as_mut(), Command::Flush)
            .map(drop)
            .map_err(Error::Flush)
    }

    /// Whether the block is cached and dirty.
    pub fn is_dirty(&self, block: u64) -> bool {
        self.index
            .get(&block)
            .and_then(|&i| self.slots[i].as_ref())
            .is_some_and(|slot| slot.dirty)
    }

    /// The block's contents, read and validated on a miss.
    pub fn read(&mut self, block: u64, expect: Expect) -> Result<Rc<Block>> {
        if let Some(&i) = self.index.get(&block) {
            let slot = self.slots[i].as_mut().expect("indexed slot is live");
            if slot.expect == expect || slot.dirty {
                slot.referenced = true;
                self.stats.hits += 1;
                return Ok(Rc::clone(&slot.data));
            }
            // Asked for as another kind of block (only corrupt metadata does that):
            // validate the on-disk copy as that kind.
            self.forget(block);
        }
        self.stats.misses += 1;
        let data = self.read_raw(block)?;
        validate(block, &data, expect)?;
        self.insert(block, Rc::clone(&data), expect, false)?;
        Ok(data)
    }

    /// Mutable access to a cached or readable block, which becomes dirty.
    pub fn write(&mut self, block: u64, expect: Expect) -> Result<&mut Block> {
        if !self.index.contains_key(&block) {
            self.read(block, expect)?;
        }
        let i = self.index[&block];
        let slot = self.slots[i].as_mut().expect("indexed slot is live");
        slot.dirty = true;
        slot.referenced = true;
        slot.expect = expect;
        Ok(Rc::make_mut(&mut slot.data))
    }

    /// Installs new contents for a block (a fresh allocation), dirty.
    pub fn install(&mut self, block: u64, data: Rc<Block>, expect: Expect) -> Result<&mut Block> {
        self.forget(block);
        self.insert(block, data, expect, true)?;
        let i = self.index[&block];
        let slot = self.slots[i].as_mut().expect("indexed slot is live");
        Ok(Rc::make_mut(&mut slot.data))
    }

    /// Drops a block from the cache without writing it (it was freed).
    pub fn forget(&mut self, block: u64) {
        if let Some(i) = self.index.remove(&block) {
            self.slots[i] = None;
            self.free_slots.push(i);
        }
    }

    /// Drops everything, dirty or not (transaction abort).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
        self.free_slots.clear();
        self.hand = 0;
    }

    fn insert(&mut self, block: u64, data: Rc<Block>, expect: Expect, dirty: bool) -> Result<()> {
        if self.free_slots.is_empty() && self.slots.len() >= self.capacity {
            self.evict()?;
        }
        let slot = Slot {
            block,
            data,
            expect,
            dirty,
            referenced: true,
        };
        let i = match self.free_slots.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.index.insert(block, i);
        Ok(())
    }

    /// Frees a batch of slots (1/32 of the cache), writing the dirty ones together.
    fn evict(&mut self) -> Result<()> {
        let want = (self.capacity / 32).max(1);
        let mut victims = Vec::with_capacity(want);
        let mut scanned = 0;
        while victims.len() < want && scanned < 3 * self.slots.len() {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            scanned += 1;
            let Some(slot) = self.slots[i].as_mut() else {
                continue;
            };
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            let slot = self.slots[i].take().expect("checked above");
            self.index.remove(&slot.block);
            self.free_slots.push(i);
            victims.push(slot);
        }
        let dirty: Vec<Slot> = victims.into_iter().filter(|slot| slot.dirty).collect();
        self.stats.early_writes += dirty.len() as u64;
        self.write_slots(dirty)
    }

    /// Writes every dirty block (sealed, in block order, adjacent blocks merged into
    /// one request) and marks them clean. Does not flush.
    pub fn write_dirty(&mut self) -> Result<()> {
        let mut dirty = Vec::new();
        for slot in self.slots.iter_mut().flatten() {
            if slot.dirty {
                slot.dirty = false;
                dirty.push(Slot {
                    block: slot.block,
                    data: Rc::clone(&slot.data),
                    expect: slot.expect,
                    dirty: true,
                    referenced: false,
                });
            }
        }
        self.stats.commit_writes += dirty.len() as u64;
        self.write_slots(dirty)
    }

    fn write_slots(&mut self, mut slots: Vec<Slot>) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        slots.sort_unstable_by_key(|slot| slot.block);
        let max_run =
            (self.device.info().max_transfer_sectors as u64 / BLOCK_SECTORS).clamp(1, 256);
        let mut commands = Vec::new();
        let mut first_blocks = Vec::new();
        let mut start = 0;
        while start < slots.len() {
            let mut end = start + 1;
            while end < slots.len()
                && slots[end].block == slots[end - 1].block + 1
                && ((end - start) as u64) < max_run
            {
                end += 1;
            }
            let mut buf = IoBuf::zeroed((end - start) * BLOCK_SIZE);
            for (n, slot) in slots[start..end].iter().enumerate() {
                let piece: &mut Block = (&mut buf[n * BLOCK_SIZE..(n + 1) * BLOCK_SIZE])
                    .try_into()
                    .expect("one block");
                piece.copy_from_slice(&slot.data[..]);
                seal(piece, slot.block, slot.expect.salt());
            }
            first_blocks.push(slots[start].block);
            commands.push(Command::Write {
                sector: slots[start].block * BLOCK_SECTORS,
                buf,
                fua: false,
            });
            start = end;
        }
        run_batch(self.device.as_mut(), commands).map_err(|error| Error::Io {
            block: first_blocks[0],
            error,
        })?;
        Ok(())
    }
}
