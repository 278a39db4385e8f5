//! The server-wide memory bound: requests that do not fit wait and then complete,
//! requests that can never fit are refused with `ENOMEM`, and neither the handshake
//! nor requests without buffers are held back by it.

mod support;

use nbd::wire::*;
use nbd::{CompletionOrder, Limits, MemoryBackend, MemoryExport, Server};
use support::{Peer, pattern, request};

const KIB: usize = 1024;
const FIXED_NO_ZEROES: u32 = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;
/// Bytes of the export, filled with `pattern(EXPORT_SEED, ..)`.
const EXPORT_BYTES: usize = 8 << 20;
const EXPORT_SEED: u64 = 5;

fn server(limit: usize) -> Server<MemoryBackend> {
    let mut backend = MemoryBackend::default();
    backend.add_export(MemoryExport::new("vol0", (EXPORT_BYTES / 512) as u64));
    backend
        .write_at("vol0", 0, &pattern(EXPORT_SEED, EXPORT_BYTES))
        .unwrap();
    let mut server = Server::new(backend, Limits::default());
    server.set_memory_limit(limit);
    server
}

fn open_peer(server: &mut Server<MemoryBackend>) -> Peer {
    let mut peer = Peer::handshake(server, FIXED_NO_ZEROES);
    peer.open(server, "vol0", false);
    peer
}

/// A client with requests still to send and the reads it expects back, by cookie.
struct Client {
    peer: Peer,
    unsent: Vec<u8>,
    expected: Vec<(u64, usize, usize)>,
}

#[test]
fn reads_beyond_the_bound_wait_for_memory_and_all_complete() {
    const READ: usize = 256 * KIB;
    const LIMIT: usize = 4 * READ;
    let mut server = server(LIMIT);
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Held);
    let mut clients: Vec<Client> = (0..4u64)
        .map(|index| {
            let peer = open_peer(&mut server);
            let mut unsent = Vec::new();
            let mut expected = Vec::new();
            for request_index in 0..4u64 {
                let cookie = index * 10 + request_index;
                let offset = ((index * 4 + request_index) as usize * READ) % EXPORT_BYTES;
                unsent.extend(request(0, CMD_READ, cookie, offset as u64, READ as u32));
                expected.push((cookie, offset, READ));
            }
            Client {
                peer,
                unsent,
                expected,
            }
        })
        .collect();
    for client in &mut clients {
        let taken = client.peer.send(&mut server, &client.unsent);
        client.unsent.drain(..taken);
    }
    // The first client's four reads hold all the memory; the others each parked
    // their first read after its header.
    let pressure = server.memory_use();
    assert_eq!(pressure.held, LIMIT);
    assert_eq!((pressure.waiting, pressure.waits), (3, 3));
    assert!(clients[0].unsent.is_empty());
    for client in &clients[1..] {
        assert_eq!(client.unsent.len(), 3 * REQUEST_HEADER_LEN);
        assert!(!server.wants_input(client.peer.id));
    }

    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Fifo);
    let mut answered = 0;
    for _round in 0..100 {
        for client in &mut clients {
            let taken = client.peer.send(&mut server, &client.unsent);
            client.unsent.drain(..taken);
            assert!(server.memory_use().held <= LIMIT);
            while client.peer.available() > 0 {
                let reply = client.peer.reply(READ);
                assert_eq!(reply.error, 0);
                let position = client
                    .expected
                    .iter()
                    .position(|(cookie, ..)| *cookie == reply.cookie)
                    .expect("a reply to a request that was sent");
                let (_, offset, len) = client.expected.remove(position);
                let all = pattern(EXPORT_SEED, EXPORT_BYTES);
                assert!(reply.data == all[offset..offset + len], "read at {offset}");
                answered += 1;
            }
        }
        if answered == 16 {
            break;
        }
    }
    assert_eq!(answered, 16);
    let after = server.memory_use();
    assert_eq!((after.held, after.waiting, after.refused), (0, 0, 0));
}

#[test]
fn a_request_larger_than_the_bound_is_refused_and_the_connection_stays_in_step() {
    let mut server = server(64 * KIB);
    let mut peer = open_peer(&mut server);
    peer.send_request(
        &mut server,
        &request(0, CMD_READ, 1, 0, 128 * KIB as u32),
        &[],
    );
    let reply = peer.reply(0);
    assert_eq!((reply.cookie, reply.error), (1, ENOMEM));
    // A write's payload is skipped, then refused.
    peer.send_request(
        &mut server,
        &request(0, CMD_WRITE, 2, 0, 128 * KIB as u32),
        &[0xaa; 128 * KIB],
    );
    let reply = peer.reply(0);
    assert_eq!((reply.cookie, reply.error), (2, ENOMEM));
    peer.send_request(&mut server, &request(0, CMD_READ, 3, 4096, 4096), &[]);
    let reply = peer.reply(4096);
    assert_eq!((reply.cookie, reply.error), (3, 0));
    assert!(reply.data == pattern(EXPORT_SEED, EXPORT_BYTES)[4096..8192]);
    assert_eq!(server.memory_use().refused, 2);
    let mut all = vec![0; EXPORT_BYTES];
    server.backend().read_at("vol0", 0, &mut all).unwrap();
    assert!(
        all == pattern(EXPORT_SEED, EXPORT_BYTES),
        "the refused write wrote"
    );
}

#[test]
fn with_no_memory_the_handshake_and_requests_without_buffers_still_work() {
    let mut server = server(0);
    let mut peer = open_peer(&mut server);
    peer.send_request(&mut server, &request(0, CMD_FLUSH, 1, 0, 0), &[]);
    assert_eq!(peer.reply(0).error, 0);
    peer.send_request(&mut server, &request(0, CMD_TRIM, 2, 0, 4096), &[]);
    assert_eq!(peer.reply(0).error, 0);
    peer.send_request(&mut server, &request(0, CMD_READ, 3, 0, 512), &[]);
    assert_eq!(peer.reply(0).error, ENOMEM);
    // Memory freed later lets the same connection read again.
    server.set_memory_limit(512);
    peer.send_request(&mut server, &request(0, CMD_READ, 4, 512, 512), &[]);
    let reply = peer.reply(512);
    assert_eq!(reply.error, 0);
    assert!(reply.data == pattern(EXPORT_SEED, EXPORT_BYTES)[512..1024]);
}

#[test]
fn a_parked_write_takes_its_payload_once_memory_is_freed() {
    const WRITE: usize = 64 * KIB;
    let mut server = server(WRITE);
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Held);
    let mut first = open_peer(&mut server);
    let mut second = open_peer(&mut server);
    let data = pattern(77, WRITE);
    first.send_request(
        &mut server,
        &request(0, CMD_WRITE, 1, 0, WRITE as u32),
        &data,
    );
    let mut bytes = request(0, CMD_WRITE, 2, WRITE as u64, WRITE as u32);
    bytes.extend_from_slice(&data);
    let taken = second.send(&mut server, &bytes);
    assert_eq!(taken, REQUEST_HEADER_LEN, "only the header is read");
    assert_eq!(server.memory_use().waiting, 1);
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Fifo);
    first.collect(&mut server);
    assert_eq!(first.reply(0).error, 0);
    assert_eq!(second.send(&mut server, &bytes[taken..]), WRITE);
    assert_eq!(second.reply(0).error, 0);
    let mut back = vec![0; 2 * WRITE];
    server.backend().read_at("vol0", 0, &mut back).unwrap();
    assert!(back[..WRITE] == data[..] && back[WRITE..] == data[..]);
}
