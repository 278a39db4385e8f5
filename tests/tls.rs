//! NBD over TLS in offline mode with real clients: libnbd's `nbdinfo` and `nbdcopy`
//! (`nbds://` URIs with a `tls-certificates` directory) and `qemu-img` (a
//! `tls-creds-x509` object), with certificates made by `certtool`, by `openssl` and
//! by `nbd tls generate`; plaintext clients refused under `require`; a client that
//! does not trust the server's certificate reported in an `event:` line.

#[path = "common/served.rs"]
mod served;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use host_tools::Tool;
use qemu_test::{Scratch, run_tool};
use served::{Served, disks, paste};

/// Size of the served volume.
const VOLUME_BYTES: usize = 8 << 20;

/// The console lines that make the configuration disk and the volume `vol`.
const SETUP: [&str; 2] = [
    "config init vda",
    "create vol --table \"0 16384 linear vdb 0\"",
];

/// The volume's `nbds://` URI on `served`, trusting the CA in `pki`.
fn tls_uri(served: &Served, pki: &Path) -> String {
    format!(
        "nbds://{}/vol?tls-certificates={}",
        served.address,
        pki.display()
    )
}

/// `qemu-img`'s options for the volume on `served` over TLS with the CA in `pki`.
fn qemu_image_opts(served: &Served, pki: &Path) -> [String; 4] {
    let port = served.port();
    [
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            pki.display()
        ),
        "--image-opts".into(),
        format!("driver=nbd,host=127.0.0.1,port={port},export=vol,tls-creds=tls0"),
    ]
}

/// A directory holding `ca` as `ca-cert.pem`, where libnbd and qemu look for it.
fn pki_dir(scratch: &Scratch, name: &str, ca: &str) -> PathBuf {
    let dir = scratch.path().join(name);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("ca-cert.pem"), ca).unwrap();
    dir
}

fn pattern(bytes: usize) -> Vec<u8> {
    (0..bytes).map(|i| (i * 13 / 5 + i / 4096) as u8).collect()
}

/// The certificate's SHA-256 fingerprint as openssl prints it (`AA:BB:...`).
fn openssl_fingerprint(pem_file: &Path) -> String {
    let printed = run_tool(
        "openssl",
        &[
            "x509",
            "-noout",
            "-fingerprint",
            "-sha256",
            "-in",
            pem_file.to_str().unwrap(),
        ],
    );
    printed.trim().split('=').nth(1).unwrap().to_string()
}

/// What `nbdinfo` printed on standard error, expecting it to fail (libnbd 1.14 shows
/// the server's message only in its debug output).
fn nbdinfo_refused(uri: &str) -> String {
    let output = Command::new("nbdinfo")
        .arg(uri)
        .env("LIBNBD_DEBUG", "1")
        .output()
        .unwrap();
    assert!(!output.status.success(), "nbdinfo {uri} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Makes a CA and a server certificate for 127.0.0.1 signed by it with `certtool`;
/// returns (CA certificate, server certificate, server key) as PEM text.
fn certtool_chain(dir: &Path) -> (String, String, String) {
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    fs::write(
        dir.join("ca.info"),
        "cn = \"thinbox test CA\"\nca\ncert_signing_key\nexpiration_days = 3650\n",
    )
    .unwrap();
    fs::write(
        dir.join("server.info"),
        "cn = \"127.0.0.1\"\nip_address = \"127.0.0.1\"\ndns_name = \"localhost\"\n\
         tls_www_server\nsigning_key\nencryption_key\nexpiration_days = 3650\n",
    )
    .unwrap();
    let certtool = |args: &[&str]| run_tool("certtool", args);
    certtool(&[
        "--generate-privkey",
        "--key-type=ecdsa",
        "--outfile",
        &path("ca-key.pem"),
    ]);
    certtool(&[
        "--generate-self-signed",
        "--load-privkey",
        &path("ca-key.pem"),
        "--template",
        &path("ca.info"),
        "--outfile",
        &path("ca-cert.pem"),
    ]);
    certtool(&[
        "--generate-privkey",
        "--key-type=rsa",
        "--bits=2048",
        "--outfile",
        &path("server-key.pem"),
    ]);
    certtool(&[
        "--generate-certificate",
        "--load-privkey",
        &path("server-key.pem"),
        "--load-ca-certificate",
        &path("ca-cert.pem"),
        "--load-ca-privkey",
        &path("ca-key.pem"),
        "--template",
        &path("server.info"),
        "--outfile",
        &path("server-cert.pem"),
    ]);
    let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap();
    (
        read("ca-cert.pem"),
        read("server-cert.pem"),
        read("server-key.pem"),
    )
}

#[test]
fn a_certtool_chain_serves_libnbd_and_qemu_and_require_refuses_plaintext_across_a_restart() {
    host_tools::require_for_test(&[
        Tool::CertTool,
        Tool::Openssl,
        Tool::NbdInfo,
        Tool::NbdCopy,
        Tool::QemuImg,
    ]);
    let scratch = Scratch::new().unwrap();
    let disks = disks(&scratch);
    let (ca, server_cert, server_key) = certtool_chain(scratch.path());
    let pki = pki_dir(&scratch, "pki", &ca);
    let mut lines: Vec<String> = SETUP.iter().map(|line| line.to_string()).collect();
    lines.extend(paste(
        "nbd tls import",
        &format!("{server_cert}{ca}{server_key}"),
    ));
    lines.extend(["nbd tls require".into(), "nbd tls".into()]);
    let served = Served::start(&disks, &lines);
    let fingerprint = openssl_fingerprint(&scratch.path().join("server-cert.pem"));
    assert!(
        served
            .transcript
            .contains("imported; the private key is stored and is not shown again\n")
            && served.transcript.contains(&format!(
                "tls: require\ncertificate SHA-256: {fingerprint}\nchain: 2 certificate(s); \
             private key stored"
            )),
        "{}",
        served.transcript
    );
    let key_line = server_key.lines().find(|line| line.len() == 64).unwrap();
    assert!(!served.transcript.contains(key_line), "the key was echoed");

    let info = run_tool("nbdinfo", &[&tls_uri(&served, &pki)]);
    assert!(info.contains("newstyle-fixed with TLS"), "{info}");
    assert!(info.contains("export-size: 8388608"), "{info}");

    // A client that trusts another CA leaves in the handshake; an event line says so.
    let other = scratch.path().join("other");
    fs::create_dir_all(&other).unwrap();
    let (other_ca, _, _) = certtool_chain(&other);
    let refused = nbdinfo_refused(&tls_uri(&served, &pki_dir(&scratch, "other", &other_ca)));
    assert!(refused.contains("certificate verification"), "{refused}");
    let event = served
        .printed_later("event: ", Duration::from_secs(10))
        .expect("no event line about the abandoned handshake");
    assert!(
        event.starts_with("event: nbd: TLS handshake with 127.0.0.1:")
            && event.ends_with(
                " failed: the client closed the connection (a client that does not trust the \
                 server's certificate may do that)"
            ),
        "{event}"
    );

    // Plaintext: every option but STARTTLS gets NBD_REP_ERR_TLS_REQD.
    let refused = nbdinfo_refused(&format!("nbd://{}/vol", served.address));
    assert!(refused.contains("TLS is required"), "{refused}");

    // nbdcopy writes over TLS; qemu-img reads it back over TLS.
    let data = pattern(VOLUME_BYTES);
    let source = scratch.path().join("source.raw");
    fs::write(&source, &data).unwrap();
    run_tool(
        "nbdcopy",
        &[source.to_str().unwrap(), &tls_uri(&served, &pki)],
    );
    let copy = scratch.path().join("copy.raw");
    let mut args: Vec<String> = vec!["convert".into(), "-O".into(), "raw".into()];
    args.extend(qemu_image_opts(&served, &pki));
    args.push(copy.to_str().unwrap().into());
    run_tool(
        "qemu-img",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        fs::read(&copy).unwrap() == data,
        "qemu-img read other bytes over TLS"
    );

    // The identity and the policy are in the configuration.
    drop(served);
    let served = Served::start(&disks, &[]);
    let mut args: Vec<String> = vec!["info".into()];
    args.extend(qemu_image_opts(&served, &pki));
    let info = run_tool(
        "qemu-img",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        info.contains("virtual size: 8 MiB (8388608 bytes)"),
        "{info}"
    );
    let refused = nbdinfo_refused(&format!("nbd://{}/vol", served.address));
    assert!(refused.contains("TLS is required"), "{refused}");
}

#[test]
fn a_generated_certificate_is_trusted_as_printed_and_on_lets_plaintext_in() {
    host_tools::require_for_test(&[Tool::Openssl, Tool::NbdInfo, Tool::QemuImg]);
    let scratch = Scratch::new().unwrap();
    let disks = disks(&scratch);
    let mut lines: Vec<String> = SETUP.iter().map(|line| line.to_string()).collect();
    lines.extend([
        "nbd tls on".into(),
        "nbd tls generate 127.0.0.1 localhost".into(),
        "nbd tls on".into(),
    ]);
    let served = Served::start(&disks, &lines);
    assert!(
        served.transcript.contains(
            "error: nbd tls on: no certificate yet (nbd tls generate, or nbd tls import)"
        ),
        "{}",
        served.transcript
    );
    let begin = served
        .transcript
        .find("-----BEGIN CERTIFICATE-----")
        .unwrap();
    let end = served
        .transcript
        .find("-----END CERTIFICATE-----\n")
        .unwrap();
    let certificate = &served.transcript[begin..end + "-----END CERTIFICATE-----\n".len()];
    let pki = pki_dir(&scratch, "pki", certificate);
    let printed = served
        .transcript
        .lines()
        .find_map(|line| line.strip_prefix("SHA-256 fingerprint: "))
        .unwrap();
    assert_eq!(printed, openssl_fingerprint(&pki.join("ca-cert.pem")));
    assert!(!served.transcript.contains("PRIVATE KEY"));

    let info = run_tool("nbdinfo", &[&tls_uri(&served, &pki)]);
    assert!(info.contains("newstyle-fixed with TLS"), "{info}");
    let mut args: Vec<String> = vec!["info".into()];
    args.extend(qemu_image_opts(&served, &pki));
    let info = run_tool(
        "qemu-img",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        info.contains("virtual size: 8 MiB (8388608 bytes)"),
        "{info}"
    );
    let plain = run_tool("nbdinfo", &[&format!("nbd://{}/vol", served.address)]);
    assert!(plain.contains("newstyle-fixed without TLS"), "{plain}");
}

#[test]
fn an_openssl_ec_key_imports_and_a_foreign_key_or_bad_pem_changes_nothing() {
    host_tools::require_for_test(&[Tool::Openssl, Tool::NbdInfo]);
    let scratch = Scratch::new().unwrap();
    let disks = disks(&scratch);
    let dir = scratch.path();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    for key in ["key.pem", "other-key.pem"] {
        run_tool(
            "openssl",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &path(key),
            ],
        );
    }
    run_tool(
        "openssl",
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &path("key.pem"),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-days",
            "365",
            "-out",
            &path("cert.pem"),
        ],
    );
    let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap();
    assert!(read("key.pem").contains("-----BEGIN EC PRIVATE KEY-----"));
    let mut lines: Vec<String> = SETUP.iter().map(|line| line.to_string()).collect();
    lines.extend(paste(
        "nbd tls import",
        &format!("{}{}", read("cert.pem"), read("key.pem")),
    ));
    lines.push("nbd tls require".into());
    lines.extend(paste(
        "nbd tls import",
        &format!("{}{}", read("cert.pem"), read("other-key.pem")),
    ));
    lines.extend(paste(
        "nbd tls import",
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----",
    ));
    lines.extend(paste("nbd tls import", &read("cert.pem")));
    lines.push("nbd tls".into());
    let served = Served::start(&disks, &lines);
    let transcript = &served.transcript;
    let errors = served.errors();
    assert_eq!(
        errors,
        [
            "error: nbd tls import: the private key does not match the certificate",
            "error: nbd tls import: the CERTIFICATE block is not valid base64",
            "error: nbd tls import: there is no private key (PRIVATE KEY block)",
        ],
        "{transcript}"
    );
    let fingerprint = openssl_fingerprint(&dir.join("cert.pem"));
    assert!(
        transcript.ends_with(&format!(
            "tls: require\ncertificate SHA-256: {fingerprint}\nchain: 1 certificate(s); \
             private key stored (sec1, not shown)\n\nstill serving NBD; type shutdown or send \
             a signal to stop\n"
        )),
        "{transcript}"
    );
    let pki = pki_dir(&scratch, "pki", &read("cert.pem"));
    let info = run_tool("nbdinfo", &[&tls_uri(&served, &pki)]);
    assert!(info.contains("newstyle-fixed with TLS"), "{info}");
}
