//! Where an import or sync reads from: an NBD server's export, or a thin device of
//! this appliance. Both answer block-status and read requests asynchronously.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{IoBuf, SECTOR_SIZE};
use nbd::client::{Connection, Reply, Stream};
use nbd::wire::STATE_ZERO;
use thin_pool::{ThinOp, ThinOutput, ThinRequest, ThinVolume};

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
    Status {
        tag: u64,
        runs: Vec<Run>,
    },
    Data {
        tag: u64,
        data: Vec<u8>,
    },
}

pub(crate) enum Source {
    Remote(Box<Connection<Box<dyn Stream>>>),
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
            Source::Remote(connection) => connection.export().map(|export| export.size),
            Source::Local { volume, .. } => Some(blockdev::BlockDevice::info(volume).bytes()),
        }
    }

    /// Largest read worth asking for at once, and the alignment reads keep.
    pub(crate) fn max_read(&self) -> u64 {
        match self {
            Source::Remote(connection) => connection
                .export()
                .map_or(0, |export| u64::from(export.max_payload)),
            Source::Local { volume, .. } => {
                u64::from(blockdev::BlockDevice::info(volume).max_transfer_sectors)
                    * SECTOR_SIZE as u64
            }
        }
    }

    /// Asks for the runs from `offset` on (at most `length` bytes' worth).
    pub(crate) fn status(&mut self, offset: u64, length: u64) -> Result<u64, String> {
        match self {
            Source::Remote(connection) => connection
                .client()
                .block_status(offset, length as u32)
                .map_err(|error| format!("{error}")),
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

    /// Asks for `length` bytes at `offset`.
    pub(crate) fn read(&mut self, offset: u64, length: u64) -> Result<u64, String> {
        match self {
            Source::Remote(connection) => connection
                .client()
                .read(offset, length as u32)
                .map_err(|error| format!("{error}")),
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
            Source::Remote(connection) => {
                connection.pump().map_err(|error| format!("{error}"))?;
                match connection.next_reply() {
                    None => Ok(None),
                    Some(Reply::Read { cookie, data, .. }) => {
                        Ok(Some(Answer::Data { tag: cookie, data }))
                    }
                    Some(Reply::Status {
                        cookie,
                        contexts: found,
                        ..
                    }) => Ok(Some(Answer::Status {
                        tag: cookie,
                        runs: merge_contexts(&found, contexts),
                    })),
                    Some(Reply::Failed { error, message, .. }) => Err(format!(
                        "the server failed a request with error {error}{}",
                        if message.is_empty() {
                            String::new()
                        } else {
                            format!(": {message}")
                        }
                    )),
                }
            }
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
                            data: done.buf.to_vec(),
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

/// Says goodbye to a server (`NBD_CMD_DISC`), so it does not wait for a client that
/// is gone; what cannot be sent now is dropped with the connection.
impl Drop for Source {
    fn drop(&mut self) {
        if let Source::Remote(connection) = self {
            connection.client().disconnect();
            let _ = connection.pump();
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

/// Runs from the contexts of one block-status reply: context 0 is
/// `base:allocation` (zero or not); context 1, when asked for, marks changed
/// ranges. The runs cover as far as every context does.
fn merge_contexts(found: &[Vec<nbd::client::StatusExtent>], contexts: usize) -> Vec<Run> {
    let allocation = found.first().map_or(&[][..], Vec::as_slice);
    let changed = found.get(1).filter(|_| contexts > 1);
    let mut runs = Vec::new();
    let (mut a, mut c) = (0, 0);
    let (mut a_left, mut c_left) = (
        allocation.first().map_or(0, |extent| extent.length),
        changed
            .and_then(|extents| extents.first())
            .map_or(u64::MAX, |extent| extent.length),
    );
    while a < allocation.len() && changed.is_none_or(|extents| c < extents.len()) {
        let length = a_left.min(c_left);
        let zero = allocation[a].flags & STATE_ZERO != 0;
        let is_changed = changed.is_none_or(|extents| extents[c].flags & 1 != 0);
        runs.push(Run {
            length,
            zero,
            changed: is_changed,
        });
        a_left -= length;
        c_left -= length;
        if a_left == 0 {
            a += 1;
            a_left = allocation.get(a).map_or(0, |extent| extent.length);
        }
        if c_left == 0
            && let Some(extents) = changed
        {
            c += 1;
            c_left = extents.get(c).map_or(0, |extent| extent.length);
        }
    }
    runs
}
