//! The real clients (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh) against the std TCP
//! transport and the reference backend, on 127.0.0.1 with ports picked by the OS.

mod support;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blockdev::MemDisk;
use host_tools::{Tool, require_for_test};
use nbd::tcp::{Controller, TcpServer};
use nbd::wire::*;
use nbd::{Limits, MemoryBackend, MemoryExport};
use support::{info_data, option, pattern, request};

const MIB: u64 = 1 << 20;
/// Longest any client invocation may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn tools() {
    require_for_test(&[
        Tool::QemuImg,
        Tool::QemuIo,
        Tool::NbdInfo,
        Tool::NbdCopy,
        Tool::NbdSh,
    ]);
}

/// A server on its own thread, stopped when dropped.
struct Served {
    addr: SocketAddr,
    control: Controller<MemoryBackend>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Served {
    fn start(setup: impl FnOnce(&mut MemoryBackend) + Send + 'static) -> Served {
        let make = move || {
            let mut backend = MemoryBackend::default();
            setup(&mut backend);
            backend
        };
        let address = "127.0.0.1:0".parse().unwrap();
        let (addr, control, thread) = TcpServer::spawn(address, make, Limits::default()).unwrap();
        Served {
            addr,
            control,
            thread: Some(thread),
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    fn backend<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut MemoryBackend) -> R + Send + 'static,
    ) -> R {
        self.control
            .with_server(move |server| job(server.backend_mut()))
            .expect("server running")
    }

    /// Waits until the server has forgotten every connection and closed every export.
    fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (connections, open) = self
                .control
                .with_server(|server| (server.connection_count(), server.backend().open_count()))
                .unwrap();
            if connections == 0 && open == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{connections} connections, {open} exports open"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn read(&self, export: &'static str, offset: u64, len: usize) -> Vec<u8> {
        self.backend(move |backend| {
            let mut out = vec![0; len];
            backend.read_at(export, offset, &mut out).unwrap();
            out
        })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.control.stop();
        if let Some(thread) = self.thread.take() {
            let result = thread.join();
            if !std::thread::panicking() {
                result.unwrap().unwrap();
            }
        }
    }
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "nbd-interop-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(name);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Ran {
    success: bool,
    stdout: String,
    stderr: String,
}

/// A client process whose output goes to files (so large outputs cannot block it).
struct Running {
    child: Child,
    scratch: Scratch,
    deadline: Instant,
}

impl Running {
    fn start(command: &mut Command) -> Running {
        let scratch = Scratch::new();
        let child = command
            .stdin(Stdio::piped())
            .stdout(File::create(scratch.path("stdout")).unwrap())
            .stderr(File::create(scratch.path("stderr")).unwrap())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
        Running {
            child,
            scratch,
            deadline: Instant::now() + TOOL_TIMEOUT,
        }
    }

    fn output(&self, name: &str) -> String {
        fs::read_to_string(self.scratch.path(name)).unwrap()
    }

    /// Waits until the client has printed `text`.
    fn wait_for(&mut self, text: &str) {
        while !self.output("stdout").contains(text) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("client ended ({status}):\n{}", self.output("stderr"));
            }
            assert!(
                Instant::now() < self.deadline,
                "client did not print {text}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn send(&mut self, input: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(input.as_bytes()).unwrap();
    }

    fn finish(mut self) -> Ran {
        drop(self.child.stdin.take());
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > self.deadline {
                let _ = self.child.kill();
                panic!("client timed out:\n{}", self.output("stderr"));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ran {
            success: status.success(),
            stdout: self.output("stdout"),
            stderr: self.output("stderr"),
        }
    }
}

fn run_unchecked(command: &mut Command) -> Ran {
    Running::start(command).finish()
}

/// Runs a client that must succeed; returns its stdout.
fn run(command: &mut Command) -> String {
    let ran = run_unchecked(command);
    assert!(
        ran.success,
        "{command:?} failed\nstdout:\n{}\nstderr:\n{}",
        ran.stdout, ran.stderr
    );
    ran.stdout
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    command.args(args);
    command
}

/// nbdsh running a Python script, with Debian's python3 (which has the libnbd module)
/// first on PATH.
fn nbdsh(script: &str) -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut command = cmd("nbdsh", &["-c", script]);
    command.env("PATH", format!("/usr/bin:{path}"));
    command
}

/// `nbdinfo --map` as (offset, length, type) rows.
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u32)> {
    run(&mut cmd("nbdinfo", &["--map", uri]))
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (
                fields[0].parse().unwrap(),
                fields[1].parse().unwrap(),
                fields[2].parse().unwrap(),
            )
        })
        .collect()
}

/// `qemu-img map --output=json` as (start, length, zero, data) rows.
fn qemu_img_map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let json = run(&mut cmd(
        "qemu-img",
        &["map", "-f", "raw", "--output=json", uri],
    ));
    json.split('{')
        .skip(1)
        .map(|entry| {
            let field = |name: &str| {
                let at = entry.find(&format!("\"{name}\": ")).unwrap() + name.len() + 4;
                let rest = &entry[at..];
                rest[..rest.find([',', '}']).unwrap()].trim().to_string()
            };
            (
                field("start").parse().unwrap(),
                field("length").parse().unwrap(),
                field("zero") == "true",
                field("data") == "true",
            )
        })
        .collect()
}

const HOLE_ZERO: u32 = 3;

fn volume(name: &str, bytes: u64) -> MemoryExport {
    MemoryExport::new(name, bytes / 512)
}

#[test]
fn nbdinfo_and_qemu_img_describe_every_export() {
    tools();
    let served = Served::start(|backend| {
        let mut vol = volume("vol0", 64 * MIB);
        vol.description = String::from("thin volume zero");
        backend.add_export(vol);
        let mut base = volume("base", 16 * MIB);
        base.read_only = true;
        backend.add_export(base);
        backend.set_default_export(Some("vol0"));
    });
    let listing = run(&mut cmd("nbdinfo", &["--list", &served.uri("")]));
    let vol = &listing
        [listing.find("export=\"vol0\"").unwrap()..listing.find("export=\"base\"").unwrap()];
    let base = &listing[listing.find("export=\"base\"").unwrap()..];
    for expected in [
        "description: thin volume zero",
        "export-size: 67108864",
        "base:allocation",
        "is_read_only: false",
        "can_trim: true",
        "can_zero: true",
        "can_fast_zero: true",
        "can_multi_conn: true",
        "can_df: true",
        "can_cache: true",
        "can_fua: true",
        "can_flush: true",
        "block_size_minimum: 512",
        "block_size_preferred: 65536",
        "block_size_maximum: 33554432",
    ] {
        assert!(vol.contains(expected), "{expected} missing from\n{vol}");
    }
    for expected in [
        "export-size: 16777216",
        "is_read_only: true",
        "can_trim: false",
        "can_zero: false",
    ] {
        assert!(base.contains(expected), "{expected} missing from\n{base}");
    }

    // The default export answers to the empty name.
    let info = run(&mut cmd("nbdinfo", &[&served.uri("")]));
    assert!(info.contains("export-size: 67108864"), "{info}");
    let info = run(&mut cmd(
        "qemu-img",
        &["info", "-f", "raw", &served.uri("base")],
    ));
    assert!(
        info.contains("virtual size: 16 MiB (16777216 bytes)"),
        "{info}"
    );

    let missing = run_unchecked(&mut cmd("qemu-img", &["info", &served.uri("nope")]));
    assert!(!missing.success);
    assert!(
        missing
            .stderr
            .contains("server reported: export 'nope' not present"),
        "{}",
        missing.stderr
    );
    served.wait_idle();
}

#[test]
fn allocation_maps_show_data_holes_and_origin() {
    tools();
    let served = Served::start(|backend| {
        backend.add_export(volume("vol0", 64 * MIB));
        backend
            .write_at("vol0", 2048, &vec![0xab; MIB as usize])
            .unwrap();
        backend.write_at("vol0", 20480, &[0xcd; 512]).unwrap();
        let origin = MemDisk::new(4 * MIB / 512);
        origin.write_at(0, &pattern(1, 4 * MIB as usize));
        let mut child = volume("child", 16 * MIB);
        child.origin = Some(origin);
        backend.add_export(child);
        backend.write_at("child", 0, &[1; 512]).unwrap();
        backend.add_export(volume("huge", 16 << 30));
        backend.write_at("huge", 5 << 21, &[2; 512]).unwrap();
        backend.write_at("huge", (16 << 21) - 1, &[3; 512]).unwrap();
    });
    let expected = [
        (0, MIB, HOLE_ZERO),
        (MIB, MIB, 0),
        (2 * MIB, 8 * MIB, HOLE_ZERO),
        (10 * MIB, 65536, 0),
        (10 * MIB + 65536, 54 * MIB - 65536, HOLE_ZERO),
    ];
    assert_eq!(nbdinfo_map(&served.uri("vol0")), expected);
    let qemu: Vec<(u64, u64, bool, bool)> = expected
        .iter()
        .map(|&(start, len, kind)| (start, len, kind == HOLE_ZERO, kind == 0))
        .collect();
    assert_eq!(qemu_img_map(&served.uri("vol0")), qemu);

    // Larger than one block-status request can cover (4 GiB): every extent stays
    // aligned, so the clients continue at aligned offsets.
    let gib = 1024 * MIB;
    let huge = [
        (0, 5 * gib, HOLE_ZERO),
        (5 * gib, 65536, 0),
        (5 * gib + 65536, 11 * gib - 2 * 65536, HOLE_ZERO),
        (16 * gib - 65536, 65536, 0),
    ];
    assert_eq!(nbdinfo_map(&served.uri("huge")), huge);
    let qemu: Vec<(u64, u64, bool, bool)> = huge
        .iter()
        .map(|&(start, len, kind)| (start, len, kind == HOLE_ZERO, kind == 0))
        .collect();
    assert_eq!(qemu_img_map(&served.uri("huge")), qemu);

    // Holes over an external origin are holes that do not read as zero.
    assert_eq!(
        nbdinfo_map(&served.uri("child")),
        [
            (0, 65536, 0),
            (65536, 4 * MIB - 65536, 1),
            (4 * MIB, 12 * MIB, HOLE_ZERO)
        ]
    );
    assert_eq!(
        qemu_img_map(&served.uri("child")),
        [
            (0, 65536, false, true),
            (65536, 4 * MIB - 65536, false, false),
            (4 * MIB, 12 * MIB, true, false)
        ]
    );
    served.wait_idle();
}

#[test]
fn qemu_io_writes_at_odd_offsets_and_sizes_read_back() {
    tools();
    let served = Served::start(|backend| backend.add_export(volume("vol0", 8 * MIB)));
    let writes = [
        (100_000u64, 3000usize, 0x11u8),
        (65535, 2, 0x22),
        (MIB - 1, 70_000, 0x33),
        (7 * MIB + 1, 511, 0x44),
    ];
    let mut args = vec!["-f", "raw", "-t", "writethrough"];
    let commands: Vec<String> = writes
        .iter()
        .map(|(offset, len, byte)| format!("write -P {byte:#x} {offset} {len}"))
        .chain(
            writes
                .iter()
                .map(|(offset, len, byte)| format!("read -P {byte:#x} {offset} {len}")),
        )
        .chain([
            "aio_write -P 0x55 4096 8192".into(),
            "aio_flush".into(),
            "read -P 0x55 4096 8192".into(),
        ])
        .collect();
    for command in &commands {
        args.extend(["-c", command]);
    }
    let uri = served.uri("vol0");
    args.push(&uri);
    let output = run(&mut cmd("qemu-io", &args));
    assert!(!output.contains("Pattern verification failed"), "{output}");
    assert_eq!(
        output.matches("read ").count(),
        writes.len() + 1,
        "{output}"
    );

    let mut model = vec![0u8; 8 * MIB as usize];
    for (offset, len, byte) in writes {
        model[offset as usize..offset as usize + len].fill(byte);
    }
    model[4096..4096 + 8192].fill(0x55);
    assert!(
        served.read("vol0", 0, model.len()) == model,
        "contents differ from the model"
    );
    let stats = served.backend(|backend| backend.stats());
    // qemu's writethrough mode sends FUA writes, and flushes on close.
    assert!(stats.fua_writes >= writes.len() as u64, "{stats:?}");
    assert!(stats.flushes >= 1, "{stats:?}");
    served.wait_idle();
}

/// A 64 MiB file of random data with two sparse zero regions.
fn random_image(path: &Path, size: u64) -> Vec<u8> {
    let mut data = pattern(42, size as usize);
    data[3 * MIB as usize..7 * MIB as usize].fill(0);
    data[(size - MIB) as usize..].fill(0);
    let mut file = File::create(path).unwrap();
    file.write_all(&data[..3 * MIB as usize]).unwrap();
    file.set_len(7 * MIB).unwrap();
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(7 * MIB)).unwrap();
    file.write_all(&data[7 * MIB as usize..(size - MIB) as usize])
        .unwrap();
    file.set_len(size).unwrap();
    data
}

#[test]
fn nbdcopy_copies_64_mib_in_and_out() {
    tools();
    let size = 64 * MIB;
    let served = Served::start(move |backend| backend.add_export(volume("vol0", size)));
    let scratch = Scratch::new();
    let source = scratch.path("source.img");
    let data = random_image(&source, size);
    let uri = served.uri("vol0");
    run(&mut cmd(
        "nbdcopy",
        &["--flush", source.to_str().unwrap(), &uri],
    ));
    assert!(
        served.read("vol0", 0, size as usize) == data,
        "export differs from the source"
    );
    let stats = served.backend(|backend| backend.stats());
    assert!(stats.flushes >= 1 && stats.writes > 0, "{stats:?}");

    let copy = scratch.path("copy.img");
    run(&mut cmd("nbdcopy", &[&uri, copy.to_str().unwrap()]));
    assert!(
        fs::read(&copy).unwrap() == data,
        "copy differs from the source"
    );
    // The copy out was sparse-aware: block status was asked.
    assert!(served.backend(|backend| backend.stats()).block_status > 0);
    served.wait_idle();
}

#[test]
fn qemu_img_convert_and_compare_agree() {
    tools();
    let size = 32 * MIB;
    let served = Served::start(move |backend| {
        backend.add_export(volume("vol0", size));
        // Old contents that the conversion must overwrite with the source's zeroes.
        backend
            .write_at("vol0", 10 * 2048, &vec![0xff; 2 * MIB as usize])
            .unwrap();
    });
    let scratch = Scratch::new();
    let source = scratch.path("source.img");
    let mut data = vec![0u8; size as usize];
    let mut file = File::create(&source).unwrap();
    file.set_len(size).unwrap();
    for (offset, seed) in [(0u64, 1u64), (5 * MIB + 4096, 2), (20 * MIB, 3)] {
        let piece = pattern(seed, 3 * MIB as usize);
        data[offset as usize..offset as usize + piece.len()].copy_from_slice(&piece);
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset)).unwrap();
        file.write_all(&piece).unwrap();
    }
    drop(file);
    let uri = served.uri("vol0");
    let source_path = source.to_str().unwrap();
    run(&mut cmd(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", source_path, &uri],
    ));
    let compared = run(&mut cmd(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", source_path, &uri],
    ));
    assert!(compared.contains("Images are identical"), "{compared}");
    assert!(served.read("vol0", 0, size as usize) == data);
    // Zero runs of the source were sent as write-zeroes that unmap, leaving holes
    // (also where old data was): only blocks the source's data touches are allocated.
    let data_end = 8 * MIB + 65536;
    assert_eq!(
        nbdinfo_map(&uri),
        [
            (0, 3 * MIB, 0),
            (3 * MIB, 2 * MIB, HOLE_ZERO),
            (5 * MIB, data_end - 5 * MIB, 0),
            (data_end, 20 * MIB - data_end, HOLE_ZERO),
            (20 * MIB, 3 * MIB, 0),
            (23 * MIB, 9 * MIB, HOLE_ZERO),
        ]
    );

    let out = scratch.path("out.img");
    run(&mut cmd(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            out.to_str().unwrap(),
        ],
    ));
    assert!(fs::read(&out).unwrap() == data);
    let compared = run(&mut cmd(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            out.to_str().unwrap(),
            &uri,
        ],
    ));
    assert!(compared.contains("Images are identical"), "{compared}");
    served.wait_idle();
}

#[test]
fn trim_and_write_zeroes_change_the_map() {
    tools();
    let served = Served::start(|backend| backend.add_export(volume("vol0", 8 * MIB)));
    let uri = served.uri("vol0");
    let qemu_io = |commands: &[&str]| {
        let mut args = vec!["-f", "raw"];
        for command in commands {
            args.extend(["-c", command]);
        }
        args.push(&uri);
        let output = run(&mut cmd("qemu-io", &args));
        assert!(!output.contains("failed"), "{output}");
    };
    qemu_io(&["write -P 0x55 0 4M"]);
    assert_eq!(
        nbdinfo_map(&uri),
        [(0, 4 * MIB, 0), (4 * MIB, 4 * MIB, HOLE_ZERO)]
    );
    qemu_io(&["discard 1M 1M"]);
    qemu_io(&["write -z 2M 1M"]);
    qemu_io(&["write -z -u 3M 1M"]);
    assert_eq!(
        nbdinfo_map(&uri),
        [
            (0, MIB, 0),
            (MIB, MIB, HOLE_ZERO),
            (2 * MIB, MIB, 0),
            (3 * MIB, 5 * MIB, HOLE_ZERO)
        ]
    );
    qemu_io(&["read -P 0x55 0 1M", "read -P 0 1M 3M"]);
    let stats = served.backend(|backend| backend.stats());
    assert_eq!((stats.trims, stats.write_zeroes), (1, 2), "{stats:?}");
    served.wait_idle();
}

#[test]
fn read_only_exports_refuse_writes() {
    tools();
    let served = Served::start(|backend| {
        let mut base = volume("base", 4 * MIB);
        base.read_only = true;
        backend.add_export(base);
    });
    let uri = served.uri("base");
    let refused = run_unchecked(&mut cmd(
        "qemu-io",
        &["-f", "raw", "-c", "write 0 4k", &uri],
    ));
    assert!(!refused.success);
    assert!(
        refused.stderr.contains("Permission denied"),
        "{}",
        refused.stderr
    );
    let output = run(&mut cmd(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0 0 64k", &uri],
    ));
    assert!(output.contains("read 65536/65536"), "{output}");
    let script = format!(
        r#"
import errno
h.set_strict_mode(0)
h.connect_uri("{uri}")
assert h.is_read_only()
for attempt in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):
    try:
        attempt()
        raise AssertionError("a write-type command succeeded")
    except nbd.Error as error:
        assert error.errnum == errno.EPERM, error
assert h.pread(512, 0) == bytes(512)
h.shutdown()
print("ok")
"#
    );
    assert_eq!(run(&mut nbdsh(&script)).trim(), "ok");
    served.wait_idle();
}

#[test]
fn nbdsh_exercises_protocol_corners() {
    tools();
    let served = Served::start(|backend| {
        backend.add_export(volume("vol0", 4 * MIB));
        backend.add_export(volume("other", MIB));
    });
    let uri = served.uri("vol0");
    let script = format!(
        r#"
import errno

def expect_error(code, call):
    try:
        call()
    except nbd.Error as error:
        assert error.errnum == code, (error, code)
        return
    raise AssertionError("no error, expected %d" % code)

# Listing and info in option mode, then GO.
h.set_opt_mode(True)
h.add_meta_context("base:allocation")
h.connect_uri("{uri}")
names = []
h.opt_list(lambda name, description: names.append(name))
assert names == ["vol0", "other"], names
contexts = []
h.opt_list_meta_context(lambda name: contexts.append(name))
assert contexts == ["base:allocation"], contexts
h.opt_go()
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
assert h.get_block_size(nbd.SIZE_PREFERRED) == 65536
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * 1024 * 1024
assert h.can_df() and h.can_cache() and h.can_fast_zero() and h.can_multi_conn()

# Structured reads: data and hole chunks.
h.pwrite(b"\xab" * 65536, 65536, nbd.CMD_FLAG_FUA)
chunks = []
def chunk(subbuf, offset, status, error):
    chunks.append((status, offset, len(subbuf)))
    return 0
data = h.pread_structured(3 * 65536, 0, chunk)
assert data == bytes(65536) + b"\xab" * 65536 + bytes(65536)
assert sorted(chunks) == [(nbd.READ_DATA, 65536, 65536), (nbd.READ_HOLE, 0, 65536), (nbd.READ_HOLE, 131072, 65536)], chunks
chunks.clear()
assert h.pread_structured(3 * 65536, 0, chunk, nbd.CMD_FLAG_DF) == data
assert chunks == [(nbd.READ_DATA, 0, 3 * 65536)], chunks

# Block status with and without REQ_ONE.
extents = []
def status(context, offset, entries, error):
    extents.append((context, offset, list(entries)))
    return 0
h.block_status(4 * 1024 * 1024, 0, status)
assert extents == [("base:allocation", 0, [65536, 3, 65536, 0, 4 * 1024 * 1024 - 131072, 3])], extents
extents.clear()
h.block_status(4 * 1024 * 1024, 0, status, nbd.CMD_FLAG_REQ_ONE)
assert extents == [("base:allocation", 0, [65536, 3])], extents

# Cache, flush, write-zeroes with and without fast-zero.
h.cache(65536, 0)
h.flush()
expect_error(errno.ENOTSUP, lambda: h.zero(4096, 65536, nbd.CMD_FLAG_FAST_ZERO))
assert h.pread(65536, 65536) == b"\xab" * 65536
h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO)
h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(131072, 0) == bytes(131072)

# Requests libnbd would normally refuse to send.
h.set_strict_mode(0)
expect_error(errno.EINVAL, lambda: h.pread(1000, 1))
expect_error(errno.EINVAL, lambda: h.pread(4096, 4 * 1024 * 1024 - 512))
expect_error(errno.ENOSPC, lambda: h.pwrite(bytes(4096), 4 * 1024 * 1024 - 512))
expect_error(errno.EINVAL, lambda: h.trim(512, 4 * 1024 * 1024))
expect_error(errno.EINVAL, lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE))
assert h.pread(512, 0) == bytes(512)

# The export disappears while we are connected.
print("ready", flush=True)
import sys
sys.stdin.readline()
expect_error(errno.ESHUTDOWN, lambda: h.pread(512, 0))
expect_error(errno.ESHUTDOWN, lambda: h.flush())
h.shutdown()
print("done")
"#
    );
    let mut client = Running::start(&mut nbdsh(&script));
    client.wait_for("ready");
    assert!(served.backend(|backend| backend.remove_export("vol0")));
    client.send("go\n");
    let ran = client.finish();
    assert!(ran.success, "nbdsh failed:\n{}", ran.stderr);
    let child_output = ran.stdout;
    assert!(child_output.contains("done"), "{child_output}");

    // The other export was never disturbed.
    let other = run(&mut cmd(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 7 0 64k",
            "-c",
            "read -P 7 0 64k",
            &served.uri("other"),
        ],
    ));
    assert!(!other.contains("failed"), "{other}");
    served.wait_idle();
}

#[test]
fn export_name_and_simple_replies_work_with_libnbd() {
    tools();
    let served = Served::start(|backend| backend.add_export(volume("vol0", MIB)));
    let uri = served.uri("vol0");
    // Without fixed newstyle libnbd has to use NBD_OPT_EXPORT_NAME (and read the
    // 124 zero bytes); without structured replies every reply is simple.
    for handshake in ["0", "nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE"] {
        let script = format!(
            r#"
h.set_handshake_flags({handshake})
h.set_request_structured_replies(False)
h.connect_uri("{uri}")
assert not h.get_structured_replies_negotiated()
assert h.get_size() == 1024 * 1024
h.pwrite(b"\x5a" * 4096, 8192)
assert h.pread(4096, 8192) == b"\x5a" * 4096
assert not h.can_df()
h.shutdown()
print("ok")
"#
        );
        assert_eq!(
            run(&mut nbdsh(&script)).trim(),
            "ok",
            "handshake flags {handshake}"
        );
    }
    served.wait_idle();
}

/// Opens a raw connection and negotiates `vol0` with GO.
fn raw_client(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; GREETING_LEN];
    stream.read_exact(&mut greeting).unwrap();
    stream
        .write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .unwrap();
    stream
        .write_all(&option(OPT_GO, &info_data("vol0", &[])))
        .unwrap();
    // INFO_EXPORT, INFO_BLOCK_SIZE and ACK.
    let mut reply = [0u8; 20 + 12 + 20 + 14 + 20];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(be_u32(&reply[reply.len() - 8..]), REP_ACK);
    stream
}

/// True once the server has closed the connection.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut sink = [0u8; 4096];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

#[test]
fn garbage_and_vanishing_clients_leave_others_working() {
    tools();
    let served = Served::start(|backend| backend.add_export(volume("vol0", 16 * MIB)));

    // Garbage instead of client flags: dropped.
    let mut garbage = TcpStream::connect(served.addr).unwrap();
    garbage
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    garbage.write_all(&pattern(5, 4096)).unwrap();
    assert!(closed_by_server(&mut garbage));

    // Garbage in transmission: bad magic, dropped.
    let mut confused = raw_client(served.addr);
    confused.write_all(&pattern(6, 100)).unwrap();
    assert!(closed_by_server(&mut confused));

    // A client that vanishes half-way through a write's payload.
    let mut vanishing = raw_client(served.addr);
    vanishing
        .write_all(&request(0, CMD_WRITE, 1, 0, 4 << 20))
        .unwrap();
    vanishing.write_all(&vec![0xee; 100_000]).unwrap();
    // A client that queues reads and never reads the replies.
    let mut deaf = raw_client(served.addr);
    for cookie in 0..64 {
        deaf.write_all(&request(0, CMD_READ, cookie, 0, 1 << 20))
            .unwrap();
    }
    drop(vanishing);

    // Meanwhile a real client works normally.
    let uri = served.uri("vol0");
    let output = run(&mut cmd(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 1M 2M",
            "-c",
            "read -P 0x3c 1M 2M",
            "-c",
            "read -P 0 0 1M",
            &uri,
        ],
    ));
    assert!(!output.contains("failed"), "{output}");
    assert!(
        served.read("vol0", 0, MIB as usize).iter().all(|&b| b == 0),
        "half a write landed"
    );
    drop(deaf);
    drop(garbage);
    drop(confused);
    served.wait_idle();
}
