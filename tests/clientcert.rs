//! TLS client certificates in offline mode with real clients: `nbd tls clients` with
//! a CA made by `certtool` at test time; libnbd's `nbdinfo` (an `nbds://` URI whose
//! `tls-certificates` directory holds ca-cert.pem, client-cert.pem and
//! client-key.pem) and `qemu-img` (`--object tls-creds-x509`) get in with a good
//! certificate and are refused without one, with one from another CA, or with an
//! expired one; `cert:` and `subject:` access rules; the settings across a restart;
//! bad input refused with one error line.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use host_tools::Tool;
use qemu_test::{Scratch, run_tool};

const THINBOX: &str = env!("CARGO_BIN_EXE_thinbox");

/// A `certtool` template's lines for a client certificate named `cn` in `O=Example`.
fn client_template(cn: &str) -> String {
    format!("cn = \"{cn}\"\norganization = \"Example\"\ntls_www_client\nsigning_key\n")
}

/// Certificates made with `certtool` in one directory.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(scratch: &Scratch) -> Pki {
        let dir = scratch.path().join("pki");
        fs::create_dir_all(&dir).unwrap();
        let pki = Pki { dir };
        for ca in ["ca", "other-ca"] {
            pki.key(ca);
            pki.template(
                ca,
                "cn = \"thinbox test clients CA\"\nca\ncert_signing_key\n",
            );
            pki.certtool(&[
                "--generate-self-signed",
                "--load-privkey",
                &pki.file(&format!("{ca}-key.pem")),
                "--template",
                &pki.file(&format!("{ca}.info")),
                "--outfile",
                &pki.file(&format!("{ca}-cert.pem")),
            ]);
        }
        pki.issue(
            "server",
            "ca",
            "cn = \"127.0.0.1\"\nip_address = \"127.0.0.1\"\ntls_www_server\nsigning_key\n",
        );
        pki
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(name)).unwrap()
    }

    fn certtool(&self, args: &[&str]) {
        run_tool("certtool", args);
    }

    fn key(&self, name: &str) {
        let key = self.file(&format!("{name}-key.pem"));
        self.certtool(&["--generate-privkey", "--key-type=ecdsa", "--outfile", &key]);
    }

    fn template(&self, name: &str, lines: &str) {
        fs::write(self.dir.join(format!("{name}.info")), lines).unwrap();
    }

    /// A key and a certificate `NAME-cert.pem` issued by `ca` from template `lines`.
    fn issue(&self, name: &str, ca: &str, lines: &str) {
        self.key(name);
        self.template(name, lines);
        self.certtool(&[
            "--generate-certificate",
            "--load-privkey",
            &self.file(&format!("{name}-key.pem")),
            "--load-ca-certificate",
            &self.file(&format!("{ca}-cert.pem")),
            "--load-ca-privkey",
            &self.file(&format!("{ca}-key.pem")),
            "--template",
            &self.file(&format!("{name}.info")),
            "--outfile",
            &self.file(&format!("{name}-cert.pem")),
        ]);
    }

    /// A directory as libnbd and QEMU read it: the server's CA, and the certificate
    /// and key of client `name` unless it is `None`.
    fn client_dir(&self, name: Option<&str>) -> PathBuf {
        let dir = self.dir.join(format!("as-{}", name.unwrap_or("nobody")));
        fs::create_dir_all(&dir).unwrap();
        fs::copy(self.dir.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
        if let Some(name) = name {
            for (from, to) in [("cert", "client-cert.pem"), ("key", "client-key.pem")] {
                fs::copy(self.dir.join(format!("{name}-{from}.pem")), dir.join(to)).unwrap();
            }
        }
        dir
    }

    /// What `openssl x509` prints for certificate `NAME-cert.pem` with `options`,
    /// after its `label=`.
    fn openssl_x509(&self, name: &str, options: &[&str]) -> String {
        let file = self.file(&format!("{name}-cert.pem"));
        let mut args = vec!["x509", "-noout", "-in", &file];
        args.extend(options);
        let printed = run_tool("openssl", &args);
        printed.trim().split_once('=').unwrap().1.to_string()
    }

    fn fingerprint(&self, name: &str) -> String {
        self.openssl_x509(name, &["-fingerprint", "-sha256"])
    }

    fn subject(&self, name: &str) -> String {
        self.openssl_x509(name, &["-subject", "-nameopt", "RFC2253"])
    }
}

/// `thinbox offline --nbd` on two fresh disks (or the ones given) that ran `lines`
/// and keeps serving until dropped.
struct Appliance {
    child: Child,
    port: String,
    transcript: String,
}

impl Appliance {
    fn start(disks: &[PathBuf], lines: &[String]) -> Appliance {
        let mut command = Command::new(THINBOX);
        command.args(["offline", "--nbd", "127.0.0.1:0"]);
        for disk in disks {
            command.arg("--disk").arg(disk);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(lines.join("\n").as_bytes()).unwrap();
        drop(stdin);
        let mut transcript = String::new();
        let mut output = BufReader::new(child.stdout.take().unwrap());
        while !transcript.contains("still serving NBD") {
            assert!(
                output.read_line(&mut transcript).unwrap() > 0,
                "{transcript}"
            );
        }
        let port = transcript
            .lines()
            .find_map(|line| line.strip_prefix("serving NBD on 127.0.0.1:"))
            .unwrap()
            .to_string();
        Appliance {
            child,
            port,
            transcript,
        }
    }

    fn uri(&self, dir: &Path) -> String {
        format!(
            "nbds://127.0.0.1:{}/vol?tls-certificates={}",
            self.port,
            dir.display()
        )
    }

    /// `nbdinfo`'s output, or its debug output when it failed.
    fn nbdinfo(&self, dir: &Path) -> Result<String, String> {
        let output = Command::new("nbdinfo")
            .arg(self.uri(dir))
            .env("LIBNBD_DEBUG", "1")
            .output()
            .unwrap();
        match output.status.success() {
            true => Ok(String::from_utf8_lossy(&output.stdout).into_owned()),
            false => Err(String::from_utf8_lossy(&output.stderr).into_owned()),
        }
    }

    /// `qemu-img info` over TLS with the credentials in `dir`.
    fn qemu_img_info(&self, dir: &Path) -> std::process::Output {
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
                    self.port
                ),
            ])
            .output()
            .unwrap()
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn disks(scratch: &Scratch) -> Vec<PathBuf> {
    (0..2)
        .map(|index| {
            let path = scratch.path().join(format!("disk{index}.img"));
            fs::File::create(&path).unwrap().set_len(32 << 20).unwrap();
            path
        })
        .collect()
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

/// `command`, the lines of `pem`, `end`.
fn paste(command: &str, pem: &str) -> Vec<String> {
    let mut lines = vec![String::from(command)];
    lines.extend(pem.lines().map(String::from));
    lines.push(String::from("end"));
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
    let appliance = Appliance::start(&disks, &lines);
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
    let info = appliance.nbdinfo(&good).unwrap();
    assert!(
        info.contains("newstyle-fixed with TLS") && info.contains("export-size: 8388608"),
        "{info}"
    );
    let output = appliance.qemu_img_info(&good);
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("virtual size: 8 MiB (8388608 bytes)"),
        "{output:?}"
    );
    for refused in [None, Some("stranger"), Some("old")] {
        let dir = pki.client_dir(refused);
        assert!(appliance.nbdinfo(&dir).is_err(), "{refused:?} got in");
        assert!(
            !appliance.qemu_img_info(&dir).status.success(),
            "{refused:?} got in with qemu-img"
        );
    }

    // Saved: after a restart the same certificates are asked for.
    drop(appliance);
    let appliance = Appliance::start(&disks, &[String::from("nbd tls")]);
    assert!(
        appliance.transcript.contains(&listing),
        "{}",
        appliance.transcript
    );
    assert!(appliance.nbdinfo(&good).is_ok());
    assert!(appliance.nbdinfo(&pki.client_dir(None)).is_err());
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
    let appliance = Appliance::start(&disks, &lines);
    let transcript = &appliance.transcript;
    let errors: Vec<&str> = transcript
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
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

    let check = |appliance: &Appliance| {
        // The certificate rules beat the address rule: client1 writes, backup reads,
        // client3 is told vol does not exist; client4 has only its address, denied.
        let info = appliance.nbdinfo(&pki.client_dir(Some("client1"))).unwrap();
        assert!(info.contains("is_read_only: false"), "{info}");
        let info = appliance.nbdinfo(&pki.client_dir(Some("backup"))).unwrap();
        assert!(info.contains("is_read_only: true"), "{info}");
        let hidden = appliance
            .nbdinfo(&pki.client_dir(Some("client3")))
            .unwrap_err();
        assert!(hidden.contains("export 'vol' not present"), "{hidden}");
        let refused = appliance
            .nbdinfo(&pki.client_dir(Some("client4")))
            .unwrap_err();
        assert!(
            refused.contains("access to export 'vol' is denied to 127.0.0.1"),
            "{refused}"
        );
    };
    check(&appliance);
    drop(appliance);
    let appliance = Appliance::start(&disks, &[String::from("nbd acl")]);
    assert!(
        appliance.transcript.contains(&acl),
        "{}",
        appliance.transcript
    );
    check(&appliance);
}
