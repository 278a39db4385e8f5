//! Exceptions being made (Linux's pending exceptions): the chunks' data copied into
//! the COW, then the commit that records them, carried out by submitting to the
//! snapshot's own device handles and polling, so that the requests which do not
//! need these chunks go on meanwhile.
//!
//! The order is the store's: every copy (or the writer's own whole chunk) is on the
//! COW before the commit starts, and the commit's requests run one after the other
//! (the flush before the area write makes the copies durable first).

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use blockdev::{BlockDevice, Busy, Command, IoBuf, IoError, Request};

use crate::chunk_io::pieces_of;

/// Copy pieces in flight at most (bounds the buffers a large chunk needs).
const PIECES_IN_FLIGHT: usize = 32;

/// Where a piece's data comes from.
pub(crate) enum Fill {
    /// Read from the origin at this sector.
    Origin(u64),
    /// The writer's own data.
    Data(IoBuf),
}

/// `sectors` sectors for the COW at sector `to`.
pub(crate) struct Piece {
    pub fill: Fill,
    pub to: u64,
    pub sectors: u64,
}

impl Piece {
    /// The pieces of a copy of `sectors` origin sectors from `from` to COW sector
    /// `to`, `piece` sectors at most each.
    pub fn copies(from: u64, to: u64, sectors: u64, piece: u64) -> impl Iterator<Item = Piece> {
        (0..sectors).step_by(piece as usize).map(move |at| Piece {
            fill: Fill::Origin(from + at),
            to: to + at,
            sectors: piece.min(sectors - at),
        })
    }
}

/// What [`Pending::pump`] left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Requests are in flight or waiting for room.
    Working,
    /// Every copy is on the COW; the commit's requests are wanted.
    Copied,
    /// Committed.
    Done,
    /// A request failed and nothing is in flight any more.
    Failed(IoError),
}

/// One batch of exceptions being made.
pub(crate) struct Pending {
    /// `(old, new)` in allocation order.
    pub records: Vec<(u64, u64)>,
    pieces: VecDeque<Piece>,
    /// Origin reads the origin holds: tag → COW sector of their piece.
    reading: BTreeMap<u64, u64>,
    /// A read the origin refused as busy, with the COW sector of its piece.
    read_retry: Option<(Request, u64)>,
    /// COW writes (copies, then the current commit step) not yet accepted.
    to_write: VecDeque<Request>,
    writes_in_flight: usize,
    /// The commit's requests, once the copies are done; each step finishes before
    /// the next starts.
    commit: Option<VecDeque<Command>>,
    next_tag: u64,
    error: Option<IoError>,
}

impl Pending {
    pub fn new(records: Vec<(u64, u64)>, pieces: Vec<Piece>) -> Self {
        Pending {
            records,
            pieces: pieces.into(),
            reading: BTreeMap::new(),
            read_retry: None,
            to_write: VecDeque::new(),
            writes_in_flight: 0,
            commit: None,
            next_tag: 0,
            error: None,
        }
    }

    /// The commit's requests, in order (called once, on [`Progress::Copied`]).
    pub fn start_commit(&mut self, commands: Vec<Command>) {
        self.commit = Some(commands.into());
    }

    fn in_flight(&self) -> bool {
        !self.reading.is_empty()
            || self.read_retry.is_some()
            || self.writes_in_flight > 0
            || !self.to_write.is_empty()
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    /// Queues `command` for the COW, cut into requests it takes.
    fn queue_write(&mut self, cow: &dyn BlockDevice, command: Command) {
        for command in pieces_of(cow, command) {
            let tag = self.tag();
            self.to_write.push_back(Request { tag, command });
        }
    }

    /// Advances as far as the devices allow without waiting.
    pub fn pump(&mut self, origin: &mut dyn BlockDevice, cow: &mut dyn BlockDevice) -> Progress {
        loop {
            let mut moved = false;
            while let Some(done) = origin.poll() {
                moved = true;
                let Some(to) = self.reading.remove(&done.tag) else {
                    continue;
                };
                match done.result {
                    Ok(()) if self.error.is_none() => {
                        let write = Command::Write {
                            sector: to,
                            buf: done.buf,
                            fua: false,
                        };
                        self.queue_write(cow, write);
                    }
                    Ok(()) => {}
                    Err(error) => {
                        self.error.get_or_insert(error);
                    }
                }
            }
            while let Some(done) = cow.poll() {
                moved = true;
                self.writes_in_flight -= 1;
                if let Err(error) = done.result {
                    self.error.get_or_insert(error);
                }
            }
            if self.error.is_none() {
                moved |= self.submit(origin, cow);
            } else {
                // What was never sent is dropped: the batch fails once the
                // requests the devices hold have come back.
                self.pieces.clear();
                self.read_retry = None;
                self.to_write.clear();
            }
            if !self.in_flight() {
                if let Some(error) = self.error {
                    return Progress::Failed(error);
                }
                if self.pieces.is_empty() {
                    let Some(commit) = &mut self.commit else {
                        return Progress::Copied;
                    };
                    let Some(step) = commit.pop_front() else {
                        return Progress::Done;
                    };
                    self.queue_write(cow, step);
                    continue;
                }
            }
            if !moved {
                return Progress::Working;
            }
        }
    }

    /// Submits what the devices take (the COW's writes first); true if anything
    /// was submitted.
    fn submit(&mut self, origin: &mut dyn BlockDevice, cow: &mut dyn BlockDevice) -> bool {
        let mut moved = false;
        loop {
            while let Some(request) = self.to_write.pop_front() {
                match cow.submit(request) {
                    Ok(()) => {
                        self.writes_in_flight += 1;
                        moved = true;
                    }
                    Err(Busy(request)) => {
                        self.to_write.push_front(request);
                        return moved;
                    }
                }
            }
            let (request, to) = match self.read_retry.take() {
                Some(waiting) => waiting,
                None => {
                    if self.reading.len() + self.writes_in_flight >= PIECES_IN_FLIGHT {
                        return moved;
                    }
                    let Some(piece) = self.pieces.pop_front() else {
                        return moved;
                    };
                    let sector = match piece.fill {
                        Fill::Data(buf) => {
                            let write = Command::Write {
                                sector: piece.to,
                                buf,
                                fua: false,
                            };
                            self.queue_write(cow, write);
                            continue;
                        }
                        Fill::Origin(sector) => sector,
                    };
                    let request = Request {
                        tag: self.tag(),
                        command: Command::Read {
                            sector,
                            buf: IoBuf::with_sectors(piece.sectors as usize),
                        },
                    };
                    (request, piece.to)
                }
            };
            let tag = request.tag;
            match origin.submit(request) {
                Ok(()) => {
                    self.reading.insert(tag, to);
                    moved = true;
                }
                Err(Busy(request)) => {
                    self.read_retry = Some((request, to));
                    return moved;
                }
            }
        }
    }
}
