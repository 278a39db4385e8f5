//! virtio-net NIC through `virtio-drivers`' non-blocking queue API, as a smoltcp
//! [`Device`].
//!
//! Both queues are kept full: every receive descriptor holds a frame buffer from
//! start-up on, and a buffer smoltcp has consumed goes straight back on the queue
//! at the next poll. Up to [`QUEUE_SIZE`] frames are in flight for transmission,
//! each in a buffer of its own that returns to the free list when the device hands
//! the descriptor back. The NIC interrupts on used buffers of either queue; the
//! interrupt only wakes the main loop, which acknowledges it here. Frames sent and
//! receive buffers returned during a poll share one doorbell per queue, rung at
//! its end ([`VirtioNet::flush`]).
//!
//! Where the device offers checksum offload (on a tap network; QEMU's user network
//! does not) it is negotiated and on by default: frames go out with partial
//! checksums, and frames come in checked by the host or partial (see
//! [`virtio_offload`](super::virtio_offload)). Buffers hold jumbo frames, so the
//! MTU can be raised to 9000 without touching the queues.
//!
//! A frame the device refuses to take is dropped and counted (TCP sends it again).
//! A device that hands back a descriptor it was never given has lost track of its
//! queues: the NIC stops (no frame moves any more) instead of trusting it.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use console::NicCounters;
use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::Transport;
use virtio_drivers::transport::pci::PciTransport;

use super::virtio_doorbell::Doorbell;
use super::virtio_hal::KernelHal;
use super::virtio_offload::{
    DATA_VALID, Doorbells, HEADER_CSUM_OFFSET, HEADER_CSUM_START, HEADER_FLAGS, NEEDS_CSUM,
    OffloadTransport,
};
use crate::pci::{Pci, PciFunction};

/// Descriptors per queue (QEMU's default and maximum ring size for virtio-net).
pub const QUEUE_SIZE: usize = 256;
const ETHERNET_HEADER: usize = 14;
/// The IP MTU at start-up.
const STANDARD_MTU: usize = 1500;
/// The largest IP MTU (jumbo frames).
const MAX_MTU: usize = 9000;
/// virtio-net header (version 1 layout, 12 bytes; the legacy one is shorter) plus
/// a jumbo frame, rounded up.
const BUFFER_LEN: usize = 9216;
/// Offset of the `status` field in the device configuration (after the MAC).
const CONFIG_STATUS: usize = 6;
/// `VIRTIO_NET_F_STATUS`: the device reports link state.
const FEATURE_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_S_LINK_UP`.
const STATUS_LINK_UP: u16 = 1;

type Raw = VirtIONetRaw<KernelHal, OffloadTransport, QUEUE_SIZE>;
/// Transmit buffers the device holds, by descriptor token, with their length.
type PostedTx = Vec<Option<(Box<[u8]>, usize)>>;

pub struct VirtioNet {
    raw: Raw,
    /// A second view of the device's registers, for reading its link state (the
    /// driver keeps its transport to itself).
    registers: PciTransport,
    /// The doorbells the driver's transport recorded rings, and the receive and
    /// transmit queues' own.
    doorbells: Doorbells,
    bells: [Doorbell; 2],
    reports_link: bool,
    /// Receive buffers on the queue, by descriptor token.
    rx_posted: Vec<Option<Box<[u8]>>>,
    /// Receive buffers smoltcp has consumed, to go back on the queue.
    rx_returned: Vec<Box<[u8]>>,
    tx_posted: PostedTx,
    tx_free: Vec<Box<[u8]>>,
    header_len: usize,
    counters: NicCounters,
    mtu: usize,
    /// The device negotiated checksum offload.
    can_offload: bool,
    /// Checksum offload in use.
    offload: bool,
    /// The device returned a descriptor it was not given; nothing is sent or
    /// received any more.
    stopped: bool,
}

impl VirtioNet {
    /// Sets up the virtio-net device at `function` with every receive buffer posted.
    pub fn probe(pci: &mut Pci, function: &PciFunction) -> Result<VirtioNet, &'static str> {
        pci.enable(function.address);
        let mut registers = PciTransport::new::<KernelHal, _>(&mut pci.root, function.address)
            .map_err(|_| "virtio PCI transport setup failed")?;
        let reports_link = registers.read_device_features() & FEATURE_STATUS != 0;
        let transport = PciTransport::new::<KernelHal, _>(&mut pci.root, function.address)
            .map_err(|_| "virtio PCI transport setup failed")?;
        let doorbells = Doorbells::default();
        let bells = [
            Doorbell::find(pci, function.address, 0)?,
            Doorbell::find(pci, function.address, 1)?,
        ];
        let transport = OffloadTransport::new(transport, doorbells.clone());
        let can_offload = transport.offloads();
        let raw = Raw::new(transport).map_err(|_| "virtio-net initialisation failed")?;
        let mut probe_header = [0u8; 32];
        let header_len = raw
            .fill_buffer_header(&mut probe_header)
            .map_err(|_| "virtio-net header does not fit")?;
        let mut net = VirtioNet {
            raw,
            registers,
            doorbells,
            bells,
            reports_link,
            rx_posted: (0..QUEUE_SIZE).map(|_| None).collect(),
            rx_returned: (0..QUEUE_SIZE)
                .map(|_| vec![0u8; BUFFER_LEN].into_boxed_slice())
                .collect(),
            tx_posted: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx_free: (0..QUEUE_SIZE)
                .map(|_| vec![0u8; BUFFER_LEN].into_boxed_slice())
                .collect(),
            header_len,
            counters: NicCounters::default(),
            mtu: STANDARD_MTU,
            can_offload,
            offload: can_offload,
            stopped: false,
        };
        net.repost_rx_buffers();
        net.flush();
        if net.rx_returned.len() == QUEUE_SIZE {
            return Err("virtio-net took no receive buffers");
        }
        net.raw.enable_interrupts();
        Ok(net)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.raw.mac_address()
    }

    /// Whether the link is up (devices without link reporting are always up).
    pub fn link_up(&self) -> bool {
        !self.reports_link
            || self
                .registers
                .read_config_space::<u16>(CONFIG_STATUS)
                .is_ok_and(|status| status & STATUS_LINK_UP != 0)
    }

    pub fn counters(&self) -> NicCounters {
        self.counters
    }

    pub fn mtu(&self) -> usize {
        self.mtu
    }

    pub fn checksum_offload(&self) -> bool {
        self.offload
    }

    /// Sets the MTU (68 to 9000: the buffers hold jumbo frames) and checksum
    /// offload, where the device negotiated it.
    pub fn reconfigure(&mut self, mtu: usize, checksum_offload: bool) -> Result<(), &'static str> {
        if checksum_offload && !self.can_offload {
            return Err(
                "this virtio-net device offers no checksum offload (QEMU's user \
                        network does not; tap does)",
            );
        }
        if !(68..=MAX_MTU).contains(&mtu) {
            return Err("the MTU must be between 68 and 9000");
        }
        self.mtu = mtu;
        self.offload = checksum_offload;
        Ok(())
    }

    /// Rings the doorbell of each queue the driver added buffers to since the last
    /// call.
    pub fn flush(&mut self) {
        for queue in self.doorbells.take() {
            match self.bells.get(usize::from(queue)) {
                Some(bell) => bell.ring(),
                None => self.registers.notify(queue),
            }
        }
    }

    /// Acknowledges the device's interrupt so it lowers its line.
    pub fn ack_interrupt(&mut self) {
        self.raw.ack_interrupt();
    }

    /// Asks the device for used-buffer interrupts, or tells it to skip them.
    pub fn set_interrupts(&mut self, on: bool) {
        if on {
            self.raw.enable_interrupts();
        } else {
            self.raw.disable_interrupts();
        }
    }

    /// Whether a frame came back, or transmit buffers were freed, since the last
    /// poll: the device may have returned them while its interrupts were off.
    pub fn has_completions(&mut self) -> bool {
        if self.stopped {
            return false;
        }
        let freed = self.reap_tx();
        freed || self.has_input()
    }

    /// Whether a received frame waits to be processed.
    pub fn has_input(&self) -> bool {
        !self.stopped && self.raw.poll_receive().is_some()
    }

    /// Puts consumed receive buffers back on the queue.
    fn repost_rx_buffers(&mut self) {
        while let Some(mut buffer) = self.rx_returned.pop() {
            // SAFETY: the buffer is a heap allocation kept in `rx_posted` (boxes do not
            // move their contents) until the device returns it in `next_rx_frame`.
            match unsafe { self.raw.receive_begin(&mut buffer) } {
                Ok(token) => self.rx_posted[usize::from(token)] = Some(buffer),
                Err(_) => {
                    self.rx_returned.push(buffer);
                    return;
                }
            }
        }
    }

    /// Returns finished transmit buffers to the free list; returns whether there
    /// were any.
    fn reap_tx(&mut self) -> bool {
        let mut freed = false;
        while let Some(token) = self.raw.poll_transmit() {
            let Some((buffer, len)) = self
                .tx_posted
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                self.stop();
                return freed;
            };
            // SAFETY: the same buffer (and length) that was queued with `token`.
            if unsafe { self.raw.transmit_complete(token, &buffer[..len]) }.is_err() {
                // The descriptor is still the device's: so is its buffer.
                Box::leak(buffer);
                self.stop();
                return freed;
            }
            self.tx_free.push(buffer);
            freed = true;
        }
        freed
    }

    /// Stops the NIC after the device broke the queue protocol.
    fn stop(&mut self) {
        self.stopped = true;
        self.counters.ring_resets += 1;
    }

    /// The next received frame: its buffer and where the frame lies in it.
    fn next_rx_frame(&mut self) -> Option<(Box<[u8]>, usize, usize)> {
        loop {
            let token = self.raw.poll_receive()?;
            let Some(mut buffer) = self
                .rx_posted
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                self.stop();
                return None;
            };
            // SAFETY: the same buffer that was queued with `token`.
            match unsafe { self.raw.receive_complete(token, &mut buffer) } {
                Ok((header_len, frame_len))
                    if frame_len <= buffer.len() - header_len
                        && self.checksum_ok(&mut buffer, header_len, frame_len) =>
                {
                    self.counters.rx_packets += 1;
                    self.counters.rx_bytes += frame_len as u64;
                    return Some((buffer, header_len, frame_len));
                }
                _ => {
                    self.counters.rx_dropped += 1;
                    self.rx_returned.push(buffer);
                }
            }
        }
    }

    /// Settles a received frame's TCP/UDP checksum: a partial one (from a sender
    /// on the host) is completed unless offload lets smoltcp skip it, and with
    /// offload a frame the device did not check is checked here.
    fn checksum_ok(&self, buffer: &mut [u8], header_len: usize, frame_len: usize) -> bool {
        let flags = buffer[HEADER_FLAGS];
        let field = |at: usize| usize::from(u16::from_le_bytes([buffer[at], buffer[at + 1]]));
        let (start, offset) = (field(HEADER_CSUM_START), field(HEADER_CSUM_OFFSET));
        let frame = &mut buffer[header_len..header_len + frame_len];
        if flags & NEEDS_CSUM != 0 {
            if !self.offload {
                frame_checksum::complete(frame, start, offset);
            }
            true
        } else {
            !self.offload || flags & DATA_VALID != 0 || frame_checksum::verify_rx(frame)
        }
    }

    fn tx_ready(&mut self) -> bool {
        self.reap_tx();
        if self.stopped {
            return false;
        }
        if self.tx_free.is_empty() || !self.raw.can_send() {
            self.counters.tx_queue_full += 1;
            return false;
        }
        true
    }
}

impl Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        self.repost_rx_buffers();
        // A frame is only taken when its answer (an ACK, say) can be sent.
        if !self.tx_ready() {
            return None;
        }
        let (buffer, start, len) = self.next_rx_frame()?;
        let VirtioNet {
            raw,
            rx_returned,
            tx_posted,
            tx_free,
            header_len,
            counters,
            offload,
            ..
        } = self;
        Some((
            RxToken {
                buffer: Some(buffer),
                start,
                len,
                returned: rx_returned,
            },
            TxToken {
                raw,
                tx_posted,
                tx_free,
                header_len: *header_len,
                counters,
                offload: *offload,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        if !self.tx_ready() {
            return None;
        }
        Some(TxToken {
            raw: &mut self.raw,
            tx_posted: &mut self.tx_posted,
            tx_free: &mut self.tx_free,
            header_len: self.header_len,
            counters: &mut self.counters,
            offload: self.offload,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + ETHERNET_HEADER;
        // A peer may send at most a receive queue's worth of frames unacknowledged.
        caps.max_burst_size = Some(QUEUE_SIZE);
        if self.offload {
            caps.checksum.tcp = Checksum::None;
            caps.checksum.udp = Checksum::None;
        }
        caps
    }
}

/// A received frame; its buffer goes back to the driver when the token is done.
pub struct RxToken<'a> {
    buffer: Option<Box<[u8]>>,
    start: usize,
    len: usize,
    returned: &'a mut Vec<Box<[u8]>>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let buffer = self.buffer.as_deref().expect("frame present until drop");
        f(&buffer[self.start..self.start + self.len])
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.returned.push(buffer);
        }
    }
}

/// Permission to send one frame: a free buffer and descriptor exist.
pub struct TxToken<'a> {
    raw: &'a mut Raw,
    tx_posted: &'a mut PostedTx,
    tx_free: &'a mut Vec<Box<[u8]>>,
    header_len: usize,
    counters: &'a mut NicCounters,
    offload: bool,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let total = self.header_len + len;
        let buffer = self.tx_free.pop();
        let Some(mut buffer) = buffer.filter(|buffer| total <= buffer.len()) else {
            // No buffer (or a frame beyond the largest MTU): the frame is dropped.
            self.counters.tx_dropped += 1;
            return f(&mut vec![0; len]);
        };
        buffer[..self.header_len].fill(0);
        let header = self.raw.fill_buffer_header(&mut buffer[..self.header_len]);
        let result = f(&mut buffer[self.header_len..total]);
        if header.is_err() {
            self.counters.tx_dropped += 1;
            self.tx_free.push(buffer);
            return result;
        }
        if self.offload
            && let Some(checksum) = frame_checksum::prepare_tx(&mut buffer[self.header_len..total])
        {
            buffer[HEADER_FLAGS] = NEEDS_CSUM;
            let start = (checksum.start as u16).to_le_bytes();
            let offset = (checksum.offset as u16).to_le_bytes();
            buffer[HEADER_CSUM_START..HEADER_CSUM_START + 2].copy_from_slice(&start);
            buffer[HEADER_CSUM_OFFSET..HEADER_CSUM_OFFSET + 2].copy_from_slice(&offset);
        }
        // SAFETY: the buffer is kept in `tx_posted` (its heap contents do not move)
        // until `reap_tx` takes it back after the device returned the descriptor.
        match unsafe { self.raw.transmit_begin(&buffer[..total]) } {
            Ok(token) => {
                self.counters.tx_packets += 1;
                self.counters.tx_bytes += len as u64;
                self.tx_posted[usize::from(token)] = Some((buffer, total));
            }
            Err(_) => {
                self.counters.tx_dropped += 1;
                self.tx_free.push(buffer);
            }
        }
        result
    }
}
