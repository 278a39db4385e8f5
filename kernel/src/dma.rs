//! DMA memory for device queues and descriptor lists: frames from the pool with a
//! known device address, accessed with volatile reads and writes because the
//! device changes them behind the compiler's back.

use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};

use crate::memory::{self, FRAME_SIZE};

/// Zeroed, physically contiguous frames shared with a device; freed on drop.
pub struct DmaBuffer {
    phys: u64,
    virt: NonNull<u8>,
    frames: usize,
}

impl DmaBuffer {
    /// `frames` contiguous frames, or `None` when the pool is exhausted.
    pub fn new(frames: usize) -> Option<Self> {
        let phys = memory::alloc_frames(frames)?;
        Some(DmaBuffer {
            phys,
            virt: NonNull::new(memory::phys_to_virt(phys))?,
            frames,
        })
    }

    /// Device address of the first byte.
    pub fn phys(&self) -> u64 {
        self.phys
    }

    pub fn len(&self) -> usize {
        self.frames * FRAME_SIZE
    }

    fn at<T>(&self, offset: usize) -> *mut T {
        assert!(
            offset.is_multiple_of(align_of::<T>()) && offset + size_of::<T>() <= self.len(),
            "DMA access at {offset} outside the buffer or misaligned"
        );
        // SAFETY: the offset is inside the allocation (checked above).
        unsafe { self.virt.as_ptr().add(offset).cast() }
    }

    pub fn read_u8(&self, offset: usize) -> u8 {
        // SAFETY: `at` checks bounds and alignment; the memory is ours and mapped.
        unsafe { self.at::<u8>(offset).read_volatile() }
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        // SAFETY: as in `read_u8`.
        unsafe { self.at::<u16>(offset).read_volatile() }
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        // SAFETY: as in `read_u8`.
        unsafe { self.at::<u32>(offset).read_volatile() }
    }

    pub fn read_u64(&self, offset: usize) -> u64 {
        // SAFETY: as in `read_u8`.
        unsafe { self.at::<u64>(offset).read_volatile() }
    }

    pub fn write_u32(&self, offset: usize, value: u32) {
        // SAFETY: as in `read_u8`.
        unsafe { self.at::<u32>(offset).write_volatile(value) }
    }

    pub fn write_u64(&self, offset: usize, value: u64) {
        // SAFETY: as in `read_u8`.
        unsafe { self.at::<u64>(offset).write_volatile(value) }
    }

    /// Copies bytes out (e.g. an identify page the device has written).
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        fence(Ordering::SeqCst);
        for (i, byte) in out.iter_mut().enumerate() {
            // SAFETY: as in `read_u8`.
            *byte = unsafe { self.at::<u8>(offset + i).read_volatile() };
        }
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        memory::free_frames(self.phys, self.frames);
    }
}

// SAFETY: the buffer is plain memory owned by this value; volatile accesses from any
// one thread at a time are sound.
unsafe impl Send for DmaBuffer {}
