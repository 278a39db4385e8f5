//! TLS after `NBD_OPT_STARTTLS`: one rustls server session per connection, between
//! the transport's bytes and the connection's plaintext.
//!
//! rustls' unbuffered API is sans-I/O like the rest of the server: received
//! ciphertext is gathered in `incoming`, decrypted records wait in `plain` until the
//! connection takes them, and what the connection says is encrypted into `outgoing`
//! for the transport. Every buffer is bounded: ciphertext is taken only while
//! `incoming` has room and no decrypted bytes wait, and the connection's output is
//! encrypted only while less than [`MAX_OUTGOING`] bytes wait to be sent, so the
//! connection's own limits keep applying back-pressure. A buffer that empties gives
//! back all but one record's worth of memory, so an idle session holds little, and
//! what the buffers hold counts in the server's memory figures
//! ([`TlsSession::footprint`]).

use alloc::sync::Arc;
use alloc::vec::Vec;
use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};

use crate::backend::Backend;
use crate::connection::{Connection, Limits, Shared};
use crate::output::OutQueue;

/// Ciphertext held before it is decrypted: four full TLS records.
const MAX_INCOMING: usize = 4 * (16 * 1024 + 2048);
/// Encrypted bytes waiting for the transport before more output is encrypted.
const MAX_OUTGOING: usize = 256 * 1024;
/// Plaintext put in one TLS record.
const RECORD_PLAINTEXT: usize = 16 * 1024;
/// Capacity an emptied buffer keeps: one record and its overhead.
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

pub(crate) struct TlsSession {
    session: UnbufferedServerConnection,
    incoming: Vec<u8>,
    plain: Vec<u8>,
    /// Bytes of `plain` the connection has taken.
    plain_taken: usize,
    outgoing: Vec<u8>,
    /// Bytes of `outgoing` the transport has sent.
    sent: usize,
    peer_closed: bool,
    /// The session broke (bad record, failed handshake): nothing more moves.
    failed: bool,
}

impl TlsSession {
    /// A session answering the client's handshake; `first_bytes` (plaintext the
    /// connection had queued before the switch, i.e. the STARTTLS acknowledgement) go
    /// out before any TLS record.
    pub fn new(config: Arc<ServerConfig>, first_bytes: &mut OutQueue) -> Result<Self, Failed> {
        let session = UnbufferedServerConnection::new(config).map_err(|_| Failed)?;
        let mut outgoing = Vec::with_capacity(first_bytes.len());
        for chunk in first_bytes.chunks() {
            outgoing.extend_from_slice(chunk);
        }
        first_bytes.clear();
        Ok(TlsSession {
            session,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_taken: 0,
            outgoing,
            sent: 0,
            peer_closed: false,
            failed: false,
        })
    }

    /// Bytes of memory the session's buffers hold (rustls' own state aside).
    pub fn footprint(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }

    /// Whether the session takes ciphertext now.
    pub fn wants_input(&self) -> bool {
        !self.peer_closed
            && !self.failed
            && self.plain().is_empty()
            && self.incoming.len() < MAX_INCOMING
    }

    /// Takes as much of `data` as there is room for; returns how many bytes.
    pub fn take_input(&mut self, data: &[u8]) -> usize {
        if !self.wants_input() {
            return 0;
        }
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
            release(&mut self.plain);
        }
    }

    /// Encrypted bytes for the transport.
    pub fn output(&self) -> &[u8] {
        &self.outgoing[self.sent..]
    }

    /// The transport sent `count` bytes of [`TlsSession::output`].
    pub fn consume_output(&mut self, count: usize) {
        self.sent = (self.sent + count).min(self.outgoing.len());
        if self.sent == self.outgoing.len() {
            self.outgoing.clear();
            self.sent = 0;
            release(&mut self.outgoing);
        } else if self.sent >= MAX_OUTGOING {
            self.outgoing.drain(..self.sent);
            self.sent = 0;
        }
    }

    /// Runs the TLS state machine as far as the input allows: handshake records are
    /// answered, application data is decrypted into [`TlsSession::plain`] (ciphertext
    /// is read only while that is empty), and once the handshake is done `out` (the
    /// connection's plaintext output) is encrypted while the outgoing buffer has room.
    pub fn pump(&mut self, out: &mut OutQueue) -> Result<Progress, Failed> {
        let mut progress = Progress::default();
        loop {
            let reading = self.plain_taken == self.plain.len();
            let input: &mut [u8] = if reading { &mut self.incoming } else { &mut [] };
            let status = self.session.process_tls_records(input);
            let discard = status.discard;
            let mut stop = false;
            match status.state.map_err(|_| Failed)? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(|_| Failed)?;
                        self.plain.extend_from_slice(record.payload);
                        progress.moved = true;
                    }
                }
                ConnectionState::ReadEarlyData(mut early) => {
                    // Early data is not enabled; whatever arrives as such is dropped.
                    while early.next_record().is_some() {}
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    append(&mut self.outgoing, |buffer| match encode.encode(buffer) {
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
                    while !out.is_empty() && self.outgoing.len() - self.sent < MAX_OUTGOING {
                        let mut record = Vec::with_capacity(RECORD_PLAINTEXT);
                        for chunk in out.chunks() {
                            let room = RECORD_PLAINTEXT - record.len();
                            record.extend_from_slice(&chunk[..chunk.len().min(room)]);
                            if record.len() == RECORD_PLAINTEXT {
                                break;
                            }
                        }
                        append(&mut self.outgoing, |buffer| {
                            match traffic.encrypt(&record, buffer) {
                                Ok(written) => Ok(written),
                                Err(EncryptError::InsufficientSize(size)) => Err(Some(size)),
                                Err(_) => Err(None),
                            }
                        })?;
                        out.consume(record.len());
                        progress.moved = true;
                    }
                    stop = true;
                }
                // More input is needed, or the session is over.
                _ => stop = true,
            }
            if discard > 0 {
                self.incoming.drain(..discard);
                release(&mut self.incoming);
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

/// Frees an empty buffer's memory beyond [`KEPT_CAPACITY`].
fn release(buffer: &mut Vec<u8>) {
    if buffer.is_empty() && buffer.capacity() > KEPT_CAPACITY {
        *buffer = Vec::new();
    }
}

/// Appends what `write` puts into a buffer to `outgoing`, growing the buffer to the
/// size `write` asks for when the first one was too small.
fn append(
    outgoing: &mut Vec<u8>,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<InsufficientSizeError>>,
) -> Result<(), Failed> {
    let start = outgoing.len();
    let mut room = RECORD_PLAINTEXT + 512;
    loop {
        outgoing.resize(start + room, 0);
        match write(&mut outgoing[start..]) {
            Ok(written) => {
                outgoing.truncate(start + written);
                return Ok(());
            }
            Err(Some(size)) if size.required_size > room => room = size.required_size,
            Err(_) => {
                outgoing.truncate(start);
                return Err(Failed);
            }
        }
    }
}
