//! Reusable I/O buffers for the engine's own data-device and origin requests.
//!
//! Preparing a new block needs a segment-sized buffer: zeros plus the written
//! sectors, or a copy of the old block. Allocating and zeroing a fresh one per write
//! cost more than the rest of the write put together (with a general-purpose heap,
//! large blocks often come back as new memory that must be faulted in and cleared).
//! Buffers come back in their completions, so the pool keeps a bounded number of
//! them: *zeroed* ones, which a zeroing prep returns after clearing only the part it
//! wrote, and *spare* ones with stale contents, used where every byte is overwritten.

use alloc::vec::Vec;

use blockdev::{IoBuf, SECTOR_SIZE};

/// Most bytes the pool keeps (buffers beyond it are freed).
const POOL_BYTES: usize = 8 << 20;
/// Fewest buffers the pool keeps, however large they are.
const MIN_BUFFERS: usize = 4;

/// What a returned buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Contents {
    /// Anything.
    Stale,
    /// Zeros outside this byte range.
    ZeroOutside(usize, usize),
}

/// Buffers of one size (the engine's segment size) kept for reuse.
pub(crate) struct BufferPool {
    sectors: u64,
    zeroed: Vec<IoBuf>,
    spare: Vec<IoBuf>,
    limit: usize,
}

impl BufferPool {
    /// A pool for buffers of `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        let bytes = (sectors as usize * SECTOR_SIZE).max(SECTOR_SIZE);
        BufferPool {
            sectors,
            zeroed: Vec::new(),
            spare: Vec::new(),
            limit: (POOL_BYTES / bytes).max(MIN_BUFFERS),
        }
    }

    /// A buffer of `sectors` sectors whose contents the caller overwrites in full.
    pub fn take(&mut self, sectors: u64) -> IoBuf {
        if sectors == self.sectors
            && let Some(buf) = self.spare.pop().or_else(|| self.zeroed.pop())
        {
            return buf;
        }
        IoBuf::with_sectors(sectors as usize)
    }

    /// A zero-filled buffer of `sectors` sectors.
    pub fn take_zeroed(&mut self, sectors: u64) -> IoBuf {
        if sectors == self.sectors {
            if let Some(buf) = self.zeroed.pop() {
                return buf;
            }
            if let Some(mut buf) = self.spare.pop() {
                buf.fill(0);
                return buf;
            }
        }
        IoBuf::with_sectors(sectors as usize)
    }

    /// Takes a buffer back (other sizes, and buffers beyond the limit, are freed).
    pub fn give(&mut self, mut buf: IoBuf, contents: Contents) {
        if buf.sectors() != self.sectors || self.zeroed.len() + self.spare.len() >= self.limit {
            return;
        }
        match contents {
            Contents::Stale => self.spare.push(buf),
            Contents::ZeroOutside(from, to) => {
                buf[from..to].fill(0);
                self.zeroed.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_buffers_come_back_zeroed() {
        let mut pool = BufferPool::new(128);
        let mut buf = pool.take_zeroed(128);
        buf[4096..8192].fill(7);
        pool.give(buf, Contents::ZeroOutside(4096, 8192));
        let again = pool.take_zeroed(128);
        assert!(again.iter().all(|&b| b == 0));
        let mut stale = pool.take(128);
        stale.fill(9);
        pool.give(stale, Contents::Stale);
        let cleared = pool.take_zeroed(128);
        assert!(cleared.iter().all(|&b| b == 0));
    }

    #[test]
    fn bounded_and_sized() {
        let mut pool = BufferPool::new(2048);
        assert_eq!(pool.limit, 8);
        for _ in 0..20 {
            pool.give(IoBuf::with_sectors(2048), Contents::Stale);
        }
        assert_eq!(pool.spare.len(), 8);
        pool.give(IoBuf::with_sectors(8), Contents::Stale);
        assert_eq!(pool.spare.len(), 8);
        assert_eq!(pool.take(8).sectors(), 8);
    }
}
