//! Opening devices that do not hold good metadata: clear errors, never a panic,
//! never formatting something that is not blank unless forced.

mod common;

use blockdev::{BlockDevice, DeviceInfo, MemDisk};
use common::*;
use persistent_data::checksum::{BITMAP_SALT, INDEX_SALT, NODE_SALT, SUPERBLOCK_SALT, seal};
use persistent_data::thin::{FormatPolicy, OpenOptions, ThinMetadata};
use persistent_data::{Error, error::BlockKind};
use proptest::prelude::*;

fn options(format: FormatPolicy) -> OpenOptions {
    let mut options = OpenOptions::new(DATA_BLOCK_SIZE);
    options.format = format;
    options.cache_blocks = 128;
    options
}

fn try_open(disk: &MemDisk, format: FormatPolicy) -> Result<ThinMetadata, Error> {
    ThinMetadata::open(Box::new(disk.handle()), &options(format)).map(|(md, _)| md)
}

fn small_pool() -> MemDisk {
    let disk = MemDisk::new(4 << 11);
    let mut md = open(&disk, 128);
    md.resize_data(50_000).unwrap();
    md.create_thin(1).unwrap();
    for v in 0..3000 {
        let b = md.alloc_data_block().unwrap();
        md.insert(1, v * 2, b).unwrap();
    }
    md.create_snap(2, 1).unwrap();
    md.reserve_metadata_snap().unwrap();
    md.commit().unwrap();
    disk
}

#[test]
fn zeroed_device_is_blank_and_formats_only_when_allowed() {
    let disk = MemDisk::new(4 << 11);
    assert_eq!(
        try_open(&disk, FormatPolicy::Never).err(),
        Some(Error::Unformatted)
    );
    let (mut md, report) =
        ThinMetadata::open(Box::new(disk.handle()), &options(FormatPolicy::IfBlank)).unwrap();
    assert!(report.formatted);
    assert_eq!(report.metadata_blocks, 1024);
    assert_eq!(report.warning, None);
    assert!(md.devices().unwrap().is_empty());
    let (_, again) =
        ThinMetadata::open(Box::new(disk.handle()), &options(FormatPolicy::IfBlank)).unwrap();
    assert!(
        !again.formatted,
        "an existing pool is opened, not formatted"
    );
}

#[test]
fn foreign_superblock_is_refused_even_when_formatting_blank_devices() {
    let disk = MemDisk::new(4 << 11);
    let mut junk = vec![0u8; 4096];
    junk[1080..1082].copy_from_slice(&[0x53, 0xef]); // an ext4 magic
    junk[0] = 1;
    disk.write_at(0, &junk);
    for policy in [FormatPolicy::Never, FormatPolicy::IfBlank] {
        let error = try_open(&disk, policy).err().unwrap();
        assert_eq!(error, Error::NotThinMetadata);
        assert!(error.to_string().contains("refusing"), "{error}");
    }
    let mut back = vec![0u8; 4096];
    disk.read_at(0, &mut back);
    assert_eq!(back, junk, "nothing was written");
    let mut md = try_open(&disk, FormatPolicy::Force).unwrap();
    assert!(md.devices().unwrap().is_empty());
}

#[test]
fn data_block_size_mismatch_is_a_clear_error() {
    let disk = small_pool();
    let mut other = OpenOptions::new(256);
    other.format = FormatPolicy::IfBlank;
    let error = ThinMetadata::open(Box::new(disk.handle()), &other)
        .err()
        .unwrap();
    assert_eq!(
        error,
        Error::DataBlockSizeMismatch {
            on_disk: 128,
            requested: 256
        }
    );
    assert!(error.to_string().contains("not supported"));
    assert_eq!(
        ThinMetadata::open(Box::new(disk.handle()), &OpenOptions::new(100)).err(),
        Some(Error::BadDataBlockSize(100))
    );
}

#[test]
fn truncated_and_tiny_devices_are_refused() {
    let disk = small_pool();
    let short = MemDisk::new(1 << 11);
    let mut data = vec![0u8; 1 << 20];
    disk.read_at(0, &mut data);
    short.write_at(0, &data);
    assert_eq!(
        try_open(&short, FormatPolicy::IfBlank).err(),
        Some(Error::DeviceTooSmall {
            device_blocks: 256,
            needed_blocks: 1024
        })
    );
    let tiny = MemDisk::new(16 * 8);
    assert!(matches!(
        try_open(&tiny, FormatPolicy::IfBlank).err(),
        Some(Error::DeviceTooSmall { .. })
    ));
    let empty = MemDisk::new(4);
    assert!(matches!(
        try_open(&empty, FormatPolicy::IfBlank).err(),
        Some(Error::DeviceTooSmall { .. })
    ));
}

#[test]
fn oversized_device_is_capped_with_a_warning() {
    let disk = MemDisk::with_info(DeviceInfo {
        sectors: 17 << 21,
        ..MemDisk::new(8).info().clone()
    });
    let (md, report) =
        ThinMetadata::open(Box::new(disk.handle()), &options(FormatPolicy::IfBlank)).unwrap();
    assert_eq!(report.metadata_blocks, 4_161_600);
    assert_eq!(md.metadata_nr_blocks(), 4_161_600);
    let warning = report.warning.expect("warning above 16 GiB");
    assert!(warning.to_string().contains("33292800"), "{warning}");
    assert_eq!(md.metadata_reserve(), 4096);
    // Just under the 16 GiB threshold but above the usable size: capped silently.
    let disk = MemDisk::with_info(DeviceInfo {
        sectors: 33_400_000,
        ..MemDisk::new(8).info().clone()
    });
    let (_, report) =
        ThinMetadata::open(Box::new(disk.handle()), &options(FormatPolicy::IfBlank)).unwrap();
    assert_eq!(report.metadata_blocks, 4_161_600);
    assert_eq!(report.warning, None);
}

/// Metadata block numbers of one kind, found by their checksums.
fn blocks_with_salt(disk: &MemDisk, salt: u32) -> Vec<u64> {
    let blocks = disk.info().sectors / 8;
    (1..blocks)
        .filter(|&b| {
            let mut block = [0u8; 4096];
            disk.read_at(b * 4096, &mut block);
            let stored = u32::from_le_bytes(block[..4].try_into().unwrap());
            block.iter().any(|&x| x != 0)
                && stored == persistent_data::checksum::block_checksum(&block, salt)
        })
        .collect()
}

#[test]
fn corrupted_space_maps_are_reported_with_their_block() {
    let disk = small_pool();
    let le = |b: u64, at: u64| {
        let mut bytes = [0u8; 8];
        disk.read_at(b * 4096 + at, &mut bytes);
        u64::from_le_bytes(bytes)
    };
    // The metadata index block is read at open.
    let index = le(0, 0xC0 + 16);
    let broken = disk.snapshot();
    broken.write_at(index * 4096 + 40, &[0xff]);
    let error = try_open(&broken, FormatPolicy::IfBlank).err().unwrap();
    assert_eq!(
        error,
        Error::BadBlock {
            block: index,
            kind: BlockKind::Index,
            reason: "checksum mismatch"
        }
    );
    // A metadata bitmap is read at open, a data bitmap when allocating.
    let metadata_bitmap = le(index, 16);
    let data_index_leaf = le(0, 0x40 + 16);
    let data_bitmap = le(data_index_leaf, 32 + 168 * 8);
    for bitmap in [metadata_bitmap, data_bitmap] {
        let broken = disk.snapshot();
        broken.write_at(bitmap * 4096 + 2000, &[0x5a]);
        let outcome = try_open(&broken, FormatPolicy::IfBlank).and_then(|mut md| {
            md.alloc_data_block()?;
            Ok(())
        });
        match outcome {
            Err(Error::BadBlock {
                block,
                kind: BlockKind::Bitmap,
                ..
            }) => assert_eq!(block, bitmap),
            other => panic!("bitmap {bitmap}: {other:?}"),
        }
    }
}

#[test]
fn every_error_has_console_text() {
    let errors = [
        Error::Unformatted,
        Error::NoMetadataSpace,
        Error::NoDataSpace,
        Error::DeviceExists(3),
        Error::NoSuchDevice(4),
        Error::TransactionIdMismatch {
            expected: 1,
            actual: 2,
        },
        Error::SnapshotHeld(9),
        Error::NoSnapshot,
    ];
    for error in errors {
        assert!(!error.to_string().is_empty());
    }
}

/// Replaces a block of a good image with fuzz bytes (sealed as some block type, or
/// not) and exercises open, lookups, dump and check: errors are fine, panics are not.
fn exercise_damaged(image: &MemDisk, block: u64, bytes: &[u8], salt: Option<u32>) {
    let disk = image.snapshot();
    let mut data = [0u8; 4096];
    for (i, b) in bytes.iter().enumerate() {
        data[(i * 37) % 4096] = *b;
    }
    if bytes.len() > 8 {
        data[..bytes.len().min(64)].copy_from_slice(&bytes[..bytes.len().min(64)]);
    }
    if let Some(salt) = salt {
        seal(&mut data, block, salt);
    }
    disk.write_at(block * 4096, &data);
    let Ok(mut md) = try_open(&disk, FormatPolicy::Never) else {
        return;
    };
    let _ = md.lookup(1, 17);
    let _ = md.lookup_range(2, 0, 10_000, 100);
    let mut out = String::new();
    let _ = md.dump_xml(&mut out);
    let _ = md.dump_metadata_snap_xml(&mut out);
    let _ = persistent_data::check::check(&mut md);
    if md.insert(1, 5, 7).is_ok() && md.remove_range(2, 0, 3000).is_ok() && md.delete(1).is_ok() {
        let _ = md.release_metadata_snap();
        let _ = md.commit();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_in_any_block_never_panic(
        block in 0u64..40,
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        salt in prop_oneof![
            Just(None),
            Just(Some(SUPERBLOCK_SALT)),
            Just(Some(NODE_SALT)),
            Just(Some(BITMAP_SALT)),
            Just(Some(INDEX_SALT)),
        ],
    ) {
        thread_local!(static IMAGE: MemDisk = small_pool());
        IMAGE.with(|image| exercise_damaged(image, block, &bytes, salt));
    }

    #[test]
    fn node_headers_with_random_fields_never_panic(
        flags in 0u32..4,
        nr in prop_oneof![0u32..300, any::<u32>()],
        max in prop_oneof![Just(252u32), Just(126u32), 0u32..600, any::<u32>()],
        value_size in prop_oneof![Just(8u32), Just(24u32), any::<u32>()],
        target in 0usize..6,
    ) {
        thread_local!(static IMAGE: MemDisk = small_pool());
        IMAGE.with(|image| {
            let nodes = blocks_with_salt(image, NODE_SALT);
            let block = nodes[target % nodes.len()];
            let disk = image.snapshot();
            let mut data = [0u8; 4096];
            disk.read_at(block * 4096, &mut data);
            data[4..8].copy_from_slice(&flags.to_le_bytes());
            data[16..20].copy_from_slice(&nr.to_le_bytes());
            data[20..24].copy_from_slice(&max.to_le_bytes());
            data[24..28].copy_from_slice(&value_size.to_le_bytes());
            seal(&mut data, block, NODE_SALT);
            let bytes = data.to_vec();
            exercise_damaged(&disk, block, &bytes[..0], None);
            disk.write_at(block * 4096, &bytes);
            if let Ok(mut md) = try_open(&disk, FormatPolicy::Never) {
                let _ = md.lookup(1, 3);
                let _ = persistent_data::check::check(&mut md);
            }
        });
    }
}
