//! Client certificate records in the saved configuration:
//! `nbd-tls-clients BASE64` for each CA certificate (DER) client certificates must
//! chain to, `nbd-cert-rule EXPORT ACCESS FINGERPRINT` (SHA-256, 64 hex digits) and
//! `nbd-subject-rule EXPORT ACCESS SUBJECT` (the subject is the rest of the line, so
//! it may hold spaces). ACCESS is spelled as in `acl.rs`. A configuration without
//! them asks no client for a certificate.

use alloc::string::{String, ToString};
use core::fmt::Write;

use super::acl;
use crate::access::{AccessList, Clients, Rule};
use crate::tls::TlsSettings;
use crate::tls::pem::{base64, unbase64};

const AUTHORITY: &str = "nbd-tls-clients";
const CERT_RULE: &str = "nbd-cert-rule";
const SUBJECT_RULE: &str = "nbd-subject-rule";

/// Appends the client certificate records to `text`.
pub fn encode(list: &AccessList, tls: &TlsSettings, text: &mut String) {
    for authority in &tls.client_authorities {
        let _ = writeln!(text, "{AUTHORITY} {}", base64(authority));
    }
    for rule in &list.rules {
        let access = acl::word(rule.access);
        let export = &rule.export;
        match &rule.clients {
            Clients::Network(_) => {}
            Clients::Certificate(digest) => {
                let hex: String = digest
                    .iter()
                    .map(|byte| alloc::format!("{byte:02x}"))
                    .collect();
                let _ = writeln!(text, "{CERT_RULE} {export} {access} {hex}");
            }
            Clients::Subject(subject) => {
                let _ = writeln!(text, "{SUBJECT_RULE} {export} {access} {subject}");
            }
        }
    }
}

/// Reads `line` if it is a client certificate record: `None` when it is some other
/// record, `Some(false)` when it is one that does not parse.
pub fn decode(line: &str, list: &mut AccessList, tls: &mut TlsSettings) -> Option<bool> {
    let mut words = line.splitn(4, ' ');
    let kind = words.next()?;
    if kind == AUTHORITY {
        let der = words
            .next()
            .filter(|_| words.next().is_none())
            .and_then(unbase64)
            .filter(|der| !der.is_empty());
        let parsed = der.is_some();
        tls.client_authorities.extend(der);
        return Some(parsed);
    }
    let prefix = match kind {
        CERT_RULE => "cert:",
        SUBJECT_RULE => "subject:",
        _ => return None,
    };
    let (Some(export), Some(access), Some(clients)) = (words.next(), words.next(), words.next())
    else {
        return Some(false);
    };
    let (Some(access), Ok(clients)) = (
        acl::parse(access),
        Clients::parse(&alloc::format!("{prefix}{clients}")),
    ) else {
        return Some(false);
    };
    list.set(Rule {
        export: export.to_string(),
        clients,
        access,
    });
    Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{Access, Network};
    use alloc::vec;

    #[test]
    fn client_certificate_records_round_trip_and_malformed_ones_are_refused() {
        let list = AccessList {
            default: Access::Refused,
            rules: vec![
                Rule {
                    export: "vol0".into(),
                    clients: Clients::Network(Network::parse("10.0.0.0/8").unwrap()),
                    access: Access::ReadWrite,
                },
                Rule {
                    export: "*".into(),
                    clients: Clients::Certificate([0xab; 32]),
                    access: Access::ReadOnly,
                },
                Rule {
                    export: "vol0".into(),
                    clients: Clients::Subject("CN=backup host,O=Example\\, Inc".into()),
                    access: Access::Hidden,
                },
            ],
        };
        let tls = TlsSettings {
            client_authorities: vec![vec![1, 2, 3], vec![4]],
            ..TlsSettings::default()
        };
        let mut text = String::new();
        encode(&list, &tls, &mut text);
        assert_eq!(
            text,
            alloc::format!(
                "nbd-tls-clients AQID\nnbd-tls-clients BA==\nnbd-cert-rule * allow-ro {}\n\
                 nbd-subject-rule vol0 deny-hide CN=backup host,O=Example\\, Inc\n",
                "ab".repeat(32)
            )
        );
        let mut decoded_list = AccessList {
            default: Access::Refused,
            rules: vec![list.rules[0].clone()],
        };
        let mut decoded_tls = TlsSettings::default();
        for line in text.lines() {
            assert_eq!(
                decode(line, &mut decoded_list, &mut decoded_tls),
                Some(true),
                "{line}"
            );
        }
        assert_eq!((decoded_list, decoded_tls), (list, tls));

        for bad in [
            "nbd-tls-clients",
            "nbd-tls-clients !!",
            "nbd-tls-clients AQID AQID",
            "nbd-cert-rule vol0 allow",
            "nbd-cert-rule vol0 allow abcd",
            "nbd-cert-rule vol0 maybe abababababababababababababababababababababababababababababababab",
            "nbd-subject-rule vol0 allow",
            "nbd-subject-rule vol0 allow ",
        ] {
            let mut list = AccessList::default();
            let mut tls = TlsSettings::default();
            assert_eq!(decode(bad, &mut list, &mut tls), Some(false), "{bad}");
            assert_eq!((list, tls), (AccessList::default(), TlsSettings::default()));
        }
        let mut untouched = AccessList::default();
        let mut tls = TlsSettings::default();
        assert_eq!(
            decode("nbd-rule * 10.0.0.0/8 allow", &mut untouched, &mut tls),
            None
        );
        assert_eq!(decode("nbd-tls require", &mut untouched, &mut tls), None);
    }
}
