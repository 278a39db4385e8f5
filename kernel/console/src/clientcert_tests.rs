//! `nbd tls clients` and certificate rules on the console: the CA paste refused
//! without a clock and for bad input, listed in `nbd tls`, saved across a restart;
//! `cert:` and `subject:` rules shown by `nbd acl`; a connection's certificate
//! subject shown by `info` and `nbd clients`.

use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use dm::tls::cert::{SubjectName, self_signed};
use dm::tls::{fingerprint, pem};
use nbd::{Backend, Peer};

use crate::tests::{CLIENT, FakePlatform, console_over, disk, lines, mem_disk, nbd_backend, ok};
use crate::{Console, PROMPT};

/// 2026-12-06 12:00:00 UTC.
fn noon() -> Option<u64> {
    Some(1_796_558_400)
}

/// A console over `disk` whose machine clock is `clock`, started; with what `start`
/// printed.
fn boot_with_clock(
    disk_contents: &blockdev::MemDisk,
    clock: dm::tls::clock::WallClock,
) -> (Console<FakePlatform>, String) {
    let mut console = console_over(
        FakePlatform::default(),
        alloc::vec![disk("vda", disk_contents.handle())],
    );
    console.dm.borrow_mut().set_wall_clock(clock);
    let mut out = String::new();
    console.start(&mut out);
    let notes = out.strip_suffix(PROMPT).unwrap_or(&out).to_string();
    (console, notes)
}

/// Runs `lines` as typed lines (pastes included); returns everything printed.
fn type_lines(console: &mut Console<FakePlatform>, typed: &[&str]) -> String {
    let mut out = String::new();
    for line in typed {
        console.run_line(line, &mut out);
    }
    out
}

/// `nbd tls clients`, the PEM of `der`, `end`.
fn paste_authority(console: &mut Console<FakePlatform>, pem_text: &str) -> String {
    let mut typed = alloc::vec!["nbd tls clients"];
    typed.extend(pem_text.lines());
    typed.push("end");
    type_lines(console, &typed)
}

/// A certificate (self-signed, so a CA) naming `name`.
fn certificate(name: &str, seed: u8) -> Vec<u8> {
    self_signed([seed; 32], [seed; 16], &[SubjectName::Dns(name.into())]).certificate
}

const PASTE_PROMPT: &str =
    "paste the CA certificate(s) that issue client certificates, as PEM; end with a line: end\r\n";

#[test]
fn client_authorities_need_a_clock_and_good_pem_and_survive_a_restart() {
    let contents = mem_disk(64, "QEMU", "a");
    let ca = certificate("ca.example", 1);
    let ca_pem = pem::encode("CERTIFICATE", &ca);

    let (mut console, _) = boot_with_clock(&contents, dm::tls::clock::unknown_time);
    ok(&mut console, "config init vda");
    assert_eq!(
        paste_authority(&mut console, &ca_pem),
        alloc::format!(
            "{PASTE_PROMPT}error: nbd tls clients: the wall clock is unknown, so client \
             certificates cannot be checked for expiry (set the machine's real-time clock to \
             UTC)\r\n"
        )
    );
    drop(console);

    let (mut console, _) = boot_with_clock(&contents, noon);
    let key_pem = pem::encode("PRIVATE KEY", &[1, 2, 3]);
    for (pasted, why) in [
        (
            key_pem.as_str(),
            "unexpected PEM block PRIVATE KEY: paste only CA certificates",
        ),
        (
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
            "the CERTIFICATE block is not valid base64",
        ),
        (
            "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n",
            "the certificate is not valid DER X.509",
        ),
        (
            "nothing pasted",
            "there is no certificate (CERTIFICATE block)",
        ),
    ] {
        assert_eq!(
            paste_authority(&mut console, pasted),
            alloc::format!("{PASTE_PROMPT}error: nbd tls clients: {why}\r\n")
        );
    }
    assert_eq!(
        type_lines(&mut console, &["nbd tls"]),
        "tls: off\r\nno certificate (nbd tls generate, or nbd tls import)\r\n"
    );

    let listing = alloc::format!(
        "client certificates: required, issued by:\r\n  CN=ca.example (SHA-256 {})\r\n\
         validity checked against the clock: 2026-12-06 12:00:00 UTC\r\n",
        fingerprint(&ca)
    );
    assert_eq!(
        paste_authority(&mut console, &ca_pem),
        alloc::format!("{PASTE_PROMPT}{listing}")
    );
    assert_eq!(console.failures(), 4);
    drop(console);

    // Saved: listed after a restart; without a clock the restart says what that means.
    let (mut console, _) = boot_with_clock(&contents, noon);
    assert_eq!(
        type_lines(&mut console, &["nbd tls"]),
        alloc::format!(
            "tls: off\r\nno certificate (nbd tls generate, or nbd tls import)\r\n{listing}"
        )
    );
    drop(console);
    let (mut console, notes) = boot_with_clock(&contents, dm::tls::clock::unknown_time);
    assert!(
        notes.contains(
            "config: the wall clock is unknown: client certificates cannot be checked, so every \
             TLS client is refused\r\n"
        ),
        "{notes}"
    );
    assert_eq!(
        type_lines(
            &mut console,
            &["nbd tls clients off", "nbd tls", "nbd tls clients maybe"]
        ),
        "client certificates: not asked for\r\ntls: off\r\nno certificate (nbd tls generate, \
         or nbd tls import)\r\nerror: nbd tls clients: wrong arguments (usage: nbd tls clients \
         (then paste the CA certificates as PEM, and a line: end) | nbd tls clients off)\r\n"
    );
}

#[test]
fn certificate_rules_are_listed_and_connections_show_their_subject() {
    let contents = mem_disk(64, "QEMU", "a");
    let (mut console, _) = boot_with_clock(&contents, noon);
    let client = certificate("client.example", 2);
    let digest = fingerprint(&client);
    for line in [
        "config init vda",
        "create vol0 --table \"0 2048 linear vda 0\"",
        "nbd default deny",
        "nbd allow vol0 127.0.0.0/8",
    ] {
        ok(&mut console, line);
    }
    let rules = [
        alloc::format!("nbd allow vol0 cert:{} ro", digest.to_lowercase()),
        String::from("nbd deny * \"subject:CN=backup host,O=Example\" hide"),
        String::from("nbd allow vol0 cert:1234"),
        String::from("nbd allow vol0 subject:"),
    ];
    let typed: Vec<&str> = rules.iter().map(String::as_str).collect();
    let out = type_lines(&mut console, &typed);
    assert_eq!(
        lines(&out),
        [
            "error: nbd allow: '1234' is not a SHA-256 fingerprint (64 hex digits, colons \
             allowed, as openssl x509 -fingerprint -sha256 prints it)",
            "error: nbd allow: subject: takes the certificate's whole subject, as nbd clients \
             or info shows it (e.g. subject:CN=client1,O=Example)",
        ]
    );
    let cert_rule = alloc::format!("cert:{digest}");
    let width = cert_rule.len();
    let table = [
        String::from("default: deny"),
        alloc::format!("{:<6}  {:<width$}  ACCESS", "EXPORT", "CLIENTS"),
        alloc::format!("{:<6}  {:<width$}  allow", "vol0", "127.0.0.0/8"),
        alloc::format!("{:<6}  {cert_rule}  allow ro", "vol0"),
        alloc::format!(
            "{:<6}  {:<width$}  deny hide",
            "*",
            "subject:CN=backup host,O=Example"
        ),
    ];
    assert_eq!(lines(&type_lines(&mut console, &["nbd acl"])), table);

    // A connection whose TLS client proved it holds `client`.
    let mut backend = nbd_backend(&console);
    let peer = Peer {
        address: CLIENT,
        certificate: Some(Arc::from(client.as_slice())),
    };
    assert_eq!(backend.access("vol0", &peer), nbd::Access::ReadOnly);
    assert_eq!(
        backend.access("vol0", &Peer::at(CLIENT)),
        nbd::Access::ReadWrite
    );
    backend.open_by("vol0", &peer).unwrap();
    let info = type_lines(&mut console, &["info vol0"]);
    assert!(
        info.contains(
            "NBD export:        vol0 (1 client: 127.0.0.1:40000 (CN=client.example))\r\n"
        ),
        "{info}"
    );
    assert_eq!(
        lines(&type_lines(&mut console, &["nbd clients"])),
        [
            "EXPORT  CLIENT",
            "vol0    127.0.0.1:40000 (CN=client.example)"
        ]
    );
    drop(console);

    // The rules come back, certificate rules after the address rules.
    let (mut console, _) = boot_with_clock(&contents, noon);
    assert_eq!(lines(&type_lines(&mut console, &["nbd acl"])), table);
}
