//! `bench --delete`: 4 KiB random reads at queue depth 16 on one thin volume while
//! the same pool deletes a device with millions of mappings in the background,
//! against the same reads with no delete running, on the appliance and with `thinbox
//! offline`. The pool's metadata is made by `thin_restore` (writing the data would
//! take hours); the data disk is a sparse file.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use host_tools::Tool;
use qemu_test::{Appliance, HostServer, Options, Scratch, wait_for_greeting};

use crate::{BLOCK_SECTORS, Client, EXPORT_BYTES, MIB, Result, SECTOR, build_thinbox, fio_iops};

/// Mappings of the device that is deleted.
const MAPPINGS: u64 = 8 << 20;
const METADATA_BYTES: u64 = 512 * MIB;

/// Pool data blocks: the deleted device's plus room for the volume that is read.
fn data_blocks() -> u64 {
    MAPPINGS + EXPORT_BYTES / (BLOCK_SECTORS * SECTOR)
}

/// Metadata with thin device 0 mapping [`MAPPINGS`] blocks, and a sparse data disk.
fn pool_images(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let xml = dir.join("pool.xml");
    fs::write(
        &xml,
        format!(
            "<superblock uuid=\"\" time=\"0\" transaction=\"1\" flags=\"0\" version=\"2\" \
             data_block_size=\"{BLOCK_SECTORS}\" nr_data_blocks=\"{blocks}\">\n\
             <device dev_id=\"0\" mapped_blocks=\"{MAPPINGS}\" transaction=\"0\" \
             creation_time=\"0\" snap_time=\"0\">\n\
             <range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"{MAPPINGS}\" \
             time=\"0\"/>\n</device>\n</superblock>\n",
            blocks = data_blocks()
        ),
    )
    .map_err(|e| format!("{}: {e}", xml.display()))?;
    let metadata = dir.join("delete-metadata.img");
    let data = dir.join("delete-data.img");
    qemu_test::create_disk(&metadata, METADATA_BYTES).map_err(|e| format!("metadata: {e}"))?;
    qemu_test::create_disk(&data, data_blocks() * BLOCK_SECTORS * SECTOR)
        .map_err(|e| format!("data: {e}"))?;
    eprintln!("delete: thin_restore of {MAPPINGS} mappings");
    thin_restore(&xml, &metadata)?;
    Ok((metadata, data))
}

/// Writes the pool that `xml` (`thin_dump`'s format) describes to `metadata`.
pub fn thin_restore(xml: &Path, metadata: &Path) -> Result<()> {
    let restored = Command::new("thin_restore")
        .arg("-i")
        .arg(xml)
        .arg("-o")
        .arg(metadata)
        .output()
        .map_err(|e| format!("thin_restore: {e}"))?;
    if !restored.status.success() {
        return Err(format!(
            "thin_restore failed: {}",
            String::from_utf8_lossy(&restored.stderr)
        ));
    }
    Ok(())
}

/// The pool on `vda`/`vdb`, its big device 0 as `big`, and a thin volume `vol`.
fn pool_commands() -> Vec<String> {
    vec![
        format!(
            "create pool --table \"0 {} thin-pool vda vdb {BLOCK_SECTORS} 0\"",
            data_blocks() * BLOCK_SECTORS
        ),
        format!(
            "create big --table \"0 {} thin pool 0\"",
            MAPPINGS * BLOCK_SECTORS
        ),
        format!("thin create vol pool --size {}M", EXPORT_BYTES / MIB),
    ]
}

/// Random-read IOPS of `vol`: alone, and while `big` is deleted.
struct Figures {
    idle: f64,
    deleting: f64,
}

fn appliance(metadata: &Path, data: &Path, seconds: u32) -> Result<Figures> {
    let options = Options::bios()
        .memory_mib(1024)
        .disk(metadata)
        .disk(data)
        .nbd();
    let mut appliance = Appliance::boot(options).map_err(|e| format!("boot: {e:?}"))?;
    let port = appliance.nbd_port().expect("booted with a forward");
    wait_for_greeting(port, Duration::from_secs(60))?;
    for command in pool_commands() {
        appliance
            .console_ok(&command)
            .map_err(|e| format!("{command}: {e:?}"))?;
    }
    let uri = format!("nbd://127.0.0.1:{port}/vol");
    eprintln!("delete: appliance, reads alone");
    let idle = fio_iops(Client::Host, &uri, "randread", seconds)?;
    appliance
        .console_ok("thin delete big --background")
        .map_err(|e| format!("thin delete: {e:?}"))?;
    eprintln!("delete: appliance, reads during the delete");
    let deleting = fio_iops(Client::Host, &uri, "randread", seconds)?;
    let jobs = appliance
        .console_ok("jobs")
        .map_err(|e| format!("jobs: {e:?}"))?;
    eprintln!("delete: after the reads: {}", jobs.trim());
    appliance.kill();
    Ok(Figures { idle, deleting })
}

fn offline(metadata: &Path, data: &Path, seconds: u32) -> Result<Figures> {
    let thinbox = build_thinbox()?;
    let disks = [metadata, data];
    let mut figures = Figures {
        idle: 0.0,
        deleting: 0.0,
    };
    for deleting in [false, true] {
        let mut commands = pool_commands();
        if deleting {
            commands.push("thin delete big --background".into());
        }
        let server = HostServer::offline(&thinbox, &disks, &commands)?;
        eprintln!("delete: offline, reads (delete running: {deleting})");
        let iops = fio_iops(Client::Host, &server.uri("vol"), "randread", seconds)?;
        if deleting {
            figures.deleting = iops;
        } else {
            figures.idle = iops;
        }
    }
    Ok(figures)
}

pub fn bench(seconds: u32) -> Result<()> {
    host_tools::require(&[Tool::Qemu, Tool::Fio, Tool::ThinCheck])
        .map_err(|missing| format!("missing tools: {}", missing.install_command()))?;
    let scratch = Scratch::new().map_err(|e| format!("scratch directory: {e}"))?;
    let (metadata, data) = pool_images(scratch.path())?;
    let pristine = scratch.path().join("pristine-metadata.img");
    fs::copy(&metadata, &pristine).map_err(|e| format!("copying metadata: {e}"))?;
    let host = offline(&metadata, &data, seconds)?;
    fs::copy(&pristine, &metadata).map_err(|e| format!("restoring metadata: {e}"))?;
    let booted = appliance(&metadata, &data, seconds)?;
    println!();
    println!(
        "4 KiB random reads, queue depth 16, on one thin volume while the pool deletes a \
         {MAPPINGS}-mapping device"
    );
    println!(
        "{:<12} {:>12} {:>16} {:>7}",
        "target", "alone IOPS", "deleting IOPS", "ratio"
    );
    for (name, figures) in [("offline", &host), ("appliance", &booted)] {
        println!(
            "{name:<12} {:>12.0} {:>16.0} {:>7.2}",
            figures.idle,
            figures.deleting,
            figures.deleting / figures.idle
        );
    }
    Ok(())
}
