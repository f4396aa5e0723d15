//! `leadledger-bench console`: how long each web-console page takes to render over a large
//! log. It writes the `rebuild` benchmark's realistic log (contacts, 200 campaigns,
//! enrollments, provider reports, spends) straight through the store, lets the server's
//! runners apply it, adds parked events and dead letters, then times every console page
//! over HTTP, signed in as a console user is (the session cookie), one client.

use std::time::{Duration, Instant};

use anyhow::Context;
use uuid::Uuid;

use crate::measure::{ms, percentile};
use crate::rebuild::Generator;

pub(crate) async fn run(events: u64, samples: usize) -> anyhow::Result<()> {
    let server = std::sync::Arc::new(crate::start().await?);
    let mut generator = Generator::new(&server.pool).await?;
    let started = Instant::now();
    while generator.written < events {
        generator.chunk(&server.pool).await?;
    }
    let generated = started.elapsed();
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
    // The log was written around the server, so its budget streams (tens of thousands of
    // spends each) have no snapshot; one spend through the API on each writes the snapshot
    // the server would have kept all along.
    for (budget, _) in &generator.budgets {
        server
            .client
            .post(format!("{}/v1/budgets/{budget}/spend", server.address))
            .bearer_auth(&server.key)
            .json(&serde_json::json!({"amount": "0.01", "category": "ai"}))
            .send()
            .await?
            .error_for_status()?;
    }
    // A webhook backlog: 2,000 parked events and 2,000 dead letters.
    sqlx::query(
        "INSERT INTO webhook_parked (id, source, event_id, enrollment_id, kind, occurred_at,
                                     next_attempt_at, attempts, last_error, dead_lettered_at)
         SELECT gen_random_uuid(), 'esp', 'ev-' || n, gen_random_uuid(), 'opened',
                now() - interval '1 day', now() + interval '1 hour', n % 9,
                CASE WHEN n % 2 = 0 THEN 'no enrollment after 9 attempts' END,
                CASE WHEN n % 2 = 0 THEN now() - (n || ' seconds')::interval END
         FROM generate_series(1, 4000) AS n",
    )
    .execute(&server.pool)
    .await?;
    let contact: Uuid = sqlx::query_scalar(
        "SELECT contact_id FROM enrollments_view ORDER BY enrolled_at DESC, id DESC LIMIT 1",
    )
    .fetch_one(&server.pool)
    .await
    .context("a contact")?;
    let campaign = generator.campaigns[0];
    let pages = [
        ("overview", "/console".to_string()),
        ("campaigns", "/console/campaigns".into()),
        ("campaign", format!("/console/campaigns/{campaign}")),
        (
            "campaign, replied only",
            format!("/console/campaigns/{campaign}?status=replied"),
        ),
        ("contacts", "/console/contacts".into()),
        ("contacts, search", "/console/contacts?q=company+42".into()),
        ("contact", format!("/console/contacts/{contact}")),
        ("webhooks", "/console/webhooks".into()),
        ("budgets & costs", "/console/budgets".into()),
        ("operations", "/console/operations".into()),
    ];
    let cookie = format!("ll_console={}", server.key);
    println!(
        "console pages over {} events ({:.0} s to write), {samples} requests each, one client:",
        generator.written,
        generated.as_secs_f64()
    );
    for (name, path) in &pages {
        let mut times = Vec::with_capacity(samples);
        let mut bytes = 0;
        for _ in 0..samples {
            let start = Instant::now();
            let response = server
                .client
                .get(format!("{}{path}", server.address))
                .header("cookie", &cookie)
                .send()
                .await?;
            anyhow::ensure!(response.status() == 200, "{path}: {}", response.status());
            bytes = response.bytes().await?.len();
            times.push(start.elapsed());
        }
        times.sort();
        println!(
            "  {name:<24} p50 {}  p99 {}  max {}  ({} KiB)",
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(*times.last().unwrap_or(&Duration::ZERO)),
            bytes / 1024
        );
    }
    crate::stop(server).await?;
    Ok(())
}
