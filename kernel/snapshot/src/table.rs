//! Arguments of `snapshot` and `snapshot-merge` table lines:
//! `ORIGIN COW P|PO|N CHUNK [N FEATURE...]`, checked with dm-snapshot's rules.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::MAX_CHUNK_SECTORS;

/// Where the exceptions live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// `P`: on the COW device in Linux's format. `overflow` (`PO`): a snapshot write
    /// that finds no space fails without invalidating the snapshot.
    Persistent { overflow: bool },
    /// `N`: in memory only.
    Transient,
}

/// A refused table: dm's message for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableError(pub String);

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn refuse(text: impl Into<String>) -> TableError {
    TableError(text.into())
}

/// A parsed `snapshot` (or `snapshot-merge`) table's arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotTable {
    pub origin: String,
    pub cow: String,
    pub store: StoreKind,
    /// Sectors; 0 lets a persistent store take its header's (or the default).
    pub chunk: u32,
    pub discard_zeroes_cow: bool,
    pub discard_passdown_origin: bool,
}

/// Checks a non-zero chunk size as Linux does (the reason is dm's).
pub fn check_chunk_size(chunk: u64) -> Result<(), &'static str> {
    if !chunk.is_power_of_two() {
        return Err("Chunk size is not a power of 2");
    }
    if chunk > u64::from(MAX_CHUNK_SECTORS) {
        return Err("Chunk size is too high");
    }
    Ok(())
}

impl SnapshotTable {
    /// Parses the words after the target name. `merge` refuses a transient store, as
    /// `snapshot-merge` does.
    pub fn parse(args: &[&str], merge: bool) -> Result<SnapshotTable, TableError> {
        let [origin, cow, store, chunk, features @ ..] = args else {
            return Err(refuse("requires 4 or more arguments"));
        };
        let store = parse_store(store)?;
        let chunk = chunk
            .parse::<u32>()
            .map_err(|_| refuse("Couldn't create exception store: Invalid chunk size"))?;
        if chunk != 0 {
            check_chunk_size(u64::from(chunk))
                .map_err(|why| refuse(format!("Couldn't create exception store: {why}")))?;
        }
        if chunk == 0 && store == StoreKind::Transient {
            return Err(refuse("Chunk size not set"));
        }
        if origin == cow {
            return Err(refuse("COW device cannot be the same as origin device"));
        }
        let (discard_zeroes_cow, discard_passdown_origin) = parse_features(features)?;
        if merge && store == StoreKind::Transient {
            return Err(refuse(
                "Snapshot exception store does not support snapshot-merge.",
            ));
        }
        Ok(SnapshotTable {
            origin: origin.to_string(),
            cow: cow.to_string(),
            store,
            chunk,
            discard_zeroes_cow,
            discard_passdown_origin,
        })
    }
}

fn parse_store(word: &str) -> Result<StoreKind, TableError> {
    let Some(first) = word.chars().next() else {
        return Err(refuse(
            "Couldn't create exception store: Invalid exception store type",
        ));
    };
    let options = &word[first.len_utf8()..];
    match first.to_ascii_uppercase() {
        'P' if options.is_empty() => Ok(StoreKind::Persistent { overflow: false }),
        'P' if options.starts_with(['O', 'o']) => Ok(StoreKind::Persistent { overflow: true }),
        'P' => Err(refuse(format!(
            "Couldn't create exception store: Unsupported persistent store option: {options}"
        ))),
        'N' => Ok(StoreKind::Transient),
        _ => Err(refuse(
            "Couldn't create exception store: Invalid exception store type",
        )),
    }
}

fn parse_features(words: &[&str]) -> Result<(bool, bool), TableError> {
    let invalid = || refuse("Invalid number of feature arguments");
    let Some((count, rest)) = words.split_first() else {
        return Ok((false, false));
    };
    let count: usize = count.parse().map_err(|_| invalid())?;
    if count > 2 || rest.len() != count {
        return Err(invalid());
    }
    let (mut zeroes, mut passdown) = (false, false);
    for word in rest {
        if word.eq_ignore_ascii_case("discard_zeroes_cow") {
            zeroes = true;
        } else if word.eq_ignore_ascii_case("discard_passdown_origin") {
            passdown = true;
        } else {
            return Err(refuse("Unrecognised feature requested"));
        }
    }
    if passdown && !zeroes {
        return Err(refuse(
            "discard_passdown_origin feature depends on discard_zeroes_cow",
        ));
    }
    Ok((zeroes, passdown))
}

impl fmt::Display for SnapshotTable {
    /// The arguments as dm reads them back: store letters in upper case, features
    /// in dm's order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let store = match self.store {
            StoreKind::Persistent { overflow: false } => "P",
            StoreKind::Persistent { overflow: true } => "PO",
            StoreKind::Transient => "N",
        };
        write!(f, "{} {} {store} {}", self.origin, self.cow, self.chunk)?;
        let features: Vec<&str> = [
            (self.discard_zeroes_cow, "discard_zeroes_cow"),
            (self.discard_passdown_origin, "discard_passdown_origin"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if !features.is_empty() {
            write!(f, " {} {}", features.len(), features.join(" "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<SnapshotTable, TableError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        SnapshotTable::parse(&words, false)
    }

    fn error(line: &str) -> String {
        parse(line).unwrap_err().0
    }

    #[test]
    fn refusals_carry_dms_reasons() {
        assert_eq!(error("o c P"), "requires 4 or more arguments");
        assert_eq!(
            error("o c X 16"),
            "Couldn't create exception store: Invalid exception store type"
        );
        for bad in ["24", "4194304", "2147483648"] {
            assert!(error(&format!("o c P {bad}")).contains("Couldn't create exception store"));
        }
        assert_eq!(
            error("o c P abc"),
            "Couldn't create exception store: Invalid chunk size"
        );
        assert_eq!(
            error("o c P -16"),
            "Couldn't create exception store: Invalid chunk size"
        );
        assert!(error("o c PX 16").ends_with("Unsupported persistent store option: X"));
        assert_eq!(error("o c N 0"), "Chunk size not set");
        assert_eq!(
            error("o o P 16"),
            "COW device cannot be the same as origin device"
        );
        assert_eq!(error("o c P 16 1 bogus"), "Unrecognised feature requested");
        assert_eq!(
            error("o c P 16 1 discard_passdown_origin"),
            "discard_passdown_origin feature depends on discard_zeroes_cow"
        );
        assert_eq!(
            error("o c P 16 3 a b c"),
            "Invalid number of feature arguments"
        );
        assert_eq!(error("o c P 16 2"), "Invalid number of feature arguments");
        let merge = SnapshotTable::parse(&["o", "c", "N", "16"], true).unwrap_err();
        assert_eq!(
            merge.0,
            "Snapshot exception store does not support snapshot-merge."
        );
    }

    #[test]
    fn accepted_spellings_read_back_normalised() {
        for (line, back) in [
            ("o c p 16", "o c P 16"),
            ("o c po 16", "o c PO 16"),
            ("o c NO 16", "o c N 16"),
            (
                "o c n 16 1 discard_zeroes_cow",
                "o c N 16 1 discard_zeroes_cow",
            ),
            (
                "o c P 16 2 DISCARD_PASSDOWN_ORIGIN discard_zeroes_cow",
                "o c P 16 2 discard_zeroes_cow discard_passdown_origin",
            ),
            ("o c P 2097152", "o c P 2097152"),
            ("o c P 1", "o c P 1"),
        ] {
            assert_eq!(parse(line).unwrap().to_string(), back, "{line}");
        }
    }
}
