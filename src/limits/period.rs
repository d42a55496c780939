//! Budget periods on the UTC calendar: a day, an ISO week (from Monday), a month, or all time.

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};

use crate::config::Period;

/// Start of the period holding `now_ms`, in Unix milliseconds (0 for `Total`).
pub fn start(period: Period, now_ms: i64) -> i64 {
    let Some(now) = DateTime::<Utc>::from_timestamp_millis(now_ms) else {
        return 0;
    };
    let day = now.date_naive();
    let first = match period {
        Period::Total => return 0,
        Period::Daily => day,
        Period::Weekly => day - Duration::days(i64::from(day.weekday().num_days_from_monday())),
        Period::Monthly => NaiveDate::from_ymd_opt(day.year(), day.month(), 1).unwrap_or(day),
    };
    midnight(first)
}

/// End of the period holding `now_ms` (the next one's start); `None` for `Total`.
pub fn end(period: Period, now_ms: i64) -> Option<i64> {
    let begin = DateTime::<Utc>::from_timestamp_millis(start(period, now_ms))?.date_naive();
    let next = match period {
        Period::Total => return None,
        Period::Daily => begin + Duration::days(1),
        Period::Weekly => begin + Duration::days(7),
        Period::Monthly => begin.checked_add_months(chrono::Months::new(1))?,
    };
    Some(midnight(next))
}

fn midnight(d: NaiveDate) -> i64 {
    d.and_hms_opt(0, 0, 0)
        .map_or(0, |t| t.and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn periods_follow_the_utc_calendar() {
        let now = ms("2026-11-22T15:30:00Z"); // a Sunday
        assert_eq!(start(Period::Daily, now), ms("2026-11-22T00:00:00Z"));
        assert_eq!(end(Period::Daily, now), Some(ms("2026-11-23T00:00:00Z")));
        assert_eq!(start(Period::Weekly, now), ms("2026-11-16T00:00:00Z"));
        assert_eq!(end(Period::Weekly, now), Some(ms("2026-11-23T00:00:00Z")));
        assert_eq!(start(Period::Monthly, now), ms("2026-11-01T00:00:00Z"));
        assert_eq!(
            end(Period::Monthly, ms("2026-12-31T23:59:59Z")),
            Some(ms("2027-01-01T00:00:00Z"))
        );
        assert_eq!(start(Period::Total, now), 0);
        assert_eq!(end(Period::Total, now), None);
    }
}
