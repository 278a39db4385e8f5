//! NBD over TLS on the booted appliance (QEMU's `max` CPU model gives it RDRAND):
//! `nbd tls generate` and `nbd tls require` with access-list rules, real `nbdcopy`
//! and `nbdinfo` over `nbds://` trusting the certificate the console printed, a
//! plaintext client refused with `NBD_REP_ERR_TLS_REQD`, clients that stall before
//! or inside the TLS handshake cut off after the negotiation limit, and after a
//! reboot the same certificate, policy and rules in force and the data still there.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{Appliance, Options, Scratch, run_tool, wait_for_greeting};

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

/// What holds before and after the reboot: the policy and the certificate, the rules,
/// plaintext refused, `other` refused by the default, `vol` served.
fn check_in_force(appliance: &mut Appliance, fingerprint: &str, pki: &Path, acl: &str) {
    let tls = appliance.console_ok("nbd tls").unwrap();
    assert_eq!(
        tls,
        format!(
            "tls: require\ncertificate SHA-256: {fingerprint}\n\
             chain: 1 certificate(s); private key stored (pkcs8, not shown)"
        )
    );
    assert_eq!(appliance.console_ok("nbd acl").unwrap(), acl);
    let port = appliance.nbd_port().unwrap();
    let refused = nbdinfo_refused(&format!("nbd://127.0.0.1:{port}/vol"));
    assert!(refused.contains("TLS is required"), "{refused}");
    let refused = nbdinfo_refused(&tls_uri(appliance, "other", pki));
    assert!(
        refused.contains("access to export 'other' is denied to 10.0.2.2"),
        "{refused}"
    );
    let info = run_tool("nbdinfo", &[&tls_uri(appliance, "vol", pki)]);
    assert!(info.contains("newstyle-fixed with TLS"), "{info}");
    assert!(
        info.contains(&format!("export-size: {VOLUME_BYTES}")),
        "{info}"
    );
}

#[test]
fn a_generated_certificate_require_and_access_rules_serve_real_clients_across_a_reboot() {
    host_tools::require_for_test(&[Tool::Qemu, Tool::NbdInfo, Tool::NbdCopy, Tool::Openssl]);
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
    let pki = scratch.path().join("pki");
    fs::create_dir_all(&pki).unwrap();
    fs::write(pki.join("ca-cert.pem"), &certificate).unwrap();
    assert_eq!(fingerprint, openssl_fingerprint(&pki.join("ca-cert.pem")));
    assert_eq!(
        appliance.console_ok("nbd tls require").unwrap(),
        "tls: require"
    );
    let silent = Stalled::connect(&appliance, &[]);
    let half_handshake = Stalled::connect(&appliance, &stalled_handshake());
    check_in_force(&mut appliance, &fingerprint, &pki, &acl);

    // nbdcopy writes over TLS and reads back.
    let bytes: Vec<u8> = (0..VOLUME_BYTES)
        .map(|i| (i * 7 / 3 + i / 4096) as u8)
        .collect();
    let source = scratch.path().join("source.raw");
    fs::write(&source, &bytes).unwrap();
    let uri = tls_uri(&appliance, "vol", &pki);
    run_tool("nbdcopy", &["--flush", source.to_str().unwrap(), &uri]);
    let copy = scratch.path().join("copy.raw");
    assert!(
        copy_out(&appliance, &pki, &copy) == bytes,
        "read other bytes over TLS"
    );
    for stalled in [silent, half_handshake] {
        let after = stalled.cut_off_after();
        assert!(after >= NEGOTIATION_LIMIT, "cut off after {after:?}");
    }
    appliance.shutdown().unwrap();

    let mut appliance = boot(&config, &data);
    check_in_force(&mut appliance, &fingerprint, &pki, &acl);
    assert!(
        copy_out(&appliance, &pki, &copy) == bytes,
        "read other bytes over TLS after the reboot"
    );
    appliance.shutdown().unwrap();
}
