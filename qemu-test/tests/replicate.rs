//! Replication between two booted appliances: the destination reaches the source
//! through the host's forward of the source's NBD port (10.0.2.2 from inside QEMU's
//! user network), as two appliances on one network would reach each other.
//!
//! One test replicates a volume in rounds of writes, snapshots and syncs while an NBD
//! client keeps writing to and verifying the source volume; after each round the
//! replica's snapshot reads what the source's does, and the sync copied what
//! `thin delta` says changed. The other cuts the destination's power mid-import and
//! resumes the import after the reboot, whose boot names it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{
    Appliance, Options, Scratch, monitor_command, nbdsh_command, qemu_img_read, qemu_img_write,
    wait_for_greeting,
};

const MIB: u64 = 1 << 20;
/// What a copy may take on a slow host.
const COPY_TIMEOUT: Duration = Duration::from_secs(300);

/// A client that writes to its export when told (`write N`: N random writes and
/// whole-block trims, then a flush) and otherwise reads random 64 KiB and checks them
/// against what it wrote; `quit` prints how many reads it checked.
const CLIENT: &str = r#"
import random, select, sys
size = h.get_size()
model = bytearray(size)
rng = random.Random(13)
checked = 0
while True:
    if select.select([sys.stdin], [], [], 0)[0]:
        words = sys.stdin.readline().split()
        if words[0] == 'quit':
            break
        for _ in range(int(words[1])):
            if rng.randrange(5) == 0:
                n = rng.randrange(1, 5) * 65536
                off = rng.randrange((size - n) // 65536) * 65536
                h.trim(n, off)
                model[off:off + n] = bytes(n)
            else:
                n = rng.randrange(1, 65) * 4096
                off = rng.randrange((size - n) // 4096) * 4096
                data = bytes([rng.randrange(1, 256)]) * n
                h.pwrite(data, off)
                model[off:off + n] = data
        h.flush()
        print('written', flush=True)
        continue
    off = rng.randrange(size // 65536) * 65536
    assert h.pread(65536, off) == model[off:off + 65536], f'read at {off}'
    checked += 1
print('checked', checked, flush=True)
"#;

struct Client {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Client {
    fn start(uri: &str) -> Client {
        let mut command = nbdsh_command(uri, CLIENT);
        command.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        Client {
            child,
            input,
            output,
        }
    }

    fn say(&mut self, line: &str) -> String {
        writeln!(self.input, "{line}").unwrap();
        let mut answer = String::new();
        self.output.read_line(&mut answer).unwrap();
        answer
    }

    fn write(&mut self, operations: usize) {
        let answer = self.say(&format!("write {operations}"));
        assert_eq!(answer.trim(), "written", "the client failed");
    }

    /// Ends the client; returns how many reads it checked.
    fn finish(mut self) -> u64 {
        let answer = self.say("quit");
        assert!(self.child.wait().unwrap().success(), "{answer}");
        answer
            .trim()
            .strip_prefix("checked ")
            .and_then(|count| count.parse().ok())
            .unwrap_or_else(|| panic!("the client failed: {answer}"))
    }
}

fn boot(options: &Options) -> Appliance {
    let appliance = Appliance::boot(options.clone()).unwrap();
    wait_for_greeting(appliance.nbd_port().unwrap(), Duration::from_secs(60)).unwrap();
    appliance
}

/// Configuration, metadata and data disks of one appliance.
fn disks(scratch: &Scratch, tag: &str, data_mib: u64) -> Options {
    let disk = |name: &str, bytes| scratch.disk(&format!("{tag}-{name}.img"), bytes).unwrap();
    Options::bios()
        .disk(disk("config", 8 * MIB))
        .disk(disk("meta", 16 * MIB))
        .disk(disk("data", data_mib * MIB))
        .nbd()
}

fn setup(appliance: &mut Appliance) {
    appliance.console_ok("config init vda").unwrap();
    appliance.console_ok("pool create pool vdb vdc").unwrap();
}

/// The source's export `export` as the destination reaches it.
fn seen_from_guest(source: &Appliance, export: &str) -> String {
    format!("nbd://10.0.2.2:{}/{export}", source.nbd_port().unwrap())
}

/// Runs a command that follows a copy to its end; returns the summary line.
fn copy(appliance: &mut Appliance, command: &str) -> String {
    let output = appliance
        .console_with_timeout(command, COPY_TIMEOUT)
        .unwrap();
    assert!(!output.contains("error:"), "{command}: {output}");
    output
        .lines()
        .find(|line| line.contains(" copied ("))
        .unwrap_or_else(|| panic!("{command}: {output}"))
        .to_string()
}

/// The bytes a summary line says were copied.
fn copied(summary: &str) -> &str {
    summary
        .split(" s: ")
        .nth(1)
        .and_then(|rest| rest.split(" copied").next())
        .unwrap_or_else(|| panic!("{summary}"))
}

fn same_content(scratch: &Scratch, left: &str, right: &str) -> bool {
    let read = |uri: &str, name: &str| qemu_img_read(uri, &scratch.path().join(name));
    read(left, "left.raw") == read(right, "right.raw")
}

#[test]
fn a_volume_replicates_in_three_rounds_while_the_source_serves_a_client() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::QemuImg, Tool::NbdSh]);
    let scratch = Scratch::new().unwrap();
    let source_options = disks(&scratch, "source", 128);
    let replica_options = disks(&scratch, "replica", 128);
    let mut source = boot(&source_options);
    let mut replica = boot(&replica_options);
    setup(&mut source);
    setup(&mut replica);
    source
        .console_ok("thin create vol pool --size 32M")
        .unwrap();
    let mut client = Client::start(&source.nbd_uri("vol").unwrap());
    client.write(150);

    for round in 0..4 {
        let snapshot = format!("s{round}");
        source
            .console_ok(&format!("snap create {snapshot} vol"))
            .unwrap();
        let from = seen_from_guest(&source, &snapshot);
        let summary = if round == 0 {
            copy(
                &mut replica,
                &format!("thin import replica pool --from {from}"),
            )
        } else {
            let base = format!("s{}", round - 1);
            let delta = source
                .console_ok(&format!("thin delta {base} {snapshot}"))
                .unwrap();
            // "changed: 3 ranges, 33 blocks, 2.06 MiB"
            let changed = delta
                .lines()
                .find_map(|line| line.strip_prefix("changed: "))
                .and_then(|line| line.rsplit(", ").next())
                .unwrap_or_else(|| panic!("{delta}"))
                .to_string();
            let summary = copy(
                &mut replica,
                &format!("thin sync replica --from {from} --changed-since {base}"),
            );
            assert_eq!(copied(&summary), changed, "round {round}: {summary}");
            summary
        };
        assert!(summary.contains("from nbd://10.0.2.2:"), "{summary}");
        replica
            .console_ok(&format!("snap create replica-{snapshot} replica"))
            .unwrap();
        assert!(
            same_content(
                &scratch,
                &source.nbd_uri(&snapshot).unwrap(),
                &replica.nbd_uri(&format!("replica-{snapshot}")).unwrap()
            ),
            "round {round}: the replica differs from the source"
        );
        if round < 3 {
            client.write(40);
        }
    }
    assert!(client.finish() > 0, "the client checked reads throughout");
    let listed = replica.console_ok("thin ls pool").unwrap();
    assert!(listed.contains("replica-s3"), "{listed}");
    source.shutdown().unwrap();
    replica.shutdown().unwrap();
}

/// The checkpoint of the import into `name` saved in the configuration, if any.
fn saved_checkpoint(appliance: &mut Appliance, name: &str) -> Option<u64> {
    let shown = appliance.console_ok("config show").unwrap();
    let prefix = format!("import {name} ");
    shown.lines().find_map(|line| {
        line.trim()
            .strip_prefix(&prefix)?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

#[test]
fn an_import_cut_by_a_power_loss_resumes_after_the_reboot() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::QemuImg]);
    let scratch = Scratch::new().unwrap();
    let mut source = boot(&disks(&scratch, "source", 256));
    setup(&mut source);
    source
        .console_ok("thin create vol pool --size 160M")
        .unwrap();
    let content = scratch.path().join("content.raw");
    let mut rng = fastrand::Rng::with_seed(16);
    let mut bytes = vec![0u8; (160 * MIB) as usize];
    // Data with holes between: 4 MiB of every 5 MiB.
    for (index, chunk) in bytes.chunks_mut(MIB as usize).enumerate() {
        if index % 5 != 4 {
            rng.fill(chunk);
        }
    }
    std::fs::write(&content, &bytes).unwrap();
    qemu_img_write(&content.to_string_lossy(), &source.nbd_uri("vol").unwrap());
    let from = seen_from_guest(&source, "vol");

    let options = disks(&scratch, "replica", 256);
    let monitor = scratch.path().join("monitor.sock");
    let mut replica = boot(&options.clone().monitor(&monitor));
    setup(&mut replica);
    // The data disk slowed to 8 MB/s: the cut below lands mid-import on any host.
    let throttled =
        monitor_command(&monitor, "block_set_io_throttle vd2 8000000 0 0 0 0 0").unwrap();
    assert_eq!(throttled, "", "QEMU did not slow the data disk down");
    replica
        .console_ok(&format!(
            "thin import replica pool --from {from} --background"
        ))
        .unwrap();
    let started = Instant::now();
    let checkpoint = loop {
        if let Some(checkpoint) = saved_checkpoint(&mut replica, "replica").filter(|&at| at > 0) {
            break checkpoint;
        }
        assert!(
            started.elapsed() < COPY_TIMEOUT,
            "no checkpoint was saved: {}",
            replica.console_ok("jobs").unwrap()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let jobs = replica.console_ok("jobs").unwrap();
    assert!(jobs.contains("import/replica"), "still importing: {jobs}");
    replica.kill();

    let mut replica = boot(&options);
    // The boot names the unfinished import and the command that continues it.
    let unfinished = format!("config: the import into replica from {from} stopped after ");
    assert!(
        replica
            .boot_log()
            .iter()
            .any(|line| line.contains(&unfinished)
                && line.contains("; thin import --resume replica continues it")),
        "{:?}",
        replica.boot_log()
    );
    let resumed = copy(&mut replica, "thin import --resume replica");
    assert!(resumed.contains("imported 160.00 MiB"), "{resumed}");
    assert_ne!(
        copied(&resumed),
        "128.00 MiB",
        "the import started over after checkpoint {checkpoint}: {resumed}"
    );
    assert!(same_content(
        &scratch,
        &source.nbd_uri("vol").unwrap(),
        &replica.nbd_uri("replica").unwrap()
    ));
    source.shutdown().unwrap();
    replica.shutdown().unwrap();
}
