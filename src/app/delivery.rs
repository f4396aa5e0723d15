//! The delivery of subscriptions: each active subscription's events, read from the feed
//! after its checkpoint, sent one message at a time in feed order (Standard Webhooks
//! signed, `webhook-id` stable per event), retried on the schedule with full jitter, held
//! while its host's circuit breaker is open.
//!
//! - One deliverer per subscription across processes: it holds a PostgreSQL session
//!   advisory lock on a connection of its own for as long as it delivers, and writes its
//!   progress on that connection. A process that dies loses its connection and the lock
//!   with it; another process takes the subscription over from its checkpoint.
//! - At least once: the checkpoint moves only after a 2xx, so a crash between the answer
//!   and the checkpoint sends that one message again, with the same `webhook-id`.
//! - The breaker of a host is shared by every process (a row of `outbound_breakers`):
//!   closed → open after consecutive failures → one half-open probe after the cool-down →
//!   closed on its success, open again on its failure. An open breaker sends nothing to
//!   the host and burns no subscription's retry schedule.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use projections::feed::{self, FeedEvent, Position};
use projections::wake::sleep_or_cancel;
use rand::Rng;
use serde_json::{Value, json};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::app::App;
use crate::app::outbound::{self, OutboundConfig, Sent};
use crate::app::subscriptions::{TypeFilter, signing_keys};

/// First key of the two-key advisory locks of subscriptions ("LS"); the second is the
/// subscription's `lock_key`.
pub const LOCK_CLASS: i32 = 0x4c53;

/// The retry schedule after the first failure (the README, "Subscriptions"), before
/// scaling and jitter.
pub const SCHEDULE: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];
/// The longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Events read from the feed at a time.
const BATCH: i64 = 200;
/// How often a deliverer looks at its subscription again while it waits (to see a pause,
/// a change or a deletion), and a process looks for subscriptions to take.
const RECHECK: Duration = Duration::from_millis(500);
/// The first look again after a wake-up that found nothing (doubling up to [`RECHECK`]).
const RECHECK_AFTER_WAKE: Duration = Duration::from_millis(5);
/// Delivery attempts are kept this long.
pub const LOG_RETENTION: chrono::Duration = chrono::Duration::days(14);

/// The one place an event becomes a message body: personal data is to be decrypted (or an
/// erased person's redacted) here, at send time.
pub fn message_for(event: &FeedEvent) -> Value {
    // Events are stored as their enum (`{"ContactCreated": {...}}`): the message carries
    // the variant's fields, its name being `type`.
    // The feed read this text as JSON, so it parses again (within serde_json's nesting
    // limit, which request bodies are parsed under too).
    let payload = event.payload.to_value().unwrap_or_default();
    let inner = match payload {
        Value::Object(mut m) if m.len() == 1 && m.contains_key(&event.event_type) => {
            m.remove(&event.event_type).unwrap_or_default()
        }
        other => other,
    };
    json!({
        "type": event.event_type,
        "timestamp": event.recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "data": {
            "aggregate_type": event.aggregate_type,
            "aggregate_id": event.aggregate_id,
            "sequence": event.sequence,
            "position": event.at.to_string(),
            "event": inner,
        }
    })
}

/// The `webhook-id` of an event's message: the same at every attempt.
pub fn message_id(event: &FeedEvent) -> String {
    format!("evt_{}", event.at.position)
}

/// The wait before attempt `failures + 1`, after `failures` failures (1-based): full
/// jitter (uniform between zero and the scheduled delay); `None` when the schedule is
/// exhausted.
pub fn backoff(config: &OutboundConfig, failures: usize) -> Option<Duration> {
    let base = config.scaled(*SCHEDULE.get(failures.checked_sub(1)?)?);
    let jittered = rand::rng().random_range(0.0..=1.0) * base.as_secs_f64();
    Some(Duration::from_secs_f64(jittered))
}

/// Starts the delivery of every subscription (one task per subscription this process
/// holds the lock of) until `cancel`.
pub fn spawn(app: App, cancel: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let client = outbound::client(&app.outbound);
        let mut running: HashMap<Uuid, JoinHandle<()>> = HashMap::new();
        let mut last_purge = Instant::now() - Duration::from_secs(3600);
        while !cancel.is_cancelled() {
            running.retain(|_, task| !task.is_finished());
            match sqlx::query_scalar!(
                "SELECT id FROM subscriptions WHERE status = 'active' ORDER BY id"
            )
            .fetch_all(&app.pool)
            .await
            {
                Ok(ids) => {
                    for id in ids {
                        if running.contains_key(&id) {
                            continue;
                        }
                        let deliverer = Deliverer {
                            app: app.clone(),
                            client: client.clone(),
                            id,
                            wake: app.wakeup.subscribe(),
                            horizon: app.wakeup.subscribe_horizon(),
                            cancel: cancel.clone(),
                            keys: None,
                        };
                        running.insert(id, tokio::spawn(deliverer.run()));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "listing subscriptions failed"),
            }
            if last_purge.elapsed() > Duration::from_secs(3600) {
                last_purge = Instant::now();
                let before = Utc::now() - LOG_RETENTION;
                if let Err(e) = sqlx::query!(
                    "DELETE FROM subscription_deliveries WHERE attempted_at < $1",
                    before
                )
                .execute(&app.pool)
                .await
                {
                    tracing::warn!(error = %e, "purging old delivery attempts failed");
                }
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(RECHECK) => {},
            }
        }
        for (_, task) in running {
            let _ = task.await;
        }
    })
}

struct Deliverer {
    app: App,
    client: reqwest::Client,
    id: Uuid,
    /// New events committed (in this process, or notified by another).
    wake: watch::Receiver<u64>,
    /// A transaction that may have held the feed's horizon ended.
    horizon: watch::Receiver<u64>,
    cancel: CancellationToken,
    /// The signing keys as of a revision (a rotation moves the revision) and when they were
    /// read (a rotated-out key stops signing when its grace ends, with no revision).
    keys: Option<(i64, Instant, Vec<Vec<u8>>)>,
}

/// A subscription's row as the deliverer needs it.
struct State {
    url: String,
    filter: TypeFilter,
    status: String,
    at: Position,
    attempts: i32,
    next_attempt_at: Option<DateTime<Utc>>,
    revision: i64,
    /// The signing keys, read once per batch (a rotation bumps the revision).
    keys: Vec<Vec<u8>>,
    /// The URL's breaker host, and whether its breaker was seen closed without failures
    /// (then it is not read again before every message of the batch).
    host: String,
    clean_breaker: bool,
}

/// What became of the message at the head of the subscription.
enum Step {
    Delivered,
    /// Not sent: the breaker is open, or another probe is under way.
    Held,
    /// Failed; the next attempt is scheduled, or the subscription disabled.
    Failed,
    /// The subscription changed under the attempt (an operator's update): read it again.
    Changed,
}

impl Deliverer {
    async fn run(mut self) {
        let mut conn = match self.connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(subscription = %self.id, error = %e, "subscription cannot connect");
                return;
            }
        };
        let locked = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_lock($1, lock_key) AS "locked!"
               FROM subscriptions WHERE id = $2"#,
            LOCK_CLASS,
            self.id
        )
        .fetch_optional(&mut conn)
        .await;
        if !matches!(locked, Ok(Some(true))) {
            // Another process delivers it (or it is gone); this one looks again later.
            let _ = conn.close().await;
            return;
        }
        tracing::info!(subscription = %self.id, "delivering this subscription here");
        if let Err(e) = self.deliver(&mut conn).await {
            tracing::warn!(subscription = %self.id, error = %e, "subscription delivery stopped; it will be taken up again");
        }
        // Closing the connection releases the lock.
        let _ = conn.close().await;
    }

    /// The deliverer's own connection. Its commits do not wait for the disk: a checkpoint
    /// lost in a database crash sends a message again, which at-least-once allows.
    async fn connect(&self) -> Result<PgConnection, sqlx::Error> {
        self.app
            .pool
            .connect_options()
            .as_ref()
            .clone()
            // The process first: names past 63 bytes are cut.
            .application_name(&format!(
                "leadledger-sub:pid{}:{}",
                std::process::id(),
                self.id
            ))
            .options([("synchronous_commit", "off")])
            .connect()
            .await
    }

    async fn load(&mut self, conn: &mut PgConnection) -> Result<Option<State>, sqlx::Error> {
        let row = sqlx::query!(
            r#"SELECT url, event_types, status, transaction_id::text AS "transaction_id!", position,
                      attempts, next_attempt_at, revision
               FROM subscriptions WHERE id = $1"#,
            self.id
        )
        .fetch_optional(&mut *conn)
        .await?;
        let Some(r) = row else {
            return Ok(None);
        };
        let keys = match &self.keys {
            Some((revision, read, keys))
                if *revision == r.revision && read.elapsed() < Duration::from_secs(60) =>
            {
                keys.clone()
            }
            _ => match signing_keys(conn, &self.app, self.id).await {
                Ok(keys) => {
                    self.keys = Some((r.revision, Instant::now(), keys.clone()));
                    keys
                }
                Err(crate::app::error::AppError::Database(e)) => return Err(e),
                Err(e) => {
                    tracing::error!(subscription = %self.id, error = %e, "subscription secrets cannot be read");
                    Vec::new()
                }
            },
        };
        let host = reqwest::Url::parse(&r.url)
            .map(|u| outbound::breaker_host(&u))
            .unwrap_or_default();
        Ok(Some(State {
            keys,
            host,
            clean_breaker: false,
            url: r.url,
            filter: TypeFilter::new(&r.event_types),
            status: r.status,
            at: Position::stored(&r.transaction_id, r.position)?,
            attempts: r.attempts,
            next_attempt_at: r.next_attempt_at,
            revision: r.revision,
        }))
    }

    async fn deliver(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let mut recheck = projections::wake::Recheck::new(RECHECK_AFTER_WAKE);
        loop {
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            self.wake.borrow_and_update();
            self.horizon.borrow_and_update();
            let Some(mut state) = self.load(conn).await? else {
                return Ok(());
            };
            if state.status != "active" {
                return Ok(());
            }
            if let Some(due) = state.next_attempt_at {
                let wait = (due - Utc::now()).to_std().unwrap_or_default();
                if !wait.is_zero() {
                    sleep_or_cancel(wait.min(RECHECK), &self.cancel).await;
                    continue;
                }
            }
            let events = feed::read(conn, state.at, BATCH).await?;
            let full = events.len() as i64 == BATCH;
            if !events.is_empty() {
                recheck.found();
            }
            let mut passed = state.at;
            let mut stop = false;
            for event in &events {
                if !state
                    .filter
                    .matches(&event.aggregate_type, &event.event_type)
                {
                    passed = event.at;
                    continue;
                }
                match self.attempt(conn, &mut state, passed, event).await? {
                    Step::Delivered => {
                        // The next message starts its own schedule.
                        passed = event.at;
                        state.at = event.at;
                        state.attempts = 0;
                    }
                    Step::Held => {
                        self.pass(conn, &state, passed).await?;
                        let cooldown = self.app.outbound.scaled(self.app.outbound.breaker_cooldown);
                        sleep_or_cancel(
                            cooldown.clamp(Duration::from_millis(10), RECHECK),
                            &self.cancel,
                        )
                        .await;
                        stop = true;
                        break;
                    }
                    Step::Failed | Step::Changed => {
                        stop = true;
                        break;
                    }
                }
                if self.cancel.is_cancelled() {
                    return Ok(());
                }
            }
            if stop {
                continue;
            }
            self.pass(conn, &state, passed).await?;
            if full {
                continue;
            }
            tokio::select! {
                () = self.cancel.cancelled() => return Ok(()),
                _ = self.wake.changed() => recheck.woken(),
                _ = self.horizon.changed(), if recheck.pending() => {}
                () = tokio::time::sleep(recheck.wait(RECHECK)) => recheck.waited(RECHECK),
            }
        }
    }

    /// Moves the checkpoint past events the subscription does not take.
    async fn pass(
        &self,
        conn: &mut PgConnection,
        state: &State,
        to: Position,
    ) -> Result<(), sqlx::Error> {
        if to <= state.at {
            return Ok(());
        }
        sqlx::query!(
            "UPDATE subscriptions SET transaction_id = $2::text::xid8, position = $3
             WHERE id = $1 AND revision = $4 AND (transaction_id, position) < ($2::text::xid8, $3)",
            self.id,
            to.transaction_id.to_string(),
            to.position,
            state.revision
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    async fn attempt(
        &self,
        conn: &mut PgConnection,
        state: &mut State,
        passed: Position,
        event: &FeedEvent,
    ) -> Result<Step, sqlx::Error> {
        let config = &self.app.outbound;
        let host = state.host.clone();
        if state.keys.is_empty() {
            return Ok(Step::Held);
        }
        if !state.clean_breaker {
            match breaker_allows(conn, config, &host).await? {
                Breaker::Held => return Ok(Step::Held),
                Breaker::Clean => state.clean_breaker = true,
                Breaker::Allowed => {}
            }
        }
        let keys = &state.keys;
        let id = message_id(event);
        let body = serde_json::to_vec(&message_for(event)).unwrap_or_default();
        let timestamp = Utc::now().timestamp();
        let headers = vec![
            ("webhook-id", id.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            (
                "webhook-signature",
                outbound::sign(keys, &id, timestamp, &body),
            ),
        ];
        let started = Instant::now();
        // Shutdown does not wait for a slow receiver: the attempt is dropped unrecorded and
        // the message goes again, with its id, from wherever delivery resumes.
        let sent = tokio::select! {
            sent = outbound::post(&self.client, config, &state.url, headers, body) => sent,
            () = self.cancel.cancelled() => return Ok(Step::Changed),
        };
        let latency_ms = started.elapsed().as_millis() as i64;
        let success = sent.status.is_some_and(|s| (200..300).contains(&s));
        let attempt = state.attempts + 1;
        let label = [("subscription", self.id.to_string())];
        if success {
            let updated = sqlx::query!(
                "WITH moved AS (
                     UPDATE subscriptions SET transaction_id = $2::text::xid8, position = $3,
                         attempts = 0, next_attempt_at = NULL, last_success_at = now()
                     WHERE id = $1 AND revision = $4
                     RETURNING id)
                 INSERT INTO subscription_deliveries
                     (subscription_id, message_id, event_type, attempt, status_code, error, latency_ms)
                 SELECT id, $5, $6, $7, $8, NULL, $9 FROM moved",
                self.id,
                event.at.transaction_id.to_string(),
                event.at.position,
                state.revision,
                id,
                event.event_type,
                attempt,
                sent.status.map(i32::from),
                latency_ms
            )
            .execute(&mut *conn)
            .await?;
            if !state.clean_breaker {
                breaker_success(conn, &host).await?;
                state.clean_breaker = true;
            }
            metrics::counter!("subscription_deliveries_total", "outcome" => "delivered")
                .increment(1);
            metrics::counter!("subscription_messages_delivered_total", &label).increment(1);
            let lag = (Utc::now() - event.recorded_at)
                .to_std()
                .unwrap_or_default();
            metrics::histogram!("subscription_delivery_lag_seconds").record(lag.as_secs_f64());
            return Ok(if updated.rows_affected() == 1 {
                Step::Delivered
            } else {
                Step::Changed
            });
        }
        metrics::counter!("subscription_deliveries_total", "outcome" => "failed").increment(1);
        let refused = sent
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("refused target"));
        // The host is at fault for the breaker when it does not answer or answers that it
        // cannot cope; a 4xx other than 429 is this subscription's own problem.
        if !refused && host_failed(&sent) {
            breaker_failure(conn, config, &host).await?;
        }
        let (next, disabled) = if sent.status == Some(410) {
            (None, Some("the receiver answered 410 Gone".to_string()))
        } else {
            let asked = matches!(sent.status, Some(429 | 503))
                .then_some(sent.retry_after)
                .flatten()
                .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
            match (asked, backoff(config, attempt as usize)) {
                (Some(wait), _) => (Some(wait), None),
                (None, Some(wait)) => (Some(wait), None),
                (None, None) => (
                    None,
                    Some(format!(
                        "delivery of {id} failed {attempt} times; the retry schedule is exhausted"
                    )),
                ),
            }
        };
        let next_at = next.map(|d| Utc::now() + chrono::Duration::from_std(d).unwrap_or_default());
        let error = sent
            .error
            .clone()
            .or_else(|| sent.status.map(|s| format!("the receiver answered {s}")));
        sqlx::query!(
            "WITH failed AS (
                 UPDATE subscriptions SET transaction_id = $2::text::xid8, position = $3,
                     attempts = $5, next_attempt_at = $6, last_failure_at = now(),
                     status = CASE WHEN $7::text IS NULL THEN status ELSE 'disabled' END,
                     disabled_reason = coalesce($7, disabled_reason)
                 WHERE id = $1 AND revision = $4
                 RETURNING id)
             INSERT INTO subscription_deliveries
                 (subscription_id, message_id, event_type, attempt, status_code, error, latency_ms,
                  next_attempt_at)
             SELECT id, $8, $9, $5, $10, $11, $12, $6 FROM failed",
            self.id,
            passed.transaction_id.to_string(),
            passed.position,
            state.revision,
            attempt,
            next_at,
            disabled,
            id,
            event.event_type,
            sent.status.map(i32::from),
            error,
            latency_ms
        )
        .execute(&mut *conn)
        .await?;
        if let Some(reason) = &disabled {
            tracing::warn!(subscription = %self.id, reason = %reason, "subscription disabled");
        }
        Ok(Step::Failed)
    }
}

fn host_failed(sent: &Sent) -> bool {
    match sent.status {
        None => true,
        Some(s) => s == 429 || s >= 500,
    }
}

fn breaker_gauge(host: &str, state: &str) {
    let value = match state {
        "open" => 1.0,
        "half_open" => 2.0,
        _ => 0.0,
    };
    metrics::gauge!("outbound_breaker_state", "host" => host.to_string()).set(value);
}

/// What the breaker of a host says about sending now.
enum Breaker {
    /// Closed with no failure counted: no need to read it again before the next message.
    Clean,
    /// Closed with failures counted, or this caller won the half-open probe.
    Allowed,
    /// Open (or another caller probes): send nothing.
    Held,
}

/// Whether the breaker of `host` lets a message through now: closed, or open past its
/// cool-down and this caller wins the one half-open probe.
async fn breaker_allows(
    conn: &mut PgConnection,
    config: &OutboundConfig,
    host: &str,
) -> Result<Breaker, sqlx::Error> {
    let row = sqlx::query!(
        "SELECT state, failures FROM outbound_breakers WHERE host = $1",
        host
    )
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        None => Ok(Breaker::Clean),
        Some(r) if r.state == "closed" && r.failures == 0 => Ok(Breaker::Clean),
        Some(r) if r.state == "closed" => Ok(Breaker::Allowed),
        Some(_) => {
            // Open past the cool-down, or a probe that never reported (its process died):
            // one caller takes the probe.
            let cooldown = config.scaled(config.breaker_cooldown).as_secs_f64();
            let probe = sqlx::query_scalar!(
                "UPDATE outbound_breakers SET state = 'half_open', updated_at = now()
                 WHERE host = $1 AND state <> 'closed'
                   AND updated_at <= now() - make_interval(secs => $2)
                 RETURNING state",
                host,
                cooldown
            )
            .fetch_optional(&mut *conn)
            .await?;
            if probe.is_some() {
                breaker_gauge(host, "half_open");
                Ok(Breaker::Allowed)
            } else {
                Ok(Breaker::Held)
            }
        }
    }
}

async fn breaker_success(conn: &mut PgConnection, host: &str) -> Result<(), sqlx::Error> {
    let closed = sqlx::query!(
        "UPDATE outbound_breakers SET state = 'closed', failures = 0, opened_at = NULL, updated_at = now()
         WHERE host = $1 AND (state <> 'closed' OR failures <> 0)",
        host
    )
    .execute(&mut *conn)
    .await?;
    if closed.rows_affected() > 0 {
        tracing::info!(host, "outbound breaker closed");
        breaker_gauge(host, "closed");
    }
    Ok(())
}

async fn breaker_failure(
    conn: &mut PgConnection,
    config: &OutboundConfig,
    host: &str,
) -> Result<(), sqlx::Error> {
    let state = sqlx::query_scalar!(
        "INSERT INTO outbound_breakers AS b (host, state, failures, opened_at)
         VALUES ($1, CASE WHEN $2 <= 1 THEN 'open' ELSE 'closed' END, 1,
                 CASE WHEN $2 <= 1 THEN now() END)
         ON CONFLICT (host) DO UPDATE SET
             failures = b.failures + 1,
             state = CASE WHEN b.state = 'half_open' OR b.failures + 1 >= $2 THEN 'open' ELSE b.state END,
             opened_at = CASE WHEN b.state = 'half_open' OR (b.state = 'closed' AND b.failures + 1 >= $2)
                              THEN now() ELSE b.opened_at END,
             updated_at = CASE WHEN b.state = 'half_open' OR (b.state = 'closed' AND b.failures + 1 >= $2)
                              THEN now() ELSE b.updated_at END
         RETURNING state",
        host,
        config.breaker_threshold
    )
    .fetch_one(&mut *conn)
    .await?;
    if state == "open" {
        metrics::counter!("outbound_breaker_opened_total").increment(1);
        tracing::warn!(host, "outbound breaker open");
    }
    breaker_gauge(host, &state);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_under_the_scaled_schedule_and_ends() {
        let config = OutboundConfig {
            retry_scale: 0.5,
            ..OutboundConfig::default()
        };
        for (i, base) in SCHEDULE.iter().enumerate() {
            for _ in 0..50 {
                let wait = backoff(&config, i + 1).unwrap();
                assert!(wait <= base.mul_f64(0.5), "{i}: {wait:?}");
            }
        }
        assert_eq!(backoff(&config, SCHEDULE.len() + 1), None);
        assert_eq!(backoff(&config, 0), None);
    }
}
