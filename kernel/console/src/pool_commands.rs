//! Conveniences on top of the dm commands — `pool create`, `pool extend`, `thin
//! create`, `thin resize`, `thin delete`, `thin ls`, `snap create`, `dump` — each written as the same table lines and
//! pool messages an operator could type, so the configuration and `table` show
//! nothing new.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write;

use dm::{DeviceMapper, Format, PoolPart, Target, bare_name, human_bytes};

use crate::job::{Job, Progress};
use crate::snap_create::SnapCreate;
use crate::{CommandError, Console, Platform, outln};

/// Sectors per data block unless `--block-size` says otherwise (64 KiB, dm's minimum).
const DEFAULT_BLOCK_SIZE: u64 = 128;

impl<P: Platform> Console<P> {
    pub(crate) fn pool_command(
        &mut self,
        args: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        const USAGE: &str = "usage: pool create NAME METADATA_DISK DATA_DISK [--block-size \
                             SECTORS] [--low-water-mark BLOCKS] [--format] [--background] | pool \
                             extend POOL \
                             --data|--metadata DEVICE";
        let Some((verb, rest)) = args.split_first() else {
            return Err(USAGE.into());
        };
        if verb == "extend" {
            return self.pool_extend(rest, out);
        }
        if verb != "create" {
            return Err(USAGE.into());
        }
        let options = Options::parse(
            rest,
            &["--block-size", "--low-water-mark"],
            &["--format", "--background"],
            USAGE,
        )?;
        let [name, metadata, data] = options.positional.as_slice() else {
            return Err(format!(
                "pool create: name, metadata and data devices are needed ({USAGE})"
            )
            .into());
        };
        let block_size = match options.value("--block-size") {
            Some(text) => text.parse::<u64>().map_err(|_| {
                format!("pool create: block size '{text}' is not a number of sectors")
            })?,
            None => DEFAULT_BLOCK_SIZE,
        };
        let low_water_mark = match options.value("--low-water-mark") {
            Some(text) => text.parse::<u64>().map_err(|_| {
                format!("pool create: low water mark '{text}' is not a number of blocks")
            })?,
            None => 0,
        };
        let (metadata, data) = (bare_name(metadata), bare_name(data));
        let mut dm = self.dm.borrow_mut();
        let data_sectors = dm.size_of(data)?;
        let length = data_sectors / block_size.max(1) * block_size;
        if length == 0 {
            return Err(format!(
                "pool create: {data} ({data_sectors} sectors) is smaller than one data block \
                 ({block_size} sectors)"
            )
            .into());
        }
        let table =
            format!("0 {length} thin-pool {metadata} {data} {block_size} {low_water_mark} 0");
        let format = if options.flag("--format") {
            Format::Force
        } else {
            Format::IfBlank
        };
        let notes = dm.create(name, false, &table, format)?;
        drop(dm);
        for note in notes {
            outln!(out, "{name}: {note}");
        }
        outln!(out, "{name}: {table}");
        self.follow_format(name, options.flag("--background"), out);
        Ok(())
    }

    /// `pool extend POOL --data|--metadata DEVICE`.
    fn pool_extend(&mut self, args: &[String], out: &mut dyn Write) -> Result<(), CommandError> {
        const USAGE: &str = "usage: pool extend POOL --data DEVICE | pool extend POOL \
                             --metadata DEVICE";
        let options = Options::parse(args, &["--data", "--metadata"], &[], USAGE)?;
        let [pool] = options.positional.as_slice() else {
            return Err(format!("pool extend: which pool? ({USAGE})").into());
        };
        let (part, device) = match (options.value("--data"), options.value("--metadata")) {
            (Some(device), None) => (PoolPart::Data, device),
            (None, Some(device)) => (PoolPart::Metadata, device),
            _ => {
                return Err(format!(
                    "pool extend: give one of --data DEVICE or --metadata DEVICE ({USAGE})"
                )
                .into());
            }
        };
        let lines = self
            .dm
            .borrow_mut()
            .pool_extend(bare_name(pool), part, device)?;
        for line in lines {
            outln!(out, "{line}");
        }
        Ok(())
    }

    pub(crate) fn thin_command(
        &mut self,
        args: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        const USAGE: &str = "usage: thin create NAME POOL [--size SIZE] [--origin DEVICE] | thin \
                             resize NAME SIZE | thin delete NAME [--background] | thin ls POOL";
        let Some((verb, rest)) = args.split_first() else {
            return Err(USAGE.into());
        };
        match verb.as_str() {
            "merge-origin" => self.thin_merge_origin(rest, out),
            "create" => {
                let options = Options::parse(rest, &["--size", "--origin"], &[], USAGE)?;
                let [name, pool] = options.positional.as_slice() else {
                    return Err(format!("thin create: name and pool are needed ({USAGE})").into());
                };
                let origin = options.value("--origin").map(bare_name);
                let mut dm = self.dm.borrow_mut();
                let sectors = match (options.value("--size"), origin) {
                    (Some(size), _) => parse_size(size)?,
                    (None, Some(origin)) => dm.size_of(origin)?,
                    (None, None) => {
                        return Err(
                            "thin create: how big? give --size (e.g. 10G) or an --origin to \
                             take the size of"
                                .into(),
                        );
                    }
                };
                let pool = bare_name(pool);
                let (dev, table) = dm.new_thin(name, pool, sectors, origin, None)?;
                outln!(
                    out,
                    "{name}: thin device {dev} of {pool}, {}: {table}",
                    human_bytes(sectors * 512)
                );
                Ok(())
            }
            "resize" => {
                let [name, size] = rest else {
                    return Err(format!("thin resize: name and size are needed ({USAGE})").into());
                };
                let sectors = parse_size(size)?;
                let lines = self.dm.borrow_mut().thin_resize(bare_name(name), sectors)?;
                for line in lines {
                    outln!(out, "{line}");
                }
                Ok(())
            }
            "delete" => {
                let options = Options::parse(rest, &[], &["--background"], USAGE)?;
                let [name] = options.positional.as_slice() else {
                    return Err(USAGE.into());
                };
                let name = bare_name(name);
                let (pool, dev) = self.dm.borrow_mut().thin_delete(name)?;
                self.follow_job(
                    name,
                    &dm::delete_job_id(&pool, dev),
                    options.flag("--background"),
                    &format!("deleted; {pool} releases its blocks in the background"),
                    &format!("thin device {dev} deleted, all its blocks released"),
                    out,
                );
                Ok(())
            }
            "delta" => self.thin_delta(rest, out),
            "import" => self.thin_import(rest, out),
            "sync" => self.thin_sync(rest, out),
            "ls" => {
                let [pool] = rest else {
                    return Err(USAGE.into());
                };
                thin_ls(&self.dm.borrow(), bare_name(pool), out)
            }
            _ => Err(USAGE.into()),
        }
    }

    pub(crate) fn snap_command(
        &mut self,
        args: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        if let Some(result) = self.cow_snap_command(args, out) {
            return result;
        }
        const USAGE: &str =
            "usage: snap create NAME ORIGIN_THIN_DEVICE | snap merge SNAPSHOT [--into THIN_DEVICE]";
        if let Some((verb, rest)) = args.split_first()
            && verb == "merge"
        {
            return self.snap_merge(rest, out);
        }
        let [verb, name, origin] = args else {
            return Err(USAGE.into());
        };
        if verb != "create" {
            return Err(USAGE.into());
        }
        let mut dm = self.dm.borrow_mut();
        let origin_device = dm.device(origin)?;
        let Target::Thin(thin) = &origin_device.table().target() else {
            return Err(format!(
                "snap create: {} is a {} device; snapshots are taken of thin devices",
                origin_device.name(),
                origin_device.table().kind()
            )
            .into());
        };
        let pool = thin.pool_dev.clone();
        let external = thin.origin_dev.clone();
        let sectors = origin_device.table().length();
        let origin_id = thin.dev_id;
        dm.check_new_name(name)?;
        dm.pool(&pool)?;
        let quiesce = dm.start_quiesce(origin)?;
        drop(dm);
        let mut job = SnapCreate {
            dm: Rc::clone(&self.dm),
            quiesce: Some(quiesce),
            name: name.clone(),
            pool,
            sectors,
            external,
            origin_id,
            cancelled: false,
        };
        // Usually the origin is quiet at once; else the job goes on from the poll.
        let mut context = crate::job::Context {
            clock: &|| self.platform.now_ns(),
        };
        match job.step(&mut context, out) {
            Progress::Finished(result) => result,
            Progress::Running => {
                self.job = Some(Box::new(job));
                Ok(())
            }
        }
    }

    pub(crate) fn dump_command(
        &mut self,
        args: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        const USAGE: &str = "usage: dump POOL [--metadata-snap]";
        let (name, snap) = match args {
            [name] => (name, false),
            [name, flag] if flag == "--metadata-snap" => (name, true),
            _ => return Err(USAGE.into()),
        };
        let dm = self.dm.borrow();
        let pool = dm.pool(name)?;
        // Print into a buffer first so a failure is one error line, not half a dump.
        let mut xml = String::new();
        pool.dump_xml(&mut xml, snap)
            .map_err(|error| format!("dump {name}: {}", error.text))?;
        for line in xml.lines() {
            outln!(out, "{line}");
        }
        Ok(())
    }
}

fn thin_ls(dm: &DeviceMapper, name: &str, out: &mut dyn Write) -> Result<(), CommandError> {
    let pool = dm.pool(name)?;
    let block_bytes = u64::from(pool.config().data_block_size) * 512;
    let usage = pool
        .usage()
        .map_err(|error| format!("thin ls {name}: {}", error.text))?;
    outln!(
        out,
        "{:>8}  {:<16} {:>12} {:>12} {:>12}",
        "DEV",
        "NAME",
        "MAPPED",
        "EXCLUSIVE",
        "SHARED"
    );
    for device in usage {
        let names: Vec<&str> = dm
            .devices()
            .filter(|candidate| {
                matches!(candidate.table().target(), Target::Thin(thin)
                    if thin.pool_dev == name && thin.dev_id == device.dev)
            })
            .map(|candidate| candidate.name())
            .collect();
        outln!(
            out,
            "{:>8}  {:<16} {:>12} {:>12} {:>12}",
            device.dev,
            if names.is_empty() {
                "-".to_string()
            } else {
                names.join(",")
            },
            human_bytes(device.mapped * block_bytes),
            human_bytes(device.exclusive * block_bytes),
            human_bytes(device.shared * block_bytes)
        );
    }
    Ok(())
}

/// A size with a binary unit (`K`, `M`, `G`, `T`, optionally followed by `iB` or `B`),
/// or `S` for sectors, as sectors. A bare number is refused: sectors and bytes are too
/// easy to mix up.
pub(crate) fn parse_size(text: &str) -> Result<u64, CommandError> {
    let bad = || {
        CommandError(format!(
            "size '{text}' is not a whole number with a unit: K, M, G, T (binary) or S (sectors), \
             e.g. 10G"
        ))
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let unit = unit.to_ascii_uppercase();
    let unit = unit
        .strip_suffix("IB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(&unit);
    let sectors = match unit {
        "S" => Some(number),
        "K" => number
            .checked_mul(1 << 10)
            .map(|bytes| bytes / 512)
            .filter(|_| number.is_multiple_of(2)),
        "M" => number.checked_mul(1 << 11),
        "G" => number.checked_mul(1 << 21),
        "T" => number.checked_mul(1 << 31),
        _ => None,
    };
    match sectors {
        Some(sectors) if sectors > 0 => Ok(sectors),
        _ => Err(bad()),
    }
}

/// Command-line options: `--name VALUE` pairs, flags, positional words.
pub(crate) struct Options<'a> {
    pub(crate) positional: Vec<&'a str>,
    values: Vec<(&'a str, &'a str)>,
    flags: Vec<&'a str>,
}

impl<'a> Options<'a> {
    pub(crate) fn parse(
        args: &'a [String],
        with_value: &[&str],
        flags: &[&str],
        usage: &str,
    ) -> Result<Self, CommandError> {
        let mut options = Options {
            positional: Vec::new(),
            values: Vec::new(),
            flags: Vec::new(),
        };
        let mut words = args.iter();
        while let Some(word) = words.next() {
            let word = word.as_str();
            if with_value.contains(&word) {
                let value = words
                    .next()
                    .ok_or_else(|| format!("{word} needs a value ({usage})"))?;
                options.values.push((word, value));
            } else if flags.contains(&word) {
                options.flags.push(word);
            } else if word.starts_with("--") {
                return Err(format!("unknown option '{word}' ({usage})").into());
            } else {
                options.positional.push(word);
            }
        }
        Ok(options)
    }

    pub(crate) fn value(&self, name: &str) -> Option<&'a str> {
        self.values
            .iter()
            .find(|(option, _)| *option == name)
            .map(|(_, value)| *value)
    }

    pub(crate) fn flag(&self, name: &str) -> bool {
        self.flags.contains(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_need_units() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 21);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 21);
        assert_eq!(parse_size("512m").unwrap(), 512 << 11);
        assert_eq!(parse_size("4K").unwrap(), 8);
        assert_eq!(parse_size("2048s").unwrap(), 2048);
        assert_eq!(parse_size("1T").unwrap(), 1 << 31);
        for bad in ["10", "G", "1K", "0M", "1X", "-1G", "99999999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
