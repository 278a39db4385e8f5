//! Synchronous I/O helpers that respect each device's largest transfer: a chunk may
//! be up to 1 GiB, far more than one request carries.

use alloc::vec::Vec;
use blockdev::{BlockDevice, Command, IoBuf, IoError, run_batch, run_sync};

/// Sectors moved by one request of a copy, at most (and at most what the device takes).
const COPY_PIECE_SECTORS: u64 = 2048;

fn piece_sectors(device: &dyn BlockDevice) -> u64 {
    COPY_PIECE_SECTORS.min(u64::from(device.info().max_transfer_sectors).max(1))
}

/// Sectors one request may carry on both devices (a piece of a copy between them).
pub(crate) fn transfer_sectors(source: &dyn BlockDevice, target: &dyn BlockDevice) -> u64 {
    piece_sectors(source).min(piece_sectors(target))
}

/// Reads `sectors` sectors from `sector` into `out` (which holds exactly that many).
pub fn read_into(device: &mut dyn BlockDevice, sector: u64, out: &mut [u8]) -> Result<(), IoError> {
    let piece = piece_sectors(device);
    let sectors = (out.len() / 512) as u64;
    let commands = (0..sectors)
        .step_by(piece as usize)
        .map(|at| Command::Read {
            sector: sector + at,
            buf: IoBuf::with_sectors(piece.min(sectors - at) as usize),
        });
    let bufs = run_batch(device, commands)?;
    let mut at = 0;
    for buf in bufs {
        out[at..at + buf.len()].copy_from_slice(&buf);
        at += buf.len();
    }
    Ok(())
}

/// Writes `data` (whole sectors) at `sector`; with `fua` every piece is durable when
/// this returns.
pub fn write_from(
    device: &mut dyn BlockDevice,
    sector: u64,
    data: &[u8],
    fua: bool,
) -> Result<(), IoError> {
    let whole = Command::Write {
        sector,
        buf: IoBuf::from_slice(data),
        fua,
    };
    let requests = pieces_of(device, whole);
    run_batch(device, requests).map(drop)
}

/// Copies `sectors` sectors from `source` at `from` to `target` at `to`, a piece at
/// a time.
pub fn copy(
    source: &mut dyn BlockDevice,
    from: u64,
    target: &mut dyn BlockDevice,
    to: u64,
    sectors: u64,
) -> Result<(), IoError> {
    let piece = piece_sectors(source).min(piece_sectors(target)) * 16;
    let mut done = 0;
    let mut buf: Vec<u8> = Vec::new();
    while done < sectors {
        let now = piece.min(sectors - done);
        buf.resize(now as usize * 512, 0);
        read_into(source, from + done, &mut buf)?;
        write_from(target, to + done, &buf, false)?;
        done += now;
    }
    Ok(())
}

/// Makes the device's completed writes durable.
pub fn flush(device: &mut dyn BlockDevice) -> Result<(), IoError> {
    run_sync(device, Command::Flush).map(drop)
}

/// Cuts a command into requests the device takes (writes larger than its largest
/// transfer into pieces); all of them may be in flight together.
pub(crate) fn pieces_of(device: &dyn BlockDevice, command: Command) -> Vec<Command> {
    let Command::Write { sector, buf, fua } = command else {
        return alloc::vec![command];
    };
    let piece = piece_sectors(device) as usize * 512;
    if buf.len() <= piece {
        return alloc::vec![Command::Write { sector, buf, fua }];
    }
    buf.chunks(piece)
        .enumerate()
        .map(|(n, part)| Command::Write {
            sector: sector + (n * piece / 512) as u64,
            buf: IoBuf::from_slice(part),
            fua,
        })
        .collect()
}

/// Carries out `commands` one after the other, each finished before the next starts.
pub(crate) fn run_in_order(
    device: &mut dyn BlockDevice,
    commands: impl IntoIterator<Item = Command>,
) -> Result<(), IoError> {
    for command in commands {
        let requests = pieces_of(device, command);
        run_batch(device, requests)?;
    }
    Ok(())
}
