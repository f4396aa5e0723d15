//! The HTTP API (axum): shared state, the router assembled from each feature's `router()`,
//! the middleware every route gets, and the server loop with graceful shutdown.

pub mod analytics;
pub mod auth;
pub mod budgets;
pub mod campaigns;
pub mod command;
pub mod contacts;
pub mod docs;
pub mod document;
pub mod enrollments;
pub mod error;
pub mod extract;
pub mod guard;
pub mod health;
pub mod metrics;
pub mod privacy;
pub mod subscriptions;
pub mod suppressions;
pub mod webhooks;

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::HeaderName;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use crate::app::{App, Limits};
use crate::http::error::ApiError;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Bodies larger than this count as large (see [`Limits::large_bodies`]).
pub const LARGE_BODY_BYTES: u64 = 1 << 20;

#[derive(OpenApi)]
#[openapi(
    info(title = "leadledger", description = "Event-sourced system of record for sales automation."),
    modifiers(&SecurityAddon),
    security(("api_key" = [])),
)]
struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every route with its OpenAPI description: `/v1` behind API keys, the rest open.
/// Routes are only ever added through `routes!`, so router and document cannot disagree.
pub fn api(state: &App) -> (Router<App>, serde_json::Value) {
    let v1 = OpenApiRouter::new()
        .merge(campaigns::router())
        .merge(budgets::router())
        .merge(analytics::router())
        .merge(contacts::router())
        .merge(privacy::router())
        .merge(suppressions::router())
        .merge(enrollments::router())
        .merge(webhooks::router())
        .merge(subscriptions::router());
    let (routes, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(health::router())
        .merge(docs::router())
        .merge(metrics::router())
        .merge(webhooks::delivery_router())
        .merge(v1.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        )))
        .split_for_parts();
    (routes, document::complete(openapi))
}

/// The whole API.
pub fn router(state: App) -> Router {
    let (routes, openapi) = api(&state);
    routes
        // The web console: HTML pages, not part of the API's document.
        .merge(crate::console::router())
        .layer(axum::Extension(std::sync::Arc::new(openapi)))
        // Command bodies are small JSON documents; routes that take more raise their own.
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(axum::middleware::from_fn(metrics::label_route))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::deadline,
        ))
        .layer(
            ServiceBuilder::new()
                .layer(axum::middleware::from_fn(guard::request_id))
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http().make_span_with(|request: &Request| {
                        let id = request
                            .headers()
                            .get(REQUEST_ID)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-");
                        // The path only: query strings may hold personal data (`?email=`).
                        tracing::info_span!(
                            "request",
                            request_id = %id,
                            method = %request.method(),
                            path = %request.uri().path(),
                        )
                    }),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(axum::middleware::from_fn(metrics::track))
                .layer(axum::middleware::from_fn(guard::limits)),
        )
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// How the server treats connections.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// How long requests in flight may run on after the shutdown signal.
    pub grace: Duration,
    /// A connection must send a request's headers within this long, and an idle
    /// keep-alive connection is closed after it: slow or silent clients cannot hold
    /// connections (or shutdown) for long.
    pub header_timeout: Duration,
    /// Connections open at once; more wait in the listen queue. `None`: derived from the
    /// process's descriptor limit, keeping room for the database pool and files, so that
    /// clients can never take the descriptors the rest of the process needs.
    pub max_connections: Option<usize>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(20),
            header_timeout: Duration::from_secs(10),
            max_connections: None,
        }
    }
}

impl crate::config::ServeConfig {
    pub fn serve_options(&self) -> ServeOptions {
        ServeOptions {
            grace: self.shutdown_grace(),
            header_timeout: Duration::from_secs(self.header_timeout_secs.max(1)),
            max_connections: (self.max_connections > 0).then_some(self.max_connections),
        }
    }
}

/// Descriptors kept for everything but client connections (pool, files, PostgreSQL's
/// supervisor, the runner's LISTEN connection).
const RESERVED_DESCRIPTORS: u64 = 128;

/// Raises the soft descriptor limit to the hard one, and returns the connection cap it
/// leaves room for.
pub fn connection_cap() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let soft = if hard > soft && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    (soft.saturating_sub(RESERVED_DESCRIPTORS) / 2).clamp(16, 10_000) as usize
}

/// Serves until `shutdown` resolves, then stops accepting connections and lets requests in
/// flight finish, for at most `grace`. Background work tied to `workers` is cancelled
/// only after that, by the caller.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let options = ServeOptions {
        grace,
        ..ServeOptions::default()
    };
    serve_with(listener, app, shutdown, options).await
}

/// [`serve`] with every connection setting.
pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: ServeOptions,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let cap = options.max_connections.unwrap_or_else(connection_cap);
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(cap));
    // HTTP/1.1 only: protocol detection (HTTP/2 prior knowledge) waits for a client's
    // first bytes with no time limit, which is exactly what a silent client exploits.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        // Headers past the router's own limit (answered as problem+json) up to this are
        // still parsed; beyond it the parser answers 431 by itself.
        .max_buf_size(1 << 20);
    let stopping = tokio_util::sync::CancellationToken::new();
    let connections = tokio_util::task::TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut descriptors_warned = false;
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (EMFILE/ENFILE) or a connection reset while queued:
                // say so once, wait a moment, go on. Never a reason to stop serving.
                let out_of_descriptors = matches!(e.raw_os_error(), Some(23 | 24));
                if out_of_descriptors && !descriptors_warned {
                    tracing::warn!(error = %e, "out of file descriptors; new connections wait");
                    descriptors_warned = true;
                }
                let pause = if out_of_descriptors { 50 } else { 1 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Requests of this connection being handled now: at shutdown, a connection with
        // none (idle, or still sending its headers) is closed at once, not waited for.
        let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = in_flight.clone();
        let app = app.clone();
        let service = hyper::service::service_fn(
            move |request: axum::http::Request<hyper::body::Incoming>| {
                let guard = InFlight::enter(&counted);
                let response = app.clone().oneshot(request.map(axum::body::Body::new));
                async move {
                    let response = response.await;
                    drop(guard);
                    response
                }
            },
        );
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let stopping = stopping.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stopping.cancelled() => {
                    if in_flight.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    stopping.cancel();
    connections.close();
    tokio::select! {
        () = connections.wait() => {}
        () = tokio::time::sleep(options.grace) => {
            tracing::warn!(grace_secs = options.grace.as_secs(), "requests still in flight after the grace period; closing them");
        }
    }
    Ok(())
}

/// Counts a request as in flight on its connection until dropped.
struct InFlight(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn enter(count: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
