//! Power cuts through the real drivers, at hundreds of instants of a random workload.
//!
//! QEMU records every write and flush the appliance sends to its metadata and data
//! disks (`blklogwrites`). An NBD client sends a seeded random mix of 4 KiB writes
//! (some with FUA), write-zeroes, trims of whole blocks and FLUSHes, up to eight in
//! flight on different pages, half of them in the block the previous one went to (so
//! requests often land on a mapping made moments before), and notes how far both
//! logs had got at each reply.
//! Afterwards both disks are rebuilt as a power cut at each of those instants leaves
//! them — unflushed writes all lost, and a seeded random subset kept — and each pair
//! must pass `thin_check` and hold, page by page, a version that is allowed: the data
//! of every acknowledged FUA request and of every request answered before an
//! acknowledged FLUSH was sent, or something written after it; never anything else.
//! Pages are read straight from the rebuilt images through `thin_dump`'s mappings.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use host_tools::Tool;
use qemu_test::write_log::{Unflushed, WriteLog};
use qemu_test::{Scratch, run_nbdsh};

mod logged;

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
const BLOCK: u64 = 64 << 10;
const PAGE: u64 = 4096;
const PAGES_PER_BLOCK: u64 = BLOCK / PAGE;
const METADATA_BYTES: u64 = 4 * MIB;
const DATA_BYTES: u64 = 16 * MIB;
/// The thin volume: 128 blocks, 2048 pages, so new blocks keep being provisioned.
const THIN_BYTES: u64 = 128 * BLOCK;
const PAGES: u64 = THIN_BYTES / PAGE;
const REQUESTS: usize = 260;
const SEED: u64 = 7;

/// What a version of a page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Zeros,
    /// The request's id as a little-endian u16, repeated.
    Id(u16),
}

impl Content {
    fn matches(self, page: &[u8]) -> bool {
        match self {
            Content::Zeros => page.iter().all(|&b| b == 0),
            Content::Id(id) => page
                .chunks(2)
                .all(|pair| pair == id.to_le_bytes().as_slice()),
        }
    }
}

/// The client: sends the workload, printing `S ID KIND PAGE FUA` when it sends a
/// request and `C ID METADATA_ENTRIES DATA_ENTRIES ERROR` when its reply arrives.
fn client_script(logs: [&Path; 2]) -> String {
    format!(
        r#"
import random, struct
LOGS = [{:?}, {:?}]
rng = random.Random({SEED})
PAGES = {PAGES}
PER_BLOCK = {PAGES_PER_BLOCK}

def logged(path):
    with open(path, 'rb') as log:
        head = log.read(24)
    return struct.unpack_from('<Q', head, 16)[0] if len(head) == 24 else 0

busy = {{}}
buffers = {{}}
last_block = 0
def finished(ident, pages):
    def callback(error):
        counts = [logged(path) for path in LOGS]
        print('C', ident, counts[0], counts[1], error.value, flush=True)
        for page in pages:
            busy.pop(page, None)
        buffers.pop(ident, None)
        return 1
    return callback

for ident in range(1, {REQUESTS} + 1):
    while h.aio_in_flight() >= 8:
        h.poll(-1)
    roll = rng.random()
    fua = rng.random() < 0.3
    flags = nbd.CMD_FLAG_FUA if fua else 0
    if roll < 0.05:
        print('S', ident, 'flush', 0, 0, flush=True)
        h.aio_flush(completion=finished(ident, []))
        continue
    block = last_block if rng.random() < 0.5 else rng.randrange(PAGES // PER_BLOCK)
    last_block = block
    if roll < 0.12:
        pages = list(range(block * PER_BLOCK, (block + 1) * PER_BLOCK))
        kind = 'trim'
    else:
        pages = [block * PER_BLOCK + rng.randrange(PER_BLOCK)]
        kind = 'zero' if roll < 0.2 else 'write'
    while any(page in busy for page in pages):
        h.poll(-1)
    for page in pages:
        busy[page] = ident
    print('S', ident, kind, pages[0], int(fua), flush=True)
    offset = pages[0] * 4096
    length = len(pages) * 4096
    callback = finished(ident, pages)
    if kind == 'write':
        buffers[ident] = nbd.Buffer.from_bytearray(bytearray(struct.pack('<H', ident) * 2048))
        h.aio_pwrite(buffers[ident], offset, completion=callback, flags=flags)
    elif kind == 'zero':
        h.aio_zero(length, offset, completion=callback, flags=flags)
    else:
        h.aio_trim(length, offset, completion=callback, flags=flags)
while h.aio_in_flight():
    h.poll(-1)
"#,
        logs[0].display(),
        logs[1].display(),
    )
}

/// A request as sent.
struct Sent {
    kind: String,
    pages: Vec<u64>,
    fua: bool,
}

/// One instant to cut the power at: right after a reply, with what was promised
/// and what may have reached the disks by then.
struct Cut {
    entries: [usize; 2],
    /// Per page, the versions it may hold (oldest first).
    allowed: BTreeMap<u64, Vec<Content>>,
}

/// Replays the client's transcript into the instants after each reply.
fn cuts(transcript: &str) -> Vec<Cut> {
    let mut sent: BTreeMap<u32, Sent> = BTreeMap::new();
    // Per page: every version sent so far (id, content), in sending order.
    let mut versions: BTreeMap<u64, Vec<(u32, Content)>> = BTreeMap::new();
    // Per page: the newest version answered successfully.
    let mut answered: BTreeMap<u64, u32> = BTreeMap::new();
    // Per page: the version a power cut may not go back past.
    let mut promised: BTreeMap<u64, u32> = BTreeMap::new();
    // Per flush in flight: what was answered when it was sent.
    let mut flushes: BTreeMap<u32, BTreeMap<u64, u32>> = BTreeMap::new();
    let mut cuts = Vec::new();
    for line in transcript.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["S", id, kind, page, fua] => {
                let id: u32 = id.parse().unwrap();
                let page: u64 = page.parse().unwrap();
                let pages = match *kind {
                    "flush" => {
                        flushes.insert(id, answered.clone());
                        Vec::new()
                    }
                    "trim" => (page..page + PAGES_PER_BLOCK).collect(),
                    _ => vec![page],
                };
                let content = if *kind == "write" {
                    Content::Id(id as u16)
                } else {
                    Content::Zeros
                };
                for &page in &pages {
                    versions.entry(page).or_default().push((id, content));
                }
                let fua = *fua == "1";
                let kind = kind.to_string();
                sent.insert(id, Sent { kind, pages, fua });
            }
            ["C", id, metadata, data, error] => {
                let id: u32 = id.parse().unwrap();
                let request = &sent[&id];
                if *error == "0" {
                    for &page in &request.pages {
                        answered.insert(page, id);
                        if request.fua {
                            promised.insert(page, id);
                        }
                    }
                    if let Some(covered) = flushes.remove(&id) {
                        for (page, version) in covered {
                            let entry = promised.entry(page).or_insert(version);
                            *entry = (*entry).max(version);
                        }
                    }
                } else {
                    assert!(request.kind != "flush", "a FLUSH failed: {line}");
                }
                let allowed = versions
                    .iter()
                    .map(|(&page, list)| {
                        let from = promised.get(&page).copied().unwrap_or(0);
                        let mut contents: Vec<Content> = list
                            .iter()
                            .filter(|(version, _)| *version >= from)
                            .map(|&(_, content)| content)
                            .collect();
                        if from == 0 {
                            contents.push(Content::Zeros);
                        }
                        (page, contents)
                    })
                    .collect();
                cuts.push(Cut {
                    entries: [metadata.parse().unwrap(), data.parse().unwrap()],
                    allowed,
                });
            }
            _ => panic!("unexpected client output: {line}"),
        }
    }
    cuts
}

/// Virtual block → data block of thin device 0, from `thin_dump`.
fn mappings(metadata: &Path) -> BTreeMap<u64, u64> {
    let out = Command::new("thin_dump").arg(metadata).output().unwrap();
    assert!(out.status.success(), "thin_dump failed");
    let attribute = |line: &str, name: &str| -> u64 {
        let start = line.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
        let end = start + line[start..].find('"').unwrap();
        line[start..end].parse().unwrap()
    };
    let mut map = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        if line.starts_with("<single_mapping") {
            map.insert(
                attribute(line, "origin_block"),
                attribute(line, "data_block"),
            );
        } else if line.starts_with("<range_mapping") {
            let (origin, data) = (
                attribute(line, "origin_begin"),
                attribute(line, "data_begin"),
            );
            for n in 0..attribute(line, "length") {
                map.insert(origin + n, data + n);
            }
        }
    }
    map
}

/// What is wrong with the disks of one cut, if anything.
fn check(cut: &Cut, metadata: &Path, data: &Path) -> Option<String> {
    let checked = Command::new("thin_check").arg(metadata).output().unwrap();
    if !checked.status.success() {
        return Some(format!(
            "thin_check fails: {}",
            String::from_utf8_lossy(&checked.stderr)
        ));
    }
    let map = mappings(metadata);
    let data = fs::read(data).unwrap();
    for (&page, allowed) in &cut.allowed {
        let offset = map
            .get(&(page / PAGES_PER_BLOCK))
            .map(|&block| (block * BLOCK + page % PAGES_PER_BLOCK * PAGE) as usize);
        let zeros = [0u8; PAGE as usize];
        let held = offset.map_or(&zeros[..], |at| &data[at..at + PAGE as usize]);
        if !allowed.iter().any(|content| content.matches(held)) {
            return Some(format!(
                "page {page} holds {:?}..., allowed {allowed:?}",
                &held[..4]
            ));
        }
    }
    None
}

#[test]
fn a_random_workload_survives_power_cuts_at_every_reply() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::ThinCheck, Tool::NbdSh]);
    let scratch = Scratch::new().unwrap();
    let logged::Logged {
        mut appliance,
        metadata,
        data,
        metadata_log,
        data_log,
    } = logged::boot(&scratch, METADATA_BYTES, DATA_BYTES);
    for command in [
        format!(
            "create pool --table \"0 {} thin-pool vda vdb {} 0\"",
            DATA_BYTES / SECTOR,
            BLOCK / SECTOR
        ),
        "message pool 0 \"create_thin 0\"".into(),
        format!(
            "create thin --table \"0 {} thin pool 0\"",
            THIN_BYTES / SECTOR
        ),
    ] {
        appliance.console_ok(&command).unwrap();
    }
    let uri = appliance.nbd_uri("thin").unwrap();
    let transcript = run_nbdsh(&uri, &client_script([&metadata_log, &data_log]));
    appliance.shutdown().unwrap();

    let cuts = cuts(&transcript);
    assert_eq!(cuts.len(), REQUESTS, "a reply per request");
    let metadata_log = WriteLog::read(&metadata_log).unwrap();
    let data_log = WriteLog::read(&data_log).unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (number, cut) in cuts.iter().enumerate() {
        for how in [
            Unflushed::Lost,
            Unflushed::Some {
                seed: number as u64,
            },
        ] {
            let [metadata_entries, data_entries] = cut.entries;
            // The disks are not needed after the run: each cut is rebuilt over them.
            let metadata = logged::rebuilt(
                metadata.clone(),
                METADATA_BYTES,
                &metadata_log,
                metadata_entries,
                how,
            );
            let data = logged::rebuilt(data.clone(), DATA_BYTES, &data_log, data_entries, how);
            if let Some(wrong) = check(cut, &metadata, &data) {
                failures.push(format!("cut after reply {number} ({how:?}): {wrong}"));
            }
            checked += 1;
        }
    }
    eprintln!("{checked} power cuts checked, {} failures", failures.len());
    assert!(checked >= 200);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
