//! The delta of two thin devices' mappings, as `thin_delta` computes it.
//!
//! Each device's mappings are read as runs that advance by one in both virtual and
//! data block (the mapping time plays no part), and the two run sequences are cut
//! into pieces at every run boundary of either side: each piece is `same` (both map
//! it to the same data blocks), `different`, `left_only` or `right_only`; blocks
//! that neither maps are left out. Pieces come out in virtual-block order.
//!
//! A [`Delta`] walks in bounded steps (so a large device can be compared by a
//! background job) and may start at any virtual block (so block-status queries can
//! ask about one range). Between steps it keeps only a key to seek to and the runs
//! in hand, never a cursor, so the trees it reads must not change meanwhile: read a
//! held metadata snapshot or a pinned view.

use super::*;

/// How a piece of the two devices compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeltaKind {
    /// Both map it to the same data blocks.
    Same,
    /// Both map it, to different data blocks.
    Different,
    /// Only the left device maps it.
    LeftOnly,
    /// Only the right device maps it.
    RightOnly,
}

impl DeltaKind {
    /// The element name `thin_delta` uses.
    pub fn name(self) -> &'static str {
        match self {
            DeltaKind::Same => "same",
            DeltaKind::Different => "different",
            DeltaKind::LeftOnly => "left_only",
            DeltaKind::RightOnly => "right_only",
        }
    }
}

/// A piece of the delta: `len` virtual blocks from `begin`, and where they live on
/// the data device on each side (0 on a side that does not map them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaPiece {
    pub kind: DeltaKind,
    pub begin: u64,
    pub len: u64,
    pub left_data: u64,
    pub right_data: u64,
}

impl DeltaPiece {
    pub fn end(&self) -> u64 {
        self.begin + self.len
    }
}

/// A run of mappings consecutive in both virtual and data block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapRun {
    begin: u64,
    data: u64,
    len: u64,
}

impl MapRun {
    fn consume(&mut self, blocks: u64) {
        self.begin += blocks;
        self.data += blocks;
        self.len -= blocks;
    }
}

/// One device's mappings as whole runs, gathered over as many steps as it takes.
#[derive(Clone, Debug)]
struct RunReader {
    root: u64,
    /// Where to seek to read on.
    next_key: u64,
    /// The run being gathered: complete once an entry that does not continue it, or
    /// the end of the tree, is seen.
    gathering: Option<MapRun>,
    /// A complete run not taken yet.
    ready: Option<MapRun>,
    at_end: bool,
}

impl RunReader {
    fn new(root: u64, from: u64) -> Self {
        RunReader {
            root,
            next_key: from,
            gathering: None,
            ready: None,
            at_end: false,
        }
    }

    /// Reads entries until the next run is complete (or the tree ends), using up at
    /// most `budget` of them; false when the budget ran out first.
    fn fill(&mut self, tm: &mut Tm, budget: &mut u64) -> Result<bool> {
        if self.ready.is_some() || self.at_end {
            return Ok(true);
        }
        let mut cursor = Cursor::seek(tm, self.root, self.next_key, MAPPING_VALUE_SIZE)?;
        loop {
            let Some((key, value)) = cursor.entry() else {
                self.at_end = true;
                self.ready = self.gathering.take();
                return Ok(true);
            };
            if *budget == 0 {
                return Ok(false);
            }
            *budget -= 1;
            let (data, _) = unpack_block_time(le64(value, 0));
            self.next_key = key.saturating_add(1);
            match &mut self.gathering {
                Some(run) if run.begin + run.len == key && run.data + run.len == data => {
                    run.len += 1;
                }
                gathering => {
                    let started = MapRun {
                        begin: key,
                        data,
                        len: 1,
                    };
                    if let Some(done) = gathering.replace(started) {
                        self.ready = Some(done);
                        return Ok(true);
                    }
                }
            }
            cursor.advance(tm)?;
        }
    }

    fn take(&mut self) -> Option<MapRun> {
        self.ready.take()
    }
}

/// A delta in progress.
#[derive(Clone, Debug)]
pub struct Delta {
    left: RunReader,
    right: RunReader,
    /// The parts of the current runs not yet compared.
    left_run: Option<MapRun>,
    right_run: Option<MapRun>,
    finished: bool,
}

impl Delta {
    /// The delta of the mapping trees at `left_root` and `right_root`, from virtual
    /// block `from` on.
    pub fn new(left_root: u64, right_root: u64, from: u64) -> Self {
        Delta {
            left: RunReader::new(left_root, from),
            right: RunReader::new(right_root, from),
            left_run: None,
            right_run: None,
            finished: false,
        }
    }

    /// Whether every piece has been produced.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Produces pieces in order, reading at most `budget` mappings; returns
    /// whether the delta is complete. `piece` returns false to stop early (the walk
    /// then resumes after that piece).
    pub fn step(
        &mut self,
        md: &mut ThinMetadata,
        mut budget: u64,
        piece: &mut dyn FnMut(DeltaPiece) -> bool,
    ) -> Result<bool> {
        let tm = &mut md.tm;
        while !self.finished {
            if self.left_run.is_none() {
                if !self.left.fill(tm, &mut budget)? {
                    return Ok(false);
                }
                self.left_run = self.left.take();
            }
            if self.right_run.is_none() {
                if !self.right.fill(tm, &mut budget)? {
                    return Ok(false);
                }
                self.right_run = self.right.take();
            }
            let Some(next) = self.next_piece() else {
                self.finished = true;
                break;
            };
            if !piece(next) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Cuts the next piece off the current runs (both filled if the tree has more).
    fn next_piece(&mut self) -> Option<DeltaPiece> {
        let only = |kind, run: &mut Option<MapRun>, len: Option<u64>| {
            let whole = run.as_mut()?;
            let len = len.unwrap_or(whole.len).min(whole.len);
            let piece = DeltaPiece {
                kind,
                begin: whole.begin,
                len,
                left_data: if kind == DeltaKind::LeftOnly {
                    whole.data
                } else {
                    0
                },
                right_data: if kind == DeltaKind::RightOnly {
                    whole.data
                } else {
                    0
                },
            };
            whole.consume(len);
            if whole.len == 0 {
                *run = None;
            }
            Some(piece)
        };
        match (self.left_run, self.right_run) {
            (None, None) => None,
            (Some(_), None) => only(DeltaKind::LeftOnly, &mut self.left_run, None),
            (None, Some(_)) => only(DeltaKind::RightOnly, &mut self.right_run, None),
            (Some(l), Some(r)) if l.begin < r.begin => only(
                DeltaKind::LeftOnly,
                &mut self.left_run,
                Some(r.begin - l.begin),
            ),
            (Some(l), Some(r)) if r.begin < l.begin => only(
                DeltaKind::RightOnly,
                &mut self.right_run,
                Some(l.begin - r.begin),
            ),
            (Some(mut l), Some(mut r)) => {
                let len = l.len.min(r.len);
                let kind = if l.data == r.data {
                    DeltaKind::Same
                } else {
                    DeltaKind::Different
                };
                let piece = DeltaPiece {
                    kind,
                    begin: l.begin,
                    len,
                    left_data: l.data,
                    right_data: r.data,
                };
                l.consume(len);
                r.consume(len);
                self.left_run = (l.len > 0).then_some(l);
                self.right_run = (r.len > 0).then_some(r);
                Some(piece)
            }
        }
    }
}

/// Where a delta reads from: the two devices' mapping-tree roots in one view of
/// the metadata, and that view's superblock fields (what `thin_delta` prints).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaSource {
    pub roots: Roots,
    pub left_root: u64,
    pub right_root: u64,
    /// The held metadata snapshot, printed when reading the live metadata.
    pub metadata_snap: Option<u64>,
}

impl ThinMetadata {
    /// The roots to compare devices `left` and `right` in the held metadata snapshot
    /// (`metadata_snap`) or in the live metadata. A missing device is
    /// [`Error::NoSuchDevice`].
    pub fn delta_source(
        &mut self,
        left: u64,
        right: u64,
        metadata_snap: bool,
    ) -> Result<DeltaSource> {
        let (roots, metadata_snap) = if metadata_snap {
            (self.snapshot_roots()?, None)
        } else {
            (self.live_roots()?, self.held_root())
        };
        let mut root_of = |dev: u64| -> Result<u64> {
            Self::check_dev_id(dev)?;
            btree::lookup(&mut self.tm, roots.mapping_root, dev, MAPPING_VALUE_SIZE)?
                .map(|value| value.u64())
                .ok_or(Error::NoSuchDevice(dev))
        };
        Ok(DeltaSource {
            roots,
            left_root: root_of(left)?,
            right_root: root_of(right)?,
            metadata_snap,
        })
    }
}
