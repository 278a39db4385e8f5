//! The client against scripted servers: the handshake each way a server may take,
//! replies in pieces and out of order, and every kind of broken reply.

use alloc::string::String;
use alloc::vec::Vec;

use super::*;

fn greeting(flags: u16) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&NBDMAGIC.to_be_bytes());
    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&flags.to_be_bytes());
    bytes
}

fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    bytes.extend_from_slice(&option.to_be_bytes());
    bytes.extend_from_slice(&reply_type.to_be_bytes());
    bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
    bytes.extend_from_slice(data);
    bytes
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut data = INFO_EXPORT.to_be_bytes().to_vec();
    data.extend_from_slice(&size.to_be_bytes());
    data.extend_from_slice(&flags.to_be_bytes());
    option_reply(OPT_GO, REP_INFO, &data)
}

fn context(id: u32, name: &str) -> Vec<u8> {
    let mut data = id.to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &data)
}

fn chunk(flags: u16, chunk_type: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    bytes.extend_from_slice(&flags.to_be_bytes());
    bytes.extend_from_slice(&chunk_type.to_be_bytes());
    bytes.extend_from_slice(&cookie.to_be_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

fn data_chunk(done: bool, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend_from_slice(data);
    chunk(u16::from(done), REPLY_TYPE_OFFSET_DATA, cookie, &payload)
}

fn hole_chunk(done: bool, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend_from_slice(&len.to_be_bytes());
    chunk(u16::from(done), REPLY_TYPE_OFFSET_HOLE, cookie, &payload)
}

fn status_chunk(cookie: u64, id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut payload = id.to_be_bytes().to_vec();
    for (len, flags) in extents {
        payload.extend_from_slice(&len.to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
    }
    chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, &payload)
}

const SIZE: u64 = 1 << 20;

/// The server's bytes answering the request with a cookie.
type ReplyFor = fn(u64) -> Vec<u8>;
/// A block-status descriptor: length and flags.
type Descriptor = (u32, u32);

/// A client through a full handshake with structured replies, `base:allocation` as
/// context id 7 and a 512-byte minimum block, byte by byte.
fn ready_client() -> Client {
    let mut client = Client::new("disk", &["base:allocation"]);
    let mut server = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    server.extend(context(7, "base:allocation"));
    server.extend(option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
    let mut block = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for value in [512u32, 4096, 1 << 20] {
        block.extend_from_slice(&value.to_be_bytes());
    }
    server.extend(option_reply(OPT_GO, REP_INFO, &block));
    server.extend(info_export(SIZE, TFLAG_HAS_FLAGS | TFLAG_READ_ONLY));
    server.extend(option_reply(OPT_GO, REP_ACK, &[]));
    for byte in server {
        client.receive(&[byte]).unwrap();
    }
    client
}

#[test]
fn the_handshake_selects_contexts_and_learns_the_export() {
    let mut client = ready_client();
    assert_eq!(
        client.export(),
        Some(&RemoteExport {
            size: SIZE,
            flags: TFLAG_HAS_FLAGS | TFLAG_READ_ONLY,
            min_block: 512,
            max_payload: 1 << 20,
            structured: true,
            contexts: alloc::vec![true],
        })
    );
    let sent = client.take_output();
    let mut expected = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    option_header(&mut expected, OPT_STRUCTURED_REPLY, 0);
    let mut set = Vec::new();
    set.extend_from_slice(&4u32.to_be_bytes());
    set.extend_from_slice(b"disk");
    set.extend_from_slice(&1u32.to_be_bytes());
    set.extend_from_slice(&15u32.to_be_bytes());
    set.extend_from_slice(b"base:allocation");
    option_header(&mut expected, OPT_SET_META_CONTEXT, set.len() as u32);
    expected.extend_from_slice(&set);
    let mut go = Vec::new();
    go.extend_from_slice(&4u32.to_be_bytes());
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    option_header(&mut expected, OPT_GO, go.len() as u32);
    expected.extend_from_slice(&go);
    assert_eq!(sent, expected);
}

#[test]
fn replies_in_pieces_and_out_of_order_come_back_whole() {
    let mut client = ready_client();
    let first = client.read(4096, 2048).unwrap();
    let second = client.block_status(0, 8192).unwrap();
    assert_eq!(client.in_flight(), 2);
    let mut server = status_chunk(second, 7, &[(4096, 0), (8192, STATE_HOLE | STATE_ZERO)]);
    server.extend(hole_chunk(false, first, 4096 + 1024, 1024));
    server.extend(data_chunk(false, first, 4096, &[0xab; 1024]));
    server.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, first, &[]));
    for piece in server.chunks(7) {
        client.receive(piece).unwrap();
    }
    assert_eq!(
        client.next_reply(),
        Some(Reply::Status {
            cookie: second,
            offset: 0,
            contexts: alloc::vec![alloc::vec![
                StatusExtent {
                    length: 4096,
                    flags: 0
                },
                StatusExtent {
                    length: 4096,
                    flags: STATE_HOLE | STATE_ZERO
                },
            ]],
        })
    );
    let mut data = alloc::vec![0xab; 1024];
    data.resize(2048, 0);
    assert_eq!(
        client.next_reply(),
        Some(Reply::Read {
            cookie: first,
            offset: 4096,
            data: IoBuf::from_slice(&data)
        })
    );
    assert_eq!(client.in_flight(), 0);
}

#[test]
fn an_error_chunk_fails_only_its_request() {
    let mut client = ready_client();
    let cookie = client.read(0, 512).unwrap();
    let mut payload = EIO.to_be_bytes().to_vec();
    payload.extend_from_slice(&4u16.to_be_bytes());
    payload.extend_from_slice(b"oops");
    client
        .receive(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, &payload))
        .unwrap();
    assert_eq!(
        client.next_reply(),
        Some(Reply::Failed {
            cookie,
            error: EIO,
            message: String::from("oops")
        })
    );
    assert!(
        client.read(512, 512).is_ok(),
        "the connection is still usable"
    );
}

#[test]
fn broken_replies_are_protocol_errors() {
    let cases: Vec<(&str, ReplyFor)> = alloc::vec![
        ("unknown cookie", |cookie| data_chunk(
            true,
            cookie + 9,
            0,
            &[1; 512]
        )),
        ("outside the range", |cookie| data_chunk(
            true, cookie, 512, &[1; 512]
        )),
        ("overlap", |cookie| {
            let mut bytes = data_chunk(false, cookie, 0, &[1; 512]);
            bytes.extend(hole_chunk(true, cookie, 256, 256));
            bytes
        }),
        ("left out", |cookie| data_chunk(true, cookie, 0, &[1; 256])),
        ("status for a read", |cookie| status_chunk(
            cookie,
            7,
            &[(512, 0)]
        )),
        ("bad magic", |_| alloc::vec![0xde, 0xad, 0xbe, 0xef]),
        ("hole of 0", |cookie| hole_chunk(true, cookie, 0, 0)),
        ("unknown type", |cookie| chunk(
            REPLY_FLAG_DONE,
            0x77,
            cookie,
            &[]
        )),
        ("none with payload", |cookie| chunk(
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            cookie,
            &[0]
        )),
        ("simple success", |cookie| {
            let mut bytes = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            bytes.extend_from_slice(&0u32.to_be_bytes());
            bytes.extend_from_slice(&cookie.to_be_bytes());
            bytes.extend_from_slice(&[0; 512]);
            bytes
        }),
    ];
    for (what, reply) in cases {
        let mut client = ready_client();
        let cookie = client.read(0, 512).unwrap();
        let result = client.receive(&reply(cookie));
        assert!(
            matches!(result, Err(ClientError::Protocol(_))),
            "{what}: {result:?}"
        );
        assert!(
            client.read(0, 512).is_err(),
            "{what}: the client stays failed"
        );
    }
}

#[test]
fn a_huge_length_is_refused_before_its_payload_is_awaited() {
    let mut client = ready_client();
    let cookie = client.read(0, 512).unwrap();
    let mut header = chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, &[]);
    header[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        client.receive(&header),
        Err(ClientError::Protocol(_))
    ));
    let status = client_with_status();
    let (mut client, cookie) = status;
    let mut header = chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, &[]);
    header[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        client.receive(&header),
        Err(ClientError::Protocol(_))
    ));
}

fn client_with_status() -> (Client, u64) {
    let mut client = ready_client();
    let cookie = client.block_status(0, 4096).unwrap();
    (client, cookie)
}

#[test]
fn block_status_extents_are_checked() {
    let cases: [(&str, &[Descriptor], u32); 3] = [
        ("empty extent", &[(0, 0)], 7),
        ("past the end", &[(4096, 0), (512, 0)], 7),
        ("unknown context", &[(4096, 0)], 8),
    ];
    for (what, extents, id) in cases {
        let (mut client, cookie) = client_with_status();
        let result = client.receive(&status_chunk(cookie, id, extents));
        assert!(matches!(result, Err(ClientError::Protocol(_))), "{what}");
    }
    let (mut client, cookie) = client_with_status();
    client
        .receive(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[]))
        .map(drop)
        .expect_err("a reply without the selected context is refused");
}

#[test]
fn requests_outside_the_export_are_not_sent() {
    let mut client = ready_client();
    client.take_output();
    for (offset, len) in [
        (SIZE, 512),
        (SIZE - 512, 1024),
        (100, 512),
        (0, 100),
        (0, 0),
    ] {
        assert!(client.read(offset, len).is_err(), "{offset}+{len}");
    }
    assert!(client.take_output().is_empty());
}

#[test]
fn a_refused_export_says_why() {
    let mut client = Client::new("nope", &["base:allocation"]);
    let mut server = greeting(FLAG_FIXED_NEWSTYLE);
    server.extend(option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    server.extend(option_reply(
        OPT_SET_META_CONTEXT,
        REP_ERR_UNKNOWN,
        b"export 'nope' not present",
    ));
    assert_eq!(
        client.receive(&server),
        Err(ClientError::Refused(String::from(
            "the server has no export 'nope': export 'nope' not present"
        )))
    );
}

#[test]
fn old_servers_get_export_name_and_simple_replies() {
    let mut client = Client::new("disk", &["base:allocation"]);
    let mut server = greeting(FLAG_FIXED_NEWSTYLE);
    server.extend(option_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]));
    server.extend(option_reply(OPT_GO, REP_ERR_UNSUP, &[]));
    server.extend_from_slice(&SIZE.to_be_bytes());
    server.extend_from_slice(&TFLAG_HAS_FLAGS.to_be_bytes());
    server.extend_from_slice(&[0; 124]);
    client.receive(&server).unwrap();
    let export = client.export().unwrap();
    assert_eq!((export.size, export.structured), (SIZE, false));
    assert_eq!(export.contexts, [false]);
    assert!(client.block_status(0, 512).is_err());
    let cookie = client.read(512, 4).unwrap();
    let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    reply.extend_from_slice(&0u32.to_be_bytes());
    reply.extend_from_slice(&cookie.to_be_bytes());
    reply.extend_from_slice(b"abcd");
    client.receive(&reply).unwrap();
    let mut data = b"abcd".to_vec();
    data.resize(512, 0);
    assert_eq!(
        client.next_reply(),
        Some(Reply::Read {
            cookie,
            offset: 512,
            data: IoBuf::from_slice(&data)
        })
    );
}

/// A read into a reused buffer full of old bytes, its chunks out of order, the
/// payloads received through [`Client::payload_space`] in uneven pieces: the data
/// lands where the chunks say, holes and the tail past the length read as zeroes.
#[test]
fn reads_land_in_a_reused_buffer_whole() {
    let mut client = ready_client();
    let mut old = IoBuf::with_sectors(8);
    old.fill(0xee);
    let cookie = client.read_into(1024, 2560 + 3 * 512, old).unwrap();
    let second: Vec<u8> = (0..1536u32).map(|i| (i % 251) as u8).collect();
    let mut server = data_chunk(false, cookie, 1024 + 2560, &second);
    server.extend(hole_chunk(false, cookie, 1024 + 512, 2048));
    server.extend(data_chunk(true, cookie, 1024, &[0x5a; 512]));
    let mut rest = &server[..];
    let mut piece = 1;
    while !rest.is_empty() {
        let count = piece.min(rest.len());
        match client.payload_space() {
            Some(space) => {
                let count = count.min(space.len());
                space[..count].copy_from_slice(&rest[..count]);
                client.payload_filled(count).unwrap();
                rest = &rest[count..];
            }
            None => {
                client.receive(&rest[..count]).unwrap();
                rest = &rest[count..];
            }
        }
        piece = piece % 97 + 13;
    }
    let mut expected = alloc::vec![0x5a; 512];
    expected.resize(2560, 0);
    expected.extend_from_slice(&second);
    expected.resize(4096, 0);
    assert_eq!(
        client.next_reply(),
        Some(Reply::Read {
            cookie,
            offset: 1024,
            data: IoBuf::from_slice(&expected)
        })
    );
    assert!(client.payload_space().is_none());
}

#[test]
fn garbage_never_panics() {
    let mut rng = fastrand::Rng::with_seed(13);
    for round in 0..2000 {
        let mut client = if round % 2 == 0 {
            ready_client()
        } else {
            Client::new("disk", &["base:allocation"])
        };
        let _ = client.read(0, 4096);
        let _ = client.block_status(0, 8192);
        let len = rng.usize(0..200);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        if round % 3 == 0 && bytes.len() >= 4 {
            bytes[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        }
        let _ = client.receive(&bytes);
        while client.next_reply().is_some() {}
    }
}
