//! The management plane on the booted appliance: devices created from the console,
//! the configuration surviving a clean shutdown and a power cut, a missing disk at
//! boot, and NBD exports of the devices.

use std::path::PathBuf;

use qemu_test::{Appliance, Options, Scratch};

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
            "config: disk vdb is missing (the disk now called vdb holds 14336 sectors, 65536 \
             were saved)",
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
}
