//! `run`: boot the appliance with its serial console on this terminal, or run `--exec`
//! console commands and print the transcript.

use std::fs;
use std::io::{self, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::thread;
use std::time::Duration;

use qemu_test::{
    Appliance, ConsoleMode, EXIT_PANIC, EXIT_SHUTDOWN, Firmware, NbdForward, NbdFront, Options,
    PORT_ATTEMPTS, PROMPT,
};
use rustix::termios;

use crate::{Failure, RunArgs};

const MIB: u64 = 1 << 20;

/// A disk a newcomer gets without naming any.
struct DefaultDisk {
    name: &'static str,
    size: u64,
    kind: DiskKind,
}

/// How a default disk is attached and prepared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DiskKind {
    Virtio,
    /// virtio-blk, with the configuration area written when the image is created, so
    /// that what is set up on the default disks comes back after a reboot.
    Config,
    Nvme,
}

/// Pool metadata, pool data, configuration and an NVMe disk: sparse files in the target
/// directory, created once and kept between runs like real disks.
const DEFAULT_DISKS: [DefaultDisk; 4] = [
    DefaultDisk {
        name: "meta.img",
        size: 64 * MIB,
        kind: DiskKind::Virtio,
    },
    DefaultDisk {
        name: "data.img",
        size: 4096 * MIB,
        kind: DiskKind::Virtio,
    },
    // The smallest disk `config init` takes: the 1 MiB area and 1 MiB besides.
    DefaultDisk {
        name: "config.img",
        size: 2 * MIB,
        kind: DiskKind::Config,
    },
    DefaultDisk {
        name: "nvme.img",
        size: 1024 * MIB,
        kind: DiskKind::Nvme,
    },
];

/// NBD's registered port, which clients assume when a URI names none: forwarded from
/// the host unless `--nbd-port` names another or something else listens on it.
const DEFAULT_NBD_PORT: u16 = 10809;

pub fn run(args: &RunArgs) -> Result<ExitCode, Failure> {
    let commands = exec_commands(&args.exec)?;
    let mut options = options(args)?;
    options.validate()?;
    qemu_test::require_host_tools(options.firmware)?;
    let front = nbd_front(&mut options)?;
    if args.exec.is_empty() {
        interactive(&options, front.as_ref())
    } else {
        exec(options, front.as_ref(), commands)
    }
}

/// On the user network, the runner listens on the NBD port itself and passes the
/// connections on to QEMU's forward, now on a free port, through an [`NbdFront`]: the
/// forward alone listens with a backlog of one, and a burst of clients (one
/// `nbdcopy` opens four connections) would leave some waiting forever.
fn nbd_front(options: &mut Options) -> Result<Option<NbdFront>, Failure> {
    let forward = match options.nbd {
        Some(forward) if !options.net.is_tap() => forward,
        _ => return Ok(None),
    };
    let bind = |port| TcpListener::bind((Ipv4Addr::LOCALHOST, port));
    let listener = match forward {
        NbdForward::Port(port) => bind(port),
        NbdForward::Preferred(port) => bind(port).or_else(|_| bind(0)),
        NbdForward::AnyFree => bind(0),
    }
    .map_err(|error| Failure::failed(format!("listening for NBD clients on 127.0.0.1: {error}")))?;
    options.nbd = Some(NbdForward::AnyFree);
    let front = NbdFront::start(listener)
        .map_err(|error| Failure::failed(format!("listening for NBD clients: {error}")))?;
    Ok(Some(front))
}

/// Points `front` at QEMU's forward `forwarded`; returns the port clients use.
fn clients_port(front: Option<&NbdFront>, forwarded: Option<u16>) -> Option<u16> {
    match (front, forwarded) {
        (Some(front), Some(port)) => {
            front.forward_to(port);
            Some(front.port())
        }
        (None, port) => port,
        (Some(_), None) => None,
    }
}

/// The commands to send before the runner's own `shutdown`: a final `shutdown` is that
/// shutdown, anywhere else it would end the session early.
fn exec_commands(exec: &[String]) -> Result<&[String], Failure> {
    let is_shutdown = |command: &String| command.trim() == "shutdown";
    let commands = match exec.split_last() {
        Some((last, rest)) if is_shutdown(last) => rest,
        _ => exec,
    };
    if commands.iter().any(is_shutdown) {
        return Err(Failure::usage(
            "--exec shutdown can only come last (the runner shuts down after the last command)",
        ));
    }
    if commands
        .iter()
        .any(|command| command.contains(['\r', '\n']))
    {
        return Err(Failure::usage("each --exec takes one console line"));
    }
    Ok(commands)
}

fn options(args: &RunArgs) -> Result<Options, Failure> {
    // Before any default disk is made.
    args.net.check().map_err(Failure::usage)?;
    let mut options = if args.uefi {
        Options::uefi()
    } else {
        Options::bios()
    };
    options.image = args.image.clone();
    options.memory_mib = args.memory;
    options.accel = args.accel;
    options.nic = args.nic;
    options.net = args.net.clone();
    options.nbd = Some(
        args.nbd_port
            .map_or(NbdForward::Preferred(DEFAULT_NBD_PORT), NbdForward::Port),
    );
    options.timeouts.command = Duration::from_secs(args.timeout);
    if args.disks.is_empty() && args.nvme.is_empty() {
        let dir = disk_dir(args)?;
        fs::create_dir_all(&dir)
            .map_err(|error| Failure::failed(format!("creating {}: {error}", dir.display())))?;
        for disk in DEFAULT_DISKS {
            let path = dir.join(disk.name);
            if !path.exists() {
                create_default_disk(&path, &disk)?;
            }
            match disk.kind {
                DiskKind::Virtio | DiskKind::Config => options.disks.push(path),
                DiskKind::Nvme => options.nvme.push(path),
            }
        }
    } else {
        options.disks = args.disks.clone();
        options.nvme = args.nvme.clone();
    }
    Ok(options)
}

/// Where the default disks live: `--disk-dir`, else `appliance/` in the target directory.
fn disk_dir(args: &RunArgs) -> Result<PathBuf, Failure> {
    match &args.disk_dir {
        Some(dir) => Ok(dir.clone()),
        None => Ok(target_dir()?.join("appliance")),
    }
}

/// Creates a default disk's sparse image (and its configuration area); a half-made
/// image is removed, so the next run makes it again.
fn create_default_disk(path: &Path, disk: &DefaultDisk) -> Result<(), Failure> {
    let made = qemu_test::create_disk(path, disk.size)
        .map_err(|error| error.to_string())
        .and_then(|()| match disk.kind {
            DiskKind::Config => crate::offline::init_config_disk(path),
            DiskKind::Virtio | DiskKind::Nvme => Ok(()),
        });
    if let Err(why) = made {
        let _ = fs::remove_file(path);
        return Err(Failure::failed(format!(
            "creating {}: {why}",
            path.display()
        )));
    }
    let role = if disk.kind == DiskKind::Config {
        "; the configuration disk"
    } else {
        ""
    };
    eprintln!(
        "thinbox: created {} ({} MiB, sparse{role})",
        path.display(),
        disk.size / MIB
    );
    Ok(())
}

/// The cargo target directory the runner was built into: the nearest ancestor of the
/// executable that cargo tagged with `CACHEDIR.TAG`, else `$CARGO_TARGET_DIR`, else
/// the executable's own directory.
fn target_dir() -> Result<PathBuf, Failure> {
    let exe = std::env::current_exe()
        .map_err(|error| Failure::failed(format!("locating the runner executable: {error}")))?;
    let tagged = exe
        .ancestors()
        .skip(1)
        .find(|dir| dir.join("CACHEDIR.TAG").is_file());
    Ok(match (tagged, std::env::var_os("CARGO_TARGET_DIR")) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(dir)) => PathBuf::from(dir),
        (None, None) => exe.parent().unwrap_or(Path::new(".")).to_path_buf(),
    })
}

fn interactive(options: &Options, front: Option<&NbdFront>) -> Result<ExitCode, Failure> {
    let mut attempt = 1;
    loop {
        let (command, forwarded) = options.qemu_command(ConsoleMode::Terminal)?;
        let nbd_port = clients_port(front, forwarded);
        match (attempt, nbd_port) {
            (1, _) => describe(options, nbd_port),
            (_, Some(port)) if front.is_none() => announce_nbd(port),
            (_, _) => {}
        }
        let (status, stderr) = on_terminal(command)?;
        if let Some(port) = forwarded
            && attempt < PORT_ATTEMPTS
            && options.nbd.is_some_and(|nbd| nbd.lost_its_port(&stderr))
        {
            eprintln!("thinbox: port {port} was taken before QEMU listened on it; trying another");
            attempt += 1;
            continue;
        }
        return ended(status, &stderr);
    }
}

/// Runs QEMU with the console on this terminal until it exits; returns how it ended
/// and what it wrote to stderr.
fn on_terminal(mut command: Command) -> Result<(ExitStatus, String), Failure> {
    let terminal = SavedTerminal::save();
    command.stderr(Stdio::piped());
    let mut qemu = qemu_test::spawn_tied(command)
        .map_err(|error| Failure::failed(format!("starting qemu-system-x86_64: {error}")))?;
    let mut stderr = qemu.stderr.take().expect("stderr is piped");
    let collector = thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });
    let status = qemu.wait();
    drop(terminal);
    let stderr = collector.join().unwrap_or_default();
    let status = status.map_err(|error| Failure::failed(format!("waiting for QEMU: {error}")))?;
    Ok((status, stderr))
}

/// Tells the user what is attached and how to get out again.
fn describe(options: &Options, nbd_port: Option<u16>) {
    let firmware = match options.firmware {
        Firmware::Bios => "BIOS",
        Firmware::Uefi => "UEFI",
    };
    let image = match &options.image {
        Some(path) => format!("{} with {firmware} firmware", path.display()),
        None => format!("the {firmware} image"),
    };
    eprintln!(
        "thinbox: booting {image} under QEMU ({}, {} MiB, {} NIC on the {} network)",
        options.accel, options.memory_mib, options.nic, options.net
    );
    let virtio = options.disks.iter().enumerate().map(|(index, path)| {
        let letter = char::from(b'a' + (index % 26) as u8);
        (format!("vd{letter}"), path)
    });
    let nvme =
        (options.nvme.iter().enumerate()).map(|(index, path)| (format!("nvme{index}n1"), path));
    for (name, path) in virtio.chain(nvme) {
        let size = fs::metadata(path).map(|meta| meta.len() / MIB).unwrap_or(0);
        eprintln!("thinbox:   {name} = {} ({size} MiB)", path.display());
    }
    if let Some(port) = nbd_port {
        announce_nbd(port);
    } else if options.net.is_tap() {
        eprintln!(
            "thinbox: NBD clients connect to the address `net set` gives the appliance, \
             port {}",
            qemu_test::NBD_GUEST_PORT
        );
    }
    eprintln!(
        "thinbox: this terminal is the serial console; `shutdown` powers off, Ctrl-A x quits \
         QEMU at once, Ctrl-A h lists QEMU's keys"
    );
}

/// Where NBD clients on this host connect, on a line of its own.
fn announce_nbd(port: u16) {
    eprintln!("NBD: nbd://127.0.0.1:{port}/<device>");
}

/// The runner's verdict on how QEMU ended.
fn ended(status: ExitStatus, stderr: &str) -> Result<ExitCode, Failure> {
    let complaint = || {
        qemu_test::qemu_complaint(stderr)
            .map(|line| format!("\n{line}"))
            .unwrap_or_default()
    };
    match status.code() {
        Some(EXIT_SHUTDOWN) => {
            eprintln!("thinbox: the appliance powered off");
            Ok(ExitCode::SUCCESS)
        }
        Some(0) => {
            eprintln!("thinbox: QEMU stopped (quit from the console, or the machine reset)");
            Ok(ExitCode::SUCCESS)
        }
        Some(EXIT_PANIC) => Err(Failure::failed(
            "the appliance panicked (its KERNEL PANIC report is above)",
        )),
        Some(code) => Err(Failure::failed(format!(
            "QEMU exited with status {code}{}",
            complaint()
        ))),
        None => Err(Failure::failed(format!(
            "QEMU was killed by a signal{}",
            complaint()
        ))),
    }
}

/// Boots, runs `commands`, shuts down, printing the transcript as it goes.
fn exec(
    options: Options,
    front: Option<&NbdFront>,
    commands: &[String],
) -> Result<ExitCode, Failure> {
    let mut appliance = Appliance::boot(options).map_err(runtime)?;
    if let Some(port) = clients_port(front, appliance.nbd_port()) {
        announce_nbd(port);
    }
    for line in appliance.boot_log() {
        println!("{line}");
    }
    let mut failed = 0;
    for command in commands {
        println!("{PROMPT}{command}");
        let output = appliance.console(command).map_err(runtime)?;
        if !output.is_empty() {
            println!("{output}");
        }
        for event in appliance.take_events() {
            println!("{event}");
        }
        if output.lines().any(|line| line.starts_with("error: ")) {
            failed += 1;
        }
    }
    println!("{PROMPT}shutdown");
    let said = appliance.shutdown().map_err(runtime)?;
    if !said.is_empty() {
        println!("{said}");
    }
    if failed > 0 {
        return Err(Failure::failed(format!(
            "{failed} of {} commands answered with an error",
            commands.len()
        )));
    }
    Ok(ExitCode::SUCCESS)
}

/// A failure of the running appliance, after showing what it printed last.
fn runtime(error: qemu_test::Error) -> Failure {
    if let Some(tail) = error
        .transcript_tail()
        .filter(|tail| !tail.trim().is_empty())
    {
        eprintln!("--- last serial output ---\n{tail}\n---");
    }
    Failure::from(error)
}

/// The terminal's settings from before QEMU switched it to raw mode, put back when
/// dropped: QEMU restores them itself, except when it is killed.
struct SavedTerminal(Option<termios::Termios>);

impl SavedTerminal {
    fn save() -> SavedTerminal {
        let stdin = io::stdin();
        let saved = termios::isatty(&stdin)
            .then(|| termios::tcgetattr(&stdin).ok())
            .flatten();
        SavedTerminal(saved)
    }
}

impl Drop for SavedTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = termios::tcsetattr(io::stdin(), termios::OptionalActions::Now, saved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| item.to_string()).collect()
    }

    #[test]
    fn a_final_shutdown_is_the_runners_own() {
        let exec = strings(&["help", "shutdown"]);
        assert_eq!(exec_commands(&exec).unwrap(), &exec[..1]);
        let exec = strings(&["help", "status"]);
        assert_eq!(exec_commands(&exec).unwrap(), &exec[..]);
    }

    #[test]
    fn shutdown_before_other_commands_is_refused() {
        let error = exec_commands(&strings(&["shutdown", "help"])).unwrap_err();
        assert_eq!(error.code, 2);
        assert!(error.message.contains("can only come last"));
    }

    #[test]
    fn default_disks_live_in_the_target_directory() {
        let target = target_dir().unwrap();
        assert!(
            target.join("CACHEDIR.TAG").is_file(),
            "{}",
            target.display()
        );
        let dir = disk_dir(&RunArgs::default()).unwrap();
        assert_eq!(dir, target.join("appliance"));
        let elsewhere = RunArgs {
            disk_dir: Some(PathBuf::from("disks")),
            ..RunArgs::default()
        };
        assert_eq!(disk_dir(&elsewhere).unwrap(), PathBuf::from("disks"));
    }

    #[test]
    fn default_disks_are_made_once_with_a_configuration_area() {
        let scratch = qemu_test::Scratch::new().unwrap();
        let dir = scratch.path().join("appliance");
        let args = RunArgs {
            disk_dir: Some(dir.clone()),
            ..RunArgs::default()
        };
        let made = options(&args).unwrap();
        let names = ["meta.img", "data.img", "config.img"].map(|name| dir.join(name));
        assert_eq!(made.disks, names);
        assert_eq!(made.nvme, [dir.join("nvme.img")]);
        for (path, size) in made.disks.iter().chain(&made.nvme).zip([64, 4096, 2, 1024]) {
            assert_eq!(fs::metadata(path).unwrap().len(), size * MIB);
        }
        let config = fs::read(dir.join("config.img")).unwrap();
        assert_eq!(&config[..16], b"thinbox config\0\0");
        assert_eq!(made.nbd, Some(NbdForward::Preferred(10809)));

        // Kept as they are on the next run.
        fs::write(dir.join("data.img"), b"written").unwrap();
        options(&args).unwrap();
        assert_eq!(fs::read(dir.join("data.img")).unwrap(), b"written");
        assert_eq!(fs::read(dir.join("config.img")).unwrap(), config);
    }

    #[test]
    fn named_disks_replace_the_defaults() {
        let args = RunArgs {
            nvme: vec![PathBuf::from("n.img")],
            nbd_port: Some(7000),
            uefi: true,
            ..RunArgs::default()
        };
        let options = options(&args).unwrap();
        assert!(options.disks.is_empty());
        assert_eq!(options.nvme, [PathBuf::from("n.img")]);
        assert_eq!(options.nbd, Some(NbdForward::Port(7000)));
        assert_eq!(options.firmware, Firmware::Uefi);
    }

    #[test]
    fn how_qemu_ended() {
        use std::os::unix::process::ExitStatusExt;
        let exit = |code: i32| ExitStatus::from_raw(code << 8);
        assert!(ended(exit(33), "").is_ok());
        assert!(ended(exit(0), "").is_ok());
        let panic = ended(exit(35), "").unwrap_err();
        assert!(panic.message.contains("panicked"));
        let stderr = "qemu-system-x86_64: -drive file=x: Failed to get \"write\" lock\n";
        let failed = ended(exit(1), stderr).unwrap_err();
        assert_eq!(
            failed.message,
            "QEMU exited with status 1\nqemu-system-x86_64: -drive file=x: Failed to get \"write\" lock"
        );
        assert!(ended(ExitStatus::from_raw(9), "").is_err());
    }
}
