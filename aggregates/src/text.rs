//! Free text as every aggregate accepts it: trimmed, not empty, at most so many
//! characters, and nothing invisible (no control characters).

/// The trimmed text, or why it is refused (a reason to put after the field's name).
pub fn clean(raw: &str, max_chars: usize) -> Result<String, String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err("must not be empty".into());
    }
    if trimmed.chars().count() > max_chars {
        return Err(format!("must be at most {max_chars} characters"));
    }
    if trimmed.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(trimmed.to_string())
}

/// Whether a JSON value holds a NUL character in any string or key: PostgreSQL cannot
/// store one in `jsonb` (or `text`), so a value carrying it can never become an event.
pub fn json_has_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(json_has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// The first number in the JSON text `raw` that a JSON value cannot hold exactly (an
/// integer beyond 64 bits, a decimal finer than a double), if any. Such a number would be
/// stored rounded, silently; the caller refuses it instead and asks for a string.
pub fn inexact_number(raw: &str) -> Option<&str> {
    let bytes = raw.as_bytes();
    let (mut i, mut in_string) = (0, false);
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        if b == b'-' || b.is_ascii_digit() {
            let start = i;
            while i < bytes.len()
                && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
            {
                i += 1;
            }
            let token = &raw[start..i];
            if !number_is_exact(token) {
                return Some(token);
            }
            continue;
        }
        i += 1;
    }
    None
}

fn number_is_exact(token: &str) -> bool {
    let integer = !token.contains(['.', 'e', 'E']);
    if integer && (token.parse::<i64>().is_ok() || token.parse::<u64>().is_ok()) {
        return true;
    }
    match token.parse::<f64>() {
        Ok(f) if f.is_finite() => decimal_digits(token) == decimal_digits(&f.to_string()),
        _ => false,
    }
}

/// A decimal number's value as (negative, significant digits, exponent), so that two
/// spellings of one value compare equal (`1.50e1` and `15`).
fn decimal_digits(text: &str) -> (bool, String, i64) {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().unwrap_or(0)),
        None => (text, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{whole}{fraction}");
    let mut exponent = exponent - fraction.len() as i64;
    let digits = digits.trim_start_matches('0');
    let trimmed = digits.trim_end_matches('0');
    exponent += (digits.len() - trimmed.len()) as i64;
    if trimmed.is_empty() {
        return (false, String::new(), 0);
    }
    (negative, trimmed.to_string(), exponent)
}

#[cfg(test)]
mod tests {
    use super::{clean, inexact_number, json_has_nul};

    #[test]
    fn numbers_a_json_value_cannot_hold_exactly_are_found_and_others_pass() {
        let raw = r#"{"a": 123456789012345678901234567890, "b": "123456789012345678901234567890"}"#;
        assert_eq!(inexact_number(raw), Some("123456789012345678901234567890"));
        assert_eq!(
            inexact_number("[0.1000000000000000000001]"),
            Some("0.1000000000000000000001")
        );
        for exact in [
            "[1, -2, 0.1, 2.5e3, 1e29, -0, 0.0, 18446744073709551615, -9223372036854775808]",
            r#"{"k\"1": "9999999999999999999999", "n": 1.5E-7}"#,
        ] {
            assert_eq!(inexact_number(exact), None, "{exact}");
        }
    }

    #[test]
    fn text_is_trimmed_bounded_and_free_of_control_characters() {
        assert_eq!(clean("  Ada  ", 3).as_deref(), Ok("Ada"));
        assert_eq!(clean("   ", 3), Err("must not be empty".to_string()));
        assert_eq!(
            clean("Adam", 3),
            Err("must be at most 3 characters".to_string())
        );
        assert_eq!(
            clean("été", 3).as_deref(),
            Ok("été"),
            "characters, not bytes"
        );
        assert_eq!(
            clean("a\u{0007}b", 9),
            Err("must not contain control characters".to_string())
        );
    }

    #[test]
    fn a_nul_anywhere_in_a_json_value_is_found() {
        use serde_json::json;
        assert!(!json_has_nul(&json!({"a": ["b", 1, null, {"c": "d\n"}]})));
        assert!(json_has_nul(&json!("a\u{0}")));
        assert!(json_has_nul(&json!({"a": [{"b": "\u{0}"}]})));
        assert!(json_has_nul(&json!({"a\u{0}": 1})));
    }
}
