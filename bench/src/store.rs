//! `leadledger-bench store`: the event store's load cost on a stream of ~10 events and on
//! one of 100,000, and write-to-read-model lag (a write's response to its projection's
//! checkpoint) at a steady command rate.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aggregates::campaign::{Campaign, CampaignEvent, CampaignName};
use anyhow::Context;
use chrono::Utc;
use cqrs_es::Aggregate;
use leadledger::store::{Loaded, Metadata, Position, Store};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::measure::{cores, ms, percentile};
use crate::{Server, start};

/// A short and a long campaign stream to time commands and loads on.
pub struct Streams {
    pub short: String,
    pub long: String,
    pub long_events: u64,
}

/// Makes a campaign with 10 events and one with `long_events`, the long one written
/// straight through the store in large batches.
pub async fn prepare(server: &Server, long_events: u64) -> anyhow::Result<Streams> {
    let short = server.create_campaign("short").await?;
    for i in 0..9 {
        server.rename(&short, &format!("short {i}")).await?;
    }
    let long = server.create_campaign("long").await?;
    let started = Instant::now();
    grow(&server.pool, &Store::default(), &long, long_events - 1).await?;
    eprintln!(
        "grew a stream to {long_events} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Streams {
        short,
        long,
        long_events,
    })
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

/// Timings on the short and on the long stream, each sorted.
pub struct ShortLong {
    pub short: Vec<Duration>,
    pub long: Vec<Duration>,
}

impl ShortLong {
    /// Times `samples` operations on each stream, in alternating quarters after a warm-up of
    /// each, so that both see the same machine conditions.
    async fn alternate<F, Fut>(
        streams: &Streams,
        samples: usize,
        mut time: F,
    ) -> anyhow::Result<Self>
    where
        F: FnMut(String, usize) -> Fut,
        Fut: Future<Output = anyhow::Result<Vec<Duration>>>,
    {
        time(streams.short.clone(), 20).await?;
        time(streams.long.clone(), 20).await?;
        let mut short = Vec::new();
        let mut long = Vec::new();
        for _ in 0..4 {
            short.extend(time(streams.short.clone(), samples.div_ceil(4)).await?);
            long.extend(time(streams.long.clone(), samples.div_ceil(4)).await?);
        }
        short.sort_unstable();
        long.sort_unstable();
        Ok(Self { short, long })
    }

    pub fn ratio(&self, p: f64) -> f64 {
        percentile(&self.long, p).as_secs_f64()
            / percentile(&self.short, p).as_secs_f64().max(f64::EPSILON)
    }
}

/// Sequential `PATCH /v1/campaigns/{id}` over HTTP: load, handle, append, commit.
pub async fn command_latency(
    server: &Server,
    streams: &Streams,
    samples: usize,
) -> anyhow::Result<ShortLong> {
    ShortLong::alternate(streams, samples, |id, n| async move {
        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            let start = Instant::now();
            server.rename(&id, &format!("timed {i}")).await?;
            times.push(start.elapsed());
        }
        Ok(times)
    })
    .await
}

/// The load alone, in-process: `Store::load` (latest snapshot, then the events after it).
pub async fn load_latency(
    server: &Server,
    streams: &Streams,
    samples: usize,
) -> anyhow::Result<ShortLong> {
    let store = Store::default();
    ShortLong::alternate(streams, samples, |id, n| {
        let store = store.clone();
        async move {
            let mut conn = server.pool.acquire().await?;
            let mut times = Vec::with_capacity(n);
            for _ in 0..n {
                let start = Instant::now();
                let loaded: Loaded<Campaign> = store.load(&mut conn, &id).await?;
                times.push(start.elapsed());
                anyhow::ensure!(loaded.version > 0, "stream {id} is empty");
            }
            Ok(times)
        }
    })
    .await
}

/// Waits until projection `name` has applied every event written so far.
pub async fn wait_for_projection(server: &Server, name: &str) -> anyhow::Result<()> {
    let mut conn = server.pool.acquire().await?;
    // The last event in feed order, (transaction id, position): the highest position may
    // belong to an earlier transaction.
    let head: Option<(String, i64)> = sqlx::query_as(
        "SELECT transaction_id::text, position FROM events
         ORDER BY transaction_id DESC, position DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some((transaction_id, position)) = head else {
        return Ok(());
    };
    let head = Position {
        transaction_id: transaction_id.parse()?,
        position,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let at = projections::runner::checkpoint(&mut conn, name).await?;
        if at >= head {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "projection {name} did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to 2 minutes) until every projection has applied every event written so far,
/// so that a measurement starts with no backlog; says which did not.
pub async fn wait_for_all_projections(server: &Server) -> anyhow::Result<()> {
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM projection_checkpoints")
        .fetch_all(&server.pool)
        .await?;
    for name in names {
        if let Err(e) = wait_for_projection(server, &name).await {
            eprintln!("warning: {e}");
        }
    }
    Ok(())
}

/// Write-to-read-model lag at a steady command rate.
pub struct Lag {
    /// Per write, sorted.
    pub lags: Vec<Duration>,
    pub sent: u64,
    pub campaigns: usize,
    /// Commands per second achieved.
    pub achieved: f64,
    pub failures: usize,
    /// Writes the projection's checkpoint never reached within 10 s of the end.
    pub unseen: usize,
}

/// Renames over 64 campaigns at `rate` per second for `seconds` (up to that many in flight);
/// each write's lag runs from the client receiving its response to the `campaigns`
/// projection committing a checkpoint at or past its position (seen through the checkpoint
/// NOTIFY channel).
pub async fn lag(server: &Arc<Server>, rate: u64, seconds: f64) -> anyhow::Result<Lag> {
    wait_for_all_projections(server).await?;
    let mut campaigns = Vec::new();
    for i in 0..64 {
        campaigns.push(server.create_campaign(&format!("lag {i}")).await?);
    }
    let pending: Arc<Mutex<BTreeMap<Position, Instant>>> = Arc::default();
    let lags: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let done = CancellationToken::new();
    let watcher = tokio::spawn(watch_checkpoints(
        server.pool.clone(),
        pending.clone(),
        lags.clone(),
        done.clone(),
    ));
    let total = (rate as f64 * seconds).round() as u64;
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
    lags.sort_unstable();
    let unseen = pending.lock().expect("lock").len();
    Ok(Lag {
        lags,
        sent: total,
        campaigns: campaigns.len(),
        achieved: total as f64 / elapsed.as_secs_f64(),
        failures,
        unseen,
    })
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

pub async fn run(long_stream: u64, samples: usize, rate: u64, seconds: u64) -> anyhow::Result<()> {
    let server = Arc::new(start().await?);
    println!("## Event store ({} cores)\n", cores());

    // 1. Load cost: a command on a short stream and on a long one.
    let streams = prepare(&server, long_stream).await?;
    let grown = Instant::now();
    let times = command_latency(&server, &streams, samples).await?;
    println!(
        "### Command latency by stream length (PATCH /v1/campaigns/{{id}}, sequential, {samples} each)\n"
    );
    println!("| stream | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| ~10 events | {} | {} |",
        ms(percentile(&times.short, 0.5)),
        ms(percentile(&times.short, 0.99))
    );
    println!(
        "| ~{} events | {} | {} |",
        streams.long_events,
        ms(percentile(&times.long, 0.5)),
        ms(percentile(&times.long, 0.99))
    );
    println!(
        "\nratio long/short: p50 {:.2}×, p99 {:.2}× (target ≤ 1.5×)\n",
        times.ratio(0.5),
        times.ratio(0.99)
    );

    // 2. Write-to-read-model lag at a steady rate, once the projection has caught up with
    // the long stream (applying it is a measure of its own: the incremental apply rate).
    wait_for_projection(&server, "campaigns").await?;
    let catch_up = grown.elapsed().as_secs_f64();
    println!(
        "The `campaigns` projection applied the {long_stream}-event stream within {catch_up:.1} s of its commit \
         (≥ {:.0} events/s incrementally, batches of 500, while the latency runs above shared the machine).\n",
        long_stream as f64 / catch_up
    );
    let lag = lag(&server, rate, seconds as f64).await?;
    println!("### Write-to-read-model lag (`campaigns` projection)\n");
    println!(
        "{} renames over {} campaigns at a target of {rate}/s: achieved {:.0}/s, {} failed, {} never seen.\n",
        lag.sent, lag.campaigns, lag.achieved, lag.failures, lag.unseen
    );
    println!("| p50 | p90 | p99 | max |");
    println!("|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} |\n",
        ms(percentile(&lag.lags, 0.5)),
        ms(percentile(&lag.lags, 0.9)),
        ms(percentile(&lag.lags, 0.99)),
        ms(lag.lags.last().copied().unwrap_or_default())
    );
    println!(
        "(lag: from the client receiving the write's response to the projection committing a checkpoint at or past it; target p99 < 50 ms)"
    );
    crate::stop(server).await
}
