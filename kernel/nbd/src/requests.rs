//! The transmission phase: checking requests, handing them to the backend and turning
//! completions into simple or structured replies.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use blockdev::{IoBuf, SECTOR_SIZE};

use crate::backend::{Backend, BackendError, IoOp, IoOutput, IoRequest};
use crate::budget::Admission;
use crate::connection::{Connection, InFlight, PendingWrite, Phase, Rejection, ReplyKind, Shared};
use crate::options::{BASE_ALLOCATION_ID, MAX_PAYLOAD, MIN_BLOCK_SIZE};
use crate::reply::{chunk_header, data_chunk, error_chunk, hole_chunk, simple_reply};
use crate::wire::*;
use blockdev::{Extent, SectorRun};

/// Most extents returned in one block-status reply (8 KiB of descriptors); clients ask
/// again from where the reply stopped.
pub const MAX_EXTENTS: u32 = 1024;

/// A parsed request header.
#[derive(Clone, Copy, Debug)]
struct Header {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

impl Header {
    fn sector(&self) -> u64 {
        self.offset / SECTOR_SIZE as u64
    }

    fn sectors(&self) -> u64 {
        u64::from(self.len) / SECTOR_SIZE as u64
    }

    fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }
}

/// What an acceptable request turns into.
enum Plan {
    /// Nothing to do (zero length): succeed at once.
    Nothing,
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
    /// A read or write whose buffer must wait for memory.
    AwaitMemory,
}

fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write-zeroes",
        CMD_BLOCK_STATUS => "block-status",
        _ => "unknown command",
    }
}

impl Connection {
    pub(crate) fn on_request_header<B: Backend>(&mut self, shared: &mut Shared<'_, B>) {
        let raw = &self.header;
        if be_u32(raw) != REQUEST_MAGIC {
            // Framing is lost; nothing sensible can follow.
            self.stop(true);
            return;
        }
        let header = Header {
            flags: be_u16(&raw[4..]),
            command: be_u16(&raw[6..]),
            cookie: be_u64(&raw[8..]),
            offset: be_u64(&raw[16..]),
            len: be_u32(&raw[24..]),
        };
        if header.command == CMD_DISC {
            self.stop(false);
            return;
        }
        let planned = self
            .check(&header)
            .and_then(|plan| self.reserve(&header, plan, shared));
        match planned {
            Err(rejection) if header.command == CMD_WRITE && header.len > 0 => {
                // The payload follows anyway: skip it (without storing it) to stay in
                // step, then answer.
                self.phase = Phase::SkipPayload {
                    remaining: u64::from(header.len),
                    rejection,
                };
            }
            Err(rejection) => self.reject(rejection),
            Ok(plan) => self.start(&header, plan, shared),
        }
    }

    /// Decides whether a request can be served, without the backend.
    fn check(&self, header: &Header) -> Result<Plan, Rejection> {
        let reject = |error, message: String| {
            Err(Rejection {
                cookie: header.cookie,
                error,
                message,
            })
        };
        let Some(export) = &self.export else {
            return reject(EINVAL, String::from("no export is open"));
        };
        let name = command_name(header.command);
        let advertised = |flag| export.flags & flag != 0;
        let allowed = CMD_FLAG_FUA
            | match header.command {
                CMD_READ if advertised(TFLAG_SEND_DF) => CMD_FLAG_DF,
                CMD_WRITE_ZEROES if advertised(TFLAG_SEND_FAST_ZERO) => {
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
                }
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
                other => return reject(EINVAL, format!("invalid request type ({other})")),
            };
        if header.flags & !allowed != 0 {
            let flags = header.flags;
            return reject(EINVAL, format!("unsupported flags {flags:#x} for {name}"));
        }
        let writes = matches!(header.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && export.info.read_only {
            return reject(EPERM, format!("{name} on a read-only export"));
        }
        match header.command {
            CMD_FLUSH if header.offset != 0 || header.len != 0 => {
                return reject(EINVAL, String::from("flush with non-zero offset or length"));
            }
            CMD_FLUSH => return Ok(Plan::Flush),
            CMD_TRIM if !advertised(TFLAG_SEND_TRIM) => {
                return reject(EINVAL, String::from("trim is not supported by this export"));
            }
            CMD_WRITE_ZEROES if !advertised(TFLAG_SEND_WRITE_ZEROES) => {
                let message = "write-zeroes is not supported by this export";
                return reject(EINVAL, String::from(message));
            }
            CMD_BLOCK_STATUS if !export.contexts.any() => {
                let message = "block-status needs a metadata context selected";
                return reject(EINVAL, String::from(message));
            }
            _ => {}
        }
        let (offset, len) = (header.offset, header.len);
        if offset % u64::from(MIN_BLOCK_SIZE) != 0 || len % MIN_BLOCK_SIZE != 0 {
            let message =
                format!("{name} at {offset} length {len} is not aligned to {MIN_BLOCK_SIZE} bytes");
            return reject(EINVAL, message);
        }
        let size = export.info.bytes();
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > size)
        {
            // Writing past the end is "no space"; anything else past the end is invalid.
            let error = if matches!(header.command, CMD_WRITE | CMD_WRITE_ZEROES) {
                ENOSPC
            } else {
                EINVAL
            };
            let message = format!(
                "{name} at {offset} length {len} runs past the end of the export ({size} bytes)"
            );
            return reject(error, message);
        }
        if matches!(header.command, CMD_READ | CMD_WRITE) && len > MAX_PAYLOAD {
            let message =
                format!("{name} of {len} bytes exceeds the maximum payload {MAX_PAYLOAD}");
            return reject(EINVAL, message);
        }
        if header.command == CMD_BLOCK_STATUS && len == 0 {
            return reject(EINVAL, String::from("block-status of length 0"));
        }
        Ok(match header.command {
            _ if len == 0 => Plan::Nothing,
            CMD_READ => Plan::Read,
            CMD_WRITE => Plan::Write,
            CMD_TRIM => Plan::Trim,
            CMD_WRITE_ZEROES => Plan::WriteZeroes,
            CMD_CACHE => Plan::Cache,
            _ => Plan::BlockStatus,
        })
    }

    /// Checks a read's or write's buffer against the server's memory budget: it
    /// waits when other requests hold the memory, and is refused when it could never
    /// fit.
    fn reserve<B: Backend>(
        &self,
        header: &Header,
        plan: Plan,
        shared: &mut Shared<'_, B>,
    ) -> Result<Plan, Rejection> {
        if !matches!(plan, Plan::Read | Plan::Write) {
            return Ok(plan);
        }
        match shared.memory.admit(self.footprint(), header.len as usize) {
            Admission::Take => Ok(plan),
            Admission::Wait => Ok(Plan::AwaitMemory),
            Admission::Refuse => Err(Rejection {
                cookie: header.cookie,
                error: ENOMEM,
                message: format!(
                    "{} of {} bytes does not fit in the server's memory now",
                    command_name(header.command),
                    header.len
                ),
            }),
        }
    }

    /// Starts an accepted request: waits for a write's payload, or queues the
    /// operation for the backend.
    fn start<B: Backend>(&mut self, header: &Header, plan: Plan, shared: &mut Shared<'_, B>) {
        let (sector, sectors) = (header.sector(), header.sectors());
        let len = header.len;
        let (kind, held, op) = match plan {
            Plan::Nothing if header.command == CMD_READ && self.structured => {
                chunk_header(
                    &mut self.out,
                    header.cookie,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_NONE,
                    0,
                );
                return;
            }
            Plan::Nothing => {
                simple_reply(&mut self.out, header.cookie, 0);
                return;
            }
            Plan::AwaitMemory => {
                self.phase = Phase::AwaitingMemory;
                return;
            }
            Plan::Write => {
                self.buffered += len as usize;
                self.phase = Phase::WritePayload(PendingWrite {
                    cookie: header.cookie,
                    sector,
                    fua: header.fua(),
                    buf: IoBuf::zeroed(len as usize),
                    filled: 0,
                });
                return;
            }
            Plan::Read => {
                let df = header.flags & CMD_FLAG_DF != 0;
                let kind = ReplyKind::Read {
                    offset: header.offset,
                    len,
                    df,
                };
                let buf = self.out.read_buffer(len as usize);
                (kind, len as usize, IoOp::Read { sector, buf })
            }
            Plan::Flush => (ReplyKind::Plain, 0, IoOp::Flush),
            Plan::Trim => {
                let fua = header.fua();
                (
                    ReplyKind::Plain,
                    0,
                    IoOp::Trim {
                        sector,
                        sectors,
                        fua,
                    },
                )
            }
            Plan::WriteZeroes => {
                let op = IoOp::WriteZeroes {
                    sector,
                    sectors,
                    fua: header.fua(),
                    may_unmap: header.flags & CMD_FLAG_NO_HOLE == 0,
                    fast_only: header.flags & CMD_FLAG_FAST_ZERO != 0,
                };
                (ReplyKind::Plain, 0, op)
            }
            Plan::Cache => (ReplyKind::Plain, 0, IoOp::Cache { sector, sectors }),
            Plan::BlockStatus => {
                let req_one = header.flags & CMD_FLAG_REQ_ONE != 0;
                let kind = ReplyKind::BlockStatus { len, req_one };
                let max_extents = if req_one { 1 } else { MAX_EXTENTS };
                // The backend's contexts answer at once; base:allocation, if
                // selected, follows through the queue with the final chunk.
                let base_allocation = self
                    .export
                    .as_ref()
                    .is_some_and(|export| export.contexts.base_allocation);
                let done = !base_allocation;
                let answered =
                    self.context_chunks(header.cookie, (sector, len), max_extents, done, shared);
                if let Err(error) = answered {
                    self.reply_error(header.cookie, error.nbd_error(), error.message());
                    return;
                }
                if done {
                    return;
                }
                let op = IoOp::BlockStatus {
                    sector,
                    sectors,
                    max_extents,
                };
                (kind, 0, op)
            }
        };
        self.enqueue(header.cookie, kind, held, op, shared);
    }

    /// A write's payload has fully arrived.
    pub(crate) fn submit_write<B: Backend>(
        &mut self,
        write: PendingWrite,
        shared: &mut Shared<'_, B>,
    ) {
        let held = write.buf.len();
        self.buffered -= held;
        let op = IoOp::Write {
            sector: write.sector,
            buf: write.buf,
            fua: write.fua,
        };
        self.enqueue(write.cookie, ReplyKind::Plain, held, op, shared);
    }

    fn enqueue<B: Backend>(
        &mut self,
        cookie: u64,
        kind: ReplyKind,
        held: usize,
        op: IoOp,
        shared: &mut Shared<'_, B>,
    ) {
        let Some(export) = &self.export else {
            return;
        };
        let tag = *shared.next_tag;
        *shared.next_tag += 1;
        self.buffered += held;
        self.in_flight.insert(
            tag,
            InFlight {
                cookie,
                kind,
                buffered: held,
            },
        );
        self.queued.push_back(IoRequest {
            tag,
            export: export.handle,
            op,
        });
    }

    /// Sends an error reply: a structured error chunk (with its message) once
    /// structured replies are negotiated, a simple reply otherwise.
    pub(crate) fn reject(&mut self, rejection: Rejection) {
        self.reply_error(rejection.cookie, rejection.error, &rejection.message);
    }

    fn reply_error(&mut self, cookie: u64, error: u32, message: &str) {
        if self.structured {
            error_chunk(&mut self.out, cookie, error, message);
        } else {
            simple_reply(&mut self.out, cookie, error);
        }
    }

    /// The backend finished request `tag`.
    pub(crate) fn complete(&mut self, tag: u64, result: Result<IoOutput, BackendError>) {
        let Some(done) = self.in_flight.remove(&tag) else {
            return;
        };
        self.buffered -= done.buffered;
        if self.detached {
            return;
        }
        let cookie = done.cookie;
        match (done.kind, result) {
            (_, Err(error)) => self.reply_error(cookie, error.nbd_error(), error.message()),
            (ReplyKind::Read { offset, len, df }, Ok(IoOutput::Read { buf, zero_holes }))
                if buf.len() == len as usize =>
            {
                self.read_reply(cookie, offset, df, buf, &zero_holes);
            }
            (ReplyKind::BlockStatus { len, req_one }, Ok(IoOutput::Extents(extents))) => {
                let limit = if req_one { 1 } else { MAX_EXTENTS as usize };
                let descriptors = descriptors(len, &extents, limit);
                let payload_len = 4 + 8 * descriptors.len() as u32;
                let out = &mut self.out;
                chunk_header(
                    out,
                    cookie,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    payload_len,
                );
                out.push(&BASE_ALLOCATION_ID.to_be_bytes());
                for (length, status) in descriptors {
                    out.push(&length.to_be_bytes());
                    out.push(&status.to_be_bytes());
                }
            }
            (ReplyKind::Plain, Ok(_)) => simple_reply(&mut self.out, cookie, 0),
            (_, Ok(_)) => {
                let message = "backend returned the wrong kind of result";
                self.reply_error(cookie, EIO, message);
            }
        }
    }

    fn read_reply(
        &mut self,
        cookie: u64,
        offset: u64,
        df: bool,
        buf: IoBuf,
        zero_holes: &[SectorRun],
    ) {
        let buf = Arc::new(buf);
        if !self.structured {
            simple_reply(&mut self.out, cookie, 0);
            self.out.push_shared(&buf, 0, buf.len());
            self.out.recycle(buf);
            return;
        }
        let pieces = read_pieces(buf.len(), zero_holes, df);
        let last = pieces.len() - 1;
        for (index, piece) in pieces.into_iter().enumerate() {
            let done = index == last;
            if piece.hole {
                let len = (piece.end - piece.start) as u32;
                hole_chunk(
                    &mut self.out,
                    cookie,
                    done,
                    offset + piece.start as u64,
                    len,
                );
            } else {
                data_chunk(
                    &mut self.out,
                    cookie,
                    done,
                    offset,
                    &buf,
                    piece.start,
                    piece.end,
                );
            }
        }
        // Only kept now if every piece was copied (short reads, holes).
        self.out.recycle(buf);
    }
}

/// A piece of a structured read reply, in bytes relative to the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub start: usize,
    pub end: usize,
    pub hole: bool,
}

/// Splits a read of `len` (> 0) bytes into data and hole pieces covering it in order.
/// The backend's hole list is not trusted: it is sorted and clipped, overlaps dropped.
/// With `df` (don't fragment) a mixed range becomes a single data piece.
pub(crate) fn read_pieces(len: usize, zero_holes: &[SectorRun], df: bool) -> Vec<Piece> {
    let mut holes = zero_holes.to_vec();
    holes.sort_unstable();
    let mut pieces = Vec::new();
    let mut pos = 0;
    let sector = SECTOR_SIZE as u64;
    for hole in holes {
        let start = hole.start.saturating_mul(sector).min(len as u64) as usize;
        let end = hole
            .start
            .saturating_add(hole.sectors)
            .saturating_mul(sector);
        let (start, end) = (start.max(pos), end.min(len as u64) as usize);
        if start >= end {
            continue;
        }
        if start > pos {
            pieces.push(Piece {
                start: pos,
                end: start,
                hole: false,
            });
        }
        pieces.push(Piece {
            start,
            end,
            hole: true,
        });
        pos = end;
    }
    if pos < len {
        pieces.push(Piece {
            start: pos,
            end: len,
            hole: false,
        });
    }
    if df && pieces.len() > 1 {
        pieces = alloc::vec![Piece {
            start: 0,
            end: len,
            hole: false,
        }];
    }
    pieces
}

/// Turns the backend's extents into at most `limit` block-status descriptors
/// (length, flags) for a request of `len` bytes: clipped to the request, neighbours
/// with equal flags merged, lengths multiples of 512, never empty.
pub(crate) fn descriptors(len: u32, extents: &[Extent], limit: usize) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut covered = 0u32;
    for extent in extents {
        let left = len - covered;
        if left == 0 {
            break;
        }
        let bytes = extent.sectors.saturating_mul(SECTOR_SIZE as u64);
        let piece = bytes.min(u64::from(left)) as u32;
        if piece == 0 {
            continue;
        }
        let hole = if extent.hole { STATE_HOLE } else { 0 };
        let status = hole | if extent.zero { STATE_ZERO } else { 0 };
        let count = out.len();
        match out.last_mut() {
            Some(last) if last.1 == status => last.0 += piece,
            _ if count == limit => break,
            _ => out.push((piece, status)),
        }
        covered += piece;
    }
    if out.is_empty() {
        // Status 0 (allocated, not known zero) is always a truthful answer.
        out.push((len, 0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: u64, sectors: u64) -> SectorRun {
        SectorRun { start, sectors }
    }

    fn piece(start: usize, end: usize, hole: bool) -> Piece {
        Piece { start, end, hole }
    }

    #[test]
    fn read_pieces_cover_the_read_in_order() {
        let holes = [run(4, 2), run(0, 1)];
        assert_eq!(
            read_pieces(4096, &holes, false),
            [
                piece(0, 512, true),
                piece(512, 2048, false),
                piece(2048, 3072, true),
                piece(3072, 4096, false),
            ]
        );
        assert_eq!(read_pieces(4096, &holes, true), [piece(0, 4096, false)]);
        assert_eq!(
            read_pieces(4096, &[run(0, 8)], true),
            [piece(0, 4096, true)]
        );
        assert_eq!(read_pieces(1024, &[], false), [piece(0, 1024, false)]);
    }

    #[test]
    fn read_pieces_survive_nonsense_from_the_backend() {
        let holes = [
            run(1, 4),
            run(2, 1),
            run(7, 100),
            run(u64::MAX, u64::MAX),
            run(3, 0),
        ];
        assert_eq!(
            read_pieces(4096, &holes, false),
            [
                piece(0, 512, false),
                piece(512, 2560, true),
                piece(2560, 3584, false),
                piece(3584, 4096, true)
            ]
        );
    }

    fn extent(sectors: u64, hole: bool, zero: bool) -> Extent {
        Extent {
            sectors,
            hole,
            zero,
        }
    }

    #[test]
    fn descriptors_are_clipped_merged_and_limited() {
        let extents = [
            extent(2, true, true),
            extent(0, false, false),
            extent(2, true, true),
            extent(4, false, false),
            extent(u64::MAX, true, false),
        ];
        let all = STATE_HOLE | STATE_ZERO;
        assert_eq!(
            descriptors(8192, &extents, 1024),
            [(2048, all), (2048, 0), (4096, STATE_HOLE)]
        );
        assert_eq!(descriptors(8192, &extents, 2), [(2048, all), (2048, 0)]);
        assert_eq!(descriptors(1024, &extents, 1), [(1024, all)]);
        // The largest request a 32-bit length allows.
        let max = u32::MAX - 511;
        assert_eq!(descriptors(max, &extents[4..], 1), [(max, STATE_HOLE)]);
        // Nothing usable: one safe "allocated" descriptor.
        assert_eq!(descriptors(4096, &[], 8), [(4096, 0)]);
        assert_eq!(descriptors(4096, &[extent(0, true, true)], 8), [(4096, 0)]);
    }
}
