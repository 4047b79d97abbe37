//! Wall-clock times (UTC) as people and records read them, without a
//! date crate: the civil date from days since the epoch (Howard Hinnant's
//! algorithm).

/// (year, month, day) of a Unix time in ms, UTC.
fn civil(ms: u64) -> (i64, i64, i64) {
    let days = (ms / 86_400_000) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// "14:03:07.412" (UTC).
pub fn time_of_day(ms: u64) -> String {
    let s = ms / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

/// "2026-11-26 13:47:14.123" (UTC), for people.
pub fn human(ms: u64) -> String {
    let (y, m, d) = civil(ms);
    format!("{y:04}-{m:02}-{d:02} {}", time_of_day(ms))
}

/// "2026-11-26T13:47:14.123Z": fixed width, so such stamps sort as text.
pub fn iso(ms: u64) -> String {
    let (y, m, d) = civil(ms);
    format!("{y:04}-{m:02}-{d:02}T{}Z", time_of_day(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_in_utc() {
        assert_eq!(time_of_day(0), "00:00:00.000");
        assert_eq!(human(1_700_000_000_123), "2023-11-14 22:13:20.123");
        assert_eq!(human(951_782_400_000), "2000-02-29 00:00:00.000");
        assert_eq!(iso(0), "1970-01-01T00:00:00.000Z");
        assert!(iso(999) < iso(1000));
    }
}
