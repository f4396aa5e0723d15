//! Campaign: an outreach campaign's life, draft → running ⇄ paused → completed.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// A campaign's name: trimmed, 1..=200 characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CampaignName(String);

impl CampaignName {
    pub const MAX_CHARS: usize = 200;

    pub fn parse(raw: &str) -> Result<Self, CampaignError> {
        crate::text::clean(raw, Self::MAX_CHARS)
            .map(Self)
            .map_err(CampaignError::InvalidName)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CampaignName {
    type Error = CampaignError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<CampaignName> for String {
    fn from(value: CampaignName) -> Self {
        value.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignStatus {
    #[default]
    Draft,
    Running,
    Paused,
    Completed,
}

impl CampaignStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Completed => "completed",
        }
    }
}

impl std::fmt::Display for CampaignStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a campaign can be asked to do. Times come from the caller: the aggregate has no clock.
#[derive(Debug, Clone, PartialEq)]
pub enum CampaignCommand {
    Create {
        name: CampaignName,
        stop_on_reply: bool,
        at: DateTime<Utc>,
    },
    Rename {
        name: CampaignName,
        at: DateTime<Utc>,
    },
    Start {
        at: DateTime<Utc>,
    },
    Pause {
        at: DateTime<Utc>,
    },
    Complete {
        at: DateTime<Utc>,
    },
    /// Renames (when `name` is given) and links (`Some`) or unlinks (`None`) the
    /// campaign's ids in other systems, keyed by the webhook source that delivers their
    /// events.
    Update {
        name: Option<CampaignName>,
        external_ids: BTreeMap<String, Option<String>>,
        at: DateTime<Utc>,
    },
}

/// The longest id of another system's campaign taken (it is stored and indexed).
pub const MAX_EXTERNAL_ID_CHARS: usize = 255;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CampaignEvent {
    CampaignCreated {
        name: CampaignName,
        stop_on_reply: bool,
        created_at: DateTime<Utc>,
    },
    CampaignRenamed {
        name: CampaignName,
        renamed_at: DateTime<Utc>,
    },
    CampaignStarted {
        started_at: DateTime<Utc>,
    },
    CampaignPaused {
        paused_at: DateTime<Utc>,
    },
    CampaignCompleted {
        completed_at: DateTime<Utc>,
    },
    /// `linked`: source → their id, new or replacing one; `unlinked`: source → the id it
    /// no longer links (also the one a new link replaced), so a lookup can be kept exact.
    CampaignExternalIdsChanged {
        linked: BTreeMap<String, String>,
        unlinked: BTreeMap<String, String>,
        changed_at: DateTime<Utc>,
    },
}

impl DomainEvent for CampaignEvent {
    fn event_type(&self) -> String {
        match self {
            Self::CampaignCreated { .. } => "CampaignCreated",
            Self::CampaignRenamed { .. } => "CampaignRenamed",
            Self::CampaignStarted { .. } => "CampaignStarted",
            Self::CampaignPaused { .. } => "CampaignPaused",
            Self::CampaignCompleted { .. } => "CampaignCompleted",
            Self::CampaignExternalIdsChanged { .. } => "CampaignExternalIdsChanged",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CampaignError {
    #[error("name {0}")]
    InvalidName(String),
    #[error("campaign does not exist")]
    NotFound,
    #[error("campaign exists already")]
    AlreadyExists,
    #[error("a {from} campaign cannot be {to}")]
    InvalidTransition {
        from: CampaignStatus,
        to: &'static str,
    },
    #[error("external_ids: {0}")]
    InvalidExternalId(String),
}

/// The campaign's state, rebuilt from its events (and kept in snapshots).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    pub created: bool,
    pub name: String,
    pub status: CampaignStatus,
    pub stop_on_reply: bool,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// Its ids in other systems, by source name. (Snapshots from before it read as none.)
    #[serde(default)]
    pub external_ids: BTreeMap<String, String>,
}

impl Campaign {
    /// The event for `changes`, `None` when they change nothing.
    fn external_ids_change(
        &self,
        changes: BTreeMap<String, Option<String>>,
        at: DateTime<Utc>,
    ) -> Result<Option<CampaignEvent>, CampaignError> {
        self.require_created()?;
        let mut linked = BTreeMap::new();
        let mut unlinked = BTreeMap::new();
        for (source, id) in changes {
            if !crate::enrollment::is_source_name(&source) {
                return Err(CampaignError::InvalidExternalId(format!(
                    "{source:?} is not a source name (1 to 63 characters of a-z, 0-9, _ and -)"
                )));
            }
            let current = self.external_ids.get(&source);
            match id {
                Some(id) => {
                    crate::enrollment::check_event_id(&id, MAX_EXTERNAL_ID_CHARS).map_err(
                        |reason| {
                            CampaignError::InvalidExternalId(format!(
                                "the id for {source} {reason}"
                            ))
                        },
                    )?;
                    if current == Some(&id) {
                        continue;
                    }
                    if let Some(old) = current {
                        unlinked.insert(source.clone(), old.clone());
                    }
                    linked.insert(source, id);
                }
                None => {
                    if let Some(old) = current {
                        unlinked.insert(source, old.clone());
                    }
                }
            }
        }
        Ok((!linked.is_empty() || !unlinked.is_empty()).then_some(
            CampaignEvent::CampaignExternalIdsChanged {
                linked,
                unlinked,
                changed_at: at,
            },
        ))
    }

    fn require_created(&self) -> Result<(), CampaignError> {
        if self.created {
            Ok(())
        } else {
            Err(CampaignError::NotFound)
        }
    }

    /// The event for moving to `to`, `None` when the campaign is there already (a retry or
    /// a second click is not an error), or the error when the move is not allowed.
    fn transition(
        &self,
        to: CampaignStatus,
        at: DateTime<Utc>,
    ) -> Result<Option<CampaignEvent>, CampaignError> {
        use CampaignStatus::*;
        self.require_created()?;
        if self.status == to {
            return Ok(None);
        }
        let allowed = matches!(
            (self.status, to),
            (Draft, Running)
                | (Paused, Running)
                | (Running, Paused)
                | (Running, Completed)
                | (Paused, Completed)
        );
        if !allowed {
            let verb = match to {
                Running => "started",
                Paused => "paused",
                Completed => "completed",
                Draft => "reset to draft",
            };
            return Err(CampaignError::InvalidTransition {
                from: self.status,
                to: verb,
            });
        }
        Ok(Some(match to {
            Running => CampaignEvent::CampaignStarted { started_at: at },
            Paused => CampaignEvent::CampaignPaused { paused_at: at },
            Completed => CampaignEvent::CampaignCompleted { completed_at: at },
            Draft => unreachable!("no transition leads back to draft"),
        }))
    }
}

impl Aggregate for Campaign {
    const TYPE: &'static str = "campaign";
    type Command = CampaignCommand;
    type Event = CampaignEvent;
    type Error = CampaignError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = match command {
            CampaignCommand::Create {
                name,
                stop_on_reply,
                at,
            } => {
                if self.created {
                    return Err(CampaignError::AlreadyExists);
                }
                Some(CampaignEvent::CampaignCreated {
                    name,
                    stop_on_reply,
                    created_at: at,
                })
            }
            CampaignCommand::Rename { name, at } => {
                self.require_created()?;
                (name.as_str() != self.name).then_some(CampaignEvent::CampaignRenamed {
                    name,
                    renamed_at: at,
                })
            }
            CampaignCommand::Start { at } => self.transition(CampaignStatus::Running, at)?,
            CampaignCommand::Pause { at } => self.transition(CampaignStatus::Paused, at)?,
            CampaignCommand::Complete { at } => self.transition(CampaignStatus::Completed, at)?,
            CampaignCommand::Update {
                name,
                external_ids,
                at,
            } => {
                self.require_created()?;
                let renamed = name.filter(|n| n.as_str() != self.name).map(|name| {
                    CampaignEvent::CampaignRenamed {
                        name,
                        renamed_at: at,
                    }
                });
                let linked = self.external_ids_change(external_ids, at)?;
                if let Some(event) = renamed {
                    sink.write(event, self).await;
                }
                linked
            }
        };
        if let Some(event) = event {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            CampaignEvent::CampaignCreated {
                name,
                stop_on_reply,
                created_at,
            } => {
                self.created = true;
                self.name = name.into();
                self.stop_on_reply = stop_on_reply;
                self.status = CampaignStatus::Draft;
                self.created_at = Some(created_at);
                self.updated_at = Some(created_at);
            }
            CampaignEvent::CampaignRenamed { name, renamed_at } => {
                self.name = name.into();
                self.updated_at = Some(renamed_at);
            }
            CampaignEvent::CampaignStarted { started_at } => {
                self.status = CampaignStatus::Running;
                self.updated_at = Some(started_at);
            }
            CampaignEvent::CampaignPaused { paused_at } => {
                self.status = CampaignStatus::Paused;
                self.updated_at = Some(paused_at);
            }
            CampaignEvent::CampaignCompleted { completed_at } => {
                self.status = CampaignStatus::Completed;
                self.updated_at = Some(completed_at);
            }
            CampaignEvent::CampaignExternalIdsChanged {
                linked,
                unlinked,
                changed_at,
            } => {
                for source in unlinked.keys() {
                    self.external_ids.remove(source);
                }
                self.external_ids.extend(linked);
                self.updated_at = Some(changed_at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type Given = TestFramework<Campaign>;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-01T09:00:00Z")
            .unwrap()
            .into()
    }

    fn name(s: &str) -> CampaignName {
        CampaignName::parse(s).unwrap()
    }

    fn created() -> CampaignEvent {
        CampaignEvent::CampaignCreated {
            name: name("Q4 outreach"),
            stop_on_reply: true,
            created_at: at(),
        }
    }

    #[test]
    fn creating_a_campaign_records_it_as_a_draft() {
        Given::with(())
            .given_no_previous_events()
            .when(CampaignCommand::Create {
                name: name("Q4 outreach"),
                stop_on_reply: true,
                at: at(),
            })
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn creating_a_campaign_twice_is_refused() {
        Given::with(())
            .given(vec![created()])
            .when(CampaignCommand::Create {
                name: name("again"),
                stop_on_reply: false,
                at: at(),
            })
            .then_expect_error(CampaignError::AlreadyExists);
    }

    #[test]
    fn a_command_on_a_campaign_that_does_not_exist_is_not_found() {
        Given::with(())
            .given_no_previous_events()
            .when(CampaignCommand::Start { at: at() })
            .then_expect_error(CampaignError::NotFound);
    }

    #[test]
    fn a_draft_starts_pauses_resumes_and_completes() {
        Given::with(())
            .given(vec![created()])
            .when(CampaignCommand::Start { at: at() })
            .then_expect_events(vec![CampaignEvent::CampaignStarted { started_at: at() }]);
        Given::with(())
            .given(vec![
                created(),
                CampaignEvent::CampaignStarted { started_at: at() },
            ])
            .when(CampaignCommand::Pause { at: at() })
            .then_expect_events(vec![CampaignEvent::CampaignPaused { paused_at: at() }]);
        Given::with(())
            .given(vec![
                created(),
                CampaignEvent::CampaignStarted { started_at: at() },
                CampaignEvent::CampaignPaused { paused_at: at() },
            ])
            .when(CampaignCommand::Start { at: at() })
            .then_expect_events(vec![CampaignEvent::CampaignStarted { started_at: at() }]);
        Given::with(())
            .given(vec![
                created(),
                CampaignEvent::CampaignStarted { started_at: at() },
                CampaignEvent::CampaignPaused { paused_at: at() },
            ])
            .when(CampaignCommand::Complete { at: at() })
            .then_expect_events(vec![CampaignEvent::CampaignCompleted {
                completed_at: at(),
            }]);
    }

    #[test]
    fn a_completed_campaign_cannot_be_started_again() {
        Given::with(())
            .given(vec![
                created(),
                CampaignEvent::CampaignStarted { started_at: at() },
                CampaignEvent::CampaignCompleted { completed_at: at() },
            ])
            .when(CampaignCommand::Start { at: at() })
            .then_expect_error(CampaignError::InvalidTransition {
                from: CampaignStatus::Completed,
                to: "started",
            });
    }

    #[test]
    fn a_draft_cannot_be_paused_or_completed() {
        Given::with(())
            .given(vec![created()])
            .when(CampaignCommand::Pause { at: at() })
            .then_expect_error(CampaignError::InvalidTransition {
                from: CampaignStatus::Draft,
                to: "paused",
            });
        Given::with(())
            .given(vec![created()])
            .when(CampaignCommand::Complete { at: at() })
            .then_expect_error(CampaignError::InvalidTransition {
                from: CampaignStatus::Draft,
                to: "completed",
            });
    }

    #[test]
    fn asking_for_the_status_a_campaign_has_already_records_nothing() {
        Given::with(())
            .given(vec![
                created(),
                CampaignEvent::CampaignStarted { started_at: at() },
            ])
            .when(CampaignCommand::Start { at: at() })
            .then_expect_events(vec![]);
    }

    #[test]
    fn renaming_records_only_a_real_change() {
        Given::with(())
            .given(vec![created()])
            .when(CampaignCommand::Rename {
                name: name("Q4 outreach"),
                at: at(),
            })
            .then_expect_events(vec![]);
        Given::with(())
            .given(vec![created()])
            .when(CampaignCommand::Rename {
                name: name("Q1 outreach"),
                at: at(),
            })
            .then_expect_events(vec![CampaignEvent::CampaignRenamed {
                name: name("Q1 outreach"),
                renamed_at: at(),
            }]);
    }

    #[test]
    fn a_name_is_trimmed_and_must_be_1_to_200_characters() {
        assert_eq!(name("  spaced  ").as_str(), "spaced");
        assert!(CampaignName::parse("   ").is_err());
        assert!(CampaignName::parse(&"x".repeat(200)).is_ok());
        assert!(CampaignName::parse(&"x".repeat(201)).is_err());
        assert!(CampaignName::parse("bad\u{0007}bell").is_err());
    }

    #[test]
    fn events_keep_their_stored_type_names() {
        assert_eq!(created().event_type(), "CampaignCreated");
        let json = serde_json::to_value(created()).unwrap();
        assert!(json.get("CampaignCreated").is_some(), "{json}");
    }

    fn changes(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect()
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn linked(linked: &[(&str, &str)], unlinked: &[(&str, &str)]) -> CampaignEvent {
        CampaignEvent::CampaignExternalIdsChanged {
            linked: map(linked),
            unlinked: map(unlinked),
            changed_at: at(),
        }
    }

    #[test]
    fn linking_external_ids_records_new_and_replaced_ones() {
        Given::with(())
            .given(vec![created(), linked(&[("instantly", "a")], &[])])
            .when(CampaignCommand::Update {
                name: None,
                external_ids: changes(&[("instantly", Some("b")), ("smartlead", Some("42"))]),
                at: at(),
            })
            .then_expect_events(vec![linked(
                &[("instantly", "b"), ("smartlead", "42")],
                &[("instantly", "a")],
            )]);
    }

    #[test]
    fn unlinking_and_relinking_the_same_ids_changes_only_what_differs() {
        Given::with(())
            .given(vec![created(), linked(&[("instantly", "a")], &[])])
            .when(CampaignCommand::Update {
                name: None,
                external_ids: changes(&[("instantly", Some("a")), ("smartlead", None)]),
                at: at(),
            })
            .then_expect_events(vec![]);
        Given::with(())
            .given(vec![created(), linked(&[("instantly", "a")], &[])])
            .when(CampaignCommand::Update {
                name: None,
                external_ids: changes(&[("instantly", None)]),
                at: at(),
            })
            .then_expect_events(vec![linked(&[], &[("instantly", "a")])]);
    }

    #[test]
    fn external_ids_with_a_bad_source_or_id_are_refused() {
        for (source, id) in [
            ("Instantly", "a"),
            ("", "a"),
            ("instantly", ""),
            ("x", "a\nb"),
        ] {
            let result = Given::with(())
                .given(vec![created()])
                .when(CampaignCommand::Update {
                    name: None,
                    external_ids: changes(&[(source, Some(id))]),
                    at: at(),
                })
                .inspect_result();
            assert!(
                matches!(result, Err(CampaignError::InvalidExternalId(_))),
                "{source:?} {id:?}: {result:?}"
            );
        }
    }

    #[test]
    fn an_update_renames_and_links_in_one_command() {
        Given::with(())
            .given(vec![created()])
            .when(CampaignCommand::Update {
                name: Some(name("Q1")),
                external_ids: changes(&[("instantly", Some("a"))]),
                at: at(),
            })
            .then_expect_events(vec![
                CampaignEvent::CampaignRenamed {
                    name: name("Q1"),
                    renamed_at: at(),
                },
                linked(&[("instantly", "a")], &[]),
            ]);
    }

    #[test]
    fn the_state_keeps_the_links_after_changes() {
        let mut campaign = Campaign::default();
        for event in [
            created(),
            linked(&[("instantly", "a"), ("smartlead", "1")], &[]),
            linked(
                &[("instantly", "b")],
                &[("instantly", "a"), ("smartlead", "1")],
            ),
        ] {
            campaign.apply(event);
        }
        assert_eq!(campaign.external_ids, map(&[("instantly", "b")]));
    }
}
