//! `thin delta A B [--xml] [--verbose] [--metadata-snap]`: where two thin devices
//! of one pool differ, read from a metadata snapshot so the pool keeps running.
//!
//! The command reserves the pool's metadata snapshot, walks both devices' mappings
//! in bounded steps (a job: the console stays responsive and Ctrl-C cancels) and
//! releases the snapshot at the end, whatever happens; with `--metadata-snap` it
//! reads the snapshot already held and leaves it held. `--xml` prints exactly what
//! `thin_delta -m --snap1 IDA --snap2 IDB [--verbose]` prints for that snapshot;
//! the default is a table of the ranges that differ (`--verbose`: every range) and
//! the totals, with a progress line every second on large devices.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt::Write;

use dm::{
    DeltaKind, DeltaPiece, DeltaXml, DeviceMapper, SnapDelta, Target, bare_name, human_bytes,
};

use crate::job::{Context, Job, Progress};
use crate::{CommandError, Console, Platform, outln};

const USAGE: &str = "usage: thin delta A B [--xml] [--verbose] [--metadata-snap]";
/// Mappings read per step (a few milliseconds).
const STEP_MAPPINGS: u64 = 16_384;
/// At most this long between progress lines.
const PROGRESS_NS: u64 = 1_000_000_000;
const KINDS: [DeltaKind; 4] = [
    DeltaKind::Same,
    DeltaKind::Different,
    DeltaKind::LeftOnly,
    DeltaKind::RightOnly,
];

/// How far a delta has come, in the fields every background job reports.
struct DeltaProgress {
    id: String,
    device: String,
    what: String,
    done: u64,
    total: u64,
    unit: &'static str,
    started_ns: u64,
    cancellable: bool,
}

impl DeltaProgress {
    /// "thin delta s1 vol (pool): comparing ...: 40% (4000 of 10000 mappings), 2 s"
    fn line(&self, now_ns: u64) -> String {
        let percent = self.done * 100 / self.total.max(1);
        let seconds = now_ns.saturating_sub(self.started_ns) / 1_000_000_000;
        let cancel = if self.cancellable {
            ", Ctrl-C cancels"
        } else {
            ""
        };
        format!(
            "{} ({}): {}: {percent}% ({} of {} {}), {seconds} s{cancel}",
            self.id, self.device, self.what, self.done, self.total, self.unit
        )
    }
}

/// What the output looks like.
enum Output {
    Xml(DeltaXml),
    Table(Table),
}

/// The human table: ranges merged like `thin_delta`'s plain form, and totals.
struct Table {
    verbose: bool,
    block_bytes: u64,
    merging: Option<(DeltaKind, u64, u64)>,
    /// Per kind (in `KINDS` order): ranges and blocks.
    totals: [(u64, u64); 4],
}

impl Table {
    fn piece(&mut self, piece: &DeltaPiece, out: &mut dyn Write) {
        match &mut self.merging {
            Some((kind, _, end)) if *kind == piece.kind && *end == piece.begin => {
                *end = piece.end();
            }
            merging => {
                let previous = merging.replace((piece.kind, piece.begin, piece.end()));
                self.flush(previous, out);
            }
        }
    }

    fn flush(&mut self, range: Option<(DeltaKind, u64, u64)>, out: &mut dyn Write) {
        let Some((kind, begin, end)) = range else {
            return;
        };
        let index = KINDS.iter().position(|k| *k == kind).unwrap_or(0);
        self.totals[index].0 += 1;
        self.totals[index].1 += end - begin;
        if self.verbose || kind != DeltaKind::Same {
            outln!(
                out,
                "{:<11} {:>14} {:>14}",
                kind.name(),
                begin * self.block_bytes,
                (end - begin) * self.block_bytes
            );
        }
    }

    fn finish(&mut self, out: &mut dyn Write) {
        let last = self.merging.take();
        self.flush(last, out);
        for (kind, (ranges, blocks)) in KINDS.iter().zip(self.totals) {
            outln!(
                out,
                "{:<11} {ranges:>6} ranges {blocks:>12} blocks {:>12}",
                kind.name(),
                human_bytes(blocks * self.block_bytes)
            );
        }
        let changed: (u64, u64) = self.totals[1..]
            .iter()
            .fold((0, 0), |(r, b), (ranges, blocks)| (r + ranges, b + blocks));
        outln!(
            out,
            "changed: {} ranges, {} blocks, {}",
            changed.0,
            changed.1,
            human_bytes(changed.1 * self.block_bytes)
        );
    }
}

/// A `thin delta` in progress.
struct DeltaJob {
    dm: Rc<RefCell<DeviceMapper>>,
    pool: String,
    /// The command reserved the metadata snapshot and releases it at the end.
    release: bool,
    delta: SnapDelta,
    output: Output,
    progress: DeltaProgress,
    last_report_ns: Option<u64>,
    cancelled: bool,
    pieces: Vec<DeltaPiece>,
}

impl DeltaJob {
    fn release(&mut self) -> Result<(), CommandError> {
        if !self.release {
            return Ok(());
        }
        self.release = false;
        self.dm
            .borrow_mut()
            .message(&self.pool, "release_metadata_snap")
            .map_err(|error| {
                format!(
                    "thin delta: releasing the metadata snapshot failed: {}",
                    error.0
                )
                .into()
            })
    }

    fn step_once(&mut self, out: &mut dyn Write) -> Result<bool, CommandError> {
        let dm = self.dm.borrow();
        let pool = dm.pool(&self.pool)?;
        let mut pieces = core::mem::take(&mut self.pieces);
        pieces.clear();
        let done = pool
            .snap_delta_step(&mut self.delta, STEP_MAPPINGS, &mut |piece| {
                pieces.push(piece);
                true
            })
            .map_err(|error| format!("thin delta: {}", error.text))?;
        drop(dm);
        // The XML is written into a buffer and printed line by line (the serial
        // line wants CR LF).
        let mut xml_text = String::new();
        for piece in &pieces {
            match &mut self.output {
                Output::Xml(xml) => xml
                    .piece(piece, &mut xml_text)
                    .map_err(|error| format!("thin delta: {error}"))?,
                Output::Table(table) => table.piece(piece, out),
            }
        }
        self.pieces = pieces;
        self.progress.done = self.delta.mappings_read();
        if done {
            match &mut self.output {
                Output::Xml(xml) => xml
                    .finish(&mut xml_text)
                    .map_err(|error| format!("thin delta: {error}"))?,
                Output::Table(table) => table.finish(out),
            }
        }
        print_lines(&xml_text, out);
        Ok(done)
    }
}

impl Job for DeltaJob {
    fn step(&mut self, context: &mut Context<'_>, out: &mut dyn Write) -> Progress {
        if self.cancelled {
            let released = self.release();
            outln!(out, "{}: cancelled", self.progress.id);
            return Progress::Finished(released);
        }
        match self.step_once(out) {
            Ok(true) => Progress::Finished(self.release()),
            Ok(false) => {
                let now_ns = (context.clock)();
                let due = self
                    .last_report_ns
                    .is_none_or(|last| now_ns.saturating_sub(last) >= PROGRESS_NS);
                // The XML goes out exactly as thin_delta prints it: no progress lines.
                if matches!(self.output, Output::Table(_)) && due {
                    if self.last_report_ns.is_some() {
                        outln!(out, "{}", self.progress.line(now_ns));
                    }
                    self.last_report_ns = Some(now_ns);
                }
                Progress::Running
            }
            Err(error) => {
                let _ = self.release();
                Progress::Finished(Err(error))
            }
        }
    }

    fn cancel(&mut self) {
        self.cancelled = true;
    }
}

fn print_lines(text: &str, out: &mut dyn Write) {
    for line in text.lines() {
        outln!(out, "{line}");
    }
}

/// The pool and thin device id of device `name`.
fn thin_of(dm: &DeviceMapper, name: &str) -> Result<(String, u64), CommandError> {
    let device = dm.device(name)?;
    match device.table().target() {
        Target::Thin(thin) => Ok((thin.pool_dev.clone(), thin.dev_id)),
        _ => Err(format!(
            "thin delta: {} is a {} device; deltas compare thin devices",
            device.name(),
            device.table().kind()
        )
        .into()),
    }
}

impl<P: Platform> Console<P> {
    pub(crate) fn thin_delta(
        &mut self,
        args: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        let mut names = Vec::new();
        let (mut xml, mut verbose, mut held) = (false, false, false);
        for arg in args {
            match arg.as_str() {
                "--xml" => xml = true,
                "--verbose" => verbose = true,
                "--metadata-snap" => held = true,
                flag if flag.starts_with("--") => {
                    return Err(format!("thin delta: unknown option '{flag}' ({USAGE})").into());
                }
                name => names.push(bare_name(name)),
            }
        }
        let [left_name, right_name] = names.as_slice() else {
            return Err(USAGE.into());
        };
        let mut dm = self.dm.borrow_mut();
        let (pool, left) = thin_of(&dm, left_name)?;
        let (right_pool, right) = thin_of(&dm, right_name)?;
        if right_pool != pool {
            return Err(format!(
                "thin delta: {left_name} is in pool {pool} and {right_name} in pool {right_pool}; \
                 deltas compare thin devices of one pool"
            )
            .into());
        }
        let snapshot = dm.pool(&pool)?.status_noflush().held_root;
        match (held, snapshot) {
            (true, None) => {
                return Err(format!(
                    "thin delta: {pool} holds no metadata snapshot; leave out --metadata-snap \
                     to take one for the delta"
                )
                .into());
            }
            (false, Some(block)) => {
                return Err(format!(
                    "thin delta: {pool} holds a metadata snapshot already (block {block}); \
                     read it with --metadata-snap, or release it (message {pool} 0 \
                     release_metadata_snap)"
                )
                .into());
            }
            (false, None) => dm.message(&pool, "reserve_metadata_snap")?,
            (true, Some(_)) => {}
        }
        let started = dm.pool(&pool).and_then(|engine| {
            let block_bytes = u64::from(engine.config().data_block_size) * 512;
            let delta = engine
                .snap_delta(left, right)
                .map_err(|error| dm::Error(format!("thin delta: {}", error.text)))?;
            Ok((delta, block_bytes))
        });
        let (delta, block_bytes) = match started {
            Ok(started) => started,
            Err(error) => {
                if !held {
                    let _ = dm.message(&pool, "release_metadata_snap");
                }
                return Err(error.into());
            }
        };
        drop(dm);
        let output = if xml {
            let mut writer = DeltaXml::new(verbose);
            let mut header = String::new();
            writer
                .begin(&delta.source, left, right, &mut header)
                .map_err(|error| format!("thin delta: {error}"))?;
            print_lines(&header, out);
            Output::Xml(writer)
        } else {
            outln!(
                out,
                "{left_name} (thin device {left}) against {right_name} (thin device {right}) \
                 in {pool}'s metadata snapshot, {} blocks",
                human_bytes(block_bytes)
            );
            outln!(out, "{:<11} {:>14} {:>14}", "KIND", "OFFSET", "BYTES");
            Output::Table(Table {
                verbose,
                block_bytes,
                merging: None,
                totals: [(0, 0); 4],
            })
        };
        let progress = DeltaProgress {
            id: format!("thin delta {left_name} {right_name}"),
            device: pool.clone(),
            what: String::from("reading the mappings of both devices"),
            done: 0,
            total: delta.total_mappings(),
            unit: "mappings",
            started_ns: self.platform.now_ns(),
            cancellable: true,
        };
        self.job = Some(Box::new(DeltaJob {
            dm: Rc::clone(&self.dm),
            pool,
            release: !held,
            delta,
            output,
            progress,
            last_report_ns: None,
            cancelled: false,
            pieces: Vec::new(),
        }));
        Ok(())
    }
}
