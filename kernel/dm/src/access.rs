//! Which NBD clients may use which exports: the access list (`nbd allow`, `nbd deny`,
//! `nbd default`), kept with the configuration.
//!
//! A rule names an export (a device, or `*` for every export) and clients (a network,
//! i.e. an address with a prefix length, or a client certificate: see `clients.rs`)
//! and says what those clients get: read-write, read-only, refused, or refused with
//! the export hidden. For a client asking for an export the deciding rule is the most
//! specific one that matches: a rule naming the export beats a `*` rule, then a
//! certificate fingerprint beats a certificate subject, which beats an address, and
//! the longer prefix wins. Without a matching rule the default applies (read-write
//! unless set otherwise, so configurations from before access lists serve as they
//! did).

mod clients;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::net::IpAddr;
pub use nbd::Access;
use nbd::Peer;

pub use clients::{Client, ClientCertificate, Clients, describe_peer};

use crate::Error;
use crate::device::{DeviceId, State};
use crate::mapper::DeviceMapper;

/// The pattern for every export.
pub const EVERY_EXPORT: &str = "*";

/// An address and a prefix length: the clients whose addresses agree with it in the
/// first `prefix` bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Network {
    pub address: IpAddr,
    pub prefix: u8,
}

impl Network {
    /// `ADDRESS` (one host) or `ADDRESS/PREFIX`, IPv4 or IPv6; the address must have
    /// no bits set past the prefix.
    pub fn parse(text: &str) -> Result<Network, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("'{address}' is not an IPv4 or IPv6 address"))?;
        let bits = Self::bits_of(address);
        let prefix = match prefix {
            None => bits,
            Some(prefix) => match prefix.parse::<u8>() {
                Ok(length) if length <= bits && prefix.bytes().all(|b| b.is_ascii_digit()) => {
                    length
                }
                _ => {
                    return Err(format!(
                        "prefix length '{prefix}' must be a number from 0 to {bits}"
                    ));
                }
            },
        };
        let network = Network { address, prefix };
        if network.host_part(address) != 0 {
            let base = network.masked(address);
            return Err(format!(
                "{text} has bits set past the prefix (the network is {base}/{prefix})"
            ));
        }
        Ok(network)
    }

    /// Whether `address` lies in this network (an IPv4 client reached over IPv6 as
    /// `::ffff:a.b.c.d` counts as its IPv4 address).
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        Self::bits_of(address) == Self::bits_of(self.address)
            && self.masked(address) == self.address
    }

    fn bits_of(address: IpAddr) -> u8 {
        match address {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    fn as_bits(address: IpAddr) -> u128 {
        match address {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        }
    }

    fn host_mask(&self, address: IpAddr) -> u128 {
        let host_bits = Self::bits_of(address) - self.prefix;
        if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        }
    }

    fn host_part(&self, address: IpAddr) -> u128 {
        Self::as_bits(address) & self.host_mask(address)
    }

    /// `address` with the host bits cleared.
    fn masked(&self, address: IpAddr) -> IpAddr {
        let bits = Self::as_bits(address) & !self.host_mask(address);
        match address {
            IpAddr::V4(_) => IpAddr::V4((bits as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(bits.into()),
        }
    }
}

/// One host prints as its address, a network as `ADDRESS/PREFIX`.
impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix == Self::bits_of(self.address) {
            write!(f, "{}", self.address)
        } else {
            write!(f, "{}/{}", self.address, self.prefix)
        }
    }
}

/// What `clients` get for `export` (a device name or `*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub export: String,
    pub clients: Clients,
    pub access: Access,
}

/// The rules and the default. At most one rule per export pattern and clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessList {
    pub default: Access,
    pub rules: Vec<Rule>,
}

impl Default for AccessList {
    /// Everything allowed, as before access lists existed.
    fn default() -> Self {
        AccessList {
            default: Access::ReadWrite,
            rules: Vec::new(),
        }
    }
}

impl AccessList {
    /// What `client` gets for `export`.
    pub fn decide(&self, export: &str, client: &Client) -> Access {
        self.rules
            .iter()
            .filter(|rule| {
                (rule.export == export || rule.export == EVERY_EXPORT)
                    && rule.clients.matches(client)
            })
            .max_by_key(|rule| (rule.export != EVERY_EXPORT, rule.clients.precision()))
            .map_or(self.default, |rule| rule.access)
    }

    /// Adds `rule`, replacing the one for the same export pattern and clients.
    pub fn set(&mut self, rule: Rule) {
        match self
            .rules
            .iter_mut()
            .find(|old| old.export == rule.export && old.clients == rule.clients)
        {
            Some(old) => old.access = rule.access,
            None => self.rules.push(rule),
        }
    }

    /// Drops the rule for `export` and `clients`; returns whether there was one.
    pub fn forget(&mut self, export: &str, clients: &Clients) -> bool {
        let before = self.rules.len();
        self.rules
            .retain(|rule| rule.export != export || rule.clients != *clients);
        self.rules.len() != before
    }

    /// The rules that concern `export` (those naming it and the `*` ones).
    pub fn rules_for<'a>(&'a self, export: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules
            .iter()
            .filter(move |rule| rule.export == export || rule.export == EVERY_EXPORT)
    }

    /// Rules follow a device that is renamed.
    pub(crate) fn rename(&mut self, from: &str, to: &str) {
        for rule in &mut self.rules {
            if rule.export == from {
                rule.export = to.to_string();
            }
        }
    }
}

/// How the console and the configuration spell an access: `allow`, `allow ro`,
/// `deny`, `deny hide`.
pub fn describe(access: Access) -> &'static str {
    match access {
        Access::ReadWrite => "allow",
        Access::ReadOnly => "allow ro",
        Access::Refused => "deny",
        Access::Hidden => "deny hide",
    }
}

impl DeviceMapper {
    /// The NBD access list.
    pub fn access_list(&self) -> &AccessList {
        &self.access
    }

    /// Sets what `clients` (`ADDRESS[/PREFIX]`, `subject:DN` or `cert:FINGERPRINT`)
    /// get for `export` (a device or `*`), replacing the rule for the same pair. Saved
    /// before it takes effect; connections that lose what they were opened with are
    /// closed by the NBD server.
    pub fn set_access(&mut self, export: &str, clients: &str, access: Access) -> Result<(), Error> {
        let export = self.export_pattern(export)?;
        let clients = Clients::parse(clients)?;
        self.change_access(|list| {
            list.set(Rule {
                export,
                clients,
                access,
            })
        })
    }

    /// Drops the rule for `export` and `clients`: they fall back on broader rules or
    /// the default.
    pub fn forget_access(&mut self, export: &str, clients: &str) -> Result<(), Error> {
        let pattern = self.export_pattern(export)?;
        let parsed = Clients::parse(clients)?;
        if !self
            .access
            .rules
            .iter()
            .any(|rule| rule.export == pattern && rule.clients == parsed)
        {
            return Err(
                format!("there is no rule for {pattern} and {parsed} (see nbd acl)").into(),
            );
        }
        self.change_access(|list| {
            list.forget(&pattern, &parsed);
        })
    }

    /// Sets what clients no rule matches get.
    pub fn set_default_access(&mut self, access: Access) -> Result<(), Error> {
        self.change_access(|list| list.default = access)
    }

    /// The NBD clients of each export, by device name, in creation order.
    pub fn nbd_clients(&self) -> Vec<(&str, &Peer)> {
        self.devices()
            .filter_map(|device| match &device.state {
                State::Active(active) => Some((device.name.as_str(), &active.clients)),
                State::Inactive(_) => None,
            })
            .flat_map(|(name, clients)| clients.iter().map(move |peer| (name, peer)))
            .collect()
    }

    /// What the client `peer` gets for the export of device `id`.
    pub(crate) fn access_of(&self, id: DeviceId, peer: &Peer) -> Access {
        match self.devices.get(&id) {
            Some(device) => self.access.decide(&device.name, &Client::of(peer)),
            None => Access::Refused,
        }
    }

    /// `*`, or the name of a device that exists.
    fn export_pattern(&self, export: &str) -> Result<String, Error> {
        if export == EVERY_EXPORT {
            return Ok(export.to_string());
        }
        let device = self.device(export)?;
        let carries_data = match device.state() {
            State::Active(active) => active.carries_data(),
            State::Inactive(_) => true,
        };
        if !carries_data {
            return Err(format!(
                "{} is a pool, which carries no data and is not exported",
                device.name
            )
            .into());
        }
        Ok(device.name.clone())
    }

    /// Applies `change` to a copy of the list, saves the configuration with it and
    /// keeps it; a failed save leaves the old list.
    fn change_access(&mut self, change: impl FnOnce(&mut AccessList)) -> Result<(), Error> {
        let mut list = self.access.clone();
        change(&mut list);
        let old = core::mem::replace(&mut self.access, list);
        if let Err(error) = self.save() {
            self.access = old;
            return Err(error);
        }
        self.access_generation += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Disk, Format};
    use alloc::boxed::Box;
    use alloc::vec;
    use blockdev::MemDisk;
    use core::net::Ipv4Addr;

    fn host(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 1, 2, last))
    }

    fn rule(export: &str, clients: &str, access: Access) -> Rule {
        Rule {
            export: export.into(),
            clients: Clients::parse(clients).unwrap(),
            access,
        }
    }

    fn at(address: IpAddr) -> Client {
        Client::at(address)
    }

    #[test]
    fn networks_parse_strictly_and_contain_their_hosts() {
        let net = Network::parse("10.1.0.0/16").unwrap();
        assert!(net.contains(host(3)));
        assert!(!net.contains(IpAddr::V4(Ipv4Addr::new(10, 2, 0, 1))));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(net.contains(mapped), "IPv4-mapped IPv6 counts as IPv4");
        assert!(!Network::parse("::/0").unwrap().contains(host(3)));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains(host(3)));
        assert!(
            Network::parse("fd00::/8")
                .unwrap()
                .contains("fd12::1".parse().unwrap())
        );
        assert_eq!(Network::parse("10.1.2.3").unwrap().to_string(), "10.1.2.3");
        assert_eq!(
            Network::parse("10.1.2.3/32").unwrap().to_string(),
            "10.1.2.3"
        );
        assert_eq!(net.to_string(), "10.1.0.0/16");
        for (bad, why) in [
            ("10.1.2", "'10.1.2' is not an IPv4 or IPv6 address"),
            (
                "10.1.2.3/33",
                "prefix length '33' must be a number from 0 to 32",
            ),
            (
                "10.1.2.3/",
                "prefix length '' must be a number from 0 to 32",
            ),
            (
                "10.1.2.3/+8",
                "prefix length '+8' must be a number from 0 to 32",
            ),
            (
                "fd00::/129",
                "prefix length '129' must be a number from 0 to 128",
            ),
            (
                "10.1.2.3/16",
                "10.1.2.3/16 has bits set past the prefix (the network is 10.1.0.0/16)",
            ),
        ] {
            assert_eq!(Network::parse(bad).unwrap_err(), why);
        }
    }

    #[test]
    fn the_most_specific_rule_decides_and_the_default_covers_the_rest() {
        let mut list = AccessList::default();
        assert_eq!(list.decide("vol0", &at(host(1))), Access::ReadWrite);
        list.default = Access::Refused;
        list.set(rule("*", "10.0.0.0/8", Access::ReadOnly));
        list.set(rule("*", "10.1.2.0/24", Access::Hidden));
        list.set(rule("vol0", "10.0.0.0/8", Access::ReadWrite));
        list.set(rule("vol0", "10.1.2.7", Access::Refused));
        // An export's own rules beat the `*` ones, whatever their prefixes.
        assert_eq!(list.decide("vol0", &at(host(1))), Access::ReadWrite);
        assert_eq!(list.decide("vol0", &at(host(7))), Access::Refused);
        // Among `*` rules the longer prefix wins.
        assert_eq!(list.decide("vol1", &at(host(1))), Access::Hidden);
        let elsewhere = IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9));
        assert_eq!(list.decide("vol1", &at(elsewhere)), Access::ReadOnly);
        let outside = IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1));
        assert_eq!(list.decide("vol0", &at(outside)), Access::Refused);

        // Setting the same pair again replaces the rule; forgetting it falls back.
        list.set(rule("vol0", "10.1.2.7", Access::ReadOnly));
        assert_eq!(list.rules.len(), 4);
        assert_eq!(list.decide("vol0", &at(host(7))), Access::ReadOnly);
        let one_host = Clients::parse("10.1.2.7").unwrap();
        assert!(list.forget("vol0", &one_host));
        assert!(!list.forget("vol0", &one_host));
        assert_eq!(list.decide("vol0", &at(host(7))), Access::ReadWrite);
        let names: Vec<&str> = list.rules_for("vol1").map(|r| r.export.as_str()).collect();
        assert_eq!(names, ["*", "*"]);
    }

    #[test]
    fn certificates_outrank_addresses_within_an_export_pattern() {
        let fingerprint = [0x5a; 32];
        let holder = |subject: &str| Client {
            address: host(9),
            certificate: Some(ClientCertificate {
                fingerprint,
                subject: Some(subject.into()),
            }),
        };
        let digest = alloc::format!("cert:{}", crate::tls::fingerprint_text(&fingerprint));
        let mut list = AccessList {
            default: Access::Refused,
            rules: Vec::new(),
        };
        list.set(rule("vol0", "10.1.2.9", Access::ReadWrite));
        list.set(rule(
            "vol0",
            "subject:CN=backup,O=Example",
            Access::ReadOnly,
        ));
        // The subject rule beats the host's own address rule.
        assert_eq!(
            list.decide("vol0", &holder("CN=backup,O=Example")),
            Access::ReadOnly
        );
        assert_eq!(list.decide("vol0", &holder("CN=other")), Access::ReadWrite);
        assert_eq!(list.decide("vol0", &at(host(9))), Access::ReadWrite);
        // The fingerprint beats the subject.
        list.set(rule("vol0", &digest, Access::Hidden));
        assert_eq!(
            list.decide("vol0", &holder("CN=backup,O=Example")),
            Access::Hidden
        );
        // A `*` certificate rule loses to any rule naming the export.
        list.set(rule("*", &digest, Access::ReadWrite));
        assert_eq!(list.decide("vol0", &holder("CN=other")), Access::Hidden);
        assert_eq!(list.decide("vol1", &holder("CN=other")), Access::ReadWrite);
        assert_eq!(list.decide("vol1", &at(host(9))), Access::Refused);
        assert!(list.forget("vol0", &Clients::parse(&digest).unwrap()));
        assert_eq!(list.decide("vol0", &holder("CN=other")), Access::ReadWrite);
    }

    fn mapper(disk: &MemDisk) -> DeviceMapper {
        let mut dm = DeviceMapper::new(vec![Disk {
            name: "vda".into(),
            device: Box::new(disk.handle()),
        }]);
        dm.restore();
        dm
    }

    /// A configuration on the disk and one export, `vol0`.
    fn configured(disk: &MemDisk) -> DeviceMapper {
        let mut dm = mapper(disk);
        dm.config_init("vda", [7; 16], false).unwrap();
        dm.create("vol0", false, "0 64 linear vda 0", Format::IfBlank)
            .unwrap();
        dm
    }

    #[test]
    fn changes_are_checked_saved_and_survive_a_restart_and_a_rename() {
        let disk = MemDisk::new(8192);
        let mut dm = configured(&disk);
        let before = dm.access_list().clone();
        for (export, network, why) in [
            ("nope", "10.0.0.0/8", "no device called 'nope' (see ls)"),
            (
                "vol0",
                "10.0.0.1/8",
                "10.0.0.1/8 has bits set past the prefix (the network is 10.0.0.0/8)",
            ),
            ("vol0", "ten", "'ten' is not an IPv4 or IPv6 address"),
        ] {
            let error = dm
                .set_access(export, network, Access::ReadOnly)
                .unwrap_err();
            assert_eq!(error.0, why);
        }
        assert_eq!(
            dm.forget_access("vol0", "10.0.0.0/8").unwrap_err().0,
            "there is no rule for vol0 and 10.0.0.0/8 (see nbd acl)"
        );
        assert_eq!(*dm.access_list(), before);
        assert_eq!(dm.access_generation, 0, "nothing changed");

        dm.set_access("/dev/mapper/vol0", "10.0.0.0/8", Access::ReadOnly)
            .unwrap();
        dm.set_access("*", "10.1.2.3", Access::Hidden).unwrap();
        dm.set_default_access(Access::Refused).unwrap();
        assert_eq!(dm.access_generation, 3);
        dm.rename("vol0", "data").unwrap();
        let saved = dm.access_list().clone();
        assert_eq!(saved.rules[0].export, "data");
        drop(dm);

        let dm = mapper(&disk);
        assert_eq!(*dm.access_list(), saved);
        assert_eq!(dm.access.decide("data", &at(host(3))), Access::ReadOnly);
        assert_eq!(
            dm.access
                .decide("data", &at(IpAddr::V4(Ipv4Addr::LOCALHOST))),
            Access::Refused
        );
    }

    #[test]
    fn a_configuration_without_access_records_allows_everything() {
        let disk = MemDisk::new(8192);
        drop(configured(&disk));
        let dm = mapper(&disk);
        assert_eq!(*dm.access_list(), AccessList::default());
        assert_eq!(
            dm.access.decide("vol0", &at("192.0.2.1".parse().unwrap())),
            Access::ReadWrite
        );
    }
}
