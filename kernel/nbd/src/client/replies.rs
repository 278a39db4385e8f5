//! The client's transmission phase: simple replies and structured chunks, each
//! checked against the request it answers before its payload is awaited. Read data
//! is not staged: its header names the place in the read's buffer it goes to.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::{
    Client, ClientError, MAX_DESCRIPTORS, MAX_READ_CHUNKS, Payload, Pending, PendingKind, Reply,
    StatusExtent, protocol, text,
};
use crate::wire::*;

/// Longest error message accepted (the spec's limit on strings).
const MAX_MESSAGE: u32 = 4096;

impl Client {
    pub(super) fn parse_reply(&mut self) -> Result<bool, ClientError> {
        let bytes = self.unparsed();
        if bytes.len() < 4 {
            return Ok(false);
        }
        match be_u32(bytes) {
            SIMPLE_REPLY_MAGIC => self.simple_reply(),
            STRUCTURED_REPLY_MAGIC => self.chunk(),
            magic => Err(protocol(format!("bad reply magic {magic:#010x}"))),
        }
    }

    /// How many unparsed bytes the next message needs before it can be parsed: a
    /// header, with the payload of anything but read data.
    pub(super) fn header_len(&self) -> usize {
        let bytes = self.unparsed();
        if bytes.len() < 4 {
            return 4;
        }
        match be_u32(bytes) {
            SIMPLE_REPLY_MAGIC => SIMPLE_REPLY_LEN,
            STRUCTURED_REPLY_MAGIC if bytes.len() >= CHUNK_HEADER_LEN => {
                match be_u16(&bytes[6..]) {
                    REPLY_TYPE_OFFSET_DATA => CHUNK_HEADER_LEN + 8,
                    _ => CHUNK_HEADER_LEN + be_u32(&bytes[16..]) as usize,
                }
            }
            _ => CHUNK_HEADER_LEN,
        }
    }

    /// Moves payload bytes that were staged in the input (they came with the
    /// handshake's last bytes) into their read's buffer.
    pub(super) fn staged_payload(&mut self) -> Result<bool, ClientError> {
        let (Some(payload), staged) = (self.payload, self.unparsed().len()) else {
            return Ok(false);
        };
        if staged == 0 {
            return Ok(false);
        }
        let count = payload.remaining.min(staged);
        let from = &self.input[self.consumed..self.consumed + count];
        if let Some(PendingKind::Read { data, .. }) = self
            .pending
            .get_mut(&payload.cookie)
            .map(|pending| &mut pending.kind)
        {
            data[payload.at..payload.at + count].copy_from_slice(from);
        }
        self.consumed += count;
        self.advance_payload(count)?;
        Ok(true)
    }

    /// `count` more bytes of the payload being received are in place; the reply is
    /// finished with the last byte of its last chunk.
    pub(super) fn advance_payload(&mut self, count: usize) -> Result<(), ClientError> {
        let Some(payload) = &mut self.payload else {
            return Ok(());
        };
        let count = count.min(payload.remaining);
        payload.at += count;
        payload.remaining -= count;
        if payload.remaining == 0 {
            let Payload { cookie, last, .. } = *payload;
            self.payload = None;
            if last {
                self.finish(cookie)?;
            }
        }
        Ok(())
    }

    fn pending_mut(&mut self, cookie: u64) -> Result<&mut Pending, ClientError> {
        self.pending.get_mut(&cookie).ok_or_else(|| {
            protocol(format!(
                "a reply for cookie {cookie}, which is not in flight"
            ))
        })
    }

    fn simple_reply(&mut self) -> Result<bool, ClientError> {
        let bytes = self.unparsed();
        if bytes.len() < SIMPLE_REPLY_LEN {
            return Ok(false);
        }
        let error = be_u32(&bytes[4..]);
        let cookie = be_u64(&bytes[8..]);
        let structured = self.structured;
        let pending = self.pending_mut(cookie)?;
        if error != 0 {
            self.consumed += SIMPLE_REPLY_LEN;
            self.pending.remove(&cookie);
            self.replies.push_back(Reply::Failed {
                cookie,
                error,
                message: String::new(),
            });
            return Ok(true);
        }
        let PendingKind::Read { .. } = pending.kind else {
            return Err(protocol("block status answered with a simple reply"));
        };
        if structured {
            return Err(protocol(
                "a read answered with a simple reply although structured replies were agreed",
            ));
        }
        let (offset, length) = (pending.offset, pending.length);
        place(pending, offset, u64::from(length))?;
        self.consumed += SIMPLE_REPLY_LEN;
        self.payload = Some(Payload {
            cookie,
            at: 0,
            remaining: length as usize,
            last: true,
        });
        Ok(true)
    }

    fn chunk(&mut self) -> Result<bool, ClientError> {
        let bytes = self.unparsed();
        if bytes.len() < CHUNK_HEADER_LEN {
            return Ok(false);
        }
        if !self.structured {
            return Err(protocol("a structured reply although none were agreed"));
        }
        let flags = be_u16(&bytes[4..]);
        let chunk_type = be_u16(&bytes[6..]);
        let cookie = be_u64(&bytes[8..]);
        let len = be_u32(&bytes[16..]);
        let contexts = self.queries.len();
        let pending = self.pending_mut(cookie)?;
        let limit = chunk_limit(chunk_type, pending, contexts)?;
        if len > limit {
            return Err(protocol(format!(
                "a chunk of type {chunk_type:#x} with {len} bytes of payload is too long"
            )));
        }
        if chunk_type == REPLY_TYPE_OFFSET_DATA {
            return self.data_chunk(cookie, flags, len);
        }
        if self.unparsed().len() < CHUNK_HEADER_LEN + len as usize {
            return Ok(false);
        }
        let start = self.consumed + CHUNK_HEADER_LEN;
        let payload = self.input[start..start + len as usize].to_vec();
        self.consumed += CHUNK_HEADER_LEN + len as usize;
        self.chunk_payload(cookie, chunk_type, &payload)?;
        if flags & REPLY_FLAG_DONE != 0 {
            self.finish(cookie)?;
        }
        Ok(true)
    }

    /// A data chunk's header and offset: its payload is then received into the
    /// read's buffer where the offset says.
    fn data_chunk(&mut self, cookie: u64, flags: u16, len: u32) -> Result<bool, ClientError> {
        if len < 9 {
            return Err(protocol("a data chunk without data"));
        }
        let Some(at) = self.unparsed().get(CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 8) else {
            return Ok(false);
        };
        let at = be_u64(at);
        let (start, end) = place(self.pending_mut(cookie)?, at, u64::from(len - 8))?;
        self.consumed += CHUNK_HEADER_LEN + 8;
        self.payload = Some(Payload {
            cookie,
            at: start as usize,
            remaining: (end - start) as usize,
            last: flags & REPLY_FLAG_DONE != 0,
        });
        Ok(true)
    }

    fn chunk_payload(
        &mut self,
        cookie: u64,
        chunk_type: u16,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        let ids = self.context_ids.clone();
        let pending = self.pending_mut(cookie)?;
        match chunk_type {
            REPLY_TYPE_NONE => {
                if !payload.is_empty() {
                    return Err(protocol("a NONE chunk carried a payload"));
                }
                Ok(())
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if payload.len() != 12 {
                    return Err(protocol("a hole chunk is not 12 bytes"));
                }
                let size = be_u32(&payload[8..]);
                if size == 0 {
                    return Err(protocol("a hole chunk of 0 bytes"));
                }
                let (start, end) = place(pending, be_u64(payload), u64::from(size))?;
                if let PendingKind::Read { data, .. } = &mut pending.kind {
                    data[start as usize..end as usize].fill(0);
                }
                Ok(())
            }
            REPLY_TYPE_BLOCK_STATUS => status_chunk(pending, &ids, payload),
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                let extra = if chunk_type == REPLY_TYPE_ERROR { 0 } else { 8 };
                if payload.len() < 6 {
                    return Err(protocol("an error chunk is too short"));
                }
                let error = be_u32(payload);
                let message_len = usize::from(be_u16(&payload[4..]));
                if error == 0 || payload.len() != 6 + message_len + extra {
                    return Err(protocol("an error chunk is malformed"));
                }
                if extra != 0 {
                    let at = be_u64(&payload[6 + message_len..]);
                    let inside = at
                        .checked_sub(pending.offset)
                        .is_some_and(|relative| relative < u64::from(pending.length));
                    if !inside {
                        return Err(protocol("an error chunk's offset is outside the request"));
                    }
                }
                let message = text(&payload[6..6 + message_len]);
                pending.error.get_or_insert((error, message));
                Ok(())
            }
            unknown if unknown & REPLY_TYPE_ERROR_BIT != 0 => {
                pending.error.get_or_insert((
                    EIO,
                    format!("the server sent an error of unknown type {unknown:#x}"),
                ));
                Ok(())
            }
            unknown => Err(protocol(format!("unknown chunk type {unknown:#x}"))),
        }
    }

    /// The last chunk of `cookie` arrived: the reply must be complete.
    fn finish(&mut self, cookie: u64) -> Result<(), ClientError> {
        let pending = self.pending.remove(&cookie).expect("checked by the caller");
        let reply = match (pending.error, pending.kind) {
            (Some((error, message)), _) => Reply::Failed {
                cookie,
                error,
                message,
            },
            (None, PendingKind::Read { data, covered, .. }) => {
                if covered != [(0, pending.length)] {
                    return Err(protocol("a read reply left part of the range out"));
                }
                Reply::Read {
                    cookie,
                    offset: pending.offset,
                    data,
                }
            }
            (None, PendingKind::Status { contexts }) => {
                for (index, extents) in contexts.iter().enumerate() {
                    if extents.is_none() && self.context_ids.iter().any(|&(_, i)| i == index) {
                        return Err(protocol(
                            "a block status reply left out a selected metadata context",
                        ));
                    }
                }
                Reply::Status {
                    cookie,
                    offset: pending.offset,
                    contexts: contexts
                        .into_iter()
                        .map(Option::unwrap_or_default)
                        .collect(),
                }
            }
        };
        self.replies.push_back(reply);
        Ok(())
    }
}

/// The most payload a chunk of `chunk_type` may carry for `pending`, decided before
/// the payload is awaited so a lying length cannot make the client buffer without
/// bound.
fn chunk_limit(chunk_type: u16, pending: &Pending, contexts: usize) -> Result<u32, ClientError> {
    let read = matches!(pending.kind, PendingKind::Read { .. });
    Ok(match chunk_type {
        REPLY_TYPE_OFFSET_DATA if read => 8 + pending.length,
        REPLY_TYPE_OFFSET_HOLE if read => 12,
        REPLY_TYPE_BLOCK_STATUS if !read && contexts > 0 => 4 + 8 * MAX_DESCRIPTORS,
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE | REPLY_TYPE_BLOCK_STATUS => {
            return Err(protocol(format!(
                "a chunk of type {chunk_type:#x} answers the wrong kind of request"
            )));
        }
        REPLY_TYPE_NONE => 0,
        _ if chunk_type & REPLY_TYPE_ERROR_BIT != 0 => 6 + MAX_MESSAGE + 8,
        _ => return Err(protocol(format!("unknown chunk type {chunk_type:#x}"))),
    })
}

/// Checks that `len` bytes at absolute offset `at` lie inside the read and overlap
/// nothing received before, records them, and returns them relative to the request.
fn place(pending: &mut Pending, at: u64, len: u64) -> Result<(u32, u32), ClientError> {
    let PendingKind::Read {
        covered, chunks, ..
    } = &mut pending.kind
    else {
        return Err(protocol("read data answers a request that is not a read"));
    };
    let start = at
        .checked_sub(pending.offset)
        .filter(|start| {
            start
                .checked_add(len)
                .is_some_and(|end| end <= u64::from(pending.length))
        })
        .ok_or_else(|| protocol("a read chunk lies outside the requested range"))?;
    let (start, end) = (start as u32, (start + len) as u32);
    *chunks += 1;
    if *chunks > MAX_READ_CHUNKS {
        return Err(protocol("a read reply came in too many pieces"));
    }
    let index = covered.partition_point(|&(_, covered_end)| covered_end <= start);
    if covered
        .get(index)
        .is_some_and(|&(covered_start, _)| covered_start < end)
    {
        return Err(protocol("read chunks overlap"));
    }
    covered.insert(index, (start, end));
    // Merge with the neighbours, so a complete read is one range.
    if index + 1 < covered.len() && covered[index + 1].0 == end {
        covered[index].1 = covered[index + 1].1;
        covered.remove(index + 1);
    }
    if index > 0 && covered[index - 1].1 == start {
        covered[index - 1].1 = covered[index].1;
        covered.remove(index);
    }
    Ok((start, end))
}

/// One block-status chunk: a selected context, at most one chunk per context,
/// non-empty extents whose sum reaches into the request only with the last one.
fn status_chunk(
    pending: &mut Pending,
    ids: &[(u32, usize)],
    payload: &[u8],
) -> Result<(), ClientError> {
    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
        return Err(protocol("a block status chunk is malformed"));
    }
    let id = be_u32(payload);
    let Some(&(_, index)) = ids.iter().find(|&&(known, _)| known == id) else {
        return Err(protocol(format!(
            "block status for unknown context id {id}"
        )));
    };
    let PendingKind::Status { contexts } = &mut pending.kind else {
        return Err(protocol(
            "block status answers a request that is not block status",
        ));
    };
    if contexts[index].is_some() {
        return Err(protocol("two block status chunks for one context"));
    }
    let length = u64::from(pending.length);
    let mut extents = Vec::new();
    let mut sum = 0u64;
    for descriptor in payload[4..].as_chunks::<8>().0 {
        let extent = u64::from(be_u32(descriptor));
        let flags = be_u32(&descriptor[4..]);
        if extent == 0 {
            return Err(protocol("a block status extent of 0 bytes"));
        }
        if sum >= length {
            return Err(protocol("block status extents run on past the request"));
        }
        let clipped = extent.min(length - sum);
        sum += extent;
        extents.push(StatusExtent {
            length: clipped,
            flags,
        });
    }
    contexts[index] = Some(extents);
    Ok(())
}
