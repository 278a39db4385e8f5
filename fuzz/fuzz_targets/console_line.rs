//! Arbitrary bytes typed on the serial console, over memory disks: every command
//! line the editor accepts runs (creating pools, thin devices, snapshots, tables,
//! messages, configuration) and answers or fails with an `error:` line; nothing
//! panics and no command runs away.
#![no_main]

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use blockdev::MemDisk;
use console::{Console, Crash, MemoryStats, Platform};
use dm::{DeviceMapper, Disk};
use libfuzzer_sys::fuzz_target;

/// Polls one typed byte may take before it counts as running away.
const MAX_POLLS: usize = 100_000;

/// A clock that moves on 1 ms a reading; power and crashes do nothing (a fuzzer
/// must not stop on the deliberate `debug` crashes).
#[derive(Default)]
struct FuzzPlatform {
    now: Cell<u64>,
}

impl Platform for FuzzPlatform {
    fn now_ns(&self) -> u64 {
        self.now.set(self.now.get() + 1_000_000);
        self.now.get()
    }
    fn memory(&self) -> Option<MemoryStats> {
        None
    }
    fn power_off(&mut self) {}
    fn crash(&mut self, _how: Crash) {}
}

fn disk(name: &str, mib: u64) -> Disk {
    Disk {
        name: name.to_string(),
        device: Box::new(MemDisk::new(mib << 11)),
    }
}

fuzz_target!(|data: &[u8]| {
    let disks = vec![disk("vda", 8), disk("vdb", 16), disk("vdc", 4)];
    let dm = Rc::new(RefCell::new(DeviceMapper::new(disks)));
    let mut console = Console::new(FuzzPlatform::default(), dm);
    let mut out = String::new();
    console.start(&mut out);
    for &byte in data {
        console.input(byte, &mut out);
        let mut polls = 0;
        while console.poll(&mut out) {
            polls += 1;
            assert!(polls < MAX_POLLS, "a command ran away: {out}");
        }
        out.clear();
    }
});
