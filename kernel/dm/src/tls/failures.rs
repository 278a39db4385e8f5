//! Failed TLS sessions, for the operator: how many, the latest one's client, time
//! and reason (`nbd tls` shows them), and `event:` lines about them. A client that
//! fails handshakes on purpose must not flood the console, so at most one event line
//! goes out per [`EVENT_INTERVAL_NS`]; it names the latest failure and counts the
//! ones since the previous line.

use alloc::string::String;
use core::net::SocketAddr;
use nbd::TlsFailure;

use super::clock::utc_text;
use crate::DeviceMapper;

/// Shortest time between two `event:` lines about failed TLS sessions.
pub const EVENT_INTERVAL_NS: u64 = 60_000_000_000;

/// One failed TLS session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedSession {
    pub peer: SocketAddr,
    /// Wall-clock time (Unix seconds), if the machine knows it.
    pub at: Option<u64>,
    pub failure: TlsFailure,
}

impl FailedSession {
    /// `TLS handshake with ADDRESS failed: REASON`.
    pub fn describe(&self) -> String {
        let what = if self.failure.handshaking {
            "handshake"
        } else {
            "session"
        };
        alloc::format!(
            "TLS {what} with {} failed: {}",
            self.peer,
            self.failure.reason
        )
    }
}

/// What the device mapper keeps about failed TLS sessions.
#[derive(Clone, Debug, Default)]
pub struct TlsFailures {
    count: u64,
    latest: Option<FailedSession>,
    /// Failures since the last event line.
    unreported: u64,
    /// Monotonic time of the last event line.
    last_event_ns: Option<u64>,
}

impl TlsFailures {
    pub fn record(&mut self, session: FailedSession) {
        self.count += 1;
        self.unreported += 1;
        self.latest = Some(session);
    }

    /// Failed sessions since boot.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn latest(&self) -> Option<&FailedSession> {
        self.latest.as_ref()
    }

    /// The event line due now, if a failure is unreported and the last line is at
    /// least [`EVENT_INTERVAL_NS`] old by `clock` (monotonic nanoseconds, read only
    /// when a failure is unreported).
    pub fn take_event(&mut self, clock: &dyn Fn() -> u64) -> Option<String> {
        let latest = self.latest.as_ref().filter(|_| self.unreported > 0)?;
        let now_ns = clock();
        if self
            .last_event_ns
            .is_some_and(|last| now_ns.saturating_sub(last) < EVENT_INTERVAL_NS)
        {
            return None;
        }
        let mut line = alloc::format!("nbd: {}", latest.describe());
        if self.unreported > 1 {
            line += &alloc::format!(
                " ({} failed TLS sessions since the last report; nbd tls counts them)",
                self.unreported
            );
        }
        self.unreported = 0;
        self.last_event_ns = Some(now_ns);
        Some(line)
    }
}

impl DeviceMapper {
    /// Notes a failed TLS session with `peer`, stamped with the wall clock.
    pub(crate) fn record_tls_failure(&mut self, peer: SocketAddr, failure: &TlsFailure) {
        let at = self.wall_clock_now();
        self.tls_failures.record(FailedSession {
            peer,
            at,
            failure: failure.clone(),
        });
    }

    pub fn tls_failures(&self) -> &TlsFailures {
        &self.tls_failures
    }
}

/// The `nbd tls` line about failed sessions: `failed TLS sessions: N` and the latest
/// one's time and account.
pub fn summary(failures: &TlsFailures) -> Option<String> {
    let latest = failures.latest()?;
    let when = latest
        .at
        .map_or_else(|| String::from("time unknown"), utc_text);
    Some(alloc::format!(
        "failed TLS sessions: {}, the latest at {when}: {}",
        failures.count(),
        latest.describe()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(port: u16, reason: &str) -> FailedSession {
        FailedSession {
            peer: SocketAddr::from(([10, 0, 2, 2], port)),
            at: Some(1_796_558_400),
            failure: TlsFailure {
                handshaking: true,
                reason: String::from(reason),
            },
        }
    }

    #[test]
    fn event_lines_are_at_most_one_a_minute_and_count_the_failures_between() {
        let mut failures = TlsFailures::default();
        let never = || -> u64 { panic!("the clock was read with nothing to report") };
        assert_eq!(failures.take_event(&never), None);
        assert_eq!(summary(&failures), None);
        failures.record(failed(1000, "invalid peer certificate: UnknownIssuer"));
        assert_eq!(
            failures.take_event(&|| 5),
            Some(String::from(
                "nbd: TLS handshake with 10.0.2.2:1000 failed: invalid peer certificate: \
                 UnknownIssuer"
            ))
        );
        assert_eq!(failures.take_event(&|| 6), None);
        for port in 1001..1004 {
            failures.record(failed(port, "peer sent no certificates"));
        }
        assert_eq!(failures.take_event(&|| 5 + EVENT_INTERVAL_NS - 1), None);
        assert_eq!(
            failures.take_event(&|| 5 + EVENT_INTERVAL_NS),
            Some(String::from(
                "nbd: TLS handshake with 10.0.2.2:1003 failed: peer sent no certificates \
                 (3 failed TLS sessions since the last report; nbd tls counts them)"
            ))
        );
        assert_eq!(failures.take_event(&never), None);
        assert_eq!(
            summary(&failures),
            Some(String::from(
                "failed TLS sessions: 4, the latest at 2026-12-06 12:00:00 UTC: TLS handshake \
                 with 10.0.2.2:1003 failed: peer sent no certificates"
            ))
        );
    }
}
