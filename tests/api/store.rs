//! The event store and the global feed, against a real PostgreSQL.

use std::time::Duration;

use aggregates::campaign::{Campaign, CampaignCommand, CampaignName};
use chrono::Utc;
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use leadledger::app::command::{CommandContext, Idempotency};
use leadledger::app::error::AppError;
use leadledger::store::{
    Claim, Loaded, Metadata, Position, RecordRow, Store, StoreError, StoredAnswer,
};
use projections::feed;
use proptest::prelude::*;
use sqlx::{Connection, PgPool};
use uuid::Uuid;

use crate::helpers::{insert_then_analyze_events, most_value_plans, spawn_app_with};

/// Handles `command` on the stored aggregate and appends what it decides, in one transaction.
async fn run(
    pool: &PgPool,
    store: &Store,
    id: &str,
    command: CampaignCommand,
) -> Result<Loaded<Campaign>, String> {
    let mut tx = pool.begin().await.unwrap();
    let mut loaded: Loaded<Campaign> = store.load(&mut tx, id).await.unwrap();
    let sink = EventSink::default();
    loaded
        .aggregate
        .handle(command, &(), &sink)
        .await
        .map_err(|e| e.to_string())?;
    let events = sink.collect().await;
    store
        .append(&mut tx, &mut loaded, &events, &Metadata::default())
        .await
        .map_err(|e| e.to_string())?;
    tx.commit().await.unwrap();
    Ok(loaded)
}

fn create(name: &str) -> CampaignCommand {
    CampaignCommand::Create {
        name: CampaignName::parse(name).unwrap(),
        stop_on_reply: true,
        at: Utc::now(),
    }
}

#[derive(Debug, Clone)]
enum Step {
    Rename(u8),
    Start,
    Pause,
    Complete,
}

fn command(step: &Step) -> CampaignCommand {
    let at = Utc::now();
    match step {
        Step::Rename(n) => CampaignCommand::Rename {
            name: CampaignName::parse(&format!("name {n}")).unwrap(),
            at,
        },
        Step::Start => CampaignCommand::Start { at },
        Step::Pause => CampaignCommand::Pause { at },
        Step::Complete => CampaignCommand::Complete { at },
    }
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            4 => any::<u8>().prop_map(Step::Rename),
            2 => Just(Step::Start),
            2 => Just(Step::Pause),
            1 => Just(Step::Complete),
        ],
        1..40,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_from_snapshots_gives_the_same_state_as_a_full_replay() {
    let app = spawn_app_with(false).await;
    let pool = app.pool.clone();
    let snapshotting = Store::new(3);
    let replaying = Store::new(0);
    let handle = tokio::runtime::Handle::current();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    });
    let result = runner.run(&steps(), |steps| {
        tokio::task::block_in_place(|| {
            handle.block_on(async {
                let id = Uuid::now_v7().to_string();
                run(&pool, &snapshotting, &id, create("prop"))
                    .await
                    .unwrap();
                for step in &steps {
                    // Refused transitions are part of the property: they write nothing.
                    let _ = run(&pool, &snapshotting, &id, command(step)).await;
                }
                let mut conn = pool.acquire().await.unwrap();
                let from_snapshot: Loaded<Campaign> =
                    snapshotting.load(&mut conn, &id).await.unwrap();
                let from_events: Loaded<Campaign> = replaying.load(&mut conn, &id).await.unwrap();
                prop_assert_eq!(&from_snapshot.aggregate, &from_events.aggregate);
                prop_assert_eq!(from_snapshot.version, from_events.version);
                prop_assert_eq!(from_snapshot.last_position, from_events.last_position);
                let count: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
                        .bind(&id)
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                prop_assert_eq!(from_events.version, count as u64);
                Ok(())
            })
        })
    });
    result.unwrap();
    let snapshots: i64 = sqlx::query_scalar("SELECT count(*) FROM snapshots")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(
        snapshots > 0,
        "the property was checked with snapshots present"
    );
}

#[tokio::test]
async fn a_second_writer_of_the_same_version_gets_a_conflict() {
    let app = spawn_app_with(false).await;
    let store = Store::default();
    let id = Uuid::now_v7().to_string();
    run(&app.pool, &store, &id, create("c")).await.unwrap();

    let mut a = app.pool.begin().await.unwrap();
    let mut b = app.pool.begin().await.unwrap();
    let mut la: Loaded<Campaign> = store.load(&mut a, &id).await.unwrap();
    let mut lb: Loaded<Campaign> = store.load(&mut b, &id).await.unwrap();
    let event = |n: &str| aggregates::CampaignEvent::CampaignRenamed {
        name: CampaignName::parse(n).unwrap(),
        renamed_at: Utc::now(),
    };
    store
        .append(&mut a, &mut la, &[event("a")], &Metadata::default())
        .await
        .unwrap();
    a.commit().await.unwrap();
    let second = store
        .append(&mut b, &mut lb, &[event("b")], &Metadata::default())
        .await;
    assert!(matches!(second, Err(StoreError::Conflict)), "{second:?}");
}

#[tokio::test]
async fn several_aggregates_commit_in_one_transaction_or_not_at_all() {
    let app = spawn_app_with(false).await;
    let store = Store::default();
    let existing = Uuid::now_v7().to_string();
    run(&app.pool, &store, &existing, create("existing"))
        .await
        .unwrap();

    let mut tx = app.pool.begin().await.unwrap();
    let fresh = Uuid::now_v7().to_string();
    let mut new_one: Loaded<Campaign> = store.load(&mut tx, &fresh).await.unwrap();
    let created = aggregates::CampaignEvent::CampaignCreated {
        name: CampaignName::parse("new").unwrap(),
        stop_on_reply: true,
        created_at: Utc::now(),
    };
    store
        .append(
            &mut tx,
            &mut new_one,
            std::slice::from_ref(&created),
            &Metadata::default(),
        )
        .await
        .unwrap();
    // A stale view of `existing` (as if another writer had moved it on): sequence 1 again.
    let mut stale: Loaded<Campaign> = Loaded {
        id: existing.clone(),
        aggregate: Campaign::default(),
        version: 0,
        last_position: None,
        unsnapshotted_bytes: 0,
        keys: None,
    };
    let clash = store
        .append(&mut tx, &mut stale, &[created], &Metadata::default())
        .await;
    assert!(matches!(clash, Err(StoreError::Conflict)));
    drop(tx);
    let fresh_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
            .bind(&fresh)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        fresh_events, 0,
        "the first aggregate's events went with the failed transaction"
    );
}

#[tokio::test]
async fn events_carry_type_version_metadata_and_the_writing_transaction() {
    let app = spawn_app_with(false).await;
    let store = Store::default();
    let id = Uuid::now_v7().to_string();
    let mut tx = app.pool.begin().await.unwrap();
    let mut loaded: Loaded<Campaign> = store.load(&mut tx, &id).await.unwrap();
    let metadata = Metadata {
        correlation_id: Some("req-1".into()),
        causation_id: None,
        actor: Some("api_key:test".into()),
        idempotency_key: Some("k".into()),
    };
    let created = aggregates::CampaignEvent::CampaignCreated {
        name: CampaignName::parse("meta").unwrap(),
        stop_on_reply: false,
        created_at: Utc::now(),
    };
    let appended = store
        .append(&mut tx, &mut loaded, &[created], &metadata)
        .await
        .unwrap();
    let xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (event_type, version, meta, stored_xid, is_jsonb): (String, String, serde_json::Value, String, bool) =
        sqlx::query_as(
            "SELECT event_type, event_version, metadata, transaction_id::text, pg_typeof(payload) = 'jsonb'::regtype
             FROM events WHERE aggregate_id = $1",
        )
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(event_type, "CampaignCreated");
    assert_eq!(version, "1.0");
    assert_eq!(meta["correlation_id"], "req-1");
    assert_eq!(meta["idempotency_key"], "k");
    assert_eq!(stored_xid, xid);
    assert!(is_jsonb);
    assert_eq!(
        appended.last_position().unwrap().transaction_id.to_string(),
        xid
    );
}

async fn read_all(pool: &PgPool, after: Position) -> Vec<feed::FeedEvent> {
    let mut conn = pool.acquire().await.unwrap();
    feed::read(&mut conn, after, 1000).await.unwrap()
}

#[tokio::test]
async fn the_feed_waits_for_a_transaction_that_commits_late_and_then_delivers_it_once() {
    let app = spawn_app_with(false).await;
    let store = Store::default();
    let before = Uuid::now_v7().to_string();
    run(&app.pool, &store, &before, create("before"))
        .await
        .unwrap();

    // A transaction takes a low position and stays open...
    let slow_id = Uuid::now_v7().to_string();
    let mut slow = sqlx::PgConnection::connect_with(&app.pool.connect_options())
        .await
        .unwrap();
    let mut slow_tx = slow.begin().await.unwrap();
    let mut slow_loaded: Loaded<Campaign> = store.load(&mut slow_tx, &slow_id).await.unwrap();
    let created = aggregates::CampaignEvent::CampaignCreated {
        name: CampaignName::parse("slow").unwrap(),
        stop_on_reply: true,
        created_at: Utc::now(),
    };
    let slow_written = store
        .append(
            &mut slow_tx,
            &mut slow_loaded,
            &[created],
            &Metadata::default(),
        )
        .await
        .unwrap();
    // ...while later ones, with higher positions, commit.
    let mut later = Vec::new();
    for i in 0..3 {
        let id = Uuid::now_v7().to_string();
        run(&app.pool, &store, &id, create(&format!("later {i}")))
            .await
            .unwrap();
        later.push(id);
    }
    let later_position: i64 = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(slow_written.last_position().unwrap().position < later_position);

    let seen = read_all(&app.pool, Position::default()).await;
    let ids: Vec<&str> = seen.iter().map(|e| e.aggregate_id.as_str()).collect();
    assert!(
        ids.iter().all(|id| *id == before),
        "nothing after the open transaction is delivered: {ids:?}"
    );
    let checkpoint = seen.last().map(|e| e.at).unwrap_or_default();

    slow_tx.commit().await.unwrap();
    // Other tests' transactions in the same cluster can hold the horizon back for a
    // moment (even before `before` is readable): read on until everything has come.
    let mut delivered: Vec<feed::FeedEvent> = Vec::new();
    let mut at = checkpoint;
    for _ in 0..500 {
        let more = read_all(&app.pool, at).await;
        if let Some(last) = more.last() {
            at = last.at;
        }
        delivered.extend(more);
        if delivered
            .iter()
            .filter(|e| e.aggregate_id != before)
            .count()
            == 4
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all: Vec<&str> = seen
        .iter()
        .chain(&delivered)
        .map(|e| e.aggregate_id.as_str())
        .collect();
    let mut expected: Vec<&str> = vec![before.as_str(), slow_id.as_str()];
    expected.extend(later.iter().map(String::as_str));
    assert_eq!(
        all, expected,
        "each event exactly once, the late transaction right after what committed before it"
    );
    let again = read_all(&app.pool, at).await;
    assert!(again.is_empty(), "nothing is delivered twice");
}

#[tokio::test]
async fn upcasters_turn_an_older_event_version_into_the_current_one_on_load() {
    use cqrs_es::persist::SemanticVersionEventUpcaster;
    let app = spawn_app_with(false).await;
    let id = Uuid::now_v7().to_string();
    // Version 0.9 of CampaignCreated had no stop_on_reply; it meant "stop on reply".
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload)
         VALUES ('campaign', $1, 1, 'CampaignCreated', '0.9',
                 '{\"CampaignCreated\": {\"name\": \"legacy\", \"created_at\": \"2025-01-01T00:00:00Z\"}}')",
    )
    .bind(&id)
    .execute(&app.pool)
    .await
    .unwrap();
    let mut conn = app.pool.acquire().await.unwrap();
    let plain = Store::new(0).load::<Campaign>(&mut conn, &id).await;
    assert!(
        plain.is_err(),
        "without the upcaster the old shape does not load"
    );
    let upcaster = SemanticVersionEventUpcaster::new(
        "CampaignCreated",
        "1.0",
        Box::new(|mut payload: serde_json::Value| {
            payload["CampaignCreated"]["stop_on_reply"] = serde_json::Value::Bool(true);
            payload
        }),
    );
    let store = Store::new(0).with_upcasters(vec![Box::new(upcaster)]);
    let loaded: Loaded<Campaign> = store.load(&mut conn, &id).await.unwrap();
    assert!(loaded.aggregate.created);
    assert!(loaded.aggregate.stop_on_reply);
    assert_eq!(loaded.aggregate.name, "legacy");
}

#[tokio::test]
async fn idempotency_records_older_than_the_retention_are_purged_and_newer_ones_kept() {
    let app = crate::helpers::spawn_app().await;
    for key in ["old", "new"] {
        app.client
            .post(app.url("/v1/campaigns"))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", key)
            .json(&serde_json::json!({"name": key}))
            .send()
            .await
            .unwrap();
    }
    sqlx::query("UPDATE idempotency_records SET created_at = now() - interval '26 hours' WHERE idempotency_key = 'old'")
        .execute(&app.pool)
        .await
        .unwrap();
    let purged = leadledger::app::command::purge_idempotency_records(
        &app.pool,
        leadledger::app::workers::IDEMPOTENCY_RETENTION,
    )
    .await
    .unwrap();
    assert_eq!(purged, 1);
    let left: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM idempotency_records")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, vec!["new".to_string()]);
}

#[tokio::test]
async fn a_load_reads_only_its_own_streams_events_whatever_plan_the_database_keeps() {
    let app = spawn_app_with(false).await;
    let store = Store::default();
    // The statistics say the log is tiny; then it grows without them knowing.
    run(
        &app.pool,
        &store,
        &Uuid::new_v4().to_string(),
        create("first"),
    )
    .await
    .unwrap();
    sqlx::query("ANALYZE events")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload)
         SELECT 'campaign', gen_random_uuid()::text, 1, 'CampaignCreated', '1.0', '{}'
         FROM generate_series(1, 3000)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    // A plan made once and kept for every later execution, as a prepared statement may.
    let mut conn = app.pool.acquire().await.unwrap();
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .unwrap();
    let mut tx = conn.begin().await.unwrap();
    let id = Uuid::new_v4().to_string();
    let loaded: Loaded<Campaign> = store.load(&mut tx, &id).await.unwrap();
    assert_eq!(loaded.version, 0);
    let (fetched, scanned): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(idx_tup_fetch, 0), coalesce(seq_tup_read, 0)
         FROM pg_stat_xact_user_tables WHERE relname = 'events'",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert!(
        fetched + scanned < 10,
        "loading an empty stream read {fetched} events by index and {scanned} by scan"
    );
    tx.rollback().await.unwrap();
    sqlx::query("RESET plan_cache_mode")
        .execute(&mut *conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_commands_load_is_planned_once_per_connection_however_skewed_the_statistics() {
    let app = spawn_app_with(false).await;
    let store = Store::default();
    // One stream holds most of the log: a plan for a given (new) stream then looks far
    // cheaper than the generic one, and the database would plan every load again.
    insert_then_analyze_events(
        &app.pool,
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload)
         SELECT 'campaign', 'hot', n, 'CampaignRenamed', '1.0', '{}'
         FROM generate_series(1, 20000) AS n",
    )
    .await;
    let api_key_id = Uuid::new_v4();
    let mut conn = app.pool.acquire().await.unwrap();
    for n in 0..30 {
        let id = Uuid::new_v4().to_string();
        let key = format!("k-{n}");
        let claim = Claim {
            api_key_id,
            key: &key,
            request_hash: b"hash",
        };
        let (loaded, answer) = store
            .load_answering::<Campaign>(&mut conn, &id, Some(&claim))
            .await
            .unwrap();
        assert_eq!((loaded.version, answer.is_none()), (0, true));
    }
    let (statement, custom) = most_value_plans(&mut conn).await;
    assert!(
        custom <= 5,
        "30 loads made {custom} plans for their values of:\n{statement}"
    );
    // The statement inside the load's function keeps its generic plan by the function's
    // own setting (plans made inside a function are not listed above).
    let config: Vec<String> = sqlx::query_scalar(
        "SELECT coalesce(proconfig, '{}') FROM pg_proc WHERE proname = 'leadledger_load_answering'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(config, ["plan_cache_mode=force_generic_plan"]);
}

/// The id of an API key of `app`'s, for the records a test writes.
async fn an_api_key(app: &crate::helpers::TestApp) -> Uuid {
    sqlx::query_scalar("SELECT id FROM api_keys LIMIT 1")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// The reply stored for `key` by [`answer_row`]: the key, behind the mark of a sealed
/// reply, so that the pass sealing replies an earlier release stored in the clear, which
/// the test's server runs beside the test, leaves it as it is.
fn stored(key: &str) -> Vec<u8> {
    [projections::pii::SEALED_RECORD, key.as_bytes()].concat()
}

/// An answer recorded for `key`, of `status`, naming the event at `names_sequence`.
fn answer_row(api_key_id: Uuid, key: &str, status: i16, names_sequence: Option<u64>) -> RecordRow {
    RecordRow {
        api_key_id,
        key: key.into(),
        request_hash: b"hash".to_vec(),
        status,
        body: stored(key),
        headers: serde_json::json!({"etag": "\"1\""}),
        names_sequence,
        subjects: Vec::new(),
    }
}

fn campaign_created(name: &str) -> aggregates::CampaignEvent {
    aggregates::CampaignEvent::CampaignCreated {
        name: CampaignName::parse(name).unwrap(),
        stop_on_reply: true,
        created_at: Utc::now(),
    }
}

#[tokio::test]
async fn a_write_records_its_answer_with_its_events_and_fails_whole_when_the_key_was_answered_first()
 {
    let app = crate::helpers::spawn_app().await;
    let store = Store::default();
    let api_key_id = an_api_key(&app).await;
    let claim = Claim {
        api_key_id,
        key: "k-1",
        request_hash: b"hash",
    };
    let record = |status: i16, names_sequence: Option<u64>| {
        answer_row(api_key_id, "k-1", status, names_sequence)
    };
    let created = campaign_created("new");
    let metadata = [Metadata::default()];
    let mut conn = app.pool.acquire().await.unwrap();

    // Before anything is written, the load finds no answer for the key.
    let id = Uuid::new_v4().to_string();
    let (mut loaded, answer) = store
        .load_answering::<Campaign>(&mut conn, &id, Some(&claim))
        .await
        .unwrap();
    assert!(answer.is_none());
    // The write (no transaction around it) appends the event and records the answer,
    // with the position of the event the reply names.
    let appended = store
        .append_recorded(
            &mut conn,
            &mut loaded,
            std::slice::from_ref(&created),
            &metadata,
            &[record(201, Some(1))],
        )
        .await
        .unwrap();
    let (loaded, answer) = store
        .load_answering::<Campaign>(&mut conn, &id, Some(&claim))
        .await
        .unwrap();
    assert_eq!(loaded.version, 1);
    let answer = answer.expect("the answer, read with the stream");
    assert_eq!(answer.status, Some(201));
    assert_eq!(answer.body, stored("k-1"));
    assert_eq!(answer.request_hash, b"hash");
    assert_eq!(answer.headers, serde_json::json!({"etag": "\"1\""}));
    assert_eq!(answer.position, appended.last_position());

    // Another write with the key, to another stream: the key was answered first, so
    // nothing of it stays (neither its event nor its answer).
    let other = Uuid::new_v4().to_string();
    let (mut second, _) = store
        .load_answering::<Campaign>(&mut conn, &other, None)
        .await
        .unwrap();
    match store
        .append_recorded(
            &mut conn,
            &mut second,
            std::slice::from_ref(&created),
            &metadata,
            &[record(200, None)],
        )
        .await
    {
        Err(StoreError::Conflict) => {}
        other => panic!("a second answer for the key was not refused: {other:?}"),
    }
    let (after, _) = store
        .load_answering::<Campaign>(&mut conn, &other, None)
        .await
        .unwrap();
    assert_eq!(after.version, 0, "its event was not written");
    let (_, answer) = store
        .load_answering::<Campaign>(&mut conn, &id, Some(&claim))
        .await
        .unwrap();
    assert_eq!(answer.unwrap().status, Some(201), "the first answer stands");

    // A claim committed without an answer (by a write over several aggregates whose
    // command was refused) is filled; an answer naming no event of the write has no
    // position of its own.
    sqlx::query(
        "INSERT INTO idempotency_records
             (api_key_id, idempotency_key, request_hash, response_status, response_body)
         VALUES ($1, 'k-2', 'hash', NULL, '')",
    )
    .bind(api_key_id)
    .execute(&mut *conn)
    .await
    .unwrap();
    let claim_2 = Claim {
        key: "k-2",
        ..claim
    };
    let (_, answer) = store
        .load_answering::<Campaign>(&mut conn, &other, Some(&claim_2))
        .await
        .unwrap();
    assert_eq!(answer.unwrap().status, None, "a claim, not an answer");
    let mut filled = record(422, None);
    filled.key = "k-2".into();
    store
        .append_recorded::<Campaign>(&mut conn, &mut second, &[], &[], &[filled])
        .await
        .unwrap();
    let (_, answer) = store
        .load_answering::<Campaign>(&mut conn, &other, Some(&claim_2))
        .await
        .unwrap();
    let answer = answer.unwrap();
    assert_eq!((answer.status, answer.position), (Some(422), None));
    // Without a key, a load reads no answer.
    let (_, answer) = store
        .load_answering::<Campaign>(&mut conn, &id, None)
        .await
        .unwrap();
    assert!(answer.is_none());
}

#[tokio::test]
async fn a_write_over_several_aggregates_holds_its_key_against_a_second_one_until_it_ends() {
    let app = crate::helpers::spawn_app().await;
    let api_key_id: Uuid = sqlx::query_scalar("SELECT id FROM api_keys LIMIT 1")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let context = CommandContext {
        idempotency: Some(Idempotency {
            scope: api_key_id,
            key: "k-1".into(),
            request_hash: b"hash".to_vec(),
        }),
        ..Default::default()
    };
    let replay = leadledger::app::command::replay;
    // The first transaction takes the key's lock and claims it.
    let mut first = app.pool.begin().await.unwrap();
    assert!(replay(&mut first, &context).await.unwrap().is_none());
    // While it runs, a second is refused at once.
    let mut second = app.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *second)
        .await
        .unwrap();
    match replay(&mut second, &context).await {
        Err(AppError::Conflict { kind, .. }) => assert_eq!(kind, "idempotency-key-in-flight"),
        other => panic!("the second claim was not refused: {other:?}"),
    }
    second.rollback().await.unwrap();
    // Once it has committed (refused, without an answer), the key is free again.
    first.commit().await.unwrap();
    let mut third = app.pool.begin().await.unwrap();
    assert!(replay(&mut third, &context).await.unwrap().is_none());
    third.rollback().await.unwrap();
    let records: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM idempotency_records WHERE idempotency_key = 'k-1' AND response_status IS NULL",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(records, 1, "one placeholder, from the committed claim");
}

#[tokio::test]
async fn streams_loaded_together_each_get_their_own_state_and_their_own_keys_answer_and_written_together_fail_whole()
 {
    let app = crate::helpers::spawn_app().await;
    let store = Store::default();
    let api_key_id = an_api_key(&app).await;
    let claim = |key: &'static str| Claim {
        api_key_id,
        key,
        request_hash: b"hash",
    };
    let record = |key: &str, status: i16| answer_row(api_key_id, key, status, Some(1));
    let created = campaign_created;
    let metadata = [Metadata::default()];
    let mut conn = app.pool.acquire().await.unwrap();
    let (a, b, fresh) = (
        Uuid::new_v4().to_string(),
        Uuid::new_v4().to_string(),
        Uuid::new_v4().to_string(),
    );

    // Two streams written together, each with its own answer.
    let mut loaded = store
        .load_answering_many::<Campaign>(&mut conn, &[(&a, None), (&b, None)])
        .await
        .unwrap();
    let (mut la, _) = loaded.remove(&a).unwrap();
    let (mut lb, _) = loaded.remove(&b).unwrap();
    let (ea, eb) = ([created("a")], [created("b")]);
    let (ra, rb) = ([record("k-a", 201)], [record("k-b", 202)]);
    let appended = store
        .append_recorded_many(
            &mut conn,
            &mut [
                (&mut la, &ea[..], &metadata[..], &ra[..]),
                (&mut lb, &eb[..], &metadata[..], &rb[..]),
            ],
        )
        .await
        .unwrap();
    assert_eq!(appended.len(), 2);

    // Loaded together, each stream gets its own state and the answer to its own key
    // (a key is not tied to a stream: the third asks for the first's key).
    let (ka, kb) = (claim("k-a"), claim("k-b"));
    let mut together = store
        .load_answering_many::<Campaign>(
            &mut conn,
            &[(&a, Some(&kb)), (&b, None), (&fresh, Some(&ka))],
        )
        .await
        .unwrap();
    for (id, key) in [(&a, Some(&kb)), (&b, None), (&fresh, Some(&ka))] {
        let (alone, alone_answer) = store
            .load_answering::<Campaign>(&mut conn, id, key)
            .await
            .unwrap();
        let (loaded, answer) = together.remove(id).unwrap();
        assert_eq!(loaded.version, alone.version, "{id}");
        assert_eq!(loaded.last_position, alone.last_position, "{id}");
        assert_eq!(
            answer
                .as_ref()
                .map(|r| (r.status, r.body.clone(), r.position)),
            alone_answer.map(|r| (r.status, r.body, r.position)),
            "{id}"
        );
    }
    let mut together = store
        .load_answering_many::<Campaign>(
            &mut conn,
            &[(&a, Some(&kb)), (&b, None), (&fresh, Some(&ka))],
        )
        .await
        .unwrap();
    let answer = |r: Option<StoredAnswer>| r.map(|r| (r.status, r.body));
    assert_eq!(
        answer(together.remove(&a).unwrap().1),
        Some((Some(202), stored("k-b")))
    );
    assert_eq!(answer(together.remove(&b).unwrap().1), None);
    let (new, new_answer) = together.remove(&fresh).unwrap();
    assert_eq!(new.version, 0);
    assert_eq!(answer(new_answer), Some((Some(201), stored("k-a"))));

    // Written together, a stream that moved on meanwhile fails the whole write: neither
    // the other stream's events nor any answer is kept.
    let (mut stale, _) = store
        .load_answering::<Campaign>(&mut conn, &fresh, None)
        .await
        .unwrap();
    let (mut on_b, _) = store
        .load_answering::<Campaign>(&mut conn, &b, None)
        .await
        .unwrap();
    let mut first = store
        .load_answering::<Campaign>(&mut conn, &fresh, None)
        .await
        .unwrap()
        .0;
    store
        .append(&mut conn, &mut first, &[created("first")], &metadata[0])
        .await
        .unwrap();
    let renamed = aggregates::CampaignEvent::CampaignRenamed {
        name: CampaignName::parse("b2").unwrap(),
        renamed_at: Utc::now(),
    };
    let (es, eb2) = ([created("late")], [renamed]);
    let (rs, rb2) = ([record("k-s", 201)], [record("k-b2", 200)]);
    match store
        .append_recorded_many(
            &mut conn,
            &mut [
                (&mut stale, &es[..], &metadata[..], &rs[..]),
                (&mut on_b, &eb2[..], &metadata[..], &rb2[..]),
            ],
        )
        .await
    {
        Err(StoreError::Conflict) => {}
        other => panic!("a write with a stale stream was not refused: {other:?}"),
    }
    let after = store
        .load_answering_many::<Campaign>(&mut conn, &[(&b, Some(&claim("k-b2")))])
        .await
        .unwrap()
        .remove(&b)
        .unwrap();
    assert_eq!(after.0.version, 1, "the other stream's event was not kept");
    assert!(after.1.is_none(), "nor its answer");
}
