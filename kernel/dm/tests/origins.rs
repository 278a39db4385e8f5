//! Thin devices stay on the external origin they were created over: a device (or a
//! snapshot of it) activated with another origin, a resized one or none is refused,
//! across reboots, and configurations saved before origins were recorded still load.

use blockdev::MemDisk;
use dm::config::{Area, OriginRecord};
use dm::{DeviceMapper, Disk, Format, State};

/// Disks: configuration, metadata, data, two origins of different sizes.
struct Machine {
    disks: Vec<(&'static str, MemDisk)>,
}

impl Machine {
    fn new() -> Self {
        let sizes = [4096, 4096, 8192, 1024, 2048];
        let names = ["vda", "vdb", "vdc", "vdd", "vde"];
        Machine {
            disks: names
                .into_iter()
                .zip(sizes)
                .map(|(name, sectors)| (name, MemDisk::new(sectors)))
                .collect(),
        }
    }

    fn boot(&self) -> DeviceMapper {
        DeviceMapper::new(
            self.disks
                .iter()
                .map(|(name, disk)| Disk {
                    name: name.to_string(),
                    device: Box::new(disk.handle()),
                })
                .collect(),
        )
    }
}

fn thin(dm: &mut DeviceMapper, name: &str, table: &str) -> Result<(), String> {
    dm.create(name, false, table, Format::Never)
        .map(drop)
        .map_err(String::from)
}

fn pool_with_thin_over_vdd(machine: &Machine) -> DeviceMapper {
    let mut dm = machine.boot();
    dm.config_init("vda", [3; 16], false).unwrap();
    dm.create(
        "pool",
        false,
        "0 8192 thin-pool vdb vdc 128 0",
        Format::IfBlank,
    )
    .unwrap();
    dm.message("pool", "create_thin 0").unwrap();
    thin(&mut dm, "base", "0 4096 thin pool 0 vdd").unwrap();
    dm
}

#[test]
fn a_thin_device_is_refused_over_another_origin_or_none() {
    let machine = Machine::new();
    let mut dm = pool_with_thin_over_vdd(&machine);
    assert_eq!(
        dm.origin_records(),
        [OriginRecord {
            pool: "pool".into(),
            dev_id: 0,
            origin: Some(("vdd".into(), 1024)),
        }]
    );
    dm.remove("base", false).unwrap();
    assert_eq!(
        thin(&mut dm, "base", "0 4096 thin pool 0").unwrap_err(),
        "create base: thin device 0 of pool pool was created over external origin vdd (1024 \
         sectors); its table must name that origin"
    );
    assert_eq!(
        thin(&mut dm, "base", "0 4096 thin pool 0 vde").unwrap_err(),
        "create base: thin device 0 of pool pool was created over external origin vdd (1024 \
         sectors), not vde (2048 sectors): its unprovisioned blocks would read different data"
    );
    // The same disk, but only part of it: another origin.
    dm.create("half", false, "0 512 linear vdd 0", Format::Never)
        .unwrap();
    assert!(
        thin(&mut dm, "base", "0 4096 thin pool 0 half")
            .unwrap_err()
            .contains("not half (512 sectors)")
    );
    thin(&mut dm, "base", "0 4096 thin pool 0 vdd").unwrap();

    // A snapshot inherits the record; a new device starts without one.
    dm.message("pool", "create_snap 1 0").unwrap();
    assert!(
        thin(&mut dm, "snap", "0 4096 thin pool 1")
            .unwrap_err()
            .contains("thin device 1 of pool pool was created over external origin vdd")
    );
    thin(&mut dm, "snap", "0 4096 thin pool 1 vdd").unwrap();
    dm.message("pool", "create_thin 2").unwrap();
    thin(&mut dm, "plain", "0 4096 thin pool 2").unwrap();
    dm.remove("plain", false).unwrap();
    assert_eq!(
        thin(&mut dm, "plain", "0 4096 thin pool 2 vdd").unwrap_err(),
        "create plain: thin device 2 of pool pool was created without an external origin; \
         over vdd its unprovisioned blocks would read different data"
    );

    // Deleting a device forgets its record: the id may be reused for another device.
    dm.thin_delete("snap").unwrap();
    dm.message("pool", "create_thin 1").unwrap();
    thin(&mut dm, "again", "0 4096 thin pool 1 vde").unwrap();
}

#[test]
fn records_survive_a_reboot_and_follow_renames() {
    let machine = Machine::new();
    let mut dm = pool_with_thin_over_vdd(&machine);
    dm.message("pool", "create_snap 1 0").unwrap();
    dm.rename("pool", "tank").unwrap();
    drop(dm);

    let mut dm = machine.boot();
    let notes = dm.restore();
    assert!(
        notes.contains(&"config: 2 of 2 devices active".to_string()),
        "{notes:?}"
    );
    let snapshot_record = OriginRecord {
        pool: "tank".into(),
        dev_id: 1,
        origin: Some(("vdd".into(), 1024)),
    };
    assert!(dm.origin_records().contains(&snapshot_record));
    assert!(
        thin(&mut dm, "snap", "0 4096 thin pool 1").is_err(),
        "pool renamed"
    );
    assert!(
        thin(&mut dm, "snap", "0 4096 thin tank 1")
            .unwrap_err()
            .contains("thin device 1 of pool tank was created over external origin vdd")
    );
    thin(&mut dm, "snap", "0 4096 thin tank 1 vdd").unwrap();
}

#[test]
fn a_configuration_saved_without_origin_records_still_loads() {
    let machine = Machine::new();
    let mut dm = pool_with_thin_over_vdd(&machine);
    dm.message("pool", "create_snap 1 0").unwrap();
    drop(dm);
    // Rewrite the configuration as a version without origin records saved it.
    let mut config = machine.disks[0].1.handle();
    let mut area = Area::probe(&mut config).unwrap().unwrap();
    let text = area.current().unwrap().2.to_string();
    let old: String = text
        .lines()
        .filter(|line| !line.starts_with("origin "))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_eq!(
        old,
        "disk vdb 4096 -\ndisk vdc 8192 -\ndisk vdd 1024 -\ndevice pool rw 0 8192 thin-pool \
         vdb vdc 128 0 0\ndevice base rw 0 4096 thin pool 0 vdd\n"
    );
    area.save(&mut config, &old).unwrap();

    let mut dm = machine.boot();
    let notes = dm.restore();
    assert!(
        notes.contains(&"config: 2 of 2 devices active".to_string()),
        "{notes:?}"
    );
    assert!(matches!(
        dm.device("base").unwrap().state(),
        State::Active(_)
    ));
    // Bringing the devices up recorded the origin of the one that is active.
    assert_eq!(
        dm.origin_records(),
        [OriginRecord {
            pool: "pool".into(),
            dev_id: 0,
            origin: Some(("vdd".into(), 1024)),
        }]
    );
    dm.remove("base", false).unwrap();
    assert!(thin(&mut dm, "base", "0 4096 thin pool 0").is_err());
}
