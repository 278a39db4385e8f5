//! Disk image files for appliances: sparse, so a "4 GiB" test disk costs only the
//! blocks the guest writes.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

/// Creates (or truncates to) a sparse, zero-filled disk image of `size` bytes.
pub fn create_disk(path: &Path, size: u64) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?
        .set_len(size)
}

/// A temporary directory for one appliance's disk images, removed when dropped (after
/// the appliance using it, so declare it first).
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> io::Result<Scratch> {
        let dir = tempfile::Builder::new().prefix("thinbox-").tempdir()?;
        Ok(Scratch { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Creates a sparse disk image `name` of `size` bytes in this directory.
    pub fn disk(&self, name: &str, size: u64) -> io::Result<PathBuf> {
        let path = self.dir.path().join(name);
        create_disk(&path, size)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn disks_are_sparse_and_sized() {
        let scratch = Scratch::new().unwrap();
        let path = scratch.disk("data.img", 4 << 30).unwrap();
        let metadata = std::fs::metadata(&path).unwrap();
        assert_eq!(metadata.len(), 4 << 30);
        assert!(metadata.blocks() * 512 < 1 << 20, "not sparse");
    }

    #[test]
    fn scratch_directory_goes_away() {
        let scratch = Scratch::new().unwrap();
        let dir = scratch.path().to_path_buf();
        scratch.disk("a.img", 1 << 20).unwrap();
        drop(scratch);
        assert!(!dir.exists());
    }
}
