//! The projection runner: feeds projections the global feed, batch by batch, with the
//! batch's changes and the checkpoints committed in one transaction (an exactly-once
//! effect, whatever crashes between batches).
//!
//! - One task per group of projections (in a server process, one group: the read models
//!   and the reactors, `Runner::with_reactors`). It holds a PostgreSQL session advisory
//!   lock for each projection on a connection of its own, and applies batches on that same
//!   connection: among several server processes exactly one applies a projection, and
//!   when its process or connection dies the locks go with it and another process takes
//!   over. A process that holds only some of a group's locks applies those, and tries for
//!   the others now and then.
//! - A batch is read once for the whole group (each event opened and upcast once) and
//!   applied to every projection in one transaction, so a commit costs the group one read
//!   and one transaction, not one per projection.
//! - It wakes when events are committed ([`Wakeup`]: at once in the writing process,
//!   through one coalesced NOTIFY in the others) and when other checkpoints move, and falls
//!   back to polling. After a batch of many events it waits a few milliseconds before the
//!   next, so that under heavy writes each batch gathers more commands' events
//!   (`RunnerConfig::min_batch_interval`); light traffic is read at once.
//! - A failing event stops its projection there, and only it: the batch is applied again to
//!   each projection alone, the failing one up to its last good event; the failure is
//!   recorded on the checkpoint row, logged and exported as a metric, and the runner retries
//!   until the cause is fixed while the group's other projections go on. Nothing is skipped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::feed::{self, FeedEvent, Position};
use crate::wake::{Recheck, Wakeup, sleep_or_cancel};
use crate::{Projection, ProjectionError, Reactor};

/// The first look again after a wake-up that found nothing (doubling from there).
const RECHECK_AFTER_WAKE: Duration = Duration::from_millis(10);

/// The smallest batch after which the runner waits out [`RunnerConfig::min_batch_interval`].
pub const LINGER_FROM: usize = 8;

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
    /// How long a batch of [`LINGER_FROM`] events or more waits, from its start, before the
    /// next batch is read. Under a heavy stream of commands this gathers the events of more
    /// of them into one batch: the group's feed read, checkpoint locks and moves, and each
    /// projection's statements are shared by more events. Lighter traffic (smaller
    /// batches) and a wake-up after an idle spell are read at once.
    pub min_batch_interval: Duration,
    /// How long a failed projection waits before trying its failing event again.
    pub failure_retry: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval: Duration::from_millis(250),
            standby_interval: Duration::from_secs(1),
            min_batch_interval: Duration::from_millis(10),
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

    fn opens(&self, aggregate_type: &str, event_type: &str) -> bool {
        self.0.opens(aggregate_type, event_type)
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
    /// What its connection is called (`leadledger-projection:GROUP:pidN`).
    group: &'static str,
}

enum BatchOutcome {
    /// How many events were read, and whether applying them may have appended events.
    Applied(usize, bool),
    /// The checkpoint moved under the batch (a rebuild was swapped in): read again.
    Moved,
}

impl Runner {
    pub fn new(pool: PgPool, projections: Vec<Arc<dyn Projection>>, config: RunnerConfig) -> Self {
        Self {
            pool,
            projections,
            config,
            wakeup: None,
            group: "projections",
        }
    }

    /// Adds reactors to the group: they get the same batches, checkpoints and locks as
    /// its projections, in the same feed read and the same transaction (a reactor's
    /// commands commit with the read models' batch and every checkpoint). A group of its
    /// own would read the feed and move its checkpoints again for every batch, most often
    /// to find nothing it reacts to.
    pub fn with_reactors(mut self, reactors: Vec<Arc<dyn Reactor>>) -> Self {
        self.projections.extend(
            reactors
                .into_iter()
                .map(|reactor| Arc::new(Reacting(reactor)) as Arc<dyn Projection>),
        );
        self
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
        run_group(
            self.pool.clone(),
            self.group,
            self.projections.clone(),
            self.config.clone(),
            wakeup,
            cancel,
        )
        .await;
        if let Some(listener) = listener {
            listener.abort();
            let _ = listener.await;
        }
    }
}

/// A projection of the group, as the group's task sees it.
struct Member {
    projection: Arc<dyn Projection>,
    /// Whether this process holds the projection's advisory lock (on the group's connection).
    held: bool,
    /// The checkpoint as this task last left it: the task holding the lock is its only
    /// writer but for a rebuild's swap, which the lock taken before applying detects.
    /// `None`: read it.
    known: Option<Position>,
    /// A failed projection waits until then before trying its failing event again.
    retry_at: Option<Instant>,
}

impl Member {
    fn name(&self) -> &'static str {
        self.projection.name()
    }

    /// Whether it takes part in the next batch.
    fn active(&self, now: Instant) -> bool {
        self.held && self.retry_at.is_none_or(|at| at <= now)
    }
}

/// One task for a group of projections: one connection holding their locks, one read of
/// the feed per batch (each event decrypted and upcast once, whatever the number of
/// projections), and one transaction applying the batch to every projection and moving
/// their checkpoints together. A projection whose batch fails is applied alone, so that a
/// failing event stops only its own projection.
async fn run_group(
    pool: PgPool,
    group: &'static str,
    projections: Vec<Arc<dyn Projection>>,
    config: RunnerConfig,
    wakeup: Wakeup,
    cancel: CancellationToken,
) {
    let mut members: Vec<Member> = projections
        .into_iter()
        .map(|projection| Member {
            projection,
            held: false,
            known: None,
            retry_at: None,
        })
        .collect();
    // The locks are taken in name order, like every other taker of the checkpoint rows.
    members.sort_by_key(|m| m.name());
    let writes_events = members.iter().any(|m| m.projection.writes_events());
    let mut wake = wakeup.subscribe();
    let mut horizon = wakeup.subscribe_horizon();
    while !cancel.is_cancelled() {
        let mut conn = match connect(&pool, group).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(group, error = %e, "projections cannot connect");
                sleep_or_cancel(config.standby_interval, &cancel).await;
                continue;
            }
        };
        for m in &mut members {
            m.held = false;
            m.known = None;
            m.retry_at = None;
        }
        let mut recheck = Recheck::new(RECHECK_AFTER_WAKE);
        let mut next_claim = Instant::now();
        loop {
            if cancel.is_cancelled() {
                break;
            }
            if Instant::now() >= next_claim {
                if let Err(e) = claim(&mut conn, &mut members).await {
                    tracing::warn!(group, error = %e, "projection locks failed; reconnecting");
                    break;
                }
                next_claim = Instant::now() + config.standby_interval;
            }
            // Mark what we have seen before reading: a notification arriving during the read
            // makes the next wait return at once.
            wake.borrow_and_update();
            horizon.borrow_and_update();
            let started = Instant::now();
            let outcome = run_batch(&mut conn, &mut members, &config).await;
            if matches!(outcome, Ok(BatchOutcome::Applied(n, _)) if n > 0)
                || matches!(outcome, Ok(BatchOutcome::Moved))
            {
                // This batch's transaction may have held other runners' events back.
                wakeup.horizon_moved();
            }
            if writes_events && matches!(outcome, Ok(BatchOutcome::Applied(_, true))) {
                // A reactor's batch committed events of its own.
                wakeup.committed();
            }
            let mut linger_until = None;
            match outcome {
                Ok(BatchOutcome::Applied(n, _)) if n as i64 == config.batch_size => continue,
                Ok(BatchOutcome::Moved) => continue,
                Ok(BatchOutcome::Applied(n, _)) => {
                    if n > 0 {
                        recheck.found();
                    }
                    if n >= LINGER_FROM {
                        linger_until = Some(started + config.min_batch_interval);
                    }
                }
                Err(e) => {
                    tracing::warn!(group, error = %e, "projection connection failed; reconnecting");
                    break;
                }
            }
            let now = Instant::now();
            let mut wait = recheck.wait(config.poll_interval);
            if members.iter().any(|m| !m.held) {
                wait = wait.min(next_claim.saturating_duration_since(now));
            }
            if let Some(retry) = members
                .iter()
                .filter(|m| m.held)
                .filter_map(|m| m.retry_at)
                .min()
            {
                wait = wait.min(retry.saturating_duration_since(now));
            }
            // Nothing to do but wait for the locks held elsewhere.
            let idle = !members.iter().any(|m| m.active(now));
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(wait) => recheck.waited(config.poll_interval),
                _ = wake.changed(), if !idle => recheck.woken(),
                _ = horizon.changed(), if !idle && recheck.pending() => {}
            }
            if let Some(until) = linger_until {
                let rest = until.saturating_duration_since(Instant::now());
                if !rest.is_zero() {
                    sleep_or_cancel(rest, &cancel).await;
                }
            }
        }
        for m in &members {
            metrics::gauge!("projection_active", "projection" => m.name()).set(0.0);
        }
        let _ = conn.close().await;
    }
}

/// Takes the locks of the group's projections that this process does not hold yet.
async fn claim(conn: &mut PgConnection, members: &mut [Member]) -> Result<(), sqlx::Error> {
    for m in members.iter_mut().filter(|m| !m.held) {
        m.held = try_lock(conn, m.name()).await?;
        if m.held {
            tracing::info!(projection = m.name(), "projection running here");
        }
        metrics::gauge!("projection_active", "projection" => m.name()).set(if m.held {
            1.0
        } else {
            0.0
        });
    }
    Ok(())
}

/// A projection's own connection. Its commits do not wait for the disk: a batch and its
/// checkpoint commit together, so a commit lost in a crash loses both, and the batch is
/// simply applied again. This keeps the runners' flushes off the writers' commit path.
///
/// Its statements keep their generic plans: each reads the feed after a checkpoint, or
/// looks its rows up by key or by a batch's arrays, so the generic plan is right for any
/// values. PostgreSQL would otherwise plan the feed's read and the checkpoints' statements
/// again at every wake-up, as plans for a position near the head look cheaper than the
/// generic one: at one command at a time, that planning took more of the database than
/// running them.
async fn connect(pool: &PgPool, name: &str) -> Result<PgConnection, sqlx::Error> {
    connect_options(pool, name).connect().await
}

/// The options of the connection of the group `name` (see [`connect`]).
pub fn connect_options(pool: &PgPool, name: &str) -> PgConnectOptions {
    let host = std::process::id();
    pool.connect_options()
        .as_ref()
        .clone()
        .application_name(&format!("leadledger-projection:{name}:pid{host}"))
        .options([
            ("synchronous_commit", "off"),
            ("plan_cache_mode", "force_generic_plan"),
        ])
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

/// One batch of the group: read once after the earliest checkpoint of its active
/// projections (without a transaction: an idle runner takes no transaction id, which would
/// hold back everyone's feed), then apply to each projection the events after its own
/// checkpoint and move the checkpoints, all in one transaction.
///
/// The transaction first locks the checkpoint rows and checks they still say what the
/// task left them at: a rebuild that swaps tables in moves a checkpoint under the same
/// lock, and a batch read before that must not be applied to the new tables.
async fn run_batch(
    conn: &mut PgConnection,
    members: &mut [Member],
    config: &RunnerConfig,
) -> Result<BatchOutcome, sqlx::Error> {
    let now = Instant::now();
    let active: Vec<usize> = (0..members.len())
        .filter(|&i| members[i].active(now))
        .collect();
    if active.is_empty() {
        return Ok(BatchOutcome::Applied(0, false));
    }
    for &i in &active {
        if members[i].known.is_none() {
            members[i].known = Some(checkpoint(conn, members[i].name()).await?);
        }
    }
    let at = |members: &[Member], i: usize| members[i].known.unwrap_or_default();
    let from = active
        .iter()
        .map(|&i| at(members, i))
        .min()
        .unwrap_or_default();
    // Personal data is opened only for the events a projection of the group reads it from.
    let readers: Vec<&dyn Projection> = active
        .iter()
        .map(|&i| members[i].projection.as_ref())
        .collect();
    let opens = |aggregate_type: &str, event_type: &str| {
        readers.iter().any(|p| p.opens(aggregate_type, event_type))
    };
    let events = feed::read_opening(conn, from, config.batch_size, &opens).await?;
    if events.is_empty() {
        return Ok(BatchOutcome::Applied(0, false));
    }
    let names: Vec<&'static str> = active.iter().map(|&i| members[i].name()).collect();
    let mut tx = conn.begin().await?;
    let locked = lock_checkpoints(&mut tx, &names).await?;
    if active
        .iter()
        .zip(&locked)
        .any(|(&i, stands)| *stands != at(members, i))
    {
        tx.rollback().await?;
        for &i in &active {
            members[i].known = None;
        }
        return Ok(BatchOutcome::Moved);
    }
    // Each projection takes the events after its own checkpoint (a suffix of the batch);
    // the ones already past the batch take none.
    let shares: Vec<(usize, Position, &[FeedEvent])> = active
        .iter()
        .map(|&i| {
            let after = at(members, i);
            (
                i,
                after,
                &events[events.partition_point(|e| e.at <= after)..],
            )
        })
        .filter(|(_, _, mine)| !mine.is_empty())
        .collect();
    let mut failed = false;
    for &(i, _, mine) in &shares {
        if let Err(error) = members[i].projection.apply_batch(&mut tx, mine).await {
            if let Some(lost) = connection_lost(&error) {
                return Err(lost);
            }
            failed = true;
            break;
        }
    }
    let last = events.last().map(|e| e.at).unwrap_or(from);
    if !failed {
        let moved: Vec<&'static str> = shares.iter().map(|&(i, ..)| members[i].name()).collect();
        let wrote = advance(&mut tx, &moved, last).await?;
        tx.commit().await?;
        for &(i, _, mine) in &shares {
            let m = &mut members[i];
            m.known = Some(last);
            m.retry_at = None;
            applied_metrics(m.name(), mine.len(), last);
        }
        return Ok(BatchOutcome::Applied(events.len(), wrote));
    }
    // A projection failed: the others must not wait for it. Each is applied alone, and the
    // failing one stops at its failing event.
    tx.rollback().await?;
    for &(i, after, mine) in &shares {
        let m = &mut members[i];
        m.known = None;
        match apply_alone(conn, m.projection.as_ref(), after, mine).await? {
            Alone::Applied(last) => {
                m.known = Some(last);
                m.retry_at = None;
                applied_metrics(m.name(), mine.len(), last);
            }
            Alone::Moved => {}
            Alone::Failed => m.retry_at = Some(Instant::now() + config.failure_retry),
        }
    }
    // Applied alone: whether a reactor's commands wrote is not known here.
    Ok(BatchOutcome::Applied(events.len(), true))
}

fn applied_metrics(name: &'static str, applied: usize, last: Position) {
    metrics::counter!("projection_events_applied_total", "projection" => name)
        .increment(applied as u64);
    metrics::gauge!("projection_failed", "projection" => name).set(0.0);
    metrics::gauge!("projection_position", "projection" => name).set(last.position as f64);
}

enum Alone {
    /// Applied up to here (everything, or a failure turned out transient).
    Applied(Position),
    /// The checkpoint moved under the batch (a rebuild was swapped in).
    Moved,
    /// Stopped at a failing event, recorded on the checkpoint row.
    Failed,
}

/// Applies `events` (read after `after`) to one projection in a transaction of its own. If
/// the batch fails as a whole, applies it again one event at a time, keeps every good
/// event before the failing one, and records where and why the projection stopped.
async fn apply_alone(
    conn: &mut PgConnection,
    projection: &dyn Projection,
    after: Position,
    events: &[FeedEvent],
) -> Result<Alone, sqlx::Error> {
    let name = projection.name();
    let mut tx = conn.begin().await?;
    if lock_checkpoints(&mut tx, &[name]).await? != [after] {
        tx.rollback().await?;
        return Ok(Alone::Moved);
    }
    let error = match projection.apply_batch(&mut tx, events).await {
        Ok(()) => {
            let last = events.last().map(|e| e.at).unwrap_or(after);
            advance(&mut tx, &[name], last).await?;
            tx.commit().await?;
            return Ok(Alone::Applied(last));
        }
        Err(error) => error,
    };
    tx.rollback().await?;
    if let Some(lost) = connection_lost(&error) {
        return Err(lost);
    }
    let mut tx = conn.begin().await?;
    if lock_checkpoints(&mut tx, &[name]).await? != [after] {
        tx.rollback().await?;
        return Ok(Alone::Moved);
    }
    let (last_good, failure) = apply_until_failure(&mut tx, projection, events).await?;
    if let Some(last) = last_good {
        advance(&mut tx, &[name], last).await?;
    }
    let Some((failed_at, error)) = failure else {
        // The batch failed as a whole but every event applies on its own: a transient
        // failure. Keep what applied and go on.
        tx.commit().await?;
        return Ok(Alone::Applied(last_good.unwrap_or(after)));
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
    Ok(Alone::Failed)
}

/// Locks the checkpoint rows of `names` (in name order, like every other taker) for the
/// transaction and returns them in the order of `names`.
async fn lock_checkpoints(
    conn: &mut PgConnection,
    names: &[&str],
) -> Result<Vec<Position>, sqlx::Error> {
    let wanted: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let rows = sqlx::query!(
        r#"SELECT name, transaction_id::text AS "transaction_id!", position
           FROM projection_checkpoints WHERE name = ANY($1) ORDER BY name FOR UPDATE"#,
        &wanted
    )
    .fetch_all(&mut *conn)
    .await?;
    names
        .iter()
        .map(|name| {
            rows.iter()
                .find(|r| r.name == *name)
                .map_or(Ok(Position::default()), |r| {
                    Position::stored(&r.transaction_id, r.position)
                })
        })
        .collect()
}

/// Moves the checkpoints of `names` to `to` and clears their recorded failures, telling
/// the other processes, in one statement. Returns whether the transaction appended events
/// (a reactor's commands did): only then are the runners woken for them.
pub(crate) async fn advance(
    conn: &mut PgConnection,
    names: &[&str],
    to: Position,
) -> Result<bool, sqlx::Error> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let wrote = sqlx::query_scalar!(
        r#"WITH moved AS (
               UPDATE projection_checkpoints
               SET transaction_id = $2::text::xid8, position = $3, updated_at = now(),
                   failed_position = NULL, failed_error = NULL, failed_at = NULL
               WHERE name = ANY($1)
               RETURNING name),
           told AS (SELECT pg_notify($4, (SELECT string_agg(name, ',') FROM moved)))
           SELECT EXISTS (SELECT 1 FROM events WHERE transaction_id = pg_current_xact_id())
                  AS "wrote!"
           FROM told"#,
        &names,
        to.transaction_id.to_string(),
        to.position,
        CHECKPOINTS_CHANNEL
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(wrote)
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

/// A projection's failure that is the connection's, not the projection's: the task
/// reconnects instead of recording the event as failing.
fn connection_lost(error: &ProjectionError) -> Option<sqlx::Error> {
    match error {
        ProjectionError::Database(e) if is_connection_error(e) => {
            Some(sqlx::Error::Protocol(e.to_string()))
        }
        _ => None,
    }
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
