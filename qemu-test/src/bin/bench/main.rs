//! NBD benchmark: the appliance's thin export against a linear export of a raw
//! disk on the same appliance (the engine's overhead) and against `qemu-nbd`
//! serving a qcow2 overlay over a raw base image on the host (what users run
//! today), all in one run on one host. The same thin pool served by `thinbox
//! offline` on the host compares the engine with `qemu-nbd` on equal footing: both
//! native, both on loopback TCP, neither behind QEMU's emulated CPU and user network.
//!
//! For each target: `nbdcopy` copies 256 MiB of random data in and out, then `fio`
//! (nbd engine) runs 4 KiB random reads and random writes at queue depth 16, and a
//! libnbd client in `nbdsh` random 4 KiB writes with FUA at queue depth 16 (fio's
//! nbd engine cannot send FUA). The numbers and their ratios are printed; nothing is
//! asserted.
//!
//! `cargo run --release -p qemu-test --bin bench [-- --seconds N]`; with `--delete`,
//! reads while a large device is deleted instead ([`delete`]); with `--network`, the
//! appliance on each NIC over the user network and over tap instead ([`network`]);
//! with `--cow-merge`, a dm-snapshot merge and reads during it ([`cow_merge`]); with
//! `--thin-merge [--profile]`, the thin merges ([`thin_merge`]); with `--replicate`, imports against
//! `nbdcopy` and incremental syncs ([`replicate`]); with `--network --profile`, where the
//! appliance's time goes during copies over tap ([`profile`]); with `--tls`, NBD over TLS
//! against plaintext, offline and on the appliance ([`tls`]).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{
    Appliance, HostServer, Options, Scratch, TapNetwork, free_port, wait_for_greeting,
};

const MIB: u64 = 1 << 20;
/// Size of every export: copied in and out whole with nbdcopy, covered by the
/// random I/O.
const EXPORT_BYTES: u64 = 256 * MIB;
const SECTOR: u64 = 512;
/// Thin pool: metadata disk and data disk sizes.
const METADATA_BYTES: u64 = 64 * MIB;
const POOL_DATA_BYTES: u64 = 1024 * MIB;
/// Pool data block: 64 KiB (128 sectors), dm-thin's default.
const BLOCK_SECTORS: u64 = 128;

type Result<T> = std::result::Result<T, String>;

/// What one target achieved.
struct Figures {
    write_mb_s: f64,
    read_mb_s: f64,
    randread_iops: f64,
    randwrite_iops: f64,
    fua_randwrite_iops: f64,
}

mod cow_merge;
mod delete;
mod network;
mod profile;
mod replicate;
mod thin_merge;
mod tls;

/// Where the NBD clients run: on this host, or inside a tap network's namespace.
#[derive(Clone, Copy)]
enum Client<'a> {
    Host,
    Namespace(&'a TapNetwork),
}

impl Client<'_> {
    fn run(self, command: Command) -> Command {
        match self {
            Client::Host => command,
            Client::Namespace(network) => network.wrap(command),
        }
    }
}

/// Which benchmark to run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Compare,
    Delete,
    Network,
    CowMerge,
    /// `--thin-merge`, with `--profile` sampling the guest during the reads.
    ThinMerge {
        profile: bool,
    },
    Replicate,
    /// `--network --profile`
    Profile,
    Tls,
}

fn main() {
    let result = parse_args().and_then(|(seconds, mode)| match mode {
        Mode::Compare => bench(seconds),
        Mode::Delete => delete::bench(seconds),
        Mode::Network => network::bench(seconds),
        Mode::CowMerge => cow_merge::bench(seconds),
        Mode::ThinMerge { profile } => thin_merge::bench(seconds, profile),
        Mode::Replicate => replicate::bench(),
        Mode::Profile => profile::bench(),
        Mode::Tls => tls::bench(seconds),
    });
    if let Err(why) = result {
        eprintln!("bench: {why}");
        std::process::exit(1);
    }
}

fn bench(seconds: u32) -> Result<()> {
    host_tools::require(&[
        Tool::Qemu,
        Tool::QemuImg,
        Tool::QemuNbd,
        Tool::NbdCopy,
        Tool::Fio,
        Tool::NbdSh,
    ])
    .map_err(|missing| format!("missing tools: {}", missing.install_command()))?;
    let scratch = Scratch::new().map_err(|e| format!("scratch directory: {e}"))?;
    let source = scratch.path().join("random.img");
    write_random(&source, EXPORT_BYTES)?;

    let disk = |name: &str, bytes: u64| {
        scratch
            .disk(name, bytes)
            .map_err(|e| format!("creating {name}: {e}"))
    };
    let metadata = disk("metadata.img", METADATA_BYTES)?;
    let data = disk("data.img", POOL_DATA_BYTES)?;
    let raw = disk("raw.img", EXPORT_BYTES)?;
    let options = Options::bios()
        .memory_mib(1024)
        .disk(&metadata)
        .disk(&data)
        .disk(&raw)
        .nbd();
    let mut appliance = Appliance::boot(options).map_err(|e| format!("boot: {e:?}"))?;
    let port = appliance.nbd_port().expect("booted with a forward");
    wait_for_greeting(port, Duration::from_secs(60))?;
    let sectors = EXPORT_BYTES / SECTOR;
    let linear_table = format!("create linear --table \"0 {sectors} linear vdc 0\"");
    for command in thin_pool_commands().iter().chain([&linear_table]) {
        appliance
            .console_ok(command)
            .map_err(|e| format!("{command}: {e:?}"))?;
    }

    let on_host = |name: &str, uri: &str| measure(Client::Host, name, uri, &source, seconds);
    let thin = on_host("thin", &format!("nbd://127.0.0.1:{port}/thin"))?;
    let linear = on_host("linear", &format!("nbd://127.0.0.1:{port}/linear"))?;
    appliance
        .shutdown()
        .map_err(|e| format!("shutdown: {e:?}"))?;

    let offline = start_offline(scratch.path(), &[])?;
    let host_thin = on_host("offline thin", &offline.uri("thin"))?;
    drop(offline);

    let qemu_nbd = start_qemu_nbd(scratch.path())?;
    let qcow2 = on_host("qemu-nbd", &qemu_nbd.uri(""))?;
    drop(qemu_nbd);

    println!();
    Table::io_and("4k FUA randwrite IOPS", 0).print(
        &[
            ("appliance thin", thin.columns()),
            ("appliance linear", linear.columns()),
            ("offline thin (host)", host_thin.columns()),
            ("qemu-nbd qcow2 overlay", qcow2.columns()),
        ],
        &[
            ("thin / linear", thin.columns(), linear.columns()),
            ("thin / qemu-nbd", thin.columns(), qcow2.columns()),
            (
                "offline thin / qemu-nbd",
                host_thin.columns(),
                qcow2.columns(),
            ),
        ],
    );
    Ok(())
}

/// A printed table: a name column, then five right-aligned columns of figures.
struct Table {
    titles: [&'static str; 5],
    /// Decimal places of each column's figures (ratios get two).
    decimals: [usize; 5],
}

impl Table {
    /// Bulk write and read MB/s, 4 KiB random read and write IOPS, and `last`
    /// with `decimals` places.
    fn io_and(last: &'static str, decimals: usize) -> Table {
        Table {
            titles: [
                "write MB/s",
                "read MB/s",
                "4k randread IOPS",
                "4k randwrite IOPS",
                last,
            ],
            decimals: [1, 1, 0, 0, decimals],
        }
    }

    fn width(title: &str) -> usize {
        title.len().max(11)
    }

    /// Prints the header, a row per target, and a row per ratio: each column of
    /// the first figures over the same column of the second.
    fn print(&self, rows: &[(&str, [f64; 5])], ratios: &[(&str, [f64; 5], [f64; 5])]) {
        print!("{:<28}", "target");
        for title in self.titles {
            print!(" {title:>width$}", width = Table::width(title));
        }
        println!();
        for (name, figures) in rows {
            self.print_figures(name, *figures, self.decimals);
        }
        for (name, ours, base) in ratios {
            let ratios = std::array::from_fn(|column| ours[column] / base[column]);
            self.print_figures(name, ratios, [2; 5]);
        }
    }

    fn print_figures(&self, name: &str, figures: [f64; 5], decimals: [usize; 5]) {
        print!("{name:<28}");
        for ((figure, title), places) in figures.iter().zip(self.titles).zip(decimals) {
            print!(" {figure:>width$.places$}", width = Table::width(title));
        }
        println!();
    }
}

impl Figures {
    fn columns(&self) -> [f64; 5] {
        [
            self.write_mb_s,
            self.read_mb_s,
            self.randread_iops,
            self.randwrite_iops,
            self.fua_randwrite_iops,
        ]
    }
}

/// A pool on `vda` (metadata) and `vdb` (data) with thin volume `thin` (device 0) of
/// [`EXPORT_BYTES`], as console commands.
fn thin_pool_commands() -> [String; 3] {
    [
        format!(
            "create pool --table \"0 {} thin-pool vda vdb {BLOCK_SECTORS} 0\"",
            POOL_DATA_BYTES / SECTOR
        ),
        "message pool 0 \"create_thin 0\"".to_string(),
        format!(
            "create thin --table \"0 {} thin pool 0\"",
            EXPORT_BYTES / SECTOR
        ),
    ]
}

/// `[--delete|--network [--profile]|--cow-merge|--thin-merge [--profile]|--replicate|--tls] [--seconds N]`:
/// which benchmark, and fio's run time per workload.
fn parse_args() -> Result<(u32, Mode)> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mode = if args.iter().any(|arg| arg == "--delete") {
        Mode::Delete
    } else if args.iter().any(|arg| arg == "--thin-merge") {
        Mode::ThinMerge {
            profile: args.iter().any(|arg| arg == "--profile"),
        }
    } else if args.iter().any(|arg| arg == "--profile") {
        Mode::Profile
    } else if args.iter().any(|arg| arg == "--network") {
        Mode::Network
    } else if args.iter().any(|arg| arg == "--cow-merge") {
        Mode::CowMerge
    } else if args.iter().any(|arg| arg == "--replicate") {
        Mode::Replicate
    } else if args.iter().any(|arg| arg == "--tls") {
        Mode::Tls
    } else {
        Mode::Compare
    };
    args.retain(|arg| {
        ![
            "--delete",
            "--network",
            "--profile",
            "--cow-merge",
            "--thin-merge",
            "--replicate",
            "--tls",
        ]
        .contains(&arg.as_str())
    });
    let seconds = match args.as_slice() {
        [] => Ok(10),
        [flag, value] if flag == "--seconds" => value
            .parse()
            .ok()
            .filter(|&seconds| seconds > 0)
            .ok_or_else(|| format!("--seconds takes a whole number above 0, not '{value}'")),
        _ => Err(
            "usage: bench [--delete|--network [--profile]|--cow-merge|--thin-merge [--profile]|\
             --replicate|--tls] [--seconds N] (fio run time per random workload)"
                .into(),
        ),
    }?;
    Ok((seconds, mode))
}

/// Writes `bytes` of pseudo-random data (incompressible, no holes).
fn write_random(path: &Path, bytes: u64) -> Result<()> {
    let mut file = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut rng = fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15);
    let mut chunk = vec![0u8; MIB as usize];
    for _ in 0..bytes / MIB {
        rng.fill(&mut chunk);
        file.write_all(&chunk)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Copies in and out, then random reads and writes, against `uri`, with the clients
/// run by `client`.
fn measure(client: Client, name: &str, uri: &str, source: &Path, seconds: u32) -> Result<Figures> {
    eprintln!("{name}: copying {} MiB in", EXPORT_BYTES / MIB);
    let write = timed(
        client,
        &["nbdcopy", "--flush", &source.display().to_string(), uri],
    )?;
    eprintln!("{name}: copying {} MiB out", EXPORT_BYTES / MIB);
    let read = timed(client, &["nbdcopy", uri, "null:"])?;
    eprintln!("{name}: 4 KiB random reads and writes, queue depth 16, {seconds} s each");
    let randread_iops = fio_iops(client, uri, "randread", seconds)?;
    let randwrite_iops = fio_iops(client, uri, "randwrite", seconds)?;
    eprintln!("{name}: 4 KiB random FUA writes, queue depth 16, {seconds} s");
    let fua_randwrite_iops = libnbd_iops(client, uri, seconds, LibnbdLoad::FuaWrites)?;
    let mb = EXPORT_BYTES as f64 / 1e6;
    Ok(Figures {
        write_mb_s: mb / write.as_secs_f64(),
        read_mb_s: mb / read.as_secs_f64(),
        randread_iops,
        randwrite_iops,
        fua_randwrite_iops,
    })
}

/// What a libnbd client sends in [`libnbd_iops`].
#[derive(Clone, Copy)]
enum LibnbdLoad {
    Reads,
    Writes,
    FuaWrites,
}

impl LibnbdLoad {
    /// The Python call that submits one 4 KiB request at `offset`.
    fn submit(self) -> &'static str {
        match self {
            LibnbdLoad::Reads => "h.aio_pread(buffer, offset, completion=finished)",
            LibnbdLoad::Writes => "h.aio_pwrite(buffer, offset, completion=finished)",
            LibnbdLoad::FuaWrites => {
                "h.aio_pwrite(buffer, offset, completion=finished, flags=nbd.CMD_FLAG_FUA)"
            }
        }
    }
}

/// IOPS of 4 KiB requests (`load`) at random 4 KiB-aligned offsets of the copied
/// range, 16 in flight, sent by libnbd in `nbdsh` for `seconds`.
fn libnbd_iops(client: Client, uri: &str, seconds: u32, load: LibnbdLoad) -> Result<f64> {
    let script = format!(
        r#"
import os, random, time
h.set_uri_allow_local_file(True)
h.connect_uri({uri:?})
buffer = nbd.Buffer.from_bytearray(bytearray(os.urandom(4096)))
offsets = random.Random(1)
done = 0
errors = []
def finished(error):
    global done
    done += 1
    if error.value:
        errors.append(error.value)
    return 1
start = time.monotonic()
while time.monotonic() < start + {seconds}:
    while h.aio_in_flight() < 16:
        offset = offsets.randrange({pages}) * 4096
        {submit}
    h.poll(-1)
while h.aio_in_flight():
    h.poll(-1)
if errors:
    raise Exception(f'{{len(errors)}} requests failed, the first with errno {{errors[0]}}')
print(done / (time.monotonic() - start))
"#,
        pages = EXPORT_BYTES / 4096,
        submit = load.submit()
    );
    let text = output_of(
        client.run(qemu_test::nbdsh_script(&script)),
        "libnbd requests",
    )?;
    text.trim()
        .parse()
        .map_err(|_| format!("unexpected nbdsh output: {text}"))
}

/// What `command` printed, or an error with everything it printed if it failed.
fn output_of(mut command: Command, what: &str) -> Result<String> {
    let done = command.output().map_err(|e| format!("{what}: {e}"))?;
    let text = String::from_utf8_lossy(&done.stdout).into_owned();
    if !done.status.success() {
        return Err(format!(
            "{what} failed: {text}{}",
            String::from_utf8_lossy(&done.stderr)
        ));
    }
    Ok(text)
}

fn timed(client: Client, command: &[&str]) -> Result<Duration> {
    let started = Instant::now();
    let mut program = Command::new(command[0]);
    program.args(&command[1..]);
    let done = client
        .run(program)
        .output()
        .map_err(|e| format!("{}: {e}", command[0]))?;
    if !done.status.success() {
        return Err(format!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&done.stderr)
        ));
    }
    Ok(started.elapsed())
}

/// IOPS of a fio run with its nbd engine over the copied range.
fn fio_iops(client: Client, uri: &str, pattern: &str, seconds: u32) -> Result<f64> {
    let mut fio = Command::new("fio");
    fio.args([
        "--name=bench",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={pattern}"),
        "--bs=4k",
        "--iodepth=16",
        &format!("--size={EXPORT_BYTES}"),
        &format!("--runtime={seconds}"),
        "--time_based",
        "--minimal",
    ]);
    let text = output_of(client.run(fio), &format!("fio {pattern}"))?;
    // Terse format version 3: read IOPS is field 8, write IOPS field 49 (1-based).
    let terse = text
        .lines()
        .find(|line| line.starts_with("3;"))
        .unwrap_or_default();
    let fields: Vec<&str> = terse.split(';').collect();
    let index = if pattern == "randread" { 7 } else { 48 };
    fields
        .get(index)
        .and_then(|iops| iops.parse().ok())
        .ok_or_else(|| format!("unexpected fio output: {text}"))
}

/// `thinbox offline` serving the thin pool from image files on a free local port,
/// after running the console commands `after` too.
fn start_offline(dir: &Path, after: &[&str]) -> Result<HostServer> {
    let mut disks = Vec::new();
    for (name, bytes) in [
        ("host-metadata.img", METADATA_BYTES),
        ("host-data.img", POOL_DATA_BYTES),
    ] {
        let path = dir.join(name);
        qemu_test::create_disk(&path, bytes).map_err(|e| format!("{name}: {e}"))?;
        disks.push(path);
    }
    let disks: Vec<&Path> = disks.iter().map(PathBuf::as_path).collect();
    let mut commands = thin_pool_commands().to_vec();
    commands.extend(after.iter().map(|command| command.to_string()));
    HostServer::offline(&build_thinbox()?, &disks, &commands)
}

/// Builds the host runner (this binary's crate does not depend on it) and returns its
/// path, next to this binary.
fn build_thinbox() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "--bin",
            "thinbox",
            "--manifest-path",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
        .status()
        .map_err(|e| format!("building thinbox: {e}"))?;
    if !built.success() {
        return Err("building thinbox failed".into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating the bench: {e}"))?;
    Ok(exe.with_file_name("thinbox"))
}

/// `qemu-nbd` serving a qcow2 overlay over a raw base image, on a free local port.
fn start_qemu_nbd(dir: &Path) -> Result<HostServer> {
    let base = dir.join("base.raw");
    let overlay = dir.join("overlay.qcow2");
    qemu_test::create_disk(&base, EXPORT_BYTES).map_err(|e| format!("base image: {e}"))?;
    timed(
        Client::Host,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &base.display().to_string(),
            &overlay.display().to_string(),
        ],
    )?;
    let port = free_port().map_err(|e| format!("picking a port: {e}"))?;
    let mut command = Command::new("qemu-nbd");
    command.args([
        "--persistent",
        "--shared=8",
        "--format=qcow2",
        "--cache=writeback",
        "--bind=127.0.0.1",
        &format!("--port={port}"),
        &overlay.display().to_string(),
    ]);
    HostServer::start(command, port)
}
