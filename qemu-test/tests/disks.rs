//! Disks under the real kernel: virtio-blk and NVMe found in PCI order with their
//! sizes and identities, `disk-test` passing on each with several requests in
//! flight, the data reaching the image files, and refusals that protect data; a
//! pool on NVMe disks whose controllers wake the halted CPU.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use host_tools::Tool;
use qemu_test::{
    Appliance, DISK_INTERRUPTS_WORD, Options, Scratch, net_figure, qemu_img_read, run_tool,
    wait_for_greeting,
};

const MIB: u64 = 1 << 20;

/// `disks` rows as (name, sectors, rest of the line).
fn disk_rows(listing: &str) -> Vec<(String, u64, String)> {
    listing
        .lines()
        .map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next().unwrap().to_string();
            let sectors = words.next().unwrap().parse().unwrap();
            assert_eq!(words.next(), Some("sectors"), "{line}");
            (name, sectors, words.collect::<Vec<_>>().join(" "))
        })
        .collect()
}

/// Runs `disk-test`, checks it passed, prints its report and returns the peak
/// number of requests it had in flight.
fn disk_test(appliance: &mut Appliance, disk: &str, mib: u64) -> u32 {
    let output = appliance
        .console_ok(&format!("disk-test {disk} {mib}"))
        .unwrap();
    let report = output.lines().last().unwrap();
    eprintln!("{report}");
    let bare = disk.trim_start_matches("/dev/");
    assert!(
        report.starts_with(&format!(
            "disk-test {bare}: OK, {mib} MiB written and flushed"
        )),
        "{output}"
    );
    let peak = report
        .split("up to ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap();
    peak.parse().unwrap()
}

/// Whether every 4 KiB block of `range` in the image holds some non-zero byte
/// (`true`) or every byte is zero (`false`); panics on a mix.
fn written(image: &Path, range: std::ops::Range<u64>) -> bool {
    let file = File::open(image).unwrap();
    let mut block = vec![0u8; 4096];
    let mut seen = None;
    for offset in range.step_by(4096) {
        file.read_exact_at(&mut block, offset).unwrap();
        let data = block.iter().any(|&b| b != 0);
        assert_eq!(
            *seen.get_or_insert(data),
            data,
            "{}: mixed data at {offset}",
            image.display()
        );
    }
    seen.unwrap()
}

#[test]
fn virtio_and_nvme_disks_are_listed_tested_and_written() {
    let scratch = Scratch::new().unwrap();
    let vda = scratch.disk("vda.img", 64 * MIB).unwrap();
    let vdb = scratch.disk("vdb.img", 40 * MIB).unwrap();
    let nvme0 = scratch.disk("nvme0.img", 96 * MIB).unwrap();
    let nvme1 = scratch.disk("nvme1.img", 32 * MIB).unwrap();
    File::options()
        .write(true)
        .open(&vdb)
        .unwrap()
        .write_all_at(b"precious", 0)
        .unwrap();

    let options = Options::bios()
        .disk(&vda)
        .disk(&vdb)
        .nvme(&nvme0)
        .nvme(&nvme1);
    let mut appliance = Appliance::boot(options).unwrap();
    let rows = disk_rows(&appliance.console_ok("disks").unwrap());
    let serial = |disk: &Path| qemu_test::disk_serial(disk);
    let expected = [
        (
            "vda",
            64 * MIB / 512,
            format!("64.00 MiB virtio-blk {}", serial(&vda)),
        ),
        (
            "vdb",
            40 * MIB / 512,
            format!("40.00 MiB virtio-blk {}", serial(&vdb)),
        ),
        (
            "nvme0n1",
            96 * MIB / 512,
            format!("96.00 MiB QEMU NVMe Ctrl {}", serial(&nvme0)),
        ),
        (
            "nvme1n1",
            32 * MIB / 512,
            format!("32.00 MiB QEMU NVMe Ctrl {}", serial(&nvme1)),
        ),
    ];
    assert_eq!(rows.len(), expected.len(), "{rows:?}");
    for ((name, sectors, rest), (want_name, want_sectors, want_rest)) in rows.iter().zip(expected) {
        assert_eq!(
            (name.as_str(), *sectors, rest.as_str()),
            (want_name, want_sectors, want_rest.as_str())
        );
    }

    assert!(disk_test(&mut appliance, "vda", 32) > 1);
    assert!(disk_test(&mut appliance, "/dev/nvme0n1", 64) > 1);
    assert!(disk_test(&mut appliance, "nvme1n1", 32) > 1);

    let refused = appliance.console("disk-test vdb 8").unwrap();
    assert_eq!(
        refused,
        "error: disk-test: vdb holds data (non-zero bytes in sector 0) that the test would \
         overwrite; add --force to test it anyway"
    );
    let again = appliance.console("disk-test vda 1").unwrap();
    assert!(
        again.starts_with("error: disk-test: vda holds data"),
        "{again}"
    );
    assert_eq!(
        appliance.console("disk-test nvme1n1 33").unwrap(),
        "error: disk-test: nvme1n1 holds only 32.00 MiB; choose at most 32 MiB"
    );
    assert_eq!(appliance.shutdown().unwrap(), "powering off");

    // virtio-blk keeps the flushed pattern; NVMe discarded its range afterwards.
    assert!(written(&vda, 0..32 * MIB));
    assert!(!written(&vda, 32 * MIB..64 * MIB));
    assert!(!written(&nvme0, 0..96 * MIB));
    let mut kept = [0u8; 8];
    File::open(&vdb)
        .unwrap()
        .read_exact_at(&mut kept, 0)
        .unwrap();
    assert_eq!(&kept, b"precious");
}

/// OVMF places 64-bit BARs above 4 GiB, outside the bootloader's physical-memory
/// mapping, so this also covers the kernel's own MMIO mappings.
#[test]
fn uefi_drives_both_kinds_of_disk() {
    let scratch = Scratch::new().unwrap();
    let vda = scratch.disk("vda.img", 16 * MIB).unwrap();
    let nvme0 = scratch.disk("nvme0.img", 16 * MIB).unwrap();
    let mut appliance = Appliance::boot(Options::uefi().disk(&vda).nvme(&nvme0)).unwrap();
    let names: Vec<String> = disk_rows(&appliance.console_ok("disks").unwrap())
        .into_iter()
        .map(|(name, ..)| name)
        .collect();
    assert_eq!(names, ["vda", "nvme0n1"]);
    assert!(disk_test(&mut appliance, "vda", 8) > 1);
    assert!(disk_test(&mut appliance, "nvme0n1", 8) > 1);
    assert_eq!(appliance.shutdown().unwrap(), "powering off");
    assert!(written(&vda, 0..8 * MIB));
}

/// A pool on two NVMe disks, served over NBD: while requests wait for the disks the
/// CPU halts, and the controllers wake it through MSI-X, before and after the data
/// disk's controller is reset (which creates its queues again). Each copy reads
/// back byte for byte.
#[test]
fn nvme_disks_wake_the_halted_cpu_before_and_after_a_reset() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::NbdCopy, Tool::QemuImg]);
    let scratch = Scratch::new().unwrap();
    let metadata = scratch.disk("nvme0.img", 16 * MIB).unwrap();
    let data = scratch.disk("nvme1.img", 96 * MIB).unwrap();
    let options = Options::bios().nvme(&metadata).nvme(&data).nbd();
    let mut appliance = Appliance::boot(options).unwrap();
    wait_for_greeting(appliance.nbd_port().unwrap(), Duration::from_secs(60)).unwrap();
    appliance
        .console_ok("pool create pool nvme0n1 nvme1n1")
        .unwrap();
    appliance
        .console_ok("thin create vol pool --size 64M")
        .unwrap();
    let uri = appliance.nbd_uri("vol").unwrap();
    let source = scratch.path().join("source.img");
    for round in 0..2u64 {
        if round == 1 {
            appliance.console_ok("disk-reset nvme1n1").unwrap();
        }
        let mut content = vec![0u8; 64 * MIB as usize];
        fastrand::Rng::with_seed(round).fill(&mut content);
        std::fs::write(&source, &content).unwrap();
        let before = net_figure(&mut appliance, "cpu:", DISK_INTERRUPTS_WORD);
        run_tool("nbdcopy", &["--flush", &source.display().to_string(), &uri]);
        let interrupts = net_figure(&mut appliance, "cpu:", DISK_INTERRUPTS_WORD) - before;
        assert!(
            interrupts > 0,
            "round {round}: no disk interrupts during the copy"
        );
        let read_back = qemu_img_read(&uri, &scratch.path().join("vol.img"));
        assert!(read_back == content, "round {round}: the volume differs");
    }
    assert_eq!(appliance.shutdown().unwrap(), "powering off");
}
