//! What a newcomer looks for first: lists of what exists (budgets, webhook sources), names
//! beside ids in reports, the ids an import wrote, the way in from `/`, and retries with
//! `Idempotency-Key` and `If-Match` on every write.

use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, spawn_app};
use crate::webhooks::{deliver, event, signature};

async fn body(response: reqwest::Response, status: u16) -> Value {
    let got = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn admin_post(
    app: &TestApp,
    path: &str,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url(path))
        .bearer_auth(&app.admin_key)
        .json(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.unwrap()
}

async fn admin_get(app: &TestApp, path: &str) -> reqwest::Response {
    app.client
        .get(app.url(path))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn budgets_are_listed_page_by_page_oldest_first() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    let mut token = String::new();
    for (i, limit) in [json!("10"), json!(null), json!("2.5")].iter().enumerate() {
        let b = body(
            app.post(
                "/v1/budgets",
                &json!({"name": format!("budget {i}"), "limit": limit}),
            )
            .await,
            201,
        )
        .await;
        ids.push(b["id"].as_str().unwrap().to_string());
        token = b["position"].as_str().unwrap().to_string();
    }
    let first = body(
        app.read(&format!("/v1/budgets?limit=2&min_position={token}"))
            .await,
        200,
    )
    .await;
    let items = first["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], ids[0]);
    assert_eq!(items[0]["name"], "budget 0");
    assert_eq!(items[0]["limit"], "10.00");
    assert_eq!(items[1]["limit"], Value::Null);
    assert_eq!(items[0]["spent"], "0.00");
    assert_eq!(items[0]["version"], 1);
    let cursor = first["next_cursor"].as_str().expect("a next page");
    let second = body(
        app.read(&format!("/v1/budgets?limit=2&cursor={cursor}"))
            .await,
        200,
    )
    .await;
    assert_eq!(second["items"].as_array().unwrap().len(), 1);
    assert_eq!(second["items"][0]["id"], ids[2]);
    assert_eq!(second["next_cursor"], Value::Null);
    // The list shows what GET /v1/budgets/{id} shows.
    let one = body(app.read(&format!("/v1/budgets/{}", ids[2])).await, 200).await;
    assert_eq!(second["items"][0], one);
    for bad in [
        "limit=0",
        "limit=501",
        "limit=x",
        "cursor=%25%25",
        "colour=red",
    ] {
        assert_problem(app.read(&format!("/v1/budgets?{bad}")).await, 400).await;
    }
    let unauthenticated = app.get("/v1/budgets").await;
    assert_problem(unauthenticated, 401).await;
}

#[tokio::test]
async fn webhook_sources_are_listed_with_counts_per_outcome_and_never_a_credential() {
    let app = spawn_app().await;
    let quiet = body(
        admin_post(&app, "/v1/webhook-sources", None, &json!({"name": "quiet"})).await,
        201,
    )
    .await;
    let source = crate::webhooks::source(&app, "esp").await;
    let campaign = app.create_campaign("listed").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let c = body(
        app.post("/v1/contacts", &json!({"email": "a@example.com"}))
            .await,
        201,
    )
    .await;
    body(
        app.post(
            &format!("/v1/campaigns/{campaign}/enrollments"),
            &json!({"contact_ids": [c["id"]]}),
        )
        .await,
        200,
    )
    .await;
    let batch = json!([
        event(
            "e1",
            "sent",
            &campaign,
            "a@example.com",
            &chrono::Utc::now().to_rfc3339()
        ),
        event(
            "e1",
            "sent",
            &campaign,
            "a@example.com",
            &chrono::Utc::now().to_rfc3339()
        ),
        event(
            "e2",
            "opened",
            &campaign,
            "nobody@example.com",
            &chrono::Utc::now().to_rfc3339()
        ),
        json!({"id": "e3", "type": "teleported"}),
    ]);
    let results = deliver(&app.address, &source, "msg_1", &batch).await;
    let outcomes: Vec<&str> = results["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["applied", "duplicate", "parked", "rejected"]);

    let listed = body(admin_get(&app, "/v1/webhook-sources").await, 200).await;
    let text = listed.to_string();
    assert!(!text.contains("whsec_"), "no secret in {text}");
    assert!(!text.contains(quiet["secret"].as_str().unwrap()));
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let esp = items.iter().find(|s| s["name"] == "esp").unwrap();
    assert_eq!(esp["kind"], "standard");
    assert!(esp["created_at"].is_string());
    assert!(esp["last_delivery_at"].is_string());
    assert_eq!(
        esp["counts"],
        json!({"applied": 1, "duplicate": 1, "parked": 1, "rejected": 1, "ignored": 0})
    );
    let quiet = items.iter().find(|s| s["name"] == "quiet").unwrap();
    assert_eq!(quiet["last_delivery_at"], Value::Null);
    assert_eq!(
        quiet["counts"],
        json!({"applied": 0, "duplicate": 0, "parked": 0, "rejected": 0, "ignored": 0})
    );
    // A repeated delivery is answered again but counted once.
    deliver(&app.address, &source, "msg_1", &batch).await;
    let again = body(admin_get(&app, "/v1/webhook-sources").await, 200).await;
    let esp = again["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "esp")
        .unwrap()
        .clone();
    assert_eq!(esp["counts"]["applied"], 1);
    // Source management is for admin keys.
    assert_problem(app.read("/v1/webhook-sources").await, 403).await;
    assert_problem(admin_get(&app, "/v1/webhook-sources?limit=0").await, 400).await;
}

#[tokio::test]
async fn cost_analytics_grouped_by_budget_carry_the_budget_name() {
    let app = spawn_app().await;
    let b = body(
        app.post(
            "/v1/budgets",
            &json!({"name": "Enrichment Q4", "limit": null}),
        )
        .await,
        201,
    )
    .await;
    let id = b["id"].as_str().unwrap();
    let spent = body(
        app.post(
            &format!("/v1/budgets/{id}/spend"),
            &json!({"amount": "1.25", "category": "ai"}),
        )
        .await,
        201,
    )
    .await;
    let token = spent["position"].as_str().unwrap();
    let report = body(
        app.read(&format!(
            "/v1/analytics/costs?group_by=budget&min_position={token}"
        ))
        .await,
        200,
    )
    .await;
    assert_eq!(
        report["items"],
        json!([{"budget_id": id, "name": "Enrichment Q4", "cost": "1.25", "input_tokens": 0, "output_tokens": 0, "requests": 1}])
    );
}

#[tokio::test]
async fn cost_analytics_by_day_list_every_day_of_the_window_like_the_timeseries() {
    let app = spawn_app().await;
    let b = body(
        app.post("/v1/budgets", &json!({"name": "daily", "limit": null}))
            .await,
        201,
    )
    .await;
    let id = b["id"].as_str().unwrap();
    let spent = body(
        app.post(
            &format!("/v1/budgets/{id}/spend"),
            &json!({"amount": "2", "category": "ai"}),
        )
        .await,
        201,
    )
    .await;
    let token = spent["position"].as_str().unwrap();
    let report = body(
        app.read(&format!(
            "/v1/analytics/costs?days=7&group_by=day&min_position={token}"
        ))
        .await,
        200,
    )
    .await;
    let items = report["items"].as_array().unwrap();
    assert_eq!(items.len(), 7, "{report}");
    assert_eq!(items[0]["day"], report["from"]);
    assert_eq!(items[6]["day"], report["to"]);
    assert_eq!(
        items[0],
        json!({"day": report["from"], "cost": "0.00", "input_tokens": 0, "output_tokens": 0, "requests": 0})
    );
    assert_eq!(items[6]["cost"], "2.00");
}

#[tokio::test]
async fn the_import_report_names_the_contact_of_each_created_or_updated_row() {
    let app = spawn_app().await;
    let known = body(
        app.post("/v1/contacts", &json!({"email": "known@example.com"}))
            .await,
        201,
    )
    .await;
    let rows = json!([
        {"email": "new@example.com"},
        {"email": "not an email"},
        {"email": "known@example.com", "company": "Acme"},
        {"email": "known@example.com", "company": "Acme"},
    ]);
    let report = body(app.post("/v1/contacts/import", &rows).await, 200).await;
    assert_eq!(report["created"], 1);
    assert_eq!(report["updated"], 1);
    assert_eq!(report["unchanged"], 1);
    let contacts = report["contacts"]
        .as_array()
        .expect("contacts in the report");
    assert_eq!(contacts.len(), 2, "{report}");
    assert_eq!(contacts[0]["row"], 1);
    assert_eq!(contacts[1], json!({"row": 3, "contact_id": known["id"]}));
    let created = contacts[0]["contact_id"].as_str().unwrap();
    let got = body(app.read(&format!("/v1/contacts/{created}")).await, 200).await;
    assert_eq!(got["email"], "new@example.com");
}

#[tokio::test]
async fn the_root_points_newcomers_to_the_console() {
    let app = spawn_app().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = client.get(app.url("/")).send().await.unwrap();
    assert!(response.status().is_redirection(), "{}", response.status());
    assert_eq!(response.headers()["location"], "/console");
    // Followed, it ends on the console's sign-in page.
    let followed = app.get("/").await;
    assert_eq!(followed.status().as_u16(), 200);
    assert_eq!(followed.url().path(), "/console/sign-in");
    assert!(followed.text().await.unwrap().contains("API key"));
}

#[tokio::test]
async fn a_new_webhook_source_answers_with_its_delivery_url() {
    let app = spawn_app().await;
    let created = body(
        admin_post(
            &app,
            "/v1/webhook-sources",
            None,
            &json!({"name": "mailer"}),
        )
        .await,
        201,
    )
    .await;
    assert_eq!(created["url"], "/webhooks/mailer");
    assert!(created["secret"].as_str().unwrap().starts_with("whsec_"));
}

#[tokio::test]
async fn creating_a_webhook_source_honours_its_idempotency_key_and_stores_no_plaintext_secret() {
    let app = spawn_app().await;
    let first = admin_post(
        &app,
        "/v1/webhook-sources",
        Some("src-1"),
        &json!({"name": "esp"}),
    )
    .await;
    let first = body(first, 201).await;
    let secret = first["secret"].as_str().unwrap().to_string();
    // A retry gets the same answer, secret included, and makes nothing new.
    let retry = admin_post(
        &app,
        "/v1/webhook-sources",
        Some("src-1"),
        &json!({"name": "esp"}),
    )
    .await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let retry = body(retry, 201).await;
    assert_eq!(retry, first);
    assert_eq!(app.count("webhook_sources").await, 1);
    // The secret the retry showed is the one that signs.
    let bytes = serde_json::to_vec(&json!({"id": "x", "type": "teleported"})).unwrap();
    let key = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        secret.strip_prefix("whsec_").unwrap(),
    )
    .unwrap();
    let ts = chrono::Utc::now().timestamp();
    let delivered = reqwest::Client::new()
        .post(app.url("/webhooks/esp"))
        .header("content-type", "application/json")
        .header("webhook-id", "m1")
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature(&key, "m1", ts, &bytes))
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(delivered.status().as_u16(), 200);
    // The recorded response holds no plaintext secret.
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT response_body FROM idempotency_records")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    let secret_b64 = secret.strip_prefix("whsec_").unwrap();
    for record in &stored {
        let text = String::from_utf8_lossy(record);
        assert!(!text.contains(secret_b64), "plaintext secret in {text}");
    }
    // The same key with another name: 422, and no second source.
    let other = admin_post(
        &app,
        "/v1/webhook-sources",
        Some("src-1"),
        &json!({"name": "other"}),
    )
    .await;
    assert_problem(other, 422).await;
    assert_eq!(app.count("webhook_sources").await, 1);
    // Without a key, a second create of the name is still a conflict.
    let again = admin_post(&app, "/v1/webhook-sources", None, &json!({"name": "esp"})).await;
    assert_problem(again, 409).await;
    // A refused request is not recorded: a corrected retry may reuse its key.
    let bad = admin_post(
        &app,
        "/v1/webhook-sources",
        Some("src-2"),
        &json!({"name": "Bad Name"}),
    )
    .await;
    assert_problem(bad, 422).await;
    assert_eq!(app.count("webhook_sources").await, 1);
}

#[tokio::test]
async fn a_dead_letter_retry_honours_its_idempotency_key() {
    let app = spawn_app().await;
    let source = crate::webhooks::source(&app, "esp").await;
    let campaign = app.create_campaign("dead").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let now = chrono::Utc::now().to_rfc3339();
    deliver(
        &app.address,
        &source,
        "m1",
        &event("e1", "opened", &campaign, "later@example.com", &now),
    )
    .await;
    let id: uuid::Uuid =
        sqlx::query_scalar("UPDATE webhook_parked SET dead_lettered_at = now() RETURNING id")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let path = format!("/v1/webhooks/dead-letters/{id}/retry");
    let first = body(
        admin_post(&app, &path, Some("retry-1"), &json!({})).await,
        200,
    )
    .await;
    // Dead-lettered again meanwhile: the retry with the same key answers as before and
    // does not requeue it a second time.
    sqlx::query("UPDATE webhook_parked SET dead_lettered_at = now(), attempts = 7")
        .execute(&app.pool)
        .await
        .unwrap();
    let retry = admin_post(&app, &path, Some("retry-1"), &json!({})).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(body(retry, 200).await, first);
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM webhook_parked")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(attempts, 7, "no second effect");
    // The same key on another dead letter: 422.
    let other = format!("/v1/webhooks/dead-letters/{}/retry", uuid::Uuid::nil());
    assert_problem(
        admin_post(&app, &other, Some("retry-1"), &json!({})).await,
        422,
    )
    .await;
}

#[tokio::test]
async fn if_match_compares_strongly_and_star_means_the_resource_exists() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("etags").await;
    let id = campaign["id"].as_str().unwrap();
    let patch = |if_match: &'static str, target: String| {
        let app = &app;
        async move {
            app.client
                .patch(app.url(&format!("/v1/campaigns/{target}")))
                .bearer_auth(&app.write_key)
                .header("if-match", if_match)
                .json(&json!({"name": "renamed"}))
                .send()
                .await
                .unwrap()
        }
    };
    // A weak ETag never matches under strong comparison (RFC 9110 §13.1.1).
    assert_problem(patch("W/\"1\"", id.to_string()).await, 412).await;
    let unchanged = body(app.read(&format!("/v1/campaigns/{id}")).await, 200).await;
    assert_eq!(unchanged["name"], "etags");
    assert_eq!(unchanged["version"], 1);
    // `*` on a resource that does not exist is false: 412, and nothing is made.
    let missing = uuid::Uuid::new_v4().to_string();
    assert_problem(patch("*", missing.clone()).await, 412).await;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(&missing)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(events, 0);
    // `*` on one that exists matches; so does a list holding its strong ETag.
    assert_eq!(patch("*", id.to_string()).await.status().as_u16(), 200);
    assert_eq!(
        patch("\"7\", \"2\"", id.to_string())
            .await
            .status()
            .as_u16(),
        200
    );
    assert_problem(patch("\"7\", W/\"3\"", id.to_string()).await, 412).await;
    assert_problem(patch("\"x\"", id.to_string()).await, 400).await;
}
