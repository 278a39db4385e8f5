//! Configuration records linking thin devices of a pool by id: which device a
//! snapshot was taken of (`thin-origin POOL SNAP ORIGIN`, written by `snap create`,
//! so `snap merge` knows where to merge to), and a merge committed to but perhaps
//! not done yet (`thin-merge POOL SNAP ORIGIN`, finished when the configuration is
//! restored). Ids rather than device names, since devices are renamed and
//! re-created while the pool's ids stay.

use alloc::format;
use alloc::string::{String, ToString};

/// What a link record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// `snap` was created as a snapshot of `origin`.
    SnapshotOf,
    /// `snap` is being merged into `origin`.
    Merging,
}

/// Two thin devices of one pool and how they are linked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThinLink {
    pub kind: LinkKind,
    /// The pool's device name.
    pub pool: String,
    pub snap: u64,
    pub origin: u64,
}

impl ThinLink {
    /// The record's line (no newline).
    pub fn encode(&self) -> String {
        let kind = match self.kind {
            LinkKind::SnapshotOf => "thin-origin",
            LinkKind::Merging => "thin-merge",
        };
        format!("{kind} {} {} {}", self.pool, self.snap, self.origin)
    }

    /// Parses the words of a record line; `None` when `kind` is not a link record
    /// or a field is malformed.
    pub fn decode(kind: &str, pool: &str, snap: &str, origin: &str) -> Option<Self> {
        let kind = match kind {
            "thin-origin" => LinkKind::SnapshotOf,
            "thin-merge" => LinkKind::Merging,
            _ => return None,
        };
        Some(ThinLink {
            kind,
            pool: pool.to_string(),
            snap: snap.parse().ok()?,
            origin: origin.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_records_round_trip() {
        let link = ThinLink {
            kind: LinkKind::Merging,
            pool: "pool0".into(),
            snap: 7,
            origin: 2,
        };
        assert_eq!(link.encode(), "thin-merge pool0 7 2");
        assert_eq!(
            ThinLink::decode("thin-merge", "pool0", "7", "2"),
            Some(link)
        );
        assert_eq!(ThinLink::decode("thin-origin", "p", "x", "2"), None);
        assert_eq!(ThinLink::decode("device", "p", "1", "2"), None);
    }
}
