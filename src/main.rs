//! The host-side runner: boots the appliance under QEMU with its serial console on
//! this terminal (or runs console commands for a script), and writes the boot images
//! for real hardware.

mod offline;
mod run;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use qemu_test::{Accel, NetBackend, Nic};

#[derive(Parser, Debug)]
#[command(
    name = "thinbox",
    version,
    about = "Boot the thinbox storage appliance under QEMU, or write its boot images",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Options of `run`, which is what happens without a subcommand.
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot the appliance with its serial console on this terminal (the default).
    Run(RunArgs),
    /// Write bios.img and uefi.img for installing on real hardware.
    Image(ImageArgs),
    /// Run the console on this host over disk image files (prepare and inspect disks,
    /// serve their devices over NBD).
    Offline(offline::OfflineArgs),
}

#[derive(Args, Debug, Default, Clone)]
pub struct RunArgs {
    /// Attach a virtio-blk disk image (repeatable; the appliance names them vda, vdb, ...
    /// in order). Without --disk and --nvme, default disks under the target directory
    /// are created and attached.
    #[arg(long = "disk", value_name = "PATH")]
    pub disks: Vec<PathBuf>,
    /// Attach an NVMe disk image (repeatable; nvme0n1, nvme1n1, ...).
    #[arg(long = "nvme", value_name = "PATH")]
    pub nvme: Vec<PathBuf>,
    /// Keep the default disks in DIR (created if missing) instead of target/appliance.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["disks", "nvme"])]
    pub disk_dir: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub memory: u32,
    /// Boot the UEFI image under OVMF instead of the BIOS image.
    #[arg(long)]
    pub uefi: bool,
    /// QEMU accelerator.
    #[arg(long, value_name = "tcg|kvm", default_value = "tcg")]
    pub accel: Accel,
    /// Forward 127.0.0.1:PORT on this host to the appliance's NBD server (default:
    /// 10809 if it is free, else a free port; user network only).
    #[arg(long, value_name = "PORT")]
    pub nbd_port: Option<u16>,
    /// The appliance's NIC: virtio-net or an Intel 82574L (e1000e).
    #[arg(long, value_name = "virtio|e1000e", default_value = "virtio")]
    pub nic: Nic,
    /// What the NIC is plugged into: QEMU's user network, or an existing tap
    /// interface (give the appliance an address with `net set`).
    #[arg(long, value_name = "user|tap:IFNAME", default_value = "user")]
    pub net: NetBackend,
    /// Run this console command instead of an interactive session (repeatable): boot,
    /// run the commands in order, print the transcript, shut down; the exit status is
    /// non-zero if any command answered with an error.
    #[arg(long = "exec", value_name = "COMMAND")]
    pub exec: Vec<String>,
    /// Seconds each --exec command may take.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub timeout: u64,
    /// Boot this disk image instead of the one built for the firmware.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ImageArgs {
    /// Directory to write bios.img and uefi.img into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Why the runner stops unsuccessfully: printed as `error: ...`.
#[derive(Debug)]
pub struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    /// The command line asks for something that cannot work.
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: 2,
        }
    }

    /// The appliance or QEMU failed.
    pub fn failed(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: 1,
        }
    }
}

impl From<qemu_test::Error> for Failure {
    fn from(error: qemu_test::Error) -> Failure {
        match error {
            qemu_test::Error::Config(_) => Failure::usage(error.to_string()),
            _ => Failure::failed(error.to_string()),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            error.exit()
        }
        Err(error) => {
            eprintln!("{}", one_line(&error.render().to_string()));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Some(Command::Image(args)) => write_images(&args.out).map(|()| ExitCode::SUCCESS),
        Some(Command::Run(args)) => run::run(&args),
        Some(Command::Offline(args)) => offline::offline(&args),
        None => run::run(&cli.run),
    };
    result.unwrap_or_else(|failure| {
        eprintln!("error: {}", failure.message);
        ExitCode::from(failure.code)
    })
}

/// The gist of a clap error on one line: its message and details, without the usage
/// block.
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.is_empty() && !line.starts_with("Usage:"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_images(dir: &Path) -> Result<(), Failure> {
    let fail = |what: String, error: std::io::Error| Failure::failed(format!("{what}: {error}"));
    fs::create_dir_all(dir).map_err(|error| fail(format!("creating {}", dir.display()), error))?;
    for (image, name) in [
        (qemu_test::BIOS_IMAGE, "bios.img"),
        (qemu_test::UEFI_IMAGE, "uefi.img"),
    ] {
        let target = dir.join(name);
        fs::copy(image, &target)
            .map_err(|error| fail(format!("writing {}", target.display()), error))?;
        println!("wrote {}", target.display());
    }
    println!(
        "write bios.img (legacy BIOS machines) or uefi.img (UEFI machines) to the boot \
         disk, e.g. dd if=uefi.img of=/dev/sdX bs=1M conv=fsync"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("thinbox").chain(args.iter().copied()))
            .map_err(|error| one_line(&error.render().to_string()))
    }

    #[test]
    fn no_arguments_means_run_with_defaults() {
        let cli = parse(&[]).unwrap();
        assert!(cli.command.is_none());
        assert!(cli.run.disks.is_empty() && cli.run.nvme.is_empty() && cli.run.exec.is_empty());
        assert_eq!(cli.run.memory, 256);
        assert_eq!(cli.run.accel, Accel::Tcg);
        assert!(!cli.run.uefi);
        assert_eq!((cli.run.disk_dir, cli.run.nbd_port), (None, None));
    }

    #[test]
    fn run_options() {
        let cli = parse(&[
            "run",
            "--disk",
            "a.img",
            "--disk",
            "b.img",
            "--nvme",
            "n.img",
            "--memory",
            "512",
            "--uefi",
            "--accel",
            "kvm",
            "--nbd-port",
            "10809",
            "--exec",
            "help",
            "--exec",
            "status",
        ])
        .unwrap();
        let Some(Command::Run(run)) = cli.command else {
            panic!("not run: {cli:?}");
        };
        assert_eq!(run.disks, [PathBuf::from("a.img"), PathBuf::from("b.img")]);
        assert_eq!(run.nvme, [PathBuf::from("n.img")]);
        assert_eq!((run.memory, run.uefi, run.accel), (512, true, Accel::Kvm));
        assert_eq!(run.nbd_port, Some(10809));
        assert_eq!(run.exec, ["help", "status"]);
    }

    #[test]
    fn run_options_work_without_the_subcommand() {
        let cli = parse(&["--disk", "a.img", "--exec", "help"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.disks, [PathBuf::from("a.img")]);
    }

    #[test]
    fn image_needs_a_directory() {
        let cli = parse(&["image", "--out", "images"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Image(ImageArgs { out })) if out == Path::new("images"))
        );
        let error = parse(&["image"]).unwrap_err();
        assert_eq!(
            error,
            "error: the following required arguments were not provided: --out <DIR>"
        );
    }

    #[test]
    fn bad_arguments_are_one_line_errors() {
        assert_eq!(
            parse(&["--accel", "hvf"]).unwrap_err(),
            "error: invalid value 'hvf' for '--accel <tcg|kvm>': unknown accelerator 'hvf' \
             (use tcg or kvm)"
        );
        assert_eq!(
            parse(&["--nbd-port", "70000"]).unwrap_err(),
            "error: invalid value '70000' for '--nbd-port <PORT>': 70000 is not in 0..=65535"
        );
        assert_eq!(
            parse(&["--disk", "a.img", "--disk-dir", "disks"]).unwrap_err(),
            "error: the argument '--disk <PATH>' cannot be used with '--disk-dir <DIR>'"
        );
        assert!(
            parse(&["--frobnicate"])
                .unwrap_err()
                .starts_with("error: unexpected argument")
        );
    }

    #[test]
    fn images_are_written_for_real_hardware() {
        let out = qemu_test::Scratch::new().unwrap();
        let dir = out.path().join("images");
        write_images(&dir).unwrap();
        for (built, name) in [
            (qemu_test::BIOS_IMAGE, "bios.img"),
            (qemu_test::UEFI_IMAGE, "uefi.img"),
        ] {
            assert_eq!(fs::read(built).unwrap(), fs::read(dir.join(name)).unwrap());
        }
    }
}
