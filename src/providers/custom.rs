//! `custom` sources: a [`CustomMapping`] of JSON Pointers (RFC 6901) that says where a
//! body's events are and where each event's id, type, email, time and campaign or
//! enrollment are, with a table from the sender's type names to ours.

use std::collections::BTreeMap;

use aggregates::enrollment::ProviderEventKind;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::parse::{BodyError, Parsed, event_list, unix_or_rfc3339};
use super::{ProviderEvent, Target, checked_id};

/// The longest pointer taken: a mapping is configuration, not data.
const MAX_POINTER_CHARS: usize = 256;
/// The most type names a mapping may list.
const MAX_TYPES: usize = 200;

/// Where a custom sender puts what an event needs. Pointers are RFC 6901 (`""` is the
/// whole value, otherwise they start with `/`); `events` points into the body, the others
/// into each event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomMapping {
    /// Where the array of events is; `None`: the body is one event or an array of them.
    pub events: Option<String>,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub email: String,
    pub occurred_at: String,
    /// The sender's campaign id (linked to ours by the campaign's `external_ids`).
    pub campaign: Option<String>,
    /// Our enrollment id, when the sender carries it.
    pub enrollment: Option<String>,
    /// Their type names to ours; a type not listed is `ignored`.
    pub types: BTreeMap<String, ProviderEventKind>,
}

impl CustomMapping {
    /// Reads and checks a mapping as the source-creation route receives it; every problem
    /// is reported, as (field, message), for a 422.
    pub fn parse(value: &Value) -> Result<Self, Vec<(String, String)>> {
        let mut errors: Vec<(String, String)> = Vec::new();
        let Some(object) = value.as_object() else {
            return Err(vec![("mapping".into(), "must be an object".into())]);
        };
        const KNOWN: [&str; 8] = [
            "events",
            "id",
            "type",
            "email",
            "occurred_at",
            "campaign",
            "enrollment",
            "types",
        ];
        for name in object.keys() {
            if !KNOWN.contains(&name.as_str()) {
                errors.push((format!("mapping.{name}"), "is not a mapping field".into()));
            }
        }
        let mut pointer = |name: &str, required: bool| -> Option<String> {
            let field = format!("mapping.{name}");
            match object.get(name) {
                None | Some(Value::Null) => {
                    if required {
                        errors.push((field, "is required".into()));
                    }
                    None
                }
                Some(Value::String(p)) if is_pointer(p) => Some(p.clone()),
                Some(_) => {
                    errors.push((
                        field,
                        format!(
                            "must be a JSON Pointer (RFC 6901): \"\" or starting with \"/\", at most {MAX_POINTER_CHARS} characters"
                        ),
                    ));
                    None
                }
            }
        };
        let events = pointer("events", false);
        let id = pointer("id", true);
        let kind = pointer("type", true);
        let email = pointer("email", true);
        let occurred_at = pointer("occurred_at", true);
        let campaign = pointer("campaign", false);
        let enrollment = pointer("enrollment", false);
        let given = |name: &str| object.get(name).is_some_and(|v| !v.is_null());
        if !given("campaign") && !given("enrollment") {
            errors.push((
                "mapping.campaign".into(),
                "campaign or enrollment is required".into(),
            ));
        }
        let mut types = BTreeMap::new();
        match object.get("types") {
            Some(Value::Object(table)) if !table.is_empty() && table.len() <= MAX_TYPES => {
                for (theirs, ours) in table {
                    match ours.as_str().and_then(ProviderEventKind::parse) {
                        Some(kind) => {
                            types.insert(theirs.clone(), kind);
                        }
                        None => errors.push((
                            format!("mapping.types.{theirs}"),
                            "must be one of sent, delivered, opened, clicked, replied, bounced, soft_bounced, deferred, unsubscribed, complained".into(),
                        )),
                    }
                }
            }
            _ => errors.push((
                "mapping.types".into(),
                format!(
                    "must be an object of 1 to {MAX_TYPES} type names, each mapped to one of ours"
                ),
            )),
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // Every required pointer is present when there is no error.
        Ok(Self {
            events,
            id: id.unwrap_or_default(),
            kind: kind.unwrap_or_default(),
            email: email.unwrap_or_default(),
            occurred_at: occurred_at.unwrap_or_default(),
            campaign,
            enrollment,
            types,
        })
    }

    /// The events of a body read by this mapping.
    pub(super) fn events(&self, body: &Value) -> Result<Vec<Parsed>, BodyError> {
        let list = match &self.events {
            Some(pointer) => match body.pointer(pointer) {
                Some(Value::Array(events)) => events.as_slice(),
                _ => {
                    return Err(BodyError::Shape(format!(
                        "the mapping's events pointer {pointer:?} does not name an array"
                    )));
                }
            },
            None => event_list(body)?,
        };
        if list.len() > super::MAX_EVENTS {
            return Err(BodyError::TooManyEvents(list.len()));
        }
        Ok(list.iter().map(|event| self.event(event)).collect())
    }

    fn event(&self, event: &Value) -> Parsed {
        let text = |pointer: &str| -> Option<String> {
            match event.pointer(pointer)? {
                Value::String(s) => Some(s.clone()),
                // Numeric ids are common; they are taken in their JSON text.
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        };
        let id = text(&self.id).ok_or_else(|| format!("no id at {:?}", self.id))?;
        let id = checked_id(&id, "id")?;
        let provider_type = event
            .pointer(&self.kind)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("no type (a string) at {:?}", self.kind))?
            .to_string();
        let kind = self.types.get(&provider_type).copied();
        let occurred_at = event
            .pointer(&self.occurred_at)
            .and_then(unix_or_rfc3339)
            .ok_or_else(|| {
                format!(
                    "no time (RFC 3339 or Unix seconds) at {:?}",
                    self.occurred_at
                )
            })?;
        let email = text(&self.email);
        let target = match (&self.enrollment, &self.campaign) {
            (Some(p), _) if event.pointer(p).is_some() => {
                match event
                    .pointer(p)
                    .and_then(Value::as_str)
                    .map(Uuid::parse_str)
                {
                    Some(Ok(id)) => Target::Enrollment(id),
                    _ => return Err(format!("the enrollment at {p:?} is not a UUID")),
                }
            }
            (_, Some(p)) => match (text(p), email) {
                (Some(their_campaign), Some(email)) => Target::External {
                    their_campaign,
                    email,
                },
                _ if kind.is_none() => Target::Unknown,
                _ => {
                    return Err(format!(
                        "a campaign at {p:?} and an email at {:?} are required",
                        self.email
                    ));
                }
            },
            _ => Target::Unknown,
        };
        Ok(ProviderEvent {
            id,
            kind,
            provider_type,
            occurred_at,
            target,
        })
    }
}

fn is_pointer(p: &str) -> bool {
    (p.is_empty() || p.starts_with('/')) && p.chars().count() <= MAX_POINTER_CHARS
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use serde_json::json;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn mapping() -> CustomMapping {
        CustomMapping::parse(&json!({
            "events": "/data/items",
            "id": "/uid",
            "type": "/what",
            "email": "/lead/email",
            "occurred_at": "/at",
            "campaign": "/campaign/id",
            "enrollment": "/meta/leadledger_enrollment_id",
            "types": {"mail.sent": "sent", "mail.replied": "replied", "mail.bounced": "bounced"}
        }))
        .unwrap()
    }

    #[test]
    fn a_mapping_reads_events_where_it_says_they_are() {
        let body = json!({"data": {"items": [
            {"uid": "ev-1", "what": "mail.sent", "at": "2026-11-01T09:00:00+01:00",
             "lead": {"email": "ada@example.com"}, "campaign": {"id": 42}, "extra": [1, 2]},
            {"uid": 77, "what": "mail.replied", "at": 1_761_990_000,
             "lead": {"email": "ada@example.com"},
             "meta": {"leadledger_enrollment_id": "0190a4d2-6c1e-7b3a-9f00-000000000001"}},
            {"uid": "ev-3", "what": "mail.delayed", "at": 1_761_990_000.5},
            {"uid": "ev-4", "what": "mail.sent", "at": "yesterday",
             "lead": {"email": "ada@example.com"}, "campaign": {"id": "c"}},
        ]}});
        let parsed = mapping().events(&body).unwrap();
        assert_eq!(parsed.len(), 4);
        let first = parsed[0].as_ref().unwrap();
        assert_eq!(first.id, "ev-1");
        assert_eq!(first.kind, Some(ProviderEventKind::Sent));
        assert_eq!(first.occurred_at, t("2026-11-01T08:00:00Z"));
        assert_eq!(
            first.target,
            Target::External {
                their_campaign: "42".into(),
                email: "ada@example.com".into()
            }
        );
        let second = parsed[1].as_ref().unwrap();
        assert_eq!(second.id, "77");
        assert_eq!(second.kind, Some(ProviderEventKind::Replied));
        assert_eq!(
            second.target,
            Target::Enrollment("0190a4d2-6c1e-7b3a-9f00-000000000001".parse().unwrap())
        );
        assert_eq!(second.occurred_at.timestamp(), 1_761_990_000);
        let third = parsed[2].as_ref().unwrap();
        assert_eq!(third.kind, None, "an unlisted type is ignored");
        assert_eq!(third.provider_type, "mail.delayed");
        assert_eq!(third.target, Target::Unknown);
        assert!(parsed[3].as_ref().unwrap_err().contains("/at"));
    }

    #[test]
    fn without_an_events_pointer_the_body_is_one_event_or_an_array() {
        let mut m = mapping();
        m.events = None;
        let one = json!({"uid": "a", "what": "mail.sent", "at": 1, "lead": {"email": "x@y.z"}, "campaign": {"id": "c"}});
        assert_eq!(m.events(&one).unwrap().len(), 1);
        assert_eq!(m.events(&json!([one.clone(), one])).unwrap().len(), 2);
        assert!(matches!(m.events(&json!("text")), Err(BodyError::Shape(_))));
        assert!(matches!(
            mapping().events(&json!({"data": {}})),
            Err(BodyError::Shape(_))
        ));
    }

    #[test]
    fn a_milestone_event_without_campaign_or_email_is_refused_alone() {
        let m = mapping();
        let body = json!({"data": {"items": [
            {"uid": "a", "what": "mail.sent", "at": 1, "campaign": {"id": "c"}},
            {"uid": "b", "what": "mail.sent", "at": 1, "meta": {"leadledger_enrollment_id": "nope"}},
            {"uid": "", "what": "mail.sent", "at": 1},
            {"uid": "d", "what": 5, "at": 1},
        ]}});
        let parsed = m.events(&body).unwrap();
        assert!(parsed.iter().all(Result::is_err), "{parsed:?}");
    }

    #[test]
    fn a_mapping_with_problems_reports_each_of_them() {
        let errors = CustomMapping::parse(&json!({
            "id": "uid", "type": "/t", "occurred_at": 5,
            "types": {"x": "sent", "y": "read"}, "colour": "blue"
        }))
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        for expected in [
            "mapping.colour",
            "mapping.id",
            "mapping.email",
            "mapping.occurred_at",
            "mapping.campaign",
            "mapping.types.y",
        ] {
            assert!(fields.contains(&expected), "{expected} not in {fields:?}");
        }
        assert!(CustomMapping::parse(&json!([])).is_err());
        let no_types = CustomMapping::parse(&json!({
            "id": "/i", "type": "/t", "email": "/e", "occurred_at": "/o", "campaign": "/c", "types": {}
        }))
        .unwrap_err();
        assert_eq!(no_types[0].0, "mapping.types");
    }

    #[test]
    fn a_mapping_survives_storage_as_json() {
        let m = mapping();
        let stored = serde_json::to_value(&m).unwrap();
        assert_eq!(CustomMapping::parse(&stored).unwrap(), m);
    }
}
