//! I/O of a `linear` device: NBD operations on its span (windows of disks, end to
//! end, one per segment or more).
//!
//! Operations larger than the disk takes in one request are cut into parts that are
//! generated as the disk accepts them (a 4 GiB write-zeroes never holds more than a
//! queue's worth of buffers); parts of a read are gathered back into the client's
//! buffer. Everything reads as data: block status reports one allocated extent.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec;
use blockdev::{BlockDevice, Busy, Command, Completion, IoBuf, Request, SECTOR_SIZE};
use nbd::{BackendError, Extent, IoCompletion, IoOp, IoOutput};

use crate::span::Span;

/// Sectors per part when the disk takes more (1 MiB keeps zero buffers small).
const MAX_PART_SECTORS: u64 = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Zero,
    Discard,
    Flush,
}

/// One client request being carried out.
struct Assembly {
    kind: Kind,
    /// First sector of the request (part offsets are relative to it).
    sector: u64,
    /// The client's buffer while parts are copied from or into it.
    buf: Option<IoBuf>,
    parts_in_flight: usize,
    /// Every part has been generated.
    generated: bool,
    error: Option<BackendError>,
}

/// Parts still to generate for one request.
struct Work {
    tag: u64,
    kind: Kind,
    next: u64,
    end: u64,
    fua: bool,
    /// The whole request is one part using the client's buffer.
    whole: Option<IoBuf>,
}

pub(crate) struct LinearIo {
    span: Span,
    part_sectors: u64,
    work: VecDeque<Work>,
    /// A part the disk refused as busy.
    retry: Option<Request>,
    /// Part tag to (request tag, first sector of the part).
    parts: BTreeMap<u64, (u64, u64)>,
    requests: BTreeMap<u64, Assembly>,
    next_part: u64,
    done: VecDeque<IoCompletion>,
}

impl LinearIo {
    pub(crate) fn new(span: Span) -> Self {
        let part_sectors = u64::from(span.info().max_transfer_sectors).clamp(1, MAX_PART_SECTORS);
        LinearIo {
            span,
            part_sectors,
            work: VecDeque::new(),
            retry: None,
            parts: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_part: 0,
            done: VecDeque::new(),
        }
    }

    pub(crate) fn sectors(&self) -> u64 {
        self.span.info().sectors
    }

    pub(crate) fn read_only(&self) -> bool {
        self.span.info().read_only
    }

    pub(crate) fn discard(&self) -> bool {
        self.span.info().discard
    }

    /// Whether a new request would only wait in a queue.
    pub(crate) fn congested(&self) -> bool {
        self.retry.is_some() || !self.work.is_empty()
    }

    /// Accepts a request; it completes through [`LinearIo::poll`].
    pub(crate) fn submit(&mut self, tag: u64, op: IoOp) {
        let size = self.sectors();
        let (kind, sector, sectors, fua, buf) = match op {
            IoOp::Read { sector, buf } => (Kind::Read, sector, buf.sectors(), false, Some(buf)),
            IoOp::Write { sector, buf, fua } => {
                (Kind::Write, sector, buf.sectors(), fua, Some(buf))
            }
            IoOp::Flush => (Kind::Flush, 0, 0, false, None),
            IoOp::Trim {
                sector, sectors, ..
            } => (Kind::Discard, sector, sectors, false, None),
            IoOp::WriteZeroes {
                sector,
                sectors,
                fua,
                fast_only,
                ..
            } => {
                if fast_only {
                    return self.finish(tag, Err(BackendError::NotFast));
                }
                (Kind::Zero, sector, sectors, fua, None)
            }
            IoOp::Cache { sector, sectors } => {
                let result = in_range(sector, sectors, size).map(|()| IoOutput::Done);
                return self.finish(tag, result);
            }
            IoOp::BlockStatus {
                sector, sectors, ..
            } => {
                let result = in_range(sector, sectors.max(1), size).map(|()| {
                    IoOutput::Extents(vec![Extent {
                        sectors: size - sector,
                        hole: false,
                        zero: false,
                    }])
                });
                return self.finish(tag, result);
            }
        };
        if let Err(error) = in_range(sector, sectors, size) {
            return self.finish(tag, Err(error));
        }
        if kind != Kind::Read && kind != Kind::Flush && self.read_only() {
            return self.finish(tag, Err(BackendError::ReadOnly));
        }
        if kind == Kind::Discard && (!self.discard() || sectors == 0) {
            // Trim is advisory: a disk that cannot discard keeps the data.
            return self.finish(tag, Ok(IoOutput::Done));
        }
        let split =
            matches!(kind, Kind::Read | Kind::Write | Kind::Zero) && sectors > self.part_sectors;
        let (whole, kept) = if split { (None, buf) } else { (buf, None) };
        self.requests.insert(
            tag,
            Assembly {
                kind,
                sector,
                buf: kept,
                parts_in_flight: 0,
                generated: false,
                error: None,
            },
        );
        self.work.push_back(Work {
            tag,
            kind,
            next: sector,
            end: sector + sectors,
            fua,
            whole,
        });
        self.pump();
    }

    /// Returns one finished request.
    pub(crate) fn poll(&mut self) -> Option<IoCompletion> {
        self.pump();
        while let Some(done) = self.span.poll() {
            self.part_done(done);
            self.pump();
        }
        self.done.pop_front()
    }

    /// Waits until every accepted request has finished (their completions stay
    /// queued for [`LinearIo::poll`]).
    pub(crate) fn drain(&mut self) {
        while !self.requests.is_empty() {
            self.pump();
            match self.span.poll() {
                Some(done) => self.part_done(done),
                None => core::hint::spin_loop(),
            }
        }
    }

    /// Makes completed writes durable; the device must be drained.
    pub(crate) fn flush(&mut self) -> Result<(), blockdev::IoError> {
        blockdev::run_sync(&mut self.span, Command::Flush).map(drop)
    }

    fn finish(&mut self, tag: u64, result: Result<IoOutput, BackendError>) {
        self.done.push_back(IoCompletion { tag, result });
    }

    /// Submits parts until the disk is full or no work is left.
    fn pump(&mut self) {
        loop {
            let request = match self.retry.take() {
                Some(request) => request,
                None => match self.next_part() {
                    Some(request) => request,
                    None => return,
                },
            };
            match self.span.submit(request) {
                Ok(()) => {}
                Err(Busy(request)) => {
                    self.retry = Some(request);
                    return;
                }
            }
        }
    }

    /// Generates the next part of the oldest request with work left.
    fn next_part(&mut self) -> Option<Request> {
        let work = self.work.front_mut()?;
        let sectors = (work.end - work.next).min(self.part_sectors);
        let sector = work.next;
        let assembly = self
            .requests
            .get_mut(&work.tag)
            .expect("work has a request");
        let command = match work.kind {
            Kind::Flush => Command::Flush,
            Kind::Discard => Command::Discard {
                sector,
                sectors: work.end - sector,
            },
            Kind::Read => Command::Read {
                sector,
                buf: work
                    .whole
                    .take()
                    .unwrap_or_else(|| IoBuf::with_sectors(sectors as usize)),
            },
            Kind::Write => Command::Write {
                sector,
                buf: work.whole.take().unwrap_or_else(|| {
                    let from = (sector - assembly.sector) as usize * SECTOR_SIZE;
                    let source = assembly.buf.as_ref().expect("split write keeps its buffer");
                    IoBuf::from_slice(&source[from..from + sectors as usize * SECTOR_SIZE])
                }),
                fua: work.fua,
            },
            Kind::Zero => Command::Write {
                sector,
                buf: IoBuf::with_sectors(sectors as usize),
                fua: work.fua,
            },
        };
        work.next = match work.kind {
            Kind::Flush | Kind::Discard => work.end,
            _ => sector + sectors,
        };
        let tag = work.tag;
        if work.next >= work.end {
            assembly.generated = true;
            self.work.pop_front();
        }
        assembly.parts_in_flight += 1;
        let part = self.next_part;
        self.next_part += 1;
        self.parts.insert(part, (tag, sector));
        Some(Request { tag: part, command })
    }

    fn part_done(&mut self, done: Completion) {
        let Some((tag, sector)) = self.parts.remove(&done.tag) else {
            return;
        };
        let assembly = self.requests.get_mut(&tag).expect("part of a live request");
        assembly.parts_in_flight -= 1;
        match done.result {
            Err(error) => {
                assembly.error.get_or_insert(error.into());
            }
            Ok(()) if assembly.kind == Kind::Read => match &mut assembly.buf {
                Some(whole) => {
                    let from = (sector - assembly.sector) as usize * SECTOR_SIZE;
                    whole[from..from + done.buf.len()].copy_from_slice(&done.buf);
                }
                None => assembly.buf = Some(done.buf),
            },
            Ok(()) => {}
        }
        if assembly.generated && assembly.parts_in_flight == 0 {
            let assembly = self.requests.remove(&tag).expect("just seen");
            let result = match (assembly.error, assembly.kind) {
                (Some(error), _) => Err(error),
                (None, Kind::Read) => Ok(IoOutput::Read {
                    buf: assembly.buf.expect("reads gather a buffer"),
                    zero_holes: vec![],
                }),
                (None, _) => Ok(IoOutput::Done),
            };
            self.finish(tag, result);
        }
    }
}

pub(super) fn in_range(sector: u64, sectors: u64, size: u64) -> Result<(), BackendError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BackendError::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::SharedDisk;
    use crate::span::Span;
    use alloc::boxed::Box;
    use alloc::vec::Vec;
    use blockdev::{DeviceInfo, MemDisk};

    fn disk(max_transfer: u32, depth: u16) -> MemDisk {
        let mut disk = MemDisk::with_info(DeviceInfo {
            sectors: 10_000,
            read_only: false,
            discard: true,
            max_transfer_sectors: max_transfer,
            queue_depth: depth,
            model: "m".into(),
            serial: "s".into(),
        });
        disk.shuffle_completions(3);
        disk
    }

    fn run(io: &mut LinearIo, tag: u64, op: IoOp) -> Result<IoOutput, BackendError> {
        io.submit(tag, op);
        loop {
            if let Some(done) = io.poll() {
                assert_eq!(done.tag, tag);
                return done.result;
            }
        }
    }

    fn pattern(sectors: usize, seed: u8) -> IoBuf {
        let mut buf = IoBuf::with_sectors(sectors);
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte = (i / 7) as u8 ^ seed;
        }
        buf
    }

    #[test]
    fn large_requests_are_split_and_gathered() {
        let backing = disk(16, 4);
        let view = backing.handle();
        let shared = SharedDisk::new(Box::new(backing));
        let mut io = LinearIo::new(Span::new(alloc::vec![shared.region(1000, 5000, false)]));
        let data = pattern(100, 5);
        let expected: Vec<u8> = data.to_vec();
        run(
            &mut io,
            1,
            IoOp::Write {
                sector: 37,
                buf: data,
                fua: true,
            },
        )
        .unwrap();
        let mut raw = alloc::vec![0; expected.len()];
        view.read_at((1000 + 37) * 512, &mut raw);
        assert_eq!(raw, expected);
        let Ok(IoOutput::Read { buf, zero_holes }) = run(
            &mut io,
            2,
            IoOp::Read {
                sector: 37,
                buf: IoBuf::with_sectors(100),
            },
        ) else {
            panic!("read failed");
        };
        assert_eq!(&buf[..], &expected[..]);
        assert!(zero_holes.is_empty());
        run(
            &mut io,
            3,
            IoOp::WriteZeroes {
                sector: 40,
                sectors: 50,
                fua: false,
                may_unmap: true,
                fast_only: false,
            },
        )
        .unwrap();
        view.read_at((1000 + 37) * 512, &mut raw);
        assert!(raw[3 * 512..53 * 512].iter().all(|&b| b == 0));
        assert_eq!(raw[..3 * 512], expected[..3 * 512]);
        assert_eq!(raw[53 * 512..], expected[53 * 512..]);
    }

    #[test]
    fn bounds_read_only_and_status() {
        let shared = SharedDisk::new(Box::new(disk(64, 8)));
        let mut io = LinearIo::new(Span::new(alloc::vec![shared.region(0, 100, true)]));
        let write = IoOp::Write {
            sector: 0,
            buf: IoBuf::with_sectors(1),
            fua: false,
        };
        assert_eq!(run(&mut io, 1, write).unwrap_err(), BackendError::ReadOnly);
        let past_end = IoOp::Read {
            sector: 99,
            buf: IoBuf::with_sectors(2),
        };
        assert_eq!(
            run(&mut io, 2, past_end).unwrap_err(),
            BackendError::Invalid
        );
        let status = IoOp::BlockStatus {
            sector: 10,
            sectors: 5,
            max_extents: 1,
        };
        let Ok(IoOutput::Extents(extents)) = run(&mut io, 3, status) else {
            panic!("no extents");
        };
        assert_eq!(
            extents,
            [Extent {
                sectors: 90,
                hole: false,
                zero: false
            }]
        );
        let fast = IoOp::WriteZeroes {
            sector: 0,
            sectors: 1,
            fua: false,
            may_unmap: true,
            fast_only: true,
        };
        assert_eq!(run(&mut io, 4, fast).unwrap_err(), BackendError::NotFast);
        assert!(matches!(run(&mut io, 5, IoOp::Flush), Ok(IoOutput::Done)));
    }

    #[test]
    fn many_requests_in_flight_complete_once_each() {
        let shared = SharedDisk::new(Box::new(disk(8, 2)));
        let mut io = LinearIo::new(Span::new(alloc::vec![shared.region(0, 10_000, false)]));
        for tag in 0..20 {
            io.submit(
                tag,
                IoOp::Write {
                    sector: tag * 30,
                    buf: pattern(30, tag as u8),
                    fua: false,
                },
            );
        }
        assert!(io.congested());
        io.drain();
        let mut tags: Vec<u64> = core::iter::from_fn(|| io.poll())
            .map(|done| {
                assert!(done.result.is_ok());
                done.tag
            })
            .collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..20).collect::<Vec<_>>());
        assert!(io.poll().is_none() && !io.congested());
    }

    #[test]
    fn a_span_of_two_disks_reads_and_writes_across_the_seam() {
        let (first, second) = (disk(16, 2), disk(64, 3));
        let (first_view, second_view) = (first.handle(), second.handle());
        let (a, b) = (
            SharedDisk::new(Box::new(first)),
            SharedDisk::new(Box::new(second)),
        );
        // Sectors 0..100 are sectors 500..600 of the first disk, 100..300 are 40..240
        // of the second.
        let span = Span::new(alloc::vec![
            a.region(500, 100, false),
            b.region(40, 200, false)
        ]);
        let mut io = LinearIo::new(span);
        assert_eq!(io.sectors(), 300);
        let data = pattern(120, 9);
        let expected: Vec<u8> = data.to_vec();
        run(
            &mut io,
            1,
            IoOp::Write {
                sector: 50,
                buf: data,
                fua: true,
            },
        )
        .unwrap();
        let mut raw = alloc::vec![0; 50 * 512];
        first_view.read_at(550 * 512, &mut raw);
        assert_eq!(raw, expected[..50 * 512]);
        let mut raw = alloc::vec![0; 70 * 512];
        second_view.read_at(40 * 512, &mut raw);
        assert_eq!(raw, expected[50 * 512..]);
        let Ok(IoOutput::Read { buf, .. }) = run(
            &mut io,
            2,
            IoOp::Read {
                sector: 50,
                buf: IoBuf::with_sectors(120),
            },
        ) else {
            panic!("read failed");
        };
        assert_eq!(&buf[..], &expected[..]);
        let past_end = IoOp::Read {
            sector: 299,
            buf: IoBuf::with_sectors(2),
        };
        assert_eq!(
            run(&mut io, 3, past_end).unwrap_err(),
            BackendError::Invalid
        );
        assert!(matches!(run(&mut io, 4, IoOp::Flush), Ok(IoOutput::Done)));
    }
}
