//! Contact: one person, identified by a normalised email; its fields, upserted and patched,
//! and its latest enrichment.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContactError {
    /// `field` is the request's field name, so the HTTP layer can report it as is.
    #[error("{field} {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("contact does not exist")]
    NotFound,
    /// The stream is chosen from the email, so a different email here is a caller's bug.
    #[error("the contact's email differs from the one given")]
    EmailMismatch,
    /// The contact was erased: its personal data is gone and it takes no more commands.
    #[error("the contact was erased")]
    Erased { erased_at: DateTime<Utc> },
    /// An upsert of the email of an erased contact: refused until its suppression is lifted.
    #[error("this email belongs to an erased contact; remove its suppression to add it again")]
    EmailErased,
    /// Releasing the erasure of a contact that is not erased.
    #[error("the contact is not erased")]
    NotErased,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ContactError {
    ContactError::InvalidField {
        field,
        reason: reason.into(),
    }
}

/// Trimmed, non-empty, at most `max` characters, no control characters.
fn clean_text(field: &'static str, raw: &str, max: usize) -> Result<String, ContactError> {
    crate::text::clean(raw, max).map_err(|reason| invalid(field, reason))
}

/// A contact's email in its one normalised spelling, so that one mailbox is one contact:
/// the contact's id is a keyed hash of this text, so two spellings of one address must
/// normalise to the same text, or the second would make a duplicate contact (and slip past
/// anything keyed on the first). [`ContactEmail::parse`] applies these rules, in this order:
///
/// 1. Surrounding whitespace is trimmed; nothing may be left empty.
/// 2. No whitespace, control, format or other invisible characters (Unicode
///    `Default_Ignorable_Code_Point`, such as zero-width spaces and soft hyphens), and no
///    unassigned or private-use code points: they are refused, never silently dropped.
///    Unassigned code points are refused because a later Unicode version could normalise
///    them differently and so move the contact to another id.
/// 3. The whole address is put in Unicode normalisation form NFKC: fullwidth and other
///    compatibility forms become their plain letters (`ｂｏｂ＠example.com` is
///    `bob@example.com`) and decomposed accents are composed (`cafe\u{301}` is `café`).
/// 4. The local part (before the last `@`): a quoted local part whose content needs no
///    quoting is unquoted (`"bob"@…` is `bob@…`); one that does need its quotes (spaces,
///    `@`, `,`, consecutive dots, …) is refused, since such addresses are practically never
///    real contacts. The local part is then full Unicode case folded, and put in NFKC again
///    (repeated until stable), so `Bob`, `ＢＯＢ` and `ſ` (long s) all fold to plain
///    lower case. Full folding maps `ß` (and `ẞ`) to `ss`: `straße@…` and `strasse@…` are
///    one contact. A mailbox provider could in principle hold both as different mailboxes,
///    but people and address books write one for the other, and one contact for both
///    errs on the side of dedup and suppression.
/// 5. The domain is processed with IDNA / UTS #46 (non-transitional, STD3 ASCII rules,
///    no leading or trailing hyphen in a label, DNS lengths verified, no trailing dot) and
///    stored in its ASCII (punycode) form: `bücher.de`, `BÜCHER.DE` and `xn--bcher-kva.de`
///    are all `xn--bcher-kva.de`. ASCII is the form DNS and mail servers use, and the one
///    UTS #46 defines for comparing names. A domain that fails UTS #46 is refused. In the
///    domain `ß` stays `ß` (`straße.de` is `xn--strae-oqa.de`): registries treat `straße.de`
///    and `strasse.de` as different domains, with possibly different owners.
/// 6. The domain has at least two labels, is not an IP literal, and its top-level label
///    (in ASCII) has at least two characters and is not all digits.
/// 7. The result is at most 254 characters (counted after normalisation, so a Unicode
///    domain counts as its punycode), has no display name, and passes the `email_address`
///    crate's checks.
///
/// Normalisation is idempotent: parsing a normalised email gives it back unchanged.
///
/// Unicode data comes from ICU4X (`icu_normalizer`, `icu_casemap`, `icu_properties`), the
/// Unicode Consortium's own Rust libraries, which the `idna` crate also uses for UTS #46:
/// one Unicode version for every step.
///
/// Serde: deserialising a bare `ContactEmail` applies [`ContactEmail::parse`] (it is
/// `try_from = "String"`), so a request type holding one gets the strict rules. Events and
/// snapshots do not: their email fields load the stored text as it is (see
/// [`stored_email`]), because an earlier release may have stored an email these rules now
/// refuse or spell differently, and stored history must always load.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContactEmail(String);

impl ContactEmail {
    pub const MAX_CHARS: usize = 254;
    const FIELD: &'static str = "email";
    /// Input longer than this is refused before normalising, which bounds the work.
    /// Normalisation can shorten an address (composing accents, unquoting), but no real
    /// address shrinks to a quarter of its length.
    const MAX_INPUT_CHARS: usize = 4 * Self::MAX_CHARS;
    /// Case folding followed by NFKC settles in one or two rounds for real text.
    const MAX_FOLD_ROUNDS: usize = 4;

    /// The strict rules for every email that comes in (see the type's documentation).
    pub fn parse(raw: &str) -> Result<Self, ContactError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(invalid(Self::FIELD, "must not be empty"));
        }
        let too_long = || {
            invalid(
                Self::FIELD,
                format!("must be at most {} characters", Self::MAX_CHARS),
            )
        };
        if trimmed.chars().count() > Self::MAX_INPUT_CHARS {
            return Err(too_long());
        }
        Self::refuse_invisible(trimmed)?;
        let nfkc = nfkc(trimmed);
        // NFKC can turn a compatibility space (such as U+3000) into a plain one.
        Self::refuse_invisible(&nfkc)?;
        let not_an_address =
            |why: &str| invalid(Self::FIELD, format!("is not a valid address: {why}"));
        let (local, domain) = nfkc
            .rsplit_once('@')
            .ok_or_else(|| not_an_address("Missing separator character '@'."))?;
        let local = Self::fold_local_part(&Self::unquote(local)?)?;
        let domain = Self::ascii_domain(domain)?;
        let normalised = format!("{local}@{domain}");
        if normalised.chars().count() > Self::MAX_CHARS {
            return Err(too_long());
        }
        let options = email_address::Options::default()
            .with_minimum_sub_domains(2)
            .without_domain_literal()
            .without_display_text();
        email_address::EmailAddress::parse_with_options(&normalised, options)
            .map_err(|e| not_an_address(&e.to_string()))?;
        Ok(Self(normalised))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// An email as an earlier release stored it, unchecked and unchanged: stored history
    /// must load even where today's rules would refuse or respell it. Only for reading
    /// events and snapshots; every input goes through [`Self::parse`].
    fn from_stored(stored: String) -> Self {
        Self(stored)
    }

    fn refuse_invisible(text: &str) -> Result<(), ContactError> {
        use icu_properties::props::{DefaultIgnorableCodePoint, GeneralCategory as Gc};
        let category = icu_properties::CodePointMapData::<Gc>::new();
        let ignorable = icu_properties::CodePointSetData::new::<DefaultIgnorableCodePoint>();
        // The crate accepts quoted local parts with spaces and comments; an address with
        // whitespace or invisible characters is far likelier a paste error than intended.
        if text.chars().any(|c| {
            c.is_whitespace()
                || ignorable.contains(c)
                || matches!(
                    category.get(c),
                    Gc::Control
                        | Gc::Format
                        | Gc::Unassigned
                        | Gc::PrivateUse
                        | Gc::Surrogate
                        | Gc::SpaceSeparator
                        | Gc::LineSeparator
                        | Gc::ParagraphSeparator
                )
        }) {
            return Err(invalid(
                Self::FIELD,
                "must not contain spaces, control or invisible characters",
            ));
        }
        Ok(())
    }

    /// The local part without needless quotes; a local part that needs them is refused.
    fn unquote(local: &str) -> Result<String, ContactError> {
        let Some(quoted) = local.strip_prefix('"') else {
            return Ok(local.to_string());
        };
        let refused = || {
            invalid(
                Self::FIELD,
                "must not have a quoted local part that needs its quotes",
            )
        };
        let content = quoted.strip_suffix('"').ok_or_else(refused)?;
        let mut unquoted = String::with_capacity(content.len());
        let mut chars = content.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => unquoted.push(chars.next().ok_or_else(refused)?),
                '"' => return Err(refused()),
                c => unquoted.push(c),
            }
        }
        if is_dot_atom(&unquoted) {
            Ok(unquoted)
        } else {
            Err(refused())
        }
    }

    /// Full case folding then NFKC, repeated until the text no longer changes.
    fn fold_local_part(local: &str) -> Result<String, ContactError> {
        let fold = icu_casemap::CaseMapper::new();
        let mut text = local.to_string();
        for _ in 0..Self::MAX_FOLD_ROUNDS {
            let next = nfkc(&fold.fold_string(&text));
            if next == text {
                if !is_dot_atom(&text) {
                    return Err(invalid(
                        Self::FIELD,
                        "is not a valid address: Invalid character found in local part.",
                    ));
                }
                return Ok(text);
            }
            text = next;
        }
        Err(invalid(
            Self::FIELD,
            "has a local part that cannot be normalised",
        ))
    }

    /// The domain in ASCII by UTS #46, with at least two labels and a plausible top level.
    fn ascii_domain(domain: &str) -> Result<String, ContactError> {
        use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};
        if domain.starts_with('[') {
            return Err(invalid(
                Self::FIELD,
                "is not a valid address: Domain literals are not supported.",
            ));
        }
        let ascii = Uts46::new()
            .to_ascii(
                domain.as_bytes(),
                AsciiDenyList::STD3,
                Hyphens::CheckFirstLast,
                DnsLength::Verify,
            )
            .map_err(|_| invalid(Self::FIELD, "has a domain that is not a valid domain name"))?;
        let mut labels = ascii.rsplit('.');
        let top = labels.next().unwrap_or_default();
        if labels.next().is_none() {
            return Err(invalid(
                Self::FIELD,
                "must have a domain of at least two labels",
            ));
        }
        if top.chars().count() < 2 || top.chars().all(|c| c.is_ascii_digit()) {
            return Err(invalid(
                Self::FIELD,
                "must have a top-level domain of at least two characters, not all digits",
            ));
        }
        Ok(ascii.into_owned())
    }
}

fn nfkc(text: &str) -> String {
    icu_normalizer::ComposingNormalizer::new_nfkc()
        .normalize(text)
        .into_owned()
}

/// RFC 5322 / RFC 6532 dot-atom: atoms of `atext` or non-ASCII characters, joined by
/// single dots.
fn is_dot_atom(text: &str) -> bool {
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    text.split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(atext))
}

impl TryFrom<String> for ContactEmail {
    type Error = ContactError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<ContactEmail> for String {
    fn from(value: ContactEmail) -> Self {
        value.0
    }
}

/// Serde helpers for an email in stored events and snapshots: the stored text as it is,
/// whether or not [`ContactEmail::parse`] would accept it today.
pub mod stored_email {
    use super::ContactEmail;
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ContactEmail, D::Error> {
        String::deserialize(d).map(ContactEmail::from_stored)
    }

    pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ContactEmail>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(ContactEmail::from_stored))
    }
}

/// The id of the contact stream for `email`: HMAC-SHA256 under the deployment's secret
/// `key`, cut to 128 bits with the UUID version 8 and RFC 4122 variant bits set.
///
/// Every writer computes the same id for the same email, so concurrent creates meet on one
/// stream and optimistic concurrency lets only one of them create it. Keyed, so an id
/// published in a URL cannot be tested against guessed emails. The key must stay the same
/// for the life of the data (changing it gives every email a new stream).
pub fn contact_id_for(key: &[u8], email: &ContactEmail) -> Uuid {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key).expect("HMAC-SHA256 accepts keys of any length");
    // Domain separation: the same key used for another purpose never yields these bytes.
    mac.update(b"leadledger/contact-id/v1\0");
    mac.update(email.as_str().as_bytes());
    let digest = mac.finalize().into_bytes();
    let mut bytes = [0_u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// A free-text field of up to 200 characters (trimmed, no control characters).
macro_rules! short_text {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const MAX_CHARS: usize = 200;

            pub fn parse(raw: &str) -> Result<Self, ContactError> {
                clean_text($field, raw, Self::MAX_CHARS).map(Self)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ContactError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }
    };
}

short_text!(
    /// First name, up to 200 characters.
    FirstName,
    "first_name"
);
short_text!(
    /// Last name, up to 200 characters.
    LastName,
    "last_name"
);
short_text!(
    /// Job title, up to 200 characters.
    Title,
    "title"
);
short_text!(
    /// Company name, up to 200 characters.
    Company,
    "company"
);

/// A company's domain name: lower-cased ASCII (IDNs in their `xn--` form), at most 253
/// characters, at least two labels of 1..=63 letters, digits or inner hyphens, and a
/// top-level label that is not all digits (so IP addresses are not domains).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CompanyDomain(String);

impl CompanyDomain {
    pub const MAX_CHARS: usize = 253;
    const FIELD: &'static str = "company_domain";

    pub fn parse(raw: &str) -> Result<Self, ContactError> {
        let domain = clean_text(Self::FIELD, raw, Self::MAX_CHARS)?.to_ascii_lowercase();
        let not_a_domain = || invalid(Self::FIELD, "must be a domain name such as example.com");
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 {
            return Err(not_a_domain());
        }
        for label in &labels {
            let well_formed = (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !well_formed {
                return Err(not_a_domain());
            }
        }
        let top = labels[labels.len() - 1];
        if top.len() < 2 || top.bytes().all(|b| b.is_ascii_digit()) {
            return Err(not_a_domain());
        }
        Ok(Self(domain))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CompanyDomain {
    type Error = ContactError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<CompanyDomain> for String {
    fn from(value: CompanyDomain) -> Self {
        value.0
    }
}

/// A phone number as written, up to 50 characters: digits, spaces, `+ - ( ) . / # * ,`
/// and an extension marker (`x`, `ext`), with at least one digit. Not reformatted: the
/// number's country is often unknown, and guessing it corrupts numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Phone(String);

impl Phone {
    pub const MAX_CHARS: usize = 50;
    const FIELD: &'static str = "phone";

    pub fn parse(raw: &str) -> Result<Self, ContactError> {
        let phone = clean_text(Self::FIELD, raw, Self::MAX_CHARS)?;
        let lower = phone.to_ascii_lowercase();
        let without_extension = lower.replace("ext", "").replace('x', "");
        let plausible = phone.chars().any(|c| c.is_ascii_digit())
            && without_extension
                .chars()
                .all(|c| c.is_ascii_digit() || " +-()./#*,".contains(c));
        if !plausible {
            return Err(invalid(Self::FIELD, "must be a phone number"));
        }
        Ok(Self(phone))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Phone {
    type Error = ContactError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Phone> for String {
    fn from(value: Phone) -> Self {
        value.0
    }
}

/// A profile URL: an absolute `http` or `https` URL with a host, up to 500 characters.
/// Kept as written (trimmed) rather than re-serialised, so what is shown is what was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LinkedinUrl(String);

impl LinkedinUrl {
    pub const MAX_CHARS: usize = 500;
    const FIELD: &'static str = "linkedin_url";

    pub fn parse(raw: &str) -> Result<Self, ContactError> {
        let text = clean_text(Self::FIELD, raw, Self::MAX_CHARS)?;
        let not_a_url = || invalid(Self::FIELD, "must be an http(s) URL");
        if text.chars().any(char::is_whitespace) {
            return Err(not_a_url());
        }
        let url = url::Url::parse(&text).map_err(|_| not_a_url())?;
        let has_host = url.host_str().is_some_and(|h| !h.is_empty());
        if !matches!(url.scheme(), "http" | "https") || !has_host {
            return Err(not_a_url());
        }
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for LinkedinUrl {
    type Error = ContactError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<LinkedinUrl> for String {
    fn from(value: LinkedinUrl) -> Self {
        value.0
    }
}

/// Free-form string fields: at most 50 entries, keys 1..=100 characters (not blank),
/// values up to 1000 characters, no control characters anywhere. Ordered, so that equal
/// maps serialise identically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct CustomFields(BTreeMap<String, String>);

impl CustomFields {
    pub const MAX_ENTRIES: usize = 50;
    pub const MAX_KEY_CHARS: usize = 100;
    pub const MAX_VALUE_CHARS: usize = 1000;
    const FIELD: &'static str = "custom";

    pub fn parse(map: BTreeMap<String, String>) -> Result<Self, ContactError> {
        if map.len() > Self::MAX_ENTRIES {
            return Err(invalid(
                Self::FIELD,
                format!("must have at most {} entries", Self::MAX_ENTRIES),
            ));
        }
        for (key, value) in &map {
            if key.trim().is_empty() || key.chars().count() > Self::MAX_KEY_CHARS {
                return Err(invalid(
                    Self::FIELD,
                    format!("keys must be 1 to {} characters", Self::MAX_KEY_CHARS),
                ));
            }
            if value.chars().count() > Self::MAX_VALUE_CHARS {
                return Err(invalid(
                    Self::FIELD,
                    format!(
                        "values must be at most {} characters",
                        Self::MAX_VALUE_CHARS
                    ),
                ));
            }
            // Values may span lines (notes, addresses); nothing else invisible is let in.
            let multiline_ok = |c: char| c.is_control() && !matches!(c, '\n' | '\r' | '\t');
            if key.chars().any(char::is_control) || value.chars().any(multiline_ok) {
                return Err(invalid(
                    Self::FIELD,
                    "must not contain control characters (values may contain line breaks and tabs)",
                ));
            }
        }
        Ok(Self(map))
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<BTreeMap<String, String>> for CustomFields {
    type Error = ContactError;
    fn try_from(value: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<CustomFields> for BTreeMap<String, String> {
    fn from(value: CustomFields) -> Self {
        value.0
    }
}

/// How much an enrichment is trusted, 0..=1.
///
/// An `f64` rather than a `Decimal`: it is a ratio nobody adds up or bills, it arrives and
/// leaves as a JSON number, and comparing or sorting by it needs no exactness. Only finite
/// values in range are accepted, so it is never NaN and always compares.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct QualityScore(f64);

impl QualityScore {
    const FIELD: &'static str = "quality_score";

    pub fn new(value: f64) -> Result<Self, ContactError> {
        if !value.is_finite() || !(0.0..=1.0).contains(&value) {
            return Err(invalid(Self::FIELD, "must be a number from 0 to 1"));
        }
        // -0.0 is in range; store it as 0.0 so it never prints as "-0".
        Ok(Self(value + 0.0))
    }

    pub fn value(&self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for QualityScore {
    type Error = ContactError;
    fn try_from(value: f64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<QualityScore> for f64 {
    fn from(value: QualityScore) -> Self {
        value.0
    }
}

/// The fields a contact carries besides its email. In a command each one given overwrites
/// and each one left out (`None`) keeps what is there; `custom` given replaces the whole
/// map. In `ContactUpdated`, only the fields that changed are present.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<FirstName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<LastName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<Company>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company_domain: Option<CompanyDomain>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<Title>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<Phone>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linkedin_url: Option<LinkedinUrl>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<CustomFields>,
}

/// The fields as they arrive (a request body or an import row), before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ContactFieldsInput {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub company: Option<String>,
    pub company_domain: Option<String>,
    pub title: Option<String>,
    pub phone: Option<String>,
    pub linkedin_url: Option<String>,
    pub custom: Option<BTreeMap<String, String>>,
}

impl ContactFields {
    /// Validates every field and reports every invalid one, not just the first, so that a
    /// response can list them all.
    pub fn parse(input: ContactFieldsInput) -> Result<Self, Vec<ContactError>> {
        fn check<T>(
            errors: &mut Vec<ContactError>,
            result: Option<Result<T, ContactError>>,
        ) -> Option<T> {
            match result? {
                Ok(value) => Some(value),
                Err(e) => {
                    errors.push(e);
                    None
                }
            }
        }
        let mut errors = Vec::new();
        let e = &mut errors;
        let fields = ContactFields {
            first_name: check(e, input.first_name.as_deref().map(FirstName::parse)),
            last_name: check(e, input.last_name.as_deref().map(LastName::parse)),
            company: check(e, input.company.as_deref().map(Company::parse)),
            company_domain: check(e, input.company_domain.as_deref().map(CompanyDomain::parse)),
            title: check(e, input.title.as_deref().map(Title::parse)),
            phone: check(e, input.phone.as_deref().map(Phone::parse)),
            linkedin_url: check(e, input.linkedin_url.as_deref().map(LinkedinUrl::parse)),
            custom: check(e, input.custom.map(CustomFields::parse)),
        };
        if errors.is_empty() {
            Ok(fields)
        } else {
            Err(errors)
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Only the given fields whose value differs from the contact's.
    fn changes_against(self, contact: &Contact) -> ContactFields {
        fn changed<T: PartialEq>(given: Option<T>, current: &Option<T>) -> Option<T> {
            given.filter(|g| current.as_ref() != Some(g))
        }
        ContactFields {
            first_name: changed(self.first_name, &contact.first_name),
            last_name: changed(self.last_name, &contact.last_name),
            company: changed(self.company, &contact.company),
            company_domain: changed(self.company_domain, &contact.company_domain),
            title: changed(self.title, &contact.title),
            phone: changed(self.phone, &contact.phone),
            linkedin_url: changed(self.linkedin_url, &contact.linkedin_url),
            custom: self.custom.filter(|c| *c != contact.custom),
        }
    }
}

/// The latest enrichment of a contact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrichment {
    pub data: serde_json::Value,
    pub quality_score: QualityScore,
    pub sources: Vec<String>,
    pub enriched_at: DateTime<Utc>,
}

pub const MAX_ENRICHMENT_SOURCES: usize = 50;
/// The most enrichment data one event carries, as JSON text: every later command on the
/// contact loads it again until the next snapshot, so it must stay small.
pub const MAX_ENRICHMENT_BYTES: usize = 64 * 1024;

/// Why enrichment data holding a NUL character is refused.
pub const NUL_IN_DATA: &str = "must not contain NUL characters (\\u0000) in any key or string";
pub const MAX_ENRICHMENT_SOURCE_CHARS: usize = 200;

/// Whether the person agrees to be contacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentStatus {
    Granted,
    Withdrawn,
}

/// The lawful basis of processing the person's data (GDPR art. 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentBasis {
    Consent,
    LegitimateInterest,
    Contract,
}

/// The latest consent of a contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    pub status: ConsentStatus,
    pub basis: Option<ConsentBasis>,
    pub source: Option<String>,
    pub recorded_at: DateTime<Utc>,
}

pub const MAX_CONSENT_SOURCE_CHARS: usize = 200;

/// What a contact can be asked to do. Times come from the caller: the aggregate has no clock.
#[derive(Debug, Clone, PartialEq)]
pub enum ContactCommand {
    /// Create the contact, or overwrite the given fields of the existing one.
    Upsert {
        email: ContactEmail,
        fields: ContactFields,
        at: DateTime<Utc>,
    },
    /// Overwrite the given fields of an existing contact.
    Update {
        fields: ContactFields,
        at: DateTime<Utc>,
    },
    /// Replace the contact's enrichment. `data` must be a JSON object.
    RecordEnrichment {
        data: serde_json::Value,
        quality_score: QualityScore,
        sources: Vec<String>,
        at: DateTime<Utc>,
    },
    /// Record the person's consent (or its withdrawal) to be contacted.
    RecordConsent {
        status: ConsentStatus,
        basis: Option<ConsentBasis>,
        source: Option<String>,
        at: DateTime<Utc>,
    },
    /// Erase the contact: its personal data is forgotten and it takes no more commands.
    /// Erasing an erased contact changes nothing.
    Erase { at: DateTime<Utc> },
    /// Allow the email of an erased contact to be created again (its suppression was
    /// removed): the next upsert starts a new life of the stream. Releasing a released
    /// erasure changes nothing.
    ReleaseErasure { at: DateTime<Utc> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ContactEvent {
    ContactCreated {
        #[serde(deserialize_with = "stored_email::deserialize")]
        email: ContactEmail,
        fields: ContactFields,
        created_at: DateTime<Utc>,
    },
    /// Carries only the fields that changed.
    ContactUpdated {
        changes: ContactFields,
        updated_at: DateTime<Utc>,
    },
    EnrichmentRecorded {
        data: serde_json::Value,
        quality_score: QualityScore,
        sources: Vec<String>,
        enriched_at: DateTime<Utc>,
    },
    /// Consent was granted or withdrawn (a withdrawal also suppresses the address).
    ConsentRecorded {
        status: ConsentStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        basis: Option<ConsentBasis>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
        recorded_at: DateTime<Utc>,
    },
    /// The contact was erased. Carries no personal data; the event store also destroys
    /// the contact's data key, so its earlier events read back as [`Self::ContactRedacted`].
    ContactErased { erased_at: DateTime<Utc> },
    /// The erased contact's email may be created again (its suppression was removed).
    /// Carries no personal data.
    ErasureReleased { released_at: DateTime<Utc> },
    /// Never stored: how an event of an erased contact reads once its key is destroyed
    /// (its personal data unreadable). Applying it changes nothing.
    ContactRedacted {},
}

impl DomainEvent for ContactEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ContactCreated { .. } => "ContactCreated",
            Self::ContactUpdated { .. } => "ContactUpdated",
            Self::EnrichmentRecorded { .. } => "EnrichmentRecorded",
            Self::ConsentRecorded { .. } => "ConsentRecorded",
            Self::ContactErased { .. } => "ContactErased",
            Self::ErasureReleased { .. } => "ErasureReleased",
            Self::ContactRedacted {} => "ContactRedacted",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// The contact's state, rebuilt from its events (and kept in snapshots).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Contact {
    /// Whether the contact exists. The HTTP layer answers 201 or 200 to an upsert from
    /// this value as loaded before the command.
    pub created: bool,
    #[serde(default, deserialize_with = "stored_email::option")]
    pub email: Option<ContactEmail>,
    pub first_name: Option<FirstName>,
    pub last_name: Option<LastName>,
    pub company: Option<Company>,
    pub company_domain: Option<CompanyDomain>,
    pub title: Option<Title>,
    pub phone: Option<Phone>,
    pub linkedin_url: Option<LinkedinUrl>,
    pub custom: CustomFields,
    pub enrichment: Option<Enrichment>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// The latest consent recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<Consent>,
    /// Set once the contact is erased (its personal fields are then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erased_at: Option<DateTime<Utc>>,
    /// When the erasure was released: the email may then be created again, which starts a
    /// new life of the contact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erasure_released_at: Option<DateTime<Utc>>,
}

impl Contact {
    fn require_created(&self) -> Result<(), ContactError> {
        if self.created {
            Ok(())
        } else {
            Err(ContactError::NotFound)
        }
    }

    fn update_event(&self, fields: ContactFields, at: DateTime<Utc>) -> Option<ContactEvent> {
        let changes = fields.changes_against(self);
        (!changes.is_empty()).then_some(ContactEvent::ContactUpdated {
            changes,
            updated_at: at,
        })
    }

    fn assign(&mut self, fields: ContactFields) {
        let ContactFields {
            first_name,
            last_name,
            company,
            company_domain,
            title,
            phone,
            linkedin_url,
            custom,
        } = fields;
        fn overwrite<T>(slot: &mut Option<T>, given: Option<T>) {
            if given.is_some() {
                *slot = given;
            }
        }
        overwrite(&mut self.first_name, first_name);
        overwrite(&mut self.last_name, last_name);
        overwrite(&mut self.company, company);
        overwrite(&mut self.company_domain, company_domain);
        overwrite(&mut self.title, title);
        overwrite(&mut self.phone, phone);
        overwrite(&mut self.linkedin_url, linkedin_url);
        if let Some(custom) = custom {
            self.custom = custom;
        }
    }
}

fn validate_sources(sources: &[String]) -> Result<Vec<String>, ContactError> {
    if sources.len() > MAX_ENRICHMENT_SOURCES {
        return Err(invalid(
            "sources",
            format!("must have at most {MAX_ENRICHMENT_SOURCES} entries"),
        ));
    }
    sources
        .iter()
        .map(|s| clean_text("sources", s, MAX_ENRICHMENT_SOURCE_CHARS))
        .collect()
}

impl Aggregate for Contact {
    const TYPE: &'static str = "contact";
    type Command = ContactCommand;
    type Event = ContactEvent;
    type Error = ContactError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        if let Some(erased_at) = self.erased_at {
            let event = match command {
                ContactCommand::Erase { .. } => return Ok(()),
                ContactCommand::ReleaseErasure { at } => match self.erasure_released_at {
                    Some(_) => return Ok(()),
                    None => ContactEvent::ErasureReleased { released_at: at },
                },
                ContactCommand::Upsert { email, fields, at } => match self.erasure_released_at {
                    Some(_) => ContactEvent::ContactCreated {
                        email,
                        fields,
                        created_at: at,
                    },
                    None => return Err(ContactError::EmailErased),
                },
                _ => return Err(ContactError::Erased { erased_at }),
            };
            sink.write(event, self).await;
            return Ok(());
        }
        let event = match command {
            ContactCommand::ReleaseErasure { .. } => {
                self.require_created()?;
                return Err(ContactError::NotErased);
            }
            ContactCommand::Erase { at } => {
                self.require_created()?;
                Some(ContactEvent::ContactErased { erased_at: at })
            }
            ContactCommand::RecordConsent {
                status,
                basis,
                source,
                at,
            } => {
                self.require_created()?;
                let source = source
                    .map(|s| clean_text("source", &s, MAX_CONSENT_SOURCE_CHARS))
                    .transpose()?;
                Some(ContactEvent::ConsentRecorded {
                    status,
                    basis,
                    source,
                    recorded_at: at,
                })
            }
            ContactCommand::Upsert { email, fields, at } => {
                if self.created {
                    if self.email.as_ref() != Some(&email) {
                        return Err(ContactError::EmailMismatch);
                    }
                    self.update_event(fields, at)
                } else {
                    Some(ContactEvent::ContactCreated {
                        email,
                        fields,
                        created_at: at,
                    })
                }
            }
            ContactCommand::Update { fields, at } => {
                self.require_created()?;
                self.update_event(fields, at)
            }
            ContactCommand::RecordEnrichment {
                data,
                quality_score,
                sources,
                at,
            } => {
                self.require_created()?;
                if !data.is_object() {
                    return Err(invalid("data", "must be a JSON object"));
                }
                if crate::text::json_has_nul(&data) {
                    return Err(invalid("data", NUL_IN_DATA));
                }
                let sources = validate_sources(&sources)?;
                Some(ContactEvent::EnrichmentRecorded {
                    data,
                    quality_score,
                    sources,
                    enriched_at: at,
                })
            }
        };
        if let Some(event) = event {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ContactEvent::ContactCreated {
                email,
                fields,
                created_at,
            } => {
                // A new life of an erased contact begins as a contact never seen.
                *self = Contact::default();
                self.created = true;
                self.email = Some(email);
                self.assign(fields);
                self.created_at = Some(created_at);
                self.updated_at = Some(created_at);
            }
            ContactEvent::ContactUpdated {
                changes,
                updated_at,
            } => {
                self.assign(changes);
                self.updated_at = Some(updated_at);
            }
            ContactEvent::EnrichmentRecorded {
                data,
                quality_score,
                sources,
                enriched_at,
            } => {
                self.enrichment = Some(Enrichment {
                    data,
                    quality_score,
                    sources,
                    enriched_at,
                });
                self.updated_at = Some(enriched_at);
            }
            ContactEvent::ConsentRecorded {
                status,
                basis,
                source,
                recorded_at,
            } => {
                self.consent = Some(Consent {
                    status,
                    basis,
                    source,
                    recorded_at,
                });
                self.updated_at = Some(recorded_at);
            }
            ContactEvent::ContactErased { erased_at } => {
                *self = Contact {
                    created: true,
                    created_at: self.created_at,
                    updated_at: Some(erased_at),
                    erased_at: Some(erased_at),
                    ..Contact::default()
                };
            }
            ContactEvent::ErasureReleased { released_at } => {
                self.erasure_released_at = Some(released_at);
            }
            ContactEvent::ContactRedacted {} => {}
        }
    }
}

#[cfg(test)]
mod custom_field_tests {
    use super::*;

    #[test]
    fn custom_values_may_span_lines_but_keys_and_other_control_characters_may_not() {
        let map = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(CustomFields::parse(map("notes", "line one\r\nline two\tend")).is_ok());
        assert!(CustomFields::parse(map("notes", "bell\u{0007}")).is_err());
        assert!(CustomFields::parse(map("two\nlines", "v")).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;
    use serde_json::json;

    type Given = TestFramework<Contact>;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-01T09:00:00Z")
            .unwrap()
            .into()
    }

    fn later() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-02T10:30:00Z")
            .unwrap()
            .into()
    }

    fn email() -> ContactEmail {
        ContactEmail::parse("jane@example.com").unwrap()
    }

    fn fields(first: &str, company: &str) -> ContactFields {
        ContactFields {
            first_name: Some(FirstName::parse(first).unwrap()),
            company: Some(Company::parse(company).unwrap()),
            ..ContactFields::default()
        }
    }

    fn created() -> ContactEvent {
        ContactEvent::ContactCreated {
            email: email(),
            fields: fields("Jane", "Acme"),
            created_at: at(),
        }
    }

    fn state_after(events: Vec<ContactEvent>) -> Contact {
        let mut contact = Contact::default();
        for event in events {
            contact.apply(event);
        }
        contact
    }

    #[test]
    fn an_existing_contact_is_erased_once_and_forgets_its_personal_fields() {
        Given::with(())
            .given(vec![created()])
            .when(ContactCommand::Erase { at: later() })
            .then_expect_events(vec![ContactEvent::ContactErased { erased_at: later() }]);
        Given::with(())
            .given(vec![
                created(),
                ContactEvent::ContactErased { erased_at: later() },
            ])
            .when(ContactCommand::Erase { at: later() })
            .then_expect_events(vec![]);
        Given::with(())
            .given_no_previous_events()
            .when(ContactCommand::Erase { at: later() })
            .then_expect_error(ContactError::NotFound);
        let erased = state_after(vec![
            created(),
            ContactEvent::ContactErased { erased_at: later() },
        ]);
        assert_eq!(erased.email, None);
        assert_eq!(erased.first_name, None);
        assert_eq!(erased.erased_at, Some(later()));
    }

    #[test]
    fn an_erased_contact_takes_no_command_and_its_email_cannot_be_upserted() {
        let history = || {
            vec![
                ContactEvent::ContactRedacted {},
                ContactEvent::ContactErased { erased_at: later() },
            ]
        };
        Given::with(())
            .given(history())
            .when(ContactCommand::Update {
                fields: fields("Back", "Again"),
                at: later(),
            })
            .then_expect_error(ContactError::Erased { erased_at: later() });
        Given::with(())
            .given(history())
            .when(ContactCommand::Upsert {
                email: email(),
                fields: ContactFields::default(),
                at: later(),
            })
            .then_expect_error(ContactError::EmailErased);
    }

    #[test]
    fn a_released_erasure_lets_the_email_start_a_new_life_that_remembers_nothing_of_the_old() {
        let erased = || {
            vec![
                ContactEvent::ContactRedacted {},
                ContactEvent::ContactErased { erased_at: later() },
            ]
        };
        let released = || {
            let mut events = erased();
            events.push(ContactEvent::ErasureReleased {
                released_at: later(),
            });
            events
        };
        Given::with(())
            .given(erased())
            .when(ContactCommand::ReleaseErasure { at: later() })
            .then_expect_events(vec![ContactEvent::ErasureReleased {
                released_at: later(),
            }]);
        // Releasing twice changes nothing; a live or unknown contact has nothing to release.
        Given::with(())
            .given(released())
            .when(ContactCommand::ReleaseErasure { at: later() })
            .then_expect_events(vec![]);
        Given::with(())
            .given(vec![created()])
            .when(ContactCommand::ReleaseErasure { at: later() })
            .then_expect_error(ContactError::NotErased);
        Given::with(())
            .given_no_previous_events()
            .when(ContactCommand::ReleaseErasure { at: later() })
            .then_expect_error(ContactError::NotFound);
        // Released, the email is created again; other commands still find it erased.
        Given::with(())
            .given(released())
            .when(ContactCommand::Upsert {
                email: email(),
                fields: fields("Back", "Again"),
                at: later(),
            })
            .then_expect_events(vec![ContactEvent::ContactCreated {
                email: email(),
                fields: fields("Back", "Again"),
                created_at: later(),
            }]);
        Given::with(())
            .given(released())
            .when(ContactCommand::Update {
                fields: fields("Back", "Again"),
                at: later(),
            })
            .then_expect_error(ContactError::Erased { erased_at: later() });
        let mut history = released();
        history.push(ContactEvent::ContactCreated {
            email: email(),
            fields: ContactFields::default(),
            created_at: later(),
        });
        let reborn = state_after(history);
        assert_eq!(reborn.erased_at, None);
        assert_eq!(reborn.erasure_released_at, None);
        assert_eq!(reborn.first_name, None);
        assert_eq!(reborn.created_at, Some(later()));
        assert_eq!(reborn.email, Some(email()));
    }

    #[test]
    fn consent_is_recorded_with_its_basis_and_a_clean_source() {
        Given::with(())
            .given(vec![created()])
            .when(ContactCommand::RecordConsent {
                status: ConsentStatus::Withdrawn,
                basis: Some(ConsentBasis::LegitimateInterest),
                source: Some("  phone call ".into()),
                at: later(),
            })
            .then_expect_events(vec![ContactEvent::ConsentRecorded {
                status: ConsentStatus::Withdrawn,
                basis: Some(ConsentBasis::LegitimateInterest),
                source: Some("phone call".into()),
                recorded_at: later(),
            }]);
        Given::with(())
            .given(vec![created()])
            .when(ContactCommand::RecordConsent {
                status: ConsentStatus::Granted,
                basis: None,
                source: Some("bell\u{0007}".into()),
                at: later(),
            })
            .then_expect_error_message("source must not contain control characters");
    }

    #[test]
    fn an_email_is_trimmed_and_lower_cased() {
        let email = ContactEmail::parse("  Jane.Doe@Example.COM \n").unwrap();
        assert_eq!(email.as_str(), "jane.doe@example.com");
    }

    #[test]
    fn invalid_emails_are_rejected_naming_the_email_field() {
        let long_local = format!("{}@example.com", "a".repeat(250));
        for bad in [
            "",
            "   ",
            "no-at-sign",
            "a@b",
            "@example.com",
            "jane@",
            "Jane <jane@example.com>",
            "jane@[127.0.0.1]",
            "ja ne@example.com",
            "jane@exa\u{0007}mple.com",
            "jane@@example.com",
            long_local.as_str(),
        ] {
            match ContactEmail::parse(bad) {
                Err(ContactError::InvalidField { field, .. }) => assert_eq!(field, "email"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn an_email_of_254_characters_is_accepted_and_255_is_not() {
        let address = |last_label: usize| {
            let domain = format!(
                "{}.{}.{}.com",
                "b".repeat(63),
                "c".repeat(63),
                "d".repeat(last_label)
            );
            format!("{}@{domain}", "a".repeat(64))
        };
        let at_254 = address(57);
        assert_eq!(at_254.len(), 254);
        assert!(ContactEmail::parse(&at_254).is_ok(), "{at_254}");
        let at_255 = address(58);
        assert_eq!(
            ContactEmail::parse(&at_255),
            Err(invalid("email", "must be at most 254 characters"))
        );
    }

    #[test]
    fn the_contact_id_is_the_same_for_every_spelling_of_one_email() {
        let key = b"a test key of some length";
        let a = contact_id_for(key, &ContactEmail::parse("Jane@Example.com").unwrap());
        let b = contact_id_for(key, &ContactEmail::parse(" jane@example.com").unwrap());
        assert_eq!(a, b);
        let other = contact_id_for(key, &ContactEmail::parse("john@example.com").unwrap());
        assert_ne!(a, other);
    }

    /// Given two spellings, when both are parsed, then they are one email and one contact.
    fn assert_same_contact(spelling: &str, plain: &str) {
        let key = b"a test key of some length";
        let a = ContactEmail::parse(spelling).unwrap_or_else(|e| panic!("{spelling:?}: {e}"));
        let b = ContactEmail::parse(plain).unwrap_or_else(|e| panic!("{plain:?}: {e}"));
        assert_eq!(a, b, "{spelling:?} and {plain:?}");
        assert_eq!(contact_id_for(key, &a), contact_id_for(key, &b));
    }

    fn assert_refused(raw: &str) {
        match ContactEmail::parse(raw) {
            Err(ContactError::InvalidField { field, .. }) => assert_eq!(field, "email"),
            other => panic!("{raw:?} gave {other:?}"),
        }
    }

    #[test]
    fn fullwidth_letters_are_the_same_contact_as_their_plain_spelling() {
        assert_same_contact("ｂｏｂ@example.com", "bob@example.com");
        assert_same_contact("ＢＯＢ@ＥＸＡＭＰＬＥ.ＣＯＭ", "bob@example.com");
        assert_same_contact("bob＠example．com", "bob@example.com");
    }

    #[test]
    fn an_idn_domain_and_its_punycode_are_the_same_contact_stored_as_punycode() {
        assert_same_contact("bob@bücher.de", "bob@xn--bcher-kva.de");
        assert_same_contact("Bob@BÜCHER.DE", "bob@xn--bcher-kva.de");
        assert_same_contact("bob@bücher。de", "bob@xn--bcher-kva.de");
        let email = ContactEmail::parse("bob@bücher.de").unwrap();
        assert_eq!(email.as_str(), "bob@xn--bcher-kva.de");
    }

    #[test]
    fn a_needlessly_quoted_local_part_is_the_same_contact_unquoted() {
        assert_same_contact("\"bob\"@example.com", "bob@example.com");
        assert_same_contact("\"Bob.Smith\"@example.com", "bob.smith@example.com");
        assert_same_contact("\"b\\ob\"@example.com", "bob@example.com");
    }

    #[test]
    fn a_quoted_local_part_that_needs_its_quotes_is_refused() {
        for bad in [
            "\"bob smith\"@example.com",
            "\"bob..smith\"@example.com",
            "\".bob\"@example.com",
            "\"bob@home\"@example.com",
            "\"a,b\"@example.com",
            "\"\"@example.com",
            "\"bob@example.com",
        ] {
            assert_refused(bad);
        }
    }

    #[test]
    fn a_long_s_is_the_same_contact_as_a_plain_s() {
        assert_same_contact("ſam@example.com", "sam@example.com");
        assert_same_contact("bob@exampleſ.com", "bob@examples.com");
    }

    #[test]
    fn a_decomposed_accent_is_the_same_contact_as_the_composed_one() {
        assert_same_contact("cafe\u{0301}@example.com", "café@example.com");
        assert_same_contact("CAFÉ@example.com", "café@example.com");
    }

    #[test]
    fn a_sharp_s_is_folded_to_ss_in_the_local_part_but_kept_in_the_domain() {
        assert_same_contact("straße@example.com", "strasse@example.com");
        assert_same_contact("STRAẞE@example.com", "strasse@example.com");
        let sharp = ContactEmail::parse("bob@straße.de").unwrap();
        let double = ContactEmail::parse("bob@strasse.de").unwrap();
        assert_ne!(sharp, double);
        assert_eq!(sharp.as_str(), "bob@xn--strae-oqa.de");
    }

    #[test]
    fn a_one_letter_or_all_numeric_top_level_domain_is_refused() {
        for bad in [
            "bob@example.c",
            "bob@123.123",
            "bob@example.１２３",
            "bob@example.com.",
            "bob@-example.com",
            "bob@exa_mple.com",
        ] {
            assert_refused(bad);
        }
        assert!(ContactEmail::parse("bob@example.io").is_ok());
        assert!(ContactEmail::parse("bob@123.com").is_ok());
        assert!(ContactEmail::parse("bob@xn--bcher-kva.xn--p1ai").is_ok());
    }

    #[test]
    fn a_domain_that_fails_uts_46_is_refused() {
        for bad in [
            "bob@xn--a.com",
            "bob@ex\u{FFFD}ample.com",
            "bob@\u{0301}ab.com",
        ] {
            assert_refused(bad);
        }
    }

    #[test]
    fn invisible_and_spacing_characters_are_refused_not_ignored() {
        for bad in [
            "bob\u{200B}@example.com",
            "b\u{00AD}ob@example.com",
            "bob@exa\u{00AD}mple.com",
            "\u{202E}bob@example.com",
            "bob\u{FEFF}@example.com",
            "bob\u{00A0}smith@example.com",
            "bob\u{3000}smith@example.com",
        ] {
            assert_refused(bad);
        }
    }

    #[test]
    fn the_254_character_limit_counts_the_normalised_email() {
        // Fullwidth letters are single characters both before and after normalisation...
        let local = "ａ".repeat(64);
        let domain = format!(
            "{}.{}.{}.com",
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(57)
        );
        assert!(ContactEmail::parse(&format!("{local}@{domain}")).is_ok());
        // ...and a Unicode domain counts as its longer punycode.
        let unicode = format!(
            "{}@{}.{}.{}.de",
            "a".repeat(64),
            "b".repeat(63),
            "c".repeat(63),
            "ü".repeat(55)
        );
        assert_eq!(unicode.chars().count(), 251);
        assert_eq!(
            ContactEmail::parse(&unicode),
            Err(invalid("email", "must be at most 254 characters"))
        );
    }

    #[test]
    fn a_normalised_email_parses_to_itself() {
        for raw in [
            "ｂｏｂ@example.com",
            "bob@bücher.de",
            "\"bob\"@example.com",
            "ſam@example.com",
            "cafe\u{0301}@example.com",
            "STRAẞE@straße.de",
            "ΣΊΣΥΦΟΣ@example.com",
            "ǅemal@example.com",
            "ﬁnance@example.com",
        ] {
            let once = ContactEmail::parse(raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
            let twice = ContactEmail::parse(once.as_str()).unwrap();
            assert_eq!(once, twice, "{raw:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parsing_is_idempotent(
            local in "[a-zA-Z0-9._+ſßẞÀ-ɏͅΣςσ\u{0300}-\u{036F}\u{FF21}-\u{FF5A}İ]{1,20}",
            domain in "[a-zA-Z0-9\u{00C0}-\u{017F}ſß-]{1,20}\\.[a-zA-Z\u{00E0}-\u{00FF}]{2,6}",
        ) {
            if let Ok(once) = ContactEmail::parse(&format!("{local}@{domain}")) {
                let twice = ContactEmail::parse(once.as_str());
                proptest::prop_assert_eq!(Ok(once), twice);
            }
        }
    }

    #[test]
    fn an_email_given_as_json_input_is_held_to_the_strict_rules() {
        let strict = serde_json::from_value::<ContactEmail>(json!("bob@123.123"));
        assert!(strict.is_err());
        let normalised = serde_json::from_value::<ContactEmail>(json!("\"Bob\"@Bücher.de"));
        assert_eq!(normalised.unwrap().as_str(), "bob@xn--bcher-kva.de");
    }

    #[test]
    fn a_stored_email_that_the_rules_now_refuse_or_rewrite_still_loads_as_written() {
        for stored in [
            "bob@123.123",
            "bob@example.c",
            "ｂｏｂ@example.com",
            "\"bob\"@example.com",
            "bob@bücher.de",
        ] {
            // Given an event and a snapshot written by an earlier release,
            let mut event = serde_json::to_value(created()).unwrap();
            event["ContactCreated"]["email"] = json!(stored);
            let mut snapshot = serde_json::to_value(state_after(vec![created()])).unwrap();
            snapshot["email"] = json!(stored);
            // when they are loaded,
            let event: ContactEvent = serde_json::from_value(event)
                .unwrap_or_else(|e| panic!("event with {stored:?}: {e}"));
            let snapshot: Contact = serde_json::from_value(snapshot)
                .unwrap_or_else(|e| panic!("snapshot with {stored:?}: {e}"));
            // then the email is the stored text, unchanged, and writes back the same.
            let ContactEvent::ContactCreated { email, .. } = &event else {
                panic!("{event:?}")
            };
            assert_eq!(email.as_str(), stored);
            assert_eq!(
                snapshot.email.as_ref().map(ContactEmail::as_str),
                Some(stored)
            );
            assert_eq!(
                serde_json::to_value(&event).unwrap()["ContactCreated"]["email"],
                stored
            );
            assert_eq!(state_after(vec![event]).email, snapshot.email);
        }
        let empty: Contact =
            serde_json::from_value(serde_json::to_value(Contact::default()).unwrap()).unwrap();
        assert_eq!(empty.email, None);
    }

    #[test]
    fn the_contact_id_depends_on_the_key_and_is_a_version_8_uuid() {
        let email = email();
        let a = contact_id_for(b"key one", &email);
        let b = contact_id_for(b"key two", &email);
        assert_ne!(a, b);
        assert_eq!(a.get_version_num(), 8);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        // Stable across releases: stored streams are found by this id.
        assert_eq!(a, contact_id_for(b"key one", &email));
    }

    #[test]
    fn text_fields_are_trimmed_and_limited_to_200_characters() {
        assert_eq!(FirstName::parse("  Jane ").unwrap().as_str(), "Jane");
        assert!(Title::parse(&"x".repeat(200)).is_ok());
        assert_eq!(
            Title::parse(&"x".repeat(201)),
            Err(invalid("title", "must be at most 200 characters"))
        );
        assert_eq!(
            LastName::parse("   "),
            Err(invalid("last_name", "must not be empty"))
        );
        assert_eq!(
            Company::parse("Ac\u{0000}me"),
            Err(invalid("company", "must not contain control characters"))
        );
    }

    #[test]
    fn a_company_domain_must_look_like_a_domain() {
        assert_eq!(
            CompanyDomain::parse(" Acme.CO.uk ").unwrap().as_str(),
            "acme.co.uk"
        );
        assert!(CompanyDomain::parse("xn--mller-kva.de").is_ok());
        for bad in [
            "acme",
            "acme.",
            ".acme.com",
            "-acme.com",
            "acme-.com",
            "ac me.com",
            "https://acme.com",
            "10.0.0.1",
            "acme.c",
            "müller.de",
        ] {
            assert!(
                matches!(
                    CompanyDomain::parse(bad),
                    Err(ContactError::InvalidField {
                        field: "company_domain",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        let long = format!("{}.com", vec!["a".repeat(63); 4].join("."));
        assert!(long.len() > 253);
        assert!(CompanyDomain::parse(&long).is_err());
    }

    #[test]
    fn a_phone_is_kept_as_written_when_it_looks_like_a_number() {
        assert_eq!(
            Phone::parse("+44 (0)20 7946 0958").unwrap().as_str(),
            "+44 (0)20 7946 0958"
        );
        assert!(Phone::parse("555-1234 ext. 12").is_ok());
        assert!(Phone::parse("555.1234 x12").is_ok());
        assert!(Phone::parse("call me").is_err());
        assert!(Phone::parse("+++").is_err());
        assert!(Phone::parse(&"1".repeat(51)).is_err());
    }

    #[test]
    fn a_linkedin_url_must_be_an_http_url_of_at_most_500_characters() {
        assert!(LinkedinUrl::parse("https://www.linkedin.com/in/jane-doe").is_ok());
        assert!(LinkedinUrl::parse("http://linkedin.com/in/jane").is_ok());
        for bad in [
            "linkedin.com/in/jane",
            "ftp://linkedin.com/in/jane",
            "javascript:alert(1)",
            "https://",
            "https://linkedin.com/in/ja ne",
        ] {
            assert!(LinkedinUrl::parse(bad).is_err(), "{bad}");
        }
        let long = format!("https://linkedin.com/in/{}", "a".repeat(480));
        assert!(LinkedinUrl::parse(&long).is_err());
    }

    #[test]
    fn custom_fields_are_limited_in_count_key_and_value_length() {
        let map = |pairs: Vec<(String, String)>| pairs.into_iter().collect::<BTreeMap<_, _>>();
        assert!(CustomFields::parse(map(vec![("plan".into(), "pro".into())])).is_ok());
        let fifty_one = (0..51)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert!(CustomFields::parse(map(fifty_one)).is_err());
        assert!(CustomFields::parse(map(vec![("x".repeat(101), "v".into())])).is_err());
        assert!(CustomFields::parse(map(vec![(" ".into(), "v".into())])).is_err());
        assert!(CustomFields::parse(map(vec![("k".into(), "v".repeat(1001))])).is_err());
        assert!(CustomFields::parse(map(vec![("k".into(), "a\u{0007}b".into())])).is_err());
        assert!(CustomFields::parse(map(vec![("k".into(), "v".repeat(1000))])).is_ok());
    }

    #[test]
    fn a_quality_score_is_a_finite_number_from_0_to_1() {
        assert!(QualityScore::new(0.0).is_ok());
        assert!(QualityScore::new(1.0).is_ok());
        assert_eq!(QualityScore::new(-0.0).unwrap().value().to_string(), "0");
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.01, 1.01] {
            assert!(QualityScore::new(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_value::<QualityScore>(json!(1.5)).is_err());
    }

    #[test]
    fn parsing_fields_reports_every_invalid_field_by_name() {
        let errors = ContactFields::parse(ContactFieldsInput {
            first_name: Some("Jane".into()),
            phone: Some("not a phone".into()),
            linkedin_url: Some("nope".into()),
            ..ContactFieldsInput::default()
        })
        .unwrap_err();
        let names: Vec<_> = errors
            .iter()
            .map(|e| match e {
                ContactError::InvalidField { field, .. } => *field,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["phone", "linkedin_url"]);
        let ok = ContactFields::parse(ContactFieldsInput {
            first_name: Some(" Jane ".into()),
            ..ContactFieldsInput::default()
        })
        .unwrap();
        assert_eq!(ok.first_name.unwrap().as_str(), "Jane");
    }

    #[test]
    fn upserting_a_new_email_creates_the_contact_with_the_given_fields() {
        Given::with(())
            .given_no_previous_events()
            .when(ContactCommand::Upsert {
                email: email(),
                fields: fields("Jane", "Acme"),
                at: at(),
            })
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn upserting_a_known_email_records_only_the_fields_that_change() {
        Given::with(())
            .given(vec![created()])
            .when(ContactCommand::Upsert {
                email: email(),
                fields: ContactFields {
                    title: Some(Title::parse("CTO").unwrap()),
                    ..fields("Jane", "Acme Inc")
                },
                at: later(),
            })
            .then_expect_events(vec![ContactEvent::ContactUpdated {
                changes: ContactFields {
                    company: Some(Company::parse("Acme Inc").unwrap()),
                    title: Some(Title::parse("CTO").unwrap()),
                    ..ContactFields::default()
                },
                updated_at: later(),
            }]);
    }

    #[test]
    fn upserting_a_known_email_with_nothing_new_records_nothing() {
        Given::with(())
            .given(vec![created()])
            .when(ContactCommand::Upsert {
                email: email(),
                fields: fields("Jane", "Acme"),
                at: later(),
            })
            .then_expect_events(vec![]);
        Given::with(())
            .given(vec![created()])
            .when(ContactCommand::Upsert {
                email: email(),
                fields: ContactFields::default(),
                at: later(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn upserting_another_email_onto_an_existing_stream_is_refused() {
        Given::with(())
            .given(vec![created()])
            .when(ContactCommand::Upsert {
                email: ContactEmail::parse("john@example.com").unwrap(),
                fields: ContactFields::default(),
                at: later(),
            })
            .then_expect_error(ContactError::EmailMismatch);
    }

    #[test]
    fn fields_left_out_of_an_update_are_kept() {
        let contact = state_after(vec![
            created(),
            ContactEvent::ContactUpdated {
                changes: ContactFields {
                    company: Some(Company::parse("Globex").unwrap()),
                    ..ContactFields::default()
                },
                updated_at: later(),
            },
        ]);
        assert!(contact.created);
        assert_eq!(contact.first_name.unwrap().as_str(), "Jane");
        assert_eq!(contact.company.unwrap().as_str(), "Globex");
        assert_eq!(contact.created_at, Some(at()));
        assert_eq!(contact.updated_at, Some(later()));
    }

    #[test]
    fn updating_a_contact_that_does_not_exist_is_not_found() {
        Given::with(())
            .given_no_previous_events()
            .when(ContactCommand::Update {
                fields: fields("Jane", "Acme"),
                at: at(),
            })
            .then_expect_error(ContactError::NotFound);
    }

    #[test]
    fn updating_replaces_custom_fields_as_a_whole() {
        let custom = |pairs: &[(&str, &str)]| {
            CustomFields::parse(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
            .unwrap()
        };
        let given = vec![ContactEvent::ContactCreated {
            email: email(),
            fields: ContactFields {
                custom: Some(custom(&[("plan", "pro"), ("seats", "5")])),
                ..ContactFields::default()
            },
            created_at: at(),
        }];
        Given::with(())
            .given(given.clone())
            .when(ContactCommand::Update {
                fields: ContactFields {
                    custom: Some(custom(&[("plan", "pro"), ("seats", "5")])),
                    ..ContactFields::default()
                },
                at: later(),
            })
            .then_expect_events(vec![]);
        let change = ContactEvent::ContactUpdated {
            changes: ContactFields {
                custom: Some(custom(&[("plan", "team")])),
                ..ContactFields::default()
            },
            updated_at: later(),
        };
        Given::with(())
            .given(given.clone())
            .when(ContactCommand::Update {
                fields: ContactFields {
                    custom: Some(custom(&[("plan", "team")])),
                    ..ContactFields::default()
                },
                at: later(),
            })
            .then_expect_events(vec![change.clone()]);
        let mut all = given;
        all.push(change);
        assert_eq!(state_after(all).custom, custom(&[("plan", "team")]));
    }

    #[test]
    fn recording_an_enrichment_keeps_its_data_score_and_sources() {
        let score = QualityScore::new(0.8).unwrap();
        let recorded = ContactEvent::EnrichmentRecorded {
            data: json!({"seniority": "senior"}),
            quality_score: score,
            sources: vec!["clearbit".into()],
            enriched_at: later(),
        };
        Given::with(())
            .given(vec![created()])
            .when(ContactCommand::RecordEnrichment {
                data: json!({"seniority": "senior"}),
                quality_score: score,
                sources: vec![" clearbit ".into()],
                at: later(),
            })
            .then_expect_events(vec![recorded.clone()]);
        let contact = state_after(vec![created(), recorded]);
        let enrichment = contact.enrichment.unwrap();
        assert_eq!(enrichment.data["seniority"], "senior");
        assert_eq!(enrichment.quality_score.value(), 0.8);
        assert_eq!(enrichment.enriched_at, later());
    }

    #[test]
    fn enrichment_data_must_be_an_object_and_the_contact_must_exist() {
        let command = |data| ContactCommand::RecordEnrichment {
            data,
            quality_score: QualityScore::new(0.5).unwrap(),
            sources: vec![],
            at: at(),
        };
        Given::with(())
            .given(vec![created()])
            .when(command(json!(["not", "an", "object"])))
            .then_expect_error(invalid("data", "must be a JSON object"));
        Given::with(())
            .given(vec![created()])
            .when(command(json!({"nested": {"key": "a\u{0}b"}})))
            .then_expect_error(invalid("data", NUL_IN_DATA));
        Given::with(())
            .given_no_previous_events()
            .when(command(json!({})))
            .then_expect_error(ContactError::NotFound);
        Given::with(())
            .given(vec![created()])
            .when(ContactCommand::RecordEnrichment {
                data: json!({}),
                quality_score: QualityScore::new(0.5).unwrap(),
                sources: vec!["".into()],
                at: at(),
            })
            .then_expect_error(invalid("sources", "must not be empty"));
    }

    #[test]
    fn events_keep_their_stored_type_names_and_omit_absent_fields() {
        assert_eq!(created().event_type(), "ContactCreated");
        assert_eq!(created().event_version(), "1.0");
        let json = serde_json::to_value(created()).unwrap();
        let fields = &json["ContactCreated"]["fields"];
        assert_eq!(fields, &json!({"first_name": "Jane", "company": "Acme"}));
        let back: ContactEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, created());
    }
}
