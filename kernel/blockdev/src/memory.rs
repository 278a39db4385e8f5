//! A sparse in-memory disk: the stand-in for real hardware in host tests and
//! benchmarks.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::rc::Rc;
use alloc::string::String;
use core::cell::RefCell;

use zerocopy::FromZeros;

use crate::{BlockDevice, Busy, Command, Completion, DeviceInfo, Request, SECTOR_SIZE};

/// Bytes per storage chunk; chunks never written (or fully discarded) read as zeros
/// and take no memory.
const CHUNK: usize = 64 * 1024;

/// Chunks are shared between a disk and its snapshots until one of them writes to
/// it, so a snapshot costs a pointer per chunk (crash sweeps take one per cut).
type Store = BTreeMap<u64, Rc<Box<[u8; CHUNK]>>>;

/// An in-memory disk. Handles made with [`MemDisk::handle`] share the contents but
/// have their own request queues, so a test can keep a view of a disk it gave away.
pub struct MemDisk {
    info: DeviceInfo,
    store: Rc<RefCell<Store>>,
    done: VecDeque<Completion>,
    /// When set, completions come back in a pseudo-random order (xorshift state).
    shuffle: Option<u64>,
}

impl MemDisk {
    /// A zero-filled disk of `sectors` sectors that accepts discards.
    pub fn new(sectors: u64) -> Self {
        Self::with_info(DeviceInfo {
            sectors,
            read_only: false,
            discard: true,
            max_transfer_sectors: 1 << 16,
            queue_depth: 64,
            model: String::from("memory disk"),
            serial: String::new(),
        })
    }

    /// A zero-filled disk with the given geometry and capabilities.
    pub fn with_info(info: DeviceInfo) -> Self {
        MemDisk {
            info,
            store: Rc::default(),
            done: VecDeque::new(),
            shuffle: None,
        }
    }

    /// Another handle on the same contents, with its own queue and the given
    /// capabilities (e.g. a read-only view of an origin).
    pub fn handle_with_info(&self, info: DeviceInfo) -> Self {
        MemDisk {
            info,
            store: Rc::clone(&self.store),
            done: VecDeque::new(),
            shuffle: None,
        }
    }

    /// Another handle on the same contents, with its own queue.
    pub fn handle(&self) -> Self {
        self.handle_with_info(self.info.clone())
    }

    /// An independent copy of the current contents (cheap: chunks are copied when
    /// either side first writes to them).
    pub fn snapshot(&self) -> Self {
        let copy = self.store.borrow().clone();
        MemDisk {
            info: self.info.clone(),
            store: Rc::new(RefCell::new(copy)),
            done: VecDeque::new(),
            shuffle: None,
        }
    }

    /// Completes requests in a pseudo-random order derived from `seed`, to shake out
    /// callers that assume submission order.
    pub fn shuffle_completions(&mut self, seed: u64) {
        self.shuffle = Some(seed | 1);
    }

    /// Copies bytes starting at byte `offset` into `out` (test access, no queue).
    pub fn read_at(&self, offset: u64, out: &mut [u8]) {
        let store = self.store.borrow();
        for_each_piece(offset, out.len(), |chunk, within, at, len| {
            let dest = &mut out[at..at + len];
            match store.get(&chunk) {
                Some(data) => dest.copy_from_slice(&data[within..within + len]),
                None => dest.fill(0),
            }
        });
    }

    /// Stores `data` at byte `offset` (test access, no queue).
    pub fn write_at(&self, offset: u64, data: &[u8]) {
        let mut store = self.store.borrow_mut();
        for_each_piece(offset, data.len(), |chunk, within, at, len| {
            let slot = store.entry(chunk).or_insert_with(|| Rc::new(new_chunk()));
            Rc::make_mut(slot)[within..within + len].copy_from_slice(&data[at..at + len]);
        });
    }

    /// Bytes of memory holding data (chunks ever written and not discarded).
    pub fn resident_bytes(&self) -> usize {
        self.store.borrow().len() * CHUNK
    }

    fn discard(&self, offset: u64, len: u64) {
        let mut store = self.store.borrow_mut();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let chunk = pos / CHUNK as u64;
            let within = (pos % CHUNK as u64) as usize;
            let piece = (CHUNK - within).min((end - pos) as usize);
            if piece == CHUNK {
                store.remove(&chunk);
            } else if let Some(data) = store.get_mut(&chunk) {
                Rc::make_mut(data)[within..within + piece].fill(0);
            }
            pos += piece as u64;
        }
    }

    fn execute(&self, command: &mut Command) -> Result<(), crate::IoError> {
        command.validate(&self.info)?;
        match command {
            Command::Read { sector, buf } => self.read_at(*sector * SECTOR_SIZE as u64, buf),
            Command::Write { sector, buf, .. } => self.write_at(*sector * SECTOR_SIZE as u64, buf),
            Command::Flush => {}
            Command::Discard { sector, sectors } => {
                self.discard(*sector * SECTOR_SIZE as u64, *sectors * SECTOR_SIZE as u64)
            }
        }
        Ok(())
    }
}

/// A zero-filled chunk, allocated zeroed so that memory the allocator knows to be
/// zero is not written again (parts never written stay untouched host pages).
fn new_chunk() -> Box<[u8; CHUNK]> {
    <[u8; CHUNK]>::new_box_zeroed().unwrap_or_else(|_| {
        alloc::alloc::handle_alloc_error(core::alloc::Layout::new::<[u8; CHUNK]>())
    })
}

/// Splits the byte range `offset..offset+len` at chunk boundaries and calls
/// `f(chunk, offset within chunk, offset within range, piece length)`.
fn for_each_piece(offset: u64, len: usize, mut f: impl FnMut(u64, usize, usize, usize)) {
    let mut at = 0;
    while at < len {
        let pos = offset + at as u64;
        let within = (pos % CHUNK as u64) as usize;
        let piece = (CHUNK - within).min(len - at);
        f(pos / CHUNK as u64, within, at, piece);
        at += piece;
    }
}

impl BlockDevice for MemDisk {
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
        match &mut self.shuffle {
            Some(state) if !self.done.is_empty() => {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                let pick = (*state % self.done.len() as u64) as usize;
                self.done.swap_remove_back(pick)
            }
            _ => self.done.pop_front(),
        }
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IoBuf, IoError, run_batch, run_sync};
    use alloc::vec::Vec;

    #[test]
    fn write_read_discard_round_trip() {
        let mut disk = MemDisk::new(1024);
        let mut data = IoBuf::with_sectors(300);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        let expected = data.to_vec();
        run_sync(
            &mut disk,
            Command::Write {
                sector: 100,
                buf: data,
                fua: false,
            },
        )
        .unwrap();
        let back = run_sync(
            &mut disk,
            Command::Read {
                sector: 100,
                buf: IoBuf::with_sectors(300),
            },
        )
        .unwrap();
        assert_eq!(&back[..], &expected[..]);

        run_sync(
            &mut disk,
            Command::Discard {
                sector: 0,
                sectors: 1024,
            },
        )
        .unwrap();
        let back = run_sync(
            &mut disk,
            Command::Read {
                sector: 100,
                buf: IoBuf::with_sectors(300),
            },
        )
        .unwrap();
        assert!(back.iter().all(|&b| b == 0));
        assert_eq!(disk.resident_bytes(), 0);
    }

    #[test]
    fn a_snapshot_and_its_disk_change_independently() {
        let disk = MemDisk::new(1024);
        disk.write_at(0, &[1; 1000]);
        let copy = disk.snapshot();
        disk.write_at(10, &[2; 5]);
        copy.write_at(500, &[3; 5]);
        copy.discard(0, 8);
        let (mut mine, mut theirs) = ([0u8; 1000], [0u8; 1000]);
        disk.read_at(0, &mut mine);
        copy.read_at(0, &mut theirs);
        assert_eq!((mine[10], mine[500], mine[0]), (2, 1, 1));
        assert_eq!(
            (theirs[10], theirs[500], theirs[0], theirs[8]),
            (1, 3, 0, 1)
        );
        let later = copy.handle();
        later.write_at(20, &[4]);
        copy.read_at(20, &mut theirs[..1]);
        assert_eq!(theirs[0], 4, "a handle shares its disk's contents");
    }

    #[test]
    fn errors_are_completions_not_panics() {
        let mut disk = MemDisk::new(8);
        let past_end = Command::Read {
            sector: 7,
            buf: IoBuf::with_sectors(2),
        };
        assert_eq!(
            run_sync(&mut disk, past_end).unwrap_err(),
            IoError::OutOfRange
        );
        let wrapping = Command::Discard {
            sector: u64::MAX,
            sectors: 2,
        };
        assert_eq!(
            run_sync(&mut disk, wrapping).unwrap_err(),
            IoError::OutOfRange
        );
        let mut info = disk.info().clone();
        info.read_only = true;
        let mut ro = disk.handle_with_info(info);
        let write = Command::Write {
            sector: 0,
            buf: IoBuf::with_sectors(1),
            fua: false,
        };
        assert_eq!(run_sync(&mut ro, write).unwrap_err(), IoError::ReadOnly);
    }

    #[test]
    fn batch_keeps_order_with_shuffled_completions_and_full_queue() {
        let mut disk = MemDisk::new(4096);
        disk.shuffle_completions(7);
        let writes = (0..200u64).map(|i| Command::Write {
            sector: i,
            buf: IoBuf::from_slice(&[i as u8; 512]),
            fua: false,
        });
        run_batch(&mut disk, writes).unwrap();
        let reads = (0..200u64).map(|i| Command::Read {
            sector: i,
            buf: IoBuf::with_sectors(1),
        });
        let bufs = run_batch(&mut disk, reads).unwrap();
        let firsts: Vec<u8> = bufs.iter().map(|b| b[0]).collect();
        assert_eq!(firsts, (0..200u64).map(|i| i as u8).collect::<Vec<_>>());
    }

    #[test]
    fn handles_share_contents_and_snapshots_do_not() {
        let disk = MemDisk::new(64);
        let view = disk.handle();
        let frozen = disk.snapshot();
        disk.write_at(512, b"thinbox!");
        let mut out = [0u8; 8];
        view.read_at(512, &mut out);
        assert_eq!(&out, b"thinbox!");
        frozen.read_at(512, &mut out);
        assert_eq!(out, [0; 8]);
    }
}
