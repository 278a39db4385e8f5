//! An in-memory [`Backend`] that behaves like thin volumes of a pool: data is
//! allocated in blocks, unallocated blocks are holes that read as zeroes or from an
//! external origin, trims unmap whole blocks, a shared capacity can run out. It is the
//! reference the protocol is tested against, and serves real clients on the host.
//!
//! Requests execute when submitted; completions can be returned in order, reversed,
//! shuffled or held back, to exercise a server's handling of out-of-order and slow
//! completions.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{BlockDevice, Command, Extent, MemDisk, SECTOR_SIZE, SectorRun, run_sync};
use core::net::SocketAddr;

use crate::backend::{
    Backend, BackendError, ExportHandle, ExportInfo, IoCompletion, IoOp, IoOutput, IoRequest,
    OpenError, QueueFull, Tls,
};

const SECTOR: u64 = SECTOR_SIZE as u64;

/// Configuration of one export of a [`MemoryBackend`].
pub struct MemoryExport {
    pub name: String,
    pub description: String,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    pub read_only: bool,
    /// Allocation unit in sectors (a pool's data block); also the preferred block size.
    pub block_sectors: u64,
    /// Read-only device whose data shows through unallocated blocks (thin volumes with
    /// an external origin); past its end holes read as zeroes.
    pub origin: Option<MemDisk>,
    pub trim: bool,
    pub write_zeroes: bool,
    pub fast_zero: bool,
}

impl MemoryExport {
    /// A writable export of `sectors` sectors with 64 KiB blocks, every feature on.
    pub fn new(name: &str, sectors: u64) -> Self {
        MemoryExport {
            name: String::from(name),
            description: String::new(),
            sectors,
            read_only: false,
            block_sectors: 128,
            origin: None,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
        }
    }
}

/// The order in which finished requests are returned by [`Backend::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionOrder {
    /// Submission order.
    Fifo,
    /// Newest first.
    Lifo,
    /// Pseudo-random, from a seed.
    Shuffled(u64),
    /// Nothing is returned until the order is changed.
    Held,
}

/// Operations seen, for tests that check what a client sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub reads: u64,
    pub writes: u64,
    pub fua_writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
    pub caches: u64,
    pub block_status: u64,
}

struct Volume {
    config: MemoryExport,
    data: MemDisk,
    /// Allocated block numbers.
    allocated: BTreeSet<u64>,
    failing: bool,
}

/// In-memory exports with thin-volume behaviour; see the module documentation.
pub struct MemoryBackend {
    /// Export name → volume id.
    names: BTreeMap<String, u64>,
    volumes: BTreeMap<u64, Volume>,
    /// Open handle → volume id.
    handles: BTreeMap<u64, u64>,
    next_id: u64,
    default_export: Option<String>,
    /// Finished requests and the volume each touched.
    done: VecDeque<(u64, IoCompletion)>,
    order: CompletionOrder,
    queue_depth: usize,
    /// Blocks all volumes together may allocate; `None` for no limit.
    capacity_blocks: Option<u64>,
    stats: MemoryStats,
    tls: Tls,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend {
            names: BTreeMap::new(),
            volumes: BTreeMap::new(),
            handles: BTreeMap::new(),
            next_id: 1,
            default_export: None,
            done: VecDeque::new(),
            order: CompletionOrder::Fifo,
            queue_depth: 256,
            capacity_blocks: None,
            stats: MemoryStats::default(),
            tls: Tls::Off,
        }
    }
}

impl MemoryBackend {
    /// Adds (or replaces) an export. Block size and size must be whole sectors; the
    /// block size is at least one sector.
    pub fn add_export(&mut self, config: MemoryExport) {
        self.remove_export(&config.name);
        let id = self.next_id;
        self.next_id += 1;
        let config = MemoryExport {
            block_sectors: config.block_sectors.max(1),
            ..config
        };
        self.names.insert(config.name.clone(), id);
        let data = MemDisk::new(config.sectors);
        self.volumes.insert(
            id,
            Volume {
                config,
                data,
                allocated: BTreeSet::new(),
                failing: false,
            },
        );
    }

    /// Removes an export: opening it fails from now on, and requests of clients that
    /// have it open (including ones already in flight) fail with
    /// [`BackendError::Gone`]. Returns whether it existed.
    pub fn remove_export(&mut self, name: &str) -> bool {
        let Some(id) = self.names.remove(name) else {
            return false;
        };
        self.volumes.remove(&id);
        for (volume, completion) in &mut self.done {
            if *volume == id {
                completion.result = Err(BackendError::Gone);
            }
        }
        true
    }

    /// The export the empty name stands for.
    pub fn set_default_export(&mut self, name: Option<&str>) {
        self.default_export = name.map(String::from);
    }

    pub fn set_completion_order(&mut self, order: CompletionOrder) {
        self.order = match order {
            // xorshift never leaves zero.
            CompletionOrder::Shuffled(seed) => CompletionOrder::Shuffled(seed | 1),
            other => other,
        };
    }

    /// Requests accepted before [`Backend::submit`] reports a full queue.
    pub fn set_queue_depth(&mut self, depth: usize) {
        self.queue_depth = depth.max(1);
    }

    /// Limits the blocks all exports together may allocate (a pool's data space).
    pub fn set_capacity_blocks(&mut self, blocks: Option<u64>) {
        self.capacity_blocks = blocks;
    }

    /// What `NBD_OPT_STARTTLS` gets from now on (off unless set).
    pub fn set_tls(&mut self, tls: Tls) {
        self.tls = tls;
    }

    /// Makes every read and write of an export fail with an I/O error.
    pub fn set_failing(&mut self, name: &str, failing: bool) {
        if let Some(volume) = self.volume_mut(name) {
            volume.failing = failing;
        }
    }

    pub fn stats(&self) -> MemoryStats {
        self.stats
    }

    /// Exports currently open.
    pub fn open_count(&self) -> usize {
        self.handles.len()
    }

    /// Finished requests not yet returned by [`Backend::poll`].
    pub fn pending_completions(&self) -> usize {
        self.done.len()
    }

    /// Blocks allocated by an export.
    pub fn allocated_blocks(&self, name: &str) -> Option<u64> {
        let id = self.names.get(name)?;
        Some(self.volumes[id].allocated.len() as u64)
    }

    /// Reads an export's contents directly (what a client would read).
    pub fn read_at(&self, name: &str, offset: u64, out: &mut [u8]) -> Option<()> {
        let volume = &self.volumes[self.names.get(name)?];
        let sector = offset / SECTOR;
        let sectors = (out.len() as u64).div_ceil(SECTOR);
        let mut buf = alloc::vec![0u8; (sectors * SECTOR) as usize];
        volume.read(sector, &mut buf);
        let skip = (offset % SECTOR) as usize;
        out.copy_from_slice(&buf[skip..skip + out.len()]);
        Some(())
    }

    /// Writes an export directly, allocating like a client write would.
    pub fn write_at(&mut self, name: &str, sector: u64, data: &[u8]) -> Result<(), BackendError> {
        let id = *self.names.get(name).ok_or(BackendError::Gone)?;
        let free = self.free_blocks();
        let volume = self.volumes.get_mut(&id).ok_or(BackendError::Gone)?;
        volume.write(sector, data, free)
    }

    fn volume_mut(&mut self, name: &str) -> Option<&mut Volume> {
        let id = self.names.get(name)?;
        self.volumes.get_mut(id)
    }

    fn resolve(&self, name: &str) -> Option<u64> {
        let name = match (&self.default_export, name) {
            (Some(default), "") => default.as_str(),
            _ => name,
        };
        self.names.get(name).copied()
    }

    fn free_blocks(&self) -> u64 {
        let used: u64 = self
            .volumes
            .values()
            .map(|v| v.allocated.len() as u64)
            .sum();
        self.capacity_blocks
            .map_or(u64::MAX, |capacity| capacity.saturating_sub(used))
    }

    fn execute(&mut self, id: u64, op: IoOp) -> Result<IoOutput, BackendError> {
        let free = self.free_blocks();
        let stats = &mut self.stats;
        let volume = self.volumes.get_mut(&id).ok_or(BackendError::Gone)?;
        let (sector, sectors) = match &op {
            IoOp::Read { sector, buf } | IoOp::Write { sector, buf, .. } => {
                (*sector, buf.len() as u64 / SECTOR)
            }
            IoOp::Trim {
                sector, sectors, ..
            }
            | IoOp::WriteZeroes {
                sector, sectors, ..
            }
            | IoOp::Cache { sector, sectors }
            | IoOp::BlockStatus {
                sector, sectors, ..
            } => (*sector, *sectors),
            IoOp::Flush => (0, 0),
        };
        if sector
            .checked_add(sectors)
            .is_none_or(|end| end > volume.config.sectors)
        {
            return Err(BackendError::Invalid);
        }
        let writes = matches!(
            op,
            IoOp::Write { .. } | IoOp::Trim { .. } | IoOp::WriteZeroes { .. }
        );
        if writes && volume.config.read_only {
            return Err(BackendError::ReadOnly);
        }
        if volume.failing && matches!(op, IoOp::Read { .. } | IoOp::Write { .. }) {
            return Err(BackendError::Io("injected media error"));
        }
        match op {
            IoOp::Read { sector, mut buf } => {
                stats.reads += 1;
                let zero_holes = volume.read(sector, &mut buf);
                Ok(IoOutput::Read { buf, zero_holes })
            }
            IoOp::Write { sector, buf, fua } => {
                stats.writes += 1;
                stats.fua_writes += u64::from(fua);
                volume.write(sector, &buf, free)?;
                Ok(IoOutput::Done)
            }
            IoOp::Flush => {
                stats.flushes += 1;
                Ok(IoOutput::Done)
            }
            IoOp::Trim {
                sector, sectors, ..
            } => {
                stats.trims += 1;
                volume.unmap_covered(sector, sectors);
                Ok(IoOutput::Done)
            }
            IoOp::WriteZeroes {
                sector,
                sectors,
                may_unmap,
                fast_only,
                ..
            } => {
                stats.write_zeroes += 1;
                volume.write_zeroes(sector, sectors, may_unmap, fast_only, free)?;
                Ok(IoOutput::Done)
            }
            IoOp::Cache { .. } => {
                stats.caches += 1;
                Ok(IoOutput::Done)
            }
            IoOp::BlockStatus {
                sector,
                sectors,
                max_extents,
            } => {
                stats.block_status += 1;
                Ok(IoOutput::Extents(volume.extents(
                    sector,
                    sectors,
                    max_extents,
                )))
            }
        }
    }
}

impl Volume {
    fn block_bytes(&self) -> u64 {
        self.config.block_sectors * SECTOR
    }

    fn blocks(&self) -> u64 {
        self.config.sectors.div_ceil(self.config.block_sectors)
    }

    /// Bytes of the origin that show through (0 without one).
    fn origin_bytes(&self) -> u64 {
        self.config
            .origin
            .as_ref()
            .map_or(0, |origin| origin.info().bytes())
    }

    /// An unallocated block reads as zeroes when no origin data lies under it.
    fn hole_reads_zero(&self, block: u64) -> bool {
        block * self.block_bytes() >= self.origin_bytes()
    }

    /// Splits `start..end` (bytes) at block boundaries: (block, piece start, piece end).
    fn pieces(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, u64)> + use<> {
        let block = self.block_bytes();
        let mut pos = start;
        core::iter::from_fn(move || {
            (pos < end).then(|| {
                let index = pos / block;
                let piece_end = ((index + 1) * block).min(end);
                let piece = (index, pos, piece_end);
                pos = piece_end;
                piece
            })
        })
    }

    /// What an unallocated range reads: origin data below the origin's end, zeroes
    /// after it.
    fn read_unallocated(&self, start: u64, out: &mut [u8]) {
        out.fill(0);
        if let Some(origin) = &self.config.origin {
            let below = self
                .origin_bytes()
                .saturating_sub(start)
                .min(out.len() as u64);
            origin.read_at(start, &mut out[..below as usize]);
        }
    }

    /// Fills `buf` from `sector` on; returns the runs that are zero holes.
    fn read(&self, sector: u64, buf: &mut [u8]) -> Vec<SectorRun> {
        let start = sector * SECTOR;
        let mut holes: Vec<SectorRun> = Vec::new();
        for (block, from, to) in self.pieces(start, start + buf.len() as u64) {
            let out = &mut buf[(from - start) as usize..(to - start) as usize];
            if self.allocated.contains(&block) {
                self.data.read_at(from, out);
                continue;
            }
            self.read_unallocated(from, out);
            if self.hole_reads_zero(block) {
                let run_start = (from - start) / SECTOR;
                let run = (to - from) / SECTOR;
                match holes.last_mut() {
                    Some(last) if last.start + last.sectors == run_start => last.sectors += run,
                    _ => holes.push(SectorRun {
                        start: run_start,
                        sectors: run,
                    }),
                }
            }
        }
        holes
    }

    /// Allocates the unallocated blocks among `blocks`, giving each the content it
    /// showed before (origin data or zeroes). Fails without changing anything when
    /// more than `free` blocks would be needed.
    fn allocate(&mut self, blocks: &[u64], free: u64) -> Result<(), BackendError> {
        let needed: Vec<u64> = blocks
            .iter()
            .copied()
            .filter(|block| !self.allocated.contains(block))
            .collect();
        if needed.len() as u64 > free {
            return Err(BackendError::NoSpace);
        }
        let block_bytes = self.block_bytes();
        let size = self.config.sectors * SECTOR;
        let mut content = alloc::vec![0u8; block_bytes as usize];
        for block in needed {
            let start = block * block_bytes;
            let len = block_bytes.min(size - start) as usize;
            self.read_unallocated(start, &mut content[..len]);
            self.data.write_at(start, &content[..len]);
            self.allocated.insert(block);
        }
        Ok(())
    }

    fn touched_blocks(&self, start: u64, end: u64) -> Vec<u64> {
        self.pieces(start, end).map(|(block, _, _)| block).collect()
    }

    fn write(&mut self, sector: u64, data: &[u8], free: u64) -> Result<(), BackendError> {
        let start = sector * SECTOR;
        let end = start + data.len() as u64;
        self.allocate(&self.touched_blocks(start, end), free)?;
        self.data.write_at(start, data);
        Ok(())
    }

    /// Unmaps the blocks the range covers completely; partial blocks are untouched.
    fn unmap_covered(&mut self, sector: u64, sectors: u64) {
        let start = sector * SECTOR;
        let end = start + sectors * SECTOR;
        let block_bytes = self.block_bytes();
        let size = self.config.sectors * SECTOR;
        let covered: Vec<(u64, u64, u64)> = self
            .pieces(start, end)
            .filter(|&(block, from, to)| {
                from == block * block_bytes && (to - from == block_bytes || to == size)
            })
            .collect();
        for (block, from, to) in covered {
            if self.allocated.remove(&block) {
                let discard = Command::Discard {
                    sector: from / SECTOR,
                    sectors: (to - from) / SECTOR,
                };
                // The range was checked against the export, which is the disk's size.
                let _ = run_sync(&mut self.data, discard);
            }
        }
    }

    fn write_zeroes(
        &mut self,
        sector: u64,
        sectors: u64,
        may_unmap: bool,
        fast_only: bool,
        free: u64,
    ) -> Result<(), BackendError> {
        let start = sector * SECTOR;
        let end = start + sectors * SECTOR;
        let unmap = may_unmap && self.config.origin.is_none();
        if fast_only {
            // Fast means unmapping only: no data may need writing.
            let block_bytes = self.block_bytes();
            let size = self.config.sectors * SECTOR;
            let partial_allocated = self.pieces(start, end).any(|(block, from, to)| {
                let whole = from == block * block_bytes && (to - from == block_bytes || to == size);
                !whole && self.allocated.contains(&block)
            });
            if !unmap || partial_allocated {
                return Err(BackendError::NotFast);
            }
        }
        if unmap {
            self.unmap_covered(sector, sectors);
            let zeroes = alloc::vec![0u8; self.block_bytes() as usize];
            let partial: Vec<(u64, u64)> = self
                .pieces(start, end)
                .filter(|(block, _, _)| self.allocated.contains(block))
                .map(|(_, from, to)| (from, to))
                .collect();
            for (from, to) in partial {
                self.data.write_at(from, &zeroes[..(to - from) as usize]);
            }
            return Ok(());
        }
        self.allocate(&self.touched_blocks(start, end), free)?;
        let zeroes = alloc::vec![0u8; self.block_bytes() as usize];
        for (_, from, to) in self.pieces(start, end).collect::<Vec<_>>() {
            self.data.write_at(from, &zeroes[..(to - from) as usize]);
        }
        Ok(())
    }

    /// Status of the block and the first block after the run it starts.
    fn run_at(&self, block: u64) -> (Extent, u64) {
        if self.allocated.contains(&block) {
            let mut end = block + 1;
            for &next in self.allocated.range(block + 1..) {
                if next != end {
                    break;
                }
                end += 1;
            }
            let data = Extent {
                sectors: 0,
                hole: false,
                zero: false,
            };
            return (data, end);
        }
        let next_allocated = self
            .allocated
            .range(block..)
            .next()
            .copied()
            .unwrap_or(self.blocks());
        let zero = self.hole_reads_zero(block);
        // Holes over the origin and holes past its end differ: split at its end.
        let origin_end = self.origin_bytes().div_ceil(self.block_bytes());
        let end = if zero || origin_end <= block {
            next_allocated
        } else {
            next_allocated.min(origin_end)
        };
        (
            Extent {
                sectors: 0,
                hole: true,
                zero,
            },
            end,
        )
    }

    fn extents(&self, sector: u64, sectors: u64, max_extents: u32) -> Vec<Extent> {
        let end = sector + sectors;
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = sector;
        while pos < end && extents.len() < max_extents as usize {
            let (mut extent, end_block) = self.run_at(pos / self.config.block_sectors);
            let run_end = (end_block * self.config.block_sectors).min(end);
            extent.sectors = run_end - pos;
            match extents.last_mut() {
                Some(last) if last.hole == extent.hole && last.zero == extent.zero => {
                    last.sectors += extent.sectors;
                }
                _ => extents.push(extent),
            }
            pos = run_end;
        }
        extents
    }
}

impl Backend for MemoryBackend {
    fn exports(&self) -> Vec<ExportInfo> {
        self.volumes.values().map(|volume| volume.info()).collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.resolve(name).map(|id| self.volumes[&id].info())
    }

    fn open(
        &mut self,
        name: &str,
        _peer: SocketAddr,
    ) -> Result<(ExportHandle, ExportInfo), OpenError> {
        let id = self.resolve(name).ok_or(OpenError::NotFound)?;
        let handle = self.next_id;
        self.next_id += 1;
        self.handles.insert(handle, id);
        Ok((ExportHandle(handle), self.volumes[&id].info()))
    }

    fn close(&mut self, export: ExportHandle, _peer: SocketAddr) {
        self.handles.remove(&export.0);
    }

    fn submit(&mut self, request: IoRequest) -> Result<(), QueueFull> {
        if self.done.len() >= self.queue_depth {
            return Err(QueueFull(request));
        }
        let id = self.handles.get(&request.export.0).copied().unwrap_or(0);
        let result = self.execute(id, request.op);
        let completion = IoCompletion {
            tag: request.tag,
            result,
        };
        self.done.push_back((id, completion));
        Ok(())
    }

    fn poll(&mut self) -> Option<IoCompletion> {
        let picked = match &mut self.order {
            CompletionOrder::Fifo => self.done.pop_front(),
            CompletionOrder::Lifo => self.done.pop_back(),
            CompletionOrder::Shuffled(state) if !self.done.is_empty() => {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                let pick = (*state % self.done.len() as u64) as usize;
                self.done.swap_remove_back(pick)
            }
            CompletionOrder::Shuffled(_) | CompletionOrder::Held => None,
        };
        picked.map(|(_, completion)| completion)
    }

    fn tls(&self) -> Tls {
        self.tls.clone()
    }
}

impl Volume {
    fn info(&self) -> ExportInfo {
        let config = &self.config;
        ExportInfo {
            name: config.name.clone(),
            description: config.description.clone(),
            sectors: config.sectors,
            read_only: config.read_only,
            preferred_block_size: u32::try_from(self.block_bytes()).unwrap_or(u32::MAX),
            trim: config.trim,
            write_zeroes: config.write_zeroes,
            fast_zero: config.fast_zero,
            multi_conn: true,
        }
    }
}
