//! Outbound event subscriptions (admin): create (the secret shown once), list, read with
//! their delivery state, update, pause and resume, delete, rotate the secret, replay from a
//! position, and the log of delivery attempts. The delivery itself is `app::delivery`.
//!
//! A subscription is operational configuration, not a domain aggregate: its checkpoint
//! moves with every delivery, so it lives in plain tables (`subscriptions` and beside it),
//! changed under the idempotency keys of the commands like every other write.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use http::StatusCode;
use projections::feed::{self, Position};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::app::App;
use crate::app::command::{self, Answer, CommandContext, Reply};
use crate::app::error::{AppError, FieldError};
use crate::app::outbound;

/// How long a rotated-out secret keeps signing beside the new one.
pub const ROTATION_GRACE: chrono::Duration = chrono::Duration::hours(24);
/// The most event-type patterns a subscription takes.
const MAX_EVENT_TYPES: usize = 64;
const MAX_URL_LEN: usize = 2048;
const MAX_DESCRIPTION_LEN: usize = 500;

/// Every event type leadledger writes, by aggregate: what a subscription may ask for by
/// name (`ContactCreated`), by aggregate (`contact.*`) or all at once (`*`).
pub const EVENT_TYPES: &[(&str, &[&str])] = &[
    (
        "contact",
        &[
            "ContactCreated",
            "ContactUpdated",
            "EnrichmentRecorded",
            "ConsentRecorded",
            "ContactErased",
            "ErasureReleased",
            // What an erased contact's earlier events read as.
            "ContactRedacted",
        ],
    ),
    (
        "campaign",
        &[
            "CampaignCreated",
            "CampaignRenamed",
            "CampaignStarted",
            "CampaignPaused",
            "CampaignCompleted",
            "CampaignExternalIdsChanged",
        ],
    ),
    ("enrollment", &["ContactEnrolled", "ProviderEventRecorded"]),
    (
        "budget",
        &[
            "BudgetCreated",
            "SpendRecorded",
            "ReservationMade",
            "ReservationCaptured",
            "ReservationReleased",
            "ReservationExpired",
            "BudgetLimitSet",
            "BudgetThresholdCrossed",
        ],
    ),
];

/// Which events a subscription takes, from its patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeFilter {
    pub all: bool,
    pub event_types: Vec<String>,
    pub aggregate_types: Vec<String>,
}

impl TypeFilter {
    /// The filter of patterns already checked by [`check_event_types`].
    pub fn new(patterns: &[String]) -> Self {
        let mut filter = Self::default();
        for p in patterns {
            if p == "*" {
                filter.all = true;
            } else if let Some(aggregate) = p.strip_suffix(".*") {
                filter.aggregate_types.push(aggregate.to_string());
            } else {
                filter.event_types.push(p.clone());
            }
        }
        filter
    }

    pub fn matches(&self, aggregate_type: &str, event_type: &str) -> bool {
        self.all
            || self.event_types.iter().any(|t| t == event_type)
            || self.aggregate_types.iter().any(|a| a == aggregate_type)
    }
}

/// Refuses patterns that name no event type (422), and an empty or overlong list.
pub fn check_event_types(patterns: &[String]) -> Result<(), FieldError> {
    if patterns.is_empty() {
        return Err(FieldError::new(
            "event_types",
            "must name at least one event type (\"*\" for all)",
        ));
    }
    if patterns.len() > MAX_EVENT_TYPES {
        return Err(FieldError::new(
            "event_types",
            format!("at most {MAX_EVENT_TYPES} patterns"),
        ));
    }
    for (i, p) in patterns.iter().enumerate() {
        let known = p == "*"
            || EVENT_TYPES.iter().any(|(aggregate, types)| {
                p.strip_suffix(".*") == Some(aggregate) || types.contains(&p.as_str())
            });
        if !known {
            return Err(FieldError::new(
                format!("event_types[{i}]"),
                "not an event type: use \"*\", \"<aggregate>.*\" (contact, campaign, enrollment, budget) or an event type such as \"ContactCreated\"",
            ));
        }
    }
    Ok(())
}

fn check_url(app: &App, url: &str) -> Result<String, FieldError> {
    if url.len() > MAX_URL_LEN {
        return Err(FieldError::new(
            "url",
            format!("at most {MAX_URL_LEN} characters"),
        ));
    }
    outbound::check_target(url, app.outbound.allow_private)
        .map(|u| u.to_string())
        .map_err(|e| FieldError::new("url", e.to_string()))
}

/// `POST /v1/subscriptions`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSubscription {
    /// `https://…` (plain `http` only with `LEADLEDGER_OUTBOUND_ALLOW_PRIVATE=true`).
    pub url: String,
    /// `"*"` (the default), `"<aggregate>.*"` or event types such as `"ContactCreated"`.
    pub event_types: Option<Vec<String>>,
    pub description: Option<String>,
}

/// `PATCH /v1/subscriptions/{id}`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionChange {
    pub url: Option<String>,
    pub event_types: Option<Vec<String>>,
    /// `active` (resume, also after `disabled`) or `paused`.
    pub status: Option<String>,
    pub description: Option<String>,
}

/// A subscription as created: the secret shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubscriptionCreated {
    pub id: Uuid,
    pub url: String,
    pub event_types: Vec<String>,
    pub description: Option<String>,
    pub status: String,
    /// `whsec_<base64>`: shown once (and to a retry with the same `Idempotency-Key`).
    pub secret: String,
    pub created_at: DateTime<Utc>,
}

/// A subscription with its delivery state. Never a secret.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Subscription {
    pub id: Uuid,
    pub url: String,
    pub event_types: Vec<String>,
    pub description: Option<String>,
    /// `active`, `paused` or `disabled`.
    pub status: String,
    pub disabled_reason: Option<String>,
    /// The last event delivered or passed over (a position token).
    pub position: String,
    /// Events after `position` that the subscription takes, not yet delivered.
    pub backlog: i64,
    /// The breaker of the URL's host: `closed`, `open` or `half_open`.
    pub breaker: String,
    /// Failed attempts at the next message.
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One delivery attempt.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeliveryAttempt {
    #[serde(skip)]
    pub id: i64,
    /// The `webhook-id` (the same on every attempt at one event).
    pub message_id: String,
    pub event_type: String,
    /// 1 for the first attempt at this message.
    pub attempt: i32,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub latency_ms: i64,
    pub attempted_at: DateTime<Utc>,
    /// When the message is tried again; null after a success or when none follows.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// The member of a recorded answer that holds the secret, sealed with the server's secret
/// key: idempotency records never hold a secret in plaintext.
const SEALED_SECRET: &str = "secret_sealed";

fn new_secret() -> (String, Vec<u8>) {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    (format!("whsec_{}", STANDARD.encode(key)), key.to_vec())
}

async fn store_secret(
    conn: &mut PgConnection,
    app: &App,
    id: Uuid,
    secret: &str,
) -> Result<(), AppError> {
    let (nonce, sealed) = app.secrets.seal(secret.as_bytes());
    sqlx::query!(
        "INSERT INTO subscription_secrets (subscription_id, secret_nonce, secret_ciphertext)
         VALUES ($1, $2, $3)",
        id,
        nonce,
        sealed
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn seal(app: &App, secret: &str) -> String {
    let (nonce, sealed) = app.secrets.seal(secret.as_bytes());
    format!("{}.{}", STANDARD.encode(nonce), STANDARD.encode(sealed))
}

/// A recorded answer with its sealed secret opened again.
fn open_recorded(app: &App, mut recorded: command::Recorded) -> Result<Answer, AppError> {
    if let Ok(mut body) = serde_json::from_slice::<Value>(&recorded.body)
        && let Some(sealed) = body.as_object_mut().and_then(|b| b.remove(SEALED_SECRET))
    {
        let broken =
            || AppError::Internal("a recorded subscription secret cannot be opened".into());
        let (nonce, sealed) = sealed
            .as_str()
            .and_then(|s| s.split_once('.'))
            .ok_or_else(broken)?;
        let nonce = STANDARD.decode(nonce).map_err(|_| broken())?;
        let sealed = STANDARD.decode(sealed).map_err(|_| broken())?;
        let secret = app
            .secrets
            .open(&nonce, &sealed)
            .map_err(|e| AppError::Internal(e.to_string()))?;
        body["secret"] = Value::String(String::from_utf8(secret).map_err(|_| broken())?);
        recorded.body = serde_json::to_vec(&body).unwrap_or_default();
    }
    Ok(Answer::Replayed(recorded))
}

/// Records `shown` for the idempotency key with its secret sealed, and answers `shown`.
async fn record_with_secret(
    conn: &mut PgConnection,
    app: &App,
    context: &CommandContext,
    status: StatusCode,
    shown: Value,
) -> Result<Answer, AppError> {
    let mut recorded = shown.clone();
    if let Some(secret) = recorded
        .as_object_mut()
        .and_then(|b| b.remove("secret"))
        .and_then(|s| s.as_str().map(str::to_string))
    {
        recorded[SEALED_SECRET] = Value::String(seal(app, &secret));
    }
    command::record(conn, context, &Reply::ok(recorded).with_status(status)).await?;
    Ok(Answer::Fresh(Reply::ok(shown).with_status(status)))
}

/// Creates a subscription, delivering the events committed from now on.
pub async fn create(
    app: &App,
    context: &CommandContext,
    input: NewSubscription,
) -> Result<Answer, AppError> {
    let mut errors = Vec::new();
    let url = check_url(app, &input.url).map_err(|e| errors.push(e)).ok();
    let event_types = input.event_types.unwrap_or_else(|| vec!["*".into()]);
    if let Err(e) = check_event_types(&event_types) {
        errors.push(e);
    }
    if input
        .description
        .as_ref()
        .is_some_and(|d| d.chars().count() > MAX_DESCRIPTION_LEN)
    {
        errors.push(FieldError::new(
            "description",
            format!("at most {MAX_DESCRIPTION_LEN} characters"),
        ));
    }
    let (Some(url), true) = (url, errors.is_empty()) else {
        return Err(AppError::invalid(errors));
    };
    let mut tx = app.pool.begin().await?;
    if let Some(recorded) = command::replay(&mut tx, context).await? {
        tx.commit().await?;
        return open_recorded(app, recorded);
    }
    let id = Uuid::now_v7();
    let head = feed::head(&mut tx).await?.unwrap_or_default();
    let created_at = sqlx::query_scalar!(
        r#"INSERT INTO subscriptions (id, url, event_types, description, status, transaction_id, position)
           VALUES ($1, $2, $3, $4, 'active', $5::text::xid8, $6)
           RETURNING created_at"#,
        id,
        url,
        &event_types,
        input.description,
        head.transaction_id.to_string(),
        head.position
    )
    .fetch_one(&mut *tx)
    .await?;
    let (secret, _) = new_secret();
    store_secret(&mut tx, app, id, &secret).await?;
    let shown = serde_json::to_value(SubscriptionCreated {
        id,
        url,
        event_types,
        description: input.description,
        status: "active".into(),
        secret,
        created_at,
    })
    .unwrap_or_default();
    let answer = record_with_secret(&mut tx, app, context, StatusCode::CREATED, shown).await?;
    tx.commit().await?;
    Ok(answer)
}

struct Row {
    id: Uuid,
    url: String,
    event_types: Vec<String>,
    description: Option<String>,
    status: String,
    disabled_reason: Option<String>,
    transaction_id: String,
    position: i64,
    attempts: i32,
    next_attempt_at: Option<DateTime<Utc>>,
    last_success_at: Option<DateTime<Utc>>,
    last_failure_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    breaker: Option<String>,
}

async fn view(conn: &mut PgConnection, row: Row) -> Result<Subscription, AppError> {
    let at = Position::stored(&row.transaction_id, row.position)?;
    let filter = TypeFilter::new(&row.event_types);
    let backlog = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM events
           WHERE (transaction_id, position) > ($1::text::xid8, $2)
             AND ($3 OR event_type = ANY($4) OR aggregate_type = ANY($5))"#,
        at.transaction_id.to_string(),
        at.position,
        filter.all,
        &filter.event_types,
        &filter.aggregate_types
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Subscription {
        id: row.id,
        url: row.url,
        event_types: row.event_types,
        description: row.description,
        status: row.status,
        disabled_reason: row.disabled_reason,
        position: at.to_string(),
        backlog,
        breaker: row.breaker.unwrap_or_else(|| "closed".into()),
        attempts: row.attempts,
        next_attempt_at: row.next_attempt_at,
        last_success_at: row.last_success_at,
        last_failure_at: row.last_failure_at,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

/// The subscription `id` with its delivery state.
pub async fn get(app: &App, id: Uuid) -> Result<Subscription, AppError> {
    let mut conn = app.pool.acquire().await?;
    let rows = read_rows(&mut conn, Some(id), None, 1).await?;
    let Some(row) = rows.into_iter().next() else {
        return Err(AppError::NotFound("no subscription with this id".into()));
    };
    view(&mut conn, row).await
}

/// Subscriptions by id, after `after`.
pub async fn list(
    app: &App,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Subscription>, AppError> {
    let mut conn = app.pool.acquire().await?;
    let rows = read_rows(&mut conn, None, after, limit).await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in rows {
        items.push(view(&mut conn, row).await?);
    }
    Ok(items)
}

async fn read_rows(
    conn: &mut PgConnection,
    id: Option<Uuid>,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Row>, sqlx::Error> {
    // The breaker is kept per host and port; the URL is parsed here as it is there.
    let rows = sqlx::query!(
        r#"SELECT id, url, event_types, description, status, disabled_reason,
                  transaction_id::text AS "transaction_id!", position, attempts,
                  next_attempt_at, last_success_at, last_failure_at, created_at, updated_at
           FROM subscriptions
           WHERE ($1::uuid IS NULL OR id = $1) AND ($2::uuid IS NULL OR id > $2)
           ORDER BY id LIMIT $3"#,
        id,
        after,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let host = reqwest::Url::parse(&r.url)
            .map(|u| outbound::breaker_host(&u))
            .unwrap_or_default();
        let breaker =
            sqlx::query_scalar!("SELECT state FROM outbound_breakers WHERE host = $1", host)
                .fetch_optional(&mut *conn)
                .await?;
        out.push(Row {
            id: r.id,
            url: r.url,
            event_types: r.event_types,
            description: r.description,
            status: r.status,
            disabled_reason: r.disabled_reason,
            transaction_id: r.transaction_id,
            position: r.position,
            attempts: r.attempts,
            next_attempt_at: r.next_attempt_at,
            last_success_at: r.last_success_at,
            last_failure_at: r.last_failure_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
            breaker,
        });
    }
    Ok(out)
}

/// Changes url, event types, description or status (`active` resumes, also a disabled
/// subscription, from its checkpoint; `paused` stops delivering).
pub async fn update(
    app: &App,
    context: &CommandContext,
    id: Uuid,
    change: SubscriptionChange,
) -> Result<Answer, AppError> {
    let mut errors = Vec::new();
    let url = match &change.url {
        Some(u) => check_url(app, u).map(Some).unwrap_or_else(|e| {
            errors.push(e);
            None
        }),
        None => None,
    };
    if let Some(types) = &change.event_types
        && let Err(e) = check_event_types(types)
    {
        errors.push(e);
    }
    if let Some(status) = &change.status
        && !matches!(status.as_str(), "active" | "paused")
    {
        errors.push(FieldError::new(
            "status",
            "must be \"active\" or \"paused\"",
        ));
    }
    if change
        .description
        .as_ref()
        .is_some_and(|d| d.chars().count() > MAX_DESCRIPTION_LEN)
    {
        errors.push(FieldError::new(
            "description",
            format!("at most {MAX_DESCRIPTION_LEN} characters"),
        ));
    }
    if !errors.is_empty() {
        return Err(AppError::invalid(errors));
    }
    let mut tx = app.pool.begin().await?;
    if let Some(recorded) = command::replay(&mut tx, context).await? {
        tx.commit().await?;
        return Ok(Answer::Replayed(recorded));
    }
    // Resuming starts the next message's retry schedule afresh.
    let updated = sqlx::query!(
        "UPDATE subscriptions SET
             url = coalesce($2, url),
             event_types = coalesce($3, event_types),
             description = coalesce($4, description),
             status = coalesce($5, status),
             disabled_reason = CASE WHEN $5 IS NULL THEN disabled_reason ELSE NULL END,
             attempts = CASE WHEN $5 = 'active' AND status <> 'active' THEN 0 ELSE attempts END,
             next_attempt_at = CASE WHEN $5 = 'active' AND status <> 'active' THEN NULL
                                    ELSE next_attempt_at END,
             revision = revision + 1, updated_at = now()
         WHERE id = $1",
        id,
        url,
        change.event_types.as_deref(),
        change.description,
        change.status
    )
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(AppError::NotFound("no subscription with this id".into()));
    }
    let rows = read_rows(&mut tx, Some(id), None, 1).await?;
    let Some(row) = rows.into_iter().next() else {
        return Err(AppError::NotFound("no subscription with this id".into()));
    };
    let body = serde_json::to_value(view(&mut tx, row).await?).unwrap_or_default();
    let reply = Reply::ok(body);
    command::record(&mut tx, context, &reply).await?;
    tx.commit().await?;
    Ok(Answer::Fresh(reply))
}

/// Deletes a subscription with its secrets and delivery log (204).
pub async fn delete(app: &App, context: &CommandContext, id: Uuid) -> Result<Answer, AppError> {
    let mut tx = app.pool.begin().await?;
    if let Some(recorded) = command::replay(&mut tx, context).await? {
        tx.commit().await?;
        return Ok(Answer::Replayed(recorded));
    }
    let deleted = sqlx::query!("DELETE FROM subscriptions WHERE id = $1", id)
        .execute(&mut *tx)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(AppError::NotFound("no subscription with this id".into()));
    }
    let reply = Reply::ok(Value::Null).with_status(StatusCode::NO_CONTENT);
    command::record(&mut tx, context, &reply).await?;
    tx.commit().await?;
    Ok(Answer::Fresh(reply))
}

/// Issues a new secret; the ones before it keep signing for [`ROTATION_GRACE`].
pub async fn rotate_secret(
    app: &App,
    context: &CommandContext,
    id: Uuid,
) -> Result<Answer, AppError> {
    let mut tx = app.pool.begin().await?;
    if let Some(recorded) = command::replay(&mut tx, context).await? {
        tx.commit().await?;
        return open_recorded(app, recorded);
    }
    // The revision moves so that a deliverer signs with the new secret from its next message.
    let exists = sqlx::query_scalar!(
        "UPDATE subscriptions SET revision = revision + 1, updated_at = now() WHERE id = $1 RETURNING id",
        id
    )
    .fetch_optional(&mut *tx)
    .await?;
    if exists.is_none() {
        return Err(AppError::NotFound("no subscription with this id".into()));
    }
    sqlx::query!(
        "UPDATE subscription_secrets SET expires_at = now() + make_interval(secs => $2)
         WHERE subscription_id = $1 AND (expires_at IS NULL OR expires_at > now() + make_interval(secs => $2))",
        id,
        ROTATION_GRACE.num_seconds() as f64
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "DELETE FROM subscription_secrets WHERE subscription_id = $1 AND expires_at <= now()",
        id
    )
    .execute(&mut *tx)
    .await?;
    let (secret, _) = new_secret();
    store_secret(&mut tx, app, id, &secret).await?;
    let shown = json!({ "id": id, "secret": secret });
    let answer = record_with_secret(&mut tx, app, context, StatusCode::OK, shown).await?;
    tx.commit().await?;
    Ok(answer)
}

/// The keys that sign a subscription's messages now: the current secret and those rotated
/// out less than [`ROTATION_GRACE`] ago.
pub async fn signing_keys(
    conn: &mut PgConnection,
    app: &App,
    id: Uuid,
) -> Result<Vec<Vec<u8>>, AppError> {
    let rows = sqlx::query!(
        "SELECT secret_nonce, secret_ciphertext FROM subscription_secrets
         WHERE subscription_id = $1 AND (expires_at IS NULL OR expires_at > now())
         ORDER BY id DESC",
        id
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut keys = Vec::with_capacity(rows.len());
    for r in rows {
        let secret = app
            .secrets
            .open(&r.secret_nonce, &r.secret_ciphertext)
            .map_err(|e| AppError::Internal(e.to_string()))?;
        let text = String::from_utf8(secret)
            .map_err(|_| AppError::Internal("a subscription secret is not text".into()))?;
        let encoded = text.strip_prefix("whsec_").unwrap_or(&text);
        keys.push(
            STANDARD
                .decode(encoded)
                .map_err(|_| AppError::Internal("a subscription secret is not base64".into()))?,
        );
    }
    Ok(keys)
}

/// `POST /v1/subscriptions/{id}/replay`: a position token as write answers carry it, or an
/// event's number in the feed (0: from the beginning).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Replay {
    #[schema(value_type = String)]
    pub from_position: Value,
}

/// Delivers again from `from_position` (that event included), and resumes a disabled
/// subscription (a paused one stays paused).
pub async fn replay(
    app: &App,
    context: &CommandContext,
    id: Uuid,
    input: Replay,
) -> Result<Answer, AppError> {
    let invalid = || {
        AppError::invalid(vec![FieldError::new(
            "from_position",
            "must be a position token (as writes answer it) or an event's position number",
        )])
    };
    let mut tx = app.pool.begin().await?;
    let from = match &input.from_position {
        Value::String(token) => token.parse::<Position>().map_err(|_| invalid())?,
        Value::Number(n) => {
            let n = n.as_i64().filter(|n| *n >= 0).ok_or_else(invalid)?;
            if n == 0 {
                Position::default()
            } else {
                let xid = sqlx::query_scalar!(
                    r#"SELECT transaction_id::text AS "xid!" FROM events WHERE position = $1"#,
                    n
                )
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| {
                    AppError::invalid(vec![FieldError::new(
                        "from_position",
                        "no event has this position",
                    )])
                })?;
                Position::stored(&xid, n)?
            }
        }
        _ => return Err(invalid()),
    };
    if let Some(recorded) = command::replay(&mut tx, context).await? {
        tx.commit().await?;
        return Ok(Answer::Replayed(recorded));
    }
    // The checkpoint is "the last event passed": one before `from`, so `from` is sent.
    let before = Position {
        transaction_id: from.transaction_id,
        position: (from.position - 1).max(0),
    };
    let updated = sqlx::query!(
        "UPDATE subscriptions SET transaction_id = $2::text::xid8, position = $3,
             attempts = 0, next_attempt_at = NULL,
             status = CASE WHEN status = 'disabled' THEN 'active' ELSE status END,
             disabled_reason = CASE WHEN status = 'disabled' THEN NULL ELSE disabled_reason END,
             revision = revision + 1, updated_at = now()
         WHERE id = $1",
        id,
        before.transaction_id.to_string(),
        before.position
    )
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(AppError::NotFound("no subscription with this id".into()));
    }
    let reply = Reply::ok(json!({ "id": id, "from_position": from.to_string() }))
        .with_status(StatusCode::ACCEPTED);
    command::record(&mut tx, context, &reply).await?;
    tx.commit().await?;
    Ok(Answer::Fresh(reply))
}

/// Delivery attempts of `id`, newest first, before the attempt `before`.
pub async fn deliveries(
    app: &App,
    id: Uuid,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<DeliveryAttempt>, AppError> {
    let mut conn = app.pool.acquire().await?;
    let exists = sqlx::query_scalar!("SELECT id FROM subscriptions WHERE id = $1", id)
        .fetch_optional(&mut *conn)
        .await?;
    if exists.is_none() {
        return Err(AppError::NotFound("no subscription with this id".into()));
    }
    let rows = sqlx::query_as!(
        DeliveryAttempt,
        "SELECT id, message_id, event_type, attempt, status_code, error, latency_ms,
                attempted_at, next_attempt_at
         FROM subscription_deliveries
         WHERE subscription_id = $1 AND ($2::bigint IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3",
        id,
        before,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_name_known_event_types_or_aggregates() {
        let ok =
            |p: &[&str]| check_event_types(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&["*"]).is_ok());
        assert!(ok(&["contact.*", "CampaignStarted"]).is_ok());
        assert!(ok(&[]).is_err());
        assert!(ok(&["Contact*"]).is_err());
        assert!(ok(&["widget.*"]).is_err());
        assert!(ok(&["ContactDeleted"]).is_err());
        let filter = TypeFilter::new(&["contact.*".into(), "CampaignStarted".into()]);
        assert!(filter.matches("contact", "ContactUpdated"));
        assert!(filter.matches("campaign", "CampaignStarted"));
        assert!(!filter.matches("campaign", "CampaignCreated"));
    }
}
