//! A byte-level NBD client for driving a [`Server`] directly (no sockets): encoders
//! for options and requests, decoders for every reply the server sends.

#![allow(dead_code)] // Each test file uses a different part.

pub mod feed;

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use nbd::wire::*;
use nbd::{Backend, ConnectionId, Server};

/// One client connection to an in-process server.
pub struct Peer {
    pub id: ConnectionId,
    inbox: VecDeque<u8>,
}

/// Lets the server work until nothing moves.
pub fn settle<B: Backend>(server: &mut Server<B>) {
    while server.poll() {}
}

/// The address test clients connect from unless they name one.
pub const LOOPBACK: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);

impl Peer {
    pub fn connect<B: Backend>(server: &mut Server<B>) -> Peer {
        Peer::connect_from(server, LOOPBACK)
    }

    /// A client at `address`, its greeting collected.
    pub fn connect_from<B: Backend>(server: &mut Server<B>, address: SocketAddr) -> Peer {
        let id = server.connect(address);
        let mut peer = Peer {
            id,
            inbox: VecDeque::new(),
        };
        peer.collect(server);
        peer
    }

    /// A connected peer past the greeting, with client flags `flags` sent.
    pub fn handshake<B: Backend>(server: &mut Server<B>, flags: u32) -> Peer {
        Peer::handshake_from(server, LOOPBACK, flags)
    }

    /// [`Peer::handshake`] for a client at `address`.
    pub fn handshake_from<B: Backend>(
        server: &mut Server<B>,
        address: SocketAddr,
        flags: u32,
    ) -> Peer {
        let mut peer = Peer::connect_from(server, address);
        let greeting = peer.take(GREETING_LEN);
        assert_eq!(&greeting[..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&greeting[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(
            be_u16(&greeting[16..]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        peer.send(server, &flags.to_be_bytes());
        peer
    }

    /// Negotiates structured replies (if asked), selects `base:allocation` (if
    /// structured) and opens `name` with GO. Returns the transmission flags.
    pub fn open<B: Backend>(
        &mut self,
        server: &mut Server<B>,
        name: &str,
        structured: bool,
    ) -> u16 {
        if structured {
            self.send(server, &option(OPT_STRUCTURED_REPLY, &[]));
            assert_eq!(self.option_reply().kind, REP_ACK);
            self.send(
                server,
                &option(OPT_SET_META_CONTEXT, &meta_data(name, &[BASE_ALLOCATION])),
            );
            let selected = self.option_reply();
            assert_eq!(selected.kind, REP_META_CONTEXT, "{selected:?}");
            assert_eq!(self.option_reply().kind, REP_ACK);
        }
        self.send(
            server,
            &option(OPT_GO, &info_data(name, &[INFO_BLOCK_SIZE])),
        );
        let mut flags = None;
        loop {
            let reply = self.option_reply();
            match reply.kind {
                REP_INFO if be_u16(&reply.data) == INFO_EXPORT => {
                    flags = Some(be_u16(&reply.data[10..]));
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!("GO failed with {other:#x}: {}", reply.text()),
            }
        }
        flags.expect("GO sent NBD_INFO_EXPORT")
    }

    /// Offers `bytes` until the server takes them all or stops taking; returns how many
    /// it took. Collects whatever the server sends meanwhile.
    pub fn send<B: Backend>(&mut self, server: &mut Server<B>, bytes: &[u8]) -> usize {
        let mut used = 0;
        loop {
            let taken = server.receive(self.id, &bytes[used..]);
            used += taken;
            let moved = server.poll();
            self.collect(server);
            if used == bytes.len() || (taken == 0 && !moved) {
                return used;
            }
        }
    }

    /// Moves everything the server has to say into the inbox.
    pub fn collect<B: Backend>(&mut self, server: &mut Server<B>) {
        loop {
            settle(server);
            let out: Vec<u8> = server.output(self.id).flatten().copied().collect();
            if out.is_empty() {
                return;
            }
            server.consume_output(self.id, out.len());
            self.inbox.extend(out);
        }
    }

    pub fn available(&self) -> usize {
        self.inbox.len()
    }

    pub fn take(&mut self, count: usize) -> Vec<u8> {
        assert!(
            self.inbox.len() >= count,
            "expected {count} bytes from the server, have {}",
            self.inbox.len()
        );
        self.inbox.drain(..count).collect()
    }

    pub fn option_reply(&mut self) -> OptionReply {
        let header = self.take(20);
        assert_eq!(be_u64(&header), OPTION_REPLY_MAGIC);
        let len = be_u32(&header[16..]) as usize;
        OptionReply {
            option: be_u32(&header[8..]),
            kind: be_u32(&header[12..]),
            data: self.take(len),
        }
    }

    /// Option replies up to and including the final one (ACK or an error).
    pub fn option_replies(&mut self) -> Vec<OptionReply> {
        let mut replies = Vec::new();
        loop {
            let reply = self.option_reply();
            let last = reply.kind == REP_ACK || reply.kind & 0x8000_0000 != 0;
            replies.push(reply);
            if last {
                return replies;
            }
        }
    }

    /// The next reply; `read_len` is the data length expected after a successful
    /// simple reply (0 for anything but reads).
    pub fn reply(&mut self, read_len: usize) -> Reply {
        self.reply_for(|_| read_len)
    }

    /// The next reply; `read_len` gives, by cookie, the data length expected after a
    /// successful simple reply.
    pub fn reply_for(&mut self, read_len: impl FnOnce(u64) -> usize) -> Reply {
        let magic = be_u32(&self.take_peek(4));
        if magic == SIMPLE_REPLY_MAGIC {
            let header = self.take(SIMPLE_REPLY_LEN);
            let error = be_u32(&header[4..]);
            let cookie = be_u64(&header[8..]);
            let data = if error == 0 {
                self.take(read_len(cookie))
            } else {
                Vec::new()
            };
            return Reply {
                cookie,
                error,
                data,
                chunks: Vec::new(),
                structured: false,
            };
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "reply magic");
        let mut chunks = Vec::new();
        loop {
            let header = self.take(CHUNK_HEADER_LEN);
            let len = be_u32(&header[16..]) as usize;
            let chunk = Chunk {
                flags: be_u16(&header[4..]),
                kind: be_u16(&header[6..]),
                cookie: be_u64(&header[8..]),
                payload: self.take(len),
            };
            let done = chunk.flags & REPLY_FLAG_DONE != 0;
            chunks.push(chunk);
            if done {
                break;
            }
        }
        let cookie = chunks[0].cookie;
        assert!(
            chunks.iter().all(|chunk| chunk.cookie == cookie),
            "chunks mix cookies"
        );
        let error = chunks
            .iter()
            .find(|chunk| chunk.kind & 0x8000 != 0)
            .map_or(0, |chunk| be_u32(&chunk.payload));
        Reply {
            cookie,
            error,
            data: Vec::new(),
            chunks,
            structured: true,
        }
    }

    fn take_peek(&self, count: usize) -> Vec<u8> {
        assert!(
            self.inbox.len() >= count,
            "expected a reply, have {} bytes",
            self.inbox.len()
        );
        self.inbox.iter().take(count).copied().collect()
    }

    /// Sends a request header (see [`request`]) and its payload, if any.
    pub fn send_request<B: Backend>(
        &mut self,
        server: &mut Server<B>,
        header: &[u8],
        payload: &[u8],
    ) {
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(payload);
        let taken = self.send(server, &bytes);
        assert_eq!(taken, bytes.len(), "server stopped taking the request");
    }
}

#[derive(Debug)]
pub struct OptionReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

impl OptionReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    /// Simple replies: the read data.
    pub data: Vec<u8>,
    /// Structured replies: every chunk, the last one DONE.
    pub chunks: Vec<Chunk>,
    pub structured: bool,
}

impl Reply {
    /// The message of a structured error reply.
    pub fn message(&self) -> String {
        let chunk = self
            .chunks
            .iter()
            .find(|chunk| chunk.kind == REPLY_TYPE_ERROR)
            .expect("an error chunk");
        let len = be_u16(&chunk.payload[4..]) as usize;
        String::from_utf8_lossy(&chunk.payload[6..6 + len]).into_owned()
    }

    /// The data of a successful read of `len` bytes at `offset`, reassembled from
    /// structured chunks (checking they cover the range exactly once).
    pub fn read_data(&self, offset: u64, len: usize) -> Vec<u8> {
        assert_eq!(self.error, 0, "read failed");
        if !self.structured {
            return self.data.clone();
        }
        let mut data = vec![0u8; len];
        let mut covered = vec![false; len];
        for chunk in &self.chunks {
            let (start, bytes) = match chunk.kind {
                REPLY_TYPE_OFFSET_DATA => (be_u64(&chunk.payload), chunk.payload[8..].to_vec()),
                REPLY_TYPE_OFFSET_HOLE => {
                    let size = be_u32(&chunk.payload[8..]) as usize;
                    assert_ne!(size, 0);
                    (be_u64(&chunk.payload), vec![0; size])
                }
                REPLY_TYPE_NONE => continue,
                other => panic!("unexpected chunk type {other}"),
            };
            let at = (start - offset) as usize;
            data[at..at + bytes.len()].copy_from_slice(&bytes);
            for flag in &mut covered[at..at + bytes.len()] {
                assert!(!*flag, "chunks overlap");
                *flag = true;
            }
        }
        assert!(covered.iter().all(|&c| c), "chunks do not cover the read");
        data
    }

    /// The (length, flags) descriptors of a block-status reply.
    pub fn extents(&self) -> Vec<(u32, u32)> {
        assert_eq!(self.error, 0, "block status failed");
        let chunk = &self.chunks[0];
        assert_eq!(chunk.kind, REPLY_TYPE_BLOCK_STATUS);
        chunk.payload[4..]
            .as_chunks::<8>()
            .0
            .iter()
            .map(|d| (be_u32(d), be_u32(&d[4..])))
            .collect()
    }
}

pub fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&code.to_be_bytes());
    bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data.
pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        data.extend_from_slice(&info.to_be_bytes());
    }
    data
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query.as_bytes());
    }
    data
}

pub fn request(flags: u16, command: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(REQUEST_HEADER_LEN);
    bytes.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    bytes.extend_from_slice(&flags.to_be_bytes());
    bytes.extend_from_slice(&command.to_be_bytes());
    bytes.extend_from_slice(&cookie.to_be_bytes());
    bytes.extend_from_slice(&offset.to_be_bytes());
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    fastrand::Rng::with_seed(seed).fill(&mut bytes);
    bytes
}
