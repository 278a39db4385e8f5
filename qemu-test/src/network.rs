//! The appliance's NIC and what it is plugged into: QEMU's user network (with the
//! NBD port forward) or an existing tap interface on the host.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// The emulated NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Nic {
    /// virtio-net: QEMU's paravirtual NIC.
    #[default]
    Virtio,
    /// Intel 82574L, a NIC real servers have.
    E1000e,
}

impl Nic {
    /// QEMU's device, without option ROM (the kernel drives the NIC itself and
    /// firmware network boot would only slow the boot down).
    fn device(self) -> &'static str {
        match self {
            Nic::Virtio => "virtio-net-pci,netdev=n0,romfile=",
            Nic::E1000e => "e1000e,netdev=n0,romfile=",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Nic::Virtio => "virtio",
            Nic::E1000e => "e1000e",
        }
    }
}

impl FromStr for Nic {
    type Err = String;

    fn from_str(name: &str) -> Result<Nic, String> {
        match name {
            "virtio" => Ok(Nic::Virtio),
            "e1000e" => Ok(Nic::E1000e),
            _ => Err(format!("unknown NIC '{name}' (use virtio or e1000e)")),
        }
    }
}

impl fmt::Display for Nic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the NIC's cable goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NetBackend {
    /// QEMU's user network: DHCP from QEMU, the NBD port forwarded from 127.0.0.1.
    #[default]
    User,
    /// An existing tap interface (`ip tuntap add NAME mode tap`); the appliance
    /// needs an address on its network (`net set`), and no port is forwarded.
    Tap(String),
}

impl NetBackend {
    /// Checks that a tap interface exists and is a tap device.
    pub fn check(&self) -> Result<(), String> {
        let NetBackend::Tap(name) = self else {
            return Ok(());
        };
        let device = Path::new("/sys/class/net").join(name);
        if !device.exists() {
            return Err(format!(
                "tap interface {name} does not exist; create it first, e.g. \
                 ip tuntap add {name} mode tap && ip link set {name} up"
            ));
        }
        if !device.join("tun_flags").exists() {
            return Err(format!(
                "network interface {name} is not a tap device (see ip tuntap)"
            ));
        }
        Ok(())
    }

    /// QEMU's `-netdev` value, with `forward` (`,hostfwd=...`) on the user network.
    pub(crate) fn netdev(&self, forward: &str) -> String {
        match self {
            NetBackend::User => format!("user,id=n0{forward}"),
            NetBackend::Tap(name) => {
                format!("tap,id=n0,ifname={name},script=no,downscript=no")
            }
        }
    }

    pub fn is_tap(&self) -> bool {
        matches!(self, NetBackend::Tap(_))
    }
}

impl FromStr for NetBackend {
    type Err = String;

    fn from_str(value: &str) -> Result<NetBackend, String> {
        match value.split_once(':') {
            None if value == "user" => Ok(NetBackend::User),
            Some(("tap", name))
                if !name.is_empty() && name.len() < 16 && !name.contains(['/', ',', ' ', ':']) =>
            {
                Ok(NetBackend::Tap(name.to_string()))
            }
            Some(("tap", name)) => Err(format!("'{name}' is not a network interface name")),
            _ => Err(format!(
                "unknown network '{value}' (use user or tap:IFNAME)"
            )),
        }
    }
}

impl fmt::Display for NetBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetBackend::User => f.write_str("user"),
            NetBackend::Tap(name) => write!(f, "tap:{name}"),
        }
    }
}

/// The `-netdev` and `-device` arguments for `nic` on `backend`.
pub(crate) fn qemu_args(nic: Nic, backend: &NetBackend, forward: &str) -> [String; 4] {
    [
        "-netdev".into(),
        backend.netdev(forward),
        "-device".into(),
        nic.device().into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_and_network_names() {
        assert_eq!("virtio".parse(), Ok(Nic::Virtio));
        assert_eq!("e1000e".parse(), Ok(Nic::E1000e));
        assert_eq!(
            "rtl8139".parse::<Nic>(),
            Err(String::from("unknown NIC 'rtl8139' (use virtio or e1000e)"))
        );
        assert_eq!("user".parse(), Ok(NetBackend::User));
        assert_eq!("tap:tb0".parse(), Ok(NetBackend::Tap("tb0".into())));
        assert_eq!(
            "bridge:br0".parse::<NetBackend>(),
            Err(String::from(
                "unknown network 'bridge:br0' (use user or tap:IFNAME)"
            ))
        );
        assert_eq!(
            "tap:".parse::<NetBackend>(),
            Err(String::from("'' is not a network interface name"))
        );
        assert_eq!(
            "tap:a,b".parse::<NetBackend>(),
            Err(String::from("'a,b' is not a network interface name"))
        );
        assert_eq!(NetBackend::Tap("tb0".into()).to_string(), "tap:tb0");
    }

    #[test]
    fn a_missing_tap_interface_is_named() {
        let error = NetBackend::Tap("tbmissing0".into()).check().unwrap_err();
        assert_eq!(
            error,
            "tap interface tbmissing0 does not exist; create it first, e.g. \
             ip tuntap add tbmissing0 mode tap && ip link set tbmissing0 up"
        );
        assert_eq!(
            NetBackend::Tap("lo".into()).check().unwrap_err(),
            "network interface lo is not a tap device (see ip tuntap)"
        );
    }

    #[test]
    fn netdev_and_device_arguments() {
        assert_eq!(
            qemu_args(
                Nic::E1000e,
                &NetBackend::User,
                ",hostfwd=tcp:127.0.0.1:5-:10809"
            ),
            [
                "-netdev",
                "user,id=n0,hostfwd=tcp:127.0.0.1:5-:10809",
                "-device",
                "e1000e,netdev=n0,romfile="
            ]
        );
        assert_eq!(
            qemu_args(Nic::Virtio, &NetBackend::Tap("tb0".into()), ""),
            [
                "-netdev",
                "tap,id=n0,ifname=tb0,script=no,downscript=no",
                "-device",
                "virtio-net-pci,netdev=n0,romfile="
            ]
        );
    }
}
