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

#[cfg(test)]
mod tests {
    use super::{clean, json_has_nul};

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
