//! TLS records from a client after `NBD_OPT_STARTTLS` has been acknowledged (the
//! server requires TLS, with a fixed certificate and key): arbitrary bytes as the
//! client's side of the session, offered in pieces of a size the first byte picks,
//! the server's answers taken as they come. A captured ClientHello, whole, cut,
//! repeated or followed by other records, is the usual seed. Any panic fails, and so
//! does a session that neither takes its input nor ends, one that holds more than
//! the bound the robustness tests hold it to, or anything left once it is released.

#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nbd::rustls::ServerConfig;

#[path = "../../kernel/dm/tests/support/tls_server.rs"]
mod tls_server;

use tls_server::{SESSION_BOUND, collect, held, offer, start_tls, tls_config, tls_server};

/// Where the client connects from.
const CLIENT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40002);

/// Built once: checking that the key matches the certificate signs a probe.
static CONFIG: OnceLock<Arc<ServerConfig>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let [piece, records @ ..] = data else {
        return;
    };
    let mut server = tls_server(Arc::clone(CONFIG.get_or_init(tls_config)));
    let id = start_tls(&mut server, CLIENT);
    for chunk in records.chunks(usize::from(*piece) + 1) {
        let taken = offer(&mut server, id, chunk);
        collect(&mut server, id);
        let holding = held(&mut server);
        assert!(
            holding <= SESSION_BOUND,
            "the session holds {holding} bytes"
        );
        if server.should_close(id) {
            break;
        }
        assert_eq!(taken, chunk.len(), "a live session stopped taking input");
    }
    server.release(id);
    assert_eq!(server.connection_count(), 0);
    assert_eq!(held(&mut server), 0);
});
