//! The few ACPI facts the appliance needs: where PCIe configuration space is
//! (MCFG) and how to power off (FADT PM1 control ports plus the DSDT's `\_S5`
//! sleep type). A small reader of static tables; no AML interpreter.

use alloc::vec::Vec;

use crate::arch::power::AcpiSoftOff;
use crate::memory;

/// One PCIe ECAM window from the MCFG table.
#[derive(Clone, Copy, Debug)]
pub struct EcamWindow {
    /// Physical address of bus 0's configuration space in this window.
    pub base: u64,
    pub segment: u16,
    pub start_bus: u8,
    pub end_bus: u8,
}

/// What the tables told us.
#[derive(Debug, Default)]
pub struct AcpiInfo {
    pub ecam: Vec<EcamWindow>,
    pub soft_off: Option<AcpiSoftOff>,
}

const HEADER_LEN: usize = 36;

/// Firmware memory as bytes.
fn phys_bytes(phys: u64, len: usize) -> &'static [u8] {
    // SAFETY: ACPI tables sit in firmware-reserved or ACPI-reclaimable memory, which
    // the physical-memory mapping covers and nothing in the kernel writes.
    unsafe { core::slice::from_raw_parts(memory::phys_to_virt(phys), len) }
}

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// A whole table (header included) if its length and checksum are sane.
fn table(phys: u64) -> Option<&'static [u8]> {
    if phys == 0 {
        return None;
    }
    let len = u32_at(phys_bytes(phys, HEADER_LEN), 4) as usize;
    if !(HEADER_LEN..=16 << 20).contains(&len) {
        return None;
    }
    let bytes = phys_bytes(phys, len);
    checksum_ok(bytes).then_some(bytes)
}

/// Reads the tables reachable from the RSDP at `rsdp`.
pub fn parse(rsdp: u64) -> Result<AcpiInfo, &'static str> {
    let head = phys_bytes(rsdp, 20);
    if &head[..8] != b"RSD PTR " || !checksum_ok(head) {
        return Err("bad RSDP");
    }
    let revision = head[15];
    let (root, entry_len) = if revision >= 2 {
        let extended = phys_bytes(rsdp, 36);
        (u64_at(extended, 24), 8)
    } else {
        (u64::from(u32_at(head, 16)), 4)
    };
    let root = table(root).ok_or("bad RSDT/XSDT")?;
    let mut info = AcpiInfo::default();
    for entry in root[HEADER_LEN..].chunks_exact(entry_len) {
        let address = if entry_len == 8 {
            u64_at(entry, 0)
        } else {
            u64::from(u32_at(entry, 0))
        };
        let Some(table) = table(address) else {
            continue;
        };
        match &table[..4] {
            b"MCFG" => {
                info.ecam
                    .extend(table[HEADER_LEN + 8..].as_chunks::<16>().0.iter().map(|e| {
                        EcamWindow {
                            base: u64_at(e, 0),
                            segment: u16_at(e, 8),
                            start_bus: e[10],
                            end_bus: e[11],
                        }
                    }))
            }
            b"FACP" => info.soft_off = soft_off(table),
            _ => {}
        }
    }
    Ok(info)
}

/// PM1 control ports from the FADT and the `\_S5` sleep types from its DSDT.
fn soft_off(fadt: &[u8]) -> Option<AcpiSoftOff> {
    if fadt.len() < 116 {
        return None;
    }
    let dsdt = if fadt.len() >= 148 && u64_at(fadt, 140) != 0 {
        u64_at(fadt, 140)
    } else {
        u64::from(u32_at(fadt, 40))
    };
    let (sleep_type_a, sleep_type_b) = s5_sleep_types(table(dsdt)?)?;
    Some(AcpiSoftOff {
        pm1a_control: u16::try_from(u32_at(fadt, 64)).ok()?,
        pm1b_control: u16::try_from(u32_at(fadt, 68)).ok()?,
        sleep_type_a,
        sleep_type_b,
        smi_command: u16::try_from(u32_at(fadt, 48)).ok()?,
        acpi_enable: fadt[52],
    })
}

/// Finds `Name(\_S5, Package() { a, b, .. })` in AML and returns (a, b).
fn s5_sleep_types(dsdt: &[u8]) -> Option<(u8, u8)> {
    const NAME_OP: u8 = 0x08;
    const PACKAGE_OP: u8 = 0x12;
    let aml = &dsdt[HEADER_LEN..];
    let at = aml.windows(4).position(|w| w == b"_S5_")?;
    let named = (at >= 1 && aml[at - 1] == NAME_OP)
        || (at >= 2 && aml[at - 2] == NAME_OP && aml[at - 1] == b'\\');
    if !named || *aml.get(at + 4)? != PACKAGE_OP {
        return None;
    }
    // PkgLength: bits 6-7 of the lead byte count the bytes that follow it.
    let length_bytes = usize::from(aml.get(at + 5)? >> 6);
    let mut pos = at + 5 + 1 + length_bytes + 1; // past PkgLength and NumElements
    let mut integer = || -> Option<u8> {
        let (value, used) = match *aml.get(pos)? {
            0x00 => (0, 1),
            0x01 => (1, 1),
            0x0a => (*aml.get(pos + 1)?, 2),
            _ => return None,
        };
        pos += used;
        Some(value)
    };
    let a = integer()?;
    let b = integer()?;
    Some((a, b))
}
