//! Feeding arbitrary bytes to a server and checking that it neither panics nor wedges.
//! Shared by the proptest suite and the cargo-fuzz target (`fuzz/`), so both check the
//! same properties.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use nbd::wire::*;
use nbd::{CompletionOrder, Limits, MemoryBackend, MemoryExport, Server};

/// Where the fed client connects from.
const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40001);

/// How far a well-behaved client has got before the arbitrary bytes start.
#[derive(Clone, Copy, Debug)]
pub enum Start {
    /// Right after the greeting: the bytes begin with the client flags.
    Greeting,
    /// Client flags sent: the bytes are options.
    Options,
    /// Structured replies, `base:allocation` and GO done: the bytes are requests.
    Transmission,
}

/// A small server that makes every path reachable quickly: tiny limits, a shallow
/// backend queue, shuffled completions, a read-only export, an export with an origin.
pub fn small_server(seed: u64) -> Server<MemoryBackend> {
    let mut backend = MemoryBackend::default();
    backend.add_export(MemoryExport::new("vol0", 2048));
    let mut read_only = MemoryExport::new("ro", 256);
    read_only.read_only = true;
    backend.add_export(read_only);
    backend.set_default_export(Some("vol0"));
    backend.set_queue_depth(3);
    backend.set_completion_order(CompletionOrder::Shuffled(seed));
    backend.set_capacity_blocks(Some(8));
    let limits = Limits {
        max_requests: 4,
        max_buffered_bytes: 256 * 1024,
    };
    Server::new(backend, limits)
}

/// The bytes a well-behaved client sends to reach `start`.
pub fn prologue(start: Start) -> Vec<u8> {
    let mut bytes = Vec::new();
    if matches!(start, Start::Greeting) {
        return bytes;
    }
    bytes.extend((CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    if matches!(start, Start::Options) {
        return bytes;
    }
    let mut option = |code: u32, data: &[u8]| {
        bytes.extend(IHAVEOPT.to_be_bytes());
        bytes.extend(code.to_be_bytes());
        bytes.extend((data.len() as u32).to_be_bytes());
        bytes.extend(data);
    };
    option(OPT_STRUCTURED_REPLY, &[]);
    let mut meta = Vec::new();
    meta.extend(4u32.to_be_bytes());
    meta.extend(b"vol0");
    meta.extend(1u32.to_be_bytes());
    meta.extend((BASE_ALLOCATION.len() as u32).to_be_bytes());
    meta.extend(BASE_ALLOCATION.as_bytes());
    option(OPT_SET_META_CONTEXT, &meta);
    let mut go = Vec::new();
    go.extend(4u32.to_be_bytes());
    go.extend(b"vol0");
    go.extend(0u16.to_be_bytes());
    option(OPT_GO, &go);
    bytes
}

/// Feeds `start`'s prologue and then `input`, in pieces whose sizes come from
/// `pieces` (cycled; at least one byte each), draining the
/// output only when `reads` says so for that step. Panics if the server wedges: when,
/// with its output drained and its backend idle, it neither takes input nor ends; or
/// when, after the peer closes, it does not end; or when it leaks an open export.
pub fn feed_and_check(seed: u64, start: Start, input: &[u8], pieces: &[usize], reads: &[bool]) {
    let mut server = small_server(seed);
    let id = server.connect(CLIENT);
    let mut bytes = prologue(start);
    bytes.extend_from_slice(input);
    let mut used = 0;
    let mut step = 0;
    while used < bytes.len() {
        let piece = pieces
            .get(step % pieces.len().max(1))
            .copied()
            .unwrap_or(bytes.len())
            .max(1);
        let read = reads
            .get(step % reads.len().max(1))
            .copied()
            .unwrap_or(true);
        step += 1;
        let end = (used + piece).min(bytes.len());
        used += server.receive(id, &bytes[used..end]);
        while server.poll() {}
        if read {
            let waiting = server.output_len(id);
            server.consume_output(id, waiting);
        }
        if !server.wants_input(id) {
            // A client that reads everything must get the server going again, unless
            // the connection is ending.
            drain(&mut server, id);
            if !server.wants_input(id) {
                assert!(
                    server.should_close(id),
                    "wedged after {used} of {} bytes",
                    bytes.len()
                );
                break;
            }
        }
        assert!(step <= bytes.len(), "no progress");
    }
    server.peer_closed(id);
    drain(&mut server, id);
    assert!(server.should_close(id), "did not end after the peer closed");
    assert!(!server.wants_input(id));
    server.release(id);
    while server.poll() {}
    assert_eq!(server.connection_count(), 0);
    assert_eq!(server.backend().open_count(), 0);
}

fn drain(server: &mut Server<MemoryBackend>, id: nbd::ConnectionId) {
    loop {
        let moved = server.poll();
        let waiting = server.output_len(id);
        server.consume_output(id, waiting);
        if !moved && waiting == 0 {
            return;
        }
    }
}
