//! The configuration's record of an unfinished import: `import NAME CHECKPOINT
//! SOURCE`, saved at every checkpoint and dropped when the import finishes, so an
//! import interrupted by a power cut or a lost connection can be resumed.

use alloc::format;
use alloc::string::{String, ToString};

/// An import saved in the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportRecord {
    /// The thin device being filled.
    pub name: String,
    /// `nbd://HOST:PORT/EXPORT` or a device name.
    pub source: String,
    /// Bytes of the source known to be on the device, durably.
    pub checkpoint: u64,
}

impl ImportRecord {
    /// The record's configuration line (without the newline).
    pub fn encode(&self) -> String {
        format!("import {} {} {}", self.name, self.checkpoint, self.source)
    }

    /// The words after `import`; `None` if they are malformed.
    pub fn decode(name: &str, checkpoint: &str, source: &str) -> Option<Self> {
        Some(ImportRecord {
            name: name.to_string(),
            checkpoint: checkpoint.parse().ok()?,
            source: source.to_string(),
        })
    }
}
