//! How the console writes numbers, money, rates and times for people: thousands
//! separators, amounts as the API writes them (at least two decimals), times in UTC with a
//! relative hint.

use chrono::{DateTime, Utc};
use maud::{Markup, html};

/// `1234567` as `1,234,567`.
pub fn count(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// An amount written as the API writes it (`"1234.50"`), with thousands separators
/// (`1,234.50`). Text that is not an amount is shown as it is.
pub fn money(amount: &str) -> String {
    let (sign, rest) = match amount.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", amount),
    };
    let (whole, fraction) = rest.split_once('.').unwrap_or((rest, ""));
    let Ok(n) = whole.parse::<i64>() else {
        return amount.to_string();
    };
    let mut out = format!("{sign}{}", count(n));
    if !fraction.is_empty() {
        out.push('.');
        out.push_str(fraction);
    }
    out
}

/// A percentage as the API computes it (two decimals at most).
pub fn percent(rate: f64) -> String {
    let text = format!("{rate:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text} %")
}

/// `part / whole` as a percentage, 0 when `whole` is 0 (the API's `rate`).
pub fn rate(part: i64, whole: i64) -> String {
    percent(crate::app::analytics::rate(part, whole))
}

/// How long ago (or ahead) `at` is from `now`, in the largest unit that fits.
pub fn relative(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - at).num_seconds();
    let (ahead, secs) = (secs < 0, secs.unsigned_abs());
    let amount = match secs {
        0..=59 => return if ahead { "in a moment" } else { "just now" }.into(),
        60..=3_599 => format!("{} min", secs / 60),
        3_600..=86_399 => format!("{} h", secs / 3_600),
        _ => format!("{} d", secs / 86_400),
    };
    if ahead {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// A time in UTC with its relative hint, machine-readable in `datetime`.
pub fn time(at: DateTime<Utc>, now: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(at.to_rfc3339()) title=(at.to_rfc3339()) {
            (at.format("%Y-%m-%d %H:%M UTC"))
            " "
            span.hint { "(" (relative(at, now)) ")" }
        }
    }
}

/// An optional time, or a dash.
pub fn maybe_time(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Markup {
    match at {
        Some(at) => time(at, now),
        None => html! { span.muted { "—" } },
    }
}

/// A duration in seconds for people: `42 s`, `3 min 5 s`, `2 h 10 min`.
pub fn duration(secs: f64) -> String {
    let secs = secs.max(0.0).round() as u64;
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3_599 => format!("{} min {} s", secs / 60, secs % 60),
        _ => format!("{} h {} min", secs / 3_600, (secs % 3_600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_money_carry_thousands_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(count(-12_345), "-12,345");
        assert_eq!(money("1234.50"), "1,234.50");
        assert_eq!(money("0.125"), "0.125");
        assert_eq!(money("-1000000.00"), "-1,000,000.00");
        assert_eq!(money("not money"), "not money");
    }

    #[test]
    fn rates_drop_needless_zeros() {
        assert_eq!(percent(66.67), "66.67 %");
        assert_eq!(percent(12.5), "12.5 %");
        assert_eq!(percent(100.0), "100 %");
        assert_eq!(rate(0, 0), "0 %");
    }

    #[test]
    fn times_say_how_long_ago() {
        let now = DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(relative(now, now), "just now");
        assert_eq!(
            relative(now - chrono::Duration::minutes(5), now),
            "5 min ago"
        );
        assert_eq!(relative(now - chrono::Duration::hours(3), now), "3 h ago");
        assert_eq!(relative(now - chrono::Duration::days(2), now), "2 d ago");
        assert_eq!(relative(now + chrono::Duration::hours(1), now), "in 1 h");
        assert_eq!(duration(3_725.0), "1 h 2 min");
    }
}
