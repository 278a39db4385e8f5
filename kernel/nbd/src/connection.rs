//! One client connection: the byte-stream parser and the per-connection protocol
//! state, from greeting to close.
//!
//! Input is taken at most up to what the connection can hold: fixed-size headers
//! accumulate in a small array, option data in a bounded vector, write payloads go
//! straight into the request's buffer and unwanted payloads are skipped without being
//! stored. At message boundaries the connection stops taking input while too many
//! requests are in flight or too many reply bytes wait to be sent (back-pressure).
//! Option handling lives in `options.rs`, request handling in `requests.rs`.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use blockdev::IoBuf;
use core::net::SocketAddr;
use rustls::ServerConfig;

use crate::backend::{Backend, ExportHandle, ExportInfo, IoRequest, Peer};
use crate::budget::MemoryBudget;
use crate::contexts::{OpenContexts, Selection};
use crate::output::OutQueue;
use crate::wire::*;

/// Per-connection resource limits.
///
/// A connection holds at most about `max_buffered_bytes` plus one maximum-size request
/// (32 MiB) plus one option (64 KiB): requests are admitted only while it is below the
/// limits, and every admitted request may bring one buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Requests parsed and not yet answered.
    pub max_requests: usize,
    /// Bytes of request buffers (write payloads, read data) plus queued reply bytes.
    pub max_buffered_bytes: usize,
}

impl Default for Limits {
    /// Deep enough for nbdcopy's 64 requests of 256 KiB, and for a 32 MiB request.
    fn default() -> Self {
        Limits {
            max_requests: 64,
            max_buffered_bytes: 40 << 20,
        }
    }
}

/// What the parser expects next.
pub(crate) enum Phase {
    /// The 4-byte client flags.
    ClientFlags,
    /// A 16-byte option header.
    OptionHeader,
    /// The data of option `code`, `len` bytes in all.
    OptionData { code: u32, len: usize },
    /// Data of option `code` too large to keep; answered with `ERR_TOO_BIG` once skipped.
    OptionSkip { code: u32, remaining: u64 },
    /// A 28-byte request header.
    RequestHeader,
    /// Payload of an accepted write, going straight into its buffer.
    WritePayload(PendingWrite),
    /// Payload of a rejected write, discarded; the error is sent once it is skipped.
    SkipPayload {
        remaining: u64,
        rejection: Rejection,
    },
    /// A read or write whose header (kept in `header`) arrived when its buffer did
    /// not fit in the server's [`MemoryBudget`]; handled again once memory is freed.
    AwaitingMemory,
    /// No more input is read.
    Stopped,
}

/// A write whose payload is arriving.
pub(crate) struct PendingWrite {
    pub cookie: u64,
    pub sector: u64,
    pub fua: bool,
    pub buf: IoBuf,
    pub filled: usize,
}

/// An error reply decided without the backend.
pub(crate) struct Rejection {
    pub cookie: u64,
    pub error: u32,
    pub message: String,
}

/// How a request's reply must be built.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ReplyKind {
    Read { offset: u64, len: u32, df: bool },
    BlockStatus { len: u32, req_one: bool },
    Plain,
}

/// A request handed to (or waiting for) the backend.
pub(crate) struct InFlight {
    pub cookie: u64,
    pub kind: ReplyKind,
    /// Buffer bytes the request holds, counted against the limits.
    pub buffered: usize,
}

/// The export a connection is attached to.
pub(crate) struct OpenExport {
    pub handle: ExportHandle,
    pub info: ExportInfo,
    pub flags: u16,
    /// The metadata contexts selected for this export (BLOCK_STATUS needs one).
    pub contexts: OpenContexts,
}

/// Whether and how the connection is ending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Running normally.
    No,
    /// No more input; finish what is in flight, send every reply, then close.
    Drain,
    /// Close now; nothing more is sent (framing lost, or the peer is gone).
    Now,
}

/// State shared by the connections of one server, lent to a connection while it works.
pub(crate) struct Shared<'a, B> {
    pub backend: &'a mut B,
    pub next_tag: &'a mut u64,
    pub memory: &'a mut MemoryBudget,
}

pub(crate) struct Connection {
    /// The client's address and port (and certificate, once TLS has verified one), for
    /// the backend's access rules.
    pub peer: Peer,
    pub phase: Phase,
    /// Bytes of a fixed-size header (or of option data) gathered so far.
    pub header: [u8; REQUEST_HEADER_LEN],
    pub header_len: usize,
    pub option_data: Vec<u8>,
    pub out: OutQueue,
    pub ending: Ending,
    /// The transport has let go: replies are discarded, the record stays until the
    /// backend has returned every request.
    pub detached: bool,

    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
    /// `NBD_OPT_STARTTLS` was acknowledged: the bytes after it are TLS, for the server
    /// to hand to a session made with this configuration.
    pub tls_pending: Option<Arc<ServerConfig>>,
    /// The connection runs inside TLS.
    pub tls_active: bool,
    pub structured: bool,
    /// What the last `NBD_OPT_SET_META_CONTEXT` selected.
    pub meta: Option<Selection>,
    pub export: Option<OpenExport>,

    /// Requests parsed but not yet accepted by the backend, oldest first.
    pub queued: VecDeque<IoRequest>,
    /// Every request not yet answered, by tag (queued ones included).
    pub in_flight: BTreeMap<u64, InFlight>,
    /// Bytes held by request buffers (payloads being received included).
    pub buffered: usize,
    /// Block-status descriptors being built, kept to be reused.
    pub descriptors: Vec<(u32, u32)>,
}

impl Connection {
    /// A new connection from `peer` with its greeting queued.
    pub fn new(peer: SocketAddr) -> Self {
        let mut out = OutQueue::default();
        let mut greeting = [0u8; GREETING_LEN];
        greeting[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        greeting[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        out.push(&greeting);
        Connection {
            peer: Peer::at(peer),
            phase: Phase::ClientFlags,
            header: [0; REQUEST_HEADER_LEN],
            header_len: 0,
            option_data: Vec::new(),
            out,
            ending: Ending::No,
            detached: false,
            fixed_newstyle: false,
            no_zeroes: false,
            tls_pending: None,
            tls_active: false,
            structured: false,
            meta: None,
            export: None,
            queued: VecDeque::new(),
            in_flight: BTreeMap::new(),
            buffered: 0,
            descriptors: Vec::new(),
        }
    }

    /// True when the connection would take input now.
    pub fn wants_input(&self, limits: &Limits) -> bool {
        if self.ending != Ending::No
            || self.detached
            || self.awaiting_memory()
            || self.tls_pending.is_some()
        {
            return false;
        }
        let at_boundary = self.header_len == 0
            && matches!(self.phase, Phase::OptionHeader | Phase::RequestHeader);
        !(at_boundary && self.over_limits(limits))
    }

    fn over_limits(&self, limits: &Limits) -> bool {
        self.in_flight.len() >= limits.max_requests || self.footprint() >= limits.max_buffered_bytes
    }

    /// Bytes this connection holds: request buffers and replies not yet sent.
    pub fn footprint(&self) -> usize {
        self.buffered + self.out.len()
    }

    /// Whether a request is parked until memory is freed.
    pub fn awaiting_memory(&self) -> bool {
        matches!(self.phase, Phase::AwaitingMemory)
    }

    /// Tries the parked request again (the budget in `shared` may have room now).
    pub fn resume<B: Backend>(&mut self, shared: &mut Shared<'_, B>) {
        if self.awaiting_memory() {
            self.phase = Phase::RequestHeader;
            self.on_request_header(shared);
        }
    }

    /// Takes bytes from `data`; returns how many were used (the rest must be offered
    /// again later).
    pub fn receive<B: Backend>(
        &mut self,
        data: &[u8],
        limits: &Limits,
        shared: &mut Shared<'_, B>,
    ) -> usize {
        let mut used = 0;
        while used < data.len() && self.wants_input(limits) {
            let rest = &data[used..];
            used += match self.phase {
                Phase::ClientFlags => self.take_header(rest, 4, shared),
                Phase::OptionHeader => self.take_header(rest, OPTION_HEADER_LEN, shared),
                Phase::RequestHeader => self.take_header(rest, REQUEST_HEADER_LEN, shared),
                Phase::OptionData { code, len } => self.take_option_data(rest, code, len, shared),
                Phase::OptionSkip { .. } | Phase::SkipPayload { .. } => self.take_skipped(rest),
                Phase::WritePayload(_) => self.take_payload(rest, shared),
                Phase::AwaitingMemory | Phase::Stopped => break,
            };
        }
        used
    }

    /// Gathers a fixed-size header and handles it once complete.
    fn take_header<B: Backend>(
        &mut self,
        rest: &[u8],
        size: usize,
        shared: &mut Shared<'_, B>,
    ) -> usize {
        let take = (size - self.header_len).min(rest.len());
        self.header[self.header_len..self.header_len + take].copy_from_slice(&rest[..take]);
        self.header_len += take;
        if self.header_len == size {
            self.header_len = 0;
            match self.phase {
                Phase::ClientFlags => self.on_client_flags(),
                Phase::OptionHeader => self.on_option_header(shared),
                _ => self.on_request_header(shared),
            }
        }
        take
    }

    fn take_option_data<B: Backend>(
        &mut self,
        rest: &[u8],
        code: u32,
        len: usize,
        shared: &mut Shared<'_, B>,
    ) -> usize {
        let take = (len - self.option_data.len()).min(rest.len());
        self.option_data.extend_from_slice(&rest[..take]);
        if self.option_data.len() == len {
            let data = core::mem::take(&mut self.option_data);
            self.phase = Phase::OptionHeader;
            self.on_option(code, &data, shared);
        }
        take
    }

    /// Discards bytes of an oversized option or a rejected write; answers once done.
    fn take_skipped(&mut self, rest: &[u8]) -> usize {
        let (Phase::OptionSkip { remaining, .. } | Phase::SkipPayload { remaining, .. }) =
            &mut self.phase
        else {
            return 0;
        };
        let take = (*remaining).min(rest.len() as u64);
        *remaining -= take;
        if *remaining == 0 {
            match core::mem::replace(&mut self.phase, Phase::RequestHeader) {
                Phase::OptionSkip { code, .. } => {
                    self.phase = Phase::OptionHeader;
                    self.option_too_big(code);
                }
                Phase::SkipPayload { rejection, .. } => self.reject(rejection),
                other => self.phase = other,
            }
        }
        take as usize
    }

    /// Copies write payload into the request's buffer; submits it once complete.
    fn take_payload<B: Backend>(&mut self, rest: &[u8], shared: &mut Shared<'_, B>) -> usize {
        let Phase::WritePayload(write) = &mut self.phase else {
            return 0;
        };
        let take = (write.buf.len() - write.filled).min(rest.len());
        write.buf[write.filled..write.filled + take].copy_from_slice(&rest[..take]);
        write.filled += take;
        if write.filled == write.buf.len()
            && let Phase::WritePayload(write) =
                core::mem::replace(&mut self.phase, Phase::RequestHeader)
        {
            self.submit_write(write, shared);
        }
        take
    }

    /// Stops reading; with `now` also drops everything not yet sent.
    pub fn stop(&mut self, now: bool) {
        if let Phase::WritePayload(write) = core::mem::replace(&mut self.phase, Phase::Stopped) {
            self.buffered -= write.buf.len();
        }
        if now {
            self.ending = Ending::Now;
            self.out.clear();
        } else if self.ending == Ending::No {
            self.ending = Ending::Drain;
        }
    }

    /// The transport should close the socket now.
    pub fn finished(&self) -> bool {
        match self.ending {
            Ending::No => false,
            Ending::Drain => self.in_flight.is_empty() && self.out.is_empty(),
            Ending::Now => true,
        }
    }

    /// The transport has closed the socket: forget pending output and queued requests,
    /// keep the record until the backend returns what it holds.
    pub fn detach(&mut self) {
        self.detached = true;
        self.stop(true);
        for request in self.queued.drain(..) {
            if let Some(dropped) = self.in_flight.remove(&request.tag) {
                self.buffered -= dropped.buffered;
            }
        }
    }
}
