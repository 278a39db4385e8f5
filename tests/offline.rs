//! `thinbox offline` as operators use it: scripted with `--exec`, interactive on
//! standard input, and serving NBD to real clients (nbdinfo, qemu-img).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};

use host_tools::Tool;
use qemu_test::{Scratch, qemu_img_read, qemu_img_write, run_nbdsh, run_tool};

const THINBOX: &str = env!("CARGO_BIN_EXE_thinbox");

/// Sparse image files of the given sizes in MiB, in a fresh scratch directory.
fn images(sizes: &[u64]) -> (Scratch, Vec<PathBuf>) {
    let scratch = Scratch::new().unwrap();
    let paths = sizes
        .iter()
        .enumerate()
        .map(|(index, mib)| {
            let path = scratch.path().join(format!("disk{index}.img"));
            fs::File::create(&path).unwrap().set_len(mib << 20).unwrap();
            path
        })
        .collect();
    (scratch, paths)
}

fn offline(disks: &[PathBuf], extra: &[&str]) -> Command {
    let mut command = Command::new(THINBOX);
    command.arg("offline");
    for disk in disks {
        command.arg("--disk").arg(disk);
    }
    command.args(extra);
    command
}

fn exec(disks: &[PathBuf], commands: &[&str]) -> Output {
    let mut command = offline(disks, &[]);
    for line in commands {
        command.args(["--exec", line]);
    }
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn exec_runs_commands_and_the_configuration_persists_in_the_images() {
    let (_scratch, disks) = images(&[64, 32, 4]);
    let first = exec(
        &disks,
        &[
            "config init vdc",
            "dmsetup create base --readonly --table \"0 8192 linear /dev/vdb 0\"",
            "create guest --table \"0 4096 linear vda 2048\"",
            "ls",
        ],
    );
    let text = stdout(&first);
    assert!(first.status.success(), "{text}");
    assert!(
        text.contains("thinbox> ls\nbase   (linear)\nguest  (linear)\n"),
        "{text}"
    );
    // The images are left flushed, as `shutdown` leaves the appliance's disks.
    assert!(text.ends_with("guest  (linear)\npowering off\n"), "{text}");

    // The same images again, named in another order: found by their file names.
    let reordered = [disks[2].clone(), disks[0].clone(), disks[1].clone()];
    let second = exec(&reordered, &["table"]);
    let text = stdout(&second);
    assert!(second.status.success(), "{text}");
    assert!(
        text.contains("config: disk vdb (serial disk1.img) is now vdc"),
        "{text}"
    );
    assert!(
        text.contains("base: 0 8192 linear vdc 0\nguest: 0 4096 linear vdb 2048\n"),
        "{text}"
    );
}

#[test]
fn exec_stops_at_the_first_failure_with_a_non_zero_status() {
    let (_scratch, disks) = images(&[8]);
    let output = exec(
        &disks,
        &[
            "create a --table \"0 8 linear vda 0\"",
            "create b --table \"0 99999999 linear vda 0\"",
            "create c --table \"0 8 linear vda 8\"",
        ],
    );
    let text = stdout(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("error: create b: vda is too small"), "{text}");
    assert!(!text.contains("create c"), "{text}");
}

#[test]
fn mem_says_offline_mode_has_no_appliance_memory() {
    let (_scratch, disks) = images(&[8]);
    let output = exec(&disks, &["mem"]);
    let text = stdout(&output);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("error: mem reports the appliance's heap and DMA frames; offline mode"),
        "{text}"
    );
}

#[test]
fn bad_disk_arguments_stop_before_anything_runs() {
    let (_scratch, disks) = images(&[8]);
    let twice = exec(&[disks[0].clone(), disks[0].clone()], &["ls"]);
    assert_eq!(twice.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&twice.stderr);
    assert!(
        stderr.ends_with("is given twice; each image is one disk\n"),
        "{stderr}"
    );
    assert!(twice.stdout.is_empty());
    let missing = exec(&[disks[0].with_extension("nothing")], &["ls"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).starts_with("error: opening "));
}

#[test]
fn commands_piped_in_read_as_a_transcript() {
    let (_scratch, disks) = images(&[8]);
    let mut child = offline(&disks, &[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"create a --table \"0 8 linear vda 0\"\nls\nbogus\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let text = stdout(&output);
    assert!(output.status.success(), "{text}");
    assert_eq!(
        text,
        "config: no configuration disk found; changes are not saved (see config init)\n\
         thinbox> create a --table \"0 8 linear vda 0\"\n\
         thinbox> ls\n\
         a  (linear)\n\
         thinbox> bogus\n\
         error: unknown command 'bogus' (try help)\n\
         powering off\n"
    );
}

#[test]
fn commands_from_a_file_stop_at_shutdown() {
    let (scratch, disks) = images(&[8]);
    let script = scratch.path().join("commands.txt");
    fs::write(
        &script,
        "ls\ncreate a --table \"0 8 linear vda 0\"\nshutdown\nls\n",
    )
    .unwrap();
    let output = offline(&disks, &[])
        .stdin(fs::File::open(&script).unwrap())
        .output()
        .unwrap();
    let text = stdout(&output);
    assert!(output.status.success(), "{text}");
    assert_eq!(
        text,
        "config: no configuration disk found; changes are not saved (see config init)\n\
         thinbox> ls\n\
         No devices found\n\
         thinbox> create a --table \"0 8 linear vda 0\"\n\
         thinbox> shutdown\n\
         powering off\n"
    );
}

/// A running `offline --nbd`, killed when dropped.
struct Served {
    child: Child,
    lines: BufReader<ChildStdout>,
    address: String,
}

impl Served {
    fn start(disks: &[PathBuf], commands: &[&str]) -> Served {
        let mut command = offline(disks, &["--nbd", "127.0.0.1:0"]);
        for line in commands {
            command.args(["--exec", line]);
        }
        let mut served = Served::spawn(command.stdin(Stdio::null()));
        served.wait_for("still serving NBD");
        served
    }

    /// Runs `command` and reads its output until it says where it serves NBD.
    fn spawn(command: &mut Command) -> Served {
        let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap());
        let mut address = None;
        let mut seen = String::new();
        while address.is_none() {
            let mut line = String::new();
            assert!(
                lines.read_line(&mut line).unwrap() > 0,
                "no NBD address in {seen}"
            );
            address = line
                .strip_prefix("serving NBD on ")
                .map(|a| a.trim().to_string());
            seen.push_str(&line);
        }
        Served {
            child,
            lines,
            address: address.unwrap(),
        }
    }

    fn wait_for(&mut self, text: &str) -> String {
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            assert!(
                self.lines.read_line(&mut line).unwrap() > 0,
                "no '{text}' in {seen}"
            );
            seen.push_str(&line);
            if line.contains(text) {
                return seen;
            }
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.address)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pattern(bytes: usize) -> Vec<u8> {
    (0..bytes).map(|i| (i * 7 / 3) as u8).collect()
}

#[test]
fn nbd_clients_see_the_devices_as_exports() {
    host_tools::require_for_test(&[Tool::NbdInfo, Tool::QemuImg]);
    let (scratch, disks) = images(&[64, 32]);
    let base = pattern(4 << 20);
    let mut file = fs::OpenOptions::new().write(true).open(&disks[1]).unwrap();
    file.write_all(&base).unwrap();
    drop(file);
    let served = Served::start(
        &disks,
        &[
            "create base --readonly --table \"0 8192 linear vdb 0\"",
            "create guest --table \"0 16384 linear vda 4096\"",
            "create meta --table \"0 4096 linear vdb 16384\"",
            "create data --table \"0 32768 linear vdb 32768\"",
            "pool create pool meta data",
            "thin create clone pool --origin base",
        ],
    );
    let list = run_tool("nbdinfo", &["--list", "--json", &served.uri("")]);
    assert!(list.contains("\"export-name\": \"base\""), "{list}");
    assert!(list.contains("\"export-name\": \"guest\""), "{list}");
    assert!(list.contains("\"export-name\": \"clone\""), "{list}");
    assert!(!list.contains("\"export-name\": \"pool\""), "{list}");
    let info = run_tool("nbdinfo", &["--json", &served.uri("base")]);
    assert!(info.contains("\"is_read_only\": true"), "{info}");
    assert!(info.contains("\"export-size\": 4194304"), "{info}");

    // Copy the read-only base into the guest device, then read the guest back.
    qemu_img_write(&served.uri("base"), &served.uri("guest"));
    let back = scratch.path().join("back.img");
    let copied = qemu_img_read(&served.uri("guest"), &back);
    assert_eq!(copied.len(), 8 << 20);
    assert_eq!(&copied[..base.len()], &base[..]);
    assert!(copied[base.len()..].iter().all(|&b| b == 0));
    // And on the image itself, 2 MiB into vda.
    let raw = fs::read(&disks[0]).unwrap();
    assert_eq!(&raw[2 << 20..(2 << 20) + base.len()], &base[..]);

    // The thin clone reads the base through its external origin, and what is written
    // to it lands in the pool, not in the base.
    let overwrite = scratch.path().join("overwrite.img");
    fs::write(&overwrite, vec![0x5A; 1 << 20]).unwrap();
    qemu_img_write(overwrite.to_str().unwrap(), &served.uri("clone"));
    let clone = qemu_img_read(&served.uri("clone"), &scratch.path().join("clone.img"));
    assert!(clone[..1 << 20].iter().all(|&b| b == 0x5A));
    assert_eq!(&clone[1 << 20..], &base[1 << 20..]);
    assert_eq!(&fs::read(&disks[1]).unwrap()[..base.len()], &base[..]);
    let map = run_tool("nbdinfo", &["--map", &served.uri("clone")]);
    assert!(map.contains("hole"), "{map}");
    assert!(Path::new(&back).exists());
}

#[test]
fn metadata_written_offline_passes_thin_check_and_dumps_like_thin_dump() {
    host_tools::require_for_test(&[Tool::ThinCheck]);
    let (_scratch, disks) = images(&[8, 64, 4]);
    let setup = exec(
        &disks,
        &[
            "config init vdc",
            "dmsetup create pool --table \"0 131072 thin-pool /dev/vda /dev/vdb 128 0\"",
            "dmsetup message /dev/mapper/pool 0 \"create_thin 0\"",
            "dmsetup create thin --table \"0 65536 thin /dev/mapper/pool 0\"",
            "disk-test thin 3",
            "message pool 0 \"create_snap 1 0\"",
            "create snap --table \"0 65536 thin pool 1\"",
            "disk-test snap 1 --force",
            "message pool 0 set_transaction_id 0 7",
            "message pool 0 reserve_metadata_snap",
        ],
    );
    let text = stdout(&setup);
    assert!(setup.status.success(), "{text}");

    let check = Command::new("thin_check").arg(&disks[0]).output().unwrap();
    assert!(
        check.status.success(),
        "thin_check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    for snap in [false, true] {
        let mut args = vec!["thin_dump"];
        if snap {
            args.push("-m");
        }
        let theirs = Command::new(args[0])
            .args(&args[1..])
            .arg(&disks[0])
            .output()
            .unwrap();
        assert!(theirs.status.success());
        let command = if snap {
            "dump pool --metadata-snap"
        } else {
            "dump pool"
        };
        let ours = exec(&disks, &[command]);
        let ours = stdout(&ours);
        let xml: String = ours
            .lines()
            .filter(|line| line.trim_start().starts_with('<'))
            .map(|line| format!("{}\n", line.trim()))
            .collect();
        let expected: String = String::from_utf8_lossy(&theirs.stdout)
            .lines()
            .map(|line| format!("{}\n", line.trim()))
            .collect();
        assert_eq!(xml, expected, "dump (metadata snapshot: {snap})");
        assert!(xml.contains("transaction=\"7\""), "{xml}");
        assert!(xml.contains("<device dev_id=\"1\""), "{xml}");
    }
}

#[test]
fn fast_zero_requests_unmap_thin_blocks_or_fail_with_enotsup() {
    host_tools::require_for_test(&[Tool::NbdSh, Tool::NbdInfo]);
    let (_scratch, disks) = images(&[16, 64]);
    let served = Served::start(
        &disks,
        &["pool create pool vda vdb", "thin create t pool --size 1M"],
    );
    // Two 64 KiB blocks written; zeroing all of the second one unmaps it, zeroing
    // part of the first would need a write and fails fast with ENOTSUP.
    let script = "\
import errno
assert h.can_fast_zero()
h.pwrite(b'\\x22' * 131072, 0)
h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO)
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    raise SystemExit('partial fast zero succeeded')
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
assert h.pread(131072, 0) == b'\\x22' * 65536 + bytes(65536)
";
    run_nbdsh(&served.uri("t"), script);
    let map = run_tool("nbdinfo", &["--map", &served.uri("t")]);
    let first = map.lines().next().unwrap_or_default();
    assert!(first.split_whitespace().take(2).eq(["0", "65536"]), "{map}");
    assert!(first.ends_with("data"), "{map}");
}

/// Writes that no client flushes are committed by the periodic commit (every second
/// while changes are pending) even when nothing else arrives: after 2 s idle the
/// metadata on the image maps the written block.
#[test]
fn an_idle_pool_commits_unflushed_writes() {
    // thin_dump comes with thin_check.
    host_tools::require_for_test(&[Tool::NbdSh, Tool::ThinCheck]);
    let (_scratch, disks) = images(&[8, 64]);
    let served = Served::start(
        &disks,
        &["pool create pool vda vdb", "thin create vol pool --size 8M"],
    );
    run_nbdsh(
        &served.uri("vol"),
        "h.pwrite(b'\\x5a' * 4096, 5 * 65536 + 4096)",
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    drop(served);
    let dump = run_tool("thin_dump", &[disks[0].to_str().unwrap()]);
    assert!(
        dump.contains("<single_mapping origin_block=\"5\" data_block=\"0\""),
        "{dump}"
    );
}

/// Per thin device, per 64 KiB block: a token naming its data block (None =
/// unmapped); equal tokens in two devices are the same data block.
type Blocks = std::collections::BTreeMap<String, Vec<Option<u64>>>;

const CHANGED_BLOCKS: usize = 64;

/// Writes `blocks` of `dev` (whole blocks; a block shared with another device or
/// unmapped gets a new data block) and trims `trims`, flushing; updates the model.
fn write_blocks(served: &Served, model: &mut Blocks, dev: &str, blocks: &[usize], trims: &[usize]) {
    let mut script = String::new();
    for &block in blocks {
        script.push_str(&format!(
            "h.pwrite(bytes([{}]) * 65536, {})\n",
            block % 251 + 1,
            block << 16
        ));
        model_write(model, dev, block);
    }
    for &block in trims {
        script.push_str(&format!("h.trim(65536, {})\n", block << 16));
        model.get_mut(dev).unwrap()[block] = None;
    }
    script.push_str("h.flush()\nh.shutdown()\n");
    run_nbdsh(&served.uri(dev), &script);
}

/// A whole-block write in the model: a block shared with another device, or
/// unmapped, gets a new data block; an exclusive one is written in place.
fn model_write(model: &mut Blocks, dev: &str, block: usize) {
    let token = model[dev][block];
    let shared = token.is_some()
        && model
            .iter()
            .any(|(other, map)| other != dev && map[block] == token);
    if token.is_none() || shared {
        let next = model
            .values()
            .flatten()
            .flatten()
            .max()
            .map_or(1, |t| t + 1);
        model.get_mut(dev).unwrap()[block] = Some(next);
    }
}

/// `nbdinfo --map=CONTEXT` as one flag per block.
fn changed_map(served: &Served, dev: &str, base: &str) -> Vec<bool> {
    let context = format!("--map=thinbox:changed:{base}");
    let map = run_tool("nbdinfo", &[&context, &served.uri(dev)]);
    let mut blocks = Vec::new();
    for line in map.lines() {
        let fields: Vec<u64> = line
            .split_whitespace()
            .take(3)
            .map(|f| f.parse().unwrap())
            .collect();
        let [offset, length, flags] = fields[..] else {
            panic!("unexpected map line {line}")
        };
        assert_eq!(offset, (blocks.len() as u64) << 16, "{map}");
        assert_eq!(
            length % 65536,
            0,
            "extents follow the pool's blocks here: {map}"
        );
        blocks.extend(std::iter::repeat_n(flags & 1 == 1, (length >> 16) as usize));
    }
    blocks
}

fn expected_changed(model: &Blocks, dev: &str, base: &str) -> Vec<bool> {
    (0..CHANGED_BLOCKS)
        .map(|b| model[dev][b] != model[base][b])
        .collect()
}

#[test]
fn the_changed_context_shows_what_differs_from_every_other_thin_device() {
    host_tools::require_for_test(&[Tool::NbdInfo, Tool::NbdSh, Tool::QemuImg]);
    let (_scratch, disks) = images(&[8, 16, 64, 16]);
    let setup = exec(
        &disks,
        &[
            "config init vda",
            "pool create pool vdb vdc --block-size 128",
            "thin create vol pool --size 4M",
            "thin create other pool --size 4M",
            "create lin --table \"0 128 linear vda 4096\"",
            "create m2 --table \"0 4096 linear vdd 0\"",
            "create d2 --table \"0 28672 linear vdd 4096\"",
            "pool create pool2 m2 d2",
            "thin create far pool2 --size 4M",
        ],
    );
    assert!(setup.status.success(), "{}", stdout(&setup));
    let mut model = Blocks::new();
    for dev in ["vol", "other"] {
        model.insert(dev.to_string(), vec![None; CHANGED_BLOCKS]);
    }
    // A small linear congruential sequence of block numbers.
    let mut seed = 13u64;
    let mut next_block = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize % CHANGED_BLOCKS
    };
    for round in 1..=3 {
        let snap = format!("s{round}");
        let served = Served::start(&disks, &[&format!("snap create {snap} vol")]);
        model.insert(snap, model["vol"].clone());
        for dev in ["vol", "other"] {
            let writes: Vec<usize> = (0..12).map(|_| next_block()).collect();
            let trims: Vec<usize> = (0..2).map(|_| next_block()).collect();
            write_blocks(&served, &mut model, dev, &writes, &trims);
        }
    }

    let served = Served::start(&disks, &[]);
    for dev in model.keys() {
        for base in model.keys() {
            assert_eq!(
                changed_map(&served, dev, base),
                expected_changed(&model, dev, base),
                "{dev} against {base}"
            );
        }
    }

    // libnbd: the view is the one of the moment the export was opened, while
    // another connection writes; a new connection sees the write.
    let before = expected_changed(&model, "vol", "s1");
    let untouched = before.iter().position(|changed| !changed).unwrap();
    let script = format!(
        "import nbd\n\
         def changed(handle):\n\
         \x20   out = []\n\
         \x20   def extents(context, offset, entries, error):\n\
         \x20       for i in range(0, len(entries), 2):\n\
         \x20           out.extend([entries[i + 1] & 1 == 1] * (entries[i] // 65536))\n\
         \x20   handle.block_status(4 << 20, 0, extents)\n\
         \x20   return out\n\
         reader = nbd.NBD()\n\
         reader.add_meta_context('thinbox:changed:s1')\n\
         reader.connect_uri('{uri}')\n\
         first = changed(reader)\n\
         writer = nbd.NBD()\n\
         writer.connect_uri('{uri}')\n\
         writer.pwrite(b'\\x77' * 65536, {offset})\n\
         writer.flush()\n\
         writer.shutdown()\n\
         again = changed(reader)\n\
         fresh = nbd.NBD()\n\
         fresh.add_meta_context('thinbox:changed:s1')\n\
         fresh.connect_uri('{uri}')\n\
         print(first == {before}, again == first, changed(fresh)[{untouched}])\n",
        uri = served.uri("vol"),
        offset = untouched << 16,
        before = python_bools(&before),
    );
    let printed = run_nbdsh(&served.uri("vol"), &script);
    assert_eq!(printed.trim(), "True True True", "{printed}");
    model_write(&mut model, "vol", untouched);

    // Listing: everything, prefixes, exact names; bases that are unknown, in another
    // pool or not thin devices match nothing.
    let list = "import nbd\n\
                l = nbd.NBD()\n\
                l.set_opt_mode(True)\n\
                l.connect_uri(URI)\n\
                for queries in [[], ['thinbox:changed:'], ['thinbox:'], ['base:'], \
                ['thinbox:changed:s2'], ['thinbox:changed:nope', 'thinbox:changed:far', \
                'thinbox:changed:lin', 'other:', 'thinbox:changed:s2x']]:\n\
                \x20   l.clear_meta_contexts()\n\
                \x20   for q in queries:\n\
                \x20       l.add_meta_context(q)\n\
                \x20   names = []\n\
                \x20   l.opt_list_meta_context(lambda name: names.append(name))\n\
                \x20   print(' '.join(sorted(names)) or '-')\n\
                l.opt_abort()\n"
        .replace("URI", &format!("'{}'", served.uri("vol")));
    let listed = run_nbdsh(&served.uri("vol"), &list);
    let changed = "thinbox:changed:other thinbox:changed:s1 thinbox:changed:s2 \
                   thinbox:changed:s3 thinbox:changed:vol";
    assert_eq!(
        listed,
        format!(
            "base:allocation {changed}\n{changed}\n{changed}\nbase:allocation\nthinbox:changed:s2\n-\n"
        ),
    );
    for bad in ["nope", "far", "lin"] {
        let context = format!("--map=thinbox:changed:{bad}");
        let output = Command::new("nbdinfo")
            .args([&context, &served.uri("vol")])
            .output()
            .unwrap();
        assert!(!output.status.success());
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("does not support metadata context"),
            "{output:?}"
        );
    }

    // QEMU reads the context as a dirty bitmap: changed extents are "not present".
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=vol,\
         x-dirty-bitmap=thinbox:changed:s2",
        served.address.rsplit(':').next().unwrap()
    );
    let map = run_tool("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    let mut dirty = Vec::new();
    for line in map.lines() {
        let number = |key: &str| -> u64 {
            let at = line.find(&format!("\"{key}\": ")).unwrap() + key.len() + 4;
            line[at..]
                .split([',', '}'])
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let absent = line.contains("\"present\": false");
        dirty.extend(std::iter::repeat_n(
            absent,
            (number("length") >> 16) as usize,
        ));
        assert_eq!(number("start") % 65536, 0);
    }
    assert_eq!(dirty, expected_changed(&model, "vol", "s2"), "{map}");
}

fn python_bools(flags: &[bool]) -> String {
    let items: Vec<&str> = flags
        .iter()
        .map(|&f| if f { "True" } else { "False" })
        .collect();
    format!("[{}]", items.join(", "))
}

/// Relays the connections made to a Unix socket to the NBD server from a chosen
/// loopback address: real clients cannot pick their source address, so they connect
/// through this to reach the server as 127.0.0.2.
struct Relay {
    socket: PathBuf,
}

impl Relay {
    fn start(dir: &Path, from: std::net::Ipv4Addr, server: &str) -> Relay {
        use std::os::unix::net::UnixListener;
        let server: std::net::SocketAddr = server.parse().unwrap();
        let socket = dir.join(format!("from-{from}-to-{}.sock", server.port()));
        let listener = UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let upstream = connect_from(from, server);
                for (mut reader, mut writer) in [
                    (
                        Box::new(client.try_clone().unwrap()) as Box<dyn std::io::Read + Send>,
                        Box::new(upstream.try_clone().unwrap()) as Box<dyn HalfClose + Send>,
                    ),
                    (Box::new(upstream), Box::new(client)),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut reader, &mut writer);
                        writer.close_write();
                    });
                }
            }
        });
        Relay { socket }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

/// A stream whose sending side can be shut while its receiving side stays open.
trait HalfClose: Write {
    fn close_write(&self);
}

impl HalfClose for std::net::TcpStream {
    fn close_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl HalfClose for std::os::unix::net::UnixStream {
    fn close_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// A TCP connection to `server` from `from` (any port).
fn connect_from(from: std::net::Ipv4Addr, server: std::net::SocketAddr) -> std::net::TcpStream {
    use rustix::net::{AddressFamily, SocketType, bind, connect, socket};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    bind(&fd, &std::net::SocketAddr::from((from, 0))).unwrap();
    connect(&fd, &server).unwrap();
    std::net::TcpStream::from(fd)
}

/// What `nbdinfo ARGS` printed on standard error, expecting it to fail. With libnbd's
/// debug output on, as libnbd 1.14 shows the server's error message only there.
fn nbdinfo_refused(args: &[&str]) -> String {
    let output = Command::new("nbdinfo")
        .args(args)
        .env("LIBNBD_DEBUG", "1")
        .output()
        .unwrap();
    assert!(!output.status.success(), "nbdinfo {args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn access_lists_decide_what_each_loopback_client_may_do_and_survive_a_restart() {
    host_tools::require_for_test(&[Tool::NbdInfo, Tool::NbdSh]);
    let (scratch, disks) = images(&[4, 16]);
    let rules = [
        "nbd default deny",
        "nbd allow * 127.0.0.1",
        "nbd allow vol0 127.0.0.2 ro",
        "nbd deny secret 127.0.0.2 hide",
    ];
    let mut commands = vec![
        "config init vda",
        "create vol0 --table \"0 8192 linear vdb 0\"",
        "create vol1 --table \"0 8192 linear vdb 8192\"",
        "create secret --table \"0 8192 linear vdb 16384\"",
    ];
    commands.extend(rules);
    let served = Served::start(&disks, &commands);
    let (first, second) = check_access(&served, scratch.path());

    // python3-libnbd: 127.0.0.1 writes vol0; 127.0.0.2 reads it, and its writes (sent
    // with libnbd's checks off) come back EPERM.
    run_nbdsh(&first.uri("vol0"), "h.pwrite(b'\\x3c' * 4096, 8192)");
    let script = "\
import errno
assert h.is_read_only()
assert h.pread(4096, 8192) == b'\\x3c' * 4096
h.set_strict_mode(0)
for write in (lambda: h.pwrite(b'x' * 4096, 0), lambda: h.zero(4096, 0), lambda: h.trim(4096, 0)):
    try:
        write()
        raise SystemExit('a write on a read-only grant succeeded')
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
print('refused')
";
    assert_eq!(run_nbdsh(&second.uri("vol0"), script), "refused\n");
    drop(served);
    let raw = fs::read(&disks[1]).unwrap();
    assert!(raw[8192..8192 + 4096].iter().all(|&b| b == 0x3c));
    assert!(
        raw[..4096].iter().all(|&b| b == 0),
        "the refused write reached the disk"
    );

    // The rules were saved with the devices: the next run serves the same way.
    let shown = exec(&disks, &["nbd acl"]);
    let text = stdout(&shown);
    assert!(
        text.contains(
            "thinbox> nbd acl\ndefault: deny\nEXPORT  CLIENTS    ACCESS\n\
             *       127.0.0.1  allow\nvol0    127.0.0.2  allow ro\n\
             secret  127.0.0.2  deny hide\n"
        ),
        "{text}"
    );
    let served = Served::start(&disks, &[]);
    check_access(&served, scratch.path());
}

/// Export names in `nbdinfo --list --json` output.
fn listed_names(list: &str) -> Vec<String> {
    list.lines()
        .filter_map(|line| line.trim().strip_prefix("\"export-name\": \""))
        .map(|name| name.trim_end_matches("\",").to_string())
        .collect()
}

/// What the access test's rules give 127.0.0.1 (directly and relayed) and
/// 127.0.0.2 (relayed), seen through nbdinfo; returns the relays (from 127.0.0.1, from
/// 127.0.0.2), their sockets in `dir`.
fn check_access(served: &Served, dir: &Path) -> (Relay, Relay) {
    let first = Relay::start(dir, std::net::Ipv4Addr::LOCALHOST, &served.address);
    let second = Relay::start(dir, std::net::Ipv4Addr::new(127, 0, 0, 2), &served.address);
    let list = run_tool("nbdinfo", &["--list", "--json", &served.uri("")]);
    assert_eq!(listed_names(&list), ["vol0", "vol1", "secret"], "{list}");
    let list = run_tool("nbdinfo", &["--list", "--json", &first.uri("")]);
    assert_eq!(listed_names(&list), ["vol0", "vol1", "secret"], "{list}");
    let list = run_tool("nbdinfo", &["--list", "--json", &second.uri("")]);
    assert_eq!(listed_names(&list), ["vol0"], "{list}");

    let info = run_tool("nbdinfo", &["--json", &served.uri("vol0")]);
    assert!(info.contains("\"is_read_only\": false"), "{info}");
    let info = run_tool("nbdinfo", &["--json", &second.uri("vol0")]);
    assert!(info.contains("\"is_read_only\": true"), "{info}");
    // libnbd reports NBD_REP_ERR_POLICY as ENOTSUP and NBD_REP_ERR_UNKNOWN as ENOENT.
    let refused = nbdinfo_refused(&[&second.uri("vol1")]);
    assert!(
        refused.contains("server error message: access to export 'vol1' is denied to 127.0.0.2"),
        "{refused}"
    );
    assert!(
        refused.contains("opt_go request: Operation not supported"),
        "{refused}"
    );
    let hidden = nbdinfo_refused(&[&second.uri("secret")]);
    assert!(
        hidden.contains("server error message: export 'secret' not present"),
        "{hidden}"
    );
    assert!(
        hidden.contains("opt_go request: No such file or directory"),
        "{hidden}"
    );
    (first, second)
}

/// `thin resize` while the server runs, typed on standard input: a new NBD
/// connection sees the new size (`nbdinfo --size`).
#[test]
fn thin_resize_shows_to_new_nbd_connections() {
    host_tools::require_for_test(&[Tool::NbdInfo]);
    let (_scratch, disks) = images(&[16, 64]);
    let mut command = offline(&disks, &["--nbd", "127.0.0.1:0"]);
    let mut served = Served::spawn(command.stdin(Stdio::piped()));
    let mut console = served.child.stdin.take().unwrap();
    let mut run = |served: &mut Served, line: &str, answer: &str| {
        writeln!(console, "{line}").unwrap();
        served.wait_for(answer)
    };
    run(&mut served, "pool create pool vda vdb", "thin-pool vda vdb");
    run(
        &mut served,
        "thin create t pool --size 1M",
        "t: thin device 0",
    );
    let size = |served: &Served| run_tool("nbdinfo", &["--size", &served.uri("t")]);
    assert_eq!(size(&served).trim(), "1048576");
    run(&mut served, "thin resize t 3M", "thinbox> thin resize t 3M");
    run(&mut served, "table t", "0 6144 thin pool 0");
    assert_eq!(size(&served).trim(), "3145728");
}
