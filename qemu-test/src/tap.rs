//! A private network for an appliance on a tap interface: the tap device is made
//! in the host's namespace (where QEMU opens it) and then moved, with QEMU holding
//! it, into a network namespace of its own. There the host end gets
//! [`TapNetwork::HOST`] and clients run with [`TapNetwork::command`]; nothing the
//! appliance sends can leave the namespace, which is deleted (tap device with it)
//! on drop. Needs root.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Tap networks this process has made, for unique names.
static MADE: AtomicUsize = AtomicUsize::new(0);

pub struct TapNetwork {
    interface: String,
    namespace: String,
    entered: bool,
}

impl TapNetwork {
    /// The host end's address in the namespace, and the appliance's.
    pub const HOST: &str = "192.168.77.1";
    pub const APPLIANCE: &str = "192.168.77.2";
    pub const PREFIX: u8 = 24;

    /// Makes the tap device; the error says why it cannot be made (not root, no
    /// `ip`), for tests to print as their reason to skip.
    pub fn create() -> Result<TapNetwork, String> {
        if !rustix::process::geteuid().is_root() {
            return Err(String::from(
                "needs root to create a network namespace and a tap device",
            ));
        }
        let made = MADE.fetch_add(1, Ordering::Relaxed);
        let id = std::process::id();
        let network = TapNetwork {
            interface: format!("tbt{}x{made}", id % 1_000_000),
            namespace: format!("thinbox-{id}-{made}"),
            entered: false,
        };
        ip(&["tuntap", "add", &network.interface, "mode", "tap"])?;
        Ok(network)
    }

    /// The tap interface's name, for [`crate::Options::tap`].
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Moves the tap device (which QEMU has opened by now) into a new namespace and
    /// gives it the host address there.
    pub fn enter(&mut self) -> Result<(), String> {
        ip(&["netns", "add", &self.namespace])?;
        self.entered = true;
        let (interface, namespace) = (&self.interface, &self.namespace);
        ip(&["link", "set", interface, "netns", namespace])?;
        let address = format!("{}/{}", Self::HOST, Self::PREFIX);
        ip(&["-n", namespace, "addr", "add", &address, "dev", interface])?;
        ip(&["-n", namespace, "link", "set", interface, "up"])?;
        ip(&["-n", namespace, "link", "set", "lo", "up"])
    }

    /// Sets the host end's MTU.
    pub fn set_mtu(&self, mtu: usize) -> Result<(), String> {
        let mtu = mtu.to_string();
        ip(&[
            "-n",
            &self.namespace,
            "link",
            "set",
            &self.interface,
            "mtu",
            &mtu,
        ])
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.namespace, program]);
        command
    }

    /// `inner` (program, arguments, environment) run inside the namespace instead.
    pub fn wrap(&self, inner: Command) -> Command {
        let mut command = self.command(&inner.get_program().to_string_lossy());
        command.args(inner.get_args());
        for (key, value) in inner.get_envs() {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        command
    }

    /// Runs `program` with `args` inside the namespace and returns its standard
    /// output; panics like [`crate::run_tool`].
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let mut command = self.command(program);
        command.args(args);
        crate::tool::run_command(command)
    }

    /// `nbd://APPLIANCE/export`.
    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", Self::APPLIANCE)
    }
}

impl Drop for TapNetwork {
    fn drop(&mut self) {
        if self.entered {
            let _ = ip(&["netns", "del", &self.namespace]);
        } else {
            let _ = ip(&["tuntap", "del", &self.interface, "mode", "tap"]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let done = Command::new("ip")
        .args(args)
        .output()
        .map_err(|error| format!("running ip: {error}"))?;
    if done.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&done.stderr).trim()
        ))
    }
}
