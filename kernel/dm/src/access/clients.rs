//! Whom an access rule is about, and who a connected client is.
//!
//! A rule names clients by network (`ADDRESS[/PREFIX]`), or, for clients that proved
//! over TLS that they hold a certificate (see `nbd tls clients`), by that
//! certificate: `cert:FINGERPRINT` (its SHA-256, 64 hex digits, colons allowed) or
//! `subject:DN` (its whole subject as RFC 4514 text, e.g. `subject:CN=client1,O=Example`,
//! compared exactly). A certificate names one client more precisely than an address
//! does, so among the rules for one export pattern a fingerprint rule beats a subject
//! rule, which beats any address rule.

use alloc::format;
use alloc::string::String;
use core::fmt;
use core::net::IpAddr;
use nbd::Peer;
use sha2::{Digest, Sha256};

use super::Network;
use crate::tls::{fingerprint_text, x509};

/// What a rule matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Clients {
    /// Clients whose address lies in the network.
    Network(Network),
    /// Clients whose verified certificate has this subject (RFC 4514 text).
    Subject(String),
    /// The client whose verified certificate has this SHA-256 fingerprint.
    Certificate([u8; 32]),
}

impl Clients {
    /// `ADDRESS[/PREFIX]`, `subject:DN` or `cert:FINGERPRINT`.
    pub fn parse(text: &str) -> Result<Clients, String> {
        if let Some(subject) = text.strip_prefix("subject:") {
            if subject.is_empty() || subject.chars().any(char::is_control) {
                return Err(String::from(
                    "subject: takes the certificate's whole subject, as nbd clients or info \
                     shows it (e.g. subject:CN=client1,O=Example)",
                ));
            }
            return Ok(Clients::Subject(String::from(subject)));
        }
        if let Some(hex) = text.strip_prefix("cert:") {
            return parse_fingerprint(hex)
                .map(Clients::Certificate)
                .ok_or_else(|| {
                    format!(
                        "'{hex}' is not a SHA-256 fingerprint (64 hex digits, colons allowed, as \
                     openssl x509 -fingerprint -sha256 prints it)"
                    )
                });
        }
        Network::parse(text).map(Clients::Network)
    }

    /// Whether `client` is one of these clients.
    pub fn matches(&self, client: &Client) -> bool {
        match (self, &client.certificate) {
            (Clients::Network(network), _) => network.contains(client.address),
            (Clients::Subject(subject), Some(certificate)) => {
                certificate.subject.as_deref() == Some(subject.as_str())
            }
            (Clients::Certificate(digest), Some(certificate)) => certificate.fingerprint == *digest,
            (_, None) => false,
        }
    }

    /// How precisely the rule names its clients: a certificate over a subject over
    /// any network, and a longer prefix over a shorter one.
    pub(crate) fn precision(&self) -> (u8, u8) {
        match self {
            Clients::Network(network) => (0, network.prefix),
            Clients::Subject(_) => (1, 0),
            Clients::Certificate(_) => (2, 0),
        }
    }
}

/// As `parse` reads it: the fingerprint with colons, upper case.
impl fmt::Display for Clients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Clients::Network(network) => write!(f, "{network}"),
            Clients::Subject(subject) => write!(f, "subject:{subject}"),
            Clients::Certificate(digest) => write!(f, "cert:{}", fingerprint_text(digest)),
        }
    }
}

/// 64 hex digits, colons anywhere between them.
pub(crate) fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let digits: alloc::vec::Vec<u8> = text.bytes().filter(|byte| *byte != b':').collect();
    if digits.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(digits.chunks(2)) {
        let pair = core::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(digest)
}

/// A client's verified certificate, as rules look at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCertificate {
    pub fingerprint: [u8; 32],
    /// `None` if the subject does not read as a name (then only fingerprints match).
    pub subject: Option<String>,
}

/// A connected client, as rules look at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    pub address: IpAddr,
    pub certificate: Option<ClientCertificate>,
}

impl Client {
    /// A client known by its address alone.
    pub fn at(address: IpAddr) -> Client {
        Client {
            address,
            certificate: None,
        }
    }

    /// The client an NBD connection's peer is.
    pub fn of(peer: &Peer) -> Client {
        Client {
            address: peer.address.ip(),
            certificate: peer.certificate.as_deref().map(|der| ClientCertificate {
                fingerprint: Sha256::digest(der).into(),
                subject: x509::read(der).ok().map(|facts| facts.subject),
            }),
        }
    }
}

/// A connected peer for the console: its address, and its certificate's subject in
/// parentheses when it presented one.
pub fn describe_peer(peer: &Peer) -> String {
    match Client::of(peer).certificate {
        Some(certificate) => format!(
            "{} ({})",
            peer.address,
            certificate
                .subject
                .as_deref()
                .unwrap_or("certificate without a readable subject")
        ),
        None => format!("{}", peer.address),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::cert::{SubjectName, self_signed};
    use alloc::string::ToString;
    use alloc::sync::Arc;

    fn peer_with(der: &[u8]) -> Peer {
        Peer {
            address: "127.0.0.2:5000".parse().unwrap(),
            certificate: Some(Arc::from(der)),
        }
    }

    #[test]
    fn rules_parse_print_back_and_match_certificates() {
        let der = self_signed([3; 32], [4; 16], &[SubjectName::Dns("client1".into())]).certificate;
        let digest: [u8; 32] = Sha256::digest(&der).into();
        let printed = fingerprint_text(&digest);
        let client = Client::of(&peer_with(&der));
        let by_digest = Clients::parse(&format!("cert:{}", printed.to_lowercase())).unwrap();
        assert_eq!(by_digest, Clients::Certificate(digest));
        assert_eq!(by_digest.to_string(), format!("cert:{printed}"));
        assert_eq!(
            Clients::parse(&format!("cert:{}", printed.replace(':', ""))).unwrap(),
            by_digest
        );
        let by_subject = Clients::parse("subject:CN=client1").unwrap();
        assert_eq!(by_subject.to_string(), "subject:CN=client1");
        let network = Clients::parse("127.0.0.0/8").unwrap();
        for (clients, matches) in [
            (&by_digest, true),
            (&by_subject, true),
            (&network, true),
            (&Clients::Subject("CN=client2".into()), false),
            (&Clients::Certificate([0; 32]), false),
        ] {
            assert_eq!(clients.matches(&client), matches, "{clients}");
        }
        let anonymous = Client::at(client.address);
        assert!(!by_digest.matches(&anonymous) && !by_subject.matches(&anonymous));
        assert!(network.matches(&anonymous));
        assert!(by_digest.precision() > by_subject.precision());
        assert!(by_subject.precision() > Clients::parse("127.0.0.2").unwrap().precision());
        assert_eq!(
            describe_peer(&peer_with(&der)),
            "127.0.0.2:5000 (CN=client1)"
        );
        assert_eq!(
            describe_peer(&Peer::at("127.0.0.1:7".parse().unwrap())),
            "127.0.0.1:7"
        );
    }

    #[test]
    fn malformed_certificate_rules_are_refused() {
        let hex_error = |hex: &str| {
            format!(
                "'{hex}' is not a SHA-256 fingerprint (64 hex digits, colons allowed, as \
                 openssl x509 -fingerprint -sha256 prints it)"
            )
        };
        for (text, why) in [
            ("cert:", hex_error("")),
            ("cert:AB:CD", hex_error("AB:CD")),
            (
                "cert:zz00000000000000000000000000000000000000000000000000000000000000",
                hex_error("zz00000000000000000000000000000000000000000000000000000000000000"),
            ),
            (
                "subject:",
                String::from(
                    "subject: takes the certificate's whole subject, as nbd clients or info \
                     shows it (e.g. subject:CN=client1,O=Example)",
                ),
            ),
            (
                "client1",
                String::from("'client1' is not an IPv4 or IPv6 address"),
            ),
        ] {
            assert_eq!(Clients::parse(text).unwrap_err(), why, "{text}");
        }
    }
}
