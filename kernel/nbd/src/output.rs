//! The bytes a connection has produced and its transport has not yet sent.
//!
//! Small pieces (headers, option replies) are packed together so that a reply's header
//! and a short payload leave in one segment; large read data stays in the buffer the
//! backend filled and is referenced, not copied.
//!
//! Once sent, a read buffer is kept for the connection's next read of the same size
//! (up to [`SPARE_BYTES`], while the connection has requests in flight): a backend
//! overwrites every byte of a read buffer, zero runs included, so a buffer still
//! holding the last reply serves as well as a new one, which the allocator would
//! clear first. Spares belong to one connection: none carries one client's data
//! to another.

use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;
use blockdev::IoBuf;

/// Pieces at most this long are copied into the packed buffer.
const COPY_LIMIT: usize = 4096;
/// A packed buffer grows to at most this size before a new one starts.
const PACK_LIMIT: usize = 64 * 1024;
/// Most bytes of sent read buffers a connection keeps for its next reads.
pub const SPARE_BYTES: usize = 512 * 1024;

enum Segment {
    Packed(Vec<u8>),
    Shared {
        buf: Arc<IoBuf>,
        start: usize,
        end: usize,
    },
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        match self {
            Segment::Packed(bytes) => bytes,
            Segment::Shared { buf, start, end } => &buf[*start..*end],
        }
    }
}

/// A queue of outgoing bytes.
#[derive(Default)]
pub struct OutQueue {
    segments: VecDeque<Segment>,
    /// Bytes of the front segment already sent.
    sent: usize,
    len: usize,
    /// Sent read buffers, for the next reads.
    spare: Vec<IoBuf>,
}

impl OutQueue {
    /// Appends bytes, copying them.
    pub fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.len += bytes.len();
        if let Some(Segment::Packed(last)) = self.segments.back_mut()
            && last.len() + bytes.len() <= PACK_LIMIT
        {
            last.extend_from_slice(bytes);
            return;
        }
        self.segments.push_back(Segment::Packed(bytes.to_vec()));
    }

    /// Appends `buf[start..end]`, by reference unless it is short.
    pub fn push_shared(&mut self, buf: &Arc<IoBuf>, start: usize, end: usize) {
        if end - start <= COPY_LIMIT {
            self.push(&buf[start..end]);
            return;
        }
        self.len += end - start;
        self.segments.push_back(Segment::Shared {
            buf: Arc::clone(buf),
            start,
            end,
        });
    }

    /// A buffer of `len` bytes for a read: a spare one (its contents stale) or a new,
    /// zeroed one.
    pub fn read_buffer(&mut self, len: usize) -> IoBuf {
        match self.spare.iter().position(|buf| buf.len() == len) {
            Some(index) => self.spare.swap_remove(index),
            None => IoBuf::zeroed(len),
        }
    }

    /// Keeps `buf` for a later read if nothing else refers to it and there is room.
    pub fn recycle(&mut self, buf: Arc<IoBuf>) {
        if let Ok(buf) = Arc::try_unwrap(buf) {
            let kept: usize = self.spare.iter().map(|spare| spare.len()).sum();
            if kept + buf.len() <= SPARE_BYTES {
                self.spare.push(buf);
            }
        }
    }

    /// Frees the spare buffers (the connection went idle: it may stay so for long).
    pub fn release_spares(&mut self) {
        self.spare = Vec::new();
    }

    /// Bytes waiting to be sent.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The waiting bytes as consecutive slices, oldest first.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        self.segments.iter().enumerate().map(|(index, segment)| {
            let bytes = segment.bytes();
            if index == 0 {
                &bytes[self.sent..]
            } else {
                bytes
            }
        })
    }

    /// Drops the first `count` waiting bytes (they were sent).
    pub fn consume(&mut self, mut count: usize) {
        count = count.min(self.len);
        self.len -= count;
        while count > 0 {
            let front = self.segments[0].bytes().len() - self.sent;
            if count < front {
                self.sent += count;
                return;
            }
            count -= front;
            self.sent = 0;
            if let Some(Segment::Shared { buf, .. }) = self.segments.pop_front() {
                self.recycle(buf);
            }
        }
    }

    /// Forgets everything (the peer is gone).
    pub fn clear(&mut self) {
        self.segments.clear();
        self.sent = 0;
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(queue: &OutQueue) -> Vec<u8> {
        queue.chunks().flatten().copied().collect()
    }

    #[test]
    fn packs_small_pieces_and_shares_large_ones() {
        let mut queue = OutQueue::default();
        queue.push(b"head");
        queue.push(b"er");
        let mut data = IoBuf::zeroed(8192);
        data[0] = 7;
        let data = Arc::new(data);
        queue.push_shared(&data, 0, 8192);
        queue.push_shared(&data, 0, 512);
        assert_eq!(queue.chunks().count(), 3);
        assert_eq!(queue.len(), 6 + 8192 + 512);
        let all = collect(&queue);
        assert_eq!(&all[..6], b"header");
        assert_eq!(all[6], 7);

        queue.consume(3);
        assert_eq!(collect(&queue), all[3..]);
        queue.consume(3 + 100);
        assert_eq!(collect(&queue), all[106..]);
        queue.consume(10_000);
        assert!(queue.is_empty());
        assert_eq!(queue.chunks().count(), 0);
    }

    #[test]
    fn sent_read_buffers_serve_the_next_reads_of_their_size() {
        let mut queue = OutQueue::default();
        let fresh = queue.read_buffer(8192);
        assert!(fresh.iter().all(|&byte| byte == 0));
        let mut data = fresh;
        data.fill(7);
        let at = data.as_ptr();
        let data = Arc::new(data);
        queue.push_shared(&data, 0, 8192);
        // Still referenced by the queue: not kept.
        queue.recycle(data);
        assert_ne!(queue.read_buffer(8192).as_ptr(), at);
        queue.consume(8192);
        assert_eq!(queue.read_buffer(4096).len(), 4096);
        let reused = queue.read_buffer(8192);
        assert_eq!(reused.as_ptr(), at);
        assert!(reused.iter().all(|&byte| byte == 7));
        assert!(queue.read_buffer(8192).iter().all(|&byte| byte == 0));
    }

    #[test]
    fn spare_buffers_are_bounded() {
        let mut queue = OutQueue::default();
        let size = SPARE_BYTES / 4;
        for _ in 0..6 {
            queue.recycle(Arc::new(IoBuf::zeroed(size)));
        }
        assert_eq!(queue.spare.len(), 4);
        queue.recycle(Arc::new(IoBuf::zeroed(512)));
        assert_eq!(queue.spare.len(), 4);
    }
}
