//! Rebuilding projections from the feed, safely while the service runs
//! (`leadledger projections rebuild NAME|--all [--verify]`).
//!
//! - The rebuild builds into schema `leadledger_rebuild`: empty copies of the projections'
//!   tables, filled by the projections' own `apply_rows` with `search_path` pointing there
//!   first. The server and the rebuild run the same code on the same feed, except that the
//!   fill leaves the totals for later and inserts a batch's new rows by binary `COPY`
//!   (`copy.rs`); the feed comes without the events' metadata, which no projection
//!   reads, by a binary `COPY` out (`feed::copy_sealed_without_metadata`).
//! - It reads the feed in batches (fetching the next on one connection while it opens the
//!   last on another) and hands each batch to every projection, each applying on a
//!   connection of its own, so the projections are built side by side while the next
//!   batch is read; memory holds a few batches whatever the log size. Each projection
//!   applies a few batches in one transaction through its [`crate::Fill`] (which may hold
//!   rows until the commit, to write them once) and commits them with its own place
//!   (`projection_rebuild_positions`), without a savepoint (a failure is located event by
//!   event in a transaction of its own, rolled back), so an interrupted rebuild leaves
//!   the live tables untouched and a new run resumes each projection where it stopped.
//! - Totals ([`Projection::totals`]: counts and sums of a projection's rows) are left
//!   alone while the copies fill ([`Projection::apply_rows`]), as every batch would rewrite
//!   most of their rows; each projection fills them from its rows once it has read to the
//!   head ([`Projection::fill_totals`]). The swap's last catch-up moves them like a live
//!   batch.
//! - The copies are logged tables with only their keys while they fill (those of tables
//!   whose rows are rewritten, [`Projection::rewritten`], with half-empty pages, so that a
//!   rewrite is a heap-only tuple); each is analyzed,
//!   then given its secondary indexes, as soon as its projection has read to the head
//!   (building an index once costs far less than keeping it row by row). Autovacuum leaves
//!   them alone until they are swapped in (it would otherwise analyze them just as the swap
//!   wants them, and the swap would wait for it).
//! - Once it has caught up, one transaction locks the projections' checkpoint rows (the
//!   live runner's batches take the same lock first, so they wait), brings the rebuilt
//!   tables to the live checkpoint (or further), optionally compares them row by row with
//!   the live ones, and swaps them in under `ACCESS EXCLUSIVE` locks: readers see the old
//!   tables or the new ones, never a mix. If readers keep the tables locked past a short
//!   timeout, it catches up again and retries.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use serde::Serialize;
use sqlx::postgres::PgPool;
use sqlx::{ConnectOptions, Connection, PgConnection};

use crate::feed::{self, FeedEvent, Position};
use crate::runner::{advance, apply_until_failure};
use crate::{Projection, ProjectionError};

/// Advisory lock class of the rebuild ("LR"): one rebuild at a time per database.
const REBUILD_LOCK_CLASS: i32 = 0x4c52;

/// Events per batch unless told otherwise: each batch costs every projection a transaction
/// and each of its statements, so larger batches spend less per event, while memory holds
/// a few of them at a time.
pub const DEFAULT_BATCH_SIZE: i64 = 10_000;

/// Batches a projection applies in one transaction unless told otherwise, before it
/// commits them with its new place (and flushes what its [`crate::Fill`] holds first):
/// rows made and changed again within one transaction are written once, and each commit
/// costs every projection a round of its own. An interrupted rebuild applies the batches
/// of an uncommitted transaction again.
pub const DEFAULT_BATCHES_PER_COMMIT: usize = 8;

#[derive(Debug, Clone)]
pub struct Options {
    /// Events per batch read and applied.
    pub batch_size: i64,
    /// Batches each projection applies in one transaction before it commits them with its
    /// place (see [`DEFAULT_BATCHES_PER_COMMIT`]).
    pub batches_per_commit: usize,
    /// Compare the rebuilt tables with the live ones before swapping; on any difference,
    /// report them all and leave the live tables in place.
    pub verify: bool,
    /// How many times the swap is tried when readers keep the tables locked.
    pub swap_attempts: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            batch_size: DEFAULT_BATCH_SIZE,
            batches_per_commit: DEFAULT_BATCHES_PER_COMMIT,
            verify: false,
            swap_attempts: 10,
        }
    }
}

/// What a rebuild tells as it goes (the command line draws a progress bar from it).
pub trait Observer: Send {
    /// Once, as soon as they are counted (the first batches may have been applied by
    /// then): events already applied by an interrupted run that this one resumes, and
    /// events left to apply when it started (more may arrive meanwhile).
    fn started(&mut self, _already_applied: u64, _remaining: u64) {}
    /// A batch of `events` committed to the rebuilt tables.
    fn applied(&mut self, _events: u64) {}
    /// The rebuild moves on to `phase` (catching up, verifying, swapping).
    fn phase(&mut self, _phase: &str) {}
    /// A row that differs between the live and the rebuilt table (with `verify`).
    fn difference(&mut self, _difference: &Difference) {}
}

/// An observer that says nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// A row that differs: `None` on the side that lacks it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    pub table: String,
    pub key: serde_json::Value,
    pub live: Option<serde_json::Value>,
    pub rebuilt: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub projections: Vec<String>,
    /// Events applied by this run.
    pub events: u64,
    /// Whether this run resumed an interrupted one.
    pub resumed: bool,
    /// Where the rebuilt tables stand (the projections' checkpoint once swapped).
    pub position: Position,
    /// Rows that differ (with `verify`).
    pub differences: u64,
    /// Whether the rebuilt tables replaced the live ones.
    pub swapped: bool,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("a rebuild is already running on this database")]
    Busy,
    #[error("no projection named {0}")]
    Unknown(String),
    #[error("projection {projection} fails at event {position}: {error}")]
    Failed {
        projection: String,
        position: Position,
        error: String,
    },
    #[error("readers kept the live tables locked; gave up after {0} attempts")]
    Locked(u32),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Takes the session lock that lets one rebuild (or discard) run at a time.
async fn take_rebuild_lock(conn: &mut PgConnection) -> Result<(), RebuildError> {
    let locked = sqlx::query_scalar!(
        r#"SELECT pg_try_advisory_lock($1, 0) AS "locked!""#,
        REBUILD_LOCK_CLASS
    )
    .fetch_one(&mut *conn)
    .await?;
    if !locked {
        return Err(RebuildError::Busy);
    }
    // Each projection's connection of an interrupted run holds a shared lock until its
    // server process has ended: wait for them, so that none of them commits after this
    // run has read where they stood.
    sqlx::query!("SELECT pg_advisory_lock($1, 1)", REBUILD_LOCK_CLASS)
        .execute(&mut *conn)
        .await?;
    sqlx::query_scalar!("SELECT pg_advisory_unlock($1, 1)", REBUILD_LOCK_CLASS)
        .fetch_one(&mut *conn)
        .await?;
    Ok(())
}

/// The projections called `names` (every one when `names` is empty).
pub fn select(names: &[String]) -> Result<Vec<Arc<dyn Projection>>, RebuildError> {
    if names.is_empty() {
        return Ok(crate::all()
            .into_iter()
            .filter(|p| !p.tables().is_empty())
            .collect());
    }
    names
        .iter()
        .map(|n| {
            crate::by_name(n)
                .filter(|p| !p.tables().is_empty())
                .ok_or_else(|| RebuildError::Unknown(n.clone()))
        })
        .collect()
}

/// Rebuilds `projections` into new tables from the start of the feed and swaps them in.
pub async fn rebuild(
    pool: &PgPool,
    projections: &[Arc<dyn Projection>],
    options: &Options,
    observer: &mut dyn Observer,
) -> Result<Report, RebuildError> {
    let started = Instant::now();
    let mut projections = projections.to_vec();
    projections.sort_by_key(|p| p.name());
    projections.dedup_by_key(|p| p.name());
    let names: Vec<String> = projections.iter().map(|p| p.name().to_string()).collect();
    let tables: Vec<String> = projections
        .iter()
        .flat_map(|p| p.tables().iter().map(|t| t.to_string()))
        .collect();
    let rewritten: Vec<String> = projections
        .iter()
        .flat_map(|p| p.rewritten().iter().map(|t| t.to_string()))
        .collect();

    let mut conn = connect(pool).await?;
    take_rebuild_lock(&mut conn).await?;
    // The rebuild schema is made (or found) before any projection statement is prepared
    // on this connection, so every one of them resolves to the rebuilt tables.
    let job = Job {
        projections,
        names,
        tables,
    };
    let (mut at, mut places, resumed) =
        prepare(&mut conn, &job.names, &job.tables, &rewritten).await?;
    point_at_build(&mut conn).await?;
    let already = sqlx::query_scalar!("SELECT events FROM projection_rebuilds")
        .fetch_optional(&mut conn)
        .await?
        .unwrap_or(0);

    let mut applied = 0u64;
    let mut starting = Some(already as u64);
    for _ in 0..options.swap_attempts.max(1) {
        applied += catch_up(
            pool,
            &mut conn,
            &job.projections,
            &mut at,
            &mut places,
            options,
            starting.take(),
            observer,
        )
        .await?;
        observer.phase("indexing");
        // Each projection did this as it finished; this makes sure of it (no-ops then).
        sqlx::query!("SELECT leadledger_rebuild_analyze($1)", &job.tables)
            .execute(&mut conn)
            .await?;
        sqlx::query!("SELECT leadledger_rebuild_index($1)", &job.tables)
            .execute(&mut conn)
            .await?;
        observer.phase(if options.verify {
            "verifying"
        } else {
            "swapping"
        });
        match swap(&mut conn, &job, at, options, observer).await? {
            Swap::Done {
                position,
                differences,
                swapped,
                caught_up,
            } => {
                let _ = conn.close().await;
                return Ok(Report {
                    projections: job.names,
                    events: applied + caught_up,
                    resumed,
                    position,
                    differences,
                    swapped,
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            Swap::Locked => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Err(RebuildError::Locked(options.swap_attempts.max(1)))
}

/// A connection of the rebuild's own (never a pooled one: statements a pooled connection
/// prepared earlier would still name the live tables).
async fn connect(pool: &PgPool) -> Result<PgConnection, sqlx::Error> {
    pool.connect_options()
        .as_ref()
        .clone()
        .application_name("leadledger-rebuild")
        .connect()
        .await
}

/// `n` connections for the projections' tasks of [`catch_up`], opened side by side, each
/// holding the shared lock until its server process ends (see `take_rebuild_lock`) and
/// pointed at the rebuilt tables.
async fn open_builders(pool: &PgPool, n: usize) -> Result<Vec<PgConnection>, sqlx::Error> {
    futures::future::try_join_all((0..n).map(|_| async {
        let mut conn = connect(pool).await?;
        sqlx::query!("SELECT pg_advisory_lock_shared($1, 1)", REBUILD_LOCK_CLASS)
            .execute(&mut conn)
            .await?;
        point_at_build(&mut conn).await?;
        Ok(conn)
    }))
    .await
}

/// Points the projections' unqualified statements on `conn` at the rebuilt tables. Done
/// before any projection statement is prepared on it.
async fn point_at_build(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query!("SET search_path TO leadledger_rebuild, public")
        .execute(&mut *conn)
        .await?;
    // A batch lost to a crash is read again: each position commits with its rows. The swap
    // commits durably all the same (`SET LOCAL` there).
    sqlx::query!("SET synchronous_commit TO off")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Resumes the rebuild in progress if it is of the same projections and made for the same
/// migrations, and every projection's place survived, else starts a new one. Returns where
/// every projection has got to (the rebuild's position) and where each one stands.
async fn prepare(
    conn: &mut PgConnection,
    names: &[String],
    tables: &[String],
    rewritten: &[String],
) -> Result<(Position, HashMap<String, Position>, bool), RebuildError> {
    let migration = sqlx::query_scalar!("SELECT max(version) FROM _sqlx_migrations")
        .fetch_one(&mut *conn)
        .await?
        .unwrap_or(0);
    let state = sqlx::query!(
        r#"SELECT projections, migration, transaction_id::text AS "transaction_id!", position
           FROM projection_rebuilds"#
    )
    .fetch_optional(&mut *conn)
    .await?;
    let ready = sqlx::query_scalar!(r#"SELECT leadledger_rebuild_ready($1) AS "ready!""#, tables)
        .fetch_one(&mut *conn)
        .await?;
    let places = sqlx::query!(
        r#"SELECT name, transaction_id::text AS "transaction_id!", position
           FROM projection_rebuild_positions"#
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| Ok((r.name, Position::stored(&r.transaction_id, r.position)?)))
    .collect::<Result<HashMap<_, _>, sqlx::Error>>()?;
    if let Some(state) = state
        && state.projections == names
        && state.migration == migration
        && ready
        // Resumes only a projection whose place is known (each is written with the
        // rebuild's row, and committed with its copies' rows).
        && names.iter().all(|n| places.contains_key(n))
    {
        let at = Position::stored(&state.transaction_id, state.position)?;
        return Ok((at, places, true));
    }
    let mut tx = conn.begin().await?;
    sqlx::query!("SELECT leadledger_rebuild_discard()")
        .execute(&mut *tx)
        .await?;
    sqlx::query!(
        "SELECT leadledger_rebuild_prepare($1, $2)",
        tables,
        rewritten
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "INSERT INTO projection_rebuilds (projections, migration) VALUES ($1, $2)",
        names,
        migration
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "INSERT INTO projection_rebuild_positions (name) SELECT unnest($1::text[])",
        names
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let places = names
        .iter()
        .map(|n| (n.clone(), Position::default()))
        .collect();
    Ok((Position::default(), places, false))
}

/// Applies the feed after `at` until a read comes back short (the rebuild is at the head).
/// One task reads the feed and hands every batch to each projection's task, which applies
/// it on a connection of its own and commits it with its own place; once the feed is
/// read, each fills its totals, then analyzes and indexes its tables. A batch counts as
/// applied (and the rebuild's position moves past it) once every projection has committed
/// it. With `starting` (the events an interrupted run applied), it tells the observer how
/// many are left as soon as they are counted, beside the first batches. Returns the
/// events applied.
#[allow(clippy::too_many_arguments)]
async fn catch_up(
    pool: &PgPool,
    conn: &mut PgConnection,
    projections: &[Arc<dyn Projection>],
    at: &mut Position,
    places: &mut HashMap<String, Position>,
    options: &Options,
    starting: Option<u64>,
    observer: &mut dyn Observer,
) -> Result<u64, RebuildError> {
    let batch_size = options.batch_size.max(1);
    // Dropping this future (an interrupted rebuild) stops every task it started.
    let mut tasks = Tasks::default();
    // The events left are counted on a connection of their own while the projections
    // apply the first batches: counting a log of a million events takes a core a few
    // tenths of a second, which the fill would otherwise wait for.
    let already = starting.unwrap_or_default();
    let mut counting = starting.map(|_| {
        let (pool, from) = (pool.clone(), *at);
        tasks.spawn(async move {
            let mut conn = pool.acquire().await?;
            feed::count_after(&mut conn, from).await
        })
    });
    let conns = open_builders(pool, projections.len()).await?;
    observer.phase("catching up");
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<Done>();
    let mut senders = Vec::with_capacity(projections.len());
    let mut workers = Vec::with_capacity(projections.len());
    for (projection, conn) in projections.iter().zip(conns) {
        let (sender, batches) = tokio::sync::mpsc::channel::<Batch>(1);
        senders.push(sender);
        let place = places.get(projection.name()).copied().unwrap_or_default();
        workers.push(tasks.spawn(build(
            conn,
            projection.clone(),
            place,
            batches,
            options.batches_per_commit,
            done_tx.clone(),
        )));
    }
    drop(done_tx);

    // Fetching and opening (decrypting, decoding, upcasting) take turns on two tasks and
    // two connections: the next batch is fetched while this one is opened.
    let (sealed_tx, mut sealed) = tokio::sync::mpsc::channel::<feed::Sealed>(1);
    // A connection of its own, not the pool's: a `COPY` cut off by an interrupted rebuild
    // leaves its connection in the middle of the copy, so it must close, not be reused.
    let mut fetch_conn = connect(pool).await?;
    let mut after = *at;
    let fetcher = tasks.spawn(async move {
        loop {
            let rows =
                feed::copy_sealed_without_metadata(&mut fetch_conn, after, batch_size).await?;
            let short = (rows.len() as i64) < batch_size;
            if let Some(last) = rows.last()? {
                after = last;
                if sealed_tx.send(rows).await.is_err() {
                    // The opener stopped (it says why).
                    return Ok(());
                }
            }
            if short {
                break;
            }
        }
        Ok::<_, RebuildError>(())
    });
    let mut open_conn = pool.acquire().await?;
    let opener = tasks.spawn(async move {
        let mut sequence = 0u64;
        while let Some(rows) = sealed.recv().await {
            let batch = Batch {
                sequence,
                events: Arc::new(feed::open(&mut open_conn, rows).await?),
            };
            sequence += 1;
            for sender in &senders {
                if sender.send(batch.clone()).await.is_err() {
                    // A projection stopped (its task says why).
                    return Ok(());
                }
            }
        }
        Ok::<_, RebuildError>(())
    });

    // Batches some projections have committed: how many have, its last position, its size.
    let mut pending: BTreeMap<u64, (usize, Position, u64)> = BTreeMap::new();
    let mut next = 0u64;
    let mut applied = 0u64;
    loop {
        let d = tokio::select! {
            d = done.recv() => match d {
                Some(d) => d,
                None => break,
            },
            counted = async { counting.as_mut().expect("checked").await },
                if counting.is_some() =>
            {
                counting = None;
                observer.started(already, remaining(counted)?);
                continue;
            }
        };
        places.insert(d.projection.to_string(), d.place);
        let entry = pending.entry(d.sequence).or_insert((0, d.last, d.events));
        entry.0 += 1;
        while let Some(&(count, last, events)) = pending.get(&next)
            && count == projections.len()
        {
            pending.remove(&next);
            next += 1;
            sqlx::query!(
                "UPDATE projection_rebuilds
                 SET transaction_id = $1::text::xid8, position = $2, events = events + $3,
                     updated_at = now()",
                last.transaction_id.to_string(),
                last.position,
                events as i64
            )
            .execute(&mut *conn)
            .await?;
            *at = last;
            applied += events;
            observer.applied(events);
        }
    }
    // A feed read in fewer batches than the count took.
    if let Some(count) = counting.take() {
        observer.started(already, remaining(count.await)?);
    }
    let mut outcome = Ok(());
    for worker in workers.into_iter().chain([opener, fetcher]) {
        let result = worker.await.unwrap_or_else(|e| {
            Err(sqlx::Error::Protocol(format!("a rebuild task stopped: {e}")).into())
        });
        if outcome.is_ok() {
            outcome = result;
        }
    }
    outcome.map(|()| applied)
}

/// The events left to apply, from the counting task of [`catch_up`].
fn remaining(
    counted: Result<Result<i64, sqlx::Error>, tokio::task::JoinError>,
) -> Result<u64, RebuildError> {
    let n = counted
        .map_err(|e| sqlx::Error::Protocol(format!("counting the events left stopped: {e}")))??;
    Ok(n.max(0) as u64)
}

/// A batch of the feed, shared by every projection's task.
#[derive(Clone)]
struct Batch {
    sequence: u64,
    events: Arc<Vec<FeedEvent>>,
}

/// A projection committed a batch.
struct Done {
    projection: &'static str,
    /// Where the projection now stands (past the batch's end if it had been further).
    place: Position,
    sequence: u64,
    last: Position,
    events: u64,
}

/// Tasks stopped when this is dropped.
#[derive(Default)]
struct Tasks(Vec<tokio::task::AbortHandle>);

impl Tasks {
    fn spawn<F>(&mut self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handle = tokio::spawn(task);
        self.0.push(handle.abort_handle());
        handle
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// One projection's part of [`catch_up`]: applies the batches after `place` through the
/// projection's [`crate::Fill`], commits every `per_commit` of them with its new place,
/// then makes its tables logged and indexes them.
async fn build(
    mut conn: PgConnection,
    projection: Arc<dyn Projection>,
    mut place: Position,
    mut batches: tokio::sync::mpsc::Receiver<Batch>,
    per_commit: usize,
    done: tokio::sync::mpsc::UnboundedSender<Done>,
) -> Result<(), RebuildError> {
    let per_commit = per_commit.max(1);
    let mut fill = projection.fill();
    let mut read_all = false;
    while !read_all {
        // No savepoint: a failed batch is rolled back with its transaction and located
        // from where this projection's committed place left its tables.
        let mut tx = conn.begin().await?;
        let mut applied: Vec<Done> = Vec::with_capacity(per_commit);
        let mut reached = place;
        let mut failure = None;
        while applied.len() < per_commit {
            let Some(batch) = batches.recv().await else {
                read_all = true;
                break;
            };
            let Some(last) = batch.events.last().map(|e| e.at) else {
                continue;
            };
            // A resumed projection may have applied part of the feed the others had not.
            let start = batch.events.partition_point(|e| e.at <= reached);
            if start < batch.events.len() {
                if let Err(error) = fill.apply(&mut tx, &batch.events[start..]).await {
                    failure = Some((error, last));
                    break;
                }
                reached = last;
            }
            applied.push(Done {
                projection: projection.name(),
                place: reached,
                sequence: batch.sequence,
                last,
                events: batch.events.len() as u64,
            });
        }
        let flushed = match failure {
            Some(failure) => Err(failure),
            None => fill.flush(&mut tx).await.map_err(|e| (e, reached)),
        };
        if let Err((error, last)) = flushed {
            tx.rollback().await?;
            // The uncommitted batches again, to find the event that fails.
            let events = feed::read_until(&mut conn, place, last, i64::MAX).await?;
            return Err(locate(&mut conn, projection.as_ref(), &events, error).await);
        }
        if reached != place {
            sqlx::query!(
                "UPDATE projection_rebuild_positions
                 SET transaction_id = $1::text::xid8, position = $2 WHERE name = $3",
                reached.transaction_id.to_string(),
                reached.position,
                projection.name()
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        place = reached;
        for d in applied {
            let _ = done.send(d);
        }
    }
    // The feed is read to its head: the totals are filled from the rows once.
    if !projection.totals().is_empty() {
        let mut tx = conn.begin().await?;
        projection
            .fill_totals(&mut tx)
            .await
            .map_err(|e| RebuildError::Failed {
                projection: projection.name().to_string(),
                position: place,
                error: e.to_string(),
            })?;
        tx.commit().await?;
    }
    let tables: Vec<String> = projection.tables().iter().map(|t| t.to_string()).collect();
    sqlx::query!("SELECT leadledger_rebuild_analyze($1)", &tables)
        .execute(&mut conn)
        .await?;
    sqlx::query!("SELECT leadledger_rebuild_index($1)", &tables)
        .execute(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(())
}

/// Applies `events` to every projection as live batches (moving their totals) in the
/// caller's transaction; a failure names the projection and the exact event.
async fn apply_live(
    conn: &mut PgConnection,
    projections: &[Arc<dyn Projection>],
    events: &[FeedEvent],
) -> Result<(), RebuildError> {
    for projection in projections {
        // A savepoint, so that a failure can be located event by event in the same
        // transaction (which holds the swap's locks and this catch-up's earlier batches).
        let mut savepoint = conn.begin().await?;
        match projection.apply_batch(&mut savepoint, events).await {
            Ok(()) => savepoint.commit().await?,
            Err(batch_error) => {
                savepoint.rollback().await?;
                return Err(locate(conn, projection.as_ref(), events, batch_error).await);
            }
        }
    }
    Ok(())
}

/// The failure of `projection` on `events` (which failed as a batch with `batch_error`),
/// located at its event by applying them one by one in a transaction (or savepoint) that
/// is rolled back.
async fn locate(
    conn: &mut PgConnection,
    projection: &dyn Projection,
    events: &[FeedEvent],
    batch_error: ProjectionError,
) -> RebuildError {
    let failure = async {
        let mut probe = conn.begin().await?;
        let (_, failure) = apply_until_failure(&mut probe, projection, events).await?;
        probe.rollback().await?;
        Ok::<_, sqlx::Error>(failure)
    };
    let (position, error) = match failure.await {
        Ok(failure) => failure.unwrap_or((
            events.first().map(|e| e.at).unwrap_or_default(),
            batch_error,
        )),
        Err(e) => return e.into(),
    };
    RebuildError::Failed {
        projection: projection.name().to_string(),
        position,
        error: error.to_string(),
    }
}

/// Applies the feed from `after` to `until` (a delivered position) in the caller's
/// transaction, in batches. Returns the events applied.
async fn apply_until(
    conn: &mut PgConnection,
    projections: &[Arc<dyn Projection>],
    mut after: Position,
    until: Position,
    batch_size: i64,
) -> Result<u64, RebuildError> {
    let mut applied = 0;
    while after < until {
        let events = feed::read_until(conn, after, until, batch_size).await?;
        let Some(last) = events.last() else { break };
        let last = last.at;
        apply_live(conn, projections, &events).await?;
        applied += events.len() as u64;
        after = last;
    }
    Ok(applied)
}

enum Swap {
    Done {
        position: Position,
        differences: u64,
        swapped: bool,
        caught_up: u64,
    },
    /// Readers or a runner held a lock past the timeout; try again.
    Locked,
}

/// What a rebuild rebuilds: its projections (by name), their names and their tables.
struct Job {
    projections: Vec<Arc<dyn Projection>>,
    names: Vec<String>,
    tables: Vec<String>,
}

async fn swap(
    conn: &mut PgConnection,
    job: &Job,
    at: Position,
    options: &Options,
    observer: &mut dyn Observer,
) -> Result<Swap, RebuildError> {
    let mut tx = conn.begin().await?;
    let result = swap_in(&mut tx, job, at, options, observer).await;
    match result {
        Ok(done @ Swap::Done { swapped: true, .. }) => {
            tx.commit().await?;
            Ok(done)
        }
        Ok(other) => {
            tx.rollback().await?;
            Ok(other)
        }
        Err(RebuildError::Database(sqlx::Error::Database(e)))
            // lock_not_available (the timeout), or a deadlock with a reader's own locks.
            if matches!(e.code().as_deref(), Some("55P03" | "40P01")) =>
        {
            tx.rollback().await?;
            Ok(Swap::Locked)
        }
        Err(e) => {
            tx.rollback().await?;
            Err(e)
        }
    }
}

async fn swap_in(
    tx: &mut PgConnection,
    job: &Job,
    at: Position,
    options: &Options,
    observer: &mut dyn Observer,
) -> Result<Swap, RebuildError> {
    let (projections, names, tables) = (&job.projections, &job.names, &job.tables);
    sqlx::query!("SET LOCAL lock_timeout = '2s'")
        .execute(&mut *tx)
        .await?;
    // The build's connection commits asynchronously; the swap must be durable.
    sqlx::query!("SET LOCAL synchronous_commit TO on")
        .execute(&mut *tx)
        .await?;
    sqlx::query!(
        "INSERT INTO projection_checkpoints (name) SELECT unnest($1::text[])
         ON CONFLICT (name) DO NOTHING",
        names
    )
    .execute(&mut *tx)
    .await?;
    // In name order, like every other taker of these locks.
    let live = sqlx::query!(
        r#"SELECT name, transaction_id::text AS "transaction_id!", position
           FROM projection_checkpoints WHERE name = ANY($1) ORDER BY name FOR UPDATE"#,
        names
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| Ok((r.name, Position::stored(&r.transaction_id, r.position)?)))
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let target = live.iter().map(|(_, p)| *p).chain([at]).max().unwrap_or(at);
    let caught_up = apply_until(tx, projections, at, target, options.batch_size).await?;

    let mut differences = 0;
    if options.verify {
        // Bring each live model to the same point (what its runner would do next), so
        // that both sides hold exactly the same events.
        sqlx::query!("SET LOCAL search_path TO public")
            .execute(&mut *tx)
            .await?;
        for projection in projections {
            let from = live
                .iter()
                .find(|(n, _)| n == projection.name())
                .map_or(Position::default(), |(_, p)| *p);
            apply_until(
                tx,
                std::slice::from_ref(projection),
                from,
                target,
                options.batch_size,
            )
            .await?;
        }
        sqlx::query!("SET LOCAL search_path TO leadledger_rebuild, public")
            .execute(&mut *tx)
            .await?;
        for table in tables {
            // Streamed: memory stays flat however many rows differ.
            let mut rows = sqlx::query!(
                "SELECT key, live, rebuilt FROM leadledger_rebuild_diff($1)",
                table
            )
            .fetch(&mut *tx);
            while let Some(row) = rows.try_next().await? {
                differences += 1;
                observer.difference(&Difference {
                    table: table.clone(),
                    key: row.key.unwrap_or_default(),
                    live: row.live,
                    rebuilt: row.rebuilt,
                });
            }
        }
        if differences > 0 {
            return Ok(Swap::Done {
                position: target,
                differences,
                swapped: false,
                caught_up,
            });
        }
        observer.phase("swapping");
    }
    sqlx::query!("SELECT leadledger_rebuild_swap($1)", tables)
        .execute(&mut *tx)
        .await?;
    sqlx::query!("SELECT leadledger_rebuild_settle($1)", tables)
        .execute(&mut *tx)
        .await?;
    let names: Vec<&str> = job.names.iter().map(String::as_str).collect();
    advance(tx, &names, target).await?;
    Ok(Swap::Done {
        position: target,
        differences,
        swapped: true,
        caught_up,
    })
}

/// Drops a rebuild left unfinished (its tables and its position). The live tables are
/// not touched.
pub async fn discard(pool: &PgPool) -> Result<(), RebuildError> {
    let mut conn = pool.acquire().await?;
    take_rebuild_lock(&mut conn).await?;
    let result = sqlx::query!("SELECT leadledger_rebuild_discard()")
        .execute(&mut *conn)
        .await;
    sqlx::query_scalar!("SELECT pg_advisory_unlock($1, 0)", REBUILD_LOCK_CLASS)
        .fetch_one(&mut *conn)
        .await?;
    result?;
    Ok(())
}

impl From<ProjectionError> for RebuildError {
    fn from(e: ProjectionError) -> Self {
        match e {
            ProjectionError::Database(e) => Self::Database(e),
            other => Self::Failed {
                projection: String::new(),
                position: Position::default(),
                error: other.to_string(),
            },
        }
    }
}
