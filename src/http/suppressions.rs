//! The suppression list: `POST`, `GET` and `DELETE /v1/suppressions`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::App;
use crate::app::suppressions::{self, Suppression};
use crate::http::error::ApiError;
use crate::http::extract::{ApiQuery, CommandRequest, PageQuery, cut_page};

const TAG: &str = "suppressions";

pub fn router() -> OpenApiRouter<App> {
    OpenApiRouter::new().routes(routes!(
        add_suppression,
        list_suppressions,
        remove_suppression
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SuppressionInput {
    email: String,
    /// Only `manual` (the default): the other reasons are the service's own.
    reason: Option<String>,
}

/// Suppress an address by hand (201; 200 when it was suppressed already).
#[utoipa::path(post, path = "/v1/suppressions", tag = TAG, request_body = SuppressionInput,
    responses((status = 201, body = Suppression), (status = 200, body = Suppression), (status = 422)))]
async fn add_suppression(
    State(state): State<App>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let input: SuppressionInput = request.json()?;
    let (entry, created) = suppressions::add(&state, &input.email, input.reason.as_deref()).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(entry)).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListSuppressions {
    email: Option<String>,
    /// manual | erased | bounced | complained | unsubscribed | consent_withdrawn
    reason: Option<String>,
    /// 1..=500, default 50
    limit: Option<i64>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SuppressionPage {
    items: Vec<Suppression>,
    next_cursor: Option<String>,
}

/// Suppressed addresses, newest first. The list keeps a keyed hash of each address; an
/// item shows the email only while its contact exists.
#[utoipa::path(get, path = "/v1/suppressions", tag = TAG, params(ListSuppressions),
    responses((status = 200, body = SuppressionPage), (status = 400), (status = 422)))]
async fn list_suppressions(
    State(state): State<App>,
    ApiQuery(query): ApiQuery<ListSuppressions>,
) -> Result<Response, ApiError> {
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    };
    let limit = page.limit()?;
    let after: Option<(DateTime<Utc>, Uuid)> = page.cursor()?;
    let mut items = suppressions::list(
        &state,
        query.email.as_deref(),
        query.reason.as_deref(),
        after,
        limit + 1,
    )
    .await?;
    let next_cursor = cut_page(&mut items, limit, |s| (s.created_at, s.contact_id));
    Ok(axum::Json(SuppressionPage { items, next_cursor }).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RemoveSuppression {
    email: String,
}

/// Lift the suppression of an address (204; 404 when it was not suppressed). For the
/// email of an erased contact this also releases the erasure: the email may be created
/// again, as a new contact that knows nothing of the erased one.
#[utoipa::path(delete, path = "/v1/suppressions", tag = TAG, params(RemoveSuppression),
    responses((status = 204), (status = 404), (status = 422)))]
async fn remove_suppression(
    State(state): State<App>,
    ApiQuery(query): ApiQuery<RemoveSuppression>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    if suppressions::remove(&state, &query.email, &request.metadata()).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::NotFound("this address is not suppressed".into()))
    }
}
