//! The configuration area: two checksummed copies of the saved configuration in the
//! first MiB of one disk, so an update cut short by a power failure leaves the
//! previous copy readable.
//!
//! Layout of the area (the first [`AREA_SECTORS`] sectors of the configuration disk;
//! every number little-endian; CRC-32C is the iSCSI polynomial):
//!
//! | Sectors | What |
//! |---|---|
//! | 0–7 | label: magic `thinbox config\0\0` (16 bytes), version 1 (u32), area sectors (u32), slot sectors (u32), slot 0 sector (u32), slot 1 sector (u32), area id (16 bytes), zeros, CRC-32C of bytes 0..4092 in bytes 4092..4096 |
//! | 8–511 | reserved (zero) |
//! | 512–1023 | slot 0: one copy of the configuration |
//! | 1024–1535 | slot 1: the other copy |
//! | 1536–2047 | reserved (zero) |
//!
//! A slot starts with a one-sector header — magic `TBXCFREC`, version 1 (u32), payload
//! bytes (u32), generation (u64), payload CRC-32C (u32), area id (16 bytes), zeros,
//! header CRC-32C of bytes 0..508 in bytes 508..512 — followed by the payload (UTF-8
//! text, see [`Snapshot`](super::Snapshot)) in the slot's remaining sectors, written in the same
//! request. An update writes generation *n*+1 into the slot that does not hold the
//! newest valid copy, with FUA; if power fails during that write the damaged copy fails
//! its CRC and the other slot (generation *n*) is used, so an update is all or nothing.

use alloc::format;
use alloc::string::{String, ToString};
use blockdev::{BlockDevice, Command, IoBuf, SECTOR_SIZE};

/// Sectors reserved at the start of the configuration disk (1 MiB).
pub const AREA_SECTORS: u64 = 2048;
/// Sectors of one slot (256 KiB): a header sector and the payload.
const SLOT_SECTORS: u64 = 512;
const SLOTS: [u64; 2] = [512, 1024];
const LABEL_SECTORS: usize = 8;
const LABEL_MAGIC: &[u8; 16] = b"thinbox config\0\0";
const RECORD_MAGIC: &[u8; 8] = b"TBXCFREC";
const VERSION: u32 = 1;
/// Largest payload a slot holds.
pub const MAX_PAYLOAD: usize = (SLOT_SECTORS as usize - 1) * SECTOR_SIZE;

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// What one slot holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Never written (all zero header).
    Empty,
    /// A complete copy.
    Valid { generation: u64, payload: String },
    /// A damaged or foreign copy (e.g. an update cut short by a power failure).
    Damaged(String),
}

/// An open configuration area: its id and the state of both slots.
#[derive(Clone, Debug)]
pub struct Area {
    id: [u8; 16],
    slots: [SlotState; 2],
}

impl Area {
    /// The newest valid copy: (slot, generation, snapshot text).
    pub fn current(&self) -> Option<(usize, u64, &str)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, state)| match state {
                SlotState::Valid {
                    generation,
                    payload,
                } => Some((slot, *generation, payload.as_str())),
                _ => None,
            })
            .max_by_key(|(_, generation, _)| *generation)
    }

    pub fn slots(&self) -> &[SlotState; 2] {
        &self.slots
    }

    /// Reads the label; `Ok(None)` when the disk carries none.
    pub fn probe(disk: &mut dyn BlockDevice) -> Result<Option<Area>, String> {
        if disk.info().sectors < AREA_SECTORS {
            return Ok(None);
        }
        let label = read(disk, 0, LABEL_SECTORS)?;
        if &label[..16] != LABEL_MAGIC {
            return Ok(None);
        }
        if CRC.checksum(&label[..4092]) != le32(&label, 4092) {
            return Err("its configuration label fails its checksum".to_string());
        }
        let layout = [
            le32(&label, 16),
            le32(&label, 20),
            le32(&label, 24),
            le32(&label, 28),
            le32(&label, 32),
        ];
        if layout
            != [
                VERSION,
                AREA_SECTORS as u32,
                SLOT_SECTORS as u32,
                SLOTS[0] as u32,
                SLOTS[1] as u32,
            ]
        {
            return Err(format!(
                "its configuration label has an unknown version or layout {layout:?}"
            ));
        }
        let mut id = [0; 16];
        id.copy_from_slice(&label[36..52]);
        let slots = [read_slot(disk, 0, &id)?, read_slot(disk, 1, &id)?];
        Ok(Some(Area { id, slots }))
    }

    /// Writes a fresh label and an empty area on `disk` (the whole area is zeroed
    /// first, so stale copies from an earlier label cannot come back).
    pub fn format(disk: &mut dyn BlockDevice, id: [u8; 16]) -> Result<Area, String> {
        let mut area = IoBuf::with_sectors(AREA_SECTORS as usize);
        area[..16].copy_from_slice(LABEL_MAGIC);
        for (at, value) in [
            VERSION,
            AREA_SECTORS as u32,
            SLOT_SECTORS as u32,
            SLOTS[0] as u32,
            SLOTS[1] as u32,
        ]
        .into_iter()
        .enumerate()
        {
            area[16 + at * 4..20 + at * 4].copy_from_slice(&value.to_le_bytes());
        }
        area[36..52].copy_from_slice(&id);
        let crc = CRC.checksum(&area[..4092]);
        area[4092..4096].copy_from_slice(&crc.to_le_bytes());
        write(disk, 0, area)?;
        Ok(Area {
            id,
            slots: [SlotState::Empty, SlotState::Empty],
        })
    }

    /// Saves `payload` as the next generation in the slot that does not hold the
    /// newest copy. Returns the new generation.
    pub fn save(&mut self, disk: &mut dyn BlockDevice, payload: &str) -> Result<u64, String> {
        if payload.len() > MAX_PAYLOAD {
            return Err(format!(
                "the configuration needs {} bytes but a copy holds at most {MAX_PAYLOAD}",
                payload.len()
            ));
        }
        let (slot, generation) = match self.current() {
            Some((slot, generation, _)) => (1 - slot, generation + 1),
            None => (0, 1),
        };
        let sectors = 1 + payload.len().div_ceil(SECTOR_SIZE);
        let mut buf = IoBuf::with_sectors(sectors);
        buf[..8].copy_from_slice(RECORD_MAGIC);
        buf[8..12].copy_from_slice(&VERSION.to_le_bytes());
        buf[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        buf[16..24].copy_from_slice(&generation.to_le_bytes());
        buf[24..28].copy_from_slice(&CRC.checksum(payload.as_bytes()).to_le_bytes());
        buf[28..44].copy_from_slice(&self.id);
        let crc = CRC.checksum(&buf[..508]);
        buf[508..512].copy_from_slice(&crc.to_le_bytes());
        buf[SECTOR_SIZE..SECTOR_SIZE + payload.len()].copy_from_slice(payload.as_bytes());
        // Whatever happens to this write, the slot no longer holds what it held.
        self.slots[slot] = SlotState::Damaged("update in progress".to_string());
        write(disk, SLOTS[slot], buf)?;
        self.slots[slot] = SlotState::Valid {
            generation,
            payload: payload.to_string(),
        };
        Ok(generation)
    }
}

fn read_slot(disk: &mut dyn BlockDevice, slot: usize, id: &[u8; 16]) -> Result<SlotState, String> {
    let header = read(disk, SLOTS[slot], 1)?;
    if header.iter().all(|&b| b == 0) {
        return Ok(SlotState::Empty);
    }
    let damaged = |why: &str| Ok(SlotState::Damaged(why.to_string()));
    if &header[..8] != RECORD_MAGIC || CRC.checksum(&header[..508]) != le32(&header, 508) {
        return damaged("header fails its checksum");
    }
    if le32(&header, 8) != VERSION {
        return damaged("unknown record version");
    }
    if header[28..44] != id[..] {
        return damaged("belongs to another configuration area");
    }
    let length = le32(&header, 12) as usize;
    if length > MAX_PAYLOAD {
        return damaged("payload length out of range");
    }
    let payload = read(disk, SLOTS[slot] + 1, length.div_ceil(SECTOR_SIZE))?;
    let payload = &payload[..length];
    if CRC.checksum(payload) != le32(&header, 24) {
        return damaged("payload fails its checksum");
    }
    match core::str::from_utf8(payload) {
        Ok(text) => Ok(SlotState::Valid {
            generation: le64(&header, 16),
            payload: text.to_string(),
        }),
        Err(_) => damaged("payload is not text"),
    }
}

fn read(disk: &mut dyn BlockDevice, sector: u64, sectors: usize) -> Result<IoBuf, String> {
    if sectors == 0 {
        return Ok(IoBuf::empty());
    }
    crate::region::read_sectors(disk, sector, sectors)
        .map_err(|error| format!("reading the configuration area failed: {error}"))
}

fn write(disk: &mut dyn BlockDevice, sector: u64, buf: IoBuf) -> Result<(), String> {
    blockdev::run_sync(
        disk,
        Command::Write {
            sector,
            buf,
            fua: true,
        },
    )
    .map(drop)
    .map_err(|error| format!("writing the configuration area failed: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemDisk;

    #[test]
    fn generations_alternate_between_slots() {
        let mut disk = MemDisk::new(4096);
        assert!(Area::probe(&mut disk).unwrap().is_none());
        let mut area = Area::format(&mut disk, [7; 16]).unwrap();
        assert_eq!(area.save(&mut disk, "one\n"), Ok(1));
        assert_eq!(area.save(&mut disk, "two\n"), Ok(2));
        assert_eq!(area.save(&mut disk, "three\n"), Ok(3));
        let probed = Area::probe(&mut disk).unwrap().unwrap();
        assert_eq!(probed.current(), Some((0, 3, "three\n")));
        assert!(matches!(
            &probed.slots()[1],
            SlotState::Valid { generation: 2, .. }
        ));
    }

    #[test]
    fn a_damaged_newest_copy_falls_back_to_the_previous_one() {
        let disk = MemDisk::new(4096);
        let view = disk.handle();
        let mut disk = disk;
        let mut area = Area::format(&mut disk, [1; 16]).unwrap();
        area.save(&mut disk, "old\n").unwrap();
        area.save(&mut disk, "new\n").unwrap();
        // Corrupt one payload byte of generation 2 (slot 1).
        view.write_at(SLOTS[1] * 512 + 512, b"X");
        let probed = Area::probe(&mut disk).unwrap().unwrap();
        assert_eq!(probed.current(), Some((0, 1, "old\n")));
        assert_eq!(
            probed.slots()[1],
            SlotState::Damaged("payload fails its checksum".into())
        );
        // A damaged label is reported, not ignored.
        view.write_at(100, b"?");
        assert!(Area::probe(&mut disk).unwrap_err().contains("label"));
    }

    #[test]
    fn oversized_payloads_are_refused_before_writing() {
        let mut disk = MemDisk::new(4096);
        let mut area = Area::format(&mut disk, [0; 16]).unwrap();
        let big = "x".repeat(MAX_PAYLOAD + 1);
        assert!(area.save(&mut disk, &big).unwrap_err().contains("at most"));
        assert!(area.current().is_none());
        assert_eq!(area.slots()[0], SlotState::Empty);
    }
}
