//! The server-wide memory bound: requests that do not fit wait and then complete,
//! requests that can never fit are refused with `ENOMEM`, and neither the handshake
//! nor requests without buffers are held back by it.

mod support;

use nbd::wire::*;
use nbd::{CompletionOrder, Limits, MemoryBackend, MemoryExport, Server};
use proptest::prelude::*;
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

/// One request of a client in the property test: a read of the first half of the
/// export, or a write to the client's own part of the second half.
#[derive(Clone, Copy, Debug)]
struct Op {
    write: bool,
    sector: u64,
    sectors: u32,
}

fn op() -> impl Strategy<Value = Op> {
    (any::<bool>(), 0..4096u64, 1..=1024u32).prop_map(|(write, sector, sectors)| Op {
        write,
        sector,
        sectors,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Several clients pipelining reads and writes under any bound: every request
    /// is answered (refused with ENOMEM exactly when it is larger than the bound),
    /// reads return the data, and all memory is given back.
    #[test]
    fn every_request_is_answered_under_any_bound(
        limit in 0..(2usize << 20),
        seed in any::<u64>(),
        clients in prop::collection::vec(prop::collection::vec(op(), 1..24), 1..6),
    ) {
        let mut server = server(limit);
        server.backend_mut().set_completion_order(CompletionOrder::Shuffled(seed));
        let all = pattern(EXPORT_SEED, EXPORT_BYTES);
        let half = EXPORT_BYTES as u64 / 2;
        let part = half / clients.len() as u64 / 512 * 512;
        let mut peers: Vec<Client> = clients
            .iter()
            .enumerate()
            .map(|(index, ops)| {
                let peer = open_peer(&mut server);
                let mut unsent = Vec::new();
                let mut expected = Vec::new();
                for (cookie, op) in ops.iter().enumerate() {
                    let len = op.sectors as usize * 512;
                    let offset = if op.write {
                        half + index as u64 * part + (op.sector * 512) % (part - len as u64 + 1) / 512 * 512
                    } else {
                        op.sector * 512
                    };
                    let command = if op.write { CMD_WRITE } else { CMD_READ };
                    unsent.extend(request(0, command, cookie as u64, offset, len as u32));
                    if op.write {
                        unsent.extend(pattern(cookie as u64, len));
                    }
                    expected.push((cookie as u64, if op.write { usize::MAX } else { offset as usize }, len));
                }
                Client { peer, unsent, expected }
            })
            .collect();
        let mut stalled_rounds = 0;
        while peers.iter().any(|client| !client.expected.is_empty()) {
            let mut moved = false;
            for client in &mut peers {
                let taken = client.peer.send(&mut server, &client.unsent);
                client.unsent.drain(..taken);
                moved |= taken > 0;
                while client.peer.available() > 0 {
                    moved = true;
                    let expected = &client.expected;
                    let reply = client.peer.reply_for(|cookie| {
                        let (_, offset, len) = expected.iter().find(|(c, ..)| *c == cookie).unwrap();
                        if *offset == usize::MAX { 0 } else { *len }
                    });
                    let position = expected.iter().position(|(cookie, ..)| *cookie == reply.cookie).unwrap();
                    let (_, offset, len) = client.expected.remove(position);
                    let error = if len > limit { ENOMEM } else { 0 };
                    prop_assert_eq!(reply.error, error, "request of {} bytes under {}", len, limit);
                    if error == 0 && offset != usize::MAX {
                        prop_assert!(reply.data == all[offset..offset + len]);
                    }
                }
            }
            stalled_rounds = if moved { 0 } else { stalled_rounds + 1 };
            prop_assert!(stalled_rounds < 3, "wedged: {:?}", server.memory_use());
        }
        let after = server.memory_use();
        prop_assert_eq!((after.held, after.waiting), (0, 0));
    }
}
