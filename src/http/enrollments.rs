//! Enrollment routes: bulk enrollment of contacts in a campaign, enrollments by campaign
//! and status, one enrollment from its stream, and campaign metrics.
//!
//! A contact is enrolled in a campaign at most once whatever the concurrency: the
//! enrollment's id is derived from (campaign, contact), so two writers meet on one stream
//! and only one can create it.

use aggregates::campaign::Campaign;
use aggregates::enrollment::Enrollment;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::App;
use crate::app::analytics::rate;
use crate::app::enrollments::EnrollResponse;
use crate::app::error::AppError;
use crate::http::command;
use crate::http::error::{ApiError, FieldError};
use crate::http::extract::{
    ApiQuery, CommandRequest, MinPosition, PageQuery, cut_page, json_with_etag,
};
use crate::store::Loaded;

const TAG: &str = "enrollments";
const READ_MODEL: &str = projections::enrollments::NAME;
pub const MAX_BULK: usize = 1000;

pub fn router() -> OpenApiRouter<App> {
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

fn campaign_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound("no campaign with this id".into()))
}

/// Enroll contacts in a campaign (not a completed one).
#[utoipa::path(post, path = "/v1/campaigns/{id}/enrollments", tag = TAG, request_body = EnrollRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = EnrollResponse), (status = 404), (status = 409, description = "Completed campaign"), (status = 422)))]
async fn enroll(
    State(state): State<App>,
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
    let refusal = |e: AppError| command::error_reply(&e.into());
    let answer = crate::app::enrollments::enroll(
        &state,
        &request.context(),
        campaign,
        input.contact_ids,
        refusal,
    )
    .await?;
    Ok(answer.into_response())
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
    State(state): State<App>,
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

impl From<projections::enrollments::EnrollmentRow> for EnrollmentItem {
    fn from(r: projections::enrollments::EnrollmentRow) -> Self {
        Self {
            id: r.id,
            campaign_id: r.campaign_id,
            contact_id: r.contact_id,
            status: r.status,
            enrolled_at: r.enrolled_at,
            sent_at: r.sent_at,
            delivered_at: r.delivered_at,
            opened_at: r.opened_at,
            clicked_at: r.clicked_at,
            replied_at: r.replied_at,
            bounced_at: r.bounced_at,
            unsubscribed_at: r.unsubscribed_at,
            complained_at: r.complained_at,
            sequence_ended_at: r.sequence_ended_at,
            version: r.version,
        }
    }
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
    State(state): State<App>,
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
    let mut conn = min_position.connection(&state, &[READ_MODEL]).await?;
    let rows = projections::enrollments::page(
        &mut conn,
        campaign,
        query.status.as_deref(),
        cursor,
        limit + 1,
    )
    .await?;
    let mut items: Vec<EnrollmentItem> = rows.into_iter().map(EnrollmentItem::from).collect();
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

/// A campaign's milestone counts and rates (read model `enrollments`).
#[utoipa::path(get, path = "/v1/campaigns/{id}/metrics", tag = TAG,
    params(("id" = Uuid, Path), MetricsQuery),
    responses((status = 200, body = CampaignMetrics), (status = 404), (status = 503)))]
async fn campaign_metrics(
    State(state): State<App>,
    Path(id): Path<String>,
    ApiQuery(_query): ApiQuery<MetricsQuery>,
    min_position: MinPosition,
) -> Result<Response, ApiError> {
    let campaign = campaign_id(&id)?;
    // 404 for a campaign that does not exist (its stream, not a read model, says so).
    command::load_existing(
        &state,
        campaign,
        |c: &Campaign| c.created,
        "no campaign with this id",
    )
    .await?;
    let mut conn = min_position.connection(&state, &[READ_MODEL]).await?;
    let row = projections::enrollments::campaign_metrics(&mut conn, campaign).await?;
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
    Ok(axum::Json(metrics).into_response())
}
