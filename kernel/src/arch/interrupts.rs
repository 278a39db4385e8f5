//! Interrupt handling: every CPU exception is fatal and reported on the console;
//! the legacy PIC delivers the PIT tick (which wakes the idle loop), the COM1
//! receive interrupt (which wakes it when a key arrives) and device interrupts.
//!
//! A device interrupt only wakes the idle loop: its handler masks the line (PCI
//! interrupts are level-triggered and stay asserted until the driver acknowledges
//! the device) and marks it fired; the main loop's driver then services the
//! device and unmasks the line with [`rearm_device_irq`]. A NIC that can send a
//! message-signalled interrupt (MSI) instead gets [`MSI_VECTOR`] through the local
//! APIC ([`enable_msi`]): edge-triggered, nothing to mask, only marked fired.
//! Disks that finish a request while the loop waits for them send
//! [`DISK_VECTOR`] ([`enable_disk_msi`]), which only wakes it: the loop polls every
//! disk on every turn anyway.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use spin::Lazy;
use x86_64::registers::control::Cr2;
use x86_64::structures::idt::{InterruptDescriptorTable, InterruptStackFrame, PageFaultErrorCode};

use super::{gdt, port, serial::Serial};
use crate::mmio::Mmio;

/// Vector of IRQ 0 after remapping the PIC (IRQ n is vector 32 + n).
const IRQ_BASE: u8 = 32;
const IRQ_TIMER: u8 = 0;
const IRQ_COM1: u8 = 4;
/// The slave PIC's cascade input on the master.
const IRQ_CASCADE: u8 = 2;
const PIC1_COMMAND: u16 = 0x20;
const PIC1_DATA: u16 = 0x21;
const PIC2_COMMAND: u16 = 0xa0;
const PIC2_DATA: u16 = 0xa1;
const END_OF_INTERRUPT: u8 = 0x20;

/// PIT input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// Timer interrupts per second: often enough for periodic work, rare enough that
/// an idle appliance costs its host next to nothing.
pub const TICK_HZ: u64 = 100;

static TICKS: AtomicU64 = AtomicU64::new(0);
/// Lines claimed by drivers with [`enable_device_irq`], one bit per IRQ.
static DEVICE_LINES: AtomicU16 = AtomicU16::new(0);
/// Device lines that fired and are masked until their driver rearms them.
static FIRED: AtomicU16 = AtomicU16::new(0);
/// The PIC mask registers (bit set = line masked), master in the low byte.
static PIC_MASK: AtomicU16 = AtomicU16::new(0xffff);
/// The message-signalled interrupt's vector, after the PIC's sixteen.
pub const MSI_VECTOR: u8 = IRQ_BASE + 16;
/// The MSI fired and awaits its driver.
static MSI_FIRED: AtomicBool = AtomicBool::new(false);
/// The disks' message-signalled interrupt's vector.
pub const DISK_VECTOR: u8 = MSI_VECTOR + 1;
/// A disk interrupted since the main loop last armed the disks' wake-ups.
static DISK_FIRED: AtomicBool = AtomicBool::new(false);
/// Disk interrupts since start-up.
static DISK_INTERRUPTS: AtomicU64 = AtomicU64::new(0);
/// COM1 raised its receive interrupt since the main loop last looked.
static SERIAL_FIRED: AtomicBool = AtomicBool::new(false);
/// Virtual address of the local APIC's end-of-interrupt register (0: no MSI).
static LAPIC_EOI: AtomicUsize = AtomicUsize::new(0);
/// The `IA32_APIC_BASE` model-specific register and its bits.
const APIC_BASE_MSR: u32 = 0x1b;
const APIC_GLOBAL_ENABLE: u64 = 1 << 11;
const APIC_X2APIC_MODE: u64 = 1 << 10;
/// Local APIC registers: ID, end of interrupt, spurious-interrupt vector.
const LAPIC_ID: usize = 0x20;
const LAPIC_EOI_REGISTER: usize = 0xb0;
const LAPIC_SPURIOUS: usize = 0xf0;
const LAPIC_SOFTWARE_ENABLE: u32 = 1 << 8;
/// Where MSI writes go: the local APICs' window, destination ID in bits 12–19.
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;

/// Timer interrupts since [`init`].
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// Whether COM1 interrupted since the last call: received bytes wait.
pub fn take_serial_input() -> bool {
    SERIAL_FIRED.swap(false, Ordering::Relaxed)
}

/// Reports a fatal CPU exception and stops the machine.
fn fatal(name: &str, frame: &InterruptStackFrame, error_code: Option<u64>, cr2: Option<u64>) -> ! {
    let mut serial = Serial::get();
    let _ = write!(
        serial,
        "\r\nKERNEL PANIC: {name} at {:#x}",
        frame.instruction_pointer.as_u64()
    );
    if let Some(code) = error_code {
        let _ = write!(serial, " (error code {code:#x})");
    }
    if let Some(address) = cr2 {
        let _ = write!(serial, " accessing {address:#x}");
    }
    let _ = write!(
        serial,
        ", rsp {:#x}, cs {:#x}, rflags {:#x}\r\n",
        frame.stack_pointer.as_u64(),
        frame.code_segment.0,
        frame.cpu_flags.bits()
    );
    super::power::exit_failure()
}

/// Defines a handler for an exception without an error code.
macro_rules! exception {
    ($handler:ident, $name:literal) => {
        extern "x86-interrupt" fn $handler(frame: InterruptStackFrame) {
            fatal($name, &frame, None, None)
        }
    };
}

/// Defines a handler for an exception that pushes an error code.
macro_rules! exception_with_code {
    ($handler:ident, $name:literal) => {
        extern "x86-interrupt" fn $handler(frame: InterruptStackFrame, code: u64) {
            fatal($name, &frame, Some(code), None)
        }
    };
}

exception!(divide_error, "divide error");
exception!(debug, "debug exception");
exception!(non_maskable_interrupt, "non-maskable interrupt");
exception!(breakpoint, "breakpoint");
exception!(overflow, "overflow");
exception!(bound_range_exceeded, "bound range exceeded");
exception!(invalid_opcode, "invalid opcode");
exception!(device_not_available, "device not available");
exception!(x87_floating_point, "x87 floating-point exception");
exception!(simd_floating_point, "SIMD floating-point exception");
exception!(virtualization, "virtualization exception");
exception!(hv_injection, "hypervisor injection exception");
exception_with_code!(invalid_tss, "invalid TSS");
exception_with_code!(segment_not_present, "segment not present");
exception_with_code!(stack_segment_fault, "stack-segment fault");
exception_with_code!(general_protection_fault, "general protection fault");
exception_with_code!(alignment_check, "alignment check");
exception_with_code!(cp_protection, "control protection exception");
exception_with_code!(vmm_communication, "VMM communication exception");
exception_with_code!(security_exception, "security exception");

extern "x86-interrupt" fn double_fault(frame: InterruptStackFrame, code: u64) -> ! {
    fatal(
        "double fault (kernel stack overflow?)",
        &frame,
        Some(code),
        None,
    )
}

extern "x86-interrupt" fn machine_check(frame: InterruptStackFrame) -> ! {
    fatal("machine check", &frame, None, None)
}

extern "x86-interrupt" fn page_fault(frame: InterruptStackFrame, code: PageFaultErrorCode) {
    let address = Cr2::read_raw();
    fatal("page fault", &frame, Some(code.bits()), Some(address))
}

/// One entry point per PIC line, so the handler knows which line fired.
extern "x86-interrupt" fn irq<const LINE: u8>(_frame: InterruptStackFrame) {
    match LINE {
        IRQ_TIMER => {
            TICKS.fetch_add(1, Ordering::Relaxed);
        }
        // The main loop reads the bytes; this interrupt ends a `hlt` and tells it to.
        IRQ_COM1 => SERIAL_FIRED.store(true, Ordering::Relaxed),
        line if DEVICE_LINES.load(Ordering::Relaxed) & (1 << line) != 0 => {
            FIRED.fetch_or(1 << line, Ordering::Relaxed);
            write_pic_mask(PIC_MASK.fetch_or(1 << line, Ordering::Relaxed) | (1 << line));
        }
        // Stray interrupts (spurious IRQ 7 / 15 included) are acknowledged and ignored.
        _ => {}
    }
    if LINE >= 8 {
        port::write_u8(PIC2_COMMAND, END_OF_INTERRUPT);
    }
    port::write_u8(PIC1_COMMAND, END_OF_INTERRUPT);
}

/// The MSI: marks it fired (it wakes the idle loop) and ends it at the local APIC.
extern "x86-interrupt" fn msi(_frame: InterruptStackFrame) {
    MSI_FIRED.store(true, Ordering::Relaxed);
    end_lapic_interrupt();
}

/// A disk's MSI: marks it fired (it wakes the idle loop) and ends it.
extern "x86-interrupt" fn disk_msi(_frame: InterruptStackFrame) {
    DISK_FIRED.store(true, Ordering::Relaxed);
    DISK_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    end_lapic_interrupt();
}

fn end_lapic_interrupt() {
    let eoi = LAPIC_EOI.load(Ordering::Relaxed);
    if eoi != 0 {
        // SAFETY: the address is the mapped local APIC's EOI register (set once by
        // `lapic_message` before any device was told to send a vector through it).
        unsafe { (eoi as *mut u32).write_volatile(0) };
    }
}

/// Readies the boot CPU's local APIC for [`MSI_VECTOR`] and returns the message
/// address and data a device must write to raise it; `None` without a local APIC
/// in memory-mapped (xAPIC) mode.
pub fn enable_msi() -> Option<(u64, u32)> {
    lapic_message(MSI_VECTOR)
}

/// As [`enable_msi`], for [`DISK_VECTOR`].
pub fn enable_disk_msi() -> Option<(u64, u32)> {
    lapic_message(DISK_VECTOR)
}

/// Disk interrupts since start-up: each ended, or came just before, a halt while
/// requests waited for a disk.
pub fn disk_interrupts() -> u64 {
    DISK_INTERRUPTS.load(Ordering::Relaxed)
}

/// Forgets disk interrupts seen so far; the main loop calls this at the start of
/// each turn, before it polls the disks and arms them for the next halt.
pub fn clear_disk_irq() {
    DISK_FIRED.store(false, Ordering::Relaxed);
}

/// Readies the local APIC and returns the MSI message that raises `vector`.
fn lapic_message(vector: u8) -> Option<(u64, u32)> {
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU; reading it has no effect.
    let base = unsafe { x86_64::registers::model_specific::Msr::new(APIC_BASE_MSR).read() };
    if base & APIC_GLOBAL_ENABLE == 0 || base & APIC_X2APIC_MODE != 0 {
        return None;
    }
    // SAFETY: the MSR names the local APIC's register page.
    let lapic = unsafe { Mmio::map(base & 0xf_ffff_f000, 4096) }?;
    let spurious = lapic.read_u32(LAPIC_SPURIOUS);
    lapic.write_u32(LAPIC_SPURIOUS, spurious | LAPIC_SOFTWARE_ENABLE);
    let id = u64::from(lapic.read_u32(LAPIC_ID) >> 24);
    LAPIC_EOI.store(lapic.address(LAPIC_EOI_REGISTER), Ordering::Relaxed);
    Some((MSI_ADDRESS_BASE | id << 12, u32::from(vector)))
}

/// Whether the MSI fired since the last call.
pub fn take_msi() -> bool {
    MSI_FIRED.swap(false, Ordering::Relaxed)
}

const IRQ_HANDLERS: [extern "x86-interrupt" fn(InterruptStackFrame); 16] = [
    irq::<0>, irq::<1>, irq::<2>, irq::<3>, irq::<4>, irq::<5>, irq::<6>, irq::<7>, irq::<8>,
    irq::<9>, irq::<10>, irq::<11>, irq::<12>, irq::<13>, irq::<14>, irq::<15>,
];

fn write_pic_mask(mask: u16) {
    port::write_u8(PIC1_DATA, mask as u8);
    port::write_u8(PIC2_DATA, (mask >> 8) as u8);
}

/// Clears mask bits with interrupts off (the handlers set bits concurrently).
fn unmask(lines: u16) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        write_pic_mask(PIC_MASK.fetch_and(!lines, Ordering::Relaxed) & !lines);
    });
}

/// Lets `line` (a PCI device's legacy interrupt line, 0–15) wake the idle loop.
/// Returns false for lines the PIC does not have.
pub fn enable_device_irq(line: u8) -> bool {
    if line >= 16 || line == IRQ_TIMER || line == IRQ_CASCADE || line == IRQ_COM1 {
        return false;
    }
    DEVICE_LINES.fetch_or(1 << line, Ordering::Relaxed);
    unmask((1 << line) | (1 << IRQ_CASCADE));
    true
}

/// Whether `line` fired since the last call; it stays masked until
/// [`rearm_device_irq`].
pub fn take_device_irq(line: u8) -> bool {
    line < 16 && FIRED.fetch_and(!(1 << line), Ordering::Relaxed) & (1 << line) != 0
}

/// Unmasks `line` after its driver acknowledged the device.
pub fn rearm_device_irq(line: u8) {
    if line < 16 && DEVICE_LINES.load(Ordering::Relaxed) & (1 << line) != 0 {
        unmask(1 << line);
    }
}

/// Whether any device line fired and awaits its driver. The idle loop checks
/// this with interrupts off before `hlt`.
pub fn device_irq_pending() -> bool {
    FIRED.load(Ordering::Relaxed) != 0
        || MSI_FIRED.load(Ordering::Relaxed)
        || DISK_FIRED.load(Ordering::Relaxed)
}

static IDT: Lazy<InterruptDescriptorTable> = Lazy::new(|| {
    let mut idt = InterruptDescriptorTable::new();
    idt.divide_error.set_handler_fn(divide_error);
    idt.debug.set_handler_fn(debug);
    idt.non_maskable_interrupt
        .set_handler_fn(non_maskable_interrupt);
    idt.breakpoint.set_handler_fn(breakpoint);
    idt.overflow.set_handler_fn(overflow);
    idt.bound_range_exceeded
        .set_handler_fn(bound_range_exceeded);
    idt.invalid_opcode.set_handler_fn(invalid_opcode);
    idt.device_not_available
        .set_handler_fn(device_not_available);
    // SAFETY: the IST slot holds a dedicated stack used by nothing else (gdt.rs).
    unsafe {
        idt.double_fault
            .set_handler_fn(double_fault)
            .set_stack_index(gdt::DOUBLE_FAULT_IST);
    }
    idt.invalid_tss.set_handler_fn(invalid_tss);
    idt.segment_not_present.set_handler_fn(segment_not_present);
    idt.stack_segment_fault.set_handler_fn(stack_segment_fault);
    idt.general_protection_fault
        .set_handler_fn(general_protection_fault);
    idt.page_fault.set_handler_fn(page_fault);
    idt.x87_floating_point.set_handler_fn(x87_floating_point);
    idt.alignment_check.set_handler_fn(alignment_check);
    idt.machine_check.set_handler_fn(machine_check);
    idt.simd_floating_point.set_handler_fn(simd_floating_point);
    idt.virtualization.set_handler_fn(virtualization);
    idt.cp_protection_exception.set_handler_fn(cp_protection);
    idt.hv_injection_exception.set_handler_fn(hv_injection);
    idt.vmm_communication_exception
        .set_handler_fn(vmm_communication);
    idt.security_exception.set_handler_fn(security_exception);
    for (line, handler) in (0u8..).zip(IRQ_HANDLERS) {
        idt[IRQ_BASE + line].set_handler_fn(handler);
    }
    idt[MSI_VECTOR].set_handler_fn(msi);
    idt[DISK_VECTOR].set_handler_fn(disk_msi);
    idt
});

/// Installs the exception handlers. Interrupts stay off until [`start_timer`].
pub fn init() {
    IDT.load();
}

/// Remaps the PIC past the exception vectors, unmasks the timer and COM1, starts
/// the PIT at [`TICK_HZ`] and enables interrupts.
pub fn start_timer() {
    // ICW1: initialise, expect ICW4; ICW2: vector base; ICW3: cascade on IRQ 2;
    // ICW4: 8086 mode.
    port::write_u8(PIC1_COMMAND, 0x11);
    port::write_u8(PIC2_COMMAND, 0x11);
    port::write_u8(PIC1_DATA, IRQ_BASE);
    port::write_u8(PIC2_DATA, IRQ_BASE + 8);
    port::write_u8(PIC1_DATA, 0x04);
    port::write_u8(PIC2_DATA, 0x02);
    port::write_u8(PIC1_DATA, 0x01);
    port::write_u8(PIC2_DATA, 0x01);
    write_pic_mask(0xffff);
    unmask((1 << IRQ_TIMER) | (1 << IRQ_COM1));

    let divisor = (PIT_HZ / TICK_HZ) as u16;
    // Channel 0, low then high byte, mode 2 (rate generator).
    port::write_u8(0x43, 0x34);
    port::write_u8(0x40, divisor as u8);
    port::write_u8(0x40, (divisor >> 8) as u8);
    x86_64::instructions::interrupts::enable();
}
