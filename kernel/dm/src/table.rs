//! Device tables: segments `START LENGTH TARGET ARGS...`, one per line or separated
//! by `;`, as `dmsetup create --table` takes them. Device names in a table may carry
//! `/dev/` or `/dev/mapper/` in front; tables are kept and printed without.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use snapshot::SnapshotTable;
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

/// What a segment does with its sectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `linear DEVICE OFFSET`: sectors `OFFSET..OFFSET+LENGTH` of a disk or of another
    /// linear device.
    Linear { device: String, offset: u64 },
    /// `thin-pool METADATA DATA BLOCK_SIZE LOW_WATER_MARK [N FEATURE...]`.
    Pool(PoolTable),
    /// `thin POOL DEV_ID [EXTERNAL_ORIGIN]`.
    Thin(ThinTable),
    /// `snapshot-origin ORIGIN`: the origin's writes copy out into its snapshots.
    SnapshotOrigin { origin: String },
    /// `snapshot ORIGIN COW P|PO|N CHUNK [N FEATURE...]`.
    Snapshot(SnapshotTable),
    /// `snapshot-merge ORIGIN COW P CHUNK [N FEATURE...]`: the origin device while a
    /// snapshot merges into it.
    SnapshotMerge(SnapshotTable),
}

impl Target {
    /// The target type's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Linear { .. } => "linear",
            Target::Pool(_) => "thin-pool",
            Target::Thin(_) => "thin",
            Target::SnapshotOrigin { .. } => "snapshot-origin",
            Target::Snapshot(_) => "snapshot",
            Target::SnapshotMerge(_) => "snapshot-merge",
        }
    }
}

/// Target types that must be a table's only segment: a pool, a thin device (whose
/// volume is the whole device) and the snapshot targets (which cover their origin).
fn stands_alone(kind: &str) -> bool {
    matches!(
        kind,
        "thin-pool" | "thin" | "snapshot-origin" | "snapshot" | "snapshot-merge"
    )
}

/// One segment of a table: sectors `start..start+length` of the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start: u64,
    /// Sectors.
    pub length: u64,
    pub target: Target,
}

/// A parsed table: segments that cover the device from sector 0 on, end to end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    segments: Vec<Segment>,
}

impl Table {
    /// Parses segments `START LENGTH TARGET ARGS...` separated by `;` or newlines, with
    /// dm's rules: the first starts at 0, each starts where the previous one ends, and
    /// `thin-pool` and `thin` stand alone.
    pub fn parse(text: &str) -> Result<Table, String> {
        let lines: Vec<&str> = text
            .split([';', '\n'])
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect();
        if lines.is_empty() {
            return Err(incomplete(text));
        }
        let mut segments: Vec<Segment> = Vec::with_capacity(lines.len());
        for (index, line) in lines.iter().enumerate() {
            let segment = parse_segment(line, &segments).map_err(|why| {
                if lines.len() == 1 {
                    why
                } else {
                    format!("segment {}: {why}", index + 1)
                }
            })?;
            segments.push(segment);
        }
        Ok(Table { segments })
    }

    /// The segments, in sector order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The device's size in sectors.
    pub fn length(&self) -> u64 {
        self.segments
            .last()
            .map_or(0, |segment| segment.start + segment.length)
    }

    /// The first segment's target: the only one of a `thin-pool` or `thin` table.
    pub fn target(&self) -> &Target {
        &self.segments[0].target
    }

    /// The target type's name (segments of several share one: only `linear` mixes).
    pub fn kind(&self) -> &'static str {
        self.target().kind()
    }

    /// Disks and devices the table refers to, each once.
    pub fn dependencies(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for segment in &self.segments {
            let refers: Vec<&str> = match &segment.target {
                Target::Linear { device, .. } => alloc::vec![device.as_str()],
                Target::Pool(pool) => {
                    alloc::vec![pool.metadata_dev.as_str(), pool.data_dev.as_str()]
                }
                Target::Thin(thin) => core::iter::once(thin.pool_dev.as_str())
                    .chain(thin.origin_dev.as_deref())
                    .collect(),
                Target::SnapshotOrigin { origin } => alloc::vec![origin.as_str()],
                Target::Snapshot(snap) | Target::SnapshotMerge(snap) => {
                    alloc::vec![snap.origin.as_str(), snap.cow.as_str()]
                }
            };
            for name in refers {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names
    }

    /// Replaces references to `from` by `to` (a disk renamed since the table was
    /// saved).
    pub fn rename(&mut self, from: &str, to: &str) {
        for segment in &mut self.segments {
            let names: Vec<&mut String> = match &mut segment.target {
                Target::Linear { device, .. } => alloc::vec![device],
                Target::Pool(pool) => alloc::vec![&mut pool.metadata_dev, &mut pool.data_dev],
                Target::Thin(thin) => core::iter::once(&mut thin.pool_dev)
                    .chain(thin.origin_dev.as_mut())
                    .collect(),
                Target::SnapshotOrigin { origin } => alloc::vec![origin],
                Target::Snapshot(snap) | Target::SnapshotMerge(snap) => {
                    alloc::vec![&mut snap.origin, &mut snap.cow]
                }
            };
            for name in names {
                if name == from {
                    *name = to.to_string();
                }
            }
        }
    }
}

/// Parses one segment that is to follow `before`, checking in dm's order.
fn parse_segment(line: &str, before: &[Segment]) -> Result<Segment, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let [start, length, kind, args @ ..] = words.as_slice() else {
        return Err(incomplete(line));
    };
    let start = number(start, "start")?;
    let length = number(length, "length")?;
    if let Some(first) = before.first()
        && stands_alone(first.target.kind())
    {
        return Err(format!(
            "target type {} must appear alone in table",
            first.target.kind()
        ));
    }
    if length == 0 {
        return Err("table length is 0: give the device's size in sectors".to_string());
    }
    if !matches!(
        *kind,
        "linear" | "thin-pool" | "thin" | "snapshot-origin" | "snapshot" | "snapshot-merge"
    ) {
        return Err(format!(
            "unknown target type '{kind}' (use linear, thin-pool, thin, snapshot-origin, \
             snapshot or snapshot-merge)"
        ));
    }
    if stands_alone(kind) && !before.is_empty() {
        return Err(format!(
            "singleton target type must appear alone in table ({kind} cannot follow other \
             segments)"
        ));
    }
    match before.last() {
        None if start != 0 => {
            return Err(format!(
                "Gap in table: the first segment starts at sector {start}; a table starts at \
                 sector 0"
            ));
        }
        Some(last) if start != last.start + last.length => {
            return Err(format!(
                "Gap in table: this segment starts at sector {start}, the one before ends at \
                 sector {}",
                last.start + last.length
            ));
        }
        _ => {}
    }
    let target = match *kind {
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
        "snapshot-origin" | "snapshot" | "snapshot-merge" => {
            crate::snapshots::parse_target(kind, args)?
        }
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
        _ => {
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
    };
    Ok(Segment {
        start,
        length,
        target,
    })
}

fn incomplete(line: &str) -> String {
    format!("table '{line}' is incomplete (expected START LENGTH TARGET ARGS...)")
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.start, self.length, self.target.kind())?;
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
            Target::SnapshotOrigin { origin } => write!(f, " {origin}"),
            Target::Snapshot(snap) | Target::SnapshotMerge(snap) => write!(f, " {snap}"),
        }
    }
}

/// The segments on one line, separated by `; ` (how the configuration saves a table
/// and `create --table` takes it back).
impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, segment) in self.segments.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{segment}")?;
        }
        Ok(())
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
            table.segments(),
            [Segment {
                start: 0,
                length: 409600,
                target: Target::Linear {
                    device: "vdc".into(),
                    offset: 2048
                }
            }]
        );
        assert_eq!(table.length(), 409600);
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
    fn segments_are_separated_by_semicolons_or_newlines_and_print_on_one_line() {
        let concat = "0 100 linear /dev/vda 8;100 50 linear vdb 0\n 150 10 linear base 2 ;";
        let table = Table::parse(concat).unwrap();
        assert_eq!(
            table.to_string(),
            "0 100 linear vda 8; 100 50 linear vdb 0; 150 10 linear base 2"
        );
        assert_eq!(Table::parse(&table.to_string()).unwrap(), table);
        let starts: Vec<(u64, u64)> = table
            .segments()
            .iter()
            .map(|segment| (segment.start, segment.length))
            .collect();
        assert_eq!(starts, [(0, 100), (100, 50), (150, 10)]);
        assert_eq!(table.length(), 160);
        assert_eq!(table.kind(), "linear");
        assert_eq!(table.dependencies(), ["vda", "vdb", "base"]);
        let twice = Table::parse("0 8 linear vda 0; 8 8 linear vda 100").unwrap();
        assert_eq!(twice.dependencies(), ["vda"]);
        let mut renamed = twice.clone();
        renamed.rename("vda", "vdc");
        assert_eq!(renamed.to_string(), "0 8 linear vdc 0; 8 8 linear vdc 100");
    }

    #[test]
    fn segments_follow_dms_rules() {
        let cases = [
            (
                "0 100 linear vda 0; 96 8 linear vdb 0",
                "segment 2: Gap in table",
            ),
            (
                "0 100 linear vda 0; 104 8 linear vdb 0",
                "segment 2: Gap in table",
            ),
            (
                "8 100 linear vda 0; 108 8 linear vdb 0",
                "segment 1: Gap in table",
            ),
            (
                "0 100 linear vda 0; 100 0 linear vdb 0",
                "segment 2: table length is 0",
            ),
            (
                "0 8 linear vda 0; 8 8 thin-pool vdb vdc 128 0",
                "segment 2: singleton target type must appear alone in table",
            ),
            (
                "0 8 linear vda 0; 8 8 thin pool 1",
                "segment 2: singleton target type must appear alone in table",
            ),
            (
                "0 256 thin-pool vdb vdc 128 0; 256 8 linear vda 0",
                "segment 2: target type thin-pool must appear alone in table",
            ),
            (
                "0 8 thin pool 1\n8 8 thin pool 2",
                "segment 2: target type thin must appear alone in table",
            ),
            (
                "0 8 linear vda 0; 8 8 linear vdb",
                "segment 2: linear takes 2",
            ),
            (" ; \n", "table ' ; \n' is incomplete"),
        ];
        for (text, expected) in cases {
            let error = Table::parse(text).unwrap_err();
            assert!(error.starts_with(expected), "{text}: {error}");
        }
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
