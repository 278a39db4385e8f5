//! The transmission phase over byte buffers: every command, every error path,
//! structured and simple replies, out-of-order completion, back-pressure and endings.

mod support;

use blockdev::MemDisk;
use nbd::wire::*;
use nbd::{CompletionOrder, Limits, MemoryBackend, MemoryExport, Server};
use support::{Peer, info_data, option, pattern, request};

const FIXED_NO_ZEROES: u32 = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;
const KIB: u64 = 1024;
/// Bytes of origin data under the "child" export (the first half of it).
const ORIGIN_BYTES: usize = 512 * 1024;

fn backend() -> MemoryBackend {
    let mut backend = MemoryBackend::default();
    backend.add_export(MemoryExport::new("vol0", 2048));
    let mut read_only = MemoryExport::new("ro", 1024);
    read_only.read_only = true;
    backend.add_export(read_only);
    let mut plain = MemoryExport::new("plain", 1024);
    plain.trim = false;
    plain.write_zeroes = false;
    plain.fast_zero = false;
    backend.add_export(plain);
    let origin = MemDisk::new(ORIGIN_BYTES as u64 / 512);
    origin.write_at(0, &pattern(99, ORIGIN_BYTES));
    let mut child = MemoryExport::new("child", 2048);
    child.origin = Some(origin);
    backend.add_export(child);
    backend
}

fn open_with(
    backend: MemoryBackend,
    limits: Limits,
    name: &str,
    structured: bool,
) -> (Server<MemoryBackend>, Peer) {
    let mut server = Server::new(backend, limits);
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    peer.open(&mut server, name, structured);
    (server, peer)
}

fn open(name: &str, structured: bool) -> (Server<MemoryBackend>, Peer) {
    open_with(backend(), Limits::default(), name, structured)
}

/// Sends one request and returns its reply.
fn call(
    server: &mut Server<MemoryBackend>,
    peer: &mut Peer,
    flags: u16,
    command: u16,
    offset: u64,
    len: u32,
    payload: &[u8],
) -> support::Reply {
    let cookie = 0x1234_5678_9abc_def0 ^ offset ^ u64::from(command);
    peer.send_request(
        server,
        &request(flags, command, cookie, offset, len),
        payload,
    );
    let read_len = if command == CMD_READ { len as usize } else { 0 };
    let reply = peer.reply(read_len);
    assert_eq!(reply.cookie, cookie);
    reply
}

fn read(server: &mut Server<MemoryBackend>, peer: &mut Peer, offset: u64, len: u32) -> Vec<u8> {
    call(server, peer, 0, CMD_READ, offset, len, &[]).read_data(offset, len as usize)
}

fn write(server: &mut Server<MemoryBackend>, peer: &mut Peer, offset: u64, data: &[u8]) {
    let reply = call(server, peer, 0, CMD_WRITE, offset, data.len() as u32, data);
    assert_eq!(reply.error, 0);
}

fn extents(
    server: &mut Server<MemoryBackend>,
    peer: &mut Peer,
    flags: u16,
    offset: u64,
    len: u32,
) -> Vec<(u32, u32)> {
    call(server, peer, flags, CMD_BLOCK_STATUS, offset, len, &[]).extents()
}

const HOLE_ZERO: u32 = STATE_HOLE | STATE_ZERO;

#[test]
fn writes_read_back_with_simple_replies() {
    let (mut server, mut peer) = open("vol0", false);
    let data = pattern(1, 136 * 512);
    write(&mut server, &mut peer, 4096, &data);
    let reply = call(
        &mut server,
        &mut peer,
        0,
        CMD_READ,
        4096,
        data.len() as u32,
        &[],
    );
    assert!(!reply.structured);
    assert_eq!(reply.data, data);
    assert_eq!(read(&mut server, &mut peer, 0, 4096), vec![0; 4096]);
}

#[test]
fn structured_reads_send_holes_as_holes_and_data_as_data() {
    let (mut server, mut peer) = open("vol0", true);
    let data = pattern(2, 64 * 1024);
    write(&mut server, &mut peer, 128 * KIB, &data);
    let reply = call(
        &mut server,
        &mut peer,
        0,
        CMD_READ,
        64 * KIB,
        192 * 1024,
        &[],
    );
    let kinds: Vec<(u16, u16)> = reply.chunks.iter().map(|c| (c.kind, c.flags)).collect();
    assert_eq!(
        kinds,
        [
            (REPLY_TYPE_OFFSET_HOLE, 0),
            (REPLY_TYPE_OFFSET_DATA, 0),
            (REPLY_TYPE_OFFSET_HOLE, REPLY_FLAG_DONE),
        ]
    );
    let back = reply.read_data(64 * KIB, 192 * 1024);
    assert_eq!(&back[64 * 1024..128 * 1024], &data[..]);
    assert!(
        back[..64 * 1024]
            .iter()
            .chain(&back[128 * 1024..])
            .all(|&b| b == 0)
    );

    // Don't fragment: a single data chunk carrying the zeroes explicitly.
    let reply = call(
        &mut server,
        &mut peer,
        CMD_FLAG_DF,
        CMD_READ,
        64 * KIB,
        192 * 1024,
        &[],
    );
    assert_eq!(reply.chunks.len(), 1);
    assert_eq!(reply.chunks[0].kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(reply.read_data(64 * KIB, 192 * 1024), back);
    // ... unless all of it is a hole.
    let reply = call(&mut server, &mut peer, CMD_FLAG_DF, CMD_READ, 0, 4096, &[]);
    assert_eq!(reply.chunks.len(), 1);
    assert_eq!(reply.chunks[0].kind, REPLY_TYPE_OFFSET_HOLE);
}

#[test]
fn holes_over_an_external_origin_read_its_data() {
    let (mut server, mut peer) = open("child", true);
    let origin = pattern(99, ORIGIN_BYTES);
    let reply = call(&mut server, &mut peer, 0, CMD_READ, 0, 128 * 1024, &[]);
    assert!(
        reply
            .chunks
            .iter()
            .all(|c| c.kind != REPLY_TYPE_OFFSET_HOLE)
    );
    assert_eq!(reply.read_data(0, 128 * 1024), origin[..128 * 1024]);
    // Past the origin's end holes read as zeroes again.
    let reply = call(&mut server, &mut peer, 0, CMD_READ, 768 * KIB, 4096, &[]);
    assert_eq!(reply.chunks[0].kind, REPLY_TYPE_OFFSET_HOLE);

    // A partial write copies the rest of the block from the origin.
    write(&mut server, &mut peer, 4096, &[0xee; 512]);
    let back = read(&mut server, &mut peer, 0, 64 * 1024);
    assert_eq!(&back[..4096], &origin[..4096]);
    assert_eq!(&back[4096..4608], &[0xee; 512]);
    assert_eq!(&back[4608..], &origin[4608..64 * 1024]);

    // Block status: origin-backed holes are not zero, holes past the origin are.
    assert_eq!(
        extents(&mut server, &mut peer, 0, 0, 1024 * 1024),
        [(65536, 0), (458752, STATE_HOLE), (524288, HOLE_ZERO)]
    );
}

#[test]
fn zero_length_requests_succeed_without_data() {
    for structured in [false, true] {
        let (mut server, mut peer) = open("vol0", structured);
        let reply = call(&mut server, &mut peer, 0, CMD_READ, 4096, 0, &[]);
        assert_eq!(reply.error, 0);
        if structured {
            assert_eq!(reply.chunks.len(), 1);
            assert_eq!(reply.chunks[0].kind, REPLY_TYPE_NONE);
        }
        for command in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE] {
            assert_eq!(call(&mut server, &mut peer, 0, command, 0, 0, &[]).error, 0);
        }
    }
}

#[test]
fn fua_flush_cache_and_trim_reach_the_backend() {
    let (mut server, mut peer) = open("vol0", false);
    let data = [5u8; 4096];
    assert_eq!(
        call(
            &mut server,
            &mut peer,
            CMD_FLAG_FUA,
            CMD_WRITE,
            0,
            4096,
            &data
        )
        .error,
        0
    );
    assert_eq!(
        call(&mut server, &mut peer, 0, CMD_FLUSH, 0, 0, &[]).error,
        0
    );
    assert_eq!(
        call(&mut server, &mut peer, CMD_FLAG_FUA, CMD_FLUSH, 0, 0, &[]).error,
        0
    );
    assert_eq!(
        call(&mut server, &mut peer, 0, CMD_CACHE, 0, 65536, &[]).error,
        0
    );
    assert_eq!(
        call(
            &mut server,
            &mut peer,
            CMD_FLAG_FUA,
            CMD_TRIM,
            0,
            65536,
            &[]
        )
        .error,
        0
    );
    let stats = server.backend().stats();
    assert_eq!((stats.writes, stats.fua_writes), (1, 1));
    assert_eq!((stats.flushes, stats.caches, stats.trims), (2, 1, 1));
    assert_eq!(read(&mut server, &mut peer, 0, 4096), vec![0; 4096]);
}

#[test]
fn bad_requests_get_the_errors_the_spec_names() {
    let size = 2048 * 512;
    let cases: [(&str, u16, u16, u64, u32, u32); 19] = [
        ("unaligned offset", 0, CMD_READ, 100, 512, EINVAL),
        ("unaligned length", 0, CMD_READ, 0, 100, EINVAL),
        ("read past the end", 0, CMD_READ, size - 512, 1024, EINVAL),
        ("read beyond the end", 0, CMD_READ, size * 2, 512, EINVAL),
        ("offset overflow", 0, CMD_READ, u64::MAX - 511, 1024, EINVAL),
        ("trim past the end", 0, CMD_TRIM, size, 512, EINVAL),
        ("cache past the end", 0, CMD_CACHE, size, 512, EINVAL),
        (
            "block status past the end",
            0,
            CMD_BLOCK_STATUS,
            size,
            512,
            EINVAL,
        ),
        ("block status of nothing", 0, CMD_BLOCK_STATUS, 0, 0, EINVAL),
        (
            "zeroes past the end",
            0,
            CMD_WRITE_ZEROES,
            size - 512,
            1024,
            ENOSPC,
        ),
        ("unaligned zeroes", 0, CMD_WRITE_ZEROES, 1, 512, EINVAL),
        (
            "read larger than the maximum payload",
            0,
            CMD_READ,
            0,
            (32 << 20) + 512,
            EINVAL,
        ),
        (
            "NO_HOLE on read",
            CMD_FLAG_NO_HOLE,
            CMD_READ,
            0,
            512,
            EINVAL,
        ),
        ("unknown flag bit", 1 << 9, CMD_READ, 0, 512, EINVAL),
        (
            "REQ_ONE on trim",
            CMD_FLAG_REQ_ONE,
            CMD_TRIM,
            0,
            512,
            EINVAL,
        ),
        ("flush with a range", 0, CMD_FLUSH, 0, 512, EINVAL),
        ("unknown command", 0, 99, 0, 0, EINVAL),
        ("resize", 0, 8, 0, 0, EINVAL),
        ("unaligned cache", 0, CMD_CACHE, 0, 1, EINVAL),
    ];
    for structured in [false, true] {
        let (mut server, mut peer) = open("vol0", structured);
        for (what, flags, command, offset, len, error) in cases {
            let reply = call(&mut server, &mut peer, flags, command, offset, len, &[]);
            assert_eq!(reply.error, error, "{what}");
            if structured {
                assert!(!reply.message().is_empty(), "{what}");
            }
        }
        // Still in step afterwards.
        assert_eq!(read(&mut server, &mut peer, 0, 512), vec![0; 512]);
    }
    let (mut server, mut peer) = open("vol0", true);
    let reply = call(&mut server, &mut peer, 0, CMD_READ, size - 512, 1024, &[]);
    assert!(
        reply.message().contains("past the end"),
        "{}",
        reply.message()
    );
    let reply = call(&mut server, &mut peer, 0, 99, 0, 0, &[]);
    assert!(reply.message().contains("(99)"), "{}", reply.message());
}

#[test]
fn rejected_writes_have_their_payload_skipped() {
    let mut backend = MemoryBackend::default();
    backend.add_export(MemoryExport::new("big", 128 << 11));
    let (mut server, mut peer) = open_with(backend, Limits::default(), "big", true);
    let size = 128 << 20;
    let data = pattern(3, 8192);
    for (flags, offset, error) in [
        (0, size - 4096, ENOSPC),
        (0, size + 4096, ENOSPC),
        (0, 1, EINVAL),
        (CMD_FLAG_NO_HOLE, 0, EINVAL),
    ] {
        let reply = call(
            &mut server,
            &mut peer,
            flags,
            CMD_WRITE,
            offset,
            8192,
            &data,
        );
        assert_eq!(reply.error, error);
    }
    // A payload above the 32 MiB maximum is skipped too (read and dropped, never
    // stored), then refused; the connection stays usable.
    let huge = vec![0xa5u8; (32 << 20) + 4096];
    let reply = call(
        &mut server,
        &mut peer,
        0,
        CMD_WRITE,
        0,
        huge.len() as u32,
        &huge,
    );
    assert_eq!(reply.error, EINVAL);
    assert!(
        reply.message().contains("maximum payload"),
        "{}",
        reply.message()
    );
    assert_eq!(read(&mut server, &mut peer, 0, 8192), vec![0; 8192]);
    assert_eq!(server.backend().stats().writes, 0);
    // The largest allowed write works.
    let max = pattern(4, 32 << 20);
    write(&mut server, &mut peer, 64 << 20, &max);
    assert_eq!(read(&mut server, &mut peer, 64 << 20, 32 << 20), max);
}

#[test]
fn read_only_exports_refuse_changes_with_eperm() {
    let (mut server, mut peer) = open("ro", true);
    for (flags, command, payload) in [
        (0, CMD_WRITE, &[1u8; 512][..]),
        (CMD_FLAG_FUA, CMD_WRITE, &[1u8; 512][..]),
        (0, CMD_TRIM, &[][..]),
        (CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, &[][..]),
    ] {
        let reply = call(&mut server, &mut peer, flags, command, 0, 512, payload);
        assert_eq!(reply.error, EPERM);
        assert!(reply.message().contains("read-only"));
    }
    assert_eq!(read(&mut server, &mut peer, 0, 512), vec![0; 512]);
    assert_eq!(
        call(&mut server, &mut peer, 0, CMD_FLUSH, 0, 0, &[]).error,
        0
    );
}

#[test]
fn unadvertised_features_are_refused() {
    let (mut server, mut peer) = open("plain", true);
    assert_eq!(
        call(&mut server, &mut peer, 0, CMD_TRIM, 0, 512, &[]).error,
        EINVAL
    );
    assert_eq!(
        call(&mut server, &mut peer, 0, CMD_WRITE_ZEROES, 0, 512, &[]).error,
        EINVAL
    );
    // Without structured replies DF is not advertised, so it is refused.
    let (mut server, mut peer) = open("vol0", false);
    assert_eq!(
        call(&mut server, &mut peer, CMD_FLAG_DF, CMD_READ, 0, 512, &[]).error,
        EINVAL
    );
    // Block status needs structured replies and a context.
    assert_eq!(
        call(&mut server, &mut peer, 0, CMD_BLOCK_STATUS, 0, 512, &[]).error,
        EINVAL
    );
    let mut no_fast = backend();
    let mut export = MemoryExport::new("slow", 1024);
    export.fast_zero = false;
    no_fast.add_export(export);
    let (mut server, mut peer) = open_with(no_fast, Limits::default(), "slow", true);
    let reply = call(
        &mut server,
        &mut peer,
        CMD_FLAG_FAST_ZERO,
        CMD_WRITE_ZEROES,
        0,
        512,
        &[],
    );
    assert_eq!(reply.error, EINVAL);
}

#[test]
fn trim_and_write_zeroes_change_allocation() {
    let (mut server, mut peer) = open("vol0", true);
    let data = pattern(5, 256 * 1024);
    write(&mut server, &mut peer, 0, &data);
    let mb = 1024 * 1024;
    assert_eq!(
        extents(&mut server, &mut peer, 0, 0, mb),
        [(262144, 0), (786432, HOLE_ZERO)]
    );
    // Trim unmaps whole blocks only.
    assert_eq!(
        call(&mut server, &mut peer, 0, CMD_TRIM, 4096, 192 * 1024, &[]).error,
        0
    );
    assert_eq!(
        extents(&mut server, &mut peer, 0, 0, mb),
        [
            (65536, 0),
            (131072, HOLE_ZERO),
            (65536, 0),
            (786432, HOLE_ZERO)
        ]
    );
    let back = read(&mut server, &mut peer, 0, 256 * 1024);
    assert_eq!(&back[..65536], &data[..65536]);
    assert!(back[65536..196608].iter().all(|&b| b == 0));
    assert_eq!(&back[196608..], &data[196608..]);

    // Write-zeroes that may unmap: the block becomes a hole, a partial block is zeroed.
    let reply = call(
        &mut server,
        &mut peer,
        0,
        CMD_WRITE_ZEROES,
        4096,
        61440 + 65536 * 3,
        &[],
    );
    assert_eq!(reply.error, 0);
    assert_eq!(
        extents(&mut server, &mut peer, 0, 0, mb),
        [(65536, 0), (983040, HOLE_ZERO)]
    );
    let back = read(&mut server, &mut peer, 0, 65536);
    assert_eq!(&back[..4096], &data[..4096]);
    assert!(back[4096..].iter().all(|&b| b == 0));

    // NO_HOLE keeps (or makes) the range allocated, reading zeroes.
    let reply = call(
        &mut server,
        &mut peer,
        CMD_FLAG_NO_HOLE,
        CMD_WRITE_ZEROES,
        512 * KIB,
        131072,
        &[],
    );
    assert_eq!(reply.error, 0);
    assert_eq!(
        extents(&mut server, &mut peer, 0, 0, mb),
        [
            (65536, 0),
            (458752, HOLE_ZERO),
            (131072, 0),
            (393216, HOLE_ZERO)
        ]
    );
    assert_eq!(
        read(&mut server, &mut peer, 512 * KIB, 131072),
        vec![0; 131072]
    );
}

#[test]
fn fast_zero_fails_fast_and_changes_nothing_when_it_would_be_slow() {
    let (mut server, mut peer) = open("vol0", true);
    let data = pattern(6, 65536);
    write(&mut server, &mut peer, 0, &data);
    let fast = CMD_FLAG_FAST_ZERO;
    // Zeroing part of an allocated block means writing.
    let reply = call(&mut server, &mut peer, fast, CMD_WRITE_ZEROES, 0, 4096, &[]);
    assert_eq!(reply.error, ENOTSUP);
    assert_eq!(read(&mut server, &mut peer, 0, 65536), data);
    // NO_HOLE means writing zeroes too.
    let reply = call(
        &mut server,
        &mut peer,
        fast | CMD_FLAG_NO_HOLE,
        CMD_WRITE_ZEROES,
        0,
        65536,
        &[],
    );
    assert_eq!(reply.error, ENOTSUP);
    // Whole blocks unmap quickly.
    assert_eq!(
        call(
            &mut server,
            &mut peer,
            fast,
            CMD_WRITE_ZEROES,
            0,
            131072,
            &[]
        )
        .error,
        0
    );
    assert_eq!(read(&mut server, &mut peer, 0, 65536), vec![0; 65536]);
    // Over an external origin unmapping would expose the origin: never fast, and a
    // plain write-zeroes has to allocate.
    let (mut server, mut peer) = open("child", true);
    let reply = call(
        &mut server,
        &mut peer,
        fast,
        CMD_WRITE_ZEROES,
        0,
        65536,
        &[],
    );
    assert_eq!(reply.error, ENOTSUP);
    assert_eq!(
        call(&mut server, &mut peer, 0, CMD_WRITE_ZEROES, 0, 65536, &[]).error,
        0
    );
    assert_eq!(read(&mut server, &mut peer, 0, 65536), vec![0; 65536]);
    assert_eq!(
        extents(&mut server, &mut peer, CMD_FLAG_REQ_ONE, 0, 131072),
        [(65536, 0)]
    );
}

#[test]
fn block_status_honours_req_one_and_the_request_range() {
    let (mut server, mut peer) = open("vol0", true);
    write(&mut server, &mut peer, 128 * KIB, &pattern(7, 65536));
    let req_one = CMD_FLAG_REQ_ONE;
    assert_eq!(
        extents(&mut server, &mut peer, req_one, 0, 1024 * 1024),
        [(131072, HOLE_ZERO)]
    );
    assert_eq!(
        extents(&mut server, &mut peer, req_one, 4096, 8192),
        [(8192, HOLE_ZERO)]
    );
    assert_eq!(
        extents(&mut server, &mut peer, req_one, 130 * KIB, 4096),
        [(4096, 0)]
    );
    assert_eq!(
        extents(&mut server, &mut peer, 0, 127 * KIB, 4096),
        [(1024, HOLE_ZERO), (3072, 0)]
    );
    // Many extents, each a multiple of 512, summing to the request.
    for block in (0..16).step_by(2) {
        write(&mut server, &mut peer, block * 65536, &[1; 512]);
    }
    let found = extents(&mut server, &mut peer, 0, 512, 1024 * 1024 - 1024);
    assert!(found.iter().all(|(len, _)| len % 512 == 0 && *len > 0));
    assert_eq!(
        found.iter().map(|(len, _)| u64::from(*len)).sum::<u64>(),
        1024 * 1024 - 1024
    );
    assert!(
        found.windows(2).all(|pair| pair[0].1 != pair[1].1),
        "neighbours merged"
    );
    assert_eq!(found.len(), 16);
}

#[test]
fn engine_errors_map_to_nbd_errors() {
    let mut backend = backend();
    backend.set_capacity_blocks(Some(2));
    let (mut server, mut peer) = open_with(backend, Limits::default(), "vol0", true);
    write(&mut server, &mut peer, 0, &[1; 512]);
    let reply = call(
        &mut server,
        &mut peer,
        0,
        CMD_WRITE,
        65536,
        131072,
        &[2; 131072],
    );
    assert_eq!(reply.error, ENOSPC);
    assert!(reply.message().contains("no space"));
    // Overwriting allocated space still works when the pool is full.
    write(&mut server, &mut peer, 512, &[3; 512]);
    let reply = call(
        &mut server,
        &mut peer,
        CMD_FLAG_NO_HOLE,
        CMD_WRITE_ZEROES,
        512 * KIB,
        131072,
        &[],
    );
    assert_eq!(reply.error, ENOSPC);

    server.backend_mut().set_failing("vol0", true);
    let reply = call(&mut server, &mut peer, 0, CMD_READ, 0, 512, &[]);
    assert_eq!(reply.error, EIO);
    assert_eq!(reply.message(), "injected media error");
    let (mut server, mut peer) = open("vol0", false);
    server.backend_mut().set_failing("vol0", true);
    // A failed simple read carries no data.
    let reply = call(&mut server, &mut peer, 0, CMD_READ, 0, 512, &[]);
    assert_eq!((reply.error, reply.data.len()), (EIO, 0));
    assert_eq!(peer.available(), 0);
}

#[test]
fn replies_follow_completion_order_not_request_order() {
    let (mut server, mut peer) = open("vol0", true);
    for index in 0..8u64 {
        write(&mut server, &mut peer, index * 4096, &pattern(index, 4096));
    }
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Held);
    for index in 0..8u64 {
        peer.send_request(
            &mut server,
            &request(0, CMD_READ, 100 + index, index * 4096, 4096),
            &[],
        );
    }
    assert_eq!(peer.available(), 0, "nothing completes while held");
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Lifo);
    peer.collect(&mut server);
    let cookies: Vec<u64> = (0..8)
        .map(|_| {
            let reply = peer.reply(0);
            let index = reply.cookie - 100;
            assert_eq!(reply.read_data(index * 4096, 4096), pattern(index, 4096));
            reply.cookie
        })
        .collect();
    assert_eq!(cookies, (100..108).rev().collect::<Vec<_>>());
}

#[test]
fn a_full_backend_queue_delays_requests_without_losing_them() {
    let (mut server, mut peer) = open("vol0", false);
    server.backend_mut().set_queue_depth(3);
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Held);
    for cookie in 0..20u64 {
        peer.send_request(
            &mut server,
            &request(0, CMD_WRITE, cookie, cookie * 512, 512),
            &[cookie as u8; 512],
        );
    }
    assert_eq!(server.backend().pending_completions(), 3);
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Shuffled(7));
    peer.collect(&mut server);
    let mut cookies: Vec<u64> = (0..20)
        .map(|_| peer.reply(0))
        .map(|r| {
            assert_eq!(r.error, 0);
            r.cookie
        })
        .collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (0..20).collect::<Vec<_>>());
    let mut back = [0u8; 20 * 512];
    server.backend().read_at("vol0", 0, &mut back).unwrap();
    assert!(
        back.chunks(512)
            .enumerate()
            .all(|(i, s)| s.iter().all(|&b| b == i as u8))
    );
}

#[test]
fn too_many_requests_in_flight_stop_input_until_some_complete() {
    let limits = Limits {
        max_requests: 8,
        ..Limits::default()
    };
    let (mut server, mut peer) = open_with(backend(), limits, "vol0", false);
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Held);
    let mut bytes = Vec::new();
    for cookie in 0..20 {
        bytes.extend(request(0, CMD_FLUSH, cookie, 0, 0));
    }
    let taken = peer.send(&mut server, &bytes);
    assert_eq!(taken, 8 * REQUEST_HEADER_LEN);
    assert!(!server.wants_input(peer.id));
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Fifo);
    peer.collect(&mut server);
    assert!(server.wants_input(peer.id));
    assert_eq!(
        peer.send(&mut server, &bytes[taken..]),
        12 * REQUEST_HEADER_LEN
    );
    for _ in 0..20 {
        assert_eq!(peer.reply(0).error, 0);
    }
}

#[test]
fn unread_replies_stop_input_until_the_client_reads() {
    let limits = Limits {
        max_buffered_bytes: 1 << 20,
        ..Limits::default()
    };
    let (mut server, peer) = open_with(backend(), limits, "vol0", false);
    let mut bytes = Vec::new();
    for cookie in 0..16 {
        bytes.extend(request(0, CMD_READ, cookie, 0, 256 * 1024));
    }
    // Feed without ever draining the output.
    let mut taken = 0;
    loop {
        let now = server.receive(peer.id, &bytes[taken..]);
        taken += now;
        if !server.poll() && now == 0 {
            break;
        }
    }
    assert_eq!(
        taken,
        4 * REQUEST_HEADER_LEN,
        "stops once 1 MiB of replies wait"
    );
    assert!(server.output_len(peer.id) >= 1 << 20);
    assert!(!server.wants_input(peer.id));
    let waiting = server.output_len(peer.id);
    server.consume_output(peer.id, waiting);
    assert!(server.wants_input(peer.id));
}

#[test]
fn disconnect_finishes_requests_in_flight_then_closes() {
    let (mut server, mut peer) = open("vol0", false);
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Held);
    let mut bytes = Vec::new();
    for cookie in 0..3u64 {
        bytes.extend(request(0, CMD_WRITE, cookie, cookie * 512, 512));
        bytes.extend([7u8; 512]);
    }
    bytes.extend(request(0, CMD_DISC, 0, 0, 0));
    let before_garbage = bytes.len();
    bytes.extend(b"anything after DISC is ignored");
    assert_eq!(peer.send(&mut server, &bytes), before_garbage);
    assert!(!server.should_close(peer.id), "writes still in flight");
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Fifo);
    peer.collect(&mut server);
    for _ in 0..3 {
        assert_eq!(peer.reply(0).error, 0);
    }
    assert!(server.should_close(peer.id));
    server.release(peer.id);
    assert_eq!(server.connection_count(), 0);
    assert_eq!(server.backend().open_count(), 0);
}

#[test]
fn a_client_vanishing_mid_request_disturbs_nobody_else() {
    let mut server = Server::new(backend(), Limits::default());
    let mut writer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    writer.open(&mut server, "vol0", true);
    let mut other = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    other.open(&mut server, "vol0", true);
    assert_eq!(server.backend().open_count(), 2);

    // Half a write, then the socket dies.
    let mut bytes = request(0, CMD_WRITE, 1, 0, 65536);
    bytes.extend(vec![9u8; 1000]);
    writer.send(&mut server, &bytes);
    server.peer_closed(writer.id);
    assert!(server.should_close(writer.id));
    server.release(writer.id);
    assert_eq!(server.backend().open_count(), 1);

    // The other connection is unaffected and nothing of the half write landed.
    let back = read(&mut server, &mut other, 0, 65536);
    assert_eq!(back, vec![0; 65536]);
    assert_eq!(server.backend().stats().writes, 0);

    // A released connection with requests in flight keeps its export open until the
    // backend returns them; their replies go nowhere.
    let mut third = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    third.open(&mut server, "vol0", false);
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Held);
    third.send_request(&mut server, &request(0, CMD_READ, 1, 0, 4096), &[]);
    third.send_request(&mut server, &request(0, CMD_FLUSH, 2, 0, 0), &[]);
    server.release(third.id);
    assert_eq!(server.backend().open_count(), 2);
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Fifo);
    support::settle(&mut server);
    assert_eq!(server.backend().open_count(), 1);
    assert_eq!(server.output_len(third.id), 0);
    assert_eq!(read(&mut server, &mut other, 0, 512), vec![0; 512]);
}

#[test]
fn a_truncated_request_at_end_of_input_is_dropped() {
    let (mut server, mut peer) = open("vol0", false);
    peer.send(&mut server, &request(0, CMD_READ, 1, 0, 512)[..20]);
    server.peer_closed(peer.id);
    support::settle(&mut server);
    assert!(server.should_close(peer.id));
    assert_eq!(server.output_len(peer.id), 0);
}

#[test]
fn bad_request_magic_closes_at_once() {
    let (mut server, mut peer) = open("vol0", false);
    let mut bytes = request(0, CMD_READ, 1, 0, 512);
    bytes[3] ^= 0xff;
    peer.send(&mut server, &bytes);
    assert!(server.should_close(peer.id));
    assert_eq!(peer.available(), 0);
}

#[test]
fn removing_an_export_fails_its_clients_with_eshutdown_only() {
    let mut server = Server::new(backend(), Limits::default());
    let mut victim = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    victim.open(&mut server, "vol0", true);
    let mut bystander = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    bystander.open(&mut server, "ro", true);

    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Held);
    victim.send_request(&mut server, &request(0, CMD_READ, 1, 0, 4096), &[]);
    assert!(server.backend_mut().remove_export("vol0"));
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Fifo);
    victim.collect(&mut server);
    let in_flight = victim.reply(0);
    assert_eq!((in_flight.cookie, in_flight.error), (1, ESHUTDOWN));
    assert!(in_flight.message().contains("removed"));
    for (command, payload) in [(CMD_WRITE, &[0u8; 512][..]), (CMD_FLUSH, &[][..])] {
        let len = payload.len() as u32;
        assert_eq!(
            call(&mut server, &mut victim, 0, command, 0, len, payload).error,
            ESHUTDOWN
        );
    }
    assert_eq!(read(&mut server, &mut bystander, 0, 512), vec![0; 512]);

    let mut late = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    late.send(&mut server, &option(OPT_GO, &info_data("vol0", &[])));
    assert_eq!(late.option_reply().kind, REP_ERR_UNKNOWN);
}

#[test]
fn shutting_down_drains_every_connection() {
    let (mut server, mut peer) = open("vol0", false);
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Held);
    peer.send_request(&mut server, &request(0, CMD_WRITE, 1, 0, 512), &[1; 512]);
    let mut waiting = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    server.shut_down();
    assert!(!server.wants_input(peer.id));
    assert!(server.should_close(waiting.id));
    assert!(!server.should_close(peer.id));
    server
        .backend_mut()
        .set_completion_order(CompletionOrder::Fifo);
    peer.collect(&mut server);
    assert_eq!(peer.reply(0).error, 0);
    assert!(server.should_close(peer.id));
    let late = Peer::connect(&mut server);
    waiting.collect(&mut server);
    assert_eq!(server.output_len(late.id), 0);
    assert!(server.should_close(late.id));
}

#[test]
fn connections_share_one_engine() {
    let mut server = Server::new(backend(), Limits::default());
    let mut first = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    let flags = first.open(&mut server, "vol0", true);
    assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
    let mut second = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    second.open(&mut server, "vol0", false);
    let data = pattern(8, 8192);
    write(&mut server, &mut first, 8192, &data);
    assert_eq!(
        call(&mut server, &mut second, 0, CMD_FLUSH, 0, 0, &[]).error,
        0
    );
    assert_eq!(read(&mut server, &mut second, 8192, 8192), data);
}
