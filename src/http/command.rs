//! Command execution for HTTP routes: load, handle, commit — with optimistic-concurrency
//! retries, `If-Match`, and `Idempotency-Key` handled as API.md says.
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
use crate::store::{Appended, Loaded, Position, StoreError};

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
    let policy = state.retry;
    let metadata = request.metadata();
    for attempt in 0..policy.max_attempts {
        let mut tx = state.pool.begin().await?;
        if let Some(key) = &request.idempotency_key {
            match idempotency_gate(&mut tx, request, key).await? {
                Gate::Proceed => {}
                Gate::Replay(response) => return Ok(response),
            }
        }
        let mut loaded: Loaded<A> = state.store.load(&mut tx, id).await.map_err(store_error)?;
        if let Some(expected) = request.if_match
            && expected != loaded.version
        {
            return Err(ApiError::PreconditionFailed(format!(
                "If-Match is \"{expected}\" but the resource is at version \"{}\"",
                loaded.version
            )));
        }
        let existed_before = loaded.version > 0;
        let command = make(&loaded)?;
        let sink = EventSink::default();
        if let Err(domain) = loaded.aggregate.handle(command, services, &sink).await {
            let error: ApiError = domain.into();
            // The outcome of executing the command: a retry with the key gets it again.
            if let Some(key) = &request.idempotency_key {
                let reply = error_reply(&error);
                record(&mut tx, request, key, &reply).await?;
                tx.commit().await?;
            }
            return Err(error);
        }
        let events = sink.collect().await;
        match state
            .store
            .append(&mut tx, &mut loaded, &events, &metadata)
            .await
        {
            Ok(appended) => {
                let written = Written {
                    loaded,
                    existed_before,
                    appended,
                };
                let reply = render(&written);
                if let Some(key) = &request.idempotency_key {
                    record(&mut tx, request, key, &reply).await?;
                }
                tx.commit().await?;
                metrics::counter!("commands_total", "aggregate" => A::TYPE, "outcome" => "ok")
                    .increment(1);
                return Ok(reply.into_response());
            }
            Err(StoreError::Conflict) => {
                let _ = tx.rollback().await;
                metrics::counter!("command_conflicts_total", "aggregate" => A::TYPE).increment(1);
                tokio::time::sleep(policy.pause(attempt)).await;
            }
            Err(e) => return Err(store_error(e)),
        }
    }
    metrics::counter!("commands_total", "aggregate" => A::TYPE, "outcome" => "retries_exhausted")
        .increment(1);
    Err(ApiError::conflict(
        "concurrency-conflict",
        "the resource kept changing under this command; retry it",
    ))
}

pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Database(e) => e.into(),
        other => ApiError::Internal(other.to_string()),
    }
}

/// What the idempotency check says to do.
pub enum Gate {
    Proceed,
    Replay(Response),
}

/// The idempotency key's lock and record, inside the attempt's transaction.
pub async fn idempotency_gate(
    conn: &mut PgConnection,
    request: &CommandRequest,
    key: &str,
) -> Result<Gate, ApiError> {
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
        return Ok(Gate::Proceed);
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
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(Gate::Replay(
        (status, headers, record.response_body).into_response(),
    ))
}

/// Records `reply` for the request's idempotency key, in the caller's transaction.
pub async fn record(
    conn: &mut PgConnection,
    request: &CommandRequest,
    key: &str,
    reply: &Reply,
) -> Result<(), ApiError> {
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
fn error_reply(error: &ApiError) -> Reply {
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
