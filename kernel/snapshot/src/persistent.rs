//! The persistent exception store: Linux's `dm-snap-persistent` format and commit
//! protocol.
//!
//! In memory it keeps the image of the current (last, not full) metadata area, the
//! number of records in it and the next free chunk. A commit appends records to the
//! image; when the area fills up, the next area is zeroed on disk first (so a reader
//! finds its end there), then the area is written with a flush before it and FUA,
//! which makes the data chunks durable before the records that point at them.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use blockdev::{BlockDevice, Command, IoBuf, IoError};

use crate::chunk_io::{read_into, run_in_order, write_from};
use crate::format::{
    Header, MAGIC, VERSION, area_chunk, read_record, records_per_area, write_record,
};
use crate::table::check_chunk_size;
use crate::{DEFAULT_CHUNK_SECTORS, LoadError};

pub(crate) struct PersistentStore {
    /// Chunk size in sectors.
    chunk: u64,
    per_area: usize,
    /// The current area as on disk plus records not yet committed; zero after the
    /// last record (stale bytes past a terminator never come back to life).
    area: Vec<u8>,
    current_area: u64,
    /// Records in the current area.
    committed: usize,
    next_free: u64,
}

/// A store as [`PersistentStore::open`] found it.
pub(crate) struct Opened {
    pub store: PersistentStore,
    /// `(old, new)` in list order.
    pub exceptions: Vec<(u64, u64)>,
    /// The header says the snapshot was invalidated.
    pub invalid: bool,
    /// What the kernel would log (a chunk size taken from the header).
    pub notes: Vec<String>,
}

impl PersistentStore {
    /// Reads (or, on a COW whose magic is zero, formats) the store. `table_chunk` 0
    /// takes the header's chunk size or the default.
    pub fn open(cow: &mut dyn BlockDevice, table_chunk: u32) -> Result<Opened, LoadError> {
        let mut first = [0u8; 512];
        read_into(cow, 0, &mut first).map_err(LoadError::Io)?;
        let header = Header::decode(&first);
        let mut notes = Vec::new();
        if header.magic == 0 {
            let chunk = if table_chunk == 0 {
                DEFAULT_CHUNK_SECTORS
            } else {
                table_chunk
            };
            let store = Self::format(cow, u64::from(chunk))?;
            return Ok(Opened {
                store,
                exceptions: Vec::new(),
                invalid: false,
                notes,
            });
        }
        if header.magic != MAGIC {
            return Err(LoadError::Corrupt);
        }
        if header.version != VERSION {
            return Err(LoadError::Version(header.version));
        }
        if table_chunk != 0 && header.chunk_size != table_chunk {
            notes.push(format!(
                "chunk size {} in device metadata overrides table chunk size of {table_chunk}.",
                header.chunk_size
            ));
        }
        let chunk = u64::from(header.chunk_size);
        check_chunk_size(chunk).map_err(|why| LoadError::ChunkSize(header.chunk_size, why))?;
        let mut store = Self::empty(chunk);
        if header.valid == 0 {
            return Ok(Opened {
                store,
                exceptions: Vec::new(),
                invalid: true,
                notes,
            });
        }
        let exceptions = store.read_exceptions(cow)?;
        Ok(Opened {
            store,
            exceptions,
            invalid: false,
            notes,
        })
    }

    fn empty(chunk: u64) -> Self {
        PersistentStore {
            chunk,
            per_area: records_per_area(chunk) as usize,
            area: vec![0; chunk as usize * 512],
            current_area: 0,
            committed: 0,
            next_free: 2,
        }
    }

    /// Writes the header and an empty area 0 (plain writes: the first commit's flush
    /// makes them durable).
    fn format(cow: &mut dyn BlockDevice, chunk: u64) -> Result<Self, LoadError> {
        let store = Self::empty(chunk);
        if cow.info().sectors < 2 * chunk {
            return Err(LoadError::TooSmall {
                sectors: cow.info().sectors,
                chunk,
            });
        }
        let header = Header {
            magic: MAGIC,
            valid: 1,
            version: VERSION,
            chunk_size: chunk as u32,
        };
        write_from(cow, 0, &header.encode_chunk(store.area.len()), false).map_err(LoadError::Io)?;
        write_from(cow, chunk, &store.area, false).map_err(LoadError::Io)?;
        Ok(store)
    }

    /// Reads areas from 0 on until one is not full.
    fn read_exceptions(&mut self, cow: &mut dyn BlockDevice) -> Result<Vec<(u64, u64)>, LoadError> {
        let mut exceptions = Vec::new();
        loop {
            let at = area_chunk(self.chunk, self.current_area) * self.chunk;
            if at + self.chunk > cow.info().sectors {
                return Err(LoadError::AreaOutside(self.current_area));
            }
            read_into(cow, at, &mut self.area).map_err(LoadError::Io)?;
            let mut used = self.per_area;
            for index in 0..self.per_area {
                let (old, new) = read_record(&self.area, index);
                if new == 0 {
                    used = index;
                    break;
                }
                self.next_free = self.next_free.max(new + 1);
                exceptions.push((old, new));
            }
            if used < self.per_area {
                self.committed = used;
                self.area[used * 16..].fill(0);
                self.skip_area_chunk();
                return Ok(exceptions);
            }
            self.current_area += 1;
        }
    }

    fn stride(&self) -> u64 {
        self.per_area as u64 + 1
    }

    /// `next_free` never names an area chunk.
    fn skip_area_chunk(&mut self) {
        if self.next_free % self.stride() == 1 {
            self.next_free += 1;
        }
    }

    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// The next data chunk, if the COW holds it.
    pub fn allocate(&mut self, cow_sectors: u64) -> Option<u64> {
        if cow_sectors < (self.next_free + 1) * self.chunk {
            return None;
        }
        let new = self.next_free;
        self.next_free += 1;
        self.skip_area_chunk();
        Some(new)
    }

    /// Appends `records` (whose data is written) to the in-memory list and returns
    /// the commit's requests, to be carried out one after the other: at most one
    /// area write per area touched, each preceded by a flush and written with FUA,
    /// and before an area is committed full, its successor zeroed.
    pub fn plan_commit(&mut self, records: &[(u64, u64)]) -> Vec<Command> {
        let mut commands = Vec::new();
        let mut pending = false;
        for &record in records {
            write_record(&mut self.area, self.committed, record);
            self.committed += 1;
            pending = true;
            if self.committed == self.per_area {
                let next = area_chunk(self.chunk, self.current_area + 1) * self.chunk;
                commands.push(Command::Write {
                    sector: next,
                    buf: IoBuf::with_sectors(self.chunk as usize),
                    fua: false,
                });
                commands.extend(self.area_commands());
                self.committed = 0;
                self.current_area += 1;
                self.area.fill(0);
                pending = false;
            }
        }
        if pending {
            commands.extend(self.area_commands());
        }
        commands
    }

    /// A flush, then the current area with FUA: the data before the records.
    fn area_commands(&self) -> [Command; 2] {
        let at = area_chunk(self.chunk, self.current_area) * self.chunk;
        [
            Command::Flush,
            Command::Write {
                sector: at,
                buf: IoBuf::from_slice(&self.area),
                fua: true,
            },
        ]
    }

    /// Marks the store invalid on disk (a plain write of chunk 0 with `valid = 0`).
    pub fn invalidate(&self, cow: &mut dyn BlockDevice) -> Result<(), IoError> {
        let header = Header {
            magic: MAGIC,
            valid: 0,
            version: VERSION,
            chunk_size: self.chunk as u32,
        };
        write_from(cow, 0, &header.encode_chunk(self.area.len()), false)
    }

    /// The run to merge next: the last record and how many records before it in the
    /// same area continue it backwards (`old` and `new` each one less per step).
    /// Steps back to the previous (full) area when the current one is empty; `None`
    /// when nothing is left.
    pub fn prepare_merge(
        &mut self,
        cow: &mut dyn BlockDevice,
    ) -> Result<Option<(u64, u64, usize)>, IoError> {
        if self.committed == 0 {
            if self.current_area == 0 {
                return Ok(None);
            }
            self.current_area -= 1;
            let at = area_chunk(self.chunk, self.current_area) * self.chunk;
            read_into(cow, at, &mut self.area)?;
            self.committed = self.per_area;
        }
        let (last_old, last_new) = read_record(&self.area, self.committed - 1);
        let mut count = 1;
        while count < self.committed {
            let (old, new) = read_record(&self.area, self.committed - 1 - count);
            if old.wrapping_add(count as u64) != last_old
                || new.wrapping_add(count as u64) != last_new
            {
                break;
            }
            count += 1;
        }
        Ok(Some((
            last_old + 1 - count as u64,
            last_new + 1 - count as u64,
            count,
        )))
    }

    /// Clears the last `count` records of the current area and writes it (flush
    /// before, FUA): the merged run is off the list.
    pub fn commit_merge(&mut self, cow: &mut dyn BlockDevice, count: usize) -> Result<(), IoError> {
        for index in self.committed - count..self.committed {
            write_record(&mut self.area, index, (0, 0));
        }
        run_in_order(cow, self.area_commands())?;
        self.committed -= count;
        self.next_free = area_chunk(self.chunk, self.current_area) + self.committed as u64 + 1;
        Ok(())
    }

    /// `(sectors_allocated, metadata_sectors)` of the status line.
    pub fn usage(&self) -> (u64, u64) {
        (
            self.next_free * self.chunk,
            (self.current_area + 2) * self.chunk,
        )
    }
}
