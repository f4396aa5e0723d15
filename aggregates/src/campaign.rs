//! Campaign: an outreach campaign's life, draft → running ⇄ paused → completed.

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
}

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
}

impl DomainEvent for CampaignEvent {
    fn event_type(&self) -> String {
        match self {
            Self::CampaignCreated { .. } => "CampaignCreated",
            Self::CampaignRenamed { .. } => "CampaignRenamed",
            Self::CampaignStarted { .. } => "CampaignStarted",
            Self::CampaignPaused { .. } => "CampaignPaused",
            Self::CampaignCompleted { .. } => "CampaignCompleted",
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
}

impl Campaign {
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
}
