//! NVMe disks: one block device per namespace, each with its own I/O queue pair
//! so namespaces never contend for a queue.
//!
//! Written here rather than taken from the `nvme-driver` crate, which lacks
//! Dataset Management (discard) and brings its own DMA and block-device
//! frameworks. Completions are found by polling the completion queue's phase bit;
//! every slot owns a PRP-list page for transfers longer than two pages (and for
//! discard range lists), and its request's buffer until the completion.
//!
//! The CPU may halt while requests are on a namespace: the I/O completion queues
//! interrupt through MSI-X entry 0 to the disks' vector, and the entry is unmasked
//! only from [`BlockDevice::arm_wakeup`] to the next poll, so a busy loop is not
//! interrupted. A completion posted while the entry was masked is held by the
//! controller and sent at the unmask, so none is missed.
//!
//! A controller with a single namespace can be reset (`disk-reset`): disabled, its
//! requests failed, enabled with its queues set up again from the start. One that
//! serves several namespaces is not, since the reset drops every namespace's queue.
//!
//! Namespaces formatted with 4 KiB blocks are driven too; reads and writes there
//! must cover whole blocks (others fail with a device error), discards are
//! shrunk to whole blocks.

use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{
    BlockDevice, Busy, Command, Completion, DeviceInfo, ErrorCounts, IoBuf, IoError, Request,
};
use core::cell::RefCell;

use crate::arch::{clock, interrupts};
use crate::dma::DmaBuffer;
use crate::memory::{self, FRAME_SIZE};
use crate::mmio::Mmio;
use crate::pci::{MsixEntry, Pci, PciFunction};

const REG_CAP: usize = 0x00;
const REG_CC: usize = 0x14;
const REG_CSTS: usize = 0x1c;
const REG_AQA: usize = 0x24;
const REG_ASQ: usize = 0x28;
const REG_ACQ: usize = 0x30;
const DOORBELLS: usize = 0x1000;

const CC_ENABLE: u32 = 1;
/// 64-byte submission and 16-byte completion entries, 4 KiB pages, NVM commands.
const CC_CONFIG: u32 = (6 << 16) | (4 << 20);
const CSTS_READY: u32 = 1;
const CSTS_FATAL: u32 = 2;

const ADMIN_CREATE_SQ: u32 = 0x01;
const ADMIN_CREATE_CQ: u32 = 0x05;
const ADMIN_IDENTIFY: u32 = 0x06;
const ADMIN_SET_FEATURES: u32 = 0x09;
const FEATURE_QUEUE_COUNT: u32 = 0x07;
const IO_FLUSH: u32 = 0x00;
const IO_WRITE: u32 = 0x01;
const IO_READ: u32 = 0x02;
const IO_DATASET_MANAGEMENT: u32 = 0x09;

/// Entries per queue: one page of submission entries.
const QUEUE_ENTRIES: u16 = 64;
const SQ_ENTRY: usize = 64;
const CQ_ENTRY: usize = 16;
/// Create I/O Completion Queue flags: physically contiguous, and interrupts on
/// (vector 0, in the upper half of the dword).
const CQ_CONTIGUOUS: u32 = 1;
const CQ_INTERRUPTS: u32 = 2;
/// Longest transfer one PRP-list page can describe (first page + 511 entries).
const MAX_PRP_BYTES: usize = 512 * FRAME_SIZE;
/// Ranges in one Dataset Management command.
const MAX_DSM_RANGES: usize = 256;
const ADMIN_TIMEOUT_NS: u64 = 5_000_000_000;
/// Namespaces (I/O queue pairs) driven per controller.
const MAX_NAMESPACES: usize = 16;

/// A submission/completion queue pair and its doorbells.
struct QueuePair {
    id: u16,
    regs: Mmio,
    doorbell_stride: usize,
    sq: DmaBuffer,
    cq: DmaBuffer,
    entries: u16,
    sq_tail: u16,
    cq_head: u16,
    phase: bool,
}

/// One completion queue entry.
struct CqEntry {
    command_id: u16,
    status: u16,
    result: u32,
}

impl QueuePair {
    fn new(regs: &Mmio, doorbell_stride: usize, id: u16, entries: u16) -> Option<Self> {
        Some(QueuePair {
            id,
            regs: regs.clone(),
            doorbell_stride,
            sq: DmaBuffer::new((usize::from(entries) * SQ_ENTRY).div_ceil(FRAME_SIZE))?,
            cq: DmaBuffer::new((usize::from(entries) * CQ_ENTRY).div_ceil(FRAME_SIZE))?,
            entries,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
        })
    }

    /// Queues a command and rings the doorbell. The caller keeps fewer than
    /// `entries` commands outstanding.
    fn submit(&mut self, command: &[u32; 16]) {
        let base = usize::from(self.sq_tail) * SQ_ENTRY;
        for (i, word) in command.iter().enumerate() {
            self.sq.write_u32(base + 4 * i, *word);
        }
        self.sq_tail = (self.sq_tail + 1) % self.entries;
        let doorbell = DOORBELLS + 2 * usize::from(self.id) * self.doorbell_stride;
        self.regs.write_u32(doorbell, u32::from(self.sq_tail));
    }

    /// The status field of the completion at the head, if the device has posted
    /// one there (its phase bit is the current phase).
    fn posted_status(&self) -> Option<u16> {
        let status = self.cq.read_u16(usize::from(self.cq_head) * CQ_ENTRY + 14);
        ((status & 1 != 0) == self.phase).then_some(status)
    }

    /// Whether the device has posted a completion not yet taken.
    fn has_completion(&self) -> bool {
        self.posted_status().is_some()
    }

    /// The next completion, if the device has posted one.
    fn next_completion(&mut self) -> Option<CqEntry> {
        let status = self.posted_status()?;
        let base = usize::from(self.cq_head) * CQ_ENTRY;
        let entry = CqEntry {
            command_id: self.cq.read_u16(base + 12),
            status: status >> 1,
            result: self.cq.read_u32(base),
        };
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        Some(entry)
    }

    /// Starts the queue over empty, for a controller that was reset (which forgets
    /// its queues): old completion entries are cleared so their phase bits do not
    /// pass for new ones.
    fn rewind(&mut self) {
        for offset in (0..self.cq.len()).step_by(8) {
            self.cq.write_u64(offset, 0);
        }
        self.sq_tail = 0;
        self.cq_head = 0;
        self.phase = true;
    }

    /// Tells the device which completion entries it may reuse.
    fn release_completions(&self) {
        let doorbell = DOORBELLS + (2 * usize::from(self.id) + 1) * self.doorbell_stride;
        self.regs.write_u32(doorbell, u32::from(self.cq_head));
    }
}

/// A 64-byte submission entry.
fn sq_entry(opcode: u32, command_id: u16, nsid: u32, prp: (u64, u64), cdw: [u32; 6]) -> [u32; 16] {
    let mut entry = [0u32; 16];
    entry[0] = opcode | u32::from(command_id) << 16;
    entry[1] = nsid;
    entry[6] = prp.0 as u32;
    entry[7] = (prp.0 >> 32) as u32;
    entry[8] = prp.1 as u32;
    entry[9] = (prp.1 >> 32) as u32;
    entry[10..16].copy_from_slice(&cdw);
    entry
}

fn status_result(status: u16) -> Result<(), IoError> {
    let code = status & 0xff;
    let code_type = (status >> 8) & 0x7;
    match (code_type, code) {
        (0, 0) => Ok(()),
        (0, 0x01) => Err(IoError::Unsupported),
        (0, 0x20) => Err(IoError::ReadOnly),
        (0, 0x80) => Err(IoError::OutOfRange),
        (2, _) => Err(IoError::Device("NVMe media or data integrity error")),
        _ => Err(IoError::Device("NVMe command failed")),
    }
}

/// The controller's registers and admin queue, used during setup and kept (with
/// the admin queue the controller still points at) while namespaces are in use.
struct Controller {
    regs: Mmio,
    admin: QueuePair,
    /// How long the controller may take to change its ready state (`CAP.TO`).
    ready_timeout_ns: u64,
    /// MSI-X entry 0, which the I/O completion queues interrupt through; `None`
    /// when the controller has no MSI-X (its queues are then only polled).
    wakeup: Option<MsixEntry>,
    /// The entry is unmasked: a namespace armed it for a halt.
    armed: bool,
}

impl Controller {
    /// Clears `CC.EN` and waits until the controller is no longer ready: it has
    /// dropped every queue and no longer touches their memory.
    fn disable(&mut self) -> Result<(), &'static str> {
        self.regs
            .write_u32(REG_CC, self.regs.read_u32(REG_CC) & !CC_ENABLE);
        self.wait_ready(false, self.ready_timeout_ns)
    }

    /// Gives a disabled controller its admin queue, from the start, and enables it.
    fn enable(&mut self) -> Result<(), &'static str> {
        self.admin.rewind();
        let last = u32::from(self.admin.entries - 1);
        self.regs.write_u32(REG_AQA, last << 16 | last);
        self.regs.write_u64(REG_ASQ, self.admin.sq.phys());
        self.regs.write_u64(REG_ACQ, self.admin.cq.phys());
        self.regs.write_u32(REG_CC, CC_CONFIG | CC_ENABLE);
        self.wait_ready(true, self.ready_timeout_ns)
    }

    /// Creates I/O queue pair `queue` (completion queue first), interrupting
    /// through MSI-X entry 0 if the controller has one.
    fn create_io_queue(&mut self, queue: &QueuePair) -> Result<(), &'static str> {
        let size_field = u32::from(queue.entries - 1) << 16 | u32::from(queue.id);
        let cq_flags = match self.wakeup {
            Some(_) => CQ_CONTIGUOUS | CQ_INTERRUPTS,
            None => CQ_CONTIGUOUS,
        };
        let sq_flags = u32::from(queue.id) << 16 | 1; // completes on its CQ, contiguous
        self.admin(
            ADMIN_CREATE_CQ,
            0,
            queue.cq.phys(),
            [size_field, cq_flags, 0, 0, 0, 0],
        )?;
        self.admin(
            ADMIN_CREATE_SQ,
            0,
            queue.sq.phys(),
            [size_field, sq_flags, 0, 0, 0, 0],
        )
        .map(drop)
    }

    fn wait_ready(&self, ready: bool, timeout_ns: u64) -> Result<(), &'static str> {
        let deadline = clock::now_ns() + timeout_ns;
        loop {
            let status = self.regs.read_u32(REG_CSTS);
            // A controller with a fatal status is recovered by disabling it.
            if ready && status & CSTS_FATAL != 0 {
                return Err("NVMe controller reported a fatal status");
            }
            if (status & CSTS_READY != 0) == ready {
                return Ok(());
            }
            if clock::now_ns() > deadline {
                return Err("NVMe controller did not change its ready state in time");
            }
            core::hint::spin_loop();
        }
    }

    /// Runs an admin command to completion; returns its result dword.
    fn admin(
        &mut self,
        opcode: u32,
        nsid: u32,
        prp1: u64,
        cdw: [u32; 6],
    ) -> Result<u32, &'static str> {
        self.admin
            .submit(&sq_entry(opcode, 0, nsid, (prp1, 0), cdw));
        let deadline = clock::now_ns() + ADMIN_TIMEOUT_NS;
        loop {
            if let Some(entry) = self.admin.next_completion() {
                self.admin.release_completions();
                return match status_result(entry.status) {
                    Ok(()) => Ok(entry.result),
                    Err(_) => Err("NVMe admin command failed"),
                };
            }
            if clock::now_ns() > deadline {
                return Err("NVMe admin command timed out");
            }
            core::hint::spin_loop();
        }
    }

    /// Masks the interrupt entry again after a halt.
    fn disarm(&mut self) {
        if self.armed {
            self.armed = false;
            if let Some(entry) = &self.wakeup {
                entry.set_masked(true);
            }
        }
    }

    fn identify(&mut self, cns: u32, nsid: u32, page: &DmaBuffer) -> Result<(), &'static str> {
        self.admin(ADMIN_IDENTIFY, nsid, page.phys(), [cns, 0, 0, 0, 0, 0])
            .map(drop)
    }
}

/// Identify-data text fields are space-padded ASCII.
fn ascii_field(page: &DmaBuffer, at: usize, len: usize) -> String {
    let mut bytes = alloc::vec![0u8; len];
    page.read_bytes(at, &mut bytes);
    String::from_utf8_lossy(&bytes).trim().into()
}

/// Sets up the controller at `function`.
pub fn probe(pci: &mut Pci, function: &PciFunction) -> Result<Probed, &'static str> {
    let (bar, size) = pci.memory_bar(function.address, 0)?;
    let size = usize::try_from(size).map_err(|_| "NVMe BAR too large")?;
    // SAFETY: BAR 0 of an NVMe controller is its register block.
    let regs = unsafe { Mmio::map(bar, size.min(0x4000)) }.ok_or("cannot map the NVMe BAR")?;
    let cap = regs.read_u64(REG_CAP);
    let max_entries = ((cap & 0xffff) + 1).min(u64::from(QUEUE_ENTRIES)) as u16;
    let doorbell_stride = 4 << ((cap >> 32) & 0xf);
    let ready_timeout_ns = ((cap >> 24) & 0xff).max(1) * 500_000_000;
    if (cap >> 48) & 0xf != 0 {
        return Err("NVMe controller does not support 4 KiB pages");
    }

    let admin =
        QueuePair::new(&regs, doorbell_stride, 0, max_entries).ok_or("DMA pool exhausted")?;
    let wakeup = interrupts::enable_disk_msi()
        .and_then(|(address, data)| pci.enable_msix(function.address, address, data));
    if let Some(entry) = &wakeup {
        entry.set_masked(true);
    }
    let mut controller = Controller {
        regs: regs.clone(),
        admin,
        ready_timeout_ns,
        wakeup,
        armed: false,
    };
    controller.disable()?;
    controller.enable()?;

    let page = DmaBuffer::new(1).ok_or("DMA pool exhausted")?;
    controller.identify(1, 0, &page)?;
    let serial = ascii_field(&page, 4, 20);
    let model = ascii_field(&page, 24, 40);
    let mdts = page.read_u8(77);
    let discard = page.read_u16(520) & (1 << 2) != 0;
    let mdts_bytes = match mdts {
        0 => MAX_PRP_BYTES,
        n => (FRAME_SIZE << n.min(20)).min(MAX_PRP_BYTES),
    };

    controller.identify(2, 0, &page)?;
    let nsids: Vec<u32> = (0..1024)
        .map(|i| page.read_u32(4 * i))
        .take_while(|&nsid| nsid != 0)
        .take(MAX_NAMESPACES)
        .collect();
    if nsids.is_empty() {
        return Ok(Probed {
            namespaces: Vec::new(),
            shutdown: ShutdownHandle(regs),
        });
    }
    let wanted = nsids.len() as u32 - 1;
    let granted = controller.admin(
        ADMIN_SET_FEATURES,
        0,
        0,
        [FEATURE_QUEUE_COUNT, wanted << 16 | wanted, 0, 0, 0, 0],
    )?;
    let queue_pairs = ((granted & 0xffff).min(granted >> 16) + 1) as usize;

    let mut prepared = Vec::new();
    for (index, &nsid) in nsids.iter().take(queue_pairs).enumerate() {
        controller.identify(0, nsid, &page)?;
        let blocks = page.read_u64(0);
        let format = usize::from(page.read_u8(26) & 0xf);
        let lba_format = page.read_u32(128 + 4 * format);
        let metadata_bytes = lba_format & 0xffff;
        let lba_shift = (lba_format >> 16) & 0xff;
        let write_protected = page.read_u8(99) & 1 != 0;
        if metadata_bytes != 0 || !(9..=12).contains(&lba_shift) {
            continue;
        }
        let qid = index as u16 + 1;
        let queue =
            QueuePair::new(&regs, doorbell_stride, qid, max_entries).ok_or("DMA pool exhausted")?;
        controller.create_io_queue(&queue)?;
        let slots = usize::from(max_entries - 1);
        let prp_pages = (0..slots)
            .map(|_| DmaBuffer::new(1))
            .collect::<Option<Vec<_>>>()
            .ok_or("DMA pool exhausted")?;
        let sectors_per_block = 1u64 << (lba_shift - 9);
        let info = DeviceInfo {
            sectors: blocks * sectors_per_block,
            read_only: write_protected,
            discard,
            max_transfer_sectors: (mdts_bytes / blockdev::SECTOR_SIZE) as u32,
            queue_depth: slots as u16,
            model: model.clone(),
            serial: serial.clone(),
        };
        prepared.push((nsid, queue, sectors_per_block, info, prp_pages));
    }
    let controller = Rc::new(RefCell::new(controller));
    let namespaces = prepared
        .into_iter()
        .map(|(nsid, queue, sectors_per_block, info, prp_pages)| {
            let slots = prp_pages.len();
            let namespace = NvmeNamespace {
                controller: Rc::clone(&controller),
                queue,
                nsid,
                sectors_per_block,
                info,
                slots: (0..slots).map(|_| None).collect(),
                free: (0..slots as u16).rev().collect(),
                prp_pages,
                done: VecDeque::new(),
                errors: ErrorCounts::default(),
                offline: false,
            };
            (nsid, namespace)
        })
        .collect();
    Ok(Probed {
        namespaces,
        shutdown: ShutdownHandle(regs),
    })
}

/// A controller that came up: its namespaces as (namespace id, device), and its
/// power-off notification.
pub struct Probed {
    pub namespaces: Vec<(u32, NvmeNamespace)>,
    pub shutdown: ShutdownHandle,
}

/// Tells a controller that power is about to go, so it saves its state and does not
/// count an unsafe shutdown (data is already durable: disks are flushed first).
pub struct ShutdownHandle(Mmio);

impl ShutdownHandle {
    /// Requests a normal shutdown and waits (at most two seconds) until the
    /// controller reports it complete.
    pub fn shutdown(&self) {
        const NOTIFY_MASK: u32 = 3 << 14;
        const NOTIFY_NORMAL: u32 = 1 << 14;
        const STATUS_MASK: u32 = 3 << 2;
        const STATUS_COMPLETE: u32 = 2 << 2;
        let regs = &self.0;
        regs.write_u32(
            REG_CC,
            (regs.read_u32(REG_CC) & !NOTIFY_MASK) | NOTIFY_NORMAL,
        );
        let deadline = clock::now_ns() + 2_000_000_000;
        while regs.read_u32(REG_CSTS) & STATUS_MASK != STATUS_COMPLETE && clock::now_ns() < deadline
        {
            core::hint::spin_loop();
        }
    }
}

/// A request the controller is working on.
struct Slot {
    tag: u64,
    command: Command,
}

/// One namespace of a controller, as a block device.
pub struct NvmeNamespace {
    /// The controller, shared by its namespaces; it still references the admin
    /// queue, which this keeps alive.
    controller: Rc<RefCell<Controller>>,
    queue: QueuePair,
    nsid: u32,
    sectors_per_block: u64,
    info: DeviceInfo,
    /// Requests in flight, indexed by command id.
    slots: Vec<Option<Slot>>,
    free: Vec<u16>,
    /// One PRP-list (or DSM range-list) page per slot.
    prp_pages: Vec<DmaBuffer>,
    done: VecDeque<Completion>,
    /// What the controller failed (requests it completed with an error status).
    errors: ErrorCounts,
    /// The controller did not come back from a reset: every request fails.
    offline: bool,
}

/// What the requests a controller held when the operator reset it fail with.
const LOST_IN_RESET: IoError =
    IoError::Device("the NVMe controller was reset before this request finished");

/// What requests to a namespace whose controller did not come back from a reset
/// fail with.
const OFFLINE: IoError =
    IoError::Device("the NVMe controller did not come back from a reset; the disk is offline");

/// Why a namespace cannot be reset on its own.
const SHARED_CONTROLLER: IoError = IoError::Device(
    "the NVMe controller serves other namespaces too, whose queues a reset would drop",
);

/// Why a controller could not be reset.
const NOT_STOPPED: IoError =
    IoError::Device("the NVMe controller did not stop; its requests are left in flight");

impl NvmeNamespace {
    fn finish(&mut self, tag: u64, result: Result<(), IoError>, buf: IoBuf) {
        self.done.push_back(Completion { tag, result, buf });
    }

    /// The submission entry for `command` using slot `id`'s list page, or why it
    /// cannot be sent; `Ok(None)` when there is nothing to send.
    fn build(&self, id: u16, command: &Command) -> Result<Option<[u32; 16]>, IoError> {
        let per_block = self.sectors_per_block;
        let page = &self.prp_pages[usize::from(id)];
        let (sector, sectors) = command.range();
        match command {
            Command::Read { buf, .. } | Command::Write { buf, .. } => {
                if buf.is_empty() {
                    return Ok(None);
                }
                if sector % per_block != 0 || sectors % per_block != 0 {
                    return Err(IoError::Device(
                        "request not aligned to the namespace's block size",
                    ));
                }
                let phys = memory::dma_address(buf.as_ptr(), buf.len())
                    .ok_or(IoError::Device("buffer is not physically contiguous"))?;
                let pages = buf.len().div_ceil(FRAME_SIZE);
                let prp2 = match pages {
                    1 => 0,
                    2 => phys + FRAME_SIZE as u64,
                    _ => {
                        for i in 1..pages {
                            page.write_u64(8 * (i - 1), phys + (i * FRAME_SIZE) as u64);
                        }
                        page.phys()
                    }
                };
                let lba = sector / per_block;
                let blocks = (sectors / per_block) as u32;
                let (opcode, fua) = match command {
                    Command::Write { fua, .. } => (IO_WRITE, *fua),
                    _ => (IO_READ, false),
                };
                let control = (blocks - 1) | u32::from(fua) << 30;
                Ok(Some(sq_entry(
                    opcode,
                    id,
                    self.nsid,
                    (phys, prp2),
                    [lba as u32, (lba >> 32) as u32, control, 0, 0, 0],
                )))
            }
            Command::Flush => Ok(Some(sq_entry(IO_FLUSH, id, self.nsid, (0, 0), [0; 6]))),
            Command::Discard { .. } => {
                // Discard is advisory: shrink to whole blocks.
                let first = sector.div_ceil(per_block);
                let end = (sector + sectors) / per_block;
                if end <= first {
                    return Ok(None);
                }
                let ranges = (end - first).div_ceil(u64::from(u32::MAX)) as usize;
                if ranges > MAX_DSM_RANGES {
                    return Err(IoError::TooLarge);
                }
                let mut at = first;
                for range in 0..ranges {
                    let len = (end - at).min(u64::from(u32::MAX));
                    page.write_u32(16 * range, 0);
                    page.write_u32(16 * range + 4, len as u32);
                    page.write_u64(16 * range + 8, at);
                    at += len;
                }
                let deallocate = 1 << 2;
                Ok(Some(sq_entry(
                    IO_DATASET_MANAGEMENT,
                    id,
                    self.nsid,
                    (page.phys(), 0),
                    [ranges as u32 - 1, deallocate, 0, 0, 0, 0],
                )))
            }
        }
    }
}

impl BlockDevice for NvmeNamespace {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        if let Err(error) = request.command.validate(&self.info) {
            self.finish(request.tag, Err(error), request.command.into_buf());
            return Ok(());
        }
        if self.offline {
            self.finish(request.tag, Err(OFFLINE), request.command.into_buf());
            return Ok(());
        }
        let Some(&id) = self.free.last() else {
            return Err(Busy(request));
        };
        let Request { tag, command } = request;
        match self.build(id, &command) {
            Ok(Some(entry)) => {
                self.free.pop();
                self.queue.submit(&entry);
                self.slots[usize::from(id)] = Some(Slot { tag, command });
            }
            Ok(None) => self.finish(tag, Ok(()), command.into_buf()),
            Err(error) => self.finish(tag, Err(error), command.into_buf()),
        }
        Ok(())
    }

    fn poll(&mut self) -> Option<Completion> {
        self.controller.borrow_mut().disarm();
        if self.done.is_empty() {
            let mut reaped = false;
            while let Some(entry) = self.queue.next_completion() {
                reaped = true;
                let id = entry.command_id;
                let Some(slot) = self.slots.get_mut(usize::from(id)).and_then(Option::take) else {
                    // No request of ours waits on it (a confused controller): the
                    // entry is skipped rather than trusted.
                    continue;
                };
                self.free.push(id);
                let result = status_result(entry.status);
                self.errors.count(&slot.command, &result);
                self.finish(slot.tag, result, slot.command.into_buf());
            }
            if reaped {
                self.queue.release_completions();
            }
        }
        self.done.pop_front()
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() + self.done.len()
    }

    fn errors(&self) -> ErrorCounts {
        self.errors
    }

    fn can_reset(&self) -> bool {
        true
    }

    fn arm_wakeup(&mut self) -> bool {
        if self.offline || !self.done.is_empty() || self.queue.has_completion() {
            return false;
        }
        let mut controller = self.controller.borrow_mut();
        let Some(entry) = &controller.wakeup else {
            return false;
        };
        entry.set_masked(false);
        controller.armed = true;
        true
    }

    /// A controller reset: disabled (its DMA stops), the requests it held fail,
    /// enabled again with the admin queue and this namespace's I/O queue set up
    /// from the start. Only a controller with this one namespace is reset.
    fn reset(&mut self) -> Result<(), IoError> {
        if self.offline {
            return Err(OFFLINE);
        }
        if Rc::strong_count(&self.controller) > 1 {
            return Err(SHARED_CONTROLLER);
        }
        let mut controller = self.controller.borrow_mut();
        controller.disable().map_err(|_| NOT_STOPPED)?;
        self.errors.resets += 1;
        for id in 0..self.slots.len() {
            if let Some(slot) = self.slots[id].take() {
                self.free.push(id as u16);
                self.errors.count(&slot.command, &Err(LOST_IN_RESET));
                self.done.push_back(Completion {
                    tag: slot.tag,
                    result: Err(LOST_IN_RESET),
                    buf: slot.command.into_buf(),
                });
            }
        }
        self.queue.rewind();
        let restarted = controller
            .enable()
            .and_then(|()| controller.create_io_queue(&self.queue));
        self.offline = restarted.is_err();
        restarted.map_err(|_| OFFLINE)
    }
}
