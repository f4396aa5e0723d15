//! Reading a delivery's body into provider events, per source kind, with each provider's
//! own field names and its event types mapped to our milestones (each reader below says
//! how).
//!
//! A body that cannot be read at all is a [`BodyError`]; past that, each event stands
//! alone: a bad one is an `Err(reason)` in its place and the rest of the batch counts.

use aggregates::enrollment::ProviderEventKind::{self, *};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::{Credentials, MAX_EVENTS, ProviderEvent, SourceKind, Target, checked_id, derived_id};

/// One event of a delivery: read, or the reason it is rejected.
pub type Parsed = Result<ProviderEvent, String>;

/// Why a whole body is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    /// serde_json's recursion limit: nesting no provider sends.
    #[error("the body is nested too deeply")]
    TooDeep,
    #[error("{0}")]
    Shape(String),
    #[error("{0} events in one delivery; at most 1000")]
    TooManyEvents(usize),
    #[error("a custom source needs its mapping")]
    NoMapping,
}

/// Reads a body for a source of `kind`; `credentials` give a custom source's mapping.
pub fn parse(
    kind: SourceKind,
    credentials: &Credentials,
    body: &[u8],
) -> Result<Vec<Parsed>, BodyError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        // serde_json stops at 128 levels; its message is the only way to tell.
        if e.to_string().starts_with("recursion limit exceeded") {
            BodyError::TooDeep
        } else {
            BodyError::NotJson(e.to_string())
        }
    })?;
    match kind {
        SourceKind::Standard => Ok(event_list(&value)?.iter().map(standard).collect()),
        SourceKind::Sendgrid => match &value {
            Value::Array(events) => {
                within_limit(events)?;
                Ok(events.iter().map(sendgrid).collect())
            }
            _ => Err(BodyError::Shape(
                "a SendGrid body is an array of events".into(),
            )),
        },
        SourceKind::Mailgun => match value.get("event-data") {
            Some(event) if event.is_object() => Ok(vec![mailgun(event)]),
            _ => Err(BodyError::Shape(
                "a Mailgun body is an object with an \"event-data\" object".into(),
            )),
        },
        SourceKind::Postmark => Ok(event_list(&value)?.iter().map(postmark).collect()),
        SourceKind::Instantly => Ok(event_list(&value)?.iter().map(instantly).collect()),
        SourceKind::Smartlead => Ok(event_list(&value)?.iter().map(smartlead).collect()),
        SourceKind::Custom => match credentials {
            Credentials::Custom { mapping, .. } => mapping.events(&value),
            _ => Err(BodyError::NoMapping),
        },
    }
}

fn within_limit(events: &[Value]) -> Result<(), BodyError> {
    if events.len() > MAX_EVENTS {
        return Err(BodyError::TooManyEvents(events.len()));
    }
    Ok(())
}

/// A body that is one event (an object) or an array of at most [`MAX_EVENTS`].
pub(super) fn event_list(body: &Value) -> Result<&[Value], BodyError> {
    match body {
        Value::Array(events) => within_limit(events).map(|()| events.as_slice()),
        Value::Object(_) => Ok(std::slice::from_ref(body)),
        _ => Err(BodyError::Shape(
            "the body must be one event (an object) or an array of events".into(),
        )),
    }
}

fn object(event: &Value) -> Result<&Map<String, Value>, String> {
    event
        .as_object()
        .ok_or_else(|| "an event must be a JSON object".to_string())
}

fn text<'a>(o: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    o.get(name).and_then(Value::as_str)
}

fn required<'a>(o: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    text(o, name).ok_or_else(|| format!("{name} (a string) is required"))
}

/// An id that may be a string or a number (Smartlead's campaign ids are numbers).
fn id_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Unix seconds, whole or fractional; `None` out of range or not a plain number.
fn unix_seconds(value: &Value) -> Option<DateTime<Utc>> {
    let Value::Number(number) = value else {
        return None;
    };
    if let Some(secs) = number.as_i64() {
        return DateTime::from_timestamp(secs, 0);
    }
    // Fractional seconds are read from the number's decimal text: f64 arithmetic would
    // lose the last microsecond digit of Mailgun's `1521233195.375624`.
    let text = number.to_string();
    let (whole, fraction) = text.split_once('.')?;
    if fraction.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None; // An exponent form: no provider sends one.
    }
    let whole: i64 = whole.parse().ok()?;
    let digits: String = fraction
        .chars()
        .chain(std::iter::repeat('0'))
        .take(9)
        .collect();
    let nanos: i64 = digits.parse().ok()?;
    // -1.25 is -2 s + 0.75 s.
    let (secs, nanos) = if text.starts_with('-') && nanos > 0 {
        (whole.checked_sub(1)?, 1_000_000_000 - nanos)
    } else {
        (whole, nanos)
    };
    DateTime::from_timestamp(secs, u32::try_from(nanos).ok()?)
}

fn rfc3339(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A time given as RFC 3339 text or as Unix seconds.
pub(super) fn unix_or_rfc3339(value: &Value) -> Option<DateTime<Utc>> {
    match value {
        Value::String(s) => rfc3339(s),
        Value::Number(_) => unix_seconds(value),
        _ => None,
    }
}

/// Our ids from an email provider's custom metadata: `leadledger_enrollment_id`, or
/// `leadledger_campaign_id` with the event's recipient; none at all is `Unknown`.
fn metadata_target(metadata: Option<&Value>, recipient: Option<&str>) -> Result<Target, String> {
    let field = |name: &str| metadata.and_then(|m| m.get(name));
    if let Some(raw) = field("leadledger_enrollment_id") {
        return raw
            .as_str()
            .and_then(|s| Uuid::parse_str(s.trim()).ok())
            .map(Target::Enrollment)
            .ok_or_else(|| "leadledger_enrollment_id is not a UUID".into());
    }
    if let Some(raw) = field("leadledger_campaign_id") {
        let campaign = raw
            .as_str()
            .and_then(|s| Uuid::parse_str(s.trim()).ok())
            .ok_or("leadledger_campaign_id is not a UUID")?;
        let email = recipient.ok_or("leadledger_campaign_id needs the recipient's email")?;
        return Ok(Target::CampaignEmail {
            campaign,
            email: email.to_string(),
        });
    }
    Ok(Target::Unknown)
}

/// An engagement tool's campaign id and lead email, as an `External` target.
fn external_target(
    o: &Map<String, Value>,
    campaign_field: &str,
    email: Option<&str>,
) -> Result<Target, String> {
    match (id_text(o.get(campaign_field)), email) {
        (Some(their_campaign), Some(email)) => Ok(Target::External {
            their_campaign,
            email: email.to_string(),
        }),
        _ => Err(format!(
            "{campaign_field} and the lead's email are required"
        )),
    }
}

/// An event of an ignored type is reported as `ignored` whatever it names; only a
/// milestone needs a target that reads.
fn settle(
    target: Result<Target, String>,
    kind: Option<ProviderEventKind>,
) -> Result<Target, String> {
    match (target, kind) {
        (Err(_), None) => Ok(Target::Unknown),
        (target, _) => target,
    }
}

/// Our own format (the README's section "Webhooks"): `{id, type, occurred_at, enrollment_id}` or
/// `campaign_id` + `email` in place of `enrollment_id`. A type we do not know is
/// rejected here, not ignored: the sender chose our names.
fn standard(event: &Value) -> Parsed {
    let o = object(event)?;
    let id = checked_id(required(o, "id")?, "id")?;
    let provider_type = required(o, "type")?;
    let kind = ProviderEventKind::parse(provider_type).ok_or(
        "type must be one of sent, delivered, opened, clicked, replied, bounced, soft_bounced, deferred, unsubscribed, complained",
    )?;
    let occurred_at = text(o, "occurred_at")
        .and_then(rfc3339)
        .ok_or("occurred_at must be an RFC 3339 time")?;
    let target = match text(o, "enrollment_id") {
        Some(raw) => {
            Target::Enrollment(Uuid::parse_str(raw).map_err(|_| "enrollment_id must be a UUID")?)
        }
        None => {
            let campaign = text(o, "campaign_id")
                .and_then(|c| Uuid::parse_str(c).ok())
                .ok_or("campaign_id (a UUID) and email, or enrollment_id, are required")?;
            let email = required(o, "email")?;
            Target::CampaignEmail {
                campaign,
                email: email.to_string(),
            }
        }
    };
    Ok(ProviderEvent {
        id,
        kind: Some(kind),
        provider_type: provider_type.to_string(),
        occurred_at,
        target,
    })
}

/// SendGrid Event Webhook: one element of the body's array. `custom_args` are members
/// of the event itself.
fn sendgrid(event: &Value) -> Parsed {
    let o = object(event)?;
    let provider_type = required(o, "event")?;
    let kind = match provider_type {
        "processed" => Some(Sent),
        "delivered" => Some(Delivered),
        "open" => Some(Opened),
        "click" => Some(Clicked),
        // A block is the receiving server refusing for now (reputation, content); it
        // says nothing final about the address.
        "bounce" if text(o, "type") == Some("blocked") => Some(SoftBounced),
        "bounce" => Some(Bounced),
        "deferred" => Some(Deferred),
        "spamreport" => Some(Complained),
        "unsubscribe" | "group_unsubscribe" => Some(Unsubscribed),
        _ => None,
    };
    let id = checked_id(required(o, "sg_event_id")?, "sg_event_id")?;
    let occurred_at = o
        .get("timestamp")
        .and_then(unix_seconds)
        .ok_or("timestamp (Unix seconds) is required")?;
    let target = settle(metadata_target(Some(event), text(o, "email")), kind)?;
    Ok(ProviderEvent {
        id,
        kind,
        provider_type: provider_type.to_string(),
        occurred_at,
        target,
    })
}

/// Mailgun: the body's `event-data`.
fn mailgun(event: &Value) -> Parsed {
    let o = object(event)?;
    let provider_type = required(o, "event")?;
    let kind = match provider_type {
        "accepted" => Some(Sent),
        "delivered" => Some(Delivered),
        "opened" => Some(Opened),
        "clicked" => Some(Clicked),
        "failed" if text(o, "severity") == Some("permanent") => Some(Bounced),
        "failed" => Some(SoftBounced),
        "complained" => Some(Complained),
        "unsubscribed" => Some(Unsubscribed),
        _ => None,
    };
    let id = checked_id(required(o, "id")?, "event-data.id")?;
    let occurred_at = o
        .get("timestamp")
        .and_then(unix_seconds)
        .ok_or("event-data.timestamp (Unix seconds) is required")?;
    let target = settle(
        metadata_target(o.get("user-variables"), text(o, "recipient")),
        kind,
    )?;
    Ok(ProviderEvent {
        id,
        kind,
        provider_type: provider_type.to_string(),
        occurred_at,
        target,
    })
}

/// Postmark: one record, by `RecordType`. Postmark gives no event id, so one is derived
/// from (RecordType, MessageID, the record's time text, recipient): a redelivery of the
/// record derives the same.
fn postmark(event: &Value) -> Parsed {
    let o = object(event)?;
    let record_type = required(o, "RecordType")?;
    let (kind, time_field) = match record_type {
        "Delivery" => (Some(Delivered), "DeliveredAt"),
        "Open" => (Some(Opened), "ReceivedAt"),
        "Click" => (Some(Clicked), "ReceivedAt"),
        "Bounce" if text(o, "Type") == Some("HardBounce") => (Some(Bounced), "BouncedAt"),
        "Bounce" => (Some(SoftBounced), "BouncedAt"),
        "SpamComplaint" => (Some(Complained), "BouncedAt"),
        "SubscriptionChange" if o.get("SuppressSending") == Some(&Value::Bool(true)) => {
            (Some(Unsubscribed), "ChangedAt")
        }
        "SubscriptionChange" => (None, "ChangedAt"),
        // A record type we do not read: its time is whichever of the usual fields it has.
        _ => (
            None,
            ["ReceivedAt", "DeliveredAt", "BouncedAt", "ChangedAt"]
                .into_iter()
                .find(|f| o.contains_key(*f))
                .unwrap_or("ReceivedAt"),
        ),
    };
    let time_text = required(o, time_field)?;
    let occurred_at =
        rfc3339(time_text).ok_or_else(|| format!("{time_field} is not an RFC 3339 time"))?;
    // Bounces and complaints name the address `Email`; the other records `Recipient`.
    let recipient = match record_type {
        "Bounce" | "SpamComplaint" => text(o, "Email").or_else(|| text(o, "Recipient")),
        _ => text(o, "Recipient").or_else(|| text(o, "Email")),
    };
    let message_id = text(o, "MessageID").unwrap_or_default();
    let id = derived_id(
        SourceKind::Postmark,
        &[
            record_type,
            message_id,
            time_text,
            recipient.unwrap_or_default(),
        ],
    );
    let target = settle(metadata_target(o.get("Metadata"), recipient), kind)?;
    Ok(ProviderEvent {
        id,
        kind,
        provider_type: record_type.to_string(),
        occurred_at,
        target,
    })
}

/// Instantly: `event_type`, `timestamp`, `campaign_id` + `lead_email`. Instantly gives no
/// event id; one is derived from (event_type, campaign_id, lead_email, timestamp).
fn instantly(event: &Value) -> Parsed {
    let o = object(event)?;
    let provider_type = required(o, "event_type")?;
    let kind = match provider_type {
        "email_sent" => Some(Sent),
        "email_opened" => Some(Opened),
        "link_clicked" | "email_link_clicked" => Some(Clicked),
        "reply_received" => Some(Replied),
        "email_bounced" => Some(Bounced),
        "lead_unsubscribed" => Some(Unsubscribed),
        _ => None,
    };
    let time_text = required(o, "timestamp")?;
    let occurred_at = rfc3339(time_text).ok_or("timestamp is not an RFC 3339 time")?;
    let email = text(o, "lead_email");
    let campaign = id_text(o.get("campaign_id")).unwrap_or_default();
    let id = derived_id(
        SourceKind::Instantly,
        &[
            provider_type,
            &campaign,
            email.unwrap_or_default(),
            time_text,
        ],
    );
    let target = settle(external_target(o, "campaign_id", email), kind)?;
    Ok(ProviderEvent {
        id,
        kind,
        provider_type: provider_type.to_string(),
        occurred_at,
        target,
    })
}

/// Smartlead: `event_type`, `event_timestamp`, `campaign_id` + `to_email` (`lead_email`
/// in its unsubscribe payloads). Smartlead gives no event id (`webhook_id` names the
/// webhook, not the event); one is derived from (event_type, campaign_id, email,
/// event_timestamp).
fn smartlead(event: &Value) -> Parsed {
    let o = object(event)?;
    let provider_type = required(o, "event_type")?;
    let kind = match provider_type {
        "EMAIL_SENT" => Some(Sent),
        "EMAIL_OPEN" | "EMAIL_OPENED" => Some(Opened),
        "EMAIL_LINK_CLICK" | "EMAIL_LINK_CLICKED" => Some(Clicked),
        "EMAIL_REPLY" | "EMAIL_REPLIED" => Some(Replied),
        "EMAIL_BOUNCE" | "EMAIL_BOUNCED" => Some(Bounced),
        "LEAD_UNSUBSCRIBED" => Some(Unsubscribed),
        _ => None,
    };
    let time_text = required(o, "event_timestamp")?;
    let occurred_at = rfc3339(time_text).ok_or("event_timestamp is not an RFC 3339 time")?;
    let email = text(o, "to_email").or_else(|| text(o, "lead_email"));
    let campaign = id_text(o.get("campaign_id")).unwrap_or_default();
    let id = derived_id(
        SourceKind::Smartlead,
        &[
            provider_type,
            &campaign,
            email.unwrap_or_default(),
            time_text,
        ],
    );
    let target = settle(external_target(o, "campaign_id", email), kind)?;
    Ok(ProviderEvent {
        id,
        kind,
        provider_type: provider_type.to_string(),
        occurred_at,
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::CustomMapping;
    use proptest::prelude::*;
    use serde_json::json;

    const ENROLLMENT: &str = "0190a4d2-6c1e-7b3a-9f00-0000000000e1";
    const CAMPAIGN: &str = "0190a4d2-6c1e-7b3a-9f00-0000000000c1";

    fn t(s: &str) -> DateTime<Utc> {
        rfc3339(s).unwrap()
    }

    fn none() -> Credentials {
        Credentials::Instantly {
            token: String::new(),
        }
    }

    fn read(kind: SourceKind, body: &Value) -> Vec<Parsed> {
        parse(kind, &none(), &serde_json::to_vec(body).unwrap()).unwrap()
    }

    fn ok(p: &Parsed) -> &ProviderEvent {
        p.as_ref().unwrap_or_else(|e| panic!("rejected: {e}"))
    }

    // --- Standard -----------------------------------------------------------------

    #[test]
    fn standard_events_read_as_the_webhooks_section_says() {
        let body = json!([
            {"id": "e1", "type": "opened", "occurred_at": "2026-11-01T09:00:00Z",
             "campaign_id": CAMPAIGN, "email": "ada@example.com"},
            {"id": "e2", "type": "soft_bounced", "occurred_at": "2026-11-01T09:00:00+02:00",
             "enrollment_id": ENROLLMENT},
            {"id": "e3", "type": "read", "occurred_at": "2026-11-01T09:00:00Z", "enrollment_id": ENROLLMENT},
            {"id": "e4", "type": "sent", "occurred_at": "2026-11-01T09:00:00Z", "campaign_id": CAMPAIGN},
            {"id": "e5", "type": "sent", "occurred_at": 1, "enrollment_id": ENROLLMENT},
            {"id": "e6", "type": "sent", "occurred_at": "2026-11-01T09:00:00Z", "enrollment_id": "x"},
        ]);
        let parsed = read(SourceKind::Standard, &body);
        let first = ok(&parsed[0]);
        assert_eq!(first.kind, Some(Opened));
        assert_eq!(
            first.target,
            Target::CampaignEmail {
                campaign: CAMPAIGN.parse().unwrap(),
                email: "ada@example.com".into()
            }
        );
        let second = ok(&parsed[1]);
        assert_eq!(second.kind, Some(SoftBounced));
        assert_eq!(second.occurred_at, t("2026-11-01T07:00:00Z"));
        assert_eq!(
            second.target,
            Target::Enrollment(ENROLLMENT.parse().unwrap())
        );
        assert!(parsed[2].as_ref().unwrap_err().starts_with("type must be"));
        for p in &parsed[3..] {
            assert!(p.is_err(), "{p:?}");
        }
        let one = json!({"id": "e1", "type": "sent", "occurred_at": "2026-11-01T09:00:00Z", "enrollment_id": ENROLLMENT});
        assert_eq!(read(SourceKind::Standard, &one).len(), 1);
    }

    // --- SendGrid -----------------------------------------------------------------

    #[test]
    fn sendgrid_events_map_to_milestones_with_custom_args_as_members() {
        // Shaped as SendGrid's Event Webhook reference samples, with our custom_args.
        let body = json!([
            {"email": "ada@example.com", "timestamp": 1_700_000_000, "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
             "event": "processed", "category": ["cat facts"], "sg_event_id": "rbtnWrG1DVDGGGFHFyun0A==",
             "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.000000000000000000000",
             "leadledger_enrollment_id": ENROLLMENT},
            {"email": "ada@example.com", "timestamp": 1_700_000_010, "event": "delivered",
             "ip": "168.1.1.1", "response": "250 OK", "sg_event_id": "rWVYmVk90MjZJ9iohOBa3w==",
             "leadledger_campaign_id": CAMPAIGN},
            {"email": "ada@example.com", "timestamp": 1_700_000_020, "event": "open",
             "sg_machine_open": false, "useragent": "Mozilla/4.0", "ip": "255.255.255.255",
             "sg_event_id": "FOTFFO0ecsBE-zxFXfs6WA==", "leadledger_enrollment_id": ENROLLMENT},
            {"email": "ada@example.com", "timestamp": 1_700_000_030, "event": "click",
             "url": "http://www.sendgrid.com/", "url_offset": {"index": 0, "type": "html"},
             "sg_event_id": "kCAi1KttyQdEKHhdC-nuEA==", "leadledger_enrollment_id": ENROLLMENT},
            {"email": "ada@example.com", "timestamp": 1_700_000_040, "event": "bounce",
             "bounce_classification": "Invalid Address", "reason": "500 unknown recipient",
             "status": "5.0.0", "type": "bounce", "sg_event_id": "6g4ZI7SA-xmRDv57GoPIPw==",
             "leadledger_enrollment_id": ENROLLMENT},
            {"email": "ada@example.com", "timestamp": 1_700_000_050, "event": "bounce",
             "reason": "550 blocked", "status": "5.0.0", "type": "blocked",
             "sg_event_id": "blk-1", "leadledger_enrollment_id": ENROLLMENT},
            {"email": "ada@example.com", "timestamp": 1_700_000_060, "event": "deferred",
             "response": "400 try again later", "attempt": "5", "sg_event_id": "t7LEShmowp86DTdUW8M-GQ==",
             "leadledger_enrollment_id": ENROLLMENT},
            {"email": "ada@example.com", "timestamp": 1_700_000_070, "event": "spamreport",
             "sg_event_id": "37nvH5QBz858KGVYCM4uOA==", "leadledger_enrollment_id": ENROLLMENT},
            {"email": "ada@example.com", "timestamp": 1_700_000_080, "event": "unsubscribe",
             "sg_event_id": "zz_BjPgU_5pS-J8vlfB1sg==", "leadledger_enrollment_id": ENROLLMENT},
            {"email": "ada@example.com", "timestamp": 1_700_000_090, "event": "group_unsubscribe",
             "asm_group_id": 10, "sg_event_id": "ahSCB7xYcXFb-hEaawsPRw==",
             "leadledger_enrollment_id": ENROLLMENT},
            {"email": "ada@example.com", "timestamp": 1_700_000_100, "event": "dropped",
             "reason": "Bounced Address", "status": "5.0.0", "sg_event_id": "zmzJhfJgAfUSOW80yEbPyw=="},
            {"email": "ada@example.com", "timestamp": 1_700_000_110, "event": "group_resubscribe",
             "sg_event_id": "w_u0vJhLT-OFfprar5N93g==", "leadledger_enrollment_id": "not-a-uuid"}
        ]);
        let parsed = read(SourceKind::Sendgrid, &body);
        let kinds: Vec<_> = parsed.iter().map(|p| ok(p).kind).collect();
        assert_eq!(
            kinds,
            vec![
                Some(Sent),
                Some(Delivered),
                Some(Opened),
                Some(Clicked),
                Some(Bounced),
                Some(SoftBounced),
                Some(Deferred),
                Some(Complained),
                Some(Unsubscribed),
                Some(Unsubscribed),
                None,
                None
            ]
        );
        let first = ok(&parsed[0]);
        assert_eq!(first.id, "rbtnWrG1DVDGGGFHFyun0A==");
        assert_eq!(first.provider_type, "processed");
        assert_eq!(first.occurred_at.timestamp(), 1_700_000_000);
        assert_eq!(
            first.target,
            Target::Enrollment(ENROLLMENT.parse().unwrap())
        );
        assert_eq!(
            ok(&parsed[1]).target,
            Target::CampaignEmail {
                campaign: CAMPAIGN.parse().unwrap(),
                email: "ada@example.com".into()
            }
        );
        assert_eq!(ok(&parsed[10]).target, Target::Unknown);
        // An ignored event with unreadable ids is still only ignored.
        assert_eq!(ok(&parsed[11]).target, Target::Unknown);
    }

    #[test]
    fn a_bad_sendgrid_event_is_rejected_alone() {
        let body = json!([
            {"event": "open", "timestamp": 1, "email": "a@b.c", "leadledger_enrollment_id": "nope", "sg_event_id": "x1"},
            {"event": "open", "timestamp": "yesterday", "sg_event_id": "x2"},
            {"event": "open", "timestamp": 1},
            {"event": "open", "timestamp": 1, "sg_event_id": "bad\u{0}id"},
            {"event": "open", "timestamp": 1, "sg_event_id": "x".repeat(256)},
            {"event": "open", "timestamp": 1, "sg_event_id": "   "},
            {"event": "open", "timestamp": 1, "sg_event_id": "x3", "leadledger_campaign_id": CAMPAIGN},
            {"event": 7, "timestamp": 1, "sg_event_id": "x4"},
            {"event": "open", "timestamp": 1e300, "sg_event_id": "x5"},
            "not an object",
            {"event": "open", "timestamp": 1, "sg_event_id": "fine", "leadledger_enrollment_id": ENROLLMENT}
        ]);
        let parsed = read(SourceKind::Sendgrid, &body);
        assert_eq!(parsed.len(), 11);
        for (i, p) in parsed[..10].iter().enumerate() {
            assert!(p.is_err(), "event {i} read: {p:?}");
        }
        assert!(parsed[10].is_ok());
        assert!(
            parsed[0]
                .as_ref()
                .unwrap_err()
                .contains("leadledger_enrollment_id")
        );
    }

    #[test]
    fn the_published_sendgrid_payload_reads_as_one_ignored_drop() {
        let payload = "[{\"email\":\"hello@world.com\",\"event\":\"dropped\",\"reason\":\"Bounced Address\",\"sg_event_id\":\"ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA\",\"sg_message_id\":\"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0\",\"smtp-id\":\"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>\",\"timestamp\":1600112492}]\r\n";
        let parsed = parse(SourceKind::Sendgrid, &none(), payload.as_bytes()).unwrap();
        let event = ok(&parsed[0]);
        assert_eq!(event.kind, None);
        assert_eq!(
            event.id,
            "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA"
        );
        assert_eq!(event.occurred_at.timestamp(), 1_600_112_492);
    }

    #[test]
    fn a_sendgrid_body_must_be_an_array() {
        assert!(matches!(
            parse(SourceKind::Sendgrid, &none(), br#"{"event":"open"}"#),
            Err(BodyError::Shape(_))
        ));
    }

    // --- Mailgun ------------------------------------------------------------------

    fn mailgun_body(event_data: Value) -> Value {
        json!({
            "signature": {"timestamp": "1529006854", "token": "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0",
                          "signature": "d2271d12299f6592d9d44cd9d250f0704e4674c30d79d07c47a66f95ce71cf55"},
            "event-data": event_data
        })
    }

    #[test]
    fn mailgun_event_data_maps_to_milestones_with_user_variables() {
        // Shaped as Mailgun's webhook payload samples.
        let failed = |severity: &str| {
            json!({
                "event": "failed", "severity": severity, "id": format!("G9Bn5sl1TC6nu79C8C0bwg-{severity}"),
                "timestamp": 1_521_233_195.375_624, "log-level": "error", "reason": "suppress-bounce",
                "recipient": "alice@example.com", "recipient-domain": "example.com",
                "delivery-status": {"code": 605, "message": "", "attempt-no": 1, "description": "Not delivering to previously bounced address"},
                "envelope": {"sender": "bob@sandbox.mailgun.org", "transport": "smtp", "targets": "alice@example.com"},
                "message": {"headers": {"to": "Alice <alice@example.com>", "message-id": "20130503192659.13651.20287@sandbox.mailgun.org"}},
                "flags": {"is-routed": false, "is-authenticated": true, "is-test-mode": false},
                "tags": ["my_tag_1"], "campaigns": [],
                "user-variables": {"my_var_1": "Mailgun Variable #1", "leadledger_campaign_id": CAMPAIGN}
            })
        };
        let permanent = read(SourceKind::Mailgun, &mailgun_body(failed("permanent")));
        let event = ok(&permanent[0]);
        assert_eq!(event.kind, Some(Bounced));
        assert_eq!(event.id, "G9Bn5sl1TC6nu79C8C0bwg-permanent");
        assert_eq!(event.occurred_at.timestamp(), 1_521_233_195);
        assert_eq!(event.occurred_at.timestamp_subsec_micros(), 375_624);
        assert_eq!(
            event.target,
            Target::CampaignEmail {
                campaign: CAMPAIGN.parse().unwrap(),
                email: "alice@example.com".into()
            }
        );
        let temporary = read(SourceKind::Mailgun, &mailgun_body(failed("temporary")));
        assert_eq!(ok(&temporary[0]).kind, Some(SoftBounced));
        for (event, kind) in [
            ("accepted", Some(Sent)),
            ("delivered", Some(Delivered)),
            ("opened", Some(Opened)),
            ("clicked", Some(Clicked)),
            ("complained", Some(Complained)),
            ("unsubscribed", Some(Unsubscribed)),
            ("stored", None),
            ("rejected", None),
        ] {
            let body = mailgun_body(json!({
                "event": event, "id": "CPgfbmQMTCKtHW6uIWtuVe", "timestamp": 1_521_472_262.908_181,
                "recipient": "alice@example.com", "log-level": "info",
                "user-variables": {"leadledger_enrollment_id": ENROLLMENT}
            }));
            let parsed = read(SourceKind::Mailgun, &body);
            assert_eq!(ok(&parsed[0]).kind, kind, "{event}");
            assert_eq!(
                ok(&parsed[0]).target,
                Target::Enrollment(ENROLLMENT.parse().unwrap())
            );
        }
    }

    #[test]
    fn a_mailgun_body_without_event_data_is_refused_and_a_bad_event_rejected() {
        assert!(matches!(
            parse(SourceKind::Mailgun, &none(), br#"{"signature": {}}"#),
            Err(BodyError::Shape(_))
        ));
        assert!(matches!(
            parse(SourceKind::Mailgun, &none(), br#"[{"event-data": {}}]"#),
            Err(BodyError::Shape(_))
        ));
        let parsed = read(
            SourceKind::Mailgun,
            &mailgun_body(json!({"event": "delivered", "id": "x", "timestamp": "soon"})),
        );
        assert!(parsed[0].is_err());
    }

    // --- Postmark -----------------------------------------------------------------

    #[test]
    fn postmark_records_map_by_record_type_with_metadata() {
        // Shaped as Postmark's webhook samples.
        let meta = json!({"example": "value", "leadledger_enrollment_id": ENROLLMENT});
        let records = [
            (
                json!({"RecordType": "Delivery", "ServerID": 23, "MessageStream": "outbound",
                    "MessageID": "00000000-0000-0000-0000-000000000000", "Recipient": "john@example.com",
                    "Tag": "welcome-email", "DeliveredAt": "2021-02-21T16:34:52Z",
                    "Details": "Test delivery webhook details", "Metadata": meta}),
                Some(Delivered),
                "2021-02-21T16:34:52Z",
            ),
            (
                json!({"RecordType": "Open", "MessageStream": "outbound", "FirstOpen": true,
                    "Client": {"Name": "Chrome 35.0.1916.153", "Company": "Google", "Family": "Chrome"},
                    "OS": {"Name": "OS X 10.7 Lion", "Company": "Apple Computer, Inc.", "Family": "OS X 10"},
                    "Platform": "WebMail", "UserAgent": "Mozilla/5.0", "ReadSeconds": 5,
                    "Geo": {"CountryISOCode": "RS", "Country": "Serbia", "City": "Novi Sad"},
                    "MessageID": "00000000-0000-0000-0000-000000000000", "Metadata": meta,
                    "ReceivedAt": "2019-11-05T16:33:54.9070259Z", "Tag": "welcome-email",
                    "Recipient": "john@example.com"}),
                Some(Opened),
                "2019-11-05T16:33:54.9070259Z",
            ),
            (
                json!({"RecordType": "Click", "MessageStream": "outbound", "ClickLocation": "HTML",
                    "Client": {"Name": "Chrome 35.0.1916.153"}, "Platform": "Desktop",
                    "OriginalLink": "https://example.com", "MessageID": "00000000-0000-0000-0000-000000000000",
                    "Metadata": meta, "ReceivedAt": "2017-10-25T15:21:11.000Z",
                    "Recipient": "john@example.com", "Tag": "welcome-email"}),
                Some(Clicked),
                "2017-10-25T15:21:11Z",
            ),
            (
                json!({"RecordType": "Bounce", "MessageStream": "outbound", "ID": 4_323_372_036_854_775_807_u64,
                    "Type": "HardBounce", "TypeCode": 1, "Name": "Hard bounce", "Tag": "Test",
                    "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483",
                    "Description": "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
                    "Details": "Test bounce details", "Email": "john@example.com", "From": "sender@example.com",
                    "BouncedAt": "2019-11-05T16:33:54.9070259Z", "DumpAvailable": true, "Inactive": true,
                    "CanActivate": true, "Subject": "Test subject", "Content": "<Full dump of bounce>",
                    "Metadata": meta}),
                Some(Bounced),
                "2019-11-05T16:33:54.9070259Z",
            ),
            (
                json!({"RecordType": "Bounce", "Type": "Transient", "TypeCode": 2,
                    "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483", "Email": "john@example.com",
                    "BouncedAt": "2014-08-01T13:28:10.2735393-04:00", "Metadata": meta}),
                Some(SoftBounced),
                "2014-08-01T17:28:10.2735393Z",
            ),
            (
                json!({"RecordType": "SpamComplaint", "MessageStream": "outbound", "ID": 42,
                    "Type": "SpamComplaint", "TypeCode": 512, "Name": "Spam complaint",
                    "MessageID": "00000000-0000-0000-0000-000000000000", "Email": "john@example.com",
                    "BouncedAt": "2019-11-05T16:33:54.9070259Z", "Metadata": meta}),
                Some(Complained),
                "2019-11-05T16:33:54.9070259Z",
            ),
            (
                json!({"RecordType": "SubscriptionChange", "MessageID": "00000000-0000-0000-0000-000000000000",
                    "ServerID": 23, "MessageStream": "outbound", "ChangedAt": "2020-02-01T10:53:34.416071Z",
                    "Recipient": "john@example.com", "Origin": "Recipient", "SuppressSending": true,
                    "SuppressionReason": "ManualSuppression", "Tag": "my-tag", "Metadata": meta}),
                Some(Unsubscribed),
                "2020-02-01T10:53:34.416071Z",
            ),
            (
                json!({"RecordType": "SubscriptionChange", "MessageID": "00000000-0000-0000-0000-000000000000",
                    "ChangedAt": "2020-02-02T08:00:00Z", "Recipient": "john@example.com",
                    "SuppressSending": false, "Metadata": meta}),
                None,
                "2020-02-02T08:00:00Z",
            ),
        ];
        let mut ids = std::collections::HashSet::new();
        for (record, kind, at) in records {
            let parsed = read(SourceKind::Postmark, &record);
            let event = ok(&parsed[0]);
            assert_eq!(event.kind, kind, "{record}");
            assert_eq!(event.occurred_at, t(at), "{record}");
            assert_eq!(
                event.target,
                Target::Enrollment(ENROLLMENT.parse().unwrap())
            );
            assert!(
                ids.insert(event.id.clone()),
                "ids must differ: {}",
                event.id
            );
            // The same record again derives the same id.
            assert_eq!(ok(&read(SourceKind::Postmark, &record)[0]).id, event.id);
        }
    }

    #[test]
    fn a_postmark_bounce_takes_its_recipient_from_email() {
        let record = json!({"RecordType": "Bounce", "Type": "HardBounce", "MessageID": "m",
                            "Email": "john@example.com", "BouncedAt": "2019-11-05T16:33:54Z",
                            "Metadata": {"leadledger_campaign_id": CAMPAIGN}});
        let parsed = read(SourceKind::Postmark, &record);
        assert_eq!(
            ok(&parsed[0]).target,
            Target::CampaignEmail {
                campaign: CAMPAIGN.parse().unwrap(),
                email: "john@example.com".into()
            }
        );
        let no_time = json!({"RecordType": "Open", "MessageID": "m", "Recipient": "a@b.c"});
        assert!(read(SourceKind::Postmark, &no_time)[0].is_err());
        let inbound = json!({"RecordType": "Inbound", "ReceivedAt": "2019-11-05T16:33:54Z"});
        assert_eq!(ok(&read(SourceKind::Postmark, &inbound)[0]).kind, None);
    }

    // --- Instantly ----------------------------------------------------------------

    #[test]
    fn instantly_events_name_their_campaign_and_lead() {
        // Shaped as Instantly's webhook event schema.
        let event = |event_type: &str| {
            json!({
                "timestamp": "2026-11-01T09:00:00.000Z", "event_type": event_type,
                "workspace": "a2b4c6d8-0000-4000-8000-00000000000a",
                "campaign_id": "3f2a1b7c-0000-4000-8000-0000000000c7", "campaign_name": "Q4 outbound",
                "lead_email": "grace@example.com", "email_account": "sales@ours.example",
                "step": 1, "variant": 1, "is_first": true, "email_id": "01HF00000000000000000000",
                "email_subject": "Hello", "email_text": "Hi Grace", "email_html": "<p>Hi Grace</p>"
            })
        };
        for (event_type, kind) in [
            ("email_sent", Some(Sent)),
            ("email_opened", Some(Opened)),
            ("link_clicked", Some(Clicked)),
            ("email_link_clicked", Some(Clicked)),
            ("reply_received", Some(Replied)),
            ("email_bounced", Some(Bounced)),
            ("lead_unsubscribed", Some(Unsubscribed)),
            ("lead_interested", None),
            ("campaign_completed", None),
        ] {
            let parsed = read(SourceKind::Instantly, &event(event_type));
            let e = ok(&parsed[0]);
            assert_eq!(e.kind, kind, "{event_type}");
            assert_eq!(e.occurred_at, t("2026-11-01T09:00:00Z"));
            assert_eq!(
                e.target,
                Target::External {
                    their_campaign: "3f2a1b7c-0000-4000-8000-0000000000c7".into(),
                    email: "grace@example.com".into()
                }
            );
            assert!(e.id.starts_with("instantly-"));
        }
        let sent = ok(&read(SourceKind::Instantly, &event("email_sent"))[0])
            .id
            .clone();
        let opened = ok(&read(SourceKind::Instantly, &event("email_opened"))[0])
            .id
            .clone();
        assert_ne!(sent, opened);
        // A campaign-level event without a lead is ignored, not rejected.
        let done = json!({"timestamp": "2026-11-01T09:00:00Z", "event_type": "campaign_completed",
                          "campaign_id": "c"});
        assert_eq!(
            ok(&read(SourceKind::Instantly, &done)[0]).target,
            Target::Unknown
        );
        // A milestone without a lead is rejected.
        let lost = json!({"timestamp": "2026-11-01T09:00:00Z", "event_type": "email_sent", "campaign_id": "c"});
        assert!(read(SourceKind::Instantly, &lost)[0].is_err());
    }

    // --- Smartlead ----------------------------------------------------------------

    #[test]
    fn smartlead_events_name_their_campaign_and_lead() {
        // Shaped as Smartlead's webhook payloads (numeric campaign ids; the secret_key
        // is authentication and is read nowhere else).
        let event = |event_type: &str| {
            json!({
                "webhook_id": 1234, "webhook_name": "leadledger", "sl_email_lead_id": 5678,
                "sl_email_lead_map_id": 91011, "stats_id": "id", "event_type": event_type,
                "time_sent": "2023-09-25T17:29:11.618881+00:00",
                "event_timestamp": "2023-09-25T17:29:11.618881+00:00",
                "from_email": "sales@ours.example", "to_email": "linus@example.com", "to_name": "Linus",
                "subject": "OR", "campaign_id": 111, "campaign_name": "OR Tracker",
                "campaign_status": "ACTIVE", "sequence_number": 1,
                "sent_message": {"message_id": "<m@ours.example>", "html": "<p>Hi</p>", "text": "Hi", "time": "2023-09-25T17:29:11.618881+00:00"},
                "client_id": 111, "app_url": "https://app.smartlead.ai/app/master-inbox",
                "secret_key": "sl_secret", "description": "", "metadata": {"webhook_created_at": "2023-09-01T00:00:00Z"}
            })
        };
        for (event_type, kind) in [
            ("EMAIL_SENT", Some(Sent)),
            ("EMAIL_OPEN", Some(Opened)),
            ("EMAIL_OPENED", Some(Opened)),
            ("EMAIL_LINK_CLICK", Some(Clicked)),
            ("EMAIL_LINK_CLICKED", Some(Clicked)),
            ("EMAIL_REPLY", Some(Replied)),
            ("EMAIL_REPLIED", Some(Replied)),
            ("EMAIL_BOUNCE", Some(Bounced)),
            ("EMAIL_BOUNCED", Some(Bounced)),
            ("LEAD_UNSUBSCRIBED", Some(Unsubscribed)),
            ("LEAD_CATEGORY_UPDATED", None),
        ] {
            let parsed = read(SourceKind::Smartlead, &event(event_type));
            let e = ok(&parsed[0]);
            assert_eq!(e.kind, kind, "{event_type}");
            assert_eq!(e.occurred_at, t("2023-09-25T17:29:11.618881Z"));
            assert_eq!(
                e.target,
                Target::External {
                    their_campaign: "111".into(),
                    email: "linus@example.com".into()
                }
            );
        }
        // The same event twice derives the same id; the webhook's own id plays no part.
        let mut again = event("EMAIL_SENT");
        again["webhook_id"] = json!(999);
        assert_eq!(
            ok(&read(SourceKind::Smartlead, &event("EMAIL_SENT"))[0]).id,
            ok(&read(SourceKind::Smartlead, &again)[0]).id
        );
        let untimed = json!({"event_type": "EMAIL_SENT", "campaign_id": 1, "to_email": "a@b.c"});
        assert!(read(SourceKind::Smartlead, &untimed)[0].is_err());
    }

    // --- Bodies -------------------------------------------------------------------

    fn custom() -> Credentials {
        Credentials::Custom {
            token: "t".into(),
            mapping: CustomMapping::parse(&json!({
                "id": "/id", "type": "/type", "email": "/email", "occurred_at": "/at",
                "campaign": "/campaign", "enrollment": "/enrollment",
                "types": {"sent": "sent", "open": "opened"}
            }))
            .unwrap(),
        }
    }

    #[test]
    fn more_than_a_thousand_events_refuse_the_body_for_every_kind() {
        let event = json!({"event": "open"});
        let many = serde_json::to_vec(&vec![event.clone(); MAX_EVENTS + 1]).unwrap();
        let enough = serde_json::to_vec(&vec![event; MAX_EVENTS]).unwrap();
        for kind in SourceKind::ALL {
            if kind == SourceKind::Mailgun {
                continue; // One event per delivery, by its shape.
            }
            assert_eq!(
                parse(kind, &custom(), &many),
                Err(BodyError::TooManyEvents(MAX_EVENTS + 1)),
                "{kind}"
            );
            assert!(parse(kind, &custom(), &enough).is_ok(), "{kind}");
        }
    }

    #[test]
    fn bodies_that_are_not_json_or_nest_too_deep_are_refused() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        for kind in SourceKind::ALL {
            assert_eq!(
                parse(kind, &custom(), deep.as_bytes()),
                Err(BodyError::TooDeep),
                "{kind}"
            );
            assert!(matches!(
                parse(kind, &custom(), b"{\"a\": "),
                Err(BodyError::NotJson(_))
            ));
            assert!(matches!(
                parse(kind, &custom(), b"\xff\xfe"),
                Err(BodyError::NotJson(_))
            ));
        }
        assert_eq!(
            parse(SourceKind::Custom, &none(), b"{}"),
            Err(BodyError::NoMapping)
        );
    }

    #[test]
    fn times_out_of_range_are_rejected_not_panicked_on() {
        for v in [
            json!(1e300),
            json!(-1e300),
            json!(i64::MAX),
            json!(i64::MIN),
            json!(u64::MAX),
        ] {
            assert_eq!(unix_seconds(&v), None, "{v}");
        }
        assert_eq!(
            unix_seconds(&json!(1.999_999_999_9))
                .map(|t| (t.timestamp(), t.timestamp_subsec_nanos())),
            Some((1, 999_999_999))
        );
        assert_eq!(
            unix_seconds(&json!(-1.25)).map(|t| (t.timestamp(), t.timestamp_subsec_nanos())),
            Some((-2, 750_000_000))
        );
        assert_eq!(unix_seconds(&json!("1")), None);
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            "[a-z_]{0,12}".prop_map(Value::String),
            // Values our readers look for, so that deeper paths are taken.
            prop_oneof![
                Just(json!("open")),
                Just(json!("bounce")),
                Just(json!("failed")),
                Just(json!("Bounce")),
                Just(json!("EMAIL_SENT")),
                Just(json!("email_sent")),
                Just(json!("2026-11-01T09:00:00Z")),
                Just(json!(ENROLLMENT)),
            ],
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            let key = prop_oneof![
                "[a-z_]{1,8}",
                Just("event".to_string()),
                Just("event-data".to_string()),
                Just("sg_event_id".to_string()),
                Just("timestamp".to_string()),
                Just("RecordType".to_string()),
                Just("event_type".to_string()),
                Just("leadledger_enrollment_id".to_string()),
                Just("user-variables".to_string()),
                Just("Metadata".to_string()),
                Just("id".to_string()),
                Just("type".to_string()),
                Just("at".to_string()),
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key, inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn random_json_bodies_never_panic_any_reader(body in json_value()) {
            let bytes = serde_json::to_vec(&body).unwrap();
            for kind in SourceKind::ALL {
                let _ = parse(kind, &custom(), &bytes);
            }
        }

        #[test]
        fn random_bytes_never_panic_any_reader(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            for kind in SourceKind::ALL {
                let _ = parse(kind, &custom(), &bytes);
            }
        }
    }
}
