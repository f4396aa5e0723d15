//! Command execution over HTTP: optimistic concurrency with retries, If-Match, idempotency
//! keys, and the API's error conventions (problem+json, 400/413/415/422/503).

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{assert_problem, read_until, spawn_app};

async fn stream(app: &crate::helpers::TestApp, id: &str) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT sequence, event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn fifty_concurrent_commands_on_one_aggregate_all_succeed_through_retries() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("hot").await;
    let id = campaign["id"].as_str().unwrap().to_string();
    let requests = (0..50).map(|i| {
        let client = app.client.clone();
        let url = app.url(&format!("/v1/campaigns/{id}"));
        let key = app.write_key.clone();
        tokio::spawn(async move {
            client
                .patch(url)
                .bearer_auth(key)
                .json(&json!({"name": format!("name {i}")}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    });
    let statuses: Vec<u16> = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    let events = stream(&app, &id).await;
    let sequences: Vec<i64> = events.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        sequences,
        (1..=51).collect::<Vec<_>>(),
        "created + 50 renames, no gaps"
    );
    assert_eq!(
        events
            .iter()
            .filter(|(_, t)| t == "CampaignRenamed")
            .count(),
        50
    );
    let renamed: HashSet<String> = sqlx::query_scalar(
        "SELECT payload->'CampaignRenamed'->>'name' FROM events WHERE aggregate_id = $1 AND sequence > 1",
    )
    .bind(&id)
    .fetch_all(&app.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(renamed.len(), 50, "every command's own change was recorded");

    let now: Value = app
        .read(&format!("/v1/campaigns/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(now["version"], 51);
}

#[tokio::test]
async fn a_stale_if_match_gives_412_and_writes_nothing() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("guarded").await;
    let id = campaign["id"].as_str().unwrap();
    assert_eq!(campaign["version"], 1);

    let fresh = app
        .client
        .patch(app.url(&format!("/v1/campaigns/{id}")))
        .bearer_auth(&app.write_key)
        .header("if-match", "\"1\"")
        .json(&json!({"name": "second"}))
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status().as_u16(), 200);
    assert_eq!(fresh.headers()["etag"], "\"2\"");

    let before = app.count("events").await;
    let stale = app
        .client
        .patch(app.url(&format!("/v1/campaigns/{id}")))
        .bearer_auth(&app.write_key)
        .header("if-match", "\"1\"")
        .json(&json!({"name": "third"}))
        .send()
        .await
        .unwrap();
    let body = assert_problem(stale, 412).await;
    assert!(body["detail"].as_str().unwrap().contains("version"));
    assert_eq!(app.count("events").await, before);
    let now: Value = app
        .read(&format!("/v1/campaigns/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(now["name"], "second");
}

#[tokio::test]
async fn a_key_refused_before_its_command_ran_is_free_for_the_corrected_request() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("claimed").await;
    let id = campaign["id"].as_str().unwrap();
    let patch = |if_match: &'static str, name: &'static str| {
        app.client
            .patch(app.url(&format!("/v1/campaigns/{id}")))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", "rename-1")
            .header("if-match", if_match)
            .json(&json!({"name": name}))
            .send()
    };
    // Refused by If-Match before the command ran: no answer is kept for the key.
    assert_problem(patch("\"7\"", "stale").await.unwrap(), 412).await;
    let claims: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM idempotency_records
         WHERE idempotency_key = 'rename-1' AND response_status IS NOT NULL",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(claims, 0);
    // The corrected request (another body too) runs, and its answer is the key's.
    let first = patch("\"1\"", "renamed").await.unwrap();
    assert_eq!(first.status().as_u16(), 200);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["name"], "renamed");
    let again = patch("\"1\"", "renamed").await.unwrap();
    assert_eq!(again.status().as_u16(), 200);
    assert_eq!(again.json::<Value>().await.unwrap(), first, "replayed");
    assert_eq!(stream(&app, id).await.len(), 2, "one effect");
    let other = patch("\"1\"", "different").await.unwrap();
    assert_problem(other, 422).await;
}

#[tokio::test]
async fn the_same_idempotency_key_twice_gives_one_effect_and_the_same_response() {
    let app = spawn_app().await;
    let send = || {
        app.client
            .post(app.url("/v1/campaigns"))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", "create-q4")
            .json(&json!({"name": "Q4"}))
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status().as_u16(), 201);
    let first_body: Value = first.json().await.unwrap();
    let second = send().await.unwrap();
    assert_eq!(second.status().as_u16(), 201);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    let second_body: Value = second.json().await.unwrap();
    assert_eq!(first_body, second_body);
    assert_eq!(app.count("events").await, 1, "one campaign created");
    // Both name the event written, though the answer was recorded with it.
    let written: String =
        sqlx::query_scalar("SELECT transaction_id::text || '-' || position FROM events")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(first_body["position"], written.as_str());
}

#[tokio::test]
async fn an_idempotency_key_reused_with_a_different_body_is_422() {
    let app = spawn_app().await;
    let send = |name: &'static str| {
        app.client
            .post(app.url("/v1/campaigns"))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", "k-1")
            .json(&json!({"name": name}))
            .send()
    };
    assert_eq!(send("one").await.unwrap().status().as_u16(), 201);
    let body = assert_problem(send("two").await.unwrap(), 422).await;
    assert_eq!(body["errors"][0]["field"], "Idempotency-Key");
    assert_eq!(app.count("events").await, 1);
}

#[tokio::test]
async fn idempotency_keys_are_scoped_to_the_api_key() {
    let app = spawn_app().await;
    for key in [&app.write_key, &app.admin_key] {
        let response = app
            .client
            .post(app.url("/v1/campaigns"))
            .bearer_auth(key)
            .header("idempotency-key", "shared-name")
            .json(&json!({"name": "same"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 201);
    }
    assert_eq!(app.count("events").await, 2);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_give_one_effect() {
    let app = spawn_app().await;
    let requests = (0..10).map(|_| {
        let request = app
            .client
            .post(app.url("/v1/campaigns"))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", "race")
            .json(&json!({"name": "raced"}));
        tokio::spawn(async move {
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        })
    });
    let results: Vec<(u16, Value)> = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let created: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, b)| b)
        .collect();
    assert!(!created.is_empty());
    assert!(
        created.iter().all(|b| b["id"] == created[0]["id"]),
        "every 201 is the same answer"
    );
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
    assert_eq!(app.count("events").await, 1, "one effect");
}

#[tokio::test]
async fn a_domain_error_is_recorded_for_its_idempotency_key() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("done").await;
    let id = campaign["id"].as_str().unwrap();
    for path in ["start", "complete"] {
        app.post(&format!("/v1/campaigns/{id}/{path}"), &json!({}))
            .await;
    }
    let send = || {
        app.client
            .post(app.url(&format!("/v1/campaigns/{id}/start")))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", "restart")
            .send()
    };
    let first = assert_problem(send().await.unwrap(), 409).await;
    assert!(
        first["type"]
            .as_str()
            .unwrap()
            .ends_with("invalid-transition")
    );
    let again = send().await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(assert_problem(again, 409).await, first);
}

#[tokio::test]
async fn write_responses_carry_version_etag_and_a_position_token() {
    let app = spawn_app().await;
    let response = app.post("/v1/campaigns", &json!({"name": "tokens"})).await;
    assert_eq!(response.status().as_u16(), 201);
    assert_eq!(response.headers()["etag"], "\"1\"");
    let id = response.headers()["location"].to_str().unwrap().to_string();
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        format!("/v1/campaigns/{}", body["id"].as_str().unwrap()),
        id
    );
    assert_eq!(body["version"], 1);
    assert_eq!(body["status"], "draft");
    let position = body["position"].as_str().unwrap();
    assert!(position.split_once('-').is_some(), "{position}");
}

#[tokio::test]
async fn campaign_transitions_follow_the_lifecycle_and_refuse_the_rest_with_409() {
    let app = spawn_app().await;
    let id = app.create_campaign("life").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let step = |path: &'static str| {
        let id = id.clone();
        let app = &app;
        async move {
            app.post(&format!("/v1/campaigns/{id}/{path}"), &json!({}))
                .await
        }
    };
    let paused = step("pause").await;
    assert_problem(paused, 409).await;
    for (path, status) in [
        ("start", "running"),
        ("pause", "paused"),
        ("start", "running"),
        ("complete", "completed"),
    ] {
        let r = step(path).await;
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap()["status"], status);
    }
    let events_before = app.count("events").await;
    let body = assert_problem(step("start").await, 409).await;
    assert!(body["detail"].as_str().unwrap().contains("completed"));
    assert_eq!(app.count("events").await, events_before);
}

#[tokio::test]
async fn invalid_input_is_refused_with_the_right_status_and_writes_nothing() {
    let app = spawn_app().await;
    let post_raw = |body: &'static str, content_type: &'static str| {
        app.client
            .post(app.url("/v1/campaigns"))
            .bearer_auth(&app.write_key)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let malformed = assert_problem(
        post_raw("{\"name\": ", "application/json").await.unwrap(),
        400,
    )
    .await;
    assert!(
        malformed["detail"]
            .as_str()
            .unwrap()
            .contains("malformed JSON")
    );
    assert_problem(post_raw("", "application/json").await.unwrap(), 400).await;
    assert_problem(
        post_raw("name=x", "application/x-www-form-urlencoded")
            .await
            .unwrap(),
        415,
    )
    .await;

    let unknown = assert_problem(
        post_raw("{\"name\": \"a\", \"colour\": 1}", "application/json")
            .await
            .unwrap(),
        422,
    )
    .await;
    assert!(
        unknown["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field")
    );
    let wrong_type = assert_problem(
        post_raw("{\"name\": 5}", "application/json").await.unwrap(),
        422,
    )
    .await;
    assert_eq!(wrong_type["errors"][0]["field"], "name");
    let blank = assert_problem(
        post_raw("{\"name\": \"   \"}", "application/json")
            .await
            .unwrap(),
        422,
    )
    .await;
    assert_eq!(blank["errors"][0]["field"], "name");
    let long = format!("{{\"name\": \"{}\"}}", "x".repeat(201));
    let response = app
        .client
        .post(app.url("/v1/campaigns"))
        .bearer_auth(&app.write_key)
        .header("content-type", "application/json")
        .body(long)
        .send()
        .await
        .unwrap();
    assert_problem(response, 422).await;
    let huge = app
        .client
        .post(app.url("/v1/campaigns"))
        .bearer_auth(&app.write_key)
        .header("content-type", "application/json")
        .body(format!("{{\"name\": \"{}\"}}", "x".repeat(2 << 20)))
        .send()
        .await
        .unwrap();
    assert_problem(huge, 413).await;
    let bad_key = app
        .client
        .post(app.url("/v1/campaigns"))
        .bearer_auth(&app.write_key)
        .header("idempotency-key", "has spaces in it")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_problem(bad_key, 400).await;
    let bad_if_match = app
        .client
        .patch(app.url("/v1/campaigns/00000000-0000-0000-0000-000000000000"))
        .bearer_auth(&app.write_key)
        .header("if-match", "yesterday")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_problem(bad_if_match, 400).await;
    assert_eq!(app.count("events").await, 0, "nothing was written");
}

#[tokio::test]
async fn text_with_quotes_and_sql_is_stored_and_returned_exactly() {
    let app = spawn_app().await;
    let name = "Robert'); DROP TABLE events; -- \"quoted\" ; émoji 🚀";
    let created = app.create_campaign(name).await;
    assert_eq!(created["name"], name);
    let id = created["id"].as_str().unwrap();
    let read: Value = app
        .read(&format!("/v1/campaigns/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(read["name"], name);
}

#[tokio::test]
async fn unknown_campaigns_are_404_for_reads_and_commands() {
    let app = spawn_app().await;
    let missing = "0190f1b4-0000-7000-8000-000000000000";
    assert_problem(app.read(&format!("/v1/campaigns/{missing}")).await, 404).await;
    assert_problem(app.read("/v1/campaigns/not-a-uuid").await, 404).await;
    assert_problem(
        app.post(&format!("/v1/campaigns/{missing}/start"), &json!({}))
            .await,
        404,
    )
    .await;
    assert_eq!(app.count("events").await, 0);
}

#[tokio::test]
async fn a_database_outage_is_503_with_retry_after_not_500() {
    let app = spawn_app().await;
    app.pool.close().await;
    let response = app.post("/v1/campaigns", &json!({"name": "offline"})).await;
    assert_eq!(response.headers()["retry-after"], "1");
    assert_problem(response, 503).await;
}

/// Starts the upserts `bodies` (`POST /v1/contacts`, each with its idempotency key) at
/// once.
fn start_upserts(
    app: &crate::helpers::TestApp,
    bodies: Vec<(String, Value)>,
) -> Vec<tokio::task::JoinHandle<(u16, Value)>> {
    bodies
        .into_iter()
        .map(|(key, body)| {
            let request = app
                .client
                .post(app.url("/v1/contacts"))
                .bearer_auth(&app.write_key)
                .header("idempotency-key", key)
                .json(&body);
            tokio::spawn(async move {
                let r = request.send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap())
            })
        })
        .collect()
}

/// Sends the upserts `bodies` while the write of another contact's upsert is held in the
/// task that runs the contacts' write batches, and lets that write go only once every one
/// of them waits for the next batch: they are all taken in one batch. Returns their
/// answers, in order, and the other contact's id. `ahead`, that contact's email, must be
/// the test's own: holds are kept by stream, for every app of the process. Each queued
/// write holds a connection of the app's pool (20 in tests) until its batch is written:
/// keep `bodies` well under.
async fn upsert_in_one_batch(
    app: &crate::helpers::TestApp,
    ahead: &str,
    bodies: Vec<(String, Value)>,
) -> (Vec<(u16, Value)>, String) {
    use leadledger::app::pauses::{Point, hold};
    let ahead_id = contact_id(app, ahead).await;
    let writing = hold(Point::Writing, "contact", &ahead_id);
    let first = start_upserts(app, vec![("ahead".into(), json!({"email": ahead}))]);
    tokio::time::timeout(Duration::from_secs(10), writing.reached())
        .await
        .expect("the first upsert's write reached the batch task");
    let count = bodies.len();
    let requests = start_upserts(app, bodies);
    let queued = read_until(
        async || {
            leadledger::app::command::queued_writes::<aggregates::contact::Contact>(&app.state)
        },
        |queued| *queued == count,
    )
    .await;
    assert_eq!(queued, count, "writes queued behind the held one");
    writing.release();
    for first in first {
        let (status, body) = first.await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    let answers = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    (answers, ahead_id)
}

/// Upserts of `n` new contacts, each with a key of its own.
fn new_contacts(n: usize) -> Vec<(String, Value)> {
    (0..n)
        .map(|i| {
            (
                format!("k{i}"),
                json!({"email": format!("c{i}@example.com")}),
            )
        })
        .collect()
}

/// How many transactions wrote the events of the contacts `ids`, and how many events.
async fn transactions_of(app: &crate::helpers::TestApp, ids: &[String]) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(DISTINCT transaction_id), count(*) FROM events
         WHERE aggregate_type = 'contact' AND aggregate_id = ANY($1)",
    )
    .bind(ids)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// The ids of the contacts the answers `answers` created.
fn created_ids(answers: &[(u16, Value)]) -> Vec<String> {
    answers
        .iter()
        .filter(|(status, _)| *status == 201)
        .map(|(_, body)| body["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn upserts_of_different_contacts_that_queue_behind_a_write_are_written_next_in_one_transaction()
 {
    let app = spawn_app().await;
    let bodies = new_contacts(8);
    let (answers, ahead) = upsert_in_one_batch(&app, "ahead-of-eight@example.com", bodies).await;
    for (status, body) in &answers {
        assert_eq!(*status, 201, "{body}");
    }
    let ids = created_ids(&answers);
    assert_eq!(
        transactions_of(&app, &ids).await,
        (1, 8),
        "the eight contacts' events in one transaction"
    );
    assert_eq!(
        transactions_of(&app, std::slice::from_ref(&ahead)).await,
        (1, 1),
        "the contact ahead in a transaction of its own"
    );
    let all = [ids, vec![ahead]].concat();
    assert_eq!(
        transactions_of(&app, &all).await,
        (2, 9),
        "the one ahead, then the eight"
    );
    assert_eq!(recorded_keys(&app).await.len(), 9, "each key answered once");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let batches_up_to = |size: &str| -> u64 {
        let series = format!(
            r#"command_batch_size_bucket{{aggregate="contact",step="write",le="{size}"}} "#
        );
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series.as_str()))
            .unwrap_or_else(|| panic!("the batches are counted: {metrics}"))
            .parse()
            .unwrap()
    };
    assert!(
        batches_up_to("8") > batches_up_to("4"),
        "a batch of 5 to 8 writes is counted: {metrics}"
    );
    assert!(
        metrics
            .contains(r#"command_batch_duration_seconds_count{aggregate="contact",step="write"}"#),
        "the batches are timed: {metrics}"
    );
}

#[tokio::test]
async fn a_write_in_a_batch_that_conflicts_makes_each_write_alone_and_leaves_the_others_committed()
{
    let app = spawn_app().await;
    // Eight contacts, and two more under one key: in one batch, the second of those
    // clashes with the first's record and fails the batch's statement whole.
    let mut bodies = new_contacts(8);
    for twin in ["a", "b"] {
        bodies.push((
            "shared".into(),
            json!({"email": format!("{twin}@example.com")}),
        ));
    }
    let (answers, _) = upsert_in_one_batch(&app, "ahead-of-a-clash@example.com", bodies).await;
    for (status, body) in &answers[..8] {
        assert_eq!(*status, 201, "{body}");
    }
    let twins: Vec<u16> = answers[8..].iter().map(|(s, _)| *s).collect();
    assert_eq!(
        twins.iter().filter(|s| **s == 201).count(),
        1,
        "one of the requests sharing a key creates its contact: {:?}",
        &answers[8..]
    );
    for (status, body) in &answers[8..] {
        if *status != 201 {
            assert_eq!(*status, 422, "{body}");
            assert_eq!(body["status"], 422, "a problem: {body}");
        }
    }
    let ids = created_ids(&answers);
    assert_eq!(ids.len(), 9);
    assert_eq!(
        transactions_of(&app, &ids).await,
        (9, 9),
        "the batch's statement failed, and each of its writes went in alone"
    );
    let contacts: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT aggregate_id) FROM events WHERE aggregate_type = 'contact'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(contacts, 10, "the one ahead and the nine, and no other");
    let answered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM idempotency_records WHERE response_status = 201")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(answered, 10, "every contact written was answered, once");
}

/// Whether `/metrics` counts guesses on contacts that ended with `outcome`.
async fn metric_exported(app: &crate::helpers::TestApp, outcome: &str) -> bool {
    let metrics = app.get("/metrics").await.text().await.unwrap();
    metrics.contains(&format!(
        r#"command_guesses_total{{aggregate="contact",outcome="{outcome}"}}"#
    ))
}

#[tokio::test]
async fn an_upsert_guessed_to_create_a_contact_that_exists_updates_it_and_a_repeated_key_replays() {
    // A process starts out guessing that aggregates are new: the first upsert creates its
    // contact without loading it, and so does the second try at the same one.
    let app = spawn_app().await;
    let upsert = |key: &'static str, name: &'static str| {
        app.client
            .post(app.url("/v1/contacts"))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", key)
            .json(&json!({"email": "guess@example.com", "first_name": name}))
            .send()
    };
    let created = upsert("first", "Ada").await.unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let created: Value = created.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(
        metric_exported(&app, "held").await,
        "the creation was a guess"
    );

    let updated = upsert("second", "Grace").await.unwrap();
    assert_eq!(
        updated.status().as_u16(),
        200,
        "an update, not a second creation"
    );
    assert_eq!(updated.headers()["etag"], "\"2\"");
    let updated: Value = updated.json().await.unwrap();
    assert_eq!(updated["first_name"], "Grace", "{updated}");
    assert_eq!(
        stream(&app, &id).await,
        vec![(1, "ContactCreated".into()), (2, "ContactUpdated".into())]
    );
    assert!(
        metric_exported(&app, "wrong").await,
        "the update was guessed wrong"
    );

    // The first key again: its answer, replayed, though a guess would have created.
    let again = upsert("first", "Ada").await.unwrap();
    assert_eq!(again.status().as_u16(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), created);
    assert_eq!(stream(&app, &id).await.len(), 2, "nothing written again");
}

#[tokio::test]
async fn commands_refused_on_a_guess_that_their_contact_is_new_are_decided_again_on_it_as_loaded() {
    let app = spawn_app().await;
    let id = app
        .create_contact(&json!({"email": "patched@example.com"}))
        .await;
    // On a contact taken to be new, an update is refused (404): the leader's and those of
    // the commands that joined its group. None of them may be the answer.
    let patches = (0..10).map(|i| {
        let request = app
            .client
            .patch(app.url(&format!("/v1/contacts/{id}")))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", format!("patch-{i}"))
            .json(&json!({"title": format!("Title {i}")}));
        tokio::spawn(async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        })
    });
    for outcome in futures::future::join_all(patches).await {
        let (status, body) = outcome.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(stream(&app, &id).await.len(), 11, "every update written");
    let recorded: Vec<i16> = sqlx::query_scalar(
        "SELECT response_status FROM idempotency_records WHERE idempotency_key LIKE 'patch-%'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(recorded, vec![200; 10], "no refusal recorded for any key");
    assert!(metric_exported(&app, "untested").await);
}

/// The id the server gives the contact with `email`.
async fn contact_id(app: &crate::helpers::TestApp, email: &str) -> String {
    let email = aggregates::contact::ContactEmail::parse(email).unwrap();
    leadledger::app::contacts::id_for(&app.state, &email)
        .await
        .unwrap()
        .to_string()
}

/// The id of the contact with `email`, and holds on the next leader and the next member
/// of its stream once each has taken its turn.
async fn held_contact(
    app: &crate::helpers::TestApp,
    email: &str,
) -> (
    String,
    std::sync::Arc<leadledger::app::pauses::Held>,
    std::sync::Arc<leadledger::app::pauses::Held>,
) {
    use leadledger::app::pauses::{Point, hold};
    let id = contact_id(app, email).await;
    let leader = hold(Point::LeaderTurnTaken, "contact", &id);
    let member = hold(Point::MemberTurnTaken, "contact", &id);
    (id, leader, member)
}

/// Starts an upsert of the contact with `email`, held once its group, led on the guess
/// that the contact is new, has taken its turn and still takes members; then a `PATCH` of
/// the same contact with `If-Match: "<version>"`, which joins that group and is refused
/// there (412: the guessed state is at version 1). Returns the two requests as they run
/// on, and the leader's hold, still held.
async fn a_member_refused_in_a_guessed_group(
    app: &crate::helpers::TestApp,
    email: &'static str,
    version: u32,
) -> (
    tokio::task::JoinHandle<(u16, Value)>,
    tokio::task::JoinHandle<(u16, Value)>,
    std::sync::Arc<leadledger::app::pauses::Held>,
) {
    let (id, leader_held, member_held) = held_contact(app, email).await;
    let send = |request: reqwest::RequestBuilder| {
        tokio::spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        })
    };
    let leader = send(
        app.client
            .post(app.url("/v1/contacts"))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", "leader")
            .json(&json!({"email": email, "first_name": "Grace"})),
    );
    leader_held.reached().await;
    let member = send(
        app.client
            .patch(app.url(&format!("/v1/contacts/{id}")))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", "member")
            .header("if-match", format!("\"{version}\""))
            .json(&json!({"title": "CTO"})),
    );
    // It took its turn in the leader's group, since that group cannot close before.
    member_held.reached().await;
    member_held.release();
    (leader, member, leader_held)
}

#[tokio::test]
async fn a_member_refused_on_a_guess_that_held_hears_its_refusal_only_once_the_group_committed() {
    let app = spawn_app().await;
    let (leader, member, leader_held) =
        a_member_refused_in_a_guessed_group(&app, "held-guess@example.com", 7).await;
    // Its refusal holds only if the guess does, which the group's write tests: until
    // then, no answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !member.is_finished(),
        "the member was answered before its group was written"
    );
    leader_held.release();
    let (status, created) = leader.await.unwrap();
    assert_eq!(status, 201, "{created}");
    let (status, refused) = member.await.unwrap();
    assert_eq!(status, 412, "{refused}");
    assert_eq!(refused["status"], 412);
    let id = created["id"].as_str().unwrap();
    assert_eq!(stream(&app, id).await, vec![(1, "ContactCreated".into())]);
    assert!(metric_exported(&app, "held").await);
}

#[tokio::test]
async fn a_member_refused_on_a_guess_that_did_not_hold_is_decided_again_on_the_contact_as_loaded() {
    let app = spawn_app().await;
    let email = "wrong-guess@example.com";
    let id = app
        .create_contact(&json!({"email": email, "first_name": "Ada"}))
        .await;
    // The upsert is guessed to create the contact, which exists: on the guessed state the
    // member's `If-Match: "2"` is refused; on the contact as it is once the upsert has
    // updated it, it holds.
    let (leader, member, leader_held) = a_member_refused_in_a_guessed_group(&app, email, 2).await;
    let again =
        leadledger::app::pauses::hold(leadledger::app::pauses::Point::TryingAgain, "contact", &id);
    leader_held.release();
    tokio::time::timeout(Duration::from_secs(10), again.reached())
        .await
        .expect("the member, refused on the wrong guess, tries again");
    let (status, updated) = leader.await.unwrap();
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["first_name"], "Grace");
    // Once the upsert is answered, so that the member is decided after it.
    again.release();
    let (status, patched) = member.await.unwrap();
    assert_eq!(
        status, 200,
        "the refusal on the wrong guess was its answer: {patched}"
    );
    assert_eq!(patched["title"], "CTO");
    assert_eq!(patched["first_name"], "Grace");
    assert_eq!(
        stream(&app, &id).await,
        vec![
            (1, "ContactCreated".into()),
            (2, "ContactUpdated".into()),
            (3, "ContactUpdated".into())
        ]
    );
    assert!(metric_exported(&app, "wrong").await);
    let recorded: Vec<(String, i16)> = sqlx::query_as(
        "SELECT idempotency_key, response_status FROM idempotency_records
         WHERE idempotency_key IN ('leader', 'member') ORDER BY idempotency_key",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        recorded,
        vec![("leader".into(), 200), ("member".into(), 200)],
        "each key answered once, as it was answered"
    );
}

/// The idempotency keys the app has records of.
async fn recorded_keys(app: &crate::helpers::TestApp) -> Vec<String> {
    sqlx::query_scalar("SELECT idempotency_key FROM idempotency_records ORDER BY 1")
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

/// A request to the app's router in this process (as the server runs it, without the
/// connection), so that the test can drop it midway, as the server drops a request
/// whose time ran out or whose connection went away.
fn in_process(
    app: &crate::helpers::TestApp,
    method: &str,
    path: &str,
    key: &str,
    body: &Value,
) -> tokio::task::JoinHandle<axum::response::Response> {
    use tower::ServiceExt;
    let request = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {}", app.write_key))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    let router = leadledger::http::router(app.state.clone());
    tokio::spawn(async move { router.oneshot(request).await.unwrap() })
}

#[tokio::test]
async fn a_member_dropped_before_its_turn_is_done_rolls_its_group_back_and_the_leader_writes_alone()
{
    let app = spawn_app().await;
    let email = "dropped-member@example.com";
    let (id, leader_held, member_held) = held_contact(&app, email).await;
    let leader = app
        .client
        .post(app.url("/v1/contacts"))
        .bearer_auth(&app.write_key)
        .header("idempotency-key", "leader")
        .json(&json!({"email": email}))
        .send();
    let leader = tokio::spawn(leader);
    leader_held.reached().await;
    // On the leader's new contact, at version 1, the member's update is decided and added
    // to the group's write; then its request goes away before it says its turn is done.
    let member = in_process(
        &app,
        "PATCH",
        &format!("/v1/contacts/{id}"),
        "member",
        &json!({"title": "CTO"}),
    );
    member_held.reached().await;
    member.abort();
    assert!(member.await.unwrap_err().is_cancelled());
    leader_held.release();
    let created = leader.await.unwrap().unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let created: Value = created.json().await.unwrap();
    assert!(created.get("title").is_none_or(Value::is_null), "{created}");
    assert_eq!(
        stream(&app, &id).await,
        vec![(1, "ContactCreated".into())],
        "nothing of the dropped member was written"
    );
    let keys = recorded_keys(&app).await;
    assert!(keys.contains(&"leader".to_string()), "{keys:?}");
    assert!(!keys.contains(&"member".to_string()), "{keys:?}");
}

#[tokio::test]
async fn a_leader_dropped_while_its_group_takes_members_ends_it_and_the_members_write_on_their_own()
{
    let app = spawn_app().await;
    let email = "dropped-leader@example.com";
    let (id, leader_held, member_held) = held_contact(&app, email).await;
    let leader = in_process(
        &app,
        "POST",
        "/v1/contacts",
        "leader",
        &json!({"email": email, "first_name": "Ada"}),
    );
    leader_held.reached().await;
    let member = tokio::spawn(
        app.client
            .post(app.url("/v1/contacts"))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", "member")
            .json(&json!({"email": email, "first_name": "Grace"}))
            .send(),
    );
    // The member decided its upsert on the leader's contact (an update), and is done.
    member_held.reached().await;
    member_held.release();
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    // The group ended with its leader: the member tries again in a group of its own, in
    // which the contact is new.
    let created = tokio::time::timeout(Duration::from_secs(10), member)
        .await
        .expect("the member is not left waiting for a group that will never be written")
        .unwrap()
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let created: Value = created.json().await.unwrap();
    assert_eq!(created["first_name"], "Grace");
    assert_eq!(stream(&app, &id).await, vec![(1, "ContactCreated".into())]);
    let keys = recorded_keys(&app).await;
    assert!(keys.contains(&"member".to_string()), "{keys:?}");
    assert!(!keys.contains(&"leader".to_string()), "{keys:?}");
}

#[tokio::test]
async fn a_command_keeps_its_connection_for_the_next_and_the_pool_gets_it_back_once_commands_stop()
{
    let app = crate::helpers::spawn_app_with(false).await;
    let warm = &app.state.warm;
    for n in 0..5 {
        let created = app
            .post(
                "/v1/contacts",
                &json!({"email": format!("kept-{n}@example.com")}),
            )
            .await;
        assert_eq!(created.status().as_u16(), 201);
        // One command at a time: the one connection each used is kept for the next.
        assert_eq!(warm.kept(), 1, "after command {n}");
    }
    tokio::time::sleep(leadledger::db::Warm::KEEP * 3).await;
    assert_eq!(warm.kept(), 0);
    assert_eq!(
        app.pool.num_idle(),
        app.pool.size() as usize,
        "every connection is back in the pool"
    );
}

/// Connections kept from a pool of four on a fresh database, whose users wait at most
/// `timeout` for a connection.
async fn kept_on_a_pool_of_four(timeout: Duration) -> (sqlx::PgPool, leadledger::db::Warm) {
    let harness = crate::helpers::harness();
    let database = harness.fresh_database().await;
    let pool = leadledger::db::pool_options(4)
        .acquire_timeout(timeout)
        .connect_with(harness.options(&database))
        .await
        .unwrap();
    let warm = leadledger::db::Warm::new(pool.clone());
    (pool, warm)
}

#[tokio::test]
async fn connections_kept_for_commands_never_hold_more_than_half_the_pool_nor_hold_it_long() {
    let (pool, warm) = kept_on_a_pool_of_four(Duration::from_secs(2)).await;
    let mut taken = Vec::new();
    for _ in 0..4 {
        taken.push(warm.acquire().await.unwrap());
    }
    for connection in taken {
        warm.keep(connection);
    }
    assert_eq!(warm.kept(), 2, "half the pool at most");
    // The pool's other users get all four: two at once, two as soon as they are handed
    // back, well before the pool's timeout.
    let started = std::time::Instant::now();
    let others: Vec<_> = futures::future::join_all((0..4).map(|_| pool.acquire()))
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("the pool's other users are not starved");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(warm.kept(), 0);
    drop(others);
}

#[tokio::test]
async fn closing_the_pool_waits_for_kept_connections_only_until_they_are_handed_back() {
    let (pool, warm) = kept_on_a_pool_of_four(Duration::from_secs(5)).await;
    let connection = warm.acquire().await.unwrap();
    warm.keep(connection);
    assert_eq!(warm.kept(), 1);
    tokio::time::timeout(Duration::from_secs(2), pool.close())
        .await
        .expect("the pool closes while the app that keeps a connection lives on");
    drop(warm);
}

#[tokio::test]
async fn a_connection_kept_command_after_command_still_goes_back_to_the_pool_now_and_then() {
    let (_pool, warm) = kept_on_a_pool_of_four(Duration::from_secs(5)).await;
    // Through the pool, where its lifetime is checked.
    let mut handed_back = 0;
    for _ in 0..leadledger::db::Warm::HAND_BACK_EVERY * 2 {
        let connection = warm.acquire().await.unwrap();
        warm.keep(connection);
        if warm.kept() == 0 {
            handed_back += 1;
        }
    }
    assert_eq!(handed_back, 2);
}
