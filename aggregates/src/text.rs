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

#[cfg(test)]
mod tests {
    use super::clean;

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
}
