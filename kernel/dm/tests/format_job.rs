//! A pool on a large metadata device is formatted in the background: `create`
//! returns after a bounded first step, the pool refuses work until the superblock is
//! written, another device's I/O is served between the steps, and a power cut at any
//! write or flush of the format leaves either the marker (formatted again at the
//! next activation) or metadata the real `thin_check` accepts.

use blockdev::{BlockDevice, CrashDisk, IoBuf, MemDisk, Unflushed};
use dm::{DeviceMapper, Disk, Format, JobStatus};
use nbd::{Backend, IoOp, IoRequest};

/// The address NBD clients of these tests connect from.
const CLIENT: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

/// Data block size of the pools here (64 KiB).
const BLOCK: u64 = 128;
/// Blocks one space-map bitmap covers.
const BITMAP_BLOCKS: u64 = 16_320;
/// A 1.1 GiB metadata device: 18 metadata bitmaps.
const META_SECTORS: u64 = 18 * BITMAP_BLOCKS * 8 - 8 * 1024;
/// The crash sweep's 16 MiB metadata device (one bitmap): each cut is checked with
/// `thin_check`, which takes its time over a large device.
const SWEEP_META_SECTORS: u64 = 32 * 1024;
/// 40 GiB of data (sparse): 40 data bitmaps.
const DATA_SECTORS: u64 = 40 * BITMAP_BLOCKS * BLOCK;
const POOL_TABLE: &str = "0 83558400 thin-pool vda vdb 128 0";

fn mapper(disks: Vec<(&str, Box<dyn BlockDevice>)>) -> DeviceMapper {
    DeviceMapper::new(
        disks
            .into_iter()
            .map(|(name, device)| Disk {
                name: name.to_string(),
                device,
            })
            .collect(),
    )
}

fn format_job(dm: &DeviceMapper) -> Option<JobStatus> {
    dm.jobs().into_iter().find(|job| job.id == "pool/format")
}

/// Runs `thin_check` on the first `sectors` of `disk`, copied into a sparse file.
fn thin_check(disk: &MemDisk, sectors: u64) -> Result<(), String> {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta");
    let mut file = std::fs::File::create(&path).unwrap();
    file.set_len(sectors * 512).unwrap();
    let mut chunk = vec![0u8; 1 << 16];
    for offset in (0..sectors * 512).step_by(chunk.len()) {
        disk.read_at(offset, &mut chunk);
        if chunk.iter().any(|&b| b != 0) {
            file.seek(SeekFrom::Start(offset)).unwrap();
            file.write_all(&chunk).unwrap();
        }
    }
    drop(file);
    host_tools::thin_check(&path)
}

#[test]
fn a_large_pool_is_formatted_in_bounded_steps_while_another_device_serves_io() {
    let meta = CrashDisk::new(META_SECTORS);
    let data = MemDisk::new(DATA_SECTORS);
    let other = MemDisk::new(2048);
    let mut dm = mapper(vec![
        ("vda", Box::new(meta.handle())),
        ("vdb", Box::new(data.handle())),
        ("vdc", Box::new(other.handle())),
    ]);
    dm.create("other", false, "0 2048 linear vdc 0", Format::IfBlank)
        .unwrap();
    let (export, _) = dm.open("other", CLIENT).unwrap();

    let before = meta.stats();
    let notes = dm
        .create("pool", false, POOL_TABLE, Format::IfBlank)
        .unwrap();
    assert_eq!(notes, ["formatting new pool metadata on vda"]);
    let first_step = meta.stats().writes - before.writes;
    let job = format_job(&dm).expect("the format is a job");
    assert_eq!(
        (job.device.as_str(), job.what.as_str(), job.unit),
        ("pool", "format of metadata device vda", "bitmaps")
    );
    // The bitmaps `create` wrote are not the background's.
    assert_eq!((job.done, job.total, job.cancellable), (0, 26, false));
    let refused = "pool pool is still formatting its metadata (jobs shows it as pool/format); \
                   try again when it is done";
    assert!(
        dm.message("pool", "create_thin 0")
            .unwrap_err()
            .0
            .contains(refused)
    );
    assert_eq!(
        dm.cancel_job("pool/format").unwrap_err().0,
        "pool/format cannot be cancelled: a half-formatted pool is of no use; remove pool to \
         stop it (its metadata device is formatted again when the pool is created again)"
    );

    // Between ticks, a write and a read of the other device complete.
    let mut completions_between_steps = Vec::new();
    let mut events = Vec::new();
    let mut progress = vec![job.done];
    let mut tag = 0;
    let mut writes_per_step = vec![first_step];
    while format_job(&dm).is_some() {
        let mut completed = 0;
        for op in [
            IoOp::Write {
                sector: tag % 256 * 8,
                buf: IoBuf::with_sectors(8),
                fua: false,
            },
            IoOp::Read {
                sector: tag % 256 * 8,
                buf: IoBuf::with_sectors(8),
            },
        ] {
            tag += 1;
            dm.submit(IoRequest { tag, export, op }).unwrap();
            while let Some(done) = dm.poll() {
                assert!(done.result.is_ok());
                completed += 1;
            }
        }
        completions_between_steps.push(completed);
        let writes = meta.stats().writes;
        events.extend(dm.tick(&|| 1_000_000));
        writes_per_step.push(meta.stats().writes - writes);
        progress.extend(format_job(&dm).map(|job| job.done));
        assert!(progress.len() < 100, "the format never finished");
    }
    assert_eq!(progress, [0, 18]);
    assert_eq!(completions_between_steps, [2, 2]);
    // A step writes its few bitmaps and tree nodes, merged into runs.
    assert!(
        writes_per_step.iter().all(|&writes| writes <= 40),
        "{writes_per_step:?}"
    );
    assert_eq!(
        events,
        ["pool: metadata formatted on vda; the pool is ready"]
    );

    dm.message("pool", "create_thin 0").unwrap();
    dm.remove("pool", false).unwrap();
    thin_check(&meta.contents(), META_SECTORS).unwrap();
}

/// What the disks of a cut look like to the next boot.
struct Rebuilt {
    meta: MemDisk,
    data: MemDisk,
    config: MemDisk,
}

/// Boots over `disks`, ticks until no job runs, and checks the pool: when the
/// configuration has it, it is formatted (again if need be), usable and clean;
/// otherwise its metadata device holds no superblock yet, and creating it works.
fn reboot_and_check(disks: Rebuilt, cut: u64) {
    let mut dm = mapper(vec![
        ("vda", Box::new(disks.meta.handle())),
        ("vdb", Box::new(disks.data.handle())),
        ("vdc", Box::new(disks.config.handle())),
    ]);
    let notes = dm.restore();
    if dm.device("pool").is_err() {
        let mut block0 = [0u8; 4096];
        disks.meta.read_at(0, &mut block0);
        assert!(
            block0.iter().all(|&b| b == 0) || thin_pool::is_format_marker(&block0),
            "cut {cut}: a superblock without a saved pool"
        );
        dm.create("pool", false, POOL_TABLE, Format::IfBlank)
            .unwrap();
    }
    let mut ticks = 0;
    while !dm.jobs().is_empty() {
        dm.tick(&|| 0);
        ticks += 1;
        assert!(ticks < 100, "cut {cut}: the format never finished");
    }
    dm.message("pool", "create_thin 0")
        .unwrap_or_else(|error| panic!("cut {cut}: {notes:?}: {}", error.0));
    dm.remove("pool", false).unwrap();
    if let Err(problems) = thin_check(&disks.meta, SWEEP_META_SECTORS) {
        panic!("cut {cut}: {problems}");
    }
}

#[test]
fn a_power_cut_at_any_write_of_the_format_leaves_it_to_be_done_again_or_done() {
    // A configuration disk that already holds an empty configuration.
    let config = MemDisk::new(4096);
    {
        let mut dm = mapper(vec![("vdc", Box::new(config.handle()))]);
        dm.config_init("vdc", [7; 16], false).unwrap();
    }
    let mut cut = 0;
    loop {
        let meta = CrashDisk::new(SWEEP_META_SECTORS);
        let data = CrashDisk::new(DATA_SECTORS);
        let config = CrashDisk::from_disk(&config);
        meta.share_power(&data);
        meta.share_power(&config);
        meta.fail_at(Some(cut));
        let mut dm = mapper(vec![
            ("vda", Box::new(meta.handle())),
            ("vdb", Box::new(data.handle())),
            ("vdc", Box::new(config.handle())),
        ]);
        dm.restore();
        if dm
            .create("pool", false, POOL_TABLE, Format::IfBlank)
            .is_ok()
        {
            let mut ticks = 0;
            while format_job(&dm).is_some() {
                dm.tick(&|| 0);
                ticks += 1;
                assert!(ticks < 100, "cut {cut}: the format never finished");
            }
        }
        if !meta.power_lost() {
            // Every write and flush of the format has had its cut.
            assert!(cut > 10, "only {cut} cuts");
            eprintln!("{cut} cuts");
            break;
        }
        drop(dm);
        for unflushed in [
            Unflushed::DropAll,
            Unflushed::KeepAll,
            Unflushed::Random(cut),
        ] {
            let rebuilt = Rebuilt {
                meta: meta.after_power_loss(unflushed),
                data: data.after_power_loss(unflushed),
                config: config.after_power_loss(unflushed),
            };
            reboot_and_check(rebuilt, cut);
        }
        cut += 1;
    }
}
