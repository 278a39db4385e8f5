//! The appliance's NBD service, driven by the real clients (qemu-img, qemu-io,
//! nbdinfo, nbdcopy, nbdsh) through QEMU's port forward, and the `net` console
//! command. Every test runs on virtio-net; a representative set (listing and
//! mapping, copies in and out, bad clients, DHCP and static addresses) runs on the
//! e1000e NIC too.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use host_tools::Tool;
use qemu_test::{
    Appliance, Nic, Options, Scratch, read_greeting, run_tool, stat_cpu_ticks, wait_for_greeting,
};

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

/// Boots with `disks` (virtio-blk, `vda`, `vdb`, ...), `nic` and an NBD forward, and
/// waits for the NBD server's greeting.
fn boot(nic: Nic, disks: &[&Path]) -> Appliance {
    tools();
    let mut options = Options::bios().nic(nic).nbd();
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

/// Runs `qemu-io` commands on `uri`, each as its own `-c`.
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw", "-t", "writeback", uri];
    for command in commands {
        args.extend(["-c", command]);
    }
    let out = run_tool("qemu-io", &args);
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
    net_shows_the_lease_and_switches(Nic::Virtio, "virtio-net");
}

#[test]
fn net_on_e1000e_shows_the_lease_and_switches_between_static_and_dhcp() {
    net_shows_the_lease_and_switches(Nic::E1000e, "e1000e");
}

fn net_shows_the_lease_and_switches(nic: Nic, driver: &str) {
    let appliance = &mut boot(nic, &[]);
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
    assert!(
        field(&shown, "link:").starts_with(&format!("{driver}, mtu 1500, ")),
        "{shown}"
    );

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
    stat_cpu_ticks(&stat).unwrap().2
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
    let appliance = &mut boot(Nic::Virtio, &paths);
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
    let listed = run_tool("nbdinfo", &["--list", &appliance.nbd_uri("").unwrap()]);
    assert!(listed.contains(&format!("export=\"{export}\"")), "{listed}");
    appliance.console_ok("net").unwrap();
}

const SECTOR: u64 = 512;
/// Pool data block: 64 KiB.
const BLOCK: u64 = 64 * 1024;

/// Disks of a pool appliance: `vda` metadata, `vdb` data, `vdc` a raw disk for
/// linear and origin use.
struct PoolDisks {
    scratch: Scratch,
    metadata: PathBuf,
    data: PathBuf,
    raw: PathBuf,
}

impl PoolDisks {
    fn new(raw_bytes: u64) -> PoolDisks {
        let scratch = Scratch::new().unwrap();
        let metadata = scratch.disk("metadata.img", 16 * MIB).unwrap();
        let data = scratch.disk("data.img", 256 * MIB).unwrap();
        let raw = scratch.disk("raw.img", raw_bytes).unwrap();
        PoolDisks {
            scratch,
            metadata,
            data,
            raw,
        }
    }

    fn boot(&self, nic: Nic) -> Appliance {
        boot(nic, &[&self.metadata, &self.data, &self.raw])
    }

    fn file(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }
}

/// Creates the pool on `vda`/`vdb` and thin volume `name` (id `id`) of `bytes`.
fn create_pool(appliance: &mut Appliance) {
    appliance
        .console_ok(&format!(
            "create pool --table \"0 {} thin-pool vda vdb {} 0\"",
            256 * MIB / SECTOR,
            BLOCK / SECTOR
        ))
        .unwrap();
}

fn create_thin(appliance: &mut Appliance, name: &str, id: u32, bytes: u64, origin: Option<&str>) {
    appliance
        .console_ok(&format!("message pool 0 \"create_thin {id}\""))
        .unwrap();
    let origin = origin
        .map(|origin| format!(" {origin}"))
        .unwrap_or_default();
    appliance
        .console_ok(&format!(
            "create {name} --table \"0 {} thin pool {id}{origin}\"",
            bytes / SECTOR
        ))
        .unwrap();
}

/// Pseudo-random bytes (xorshift), different for each seed.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0; len];
    fastrand::Rng::with_seed(seed).fill(&mut bytes);
    bytes
}

/// The whole export, copied into `file` by nbdcopy.
fn read_export(uri: &str, file: &Path) -> Vec<u8> {
    let _ = fs::remove_file(file);
    run_tool("nbdcopy", &[uri, &file.display().to_string()]);
    fs::read(file).unwrap()
}

/// `nbdinfo --map` as (offset, length, description) triples.
fn map(uri: &str) -> Vec<(u64, u64, String)> {
    run_tool("nbdinfo", &["--map", uri])
        .lines()
        .map(|line| {
            // OFFSET LENGTH TYPE DESCRIPTION, e.g. `1048576 65536 3 hole,zero`.
            let words: Vec<&str> = line.split_whitespace().collect();
            (
                words[0].parse().unwrap(),
                words[1].parse().unwrap(),
                words[3..].join(" "),
            )
        })
        .collect()
}

/// The type `nbdinfo --map` gives the byte at `offset`.
fn kind_at(map: &[(u64, u64, String)], offset: u64) -> &str {
    map.iter()
        .find(|(start, len, _)| (*start..start + len).contains(&offset))
        .map(|(_, _, kind)| kind.as_str())
        .unwrap_or_else(|| panic!("{offset} not in {map:?}"))
}

#[test]
fn exports_are_listed_and_thin_allocation_is_mapped() {
    exports_are_listed_and_mapped(Nic::Virtio);
}

#[test]
fn exports_on_e1000e_are_listed_and_thin_allocation_is_mapped() {
    exports_are_listed_and_mapped(Nic::E1000e);
}

fn exports_are_listed_and_mapped(nic: Nic) {
    let disks = PoolDisks::new(32 * MIB);
    let appliance = &mut disks.boot(nic);
    create_pool(appliance);
    create_thin(appliance, "thin0", 0, 64 * MIB, None);
    appliance
        .console_ok(&format!(
            "create plain --table \"0 {} linear vdc 0\"",
            32 * MIB / SECTOR
        ))
        .unwrap();

    let listed = run_tool("nbdinfo", &["--list", &appliance.nbd_uri("").unwrap()]);
    for (name, size) in [("thin0", 64 * MIB), ("plain", 32 * MIB)] {
        let at = listed
            .find(&format!("export=\"{name}\""))
            .unwrap_or_else(|| panic!("{name} not listed:\n{listed}"));
        assert!(
            listed[at..].contains(&format!("export-size: {size}")),
            "{listed}"
        );
    }
    assert!(
        !listed.contains("export=\"pool\""),
        "the pool itself carries no data"
    );

    let uri = appliance.nbd_uri("thin0").unwrap();
    qemu_io(
        &uri,
        &["write -P 0x61 0 1M", "write -P 0x62 8M 100k", "flush"],
    );
    let info = run_tool("qemu-img", &["info", "--output=json", &uri]);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 64 * MIB)),
        "{info}"
    );
    let json = run_tool("qemu-img", &["map", "-f", "raw", "--output=json", &uri]);
    let data: Vec<&str> = json
        .lines()
        .filter(|line| line.contains("\"data\": true"))
        .collect();
    // 1 MiB at 0 and the 64 KiB blocks the 100 KiB write touched.
    assert_eq!(data.len(), 2, "{json}");
    assert!(
        data[0].contains("\"start\": 0, \"length\": 1048576"),
        "{json}"
    );
    assert!(
        data[1].contains(&format!(
            "\"start\": {}, \"length\": {}",
            8 * MIB,
            2 * BLOCK
        )),
        "{json}"
    );
    let extents = map(&uri);
    assert_eq!(kind_at(&extents, 0), "data");
    assert_eq!(kind_at(&extents, 2 * MIB), "hole,zero");
    assert_eq!(kind_at(&extents, 8 * MIB + BLOCK), "data");
}

#[test]
fn data_written_by_clients_reads_back_and_survives_a_reboot() {
    data_reads_back_and_survives_a_reboot(Nic::Virtio);
}

#[test]
fn data_written_by_clients_on_e1000e_reads_back_and_survives_a_reboot() {
    data_reads_back_and_survives_a_reboot(Nic::E1000e);
}

fn data_reads_back_and_survives_a_reboot(nic: Nic) {
    let disks = PoolDisks::new(2 * MIB);
    let source = disks.file("source.img");
    fs::write(&source, random_bytes(64 * MIB as usize, 7)).unwrap();
    let expected = disks.file("expected.img");
    fs::copy(&source, &expected).unwrap();
    let mut appliance = disks.boot(nic);
    // The device configuration is kept on vdc, so the volume is back after a reboot.
    appliance.console_ok("config init vdc").unwrap();
    create_pool(&mut appliance);
    create_thin(&mut appliance, "vol", 0, 64 * MIB, None);
    let uri = appliance.nbd_uri("vol").unwrap();
    run_tool("nbdcopy", &["--flush", &source.display().to_string(), &uri]);
    // Writes at odd offsets and sizes (the client does the read-modify-write of the
    // partial sectors), mirrored into the expected image.
    let odd = [
        (100_000u64, 3_000u64, 0x11u8),
        (5 * MIB - 7, 70_001, 0x22),
        (63 * MIB + 511, 1, 0x33),
    ];
    let mut image = fs::read(&expected).unwrap();
    for (offset, len, pattern) in odd {
        qemu_io(&uri, &[&format!("write -P {pattern} {offset} {len}")]);
        image[offset as usize..(offset + len) as usize].fill(pattern);
    }
    fs::write(&expected, &image).unwrap();
    let compare = |uri: &str| {
        run_tool(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &expected.display().to_string(),
                uri,
            ],
        )
    };
    compare(&uri);
    qemu_io(&uri, &["flush"]);
    appliance.shutdown().unwrap();

    let appliance = disks.boot(nic);
    compare(&appliance.nbd_uri("vol").unwrap());
}

#[test]
fn trim_and_write_zeroes_change_the_map_and_read_zeroes() {
    let disks = PoolDisks::new(MIB);
    let appliance = &mut disks.boot(Nic::Virtio);
    create_pool(appliance);
    create_thin(appliance, "vol", 0, 16 * MIB, None);
    let uri = appliance.nbd_uri("vol").unwrap();
    qemu_io(&uri, &["write -P 0x5a 0 8M"]);
    assert_eq!(kind_at(&map(&uri), 6 * MIB), "data");
    qemu_io(
        &uri,
        &[
            "discard 1M 1M",
            "write -z 3M 1M",
            "write -z -u 5M 1M",
            "read -P 0 1M 1M",
            "read -P 0 3M 1M",
            "read -P 0 5M 1M",
            "read -P 0x5a 0 1M",
            "read -P 0x5a 7M 1M",
        ],
    );
    let extents = map(&uri);
    assert_eq!(kind_at(&extents, MIB), "hole,zero", "trimmed: unmapped");
    assert_eq!(
        kind_at(&extents, 3 * MIB),
        "data",
        "zeroed without unmap stays allocated"
    );
    assert_eq!(kind_at(&extents, 5 * MIB), "hole,zero", "zeroed with unmap");
    assert_eq!(kind_at(&extents, 7 * MIB), "data");
    assert_eq!(kind_at(&extents, 12 * MIB), "hole,zero");
}

#[test]
fn a_snapshot_taken_while_a_client_writes_holds_the_data_as_of_the_command() {
    const CHUNKS: u64 = 96;
    let disks = PoolDisks::new(MIB);
    let appliance = &mut disks.boot(Nic::Virtio);
    create_pool(appliance);
    create_thin(appliance, "origin", 0, CHUNKS * MIB, None);
    let uri = appliance.nbd_uri("origin").unwrap();
    // One synchronous writer: chunk i gets pattern i + 1, in order.
    let writer = std::thread::spawn({
        let uri = uri.clone();
        move || {
            let commands: Vec<String> = (0..CHUNKS)
                .map(|chunk| format!("write -P {} {} 1M", chunk + 1, chunk * MIB))
                .collect();
            let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
            qemu_io(&uri, &commands);
        }
    });
    // Snapshot as soon as the first chunk is in.
    while !map(&uri).iter().any(|(_, _, kind)| kind == "data") {
        std::thread::sleep(Duration::from_millis(50));
    }
    appliance.console_ok("suspend origin").unwrap();
    appliance
        .console_ok("message pool 0 \"create_snap 1 0\"")
        .unwrap();
    appliance.console_ok("resume origin").unwrap();
    writer.join().unwrap();
    appliance
        .console_ok(&format!(
            "create snap --readonly --table \"0 {} thin pool 1\"",
            CHUNKS * MIB / SECTOR
        ))
        .unwrap();

    let read = |export: &str| {
        read_export(
            &appliance.nbd_uri(export).unwrap(),
            &disks.file(&format!("{export}.img")),
        )
    };
    let origin = read("origin");
    let snapshot = read("snap");
    for chunk in 0..CHUNKS as usize {
        assert!(
            origin[chunk << 20..(chunk + 1) << 20]
                .iter()
                .all(|&b| b == chunk as u8 + 1),
            "origin chunk {chunk}"
        );
    }
    // The snapshot is a prefix of the writes: every block holds either the new
    // pattern or zeroes, new blocks never follow a block still zero except inside
    // the one write that was in flight.
    let blocks: Vec<bool> = snapshot
        .chunks(BLOCK as usize)
        .enumerate()
        .map(|(index, block)| {
            let chunk = (index * BLOCK as usize) >> 20;
            let new = block.iter().all(|&b| b == chunk as u8 + 1);
            assert!(
                new || block.iter().all(|&b| b == 0),
                "block {index} is torn"
            );
            new
        })
        .collect();
    let written = blocks.iter().filter(|&&new| new).count();
    let per_chunk = (MIB / BLOCK) as usize;
    let complete = blocks.iter().take_while(|&&new| new).count();
    assert!(
        written - complete <= per_chunk
            && blocks[complete..].iter().skip(per_chunk).all(|&new| !new),
        "snapshot is not a prefix of the writes: {blocks:?}"
    );
    assert!(
        complete > 0 && written < blocks.len(),
        "snapshot taken mid-way: {written} blocks"
    );
}

#[test]
fn two_vms_share_a_read_only_base_image() {
    let disks = PoolDisks::new(32 * MIB);
    let base = random_bytes(32 * MIB as usize, 99);
    fs::write(&disks.raw, &base).unwrap();
    let appliance = &mut disks.boot(Nic::Virtio);
    create_pool(appliance);
    appliance
        .console_ok(&format!(
            "create base --readonly --table \"0 {} linear vdc 0\"",
            32 * MIB / SECTOR
        ))
        .unwrap();
    create_thin(appliance, "vm1", 1, 32 * MIB, Some("base"));
    create_thin(appliance, "vm2", 2, 32 * MIB, Some("base"));
    let vm1 = appliance.nbd_uri("vm1").unwrap();
    let vm2 = appliance.nbd_uri("vm2").unwrap();
    qemu_io(&vm1, &["write -P 0x71 1M 2M", "write -P 0x72 20M 4k"]);
    qemu_io(&vm2, &["write -P 0x81 2M 1M", "flush"]);
    for (uri, writes) in [
        (&vm1, vec![(MIB, 2 * MIB, 0x71u8), (20 * MIB, 4096, 0x72)]),
        (&vm2, vec![(2 * MIB, MIB, 0x81)]),
    ] {
        let mut expected = base.clone();
        for (offset, len, pattern) in writes {
            expected[offset as usize..(offset + len) as usize].fill(pattern);
        }
        // Read back whole: qemu-img compare would take the unallocated ranges (holes
        // that are not zero, since the base shows through) for zeroes.
        assert!(
            read_export(uri, &disks.file("read.img")) == expected,
            "{uri}"
        );
    }
    appliance.console_ok("remove vm1").unwrap();
    appliance.console_ok("remove vm2").unwrap();
    assert!(
        fs::read(&disks.raw).unwrap() == base,
        "the base image changed"
    );
}

#[test]
fn bad_clients_do_not_disturb_a_thin_export() {
    bad_clients_on(Nic::Virtio);
}

#[test]
fn bad_clients_on_e1000e_do_not_disturb_a_thin_export() {
    bad_clients_on(Nic::E1000e);
}

fn bad_clients_on(nic: Nic) {
    let disks = PoolDisks::new(MIB);
    let appliance = &mut disks.boot(nic);
    create_pool(appliance);
    create_thin(appliance, "vol", 0, 64 * MIB, None);
    bad_clients_do_not_disturb_a_good_one(appliance, "vol");
}

/// Export names in `nbdinfo --list --json` output.
fn listed_exports(uri: &str) -> Vec<String> {
    run_tool("nbdinfo", &["--list", "--json", uri])
        .lines()
        .filter_map(|line| line.trim().strip_prefix("\"export-name\": \""))
        .map(|name| name.trim_end_matches("\",").to_string())
        .collect()
}

/// What `nbdinfo URI` printed on standard error, expecting it to be refused.
fn nbdinfo_refused(uri: &str) -> String {
    let output = std::process::Command::new("nbdinfo")
        .arg(uri)
        .output()
        .unwrap();
    assert!(!output.status.success(), "nbdinfo {uri} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn access_lists_hold_on_the_appliance_and_survive_a_reboot() {
    let scratch = Scratch::new().unwrap();
    let raw = scratch.disk("raw.img", 8 * MIB).unwrap();
    let config = scratch.disk("config.img", 4 * MIB).unwrap();
    let mut appliance = boot(Nic::Virtio, &[&raw, &config]);
    appliance.console_ok("config init vdb").unwrap();
    appliance
        .console_ok("create vm1 --table \"0 4096 linear vda 0\"")
        .unwrap();
    appliance
        .console_ok("create vm2 --table \"0 4096 linear vda 4096\"")
        .unwrap();
    // QEMU's user networking delivers every host connection from 10.0.2.2.
    for line in [
        "nbd default deny",
        "nbd allow vm1 10.0.2.2 ro",
        "nbd deny vm2 10.0.2.0/24 hide",
    ] {
        appliance.console_ok(line).unwrap();
    }
    let uri = |appliance: &Appliance, export: &str| appliance.nbd_uri(export).unwrap();
    assert_eq!(listed_exports(&uri(&appliance, "")), ["vm1"]);
    let info = run_tool("nbdinfo", &["--json", &uri(&appliance, "vm1")]);
    assert!(info.contains("\"is_read_only\": true"), "{info}");
    let hidden = nbdinfo_refused(&uri(&appliance, "vm2"));
    assert!(hidden.contains("No such file or directory"), "{hidden}");

    // A connected client is shown with its address and loses its connection when
    // its grant is taken away.
    let port = appliance.nbd_port().unwrap();
    raw_client(port, &export_name_handshake("vm1"), |mut stream| {
        assert_eq!(read_export_reply(&mut stream), 2 * MIB);
        let clients = appliance.console_ok("nbd clients").unwrap();
        assert!(
            clients
                .lines()
                .any(|line| line.starts_with("vm1     10.0.2.2:")),
            "{clients}"
        );
        appliance.console_ok("nbd deny vm1 10.0.2.2").unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).unwrap(), 0, "connection closed");
    });
    let clients = appliance.console_ok("nbd clients").unwrap();
    assert!(clients.contains("no NBD clients"), "{clients}");
    appliance.shutdown().unwrap();

    let mut appliance = boot(Nic::Virtio, &[&raw, &config]);
    let acl = appliance.console_ok("nbd acl").unwrap();
    let rows: Vec<&str> = acl.lines().map(str::trim_end).collect();
    assert!(
        rows.ends_with(&[
            "default: deny",
            "EXPORT  CLIENTS      ACCESS",
            "vm1     10.0.2.2     deny",
            "vm2     10.0.2.0/24  deny hide",
        ]),
        "{acl}"
    );
    assert_eq!(listed_exports(&uri(&appliance, "")), Vec::<String>::new());
    let refused = nbdinfo_refused(&uri(&appliance, "vm1"));
    assert!(refused.contains("Operation not supported"), "{refused}");
    // Without its own rule vm1 falls under a `*` grant; vm2's own rule still hides it.
    appliance.console_ok("nbd forget vm1 10.0.2.2").unwrap();
    appliance.console_ok("nbd allow * 10.0.2.2").unwrap();
    assert_eq!(listed_exports(&uri(&appliance, "")), ["vm1"]);
    let info = run_tool("nbdinfo", &["--json", &uri(&appliance, "vm1")]);
    assert!(info.contains("\"is_read_only\": false"), "{info}");
    appliance.shutdown().unwrap();
}
