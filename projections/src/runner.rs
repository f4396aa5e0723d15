//! The projection runner: feeds each projection the global feed, batch by batch, with the
//! batch's changes and the checkpoint committed in one transaction (an exactly-once effect,
//! whatever crashes between batches).
//!
//! - One task per projection. Each holds a PostgreSQL session advisory lock for its
//!   projection on a connection of its own, and applies batches on that same connection:
//!   among several server processes exactly one applies a projection, and when its process
//!   or connection dies the lock goes with it and another process takes over.
//! - It wakes when events are committed ([`Wakeup`]: at once in the writing process,
//!   through one coalesced NOTIFY in the others) and when other checkpoints move, and falls
//!   back to polling.
//! - A failing event stops its projection there: the batch is rolled back to the last good
//!   event, the failure is recorded on the checkpoint row, logged and exported as a metric,
//!   and the runner retries until the cause is fixed. Nothing is skipped.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::feed::{self, FeedEvent, Position};
use crate::wake::{Recheck, Wakeup, sleep_or_cancel};
use crate::{Projection, ProjectionError, Reactor};

/// The first look again after a wake-up that found nothing (doubling from there).
const RECHECK_AFTER_WAKE: Duration = Duration::from_millis(10);

/// First key of the two-key advisory locks the runner takes ("LL").
pub const LOCK_CLASS: i32 = 0x4c4c;
pub use crate::wake::{CHECKPOINTS_CHANNEL, EVENTS_CHANNEL};

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub batch_size: i64,
    /// Fallback poll when no notification comes.
    pub poll_interval: Duration,
    /// How often a process without a projection's lock tries to take it over.
    pub standby_interval: Duration,
    /// How long a failed projection waits before trying its failing event again.
    pub failure_retry: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval: Duration::from_millis(250),
            standby_interval: Duration::from_secs(1),
            failure_retry: Duration::from_secs(5),
        }
    }
}

/// A reactor in the runner's hands: fed batches like a projection, with no tables (so never
/// rebuilt).
struct Reacting(Arc<dyn Reactor>);

#[async_trait::async_trait]
impl Projection for Reacting {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn tables(&self) -> &'static [&'static str] {
        &[]
    }

    fn writes_events(&self) -> bool {
        true
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        self.0.react(conn, events).await
    }
}

pub struct Runner {
    pool: PgPool,
    projections: Vec<Arc<dyn Projection>>,
    config: RunnerConfig,
    /// The process's wake-ups, when shared with its writers; `None`: the runner listens
    /// on its own.
    wakeup: Option<Wakeup>,
}

enum BatchOutcome {
    Applied(usize),
    /// The checkpoint moved under the batch (a rebuild was swapped in): read again.
    Moved,
    Failed,
}

impl Runner {
    pub fn new(pool: PgPool, projections: Vec<Arc<dyn Projection>>, config: RunnerConfig) -> Self {
        Self {
            pool,
            projections,
            config,
            wakeup: None,
        }
    }

    /// A runner of reactors: the same batches, checkpoints and locks as projections get.
    pub fn reactors(pool: PgPool, reactors: Vec<Arc<dyn Reactor>>, config: RunnerConfig) -> Self {
        let handlers = reactors
            .into_iter()
            .map(|reactor| Arc::new(Reacting(reactor)) as Arc<dyn Projection>)
            .collect();
        Self::new(pool, handlers, config)
    }

    /// Shares the process's wake-ups: its writers' commits wake these runners at once.
    pub fn with_wakeup(mut self, wakeup: Wakeup) -> Self {
        self.wakeup = Some(wakeup);
        self
    }

    /// Runs every projection until `cancel`; a batch in progress is finished (committed or
    /// rolled back) before a task stops. Without a shared [`Wakeup`] the runner listens for
    /// notifications itself.
    pub async fn run(self, cancel: CancellationToken) {
        let (wakeup, listener) = match self.wakeup.clone() {
            Some(shared) => (shared, None),
            None => {
                let own = Wakeup::new();
                let task = tokio::spawn(own.clone().run(self.pool.clone(), cancel.clone()));
                (own, Some(task))
            }
        };
        let mut tasks = Vec::new();
        for projection in &self.projections {
            tasks.push(tokio::spawn(run_projection(
                self.pool.clone(),
                projection.clone(),
                self.config.clone(),
                wakeup.clone(),
                cancel.clone(),
            )));
        }
        for task in tasks {
            let _ = task.await;
        }
        if let Some(listener) = listener {
            listener.abort();
            let _ = listener.await;
        }
    }
}

async fn run_projection(
    pool: PgPool,
    projection: Arc<dyn Projection>,
    config: RunnerConfig,
    wakeup: Wakeup,
    cancel: CancellationToken,
) {
    let name = projection.name();
    let mut wake = wakeup.subscribe();
    let mut horizon = wakeup.subscribe_horizon();
    while !cancel.is_cancelled() {
        let mut conn = match connect(&pool, name).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(projection = name, error = %e, "projection cannot connect");
                sleep_or_cancel(config.standby_interval, &cancel).await;
                continue;
            }
        };
        match try_lock(&mut conn, name).await {
            Ok(true) => {}
            Ok(false) => {
                metrics::gauge!("projection_active", "projection" => name).set(0.0);
                let _ = conn.close().await;
                sleep_or_cancel(config.standby_interval, &cancel).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(projection = name, error = %e, "projection lock failed");
                sleep_or_cancel(config.standby_interval, &cancel).await;
                continue;
            }
        }
        tracing::info!(projection = name, "projection running here");
        metrics::gauge!("projection_active", "projection" => name).set(1.0);
        let mut recheck = Recheck::new(RECHECK_AFTER_WAKE);
        // The checkpoint as this runner left it (read again after anything unexpected).
        let mut known: Option<Position> = None;
        loop {
            if cancel.is_cancelled() {
                break;
            }
            // Mark what we have seen before reading: a notification arriving during the read
            // makes the next wait return at once.
            wake.borrow_and_update();
            horizon.borrow_and_update();
            let outcome = run_batch(
                &mut conn,
                projection.as_ref(),
                config.batch_size,
                &mut known,
            )
            .await;
            if matches!(outcome, Ok(BatchOutcome::Applied(n)) if n > 0)
                || matches!(outcome, Ok(BatchOutcome::Moved))
            {
                // This batch's transaction may have held other runners' events back.
                wakeup.horizon_moved();
            }
            if projection.writes_events()
                && matches!(outcome, Ok(BatchOutcome::Applied(n)) if n > 0)
            {
                // A reactor's batch may have committed events of its own.
                wakeup.committed();
            }
            let failed = match outcome {
                Ok(BatchOutcome::Applied(n)) if n as i64 == config.batch_size => continue,
                Ok(BatchOutcome::Moved) => continue,
                Ok(BatchOutcome::Applied(n)) => {
                    if n > 0 {
                        recheck.found();
                    }
                    false
                }
                Ok(BatchOutcome::Failed) => true,
                Err(e) => {
                    tracing::warn!(
                        projection = name,
                        error = %e,
                        "projection connection failed; reconnecting"
                    );
                    break;
                }
            };
            let wait = if failed {
                config.failure_retry
            } else {
                recheck.wait(config.poll_interval)
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(wait) => recheck.waited(config.poll_interval),
                _ = wake.changed(), if !failed => recheck.woken(),
                _ = horizon.changed(), if !failed && recheck.pending() => {}
            }
        }
        metrics::gauge!("projection_active", "projection" => name).set(0.0);
        let _ = conn.close().await;
    }
}

/// A projection's own connection. Its commits do not wait for the disk: a batch and its
/// checkpoint commit together, so a commit lost in a crash loses both, and the batch is
/// simply applied again. This keeps the runners' flushes off the writers' commit path.
async fn connect(pool: &PgPool, name: &str) -> Result<PgConnection, sqlx::Error> {
    let host = std::process::id();
    pool.connect_options()
        .as_ref()
        .clone()
        .application_name(&format!("leadledger-projection:{name}:pid{host}"))
        .options([("synchronous_commit", "off")])
        .connect()
        .await
}

async fn try_lock(conn: &mut PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query!(
        "INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        name
    )
    .execute(&mut *conn)
    .await?;
    let locked = sqlx::query_scalar!(
        r#"SELECT pg_try_advisory_lock($1, hashtext($2)) AS "locked!""#,
        LOCK_CLASS,
        name
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(locked)
}

/// The checkpoint of `name`.
pub async fn checkpoint(conn: &mut PgConnection, name: &str) -> Result<Position, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT transaction_id::text AS "transaction_id!", position
           FROM projection_checkpoints WHERE name = $1"#,
        name
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row
        .map(|r| Position::stored(&r.transaction_id, r.position))
        .transpose()?
        .unwrap_or_default())
}

/// One batch: read without a transaction (an idle runner takes no transaction id, which
/// would hold back everyone's feed), then apply and move the checkpoint in one transaction.
///
/// The transaction first locks the checkpoint row and checks it still says `after`: a
/// rebuild that swaps tables in moves the checkpoint under the same lock, and a batch read
/// before that must not be applied to the new tables.
/// One batch of `projection`: read after the checkpoint, apply, advance. `known` is the
/// checkpoint as this runner last wrote it: the runner holding the projection's lock is
/// its only writer but for a rebuild's swap, which the lock taken before applying
/// detects, so a batch need not read it again first. `None`: read it.
async fn run_batch(
    conn: &mut PgConnection,
    projection: &dyn Projection,
    limit: i64,
    known: &mut Option<Position>,
) -> Result<BatchOutcome, sqlx::Error> {
    let name = projection.name();
    let after = match *known {
        Some(at) => at,
        None => checkpoint(conn, name).await?,
    };
    *known = None;
    let events = feed::read(conn, after, limit).await?;
    if events.is_empty() {
        *known = Some(after);
        return Ok(BatchOutcome::Applied(0));
    }
    let mut tx = conn.begin().await?;
    if lock_checkpoint(&mut tx, name).await? != after {
        tx.rollback().await?;
        return Ok(BatchOutcome::Moved);
    }
    match projection.apply_batch(&mut tx, &events).await {
        Ok(()) => {
            let last = events.last().map(|e| e.at).unwrap_or(after);
            advance(&mut tx, name, last).await?;
            tx.commit().await?;
            *known = Some(last);
            metrics::counter!("projection_events_applied_total", "projection" => name)
                .increment(events.len() as u64);
            metrics::gauge!("projection_failed", "projection" => name).set(0.0);
            metrics::gauge!("projection_position", "projection" => name).set(last.position as f64);
            Ok(BatchOutcome::Applied(events.len()))
        }
        Err(error) => {
            tx.rollback().await?;
            if let ProjectionError::Database(e) = &error
                && is_connection_error(e)
            {
                return Err(sqlx::Error::Protocol(e.to_string()));
            }
            // Apply again one event at a time, so every good event before the failing one
            // is kept, then record where and why the projection stopped.
            let mut tx = conn.begin().await?;
            if lock_checkpoint(&mut tx, name).await? != after {
                tx.rollback().await?;
                return Ok(BatchOutcome::Moved);
            }
            let (last_good, failure) = apply_until_failure(&mut tx, projection, &events).await?;
            if let Some(last) = last_good {
                advance(&mut tx, name, last).await?;
            }
            let Some((failed_at, error)) = failure else {
                // The batch failed as a whole but every event applies on its own: a
                // transient failure. Keep what applied and go on.
                tx.commit().await?;
                return Ok(BatchOutcome::Applied(events.len()));
            };
            let message = error.to_string();
            sqlx::query!(
                "UPDATE projection_checkpoints
                 SET failed_position = $2, failed_error = $3, failed_at = now()
                 WHERE name = $1",
                name,
                failed_at.position,
                message
            )
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::error!(
                projection = name,
                position = %failed_at,
                error = %message,
                "projection stopped at a failing event; retrying until it is fixed"
            );
            metrics::gauge!("projection_failed", "projection" => name).set(1.0);
            Ok(BatchOutcome::Failed)
        }
    }
}

/// Locks the checkpoint row of `name` for the transaction and returns it.
pub(crate) async fn lock_checkpoint(
    conn: &mut PgConnection,
    name: &str,
) -> Result<Position, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT transaction_id::text AS "transaction_id!", position
           FROM projection_checkpoints WHERE name = $1 FOR UPDATE"#,
        name
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row
        .map(|r| Position::stored(&r.transaction_id, r.position))
        .transpose()?
        .unwrap_or_default())
}

/// After a batch failed as a whole: applies its events one at a time, each under a
/// savepoint, and stops at the first that fails. Returns the position of the last event
/// applied, and the failing event's position with its error.
pub async fn apply_until_failure(
    conn: &mut PgConnection,
    projection: &dyn Projection,
    events: &[FeedEvent],
) -> Result<(Option<Position>, Option<(Position, ProjectionError)>), sqlx::Error> {
    let mut last_good = None;
    for event in events {
        let mut savepoint = conn.begin().await?;
        match crate::apply(projection, &mut savepoint, event).await {
            Ok(()) => {
                savepoint.commit().await?;
                last_good = Some(event.at);
            }
            Err(error) => {
                savepoint.rollback().await?;
                return Ok((last_good, Some((event.at, error))));
            }
        }
    }
    Ok((last_good, None))
}

/// Moves the checkpoint of `name` to `to`, clears a recorded failure and tells the other
/// processes (their runners waiting for the horizon, and observers of progress).
pub(crate) async fn advance(
    conn: &mut PgConnection,
    name: &str,
    to: Position,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE projection_checkpoints
         SET transaction_id = $2::text::xid8, position = $3, updated_at = now(),
             failed_position = NULL, failed_error = NULL, failed_at = NULL
         WHERE name = $1",
        name,
        to.transaction_id.to_string(),
        to.position
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!("SELECT pg_notify($1, $2)", CHECKPOINTS_CHANNEL, name)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::PoolTimedOut => true,
        // 57P01..57P03: shutdown or restart; 08xxx: connection exceptions.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("57P") || code.starts_with("08")),
        _ => false,
    }
}

/// Waits until every projection in `names` has applied `position` (or `timeout` passes).
/// Returns whether it was reached.
pub async fn wait_for(
    pool: &PgPool,
    position: Position,
    names: &[&str],
    timeout: Duration,
) -> Result<bool, sqlx::Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut pause = Duration::from_millis(1);
    loop {
        let behind = sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM unnest($1::text[]) AS n(name)
               LEFT JOIN projection_checkpoints c ON c.name = n.name
               WHERE c.name IS NULL
                  OR (c.transaction_id, c.position) < ($2::text::xid8, $3)"#,
            &names,
            position.transaction_id.to_string(),
            position.position
        )
        .fetch_one(pool)
        .await?;
        if behind == 0 {
            return Ok(true);
        }
        if tokio::time::Instant::now() + pause > deadline {
            return Ok(false);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
