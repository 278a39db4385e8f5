//! `thin_dump`-compatible XML of the live metadata or of the held metadata
//! snapshot, in thin-provisioning-tools 0.9.0's canonical form: devices by id,
//! mappings by virtual block, runs that advance by one in both virtual and data block
//! with one time merged into `range_mapping`.

use core::fmt::{self, Write};

use crate::block::le64;
use crate::btree::{self, Cursor};
use crate::error::{Error, Result};
use crate::thin::{DeviceDetails, Roots, ThinMetadata, unpack_block_time};
use crate::tm::Tm;

const VALUE_SIZE: u32 = 8;
const DETAILS_SIZE: u32 = 24;

fn output_error(_: fmt::Error) -> Error {
    Error::Output
}

impl ThinMetadata {
    /// Writes the live metadata (including the uncommitted transaction) as XML.
    pub fn dump_xml(&mut self, out: &mut dyn Write) -> Result<()> {
        let roots = self.live_roots()?;
        write_xml(self.tm_mut(), &roots, out)
    }

    /// Writes the held metadata snapshot as XML (`thin_dump -m`); its
    /// `nr_data_blocks` is 0 because the copy carries no space maps.
    pub fn dump_metadata_snap_xml(&mut self, out: &mut dyn Write) -> Result<()> {
        let roots = self.snapshot_roots()?;
        write_xml(self.tm_mut(), &roots, out)
    }
}

fn write_xml(tm: &mut Tm, roots: &Roots, out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" flags=\"{}\" version=\"2\" data_block_size=\"{}\" nr_data_blocks=\"{}\">",
        roots.time, roots.trans_id, roots.flags, roots.data_block_size, roots.nr_data_blocks
    )
    .map_err(output_error)?;
    let mut devices = Cursor::seek(tm, roots.mapping_root, 0, VALUE_SIZE)?;
    while let Some((dev, value)) = devices.entry() {
        let bottom = le64(value, 0);
        let details = btree::lookup(tm, roots.details_root, dev, DETAILS_SIZE)?
            .map(|v| DeviceDetails::decode(v.bytes()))
            .ok_or(Error::Corrupt {
                block: roots.details_root,
                reason: "device in the mapping tree has no details record",
            })?;
        writeln!(
            out,
            "  <device dev_id=\"{dev}\" mapped_blocks=\"{}\" transaction=\"{}\" creation_time=\"{}\" snap_time=\"{}\">",
            details.mapped_blocks, details.transaction_id, details.creation_time, details.snapshotted_time
        )
        .map_err(output_error)?;
        write_mappings(tm, bottom, out)?;
        writeln!(out, "  </device>").map_err(output_error)?;
        devices.advance(tm)?;
    }
    writeln!(out, "</superblock>").map_err(output_error)
}

/// A run of mappings being merged.
struct Pending {
    origin: u64,
    data: u64,
    len: u64,
    time: u32,
}

fn write_mappings(tm: &mut Tm, root: u64, out: &mut dyn Write) -> Result<()> {
    let mut cursor = Cursor::seek(tm, root, 0, VALUE_SIZE)?;
    let mut pending: Option<Pending> = None;
    while let Some((key, value)) = cursor.entry() {
        let (data, time) = unpack_block_time(le64(value, 0));
        match &mut pending {
            Some(run)
                if run.origin + run.len == key
                    && run.data + run.len == data
                    && run.time == time =>
            {
                run.len += 1
            }
            _ => {
                if let Some(run) = pending.take() {
                    write_run(&run, out)?;
                }
                pending = Some(Pending {
                    origin: key,
                    data,
                    len: 1,
                    time,
                });
            }
        }
        cursor.advance(tm)?;
    }
    if let Some(run) = pending {
        write_run(&run, out)?;
    }
    Ok(())
}

fn write_run(run: &Pending, out: &mut dyn Write) -> Result<()> {
    if run.len == 1 {
        writeln!(
            out,
            "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"{}\"/>",
            run.origin, run.data, run.time
        )
    } else {
        writeln!(
            out,
            "    <range_mapping origin_begin=\"{}\" data_begin=\"{}\" length=\"{}\" time=\"{}\"/>",
            run.origin, run.data, run.len, run.time
        )
    }
    .map_err(output_error)
}
