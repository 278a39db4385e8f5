//! Status lines, records and refusals that Linux 6.1 was seen to produce for the same
//! operations, and the format's traps (stale records past the end of the list, a
//! full last area at the device's end).

mod common;

use blockdev::MemDisk;
use common::{PERSISTENT, open};
use snapshot::{Health, LoadError, Snapshot, StoreKind, write_origin};

const MIB16: u64 = 32768;

fn chunk_of(byte: u8, chunk: u64) -> Vec<u8> {
    vec![byte; chunk as usize * 512]
}

fn record(cow: &MemDisk, chunk: u64, area_chunk: u64, index: u64) -> (u64, u64) {
    let mut bytes = [0u8; 16];
    cow.read_at(area_chunk * chunk * 512 + index * 16, &mut bytes);
    (
        u64::from_le_bytes(bytes[..8].try_into().unwrap()),
        u64::from_le_bytes(bytes[8..].try_into().unwrap()),
    )
}

fn header(cow: &MemDisk) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    cow.read_at(0, &mut bytes);
    bytes
}

#[test]
fn four_exceptions_of_p16_as_linux_recorded_them() {
    let origin = MemDisk::new(131072);
    let cow = MemDisk::new(MIB16);
    let mut snap = open(&origin, &cow, PERSISTENT, 16);
    assert_eq!(snap.status(), "32/32768 32");
    let mut writer = origin.handle();
    write_origin(&mut writer, &mut [&mut snap], 0, &[1; 4096], false).unwrap();
    assert_eq!(snap.status(), "48/32768 32");
    snap.write(3 * 16 + 8, &[2; 4096]).unwrap();
    assert_eq!(snap.status(), "64/32768 32");
    write_origin(
        &mut writer,
        &mut [&mut snap],
        5 * 16,
        &chunk_of(3, 16),
        false,
    )
    .unwrap();
    assert_eq!(snap.status(), "80/32768 32");
    snap.write(7 * 16, &chunk_of(4, 16)).unwrap();
    assert_eq!(snap.status(), "96/32768 32");
    let records: Vec<_> = (0..5).map(|i| record(&cow, 16, 1, i)).collect();
    assert_eq!(records, [(0, 2), (3, 3), (5, 4), (7, 5), (0, 0)]);
    // The partial snapshot write left the origin's first half in COW chunk 3.
    let mut chunk3 = vec![0u8; 8192];
    cow.read_at(3 * 8192, &mut chunk3);
    assert!(chunk3[..4096].iter().all(|&b| b == 0) && chunk3[4096..].iter().all(|&b| b == 2));
}

#[test]
fn area_rollover_of_p8_as_linux_recorded_it() {
    let origin = MemDisk::new(1024 * 8);
    let cow = MemDisk::new(MIB16);
    let mut snap = open(&origin, &cow, PERSISTENT, 8);
    for chunk in 512..1024 {
        snap.write(chunk * 8, &chunk_of(9, 8)).unwrap();
    }
    assert_eq!(snap.status(), "4128/32768 32");
    snap.write(0, &chunk_of(9, 8)).unwrap();
    assert_eq!(snap.status(), "4136/32768 32");
    assert_eq!(record(&cow, 8, 1, 255), (767, 257));
    assert_eq!(record(&cow, 8, 258, 0), (768, 259));
    assert_eq!(record(&cow, 8, 258, 255), (1023, 514));
    assert_eq!(record(&cow, 8, 515, 0), (0, 516));
    assert_eq!(record(&cow, 8, 515, 1), (0, 0));
}

#[test]
fn usage_after_704_exceptions_of_p16() {
    let origin = MemDisk::new(131072);
    let cow = MemDisk::new(MIB16);
    let mut snap = open(&origin, &cow, PERSISTENT, 16);
    let mut writer = origin.handle();
    for chunk in 0..704 {
        write_origin(&mut writer, &mut [&mut snap], chunk * 16, &[7; 512], false).unwrap();
    }
    assert_eq!(snap.status(), "11312/32768 48");
    let again = open(&origin, &cow, PERSISTENT, 0);
    assert_eq!(again.status(), "11312/32768 48");
}

#[test]
fn p1_on_34_sectors_fails_at_the_area_boundary() {
    let origin = MemDisk::new(1024);
    let cow = MemDisk::new(34);
    let mut snap = open(&origin, &cow, PERSISTENT, 1);
    assert_eq!(snap.status(), "2/34 2");
    for chunk in 0..24 {
        snap.write(chunk, &[1; 512]).unwrap();
    }
    assert_eq!(snap.status(), "26/34 2");
    for chunk in 24..31 {
        snap.write(chunk, &[1; 512]).unwrap();
    }
    // The 32nd exception fills area 0; zeroing area 1 (chunk 34) fails.
    assert!(snap.write(31, &[1; 512]).is_err());
    assert_eq!(snap.status(), "Invalid");
    assert_eq!(
        snap.take_events(),
        ["snapshot invalidated: Error reading/writing."]
    );
}

#[test]
fn transient_store_counts_chunks_and_fills_up() {
    let origin = MemDisk::new(4096);
    let cow = MemDisk::new(512);
    let mut snap = open(&origin, &cow, StoreKind::Transient, 16);
    assert_eq!(snap.status(), "0/512 0");
    snap.write(0, &[1; 512]).unwrap();
    snap.write(16, &[1; 512]).unwrap();
    assert_eq!(snap.status(), "32/512 0");
    for chunk in 2..32 {
        snap.write(chunk * 16, &[1; 512]).unwrap();
    }
    assert_eq!(snap.status(), "512/512 0");
    assert!(snap.write(32 * 16, &[1; 512]).is_err());
    assert_eq!(snap.status(), "Invalid");
    assert!(cow.resident_bytes() > 0 && header(&cow)[..4] != *b"SnAp");
}

/// A 512-sector COW with `P 16` holds 30 exceptions.
fn full_cow(kind: StoreKind) -> (MemDisk, MemDisk, Snapshot) {
    let origin = MemDisk::new(4096);
    let cow = MemDisk::new(512);
    let mut snap = open(&origin, &cow, kind, 16);
    for chunk in 0..30 {
        snap.write(chunk * 16, &[5; 512]).unwrap();
    }
    assert_eq!(snap.status(), "512/512 32");
    (origin, cow, snap)
}

#[test]
fn full_p_snapshot_is_invalidated_on_disk() {
    let (origin, cow, mut snap) = full_cow(PERSISTENT);
    assert!(snap.write(30 * 16, &[5; 512]).is_err());
    assert_eq!(snap.status(), "Invalid");
    assert_eq!(
        snap.take_events(),
        ["snapshot invalidated: Unable to allocate exception."]
    );
    assert_eq!(&header(&cow), b"SnAp\0\0\0\0\x01\0\0\0\x10\0\0\0");
    let mut buf = [0u8; 512];
    assert!(snap.read(0, &mut buf).is_err());
    assert_eq!(record(&cow, 16, 1, 29), (29, 31), "records stay");
    let (again, notes) = Snapshot::open(
        Box::new(origin.handle()),
        Box::new(cow.handle()),
        PERSISTENT,
        16,
        4096,
    )
    .unwrap();
    assert_eq!(again.status(), "Invalid");
    assert_eq!(notes, ["Snapshot is marked invalid."]);
}

#[test]
fn full_po_snapshot_overflows_and_recovers_on_reload() {
    let overflow = StoreKind::Persistent { overflow: true };
    let (origin, cow, mut snap) = full_cow(overflow);
    assert!(snap.write(30 * 16, &[5; 512]).is_err());
    assert_eq!(snap.status(), "Overflow");
    assert_eq!(snap.health(), Health::Overflow);
    assert!(snap.take_events().is_empty(), "no event for an overflow");
    assert_eq!(&header(&cow)[4..8], &[1, 0, 0, 0]);
    let mut buf = [0u8; 512];
    snap.read(0, &mut buf).unwrap();
    assert_eq!(buf, [5; 512]);
    assert!(snap.write(0, &[6; 512]).is_err(), "even excepted chunks");
    let mut snap = open(&origin, &cow, overflow, 16);
    assert_eq!(snap.status(), "512/512 32");
    snap.write(0, &[6; 512]).unwrap();
    assert!(snap.write(30 * 16, &[6; 512]).is_err());
    assert_eq!(snap.status(), "Overflow");
    // An origin write that needs a copy-out invalidates even with O.
    let mut writer = origin.handle();
    write_origin(&mut writer, &mut [&mut snap], 31 * 16, &[7; 512], false).unwrap();
    assert_eq!(snap.status(), "Invalid");
}

#[test]
fn origin_writes_into_a_full_cow_all_succeed() {
    let origin = MemDisk::new(4096);
    let cow = MemDisk::new(512);
    let mut snap = open(&origin, &cow, PERSISTENT, 16);
    let mut writer = origin.handle();
    for chunk in 0..31 {
        write_origin(&mut writer, &mut [&mut snap], chunk * 16, &[8; 512], false).unwrap();
    }
    assert_eq!(snap.status(), "Invalid");
}

#[test]
fn chunk_size_zero_and_header_override() {
    let origin = MemDisk::new(4096);
    let cow = MemDisk::new(MIB16);
    let snap = open(&origin, &cow, PERSISTENT, 0);
    assert_eq!(snap.chunk_sectors(), 32);
    assert_eq!(snap.status(), "64/32768 64");
    let (snap, notes) = Snapshot::open(
        Box::new(origin.handle()),
        Box::new(cow.handle()),
        PERSISTENT,
        16,
        4096,
    )
    .unwrap();
    assert_eq!(snap.chunk_sectors(), 32);
    assert_eq!(
        notes,
        ["chunk size 32 in device metadata overrides table chunk size of 16."]
    );
}

fn load_error(cow: &MemDisk) -> String {
    let origin = MemDisk::new(4096);
    match Snapshot::open(
        Box::new(origin.handle()),
        Box::new(cow.handle()),
        PERSISTENT,
        16,
        4096,
    ) {
        Ok(_) => panic!("loaded"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn foreign_or_corrupt_headers_are_refused() {
    let cow = MemDisk::new(MIB16);
    cow.write_at(0, b"XFSB");
    assert_eq!(
        load_error(&cow),
        "Failed to read snapshot metadata: Invalid or corrupt snapshot"
    );
    cow.write_at(0, b"SnAp\x01\0\0\0\x02\0\0\0\x10\0\0\0");
    assert_eq!(
        load_error(&cow),
        "Failed to read snapshot metadata: unable to handle snapshot disk version 2"
    );
    cow.write_at(0, b"SnAp\x01\0\0\0\x01\0\0\0\x18\0\0\0");
    assert_eq!(
        load_error(&cow),
        "Failed to read snapshot metadata: invalid on-disk chunk size 24: Chunk size is not a \
         power of 2."
    );
    let small = MemDisk::new(24);
    assert!(load_error(&small).contains("COW device too small"));
}

#[test]
fn a_full_last_area_at_the_devices_end_is_refused() {
    // P 1 on 34 sectors with area 0 full: area 1 would be chunk 34, past the end.
    let cow = MemDisk::new(34);
    cow.write_at(0, b"SnAp\x01\0\0\0\x01\0\0\0\x01\0\0\0");
    for index in 0..32u64 {
        let mut rec = [0u8; 16];
        rec[..8].copy_from_slice(&index.to_le_bytes());
        rec[8..].copy_from_slice(&(index + 2).to_le_bytes());
        cow.write_at(512 + index * 16, &rec);
    }
    let origin = MemDisk::new(4096);
    let result = Snapshot::open(
        Box::new(origin.handle()),
        Box::new(cow.handle()),
        PERSISTENT,
        1,
        4096,
    );
    assert_eq!(result.err(), Some(LoadError::AreaOutside(1)));
}

#[test]
fn stale_records_past_the_end_never_come_back() {
    let origin = MemDisk::new(4096);
    let cow = MemDisk::new(MIB16);
    let mut snap = open(&origin, &cow, PERSISTENT, 8);
    snap.write(0, &[1; 4096]).unwrap();
    drop(snap);
    // A stale record one slot after the terminator.
    let mut stale = [0u8; 16];
    stale[..8].copy_from_slice(&5000u64.to_le_bytes());
    stale[8..].copy_from_slice(&600u64.to_le_bytes());
    cow.write_at(4096 + 32, &stale);
    let mut snap = open(&origin, &cow, PERSISTENT, 8);
    assert_eq!(snap.exception_count(), 1);
    let mut writer = origin.handle();
    write_origin(&mut writer, &mut [&mut snap], 8, &[2; 512], false).unwrap();
    assert_eq!(record(&cow, 8, 1, 2), (0, 0), "the stale slot was cleared");
    let again = open(&origin, &cow, PERSISTENT, 8);
    assert_eq!(again.exception_count(), 2);
    assert_eq!(again.status(), "32/32768 16");
}

#[test]
fn two_snapshots_of_one_origin_each_copy_out() {
    let origin = MemDisk::new(131072);
    let (cow16, cow32) = (MemDisk::new(MIB16), MemDisk::new(MIB16));
    let mut s16 = open(&origin, &cow16, PERSISTENT, 16);
    let mut s32 = open(&origin, &cow32, PERSISTENT, 32);
    let mut writer = origin.handle();
    let data = vec![3u8; 65536];
    write_origin(&mut writer, &mut [&mut s16, &mut s32], 2048, &data, false).unwrap();
    assert_eq!(s16.status(), "160/32768 32");
    assert_eq!(s32.status(), "192/32768 64");
}
