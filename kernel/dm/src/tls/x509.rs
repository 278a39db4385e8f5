//! What the appliance reads from an X.509 certificate itself: its subject, written as
//! RFC 4514 text (`CN=client1,O=Example`, as `certtool -i` and
//! `openssl x509 -nameopt RFC2253` print it) for access rules and the console, and
//! whether it is a CA (basicConstraints `CA:TRUE`). Signatures, validity and chains
//! are webpki's business; this only walks the DER.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const TELETEX_STRING: u8 = 0x14;
const IA5_STRING: u8 = 0x16;
const BMP_STRING: u8 = 0x1e;
/// `[3]` around the extensions.
const EXTENSIONS: u8 = 0xa3;

/// basicConstraints, 2.5.29.19.
const OID_BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];

/// Attribute types with a short name in RFC 4514 (and 2247 for DC), by OID content.
const SHORT_NAMES: &[(&[u8], &str)] = &[
    (&[0x55, 0x04, 0x03], "CN"),
    (&[0x55, 0x04, 0x06], "C"),
    (&[0x55, 0x04, 0x07], "L"),
    (&[0x55, 0x04, 0x08], "ST"),
    (&[0x55, 0x04, 0x09], "STREET"),
    (&[0x55, 0x04, 0x0a], "O"),
    (&[0x55, 0x04, 0x0b], "OU"),
    (
        &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19],
        "DC",
    ),
    (
        &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01],
        "UID",
    ),
];

/// What a certificate says about itself, as far as the appliance needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateFacts {
    /// The subject as RFC 4514 text.
    pub subject: String,
    /// basicConstraints says `CA:TRUE`.
    pub is_ca: bool,
}

/// Reads `der` as an X.509 certificate.
pub fn read(der: &[u8]) -> Result<CertificateFacts, String> {
    let malformed = || String::from("the certificate is not valid DER X.509");
    let mut outer = Der::new(der);
    let certificate = outer.expect(SEQUENCE).ok_or_else(malformed)?;
    if !outer.is_empty() {
        return Err(malformed());
    }
    let mut certificate = Der::new(certificate);
    let mut tbs = Der::new(certificate.expect(SEQUENCE).ok_or_else(malformed)?);
    // [0] version (optional), serial, signature algorithm, issuer, validity.
    if tbs.peek_tag() == Some(0xa0) {
        tbs.next().ok_or_else(malformed)?;
    }
    for _ in 0..4 {
        tbs.next().ok_or_else(malformed)?;
    }
    let subject = tbs.expect(SEQUENCE).ok_or_else(malformed)?;
    let subject = rfc4514(subject).ok_or_else(malformed)?;
    tbs.expect(SEQUENCE).ok_or_else(malformed)?;
    let mut is_ca = false;
    while let Some((tag, content)) = tbs.next() {
        if tag == EXTENSIONS {
            is_ca = basic_constraints_ca(content).ok_or_else(malformed)?;
        }
    }
    Ok(CertificateFacts { subject, is_ca })
}

/// Whether the extensions (the content of `[3]`) say `CA:TRUE`.
fn basic_constraints_ca(explicit: &[u8]) -> Option<bool> {
    let mut extensions = Der::new(Der::new(explicit).expect(SEQUENCE)?);
    while !extensions.is_empty() {
        let mut extension = Der::new(extensions.expect(SEQUENCE)?);
        let oid = extension.expect(OID)?;
        if extension.peek_tag() == Some(BOOLEAN) {
            extension.next()?;
        }
        let value = extension.expect(OCTET_STRING)?;
        if oid == OID_BASIC_CONSTRAINTS {
            let mut constraints = Der::new(Der::new(value).expect(SEQUENCE)?);
            return Some(
                constraints.peek_tag() == Some(BOOLEAN) && constraints.expect(BOOLEAN)? != [0],
            );
        }
    }
    Some(false)
}

/// A Name (the content of its SEQUENCE) as RFC 4514 text: the last RDN first,
/// attributes of one RDN joined by `+`.
fn rfc4514(name: &[u8]) -> Option<String> {
    let mut rdns = Vec::new();
    let mut reader = Der::new(name);
    while !reader.is_empty() {
        let mut set = Der::new(reader.expect(SET)?);
        let mut attributes = Vec::new();
        while !set.is_empty() {
            let mut attribute = Der::new(set.expect(SEQUENCE)?);
            let oid = attribute.expect(OID)?;
            let (tag, value) = attribute.next()?;
            attributes.push(format!("{}={}", type_name(oid)?, value_text(tag, value)?));
        }
        rdns.push(attributes.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

/// The short name of an attribute type, or its dotted OID.
fn type_name(oid: &[u8]) -> Option<String> {
    if let Some((_, name)) = SHORT_NAMES.iter().find(|(known, _)| *known == oid) {
        return Some(String::from(*name));
    }
    let (first, rest) = oid.split_first()?;
    let mut arcs = alloc::vec![u64::from(first / 40).min(2)];
    arcs.push(u64::from(*first) - arcs[0] * 40);
    let mut arc = 0u64;
    for byte in rest {
        arc = arc.checked_mul(128)? | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            arcs.push(arc);
            arc = 0;
        }
    }
    let arcs: Vec<String> = arcs.iter().map(|arc| format!("{arc}")).collect();
    Some(arcs.join("."))
}

/// An attribute value: strings escaped as RFC 4514 says, anything else as `#` and
/// the hex of its DER.
fn value_text(tag: u8, value: &[u8]) -> Option<String> {
    let text: String = match tag {
        UTF8_STRING | PRINTABLE_STRING | IA5_STRING => {
            String::from(core::str::from_utf8(value).ok()?)
        }
        TELETEX_STRING => value.iter().map(|byte| char::from(*byte)).collect(),
        BMP_STRING => {
            let units = value
                .chunks(2)
                .map(|pair| u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()?
        }
        _ => {
            let mut hex = format!("#{tag:02x}");
            let length = Der::length_bytes(value.len());
            for byte in length.iter().chain(value) {
                hex.push_str(&format!("{byte:02x}"));
            }
            return Some(hex);
        }
    };
    let last = text.chars().count().saturating_sub(1);
    let mut escaped = String::with_capacity(text.len());
    for (index, c) in text.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (index == 0 && matches!(c, '#' | ' '))
            || (index == last && c == ' ');
        if special {
            escaped.push('\\');
            escaped.push(c);
        } else if c.is_control() {
            let mut utf8 = [0u8; 4];
            for byte in c.encode_utf8(&mut utf8).bytes() {
                escaped.push_str(&format!("\\{byte:02x}"));
            }
        } else {
            escaped.push(c);
        }
    }
    Some(escaped)
}

/// A cursor over DER tag-length-values (one-byte tags, definite lengths).
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Der { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// The next value's tag and content.
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.rest.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let length = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let (bytes, after) = rest.split_at(count);
            rest = after;
            bytes
                .iter()
                .fold(0usize, |length, byte| length << 8 | usize::from(*byte))
        };
        if rest.len() < length {
            return None;
        }
        let (content, after) = rest.split_at(length);
        self.rest = after;
        Some((tag, content))
    }

    /// The next value's content if its tag is `tag`.
    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.next()? {
            (found, content) if found == tag => Some(content),
            _ => None,
        }
    }

    /// The DER length octets for `length`.
    fn length_bytes(length: usize) -> Vec<u8> {
        if length < 0x80 {
            return alloc::vec![length as u8];
        }
        let bytes = length.to_be_bytes();
        let skip = bytes.iter().take_while(|byte| **byte == 0).count();
        let mut out = alloc::vec![0x80 | (bytes.len() - skip) as u8];
        out.extend_from_slice(&bytes[skip..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::cert::{SubjectName, self_signed};

    #[test]
    fn a_generated_certificate_reads_as_a_ca_with_its_name() {
        let generated = self_signed([1; 32], [2; 16], &[SubjectName::Dns("nas.example".into())]);
        let facts = read(&generated.certificate).unwrap();
        assert_eq!(
            facts,
            CertificateFacts {
                subject: String::from("CN=nas.example"),
                is_ca: true,
            }
        );
        assert!(read(&generated.certificate[..100]).is_err());
        let mut trailing = generated.certificate.clone();
        trailing.push(0);
        assert!(read(&trailing).is_err());
    }

    #[test]
    fn names_follow_rfc_4514() {
        // SEQUENCE { SET { C=GB }, SET { O="Acme, Inc" }, SET { CN=" x#", UID=7 } }
        let attribute = |oid: &[u8], tag: u8, value: &[u8]| {
            let mut out = alloc::vec![SEQUENCE, (oid.len() + value.len() + 4) as u8, OID];
            out.push(oid.len() as u8);
            out.extend_from_slice(oid);
            out.extend_from_slice(&[tag, value.len() as u8]);
            out.extend_from_slice(value);
            out
        };
        let set = |attributes: &[Vec<u8>]| {
            let body = attributes.concat();
            let mut out = alloc::vec![SET, body.len() as u8];
            out.extend_from_slice(&body);
            out
        };
        let name = [
            set(&[attribute(&[0x55, 0x04, 0x06], PRINTABLE_STRING, b"GB")]),
            set(&[attribute(&[0x55, 0x04, 0x0a], UTF8_STRING, b"Acme, Inc")]),
            set(&[
                attribute(&[0x55, 0x04, 0x03], UTF8_STRING, b" x#"),
                attribute(
                    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
                    0x02,
                    &[7],
                ),
            ]),
        ]
        .concat();
        assert_eq!(
            rfc4514(&name).unwrap(),
            "CN=\\ x#+1.2.840.113549.1.9.1=#020107,O=Acme\\, Inc,C=GB"
        );
        assert_eq!(value_text(BMP_STRING, &[0, b'h', 0, b'i']).unwrap(), "hi");
    }
}
