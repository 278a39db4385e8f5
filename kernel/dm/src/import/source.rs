//! Where an import or sync reads from: an NBD server's export (over one connection
//! or several, see [`Remote`]), or a thin device of this appliance. Both answer
//! block-status and read requests asynchronously.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{IoBuf, SECTOR_SIZE};
use thin_pool::{ThinOp, ThinOutput, ThinRequest, ThinVolume};

use super::remote::Remote;

/// Extents asked for in one block status of a local thin device.
const LOCAL_EXTENTS: u32 = 4096;

/// A run of the source's bytes and whether it reads as zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub length: u64,
    pub zero: bool,
    /// Differs from the base (syncs; always true for imports).
    pub changed: bool,
}

/// An answer from the source.
pub(crate) enum Answer {
    /// Consecutive runs from the offset asked for, covering at least one byte.
    Status { tag: u64, runs: Vec<Run> },
    /// The bytes read, then zeroes up to a whole sector.
    Data { tag: u64, data: IoBuf },
}

pub(crate) enum Source {
    Remote(Box<Remote>),
    Local {
        volume: ThinVolume,
        answers: VecDeque<Answer>,
        next_tag: u64,
    },
}

impl Source {
    /// Size in bytes (remote: once connected).
    pub(crate) fn size(&self) -> Option<u64> {
        match self {
            Source::Remote(remote) => remote.export().map(|export| export.size),
            Source::Local { volume, .. } => Some(blockdev::BlockDevice::info(volume).bytes()),
        }
    }

    /// Largest read worth asking for at once, and the alignment reads keep.
    pub(crate) fn max_read(&self) -> u64 {
        match self {
            Source::Remote(remote) => remote
                .export()
                .map_or(0, |export| u64::from(export.max_payload)),
            Source::Local { volume, .. } => {
                u64::from(blockdev::BlockDevice::info(volume).max_transfer_sectors)
                    * SECTOR_SIZE as u64
            }
        }
    }

    /// Whether a read can be asked for now (a remote source spreads them over its
    /// connections and waits while each has its share in flight).
    pub(crate) fn can_read(&self) -> bool {
        match self {
            Source::Remote(remote) => remote.reader().is_some(),
            Source::Local { .. } => true,
        }
    }

    /// Asks for the runs from `offset` on (at most `length` bytes' worth).
    pub(crate) fn status(&mut self, offset: u64, length: u64) -> Result<u64, String> {
        match self {
            Source::Remote(remote) => remote.status(offset, length as u32),
            Source::Local {
                volume, next_tag, ..
            } => {
                let tag = take(next_tag);
                let op = ThinOp::BlockStatus {
                    sector: offset / SECTOR_SIZE as u64,
                    sectors: length.div_ceil(SECTOR_SIZE as u64),
                    max_extents: LOCAL_EXTENTS,
                };
                submit(volume, tag, op)
            }
        }
    }

    /// Asks for `length` bytes at `offset`; a remote read is received into `buf`'s
    /// storage (a buffer whose write finished), a local one into a fresh buffer.
    pub(crate) fn read(&mut self, offset: u64, length: u64, buf: IoBuf) -> Result<u64, String> {
        match self {
            Source::Remote(remote) => remote.read(offset, length as u32, buf),
            Source::Local {
                volume, next_tag, ..
            } => {
                let tag = take(next_tag);
                let op = ThinOp::Read {
                    sector: offset / SECTOR_SIZE as u64,
                    buf: IoBuf::zeroed(length as usize),
                };
                submit(volume, tag, op)
            }
        }
    }

    /// Moves bytes and returns the next answer, if any. A failed request fails the
    /// copy: the source is expected to answer everything asked.
    pub(crate) fn poll(&mut self, contexts: usize) -> Result<Option<Answer>, String> {
        match self {
            Source::Remote(remote) => remote.poll(contexts),
            Source::Local {
                volume, answers, ..
            } => {
                while let Some(done) = volume.poll_op() {
                    let answer = match done.result {
                        Ok(ThinOutput::Extents(extents)) => Answer::Status {
                            tag: done.tag,
                            runs: extents
                                .iter()
                                .map(|extent| Run {
                                    length: extent.sectors * SECTOR_SIZE as u64,
                                    zero: extent.zero,
                                    changed: true,
                                })
                                .collect(),
                        },
                        Ok(_) => Answer::Data {
                            tag: done.tag,
                            data: done.buf,
                        },
                        Err(error) => return Err(format!("reading the source failed: {error}")),
                    };
                    answers.push_back(answer);
                }
                Ok(answers.pop_front())
            }
        }
    }
}

fn take(next_tag: &mut u64) -> u64 {
    let tag = *next_tag;
    *next_tag += 1;
    tag
}

fn submit(volume: &mut ThinVolume, tag: u64, op: ThinOp) -> Result<u64, String> {
    volume
        .submit_op(ThinRequest { tag, op })
        .map(|()| tag)
        .map_err(|_| String::from("the source device's queue is full"))
}
