//! Hostile and careless input: oversized ids and headers, invented methods, crafted
//! cursors, large events, slow and silent clients. Each is refused clearly (or bounded)
//! and changes nothing.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{assert_problem, spawn_app, spawn_app_serving};

#[tokio::test]
async fn an_oversized_request_id_is_replaced_and_never_copied_into_events() {
    let app = spawn_app().await;
    let huge = "r".repeat(10_000);
    let response = app
        .client
        .post(app.url("/v1/campaigns"))
        .bearer_auth(&app.write_key)
        .header("x-request-id", &huge)
        .json(&json!({"name": "ids"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let echoed = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(echoed.len() <= 128 && echoed != huge, "{}", echoed.len());
    let longest: i64 = sqlx::query_scalar(
        "SELECT max(octet_length(coalesce(metadata->>'correlation_id', '')))::bigint FROM events",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(longest <= 128, "{longest}");
    // A reasonable one is kept, as given.
    let response = app
        .client
        .get(app.url("/v1/campaigns"))
        .bearer_auth(&app.read_key)
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-42");
}

#[tokio::test]
async fn invented_methods_create_no_metric_series() {
    let app = spawn_app().await;
    for i in 0..40 {
        let method = reqwest::Method::from_bytes(format!("Q{i}").as_bytes()).unwrap();
        let _ = app
            .client
            .request(method, app.url("/health/live"))
            .send()
            .await
            .unwrap();
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        !metrics.contains("method=\"Q1"),
        "client methods became labels"
    );
    assert!(metrics.contains("method=\"other\""));
}

#[tokio::test]
async fn enrichment_data_is_bounded_and_numbers_are_never_rounded_silently() {
    let app = spawn_app().await;
    let contact: Value = app
        .post("/v1/contacts", &json!({"email": "big@example.com"}))
        .await
        .json()
        .await
        .unwrap();
    let id = contact["id"].as_str().unwrap();
    let path = format!("/v1/contacts/{id}/enrichment");
    let before = app.count("events").await;
    let oversized =
        json!({"data": {"blob": "b".repeat(70_000)}, "quality_score": 0.5, "sources": []});
    let problem = assert_problem(app.post(&path, &oversized).await, 422).await;
    assert_eq!(problem["errors"][0]["field"], "data");
    let body =
        br#"{"data": {"n": 123456789012345678901234567890}, "quality_score": 0.5, "sources": []}"#;
    let response = app
        .client
        .post(app.url(&path))
        .bearer_auth(&app.write_key)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let problem = assert_problem(response, 422).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("string"),
        "{problem}"
    );
    assert_eq!(app.count("events").await, before, "nothing written");
    // Large events that are allowed are snapshotted by size, not only every 100 events.
    for i in 0..10 {
        let data = json!({"data": {"blob": format!("{i}{}", "c".repeat(60_000))}, "quality_score": 0.5, "sources": []});
        assert_eq!(app.post(&path, &data).await.status().as_u16(), 200);
    }
    let snapshots: i64 =
        sqlx::query_scalar("SELECT count(*) FROM snapshots WHERE aggregate_id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        snapshots, 1,
        "a snapshot once the unsnapshotted events pass their byte bound"
    );
}

#[tokio::test]
async fn crafted_cursors_are_400_on_every_list() {
    let app = spawn_app().await;
    let crafted = URL_SAFE_NO_PAD.encode(
        serde_json::to_vec(&json!(["-5000-01-01T00:00:00Z", uuid::Uuid::now_v7()])).unwrap(),
    );
    for list in [
        "/v1/contacts",
        "/v1/campaigns",
        "/v1/webhooks/parked",
        "/v1/webhooks/dead-letters",
    ] {
        let response = app.read(&format!("{list}?cursor={crafted}")).await;
        assert_problem(response, 400).await;
    }
}

#[tokio::test]
async fn commands_without_fields_refuse_malformed_bodies_and_change_nothing() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("no body").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let send = |body: &'static str| {
        app.client
            .post(app.url(&format!("/v1/campaigns/{campaign}/start")))
            .bearer_auth(&app.write_key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_problem(send("{nope").await.unwrap(), 400).await;
    assert_problem(send(r#"{"force": true}"#).await.unwrap(), 422).await;
    let one: Value = app
        .read(&format!("/v1/campaigns/{campaign}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["status"], "draft");
    assert_eq!(send("{}").await.unwrap().status().as_u16(), 200);
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_early_refusals_close_the_connection() {
    let app = spawn_app().await;
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let response = app
            .client
            .get(app.url("/v1/campaigns"))
            .header("authorization", format!("{scheme} {}", app.read_key))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{scheme}");
    }
    let refused = app
        .client
        .post(app.url("/v1/contacts"))
        .json(&json!({"email": "x@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.headers()["connection"], "close");
    assert_problem(refused, 401).await;
}

#[tokio::test]
async fn overlong_targets_and_headers_are_answered_as_problems() {
    let app = spawn_app().await;
    let long = "a".repeat(9_000);
    assert_problem(app.read(&format!("/v1/campaigns?x={long}")).await, 414).await;
    let response = app
        .client
        .get(app.url("/v1/campaigns"))
        .bearer_auth(&app.read_key)
        .header("x-padding", "p".repeat(70_000))
        .send()
        .await
        .unwrap();
    assert_problem(response, 431).await;
}

#[tokio::test]
async fn an_import_report_echoes_no_whole_cell_and_a_replay_is_byte_identical() {
    let app = spawn_app().await;
    let rows = json!([{"email": format!("{}@", "x".repeat(100_000))}, {"email": "ok@example.com"}]);
    let send = || {
        app.client
            .post(app.url("/v1/contacts/import"))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", "import-once")
            .json(&rows)
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status().as_u16(), 200);
    let first = first.bytes().await.unwrap();
    let report: Value = serde_json::from_slice(&first).unwrap();
    let echoed = report["errors"][0]["email"].as_str().unwrap();
    assert!(echoed.chars().count() <= 257, "{}", echoed.len());
    let again = send().await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.bytes().await.unwrap(), first, "byte for byte");
}

#[tokio::test]
async fn an_unreached_min_position_says_so_rather_than_blaming_the_database() {
    let app = spawn_app().await;
    let problem = assert_problem(
        app.read("/v1/campaigns?min_position=999999999-999999999")
            .await,
        503,
    )
    .await;
    assert!(problem["type"].as_str().unwrap().ends_with("not-caught-up"));
    assert!(!problem["detail"].as_str().unwrap().contains("database"));
}

#[tokio::test]
async fn silent_and_slow_clients_are_cut_off_and_health_keeps_answering() {
    let app = spawn_app_serving(leadledger::http::ServeOptions {
        grace: Duration::from_secs(5),
        header_timeout: Duration::from_secs(1),
        max_connections: Some(32),
    })
    .await;
    let addr = app.address.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..48 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let dripping = tokio::spawn(async move {
        // One byte every 200 ms, never finishing the headers.
        for _ in 0..50 {
            if slow.write_all(b"X").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut buf = [0u8; 64];
        matches!(slow.read(&mut buf).await, Ok(0) | Err(_))
    });
    // Health answers although more sockets are open than the cap: the silent ones are
    // closed after the header timeout, and the queue moves.
    let started = std::time::Instant::now();
    let health = tokio::time::timeout(Duration::from_secs(5), app.get("/health/live"))
        .await
        .expect("health answers while idle sockets are held");
    assert_eq!(health.status().as_u16(), 200);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The idle sockets were closed by the server.
    let mut closed = 0;
    for mut socket in idle {
        let mut buf = [0u8; 16];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_secs(4), socket.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 48, "every silent connection is closed");
    assert!(dripping.await.unwrap(), "the slow client was cut off");
}
