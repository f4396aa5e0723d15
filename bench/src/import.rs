//! `leadledger-bench import`: a 10,000-row contact import over HTTP, CSV and JSON, into an
//! empty database and again over the same contacts (every row an update).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::measure::ms;
use crate::{Server, start};

pub(crate) fn csv(rows: usize, generation: usize) -> String {
    let mut out = String::from("email,first_name,last_name,company,title,custom.source\n");
    for i in 0..rows {
        out.push_str(&format!(
            "person{i}@example{}.com,First{i},\"Last, {i}\",Company {} {generation},Title {generation},list {generation}\n",
            i % 97,
            i % 500
        ));
    }
    out
}

pub(crate) async fn post(
    server: &Server,
    content_type: &str,
    body: String,
) -> anyhow::Result<(Duration, Value)> {
    let started = Instant::now();
    let response = server
        .client
        .post(format!("{}/v1/contacts/import?mode=atomic", server.address))
        .bearer_auth(&server.key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await?
        .error_for_status()?;
    let report: Value = response.json().await?;
    Ok((started.elapsed(), report))
}

pub async fn run(rows: usize, runs: usize) -> anyhow::Result<()> {
    let server = start().await?;
    println!("## Contact import ({rows} rows, `POST /v1/contacts/import?mode=atomic`)\n");
    println!(
        "| run | new contacts (CSV) | same contacts updated (CSV) | same contacts unchanged (JSON) |"
    );
    println!("|---|---|---|---|");
    let mut created_times = Vec::new();
    for run in 0..runs {
        // A fresh set of addresses per run, so "new" really is new.
        let body = csv(rows, 0).replace("@example", &format!("@run{run}-example"));
        let (created, report) = post(&server, "text/csv", body).await?;
        anyhow::ensure!(report["created"] == rows, "all rows created: {report}");
        let body = csv(rows, 1).replace("@example", &format!("@run{run}-example"));
        let (updated, report) = post(&server, "text/csv", body).await?;
        anyhow::ensure!(report["updated"] == rows, "all rows updated: {report}");
        let json: Vec<Value> = (0..rows)
            .map(|i| serde_json::json!({"email": format!("person{i}@run{run}-example{}.com", i % 97)}))
            .collect();
        let (unchanged, report) =
            post(&server, "application/json", serde_json::to_string(&json)?).await?;
        anyhow::ensure!(report["unchanged"] == rows, "all rows unchanged: {report}");
        println!(
            "| {} | {} | {} | {} |",
            run + 1,
            ms(created),
            ms(updated),
            ms(unchanged)
        );
        created_times.push(created);
    }
    created_times.sort();
    println!(
        "\nmedian new-contact import: {} for {rows} rows ({:.0} rows/s); target: well under 10 s\n",
        ms(created_times[created_times.len() / 2]),
        rows as f64 / created_times[created_times.len() / 2].as_secs_f64()
    );
    server.stop.cancel();
    server.workers.stop().await;
    server.pool.close().await;
    Ok(())
}
