//! Base64 and PEM, as certificates and keys are pasted on the console and printed,
//! and as their DER is kept in the configuration.

use alloc::string::String;
use alloc::vec::Vec;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
/// Base64 characters per PEM line (RFC 7468).
const PEM_LINE: usize = 64;

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    let mut text = String::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let bits = group.iter().enumerate().fold(0u32, |bits, (index, byte)| {
            bits | u32::from(*byte) << (16 - 8 * index)
        });
        for index in 0..4 {
            if index <= group.len() {
                text.push(char::from(
                    ALPHABET[(bits >> (18 - 6 * index)) as usize & 63],
                ));
            } else {
                text.push('=');
            }
        }
    }
    text
}

/// Decodes standard base64 (padding optional, no other characters).
pub fn unbase64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut data = Vec::with_capacity(text.len() * 3 / 4);
    let mut bits = 0u32;
    let mut count = 0;
    for byte in text.bytes() {
        let value = ALPHABET.iter().position(|letter| *letter == byte)? as u32;
        bits = bits << 6 | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            data.push((bits >> count) as u8);
        }
    }
    // Leftover bits must be padding zeros of a whole group.
    (count < 6 && bits & ((1 << count) - 1) == 0).then_some(data)
}

/// One PEM block: `label` and the DER inside.
pub fn encode(label: &str, der: &[u8]) -> String {
    let body = base64(der);
    let mut text = alloc::format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(PEM_LINE) {
        text.push_str(core::str::from_utf8(line).unwrap_or_default());
        text.push('\n');
    }
    text.push_str(&alloc::format!("-----END {label}-----\n"));
    text
}

/// Every PEM block in `text`, as (label, DER), in order; text between blocks is
/// ignored (as OpenSSL does). An unterminated or undecodable block is an error.
pub fn decode(text: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
        else {
            continue;
        };
        let end = alloc::format!("-----END {label}-----");
        let mut body = String::new();
        loop {
            match lines.next() {
                Some(line) if line == end => break,
                Some(line) => body.push_str(line),
                None => return Err(alloc::format!("the {label} block has no END line")),
            }
        }
        let der = unbase64(&body)
            .filter(|der| !der.is_empty())
            .ok_or_else(|| alloc::format!("the {label} block is not valid base64"))?;
        blocks.push((String::from(label), der));
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors_and_decodes_back() {
        for (data, text) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(data.as_bytes()), text);
            assert_eq!(unbase64(text).unwrap(), data.as_bytes());
        }
        assert_eq!(unbase64("Zm9v!"), None);
        assert_eq!(unbase64("Zh=="), None, "non-zero leftover bits");
    }

    #[test]
    fn pem_blocks_round_trip_and_broken_ones_are_refused() {
        let der: Vec<u8> = (0..=255).collect();
        let text = encode("CERTIFICATE", &der) + "junk between\n" + &encode("PRIVATE KEY", &[1, 2]);
        let blocks = decode(&text).unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0], (String::from("CERTIFICATE"), der));
        assert_eq!(blocks[1], (String::from("PRIVATE KEY"), alloc::vec![1, 2]));
        assert!(
            text.lines()
                .all(|line| line.len() <= PEM_LINE + 2 * "-----END ".len())
        );
        assert!(decode("-----BEGIN CERTIFICATE-----\nAAAA\n").is_err());
        assert!(decode("-----BEGIN CERTIFICATE-----\nA!AA\n-----END CERTIFICATE-----\n").is_err());
        assert!(decode("no pem here").unwrap().is_empty());
    }
}
