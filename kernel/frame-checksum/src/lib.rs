//! TCP and UDP checksums around a NIC's checksum offload.
//!
//! With offload on, smoltcp leaves the TCP and UDP checksums of the frames it sends
//! zero and checks none of the ones it receives. On the way out the driver puts the
//! pseudo-header's sum in the checksum field and tells the device where the segment
//! starts and where its checksum goes (the device adds the segment's own sum, as
//! Linux's partial checksums work). On the way in the driver trusts the device's
//! verdict where it gives one and checks the rest here.

#![no_std]
#![forbid(unsafe_code)]

/// Ethernet header without VLAN tag.
const ETHERNET_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const PROTOCOL_TCP: u8 = 6;
const PROTOCOL_UDP: u8 = 17;
/// Offset of the checksum within the TCP and the UDP header.
const TCP_CHECKSUM_AT: usize = 16;
const UDP_CHECKSUM_AT: usize = 6;

/// The transport protocols whose checksums devices compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// Where the device computes a transmitted frame's checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxChecksum {
    pub transport: Transport,
    /// Frame offset of the IPv4 header.
    pub ip_start: usize,
    /// Frame offset of the TCP or UDP header (where summing starts).
    pub start: usize,
    /// Offset of the checksum field from `start`.
    pub offset: usize,
}

/// An IPv4 TCP or UDP segment inside a frame.
struct Segment {
    transport: Transport,
    ip_start: usize,
    start: usize,
    end: usize,
    /// Ones'-complement sum of the pseudo-header, not folded.
    pseudo_sum: u32,
}

fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// The TCP or UDP segment of an unfragmented IPv4 frame that holds it whole.
fn segment(frame: &[u8]) -> Option<Segment> {
    let ip = ETHERNET_HEADER;
    if frame.len() < ip + 20 || be16(frame, 12) != ETHERTYPE_IPV4 || frame[ip] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(frame[ip] & 0x0f) * 4;
    let total_len = usize::from(be16(frame, ip + 2));
    let fragmented = be16(frame, ip + 6) & 0x3fff != 0;
    let transport = match frame[ip + 9] {
        PROTOCOL_TCP => Transport::Tcp,
        PROTOCOL_UDP => Transport::Udp,
        _ => return None,
    };
    let end = ip + total_len;
    let start = ip + header_len;
    let min_header = match transport {
        Transport::Tcp => 20,
        Transport::Udp => 8,
    };
    if header_len < 20 || fragmented || end > frame.len() || start + min_header > end {
        return None;
    }
    let addresses = sum(&frame[ip + 12..ip + 20]);
    let pseudo_sum = addresses + u32::from(frame[ip + 9]) + (end - start) as u32;
    Some(Segment {
        transport,
        ip_start: ip,
        start,
        end,
        pseudo_sum,
    })
}

/// Ones'-complement sum of big-endian 16-bit words (an odd last byte padded with
/// zero), not folded.
fn sum(bytes: &[u8]) -> u32 {
    let mut total: u64 = 0;
    let (words, rest) = bytes.as_chunks::<2>();
    for word in words {
        total += u64::from(u16::from_be_bytes(*word));
    }
    if let [last] = rest {
        total += u64::from(*last) << 8;
    }
    fold(total)
}

/// Folds carries back in until the sum fits 16 bits.
fn fold(mut total: u64) -> u32 {
    while total > 0xffff {
        total = (total & 0xffff) + (total >> 16);
    }
    total as u32
}

/// Prepares `frame` for a device that computes its TCP or UDP checksum: the
/// pseudo-header's folded sum goes in the checksum field. `None` for frames
/// without such a checksum (ARP, ICMP, fragments), which smoltcp completed.
pub fn prepare_tx(frame: &mut [u8]) -> Option<TxChecksum> {
    let segment = segment(frame)?;
    let offset = match segment.transport {
        Transport::Tcp => TCP_CHECKSUM_AT,
        Transport::Udp => UDP_CHECKSUM_AT,
    };
    let field = segment.start + offset;
    let partial = fold(u64::from(segment.pseudo_sum)) as u16;
    frame[field..field + 2].copy_from_slice(&partial.to_be_bytes());
    Some(TxChecksum {
        transport: segment.transport,
        ip_start: segment.ip_start,
        start: segment.start,
        offset,
    })
}

/// Whether a received frame's TCP or UDP checksum is right (frames without one,
/// and UDP datagrams sent without a checksum, pass: smoltcp checks the rest).
pub fn verify_rx(frame: &[u8]) -> bool {
    let Some(segment) = segment(frame) else {
        return true;
    };
    let bytes = &frame[segment.start..segment.end];
    if segment.transport == Transport::Udp && be16(bytes, UDP_CHECKSUM_AT) == 0 {
        return true;
    }
    fold(u64::from(segment.pseudo_sum) + u64::from(sum(bytes))) == 0xffff
}
