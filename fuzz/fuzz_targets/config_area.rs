//! Arbitrary bytes as a configuration area: probing the label, decoding both slots,
//! decoding the newest copy's records (disks, devices, external origins) and bringing
//! the devices up over memory disks either works or reports what is wrong, never a
//! panic; records that decode encode back to the same records.
//!
//! The input is the text of up to two saved generations, separated by a 0x1e byte;
//! after a 0x00 byte come patches laid over the area once saved:
//! `[flags] [offset: u16 LE] [length] [bytes]`, flags bit 0 choosing slot 0 or 1 (or,
//! with bit 3, the label), bit 1 resealing the patched header's checksum and bit 2
//! the payload's, so the fields behind the checksums are reached too.
#![no_main]

use blockdev::{BlockDevice, MemDisk};
use dm::config::{Area, Snapshot};
use dm::{DeviceMapper, Disk};
use libfuzzer_sys::fuzz_target;

/// The area's layout: the label at sector 0, the slots' headers at sectors 512 and
/// 1024, each followed by its payload.
const SLOTS: [u64; 2] = [512, 1024];
const SECTOR: u64 = 512;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

fn le32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"))
}

/// Recomputes a checksum stored at `at` over `len` bytes from `from` in the disk.
fn reseal(disk: &MemDisk, from: u64, len: usize, at: u64) {
    let mut bytes = vec![0u8; len];
    disk.read_at(from, &mut bytes);
    disk.write_at(at, &CRC.checksum(&bytes).to_le_bytes());
}

fn patch(disk: &MemDisk, patches: &[u8]) {
    let mut rest = patches;
    while let [flags, low, high, length, tail @ ..] = rest {
        let bytes = &tail[..usize::from(*length).min(tail.len())];
        rest = &tail[bytes.len()..];
        let (start, limit) = if flags & 8 != 0 {
            (0, 4096)
        } else {
            (SLOTS[usize::from(flags & 1)] * SECTOR, 512 * SECTOR)
        };
        let offset = u64::from(u16::from_le_bytes([*low, *high])) % limit;
        disk.write_at(
            start + offset,
            &bytes[..bytes.len().min((limit - offset) as usize)],
        );
        if flags & 8 != 0 {
            reseal(disk, 0, 4092, 4092);
            continue;
        }
        if flags & 4 != 0 {
            let mut header = [0u8; 512];
            disk.read_at(start, &mut header);
            let length = (le32(&header[12..]) as usize).min(511 * 512);
            reseal(disk, start + SECTOR, length, start + 24);
        }
        if flags & 2 != 0 {
            reseal(disk, start, 508, start + 508);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (text, patches) = match data.iter().position(|&byte| byte == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(text);
    let config = MemDisk::new(4096);
    let mut handle = config.handle();
    let mut area = Area::format(&mut handle, [9; 16]).expect("a memory disk");
    for payload in text.split('\x1e').take(2) {
        let _ = area.save(&mut handle, payload);
    }
    patch(&config, patches);

    if let Ok(Some(area)) = Area::probe(&mut handle)
        && let Some((_, _, text)) = area.current()
        && let Ok(snapshot) = Snapshot::decode(text)
    {
        assert_eq!(Snapshot::decode(&snapshot.encode()), Ok(snapshot));
    }

    let disk = |name: &str, device: Box<dyn BlockDevice>| Disk {
        name: name.to_string(),
        device,
    };
    let mut dm = DeviceMapper::new(vec![
        disk("vda", Box::new(config.handle())),
        disk("vdb", Box::new(MemDisk::new(4096))),
        disk("vdc", Box::new(MemDisk::new(8192))),
    ]);
    let _ = dm.restore();
});
