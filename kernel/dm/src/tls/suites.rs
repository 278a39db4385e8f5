//! The record ciphers the server offers, and the order it picks them in: its own, not
//! the client's (GnuTLS, behind libnbd and qemu, lists AES-256-GCM first, whose four
//! extra AES rounds buy nothing here).
//!
//! By default the suites are RustCrypto's, as the kernel builds them: its portable
//! backends (no SSE there), where ChaCha20-Poly1305 needs a fraction of the work of
//! bitsliced AES and a table-free GHASH, so it comes first. A host build that runs
//! RustCrypto's AES-NI backends puts AES-128-GCM first, and the host runner swaps in
//! faster implementations of the same suites ([`DeviceMapper::set_record_ciphers`]):
//! RustCrypto's GHASH (polyval 0.6) multiplies one block at a time and took 40% of the
//! offline server's time during a TLS copy. The handshake (key exchange, signatures,
//! certificates, randomness) is RustCrypto's everywhere.

use alloc::vec::Vec;
use nbd::rustls::{CipherSuite, SupportedCipherSuite};

use crate::DeviceMapper;

#[cfg(not(target_os = "none"))]
const PREFERENCE: [CipherSuite; 9] = [
    CipherSuite::TLS13_AES_128_GCM_SHA256,
    CipherSuite::TLS13_AES_256_GCM_SHA384,
    CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

#[cfg(target_os = "none")]
const PREFERENCE: [CipherSuite; 9] = [
    CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS13_AES_128_GCM_SHA256,
    CipherSuite::TLS13_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
];

/// The suites of `available` this server offers, most preferred first (the server
/// configuration ignores the client's order, so this order counts).
pub fn ordered(available: &[SupportedCipherSuite]) -> Vec<SupportedCipherSuite> {
    let mut suites: Vec<SupportedCipherSuite> = available
        .iter()
        .copied()
        .filter(|suite| PREFERENCE.contains(&suite.suite()))
        .collect();
    suites.sort_by_key(|suite| {
        PREFERENCE
            .iter()
            .position(|&wanted| wanted == suite.suite())
    });
    suites
}

/// RustCrypto's suites, in order.
pub fn rustcrypto() -> Vec<SupportedCipherSuite> {
    ordered(&rustls_rustcrypto::provider().cipher_suites)
}

impl DeviceMapper {
    /// Sets the implementations of the record ciphers TLS offers (from [`ordered`]);
    /// before a configuration is restored, so its TLS settings use them.
    pub fn set_record_ciphers(&mut self, suites: Vec<SupportedCipherSuite>) {
        self.record_ciphers = suites;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_suite_is_offered_once_in_the_order_of_preference() {
        let offered: Vec<CipherSuite> = rustcrypto().iter().map(|suite| suite.suite()).collect();
        assert_eq!(offered, PREFERENCE);
    }
}
