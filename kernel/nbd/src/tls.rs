//! TLS after `NBD_OPT_STARTTLS`: one rustls server session per connection, between
//! the transport's bytes and the connection's plaintext.
//!
//! rustls' unbuffered API is sans-I/O like the rest of the server: received
//! ciphertext is gathered in `incoming`, decrypted records wait in `plain` until the
//! connection takes them, and what the connection says is encrypted into `outgoing`
//! for the transport. Every buffer is bounded: ciphertext is taken only while
//! `incoming` has room and no decrypted bytes wait, and the connection's output is
//! encrypted only while less than [`MAX_OUTGOING`] bytes wait to be sent, so the
//! connection's own limits keep applying back-pressure. Record data is encrypted
//! straight from the connection's output into `outgoing`, several records a call. The
//! buffers keep their memory while the connection has requests or replies under way;
//! once it is idle, emptied buffers give back all but one record's worth, so an idle
//! session holds little, and what the buffers hold counts in the server's memory
//! figures ([`TlsSession::footprint`]).

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};

use crate::backend::{Backend, TlsFailure};
use crate::connection::{Connection, Limits, Shared};
use crate::output::OutQueue;

/// Ciphertext held before it is decrypted: four full TLS records.
const MAX_INCOMING: usize = 4 * (16 * 1024 + 2048);
/// Encrypted bytes waiting for the transport before more output is encrypted.
const MAX_OUTGOING: usize = 256 * 1024;
/// Plaintext put in one TLS record.
const RECORD_PLAINTEXT: usize = 16 * 1024;
/// Most plaintext encrypted in one call (rustls cuts it into records): a read reply's
/// data goes out four records at a time, straight from the buffer the backend filled.
const ENCRYPT_BATCH: usize = 4 * RECORD_PLAINTEXT;
/// Room allowed per record for its header, content type, tag and explicit nonce.
const RECORD_OVERHEAD: usize = 64;
/// Capacity an emptied buffer keeps once the connection is idle: one record and its
/// overhead.
const KEPT_CAPACITY: usize = RECORD_PLAINTEXT + 512;

/// What the session saw while it worked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Bytes moved in either direction.
    pub moved: bool,
    /// The client sent close_notify: no more input will come.
    pub peer_closed: bool,
}

/// A TLS session's failure: the connection must close (an alert may be queued).
#[derive(Debug)]
pub(crate) struct Failed;

/// Encrypted bytes for the transport, `bytes[start..end]`. The storage stays written
/// (and allocated) while the connection is busy, so records are encrypted straight
/// into it without clearing or growing it each time.
#[derive(Default)]
struct Outgoing {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
}

impl Outgoing {
    fn pending(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    fn consume(&mut self, count: usize) {
        self.start = (self.start + count).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Makes at least `room` bytes writable after the pending ones, moving those to the
    /// front first if that frees enough.
    fn make_room(&mut self, room: usize) {
        if self.bytes.len() - self.end >= room {
            return;
        }
        if self.start > 0 {
            self.bytes.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.bytes.len() - self.end < room {
            self.bytes.resize(self.end + room, 0);
        }
    }

    /// Appends what `write` puts after the pending bytes, making room for `room` bytes
    /// first and then for what `write` says it needs if that was too little.
    fn append(
        &mut self,
        mut room: usize,
        mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<InsufficientSizeError>>,
    ) -> Result<(), Failed> {
        loop {
            self.make_room(room);
            match write(&mut self.bytes[self.end..]) {
                Ok(written) => {
                    self.end += written;
                    return Ok(());
                }
                Err(Some(size)) if size.required_size > self.bytes.len() - self.end => {
                    room = size.required_size;
                }
                Err(_) => return Err(Failed),
            }
        }
    }

    /// Frees the storage beyond [`KEPT_CAPACITY`] if nothing is pending.
    fn release(&mut self) {
        if self.start == self.end && self.bytes.capacity() > KEPT_CAPACITY {
            *self = Outgoing::default();
        }
    }
}

pub(crate) struct TlsSession {
    session: UnbufferedServerConnection,
    /// Received ciphertext; `incoming[..incoming_done]` has been worked through.
    incoming: Vec<u8>,
    incoming_done: usize,
    plain: Vec<u8>,
    /// Bytes of `plain` the connection has taken.
    plain_taken: usize,
    outgoing: Outgoing,
    /// Short pieces of the connection's output gathered into one record.
    gathered: Vec<u8>,
    peer_closed: bool,
    /// The session broke (bad record, failed handshake): nothing more moves.
    failed: bool,
    /// What rustls said when the session broke, for the backend's report.
    error: Option<rustls::Error>,
}

impl TlsSession {
    /// A session answering the client's handshake; `first_bytes` (plaintext the
    /// connection had queued before the switch, i.e. the STARTTLS acknowledgement) go
    /// out before any TLS record.
    pub fn new(config: Arc<ServerConfig>, first_bytes: &mut OutQueue) -> Result<Self, Failed> {
        let session = UnbufferedServerConnection::new(config).map_err(|_| Failed)?;
        let mut outgoing = Outgoing::default();
        for chunk in first_bytes.chunks() {
            outgoing.bytes.extend_from_slice(chunk);
        }
        outgoing.end = outgoing.bytes.len();
        first_bytes.clear();
        Ok(TlsSession {
            session,
            incoming: Vec::new(),
            incoming_done: 0,
            plain: Vec::new(),
            plain_taken: 0,
            outgoing,
            gathered: Vec::new(),
            peer_closed: false,
            failed: false,
            error: None,
        })
    }

    /// Whether the handshake is still under way (and has not failed).
    pub fn handshaking(&self) -> bool {
        !self.failed && self.session.is_handshaking()
    }

    /// Bytes of memory the session's buffers hold (rustls' own state aside).
    pub fn footprint(&self) -> usize {
        self.incoming.capacity()
            + self.plain.capacity()
            + self.outgoing.bytes.capacity()
            + self.gathered.capacity()
    }

    /// Whether the session takes ciphertext now.
    pub fn wants_input(&self) -> bool {
        !self.peer_closed
            && !self.failed
            && self.plain().is_empty()
            && self.incoming.len() - self.incoming_done < MAX_INCOMING
    }

    /// Takes as much of `data` as there is room for; returns how many bytes.
    pub fn take_input(&mut self, data: &[u8]) -> usize {
        if !self.wants_input() {
            return 0;
        }
        self.incoming.drain(..self.incoming_done);
        self.incoming_done = 0;
        let take = (MAX_INCOMING - self.incoming.len()).min(data.len());
        self.incoming.extend_from_slice(&data[..take]);
        take
    }

    /// Decrypted bytes the connection has not taken yet.
    pub fn plain(&self) -> &[u8] {
        &self.plain[self.plain_taken..]
    }

    /// The connection took `count` decrypted bytes.
    pub fn consume_plain(&mut self, count: usize) {
        self.plain_taken += count;
        if self.plain_taken == self.plain.len() {
            self.plain.clear();
            self.plain_taken = 0;
        }
    }

    /// Encrypted bytes for the transport.
    pub fn output(&self) -> &[u8] {
        self.outgoing.pending()
    }

    /// The transport sent `count` bytes of [`TlsSession::output`].
    pub fn consume_output(&mut self, count: usize) {
        self.outgoing.consume(count);
    }

    /// Gives back the memory of emptied buffers but for one record each (the
    /// connection went idle: it may stay so for long).
    fn release_buffers(&mut self) {
        if self.incoming_done == self.incoming.len() {
            self.incoming.clear();
            self.incoming_done = 0;
            release(&mut self.incoming);
        }
        release(&mut self.plain);
        self.outgoing.release();
        self.gathered = Vec::new();
    }

    /// Runs the TLS state machine as far as the input allows: handshake records are
    /// answered, application data is decrypted into [`TlsSession::plain`] (ciphertext
    /// is read only while that is empty), and once the handshake is done `out` (the
    /// connection's plaintext output) is encrypted while the outgoing buffer has room.
    pub fn pump(&mut self, out: &mut OutQueue) -> Result<Progress, Failed> {
        let mut progress = Progress::default();
        loop {
            let reading = self.plain_taken == self.plain.len();
            let input: &mut [u8] = if reading {
                &mut self.incoming[self.incoming_done..]
            } else {
                &mut []
            };
            let status = self.session.process_tls_records(input);
            let discard = status.discard;
            let mut stop = false;
            match status.state.map_err(failing(&mut self.error))? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(failing(&mut self.error))?;
                        self.plain.extend_from_slice(record.payload);
                        progress.moved = true;
                    }
                }
                ConnectionState::ReadEarlyData(mut early) => {
                    // Early data is not enabled; whatever arrives as such is dropped.
                    while early.next_record().is_some() {}
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    self.outgoing
                        .append(KEPT_CAPACITY, |buffer| match encode.encode(buffer) {
                            Ok(written) => Ok(written),
                            Err(EncodeError::InsufficientSize(size)) => Err(Some(size)),
                            Err(_) => Err(None),
                        })?;
                    progress.moved = true;
                }
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    progress.peer_closed = true;
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    while !out.is_empty() && self.outgoing.pending().len() < MAX_OUTGOING {
                        let limit = (MAX_OUTGOING - self.outgoing.pending().len())
                            .clamp(RECORD_PLAINTEXT, ENCRYPT_BATCH);
                        let plaintext = next_plaintext(out, limit, &mut self.gathered);
                        let room = plaintext.len()
                            + plaintext.len().div_ceil(RECORD_PLAINTEXT) * RECORD_OVERHEAD;
                        self.outgoing.append(room, |buffer| {
                            match traffic.encrypt(plaintext, buffer) {
                                Ok(written) => Ok(written),
                                Err(EncryptError::InsufficientSize(size)) => Err(Some(size)),
                                Err(_) => Err(None),
                            }
                        })?;
                        let sent = plaintext.len();
                        out.consume(sent);
                        progress.moved = true;
                    }
                    stop = true;
                }
                // More input is needed, or the session is over.
                _ => stop = true,
            }
            if discard > 0 {
                self.incoming_done += discard;
                progress.moved = true;
            }
            if stop {
                return Ok(progress);
            }
        }
    }

    /// Moves bytes between the session and `connection` until neither moves: pumps
    /// the session, hands decrypted bytes to the connection, and ends the connection
    /// when the client closes the session (after what it sent) or breaks it (at once).
    /// Returns whether anything moved.
    pub fn exchange<B: Backend>(
        &mut self,
        connection: &mut Connection,
        limits: &Limits,
        shared: &mut Shared<'_, B>,
    ) -> bool {
        let mut any = false;
        loop {
            if self.failed {
                return any;
            }
            let progress = match self.pump(&mut connection.out) {
                Ok(progress) => progress,
                Err(Failed) => {
                    self.failed = true;
                    let failure = TlsFailure {
                        handshaking: self.session.is_handshaking(),
                        reason: self.error.take().map_or_else(
                            || String::from("TLS records could not be encoded"),
                            |error| alloc::format!("{error}"),
                        ),
                    };
                    shared.backend.tls_failed(connection.peer.address, &failure);
                    connection.stop(true);
                    return true;
                }
            };
            self.identify(connection);
            let plain = &self.plain[self.plain_taken..];
            let taken = if plain.is_empty() {
                0
            } else {
                connection.receive(plain, limits, shared)
            };
            self.consume_plain(taken);
            if progress.peer_closed {
                connection.stop(false);
            }
            if !progress.moved && taken == 0 {
                if connection.in_flight.is_empty() && connection.out.is_empty() {
                    self.release_buffers();
                }
                return any;
            }
            any = true;
        }
    }

    /// Once the handshake is done, gives the connection the certificate the client
    /// proved it holds (only a configuration with a client verifier asks for one, and
    /// the handshake fails unless the verifier accepts it).
    fn identify(&self, connection: &mut Connection) {
        if connection.peer.certificate.is_some() || self.session.is_handshaking() {
            return;
        }
        connection.peer.certificate = self
            .session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|certificate| Arc::from(certificate.as_ref()));
    }

    /// Takes ciphertext from `data` and works it through; returns how many bytes were
    /// taken (the rest must be offered again later).
    pub fn receive<B: Backend>(
        &mut self,
        data: &[u8],
        connection: &mut Connection,
        limits: &Limits,
        shared: &mut Shared<'_, B>,
    ) -> usize {
        let mut used = 0;
        loop {
            self.exchange(connection, limits, shared);
            let taken = if connection.wants_input(limits) {
                self.take_input(&data[used..])
            } else {
                0
            };
            used += taken;
            if taken == 0 {
                return used;
            }
        }
    }
}

/// Keeps rustls' error in `slot` (for the report) and fails the session.
fn failing(slot: &mut Option<rustls::Error>) -> impl FnOnce(rustls::Error) -> Failed + '_ {
    move |error| {
        *slot = Some(error);
        Failed
    }
}

/// Frees an empty buffer's memory beyond [`KEPT_CAPACITY`].
fn release(buffer: &mut Vec<u8>) {
    if buffer.is_empty() && buffer.capacity() > KEPT_CAPACITY {
        *buffer = Vec::new();
    }
}

/// The next plaintext to encrypt from `out`, at most `limit` bytes: whole records
/// straight from the front piece when it holds at least one, else the front pieces
/// gathered into one record in `gathered`.
fn next_plaintext<'a>(out: &'a OutQueue, limit: usize, gathered: &'a mut Vec<u8>) -> &'a [u8] {
    let front = out.chunks().next().unwrap_or_default();
    if front.len() >= RECORD_PLAINTEXT {
        let whole = front.len().min(limit) / RECORD_PLAINTEXT * RECORD_PLAINTEXT;
        return &front[..whole];
    }
    gathered.clear();
    for chunk in out.chunks() {
        let room = RECORD_PLAINTEXT - gathered.len();
        gathered.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if gathered.len() == RECORD_PLAINTEXT {
            break;
        }
    }
    gathered
}
