//! Growing devices online the way LVM does it, as table reloads an operator could
//! type: `thin resize` reloads a thin device with a new length; `pool extend` appends
//! a device as a new segment of a pool's data or metadata device (first putting a
//! linear device named `POOL_tdata` or `POOL_tmeta` over a bare disk, so that it can
//! have a second segment) and reloads the pool onto it. Each returns the table lines
//! it loaded and what the pool reported, for the console to print.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::Error;
use crate::activate::Format;
use crate::mapper::DeviceMapper;
use crate::table::{Segment, Target};

/// Which of a pool's devices `pool extend` grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolPart {
    Data,
    Metadata,
}

impl PoolPart {
    fn word(self) -> &'static str {
        match self {
            PoolPart::Data => "data",
            PoolPart::Metadata => "metadata",
        }
    }

    /// LVM's name for the linear device under a pool's data or metadata.
    fn suffix(self) -> &'static str {
        match self {
            PoolPart::Data => "_tdata",
            PoolPart::Metadata => "_tmeta",
        }
    }
}

impl DeviceMapper {
    /// `thin resize NAME SECTORS`: reloads the thin device with the new length and
    /// resumes it.
    pub fn thin_resize(&mut self, name: &str, sectors: u64) -> Result<Vec<String>, Error> {
        let device = self.device(name)?;
        let name = device.name.clone();
        let Target::Thin(thin) = device.table.target() else {
            return Err(format!(
                "thin resize: {name} is a {} device; thin resize resizes thin devices (reload \
                 other devices with a new table)",
                device.table.kind()
            )
            .into());
        };
        self.refuse_loaded(&name)?;
        let table = match &thin.origin_dev {
            Some(origin) => format!(
                "0 {sectors} thin {} {} {origin}",
                thin.pool_dev, thin.dev_id
            ),
            None => format!("0 {sectors} thin {} {}", thin.pool_dev, thin.dev_id),
        };
        let mut lines = self.reload_and_resume(&name, &table)?;
        lines.insert(0, format!("{name}: {table}"));
        Ok(lines)
    }

    /// `pool extend POOL --data|--metadata DEVICE`: appends `device` (a disk or linear
    /// device nothing uses) to the pool's data or metadata device and reloads the pool
    /// onto the larger device.
    pub fn pool_extend(
        &mut self,
        pool: &str,
        part: PoolPart,
        device: &str,
    ) -> Result<Vec<String>, Error> {
        let pool_device = self.device(pool)?;
        let pool = pool_device.name.clone();
        let Target::Pool(table) = pool_device.table.target() else {
            return Err(format!(
                "pool extend: {pool} is a {} device, not a thin-pool",
                pool_device.table.kind()
            )
            .into());
        };
        let (mut table, length) = (table.clone(), pool_device.table.length());
        self.pool(&pool)?;
        self.refuse_loaded(&pool)?;
        let added = crate::table::bare_name(device);
        let sectors = self.size_of(added).map_err(|Error(why)| {
            format!("pool extend: {why}; the new segment must be a disk or linear device")
        })?;
        if let Some(device) = self.find(added)
            && let crate::State::Active(active) = &device.state
            && !active.clients.is_empty()
        {
            return Err(format!(
                "pool extend: {added} has NBD clients connected; the pool would overwrite their \
                 data (disconnect them and remove {added}, or give another device)"
            )
            .into());
        }
        let users = self.users_of(added);
        if !users.is_empty() || added == pool {
            return Err(format!(
                "pool extend: {added} is in use by {}; give a disk or linear device nothing uses",
                if users.is_empty() {
                    pool.clone()
                } else {
                    users.join(", ")
                }
            )
            .into());
        }
        let current = match part {
            PoolPart::Data => table.data_dev.clone(),
            PoolPart::Metadata => table.metadata_dev.clone(),
        };
        let mut lines = Vec::new();
        let under = if self.disk_index(&current).is_some() {
            // A disk cannot take a second segment: a linear device over it can.
            let name = format!("{pool}{}", part.suffix());
            self.check_new_name(&name)
                .map_err(|Error(why)| format!("pool extend: {why}"))?;
            let first = match part {
                PoolPart::Data => length,
                PoolPart::Metadata => self.size_of(&current)?,
            };
            let linear =
                format!("0 {first} linear {current} 0; {first} {sectors} linear {added} 0");
            self.create(&name, false, &linear, Format::Never)
                .map_err(|Error(why)| format!("pool extend: {why}"))?;
            lines.push(format!(
                "{name}: created over {current} so that the pool's {} device can have a second \
                 segment",
                part.word()
            ));
            name
        } else {
            self.refuse_loaded(&current)?;
            let now = self.device(&current)?.table.clone();
            let linear = format!("{now}; {} {sectors} linear {added} 0", now.length());
            self.reload_and_resume(&current, &linear)?;
            current.clone()
        };
        let linear = self.device(&under)?.table.clone();
        lines.extend(
            linear
                .segments()
                .iter()
                .map(|segment| format!("{under}: {segment}")),
        );
        let new_length = match part {
            PoolPart::Data => {
                table.data_dev = under.clone();
                let block = u64::from(table.config.data_block_size);
                linear.length() / block * block
            }
            PoolPart::Metadata => {
                table.metadata_dev = under.clone();
                length
            }
        };
        let pool_table = Segment {
            start: 0,
            length: new_length,
            target: Target::Pool(table),
        }
        .to_string();
        match self.reload_and_resume(&pool, &pool_table) {
            Ok(notes) => {
                lines.push(format!("{pool}: {pool_table}"));
                lines.extend(notes);
                Ok(lines)
            }
            Err(Error(why)) if under != current => {
                let undone = self.remove(&under, false).map_or_else(
                    |Error(again)| format!("; removing {under} failed too: {again}"),
                    |()| String::new(),
                );
                Err(format!("{why}{undone}").into())
            }
            Err(Error(why)) => Err(format!(
                "{why} ({under} keeps its new segment; the pool does not use it yet)"
            )
            .into()),
        }
    }

    /// `reload` then `resume`; if the resume is refused, the inactive table is cleared
    /// so nothing changed. Returns the resume's notes, each with the device's name.
    fn reload_and_resume(&mut self, name: &str, table: &str) -> Result<Vec<String>, Error> {
        self.reload(name, table)?;
        match self.resume(name) {
            Ok(notes) => Ok(notes
                .into_iter()
                .map(|note| format!("{name}: {note}"))
                .collect()),
            Err(error) => {
                self.clear(name)?;
                Err(error)
            }
        }
    }

    /// Refuses to load a table over one an operator loaded and has not resumed.
    fn refuse_loaded(&self, name: &str) -> Result<(), Error> {
        match self.device(name)?.inactive {
            Some(_) => Err(format!(
                "{name} has an inactive table loaded (resume {name} or clear {name} first)"
            )
            .into()),
            None => Ok(()),
        }
    }
}
