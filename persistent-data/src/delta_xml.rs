//! `thin_delta`'s XML (thin-provisioning-tools 0.9.0), written piece by piece as a
//! [`Delta`](crate::thin::Delta) produces them: the plain form merges adjacent
//! pieces of one kind into one element; `--verbose` keeps every piece as a `range`
//! with its data blocks, grouped in one element per stretch of one kind.

use core::fmt::{self, Write};

use crate::error::{Error, Result};
use crate::thin::{DeltaKind, DeltaPiece, DeltaSource};

fn output_error(_: fmt::Error) -> Error {
    Error::Output
}

/// The writer's state between pieces.
#[derive(Clone, Debug)]
pub struct DeltaXml {
    verbose: bool,
    /// Plain form: the element being merged (kind, begin, end).
    merging: Option<(DeltaKind, u64, u64)>,
    /// Verbose form: the kind whose group element is open.
    group: Option<DeltaKind>,
}

impl DeltaXml {
    pub fn new(verbose: bool) -> Self {
        DeltaXml {
            verbose,
            merging: None,
            group: None,
        }
    }

    /// The opening `superblock` and `diff` lines.
    pub fn begin(
        &mut self,
        source: &DeltaSource,
        left: u64,
        right: u64,
        out: &mut dyn Write,
    ) -> Result<()> {
        let roots = &source.roots;
        write!(
            out,
            "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" data_block_size=\"{}\" nr_data_blocks=\"{}",
            roots.time, roots.trans_id, roots.data_block_size, roots.nr_data_blocks
        )
        .map_err(output_error)?;
        if let Some(snap) = source.metadata_snap {
            write!(out, "\" metadata_snap=\"{snap}").map_err(output_error)?;
        }
        writeln!(out, "\">\n  <diff left=\"{left}\" right=\"{right}\">").map_err(output_error)
    }

    pub fn piece(&mut self, piece: &DeltaPiece, out: &mut dyn Write) -> Result<()> {
        if !self.verbose {
            if let Some((kind, _, end)) = &mut self.merging
                && *kind == piece.kind
                && *end == piece.begin
            {
                *end = piece.end();
                return Ok(());
            }
            self.flush_merged(out)?;
            self.merging = Some((piece.kind, piece.begin, piece.end()));
            return Ok(());
        }
        if self.group != Some(piece.kind) {
            self.close_group(out)?;
            writeln!(out, "    <{}>", piece.kind.name()).map_err(output_error)?;
            self.group = Some(piece.kind);
        }
        match piece.kind {
            DeltaKind::Different => writeln!(
                out,
                "      <range begin=\"{}\" left_data_begin=\"{}\" right_data_begin=\"{}\" length=\"{}\"/>",
                piece.begin, piece.left_data, piece.right_data, piece.len
            ),
            DeltaKind::RightOnly => writeln!(
                out,
                "      <range begin=\"{}\" data_begin=\"{}\" length=\"{}\"/>",
                piece.begin, piece.right_data, piece.len
            ),
            DeltaKind::Same | DeltaKind::LeftOnly => writeln!(
                out,
                "      <range begin=\"{}\" data_begin=\"{}\" length=\"{}\"/>",
                piece.begin, piece.left_data, piece.len
            ),
        }
        .map_err(output_error)
    }

    /// The last element and the closing lines.
    pub fn finish(&mut self, out: &mut dyn Write) -> Result<()> {
        self.flush_merged(out)?;
        self.close_group(out)?;
        writeln!(out, "  </diff>\n</superblock>").map_err(output_error)
    }

    fn flush_merged(&mut self, out: &mut dyn Write) -> Result<()> {
        match self.merging.take() {
            Some((kind, begin, end)) => writeln!(
                out,
                "    <{} begin=\"{begin}\" length=\"{}\"/>",
                kind.name(),
                end - begin
            )
            .map_err(output_error),
            None => Ok(()),
        }
    }

    fn close_group(&mut self, out: &mut dyn Write) -> Result<()> {
        match self.group.take() {
            Some(kind) => writeln!(out, "    </{}>", kind.name()).map_err(output_error),
            None => Ok(()),
        }
    }
}
