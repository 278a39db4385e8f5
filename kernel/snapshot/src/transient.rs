//! The transient exception store (`N`): exceptions in memory only, the COW used for
//! data from chunk 0 on. Nothing is written at load time and nothing survives it.

pub(crate) struct TransientStore {
    chunk: u64,
    /// Sectors handed out so far.
    next_free: u64,
}

impl TransientStore {
    pub fn new(chunk: u64) -> Self {
        TransientStore {
            chunk,
            next_free: 0,
        }
    }

    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    pub fn allocate(&mut self, cow_sectors: u64) -> Option<u64> {
        if cow_sectors < self.next_free + self.chunk {
            return None;
        }
        let new = self.next_free / self.chunk;
        self.next_free += self.chunk;
        Some(new)
    }

    /// `(sectors_allocated, metadata_sectors)` of the status line.
    pub fn usage(&self) -> (u64, u64) {
        (self.next_free, 0)
    }
}
