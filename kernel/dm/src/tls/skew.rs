//! Client certificates issued moments ago. `certtool` and `openssl x509 -req` put
//! the second they run in a certificate's notBefore, and the appliance's clock is
//! seldom exactly the issuing machine's: the RTC counts whole seconds (QEMU's
//! starts up to a second behind the host's clock) and a real one drifts without a
//! time server. OpenSSL and GnuTLS check validity against their clock with no
//! allowance, so a client whose certificate was made a second ago would be refused
//! until the clocks agree. Here a certificate whose notBefore is at most
//! [`CLOCK_SKEW_SECONDS`] ahead of the clock is checked as at its notBefore instead:
//! every other rule (issuer, signatures, purpose, expiry of the whole chain at that
//! moment) still applies, and expiry is never stretched.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::time::Duration;
use nbd::rustls::SignatureScheme;
use nbd::rustls::client::danger::HandshakeSignatureValid;
use nbd::rustls::pki_types::{CertificateDer, UnixTime};
use nbd::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use nbd::rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error};

/// How far ahead of the clock a client certificate's notBefore may be (Kerberos
/// allows clocks to differ by the same five minutes).
pub const CLOCK_SKEW_SECONDS: u64 = 300;

/// A client certificate verifier that lets a notBefore up to [`CLOCK_SKEW_SECONDS`]
/// ahead of the clock pass; everything else is `inner`'s.
#[derive(Debug)]
pub(crate) struct SkewTolerant(pub Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for SkewTolerant {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    /// `inner`'s verdict at `now`, or, when that is only "not valid yet" by at most
    /// the allowed skew, its verdict at the notBefore it named. If that fails on a
    /// time again (a certificate expired by then, an issuer not valid yet), the first
    /// error stands; any other is the reason the certificate is refused.
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verdict = self.0.verify_client_cert(end_entity, intermediates, now);
        let Err(Error::InvalidCertificate(CertificateError::NotValidYetContext {
            not_before, ..
        })) = verdict
        else {
            return verdict;
        };
        if not_before.as_secs() > now.as_secs() + CLOCK_SKEW_SECONDS {
            return verdict;
        }
        let at = UnixTime::since_unix_epoch(Duration::from_secs(not_before.as_secs()));
        match self.0.verify_client_cert(end_entity, intermediates, at) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidYetContext { .. }
                | CertificateError::ExpiredContext { .. },
            )) => verdict,
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec;

    /// A certificate valid from `not_before` to `not_after` (Unix seconds), checked the
    /// way webpki reports times.
    #[derive(Debug)]
    struct ValidBetween {
        not_before: u64,
        not_after: u64,
        /// Signed by another key than its issuer's (checked after the times, as
        /// webpki does).
        forged: bool,
    }

    impl ClientCertVerifier for ValidBetween {
        fn root_hint_subjects(&self) -> &[DistinguishedName] {
            &[]
        }

        fn verify_client_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            now: UnixTime,
        ) -> Result<ClientCertVerified, Error> {
            let seconds = |secs| UnixTime::since_unix_epoch(Duration::from_secs(secs));
            if now.as_secs() < self.not_before {
                Err(CertificateError::NotValidYetContext {
                    time: now,
                    not_before: seconds(self.not_before),
                }
                .into())
            } else if now.as_secs() > self.not_after {
                Err(CertificateError::ExpiredContext {
                    time: now,
                    not_after: seconds(self.not_after),
                }
                .into())
            } else if self.forged {
                Err(CertificateError::BadSignature.into())
            } else {
                Ok(ClientCertVerified::assertion())
            }
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Err(Error::General("unused".into()))
        }

        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Err(Error::General("unused".into()))
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![]
        }
    }

    /// What the skew-tolerant verifier says at `now` about a certificate valid from
    /// 1000 to `not_after`: `Ok`, or rustls' words.
    fn verdict(not_after: u64, now: u64) -> Result<(), String> {
        verdict_on(
            ValidBetween {
                not_before: 1000,
                not_after,
                forged: false,
            },
            now,
        )
    }

    fn verdict_on(certificate: ValidBetween, now: u64) -> Result<(), String> {
        let verifier = SkewTolerant(Arc::new(certificate));
        let now = UnixTime::since_unix_epoch(Duration::from_secs(now));
        verifier
            .verify_client_cert(&CertificateDer::from(vec![0u8]), &[], now)
            .map(|_| ())
            .map_err(|error| alloc::format!("{error}"))
    }

    #[test]
    fn not_before_may_be_ahead_by_the_skew_and_expiry_is_never_stretched() {
        assert_eq!(verdict(5000, 1000), Ok(()));
        assert_eq!(verdict(5000, 999), Ok(()));
        assert_eq!(verdict(5000, 1000 - CLOCK_SKEW_SECONDS), Ok(()));
        assert_eq!(
            verdict(5000, 999 - CLOCK_SKEW_SECONDS),
            Err(alloc::format!(
                "invalid peer certificate: certificate not valid yet: verification time {} \
                 (UNIX), but certificate is not valid before 1000 ({} seconds in future)",
                999 - CLOCK_SKEW_SECONDS,
                CLOCK_SKEW_SECONDS + 1
            ))
        );
        // Expired by the time it becomes valid: the first verdict stands.
        assert_eq!(
            verdict(999, 998),
            Err(String::from(
                "invalid peer certificate: certificate not valid yet: verification time 998 \
                 (UNIX), but certificate is not valid before 1000 (2 seconds in future)"
            ))
        );
        // Refused for another reason once valid: that reason is the verdict.
        let forged = ValidBetween {
            not_before: 1000,
            not_after: 5000,
            forged: true,
        };
        assert_eq!(
            verdict_on(forged, 999),
            Err(String::from("invalid peer certificate: BadSignature"))
        );
        assert_eq!(verdict(5000, 5000), Ok(()));
        assert_eq!(
            verdict(5000, 5001),
            Err(String::from(
                "invalid peer certificate: certificate expired: verification time 5001 \
                 (UNIX), but certificate is not valid after 5000 (1 seconds ago)"
            ))
        );
    }
}
