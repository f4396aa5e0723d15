//! Webhook routes: provider deliveries (`POST /webhooks/{source}`, signed, no API key),
//! source management (admin), and the parked and dead-lettered events.

use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::App;
use crate::app::error::AppError;
use crate::app::sources;
use crate::app::webhooks::{self, PARKING_REACTOR, ParkedEvent, Requeued};
use crate::http::auth::AdminKey;
use crate::http::command::{self};
use crate::http::error::{ApiError, FieldError};
use crate::http::extract::{ApiQuery, CommandRequest, MinPosition, PageQuery, cut_page};
use crate::providers::SourceKind;

const TAG: &str = "webhooks";

/// Routes under `/v1` (API keys).
pub fn router() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(add_source, list_sources))
        .routes(routes!(rotate_source))
        .routes(routes!(list_parked))
        .routes(routes!(list_dead_letters))
        .routes(routes!(retry_dead_letter))
}

/// The delivery route (signatures instead of API keys).
pub fn delivery_router() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(deliver))
        // The largest any kind takes; each kind's own limit is checked once its source is known.
        .layer(DefaultBodyLimit::max(webhooks::MAX_BATCH_BODY))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSource {
    /// 1..=63 characters of a-z, 0-9, `_` and `-`: the `{source}` of `/webhooks/{source}`.
    name: String,
    /// How deliveries are authenticated and read: `standard` (the default), `sendgrid`,
    /// `mailgun`, `postmark`, `instantly`, `smartlead` or `custom`.
    #[schema(example = "sendgrid")]
    kind: Option<String>,
    /// `sendgrid` only: the Event Webhook's verification key as SendGrid shows it (base64
    /// of the DER P-256 public key; PEM accepted). Never shown back.
    public_key: Option<String>,
    /// `mailgun` only: the HTTP webhook signing key. Never shown back.
    signing_key: Option<String>,
    /// `custom` only: JSON Pointers into the body and each event, and a table of their
    /// type names to ours.
    #[schema(value_type = Option<Object>, example = json!({"events": "/events", "id": "/id", "type": "/type", "email": "/lead/email", "occurred_at": "/at", "campaign": "/campaign_id", "types": {"email_sent": "sent", "replied": "replied"}}))]
    mapping: Option<Value>,
}

/// A created source; the credentials the server made are shown this once (and to a retry
/// with the same `Idempotency-Key`).
#[derive(Debug, Serialize, ToSchema)]
pub struct SourceCreated {
    name: String,
    kind: String,
    /// Where the provider delivers: `/webhooks/{name}` on this server.
    url: String,
    /// `standard`: `whsec_<base64>`, the signing secret.
    secret: Option<String>,
    /// `postmark`: the HTTP Basic user name to give Postmark.
    username: Option<String>,
    /// `postmark`: the HTTP Basic password to give Postmark.
    password: Option<String>,
    /// `instantly`, `smartlead`, `custom`: the token deliveries carry.
    token: Option<String>,
}

fn kind_of(raw: Option<&str>) -> Result<SourceKind, ApiError> {
    match raw {
        None => Ok(SourceKind::Standard),
        Some(text) => SourceKind::parse(text).ok_or_else(|| {
            ApiError::invalid(vec![FieldError::new(
                "kind",
                "must be one of standard, sendgrid, mailgun, postmark, instantly, smartlead, custom",
            )])
        }),
    }
}

/// Create a webhook source (admin) of a kind, with its credentials. Honours
/// `Idempotency-Key`: a retry gets the same answer, credentials included, and makes
/// nothing new (the recorded answer keeps them sealed under the server's secret key).
#[utoipa::path(post, path = "/v1/webhook-sources", tag = TAG, request_body = NewSource,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 201, body = SourceCreated, description = "Created; credentials made by the server are shown once"),
        (status = 403), (status = 409, description = "A source with this name exists"), (status = 422)))]
async fn add_source(
    State(state): State<App>,
    _admin: AdminKey,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let input: NewSource = request.json()?;
    let new = sources::NewSource {
        kind: kind_of(input.kind.as_deref())?,
        name: input.name,
        public_key: input.public_key,
        signing_key: input.signing_key,
        mapping: input.mapping,
    };
    let refusal = |e: AppError| command::error_reply(&e.into());
    let answer = sources::create_source(&state, &request.context(), &new, refusal).await?;
    Ok(answer.into_response())
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    /// `sendgrid`: the new verification key.
    public_key: Option<String>,
    /// `mailgun`: the new signing key.
    signing_key: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Rotated {
    name: String,
    kind: String,
    /// The credential replaced is still accepted until then (24 hours).
    previous_valid_until: DateTime<Utc>,
    /// `standard`: the new signing secret.
    secret: Option<String>,
    /// `postmark`: the new Basic credentials.
    username: Option<String>,
    password: Option<String>,
    /// `instantly`, `smartlead`, `custom`: the new token.
    token: Option<String>,
}

/// Give a source a new credential (admin): one the server makes (shown once), or for
/// `sendgrid` and `mailgun` the new key given. The replaced credential is still accepted
/// for 24 hours. Honours `Idempotency-Key`.
#[utoipa::path(post, path = "/v1/webhook-sources/{name}/rotate", tag = TAG, request_body = Rotation,
    params(("name" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 200, body = Rotated), (status = 403), (status = 404), (status = 422)))]
async fn rotate_source(
    State(state): State<App>,
    _admin: AdminKey,
    Path(name): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let input: Rotation = if request.body.iter().all(u8::is_ascii_whitespace) {
        Rotation::default()
    } else {
        request.json()?
    };
    let given = sources::NewCredential {
        public_key: input.public_key,
        signing_key: input.signing_key,
    };
    let answer = sources::rotate_source(&state, &request.context(), &name, &given).await?;
    Ok(answer.into_response())
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
    items: Vec<sources::SourceSummary>,
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
    let mut items = sources::list_sources(&state.pool, after, limit + 1).await?;
    let next_cursor = cut_page(&mut items, limit, |s| s.name.clone());
    Ok(axum::Json(SourcePage { items, next_cursor }).into_response())
}

/// A provider delivery. How it is authenticated and read depends on the source's kind
/// (README, "Provider sources"): Standard Webhooks v1 (one event or an array of up to
/// 1,000), SendGrid's signed batches, Mailgun's signed single events, Postmark with HTTP
/// Basic credentials, Instantly, Smartlead and custom sources with a token. Answers one
/// result per event, in order: `applied`, `duplicate`, `parked` (the enrollment does not
/// exist yet), `ignored` (a type that carries no milestone) or `rejected` (with a reason).
#[utoipa::path(post, path = "/webhooks/{source}", tag = TAG, security(),
    params(("source" = String, Path),
           ("webhook-id" = Option<String>, Header, description = "standard: the delivery's id (also `svix-id`)"),
           ("webhook-timestamp" = Option<String>, Header, description = "standard: Unix seconds (also `svix-timestamp`)"),
           ("webhook-signature" = Option<String>, Header, description = "standard: `v1,<base64>` entries (also `svix-signature`)"),
           ("X-Twilio-Email-Event-Webhook-Signature" = Option<String>, Header, description = "sendgrid"),
           ("X-Twilio-Email-Event-Webhook-Timestamp" = Option<String>, Header, description = "sendgrid"),
           ("token" = Option<String>, Query, description = "instantly, smartlead, custom: the source's token (or `Authorization: Bearer`)")),
    request_body(content = Value, description = "The provider's own payload"),
    responses((status = 200, description = "Results per event"), (status = 400), (status = 401), (status = 413)))]
async fn deliver(
    State(state): State<App>,
    Path(source): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(
                "a delivery is at most 1 MiB (256 KiB but for SendGrid)".into(),
            )
        } else {
            ApiError::BadRequest(format!("the body could not be read: {rejection}"))
        }
    })?;
    // Values that are not visible ASCII are no credential or signature any provider sends.
    let headers: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(name, value)| {
            Some((name.as_str().to_string(), value.to_str().ok()?.to_string()))
        })
        .collect();
    let incoming = webhooks::Incoming {
        headers: &headers,
        query: query.as_deref().unwrap_or_default(),
        body: &body,
    };
    let response = webhooks::receive(&state, &source, incoming).await?;
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
