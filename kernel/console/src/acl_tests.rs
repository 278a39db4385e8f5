//! The `nbd` command: rules set, shown, refused and saved, and the NBD server over
//! the console's device mapper acting on them for clients at different addresses.

use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, SocketAddr};
use nbd::wire::*;
use nbd::{ConnectionId, Limits, Server};

use crate::tests::{boot, error, lines, mem_disk, nbd_backend, ok};

fn client(last: u8) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 0, 2, last)),
        40000 + u16::from(last),
    )
}

#[test]
fn rules_are_set_shown_and_bad_ones_change_nothing() {
    let disks = [("vda", mem_disk(64, "QEMU", "a"))];
    let (mut console, _) = boot(&disks);
    ok(&mut console, "config init vda");
    ok(&mut console, "create vol0 --table \"0 2048 linear vda 0\"");
    ok(
        &mut console,
        "create scratch --table \"0 2048 linear vda 2048\"",
    );
    assert_eq!(
        lines(&ok(&mut console, "nbd acl")),
        ["default: allow", "no rules: every client gets the default"]
    );
    for line in [
        "nbd default deny",
        "nbd allow * 10.0.2.0/24 ro",
        "nbd allow vol0 10.0.2.2",
        "nbd deny /dev/mapper/scratch 10.0.2.3 hide",
        "nbd allow vol0 10.0.2.9",
        "nbd forget vol0 10.0.2.9",
    ] {
        assert_eq!(ok(&mut console, line), "", "{line}");
    }
    let table = [
        "default: deny",
        "EXPORT   CLIENTS      ACCESS",
        "*        10.0.2.0/24  allow ro",
        "vol0     10.0.2.2     allow",
        "scratch  10.0.2.3     deny hide",
    ];
    assert_eq!(lines(&ok(&mut console, "nbd acl")), table);
    assert_eq!(
        lines(&ok(&mut console, "nbd acl vol0")),
        [
            "default: deny",
            "EXPORT  CLIENTS      ACCESS",
            "*       10.0.2.0/24  allow ro",
            "vol0    10.0.2.2     allow",
        ]
    );

    for (line, why) in [
        (
            "nbd allow vol0 10.0.2.300",
            "error: nbd allow: '10.0.2.300' is not an IPv4 or IPv6 address",
        ),
        (
            "nbd allow vol0 10.0.2.0/40",
            "error: nbd allow: prefix length '40' must be a number from 0 to 32",
        ),
        (
            "nbd deny vol0 10.0.2.1/24",
            "error: nbd deny: 10.0.2.1/24 has bits set past the prefix (the network is \
             10.0.2.0/24)",
        ),
        (
            "nbd allow vol9 10.0.2.2",
            "error: nbd allow: no device called 'vol9' (see ls)",
        ),
        (
            "nbd allow vol0 10.0.2.2 rw",
            "error: nbd allow: unexpected 'rw' (allow takes ro, deny takes hide)",
        ),
        (
            "nbd default maybe",
            "error: nbd default: 'maybe' is neither allow nor deny (usage: nbd allow EXPORT \
             CLIENTS [ro] | nbd deny EXPORT CLIENTS [hide] | nbd forget EXPORT CLIENTS | nbd \
             default allow [ro]|deny [hide] | nbd acl [EXPORT] | nbd clients (CLIENTS: \
             ADDRESS[/PREFIX], cert:SHA256 or subject:DN))",
        ),
        (
            "nbd forget vol0 10.0.2.9",
            "error: nbd forget: there is no rule for vol0 and 10.0.2.9 (see nbd acl)",
        ),
        (
            "nbd acl vol9",
            "error: nbd acl: no device called 'vol9' (see ls)",
        ),
    ] {
        assert_eq!(error(&mut console, line), why);
    }
    assert_eq!(lines(&ok(&mut console, "nbd acl")), table);

    // Saved: the next boot finds the same rules.
    drop(console);
    let (mut console, notes) = boot(&disks);
    assert!(notes.contains("config: 2 of 2 devices active"), "{notes}");
    assert_eq!(lines(&ok(&mut console, "nbd acl")), table);
}

/// A client driving the server byte by byte: greeting, flags, one option.
struct Client {
    id: ConnectionId,
    inbox: Vec<u8>,
}

impl Client {
    fn connect<B: nbd::Backend>(server: &mut Server<B>, from: SocketAddr) -> Client {
        let mut client = Client {
            id: server.connect(from),
            inbox: Vec::new(),
        };
        client.send(
            server,
            &(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes(),
        );
        assert_eq!(client.inbox.len(), GREETING_LEN);
        client.inbox.clear();
        client
    }

    fn send<B: nbd::Backend>(&mut self, server: &mut Server<B>, bytes: &[u8]) {
        assert_eq!(server.receive(self.id, bytes), bytes.len());
        while server.poll() {}
        let out: Vec<u8> = server.output(self.id).flatten().copied().collect();
        server.consume_output(self.id, out.len());
        self.inbox.extend(out);
    }

    /// Sends `NBD_OPT_GO` for `export`; returns the final reply type and the
    /// transmission flags if it succeeded.
    fn go<B: nbd::Backend>(&mut self, server: &mut Server<B>, export: &str) -> (u32, u16) {
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut option = Vec::new();
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&OPT_GO.to_be_bytes());
        option.extend_from_slice(&(data.len() as u32).to_be_bytes());
        option.extend_from_slice(&data);
        self.send(server, &option);
        let mut flags = 0;
        loop {
            let kind = be_u32(&self.inbox[12..]);
            let len = be_u32(&self.inbox[16..]) as usize;
            let reply: Vec<u8> = self.inbox.drain(..20 + len).skip(20).collect();
            if kind == REP_INFO && be_u16(&reply) == INFO_EXPORT {
                flags = be_u16(&reply[10..]);
            }
            if kind != REP_INFO {
                return (kind, flags);
            }
        }
    }
}

#[test]
fn the_server_follows_the_rules_and_closes_what_a_change_takes_away() {
    let (mut console, _) = boot(&[("vda", mem_disk(64, "QEMU", "a"))]);
    ok(&mut console, "create vol0 --table \"0 2048 linear vda 0\"");
    ok(&mut console, "nbd allow vol0 10.0.2.2");
    ok(&mut console, "nbd allow vol0 10.0.2.3 ro");
    ok(&mut console, "nbd deny vol0 10.0.2.4");
    ok(&mut console, "nbd deny vol0 10.0.2.5 hide");
    let mut server = Server::new(nbd_backend(&console), Limits::default());
    let mut writer = Client::connect(&mut server, client(2));
    let (reply, flags) = writer.go(&mut server, "vol0");
    assert_eq!((reply, flags & TFLAG_READ_ONLY), (REP_ACK, 0));
    let mut reader = Client::connect(&mut server, client(3));
    let (reply, flags) = reader.go(&mut server, "vol0");
    assert_eq!((reply, flags & TFLAG_READ_ONLY), (REP_ACK, TFLAG_READ_ONLY));
    assert_eq!(
        Client::connect(&mut server, client(4))
            .go(&mut server, "vol0")
            .0,
        REP_ERR_POLICY
    );
    assert_eq!(
        Client::connect(&mut server, client(5))
            .go(&mut server, "vol0")
            .0,
        REP_ERR_UNKNOWN
    );

    assert_eq!(
        lines(&ok(&mut console, "nbd clients")),
        [
            "EXPORT  CLIENT",
            "vol0    10.0.2.2:40002",
            "vol0    10.0.2.3:40003"
        ]
    );
    assert!(
        ok(&mut console, "info vol0")
            .contains("NBD export:        vol0 (2 clients: 10.0.2.2:40002, 10.0.2.3:40003)")
    );

    // Widening the rules drops nobody; taking the reader's grant closes it alone.
    ok(&mut console, "nbd allow * 10.0.2.0/24 ro");
    while server.poll() {}
    assert!(!server.should_close(writer.id) && !server.should_close(reader.id));
    ok(&mut console, "nbd deny vol0 10.0.2.3");
    while server.poll() {}
    assert!(server.should_close(reader.id));
    assert!(!server.should_close(writer.id));
    server.release(reader.id);
    while server.poll() {}
    assert_eq!(
        lines(&ok(&mut console, "nbd clients")),
        ["EXPORT  CLIENT", "vol0    10.0.2.2:40002"]
    );
    // Without its own rule the writer falls under the read-only `*` rule: it loses
    // writing, so its connection closes.
    ok(&mut console, "nbd forget vol0 10.0.2.2");
    while server.poll() {}
    assert!(server.should_close(writer.id));
    server.release(writer.id);
    while server.poll() {}
    assert_eq!(lines(&ok(&mut console, "nbd clients")), ["no NBD clients"]);
}
