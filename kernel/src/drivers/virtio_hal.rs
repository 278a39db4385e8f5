//! `virtio-drivers`' view of the machine: DMA frames from the pool, BARs mapped
//! through [`Mmio`](crate::mmio), and buffer sharing that translates any kernel
//! address (heap buffers by subtraction, others through the page tables) and
//! bounces through pool frames when a buffer is not physically contiguous.

use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

use crate::memory::{self, FRAME_SIZE};

pub struct KernelHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned, exclusively owned frames;
// `mmio_phys_to_virt` maps the BAR it is given; `share` hands out the device
// address of the very memory (or of a bounce copy that `unshare` writes back).
unsafe impl Hal for KernelHal {
    /// Address 0 tells `virtio-drivers` that nothing was allocated (it fails the
    /// setup with a DMA error).
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(phys) = memory::alloc_frames(pages) else {
            return (0, NonNull::dangling());
        };
        match NonNull::new(memory::phys_to_virt(phys)) {
            Some(virt) => (phys, virt),
            None => {
                memory::free_frames(phys, pages);
                (0, NonNull::dangling())
            }
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        memory::free_frames(paddr, pages);
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // SAFETY: virtio-drivers only passes ranges inside BARs the device reported.
        unsafe { memory::map_mmio(paddr, size) }.expect("mapping a virtio BAR")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let ptr = buffer.as_ptr() as *const u8;
        if let Some(phys) = memory::dma_address(ptr, buffer.len()) {
            return phys;
        }
        let frames = buffer.len().div_ceil(FRAME_SIZE);
        let bounce = memory::alloc_frames(frames).expect("DMA pool exhausted (bounce buffer)");
        if direction != BufferDirection::DeviceToDriver {
            // SAFETY: the caller guarantees `buffer` is valid for reads; the bounce
            // frames were just allocated and are at least as long.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, memory::phys_to_virt(bounce), buffer.len())
            };
        }
        bounce
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let ptr = buffer.as_ptr() as *mut u8;
        if memory::dma_address(ptr, buffer.len()) == Some(paddr) {
            return;
        }
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: `paddr` is the bounce copy made by `share` for this buffer, which
            // the caller guarantees is valid for writes.
            unsafe {
                core::ptr::copy_nonoverlapping(memory::phys_to_virt(paddr), ptr, buffer.len())
            };
        }
        memory::free_frames(paddr, buffer.len().div_ceil(FRAME_SIZE));
    }
}
