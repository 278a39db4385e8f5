//! `nbd tls clients`: client certificates on the console. The CA certificates that
//! every TLS client's certificate must be issued by are pasted as PEM (ended by a line
//! `end`, like `nbd tls import`); `nbd tls clients off` stops asking for
//! certificates. `nbd tls` lists the CAs and the clock validity is checked against.

use alloc::format;
use core::fmt::Write;
use dm::DeviceMapper;
use dm::tls::clients::Authority;
use dm::tls::clock::utc_text;

use crate::tls_commands::{PASTE_END, Paste, PasteFor};
use crate::{CommandError, Console, Platform, outln};

const USAGE: &str = "usage: nbd tls clients (then paste the CA certificates as PEM, and a line: \
                     end) | nbd tls clients off";

impl<P: Platform> Console<P> {
    pub(crate) fn nbd_tls_clients_command(
        &mut self,
        args: &[&str],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        match args {
            [] => {
                self.pasting = Some(Paste::new(PasteFor::ClientAuthorities));
                outln!(
                    out,
                    "paste the CA certificate(s) that issue client certificates, as PEM; end \
                     with a line: {PASTE_END}"
                );
                Ok(())
            }
            ["off"] => {
                self.dm
                    .borrow_mut()
                    .clear_tls_client_authorities()
                    .map_err(|error| format!("nbd tls clients off: {}", error.0))?;
                outln!(out, "client certificates: not asked for");
                Ok(())
            }
            _ => Err(format!("nbd tls clients: wrong arguments ({USAGE})").into()),
        }
    }

    /// The end of a `nbd tls clients` paste: the CAs replace the old ones.
    pub(crate) fn take_client_authorities(
        &mut self,
        text: &str,
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        let mut dm = self.dm.borrow_mut();
        let authorities = dm
            .set_tls_client_authorities(text)
            .map_err(|error| format!("nbd tls clients: {}", error.0))?;
        show_authorities(&dm, &authorities, out);
        Ok(())
    }
}

/// The client certificate lines of `nbd tls`: nothing unless some are asked for.
pub(crate) fn show_client_certificates(dm: &DeviceMapper, out: &mut dyn Write) {
    let authorities = dm.tls_client_authorities();
    if !authorities.is_empty() {
        show_authorities(dm, &authorities, out);
    }
}

fn show_authorities(dm: &DeviceMapper, authorities: &[Authority], out: &mut dyn Write) {
    outln!(out, "client certificates: required, issued by:");
    for authority in authorities {
        outln!(
            out,
            "  {} (SHA-256 {})",
            authority.subject,
            authority.fingerprint
        );
    }
    match dm.wall_clock_now() {
        Some(now) => outln!(out, "validity checked against the clock: {}", utc_text(now)),
        None => outln!(
            out,
            "the clock is unknown: no certificate can be checked, every TLS client is refused"
        ),
    }
}
