//! NBD over TLS against clients that misbehave after `NBD_OPT_STARTTLS`: one that
//! stops half way through its ClientHello, one that never goes on after the server's
//! answer (a half-open session), garbage instead of TLS records before and after the
//! handshake, a second STARTTLS, a TLS 1.2 renegotiation and a flood of TLS 1.3 key
//! updates. Each holds at most [`SESSION_BOUND`] bytes in the server's memory figures
//! and ends (closed by the server, or released by the transport when its timeouts
//! drop the peer) leaving nothing behind, while another client's writes and reads
//! inside TLS carry on.

#[path = "../../nbd/tests/support/mod.rs"]
mod support;
#[path = "support/tls_server.rs"]
mod tls_support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};
use nbd::rustls::pki_types::{CertificateDer, ServerName};
use nbd::wire::*;
use nbd::{ConnectionId, MemoryBackend, Server};
use rustls::crypto::CryptoProvider;
use rustls::{
    CipherSuite, ClientConfig, ClientConnection, ConnectionTrafficSecrets, RootCertStore,
    SupportedProtocolVersion,
};

use support::{info_data, option, pattern, request};
use tls_support::{CA_PEM, SESSION_BOUND, collect, held, offer, start_tls, tls_config, tls_server};

/// TLS content types.
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

fn peer(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A client configuration trusting the test CA, speaking `versions`.
fn client_config(
    provider: CryptoProvider,
    versions: &[&'static SupportedProtocolVersion],
) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    for (_, der) in dm::tls::pem::decode(CA_PEM).unwrap() {
        roots.add(CertificateDer::from(der)).unwrap();
    }
    ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn tls13() -> ClientConfig {
    client_config(rustls_rustcrypto::provider(), &[&rustls::version::TLS13])
}

fn new_session(config: ClientConfig) -> ClientConnection {
    let name = ServerName::try_from("localhost").unwrap();
    let mut session = ClientConnection::new(Arc::new(config), name).unwrap();
    // A 64 KiB write is queued whole before it is sent.
    session.set_buffer_limit(None);
    session
}

/// The TLS records `session` has to send.
fn records(session: &mut ClientConnection) -> Vec<u8> {
    let mut bytes = Vec::new();
    while session.wants_write() {
        session.write_tls(&mut bytes).unwrap();
    }
    bytes
}

/// Hands the server's records to `session`; returns the data they carried.
fn absorb(session: &mut ClientConnection, mut bytes: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    while !bytes.is_empty() {
        session.read_tls(&mut bytes).unwrap();
        session.process_new_packets().unwrap();
        // Without close_notify the reader ends with WouldBlock, after the data.
        let _ = session.reader().read_to_end(&mut data);
    }
    data
}

/// A well-behaved client inside TLS.
struct TlsClient {
    id: ConnectionId,
    session: ClientConnection,
}

impl TlsClient {
    /// Connects from `port`, starts TLS and completes the handshake.
    fn connect(server: &mut Server<MemoryBackend>, port: u16, config: ClientConfig) -> Self {
        let id = start_tls(server, peer(port));
        let mut session = new_session(config);
        // Until the client's last flight (its Finished) has gone out too.
        while session.is_handshaking() || session.wants_write() {
            let flight = records(&mut session);
            assert_eq!(offer(server, id, &flight), flight.len());
            assert!(!server.should_close(id), "the server dropped the handshake");
            absorb(&mut session, &collect(server, id));
        }
        TlsClient { id, session }
    }

    /// Sends `plain` inside TLS and returns the server's decrypted answer.
    fn roundtrip(&mut self, server: &mut Server<MemoryBackend>, plain: &[u8]) -> Vec<u8> {
        self.session.writer().write_all(plain).unwrap();
        let sent = records(&mut self.session);
        assert_eq!(offer(server, self.id, &sent), sent.len());
        absorb(&mut self.session, &collect(server, self.id))
    }

    /// `NBD_OPT_GO` for `vol0`, acknowledged.
    fn go(&mut self, server: &mut Server<MemoryBackend>) {
        let answer = self.roundtrip(server, &option(OPT_GO, &info_data("vol0", &[])));
        assert_eq!(be_u32(&answer[answer.len() - 8..]), REP_ACK, "{answer:?}");
    }

    /// Writes 64 KiB at a place that `round` picks and reads it back.
    fn write_and_read(&mut self, server: &mut Server<MemoryBackend>, round: u64) {
        let data = pattern(round, 65536);
        let offset = round % 8 * 65536;
        let mut write = request(0, CMD_WRITE, 2 * round, offset, 65536);
        write.extend_from_slice(&data);
        assert_eq!(self.roundtrip(server, &write), simple_reply(2 * round));
        let read = request(0, CMD_READ, 2 * round + 1, offset, 65536);
        let reply = self.roundtrip(server, &read);
        assert_eq!(reply[..16], simple_reply(2 * round + 1));
        assert!(reply[16..] == data[..], "round {round} read other bytes");
    }
}

/// A successful simple reply to request `cookie`.
fn simple_reply(cookie: u64) -> Vec<u8> {
    let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    reply.extend_from_slice(&0u32.to_be_bytes());
    reply.extend_from_slice(&cookie.to_be_bytes());
    reply
}

/// Asserts that the server holds at most [`SESSION_BOUND`] bytes more than `base`.
fn assert_bounded(server: &mut Server<MemoryBackend>, base: usize, what: &str) {
    let now = held(server);
    assert!(
        now.saturating_sub(base) <= SESSION_BOUND,
        "{what}: the server holds {now} bytes, {base} before"
    );
}

/// A server with a client that has opened `vol0` inside TLS and done one round of I/O.
fn serving() -> (Server<MemoryBackend>, TlsClient) {
    let mut server = tls_server(tls_config());
    let mut client = TlsClient::connect(&mut server, 1000, tls13());
    client.go(&mut server);
    client.write_and_read(&mut server, 0);
    (server, client)
}

#[test]
fn a_handshake_stopped_half_way_or_left_half_open_costs_little_and_is_released_whole() {
    let (mut server, mut client) = serving();
    let base = held(&mut server);

    let cut = start_tls(&mut server, peer(2000));
    let hello = records(&mut new_session(tls13()));
    let half = &hello[..hello.len() / 2];
    assert_eq!(offer(&mut server, cut, half), half.len());
    assert!(
        collect(&mut server, cut).is_empty(),
        "half a ClientHello answered"
    );
    assert!(!server.should_close(cut));
    assert_bounded(&mut server, base, "half a ClientHello");
    client.write_and_read(&mut server, 1);

    // A whole ClientHello, then nothing: the answer is never read.
    let half_open = start_tls(&mut server, peer(3000));
    let hello = records(&mut new_session(tls13()));
    assert_eq!(offer(&mut server, half_open, &hello), hello.len());
    while server.poll() {}
    assert!(server.output_len(half_open) > 0, "no ServerHello");
    assert!(!server.should_close(half_open));
    assert_bounded(&mut server, base, "a half-open session");
    client.write_and_read(&mut server, 2);

    // The first client's stream ends; the transport's timeout drops the other.
    server.peer_closed(cut);
    while server.poll() {}
    assert!(server.should_close(cut));
    server.release(cut);
    server.release(half_open);
    assert_eq!(server.connection_count(), 1);
    assert_eq!(held(&mut server), base);
    client.write_and_read(&mut server, 3);
}

#[test]
fn garbage_instead_of_records_ends_the_session_after_a_bounded_intake() {
    let (mut server, mut client) = serving();
    let base = held(&mut server);
    // Oversized record headers (a record is at most 16 KiB and a bit), each followed
    // by junk; noise; and plaintext NBD, as from a client that ignored the switch.
    let mut oversized = Vec::new();
    for _ in 0..64 {
        oversized.extend_from_slice(&[HANDSHAKE, 3, 3, 0xff, 0xff]);
        oversized.extend_from_slice(&pattern(9, 16384));
    }
    let noise = pattern(7, 1 << 20);
    let mut plaintext = option(OPT_LIST, &[]);
    plaintext.extend_from_slice(&option(OPT_GO, &info_data("vol0", &[])));
    let garbage = [oversized, noise, plaintext];

    for (round, junk) in garbage.iter().enumerate() {
        for handshaken in [false, true] {
            let port = 2000 + round as u16 * 2 + u16::from(handshaken);
            let id = if handshaken {
                TlsClient::connect(&mut server, port, tls13()).id
            } else {
                start_tls(&mut server, peer(port))
            };
            let taken = offer(&mut server, id, junk);
            while server.poll() {}
            let what = format!("garbage {round}, after the handshake: {handshaken}");
            assert!(server.should_close(id), "{what}: the session goes on");
            assert!(taken <= SESSION_BOUND, "{what}: {taken} bytes taken");
            assert_bounded(&mut server, base, &what);
            server.release(id);
            assert_eq!(server.connection_count(), 1, "{what}");
            assert_eq!(held(&mut server), base, "{what}");
            client.write_and_read(&mut server, 1 + round as u64);
        }
    }
}

/// One direction of a TLS 1.2 ChaCha20-Poly1305 session (RFC 7905) keyed with the
/// secrets rustls' client hands over: it sends what rustls never sends (a
/// renegotiation) and reads the server's answers.
struct Tls12Direction {
    cipher: ChaCha20Poly1305,
    iv: [u8; 12],
    sequence: u64,
}

impl Tls12Direction {
    fn new((sequence, secrets): (u64, ConnectionTrafficSecrets)) -> Self {
        let ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } = secrets else {
            panic!("the session does not use ChaCha20-Poly1305");
        };
        Tls12Direction {
            cipher: ChaCha20Poly1305::new_from_slice(key.as_ref()).unwrap(),
            iv: iv.as_ref().try_into().unwrap(),
            sequence,
        }
    }

    /// The next record's nonce and additional data, for `len` bytes of `kind`.
    fn next(&mut self, kind: u8, len: usize) -> ([u8; 12], Vec<u8>) {
        let mut nonce = self.iv;
        for (byte, sequence) in nonce[4..].iter_mut().zip(self.sequence.to_be_bytes()) {
            *byte ^= sequence;
        }
        let mut additional = self.sequence.to_be_bytes().to_vec();
        additional.extend_from_slice(&[kind, 3, 3]);
        additional.extend_from_slice(&(len as u16).to_be_bytes());
        self.sequence += 1;
        (nonce, additional)
    }

    /// One record of `kind` carrying `payload`.
    fn seal(&mut self, kind: u8, payload: &[u8]) -> Vec<u8> {
        let (nonce, additional) = self.next(kind, payload.len());
        let mut body = payload.to_vec();
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &additional, &mut body)
            .unwrap();
        body.extend_from_slice(&tag);
        let mut record = vec![kind, 3, 3];
        record.extend_from_slice(&(body.len() as u16).to_be_bytes());
        record.extend_from_slice(&body);
        record
    }

    /// The content type and payload of every record in `bytes`.
    fn open(&mut self, mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut opened = Vec::new();
        while !bytes.is_empty() {
            let kind = bytes[0];
            let len = usize::from(be_u16(&bytes[3..]));
            let (body, tag) = bytes[5..5 + len].split_at(len - 16);
            let (nonce, additional) = self.next(kind, body.len());
            let mut plain = body.to_vec();
            self.cipher
                .decrypt_in_place_detached(
                    Nonce::from_slice(&nonce),
                    &additional,
                    &mut plain,
                    Tag::from_slice(tag),
                )
                .expect("a record from the server that does not decrypt");
            opened.push((kind, plain));
            bytes = &bytes[5 + len..];
        }
        opened
    }
}

#[test]
fn a_second_starttls_is_refused_and_a_renegotiation_is_rebuffed_then_ends_the_session() {
    let (mut server, mut client) = serving();
    let base = held(&mut server);
    let mut provider = rustls_rustcrypto::provider();
    provider.cipher_suites.retain(|suite| {
        suite.suite() == CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
    });
    let mut config = client_config(provider, &[&rustls::version::TLS12]);
    config.enable_secret_extraction = true;
    let mut renegotiating = TlsClient::connect(&mut server, 2000, config);

    let answer = renegotiating.roundtrip(&mut server, &option(OPT_STARTTLS, &[]));
    assert_eq!(
        (be_u32(&answer[8..]), be_u32(&answer[12..])),
        (OPT_STARTTLS, REP_ERR_INVALID)
    );
    renegotiating.go(&mut server);

    let TlsClient { id, session } = renegotiating;
    let secrets = session.dangerous_extract_secrets().unwrap();
    let mut to_server = Tls12Direction::new(secrets.tx);
    let mut from_server = Tls12Direction::new(secrets.rx);
    // A ClientHello handshake message (one record's payload) asks to renegotiate.
    let fresh = records(&mut new_session(tls13()));
    let client_hello = &fresh[5..];

    let renegotiation = to_server.seal(HANDSHAKE, client_hello);
    assert_eq!(offer(&mut server, id, &renegotiation), renegotiation.len());
    let no_renegotiation = (ALERT, vec![1, 100]);
    assert_eq!(
        from_server.open(&collect(&mut server, id)),
        [no_renegotiation]
    );
    assert_bounded(&mut server, base, "a renegotiation");

    // The session still serves: the first sector, which round 0 wrote.
    let read = to_server.seal(APPLICATION_DATA, &request(0, CMD_READ, 77, 0, 512));
    assert_eq!(offer(&mut server, id, &read), read.len());
    let reply: Vec<u8> = from_server
        .open(&collect(&mut server, id))
        .into_iter()
        .filter(|(kind, _)| *kind == APPLICATION_DATA)
        .flat_map(|(_, payload)| payload)
        .collect();
    assert_eq!(reply[..16], simple_reply(77));
    assert_eq!(reply[16..], pattern(0, 65536)[..512]);
    client.write_and_read(&mut server, 1);

    // A second request is one too many.
    let renegotiation = to_server.seal(HANDSHAKE, client_hello);
    offer(&mut server, id, &renegotiation);
    while server.poll() {}
    assert!(
        server.should_close(id),
        "a second renegotiation was let through"
    );
    server.release(id);
    assert_eq!(server.connection_count(), 1);
    assert_eq!(held(&mut server), base);
    client.write_and_read(&mut server, 2);
}

#[test]
fn a_key_update_between_requests_is_served_and_a_flood_of_them_ends_the_session() {
    let (mut server, mut client) = serving();
    let base = held(&mut server);
    let mut updating = TlsClient::connect(&mut server, 2000, tls13());
    updating.go(&mut server);
    updating.session.refresh_traffic_keys().unwrap();
    updating.write_and_read(&mut server, 1);

    for _ in 0..1000 {
        updating.session.refresh_traffic_keys().unwrap();
    }
    let flood = records(&mut updating.session);
    offer(&mut server, updating.id, &flood);
    while server.poll() {}
    assert!(server.should_close(updating.id), "a flood of key updates");
    assert_bounded(&mut server, base, "a flood of key updates");
    server.release(updating.id);
    assert_eq!(server.connection_count(), 1);
    assert_eq!(held(&mut server), base);
    client.write_and_read(&mut server, 2);
}
