//! `--network`: what the appliance's network path does, next to its disks' own
//! speed. For each NIC (virtio-net, e1000e) on QEMU's user network and on a tap
//! interface in a private namespace (root only; otherwise those rows are skipped
//! with the reason) with the standard MTU and with jumbo frames, one boot each:
//! `disk-test` on the data disk first, then the thin volume measured with the main
//! bench's clients (run inside the namespace on tap).

use std::path::Path;
use std::time::Duration;

use host_tools::Tool;
use qemu_test::{Appliance, Nic, Options, Scratch, TapNetwork, wait_for_greeting};

use crate::{
    Client, EXPORT_BYTES, Figures, METADATA_BYTES, MIB, POOL_DATA_BYTES, Result, measure,
    thin_pool_commands, write_random,
};

/// The tap rows' MTUs: Ethernet's own, and jumbo frames.
pub(crate) const STANDARD_MTU: usize = 1500;
pub(crate) const JUMBO_MTU: usize = 9000;

/// One target's figures and its data disk's `disk-test` bandwidth (MiB/s).
struct Row {
    name: String,
    disk_write: f64,
    disk_read: f64,
    figures: Figures,
}

pub fn bench(seconds: u32) -> Result<()> {
    host_tools::require(&[Tool::Qemu, Tool::NbdCopy, Tool::Fio, Tool::NbdSh])
        .map_err(|missing| format!("missing tools: {}", missing.install_command()))?;
    let scratch = Scratch::new().map_err(|e| format!("scratch directory: {e}"))?;
    let source = scratch.path().join("random.img");
    write_random(&source, EXPORT_BYTES)?;
    let mut rows = Vec::new();
    for nic in [Nic::Virtio, Nic::E1000e] {
        for mtu in [None, Some(STANDARD_MTU), Some(JUMBO_MTU)] {
            let network = match mtu {
                None => None,
                Some(_) => match TapNetwork::create() {
                    Ok(network) => Some(network),
                    Err(why) => {
                        eprintln!("bench: {nic} over tap skipped: {why}");
                        continue;
                    }
                },
            };
            let tap = network.zip(mtu);
            rows.push(target(&scratch, &source, nic, tap, seconds)?);
        }
    }
    println!();
    println!(
        "{:<22} {:>11} {:>11} {:>16} {:>17} {:>21} {:>16} {:>15}",
        "target",
        "write MB/s",
        "read MB/s",
        "4k randread IOPS",
        "4k randwrite IOPS",
        "4k FUA randwrite IOPS",
        "disk write MiB/s",
        "disk read MiB/s"
    );
    for row in &rows {
        let figures = &row.figures;
        println!(
            "{:<22} {:>11.1} {:>11.1} {:>16.0} {:>17.0} {:>21.0} {:>16.1} {:>15.1}",
            row.name,
            figures.write_mb_s,
            figures.read_mb_s,
            figures.randread_iops,
            figures.randwrite_iops,
            figures.fua_randwrite_iops,
            row.disk_write,
            row.disk_read
        );
    }
    Ok(())
}

/// Boots on `nic` (over the tap network with its MTU if given, else the user
/// network), runs `disk-test` on the data disk and measures the thin volume.
fn target(
    scratch: &Scratch,
    source: &Path,
    nic: Nic,
    tap: Option<(TapNetwork, usize)>,
    seconds: u32,
) -> Result<Row> {
    let name = match tap {
        Some((_, STANDARD_MTU)) => format!("{nic}, tap"),
        Some((_, mtu)) => format!("{nic}, tap, MTU {mtu}"),
        None => format!("{nic}, user network"),
    };
    let (mut network, mtu) = tap.unzip();
    let mut appliance = boot(scratch, nic, network.as_ref(), None)?;
    let test = format!("disk-test vdb {} --force", EXPORT_BYTES / MIB);
    let tested = appliance
        .console_with_timeout(&test, Duration::from_secs(600))
        .map_err(|e| format!("{test}: {e:?}"))?;
    let (disk_write, disk_read) = disk_rates(&tested)?;
    let (client, uri) = serve(&mut appliance, network.as_mut())?;
    if let (Client::Namespace(network), Some(mtu @ JUMBO_MTU)) = (client, mtu) {
        set_mtu(&mut appliance, network, mtu)?;
    }
    let figures = measure(client, &name, &uri, source, seconds)?;
    appliance
        .shutdown()
        .map_err(|e| format!("shutdown: {e:?}"))?;
    Ok(Row {
        name,
        disk_write,
        disk_read,
        figures,
    })
}

/// Boots on `nic` with fresh pool disks, over `network` if given (else the user
/// network with the NBD forward), with QEMU's monitor on `monitor` if given.
pub(crate) fn boot(
    scratch: &Scratch,
    nic: Nic,
    network: Option<&TapNetwork>,
    monitor: Option<&Path>,
) -> Result<Appliance> {
    let disk = |file: &str, bytes: u64| {
        let path = scratch.path().join(file);
        let _ = std::fs::remove_file(&path);
        scratch
            .disk(file, bytes)
            .map_err(|e| format!("creating {file}: {e}"))
    };
    let metadata = disk("metadata.img", METADATA_BYTES)?;
    let data = disk("data.img", POOL_DATA_BYTES)?;
    let mut options = Options::bios()
        .memory_mib(1024)
        .nic(nic)
        .disk(&metadata)
        .disk(&data);
    options = match network {
        Some(network) => options.tap(network.interface()),
        None => options.nbd(),
    };
    if let Some(monitor) = monitor {
        options = options.monitor(monitor);
    }
    Appliance::boot(options).map_err(|e| format!("boot: {e:?}"))
}

/// Puts the appliance on `network` (moved into its namespace, a static address) or
/// waits for it on the user network, then creates the pool and its thin volume;
/// returns where clients run and the volume's URI.
pub(crate) fn serve<'a>(
    appliance: &mut Appliance,
    network: Option<&'a mut TapNetwork>,
) -> Result<(Client<'a>, String)> {
    let served = match network {
        Some(network) => {
            network.enter()?;
            let address = format!("{}/{}", TapNetwork::APPLIANCE, TapNetwork::PREFIX);
            let set = format!("net set {address} {}", TapNetwork::HOST);
            appliance
                .console_ok(&set)
                .map_err(|e| format!("{set}: {e:?}"))?;
            let uri = network.nbd_uri("thin");
            (Client::Namespace(network), uri)
        }
        None => {
            let port = appliance.nbd_port().expect("booted with a forward");
            wait_for_greeting(port, Duration::from_secs(60))?;
            (Client::Host, format!("nbd://127.0.0.1:{port}/thin"))
        }
    };
    for command in thin_pool_commands() {
        appliance
            .console_ok(&command)
            .map_err(|e| format!("{command}: {e:?}"))?;
    }
    Ok(served)
}

/// Sets both ends of the tap link, the host's and the appliance's, to `mtu`.
pub(crate) fn set_mtu(appliance: &mut Appliance, network: &TapNetwork, mtu: usize) -> Result<()> {
    network.set_mtu(mtu)?;
    let set = format!("net mtu {mtu}");
    appliance
        .console_ok(&set)
        .map(drop)
        .map_err(|e| format!("{set}: {e:?}"))
}

/// The write and read MiB/s of a `disk-test` report (`... flushed in 0.2 s
/// (289.15 MiB/s), read back in 0.3 s (236.93 MiB/s), ...`).
pub fn disk_rates(report: &str) -> Result<(f64, f64)> {
    let rates: Vec<f64> = report
        .split('(')
        .skip(1)
        .filter_map(|part| part.split_once(" MiB/s)"))
        .filter_map(|(rate, _)| rate.parse().ok())
        .collect();
    match rates[..] {
        [write, read] => Ok((write, read)),
        _ => Err(format!("unexpected disk-test report: {report}")),
    }
}
