//! Per-device block usage as `thin_ls` reports it: mapped, exclusive and shared.
//!
//! Sharing in a pool only ever comes from snapshots, which share a virtual block at
//! the same address, so one merge-walk over all devices' mapping runs in virtual
//! block order finds every block mapped by more than one device. Time is
//! proportional to the mapped runs; memory to the number of devices.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use persistent_data::Error;
use persistent_data::thin::{Run, ThinMetadata};

use crate::status::ThinUsage;

const BATCH_RUNS: usize = 256;

/// The mapped runs of one device, fetched in batches.
struct Runs {
    dev: u64,
    end: u64,
    position: u64,
    /// (virtual begin, length, data begin)
    queue: VecDeque<(u64, u64, u64)>,
}

impl Runs {
    fn front(&mut self, md: &mut ThinMetadata) -> Result<Option<(u64, u64, u64)>, Error> {
        while self.queue.is_empty() && self.position < self.end {
            let runs = md.lookup_range(self.dev, self.position, self.end, BATCH_RUNS)?;
            self.position = runs.last().map_or(self.end, Run::end);
            for run in runs {
                if let Run::Mapped {
                    begin,
                    len,
                    data_begin,
                    ..
                } = run
                {
                    self.queue.push_back((begin, len, data_begin));
                }
            }
        }
        Ok(self.queue.front().copied())
    }

    fn consume(&mut self, blocks: u64) {
        let front = self.queue.front_mut().expect("consumed run exists");
        if front.1 == blocks {
            self.queue.pop_front();
        } else {
            front.0 += blocks;
            front.1 -= blocks;
            front.2 += blocks;
        }
    }
}

/// Usage of every device in the pool, by device id.
pub fn usage(md: &mut ThinMetadata) -> Result<Vec<ThinUsage>, Error> {
    let devices = md.devices()?;
    let mut out = Vec::with_capacity(devices.len());
    let mut cursors = Vec::with_capacity(devices.len());
    for &dev in &devices {
        let details = md.device_details(dev)?;
        let highest = md.highest_mapped(dev)?;
        out.push(ThinUsage {
            dev,
            mapped: details.mapped_blocks,
            exclusive: 0,
            shared: 0,
            highest_mapped: highest,
            transaction_id: details.transaction_id,
            creation_time: details.creation_time,
            snapshotted_time: details.snapshotted_time,
        });
        cursors.push(Runs {
            dev,
            end: highest.map_or(0, |h| h + 1),
            position: 0,
            queue: VecDeque::new(),
        });
    }
    let mut fronts: Vec<Option<(u64, u64, u64)>> = Vec::with_capacity(cursors.len());
    loop {
        fronts.clear();
        for cursor in cursors.iter_mut() {
            fronts.push(cursor.front(md)?);
        }
        let Some(at) = fronts.iter().flatten().map(|run| run.0).min() else {
            break;
        };
        // The stretch from `at` on where the set of devices mapping a block and their
        // data offsets stay the same.
        let end = fronts
            .iter()
            .flatten()
            .map(|&(begin, len, _)| if begin == at { begin + len } else { begin })
            .min()
            .expect("at least one run");
        let blocks = end - at;
        let here: Vec<(usize, u64)> = fronts
            .iter()
            .enumerate()
            .filter_map(|(i, run)| run.filter(|r| r.0 == at).map(|r| (i, r.2)))
            .collect();
        for &(i, data) in &here {
            let shared = here.iter().any(|&(j, other)| j != i && other == data);
            if shared {
                out[i].shared += blocks;
            } else {
                out[i].exclusive += blocks;
            }
            cursors[i].consume(blocks);
        }
    }
    Ok(out)
}
