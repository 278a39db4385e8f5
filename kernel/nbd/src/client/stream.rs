//! Byte transports for the client: the [`Stream`] trait (smoltcp sockets in the
//! kernel, std TCP on the host) and [`Connection`], a client moving bytes over one.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use super::{Client, ClientError, RemoteExport, Reply};

/// Bytes read from a stream at a time.
const RECEIVE_CHUNK: usize = 64 * 1024;
/// Receive rounds per pump: bounds the time one call spends.
const RECEIVE_ROUNDS: usize = 64;

/// Why a stream stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamError {
    /// The peer closed the connection.
    Closed,
    /// The connection failed (reset, unreachable, timed out); the text says how.
    Failed(String),
}

/// A connected byte stream that never blocks.
pub trait Stream {
    /// Sends a prefix of `bytes`; returns how many were taken (0 when the stream
    /// cannot take more now).
    fn send(&mut self, bytes: &[u8]) -> Result<usize, StreamError>;
    /// Receives into `buf`; returns how many bytes came (0 when none are waiting).
    fn receive(&mut self, buf: &mut [u8]) -> Result<usize, StreamError>;
    /// Whether the connection is still being set up (the handshake cannot start).
    fn connecting(&self) -> bool {
        false
    }
}

impl<S: Stream + ?Sized> Stream for Box<S> {
    fn send(&mut self, bytes: &[u8]) -> Result<usize, StreamError> {
        (**self).send(bytes)
    }
    fn receive(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        (**self).receive(buf)
    }
    fn connecting(&self) -> bool {
        (**self).connecting()
    }
}

/// A [`Client`] over a [`Stream`].
pub struct Connection<S> {
    client: Client,
    stream: S,
    /// Output the stream has not taken yet.
    unsent: Vec<u8>,
    buf: Vec<u8>,
}

impl<S: Stream> Connection<S> {
    pub fn new(client: Client, stream: S) -> Self {
        Connection {
            client,
            stream,
            unsent: Vec::new(),
            buf: alloc::vec![0; RECEIVE_CHUNK],
        }
    }

    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// The export, once the handshake is over.
    pub fn export(&self) -> Option<&RemoteExport> {
        self.client.export()
    }

    /// Requests whose replies have not come back yet.
    pub fn in_flight(&self) -> usize {
        self.client.in_flight()
    }

    /// Sends what the client has to say and feeds it what arrived, without
    /// blocking; returns whether any byte moved.
    pub fn pump(&mut self) -> Result<bool, ClientError> {
        if self.stream.connecting() {
            return Ok(false);
        }
        let mut moved = false;
        if self.client.has_output() {
            let more = self.client.take_output();
            self.unsent.extend_from_slice(&more);
        }
        while !self.unsent.is_empty() {
            let sent = self
                .stream
                .send(&self.unsent)
                .map_err(|error| self.lost(error))?;
            if sent == 0 {
                break;
            }
            self.unsent.drain(..sent);
            moved = true;
        }
        for _ in 0..RECEIVE_ROUNDS {
            // Read data is received straight into its read's buffer; headers (and
            // whatever follows them) through `buf`.
            if let Some(space) = self.client.payload_space() {
                let got = self.stream.receive(space);
                let got = got.map_err(|error| self.lost(error))?;
                if got == 0 {
                    break;
                }
                moved = true;
                self.client.payload_filled(got)?;
                continue;
            }
            let got = self
                .stream
                .receive(&mut self.buf)
                .map_err(|error| self.lost(error))?;
            if got == 0 {
                break;
            }
            moved = true;
            self.client.receive(&self.buf[..got])?;
        }
        Ok(moved)
    }

    /// The next finished request, if any.
    pub fn next_reply(&mut self) -> Option<Reply> {
        self.client.next_reply()
    }

    fn lost(&mut self, error: StreamError) -> ClientError {
        match error {
            StreamError::Closed => self.client.closed(),
            StreamError::Failed(why) => ClientError::Closed(why),
        }
    }
}

#[cfg(feature = "std")]
mod tcp {
    use std::format;
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream;

    use super::{Stream, StreamError};

    /// A std TCP stream in non-blocking mode, `TCP_NODELAY` set.
    impl Stream for TcpStream {
        fn send(&mut self, bytes: &[u8]) -> Result<usize, StreamError> {
            match self.write(bytes) {
                Ok(0) => Err(StreamError::Closed),
                Ok(sent) => Ok(sent),
                Err(error) if error.kind() == ErrorKind::WouldBlock => Ok(0),
                Err(error) if error.kind() == ErrorKind::Interrupted => Ok(0),
                Err(error) => Err(StreamError::Failed(format!("connection lost: {error}"))),
            }
        }

        fn receive(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
            match self.read(buf) {
                Ok(0) => Err(StreamError::Closed),
                Ok(got) => Ok(got),
                Err(error) if error.kind() == ErrorKind::WouldBlock => Ok(0),
                Err(error) if error.kind() == ErrorKind::Interrupted => Ok(0),
                Err(error) => Err(StreamError::Failed(format!("connection lost: {error}"))),
            }
        }
    }
}
