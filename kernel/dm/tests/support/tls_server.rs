//! An NBD server that requires TLS, with a fixed identity, and the moves of a
//! transport around it. Shared by the TLS robustness tests and the `nbd_tls` fuzz
//! target, so both hold the server to the same memory bound.

#![allow(dead_code)] // The fuzz target uses part of it.

use std::net::SocketAddr;
use std::sync::Arc;

use nbd::rustls::ServerConfig;
use nbd::wire::*;
use nbd::{ConnectionId, Limits, MemoryBackend, MemoryExport, Server, Tls};

/// The server's certificate (for `localhost` and 127.0.0.1, ECDSA P-256, valid from
/// 2020 to 2120, signed by [`CA_PEM`]) and its private key, made once with `certtool`.
pub const SERVER_PEM: &str = include_str!("../data/tls/server.pem");
/// The CA that signed [`SERVER_PEM`], for clients to trust.
pub const CA_PEM: &str = include_str!("../data/tls/ca.pem");

/// What one TLS session that moves no data may hold in the server's memory figures:
/// four records of ciphertext waiting to be decrypted and a record's worth of each
/// other buffer (the limits of the nbd crate's TLS module), rounded up.
pub const SESSION_BOUND: usize = 128 * 1024;

/// Size of the one export, `vol0`, in sectors.
pub const VOLUME_SECTORS: u64 = 2048;

/// The rustls configuration for [`SERVER_PEM`], as `nbd tls import` makes it.
pub fn tls_config() -> Arc<ServerConfig> {
    let identity = dm::tls::parse_identity(SERVER_PEM).expect("the test identity parses");
    dm::tls::server_config(&identity, None).expect("the test key matches its certificate")
}

/// A server with export `vol0` that requires TLS with `config`.
pub fn tls_server(config: Arc<ServerConfig>) -> Server<MemoryBackend> {
    let mut backend = MemoryBackend::default();
    backend.add_export(MemoryExport::new("vol0", VOLUME_SECTORS));
    backend.set_tls(Tls::Require(config));
    Server::new(backend, Limits::default())
}

/// Offers `bytes` to connection `id` as a transport does, letting the server work in
/// between, until it has taken them all or takes no more; returns how many it took.
pub fn offer(server: &mut Server<MemoryBackend>, id: ConnectionId, bytes: &[u8]) -> usize {
    let mut taken = 0;
    loop {
        let now = server.receive(id, &bytes[taken..]);
        taken += now;
        let moved = server.poll();
        if taken == bytes.len() || (now == 0 && !moved) {
            return taken;
        }
    }
}

/// Everything connection `id` has to send once the server has settled, taken as a
/// transport that sends it all at once.
pub fn collect(server: &mut Server<MemoryBackend>, id: ConnectionId) -> Vec<u8> {
    while server.poll() {}
    let out: Vec<u8> = server.output(id).flatten().copied().collect();
    server.consume_output(id, out.len());
    out
}

/// The bytes the server's connections hold once it has settled.
pub fn held(server: &mut Server<MemoryBackend>) -> usize {
    while server.poll() {}
    server.memory_use().held
}

/// A client from `peer` that sends fixed-newstyle flags and `NBD_OPT_STARTTLS`;
/// returns its connection once the server has greeted it and acknowledged, so the
/// next bytes either way are TLS.
pub fn start_tls(server: &mut Server<MemoryBackend>, peer: SocketAddr) -> ConnectionId {
    let id = server.connect(peer);
    let mut hello = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
    hello.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(offer(server, id, &hello), hello.len());
    let answer = collect(server, id);
    let mut acknowledgement = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    acknowledgement.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
    acknowledgement.extend_from_slice(&REP_ACK.to_be_bytes());
    acknowledgement.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(
        answer.get(GREETING_LEN..),
        Some(acknowledgement.as_slice()),
        "no STARTTLS acknowledgement after the greeting"
    );
    id
}
