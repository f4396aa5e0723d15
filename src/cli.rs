//! The command line (`leadledger <command>`): parsing and dispatch. Every command works
//! whether or not `serve` runs on the same data: they share the embedded PostgreSQL.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::auth::{self, Scope};
use crate::config::{Config, ServeConfig};
use crate::db::Database;
use crate::http::{self, AppState};
use crate::store::Store;
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
    /// API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Webhook sources and parked provider events.
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
    },
    /// Contacts.
    Contacts {
        #[command(subcommand)]
        command: ContactsCommand,
    },
    /// Read models.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Reports from the read models.
    Analytics {
        #[command(subcommand)]
        command: AnalyticsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints it alone on the last line of stdout (it is not shown again).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        scope: Scope,
    },
    /// List keys (never the keys themselves).
    List,
    /// Revoke a key by id.
    Revoke { id: uuid::Uuid },
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Create a source; prints its secret alone on the last line (it is not shown again).
    AddSource { name: String },
    /// Events waiting for their enrollment.
    Parked,
    /// Events given up on.
    DeadLetters,
}

#[derive(Debug, Subcommand)]
pub enum ContactsCommand {
    /// Import contacts from a CSV file (header row of field names) or a JSON array.
    Import {
        file: std::path::PathBuf,
        #[arg(long, value_enum, default_value = "partial")]
        mode: crate::contacts::ImportMode,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Each projection's checkpoint, how far behind it is, its state and who runs it.
    Status {
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum AnalyticsCommand {
    /// Costs of every budget (spends and captured reservations), as
    /// `GET /v1/analytics/costs` reports them.
    Costs {
        /// UTC days back, today included: 1..=365.
        #[arg(long, default_value = "30", value_parser = crate::http::analytics::parse_days)]
        days: u16,
        /// day | model | category | budget
        #[arg(long, default_value = "day", value_parser = crate::http::analytics::parse_group_by)]
        group_by: projections::costs::GroupBy,
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
    Csv,
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
        Command::Keys { command } => {
            with_migrated_db(&config, async |db| keys(db, command).await).await
        }
        Command::Webhooks { command } => {
            with_migrated_db(&config, async |db| {
                webhooks_command(db, &config, command).await
            })
            .await
        }
        Command::Contacts {
            command: ContactsCommand::Import { file, mode },
        } => {
            with_migrated_db(&config, async |db| {
                import_contacts(db, &config, &file, mode).await
            })
            .await
        }
        Command::Projections { command } => {
            with_migrated_db(&config, async |db| projections_command(db, command).await).await
        }
        Command::Analytics { command } => {
            with_migrated_db(&config, async |db| analytics_command(db, command).await).await
        }
    }
}

/// Opens and migrates the database, runs `f`, and closes the database whatever `f` returned.
async fn with_migrated_db<F>(config: &Config, f: F) -> anyhow::Result<()>
where
    F: AsyncFnOnce(&Database) -> anyhow::Result<()>,
{
    let db = Database::open(config)
        .await
        .context("opening the database")?;
    let result = match db.migrate().await.context("applying migrations") {
        Ok(()) => f(&db).await,
        Err(e) => Err(e),
    };
    db.close().await?;
    result
}

async fn keys(db: &Database, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create { name, scope } => {
            let (id, key) = auth::create_key(&db.pool, &name, scope).await?;
            println!("created {scope} key {id} ({name}); it is shown once:");
            println!("{key}");
        }
        KeysCommand::List => {
            println!(
                "{:<36}  {:<6}  {:<10}  {:<20}  {:<8}  name",
                "id", "scope", "prefix", "created", "status"
            );
            for k in auth::list_keys(&db.pool).await? {
                let status = if k.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:<36}  {:<6}  {:<10}  {:<20}  {:<8}  {}",
                    k.id,
                    k.scope,
                    k.prefix,
                    k.created_at.format("%Y-%m-%d %H:%M:%S"),
                    status,
                    k.name
                );
            }
        }
        KeysCommand::Revoke { id } => {
            if auth::revoke_key(&db.pool, id).await? {
                println!("revoked {id}");
            } else {
                anyhow::bail!("no active key with id {id}");
            }
        }
    }
    Ok(())
}

async fn webhooks_command(
    db: &Database,
    config: &Config,
    command: WebhooksCommand,
) -> anyhow::Result<()> {
    match command {
        WebhooksCommand::AddSource { name } => {
            let secret = crate::webhooks::add_source(&db.pool, &config.secrets()?, &name)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("created webhook source {name}; deliver to /webhooks/{name}, signed with:");
            println!("{secret}");
        }
        WebhooksCommand::Parked | WebhooksCommand::DeadLetters => {
            let dead = matches!(command, WebhooksCommand::DeadLetters);
            let rows = crate::webhooks::list_parked(&db.pool, dead, None, 500).await?;
            println!(
                "{:<36}  {:<12}  {:<14}  {:<36}  {:>8}  received",
                "id", "source", "type", "enrollment", "attempts"
            );
            for r in &rows {
                println!(
                    "{:<36}  {:<12}  {:<14}  {:<36}  {:>8}  {}",
                    r.id,
                    r.source,
                    r.kind,
                    r.enrollment_id,
                    r.attempts,
                    r.received_at.format("%Y-%m-%d %H:%M:%S")
                );
            }
            println!(
                "{} {}",
                rows.len(),
                if dead { "dead letters" } else { "parked" }
            );
        }
    }
    Ok(())
}

async fn import_contacts(
    db: &Database,
    config: &Config,
    file: &std::path::Path,
    mode: crate::contacts::ImportMode,
) -> anyhow::Result<()> {
    use crate::contacts::{self, ImportOutcome};
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let is_json = match file.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("json") => true,
        Some(e) if e.eq_ignore_ascii_case("csv") => false,
        _ => bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'['),
    };
    let parsed = if is_json {
        contacts::rows_from_json(&bytes)
    } else {
        contacts::rows_from_csv(&bytes)
    };
    let rows = parsed.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let bar = indicatif::ProgressBar::new(rows.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})",
        )?
        .progress_chars("=> "),
    );
    bar.set_message("validating");
    let state = AppState::new(db.pool.clone())
        .with_store(Store::new(config.snapshot_every))
        .with_secrets(config.secrets()?);
    let metadata = crate::store::Metadata {
        actor: Some("cli".into()),
        causation_id: Some(format!("import:{}", file.display())),
        ..Default::default()
    };
    let progress = |done: usize| {
        bar.set_position(done as u64);
        if done as u64 == bar.length().unwrap_or(0) {
            bar.set_message("writing");
        }
    };
    let outcome = contacts::import(&state, rows, mode, None, metadata, &progress)
        .await
        .map_err(|e| anyhow::anyhow!("import failed: {e}"))?;
    bar.finish_and_clear();
    let ImportOutcome::Done { report, written } = outcome else {
        anyhow::bail!("unexpected replay without an idempotency key");
    };
    println!(
        "received {}  created {}  updated {}  unchanged {}  failed {}",
        report.received, report.created, report.updated, report.unchanged, report.failed
    );
    for e in &report.errors {
        println!(
            "row {:>6}  {}  {}",
            e.row,
            e.email.as_deref().unwrap_or("-"),
            e.message
        );
    }
    if !written {
        anyhow::bail!(
            "atomic import: {} invalid rows, nothing was written",
            report.failed
        );
    }
    if let Some(p) = &report.position {
        println!("position {p}");
    }
    Ok(())
}

async fn projections_command(db: &Database, command: ProjectionsCommand) -> anyhow::Result<()> {
    match command {
        ProjectionsCommand::Status { format } => {
            let mut conn = db.pool.acquire().await?;
            let all = projections::status::all(&mut conn).await?;
            match format {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&all)?),
                OutputFormat::Table => {
                    println!(
                        "{:<20}  {:<8}  {:<24}  {:>8}  held by / error",
                        "projection", "state", "checkpoint", "behind"
                    );
                    for p in all {
                        let detail = match (&p.failed_error, &p.held_by) {
                            (Some(e), _) => format!(
                                "stopped at position {}: {e}",
                                p.failed_position.unwrap_or_default()
                            ),
                            (None, Some(h)) => h.clone(),
                            (None, None) => "-".into(),
                        };
                        println!(
                            "{:<20}  {:<8}  {:<24}  {:>8}  {}",
                            p.name,
                            p.state,
                            p.checkpoint.to_string(),
                            p.behind,
                            detail
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

async fn analytics_command(db: &Database, command: AnalyticsCommand) -> anyhow::Result<()> {
    use crate::http::analytics::{self, CostsParams};
    match command {
        AnalyticsCommand::Costs {
            days,
            group_by,
            format,
        } => {
            // The read model moves only while a projection runner runs: catch it up first,
            // so that the report includes every cost committed before the command.
            let wait = std::time::Duration::from_secs(30);
            if !analytics::catch_up_costs(&db.pool, wait).await? {
                eprintln!(
                    "warning: the costs read model is still catching up; recent costs may be missing"
                );
            }
            let mut conn = db.pool.acquire().await?;
            let params = CostsParams { days, group_by };
            let report =
                analytics::cost_report(&mut conn, params, chrono::Utc::now().date_naive()).await?;
            match format {
                ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                ReportFormat::Table => print!("{}", report.to_table()),
                ReportFormat::Csv => print!("{}", report.to_csv()),
            }
        }
    }
    Ok(())
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
    match auth::ensure_first_admin_key(&db.pool, &config.data_dir).await {
        Ok(Some(path)) => println!(
            "no API key existed: an admin key was written to {}",
            path.display()
        ),
        Ok(None) => {}
        Err(e) => {
            db.close().await?;
            return Err(e).context("creating the first admin key");
        }
    }
    let state = AppState::new(db.pool.clone())
        .with_store(Store::new(config.snapshot_every))
        .with_secrets(config.secrets()?);
    let workers = crate::workers::start(&state);
    tracing::info!(%addr, "leadledger listening");
    println!("leadledger listening on http://{addr}");

    let result = http::serve(
        listener,
        http::router(state),
        http::shutdown_signal(),
        serve.shutdown_grace(),
    )
    .await;
    tracing::info!("HTTP server stopped; stopping background workers");
    workers.stop().await;
    tracing::info!("closing the database");
    db.close().await.context("closing the database")?;
    tracing::info!("stopped");
    result.context("serving HTTP")
}
