//! `run`: boot the appliance with its serial console on this terminal, or run `--exec`
//! console commands and print the transcript.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::thread;
use std::time::Duration;

use qemu_test::{
    Appliance, ConsoleMode, EXIT_PANIC, EXIT_SHUTDOWN, Firmware, NbdForward, Options, PROMPT,
};
use rustix::termios;

use crate::{Failure, RunArgs};

const MIB: u64 = 1 << 20;

/// A disk a newcomer gets without naming any.
struct DefaultDisk {
    name: &'static str,
    size: u64,
    nvme: bool,
}

/// Pool metadata, pool data and an NVMe disk: sparse files in the target directory,
/// created once and kept between runs like real disks.
const DEFAULT_DISKS: [DefaultDisk; 3] = [
    DefaultDisk {
        name: "meta.img",
        size: 64 * MIB,
        nvme: false,
    },
    DefaultDisk {
        name: "data.img",
        size: 4096 * MIB,
        nvme: false,
    },
    DefaultDisk {
        name: "nvme.img",
        size: 1024 * MIB,
        nvme: true,
    },
];

pub fn run(args: &RunArgs) -> Result<ExitCode, Failure> {
    let commands = exec_commands(&args.exec)?;
    let options = options(args)?;
    options.validate()?;
    qemu_test::require_host_tools(options.firmware)?;
    if args.exec.is_empty() {
        interactive(&options)
    } else {
        exec(options, commands)
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
    let mut options = if args.uefi {
        Options::uefi()
    } else {
        Options::bios()
    };
    options.image = args.image.clone();
    options.memory_mib = args.memory;
    options.accel = args.accel;
    options.nbd = args.nbd_port.map(NbdForward::Port);
    options.timeouts.command = Duration::from_secs(args.timeout);
    if args.disks.is_empty() && args.nvme.is_empty() {
        let dir = target_dir()?.join("appliance");
        fs::create_dir_all(&dir)
            .map_err(|error| Failure::failed(format!("creating {}: {error}", dir.display())))?;
        for disk in DEFAULT_DISKS {
            let path = dir.join(disk.name);
            if !path.exists() {
                qemu_test::create_disk(&path, disk.size).map_err(|error| {
                    Failure::failed(format!("creating {}: {error}", path.display()))
                })?;
                eprintln!(
                    "thinbox: created {} ({} MiB, sparse)",
                    path.display(),
                    disk.size / MIB
                );
            }
            if disk.nvme {
                options.nvme.push(path);
            } else {
                options.disks.push(path);
            }
        }
    } else {
        options.disks = args.disks.clone();
        options.nvme = args.nvme.clone();
    }
    Ok(options)
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

fn interactive(options: &Options) -> Result<ExitCode, Failure> {
    let (mut command, nbd_port) = options.qemu_command(ConsoleMode::Terminal)?;
    describe(options, nbd_port);
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
    ended(status, &stderr)
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
        "thinbox: booting {image} under QEMU ({}, {} MiB)",
        options.accel, options.memory_mib
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
        eprintln!("thinbox: NBD exports at nbd://127.0.0.1:{port}/NAME");
    }
    eprintln!(
        "thinbox: this terminal is the serial console; `shutdown` powers off, Ctrl-A x quits \
         QEMU at once, Ctrl-A h lists QEMU's keys"
    );
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
fn exec(options: Options, commands: &[String]) -> Result<ExitCode, Failure> {
    let mut appliance = Appliance::boot(options).map_err(runtime)?;
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
        let options = options(&RunArgs::default()).unwrap();
        let target = target_dir().unwrap();
        assert!(
            target.join("CACHEDIR.TAG").is_file(),
            "{}",
            target.display()
        );
        assert_eq!(options.disks.len(), 2);
        assert_eq!(options.nvme.len(), 1);
        for (path, size) in options
            .disks
            .iter()
            .chain(&options.nvme)
            .zip([64, 4096, 1024])
        {
            assert!(path.starts_with(&target));
            assert_eq!(fs::metadata(path).unwrap().len(), size * MIB);
        }
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
