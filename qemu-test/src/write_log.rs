//! Write logs in the dm-log-writes format, as QEMU's `blklogwrites` block driver
//! (see [`crate::Options::logged_disk`]) and Linux's `log-writes` target record them,
//! and the disk a power cut after any prefix of a log leaves behind.
//!
//! Layout (all integers little-endian, `S` = the log's sector size): sector 0 holds
//! the super block (magic, version 1, number of entries, `S`); entries follow from
//! sector 1, each a header sector (disk sector, sector count, flags, length of
//! private data; disk sectors and counts in units of `S`) followed by the written
//! data, except for discards (no data) and marks (a label in the header sector after
//! the header fields, no data).
//!
//! What QEMU 7.2's `blklogwrites` records:
//! - an entry is appended once the request has completed on the disk image and before
//!   the guest sees it complete, so the log's order is the order of completion;
//! - a guest flush first flushes the image, then appends an entry with the FLUSH flag
//!   and no data, then rewrites the super block; a flush with no write completed since
//!   the previous one is not logged at all;
//! - write-zeroes is logged as a plain write whose data is zeroes;
//! - the FUA flag never appears: QEMU emulates a FUA write as a write followed by a
//!   flush of the node, and that flush is logged only when another write completed
//!   since the last flush (QEMU counts the FUA write itself only after the emulated
//!   flush). Guests on virtio-blk, which has no FUA, send a FLUSH after the write
//!   instead, which is logged like every flush;
//! - the super block's entry count is rewritten on every flush and every
//!   `log-super-update-interval` entries (4096 unless set), so with an interval of 1
//!   [`logged_entries`] tells how far the log had got at any moment.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The super block's magic number.
pub const LOG_MAGIC: u64 = 0x006a_7366_7773_6872;
/// The only format version there is.
pub const LOG_VERSION: u64 = 1;
/// Everything written before this entry is durable (a write carrying it is a
/// pre-flush: its own data is not).
pub const FLAG_FLUSH: u64 = 1 << 0;
/// This entry's data is durable once it completed.
pub const FLAG_FUA: u64 = 1 << 1;
/// The sectors were discarded; no data follows.
pub const FLAG_DISCARD: u64 = 1 << 2;
/// A label put in the log by its user, no data change.
pub const FLAG_MARK: u64 = 1 << 3;
/// Linux tags metadata writes of file systems with this; replay ignores it.
pub const FLAG_METADATA: u64 = 1 << 4;
const KNOWN_FLAGS: u64 = FLAG_FLUSH | FLAG_FUA | FLAG_DISCARD | FLAG_MARK | FLAG_METADATA;

/// Bytes of the super block's fields (magic, version, entries, sector size).
pub const SUPER_BLOCK_BYTES: usize = 28;
/// Bytes of an entry header's fields (sector, sectors, flags, data length).
pub const ENTRY_HEADER_BYTES: usize = 32;

/// One logged request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// First sector written, in the log's sector size.
    pub sector: u64,
    /// Number of sectors written, discarded or zeroed.
    pub sectors: u64,
    pub flags: u64,
    /// Where the entry's data (or a mark's label) lies in the log.
    data: Range<usize>,
}

impl Entry {
    pub fn is_flush(&self) -> bool {
        self.flags & FLAG_FLUSH != 0
    }

    pub fn is_fua(&self) -> bool {
        self.flags & FLAG_FUA != 0
    }

    pub fn is_discard(&self) -> bool {
        self.flags & FLAG_DISCARD != 0
    }

    pub fn is_mark(&self) -> bool {
        self.flags & FLAG_MARK != 0
    }
}

/// What a power cut does to the writes that completed after the last flush and
/// carry no FUA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unflushed {
    /// All of them are lost (a volatile cache that never wrote back).
    Lost,
    /// Each is kept or lost by a coin toss seeded with this value (a cache that wrote
    /// back some of them, in any order): one seed, one outcome.
    Some { seed: u64 },
}

/// A parsed log: its bytes and the entries its super block counts.
pub struct WriteLog {
    bytes: Vec<u8>,
    sector_size: u64,
    entries: Vec<Entry>,
}

impl WriteLog {
    /// Reads and parses the log file at `path`.
    pub fn read(path: &Path) -> io::Result<WriteLog> {
        let bytes = std::fs::read(path)?;
        WriteLog::parse(bytes)
            .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", path.display())))
    }

    /// Parses a whole log; every entry the super block counts must be present.
    pub fn parse(bytes: Vec<u8>) -> io::Result<WriteLog> {
        let superblock = SuperBlock::parse(&bytes)?;
        let sector_size = superblock.sector_size;
        let sector = usize::try_from(sector_size).map_err(|_| invalid("sector size too large"))?;
        let mut entries = Vec::new();
        let mut at = sector;
        for index in 0..superblock.entries {
            let header = bytes
                .get(at..at + ENTRY_HEADER_BYTES)
                .ok_or_else(|| invalid(format!("entry {index} lies past the end of the log")))?;
            let field = |slot: usize| le64(&header[slot * 8..]);
            let (first, sectors, flags, private_len) = (field(0), field(1), field(2), field(3));
            if flags & !KNOWN_FLAGS != 0 {
                return Err(invalid(format!(
                    "entry {index} has unknown flags {flags:#x}"
                )));
            }
            let private_len =
                usize::try_from(private_len).map_err(|_| invalid("data length too large"))?;
            let data = if flags & FLAG_MARK != 0 {
                if private_len > sector - ENTRY_HEADER_BYTES {
                    return Err(invalid(format!("entry {index}: mark longer than a sector")));
                }
                at + ENTRY_HEADER_BYTES..at + ENTRY_HEADER_BYTES + private_len
            } else if private_len != 0 {
                return Err(invalid(format!(
                    "entry {index} carries {private_len} bytes of inline data, which only \
                     DAX devices log; not supported"
                )));
            } else if flags & FLAG_DISCARD != 0 {
                at + sector..at + sector
            } else {
                let len = sectors
                    .checked_mul(sector_size)
                    .and_then(|len| usize::try_from(len).ok())
                    .ok_or_else(|| invalid(format!("entry {index} is too long")))?;
                at + sector..at + sector + len
            };
            if data.end > bytes.len() {
                return Err(invalid(format!(
                    "the data of entry {index} lies past the end of the log"
                )));
            }
            at = if flags & FLAG_MARK != 0 {
                at + sector
            } else {
                data.end
            };
            entries.push(Entry {
                sector: first,
                sectors,
                flags,
                data,
            });
        }
        Ok(WriteLog {
            bytes,
            sector_size,
            entries,
        })
    }

    /// The log's sector size in bytes (the unit of entries' sectors).
    pub fn sector_size(&self) -> u64 {
        self.sector_size
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The data a write entry carries (empty for flushes, discards and marks).
    pub fn data(&self, entry: &Entry) -> &[u8] {
        if entry.is_mark() {
            return &[];
        }
        &self.bytes[entry.data.clone()]
    }

    /// A mark entry's label.
    pub fn mark(&self, entry: &Entry) -> Option<String> {
        entry
            .is_mark()
            .then(|| String::from_utf8_lossy(&self.bytes[entry.data.clone()]).into_owned())
    }

    /// The entries among the first `prefix` that a power cut right after them leaves
    /// on the disk, in log order: every entry before the last flush, and after it the
    /// FUA writes and whatever `unflushed` keeps.
    pub fn surviving(&self, prefix: usize, unflushed: Unflushed) -> io::Result<Vec<&Entry>> {
        let logged = self.entries.get(..prefix).ok_or_else(|| {
            invalid(format!(
                "a cut after {prefix} entries, but the log holds {}",
                self.entries.len()
            ))
        })?;
        let flushed = logged.iter().rposition(Entry::is_flush).unwrap_or_default();
        let mut coin = match unflushed {
            Unflushed::Lost => None,
            Unflushed::Some { seed } => Some(fastrand::Rng::with_seed(seed)),
        };
        let kept = logged.iter().enumerate().filter(|(index, entry)| {
            *index < flushed || entry.is_fua() || coin.as_mut().is_some_and(|coin| coin.bool())
        });
        Ok(kept
            .map(|(_, entry)| entry)
            .filter(|entry| !entry.is_mark() && entry.sectors > 0)
            .collect())
    }

    /// Writes onto `image` (the disk as it was when logging began) what a power cut
    /// after the first `prefix` entries leaves on the disk: see [`WriteLog::surviving`].
    /// Discarded sectors read as zeroes afterwards, as a raw image's holes do.
    pub fn rebuild(&self, image: &File, prefix: usize, unflushed: Unflushed) -> io::Result<()> {
        for entry in self.surviving(prefix, unflushed)? {
            let offset = entry
                .sector
                .checked_mul(self.sector_size)
                .ok_or_else(|| invalid("entry sector out of range"))?;
            if entry.is_discard() {
                let zeroes = vec![0u8; (entry.sectors * self.sector_size) as usize];
                image.write_all_at(&zeroes, offset)?;
            } else {
                image.write_all_at(self.data(entry), offset)?;
            }
        }
        Ok(())
    }
}

/// The number of entries the super block of the log at `path` counts now (0 while
/// the log is still empty): a moment in the log, to rebuild the disk at later.
pub fn logged_entries(path: &Path) -> io::Result<usize> {
    let mut head = [0u8; SUPER_BLOCK_BYTES];
    let read = File::open(path)?.read_at(&mut head, 0)?;
    if read == 0 {
        return Ok(0);
    }
    let entries = SuperBlock::parse(&head[..read])?.entries;
    usize::try_from(entries).map_err(|_| invalid("entry count too large"))
}

struct SuperBlock {
    entries: u64,
    sector_size: u64,
}

impl SuperBlock {
    fn parse(bytes: &[u8]) -> io::Result<SuperBlock> {
        let head = bytes
            .get(..SUPER_BLOCK_BYTES)
            .ok_or_else(|| invalid("shorter than a super block"))?;
        let magic = le64(head);
        if magic != LOG_MAGIC {
            return Err(invalid(format!("bad magic {magic:#x}")));
        }
        let version = le64(&head[8..]);
        if version != LOG_VERSION {
            return Err(invalid(format!("unsupported version {version}")));
        }
        let sector_size = u64::from(u32::from_le_bytes(head[24..28].try_into().unwrap()));
        if !sector_size.is_power_of_two() || sector_size < ENTRY_HEADER_BYTES as u64 {
            return Err(invalid(format!("bad sector size {sector_size}")));
        }
        Ok(SuperBlock {
            entries: le64(&head[16..]),
            sector_size,
        })
    }
}

fn le64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().unwrap())
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECTOR: usize = 512;

    /// Builds logs entry by entry, as the writers lay them out.
    struct LogBuilder {
        body: Vec<u8>,
        entries: u64,
    }

    impl LogBuilder {
        fn new() -> LogBuilder {
            LogBuilder {
                body: Vec::new(),
                entries: 0,
            }
        }

        fn entry(mut self, sector: u64, sectors: u64, flags: u64, label: &[u8]) -> LogBuilder {
            let mut header = vec![0u8; SECTOR];
            for (slot, value) in [sector, sectors, flags, label.len() as u64]
                .into_iter()
                .enumerate()
            {
                header[slot * 8..slot * 8 + 8].copy_from_slice(&value.to_le_bytes());
            }
            header[ENTRY_HEADER_BYTES..ENTRY_HEADER_BYTES + label.len()].copy_from_slice(label);
            self.body.extend(header);
            self.entries += 1;
            self
        }

        /// A write of `sectors` sectors filled with `fill`.
        fn write(self, sector: u64, sectors: u64, fill: u8, flags: u64) -> LogBuilder {
            let mut built = self.entry(sector, sectors, flags, b"");
            built
                .body
                .extend(std::iter::repeat_n(fill, sectors as usize * SECTOR));
            built
        }

        fn flush(self) -> LogBuilder {
            self.entry(0, 0, FLAG_FLUSH, b"")
        }

        fn discard(self, sector: u64, sectors: u64) -> LogBuilder {
            self.entry(sector, sectors, FLAG_DISCARD, b"")
        }

        fn mark(self, label: &str) -> LogBuilder {
            self.entry(0, 0, FLAG_MARK, label.as_bytes())
        }

        /// The log with a super block counting `entries` entries.
        fn counting(&self, entries: u64) -> Vec<u8> {
            let mut bytes = vec![0u8; SECTOR];
            bytes[..8].copy_from_slice(&LOG_MAGIC.to_le_bytes());
            bytes[8..16].copy_from_slice(&LOG_VERSION.to_le_bytes());
            bytes[16..24].copy_from_slice(&entries.to_le_bytes());
            bytes[24..28].copy_from_slice(&(SECTOR as u32).to_le_bytes());
            bytes.extend(&self.body);
            bytes
        }

        fn build(&self) -> WriteLog {
            WriteLog::parse(self.counting(self.entries)).unwrap()
        }
    }

    /// The 8-sector disk `log` leaves after a cut behind `prefix` entries, one fill
    /// byte per sector (each sector is written whole).
    fn disk_after(log: &WriteLog, prefix: usize, unflushed: Unflushed) -> Vec<u8> {
        let image = tempfile::tempfile().unwrap();
        image.set_len(8 * SECTOR as u64).unwrap();
        log.rebuild(&image, prefix, unflushed).unwrap();
        let mut bytes = vec![0u8; 8 * SECTOR];
        image.read_exact_at(&mut bytes, 0).unwrap();
        bytes
            .chunks(SECTOR)
            .map(|sector| {
                assert!(sector.iter().all(|&byte| byte == sector[0]), "torn sector");
                sector[0]
            })
            .collect()
    }

    #[test]
    fn entries_data_and_marks_are_parsed() {
        let log = LogBuilder::new()
            .write(3, 2, 0xaa, 0)
            .flush()
            .discard(0, 4)
            .mark("after discard")
            .write(7, 1, 0xbb, FLAG_FUA | FLAG_METADATA)
            .build();
        assert_eq!(log.sector_size(), 512);
        let entries = log.entries();
        assert_eq!(entries.len(), 5);
        assert_eq!((entries[0].sector, entries[0].sectors), (3, 2));
        assert_eq!(log.data(&entries[0]), &[0xaa; 1024][..]);
        assert!(entries[1].is_flush() && log.data(&entries[1]).is_empty());
        assert!(entries[2].is_discard() && log.data(&entries[2]).is_empty());
        assert_eq!((entries[2].sector, entries[2].sectors), (0, 4));
        assert_eq!(log.mark(&entries[3]).as_deref(), Some("after discard"));
        assert!(log.data(&entries[3]).is_empty());
        assert_eq!(log.mark(&entries[4]), None);
        assert!(entries[4].is_fua() && !entries[4].is_flush());
        assert_eq!(log.data(&entries[4]), &[0xbb; 512][..]);
    }

    #[test]
    fn a_cut_keeps_what_came_before_the_last_flush_and_fua_writes_after_it() {
        let log = LogBuilder::new()
            .write(0, 1, 1, 0)
            .write(1, 2, 2, 0)
            .flush()
            .write(0, 1, 3, 0)
            .write(4, 1, 4, FLAG_FUA)
            .write(5, 1, 5, 0)
            .flush()
            .build();
        let lost = Unflushed::Lost;
        assert_eq!(disk_after(&log, 0, lost), [0; 8]);
        assert_eq!(disk_after(&log, 2, lost), [0; 8], "no flush yet");
        assert_eq!(disk_after(&log, 3, lost), [1, 2, 2, 0, 0, 0, 0, 0]);
        assert_eq!(disk_after(&log, 4, lost), [1, 2, 2, 0, 0, 0, 0, 0]);
        assert_eq!(disk_after(&log, 6, lost), [1, 2, 2, 0, 4, 0, 0, 0]);
        assert_eq!(disk_after(&log, 7, lost), [3, 2, 2, 0, 4, 5, 0, 0]);
    }

    #[test]
    fn a_flush_write_makes_earlier_writes_durable_but_not_its_own_data() {
        let log = LogBuilder::new()
            .write(0, 1, 1, 0)
            .write(1, 1, 2, FLAG_FLUSH)
            .write(2, 1, 3, FLAG_FLUSH | FLAG_FUA)
            .build();
        assert_eq!(
            disk_after(&log, 2, Unflushed::Lost),
            [1, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            disk_after(&log, 3, Unflushed::Lost),
            [1, 2, 3, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn discards_read_as_zeroes_and_marks_change_nothing() {
        let log = LogBuilder::new()
            .write(0, 8, 9, 0)
            .flush()
            .discard(2, 3)
            .mark("m")
            .flush()
            .build();
        assert_eq!(disk_after(&log, 4, Unflushed::Lost), [9; 8]);
        assert_eq!(
            disk_after(&log, 5, Unflushed::Lost),
            [9, 9, 0, 0, 0, 9, 9, 9]
        );
    }

    #[test]
    fn unflushed_writes_are_kept_by_seed_and_durable_ones_always() {
        let log = LogBuilder::new()
            .write(0, 1, 1, 0)
            .flush()
            .write(1, 1, 2, 0)
            .write(2, 1, 3, 0)
            .write(3, 1, 4, FLAG_FUA)
            .build();
        let mut outcomes = Vec::new();
        for seed in 0..64 {
            let some = Unflushed::Some { seed };
            let disk = disk_after(&log, 5, some);
            assert_eq!(
                disk,
                disk_after(&log, 5, some),
                "seed {seed} is not repeatable"
            );
            assert_eq!(
                (disk[0], disk[3]),
                (1, 4),
                "seed {seed} lost a durable write"
            );
            assert!(matches!(disk[1], 0 | 2) && matches!(disk[2], 0 | 3));
            outcomes.push((disk[1], disk[2]));
        }
        outcomes.sort_unstable();
        outcomes.dedup();
        assert_eq!(outcomes, [(0, 0), (0, 3), (2, 0), (2, 3)]);
    }

    #[test]
    fn the_super_block_count_is_read_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, b"").unwrap();
        assert_eq!(logged_entries(&path).unwrap(), 0);
        let builder = LogBuilder::new().write(0, 1, 1, 0).flush();
        std::fs::write(&path, builder.counting(1)).unwrap();
        assert_eq!(logged_entries(&path).unwrap(), 1);
        let log = WriteLog::read(&path).unwrap();
        assert_eq!(
            log.entries().len(),
            1,
            "entries past the count are not read"
        );
        assert!(log.surviving(2, Unflushed::Lost).is_err());
    }

    #[test]
    fn malformed_logs_are_refused() {
        let good = LogBuilder::new().write(0, 2, 1, 0).flush();
        let error = |bytes: Vec<u8>| WriteLog::parse(bytes).err().unwrap().to_string();
        assert_eq!(
            error(good.counting(3)),
            "entry 2 lies past the end of the log"
        );
        let mut truncated = good.counting(2);
        truncated.truncate(SECTOR * 3);
        assert_eq!(
            error(truncated),
            "the data of entry 0 lies past the end of the log"
        );
        let mut magic = good.counting(2);
        magic[0] ^= 1;
        assert_eq!(error(magic), "bad magic 0x6a736677736873");
        let mut version = good.counting(2);
        version[8] = 2;
        assert_eq!(error(version), "unsupported version 2");
        let mut sector_size = good.counting(2);
        sector_size[24..28].copy_from_slice(&500u32.to_le_bytes());
        assert_eq!(error(sector_size), "bad sector size 500");
        let flags = LogBuilder::new().entry(0, 0, 1 << 9, b"").counting(1);
        assert_eq!(error(flags), "entry 0 has unknown flags 0x200");
        assert_eq!(error(vec![0; 10]), "shorter than a super block");
    }
}
