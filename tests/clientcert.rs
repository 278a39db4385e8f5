//! TLS client certificates in offline mode with real clients: `nbd tls clients` with
//! a CA made by `certtool` at test time; libnbd's `nbdinfo` (an `nbds://` URI whose
//! `tls-certificates` directory holds ca-cert.pem, client-cert.pem and
//! client-key.pem) and `qemu-img` (`--object tls-creds-x509`) get in with a good
//! certificate and are refused without one, with one from another CA, or with an
//! expired one; `cert:` and `subject:` access rules; the settings across a restart;
//! bad input refused with one error line; a certificate valid from a minute ahead
//! accepted (clock skew), one valid from an hour ahead refused with an `event:` line
//! giving the reason.

#[path = "common/served.rs"]
mod served;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use host_tools::Tool;
use qemu_test::{Pki, Scratch, client_template, run_tool};
use served::{Served, disks, paste};

/// `nbdinfo`'s output for the volume on `served` over TLS with the credentials in
/// `dir`, or its debug output when it failed.
fn nbdinfo(served: &Served, dir: &Path) -> Result<String, String> {
    let output = Command::new("nbdinfo")
        .arg(format!(
            "nbds://{}/vol?tls-certificates={}",
            served.address,
            dir.display()
        ))
        .env("LIBNBD_DEBUG", "1")
        .output()
        .unwrap();
    match output.status.success() {
        true => Ok(String::from_utf8_lossy(&output.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&output.stderr).into_owned()),
    }
}

/// `qemu-img info` for the volume on `served` over TLS with the credentials in `dir`.
fn qemu_img_info(served: &Served, dir: &Path) -> std::process::Output {
    Command::new("qemu-img")
        .args([
            "info",
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                dir.display()
            ),
            "--image-opts",
            &format!(
                "driver=nbd,host=127.0.0.1,port={},export=vol,tls-creds=tls0",
                served.port()
            ),
        ])
        .output()
        .unwrap()
}

/// The configuration disk, the volume, the server identity, `require`.
fn setup(pki: &Pki) -> Vec<String> {
    let mut lines = vec![
        String::from("config init vda"),
        String::from("create vol --table \"0 16384 linear vdb 0\""),
    ];
    lines.extend(paste(
        "nbd tls import",
        &(pki.read("server-cert.pem") + &pki.read("server-key.pem")),
    ));
    lines.push(String::from("nbd tls require"));
    lines
}

fn needs_tools() {
    host_tools::require_for_test(&[Tool::CertTool, Tool::Openssl, Tool::NbdInfo, Tool::QemuImg]);
}

#[test]
fn only_clients_with_a_valid_certificate_from_the_ca_get_in_across_a_restart() {
    needs_tools();
    let scratch = Scratch::new().unwrap();
    let pki = Pki::new(&scratch);
    pki.issue("client1", "ca", &client_template("client1"));
    pki.issue("stranger", "other-ca", &client_template("stranger"));
    let expired = client_template("old")
        + "activation_date = \"2020-01-01 00:00:00\"\nexpiration_date = \"2021-01-01 00:00:00\"\n";
    pki.issue("old", "ca", &expired);
    let disks = disks(&scratch);
    let mut lines = setup(&pki);
    lines.extend(paste("nbd tls clients", &pki.read("ca-cert.pem")));
    lines.push(String::from("nbd tls"));
    let appliance = Served::start(&disks, &lines);
    let listing = format!(
        "client certificates: required, issued by:\n  CN=thinbox test clients CA (SHA-256 {})\n\
         validity checked against the clock: ",
        pki.fingerprint("ca")
    );
    assert_eq!(
        appliance.transcript.matches(&listing).count(),
        2,
        "listed when pasted and by nbd tls: {}",
        appliance.transcript
    );

    let good = pki.client_dir(Some("client1"));
    let info = nbdinfo(&appliance, &good).unwrap();
    assert!(
        info.contains("newstyle-fixed with TLS") && info.contains("export-size: 8388608"),
        "{info}"
    );
    let output = qemu_img_info(&appliance, &good);
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("virtual size: 8 MiB (8388608 bytes)"),
        "{output:?}"
    );
    for refused in [None, Some("stranger"), Some("old")] {
        let dir = pki.client_dir(refused);
        assert!(nbdinfo(&appliance, &dir).is_err(), "{refused:?} got in");
        assert!(
            !qemu_img_info(&appliance, &dir).status.success(),
            "{refused:?} got in with qemu-img"
        );
    }

    // Saved: after a restart the same certificates are asked for.
    drop(appliance);
    let appliance = Served::start(&disks, &[String::from("nbd tls")]);
    assert!(
        appliance.transcript.contains(&listing),
        "{}",
        appliance.transcript
    );
    assert!(nbdinfo(&appliance, &good).is_ok());
    assert!(nbdinfo(&appliance, &pki.client_dir(None)).is_err());
}

#[test]
fn certificate_rules_outrank_address_rules_and_bad_input_changes_nothing() {
    needs_tools();
    let scratch = Scratch::new().unwrap();
    let pki = Pki::new(&scratch);
    for client in ["client1", "backup", "client3", "client4"] {
        pki.issue(client, "ca", &client_template(client));
    }
    let client1 = pki.fingerprint("client1");
    let backup = pki.subject("backup");
    assert_eq!(backup, "CN=backup,O=Example");
    let disks = disks(&scratch);
    let mut lines = setup(&pki);
    lines.extend(paste("nbd tls clients", &pki.read("ca-cert.pem")));
    lines.extend([
        String::from("nbd deny vol 127.0.0.1"),
        format!("nbd allow vol cert:{client1}"),
        format!("nbd allow vol \"subject:{backup}\" ro"),
        String::from("nbd deny vol subject:CN=client3,O=Example hide"),
    ]);
    // Bad input: one error line each, nothing changed.
    lines.extend(paste(
        "nbd tls clients",
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----",
    ));
    lines.extend(paste("nbd tls clients", &pki.read("client3-cert.pem")));
    lines.push(String::from("nbd allow vol cert:12:34"));
    lines.push(String::from("nbd acl"));
    let appliance = Served::start(&disks, &lines);
    let transcript = &appliance.transcript;
    let errors = appliance.errors();
    assert_eq!(
        errors,
        [
            "error: nbd tls clients: the CERTIFICATE block is not valid base64".to_string(),
            format!(
                "error: nbd tls clients: {} is not a CA certificate (basicConstraints does not \
                 say CA:TRUE)",
                pki.subject("client3")
            ),
            "error: nbd allow: '12:34' is not a SHA-256 fingerprint (64 hex digits, colons \
             allowed, as openssl x509 -fingerprint -sha256 prints it)"
                .to_string(),
        ],
        "{transcript}"
    );
    let width = "cert:".len() + client1.len();
    let acl = format!(
        "default: allow\nEXPORT  {:<width$}  ACCESS\nvol     {:<width$}  deny\n\
         vol     cert:{client1}  allow\nvol     {:<width$}  allow ro\n\
         vol     {:<width$}  deny hide\n",
        "CLIENTS",
        "127.0.0.1",
        format!("subject:{backup}"),
        "subject:CN=client3,O=Example",
    );
    assert!(transcript.contains(&acl), "{transcript}");

    let check = |appliance: &Served| {
        // The certificate rules beat the address rule: client1 writes, backup reads,
        // client3 is told vol does not exist; client4 has only its address, denied.
        let info = nbdinfo(appliance, &pki.client_dir(Some("client1"))).unwrap();
        assert!(info.contains("is_read_only: false"), "{info}");
        let info = nbdinfo(appliance, &pki.client_dir(Some("backup"))).unwrap();
        assert!(info.contains("is_read_only: true"), "{info}");
        let hidden = nbdinfo(appliance, &pki.client_dir(Some("client3"))).unwrap_err();
        assert!(hidden.contains("export 'vol' not present"), "{hidden}");
        let refused = nbdinfo(appliance, &pki.client_dir(Some("client4"))).unwrap_err();
        assert!(
            refused.contains("access to export 'vol' is denied to 127.0.0.1"),
            "{refused}"
        );
    };
    check(&appliance);
    drop(appliance);
    let appliance = Served::start(&disks, &[String::from("nbd acl")]);
    assert!(
        appliance.transcript.contains(&acl),
        "{}",
        appliance.transcript
    );
    check(&appliance);
}

/// `YYYY-MM-DD HH:MM:SS` (UTC, as a `certtool` template takes it) `offset` seconds
/// from now, and those Unix seconds.
fn from_now(offset: u64) -> (String, u64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let seconds = now.as_secs() + offset;
    let printed = run_tool(
        "date",
        &["-u", "-d", &format!("@{seconds}"), "+%Y-%m-%d %H:%M:%S"],
    );
    (printed.trim().to_string(), seconds)
}

#[test]
fn a_certificate_valid_from_moments_ahead_gets_in_and_one_valid_from_next_hour_is_refused_with_the_reason()
 {
    needs_tools();
    let scratch = Scratch::new().unwrap();
    let pki = Pki::new(&scratch);
    // Issued by a machine whose clock is a minute ahead (within the allowed skew), and
    // by one an hour ahead.
    let (soon, _) = from_now(60);
    let (later, later_seconds) = from_now(3600);
    for (name, activation) in [("soon", soon), ("later", later)] {
        let template = client_template(name) + &format!("activation_date = \"{activation}\"\n");
        pki.issue(name, "ca", &template);
    }
    let disks = disks(&scratch);
    let mut lines = setup(&pki);
    lines.extend(paste("nbd tls clients", &pki.read("ca-cert.pem")));
    let appliance = Served::start(&disks, &lines);
    let info = nbdinfo(&appliance, &pki.client_dir(Some("soon"))).unwrap();
    assert!(info.contains("newstyle-fixed with TLS"), "{info}");
    assert!(nbdinfo(&appliance, &pki.client_dir(Some("later"))).is_err());
    let event = appliance
        .printed_later("event: nbd: TLS handshake with", Duration::from_secs(10))
        .expect("no event line about the refused handshake");
    let reason = format!(
        "failed: invalid peer certificate: certificate not valid yet: verification time \
         {} (UNIX), but certificate is not valid before {later_seconds} (",
        event
            .split("verification time ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("{event}"))
    );
    assert!(
        event.starts_with("event: nbd: TLS handshake with 127.0.0.1:") && event.contains(&reason),
        "{event}"
    );
}
