//! `disk-reset` through the console: the disks under a pool, and the configuration
//! disk, reset while NBD writes are in flight; a wedged disk; refusals.

use alloc::vec::Vec;
use blockdev::{IoBuf, ResetLog, ResettableDisk};
use nbd::{Backend, IoOp, IoOutput, IoRequest};

use crate::Console;
use crate::tests::{
    CLIENT, FakePlatform, console_over, disk, error, io, lines, mem_disk, nbd_backend, ok,
};

/// 64 KiB writes (one pool block each) the test keeps in flight.
const WRITES: u64 = 4;

/// A console over resettable disks vda (metadata), vdb (data) and vdc
/// (configuration), whose requests complete two polls after the last submission,
/// and a plain memory disk vdd; with the logs of vda, vdb and vdc.
fn machine() -> (Console<FakePlatform>, [ResetLog; 3]) {
    let (vda, meta_log) = ResettableDisk::new(mem_disk(16, "disk", "meta"), Some(2));
    let (vdb, data_log) = ResettableDisk::new(mem_disk(64, "disk", "data"), Some(2));
    let (vdc, config_log) = ResettableDisk::new(mem_disk(4, "disk", "config"), Some(2));
    let console = console_over(
        FakePlatform::default(),
        alloc::vec![
            disk("vda", vda),
            disk("vdb", vdb),
            disk("vdc", vdc),
            disk("vdd", mem_disk(4, "disk", "plain")),
        ],
    );
    (console, [meta_log, data_log, config_log])
}

fn pattern(n: u64) -> u8 {
    n as u8 + 0x41
}

#[test]
fn resets_under_a_pool_lose_no_write_in_flight() {
    let (mut console, [meta_log, data_log, config_log]) = machine();
    ok(&mut console, "config init vdc");
    ok(&mut console, "pool create pool vda vdb");
    ok(&mut console, "thin create vol pool --size 8M");
    let mut backend = nbd_backend(&console);
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    for n in 0..WRITES {
        let mut buf = IoBuf::with_sectors(128);
        buf.fill(pattern(n));
        backend
            .submit(IoRequest {
                tag: n,
                export: vol,
                op: IoOp::Write {
                    sector: n * 128,
                    buf,
                    fua: false,
                },
            })
            .unwrap();
    }
    let data_writes_before = data_log.borrow().len();
    assert_eq!(
        data_log
            .borrow()
            .iter()
            .filter(|&&what| what == "write")
            .count(),
        WRITES as usize,
        "the writes are on the data disk"
    );
    assert_eq!(
        lines(&ok(&mut console, "disk-reset vdb")),
        [
            "vdb: reset (4 requests in flight finished and the disk was flushed first); 1 reset so far"
        ]
    );
    let log = data_log.borrow().clone();
    assert_eq!(
        log[data_writes_before..data_writes_before + 2],
        ["flush", "reset"],
        "{log:?}"
    );
    let mut completed = Vec::new();
    while completed.len() < WRITES as usize {
        if let Some(done) = backend.poll() {
            assert!(done.result.is_ok(), "{:?}", done.result);
            completed.push(done.tag);
        }
    }
    for disk in ["vda", "vdc"] {
        let out = ok(&mut console, &alloc::format!("disk-reset {disk}"));
        assert!(out.starts_with(&alloc::format!("{disk}: reset (")), "{out}");
    }
    for log in [&meta_log, &config_log] {
        assert_eq!(
            log.borrow().iter().filter(|&&what| what == "reset").count(),
            1
        );
    }
    io(&mut backend, vol, 9, IoOp::Flush).unwrap();
    for n in 0..WRITES {
        let read = io(
            &mut backend,
            vol,
            10 + n,
            IoOp::Read {
                sector: n * 128,
                buf: IoBuf::with_sectors(128),
            },
        );
        let Ok(IoOutput::Read { buf, .. }) = read else {
            panic!("{read:?}");
        };
        assert!(buf.iter().all(|&byte| byte == pattern(n)), "block {n}");
    }
    let disks = ok(&mut console, "disks");
    let resets = "         errors: 0 reads, 0 writes, 0 flushes, 0 discards failed; 1 reset";
    assert_eq!(
        lines(&disks).iter().filter(|&&line| line == resets).count(),
        3,
        "{disks}"
    );
    assert!(ok(&mut console, "status pool").contains(" rw "));
    backend.close(vol, CLIENT);
}

#[test]
fn a_wedged_disk_is_reset_after_the_wait_and_its_requests_fail() {
    let (vda, log) = ResettableDisk::new(mem_disk(4, "disk", "wedged"), None);
    let mut console = console_over(FakePlatform::default(), alloc::vec![disk("vda", vda)]);
    assert_eq!(
        lines(&ok(&mut console, "disk-reset vda")),
        ["vda: reset (1 request did not finish within 5.000 s and failed); 1 reset so far"]
    );
    assert_eq!(*log.borrow(), ["flush", "reset"]);
}

#[test]
fn disk_reset_refuses_unknown_disks_and_disks_without_a_reset() {
    let (mut console, logs) = machine();
    assert_eq!(
        error(&mut console, "disk-reset vdd"),
        "error: disk-reset: disk vdd cannot be reset (its driver has no reset)"
    );
    assert_eq!(
        error(&mut console, "disk-reset vdz"),
        "error: disk-reset: no disk called 'vdz' (see disks)"
    );
    for line in ["disk-reset", "disk-reset vda vdb"] {
        assert_eq!(error(&mut console, line), "error: usage: disk-reset DISK");
    }
    assert!(logs.iter().all(|log| log.borrow().is_empty()));
    let disks = ok(&mut console, "disks");
    assert!(!disks.contains("errors:"), "{disks}");
}
