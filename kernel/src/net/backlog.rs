//! A listen backlog for the NBD port. smoltcp answers a connection request (SYN)
//! that no listening socket takes with a reset, so a burst of clients beyond the
//! sockets listening at that moment would be refused. Instead, such SYNs are
//! dropped before smoltcp sees them: the client sends its SYN again a moment later
//! (as when a Linux server's accept queue is full) and gets a socket once one is
//! free.

use smoltcp::phy::{self, Device, DeviceCapabilities};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpPacket};

use super::nic::{self, Nic};

/// The NIC as smoltcp sees it during one poll, holding back SYNs to `port` once
/// `listening` sockets have each had one.
pub struct Backlog<'a> {
    pub nic: &'a mut Nic,
    pub port: u16,
    /// Listening sockets not yet given a SYN in this poll.
    pub listening: usize,
    /// SYNs held back since start-up.
    pub held: &'a mut u64,
}

impl Device for Backlog<'_> {
    type RxToken<'b>
        = RxToken<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = nic::TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, timestamp: Instant) -> Option<(RxToken<'_>, nic::TxToken<'_>)> {
        let (rx, tx) = self.nic.receive(timestamp)?;
        let gate = Gate {
            port: self.port,
            listening: &mut self.listening,
            held: self.held,
        };
        Some((RxToken { rx, gate }, tx))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<nic::TxToken<'_>> {
        self.nic.transmit(timestamp)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.nic.capabilities()
    }
}

struct Gate<'a> {
    port: u16,
    listening: &'a mut usize,
    held: &'a mut u64,
}

impl Gate<'_> {
    /// Whether `frame` goes on to smoltcp.
    fn passes(&mut self, frame: &[u8]) -> bool {
        if !is_syn_to(frame, self.port) {
            return true;
        }
        if *self.listening == 0 {
            *self.held += 1;
            return false;
        }
        *self.listening -= 1;
        true
    }
}

pub struct RxToken<'a> {
    rx: nic::RxToken<'a>,
    gate: Gate<'a>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let RxToken { rx, mut gate } = self;
        // An empty frame is one smoltcp skips.
        rx.consume(|frame| if gate.passes(frame) { f(frame) } else { f(&[]) })
    }
}

/// Whether `frame` is an IPv4 TCP segment opening a connection (SYN without ACK)
/// to `port`.
fn is_syn_to(frame: &[u8], port: u16) -> bool {
    let Ok(ethernet) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    if ethernet.ethertype() != EthernetProtocol::Ipv4 {
        return false;
    }
    let Ok(ip) = Ipv4Packet::new_checked(ethernet.payload()) else {
        return false;
    };
    if ip.next_header() != IpProtocol::Tcp || ip.frag_offset() != 0 {
        return false;
    }
    let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
        return false;
    };
    tcp.dst_port() == port && tcp.syn() && !tcp.ack()
}
