//! The self-signed certificate `nbd tls generate` makes: an Ed25519 key (RFC 8410)
//! and an X.509 v3 certificate for it, written as DER by hand (a few fixed shapes, so
//! no ASN.1 library is needed on the appliance).
//!
//! The certificate is its own trust anchor: clients put it where they keep CA
//! certificates, so it says `CA:TRUE` and may sign certificates as well as serve TLS.
//! It names the appliance by the DNS names and addresses given (clients check the name
//! they connected to), is valid from 2025 and has no expiry (RFC 5280's
//! 99991231235959Z), since the appliance has no trusted wall clock to renew by.

use alloc::string::String;
use alloc::vec::Vec;
use core::net::IpAddr;
use ed25519_dalek::{Signer as _, SigningKey};
use sha2::{Digest, Sha256};

/// A name the certificate is valid for (subjectAltName).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectName {
    Dns(String),
    Ip(IpAddr),
}

impl SubjectName {
    /// An address if `text` parses as one, a DNS name otherwise; `None` for text no
    /// DNS name can be (empty, or with characters outside letters, digits, `-`, `.`,
    /// `*`).
    pub fn parse(text: &str) -> Option<SubjectName> {
        if let Ok(ip) = text.parse() {
            return Some(SubjectName::Ip(ip));
        }
        let valid = !text.is_empty()
            && text.len() <= 253
            && text
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'*'));
        valid.then(|| SubjectName::Dns(String::from(text)))
    }

    fn text(&self) -> String {
        match self {
            SubjectName::Dns(name) => name.clone(),
            SubjectName::Ip(ip) => alloc::format!("{ip}"),
        }
    }
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const BOOLEAN: u8 = 0x01;
const UTF8_STRING: u8 = 0x0c;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const DNS_NAME: u8 = 0x82;
const IP_ADDRESS: u8 = 0x87;

const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
const OID_COMMON_NAME: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x03];
const OID_SUBJECT_KEY_ID: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x0e];
const OID_KEY_USAGE: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x0f];
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x11];
const OID_BASIC_CONSTRAINTS: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x13];
const OID_EXT_KEY_USAGE: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x25];
const OID_SERVER_AUTH: &[u8] = &[0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const OID_CLIENT_AUTH: &[u8] = &[0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// A DER tag-length-value.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 4);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|byte| **byte == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// A DER sequence of the already encoded `items`.
fn sequence(items: &[&[u8]]) -> Vec<u8> {
    tlv(SEQUENCE, &items.concat())
}

/// One extension: its OID, whether it is critical, and its DER value.
fn extension(oid: &[u8], critical: bool, value: &[u8]) -> Vec<u8> {
    let critical = if critical {
        tlv(BOOLEAN, &[0xff])
    } else {
        Vec::new()
    };
    sequence(&[oid, &critical, &tlv(OCTET_STRING, value)])
}

/// A key and its certificate, both DER: PKCS#8 and X.509.
pub struct Generated {
    pub key_pkcs8: Vec<u8>,
    pub certificate: Vec<u8>,
}

/// A self-signed certificate for the Ed25519 key made from `seed`, with serial
/// number `serial`, for `names` (the first is also the common name; "thinbox" when
/// there is none).
pub fn self_signed(seed: [u8; 32], serial: [u8; 16], names: &[SubjectName]) -> Generated {
    let key = SigningKey::from_bytes(&seed);
    let public = key.verifying_key().to_bytes();
    let algorithm = sequence(&[OID_ED25519]);

    let mut serial = serial;
    // Positive and minimal: the top bit clear, the next one set.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    let common_name = names
        .first()
        .map_or(String::from("thinbox"), SubjectName::text);
    let name = sequence(&[&tlv(
        SET,
        &sequence(&[OID_COMMON_NAME, &tlv(UTF8_STRING, common_name.as_bytes())]),
    )]);
    let validity = sequence(&[
        &tlv(UTC_TIME, b"250101000000Z"),
        &tlv(GENERALIZED_TIME, b"99991231235959Z"),
    ]);
    let mut key_bits = alloc::vec![0];
    key_bits.extend_from_slice(&public);
    let public_key_info = sequence(&[&algorithm, &tlv(BIT_STRING, &key_bits)]);

    let alt_names: Vec<Vec<u8>> = names
        .iter()
        .map(|name| match name {
            SubjectName::Dns(dns) => tlv(DNS_NAME, dns.as_bytes()),
            SubjectName::Ip(IpAddr::V4(ip)) => tlv(IP_ADDRESS, &ip.octets()),
            SubjectName::Ip(IpAddr::V6(ip)) => tlv(IP_ADDRESS, &ip.octets()),
        })
        .collect();
    let key_id = &Sha256::digest(public)[..20];
    let mut extensions = alloc::vec![
        extension(
            OID_BASIC_CONSTRAINTS,
            true,
            &sequence(&[&tlv(BOOLEAN, &[0xff])])
        ),
        // digitalSignature and keyCertSign.
        extension(OID_KEY_USAGE, true, &tlv(BIT_STRING, &[2, 0x84])),
        extension(
            OID_EXT_KEY_USAGE,
            false,
            &sequence(&[OID_SERVER_AUTH, OID_CLIENT_AUTH])
        ),
        extension(OID_SUBJECT_KEY_ID, false, &tlv(OCTET_STRING, key_id)),
    ];
    if !alt_names.is_empty() {
        let refs: Vec<&[u8]> = alt_names.iter().map(Vec::as_slice).collect();
        extensions.push(extension(OID_SUBJECT_ALT_NAME, false, &sequence(&refs)));
    }
    let extension_refs: Vec<&[u8]> = extensions.iter().map(Vec::as_slice).collect();

    let tbs = sequence(&[
        &[0xa0, 0x03, INTEGER, 0x01, 0x02],
        &tlv(INTEGER, &serial),
        &algorithm,
        &name,
        &validity,
        &name,
        &public_key_info,
        &tlv(0xa3, &sequence(&extension_refs)),
    ]);
    let signature = key.sign(&tbs).to_bytes();
    let mut signature_bits = alloc::vec![0];
    signature_bits.extend_from_slice(&signature);
    let certificate = sequence(&[&tbs, &algorithm, &tlv(BIT_STRING, &signature_bits)]);

    let key_pkcs8 = sequence(&[
        &tlv(INTEGER, &[0]),
        &algorithm,
        &tlv(OCTET_STRING, &tlv(OCTET_STRING, &seed)),
    ]);
    Generated {
        key_pkcs8,
        certificate,
    }
}
