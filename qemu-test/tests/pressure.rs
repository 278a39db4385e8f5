//! Many NBD clients at once on little memory: 20 and then 100 `nbdcopy` clients
//! (four connections each), each on its own thin volume of one pool, started
//! together on an appliance with 64 MiB and with 256 MiB of memory. Every copy must
//! complete and read back byte for byte, `net` must show the pressure (connections
//! accepted, requests that waited for memory), and a new client must be served
//! afterwards.
//!
//! Clients reach the appliance through a relay (see [`relay`]): QEMU's port
//! forward cannot take a burst of connections.
//!
//! `PRESSURE_COPY_MIB` sets the size of each of the 20 copies (8 MiB unless set; the
//! 100 clients copy a quarter of that).

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{Appliance, Options, Scratch, run_tool, wait_for_greeting};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// Pool block size.
const BLOCK: u64 = 64 * 1024;
/// How long the NBD server may take to answer after boot.
const READY: Duration = Duration::from_secs(60);
/// How long a connection through the relay may wait for the appliance's greeting
/// (a client beyond the sockets free waits in the appliance's backlog).
const GREETING_WAIT: Duration = Duration::from_secs(120);
/// How long all clients of one round may take to copy in (or out).
const COPY_DEADLINE: Duration = Duration::from_secs(300);

/// The size of each of the 20 copies.
fn copy_bytes() -> u64 {
    std::env::var("PRESSURE_COPY_MIB")
        .ok()
        .and_then(|mib| mib.parse::<u64>().ok())
        .unwrap_or(8)
        * MIB
}

#[test]
fn twenty_and_a_hundred_clients_at_once_on_64_mib() {
    many_clients_at_once(64);
}

#[test]
fn twenty_and_a_hundred_clients_at_once_on_256_mib() {
    many_clients_at_once(256);
}

fn many_clients_at_once(memory_mib: u32) {
    host_tools::require_for_test(&[Tool::Qemu, Tool::NbdInfo, Tool::NbdCopy]);
    let bytes = copy_bytes();
    let rounds = [(20, bytes), (100, bytes / 4)];
    let pool_bytes: u64 = rounds.iter().map(|(clients, size)| clients * size).sum();
    let scratch = Scratch::new().unwrap();
    let metadata = scratch.disk("metadata.img", 16 * MIB).unwrap();
    let data = scratch.disk("data.img", pool_bytes + 64 * MIB).unwrap();
    let options = Options::bios()
        .memory_mib(memory_mib)
        .disk(&metadata)
        .disk(&data)
        .nbd();
    let mut appliance = Appliance::boot(options).unwrap();
    if let Err(why) = wait_for_greeting(appliance.nbd_port().unwrap(), READY) {
        panic!("{why}\n{}", appliance.transcript());
    }
    appliance
        .console_ok(&format!(
            "create pool --table \"0 {} thin-pool vda vdb {} 0\"",
            (pool_bytes + 64 * MIB) / SECTOR,
            BLOCK / SECTOR
        ))
        .unwrap();
    let relayed = relay(appliance.nbd_port().unwrap());
    let mut next_id = 0;
    let mut accepted_before = 0;
    for (clients, size) in rounds {
        let volumes: Vec<String> = (next_id..next_id + clients)
            .map(|id| {
                create_thin(&mut appliance, id, size);
                format!("vol{id}")
            })
            .collect();
        next_id += clients;
        let sources: Vec<PathBuf> = volumes
            .iter()
            .enumerate()
            .map(|(seed, volume)| {
                let path = scratch.path().join(format!("{volume}.src"));
                fs::write(&path, random_bytes(size as usize, seed as u64)).unwrap();
                path
            })
            .collect();
        let uris: Vec<String> = volumes
            .iter()
            .map(|volume| format!("nbd://127.0.0.1:{relayed}/{volume}"))
            .collect();

        let writes = sources
            .iter()
            .zip(&uris)
            .map(|(source, uri)| nbdcopy(&source.display().to_string(), uri))
            .collect();
        let during = appliance.console_ok("net").unwrap();
        finish_all(writes, &mut appliance, "writing");

        let copies: Vec<PathBuf> = volumes
            .iter()
            .map(|volume| scratch.path().join(format!("{volume}.copy")))
            .collect();
        let reads = uris
            .iter()
            .zip(&copies)
            .map(|(uri, copy)| nbdcopy(uri, &copy.display().to_string()))
            .collect();
        finish_all(reads, &mut appliance, "reading");
        for ((source, copy), volume) in sources.iter().zip(&copies).zip(&volumes) {
            assert!(
                fs::read(source).unwrap() == fs::read(copy).unwrap(),
                "{volume} did not read back what was written"
            );
            fs::remove_file(source).unwrap();
            fs::remove_file(copy).unwrap();
        }

        let net = appliance.console_ok("net").unwrap();
        let mem = appliance.console_ok("mem").unwrap();
        println!(
            "{memory_mib} MiB, {clients} clients of {} MiB:\nwhile copying:\n{during}after:\n{net}{mem}",
            size / MIB
        );
        let accepted = accepted(&net);
        // Every nbdcopy opens at least one connection for its copy in and one for
        // its copy out.
        assert!(
            accepted - accepted_before >= 2 * clients,
            "{clients} clients, {} connections accepted:\n{net}",
            accepted - accepted_before
        );
        accepted_before = accepted;
        let direct = appliance.nbd_uri(&volumes[0]).unwrap();
        let listed = run_tool("nbdinfo", &["--list", "--json", &direct]);
        assert!(listed.contains(&format!("\"{}\"", volumes[0])), "{listed}");
    }
    appliance.shutdown().unwrap();
}

fn create_thin(appliance: &mut Appliance, id: u64, bytes: u64) {
    appliance
        .console_ok(&format!("message pool 0 \"create_thin {id}\""))
        .unwrap();
    appliance
        .console_ok(&format!(
            "create vol{id} --table \"0 {} thin pool {id}\"",
            bytes / SECTOR
        ))
        .unwrap();
}

/// Starts `nbdcopy SOURCE TARGET` with nbdcopy's defaults (four connections per NBD
/// side when the server allows several).
fn nbdcopy(source: &str, target: &str) -> Child {
    Command::new("nbdcopy")
        .args([source, target])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for every client; all must succeed within [`COPY_DEADLINE`] (a wedged
/// appliance fails the test with what `net` and `mem` show).
fn finish_all(mut clients: Vec<Child>, appliance: &mut Appliance, what: &str) {
    let deadline = Instant::now() + COPY_DEADLINE;
    while clients
        .iter_mut()
        .any(|client| client.try_wait().unwrap().is_none())
    {
        if Instant::now() > deadline {
            for client in &mut clients {
                let _ = client.kill();
            }
            let net = appliance.console_ok("net").unwrap();
            let mem = appliance.console_ok("mem").unwrap();
            panic!("clients still {what} after {COPY_DEADLINE:?}:\n{net}\n{mem}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let failures: Vec<String> = clients
        .into_iter()
        .enumerate()
        .filter_map(|(index, client)| {
            let done = client.wait_with_output().unwrap();
            (!done.status.success()).then(|| {
                format!(
                    "client {index} ({}): {}",
                    done.status,
                    String::from_utf8_lossy(&done.stderr).trim()
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} clients failed {what}:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        appliance.transcript()
    );
}

/// The `accepted` figure of `net`'s `nbd:` line.
fn accepted(net: &str) -> u64 {
    let line = net
        .lines()
        .find(|line| line.starts_with("nbd:"))
        .unwrap_or_else(|| panic!("no nbd line in:\n{net}"));
    let before = line
        .split(" accepted")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .unwrap_or_else(|| panic!("no accepted count in: {line}"));
    before.parse().unwrap()
}

/// Pseudo-random bytes, different for each seed.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0; len];
    fastrand::Rng::with_seed(seed).fill(&mut bytes);
    bytes
}

/// A port that forwards every connection to the appliance's forwarded port
/// `target`, one connection set up at a time. QEMU's forward listens with a
/// backlog of one: when a burst overflows it, Linux leaves some clients believing
/// they are connected while QEMU never accepted them, and an NBD client then waits
/// for a greeting forever. The relay connects to the forward only once the
/// previous connection got its greeting, so the forward's queue is empty each time.
fn relay(target: u16) -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    // Clients are accepted at once (so the relay's own queue never overflows) and
    // connected onwards in turn.
    let (accepted, waiting) = std::sync::mpsc::channel::<TcpStream>();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            if accepted.send(client).is_err() {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        for client in waiting {
            if let Ok((server, greeting)) = connect_with_greeting(target) {
                splice(client, server, greeting);
            }
        }
    });
    port
}

/// A connection to `port` and the 18-byte greeting read from it.
fn connect_with_greeting(port: u16) -> io::Result<(TcpStream, [u8; 18])> {
    let mut server = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    server.set_read_timeout(Some(GREETING_WAIT))?;
    let mut greeting = [0; 18];
    server.read_exact(&mut greeting)?;
    server.set_read_timeout(None)?;
    Ok((server, greeting))
}

/// Sends `greeting` to `client`, then copies bytes both ways until either side
/// closes.
fn splice(mut client: TcpStream, server: TcpStream, greeting: [u8; 18]) {
    if client.write_all(&greeting).is_err() {
        return;
    }
    let (Ok(client_reader), Ok(server_writer)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    std::thread::spawn(move || pump(client_reader, server_writer));
    std::thread::spawn(move || pump(server, client));
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
