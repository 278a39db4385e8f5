//! Turns the kernel ELF (an artifact dependency built for bare metal) into bootable
//! BIOS and UEFI disk images and tells the crate where they are.

use std::path::PathBuf;

fn main() {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel = PathBuf::from(
        std::env::var_os("CARGO_BIN_FILE_KERNEL_kernel").expect("kernel artifact dependency"),
    );

    let bios = out_dir.join("bios.img");
    bootloader::BiosBoot::new(&kernel)
        .create_disk_image(&bios)
        .expect("building the BIOS image");
    let uefi = out_dir.join("uefi.img");
    bootloader::UefiBoot::new(&kernel)
        .create_disk_image(&uefi)
        .expect("building the UEFI image");

    println!("cargo:rustc-env=THINBOX_BIOS_IMAGE={}", bios.display());
    println!("cargo:rustc-env=THINBOX_UEFI_IMAGE={}", uefi.display());
    println!("cargo:rustc-env=THINBOX_KERNEL_ELF={}", kernel.display());
}
