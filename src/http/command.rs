//! Command execution for HTTP routes: load, handle, commit — with optimistic-concurrency
//! retries, `If-Match` (RFC 9110) and `Idempotency-Key` (scoped to the API key, recorded with
//! the events it guards; see the README's "Using the API").
//!
//! One attempt is one transaction: take the idempotency key's lock (a transaction-scoped
//! advisory lock: a second request with the key while the first runs gets 409), replay a
//! recorded response if there is one, load the aggregate, check `If-Match`, handle the
//! command, append the events, and record the response — all committed together. A
//! conflict with another writer rolls the attempt back and tries again after a jittered,
//! growing pause; only when attempts run out does the client see 409.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use rand::Rng;
use serde_json::Value;
use sqlx::PgConnection;

use crate::error::ApiError;
use crate::http::AppState;
use crate::http::extract::CommandRequest;
use aggregates::campaign::Campaign;

use crate::store::{Appended, Hold, Loaded, Position, StoreError};

/// Bounds of the retry loop on optimistic-concurrency conflicts.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 60,
            base: Duration::from_millis(1),
            cap: Duration::from_millis(50),
        }
    }
}

impl RetryPolicy {
    /// "Full jitter": a random pause up to an exponentially growing bound.
    pub fn pause(&self, attempt: u32) -> Duration {
        let bound = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.cap);
        let micros = rand::rng().random_range(0..=bound.as_micros() as u64);
        Duration::from_micros(micros)
    }
}

/// What a successful command wrote.
#[derive(Debug)]
pub struct Written<A> {
    /// The aggregate after the command.
    pub loaded: Loaded<A>,
    /// Whether the aggregate had events before this command.
    pub existed_before: bool,
    pub appended: Appended,
}

impl<A> Written<A> {
    pub fn version(&self) -> u64 {
        self.loaded.version
    }

    /// The read-your-writes token: the last event written, or when the command changed
    /// nothing, the aggregate's last event.
    pub fn position(&self) -> Position {
        self.appended
            .last_position()
            .or(self.loaded.last_position)
            .unwrap_or_default()
    }
}

/// The response a command route sends (and records for its idempotency key).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    pub etag_version: Option<u64>,
    pub location: Option<String>,
}

impl Reply {
    pub fn ok(body: Value) -> Self {
        Self {
            status: StatusCode::OK,
            body,
            etag_version: None,
            location: None,
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn with_etag(mut self, version: u64) -> Self {
        self.etag_version = Some(version);
        self
    }

    pub fn with_location(mut self, location: String) -> Self {
        self.location = Some(location);
        self
    }

    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let content_type = if self.status.is_success() {
            "application/json"
        } else {
            "application/problem+json"
        };
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(v) = self.etag_version
            && let Ok(value) = HeaderValue::from_str(&format!("\"{v}\""))
        {
            headers.insert(header::ETAG, value);
        }
        if let Some(location) = &self.location
            && let Ok(value) = HeaderValue::from_str(location)
        {
            headers.insert(header::LOCATION, value);
        }
        headers
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let headers = self.headers();
        let body = serde_json::to_vec(&self.body).unwrap_or_default();
        (self.status, headers, body).into_response()
    }
}

/// Why one attempt of a transaction did not finish.
pub enum Abort {
    /// Another writer got to a stream first: roll back and try again.
    Conflict,
    /// Give up and answer with this error; nothing is committed.
    Fail(ApiError),
}

impl From<ApiError> for Abort {
    fn from(e: ApiError) -> Self {
        Self::Fail(e)
    }
}

impl From<sqlx::Error> for Abort {
    fn from(e: sqlx::Error) -> Self {
        Self::Fail(e.into())
    }
}

impl From<StoreError> for Abort {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Self::Conflict,
            other => Self::Fail(store_error(other)),
        }
    }
}

/// What became of one attempt.
pub enum Settled<T> {
    /// Committed.
    Done(T),
    /// Rolled back after a conflict; begin the next attempt.
    Again,
    /// Rolled back after a conflict, and no attempts are left.
    GaveUp,
}

/// The attempts of one write: every write path runs its work in a transaction per attempt
/// and hands the outcome to [`Retry::settle`], so committing, rolling back, counting
/// conflicts (`command_conflicts_total{aggregate}`) and pausing before the next attempt
/// (jittered, growing) happen in one place.
pub struct Retry {
    policy: RetryPolicy,
    aggregate: &'static str,
    attempt: u32,
}

impl Retry {
    pub fn new(state: &AppState, aggregate: &'static str) -> Self {
        Self {
            policy: state.retry,
            aggregate,
            attempt: 0,
        }
    }

    pub async fn settle<T>(
        &mut self,
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
        outcome: Result<T, Abort>,
    ) -> Result<Settled<T>, ApiError> {
        match outcome {
            Ok(done) => {
                tx.commit().await?;
                Ok(Settled::Done(done))
            }
            Err(Abort::Fail(e)) => Err(e),
            Err(Abort::Conflict) => {
                let _ = tx.rollback().await;
                metrics::counter!("command_conflicts_total", "aggregate" => self.aggregate)
                    .increment(1);
                self.attempt += 1;
                if self.attempt >= self.policy.max_attempts {
                    return Ok(Settled::GaveUp);
                }
                tokio::time::sleep(self.policy.pause(self.attempt - 1)).await;
                Ok(Settled::Again)
            }
        }
    }
}

/// Runs a command on aggregate `id` and answers with `render`'s reply.
///
/// `make` builds the command from the loaded aggregate (it runs again on each retry) and
/// may refuse with a validation error. Domain errors become responses through
/// `Into<ApiError>`, decided in `src/error.rs`.
pub async fn execute<A, M, R>(
    state: &AppState,
    request: &CommandRequest,
    id: &str,
    services: &A::Services,
    make: M,
    render: R,
) -> Result<Response, ApiError>
where
    A: Aggregate,
    A::Error: Into<ApiError>,
    M: Fn(&Loaded<A>) -> Result<A::Command, ApiError>,
    R: Fn(&Written<A>) -> Reply,
{
    let metadata = request.metadata();
    let mut retry = Retry::new(state, A::TYPE);
    loop {
        let mut tx = state.pool.begin().await?;
        let outcome = async {
            if let Some(response) = replay(&mut tx, request).await? {
                return Ok(response);
            }
            if A::TYPE == Campaign::TYPE {
                // A campaign's lifecycle decides whether it takes enrollments: hold it
                // against bulk enrollment, which holds it shared while it decides, so no
                // enrollment commits after the campaign's completion.
                state
                    .store
                    .hold_stream::<A>(&mut tx, id, Hold::Exclusive)
                    .await?;
            }
            let mut loaded: Loaded<A> = state.store.load(&mut tx, id).await?;
            if let Some(expected) = &request.if_match
                && !expected.matches(loaded.version)
            {
                return Err(ApiError::PreconditionFailed(if loaded.version == 0 {
                    format!(
                        "If-Match is {} but the resource does not exist",
                        expected.describe()
                    )
                } else {
                    format!(
                        "If-Match is {} but the resource is at version \"{}\"",
                        expected.describe(),
                        loaded.version
                    )
                })
                .into());
            }
            let existed_before = loaded.version > 0;
            let command = make(&loaded)?;
            let sink = EventSink::default();
            let reply = match loaded.aggregate.handle(command, services, &sink).await {
                // The outcome of executing the command: a retry with the key gets it again.
                Err(domain) => error_reply(&domain.into()),
                Ok(()) => {
                    let events = sink.collect().await;
                    let appended = state
                        .store
                        .append(&mut tx, &mut loaded, &events, &metadata)
                        .await?;
                    render(&Written {
                        loaded,
                        existed_before,
                        appended,
                    })
                }
            };
            record(&mut tx, request, &reply).await?;
            Ok::<_, Abort>(reply.into_response())
        }
        .await;
        match retry.settle(tx, outcome).await? {
            Settled::Done(response) => {
                metrics::counter!("commands_total", "aggregate" => A::TYPE, "outcome" => "ok")
                    .increment(1);
                return Ok(response);
            }
            Settled::Again => {}
            Settled::GaveUp => {
                metrics::counter!("commands_total", "aggregate" => A::TYPE, "outcome" => "retries_exhausted")
                    .increment(1);
                return Err(ApiError::conflict(
                    "concurrency-conflict",
                    "the resource kept changing under this command; retry it",
                ));
            }
        }
    }
}

/// The aggregate `id` as its stream says, or 404 with `missing` when `exists` says it was
/// never created.
pub async fn load_existing<A: Aggregate>(
    state: &AppState,
    id: uuid::Uuid,
    exists: impl Fn(&A) -> bool,
    missing: &str,
) -> Result<Loaded<A>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let loaded: Loaded<A> = state
        .store
        .load(&mut conn, &id.to_string())
        .await
        .map_err(store_error)?;
    if exists(&loaded.aggregate) {
        Ok(loaded)
    } else {
        Err(ApiError::NotFound(missing.to_string()))
    }
}

pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Database(e) => e.into(),
        too_large @ StoreError::EventTooLarge { .. } => {
            ApiError::PayloadTooLarge(too_large.to_string())
        }
        other => ApiError::Internal(other.to_string()),
    }
}

/// The request's idempotency key, checked inside the attempt's transaction: the
/// response recorded for it, if any (`None` also when the request has no key). The key is
/// locked for the transaction, so a second request with it while the first runs gets 409.
pub async fn replay(
    conn: &mut PgConnection,
    request: &CommandRequest,
) -> Result<Option<Response>, ApiError> {
    Ok(replay_record(conn, request)
        .await?
        .map(|recorded| recorded.into_response()))
}

/// A response recorded for an idempotency key, as stored.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl IntoResponse for Recorded {
    fn into_response(mut self) -> Response {
        self.headers
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        (self.status, self.headers, self.body).into_response()
    }
}

/// [`replay`], leaving the recorded response as stored (for a route that recorded a
/// sealed form of it and must open it before answering).
pub async fn replay_record(
    conn: &mut PgConnection,
    request: &CommandRequest,
) -> Result<Option<Recorded>, ApiError> {
    let Some(key) = &request.idempotency_key else {
        return Ok(None);
    };
    let scope = request.key.id.to_string();
    let locked = sqlx::query_scalar!(
        r#"SELECT pg_try_advisory_xact_lock(hashtextextended($1 || ':' || $2, 0)) AS "locked!""#,
        scope,
        key
    )
    .fetch_one(&mut *conn)
    .await?;
    if !locked {
        return Err(ApiError::conflict(
            "idempotency-key-in-flight",
            "a request with this Idempotency-Key is still being processed; retry shortly",
        ));
    }
    let record = sqlx::query!(
        "SELECT request_hash, response_status, response_body, response_headers
         FROM idempotency_records WHERE api_key_id = $1 AND idempotency_key = $2",
        request.key.id,
        key
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(record) = record else {
        return Ok(None);
    };
    if record.request_hash != request.request_hash {
        return Err(ApiError::invalid(vec![crate::error::FieldError::new(
            "Idempotency-Key",
            "this key was already used with a different request",
        )]));
    }
    let status = StatusCode::from_u16(record.response_status as u16).unwrap_or(StatusCode::OK);
    let mut headers = HeaderMap::new();
    if let Some(map) = record.response_headers.as_object() {
        for (name, value) in map {
            if let (Ok(name), Some(Ok(value))) = (
                header::HeaderName::from_bytes(name.as_bytes()),
                value.as_str().map(HeaderValue::from_str),
            ) {
                headers.insert(name, value);
            }
        }
    }
    Ok(Some(Recorded {
        status,
        headers,
        body: record.response_body,
    }))
}

/// Records `reply` for the request's idempotency key, in the caller's transaction (no-op
/// without a key).
pub async fn record(
    conn: &mut PgConnection,
    request: &CommandRequest,
    reply: &Reply,
) -> Result<(), ApiError> {
    let Some(key) = &request.idempotency_key else {
        return Ok(());
    };
    let headers: serde_json::Map<String, Value> = reply
        .headers()
        .iter()
        .filter_map(|(k, v)| {
            Some((
                k.as_str().to_string(),
                Value::String(v.to_str().ok()?.to_string()),
            ))
        })
        .collect();
    let body = serde_json::to_vec(&reply.body).unwrap_or_default();
    sqlx::query!(
        "INSERT INTO idempotency_records
             (api_key_id, idempotency_key, request_hash, response_status, response_body, response_headers)
         VALUES ($1, $2, $3, $4, $5, $6)",
        request.key.id,
        key,
        request.request_hash,
        reply.status.as_u16() as i16,
        body,
        Value::Object(headers)
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// An error as a recordable reply (problem+json).
pub fn error_reply(error: &ApiError) -> Reply {
    let response = error.problem();
    Reply {
        status: error.status(),
        body: response,
        etag_version: None,
        location: None,
    }
}

/// Deletes idempotency records older than `keep`; returns how many.
pub async fn purge_idempotency_records(
    pool: &sqlx::PgPool,
    keep: Duration,
) -> Result<u64, sqlx::Error> {
    let secs = keep.as_secs_f64();
    let done = sqlx::query!(
        "DELETE FROM idempotency_records WHERE created_at < now() - make_interval(secs => $1)",
        secs
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
