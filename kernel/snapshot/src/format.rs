//! The persistent store's on-disk layout: a header in chunk 0, then metadata areas
//! of `32 × C` exception records, each followed by the data chunks it describes.
//! All integers little-endian.

/// `SnAp` read as a little-endian 32-bit integer.
pub const MAGIC: u32 = 0x7041_6E53;

/// The only format version Linux writes and accepts.
pub const VERSION: u32 = 1;

/// Bytes of one exception record (`old_chunk`, `new_chunk`, le64 each).
pub const RECORD_BYTES: usize = 16;

/// The 16 bytes at the start of chunk 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub magic: u32,
    /// Zero once the snapshot was invalidated; any other value counts as valid.
    pub valid: u32,
    pub version: u32,
    /// Chunk size in sectors.
    pub chunk_size: u32,
}

impl Header {
    pub fn decode(bytes: &[u8]) -> Header {
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        Header {
            magic: word(0),
            valid: word(4),
            version: word(8),
            chunk_size: word(12),
        }
    }

    /// Chunk 0 as Linux writes it: the header, then zeros to the end of the chunk.
    pub fn encode_chunk(&self, chunk_bytes: usize) -> alloc::vec::Vec<u8> {
        let mut chunk = alloc::vec![0u8; chunk_bytes];
        for (at, word) in [self.magic, self.valid, self.version, self.chunk_size]
            .into_iter()
            .enumerate()
        {
            chunk[at * 4..at * 4 + 4].copy_from_slice(&word.to_le_bytes());
        }
        chunk
    }
}

/// Exception records in one metadata area (one chunk of `chunk_sectors` sectors).
pub fn records_per_area(chunk_sectors: u64) -> u64 {
    chunk_sectors * 512 / RECORD_BYTES as u64
}

/// The chunk holding metadata area `area`: areas sit at `1 + area × (E + 1)`.
pub fn area_chunk(chunk_sectors: u64, area: u64) -> u64 {
    1 + area * (records_per_area(chunk_sectors) + 1)
}

/// Record `index` of an area image: `(old_chunk, new_chunk)`.
pub fn read_record(area: &[u8], index: usize) -> (u64, u64) {
    let at = index * RECORD_BYTES;
    let word = |at: usize| u64::from_le_bytes(area[at..at + 8].try_into().expect("8 bytes"));
    (word(at), word(at + 8))
}

pub fn write_record(area: &mut [u8], index: usize, (old, new): (u64, u64)) {
    let at = index * RECORD_BYTES;
    area[at..at + 8].copy_from_slice(&old.to_le_bytes());
    area[at + 8..at + 16].copy_from_slice(&new.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_linux_for_common_chunk_sizes() {
        assert_eq!(records_per_area(8), 256);
        assert_eq!(
            [area_chunk(8, 0), area_chunk(8, 1), area_chunk(8, 2)],
            [1, 258, 515]
        );
        assert_eq!(area_chunk(16, 1) * 16 * 512, 4_210_688);
        assert_eq!(area_chunk(1, 2), 67);
        assert_eq!(area_chunk(32, 2), 2051);
    }

    #[test]
    fn header_bytes_are_linux_bytes() {
        let header = Header {
            magic: MAGIC,
            valid: 1,
            version: VERSION,
            chunk_size: 16,
        };
        let chunk = header.encode_chunk(8192);
        assert_eq!(
            &chunk[..16],
            &[
                0x53, 0x6e, 0x41, 0x70, 1, 0, 0, 0, 1, 0, 0, 0, 0x10, 0, 0, 0
            ]
        );
        assert!(chunk[16..].iter().all(|&b| b == 0));
        assert_eq!(Header::decode(&chunk), header);
    }

    #[test]
    fn records_round_trip_little_endian() {
        let mut area = [0u8; 64];
        write_record(&mut area, 1, (0x3ff, 0x202));
        assert_eq!(&area[16..20], &[0xff, 0x03, 0, 0]);
        assert_eq!(&area[24..28], &[0x02, 0x02, 0, 0]);
        assert_eq!(read_record(&area, 1), (0x3ff, 0x202));
    }
}
