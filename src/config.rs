//! Configuration from the environment (and a `.env` file), shared by every command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Settings every command shares. Each has an environment variable; the flag wins.
/// `--help` names the variables without their values (`[env: NAME]`): clap would show an
/// unset one as `NAME=`, as if it were set to nothing, and a set one may hold a secret.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// PostgreSQL to use. Unset: leadledger runs its own in the data directory.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Where the embedded PostgreSQL and the first admin key live.
    #[arg(
        long,
        env = "LEADLEDGER_DATA_DIR",
        hide_env_values = true,
        default_value = ".leadledger",
        global = true
    )]
    pub data_dir: PathBuf,

    /// Log lines for people (`pretty`) or for machines (`json`).
    #[arg(
        long,
        env = "LEADLEDGER_LOG_FORMAT",
        hide_env_values = true,
        value_enum,
        default_value = "pretty",
        global = true
    )]
    pub log_format: LogFormat,

    /// Connections in the pool.
    #[arg(
        long,
        env = "LEADLEDGER_DB_POOL_SIZE",
        hide_env_values = true,
        default_value_t = 20,
        global = true
    )]
    pub db_pool_size: u32,

    /// A snapshot of an aggregate every this many events (0: never).
    #[arg(
        long,
        env = "LEADLEDGER_SNAPSHOT_EVERY",
        hide_env_values = true,
        default_value_t = crate::store::DEFAULT_SNAPSHOT_EVERY,
        global = true
    )]
    pub snapshot_every: u64,

    /// Key for secrets at rest (base64 of 32 bytes). Unset: `<data dir>/secret.key`.
    #[arg(
        long,
        env = "LEADLEDGER_SECRET_KEY",
        hide_env_values = true,
        global = true
    )]
    pub secret_key: Option<String>,
}

impl Config {
    pub fn secrets(&self) -> Result<crate::secrets::SecretBox, crate::secrets::SecretError> {
        crate::secrets::SecretBox::load(self.secret_key.as_deref(), &self.data_dir)
    }
}

/// Settings of `serve` alone.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on; port 0 picks a free one.
    #[arg(
        long,
        env = "LEADLEDGER_ADDR",
        hide_env_values = true,
        default_value = "127.0.0.1:8080"
    )]
    pub addr: SocketAddr,

    /// How long in-flight requests may run on after a shutdown signal.
    #[arg(
        long,
        env = "LEADLEDGER_SHUTDOWN_GRACE_SECS",
        hide_env_values = true,
        default_value_t = 20
    )]
    pub shutdown_grace_secs: u64,

    /// The longest one request may run before it is answered 503.
    #[arg(long, env = "LEADLEDGER_REQUEST_TIMEOUT_SECS", default_value_t = 15)]
    pub request_timeout_secs: u64,

    /// How long a client may take to send a request's headers, and an idle keep-alive
    /// connection may stay open.
    #[arg(long, env = "LEADLEDGER_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub header_timeout_secs: u64,

    /// Client connections open at once (0: derived from the descriptor limit).
    #[arg(long, env = "LEADLEDGER_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Requests with bodies over 1 MiB (imports) handled at once; more wait.
    #[arg(long, env = "LEADLEDGER_LARGE_BODY_CONCURRENCY", default_value_t = 2)]
    pub large_body_concurrency: usize,

    /// A streaming replica of the database for read-model, list and analytics reads.
    #[arg(long, env = "LEADLEDGER_READ_DATABASE_URL", hide_env_values = true)]
    pub read_database_url: Option<String>,
}

impl ServeConfig {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The longest one request may run (at least a second).
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }
}
