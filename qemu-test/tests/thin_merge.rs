//! Thin merges on the booted appliance under NBD clients that verify every read:
//!
//! * `snap merge` of a thin snapshot while a client writes and reads its origin: the
//!   client stays connected throughout and reads the snapshot's content from the
//!   moment the merge returns, plus its own writes; a power cut follows at once, and
//!   after it the origin holds what the client flushed and the old content's release
//!   ends;
//! * `thin merge-origin` while a client writes and reads the volume, cut by a power
//!   loss (the image disk slowed so the cut lands mid-merge), resumed at boot and
//!   completed: the image holds the volume's content and the volume maps nothing.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{
    Appliance, Options, Scratch, monitor_command, nbdsh_command, run_nbdsh, run_tool,
    wait_for_greeting,
};

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;

/// The page contents of the snapshot merge, for 16 MiB (4096 pages): `base` before
/// the snapshot, `old` (the origin's content when merged) and `snap` (the
/// snapshot's). Values written by the client during the merge are above 0xf0.
const SNAPSHOT_PAGES: &str = r#"
PAGES = 4096
def base(p): return p % 200 + 1
def old(p): return 0xe0 if p % 7 == 0 else base(p)
def snap(p): return 0xd0 if p % 5 == 0 else base(p)
"#;

const FILL_BASE: &str = r#"
for block in range(PAGES // 16):
    h.pwrite(b''.join(bytes([base(block * 16 + i)]) * 4096 for i in range(16)), block * 65536)
h.flush()
print('filled')
"#;

const CHANGE_SNAPSHOT: &str = r#"
for p in range(0, PAGES, 5):
    h.pwrite(bytes([0xd0]) * 4096, p * 4096)
h.flush()
print('changed')
"#;

/// The origin's client: makes the origin's own changes, says it is ready, then reads
/// and writes until the merge is done and some more. `allowed[p]` is what page `p`
/// may hold: before the merge is known to be done either content, after it the
/// snapshot's, a page written during the merge its value or the snapshot's (the
/// merge may have come after the write), a page written after it its value. A read
/// never shows one page from before the merge and another from after it. At the
/// end it leaves what it read last in `@FINAL@`, a model in [`VOLUME_CLIENT`]'s form.
const ORIGIN_CLIENT: &str = r#"
import os, random
rng = random.Random(12)
for p in range(0, PAGES, 7):
    h.pwrite(bytes([0xe0]) * 4096, p * 4096)
h.flush()
for block in range(PAGES // 16):
    data = h.pread(65536, block * 65536)
    for i in range(16):
        assert data[i * 4096] == old(block * 16 + i), f'page {block * 16 + i} before'
allowed = [{old(p), snap(p)} for p in range(PAGES)]
written = set()
open('@READY@', 'w').close()

def check(first, count):
    data = h.pread(count * 4096, first * 4096)
    before = after = False
    for i in range(count):
        p = first + i
        page = data[i * 4096:(i + 1) * 4096]
        assert page == bytes([page[0]]) * 4096, f'page {p} torn'
        assert page[0] in allowed[p], f'page {p} holds {page[0]:#x}, not one of {allowed[p]}'
        if old(p) != snap(p) and p not in written:
            before |= page[0] == old(p)
            after |= page[0] == snap(p)
    assert not (before and after), f'a read at page {first} saw both sides of the merge'

during = 0
while not os.path.exists('@MERGED@'):
    p = rng.randrange(PAGES)
    value = rng.randrange(0xf1, 0x100)
    h.pwrite(bytes([value]) * 4096, p * 4096)
    allowed[p] = {value, snap(p)}
    written.add(p)
    check(rng.randrange(PAGES - 16), 16)
    during += 1
for p in range(PAGES):
    if p not in written:
        allowed[p] = {snap(p)}
for _ in range(200):
    p = rng.randrange(PAGES)
    value = rng.randrange(0xf1, 0x100)
    h.pwrite(bytes([value]) * 4096, p * 4096)
    allowed[p] = {value}
    written.add(p)
    check(rng.randrange(PAGES - 16), 16)
h.flush()
final = bytearray()
for block in range(PAGES // 16):
    check(block * 16, 16)
    data = h.pread(65536, block * 65536)
    final += bytes(data[i * 4096] for i in range(16))
open('@FINAL@', 'wb').write(final)
print(f'verified, {during} writes during the merge')
"#;

fn boot(options: &Options) -> Appliance {
    let appliance = Appliance::boot(options.clone()).unwrap();
    wait_for_greeting(appliance.nbd_port().unwrap(), Duration::from_secs(60)).unwrap();
    appliance
}

/// Waits for `child` (an `nbdsh` client) to end; returns what it printed, or panics
/// with its output if it failed or took longer than `limit`.
fn finish(mut child: Child, limit: Duration) -> String {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&done.stdout).into_owned();
    assert!(
        done.status.success(),
        "the client failed ({}):\n{stdout}{}",
        done.status,
        String::from_utf8_lossy(&done.stderr)
    );
    stdout
}

fn wait_for_file(path: &Path, limit: Duration) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < limit,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_thin_snapshot_merges_under_a_client_of_its_origin_that_stays_connected() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::NbdSh, Tool::ThinCheck]);
    let scratch = Scratch::new().unwrap();
    let meta = scratch.disk("meta.img", 16 * MIB).unwrap();
    let data = scratch.disk("data.img", 64 * MIB).unwrap();
    let config = scratch.disk("config.img", 8 * MIB).unwrap();
    let mut appliance = boot(&Options::bios().disk(&meta).disk(&data).disk(&config).nbd());
    appliance.console_ok("config init vdc").unwrap();
    appliance.console_ok("pool create pool vda vdb").unwrap();
    appliance
        .console_ok("thin create vol pool --size 16M")
        .unwrap();
    let vol = appliance.nbd_uri("vol").unwrap();
    let script = |body: &str| format!("{SNAPSHOT_PAGES}{body}");
    assert!(run_nbdsh(&vol, &script(FILL_BASE)).contains("filled"));
    appliance.console_ok("snap create snap vol").unwrap();
    let snap = appliance.nbd_uri("snap").unwrap();
    assert!(run_nbdsh(&snap, &script(CHANGE_SNAPSHOT)).contains("changed"));

    let (ready, merged) = (scratch.path().join("ready"), scratch.path().join("merged"));
    let last_read = scratch.path().join("final");
    let client = script(ORIGIN_CLIENT)
        .replace("@READY@", &ready.display().to_string())
        .replace("@MERGED@", &merged.display().to_string())
        .replace("@FINAL@", &last_read.display().to_string());
    let client = nbdsh_command(&vol, &client)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_file(&ready, Duration::from_secs(120));
    // The client writes and reads for a while before the merge and while it runs.
    std::thread::sleep(Duration::from_secs(2));
    let output = appliance.console_ok("snap merge snap").unwrap();
    std::fs::write(&merged, "").unwrap();
    assert_eq!(
        output.trim(),
        "snap: merged into vol (thin device 0 of pool now has snap's content); snap is removed"
    );
    let verified = finish(client, Duration::from_secs(120));
    let during: u64 = verified
        .trim()
        .strip_prefix("verified, ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("the client said: {verified}"));
    assert!(during > 0, "the client wrote nothing during the merge");
    appliance.kill();

    let mut appliance = boot(&Options::bios().disk(&meta).disk(&data).disk(&config).nbd());
    let vol = appliance.nbd_uri("vol").unwrap();
    // Every page holds what the client last read from it, flushed before the cut.
    assert!(volume_client(&vol, &last_read, 0, false, 0).contains("verified"));
    let listing = appliance.console_ok("thin ls pool").unwrap();
    assert!(
        listing.contains(" vol ") && !listing.contains("snap"),
        "{listing}"
    );
    wait_for_no_jobs(&mut appliance, Duration::from_secs(120));
    appliance.shutdown().unwrap();
    run_tool("thin_check", &[&meta.display().to_string()]);
}

/// Pages of the 32 MiB image and volume of the merge into an external origin.
const IMAGE_PAGES: usize = 8192;

/// The image's content before the merge: page `p` holds `p % 200 + 1`.
fn image_page(page: usize) -> u8 {
    (page % 200 + 1) as u8
}

/// The volume's client, with the model of its content in a file of one byte per
/// page: the first time every block written (a third of its pages), then `ops`
/// random page writes, each followed by a verified read of a random page, then a
/// flush (so a power cut after it loses nothing); with `ops` 0 a read of the whole
/// volume against the model.
const VOLUME_CLIENT: &str = r#"
import random
model = bytearray(open('@MODEL@', 'rb').read())
pages = len(model)
rng = random.Random(@SEED@)
if @FIRST@:
    for block in range(pages // 16):
        for p in range(block * 16, block * 16 + 16, 3):
            model[p] = 0x80 + p % 64
        h.pwrite(b''.join(bytes([model[block * 16 + i]]) * 4096 for i in range(16)), block * 65536)
for _ in range(@OPS@):
    p = rng.randrange(pages)
    model[p] = rng.randrange(0xc0, 0x100)
    h.pwrite(bytes([model[p]]) * 4096, p * 4096)
    q = rng.randrange(pages)
    assert h.pread(4096, q * 4096) == bytes([model[q]]) * 4096, f'page {q}'
h.flush()
open('@MODEL@', 'wb').write(model)
if @OPS@ == 0:
    for block in range(pages // 16):
        data = h.pread(65536, block * 65536)
        for i in range(16):
            p = block * 16 + i
            assert data[i * 4096:(i + 1) * 4096] == bytes([model[p]]) * 4096, f'page {p}'
print('verified')
"#;

fn volume_client(uri: &str, model: &Path, seed: u64, first: bool, ops: u32) -> String {
    let script = VOLUME_CLIENT
        .replace("@MODEL@", &model.display().to_string())
        .replace("@SEED@", &seed.to_string())
        .replace("@FIRST@", if first { "True" } else { "False" })
        .replace("@OPS@", &ops.to_string());
    run_nbdsh(uri, &script)
}

/// Polls `jobs` until it lists nothing.
fn wait_for_no_jobs(appliance: &mut Appliance, limit: Duration) {
    let started = Instant::now();
    while !appliance
        .console_ok("jobs")
        .unwrap()
        .contains("no background jobs")
    {
        assert!(started.elapsed() < limit, "the jobs never ended");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_merge_into_the_origin_cut_by_a_power_loss_resumes_at_boot_and_completes() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::NbdSh, Tool::ThinCheck]);
    let scratch = Scratch::new().unwrap();
    let meta = scratch.disk("meta.img", 16 * MIB).unwrap();
    let data = scratch.disk("data.img", 64 * MIB).unwrap();
    let image = scratch.disk("image.img", 32 * MIB).unwrap();
    let config = scratch.disk("config.img", 8 * MIB).unwrap();
    let mut pages: Vec<u8> = Vec::with_capacity(IMAGE_PAGES * PAGE);
    for page in 0..IMAGE_PAGES {
        pages.extend(std::iter::repeat_n(image_page(page), PAGE));
    }
    std::fs::write(&image, &pages).unwrap();
    let model = scratch.path().join("model");
    let initial: Vec<u8> = (0..IMAGE_PAGES).map(image_page).collect();
    std::fs::write(&model, &initial).unwrap();
    let options = Options::bios()
        .disk(&meta)
        .disk(&data)
        .disk(&image)
        .disk(&config)
        .nbd();
    let monitor = scratch.path().join("monitor.sock");
    let mut appliance = boot(&options.clone().monitor(&monitor));
    appliance.console_ok("config init vdd").unwrap();
    appliance.console_ok("pool create pool vda vdb").unwrap();
    appliance
        .console_ok("create image --table \"0 65536 linear vdc 0\"")
        .unwrap();
    appliance
        .console_ok("thin create vol pool --origin image")
        .unwrap();
    let vol = appliance.nbd_uri("vol").unwrap();
    // Every 64 KiB block of the volume gets its own data, then the merge starts with
    // the image disk slowed to 4 MB/s of writes: its 32 MiB take at least 8 s, far
    // more than the client below and the power cut need, however fast the host is.
    assert!(volume_client(&vol, &model, 1, true, 50).contains("verified"));
    let throttled =
        monitor_command(&monitor, "block_set_io_throttle vd2 0 0 4000000 0 0 0").unwrap();
    assert_eq!(throttled, "", "QEMU did not slow the image disk down");
    let started = appliance
        .console_ok("thin merge-origin vol --background")
        .unwrap();
    assert!(
        started.contains("vol: merging its blocks into image; it keeps serving I/O")
            && started
                .contains("vol: merging in the background (jobs shows it as merge-origin/vol)"),
        "{started}"
    );
    assert!(volume_client(&vol, &model, 2, false, 100).contains("verified"));
    let jobs = appliance.console_ok("jobs").unwrap();
    assert!(
        jobs.contains("merge-origin/vol  vol: merge of vol into its external origin, "),
        "the merge is under way at the power cut: {jobs}"
    );
    appliance.kill();

    // The merge resumes at boot, on a disk at full speed: the client's reads and
    // writes come while it runs or after it finished.
    let mut appliance = boot(&options);
    assert!(
        appliance
            .boot_log()
            .iter()
            .any(|line| line.contains("config: vol: merging into its origin again")),
        "{:?}",
        appliance.boot_log()
    );
    let vol = appliance.nbd_uri("vol").unwrap();
    assert!(volume_client(&vol, &model, 3, false, 100).contains("verified"));
    wait_for_no_jobs(&mut appliance, Duration::from_secs(120));
    if appliance.console_ok("status vol").unwrap().trim() != "0 65536 thin 0 -" {
        // The client's last writes came after the merge had finished: they are
        // blocks of the volume again, merged once more.
        appliance.console_ok("thin merge-origin vol").unwrap();
    }
    assert_eq!(
        appliance.console_ok("status vol").unwrap().trim(),
        "0 65536 thin 0 -"
    );
    assert!(volume_client(&vol, &model, 4, false, 0).contains("verified"));
    appliance.shutdown().unwrap();
    run_tool("thin_check", &[&meta.display().to_string()]);
    let model = std::fs::read(&model).unwrap();
    let merged = std::fs::read(&image).unwrap();
    for (page, &byte) in model.iter().enumerate() {
        let content = &merged[page * PAGE..(page + 1) * PAGE];
        assert!(
            content.iter().all(|&b| b == byte),
            "image page {page} does not hold {byte:#x}"
        );
    }
}
