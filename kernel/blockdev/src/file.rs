//! A disk image file on the host (offline mode, benchmarks, tool interoperability).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::string::String;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::thread::{self, JoinHandle};

use alloc::collections::VecDeque;
use rustix::fs::{FallocateFlags, fallocate};

use crate::{BlockDevice, Busy, Command, Completion, DeviceInfo, IoError, Request, SECTOR_SIZE};

/// How a disk makes its file's written data durable (`fdatasync`; tests hold it).
type SyncFn = Arc<dyn Fn(&File) -> io::Result<()> + Send + Sync>;

/// A file used as a disk. Reads, writes and discards run when submitted and their
/// completions are queued, so the file behaves like any other [`BlockDevice`]. Syncs
/// (`fdatasync`) run on a thread of the disk's own, so the caller goes on submitting
/// and completing other requests meanwhile: a flush, and a FUA write once written,
/// wait for the next sync, which starts at a poll when none is running and covers
/// every one waiting (a queue of FUA writes costs one sync, not one each). A sync
/// begun after a request was submitted covers every write that had completed by then.
pub struct FileDisk {
    file: File,
    info: DeviceInfo,
    sync: SyncFn,
    done: VecDeque<Completion>,
    /// Flushes and written FUA writes waiting for a sync to start.
    unsynced: VecDeque<Completion>,
    /// Those the running sync covers (empty when none runs).
    syncing: VecDeque<Completion>,
    /// Started with the first sync.
    syncer: Option<Syncer>,
}

impl FileDisk {
    /// Opens an existing image; its size (rounded down to whole sectors) is the disk's.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let sectors = file.metadata()?.len() / SECTOR_SIZE as u64;
        let model = String::from("disk image file");
        let serial = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let info = DeviceInfo {
            sectors,
            read_only,
            discard: !read_only,
            max_transfer_sectors: 1 << 16,
            queue_depth: 128,
            model,
            serial,
        };
        Ok(FileDisk {
            file,
            info,
            sync: Arc::new(File::sync_data),
            done: VecDeque::new(),
            unsynced: VecDeque::new(),
            syncing: VecDeque::new(),
            syncer: None,
        })
    }

    /// Creates (or truncates) a sparse image of `bytes` bytes.
    pub fn create(path: &Path, bytes: u64) -> io::Result<Self> {
        let file = File::create(path)?;
        file.set_len(bytes)?;
        drop(file);
        Self::open(path, false)
    }

    fn execute(&self, command: &mut Command) -> Result<(), IoError> {
        command.validate(&self.info)?;
        let result = match command {
            Command::Read { sector, buf } => {
                self.file.read_exact_at(buf, *sector * SECTOR_SIZE as u64)
            }
            Command::Write { sector, buf, .. } => {
                self.file.write_all_at(buf, *sector * SECTOR_SIZE as u64)
            }
            Command::Flush => Ok(()),
            Command::Discard { sector, sectors } => punch_hole(
                &self.file,
                *sector * SECTOR_SIZE as u64,
                *sectors * SECTOR_SIZE as u64,
            ),
        };
        result.map_err(|_| IoError::Device("host file I/O failed"))
    }

    /// Completes what the running sync covers once it has finished.
    fn reap_sync(&mut self) {
        let Some(syncer) = &self.syncer else { return };
        if self.syncing.is_empty() {
            return;
        }
        let result = match syncer.results.try_recv() {
            Ok(result) => result.map_err(|_| IoError::Device("host file sync failed")),
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Disconnected) => Err(IoError::Device("the sync thread stopped")),
        };
        for mut completion in self.syncing.drain(..) {
            completion.result = result;
            self.done.push_back(completion);
        }
    }

    /// Starts a sync for the waiting requests unless one runs.
    fn start_sync(&mut self) {
        if !self.syncing.is_empty() || self.unsynced.is_empty() {
            return;
        }
        self.syncing = core::mem::take(&mut self.unsynced);
        if self.syncer.is_none() {
            self.syncer = Syncer::start(&self.file, Arc::clone(&self.sync)).ok();
        }
        let started = self.syncer.as_ref().is_some_and(|syncer| {
            syncer
                .requests
                .as_ref()
                .is_some_and(|tx| tx.send(()).is_ok())
        });
        if !started {
            for mut completion in self.syncing.drain(..) {
                completion.result = Err(IoError::Device("the sync thread cannot run"));
                self.done.push_back(completion);
            }
        }
    }
}

/// The thread running a disk's syncs, one at a time, each when asked; it ends (and
/// is joined) when the disk is dropped.
struct Syncer {
    /// Closed first on drop, which ends the thread.
    requests: Option<Sender<()>>,
    results: Receiver<io::Result<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    fn start(file: &File, sync: SyncFn) -> io::Result<Syncer> {
        let file = file.try_clone()?;
        let (requests, asked) = channel::<()>();
        let (finished, results) = channel();
        let thread = thread::Builder::new()
            .name(String::from("disk sync"))
            .spawn(move || {
                for () in asked {
                    if finished.send(sync(&file)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Syncer {
            requests: Some(requests),
            results,
            thread: Some(thread),
        })
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Deallocates a byte range of the file, keeping its size; it then reads as zeros.
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(io::Error::from)
}

impl BlockDevice for FileDisk {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, request: Request) -> Result<(), Busy> {
        if self.in_flight() >= usize::from(self.info.queue_depth) {
            return Err(Busy(request));
        }
        let Request { tag, mut command } = request;
        let result = self.execute(&mut command);
        let needs_sync = matches!(command, Command::Flush | Command::Write { fua: true, .. });
        let completion = Completion {
            tag,
            result,
            buf: command.into_buf(),
        };
        if needs_sync && completion.result.is_ok() {
            self.unsynced.push_back(completion);
        } else {
            self.done.push_back(completion);
        }
        Ok(())
    }

    fn poll(&mut self) -> Option<Completion> {
        self.reap_sync();
        self.start_sync();
        self.done.pop_front()
    }

    fn in_flight(&self) -> usize {
        self.done.len() + self.unsynced.len() + self.syncing.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IoBuf, run_sync};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;
    use std::vec::Vec;
    use std::format;

    /// Syncs that wait until the test releases them (ten seconds at most, so a
    /// failing test does not hang), counting those begun.
    #[derive(Default)]
    struct Gate {
        released: Mutex<bool>,
        turned: Condvar,
        begun: AtomicUsize,
        fails: bool,
    }

    impl Gate {
        fn held(fails: bool) -> Arc<Gate> {
            Arc::new(Gate {
                fails,
                ..Gate::default()
            })
        }

        fn open() -> Arc<Gate> {
            let gate = Gate::held(false);
            gate.release();
            gate
        }

        fn sync(self: &Arc<Self>) -> SyncFn {
            let gate = Arc::clone(self);
            Arc::new(move |file: &File| {
                gate.begun.fetch_add(1, Ordering::SeqCst);
                let released = gate.released.lock().unwrap();
                let (released, _) = gate
                    .turned
                    .wait_timeout_while(released, Duration::from_secs(10), |r| !*r)
                    .unwrap();
                drop(released);
                if gate.fails {
                    return Err(io::Error::other("the sync failed"));
                }
                file.sync_data()
            })
        }

        fn release(&self) {
            *self.released.lock().unwrap() = true;
            self.turned.notify_all();
        }

        fn begun(&self) -> usize {
            self.begun.load(Ordering::SeqCst)
        }

        /// Waits until `count` syncs have begun.
        fn wait_begun(&self, count: usize) {
            for _ in 0..10_000 {
                if self.begun() >= count {
                    return;
                }
                thread::sleep(Duration::from_millis(1));
            }
            panic!("{count} syncs did not begin");
        }
    }

    /// A 1 MiB disk in a fresh directory (removed by the caller), its syncs through
    /// `gate`.
    fn disk(name: &str, gate: &Arc<Gate>) -> (FileDisk, PathBuf) {
        let dir = std::env::temp_dir().join(format!("blockdev-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut disk = FileDisk::create(&dir.join("disk.img"), 1 << 20).unwrap();
        disk.sync = gate.sync();
        (disk, dir)
    }

    fn write(tag: u64, fua: bool) -> Request {
        let command = Command::Write {
            sector: tag * 8,
            buf: IoBuf::from_slice(&[tag as u8; 4096]),
            fua,
        };
        Request { tag, command }
    }

    fn flush(tag: u64) -> Request {
        Request {
            tag,
            command: Command::Flush,
        }
    }

    /// Tags and outcomes of the completions ready now.
    fn ready(disk: &mut FileDisk) -> Vec<(u64, bool)> {
        core::iter::from_fn(|| disk.poll().map(|c| (c.tag, c.result.is_ok()))).collect()
    }

    /// Tags and outcomes of every completion, until nothing is in flight.
    fn until_idle(disk: &mut FileDisk) -> Vec<(u64, bool)> {
        let mut all = Vec::new();
        while disk.in_flight() > 0 {
            match disk.poll() {
                Some(c) => all.push((c.tag, c.result.is_ok())),
                None => thread::yield_now(),
            }
        }
        all
    }

    #[test]
    fn queued_fua_writes_complete_together_after_the_plain_ones() {
        let gate = Gate::open();
        let (mut disk, dir) = disk("fua", &gate);
        for (tag, fua) in [(1, true), (2, false), (3, true)] {
            disk.submit(write(tag, fua)).unwrap();
        }
        assert_eq!(disk.in_flight(), 3);
        assert_eq!(until_idle(&mut disk), [(2, true), (1, true), (3, true)]);
        assert_eq!(gate.begun(), 1, "one sync for both FUA writes");
        let back = std::fs::read(dir.join("disk.img")).unwrap();
        assert!(back[3 * 4096..4 * 4096].iter().all(|&b| b == 3));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_and_writes_complete_while_a_flush_syncs() {
        let gate = Gate::held(false);
        let (mut disk, dir) = disk("flush-overlap", &gate);
        disk.submit(write(1, false)).unwrap();
        disk.submit(flush(2)).unwrap();
        assert_eq!(ready(&mut disk), [(1, true)]);
        gate.wait_begun(1);
        disk.submit(write(3, false)).unwrap();
        let read = Command::Read {
            sector: 8,
            buf: IoBuf::with_sectors(8),
        };
        disk.submit(Request {
            tag: 4,
            command: read,
        })
        .unwrap();
        let mut got = Vec::new();
        while let Some(c) = disk.poll() {
            assert!(c.result.is_ok());
            if c.tag == 4 {
                assert!(c.buf.iter().all(|&b| b == 1), "the read sees write 1");
            }
            got.push(c.tag);
        }
        assert_eq!(got, [3, 4]);
        assert_eq!(disk.in_flight(), 1, "the flush is still syncing");
        gate.release();
        assert_eq!(until_idle(&mut disk), [(2, true)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn flushes_complete_in_order_each_after_a_sync_begun_after_it() {
        let gate = Gate::held(false);
        let (mut disk, dir) = disk("flush-order", &gate);
        disk.submit(flush(1)).unwrap();
        assert_eq!(ready(&mut disk), []);
        gate.wait_begun(1);
        // Written after that sync began: the second flush needs a sync of its own.
        disk.submit(write(2, false)).unwrap();
        disk.submit(flush(3)).unwrap();
        assert_eq!(ready(&mut disk), [(2, true)]);
        assert_eq!(disk.in_flight(), 2);
        assert_eq!(gate.begun(), 1);
        gate.release();
        assert_eq!(until_idle(&mut disk), [(1, true), (3, true)]);
        assert_eq!(gate.begun(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fua_write_completes_only_after_a_sync_begun_after_it() {
        let gate = Gate::held(false);
        let (mut disk, dir) = disk("fua-held", &gate);
        disk.submit(write(1, true)).unwrap();
        assert_eq!(ready(&mut disk), []);
        gate.wait_begun(1);
        disk.submit(write(2, true)).unwrap();
        for _ in 0..1000 {
            assert!(
                disk.poll().is_none(),
                "a FUA write completed before its sync"
            );
        }
        assert_eq!(disk.in_flight(), 2);
        assert_eq!(
            gate.begun(),
            1,
            "the second waits for the first sync to end"
        );
        gate.release();
        assert_eq!(until_idle(&mut disk), [(1, true), (2, true)]);
        assert_eq!(gate.begun(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_sync_fails_the_requests_it_covers_only() {
        let gate = Gate::held(true);
        gate.release();
        let (mut disk, dir) = disk("sync-error", &gate);
        disk.submit(write(1, false)).unwrap();
        disk.submit(write(2, true)).unwrap();
        disk.submit(flush(3)).unwrap();
        assert_eq!(until_idle(&mut disk), [(1, true), (2, false), (3, false)]);
        disk.submit(write(4, false)).unwrap();
        assert_eq!(until_idle(&mut disk), [(4, true)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn syncing_requests_count_against_the_queue_depth() {
        let gate = Gate::held(false);
        let (mut disk, dir) = disk("depth", &gate);
        let depth = u64::from(disk.info().queue_depth);
        for tag in 0..depth {
            disk.submit(flush(tag)).unwrap();
        }
        assert_eq!(ready(&mut disk), []);
        gate.wait_begun(1);
        assert_eq!(disk.in_flight() as u64, depth);
        assert!(disk.submit(flush(depth)).is_err(), "the queue is full");
        gate.release();
        let all = until_idle(&mut disk);
        assert_eq!(all, (0..depth).map(|tag| (tag, true)).collect::<Vec<_>>());
        assert_eq!(gate.begun(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_round_trip_and_hole_punch() {
        let dir = std::env::temp_dir().join(format!("blockdev-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        let mut disk = FileDisk::create(&path, 1 << 20).unwrap();
        assert_eq!(disk.info().sectors, 2048);
        let buf = IoBuf::from_slice(&[0x5a; 4096]);
        run_sync(
            &mut disk,
            Command::Write {
                sector: 8,
                buf,
                fua: true,
            },
        )
        .unwrap();
        run_sync(&mut disk, Command::Flush).unwrap();
        let back = run_sync(
            &mut disk,
            Command::Read {
                sector: 8,
                buf: IoBuf::with_sectors(8),
            },
        )
        .unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
        run_sync(
            &mut disk,
            Command::Discard {
                sector: 8,
                sectors: 8,
            },
        )
        .unwrap();
        let back = run_sync(
            &mut disk,
            Command::Read {
                sector: 8,
                buf: IoBuf::with_sectors(8),
            },
        )
        .unwrap();
        assert!(back.iter().all(|&b| b == 0));
        let past_end = Command::Read {
            sector: 2047,
            buf: IoBuf::with_sectors(2),
        };
        assert_eq!(
            run_sync(&mut disk, past_end).unwrap_err(),
            IoError::OutOfRange
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
