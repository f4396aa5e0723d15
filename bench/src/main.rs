//! `leadledger-bench`: measures leadledger on this machine, end to end. It starts a private
//! PostgreSQL (the embedded one, in a temporary directory) and the real server in-process,
//! and drives it over HTTP like a client would.
//!
//! `all` runs every headline figure several times and reports medians, beside two yardsticks
//! on the same PostgreSQL server: the floor (the SQL of one command, run by `pgbench`) and a
//! peer (the same aggregate and command through plain cqrs-es with postgres-es). The other
//! subcommands are the detailed benchmarks of one area each; they share the measuring code
//! (`measure.rs`) and the workloads with `all`.

// The allocator the `leadledger` binary uses, so that figures measured here hold for it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use leadledger::app::keys::{self, Scope};
use leadledger::app::{App, Limits, workers};
use leadledger::embedded::{EmbeddedOptions, EmbeddedPostgres};
use leadledger::http;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Parser)]
#[command(about = "leadledger benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

mod all;
mod calibrate;
mod cluster;
mod console;
mod contacts;
mod cpu;
mod floor;
mod import;
mod measure;
mod peer;
mod privacy;
mod rebuild;
mod report;
mod spends;
mod store;
mod subscriptions;
mod webhooks;
mod wire;

#[derive(Subcommand)]
enum Bench {
    /// Every headline figure, as medians over several runs, with the floor (pgbench) and a
    /// peer (cqrs-es + postgres-es) on the same PostgreSQL server.
    All {
        /// Runs of every measurement; the report gives median, min and max.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// A smoke run: short measurements, one run (overrides --runs and --seconds).
        #[arg(long)]
        quick: bool,
        /// Seconds per throughput measurement (each after a warm-up of 1 s).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrent clients of the throughput measurements, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        clients: Vec<usize>,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Measure only the contact upserts with their floor and peer.
        #[arg(long)]
        upserts_only: bool,
        /// Stop the server's workers (projection runners, reactors, periodic sweeps) before
        /// the runs: the write path's share alone, read models not kept.
        #[arg(long, requires = "upserts_only")]
        without_workers: bool,
    },
    /// Contact upserts/s through a running load balancer (`scripts/cluster-bench`), with
    /// the read replica's largest lag seen in the processes' /metrics meanwhile.
    Cluster {
        /// The load balancer's URL.
        #[arg(long)]
        url: String,
        /// An API key with the write scope.
        #[arg(long)]
        key: String,
        #[arg(long, default_value_t = 32)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// The processes' /metrics URLs, comma-separated.
        #[arg(long, value_delimiter = ',')]
        metrics: Vec<String>,
        /// The row's name in the table printed.
        #[arg(long, default_value = "cluster")]
        label: String,
    },
    /// Webhook ingestion (batches of 1 and 100) and 100,000 parked events.
    Webhooks {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Provider sources: SendGrid batches of 100 and 1,000 and Mailgun single events,
    /// beside Standard Webhooks.
    Providers {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Contact import: 10,000 rows, new, updated and unchanged.
    Import {
        #[arg(long, default_value_t = 10_000)]
        rows: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Budgets: spend throughput and latency on one hot budget, by concurrent clients.
    Spends {
        /// Concurrent clients of each run, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        clients: Vec<usize>,
        /// How long each run lasts.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Projection rebuild events/s and peak memory at each log size, then campaign
    /// metrics and dashboard latency over the largest log.
    Rebuild {
        /// Log sizes (events) to rebuild at, comma-separated, ascending.
        #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
        events: Vec<u64>,
        /// Requests timed on each read route.
        #[arg(long, default_value_t = 2_000)]
        samples: usize,
    },
    /// Every web-console page's render time over a large log (signed in, one client).
    Console {
        /// Events in the log before the pages are timed.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Requests timed on each page.
        #[arg(long, default_value_t = 200)]
        samples: usize,
    },
    /// The rebuild of `rebuild`, run in a process of its own so its peak memory is its own.
    #[command(hide = true)]
    RebuildChild {
        #[arg(long)]
        url: String,
        /// The data directory whose secret key sealed the log's personal data.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Writes the log of `rebuild` into an existing database (migrated first), so that
    /// `rebuild-child` can be run over it again and again.
    #[command(hide = true)]
    RebuildLog {
        #[arg(long)]
        url: String,
        /// Where the secret key that seals personal data is kept (made if missing).
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
    },
    /// Personal data encryption: sealing cost, upserts, a 10,000-row import and loading a
    /// contact of 10,000 events.
    Privacy {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 10_000)]
        rows: usize,
    },
    /// Subscriptions: events/s delivered to a fast local receiver, and commit-to-delivery
    /// lag at a steady write rate.
    Subscriptions {
        /// Events written before the throughput measurement, then delivered by a replay.
        #[arg(long, default_value_t = 5_000)]
        events: usize,
        /// Events per second written for the lag measurement.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// How long the lag measurement writes.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Event store: load cost at 10 vs 100,000 events, and write-to-read-model lag.
    Store {
        /// Events in the long stream.
        #[arg(long, default_value_t = 100_000)]
        long_stream: u64,
        /// Commands timed on each stream.
        #[arg(long, default_value_t = 400)]
        samples: usize,
        /// Target command rate for the lag measurement.
        #[arg(long, default_value_t = 500)]
        rate: u64,
        /// How long the lag measurement runs.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

pub(crate) struct Server {
    address: String,
    key: String,
    /// The id of `key` (idempotency records belong to it).
    key_id: Uuid,
    pool: PgPool,
    client: reqwest::Client,
    stop: CancellationToken,
    workers: workers::Workers,
    pg: EmbeddedPostgres,
    /// The server's data directory (its secret key).
    app_dir: PathBuf,
}

pub(crate) async fn start() -> anyhow::Result<Server> {
    start_with(|_| {}).await
}

/// [`start`] with `configure` applied to the app before it serves (outbound settings).
pub(crate) async fn start_with(configure: impl FnOnce(&mut App)) -> anyhow::Result<Server> {
    // A cluster of its own for every server this process starts.
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("leadledger-bench-{}-{n}", std::process::id()));
    let pg = EmbeddedPostgres::start(&dir, &EmbeddedOptions::default())
        .await
        .context("starting PostgreSQL")?;
    pg.stop_and_remove_when_process_exits()?;
    let app_dir = dir.join("app");
    let pool = leadledger::db::pool_options(40)
        .connect_with(pg.connect_options())
        .await?;
    leadledger::db::MIGRATOR.run(&pool).await?;
    let (key_id, key) = keys::create_key(&pool, "bench", Scope::Write).await?;
    let mut state = App::build(pool.clone(), &bench_config(&app_dir), Limits::default())?;
    configure(&mut state);
    let workers = workers::start(&state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(http::serve(
        listener,
        http::router(state),
        async move { token.cancelled().await },
        Duration::from_secs(5),
    ));
    Ok(Server {
        address,
        key,
        key_id,
        pool,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()?,
        stop,
        workers,
        pg,
        app_dir,
    })
}

impl Server {
    /// A directory for the benchmark's own files, removed with the cluster at exit.
    pub(crate) fn scratch_dir(&self) -> PathBuf {
        self.pg.data_dir().join("bench")
    }

    pub(crate) async fn create_campaign(&self, name: &str) -> anyhow::Result<String> {
        let body: Value = self
            .client
            .post(format!("{}/v1/campaigns", self.address))
            .bearer_auth(&self.key)
            .json(&json!({"name": name}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(body["id"].as_str().context("id")?.to_string())
    }

    pub(crate) async fn rename(&self, id: &str, name: &str) -> anyhow::Result<Value> {
        Ok(self
            .client
            .patch(format!("{}/v1/campaigns/{id}", self.address))
            .bearer_auth(&self.key)
            .json(&json!({"name": name}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }
}

/// Stops the server started by [`start`]: no more requests, workers flushed, pool closed.
pub(crate) async fn stop(server: Arc<Server>) -> anyhow::Result<()> {
    let server = Arc::try_unwrap(server).map_err(|_| anyhow::anyhow!("server still shared"))?;
    server.stop.cancel();
    server.workers.stop().await;
    server.pool.close().await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Bench::Import { rows, runs } => import::run(rows, runs).await,
            Bench::Cluster {
                url,
                key,
                clients,
                seconds,
                metrics,
                label,
            } => cluster::run(url, key, clients, seconds, metrics, label).await,
            Bench::Privacy { seconds, rows } => privacy::run(seconds, rows).await,
            Bench::Webhooks { seconds } => webhooks::run(seconds).await,
            Bench::Providers { seconds } => webhooks::providers(seconds).await,
            Bench::Subscriptions {
                events,
                rate,
                seconds,
            } => subscriptions::run(events, rate, seconds).await,
            Bench::Spends { clients, seconds } => spends::run(clients, seconds).await,
            Bench::Rebuild { events, samples } => rebuild::run(events, samples).await,
            Bench::RebuildChild { url, data_dir } => rebuild::child(&url, &data_dir).await,
            Bench::RebuildLog {
                url,
                data_dir,
                events,
            } => rebuild::write_log(&url, &data_dir, events).await,
            Bench::Console { events, samples } => console::run(events, samples).await,
            Bench::Store {
                long_stream,
                samples,
                rate,
                seconds,
            } => store::run(long_stream, samples, rate, seconds).await,
            Bench::All {
                runs,
                quick,
                seconds,
                clients,
                json,
                upserts_only,
                without_workers,
            } => {
                let mut plan = if quick {
                    all::Plan::quick(clients)
                } else {
                    all::Plan::full(runs, seconds, clients)
                };
                plan.upserts_only = upserts_only;
                plan.without_workers = without_workers;
                all::run(plan, json).await
            }
        }
    })
}

/// The configuration a benchmark server runs with: every default, and a secret key kept in
/// the server's throw-away data directory.
fn bench_config(dir: &std::path::Path) -> leadledger::config::Config {
    leadledger::config::Config {
        database_url: None,
        data_dir: dir.to_path_buf(),
        log_format: leadledger::config::LogFormat::Pretty,
        db_pool_size: 40,
        snapshot_every: leadledger::store::DEFAULT_SNAPSHOT_EVERY,
        secret_key: None,
    }
}
