//! The bytes a connection has produced and its transport has not yet sent.
//!
//! Small pieces (headers, option replies) are packed together so that a reply's header
//! and a short payload leave in one segment; large read data stays in the buffer the
//! backend filled and is referenced, not copied.

use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;
use blockdev::IoBuf;

/// Pieces at most this long are copied into the packed buffer.
const COPY_LIMIT: usize = 4096;
/// A packed buffer grows to at most this size before a new one starts.
const PACK_LIMIT: usize = 64 * 1024;

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
            self.segments.pop_front();
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
}
