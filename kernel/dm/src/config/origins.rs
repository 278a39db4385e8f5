//! The configuration's `origin` records: which external origin each thin device of a
//! pool was first activated over, or that it had none. dm cannot tell when a thin
//! device is later activated over another origin (its unprovisioned blocks would then
//! read different data); the device mapper refuses that with these records.
//!
//! Encoded as `origin POOL DEV_ID ORIGIN SECTORS`, or `origin POOL DEV_ID -` for a
//! device without one. Configurations written before these records load without them.

use alloc::format;
use alloc::string::{String, ToString};

/// The external origin a pool's thin device was first activated over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginRecord {
    pub pool: String,
    pub dev_id: u64,
    /// The origin's name and size in sectors; `None` for a device without one.
    pub origin: Option<(String, u64)>,
}

impl OriginRecord {
    /// The record's configuration line (without the line break).
    pub fn encode(&self) -> String {
        match &self.origin {
            Some((name, sectors)) => {
                format!("origin {} {} {name} {sectors}", self.pool, self.dev_id)
            }
            None => format!("origin {} {} -", self.pool, self.dev_id),
        }
    }

    /// Reads a record's line; `None` when it is not a well-formed `origin` line.
    pub fn decode(line: &str) -> Option<Self> {
        let words: alloc::vec::Vec<&str> = line.split(' ').collect();
        let (pool, dev_id, origin) = match words[..] {
            ["origin", pool, dev_id, "-"] => (pool, dev_id, None),
            ["origin", pool, dev_id, name, sectors] if name != "-" => (
                pool,
                dev_id,
                Some((name.to_string(), sectors.parse().ok()?)),
            ),
            _ => return None,
        };
        if pool.is_empty() || name_is_empty(&origin) {
            return None;
        }
        Some(OriginRecord {
            pool: pool.to_string(),
            dev_id: dev_id.parse().ok()?,
            origin,
        })
    }

    /// A disk or device was renamed.
    pub(crate) fn rename(&mut self, from: &str, to: &str) {
        if self.pool == from {
            self.pool = to.to_string();
        }
        if let Some((name, _)) = &mut self.origin
            && name == from
        {
            *name = to.to_string();
        }
    }

    /// Why activating the device over `given` (name, sectors) would be inconsistent,
    /// if it would.
    pub(crate) fn refuses(&self, given: Option<(&str, u64)>) -> Option<String> {
        let device = format!("thin device {} of pool {}", self.dev_id, self.pool);
        match (&self.origin, given) {
            (None, None) => None,
            (Some((name, sectors)), Some(given)) if (name.as_str(), *sectors) == given => None,
            (Some((name, sectors)), None) => Some(format!(
                "{device} was created over external origin {name} ({sectors} sectors); its \
                 table must name that origin"
            )),
            (Some((name, sectors)), Some((other, other_sectors))) => Some(format!(
                "{device} was created over external origin {name} ({sectors} sectors), not \
                 {other} ({other_sectors} sectors): its unprovisioned blocks would read \
                 different data"
            )),
            (None, Some((other, _))) => Some(format!(
                "{device} was created without an external origin; over {other} its \
                 unprovisioned blocks would read different data"
            )),
        }
    }
}

fn name_is_empty(origin: &Option<(String, u64)>) -> bool {
    origin.as_ref().is_some_and(|(name, _)| name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_malformed_lines_are_refused() {
        let over = OriginRecord {
            pool: "pool".into(),
            dev_id: 7,
            origin: Some(("base".into(), 805)),
        };
        let bare = OriginRecord {
            pool: "p2".into(),
            dev_id: 0,
            origin: None,
        };
        assert_eq!(over.encode(), "origin pool 7 base 805");
        assert_eq!(bare.encode(), "origin p2 0 -");
        assert_eq!(OriginRecord::decode(&over.encode()), Some(over.clone()));
        assert_eq!(OriginRecord::decode(&bare.encode()), Some(bare));
        for bad in [
            "origin pool 7 base",
            "origin pool x base 1",
            "origin pool 7 base -1",
            "origin pool 7 - 5",
            "origin  7 -",
            "origin pool 7 base 1 extra",
            "device pool 7 -",
        ] {
            assert_eq!(OriginRecord::decode(bad), None, "{bad}");
        }
        assert_eq!(over.refuses(Some(("base", 805))), None);
        assert!(
            over.refuses(None)
                .unwrap()
                .contains("must name that origin")
        );
        assert!(
            over.refuses(Some(("base", 806)))
                .unwrap()
                .contains("not base (806")
        );
    }
}
