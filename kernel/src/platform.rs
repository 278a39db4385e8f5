//! What the console reaches of the machine: clock, memory figures, power, network.

use console::{Crash, MemoryStats, Network, Platform};

use crate::arch::{clock, power};
use crate::drivers::nvme;
use crate::memory;
use crate::net::NetHandle;
use alloc::vec::Vec;

pub struct KernelPlatform {
    /// Controllers to notify before power goes.
    pub nvme_controllers: Vec<nvme::ShutdownHandle>,
    pub network: Option<NetHandle>,
}

impl Platform for KernelPlatform {
    fn now_ns(&self) -> u64 {
        clock::now_ns()
    }

    fn memory(&self) -> Option<MemoryStats> {
        let (heap_used, heap_free) = memory::heap_usage();
        let (dma_frames_used, dma_frames_free) = memory::frame_usage();
        Some(MemoryStats {
            heap_used,
            heap_free,
            dma_frames_used,
            dma_frames_free,
            frame_size: memory::FRAME_SIZE,
        })
    }

    fn power_off(&mut self) {
        for controller in &self.nvme_controllers {
            controller.shutdown();
        }
        power::power_off()
    }

    fn crash(&mut self, how: Crash) {
        match how {
            Crash::Panic => panic!("deliberate panic requested on the console"),
            Crash::PageFault => {
                // The lowest page is never mapped, so this read faults.
                let unmapped = core::hint::black_box(core::ptr::dangling::<u64>());
                // SAFETY: not sound on purpose: the read faults and the exception
                // handler stops the machine, so no value is ever produced.
                let value = unsafe { unmapped.read_volatile() };
                panic!("reading {unmapped:p} returned {value:#x} instead of faulting")
            }
            Crash::StackOverflow => {
                let depth = recurse(core::hint::black_box(0));
                panic!("recursion to depth {depth} did not overflow the stack")
            }
        }
    }

    fn network(&mut self) -> Option<&mut dyn Network> {
        self.network
            .as_mut()
            .map(|network| network as &mut dyn Network)
    }

    fn connector(&mut self) -> alloc::boxed::Box<dm::Connector<'static>> {
        let stack = self
            .network
            .as_ref()
            .map(|network| alloc::rc::Rc::clone(&network.0));
        alloc::boxed::Box::new(move |uri: &nbd::client::NbdUri| {
            let Some(stack) = &stack else {
                return Err("the appliance has no network interface".into());
            };
            crate::net::connect(stack, &uri.host, uri.port)
        })
    }
}

/// Recurses with a large frame until the stack overflows (the depth can never reach
/// `u64::MAX` first).
fn recurse(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth; 256]);
    if frame[0] == u64::MAX {
        return frame[1];
    }
    recurse(frame[1] + 1) + frame[2]
}
