//! Pool and thin table lines: the parameters a pool or volume is loaded with, parsed
//! with device-mapper's rules and error texts so operators see the messages they know.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use persistent_data::thin::MAX_DEV_ID;

/// Smallest data block size in sectors (64 KiB).
pub const MIN_DATA_BLOCK_SIZE: u32 = 128;
/// Largest data block size in sectors (1 GiB).
pub const MAX_DATA_BLOCK_SIZE: u32 = 2_097_152;
/// Default time writes wait for data space before failing (dm's `no_space_timeout`).
pub const DEFAULT_NO_SPACE_TIMEOUT_SECS: u64 = 60;
/// Metadata is committed at least this often while it has changes (dm's COMMIT_PERIOD).
pub const COMMIT_PERIOD_NS: u64 = 1_000_000_000;
/// A metadata snapshot held longer than this raises an event (it costs copy-on-write).
pub const DEFAULT_METADATA_SNAP_WARNING_SECS: u64 = 600;
/// At most this many feature words follow the feature count.
const MAX_FEATURES: usize = 4;

/// Optional behaviour of a pool (the table's feature words).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// Newly provisioned blocks are not zeroed.
    pub skip_block_zeroing: bool,
    /// Discards are not supported at all.
    pub ignore_discard: bool,
    /// Discards unmap blocks but are not sent to the data device.
    pub no_discard_passdown: bool,
    /// Metadata is never changed; writes that need a new block fail.
    pub read_only: bool,
    /// Writes that need space fail at once with ENOSPC instead of waiting.
    pub error_if_no_space: bool,
}

impl Features {
    /// Parses feature words (case-insensitive), at most four of them.
    pub fn parse(words: &[&str]) -> Result<Self, TableError> {
        if words.len() > MAX_FEATURES {
            return Err(TableError::FeatureCount);
        }
        let mut features = Features::default();
        for word in words {
            let flag = match word.to_ascii_lowercase().as_str() {
                "skip_block_zeroing" => &mut features.skip_block_zeroing,
                "ignore_discard" => &mut features.ignore_discard,
                "no_discard_passdown" => &mut features.no_discard_passdown,
                "read_only" => &mut features.read_only,
                "error_if_no_space" => &mut features.error_if_no_space,
                _ => return Err(TableError::UnknownFeature(word.to_string())),
            };
            *flag = true;
        }
        Ok(features)
    }

    /// The feature words as a table shows them: count, then the words.
    pub fn words(&self) -> Vec<&'static str> {
        [
            (self.skip_block_zeroing, "skip_block_zeroing"),
            (self.ignore_discard, "ignore_discard"),
            (self.no_discard_passdown, "no_discard_passdown"),
            (self.read_only, "read_only"),
            (self.error_if_no_space, "error_if_no_space"),
        ]
        .into_iter()
        .filter_map(|(on, word)| on.then_some(word))
        .collect()
    }
}

/// Everything a pool is opened with besides its two devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Length of the pool target in sectors: the data space offered. Data blocks =
    /// length / data block size.
    pub length: u64,
    /// Data block size in sectors (multiple of 128, 128..=2097152).
    pub data_block_size: u32,
    /// An event is raised when free data blocks fall to this many.
    pub low_water_mark: u64,
    pub features: Features,
    /// Seconds queued writes wait for space before failing with ENOSPC; 0 = forever.
    pub no_space_timeout_secs: u64,
    /// Metadata cache capacity in 4 KiB blocks.
    pub cache_blocks: usize,
    /// Seconds a metadata snapshot may be held before an event complains.
    pub metadata_snap_warning_secs: u64,
}

impl PoolConfig {
    /// A configuration with dm's defaults.
    pub fn new(length: u64, data_block_size: u32) -> Self {
        PoolConfig {
            length,
            data_block_size,
            low_water_mark: 0,
            features: Features::default(),
            no_space_timeout_secs: DEFAULT_NO_SPACE_TIMEOUT_SECS,
            cache_blocks: persistent_data::cache::DEFAULT_CACHE_BLOCKS,
            metadata_snap_warning_secs: DEFAULT_METADATA_SNAP_WARNING_SECS,
        }
    }

    /// Data blocks the pool length provides.
    pub fn data_blocks(&self) -> u64 {
        self.length / u64::from(self.data_block_size)
    }
}

/// Checks a data block size with dm's rules.
pub fn parse_block_size(text: &str) -> Result<u32, TableError> {
    text.parse::<u32>()
        .ok()
        .filter(|size| valid_block_size(*size))
        .ok_or(TableError::BlockSize)
}

/// 128..=2097152 sectors and a multiple of 128.
pub fn valid_block_size(size: u32) -> bool {
    (MIN_DATA_BLOCK_SIZE..=MAX_DATA_BLOCK_SIZE).contains(&size)
        && size.is_multiple_of(MIN_DATA_BLOCK_SIZE)
}

/// A parsed `thin-pool` table line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolTable {
    pub start: u64,
    pub metadata_dev: String,
    pub data_dev: String,
    /// Length, block size, low water mark and features; the rest at defaults.
    pub config: PoolConfig,
}

impl PoolTable {
    /// Parses `<start> <length> thin-pool <metadata dev> <data dev> <block size>
    /// <low water mark> [<#features> <feature>...]`.
    pub fn parse(line: &str) -> Result<Self, TableError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (start, length, args) = split_target(&words, "thin-pool")?;
        if args.len() < 4 {
            return Err(TableError::ArgumentCount);
        }
        if args[0] == args[1] {
            return Err(TableError::SameDevice);
        }
        let data_block_size = parse_block_size(args[2])?;
        let low_water_mark = args[3].parse().map_err(|_| TableError::LowWaterMark)?;
        let features = match args.get(4) {
            None => Features::default(),
            Some(count) => {
                let count: usize = count.parse().map_err(|_| TableError::FeatureCount)?;
                if count > MAX_FEATURES || args.len() - 5 != count {
                    return Err(TableError::FeatureCount);
                }
                Features::parse(&args[5..])?
            }
        };
        let mut config = PoolConfig::new(length, data_block_size);
        config.low_water_mark = low_water_mark;
        config.features = features;
        Ok(PoolTable {
            start,
            metadata_dev: args[0].to_string(),
            data_dev: args[1].to_string(),
            config,
        })
    }
}

/// A parsed `thin` table line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThinTable {
    pub start: u64,
    /// The volume's size in sectors (the pool stores none).
    pub length: u64,
    pub pool_dev: String,
    pub dev_id: u64,
    pub origin_dev: Option<String>,
}

impl ThinTable {
    /// Parses `<start> <length> thin <pool dev> <dev id> [<external origin dev>]`.
    pub fn parse(line: &str) -> Result<Self, TableError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (start, length, args) = split_target(&words, "thin")?;
        if !(2..=3).contains(&args.len()) {
            return Err(TableError::ArgumentCount);
        }
        let dev_id = parse_dev_id(args[1]).ok_or(TableError::DeviceId)?;
        let origin_dev = args.get(2).map(|origin| origin.to_string());
        if origin_dev.as_deref() == Some(args[0]) {
            return Err(TableError::SameOrigin);
        }
        Ok(ThinTable {
            start,
            length,
            pool_dev: args[0].to_string(),
            dev_id,
            origin_dev,
        })
    }
}

fn split_target<'a>(
    words: &'a [&'a str],
    target: &'static str,
) -> Result<(u64, u64, &'a [&'a str]), TableError> {
    if words.len() < 3 {
        return Err(TableError::ArgumentCount);
    }
    let start = words[0]
        .parse()
        .map_err(|_| TableError::Number(words[0].to_string()))?;
    let length = words[1]
        .parse()
        .map_err(|_| TableError::Number(words[1].to_string()))?;
    if words[2] != target {
        return Err(TableError::Target {
            expected: target,
            found: words[2].to_string(),
        });
    }
    Ok((start, length, &words[3..]))
}

/// A decimal device id of at most 24 bits (a leading `+` is accepted, as the kernel's
/// number parser does).
pub fn parse_dev_id(text: &str) -> Option<u64> {
    parse_decimal(text).filter(|id| *id <= MAX_DEV_ID)
}

/// A decimal u64 as the kernel's `kstrtoull` reads it.
pub fn parse_decimal(text: &str) -> Option<u64> {
    let digits = text.strip_prefix('+').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A table line that cannot be loaded; the texts are device-mapper's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableError {
    ArgumentCount,
    Number(String),
    Target {
        expected: &'static str,
        found: String,
    },
    SameDevice,
    SameOrigin,
    BlockSize,
    LowWaterMark,
    FeatureCount,
    UnknownFeature(String),
    DeviceId,
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::ArgumentCount => f.write_str("Invalid argument count"),
            TableError::Number(word) => write!(f, "Invalid number '{word}' in table"),
            TableError::Target { expected, found } => {
                write!(f, "Invalid target type '{found}' (expected {expected})")
            }
            TableError::SameDevice => f.write_str(
                "Error setting metadata or data device (they must be different devices)",
            ),
            TableError::SameOrigin => {
                f.write_str("Error setting origin device (it must differ from the pool)")
            }
            TableError::BlockSize => {
                f.write_str("Invalid block size (sectors: a multiple of 128 from 128 to 2097152)")
            }
            TableError::LowWaterMark => f.write_str("Invalid low water mark"),
            TableError::FeatureCount => f.write_str("Invalid number of pool feature arguments"),
            TableError::UnknownFeature(word) => {
                write!(f, "Unrecognised pool feature requested: {word}")
            }
            TableError::DeviceId => f.write_str("Invalid device id"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn pool_table_with_features() {
        let table = PoolTable::parse(
            "0 2097152 thin-pool vda vdb 128 32 2 skip_block_zeroing Error_If_No_Space",
        )
        .unwrap();
        assert_eq!(table.metadata_dev, "vda");
        assert_eq!(table.data_dev, "vdb");
        assert_eq!(table.config.length, 2_097_152);
        assert_eq!(table.config.data_blocks(), 16384);
        assert_eq!(table.config.low_water_mark, 32);
        assert!(table.config.features.skip_block_zeroing);
        assert!(table.config.features.error_if_no_space);
        assert_eq!(
            table.config.features.words(),
            ["skip_block_zeroing", "error_if_no_space"]
        );
        assert_eq!(
            table.config.no_space_timeout_secs,
            DEFAULT_NO_SPACE_TIMEOUT_SECS
        );
    }

    #[test]
    fn pool_table_errors_use_dm_texts() {
        let cases = [
            ("0 100 thin-pool vda vdb 128", "Invalid argument count"),
            (
                "0 100 thin-pool vda vda 128 0",
                "Error setting metadata or data device",
            ),
            ("0 100 thin-pool vda vdb 100 0", "Invalid block size"),
            ("0 100 thin-pool vda vdb 64 0", "Invalid block size"),
            ("0 100 thin-pool vda vdb 4194304 0", "Invalid block size"),
            ("0 100 thin-pool vda vdb 128 x", "Invalid low water mark"),
            (
                "0 100 thin-pool vda vdb 128 0 5 read_only read_only read_only read_only read_only",
                "Invalid number of pool feature arguments",
            ),
            (
                "0 100 thin-pool vda vdb 128 0 2 read_only",
                "Invalid number of pool feature arguments",
            ),
            (
                "0 100 thin-pool vda vdb 128 0 1 zero_blocks",
                "Unrecognised pool feature requested",
            ),
        ];
        for (line, text) in cases {
            let error = PoolTable::parse(line).unwrap_err().to_string();
            assert!(error.starts_with(text), "{line}: {error}");
        }
        assert!(PoolTable::parse("0 100 thin-pool vda vdb 256 0 0").is_ok());
        assert!(PoolTable::parse("0 100 thin-pool vda vdb 384 0").is_ok());
    }

    #[test]
    fn thin_table() {
        let table = ThinTable::parse("0 4096 thin pool0 16777215 base").unwrap();
        assert_eq!(table.dev_id, MAX_DEV_ID);
        assert_eq!(table.origin_dev.as_deref(), Some("base"));
        assert_eq!(
            ThinTable::parse("0 4096 thin pool0 16777216").unwrap_err(),
            TableError::DeviceId
        );
        assert_eq!(
            ThinTable::parse("0 4096 thin pool0").unwrap_err(),
            TableError::ArgumentCount
        );
        assert_eq!(
            ThinTable::parse("0 4096 thin pool0 1 pool0").unwrap_err(),
            TableError::SameOrigin
        );
    }
}
