//! Access rules as the server applies them: what each client is listed, the reply to
//! every option that names an export, read-only grants, and connections closed when
//! the rules take away what they were opened with.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use nbd::wire::*;
use nbd::{
    Access, Backend, ExportHandle, ExportInfo, IoCompletion, IoRequest, Limits, MemoryBackend,
    MemoryExport, OpenError, QueueFull, Server,
};
use support::{Peer, info_data, meta_data, option, request};

const FIXED_NO_ZEROES: u32 = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;

fn client(last: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 50000)
}

/// A memory backend with a table of rules by (export, client address); anything not
/// in the table gets `default`. Opened exports are remembered by handle so rules can
/// be asked again for open connections.
struct Ruled {
    memory: MemoryBackend,
    rules: BTreeMap<(String, IpAddr), Access>,
    default: Access,
    opened: BTreeMap<ExportHandle, String>,
    generation: u64,
}

impl Ruled {
    fn new(default: Access) -> Ruled {
        let mut memory = MemoryBackend::default();
        memory.add_export(MemoryExport::new("vol0", 2048));
        memory.add_export(MemoryExport::new("vol1", 1024));
        memory.add_export(MemoryExport::new("secret", 1024));
        Ruled {
            memory,
            rules: BTreeMap::new(),
            default,
            opened: BTreeMap::new(),
            generation: 0,
        }
    }

    fn set(&mut self, export: &str, peer: SocketAddr, access: Access) {
        self.rules.insert((export.to_string(), peer.ip()), access);
        self.generation += 1;
    }
}

impl Backend for Ruled {
    fn exports(&self) -> Vec<ExportInfo> {
        self.memory.exports()
    }
    fn access(&self, name: &str, peer: &nbd::Peer) -> Access {
        let key = (name.to_string(), peer.address.ip());
        self.rules.get(&key).copied().unwrap_or(self.default)
    }
    fn open_access(&self, export: ExportHandle, peer: &nbd::Peer) -> Access {
        self.access(&self.opened[&export], peer)
    }
    fn access_generation(&self) -> u64 {
        self.generation
    }
    fn open(
        &mut self,
        name: &str,
        peer: SocketAddr,
    ) -> Result<(ExportHandle, ExportInfo), OpenError> {
        let (handle, info) = self.memory.open(name, peer)?;
        self.opened.insert(handle, info.name.clone());
        Ok((handle, info))
    }
    fn close(&mut self, export: ExportHandle, peer: SocketAddr) {
        self.opened.remove(&export);
        self.memory.close(export, peer)
    }
    fn submit(&mut self, request: IoRequest) -> Result<(), QueueFull> {
        self.memory.submit(request)
    }
    fn poll(&mut self) -> Option<IoCompletion> {
        self.memory.poll()
    }
}

/// vol0: .1 writes, .2 reads; vol1: .2 refused, .3 hidden; secret: hidden from .2.
fn server() -> Server<Ruled> {
    let mut backend = Ruled::new(Access::ReadWrite);
    backend.set("vol0", client(2), Access::ReadOnly);
    backend.set("vol1", client(2), Access::Refused);
    backend.set("vol1", client(3), Access::Hidden);
    backend.set("secret", client(2), Access::Hidden);
    Server::new(backend, Limits::default())
}

fn listed(server: &mut Server<Ruled>, from: SocketAddr) -> Vec<String> {
    let mut peer = Peer::handshake_from(server, from, FIXED_NO_ZEROES);
    peer.send(server, &option(OPT_LIST, &[]));
    let replies = peer.option_replies();
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
    replies[..replies.len() - 1]
        .iter()
        .map(|reply| {
            assert_eq!(reply.kind, REP_SERVER);
            let len = be_u32(&reply.data) as usize;
            String::from_utf8(reply.data[4..4 + len].to_vec()).unwrap()
        })
        .collect()
}

#[test]
fn the_list_shows_each_client_only_the_exports_it_may_open() {
    let mut server = server();
    assert_eq!(listed(&mut server, client(1)), ["vol0", "vol1", "secret"]);
    assert_eq!(listed(&mut server, client(2)), ["vol0"]);
    assert_eq!(listed(&mut server, client(3)), ["vol0", "secret"]);
}

/// The final reply and its text to `code` naming `export`, from a client at `from`.
fn answer(server: &mut Server<Ruled>, from: SocketAddr, code: u32, export: &str) -> (u32, String) {
    let mut peer = Peer::handshake_from(server, from, FIXED_NO_ZEROES);
    peer.send(server, &option(OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(peer.option_reply().kind, REP_ACK);
    let data = match code {
        OPT_INFO | OPT_GO => info_data(export, &[]),
        _ => meta_data(export, &[BASE_ALLOCATION]),
    };
    peer.send(server, &option(code, &data));
    let last = peer.option_replies().pop().unwrap();
    assert_eq!(last.option, code);
    (last.kind, last.text())
}

#[test]
fn refused_exports_get_policy_errors_and_hidden_ones_look_missing() {
    let mut server = server();
    for code in [
        OPT_INFO,
        OPT_GO,
        OPT_LIST_META_CONTEXT,
        OPT_SET_META_CONTEXT,
    ] {
        assert_eq!(answer(&mut server, client(1), code, "vol1").0, REP_ACK);
        assert_eq!(
            answer(&mut server, client(2), code, "vol1"),
            (
                REP_ERR_POLICY,
                "access to export 'vol1' is denied to 127.0.0.2".to_string()
            )
        );
        let missing = answer(&mut server, client(3), code, "nope");
        assert_eq!(
            missing,
            (REP_ERR_UNKNOWN, "export 'nope' not present".to_string())
        );
        let hidden = answer(&mut server, client(3), code, "vol1");
        assert_eq!(
            hidden,
            (REP_ERR_UNKNOWN, "export 'vol1' not present".to_string())
        );
    }
    // Only the allowed client's GO opened anything.
    assert_eq!(server.backend().opened.len(), 1);
}

#[test]
fn export_name_for_a_refused_export_closes_the_connection() {
    for (from, export) in [
        (client(2), "vol1"),
        (client(3), "vol1"),
        (client(2), "nope"),
    ] {
        let mut server = server();
        let mut peer = Peer::handshake_from(&mut server, from, FIXED_NO_ZEROES);
        peer.send(&mut server, &option(OPT_EXPORT_NAME, export.as_bytes()));
        assert!(server.should_close(peer.id), "{from} {export}");
        assert_eq!(peer.available(), 0);
    }
    let mut server = server();
    let mut peer = Peer::handshake_from(&mut server, client(1), FIXED_NO_ZEROES);
    peer.send(&mut server, &option(OPT_EXPORT_NAME, b"vol1"));
    assert_eq!(be_u64(&peer.take(10)), 1024 * 512);
    assert!(!server.should_close(peer.id));
}

#[test]
fn a_read_only_grant_serves_read_only_and_refuses_every_write_with_eperm() {
    let mut server = server();
    let mut writer = Peer::handshake_from(&mut server, client(1), FIXED_NO_ZEROES);
    let writable = writer.open(&mut server, "vol0", true);
    assert_eq!(writable & TFLAG_READ_ONLY, 0);
    let data = vec![0x5a; 4096];
    writer.send_request(&mut server, &request(0, CMD_WRITE, 1, 0, 4096), &data);
    assert_eq!(writer.reply(0).error, 0);

    let mut reader = Peer::handshake_from(&mut server, client(2), FIXED_NO_ZEROES);
    let flags = reader.open(&mut server, "vol0", true);
    assert_eq!(
        flags,
        TFLAG_HAS_FLAGS
            | TFLAG_READ_ONLY
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_DF
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE
    );
    for (command, flags) in [
        (CMD_WRITE, 0),
        (CMD_WRITE, CMD_FLAG_FUA),
        (CMD_TRIM, 0),
        (CMD_WRITE_ZEROES, 0),
        (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE),
    ] {
        let payload = if command == CMD_WRITE { &data[..] } else { &[] };
        let header = request(flags, command, 7, 0, 4096);
        reader.send_request(&mut server, &header, payload);
        let reply = reader.reply(0);
        assert_eq!((reply.cookie, reply.error), (7, EPERM), "command {command}");
    }
    reader.send_request(&mut server, &request(0, CMD_READ, 8, 0, 4096), &[]);
    assert_eq!(reader.reply(0).read_data(0, 4096), data);
}

#[test]
fn taking_a_grant_away_closes_the_connections_it_covered_and_no_others() {
    let mut server = server();
    // .1 writes vol0 and vol1, .2 reads vol0, .4 is still negotiating.
    let mut writer = Peer::handshake_from(&mut server, client(1), FIXED_NO_ZEROES);
    writer.open(&mut server, "vol0", false);
    let mut other = Peer::handshake_from(&mut server, client(1), FIXED_NO_ZEROES);
    other.open(&mut server, "vol1", false);
    let mut reader = Peer::handshake_from(&mut server, client(2), FIXED_NO_ZEROES);
    reader.open(&mut server, "vol0", false);
    let mut newcomer = Peer::handshake_from(&mut server, client(4), FIXED_NO_ZEROES);

    // A change that takes nothing from anyone closes nothing.
    server
        .backend_mut()
        .set("vol0", client(2), Access::ReadWrite);
    server.backend_mut().set("vol0", client(4), Access::Refused);
    support::settle(&mut server);
    for peer in [&writer, &other, &reader, &newcomer] {
        assert!(!server.should_close(peer.id));
    }

    // .1 may only read vol0 now: its writable connection to vol0 finishes the request
    // it has and closes; its vol1 connection and the reader stay.
    writer.send_request(&mut server, &request(0, CMD_READ, 3, 0, 512), &[]);
    server
        .backend_mut()
        .set("vol0", client(1), Access::ReadOnly);
    writer.collect(&mut server);
    assert_eq!(writer.reply(512).cookie, 3);
    assert!(server.should_close(writer.id));
    assert!(!server.wants_input(writer.id));
    for peer in [&other, &reader, &newcomer] {
        assert!(!server.should_close(peer.id));
    }

    // The reader was given read-write above; its read-only open stays while it may
    // still read, and closes once it may not.
    server
        .backend_mut()
        .set("vol0", client(2), Access::ReadOnly);
    support::settle(&mut server);
    assert!(!server.should_close(reader.id));
    server.backend_mut().set("vol0", client(2), Access::Hidden);
    support::settle(&mut server);
    assert!(server.should_close(reader.id));
    assert!(!server.should_close(other.id));

    // The negotiating client is judged when it asks.
    newcomer.send(&mut server, &option(OPT_GO, &info_data("vol0", &[])));
    assert_eq!(newcomer.option_reply().kind, REP_ERR_POLICY);
    assert!(!server.should_close(newcomer.id));
}
