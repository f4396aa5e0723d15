//! The database: the embedded PostgreSQL or `DATABASE_URL`, the pool, and migrations.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use crate::config::Config;
use crate::embedded::{EmbeddedError, EmbeddedOptions, EmbeddedPostgres};
use crate::lock;

/// The migrations in `migrations/`, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!();

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    BadUrl(sqlx::Error),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(sqlx::Error),
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// An open database: the pool, and the embedded cluster behind it if there is one.
#[derive(Debug)]
pub struct Database {
    pub pool: PgPool,
    pub url: String,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Opens `DATABASE_URL`, or starts (or joins) the embedded PostgreSQL.
    pub async fn open(config: &Config) -> Result<Self, DbError> {
        let (options, url, embedded) = match &config.database_url {
            Some(url) => {
                let options: PgConnectOptions = url.parse().map_err(DbError::BadUrl)?;
                (options, url.clone(), None)
            }
            None => {
                let mut pg =
                    EmbeddedPostgres::start(&config.data_dir, &EmbeddedOptions::default()).await?;
                // Nobody else will restart it if it dies while this process uses it.
                pg.supervise();
                (pg.connect_options(), pg.url(), Some(pg))
            }
        };
        let pool = pool_options(config.db_pool_size)
            .connect_with(options.application_name("leadledger"))
            .await
            .map_err(DbError::Connect)?;
        Ok(Self {
            pool,
            url,
            embedded,
        })
    }

    pub async fn migrate(&self) -> Result<(), DbError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Closes the pool, then leaves (and if last, stops) the embedded PostgreSQL.
    pub async fn close(self) -> Result<(), DbError> {
        self.pool.close().await;
        if let Some(pg) = self.embedded {
            pg.stop().await?;
        }
        Ok(())
    }
}

pub fn pool_options(size: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(size.max(2))
        .min_connections(0)
        // A request waits this long for a connection before it answers 503.
        .acquire_timeout(Duration::from_secs(5))
        .idle_timeout(Duration::from_secs(300))
        // No extra round trip to test a connection before every use: a dead connection
        // fails its first statement instead, which maps to 503 (and the pool drops it).
        .test_before_acquire(false)
}

/// Connections that a command has just used and left clean, kept for the next command
/// instead of handed back to the pool. The pool tests every connection handed back with a
/// round trip (an empty `Sync`), which woke PostgreSQL once more for every command; a
/// connection kept here goes straight to the next command, whose statement is its test.
///
/// Only a connection whose last statement ran to its end outside any transaction may be
/// kept ([`Warm::keep`]). A connection kept longer than [`Warm::KEEP`] goes back to the
/// pool, as does one in [`Warm::HAND_BACK_EVERY`], and at most half the pool is kept, so
/// the pool's other users (reads, workers, imports) never wait long for connections this
/// holds; when commands stop, all of them are back in the pool within twice that.
#[derive(Clone)]
pub struct Warm {
    inner: Arc<WarmInner>,
}

struct WarmInner {
    pool: PgPool,
    limit: usize,
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    /// Oldest first: connections are taken from the end, and kept at the end.
    connections: Vec<(Instant, PoolConnection<Postgres>)>,
    /// A task hands back what has been kept too long ([`Warm::sweep`]).
    sweeping: bool,
    /// Connections kept since one was last handed back to the pool.
    kept_since_handed_back: u32,
}

impl Warm {
    /// How long a connection is kept unused before it goes back to the pool.
    pub const KEEP: Duration = Duration::from_millis(100);
    /// One connection in this many is handed back to the pool even under constant load,
    /// so that the pool still closes the connections past their lifetime (it checks a
    /// connection as it comes back): a busy process's connections go through the pool
    /// every few seconds.
    pub const HAND_BACK_EVERY: u32 = 1024;

    pub fn new(pool: PgPool) -> Self {
        let limit = pool.options().get_max_connections() as usize / 2;
        Self {
            inner: Arc::new(WarmInner {
                pool,
                limit,
                kept: Mutex::default(),
            }),
        }
    }

    /// The connection kept last, or one from the pool.
    pub async fn acquire(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        let kept = lock(&self.inner.kept).connections.pop();
        match kept {
            Some((_, connection)) => {
                metrics::counter!("db_connections_reused_total").increment(1);
                Ok(connection)
            }
            None => self.inner.pool.acquire().await,
        }
    }

    /// Keeps `connection` for the next [`Warm::acquire`]. Only for a connection whose last
    /// statement ran to its end, outside any transaction: nothing tests it before its next
    /// statement.
    pub fn keep(&self, connection: PoolConnection<Postgres>) {
        if self.inner.pool.is_closed() {
            return;
        }
        let mut kept = lock(&self.inner.kept);
        kept.kept_since_handed_back += 1;
        if kept.connections.len() >= self.inner.limit
            || kept.kept_since_handed_back >= Self::HAND_BACK_EVERY
        {
            kept.kept_since_handed_back = 0;
            // Handed back to the pool, outside the lock.
            drop(kept);
            drop(connection);
            return;
        }
        kept.connections.push((Instant::now(), connection));
        if !kept.sweeping {
            kept.sweeping = true;
            tokio::spawn(Self::sweep(Arc::downgrade(&self.inner)));
        }
    }

    /// How many connections are kept now.
    pub fn kept(&self) -> usize {
        lock(&self.inner.kept).connections.len()
    }

    /// Every [`Warm::KEEP`], hands back to the pool the connections kept longer than that;
    /// ends when none is kept (the next [`Warm::keep`] starts it again), or the app is gone.
    async fn sweep(inner: Weak<WarmInner>) {
        loop {
            tokio::time::sleep(Self::KEEP).await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let (stale, done): (Vec<_>, bool) = {
                let mut kept = lock(&inner.kept);
                let now = Instant::now();
                let fresh = kept
                    .connections
                    .partition_point(|(at, _)| now.duration_since(*at) >= Self::KEEP);
                let stale = kept.connections.drain(..fresh).collect();
                kept.sweeping = !kept.connections.is_empty();
                (stale, !kept.sweeping)
            };
            // Handed back to the pool, outside the lock.
            drop(stale);
            if done {
                return;
            }
        }
    }
}

impl Drop for WarmInner {
    fn drop(&mut self) {
        let kept = std::mem::take(&mut lock(&self.kept).connections);
        // Handing a connection back takes a task; without a runtime, close it instead.
        if tokio::runtime::Handle::try_current().is_err() {
            for (_, connection) in kept {
                drop(connection.detach());
            }
        }
    }
}

/// The newest migration compiled into this binary.
pub fn latest_migration() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// True when the database answers and every migration of this binary is applied.
pub async fn is_ready(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied = sqlx::query_scalar!(
        r#"SELECT max(version) AS "version" FROM _sqlx_migrations WHERE success"#
    )
    .fetch_one(pool)
    .await?;
    Ok(applied.unwrap_or(0) >= latest_migration())
}
