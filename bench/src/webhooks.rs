//! `leadledger-bench webhooks`: signed webhook ingestion over HTTP (batches of 1 and of
//! 100 events, at 1, 8 and 32 concurrent senders), and the parked set at 100,000 events.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::measure::{Measured, Outcome, closed_loop, ms, percentile};
use crate::{Server, start};

/// A webhook source with its secret and a campaign whose enrollments the events reach.
pub struct Sender {
    server: Arc<Server>,
    key: Vec<u8>,
    campaign: String,
    next: AtomicUsize,
}

impl Sender {
    /// Signs and posts one delivery (Standard Webhooks v1).
    async fn post(&self, events: Vec<Value>) -> anyhow::Result<reqwest::Response> {
        let body = serde_json::to_vec(&events)?;
        let id = format!("msg_{}", self.next.fetch_add(1, Ordering::Relaxed));
        let ts = chrono::Utc::now().timestamp();
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key)?;
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(&body);
        let signature = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        Ok(self
            .server
            .client
            .post(format!("{}/webhooks/bench", self.server.address))
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await?)
    }

    async fn deliver(&self, events: Vec<Value>) -> anyhow::Result<Value> {
        Ok(self.post(events).await?.error_for_status()?.json().await?)
    }

    fn events(&self, n: usize, contacts: usize, campaign: &str) -> Vec<Value> {
        (0..n)
            .map(|_| {
                let i = self.next.fetch_add(1, Ordering::Relaxed);
                let kind = ["sent", "delivered", "opened", "clicked"][i % 4];
                json!({
                    "id": format!("evt_{i}"),
                    "type": kind,
                    "campaign_id": campaign,
                    "email": format!("w{}@example.com", i % contacts),
                    "occurred_at": "2026-11-01T09:00:00Z",
                })
            })
            .collect()
    }

    /// `senders` concurrent senders, each delivering batches of `batch` new events (spread
    /// over the enrollments) for `duration`. Units are events.
    pub async fn measure(
        self: &Arc<Self>,
        batch: usize,
        senders: usize,
        duration: Duration,
    ) -> anyhow::Result<Measured> {
        let this = self.clone();
        closed_loop(senders, duration, move |_| {
            let this = this.clone();
            async move {
                let events = this.events(batch, CONTACTS, &this.campaign);
                let response = this.post(events).await?;
                let status = response.status().as_u16();
                response.bytes().await?;
                Ok(if status == 200 {
                    Outcome::Done(batch as u64)
                } else {
                    Outcome::Failed(status.to_string())
                })
            }
        })
        .await
    }
}

const CONTACTS: usize = 2_000;

/// Makes the webhook source `bench`, a campaign, and 2,000 contacts enrolled in it. Run it
/// before anything else creates contacts: it enrolls every contact there is.
pub async fn setup(server: &Arc<Server>) -> anyhow::Result<Arc<Sender>> {
    let (_, admin) = leadledger::app::keys::create_key(
        &server.pool,
        "bench admin",
        leadledger::app::keys::Scope::Admin,
    )
    .await?;
    let created: Value = server
        .client
        .post(format!("{}/v1/webhook-sources", server.address))
        .bearer_auth(&admin)
        .json(&json!({"name": "bench"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let secret = created["secret"].as_str().unwrap_or_default();
    let key = STANDARD.decode(secret.trim_start_matches("whsec_"))?;
    let campaign: Value = server
        .client
        .post(format!("{}/v1/campaigns", server.address))
        .bearer_auth(&server.key)
        .json(&json!({"name": "webhooks"}))
        .send()
        .await?
        .json()
        .await?;
    let campaign = campaign["id"].as_str().unwrap_or_default().to_string();
    let rows: Vec<Value> = (0..CONTACTS)
        .map(|i| json!({"email": format!("w{i}@example.com")}))
        .collect();
    server
        .client
        .post(format!("{}/v1/contacts/import", server.address))
        .bearer_auth(&server.key)
        .json(&rows)
        .send()
        .await?
        .error_for_status()?;
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE aggregate_type = 'contact' AND sequence = 1",
    )
    .fetch_all(&server.pool)
    .await?;
    for chunk in ids.chunks(1000) {
        server
            .client
            .post(format!(
                "{}/v1/campaigns/{campaign}/enrollments",
                server.address
            ))
            .bearer_auth(&server.key)
            .json(&json!({"contact_ids": chunk}))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(Arc::new(Sender {
        server: server.clone(),
        key,
        campaign,
        next: AtomicUsize::new(0),
    }))
}

pub async fn run(seconds: u64) -> anyhow::Result<()> {
    let server = Arc::new(start().await?);
    let sender = setup(&server).await?;

    println!(
        "## Webhook ingestion (`POST /webhooks/{{source}}`, signed, {CONTACTS} enrollments)\n"
    );
    println!(
        "Each run sends for {seconds} s; events spread over the enrollments (sent, delivered, opened, clicked).\n"
    );
    println!("| batch | senders | deliveries/s | events/s | p50 | p99 |");
    println!("|---|---|---|---|---|---|");
    for batch in [1usize, 100] {
        for senders in [1usize, 8, 32] {
            let m = sender
                .measure(batch, senders, Duration::from_secs(seconds))
                .await?;
            println!(
                "| {batch} | {senders} | {:.0} | {:.0} | {} | {} |",
                m.per_second(),
                m.units_per_second(),
                ms(m.p50()),
                ms(m.p99()),
            );
            anyhow::ensure!(
                m.failures.is_empty(),
                "deliveries refused: {}",
                m.failures_summary()
            );
        }
    }

    // The parked set at scale: 100,000 events for contacts not enrolled anywhere yet.
    let parked_campaign = sender.campaign.clone();
    let started = Instant::now();
    for b in 0..100 {
        let events: Vec<Value> = (0..1000)
            .map(|i| {
                let n = b * 1000 + i;
                json!({"id": format!("park_{n}"), "type": "opened", "campaign_id": parked_campaign,
                       "email": format!("later{n}@example.com"), "occurred_at": "2026-11-01T09:00:00Z"})
            })
            .collect();
        sender.deliver(events).await?;
    }
    let parking = started.elapsed();
    let server = &sender.server;
    let mut list_times = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        server
            .client
            .get(format!("{}/v1/webhooks/parked?limit=50", server.address))
            .bearer_auth(&server.key)
            .send()
            .await?
            .error_for_status()?;
        list_times.push(started.elapsed());
    }
    list_times.sort();
    let one_more = Instant::now();
    sender
        .deliver(sender.events(1, CONTACTS, &parked_campaign))
        .await?;
    let delivery_with_parked = one_more.elapsed();
    // Enroll one of the parked contacts and time until its event is applied.
    let contact: Value = server
        .client
        .post(format!("{}/v1/contacts", server.address))
        .bearer_auth(&server.key)
        .json(&json!({"email": "later54321@example.com"}))
        .send()
        .await?
        .json()
        .await?;
    let enrolled_at = Instant::now();
    let body: Value = server
        .client
        .post(format!(
            "{}/v1/campaigns/{parked_campaign}/enrollments",
            server.address
        ))
        .bearer_auth(&server.key)
        .json(&json!({"contact_ids": [contact["id"]]}))
        .send()
        .await?
        .json()
        .await?;
    let enrollment = body["enrolled"][0]["enrollment_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    loop {
        let one: Value = server
            .client
            .get(format!("{}/v1/enrollments/{enrollment}", server.address))
            .bearer_auth(&server.key)
            .send()
            .await?
            .json()
            .await?;
        if one["status"] == "opened" || enrolled_at.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let unparked = enrolled_at.elapsed();
    println!("\n### 100,000 parked events\n");
    println!("| measure | time |");
    println!("|---|---|");
    println!(
        "| parking 100,000 events (100 signed deliveries of 1,000) | {} ({:.0} events/s) |",
        ms(parking),
        100_000.0 / parking.as_secs_f64()
    );
    println!(
        "| `GET /v1/webhooks/parked?limit=50`, p50 / p99 of 50 | {} / {} |",
        ms(percentile(&list_times, 0.5)),
        ms(percentile(&list_times, 0.99))
    );
    println!(
        "| one more delivery with 100,000 parked | {} |",
        ms(delivery_with_parked)
    );
    println!(
        "| enrollment → its parked event applied (feed-driven) | {} |",
        ms(unparked)
    );
    Ok(())
}
