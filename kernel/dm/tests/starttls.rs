//! NBD_OPT_STARTTLS through the NBD server state machine with rustls' client on the
//! other end: the policies' replies, a handshake with a certificate made by
//! `nbd tls generate`'s code, I/O inside TLS, and garbage after STARTTLS.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use dm::tls::cert::{SubjectName, self_signed};
use dm::tls::{Identity, KeyFormat, server_config};
use nbd::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use nbd::wire::*;
use nbd::{
    Backend, ConnectionId, ExportHandle, ExportInfo, IoCompletion, IoRequest, Limits,
    MemoryBackend, MemoryExport, OpenError, QueueFull, Server, Tls,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

/// A memory backend with a TLS policy.
struct TlsBackend {
    memory: MemoryBackend,
    tls: Tls,
}

impl Backend for TlsBackend {
    fn exports(&self) -> Vec<ExportInfo> {
        self.memory.exports()
    }
    fn open(
        &mut self,
        name: &str,
        peer: SocketAddr,
    ) -> Result<(ExportHandle, ExportInfo), OpenError> {
        self.memory.open(name, peer)
    }
    fn close(&mut self, export: ExportHandle, peer: SocketAddr) {
        self.memory.close(export, peer)
    }
    fn submit(&mut self, request: IoRequest) -> Result<(), QueueFull> {
        self.memory.submit(request)
    }
    fn poll(&mut self) -> Option<IoCompletion> {
        self.memory.poll()
    }
    fn tls(&self) -> Tls {
        self.tls.clone()
    }
}

/// The generated certificate (for `localhost`) and a server offering it under `policy`.
fn tls_server(policy: fn(Arc<nbd::rustls::ServerConfig>) -> Tls) -> (Server<TlsBackend>, Vec<u8>) {
    let generated = self_signed([7; 32], [9; 16], &[SubjectName::Dns("localhost".into())]);
    let identity = Identity {
        chain: vec![generated.certificate.clone()],
        key_format: KeyFormat::Pkcs8,
        key: generated.key_pkcs8,
    };
    let mut memory = MemoryBackend::default();
    memory.add_export(MemoryExport::new("vol0", 2048));
    let backend = TlsBackend {
        memory,
        tls: policy(server_config(&identity, None).unwrap()),
    };
    (
        Server::new(backend, Limits::default()),
        generated.certificate,
    )
}

/// Hands `bytes` to the server and returns everything it says back.
fn exchange(server: &mut Server<TlsBackend>, id: ConnectionId, bytes: &[u8]) -> Vec<u8> {
    let mut taken = 0;
    while taken < bytes.len() {
        let now = server.receive(id, &bytes[taken..]);
        server.poll();
        assert!(
            now > 0 || server.should_close(id),
            "the server stopped taking input"
        );
        if now == 0 {
            break;
        }
        taken += now;
    }
    while server.poll() {}
    let out: Vec<u8> = server.output(id).flatten().copied().collect();
    server.consume_output(id, out.len());
    out
}

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
    bytes.extend_from_slice(&code.to_be_bytes());
    bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// (option, reply type, data) of every option reply in `bytes`.
fn replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut all = Vec::new();
    while !bytes.is_empty() {
        assert_eq!(be_u64(bytes), OPTION_REPLY_MAGIC);
        let len = be_u32(&bytes[16..]) as usize;
        all.push((
            be_u32(&bytes[8..]),
            be_u32(&bytes[12..]),
            bytes[20..20 + len].to_vec(),
        ));
        bytes = &bytes[20 + len..];
    }
    all
}

/// A connection past the greeting, fixed newstyle without zeroes.
fn connect(server: &mut Server<TlsBackend>) -> ConnectionId {
    let id = server.connect("127.0.0.1:5000".parse().unwrap());
    let greeting = exchange(server, id, &[]);
    assert_eq!(greeting.len(), GREETING_LEN);
    assert!(
        exchange(
            server,
            id,
            &(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes()
        )
        .is_empty()
    );
    id
}

fn go_data(name: &str) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    data
}

/// Runs the TLS handshake of `client` against connection `id` to the end.
fn handshake(server: &mut Server<TlsBackend>, id: ConnectionId, client: &mut ClientConnection) {
    while client.is_handshaking() {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut to_server).unwrap();
        }
        let back = exchange(server, id, &to_server);
        assert!(!server.should_close(id), "the server dropped the handshake");
        client.read_tls(&mut back.as_slice()).unwrap();
        client.process_new_packets().unwrap();
    }
}

/// Sends `plain` inside TLS and returns the server's decrypted answer.
fn tls_exchange(
    server: &mut Server<TlsBackend>,
    id: ConnectionId,
    client: &mut ClientConnection,
    plain: &[u8],
) -> Vec<u8> {
    client.writer().write_all(plain).unwrap();
    let mut to_server = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut to_server).unwrap();
    }
    let back = exchange(server, id, &to_server);
    let mut back = back.as_slice();
    let mut answer = Vec::new();
    while !back.is_empty() {
        client.read_tls(&mut back).unwrap();
        client.process_new_packets().unwrap();
        let _ = client.reader().read_to_end(&mut answer);
    }
    answer
}

/// Trusts exactly the generated certificate (pinned): webpki refuses a CA
/// certificate as a server's, which GnuTLS clients accept.
#[derive(Debug)]
struct Pinned {
    certificate: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.certificate.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the pinned certificate".into()))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, certificate, signature, algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, certificate, signature, algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client(certificate: Vec<u8>) -> ClientConnection {
    let provider = Arc::new(rustls_rustcrypto::provider());
    let verifier = Arc::new(Pinned {
        certificate,
        provider: Arc::clone(&provider),
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let mut client = ClientConnection::new(Arc::new(config), name).unwrap();
    client.set_buffer_limit(None);
    client
}

#[test]
fn require_answers_tls_reqd_until_starttls_then_serves_inside_tls() {
    let (mut server, certificate) = tls_server(Tls::Require);
    let id = connect(&mut server);
    for code in [OPT_LIST, OPT_GO, OPT_INFO, OPT_STRUCTURED_REPLY] {
        let data = if matches!(code, OPT_GO | OPT_INFO) {
            go_data("vol0")
        } else {
            Vec::new()
        };
        let answer = replies(&exchange(&mut server, id, &option(code, &data)));
        assert_eq!(answer.len(), 1);
        assert_eq!((answer[0].0, answer[0].1), (code, REP_ERR_TLS_REQD));
    }
    let answer = replies(&exchange(&mut server, id, &option(OPT_STARTTLS, &[])));
    assert_eq!(answer, [(OPT_STARTTLS, REP_ACK, Vec::new())]);

    let mut client = client(certificate);
    handshake(&mut server, id, &mut client);

    let answer = replies(&tls_exchange(
        &mut server,
        id,
        &mut client,
        &option(OPT_STARTTLS, &[]),
    ));
    assert_eq!((answer[0].0, answer[0].1), (OPT_STARTTLS, REP_ERR_INVALID));
    let answer = replies(&tls_exchange(
        &mut server,
        id,
        &mut client,
        &option(OPT_GO, &go_data("vol0")),
    ));
    assert_eq!(answer.last().unwrap().1, REP_ACK);

    // Transmission inside TLS: a 64 KiB write (several TLS records), then a read.
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 / 5) as u8).collect();
    let mut write = REQUEST_MAGIC.to_be_bytes().to_vec();
    write.extend_from_slice(&0u16.to_be_bytes());
    write.extend_from_slice(&CMD_WRITE.to_be_bytes());
    write.extend_from_slice(&1u64.to_be_bytes());
    write.extend_from_slice(&4096u64.to_be_bytes());
    write.extend_from_slice(&(data.len() as u32).to_be_bytes());
    write.extend_from_slice(&data);
    let reply = tls_exchange(&mut server, id, &mut client, &write);
    assert_eq!(reply.len(), 16);
    assert_eq!((be_u32(&reply[4..]), be_u64(&reply[8..])), (0, 1));
    let mut read = write[..28].to_vec();
    read[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
    read[8..16].copy_from_slice(&2u64.to_be_bytes());
    let reply = tls_exchange(&mut server, id, &mut client, &read);
    assert_eq!((be_u32(&reply[4..]), be_u64(&reply[8..])), (0, 2));
    assert!(reply[16..] == data[..], "read other bytes inside TLS");
}

#[test]
fn off_refuses_starttls_by_policy_and_on_lets_plaintext_through() {
    let (mut server, _) = tls_server(|_| Tls::Off);
    let id = connect(&mut server);
    let answer = replies(&exchange(&mut server, id, &option(OPT_STARTTLS, &[])));
    assert_eq!((answer[0].0, answer[0].1), (OPT_STARTTLS, REP_ERR_POLICY));

    let (mut server, _) = tls_server(Tls::On);
    let id = connect(&mut server);
    let answer = replies(&exchange(
        &mut server,
        id,
        &option(OPT_GO, &go_data("vol0")),
    ));
    assert_eq!(answer.last().unwrap().1, REP_ACK);
}

#[test]
fn garbage_after_starttls_closes_the_connection() {
    let (mut server, _) = tls_server(Tls::Require);
    let id = connect(&mut server);
    let mut bytes = option(OPT_STARTTLS, &[]);
    bytes.extend_from_slice(&option(OPT_LIST, &[]));
    exchange(&mut server, id, &bytes);
    assert!(
        server.should_close(id),
        "plaintext after STARTTLS is not a TLS record"
    );
}
