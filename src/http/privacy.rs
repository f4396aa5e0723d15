//! Personal-data routes of a contact: consent, the export of everything held about the
//! person and the attributable history of their record. (Erasure is `DELETE` on the
//! contact, in `contacts`.)

use aggregates::contact::{ConsentBasis, ConsentStatus, Contact, ContactCommand};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::App;
use crate::app::privacy::{ExportedEvent, HistoryItem};
use crate::app::suppressions::Suppression;
use crate::http::command;
use crate::http::contacts::{ConsentBody, ContactBody, ContactWritten, body, parse_id, reply};
use crate::http::error::ApiError;
use crate::http::extract::{ApiQuery, CommandRequest, PageQuery, cut_page};

const TAG: &str = "contacts";

pub fn router() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(record_consent))
        .routes(routes!(export_contact))
        .routes(routes!(contact_history))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsentInput {
    /// granted | withdrawn
    #[schema(value_type = String)]
    status: ConsentStatus,
    /// consent | legitimate_interest | contract
    #[schema(value_type = Option<String>)]
    basis: Option<ConsentBasis>,
    /// Where the consent was given or withdrawn (a form, a call); at most 200 characters.
    source: Option<String>,
}

/// Record the person's consent, or its withdrawal (which suppresses the address).
#[utoipa::path(post, path = "/v1/contacts/{id}/consent", tag = TAG, request_body = ConsentInput,
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = ContactWritten), (status = 404), (status = 410), (status = 422)))]
async fn record_consent(
    State(state): State<App>,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let input: ConsentInput = request.json()?;
    let at = Utc::now();
    command::execute::<Contact, _, _>(
        &state,
        &request,
        &id.to_string(),
        &(),
        |_| {
            Ok(ContactCommand::RecordConsent {
                status: input.status,
                basis: input.basis,
                source: input.source.clone(),
                at,
            })
        },
        |written| reply(id, written),
    )
    .await
}

/// An enrollment of the person, with its milestones.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExportedEnrollment {
    id: Uuid,
    campaign_id: Uuid,
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
}

/// Everything held about a person.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContactExport {
    contact: ContactBody,
    /// Every event of the contact's stream, decrypted.
    events: Vec<ExportedEvent>,
    enrollments: Vec<ExportedEnrollment>,
    consent: Option<ConsentBody>,
    suppression: Option<Suppression>,
}

/// Everything held about a person: profile, every event of their record, enrollments with
/// milestones, consent and suppression.
#[utoipa::path(get, path = "/v1/contacts/{id}/export", tag = TAG, params(("id" = Uuid, Path)),
    responses((status = 200, body = ContactExport), (status = 404), (status = 410)))]
async fn export_contact(
    State(state): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let export = crate::app::privacy::export(&state, id).await?;
    let consent = export
        .contact
        .aggregate
        .consent
        .as_ref()
        .map(ConsentBody::of);
    let body = ContactExport {
        contact: body(id, &export.contact),
        events: export.events,
        enrollments: export
            .enrollments
            .into_iter()
            .map(|e| ExportedEnrollment {
                id: e.id,
                campaign_id: e.campaign_id,
                status: e.status,
                enrolled_at: e.enrolled_at,
                sent_at: e.sent_at,
                delivered_at: e.delivered_at,
                opened_at: e.opened_at,
                clicked_at: e.clicked_at,
                replied_at: e.replied_at,
                bounced_at: e.bounced_at,
                unsubscribed_at: e.unsubscribed_at,
                complained_at: e.complained_at,
            })
            .collect(),
        consent,
        suppression: export.suppression,
    };
    Ok(axum::Json(body).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// 1..=500, default 50
    limit: Option<i64>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryPage {
    items: Vec<HistoryItem>,
    next_cursor: Option<String>,
}

/// The record's history, oldest first: what changed, when, by which API key, in which
/// request.
#[utoipa::path(get, path = "/v1/contacts/{id}/history", tag = TAG,
    params(("id" = Uuid, Path), HistoryQuery),
    responses((status = 200, body = HistoryPage), (status = 400), (status = 404), (status = 410)))]
async fn contact_history(
    State(state): State<App>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    };
    let limit = page.limit()?;
    let after: i64 = page.cursor::<i64>()?.unwrap_or(0).max(0);
    let mut items = crate::app::privacy::history(&state, id, after, limit + 1).await?;
    let next_cursor = cut_page(&mut items, limit, |i| i.sequence);
    Ok(axum::Json(HistoryPage { items, next_cursor }).into_response())
}
