//! DMA memory for device queues, descriptor lists and packet buffers: frames from
//! the pool (or, for large packet buffers, the heap, which is physically
//! contiguous) with a known device address, accessed with volatile reads and writes
//! because the device changes them behind the compiler's back.

use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};

use crate::memory::{self, FRAME_SIZE};

/// Where a buffer's memory came from, so that drop returns it there.
enum Source {
    Pool { frames: usize },
    Heap { layout: Layout },
}

/// Zeroed, physically contiguous memory shared with a device; freed on drop.
pub struct DmaBuffer {
    phys: u64,
    virt: NonNull<u8>,
    len: usize,
    source: Source,
}

impl DmaBuffer {
    /// `frames` contiguous frames, or `None` when the pool is exhausted.
    pub fn new(frames: usize) -> Option<Self> {
        let phys = memory::alloc_frames(frames)?;
        Some(DmaBuffer {
            phys,
            virt: NonNull::new(memory::phys_to_virt(phys))?,
            len: frames * FRAME_SIZE,
            source: Source::Pool { frames },
        })
    }

    /// `len` page-aligned bytes from the heap (for packet buffers, which would
    /// take more of the frame pool than the disks can spare), or `None` when the
    /// heap is exhausted.
    pub fn on_heap(len: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), FRAME_SIZE).ok()?;
        // SAFETY: the layout has a non-zero size.
        let virt = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        let Some(phys) = memory::dma_address(virt.as_ptr(), len) else {
            // SAFETY: allocated just above with this layout.
            unsafe { dealloc(virt.as_ptr(), layout) };
            return None;
        };
        Some(DmaBuffer {
            phys,
            virt,
            len,
            source: Source::Heap { layout },
        })
    }

    /// Device address of the first byte.
    pub fn phys(&self) -> u64 {
        self.phys
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The bytes at `offset..offset + len`, for reading a packet the device has
    /// handed back. Panics outside the buffer.
    ///
    /// # Safety
    /// The device must not write the range while the slice lives (its descriptor
    /// is owned by the driver).
    pub unsafe fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.len, "DMA slice outside the buffer");
        fence(Ordering::SeqCst);
        // SAFETY: inside the allocation (checked above); the caller guarantees the
        // device leaves the range alone meanwhile.
        unsafe { core::slice::from_raw_parts(self.virt.as_ptr().add(offset), len) }
    }

    /// The bytes at `offset..offset + len`, for writing a packet before the device
    /// is given it. Panics outside the buffer.
    ///
    /// # Safety
    /// The device must not access the range while the slice lives, and no other
    /// slice of the range may exist.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.len, "DMA slice outside the buffer");
        // SAFETY: as in `bytes`, and the caller guarantees the slice is the only one.
        unsafe { core::slice::from_raw_parts_mut(self.virt.as_ptr().add(offset), len) }
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
        match self.source {
            Source::Pool { frames } => memory::free_frames(self.phys, frames),
            // SAFETY: allocated in `on_heap` with this layout and freed only here.
            Source::Heap { layout } => unsafe { dealloc(self.virt.as_ptr(), layout) },
        }
    }
}

// SAFETY: the buffer is plain memory owned by this value; volatile accesses from any
// one thread at a time are sound.
unsafe impl Send for DmaBuffer {}
