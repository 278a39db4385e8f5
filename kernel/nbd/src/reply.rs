//! Encoders for everything the server sends: option replies, simple replies and
//! structured reply chunks.

use alloc::sync::Arc;
use alloc::vec::Vec;
use blockdev::IoBuf;

use crate::output::OutQueue;
use crate::wire::*;

/// Longest message put in an error reply (the spec caps strings at 4096 bytes and
/// clients print them; ours are far shorter).
const MAX_MESSAGE: usize = 4096;

/// One option reply with its data.
pub fn option_reply(out: &mut OutQueue, option: u32, reply_type: u32, data: &[u8]) {
    let mut header = [0u8; 20];
    header[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    header[8..12].copy_from_slice(&option.to_be_bytes());
    header[12..16].copy_from_slice(&reply_type.to_be_bytes());
    header[16..20].copy_from_slice(&(data.len() as u32).to_be_bytes());
    out.push(&header);
    out.push(data);
}

/// An option error with a human-readable message (clients print it).
pub fn option_error(out: &mut OutQueue, option: u32, error: u32, message: &str) {
    option_reply(out, option, error, truncate(message).as_bytes());
}

/// `NBD_REP_INFO` carrying `info_type` and `payload`.
pub fn info_reply(out: &mut OutQueue, option: u32, info_type: u16, payload: &[u8]) {
    let mut data = Vec::with_capacity(2 + payload.len());
    data.extend_from_slice(&info_type.to_be_bytes());
    data.extend_from_slice(payload);
    option_reply(out, option, REP_INFO, &data);
}

/// A simple reply header (the data of a successful read follows separately).
pub fn simple_reply(out: &mut OutQueue, cookie: u64, error: u32) {
    let mut header = [0u8; SIMPLE_REPLY_LEN];
    header[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    header[4..8].copy_from_slice(&error.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    out.push(&header);
}

/// A structured chunk header for a payload of `len` bytes (which follows separately).
pub fn chunk_header(out: &mut OutQueue, cookie: u64, flags: u16, chunk_type: u16, len: u32) {
    let mut header = [0u8; CHUNK_HEADER_LEN];
    header[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    header[16..20].copy_from_slice(&len.to_be_bytes());
    out.push(&header);
}

/// The final `NBD_REPLY_TYPE_ERROR` chunk of a structured reply.
pub fn error_chunk(out: &mut OutQueue, cookie: u64, error: u32, message: &str) {
    let message = truncate(message).as_bytes();
    chunk_header(
        out,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + message.len() as u32,
    );
    out.push(&error.to_be_bytes());
    out.push(&(message.len() as u16).to_be_bytes());
    out.push(message);
}

/// An `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying `buf[start..end]` read at
/// `base + start`.
pub fn data_chunk(
    out: &mut OutQueue,
    cookie: u64,
    done: bool,
    base: u64,
    buf: &Arc<IoBuf>,
    start: usize,
    end: usize,
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    chunk_header(
        out,
        cookie,
        flags,
        REPLY_TYPE_OFFSET_DATA,
        8 + (end - start) as u32,
    );
    out.push(&(base + start as u64).to_be_bytes());
    out.push_shared(buf, start, end);
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn hole_chunk(out: &mut OutQueue, cookie: u64, done: bool, offset: u64, len: u32) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    chunk_header(out, cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12);
    out.push(&offset.to_be_bytes());
    out.push(&len.to_be_bytes());
}

/// Cuts a message to the protocol's string limit at a character boundary.
fn truncate(message: &str) -> &str {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let mut end = MAX_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}
