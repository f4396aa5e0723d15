//! The projection runner: exactly-once application, one runner per projection across
//! processes, take-over, crashes mid-batch, failures that stop and resume, and
//! read-your-writes through `?min_position=`.

use std::sync::Arc;
use std::time::Duration;

use projections::runner::{Runner, RunnerConfig, wait_for};
use projections::{FeedEvent, Projection, ProjectionError};
use serde_json::{Value, json};
use sqlx::{ConnectOptions, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    TestApp, assert_problem, insert_then_analyze_events, most_value_plans, read_until, spawn_app,
    spawn_app_with,
};

fn fast() -> RunnerConfig {
    RunnerConfig {
        batch_size: 50,
        poll_interval: Duration::from_millis(50),
        standby_interval: Duration::from_millis(100),
        min_batch_interval: Duration::from_millis(10),
        failure_retry: Duration::from_millis(100),
    }
}

fn start_runner(
    pool: &PgPool,
    projections: Vec<Arc<dyn Projection>>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let runner = Runner::new(pool.clone(), projections, fast());
    (cancel.clone(), tokio::spawn(runner.run(cancel)))
}

/// Writes `n` commands spread over a few campaigns through the API; returns the last token.
async fn write_history(app: &TestApp, campaigns: usize, renames: usize) -> String {
    let mut last = String::new();
    for c in 0..campaigns {
        let id = app.create_campaign(&format!("campaign {c}")).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        for r in 0..renames {
            let _: Value = app
                .client
                .patch(app.url(&format!("/v1/campaigns/{id}")))
                .bearer_auth(&app.write_key)
                .json(&json!({"name": format!("campaign {c} v{r}")}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        }
        let started: Value = app
            .post(&format!("/v1/campaigns/{id}/start"), &json!({}))
            .await
            .json()
            .await
            .unwrap();
        last = started["position"].as_str().unwrap().to_string();
    }
    last
}

/// The read model must equal the streams: same names and statuses, and each row's count of
/// applied events equal to its stream's length (an event applied twice or lost would show).
async fn assert_model_matches_streams(pool: &PgPool) {
    let mismatches: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT e.aggregate_id, count(*) AS events, coalesce(max(v.version), -1) AS applied
         FROM events e LEFT JOIN campaigns_view v ON v.id::text = e.aggregate_id
         WHERE e.aggregate_type = 'campaign'
         GROUP BY e.aggregate_id
         HAVING count(*) <> coalesce(max(v.version), -1)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        mismatches.is_empty(),
        "rows that differ from their streams: {mismatches:?}"
    );
    let streams: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT aggregate_id) FROM events WHERE aggregate_type = 'campaign'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM campaigns_view")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(rows, streams);
}

async fn reach(pool: &PgPool, token: &str) {
    let position = token.parse().unwrap();
    assert!(
        wait_for(pool, position, &["campaigns"], Duration::from_secs(15))
            .await
            .unwrap(),
        "the projection reached {token}"
    );
}

#[tokio::test]
async fn a_write_is_readable_at_once_with_its_position_token() {
    let app = spawn_app().await;
    for i in 0..5 {
        let created = app.create_campaign(&format!("fresh {i}")).await;
        let token = created["position"].as_str().unwrap();
        let list: Value = app
            .read(&format!("/v1/campaigns?min_position={token}"))
            .await
            .json()
            .await
            .unwrap();
        let ids: Vec<&Value> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| &c["id"])
            .collect();
        assert!(ids.contains(&&created["id"]), "read-your-writes: {list}");
    }
}

#[tokio::test]
async fn a_position_never_reached_answers_503_with_retry_after() {
    let app = spawn_app().await;
    let response = app
        .read("/v1/campaigns?min_position=9223372036854775-1")
        .await;
    assert_eq!(response.headers()["retry-after"], "1");
    assert_problem(response, 503).await;
    assert_problem(app.read("/v1/campaigns?min_position=yesterday").await, 400).await;
}

#[tokio::test]
async fn a_server_applies_its_read_models_and_its_reactors_on_one_connection() {
    let app = spawn_app().await;
    let mut conn = app.pool.acquire().await.unwrap();
    let status = read_until(
        async || projections::status::all(&mut conn).await.unwrap(),
        |status| {
            status.len() > projections::names().len() && status.iter().all(|s| s.held_by.is_some())
        },
    )
    .await;
    let names: Vec<&str> = status.iter().map(|s| s.name.as_str()).collect();
    for reactor in [
        leadledger::app::suppressions::SUPPRESSION_REACTOR,
        leadledger::app::webhooks::PARKING_REACTOR,
    ] {
        assert!(names.contains(&reactor), "{reactor} in {names:?}");
    }
    // One group: one feed read and one transaction a batch for all of them.
    let holders: std::collections::BTreeSet<Option<&str>> =
        status.iter().map(|s| s.held_by.as_deref()).collect();
    assert_eq!(holders.len(), 1, "{status:?}");
    assert!(holders.iter().all(Option::is_some), "{status:?}");
}

#[tokio::test]
async fn a_projection_held_only_in_another_database_on_the_same_server_shows_idle() {
    let busy = spawn_app().await;
    let quiet = spawn_app_with(false).await;
    let mut busy_conn = busy.pool.acquire().await.unwrap();
    let held = read_until(
        async || projections::status::all(&mut busy_conn).await.unwrap(),
        |status| status.iter().all(|s| s.held_by.is_some()),
    )
    .await;
    assert!(held.iter().all(|s| s.state == "running"), "{held:?}");

    // The same advisory keys are held on the server, but in `busy`'s database. `quiet` has
    // checkpoints, as a database whose runner stopped has, and no runner.
    let mut conn = quiet.pool.acquire().await.unwrap();
    sqlx::query("INSERT INTO projection_checkpoints (name) SELECT unnest($1::text[])")
        .bind(projections::names())
        .execute(&mut *conn)
        .await
        .unwrap();
    let status = projections::status::all(&mut conn).await.unwrap();
    for s in &status {
        assert_eq!((s.state, s.held_by.as_deref()), ("idle", None), "{s:?}");
    }
}

#[tokio::test]
async fn two_runners_on_one_database_never_apply_an_event_twice_and_one_takes_over() {
    let app = spawn_app_with(false).await;
    let (first_cancel, first) = start_runner(&app.pool, projections::all());
    // Let the first runner take the lock before the second starts.
    let mut conn = app.pool.acquire().await.unwrap();
    for _ in 0..100 {
        let status = projections::status::all(&mut conn).await.unwrap();
        if status[0].held_by.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (second_cancel, second) = start_runner(&app.pool, projections::all());

    let token = write_history(&app, 4, 5).await;
    reach(&app.pool, &token).await;
    assert_model_matches_streams(&app.pool).await;

    // The process holding the projection goes away; the other carries on.
    first_cancel.cancel();
    first.await.unwrap();
    let token = write_history(&app, 2, 3).await;
    reach(&app.pool, &token).await;
    assert_model_matches_streams(&app.pool).await;
    let status = projections::status::all(&mut conn).await.unwrap();
    assert_eq!(status[0].state, "running");
    assert_eq!(status[0].behind, 0);
    second_cancel.cancel();
    second.await.unwrap();
}

/// The campaigns projection, slowed down so that a kill lands in the middle of a batch.
struct Slow(projections::campaigns::CampaignsProjection);

#[async_trait::async_trait]
impl Projection for Slow {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn tables(&self) -> &'static [&'static str] {
        self.0.tables()
    }
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        for event in events {
            tokio::time::sleep(Duration::from_millis(30)).await;
            projections::apply(&self.0, conn, event).await?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn killing_the_runner_mid_batch_loses_and_doubles_nothing() {
    let app = spawn_app_with(false).await;
    let token = write_history(&app, 3, 10).await; // 36 events: one batch of up to 50
    let (_, killed) = start_runner(
        &app.pool,
        vec![Arc::new(Slow(projections::campaigns::CampaignsProjection))],
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    killed.abort(); // dropped mid-batch: its connection and open transaction go with it
    let _ = killed.await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM campaigns_view")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "the half-applied batch was rolled back");

    let (cancel, runner) = start_runner(&app.pool, projections::all());
    reach(&app.pool, &token).await;
    assert_model_matches_streams(&app.pool).await;
    cancel.cancel();
    runner.await.unwrap();
}

#[tokio::test]
async fn a_failing_event_stops_its_projection_visibly_until_fixed_while_the_others_go_on() {
    let app = spawn_app_with(false).await;
    let good = app.create_campaign("before the bad event").await;
    let bad_id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload)
         VALUES ('campaign', $1, 1, 'CampaignCreated', '1.0', '{\"CampaignCreated\": {\"name\": 42}}')",
    )
    .bind(bad_id.to_string())
    .execute(&app.pool)
    .await
    .unwrap();
    let after = app.create_campaign("after the bad event").await;

    let (cancel, runner) = start_runner(&app.pool, projections::all());
    let mut conn = app.pool.acquire().await.unwrap();
    let mut status = Vec::new();
    for _ in 0..200 {
        status = projections::status::all(&mut conn).await.unwrap();
        if status[0].state == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status[0].state, "failed", "{status:?}");
    assert!(
        status[0]
            .failed_error
            .as_deref()
            .unwrap()
            .contains("CampaignCreated")
    );
    assert!(
        status[0].behind >= 2,
        "stopped at the bad event: {status:?}"
    );
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM campaigns_view")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        names,
        vec![good["name"].as_str().unwrap().to_string()],
        "events before it applied, none after"
    );
    // The runner applies every projection of its group from one read, in one transaction:
    // the failing event stops only its own projection, the others apply it and go on.
    let others: Vec<&str> = projections::names()
        .into_iter()
        .filter(|n| *n != "campaigns")
        .collect();
    let position = after["position"].as_str().unwrap().parse().unwrap();
    assert!(
        wait_for(&app.pool, position, &others, Duration::from_secs(15))
            .await
            .unwrap(),
        "the other projections went past the failing event"
    );
    let status = projections::status::all(&mut conn).await.unwrap();
    assert_eq!(status[0].state, "failed", "still stopped: {status:?}");
    assert!(
        status[1..6].iter().all(|s| s.state == "running"),
        "{status:?}"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("projection_failed{projection=\"campaigns\"} 1"),
        "{metrics}"
    );

    // The cause is fixed (here: the event is repaired); the projection resumes by itself.
    sqlx::query(
        "UPDATE events SET payload = jsonb_build_object('CampaignCreated',
             jsonb_build_object('name', 'repaired', 'stop_on_reply', true, 'created_at', '2026-11-01T00:00:00Z'))
         WHERE aggregate_id = $1",
    )
    .bind(bad_id.to_string())
    .execute(&app.pool)
    .await
    .unwrap();
    reach(&app.pool, after["position"].as_str().unwrap()).await;
    let status = projections::status::all(&mut conn).await.unwrap();
    assert_eq!(status[0].state, "running");
    assert_model_matches_streams(&app.pool).await;
    cancel.cancel();
    runner.await.unwrap();
}

#[tokio::test]
async fn the_campaign_list_pages_newest_first_and_filters_by_status() {
    let app = spawn_app().await;
    let mut token = String::new();
    for i in 0..7 {
        let c = app.create_campaign(&format!("list {i}")).await;
        token = c["position"].as_str().unwrap().to_string();
        if i % 2 == 0 {
            let s: Value = app
                .post(
                    &format!("/v1/campaigns/{}/start", c["id"].as_str().unwrap()),
                    &json!({}),
                )
                .await
                .json()
                .await
                .unwrap();
            token = s["position"].as_str().unwrap().to_string();
        }
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/campaigns?limit=3&min_position={token}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page: Value = app.read(&path).await.json().await.unwrap();
        for item in page["items"].as_array().unwrap() {
            seen.push(item["name"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..7).rev().map(|i| format!("list {i}")).collect();
    assert_eq!(seen, expected);
    let running: Value = app
        .read(&format!(
            "/v1/campaigns?status=running&min_position={token}"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(running["items"].as_array().unwrap().len(), 4);
    for bad in [
        "limit=0",
        "limit=501",
        "limit=abc",
        "status=archived",
        "cursor=%%%",
        "colour=red",
    ] {
        assert_problem(app.read(&format!("/v1/campaigns?{bad}")).await, 400).await;
    }
}

#[tokio::test]
async fn no_write_transaction_notifies_and_a_commit_still_wakes_another_processs_runner_at_once() {
    // This server runs no projections; it only writes, and notifies after its commits.
    let writer = spawn_app_with(false).await;
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relname = 'events' AND NOT t.tgisinternal",
    )
    .fetch_one(&writer.pool)
    .await
    .unwrap();
    assert_eq!(
        triggers, 0,
        "no trigger runs inside the writers' transactions"
    );
    let cancel = CancellationToken::new();
    tokio::spawn(
        writer
            .state
            .wakeup
            .clone()
            .run(writer.pool.clone(), cancel.clone()),
    );
    // Another process's runner, which would poll only once an hour.
    let runner = Runner::new(
        writer.pool.clone(),
        projections::all(),
        RunnerConfig {
            poll_interval: Duration::from_secs(3600),
            ..fast()
        },
    );
    let stop = cancel.clone();
    tokio::spawn(runner.run(stop));
    // Let it take its locks and catch up with nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id = writer.create_campaign("woken").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut listed = false;
    for _ in 0..200 {
        let page: Value = writer.read("/v1/campaigns").await.json().await.unwrap();
        if page["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == id.as_str())
        {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    assert!(
        listed,
        "the other runner was woken by the writer's notification, not a poll"
    );
}

#[tokio::test]
async fn a_commit_wakes_its_own_runners_once_and_the_other_processes_through_one_notification() {
    let app = spawn_app_with(false).await;
    let cancel = CancellationToken::new();
    let (here, there) = (projections::Wakeup::new(), projections::Wakeup::new());
    tokio::spawn(here.clone().run(app.pool.clone(), cancel.clone()));
    tokio::spawn(there.clone().run(app.pool.clone(), cancel.clone()));
    let (mut here_woken, mut there_woken) = (here.subscribe(), there.subscribe());
    // Both listeners connected (each wakes its runners once when it connects).
    for woken in [&mut here_woken, &mut there_woken] {
        tokio::time::timeout(Duration::from_secs(5), woken.changed())
            .await
            .expect("listener connected")
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (here_before, there_before) = (
        *here_woken.borrow_and_update(),
        *there_woken.borrow_and_update(),
    );
    here.committed();
    tokio::time::timeout(Duration::from_secs(2), there_woken.changed())
        .await
        .expect("the other process is woken by the notification")
        .unwrap();
    // Time for this process's own notification to come back to it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel();
    assert_eq!(
        *here_woken.borrow(),
        here_before + 1,
        "woken by its commit, not a second time by its own notification"
    );
    assert_eq!(*there_woken.borrow(), there_before + 1);
}

#[tokio::test]
async fn a_runners_reads_of_the_feed_head_keep_one_generic_plan() {
    let app = spawn_app_with(false).await;
    insert_then_analyze_events(
        &app.pool,
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload)
         SELECT 'campaign', gen_random_uuid()::text, 1, 'CampaignCreated', '1.0', '{}'
         FROM generate_series(1, 5000)",
    )
    .await;
    // A runner reads after a checkpoint at the head, where a plan for that position
    // looks far cheaper than the generic one.
    let mut conn: PgConnection = projections::runner::connect_options(&app.pool, "test")
        .connect()
        .await
        .unwrap();
    let head = projections::feed::head(&mut conn).await.unwrap().unwrap();
    for _ in 0..20 {
        projections::feed::read_sealed(&mut conn, head, 500)
            .await
            .unwrap();
    }
    let (statement, custom) = most_value_plans(&mut conn).await;
    assert!(
        custom <= 5,
        "20 reads made {custom} plans for their values of:\n{statement}"
    );
}

/// Every event the feed shows now, opened, 4 a read: through the feed's query, or through
/// a rebuild's copy of it (`copy`).
async fn read_whole_feed(conn: &mut PgConnection, copy: bool) -> Vec<FeedEvent> {
    let mut read = Vec::new();
    let mut after = projections::feed::Position::default();
    loop {
        let rows = if copy {
            projections::feed::copy_sealed_without_metadata(&mut *conn, after, 4).await
        } else {
            projections::feed::read_sealed(&mut *conn, after, 4).await
        }
        .unwrap();
        let Some(last) = rows.last().unwrap() else {
            return read;
        };
        after = last;
        read.extend(projections::feed::open(&mut *conn, rows).await.unwrap());
    }
}

#[tokio::test]
async fn a_rebuilds_copy_of_the_feed_reads_the_same_events_as_the_feeds_query() {
    let app = spawn_app_with(false).await;
    // Sealed personal data, through the API.
    for n in 0..3 {
        let created = app
            .post(
                "/v1/contacts",
                &json!({"email": format!("copy-{n}@example.com"), "first_name": "Zoë \"Z\"",
                        "custom": {"note": "line\nbreak ✓"}}),
            )
            .await;
        assert_eq!(created.status(), 201);
    }
    app.create_campaign("copied").await;
    // Payloads whose text needs escaping, large numbers, deep nesting; spread over
    // several transactions so that batches end inside and between them.
    for t in 0..3 {
        sqlx::query(
            r#"INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload)
               SELECT 'campaign', 'copy-' || $1 || '-' || i, 1, 'CampaignCreated', '1.0',
                      jsonb_build_object('CampaignCreated', jsonb_build_object(
                          'name', E'tab\t"quote" \\ é ' || i, 'big', 1e30, 'deep', '[[{"a": [null]}]]'::jsonb))
               FROM generate_series(1, 9) AS i"#,
        )
        .bind(t)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let mut conn = app.pool.acquire().await.unwrap();
    // Other tests' transactions can hold the feed back: read until it shows all 31 events.
    let queried = read_until(
        async || read_whole_feed(&mut conn, false).await,
        |queried| queried.len() >= 31,
    )
    .await;
    assert!(queried.len() >= 31, "{} events", queried.len());
    let copied = read_whole_feed(&mut conn, true).await;
    assert_eq!(queried.len(), copied.len());
    for (q, c) in queried.iter().zip(&copied) {
        assert_eq!(c.metadata, Value::Null);
        let without_metadata = FeedEvent {
            metadata: Value::Null,
            ..q.clone()
        };
        assert_eq!(&without_metadata, c);
        assert_eq!(q.payload.to_string(), c.payload.to_string());
    }
    assert!(
        copied
            .iter()
            .any(|e| e.payload.to_string().contains("Zoë \\\"Z\\\"")),
        "personal data opened"
    );
}
