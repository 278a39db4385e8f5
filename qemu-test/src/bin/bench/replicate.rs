//! `bench --replicate`: what imports and syncs cost.
//!
//! - `thin import` of a 512 MiB qcow2 image holding 320 MiB of data from `qemu-nbd`,
//!   against `nbdcopy` from the same server into a thin volume of the same kind of
//!   pool: in offline mode (pools on image files) and on the appliance (the server
//!   reached at 10.0.2.2 through QEMU's user network). The server takes
//!   [`CONNECTIONS`] clients at a time, so it offers `NBD_FLAG_CAN_MULTI_CONN` and
//!   both copies read over several connections. Each pair runs back to back and
//!   prints the machine's load average with it.
//! - An incremental sync between two offline instances after 1 % of a 1 GiB volume
//!   changed, once in whole 64 KiB pool blocks and once in scattered 4 KiB pages:
//!   bytes that crossed the wire (counted by a relay) against the bytes changed and
//!   the changed pool blocks, and the time against the full copy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use host_tools::Tool;
use qemu_test::{
    Appliance, CountingRelay, HostServer, Options, Scratch, run_nbdsh, wait_for_greeting,
};

use crate::{Client, MIB, Result, build_thinbox, output_of, timed, write_random};

const IMAGE_BYTES: u64 = 512 * MIB;
/// Of every 8 MiB of the image, the first 5 hold data.
const IMAGE_DATA_BYTES: u64 = IMAGE_BYTES / 8 * 5;
const VOLUME_BYTES: u64 = 1024 * MIB;
const BLOCK: u64 = 64 << 10;
const SETUP: [&str; 2] = ["config init vda", "pool create pool vdb vdc"];
/// Connections `qemu-nbd` accepts at once (`nbdcopy` opens four).
const CONNECTIONS: u32 = 4;
/// Offline runs of each copy.
const RUNS: usize = 3;
/// Runs of each copy on the appliance (one boot).
const APPLIANCE_RUNS: usize = 2;

pub fn bench() -> Result<()> {
    host_tools::require(&[
        Tool::Qemu,
        Tool::QemuImg,
        Tool::QemuNbd,
        Tool::NbdCopy,
        Tool::NbdSh,
    ])
    .map_err(|missing| format!("missing tools: {}", missing.install_command()))?;
    let scratch = Scratch::new().map_err(|e| format!("scratch directory: {e}"))?;
    let thinbox = build_thinbox()?;
    let image = qcow2_image(scratch.path())?;
    let server = HostServer::qcow2_read_only(&image, CONNECTIONS)?;
    import_offline(&thinbox, scratch.path(), &server)?;
    sync_offline(&thinbox, scratch.path())?;
    import_on_appliance(scratch.path(), &server)
}

/// Configuration, metadata and data images of one offline instance.
fn instance(dir: &Path, tag: &str, data_bytes: u64) -> Result<Vec<PathBuf>> {
    [("cfg", 8 * MIB), ("meta", 64 * MIB), ("data", data_bytes)]
        .iter()
        .map(|(name, bytes)| {
            let path = dir.join(format!("{tag}-{name}.img"));
            let _ = std::fs::remove_file(&path);
            qemu_test::create_disk(&path, *bytes).map_err(|e| format!("{name}: {e}"))?;
            Ok(path)
        })
        .collect()
}

/// Runs `thinbox offline` on `disks` with `commands`; returns its transcript.
fn offline(thinbox: &Path, disks: &[PathBuf], commands: &[&str]) -> Result<String> {
    let mut command = Command::new(thinbox);
    command.arg("offline");
    for disk in disks {
        command.arg("--disk").arg(disk);
    }
    for line in commands {
        command.args(["--exec", line]);
    }
    output_of(command, "thinbox offline")
}

fn serve(thinbox: &Path, disks: &[PathBuf], commands: &[String]) -> Result<HostServer> {
    let paths: Vec<&Path> = disks.iter().map(PathBuf::as_path).collect();
    HostServer::offline(thinbox, &paths, commands)
}

/// The seconds and bytes an import or sync summary reports ("... in 3.050 s: 320.00
/// MiB copied ...").
fn summary(transcript: &str) -> Result<(f64, String)> {
    let line = transcript
        .lines()
        .find(|line| line.contains(" copied ("))
        .ok_or_else(|| format!("no summary in: {transcript}"))?;
    let seconds = line
        .split(" in ")
        .nth(1)
        .and_then(|rest| rest.split(" s: ").next())
        .and_then(|seconds| seconds.parse().ok())
        .ok_or_else(|| format!("no time in: {line}"))?;
    let copied = line
        .split(" s: ")
        .nth(1)
        .and_then(|rest| rest.split(" copied").next())
        .unwrap_or_default();
    Ok((seconds, copied.to_string()))
}

fn mib_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / MIB as f64 / seconds
}

/// A qcow2 image of [`IMAGE_BYTES`] whose data is [`IMAGE_DATA_BYTES`] of random bytes.
fn qcow2_image(dir: &Path) -> Result<PathBuf> {
    let random = dir.join("random.raw");
    write_random(&random, IMAGE_DATA_BYTES)?;
    let raw = dir.join("image.raw");
    let output = dir.join("image.qcow2");
    qemu_test::create_disk(&raw, IMAGE_BYTES).map_err(|e| format!("image: {e}"))?;
    let random = random.display().to_string();
    let raw_path = raw.display().to_string();
    for chunk in 0..IMAGE_BYTES / (8 * MIB) {
        let (from, to) = (chunk * 5, chunk * 8);
        let (skip, seek) = (format!("skip={from}"), format!("seek={to}"));
        let (input, out) = (format!("if={random}"), format!("of={raw_path}"));
        timed(
            Client::Host,
            &[
                "dd",
                &input,
                &out,
                "bs=1M",
                "count=5",
                &skip,
                &seek,
                "conv=notrunc",
                "status=none",
            ],
        )?;
    }
    timed(
        Client::Host,
        &[
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &raw_path,
            &output.display().to_string(),
        ],
    )?;
    Ok(output)
}

fn import_offline(thinbox: &Path, dir: &Path, server: &HostServer) -> Result<()> {
    let source = server.uri("disk");
    let import = format!("thin import vm pool --from {source}");
    let create = format!("thin create vol pool --size {}M", IMAGE_BYTES / MIB);
    let mut imports = Vec::new();
    let mut copies = Vec::new();
    for run in 0..RUNS {
        let load = load_average();
        let disks = instance(dir, &format!("import{run}"), 1024 * MIB)?;
        let transcript = offline(thinbox, &disks, &[SETUP[0], SETUP[1], &import])?;
        let import = summary(&transcript)?.0;
        imports.push(import);
        let disks = instance(dir, &format!("nbdcopy{run}"), 1024 * MIB)?;
        let commands = [SETUP[0].to_string(), SETUP[1].to_string(), create.clone()];
        let target = serve(thinbox, &disks, &commands)?;
        let took = timed(
            Client::Host,
            &["nbdcopy", "--flush", &source, &target.uri("vol")],
        )?
        .as_secs_f64();
        copies.push(took);
        println!(
            "offline run {run} (load average {load} before, {} after): thin import {import:.2} s, \
             nbdcopy {took:.2} s, import / nbdcopy {:.2}",
            load_average(),
            took / import
        );
    }
    let import = imports.iter().copied().fold(f64::MAX, f64::min);
    let copy = copies.iter().copied().fold(f64::MAX, f64::min);
    println!(
        "offline import of {} MiB ({} MiB data) from qemu-nbd: thin import {imports:.2?} s, \
         nbdcopy into a served thin volume {copies:.2?} s",
        IMAGE_BYTES / MIB,
        IMAGE_DATA_BYTES / MIB
    );
    println!(
        "offline: thin import {import:.2} s ({:.1} MiB/s of data), nbdcopy {copy:.2} s ({:.1} MiB/s), \
         import / nbdcopy {:.2}",
        mib_s(IMAGE_DATA_BYTES, import),
        mib_s(IMAGE_DATA_BYTES, copy),
        copy / import
    );
    Ok(())
}

/// Writes `count` distinct random pieces of `piece` bytes, aligned to their size, to
/// the volume at `uri`; returns how many pool blocks they touched.
fn change(uri: &str, count: u64, piece: u64, seed: u64) -> Result<u64> {
    let script = format!(
        "import random\n\
         rng = random.Random({seed})\n\
         pieces = rng.sample(range({VOLUME_BYTES} // {piece}), {count})\n\
         for p in pieces:\n    h.pwrite(rng.randbytes({piece}), p * {piece})\n\
         h.flush()\n\
         print(len({{p * {piece} // {BLOCK} for p in pieces}}))\n"
    );
    run_nbdsh(uri, &script)
        .trim()
        .parse()
        .map_err(|e| format!("nbdsh: {e}"))
}

fn sync_offline(thinbox: &Path, dir: &Path) -> Result<()> {
    let source = instance(dir, "source", VOLUME_BYTES + 512 * MIB)?;
    let replica = instance(dir, "replica", VOLUME_BYTES + 512 * MIB)?;
    offline(thinbox, &replica, &SETUP)?;
    let create = format!("thin create vol pool --size {}M", VOLUME_BYTES / MIB);
    let commands = [SETUP[0].to_string(), SETUP[1].to_string(), create];
    let random = dir.join("volume.raw");
    write_random(&random, VOLUME_BYTES)?;
    let server = serve(thinbox, &source, &commands)?;
    timed(
        Client::Host,
        &[
            "nbdcopy",
            "--flush",
            &random.display().to_string(),
            &server.uri("vol"),
        ],
    )?;
    drop(server);

    let snapshot = |name: &str| serve(thinbox, &source, &[format!("snap create {name} vol")]);
    let server = snapshot("s1")?;
    let relay = CountingRelay::start(server.port()).map_err(|e| format!("relay: {e}"))?;
    let from = format!("nbd://127.0.0.1:{}", relay.port());
    let transcript = offline(
        thinbox,
        &replica,
        &[&format!("thin import replica pool --from {from}/s1")],
    )?;
    let (full, _) = summary(&transcript)?;
    let full_wire = relay.from_server();
    println!("sync: full import of the 1 GiB volume {full:.2} s, {full_wire} bytes over the wire");
    println!(
        "| changed (1 % of 1 GiB) | changed blocks | bytes over the wire | wire / changed | \
         wire / changed blocks | sync time | sync / full copy |"
    );
    let pages = VOLUME_BYTES / 100 / 4096;
    let cases = [
        ("in 64 KiB blocks", VOLUME_BYTES / 100 / BLOCK, BLOCK),
        ("in 4 KiB pages", pages, 4096),
    ];
    drop(server);
    for (index, (what, count, piece)) in cases.into_iter().enumerate() {
        let (base, name) = (format!("s{}", index + 1), format!("s{}", index + 2));
        let server = serve(thinbox, &source, &[])?;
        let blocks = change(&server.uri("vol"), count, piece, index as u64)?;
        drop(server);
        let server = snapshot(&name)?;
        let relay = CountingRelay::start(server.port()).map_err(|e| format!("relay: {e}"))?;
        let uri = format!("nbd://127.0.0.1:{}/{name}", relay.port());
        let transcript = offline(
            thinbox,
            &replica,
            &[&format!(
                "thin sync replica --from {uri} --changed-since {base}"
            )],
        )?;
        let (seconds, copied) = summary(&transcript)?;
        let wire = relay.from_server();
        let changed = count * piece;
        println!(
            "| {what}: {changed} bytes | {blocks} ({} bytes; sync copied {copied}) | {wire} | \
             {:.3} | {:.3} | {seconds:.3} s | {:.4} |",
            blocks * BLOCK,
            wire as f64 / changed as f64,
            wire as f64 / (blocks * BLOCK) as f64,
            seconds / full
        );
    }
    Ok(())
}

/// The machine's load average over the last minute, as `/proc/loadavg` says.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| String::from("?"))
}

fn import_on_appliance(dir: &Path, server: &HostServer) -> Result<()> {
    let disk = |name: &str, bytes: u64| {
        let path = dir.join(name);
        qemu_test::create_disk(&path, bytes).map_err(|e| format!("{name}: {e}"))?;
        Ok::<PathBuf, String>(path)
    };
    let options = Options::bios()
        .memory_mib(1024)
        .disk(disk("appliance-cfg.img", 8 * MIB)?)
        .disk(disk("appliance-meta.img", 64 * MIB)?)
        .disk(disk("appliance-data.img", 1024 * MIB)?)
        .nbd();
    let mut appliance = Appliance::boot(options).map_err(|e| format!("boot: {e:?}"))?;
    let port = appliance.nbd_port().expect("booted with a forward");
    wait_for_greeting(port, Duration::from_secs(60))?;
    for command in SETUP {
        appliance
            .console_ok(command)
            .map_err(|e| format!("{command}: {e:?}"))?;
    }
    let from = format!("nbd://10.0.2.2:{}/disk", server.port());
    for run in 0..APPLIANCE_RUNS {
        let load = load_average();
        let transcript = appliance
            .console_with_timeout(
                &format!("thin import vm pool --from {from}"),
                Duration::from_secs(900),
            )
            .map_err(|e| format!("thin import: {e:?}"))?;
        let (import, _) = summary(&transcript)?;
        appliance
            .console_ok(&format!(
                "thin create vol pool --size {}M",
                IMAGE_BYTES / MIB
            ))
            .map_err(|e| format!("thin create: {e:?}"))?;
        let target = appliance.nbd_uri("vol").expect("booted with a forward");
        let copy = timed(
            Client::Host,
            &["nbdcopy", "--flush", &server.uri("disk"), &target],
        )?
        .as_secs_f64();
        println!(
            "appliance run {run} (load average {load} before, {} after): thin import \
             {import:.2} s ({:.1} MiB/s of data), nbdcopy from the same server into a thin \
             volume {copy:.2} s ({:.1} MiB/s), import / nbdcopy {:.2}",
            load_average(),
            mib_s(IMAGE_DATA_BYTES, import),
            mib_s(IMAGE_DATA_BYTES, copy),
            copy / import
        );
        // The data disk holds one pair of copies: make room for the next.
        for device in ["vm", "vol"] {
            appliance
                .console_ok(&format!("thin delete {device}"))
                .map_err(|e| format!("thin delete {device}: {e:?}"))?;
        }
    }
    appliance
        .shutdown()
        .map_err(|e| format!("shutdown: {e:?}"))?;
    Ok(())
}
