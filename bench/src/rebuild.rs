//! `leadledger-bench rebuild`: projection rebuild speed and memory on a large log, and the
//! latency of campaign metrics and the dashboard over it.
//!
//! 1. Writes a realistic log straight through the store (contacts created, updated and
//!    enriched; campaigns; enrollments; provider events in later transactions than their
//!    enrollments, with times spread over 30 days; spends on ten budgets) until it holds
//!    each size asked for, and at each size rebuilds every projection in a child process
//!    (the `projections rebuild --all` code path) that reports its events/s and peak
//!    resident memory.
//! 2. With the last rebuild swapped in, times `GET /v1/campaigns/{id}/metrics` (random
//!    campaigns) and `GET /v1/analytics/dashboard` over HTTP.

use std::time::{Duration, Instant};

use aggregates::budget::{Budget, BudgetEvent};
use aggregates::campaign::{Campaign, CampaignEvent};
use aggregates::contact::{Contact, ContactEvent};
use aggregates::enrollment::{Enrollment, EnrollmentEvent};
use anyhow::Context;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use leadledger::store::{Loaded, Metadata, Store};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::measure::{ms, percentile};

/// What the child process reports.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub(crate) struct ChildReport {
    events: u64,
    seconds: f64,
    peak_rss_kib: u64,
}

/// Installs the key that opens the personal data sealed under `data_dir`'s secret key.
fn install_data_key(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let secrets = leadledger::secrets::SecretBox::load(None, data_dir)?;
    projections::pii::install(secrets.derive(leadledger::app::privacy::DATA_KEYS_PURPOSE));
    Ok(())
}

/// The child: rebuilds every projection of the database at `url`, prints a JSON report.
pub(crate) async fn child(url: &str, data_dir: &std::path::Path) -> anyhow::Result<()> {
    install_data_key(data_dir)?;
    let pool = leadledger::db::pool_options(4)
        .connect(url)
        .await
        .context("connecting")?;
    let selected = projections::rebuild::select(&[])?;
    let report = projections::rebuild::rebuild(
        &pool,
        &selected,
        &projections::rebuild::Options::default(),
        &mut projections::rebuild::Quiet,
    )
    .await?;
    anyhow::ensure!(report.swapped, "the rebuild did not swap");
    let out = ChildReport {
        events: report.events,
        seconds: report.seconds,
        peak_rss_kib: peak_rss_kib(),
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// This process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn event<E: DeserializeOwned>(value: Value) -> E {
    serde_json::from_value(value).expect("a valid event")
}

/// A small deterministic generator (no dependency, same log every run).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn time_within_days(&mut self, now: DateTime<Utc>, days: i64) -> DateTime<Utc> {
        now - chrono::Duration::seconds((self.next() % (days as u64 * 86_400)) as i64)
    }
}

fn fresh<A: Aggregate>(id: String, version: u64) -> Loaded<A> {
    Loaded {
        id,
        aggregate: A::default(),
        version,
        last_position: None,
        unsnapshotted_bytes: 0,
        keys: None,
    }
}

pub(crate) struct Generator {
    store: Store,
    rng: Rng,
    now: DateTime<Utc>,
    pub(crate) campaigns: Vec<Uuid>,
    pub(crate) budgets: Vec<(Uuid, u64)>,
    /// Enrollments made by the last chunk: (id, campaign), provider events still to come.
    pending: Vec<(Uuid, u64)>,
    pub(crate) written: u64,
    chunk: u64,
}

impl Generator {
    pub(crate) async fn new(pool: &PgPool) -> anyhow::Result<Self> {
        let mut generator = Self {
            store: Store::new(0),
            rng: Rng(0x9E37_79B9_7F4A_7C15),
            now: Utc::now(),
            campaigns: Vec::new(),
            budgets: Vec::new(),
            pending: Vec::new(),
            written: 0,
            chunk: 0,
        };
        let mut tx = pool.begin().await?;
        let mut streams = Vec::new();
        for i in 0..200 {
            let id = Uuid::now_v7();
            generator.campaigns.push(id);
            let events: Vec<CampaignEvent> = vec![
                event(json!({"CampaignCreated": {"name": format!("campaign {i}"),
                    "stop_on_reply": true, "created_at": generator.now - chrono::Duration::days(31)}})),
                event(
                    json!({"CampaignStarted": {"started_at": generator.now - chrono::Duration::days(30)}}),
                ),
            ];
            streams.push((fresh::<Campaign>(id.to_string(), 0), events));
        }
        generator.written += append(&generator.store, &mut tx, streams).await?;
        let mut streams = Vec::new();
        for i in 0..10 {
            let id = Uuid::now_v7();
            generator.budgets.push((id, 1));
            let created: BudgetEvent = event(
                json!({"BudgetCreated": {"name": format!("budget {i}"),
                "limit": null, "period": "none", "grace_percent": 0, "created_at": generator.now - chrono::Duration::days(31)}}),
            );
            streams.push((fresh::<Budget>(id.to_string(), 0), vec![created]));
        }
        generator.written += append(&generator.store, &mut tx, streams).await?;
        tx.commit().await?;
        Ok(generator)
    }

    /// Writes one chunk of 2,000 contacts and what follows from them.
    pub(crate) async fn chunk(&mut self, pool: &PgPool) -> anyhow::Result<()> {
        const CONTACTS: usize = 2_000;
        self.chunk += 1;
        let mut contacts = Vec::new();
        let mut contact_ids = Vec::new();
        for i in 0..CONTACTS {
            let id = Uuid::now_v7();
            contact_ids.push(id);
            let created_at = self.now - chrono::Duration::days(31);
            let mut events: Vec<ContactEvent> = vec![event(json!({"ContactCreated": {
                "email": format!("c{}-{i}@bench.example", self.chunk),
                "fields": {"first_name": "Ada", "last_name": format!("L{i}"), "company": format!("Company {}", i % 500),
                           "custom": {"segment": format!("s{}", i % 7)}},
                "created_at": created_at}}))];
            if self.rng.chance(20) {
                events.push(event(
                    json!({"ContactUpdated": {"changes": {"title": "VP Sales"},
                    "updated_at": created_at + chrono::Duration::hours(1)}}),
                ));
            }
            if self.rng.chance(10) {
                events.push(event(json!({"EnrichmentRecorded": {"data": {"employees": i},
                    "quality_score": 0.75, "sources": ["web"], "enriched_at": created_at + chrono::Duration::hours(2)}})));
            }
            contacts.push((fresh::<Contact>(id.to_string(), 0), events));
        }
        let mut enrollments = Vec::new();
        let mut made = Vec::new();
        for contact in &contact_ids {
            let id = Uuid::now_v7();
            let campaign = self.campaigns[(self.rng.next() % self.campaigns.len() as u64) as usize];
            let enrolled: EnrollmentEvent = event(
                json!({"ContactEnrolled": {"campaign_id": campaign,
                "contact_id": contact, "stop_on_reply": true, "enrolled_at": self.now - chrono::Duration::days(30)}}),
            );
            enrollments.push((fresh::<Enrollment>(id.to_string(), 0), vec![enrolled]));
            made.push((id, 1));
        }
        // Provider events for the previous chunk's enrollments: another transaction, their
        // enrollments already in the log.
        let mut reports = Vec::new();
        for (id, version) in std::mem::replace(&mut self.pending, made) {
            let mut kinds = vec!["sent"];
            if self.rng.chance(3) {
                kinds.push("bounced");
            } else if self.rng.chance(93) {
                kinds.push("delivered");
                if self.rng.chance(50) {
                    kinds.push("opened");
                    if self.rng.chance(22) {
                        kinds.push("clicked");
                    }
                }
                if self.rng.chance(8) {
                    kinds.push("replied");
                }
                if self.rng.chance(1) {
                    kinds.push("unsubscribed");
                }
            }
            // Providers report out of order.
            if self.rng.chance(30) {
                kinds.reverse();
            }
            let events: Vec<EnrollmentEvent> = kinds
                .iter()
                .enumerate()
                .map(|(n, kind)| {
                    event(
                        json!({"ProviderEventRecorded": {"provider_event_id": format!("{id}-{n}"),
                        "kind": kind, "occurred_at": self.rng.time_within_days(self.now, 30)}}),
                    )
                })
                .collect();
            reports.push((fresh::<Enrollment>(id.to_string(), version), events));
        }
        let mut spends = Vec::new();
        let per_budget = (CONTACTS * 4 / 5) / self.budgets.len();
        for (id, version) in &mut self.budgets {
            let events: Vec<BudgetEvent> = (0..per_budget)
                .map(|n| {
                    event(json!({"SpendRecorded": {"spend_id": Uuid::now_v7(),
                        "amount": format!("0.{:02}", 1 + n % 99), "category": "ai",
                        "description": null, "model": if n % 2 == 0 { "gpt-a" } else { "gpt-b" },
                        "input_tokens": 1000, "output_tokens": 200, "period_start": null,
                        "spent_at": self.rng.time_within_days(self.now, 30)}}))
                })
                .collect();
            spends.push((fresh::<Budget>(id.to_string(), *version), events));
            *version += per_budget as u64;
        }
        let mut tx = pool.begin().await?;
        self.written += append(&self.store, &mut tx, contacts).await?;
        tx.commit().await?;
        let mut tx = pool.begin().await?;
        self.written += append(&self.store, &mut tx, enrollments).await?;
        tx.commit().await?;
        let mut tx = pool.begin().await?;
        self.written += append(&self.store, &mut tx, reports).await?;
        tx.commit().await?;
        let mut tx = pool.begin().await?;
        self.written += append(&self.store, &mut tx, spends).await?;
        tx.commit().await?;
        Ok(())
    }
}

async fn append<A: Aggregate>(
    store: &Store,
    conn: &mut sqlx::PgConnection,
    mut streams: Vec<(Loaded<A>, Vec<A::Event>)>,
) -> anyhow::Result<u64> {
    let total: usize = streams.iter().map(|(_, e)| e.len()).sum();
    if total == 0 {
        return Ok(0);
    }
    let mut refs: Vec<(&mut Loaded<A>, &[A::Event])> =
        streams.iter_mut().map(|(l, e)| (l, e.as_slice())).collect();
    store
        .append_many(conn, &mut refs, &Metadata::default())
        .await?;
    Ok(total as u64)
}

/// `leadledger-bench rebuild-log`: writes the benchmark's log into the database at `url`
/// (for profiling the rebuild on a database that outlives the run).
pub(crate) async fn write_log(
    url: &str,
    data_dir: &std::path::Path,
    events: u64,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir)?;
    install_data_key(data_dir)?;
    let pool = leadledger::db::pool_options(4).connect(url).await?;
    leadledger::db::MIGRATOR.run(&pool).await?;
    let mut generator = Generator::new(&pool).await?;
    while generator.written < events {
        generator.chunk(&pool).await?;
    }
    println!("{} events written", generator.written);
    Ok(())
}

/// A rebuild at one log size.
pub(crate) struct RebuildFigure {
    pub events: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    pub peak_rss_mib: f64,
    pub generate_seconds: f64,
    pub live_catch_up_seconds: f64,
}

/// What the benchmark measured: a rebuild at each size, then reads over the largest log.
pub(crate) struct Figures {
    pub rebuilds: Vec<RebuildFigure>,
    pub log_events: u64,
    pub metrics: Vec<Duration>,
    pub dashboard: Vec<Duration>,
}

/// Rebuilds at each of `sizes` (events in the log), then times `samples` reads of each
/// route, on a private server of its own.
pub(crate) async fn measure(sizes: Vec<u64>, samples: usize) -> anyhow::Result<Figures> {
    let server = std::sync::Arc::new(crate::start().await?);
    let url = server.pg.url();
    let mut generator = Generator::new(&server.pool).await?;
    let mut rebuilds = Vec::new();
    for size in sizes {
        let started = Instant::now();
        while generator.written < size {
            generator.chunk(&server.pool).await?;
        }
        let generated = started.elapsed();
        // The server's own runners apply the log as it is written; the rebuild starts once
        // they are done, so that it has the machine to itself.
        let live_started = Instant::now();
        let mut conn = server.pool.acquire().await?;
        let head = projections::feed::head(&mut conn)
            .await?
            .unwrap_or_default();
        drop(conn);
        anyhow::ensure!(
            projections::runner::wait_for(
                &server.pool,
                head,
                &projections::names(),
                Duration::from_secs(3600)
            )
            .await?,
            "live projections did not catch up"
        );
        let live_wait = live_started.elapsed();
        let report = rebuild_in_child(&url, &server.app_dir).await?;
        rebuilds.push(RebuildFigure {
            events: report.events,
            seconds: report.seconds,
            events_per_second: report.events as f64 / report.seconds,
            peak_rss_mib: report.peak_rss_kib as f64 / 1024.0,
            generate_seconds: generated.as_secs_f64(),
            live_catch_up_seconds: live_wait.as_secs_f64(),
        });
    }
    let mut rng = Rng(7);
    let mut metrics = Vec::with_capacity(samples);
    let mut dashboard = Vec::with_capacity(samples);
    for _ in 0..samples {
        let campaign =
            generator.campaigns[(rng.next() % generator.campaigns.len() as u64) as usize];
        metrics.push(timed_get(&server, &format!("/v1/campaigns/{campaign}/metrics")).await?);
        dashboard.push(timed_get(&server, "/v1/analytics/dashboard").await?);
    }
    metrics.sort();
    dashboard.sort();
    crate::stop(server).await?;
    Ok(Figures {
        rebuilds,
        log_events: generator.written,
        metrics,
        dashboard,
    })
}

/// `leadledger-bench rebuild`: measures and prints.
pub(crate) async fn run(sizes: Vec<u64>, samples: usize) -> anyhow::Result<()> {
    let figures = measure(sizes, samples).await?;
    println!(
        "rebuild: every projection, in a child process, from a log written straight through the store"
    );
    println!(
        "{:>12}  {:>10}  {:>12}  {:>14}  {:>10}",
        "events", "seconds", "events/s", "peak RSS MiB", "generated"
    );
    for r in &figures.rebuilds {
        println!(
            "{:>12}  {:>10.2}  {:>12.0}  {:>14.1}  {:>9.0}s  (live runners caught up {:.1} s after the last write)",
            r.events,
            r.seconds,
            r.events_per_second,
            r.peak_rss_mib,
            r.generate_seconds,
            r.live_catch_up_seconds
        );
    }
    println!(
        "reads over {} events, {samples} each, one client:",
        figures.log_events
    );
    for (name, times) in [
        ("GET /v1/campaigns/{id}/metrics", &figures.metrics),
        ("GET /v1/analytics/dashboard", &figures.dashboard),
    ] {
        println!(
            "  {name:<34} p50 {}  p99 {}  max {}",
            ms(percentile(times, 0.5)),
            ms(percentile(times, 0.99)),
            ms(*times.last().unwrap_or(&Duration::ZERO))
        );
    }
    Ok(())
}

/// The time one GET takes, body read.
async fn timed_get(server: &crate::Server, path: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    server
        .client
        .get(format!("{}{path}", server.address))
        .bearer_auth(&server.key)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    Ok(start.elapsed())
}

async fn rebuild_in_child(url: &str, data_dir: &std::path::Path) -> anyhow::Result<ChildReport> {
    let exe = std::env::current_exe()?;
    let out = tokio::process::Command::new(exe)
        .args(["rebuild-child", "--url", url, "--data-dir"])
        .arg(data_dir)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "rebuild child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout)?;
    Ok(serde_json::from_str(line.trim())?)
}
