//! The appliance's network: the first NIC (virtio-net or e1000e, see [`nic`]),
//! smoltcp's IPv4 stack with a DHCP client (or a static address from the console),
//! and the NBD service's TCP sockets (see [`nbd_sockets`]).
//!
//! Everything runs from the main loop: [`NetStack::poll`] moves frames, socket
//! bytes and NBD requests until nothing moves. The NIC's interrupt only wakes the
//! idle loop, so a request arriving while the CPU sleeps is served at once rather
//! than at the next timer tick.

mod backlog;
mod client;
mod nbd_sockets;
mod nic;

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use core::cell::RefCell;
use core::fmt::Write;
use core::sync::atomic::{Ordering, fence};
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::dhcpv4;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Cidr};
use virtio_drivers::transport::DeviceType;
use virtio_drivers::transport::pci::virtio_device_type;

use crate::arch::{clock, interrupts};
use crate::drivers::e1000e::{self, E1000e};
use crate::drivers::virtio_net::VirtioNet;
use crate::memory;
use crate::pci::{Pci, PciFunction};
use backlog::Backlog;
use console::{
    AddressMode, CpuCycles, Ipv4Config, LinkSettings, NbdPressure, NetCounters, NetStatus, Network,
};
use nbd_sockets::{Heap, NbdSockets};
use nic::Nic;

pub use client::connect;
pub use nbd_sockets::NBD_PORT;

/// Rounds of stack polling and socket pumping per [`NetStack::poll`] before the
/// main loop gets a turn (console input must not starve under load).
const ROUNDS_PER_POLL: usize = 16;
/// Part of the heap NBD requests and new sockets leave free, at least
/// [`MIN_HEAP_RESERVE`]: the pool's metadata work and the console allocate too.
const HEAP_RESERVE_SHARE: usize = 8;
const MIN_HEAP_RESERVE: usize = 4 << 20;

/// The heap now, with the reserve for a heap of its size.
fn heap() -> Heap {
    let (used, free) = memory::heap_usage();
    Heap {
        free,
        reserve: ((used + free) / HEAP_RESERVE_SHARE).max(MIN_HEAP_RESERVE),
    }
}

pub struct NetStack {
    device: Nic,
    /// How the NIC wakes the idle loop.
    wakeup: Wakeup,
    iface: Interface,
    sockets: SocketSet<'static>,
    mode: AddressMode,
    dhcp: Option<SocketHandle>,
    nbd: NbdSockets,
    /// Counts outgoing connections, for their local ports.
    next_local_port: u16,
    /// Sockets of dropped outgoing connections, removed after the next poll.
    closing: alloc::vec::Vec<SocketHandle>,
    /// Connection requests to the NBD port held back since start-up.
    syns_held: u64,
    /// What the NBD server reported at the last poll, for `net`.
    nbd_memory: nbd::MemoryUse,
    /// NBD requests handed to the devices since start-up, at the last poll.
    nbd_requests: u64,
    /// Whether the NIC's interrupts are on: only while the main loop sleeps.
    interrupts_on: bool,
}

/// How the NIC's interrupt arrives.
#[derive(Clone, Copy)]
enum Wakeup {
    /// A message-signalled interrupt.
    Msi,
    /// A legacy line the firmware routed to the PIC.
    Line(u8),
    /// None: the stack is polled on the timer tick.
    Polled,
}

/// Asks for an MSI where the driver takes one and the function has the capability,
/// else the legacy line.
fn wakeup(pci: &mut Pci, function: &PciFunction, device: &Nic) -> Wakeup {
    if device.takes_msi()
        && let Some((address, data)) = interrupts::enable_msi()
        && pci.enable_msi(function.address, address, data)
    {
        return Wakeup::Msi;
    }
    let Some(line) = pci
        .legacy_interrupt_line(function.address)
        .filter(|&line| interrupts::enable_device_irq(line))
    else {
        return Wakeup::Polled;
    };
    pci.silence_legacy_interrupts(line, function.address);
    Wakeup::Line(line)
}

/// Sets up a NIC's driver.
type Probe = fn(&mut Pci, &PciFunction) -> Result<Nic, &'static str>;

/// Which driver serves a PCI function, if it is a NIC.
fn nic_kind(function: &PciFunction) -> Option<Probe> {
    let info = &function.info;
    if virtio_device_type(info) == Some(DeviceType::Network) {
        Some(|pci, function| VirtioNet::probe(pci, function).map(|nic| Nic::Virtio(Box::new(nic))))
    } else if (info.vendor_id, info.device_id) == (e1000e::VENDOR_INTEL, e1000e::DEVICE_82574L) {
        Some(|pci, function| E1000e::probe(pci, function).map(|nic| Nic::E1000e(Box::new(nic))))
    } else {
        None
    }
}

/// Finds the first NIC (virtio-net or e1000e) and brings the stack up on it (DHCP,
/// NBD listeners). Problems are reported on `log`; without a NIC there is no
/// network.
pub fn start(pci: &mut Pci, log: &mut dyn Write) -> Option<NetStack> {
    let (function, probe) = pci
        .functions()
        .into_iter()
        .find_map(|function| nic_kind(&function).map(|probe| (function, probe)))?;
    let mut device = match probe(pci, &function) {
        Ok(device) => device,
        Err(why) => {
            let _ = write!(log, "thinbox: NIC at {}: {why}\r\n", function.address);
            return None;
        }
    };
    let wakeup = wakeup(pci, &function, &device);
    let mac = device.mac();
    let wakeup_text = match wakeup {
        Wakeup::Msi => "MSI".into(),
        Wakeup::Line(line) => format!("IRQ {line}"),
        Wakeup::Polled => "no interrupt line, polled on the timer tick".into(),
    };
    let _ = write!(
        log,
        "thinbox: NIC {} ({}) at {}, {wakeup_text}\r\n",
        EthernetAddress(mac),
        device.driver(),
        function.address
    );
    let iface = new_interface(&mut device);
    let mut sockets = SocketSet::new(alloc::vec::Vec::new());
    let (used, free) = memory::heap_usage();
    let nbd = NbdSockets::new(&mut sockets, used + free, heap());
    let mut stack = NetStack {
        device,
        wakeup,
        iface,
        sockets,
        mode: AddressMode::Dhcp,
        dhcp: None,
        nbd,
        next_local_port: 0,
        closing: alloc::vec::Vec::new(),
        syns_held: 0,
        nbd_memory: nbd::MemoryUse::default(),
        nbd_requests: 0,
        interrupts_on: true,
    };
    stack.use_dhcp();
    Some(stack)
}

/// A smoltcp interface for `device`, which takes the device's MTU and checksum
/// capabilities as they are now.
fn new_interface(device: &mut Nic) -> Interface {
    let mac = device.mac();
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = clock::now_ns()
        ^ u64::from_le_bytes([0, 0, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]]);
    Interface::new(config, device, now())
}

fn now() -> Instant {
    Instant::from_micros((clock::now_ns() / 1000) as i64)
}

/// What [`NetStack::poll`] left behind.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NetPoll {
    /// Something moved or frames wait: poll again at once.
    Busy,
    /// Nothing moved, and NBD requests wait for their devices: the loop may halt
    /// only if every disk holding them will interrupt when one finishes.
    Waiting,
    /// Nothing moved and nothing waits.
    Idle,
}

impl NetStack {
    /// Moves frames, socket bytes, NBD requests and completions until nothing moves
    /// (or a round limit is reached). NBD requests may hold the heap down to its
    /// reserve plus what the socket pool may still take: beyond that they wait for
    /// memory (their clients back-pressured) while other requests finish. Returns
    /// whether the main loop should come back at once, or may halt.
    pub fn poll<B: nbd::Backend>(&mut self, server: &mut nbd::Server<B>) -> NetPoll {
        match self.wakeup {
            Wakeup::Msi if interrupts::take_msi() => self.device.ack_interrupt(),
            Wakeup::Line(line) if interrupts::take_device_irq(line) => {
                self.device.ack_interrupt();
                interrupts::rearm_device_irq(line);
            }
            _ => {}
        }
        if self.interrupts_on {
            self.device.set_interrupts(false);
            self.interrupts_on = false;
        }
        self.device.recover_stall();
        let mut outcome = NetPoll::Busy;
        for _ in 0..ROUNDS_PER_POLL {
            let now = now();
            let heap = heap();
            // Requests leave the reserve and what sockets may still take: a new
            // client's socket never waits for requests to finish.
            let kept = heap.reserve + self.nbd.unused_budget();
            server.set_memory_limit(server.memory_use().held + heap.free.saturating_sub(kept));
            let mut device = Backlog {
                listening: self.nbd.listening(&self.sockets),
                nic: &mut self.device,
                port: NBD_PORT,
                held: &mut self.syns_held,
            };
            let changed = self.iface.poll(now, &mut device, &mut self.sockets) != PollResult::None;
            self.device.flush();
            self.remove_closed();
            self.dhcp_events();
            let moved = self.nbd.pump(&mut self.sockets, server, heap, now);
            if !changed && !moved {
                outcome = if self.device.has_input() {
                    NetPoll::Busy
                } else if server.in_flight() > 0 {
                    NetPoll::Waiting
                } else {
                    NetPoll::Idle
                };
                break;
            }
        }
        self.nbd_memory = server.memory_use();
        self.nbd_requests = server.requests_taken();
        outcome
    }

    /// Turns the NIC's interrupts on before the main loop sleeps; returns false if
    /// the device returned something meanwhile, which the loop must poll first.
    pub fn ready_to_sleep(&mut self) -> bool {
        if !self.interrupts_on {
            self.device.set_interrupts(true);
            self.interrupts_on = true;
        }
        // The device reads the flag after publishing a buffer: the check below must
        // not be ordered before the flag is written.
        fence(Ordering::SeqCst);
        !self.device.has_completions()
    }

    fn dhcp_events(&mut self) {
        let Some(handle) = self.dhcp else {
            return;
        };
        let lease = match self.sockets.get_mut::<dhcpv4::Socket>(handle).poll() {
            None => return,
            Some(dhcpv4::Event::Configured(lease)) => Some((lease.address, lease.router)),
            Some(dhcpv4::Event::Deconfigured) => None,
        };
        match lease {
            Some((address, gateway)) => self.configure(Some(address), gateway),
            None => self.configure(None, None),
        }
    }

    fn configure(&mut self, address: Option<Ipv4Cidr>, gateway: Option<core::net::Ipv4Addr>) {
        self.iface.update_ip_addrs(|addresses| {
            addresses.clear();
            if let Some(address) = address {
                addresses
                    .push(IpCidr::Ipv4(address))
                    .expect("room for one address");
            }
        });
        let routes = self.iface.routes_mut();
        routes.remove_default_ipv4_route();
        if let Some(gateway) = gateway {
            routes
                .add_default_ipv4_route(gateway)
                .expect("room for the default route");
        }
    }
}

impl NetStack {
    fn nbd_pressure(&self) -> NbdPressure {
        let (sockets, max_sockets) = self.nbd.sockets();
        let memory = &self.nbd_memory;
        NbdPressure {
            sockets: sockets as u64,
            max_sockets: max_sockets as u64,
            socket_bytes: self.nbd.buffer_bytes() as u64,
            syns_held: self.syns_held,
            request_bytes: memory.held as u64,
            request_limit: memory.limit as u64,
            waiting: memory.waiting as u64,
            waits: memory.waits,
            refused: memory.refused,
        }
    }
}

impl Network for NetStack {
    fn status(&self) -> NetStatus {
        let ipv4 = self.iface.ipv4_addr().and_then(|address| {
            let prefix = self.iface.ip_addrs().iter().find_map(|cidr| match cidr {
                IpCidr::Ipv4(cidr) if cidr.address() == address => Some(cidr.prefix_len()),
                _ => None,
            })?;
            let gateway =
                self.iface
                    .routes()
                    .get_default_ipv4_route()
                    .map(|route| match route.via_router {
                        IpAddress::Ipv4(router) => router,
                    });
            Some(Ipv4Config {
                address,
                prefix,
                gateway,
            })
        });
        NetStatus {
            mac: self.device.mac(),
            link_up: self.device.link_up(),
            link: LinkSettings {
                driver: self.device.driver(),
                mtu: self.device.mtu(),
                checksum_offload: self.device.checksum_offload(),
            },
            mode: self.mode,
            ipv4,
            nbd_port: NBD_PORT,
            counters: NetCounters {
                nic: self.device.counters(),
                tcp_open: self.nbd.open_connections() as u64,
                tcp_accepted: self.nbd.accepted(),
                nbd: self.nbd_pressure(),
                nbd_requests: self.nbd_requests,
                cpu: {
                    let (total, halted) = clock::cycles();
                    CpuCycles {
                        total,
                        halted,
                        disk_interrupts: interrupts::disk_interrupts(),
                    }
                },
            },
        }
    }

    fn set_static(&mut self, config: Ipv4Config) {
        if let Some(handle) = self.dhcp.take() {
            self.sockets.remove(handle);
        }
        self.mode = AddressMode::Static;
        self.configure(
            Some(Ipv4Cidr::new(config.address, config.prefix)),
            config.gateway,
        );
    }

    fn use_dhcp(&mut self) {
        if let Some(handle) = self.dhcp.take() {
            self.sockets.remove(handle);
        }
        self.configure(None, None);
        self.mode = AddressMode::Dhcp;
        self.dhcp = Some(self.sockets.add(dhcpv4::Socket::new()));
    }

    /// Reconfigures the NIC and starts a new interface on it with the same
    /// addresses and route: smoltcp takes the MTU (and so the MSS it offers) and the
    /// checksum capabilities when an interface is made. Open connections keep the
    /// segment size they agreed on.
    fn configure_link(&mut self, mtu: usize, checksum_offload: bool) -> Result<(), String> {
        self.device.reconfigure(mtu, checksum_offload)?;
        let addresses = self.iface.ip_addrs().to_vec();
        let gateway =
            self.iface
                .routes()
                .get_default_ipv4_route()
                .map(|route| match route.via_router {
                    IpAddress::Ipv4(router) => router,
                });
        self.iface = new_interface(&mut self.device);
        self.iface.update_ip_addrs(|current| {
            for address in addresses {
                current.push(address).expect("room for the same addresses");
            }
        });
        if let Some(gateway) = gateway {
            self.iface
                .routes_mut()
                .add_default_ipv4_route(gateway)
                .expect("room for the default route");
        }
        Ok(())
    }

    fn stall_transmitter(&mut self) -> Result<&'static str, String> {
        self.device.stall_transmitter()?;
        Ok(self.device.driver())
    }
}

/// The console's handle on the stack the main loop polls.
pub struct NetHandle(pub Rc<RefCell<NetStack>>);

impl Network for NetHandle {
    fn status(&self) -> NetStatus {
        self.0.borrow().status()
    }

    fn set_static(&mut self, config: Ipv4Config) {
        self.0.borrow_mut().set_static(config)
    }

    fn use_dhcp(&mut self) {
        self.0.borrow_mut().use_dhcp()
    }

    fn configure_link(&mut self, mtu: usize, checksum_offload: bool) -> Result<(), String> {
        self.0.borrow_mut().configure_link(mtu, checksum_offload)
    }

    fn stall_transmitter(&mut self) -> Result<&'static str, String> {
        self.0.borrow_mut().stall_transmitter()
    }
}
