//! `--tls`: NBD over TLS against plaintext, on `thinbox offline` (host) and on the
//! appliance. Each server runs `nbd tls generate` and `nbd tls on`, so one server
//! serves the same thin volume both ways; clients trust the printed certificate.
//! For each: `nbdcopy` copies in and out, a libnbd client (`nbdsh`; fio's nbd engine
//! cannot do TLS) sends 4 KiB random reads and writes at queue depth 16, and the
//! handshake time is the median, over several connections, from connecting to the
//! first reply (a 512-byte read). The ratios TLS / plaintext are printed, with the
//! load average before and after (the machine may be shared).

use std::fs;
use std::path::{Path, PathBuf};

use host_tools::Tool;
use qemu_test::{Nic, Scratch};

use crate::{
    Client, EXPORT_BYTES, LibnbdLoad, MIB, Result, Table, libnbd_iops, network, output_of,
    start_offline, timed, write_random,
};

/// Connections timed for the handshake figure.
const HANDSHAKES: usize = 9;
/// What both servers run after making the pool: a certificate for the address the
/// clients dial, and TLS offered beside plaintext.
const TLS_COMMANDS: [&str; 2] = ["nbd tls generate 127.0.0.1", "nbd tls on"];

/// One server's figures over one protocol.
struct Figures {
    write_mb_s: f64,
    read_mb_s: f64,
    randread_iops: f64,
    randwrite_iops: f64,
    handshake_ms: f64,
}

impl Figures {
    fn columns(&self) -> [f64; 5] {
        [
            self.write_mb_s,
            self.read_mb_s,
            self.randread_iops,
            self.randwrite_iops,
            self.handshake_ms,
        ]
    }
}

pub fn bench(seconds: u32) -> Result<()> {
    host_tools::require(&[Tool::Qemu, Tool::NbdCopy, Tool::NbdSh])
        .map_err(|missing| format!("missing tools: {}", missing.install_command()))?;
    let scratch = Scratch::new().map_err(|e| format!("scratch directory: {e}"))?;
    let source = scratch.path().join("random.img");
    write_random(&source, EXPORT_BYTES)?;
    let before = load_average();

    let offline = start_offline(scratch.path(), &TLS_COMMANDS)?;
    let plain = offline.uri("thin");
    let tls = tls_uri(
        &plain,
        &trust(&scratch, "offline-pki", offline.transcript())?,
    );
    let offline_plain = measure("offline plaintext", &plain, &source, seconds)?;
    let offline_tls = measure("offline TLS", &tls, &source, seconds)?;
    drop(offline);

    let mut appliance = network::boot(&scratch, Nic::Virtio, None, None)?;
    let (_, plain) = network::serve(&mut appliance, None)?;
    let mut printed = String::new();
    for command in TLS_COMMANDS {
        printed += &appliance
            .console_ok(command)
            .map_err(|e| format!("{command}: {e:?}"))?;
    }
    let tls = tls_uri(&plain, &trust(&scratch, "appliance-pki", &printed)?);
    let appliance_plain = measure("appliance plaintext", &plain, &source, seconds)?;
    let appliance_tls = measure("appliance TLS", &tls, &source, seconds)?;
    appliance
        .shutdown()
        .map_err(|e| format!("shutdown: {e:?}"))?;
    let after = load_average();

    println!();
    println!("load average before: {before}, after: {after}");
    Table::io_and("handshake ms", 1).print(
        &[
            ("offline plaintext", offline_plain.columns()),
            ("offline TLS", offline_tls.columns()),
            ("appliance plaintext", appliance_plain.columns()),
            ("appliance TLS", appliance_tls.columns()),
        ],
        &[
            (
                "offline TLS / plaintext",
                offline_tls.columns(),
                offline_plain.columns(),
            ),
            (
                "appliance TLS / plaintext",
                appliance_tls.columns(),
                appliance_plain.columns(),
            ),
        ],
    );
    Ok(())
}

/// Writes the certificate `nbd tls generate` printed into `printed` as `ca-cert.pem`
/// of a new directory `name`, which it returns.
fn trust(scratch: &Scratch, name: &str, printed: &str) -> Result<PathBuf> {
    let end_marker = "-----END CERTIFICATE-----";
    let (Some(begin), Some(end)) = (
        printed.find("-----BEGIN CERTIFICATE-----"),
        printed.find(end_marker),
    ) else {
        return Err(format!("no certificate printed: {printed}"));
    };
    let dir = scratch.path().join(name);
    let pem = format!("{}\n", &printed[begin..end + end_marker.len()]);
    fs::create_dir_all(&dir)
        .and_then(|()| fs::write(dir.join("ca-cert.pem"), pem))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// The `nbds://` twin of the plaintext `uri`, trusting the certificate in `pki`.
fn tls_uri(uri: &str, pki: &Path) -> String {
    let rest = uri.strip_prefix("nbd://").unwrap_or(uri);
    format!("nbds://{rest}?tls-certificates={}", pki.display())
}

/// Copies in and out, random reads and writes, and handshakes against `uri`.
fn measure(name: &str, uri: &str, source: &Path, seconds: u32) -> Result<Figures> {
    let client = Client::Host;
    eprintln!("{name}: copying {} MiB in and out", EXPORT_BYTES / MIB);
    let write = timed(
        client,
        &["nbdcopy", "--flush", &source.display().to_string(), uri],
    )?;
    let read = timed(client, &["nbdcopy", uri, "null:"])?;
    eprintln!("{name}: 4 KiB random reads and writes, queue depth 16, {seconds} s each");
    let randread_iops = libnbd_iops(client, uri, seconds, LibnbdLoad::Reads)?;
    let randwrite_iops = libnbd_iops(client, uri, seconds, LibnbdLoad::Writes)?;
    eprintln!("{name}: {HANDSHAKES} handshakes");
    let handshake_ms = handshake_ms(uri)?;
    let mb = EXPORT_BYTES as f64 / 1e6;
    Ok(Figures {
        write_mb_s: mb / write.as_secs_f64(),
        read_mb_s: mb / read.as_secs_f64(),
        randread_iops,
        randwrite_iops,
        handshake_ms,
    })
}

/// The median time in milliseconds from connecting to `uri` to the first reply.
fn handshake_ms(uri: &str) -> Result<f64> {
    let script = format!(
        r#"
import time
times = []
for _ in range({HANDSHAKES}):
    handle = nbd.NBD()
    handle.set_uri_allow_local_file(True)
    start = time.monotonic()
    handle.connect_uri({uri:?})
    handle.pread(512, 0)
    times.append(time.monotonic() - start)
    handle.shutdown()
times.sort()
print(times[len(times) // 2] * 1000)
"#
    );
    let text = output_of(qemu_test::nbdsh_script(&script), "handshakes")?;
    text.trim()
        .parse()
        .map_err(|_| format!("unexpected nbdsh output: {text}"))
}

/// The 1-, 5- and 15-minute load averages.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| String::from("unknown"))
}
