//! The `net` command: the NIC's address, link and counters, and switching between a
//! static IPv4 address and DHCP.
//!
//! The network stack lives in the kernel; the console reaches it through the
//! [`Network`] trait (from [`Platform::network`](crate::Platform::network)), so
//! parsing, checking and printing are tested here on the host.

use alloc::format;
use alloc::string::String;
use core::fmt::Write;
use core::net::Ipv4Addr;

use crate::{CommandError, Console, Platform, outln};

mod link;
mod pressure;
use dm::human_bytes;
pub use pressure::NbdPressure;

/// How the interface gets its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressMode {
    Dhcp,
    Static,
}

/// An IPv4 address with its prefix length and the default gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Config {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// The NIC driver's frame and byte counts since start-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Received frames the driver could not use.
    pub rx_dropped: u64,
    /// Times a frame waited because every transmit buffer was in flight.
    pub tx_queue_full: u64,
    /// Frames the NIC had no receive buffer for.
    pub rx_missed: u64,
    /// Frames to send the driver had to drop.
    pub tx_dropped: u64,
    /// Times the driver reset its rings (a stalled ring, a new MTU).
    pub ring_resets: u64,
}

/// The NIC's driver and what it was set to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkSettings {
    pub driver: &'static str,
    /// IP MTU (Ethernet payload) in bytes.
    pub mtu: usize,
    /// The NIC computes and checks TCP/UDP checksums.
    pub checksum_offload: bool,
}

/// Traffic figures since start-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub nic: NicCounters,
    /// TCP connections open now.
    pub tcp_open: u64,
    /// TCP connections accepted since start-up.
    pub tcp_accepted: u64,
    pub nbd: NbdPressure,
    /// NBD requests taken for the devices since start-up.
    pub nbd_requests: u64,
    /// The CPU's time since start-up, in TSC cycles.
    pub cpu: CpuCycles,
}

/// TSC cycles since start-up and those the CPU spent halted: what the rest cost,
/// per NBD request, is the appliance's CPU cost of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuCycles {
    pub total: u64,
    pub halted: u64,
    /// Interrupts of disks that finished a request while the CPU waited halted.
    pub disk_interrupts: u64,
}

/// What `net` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetStatus {
    pub mac: [u8; 6],
    pub link_up: bool,
    pub link: LinkSettings,
    pub mode: AddressMode,
    /// `None` while DHCP has no lease yet.
    pub ipv4: Option<Ipv4Config>,
    /// The TCP port NBD clients connect to.
    pub nbd_port: u16,
    pub counters: NetCounters,
}

/// The appliance's network interface as the console sees it.
pub trait Network {
    fn status(&self) -> NetStatus;
    /// Uses a fixed address (already checked by the console); stops DHCP.
    fn set_static(&mut self, config: Ipv4Config);
    /// Drops the current address and asks DHCP for one.
    fn use_dhcp(&mut self);
    /// Sets the MTU and checksum offload; the error says what the NIC cannot do.
    fn configure_link(&mut self, mtu: usize, checksum_offload: bool) -> Result<(), String>;
    /// Stops the NIC's transmitter the way a hung ring stops it, for testing the
    /// driver's stall watchdog; returns the driver's name. NICs without a watchdog
    /// refuse.
    fn stall_transmitter(&mut self) -> Result<&'static str, String>;
}

const USAGE: &str = "usage: net | net set ADDRESS/PREFIX GATEWAY | net dhcp | net mtu BYTES | \
                     net offload on|off";

impl<P: Platform> Console<P> {
    pub(crate) fn net(&mut self, args: &[String], out: &mut dyn Write) -> Result<(), CommandError> {
        let Some(network) = self.platform.network() else {
            return Err("net: this appliance has no network interface".into());
        };
        match args {
            [] => show(&network.status(), out),
            [set, address, gateway] if set == "set" => {
                let config = parse_static(address, gateway)?;
                network.set_static(config);
                outln!(
                    out,
                    "address {}/{} gateway {} (static)",
                    config.address,
                    config.prefix,
                    gateway
                );
            }
            [dhcp] if dhcp == "dhcp" => {
                network.use_dhcp();
                outln!(out, "address: requesting one by DHCP");
            }
            [stall] if stall == "stall-tx" => link::stall_transmitter(network, out)?,
            [setting, value] if setting == "mtu" || setting == "offload" => {
                link::configure(network, setting, value, out)?;
            }
            [set, ..] if set == "set" => {
                return Err(format!("net set needs an address and a gateway ({USAGE})").into());
            }
            [other, ..] => {
                return Err(format!("net: unknown subcommand '{other}' ({USAGE})").into());
            }
        }
        Ok(())
    }
}

fn show(status: &NetStatus, out: &mut dyn Write) {
    let mac = status.mac.map(|byte| format!("{byte:02x}")).join(":");
    let link = if status.link_up { "up" } else { "down" };
    outln!(out, "mac:     {mac}  link {link}");
    let mode = match status.mode {
        AddressMode::Dhcp => "dhcp",
        AddressMode::Static => "static",
    };
    match status.ipv4 {
        Some(config) => {
            outln!(
                out,
                "address: {}/{} ({mode})",
                config.address,
                config.prefix
            );
            match config.gateway {
                Some(gateway) => outln!(out, "gateway: {gateway}"),
                None => outln!(out, "gateway: none"),
            }
        }
        None => outln!(out, "address: none yet ({mode}: waiting for a lease)"),
    }
    let c = &status.counters;
    outln!(
        out,
        "nbd:     port {}, {} connection{} open, {} accepted",
        status.nbd_port,
        c.tcp_open,
        if c.tcp_open == 1 { "" } else { "s" },
        c.tcp_accepted
    );
    outln!(
        out,
        "rx:      {} packets, {}, {} dropped",
        c.nic.rx_packets,
        human_bytes(c.nic.rx_bytes),
        c.nic.rx_dropped
    );
    outln!(
        out,
        "tx:      {} packets, {}, {} queue-full waits",
        c.nic.tx_packets,
        human_bytes(c.nic.tx_bytes),
        c.nic.tx_queue_full
    );
    link::show(status, out);
    pressure::show(&c.nbd, out);
    let busy = c.cpu.total.saturating_sub(c.cpu.halted);
    outln!(
        out,
        "cpu:     {} % busy since start-up ({} M of {} M cycles), {} NBD requests, \
         {} disk interrupts",
        busy * 100 / c.cpu.total.max(1),
        busy / 1_000_000,
        c.cpu.total / 1_000_000,
        c.nbd_requests,
        c.cpu.disk_interrupts
    );
}

/// Checks `ADDRESS/PREFIX GATEWAY`: a unicast host address inside its subnet and a
/// different host of the same subnet as gateway.
fn parse_static(address: &str, gateway: &str) -> Result<Ipv4Config, CommandError> {
    let Some((host, prefix)) = address.split_once('/') else {
        return Err(format!(
            "net set: '{address}' needs a prefix length, e.g. 10.0.2.15/24 ({USAGE})"
        )
        .into());
    };
    let host: Ipv4Addr = host
        .parse()
        .map_err(|_| format!("net set: '{host}' is not an IPv4 address"))?;
    let prefix: u8 = match prefix.parse() {
        Ok(prefix @ 1..=30) => prefix,
        _ => {
            return Err(
                format!("net set: prefix length '{prefix}' must be between 1 and 30").into(),
            );
        }
    };
    let gateway: Ipv4Addr = gateway
        .parse()
        .map_err(|_| format!("net set: gateway '{gateway}' is not an IPv4 address"))?;
    check_host(host, prefix, "address")?;
    check_host(gateway, prefix, "gateway")?;
    let mask = u32::MAX << (32 - prefix);
    if u32::from(host) & mask != u32::from(gateway) & mask {
        return Err(
            format!("net set: gateway {gateway} is outside {host}/{prefix}'s subnet").into(),
        );
    }
    if host == gateway {
        return Err("net set: the gateway cannot be the appliance's own address".into());
    }
    Ok(Ipv4Config {
        address: host,
        prefix,
        gateway: Some(gateway),
    })
}

/// A host address: unicast, and neither the network nor the broadcast address of
/// its subnet.
fn check_host(address: Ipv4Addr, prefix: u8, what: &str) -> Result<(), CommandError> {
    if address.is_unspecified()
        || address.is_loopback()
        || address.is_multicast()
        || address.is_broadcast()
        || address.octets()[0] >= 240
    {
        return Err(format!("net set: {what} {address} is not a unicast host address").into());
    }
    let host_bits = u32::from(address) & !(u32::MAX << (32 - prefix));
    if host_bits == 0 || host_bits == !(u32::MAX << (32 - prefix)) {
        return Err(format!(
            "net set: {what} {address} is the network or broadcast address of /{prefix}"
        )
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
