//! `thin import` in offline mode against real and hostile NBD servers: a qcow2
//! image served by `qemu-nbd` (data, zero clusters, holes) is adopted with its
//! content and only its data provisioned; broken servers and lost connections give
//! one `error:` line, and an interrupted import resumes from its checkpoint, over one
//! connection or over the several a server allowing them gets (also when that server
//! breaks only one of them).

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use host_tools::Tool;
use nbd::wire::*;
use qemu_test::{HostServer, Scratch, free_port, run_tool};

mod common;

use common::*;

fn error_lines(transcript: &str) -> usize {
    transcript
        .lines()
        .filter(|line| line.starts_with("error:"))
        .count()
}

/// A qcow2 image of `mib` MiB written by qemu-io as `commands` say.
fn qcow2(scratch: &Scratch, mib: u64, commands: &[String]) -> PathBuf {
    let path = scratch.path().join("source.qcow2");
    run_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            path.to_str().unwrap(),
            &format!("{mib}M"),
        ],
    );
    let mut args = vec!["-f", "qcow2", path.to_str().unwrap()];
    for command in commands {
        args.extend(["-c", command]);
    }
    run_tool("qemu-io", &args);
    path
}

/// The image's content as raw bytes.
fn raw_content(scratch: &Scratch, image: &Path) -> Vec<u8> {
    let raw = scratch.path().join("source.raw");
    run_tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    fs::read(raw).unwrap()
}

/// Pool blocks holding data according to `qemu-img map`, in bytes.
fn data_blocks(image: &Path) -> u64 {
    let map = run_tool(
        "qemu-img",
        &[
            "map",
            "-f",
            "qcow2",
            "--output=json",
            image.to_str().unwrap(),
        ],
    );
    let mut blocks = std::collections::BTreeSet::new();
    for line in map.lines().filter(|line| line.contains("\"data\": true")) {
        let number = |key: &str| -> u64 {
            let rest = &line[line.find(key).unwrap() + key.len()..];
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let (start, length) = (number("\"start\":"), number("\"length\":"));
        blocks.extend(start / BLOCK..(start + length).div_ceil(BLOCK));
    }
    blocks.len() as u64 * BLOCK
}

#[test]
fn a_qcow2_image_is_adopted_with_its_content_and_only_its_data_provisioned() {
    host_tools::require_for_test(&[Tool::QemuImg, Tool::QemuIo, Tool::QemuNbd]);
    let scratch = Scratch::new().unwrap();
    let mut rng = Lcg(13);
    let mut commands = Vec::new();
    for round in 0..40 {
        let offset = rng.below(150 << 11) * 512;
        let length = (rng.below(4096) + 1) * 512;
        commands.push(match round % 4 {
            0 | 1 => format!("write -P {} {offset} {length}", rng.below(255) + 1),
            2 => format!("write -z {offset} {length}"),
            _ => format!("discard {offset} {length}"),
        });
    }
    let image = qcow2(&scratch, 160, &commands);
    let expected = raw_content(&scratch, &image);
    // Several connections at a time: the import reads over four.
    let server = HostServer::qcow2_read_only(&image, 4).unwrap();
    let disks = appliance(&scratch, "a");
    let import = format!("thin import vm1 pool --from {}", server.uri("disk"));
    let output = exec(&disks, &[SETUP[0], SETUP[1], &import, "thin ls pool"]);
    let transcript = text(&output);
    assert!(output.status.success(), "{transcript}");
    assert!(
        transcript.contains(&format!(
            "vm1: imported 160.00 MiB from {}",
            server.uri("disk")
        )),
        "{transcript}"
    );
    let mapped = dm::human_bytes(data_blocks(&image));
    let row = ls_row(&transcript, "vm1");
    assert_eq!(mapped_column(row), mapped, "{row}");
    assert!(
        volume_content(&scratch, &disks, "vm1") == expected,
        "content differs"
    );

    // A second import of the same export into another pool device name works, the
    // taken name, an unreachable server and an unknown export are one error each.
    let closed = free_port().unwrap();
    let nope = server.uri("nope");
    let cases = [
        (import.clone(), "device vm1 already exists".to_string()),
        (
            format!("thin import vm2 pool --from nbd://127.0.0.1:{closed}/disk"),
            format!("error: thin import: cannot connect to 127.0.0.1:{closed}: Connection refused"),
        ),
        (
            format!("thin import vm2 pool --from {nope}"),
            format!("error: import from {nope} failed: the server has no export 'nope'"),
        ),
        (
            format!(
                "thin import vm2 pool --from {} --size 1G",
                server.uri("disk")
            ),
            "holds 160.00 MiB (167772160 bytes) but --size says 1.00 GiB".to_string(),
        ),
    ];
    for (command, error) in cases {
        let output = exec(&disks, &[&command]);
        let transcript = text(&output);
        assert!(!output.status.success(), "{transcript}");
        assert_eq!(error_lines(&transcript), 1, "{transcript}");
        assert!(transcript.contains(&error), "{transcript}");
    }
    let listed = text(&exec(&disks, &["thin ls pool"]));
    assert!(!listed.contains("vm2"), "{listed}");

    // A local thin device copies the same way, into the same mapped space.
    let output = exec(
        &disks,
        &["thin import copy pool --from vm1", "thin ls pool"],
    );
    let transcript = text(&output);
    assert!(output.status.success(), "{transcript}");
    let row = ls_row(&transcript, "copy");
    assert_eq!(mapped_column(row), mapped, "{row}");
    assert!(volume_content(&scratch, &disks, "copy") == expected);
}

/// What a hostile server does on a connection.
type Script = fn(&mut TcpStream);

/// Answers every connection on `listener` (each in a thread of its own) with what
/// `script` does, given the stream and the connection's index among those accepted
/// (from 0), then closes it.
fn hostile_server(
    listener: TcpListener,
    script: impl Fn(&mut TcpStream, usize) + Send + Sync + 'static,
) {
    let script = Arc::new(script);
    thread::spawn(move || {
        for (index, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { return };
            let script = Arc::clone(&script);
            thread::spawn(move || {
                script(&mut stream, index);
                let _ = stream.shutdown(Shutdown::Both);
            });
        }
    });
}

fn option_reply(stream: &mut TcpStream, option: u32, reply_type: u32, data: &[u8]) {
    let mut bytes = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    bytes.extend_from_slice(&option.to_be_bytes());
    bytes.extend_from_slice(&reply_type.to_be_bytes());
    bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
    bytes.extend_from_slice(data);
    let _ = stream.write_all(&bytes);
}

/// Reads one option from the client; returns its code.
fn read_option(stream: &mut TcpStream) -> u32 {
    let mut header = [0; 16];
    if stream.read_exact(&mut header).is_err() {
        return 0;
    }
    let mut data = vec![0; be_u32(&header[12..]) as usize];
    let _ = stream.read_exact(&mut data);
    be_u32(&header[8..])
}

/// The export a handshake offers, size and transmission flags; `None` refuses it
/// (`NBD_REP_ERR_UNKNOWN` to `NBD_OPT_GO`).
type Offer = Option<(u64, u16)>;

/// A 16 MiB export of a server allowing one connection.
const ONE_CONNECTION: Offer = Some((16 << 20, TFLAG_HAS_FLAGS));

/// A fixed-newstyle handshake offering structured replies, `base:allocation` and
/// the export `offer` says.
fn handshake(stream: &mut TcpStream, offer: Offer) {
    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    let _ = stream.write_all(&greeting);
    let mut flags = [0; 4];
    let _ = stream.read_exact(&mut flags);
    loop {
        match read_option(stream) {
            OPT_STRUCTURED_REPLY => option_reply(stream, OPT_STRUCTURED_REPLY, REP_ACK, &[]),
            OPT_SET_META_CONTEXT => {
                let mut data = 1u32.to_be_bytes().to_vec();
                data.extend_from_slice(BASE_ALLOCATION.as_bytes());
                option_reply(stream, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &data);
                option_reply(stream, OPT_SET_META_CONTEXT, REP_ACK, &[]);
            }
            OPT_GO => {
                let Some((size, flags)) = offer else {
                    option_reply(stream, OPT_GO, REP_ERR_UNKNOWN, &[]);
                    return;
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                option_reply(stream, OPT_GO, REP_INFO, &info);
                option_reply(stream, OPT_GO, REP_ACK, &[]);
                return;
            }
            _ => return,
        }
    }
}

/// A request header from the client.
#[derive(Clone, Copy)]
struct Request {
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

/// Reads one request header; `None` once the connection has ended.
fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut header = [0; REQUEST_HEADER_LEN];
    stream.read_exact(&mut header).ok()?;
    Some(Request {
        command: be_u16(&header[6..]),
        cookie: be_u64(&header[8..]),
        offset: be_u64(&header[16..]),
        length: be_u32(&header[24..]),
    })
}

fn chunk(stream: &mut TcpStream, chunk_type: u16, cookie: u64, payload: &[u8], len: u32) {
    let mut bytes = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    bytes.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    bytes.extend_from_slice(&chunk_type.to_be_bytes());
    bytes.extend_from_slice(&cookie.to_be_bytes());
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.extend_from_slice(payload);
    let _ = stream.write_all(&bytes);
}

#[test]
fn hostile_servers_give_one_error_line_and_never_a_panic() {
    let scripts: [(Script, &str); 6] = [
        (
            |stream| {
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            },
            "did not greet with NBDMAGIC",
        ),
        (
            |stream| {
                handshake(stream, ONE_CONNECTION);
                let Some(Request { cookie, .. }) = read_request(stream) else {
                    return;
                };
                // Block status for a context never selected.
                let mut payload = 9u32.to_be_bytes().to_vec();
                payload.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
                chunk(stream, REPLY_TYPE_BLOCK_STATUS, cookie, &payload, 12);
            },
            "block status for unknown context id 9",
        ),
        (
            |stream| {
                handshake(stream, ONE_CONNECTION);
                let Some(Request { cookie, .. }) = read_request(stream) else {
                    return;
                };
                chunk(stream, REPLY_TYPE_BLOCK_STATUS, cookie, &[], u32::MAX);
            },
            "is too long",
        ),
        (
            |stream| {
                handshake(stream, ONE_CONNECTION);
                let Some(Request { cookie, .. }) = read_request(stream) else {
                    return;
                };
                chunk(stream, REPLY_TYPE_NONE, cookie + 1000, &[], 0);
            },
            "which is not in flight",
        ),
        (
            |stream| {
                handshake(stream, ONE_CONNECTION);
                read_request(stream);
            },
            "closed the connection while requests were in flight",
        ),
        (
            |stream| {
                let _ = stream.write_all(&NBDMAGIC.to_be_bytes());
            },
            "closed the connection during the handshake",
        ),
    ];
    let scratch = Scratch::new().unwrap();
    let disks = appliance(&scratch, "h");
    assert!(exec(&disks, &SETUP).status.success());
    for (index, (script, error)) in scripts.into_iter().enumerate() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        hostile_server(listener, move |stream, _| script(stream));
        let command = format!("thin import bad{index} pool --from nbd://127.0.0.1:{port}/x");
        let output = exec(&disks, &[&command]);
        let transcript = text(&output);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{transcript}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(error_lines(&transcript), 1, "{transcript}");
        assert!(transcript.contains(error), "{error}: {transcript}");
    }
}

/// Bytes of the export of a server allowing several connections: two import
/// windows, every byte of them data.
const TWO_WINDOWS: u64 = 128 << 20;
/// Where the import's second window begins (its first checkpoint).
const SECOND_WINDOW: u64 = TWO_WINDOWS / 2;
/// Connections an import opens to a server that allows several.
const IMPORT_CONNECTIONS: usize = 4;
/// Flags of an export that allows several connections.
const MULTI_CONN: u16 = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN;

/// The export's byte at `offset`: neighbouring sectors differ, so a read written at
/// another offset shows.
fn pattern(offset: u64) -> u8 {
    (offset / 512 % 251) as u8
}

/// How a server offering `NBD_FLAG_CAN_MULTI_CONN` misbehaves on one connection
/// after the first. An import opens four; those of a resumed import come later and
/// are served well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Betrayal {
    /// The second connection's `NBD_OPT_GO` is refused.
    RefusesExport,
    /// The third connection finishes its handshake only once the second window is
    /// asked for (reads of it wait until then), reporting an export 1 MiB larger.
    OtherSize,
    /// The fourth connection closes halfway through its first reply of the second
    /// window.
    ClosesMidReply,
    /// The second connection answers its reads of the second window with a reply
    /// (cookie, offset, data) to a read the first connection carried.
    ForeignCookie,
}

/// What the connections of a betraying server share.
#[derive(Default)]
struct Betrayed {
    connections: AtomicUsize,
    /// A read of the second window was asked for.
    second_window: AtomicBool,
    /// The late handshake of [`Betrayal::OtherSize`] is over.
    late_handshake: AtomicBool,
    /// The last read each connection answered, by connection index.
    last_read: Mutex<BTreeMap<usize, Request>>,
}

/// Waits (a minute at most, so a broken test fails rather than hangs) for `flag`.
fn wait_for(flag: &AtomicBool) {
    let start = Instant::now();
    while !flag.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(60) {
        thread::sleep(Duration::from_millis(1));
    }
}

/// Serves the [`TWO_WINDOWS`] export on `listener`'s connections, betraying as
/// `betrayal` says; returns what the connections share.
fn betraying_server(listener: TcpListener, betrayal: Betrayal) -> Arc<Betrayed> {
    let shared = Arc::new(Betrayed::default());
    let state = Arc::clone(&shared);
    hostile_server(listener, move |stream, index| {
        serve_betraying(stream, index, betrayal, &state);
    });
    shared
}

fn serve_betraying(stream: &mut TcpStream, index: usize, betrayal: Betrayal, shared: &Betrayed) {
    shared.connections.fetch_add(1, Ordering::SeqCst);
    let offer = match (betrayal, index) {
        (Betrayal::RefusesExport, 1) => None,
        (Betrayal::OtherSize, 2) => {
            wait_for(&shared.second_window);
            Some((TWO_WINDOWS + (1 << 20), MULTI_CONN))
        }
        _ => Some((TWO_WINDOWS, MULTI_CONN)),
    };
    handshake(stream, offer);
    if (betrayal, index) == (Betrayal::OtherSize, 2) {
        shared.late_handshake.store(true, Ordering::SeqCst);
    }
    while let Some(request) = read_request(stream) {
        match request.command {
            CMD_BLOCK_STATUS => {
                // Context 1 (base:allocation): all of it data.
                let mut payload = 1u32.to_be_bytes().to_vec();
                payload.extend_from_slice(&request.length.to_be_bytes());
                payload.extend_from_slice(&0u32.to_be_bytes());
                chunk(
                    stream,
                    REPLY_TYPE_BLOCK_STATUS,
                    request.cookie,
                    &payload,
                    12,
                );
            }
            CMD_READ => {
                let second = request.offset >= SECOND_WINDOW;
                let first_attempt = index < IMPORT_CONNECTIONS;
                if second {
                    shared.second_window.store(true, Ordering::SeqCst);
                    if betrayal == Betrayal::OtherSize && first_attempt {
                        wait_for(&shared.late_handshake);
                    }
                }
                let mut last_read = shared.last_read.lock().unwrap();
                let answered = match (betrayal, index) {
                    (Betrayal::ClosesMidReply, 3) if second => {
                        let payload = read_payload(&request);
                        let half = &payload[..payload.len() / 2];
                        let len = payload.len() as u32;
                        chunk(stream, REPLY_TYPE_OFFSET_DATA, request.cookie, half, len);
                        return;
                    }
                    (Betrayal::ForeignCookie, 1) if second => {
                        last_read.get(&0).copied().unwrap_or(request)
                    }
                    _ => request,
                };
                last_read.insert(index, request);
                drop(last_read);
                let payload = read_payload(&answered);
                let len = payload.len() as u32;
                chunk(
                    stream,
                    REPLY_TYPE_OFFSET_DATA,
                    answered.cookie,
                    &payload,
                    len,
                );
            }
            _ => return,
        }
    }
}

/// The payload of a data chunk answering `request`: its offset, then the bytes.
fn read_payload(request: &Request) -> Vec<u8> {
    let mut payload = request.offset.to_be_bytes().to_vec();
    payload.extend((request.offset..request.offset + u64::from(request.length)).map(pattern));
    payload
}

/// A server allowing several connections that turns hostile on a later one: the
/// import stops with one error line at its checkpoint (the first window, whose
/// content is checked) and resumes over well-behaved connections. A refused extra
/// connection is done without.
#[test]
fn a_server_hostile_on_a_later_connection_stops_the_import_at_its_checkpoint() {
    host_tools::require_for_test(&[Tool::QemuImg]);
    let expected: Vec<u8> = (0..TWO_WINDOWS).map(pattern).collect();
    let scratch = Scratch::new().unwrap();
    let disks = appliance(&scratch, "m");
    assert!(exec(&disks, &SETUP).status.success());
    let protocol = "NBD protocol error: ";
    let cases: [(Betrayal, Vec<String>); 3] = [
        (
            Betrayal::OtherSize,
            vec![format!(
                "the server's connections disagree on the export's size ({TWO_WINDOWS} and {} \
                 bytes)",
                TWO_WINDOWS + (1 << 20)
            )],
        ),
        (
            Betrayal::ClosesMidReply,
            // Reading the end, or failing to send the next request.
            vec![
                "the server closed the connection while requests were in flight".into(),
                "connection lost: ".into(),
            ],
        ),
        (
            // The cookie may be in flight on the second connection too (each
            // connection counts its own), for a read elsewhere.
            Betrayal::ForeignCookie,
            vec![
                format!("{protocol}a read chunk lies outside the requested range"),
                format!("{protocol}a reply for cookie "),
            ],
        ),
    ];
    for (betrayal, errors) in cases {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!(
            "nbd://127.0.0.1:{}/x",
            listener.local_addr().unwrap().port()
        );
        let shared = betraying_server(listener, betrayal);
        let output = exec(&disks, &[&format!("thin import vm pool --from {uri}")]);
        let transcript = text(&output);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{betrayal:?}: {transcript}");
        assert!(!stderr.contains("panicked"), "{betrayal:?}: {stderr}");
        assert_eq!(error_lines(&transcript), 1, "{betrayal:?}: {transcript}");
        assert!(
            errors.iter().any(|error| transcript.contains(error)),
            "{betrayal:?}: {errors:?} expected in {transcript}"
        );
        assert!(
            transcript.contains("thin import --resume vm continues it"),
            "{betrayal:?}: {transcript}"
        );
        assert_eq!(
            shared.connections.load(Ordering::SeqCst),
            IMPORT_CONNECTIONS,
            "{betrayal:?}"
        );

        // The checkpoint is the first window, and the volume holds it.
        let saved = text(&exec(&disks, &["config show"]));
        assert!(
            saved.contains(&format!("import vm {SECOND_WINDOW} {uri}")),
            "{betrayal:?}: {saved}"
        );
        let window = SECOND_WINDOW as usize;
        assert!(
            volume_content(&scratch, &disks, "vm")[..window] == expected[..window],
            "{betrayal:?}: the checkpointed window differs"
        );

        // Resumed over later connections, served well: the second window is copied.
        let output = exec(&disks, &["thin import --resume vm"]);
        let transcript = text(&output);
        assert!(output.status.success(), "{betrayal:?}: {transcript}");
        assert_eq!(
            copied(&transcript),
            "64.00 MiB",
            "{betrayal:?}: {transcript}"
        );
        assert!(
            volume_content(&scratch, &disks, "vm") == expected,
            "{betrayal:?}: content differs"
        );
        assert!(exec(&disks, &["thin delete vm"]).status.success());
    }

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!(
        "nbd://127.0.0.1:{}/x",
        listener.local_addr().unwrap().port()
    );
    let shared = betraying_server(listener, Betrayal::RefusesExport);
    let output = exec(&disks, &[&format!("thin import vm pool --from {uri}")]);
    let transcript = text(&output);
    assert!(output.status.success(), "{transcript}");
    assert_eq!(copied(&transcript), "128.00 MiB", "{transcript}");
    assert_eq!(
        shared.connections.load(Ordering::SeqCst),
        IMPORT_CONNECTIONS
    );
    assert!(volume_content(&scratch, &disks, "vm") == expected);
}

/// Forwards connections on `listener` to `port`; the first `cut` of them are cut
/// once `limit` bytes from the server went through them together (the network
/// failing at that byte). Returns the count of connections forwarded.
fn cutting_proxy(listener: TcpListener, port: u16, cut: usize, limit: u64) -> Arc<AtomicUsize> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let budget = Arc::new(AtomicU64::new(limit));
    thread::spawn(move || {
        for (index, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut server = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let mut upstream = client.try_clone().unwrap();
            let server_reader = server.try_clone().unwrap();
            thread::spawn(move || {
                let _ = std::io::copy(&mut upstream, &mut server);
                let _ = server.shutdown(Shutdown::Write);
            });
            let budget = (index < cut).then(|| Arc::clone(&budget));
            thread::spawn(move || relay(server_reader, client, budget));
        }
    });
    accepted
}

/// Copies `from` to `to`, while `budget` (if any) lasts.
fn relay(mut from: TcpStream, mut to: TcpStream, budget: Option<Arc<AtomicU64>>) {
    let mut buf = vec![0; 64 << 10];
    loop {
        let got = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(got) => got,
        };
        let allowed = budget.as_ref().map_or(got, |budget| {
            let left = budget
                .try_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    Some(left.saturating_sub(got as u64))
                })
                .unwrap();
            got.min(left as usize)
        });
        if to.write_all(&buf[..allowed]).is_err() || allowed < got {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

#[test]
fn an_import_cut_off_mid_copy_resumes_from_its_checkpoint() {
    cut_and_resume(1);
}

/// The same over four connections: the checkpoint is where every connection's
/// reads below it were written, not where the fastest one got to.
#[test]
fn an_import_over_several_connections_cut_off_resumes_from_its_checkpoint() {
    cut_and_resume(4);
}

/// Imports a 192 MiB image (150 MiB of data) from a server taking `clients`
/// connections through a proxy that cuts them after 100 MiB, then resumes it.
fn cut_and_resume(clients: u32) {
    host_tools::require_for_test(&[Tool::QemuImg, Tool::QemuIo, Tool::QemuNbd]);
    let scratch = Scratch::new().unwrap();
    let commands: Vec<String> = (0..10)
        .map(|mib| format!("write -P {} {}M 15M", mib + 1, mib * 15))
        .collect();
    let image = qcow2(&scratch, 192, &commands);
    let expected = raw_content(&scratch, &image);
    let server = HostServer::qcow2_read_only(&image, clients).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap().port();
    let accepted = cutting_proxy(listener, server.port(), clients as usize, 100 << 20);
    let disks = appliance(&scratch, "r");
    let uri = format!("nbd://127.0.0.1:{proxy}/disk");
    let output = exec(
        &disks,
        &[
            SETUP[0],
            SETUP[1],
            &format!("thin import vm1 pool --from {uri}"),
        ],
    );
    let transcript = text(&output);
    assert!(!output.status.success(), "{transcript}");
    assert!(
        transcript.contains("thin import --resume vm1 continues it"),
        "{transcript}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), clients as usize);

    // The first 64 MiB window is through, the second not; the boot says so.
    let saved = text(&exec(&disks, &["config show"]));
    assert!(
        saved.contains(&format!("import vm1 {} {uri}", 64 << 20)),
        "{saved}"
    );
    let boot_line = format!(
        "config: the import into vm1 from {uri} stopped after 64.00 MiB of 192.00 MiB; thin \
         import --resume vm1 continues it"
    );
    assert!(saved.contains(&boot_line), "{saved}");

    let output = exec(&disks, &["thin import --resume vm1"]);
    let transcript = text(&output);
    assert!(output.status.success(), "{transcript}");
    assert_ne!(
        copied(&transcript),
        "150.00 MiB",
        "the resumed import started over: {transcript}"
    );
    assert!(
        volume_content(&scratch, &disks, "vm1") == expected,
        "content differs"
    );
    let again = exec(&disks, &["thin import --resume vm1"]);
    assert!(text(&again).contains("no unfinished import into vm1 is saved"));
}

/// A test NBD server over an image in memory that offers `base:allocation` (a block
/// of zeroes is a hole) and `thinbox:changed:BASE` (the blocks marked changed), as
/// an appliance's thin export does for the changes since snapshot BASE.
struct Model {
    image: Vec<u8>,
    changed: Vec<bool>,
    base: &'static str,
}

impl Model {
    fn zero(&self, block: usize) -> bool {
        let start = block * BLOCK as usize;
        self.image[start..start + BLOCK as usize]
            .iter()
            .all(|&b| b == 0)
    }
}

/// Serves `model` on a free port until the test ends; returns the port.
fn model_server(model: Arc<Mutex<Model>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let model = Arc::clone(&model);
            thread::spawn(move || serve_model(stream, &model));
        }
    });
    port
}

fn serve_model(mut stream: TcpStream, model: &Mutex<Model>) {
    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).unwrap();
    let mut flags = [0; 4];
    stream.read_exact(&mut flags).unwrap();
    // Selected contexts: id 1 allocation, id 2 changed.
    let mut selected: Vec<u32> = Vec::new();
    loop {
        let mut header = [0; 16];
        stream.read_exact(&mut header).unwrap();
        let option = be_u32(&header[8..]);
        let mut data = vec![0; be_u32(&header[12..]) as usize];
        stream.read_exact(&mut data).unwrap();
        match option {
            OPT_SET_META_CONTEXT => {
                let name_len = be_u32(&data) as usize;
                let mut at = 4 + name_len + 4;
                while at < data.len() {
                    let len = be_u32(&data[at..]) as usize;
                    let query = String::from_utf8_lossy(&data[at + 4..at + 4 + len]).into_owned();
                    at += 4 + len;
                    let changed = format!("thinbox:changed:{}", model.lock().unwrap().base);
                    let id = if query == BASE_ALLOCATION {
                        1
                    } else if query == changed {
                        2
                    } else {
                        continue;
                    };
                    selected.push(id);
                    let mut reply = id.to_be_bytes().to_vec();
                    reply.extend_from_slice(query.as_bytes());
                    option_reply(&mut stream, option, REP_META_CONTEXT, &reply);
                }
                option_reply(&mut stream, option, REP_ACK, &[]);
            }
            OPT_GO => {
                let size = model.lock().unwrap().image.len() as u64;
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
                option_reply(&mut stream, option, REP_INFO, &info);
                option_reply(&mut stream, option, REP_ACK, &[]);
                break;
            }
            _ => option_reply(&mut stream, option, REP_ACK, &[]),
        }
    }
    loop {
        let Some(Request {
            command,
            cookie,
            offset,
            length,
        }) = read_request(&mut stream)
        else {
            return;
        };
        let length = u64::from(length);
        let model = model.lock().unwrap();
        match command {
            CMD_READ => {
                let mut payload = offset.to_be_bytes().to_vec();
                payload
                    .extend_from_slice(&model.image[offset as usize..(offset + length) as usize]);
                let len = payload.len() as u32;
                chunk(&mut stream, REPLY_TYPE_OFFSET_DATA, cookie, &payload, len);
            }
            CMD_BLOCK_STATUS => {
                for (index, &id) in selected.iter().enumerate() {
                    let mut payload = id.to_be_bytes().to_vec();
                    let mut at = offset;
                    while at < offset + length {
                        let block = (at / BLOCK) as usize;
                        let flags = if id == 1 {
                            if model.zero(block) {
                                STATE_HOLE | STATE_ZERO
                            } else {
                                0
                            }
                        } else {
                            u32::from(model.changed[block])
                        };
                        let end = ((block as u64 + 1) * BLOCK).min(offset + length);
                        payload.extend_from_slice(&((end - at) as u32).to_be_bytes());
                        payload.extend_from_slice(&flags.to_be_bytes());
                        at = end;
                    }
                    let done = if index + 1 == selected.len() {
                        REPLY_FLAG_DONE
                    } else {
                        0
                    };
                    let mut bytes = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
                    bytes.extend_from_slice(&done.to_be_bytes());
                    bytes.extend_from_slice(&REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
                    bytes.extend_from_slice(&cookie.to_be_bytes());
                    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                    bytes.extend_from_slice(&payload);
                    stream.write_all(&bytes).unwrap();
                }
            }
            _ => return,
        }
    }
}

#[test]
fn sync_rounds_copy_only_what_changed_and_unmap_what_became_zero() {
    let scratch = Scratch::new().unwrap();
    let blocks = 512;
    let mut rng = Lcg(5);
    let mut image = vec![0u8; blocks * BLOCK as usize];
    for block in 0..blocks {
        if rng.below(3) == 0 {
            let fill = rng.below(255) as u8 + 1;
            image[block * BLOCK as usize..][..BLOCK as usize].fill(fill);
        }
    }
    let model = Arc::new(Mutex::new(Model {
        image,
        changed: vec![false; blocks],
        base: "s1",
    }));
    let port = model_server(Arc::clone(&model));
    let uri = format!("nbd://127.0.0.1:{port}/s2");
    let disks = appliance(&scratch, "s");
    let import = format!("thin import replica pool --from {uri}");
    let output = exec(&disks, &[SETUP[0], SETUP[1], &import]);
    assert!(output.status.success(), "{}", text(&output));

    let sync = format!("thin sync replica --from {uri} --changed-since s1");
    for round in 0..3 {
        let mut changed = 0;
        {
            let mut model = model.lock().unwrap();
            for _ in 0..40 {
                let block = rng.below(blocks as u64) as usize;
                if !model.changed[block] {
                    changed += 1;
                }
                model.changed[block] = true;
                let fill = match rng.below(3) {
                    0 => 0,
                    // Changed mappings need not change the content.
                    1 => model.image[block * BLOCK as usize],
                    _ => rng.below(255) as u8 + 1,
                };
                model.image[block * BLOCK as usize..][..BLOCK as usize].fill(fill);
            }
        }
        let output = exec(&disks, &[&sync, "thin ls pool"]);
        let transcript = text(&output);
        assert!(output.status.success(), "round {round}: {transcript}");
        let copied = dm::human_bytes(changed * BLOCK);
        assert!(
            transcript.contains(&format!(": {copied} copied")),
            "round {round}: {copied} expected in {transcript}"
        );
        let mut state = model.lock().unwrap();
        let data = (0..blocks).filter(|&block| !state.zero(block)).count() as u64;
        assert_eq!(
            mapped_column(ls_row(&transcript, "replica")),
            dm::human_bytes(data * BLOCK),
            "round {round}: zeroed blocks are unmapped"
        );
        assert!(
            volume_content(&scratch, &disks, "replica") == state.image,
            "round {round}: content differs"
        );
        state.changed.fill(false);
    }

    let output = exec(
        &disks,
        &[&format!(
            "thin sync replica --from {uri} --changed-since nope"
        )],
    );
    let transcript = text(&output);
    assert!(!output.status.success());
    assert_eq!(error_lines(&transcript), 1, "{transcript}");
    assert!(
        transcript.contains("offers no metadata context thinbox:changed:nope"),
        "{transcript}"
    );
}
