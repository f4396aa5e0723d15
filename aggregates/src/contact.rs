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

/// A contact's email, trimmed and lower-cased, at most 254 characters, a plain address
/// (no display name, no IP literal, a domain with at least two labels).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContactEmail(String);

impl ContactEmail {
    pub const MAX_CHARS: usize = 254;
    const FIELD: &'static str = "email";

    pub fn parse(raw: &str) -> Result<Self, ContactError> {
        let normalised = raw.trim().to_lowercase();
        if normalised.is_empty() {
            return Err(invalid(Self::FIELD, "must not be empty"));
        }
        if normalised.chars().count() > Self::MAX_CHARS {
            return Err(invalid(
                Self::FIELD,
                format!("must be at most {} characters", Self::MAX_CHARS),
            ));
        }
        // The crate accepts quoted local parts with spaces and comments; an address with
        // whitespace or control characters is far likelier a paste error than intended.
        if normalised
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(invalid(
                Self::FIELD,
                "must not contain spaces or control characters",
            ));
        }
        let options = email_address::Options::default()
            .with_minimum_sub_domains(2)
            .without_domain_literal()
            .without_display_text();
        email_address::EmailAddress::parse_with_options(&normalised, options)
            .map_err(|e| invalid(Self::FIELD, format!("is not a valid address: {e}")))?;
        Ok(Self(normalised))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
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
/// Why enrichment data holding a NUL character is refused.
pub const NUL_IN_DATA: &str = "must not contain NUL characters (\\u0000) in any key or string";
pub const MAX_ENRICHMENT_SOURCE_CHARS: usize = 200;

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ContactEvent {
    ContactCreated {
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
}

impl DomainEvent for ContactEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ContactCreated { .. } => "ContactCreated",
            Self::ContactUpdated { .. } => "ContactUpdated",
            Self::EnrichmentRecorded { .. } => "EnrichmentRecorded",
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
        let event = match command {
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
