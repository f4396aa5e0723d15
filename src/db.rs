//! The database: the embedded PostgreSQL or `DATABASE_URL`, the pool, and migrations.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::Config;
use crate::embedded::{EmbeddedError, EmbeddedOptions, EmbeddedPostgres};

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
