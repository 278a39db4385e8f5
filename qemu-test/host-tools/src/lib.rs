//! Host programs the runner and the tests depend on, and how to get them.
//!
//! Every caller names the tools it needs; missing ones are installed with `apt-get`
//! when we run as root on a Debian-like system (printing what is installed), and
//! otherwise the caller gets an error carrying the exact command to run.

use std::fmt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// A program (or firmware file) provided by a Debian package.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    Qemu,
    Ovmf,
    ThinCheck,
    QemuImg,
    /// `qemu-io`, from the same package as `qemu-img`.
    QemuIo,
    /// `qemu-nbd`, from the same package as `qemu-img`.
    QemuNbd,
    NbdInfo,
    /// `nbdcopy`, from the same package as `nbdinfo`.
    NbdCopy,
    /// `nbdsh`, libnbd's Python shell (it also makes `import nbd` work in Debian's
    /// `/usr/bin/python3`).
    NbdSh,
    Fio,
    /// GnuTLS's `certtool`, to make keys and certificates as operators do.
    CertTool,
    Openssl,
}

impl Tool {
    /// The file whose presence means the tool is installed.
    fn probe(self) -> &'static str {
        match self {
            Tool::Qemu => "qemu-system-x86_64",
            Tool::Ovmf => OVMF_CODE,
            Tool::ThinCheck => "thin_check",
            Tool::QemuImg => "qemu-img",
            Tool::QemuIo => "qemu-io",
            Tool::QemuNbd => "qemu-nbd",
            Tool::NbdInfo => "nbdinfo",
            Tool::NbdCopy => "nbdcopy",
            Tool::NbdSh => "nbdsh",
            Tool::Fio => "fio",
            Tool::CertTool => "certtool",
            Tool::Openssl => "openssl",
        }
    }

    /// The Debian package that provides it.
    pub fn package(self) -> &'static str {
        match self {
            Tool::Qemu => "qemu-system-x86",
            Tool::Ovmf => "ovmf",
            Tool::ThinCheck => "thin-provisioning-tools",
            Tool::QemuImg | Tool::QemuIo | Tool::QemuNbd => "qemu-utils",
            Tool::NbdInfo | Tool::NbdCopy => "libnbd-bin",
            Tool::NbdSh => "python3-libnbd",
            Tool::Fio => "fio",
            Tool::CertTool => "gnutls-bin",
            Tool::Openssl => "openssl",
        }
    }

    fn installed(self) -> bool {
        let probe = self.probe();
        if probe.starts_with('/') {
            return Path::new(probe).exists();
        }
        program_exists(probe)
    }
}

/// UEFI firmware code image from Debian's `ovmf` package.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";

/// Tools are missing and could not be installed here.
#[derive(Debug)]
pub struct Missing {
    pub packages: Vec<&'static str>,
    pub reason: String,
}

impl Missing {
    /// The command an administrator should run.
    pub fn install_command(&self) -> String {
        format!("sudo apt-get install -y {}", self.packages.join(" "))
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "missing host packages {} ({}); install them with: {}",
            self.packages.join(", "),
            self.reason,
            self.install_command()
        )
    }
}

impl std::error::Error for Missing {}

/// Serialises installs between threads of one process (tests run in parallel).
static INSTALL: Mutex<()> = Mutex::new(());

/// Makes sure every tool in `tools` is installed, installing missing packages with
/// `apt-get` when running as root.
pub fn require(tools: &[Tool]) -> Result<(), Missing> {
    let _guard = INSTALL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut packages: Vec<&'static str> = tools
        .iter()
        .filter(|tool| !tool.installed())
        .map(|tool| tool.package())
        .collect();
    packages.sort_unstable();
    packages.dedup();
    if packages.is_empty() {
        return Ok(());
    }
    if !is_root() || !program_exists("apt-get") {
        let reason = String::from("not running as root with apt-get available");
        return Err(Missing { packages, reason });
    }
    eprintln!("installing host packages: {}", packages.join(" "));
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .map(|status| status.success())
            .unwrap_or(false)
    };
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&packages);
    if !apt(&install) && !(apt(&["update", "-q"]) && apt(&install)) {
        return Err(Missing {
            packages,
            reason: String::from("apt-get install failed"),
        });
    }
    let still: Vec<&'static str> = tools
        .iter()
        .filter(|tool| !tool.installed())
        .map(|tool| tool.package())
        .collect();
    if still.is_empty() {
        Ok(())
    } else {
        let reason = String::from("installed, but the programs are still not found");
        Err(Missing {
            packages: still,
            reason,
        })
    }
}

/// Like [`require`], for tests: panics with the install command when tools are missing.
pub fn require_for_test(tools: &[Tool]) {
    if let Err(missing) = require(tools) {
        panic!("{missing}");
    }
}

/// Runs the real `thin_check` on a metadata image (installing it first if it is
/// missing); `Err` carries what it printed.
pub fn thin_check(image: &Path) -> Result<(), String> {
    require_for_test(&[Tool::ThinCheck]);
    let out = Command::new("thin_check")
        .arg(image)
        .output()
        .map_err(|error| format!("thin_check: {error}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "thin_check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

fn program_exists(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_command_names_every_package() {
        let missing = Missing {
            packages: vec!["ovmf", "fio"],
            reason: String::new(),
        };
        assert_eq!(
            missing.install_command(),
            "sudo apt-get install -y ovmf fio"
        );
    }

    #[test]
    fn every_tool_names_a_package_and_a_probe() {
        let tools = [
            Tool::Qemu,
            Tool::Ovmf,
            Tool::ThinCheck,
            Tool::QemuImg,
            Tool::QemuIo,
            Tool::QemuNbd,
            Tool::NbdInfo,
            Tool::NbdCopy,
            Tool::NbdSh,
            Tool::Fio,
        ];
        for tool in tools {
            assert!(!tool.package().is_empty());
            assert!(!tool.probe().is_empty());
        }
    }
}
