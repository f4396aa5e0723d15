//! Money: exact decimal amounts with at most 6 fractional digits, and the two checked kinds
//! that commands take: `PositiveAmount` (spends, holds) and `Limit` (budget limits).
//!
//! Input is read from decimal text only, never through `f64`: a JSON string (`"12.34"`) or
//! the literal text of a JSON number (`12.34`). Anything finer than 6 fractional digits is
//! rejected, never rounded. Output is always a JSON string holding a plain decimal.
//!
//! How JSON numbers stay exact: `Deserialize` reads the value as a `serde_json::RawValue`,
//! so it sees the number's own text. That works with every serde_json entry point
//! (`from_slice`, `from_str`, `from_value`, axum's `Json`), but not behind serde's buffering
//! (`#[serde(flatten)]`, untagged or internally tagged enums), which fails loudly rather
//! than silently rounding. A `serde_json::Value` built without `arbitrary_precision` has
//! already turned its numbers into f64; `Money::from_json_value` reads such a number from
//! its shortest round-trip text, which is exact for every decimal of at most 15
//! significant digits (every `PositiveAmount` and every `Limit` up to 10^9), but cannot
//! see digits the f64 already lost. Request bodies should therefore be deserialized into
//! typed structs straight from their bytes, not through `Value`.

use std::fmt;

use rust_decimal::Decimal;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// Why a text is not an acceptable amount. The messages complete "amount ...".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("must be a decimal number such as \"12.34\"")]
    Malformed,
    #[error("must be at most {max} characters long")]
    TooLong { max: usize },
    #[error("must have at most {max} fractional digits", max = Money::MAX_FRACTION_DIGITS)]
    TooPrecise,
    #[error("must not be negative zero")]
    NegativeZero,
    #[error("is out of range")]
    OutOfRange,
    #[error("must be a JSON string or number")]
    WrongType,
    #[error("must be greater than 0")]
    NotPositive,
    #[error("must not be negative")]
    Negative,
    #[error("must be at most {max}")]
    TooLarge { max: Money },
}

/// An exact amount: at most 6 fractional digits, magnitude below 10^18. Equality is
/// numeric (`1.50 == 1.5`), and it is shown with at least two decimals and no trailing
/// zero past them (`"1.50"`, `"0.125"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(Decimal);

impl Money {
    pub const ZERO: Money = Money(Decimal::ZERO);
    pub const MAX_FRACTION_DIGITS: u32 = 6;
    /// Whole digits allowed before the point: magnitudes stay below 10^18, far from
    /// `Decimal`'s own limit, so sums of many amounts cannot overflow unnoticed.
    const MAX_INTEGER_DIGITS: i64 = 18;
    /// Longer texts are refused before any work: no legitimate amount needs more.
    pub const MAX_TEXT_LEN: usize = 64;

    /// Reads a decimal string: JSON number grammar (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`),
    /// no surrounding spaces. Trailing zeros are not precision: `"1.5000000"` is 1.5.
    pub fn parse_str(text: &str) -> Result<Self, MoneyError> {
        parse_decimal_text(text).map(Money)
    }

    /// Reads the literal text of a JSON number (the same grammar as `parse_str`).
    pub fn parse_json_number(text: &str) -> Result<Self, MoneyError> {
        parse_decimal_text(text).map(Money)
    }

    /// Reads one raw JSON value's text: a string holding a decimal, or a number.
    pub fn from_json_text(raw: &str) -> Result<Self, MoneyError> {
        let raw = raw.trim();
        match raw.as_bytes().first() {
            Some(b'"') => {
                let text: String = serde_json::from_str(raw).map_err(|_| MoneyError::Malformed)?;
                Self::parse_str(&text)
            }
            Some(b'-' | b'0'..=b'9') => Self::parse_json_number(raw),
            _ => Err(MoneyError::WrongType),
        }
    }

    /// Reads a `serde_json::Value`: a string, or a number from its text (see the module
    /// note on what a `Value` may already have lost).
    pub fn from_json_value(value: &serde_json::Value) -> Result<Self, MoneyError> {
        match value {
            serde_json::Value::String(text) => Self::parse_str(text),
            serde_json::Value::Number(number) => Self::parse_json_number(&number.to_string()),
            _ => Err(MoneyError::WrongType),
        }
    }

    /// Takes a `Decimal` that must already fit (at most 6 fractional digits once trailing
    /// zeros are dropped, magnitude below 10^18).
    pub fn from_decimal(value: Decimal) -> Result<Self, MoneyError> {
        let value = value.normalize();
        if value.scale() > Self::MAX_FRACTION_DIGITS {
            return Err(MoneyError::TooPrecise);
        }
        if value.abs() >= upper_bound() {
            return Err(MoneyError::OutOfRange);
        }
        Ok(Money(value))
    }

    /// A whole number of units, for this crate's constants and tests; `units` must be
    /// below 10^18 (Money's range), which every caller's constant is.
    pub(crate) fn from_units(units: i64) -> Self {
        debug_assert!(units.unsigned_abs() < 10_u64.pow(Self::MAX_INTEGER_DIGITS as u32));
        Money(Decimal::from(units))
    }

    pub fn as_decimal(&self) -> Decimal {
        self.0
    }

    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }

    pub fn is_negative(&self) -> bool {
        self.0.is_sign_negative() && !self.0.is_zero()
    }

    /// `None` when the sum leaves Money's range.
    pub fn checked_add(self, other: Money) -> Option<Money> {
        Self::from_decimal(self.0.checked_add(other.0)?).ok()
    }

    /// `None` when the difference leaves Money's range.
    pub fn checked_sub(self, other: Money) -> Option<Money> {
        Self::from_decimal(self.0.checked_sub(other.0)?).ok()
    }

    /// The difference, or zero when `other` is larger: for "remaining" figures.
    pub fn saturating_sub_to_zero(self, other: Money) -> Money {
        match self.checked_sub(other) {
            Some(d) if !d.is_negative() => d,
            _ => Money::ZERO,
        }
    }
}

fn upper_bound() -> Decimal {
    Decimal::from_i128_with_scale(10_i128.pow(Money::MAX_INTEGER_DIGITS as u32), 0)
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Shown as money is written: at least two decimals ("9.90", "10.00"), more only
        // where they carry value ("0.125"); never an exponent, never a trailing zero past
        // the second decimal.
        let mut value = self.0.normalize();
        if value.scale() < 2 {
            value.rescale(2);
        }
        fmt::Display::fmt(&value, f)
    }
}

impl std::str::FromStr for Money {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_str(s)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        Money::from_json_text(raw.get()).map_err(|e| D::Error::custom(format!("amount {e}")))
    }
}

/// The JSON number grammar, read digit by digit into an exact value. Exponents are
/// accepted when the value they give fits; the exponent is bounded so that a text such as
/// `1e999999999` costs nothing.
fn parse_decimal_text(text: &str) -> Result<Decimal, MoneyError> {
    if text.len() > Money::MAX_TEXT_LEN {
        return Err(MoneyError::TooLong {
            max: Money::MAX_TEXT_LEN,
        });
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    let negative = bytes.first() == Some(&b'-');
    if negative {
        i += 1;
    }
    let digits_from = |i: &mut usize| {
        let start = *i;
        while *i < bytes.len() && bytes[*i].is_ascii_digit() {
            *i += 1;
        }
        &text[start..*i]
    };
    let integer = digits_from(&mut i);
    if integer.is_empty() || (integer.len() > 1 && integer.starts_with('0')) {
        return Err(MoneyError::Malformed);
    }
    let mut fraction = "";
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        fraction = digits_from(&mut i);
        if fraction.is_empty() {
            return Err(MoneyError::Malformed);
        }
    }
    let mut exponent: i64 = 0;
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        let exponent_negative = match bytes.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let exponent_digits = digits_from(&mut i);
        if exponent_digits.is_empty() {
            return Err(MoneyError::Malformed);
        }
        for d in exponent_digits.bytes() {
            // Saturating far beyond any exponent that could give an acceptable value.
            exponent = (exponent * 10 + i64::from(d - b'0')).min(1_000_000);
        }
        if exponent_negative {
            exponent = -exponent;
        }
    }
    if i != bytes.len() {
        return Err(MoneyError::Malformed);
    }

    // value = digits × 10^power
    let mut digits = format!("{integer}{fraction}");
    let mut power = exponent - fraction.len() as i64;
    while digits.ends_with('0') {
        digits.pop();
        power += 1;
    }
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return if negative {
            Err(MoneyError::NegativeZero)
        } else {
            Ok(Decimal::ZERO)
        };
    }
    if power < -i64::from(Money::MAX_FRACTION_DIGITS) {
        return Err(MoneyError::TooPrecise);
    }
    if digits.len() as i64 + power > Money::MAX_INTEGER_DIGITS {
        return Err(MoneyError::OutOfRange);
    }
    // At most 18 + 6 digits here, so the i128 arithmetic below cannot overflow.
    let mantissa: i128 = digits.parse().map_err(|_| MoneyError::Malformed)?;
    let (mantissa, scale) = if power >= 0 {
        (mantissa * 10_i128.pow(power as u32), 0)
    } else {
        (mantissa, (-power) as u32)
    };
    let signed = if negative { -mantissa } else { mantissa };
    Decimal::try_from_i128_with_scale(signed, scale).map_err(|_| MoneyError::OutOfRange)
}

/// What every bounded amount type shares around its own `new` (which states its bounds):
/// parsing, the inner `Money`, and reading and writing as money does, with refusals named
/// after `$label`.
macro_rules! bounded_money {
    ($name:ident, $label:literal) => {
        impl $name {
            pub fn parse_str(text: &str) -> Result<Self, MoneyError> {
                Self::new(Money::parse_str(text)?)
            }

            pub fn from_json_value(value: &serde_json::Value) -> Result<Self, MoneyError> {
                Self::new(Money::from_json_value(value)?)
            }

            pub fn money(&self) -> Money {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$name> for Money {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                self.0.serialize(serializer)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let money = Money::deserialize(deserializer)?;
                Self::new(money).map_err(|e| D::Error::custom(format!("{} {e}", $label)))
            }
        }
    };
}

/// An amount a spend or a hold may take: more than 0 and at most 1,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PositiveAmount(Money);

bounded_money!(PositiveAmount, "amount");

impl PositiveAmount {
    pub const MAX_UNITS: i64 = 1_000_000;

    pub fn new(amount: Money) -> Result<Self, MoneyError> {
        if amount.is_negative() || amount.is_zero() {
            return Err(MoneyError::NotPositive);
        }
        let max = Money::from_units(Self::MAX_UNITS);
        if amount > max {
            return Err(MoneyError::TooLarge { max });
        }
        Ok(Self(amount))
    }
}

/// A budget's limit: at least 0 and at most 10^12. Zero is a real limit (nothing may be
/// spent); "no limit" is `Option::None` where a limit is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Limit(Money);

bounded_money!(Limit, "limit");

impl Limit {
    pub const MAX_UNITS: i64 = 1_000_000_000_000;

    pub fn new(amount: Money) -> Result<Self, MoneyError> {
        if amount.is_negative() {
            return Err(MoneyError::Negative);
        }
        let max = Money::from_units(Self::MAX_UNITS);
        if amount > max {
            return Err(MoneyError::TooLarge { max });
        }
        Ok(Self(amount))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn money(text: &str) -> Money {
        Money::parse_str(text).unwrap()
    }

    #[test]
    fn a_tenth_plus_two_tenths_is_exactly_three_tenths() {
        let sum = money("0.1").checked_add(money("0.2")).unwrap();
        assert_eq!(sum, money("0.3"));
        assert_eq!(sum.to_string(), "0.30", "exact, shown with two decimals");
    }

    #[test]
    fn plain_decimals_and_json_numbers_are_read_exactly() {
        assert_eq!(money("12.34").as_decimal(), Decimal::new(1234, 2));
        assert_eq!(money("0").to_string(), "0.00");
        assert_eq!(money("-5.5").to_string(), "-5.50");
        assert_eq!(money("0.125").to_string(), "0.125");
        assert_eq!(money("0.000001").to_string(), "0.000001");
        assert_eq!(
            money("999999999999999999.999999").to_string(),
            "999999999999999999.999999"
        );
        assert_eq!(Money::parse_json_number("1.5e2").unwrap(), money("150"));
        assert_eq!(Money::parse_json_number("1E-6").unwrap(), money("0.000001"));
        assert_eq!(
            Money::parse_json_number("12340e-3").unwrap(),
            money("12.34")
        );
    }

    #[test]
    fn trailing_zeros_are_not_precision() {
        assert_eq!(money("1.5000000000"), money("1.5"));
        assert_eq!(money("1.50").to_string(), "1.50");
        assert_eq!(money("1.500000").to_string(), "1.50");
    }

    #[test]
    fn more_than_six_fractional_digits_are_rejected_not_rounded() {
        assert_eq!(Money::parse_str("0.0000001"), Err(MoneyError::TooPrecise));
        assert_eq!(Money::parse_str("12.3456789"), Err(MoneyError::TooPrecise));
        assert_eq!(Money::parse_str("1e-7"), Err(MoneyError::TooPrecise));
        assert_eq!(Money::parse_str("1.2345678e1").unwrap(), money("12.345678"));
        assert_eq!(
            Money::parse_str("1.2345678e-1"),
            Err(MoneyError::TooPrecise)
        );
    }

    #[test]
    fn garbage_nan_infinity_and_negative_zero_are_rejected() {
        for bad in [
            "",
            " 1",
            "1 ",
            "+1",
            "01",
            ".5",
            "5.",
            "1e",
            "1e+",
            "--1",
            "1.2.3",
            "0x10",
            "NaN",
            "nan",
            "Infinity",
            "-Infinity",
            "inf",
            "1,5",
            "1_000",
            "１",
        ] {
            assert_eq!(Money::parse_str(bad), Err(MoneyError::Malformed), "{bad:?}");
        }
        for zero in ["-0", "-0.0", "-0e5", "-0.000"] {
            assert_eq!(
                Money::parse_str(zero),
                Err(MoneyError::NegativeZero),
                "{zero:?}"
            );
        }
        assert_eq!(money("0.000"), Money::ZERO);
    }

    #[test]
    fn huge_values_and_huge_exponents_are_rejected_cheaply() {
        assert_eq!(Money::parse_str("1e18"), Err(MoneyError::OutOfRange));
        assert_eq!(
            Money::parse_str("1000000000000000000"),
            Err(MoneyError::OutOfRange)
        );
        assert_eq!(
            Money::parse_str("1e999999999999999999"),
            Err(MoneyError::OutOfRange)
        );
        assert_eq!(
            Money::parse_str("1e-999999999999999999"),
            Err(MoneyError::TooPrecise)
        );
        assert_eq!(
            Money::parse_str(&"1".repeat(65)),
            Err(MoneyError::TooLong { max: 64 })
        );
        assert_eq!(
            Money::parse_str("1e17").unwrap().to_string(),
            "100000000000000000.00"
        );
    }

    #[test]
    fn json_numbers_are_read_from_their_text_not_through_f64() {
        // As an f64 this is exactly 0.1; read from its text it is over-precise.
        let err = serde_json::from_str::<Money>("0.1000000000000000001").unwrap_err();
        assert!(err.to_string().contains("fractional digits"), "{err}");
        // 2^53 + 1 is not representable as f64; the text is.
        assert_eq!(
            serde_json::from_str::<Money>("9007199254740993")
                .unwrap()
                .to_string(),
            "9007199254740993.00"
        );
        assert_eq!(
            serde_json::from_str::<Money>("12.34").unwrap(),
            money("12.34")
        );
        assert_eq!(
            serde_json::from_str::<Money>("\"12.34\"").unwrap(),
            money("12.34")
        );
        assert_eq!(serde_json::from_slice::<Money>(b" 7 ").unwrap(), money("7"));
    }

    #[test]
    fn json_values_other_than_strings_and_numbers_are_rejected() {
        for bad in ["null", "true", "[]", "{}", "\"\"", "\"abc\""] {
            assert!(serde_json::from_str::<Money>(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Money::from_json_value(&serde_json::Value::Null),
            Err(MoneyError::WrongType)
        );
        assert_eq!(
            Money::from_json_value(&serde_json::json!(true)),
            Err(MoneyError::WrongType)
        );
    }

    #[test]
    fn a_json_value_is_read_as_a_string_or_as_its_number_text() {
        assert_eq!(
            Money::from_json_value(&serde_json::json!("0.25")).unwrap(),
            money("0.25")
        );
        assert_eq!(
            Money::from_json_value(&serde_json::json!(12.34)).unwrap(),
            money("12.34")
        );
        assert_eq!(
            Money::from_json_value(&serde_json::json!(5)).unwrap(),
            money("5")
        );
        assert_eq!(
            Money::from_json_value(&serde_json::json!(-5)).unwrap(),
            money("-5")
        );
        assert_eq!(
            Money::from_json_value(&serde_json::json!(1e-7)),
            Err(MoneyError::TooPrecise)
        );
        // The same text, whether it came in a string or as a number.
        let value: serde_json::Value = serde_json::from_str("{\"a\": 0.3}").unwrap();
        assert_eq!(
            serde_json::from_value::<Money>(value["a"].clone()).unwrap(),
            money("0.3")
        );
    }

    #[test]
    fn money_is_written_as_a_plain_decimal_string() {
        assert_eq!(
            serde_json::to_value(money("12.34")).unwrap(),
            serde_json::json!("12.34")
        );
        assert_eq!(
            serde_json::to_value(money("0.000001")).unwrap(),
            serde_json::json!("0.000001")
        );
        assert_eq!(
            serde_json::to_value(money("1e15")).unwrap(),
            serde_json::json!("1000000000000000.00")
        );
    }

    #[test]
    fn a_positive_amount_is_above_zero_and_at_most_a_million() {
        assert_eq!(PositiveAmount::parse_str("0"), Err(MoneyError::NotPositive));
        assert_eq!(
            PositiveAmount::parse_str("-1"),
            Err(MoneyError::NotPositive)
        );
        assert!(PositiveAmount::parse_str("0.000001").is_ok());
        assert!(PositiveAmount::parse_str("1000000").is_ok());
        assert_eq!(
            PositiveAmount::parse_str("1000000.000001"),
            Err(MoneyError::TooLarge {
                max: Money::from_units(1_000_000)
            })
        );
        assert!(serde_json::from_str::<PositiveAmount>("0").is_err());
        assert_eq!(
            serde_json::from_str::<PositiveAmount>("2.5")
                .unwrap()
                .money(),
            money("2.5")
        );
        assert_eq!(
            PositiveAmount::from_json_value(&serde_json::json!("3"))
                .unwrap()
                .money(),
            money("3")
        );
    }

    #[test]
    fn a_limit_is_zero_or_more_and_at_most_a_trillion() {
        assert!(Limit::parse_str("0").is_ok());
        assert_eq!(Limit::parse_str("-0.01"), Err(MoneyError::Negative));
        assert!(Limit::parse_str("1000000000000").is_ok());
        assert!(matches!(
            Limit::parse_str("1000000000000.5"),
            Err(MoneyError::TooLarge { .. })
        ));
        assert_eq!(
            serde_json::to_value(Limit::parse_str("100").unwrap()).unwrap(),
            serde_json::json!("100.00")
        );
    }

    #[test]
    fn remaining_figures_never_go_below_zero() {
        assert_eq!(money("5").saturating_sub_to_zero(money("7")), Money::ZERO);
        assert_eq!(money("7").saturating_sub_to_zero(money("5")), money("2"));
    }

    fn any_money() -> impl Strategy<Value = Money> {
        (
            -999_999_999_999_999_999_999_999_i128..=999_999_999_999_999_999_999_999_i128,
            0_u32..=6,
        )
            .prop_map(|(m, scale)| {
                // Keep the magnitude below 10^18 whatever the scale.
                let m = m % 10_i128.pow(18 + scale);
                Money::from_decimal(Decimal::from_i128_with_scale(m, scale)).unwrap()
            })
    }

    proptest! {
        #[test]
        fn what_is_written_reads_back_as_the_same_amount(x in any_money()) {
            prop_assert_eq!(Money::parse_str(&x.to_string()), Ok(x));
            let json = serde_json::to_string(&x).unwrap();
            prop_assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), x);
            // The same digits as a JSON number.
            prop_assert_eq!(serde_json::from_str::<Money>(&x.to_string()).unwrap(), x);
            prop_assert!(!x.to_string().contains(['e', 'E']));
        }

        #[test]
        fn any_amount_with_more_than_six_fractional_digits_is_rejected(
            m in 1_i64..=999_999_999_999,
            scale in 7_u32..=20,
            negative in any::<bool>(),
        ) {
            // A last digit that is not 0, so the value really needs `scale` digits.
            let m = if m % 10 == 0 { m + 1 } else { m };
            let m = if negative { -m } else { m };
            let text = Decimal::from_i128_with_scale(i128::from(m), scale).to_string();
            prop_assert_eq!(Money::parse_str(&text), Err(MoneyError::TooPrecise));
            prop_assert!(serde_json::from_str::<Money>(&text).is_err());
        }

        #[test]
        fn sums_are_exact(a in any_money(), b in any_money()) {
            if let Some(sum) = a.checked_add(b) {
                prop_assert_eq!(sum.as_decimal(), a.as_decimal() + b.as_decimal());
                prop_assert_eq!(sum.checked_sub(b), Some(a));
            }
        }
    }
}
