//! Boots the thinbox appliance under QEMU and drives its serial console.
//!
//! This crate is the one implementation of "boot the appliance": the host runner
//! (`cargo run`) and every QEMU-level test build their QEMU command line with
//! [`Options`] and talk to the console through [`Appliance`].
//!
//! ```no_run
//! use qemu_test::{Appliance, Options, Scratch};
//!
//! let scratch = Scratch::new().unwrap();
//! let meta = scratch.disk("meta.img", 64 << 20).unwrap();
//! let mut appliance = Appliance::boot(Options::bios().disk(&meta).nbd()).unwrap();
//! let help = appliance.console_ok("help").unwrap();
//! assert!(help.contains("create"));
//! appliance.shutdown().unwrap();
//! ```
//!
//! Every wait has a deadline: a timeout, a `KERNEL PANIC` line or QEMU exiting early
//! ends the wait with an [`Error`] whose `Debug` form carries the end of the serial
//! transcript, so a failing test shows what the appliance printed.
//!
//! [`Appliance::boot`] installs QEMU (and OVMF for UEFI) itself when they are missing;
//! a test that runs other host programs (`qemu-img`, `thin_check`, ...) calls
//! `host_tools::require_for_test` first. Tests may run in parallel: NBD ports are
//! picked so they never collide, and each test keeps its disks in its own [`Scratch`].

mod appliance;
mod disk;
mod disk_errors;
mod error;
mod host_server;
mod monitor;
mod nbd_ready;
mod net_figures;
mod network;
mod options;
mod pki;
mod process;
mod protocol;
mod relay;
mod tap;
mod tool;
pub mod write_log;

pub use appliance::Appliance;
pub use disk::{Scratch, create_disk};
pub use disk_errors::disk_errors;
pub use error::{Error, qemu_complaint};
pub use host_server::HostServer;
pub use monitor::monitor_command;
pub use nbd_ready::{read_greeting, wait_for_greeting};
pub use net_figures::{DISK_INTERRUPTS_WORD, NBD_REQUESTS_WORD, net_figure};
pub use network::{NetBackend, Nic};
pub use options::{
    Accel, ConsoleMode, Firmware, NBD_GUEST_PORT, NbdForward, Options, PORT_ATTEMPTS, Timeouts,
    disk_serial, free_port, require_host_tools,
};
pub use pki::{Pki, client_template};
pub use process::{spawn_tied, stat_cpu_ticks};
pub use protocol::PROMPT;
pub use relay::{CountingRelay, NbdFront};
pub use tap::TapNetwork;
pub use thinbox_boot::{BIOS_IMAGE, KERNEL_ELF, UEFI_IMAGE};
pub use tool::{nbdsh_command, nbdsh_script, qemu_img_read, qemu_img_write, run_nbdsh, run_tool};

/// QEMU's exit status after the kernel's clean `shutdown` (isa-debug-exit value 0x10).
pub const EXIT_SHUTDOWN: i32 = 33;
/// QEMU's exit status after a kernel panic or CPU exception (isa-debug-exit value 0x11).
pub const EXIT_PANIC: i32 = 35;
