//! The application layer: [`App`] (built once by [`App::build`]), command execution with
//! idempotency and retries ([`command`]), and the services every entry point shares — the
//! HTTP routes, the command line and the background workers. Transport-neutral: nothing
//! here knows axum; `http` turns what these functions return into responses.

pub mod analytics;
pub mod budgets;
pub mod campaigns;
pub mod command;
pub mod contacts;
pub mod delivery;
pub mod enrollments;
pub mod error;
pub mod group;
pub mod keys;
pub mod outbound;
#[cfg(feature = "test-hooks")]
pub mod pauses;
pub mod privacy;
pub mod reads;
pub mod replica;
pub mod sources;
pub mod subscriptions;
pub mod suppressions;
pub mod webhooks;
pub mod workers;

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::app::command::RetryPolicy;
use crate::app::error::AppError;
use crate::config::Config;
use crate::secrets::{SecretBox, SecretError};
use crate::store::Store;

/// What every service can reach: the database, the event store, the secret box, the
/// retry policy of writes and the limits of the process ([`AppParts`]). Every request,
/// middleware layer and task takes a clone, so the parts are held behind one reference
/// count: a clone is one increment, not one per part. Changing a part (as tests and
/// `serve` do while assembling it) changes this `App`'s own copy.
#[derive(Clone)]
pub struct App(Arc<AppParts>);

impl std::ops::Deref for App {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

impl std::ops::DerefMut for App {
    fn deref_mut(&mut self) -> &mut AppParts {
        Arc::make_mut(&mut self.0)
    }
}

/// The parts of an [`App`].
#[derive(Clone)]
pub struct AppParts {
    pub pool: PgPool,
    /// Connections commands left clean, for the next command (see `db::Warm`).
    pub warm: crate::db::Warm,
    pub metrics: PrometheusHandle,
    pub store: Store,
    pub retry: RetryPolicy,
    /// Encrypts webhook-source secrets at rest.
    pub secrets: SecretBox,
    /// The key of contact ids, read once from this app's database.
    pub contact_id_key: Arc<tokio::sync::OnceCell<Vec<u8>>>,
    pub limits: Limits,
    /// Wakes the projection runners after a commit that wrote events (this process's at
    /// once, the others' through one coalesced NOTIFY sent outside the write transaction).
    pub wakeup: projections::Wakeup,
    /// API keys recently looked up (see `keys::KeyCache`).
    pub keys: keys::KeyCache,
    /// Commands for one aggregate arriving together share a transaction (see `group`).
    pub groups: group::Groups,
    /// A streaming replica for read-model queries (`LEADLEDGER_READ_DATABASE_URL`).
    pub replica: Option<replica::Replica>,
    /// What subscription deliveries may reach, their timeouts and retry schedule.
    pub outbound: outbound::OutboundConfig,
}

/// What one request may take of the process.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The longest one request may run (503 past it).
    pub request_timeout: Duration,
    /// Requests with a large body (imports) take one of these permits before reading it,
    /// and hold it until answered: a few of them at once bound the memory they take; the
    /// rest wait (within their time limit).
    pub large_bodies: Arc<tokio::sync::Semaphore>,
}

impl Limits {
    pub fn new(request_timeout: Duration, large_bodies: usize) -> Self {
        Self {
            request_timeout,
            large_bodies: Arc::new(tokio::sync::Semaphore::new(large_bodies.max(1))),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(Duration::from_secs(15), 2)
    }
}

impl App {
    /// The one way an `App` is assembled — by `serve`, the other commands, the benchmarks
    /// and the tests alike: the event store with the configured snapshot interval, the
    /// configured secret key (`LEADLEDGER_SECRET_KEY`, else the data directory's) and the
    /// given limits, on a pool already migrated.
    pub fn build(pool: PgPool, config: &Config, limits: Limits) -> Result<Self, SecretError> {
        let secrets = config.secrets()?;
        projections::pii::install(secrets.derive(privacy::DATA_KEYS_PURPOSE));
        Ok(Self(Arc::new(AppParts {
            warm: crate::db::Warm::new(pool.clone()),
            pool,
            metrics: crate::telemetry::metrics_handle(),
            store: Store::new(config.snapshot_every),
            retry: RetryPolicy::default(),
            secrets,
            contact_id_key: Default::default(),
            limits,
            wakeup: projections::Wakeup::new(),
            keys: keys::KeyCache::default(),
            groups: group::Groups::default(),
            replica: None,
            outbound: outbound::OutboundConfig::from_env(),
        })))
    }
}

/// Parses a JSON body into `T`, telling syntax errors (400) from invalid values (422).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(AppError::BadRequest("a JSON body is required".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = strip_location(&inner.to_string());
        match inner.classify() {
            serde_json::error::Category::Data => {
                let field = if path == "." {
                    "body".to_string()
                } else {
                    path
                };
                AppError::invalid(vec![error::FieldError::new(field, message)])
            }
            _ => AppError::BadRequest(format!("malformed JSON: {message}")),
        }
    })?;
    de.end().map_err(|e| {
        AppError::BadRequest(format!(
            "malformed JSON: {}",
            strip_location(&e.to_string())
        ))
    })?;
    Ok(value)
}

fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}
