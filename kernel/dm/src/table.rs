//! Device tables: one line `START LENGTH TARGET ARGS...` per device, as `dmsetup
//! create --table` takes them. Device names in a table may carry `/dev/` or
//! `/dev/mapper/` in front; tables are kept and printed without.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use thin_pool::{PoolTable, ThinTable};

/// Longest device name (dm's limit is 127 bytes plus the terminator).
pub const MAX_NAME: usize = 127;

/// A device name without its `/dev/mapper/` or `/dev/` prefix.
pub fn bare_name(name: &str) -> &str {
    name.strip_prefix("/dev/mapper/")
        .or_else(|| name.strip_prefix("/dev/"))
        .unwrap_or(name)
}

/// Checks a name for a new device: letters, digits and `._+-`, not starting with `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid device name '{name}' (use up to {MAX_NAME} letters, digits, '.', '_', '+' \
             or '-', not starting with '-')"
        ))
    }
}

/// What a device does with its sectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `linear DEVICE OFFSET`: sectors `OFFSET..OFFSET+LENGTH` of a disk or of another
    /// linear device.
    Linear { device: String, offset: u64 },
    /// `thin-pool METADATA DATA BLOCK_SIZE LOW_WATER_MARK [N FEATURE...]`.
    Pool(PoolTable),
    /// `thin POOL DEV_ID [EXTERNAL_ORIGIN]`.
    Thin(ThinTable),
}

/// A parsed one-segment table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// Sectors.
    pub length: u64,
    pub target: Target,
}

impl Table {
    /// Parses `0 LENGTH TARGET ARGS...` (already split into words or not).
    pub fn parse(line: &str) -> Result<Table, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [start, length, target, args @ ..] = words.as_slice() else {
            return Err(format!(
                "table '{line}' is incomplete (expected START LENGTH TARGET ARGS...)"
            ));
        };
        let start = number(start, "start")?;
        if start != 0 {
            return Err(format!(
                "table start is {start}: a device has one segment, which starts at sector 0"
            ));
        }
        let length = number(length, "length")?;
        if length == 0 {
            return Err("table length is 0: give the device's size in sectors".to_string());
        }
        let target = match *target {
            "linear" => match args {
                [device, offset] => Target::Linear {
                    device: bare_name(device).to_string(),
                    offset: number(offset, "linear offset")?,
                },
                _ => {
                    return Err(format!(
                        "linear takes 2 arguments, DEVICE OFFSET (got {})",
                        args.len()
                    ));
                }
            },
            "thin-pool" => {
                let mut table =
                    PoolTable::parse(line).map_err(|error| format!("thin-pool: {error}"))?;
                table.metadata_dev = bare_name(&table.metadata_dev).to_string();
                table.data_dev = bare_name(&table.data_dev).to_string();
                if table.metadata_dev == table.data_dev {
                    return Err(format!("thin-pool: {}", thin_pool::TableError::SameDevice));
                }
                Target::Pool(table)
            }
            "thin" => {
                let mut table = ThinTable::parse(line).map_err(|error| format!("thin: {error}"))?;
                table.pool_dev = bare_name(&table.pool_dev).to_string();
                if let Some(origin) = &mut table.origin_dev {
                    *origin = bare_name(origin).to_string();
                    if *origin == table.pool_dev {
                        return Err(format!("thin: {}", thin_pool::TableError::SameOrigin));
                    }
                }
                Target::Thin(table)
            }
            other => {
                return Err(format!(
                    "unknown target type '{other}' (use linear, thin-pool or thin)"
                ));
            }
        };
        Ok(Table { length, target })
    }

    /// The target type's name.
    pub fn kind(&self) -> &'static str {
        match self.target {
            Target::Linear { .. } => "linear",
            Target::Pool(_) => "thin-pool",
            Target::Thin(_) => "thin",
        }
    }

    /// Disks and devices the table refers to.
    pub fn dependencies(&self) -> Vec<&str> {
        match &self.target {
            Target::Linear { device, .. } => alloc::vec![device.as_str()],
            Target::Pool(pool) => alloc::vec![pool.metadata_dev.as_str(), pool.data_dev.as_str()],
            Target::Thin(thin) => core::iter::once(thin.pool_dev.as_str())
                .chain(thin.origin_dev.as_deref())
                .collect(),
        }
    }

    /// Replaces references to `from` by `to` (a disk renamed since the table was
    /// saved).
    pub fn rename(&mut self, from: &str, to: &str) {
        let names: Vec<&mut String> = match &mut self.target {
            Target::Linear { device, .. } => alloc::vec![device],
            Target::Pool(pool) => alloc::vec![&mut pool.metadata_dev, &mut pool.data_dev],
            Target::Thin(thin) => core::iter::once(&mut thin.pool_dev)
                .chain(thin.origin_dev.as_mut())
                .collect(),
        };
        for name in names {
            if name == from {
                *name = to.to_string();
            }
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0 {} {}", self.length, self.kind())?;
        match &self.target {
            Target::Linear { device, offset } => write!(f, " {device} {offset}"),
            Target::Pool(pool) => {
                let features = pool.config.features.words();
                write!(
                    f,
                    " {} {} {} {} {}",
                    pool.metadata_dev,
                    pool.data_dev,
                    pool.config.data_block_size,
                    pool.config.low_water_mark,
                    features.len()
                )?;
                features.iter().try_for_each(|word| write!(f, " {word}"))
            }
            Target::Thin(thin) => {
                write!(f, " {} {}", thin.pool_dev, thin.dev_id)?;
                match &thin.origin_dev {
                    Some(origin) => write!(f, " {origin}"),
                    None => Ok(()),
                }
            }
        }
    }
}

fn number(word: &str, what: &str) -> Result<u64, String> {
    if !word.is_empty()
        && word.bytes().all(|b| b.is_ascii_digit())
        && let Ok(value) = word.parse()
    {
        return Ok(value);
    }
    Err(format!(
        "invalid {what} '{word}' (a decimal number of sectors)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_tables_parse_and_print_canonically() {
        let table = Table::parse("0  409600 linear /dev/vdc 2048").unwrap();
        assert_eq!(
            table,
            Table {
                length: 409600,
                target: Target::Linear {
                    device: "vdc".into(),
                    offset: 2048
                }
            }
        );
        assert_eq!(table.to_string(), "0 409600 linear vdc 2048");
        assert_eq!(table.dependencies(), ["vdc"]);
        let mut renamed = table.clone();
        renamed.rename("vdc", "vdd");
        assert_eq!(renamed.to_string(), "0 409600 linear vdd 2048");
        assert_eq!(
            Table::parse("0 8 linear /dev/mapper/base 0")
                .unwrap()
                .dependencies(),
            ["base"]
        );
    }

    #[test]
    fn table_errors_say_what_to_fix() {
        let cases = [
            ("0 100", "incomplete"),
            ("8 100 linear vda 0", "starts at sector 0"),
            ("0 0 linear vda 0", "length is 0"),
            ("0 -5 linear vda 0", "invalid length '-5'"),
            ("0 100 linear vda", "linear takes 2 arguments"),
            ("0 100 linear vda x", "invalid linear offset 'x'"),
            (
                "0 100 striped 2 8 vda 0 vdb 0",
                "unknown target type 'striped'",
            ),
        ];
        for (line, text) in cases {
            let error = Table::parse(line).unwrap_err();
            assert!(error.contains(text), "{line}: {error}");
        }
    }

    #[test]
    fn pool_and_thin_tables_print_as_dm_does() {
        let pool = Table::parse("0 2097152 thin-pool /dev/vda /dev/vdb 128 0").unwrap();
        assert_eq!(pool.to_string(), "0 2097152 thin-pool vda vdb 128 0 0");
        assert_eq!(pool.dependencies(), ["vda", "vdb"]);
        let featured = Table::parse(
            "0 2097152 thin-pool vda vdb 256 10 2 Error_If_No_Space skip_block_zeroing",
        )
        .unwrap();
        assert_eq!(
            featured.to_string(),
            "0 2097152 thin-pool vda vdb 256 10 2 skip_block_zeroing error_if_no_space"
        );
        let thin = Table::parse("0 2097152 thin /dev/mapper/pool 0 /dev/image").unwrap();
        assert_eq!(thin.to_string(), "0 2097152 thin pool 0 image");
        assert_eq!(
            Table::parse("0 8 thin pool 7").unwrap().to_string(),
            "0 8 thin pool 7"
        );
        assert_eq!(thin.dependencies(), ["pool", "image"]);
        let mut renamed = pool.clone();
        renamed.rename("vdb", "vdc");
        assert_eq!(renamed.to_string(), "0 2097152 thin-pool vda vdc 128 0 0");
    }

    #[test]
    fn names() {
        assert_eq!(bare_name("/dev/mapper/pool"), "pool");
        assert_eq!(bare_name("/dev/vda"), "vda");
        assert_eq!(bare_name("pool"), "pool");
        assert!(check_name("guest-01.root_a+b").is_ok());
        for bad in ["", "-x", "a/b", "a b", &"x".repeat(128)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
