//! Intel 82574L (e1000e) NIC as a smoltcp [`Device`].
//!
//! One receive and one transmit ring of [`RING_LEN`] legacy-format descriptors,
//! each descriptor with its own packet buffer for good: every receive descriptor but
//! one is posted from start-up on and goes back to the device as soon as smoltcp
//! has read its frame; a transmit descriptor is reused once the device has written
//! its done bit. With checksum offload the device checks received TCP/UDP checksums
//! and fills in transmitted ones (a context descriptor says where, a data
//! descriptor asks for it).
//!
//! Nothing the device reports stops the appliance: bad and oversized frames are
//! counted and their descriptors reused, and a transmit ring that stops moving is
//! reset together with the receive ring (the stack retransmits what was lost).

use console::NicCounters;
use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::arch::clock;
use crate::dma::DmaBuffer;
use crate::mmio::Mmio;
use crate::pci::{Pci, PciFunction};
use frame_checksum::{Transport, TxChecksum};

pub const VENDOR_INTEL: u16 = 0x8086;
pub const DEVICE_82574L: u16 = 0x10d3;

/// Descriptors per ring (16 bytes each: one page).
const RING_LEN: usize = 256;
const DESCRIPTOR: usize = 16;
/// Ethernet frame without FCS for the standard MTU, as smoltcp counts it.
const STANDARD_FRAME: usize = 1514;
/// Largest IP MTU `set_mtu` takes (jumbo frames).
pub const MAX_MTU: usize = 9000;
const ETHERNET_HEADER: usize = 14;
/// Receive descriptors handed back to the device with one tail write: every
/// register write is a trap into the emulator (or a bus transaction), and the device
/// keeps all but this many buffers meanwhile.
const RX_GIVE_BACK_BATCH: usize = 16;
/// Longest time a transmit ring may hold frames without finishing one.
const TX_STALL_NS: u64 = 2_000_000_000;

// Registers.
const CTRL: usize = 0x0000;
const STATUS: usize = 0x0008;
const EERD: usize = 0x0014;
const ICR: usize = 0x00c0;
const IMS: usize = 0x00d0;
const IMC: usize = 0x00d8;
const RCTL: usize = 0x0100;
const TCTL: usize = 0x0400;
const TIPG: usize = 0x0410;
const RDBAL: usize = 0x2800;
const RDBAH: usize = 0x2804;
const RDLEN: usize = 0x2808;
const RDH: usize = 0x2810;
const RDT: usize = 0x2818;
const TDBAL: usize = 0x3800;
const TDBAH: usize = 0x3804;
const TDLEN: usize = 0x3808;
const TDH: usize = 0x3810;
const TDT: usize = 0x3818;
const TARC0: usize = 0x3840;
/// Missed packets (no receive buffer), clear on read.
const MPC: usize = 0x4010;
const RXCSUM: usize = 0x5000;
const MTA: usize = 0x5200;
const MTA_ENTRIES: usize = 128;
const RAL0: usize = 0x5400;
const RAH0: usize = 0x5404;

const CTRL_ASDE: u32 = 1 << 5;
const CTRL_SLU: u32 = 1 << 6;
const CTRL_RST: u32 = 1 << 26;
const STATUS_LU: u32 = 1 << 1;
const EERD_START: u32 = 1;
const EERD_DONE: u32 = 1 << 1;
const RAH_AV: u32 = 1 << 31;
const RCTL_EN: u32 = 1 << 1;
/// Long packets (beyond 1522 bytes) accepted.
const RCTL_LPE: u32 = 1 << 5;
const RCTL_BAM: u32 = 1 << 15;
/// Buffer size 2048 (BSIZE 00), or with BSEX and BSIZE 01, 16384.
const RCTL_BSIZE_16K: u32 = (1 << 25) | (1 << 16);
/// Strip the Ethernet CRC.
const RCTL_SECRC: u32 = 1 << 26;
const TCTL_EN: u32 = 1 << 1;
const TCTL_PSP: u32 = 1 << 3;
const TCTL_CT: u32 = 0x0f << 4;
const TCTL_COLD: u32 = 0x3f << 12;
const TCTL_RTLC: u32 = 1 << 24;
/// Inter-packet gap for copper (IPGT 8, IPGR1 8, IPGR2 6).
const TIPG_COPPER: u32 = 8 | (8 << 10) | (6 << 20);
/// Transmit queue 0 enable.
const TARC_ENABLE: u32 = 1 << 10;
const RXCSUM_IPOFLD: u32 = 1 << 8;
const RXCSUM_TUOFLD: u32 = 1 << 9;

// Interrupt causes.
const ICR_TXDW: u32 = 1 << 0;
const ICR_LSC: u32 = 1 << 2;
const ICR_RXDMT0: u32 = 1 << 4;
const ICR_RXO: u32 = 1 << 6;
const ICR_RXT0: u32 = 1 << 7;
const INTERRUPTS: u32 = ICR_TXDW | ICR_LSC | ICR_RXDMT0 | ICR_RXO | ICR_RXT0;

// Receive descriptor: buffer address, length, checksum, status, errors, special.
const RX_LENGTH: usize = 8;
const RX_STATUS: usize = 12;
const RX_ERRORS: usize = 13;
const RXS_DD: u8 = 1 << 0;
const RXS_EOP: u8 = 1 << 1;
/// The device did not check the checksums.
const RXS_IXSM: u8 = 1 << 2;
const RXS_TCPCS: u8 = 1 << 5;
/// CRC, symbol, sequence and data errors.
const RXE_FRAME: u8 = 0x01 | 0x02 | 0x04 | 0x80;
const RXE_TCPE: u8 = 1 << 5;

// Transmit descriptors: buffer address, then length and command, then status.
const TX_LOWER: usize = 8;
const TX_UPPER: usize = 12;
const TXD_EOP: u32 = 1 << 24;
const TXD_IFCS: u32 = 1 << 25;
const TXD_RS: u32 = 1 << 27;
const TXD_DEXT: u32 = 1 << 29;
/// Descriptor type "data" of the extended formats (type "context" is 0).
const TXD_DTYP_DATA: u32 = 1 << 20;
const TXD_TCP: u32 = 1 << 24;
const TXD_IP: u32 = 1 << 25;
const TXS_DD: u32 = 1 << 0;
/// Data descriptor option: insert the TCP/UDP checksum.
const TXD_POPTS_TXSM: u32 = 1 << 9;

/// The context (checksum layout) a data descriptor's offload uses.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Context {
    transport: Transport,
    ip_start: usize,
    start: usize,
}

/// Receive descriptors with one buffer each.
struct RxRing {
    descriptors: DmaBuffer,
    buffers: DmaBuffer,
    buffer_len: usize,
    /// The next descriptor the device fills.
    next: usize,
    /// Inside a frame longer than one buffer: its pieces are dropped.
    discarding: bool,
}

/// Transmit descriptors with one buffer each.
struct TxRing {
    descriptors: DmaBuffer,
    buffers: DmaBuffer,
    buffer_len: usize,
    /// The next descriptor to fill.
    tail: usize,
    /// The tail the device was last given (frames up to it are being sent).
    told: usize,
    /// The oldest descriptor the device has not been seen to finish.
    clean: usize,
    in_flight: usize,
    /// The checksum layout the device was last given.
    context: Option<Context>,
    /// When the device last finished a descriptor or was given its first.
    progress_ns: u64,
}

pub struct E1000e {
    regs: Mmio,
    mac: [u8; 6],
    rx: RxRing,
    tx: TxRing,
    mtu: usize,
    checksum_offload: bool,
    counters: NicCounters,
}

impl E1000e {
    /// Resets the 82574L at `function` and starts it with every receive buffer
    /// posted, checksum offload on and the standard MTU.
    pub fn probe(pci: &mut Pci, function: &PciFunction) -> Result<E1000e, &'static str> {
        let (phys, size) = pci.memory_bar(function.address, 0)?;
        let len = usize::try_from(size).map_err(|_| "register BAR too large")?;
        // SAFETY: BAR 0 of the 82574L is its register block.
        let regs = unsafe { Mmio::map(phys, len) }.ok_or("cannot map the registers")?;
        let mtu = STANDARD_FRAME - ETHERNET_HEADER;
        let mut nic = E1000e {
            rx: RxRing::new(mtu)?,
            tx: TxRing::new(mtu)?,
            regs,
            mac: [0; 6],
            mtu,
            checksum_offload: true,
            counters: NicCounters::default(),
        };
        nic.reset();
        nic.mac = nic
            .read_mac()
            .ok_or("no MAC address in the registers or EEPROM")?;
        nic.start();
        Ok(nic)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn link_up(&self) -> bool {
        self.regs.read_u32(STATUS) & STATUS_LU != 0
    }

    pub fn counters(&self) -> NicCounters {
        self.counters
    }

    pub fn mtu(&self) -> usize {
        self.mtu
    }

    pub fn checksum_offload(&self) -> bool {
        self.checksum_offload
    }

    /// Acknowledges the device's interrupt causes (so it lowers its line), counting
    /// receive overruns.
    pub fn ack_interrupt(&mut self) {
        let causes = self.regs.read_u32(ICR);
        self.regs.write_u32(ICR, causes);
        if causes & ICR_RXO != 0 {
            self.counters.rx_missed += u64::from(self.regs.read_u32(MPC));
        }
    }

    /// Unmasks the driver's interrupt causes, or masks them. Causes that occur
    /// while masked stay latched and interrupt as soon as they are unmasked.
    pub fn set_interrupts(&mut self, on: bool) {
        self.regs.write_u32(if on { IMS } else { IMC }, INTERRUPTS);
    }

    /// Whether a frame came back since the last poll (finished transmits need no
    /// check: their cause stays latched while masked).
    pub fn has_completions(&self) -> bool {
        self.has_input()
    }

    /// Whether a received frame waits to be processed.
    pub fn has_input(&self) -> bool {
        self.rx
            .descriptors
            .read_u8(self.rx.next * DESCRIPTOR + RX_STATUS)
            & RXS_DD
            != 0
    }

    /// Hands the frames queued since the last call to the device, with one tail
    /// write for all of them.
    pub fn flush(&mut self) {
        if self.tx.told != self.tx.tail {
            self.tx.told = self.tx.tail;
            self.regs.write_u32(TDT, self.tx.tail as u32);
        }
    }

    /// Resets the rings if the transmit ring has stopped moving; returns whether it
    /// did.
    pub fn recover_stall(&mut self) -> bool {
        self.reap_tx();
        if self.tx.in_flight == 0 || clock::now_ns() - self.tx.progress_ns < TX_STALL_NS {
            return false;
        }
        self.restart();
        true
    }

    /// Disables the transmitter: the device stops taking descriptors off the ring,
    /// as a hung one would, until [`E1000e::recover_stall`] finds the ring stalled
    /// and resets it. A test aid for that watchdog.
    pub fn stall_transmitter(&mut self) {
        self.regs.write_u32(TCTL, 0);
    }

    /// Changes the MTU (68 to [`MAX_MTU`]) and checksum offload; the rings start
    /// over with buffers of the new size.
    pub fn reconfigure(&mut self, mtu: usize, checksum_offload: bool) -> Result<(), &'static str> {
        if !(68..=MAX_MTU).contains(&mtu) {
            return Err("the MTU must be between 68 and 9000");
        }
        if mtu != self.mtu {
            // Allocated first: without memory for them the old rings stay in use.
            let (rx, tx) = (RxRing::new(mtu)?, TxRing::new(mtu)?);
            // The device stops using the old buffers before they are freed.
            self.reset();
            self.rx = rx;
            self.tx = tx;
            self.mtu = mtu;
        }
        self.checksum_offload = checksum_offload;
        self.restart();
        Ok(())
    }

    /// Reset and start again with empty rings, counting it.
    fn restart(&mut self) {
        self.counters.ring_resets += 1;
        self.reset();
        self.start();
    }

    /// Stops DMA and resets the MAC (registers back to defaults, MAC address
    /// reloaded from the EEPROM).
    fn reset(&mut self) {
        self.regs.write_u32(IMC, u32::MAX);
        self.regs.write_u32(RCTL, 0);
        self.regs.write_u32(TCTL, 0);
        let ctrl = self.regs.read_u32(CTRL);
        self.regs.write_u32(CTRL, ctrl | CTRL_RST);
        // The reset completes within microseconds; the bit clears itself.
        let deadline = clock::now_ns() + 10_000_000;
        while self.regs.read_u32(CTRL) & CTRL_RST != 0 && clock::now_ns() < deadline {
            core::hint::spin_loop();
        }
        self.regs.write_u32(IMC, u32::MAX);
        self.regs.read_u32(ICR);
        self.regs.read_u32(MPC);
    }

    /// The MAC address from receive-address register 0, else from EEPROM words 0–2.
    fn read_mac(&self) -> Option<[u8; 6]> {
        let high = self.regs.read_u32(RAH0);
        let (low, high) = if high & RAH_AV != 0 {
            (self.regs.read_u32(RAL0), high)
        } else {
            let words = [self.eeprom(0)?, self.eeprom(1)?, self.eeprom(2)?];
            let low = u32::from(words[0]) | u32::from(words[1]) << 16;
            (low, u32::from(words[2]))
        };
        let low = low.to_le_bytes();
        let high = high.to_le_bytes();
        let mac = [low[0], low[1], low[2], low[3], high[0], high[1]];
        (mac != [0; 6] && mac[0] & 1 == 0).then_some(mac)
    }

    fn eeprom(&self, word: u32) -> Option<u16> {
        self.regs.write_u32(EERD, word << 2 | EERD_START);
        let deadline = clock::now_ns() + 10_000_000;
        loop {
            let value = self.regs.read_u32(EERD);
            if value & EERD_DONE != 0 {
                return Some((value >> 16) as u16);
            }
            if clock::now_ns() >= deadline {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Programs the rings, filters and offloads into a freshly reset device and
    /// enables receive, transmit and interrupts.
    fn start(&mut self) {
        let regs = &self.regs;
        regs.write_u32(CTRL, regs.read_u32(CTRL) | CTRL_SLU | CTRL_ASDE);
        let mac = self.mac;
        regs.write_u32(RAL0, u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]));
        regs.write_u32(RAH0, u32::from(mac[4]) | u32::from(mac[5]) << 8 | RAH_AV);
        for entry in 0..MTA_ENTRIES {
            regs.write_u32(MTA + 4 * entry, 0);
        }

        self.rx.rearm();
        let rx = &self.rx;
        regs.write_u32(RDBAL, rx.descriptors.phys() as u32);
        regs.write_u32(RDBAH, (rx.descriptors.phys() >> 32) as u32);
        regs.write_u32(RDLEN, (RING_LEN * DESCRIPTOR) as u32);
        regs.write_u32(RDH, 0);
        regs.write_u32(RDT, (RING_LEN - 1) as u32);
        let offload = if self.checksum_offload {
            RXCSUM_IPOFLD | RXCSUM_TUOFLD
        } else {
            0
        };
        regs.write_u32(RXCSUM, offload);
        let size = if rx.buffer_len > 2048 {
            RCTL_BSIZE_16K | RCTL_LPE
        } else {
            0
        };
        regs.write_u32(RCTL, RCTL_EN | RCTL_BAM | RCTL_SECRC | size);

        self.tx.rearm();
        let tx = &self.tx;
        regs.write_u32(TDBAL, tx.descriptors.phys() as u32);
        regs.write_u32(TDBAH, (tx.descriptors.phys() >> 32) as u32);
        regs.write_u32(TDLEN, (RING_LEN * DESCRIPTOR) as u32);
        regs.write_u32(TDH, 0);
        regs.write_u32(TDT, 0);
        regs.write_u32(TIPG, TIPG_COPPER);
        regs.write_u32(TARC0, regs.read_u32(TARC0) | TARC_ENABLE);
        regs.write_u32(TCTL, TCTL_EN | TCTL_PSP | TCTL_CT | TCTL_COLD | TCTL_RTLC);

        regs.write_u32(IMS, INTERRUPTS);
    }

    /// Takes back the transmit descriptors the device has finished.
    fn reap_tx(&mut self) {
        let tx = &mut self.tx;
        while tx.in_flight > 0
            && tx.descriptors.read_u32(tx.clean * DESCRIPTOR + TX_UPPER) & TXS_DD != 0
        {
            tx.clean = (tx.clean + 1) % RING_LEN;
            tx.in_flight -= 1;
            tx.progress_ns = clock::now_ns();
        }
    }

    /// Free descriptors for one frame (a context descriptor and a data descriptor).
    fn tx_ready(&mut self) -> bool {
        self.reap_tx();
        if RING_LEN - 1 - self.tx.in_flight < 2 {
            self.counters.tx_queue_full += 1;
            return false;
        }
        true
    }

    /// The next good frame the device received: its descriptor and length. Bad,
    /// oversized and (with offload) badly checksummed frames are counted and their
    /// descriptors handed straight back.
    fn next_rx_frame(&mut self) -> Option<(usize, usize)> {
        loop {
            let slot = self.rx.next;
            let at = slot * DESCRIPTOR;
            let status = self.rx.descriptors.read_u8(at + RX_STATUS);
            if status & RXS_DD == 0 {
                return None;
            }
            let errors = self.rx.descriptors.read_u8(at + RX_ERRORS);
            let len = usize::from(self.rx.descriptors.read_u16(at + RX_LENGTH));
            let whole = status & RXS_EOP != 0 && !self.rx.discarding;
            self.rx.discarding = status & RXS_EOP == 0;
            if !whole
                || errors & RXE_FRAME != 0
                || !(ETHERNET_HEADER..=self.rx.buffer_len).contains(&len)
            {
                if status & RXS_EOP != 0 {
                    self.counters.rx_dropped += 1;
                }
                self.rx.give_back(&self.regs, slot);
                continue;
            }
            if self.checksum_offload && !self.rx_checksum_ok(slot, len, status, errors) {
                self.counters.rx_dropped += 1;
                self.rx.give_back(&self.regs, slot);
                continue;
            }
            self.counters.rx_packets += 1;
            self.counters.rx_bytes += len as u64;
            return Some((slot, len));
        }
    }

    /// With offload smoltcp checks no TCP/UDP checksum: the device's verdict
    /// decides, and frames it did not check are checked here.
    fn rx_checksum_ok(&self, slot: usize, len: usize, status: u8, errors: u8) -> bool {
        if status & RXS_IXSM == 0 && status & RXS_TCPCS != 0 {
            return errors & RXE_TCPE == 0;
        }
        // SAFETY: the device handed the descriptor back (DD) and gets it again only
        // through `give_back`.
        let frame = unsafe { self.rx.buffers.bytes(slot * self.rx.buffer_len, len) };
        frame_checksum::verify_rx(frame)
    }
}

impl RxRing {
    fn new(mtu: usize) -> Result<RxRing, &'static str> {
        let buffer_len = if mtu + ETHERNET_HEADER <= 2048 {
            2048
        } else {
            16384
        };
        Ok(RxRing {
            descriptors: DmaBuffer::new(1).ok_or("DMA pool exhausted")?,
            buffers: DmaBuffer::on_heap(RING_LEN * buffer_len).ok_or("heap exhausted")?,
            buffer_len,
            next: 0,
            discarding: false,
        })
    }

    /// Every descriptor pointing at its buffer, none done.
    fn rearm(&mut self) {
        for slot in 0..RING_LEN {
            let at = slot * DESCRIPTOR;
            self.descriptors
                .write_u64(at, self.buffers.phys() + (slot * self.buffer_len) as u64);
            self.descriptors.write_u64(at + RX_LENGTH, 0);
        }
        self.next = 0;
        self.discarding = false;
    }

    /// Returns descriptor `slot` (the oldest the driver holds) to the device, which
    /// learns of it with the batch it belongs to.
    fn give_back(&mut self, regs: &Mmio, slot: usize) {
        self.descriptors.write_u64(slot * DESCRIPTOR + RX_LENGTH, 0);
        self.next = (slot + 1) % RING_LEN;
        // The tail is one past the last descriptor the device may fill: `slot`
        // becomes the one kept back, the ones before it the device's again.
        if slot % RX_GIVE_BACK_BATCH == RX_GIVE_BACK_BATCH - 1 {
            regs.write_u32(RDT, slot as u32);
        }
    }
}

impl TxRing {
    fn new(mtu: usize) -> Result<TxRing, &'static str> {
        let buffer_len = (mtu + ETHERNET_HEADER).next_multiple_of(64);
        Ok(TxRing {
            descriptors: DmaBuffer::new(1).ok_or("DMA pool exhausted")?,
            buffers: DmaBuffer::on_heap(RING_LEN * buffer_len).ok_or("heap exhausted")?,
            buffer_len,
            tail: 0,
            told: 0,
            clean: 0,
            in_flight: 0,
            context: None,
            progress_ns: 0,
        })
    }

    /// Nothing in flight, descriptors cleared.
    fn rearm(&mut self) {
        for slot in 0..RING_LEN {
            self.descriptors.write_u64(slot * DESCRIPTOR, 0);
            self.descriptors.write_u64(slot * DESCRIPTOR + TX_LOWER, 0);
        }
        self.tail = 0;
        self.told = 0;
        self.clean = 0;
        self.in_flight = 0;
        self.context = None;
    }

    /// Queues a descriptor (without telling the device).
    fn push(&mut self, address: u64, lower: u32, upper: u32) {
        let at = self.tail * DESCRIPTOR;
        self.descriptors.write_u64(at, address);
        self.descriptors.write_u32(at + TX_LOWER, lower);
        self.descriptors.write_u32(at + TX_UPPER, upper);
        if self.in_flight == 0 {
            self.progress_ns = clock::now_ns();
        }
        self.tail = (self.tail + 1) % RING_LEN;
        self.in_flight += 1;
    }

    /// Queues a context descriptor for `context`'s checksum layout.
    fn push_context(&mut self, context: Context) {
        let (ip_checksum_at, transport_checksum_at, command) = match context.transport {
            Transport::Tcp => (context.ip_start + 10, context.start + 16, TXD_TCP),
            Transport::Udp => (context.ip_start + 10, context.start + 6, 0),
        };
        // IPCSS, IPCSO, IPCSE (0: to the end) / TUCSS, TUCSO, TUCSE (0: to the end).
        let ip = context.ip_start as u64 | (ip_checksum_at as u64) << 8;
        let transport = (context.start as u64 | (transport_checksum_at as u64) << 8) << 32;
        self.push(ip | transport, TXD_DEXT | TXD_IP | TXD_RS | command, 0);
        self.context = Some(context);
    }
}

impl Device for E1000e {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        // A frame is only taken when its answer (an ACK, say) can be sent.
        if !self.tx_ready() {
            return None;
        }
        let (slot, len) = self.next_rx_frame()?;
        Some((
            RxToken {
                ring: &mut self.rx,
                regs: &self.regs,
                slot,
                len,
            },
            TxToken {
                ring: &mut self.tx,
                offload: self.checksum_offload,
                counters: &mut self.counters,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        if !self.tx_ready() {
            return None;
        }
        Some(TxToken {
            ring: &mut self.tx,
            offload: self.checksum_offload,
            counters: &mut self.counters,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + ETHERNET_HEADER;
        // A peer may send at most a receive ring's worth of frames unacknowledged.
        caps.max_burst_size = Some(RING_LEN - 1);
        if self.checksum_offload {
            caps.checksum.tcp = Checksum::None;
            caps.checksum.udp = Checksum::None;
        }
        caps
    }
}

/// A received frame; its descriptor goes back to the device when the token is done.
pub struct RxToken<'a> {
    ring: &'a mut RxRing,
    regs: &'a Mmio,
    slot: usize,
    len: usize,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // SAFETY: the device handed the descriptor back and gets it again only when
        // this token drops, after `f` is done with the slice.
        let frame = unsafe {
            self.ring
                .buffers
                .bytes(self.slot * self.ring.buffer_len, self.len)
        };
        f(frame)
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        self.ring.give_back(self.regs, self.slot);
    }
}

/// Permission to queue one frame (two free descriptors exist); the device gets it
/// at the next [`E1000e::flush`].
pub struct TxToken<'a> {
    ring: &'a mut TxRing,
    offload: bool,
    counters: &'a mut NicCounters,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let ring = self.ring;
        if len > ring.buffer_len {
            // smoltcp never builds a frame beyond the MTU it was told; should it,
            // the frame is dropped rather than overrun the buffer.
            self.counters.tx_dropped += 1;
            return f(&mut alloc::vec![0; len]);
        }
        // The data descriptor's slot, after a context descriptor if one is needed.
        let buffer_len = ring.buffer_len;
        let offset = |slot: usize| slot * buffer_len;
        let mut data_slot = ring.tail;
        // SAFETY: the slot is not in flight (checked by `tx_ready`), so the device
        // does not read its buffer until the descriptor below is handed over.
        let frame = unsafe { ring.buffers.bytes_mut(offset(data_slot), len) };
        let result = f(frame);
        let checksum = if self.offload {
            frame_checksum::prepare_tx(frame)
        } else {
            None
        };
        let mut upper = 0;
        let mut lower = TXD_EOP | TXD_IFCS | TXD_RS | len as u32;
        if let Some(TxChecksum {
            transport,
            ip_start,
            start,
            ..
        }) = checksum
        {
            let context = Context {
                transport,
                ip_start,
                start,
            };
            if ring.context != Some(context) {
                // The frame moves one slot on so that it stays in the buffer of the
                // descriptor that carries it.
                data_slot = (ring.tail + 1) % RING_LEN;
                let moved = offset(data_slot);
                // SAFETY: as above, for the next slot (two are free).
                let target = unsafe { ring.buffers.bytes_mut(moved, len) };
                target.copy_from_slice(frame);
                ring.push_context(context);
            }
            lower |= TXD_DEXT | TXD_DTYP_DATA;
            upper = TXD_POPTS_TXSM;
        }
        let address = ring.buffers.phys() + offset(data_slot) as u64;
        ring.push(address, lower, upper);
        self.counters.tx_packets += 1;
        self.counters.tx_bytes += len as u64;
        result
    }
}
