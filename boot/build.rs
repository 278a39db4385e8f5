//! Turns the kernel ELF (an artifact dependency built for bare metal) into bootable
//! BIOS and UEFI disk images and tells the crate where they are.

use std::path::PathBuf;

use bootloader::BootConfig;
use bootloader_boot_config::LevelFilter;

fn main() {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel = PathBuf::from(
        std::env::var_os("CARGO_BIN_FILE_KERNEL_kernel").expect("kernel artifact dependency"),
    );
    let config = boot_config();

    let bios = out_dir.join("bios.img");
    bootloader::BiosBoot::new(&kernel)
        .set_boot_config(&config)
        .create_disk_image(&bios)
        .expect("building the BIOS image");
    let uefi = out_dir.join("uefi.img");
    bootloader::UefiBoot::new(&kernel)
        .set_boot_config(&config)
        .create_disk_image(&uefi)
        .expect("building the UEFI image");

    println!("cargo:rustc-env=THINBOX_BIOS_IMAGE={}", bios.display());
    println!("cargo:rustc-env=THINBOX_UEFI_IMAGE={}", uefi.display());
    println!("cargo:rustc-env=THINBOX_KERNEL_ELF={}", kernel.display());
}

/// The serial line is the appliance's console: the bootloader's step-by-step log would
/// bury the kernel's banner, so it reports errors only (on serial and, for machines with
/// a screen, on the framebuffer it still sets up for the UEFI path).
fn boot_config() -> BootConfig {
    let mut config = BootConfig::default();
    config.log_level = LevelFilter::Error;
    config.serial_logging = true;
    config.frame_buffer_logging = true;
    config
}
