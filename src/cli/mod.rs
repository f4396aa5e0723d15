//! The command line (`leadledger <command>`): parsing and dispatch; reports are shown by
//! [`render`]. Every command works whether or not `serve` runs on the same data: they
//! share the embedded PostgreSQL.

pub mod render;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::app::keys::{self, Scope};
use crate::app::{App, Limits};
use crate::config::{Config, ServeConfig};
use crate::db::Database;
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
    /// More log lines on stderr: `-v` info, `-vv` debug (`serve` logs info anyway;
    /// `RUST_LOG`, when set, decides instead).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
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
    /// Outbound event subscriptions.
    Subscriptions {
        #[command(subcommand)]
        command: SubscriptionsCommand,
    },
    /// Contacts.
    Contacts {
        #[command(subcommand)]
        command: ContactsCommand,
    },
    /// The suppression list.
    Suppressions {
        #[command(subcommand)]
        command: SuppressionsCommand,
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
    /// Write a consistent backup of the database into DEST (a new or empty directory),
    /// safe while `serve` runs: a `pg_dump` in one snapshot and a manifest of what it holds.
    Backup {
        dest: std::path::PathBuf,
        /// Put the secret key (which seals webhook-source secrets) into the backup too.
        /// Without it, keep the key safe yourself: the backup cannot open those secrets.
        #[arg(long)]
        include_secret_key: bool,
    },
    /// Restore a backup into a new data directory (no DATABASE_URL) or an empty database
    /// (DATABASE_URL), and check the restored event log against the backup's manifest.
    Restore { src: std::path::PathBuf },
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
    /// Create a source. For kinds whose credential the server makes, prints it alone on
    /// the last line (`user:password` for postmark; it is not shown again).
    AddSource {
        name: String,
        /// standard, sendgrid, mailgun, postmark, instantly, smartlead or custom.
        #[arg(long, default_value = "standard")]
        kind: String,
        /// sendgrid: the verification key as SendGrid shows it.
        #[arg(long)]
        public_key: Option<String>,
        /// mailgun: the HTTP webhook signing key.
        #[arg(long)]
        signing_key: Option<String>,
        /// custom: a file holding the mapping (JSON).
        #[arg(long)]
        mapping: Option<std::path::PathBuf>,
    },
    /// Events waiting for their enrollment.
    Parked,
    /// Events given up on.
    DeadLetters,
}

#[derive(Debug, Subcommand)]
pub enum SuppressionsCommand {
    /// Suppressed addresses, newest first (an email shows only while its contact exists).
    List {
        /// Only this reason: manual, erased, bounced, complained, unsubscribed,
        /// consent_withdrawn.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Suppress an address by hand.
    Add { email: String },
    /// Lift the suppression of an address.
    Remove { email: String },
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionsCommand {
    /// Subscribe URL to events from now on; prints the signing secret alone on the last
    /// line (it is not shown again).
    Create {
        url: String,
        /// `*` (default), `<aggregate>.*` or an event type; repeat for several.
        #[arg(long = "event-type")]
        event_types: Vec<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Subscriptions with their status, position, backlog and breaker.
    List,
    /// One subscription with its delivery state, as JSON.
    Show { id: uuid::Uuid },
    /// Change the URL or the event types.
    Update {
        id: uuid::Uuid,
        #[arg(long)]
        url: Option<String>,
        #[arg(long = "event-type")]
        event_types: Vec<String>,
    },
    /// Stop delivering (the backlog waits).
    Pause { id: uuid::Uuid },
    /// Deliver again from the checkpoint (also after `disabled`).
    Resume { id: uuid::Uuid },
    /// Delete the subscription and its delivery log.
    Delete { id: uuid::Uuid },
    /// Issue a new secret, printed alone on the last line; the old one keeps signing for
    /// 24 hours.
    RotateSecret { id: uuid::Uuid },
    /// Deliver again from a position (a position token, or an event's number; 0: all).
    Replay {
        id: uuid::Uuid,
        #[arg(long = "from")]
        from_position: String,
    },
    /// The latest delivery attempts, newest first.
    Deliveries {
        id: uuid::Uuid,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=500))]
        limit: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum ContactsCommand {
    /// Erase a contact: destroy its personal data (crypto-shredding) and suppress its email.
    Erase { id: uuid::Uuid },
    /// Encrypt the contact events stored in the clear by an earlier release, to the end
    /// (`serve` does it too, in the background). Safe to interrupt and run again.
    Encrypt {
        /// Events per transaction.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        batch_size: i64,
    },
    /// Import contacts from a CSV file (header row of field names) or a JSON array.
    Import {
        file: std::path::PathBuf,
        #[arg(long, value_enum, default_value = "partial")]
        mode: crate::app::contacts::ImportMode,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Each projection's checkpoint, how far behind it is, its state and who runs it.
    Status {
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Build projections anew from the start of the event log into new tables, catch up
    /// with events written meanwhile, then swap the new tables in at once. Safe while the
    /// service runs; an interrupted rebuild leaves the live tables as they were, and
    /// running it again resumes.
    Rebuild {
        /// Projections to rebuild (see `projections status`).
        #[arg(required_unless_present_any = ["all", "discard"], conflicts_with = "all")]
        names: Vec<String>,
        /// Rebuild every projection.
        #[arg(long)]
        all: bool,
        /// Compare the rebuilt tables with the live ones row by row before swapping; on any
        /// difference, print every one, keep the live tables and exit with status 1.
        #[arg(long)]
        verify: bool,
        /// Events per batch.
        #[arg(long, default_value_t = projections::rebuild::DEFAULT_BATCH_SIZE, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        batch_size: i64,
        /// Drop an unfinished rebuild instead of resuming it, then exit.
        #[arg(long, conflicts_with_all = ["names", "all", "verify"])]
        discard: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum AnalyticsCommand {
    /// A campaign's milestones per UTC day, as
    /// `GET /v1/analytics/campaigns/{id}/timeseries` reports them.
    Campaign {
        id: uuid::Uuid,
        /// UTC days back, today included: 1..=365.
        #[arg(long, default_value = "30", value_parser = crate::app::analytics::parse_days)]
        days: u16,
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
    },
    /// Totals, as `GET /v1/analytics/dashboard` reports them.
    Dashboard {
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
    },
    /// Costs of every budget (spends and captured reservations), as
    /// `GET /v1/analytics/costs` reports them.
    Costs {
        /// UTC days back, today included: 1..=365.
        #[arg(long, default_value = "30", value_parser = crate::app::analytics::parse_days)]
        days: u16,
        /// day | model | category | budget
        #[arg(long, default_value = "day", value_parser = crate::app::analytics::parse_group_by)]
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

/// Entry point of the binary. An error is printed as its chain of causes on one line
/// (`error: opening the database: …`), never with a backtrace: the errors a user meets
/// (a name taken, a file missing) are messages, not crashes.
pub fn main() -> std::process::ExitCode {
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let verbosity = match (&cli.command, cli.verbose) {
        (_, 2..) => telemetry::Verbosity::Debug,
        (Command::Serve(_), _) | (_, 1) => telemetry::Verbosity::Info,
        _ => telemetry::Verbosity::Quiet,
    };
    telemetry::init_with(cli.config.log_format, verbosity);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
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
        Command::Subscriptions { command } => {
            with_migrated_db(&config, async |db| {
                subscriptions_command(db, &config, command).await
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
        Command::Contacts {
            command: ContactsCommand::Erase { id },
        } => with_migrated_db(&config, async |db| erase_contact(db, &config, id).await).await,
        Command::Contacts {
            command: ContactsCommand::Encrypt { batch_size },
        } => {
            with_migrated_db(&config, async |db| {
                let report = |done: crate::app::privacy::Encrypted| {
                    eprintln!(
                        "encrypted {} events, redacted {}, snapshots dropped {}",
                        done.events, done.redacted, done.snapshots
                    );
                };
                let done = crate::app::privacy::encrypt_plaintext(&db.pool, batch_size, &report)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                println!(
                    "done: {} events encrypted, {} redacted (erased contacts), {} snapshots \
                 dropped, {} stored replies encrypted",
                    done.events, done.redacted, done.snapshots, done.records
                );
                Ok(())
            })
            .await
        }
        Command::Suppressions { command } => {
            with_migrated_db(&config, async |db| {
                suppressions_command(db, &config, command).await
            })
            .await
        }
        Command::Projections { command } => {
            with_migrated_db(&config, async |db| projections_command(db, command).await).await
        }
        Command::Analytics { command } => {
            with_migrated_db(&config, async |db| analytics_command(db, command).await).await
        }
        Command::Backup {
            dest,
            include_secret_key,
        } => backup(&config, &dest, include_secret_key).await,
        Command::Restore { src } => restore(&config, &src).await,
    }
}

async fn backup(
    config: &Config,
    dest: &std::path::Path,
    include_secret_key: bool,
) -> anyhow::Result<()> {
    let db = Database::open(config)
        .await
        .context("opening the database")?;
    let result = crate::backup::backup(config, &db.url, dest, include_secret_key).await;
    db.close().await?;
    let report = result.context("writing the backup")?;
    println!(
        "backup written to {}: {} events, {} bytes, at {}",
        report.dir.display(),
        report.manifest.events,
        report.bytes,
        report.manifest.created_at.to_rfc3339()
    );
    if !include_secret_key {
        eprintln!(
            "note: the secret key is not in this backup; keep it safe apart \
             (LEADLEDGER_SECRET_KEY, or {}): without it a restored service cannot open \
             webhook-source secrets. `--include-secret-key` puts it in the backup.",
            config.data_dir.join("secret.key").display()
        );
    }
    Ok(())
}

async fn restore(config: &Config, src: &std::path::Path) -> anyhow::Result<()> {
    use crate::backup::KeyOutcome;
    let report = crate::backup::restore(config, src)
        .await
        .context("restoring the backup")?;
    println!(
        "restored {} events (backup of {}) into {}",
        report.manifest.events,
        report.manifest.created_at.to_rfc3339(),
        report.target
    );
    match report.key {
        KeyOutcome::Written(path) => println!("secret key written to {}", path.display()),
        KeyOutcome::AlreadyThere(path) => println!("secret key already in {}", path.display()),
        KeyOutcome::FromEnvironment => println!(
            "the backup's secret key was not written: LEADLEDGER_SECRET_KEY is set, and must \
             be the backup's key"
        ),
        KeyOutcome::NotInBackup => eprintln!(
            "note: the backup holds no secret key; give this service the source's key \
             (LEADLEDGER_SECRET_KEY, or {}) or webhook-source secrets cannot be opened",
            config.data_dir.join("secret.key").display()
        ),
    }
    Ok(())
}

/// Opens and migrates the database, runs `f`, and closes the database whatever `f` returned.
async fn with_migrated_db<F>(config: &Config, f: F) -> anyhow::Result<()>
where
    F: AsyncFnOnce(&Database) -> anyhow::Result<()>,
{
    // Every command may read contacts (a rebuild does): they need the key of their data.
    projections::pii::install(
        config
            .secrets()?
            .derive(crate::app::privacy::DATA_KEYS_PURPOSE),
    );
    let db = Database::open(config)
        .await
        .context("opening the database")?;
    let result = match db.migrate().await.context("applying migrations") {
        Ok(()) => {
            tracing::info!(
                latest = crate::db::latest_migration(),
                "database open, migrations applied"
            );
            f(&db).await
        }
        Err(e) => Err(e),
    };
    db.close().await?;
    result
}

async fn keys(db: &Database, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create { name, scope } => {
            let (id, key) = keys::create_key(&db.pool, &name, scope).await?;
            println!("created {scope} key {id} ({name}); it is shown once:");
            println!("{key}");
        }
        KeysCommand::List => {
            println!(
                "{:<36}  {:<6}  {:<10}  {:<20}  {:<8}  name",
                "id", "scope", "prefix", "created", "status"
            );
            for k in keys::list_keys(&db.pool).await? {
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
            if keys::revoke_key(&db.pool, id).await? {
                println!("revoked {id}");
            } else {
                anyhow::bail!("no active key with id {id}");
            }
        }
    }
    Ok(())
}

/// An error of the app layer as one line, field errors included.
fn refusal_text(e: &crate::app::error::AppError) -> String {
    match e {
        crate::app::error::AppError::Unprocessable { detail, errors } => {
            let fields: Vec<String> = errors
                .iter()
                .map(|f| format!("{}: {}", f.field, f.message))
                .collect();
            format!("{detail}: {}", fields.join("; "))
        }
        other => other.to_string(),
    }
}

async fn webhooks_command(
    db: &Database,
    config: &Config,
    command: WebhooksCommand,
) -> anyhow::Result<()> {
    match command {
        WebhooksCommand::AddSource {
            name,
            kind,
            public_key,
            signing_key,
            mapping,
        } => {
            let kind = crate::providers::SourceKind::parse(&kind).ok_or_else(|| {
                anyhow::anyhow!(
                    "--kind must be one of standard, sendgrid, mailgun, postmark, instantly, smartlead, custom"
                )
            })?;
            let mapping = match mapping {
                Some(path) => Some(
                    serde_json::from_slice(
                        &std::fs::read(&path)
                            .with_context(|| format!("reading {}", path.display()))?,
                    )
                    .with_context(|| format!("{} is not JSON", path.display()))?,
                ),
                None => None,
            };
            let new = crate::app::sources::NewSource {
                name: name.clone(),
                kind,
                public_key,
                signing_key,
                mapping,
            };
            let mut conn = db.pool.acquire().await?;
            let shown = crate::app::sources::add_source(&mut conn, &config.secrets()?, &new)
                .await
                .map_err(|e| anyhow::anyhow!("{}", refusal_text(&e)))?;
            let text = |k: &str| shown.get(k).and_then(|v| v.as_str()).unwrap_or_default();
            let (how, credential) = match kind {
                crate::providers::SourceKind::Standard => {
                    ("signed with", text("secret").to_string())
                }
                crate::providers::SourceKind::Postmark => (
                    "with HTTP Basic credentials (user:password)",
                    format!("{}:{}", text("username"), text("password")),
                ),
                crate::providers::SourceKind::Sendgrid | crate::providers::SourceKind::Mailgun => {
                    println!(
                        "created {kind} webhook source {name}; deliver to /webhooks/{name}, \
                         signed with the key given"
                    );
                    return Ok(());
                }
                _ => (
                    "with ?token= (or Authorization: Bearer)",
                    text("token").to_string(),
                ),
            };
            println!("created {kind} webhook source {name}; deliver to /webhooks/{name}, {how}:");
            println!("{credential}");
        }
        WebhooksCommand::Parked | WebhooksCommand::DeadLetters => {
            let dead = matches!(command, WebhooksCommand::DeadLetters);
            let rows = crate::app::webhooks::list_parked(&db.pool, dead, None, 500).await?;
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

async fn subscriptions_command(
    db: &Database,
    config: &Config,
    command: SubscriptionsCommand,
) -> anyhow::Result<()> {
    use crate::app::command::Answer;
    use crate::app::subscriptions as subs;
    let state = App::build(db.pool.clone(), config, Limits::default())?;
    let context = crate::app::command::CommandContext {
        actor: Some("cli".into()),
        ..Default::default()
    };
    let failed = |e: crate::app::error::AppError| match e {
        crate::app::error::AppError::Unprocessable { errors, detail } if !errors.is_empty() => {
            let fields: Vec<String> = errors
                .iter()
                .map(|f| format!("{}: {}", f.field, f.message))
                .collect();
            anyhow::anyhow!(
                "{}",
                if fields.is_empty() {
                    detail
                } else {
                    fields.join("; ")
                }
            )
        }
        other => anyhow::anyhow!("{other}"),
    };
    let body = |answer: Answer| -> serde_json::Value {
        match answer {
            Answer::Fresh(reply) => reply.body,
            Answer::Replayed(recorded) => {
                serde_json::from_slice(&recorded.body).unwrap_or_default()
            }
        }
    };
    let status = |id, status: &str| {
        let change = subs::SubscriptionChange {
            status: Some(status.into()),
            ..Default::default()
        };
        subs::update(&state, &context, id, change)
    };
    match command {
        SubscriptionsCommand::Create {
            url,
            event_types,
            description,
        } => {
            let input = subs::NewSubscription {
                url,
                event_types: (!event_types.is_empty()).then_some(event_types),
                description,
            };
            let created = body(
                subs::create(&state, &context, input)
                    .await
                    .map_err(failed)?,
            );
            println!(
                "created subscription {} to {}; messages are signed with:",
                created["id"].as_str().unwrap_or_default(),
                created["url"].as_str().unwrap_or_default()
            );
            println!("{}", created["secret"].as_str().unwrap_or_default());
        }
        SubscriptionsCommand::List => {
            println!(
                "{:<36}  {:<8}  {:<9}  {:>7}  {:<24}  url",
                "id", "status", "breaker", "backlog", "position"
            );
            let mut after = None;
            loop {
                let page = subs::list(&state, after, 500).await.map_err(failed)?;
                for s in &page {
                    println!(
                        "{:<36}  {:<8}  {:<9}  {:>7}  {:<24}  {}",
                        s.id, s.status, s.breaker, s.backlog, s.position, s.url
                    );
                }
                match page.last() {
                    Some(last) if page.len() == 500 => after = Some(last.id),
                    _ => break,
                }
            }
        }
        SubscriptionsCommand::Show { id } => {
            let s = subs::get(&state, id).await.map_err(failed)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
        SubscriptionsCommand::Update {
            id,
            url,
            event_types,
        } => {
            let change = subs::SubscriptionChange {
                url,
                event_types: (!event_types.is_empty()).then_some(event_types),
                ..Default::default()
            };
            let updated = body(
                subs::update(&state, &context, id, change)
                    .await
                    .map_err(failed)?,
            );
            println!("{}", serde_json::to_string_pretty(&updated)?);
        }
        SubscriptionsCommand::Pause { id } => {
            status(id, "paused").await.map_err(failed)?;
            println!("paused {id}");
        }
        SubscriptionsCommand::Resume { id } => {
            status(id, "active").await.map_err(failed)?;
            println!("resumed {id}");
        }
        SubscriptionsCommand::Delete { id } => {
            subs::delete(&state, &context, id).await.map_err(failed)?;
            println!("deleted {id}");
        }
        SubscriptionsCommand::RotateSecret { id } => {
            let rotated = body(
                subs::rotate_secret(&state, &context, id)
                    .await
                    .map_err(failed)?,
            );
            println!("new secret for {id} (the old one signs too for 24 hours):");
            println!("{}", rotated["secret"].as_str().unwrap_or_default());
        }
        SubscriptionsCommand::Replay { id, from_position } => {
            let from = match from_position.parse::<i64>() {
                Ok(n) => serde_json::json!(n),
                Err(_) => serde_json::json!(from_position),
            };
            let input = subs::Replay {
                from_position: from,
            };
            let replayed = body(
                subs::replay(&state, &context, id, input)
                    .await
                    .map_err(failed)?,
            );
            println!(
                "{id} delivers again from {}",
                replayed["from_position"].as_str().unwrap_or_default()
            );
        }
        SubscriptionsCommand::Deliveries { id, limit } => {
            println!(
                "{:<20}  {:<22}  {:>7}  {:>6}  {:>8}  {:<20}  error",
                "message", "type", "attempt", "status", "ms", "at"
            );
            for d in subs::deliveries(&state, id, None, limit)
                .await
                .map_err(failed)?
            {
                println!(
                    "{:<20}  {:<22}  {:>7}  {:>6}  {:>8}  {:<20}  {}",
                    d.message_id,
                    d.event_type,
                    d.attempt,
                    d.status_code
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".into()),
                    d.latency_ms,
                    d.attempted_at.format("%Y-%m-%d %H:%M:%S"),
                    d.error.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// `contacts import`: a file of any size, written in batches of
/// [`MAX_IMPORT_ROWS`](crate::app::contacts::MAX_IMPORT_ROWS) rows, each batch its own
/// transaction (as one `POST /v1/contacts/import` is), under one progress bar, with one
/// report summing them. `--mode atomic` is one transaction, so it takes one batch at most
/// and refuses a larger file before writing anything.
async fn import_contacts(
    db: &Database,
    config: &Config,
    file: &std::path::Path,
    mode: crate::app::contacts::ImportMode,
) -> anyhow::Result<()> {
    use crate::app::contacts::{self, ImportMode, ImportOutcome, ImportReport, MAX_IMPORT_ROWS};
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let is_json = match file.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("json") => true,
        Some(e) if e.eq_ignore_ascii_case("csv") => false,
        _ => bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'['),
    };
    let parsed = if is_json {
        contacts::rows_from_json_up_to(&bytes, usize::MAX)
    } else {
        contacts::rows_from_csv_up_to(&bytes, usize::MAX)
    };
    let rows = parsed.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    if mode == ImportMode::Atomic && rows.len() > MAX_IMPORT_ROWS {
        anyhow::bail!(
            "{}: {} rows, but an atomic import is one transaction of at most {MAX_IMPORT_ROWS} \
             rows; nothing was written (split the file, or use --mode partial, which writes \
             batches of {MAX_IMPORT_ROWS})",
            file.display(),
            rows.len()
        );
    }
    let bar = indicatif::ProgressBar::new(rows.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})",
        )?
        .progress_chars("=> "),
    );
    bar.set_message("importing");
    let state = App::build(db.pool.clone(), config, Limits::default())?;
    let mut total = ImportReport::default();
    let mut rows = rows.into_iter().peekable();
    let mut done_before = 0usize;
    while rows.peek().is_some() {
        let batch: Vec<_> = rows.by_ref().take(MAX_IMPORT_ROWS).collect();
        let size = batch.len();
        let metadata = crate::store::Metadata {
            actor: Some("cli".into()),
            causation_id: Some(format!("import:{}", file.display())),
            ..Default::default()
        };
        let progress = |done: usize| bar.set_position((done_before + done) as u64);
        let outcome = contacts::import(&state, batch, mode, None, metadata, &progress)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "import failed after {} rows were written: {e}",
                    total.created + total.updated + total.unchanged
                )
            })?;
        let ImportOutcome::Done { report, written } = outcome else {
            anyhow::bail!("unexpected replay without an idempotency key");
        };
        total.received += report.received;
        total.created += report.created;
        total.updated += report.updated;
        total.unchanged += report.unchanged;
        total.failed += report.failed;
        total.errors.extend(report.errors);
        total.contacts.extend(report.contacts);
        total.position = report.position.or(total.position);
        done_before += size;
        // A server on this database learns of the rows now, not at its next poll.
        state.wakeup.flush(&db.pool).await?;
        if !written {
            bar.finish_and_clear();
            print_import_report(&total);
            anyhow::bail!(
                "atomic import: {} invalid rows, nothing was written",
                total.failed
            );
        }
    }
    bar.finish_and_clear();
    print_import_report(&total);
    if let Some(p) = &total.position {
        println!("position {p}");
    }
    Ok(())
}

async fn erase_contact(db: &Database, config: &Config, id: uuid::Uuid) -> anyhow::Result<()> {
    let state = App::build(db.pool.clone(), config, Limits::default())?;
    let context = crate::app::command::CommandContext {
        actor: Some("cli".into()),
        ..Default::default()
    };
    let answer = crate::app::privacy::erase(&state, &context, id)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let crate::app::command::Answer::Fresh(reply) = answer {
        println!(
            "contact {id} erased at {}",
            reply.body["erased_at"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

async fn suppressions_command(
    db: &Database,
    config: &Config,
    command: SuppressionsCommand,
) -> anyhow::Result<()> {
    use crate::app::suppressions;
    let state = App::build(db.pool.clone(), config, Limits::default())?;
    let fail = |e: crate::app::error::AppError| anyhow::anyhow!("{e}");
    match command {
        SuppressionsCommand::List { reason } => {
            println!(
                "{:<36}  {:<17}  {:<25}  email",
                "contact", "reason", "created"
            );
            let mut after = None;
            loop {
                let page = suppressions::list(&state, None, reason.as_deref(), after, 500)
                    .await
                    .map_err(fail)?;
                for s in &page {
                    println!(
                        "{:<36}  {:<17}  {:<25}  {}",
                        s.contact_id,
                        s.reason,
                        s.created_at.to_rfc3339(),
                        s.email.as_deref().unwrap_or("-")
                    );
                }
                match page.last() {
                    Some(last) if page.len() == 500 => {
                        after = Some((last.created_at, last.contact_id))
                    }
                    _ => break,
                }
            }
        }
        SuppressionsCommand::Add { email } => {
            let (entry, created) = suppressions::add(&state, &email, Some("manual"))
                .await
                .map_err(fail)?;
            let verb = if created {
                "suppressed"
            } else {
                "already suppressed"
            };
            println!("{verb}: contact {} ({})", entry.contact_id, entry.reason);
        }
        SuppressionsCommand::Remove { email } => {
            let metadata = crate::store::Metadata {
                actor: Some("cli".into()),
                ..Default::default()
            };
            if !suppressions::remove(&state, &email, &metadata)
                .await
                .map_err(fail)?
            {
                anyhow::bail!("this address is not suppressed");
            }
            println!("suppression removed");
        }
    }
    Ok(())
}

fn print_import_report(report: &crate::app::contacts::ImportReport) {
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
}

async fn projections_command(db: &Database, command: ProjectionsCommand) -> anyhow::Result<()> {
    match command {
        ProjectionsCommand::Rebuild { discard: true, .. } => {
            projections::rebuild::discard(&db.pool).await?;
            println!("no rebuild in progress now; the live tables are as they were");
        }
        ProjectionsCommand::Rebuild {
            names,
            all,
            verify,
            batch_size,
            discard: false,
        } => {
            rebuild(db, if all { Vec::new() } else { names }, verify, batch_size).await?;
        }
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
                    if let Some(r) = projections::status::rebuild(&mut conn).await? {
                        println!(
                            "rebuild of {} in progress or unfinished: {} events applied, at {}, \
                             started {}, last batch {} (run `projections rebuild` to resume, \
                             `--discard` to drop it)",
                            r.projections.join(", "),
                            r.events,
                            r.position,
                            r.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
                            r.updated_at.format("%Y-%m-%d %H:%M:%S UTC"),
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

async fn analytics_command(db: &Database, command: AnalyticsCommand) -> anyhow::Result<()> {
    use crate::app::analytics::{self, CostsParams};
    match command {
        AnalyticsCommand::Costs {
            days,
            group_by,
            format,
        } => {
            catch_up(db, &analytics::COSTS_READ_MODELS).await?;
            let mut conn = db.pool.acquire().await?;
            let params = CostsParams { days, group_by };
            let report =
                analytics::cost_report(&mut conn, params, chrono::Utc::now().date_naive()).await?;
            render::print(format, &report)?;
        }
        AnalyticsCommand::Campaign { id, days, format } => {
            catch_up(
                db,
                &[projections::campaigns::NAME, projections::enrollments::NAME],
            )
            .await?;
            let mut conn = db.pool.acquire().await?;
            let exists = projections::campaigns::exists(&mut conn, id).await?;
            if !exists {
                anyhow::bail!("no campaign with id {id}");
            }
            let report = analytics::campaign_timeseries(
                &mut conn,
                id,
                days,
                chrono::Utc::now().date_naive(),
            )
            .await?;
            render::print(format, &report)?;
        }
        AnalyticsCommand::Dashboard { format } => {
            catch_up(db, &analytics::DASHBOARD_READ_MODELS).await?;
            let mut conn = db.pool.acquire().await?;
            let report =
                analytics::dashboard_report(&mut conn, chrono::Utc::now().date_naive()).await?;
            render::print(format, &report)?;
        }
    }
    Ok(())
}

/// Read models move only while a projection runner runs: catch them up first, so that a
/// report includes everything committed before the command.
async fn catch_up(db: &Database, names: &[&str]) -> anyhow::Result<()> {
    let wait = std::time::Duration::from_secs(30);
    if !crate::app::analytics::catch_up(&db.pool, names, wait).await? {
        eprintln!("warning: the read models are still catching up; recent writes may be missing");
    }
    Ok(())
}

/// `projections rebuild`: a progress bar on stderr, differences and the outcome on stdout.
async fn rebuild(
    db: &Database,
    names: Vec<String>,
    verify: bool,
    batch_size: i64,
) -> anyhow::Result<()> {
    use projections::rebuild::{self, Options};
    let selected = rebuild::select(&names)?;
    let options = Options {
        batch_size,
        verify,
        ..Options::default()
    };
    let mut observer = RebuildProgress::new();
    let outcome = tokio::select! {
        outcome = rebuild::rebuild(&db.pool, &selected, &options, &mut observer) => outcome,
        _ = tokio::signal::ctrl_c() => {
            observer.bar.abandon_with_message("interrupted");
            eprintln!("interrupted: the live tables are as they were; run the command again to resume");
            std::process::exit(130);
        }
    };
    let report = match outcome {
        Ok(report) => report,
        Err(e) => {
            observer.bar.abandon_with_message("failed");
            return Err(e.into());
        }
    };
    observer.bar.finish_and_clear();
    let rate = report.events as f64 / report.seconds.max(1e-9);
    let names = report.projections.join(", ");
    if report.swapped {
        println!(
            "rebuilt {names}: {} events{} in {:.1} s ({rate:.0} events/s), swapped in at position {}{}",
            report.events,
            if report.resumed { " (resumed)" } else { "" },
            report.seconds,
            report.position,
            if verify {
                "; verified: no differences"
            } else {
                ""
            },
        );
        Ok(())
    } else {
        println!(
            "{} rows differ between the live and the rebuilt tables of {names} at position {}; \
             the live tables were kept",
            report.differences, report.position
        );
        std::process::exit(1);
    }
}

struct RebuildProgress {
    bar: indicatif::ProgressBar,
}

impl RebuildProgress {
    fn new() -> Self {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:12} [{bar:40}] {human_pos}/{human_len} events  {per_sec}  ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Self { bar }
    }
}

impl projections::rebuild::Observer for RebuildProgress {
    fn started(&mut self, already_applied: u64, remaining: u64) {
        // Batches applied before the count came in are part of `remaining`.
        let applied = self.bar.position();
        self.bar
            .set_length(already_applied + remaining.max(applied));
        self.bar.set_position(already_applied + applied);
        self.bar.reset_eta();
        if already_applied > 0 {
            self.bar
                .println(format!("resuming after {already_applied} events"));
        }
    }
    fn applied(&mut self, events: u64) {
        if self.bar.position() + events > self.bar.length().unwrap_or(0) {
            self.bar.set_length(self.bar.position() + events);
        }
        self.bar.inc(events);
    }
    fn phase(&mut self, phase: &str) {
        self.bar.set_message(phase.to_string());
    }
    fn difference(&mut self, d: &projections::rebuild::Difference) {
        let show = |v: &Option<serde_json::Value>| {
            v.as_ref()
                .map_or("(missing)".to_string(), |v| v.to_string())
        };
        self.bar.suspend(|| {
            println!(
                "{} {}\n  live:    {}\n  rebuilt: {}",
                d.table,
                d.key,
                show(&d.live),
                show(&d.rebuilt)
            )
        });
    }
}

async fn run_serve(config: &Config, serve: &ServeConfig) -> anyhow::Result<()> {
    let replica_options = match serve.read_database_url.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(url) => Some(
            url.parse::<sqlx::postgres::PgConnectOptions>()
                .context("LEADLEDGER_READ_DATABASE_URL is not a valid PostgreSQL URL")?,
        ),
    };
    let db = Database::open(config)
        .await
        .context("opening the database")?;
    if let Err(e) = db.migrate().await {
        db.close().await?;
        return Err(e).context("applying migrations");
    }
    // Before anyone can reach the server: a stop asked for from then on is handled.
    let shutdown = shutdown_signal();
    let listener = match TcpListener::bind(serve.addr).await {
        Ok(l) => l,
        Err(e) => {
            db.close().await?;
            return Err(e).with_context(|| format!("listening on {}", serve.addr));
        }
    };
    let addr = listener.local_addr()?;
    match keys::ensure_first_admin_key(&db.pool, &config.data_dir).await {
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
    let mut state = App::build(
        db.pool.clone(),
        config,
        Limits::new(serve.request_timeout(), serve.large_body_concurrency),
    )?;
    if let Err(e) = crate::app::privacy::check_secret_key(&db.pool).await {
        db.close().await?;
        return Err(e).context("checking the secret key against the stored contact data keys");
    }
    if let Some(options) = replica_options {
        // Lazy: a replica that is down at start is the primary's load until it is back.
        let replica = crate::app::replica::pool_options(config.db_pool_size)
            .connect_lazy_with(options.application_name("leadledger-read"));
        state = state.with_replica(replica);
        tracing::info!("read-model queries go to the read replica when it is up");
    }
    let workers = crate::app::workers::start(&state);
    tracing::info!(%addr, "leadledger listening");
    println!("leadledger listening on http://{addr}");

    let result = crate::http::serve_with(
        listener,
        crate::http::router(state),
        shutdown,
        serve.serve_options(),
    )
    .await;
    tracing::info!("HTTP server stopped; stopping background workers");
    workers.stop().await;
    tracing::info!("closing the database");
    db.close().await.context("closing the database")?;
    tracing::info!("stopped");
    result.context("serving HTTP")
}

/// Resolves on Ctrl-C or SIGTERM: how the process is asked to stop, whatever it serves.
/// The handlers are installed when this is called, not when the future is first polled, so
/// a signal that comes as soon as the server answers is never met by the default action
/// (which would end the process without stopping its workers and database).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(interrupt) => {},
            () = wait(term) => {},
        }
    }
}
