//! Interrupt handling: every CPU exception is fatal and reported on the console;
//! the legacy PIC delivers the PIT tick (which wakes the idle loop) and the COM1
//! receive interrupt (which wakes it when a key arrives).

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Lazy;
use x86_64::registers::control::Cr2;
use x86_64::structures::idt::{InterruptDescriptorTable, InterruptStackFrame, PageFaultErrorCode};

use super::{gdt, port, serial::Serial};

/// Vector of IRQ 0 after remapping the PIC (IRQ n is vector 32 + n).
const IRQ_BASE: u8 = 32;
const IRQ_TIMER: u8 = 0;
const IRQ_COM1: u8 = 4;
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

/// Timer interrupts since [`init`].
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
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

extern "x86-interrupt" fn timer(_frame: InterruptStackFrame) {
    TICKS.fetch_add(1, Ordering::Relaxed);
    port::write_u8(PIC1_COMMAND, END_OF_INTERRUPT);
}

extern "x86-interrupt" fn com1(_frame: InterruptStackFrame) {
    // The main loop reads the byte; this interrupt only ends a `hlt`.
    port::write_u8(PIC1_COMMAND, END_OF_INTERRUPT);
}

/// Stray interrupts from either PIC (IRQ 7 / 15 spurious ones included) are
/// acknowledged and ignored.
extern "x86-interrupt" fn stray_master(_frame: InterruptStackFrame) {
    port::write_u8(PIC1_COMMAND, END_OF_INTERRUPT);
}

extern "x86-interrupt" fn stray_slave(_frame: InterruptStackFrame) {
    port::write_u8(PIC2_COMMAND, END_OF_INTERRUPT);
    port::write_u8(PIC1_COMMAND, END_OF_INTERRUPT);
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
    for irq in 0..16u8 {
        let entry = &mut idt[IRQ_BASE + irq];
        let handler = match irq {
            IRQ_TIMER => timer,
            IRQ_COM1 => com1,
            _ if irq < 8 => stray_master,
            _ => stray_slave,
        };
        entry.set_handler_fn(handler);
    }
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
    port::write_u8(PIC1_DATA, !((1 << IRQ_TIMER) | (1 << IRQ_COM1)));
    port::write_u8(PIC2_DATA, 0xff);

    let divisor = (PIT_HZ / TICK_HZ) as u16;
    // Channel 0, low then high byte, mode 2 (rate generator).
    port::write_u8(0x43, 0x34);
    port::write_u8(0x40, divisor as u8);
    port::write_u8(0x40, (divisor >> 8) as u8);
    x86_64::instructions::interrupts::enable();
}
