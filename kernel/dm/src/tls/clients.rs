//! Client certificates (`nbd tls clients`): the CA certificates a TLS client's
//! certificate must chain to. With any set, the server asks every TLS client for a
//! certificate and the handshake fails unless webpki accepts it: issued by one of
//! these CAs, valid now by the wall clock, meant for client authentication. Access
//! rules may then name the certificate (see `access.rs`).

use alloc::string::String;
use alloc::vec::Vec;
use nbd::rustls::RootCertStore;
use nbd::rustls::pki_types::CertificateDer;

use super::clock::WallClock;
use super::{TlsSettings, fingerprint, pem, x509};
use crate::{DeviceMapper, Error};

/// One CA certificate clients' certificates may chain to, as the console shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    pub subject: String,
    pub fingerprint: String,
}

impl Authority {
    fn of(der: &[u8]) -> Authority {
        Authority {
            subject: x509::read(der).map_or_else(|_| String::from("?"), |facts| facts.subject),
            fingerprint: fingerprint(der),
        }
    }
}

/// Reads pasted PEM text: CA certificates only, at least one.
pub fn parse_authorities(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut authorities = Vec::new();
    for (label, der) in pem::decode(text)? {
        if label != "CERTIFICATE" {
            return Err(alloc::format!(
                "unexpected PEM block {label}: paste only CA certificates"
            ));
        }
        let facts = x509::read(&der)?;
        if !facts.is_ca {
            return Err(alloc::format!(
                "{} is not a CA certificate (basicConstraints does not say CA:TRUE)",
                facts.subject
            ));
        }
        RootCertStore::empty()
            .add(CertificateDer::from(der.as_slice()))
            .map_err(|error| alloc::format!("{} is unusable as a CA: {error}", facts.subject))?;
        authorities.push(der);
    }
    if authorities.is_empty() {
        return Err(String::from("there is no certificate (CERTIFICATE block)"));
    }
    Ok(authorities)
}

impl DeviceMapper {
    /// Sets where the time comes from for checking client certificates (the machine's
    /// clock); before a configuration is restored, so its client certificates apply.
    pub fn set_wall_clock(&mut self, clock: WallClock) {
        self.wall_clock = clock;
    }

    /// The wall clock's time now, in seconds since the Unix epoch, if it knows it.
    pub fn wall_clock_now(&self) -> Option<u64> {
        (self.wall_clock)()
    }

    /// The CA certificates client certificates must chain to (none: none are asked
    /// for).
    pub fn tls_client_authorities(&self) -> Vec<Authority> {
        self.tls
            .client_authorities
            .iter()
            .map(|der| Authority::of(der))
            .collect()
    }

    /// `nbd tls clients`: pasted CA certificates replace the ones client certificates
    /// must chain to. Refused while the wall clock does not know the time, since then
    /// no certificate's validity could be checked.
    pub fn set_tls_client_authorities(&mut self, text: &str) -> Result<Vec<Authority>, Error> {
        let authorities = parse_authorities(text)?;
        if self.wall_clock_now().is_none() {
            return Err(
                "the wall clock is unknown, so client certificates cannot be checked \
                        for expiry (set the machine's real-time clock to UTC)"
                    .into(),
            );
        }
        self.change_tls(TlsSettings {
            client_authorities: authorities,
            ..self.tls.clone()
        })?;
        Ok(self.tls_client_authorities())
    }

    /// `nbd tls clients off`: TLS clients are no longer asked for a certificate.
    pub fn clear_tls_client_authorities(&mut self) -> Result<(), Error> {
        self.change_tls(TlsSettings {
            client_authorities: Vec::new(),
            ..self.tls.clone()
        })
    }
}
