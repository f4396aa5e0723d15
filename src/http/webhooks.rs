//! Webhook routes: provider deliveries (`POST /webhooks/{source}`, signed, no API key),
//! source management (admin), and the parked and dead-lettered events.

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::App;
use crate::app::error::AppError;
use crate::app::webhooks::{self, PARKING_REACTOR, ParkedEvent, Requeued, Signed, SourceCreation};
use crate::http::auth::AdminKey;
use crate::http::command::{self};
use crate::http::error::ApiError;
use crate::http::extract::{
    ApiQuery, CommandRequest, MinPosition, PageQuery, cut_page, parse_json,
};

const TAG: &str = "webhooks";

/// Routes under `/v1` (API keys).
pub fn router() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(add_source, list_sources))
        .routes(routes!(list_parked))
        .routes(routes!(list_dead_letters))
        .routes(routes!(retry_dead_letter))
}

/// The delivery route (signatures instead of API keys).
pub fn delivery_router() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(deliver))
        .layer(DefaultBodyLimit::max(webhooks::MAX_BODY))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSource {
    /// 1..=63 characters of a-z, 0-9, `_` and `-`: the `{source}` of `/webhooks/{source}`.
    name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SourceCreated {
    name: String,
    /// Where the provider delivers: `/webhooks/{name}` on this server.
    url: String,
    /// `whsec_<base64>`: shown once (and to a retry with the same `Idempotency-Key`).
    secret: String,
}

/// Create a webhook source and its signing secret (admin). Honours `Idempotency-Key`: a
/// retry gets the same answer, secret included, and makes nothing new (the recorded answer
/// keeps the secret sealed under the server's secret key, never in plaintext).
#[utoipa::path(post, path = "/v1/webhook-sources", tag = TAG, request_body = NewSource,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 201, body = SourceCreated, description = "Created; the secret is shown once"),
        (status = 403), (status = 409, description = "A source with this name exists"), (status = 422)))]
async fn add_source(
    State(state): State<App>,
    _admin: AdminKey,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let input: NewSource = request.json()?;
    let refusal = |e: AppError| command::error_reply(&e.into());
    let created = webhooks::create_source(&state, &request.context(), &input.name, refusal).await?;
    Ok(match created {
        SourceCreation::Created { name, url, secret } => (
            StatusCode::CREATED,
            axum::Json(SourceCreated { name, url, secret }),
        )
            .into_response(),
        SourceCreation::Refused(reply) => reply.into_response(),
        SourceCreation::Replayed(recorded) => recorded.into_response(),
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListSources {
    /// 1..=500, default 50.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SourcePage {
    items: Vec<webhooks::SourceSummary>,
    next_cursor: Option<String>,
}

/// Webhook sources by name (admin): kind, when made, the last delivery, and events by
/// outcome. Never a secret.
#[utoipa::path(get, path = "/v1/webhook-sources", tag = TAG, params(ListSources),
    responses((status = 200, body = SourcePage), (status = 400), (status = 403)))]
async fn list_sources(
    State(state): State<App>,
    _admin: AdminKey,
    ApiQuery(query): ApiQuery<ListSources>,
) -> Result<Response, ApiError> {
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    };
    let limit = page.limit()?;
    let after: Option<String> = page.cursor()?;
    let mut items = webhooks::list_sources(&state.pool, after, limit + 1).await?;
    let next_cursor = cut_page(&mut items, limit, |s| s.name.clone());
    Ok(axum::Json(SourcePage { items, next_cursor }).into_response())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::Unauthorized(format!("the {name} header is required")))
}

/// A provider delivery: one event or an array of up to 1,000, signed per Standard Webhooks
/// v1. Answers one result per event, in order: `applied`, `duplicate`, `parked` (the
/// enrollment does not exist yet) or `rejected` (with a reason).
#[utoipa::path(post, path = "/webhooks/{source}", tag = TAG, security(),
    params(("source" = String, Path), ("webhook-id" = String, Header), ("webhook-timestamp" = String, Header),
           ("webhook-signature" = String, Header)),
    request_body(content = Value, description = "An event or an array of events"),
    responses((status = 200, description = "Results per event"), (status = 400), (status = 401), (status = 413)))]
async fn deliver(
    State(state): State<App>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge("a delivery is at most 256 KiB".into())
        } else {
            ApiError::BadRequest(format!("the body could not be read: {rejection}"))
        }
    })?;
    let signed = Signed {
        id: header(&headers, "webhook-id")?,
        timestamp: header(&headers, "webhook-timestamp")?,
        signatures: header(&headers, "webhook-signature")?,
    };
    if signed.id.chars().count() > webhooks::MAX_WEBHOOK_ID_CHARS {
        return Err(ApiError::BadRequest(format!(
            "webhook-id must be at most {} characters",
            webhooks::MAX_WEBHOOK_ID_CHARS
        )));
    }
    webhooks::authenticate(&state, &source, &signed, &body).await?;
    let value: Value = parse_json(&body).map_err(|e| match e {
        ApiError::Unprocessable { detail, .. } => ApiError::BadRequest(detail),
        other => other,
    })?;
    let events = match value {
        Value::Array(events) => events,
        single @ Value::Object(_) => vec![single],
        _ => {
            return Err(ApiError::BadRequest(
                "the body must be an event object or an array of them".into(),
            ));
        }
    };
    if events.len() > webhooks::MAX_EVENTS {
        return Err(ApiError::PayloadTooLarge(format!(
            "a delivery holds at most {} events",
            webhooks::MAX_EVENTS
        )));
    }
    let hash = Sha256::digest(&body).to_vec();
    let response = webhooks::ingest(&state, &source, signed.id, &hash, events).await?;
    Ok(axum::Json(response).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ParkedQuery {
    limit: Option<i64>,
    cursor: Option<String>,
    /// Wait until the parked events reflect this write (an enrollment made applies the
    /// events parked for it).
    min_position: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ParkedPage {
    items: Vec<ParkedEvent>,
    next_cursor: Option<String>,
}

async fn page(state: &App, query: ParkedQuery, dead: bool) -> Result<Response, ApiError> {
    // Read by the `MinPosition` extractor; declared here for the documentation.
    let _ = &query.min_position;
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    };
    let limit = page.limit()?;
    let after: Option<(DateTime<Utc>, Uuid)> = page.cursor()?;
    let mut items = webhooks::list_parked(&state.pool, dead, after, limit + 1).await?;
    let next_cursor = cut_page(&mut items, limit, |p| {
        let at = if dead {
            p.dead_lettered_at.unwrap_or(p.received_at)
        } else {
            p.received_at
        };
        (at, p.id)
    });
    Ok(axum::Json(ParkedPage { items, next_cursor }).into_response())
}

/// Events waiting for their enrollment, oldest first.
#[utoipa::path(get, path = "/v1/webhooks/parked", tag = TAG, params(ParkedQuery),
    responses((status = 200, body = ParkedPage), (status = 400), (status = 503)))]
async fn list_parked(
    State(state): State<App>,
    ApiQuery(query): ApiQuery<ParkedQuery>,
    min_position: MinPosition,
) -> Result<Response, ApiError> {
    min_position.wait(&state, &[PARKING_REACTOR]).await?;
    page(&state, query, false).await
}

/// Events given up on (too many attempts or too old), oldest first.
#[utoipa::path(get, path = "/v1/webhooks/dead-letters", tag = TAG, params(ParkedQuery),
    responses((status = 200, body = ParkedPage), (status = 400), (status = 503)))]
async fn list_dead_letters(
    State(state): State<App>,
    ApiQuery(query): ApiQuery<ParkedQuery>,
    min_position: MinPosition,
) -> Result<Response, ApiError> {
    min_position.wait(&state, &[PARKING_REACTOR]).await?;
    page(&state, query, true).await
}

/// Put a dead letter back among the parked events, due now. Honours `Idempotency-Key`:
/// a retry with the key answers as the first did and requeues nothing again.
#[utoipa::path(post, path = "/v1/webhooks/dead-letters/{id}/retry", tag = TAG,
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 200, body = Requeued, description = "Parked again, due now"), (status = 404)))]
async fn retry_dead_letter(
    State(state): State<App>,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    request.no_fields()?;
    let not_found = || ApiError::NotFound("no dead letter with this id".into());
    let id = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let answer = webhooks::requeue_dead_letter(&state, &request.context(), id).await?;
    Ok(answer.into_response())
}
