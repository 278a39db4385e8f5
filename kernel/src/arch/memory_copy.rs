//! The kernel's `memcpy` and `memset`, in place of the `rep movsq` / `rep stosq`
//! loops the compiler's builtins use on this target (it has no SSE).
//!
//! Under an emulator that translates x86 code (QEMU's TCG), every iteration of a
//! `rep` string instruction leaves and re-enters translated code, so each 8 bytes
//! cost tens of host instructions; the network path copies every byte twice, and
//! that was the largest single cost in its profile. These loops move 64 bytes per
//! iteration through registers: one translated block per iteration. On hardware
//! they run at about the speed of the string instructions for the sizes the
//! kernel copies (frames, 4 KiB to 256 KiB buffers).
//!
//! Both are written in assembly: a Rust loop would be recognised as a copy and
//! turned back into a call to `memcpy`.

use core::arch::asm;
use core::ffi::c_void;

/// Copies `count` bytes from `source` to `destination`; the ranges do not overlap.
///
/// # Safety
/// The C contract: `source` is readable and `destination` writable for `count`
/// bytes, and they do not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(
    destination: *mut c_void,
    source: *const c_void,
    count: usize,
) -> *mut c_void {
    // SAFETY: the caller guarantees the ranges are valid and disjoint; the loops
    // touch exactly `count` bytes of each, moving forward.
    unsafe {
        asm!(
            "cmp {n}, 64",
            "jb 3f",
            "2:",
            "mov {a}, [{s}]",
            "mov {b}, [{s} + 8]",
            "mov [{d}], {a}",
            "mov [{d} + 8], {b}",
            "mov {a}, [{s} + 16]",
            "mov {b}, [{s} + 24]",
            "mov [{d} + 16], {a}",
            "mov [{d} + 24], {b}",
            "mov {a}, [{s} + 32]",
            "mov {b}, [{s} + 40]",
            "mov [{d} + 32], {a}",
            "mov [{d} + 40], {b}",
            "mov {a}, [{s} + 48]",
            "mov {b}, [{s} + 56]",
            "mov [{d} + 48], {a}",
            "mov [{d} + 56], {b}",
            "add {s}, 64",
            "add {d}, 64",
            "sub {n}, 64",
            "cmp {n}, 64",
            "jae 2b",
            "3:",
            "cmp {n}, 8",
            "jb 5f",
            "4:",
            "mov {a}, [{s}]",
            "mov [{d}], {a}",
            "add {s}, 8",
            "add {d}, 8",
            "sub {n}, 8",
            "cmp {n}, 8",
            "jae 4b",
            "5:",
            "test {n}, {n}",
            "jz 7f",
            "6:",
            "mov {a:l}, byte ptr [{s}]",
            "mov byte ptr [{d}], {a:l}",
            "inc {s}",
            "inc {d}",
            "dec {n}",
            "jnz 6b",
            "7:",
            s = inout(reg) source => _,
            d = inout(reg) destination => _,
            n = inout(reg) count => _,
            a = out(reg) _,
            b = out(reg) _,
            options(nostack),
        );
    }
    destination
}

/// Sets `count` bytes at `destination` to the low byte of `value`.
///
/// # Safety
/// The C contract: `destination` is writable for `count` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(destination: *mut c_void, value: i32, count: usize) -> *mut c_void {
    let pattern = u64::from(value as u8) * 0x0101_0101_0101_0101;
    // SAFETY: the caller guarantees the range is writable; the loops write exactly
    // `count` bytes of it, moving forward.
    unsafe {
        asm!(
            "cmp {n}, 64",
            "jb 3f",
            "2:",
            "mov [{d}], {p}",
            "mov [{d} + 8], {p}",
            "mov [{d} + 16], {p}",
            "mov [{d} + 24], {p}",
            "mov [{d} + 32], {p}",
            "mov [{d} + 40], {p}",
            "mov [{d} + 48], {p}",
            "mov [{d} + 56], {p}",
            "add {d}, 64",
            "sub {n}, 64",
            "cmp {n}, 64",
            "jae 2b",
            "3:",
            "cmp {n}, 8",
            "jb 5f",
            "4:",
            "mov [{d}], {p}",
            "add {d}, 8",
            "sub {n}, 8",
            "cmp {n}, 8",
            "jae 4b",
            "5:",
            "test {n}, {n}",
            "jz 7f",
            "6:",
            "mov byte ptr [{d}], {p:l}",
            "inc {d}",
            "dec {n}",
            "jnz 6b",
            "7:",
            d = inout(reg) destination => _,
            n = inout(reg) count => _,
            p = in(reg) pattern,
            options(nostack),
        );
    }
    destination
}
