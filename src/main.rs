fn main() {
    println!("{}", thinbox_boot::BIOS_IMAGE);
}
