//! Provider webhooks: real HMAC signatures, per-event outcomes, duplicates, parking until
//! the enrollment exists (across a restart), dead letters, and order independence.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::helpers::{TestApp, assert_problem, harness, spawn_app, spawn_app_with};
use crate::lifecycle::{data_dir, leadledger, serve};
use crate::rebuild::settle;

pub(crate) struct Source {
    name: String,
    key: Vec<u8>,
}

/// A delivery to a source: its name, headers and body.
type Case<'a> = (&'a str, Vec<(&'a str, String)>, Vec<u8>);

pub(crate) async fn source(app: &TestApp, name: &str) -> Source {
    let response = app
        .client
        .post(app.url("/v1/webhook-sources"))
        .bearer_auth(&app.admin_key)
        .json(&json!({"name": name}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let body: Value = response.json().await.unwrap();
    let secret = body["secret"].as_str().unwrap();
    Source {
        name: name.to_string(),
        key: STANDARD
            .decode(secret.strip_prefix("whsec_").unwrap())
            .unwrap(),
    }
}

pub(crate) fn signature(key: &[u8], id: &str, ts: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn deliver_raw(
    base: &str,
    source: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/webhooks/{source}"))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        request = request.header(*k, v);
    }
    request.send().await.unwrap()
}

pub(crate) async fn deliver(base: &str, source: &Source, webhook_id: &str, body: &Value) -> Value {
    let bytes = serde_json::to_vec(body).unwrap();
    let ts = now();
    let headers = [
        ("webhook-id", webhook_id.to_string()),
        ("webhook-timestamp", ts.to_string()),
        (
            "webhook-signature",
            signature(&source.key, webhook_id, ts, &bytes),
        ),
    ];
    let response = deliver_raw(base, &source.name, &headers, bytes).await;
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.unwrap()
}

/// A campaign with an enrolled contact: (campaign id, enrollment id).
pub(crate) async fn enrolled(app: &TestApp, email: &str) -> (String, String) {
    let campaign = app.create_campaign(&format!("for {email}")).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let contact: Value = app
        .post("/v1/contacts", &json!({"email": email}))
        .await
        .json()
        .await
        .unwrap();
    let body: Value = app
        .post(
            &format!("/v1/campaigns/{campaign}/enrollments"),
            &json!({"contact_ids": [contact["id"]]}),
        )
        .await
        .json()
        .await
        .unwrap();
    (
        campaign,
        body["enrolled"][0]["enrollment_id"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

pub(crate) fn event(id: &str, kind: &str, campaign: &str, email: &str, at: &str) -> Value {
    json!({"id": id, "type": kind, "campaign_id": campaign, "email": email, "occurred_at": at})
}

async fn outcomes(response: &Value) -> Vec<String> {
    response["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect()
}

async fn recorded(app: &TestApp) -> [i64; 4] {
    let mut out = [0; 4];
    for (i, table) in [
        "events",
        "webhook_event_ids",
        "webhook_parked",
        "webhook_deliveries",
    ]
    .iter()
    .enumerate()
    {
        out[i] = app.count(table).await;
    }
    out
}

#[tokio::test]
async fn a_signed_delivery_is_applied_and_a_repeated_delivery_gets_the_same_response() {
    let app = spawn_app().await;
    let src = source(&app, "mailer").await;
    let (campaign, enrollment) = enrolled(&app, "ann@example.com").await;
    let body = event(
        "evt_1",
        "delivered",
        &campaign,
        "Ann@Example.com",
        "2026-11-01T10:00:00Z",
    );
    let first = deliver(&app.address, &src, "msg_1", &body).await;
    assert_eq!(outcomes(&first).await, vec!["applied"]);
    assert_eq!(first["results"][0]["id"], "evt_1");
    let again = deliver(&app.address, &src, "msg_1", &body).await;
    assert_eq!(again, first, "same webhook-id: the same response");
    let other = deliver(&app.address, &src, "msg_2", &body).await;
    assert_eq!(
        outcomes(&other).await,
        vec!["duplicate"],
        "same provider event id, new delivery"
    );
    let one: Value = app
        .read(&format!("/v1/enrollments/{enrollment}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["status"], "delivered");
    assert_eq!(
        one["sent_at"], "2026-11-01T10:00:00Z",
        "implied by delivered"
    );
    assert_eq!(one["version"], 2, "applied once");
}

#[tokio::test]
async fn bad_signatures_old_or_future_timestamps_and_unknown_sources_are_401_and_record_nothing() {
    let app = spawn_app().await;
    let src = source(&app, "mailer").await;
    let (campaign, _) = enrolled(&app, "bob@example.com").await;
    let body = serde_json::to_vec(&event(
        "evt_1",
        "opened",
        &campaign,
        "bob@example.com",
        "2026-11-01T10:00:00Z",
    ))
    .unwrap();
    let before = recorded(&app).await;
    let ts = now();
    let good_sig = signature(&src.key, "msg_1", ts, &body);
    let headers = |id: &str, ts: i64, sig: String| {
        vec![
            ("webhook-id", id.to_string()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", sig),
        ]
    };
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    let cases: Vec<Case> = vec![
        ("mailer", headers("msg_1", ts, good_sig.clone()), tampered),
        (
            "mailer",
            headers(
                "msg_1",
                ts,
                signature(b"not the secret key at all.......", "msg_1", ts, &body),
            ),
            body.clone(),
        ),
        (
            "mailer",
            headers(
                "msg_1",
                ts - 360,
                signature(&src.key, "msg_1", ts - 360, &body),
            ),
            body.clone(),
        ),
        (
            "mailer",
            headers(
                "msg_1",
                ts + 360,
                signature(&src.key, "msg_1", ts + 360, &body),
            ),
            body.clone(),
        ),
        (
            "mailer",
            headers("msg_other", ts, good_sig.clone()),
            body.clone(),
        ),
        (
            "mailer",
            vec![
                ("webhook-id", "msg_1".into()),
                ("webhook-timestamp", ts.to_string()),
            ],
            body.clone(),
        ),
        (
            "mailer",
            vec![
                ("webhook-id", "msg_1".into()),
                ("webhook-signature", good_sig.clone()),
            ],
            body.clone(),
        ),
        (
            "mailer",
            vec![
                ("webhook-timestamp", ts.to_string()),
                ("webhook-signature", good_sig.clone()),
            ],
            body.clone(),
        ),
        (
            "nobody",
            headers("msg_1", ts, good_sig.clone()),
            body.clone(),
        ),
    ];
    for (i, (name, headers, body)) in cases.into_iter().enumerate() {
        let response = deliver_raw(&app.address, name, &headers, body).await;
        assert_eq!(response.status().as_u16(), 401, "case {i}");
        assert_problem(response, 401).await;
    }
    assert_eq!(recorded(&app).await, before, "nothing recorded");
    let huge = vec![b' '; 256 * 1024 + 1];
    let sig = signature(&src.key, "msg_big", ts, &huge);
    let response = deliver_raw(&app.address, "mailer", &headers("msg_big", ts, sig), huge).await;
    assert_problem(response, 413).await;
    // Key rotation: a list with an old signature and the current one is accepted.
    let rotated = format!("v1,{} {good_sig}", STANDARD.encode([7u8; 32]));
    let ok = deliver_raw(
        &app.address,
        "mailer",
        &headers("msg_1", ts, rotated),
        body.clone(),
    )
    .await;
    assert_eq!(ok.status().as_u16(), 200);
}

#[tokio::test]
async fn a_batch_reports_each_event_in_order_and_invalid_events_do_not_stop_the_rest() {
    let app = spawn_app().await;
    let src = source(&app, "batch").await;
    let (campaign, enrollment) = enrolled(&app, "cat@example.com").await;
    let batch = json!([
        event("a", "sent", &campaign, "cat@example.com", "2026-11-01T09:00:00Z"),
        event("b", "teleported", &campaign, "cat@example.com", "2026-11-01T09:01:00Z"),
        {"id": "c", "type": "opened", "campaign_id": campaign, "email": "cat@example.com"},
        event("a", "sent", &campaign, "cat@example.com", "2026-11-01T09:00:00Z"),
        event("d", "opened", &campaign, "not-enrolled@example.com", "2026-11-01T09:02:00Z"),
        {"id": "e", "type": "clicked", "enrollment_id": enrollment, "occurred_at": "2026-11-01T09:03:00Z"},
        "not an object",
    ]);
    let response = deliver(&app.address, &src, "msg_batch", &batch).await;
    assert_eq!(
        outcomes(&response).await,
        vec![
            "applied",
            "rejected",
            "rejected",
            "duplicate",
            "parked",
            "applied",
            "rejected"
        ]
    );
    assert!(
        response["results"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("type")
    );
    assert!(
        response["results"][2]["reason"]
            .as_str()
            .unwrap()
            .contains("occurred_at")
    );
    let one: Value = app
        .read(&format!("/v1/enrollments/{enrollment}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["status"], "clicked");
    assert_eq!(
        one["opened_at"], "2026-11-01T09:03:00Z",
        "implied by the click"
    );
    let bad_json = deliver_raw(
        &app.address,
        "batch",
        &[
            ("webhook-id", "m".into()),
            ("webhook-timestamp", now().to_string()),
            (
                "webhook-signature",
                signature(&src.key, "m", now(), b"{oops"),
            ),
        ],
        b"{oops".to_vec(),
    )
    .await;
    assert_problem(bad_json, 400).await;
}

#[tokio::test]
async fn an_event_before_its_enrollment_is_parked_and_applied_when_the_contact_is_enrolled() {
    let app = spawn_app().await;
    let src = source(&app, "early").await;
    let campaign = app.create_campaign("early").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let response = deliver(
        &app.address,
        &src,
        "msg_early",
        &json!([
            event(
                "r1",
                "replied",
                &campaign,
                "dee@example.com",
                "2026-11-01T12:00:00Z"
            ),
            event(
                "s1",
                "sent",
                &campaign,
                "dee@example.com",
                "2026-11-01T09:00:00Z"
            ),
        ]),
    )
    .await;
    assert_eq!(outcomes(&response).await, vec!["parked", "parked"]);
    let parked: Value = app.read("/v1/webhooks/parked").await.json().await.unwrap();
    assert_eq!(parked["items"].as_array().unwrap().len(), 2);
    assert_eq!(parked["items"][0]["type"], "replied");
    assert!(
        parked["items"][0].get("email").is_none(),
        "parked events keep no address"
    );

    let contact: Value = app
        .post("/v1/contacts", &json!({"email": "dee@example.com"}))
        .await
        .json()
        .await
        .unwrap();
    let body: Value = app
        .post(
            &format!("/v1/campaigns/{campaign}/enrollments"),
            &json!({"contact_ids": [contact["id"]]}),
        )
        .await
        .json()
        .await
        .unwrap();
    let enrollment = body["enrolled"][0]["enrollment_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut status = Value::Null;
    for _ in 0..200 {
        let one: Value = app
            .read(&format!("/v1/enrollments/{enrollment}"))
            .await
            .json()
            .await
            .unwrap();
        status = one["status"].clone();
        if status == "replied" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, "replied", "applied with no further delivery");
    let parked: Value = app.read("/v1/webhooks/parked").await.json().await.unwrap();
    assert!(parked["items"].as_array().unwrap().is_empty());
    let mut metrics = Value::Null;
    for _ in 0..200 {
        metrics = app
            .read(&format!("/v1/campaigns/{campaign}/metrics"))
            .await
            .json()
            .await
            .unwrap();
        if metrics["replied"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(metrics["replied"], 1);
    assert_eq!(metrics["sent"], 1);
    let again = deliver(
        &app.address,
        &src,
        "msg_early_again",
        &json!(event(
            "r1",
            "replied",
            &campaign,
            "dee@example.com",
            "2026-11-01T12:00:00Z"
        )),
    )
    .await;
    assert_eq!(outcomes(&again).await, vec!["duplicate"]);
}

#[tokio::test]
async fn a_parked_event_is_dead_lettered_after_its_attempts_and_can_be_retried() {
    let app = spawn_app().await;
    let src = source(&app, "dead").await;
    let campaign = app.create_campaign("dead").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    deliver(
        &app.address,
        &src,
        "msg_dead",
        &json!(event(
            "x1",
            "opened",
            &campaign,
            "eve@example.com",
            "2026-11-01T09:00:00Z"
        )),
    )
    .await;
    sqlx::query("UPDATE webhook_parked SET attempts = $1 - 1, next_attempt_at = now()")
        .bind(leadledger::app::webhooks::MAX_ATTEMPTS)
        .execute(&app.pool)
        .await
        .unwrap();
    let store = leadledger::store::Store::default();
    let (_, dead) = leadledger::app::webhooks::retry_due(&app.pool, &store, 100)
        .await
        .unwrap();
    assert_eq!(dead, 1);
    let letters: Value = app
        .read("/v1/webhooks/dead-letters")
        .await
        .json()
        .await
        .unwrap();
    let id = letters["items"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        letters["items"][0]["attempts"],
        leadledger::app::webhooks::MAX_ATTEMPTS
    );
    assert!(
        app.read("/v1/webhooks/parked")
            .await
            .json::<Value>()
            .await
            .unwrap()["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    assert_problem(
        app.post(
            &format!("/v1/webhooks/dead-letters/{}/retry", uuid::Uuid::now_v7()),
            &json!({}),
        )
        .await,
        404,
    )
    .await;
    let retried = app
        .post(&format!("/v1/webhooks/dead-letters/{id}/retry"), &json!({}))
        .await;
    assert_eq!(retried.status().as_u16(), 200);
    let parked: Value = app.read("/v1/webhooks/parked").await.json().await.unwrap();
    assert_eq!(parked["items"][0]["id"], id.as_str());
    assert_eq!(parked["items"][0]["attempts"], 0);
}

#[tokio::test]
async fn the_same_events_in_any_order_any_number_of_times_and_batches_give_the_same_result() {
    let app = spawn_app().await;
    let src = source(&app, "order").await;
    let kinds = [
        ("k1", "sent", "2026-11-01T09:00:00Z"),
        ("k2", "delivered", "2026-11-01T09:01:00Z"),
        ("k3", "opened", "2026-11-01T09:30:00Z"),
        ("k4", "clicked", "2026-11-01T09:31:00Z"),
        ("k5", "opened", "2026-11-01T09:10:00Z"),
        ("k6", "deferred", "2026-11-01T09:00:30Z"),
        ("k7", "unsubscribed", "2026-11-01T10:00:00Z"),
        ("k8", "opened", "2026-11-01T11:00:00Z"),
    ];
    // Orders and batchings: (order of event indexes, batch sizes), each delivered twice.
    let plans: [(&[usize], &[usize]); 4] = [
        (&[0, 1, 2, 3, 4, 5, 6, 7], &[8]),
        (&[7, 6, 5, 4, 3, 2, 1, 0], &[1, 1, 1, 1, 1, 1, 1, 1]),
        (&[3, 6, 0, 7, 1, 4, 2, 5], &[3, 2, 3]),
        (&[6, 7, 2, 3, 4, 0, 5, 1], &[5, 3]),
    ];
    let mut results = Vec::new();
    for (n, (order, batches)) in plans.iter().enumerate() {
        let email = format!("perm{n}@example.com");
        let (campaign, enrollment) = enrolled(&app, &email).await;
        let mut start = 0;
        for (b, size) in batches.iter().enumerate() {
            let batch: Vec<Value> = order[start..start + size]
                .iter()
                .map(|&i| {
                    event(
                        &format!("{n}-{}", kinds[i].0),
                        kinds[i].1,
                        &campaign,
                        &email,
                        kinds[i].2,
                    )
                })
                .collect();
            start += size;
            for repeat in 0..2 {
                deliver(
                    &app.address,
                    &src,
                    &format!("p{n}-b{b}-r{repeat}"),
                    &Value::Array(batch.clone()),
                )
                .await;
            }
        }
        let mut one: Value = app
            .read(&format!("/v1/enrollments/{enrollment}"))
            .await
            .json()
            .await
            .unwrap();
        // Every event delivered, not only the unsubscribe: in some orders other events
        // follow it, and the feed may show them a moment later (it ends where every older
        // transaction of the cluster has ended).
        settle(&app.pool).await;
        let mut metrics: Value = app
            .read(&format!("/v1/campaigns/{campaign}/metrics"))
            .await
            .json()
            .await
            .unwrap();
        for (v, keys) in [
            (
                &mut one,
                &["id", "campaign_id", "contact_id", "enrolled_at"][..],
            ),
            (&mut metrics, &["campaign_id"][..]),
        ] {
            for k in keys {
                v.as_object_mut().unwrap().remove(*k);
            }
        }
        results.push((one, metrics));
    }
    for r in &results[1..] {
        assert_eq!(r, &results[0]);
    }
    let (one, metrics) = &results[0];
    assert_eq!(
        one["status"], "unsubscribed",
        "later opens do not undo an unsubscribe"
    );
    assert_eq!(one["opened_at"], "2026-11-01T09:10:00Z");
    assert_eq!(
        one["version"], 9,
        "enrolled + 8 distinct events, repeats ignored"
    );
    assert_eq!(metrics["clicked"], 1);
    assert_eq!(metrics["open_rate"], 100.0);
}

#[tokio::test]
async fn only_an_admin_key_creates_sources_and_names_are_checked() {
    let app = spawn_app().await;
    let response = app
        .post("/v1/webhook-sources", &json!({"name": "mine"}))
        .await;
    assert_problem(response, 403).await;
    for bad in ["", "UPPER", "has space", "-dash-first", &"x".repeat(64)] {
        let response = app
            .client
            .post(app.url("/v1/webhook-sources"))
            .bearer_auth(&app.admin_key)
            .json(&json!({"name": bad}))
            .send()
            .await
            .unwrap();
        assert_problem(response, 422).await;
    }
    source(&app, "twice").await;
    let again = app
        .client
        .post(app.url("/v1/webhook-sources"))
        .bearer_auth(&app.admin_key)
        .json(&json!({"name": "twice"}))
        .send()
        .await
        .unwrap();
    assert_problem(again, 409).await;
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT secret_ciphertext FROM webhook_sources WHERE name = 'twice'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(
        !String::from_utf8_lossy(&stored).contains("whsec_"),
        "stored encrypted"
    );
}

#[tokio::test]
async fn a_parked_event_survives_a_restart_and_is_applied_once_the_contact_is_enrolled() {
    let harness = harness();
    let database = harness.fresh_database().await;
    let url = harness.url(&database);
    let (_keep, data) = data_dir();
    let secret_key = STANDARD.encode([42u8; 32]);
    let command = || {
        let mut c = leadledger(&data);
        c.env("DATABASE_URL", &url)
            .env("LEADLEDGER_SECRET_KEY", &secret_key);
        c
    };
    let added = command()
        .args(["webhooks", "add-source", "esp"])
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let secret = String::from_utf8(added.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    let src = Source {
        name: "esp".into(),
        key: STANDARD
            .decode(secret.strip_prefix("whsec_").unwrap())
            .unwrap(),
    };
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let (_, key) =
        leadledger::app::keys::create_key(&pool, "restart", leadledger::app::keys::Scope::Write)
            .await
            .unwrap();
    let client = reqwest::Client::new();

    let server = serve(command());
    let campaign: Value = client
        .post(format!("{}/v1/campaigns", server.address))
        .bearer_auth(&key)
        .json(&json!({"name": "restart"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let campaign = campaign["id"].as_str().unwrap().to_string();
    let response = deliver(
        &server.address,
        &src,
        "msg_r",
        &event(
            "z1",
            "clicked",
            &campaign,
            "zed@example.com",
            "2026-11-01T09:00:00Z",
        ),
    )
    .await;
    assert_eq!(outcomes(&response).await, vec!["parked"]);
    server.signal(Signal::SIGTERM);
    assert!(server.wait().success());

    let server = serve(command());
    let contact: Value = client
        .post(format!("{}/v1/contacts", server.address))
        .bearer_auth(&key)
        .json(&json!({"email": "zed@example.com"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let enrolled: Value = client
        .post(format!(
            "{}/v1/campaigns/{campaign}/enrollments",
            server.address
        ))
        .bearer_auth(&key)
        .json(&json!({"contact_ids": [contact["id"]]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let enrollment = enrolled["enrolled"][0]["enrollment_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut status = Value::Null;
    for _ in 0..200 {
        let one: Value = client
            .get(format!("{}/v1/enrollments/{enrollment}", server.address))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        status = one["status"].clone();
        if status == "clicked" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, "clicked");
    server.signal(Signal::SIGTERM);
    assert!(server.wait().success());
    pool.close().await;
    harness.drop_database(database);
}

/// A delivery with hand-made headers (to send what no honest provider would).
async fn deliver_signed_as(
    app: &TestApp,
    source: &Source,
    webhook_id: &str,
    ts: &str,
    body: &Value,
) -> reqwest::Response {
    let bytes = serde_json::to_vec(body).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&source.key).unwrap();
    mac.update(format!("{webhook_id}.{ts}.").as_bytes());
    mac.update(&bytes);
    let signature = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    let headers = [
        ("webhook-id", webhook_id.to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", signature),
    ];
    deliver_raw(&app.address, &source.name, &headers, bytes).await
}

#[tokio::test]
async fn a_provider_id_of_255_characters_is_applied_and_a_longer_one_is_rejected_alone() {
    let app = spawn_app().await;
    let src = source(&app, "esp").await;
    let (campaign, enrollment) = enrolled(&app, "long@example.com").await;
    let at = "2026-11-01T09:00:00Z";
    let email = "long@example.com";
    let response = deliver(
        &app.address,
        &src,
        "msg_long",
        &json!([
            event(&"x".repeat(252), "sent", &campaign, email, at),
            // 255 characters of four bytes each: the limit counts characters.
            event(&"\u{1F600}".repeat(255), "delivered", &campaign, email, at),
            event(&"y".repeat(256), "opened", &campaign, email, at),
            event("short", "clicked", &campaign, email, at),
        ]),
    )
    .await;
    assert_eq!(
        outcomes(&response).await,
        vec!["applied", "applied", "rejected", "applied"]
    );
    assert!(
        response["results"][2]["reason"]
            .as_str()
            .unwrap()
            .contains("255 characters")
    );
    let one: Value = app
        .read(&format!("/v1/enrollments/{enrollment}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["status"], "clicked");
}

#[tokio::test]
async fn a_parked_event_its_enrollment_refuses_is_dead_lettered_with_the_reason_not_deleted() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("refused").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let contact: Value = app
        .post("/v1/contacts", &json!({"email": "ref@example.com"}))
        .await
        .json()
        .await
        .unwrap();
    let contact_id = uuid::Uuid::parse_str(contact["id"].as_str().unwrap()).unwrap();
    let campaign_id = uuid::Uuid::parse_str(&campaign).unwrap();
    let enrollment = aggregates::enrollment::enrollment_id_for(campaign_id, contact_id);
    // Parked by an earlier version that took ids the enrollment does not: one too long.
    sqlx::query(
        "INSERT INTO webhook_parked (id, source, event_id, enrollment_id, campaign_id, kind, occurred_at, next_attempt_at)
         VALUES ($1, 'old', $2, $3, $4, 'opened', now() - interval '1 hour', now() + interval '1 hour')",
    )
    .bind(uuid::Uuid::now_v7())
    .bind("z".repeat(400))
    .bind(enrollment)
    .bind(campaign_id)
    .execute(&app.pool)
    .await
    .unwrap();
    let enrolled: Value = app
        .post(
            &format!("/v1/campaigns/{campaign}/enrollments"),
            &json!({"contact_ids": [contact_id]}),
        )
        .await
        .json()
        .await
        .unwrap();
    let position = enrolled["position"].as_str().unwrap();
    let letters: Value = app
        .read(&format!(
            "/v1/webhooks/dead-letters?min_position={position}"
        ))
        .await
        .json()
        .await
        .unwrap();
    let items = letters["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "kept as a dead letter: {letters}");
    assert!(
        items[0]["last_error"].as_str().unwrap().contains("refused"),
        "{letters}"
    );
}

#[tokio::test]
async fn a_conflict_while_retrying_a_parked_event_costs_no_attempt_and_never_dead_letters_it() {
    use aggregates::enrollment::{Enrollment, EnrollmentEvent, ProviderEventKind};
    use leadledger::store::{Loaded, Metadata, Store};
    let app = spawn_app_with(false).await;
    let (campaign, enrollment) = enrolled(&app, "busy@example.com").await;
    let last = leadledger::app::webhooks::MAX_ATTEMPTS - 1;
    sqlx::query(
        "INSERT INTO webhook_parked (id, source, event_id, enrollment_id, campaign_id, kind, occurred_at, next_attempt_at, attempts)
         VALUES ($1, 'esp', 'p1', $2, $3, 'opened', now() - interval '1 hour', now(), $4)",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(uuid::Uuid::parse_str(&enrollment).unwrap())
    .bind(uuid::Uuid::parse_str(&campaign).unwrap())
    .bind(last)
    .execute(&app.pool)
    .await
    .unwrap();
    // Another writer holds the enrollment's next event, uncommitted, while the retry runs.
    let store = Store::default();
    let mut other = app.pool.begin().await.unwrap();
    let mut loaded: Loaded<Enrollment> = store.load(&mut other, &enrollment).await.unwrap();
    let event = EnrollmentEvent::ProviderEventRecorded {
        provider_event_id: "esp:other".into(),
        kind: ProviderEventKind::Sent,
        occurred_at: chrono::Utc::now(),
    };
    store
        .append(&mut other, &mut loaded, &[event], &Metadata::default())
        .await
        .unwrap();
    let pool = app.pool.clone();
    let retry = tokio::spawn(async move {
        leadledger::app::webhooks::retry_due(&pool, &Store::default(), 100)
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    other.commit().await.unwrap();
    let (applied, dead) = retry.await.unwrap();
    assert_eq!((applied, dead), (0, 0));
    let (attempts, dead_at, error): (i32, Option<chrono::DateTime<chrono::Utc>>, Option<String>) =
        sqlx::query_as("SELECT attempts, dead_lettered_at, last_error FROM webhook_parked")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(attempts, last, "a conflict is not an attempt");
    assert!(
        dead_at.is_none(),
        "its enrollment exists: never dead-lettered for that"
    );
    assert!(!error.unwrap_or_default().contains("does not exist"));
    // The next round applies it.
    sqlx::query("UPDATE webhook_parked SET next_attempt_at = now()")
        .execute(&app.pool)
        .await
        .unwrap();
    let (applied, _) = leadledger::app::webhooks::retry_due(&app.pool, &Store::default(), 100)
        .await
        .unwrap();
    assert_eq!(applied, 1);
    assert_eq!(app.count("webhook_parked").await, 0);
}

#[tokio::test]
async fn events_for_unknown_campaigns_or_enrollments_or_from_the_future_are_rejected_and_counted() {
    let app = spawn_app().await;
    let src = source(&app, "placing").await;
    let campaign = app.create_campaign("placing").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let unknown = uuid::Uuid::now_v7().to_string();
    let future = (chrono::Utc::now() + chrono::TimeDelta::minutes(10)).to_rfc3339();
    let soon = (chrono::Utc::now() + chrono::TimeDelta::minutes(2)).to_rfc3339();
    let at = "2026-11-01T09:00:00Z";
    let response = deliver(
        &app.address,
        &src,
        "msg_placing",
        &json!([
            event("u1", "sent", &unknown, "who@example.com", at),
            {"id": "u2", "type": "sent", "enrollment_id": unknown, "occurred_at": at},
            event("f1", "sent", &campaign, "who@example.com", &future),
            event("p1", "sent", &campaign, "who@example.com", &soon),
        ]),
    )
    .await;
    assert_eq!(
        outcomes(&response).await,
        vec!["rejected", "rejected", "rejected", "parked"]
    );
    let reasons: Vec<&str> = response["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert!(reasons[0].contains("campaign"), "{reasons:?}");
    assert!(reasons[1].contains("enrollment"), "{reasons:?}");
    assert!(reasons[2].contains("future"), "{reasons:?}");
    assert_eq!(
        app.count("webhook_parked").await,
        1,
        "only the placeable one waits"
    );
    let rejected: i64 =
        sqlx::query_scalar("SELECT sum(rejected) FROM webhook_deliveries WHERE source = 'placing'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(rejected, 3);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("webhook_events_total")
                && l.contains("source=\"placing\"")
                && l.contains("outcome=\"rejected\"")),
        "{metrics}"
    );
    // A rejected id is not remembered: once its campaign can be found, it applies.
    let again = deliver(
        &app.address,
        &src,
        "msg_placing_2",
        &json!(event("f1", "sent", &campaign, "who@example.com", at)),
    )
    .await;
    assert_eq!(outcomes(&again).await, vec!["parked"]);
}

#[tokio::test]
async fn an_oversized_webhook_id_is_400_and_a_timestamp_near_the_minimum_is_401() {
    let app = spawn_app().await;
    let src = source(&app, "hostile").await;
    let before = recorded(&app).await;
    let body = json!({"id": "e", "type": "sent", "enrollment_id": uuid::Uuid::now_v7(), "occurred_at": "2026-11-01T09:00:00Z"});
    let ts = now().to_string();
    assert_problem(
        deliver_signed_as(&app, &src, &"w".repeat(3000), &ts, &body).await,
        400,
    )
    .await;
    for ts in [
        "-9223372036854775808",
        "-9223372036854775807",
        "9223372036854775807",
    ] {
        assert_problem(
            deliver_signed_as(&app, &src, "msg_min", ts, &body).await,
            401,
        )
        .await;
    }
    assert_eq!(recorded(&app).await, before, "nothing recorded");
}
