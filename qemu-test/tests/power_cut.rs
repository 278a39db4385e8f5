//! Power cuts at the instant the appliance acknowledges a FUA request.
//!
//! QEMU records every write and flush the appliance sends to its metadata and data
//! disks (`blklogwrites`); the NBD client notes how far both logs had got the moment
//! each FUA reply arrived. Afterwards both disks are rebuilt as a power cut at each
//! of those moments leaves them (what was flushed, nothing after it: virtio-blk has
//! no FUA of its own), and the pool must pass `thin_check` and serve, through
//! `thinbox offline`, the data of every FUA request acknowledged so far.

use std::fs;
use std::ops::Range;
use std::path::Path;
use std::process::Command;

use host_tools::Tool;
use qemu_test::write_log::{Unflushed, WriteLog};
use qemu_test::{HostServer, Scratch, run_nbdsh, run_tool};

mod logged;

const THINBOX: &str = env!("CARGO_BIN_FILE_THINBOX");
const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// Pool data block: 64 KiB, each case gets a fresh one.
const BLOCK: u64 = 64 << 10;
const PAGE: u64 = 4096;
const PAGES: usize = (BLOCK / PAGE) as usize;
const METADATA_BYTES: u64 = 16 * MIB;
const DATA_BYTES: u64 = 32 * MIB;
const THIN_BYTES: u64 = 16 * BLOCK;

/// What a request does to its pages.
#[derive(Clone, Copy)]
enum Kind {
    /// Fills them with this byte.
    Write(u8),
    /// WRITE_ZEROES.
    Zero,
    /// TRIM.
    Trim,
}

struct Request {
    kind: Kind,
    pages: Range<usize>,
    fua: bool,
    /// The next request is sent only once this one's reply has arrived.
    await_reply: bool,
}

/// What the case's block holds before its requests.
#[derive(Clone, Copy, PartialEq)]
enum Before {
    /// Never written: not provisioned.
    Nothing,
    /// Filled with this byte and flushed before the snapshot, so shared with it.
    Shared(u8),
    /// Filled with this byte and flushed after the snapshot.
    Flushed(u8),
}

struct Case {
    name: &'static str,
    block: u64,
    before: Before,
    /// The last one carries FUA.
    requests: Vec<Request>,
}

fn write(fill: u8, pages: Range<usize>, fua: bool, await_reply: bool) -> Request {
    Request {
        kind: Kind::Write(fill),
        pages,
        fua,
        await_reply,
    }
}

fn fua(kind: Kind, pages: Range<usize>) -> Request {
    Request {
        kind,
        pages,
        fua: true,
        await_reply: true,
    }
}

fn cases() -> Vec<Case> {
    let case = |name, block, before, requests| Case {
        name,
        block,
        before,
        requests,
    };
    vec![
        case(
            "A: write page 0, FUA write page 13 before the first reply",
            1,
            Before::Nothing,
            vec![
                write(0x11, 0..1, false, false),
                write(0x1d, 13..14, true, true),
            ],
        ),
        case(
            "B: write page 0, its reply, FUA write page 13",
            2,
            Before::Nothing,
            vec![
                write(0x21, 0..1, false, true),
                write(0x2d, 13..14, true, true),
            ],
        ),
        case(
            "C: FUA write page 13 alone",
            3,
            Before::Nothing,
            vec![write(0x3d, 13..14, true, true)],
        ),
        case(
            "A on a block shared with a snapshot",
            4,
            Before::Shared(0x40),
            vec![
                write(0x41, 0..1, false, false),
                write(0x4d, 13..14, true, true),
            ],
        ),
        case(
            "B on a block shared with a snapshot",
            5,
            Before::Shared(0x50),
            vec![
                write(0x51, 0..1, false, true),
                write(0x5d, 13..14, true, true),
            ],
        ),
        case(
            "WRITE_ZEROES+FUA of pages 8-11 of a block shared with a snapshot",
            6,
            Before::Shared(0x60),
            vec![fua(Kind::Zero, 8..12)],
        ),
        case(
            "WRITE_ZEROES+FUA of pages 8-11 of a block written in this transaction",
            7,
            Before::Nothing,
            vec![write(0x71, 0..PAGES, false, true), fua(Kind::Zero, 8..12)],
        ),
        case(
            "TRIM+FUA of a whole flushed block",
            8,
            Before::Flushed(0x80),
            vec![fua(Kind::Trim, 0..PAGES)],
        ),
    ]
}

impl Case {
    /// The fill bytes each page of the block may hold after a power cut at the FUA
    /// reply: the FUA request's data exactly, elsewhere what was there before or
    /// what an unflushed request wrote.
    fn allowed(&self) -> Vec<Vec<u8>> {
        let before = match self.before {
            Before::Nothing => 0,
            Before::Shared(fill) | Before::Flushed(fill) => fill,
        };
        let mut allowed = vec![vec![before]; PAGES];
        for request in &self.requests {
            let new = match request.kind {
                Kind::Write(fill) => fill,
                Kind::Zero | Kind::Trim => 0,
            };
            for page in &mut allowed[request.pages.clone()] {
                if request.fua {
                    *page = vec![new];
                } else if !page.contains(&new) {
                    page.push(new);
                }
            }
        }
        allowed
    }

    /// What is wrong with the block in `thin` (the whole volume), if anything: runs
    /// of pages holding the same wrong thing.
    fn check(&self, thin: &[u8]) -> Option<String> {
        let block = &thin[(self.block * BLOCK) as usize..((self.block + 1) * BLOCK) as usize];
        let mut wrong: Vec<(Range<usize>, String)> = Vec::new();
        for (index, (page, allowed)) in block.chunks(PAGE as usize).zip(self.allowed()).enumerate()
        {
            let fill = page[0];
            let whole = page.iter().all(|&byte| byte == fill);
            if whole && allowed.contains(&fill) {
                continue;
            }
            let held = if whole {
                format!("{fill:#04x}")
            } else {
                String::from("mixed bytes")
            };
            let expected: Vec<String> = allowed.iter().map(|fill| format!("{fill:#04x}")).collect();
            let what = format!("{held}, expected {}", expected.join(" or "));
            match wrong.last_mut() {
                Some((pages, last)) if pages.end == index && *last == what => pages.end += 1,
                _ => wrong.push((index..index + 1, what)),
            }
        }
        let runs: Vec<String> = wrong
            .iter()
            .map(|(pages, what)| match pages.len() {
                1 => format!("page {} holds {what}", pages.start),
                _ => format!("pages {}-{} hold {what}", pages.start, pages.end - 1),
            })
            .collect();
        (!runs.is_empty()).then(|| runs.join("; "))
    }
}

/// The nbdsh script that sends `cases` in order and prints, for each, how many
/// entries the metadata and data logs held when its FUA reply arrived.
fn client_script(cases: &[Case], logs: [&Path; 2]) -> String {
    let plan: Vec<String> = cases
        .iter()
        .map(|case| {
            let requests: Vec<String> = case
                .requests
                .iter()
                .map(|request| {
                    let (kind, fill) = match request.kind {
                        Kind::Write(fill) => ("write", fill),
                        Kind::Zero => ("zero", 0),
                        Kind::Trim => ("trim", 0),
                    };
                    let offset = case.block * BLOCK + request.pages.start as u64 * PAGE;
                    let length = request.pages.len() as u64 * PAGE;
                    let python_bool = |flag: bool| if flag { "True" } else { "False" };
                    format!(
                        "('{kind}', {offset}, {length}, {fill}, {}, {})",
                        python_bool(request.fua),
                        python_bool(request.await_reply)
                    )
                })
                .collect();
            format!("[{}]", requests.join(", "))
        })
        .collect();
    format!(
        r#"
import struct
LOGS = [{:?}, {:?}]
PLAN = [{}]

def logged(path):
    with open(path, 'rb') as log:
        head = log.read(24)
    return struct.unpack_from('<Q', head, 16)[0] if len(head) == 24 else 0

retired = set()
def wait_for(cookie):
    while cookie not in retired:
        if h.aio_command_completed(cookie):
            retired.add(cookie)
        else:
            h.poll(-1)

for number, requests in enumerate(PLAN):
    moments = []
    cookies = []
    buffers = []
    for kind, offset, length, fill, fua, await_reply in requests:
        def noted(*error, fua=fua):
            if fua:
                moments.append([logged(path) for path in LOGS])
            return 0
        flags = nbd.CMD_FLAG_FUA if fua else 0
        if kind == 'write':
            buffers.append(nbd.Buffer.from_bytearray(bytearray([fill]) * length))
            cookie = h.aio_pwrite(buffers[-1], offset, completion=noted, flags=flags)
        elif kind == 'zero':
            cookie = h.aio_zero(length, offset, completion=noted, flags=flags)
        else:
            cookie = h.aio_trim(length, offset, completion=noted, flags=flags)
        cookies.append(cookie)
        if await_reply:
            wait_for(cookie)
    for cookie in cookies:
        wait_for(cookie)
    print('case', number, *moments[0])
"#,
        logs[0].display(),
        logs[1].display(),
        plan.join(", ")
    )
}

/// Fills the blocks of the cases that start from `before` data (picked by `pick`)
/// and flushes.
fn prepare(uri: &str, cases: &[Case], pick: impl Fn(Before) -> Option<u8>) {
    let writes: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            pick(case.before).map(|fill| {
                format!(
                    "h.pwrite(bytearray([{fill}]) * {BLOCK}, {})",
                    case.block * BLOCK
                )
            })
        })
        .collect();
    run_nbdsh(uri, &format!("{}\nh.flush()\n", writes.join("\n")));
}

/// The console commands that bring up the pool on `vda`/`vdb` and thin device 0.
fn activation() -> [String; 2] {
    [
        format!(
            "create pool --table \"0 {} thin-pool vda vdb {} 0\"",
            DATA_BYTES / SECTOR,
            BLOCK / SECTOR
        ),
        format!(
            "create thin --table \"0 {} thin pool 0\"",
            THIN_BYTES / SECTOR
        ),
    ]
}

/// The whole export at `uri`, copied into `copy` by nbdcopy.
fn read_export(uri: &str, copy: &Path) -> Vec<u8> {
    let _ = fs::remove_file(copy);
    run_tool("nbdcopy", &[uri, &copy.display().to_string()]);
    fs::read(copy).unwrap()
}

/// The thin volume on `metadata` and `data`, read through `thinbox offline`.
fn read_offline(metadata: &Path, data: &Path, copy: &Path) -> Result<Vec<u8>, String> {
    let server = HostServer::offline(Path::new(THINBOX), &[metadata, data], &activation())?;
    Ok(read_export(&server.uri("thin"), copy))
}

#[test]
fn fua_requests_survive_a_power_cut_at_their_reply() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::ThinCheck, Tool::NbdCopy, Tool::NbdSh]);
    let scratch = Scratch::new().unwrap();
    let logged::Logged {
        mut appliance,
        metadata,
        data,
        metadata_log,
        data_log,
    } = logged::boot(&scratch, METADATA_BYTES, DATA_BYTES);
    let [pool, thin] = activation();
    for command in [&pool, "message pool 0 \"create_thin 0\"", &thin] {
        appliance.console_ok(command).unwrap();
    }
    let uri = appliance.nbd_uri("thin").unwrap();
    let cases = cases();

    prepare(&uri, &cases, |before| match before {
        Before::Shared(fill) => Some(fill),
        _ => None,
    });
    for command in [
        "suspend thin",
        "message pool 0 \"create_snap 1 0\"",
        "resume thin",
    ] {
        appliance.console_ok(command).unwrap();
    }
    prepare(&uri, &cases, |before| match before {
        Before::Flushed(fill) => Some(fill),
        _ => None,
    });
    let printed = run_nbdsh(&uri, &client_script(&cases, [&metadata_log, &data_log]));
    // `case NUMBER METADATA_ENTRIES DATA_ENTRIES`, one line per case in order.
    let moments: Vec<[usize; 2]> = printed
        .lines()
        .map(|line| {
            let words: Vec<usize> = line
                .split(' ')
                .skip(2)
                .map(|word| word.parse().unwrap())
                .collect();
            [words[0], words[1]]
        })
        .collect();
    assert_eq!(moments.len(), cases.len(), "{printed}");

    // Without a power cut every case reads back as it should.
    let live = read_export(&uri, &scratch.path().join("live.img"));
    for case in &cases {
        assert_eq!(case.check(&live), None, "{} (no power cut)", case.name);
    }
    appliance.shutdown().unwrap();

    let metadata_log = WriteLog::read(&metadata_log).unwrap();
    let data_log = WriteLog::read(&data_log).unwrap();
    // The whole logs, which end with the flushes of `shutdown`, give the disks back.
    for (name, log, disk, bytes) in [
        ("metadata", &metadata_log, &metadata, METADATA_BYTES),
        ("data", &data_log, &data, DATA_BYTES),
    ] {
        let entries = log.entries().len();
        assert!(
            log.entries()[entries - 1].is_flush(),
            "{name} log ends unflushed"
        );
        let replayed = logged::rebuilt(
            scratch.path().join(format!("{name}-all.img")),
            bytes,
            log,
            entries,
            Unflushed::Lost,
        );
        assert!(
            fs::read(replayed).unwrap() == fs::read(disk).unwrap(),
            "replaying the whole {name} log does not give the {name} disk"
        );
    }

    let mut failures = Vec::new();
    for (number, (cut, [metadata_entries, data_entries])) in cases.iter().zip(moments).enumerate() {
        let at = format!("power cut at the FUA reply of case {}", cut.name);
        let metadata = logged::rebuilt(
            scratch.path().join(format!("metadata-{number}.img")),
            METADATA_BYTES,
            &metadata_log,
            metadata_entries,
            Unflushed::Lost,
        );
        let data = logged::rebuilt(
            scratch.path().join(format!("data-{number}.img")),
            DATA_BYTES,
            &data_log,
            data_entries,
            Unflushed::Lost,
        );
        let checked = Command::new("thin_check").arg(&metadata).output().unwrap();
        if !checked.status.success() {
            failures.push(format!(
                "{at}: thin_check fails: {}{}",
                String::from_utf8_lossy(&checked.stdout),
                String::from_utf8_lossy(&checked.stderr)
            ));
        }
        let copy = scratch.path().join(format!("thin-{number}.img"));
        match read_offline(&metadata, &data, &copy) {
            Err(why) => failures.push(format!("{at}: the pool does not come up: {why}")),
            Ok(thin) => {
                for case in &cases[..=number] {
                    if let Some(wrong) = case.check(&thin) {
                        failures.push(format!("{at}: case {}: {wrong}", case.name));
                    }
                }
            }
        }
        eprintln!(
            "{at} (metadata log entry {metadata_entries}, data log entry {data_entries}): \
             {} failures so far",
            failures.len()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
