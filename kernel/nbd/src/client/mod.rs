//! NBD client: the appliance reading another server's export (imports, syncs).
//!
//! Like the server, the protocol is a state machine over bytes ([`Client`]): the
//! caller feeds it what arrived with [`Client::receive`] and sends what
//! [`Client::take_output`] hands back, so it runs over smoltcp in the kernel and over
//! std TCP on the host ([`Connection`] pairs it with any [`Stream`]).
//!
//! Spoken: fixed newstyle handshake; `STRUCTURED_REPLY`; `SET_META_CONTEXT` for the
//! contexts the caller asks for (e.g. `base:allocation`); `GO` with a block-size
//! request, falling back to `EXPORT_NAME` for servers without it. Then `READ` and
//! `BLOCK_STATUS`, several in flight, replies in any order, chunks interleaved.
//!
//! Read data is not staged: once a data chunk's header is checked, its payload goes
//! straight into the read's [`IoBuf`] (the caller's, e.g. the buffer of a write that
//! finished, reused without zeroing; [`Client::payload_space`] lets a transport
//! receive into it), so the bytes are copied once on their way to the caller.
//!
//! The server is not trusted: every reply is checked against the request it answers
//! (cookie, offsets inside the request, no overlap, full coverage, lengths within
//! limits fixed before any payload is awaited), so a broken or hostile server gives a
//! [`ClientError`], never a panic, and memory stays bounded by the requests in flight.

mod handshake;
mod replies;
mod stream;
mod uri;

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{IoBuf, SECTOR_SIZE};

pub use stream::{Connection, Stream, StreamError};
pub use uri::{DEFAULT_PORT, NbdUri};

use crate::wire::*;

/// Longest read or block-status range one request may ask for.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Most descriptors accepted in one block-status chunk (the spec's advice to servers).
pub const MAX_DESCRIPTORS: u32 = 1 << 20;
/// Most content chunks accepted for one read.
pub const MAX_READ_CHUNKS: usize = 4096;
/// Longest option reply accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// Why the connection is unusable. Its text is one line for an `error:` report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// The server broke the protocol; the connection must be dropped.
    Protocol(String),
    /// The server refused the export (or the whole connection), with its reason.
    Refused(String),
    /// The connection ended.
    Closed(String),
}

impl ClientError {
    pub fn text(&self) -> &str {
        match self {
            ClientError::Protocol(text)
            | ClientError::Refused(text)
            | ClientError::Closed(text) => text,
        }
    }
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ClientError::Protocol(text) => write!(f, "NBD protocol error: {text}"),
            ClientError::Refused(text) | ClientError::Closed(text) => f.write_str(text),
        }
    }
}

pub(crate) fn protocol(text: impl Into<String>) -> ClientError {
    ClientError::Protocol(text.into())
}

/// What the server said about the export once the handshake is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteExport {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum block size (alignment of requests), 1 when not advertised.
    pub min_block: u32,
    /// Largest read payload the server takes.
    pub max_payload: u32,
    /// Structured replies are in force (needed for block status).
    pub structured: bool,
    /// For each context the caller asked for, in its order: whether the server
    /// selected it.
    pub contexts: Vec<bool>,
}

/// One extent of a block-status reply: `length` bytes with status `flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusExtent {
    pub length: u64,
    pub flags: u32,
}

/// A finished request.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The bytes of a read, hole chunks filled with zeroes, then zeroes up to a
    /// whole number of sectors.
    Read {
        cookie: u64,
        offset: u64,
        data: IoBuf,
    },
    /// Block status: for each context the caller asked for (in its order), the
    /// extents from the request's offset on, clipped to the request (empty for a
    /// context the server did not select). Together they cover at least one byte.
    Status {
        cookie: u64,
        offset: u64,
        contexts: Vec<Vec<StatusExtent>>,
    },
    /// The server answered with an error (the connection stays usable).
    Failed {
        cookie: u64,
        error: u32,
        message: String,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Read { cookie, .. }
            | Reply::Status { cookie, .. }
            | Reply::Failed { cookie, .. } => *cookie,
        }
    }
}

/// Where the conversation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Greeting,
    /// Waiting for the replies to this option.
    Option(u32),
    /// `EXPORT_NAME` sent: waiting for size and flags (and the zero padding unless
    /// both sides agreed to leave it out).
    ExportName,
    Transmission,
    /// Disconnect sent or the connection failed: nothing more is parsed.
    Done,
}

/// A request in flight.
struct Pending {
    offset: u64,
    length: u32,
    kind: PendingKind,
    /// The first error chunk, if any (the reply then fails).
    error: Option<(u32, String)>,
}

enum PendingKind {
    Read {
        /// The request's length rounded up to whole sectors.
        data: IoBuf,
        /// Byte ranges (relative to the request) already covered, sorted, merged.
        covered: Vec<(u32, u32)>,
        chunks: usize,
    },
    Status {
        contexts: Vec<Option<Vec<StatusExtent>>>,
    },
}

/// A read's data chunk whose payload is arriving.
#[derive(Clone, Copy)]
struct Payload {
    cookie: u64,
    /// Where the next byte goes in the read's buffer.
    at: usize,
    remaining: usize,
    /// The chunk ends the reply.
    last: bool,
}

/// The client's side of one NBD connection.
pub struct Client {
    export_name: String,
    queries: Vec<String>,
    phase: Phase,
    input: Vec<u8>,
    /// Bytes of `input` already parsed.
    consumed: usize,
    output: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
    /// Server context id → index of the query it answers.
    context_ids: Vec<(u32, usize)>,
    size: Option<(u64, u16)>,
    block_sizes: Option<(u32, u32)>,
    export: Option<RemoteExport>,
    pending: BTreeMap<u64, Pending>,
    next_cookie: u64,
    replies: VecDeque<Reply>,
    /// The data chunk being received, if any.
    payload: Option<Payload>,
    failed: Option<ClientError>,
}

impl Client {
    /// A client that will open `export` and select the metadata `contexts` (each a
    /// full name, e.g. `base:allocation`).
    pub fn new(export: &str, contexts: &[&str]) -> Self {
        Client {
            export_name: String::from(export),
            queries: contexts.iter().map(|name| String::from(*name)).collect(),
            phase: Phase::Greeting,
            input: Vec::new(),
            consumed: 0,
            output: Vec::new(),
            no_zeroes: false,
            structured: false,
            context_ids: Vec::new(),
            size: None,
            block_sizes: None,
            export: None,
            pending: BTreeMap::new(),
            next_cookie: 1,
            replies: VecDeque::new(),
            payload: None,
            failed: None,
        }
    }

    /// Takes bytes from the server and parses every complete message among them.
    /// After an error the client is finished; the same error is returned again.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        if self.phase == Phase::Done {
            return Ok(());
        }
        let result = self.take(bytes);
        if self.consumed > 0 {
            self.input.drain(..self.consumed);
            self.consumed = 0;
        }
        self.check(result)
    }

    /// Where the payload being received goes: a transport may receive into it and
    /// then report the bytes with [`Client::payload_filled`]. `None` when the next
    /// bytes are a header (or the client is finished).
    pub fn payload_space(&mut self) -> Option<&mut [u8]> {
        let payload = self.payload.filter(|_| self.phase == Phase::Transmission)?;
        match &mut self.pending.get_mut(&payload.cookie)?.kind {
            PendingKind::Read { data, .. } => {
                Some(&mut data[payload.at..payload.at + payload.remaining])
            }
            PendingKind::Status { .. } => None,
        }
    }

    /// `count` bytes were put at the start of [`Client::payload_space`].
    pub fn payload_filled(&mut self, count: usize) -> Result<(), ClientError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let result = self.advance_payload(count);
        self.check(result)
    }

    /// Makes an error final: the client parses nothing more.
    fn check(&mut self, result: Result<(), ClientError>) -> Result<(), ClientError> {
        if let Err(error) = &result {
            self.phase = Phase::Done;
            self.payload = None;
            self.failed = Some(error.clone());
        }
        result
    }

    /// Parses `bytes`: payloads go straight into their reads' buffers; in the
    /// transmission phase only what the next header needs is staged in the input.
    fn take(&mut self, mut bytes: &[u8]) -> Result<(), ClientError> {
        while !bytes.is_empty() {
            if let Some(space) = self.payload_space() {
                let count = space.len().min(bytes.len());
                space[..count].copy_from_slice(&bytes[..count]);
                bytes = &bytes[count..];
                self.advance_payload(count)?;
                continue;
            }
            let count = match self.phase {
                Phase::Transmission => self
                    .header_len()
                    .saturating_sub(self.unparsed().len())
                    .clamp(1, bytes.len()),
                _ => bytes.len(),
            };
            self.input.extend_from_slice(&bytes[..count]);
            bytes = &bytes[count..];
            self.parse()?;
        }
        Ok(())
    }

    /// The connection ended (end of stream, reset): fails whatever is in flight.
    pub fn closed(&mut self) -> ClientError {
        let error = match self.phase {
            Phase::Done => self
                .failed
                .clone()
                .unwrap_or_else(|| ClientError::Closed(String::from("the connection was closed"))),
            Phase::Transmission => ClientError::Closed(String::from(
                "the server closed the connection while requests were in flight",
            )),
            _ => ClientError::Closed(String::from(
                "the server closed the connection during the handshake",
            )),
        };
        self.phase = Phase::Done;
        self.failed.get_or_insert(error).clone()
    }

    /// Bytes to send to the server (taken, so each is sent once).
    pub fn take_output(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.output)
    }

    /// Whether bytes are waiting to be sent.
    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// The export, once the handshake is over.
    pub fn export(&self) -> Option<&RemoteExport> {
        self.export.as_ref()
    }

    /// Requests whose replies have not come back yet.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// The next finished request, if any.
    pub fn next_reply(&mut self) -> Option<Reply> {
        self.replies.pop_front()
    }

    /// Asks for `length` bytes at `offset`; returns the request's cookie.
    pub fn read(&mut self, offset: u64, length: u32) -> Result<u64, ClientError> {
        self.read_into(offset, length, IoBuf::empty())
    }

    /// Asks for `length` bytes at `offset`, to be received into `buf`'s storage
    /// (whatever it holds is overwritten; see [`IoBuf::reuse`]); returns the
    /// request's cookie.
    pub fn read_into(&mut self, offset: u64, length: u32, buf: IoBuf) -> Result<u64, ClientError> {
        let export = self.check_request(offset, length)?;
        if length > export.max_payload {
            return Err(protocol(format!(
                "a read of {length} bytes is more than the server's maximum payload of {}",
                export.max_payload
            )));
        }
        let mut data = buf.reuse((length as usize).next_multiple_of(SECTOR_SIZE));
        data[length as usize..].fill(0);
        let kind = PendingKind::Read {
            data,
            covered: Vec::new(),
            chunks: 0,
        };
        Ok(self.send_request(CMD_READ, offset, length, kind))
    }

    /// Asks for the status of `length` bytes at `offset` in every selected context.
    pub fn block_status(&mut self, offset: u64, length: u32) -> Result<u64, ClientError> {
        let export = self.check_request(offset, length)?;
        if !export.contexts.contains(&true) {
            return Err(protocol(
                "no metadata context was selected for block status",
            ));
        }
        let kind = PendingKind::Status {
            contexts: alloc::vec![None; self.queries.len()],
        };
        Ok(self.send_request(CMD_BLOCK_STATUS, offset, length, kind))
    }

    /// Sends `NBD_CMD_DISC` (the server finishes what is in flight and closes); the
    /// client parses nothing more.
    pub fn disconnect(&mut self) {
        match self.phase {
            Phase::Transmission => {
                let cookie = self.next_cookie;
                self.request_header(CMD_DISC, cookie, 0, 0);
            }
            Phase::Option(_) | Phase::Greeting => {
                if self.phase != Phase::Greeting {
                    option_header(&mut self.output, OPT_ABORT, 0);
                }
            }
            Phase::ExportName | Phase::Done => {}
        }
        self.phase = Phase::Done;
    }

    fn check_request(&self, offset: u64, length: u32) -> Result<RemoteExport, ClientError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let Some(export) = self
            .export
            .clone()
            .filter(|_| self.phase == Phase::Transmission)
        else {
            return Err(protocol("the connection is not ready for requests"));
        };
        let min = u64::from(export.min_block.max(1));
        let end = offset.checked_add(u64::from(length));
        if length == 0
            || length > MAX_REQUEST
            || end.is_none_or(|end| end > export.size)
            || !offset.is_multiple_of(min)
            || (!u64::from(length).is_multiple_of(min) && end != Some(export.size))
        {
            return Err(protocol(format!(
                "request of {length} bytes at {offset} does not fit the export ({} bytes, \
                 blocks of {min})",
                export.size
            )));
        }
        Ok(export)
    }

    fn send_request(&mut self, command: u16, offset: u64, length: u32, kind: PendingKind) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.request_header(command, cookie, offset, length);
        self.pending.insert(
            cookie,
            Pending {
                offset,
                length,
                kind,
                error: None,
            },
        );
        cookie
    }

    fn request_header(&mut self, command: u16, cookie: u64, offset: u64, length: u32) {
        let out = &mut self.output;
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&command.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
    }

    /// The unparsed input.
    fn unparsed(&self) -> &[u8] {
        &self.input[self.consumed..]
    }

    fn parse(&mut self) -> Result<(), ClientError> {
        loop {
            let progressed = match self.phase {
                Phase::Greeting => self.parse_greeting()?,
                Phase::Option(option) => self.parse_option_reply(option)?,
                Phase::ExportName => self.parse_export_name()?,
                Phase::Transmission if self.payload.is_some() => self.staged_payload()?,
                Phase::Transmission => self.parse_reply()?,
                Phase::Done => false,
            };
            if !progressed {
                return Ok(());
            }
        }
    }
}

/// Appends an option header for `len` bytes of option data.
fn option_header(out: &mut Vec<u8>, option: u32, len: u32) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Reads a length-prefixed string of `len` bytes as text, replacing what is not
/// UTF-8 (servers' messages are only shown).
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into()
}

#[cfg(test)]
mod tests;
