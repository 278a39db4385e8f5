//! A disk image file on the host (offline mode, benchmarks, tool interoperability).

use std::boxed::Box;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::string::String;
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::vec::Vec;

use alloc::collections::VecDeque;
use rustix::fs::{FallocateFlags, fallocate};

use crate::{BlockDevice, Busy, Command, Completion, DeviceInfo, IoError, Request, SECTOR_SIZE};

/// How a disk makes its file's written data durable (`fdatasync`; tests hold it).
type SyncFn = Arc<dyn Fn(&File) -> io::Result<()> + Send + Sync>;

/// What a disk's sync threads call when a sync has ended, so that a caller sleeping
/// between polls (the NBD server's thread) looks at once; set at most once, also
/// after the disk was handed over.
pub type SyncWake = Arc<OnceLock<Box<dyn Fn() + Send + Sync>>>;

/// Syncs of one disk that may run at once. With one, requests arriving while a sync
/// runs wait for it to end and then for their own, about two syncs' time; with two,
/// about one (served FUA writes kept 16 in flight, the server polling every
/// millisecond: 7,811–8,658 IOPS against 6,982–7,412 in the same minutes).
const SYNCS: usize = 2;

/// A file used as a disk. Reads, writes and discards run when submitted and their
/// completions are queued, so the file behaves like any other [`BlockDevice`]. Syncs
/// (`fdatasync`) run on threads of the disk's own, so the caller goes on submitting
/// and completing other requests meanwhile: a flush, and a FUA write once written,
/// wait for a sync, which starts at a poll while fewer than [`SYNCS`] run and covers
/// every one waiting (a queue of FUA writes costs one sync, not one each). A sync
/// begun after a request was submitted covers every write that had completed by then.
/// Syncs complete their requests in the order they began.
pub struct FileDisk {
    file: File,
    info: DeviceInfo,
    sync: SyncFn,
    wake: SyncWake,
    done: VecDeque<Completion>,
    /// Flushes and written FUA writes waiting for a sync to start.
    unsynced: VecDeque<Completion>,
    /// The requests of each running sync, by the sync's number, oldest first.
    syncing: VecDeque<(u64, Vec<Completion>)>,
    /// Results of syncs that ended before an older one did.
    ended: Vec<(u64, io::Result<()>)>,
    next_sync: u64,
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
            wake: SyncWake::default(),
            done: VecDeque::new(),
            unsynced: VecDeque::new(),
            syncing: VecDeque::new(),
            ended: Vec::new(),
            next_sync: 0,
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

    /// Has the sync threads call `wake` (once it is set) whenever a sync ends.
    pub fn wake_with(&mut self, wake: SyncWake) {
        self.wake = wake;
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

    /// Completes the requests of the syncs that have ended, oldest first.
    fn reap_syncs(&mut self) {
        let Some(syncer) = &self.syncer else { return };
        loop {
            match syncer.results.try_recv() {
                Ok(result) => self.ended.push(result),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let stopped = Err(IoError::Device("the sync threads stopped"));
                    for (_, group) in self.syncing.drain(..) {
                        complete(&mut self.done, group, stopped);
                    }
                    return;
                }
            }
        }
        while let Some(&(oldest, _)) = self.syncing.front() {
            let Some(index) = self.ended.iter().position(|&(sync, _)| sync == oldest) else {
                break;
            };
            let (_, result) = self.ended.swap_remove(index);
            let result = result.map_err(|_| IoError::Device("host file sync failed"));
            if let Some((_, group)) = self.syncing.pop_front() {
                complete(&mut self.done, group, result);
            }
        }
    }

    /// Starts a sync for the waiting requests unless [`SYNCS`] run.
    fn start_sync(&mut self) {
        if self.unsynced.is_empty() || self.syncing.len() >= SYNCS {
            return;
        }
        let group: Vec<Completion> = self.unsynced.drain(..).collect();
        if self.syncer.is_none() {
            self.syncer = Syncer::start(&self.file, &self.sync, &self.wake).ok();
        }
        let number = self.next_sync;
        self.next_sync += 1;
        let asked = self.syncer.as_ref().is_some_and(|syncer| {
            syncer
                .requests
                .as_ref()
                .is_some_and(|requests| requests.send(number).is_ok())
        });
        if asked {
            self.syncing.push_back((number, group));
        } else {
            let failed = Err(IoError::Device("the sync threads cannot run"));
            complete(&mut self.done, group, failed);
        }
    }
}

/// Queues `group`'s completions with `result`.
fn complete(done: &mut VecDeque<Completion>, group: Vec<Completion>, result: Result<(), IoError>) {
    for mut completion in group {
        completion.result = result;
        done.push_back(completion);
    }
}

/// The [`SYNCS`] threads running a disk's syncs, each sync when asked (by number,
/// answered with that number); they end (and are joined) when the disk is dropped.
struct Syncer {
    /// Closed first on drop, which ends the threads.
    requests: Option<Sender<u64>>,
    results: Receiver<(u64, io::Result<()>)>,
    threads: Vec<JoinHandle<()>>,
}

impl Syncer {
    fn start(file: &File, sync: &SyncFn, wake: &SyncWake) -> io::Result<Syncer> {
        let (requests, asked) = channel::<u64>();
        let asked = Arc::new(Mutex::new(asked));
        let (ended, results) = channel();
        let mut syncer = Syncer {
            requests: Some(requests),
            results,
            threads: Vec::new(),
        };
        for _ in 0..SYNCS {
            let (file, sync, wake) = (file.try_clone()?, Arc::clone(sync), Arc::clone(wake));
            let (asked, ended) = (Arc::clone(&asked), ended.clone());
            let thread = thread::Builder::new()
                .name(String::from("disk sync"))
                .spawn(move || {
                    loop {
                        let Ok(number) = asked
                            .lock()
                            .map_err(drop)
                            .and_then(|a| a.recv().map_err(drop))
                        else {
                            return;
                        };
                        if ended.send((number, sync(&file))).is_err() {
                            return;
                        }
                        if let Some(wake) = wake.get() {
                            wake();
                        }
                    }
                })?;
            syncer.threads.push(thread);
        }
        Ok(syncer)
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        drop(self.requests.take());
        for thread in self.threads.drain(..) {
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
        self.reap_syncs();
        self.start_sync();
        self.done.pop_front()
    }

    fn in_flight(&self) -> usize {
        let syncing: usize = self.syncing.iter().map(|(_, group)| group.len()).sum();
        self.done.len() + self.unsynced.len() + syncing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IoBuf, run_sync};
    use std::format;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;
    use std::vec::Vec;

    /// Syncs, numbered from 0 in the order they begin, that wait until the test
    /// releases them (ten seconds at most, so a failing test does not hang).
    #[derive(Default)]
    struct Gate {
        /// Whether all are released, and which are.
        released: Mutex<(bool, Vec<usize>)>,
        turned: Condvar,
        begun: AtomicUsize,
        ended: AtomicUsize,
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
            gate.release_all();
            gate
        }

        fn sync(self: &Arc<Self>) -> SyncFn {
            let gate = Arc::clone(self);
            Arc::new(move |file: &File| {
                let number = gate.begun.fetch_add(1, Ordering::SeqCst);
                let released = gate.released.lock().unwrap();
                let wait = Duration::from_secs(10);
                let held = |(all, some): &mut (bool, Vec<usize>)| !*all && !some.contains(&number);
                drop(
                    gate.turned
                        .wait_timeout_while(released, wait, held)
                        .unwrap(),
                );
                let result = if gate.fails {
                    Err(io::Error::other("the sync failed"))
                } else {
                    file.sync_data()
                };
                gate.ended.fetch_add(1, Ordering::SeqCst);
                result
            })
        }

        fn release(&self, number: usize) {
            self.released.lock().unwrap().1.push(number);
            self.turned.notify_all();
        }

        fn release_all(&self) {
            self.released.lock().unwrap().0 = true;
            self.turned.notify_all();
        }

        fn begun(&self) -> usize {
            self.begun.load(Ordering::SeqCst)
        }

        /// Waits until `count` syncs have begun, or ended.
        fn wait(&self, count: usize, ended: bool) {
            let counter = if ended { &self.ended } else { &self.begun };
            for _ in 0..10_000 {
                if counter.load(Ordering::SeqCst) >= count {
                    return;
                }
                thread::sleep(Duration::from_millis(1));
            }
            panic!("{count} syncs did not begin or end");
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
        gate.wait(1, false);
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
        gate.release_all();
        assert_eq!(until_idle(&mut disk), [(2, true)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn flushes_complete_in_order_each_after_a_sync_begun_after_it() {
        let gate = Gate::held(false);
        let (mut disk, dir) = disk("flush-order", &gate);
        disk.submit(flush(1)).unwrap();
        assert_eq!(ready(&mut disk), []);
        gate.wait(1, false);
        // Written after that sync began: the second flush needs a sync of its own.
        disk.submit(write(2, false)).unwrap();
        disk.submit(flush(3)).unwrap();
        assert_eq!(ready(&mut disk), [(2, true)]);
        gate.wait(2, false);
        // The second sync ends first; its flush still completes after the first's.
        gate.release(1);
        gate.wait(1, true);
        for _ in 0..1000 {
            assert!(disk.poll().is_none(), "a flush overtook an older one");
        }
        assert_eq!(disk.in_flight(), 2);
        gate.release(0);
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
        gate.wait(1, false);
        disk.submit(write(2, true)).unwrap();
        assert_eq!(ready(&mut disk), []);
        gate.wait(2, false);
        // Two syncs run: the third write waits for one of them to end, then its own.
        disk.submit(write(3, true)).unwrap();
        for _ in 0..1000 {
            assert!(
                disk.poll().is_none(),
                "a FUA write completed before its sync"
            );
        }
        assert_eq!(disk.in_flight(), 3);
        assert_eq!(gate.begun(), 2);
        gate.release_all();
        assert_eq!(until_idle(&mut disk), [(1, true), (2, true), (3, true)]);
        assert_eq!(gate.begun(), 3);
        let back = std::fs::read(dir.join("disk.img")).unwrap();
        assert!(back[3 * 4096..4 * 4096].iter().all(|&b| b == 3));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_sync_fails_the_requests_it_covers_only() {
        let gate = Gate::held(true);
        gate.release_all();
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
        gate.wait(1, false);
        assert_eq!(disk.in_flight() as u64, depth);
        assert!(disk.submit(flush(depth)).is_err(), "the queue is full");
        gate.release_all();
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
