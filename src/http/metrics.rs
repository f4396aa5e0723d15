//! Prometheus metrics: the per-request middleware and `GET /metrics` (the recorder is
//! `telemetry::metrics_handle`).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::app::App;

/// The route template a request matched, passed out through the response extensions so
/// that [`track`], which runs outside the router, can label unmatched requests too.
#[derive(Clone)]
struct RouteLabel(String);

/// Inner layer (`route_layer`): reports the matched route template.
pub async fn label_route(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if let Some(matched) = matched {
        response
            .extensions_mut()
            .insert(RouteLabel(matched.as_str().to_owned()));
    }
    response
}

/// Outer layer: counts each request and times it, by method, route template and status.
/// The route is the template (`/v1/contacts/{id}`), never the raw path or query.
pub async fn track(request: Request, next: Next) -> Response {
    // Labels come from fixed sets only: a client inventing methods must not create series.
    let method = match *request.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let start = Instant::now();
    let response = next.run(request).await;
    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| "unmatched".to_owned());
    let status = response.status().as_u16().to_string();
    let labels = [
        ("method", method.to_owned()),
        ("route", route),
        ("status", status),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    response
}

pub fn router() -> utoipa_axum::router::OpenApiRouter<App> {
    utoipa_axum::router::OpenApiRouter::new().routes(utoipa_axum::routes!(render))
}

/// Prometheus text: request counts and latencies by route, commands and conflicts by
/// aggregate, projection positions and failures, pool gauges. No key needed.
#[utoipa::path(get, path = "/metrics", tag = "operations", security(),
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain")))]
pub async fn render(State(state): State<App>) -> impl IntoResponse {
    let pool = &state.pool;
    metrics::gauge!("db_pool_connections").set(f64::from(pool.size()));
    metrics::gauge!("db_pool_idle_connections").set(pool.num_idle() as f64);
    metrics::gauge!("db_kept_connections").set(state.warm.kept() as f64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
