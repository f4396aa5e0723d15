//! Enrollment routes: bulk enrollment of contacts in a campaign, enrollments by campaign
//! and status, one enrollment from its stream, and campaign metrics.
//!
//! A contact is enrolled in a campaign at most once whatever the concurrency: the
//! enrollment's id is derived from (campaign, contact), so two writers meet on one stream
//! and only one can create it.

use std::collections::{HashMap, HashSet};

use aggregates::campaign::{Campaign, CampaignStatus};
use aggregates::contact::Contact;
use aggregates::enrollment::{Enrollment, EnrollmentCommand, EnrollmentEvent, enrollment_id_for};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::error::{ApiError, FieldError};
use crate::http::AppState;
use crate::http::command::{self, Abort, Reply, Retry, Settled};
use crate::http::extract::{
    ApiQuery, CommandRequest, MinPosition, PageQuery, cut_page, json_with_etag,
};
use crate::store::{Hold, Loaded, Position};

const TAG: &str = "enrollments";
const READ_MODEL: &str = "enrollments";
pub const MAX_BULK: usize = 1000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(enroll, list_enrollments))
        .routes(routes!(get_enrollment))
        .routes(routes!(campaign_metrics))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// 1..=1000 contact ids; repeats count once.
    contact_ids: Vec<Uuid>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Enrolled {
    contact_id: Uuid,
    enrollment_id: Uuid,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Rejected {
    contact_id: Uuid,
    reason: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EnrollResponse {
    enrolled: Vec<Enrolled>,
    already_enrolled: Vec<Enrolled>,
    rejected: Vec<Rejected>,
    /// Read-your-writes token of the last enrollment written (null when none was).
    position: Option<String>,
}

fn campaign_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound("no campaign with this id".into()))
}

/// Enroll contacts in a campaign (not a completed one).
#[utoipa::path(post, path = "/v1/campaigns/{id}/enrollments", tag = TAG, request_body = EnrollRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = EnrollResponse), (status = 404), (status = 409, description = "Completed campaign"), (status = 422)))]
async fn enroll(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let campaign = campaign_id(&id)?;
    let input: EnrollRequest = request.json()?;
    if input.contact_ids.is_empty() || input.contact_ids.len() > MAX_BULK {
        return Err(ApiError::invalid(vec![FieldError::new(
            "contact_ids",
            format!("must hold 1 to {MAX_BULK} contact ids"),
        )]));
    }
    let mut seen = HashSet::new();
    let contacts: Vec<Uuid> = input
        .contact_ids
        .into_iter()
        .filter(|c| seen.insert(*c))
        .collect();
    let metadata = request.metadata();
    let at = Utc::now();
    let mut retry = Retry::new(&state, Enrollment::TYPE);
    loop {
        let mut tx = state.pool.begin().await?;
        let outcome = async {
            if let Some(response) = command::replay(&mut tx, &request).await? {
                return Ok(response);
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
                return Err(ApiError::NotFound("no campaign with this id".into()).into());
            }
            if loaded_campaign.aggregate.status == CampaignStatus::Completed {
                // The outcome of executing the request: a retry with the key gets it again.
                let reply = command::error_reply(&ApiError::conflict(
                    "campaign-completed",
                    "a completed campaign takes no enrollments",
                ));
                command::record(&mut tx, &request, &reply).await?;
                return Ok(reply.into_response());
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
                if !known
                    .get(&contact.to_string())
                    .is_some_and(|c| c.aggregate.created)
                {
                    response.rejected.push(Rejected {
                        contact_id: *contact,
                        reason: "unknown contact".into(),
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
                    .map_err(ApiError::from)?;
                new_events.insert(enrollment_key.clone(), sink.collect().await);
                response.enrolled.push(pair);
            }
            let mut streams: Vec<(&mut Loaded<Enrollment>, &[EnrollmentEvent])> = enrollments
                .iter_mut()
                .filter_map(|(id, l)| new_events.get(id).map(|e| (l, e.as_slice())))
                .collect();
            let appended = state
                .store
                .append_many(&mut tx, &mut streams, &metadata)
                .await?;
            let last: Option<Position> = appended.iter().filter_map(|a| a.last_position()).max();
            response.position = last.map(|p| p.to_string());
            let reply = Reply::ok(serde_json::to_value(&response).unwrap_or_default());
            command::record(&mut tx, &request, &reply).await?;
            Ok::<_, Abort>(reply.into_response())
        }
        .await;
        match retry.settle(tx, outcome).await? {
            Settled::Done(response) => return Ok(response),
            Settled::Again => {}
            Settled::GaveUp => {
                return Err(ApiError::conflict(
                    "concurrency-conflict",
                    "the enrollments kept changing under this request; retry it",
                ));
            }
        }
    }
}

/// An enrollment as its stream says.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnrollmentBody {
    id: Uuid,
    campaign_id: Option<Uuid>,
    contact_id: Option<Uuid>,
    /// enrolled | sent | delivered | opened | clicked | replied | bounced | unsubscribed | complained
    status: String,
    enrolled_at: Option<DateTime<Utc>>,
    sent_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
    opened_at: Option<DateTime<Utc>>,
    clicked_at: Option<DateTime<Utc>>,
    replied_at: Option<DateTime<Utc>>,
    bounced_at: Option<DateTime<Utc>>,
    unsubscribed_at: Option<DateTime<Utc>>,
    complained_at: Option<DateTime<Utc>>,
    /// Set when the sequence stopped (a reply with `stop_on_reply`, or a terminal outcome).
    sequence_ended_at: Option<DateTime<Utc>>,
    version: u64,
}

/// An enrollment, from its event stream.
#[utoipa::path(get, path = "/v1/enrollments/{id}", tag = TAG, params(("id" = Uuid, Path), ("min_position" = Option<String>, Query, description = "Position token of a write; always reached here")),
    responses((status = 200, body = EnrollmentBody), (status = 404)))]
async fn get_enrollment(
    State(state): State<AppState>,
    Path(id): Path<String>,
    // Read from the stream, which holds every committed write: a valid token is already
    // reached. It is still checked, like on every read.
    _min_position: MinPosition,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound("no enrollment with this id".into());
    let id = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let loaded: Loaded<Enrollment> = command::load_existing(
        &state,
        id,
        |e: &Enrollment| e.enrolled,
        "no enrollment with this id",
    )
    .await?;
    let e = &loaded.aggregate;
    let m = e.milestones();
    let body = EnrollmentBody {
        id,
        campaign_id: e.campaign_id,
        contact_id: e.contact_id,
        status: e.status().as_str().to_string(),
        enrolled_at: e.enrolled_at,
        sent_at: m.sent_at,
        delivered_at: m.delivered_at,
        opened_at: m.opened_at,
        clicked_at: m.clicked_at,
        replied_at: m.replied_at,
        bounced_at: m.bounced_at,
        unsubscribed_at: m.unsubscribed_at,
        complained_at: m.complained_at,
        sequence_ended_at: e.sequence_ended_at(),
        version: loaded.version,
    };
    Ok(json_with_etag(&body, loaded.version))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListEnrollments {
    /// One status (see the enrollment's `status`).
    status: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
    #[allow(dead_code)]
    min_position: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EnrollmentItem {
    id: Uuid,
    campaign_id: Uuid,
    contact_id: Uuid,
    status: String,
    enrolled_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
    opened_at: Option<DateTime<Utc>>,
    clicked_at: Option<DateTime<Utc>>,
    replied_at: Option<DateTime<Utc>>,
    bounced_at: Option<DateTime<Utc>>,
    unsubscribed_at: Option<DateTime<Utc>>,
    complained_at: Option<DateTime<Utc>>,
    sequence_ended_at: Option<DateTime<Utc>>,
    version: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EnrollmentPage {
    items: Vec<EnrollmentItem>,
    next_cursor: Option<String>,
}

const STATUSES: [&str; 9] = [
    "enrolled",
    "sent",
    "delivered",
    "opened",
    "clicked",
    "replied",
    "bounced",
    "unsubscribed",
    "complained",
];

/// A campaign's enrollments, newest first (read model `enrollments`).
#[utoipa::path(get, path = "/v1/campaigns/{id}/enrollments", tag = TAG,
    params(("id" = Uuid, Path), ListEnrollments),
    responses((status = 200, body = EnrollmentPage), (status = 400), (status = 503)))]
async fn list_enrollments(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<ListEnrollments>,
    min_position: MinPosition,
) -> Result<Response, ApiError> {
    let campaign = campaign_id(&id)?;
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor.clone(),
    };
    let limit = page.limit()?;
    let cursor: Option<(DateTime<Utc>, Uuid)> = page.cursor()?;
    if let Some(s) = &query.status
        && !STATUSES.contains(&s.as_str())
    {
        return Err(ApiError::BadRequest(format!(
            "status must be one of {}",
            STATUSES.join(", ")
        )));
    }
    min_position.wait(&state, &[READ_MODEL]).await?;
    let (after_at, after_id) = cursor.map_or((None, None), |(a, i)| (Some(a), Some(i)));
    let mut items = sqlx::query_as!(
        EnrollmentItem,
        "SELECT id, campaign_id, contact_id, status, enrolled_at, sent_at, delivered_at, opened_at,
                clicked_at, replied_at, bounced_at, unsubscribed_at, complained_at,
                sequence_ended_at, version
         FROM enrollments_view
         WHERE campaign_id = $1
           AND ($2::text IS NULL OR status = $2)
           AND ($3::timestamptz IS NULL OR (enrolled_at, id) < ($3, $4))
         ORDER BY enrolled_at DESC, id DESC
         LIMIT $5",
        campaign,
        query.status,
        after_at,
        after_id,
        limit + 1
    )
    .fetch_all(&state.pool)
    .await?;
    let next_cursor = cut_page(&mut items, limit, |e| (e.enrolled_at, e.id));
    Ok(axum::Json(EnrollmentPage { items, next_cursor }).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    #[allow(dead_code)]
    min_position: Option<String>,
}

/// Counts are enrollments that reached each milestone (implied ones included); rates are
/// percentages rounded to 2 decimals, 0 when their denominator is 0.
#[derive(Debug, Serialize, ToSchema)]
pub struct CampaignMetrics {
    campaign_id: Uuid,
    enrolled: i64,
    sent: i64,
    delivered: i64,
    opened: i64,
    clicked: i64,
    replied: i64,
    bounced: i64,
    unsubscribed: i64,
    complained: i64,
    delivery_rate: f64,
    open_rate: f64,
    click_rate: f64,
    reply_rate: f64,
    click_through_rate: f64,
    bounce_rate: f64,
    unsubscribe_rate: f64,
}

/// `part / whole × 100`, rounded to 2 decimals; 0 when `whole` is 0.
pub fn rate(part: i64, whole: i64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    // Integer arithmetic first, so 2/3 rounds to 66.67 exactly as a person would.
    let hundredths = (part as i128 * 100_000 / whole as i128 + 5) / 10;
    hundredths as f64 / 100.0
}

/// A campaign's milestone counts and rates (read model `enrollments`).
#[utoipa::path(get, path = "/v1/campaigns/{id}/metrics", tag = TAG,
    params(("id" = Uuid, Path), MetricsQuery),
    responses((status = 200, body = CampaignMetrics), (status = 404), (status = 503)))]
async fn campaign_metrics(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(_query): ApiQuery<MetricsQuery>,
    min_position: MinPosition,
) -> Result<Response, ApiError> {
    let campaign = campaign_id(&id)?;
    min_position.wait(&state, &[READ_MODEL]).await?;
    // 404 for a campaign that does not exist (its stream, not a read model, says so).
    command::load_existing(
        &state,
        campaign,
        |c: &Campaign| c.created,
        "no campaign with this id",
    )
    .await?;
    let row = sqlx::query!(
        "SELECT enrolled, sent, delivered, opened, clicked, replied, bounced, unsubscribed, complained
         FROM campaign_metrics_view WHERE campaign_id = $1",
        campaign
    )
    .fetch_optional(&state.pool)
    .await?;
    let c = |f: fn(&_) -> i64| row.as_ref().map_or(0, f);
    let (enrolled, sent, delivered, opened, clicked, replied, bounced, unsubscribed, complained) = (
        c(|r| r.enrolled),
        c(|r| r.sent),
        c(|r| r.delivered),
        c(|r| r.opened),
        c(|r| r.clicked),
        c(|r| r.replied),
        c(|r| r.bounced),
        c(|r| r.unsubscribed),
        c(|r| r.complained),
    );
    let metrics = CampaignMetrics {
        campaign_id: campaign,
        enrolled,
        sent,
        delivered,
        opened,
        clicked,
        replied,
        bounced,
        unsubscribed,
        complained,
        delivery_rate: rate(delivered, sent),
        open_rate: rate(opened, delivered),
        click_rate: rate(clicked, delivered),
        reply_rate: rate(replied, delivered),
        click_through_rate: rate(clicked, opened),
        bounce_rate: rate(bounced, sent),
        unsubscribe_rate: rate(unsubscribed, delivered),
    };
    Ok(axum::Json(json!(metrics)).into_response())
}

#[cfg(test)]
mod tests {
    use super::rate;

    #[test]
    fn rates_are_percentages_rounded_to_two_decimals_and_zero_over_zero() {
        assert_eq!(rate(2, 3), 66.67);
        assert_eq!(rate(1, 3), 33.33);
        assert_eq!(rate(1, 8), 12.5);
        assert_eq!(rate(5, 5), 100.0);
        assert_eq!(rate(0, 7), 0.0);
        assert_eq!(rate(3, 0), 0.0);
    }
}
