//! Subscription routes (admin): outbound deliveries of leadledger's own events — create,
//! list, read, update, delete, rotate the secret, replay, and the log of attempts.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::App;
use crate::app::command::Answer;
use crate::app::subscriptions::{
    self, DeliveryAttempt, NewSubscription, Replay, Subscription, SubscriptionChange,
    SubscriptionCreated,
};
use crate::http::auth::AdminKey;
use crate::http::error::ApiError;
use crate::http::extract::{ApiQuery, CommandRequest, PageQuery, cut_page};

const TAG: &str = "subscriptions";

pub fn router() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(get_one, update, delete))
        .routes(routes!(rotate_secret))
        .routes(routes!(replay))
        .routes(routes!(deliveries))
}

fn subscription_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::NotFound("no subscription with this id".into()))
}

/// Create a subscription (admin): events committed from now on are delivered to `url`,
/// signed with the secret shown here once. Honours `Idempotency-Key` (a retry gets the
/// same answer, secret included).
#[utoipa::path(post, path = "/v1/subscriptions", tag = TAG, request_body = NewSubscription,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 201, body = SubscriptionCreated, description = "Created; the secret is shown once"),
        (status = 400), (status = 403), (status = 415), (status = 422)))]
async fn create(
    State(state): State<App>,
    _admin: AdminKey,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let input: NewSubscription = request.json()?;
    let answer = subscriptions::create(&state, &request.context(), input).await?;
    Ok(answer.into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// 1..=500, default 50.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionPage {
    items: Vec<Subscription>,
    next_cursor: Option<String>,
}

/// Subscriptions with their delivery state (admin). Never a secret.
#[utoipa::path(get, path = "/v1/subscriptions", tag = TAG, params(ListQuery),
    responses((status = 200, body = SubscriptionPage), (status = 400), (status = 403)))]
async fn list(
    State(state): State<App>,
    _admin: AdminKey,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    };
    let limit = page.limit()?;
    let after: Option<Uuid> = page.cursor()?;
    let mut items = subscriptions::list(&state, after, limit + 1).await?;
    let next_cursor = cut_page(&mut items, limit, |s| s.id);
    Ok(axum::Json(SubscriptionPage { items, next_cursor }).into_response())
}

/// A subscription: status, position, backlog, breaker, last success and failure (admin).
#[utoipa::path(get, path = "/v1/subscriptions/{id}", tag = TAG, params(("id" = Uuid, Path)),
    responses((status = 200, body = Subscription), (status = 403), (status = 404)))]
async fn get_one(
    State(state): State<App>,
    _admin: AdminKey,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = subscription_id(&id)?;
    Ok(axum::Json(subscriptions::get(&state, id).await?).into_response())
}

/// Change url, event types, description, or status: `paused` stops deliveries, `active`
/// resumes them from the checkpoint (also after `disabled`).
#[utoipa::path(patch, path = "/v1/subscriptions/{id}", tag = TAG, request_body = SubscriptionChange,
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 200, body = Subscription), (status = 400), (status = 403), (status = 404), (status = 422)))]
async fn update(
    State(state): State<App>,
    _admin: AdminKey,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = subscription_id(&id)?;
    let change: SubscriptionChange = request.json()?;
    let answer = subscriptions::update(&state, &request.context(), id, change).await?;
    Ok(answer.into_response())
}

/// Delete a subscription, its secrets and its delivery log (admin).
#[utoipa::path(delete, path = "/v1/subscriptions/{id}", tag = TAG,
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 204, description = "Deleted"), (status = 403), (status = 404)))]
async fn delete(
    State(state): State<App>,
    _admin: AdminKey,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = subscription_id(&id)?;
    request.no_fields()?;
    let answer = subscriptions::delete(&state, &request.context(), id).await?;
    // No body with a 204, first answer or replayed.
    Ok(match answer {
        Answer::Fresh(_) => StatusCode::NO_CONTENT.into_response(),
        Answer::Replayed(recorded) => {
            let mut response = StatusCode::NO_CONTENT.into_response();
            response.headers_mut().insert(
                "idempotent-replayed",
                axum::http::HeaderValue::from_static("true"),
            );
            if recorded.status != StatusCode::NO_CONTENT {
                return Ok(recorded.into_response());
            }
            response
        }
    })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SecretRotated {
    id: Uuid,
    /// The new `whsec_…` secret, shown once; the previous one keeps signing for 24 hours.
    secret: String,
}

/// Issue a new signing secret (admin); messages are signed with the old one too for 24 h.
#[utoipa::path(post, path = "/v1/subscriptions/{id}/rotate-secret", tag = TAG,
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 200, body = SecretRotated), (status = 403), (status = 404)))]
async fn rotate_secret(
    State(state): State<App>,
    _admin: AdminKey,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = subscription_id(&id)?;
    request.no_fields()?;
    let answer = subscriptions::rotate_secret(&state, &request.context(), id).await?;
    Ok(answer.into_response())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayAccepted {
    id: Uuid,
    /// The first event to be delivered again.
    from_position: String,
}

/// Deliver again from `from_position` (that event included): a position token as writes
/// answer it, or an event's position number (0: from the beginning). A disabled
/// subscription resumes; a paused one stays paused.
#[utoipa::path(post, path = "/v1/subscriptions/{id}/replay", tag = TAG, request_body = Replay,
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 202, body = ReplayAccepted), (status = 400), (status = 403), (status = 404), (status = 422)))]
async fn replay(
    State(state): State<App>,
    _admin: AdminKey,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = subscription_id(&id)?;
    let input: Replay = request.json()?;
    let answer = subscriptions::replay(&state, &request.context(), id, input).await?;
    Ok(answer.into_response())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryPage {
    items: Vec<DeliveryAttempt>,
    next_cursor: Option<String>,
}

/// Delivery attempts, newest first (admin): message id, HTTP status, latency, error and
/// the next attempt. Kept 14 days.
#[utoipa::path(get, path = "/v1/subscriptions/{id}/deliveries", tag = TAG,
    params(("id" = Uuid, Path), ListQuery),
    responses((status = 200, body = DeliveryPage), (status = 400), (status = 403), (status = 404)))]
async fn deliveries(
    State(state): State<App>,
    _admin: AdminKey,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let id = subscription_id(&id)?;
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    };
    let limit = page.limit()?;
    let before: Option<i64> = page.cursor()?;
    let mut items = subscriptions::deliveries(&state, id, before, limit + 1).await?;
    let next_cursor = cut_page(&mut items, limit, |d| d.id);
    Ok(axum::Json(DeliveryPage { items, next_cursor }).into_response())
}
