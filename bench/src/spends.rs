//! `leadledger-bench spends`: spend throughput and latency on one hot budget, with 1, 8
//! and 32 clients spending on it at once over HTTP. Every spend is the real path: the
//! budget's limit is checked (the limit is far away, so nothing is refused) and the spend
//! commits under optimistic concurrency, so clients of one budget contend for its stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::{Server, ms, percentile, start};

/// What one client run measured.
struct Run {
    clients: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// Answers other than 201, by status.
    failures: Vec<u16>,
    conflicts: f64,
}

async fn create_budget(server: &Server, name: &str) -> anyhow::Result<String> {
    let body: Value = server
        .client
        .post(format!("{}/v1/budgets", server.address))
        .bearer_auth(&server.key)
        .json(&json!({"name": name, "limit": "1000000000000"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(body["id"].as_str().context("id")?.to_string())
}

/// `command_conflicts_total` for budgets: how many attempts lost a race and were retried.
async fn conflicts(server: &Server) -> anyhow::Result<f64> {
    let text = server
        .client
        .get(format!("{}/metrics", server.address))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("command_conflicts_total") && l.contains("aggregate=\"budget\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

async fn run_clients(
    server: &Arc<Server>,
    budget: &str,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<Run> {
    let conflicts_before = conflicts(server).await?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let server = server.clone();
            let url = format!("{}/v1/budgets/{budget}/spend", server.address);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = Vec::new();
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let status = server
                        .client
                        .post(&url)
                        .bearer_auth(&server.key)
                        .json(&json!({"amount": "0.01", "category": "ai", "model": "bench", "input_tokens": 100, "output_tokens": 10}))
                        .send()
                        .await?
                        .status()
                        .as_u16();
                    if status == 201 {
                        latencies.push(sent.elapsed());
                    } else {
                        failures.push(status);
                    }
                }
                anyhow::Ok((latencies, failures))
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    for task in tasks {
        let (l, f) = task.await??;
        latencies.extend(l);
        failures.extend(f);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok(Run {
        clients,
        elapsed,
        latencies,
        failures,
        conflicts: conflicts(server).await? - conflicts_before,
    })
}

pub async fn run(clients: Vec<usize>, seconds: u64) -> anyhow::Result<()> {
    let server = Arc::new(start().await?);
    println!(
        "## Spends on one hot budget ({} cores)\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let mut runs = Vec::new();
    for &n in &clients {
        // A fresh budget per run, so each starts from the same stream length.
        let budget = create_budget(&server, &format!("hot {n}")).await?;
        let warm_up = run_clients(&server, &budget, n, 1).await?.latencies.len();
        let run = run_clients(&server, &budget, n, seconds).await?;
        // The budget must show exactly what was accepted: nothing lost, nothing doubled.
        let shown: Value = server
            .client
            .get(format!("{}/v1/budgets/{budget}", server.address))
            .bearer_auth(&server.key)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let version = shown["version"].as_u64().context("version")?;
        let accepted = (warm_up + run.latencies.len()) as u64;
        let spent = shown["spent"].as_str().context("spent")?;
        let expected = format!("{}.{:02}", accepted / 100, accepted % 100);
        let expected = expected.trim_end_matches('0').trim_end_matches('.');
        anyhow::ensure!(
            version == 1 + accepted && spent == expected,
            "{n} clients: {accepted} spends accepted but the budget shows version {version}, spent {spent}"
        );
        eprintln!(
            "{n} clients: {} spends in {:.1} s; budget at version {version}, spent {}",
            run.latencies.len(),
            run.elapsed.as_secs_f64(),
            shown["spent"]
        );
        runs.push(run);
    }
    println!(
        "`POST /v1/budgets/{{id}}/spend` on one budget, {seconds} s per row, each client sending its next spend as soon as the last is answered.\n"
    );
    println!("| clients | spends/s | p50 | p99 | max | retried attempts per spend | not 201 |");
    println!("|---|---|---|---|---|---|---|");
    for run in &runs {
        let ok = run.latencies.len();
        println!(
            "| {} | {:.0} | {} | {} | {} | {:.2} | {} |",
            run.clients,
            ok as f64 / run.elapsed.as_secs_f64(),
            ms(percentile(&run.latencies, 0.5)),
            ms(percentile(&run.latencies, 0.99)),
            ms(run.latencies.last().copied().unwrap_or_default()),
            run.conflicts / ok.max(1) as f64,
            if run.failures.is_empty() {
                "0".to_string()
            } else {
                format!("{} ({:?})", run.failures.len(), {
                    let mut s = run.failures.clone();
                    s.sort_unstable();
                    s.dedup();
                    s
                })
            }
        );
    }
    println!(
        "\n(latency of accepted spends, from sending the request to the full response; \"retried attempts\" counts optimistic-concurrency conflicts that the server retried)"
    );
    let server = Arc::try_unwrap(server).map_err(|_| anyhow::anyhow!("server still shared"))?;
    server.stop.cancel();
    server.workers.stop().await;
    server.pool.close().await;
    Ok(())
}
