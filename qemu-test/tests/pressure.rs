//! Many NBD clients at once on little memory: 20 and then 100 `nbdcopy` clients
//! (four connections each), each on its own thin volume of one pool, started
//! together on an appliance with 64 MiB and with 256 MiB of memory. Every copy must
//! complete and read back byte for byte, `net` must show the pressure (connections
//! accepted, requests that waited for memory), and a new client must be served
//! afterwards.
//!
//! Clients reach the appliance through the runner's front for QEMU's port forward
//! (see [`front`]), which alone cannot take a burst of connections.
//!
//! `PRESSURE_COPY_MIB` sets the size of each of the 20 copies (4 MiB unless set; the
//! 100 clients copy a quarter of that).

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{Appliance, NbdFront, Options, Scratch, run_tool, wait_for_greeting};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// Pool block size.
const BLOCK: u64 = 64 * 1024;
/// How long the NBD server may take to answer after boot.
const READY: Duration = Duration::from_secs(60);
/// How long a client beyond the sockets free may wait in the appliance's backlog.
const GREETING_WAIT: Duration = Duration::from_secs(120);
/// How long all clients of one round may take to copy in (or out).
const COPY_DEADLINE: Duration = Duration::from_secs(300);

/// The size of each of the 20 copies.
fn copy_bytes() -> u64 {
    std::env::var("PRESSURE_COPY_MIB")
        .ok()
        .and_then(|mib| mib.parse::<u64>().ok())
        .unwrap_or(4)
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
    let relayed = front(appliance.nbd_port().unwrap());
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
        let busiest = finish_all(writes, &mut appliance, "writing");

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
            "{memory_mib} MiB, {clients} clients of {} MiB:\nwhile writing:\n{busiest}\nafter:\n{net}\n{mem}",
            size / MIB
        );
        let accepted = nbd_figure(&net, " accepted");
        // Every nbdcopy opens at least one connection for its copy in and one for
        // its copy out.
        assert!(
            accepted - accepted_before >= 2 * clients,
            "{clients} clients, {} connections accepted:\n{net}",
            accepted - accepted_before
        );
        accepted_before = accepted;
        if memory_mib == 64 {
            // Twenty clients' reads ask for far more than 64 MiB hold at once.
            assert!(figure(&net, "memory:", " waits") > 0, "{net}");
        }
        let direct = appliance.nbd_uri(&volumes[0]).unwrap();
        let listed = run_tool("nbdinfo", &["--list", "--json", &direct]);
        assert!(listed.contains(&format!("\"{}\"", volumes[0])), "{listed}");
    }
    appliance.shutdown().unwrap();
}

/// More idle clients than the pool has sockets: those beyond it wait in the
/// backlog (their connection requests held back, not refused) and are greeted as
/// soon as other clients leave.
#[test]
fn clients_beyond_the_socket_pool_wait_and_get_in() {
    host_tools::require_for_test(&[Tool::Qemu]);
    let mut appliance = Appliance::boot(Options::bios().memory_mib(64).nbd()).unwrap();
    if let Err(why) = wait_for_greeting(appliance.nbd_port().unwrap(), READY) {
        panic!("{why}\n{}", appliance.transcript());
    }
    let net = appliance.console_ok("net").unwrap();
    let most = figure(&net, "sockets:", " (") as usize;
    let relayed = front(appliance.nbd_port().unwrap());
    let (greeted, greetings) = std::sync::mpsc::channel();
    let clients: Vec<TcpStream> = (0..most + 40)
        .map(|index| {
            let client = TcpStream::connect((Ipv4Addr::LOCALHOST, relayed)).unwrap();
            let mut reader = client.try_clone().unwrap();
            let greeted = greeted.clone();
            std::thread::spawn(move || {
                let mut greeting = [0; 18];
                if reader.read_exact(&mut greeting).is_ok() && &greeting[..8] == b"NBDMAGIC" {
                    let _ = greeted.send(index);
                }
            });
            client
        })
        .collect();
    // Greetings arrive until the pool is full.
    let mut served = Vec::new();
    while let Ok(index) = greetings.recv_timeout(Duration::from_secs(10)) {
        served.push(index);
    }
    let full = appliance.console_ok("net").unwrap();
    let open = nbd_figure(&full, " connection") as usize;
    assert!(
        open == served.len() && open < clients.len(),
        "{} of {} clients greeted:\n{full}",
        served.len(),
        clients.len()
    );
    assert!(
        figure(&full, "sockets:", " connection attempts") > 0,
        "{full}"
    );
    // The clients beyond the pool get in once the others leave.
    let waiting = clients.len() - served.len();
    for &index in &served {
        clients[index].shutdown(Shutdown::Both).unwrap();
    }
    let deadline = Instant::now() + GREETING_WAIT;
    let mut late = 0;
    while late < waiting {
        let left = deadline.saturating_duration_since(Instant::now());
        match greetings.recv_timeout(left) {
            Ok(_) => late += 1,
            Err(_) => panic!(
                "{late} of {waiting} waiting clients greeted:\n{}",
                appliance.console_ok("net").unwrap()
            ),
        }
    }
    println!("{} clients, {open} served at once:\n{full}", clients.len());
    drop(clients);
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
/// appliance fails the test with what `net` and `mem` show). Returns what `net`
/// showed with the most connections open meanwhile.
fn finish_all(mut clients: Vec<Child>, appliance: &mut Appliance, what: &str) -> String {
    let deadline = Instant::now() + COPY_DEADLINE;
    let mut busiest = (0, String::new());
    while clients
        .iter_mut()
        .any(|client| client.try_wait().unwrap().is_none())
    {
        let net = appliance.console_ok("net").unwrap();
        let open = nbd_figure(&net, " connection");
        if open >= busiest.0 {
            busiest = (open, net);
        }
        if Instant::now() > deadline {
            for client in &mut clients {
                let _ = client.kill();
            }
            let net = appliance.console_ok("net").unwrap();
            let mem = appliance.console_ok("mem").unwrap();
            panic!("clients still {what} after {COPY_DEADLINE:?}:\n{net}\n{mem}");
        }
        std::thread::sleep(Duration::from_secs(1));
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
    busiest.1
}

/// The number before `label` on `net`'s `nbd:` line.
fn nbd_figure(net: &str, label: &str) -> u64 {
    figure(net, "nbd:", label)
}

/// The number just before `label` on the line of `net` that starts with `line`.
fn figure(net: &str, line: &str, label: &str) -> u64 {
    let text = net
        .lines()
        .find(|text| text.starts_with(line))
        .unwrap_or_else(|| panic!("no {line} line in:\n{net}"));
    let before = text
        .split(label)
        .next()
        .and_then(|head| head.rsplit([' ', '(']).next())
        .unwrap_or_else(|| panic!("no '{label}' figure in: {text}"));
    before
        .parse()
        .unwrap_or_else(|_| panic!("no '{label}' figure in: {text}"))
}

/// Pseudo-random bytes, different for each seed.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0; len];
    fastrand::Rng::with_seed(seed).fill(&mut bytes);
    bytes
}

/// A port in front of the appliance's forwarded port `target`, as the runner puts
/// one (a burst of clients overflows QEMU's forward on its own).
fn front(target: u16) -> u16 {
    let front = NbdFront::start(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap()).unwrap();
    front.forward_to(target);
    front.port()
}
