//! `leadledger-bench spends`: spend throughput and latency on one hot budget, with 1, 8
//! and 32 clients spending on it at once over HTTP. Every spend is the real path: the
//! budget's limit is checked (the limit is far away, so nothing is refused) and the spend
//! commits under optimistic concurrency, so clients of one budget contend for its stream.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::measure::{Measured, Outcome, closed_loop, cores, ms};
use crate::wire::Wire;
use crate::{Server, start};

/// What one client run measured.
pub struct SpendRun {
    pub measured: Measured,
    /// Attempts that lost the race for the budget's stream and were retried by the server.
    pub conflicts: f64,
}

impl SpendRun {
    pub fn retries_per_spend(&self) -> f64 {
        self.conflicts / self.measured.ops().max(1) as f64
    }
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

async fn spend_from(
    server: &Arc<Server>,
    budget: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Measured> {
    let wire = Arc::new(Wire::new(&server.address, &server.key, clients)?);
    let path = Arc::new(format!("/v1/budgets/{budget}/spend"));
    closed_loop(clients, duration, move |client| {
        let (wire, path) = (wire.clone(), path.clone());
        async move {
            let body = json!({"amount": "0.01", "category": "ai", "model": "bench", "input_tokens": 100, "output_tokens": 10});
            let (status, _) = wire
                .post_json(client, &path, &[], serde_json::to_vec(&body)?)
                .await?;
            Ok(if status == 201 {
                Outcome::Done(1)
            } else {
                Outcome::Failed(status.as_str().to_string())
            })
        }
    })
    .await
}

/// One measurement: a fresh budget (so every run starts from the same stream length),
/// `warm_up` of spending, then `duration` timed; then the budget must show exactly the
/// accepted spends: nothing lost, nothing doubled.
pub async fn measure(
    server: &Arc<Server>,
    clients: usize,
    duration: Duration,
    warm_up: Duration,
) -> anyhow::Result<SpendRun> {
    let budget = create_budget(server, &format!("hot {clients}")).await?;
    let warmed = spend_from(server, &budget, clients, warm_up).await?.ops();
    let before = conflicts(server).await?;
    let measured = spend_from(server, &budget, clients, duration).await?;
    let conflicts = conflicts(server).await? - before;
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
    let accepted = (warmed + measured.ops()) as u64;
    let spent: Decimal = shown["spent"].as_str().context("spent")?.parse()?;
    // Compared as numbers: "5.40" and "5.4" are the same amount.
    let expected = Decimal::new(accepted as i64, 2);
    anyhow::ensure!(
        version == 1 + accepted && spent == expected,
        "{clients} clients: {accepted} spends accepted but the budget shows version {version}, spent {spent}"
    );
    Ok(SpendRun {
        measured,
        conflicts,
    })
}

pub async fn run(clients: Vec<usize>, seconds: u64) -> anyhow::Result<()> {
    let server = Arc::new(start().await?);
    println!("## Spends on one hot budget ({} cores)\n", cores());
    let mut runs = Vec::new();
    for &n in &clients {
        let run = measure(
            &server,
            n,
            Duration::from_secs(seconds),
            Duration::from_secs(1),
        )
        .await?;
        eprintln!(
            "{n} clients: {} spends in {:.1} s, the budget matching them",
            run.measured.ops(),
            run.measured.elapsed.as_secs_f64(),
        );
        runs.push(run);
    }
    println!(
        "`POST /v1/budgets/{{id}}/spend` on one budget, {seconds} s per row, each client sending its next spend as soon as the last is answered.\n"
    );
    println!("| clients | spends/s | p50 | p99 | max | retried attempts per spend | not 201 |");
    println!("|---|---|---|---|---|---|---|");
    for run in &runs {
        let m = &run.measured;
        println!(
            "| {} | {:.0} | {} | {} | {} | {:.2} | {} |",
            m.clients,
            m.per_second(),
            ms(m.p50()),
            ms(m.p99()),
            ms(m.max()),
            run.retries_per_spend(),
            m.failures_summary()
        );
    }
    println!(
        "\n(latency of accepted spends, from sending the request to the full response; \"retried attempts\" counts optimistic-concurrency conflicts that the server retried)"
    );
    crate::stop(server).await
}
