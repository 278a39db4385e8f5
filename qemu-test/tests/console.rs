//! The management plane on the booted appliance: devices created from the console,
//! the configuration surviving a clean shutdown and a power cut, a missing disk at
//! boot, and NBD exports of the devices.

use std::path::PathBuf;
use std::time::Duration;

use qemu_test::{Appliance, Options, Scratch, qemu_img_read, qemu_img_write, run_tool};

const MIB: u64 = 1 << 20;

/// Three virtio disks: vda 64 MiB, vdb 32 MiB, vdc 8 MiB (the configuration disk).
fn disks(scratch: &Scratch) -> Vec<PathBuf> {
    [("a.img", 64), ("b.img", 32), ("c.img", 8)]
        .into_iter()
        .map(|(name, mib)| scratch.disk(name, mib * MIB).unwrap())
        .collect()
}

fn boot(disks: &[&PathBuf]) -> Appliance {
    let options = disks
        .iter()
        .fold(Options::bios(), |options, disk| options.disk(*disk));
    Appliance::boot(options).unwrap()
}

fn boot_notes(appliance: &Appliance) -> Vec<String> {
    appliance
        .boot_log()
        .iter()
        .filter(|line| line.starts_with("config: "))
        .cloned()
        .collect()
}

#[test]
fn devices_survive_shutdown_and_power_cut_and_a_missing_disk_leaves_only_its_devices_down() {
    let scratch = Scratch::new().unwrap();
    let disks = disks(&scratch);
    let all: Vec<&PathBuf> = disks.iter().collect();

    let mut appliance = boot(&all);
    assert_eq!(
        boot_notes(&appliance),
        ["config: no configuration disk found; changes are not saved (see config init)"]
    );
    appliance.console_ok("config init vdc").unwrap();
    appliance
        .console_ok("dmsetup create base --readonly --table \"0 8192 linear /dev/vdb 0\"")
        .unwrap();
    appliance
        .console_ok("create guest --table \"0 4096 linear vda 2048\"")
        .unwrap();
    appliance
        .console_ok("create inner --table \"0 8 linear /dev/mapper/base 8\"")
        .unwrap();
    assert_eq!(
        appliance.console_ok("ls").unwrap(),
        "base   (linear)\nguest  (linear)\ninner  (linear)"
    );
    let tables = appliance.console_ok("table").unwrap();
    appliance.shutdown().unwrap();

    // Clean shutdown: everything comes back.
    let mut appliance = boot(&all);
    assert_eq!(
        boot_notes(&appliance),
        ["config: vdc generation 4", "config: 3 of 3 devices active"]
    );
    assert_eq!(appliance.console_ok("table").unwrap(), tables);
    // A change, then the power is cut right after the command answered.
    appliance.console_ok("remove inner").unwrap();
    appliance
        .console_ok("create later --table \"0 16 linear vda 0\"")
        .unwrap();
    appliance.kill();

    let mut appliance = boot(&all);
    assert_eq!(
        boot_notes(&appliance),
        ["config: vdc generation 6", "config: 3 of 3 devices active"]
    );
    assert_eq!(
        appliance.console_ok("ls").unwrap(),
        "base   (linear)\nguest  (linear)\nlater  (linear)"
    );
    appliance.shutdown().unwrap();

    // vdb is gone (vdc becomes vdb): base stays down, the rest comes up.
    let mut appliance = boot(&[&disks[0], &disks[2]]);
    assert_eq!(
        boot_notes(&appliance),
        [
            "config: vdb generation 6",
            format!(
                "config: disk vdb (serial {}) is missing",
                qemu_test::disk_serial(&disks[1])
            )
            .as_str(),
            "config: base stays inactive: disk vdb is missing",
            "config: 2 of 3 devices active",
        ]
    );
    assert_eq!(
        appliance.console("status base").unwrap(),
        "error: base is inactive (disk vdb is missing)"
    );
    assert_eq!(
        appliance.console_ok("status guest").unwrap(),
        "0 4096 linear"
    );
    appliance.shutdown().unwrap();

    // All three back in reverse order: the disks are found by serial and the tables
    // follow the new names.
    let mut appliance = boot(&[&disks[2], &disks[1], &disks[0]]);
    assert_eq!(
        boot_notes(&appliance),
        [
            "config: vda generation 6",
            &format!(
                "config: disk vda (serial {}) is now vdc",
                qemu_test::disk_serial(&disks[0])
            ),
            "config: 3 of 3 devices active",
        ]
    );
    assert_eq!(
        appliance.console_ok("table").unwrap(),
        "base: 0 8192 linear vdb 0\nguest: 0 4096 linear vdc 2048\nlater: 0 16 linear vdc 0"
    );
    appliance.shutdown().unwrap();
}

/// vda 16 MiB (pool metadata), vdb 64 MiB (pool data), vdc 8 MiB (base image), vdd
/// 4 MiB (configuration).
fn pool_disks(scratch: &Scratch) -> Vec<PathBuf> {
    [
        ("meta.img", 16),
        ("data.img", 64),
        ("image.img", 8),
        ("config.img", 4),
    ]
    .into_iter()
    .map(|(name, mib)| scratch.disk(name, mib * MIB).unwrap())
    .collect()
}

/// The fields of a status line after `0 LENGTH TARGET`.
fn status_fields(appliance: &mut Appliance, name: &str) -> Vec<String> {
    appliance
        .console_ok(&format!("status {name}"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .map(String::from)
        .collect()
}

/// The seed documents' workflow, an event while a line is half typed, and the pool
/// coming back after a shutdown and after a power cut.
///
/// The event's trigger is deterministic: the pool has 1024 data blocks of 64 KiB and a
/// low water mark of 1000 blocks, and `disk-test thin 4` writes 4 MiB (64 blocks)
/// through the thin device, so the mark is crossed during the test. Keys typed while
/// the test runs are held and replayed at the prompt after it, so the event line must
/// leave `stat` intact on the prompt line.
#[test]
fn pool_workflow_events_and_persistence_on_the_appliance() {
    let scratch = Scratch::new().unwrap();
    let disks = pool_disks(&scratch);
    let all: Vec<&PathBuf> = disks.iter().collect();
    let mut appliance = boot(&all);
    appliance.console_ok("config init vdd").unwrap();
    appliance
        .console_ok("dmsetup create pool --table \"0 131072 thin-pool /dev/vda /dev/vdb 128 1000\"")
        .unwrap();
    appliance
        .console_ok("dmsetup message /dev/mapper/pool 0 \"create_thin 0\"")
        .unwrap();
    appliance
        .console_ok("dmsetup create thin --table \"0 65536 thin /dev/mapper/pool 0\"")
        .unwrap();
    appliance
        .console_ok("dmsetup create image --readonly --table \"0 16384 linear /dev/vdc 0\"")
        .unwrap();
    appliance
        .console_ok("message pool 0 create_thin 1")
        .unwrap();
    appliance
        .console_ok("dmsetup create snap --table \"0 16384 thin /dev/mapper/pool 1 /dev/image\"")
        .unwrap();
    appliance
        .console_ok("message pool 0 \"create_snap 2 1\"")
        .unwrap();
    appliance
        .console_ok("create snap2 --table \"0 16384 thin pool 2 image\"")
        .unwrap();
    appliance
        .console_ok("message pool 0 reserve_metadata_snap")
        .unwrap();
    assert_ne!(status_fields(&mut appliance, "pool")[3], "-");
    assert!(
        appliance
            .console("message pool 0 reserve_metadata_snap")
            .unwrap()
            .ends_with("(EBUSY)")
    );
    appliance
        .console_ok("message pool 0 release_metadata_snap")
        .unwrap();
    appliance
        .console_ok("message pool 0 set_transaction_id 0 1")
        .unwrap();
    assert_eq!(
        appliance.console_ok("table pool").unwrap(),
        "0 131072 thin-pool vda vdb 128 1000 0"
    );
    assert_eq!(
        appliance.console_ok("status thin").unwrap(),
        "0 65536 thin 0 -"
    );

    appliance.type_partial("disk-test thin 4\rstat").unwrap();
    let during = appliance
        .read_until(
            "event: pool: data low water mark reached",
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(during.contains("disk-test thin"), "{during}");
    let after = appliance
        .read_until("thinbox> stat", Duration::from_secs(60))
        .unwrap();
    assert!(after.contains("disk-test thin: OK, 4 MiB"), "{after}");
    appliance.type_partial("us pool\r").unwrap();
    let status = appliance
        .read_until("thinbox> ", Duration::from_secs(10))
        .unwrap();
    assert!(status.contains("0 131072 thin-pool 1 "), "{status}");
    let tables = appliance.console_ok("table").unwrap();
    appliance.shutdown().unwrap();

    let mut appliance = boot(&all);
    // Six changes, and the external origin snapshot 2 inherits from device 1.
    assert_eq!(
        boot_notes(&appliance),
        ["config: vdd generation 7", "config: 5 of 5 devices active"]
    );
    assert_eq!(appliance.console_ok("table").unwrap(), tables);
    assert_eq!(status_fields(&mut appliance, "pool")[0], "1");
    appliance
        .console_ok("thin create later pool --size 8M")
        .unwrap();
    appliance.kill();

    let mut appliance = boot(&all);
    assert_eq!(
        boot_notes(&appliance),
        ["config: vdd generation 8", "config: 6 of 6 devices active"]
    );
    assert_eq!(
        appliance.console_ok("table later").unwrap(),
        "0 16384 thin pool 3"
    );
    appliance.shutdown().unwrap();
}

/// The VM-hosting use case over the appliance's NBD service: a read-only base image,
/// thin guests over it, exports that follow create and remove.
#[test]
fn devices_are_nbd_exports_of_the_appliance() {
    host_tools::require_for_test(&[
        host_tools::Tool::Qemu,
        host_tools::Tool::QemuImg,
        host_tools::Tool::NbdInfo,
    ]);
    let scratch = Scratch::new().unwrap();
    let disks = pool_disks(&scratch);
    let base: Vec<u8> = (0..8 * MIB as usize)
        .map(|i| (i / 4096) as u8 ^ 0x3C)
        .collect();
    std::fs::write(&disks[2], &base).unwrap();
    let options = disks
        .iter()
        .fold(Options::bios().nbd(), |options, disk| options.disk(disk));
    let mut appliance = Appliance::boot(options).unwrap();
    qemu_test::wait_for_greeting(appliance.nbd_port().unwrap(), Duration::from_secs(60)).unwrap();
    appliance
        .console_ok("create base --readonly --table \"0 16384 linear vdc 0\"")
        .unwrap();
    // 1024 data blocks of 64 KiB: the 14th block a guest writes leaves 1010 free.
    appliance
        .console_ok("pool create pool vda vdb --low-water-mark 1010")
        .unwrap();
    appliance
        .console_ok("thin create guest1 pool --origin base")
        .unwrap();
    appliance
        .console_ok("thin create guest2 pool --origin base")
        .unwrap();
    let uri = |export: &str| appliance.nbd_uri(export).unwrap();
    let (base_uri, guest1, guest2, all) = (uri("base"), uri("guest1"), uri("guest2"), uri(""));
    let list = run_tool("nbdinfo", &["--list", "--json", &all]);
    for name in ["base", "guest1", "guest2"] {
        assert!(
            list.contains(&format!("\"export-name\": \"{name}\"")),
            "{list}"
        );
    }
    assert!(!list.contains("\"export-name\": \"pool\""), "{list}");
    assert!(run_tool("nbdinfo", &["--json", &base_uri]).contains("\"is_read_only\": true"));

    // A guest writes its first MiB while the operator has half a command typed: the
    // low water mark event appears above the prompt and the typing is kept.
    appliance.type_partial("stat").unwrap();
    appliance
        .read_until("stat", Duration::from_secs(10))
        .unwrap();
    let patch = scratch.path().join("patch.img");
    std::fs::write(&patch, vec![0xEE; MIB as usize]).unwrap();
    qemu_img_write(patch.to_str().unwrap(), &guest1);
    let event = appliance
        .read_until("thinbox> stat", Duration::from_secs(30))
        .unwrap();
    assert!(
        event.contains(
            "\r\x1b[Kevent: pool: data low water mark reached: 1010 data blocks free (mark 1010)"
        ),
        "{event:?}"
    );
    appliance.type_partial("us pool\r").unwrap();
    let status = appliance
        .read_until("thinbox> ", Duration::from_secs(10))
        .unwrap();
    assert!(status.contains(" 16/1024 "), "{status}");
    for (export, patched) in [(&guest1, true), (&guest2, false)] {
        let data = qemu_img_read(export, &scratch.path().join("copy.img"));
        assert_eq!(data.len(), base.len());
        if patched {
            assert!(data[..MIB as usize].iter().all(|&b| b == 0xEE));
        } else {
            assert_eq!(&data[..MIB as usize], &base[..MIB as usize]);
        }
        assert_eq!(&data[MIB as usize..], &base[MIB as usize..]);
    }
    let map = run_tool("nbdinfo", &["--map", &guest1]);
    assert!(map.contains("hole"), "{map}");
    assert_eq!(
        appliance.console_ok("status guest1").unwrap(),
        "0 16384 thin 2048 2047"
    );
    // Removed devices leave the export list at once.
    appliance.console_ok("thin delete guest2").unwrap();
    let list = run_tool("nbdinfo", &["--list", "--json", &all]);
    assert!(!list.contains("\"export-name\": \"guest2\""), "{list}");
    appliance.shutdown().unwrap();
}
