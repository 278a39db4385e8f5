//! Locations of the appliance's boot images, built by this crate's build script.

/// BIOS (legacy boot) disk image of the kernel.
pub const BIOS_IMAGE: &str = env!("THINBOX_BIOS_IMAGE");
/// UEFI disk image of the kernel (boot it with OVMF).
pub const UEFI_IMAGE: &str = env!("THINBOX_UEFI_IMAGE");
/// The kernel ELF the images were made from (for symbolising backtraces).
pub const KERNEL_ELF: &str = env!("THINBOX_KERNEL_ELF");
