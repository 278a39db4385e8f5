//! Block status: provisioned, unprovisioned and zero ranges of a volume.

use super::*;

impl Core {
    pub(super) fn block_status(
        &mut self,
        vol: VolId,
        sector: u64,
        sectors: u64,
        max_extents: u32,
    ) -> Result<Vec<Extent>, IoError> {
        if self.mode == PoolMode::Fail {
            return Err(EIO_FAILED);
        }
        let bs = self.block_sectors;
        let dev = self.volumes[vol].dev;
        let origin_end = if self.volumes[vol].origin.is_some() {
            self.volumes[vol].origin_sectors
        } else {
            0
        };
        let end = sector + sectors;
        let mut extents: Vec<Extent> = Vec::new();
        let push = |extents: &mut Vec<Extent>, sectors: u64, hole: bool, zero: bool| match extents
            .last_mut()
        {
            Some(last) if last.hole == hole && last.zero == zero => last.sectors += sectors,
            _ => extents.push(Extent {
                sectors,
                hole,
                zero,
            }),
        };
        let mut position = sector / bs;
        let last = end.div_ceil(bs);
        while position < last && extents.len() <= max_extents as usize {
            let runs = self
                .md
                .lookup_range(dev, position, last, LOOKUP_RUNS)
                .map_err(|error| {
                    self.metadata_failed(&error);
                    EIO_METADATA
                })?;
            position = runs.last().map_or(last, Run::end);
            for run in runs {
                let (s0, s1) = overlap((run_begin(&run) * bs, run.end() * bs), (sector, end));
                if matches!(run, Run::Mapped { .. }) {
                    push(&mut extents, s1 - s0, false, false);
                    continue;
                }
                let split = origin_end.clamp(s0, s1);
                if split > s0 {
                    push(&mut extents, split - s0, true, false);
                }
                if s1 > split {
                    push(&mut extents, s1 - split, true, true);
                }
            }
        }
        extents.truncate((max_extents as usize).max(1));
        Ok(extents)
    }
}

fn run_begin(run: &Run) -> u64 {
    match *run {
        Run::Unmapped { begin, .. } | Run::Mapped { begin, .. } => begin,
    }
}
