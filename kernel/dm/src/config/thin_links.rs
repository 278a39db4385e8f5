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
    /// `snap` is being merged into its external origin (`origin` is `snap` too).
    IntoExternalOrigin,
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
        match self.kind {
            LinkKind::SnapshotOf => {
                format!("thin-origin {} {} {}", self.pool, self.snap, self.origin)
            }
            LinkKind::Merging => format!("thin-merge {} {} {}", self.pool, self.snap, self.origin),
            LinkKind::IntoExternalOrigin => {
                format!("thin-merge-origin {} {}", self.pool, self.snap)
            }
        }
    }

    /// Parses the words of a record line; `None` when `kind` is not a link record
    /// or a field is malformed.
    pub fn decode(kind: &str, pool: &str, snap: &str, origin: Option<&str>) -> Option<Self> {
        let snap: u64 = snap.parse().ok()?;
        let (kind, origin) = match (kind, origin) {
            ("thin-origin", Some(origin)) => (LinkKind::SnapshotOf, origin.parse().ok()?),
            ("thin-merge", Some(origin)) => (LinkKind::Merging, origin.parse().ok()?),
            ("thin-merge-origin", None) => (LinkKind::IntoExternalOrigin, snap),
            _ => return None,
        };
        Some(ThinLink {
            kind,
            pool: pool.to_string(),
            snap,
            origin,
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
            ThinLink::decode("thin-merge", "pool0", "7", Some("2")),
            Some(link)
        );
        let into_origin = ThinLink {
            kind: LinkKind::IntoExternalOrigin,
            pool: "p".into(),
            snap: 3,
            origin: 3,
        };
        assert_eq!(into_origin.encode(), "thin-merge-origin p 3");
        assert_eq!(
            ThinLink::decode("thin-merge-origin", "p", "3", None),
            Some(into_origin)
        );
        assert_eq!(ThinLink::decode("thin-origin", "p", "x", Some("2")), None);
        assert_eq!(ThinLink::decode("thin-origin", "p", "1", None), None);
        assert_eq!(ThinLink::decode("device", "p", "1", Some("2")), None);
    }
}
