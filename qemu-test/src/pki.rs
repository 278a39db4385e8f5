//! Certificates made with `certtool` for the TLS tests: a clients' CA, a second CA
//! whose certificates the appliance must refuse, and certificates they issue, laid
//! out in directories as libnbd and QEMU read them.

use std::fs;
use std::path::PathBuf;

use crate::{Scratch, run_tool};

/// A `certtool` template's lines for a client certificate named `cn` in `O=Example`.
pub fn client_template(cn: &str) -> String {
    format!("cn = \"{cn}\"\norganization = \"Example\"\ntls_www_client\nsigning_key\n")
}

/// Certificates made with `certtool` in one directory.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// A directory `pki` in `scratch` with the clients' CA `ca`, a second CA
    /// `other-ca`, and a server certificate for 127.0.0.1 that `ca` issued.
    pub fn new(scratch: &Scratch) -> Pki {
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

    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }

    pub fn read(&self, name: &str) -> String {
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
    pub fn issue(&self, name: &str, ca: &str, lines: &str) {
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
    pub fn client_dir(&self, name: Option<&str>) -> PathBuf {
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

    pub fn fingerprint(&self, name: &str) -> String {
        self.openssl_x509(name, &["-fingerprint", "-sha256"])
    }

    pub fn subject(&self, name: &str) -> String {
        self.openssl_x509(name, &["-subject", "-nameopt", "RFC2253"])
    }
}
