//! Enrollment: one contact in one campaign, and what the email provider reported about it
//! (milestones, status), in whatever order and however often the reports arrive.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The namespace of enrollment ids. Fixed forever: stored streams are found by these ids.
pub const ENROLLMENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0xd2f2638a_a568_4b5d_b284_aeba32b06bbd);

/// The id of the enrollment of `contact_id` in `campaign_id` (UUID v5). Every writer
/// computes the same id, so concurrent enrollments of one contact meet on one stream and
/// only one of them can create it.
pub fn enrollment_id_for(campaign_id: Uuid, contact_id: Uuid) -> Uuid {
    let mut name = [0_u8; 32];
    name[..16].copy_from_slice(campaign_id.as_bytes());
    name[16..].copy_from_slice(contact_id.as_bytes());
    Uuid::new_v5(&ENROLLMENT_ID_NAMESPACE, &name)
}

/// What an email provider can report. `bounced` is a hard bounce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderEventKind {
    Sent,
    Delivered,
    Opened,
    Clicked,
    Replied,
    Bounced,
    SoftBounced,
    Deferred,
    Unsubscribed,
    Complained,
}

impl ProviderEventKind {
    pub const ALL: [ProviderEventKind; 10] = [
        Self::Sent,
        Self::Delivered,
        Self::Opened,
        Self::Clicked,
        Self::Replied,
        Self::Bounced,
        Self::SoftBounced,
        Self::Deferred,
        Self::Unsubscribed,
        Self::Complained,
    ];

    /// The webhook's `type` text; `None` for a type this system does not know.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Opened => "opened",
            Self::Clicked => "clicked",
            Self::Replied => "replied",
            Self::Bounced => "bounced",
            Self::SoftBounced => "soft_bounced",
            Self::Deferred => "deferred",
            Self::Unsubscribed => "unsubscribed",
            Self::Complained => "complained",
        }
    }
}

impl std::fmt::Display for ProviderEventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollmentStatus {
    #[default]
    Enrolled,
    Sent,
    Delivered,
    Opened,
    Clicked,
    Replied,
    Bounced,
    Unsubscribed,
    Complained,
}

impl EnrollmentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enrolled => "enrolled",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Opened => "opened",
            Self::Clicked => "clicked",
            Self::Replied => "replied",
            Self::Bounced => "bounced",
            Self::Unsubscribed => "unsubscribed",
            Self::Complained => "complained",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Bounced | Self::Unsubscribed | Self::Complained)
    }
}

impl std::fmt::Display for EnrollmentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A time per milestone. Held twice over: as reported (the earliest `occurred_at` the
/// provider gave for each kind) and as effective (`implied()`: with the milestones each
/// one implies filled in). Both are pure functions of the set of reports, never of their
/// order, so replays and projections agree with the aggregate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Milestones {
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub opened_at: Option<DateTime<Utc>>,
    pub clicked_at: Option<DateTime<Utc>>,
    pub replied_at: Option<DateTime<Utc>>,
    pub bounced_at: Option<DateTime<Utc>>,
    pub unsubscribed_at: Option<DateTime<Utc>>,
    pub complained_at: Option<DateTime<Utc>>,
}

impl Milestones {
    /// Keeps the earliest time reported for `kind`. Soft bounces and deferrals are not
    /// milestones and change nothing.
    pub fn record(&mut self, kind: ProviderEventKind, occurred_at: DateTime<Utc>) {
        let slot = match kind {
            ProviderEventKind::Sent => &mut self.sent_at,
            ProviderEventKind::Delivered => &mut self.delivered_at,
            ProviderEventKind::Opened => &mut self.opened_at,
            ProviderEventKind::Clicked => &mut self.clicked_at,
            ProviderEventKind::Replied => &mut self.replied_at,
            ProviderEventKind::Bounced => &mut self.bounced_at,
            ProviderEventKind::Unsubscribed => &mut self.unsubscribed_at,
            ProviderEventKind::Complained => &mut self.complained_at,
            ProviderEventKind::SoftBounced | ProviderEventKind::Deferred => return,
        };
        *slot = earliest(*slot, Some(occurred_at));
    }

    /// The effective milestones: `sent < delivered < opened < clicked`, and `replied`
    /// implies `delivered`. An implied milestone takes the earliest time of those that
    /// imply it, unless it was reported earlier itself. Terminal outcomes imply what they
    /// need: a hard bounce was sent; a complaint or an unsubscribe was delivered. Without
    /// that, `bounced/sent` and `unsubscribed/delivered` could pass 100%.
    pub fn implied(&self) -> Milestones {
        let clicked_at = self.clicked_at;
        let replied_at = self.replied_at;
        let opened_at = earliest(self.opened_at, clicked_at);
        let delivered_at = [
            opened_at,
            replied_at,
            self.complained_at,
            self.unsubscribed_at,
        ]
        .into_iter()
        .fold(self.delivered_at, earliest);
        let sent_at = earliest(earliest(self.sent_at, delivered_at), self.bounced_at);
        Milestones {
            sent_at,
            delivered_at,
            opened_at,
            clicked_at,
            replied_at,
            ..*self
        }
    }

    /// The status these milestones give: the terminal outcome that occurred first (on a
    /// tie: bounced, complained, unsubscribed), else the highest milestone reached.
    pub fn status(&self) -> EnrollmentStatus {
        let m = self.implied();
        let terminal = [
            (m.bounced_at, EnrollmentStatus::Bounced),
            (m.complained_at, EnrollmentStatus::Complained),
            (m.unsubscribed_at, EnrollmentStatus::Unsubscribed),
        ]
        .into_iter()
        .filter_map(|(at, status)| at.map(|at| (at, status)))
        // `min_by_key` keeps the first of equal keys, which gives the tie order above.
        .min_by_key(|(at, _)| *at);
        if let Some((_, status)) = terminal {
            return status;
        }
        [
            (m.replied_at, EnrollmentStatus::Replied),
            (m.clicked_at, EnrollmentStatus::Clicked),
            (m.opened_at, EnrollmentStatus::Opened),
            (m.delivered_at, EnrollmentStatus::Delivered),
            (m.sent_at, EnrollmentStatus::Sent),
        ]
        .into_iter()
        .find_map(|(at, status)| at.map(|_| status))
        .unwrap_or(EnrollmentStatus::Enrolled)
    }
}

/// What an enrollment can be asked to do. Times come from the caller or the provider.
#[derive(Debug, Clone, PartialEq)]
pub enum EnrollmentCommand {
    Enroll {
        campaign_id: Uuid,
        contact_id: Uuid,
        stop_on_reply: bool,
        at: DateTime<Utc>,
    },
    /// `provider_event_id` must identify the report across sources (the webhook layer
    /// qualifies it with its source); a second report with a known id changes nothing.
    RecordProviderEvent {
        provider_event_id: String,
        kind: ProviderEventKind,
        occurred_at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EnrollmentEvent {
    ContactEnrolled {
        campaign_id: Uuid,
        contact_id: Uuid,
        stop_on_reply: bool,
        enrolled_at: DateTime<Utc>,
    },
    /// Recorded for every new provider event id, even one that changes no milestone, so
    /// that its id is remembered.
    ProviderEventRecorded {
        provider_event_id: String,
        kind: ProviderEventKind,
        occurred_at: DateTime<Utc>,
    },
}

impl DomainEvent for EnrollmentEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ContactEnrolled { .. } => "ContactEnrolled",
            Self::ProviderEventRecorded { .. } => "ProviderEventRecorded",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollmentError {
    #[error("the contact is already enrolled in this campaign")]
    AlreadyEnrolled,
    /// The webhook layer parks the report until the enrollment exists.
    #[error("enrollment does not exist")]
    NotEnrolled,
    #[error("provider event id {0}")]
    InvalidProviderEventId(String),
}

/// A provider's own event id: at most this many characters.
pub const MAX_EXTERNAL_EVENT_ID_CHARS: usize = 255;
/// A webhook source's name: at most this many characters.
pub const MAX_SOURCE_NAME_CHARS: usize = 63;
/// The id an enrollment remembers, `{source}:{provider event id}`: room for the longest
/// source name and the longest provider id, so that every event the webhook layer accepts
/// is one the enrollment accepts.
pub const MAX_PROVIDER_EVENT_ID_CHARS: usize =
    MAX_SOURCE_NAME_CHARS + 1 + MAX_EXTERNAL_EVENT_ID_CHARS;

/// A webhook source's name: 1 to [`MAX_SOURCE_NAME_CHARS`] characters of a-z, 0-9, `_`
/// and `-`, starting with a letter or digit.
pub fn is_source_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SOURCE_NAME_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// Checks a provider event id as the enrollment will: 1 to `max` characters (not bytes),
/// no control characters. The webhook layer checks the provider's part with the same rule.
pub fn check_event_id(id: &str, max: usize) -> Result<(), String> {
    let length = id.chars().count();
    if !(1..=max).contains(&length) || id.trim().is_empty() {
        return Err(format!("must be 1 to {max} characters"));
    }
    if id.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// The enrollment's state, rebuilt from its events (and kept in snapshots).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Enrollment {
    pub enrolled: bool,
    pub campaign_id: Option<Uuid>,
    pub contact_id: Option<Uuid>,
    pub stop_on_reply: bool,
    pub enrolled_at: Option<DateTime<Utc>>,
    /// As reported; see `milestones()` for the effective times.
    pub reported: Milestones,
    pub seen_provider_event_ids: BTreeSet<String>,
}

impl Enrollment {
    /// Whether a report with this id was recorded already (the webhook's `duplicate`).
    pub fn has_seen(&self, provider_event_id: &str) -> bool {
        self.seen_provider_event_ids.contains(provider_event_id)
    }

    /// Effective milestone times, implications applied.
    pub fn milestones(&self) -> Milestones {
        self.reported.implied()
    }

    pub fn status(&self) -> EnrollmentStatus {
        self.reported.status()
    }

    pub fn sent_at(&self) -> Option<DateTime<Utc>> {
        self.milestones().sent_at
    }

    pub fn delivered_at(&self) -> Option<DateTime<Utc>> {
        self.milestones().delivered_at
    }

    pub fn opened_at(&self) -> Option<DateTime<Utc>> {
        self.milestones().opened_at
    }

    pub fn clicked_at(&self) -> Option<DateTime<Utc>> {
        self.milestones().clicked_at
    }

    pub fn replied_at(&self) -> Option<DateTime<Utc>> {
        self.milestones().replied_at
    }

    pub fn bounced_at(&self) -> Option<DateTime<Utc>> {
        self.milestones().bounced_at
    }

    pub fn unsubscribed_at(&self) -> Option<DateTime<Utc>> {
        self.milestones().unsubscribed_at
    }

    pub fn complained_at(&self) -> Option<DateTime<Utc>> {
        self.milestones().complained_at
    }

    /// When the sequence stopped: at the reply when the campaign stops on reply, and in
    /// any case at a hard bounce, a complaint or an unsubscribe (mailing on after those
    /// harms deliverability and, for unsubscribes, breaks the law), whichever came first.
    pub fn sequence_ended_at(&self) -> Option<DateTime<Utc>> {
        let m = self.milestones();
        let reply = if self.stop_on_reply {
            m.replied_at
        } else {
            None
        };
        [m.bounced_at, m.complained_at, m.unsubscribed_at]
            .into_iter()
            .fold(reply, earliest)
    }

    pub fn sequence_ended(&self) -> bool {
        self.sequence_ended_at().is_some()
    }
}

impl Aggregate for Enrollment {
    const TYPE: &'static str = "enrollment";
    type Command = EnrollmentCommand;
    type Event = EnrollmentEvent;
    type Error = EnrollmentError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = match command {
            EnrollmentCommand::Enroll {
                campaign_id,
                contact_id,
                stop_on_reply,
                at,
            } => {
                if self.enrolled {
                    return Err(EnrollmentError::AlreadyEnrolled);
                }
                Some(EnrollmentEvent::ContactEnrolled {
                    campaign_id,
                    contact_id,
                    stop_on_reply,
                    enrolled_at: at,
                })
            }
            EnrollmentCommand::RecordProviderEvent {
                provider_event_id,
                kind,
                occurred_at,
            } => {
                if !self.enrolled {
                    return Err(EnrollmentError::NotEnrolled);
                }
                check_event_id(&provider_event_id, MAX_PROVIDER_EVENT_ID_CHARS)
                    .map_err(EnrollmentError::InvalidProviderEventId)?;
                (!self.has_seen(&provider_event_id)).then_some(
                    EnrollmentEvent::ProviderEventRecorded {
                        provider_event_id,
                        kind,
                        occurred_at,
                    },
                )
            }
        };
        if let Some(event) = event {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            EnrollmentEvent::ContactEnrolled {
                campaign_id,
                contact_id,
                stop_on_reply,
                enrolled_at,
            } => {
                self.enrolled = true;
                self.campaign_id = Some(campaign_id);
                self.contact_id = Some(contact_id);
                self.stop_on_reply = stop_on_reply;
                self.enrolled_at = Some(enrolled_at);
            }
            EnrollmentEvent::ProviderEventRecorded {
                provider_event_id,
                kind,
                occurred_at,
            } => {
                self.reported.record(kind, occurred_at);
                self.seen_provider_event_ids.insert(provider_event_id);
            }
        }
    }
}

#[cfg(test)]
mod implication_tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().into()
    }

    #[test]
    fn terminal_outcomes_imply_the_milestones_they_need() {
        let mut m = Milestones::default();
        m.record(ProviderEventKind::Bounced, t("2026-11-01T10:00:00Z"));
        assert_eq!(m.implied().sent_at, Some(t("2026-11-01T10:00:00Z")));
        assert_eq!(
            m.implied().delivered_at,
            None,
            "a bounce was never delivered"
        );
        let mut m = Milestones::default();
        m.record(ProviderEventKind::Unsubscribed, t("2026-11-01T11:00:00Z"));
        m.record(ProviderEventKind::Sent, t("2026-11-01T09:00:00Z"));
        let i = m.implied();
        assert_eq!(i.delivered_at, Some(t("2026-11-01T11:00:00Z")));
        assert_eq!(
            i.sent_at,
            Some(t("2026-11-01T09:00:00Z")),
            "reported earlier itself"
        );
        assert_eq!(m.status(), EnrollmentStatus::Unsubscribed);
        let mut m = Milestones::default();
        m.record(ProviderEventKind::Complained, t("2026-11-01T12:00:00Z"));
        assert_eq!(m.implied().delivered_at, Some(t("2026-11-01T12:00:00Z")));
        assert_eq!(m.implied().sent_at, Some(t("2026-11-01T12:00:00Z")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProviderEventKind::*;
    use chrono::Duration;
    use cqrs_es::test::TestFramework;
    use proptest::prelude::*;

    type Given = TestFramework<Enrollment>;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-01T09:00:00Z")
            .unwrap()
            .into()
    }

    /// `minutes` after t0.
    fn t(minutes: i64) -> DateTime<Utc> {
        t0() + Duration::minutes(minutes)
    }

    fn campaign() -> Uuid {
        Uuid::from_u128(1)
    }

    fn contact() -> Uuid {
        Uuid::from_u128(2)
    }

    fn enrolled(stop_on_reply: bool) -> EnrollmentEvent {
        EnrollmentEvent::ContactEnrolled {
            campaign_id: campaign(),
            contact_id: contact(),
            stop_on_reply,
            enrolled_at: t0(),
        }
    }

    fn report(id: &str, kind: ProviderEventKind, minutes: i64) -> EnrollmentCommand {
        EnrollmentCommand::RecordProviderEvent {
            provider_event_id: id.to_string(),
            kind,
            occurred_at: t(minutes),
        }
    }

    /// Runs each command against the events so far, as the store would, and returns the
    /// resulting state; a refused command panics.
    fn run(
        stop_on_reply: bool,
        commands: impl IntoIterator<Item = EnrollmentCommand>,
    ) -> Enrollment {
        let mut events = vec![enrolled(stop_on_reply)];
        for command in commands {
            let new = Given::with(())
                .given(events.clone())
                .when(command)
                .inspect_result()
                .unwrap();
            events.extend(new);
        }
        let mut enrollment = Enrollment::default();
        for event in events {
            enrollment.apply(event);
        }
        enrollment
    }

    /// Reports with ids "e0", "e1", ... in the given arrival order.
    fn reports(arrivals: &[(ProviderEventKind, i64)]) -> Enrollment {
        run(
            true,
            arrivals
                .iter()
                .enumerate()
                .map(|(i, (kind, minutes))| report(&format!("e{i}"), *kind, *minutes)),
        )
    }

    #[test]
    fn the_enrollment_id_is_fixed_by_campaign_and_contact() {
        let id = enrollment_id_for(campaign(), contact());
        assert_eq!(id, enrollment_id_for(campaign(), contact()));
        assert_ne!(id, enrollment_id_for(contact(), campaign()));
        assert_ne!(id, enrollment_id_for(campaign(), Uuid::from_u128(3)));
        assert_eq!(id.get_version_num(), 5);
    }

    #[test]
    fn enrolling_records_the_contact_in_the_campaign() {
        Given::with(())
            .given_no_previous_events()
            .when(EnrollmentCommand::Enroll {
                campaign_id: campaign(),
                contact_id: contact(),
                stop_on_reply: true,
                at: t0(),
            })
            .then_expect_events(vec![enrolled(true)]);
        assert_eq!(run(true, []).status(), EnrollmentStatus::Enrolled);
    }

    #[test]
    fn enrolling_twice_is_refused() {
        Given::with(())
            .given(vec![enrolled(true)])
            .when(EnrollmentCommand::Enroll {
                campaign_id: campaign(),
                contact_id: contact(),
                stop_on_reply: false,
                at: t(5),
            })
            .then_expect_error(EnrollmentError::AlreadyEnrolled);
    }

    #[test]
    fn a_report_for_an_enrollment_that_does_not_exist_is_refused_so_it_can_be_parked() {
        Given::with(())
            .given_no_previous_events()
            .when(report("e1", Opened, 1))
            .then_expect_error(EnrollmentError::NotEnrolled);
    }

    #[test]
    fn a_provider_event_is_recorded_once_and_its_repeat_changes_nothing() {
        Given::with(())
            .given(vec![enrolled(true)])
            .when(report("e1", Opened, 3))
            .then_expect_events(vec![EnrollmentEvent::ProviderEventRecorded {
                provider_event_id: "e1".into(),
                kind: Opened,
                occurred_at: t(3),
            }]);
        let after = vec![
            enrolled(true),
            EnrollmentEvent::ProviderEventRecorded {
                provider_event_id: "e1".into(),
                kind: Opened,
                occurred_at: t(3),
            },
        ];
        Given::with(())
            .given(after.clone())
            .when(report("e1", Opened, 3))
            .then_expect_events(vec![]);
        // Even a repeat that claims another kind: the id was delivered already.
        Given::with(())
            .given(after)
            .when(report("e1", Replied, 9))
            .then_expect_events(vec![]);
        let state = run(true, [report("e1", Opened, 3)]);
        assert!(state.has_seen("e1"));
        assert!(!state.has_seen("e2"));
    }

    #[test]
    fn an_empty_or_oversized_provider_event_id_is_refused() {
        for bad in [
            String::new(),
            " ".into(),
            "x".repeat(MAX_PROVIDER_EVENT_ID_CHARS + 1),
            "a\u{0000}b".to_string(),
        ] {
            let result = Given::with(())
                .given(vec![enrolled(true)])
                .when(EnrollmentCommand::RecordProviderEvent {
                    provider_event_id: bad.clone(),
                    kind: Sent,
                    occurred_at: t(1),
                })
                .inspect_result();
            assert!(
                matches!(result, Err(EnrollmentError::InvalidProviderEventId(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_longest_source_and_provider_id_together_are_accepted_counting_characters() {
        let source = "s".repeat(MAX_SOURCE_NAME_CHARS);
        // Four bytes a character: 1,020 bytes, yet 255 characters.
        let id = "\u{1F600}".repeat(MAX_EXTERNAL_EVENT_ID_CHARS);
        assert!(check_event_id(&id, MAX_EXTERNAL_EVENT_ID_CHARS).is_ok());
        let state = Given::with(())
            .given(vec![enrolled(true)])
            .when(EnrollmentCommand::RecordProviderEvent {
                provider_event_id: format!("{source}:{id}"),
                kind: Sent,
                occurred_at: t(1),
            })
            .inspect_result();
        assert!(state.is_ok(), "{state:?}");
    }

    #[test]
    fn soft_bounces_and_deferrals_are_remembered_but_change_nothing() {
        let state = reports(&[(SoftBounced, 1), (Deferred, 2)]);
        assert_eq!(state.status(), EnrollmentStatus::Enrolled);
        assert_eq!(state.milestones(), Milestones::default());
        assert!(state.has_seen("e0") && state.has_seen("e1"));
    }

    #[test]
    fn each_milestone_keeps_the_earliest_time_reported() {
        let state = reports(&[(Opened, 30), (Opened, 10), (Opened, 20)]);
        assert_eq!(state.opened_at(), Some(t(10)));
    }

    #[test]
    fn a_click_implies_open_delivery_and_sending_at_its_time() {
        let state = reports(&[(Clicked, 7)]);
        assert_eq!(state.status(), EnrollmentStatus::Clicked);
        assert_eq!(state.opened_at(), Some(t(7)));
        assert_eq!(state.delivered_at(), Some(t(7)));
        assert_eq!(state.sent_at(), Some(t(7)));
        assert_eq!(state.replied_at(), None);
    }

    #[test]
    fn an_implied_milestone_takes_the_earliest_of_its_own_report_and_those_implying_it() {
        // Delivered was reported at 20, but an open at 5 implies delivery by 5.
        let state = reports(&[(Delivered, 20), (Opened, 5), (Sent, 1)]);
        assert_eq!(state.delivered_at(), Some(t(5)));
        assert_eq!(state.sent_at(), Some(t(1)));
        // A reply implies delivery but not an open.
        let state = reports(&[(Replied, 4)]);
        assert_eq!(state.delivered_at(), Some(t(4)));
        assert_eq!(state.sent_at(), Some(t(4)));
        assert_eq!(state.opened_at(), None);
    }

    #[test]
    fn the_status_follows_the_rules_for_enrollment_status() {
        use EnrollmentStatus as S;
        /// (case, reports in arrival order as (kind, minutes), expected status)
        type Case = (
            &'static str,
            &'static [(ProviderEventKind, i64)],
            EnrollmentStatus,
        );
        let table: &[Case] = &[
            ("nothing reported", &[], S::Enrolled),
            ("sent", &[(Sent, 1)], S::Sent),
            ("delivered", &[(Sent, 1), (Delivered, 2)], S::Delivered),
            ("opened", &[(Opened, 3)], S::Opened),
            (
                "clicked before opened arrives",
                &[(Clicked, 4), (Opened, 3)],
                S::Clicked,
            ),
            (
                "late opened after replied stays replied",
                &[(Replied, 5), (Opened, 9)],
                S::Replied,
            ),
            (
                "replied outranks clicked",
                &[(Clicked, 9), (Replied, 5)],
                S::Replied,
            ),
            (
                "open after unsubscribe stays unsubscribed",
                &[(Unsubscribed, 5), (Opened, 6)],
                S::Unsubscribed,
            ),
            (
                "reply after unsubscribe stays unsubscribed",
                &[(Unsubscribed, 5), (Replied, 6)],
                S::Unsubscribed,
            ),
            (
                "a terminal outcome outranks an earlier reply",
                &[(Replied, 1), (Bounced, 2)],
                S::Bounced,
            ),
            (
                "two terminals: the earliest wins",
                &[(Bounced, 8), (Unsubscribed, 3)],
                S::Unsubscribed,
            ),
            (
                "two terminals: arrival order does not matter",
                &[(Unsubscribed, 3), (Complained, 2)],
                S::Complained,
            ),
            (
                "tie: bounced before complained",
                &[(Complained, 4), (Bounced, 4)],
                S::Bounced,
            ),
            (
                "tie: complained before unsubscribed",
                &[(Unsubscribed, 4), (Complained, 4)],
                S::Complained,
            ),
            (
                "tie of three: bounced",
                &[(Unsubscribed, 4), (Complained, 4), (Bounced, 4)],
                S::Bounced,
            ),
            (
                "soft bounce is not a bounce",
                &[(Sent, 1), (SoftBounced, 2)],
                S::Sent,
            ),
            (
                "deferral changes nothing",
                &[(Delivered, 1), (Deferred, 2)],
                S::Delivered,
            ),
        ];
        for (case, arrivals, expected) in table {
            assert_eq!(reports(arrivals).status(), *expected, "{case}");
        }
    }

    #[test]
    fn a_late_open_after_a_reply_sets_opened_at_and_leaves_the_reply() {
        let state = reports(&[(Replied, 5), (Opened, 9)]);
        assert_eq!(state.status(), EnrollmentStatus::Replied);
        assert_eq!(state.opened_at(), Some(t(9)));
        assert_eq!(state.replied_at(), Some(t(5)));
        assert_eq!(state.delivered_at(), Some(t(5)));
    }

    #[test]
    fn with_stop_on_reply_a_reply_ends_the_sequence() {
        let stops = run(true, [report("e1", Replied, 5)]);
        assert!(stops.sequence_ended());
        assert_eq!(stops.sequence_ended_at(), Some(t(5)));
        let goes_on = run(false, [report("e1", Replied, 5)]);
        assert!(!goes_on.sequence_ended());
        assert_eq!(goes_on.status(), EnrollmentStatus::Replied);
        let not_yet = run(true, [report("e1", Opened, 5)]);
        assert!(!not_yet.sequence_ended());
    }

    #[test]
    fn an_unsubscribe_ends_the_sequence_even_without_stop_on_reply() {
        let state = run(
            false,
            [report("e1", Replied, 9), report("e2", Unsubscribed, 7)],
        );
        assert_eq!(state.sequence_ended_at(), Some(t(7)));
    }

    #[test]
    fn provider_event_kinds_read_and_write_the_webhook_names() {
        for kind in ProviderEventKind::ALL {
            assert_eq!(ProviderEventKind::parse(kind.as_str()), Some(kind));
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.as_str())
            );
        }
        assert_eq!(ProviderEventKind::parse("soft_bounced"), Some(SoftBounced));
        assert_eq!(ProviderEventKind::parse("hard_bounced"), None);
        assert_eq!(
            serde_json::to_value(EnrollmentStatus::Unsubscribed).unwrap(),
            serde_json::json!("unsubscribed")
        );
    }

    #[test]
    fn events_keep_their_stored_type_names() {
        assert_eq!(enrolled(true).event_type(), "ContactEnrolled");
        let recorded = EnrollmentEvent::ProviderEventRecorded {
            provider_event_id: "e1".into(),
            kind: SoftBounced,
            occurred_at: t(1),
        };
        assert_eq!(recorded.event_type(), "ProviderEventRecorded");
        assert_eq!(recorded.event_version(), "1.0");
        let json = serde_json::to_value(&recorded).unwrap();
        assert_eq!(json["ProviderEventRecorded"]["kind"], "soft_bounced");
        assert_eq!(
            serde_json::from_value::<EnrollmentEvent>(json).unwrap(),
            recorded
        );
    }

    fn any_report() -> impl Strategy<Value = (ProviderEventKind, i64)> {
        (
            prop::sample::select(ProviderEventKind::ALL.to_vec()),
            0_i64..20,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn arrival_order_and_repeats_never_change_status_or_milestones(
            (arrivals, shuffled) in prop::collection::vec((any_report(), 0_usize..3), 1..10)
                .prop_flat_map(|reports| {
                    // Each report arrives 1 to 3 times, as providers retry.
                    let arrivals: Vec<(usize, ProviderEventKind, i64)> = reports
                        .iter()
                        .enumerate()
                        .flat_map(|(i, ((kind, minutes), extra))| {
                            std::iter::repeat_n((i, *kind, *minutes), 1 + extra)
                        })
                        .collect();
                    (Just(arrivals.clone()), Just(arrivals).prop_shuffle())
                })
        ) {
            let commands = |list: &[(usize, ProviderEventKind, i64)]| {
                list.iter()
                    .map(|(i, kind, minutes)| report(&format!("e{i}"), *kind, *minutes))
                    .collect::<Vec<_>>()
            };
            let a = run(true, commands(&arrivals));
            let b = run(true, commands(&shuffled));
            prop_assert_eq!(a.status(), b.status());
            prop_assert_eq!(a.milestones(), b.milestones());
            prop_assert_eq!(a.reported, b.reported);
            prop_assert_eq!(a.sequence_ended_at(), b.sequence_ended_at());
            prop_assert_eq!(&a.seen_provider_event_ids, &b.seen_provider_event_ids);
            // Effective milestones are ordered as they imply one another.
            let m = a.milestones();
            for (earlier, later) in [
                (m.sent_at, m.delivered_at),
                (m.delivered_at, m.opened_at),
                (m.opened_at, m.clicked_at),
                (m.delivered_at, m.replied_at),
            ] {
                if let Some(later) = later {
                    prop_assert!(earlier.is_some_and(|e| e <= later));
                }
            }
        }
    }
}
