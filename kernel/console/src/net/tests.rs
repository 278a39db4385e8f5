//! `net` against a fake network interface.

use alloc::vec::Vec;
use core::net::Ipv4Addr;

use super::*;
use crate::tests::{console_over, error, lines, run};
use crate::{Crash, MemoryStats, Platform};

/// A network that records what it was told and reports it back.
struct FakeNetwork {
    status: NetStatus,
    dhcp_requests: usize,
    /// Times the transmitter was stopped.
    stalls: usize,
    /// Whether the fake NIC can offload checksums (else it refuses).
    can_offload: bool,
}

struct NetPlatform {
    network: Option<FakeNetwork>,
}

impl Platform for NetPlatform {
    fn now_ns(&self) -> u64 {
        0
    }
    fn memory(&self) -> Option<MemoryStats> {
        None
    }
    fn power_off(&mut self) {}
    fn crash(&mut self, _how: Crash) {}
    fn network(&mut self) -> Option<&mut dyn Network> {
        self.network
            .as_mut()
            .map(|network| network as &mut dyn Network)
    }
}

impl Network for FakeNetwork {
    fn status(&self) -> NetStatus {
        self.status.clone()
    }
    fn set_static(&mut self, config: Ipv4Config) {
        self.status.mode = AddressMode::Static;
        self.status.ipv4 = Some(config);
    }
    fn use_dhcp(&mut self) {
        self.status.mode = AddressMode::Dhcp;
        self.status.ipv4 = None;
        self.dhcp_requests += 1;
    }
    fn configure_link(&mut self, mtu: usize, checksum_offload: bool) -> Result<(), String> {
        if checksum_offload && !self.can_offload {
            return Err("this NIC offers no checksum offload".into());
        }
        self.status.link.mtu = mtu;
        self.status.link.checksum_offload = checksum_offload;
        Ok(())
    }
    fn stall_transmitter(&mut self) -> Result<&'static str, String> {
        if self.status.link.driver == "virtio-net" {
            return Err("virtio-net has no transmit stall watchdog".into());
        }
        self.stalls += 1;
        Ok(self.status.link.driver)
    }
}

fn leased() -> NetStatus {
    NetStatus {
        mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        link_up: true,
        link: LinkSettings {
            driver: "e1000e",
            mtu: 1500,
            checksum_offload: true,
        },
        mode: AddressMode::Dhcp,
        ipv4: Some(Ipv4Config {
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24,
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
        }),
        nbd_port: 10809,
        counters: NetCounters {
            nic: NicCounters {
                rx_packets: 1200,
                rx_bytes: 3 << 20,
                tx_packets: 900,
                tx_bytes: 1536,
                rx_dropped: 2,
                tx_queue_full: 7,
                rx_missed: 3,
                tx_dropped: 0,
                ring_resets: 1,
            },
            tcp_open: 1,
            tcp_accepted: 5,
            nbd: NbdPressure {
                sockets: 9,
                max_sockets: 212,
                socket_bytes: 6 << 20,
                syns_held: 12,
                request_bytes: 3 << 20,
                request_limit: 20 << 20,
                waiting: 2,
                waits: 1204,
                refused: 1,
            },
            nbd_requests: 48_211,
            cpu: CpuCycles {
                total: 12_800_400_000,
                halted: 8_590_000_000,
                disk_interrupts: 30_112,
            },
        },
    }
}

fn console(status: NetStatus) -> Console<NetPlatform> {
    console_over(
        NetPlatform {
            network: Some(FakeNetwork {
                status,
                dhcp_requests: 0,
                stalls: 0,
                can_offload: true,
            }),
        },
        Vec::new(),
    )
}

fn network(console: &mut Console<NetPlatform>) -> &FakeNetwork {
    console.platform_mut().network.as_ref().unwrap()
}

fn network_mut(console: &mut Console<NetPlatform>) -> &mut FakeNetwork {
    console.platform_mut().network.as_mut().unwrap()
}

#[test]
fn net_shows_address_link_and_counters() {
    let mut console = console(leased());
    let out = run(&mut console, "net");
    assert_eq!(
        lines(&out),
        [
            "mac:     52:54:00:12:34:56  link up",
            "address: 10.0.2.15/24 (dhcp)",
            "gateway: 10.0.2.2",
            "nbd:     port 10809, 1 connection open, 5 accepted",
            "rx:      1200 packets, 3.00 MiB, 2 dropped",
            "tx:      900 packets, 1.50 KiB, 7 queue-full waits",
            "link:    e1000e, mtu 1500, checksum offload on",
            "nic:     3 missed (no buffer), 0 send drops, 1 ring resets",
            "sockets: 9 of 212 (6.00 MiB of buffers), 12 connection attempts held back",
            "memory:  requests hold 3.00 MiB of 20.00 MiB, 2 waiting (1204 waits, 1 refused)",
            "cpu:     32 % busy since start-up (4210 M of 12800 M cycles), 48211 NBD requests, \
             30112 disk interrupts",
        ]
    );
}

#[test]
fn net_without_a_lease_or_link_says_so() {
    let mut status = leased();
    status.ipv4 = None;
    status.link_up = false;
    status.counters.tcp_open = 0;
    let mut console = console(status);
    let out = run(&mut console, "net");
    let shown = lines(&out);
    assert_eq!(shown[0], "mac:     52:54:00:12:34:56  link down");
    assert_eq!(shown[1], "address: none yet (dhcp: waiting for a lease)");
    assert_eq!(
        shown[2],
        "nbd:     port 10809, 0 connections open, 5 accepted"
    );
}

#[test]
fn net_set_uses_a_static_address_and_net_dhcp_returns_to_dhcp() {
    let mut console = console(leased());
    let out = run(&mut console, "net set 192.168.7.20/23 192.168.6.1");
    assert_eq!(
        lines(&out),
        ["address 192.168.7.20/23 gateway 192.168.6.1 (static)"]
    );
    let shown = run(&mut console, "net");
    assert_eq!(lines(&shown)[1], "address: 192.168.7.20/23 (static)");
    assert_eq!(lines(&shown)[2], "gateway: 192.168.6.1");

    let out = run(&mut console, "net dhcp");
    assert_eq!(lines(&out), ["address: requesting one by DHCP"]);
    assert_eq!(network(&mut console).dhcp_requests, 1);
    assert_eq!(network(&mut console).status.mode, AddressMode::Dhcp);
}

#[test]
fn bad_net_input_is_one_error_line_and_changes_nothing() {
    let mut console = console(leased());
    let cases = [
        (
            "net set 10.0.2.15 10.0.2.2",
            "error: net set: '10.0.2.15' needs a prefix length, e.g. 10.0.2.15/24 \
             (usage: net | net set ADDRESS/PREFIX GATEWAY | net dhcp | net mtu BYTES | net offload on|off)",
        ),
        (
            "net set 10.0.2.300/24 10.0.2.2",
            "error: net set: '10.0.2.300' is not an IPv4 address",
        ),
        (
            "net set 10.0.2.15/33 10.0.2.2",
            "error: net set: prefix length '33' must be between 1 and 30",
        ),
        (
            "net set 10.0.2.15/0 10.0.2.2",
            "error: net set: prefix length '0' must be between 1 and 30",
        ),
        (
            "net set 10.0.2.15/24 gateway",
            "error: net set: gateway 'gateway' is not an IPv4 address",
        ),
        (
            "net set 10.0.3.15/24 10.0.2.2",
            "error: net set: gateway 10.0.2.2 is outside 10.0.3.15/24's subnet",
        ),
        (
            "net set 10.0.2.2/24 10.0.2.2",
            "error: net set: the gateway cannot be the appliance's own address",
        ),
        (
            "net set 10.0.2.0/24 10.0.2.2",
            "error: net set: address 10.0.2.0 is the network or broadcast address of /24",
        ),
        (
            "net set 10.0.2.15/24 10.0.2.255",
            "error: net set: gateway 10.0.2.255 is the network or broadcast address of /24",
        ),
        (
            "net set 224.0.0.5/24 224.0.0.1",
            "error: net set: address 224.0.0.5 is not a unicast host address",
        ),
        (
            "net set 127.0.0.5/8 127.0.0.1",
            "error: net set: address 127.0.0.5 is not a unicast host address",
        ),
        (
            "net set 10.0.2.15/24",
            "error: net set needs an address and a gateway \
             (usage: net | net set ADDRESS/PREFIX GATEWAY | net dhcp | net mtu BYTES | net offload on|off)",
        ),
        (
            "net set 10.0.2.15/24 10.0.2.2 extra",
            "error: net set needs an address and a gateway \
             (usage: net | net set ADDRESS/PREFIX GATEWAY | net dhcp | net mtu BYTES | net offload on|off)",
        ),
        (
            "net up",
            "error: net: unknown subcommand 'up' \
             (usage: net | net set ADDRESS/PREFIX GATEWAY | net dhcp | net mtu BYTES | net offload on|off)",
        ),
        (
            "net dhcp now",
            "error: net: unknown subcommand 'dhcp' \
             (usage: net | net set ADDRESS/PREFIX GATEWAY | net dhcp | net mtu BYTES | net offload on|off)",
        ),
    ];
    for (line, expected) in cases {
        assert_eq!(error(&mut console, line), expected, "{line}");
    }
    assert_eq!(network(&mut console).status, leased());
    assert_eq!(network(&mut console).dhcp_requests, 0);
}

#[test]
fn net_mtu_and_offload_change_the_link_and_net_shows_it() {
    let mut console = console(leased());
    let out = run(&mut console, "net mtu 9000");
    assert_eq!(lines(&out), ["e1000e: mtu 9000, checksum offload on"]);
    let out = run(&mut console, "net offload off");
    assert_eq!(lines(&out), ["e1000e: mtu 9000, checksum offload off"]);
    let shown = run(&mut console, "net");
    assert_eq!(
        lines(&shown)[6],
        "link:    e1000e, mtu 9000, checksum offload off"
    );
    let out = run(&mut console, "net mtu 68");
    assert_eq!(lines(&out), ["e1000e: mtu 68, checksum offload off"]);
}

#[test]
fn bad_mtu_or_offload_is_one_error_line_and_changes_nothing() {
    let mut console = console(leased());
    network_mut(&mut console).can_offload = false;
    network_mut(&mut console).status.link.checksum_offload = false;
    let before = network(&mut console).status.clone();
    for (line, expected) in [
        (
            "net mtu 9001",
            "error: net mtu: '9001' is not an MTU between 68 and 9000 bytes",
        ),
        (
            "net mtu 67",
            "error: net mtu: '67' is not an MTU between 68 and 9000 bytes",
        ),
        (
            "net mtu jumbo",
            "error: net mtu: 'jumbo' is not an MTU between 68 and 9000 bytes",
        ),
        (
            "net offload maybe",
            "error: net offload: 'maybe' is neither on nor off",
        ),
        (
            "net offload on",
            "error: net offload: this NIC offers no checksum offload",
        ),
        (
            "net mtu",
            "error: net: unknown subcommand 'mtu' \
             (usage: net | net set ADDRESS/PREFIX GATEWAY | net dhcp | net mtu BYTES | \
             net offload on|off)",
        ),
    ] {
        assert_eq!(error(&mut console, line), expected, "{line}");
    }
    assert_eq!(network(&mut console).status, before);
}

#[test]
fn net_without_an_interface_is_an_error() {
    let mut console = console_over(NetPlatform { network: None }, Vec::new());
    assert_eq!(
        error(&mut console, "net"),
        "error: net: this appliance has no network interface"
    );
}

#[test]
fn net_stall_tx_stops_a_transmitter_that_has_a_watchdog() {
    let mut console = console(leased());
    let out = run(&mut console, "net stall-tx");
    assert_eq!(
        lines(&out),
        ["e1000e: transmitter stopped; the watchdog resets the rings once frames wait 2 s"]
    );
    assert_eq!(network(&mut console).stalls, 1);
    network_mut(&mut console).status.link.driver = "virtio-net";
    assert_eq!(
        error(&mut console, "net stall-tx"),
        "error: net stall-tx: virtio-net has no transmit stall watchdog"
    );
    assert_eq!(network(&mut console).stalls, 1);
}
