//! The thinbox unikernel: brings up the machine, finds the disks and runs the
//! serial console.

#![no_std]
#![no_main]
#![feature(abi_x86_interrupt)]

extern crate alloc;
mod acpi;
mod arch;
mod dma;
mod drivers;
mod memory;
mod mmio;
mod net;
mod pci;
mod platform;

use alloc::rc::Rc;
use bootloader_api::config::Mapping;
use bootloader_api::{BootInfo, BootloaderConfig, entry_point};
use core::cell::RefCell;
use core::fmt::Write;
use core::panic::PanicInfo;
use x86_64::instructions::interrupts;

use arch::serial::Serial;
use arch::{clock, gdt, power};
use console::Console;
use net::NetPoll;

/// Physical memory mapped at an offset the bootloader chooses (all RAM and at least
/// the first 4 GiB, so MMIO below 4 GiB is reachable); a big stack for deep
/// metadata code.
pub static BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    config.mappings.physical_memory = Some(Mapping::Dynamic);
    config.kernel_stack_size = 512 * 1024;
    config
};

entry_point!(kernel_main, config = &BOOTLOADER_CONFIG);

fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
    let mut serial = Serial::init();
    gdt::init();
    arch::interrupts::init();
    let Some(phys_offset) = boot_info.physical_memory_offset.into_option() else {
        panic!("the bootloader did not map physical memory");
    };
    if let Err(why) = memory::init(&mut boot_info.memory_regions, phys_offset) {
        panic!("memory setup failed: {why}");
    }
    let calibration = clock::init();
    arch::interrupts::start_timer();
    let timer_ticks = wait_for_timer();

    let (heap_used, heap_free) = memory::heap_usage();
    let (_, frames) = memory::frame_usage();
    let _ = write!(
        serial,
        "thinbox: heap {} MiB, {} DMA frames, TSC {} MHz ({}){}\r\n",
        (heap_used + heap_free) >> 20,
        frames,
        clock::tsc_hz() / 1_000_000,
        match calibration {
            clock::Calibration::Pit => "measured against the PIT",
            clock::Calibration::Cpuid => "from CPUID: PIT calibration failed",
            clock::Calibration::Guess => "guessed: PIT calibration failed, times are approximate",
        },
        if timer_ticks {
            ""
        } else {
            ", no timer interrupt (idle loop polls)"
        }
    );

    match arch::random::probe() {
        Ok(source) => {
            let _ = write!(
                serial,
                "thinbox: randomness from {}, health check passed\r\n",
                source.name()
            );
        }
        Err(why) => {
            let _ = write!(serial, "thinbox: no hardware randomness: {why}\r\n");
        }
    }

    let acpi = match boot_info.rsdp_addr.into_option().map(acpi::parse) {
        Some(Ok(tables)) => tables,
        Some(Err(why)) => {
            let _ = write!(serial, "thinbox: ignoring ACPI tables: {why}\r\n");
            acpi::AcpiInfo::default()
        }
        None => acpi::AcpiInfo::default(),
    };
    if let Some(soft_off) = acpi.soft_off {
        power::set_acpi_soft_off(soft_off);
    }
    let mut pci = pci::Pci::new(&acpi.ecam);
    let storage = drivers::discover(&mut pci, &mut serial);
    let disks = storage.disks;
    let _ = write!(
        serial,
        "thinbox: PCI through {}, {} disk{}\r\n",
        pci.mechanism,
        disks.len(),
        if disks.len() == 1 { "" } else { "s" }
    );

    let network = net::start(&mut pci, &mut serial).map(|stack| Rc::new(RefCell::new(stack)));
    let platform = platform::KernelPlatform {
        nvme_controllers: storage.nvme_controllers,
        network: network.clone().map(net::NetHandle),
    };
    match arch::rtc::init() {
        Some(now) => {
            let now = dm::tls::clock::utc_text(now);
            let _ = write!(serial, "thinbox: wall clock {now} from the RTC\r\n");
        }
        None => {
            let _ = write!(
                serial,
                "thinbox: the RTC holds no valid time: client certificates cannot be checked\r\n"
            );
        }
    }
    let mut mapper = dm::DeviceMapper::new(disks);
    mapper.set_wall_clock(arch::rtc::unix_time);
    let devices = Rc::new(RefCell::new(mapper));
    let mut nbd_server = nbd::Server::new(dm::NbdBackend::new(Rc::clone(&devices)), NBD_LIMITS);
    let mut console = Console::new(platform, Rc::clone(&devices));
    let _ = write!(serial, "thinbox {} ready\r\n", env!("CARGO_PKG_VERSION"));
    console.start(&mut serial);
    let mut last_tick = arch::interrupts::ticks();
    // When the loop last found NBD requests waiting for their disks and nothing else
    // to do, and has found so on every turn since.
    let mut waiting_since = None;
    loop {
        // The UART is read when it interrupted, and it and the RTC once per tick, not
        // on every turn: each read of a port traps into the emulator and takes the
        // lock its I/O thread needs for the disks and the NIC.
        let tick = arch::interrupts::ticks();
        let new_tick = tick != last_tick || !timer_ticks;
        last_tick = tick;
        if new_tick {
            arch::rtc::watch_second_edge();
        }
        if arch::interrupts::take_serial_input() || new_tick {
            while let Some(byte) = serial.try_read() {
                console.input(byte, &mut serial);
            }
        }
        arch::interrupts::clear_disk_irq();
        let console_busy = console.poll(&mut serial);
        let net = network.as_ref().map_or(NetPoll::Idle, |stack| {
            stack.borrow_mut().poll(&mut nbd_server)
        });
        if net != NetPoll::Waiting || console_busy {
            waiting_since = None;
        }
        if console_busy || net == NetPoll::Busy {
            continue;
        }
        // Requests wait for disks: keep polling for a short while (a request that
        // finishes meanwhile costs no wake-up of a halted CPU, which the host must
        // schedule again), then halt if those disks will interrupt.
        if net == NetPoll::Waiting {
            let now = clock::now_ns();
            let since = *waiting_since.get_or_insert(now);
            if now - since < POLL_BEFORE_HALT_NS || !devices.borrow_mut().arm_disk_wakeups() {
                continue;
            }
        }
        let net_quiet = network
            .as_ref()
            .is_none_or(|stack| stack.borrow_mut().ready_to_sleep());
        if net_quiet {
            idle(&mut serial, timer_ticks);
        }
    }
}

/// How long the loop polls disks that hold NBD requests before it halts until one
/// interrupts.
const POLL_BEFORE_HALT_NS: u64 = 100_000;

/// Per-connection NBD limits: nbdcopy's 64 requests of 256 KiB fit.
const NBD_LIMITS: nbd::Limits = nbd::Limits {
    max_requests: 64,
    max_buffered_bytes: 16 << 20,
};

/// Waits up to 100 ms for the first timer interrupt; without one the idle loop
/// must not `hlt`.
fn wait_for_timer() -> bool {
    let start = arch::interrupts::ticks();
    let deadline = clock::now_ns() + 100_000_000;
    while clock::now_ns() < deadline {
        if arch::interrupts::ticks() != start {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// Sleeps until an interrupt (timer tick, serial input, NIC) unless input is
/// already waiting. Interrupts are off between the check and `hlt` (whose `sti` shadow
/// covers the gap), so a byte arriving in between still wakes the CPU.
fn idle(serial: &mut Serial, timer_ticks: bool) {
    if !timer_ticks {
        core::hint::spin_loop();
        return;
    }
    interrupts::disable();
    if serial.has_input() || arch::interrupts::device_irq_pending() {
        interrupts::enable();
    } else {
        clock::halted(interrupts::enable_and_hlt);
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    interrupts::disable();
    let mut serial = Serial::get();
    let _ = write!(serial, "\r\nKERNEL PANIC: {}", info.message());
    if let Some(location) = info.location() {
        let _ = write!(serial, " at {location}");
    }
    let _ = serial.write_str("\r\n");
    power::exit_failure()
}
