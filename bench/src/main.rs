//! `leadledger-bench`: measures leadledger on this machine, end to end. It starts a private
//! PostgreSQL (the embedded one, in a temporary directory) and the real server in-process,
//! and drives it over HTTP like a client would.
//!
//! `cargo run --release -p leadledger-bench -- store` reports:
//! - command latency on an aggregate with 10 events and on one with 100,000 events;
//! - write-to-read-model lag (a write's commit to its projection's checkpoint) at a steady
//!   command rate.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aggregates::campaign::{Campaign, CampaignEvent, CampaignName};
use anyhow::Context;
use chrono::Utc;
use clap::{Parser, Subcommand};
use cqrs_es::Aggregate;
use leadledger::auth::{self, Scope};
use leadledger::embedded::{EmbeddedOptions, EmbeddedPostgres};
use leadledger::http::{self, AppState};
use leadledger::store::{Loaded, Metadata, Position, Store};
use leadledger::workers;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "leadledger benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

mod import;
mod rebuild;
mod spends;
mod webhooks;

#[derive(Subcommand)]
enum Bench {
    /// Webhook ingestion (batches of 1 and 100) and 100,000 parked events.
    Webhooks {
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
    /// The rebuild of `rebuild`, run in a process of its own so its peak memory is its own.
    #[command(hide = true)]
    RebuildChild {
        #[arg(long)]
        url: String,
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
    pool: PgPool,
    client: reqwest::Client,
    stop: CancellationToken,
    workers: workers::Workers,
    _pg: EmbeddedPostgres,
}

pub(crate) async fn start() -> anyhow::Result<Server> {
    let dir = std::env::temp_dir().join(format!("leadledger-bench-{}", std::process::id()));
    let pg = EmbeddedPostgres::start(&dir, &EmbeddedOptions::default())
        .await
        .context("starting PostgreSQL")?;
    pg.stop_and_remove_when_process_exits()?;
    let pool = leadledger::db::pool_options(40)
        .connect_with(pg.connect_options())
        .await?;
    leadledger::db::MIGRATOR.run(&pool).await?;
    let (_, key) = auth::create_key(&pool, "bench", Scope::Write).await?;
    let state = AppState::new(pool.clone());
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
        pool,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()?,
        stop,
        workers,
        _pg: pg,
    })
}

impl Server {
    async fn create_campaign(&self, name: &str) -> anyhow::Result<String> {
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

    async fn rename(&self, id: &str, name: &str) -> anyhow::Result<Value> {
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

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Appends `n` renames to a stream straight through the store, in large batches.
async fn grow(pool: &PgPool, store: &Store, id: &str, n: u64) -> anyhow::Result<()> {
    let mut left = n;
    while left > 0 {
        let batch = left.min(5_000);
        let mut tx = pool.begin().await?;
        let mut loaded: Loaded<Campaign> = store.load(&mut tx, id).await?;
        let events: Vec<CampaignEvent> = (0..batch)
            .map(|i| CampaignEvent::CampaignRenamed {
                name: CampaignName::parse(&format!("grown {}", left - i)).expect("valid name"),
                renamed_at: Utc::now(),
            })
            .collect();
        // The store expects the state to include the events already (see src/store.rs).
        for e in &events {
            loaded.aggregate.apply(e.clone());
        }
        store
            .append(&mut tx, &mut loaded, &events, &Metadata::default())
            .await?;
        tx.commit().await?;
        left -= batch;
    }
    Ok(())
}

async fn time_renames(server: &Server, id: &str, samples: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples {
        let start = Instant::now();
        server.rename(id, &format!("timed {i}")).await?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times)
}

async fn bench_store(
    long_stream: u64,
    samples: usize,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<()> {
    let server = start().await?;
    println!(
        "## Event store ({} cores)\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    // 1. Load cost: a command on a short stream and on a long one.
    let short = server.create_campaign("short").await?;
    for i in 0..9 {
        server.rename(&short, &format!("short {i}")).await?;
    }
    let long = server.create_campaign("long").await?;
    let started = Instant::now();
    grow(&server.pool, &Store::default(), &long, long_stream - 1).await?;
    let grown = Instant::now();
    eprintln!(
        "grew a stream to {long_stream} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Warm up both paths, then alternate so that both see the same machine conditions.
    time_renames(&server, &short, 20).await?;
    time_renames(&server, &long, 20).await?;
    let mut short_times = Vec::new();
    let mut long_times = Vec::new();
    for _ in 0..4 {
        short_times.extend(time_renames(&server, &short, samples / 4).await?);
        long_times.extend(time_renames(&server, &long, samples / 4).await?);
    }
    short_times.sort();
    long_times.sort();
    let (s50, s99) = (
        percentile(&short_times, 0.5),
        percentile(&short_times, 0.99),
    );
    let (l50, l99) = (percentile(&long_times, 0.5), percentile(&long_times, 0.99));
    println!(
        "### Command latency by stream length (PATCH /v1/campaigns/{{id}}, sequential, {samples} each)\n"
    );
    println!("| stream | p50 | p99 |");
    println!("|---|---|---|");
    println!("| ~10 events | {} | {} |", ms(s50), ms(s99));
    println!("| ~{long_stream} events | {} | {} |", ms(l50), ms(l99));
    println!(
        "\nratio long/short: p50 {:.2}×, p99 {:.2}× (target ≤ 1.5×)\n",
        l50.as_secs_f64() / s50.as_secs_f64(),
        l99.as_secs_f64() / s99.as_secs_f64()
    );

    // 2. Write-to-read-model lag at a steady rate, once the projection has caught up with
    // the long stream (applying it is a measure of its own: the incremental apply rate).
    let mut conn = server.pool.acquire().await?;
    let head: i64 = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(&mut *conn)
        .await?;
    loop {
        let at = projections::runner::checkpoint(&mut conn, "campaigns").await?;
        if at.position >= head {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(conn);
    let catch_up = grown.elapsed().as_secs_f64();
    println!(
        "The `campaigns` projection applied the {long_stream}-event stream within {catch_up:.1} s of its commit \
         (≥ {:.0} events/s incrementally, batches of 500, while the latency runs above shared the machine).\n",
        long_stream as f64 / catch_up
    );
    let campaigns: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..64 {
            ids.push(server.create_campaign(&format!("lag {i}")).await?);
        }
        ids
    };
    let pending: Arc<Mutex<BTreeMap<Position, Instant>>> = Arc::default();
    let lags: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let done = CancellationToken::new();
    let watcher = tokio::spawn(watch_checkpoints(
        server.pool.clone(),
        pending.clone(),
        lags.clone(),
        done.clone(),
    ));
    let server = Arc::new(server);
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..total {
        ticker.tick().await;
        let server = server.clone();
        let id = campaigns[i as usize % campaigns.len()].clone();
        let pending = pending.clone();
        tasks.push(tokio::spawn(async move {
            let body = server.rename(&id, &format!("lag write {i}")).await?;
            let committed = Instant::now();
            let position: Position = body["position"]
                .as_str()
                .context("position")?
                .parse()
                .map_err(|_| anyhow::anyhow!("bad position"))?;
            pending.lock().expect("lock").insert(position, committed);
            anyhow::Ok(())
        }));
    }
    let mut failures = 0;
    for t in tasks {
        if !matches!(t.await, Ok(Ok(()))) {
            failures += 1;
        }
    }
    let elapsed = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pending.lock().expect("lock").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done.cancel();
    let _ = watcher.await;
    let mut lags = lags.lock().expect("lock").clone();
    lags.sort();
    println!("### Write-to-read-model lag (`campaigns` projection)\n");
    println!(
        "{total} renames over {} campaigns at a target of {rate}/s: achieved {:.0}/s, {failures} failed, {} never seen.\n",
        campaigns.len(),
        total as f64 / elapsed.as_secs_f64(),
        pending.lock().expect("lock").len()
    );
    println!("| p50 | p90 | p99 | max |");
    println!("|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} |\n",
        ms(percentile(&lags, 0.5)),
        ms(percentile(&lags, 0.9)),
        ms(percentile(&lags, 0.99)),
        ms(lags.last().copied().unwrap_or_default())
    );
    println!(
        "(lag: from the client receiving the write's response to the projection committing a checkpoint at or past it; target p99 < 50 ms)"
    );

    let server = Arc::try_unwrap(server).map_err(|_| anyhow::anyhow!("server still shared"))?;
    server.stop.cancel();
    server.workers.stop().await;
    server.pool.close().await;
    Ok(())
}

/// Resolves pending writes as the projection's checkpoint passes them.
async fn watch_checkpoints(
    pool: PgPool,
    pending: Arc<Mutex<BTreeMap<Position, Instant>>>,
    lags: Arc<Mutex<Vec<Duration>>>,
    done: CancellationToken,
) -> anyhow::Result<()> {
    let mut listener = PgListener::connect_with(&pool).await?;
    listener
        .listen(projections::runner::CHECKPOINTS_CHANNEL)
        .await?;
    let mut conn = pool.acquire().await?;
    loop {
        tokio::select! {
            () = done.cancelled() => return Ok(()),
            n = listener.recv() => { n?; }
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        let checkpoint = projections::runner::checkpoint(&mut conn, "campaigns").await?;
        let now = Instant::now();
        let mut pending = pending.lock().expect("lock");
        let reached: Vec<Position> = pending.range(..=checkpoint).map(|(p, _)| *p).collect();
        let mut lags = lags.lock().expect("lock");
        for p in reached {
            if let Some(at) = pending.remove(&p) {
                lags.push(now.saturating_duration_since(at));
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Bench::Import { rows, runs } => import::run(rows, runs).await,
            Bench::Webhooks { seconds } => webhooks::run(seconds).await,
            Bench::Spends { clients, seconds } => spends::run(clients, seconds).await,
            Bench::Rebuild { events, samples } => rebuild::run(events, samples).await,
            Bench::RebuildChild { url } => rebuild::child(&url).await,
            Bench::Store {
                long_stream,
                samples,
                rate,
                seconds,
            } => bench_store(long_stream, samples, rate, seconds).await,
        }
    })
}
