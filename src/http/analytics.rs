//! Analytics routes over the read models: `GET /v1/analytics/costs`,
//! `GET /v1/analytics/campaigns/{id}/timeseries` and `GET /v1/analytics/dashboard`; the
//! reports themselves are `app::analytics`, shared with `leadledger analytics`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::App;
use crate::app::analytics::{
    COSTS_READ_MODELS, CostReport, CostsParams, DASHBOARD_READ_MODELS, Dashboard,
    ENROLLMENTS_READ_MODEL, Timeseries, campaign_timeseries, cost_report, dashboard_report,
    parse_days,
};
use crate::http::error::ApiError;
use crate::http::extract::{ApiQuery, MinPosition};

const TAG: &str = "analytics";

pub fn router() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(cost_analytics))
        .routes(routes!(campaign_timeseries_route))
        .routes(routes!(dashboard))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CostsQuery {
    /// UTC days back, today included: 1..=365, default 30.
    days: Option<String>,
    /// day | model | category | budget (default day)
    group_by: Option<String>,
    /// Wait until the report includes this write.
    min_position: Option<String>,
}

/// Costs (spends and captured reservations of every budget, tracking-only ones
/// included), by day (oldest first), model, category or budget (largest cost first).
#[utoipa::path(get, path = "/v1/analytics/costs", tag = TAG, params(CostsQuery),
    responses((status = 200, body = CostReport), (status = 400, description = "days or group_by out of range"),
        (status = 503, description = "min_position not reached in 5 s")))]
async fn cost_analytics(
    State(state): State<App>,
    ApiQuery(query): ApiQuery<CostsQuery>,
    min_position: MinPosition,
) -> Result<Response, ApiError> {
    let params = CostsParams::parse(query.days.as_deref(), query.group_by.as_deref())?;
    let _ = &query.min_position;
    let mut conn = min_position.connection(&state, &COSTS_READ_MODELS).await?;
    let report = cost_report(&mut conn, params, Utc::now().date_naive()).await?;
    Ok(axum::Json(report).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TimeseriesQuery {
    /// UTC days back, today included: 1..=365, default 30.
    days: Option<String>,
    /// Wait until the report includes this write.
    min_position: Option<String>,
}

/// Per UTC day, how many of the campaign's enrollments reached each milestone that day
/// (a milestone's day is the day of its effective time), oldest day first, every day of
/// the window listed.
#[utoipa::path(get, path = "/v1/analytics/campaigns/{id}/timeseries", tag = TAG,
    params(("id" = Uuid, Path), TimeseriesQuery),
    responses((status = 200, body = Timeseries), (status = 400, description = "days out of range"),
        (status = 404), (status = 503, description = "min_position not reached in 5 s")))]
async fn campaign_timeseries_route(
    State(state): State<App>,
    axum::extract::Path(id): axum::extract::Path<String>,
    ApiQuery(query): ApiQuery<TimeseriesQuery>,
    min_position: MinPosition,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound("no campaign with this id".into());
    let campaign = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let days = query
        .days
        .as_deref()
        .map(parse_days)
        .transpose()
        .map_err(ApiError::BadRequest)?
        .unwrap_or(CostsParams::DEFAULT_DAYS);
    let _ = &query.min_position;
    crate::http::command::load_existing(
        &state,
        campaign,
        |c: &aggregates::campaign::Campaign| c.created,
        "no campaign with this id",
    )
    .await?;
    let mut conn = min_position
        .connection(&state, &[ENROLLMENTS_READ_MODEL])
        .await?;
    let report = campaign_timeseries(&mut conn, campaign, days, Utc::now().date_naive()).await?;
    Ok(axum::Json(report).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DashboardQuery {
    /// Wait until the dashboard includes this write.
    min_position: Option<String>,
}

/// Totals: contacts, campaigns by status, enrollments and each milestone, the cost of the
/// current UTC month, and the campaigns with the best reply rate.
#[utoipa::path(get, path = "/v1/analytics/dashboard", tag = TAG, params(DashboardQuery),
    responses((status = 200, body = Dashboard), (status = 400),
        (status = 503, description = "min_position not reached in 5 s")))]
async fn dashboard(
    State(state): State<App>,
    ApiQuery(query): ApiQuery<DashboardQuery>,
    min_position: MinPosition,
) -> Result<Response, ApiError> {
    let _ = &query.min_position;
    let mut conn = min_position
        .connection(&state, &DASHBOARD_READ_MODELS)
        .await?;
    let report = dashboard_report(&mut conn, Utc::now().date_naive()).await?;
    Ok(axum::Json(report).into_response())
}
