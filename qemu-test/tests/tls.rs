//! NBD over TLS on the booted appliance (QEMU's `max` CPU model gives it RDRAND):
//! `nbd tls generate` and `nbd tls require` with access-list rules, client
//! certificates required (`nbd tls clients` pasted with a CA made by `certtool`) and
//! named by `cert:` and `subject:` rules, real `nbdcopy` and `nbdinfo` over
//! `nbds://` trusting the certificate the console printed, a client without a
//! certificate or with one from another CA refused, a plaintext client refused with
//! `NBD_REP_ERR_TLS_REQD`, clients that stall before or inside the TLS handshake cut
//! off after the negotiation limit, and after a reboot the same certificate, policy,
//! CA and rules in force and the data still there.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use host_tools::Tool;
use qemu_test::{Appliance, Options, Pki, Scratch, client_template, run_tool, wait_for_greeting};

const MIB: u64 = 1 << 20;
/// Size of the served volume, `vol`.
const VOLUME_BYTES: usize = 8 << 20;
/// How long the NBD server may take to answer after boot.
const READY: Duration = Duration::from_secs(60);
/// How long the appliance lets a client negotiate before cutting it off.
const NEGOTIATION_LIMIT: Duration = Duration::from_secs(60);
/// How much later than the limit a stalled client may be cut off on a busy host.
const CUT_OFF_SLACK: Duration = Duration::from_secs(60);

/// Boots with the configuration disk and the data disk and waits for the NBD server.
fn boot(config: &Path, data: &Path) -> Appliance {
    let options = Options::bios().disk(config).disk(data).nbd();
    let appliance = Appliance::boot(options).unwrap();
    if let Err(why) = wait_for_greeting(appliance.nbd_port().unwrap(), READY) {
        panic!("{why}\n{}", appliance.transcript());
    }
    appliance
}

/// A client that stops negotiating: after the greeting it sends `prefix` and then
/// nothing, never reading again.
struct Stalled {
    stream: TcpStream,
    since: Instant,
}

impl Stalled {
    fn connect(appliance: &Appliance, prefix: &[u8]) -> Stalled {
        let port = appliance.nbd_port().unwrap();
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        let since = Instant::now();
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).unwrap();
        stream.write_all(prefix).unwrap();
        Stalled { stream, since }
    }

    /// Waits for the appliance to close the connection (leaving unread what it
    /// sent) and returns how long after connecting it did.
    fn cut_off_after(mut self) -> Duration {
        let deadline = self.since + NEGOTIATION_LIMIT + CUT_OFF_SLACK;
        let mut sink = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "a stalled client was never cut off");
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut sink) {
                Ok(0) | Err(_) => return self.since.elapsed(),
                Ok(_) => {}
            }
        }
    }
}

/// Fixed-newstyle flags and `NBD_OPT_STARTTLS`, then the first 16 bytes of a TLS
/// record that announces a 512-byte ClientHello.
fn stalled_handshake() -> Vec<u8> {
    let mut bytes = 3u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(b"IHAVEOPT");
    bytes.extend_from_slice(&5u32.to_be_bytes());
    bytes.extend_from_slice(&0u32.to_be_bytes());
    bytes.extend_from_slice(&[0x16, 3, 1, 2, 0, 1, 0, 1, 0xfc, 3, 3]);
    bytes.extend_from_slice(&[0; 5]);
    bytes
}

/// `nbds://` for `export` on the appliance, trusting the CA in `pki`.
fn tls_uri(appliance: &Appliance, export: &str, pki: &Path) -> String {
    let port = appliance.nbd_port().unwrap();
    format!(
        "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
        pki.display()
    )
}

/// What `nbdinfo` printed on standard error, expecting it to fail (libnbd shows the
/// server's message only in its debug output).
fn nbdinfo_refused(uri: &str) -> String {
    let output = Command::new("nbdinfo")
        .arg(uri)
        .env("LIBNBD_DEBUG", "1")
        .output()
        .unwrap();
    assert!(!output.status.success(), "nbdinfo {uri} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The certificate (PEM) and fingerprint `nbd tls generate` printed.
fn generated(printed: &str) -> (String, String) {
    let begin = printed.find("-----BEGIN CERTIFICATE-----").unwrap();
    let end_marker = "-----END CERTIFICATE-----";
    let end = printed.find(end_marker).unwrap() + end_marker.len();
    let fingerprint = printed
        .lines()
        .find_map(|line| line.strip_prefix("SHA-256 fingerprint: "))
        .unwrap_or_else(|| panic!("no fingerprint in {printed}"));
    (
        format!("{}\n", &printed[begin..end]),
        fingerprint.to_string(),
    )
}

/// The SHA-256 fingerprint openssl computes for the certificate in `pem_file`.
fn openssl_fingerprint(pem_file: &Path) -> String {
    let path = pem_file.to_str().unwrap();
    let printed = run_tool(
        "openssl",
        &["x509", "-noout", "-fingerprint", "-sha256", "-in", path],
    );
    printed.trim().split('=').nth(1).unwrap().to_string()
}

/// Reads all of `vol` over TLS into `file` and returns its bytes.
fn copy_out(appliance: &Appliance, pki: &Path, file: &PathBuf) -> Vec<u8> {
    let _ = fs::remove_file(file);
    let uri = tls_uri(appliance, "vol", pki);
    run_tool("nbdcopy", &[&uri, file.to_str().unwrap()]);
    fs::read(file).unwrap()
}

/// The directories clients read: the appliance's certificate as the CA they trust,
/// and a client certificate from `clients` (or none).
struct Trust {
    /// `client1`: named by a `cert:` rule that lets it read `other`.
    good: PathBuf,
    /// `client2`, from the same CA: a `subject:` rule denies it `vol`.
    denied: PathBuf,
    /// `stranger`, from another CA.
    foreign: PathBuf,
    none: PathBuf,
}

impl Trust {
    fn new(clients: &Pki, certificate: &str) -> Trust {
        let dir = |name: Option<&str>| {
            let dir = clients.client_dir(name);
            fs::write(dir.join("ca-cert.pem"), certificate).unwrap();
            dir
        };
        Trust {
            good: dir(Some("client1")),
            denied: dir(Some("client2")),
            foreign: dir(Some("stranger")),
            none: dir(None),
        }
    }
}

/// The lines of `nbd acl` with their columns' padding squeezed to one space.
fn acl_rows(acl: &str) -> Vec<String> {
    acl.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// The account of the latest failed TLS session that `nbd tls` gives, after its time.
fn latest_tls_failure(appliance: &mut Appliance) -> String {
    let tls = appliance.console_ok("nbd tls").unwrap();
    let line = tls
        .lines()
        .find(|line| line.starts_with("failed TLS sessions: "))
        .unwrap_or_else(|| panic!("no failed TLS session in {tls}"));
    line.split_once(" UTC: ").unwrap().1.to_string()
}

/// The host's time, in seconds since the Unix epoch.
fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Asserts that the client with the credentials in `dir` gets through the TLS
/// handshake and is then refused `export` by the access rules; if the handshake
/// failed instead, shows the appliance's reason and clock and the host's time.
fn assert_denied(appliance: &mut Appliance, export: &str, dir: &Path) {
    let refused = nbdinfo_refused(&tls_uri(appliance, export, dir));
    if !refused.contains(&format!(
        "access to export '{export}' is denied to 10.0.2.2"
    )) {
        panic!(
            "{refused}\nthe appliance's nbd tls:\n{}\nthe host's time: {} s",
            appliance.console_ok("nbd tls").unwrap(),
            unix_seconds()
        );
    }
}

/// What holds before and after the reboot: the policy, the certificate and the
/// clients' CA, the rules, plaintext refused, clients without a certificate from the
/// CA refused, `other` served to the client its `cert:` rule names and refused by the
/// default to the others, `vol` served but to the client its `subject:` rule denies.
fn check_in_force(appliance: &mut Appliance, fingerprint: &str, trust: &Trust, acl: &[String]) {
    let before = unix_seconds();
    let tls = appliance.console_ok("nbd tls").unwrap();
    let after = unix_seconds();
    let expected = format!(
        "tls: require\ncertificate SHA-256: {fingerprint}\n\
         chain: 1 certificate(s); private key stored (pkcs8, not shown)\n\
         client certificates: required, issued by:\n  CN=thinbox test clients CA (SHA-256 "
    );
    assert!(tls.starts_with(&expected), "{tls}");
    // The appliance's clock (whole seconds) is the host's, but for QEMU's RTC starting
    // up to a second behind it.
    let clock = tls
        .lines()
        .find_map(|line| line.strip_prefix("validity checked against the clock: "))
        .unwrap_or_else(|| panic!("{tls}"));
    let clock = run_tool("date", &["-u", "-d", clock, "+%s"]);
    let clock: f64 = clock.trim().parse().unwrap();
    assert!(
        clock >= before.floor() - 1.0 && clock <= after,
        "the appliance's clock {clock} s, the host's {before}..{after} s"
    );
    assert_eq!(acl_rows(&appliance.console_ok("nbd acl").unwrap()), acl);
    let port = appliance.nbd_port().unwrap();
    let refused = nbdinfo_refused(&format!("nbd://127.0.0.1:{port}/vol"));
    assert!(refused.contains("TLS is required"), "{refused}");
    for (dir, reason) in [
        (&trust.none, "peer sent no certificates"),
        // The other CA has the pasted one's name: its signature fails the pasted key.
        (&trust.foreign, "invalid peer certificate: BadSignature"),
    ] {
        let refused = nbdinfo_refused(&tls_uri(appliance, "vol", dir));
        assert!(refused.contains("gnutls"), "{refused}");
        let latest = latest_tls_failure(appliance);
        assert!(
            latest.starts_with("TLS handshake with 10.0.2.2:") && latest.ends_with(reason),
            "{latest}"
        );
    }
    for export in ["other", "vol"] {
        assert_denied(appliance, export, &trust.denied);
    }
    for export in ["vol", "other"] {
        let info = run_tool("nbdinfo", &[&tls_uri(appliance, export, &trust.good)]);
        assert!(info.contains("newstyle-fixed with TLS"), "{info}");
        assert!(
            info.contains(&format!("export-size: {VOLUME_BYTES}")),
            "{info}"
        );
    }
}

#[test]
fn a_generated_certificate_require_and_access_rules_serve_real_clients_across_a_reboot() {
    host_tools::require_for_test(&[
        Tool::Qemu,
        Tool::NbdInfo,
        Tool::NbdCopy,
        Tool::Openssl,
        Tool::CertTool,
    ]);
    let scratch = Scratch::new().unwrap();
    let config = scratch.disk("config.img", 16 * MIB).unwrap();
    let data = scratch.disk("data.img", 32 * MIB).unwrap();
    let mut appliance = boot(&config, &data);
    let sectors = VOLUME_BYTES / 512;
    for command in [
        "config init vda".to_string(),
        format!("create vol --table \"0 {sectors} linear vdb 0\""),
        format!("create other --table \"0 {sectors} linear vdb {sectors}\""),
        "nbd default deny".to_string(),
        // QEMU's user network: every host client comes from 10.0.2.2.
        "nbd allow vol 10.0.2.2".to_string(),
    ] {
        appliance.console_ok(&command).unwrap();
    }
    let acl = appliance.console_ok("nbd acl").unwrap();
    assert_eq!(
        acl,
        "default: deny\nEXPORT  CLIENTS   ACCESS\nvol     10.0.2.2  allow"
    );
    let printed = appliance
        .console_ok("nbd tls generate 127.0.0.1 localhost")
        .unwrap();
    let (certificate, fingerprint) = generated(&printed);
    assert!(!printed.contains("PRIVATE KEY"), "{printed}");
    let clients = Pki::new(&scratch);
    for (name, ca) in [
        ("client1", "ca"),
        ("client2", "ca"),
        ("stranger", "other-ca"),
    ] {
        clients.issue(name, ca, &client_template(name));
    }
    let trust = Trust::new(&clients, &certificate);
    assert_eq!(
        fingerprint,
        openssl_fingerprint(&trust.good.join("ca-cert.pem"))
    );
    assert_eq!(
        appliance.console_ok("nbd tls require").unwrap(),
        "tls: require"
    );
    let pasted = appliance
        .console_paste("nbd tls clients", &clients.read("ca-cert.pem"))
        .unwrap();
    let ca_line = format!(
        "  CN=thinbox test clients CA (SHA-256 {})",
        clients.fingerprint("ca")
    );
    assert!(pasted.lines().any(|line| line == ca_line), "{pasted}");
    let good = clients.fingerprint("client1");
    let denied = clients.subject("client2");
    appliance
        .console_ok(&format!("nbd allow other cert:{good}"))
        .unwrap();
    appliance
        .console_ok(&format!("nbd deny vol subject:{denied}"))
        .unwrap();
    let acl = acl_rows(&appliance.console_ok("nbd acl").unwrap());
    let mut expected = acl_rows("default: deny\nEXPORT  CLIENTS   ACCESS\nvol     10.0.2.2  allow");
    expected.push(format!("vol subject:{denied} deny"));
    expected.push(format!("other cert:{good} allow"));
    let mut sorted = acl.clone();
    sorted[2..].sort();
    expected[2..].sort();
    assert_eq!(sorted, expected);
    let silent = Stalled::connect(&appliance, &[]);
    let half_handshake = Stalled::connect(&appliance, &stalled_handshake());
    check_in_force(&mut appliance, &fingerprint, &trust, &acl);

    // nbdcopy writes over TLS and reads back.
    let bytes: Vec<u8> = (0..VOLUME_BYTES)
        .map(|i| (i * 7 / 3 + i / 4096) as u8)
        .collect();
    let source = scratch.path().join("source.raw");
    fs::write(&source, &bytes).unwrap();
    let uri = tls_uri(&appliance, "vol", &trust.good);
    run_tool("nbdcopy", &["--flush", source.to_str().unwrap(), &uri]);
    let copy = scratch.path().join("copy.raw");
    assert!(
        copy_out(&appliance, &trust.good, &copy) == bytes,
        "read other bytes over TLS"
    );
    for stalled in [silent, half_handshake] {
        let after = stalled.cut_off_after();
        assert!(after >= NEGOTIATION_LIMIT, "cut off after {after:?}");
    }
    appliance.shutdown().unwrap();

    let mut appliance = boot(&config, &data);
    check_in_force(&mut appliance, &fingerprint, &trust, &acl);
    assert!(
        copy_out(&appliance, &trust.good, &copy) == bytes,
        "read other bytes over TLS after the reboot"
    );
    appliance.shutdown().unwrap();
}
