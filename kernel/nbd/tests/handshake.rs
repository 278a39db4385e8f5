//! The handshake phase over byte buffers: greeting, client flags and every option.

mod support;

use std::net::SocketAddr;

use nbd::wire::*;
use nbd::{
    Backend, ExportHandle, ExportInfo, IoCompletion, IoRequest, Limits, MemoryBackend,
    MemoryExport, OpenError, QueueFull, Server,
};
use support::{Peer, info_data, meta_data, option, request};

const FIXED_NO_ZEROES: u32 = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;

fn backend() -> MemoryBackend {
    let mut backend = MemoryBackend::default();
    let mut vol = MemoryExport::new("vol0", 2048);
    vol.description = String::from("first volume");
    backend.add_export(vol);
    let mut read_only = MemoryExport::new("ro", 1024);
    read_only.read_only = true;
    backend.add_export(read_only);
    let mut plain = MemoryExport::new("plain", 1024);
    plain.trim = false;
    plain.write_zeroes = false;
    plain.fast_zero = false;
    plain.block_sectors = 3 * 128;
    backend.add_export(plain);
    backend.set_default_export(Some("vol0"));
    backend
}

fn server() -> Server<MemoryBackend> {
    Server::new(backend(), Limits::default())
}

#[test]
fn unknown_client_flags_drop_the_connection() {
    let mut server = server();
    let peer = Peer::handshake(&mut server, 0x80 | CLIENT_FIXED_NEWSTYLE);
    assert!(server.should_close(peer.id));
    assert!(!server.wants_input(peer.id));
    assert_eq!(peer.available(), 0);
}

#[test]
fn export_name_sends_zero_padding_unless_the_client_declines_it() {
    for (flags, padding) in [(CLIENT_FIXED_NEWSTYLE, 124), (FIXED_NO_ZEROES, 0)] {
        let mut server = server();
        let mut peer = Peer::handshake(&mut server, flags);
        peer.send(&mut server, &option(OPT_EXPORT_NAME, b"vol0"));
        let reply = peer.take(10 + padding);
        assert_eq!(be_u64(&reply), 2048 * 512);
        let tflags = be_u16(&reply[8..]);
        assert_eq!(tflags & TFLAG_HAS_FLAGS, TFLAG_HAS_FLAGS);
        // No structured replies were negotiated, so DF must not be offered.
        assert_eq!(tflags & TFLAG_SEND_DF, 0);
        assert!(reply[10..].iter().all(|&b| b == 0));
        assert_eq!(peer.available(), 0);
        // Transmission has started: a read works.
        peer.send_request(&mut server, &request(0, CMD_READ, 9, 0, 512), &[]);
        assert_eq!(peer.reply(512).error, 0);
    }
}

#[test]
fn export_name_for_a_missing_export_closes() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    peer.send(&mut server, &option(OPT_EXPORT_NAME, b"nope"));
    assert!(server.should_close(peer.id));
    assert_eq!(peer.available(), 0);
}

#[test]
fn non_fixed_newstyle_clients_may_only_send_export_name() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, 0);
    peer.send(&mut server, &option(OPT_EXPORT_NAME, b""));
    // The empty name is the default export.
    assert_eq!(be_u64(&peer.take(134)), 2048 * 512);

    let mut other = Peer::handshake(&mut server, 0);
    other.send(&mut server, &option(OPT_LIST, &[]));
    assert!(server.should_close(other.id));
    assert_eq!(other.available(), 0);
}

#[test]
fn list_names_every_export_with_its_description() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    peer.send(&mut server, &option(OPT_LIST, &[]));
    let replies = peer.option_replies();
    let entries: Vec<(String, String)> = replies[..replies.len() - 1]
        .iter()
        .map(|reply| {
            assert_eq!(reply.kind, REP_SERVER);
            assert_eq!(reply.option, OPT_LIST);
            let len = be_u32(&reply.data) as usize;
            let name = String::from_utf8(reply.data[4..4 + len].to_vec()).unwrap();
            let description = String::from_utf8(reply.data[4 + len..].to_vec()).unwrap();
            (name, description)
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("vol0".into(), "first volume".into()),
            ("ro".into(), String::new()),
            ("plain".into(), String::new()),
        ]
    );
    assert_eq!(replies.last().unwrap().kind, REP_ACK);

    peer.send(&mut server, &option(OPT_LIST, b"junk"));
    let reply = peer.option_reply();
    assert_eq!(reply.kind, REP_ERR_INVALID);
    assert!(reply.text().contains("no data"), "{}", reply.text());
}

/// INFO replies as (type, payload) pairs, checking the final ACK.
fn info_items(peer: &mut Peer) -> Vec<(u16, Vec<u8>)> {
    let replies = peer.option_replies();
    let (ack, infos) = replies.split_last().unwrap();
    assert_eq!(ack.kind, REP_ACK, "{}", ack.text());
    infos
        .iter()
        .map(|reply| {
            assert_eq!(reply.kind, REP_INFO);
            (be_u16(&reply.data), reply.data[2..].to_vec())
        })
        .collect()
}

#[test]
fn info_reports_size_flags_name_description_and_block_sizes() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    peer.send(&mut server, &option(OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(peer.option_reply().kind, REP_ACK);
    let asked = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 999];
    peer.send(&mut server, &option(OPT_INFO, &info_data("", &asked)));
    let items = info_items(&mut peer);
    let find = |kind| {
        items
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, p)| p.clone())
    };
    let export = find(INFO_EXPORT).expect("INFO_EXPORT");
    assert_eq!(export.len(), 10);
    assert_eq!(be_u64(&export), 2048 * 512);
    let flags = be_u16(&export[8..]);
    let expected = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_DF
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE
        | TFLAG_SEND_FAST_ZERO;
    assert_eq!(flags, expected);
    // The default export's canonical name is reported.
    assert_eq!(find(INFO_NAME).unwrap(), b"vol0");
    assert_eq!(find(INFO_DESCRIPTION).unwrap(), b"first volume");
    let sizes = find(INFO_BLOCK_SIZE).unwrap();
    assert_eq!(
        (be_u32(&sizes), be_u32(&sizes[4..]), be_u32(&sizes[8..])),
        (512, 65536, 32 << 20)
    );

    // GO with the same parameters gives the same information, then transmission.
    peer.send(&mut server, &option(OPT_GO, &info_data("", &asked)));
    assert_eq!(info_items(&mut peer), items);
    peer.send_request(&mut server, &request(0, CMD_FLUSH, 1, 0, 0), &[]);
    assert_eq!(peer.reply(0).error, 0);
}

#[test]
fn info_flags_follow_export_features() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    let flags_of = |peer: &mut Peer, server: &mut Server<MemoryBackend>, name: &str| {
        peer.send(server, &option(OPT_INFO, &info_data(name, &[])));
        let items = info_items(peer);
        let export = &items.iter().find(|(k, _)| *k == INFO_EXPORT).unwrap().1;
        be_u16(&export[8..])
    };
    let read_only = flags_of(&mut peer, &mut server, "ro");
    assert_eq!(
        read_only,
        TFLAG_HAS_FLAGS
            | TFLAG_READ_ONLY
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE
    );
    let plain = flags_of(&mut peer, &mut server, "plain");
    assert_eq!(
        plain & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO),
        0
    );

    // A block size that is not a power of two is advertised as the largest power of
    // two dividing it (3 × 64 KiB → 64 KiB).
    peer.send(
        &mut server,
        &option(OPT_INFO, &info_data("plain", &[INFO_BLOCK_SIZE])),
    );
    let items = info_items(&mut peer);
    let sizes = &items.iter().find(|(k, _)| *k == INFO_BLOCK_SIZE).unwrap().1;
    assert_eq!(be_u32(&sizes[4..]), 65536);
}

#[test]
fn info_and_go_errors_are_explained() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    for code in [OPT_INFO, OPT_GO] {
        peer.send(&mut server, &option(code, &info_data("nope", &[])));
        let reply = peer.option_reply();
        assert_eq!((reply.option, reply.kind), (code, REP_ERR_UNKNOWN));
        assert_eq!(reply.text(), "export 'nope' not present");

        // Name length running past the data.
        let mut bad = info_data("vol0", &[]);
        bad[3] = 200;
        peer.send(&mut server, &option(code, &bad));
        assert_eq!(peer.option_reply().kind, REP_ERR_INVALID);
        // Info count disagreeing with the data.
        let mut bad = info_data("vol0", &[INFO_NAME]);
        bad.push(0);
        peer.send(&mut server, &option(code, &bad));
        assert_eq!(peer.option_reply().kind, REP_ERR_INVALID);
        // Too short to hold anything.
        peer.send(&mut server, &option(code, &[0, 0, 0]));
        assert_eq!(peer.option_reply().kind, REP_ERR_INVALID);
        // Not UTF-8.
        peer.send(&mut server, &option(code, &[0, 0, 0, 1, 0xff, 0, 0]));
        let reply = peer.option_reply();
        assert_eq!(reply.kind, REP_ERR_INVALID);
        assert!(reply.text().contains("UTF-8"));
    }
    // Still in step: GO works afterwards.
    peer.open(&mut server, "vol0", false);
}

#[test]
fn abort_is_acknowledged_then_the_connection_ends() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    peer.send(&mut server, &option(OPT_ABORT, b"ignored"));
    assert_eq!(peer.option_reply().kind, REP_ACK);
    assert!(server.should_close(peer.id));
}

#[test]
fn unsupported_options_are_refused_without_losing_step() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    for (code, kind, text) in [
        (OPT_STARTTLS, REP_ERR_POLICY, "TLS"),
        (OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, "extended headers"),
        (OPT_PEEK_EXPORT, REP_ERR_UNSUP, "option 4"),
        (0xdead_beef, REP_ERR_UNSUP, "option 3735928559"),
    ] {
        peer.send(&mut server, &option(code, b"some data to skip"));
        let reply = peer.option_reply();
        assert_eq!((reply.option, reply.kind), (code, kind));
        assert!(reply.text().contains(text), "{}", reply.text());
    }
    peer.send(&mut server, &option(OPT_STRUCTURED_REPLY, b"x"));
    assert_eq!(peer.option_reply().kind, REP_ERR_INVALID);
    peer.open(&mut server, "vol0", true);
}

#[test]
fn oversized_options_are_skipped_and_refused() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    let big = vec![7u8; nbd::MAX_OPTION_DATA as usize + 1];
    peer.send(&mut server, &option(OPT_LIST, &big));
    let reply = peer.option_reply();
    assert_eq!(reply.kind, REP_ERR_TOO_BIG);
    assert!(reply.text().contains("longer than"));
    peer.open(&mut server, "vol0", false);

    // EXPORT_NAME cannot be answered with an error: the connection closes.
    let mut other = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    other.send(&mut server, &option(OPT_EXPORT_NAME, &big));
    assert!(server.should_close(other.id));
}

#[test]
fn bad_option_magic_closes() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    let mut bytes = option(OPT_LIST, &[]);
    bytes[0] ^= 1;
    peer.send(&mut server, &bytes);
    assert!(server.should_close(peer.id));
    assert_eq!(peer.available(), 0);
}

#[test]
fn meta_contexts_need_structured_replies() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    for code in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        peer.send(
            &mut server,
            &option(code, &meta_data("vol0", &[BASE_ALLOCATION])),
        );
        let reply = peer.option_reply();
        assert_eq!(reply.kind, REP_ERR_INVALID);
        assert!(reply.text().contains("structured"));
    }
}

/// Context names (with ids) in the replies to one meta-context option.
fn contexts(peer: &mut Peer) -> Vec<(u32, String)> {
    let replies = peer.option_replies();
    let (ack, found) = replies.split_last().unwrap();
    assert_eq!(ack.kind, REP_ACK, "{}", ack.text());
    found
        .iter()
        .map(|reply| {
            assert_eq!(reply.kind, REP_META_CONTEXT);
            (
                be_u32(&reply.data),
                String::from_utf8(reply.data[4..].to_vec()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn list_meta_context_follows_the_wildcard_rules() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    peer.send(&mut server, &option(OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(peer.option_reply().kind, REP_ACK);
    let base = vec![(0, String::from(BASE_ALLOCATION))];
    for (queries, expected) in [
        (vec![], base.clone()),
        (vec!["base:"], base.clone()),
        (vec!["base:allocation"], base.clone()),
        (
            vec!["qemu:dirty-bitmap:x", "base:allocation", "base:"],
            base.clone(),
        ),
        (vec!["base:nothing"], vec![]),
        (vec!["x-vendor:thing", "nocolon"], vec![]),
    ] {
        peer.send(
            &mut server,
            &option(OPT_LIST_META_CONTEXT, &meta_data("vol0", &queries)),
        );
        assert_eq!(contexts(&mut peer), expected, "queries {queries:?}");
    }
    peer.send(
        &mut server,
        &option(OPT_LIST_META_CONTEXT, &meta_data("nope", &[])),
    );
    let reply = peer.option_reply();
    assert_eq!(reply.kind, REP_ERR_UNKNOWN);
    assert!(reply.text().contains("nope"));
    let mut truncated = meta_data("vol0", &["base:allocation"]);
    truncated.pop();
    peer.send(&mut server, &option(OPT_LIST_META_CONTEXT, &truncated));
    assert_eq!(peer.option_reply().kind, REP_ERR_INVALID);
    let mut trailing = meta_data("vol0", &[]);
    trailing.push(1);
    peer.send(&mut server, &option(OPT_LIST_META_CONTEXT, &trailing));
    assert_eq!(peer.option_reply().kind, REP_ERR_INVALID);
}

/// Opens `export` after a SET_META_CONTEXT with `queries` on `set_export`, then tries a
/// block-status request; returns its error.
fn block_status_after_set(set_export: &str, queries: &[&str], export: &str) -> u32 {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    peer.send(&mut server, &option(OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(peer.option_reply().kind, REP_ACK);
    peer.send(
        &mut server,
        &option(OPT_SET_META_CONTEXT, &meta_data(set_export, queries)),
    );
    peer.option_replies();
    peer.send(&mut server, &option(OPT_GO, &info_data(export, &[])));
    peer.option_replies();
    peer.send_request(&mut server, &request(0, CMD_BLOCK_STATUS, 5, 0, 4096), &[]);
    peer.reply(0).error
}

#[test]
fn set_meta_context_selects_base_allocation_for_one_export() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    peer.send(&mut server, &option(OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(peer.option_reply().kind, REP_ACK);
    let queries = ["base:", "base:allocation", "base:allocation", "x-other:y"];
    peer.send(
        &mut server,
        &option(OPT_SET_META_CONTEXT, &meta_data("vol0", &queries)),
    );
    assert_eq!(contexts(&mut peer), [(1, String::from(BASE_ALLOCATION))]);
    peer.send(
        &mut server,
        &option(OPT_SET_META_CONTEXT, &meta_data("vol0", &["base:"])),
    );
    assert_eq!(contexts(&mut peer), []);

    assert_eq!(
        block_status_after_set("vol0", &[BASE_ALLOCATION], "vol0"),
        0
    );
    // The selection applies to the export named in SET only.
    assert_eq!(
        block_status_after_set("ro", &[BASE_ALLOCATION], "vol0"),
        EINVAL
    );
    // Aliases name the same export.
    assert_eq!(block_status_after_set("", &[BASE_ALLOCATION], "vol0"), 0);
    // "base:" selects nothing in SET.
    assert_eq!(block_status_after_set("vol0", &["base:"], "vol0"), EINVAL);
}

#[test]
fn a_failing_set_meta_context_still_replaces_the_selection() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    peer.send(&mut server, &option(OPT_STRUCTURED_REPLY, &[]));
    peer.option_replies();
    peer.send(
        &mut server,
        &option(OPT_SET_META_CONTEXT, &meta_data("vol0", &[BASE_ALLOCATION])),
    );
    peer.option_replies();
    peer.send(
        &mut server,
        &option(OPT_SET_META_CONTEXT, &meta_data("nope", &[BASE_ALLOCATION])),
    );
    assert_eq!(peer.option_reply().kind, REP_ERR_UNKNOWN);
    peer.send(&mut server, &option(OPT_GO, &info_data("vol0", &[])));
    peer.option_replies();
    peer.send_request(&mut server, &request(0, CMD_BLOCK_STATUS, 5, 0, 4096), &[]);
    assert_eq!(peer.reply(0).error, EINVAL);
}

/// Delegates to a memory backend but refuses to open one export.
struct Refusing(MemoryBackend);

impl Backend for Refusing {
    fn exports(&self) -> Vec<ExportInfo> {
        self.0.exports()
    }
    fn open(
        &mut self,
        name: &str,
        peer: SocketAddr,
    ) -> Result<(ExportHandle, ExportInfo), OpenError> {
        if name == "ro" {
            return Err(OpenError::Refused(String::from(
                "export 'ro' is being resized",
            )));
        }
        self.0.open(name, peer)
    }
    fn close(&mut self, export: ExportHandle, peer: SocketAddr) {
        self.0.close(export, peer)
    }
    fn submit(&mut self, request: IoRequest) -> Result<(), QueueFull> {
        self.0.submit(request)
    }
    fn poll(&mut self) -> Option<IoCompletion> {
        self.0.poll()
    }
}

#[test]
fn a_refused_open_reaches_the_client_as_policy_error_with_the_reason() {
    let mut server = Server::new(Refusing(backend()), Limits::default());
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    peer.send(&mut server, &option(OPT_GO, &info_data("ro", &[])));
    let reply = peer.option_reply();
    assert_eq!(reply.kind, REP_ERR_POLICY);
    assert_eq!(reply.text(), "export 'ro' is being resized");
    // INFO uses lookup, which the default method answers from the export list.
    peer.send(&mut server, &option(OPT_INFO, &info_data("ro", &[])));
    assert_eq!(peer.option_replies().last().unwrap().kind, REP_ACK);
}

#[test]
fn options_split_across_many_small_reads_parse_the_same() {
    let mut server = server();
    let mut peer = Peer::handshake(&mut server, FIXED_NO_ZEROES);
    let mut bytes = option(OPT_STRUCTURED_REPLY, &[]);
    bytes.extend(option(OPT_GO, &info_data("vol0", &[INFO_NAME])));
    bytes.extend(request(0, CMD_READ, 77, 512, 1024));
    for byte in &bytes {
        assert_eq!(peer.send(&mut server, std::slice::from_ref(byte)), 1);
    }
    assert_eq!(peer.option_reply().kind, REP_ACK);
    peer.option_replies();
    let reply = peer.reply(0);
    assert_eq!(reply.cookie, 77);
    assert_eq!(reply.read_data(512, 1024), vec![0; 1024]);
}
