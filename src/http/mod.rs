//! The HTTP API (axum): shared state, the router assembled from each feature's `router()`,
//! the middleware every route gets, and the server loop with graceful shutdown.

pub mod analytics;
pub mod budgets;
pub mod campaigns;
pub mod command;
pub mod contacts;
pub mod docs;
pub mod document;
pub mod enrollments;
pub mod extract;
pub mod health;
pub mod metrics;
pub mod webhooks;

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::HeaderName;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::error::ApiError;
use crate::http::command::RetryPolicy;
use crate::secrets::SecretBox;
use crate::store::Store;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub metrics: PrometheusHandle,
    pub store: Store,
    pub retry: RetryPolicy,
    /// Encrypts webhook-source secrets at rest.
    pub secrets: SecretBox,
    /// The key of contact ids, read once from this state's database.
    pub contact_id_key: std::sync::Arc<tokio::sync::OnceCell<Vec<u8>>>,
}

impl AppState {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            metrics: metrics::handle(),
            store: Store::default(),
            retry: RetryPolicy::default(),
            secrets: SecretBox::ephemeral(),
            contact_id_key: Default::default(),
        }
    }

    /// The configured secret key (the default is a throw-away one, for tests).
    pub fn with_secrets(mut self, secrets: SecretBox) -> Self {
        self.secrets = secrets;
        self
    }

    pub fn with_store(mut self, store: Store) -> Self {
        self.store = store;
        self
    }
}

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
pub fn api(state: &AppState) -> (Router<AppState>, serde_json::Value) {
    let v1 = OpenApiRouter::new()
        .merge(campaigns::router())
        .merge(budgets::router())
        .merge(analytics::router())
        .merge(contacts::router())
        .merge(enrollments::router())
        .merge(webhooks::router());
    let (routes, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(health::router())
        .merge(docs::router())
        .merge(metrics::router())
        .merge(webhooks::delivery_router())
        .merge(v1.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::authenticate,
        )))
        .split_for_parts();
    (routes, document::complete(openapi))
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let (routes, openapi) = api(&state);
    routes
        .layer(axum::Extension(std::sync::Arc::new(openapi)))
        // Command bodies are small JSON documents; routes that take more raise their own.
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(axum::middleware::from_fn(metrics::label_route))
        .layer(
            ServiceBuilder::new()
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
                .layer(axum::middleware::from_fn(metrics::track)),
        )
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
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
    let stopping = CancellationToken::new();
    let signal = stopping.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing requests in flight");
        signal.cancel();
    });
    let deadline = async {
        stopping.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result,
        () = deadline => {
            tracing::warn!(grace_secs = grace.as_secs(), "requests still in flight after the grace period; closing them");
            Ok(())
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
