//! Helpers for the snapshot tests: disks from Linux's fixture images, the fixtures'
//! page rule, and snapshots over handles of shared disks.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command as Process;

use blockdev::{BlockDevice, MemDisk};
use snapshot::{Snapshot, StoreKind};

/// Bytes of one fixture page.
pub const PAGE: usize = 4096;

/// The fixture directory (Linux-written images).
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fixture image (`NAME.img.gz`) decompressed into a memory disk.
pub fn fixture_disk(name: &str) -> MemDisk {
    let path = fixture_dir().join(format!("{name}.img.gz"));
    let output = Process::new("gzip")
        .arg("-dc")
        .arg(&path)
        .output()
        .expect("gzip runs");
    assert!(output.status.success(), "gunzip {}", path.display());
    disk_from(&output.stdout)
}

pub fn disk_from(bytes: &[u8]) -> MemDisk {
    let disk = MemDisk::new((bytes.len() / 512) as u64);
    disk.write_at(0, bytes);
    disk
}

/// Page `index` tagged `tag`: `"T page %06d "` repeated over 4 KiB.
pub fn page(tag: char, index: usize) -> Vec<u8> {
    let text = format!("{tag} page {index:06} ");
    text.bytes().cycle().take(PAGE).collect()
}

/// The sha256 of `bytes` in hex, from `sha256sum`.
pub fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Process::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum runs");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let output = child.wait_with_output().unwrap();
    String::from_utf8(output.stdout).unwrap()[..64].to_string()
}

/// Whole contents of a memory disk.
pub fn contents(disk: &MemDisk) -> Vec<u8> {
    let mut out = vec![0u8; disk.info().bytes() as usize];
    disk.read_at(0, &mut out);
    out
}

/// A snapshot over handles of `origin` and `cow`, covering the whole origin.
pub fn open(origin: &MemDisk, cow: &MemDisk, kind: StoreKind, chunk: u32) -> Snapshot {
    let length = origin.info().sectors;
    Snapshot::open(
        Box::new(origin.handle()),
        Box::new(cow.handle()),
        kind,
        chunk,
        length,
    )
    .unwrap_or_else(|error| panic!("open: {error}"))
    .0
}

/// The snapshot's whole view, read in pieces of `piece` bytes.
pub fn view(snapshot: &mut Snapshot, sectors: u64, merging: bool) -> Vec<u8> {
    let mut out = vec![0u8; sectors as usize * 512];
    for (n, part) in out.chunks_mut(64 * 1024).enumerate() {
        let sector = n as u64 * 128;
        if merging {
            snapshot.merge_read(sector, part).unwrap();
        } else {
            snapshot.read(sector, part).unwrap();
        }
    }
    out
}

pub const PERSISTENT: StoreKind = StoreKind::Persistent { overflow: false };
