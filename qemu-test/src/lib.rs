//! Boots the thinbox appliance under QEMU and drives its serial console.

pub use thinbox_boot::{BIOS_IMAGE, UEFI_IMAGE};
