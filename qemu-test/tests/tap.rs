//! The appliance on a tap interface, in a network namespace of its own (see
//! [`TapNetwork`]): a static address with `net set`, the NBD clients run inside the
//! namespace, on both NICs; checksum offload on and off, jumbo frames, the link
//! going down and up during a copy, and a transmit ring that stalls mid-copy. Needs
//! root (CI runs as root); otherwise each test says why it is skipped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{
    Appliance, DISK_INTERRUPTS_WORD, NBD_REQUESTS_WORD, Nic, Options, Scratch, TapNetwork,
    monitor_command, net_figure,
};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// Size of the thin volume every test copies into.
const VOLUME: u64 = 64 * MIB;

/// A booted appliance with a pool and thin volume `vol`, served on a tap network.
struct TapAppliance {
    appliance: Appliance,
    network: TapNetwork,
    scratch: Scratch,
    monitor: PathBuf,
}

/// Boots on a tap network with `nic`, or says why it cannot and returns `None`.
fn boot(nic: Nic, test: &str) -> Option<TapAppliance> {
    host_tools::require_for_test(&[Tool::Qemu, Tool::NbdInfo, Tool::NbdCopy]);
    let mut network = match TapNetwork::create() {
        Ok(network) => network,
        Err(why) => {
            eprintln!("{test}: skipped: {why}");
            return None;
        }
    };
    let scratch = Scratch::new().unwrap();
    let metadata = scratch.disk("metadata.img", 16 * MIB).unwrap();
    let data = scratch.disk("data.img", 256 * MIB).unwrap();
    let monitor = scratch.path().join("monitor.sock");
    let options = Options::bios()
        .memory_mib(512)
        .nic(nic)
        .tap(network.interface())
        .monitor(&monitor)
        .disk(&metadata)
        .disk(&data);
    let mut appliance = Appliance::boot(options).unwrap();
    network.enter().unwrap();
    appliance
        .console_ok(&format!(
            "net set {}/{} {}",
            TapNetwork::APPLIANCE,
            TapNetwork::PREFIX,
            TapNetwork::HOST
        ))
        .unwrap();
    for command in [
        format!(
            "create pool --table \"0 {} thin-pool vda vdb 128 0\"",
            256 * MIB / SECTOR
        ),
        String::from("message pool 0 \"create_thin 0\""),
        format!("create vol --table \"0 {} thin pool 0\"", VOLUME / SECTOR),
    ] {
        appliance.console_ok(&command).unwrap();
    }
    let served = TapAppliance {
        appliance,
        network,
        scratch,
        monitor,
    };
    served.wait_until_served();
    Some(served)
}

impl TapAppliance {
    /// Waits until a client in the namespace can list the exports.
    fn wait_until_served(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let uri = self.network.nbd_uri("");
        loop {
            let listed = self
                .network
                .command("nbdinfo")
                .args(["--list", &uri])
                .output()
                .unwrap();
            if listed.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no NBD service on the tap network: {}\n{}",
                String::from_utf8_lossy(&listed.stderr),
                self.appliance.transcript()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// Copies `source` into the volume with nbdcopy, from inside the namespace.
    fn write(&self, source: &Path) {
        let uri = self.network.nbd_uri("vol");
        self.network
            .run("nbdcopy", &["--flush", &source.display().to_string(), &uri]);
    }

    /// Starts copying `source` into the volume with nbdcopy, from inside the
    /// namespace, without waiting for it.
    fn start_write(&self, source: &Path) -> Child {
        let uri = self.network.nbd_uri("vol");
        self.network
            .command("nbdcopy")
            .args(["--flush", &source.display().to_string(), &uri])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// The volume's bytes, copied out with nbdcopy from inside the namespace.
    fn read(&self) -> Vec<u8> {
        let file = self.file("read.img");
        let _ = fs::remove_file(&file);
        let uri = self.network.nbd_uri("vol");
        self.network
            .run("nbdcopy", &[&uri, &file.display().to_string()]);
        fs::read(&file).unwrap()
    }

    fn net_figure(&mut self, label: &str, index: usize) -> u64 {
        net_figure(&mut self.appliance, label, index)
    }

    /// Sends a command to QEMU's monitor.
    fn monitor(&self, command: &str) {
        let answer = monitor_command(&self.monitor, command).unwrap();
        assert_eq!(answer, "", "QEMU refused {command}");
    }
}

fn random_image(path: &Path, bytes: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; bytes as usize];
    fastrand::Rng::with_seed(seed).fill(&mut data);
    fs::write(path, &data).unwrap();
    data
}

/// Writes and reads back the whole volume over the tap network; returns the data.
fn copy_in_and_out(served: &mut TapAppliance, seed: u64) -> Vec<u8> {
    let source = served.file("source.img");
    let data = random_image(&source, VOLUME, seed);
    served.write(&source);
    assert!(
        served.read() == data,
        "the volume reads back different data"
    );
    data
}

fn nbd_over_tap(nic: Nic, driver: &str, test: &str) {
    let Some(mut served) = boot(nic, test) else {
        return;
    };
    let listed = served
        .network
        .run("nbdinfo", &["--list", &served.network.nbd_uri("")]);
    assert!(listed.contains("export=\"vol\""), "{listed}");
    let requests_before = served.net_figure("cpu:", NBD_REQUESTS_WORD);
    let interrupts_before = served.net_figure("cpu:", DISK_INTERRUPTS_WORD);
    copy_in_and_out(&mut served, 1);
    // NBD requests carry at most 32 MiB each: the copy in and out took at least
    // this many, and the appliance counted them.
    let requests = served.net_figure("cpu:", NBD_REQUESTS_WORD) - requests_before;
    assert!(
        requests >= 2 * VOLUME / (32 * MIB),
        "{requests} NBD requests"
    );
    // While requests waited for the virtio-blk disks the CPU halted, and the disks
    // woke it when they finished: the data above came through that path.
    let interrupts = served.net_figure("cpu:", DISK_INTERRUPTS_WORD) - interrupts_before;
    assert!(interrupts > 0, "no disk interrupts during the copies");
    let shown = served.appliance.console_ok("net").unwrap();
    assert!(
        shown.contains(&format!(
            "address: {}/{} (static)",
            TapNetwork::APPLIANCE,
            TapNetwork::PREFIX
        )),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("link:    {driver}, mtu 1500")),
        "{shown}"
    );
    // Both directions carried the volume.
    assert!(served.net_figure("rx:", 0) > VOLUME / 1500, "{shown}");
    assert!(served.net_figure("tx:", 0) > VOLUME / 1500, "{shown}");
}

#[test]
fn nbd_over_tap_on_virtio_net() {
    nbd_over_tap(Nic::Virtio, "virtio-net", "nbd_over_tap_on_virtio_net");
}

#[test]
fn nbd_over_tap_on_e1000e() {
    nbd_over_tap(Nic::E1000e, "e1000e", "nbd_over_tap_on_e1000e");
}

#[test]
fn checksum_offload_on_and_off_give_identical_data_on_virtio_net() {
    offload_on_and_off(Nic::Virtio, "virtio-net", "checksum_offload_on_virtio_net");
}

#[test]
fn checksum_offload_on_and_off_give_identical_data_on_e1000e() {
    offload_on_and_off(Nic::E1000e, "e1000e", "checksum_offload_on_e1000e");
}

/// Data written with offload off reads back the same with it on, and the other way
/// round (offload is on at start-up: tap offers it to virtio-net too).
fn offload_on_and_off(nic: Nic, driver: &str, test: &str) {
    let Some(mut served) = boot(nic, test) else {
        return;
    };
    let shown = served.appliance.console_ok("net").unwrap();
    assert!(
        shown.contains(&format!("link:    {driver}, mtu 1500, checksum offload on")),
        "{shown}"
    );
    let answer = served.appliance.console_ok("net offload off").unwrap();
    assert_eq!(answer, format!("{driver}: mtu 1500, checksum offload off"));
    let off = copy_in_and_out(&mut served, 2);
    served.appliance.console_ok("net offload on").unwrap();
    assert!(served.read() == off, "offload on reads other data");
    let on = copy_in_and_out(&mut served, 3);
    served.appliance.console_ok("net offload off").unwrap();
    assert!(served.read() == on, "offload off reads other data");
}

#[test]
fn jumbo_frames_carry_the_volume_on_virtio_net() {
    jumbo_frames(Nic::Virtio, "virtio-net", "jumbo_frames_on_virtio_net");
}

#[test]
fn jumbo_frames_carry_the_volume_on_e1000e() {
    jumbo_frames(Nic::E1000e, "e1000e", "jumbo_frames_on_e1000e");
}

/// With a 9000-byte MTU at both ends, the volume arrives in jumbo frames.
fn jumbo_frames(nic: Nic, driver: &str, test: &str) {
    let Some(mut served) = boot(nic, test) else {
        return;
    };
    served.network.set_mtu(9000).unwrap();
    let answer = served.appliance.console_ok("net mtu 9000").unwrap();
    assert_eq!(answer, format!("{driver}: mtu 9000, checksum offload on"));
    let packets = served.net_figure("rx:", 0);
    copy_in_and_out(&mut served, 4);
    // The write arrived in frames far above the standard 1514 bytes.
    let shown = served.appliance.console_ok("net").unwrap();
    let received = served.net_figure("rx:", 0) - packets;
    assert!(
        received < VOLUME / 4000,
        "{received} frames for {VOLUME} bytes: not jumbo\n{shown}"
    );
}

#[test]
fn a_copy_survives_the_link_going_down_and_up() {
    let Some(mut served) = boot(Nic::E1000e, "a_copy_survives_the_link_going_down_and_up") else {
        return;
    };
    let source = served.file("source.img");
    let data = random_image(&source, VOLUME, 5);
    let mut copy = served.start_write(&source);
    std::thread::sleep(Duration::from_millis(500));
    served.monitor("set_link n0 off");
    std::thread::sleep(Duration::from_secs(1));
    let shown = served.appliance.console_ok("net").unwrap();
    assert!(shown.contains("link down"), "{shown}");
    std::thread::sleep(Duration::from_secs(2));
    served.monitor("set_link n0 on");
    // The NIC negotiates the link again before reporting it up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let shown = served.appliance.console_ok("net").unwrap();
        if shown.contains("link up") {
            break;
        }
        assert!(Instant::now() < deadline, "{shown}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // TCP carries the copy over the gap; should the client have given up, it
    // connects again and copies once more.
    if !copy.wait().unwrap().success() {
        served.wait_until_served();
        served.write(&source);
    }
    assert!(
        served.read() == data,
        "the volume reads back different data"
    );
}

/// The e1000e's transmitter stops under a copy (`net stall-tx` disables it, as a hung
/// ring would be; QEMU finishes transmit descriptors whatever the link's state, so
/// nothing outside the machine can stall the ring): the driver's watchdog resets
/// the rings, `net` counts the reset, and the copy completes, over the same
/// connection or, should the client have given up, a new one.
#[test]
fn a_stalled_transmit_ring_is_reset_and_the_copy_completes() {
    let Some(mut served) = boot(
        Nic::E1000e,
        "a_stalled_transmit_ring_is_reset_and_the_copy_completes",
    ) else {
        return;
    };
    // `nic:     0 missed (no buffer), 0 send drops, 0 ring resets`
    let resets = |served: &mut TapAppliance| served.net_figure("nic:", 7);
    let before = resets(&mut served);
    let source = served.file("source.img");
    let data = random_image(&source, VOLUME, 6);
    let mut copy = served.start_write(&source);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        served.appliance.console_ok("net stall-tx").unwrap(),
        "e1000e: transmitter stopped; the watchdog resets the rings once frames wait 2 s"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while resets(&mut served) == before {
        assert!(
            Instant::now() < deadline,
            "no ring reset after the stall: {}",
            served.appliance.console_ok("net").unwrap()
        );
        // A copy that ended before the transmitter stopped left no frame waiting:
        // the next one queues frames on the stopped ring.
        if copy.try_wait().unwrap().is_some() {
            copy = served.start_write(&source);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !copy.wait().unwrap().success() {
        served.wait_until_served();
        served.write(&source);
    }
    assert!(
        served.read() == data,
        "the volume reads back different data"
    );
    assert_eq!(resets(&mut served), before + 1);
}
