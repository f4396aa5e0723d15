//! Contact upserts through a load balancer in front of running `leadledger serve` processes
//! (`scripts/cluster-bench` starts `scripts/cluster` and runs this against 3 processes,
//! then 1), sampling the read replica's lag from the processes' `/metrics` meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::measure::{Outcome, closed_loop, ms};
use crate::wire::Wire;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

pub async fn run(
    url: String,
    key: String,
    clients: usize,
    seconds: u64,
    metrics: Vec<String>,
    label: String,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .timeout(Duration::from_secs(30))
        .build()?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let counter = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (client, sampling) = (client.clone(), sampling.clone());
        tokio::spawn(async move {
            let (mut bytes, mut secs) = (0f64, 0f64);
            while sampling.load(Ordering::Relaxed) {
                for m in &metrics {
                    if let Ok(r) = client.get(m).send().await
                        && let Ok(text) = r.text().await
                    {
                        bytes = bytes.max(metric(&text, "leadledger_replica_lag_bytes"));
                        secs = secs.max(metric(&text, "leadledger_replica_lag_seconds"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (bytes, secs)
        })
    };
    let wire = Arc::new(Wire::new(&url, &key, clients)?);
    let op = move |client: usize| {
        let (wire, run_id, counter) = (wire.clone(), run_id.clone(), counter.clone());
        async move {
            let i = counter.fetch_add(1, Ordering::Relaxed);
            let body = serde_json::json!({"email": format!("c{i}-{run_id}@example.com"), "first_name": "Bench"});
            let key = format!("{run_id}-{i}");
            let r = wire
                .post_json(
                    client,
                    "/v1/contacts",
                    &[("Idempotency-Key", &key)],
                    serde_json::to_vec(&body)?,
                )
                .await;
            Ok(match r {
                Ok((status, _)) if status.is_success() => Outcome::Done(1),
                Ok((status, _)) => Outcome::Failed(status.as_str().to_string()),
                Err(_) => Outcome::Failed("no answer".into()),
            })
        }
    };
    // A warm-up second, then the measurement.
    closed_loop(clients, Duration::from_secs(1), op.clone()).await?;
    let measured = closed_loop(clients, Duration::from_secs(seconds), op).await?;
    sampling.store(false, Ordering::Relaxed);
    let (lag_bytes, lag_secs) = sampler.await?;
    println!(
        "| {label} | {clients} | {:.0} | {} | {} | {} | {lag_bytes:.0} B / {} |",
        measured.per_second(),
        ms(measured.p50()),
        ms(measured.p99()),
        measured.failures_summary(),
        ms(Duration::from_secs_f64(lag_secs)),
    );
    Ok(())
}
