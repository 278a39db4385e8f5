//! The NBD access list's records in the saved configuration:
//! `nbd-default ACCESS` (only when it is not the `allow` every configuration without
//! one means) and `nbd-rule EXPORT NETWORK ACCESS`, ACCESS being `allow`, `allow-ro`,
//! `deny` or `deny-hide`. Rules naming client certificates have records of their
//! own (`clientcert.rs`).

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write;
use nbd::Access;

use crate::access::{AccessList, Clients, Network, Rule};

const DEFAULT: &str = "nbd-default";
const RULE: &str = "nbd-rule";

/// Appends the list's lines to `text`.
pub fn encode(list: &AccessList, text: &mut String) {
    if list.default != AccessList::default().default {
        let _ = writeln!(text, "{DEFAULT} {}", word(list.default));
    }
    for rule in &list.rules {
        if let Clients::Network(network) = &rule.clients {
            let access = word(rule.access);
            let _ = writeln!(text, "{RULE} {} {network} {access}", rule.export);
        }
    }
}

/// Reads `line` into `list` if it is an access record: `None` when it is some other
/// record, `Some(false)` when it is an access record that does not parse.
pub fn decode(line: &str, list: &mut AccessList) -> Option<bool> {
    let words: Vec<&str> = line.split(' ').collect();
    match words.as_slice() {
        [DEFAULT, access] => {
            let access = parse(access);
            if let Some(access) = access {
                list.default = access;
            }
            Some(access.is_some())
        }
        [RULE, export, network, access] => {
            let (Ok(network), Some(access)) = (Network::parse(network), parse(access)) else {
                return Some(false);
            };
            list.set(Rule {
                export: export.to_string(),
                clients: Clients::Network(network),
                access,
            });
            Some(true)
        }
        [DEFAULT | RULE, ..] => Some(false),
        _ => None,
    }
}

pub(super) fn word(access: Access) -> &'static str {
    match access {
        Access::ReadWrite => "allow",
        Access::ReadOnly => "allow-ro",
        Access::Refused => "deny",
        Access::Hidden => "deny-hide",
    }
}

pub(super) fn parse(word: &str) -> Option<Access> {
    match word {
        "allow" => Some(Access::ReadWrite),
        "allow-ro" => Some(Access::ReadOnly),
        "deny" => Some(Access::Refused),
        "deny-hide" => Some(Access::Hidden),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn access_records_round_trip_and_malformed_ones_are_refused() {
        let list = AccessList {
            default: Access::Hidden,
            rules: vec![
                Rule {
                    export: "*".into(),
                    clients: Clients::parse("10.0.0.0/8").unwrap(),
                    access: Access::ReadOnly,
                },
                Rule {
                    export: "vol0".into(),
                    clients: Clients::parse("10.1.2.3").unwrap(),
                    access: Access::ReadWrite,
                },
                Rule {
                    export: "secret".into(),
                    clients: Clients::parse("fd00::/8").unwrap(),
                    access: Access::Refused,
                },
            ],
        };
        let mut text = String::new();
        encode(&list, &mut text);
        assert_eq!(
            text,
            "nbd-default deny-hide\nnbd-rule * 10.0.0.0/8 allow-ro\n\
             nbd-rule vol0 10.1.2.3 allow\nnbd-rule secret fd00::/8 deny\n"
        );
        let mut decoded = AccessList::default();
        for line in text.lines() {
            assert_eq!(decode(line, &mut decoded), Some(true), "{line}");
        }
        assert_eq!(decoded, list);

        let mut untouched = AccessList::default();
        for bad in [
            "nbd-default maybe",
            "nbd-default",
            "nbd-rule vol0 10.1.2.3/33 allow",
            "nbd-rule vol0 10.1.2.3/8 allow",
            "nbd-rule vol0 10.1.2.x allow",
            "nbd-rule vol0 10.1.2.3 allow extra",
        ] {
            assert_eq!(decode(bad, &mut untouched), Some(false), "{bad}");
        }
        assert_eq!(untouched, AccessList::default());
        assert_eq!(decode("device a rw 0 8 linear vda 0", &mut untouched), None);
    }

    #[test]
    fn the_default_allow_writes_nothing() {
        let mut text = String::new();
        encode(&AccessList::default(), &mut text);
        assert_eq!(text, "");
    }
}
