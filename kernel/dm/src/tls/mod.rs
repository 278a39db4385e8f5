//! NBD over TLS: the server's identity (a certificate chain and its private key,
//! made here by `nbd tls generate` or pasted with `nbd tls import`), the policy
//! (`off`, `on`, `require`), the CA certificates client certificates must chain to
//! (`nbd tls clients`, see `clients.rs`), and the rustls configuration the NBD server
//! offers.
//!
//! Crypto is rustls' pure-Rust RustCrypto provider, the same on the appliance and on
//! the host, but for the record ciphers (`suites.rs`). Everything is kept in the saved configuration (see `config/tls.rs`); the
//! private key is never shown again once stored.

pub mod cert;
pub mod clients;
pub mod clock;
pub mod failures;
pub mod pem;
pub mod skew;
pub mod suites;
pub mod x509;

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use nbd::rustls::crypto::CryptoProvider;
use nbd::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};
use nbd::rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use nbd::rustls::{RootCertStore, ServerConfig, SignatureScheme, SupportedCipherSuite};
use sha2::{Digest, Sha256};

use crate::{DeviceMapper, Error};
use cert::SubjectName;
use clock::{TlsClock, WallClock};

/// Whether NBD clients may or must use TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    #[default]
    Off,
    On,
    Require,
}

impl TlsMode {
    pub fn parse(word: &str) -> Option<TlsMode> {
        match word {
            "off" => Some(TlsMode::Off),
            "on" => Some(TlsMode::On),
            "require" => Some(TlsMode::Require),
            _ => None,
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        }
    }
}

/// How a private key's DER is wrapped (the PEM label says which).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFormat {
    /// `PRIVATE KEY`
    Pkcs8,
    /// `EC PRIVATE KEY`
    Sec1,
    /// `RSA PRIVATE KEY`
    Pkcs1,
}

impl KeyFormat {
    pub fn word(self) -> &'static str {
        match self {
            KeyFormat::Pkcs8 => "pkcs8",
            KeyFormat::Sec1 => "sec1",
            KeyFormat::Pkcs1 => "pkcs1",
        }
    }

    pub fn parse(word: &str) -> Option<KeyFormat> {
        [KeyFormat::Pkcs8, KeyFormat::Sec1, KeyFormat::Pkcs1]
            .into_iter()
            .find(|format| format.word() == word)
    }

    fn from_label(label: &str) -> Option<KeyFormat> {
        match label {
            "PRIVATE KEY" => Some(KeyFormat::Pkcs8),
            "EC PRIVATE KEY" => Some(KeyFormat::Sec1),
            "RSA PRIVATE KEY" => Some(KeyFormat::Pkcs1),
            _ => None,
        }
    }
}

/// The server's certificate chain (its own first) and private key, as DER.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub chain: Vec<Vec<u8>>,
    pub key_format: KeyFormat,
    pub key: Vec<u8>,
}

impl Identity {
    /// The SHA-256 fingerprint of the server's certificate, as `AA:BB:...`.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        let der = self.key.clone();
        match self.key_format {
            KeyFormat::Pkcs8 => PrivatePkcs8KeyDer::from(der).into(),
            KeyFormat::Sec1 => PrivateSec1KeyDer::from(unpadded_sec1(der)).into(),
            KeyFormat::Pkcs1 => PrivatePkcs1KeyDer::from(der).into(),
        }
    }
}

/// A SEC1 EC private key with its scalar in the octet string's exact length. GnuTLS
/// (`certtool --generate-privkey --key-type=ecdsa`) writes the scalar as a signed
/// integer, so about half its P-256 keys carry 33 bytes with a leading zero, which
/// RFC 5915 does not allow and RustCrypto refuses; the zero is dropped here. Any
/// other encoding is returned as it came.
fn unpadded_sec1(der: Vec<u8>) -> Vec<u8> {
    // SEQUENCE { INTEGER 1, OCTET STRING scalar, ... }, the length short or 0x81 form.
    let (length_bytes, length) = match der.get(..2) {
        Some([0x30, short]) if *short < 0x80 => (1, usize::from(*short)),
        Some([0x30, 0x81]) => match der.get(2) {
            Some(&long) => (2, usize::from(long)),
            None => return der,
        },
        _ => return der,
    };
    let body = 1 + length_bytes;
    let padded = matches!(
        der.get(body..body + 6),
        Some([0x02, 0x01, 0x01, 0x04, scalar, 0x00]) if *scalar == 33 || *scalar == 49 || *scalar == 67
    );
    if !padded || der.len() != body + length {
        return der;
    }
    let scalar = der[body + 4] - 1;
    let inner_length = length - 1;
    let mut fixed = Vec::with_capacity(der.len());
    fixed.push(0x30);
    if inner_length < 0x80 {
        fixed.push(inner_length as u8);
    } else {
        fixed.extend([0x81, inner_length as u8]);
    }
    fixed.extend([0x02, 0x01, 0x01, 0x04, scalar]);
    fixed.extend_from_slice(&der[body + 6..]);
    fixed
}

/// What the configuration keeps about TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: TlsMode,
    pub identity: Option<Identity>,
    /// CA certificates (DER) that every TLS client's certificate must chain to; empty:
    /// no client certificate is asked for.
    pub client_authorities: Vec<Vec<u8>>,
}

/// The SHA-256 fingerprint of a DER certificate, as `AA:BB:...` (what
/// `openssl x509 -fingerprint -sha256` and `certtool -i` print).
pub fn fingerprint(der: &[u8]) -> String {
    fingerprint_text(&Sha256::digest(der))
}

/// A SHA-256 digest as `AA:BB:...`.
pub fn fingerprint_text(digest: &[u8]) -> String {
    let hex: Vec<String> = digest
        .iter()
        .map(|byte| alloc::format!("{byte:02X}"))
        .collect();
    hex.join(":")
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls_rustcrypto::provider())
}

/// How TLS clients prove who they are: by a certificate issued by one of
/// `authorities` (DER), valid at `clock`'s time.
#[derive(Clone, Copy, Debug)]
pub struct ClientCheck<'a> {
    pub authorities: &'a [Vec<u8>],
    pub clock: WallClock,
}

/// The rustls server configuration for `identity`, after checking that its key
/// belongs to its certificate: the key signs a message that the certificate's public
/// key must verify. With `clients`, every client must present a certificate that
/// chains to one of its authorities and is valid now (the handshake fails otherwise,
/// and also while the clock does not know the time).
pub fn server_config(
    identity: &Identity,
    clients: Option<ClientCheck<'_>>,
) -> Result<Arc<ServerConfig>, String> {
    server_config_with(identity, clients, suites::rustcrypto())
}

/// [`server_config`] with the record ciphers `suites` (see `suites.rs`), offered in
/// their order whatever the client prefers.
pub fn server_config_with(
    identity: &Identity,
    clients: Option<ClientCheck<'_>>,
    suites: Vec<SupportedCipherSuite>,
) -> Result<Arc<ServerConfig>, String> {
    if identity.chain.is_empty() || identity.key.is_empty() {
        return Err(String::from("the certificate or its key is missing"));
    }
    let provider = provider();
    let key = provider
        .key_provider
        .load_private_key(identity.private_key())
        .map_err(|_| String::from("the private key is not one this server can use"))?;
    let schemes: Vec<SignatureScheme> = provider
        .signature_verification_algorithms
        .mapping
        .iter()
        .map(|(scheme, _)| *scheme)
        .collect();
    let signer = key
        .choose_scheme(&schemes)
        .ok_or_else(|| String::from("the private key signs with no scheme TLS offers"))?;
    const PROBE: &[u8] = b"thinbox: does this key belong to this certificate?";
    let signature = signer
        .sign(PROBE)
        .map_err(|_| String::from("the private key cannot sign"))?;
    let certificate = CertificateDer::from(identity.chain[0].as_slice());
    let parsed = webpki::EndEntityCert::try_from(&certificate)
        .map_err(|error| alloc::format!("the certificate does not parse: {error:?}"))?;
    let matches = provider
        .signature_verification_algorithms
        .mapping
        .iter()
        .filter(|(scheme, _)| *scheme == signer.scheme())
        .flat_map(|(_, algorithms)| algorithms.iter())
        .any(|algorithm| {
            parsed
                .verify_signature(*algorithm, PROBE, &signature)
                .is_ok()
        });
    if !matches {
        return Err(String::from(
            "the private key does not match the certificate",
        ));
    }
    let chain = identity
        .chain
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let clock: WallClock = match clients {
        Some(check) => check.clock,
        None => clock::unknown_time,
    };
    let offered = Arc::new(CryptoProvider {
        cipher_suites: suites,
        ..(*provider).clone()
    });
    let versions = ServerConfig::builder_with_details(offered, Arc::new(TlsClock(clock)))
        .with_protocol_versions(nbd::rustls::ALL_VERSIONS)
        .map_err(|error| alloc::format!("{error}"))?;
    let builder = match clients {
        None => versions.with_no_client_auth(),
        Some(check) => {
            let mut roots = RootCertStore::empty();
            for authority in check.authorities {
                roots
                    .add(CertificateDer::from(authority.as_slice()))
                    .map_err(|error| alloc::format!("a CA certificate is unusable: {error}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| alloc::format!("client certificates: {error}"))?;
            versions.with_client_cert_verifier(Arc::new(skew::SkewTolerant(verifier)))
        }
    };
    let mut config = builder
        .with_single_cert(chain, identity.private_key())
        .map_err(|error| alloc::format!("{error}"))?;
    // No session resumption: NBD connections are few and long, and a resumed session
    // would skip the client certificate check.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// Reads a pasted PEM text: certificates (the server's first, then its issuers) and
/// one private key.
pub fn parse_identity(text: &str) -> Result<Identity, String> {
    let mut chain = Vec::new();
    let mut key = None;
    for (label, der) in pem::decode(text)? {
        if label == "CERTIFICATE" {
            chain.push(der);
        } else if let Some(format) = KeyFormat::from_label(&label) {
            if key.replace((format, der)).is_some() {
                return Err(String::from("there is more than one private key"));
            }
        } else {
            return Err(alloc::format!("unexpected PEM block {label}"));
        }
    }
    let Some((key_format, key)) = key else {
        return Err(String::from("there is no private key (PRIVATE KEY block)"));
    };
    if chain.is_empty() {
        return Err(String::from("there is no certificate (CERTIFICATE block)"));
    }
    Ok(Identity {
        chain,
        key_format,
        key,
    })
}

impl DeviceMapper {
    /// The TLS policy and identity.
    pub fn tls(&self) -> &TlsSettings {
        &self.tls
    }

    /// What the NBD server offers clients now.
    pub(crate) fn tls_offer(&self) -> nbd::Tls {
        self.tls_offer.clone()
    }

    /// `nbd tls off|on|require`: `on` and `require` need an identity.
    pub fn set_tls_mode(&mut self, mode: TlsMode) -> Result<(), Error> {
        if mode != TlsMode::Off && self.tls.identity.is_none() {
            return Err("no certificate yet (nbd tls generate, or nbd tls import)".into());
        }
        let settings = TlsSettings {
            mode,
            ..self.tls.clone()
        };
        self.change_tls(settings)
    }

    /// `nbd tls generate [NAME...]`: a new Ed25519 key and a self-signed certificate
    /// for `names` (DNS names or addresses) replace the identity. Returns the
    /// certificate as PEM.
    pub fn generate_tls_identity(&mut self, names: &[&str]) -> Result<String, Error> {
        let mut parsed = Vec::new();
        for name in names {
            let name = SubjectName::parse(name)
                .ok_or_else(|| alloc::format!("'{name}' is neither an address nor a DNS name"))?;
            parsed.push(name);
        }
        let mut seed = [0u8; 32];
        let mut serial = [0u8; 16];
        getrandom::getrandom(&mut seed)
            .and_then(|()| getrandom::getrandom(&mut serial))
            .map_err(|_| "no hardware randomness: the CPU has neither RDSEED nor RDRAND")?;
        let generated = cert::self_signed(seed, serial, &parsed);
        let identity = Identity {
            chain: alloc::vec![generated.certificate],
            key_format: KeyFormat::Pkcs8,
            key: generated.key_pkcs8,
        };
        let certificate = pem::encode("CERTIFICATE", &identity.chain[0]);
        self.change_tls(TlsSettings {
            identity: Some(identity),
            ..self.tls.clone()
        })?;
        Ok(certificate)
    }

    /// `nbd tls import`: a pasted certificate chain and its key replace the identity.
    pub fn import_tls_identity(&mut self, text: &str) -> Result<(), Error> {
        let identity = parse_identity(text)?;
        self.change_tls(TlsSettings {
            identity: Some(identity),
            ..self.tls.clone()
        })
    }

    /// Brings in TLS settings read from the configuration at boot; an identity that
    /// no longer builds leaves TLS off (with a note).
    pub(crate) fn restore_tls(&mut self, settings: TlsSettings, notes: &mut Vec<String>) {
        if !settings.client_authorities.is_empty() && (self.wall_clock)().is_none() {
            notes.push(String::from(
                "config: the wall clock is unknown: client certificates cannot be checked, \
                 so every TLS client is refused",
            ));
        }
        match offer(&settings, self.wall_clock, &self.record_ciphers) {
            Ok(offer) => {
                self.tls = settings;
                self.tls_offer = offer;
            }
            Err(why) => notes.push(alloc::format!("config: TLS stays off: {why}")),
        }
    }

    /// Saves `settings` and offers them; nothing changes if either fails.
    fn change_tls(&mut self, settings: TlsSettings) -> Result<(), Error> {
        let offer = offer(&settings, self.wall_clock, &self.record_ciphers)?;
        let old = core::mem::replace(&mut self.tls, settings);
        if let Err(error) = self.save() {
            self.tls = old;
            return Err(error);
        }
        self.tls_offer = offer;
        Ok(())
    }
}

/// The NBD server's TLS policy for `settings`, client certificates checked against
/// `clock`, records sealed with `suites`.
fn offer(
    settings: &TlsSettings,
    clock: WallClock,
    suites: &[SupportedCipherSuite],
) -> Result<nbd::Tls, String> {
    let clients = (!settings.client_authorities.is_empty()).then_some(ClientCheck {
        authorities: &settings.client_authorities,
        clock,
    });
    let config = match &settings.identity {
        Some(identity) => Some(server_config_with(identity, clients, suites.to_vec())?),
        None => None,
    };
    Ok(match (settings.mode, config) {
        (TlsMode::On, Some(config)) => nbd::Tls::On(config),
        (TlsMode::Require, Some(config)) => nbd::Tls::Require(config),
        _ => nbd::Tls::Off,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&hex[at..at + 2], 16).unwrap())
            .collect()
    }

    /// A P-256 key as `certtool` wrote it (scalar 33 bytes, a leading zero), and as
    /// `openssl ec -outform DER` writes the same key.
    const PADDED: &str = "3078020101042100c27a73fe35732f8622ec2df536e25f9677e7886a03b000ce73fa1046d547aba6a00a06082a8648ce3d030107a14403420004bcd5bb86cd75cf5a4a9a1547957e8efc890ce2a9365efe188b72cf1c3a241d6e8c4d1b30e4ea8cccbda72be49335ee23e33ad47fbf188a2aae78d90339afce7a";
    const EXACT: &str = "30770201010420c27a73fe35732f8622ec2df536e25f9677e7886a03b000ce73fa1046d547aba6a00a06082a8648ce3d030107a14403420004bcd5bb86cd75cf5a4a9a1547957e8efc890ce2a9365efe188b72cf1c3a241d6e8c4d1b30e4ea8cccbda72be49335ee23e33ad47fbf188a2aae78d90339afce7a";

    #[test]
    fn a_gnutls_padded_ec_key_becomes_the_exact_encoding_and_loads() {
        assert_eq!(unpadded_sec1(bytes(PADDED)), bytes(EXACT));
        assert_eq!(unpadded_sec1(bytes(EXACT)), bytes(EXACT));
        let load = |der: Vec<u8>| {
            provider()
                .key_provider
                .load_private_key(PrivateSec1KeyDer::from(der).into())
                .is_ok()
        };
        assert!(!load(bytes(PADDED)), "the padded form is refused as it is");
        let identity = Identity {
            chain: Vec::new(),
            key_format: KeyFormat::Sec1,
            key: bytes(PADDED),
        };
        assert!(
            provider()
                .key_provider
                .load_private_key(identity.private_key())
                .is_ok()
        );
    }
}
