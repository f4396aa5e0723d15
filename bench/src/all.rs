//! `leadledger-bench all`: the headline figures in one command, as medians over several
//! runs (min and max beside), on one private server:
//! - command throughput and latency over HTTP at 1, 8 and 32 concurrent clients: contact
//!   upserts, signed webhooks (1 and 100 events per request), spends on one hot budget;
//! - the floor: the SQL of one contact upsert run by `pgbench` at the same concurrency, and
//!   a peer: the same aggregate and command through cqrs-es + postgres-es, in-process;
//!   our contact-upsert throughput as a ratio of each, computed within each run;
//! - write-to-read-model lag under a steady load; aggregate load time at 10 vs 100,000
//!   events; the process's peak memory;
//! - how fast this sitting's disk flushes and CPU runs (see [`crate::calibrate`]), so that
//!   figures from two sittings can be compared.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cpu::{CpuMeter, CpuUse, postmaster_of};
use crate::floor::{Floor, Target};
use crate::measure::{Measured, cores, millis, percentile};
use crate::peer::Peer;
use crate::report::Report;
use crate::{Server, calibrate, contacts, spends, start, store, webhooks};

/// The server's pool size in the benchmark (see `start`); the peer gets the same.
const POOL_SIZE: u32 = 40;

const HTTP: &str = "Commands over HTTP (closed loop: each client sends its next request when the last is answered)";
const FLOOR: &str = "Floor: the SQL of one contact upsert (load stream, insert event, insert idempotency record, commit), by pgbench";
const PEER: &str = "Peer: contact upsert through cqrs-es 0.5 + postgres-es 0.5 (CqrsFramework::execute, in-process)";
const RATIOS: &str = "Contact upserts over HTTP, as a ratio of the floor and of the peer (same run, same concurrency)";
const CPU: &str =
    "CPU of every process a contact upsert took, and the machine's idle share (the same cells)";
const LAG: &str = "Write-to-read-model lag under load (`campaigns` projection)";
const LOAD: &str = "Aggregate load at ~10 vs 100,000 events (target: long/short ≤ 1.5)";
const MEMORY: &str = "Memory";
const CALIBRATION: &str =
    "This sitting's machine, measured at the start of each run on the idle server";
const REBUILD: &str =
    "Projection rebuild (every projection, child process) and reads over the rebuilt log";

/// How long and how often everything is measured.
#[derive(Debug, Clone)]
pub struct Plan {
    pub runs: usize,
    pub quick: bool,
    /// Each throughput measurement.
    pub measure: Duration,
    /// Before each throughput measurement over HTTP or of the peer (pgbench's own timing
    /// starts once its connections are made).
    pub warm_up: Duration,
    pub clients: Vec<usize>,
    pub lag_rate: u64,
    pub lag_seconds: f64,
    pub long_stream: u64,
    /// Timed loads and commands per stream.
    pub samples: usize,
    /// Events in the log the rebuild is measured on.
    pub rebuild_events: u64,
    /// Contact upserts with their floor and peer only (`--upserts-only`).
    pub upserts_only: bool,
    /// The server's workers (projection runners, reactors, sweeps) stopped before the
    /// runs (`--without-workers`, with `--upserts-only`): the write path's share alone.
    pub without_workers: bool,
}

impl Plan {
    pub fn full(runs: usize, seconds: u64, clients: Vec<usize>) -> Self {
        Self {
            runs: runs.max(1),
            quick: false,
            measure: Duration::from_secs(seconds.max(1)),
            warm_up: Duration::from_secs(1),
            clients,
            lag_rate: 500,
            lag_seconds: 10.0,
            long_stream: 100_000,
            samples: 400,
            rebuild_events: 1_000_000,
            upserts_only: false,
            without_workers: false,
        }
    }

    /// A smoke run: every figure once, briefly.
    pub fn quick(clients: Vec<usize>) -> Self {
        Self {
            runs: 1,
            quick: true,
            measure: Duration::from_secs(1),
            warm_up: Duration::from_millis(300),
            clients,
            lag_rate: 500,
            lag_seconds: 3.0,
            long_stream: 100_000,
            samples: 100,
            rebuild_events: 50_000,
            upserts_only: false,
            without_workers: false,
        }
    }
}

fn clients_label(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Throughput, latency and failures of one HTTP measurement.
fn record_http(report: &mut Report, row: &str, m: &Measured, events: bool) {
    report.record(HTTP, row, "requests/s", m.per_second());
    if events {
        report.record(HTTP, row, "events/s", m.units_per_second());
    }
    report.record(HTTP, row, "p50 ms", millis(m.p50()));
    report.record(HTTP, row, "p99 ms", millis(m.p99()));
    report.record(HTTP, row, "not 2xx", m.failures.len() as f64);
    if !m.failures.is_empty() {
        eprintln!("{row}: {} failed", m.failures_summary());
    }
}

/// What a cell's commands (`ops` of them) cost in CPU, and the idle share it left (and of
/// that, the share waiting for the disk).
fn record_cpu(report: &mut Report, row: &str, who: &str, used: Option<CpuUse>, ops: usize) {
    let Some(used) = used else {
        return;
    };
    let ops = ops as f64;
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    report.record(CPU, row, &format!("{who} µs"), micros(used.per_op(ops)));
    report.record(
        CPU,
        row,
        &format!("{who} in PostgreSQL µs"),
        micros(used.postgres_per_op(ops)),
    );
    report.record(CPU, row, &format!("{who} idle %"), used.idle * 100.0);
    report.record(
        CPU,
        row,
        &format!("{who} disk wait %"),
        used.disk_wait * 100.0,
    );
}

pub async fn run(plan: Plan, json_path: Option<PathBuf>) -> anyhow::Result<()> {
    let began = Instant::now();
    let load_before = load_average();
    let server = Arc::new(start().await?);
    let postgres: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&server.pool)
        .await?;
    eprintln!(
        "setting up: webhook source and 2,000 enrollments, pgbench script, peer database, a {}-event stream",
        plan.long_stream
    );
    // First: it enrolls every contact there is.
    let sender = webhooks::setup(&server).await?;
    let floor = Floor::prepare(&server, &server.scratch_dir()).await?;
    let quiet = Target::quiet(&server).await?;
    let busy = Target::server(&server);
    let peer = Peer::prepare(&server, POOL_SIZE).await?;
    let postmaster = postmaster_of(&server.pool).await?;
    let streams = if plan.upserts_only {
        None
    } else {
        Some(store::prepare(&server, plan.long_stream).await?)
    };

    if plan.without_workers {
        // Nothing applies the events from here on: the runs do not wait for it.
        settle(&server).await?;
        server.workers.cancel();
        eprintln!("the server's workers stopped: the write path alone");
    }

    let mut report = Report::default();
    for run in 0..plan.runs {
        eprintln!("run {} of {}", run + 1, plan.runs);
        let peak_reset = reset_peak_memory();
        let rss_at_start = memory_kib("VmRSS:");

        settle(&server).await?;
        let dir = server.scratch_dir();
        let flushes = tokio::task::spawn_blocking(move || {
            calibrate::flush_latencies(&dir, Duration::from_secs(1))
        })
        .await??;
        let cpu = tokio::task::spawn_blocking(calibrate::cpu_loop).await?;
        let row = "8 KiB write + fdatasync, in the data directory";
        for (name, p) in [("p50 µs", 0.5), ("p99 µs", 0.99)] {
            let micros = percentile(&flushes, p).as_secs_f64() * 1e6;
            report.record(CALIBRATION, row, name, micros);
        }
        report.record(
            CALIBRATION,
            "fixed integer loop, one thread",
            "ms",
            millis(cpu),
        );

        // Ours, the floor and the peer back to back at each concurrency, so that each ratio
        // compares measurements taken under the same machine conditions.
        for &c in &plan.clients {
            let tag = format!("r{run}c{c}");
            settle(&server).await?;
            contacts::upserts(&server, c, plan.warm_up, &format!("{tag}w")).await?;
            let meter = CpuMeter::start(postmaster);
            let ours = contacts::upserts(&server, c, plan.measure, &tag).await?;
            let ours_cpu = meter.and_then(CpuMeter::stop);
            record_http(
                &mut report,
                &format!("contact upsert, {}", clients_label(c, "client")),
                &ours,
                false,
            );
            let row = clients_label(c, "client");
            settle(&server).await?;
            let meter = CpuMeter::start(postmaster);
            let base = floor.run(&quiet, c, plan.measure).await?;
            let base_cpu = meter.and_then(CpuMeter::stop);
            report.record(FLOOR, &row, "quiet db tx/s", base.tps);
            report.record(FLOOR, &row, "quiet p50 ms", millis(base.p50()));
            report.record(FLOOR, &row, "quiet p99 ms", millis(base.p99()));
            settle(&server).await?;
            let woken = floor.run(&busy, c, plan.measure).await?;
            report.record(FLOOR, &row, "server's db tx/s", woken.tps);
            report.record(FLOOR, &row, "server's p50 ms", millis(woken.p50()));
            report.record(FLOOR, &row, "server's p99 ms", millis(woken.p99()));
            settle(&server).await?;
            peer.upserts(c, plan.warm_up, &format!("{tag}w")).await?;
            let meter = CpuMeter::start(postmaster);
            let theirs = peer.upserts(c, plan.measure, &tag).await?;
            let theirs_cpu = meter.and_then(CpuMeter::stop);
            let row = clients_label(c, "task");
            report.record(PEER, &row, "commands/s", theirs.per_second());
            report.record(PEER, &row, "p50 ms", millis(theirs.p50()));
            report.record(PEER, &row, "p99 ms", millis(theirs.p99()));
            report.record(PEER, &row, "failed", theirs.failures.len() as f64);
            let row = clients_label(c, "client");
            report.record(RATIOS, &row, "ours requests/s", ours.per_second());
            report.record(
                RATIOS,
                &row,
                "÷ floor, quiet db (target ≥ 0.6)",
                ours.per_second() / base.tps,
            );
            report.record(
                RATIOS,
                &row,
                "÷ floor, server's db",
                ours.per_second() / woken.tps,
            );
            report.record(
                RATIOS,
                &row,
                "÷ peer (target ≥ 1.0)",
                ours.per_second() / theirs.per_second().max(f64::EPSILON),
            );
            for (who, used, ops) in [
                ("ours", ours_cpu, ours.ops()),
                ("floor", base_cpu, base.latencies.len()),
                ("peer", theirs_cpu, theirs.ops()),
            ] {
                record_cpu(&mut report, &row, who, used, ops);
            }
        }
        let Some(streams) = &streams else {
            continue;
        };

        for batch in [1usize, 100] {
            for &c in &plan.clients {
                settle(&server).await?;
                sender.measure(batch, c, plan.warm_up).await?;
                let m = sender.measure(batch, c, plan.measure).await?;
                let row = format!(
                    "webhook, {batch} event{}/request, {}",
                    if batch == 1 { "" } else { "s" },
                    clients_label(c, "sender")
                );
                record_http(&mut report, &row, &m, true);
            }
        }

        for &c in &plan.clients {
            settle(&server).await?;
            let spend = spends::measure(&server, c, plan.measure, plan.warm_up).await?;
            let row = format!("spend on one budget, {}", clients_label(c, "client"));
            record_http(&mut report, &row, &spend.measured, false);
            report.record(HTTP, &row, "retries/spend", spend.retries_per_spend());
        }

        let lag = store::lag(&server, plan.lag_rate, plan.lag_seconds).await?;
        let row = format!(
            "{} renames/s for {} s over {} campaigns",
            plan.lag_rate, plan.lag_seconds, lag.campaigns
        );
        report.record(LAG, &row, "achieved/s", lag.achieved);
        report.record(LAG, &row, "p50 ms", millis(percentile(&lag.lags, 0.5)));
        report.record(LAG, &row, "p99 ms", millis(percentile(&lag.lags, 0.99)));
        report.record(
            LAG,
            &row,
            "max ms",
            millis(lag.lags.last().copied().unwrap_or_default()),
        );
        report.record(
            LAG,
            &row,
            "failed or unseen",
            (lag.failures + lag.unseen) as f64,
        );

        settle(&server).await?;
        let loads = store::load_latency(&server, streams, plan.samples).await?;
        let commands = store::command_latency(&server, streams, plan.samples).await?;
        for (row, times) in [
            ("Store::load, in-process", &loads),
            ("PATCH /v1/campaigns/{id} over HTTP, sequential", &commands),
        ] {
            for (stream, sorted) in [("~10 ev", &times.short), ("100,000 ev", &times.long)] {
                for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
                    let column = format!("{stream} {name} ms");
                    report.record(LOAD, row, &column, millis(percentile(sorted, p)));
                }
            }
            report.record(LOAD, row, "long/short p50", times.ratio(0.5));
            report.record(LOAD, row, "long/short p99", times.ratio(0.99));
        }

        let row = "bench process (server in-process)";
        if let Some(kib) = rss_at_start {
            report.record(MEMORY, row, "RSS at run start MiB", kib as f64 / 1024.0);
        }
        if let Some(kib) = memory_kib("VmHWM:") {
            let column = if peak_reset {
                "peak RSS during the run MiB"
            } else {
                "peak RSS since start MiB"
            };
            report.record(MEMORY, row, column, kib as f64 / 1024.0);
        }

        // Projection rebuild and reads over a large log, on a server of their own.
        let events = if plan.quick {
            50_000
        } else {
            plan.rebuild_events
        };
        let figures = crate::rebuild::measure(vec![events], plan.samples).await?;
        for r in &figures.rebuilds {
            report.record(REBUILD, "rebuild --all", "events", r.events as f64);
            report.record(REBUILD, "rebuild --all", "events/s", r.events_per_second);
            report.record(REBUILD, "rebuild --all", "peak RSS MiB", r.peak_rss_mib);
        }
        for (row, times) in [
            ("GET /v1/campaigns/{id}/metrics", &figures.metrics),
            ("GET /v1/analytics/dashboard", &figures.dashboard),
        ] {
            report.record(REBUILD, row, "p50 ms", millis(percentile(times, 0.5)));
            report.record(REBUILD, row, "p99 ms", millis(percentile(times, 0.99)));
        }
    }

    report.note(
        HTTP,
        &format!(
            "{} s per cell after a {} s warm-up; contact upserts carry a new email and a new Idempotency-Key each; \
             webhook events are new ids spread over 2,000 enrollments; spends go to a fresh budget per cell.",
            plan.measure.as_secs_f64(),
            plan.warm_up.as_secs_f64()
        ),
    );
    report.note(
        FLOOR,
        &format!(
            "pgbench -n -M prepared -c N -j N -T secs, latencies from its transaction log. \
             Quiet db: `{}`, migrated like the server's, no server attached (the SQL alone). \
             Server's db: the server's own; each commit also wakes its projection runners, as a command's does.",
            crate::floor::QUIET_DATABASE
        ),
    );
    report.note(
        PEER,
        &format!(
            "Same PostgreSQL server, database `{}` with postgres-es's schema, a pool of {POOL_SIZE} like the server's; no HTTP, no idempotency record, no read model.",
            crate::peer::DATABASE
        ),
    );
    report.note(
        RATIOS,
        "Each run's ratio is taken from measurements made back to back; the table gives the median, min and max of those ratios.",
    );
    report.note(
        CPU,
        &format!(
            "CPU time of every process over the measured cell, from Linux's `/proc`, divided by the commands (or pgbench transactions) it completed: \
             this process (the server and the HTTP clients for ours, pgbench for the floor's quiet db, the peer's tasks for the peer) \
             and PostgreSQL's processes (its part is shown beside). Idle: the share of the machine's {} cores' time nobody used; \
             disk wait: the part of it Linux counts as `iowait` (a core left idle while a task that ran on it waits for the disk, a commit's flush say). \
             Where idle is near 0, the throughput is what the CPU allows: about {} cores' seconds ÷ CPU a command.",
            cores(),
            cores()
        ),
    );
    report.note(
        CALIBRATION,
        "The flush is what a durable commit waits for; the loop is CPU-bound work on one core. \
         A slower sitting shows here first: compare these before comparing two sittings' figures.",
    );
    report.note(
        LOAD,
        &format!(
            "{} timed per stream, alternating between the streams; the long stream has a snapshot every 100 events, so a load reads the latest snapshot and at most 99 events.",
            plan.samples
        ),
    );
    report.note(
        MEMORY,
        "VmRSS and VmHWM of the bench process; the peak is reset at the start of each run (Linux `/proc/self/clear_refs`), \
         so it starts from the memory the process already holds (the set-up included). The server runs inside the bench \
         process, so this is the server plus the HTTP client and the peer (PostgreSQL's own processes are not included): \
         an upper bound on the server's.",
    );

    let load_after = load_average();
    let elapsed = began.elapsed().as_secs_f64();
    println!(
        "## leadledger-bench all: {} run{}, {} cores, PostgreSQL {postgres}\n",
        plan.runs,
        if plan.runs == 1 { "" } else { "s" },
        cores()
    );
    println!(
        "Cells are median (min–max) over the runs. Load average before/after: {} / {}; took {elapsed:.0} s.\n",
        load_before.as_deref().unwrap_or("?"),
        load_after.as_deref().unwrap_or("?")
    );
    if plan.without_workers {
        println!(
            "Without the server's workers: no projection runner, reactor or periodic sweep ran \
             during the runs, so \"ours\" is the write path alone, read models not kept.\n"
        );
    }
    print!("{}", report.to_markdown());

    if let Some(path) = json_path {
        let about = json!({
            "runs": plan.runs,
            "quick": plan.quick,
            "without_workers": plan.without_workers,
            "seconds_per_measurement": plan.measure.as_secs_f64(),
            "warm_up_seconds": plan.warm_up.as_secs_f64(),
            "clients": plan.clients,
            "lag_rate": plan.lag_rate,
            "lag_seconds": plan.lag_seconds,
            "long_stream": plan.long_stream,
            "samples": plan.samples,
            "cores": cores(),
            "postgres": postgres,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "elapsed_seconds": elapsed,
        });
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&report.to_json(about))? + "\n",
        )?;
        eprintln!("figures written to {}", path.display());
    }

    peer.close().await;
    drop(sender);
    crate::stop(server).await
}

/// Lets the projections apply what earlier measurements wrote, so that a measurement does
/// not pay for its predecessor's backlog (nothing to wait for once the workers are stopped).
async fn settle(server: &Server) -> anyhow::Result<()> {
    if server.workers.cancelled() {
        return Ok(());
    }
    store::wait_for_all_projections(server).await
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS (Linux: `5` to
/// `/proc/self/clear_refs`). False when the kernel does not allow it.
fn reset_peak_memory() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A memory figure of this process from `/proc/self/status`, in KiB: `VmHWM:` is the peak
/// resident set, `VmRSS:` the current one.
fn memory_kib(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}
