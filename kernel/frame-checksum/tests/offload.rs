//! The offload path against smoltcp's own checksums: a frame smoltcp emits without
//! its TCP/UDP checksum, prepared by `prepare_tx` and completed the way a device
//! does (sum from the start offset, complement into the field), must equal byte
//! for byte the frame smoltcp emits with the checksum it computes itself.

use frame_checksum::{Transport, TxChecksum, prepare_tx, verify_rx};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
    Ipv4Address, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
    UdpRepr,
};

const SRC: Ipv4Address = Ipv4Address::new(10, 0, 2, 15);
const DST: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);

/// smoltcp's checksums everywhere, or everywhere but TCP and UDP (offload).
fn caps(offload: bool) -> ChecksumCapabilities {
    let mut caps = ChecksumCapabilities::default();
    if offload {
        caps.tcp = smoltcp::phy::Checksum::None;
        caps.udp = smoltcp::phy::Checksum::None;
    }
    caps
}

fn ethernet_ipv4(protocol: IpProtocol, payload_len: usize, caps: &ChecksumCapabilities) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: SRC,
        dst_addr: DST,
        next_header: protocol,
        payload_len,
        hop_limit: 64,
    };
    let mut frame = vec![0u8; 14 + 20 + payload_len];
    let mut ethernet = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        dst_addr: EthernetAddress([0x52, 0x55, 10, 0, 2, 2]),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut ethernet);
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut frame[14..]), caps);
    frame
}

fn tcp_frame(payload: &[u8], offload: bool) -> Vec<u8> {
    let caps = caps(offload);
    let tcp = TcpRepr {
        src_port: 10809,
        dst_port: 40000,
        control: TcpControl::Psh,
        seq_number: TcpSeqNumber(0x1234_5678),
        ack_number: Some(TcpSeqNumber(0x0abc_def0)),
        window_len: 4096,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload,
    };
    let mut frame = ethernet_ipv4(IpProtocol::Tcp, tcp.buffer_len(), &caps);
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut frame[34..]),
        &IpAddress::Ipv4(SRC),
        &IpAddress::Ipv4(DST),
        &caps,
    );
    frame
}

fn udp_frame(payload: &[u8], offload: bool) -> Vec<u8> {
    let caps = caps(offload);
    let udp = UdpRepr {
        src_port: 68,
        dst_port: 67,
    };
    let len = 8 + payload.len();
    let mut frame = ethernet_ipv4(IpProtocol::Udp, len, &caps);
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut frame[34..]),
        &IpAddress::Ipv4(SRC),
        &IpAddress::Ipv4(DST),
        payload.len(),
        |buffer| buffer.copy_from_slice(payload),
        &caps,
    );
    frame
}

/// What a device does with a prepared frame: sums from `start` to the end of the
/// IP packet and stores the complement (0xffff for a UDP zero).
fn device_completes(frame: &mut [u8], checksum: TxChecksum) {
    let end = 14 + usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let mut total: u64 = 0;
    for (index, byte) in frame[checksum.start..end].iter().enumerate() {
        total += u64::from(*byte) << if index % 2 == 0 { 8 } else { 0 };
    }
    while total > 0xffff {
        total = (total & 0xffff) + (total >> 16);
    }
    let mut value = !(total as u16);
    if value == 0 && checksum.transport == Transport::Udp {
        value = 0xffff;
    }
    let field = checksum.start + checksum.offset;
    frame[field..field + 2].copy_from_slice(&value.to_be_bytes());
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn offloaded_tcp_frames_equal_smoltcps_own() {
    for len in [0, 1, 2, 3, 511, 1460, 8948] {
        let data = payload(len, len as u8);
        let expected = tcp_frame(&data, false);
        let mut offloaded = tcp_frame(&data, true);
        assert_ne!(offloaded, expected, "smoltcp left the checksum out ({len})");
        let checksum = prepare_tx(&mut offloaded).unwrap();
        assert_eq!(
            checksum,
            TxChecksum {
                transport: Transport::Tcp,
                ip_start: 14,
                start: 34,
                offset: 16
            }
        );
        device_completes(&mut offloaded, checksum);
        assert_eq!(offloaded, expected, "{len}-byte payload");
        assert!(verify_rx(&expected));
    }
}

#[test]
fn offloaded_udp_frames_equal_smoltcps_own() {
    for len in [0, 1, 300, 1472] {
        let data = payload(len, 7);
        let expected = udp_frame(&data, false);
        let mut offloaded = udp_frame(&data, true);
        let checksum = prepare_tx(&mut offloaded).unwrap();
        assert_eq!((checksum.transport, checksum.offset), (Transport::Udp, 6));
        device_completes(&mut offloaded, checksum);
        assert_eq!(offloaded, expected, "{len}-byte payload");
        assert!(verify_rx(&expected));
    }
}

#[test]
fn a_damaged_segment_fails_verification() {
    let good = tcp_frame(&payload(1000, 3), false);
    for at in [34, 50, 54, 600, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        assert!(!verify_rx(&bad), "byte {at} flipped");
    }
    // A source address changed: the pseudo-header is covered too.
    let mut bad = good.clone();
    bad[29] ^= 1;
    assert!(!verify_rx(&bad));
    let mut bad = udp_frame(&payload(100, 1), false);
    bad[50] ^= 0xff;
    assert!(!verify_rx(&bad));
}

#[test]
fn frames_without_a_transport_checksum_are_left_alone() {
    // UDP sent without a checksum.
    let mut unchecked = udp_frame(&payload(40, 9), false);
    unchecked[40..42].fill(0);
    assert!(verify_rx(&unchecked));
    // ICMP, ARP, a fragment, a truncated packet: nothing to prepare, nothing to reject.
    let icmp = ethernet_ipv4(IpProtocol::Icmp, 8, &caps(false));
    let mut arp = icmp.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut fragment = tcp_frame(&payload(64, 2), false);
    fragment[20] = 0x20;
    let truncated = tcp_frame(&payload(64, 2), false)[..60].to_vec();
    for frame in [icmp, arp, fragment, truncated] {
        let mut copy = frame.clone();
        assert_eq!(prepare_tx(&mut copy), None);
        assert_eq!(copy, frame);
        assert!(verify_rx(&frame));
    }
}
