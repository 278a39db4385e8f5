//! What to boot and how (firmware, disks, memory, accelerator, NBD forward, deadlines),
//! the checks that turn bad choices into one-line errors before QEMU starts, and the
//! QEMU command line the choices become.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use host_tools::{OVMF_CODE, Tool};

use crate::Error;
use crate::network::{self, NetBackend, Nic};

/// The TCP port the appliance's NBD server listens on inside the guest.
pub const NBD_GUEST_PORT: u16 = 10809;

const QEMU: &str = "qemu-system-x86_64";
const KVM_DEVICE: &str = "/dev/kvm";
const DEFAULT_MEMORY_MIB: u32 = 256;
/// Below this the bootloader and kernel heap do not fit.
const MIN_MEMORY_MIB: u32 = 64;
const SECTOR: u64 = 512;

/// How the machine starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS booting the BIOS image (QEMU's default firmware; fastest to the kernel).
    #[default]
    Bios,
    /// OVMF booting the UEFI image.
    Uefi,
}

impl Firmware {
    /// The disk image built for this firmware.
    pub fn image(self) -> &'static Path {
        match self {
            Firmware::Bios => Path::new(crate::BIOS_IMAGE),
            Firmware::Uefi => Path::new(crate::UEFI_IMAGE),
        }
    }
}

/// QEMU's CPU accelerator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: works everywhere, including nested virtual machines.
    #[default]
    Tcg,
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
}

impl Accel {
    /// The name QEMU's `-accel` option takes.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }

    /// The CPU model QEMU emulates: under TCG `max`, whose RDRAND gives the kernel
    /// its randomness (QEMU's default model has neither RDRAND nor RDSEED, and TLS
    /// needs one); under KVM the host's own CPU with whatever it offers.
    pub fn cpu(self) -> &'static str {
        match self {
            Accel::Tcg => "max",
            Accel::Kvm => "host",
        }
    }
}

impl FromStr for Accel {
    type Err = String;

    fn from_str(name: &str) -> Result<Accel, String> {
        match name {
            "tcg" => Ok(Accel::Tcg),
            "kvm" => Ok(Accel::Kvm),
            _ => Err(format!("unknown accelerator '{name}' (use tcg or kvm)")),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the host end of the NBD port forward listens (always on 127.0.0.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdForward {
    /// This host port.
    Port(u16),
    /// A free port chosen at boot; ask [`crate::Appliance::nbd_port`] which.
    AnyFree,
    /// This host port if nothing listens on it at boot, else a free one.
    Preferred(u16),
}

/// Boots tried when QEMU finds the NBD port it was given taken: a port picked at boot
/// can be taken by another program before QEMU binds it.
pub const PORT_ATTEMPTS: usize = 3;

impl NbdForward {
    /// Whether QEMU, failing with `stderr`, found a port this forward picked itself
    /// taken, so that starting again with a new pick can work.
    pub fn lost_its_port(self, stderr: &str) -> bool {
        !matches!(self, NbdForward::Port(_)) && stderr.contains("host forwarding rule")
    }
}

/// How long each kind of wait may take before it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From starting QEMU to the first prompt (UEFI under TCG takes several seconds on
    /// an idle machine, much longer on a loaded one).
    pub boot: Duration,
    /// From sending a console command to its prompt, unless a call names its own.
    pub command: Duration,
    /// From sending `shutdown` to QEMU's exit.
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            boot: Duration::from_secs(180),
            command: Duration::from_secs(120),
            shutdown: Duration::from_secs(60),
        }
    }
}

/// How the serial console is connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleMode {
    /// Serial port on QEMU's stdin/stdout and no monitor: for a program driving the
    /// console ([`crate::Appliance`]).
    Pipes,
    /// Serial port multiplexed with the QEMU monitor on the caller's terminal, which
    /// QEMU puts in raw mode: every key (Ctrl-C too) reaches the guest, Ctrl-A x quits,
    /// Ctrl-A c switches to the monitor and back.
    Terminal,
}

/// Everything that decides how the appliance is booted.
#[derive(Clone, Debug)]
pub struct Options {
    pub firmware: Firmware,
    /// Boot this image instead of the one built for `firmware`.
    pub image: Option<PathBuf>,
    /// virtio-blk disks, in PCI order: the kernel names them `vda`, `vdb`, ...
    pub disks: Vec<PathBuf>,
    /// Disks among `disks` whose writes, flushes and discards QEMU records in a log
    /// file (dm-log-writes format, see [`crate::write_log`]), keyed by the disk's path.
    pub write_logs: HashMap<PathBuf, PathBuf>,
    /// Disks among `disks` that QEMU's `blkdebug` driver fails as the rules in a
    /// configuration file say, keyed by the disk's path (see [`Options::faulty_disk`]).
    pub fault_rules: HashMap<PathBuf, PathBuf>,
    /// NVMe disks, one controller each: `nvme0n1`, `nvme1n1`, ...
    pub nvme: Vec<PathBuf>,
    pub memory_mib: u32,
    pub accel: Accel,
    /// Forward a host port to the guest's NBD port (user network only); the NIC is
    /// attached either way.
    pub nbd: Option<NbdForward>,
    pub nic: Nic,
    pub net: NetBackend,
    /// A Unix socket for QEMU's monitor (e.g. `set_link`), instead of none.
    pub monitor: Option<PathBuf>,
    pub timeouts: Timeouts,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            firmware: Firmware::Bios,
            image: None,
            disks: Vec::new(),
            write_logs: HashMap::new(),
            fault_rules: HashMap::new(),
            nvme: Vec::new(),
            memory_mib: DEFAULT_MEMORY_MIB,
            accel: Accel::Tcg,
            nbd: None,
            nic: Nic::Virtio,
            net: NetBackend::User,
            monitor: None,
            timeouts: Timeouts::default(),
        }
    }
}

impl Options {
    /// Boots the BIOS image with 256 MiB, TCG, no disks and no port forward.
    pub fn bios() -> Options {
        Options::default()
    }

    /// Like [`Options::bios`], booting the UEFI image under OVMF.
    pub fn uefi() -> Options {
        Options {
            firmware: Firmware::Uefi,
            ..Options::default()
        }
    }

    /// Adds a virtio-blk disk.
    pub fn disk(mut self, path: impl Into<PathBuf>) -> Options {
        self.disks.push(path.into());
        self
    }

    /// Adds a virtio-blk disk whose every write, flush and discard QEMU's
    /// `blklogwrites` driver records in `log`, an existing file that is overwritten
    /// (empty will do); read it with [`crate::write_log`]. The guest sees the same
    /// disk, serial included, as [`Options::disk`] attaches.
    pub fn logged_disk(mut self, path: impl Into<PathBuf>, log: impl Into<PathBuf>) -> Options {
        let path = path.into();
        self.write_logs.insert(path.clone(), log.into());
        self.disks.push(path);
        self
    }

    /// Adds a virtio-blk disk behind QEMU's `blkdebug` driver, which fails requests as
    /// the rules in the existing file `rules` say (QEMU's blkdebug configuration
    /// format: `[inject-error]`, `[set-state]`). The guest sees the same disk, serial
    /// included, as [`Options::disk`] attaches, and the monitor's `qemu-io vdN ...`
    /// reaches it through blkdebug (a rule may wait for an event such a command causes).
    pub fn faulty_disk(mut self, path: impl Into<PathBuf>, rules: impl Into<PathBuf>) -> Options {
        let path = path.into();
        self.fault_rules.insert(path.clone(), rules.into());
        self.disks.push(path);
        self
    }

    /// Adds an NVMe disk.
    pub fn nvme(mut self, path: impl Into<PathBuf>) -> Options {
        self.nvme.push(path.into());
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Options {
        self.memory_mib = mib;
        self
    }

    pub fn accel(mut self, accel: Accel) -> Options {
        self.accel = accel;
        self
    }

    /// Forwards a free host port to the guest's NBD server.
    pub fn nbd(mut self) -> Options {
        self.nbd = Some(NbdForward::AnyFree);
        self
    }

    /// Forwards host port `port` to the guest's NBD server.
    pub fn nbd_port(mut self, port: u16) -> Options {
        self.nbd = Some(NbdForward::Port(port));
        self
    }

    pub fn nic(mut self, nic: Nic) -> Options {
        self.nic = nic;
        self
    }

    /// Plugs the NIC into an existing tap interface instead of the user network.
    pub fn tap(mut self, interface: &str) -> Options {
        self.net = NetBackend::Tap(interface.to_string());
        self
    }

    /// Lets QEMU's monitor listen on Unix socket `path`.
    pub fn monitor(mut self, path: impl Into<PathBuf>) -> Options {
        self.monitor = Some(path.into());
        self
    }

    pub fn timeouts(mut self, timeouts: Timeouts) -> Options {
        self.timeouts = timeouts;
        self
    }

    /// The image that will be booted.
    pub fn boot_image(&self) -> &Path {
        self.image
            .as_deref()
            .unwrap_or_else(|| self.firmware.image())
    }

    /// Checks everything that can be checked before QEMU starts; the error is one line
    /// saying what is wrong and how to fix it.
    pub fn validate(&self) -> Result<(), Error> {
        let image = self.boot_image();
        check_image(image).map_err(Error::Config)?;
        let mut seen: HashMap<PathBuf, String> = HashMap::new();
        if let Ok(canonical) = image.canonicalize() {
            seen.insert(canonical, String::from("the boot image"));
        }
        let disks = self
            .disks
            .iter()
            .map(|path| ("--disk", path, check_disk(path)));
        let nvme = self
            .nvme
            .iter()
            .map(|path| ("--nvme", path, check_disk(path)));
        let logs = self
            .write_logs
            .values()
            .map(|path| ("write log", path, check_write_log(path)));
        for (flag, path, checked) in disks.chain(nvme).chain(logs) {
            let canonical = checked.map_err(Error::Config)?;
            let this = format!("{flag} {}", path.display());
            if let Some(first) = seen.insert(canonical, this.clone()) {
                return Err(Error::Config(format!(
                    "{} is given twice ({first} and {this}); a disk can be attached once",
                    path.display()
                )));
            }
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(Error::Config(format!(
                "{} MiB of memory is too little; give at least {MIN_MEMORY_MIB} MiB",
                self.memory_mib
            )));
        }
        if self.accel == Accel::Kvm && !Path::new(KVM_DEVICE).exists() {
            return Err(Error::Config(format!(
                "KVM is not available on this host ({KVM_DEVICE} is missing); use --accel tcg"
            )));
        }
        self.net.check().map_err(Error::Config)?;
        if let Some(NbdForward::Port(port)) = self.nbd
            && !self.net.is_tap()
        {
            check_port(port).map_err(Error::Config)?;
        }
        Ok(())
    }

    /// The QEMU command for these options and the host port forwarded to the guest's
    /// NBD server (picking one now for [`NbdForward::AnyFree`] and
    /// [`NbdForward::Preferred`]; none on a tap interface, where clients reach the
    /// appliance's own address).
    pub fn qemu_command(&self, console: ConsoleMode) -> Result<(Command, Option<u16>), Error> {
        let nbd = if self.net.is_tap() { None } else { self.nbd };
        let picked = match nbd {
            None => Ok(None),
            Some(NbdForward::Port(port)) => Ok(Some(port)),
            Some(NbdForward::AnyFree) => free_port().map(Some),
            Some(NbdForward::Preferred(port)) => preferred_port(port).map(Some),
        };
        let port = picked.map_err(|source| Error::Io {
            context: String::from("finding a free TCP port on 127.0.0.1"),
            source,
        })?;
        let mut command = Command::new(QEMU);
        command.args(self.qemu_args(console, port));
        Ok((command, port))
    }

    /// QEMU's arguments, with `nbd_port` as the host end of the NBD forward.
    pub(crate) fn qemu_args(&self, console: ConsoleMode, nbd_port: Option<u16>) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(|item| item.to_string()));
        // Only the devices named below: no default NIC, CD-ROM or floppy for the
        // firmware to try booting from; a VGA card because the bootloader sets up a
        // framebuffer.
        push(&[
            "-nodefaults",
            "-machine",
            "q35",
            "-accel",
            self.accel.name(),
            "-cpu",
            self.accel.cpu(),
        ]);
        push(&[
            "-m",
            &self.memory_mib.to_string(),
            "-display",
            "none",
            "-device",
            "VGA",
        ]);
        // Threads named by role ("CPU 0/TCG", "worker"), so host tools can tell the
        // emulated CPU from QEMU's I/O.
        push(&["-name", "thinbox,debug-threads=on"]);
        push(&[
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]);
        if self.firmware == Firmware::Uefi {
            push(&["-bios", OVMF_CODE]);
        }
        let monitor = match &self.monitor {
            Some(path) => format!("unix:{},server=on,wait=off", drive_file(path)),
            None => String::from("none"),
        };
        match console {
            ConsoleMode::Pipes => push(&["-serial", "stdio", "-monitor", &monitor]),
            ConsoleMode::Terminal => push(&[
                "-chardev",
                "stdio,id=console,mux=on,signal=off",
                "-serial",
                "chardev:console",
                "-mon",
                "chardev=console",
            ]),
        }
        // The boot image is shared by every appliance on the host: QEMU opens it
        // read-only and keeps the firmware's writes in a throwaway overlay. It is
        // first in the boot order, so the firmware never boots from a data disk.
        let image = drive_file(self.boot_image());
        let boot = format!("file={image},format=raw,if=none,id=boot,snapshot=on");
        push(&[
            "-drive",
            &boot,
            "-device",
            "ide-hd,drive=boot,bus=ide.0,bootindex=0",
        ]);
        for (index, disk) in self.disks.iter().enumerate() {
            let serial = disk_serial(disk);
            let mut device = format!("virtio-blk-pci,drive=vd{index},serial={serial}");
            match self.write_logs.get(disk) {
                None => {
                    let file = match self.fault_rules.get(disk) {
                        None => format!("file={}", drive_file(disk)),
                        Some(rules) => format!(
                            "file.driver=blkdebug,file.config={},file.image.driver=file,\
                             file.image.filename={}",
                            drive_file(rules),
                            drive_file(disk)
                        ),
                    };
                    let drive = format!("{file},{DATA_DRIVE},id=vd{index}");
                    push(&["-drive", &drive]);
                }
                Some(log) => {
                    for node in logged_disk_nodes(&format!("vd{index}"), disk, log) {
                        push(&["-blockdev", &node]);
                    }
                    // A volatile cache, as `cache=writeback` gives the other disks:
                    // without it QEMU would flush after every write.
                    device.push_str(",write-cache=on");
                }
            }
            push(&["-device", &device]);
        }
        for (index, disk) in self.nvme.iter().enumerate() {
            let drive = format!("file={},{DATA_DRIVE},id=nvme{index}", drive_file(disk));
            let serial = disk_serial(disk);
            let device = format!("nvme,serial={serial},drive=nvme{index}");
            push(&["-drive", &drive, "-device", &device]);
        }
        let forward = nbd_port
            .map(|port| format!(",hostfwd=tcp:127.0.0.1:{port}-:{NBD_GUEST_PORT}"))
            .unwrap_or_default();
        args.extend(network::qemu_args(self.nic, &self.net, &forward));
        args
    }
}

/// Data disks: raw, guest discards punch holes in the host file, QEMU's write cache
/// honours the guest's flushes.
const DATA_DRIVE: &str = "format=raw,if=none,cache=writeback,discard=unmap";

/// The `-blockdev` nodes of a disk recorded in `log`, the top one named `id`: the
/// image and the log as files and `blklogwrites` over both. It acts like
/// [`DATA_DRIVE`] (guest flushes reach the image, discards punch holes) and records
/// with 512-byte log sectors, rewriting the log's super block after every entry so
/// that its entry count is always current. The log is never flushed to the host's
/// disk: it records what the guest did, not what survives the host crashing.
fn logged_disk_nodes(id: &str, disk: &Path, log: &Path) -> [String; 3] {
    [
        format!(
            "driver=file,filename={},node-name={id}-image,discard=unmap",
            drive_file(disk)
        ),
        format!(
            "driver=file,filename={},node-name={id}-log,cache.no-flush=on",
            drive_file(log)
        ),
        format!(
            "driver=blklogwrites,node-name={id},file={id}-image,log={id}-log,\
             log-sector-size=512,log-super-update-interval=1,discard=unmap"
        ),
    ]
}

/// A serial number that stays with the image file, as a real disk's stays with the disk:
/// the appliance finds its configured disks by serial, so images given in another order
/// (or with one left out) are still told apart. Derived from the file's absolute path
/// (FNV-1a), 20 characters, the most virtio-blk and NVMe carry.
pub fn disk_serial(path: &Path) -> String {
    let absolute = path
        .canonicalize()
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf());
    let hash = absolute
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("thinbox-{:012x}", hash >> 16)
}

/// A path as a value inside QEMU's comma-separated option syntax.
fn drive_file(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

fn check_image(path: &Path) -> Result<(), String> {
    let unreadable = |why: String| {
        format!(
            "boot image {} is not readable ({why}); rebuild it with cargo build --release",
            path.display()
        )
    };
    let mut first_sector = [0u8; SECTOR as usize];
    File::open(path)
        .and_then(|mut file| file.read_exact(&mut first_sector))
        .map_err(|error| unreadable(error.to_string()))
}

/// Checks that a write log can be written and returns its canonical path.
fn check_write_log(path: &Path) -> Result<PathBuf, String> {
    let shown = path.display();
    if path.to_str().is_none() {
        return Err(format!(
            "write log {shown} is not valid UTF-8; rename the file"
        ));
    }
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|_| path.canonicalize())
        .map_err(|error| match error.kind() {
            io::ErrorKind::NotFound => {
                format!("write log {shown} does not exist; create it first (empty will do)")
            }
            _ => format!("write log {shown} cannot be opened for writing: {error}"),
        })
}

/// Checks that a disk can be attached and returns its canonical path.
fn check_disk(path: &Path) -> Result<PathBuf, String> {
    let shown = path.display();
    if path.to_str().is_none() {
        return Err(format!(
            "disk path {shown} is not valid UTF-8; rename the file"
        ));
    }
    let metadata = std::fs::metadata(path).map_err(|error| match error.kind() {
        io::ErrorKind::NotFound => {
            format!("disk {shown} does not exist; create it first, e.g. truncate -s 4G {shown}")
        }
        _ => format!("disk {shown} is not accessible: {error}"),
    })?;
    if metadata.is_dir() {
        return Err(format!("disk {shown} is a directory, not a disk image"));
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|error| {
            format!("disk {shown} cannot be opened for reading and writing: {error}")
        })?;
    if metadata.is_file() {
        let size = metadata.len();
        if size == 0 {
            return Err(format!(
                "disk {shown} is empty; give it a size, e.g. truncate -s 4G {shown}"
            ));
        }
        if size % SECTOR != 0 {
            return Err(format!(
                "disk {shown} is {size} bytes, not a whole number of {SECTOR}-byte sectors"
            ));
        }
    }
    path.canonicalize()
        .map_err(|error| format!("disk {shown} is not accessible: {error}"))
}

fn check_port(port: u16) -> Result<(), String> {
    if port == 0 {
        return Err(String::from(
            "NBD port 0 is not a port; name one between 1 and 65535",
        ));
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .map(drop)
        .map_err(|error| match error.kind() {
            io::ErrorKind::AddrInUse => {
                format!("port {port} on 127.0.0.1 is already in use; choose another --nbd-port")
            }
            _ => format!("cannot listen on 127.0.0.1:{port} ({error}); choose another --nbd-port"),
        })
}

/// Ports this process has handed out, so parallel tests never get the same one.
static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A TCP port on 127.0.0.1 that nothing listens on now and that this process has not
/// handed out before.
pub fn free_port() -> io::Result<u16> {
    let mut handed_out = handed_out();
    for _ in 0..PORT_PICKS {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        "every free port the system offered was handed out before",
    ))
}

/// `port` if nothing listens on it on 127.0.0.1 and this process has not handed it out,
/// else a [`free_port`].
fn preferred_port(port: u16) -> io::Result<u16> {
    let mut handed_out = handed_out();
    if port != 0
        && !handed_out.contains(&port)
        && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
    {
        handed_out.push(port);
        return Ok(port);
    }
    drop(handed_out);
    free_port()
}

fn handed_out() -> std::sync::MutexGuard<'static, Vec<u16>> {
    HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How often [`free_port`] asks the system before giving up.
const PORT_PICKS: usize = 1000;

/// Makes sure QEMU (and OVMF for UEFI) are installed; see [`host_tools::require`].
pub fn require_host_tools(firmware: Firmware) -> Result<(), Error> {
    let tools: &[Tool] = match firmware {
        Firmware::Bios => &[Tool::Qemu],
        Firmware::Uefi => &[Tool::Qemu, Tool::Ovmf],
    };
    host_tools::require(tools).map_err(Error::MissingTools)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(options: &Options, console: ConsoleMode, port: Option<u16>) -> String {
        options.qemu_args(console, port).join(" ")
    }

    #[test]
    fn disk_serials_follow_the_file_and_fit_the_devices() {
        let meta = disk_serial(Path::new("/d/meta.img"));
        assert_eq!(meta.len(), 20);
        assert_eq!(meta, disk_serial(Path::new("/d/./meta.img")));
        assert_ne!(meta, disk_serial(Path::new("/d/data.img")));
    }

    #[test]
    fn bios_command_line() {
        let options = Options::bios()
            .disk("/d/meta.img")
            .disk("/d/data.img")
            .nvme("/d/fast.img")
            .memory_mib(512);
        let line = args(&options, ConsoleMode::Pipes, Some(4321));
        let image = crate::BIOS_IMAGE;
        for expected in [
            "-nodefaults -machine q35 -accel tcg -cpu max -m 512 -display none",
            "-no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-serial stdio -monitor none",
            &format!(
                "-drive file={image},format=raw,if=none,id=boot,snapshot=on \
                 -device ide-hd,drive=boot,bus=ide.0,bootindex=0"
            ),
            &format!(
                "-drive file=/d/meta.img,format=raw,if=none,cache=writeback,discard=unmap,id=vd0 \
                 -device virtio-blk-pci,drive=vd0,serial={}",
                disk_serial(Path::new("/d/meta.img"))
            ),
            &format!(
                "-drive file=/d/data.img,format=raw,if=none,cache=writeback,discard=unmap,id=vd1 \
                 -device virtio-blk-pci,drive=vd1,serial={}",
                disk_serial(Path::new("/d/data.img"))
            ),
            &format!(
                "-drive file=/d/fast.img,format=raw,if=none,cache=writeback,discard=unmap,id=nvme0 \
                 -device nvme,serial={},drive=nvme0",
                disk_serial(Path::new("/d/fast.img"))
            ),
            "-netdev user,id=n0,hostfwd=tcp:127.0.0.1:4321-:10809 \
             -device virtio-net-pci,netdev=n0,romfile=",
        ] {
            assert!(line.contains(expected), "{expected:?} missing from {line}");
        }
        assert!(!line.contains("OVMF"));
        assert!(line.find("vd1").unwrap() < line.find("nvme0").unwrap());
    }

    #[test]
    fn logged_disks_go_through_blklogwrites_with_their_usual_serial() {
        let options = Options::bios()
            .disk("/d/plain.img")
            .logged_disk("/d/meta.img", "/d/meta.log");
        let line = args(&options, ConsoleMode::Pipes, None);
        let expected = format!(
            "-blockdev driver=file,filename=/d/meta.img,node-name=vd1-image,discard=unmap \
             -blockdev driver=file,filename=/d/meta.log,node-name=vd1-log,cache.no-flush=on \
             -blockdev driver=blklogwrites,node-name=vd1,file=vd1-image,log=vd1-log,\
             log-sector-size=512,log-super-update-interval=1,discard=unmap \
             -device virtio-blk-pci,drive=vd1,serial={},write-cache=on",
            disk_serial(Path::new("/d/meta.img"))
        );
        assert!(line.contains(&expected), "{expected:?} missing from {line}");
        assert!(line.contains(&format!(
            "-drive file=/d/plain.img,{DATA_DRIVE},id=vd0 \
             -device virtio-blk-pci,drive=vd0,serial={} ",
            disk_serial(Path::new("/d/plain.img"))
        )));
    }

    #[test]
    fn faulty_disks_go_through_blkdebug_with_their_usual_serial() {
        let options = Options::bios().faulty_disk("/d/meta.img", "/d/meta.rules");
        let line = args(&options, ConsoleMode::Pipes, None);
        let expected = format!(
            "-drive file.driver=blkdebug,file.config=/d/meta.rules,file.image.driver=file,\
             file.image.filename=/d/meta.img,{DATA_DRIVE},id=vd0 \
             -device virtio-blk-pci,drive=vd0,serial={} ",
            disk_serial(Path::new("/d/meta.img"))
        );
        assert!(line.contains(&expected), "{expected:?} missing from {line}");
    }

    #[test]
    fn a_write_log_must_exist_and_be_no_disk() {
        let scratch = crate::Scratch::new().unwrap();
        let disk = scratch.disk("disk.img", 1 << 20).unwrap();
        let log = scratch.path().join("disk.log");
        let error = Options::bios()
            .logged_disk(&disk, &log)
            .validate()
            .unwrap_err();
        assert!(
            matches!(&error, Error::Config(why) if why == &format!(
                "write log {} does not exist; create it first (empty will do)",
                log.display()
            )),
            "{error:?}"
        );
        let error = Options::bios()
            .logged_disk(&disk, &disk)
            .validate()
            .unwrap_err();
        assert!(
            matches!(&error, Error::Config(why) if why.contains("is given twice")),
            "{error:?}"
        );
    }

    #[test]
    fn uefi_kvm_terminal_without_forward() {
        let options = Options::uefi().accel(Accel::Kvm);
        let line = args(&options, ConsoleMode::Terminal, None);
        assert!(line.contains(&format!("-bios {OVMF_CODE}")));
        assert!(line.contains(crate::UEFI_IMAGE));
        assert!(line.contains("-accel kvm -cpu host"));
        assert!(line.contains(
            "-chardev stdio,id=console,mux=on,signal=off -serial chardev:console \
             -mon chardev=console"
        ));
        assert!(!line.contains("-monitor none"));
        assert!(line.contains("-netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile="));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let options = Options::bios().disk("/d/a,b.img");
        assert!(args(&options, ConsoleMode::Pipes, None).contains("file=/d/a,,b.img,format"));
    }

    #[test]
    fn command_reports_the_forwarded_port() {
        let (command, port) = Options::bios()
            .nbd_port(5555)
            .qemu_command(ConsoleMode::Pipes)
            .unwrap();
        assert_eq!(port, Some(5555));
        assert_eq!(command.get_program(), QEMU);
        let (_, picked) = Options::bios()
            .nbd()
            .qemu_command(ConsoleMode::Pipes)
            .unwrap();
        assert!(picked.is_some_and(|port| port != 0));
        let (_, none) = Options::bios().qemu_command(ConsoleMode::Pipes).unwrap();
        assert_eq!(none, None);
    }

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        // Whether each is still free is not asserted: tests running beside this one, and any
        // other program, may take a released port at any time.
        assert_eq!(unique.len(), ports.len());
    }

    #[test]
    fn a_preferred_port_is_taken_when_free_and_replaced_when_not() {
        let free = free_port().unwrap();
        // Handed out once already: a second appliance of this process gets another.
        assert_ne!(preferred_port(free).unwrap(), free);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken = listener.local_addr().unwrap().port();
        let instead = preferred_port(taken).unwrap();
        assert_ne!(instead, taken);
        TcpListener::bind((Ipv4Addr::LOCALHOST, instead)).unwrap();
        drop(listener);
        assert_eq!(preferred_port(taken).unwrap(), taken);
        assert_ne!(preferred_port(taken).unwrap(), taken);
    }

    #[test]
    fn accelerator_names() {
        assert_eq!("tcg".parse(), Ok(Accel::Tcg));
        assert_eq!("kvm".parse(), Ok(Accel::Kvm));
        assert_eq!(
            "hvf".parse::<Accel>(),
            Err(String::from("unknown accelerator 'hvf' (use tcg or kvm)"))
        );
        assert_eq!(Accel::Kvm.to_string(), "kvm");
    }
}
