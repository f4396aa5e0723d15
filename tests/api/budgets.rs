//! Budgets and costs over HTTP: no overspend under concurrent spends and holds, exact
//! money in and out, invalid amounts refused with nothing written, idempotent spends,
//! reservations (capture, release, expiry by the worker) and the cost analytics.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::types::Decimal;

use crate::helpers::{TestApp, assert_problem, spawn_app};

/// Creates a budget with `limit` (a JSON value: string, number or null); returns its id.
async fn create_budget(app: &TestApp, limit: Value) -> String {
    let response = app
        .post("/v1/budgets", &json!({"name": "AI spend", "limit": limit}))
        .await;
    assert_eq!(response.status().as_u16(), 201, "budget created");
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

async fn get_budget(app: &TestApp, id: &str) -> Value {
    let response = app.read(&format!("/v1/budgets/{id}")).await;
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.unwrap()
}

/// POSTs a raw JSON text (so numbers keep their exact text) with the write key.
async fn post_raw(app: &TestApp, path: &str, body: String) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .bearer_auth(&app.write_key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn count_events(app: &TestApp, id: &str, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = $2")
        .bind(id)
        .bind(event_type)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

fn dec(value: &Value) -> Decimal {
    value
        .as_str()
        .unwrap_or_else(|| panic!("money is a string: {value}"))
        .parse()
        .unwrap()
}

/// Sends every (path, body) POST at once with the write key; returns (status, body) each.
async fn concurrently(app: &TestApp, requests: Vec<(String, Value)>) -> Vec<(u16, Value)> {
    let tasks = requests.into_iter().map(|(path, body)| {
        let request = app
            .client
            .post(app.url(&path))
            .bearer_auth(&app.write_key)
            .json(&body);
        tokio::spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or_default())
        })
    });
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test]
async fn fifty_concurrent_spends_of_30_cents_on_a_budget_of_10_accept_exactly_33() {
    let app = spawn_app().await;
    let id = create_budget(&app, json!("10.00")).await;
    // Half as JSON numbers, half as strings: both are read exactly.
    let requests = (0..50)
        .map(|i| {
            let amount = if i % 2 == 0 {
                json!(0.30)
            } else {
                json!("0.30")
            };
            (
                format!("/v1/budgets/{id}/spend"),
                json!({"amount": amount, "category": "ai"}),
            )
        })
        .collect();
    let results = concurrently(&app, requests).await;

    let accepted: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, b)| b)
        .collect();
    let refused: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 409)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(accepted.len(), 33, "{results:?}");
    assert_eq!(refused.len(), 17, "{results:?}");
    for problem in &refused {
        assert!(
            problem["type"]
                .as_str()
                .unwrap()
                .ends_with("budget-exceeded"),
            "{problem}"
        );
        // Refused only once 9.90 was spent: 0.10 was left.
        assert_eq!(dec(&problem["remaining"]), Decimal::new(10, 2), "{problem}");
    }
    let mut spend_ids: Vec<&str> = accepted
        .iter()
        .map(|b| b["spend_id"].as_str().unwrap())
        .collect();
    spend_ids.sort_unstable();
    spend_ids.dedup();
    assert_eq!(spend_ids.len(), 33, "every accepted spend has its own id");

    let budget = get_budget(&app, &id).await;
    assert_eq!(
        budget["spent"], "9.90",
        "exactly 9.90, shown without trailing zeros"
    );
    assert_eq!(dec(&budget["spent"]), Decimal::new(990, 2));
    assert_eq!(budget["remaining"], "0.10");
    assert_eq!(budget["reserved"], "0.00");
    assert_eq!(count_events(&app, &id, "SpendRecorded").await, 33);
    let recorded: Vec<String> = sqlx::query_scalar(
        "SELECT payload->'SpendRecorded'->>'amount' FROM events
         WHERE aggregate_id = $1 AND event_type = 'SpendRecorded'",
    )
    .bind(&id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let total: Decimal = recorded.iter().map(|a| a.parse::<Decimal>().unwrap()).sum();
    assert_eq!(
        total,
        Decimal::new(990, 2),
        "the events add up to what is shown"
    );
}

#[tokio::test]
async fn spends_and_holds_racing_on_one_budget_never_take_it_over_its_limit() {
    let app = spawn_app().await;
    let id = create_budget(&app, json!(10)).await;
    let requests = (0..50)
        .map(|i| {
            let path = if i % 2 == 0 {
                format!("/v1/budgets/{id}/spend")
            } else {
                format!("/v1/budgets/{id}/reservations")
            };
            (path, json!({"amount": "0.30", "category": "enrichment"}))
        })
        .collect();
    // A reader watches the budget while the race runs.
    let watcher = {
        let client = app.client.clone();
        let url = app.url(&format!("/v1/budgets/{id}"));
        let key = app.read_key.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..40 {
                let b: Value = client
                    .get(&url)
                    .bearer_auth(&key)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                seen.push(dec(&b["spent"]) + dec(&b["reserved"]));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        })
    };
    let results = concurrently(&app, requests).await;
    let seen = watcher.await.unwrap();
    assert!(
        seen.iter().all(|used| *used <= Decimal::TEN),
        "spent + reserved went over 10: {seen:?}"
    );

    let accepted = results.iter().filter(|(s, _)| *s == 201).count();
    let refused = results.iter().filter(|(s, _)| *s == 409).count();
    assert_eq!((accepted, refused), (33, 17), "{results:?}");
    let budget = get_budget(&app, &id).await;
    assert_eq!(
        dec(&budget["spent"]) + dec(&budget["reserved"]),
        Decimal::new(990, 2)
    );
    let spends = count_events(&app, &id, "SpendRecorded").await;
    let holds = count_events(&app, &id, "ReservationMade").await;
    assert_eq!(spends + holds, 33, "the events agree");
    assert_eq!(
        dec(&budget["spent"]),
        Decimal::new(30, 2) * Decimal::from(spends)
    );
    assert_eq!(
        dec(&budget["reserved"]),
        Decimal::new(30, 2) * Decimal::from(holds)
    );

    // Capturing every hold in full turns reservations into spending, still within 10.
    let rids: Vec<String> = results
        .iter()
        .filter(|(s, b)| *s == 201 && b.get("reservation_id").is_some())
        .map(|(_, b)| b["reservation_id"].as_str().unwrap().to_string())
        .collect();
    let captures = rids
        .iter()
        .map(|rid| {
            (
                format!("/v1/budgets/{id}/reservations/{rid}/capture"),
                json!({"amount": 0.3}),
            )
        })
        .collect();
    let captured = concurrently(&app, captures).await;
    assert!(captured.iter().all(|(s, _)| *s == 200), "{captured:?}");
    let budget = get_budget(&app, &id).await;
    assert_eq!(budget["spent"], "9.90");
    assert_eq!(budget["reserved"], "0.00");
}

#[tokio::test]
async fn every_invalid_amount_as_number_or_string_is_422_and_writes_nothing() {
    let app = spawn_app().await;
    let id = create_budget(&app, json!("100")).await;
    let reserved = app
        .post(
            &format!("/v1/budgets/{id}/reservations"),
            &json!({"amount": "5", "category": "ai"}),
        )
        .await;
    assert_eq!(reserved.status().as_u16(), 201);
    let rid = reserved.json::<Value>().await.unwrap()["reservation_id"]
        .as_str()
        .unwrap()
        .to_string();
    // Each as it would be written as a JSON number (bare NaN and Infinity are what
    // JavaScript and Python encoders write), then the same text as a JSON string.
    let bad = [
        "-1",
        "-0.01",
        "0",
        "0.0",
        "-0",
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "1E+400",
        "0.0000001",
        "1.1234567",
        "0.1000000000000000001",
        "1000000.000001",
        "1000001",
        "1e7",
        "99999999999999999999999999999999",
    ];
    let wrong_types = [
        "true", "null", "[]", "{}", "\"\"", "\"abc\"", "\"1,5\"", "\" 1\"",
    ];
    let before = app.count("events").await;
    let mut texts: Vec<String> = Vec::new();
    for b in bad {
        texts.push(b.to_string());
        texts.push(format!("\"{b}\""));
    }
    texts.extend(wrong_types.iter().map(|t| t.to_string()));
    for text in &texts {
        for (path, body) in [
            (
                format!("/v1/budgets/{id}/spend"),
                format!(r#"{{"amount": {text}, "category": "ai"}}"#),
            ),
            (
                format!("/v1/budgets/{id}/reservations"),
                format!(r#"{{"amount": {text}, "category": "ai"}}"#),
            ),
            (
                format!("/v1/budgets/{id}/reservations/{rid}/capture"),
                format!(r#"{{"amount": {text}}}"#),
            ),
        ] {
            let response = post_raw(&app, &path, body.clone()).await;
            let problem = assert_problem(response, 422).await;
            assert_eq!(
                problem["errors"][0]["field"], "amount",
                "{body} → {problem}"
            );
        }
    }
    // Limits: negative, NaN, over-precise, absurd.
    for text in [
        "-1",
        "\"-1\"",
        "NaN",
        "\"NaN\"",
        "0.0000001",
        "1e13",
        "\"x\"",
        "true",
    ] {
        let response = post_raw(
            &app,
            "/v1/budgets",
            format!(r#"{{"name": "n", "limit": {text}}}"#),
        )
        .await;
        let problem = assert_problem(response, 422).await;
        assert_eq!(problem["errors"][0]["field"], "limit", "{text}");
    }
    assert_eq!(app.count("events").await, before, "nothing was written");
    let budget = get_budget(&app, &id).await;
    assert_eq!(budget["spent"], "0.00");
    assert_eq!(budget["reserved"], "5.00");
}

#[tokio::test]
async fn a_tenth_plus_two_tenths_as_json_numbers_is_exactly_three_tenths() {
    let app = spawn_app().await;
    let id = create_budget(&app, Value::Null).await;
    for amount in ["0.1", "0.2"] {
        let response = post_raw(
            &app,
            &format!("/v1/budgets/{id}/spend"),
            format!(r#"{{"amount": {amount}, "category": "other"}}"#),
        )
        .await;
        assert_eq!(response.status().as_u16(), 201);
    }
    let budget = get_budget(&app, &id).await;
    assert_eq!(budget["spent"], "0.30");
    // No f64 holds 999999.999999 exactly; read from its text, it is spent exactly.
    let response = post_raw(
        &app,
        &format!("/v1/budgets/{id}/spend"),
        r#"{"amount": 999999.999999, "category": "other"}"#.to_string(),
    )
    .await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["spent"], "1000000.299999");
}

#[tokio::test]
async fn an_idempotent_spend_retried_five_times_at_once_is_spent_once() {
    let app = spawn_app().await;
    let id = create_budget(&app, json!("50")).await;
    let send = || {
        app.client
            .post(app.url(&format!("/v1/budgets/{id}/spend")))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", "invoice-7-line-3")
            .json(&json!({"amount": "12.5", "category": "outreach"}))
    };
    let tasks = (0..5).map(|_| {
        let request = send();
        tokio::spawn(async move {
            let response = request.send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        })
    });
    let results: Vec<(u16, Value)> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let created: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, b)| b)
        .collect();
    assert!(!created.is_empty(), "{results:?}");
    for (status, body) in &results {
        assert!(*status == 201 || *status == 409, "{status} {body}");
        if *status == 409 {
            assert!(
                body["type"]
                    .as_str()
                    .unwrap()
                    .ends_with("idempotency-key-in-flight")
            );
        }
    }
    assert!(created.iter().all(|b| *b == created[0]), "one answer");
    // A later retry gets the same answer again, replayed.
    let again = send().send().await.unwrap();
    assert_eq!(again.status().as_u16(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(&again.json::<Value>().await.unwrap(), created[0]);

    assert_eq!(count_events(&app, &id, "SpendRecorded").await, 1);
    // The answer, given and replayed, names the event written with it.
    let written: String = sqlx::query_scalar(
        "SELECT transaction_id::text || '-' || position FROM events
         WHERE event_type = 'SpendRecorded'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(created[0]["position"], written.as_str());
    assert_eq!(get_budget(&app, &id).await["spent"], "12.50");
}

#[tokio::test]
async fn a_spend_over_the_limit_is_409_with_the_remaining_amount_and_changes_nothing() {
    let app = spawn_app().await;
    let id = create_budget(&app, json!("1.00")).await;
    let first = app
        .post(
            &format!("/v1/budgets/{id}/spend"),
            &json!({"amount": "0.75", "category": "ai", "model": "gpt-4o", "input_tokens": 1200, "output_tokens": 300}),
        )
        .await;
    assert_eq!(first.status().as_u16(), 201);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["spent"], "0.75");
    assert_eq!(first["remaining"], "0.25");
    assert!(first["position"].as_str().is_some());

    let events = app.count("events").await;
    let over = || {
        app.client
            .post(app.url(&format!("/v1/budgets/{id}/spend")))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", "too-much")
            .json(&json!({"amount": "0.26", "category": "ai"}))
            .send()
    };
    let problem = assert_problem(over().await.unwrap(), 409).await;
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("budget-exceeded")
    );
    assert_eq!(problem["remaining"], "0.25");
    assert_eq!(problem["available"], "0.25");
    assert!(problem["detail"].as_str().unwrap().contains("0.25"));
    // The refusal is the recorded outcome of its idempotency key.
    let replay = over().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(assert_problem(replay, 409).await, problem);
    assert_eq!(app.count("events").await, events, "nothing was written");

    let exact = app
        .post(
            &format!("/v1/budgets/{id}/spend"),
            &json!({"amount": 0.25, "category": "ai"}),
        )
        .await;
    assert_eq!(
        exact.status().as_u16(),
        201,
        "spending up to the limit is fine"
    );
    let budget = get_budget(&app, &id).await;
    assert_eq!(budget["spent"], "1.00");
    assert_eq!(budget["remaining"], "0.00");
}

#[tokio::test]
async fn a_budget_reads_back_with_money_as_strings_and_tracking_only_has_no_limit() {
    let app = spawn_app().await;
    let response = app
        .post(
            "/v1/budgets",
            &json!({"name": "  Enrichment  ", "limit": 250.5, "period": "monthly"}),
        )
        .await;
    assert_eq!(response.status().as_u16(), 201);
    assert_eq!(response.headers()["etag"], "\"1\"");
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    let budget = get_budget(&app, id).await;
    for (field, want) in [
        ("name", json!("Enrichment")),
        ("limit", json!("250.50")),
        ("period", json!("monthly")),
        ("spent", json!("0.00")),
        ("reserved", json!("0.00")),
        ("remaining", json!("250.50")),
        ("version", json!(1)),
    ] {
        assert_eq!(budget[field], want, "{field}");
    }

    let tracking = create_budget(&app, Value::Null).await;
    for _ in 0..3 {
        let r = app
            .post(
                &format!("/v1/budgets/{tracking}/spend"),
                &json!({"amount": "1000000", "category": "other"}),
            )
            .await;
        assert_eq!(r.status().as_u16(), 201);
        assert_eq!(r.json::<Value>().await.unwrap()["remaining"], Value::Null);
    }
    let budget = get_budget(&app, &tracking).await;
    assert_eq!(budget["limit"], Value::Null);
    assert_eq!(budget["remaining"], Value::Null);
    assert_eq!(budget["period"], "none");
    assert_eq!(budget["spent"], "3000000.00");
}

#[tokio::test]
async fn creating_a_budget_needs_a_name_and_an_explicit_limit_or_null() {
    let app = spawn_app().await;
    for (body, field) in [
        (json!({"name": "no limit field"}), "limit"),
        (json!({"name": " ", "limit": "1"}), "name"),
        (
            json!({"name": "p", "limit": "1", "period": "weekly"}),
            "period",
        ),
        (
            json!({"name": "g", "limit": "1", "grace_percent": 101}),
            "grace_percent",
        ),
        (json!({"name": "u", "limit": "1", "colour": "red"}), ""),
    ] {
        let problem = assert_problem(app.post("/v1/budgets", &body).await, 422).await;
        if !field.is_empty() {
            assert_eq!(problem["errors"][0]["field"], field, "{body}");
        }
    }
    assert_eq!(app.count("events").await, 0);
}

#[tokio::test]
async fn changing_the_limit_honours_if_match_and_applies_to_the_next_spend() {
    let app = spawn_app().await;
    let id = create_budget(&app, json!("10")).await;
    let spent = app
        .post(
            &format!("/v1/budgets/{id}/spend"),
            &json!({"amount": "6", "category": "ai"}),
        )
        .await;
    assert_eq!(spent.headers()["etag"], "\"2\"");
    let patch = |if_match: &'static str, body: Value| {
        app.client
            .patch(app.url(&format!("/v1/budgets/{id}")))
            .bearer_auth(&app.write_key)
            .header("if-match", if_match)
            .json(&body)
            .send()
    };
    let events = app.count("events").await;
    assert_problem(patch("\"1\"", json!({"limit": "5"})).await.unwrap(), 412).await;
    assert_eq!(
        app.count("events").await,
        events,
        "a stale If-Match writes nothing"
    );
    assert_problem(patch("\"2\"", json!({})).await.unwrap(), 422).await;

    let lowered = patch("\"2\"", json!({"limit": "5"})).await.unwrap();
    assert_eq!(lowered.status().as_u16(), 200);
    let lowered: Value = lowered.json().await.unwrap();
    assert_eq!(lowered["limit"], "5.00");
    assert_eq!(lowered["remaining"], "0.00");
    let refused = app
        .post(
            &format!("/v1/budgets/{id}/spend"),
            &json!({"amount": "0.01", "category": "ai"}),
        )
        .await;
    let problem = assert_problem(refused, 409).await;
    assert_eq!(problem["remaining"], "0.00");

    let unlimited = app
        .client
        .patch(app.url(&format!("/v1/budgets/{id}")))
        .bearer_auth(&app.write_key)
        .json(&json!({"limit": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(unlimited.status().as_u16(), 200);
    let after = app
        .post(
            &format!("/v1/budgets/{id}/spend"),
            &json!({"amount": "100", "category": "ai"}),
        )
        .await;
    assert_eq!(after.status().as_u16(), 201, "tracking only now");
}

#[tokio::test]
async fn a_capture_takes_at_most_the_hold_and_capture_and_release_are_idempotent() {
    let app = spawn_app().await;
    let id = create_budget(&app, json!("20")).await;
    let reserve = |amount: &'static str| {
        let app = &app;
        let id = id.clone();
        async move {
            let r = app
                .post(
                    &format!("/v1/budgets/{id}/reservations"),
                    &json!({"amount": amount, "category": "ai", "ttl_seconds": 600}),
                )
                .await;
            assert_eq!(r.status().as_u16(), 201);
            r.json::<Value>().await.unwrap()
        }
    };
    let hold = reserve("5").await;
    let rid = hold["reservation_id"].as_str().unwrap().to_string();
    assert_eq!(hold["amount"], "5.00");
    assert_eq!(hold["reserved"], "5.00");
    assert_eq!(hold["remaining"], "15.00");
    assert!(hold["expires_at"].as_str().is_some());

    let capture = |rid: String, amount: Value| {
        let app = &app;
        let id = id.clone();
        async move {
            app.post(
                &format!("/v1/budgets/{id}/reservations/{rid}/capture"),
                &json!({ "amount": amount }),
            )
            .await
        }
    };
    let too_much = assert_problem(capture(rid.clone(), json!("5.01")).await, 422).await;
    assert_eq!(too_much["errors"][0]["field"], "amount");

    let captured = capture(rid.clone(), json!("3.2")).await;
    assert_eq!(captured.status().as_u16(), 200);
    let captured: Value = captured.json().await.unwrap();
    assert_eq!(captured["status"], "captured");
    assert_eq!(captured["captured"], "3.20");
    assert_eq!(captured["spent"], "3.20");
    assert_eq!(
        captured["reserved"], "0.00",
        "the rest of the hold is freed"
    );
    let events = app.count("events").await;
    let again = capture(rid.clone(), json!("3.2")).await;
    assert_eq!(again.status().as_u16(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["captured"], "3.20");
    let release = |rid: String| {
        let app = &app;
        let id = id.clone();
        async move {
            app.client
                .post(app.url(&format!("/v1/budgets/{id}/reservations/{rid}/release")))
                .bearer_auth(&app.write_key)
                .send()
                .await
                .unwrap()
        }
    };
    let released_after_capture = release(rid.clone()).await;
    assert_eq!(released_after_capture.status().as_u16(), 200);
    assert_eq!(
        released_after_capture.json::<Value>().await.unwrap()["status"],
        "captured"
    );
    assert_eq!(app.count("events").await, events, "repeats change nothing");

    let other = reserve("4").await["reservation_id"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..2 {
        let r = release(other.clone()).await;
        assert_eq!(r.status().as_u16(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], "released");
        assert_eq!(body["reserved"], "0.00");
    }
    assert_eq!(count_events(&app, &id, "ReservationReleased").await, 1);
    let problem = assert_problem(capture(other, json!("1")).await, 409).await;
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("reservation-released")
    );

    let missing = "0190f1b4-0000-7000-8000-000000000000";
    assert_problem(capture(missing.to_string(), json!("1")).await, 404).await;
    assert_problem(release("not-a-uuid".to_string()).await, 404).await;
    let budget = get_budget(&app, &id).await;
    assert_eq!(budget["spent"], "3.20");
    assert_eq!(budget["remaining"], "16.80");
}

#[tokio::test]
async fn ttl_seconds_must_be_from_1_to_86400() {
    let app = spawn_app().await;
    let id = create_budget(&app, json!("20")).await;
    let before = app.count("events").await;
    for ttl in ["0", "86401", "-1", "1.5", "\"60\"", "null"] {
        let response = post_raw(
            &app,
            &format!("/v1/budgets/{id}/reservations"),
            format!(r#"{{"amount": "1", "category": "ai", "ttl_seconds": {ttl}}}"#),
        )
        .await;
        if ttl == "null" {
            // null is "not given": the default hour.
            assert_eq!(response.status().as_u16(), 201);
            continue;
        }
        let problem = assert_problem(response, 422).await;
        assert_eq!(problem["errors"][0]["field"], "ttl_seconds", "{ttl}");
    }
    assert_eq!(app.count("events").await, before + 1);
}

/// Waits until the `budget_holds` read model shows no hold for `id`.
async fn wait_for_expiry(app: &TestApp, id: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if count_events(app, id, "ReservationExpired").await > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker did not expire the hold in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_expired_reservation_frees_its_amount_through_the_worker() {
    let app = spawn_app().await;
    let id = create_budget(&app, json!("10")).await;
    let hold = app
        .post(
            &format!("/v1/budgets/{id}/reservations"),
            &json!({"amount": "10", "category": "ai", "ttl_seconds": 1}),
        )
        .await;
    assert_eq!(hold.status().as_u16(), 201);
    let rid = hold.json::<Value>().await.unwrap()["reservation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let full = app
        .post(
            &format!("/v1/budgets/{id}/spend"),
            &json!({"amount": "0.01", "category": "ai"}),
        )
        .await;
    assert_problem(full, 409).await;

    // No command touches the budget now: the worker alone records the expiry.
    wait_for_expiry(&app, &id, Duration::from_secs(15)).await;
    assert_eq!(count_events(&app, &id, "ReservationExpired").await, 1);
    let actor: String = sqlx::query_scalar(
        "SELECT metadata->>'actor' FROM events WHERE aggregate_id = $1 AND event_type = 'ReservationExpired'",
    )
    .bind(&id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(actor, "worker:budget-expiry");
    let budget = get_budget(&app, &id).await;
    assert_eq!(budget["reserved"], "0.00");
    assert_eq!(budget["remaining"], "10.00");

    let problem = assert_problem(
        app.post(
            &format!("/v1/budgets/{id}/reservations/{rid}/capture"),
            &json!({"amount": "1"}),
        )
        .await,
        409,
    )
    .await;
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("reservation-expired")
    );
    let released = app
        .post(
            &format!("/v1/budgets/{id}/reservations/{rid}/release"),
            &json!({}),
        )
        .await;
    assert_eq!(released.status().as_u16(), 200);
    assert_eq!(released.json::<Value>().await.unwrap()["status"], "expired");
    let spend = app
        .post(
            &format!("/v1/budgets/{id}/spend"),
            &json!({"amount": "10", "category": "ai"}),
        )
        .await;
    assert_eq!(
        spend.status().as_u16(),
        201,
        "the held amount is free again"
    );
}

#[tokio::test]
async fn sweeps_running_at_once_in_two_processes_expire_each_hold_once() {
    let app = spawn_app().await;
    let ids = [
        create_budget(&app, json!("10")).await,
        create_budget(&app, json!("10")).await,
    ];
    let mut last = String::new();
    for id in &ids {
        for _ in 0..3 {
            let hold: Value = app
                .post(
                    &format!("/v1/budgets/{id}/reservations"),
                    &json!({"amount": "1", "category": "ai", "ttl_seconds": 1}),
                )
                .await
                .json()
                .await
                .unwrap();
            last = hold["position"].as_str().unwrap().to_string();
        }
    }
    assert!(
        projections::runner::wait_for(
            &app.pool,
            last.parse().unwrap(),
            &["budget_holds"],
            Duration::from_secs(10)
        )
        .await
        .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Two more "processes" sweep at the same moment as the app's own worker.
    let sweeps = (0..2).map(|_| {
        let state = crate::helpers::build_app(app.pool.clone());
        tokio::spawn(async move {
            leadledger::app::budgets::expire_due_holds(&state, chrono::Utc::now())
                .await
                .unwrap()
        })
    });
    futures::future::join_all(sweeps).await;
    for id in &ids {
        wait_for_expiry(&app, id, Duration::from_secs(10)).await;
        // Give any straggling sweep the time to make a mistake.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(count_events(&app, id, "ReservationExpired").await, 3);
        assert_eq!(get_budget(&app, id).await["reserved"], "0.00");
    }
}

#[tokio::test]
async fn unknown_budgets_are_404() {
    let app = spawn_app().await;
    let missing = "0190f1b4-0000-7000-8000-000000000000";
    assert_problem(app.read(&format!("/v1/budgets/{missing}")).await, 404).await;
    assert_problem(app.read("/v1/budgets/nope").await, 404).await;
    assert_problem(
        app.post(
            &format!("/v1/budgets/{missing}/spend"),
            &json!({"amount": "1", "category": "ai"}),
        )
        .await,
        404,
    )
    .await;
    assert_eq!(app.count("events").await, 0);
}

#[tokio::test]
async fn the_cost_analytics_refuse_days_outside_1_to_365_and_anything_injected() {
    let app = spawn_app().await;
    for query in [
        "days=0",
        "days=366",
        "days=abc",
        "days=30%3BDROP%20TABLE%20events",
        "days=30;DROP TABLE events",
        "days=",
        "days=-5",
        "days=%2B30",
        "group_by=week",
        "group_by=day%3BDROP%20TABLE%20events",
        "colour=blue",
    ] {
        let response = app.read(&format!("/v1/analytics/costs?{query}")).await;
        assert_problem(response, 400).await;
    }
    // The table is still there, and an ordinary request answers.
    assert_eq!(app.count("events").await, 0);
    let ok = app.read("/v1/analytics/costs?days=30").await;
    assert_eq!(ok.status().as_u16(), 200);
    let body: Value = ok.json().await.unwrap();
    let days = body["items"].as_array().unwrap();
    assert_eq!(days.len(), 30, "every day of the window, with zeros");
    assert!(
        days.iter()
            .all(|d| d["cost"] == "0.00" && d["requests"] == 0)
    );
    assert_eq!(body["group_by"], "day");
}

#[tokio::test]
async fn the_cost_analytics_add_up_every_spend_and_capture_by_day_model_category_and_budget() {
    let app = spawn_app().await;
    let limited = create_budget(&app, json!("100")).await;
    let tracking = create_budget(&app, Value::Null).await;
    let spend = |id: String, body: Value| {
        let app = &app;
        async move {
            let r = app.post(&format!("/v1/budgets/{id}/spend"), &body).await;
            assert_eq!(r.status().as_u16(), 201);
            r.json::<Value>().await.unwrap()
        }
    };
    spend(
        limited.clone(),
        json!({"amount": 0.1, "category": "ai", "model": "gpt-4o", "input_tokens": 1000, "output_tokens": 200}),
    )
    .await;
    spend(
        tracking.clone(),
        json!({"amount": 0.2, "category": "ai", "model": "gpt-4o", "input_tokens": 500, "output_tokens": 50}),
    )
    .await;
    spend(
        tracking.clone(),
        json!({"amount": "2.5", "category": "enrichment", "description": "lookup"}),
    )
    .await;
    let hold: Value = app
        .post(
            &format!("/v1/budgets/{limited}/reservations"),
            &json!({"amount": "5", "category": "outreach"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let rid = hold["reservation_id"].as_str().unwrap();
    let captured: Value = app
        .post(
            &format!("/v1/budgets/{limited}/reservations/{rid}/capture"),
            &json!({"amount": "4"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let token = captured["position"].as_str().unwrap();

    let report = |group_by: &'static str| {
        let app = &app;
        let token = token.to_string();
        async move {
            let r = app
                .read(&format!(
                    "/v1/analytics/costs?days=30&group_by={group_by}&min_position={token}"
                ))
                .await;
            assert_eq!(r.status().as_u16(), 200);
            r.json::<Value>().await.unwrap()["items"].clone()
        }
    };
    let today = chrono::Utc::now().date_naive().to_string();
    // Every day of the window is listed, oldest first; only today has costs.
    let days = report("day").await;
    let days = days.as_array().unwrap();
    assert_eq!(days.len(), 30);
    assert_eq!(
        days[29],
        json!({"day": today, "cost": "6.80", "input_tokens": 1500, "output_tokens": 250, "requests": 4})
    );
    assert!(
        days[..29]
            .iter()
            .all(|d| d["cost"] == "0.00" && d["requests"] == 0)
    );
    assert_eq!(
        report("model").await,
        json!([
            {"model": null, "cost": "6.50", "input_tokens": 0, "output_tokens": 0, "requests": 2},
            {"model": "gpt-4o", "cost": "0.30", "input_tokens": 1500, "output_tokens": 250, "requests": 2},
        ])
    );
    assert_eq!(
        report("category").await,
        json!([
            {"category": "outreach", "cost": "4.00", "input_tokens": 0, "output_tokens": 0, "requests": 1},
            {"category": "enrichment", "cost": "2.50", "input_tokens": 0, "output_tokens": 0, "requests": 1},
            {"category": "ai", "cost": "0.30", "input_tokens": 1500, "output_tokens": 250, "requests": 2},
        ])
    );
    assert_eq!(
        report("budget").await,
        json!([
            {"budget_id": limited, "name": "AI spend", "cost": "4.10", "input_tokens": 1000, "output_tokens": 200, "requests": 2},
            {"budget_id": tracking, "name": "AI spend", "cost": "2.70", "input_tokens": 500, "output_tokens": 50, "requests": 2},
        ])
    );
    // The default is 30 days by day.
    let default: Value = app
        .read(&format!("/v1/analytics/costs?min_position={token}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(default["items"], report("day").await);
}

/// Runs `leadledger analytics costs ARGS` on the app's database; returns stdout.
async fn cli_costs(app: &TestApp, args: &[&str]) -> String {
    let url = crate::helpers::harness().url(&app.database);
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_leadledger"));
    command
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .args(["analytics", "costs"])
        .args(args);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn the_command_line_prints_the_same_costs_as_the_api_even_with_no_server_running() {
    // No projection runner: as if no server process were running on the data.
    let app = crate::helpers::spawn_app_with(false).await;
    let id = create_budget(&app, Value::Null).await;
    for body in [
        json!({"amount": "1.5", "category": "ai", "model": "claude, \"large\"", "input_tokens": 7}),
        json!({"amount": 0.25, "category": "ai", "model": "small"}),
        json!({"amount": "3", "category": "outreach"}),
    ] {
        let r = app.post(&format!("/v1/budgets/{id}/spend"), &body).await;
        assert_eq!(r.status().as_u16(), 201);
    }
    assert_eq!(app.count("costs_view").await, 0, "nothing projected yet");

    let printed: Value =
        serde_json::from_str(&cli_costs(&app, &["--group-by", "model", "--format", "json"]).await)
            .unwrap();
    assert_eq!(
        app.count("costs_view").await,
        3,
        "the command caught the model up"
    );
    let served: Value = app
        .read("/v1/analytics/costs?group_by=model")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(printed, served);
    assert_eq!(printed["items"][0]["model"], Value::Null);
    assert_eq!(printed["items"][0]["cost"], "3.00");

    let csv = cli_costs(&app, &["--group-by", "model", "--format", "csv"]).await;
    assert_eq!(
        csv,
        "model,cost,input_tokens,output_tokens,requests\r\n\
         ,3.00,0,0,1\r\n\
         \"claude, \"\"large\"\"\",1.50,7,0,1\r\n\
         small,0.25,0,0,1\r\n"
    );
    let table = cli_costs(&app, &["--days", "1"]).await;
    let today = chrono::Utc::now().date_naive().to_string();
    let line = table
        .lines()
        .find(|l| l.starts_with(&today))
        .unwrap_or_else(|| panic!("{table}"));
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>(),
        [today.as_str(), "4.75", "7", "0", "3"]
    );
}

#[tokio::test]
async fn concurrent_spends_on_one_budget_commit_in_groups_each_keeping_its_own_answer() {
    let app = spawn_app().await;
    let id = create_budget(&app, json!("10.00")).await;
    // 60 spends of 0.25 at once, each with its own idempotency key: 40 fit.
    let tasks = (0..60).map(|i| {
        let request = app
            .client
            .post(app.url(&format!("/v1/budgets/{id}/spend")))
            .bearer_auth(&app.write_key)
            .header("Idempotency-Key", format!("spend-{i}"))
            .json(&json!({"amount": "0.25", "category": "ai"}));
        tokio::spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (i, status, response.text().await.unwrap())
        })
    });
    let answers: Vec<(usize, u16, String)> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let accepted = answers.iter().filter(|(_, s, _)| *s == 201).count();
    let refused = answers.iter().filter(|(_, s, _)| *s == 409).count();
    assert_eq!((accepted, refused), (40, 20), "{answers:?}");
    assert_eq!(
        dec(&get_budget(&app, &id).await["spent"]),
        Decimal::new(1000, 2)
    );
    // Several spends shared a transaction: fewer transactions than spends.
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT transaction_id::text) FROM events
         WHERE aggregate_id = $1 AND event_type = 'SpendRecorded'",
    )
    .bind(&id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(
        transactions < 40,
        "40 spends in {transactions} transactions: they were not grouped"
    );
    // Each kept its own recorded answer, refusals included.
    for (i, status, body) in answers.iter().step_by(7) {
        let again = app
            .client
            .post(app.url(&format!("/v1/budgets/{id}/spend")))
            .bearer_auth(&app.write_key)
            .header("Idempotency-Key", format!("spend-{i}"))
            .json(&json!({"amount": "0.25", "category": "ai"}))
            .send()
            .await
            .unwrap();
        assert_eq!(again.status().as_u16(), *status);
        assert_eq!(&again.text().await.unwrap(), body, "spend {i} replayed");
    }
    assert_eq!(count_events(&app, &id, "SpendRecorded").await, 40);
}

/// A spend of 1 on budget `id` through the command path in-process (not over HTTP), so
/// that a test can drop its request midway or give it any idempotency key.
async fn spend_in_process(
    state: leadledger::app::App,
    id: String,
    context: leadledger::app::command::CommandContext,
) -> Result<leadledger::app::command::Answer, leadledger::app::error::AppError> {
    use aggregates::budget::{Budget, BudgetCommand, SpendCategory};
    use aggregates::money::{Money, PositiveAmount};
    use leadledger::app::command::{self, Reply};
    command::execute::<Budget, _, _, _, _>(
        &state,
        &context,
        &id,
        &(),
        |_| {
            Ok(BudgetCommand::Spend {
                spend_id: uuid::Uuid::now_v7(),
                amount: PositiveAmount::new(Money::parse_str("1").unwrap()).unwrap(),
                category: SpendCategory::Ai,
                description: None,
                model: None,
                input_tokens: None,
                output_tokens: None,
                at: chrono::Utc::now(),
            })
        },
        |_| Reply::ok(json!({})),
        |e: &leadledger::app::error::AppError| Reply::ok(json!({"refused": e.to_string()})),
    )
    .await
}

/// Waits until a statement starting with `start` waits on a lock.
async fn until_waiting_on_lock(pool: &sqlx::PgPool, start: &str) {
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database()
               AND wait_event_type = 'Lock' AND query LIKE $1 || '%'",
        )
        .bind(start)
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no statement came to wait on the lock");
}

/// Starts `first` and then `second` on one budget, so that the second joins the group the
/// first leads (the first's load is held back by a lock meanwhile); returns with the
/// group's load let go and, if `hold_write`, its write held back by a lock (the
/// transaction holding it).
async fn gather_two<A, B>(
    app: &TestApp,
    first: A,
    second: B,
    hold_write: bool,
) -> (
    tokio::task::JoinHandle<A::Output>,
    tokio::task::JoinHandle<B::Output>,
    Option<sqlx::Transaction<'static, sqlx::Postgres>>,
)
where
    A: std::future::Future + Send + 'static,
    A::Output: Send + 'static,
    B: std::future::Future + Send + 'static,
    B::Output: Send + 'static,
{
    let mut loads = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE snapshots IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *loads)
        .await
        .unwrap();
    let first = tokio::spawn(first);
    until_waiting_on_lock(&app.pool, "SELECT kind").await;
    let second = tokio::spawn(second);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let writes = if hold_write {
        let mut writes = app.pool.begin().await.unwrap();
        sqlx::query("LOCK TABLE idempotency_records IN EXCLUSIVE MODE")
            .execute(&mut *writes)
            .await
            .unwrap();
        Some(writes)
    } else {
        None
    };
    loads.commit().await.unwrap();
    (first, second, writes)
}

#[tokio::test]
async fn a_group_whose_leader_goes_away_while_it_writes_still_answers_its_members_once() {
    let app = spawn_app().await;
    let id = create_budget(&app, json!("100")).await;
    let spend = || spend_in_process(app.state.clone(), id.clone(), Default::default());
    let (leader, member, writes) = gather_two(&app, spend(), spend(), true).await;
    // Drop the leader's request while the group's write waits.
    until_waiting_on_lock(&app.pool, "WITH made AS").await;
    leader.abort();
    let _ = leader.await;
    writes.unwrap().commit().await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), member)
        .await
        .expect("the member was answered")
        .unwrap();
    assert!(answer.is_ok(), "{answer:?}");
    assert_eq!(
        count_events(&app, &id, "SpendRecorded").await,
        2,
        "the group's write committed once, and the member did not run again"
    );
}

#[tokio::test]
async fn a_second_request_with_a_key_in_the_same_group_is_told_the_first_is_in_flight() {
    use leadledger::app::command::{Answer, CommandContext, Idempotency};
    use leadledger::app::error::AppError;

    let app = spawn_app().await;
    let id = create_budget(&app, json!("100")).await;
    let scope: uuid::Uuid = sqlx::query_scalar("SELECT id FROM api_keys LIMIT 1")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let keyed = CommandContext {
        idempotency: Some(Idempotency {
            scope,
            key: "spend-once".into(),
            request_hash: b"the same request".to_vec(),
        }),
        ..Default::default()
    };
    let spend = || spend_in_process(app.state.clone(), id.clone(), keyed.clone());
    let (first, second, _) = gather_two(&app, spend(), spend(), false).await;
    assert!(matches!(first.await.unwrap(), Ok(Answer::Fresh(_))));
    match second.await.unwrap() {
        Err(AppError::Conflict { kind, .. }) => assert_eq!(kind, "idempotency-key-in-flight"),
        other => panic!("the second was not told the first is in flight: {other:?}"),
    }
    // Once the group is written, the key's answer is replayed.
    assert!(matches!(spend().await, Ok(Answer::Replayed(_))));
    assert_eq!(count_events(&app, &id, "SpendRecorded").await, 1);
}
