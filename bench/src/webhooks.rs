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

/// How a sender authenticates its deliveries, as the provider of that kind does.
#[derive(Clone)]
pub enum Signing {
    /// Standard Webhooks v1: HMAC-SHA256 of `id.timestamp.body` under the source's key.
    Standard { key: Vec<u8> },
    /// SendGrid: ECDSA P-256/SHA-256 over the timestamp followed by the body.
    Sendgrid { key: p256::ecdsa::SigningKey },
    /// Mailgun: HMAC-SHA256 of timestamp + a fresh token under the signing key, in the body.
    Mailgun { key: Vec<u8> },
}

/// A webhook source of some kind and a campaign whose enrollments the events reach.
pub struct Sender {
    server: Arc<Server>,
    source: String,
    signing: Signing,
    campaign: String,
    next: Arc<AtomicUsize>,
}

impl Sender {
    /// The same enrollments, delivered by another source (event ids stay unique).
    pub fn through(&self, source: &str, signing: Signing) -> Arc<Self> {
        Arc::new(Self {
            server: self.server.clone(),
            source: source.to_string(),
            signing,
            campaign: self.campaign.clone(),
            next: self.next.clone(),
        })
    }

    /// Signs and posts one delivery, as the source's provider does.
    async fn post(&self, events: Vec<Value>) -> anyhow::Result<reqwest::Response> {
        let ts = chrono::Utc::now().timestamp();
        let url = format!("{}/webhooks/{}", self.server.address, self.source);
        let request = self
            .server
            .client
            .post(url)
            .header("content-type", "application/json");
        let request = match &self.signing {
            Signing::Standard { key } => {
                let body = serde_json::to_vec(&events)?;
                let id = format!("msg_{}", self.next.fetch_add(1, Ordering::Relaxed));
                let mut mac = Hmac::<Sha256>::new_from_slice(key)?;
                mac.update(format!("{id}.{ts}.").as_bytes());
                mac.update(&body);
                let signature = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
                request
                    .header("webhook-id", id)
                    .header("webhook-timestamp", ts.to_string())
                    .header("webhook-signature", signature)
                    .body(body)
            }
            Signing::Sendgrid { key } => {
                use p256::ecdsa::signature::Signer;
                let body = serde_json::to_vec(&events)?;
                let mut signed = ts.to_string().into_bytes();
                signed.extend_from_slice(&body);
                let signature: p256::ecdsa::Signature = key.sign(&signed);
                request
                    .header(
                        "X-Twilio-Email-Event-Webhook-Signature",
                        STANDARD.encode(signature.to_der().as_bytes()),
                    )
                    .header("X-Twilio-Email-Event-Webhook-Timestamp", ts.to_string())
                    .body(body)
            }
            Signing::Mailgun { key } => {
                let [event] = <[Value; 1]>::try_from(events)
                    .map_err(|_| anyhow::anyhow!("Mailgun posts one event at a time"))?;
                let token = format!("{:050x}", self.next.fetch_add(1, Ordering::Relaxed));
                let mut mac = Hmac::<Sha256>::new_from_slice(key)?;
                mac.update(ts.to_string().as_bytes());
                mac.update(token.as_bytes());
                let signature: String = mac
                    .finalize()
                    .into_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                request.body(serde_json::to_vec(&json!({
                    "signature": {"timestamp": ts.to_string(), "token": token, "signature": signature},
                    "event-data": event,
                }))?)
            }
        };
        Ok(request.send().await?)
    }

    async fn deliver(&self, events: Vec<Value>) -> anyhow::Result<Value> {
        Ok(self.post(events).await?.error_for_status()?.json().await?)
    }

    /// `n` new events in the source's provider's own shape, spread over the enrollments.
    fn events(&self, n: usize, contacts: usize, campaign: &str) -> Vec<Value> {
        (0..n)
            .map(|_| {
                let i = self.next.fetch_add(1, Ordering::Relaxed);
                let email = format!("w{}@example.com", i % contacts);
                match &self.signing {
                    Signing::Standard { .. } => json!({
                        "id": format!("evt_{i}"),
                        "type": (["sent", "delivered", "opened", "clicked"][i % 4]),
                        "campaign_id": campaign,
                        "email": email,
                        "occurred_at": "2026-11-01T09:00:00Z",
                    }),
                    Signing::Sendgrid { .. } => json!({
                        "email": email,
                        "timestamp": 1_793_523_600,
                        "event": (["processed", "delivered", "open", "click"][i % 4]),
                        "sg_event_id": format!("sg_{i}"),
                        "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
                        "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
                        "category": ["outreach"],
                        "useragent": "Mozilla/5.0", "ip": "203.0.113.7",
                        "leadledger_campaign_id": campaign,
                    }),
                    Signing::Mailgun { .. } => json!({
                        "event": (["accepted", "delivered", "opened", "clicked"][i % 4]),
                        "timestamp": 1_793_523_600.25,
                        "id": format!("mg_{i}"),
                        "recipient": email,
                        "log-level": "info",
                        "message": {"headers": {"message-id": "bench@mg.example.com"}},
                        "user-variables": {"leadledger_campaign_id": campaign},
                    }),
                }
            })
            .collect()
    }

    /// [`Self::measure`], failing when any delivery was refused (a figure of refusals
    /// would be no figure of ingestion).
    pub async fn measure_accepted(
        self: &Arc<Self>,
        batch: usize,
        senders: usize,
        duration: Duration,
    ) -> anyhow::Result<Measured> {
        let m = self.measure(batch, senders, duration).await?;
        anyhow::ensure!(
            m.failures.is_empty(),
            "deliveries to {} refused: {}",
            self.source,
            m.failures_summary()
        );
        Ok(m)
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
        source: "bench".into(),
        signing: Signing::Standard { key },
        campaign,
        next: Arc::new(AtomicUsize::new(0)),
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
                .measure_accepted(batch, senders, Duration::from_secs(seconds))
                .await?;
            println!(
                "| {batch} | {senders} | {:.0} | {:.0} | {} | {} |",
                m.per_second(),
                m.units_per_second(),
                ms(m.p50()),
                ms(m.p99()),
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

/// `leadledger-bench providers`: the provider kinds' ingestion beside Standard Webhooks in
/// one run, on the same 2,000 enrollments: SendGrid batches of 100 and 1,000 events
/// (ECDSA-signed) and Mailgun single events (HMAC over timestamp and token, each token
/// spent once).
pub async fn providers(seconds: u64) -> anyhow::Result<()> {
    let server = Arc::new(start().await?);
    let standard = setup(&server).await?;
    let (_, admin) = leadledger::app::keys::create_key(
        &server.pool,
        "bench providers",
        leadledger::app::keys::Scope::Admin,
    )
    .await?;
    let sendgrid_key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let public_key = {
        use p256::pkcs8::EncodePublicKey;
        STANDARD.encode(sendgrid_key.verifying_key().to_public_key_der()?.as_bytes())
    };
    let mailgun_key = "key-bench-0123456789abcdef";
    for body in [
        json!({"name": "sendgrid", "kind": "sendgrid", "public_key": public_key}),
        json!({"name": "mailgun", "kind": "mailgun", "signing_key": mailgun_key}),
    ] {
        server
            .client
            .post(format!("{}/v1/webhook-sources", server.address))
            .bearer_auth(&admin)
            .json(&body)
            .send()
            .await?
            .error_for_status()?;
    }
    let sendgrid = standard.through("sendgrid", Signing::Sendgrid { key: sendgrid_key });
    let mailgun = standard.through(
        "mailgun",
        Signing::Mailgun {
            key: mailgun_key.as_bytes().to_vec(),
        },
    );
    println!(
        "## Provider sources (`POST /webhooks/{{source}}`, {CONTACTS} enrollments, {seconds} s per row)\n"
    );
    println!("| source | events/request | senders | deliveries/s | events/s | p50 | p99 |");
    println!("|---|---|---|---|---|---|---|");
    let rows: [(&str, &Arc<Sender>, usize, usize); 10] = [
        ("standard", &standard, 1, 8),
        ("mailgun", &mailgun, 1, 1),
        ("mailgun", &mailgun, 1, 8),
        ("mailgun", &mailgun, 1, 32),
        ("standard", &standard, 100, 1),
        ("sendgrid", &sendgrid, 100, 1),
        ("sendgrid", &sendgrid, 100, 8),
        ("standard", &standard, 1000, 1),
        ("sendgrid", &sendgrid, 1000, 1),
        ("sendgrid", &sendgrid, 1000, 8),
    ];
    for (name, sender, batch, senders) in rows {
        let m = sender
            .measure_accepted(batch, senders, Duration::from_secs(seconds))
            .await?;
        println!(
            "| {name} | {batch} | {senders} | {:.1} | {:.0} | {} | {} |",
            m.per_second(),
            m.units_per_second(),
            ms(m.p50()),
            ms(m.p99()),
        );
    }
    Ok(())
}
