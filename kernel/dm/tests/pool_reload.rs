//! A running pool reloaded with a new low water mark and features takes them at
//! resume, as dm's pool target does: queueing or failing writes when out of space,
//! read-only and back, and the mark that fires the low-water event.

use blockdev::{IoBuf, MemDisk};
use dm::{DeviceMapper, Disk, Format};
use nbd::{Backend, BackendError, ExportHandle, IoCompletion, IoOp, IoRequest};

/// The address NBD clients of these tests connect from.
const CLIENT: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

/// Data block size of the pool here (64 KiB): 16 blocks of data.
const BLOCK: u64 = 128;

fn pool_with_thin(features: &str) -> (DeviceMapper, ExportHandle, MemDisk) {
    let (meta, data) = (MemDisk::new(8192), MemDisk::new(16 * BLOCK));
    let mut dm = DeviceMapper::new(
        [("vda", &meta), ("vdb", &data)]
            .into_iter()
            .map(|(name, disk)| Disk {
                name: name.to_string(),
                device: Box::new(disk.handle()),
            })
            .collect(),
    );
    let table = format!("0 2048 thin-pool vda vdb 128 2 {features}");
    dm.create("pool", false, &table, Format::IfBlank).unwrap();
    dm.message("pool", "create_thin 0").unwrap();
    dm.create("thin", false, "0 65536 thin pool 0", Format::IfBlank)
        .unwrap();
    let (export, _) = dm.open("thin", CLIENT).unwrap();
    (dm, export, meta)
}

fn write(dm: &mut DeviceMapper, export: ExportHandle, tag: u64, block: u64) {
    let mut buf = IoBuf::with_sectors(8);
    buf.fill(tag as u8);
    let op = IoOp::Write {
        sector: block * BLOCK,
        buf,
        fua: false,
    };
    dm.submit(IoRequest { tag, export, op }).expect("room");
}

fn completions(dm: &mut DeviceMapper) -> Vec<IoCompletion> {
    (0..1000).filter_map(|_| dm.poll()).collect()
}

fn pool_status(dm: &DeviceMapper) -> String {
    dm.status_lines(dm.device("pool").unwrap()).remove(0)
}

fn reload_pool(dm: &mut DeviceMapper, low_water: u64, features: &str) -> Vec<String> {
    let table = format!("0 2048 thin-pool vda vdb 128 {low_water} {features}");
    dm.reload("pool", &table).unwrap();
    dm.resume("pool").unwrap()
}

#[test]
fn error_if_no_space_fails_the_writes_waiting_for_space_and_queueing_comes_back() {
    let (mut dm, export, _) = pool_with_thin("0");
    for block in 0..16 {
        write(&mut dm, export, block, block);
        assert!(completions(&mut dm)[0].result.is_ok());
    }
    write(&mut dm, export, 100, 20);
    assert!(completions(&mut dm).is_empty(), "the write waits for space");
    assert_eq!(
        reload_pool(&mut dm, 2, "1 error_if_no_space"),
        ["low water mark 2 blocks, features: error_if_no_space"]
    );
    let failed = completions(&mut dm);
    assert_eq!(failed.len(), 1);
    assert!(matches!(failed[0].result, Err(BackendError::NoSpace)));
    write(&mut dm, export, 101, 21);
    assert!(matches!(
        completions(&mut dm)[0].result,
        Err(BackendError::NoSpace)
    ));
    assert!(
        pool_status(&dm).contains(" out_of_data_space "),
        "{}",
        pool_status(&dm)
    );
    assert!(pool_status(&dm).contains(" error_if_no_space "));

    assert_eq!(
        reload_pool(&mut dm, 2, "0"),
        ["low water mark 2 blocks, features: none"]
    );
    write(&mut dm, export, 102, 22);
    assert!(completions(&mut dm).is_empty(), "queued again");
    assert!(pool_status(&dm).contains(" queue_if_no_space "));
}

#[test]
fn read_only_by_reload_and_back_to_write_mode() {
    let (mut dm, export, _) = pool_with_thin("0");
    write(&mut dm, export, 1, 1);
    assert!(completions(&mut dm)[0].result.is_ok());
    assert_eq!(
        reload_pool(&mut dm, 2, "1 read_only"),
        ["low water mark 2 blocks, features: read_only"]
    );
    assert!(pool_status(&dm).contains(" ro "), "{}", pool_status(&dm));
    assert!(
        dm.tick(&|| 0)
            .iter()
            .any(|event| event.contains("the table was reloaded with read_only"))
    );
    // An overwrite of a mapped block is done in place; a new block is refused.
    write(&mut dm, export, 2, 1);
    assert!(completions(&mut dm)[0].result.is_ok());
    write(&mut dm, export, 3, 5);
    assert!(matches!(
        completions(&mut dm)[0].result,
        Err(BackendError::Io(_))
    ));
    assert!(dm.message("pool", "create_thin 1").is_err());

    assert_eq!(
        reload_pool(&mut dm, 2, "0"),
        ["low water mark 2 blocks, features: none"]
    );
    assert!(pool_status(&dm).contains(" rw "), "{}", pool_status(&dm));
    write(&mut dm, export, 4, 5);
    assert!(completions(&mut dm)[0].result.is_ok());
    dm.message("pool", "create_thin 1").unwrap();
}

#[test]
fn a_new_low_water_mark_fires_at_its_own_level() {
    let (mut dm, export, _) = pool_with_thin("0");
    assert_eq!(
        reload_pool(&mut dm, 10, "0"),
        ["low water mark 10 blocks, features: none"]
    );
    for block in 0..5 {
        write(&mut dm, export, block, block);
        assert!(completions(&mut dm)[0].result.is_ok());
    }
    assert!(dm.tick(&|| 0).is_empty(), "11 blocks free");
    write(&mut dm, export, 5, 5);
    assert!(completions(&mut dm)[0].result.is_ok());
    assert_eq!(
        dm.tick(&|| 0),
        [
            "pool: data low water mark reached: 10 data blocks free (mark 10); grow the pool or \
          discard unused space"
        ]
    );
    // Unchanged mark and features: nothing to say.
    assert!(reload_pool(&mut dm, 10, "0").is_empty());
}
