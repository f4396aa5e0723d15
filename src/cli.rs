//! The command line (`leadledger <command>`): parsing and dispatch. Every command works
//! whether or not `serve` runs on the same data: they share the embedded PostgreSQL.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::config::{Config, ServeConfig};
use crate::db::Database;
use crate::http::{self, AppState};
use crate::telemetry;

#[derive(Debug, Parser)]
#[command(
    name = "leadledger",
    version,
    about = "Event-sourced system of record for sales automation"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service.
    Serve(ServeConfig),
    /// Apply pending migrations.
    Migrate,
    /// Database utilities.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Print the connection URL in use.
    Url,
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    telemetry::init(cli.config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(cli))
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config;
    match cli.command {
        Command::Serve(serve) => run_serve(&config, &serve).await,
        Command::Migrate => {
            let db = Database::open(&config)
                .await
                .context("opening the database")?;
            let result = db.migrate().await.context("applying migrations");
            db.close().await?;
            result?;
            println!(
                "migrations applied (latest: {})",
                crate::db::latest_migration()
            );
            Ok(())
        }
        Command::Db {
            command: DbCommand::Url,
        } => {
            let db = Database::open(&config)
                .await
                .context("opening the database")?;
            println!("{}", db.url);
            db.close().await?;
            Ok(())
        }
    }
}

async fn run_serve(config: &Config, serve: &ServeConfig) -> anyhow::Result<()> {
    let db = Database::open(config)
        .await
        .context("opening the database")?;
    if let Err(e) = db.migrate().await {
        db.close().await?;
        return Err(e).context("applying migrations");
    }
    let listener = match TcpListener::bind(serve.addr).await {
        Ok(l) => l,
        Err(e) => {
            db.close().await?;
            return Err(e).with_context(|| format!("listening on {}", serve.addr));
        }
    };
    let addr = listener.local_addr()?;
    let state = AppState::new(db.pool.clone());
    tracing::info!(%addr, "leadledger listening");
    println!("leadledger listening on http://{addr}");

    let result = http::serve(
        listener,
        http::router(state),
        http::shutdown_signal(),
        serve.shutdown_grace(),
    )
    .await;
    tracing::info!("HTTP server stopped; closing the database");
    db.close().await.context("closing the database")?;
    tracing::info!("stopped");
    result.context("serving HTTP")
}
