//! Request buffers: page-aligned, physically contiguous when the heap is, and sized
//! in whole sectors, so drivers can hand them to DMA engines without copying.

use alloc::vec::Vec;
use core::fmt;
use core::ops::{Deref, DerefMut};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::SECTOR_SIZE;

/// Alignment and allocation unit of [`IoBuf`] storage.
const PAGE: usize = 4096;

#[derive(Clone, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4096))]
struct Page([u8; PAGE]);

/// A zero-initialised, 4 KiB-aligned byte buffer whose length is a whole number of
/// sectors.
#[derive(Clone, Default)]
pub struct IoBuf {
    pages: Vec<Page>,
    len: usize,
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    ///
    /// # Panics
    /// If `len` is not a multiple of [`SECTOR_SIZE`]: that is a caller bug, never a
    /// consequence of outside input.
    pub fn zeroed(len: usize) -> Self {
        assert!(
            len.is_multiple_of(SECTOR_SIZE),
            "IoBuf length {len} is not whole sectors"
        );
        let count = len.div_ceil(PAGE);
        // Zeroed allocation: memory the allocator knows to be zero (fresh pages from
        // the host) is not written a second time.
        let pages = Page::new_vec_zeroed(count).unwrap_or_else(|_| {
            alloc::alloc::handle_alloc_error(
                core::alloc::Layout::array::<Page>(count).expect("buffer size fits memory"),
            )
        });
        IoBuf { pages, len }
    }

    /// A buffer for `sectors` sectors.
    pub fn with_sectors(sectors: usize) -> Self {
        Self::zeroed(sectors * SECTOR_SIZE)
    }

    /// The empty buffer that flush and discard requests carry.
    pub fn empty() -> Self {
        Self::default()
    }

    /// A copy of `data`, whose length must be whole sectors.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// A buffer of `len` bytes (whole sectors) in this one's storage when it holds
    /// enough pages, else a fresh zeroed one. The bytes it held are kept, not zeroed:
    /// this is for buffers about to be overwritten whole (a read recycling the
    /// buffer of a finished write).
    pub fn reuse(mut self, len: usize) -> Self {
        if len.div_ceil(PAGE) > self.pages.len() {
            return Self::zeroed(len);
        }
        assert!(
            len.is_multiple_of(SECTOR_SIZE),
            "IoBuf length {len} is not whole sectors"
        );
        self.len = len;
        self
    }

    /// Length in sectors.
    pub fn sectors(&self) -> u64 {
        (self.len / SECTOR_SIZE) as u64
    }
}

/// Buffers are equal when their bytes are (the storage beyond them aside).
impl PartialEq for IoBuf {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for IoBuf {}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.pages.as_bytes()[..self.len]
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.pages.as_mut_bytes()[..self.len]
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_sized() {
        let buf = IoBuf::with_sectors(9);
        assert_eq!(buf.len(), 9 * 512);
        assert_eq!(buf.as_ptr() as usize % PAGE, 0);
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(IoBuf::empty().len(), 0);
    }

    #[test]
    fn reuse_keeps_the_storage_and_grows_when_it_must() {
        let mut buf = IoBuf::with_sectors(8);
        buf.fill(7);
        let page = buf.as_ptr();
        let smaller = buf.reuse(1024);
        assert_eq!((smaller.len(), smaller.as_ptr()), (1024, page));
        assert!(smaller.iter().all(|&b| b == 7));
        let again = smaller.reuse(4096);
        assert_eq!((again.len(), again.as_ptr()), (4096, page));
        let bigger = again.reuse(8192);
        assert_eq!(bigger.len(), 8192);
        assert!(bigger.iter().all(|&b| b == 0));
        assert_eq!(IoBuf::empty().reuse(512), IoBuf::with_sectors(1));
    }

    #[test]
    #[should_panic(expected = "not whole sectors")]
    fn rejects_partial_sectors() {
        let _ = IoBuf::zeroed(100);
    }
}
