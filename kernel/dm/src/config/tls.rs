//! TLS records in the saved configuration: `nbd-tls MODE` (only when it is not `off`,
//! which every configuration without one means), `nbd-tls-cert BASE64` for each
//! certificate of the chain in order (the server's first), and
//! `nbd-tls-key FORMAT BASE64` (FORMAT `pkcs8`, `sec1` or `pkcs1`), all DER in base64.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use crate::tls::pem::{base64, unbase64};
use crate::tls::{Identity, KeyFormat, TlsMode, TlsSettings};

const MODE: &str = "nbd-tls";
const CERT: &str = "nbd-tls-cert";
const KEY: &str = "nbd-tls-key";

/// Appends the settings' lines to `text`.
pub fn encode(settings: &TlsSettings, text: &mut String) {
    if settings.mode != TlsMode::Off {
        let _ = writeln!(text, "{MODE} {}", settings.mode.word());
    }
    if let Some(identity) = &settings.identity {
        for certificate in &identity.chain {
            let _ = writeln!(text, "{CERT} {}", base64(certificate));
        }
        let format = identity.key_format.word();
        let _ = writeln!(text, "{KEY} {format} {}", base64(&identity.key));
    }
}

/// Reads `line` into `settings` if it is a TLS record: `None` when it is some other
/// record, `Some(false)` when it is a TLS record that does not parse. A chain without
/// a key (or the other way round) decodes; it is refused when TLS is set up from it.
pub fn decode(line: &str, settings: &mut TlsSettings) -> Option<bool> {
    let words: Vec<&str> = line.split(' ').collect();
    match words.as_slice() {
        [MODE, mode] => {
            let mode = TlsMode::parse(mode).filter(|mode| *mode != TlsMode::Off);
            if let Some(mode) = mode {
                settings.mode = mode;
            }
            Some(mode.is_some())
        }
        [CERT, der] => {
            let der = unbase64(der).filter(|der| !der.is_empty());
            if let Some(der) = der.clone() {
                identity(settings).chain.push(der);
            }
            Some(der.is_some())
        }
        [KEY, format, der] => {
            let (Some(format), Some(der)) = (KeyFormat::parse(format), unbase64(der)) else {
                return Some(false);
            };
            let identity = identity(settings);
            if !identity.key.is_empty() || der.is_empty() {
                return Some(false);
            }
            identity.key_format = format;
            identity.key = der;
            Some(true)
        }
        [MODE | CERT | KEY, ..] => Some(false),
        _ => None,
    }
}

/// The identity being read, started by its first record.
fn identity(settings: &mut TlsSettings) -> &mut Identity {
    settings.identity.get_or_insert_with(|| Identity {
        chain: Vec::new(),
        key_format: KeyFormat::Pkcs8,
        key: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn tls_records_round_trip_and_malformed_ones_are_refused() {
        let settings = TlsSettings {
            mode: TlsMode::Require,
            identity: Some(Identity {
                chain: vec![vec![1, 2, 3], vec![4, 5]],
                key_format: KeyFormat::Sec1,
                key: vec![9; 40],
            }),
            client_authorities: Vec::new(),
        };
        let mut text = String::new();
        encode(&settings, &mut text);
        assert_eq!(
            text,
            "nbd-tls require\nnbd-tls-cert AQID\nnbd-tls-cert BAU=\n\
             nbd-tls-key sec1 CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQ==\n"
        );
        let mut decoded = TlsSettings::default();
        for line in text.lines() {
            assert_eq!(decode(line, &mut decoded), Some(true), "{line}");
        }
        assert_eq!(decoded, settings);

        for bad in [
            "nbd-tls maybe",
            "nbd-tls off",
            "nbd-tls",
            "nbd-tls-cert",
            "nbd-tls-cert !!!",
            "nbd-tls-cert AQID extra",
            "nbd-tls-key der AQID",
            "nbd-tls-key pkcs8 !!",
            "nbd-tls-key pkcs8",
        ] {
            let mut untouched = TlsSettings::default();
            assert_eq!(decode(bad, &mut untouched), Some(false), "{bad}");
        }
        assert_eq!(
            decode("nbd-tls-key pkcs8 AQID", &mut decoded),
            Some(false),
            "second key"
        );
        assert_eq!(decode("nbd-rule * 10.0.0.0/8 allow", &mut decoded), None);
    }

    #[test]
    fn tls_off_without_identity_writes_nothing() {
        let mut text = String::new();
        encode(&TlsSettings::default(), &mut text);
        assert_eq!(text, "");
    }
}
