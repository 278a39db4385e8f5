//! Consecutive regions seen as one device: what a linear table maps to. A table of
//! one segment over a disk is one region, and requests pass straight through; a
//! table of several segments (or a linear device over one) concatenates regions,
//! possibly of different disks, and a request that crosses from one to the next is
//! cut into pieces whose completions are joined into one.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use blockdev::{
    BlockDevice, Busy, Command, Completion, DeviceInfo, IoBuf, IoError, Request, SECTOR_SIZE,
};

use crate::region::Region;

/// A region and the sector of the span where it begins.
struct Part {
    start: u64,
    region: Region,
}

/// A piece of a request in flight on one part.
struct Piece {
    /// The request's tag.
    request: u64,
    data: Data,
}

/// What becomes of a piece's buffer when it completes.
#[derive(Clone, Copy)]
enum Data {
    /// It is the request's own buffer, handed back with the request.
    Own,
    /// Read data for the request's buffer, at this byte offset.
    Gather(usize),
    /// Nothing to keep (a copy of write data, or no data).
    Drop,
}

/// A request whose pieces are in flight.
struct Joined {
    pieces_left: usize,
    /// The request's buffer (gathered into for reads, handed back for writes).
    buf: Option<IoBuf>,
    error: Option<IoError>,
}

/// A linear device's disk windows as one block device.
pub(crate) enum Span {
    /// One window: requests pass straight through.
    Region(Region),
    /// Several windows end to end.
    Concat(Box<Concat>),
}

impl Span {
    /// The regions in order, end to end.
    pub(crate) fn new(mut regions: Vec<Region>) -> Self {
        if regions.len() == 1 {
            Span::Region(regions.pop().expect("one region"))
        } else {
            Span::Concat(Box::new(Concat::new(regions)))
        }
    }
}

impl BlockDevice for Span {
    fn info(&self) -> &DeviceInfo {
        match self {
            Span::Region(region) => region.info(),
            Span::Concat(concat) => concat.info(),
        }
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        match self {
            Span::Region(region) => region.submit(request),
            Span::Concat(concat) => concat.submit(request),
        }
    }

    fn poll(&mut self) -> Option<Completion> {
        match self {
            Span::Region(region) => region.poll(),
            Span::Concat(concat) => concat.poll(),
        }
    }

    fn in_flight(&self) -> usize {
        match self {
            Span::Region(region) => region.in_flight(),
            Span::Concat(concat) => concat.in_flight(),
        }
    }
}

/// Regions end to end, cutting requests at the seams.
pub(crate) struct Concat {
    parts: Vec<Part>,
    info: DeviceInfo,
    next_piece: u64,
    pieces: BTreeMap<u64, Piece>,
    requests: BTreeMap<u64, Joined>,
    /// Pieces a part refused as busy, submitted in order before any new request.
    backlog: VecDeque<(usize, Request)>,
    /// Requests refused by the span's own checks, completed on the next poll.
    refused: VecDeque<Completion>,
    in_flight: usize,
}

impl Concat {
    fn new(regions: Vec<Region>) -> Self {
        let mut info = regions.first().expect("a span has a region").info().clone();
        let mut parts = Vec::with_capacity(regions.len());
        let mut start = 0;
        for region in regions {
            let part = region.info();
            info.read_only |= part.read_only;
            info.discard &= part.discard;
            info.max_transfer_sectors = info.max_transfer_sectors.min(part.max_transfer_sectors);
            info.queue_depth = info.queue_depth.min(part.queue_depth);
            let sectors = part.sectors;
            parts.push(Part { start, region });
            start += sectors;
        }
        info.sectors = start;
        Concat {
            parts,
            info,
            next_piece: 0,
            pieces: BTreeMap::new(),
            requests: BTreeMap::new(),
            backlog: VecDeque::new(),
            refused: VecDeque::new(),
            in_flight: 0,
        }
    }

    /// Cuts a request into pieces, one per part it touches (every part for a flush),
    /// and submits them.
    fn split(&mut self, request: Request) {
        let tag = request.tag;
        let (sector, sectors) = request.command.range();
        let end = sector + sectors;
        let touched: Vec<usize> = match request.command {
            Command::Flush => (0..self.parts.len()).collect(),
            _ => (0..self.parts.len())
                .filter(|&index| {
                    let part = &self.parts[index];
                    part.start < end && sector < part.start + part.region.info().sectors
                })
                .collect(),
        };
        let whole = touched.len() == 1;
        let (kind, mut buf) = match request.command {
            Command::Read { buf, .. } => (Kind::Read, Some(buf)),
            Command::Write { buf, fua, .. } => (Kind::Write { fua }, Some(buf)),
            Command::Discard { .. } => (Kind::Discard, None),
            Command::Flush => (Kind::Flush, None),
        };
        let mut pieces = Vec::with_capacity(touched.len());
        for index in touched {
            let part = &self.parts[index];
            // A flush covers no sectors: every part gets an empty one.
            let (from, to) = match kind {
                Kind::Flush => (part.start, part.start),
                _ => (
                    sector.max(part.start),
                    end.min(part.start + part.region.info().sectors),
                ),
            };
            let local = from - part.start;
            let byte_offset = (from - sector) as usize * SECTOR_SIZE;
            let bytes = (to - from) as usize * SECTOR_SIZE;
            let (command, data) = match kind {
                Kind::Flush => (Command::Flush, Data::Drop),
                Kind::Discard => (
                    Command::Discard {
                        sector: local,
                        sectors: to - from,
                    },
                    Data::Drop,
                ),
                Kind::Read if whole => (
                    Command::Read {
                        sector: local,
                        buf: buf.take().expect("one piece takes the buffer"),
                    },
                    Data::Own,
                ),
                Kind::Read => (
                    Command::Read {
                        sector: local,
                        buf: IoBuf::with_sectors(bytes / SECTOR_SIZE),
                    },
                    Data::Gather(byte_offset),
                ),
                Kind::Write { fua } if whole => (
                    Command::Write {
                        sector: local,
                        buf: buf.take().expect("one piece takes the buffer"),
                        fua,
                    },
                    Data::Own,
                ),
                Kind::Write { fua } => {
                    let source = buf.as_ref().expect("a write has a buffer");
                    (
                        Command::Write {
                            sector: local,
                            buf: IoBuf::from_slice(&source[byte_offset..byte_offset + bytes]),
                            fua,
                        },
                        Data::Drop,
                    )
                }
            };
            let piece = self.next_piece;
            self.next_piece += 1;
            self.pieces.insert(piece, Piece { request: tag, data });
            pieces.push((
                index,
                Request {
                    tag: piece,
                    command,
                },
            ));
        }
        self.requests.insert(
            tag,
            Joined {
                pieces_left: pieces.len(),
                buf,
                error: None,
            },
        );
        self.backlog.extend(pieces);
        self.pump();
    }

    /// Submits waiting pieces in order until a part is busy.
    fn pump(&mut self) {
        while let Some((index, piece)) = self.backlog.pop_front() {
            if let Err(Busy(piece)) = self.parts[index].region.submit(piece) {
                self.backlog.push_front((index, piece));
                return;
            }
        }
    }

    /// Accounts for a finished piece; returns the request once all its pieces are back.
    fn piece_done(&mut self, done: Completion) -> Option<Completion> {
        let piece = self.pieces.remove(&done.tag)?;
        let joined = self
            .requests
            .get_mut(&piece.request)
            .expect("a piece belongs to a live request");
        joined.pieces_left -= 1;
        match piece.data {
            Data::Own => joined.buf = Some(done.buf),
            Data::Gather(offset) if done.result.is_ok() => {
                let whole = joined.buf.as_mut().expect("a split read keeps its buffer");
                whole[offset..offset + done.buf.len()].copy_from_slice(&done.buf);
            }
            Data::Gather(_) | Data::Drop => {}
        }
        if let Err(error) = done.result {
            joined.error.get_or_insert(error);
        }
        if joined.pieces_left > 0 {
            return None;
        }
        let joined = self.requests.remove(&piece.request).expect("just seen");
        Some(Completion {
            tag: piece.request,
            result: joined.error.map_or(Ok(()), Err),
            buf: joined.buf.unwrap_or_else(IoBuf::empty),
        })
    }
}

/// What a request does, without its buffer.
#[derive(Clone, Copy)]
enum Kind {
    Read,
    Write { fua: bool },
    Discard,
    Flush,
}

impl BlockDevice for Concat {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        if !self.backlog.is_empty() {
            return Err(Busy(request));
        }
        self.in_flight += 1;
        if let Err(error) = request.command.validate(&self.info) {
            self.refused.push_back(Completion {
                tag: request.tag,
                result: Err(error),
                buf: request.command.into_buf(),
            });
            return Ok(());
        }
        self.split(request);
        Ok(())
    }

    fn poll(&mut self) -> Option<Completion> {
        self.pump();
        if let Some(done) = self.refused.pop_front() {
            self.in_flight -= 1;
            return Some(done);
        }
        for index in 0..self.parts.len() {
            while let Some(done) = self.parts[index].region.poll() {
                if let Some(finished) = self.piece_done(done) {
                    self.in_flight -= 1;
                    return Some(finished);
                }
            }
        }
        None
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::SharedDisk;
    use blockdev::{MemDisk, run_batch, run_sync};

    fn filled(sectors: u64, byte: u8) -> MemDisk {
        let disk = MemDisk::new(sectors);
        disk.write_at(0, &alloc::vec![byte; sectors as usize * SECTOR_SIZE]);
        disk
    }

    fn sector_byte(disk: &MemDisk, sector: u64) -> u8 {
        let mut byte = [0u8];
        disk.read_at(sector * SECTOR_SIZE as u64, &mut byte);
        byte[0]
    }

    #[test]
    fn discards_and_flushes_reach_every_part_they_cover() {
        let (a, b) = (filled(64, 0xaa), filled(64, 0xbb));
        let (a_view, b_view) = (a.handle(), b.handle());
        let (a, b) = (SharedDisk::new(Box::new(a)), SharedDisk::new(Box::new(b)));
        let mut span = Span::new(alloc::vec![a.region(8, 16, false), b.region(0, 32, false)]);
        assert_eq!(span.info().sectors, 48);
        run_sync(
            &mut span,
            Command::Discard {
                sector: 12,
                sectors: 8,
            },
        )
        .unwrap();
        let a_bytes: Vec<u8> = (18..26)
            .map(|sector| sector_byte(&a_view, sector))
            .collect();
        assert_eq!(a_bytes, [0xaa, 0xaa, 0, 0, 0, 0, 0xaa, 0xaa]);
        let b_bytes: Vec<u8> = (0..6).map(|sector| sector_byte(&b_view, sector)).collect();
        assert_eq!(b_bytes, [0, 0, 0, 0, 0xbb, 0xbb]);
        run_sync(&mut span, Command::Flush).unwrap();
        assert_eq!(span.in_flight(), 0);
    }

    #[test]
    fn pieces_wait_for_busy_parts_and_complete_once_each() {
        let narrow = |sectors| {
            let mut info = MemDisk::new(sectors).info().clone();
            info.queue_depth = 1;
            let mut disk = MemDisk::with_info(info);
            disk.shuffle_completions(5);
            disk
        };
        let (a, b) = (narrow(64), narrow(64));
        let (a_view, b_view) = (a.handle(), b.handle());
        let (a, b) = (SharedDisk::new(Box::new(a)), SharedDisk::new(Box::new(b)));
        let mut span = Span::new(alloc::vec![a.region(0, 10, false), b.region(0, 10, false)]);
        // Writes of 3 sectors end to end (one across the seam at 10), then 2 to the end.
        let writes = (0..7u64).map(|index| {
            let sectors = if index < 6 { 3 } else { 2 };
            let mut buf = IoBuf::with_sectors(sectors);
            buf.fill(index as u8 + 1);
            Command::Write {
                sector: index * 3,
                buf,
                fua: false,
            }
        });
        run_batch(&mut span, writes).unwrap();
        assert_eq!(span.in_flight(), 0);
        let expected = |sector: u64| (sector / 3) as u8 + 1;
        for sector in 0..10 {
            assert_eq!(sector_byte(&a_view, sector), expected(sector), "{sector}");
            assert_eq!(
                sector_byte(&b_view, sector),
                expected(10 + sector),
                "{sector}"
            );
        }
        let all = run_sync(
            &mut span,
            Command::Read {
                sector: 0,
                buf: IoBuf::with_sectors(20),
            },
        )
        .unwrap();
        let read: Vec<u8> = all.chunks(SECTOR_SIZE).map(|sector| sector[0]).collect();
        let wanted: Vec<u8> = (0..20).map(expected).collect();
        assert_eq!(read, wanted);
        let past_end = Command::Read {
            sector: 19,
            buf: IoBuf::with_sectors(2),
        };
        assert_eq!(
            run_sync(&mut span, past_end).unwrap_err(),
            IoError::OutOfRange
        );
    }
}
