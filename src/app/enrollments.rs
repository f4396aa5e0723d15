//! Bulk enrollment of contacts in a campaign.
//!
//! A contact is enrolled in a campaign at most once whatever the concurrency: the
//! enrollment's id is derived from (campaign, contact), so two writers meet on one stream
//! and only one can create it.

use std::collections::{HashMap, HashSet};

use aggregates::campaign::{Campaign, CampaignStatus};
use aggregates::contact::Contact;
use aggregates::enrollment::{Enrollment, EnrollmentCommand, EnrollmentEvent, enrollment_id_for};
use chrono::Utc;
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::app::App;
use crate::app::command::{self, Abort, Answer, CommandContext, Reply, Retried};
use crate::app::error::AppError;
use crate::store::{Hold, Loaded, Position};

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Enrolled {
    pub contact_id: Uuid,
    pub enrollment_id: Uuid,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Rejected {
    pub contact_id: Uuid,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EnrollResponse {
    pub enrolled: Vec<Enrolled>,
    pub already_enrolled: Vec<Enrolled>,
    pub rejected: Vec<Rejected>,
    /// Read-your-writes token of the last enrollment written (null when none was).
    pub position: Option<String>,
}

/// Enrolls `contact_ids` (repeats count once) in `campaign`, a campaign that exists and is
/// not completed; the answer lists what became of each contact. A completed campaign is a
/// refusal answered (and recorded for the idempotency key) as `refusal` renders it.
pub async fn enroll(
    state: &App,
    context: &CommandContext,
    campaign: Uuid,
    contact_ids: Vec<Uuid>,
    refusal: impl Fn(AppError) -> Reply,
) -> Result<Answer, AppError> {
    let mut seen = HashSet::new();
    let contacts: Vec<Uuid> = contact_ids
        .into_iter()
        .filter(|c| seen.insert(*c))
        .collect();
    let metadata = context.metadata();
    let at = Utc::now();
    let (contacts, metadata, refusal) = (&contacts, &metadata, &refusal);
    let outcome = state
        .retrying(Enrollment::TYPE, |mut tx| async move {
            let outcome = async {
                if let Some(recorded) = command::replay(&mut tx, context).await? {
                    return Ok(Answer::Replayed(recorded));
                }
                // Shared with other enrollments, exclusive against the campaign's lifecycle
                // commands: a completion waits for this decision to commit, or this one reads
                // the completion.
                state
                    .store
                    .hold_stream::<Campaign>(&mut tx, &campaign.to_string(), Hold::Shared)
                    .await?;
                let loaded_campaign: Loaded<Campaign> =
                    state.store.load(&mut tx, &campaign.to_string()).await?;
                if !loaded_campaign.aggregate.created {
                    return Err(AppError::NotFound("no campaign with this id".into()).into());
                }
                if loaded_campaign.aggregate.status == CampaignStatus::Completed {
                    // The outcome of executing the request: a retry with the key gets it again.
                    let reply = refusal(AppError::conflict(
                        "campaign-completed",
                        "a completed campaign takes no enrollments",
                    ));
                    command::record(&mut tx, context, &reply).await?;
                    return Ok(Answer::Fresh(reply));
                }
                let stop_on_reply = loaded_campaign.aggregate.stop_on_reply;
                let contact_keys: Vec<String> = contacts.iter().map(Uuid::to_string).collect();
                let known: HashMap<String, Loaded<Contact>> =
                    state.store.load_many(&mut tx, &contact_keys).await?;
                let enrollment_ids: Vec<String> = contacts
                    .iter()
                    .map(|c| enrollment_id_for(campaign, *c).to_string())
                    .collect();
                let mut enrollments: HashMap<String, Loaded<Enrollment>> =
                    state.store.load_many(&mut tx, &enrollment_ids).await?;
                let suppressed =
                    crate::app::suppressions::suppressed_among(&mut tx, contacts).await?;
                let mut response = EnrollResponse {
                    enrolled: Vec::new(),
                    already_enrolled: Vec::new(),
                    rejected: Vec::new(),
                    position: None,
                };
                let mut new_events: HashMap<String, Vec<EnrollmentEvent>> = HashMap::new();
                for (contact, enrollment_key) in contacts.iter().zip(&enrollment_ids) {
                    let pair = Enrolled {
                        contact_id: *contact,
                        enrollment_id: enrollment_id_for(campaign, *contact),
                    };
                    let state = known.get(&contact.to_string()).map(|c| &c.aggregate);
                    if !state.is_some_and(|c| c.created) {
                        response.rejected.push(Rejected {
                            contact_id: *contact,
                            reason: "unknown contact".into(),
                        });
                        continue;
                    }
                    // Erased (and not created again): there is no one to contact, whether
                    // or not its suppression is still in place.
                    if state.is_some_and(|c| c.erased_at.is_some()) {
                        response.rejected.push(Rejected {
                            contact_id: *contact,
                            reason: "erased".into(),
                        });
                        continue;
                    }
                    let enrollment = enrollments
                        .get_mut(enrollment_key)
                        .expect("loaded every id");
                    if enrollment.aggregate.enrolled {
                        response.already_enrolled.push(pair);
                        continue;
                    }
                    if suppressed.contains(contact) {
                        response.rejected.push(Rejected {
                            contact_id: *contact,
                            reason: "suppressed".into(),
                        });
                        continue;
                    }
                    let sink = EventSink::default();
                    let command = EnrollmentCommand::Enroll {
                        campaign_id: campaign,
                        contact_id: *contact,
                        stop_on_reply,
                        at,
                    };
                    enrollment
                        .aggregate
                        .handle(command, &(), &sink)
                        .await
                        .map_err(AppError::from)?;
                    new_events.insert(enrollment_key.clone(), sink.collect().await);
                    response.enrolled.push(pair);
                }
                let mut streams: Vec<(&mut Loaded<Enrollment>, &[EnrollmentEvent])> = enrollments
                    .iter_mut()
                    .filter_map(|(id, l)| new_events.get(id).map(|e| (l, e.as_slice())))
                    .collect();
                let appended = state
                    .store
                    .append_many(&mut tx, &mut streams, metadata)
                    .await?;
                let last: Option<Position> =
                    appended.iter().filter_map(|a| a.last_position()).max();
                response.position = last.map(|p| p.to_string());
                let reply = Reply::ok(serde_json::to_value(&response).unwrap_or_default());
                command::record(&mut tx, context, &reply).await?;
                Ok::<_, Abort>(Answer::Fresh(reply))
            }
            .await;
            (tx, outcome)
        })
        .await?;
    match outcome {
        Retried::Done(answer) => Ok(answer),
        Retried::Exhausted => Err(AppError::conflict(
            "concurrency-conflict",
            "the enrollments kept changing under this request; retry it",
        )),
    }
}
