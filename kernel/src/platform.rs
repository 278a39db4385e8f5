//! What the console reaches of the machine: clock, memory figures, power, network.

use console::{MemoryStats, Network, Platform};

use crate::arch::{clock, power};
use crate::memory;
use crate::net::NetHandle;

pub struct KernelPlatform {
    pub network: Option<NetHandle>,
}

impl Platform for KernelPlatform {
    fn now_ns(&self) -> u64 {
        clock::now_ns()
    }

    fn memory(&self) -> MemoryStats {
        let (heap_used, heap_free) = memory::heap_usage();
        let (dma_frames_used, dma_frames_free) = memory::frame_usage();
        MemoryStats {
            heap_used,
            heap_free,
            dma_frames_used,
            dma_frames_free,
            frame_size: memory::FRAME_SIZE,
        }
    }

    fn power_off(&mut self) {
        power::power_off()
    }

    fn crash(&mut self, why: &str) {
        panic!("{why}")
    }

    fn network(&mut self) -> Option<&mut dyn Network> {
        self.network
            .as_mut()
            .map(|network| network as &mut dyn Network)
    }
}
