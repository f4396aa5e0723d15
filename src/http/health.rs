//! `GET /health/live` and `GET /health/ready`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::App;
use crate::db;

pub fn router() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(ready))
}

/// 200 while the process runs.
#[utoipa::path(get, path = "/health/live", tag = "operations", security(),
    responses((status = 200, description = "The process is running")))]
async fn live() -> impl IntoResponse {
    Json(json!({"status": "live"}))
}

/// Ready means: the database answers within a bounded time and every migration this
/// binary knows is applied. A load balancer should route only to ready processes.
#[utoipa::path(get, path = "/health/ready", tag = "operations", security(),
    responses((status = 200, description = "Ready"), (status = 503, description = "Database unavailable or migrations pending")))]
async fn ready(State(state): State<App>) -> impl IntoResponse {
    let check = tokio::time::timeout(Duration::from_secs(5), db::is_ready(&state.pool)).await;
    let (status, reason) = match check {
        Ok(Ok(true)) => (StatusCode::OK, "ready"),
        Ok(Ok(false)) => (StatusCode::SERVICE_UNAVAILABLE, "migrations pending"),
        Ok(Err(e)) if is_missing_table(&e) => {
            (StatusCode::SERVICE_UNAVAILABLE, "migrations pending")
        }
        Ok(Err(e)) if crate::http::error::is_out_of_descriptors(&e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "this process is out of file descriptors",
        ),
        Ok(Err(sqlx::Error::PoolTimedOut)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "every database connection is busy",
        ),
        Ok(Err(_)) => (StatusCode::SERVICE_UNAVAILABLE, "database unavailable"),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "database did not answer in time",
        ),
    };
    let mut response = (
        status,
        Json(json!({
            "status": if status == StatusCode::OK { "ready" } else { "not_ready" },
            "reason": reason,
        })),
    )
        .into_response();
    if status != StatusCode::OK {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
    }
    response
}

fn is_missing_table(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "42P01")
}
