//! API keys: 401 without a valid key, 403 without the scope, hashed storage, revocation.

use serde_json::json;

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test]
async fn a_v1_route_without_a_key_is_401() {
    let app = spawn_app().await;
    let response = app.get("/v1/campaigns").await;
    assert!(response.headers().contains_key("www-authenticate"));
    assert_problem(response, 401).await;
}

#[tokio::test]
async fn an_unknown_or_malformed_key_is_401() {
    let app = spawn_app().await;
    for header in [
        "Bearer ll_not_a_real_key",
        "Basic dXNlcjpwYXNz",
        "Bearer ",
        "ll_raw",
    ] {
        let response = app
            .client
            .get(app.url("/v1/campaigns"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        assert_problem(response, 401).await;
    }
}

#[tokio::test]
async fn a_read_key_can_read_but_not_write() {
    let app = spawn_app().await;
    assert_eq!(app.read("/v1/campaigns").await.status().as_u16(), 200);
    let response = app
        .client
        .post(app.url("/v1/campaigns"))
        .bearer_auth(&app.read_key)
        .json(&json!({"name": "nope"}))
        .send()
        .await
        .unwrap();
    assert_problem(response, 403).await;
    assert_eq!(app.count("events").await, 0);
}

#[tokio::test]
async fn a_revoked_key_is_401() {
    let app = spawn_app().await;
    let (id, key) = leadledger::app::keys::create_key(
        &app.pool,
        "short-lived",
        leadledger::app::keys::Scope::Read,
    )
    .await
    .unwrap();
    let ok = app
        .client
        .get(app.url("/v1/campaigns"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert!(
        leadledger::app::keys::revoke_key(&app.pool, id)
            .await
            .unwrap()
    );
    assert!(
        !leadledger::app::keys::revoke_key(&app.pool, id)
            .await
            .unwrap(),
        "revoking twice finds nothing"
    );
    let refused = app
        .client
        .get(app.url("/v1/campaigns"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_problem(refused, 401).await;
}

#[tokio::test]
async fn keys_are_stored_only_as_hashes() {
    let app = spawn_app().await;
    let stored: Vec<(Vec<u8>, String)> = sqlx::query_as("SELECT key_hash, prefix FROM api_keys")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    for (hash, prefix) in stored {
        assert_eq!(hash.len(), 32);
        for key in [&app.admin_key, &app.write_key, &app.read_key] {
            assert!(!String::from_utf8_lossy(&hash).contains(key.as_str()));
            assert!(prefix.len() < key.len());
        }
    }
}

#[tokio::test]
async fn a_key_revoked_by_another_process_is_refused_here_within_a_second() {
    let app = spawn_app().await;
    let key = app.write_key.clone();
    let use_key = || {
        app.client
            .get(app.url("/v1/campaigns"))
            .bearer_auth(&key)
            .send()
    };
    // Looked up, and so cached.
    for _ in 0..3 {
        assert_eq!(use_key().await.unwrap().status().as_u16(), 200);
    }
    let id = leadledger::app::keys::lookup(&app.pool, &key)
        .await
        .unwrap()
        .unwrap()
        .id;
    // Revoked on another connection, as `leadledger keys revoke` in another process does.
    let other = sqlx::PgPool::connect_with(app.pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let revoked_at = std::time::Instant::now();
    assert!(leadledger::app::keys::revoke_key(&other, id).await.unwrap());
    loop {
        let status = use_key().await.unwrap().status().as_u16();
        if status == 401 {
            break;
        }
        assert!(
            revoked_at.elapsed() < std::time::Duration::from_secs(1),
            "the revoked key still answered {status} after a second"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_problem(use_key().await.unwrap(), 401).await;
}
