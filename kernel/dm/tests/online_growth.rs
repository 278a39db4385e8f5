//! Growing a running pool the way LVM does it — a new segment for its data or
//! metadata device, a table reload, a resume — seen through the NBD backend, with
//! the metadata checked by the real `thin_check` afterwards.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use blockdev::{IoBuf, MemDisk};
use dm::{DeviceMapper, Disk, Format, PoolPart};
use nbd::{Backend, ExportHandle, IoCompletion, IoOp, IoOutput, IoRequest};

/// Where the NBD client of these tests connects from.
const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);

/// Data block size of the pools here (64 KiB).
const BLOCK: u64 = 128;

fn mapper(disks: &[(&str, &MemDisk)]) -> DeviceMapper {
    DeviceMapper::new(
        disks
            .iter()
            .map(|(name, disk)| Disk {
                name: name.to_string(),
                device: Box::new(disk.handle()),
            })
            .collect(),
    )
}

fn submit_write(dm: &mut DeviceMapper, export: ExportHandle, tag: u64, sector: u64, byte: u8) {
    let mut buf = IoBuf::with_sectors(8);
    buf.fill(byte);
    let op = IoOp::Write {
        sector,
        buf,
        fua: false,
    };
    dm.submit(IoRequest { tag, export, op }).expect("room");
}

fn completions(dm: &mut DeviceMapper, polls: usize) -> Vec<IoCompletion> {
    (0..polls).filter_map(|_| dm.poll()).collect()
}

fn run(dm: &mut DeviceMapper, export: ExportHandle, tag: u64, op: IoOp) -> IoOutput {
    dm.submit(IoRequest { tag, export, op }).expect("room");
    loop {
        if let Some(done) = dm.poll() {
            assert_eq!(done.tag, tag);
            return done.result.expect("request succeeds");
        }
    }
}

fn read_byte(dm: &mut DeviceMapper, export: ExportHandle, sector: u64) -> Vec<u8> {
    let op = IoOp::Read {
        sector,
        buf: IoBuf::with_sectors(8),
    };
    match run(dm, export, 9999, op) {
        IoOutput::Read { buf, .. } => buf.to_vec(),
        other => panic!("{other:?}"),
    }
}

/// Closes the pool cleanly (its thin devices first) and runs `thin_check` on its
/// metadata device, made of `parts` (disk, sectors) end to end.
fn close_and_check(mut dm: DeviceMapper, thins: &[&str], parts: &[(&MemDisk, u64)]) {
    for thin in thins {
        dm.remove(thin, true).unwrap();
    }
    dm.remove("pool", false).unwrap();
    host_tools::require_for_test(&[host_tools::Tool::ThinCheck]);
    let mut image = Vec::new();
    for (disk, sectors) in parts {
        let mut part = vec![0u8; (*sectors * 512) as usize];
        disk.read_at(0, &mut part);
        image.extend(part);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta");
    std::fs::write(&path, &image).unwrap();
    let out = std::process::Command::new("thin_check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "thin_check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn writes_waiting_for_space_complete_when_the_data_device_gets_a_second_disk() {
    let (meta, data, more) = (
        MemDisk::new(8192),
        MemDisk::new(16 * BLOCK),
        MemDisk::new(4096),
    );
    let mut dm = mapper(&[("vda", &meta), ("vdb", &data), ("vdc", &more)]);
    dm.create(
        "pool",
        false,
        "0 2048 thin-pool vda vdb 128 2 0",
        Format::IfBlank,
    )
    .unwrap();
    dm.message("pool", "create_thin 0").unwrap();
    dm.create("thin", false, "0 65536 thin pool 0", Format::IfBlank)
        .unwrap();
    let (export, _) = dm.open("thin", CLIENT).unwrap();
    for block in 0..16 {
        submit_write(&mut dm, export, block, block * BLOCK, block as u8 + 1);
        assert!(completions(&mut dm, 1000)[0].result.is_ok());
    }
    // Three writes to new blocks wait for space (queue_if_no_space).
    for (tag, block) in [(100, 20), (101, 40), (102, 300)] {
        submit_write(&mut dm, export, tag, block * BLOCK, tag as u8);
    }
    assert!(completions(&mut dm, 1000).is_empty(), "the writes wait");
    assert!(
        dm.status_lines(dm.device("pool").unwrap())[0].contains(" 16/16 - out_of_data_space "),
        "{:?}",
        dm.status_lines(dm.device("pool").unwrap())
    );

    let events = dm.tick(&|| 0);
    assert_eq!(
        events[0],
        "pool: data low water mark reached: 2 data blocks free (mark 2); grow the pool or \
         discard unused space"
    );
    // Growing a thin device needs no data space: it works while its writes wait,
    // and a new connection sees the new size.
    assert_eq!(
        dm.thin_resize("thin", 131072).unwrap(),
        ["thin: 0 131072 thin pool 0"]
    );
    assert!(dm.device("thin").unwrap().inactive_table().is_none());
    let (second, info) = dm.open("thin", CLIENT).unwrap();
    assert_eq!(info.sectors, 131072);
    dm.close(second, CLIENT);
    assert!(
        completions(&mut dm, 1000).is_empty(),
        "the writes still wait"
    );
    // A suspend finishes what can finish and leaves the writes waiting for space
    // queued in the pool (it used to wait for them for ever).
    dm.suspend("thin").unwrap();
    assert!(
        completions(&mut dm, 1000).is_empty(),
        "the writes still wait"
    );
    dm.resume("thin").unwrap();
    let lines = dm.pool_extend("pool", PoolPart::Data, "vdc").unwrap();
    assert_eq!(
        lines,
        [
            "pool_tdata: created over vdb so that the pool's data device can have a second \
             segment",
            "pool_tdata: 0 2048 linear vdb 0",
            "pool_tdata: 2048 4096 linear vdc 0",
            "pool: 0 6144 thin-pool vda pool_tdata 128 2 0",
            "pool: data space grown from 16 to 48 blocks",
        ]
    );
    let mut done = Vec::new();
    while done.len() < 3 {
        done.extend(completions(&mut dm, 100));
    }
    done.sort_by_key(|completion| completion.tag);
    assert_eq!(
        done.iter()
            .map(|completion| completion.tag)
            .collect::<Vec<_>>(),
        [100, 101, 102]
    );
    assert!(done.iter().all(|completion| completion.result.is_ok()));
    for (tag, block) in [(100u64, 20u64), (101, 40), (102, 300)] {
        assert_eq!(
            read_byte(&mut dm, export, block * BLOCK),
            vec![tag as u8; 4096]
        );
    }
    for block in 0..16u64 {
        assert_eq!(
            read_byte(&mut dm, export, block * BLOCK),
            vec![block as u8 + 1; 4096]
        );
    }
    let status = &dm.status_lines(dm.device("pool").unwrap())[0];
    assert!(status.contains(" 19/48 - rw "), "{status}");
    // Blocks beyond the first disk land on the second one.
    for block in 100..120 {
        submit_write(&mut dm, export, 200 + block, block * BLOCK, 0x5a);
    }
    let mut written = 0;
    while written < 20 {
        written += completions(&mut dm, 100).len();
    }
    // 39 of 48 blocks used: the low water mark is armed again and fires at 46.
    assert!(
        !dm.tick(&|| 0)
            .iter()
            .any(|event| event.contains("low water"))
    );
    for block in 120..127 {
        submit_write(&mut dm, export, 200 + block, block * BLOCK, 0x5b);
        assert!(completions(&mut dm, 1000)[0].result.is_ok());
    }
    assert_eq!(
        dm.tick(&|| 0),
        [
            "pool: data low water mark reached: 2 data blocks free (mark 2); grow the pool or \
          discard unused space"
        ]
    );
    let second: Vec<u8> = {
        let mut bytes = vec![0u8; 4096 * 512];
        more.read_at(0, &mut bytes);
        bytes
    };
    assert!(second.contains(&0x5a), "new blocks are on vdc");

    // Shrinking below what the pool has is refused, and nothing changes.
    dm.reload("pool", "0 2048 thin-pool vda pool_tdata 128 2 0")
        .unwrap();
    assert_eq!(
        dm.resume("pool").unwrap_err().0,
        "resume pool: pool target (16 blocks) too small: expected 48; the live table stays"
    );
    assert_eq!(
        dm.device("pool").unwrap().table().to_string(),
        "0 6144 thin-pool vda pool_tdata 128 2 0"
    );
    dm.clear("pool").unwrap();
    assert_eq!(
        dm.thin_resize("thin", 131072).unwrap(),
        ["thin: 0 131072 thin pool 0"]
    );
    assert_eq!(
        dm.pool_extend("pool", PoolPart::Data, "vdc").unwrap_err().0,
        "pool extend: vdc is in use by pool_tdata; give a disk or linear device nothing uses"
    );
    run(&mut dm, export, 5000, IoOp::Flush);
    dm.close(export, CLIENT);
    close_and_check(dm, &["thin"], &[(&meta, 8192)]);
}

#[test]
fn the_metadata_grows_onto_a_second_disk_while_the_pool_runs() {
    let (meta, data, more) = (
        MemDisk::new(2048),
        MemDisk::new(4096 * BLOCK),
        MemDisk::new(6144),
    );
    let mut dm = mapper(&[("vda", &meta), ("vdb", &data), ("vdd", &more)]);
    dm.create(
        "pool",
        false,
        "0 524288 thin-pool vda vdb 128 0 0",
        Format::IfBlank,
    )
    .unwrap();
    dm.message("pool", "create_thin 0").unwrap();
    dm.create("thin", false, "0 1048576 thin pool 0", Format::IfBlank)
        .unwrap();
    let (export, _) = dm.open("thin", CLIENT).unwrap();
    for block in 0..1000 {
        submit_write(&mut dm, export, block, block * BLOCK, 7);
        assert!(completions(&mut dm, 1000)[0].result.is_ok());
    }
    let lines = dm.pool_extend("pool", PoolPart::Metadata, "vdd").unwrap();
    assert_eq!(
        lines,
        [
            "pool_tmeta: created over vda so that the pool's metadata device can have a \
             second segment",
            "pool_tmeta: 0 2048 linear vda 0",
            "pool_tmeta: 2048 6144 linear vdd 0",
            "pool: 0 524288 thin-pool pool_tmeta vdb 128 0 0",
            "pool: metadata grown from 256 to 1024 blocks",
        ]
    );
    let status = &dm.status_lines(dm.device("pool").unwrap())[0];
    assert!(status.contains("/1024 1000/4096 "), "{status}");
    // The metadata's new blocks are used: snapshots, after each of which writes to
    // three leaves of the origin's mapping tree copy them.
    for snap in 1..150u64 {
        dm.message("pool", &format!("create_snap {snap} 0"))
            .unwrap();
        for (index, block) in [0u64, 400, 800].into_iter().enumerate() {
            submit_write(
                &mut dm,
                export,
                snap * 3 + index as u64,
                block * BLOCK,
                snap as u8,
            );
            assert!(completions(&mut dm, 1000)[0].result.is_ok());
        }
    }
    run(&mut dm, export, 5000, IoOp::Flush);
    dm.close(export, CLIENT);
    let status = &dm.status_lines(dm.device("pool").unwrap())[0];
    let used: u64 = status
        .split_whitespace()
        .nth(4)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(used > 256, "{status}");
    let mut metadata = vec![0u8; 6144 * 512];
    more.read_at(0, &mut metadata);
    assert!(metadata.iter().any(|&b| b != 0), "metadata blocks on vdd");
    // thin_check reads the metadata device as dm has it: vda, then vdd.
    close_and_check(dm, &["thin"], &[(&meta, 2048), (&more, 6144)]);
}

#[test]
fn metadata_grows_up_to_the_format_limit_with_dms_warning_beyond_16_gib() {
    let (meta, data) = (MemDisk::new(2048), MemDisk::new(64 * BLOCK));
    let huge = MemDisk::new(17 << 21);
    let mut dm = mapper(&[("vda", &meta), ("vdb", &data), ("vdc", &huge)]);
    dm.create(
        "pool",
        false,
        "0 8192 thin-pool vda vdb 128 0 0",
        Format::IfBlank,
    )
    .unwrap();
    dm.message("pool", "create_thin 0").unwrap();
    let lines = dm.pool_extend("pool", PoolPart::Metadata, "vdc").unwrap();
    assert_eq!(
        lines,
        [
            "pool_tmeta: created over vda so that the pool's metadata device can have a \
             second segment",
            "pool_tmeta: 0 2048 linear vda 0",
            "pool_tmeta: 2048 35651584 linear vdc 0",
            "pool: 0 8192 thin-pool pool_tmeta vdb 128 0 0",
            "pool: metadata grown from 256 to 4161600 blocks",
            "pool: metadata device is 35653632 sectors, larger than 33292800 sectors: excess \
             space will not be used",
        ]
    );
    let status = &dm.status_lines(dm.device("pool").unwrap())[0];
    assert!(status.contains("/4161600 0/64 "), "{status}");
    dm.message("pool", "create_thin 1").unwrap();
}
