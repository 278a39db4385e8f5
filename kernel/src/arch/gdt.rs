//! The kernel's own GDT with a TSS, whose interrupt stack table gives the
//! double-fault handler a stack of its own: a kernel stack overflow is then
//! reported instead of escalating to a triple fault (a silent reset).

use spin::Lazy;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;

/// IST slot of the double-fault stack.
pub const DOUBLE_FAULT_IST: u16 = 0;
const FAULT_STACK_SIZE: usize = 64 * 1024;

/// The double-fault stack; only the CPU writes it (through the IST), so Rust code
/// never forms a reference to it. Mutable so it is placed in writable memory.
static mut FAULT_STACK: [u128; FAULT_STACK_SIZE / 16] = [0; FAULT_STACK_SIZE / 16];

static TSS: Lazy<TaskStateSegment> = Lazy::new(|| {
    let mut tss = TaskStateSegment::new();
    let top = VirtAddr::from_ptr(&raw const FAULT_STACK) + FAULT_STACK_SIZE as u64;
    tss.interrupt_stack_table[usize::from(DOUBLE_FAULT_IST)] = top;
    tss
});

struct Gdt {
    table: GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

static GDT: Lazy<Gdt> = Lazy::new(|| {
    let mut table = GlobalDescriptorTable::new();
    let code = table.append(Descriptor::kernel_code_segment());
    let data = table.append(Descriptor::kernel_data_segment());
    let tss = table.append(Descriptor::tss_segment(&TSS));
    Gdt {
        table,
        code,
        data,
        tss,
    }
});

/// Loads the GDT and TSS and reloads every segment register.
pub fn init() {
    GDT.table.load();
    // SAFETY: the selectors come from the table just loaded and describe flat
    // 64-bit kernel code and data segments and a TSS that lives forever.
    unsafe {
        CS::set_reg(GDT.code);
        SS::set_reg(GDT.data);
        DS::set_reg(GDT.data);
        ES::set_reg(GDT.data);
        load_tss(GDT.tss);
    }
}
