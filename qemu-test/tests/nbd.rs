//! The appliance's NBD service on its virtio-net NIC, driven by the real clients
//! (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh) through QEMU's port forward, and
//! the `net` console command.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use host_tools::Tool;
use qemu_test::{Appliance, Options, Scratch, read_greeting, wait_for_greeting};

const MIB: u64 = 1 << 20;
/// How long the NBD server may take to answer after boot.
const READY: Duration = Duration::from_secs(60);

fn tools() {
    host_tools::require_for_test(&[
        Tool::Qemu,
        Tool::QemuImg,
        Tool::QemuIo,
        Tool::NbdInfo,
        Tool::NbdCopy,
        Tool::NbdSh,
    ]);
}

/// Boots with `disks` (virtio-blk, `vda`, `vdb`, ...) and an NBD forward, and waits
/// for the NBD server's greeting.
fn boot(disks: &[&Path]) -> Appliance {
    tools();
    let mut options = Options::bios().nbd();
    for disk in disks {
        options = options.disk(disk);
    }
    let appliance = Appliance::boot(options).unwrap();
    ready(&appliance);
    appliance
}

fn ready(appliance: &Appliance) {
    let port = appliance.nbd_port().unwrap();
    if let Err(why) = wait_for_greeting(port, READY) {
        panic!("{why}\n{}", appliance.transcript());
    }
}

fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("running {program}: {error}"))
}

/// Runs a client that must succeed; returns its standard output.
fn run(program: &str, args: &[&str]) -> String {
    let done = output(program, args);
    assert!(
        done.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        done.status,
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    String::from_utf8(done.stdout).unwrap()
}

/// Runs `qemu-io` commands on `uri`, each as its own `-c`.
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw", "-t", "writeback", uri];
    for command in commands {
        args.extend(["-c", command]);
    }
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io {commands:?}:\n{out}"
    );
    out
}

fn field<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find_map(|line| line.strip_prefix(label))
        .unwrap_or_else(|| panic!("no '{label}' line in:\n{text}"))
        .trim()
}

#[test]
fn net_shows_the_lease_and_switches_between_static_and_dhcp() {
    let appliance = &mut boot(&[]);
    let port = appliance.nbd_port().unwrap();
    let shown = appliance.console_ok("net").unwrap();
    assert_eq!(field(&shown, "mac:"), "52:54:00:12:34:56  link up");
    assert_eq!(field(&shown, "address:"), "10.0.2.15/24 (dhcp)");
    assert_eq!(field(&shown, "gateway:"), "10.0.2.2");
    assert!(field(&shown, "nbd:").starts_with("port 10809, "), "{shown}");
    let received: u64 = field(&shown, "rx:")
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(received > 0, "{shown}");

    // Bad input: one error line, nothing changes.
    for bad in [
        "net set 10.0.2.15 10.0.2.2",
        "net set 10.0.2.15/24 10.0.3.2",
        "net set 10.0.2.15/24",
        "net bogus",
    ] {
        let answer = appliance.console(bad).unwrap();
        assert!(
            answer.starts_with("error: ") && answer.lines().count() == 1,
            "{bad}: {answer}"
        );
    }
    assert_eq!(
        appliance.console_ok("net").unwrap().lines().nth(1),
        shown.lines().nth(1)
    );

    // A static address the forward does not lead to: clients get no greeting.
    let set = appliance
        .console_ok("net set 10.0.2.20/24 10.0.2.2")
        .unwrap();
    assert_eq!(set, "address 10.0.2.20/24 gateway 10.0.2.2 (static)");
    assert_eq!(
        field(&appliance.console_ok("net").unwrap(), "address:"),
        "10.0.2.20/24 (static)"
    );
    assert!(read_greeting(port, Duration::from_secs(3)).is_err());

    // The address QEMU forwards to, set statically: served again.
    appliance
        .console_ok("net set 10.0.2.15/24 10.0.2.2")
        .unwrap();
    read_greeting(port, Duration::from_secs(10)).unwrap();

    // Back to DHCP: the lease comes back.
    assert_eq!(
        appliance.console_ok("net dhcp").unwrap(),
        "address: requesting one by DHCP"
    );
    ready(appliance);
    let shown = appliance.console_ok("net").unwrap();
    assert_eq!(field(&shown, "address:"), "10.0.2.15/24 (dhcp)");
    let accepted: u64 = field(&shown, "nbd:")
        .rsplit(", ")
        .next()
        .and_then(|accepted| accepted.strip_suffix(" accepted"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(accepted >= 2, "{shown}");
}

/// CPU time (user + system) QEMU has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may contain spaces; the fields after it are space-separated.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_appliance_sleeps_after_disk_io_on_a_line_it_shares_with_the_nic() {
    let scratch = Scratch::new().unwrap();
    // Three virtio disks put the third on the NIC's interrupt line on q35.
    let disks: Vec<PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|name| scratch.disk(&format!("{name}.img"), 16 * MIB).unwrap())
        .collect();
    let paths: Vec<&Path> = disks.iter().map(PathBuf::as_path).collect();
    let appliance = &mut boot(&paths);
    for disk in ["vda", "vdb", "vdc"] {
        appliance
            .console_ok(&format!("disk-test {disk} 4 --force"))
            .unwrap();
    }
    // /proc counts in USER_HZ, 100 per second on Linux.
    let ticks_per_second = 100;
    let before = cpu_ticks(appliance.pid());
    std::thread::sleep(Duration::from_secs(5));
    let used = cpu_ticks(appliance.pid()) - before;
    // A spinning CPU would use most of the 500 ticks; an idle one a few.
    assert!(
        used < 5 * ticks_per_second / 4,
        "QEMU used {used} ticks in 5 s while the appliance was idle"
    );
}

/// Sends `bytes` on a fresh connection after the greeting, then `finish`es it.
fn raw_client(port: u16, bytes: &[u8], finish: impl FnOnce(TcpStream)) {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    stream.write_all(bytes).unwrap();
    finish(stream)
}

/// The bytes of a fixed-newstyle handshake that opens `export` with
/// `NBD_OPT_EXPORT_NAME` (client flags FIXED_NEWSTYLE | NO_ZEROES).
fn export_name_handshake(export: &str) -> Vec<u8> {
    let mut bytes = 3u32.to_be_bytes().to_vec();
    bytes.extend(b"IHAVEOPT");
    bytes.extend(1u32.to_be_bytes());
    bytes.extend((export.len() as u32).to_be_bytes());
    bytes.extend(export.as_bytes());
    bytes
}

/// A simple-reply request header.
fn request(command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut bytes = 0x2560_9513u32.to_be_bytes().to_vec();
    bytes.extend(0u16.to_be_bytes());
    bytes.extend(command.to_be_bytes());
    bytes.extend(cookie.to_be_bytes());
    bytes.extend(offset.to_be_bytes());
    bytes.extend(length.to_be_bytes());
    bytes
}

/// Reads the 10-byte answer to EXPORT_NAME (size, flags); returns the size.
fn read_export_reply(stream: &mut TcpStream) -> u64 {
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).unwrap();
    u64::from_be_bytes(reply[..8].try_into().unwrap())
}

/// Reads one simple reply; returns (error, cookie).
fn read_simple_reply(stream: &mut TcpStream) -> (u32, u64) {
    let mut reply = [0u8; 16];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
    (
        u32::from_be_bytes(reply[4..8].try_into().unwrap()),
        u64::from_be_bytes(reply[8..16].try_into().unwrap()),
    )
}

/// Every way a client can misbehave, each on its own connection, while a
/// well-behaved client writes and verifies data on another; the appliance keeps
/// serving and stays up.
fn bad_clients_do_not_disturb_a_good_one(appliance: &mut Appliance, export: &str) {
    let port = appliance.nbd_port().unwrap();
    let uri = appliance.nbd_uri(export).unwrap();
    let good = std::thread::spawn({
        let uri = uri.clone();
        move || {
            for round in 0..6u64 {
                let pattern = 0x30 + round;
                let offset = round * MIB;
                qemu_io(
                    &uri,
                    &[
                        &format!("write -P {pattern} {offset} 1M"),
                        &format!("read -P {pattern} {offset} 1M"),
                    ],
                );
            }
        }
    });

    // Garbage instead of client flags and options: the server drops the connection.
    raw_client(port, &[0xde; 4096], |mut stream| {
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    });
    // A truncated request, then the client goes away.
    raw_client(port, &export_name_handshake(export), |mut stream| {
        read_export_reply(&mut stream);
        stream.write_all(&request(1, 7, 0, 4096)[..20]).unwrap();
        stream.shutdown(Shutdown::Both).unwrap();
    });
    // A 1 GiB read and a read past the end: errors, and the connection stays usable.
    raw_client(port, &export_name_handshake(export), |mut stream| {
        let size = read_export_reply(&mut stream);
        stream.write_all(&request(0, 1, 0, 1 << 30)).unwrap();
        let (error, cookie) = read_simple_reply(&mut stream);
        assert_eq!((error, cookie), (22, 1), "1 GiB read: EINVAL");
        stream.write_all(&request(0, 2, size, 4096)).unwrap();
        let (error, cookie) = read_simple_reply(&mut stream);
        assert_eq!((error, cookie), (22, 2), "read past the end: EINVAL");
        stream.write_all(&request(0, 3, 0, 512)).unwrap();
        let (error, cookie) = read_simple_reply(&mut stream);
        assert_eq!((error, cookie), (0, 3));
        let mut data = [0u8; 512];
        stream.read_exact(&mut data).unwrap();
        stream.write_all(&request(2, 4, 0, 0)).unwrap();
    });
    // A disconnect in the middle of a write's payload.
    raw_client(port, &export_name_handshake(export), |mut stream| {
        read_export_reply(&mut stream);
        let mut write = request(1, 9, 8 * MIB, 1 << 20);
        write.extend(vec![0x5a; 300 * 1024]);
        stream.write_all(&write).unwrap();
        drop(stream);
    });

    good.join().unwrap();
    // A storm of connections beyond the socket pool, dropped at once: the ones
    // beyond the pool are refused, none wedges the server.
    let storm: Vec<TcpStream> = (0..40)
        .filter_map(|_| TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok())
        .collect();
    drop(storm);
    ready(appliance);
    qemu_io(&uri, &["read -P 0x35 5M 1M"]);
    // Still serving: listing works and the console answers.
    let listed = run("nbdinfo", &["--list", &appliance.nbd_uri("").unwrap()]);
    assert!(listed.contains(&format!("export=\"{export}\"")), "{listed}");
    appliance.console_ok("net").unwrap();
}

#[test]
fn bad_clients_scratch() {
    let appliance = &mut boot(&[]);
    bad_clients_do_not_disturb_a_good_one(appliance, "scratch");
}
