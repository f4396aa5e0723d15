//! Reads from a streaming replica (`LEADLEDGER_READ_DATABASE_URL`): the read-model, list and
//! analytics queries may go there; commands, stream reads, idempotency and everything else
//! stay on the primary.
//!
//! A physical replica holds the primary's read models and their checkpoints as of its last
//! replayed WAL, so `?min_position=` is honoured by waiting for the replica's checkpoints,
//! exactly as on the primary. The primary takes the read instead when the replica is down
//! (it is then left alone for [`DOWN_PAUSE`]) or has not reached the position within the
//! read's time limit; each such read counts in `leadledger_replica_fallbacks_total` with its
//! reason. A monitor measures the replica's lag once a second
//! (`leadledger_replica_lag_bytes`, `leadledger_replica_lag_seconds`, `leadledger_replica_up`);
//! while the lag is longer than the read's time limit, reads that wait for a position go to
//! the primary at once instead of waiting for a replica that cannot make it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::app::App;
use crate::store::Position;

/// How long a replica found down is left alone before it is tried again.
pub const DOWN_PAUSE: Duration = Duration::from_secs(2);
/// How long a read waits for a connection to the replica before it takes the primary.
const CONNECT_WAIT: Duration = Duration::from_millis(800);

/// The replica's pool and what is known of its health.
#[derive(Clone)]
pub struct Replica {
    pub pool: PgPool,
    state: Arc<State>,
}

struct State {
    started: Instant,
    /// Milliseconds since `started` before which the replica is not tried.
    down_until_ms: AtomicU64,
    /// The last lag measured, in milliseconds.
    lag_ms: AtomicU64,
    measured: AtomicBool,
    _monitor: DropGuard,
}

/// Why a read went to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    Down,
    Behind,
}

impl Fallback {
    fn label(self) -> &'static str {
        match self {
            Self::Down => "down",
            Self::Behind => "behind",
        }
    }
}

/// The replica's pool: a connection is tested before use, so a replica that went away is
/// noticed at acquire (and the read goes to the primary) rather than by a failed query.
pub fn pool_options(size: u32) -> sqlx::postgres::PgPoolOptions {
    crate::db::pool_options(size)
        .acquire_timeout(CONNECT_WAIT)
        .test_before_acquire(true)
}

impl Replica {
    /// Wraps the replica's pool and starts its lag monitor (stopped when the last clone
    /// of this replica is dropped).
    pub fn new(pool: PgPool, primary: PgPool) -> Self {
        let cancel = CancellationToken::new();
        let state = Arc::new(State {
            started: Instant::now(),
            down_until_ms: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            measured: AtomicBool::new(false),
            _monitor: cancel.clone().drop_guard(),
        });
        let weak = Arc::downgrade(&state);
        let replica_pool = pool.clone();
        tokio::spawn(async move {
            loop {
                let Some(state) = weak.upgrade() else { return };
                let lag = measure_lag(&primary, &replica_pool).await;
                match lag {
                    Ok((bytes, seconds)) => {
                        metrics::gauge!("leadledger_replica_up").set(1.0);
                        metrics::gauge!("leadledger_replica_lag_bytes").set(bytes as f64);
                        metrics::gauge!("leadledger_replica_lag_seconds").set(seconds);
                        state
                            .lag_ms
                            .store((seconds * 1000.0) as u64, Ordering::Relaxed);
                        state.measured.store(true, Ordering::Relaxed);
                    }
                    Err(_) => {
                        metrics::gauge!("leadledger_replica_up").set(0.0);
                        state.measured.store(false, Ordering::Relaxed);
                    }
                }
                drop(state);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Self { pool, state }
    }

    fn now_ms(&self) -> u64 {
        self.state.started.elapsed().as_millis() as u64
    }

    fn available(&self) -> bool {
        self.now_ms() >= self.state.down_until_ms.load(Ordering::Relaxed)
    }

    fn mark_down(&self) {
        let until = self.now_ms() + DOWN_PAUSE.as_millis() as u64;
        self.state.down_until_ms.store(until, Ordering::Relaxed);
    }

    /// True when the last measured lag says the replica cannot reach a fresh write in `wait`.
    fn too_far_behind(&self, wait: Duration) -> bool {
        self.state.measured.load(Ordering::Relaxed)
            && Duration::from_millis(self.state.lag_ms.load(Ordering::Relaxed)) > wait
    }
}

/// (bytes of WAL the replica has yet to replay, seconds since the last transaction it
/// replayed when it has some left, else 0). On a server that is not a replica, both 0.
async fn measure_lag(primary: &PgPool, replica: &PgPool) -> Result<(i64, f64), sqlx::Error> {
    let head = sqlx::query_scalar!(r#"SELECT pg_current_wal_lsn()::text AS "lsn!""#)
        .fetch_one(primary)
        .await?;
    let row = sqlx::query!(
        r#"SELECT coalesce(pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn()), 0)::bigint
                      AS "bytes!",
                  coalesce(CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn()
                                 AND pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn()) <= 0
                           THEN 0
                           ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
                      END, 0) AS "seconds!""#,
        head
    )
    .fetch_one(replica)
    .await?;
    Ok((row.bytes.max(0), row.seconds.max(0.0)))
}

/// Where a read-model query runs, once its `min_position` (if any) is reached.
pub enum ReadTarget {
    /// A connection to the replica or the primary.
    Ready(PoolConnection<Postgres>),
    /// Neither reached the position in time.
    NotCaughtUp,
}

impl App {
    /// Reads go to `replica` when it is up (see the module's notes).
    pub fn with_replica(mut self, replica: PgPool) -> Self {
        self.replica = Some(Replica::new(replica, self.pool.clone()));
        self
    }

    /// A connection for a query of `projections`' read models, from the replica when one
    /// is configured, up and (with `position`) caught up within `wait`; else from the
    /// primary, after waiting for `position` there.
    pub async fn read_connection(
        &self,
        position: Option<Position>,
        projections: &[&str],
        wait: Duration,
    ) -> Result<ReadTarget, sqlx::Error> {
        let started = tokio::time::Instant::now();
        if let Some(replica) = &self.replica
            && replica.available()
        {
            match self.try_replica(replica, position, projections, wait).await {
                Ok(conn) => {
                    metrics::counter!("leadledger_replica_reads_total").increment(1);
                    return Ok(ReadTarget::Ready(conn));
                }
                Err(reason) => {
                    metrics::counter!("leadledger_replica_fallbacks_total", "reason" => reason.label())
                        .increment(1);
                    if reason == Fallback::Down {
                        replica.mark_down();
                    }
                }
            }
        }
        if let Some(position) = position {
            // What is left of the time limit; at least one look, since the primary is
            // usually ahead of a replica that gave up.
            let left = wait.saturating_sub(started.elapsed());
            if !projections::runner::wait_for(&self.pool, position, projections, left).await? {
                return Ok(ReadTarget::NotCaughtUp);
            }
        }
        Ok(ReadTarget::Ready(self.pool.acquire().await?))
    }

    async fn try_replica(
        &self,
        replica: &Replica,
        position: Option<Position>,
        projections: &[&str],
        wait: Duration,
    ) -> Result<PoolConnection<Postgres>, Fallback> {
        if let Some(position) = position {
            if replica.too_far_behind(wait) {
                return Err(Fallback::Behind);
            }
            match projections::runner::wait_for(&replica.pool, position, projections, wait).await {
                Ok(true) => {}
                Ok(false) => return Err(Fallback::Behind),
                Err(_) => return Err(Fallback::Down),
            }
        }
        replica.pool.acquire().await.map_err(|_| Fallback::Down)
    }
}
