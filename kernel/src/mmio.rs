//! Device registers: a mapped MMIO range with bounds-checked volatile access.

use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};

use crate::memory;

/// A device's register block. Copies share the registers; that is how devices
/// work (each user writes its own registers, e.g. one doorbell per queue).
#[derive(Clone)]
pub struct Mmio {
    base: NonNull<u8>,
    len: usize,
}

impl Mmio {
    /// Maps `len` bytes of device registers at physical address `phys`.
    ///
    /// # Safety
    /// The range must be a device's register space (a memory BAR), not RAM.
    pub unsafe fn map(phys: u64, len: usize) -> Option<Mmio> {
        // SAFETY: passed on from the caller.
        let base = unsafe { memory::map_mmio(phys, len) }?;
        Some(Mmio { base, len })
    }

    fn at<T>(&self, offset: usize) -> *mut T {
        assert!(
            offset.is_multiple_of(align_of::<T>()) && offset + size_of::<T>() <= self.len,
            "register access at {offset:#x} outside the {:#x}-byte block",
            self.len
        );
        // SAFETY: inside the mapped block (checked above).
        unsafe { self.base.as_ptr().add(offset).cast() }
    }

    /// The virtual address of the register at `offset`, for an interrupt handler
    /// that cannot reach this value.
    pub fn address(&self, offset: usize) -> usize {
        self.at::<u32>(offset) as usize
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        // SAFETY: `at` checks bounds and alignment; the block is mapped device memory.
        unsafe { self.at::<u16>(offset).read_volatile() }
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        // SAFETY: `at` checks bounds and alignment; the block is mapped device memory.
        unsafe { self.at::<u32>(offset).read_volatile() }
    }

    pub fn read_u64(&self, offset: usize) -> u64 {
        // SAFETY: as in `read_u32`.
        unsafe { self.at::<u64>(offset).read_volatile() }
    }

    /// Writes a 16-bit register, ordered like [`Mmio::write_u32`].
    pub fn write_u16(&self, offset: usize, value: u16) {
        fence(Ordering::SeqCst);
        // SAFETY: as in `read_u16`.
        unsafe { self.at::<u16>(offset).write_volatile(value) }
    }

    /// Writes a register after every earlier memory write (queue entries, data
    /// buffers) is visible to devices.
    pub fn write_u32(&self, offset: usize, value: u32) {
        fence(Ordering::SeqCst);
        // SAFETY: as in `read_u32`.
        unsafe { self.at::<u32>(offset).write_volatile(value) }
    }

    pub fn write_u64(&self, offset: usize, value: u64) {
        fence(Ordering::SeqCst);
        // SAFETY: as in `read_u32`.
        unsafe { self.at::<u64>(offset).write_volatile(value) }
    }
}
