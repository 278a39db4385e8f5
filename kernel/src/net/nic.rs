//! The NIC the stack runs on, whichever driver serves it: one smoltcp [`Device`]
//! over the virtio-net and the e1000e driver, so the stack above is the same.

use alloc::boxed::Box;
use console::NicCounters;
use smoltcp::phy::{self, Device, DeviceCapabilities};
use smoltcp::time::Instant;

use crate::drivers::e1000e::{self, E1000e};
use crate::drivers::virtio_net::{self, VirtioNet};

pub enum Nic {
    /// Boxed: the drivers differ much in size (virtio's queues are inline).
    Virtio(Box<VirtioNet>),
    E1000e(Box<E1000e>),
}

/// Calls the same method on whichever driver it is.
macro_rules! each {
    ($nic:expr, $driver:ident => $call:expr) => {
        match $nic {
            Nic::Virtio($driver) => $call,
            Nic::E1000e($driver) => $call,
        }
    };
}

impl Nic {
    /// The driver's name, for `net`.
    pub fn driver(&self) -> &'static str {
        match self {
            Nic::Virtio(_) => "virtio-net",
            Nic::E1000e(_) => "e1000e",
        }
    }

    /// Whether the driver takes its interrupt as an MSI (the e1000e; virtio-drivers
    /// reads virtio's interrupt status register, which only INTx sets).
    pub fn takes_msi(&self) -> bool {
        matches!(self, Nic::E1000e(_))
    }

    pub fn mac(&self) -> [u8; 6] {
        each!(self, nic => nic.mac())
    }

    pub fn link_up(&self) -> bool {
        each!(self, nic => nic.link_up())
    }

    pub fn counters(&self) -> NicCounters {
        each!(self, nic => nic.counters())
    }

    pub fn mtu(&self) -> usize {
        each!(self, nic => nic.mtu())
    }

    pub fn checksum_offload(&self) -> bool {
        each!(self, nic => nic.checksum_offload())
    }

    pub fn ack_interrupt(&mut self) {
        each!(self, nic => nic.ack_interrupt())
    }

    pub fn has_input(&self) -> bool {
        each!(self, nic => nic.has_input())
    }

    /// Turns the NIC's interrupts on (before the main loop sleeps) or off (while
    /// it polls anyway: each interrupt costs its delivery and acknowledgement).
    pub fn set_interrupts(&mut self, on: bool) {
        each!(self, nic => nic.set_interrupts(on))
    }

    /// Whether the device handed something back that the stack has not seen.
    pub fn has_completions(&mut self) -> bool {
        each!(self, nic => nic.has_completions())
    }

    /// Hands the frames and receive buffers queued since the last call to the
    /// device: one tail write (e1000e) or one doorbell per queue (virtio-net).
    pub fn flush(&mut self) {
        each!(self, nic => nic.flush())
    }

    /// Resets a transmit ring that stopped moving; returns whether it did.
    pub fn recover_stall(&mut self) -> bool {
        match self {
            Nic::Virtio(_) => false,
            Nic::E1000e(nic) => nic.recover_stall(),
        }
    }

    /// Stops the transmitter as a hung ring would (`net stall-tx`): only the e1000e
    /// driver has a watchdog that resets it.
    pub fn stall_transmitter(&mut self) -> Result<(), &'static str> {
        match self {
            Nic::Virtio(_) => Err("virtio-net has no transmit stall watchdog"),
            Nic::E1000e(nic) => {
                nic.stall_transmitter();
                Ok(())
            }
        }
    }

    /// Sets the IP MTU and checksum offload (what the device cannot do is refused).
    pub fn reconfigure(&mut self, mtu: usize, checksum_offload: bool) -> Result<(), &'static str> {
        each!(self, nic => nic.reconfigure(mtu, checksum_offload))
    }
}

impl Device for Nic {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        match self {
            Nic::Virtio(nic) => nic
                .receive(timestamp)
                .map(|(rx, tx)| (RxToken::Virtio(rx), TxToken::Virtio(tx))),
            Nic::E1000e(nic) => nic
                .receive(timestamp)
                .map(|(rx, tx)| (RxToken::E1000e(rx), TxToken::E1000e(tx))),
        }
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<TxToken<'_>> {
        match self {
            Nic::Virtio(nic) => nic.transmit(timestamp).map(TxToken::Virtio),
            Nic::E1000e(nic) => nic.transmit(timestamp).map(TxToken::E1000e),
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        each!(self, nic => nic.capabilities())
    }
}

pub enum RxToken<'a> {
    Virtio(virtio_net::RxToken<'a>),
    E1000e(e1000e::RxToken<'a>),
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        match self {
            RxToken::Virtio(token) => token.consume(f),
            RxToken::E1000e(token) => token.consume(f),
        }
    }
}

pub enum TxToken<'a> {
    Virtio(virtio_net::TxToken<'a>),
    E1000e(e1000e::TxToken<'a>),
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        match self {
            TxToken::Virtio(token) => token.consume(len, f),
            TxToken::E1000e(token) => token.consume(len, f),
        }
    }
}
