//! Provider sources, the pure core: which kinds of sender there are, what is stored to
//! authenticate each ([`Credentials`]), how a delivery is authenticated ([`authenticate`])
//! and how its body becomes provider events ([`parse`]).
//!
//! Nothing here does I/O: the ingestion path loads the credentials, builds a [`Delivery`]
//! from the request, and records what [`Authenticated`] says must be recorded (a Mailgun
//! token is accepted once). Each parsed event names its [`Target`]; resolving it to an
//! enrollment (our ids, or a campaign's `external_ids` for engagement tools) is the
//! caller's, as is refusing an `occurred_at` too far in the future.

mod auth;
mod custom;
mod parse;

use aggregates::enrollment::{MAX_EXTERNAL_EVENT_ID_CHARS, ProviderEventKind, check_event_id};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub use auth::{
    AuthError, Authenticated, authenticate, sendgrid_public_key_der, standard_key, standard_mac,
    standard_signature,
};
pub use custom::CustomMapping;
pub use parse::{BodyError, Parsed, parse};

/// The most events one delivery may carry, as for Standard Webhooks sources.
pub const MAX_EVENTS: usize = 1000;
/// A signed timestamp further than this from now, either way, is refused (replays).
pub const TOLERANCE_SECS: u64 = 300;

/// How deliveries to a source are authenticated and read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKind {
    Standard,
    Sendgrid,
    Mailgun,
    Postmark,
    Instantly,
    Smartlead,
    Custom,
}

impl SourceKind {
    pub const ALL: [SourceKind; 7] = [
        Self::Standard,
        Self::Sendgrid,
        Self::Mailgun,
        Self::Postmark,
        Self::Instantly,
        Self::Smartlead,
        Self::Custom,
    ];

    /// The `kind` text of the API; `None` for a kind this system does not know.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Sendgrid => "sendgrid",
            Self::Mailgun => "mailgun",
            Self::Postmark => "postmark",
            Self::Instantly => "instantly",
            Self::Smartlead => "smartlead",
            Self::Custom => "custom",
        }
    }
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a source keeps to authenticate its deliveries (stored encrypted elsewhere).
/// `Debug` is written by hand so that no secret reaches a log.
#[derive(Clone, PartialEq)]
pub enum Credentials {
    /// The HMAC key: the base64-decoded part of `whsec_…`.
    Standard {
        key: Vec<u8>,
    },
    /// SendGrid's verification key, as DER SubjectPublicKeyInfo bytes (see
    /// [`sendgrid_public_key_der`] to read what SendGrid shows).
    Sendgrid {
        public_key_der: Vec<u8>,
    },
    /// Mailgun's HTTP webhook signing key, as Mailgun shows it (its text is the HMAC key).
    Mailgun {
        signing_key: String,
    },
    /// The HTTP Basic credentials Postmark is told to send.
    Postmark {
        username: String,
        password: String,
    },
    Instantly {
        token: String,
    },
    Smartlead {
        token: String,
    },
    Custom {
        token: String,
        mapping: CustomMapping,
    },
}

impl Credentials {
    pub fn kind(&self) -> SourceKind {
        match self {
            Self::Standard { .. } => SourceKind::Standard,
            Self::Sendgrid { .. } => SourceKind::Sendgrid,
            Self::Mailgun { .. } => SourceKind::Mailgun,
            Self::Postmark { .. } => SourceKind::Postmark,
            Self::Instantly { .. } => SourceKind::Instantly,
            Self::Smartlead { .. } => SourceKind::Smartlead,
            Self::Custom { .. } => SourceKind::Custom,
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A public key is no secret, but nothing is gained by printing it either.
        write!(f, "Credentials::{}(…)", self.kind())
    }
}

/// One HTTP delivery, as the ingestion path hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// Header (name, value) pairs; names in lower case (HTTP header names are
    /// case-insensitive; they are compared ignoring ASCII case all the same).
    pub headers: &'a [(String, String)],
    /// The raw query string, without the `?` (empty when there is none).
    pub query: &'a str,
    /// The raw body bytes, exactly as received: signatures cover these.
    pub body: &'a [u8],
    /// The time of receipt, Unix seconds.
    pub now: i64,
}

impl Delivery<'_> {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first value of a query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// Whom an event is about, as the event says it; resolving it is the caller's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Our `leadledger_enrollment_id`.
    Enrollment(Uuid),
    /// Our `leadledger_campaign_id` with the event's recipient.
    CampaignEmail { campaign: Uuid, email: String },
    /// An engagement tool's own campaign id (linked by a campaign's `external_ids` under
    /// the source's name) with the lead's email.
    External {
        their_campaign: String,
        email: String,
    },
    /// The event carries none of our ids (a message not sent through us).
    Unknown,
}

/// One event of a delivery, in our terms.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderEvent {
    /// The provider's event id, or one derived from the event's fields when the provider
    /// gives none (so a redelivery derives the same id and is a duplicate). It passes
    /// `check_event_id(_, MAX_EXTERNAL_EVENT_ID_CHARS)`.
    pub id: String,
    /// The milestone; `None` for a type that carries none (the outcome `ignored`).
    pub kind: Option<ProviderEventKind>,
    /// The provider's own type name, for the record and for reasons.
    pub provider_type: String,
    pub occurred_at: DateTime<Utc>,
    pub target: Target,
}

/// A provider event id as the enrollment will take it, or the reason it is refused.
fn checked_id(id: &str, field: &str) -> Result<String, String> {
    check_event_id(id, MAX_EXTERNAL_EVENT_ID_CHARS)
        .map(|()| id.to_string())
        .map_err(|reason| format!("{field} {reason}"))
}

/// A stable id for providers that give none: a hex SHA-256 prefix of the given fields,
/// each length-prefixed so that ("ab", "c") and ("a", "bc") differ. 128 bits: no two
/// distinct events collide in practice.
fn derived_id(kind: SourceKind, parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    hash.update(kind.as_str().as_bytes());
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    format!("{}-{}", kind.as_str(), hex::encode(&digest[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_text() {
        for kind in SourceKind::ALL {
            assert_eq!(SourceKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(SourceKind::parse("Sendgrid"), None);
        assert_eq!(SourceKind::parse(""), None);
    }

    #[test]
    fn credentials_never_print_their_secrets() {
        let c = Credentials::Postmark {
            username: "user".into(),
            password: "hunter2".into(),
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("user"),
            "{shown}"
        );
    }

    #[test]
    fn derived_ids_are_stable_distinct_and_valid() {
        let a = derived_id(SourceKind::Instantly, &["ab", "c"]);
        assert_eq!(a, derived_id(SourceKind::Instantly, &["ab", "c"]));
        assert_ne!(a, derived_id(SourceKind::Instantly, &["a", "bc"]));
        assert_ne!(a, derived_id(SourceKind::Smartlead, &["ab", "c"]));
        assert!(check_event_id(&a, MAX_EXTERNAL_EVENT_ID_CHARS).is_ok());
    }

    #[test]
    fn headers_are_found_whatever_their_case_and_query_values_are_decoded() {
        let headers = vec![("authorization".to_string(), "Bearer x".to_string())];
        let d = Delivery {
            headers: &headers,
            query: "a=1&token=t%2Bk+n",
            body: b"",
            now: 0,
        };
        assert_eq!(d.header("Authorization"), Some("Bearer x"));
        assert_eq!(d.query_param("token").as_deref(), Some("t+k n"));
        assert_eq!(d.query_param("missing"), None);
    }
}
