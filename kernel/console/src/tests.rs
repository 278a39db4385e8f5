//! Whole-console tests: bytes in, text out, against memory disks and a fake
//! platform.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use blockdev::{
    BlockDevice, Busy, Command, Completion, DeviceInfo, FaultOp, FaultRule, IoError, MemDisk,
    Request, SECTOR_SIZE,
};
use core::cell::{Cell, RefCell};
use dm::{DeviceMapper, Disk, NbdBackend};

use crate::{Console, Crash, MemoryStats, PROMPT, Platform};

/// What `start` says when no disk carries a configuration.
pub(crate) const NO_CONFIG: &str =
    "config: no configuration disk found; changes are not saved (see config init)";

/// A clock that moves 500 ms every time it is read, so progress lines appear.
#[derive(Default)]
pub(crate) struct FakePlatform {
    now_ns: Cell<u64>,
    powered_off: bool,
    crashed: Vec<Crash>,
}

impl Platform for FakePlatform {
    fn now_ns(&self) -> u64 {
        let now = self.now_ns.get() + 500_000_000;
        self.now_ns.set(now);
        now
    }
    fn memory(&self) -> Option<MemoryStats> {
        Some(MemoryStats {
            heap_used: 3 << 20,
            heap_free: 61 << 20,
            dma_frames_used: 12,
            dma_frames_free: 2036,
            frame_size: 4096,
        })
    }
    fn power_off(&mut self) {
        self.powered_off = true;
    }
    fn crash(&mut self, how: Crash) {
        self.crashed.push(how);
    }
}

/// What can go wrong in [`FaultyDisk`].
#[derive(Clone, Copy)]
enum Fault {
    /// Reads covering this sector return one flipped byte in it.
    CorruptRead(u64),
    /// Writes covering this sector fail.
    FailWrite(u64),
    /// Flushes fail.
    FailFlush,
}

/// A memory disk with one injected fault.
struct FaultyDisk {
    inner: MemDisk,
    fault: Fault,
    /// First sector of each request in flight, by tag.
    starts: alloc::collections::BTreeMap<u64, u64>,
}

fn faulty(inner: MemDisk, fault: Fault) -> FaultyDisk {
    FaultyDisk {
        inner,
        fault,
        starts: Default::default(),
    }
}

impl BlockDevice for FaultyDisk {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn submit(&mut self, mut request: Request) -> Result<(), Busy> {
        let (start, sectors) = request.command.range();
        self.starts.insert(request.tag, start);
        let hit = |sector| (start..start + sectors).contains(&sector);
        match (&request.command, self.fault) {
            (Command::Write { .. }, Fault::FailWrite(sector)) if hit(sector) => {
                request.command = Command::Discard {
                    sector: u64::MAX,
                    sectors: 1,
                };
            }
            (Command::Flush, Fault::FailFlush) => {
                request.command = Command::Discard {
                    sector: u64::MAX,
                    sectors: 1,
                };
            }
            _ => {}
        }
        self.inner.submit(request)
    }
    fn poll(&mut self) -> Option<Completion> {
        let mut done = self.inner.poll()?;
        let start = self.starts.remove(&done.tag).expect("submitted");
        if let Fault::CorruptRead(sector) = self.fault
            && !done.buf.is_empty()
            && (start..start + done.buf.sectors()).contains(&sector)
        {
            done.buf[(sector - start) as usize * SECTOR_SIZE + 7] ^= 0x40;
        }
        Some(done)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}

/// Commands a [`RecordingDisk`] was given, as (kind, sector, fua).
type CommandLog = alloc::rc::Rc<core::cell::RefCell<Vec<(&'static str, u64, bool)>>>;

/// A memory disk that records every command it is given.
struct RecordingDisk {
    inner: MemDisk,
    log: CommandLog,
}

impl BlockDevice for RecordingDisk {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        let entry = match &request.command {
            Command::Read { sector, .. } => ("read", *sector, false),
            Command::Write { sector, fua, .. } => ("write", *sector, *fua),
            Command::Flush => ("flush", 0, false),
            Command::Discard { sector, .. } => ("discard", *sector, false),
        };
        self.inner.submit(request)?;
        self.log.borrow_mut().push(entry);
        Ok(())
    }
    fn poll(&mut self) -> Option<Completion> {
        self.inner.poll()
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}

/// A console managing a device mapper over `disks`.
pub(crate) fn console_over<P: Platform>(platform: P, disks: Vec<Disk>) -> Console<P> {
    Console::new(platform, Rc::new(RefCell::new(DeviceMapper::new(disks))))
}

/// The NBD backend of the console's device mapper, as the kernel wires it.
/// Where the NBD clients of these tests connect from, unless a test says otherwise.
pub(crate) const CLIENT: core::net::SocketAddr =
    core::net::SocketAddr::new(core::net::IpAddr::V4(core::net::Ipv4Addr::LOCALHOST), 40000);

pub(crate) fn nbd_backend<P: Platform>(console: &Console<P>) -> NbdBackend {
    NbdBackend::new(Rc::clone(&console.dm))
}

pub(crate) fn disk(name: &str, device: impl BlockDevice + 'static) -> Disk {
    Disk {
        name: name.to_string(),
        device: Box::new(device),
    }
}

pub(crate) fn mem_disk(mib: u64, model: &str, serial: &str) -> MemDisk {
    let mut info = MemDisk::new(mib << 11).info().clone();
    info.model = model.to_string();
    info.serial = serial.to_string();
    info.queue_depth = 8;
    info.discard = false;
    MemDisk::with_info(info)
}

/// Types `line` and Enter, then polls until the console is idle; returns everything
/// printed after the echoed line, without the final prompt.
pub(crate) fn run<P: Platform>(console: &mut Console<P>, line: &str) -> String {
    let mut out = String::new();
    for byte in line.bytes().chain(*b"\r") {
        console.input(byte, &mut out);
    }
    let mut polls = 0;
    while console.poll(&mut out) {
        polls += 1;
        assert!(polls < 100_000, "console never went idle: {out}");
    }
    let echo = alloc::format!("{line}\r\n");
    assert!(out.starts_with(&echo), "no echo in {out:?}");
    let body = out[echo.len()..].to_string();
    body.strip_suffix(PROMPT)
        .unwrap_or_else(|| panic!("no prompt after {line:?}: {body:?}"))
        .to_string()
}

pub(crate) fn lines(text: &str) -> Vec<&str> {
    let trimmed = text.strip_suffix("\r\n").unwrap_or(text);
    if trimmed.is_empty() {
        return Vec::new();
    }
    trimmed.split("\r\n").collect()
}

/// Boots a console over handles of `disks` (so the contents survive the console) and
/// returns it with what `start` printed before the prompt.
pub(crate) fn boot(disks: &[(&str, MemDisk)]) -> (Console<FakePlatform>, String) {
    let mut console = console_over(
        FakePlatform::default(),
        disks
            .iter()
            .map(|(name, contents)| disk(name, contents.handle()))
            .collect(),
    );
    let mut out = String::new();
    console.start(&mut out);
    let notes = out
        .strip_suffix(PROMPT)
        .expect("prompt after start")
        .to_string();
    (console, notes)
}

/// Runs a command that must succeed; returns its output.
pub(crate) fn ok(console: &mut Console<FakePlatform>, line: &str) -> String {
    let out = run(console, line);
    assert!(!out.contains("error:"), "{line}: {out}");
    out
}

/// Submits an NBD backend request and polls until it completes.
pub(crate) fn io(
    backend: &mut dyn nbd::Backend,
    export: nbd::ExportHandle,
    tag: u64,
    op: nbd::IoOp,
) -> Result<nbd::IoOutput, nbd::BackendError> {
    backend
        .submit(nbd::IoRequest { tag, export, op })
        .expect("queue has room");
    loop {
        if let Some(done) = backend.poll() {
            assert_eq!(done.tag, tag);
            return done.result;
        }
    }
}

/// The single error line of a failed command.
pub(crate) fn error<P: Platform>(console: &mut Console<P>, line: &str) -> String {
    let out = run(console, line);
    let all = lines(&out);
    assert_eq!(all.len(), 1, "{line:?} printed {all:?}");
    assert!(all[0].starts_with("error: "), "{line:?} printed {all:?}");
    all[0].to_string()
}

fn console() -> Console<FakePlatform> {
    console_over(
        FakePlatform::default(),
        alloc::vec![
            disk("vda", mem_disk(64, "QEMU HARDDISK", "vd-serial-1")),
            disk("nvme0n1", mem_disk(2048, "QEMU NVMe Ctrl", "")),
        ],
    )
}

#[test]
fn start_prints_the_prompt_and_empty_lines_just_prompt_again() {
    let mut console = console();
    let mut out = String::new();
    console.start(&mut out);
    assert_eq!(out, alloc::format!("{NO_CONFIG}\r\n{PROMPT}"));
    assert_eq!(run(&mut console, ""), "");
    assert_eq!(run(&mut console, "   "), "");
}

#[test]
fn unknown_command() {
    let mut console = console();
    assert_eq!(
        error(&mut console, "frobnicate now"),
        "error: unknown command 'frobnicate' (try help)"
    );
}

#[test]
fn unterminated_quote_is_one_error_line() {
    let mut console = console();
    assert_eq!(
        error(&mut console, "disk-test \"vda"),
        "error: unterminated \" quote opened at column 11 (close it with \")"
    );
}

#[test]
fn help_lists_every_command_and_each_is_known() {
    let mut console = console();
    let out = run(&mut console, "help");
    let listed = lines(&out);
    assert_eq!(listed.len(), crate::commands::HELP.len());
    for (line, (usage, _)) in listed.iter().zip(crate::commands::HELP) {
        assert!(line.starts_with(usage));
        let name = usage.split(' ').next().unwrap();
        // Every listed command is dispatched: with a bogus argument it may complain,
        // but never that it is unknown.
        let answer = run(&mut console, &alloc::format!("{name} --bogus"));
        assert!(!answer.contains("unknown command"), "{name}: {answer}");
    }
    assert!(!out.contains("debug"), "debug stays out of help");
}

#[test]
fn commands_without_arguments_refuse_extra_words() {
    let mut console = console();
    for command in ["help", "disks", "mem", "uptime"] {
        assert_eq!(
            error(&mut console, &alloc::format!("{command} extra")),
            alloc::format!("error: {command} takes no arguments (got 'extra')")
        );
    }
}

#[test]
fn disks_lists_name_size_model_serial() {
    let mut console = console();
    assert_eq!(
        lines(&run(&mut console, "disks")),
        [
            "vda            131072 sectors   64.00 MiB  QEMU HARDDISK  vd-serial-1",
            "nvme0n1       4194304 sectors    2.00 GiB  QEMU NVMe Ctrl  -",
        ]
    );
    let mut empty = console_over(FakePlatform::default(), Vec::new());
    assert_eq!(run(&mut empty, "disks"), "no disks found\r\n");
}

#[test]
fn disks_shows_the_requests_a_disk_failed() {
    let (device, faults) = blockdev::FaultyDisk::new(mem_disk(64, "m", "s"));
    let mut console = console_over(FakePlatform::default(), alloc::vec![disk("vdc", device)]);
    let row = "vdc            131072 sectors   64.00 MiB  m  s";
    assert_eq!(lines(&run(&mut console, "disks")), [row]);
    blockdev::Faults::fail(&faults, FaultRule::every(FaultOp::Write));
    let line = error(&mut console, "disk-test vdc 8 --force");
    assert!(
        line.ends_with(&alloc::format!("failed: {}", blockdev::INJECTED)),
        "{line}"
    );
    blockdev::Faults::fail(&faults, FaultRule::every(FaultOp::Flush));
    blockdev::Faults::fail(&faults, FaultRule::every(FaultOp::Read));
    assert!(error(&mut console, "disk-test vdc 8 --force").contains("failed"));
    assert!(error(&mut console, "disk-test vdc 8 --force").contains("failed"));
    assert_eq!(
        lines(&run(&mut console, "disks")),
        [
            row,
            "         errors: 1 read, 1 write, 1 flush, 0 discards failed; 0 resets"
        ]
    );
}

#[test]
fn mem_shows_heap_and_dma_frames() {
    let mut console = console();
    assert_eq!(
        lines(&run(&mut console, "mem")),
        [
            "heap: 3.00 MiB used, 61.00 MiB free, 64.00 MiB total",
            "dma:  12 frames used, 2036 free (4.00 KiB each, 8.00 MiB total)",
        ]
    );
}

#[test]
fn uptime_reads_the_clock() {
    let mut console = console();
    console.platform().now_ns.set(90_061_500_000_000);
    assert_eq!(
        run(&mut console, "uptime"),
        "up 90062.000 s (1d 01:01:02)\r\n"
    );
}

#[test]
fn shutdown_flushes_then_powers_off() {
    let mut console = console();
    assert_eq!(run(&mut console, "shutdown"), "powering off\r\n");
    assert!(console.platform().powered_off);
}

#[test]
fn shutdown_refuses_when_a_flush_fails_unless_forced() {
    let mut console = console_over(
        FakePlatform::default(),
        alloc::vec![disk("vdb", faulty(MemDisk::new(2048), Fault::FailFlush))],
    );
    let line = error(&mut console, "shutdown");
    assert!(line.starts_with("error: flushing vdb failed"), "{line}");
    assert!(line.contains("shutdown --force"), "{line}");
    assert!(!console.platform().powered_off);
    assert_eq!(
        error(&mut console, "shutdown now"),
        "error: usage: shutdown [--force]"
    );
    assert_eq!(run(&mut console, "shutdown --force"), "powering off\r\n");
    assert!(console.platform().powered_off);
}

#[test]
fn debug_crashes_through_the_platform() {
    let mut console = console();
    let usage = "error: usage: debug panic|page-fault|stack-overflow (crashes the appliance \
                 on purpose)";
    assert_eq!(error(&mut console, "debug"), usage);
    assert_eq!(error(&mut console, "debug reboot"), usage);
    assert!(console.platform().crashed.is_empty());
    run(&mut console, "debug panic");
    run(&mut console, "debug page-fault");
    run(&mut console, "debug stack-overflow");
    assert_eq!(
        console.platform().crashed,
        [Crash::Panic, Crash::PageFault, Crash::StackOverflow]
    );
}

#[test]
fn disk_test_passes_on_an_empty_disk_and_leaves_the_pattern() {
    let backing = mem_disk(64, "m", "s");
    let view = backing.handle();
    let mut console = console_over(FakePlatform::default(), alloc::vec![disk("vda", backing)]);
    let out = run(&mut console, "disk-test /dev/vda 4");
    let all = lines(&out);
    let last = all.last().unwrap();
    assert!(
        last.starts_with("disk-test vda: OK, 4 MiB written and flushed in"),
        "{out}"
    );
    assert!(
        last.contains("up to 8 requests of 256 KiB in flight"),
        "{out}"
    );
    assert!(!out.contains("error"));
    // The pattern covers exactly the 4 MiB asked for and nothing after it.
    let mut probe = [0u8; 512];
    view.read_at((4 << 20) - 512, &mut probe);
    assert!(probe.iter().any(|&b| b != 0));
    view.read_at(4 << 20, &mut probe);
    assert!(probe.iter().all(|&b| b == 0));
}

#[test]
fn disk_test_discards_the_range_when_the_disk_can() {
    let backing = MemDisk::new(64 << 11);
    let view = backing.handle();
    let mut console = console_over(FakePlatform::default(), alloc::vec![disk("vda", backing)]);
    let out = run(&mut console, "disk-test vda 8");
    let last = *lines(&out).last().unwrap();
    assert!(last.starts_with("disk-test vda: OK"), "{out}");
    assert!(last.ends_with(", range discarded"), "{out}");
    assert_eq!(view.resident_bytes(), 0);
}

#[test]
fn disk_test_order_check_write_fua_flush_verify_discard() {
    let log = CommandLog::default();
    let recorder = RecordingDisk {
        inner: MemDisk::new(16 << 11),
        log: alloc::rc::Rc::clone(&log),
    };
    let mut console = console_over(FakePlatform::default(), alloc::vec![disk("vda", recorder)]);
    assert!(run(&mut console, "disk-test vda 2").contains("OK"));
    let log = log.borrow();
    let kinds: Vec<&str> = log.iter().map(|(kind, ..)| *kind).collect();
    // Check: the first MiB in four requests plus one sample of the second MiB.
    assert_eq!(kinds[..5], ["read"; 5]);
    assert_eq!(kinds[5..13], ["write"; 8]);
    assert_eq!(
        kinds[13..],
        [
            "flush", "read", "read", "read", "read", "read", "read", "read", "read", "discard"
        ]
    );
    let fua: Vec<u64> = log
        .iter()
        .filter(|(.., fua)| *fua)
        .map(|(_, sector, _)| *sector)
        .collect();
    assert_eq!(fua, [3584], "only the last write is FUA");
}

#[test]
fn disk_test_prints_progress_at_least_every_second() {
    let mut console = console();
    let out = run(&mut console, "disk-test nvme0n1 32");
    let progress: Vec<&str> = lines(&out)
        .into_iter()
        .filter(|l| l.contains("MiB") && !l.contains("OK"))
        .collect();
    assert!(
        progress
            .iter()
            .any(|l| l.starts_with("disk-test nvme0n1: writing ")),
        "{out}"
    );
    assert!(
        progress
            .iter()
            .any(|l| l.starts_with("disk-test nvme0n1: verifying ")),
        "{out}"
    );
    assert!(lines(&out).last().unwrap().contains("OK"));
}

#[test]
fn disk_test_refuses_a_disk_with_data_unless_forced() {
    let backing = mem_disk(64, "m", "s");
    backing.write_at(40 << 20, b"precious");
    let view = backing.handle();
    let mut console = console_over(FakePlatform::default(), alloc::vec![disk("vda", backing)]);
    assert_eq!(
        error(&mut console, "disk-test vda 48"),
        "error: disk-test: vda holds data (non-zero bytes in sector 81920) that the test would \
         overwrite; add --force to test it anyway"
    );
    let mut kept = [0u8; 8];
    view.read_at(40 << 20, &mut kept);
    assert_eq!(&kept, b"precious", "refusal must not write anything");
    // A smaller test range that avoids the data is fine.
    assert!(run(&mut console, "disk-test vda 32").contains("OK"));
    // Now the start holds the previous run's pattern: refused again, then forced.
    assert!(error(&mut console, "disk-test vda 1").contains("holds data"));
    let forced = run(&mut console, "disk-test vda 48 --force");
    assert!(lines(&forced).last().unwrap().contains("OK"), "{forced}");
}

#[test]
fn disk_test_names_the_lowest_sector_with_data_whatever_the_completion_order() {
    let mut backing = mem_disk(64, "m", "s");
    backing.write_at(3 << 20, b"later");
    backing.write_at(700 * 512, b"first");
    backing.shuffle_completions(11);
    let mut console = console_over(FakePlatform::default(), alloc::vec![disk("vda", backing)]);
    assert!(error(&mut console, "disk-test vda 8").contains("(non-zero bytes in sector 700)"),);
}

#[test]
fn disk_test_detects_corruption() {
    let faulty = faulty(mem_disk(64, "m", "s"), Fault::CorruptRead(3000));
    let mut console = console_over(FakePlatform::default(), alloc::vec![disk("vdc", faulty)]);
    let out = run(&mut console, "disk-test vdc 8 --force");
    let last = *lines(&out).last().unwrap();
    assert_eq!(
        last,
        "error: disk-test vdc: data read back from sector 3000 differs from what was written; \
         the disk or its driver corrupts data"
    );
    assert_eq!(out.matches("error:").count(), 1);
}

#[test]
fn disk_test_reports_write_failures() {
    let faulty = faulty(mem_disk(64, "m", "s"), Fault::FailWrite(5000));
    let mut console = console_over(FakePlatform::default(), alloc::vec![disk("vdc", faulty)]);
    let line = error(&mut console, "disk-test vdc 8 --force");
    assert_eq!(
        line,
        alloc::format!(
            "error: disk-test vdc: writing at sector {} failed: {}",
            5000 / 512 * 512,
            IoError::OutOfRange
        )
    );
}

#[test]
fn disk_test_argument_errors() {
    let mut console = console();
    let cases = [
        (
            "disk-test",
            "error: disk-test: which disk? (usage: disk-test DISK [MIB] [--force])",
        ),
        (
            "disk-test vdz",
            "error: disk-test: unknown disk or device 'vdz' (see disks and ls)",
        ),
        (
            "disk-test /dev/vdz 1",
            "error: disk-test: unknown disk or device '/dev/vdz' (see disks and ls)",
        ),
        (
            "disk-test vda 0",
            "error: disk-test: size '0' is not a whole number of MiB between 1 and 1048576",
        ),
        (
            "disk-test vda lots",
            "error: disk-test: size 'lots' is not a whole number of MiB between 1 and 1048576",
        ),
        (
            "disk-test vda 65",
            "error: disk-test: vda holds only 64.00 MiB; choose at most 64 MiB",
        ),
        (
            "disk-test vda 1 2",
            "error: disk-test: too many arguments (usage: disk-test DISK [MIB] [--force])",
        ),
        (
            "disk-test vda --quick",
            "error: disk-test: unknown option '--quick' (usage: disk-test DISK [MIB] [--force])",
        ),
    ];
    for (line, expected) in cases {
        assert_eq!(error(&mut console, line), expected, "{line}");
    }
}

#[test]
fn disk_test_refuses_read_only_disks() {
    let mut info = MemDisk::new(4096).info().clone();
    info.read_only = true;
    let mut console = console_over(
        FakePlatform::default(),
        alloc::vec![disk("vdb", MemDisk::with_info(info))],
    );
    assert_eq!(
        error(&mut console, "disk-test vdb 1"),
        "error: disk-test: vdb is read-only"
    );
}

#[test]
fn ctrl_c_interrupts_a_disk_test_and_typeahead_runs_after() {
    let mut console = console();
    let mut out = String::new();
    for byte in b"disk-test vda 32\ruptime\r" {
        console.input(*byte, &mut out);
    }
    assert!(console.busy());
    console.poll(&mut out);
    console.input(0x03, &mut out);
    while console.poll(&mut out) {}
    assert!(!console.busy());
    assert!(
        out.contains(
            "error: disk-test vda interrupted; the tested range holds partial test data\r\n\
             thinbox> uptime\r\nup "
        ),
        "{out}"
    );
    assert!(out.ends_with(PROMPT));
    // The interrupted test left nothing in flight: the disk works as before.
    assert!(run(&mut console, "disk-test vda 1 --force").contains("OK"));
}

#[test]
fn events_during_a_job_are_plain_lines_and_at_the_prompt_redraw_it() {
    let mut console = console();
    let mut out = String::new();
    console.start(&mut out);
    out.clear();
    console.editor.prompt(&mut out).unwrap();
    for byte in b"dis" {
        console.input(*byte, &mut out);
    }
    console.event("pool 0 low water mark", &mut out);
    assert_eq!(
        out,
        "thinbox> dis\r\x1b[Kevent: pool 0 low water mark\r\nthinbox> dis"
    );
    out.clear();
    for byte in b"k-test vda 8\r" {
        console.input(*byte, &mut out);
    }
    console.event("pool 0 out of data space", &mut out);
    assert!(
        out.ends_with("vda 8\r\nevent: pool 0 out of data space\r\n"),
        "{out:?}"
    );
    while console.poll(&mut out) {}
}
