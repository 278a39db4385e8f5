//! [`OrderedQueue`] over a pretend device whose queue, completions, failures and
//! resets the test steers.

use super::*;
use crate::{IoBuf, SECTOR_SIZE, run_sync};
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use core::cell::RefCell;

/// Tokens of the pretend queue, and the requests it takes at once (fewer, as a
/// virtqueue's descriptors hold a third as many requests as it has tokens).
const QUEUE_SIZE: u16 = 16;
const ROOM: usize = 4;
const SECTORS: u64 = 256;

#[derive(Default)]
struct State {
    disk: Vec<u8>,
    /// Tokens on the queue, in the order they were started.
    on_queue: Vec<u16>,
    /// Tokens the device hands back next.
    used: VecDeque<u16>,
    /// The device finishes each request as soon as it is started.
    at_once: bool,
    fail_reads: bool,
    fail_flushes: bool,
    flushes: u32,
    stops: u32,
    restarts: u32,
    /// Restarts that bring the device back.
    comes_back: u32,
}

struct Pretend(Rc<RefCell<State>>);

impl Hardware for Pretend {
    type Ticket = u16;

    fn start(&mut self, command: &mut Command) -> Start<u16> {
        assert!(matches!(
            command,
            Command::Read { .. } | Command::Write { .. }
        ));
        let mut state = self.0.borrow_mut();
        if state.on_queue.len() >= ROOM {
            return Start::Full;
        }
        let token = (0..QUEUE_SIZE)
            .find(|token| !state.on_queue.contains(token))
            .unwrap();
        state.on_queue.push(token);
        if state.at_once {
            state.used.push_back(token);
        }
        Start::Queued {
            token,
            ticket: token,
        }
    }

    fn next_used(&mut self) -> Option<u16> {
        self.0.borrow_mut().used.pop_front()
    }

    fn complete(
        &mut self,
        token: u16,
        command: &mut Command,
        ticket: &mut u16,
    ) -> Result<(), IoError> {
        assert_eq!(*ticket, token, "the ticket of the token's request");
        let mut state = self.0.borrow_mut();
        state.on_queue.retain(|queued| *queued != token);
        match command {
            Command::Read { .. } if state.fail_reads => Err(IoError::Device("medium error")),
            Command::Read { sector, buf } => {
                let at = *sector as usize * SECTOR_SIZE;
                let len = buf.len();
                buf.copy_from_slice(&state.disk[at..at + len]);
                Ok(())
            }
            Command::Write { sector, buf, .. } => {
                let at = *sector as usize * SECTOR_SIZE;
                state.disk[at..at + buf.len()].copy_from_slice(buf);
                Ok(())
            }
            Command::Flush | Command::Discard { .. } => unreachable!("never started"),
        }
    }

    fn flush(&mut self) -> Result<(), IoError> {
        let mut state = self.0.borrow_mut();
        assert!(state.on_queue.is_empty(), "a flush runs on an empty queue");
        state.flushes += 1;
        if state.fail_flushes {
            return Err(IoError::Device("flush failed"));
        }
        Ok(())
    }

    fn stop(&mut self) {
        let mut state = self.0.borrow_mut();
        state.stops += 1;
        state.on_queue.clear();
        state.used.clear();
    }

    fn restart(&mut self) -> Option<u16> {
        let mut state = self.0.borrow_mut();
        state.restarts += 1;
        (state.restarts <= state.comes_back).then_some(QUEUE_SIZE)
    }
}

fn disk(at_once: bool) -> (OrderedQueue<Pretend>, Rc<RefCell<State>>) {
    let state = Rc::new(RefCell::new(State {
        disk: vec![0; SECTORS as usize * SECTOR_SIZE],
        at_once,
        comes_back: u32::MAX,
        ..State::default()
    }));
    let info = DeviceInfo {
        sectors: SECTORS,
        read_only: false,
        discard: false,
        max_transfer_sectors: 8,
        queue_depth: QUEUE_SIZE,
        model: String::from("pretend"),
        serial: String::new(),
    };
    (OrderedQueue::new(Pretend(Rc::clone(&state)), info), state)
}

fn write(sector: u64, byte: u8, fua: bool) -> Command {
    let mut buf = IoBuf::with_sectors(1);
    buf.fill(byte);
    Command::Write { sector, buf, fua }
}

fn read(sector: u64) -> Command {
    Command::Read {
        sector,
        buf: IoBuf::with_sectors(1),
    }
}

fn submit(queue: &mut OrderedQueue<Pretend>, tag: u64, command: Command) {
    assert!(queue.submit(Request { tag, command }).is_ok());
}

/// Polls, letting the device finish what it has after each empty poll, until
/// nothing is in flight; returns the completions as (tag, result) in order.
fn drain(
    queue: &mut OrderedQueue<Pretend>,
    state: &Rc<RefCell<State>>,
) -> Vec<(u64, Result<(), IoError>)> {
    let mut finished = Vec::new();
    for _ in 0..1000 {
        if queue.in_flight() == 0 {
            return finished;
        }
        match queue.poll() {
            Some(done) => finished.push((done.tag, done.result)),
            None => {
                let mut state = state.borrow_mut();
                let on_queue = state.on_queue.clone();
                state.used.extend(on_queue);
            }
        }
    }
    panic!(
        "requests never finished: {} in flight after {finished:?}",
        queue.in_flight()
    );
}

#[test]
fn a_flush_waits_for_the_writes_before_it_and_holds_back_the_ones_after() {
    let (mut queue, state) = disk(false);
    submit(&mut queue, 0, write(0, 1, false));
    submit(&mut queue, 1, write(8, 2, false));
    submit(&mut queue, 2, Command::Flush);
    submit(&mut queue, 3, write(16, 3, false));
    assert_eq!(
        state.borrow().on_queue.len(),
        2,
        "the write after the flush waits"
    );
    let order: Vec<u64> = drain(&mut queue, &state)
        .into_iter()
        .map(|(tag, result)| {
            assert_eq!(result, Ok(()));
            tag
        })
        .collect();
    assert_eq!(order, [0, 1, 2, 3]);
    assert_eq!(state.borrow().flushes, 1);
}

#[test]
fn more_requests_held_behind_a_flush_than_the_queue_takes_all_go_out() {
    let (mut queue, state) = disk(false);
    submit(&mut queue, 0, write(0, 9, false));
    submit(&mut queue, 1, Command::Flush);
    for tag in 2..14 {
        submit(&mut queue, tag, write(tag * 8, tag as u8, false));
    }
    let finished = drain(&mut queue, &state);
    assert_eq!(finished.len(), 14);
    assert!(finished.iter().all(|(_, result)| result.is_ok()));
    state.borrow_mut().at_once = true;
    for tag in 2..14 {
        let buf = run_sync(&mut queue, read(tag * 8)).unwrap();
        assert_eq!(buf[0], tag as u8);
    }
}

#[test]
fn a_fua_write_is_answered_after_its_flush_and_fails_with_it() {
    let (mut queue, state) = disk(true);
    assert_eq!(run_sync(&mut queue, write(0, 5, true)).map(drop), Ok(()));
    assert_eq!(state.borrow().flushes, 1);
    state.borrow_mut().fail_flushes = true;
    let failed = run_sync(&mut queue, write(8, 6, true)).unwrap_err();
    assert_eq!(failed, IoError::Device("flush failed"));
    assert!(run_sync(&mut queue, Command::Flush).is_err());
    assert_eq!(
        queue.errors(),
        ErrorCounts {
            writes: 1,
            flushes: 1,
            ..ErrorCounts::default()
        }
    );
}

#[test]
fn a_failed_read_fails_only_itself_and_is_counted() {
    let (mut queue, state) = disk(true);
    state.borrow_mut().fail_reads = true;
    assert_eq!(
        run_sync(&mut queue, read(0)).unwrap_err(),
        IoError::Device("medium error")
    );
    assert!(run_sync(&mut queue, write(0, 1, false)).is_ok());
    assert_eq!(
        run_sync(&mut queue, read(SECTORS)).unwrap_err(),
        IoError::OutOfRange,
        "refused before the device: not the disk's failure"
    );
    assert_eq!(
        queue.errors(),
        ErrorCounts {
            reads: 1,
            ..ErrorCounts::default()
        }
    );
}

#[test]
fn a_device_handing_back_an_unknown_request_is_reset_and_serves_again() {
    let (mut queue, state) = disk(false);
    submit(&mut queue, 0, write(0, 1, false));
    submit(&mut queue, 1, write(8, 2, false));
    submit(&mut queue, 2, Command::Flush);
    submit(&mut queue, 3, write(16, 3, false));
    state.borrow_mut().used.push_back(QUEUE_SIZE - 1);
    let finished = drain(&mut queue, &state);
    assert_eq!(
        finished,
        [
            (0, Err(LOST_IN_RESET)),
            (1, Err(LOST_IN_RESET)),
            (2, Ok(())),
            (3, Ok(()))
        ],
        "the requests on the queue are lost; the flush and the held write go on"
    );
    assert_eq!((state.borrow().stops, state.borrow().restarts), (1, 1));
    state.borrow_mut().at_once = true;
    assert_eq!(run_sync(&mut queue, read(16)).unwrap()[0], 3);
    state.borrow_mut().used.push_back(u16::MAX);
    assert!(queue.poll().is_none(), "nothing was on the queue to fail");
    assert_eq!(
        queue.errors(),
        ErrorCounts {
            writes: 2,
            resets: 2,
            ..ErrorCounts::default()
        }
    );
    assert_eq!(run_sync(&mut queue, read(0)).unwrap()[0], 0);
}

#[test]
fn after_too_many_resets_or_none_that_works_the_disk_is_offline() {
    let (mut queue, state) = disk(true);
    for _ in 0..=MAX_RESETS {
        assert!(run_sync(&mut queue, read(0)).is_ok());
        state.borrow_mut().used.push_back(u16::MAX);
        assert!(queue.poll().is_none());
    }
    assert_eq!(state.borrow().restarts, MAX_RESETS as u32);
    assert_eq!(run_sync(&mut queue, read(0)).unwrap_err(), OFFLINE);
    assert_eq!(run_sync(&mut queue, Command::Flush).unwrap_err(), OFFLINE);
    assert_eq!(queue.errors().resets, MAX_RESETS + 1);

    let (mut queue, state) = disk(true);
    state.borrow_mut().comes_back = 0;
    state.borrow_mut().used.push_back(u16::MAX);
    assert!(queue.poll().is_none());
    assert_eq!(
        run_sync(&mut queue, write(0, 1, false)).unwrap_err(),
        OFFLINE
    );
    assert_eq!(
        queue.errors(),
        ErrorCounts {
            writes: 1,
            resets: 1,
            ..ErrorCounts::default()
        }
    );
}
