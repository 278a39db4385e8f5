//! Physical memory: the heap, the DMA frame pool, address translation and MMIO
//! mappings.
//!
//! The heap lives in one physically contiguous usable region and is addressed
//! through the bootloader's physical-memory mapping, so every heap allocation
//! (request buffers included) is physically contiguous and its device address is
//! its virtual address minus the mapping offset: drivers DMA straight into
//! [`blockdev::IoBuf`]s. The tail of that region is a pool of 4 KiB frames for
//! device queues and descriptor lists.

use alloc::vec;
use alloc::vec::Vec;
use bootloader_api::info::{MemoryRegionKind, MemoryRegions};
use core::ptr::NonNull;
use linked_list_allocator::LockedHeap;
use spin::{Mutex, Once};
use x86_64::VirtAddr;
use x86_64::registers::control::Cr3;
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB,
    Translate,
};

/// Bytes per frame and page.
pub const FRAME_SIZE: usize = 4096;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Where the physical-memory mapping starts and where the heap is in it.
struct Layout {
    phys_offset: u64,
    heap_start: u64,
    heap_end: u64,
}

static LAYOUT: Once<Layout> = Once::new();
static FRAMES: Mutex<Option<FramePool>> = Mutex::new(None);
static PAGING: Mutex<Option<Paging>> = Mutex::new(None);

/// A first-fit bitmap allocator over one physically contiguous range of frames,
/// handing out zeroed, contiguous runs.
struct FramePool {
    start: u64,
    frames: usize,
    used: usize,
    bitmap: Vec<u64>,
}

impl FramePool {
    fn is_used(&self, frame: usize) -> bool {
        self.bitmap[frame / 64] & (1 << (frame % 64)) != 0
    }

    fn set(&mut self, first: usize, count: usize, used: bool) {
        for frame in first..first + count {
            if used {
                self.bitmap[frame / 64] |= 1 << (frame % 64);
            } else {
                self.bitmap[frame / 64] &= !(1 << (frame % 64));
            }
        }
    }

    fn alloc(&mut self, count: usize) -> Option<u64> {
        let mut run = 0;
        for frame in 0..self.frames {
            if self.is_used(frame) {
                run = 0;
                continue;
            }
            run += 1;
            if run == count {
                let first = frame + 1 - count;
                self.set(first, count, true);
                self.used += count;
                return Some(self.start + (first * FRAME_SIZE) as u64);
            }
        }
        None
    }

    fn free(&mut self, phys: u64, count: usize) {
        let first = ((phys - self.start) / FRAME_SIZE as u64) as usize;
        assert!(
            first + count <= self.frames && (first..first + count).all(|f| self.is_used(f)),
            "freeing DMA frames that are not allocated"
        );
        self.set(first, count, false);
        self.used -= count;
    }
}

/// The active page table and a window of virtual space for MMIO the
/// physical-memory mapping does not cover (64-bit BARs above it).
struct Paging {
    table: OffsetPageTable<'static>,
    window_next: u64,
    /// Bytes of the window not handed out yet (its end may be 2^64, which u64 cannot
    /// hold).
    window_left: u64,
}

/// Page-table frames come from the DMA pool (they are never freed).
struct PoolFrames;

// SAFETY: frames from the pool are unused, zeroed and 4 KiB aligned.
unsafe impl FrameAllocator<Size4KiB> for PoolFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let phys = alloc_frames(1)?;
        Some(PhysFrame::containing_address(x86_64::PhysAddr::new(phys)))
    }
}

/// Sets up heap, frame pool and paging from the boot memory map.
pub fn init(regions: &mut MemoryRegions, phys_offset: u64) -> Result<(), &'static str> {
    let (start, end) = largest_usable_range(regions).ok_or("no usable memory")?;
    // Physical page 0 stays unused: a device address of zero reads as "none" to some
    // drivers (virtio-drivers among them).
    let start = start
        .max(FRAME_SIZE as u64)
        .next_multiple_of(FRAME_SIZE as u64);
    let end = end & !(FRAME_SIZE as u64 - 1);
    let size = end.checked_sub(start).ok_or("usable memory too small")?;
    let pool_bytes = (size / 16).clamp(4 << 20, 64 << 20) & !(FRAME_SIZE as u64 - 1);
    if size < pool_bytes + (8 << 20) {
        return Err("less than 12 MiB of contiguous usable memory");
    }
    let heap_end = end - pool_bytes;
    let layout = LAYOUT.call_once(|| Layout {
        phys_offset,
        heap_start: phys_offset + start,
        heap_end: phys_offset + heap_end,
    });
    // SAFETY: the region is usable RAM that nothing else owns (the bootloader marks
    // its own allocations), mapped writable at `phys_offset`, and given to the heap
    // once.
    unsafe {
        HEAP.lock()
            .init(layout.heap_start as *mut u8, (heap_end - start) as usize);
    }
    let frames = (pool_bytes as usize) / FRAME_SIZE;
    *FRAMES.lock() = Some(FramePool {
        start: heap_end,
        frames,
        used: 0,
        bitmap: vec![0; frames.div_ceil(64)],
    });

    let (level_4, _) = Cr3::read();
    let table_virt = phys_offset + level_4.start_address().as_u64();
    // SAFETY: CR3 holds the active level-4 table, reachable through the
    // physical-memory mapping; from here on only `PAGING` edits page tables.
    let table = unsafe {
        OffsetPageTable::new(
            &mut *(table_virt as *mut PageTable),
            VirtAddr::new(phys_offset),
        )
    };
    let free_slot = (256..512)
        .rev()
        .find(|&i| table.level_4_table()[i].is_unused())
        .ok_or("no free level-4 slot for MMIO mappings")?;
    let window_start = 0xffff_0000_0000_0000 | ((free_slot as u64) << 39);
    *PAGING.lock() = Some(Paging {
        table,
        window_next: window_start,
        window_left: 1 << 39,
    });
    Ok(())
}

/// The largest physically contiguous run of usable memory. UEFI memory maps list
/// many adjacent usable pieces (memory types that differed before boot services
/// ended), so touching regions are joined. Sorts the regions in place (this runs
/// before there is a heap).
fn largest_usable_range(regions: &mut MemoryRegions) -> Option<(u64, u64)> {
    regions.sort_unstable_by_key(|region| region.start);
    let mut best: Option<(u64, u64)> = None;
    let mut run: Option<(u64, u64)> = None;
    for region in regions.iter() {
        if region.kind != MemoryRegionKind::Usable || region.end <= region.start {
            run = None;
            continue;
        }
        let current = match run {
            Some((start, end)) if region.start == end => (start, region.end),
            _ => (region.start, region.end),
        };
        run = Some(current);
        if best.is_none_or(|(start, end)| current.1 - current.0 > end - start) {
            best = Some(current);
        }
    }
    best
}

fn layout() -> &'static Layout {
    LAYOUT.get().expect("memory initialised")
}

/// Kernel virtual address of a physical address (through the physical-memory
/// mapping, which covers all RAM and the first 4 GiB).
pub fn phys_to_virt(phys: u64) -> *mut u8 {
    (layout().phys_offset + phys) as *mut u8
}

/// Heap bytes (used, free).
pub fn heap_usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.used(), heap.free())
}

/// DMA frames (used, free).
pub fn frame_usage() -> (usize, usize) {
    FRAMES
        .lock()
        .as_ref()
        .map_or((0, 0), |pool| (pool.used, pool.frames - pool.used))
}

/// Allocates `count` zeroed, physically contiguous frames; returns the physical
/// address of the first.
pub fn alloc_frames(count: usize) -> Option<u64> {
    let phys = FRAMES.lock().as_mut()?.alloc(count)?;
    // SAFETY: the frames were just taken from the pool, so nothing else uses them,
    // and they are mapped writable through the physical-memory mapping.
    unsafe { core::ptr::write_bytes(phys_to_virt(phys), 0, count * FRAME_SIZE) };
    Some(phys)
}

/// Returns frames from [`alloc_frames`] to the pool.
pub fn free_frames(phys: u64, count: usize) {
    FRAMES
        .lock()
        .as_mut()
        .expect("frame pool initialised")
        .free(phys, count);
}

/// The device (physical) address of `len` bytes at `ptr` if they are physically
/// contiguous; `None` when they are not (or not mapped).
pub fn dma_address(ptr: *const u8, len: usize) -> Option<u64> {
    let layout = layout();
    let start = ptr as u64;
    let end = start.checked_add(len as u64)?;
    if start >= layout.heap_start && end <= layout.heap_end {
        return Some(start - layout.phys_offset);
    }
    let paging = PAGING.lock();
    let table = &paging.as_ref()?.table;
    let phys = table.translate_addr(VirtAddr::new(start))?.as_u64();
    let mut page = (start & !(FRAME_SIZE as u64 - 1)) + FRAME_SIZE as u64;
    while page < end {
        let expected = phys + (page - start);
        if table.translate_addr(VirtAddr::new(page))?.as_u64() != expected {
            return None;
        }
        page += FRAME_SIZE as u64;
    }
    Some(phys)
}

/// A virtual address for the MMIO range `phys..phys + len`: inside the
/// physical-memory mapping when it covers the range, otherwise freshly mapped
/// uncached in the MMIO window.
///
/// # Safety
/// The range must be device memory (a BAR or firmware-described register block),
/// not RAM that Rust code uses.
pub unsafe fn map_mmio(phys: u64, len: usize) -> Option<NonNull<u8>> {
    let layout = layout();
    let mut guard = PAGING.lock();
    let paging = guard.as_mut()?;
    let last = phys.checked_add(len.max(1) as u64 - 1)?;
    let mapped = |addr: u64| {
        paging
            .table
            .translate_addr(VirtAddr::new(layout.phys_offset + addr))
            .map(|p| p.as_u64())
            == Some(addr)
    };
    if layout.phys_offset.checked_add(last).is_some() && mapped(phys) && mapped(last) {
        return NonNull::new((layout.phys_offset + phys) as *mut u8);
    }
    let first_page = phys & !(FRAME_SIZE as u64 - 1);
    let pages = (last - first_page) / FRAME_SIZE as u64 + 1;
    let virt = paging.window_next;
    let bytes = pages * FRAME_SIZE as u64;
    if bytes > paging.window_left {
        return None;
    }
    let flags = PageTableFlags::PRESENT
        | PageTableFlags::WRITABLE
        | PageTableFlags::NO_CACHE
        | PageTableFlags::WRITE_THROUGH;
    for i in 0..pages {
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(virt + i * 4096));
        let frame = PhysFrame::containing_address(x86_64::PhysAddr::new(first_page + i * 4096));
        // SAFETY: the window's virtual pages are unused (a level-4 slot that was empty
        // at boot, handed out once) and the frame is device memory (caller's promise).
        unsafe { paging.table.map_to(page, frame, flags, &mut PoolFrames) }
            .ok()?
            .flush();
    }
    paging.window_next = paging.window_next.wrapping_add(bytes);
    paging.window_left -= bytes;
    NonNull::new((virt + (phys - first_page)) as *mut u8)
}
