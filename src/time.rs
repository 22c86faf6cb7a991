//! Wall-clock timestamps as integer milliseconds since the Unix epoch (the store's time unit).

use std::time::{SystemTime, UNIX_EPOCH};

/// An hour and a day in milliseconds (UTC days: no leap seconds in Unix time).
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `2026-11-22 20:35:07 UTC` for a millisecond timestamp (proleptic Gregorian, no time zones).
pub fn format_utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `2026-11-22` for a millisecond timestamp (UTC).
pub fn format_date(ms: i64) -> String {
    format_utc(ms)[..10].to_owned()
}

/// The first millisecond of a `YYYY-MM-DD` day (UTC); `None` for anything else.
pub fn parse_date(text: &str) -> Option<i64> {
    let t = text.trim();
    let mut parts = t.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, i64, i64) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&m) || d < 1 || d > days_in[(m - 1) as usize] {
        return None;
    }
    // Days since 1970-01-01 from a civil date (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400_000)
}

/// The first millisecond of the UTC calendar month `ms` falls in.
pub fn month_start_ms(ms: i64) -> i64 {
    let date = format_date(ms);
    parse_date(&format!("{}-01", &date[..7])).unwrap_or(ms)
}

#[cfg(test)]
mod tests {
    use super::{format_date, format_utc, month_start_ms, parse_date};

    #[test]
    fn month_starts_on_the_first_at_midnight() {
        let t = parse_date("2026-12-02").expect("date") + 5_000;
        assert_eq!(format_utc(month_start_ms(t)), "2026-12-01 00:00:00 UTC");
        let first = parse_date("2024-02-01").expect("date");
        assert_eq!(month_start_ms(first), first);
    }

    #[test]
    fn dates_round_trip() {
        for d in ["1970-01-01", "2000-02-29", "2026-11-22", "2024-12-31"] {
            assert_eq!(format_date(parse_date(d).expect(d)), d);
        }
        assert_eq!(parse_date("2026-11-22"), Some(1_795_305_600_000));
        for bad in [
            "2026-02-29",
            "2026-13-01",
            "2026-1-01",
            "26-01-01",
            "2026-01-01x",
            "",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_795_379_625_000), "2026-11-22 20:33:45 UTC");
    }
}
