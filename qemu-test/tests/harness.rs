//! The harness itself: the console protocol against a stand-in appliance (deadlines,
//! panics, early exits, events), option checks, real boots of both images, and the
//! runner binary end to end.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{Appliance, ConsoleMode, Error, Options, Scratch, Timeouts, wait_for_greeting};

const RUNNER: &str = env!("CARGO_BIN_FILE_THINBOX");
const MIB: u64 = 1 << 20;

fn fake(mode: &str) -> Result<Appliance, Error> {
    fake_with(mode, Timeouts::default())
}

fn fake_with(mode: &str, timeouts: Timeouts) -> Result<Appliance, Error> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fake-appliance"));
    command.arg(mode);
    Appliance::start(command, None, timeouts)
}

fn short(boot: u64) -> Timeouts {
    Timeouts {
        boot: Duration::from_millis(boot),
        ..Timeouts::default()
    }
}

#[test]
fn console_commands_and_their_output() {
    let mut appliance = fake("console").unwrap();
    assert_eq!(appliance.banner(), Some("thinbox 0.0.0-fake ready"));
    assert_eq!(
        appliance.boot_log(),
        ["firmware noise", "thinbox 0.0.0-fake ready"]
    );
    assert_eq!(
        appliance.console("help").unwrap(),
        "commands:\n  help\n  echo TEXT\n  shutdown"
    );
    assert_eq!(
        appliance.console("echo two  spaces").unwrap(),
        "two  spaces"
    );
    assert_eq!(appliance.console("").unwrap(), "");
    assert_eq!(
        appliance.console("bogus").unwrap(),
        "error: unknown command 'bogus' (try help)"
    );
    let refused = appliance.console_ok("fail").unwrap_err();
    assert!(
        matches!(&refused, Error::Command { line, .. } if line == "error: fail failed as asked")
    );
    assert_eq!(appliance.console_ok("echo fine").unwrap(), "fine");
    assert!(matches!(
        appliance.console("echo a\necho b"),
        Err(Error::Config(_))
    ));
    let transcript = appliance.transcript();
    assert!(transcript.contains("thinbox> echo fine\r\nfine\r\nthinbox> "));
    assert_eq!(
        appliance.shutdown().unwrap(),
        "flushing disks\npowering off"
    );
}

#[test]
fn a_long_reply_written_a_byte_at_a_time_arrives_whole() {
    // 40,000 lines, 500 KiB, each byte its own write: the reply must not cost the
    // harness time in the square of its length (that ran past the command timeout;
    // half of this took 82 s then, 0.3 s now).
    let mut appliance = fake("console").unwrap();
    let reply = appliance.console("lines 40000").unwrap();
    let lines: Vec<&str> = reply.lines().collect();
    assert_eq!(lines.len(), 40_000);
    assert_eq!((lines[0], lines[39_999]), ("line 0", "line 39999"));
    assert_eq!(appliance.console("echo after").unwrap(), "after");
}

#[test]
fn a_command_that_never_answers_times_out() {
    let mut appliance = fake("console").unwrap();
    let started = Instant::now();
    let error = appliance
        .console_with_timeout("hang", Duration::from_millis(300))
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let Error::Timeout { waiting_for, .. } = &error else {
        panic!("not a timeout: {error:?}");
    };
    assert_eq!(waiting_for, "the reply to `hang`");
    assert!(
        error
            .transcript_tail()
            .unwrap()
            .ends_with("thinbox> hang\n")
    );
    assert!(format!("{error:?}").contains("--- last serial output ---"));
}

#[test]
fn a_boot_without_a_prompt_times_out() {
    let error = fake_with("silent", short(300)).err().unwrap();
    assert!(
        matches!(&error, Error::Timeout { waiting_for, .. } if waiting_for == "the first prompt after boot")
    );
    assert!(
        error
            .transcript_tail()
            .unwrap()
            .contains("thinbox 0.0.0-fake ready")
    );
}

#[test]
fn a_kernel_panic_is_an_error_with_the_report() {
    let mut appliance = fake("console").unwrap();
    let error = appliance.console("panic").unwrap_err();
    let Error::Panic {
        message,
        status,
        tail,
    } = &error
    else {
        panic!("not a panic: {error:?}");
    };
    assert_eq!(
        message,
        "KERNEL PANIC: panicked at console.rs:1:1: as asked"
    );
    assert_eq!(*status, Some(qemu_test::EXIT_PANIC));
    assert!(tail.contains("rip=0x0000000000201000"), "{tail}");
    assert_eq!(
        error.to_string(),
        "the appliance panicked: KERNEL PANIC: panicked at console.rs:1:1: as asked"
    );
}

#[test]
fn a_panic_during_boot_is_an_error() {
    let error = fake("boot-panic").err().unwrap();
    assert!(
        matches!(
            error,
            Error::Panic {
                status: Some(35),
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn qemu_stopping_early_is_one_line_plus_its_complaint() {
    let error = fake("fail-early").err().unwrap();
    assert_eq!(error.exit_status(), Some(1));
    let shown = error.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(
        lines[0],
        "QEMU exited with status 1 while waiting for the first prompt after boot"
    );
    assert!(lines[1].ends_with("could not set up host forwarding rule 'tcp:127.0.0.1:1-:10809'"));
    assert_eq!(lines.len(), 2);
    assert!(format!("{error:?}").contains("warning: nothing to see"));
}

#[test]
fn an_exit_in_the_middle_of_a_command_is_an_error() {
    let mut appliance = fake("console").unwrap();
    let error = appliance.console("exit 0").unwrap_err();
    assert!(
        matches!(&error, Error::Exited { status: Some(0), waiting_for, .. } if waiting_for == "the reply to `exit 0`"),
        "{error:?}"
    );
    let error = appliance.console("echo anyone").unwrap_err();
    assert!(matches!(error, Error::Exited { .. }), "{error:?}");
}

#[test]
fn events_are_kept_apart_from_replies() {
    let mut appliance = fake("console").unwrap();
    assert_eq!(appliance.console("event 50").unwrap(), "");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(appliance.console("echo after").unwrap(), "after");
    assert_eq!(appliance.take_events(), ["event: pool 0 low water mark"]);
    assert!(appliance.take_events().is_empty());
    assert_eq!(appliance.console("busy-event").unwrap(), "working\ndone");
    assert_eq!(appliance.take_events(), ["event: pool 0 low water mark"]);
}

#[test]
fn an_event_while_a_line_is_half_typed() {
    let mut appliance = fake("console").unwrap();
    appliance.console("event 200").unwrap();
    appliance.type_partial("ec").unwrap();
    let second = Duration::from_secs(5);
    let seen = appliance.read_until("event: ", second).unwrap();
    assert!(seen.starts_with("ec"), "{seen:?}");
    appliance.read_until("thinbox> ec", second).unwrap();
    assert_eq!(appliance.console("ho redrawn").unwrap(), "redrawn");
}

#[test]
fn ctrl_c_clears_the_line() {
    let mut appliance = fake("console").unwrap();
    appliance.type_partial("garbage\x03").unwrap();
    appliance
        .read_until("^C\r\nthinbox> ", Duration::from_secs(5))
        .unwrap();
    assert_eq!(appliance.console("echo clean").unwrap(), "clean");
}

#[test]
fn read_until_times_out_too() {
    let mut appliance = fake("console").unwrap();
    let error = appliance
        .read_until("event: ", Duration::from_millis(200))
        .unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
}

#[test]
fn dropping_or_killing_leaves_no_process() {
    let appliance = fake("console").unwrap();
    let pid = appliance.pid();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(appliance);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());

    let appliance = fake("console").unwrap();
    let pid = appliance.pid();
    let transcript = appliance.kill();
    assert!(transcript.contains("thinbox 0.0.0-fake ready"));
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

/// Asserts that `options` are refused before anything starts, with a one-line message
/// containing `expected`.
fn refused(options: &Options, expected: &str) {
    let error = options.validate().unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, Error::Config(_)), "{error:?}");
    assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    assert_eq!(message.lines().count(), 1, "{message:?}");
}

#[test]
fn options_are_checked_before_qemu_starts() {
    let scratch = Scratch::new().unwrap();
    let disk = scratch.disk("disk.img", 8 * MIB).unwrap();
    let other = scratch.disk("other.img", 8 * MIB).unwrap();
    Options::bios().disk(&disk).nvme(&other).validate().unwrap();

    let missing = scratch.path().join("missing.img");
    refused(
        &Options::bios().disk(&missing),
        &format!("disk {} does not exist; create it first", missing.display()),
    );
    let twice = scratch.path().join(".").join("disk.img");
    refused(
        &Options::bios().disk(&disk).nvme(&twice),
        "is given twice (--disk",
    );
    refused(
        &Options::bios().disk(&disk).disk(&disk),
        "a disk can be attached once",
    );
    refused(&Options::bios().disk(scratch.path()), "is a directory");
    let empty = scratch.disk("empty.img", 0).unwrap();
    refused(&Options::bios().disk(&empty), "is empty; give it a size");
    let ragged = scratch.disk("ragged.img", 1000).unwrap();
    refused(
        &Options::bios().nvme(&ragged),
        "is 1000 bytes, not a whole number of 512-byte sectors",
    );
    let mut options = Options::bios();
    options.image = Some(scratch.path().join("no-such.img"));
    refused(&options, "boot image");
    refused(
        &Options::bios().memory_mib(16),
        "16 MiB of memory is too little",
    );
    refused(&Options::bios().nbd_port(0), "NBD port 0 is not a port");

    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    refused(
        &Options::bios().nbd_port(port),
        &format!("port {port} on 127.0.0.1 is already in use"),
    );
    drop(taken);
    Options::bios().nbd_port(port).validate().unwrap();
}

fn qemu() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::Ovmf]);
}

#[test]
fn qemu_refusing_to_start_is_reported_in_one_line_plus_its_own() {
    qemu();
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let (command, _) = Options::bios()
        .nbd_port(port)
        .qemu_command(ConsoleMode::Pipes)
        .unwrap();
    let error = Appliance::start(command, Some(port), Timeouts::default())
        .err()
        .unwrap();
    assert_eq!(error.exit_status(), Some(1), "{error:?}");
    let shown = error.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 2, "{shown}");
    assert!(lines[1].starts_with("qemu-system-x86_64: "), "{shown}");
    assert!(lines[1].contains("host forwarding rule"), "{shown}");
}

/// Boots `options` with a disk of each kind and an NBD forward, checks the console
/// answers, and shuts down cleanly.
fn boot_and_shut_down(options: Options, what: &str) {
    qemu();
    let scratch = Scratch::new().unwrap();
    let virtio = scratch.disk("virtio.img", 64 * MIB).unwrap();
    let nvme = scratch.disk("nvme.img", 64 * MIB).unwrap();
    let started = Instant::now();
    let mut appliance = Appliance::boot(options.disk(&virtio).nvme(&nvme).nbd()).unwrap();
    eprintln!(
        "{what}: prompt after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let banner = appliance.banner().expect("a banner").to_string();
    assert!(banner.starts_with("thinbox "), "{banner}");
    // The runner's CPU model (`-cpu max` under TCG) has RDRAND, which TLS draws on.
    assert!(
        appliance
            .boot_log()
            .iter()
            .any(|line| line == "thinbox: randomness from RDRAND, health check passed"),
        "{:?}",
        appliance.boot_log()
    );
    let port = appliance.nbd_port().expect("an NBD port");
    assert!(
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err(),
        "QEMU does not listen on the forwarded port {port}"
    );
    let help = appliance.console_ok("help").unwrap();
    assert!(!help.is_empty());
    let powered_off = appliance.shutdown().unwrap();
    assert!(powered_off.ends_with("powering off"), "{powered_off}");
}

#[test]
fn bios_image_boots_to_the_prompt() {
    boot_and_shut_down(Options::bios(), "BIOS");
}

#[test]
fn uefi_image_boots_to_the_prompt() {
    boot_and_shut_down(Options::uefi(), "UEFI");
}

#[test]
fn a_real_kernel_panic_ends_the_wait_with_its_report() {
    qemu();
    let mut appliance = Appliance::boot(Options::bios()).unwrap();
    let error = appliance.console("debug panic").unwrap_err();
    let Error::Panic {
        message, status, ..
    } = &error
    else {
        panic!("not a panic: {error:?}");
    };
    assert!(message.starts_with("KERNEL PANIC: "), "{message}");
    assert!(message.contains("deliberate panic"), "{message}");
    assert_eq!(*status, Some(qemu_test::EXIT_PANIC));
}

/// Runner boots forward host port 10809 when it is free: one at a time, so that each
/// finds the port as the previous one left it.
static RUNNER_BOOTS: Mutex<()> = Mutex::new(());

fn one_runner_at_a_time() -> MutexGuard<'static, ()> {
    RUNNER_BOOTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn runner(args: &[&str]) -> Output {
    let _turn = one_runner_at_a_time();
    Command::new(RUNNER)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the runner stopped with a usage error: status 2, one `error: ` line.
fn one_line_error(output: &Output, expected: &str) {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(expected), "{stderr:?} lacks {expected:?}");
    assert!(output.stdout.is_empty());
}

#[test]
fn runner_refuses_bad_arguments_without_booting() {
    let scratch = Scratch::new().unwrap();
    let disk = scratch.disk("disk.img", 8 * MIB).unwrap();
    let disk = disk.to_str().unwrap();
    let missing = scratch.path().join("missing.img");
    let missing = missing.to_str().unwrap();
    one_line_error(&runner(&["run", "--disk", missing]), "does not exist");
    one_line_error(
        &runner(&["--disk", disk, "--nvme", disk, "--exec", "help"]),
        "is given twice",
    );
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    one_line_error(
        &runner(&["--disk", disk, "--nbd-port", &port]),
        "is already in use; choose another --nbd-port",
    );
    one_line_error(&runner(&["--accel", "hvf"]), "unknown accelerator 'hvf'");
    one_line_error(
        &runner(&["--disk", disk, "--nic", "rtl8139"]),
        "unknown NIC 'rtl8139' (use virtio or e1000e)",
    );
    one_line_error(
        &runner(&["--disk", disk, "--net", "bridge:br0"]),
        "unknown network 'bridge:br0' (use user or tap:IFNAME)",
    );
    one_line_error(
        &runner(&["--disk", disk, "--net", "tap:tbmissing9"]),
        "tap interface tbmissing9 does not exist; create it first",
    );
    one_line_error(&runner(&["--disk", disk, "--image", missing]), "boot image");
    one_line_error(
        &runner(&["--disk", disk, "--exec", "shutdown", "--exec", "help"]),
        "can only come last",
    );
}

/// Whether process `pid` has ended (gone, or a zombie waiting for its new parent).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(") ")
            .next()
            .is_some_and(|rest| rest.starts_with('Z')),
    }
}

/// The children of process `pid`, whichever of its threads started them.
fn children(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let lists = tasks.map(|task| std::fs::read_to_string(task.unwrap().path().join("children")));
    let lists: Vec<String> = lists.map(|list| list.unwrap_or_default()).collect();
    lists
        .iter()
        .flat_map(|list| list.split_whitespace())
        .map(|pid| pid.parse().unwrap())
        .collect()
}

#[test]
fn killing_the_runner_takes_qemu_with_it() {
    qemu();
    let scratch = Scratch::new().unwrap();
    // Firmware finds nothing to boot on a blank image and waits: QEMU keeps running.
    let blank = scratch.disk("blank.img", MIB).unwrap();
    let disk = scratch.disk("disk.img", 8 * MIB).unwrap();
    let _turn = one_runner_at_a_time();
    let mut runner = Command::new(RUNNER)
        .arg("--image")
        .arg(&blank)
        .arg("--disk")
        .arg(&disk)
        .args(["--exec", "help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let qemu = loop {
        if let Some(&pid) = children(runner.id()).first() {
            break pid;
        }
        assert!(Instant::now() < deadline, "the runner started no QEMU");
        std::thread::sleep(Duration::from_millis(20));
    };
    runner.kill().unwrap();
    runner.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ended(qemu) {
        assert!(Instant::now() < deadline, "QEMU {qemu} outlived the runner");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn runner_exec_prints_the_transcript_and_fails_on_errors() {
    qemu();
    let scratch = Scratch::new().unwrap();
    let disk = scratch.disk("disk.img", 64 * MIB).unwrap();
    let disk = disk.to_str().unwrap();

    let help = runner(&["run", "--disk", disk, "--exec", "help"]);
    let stdout = text(&help.stdout);
    assert!(help.status.success(), "{stdout}{}", text(&help.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    let at = |line: &str| lines.iter().position(|seen| *seen == line);
    let help_at = at("thinbox> help").expect("the help command in the transcript");
    let shutdown_at = at("thinbox> shutdown").expect("the shutdown in the transcript");
    assert!(help_at + 1 < shutdown_at, "no help output: {stdout}");
    assert_eq!(lines.last(), Some(&"powering off"));

    let bogus = runner(&["--disk", disk, "--exec", "help", "--exec", "bogus"]);
    let stdout = text(&bogus.stdout);
    let stderr = text(&bogus.stderr);
    assert_eq!(bogus.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("thinbox> bogus\nerror: unknown command 'bogus' (try help)\n"));
    assert!(stdout.ends_with("powering off\n"), "{stdout}");
    let port = announced_nbd_port(&stderr);
    assert_eq!(
        stderr,
        format!(
            "NBD: nbd://127.0.0.1:{port}/<device>\n\
             error: 1 of 2 commands answered with an error\n"
        )
    );
}

/// The port of the runner's one `NBD: nbd://127.0.0.1:PORT/<device>` line.
fn announced_nbd_port(stderr: &str) -> u16 {
    let ports: Vec<u16> = stderr
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("NBD: nbd://127.0.0.1:")?;
            rest.strip_suffix("/<device>")?.parse().ok()
        })
        .collect();
    assert_eq!(ports.len(), 1, "{stderr}");
    ports[0]
}

#[test]
fn default_disks_keep_what_was_created_across_a_reboot() {
    qemu();
    let scratch = Scratch::new().unwrap();
    let dir = scratch.path().join("appliance");
    let dir = dir.to_str().unwrap();
    let first = runner(&[
        "--disk-dir",
        dir,
        "--exec",
        "pool create pool vda vdb",
        "--exec",
        "thin create vol pool --size 1G",
    ]);
    let (stdout, stderr) = (text(&first.stdout), text(&first.stderr));
    assert!(first.status.success(), "{stdout}{stderr}");
    let created: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("thinbox: created "))
        .collect();
    assert_eq!(
        created,
        [
            format!("thinbox: created {dir}/meta.img (64 MiB, sparse)"),
            format!("thinbox: created {dir}/data.img (4096 MiB, sparse)"),
            format!("thinbox: created {dir}/config.img (2 MiB, sparse; the configuration disk)"),
            format!("thinbox: created {dir}/nvme.img (1024 MiB, sparse)"),
        ]
    );
    announced_nbd_port(&stderr);
    // The configuration area is found on the first boot already (generation 1 is the
    // empty configuration written with it); each change saves the next generation.
    assert!(
        stdout.contains(
            "config: vdc generation 1\nconfig: 0 of 0 devices active\n\
             thinbox> pool create pool vda vdb\n"
        ),
        "{stdout}"
    );

    let second = runner(&["--disk-dir", dir, "--exec", "ls", "--exec", "table"]);
    let (stdout, stderr) = (text(&second.stdout), text(&second.stderr));
    assert!(second.status.success(), "{stdout}{stderr}");
    assert!(!stderr.contains("created"), "{stderr}");
    assert!(
        stdout.contains(
            "config: vdc generation 3\nconfig: 2 of 2 devices active\n\
             thinbox> ls\npool  (thin-pool)\nvol   (thin)\n\
             thinbox> table\n\
             pool: 0 8388608 thin-pool vda vdb 128 0 0\nvol: 0 2097152 thin pool 0\n"
        ),
        "{stdout}"
    );
}

/// Twenty connections opened at once (five `nbdcopy` clients' worth) all get the
/// server's greeting: the runner's port takes a burst that QEMU's forward alone,
/// with its backlog of one, would leave some of waiting forever.
fn every_client_of_a_burst_is_greeted(port: u16) {
    let clients: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(120)))
                    .unwrap();
                let mut greeting = [0; 16];
                stream.read_exact(&mut greeting).map(|()| greeting)
            })
        })
        .collect();
    for client in clients {
        assert_eq!(&client.join().unwrap().unwrap(), b"NBDMAGICIHAVEOPT");
    }
}

/// A runner process, killed (with its QEMU) if a test stops before it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn an_interactive_run_forwards_nbd_by_default() {
    qemu();
    let scratch = Scratch::new().unwrap();
    let _turn = one_runner_at_a_time();
    let mut runner = Running(
        Command::new(RUNNER)
            .arg("--disk-dir")
            .arg(scratch.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = BufReader::new(runner.0.stderr.take().unwrap());
    // The runner describes the set-up, ending with how to get out again.
    let mut told = String::new();
    while !told.contains("this terminal is the serial console") {
        assert!(stderr.read_line(&mut told).unwrap() > 0, "{told}");
    }
    let port = announced_nbd_port(&told);
    wait_for_greeting(port, Duration::from_secs(120)).unwrap();
    every_client_of_a_burst_is_greeted(port);

    // Power off from the console once it prompts.
    let mut console = runner.0.stdout.take().unwrap();
    let mut serial = Vec::new();
    let mut chunk = [0; 4096];
    while !String::from_utf8_lossy(&serial).contains("thinbox> ") {
        let read = console.read(&mut chunk).unwrap();
        assert!(read > 0, "{}", String::from_utf8_lossy(&serial));
        serial.extend_from_slice(&chunk[..read]);
    }
    runner
        .0
        .stdin
        .take()
        .unwrap()
        .write_all(b"shutdown\n")
        .unwrap();
    console.read_to_end(&mut serial).unwrap();
    stderr.read_to_string(&mut told).unwrap();
    assert!(runner.0.wait().unwrap().success(), "{told}");
    assert!(String::from_utf8_lossy(&serial).contains("powering off"));
    assert!(
        told.ends_with("thinbox: the appliance powered off\n"),
        "{told}"
    );
}
