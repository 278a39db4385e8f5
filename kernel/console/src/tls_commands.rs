//! `nbd tls`: NBD over TLS on the console. The policy (`off`, `on`, `require`), a
//! key pair and self-signed certificate made here (`generate`), or a certificate
//! chain and key pasted as PEM (`import`, ended by a line `end`). The certificate is
//! printed with its SHA-256 fingerprint; the private key is never printed. Client
//! certificates (`nbd tls clients`) are in `clientcert_commands.rs`.

use alloc::format;
use alloc::string::String;
use core::fmt::Write;
use dm::tls::{TlsMode, fingerprint};

use crate::clientcert_commands::show_client_certificates;
use crate::{CommandError, Console, Platform, outln};

const USAGE: &str = "usage: nbd tls [off|on|require] | nbd tls generate [NAME...] | nbd tls \
                     import (then paste the PEM chain and key, and a line: end) | nbd tls \
                     clients [off] (then paste the CA certificates, and a line: end)";

/// The line that ends a paste.
pub(crate) const PASTE_END: &str = "end";

/// What pasted PEM text is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PasteFor {
    /// `nbd tls import`: the server's certificate chain and key.
    Identity,
    /// `nbd tls clients`: the CA certificates client certificates must chain to.
    ClientAuthorities,
}

/// Lines pasted so far.
pub(crate) struct Paste {
    pub purpose: PasteFor,
    pub text: String,
}

impl Paste {
    pub fn new(purpose: PasteFor) -> Paste {
        Paste {
            purpose,
            text: String::new(),
        }
    }
}

impl<P: Platform> Console<P> {
    pub(crate) fn nbd_tls_command(
        &mut self,
        args: &[&str],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        let mut dm = self.dm.borrow_mut();
        match args {
            [] => {
                let settings = dm.tls();
                outln!(out, "tls: {}", settings.mode.word());
                match &settings.identity {
                    Some(identity) => {
                        outln!(out, "certificate SHA-256: {}", identity.fingerprint());
                        outln!(
                            out,
                            "chain: {} certificate(s); private key stored ({}, not shown)",
                            identity.chain.len(),
                            identity.key_format.word()
                        );
                    }
                    None => outln!(out, "no certificate (nbd tls generate, or nbd tls import)"),
                }
                show_client_certificates(&dm, out);
                if let Some(line) = dm::tls::failures::summary(dm.tls_failures()) {
                    outln!(out, "{line}");
                }
                Ok(())
            }
            [word] if TlsMode::parse(word).is_some() => {
                let mode = TlsMode::parse(word).unwrap_or_default();
                dm.set_tls_mode(mode)
                    .map_err(|error| format!("nbd tls {word}: {}", error.0))?;
                outln!(out, "tls: {word}");
                Ok(())
            }
            ["generate", names @ ..] => {
                let pem = dm
                    .generate_tls_identity(names)
                    .map_err(|error| format!("nbd tls generate: {}", error.0))?;
                for line in pem.lines() {
                    outln!(out, "{line}");
                }
                let identity = dm.tls().identity.as_ref();
                let der = identity.map(|identity| identity.chain[0].as_slice());
                outln!(
                    out,
                    "SHA-256 fingerprint: {}",
                    fingerprint(der.unwrap_or(&[]))
                );
                outln!(
                    out,
                    "the private key (Ed25519) is stored and is not shown again"
                );
                Ok(())
            }
            ["clients", rest @ ..] => {
                drop(dm);
                self.nbd_tls_clients_command(rest, out)
            }
            ["import"] => {
                drop(dm);
                self.pasting = Some(Paste::new(PasteFor::Identity));
                outln!(
                    out,
                    "paste the certificate (then its issuers) and the private key as PEM; end \
                     with a line: {PASTE_END}"
                );
                Ok(())
            }
            _ => Err(USAGE.into()),
        }
    }

    /// A line while a paste is under way: gathered, or (`end`) the paste is taken.
    pub(crate) fn paste_line(
        &mut self,
        line: &str,
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        let Some(paste) = &mut self.pasting else {
            return Ok(());
        };
        if line.trim() != PASTE_END {
            paste.text.push_str(line);
            paste.text.push('\n');
            return Ok(());
        }
        let Some(Paste { purpose, text }) = self.pasting.take() else {
            return Ok(());
        };
        if purpose == PasteFor::ClientAuthorities {
            return self.take_client_authorities(&text, out);
        }
        let mut dm = self.dm.borrow_mut();
        dm.import_tls_identity(&text)
            .map_err(|error| format!("nbd tls import: {}", error.0))?;
        if let Some(identity) = &dm.tls().identity {
            outln!(out, "SHA-256 fingerprint: {}", identity.fingerprint());
        }
        outln!(
            out,
            "imported; the private key is stored and is not shown again"
        );
        Ok(())
    }
}
