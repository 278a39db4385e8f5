//! The wall clock TLS checks certificate validity against. The machine supplies it
//! (the appliance from its real-time clock, offline mode from the host); a clock that
//! does not know the time says so, and then client certificates are neither accepted
//! nor configured.

use alloc::string::String;
use nbd::rustls::pki_types::UnixTime;
use nbd::rustls::time_provider::TimeProvider;

/// Seconds since 1970-01-01 00:00:00 UTC, or `None` when the time is unknown.
pub type WallClock = fn() -> Option<u64>;

/// The clock of a machine that has none.
pub fn unknown_time() -> Option<u64> {
    None
}

/// The wall clock as rustls asks for it.
#[derive(Debug)]
pub(crate) struct TlsClock(pub WallClock);

impl TimeProvider for TlsClock {
    fn current_time(&self) -> Option<UnixTime> {
        (self.0)()
            .map(|seconds| UnixTime::since_unix_epoch(core::time::Duration::from_secs(seconds)))
    }
}

/// Seconds since the Unix epoch at the given UTC date and time, if it is one: days
/// counted from the Gregorian calendar (the year starting in March, so the leap day
/// comes last), for dates from 1970 on.
pub fn unix_seconds(
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
) -> Option<u64> {
    let leap = year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
    let month_days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    if year < 1970 || day == 0 || day > month_days || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let shifted = if month <= 2 { year - 1 } else { year };
    let era = u64::from(shifted / 400);
    let year_of_era = u64::from(shifted % 400);
    let month_from_march = u64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + u64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    // 719468: days from 0000-03-01 to 1970-01-01.
    let days = era * 146_097 + day_of_era - 719_468;
    Some(days * 86_400 + u64::from(hour) * 3600 + u64::from(minute) * 60 + u64::from(second))
}

/// `YYYY-MM-DD HH:MM:SS UTC` for seconds since the Unix epoch.
pub fn utc_text(seconds: u64) -> String {
    let days = seconds / 86_400;
    let in_day = seconds % 86_400;
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    alloc::format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert_both_ways_like_date_does() {
        // `date -u -d @SECONDS` for each.
        for (seconds, date) in [
            (0, (1970, 1, 1, 0, 0, 0)),
            (951_782_400, (2000, 2, 29, 0, 0, 0)),
            (1_709_251_199, (2024, 2, 29, 23, 59, 59)),
            (1_735_689_600, (2025, 1, 1, 0, 0, 0)),
            (1_796_558_400, (2026, 12, 6, 12, 0, 0)),
            (4_107_542_400, (2100, 3, 1, 0, 0, 0)),
        ] {
            let (year, month, day, hour, minute, second) = date;
            assert_eq!(
                unix_seconds(year, month, day, hour, minute, second),
                Some(seconds),
                "{date:?}"
            );
            assert_eq!(
                utc_text(seconds),
                alloc::format!(
                    "{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02} UTC"
                )
            );
        }
        for bad in [
            (2023, 2, 29, 0, 0, 0),
            (2100, 2, 29, 0, 0, 0),
            (2024, 13, 1, 0, 0, 0),
            (2024, 4, 31, 0, 0, 0),
            (2024, 1, 0, 0, 0, 0),
            (2024, 1, 1, 24, 0, 0),
            (1969, 12, 31, 23, 59, 59),
        ] {
            let (year, month, day, hour, minute, second) = bad;
            assert_eq!(unix_seconds(year, month, day, hour, minute, second), None);
        }
    }
}
