//! A soak of the booted appliance: NBD clients (one `nbdsh` each, several requests in
//! flight) write, read back and flush their own thin volumes at random for a bounded
//! time, checking every read against what they wrote, while the console takes
//! snapshots of the volumes (each client pauses for it, so the snapshot's content is
//! known), checks random pages of snapshots, deletes snapshots, and reserves, dumps
//! and releases the metadata snapshot. Then the appliance shuts down, the metadata
//! passes the real `thin_check`, and after a reboot every volume and every snapshot
//! reads back, page by page, as the model says.
//!
//! 60 seconds of workload by default; `SOAK_SECS=1800` runs the 30-minute soak,
//! `SOAK_SEED=N` picks another random sequence, and `SOAK_DUMP_EACH=1` also dumps the
//! held metadata snapshot after every action (long console replies, many of them).
//! The test prints what it did.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{
    Appliance, Options, PROMPT, Scratch, monitor_command, nbdsh_command, run_nbdsh,
    wait_for_greeting,
};

const MIB: u64 = 1 << 20;
const VOLUMES: u32 = 3;
const VOLUME_MIB: u64 = 16;
const PAGES: u64 = VOLUME_MIB * MIB / 4096;
/// Snapshots kept at most; the oldest goes when a new one would exceed it.
const MAX_SNAPSHOTS: usize = 6;

/// What a device holds: page number to the version written there last (pages not
/// listed hold zeros). Page `p` at version `v` of volume `n` is the 16 bytes
/// `n, p, v` (little-endian u32, u32, u64) repeated: a page of another volume, another
/// place or another time never matches.
type Pages = BTreeMap<u64, u64>;

/// Python: what a page holds, shared by the client and the checker.
const CONTENT: &str = r#"
import random, select, struct, sys

def content(volume, page, version):
    return struct.pack('<IIQ', volume, page, version) * 256 if version else bytes(4096)
"#;

/// The client of volume `VOLUME`: up to 8 requests in flight, never two on one page;
/// writes and reads of 1 to 16 pages, flushes. A line on standard input stops it
/// between requests: `pause` drains it and prints `paused` with its model, then it
/// waits for `resume` or `stop`; `stop` drains, flushes, and prints its counts and
/// its model. Request buffers are kept for reuse: libnbd 1.14's Python binding
/// never frees a buffer given to `aio_pread` or `aio_pwrite` (with or without a
/// completion callback), so a fresh one per request grew each client by about
/// 8 GB in 20 minutes and left the host without memory.
const CLIENT: &str = r#"
rng = random.Random(SEED)
model = {}
busy = set()
inflight = {}
counts = {'writes': 0, 'reads': 0, 'flushes': 0, 'pages written': 0, 'pages read': 0}
version = 0
spare = {}

def take(size):
    kept = spare.get(size)
    return kept.pop() if kept else nbd.Buffer(size)

def retire():
    for cookie in list(inflight):
        if h.aio_command_completed(cookie):
            kind, first, versions, buffer = inflight.pop(cookie)
            for n, v in enumerate(versions):
                busy.discard(first + n)
                if kind == 'write':
                    model[first + n] = v
                else:
                    got = bytes(buffer.to_bytearray()[n * 4096:(n + 1) * 4096])
                    assert got == content(VOLUME, first + n, v), \
                        f'volume {VOLUME} page {first + n}: read {got[:16].hex()}, expected version {v}'
            spare.setdefault(buffer.size(), []).append(buffer)

def drain():
    while inflight:
        h.poll(-1)
        retire()

def report(word):
    print(word, ' '.join(f'{p}:{v}' for p, v in sorted(model.items())), flush=True)

while True:
    if select.select([sys.stdin], [], [], 0)[0]:
        command = sys.stdin.readline().strip()
        drain()
        if command == 'pause':
            report('paused')
            command = sys.stdin.readline().strip()
        if command == 'stop':
            h.flush()
            counts['flushes'] += 1
            print('counts', ' '.join(f'{k.replace(" ", "_")}={v}' for k, v in counts.items()), flush=True)
            report('model')
            break
    while len(inflight) >= 8:
        h.poll(-1)
        retire()
    roll = rng.random()
    if roll < 0.03:
        drain()
        h.flush()
        counts['flushes'] += 1
        continue
    if roll < 0.5 or not model:
        first = rng.randrange(PAGES)
    else:
        first = rng.choice(list(model))
    length = min(rng.choice([1, 1, 1, 2, 4, 16]), PAGES - first)
    pages = range(first, first + length)
    if any(p in busy for p in pages):
        h.poll(0)
        retire()
        continue
    busy.update(pages)
    if roll < 0.55:
        versions = []
        for p in pages:
            version += 1
            versions.append(version)
        buffer = take(length * 4096)
        buffer.to_buffer()[:] = b''.join(content(VOLUME, p, v) for p, v in zip(pages, versions))
        cookie = h.aio_pwrite(buffer, first * 4096)
        inflight[cookie] = ('write', first, versions, buffer)
        counts['writes'] += 1
        counts['pages written'] += length
    else:
        buffer = take(length * 4096)
        cookie = h.aio_pread(buffer, first * 4096)
        inflight[cookie] = ('read', first, [model.get(p, 0) for p in pages], buffer)
        counts['reads'] += 1
        counts['pages read'] += length
"#;

/// Checks pages of a device against the model in file `MODEL` (`page version` lines)
/// written by volume `VOLUME`: all of them in 1 MiB reads, or `SAMPLE` random ones.
const CHECKER: &str = r#"
model = {}
for line in open(MODEL):
    page, version = line.split()
    model[int(page)] = int(version)
if SAMPLE:
    for page in random.sample(range(PAGES), SAMPLE):
        got = h.pread(4096, page * 4096)
        assert got == content(VOLUME, page, model.get(page, 0)), f'page {page} differs'
    print('checked', SAMPLE)
else:
    for chunk in range(PAGES // 256):
        data = h.pread(1 << 20, chunk << 20)
        for n in range(256):
            page = chunk * 256 + n
            got = data[n * 4096:(n + 1) * 4096]
            assert got == content(VOLUME, page, model.get(page, 0)), \
                f'page {page} holds {got[:16].hex()}, expected version {model.get(page, 0)}'
    print('checked', PAGES)
"#;

/// A Python script: the shared content function and `body` with its constants.
fn script(body: &str, constants: &[(&str, String)]) -> String {
    let mut script = String::from(CONTENT);
    for (name, value) in constants {
        writeln!(script, "{name} = {value}").unwrap();
    }
    script + body
}

fn parse_pages(words: &str) -> Pages {
    words
        .split_whitespace()
        .map(|pair| {
            let (page, version) = pair.split_once(':').expect("page:version");
            (page.parse().unwrap(), version.parse().unwrap())
        })
        .collect()
}

/// One client process and the pipes to it.
struct Client {
    volume: u32,
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Client {
    fn start(uri: &str, volume: u32, seed: u64) -> Client {
        let constants = [
            ("VOLUME", volume.to_string()),
            ("PAGES", PAGES.to_string()),
            ("SEED", seed.to_string()),
        ];
        let mut child = nbdsh_command(uri, &script(CLIENT, &constants))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        Client {
            volume,
            child,
            input,
            output,
        }
    }

    /// Sends `command` and returns the rest of the reply line that starts with
    /// `reply`.
    fn ask(&mut self, command: &str, reply: &str) -> String {
        writeln!(self.input, "{command}").unwrap();
        let mut line = String::new();
        self.output.read_line(&mut line).unwrap();
        match line.strip_prefix(reply) {
            Some(rest) => rest.trim().to_string(),
            None => self.died(&line),
        }
    }

    fn died(&mut self, line: &str) -> ! {
        let _ = self.child.kill();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
        }
        panic!(
            "the client of volume {} failed ({:?}): {line}{stderr}",
            self.volume,
            self.child.wait()
        );
    }

    /// Waits until its requests are answered; returns its volume's content.
    fn pause(&mut self) -> Pages {
        parse_pages(&self.ask("pause", "paused"))
    }

    fn resume(&mut self) {
        writeln!(self.input, "resume").unwrap();
    }

    /// Stops it; returns its counts (`name=number` words) and its volume's content.
    fn stop(mut self) -> (String, Pages) {
        let counts = self.ask("stop", "counts");
        let mut line = String::new();
        self.output.read_line(&mut line).unwrap();
        let Some(model) = line.strip_prefix("model") else {
            self.died(&line)
        };
        let model = parse_pages(model);
        assert!(self.child.wait().unwrap().success());
        (counts, model)
    }
}

/// A device to check at the end: its name, the volume that wrote its pages, and
/// what it holds.
struct Expected {
    name: String,
    volume: u32,
    pages: Pages,
}

/// Checks `device` against its model through a fresh client: every page, or
/// `sample` random ones.
fn check(appliance: &Appliance, scratch: &Path, device: &Expected, sample: u64) {
    let model = scratch.join(format!("{}.model", device.name));
    let lines: String = device
        .pages
        .iter()
        .map(|(page, version)| format!("{page} {version}\n"))
        .collect();
    fs::write(&model, lines).unwrap();
    let constants = [
        ("VOLUME", device.volume.to_string()),
        ("PAGES", PAGES.to_string()),
        ("MODEL", format!("{:?}", model.display().to_string())),
        ("SAMPLE", sample.to_string()),
    ];
    let uri = appliance.nbd_uri(&device.name).unwrap();
    let printed = run_nbdsh(&uri, &script(CHECKER, &constants));
    let pages = if sample == 0 { PAGES } else { sample };
    assert_eq!(
        printed.trim(),
        format!("checked {pages}"),
        "{}",
        device.name
    );
}

/// What the console did.
#[derive(Default)]
struct ConsoleCounts {
    snapshots: u32,
    deletes: u32,
    metadata_snapshots: u32,
    /// Bytes of the longest `dump --metadata-snap` reply.
    largest_dump: usize,
    sample_checks: u32,
}

/// Runs a console command that must succeed; if the appliance does not answer, the
/// panic shows where its CPU was (the instruction pointer from QEMU's monitor,
/// sampled twenty times over four seconds), whether the reply comes within another
/// minute without any input, and what the console prints when Enter is pressed
/// after that: a reply that needs the Enter was never read by the appliance.
fn console(appliance: &mut Appliance, monitor: &Path, command: &str) -> String {
    appliance.console_ok(command).unwrap_or_else(|error| {
        let samples: Vec<String> = (0..20)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(200));
                match monitor_command(monitor, "info registers") {
                    Ok(registers) => registers
                        .lines()
                        .find(|line| line.starts_with("RIP="))
                        .unwrap_or("no RIP line")
                        .to_string(),
                    Err(error) => error.to_string(),
                }
            })
            .collect();
        let unprompted = appliance.read_until(PROMPT, Duration::from_secs(60));
        let after_enter = match &unprompted {
            Ok(_) => Ok(String::from("(not pressed)")),
            Err(_) => appliance
                .type_partial("\r")
                .and_then(|()| appliance.read_until(PROMPT, Duration::from_secs(20))),
        };
        panic!(
            "{command}: {error:?}\nthe CPU was at:\n{}\na minute later, without input: \
             {unprompted:?}\nafter Enter: {after_enter:?}",
            samples.join("\n")
        )
    })
}

fn boot(options: &Options) -> Appliance {
    let appliance = Appliance::boot(options.clone()).unwrap();
    wait_for_greeting(appliance.nbd_port().unwrap(), Duration::from_secs(60)).unwrap();
    appliance
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[test]
fn clients_snapshots_and_deletes_for_a_while_then_everything_reads_back_after_a_reboot() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::ThinCheck, Tool::NbdSh]);
    let seconds = env_number("SOAK_SECS", 60);
    let seed = env_number("SOAK_SEED", 14);
    let dump_each = env_number("SOAK_DUMP_EACH", 0) != 0;
    let scratch = Scratch::new().unwrap();
    let metadata = scratch.disk("metadata.img", 32 * MIB).unwrap();
    let data = scratch.disk("data.img", 512 * MIB).unwrap();
    let config = scratch.disk("config.img", 8 * MIB).unwrap();
    let options = Options::bios()
        .disk(&metadata)
        .disk(&data)
        .disk(&config)
        .nbd();
    let monitor = scratch.path().join("monitor.sock");
    let mut appliance = boot(&options.clone().monitor(&monitor));
    appliance.console_ok("config init vdc").unwrap();
    appliance.console_ok("pool create pool vda vdb").unwrap();
    let mut clients: Vec<Client> = (0..VOLUMES)
        .map(|volume| {
            appliance
                .console_ok(&format!("thin create v{volume} pool --size {VOLUME_MIB}M"))
                .unwrap();
            let uri = appliance.nbd_uri(&format!("v{volume}")).unwrap();
            Client::start(&uri, volume, seed * 100 + u64::from(volume))
        })
        .collect();

    let mut rng = fastrand::Rng::with_seed(seed);
    let mut snapshots: Vec<Expected> = Vec::new();
    let mut next_snapshot = 0;
    let mut metadata_snapshot_held = false;
    let mut done = ConsoleCounts::default();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(rng.u64(200..2000)));
        match rng.u32(..100) {
            0..40 => {
                let client = &mut clients[rng.usize(..VOLUMES as usize)];
                let pages = client.pause();
                let name = format!("s{next_snapshot}");
                next_snapshot += 1;
                console(
                    &mut appliance,
                    &monitor,
                    &format!("snap create {name} v{}", client.volume),
                );
                client.resume();
                snapshots.push(Expected {
                    name,
                    volume: client.volume,
                    pages,
                });
                done.snapshots += 1;
                if snapshots.len() > MAX_SNAPSHOTS {
                    let oldest = snapshots.remove(0);
                    console(
                        &mut appliance,
                        &monitor,
                        &format!("thin delete {}", oldest.name),
                    );
                    done.deletes += 1;
                }
            }
            40..55 if !snapshots.is_empty() => {
                let gone = snapshots.remove(rng.usize(..snapshots.len()));
                console(
                    &mut appliance,
                    &monitor,
                    &format!("thin delete {}", gone.name),
                );
                done.deletes += 1;
            }
            55..75 if !snapshots.is_empty() => {
                let snapshot = &snapshots[rng.usize(..snapshots.len())];
                check(&appliance, scratch.path(), snapshot, 64);
                done.sample_checks += 1;
            }
            _ if metadata_snapshot_held => {
                let dump = console(&mut appliance, &monitor, "dump pool --metadata-snap");
                assert!(dump.starts_with("<superblock "), "{dump}");
                done.largest_dump = done.largest_dump.max(dump.len());
                console(
                    &mut appliance,
                    &monitor,
                    "message pool 0 release_metadata_snap",
                );
                metadata_snapshot_held = false;
            }
            _ => {
                console(
                    &mut appliance,
                    &monitor,
                    "message pool 0 reserve_metadata_snap",
                );
                metadata_snapshot_held = true;
                done.metadata_snapshots += 1;
            }
        }
        if dump_each && metadata_snapshot_held {
            let dump = console(&mut appliance, &monitor, "dump pool --metadata-snap");
            done.largest_dump = done.largest_dump.max(dump.len());
        }
        let status = console(&mut appliance, &monitor, "status pool");
        // `0 LEN thin-pool TRANSACTION META DATA HELD MODE DISCARDS POLICY NEEDS_CHECK ...`
        let fields: Vec<&str> = status.split_whitespace().collect();
        assert!(fields[7] == "rw" && fields[10] == "-", "{status}");
    }

    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    let mut expected = snapshots;
    for client in clients {
        let volume = client.volume;
        let (counts, pages) = client.stop();
        for word in counts.split_whitespace() {
            let (name, count) = word.split_once('=').unwrap();
            *totals.entry(name.replace('_', " ")).or_default() += count.parse::<u64>().unwrap();
        }
        expected.push(Expected {
            name: format!("v{volume}"),
            volume,
            pages,
        });
    }
    let usage = appliance.console_ok("status pool").unwrap();
    appliance.shutdown().unwrap();
    let totals: Vec<String> = totals
        .iter()
        .map(|(name, count)| format!("{count} {name}"))
        .collect();
    println!(
        "soak of {seconds} s (seed {seed}): {VOLUMES} clients made {}; the console made \
         {} snapshots, {} deletes, {} metadata snapshots (dumps of up to {} KiB), {} sample \
         checks of snapshots; pool at the end: {}",
        totals.join(", "),
        done.snapshots,
        done.deletes,
        done.metadata_snapshots,
        done.largest_dump >> 10,
        done.sample_checks,
        usage.trim()
    );

    let checked = Command::new("thin_check").arg(&metadata).output().unwrap();
    assert!(
        checked.status.success(),
        "thin_check: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let appliance = boot(&options);
    for device in &expected {
        check(&appliance, scratch.path(), device, 0);
    }
    println!(
        "after the reboot {} devices read back as the model says",
        expected.len()
    );
    appliance.shutdown().unwrap();
}
