//! Projection rebuilds: while writes continue, equal to the live models and to a replay in
//! another valid order; interrupted and resumed (logged while built and once swapped);
//! totals filled once from the rows; `--verify` reporting every
//! difference; one rebuild at a time; and the command line.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use projections::feed::{self, FeedEvent, Position};
use projections::rebuild::{self, Difference, Observer, Options, RebuildError};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};

use crate::helpers::{TestApp, read_until, spawn_app, spawn_app_with};
use crate::webhooks::{Source, deliver, event, source};

/// Every table of every rebuildable projection.
fn tables() -> Vec<String> {
    rebuild::select(&[])
        .unwrap()
        .iter()
        .flat_map(|p| p.tables().iter().map(|t| t.to_string()))
        .collect()
}

fn day(days_ago: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::days(days_ago)).to_rfc3339()
}

async fn ok(response: reqwest::Response) -> Value {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert!((200..300).contains(&status), "{status}: {body}");
    body
}

/// One round of a realistic history: contacts created, updated and enriched; a campaign
/// started, one paused and one completed; enrollments; provider events out of order (a
/// late report that moves a milestone to an earlier day) and one parked until its
/// enrollment exists; spends and a captured and a released reservation.
async fn write_round(app: &TestApp, hooks: &Source, round: usize) {
    let mut contacts = Vec::new();
    for i in 0..6 {
        let email = format!("r{round}-c{i}@example.com");
        let body = ok(app
            .post(
                "/v1/contacts",
                &json!({"email": email, "first_name": format!("Ann {i}"), "company": "Acme",
                        "custom": {"tier": format!("t{i}")}}),
            )
            .await)
        .await;
        contacts.push((email, body["id"].as_str().unwrap().to_string()));
    }
    ok(app
        .post(
            "/v1/contacts",
            &json!({"email": contacts[0].0, "title": "CTO", "custom": {"tier": "gold"}}),
        )
        .await)
    .await;
    ok(app
        .post(
            &format!("/v1/contacts/{}/enrichment", contacts[1].1),
            &json!({"data": {"employees": 50 + round}, "quality_score": 0.8, "sources": ["web"]}),
        )
        .await)
    .await;

    let campaign = app.create_campaign(&format!("round {round}")).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(app
        .post(&format!("/v1/campaigns/{campaign}/start"), &json!({}))
        .await)
    .await;
    // An event for contact 5 before its enrollment: parked, applied once enrolled.
    let parked = deliver(
        &app.address,
        hooks,
        &format!("msg-r{round}-early"),
        &event(
            &format!("r{round}-early"),
            "delivered",
            &campaign,
            &contacts[5].0,
            &day(2),
        ),
    )
    .await;
    assert_eq!(parked["results"][0]["outcome"], "parked");
    let ids: Vec<&str> = contacts.iter().map(|(_, id)| id.as_str()).collect();
    ok(app
        .post(
            &format!("/v1/campaigns/{campaign}/enrollments"),
            &json!({"contact_ids": ids}),
        )
        .await)
    .await;
    let batch = json!([
        event(
            &format!("r{round}-e1"),
            "opened",
            &campaign,
            &contacts[0].0,
            &day(1)
        ),
        event(
            &format!("r{round}-e2"),
            "sent",
            &campaign,
            &contacts[0].0,
            &day(3)
        ),
        event(
            &format!("r{round}-e3"),
            "replied",
            &campaign,
            &contacts[1].0,
            &day(0)
        ),
        event(
            &format!("r{round}-e4"),
            "bounced",
            &campaign,
            &contacts[2].0,
            &day(1)
        ),
        event(
            &format!("r{round}-e5"),
            "clicked",
            &campaign,
            &contacts[3].0,
            &day(2)
        ),
        event(
            &format!("r{round}-e6"),
            "unsubscribed",
            &campaign,
            &contacts[4].0,
            &day(0)
        ),
    ]);
    deliver(&app.address, hooks, &format!("msg-r{round}-batch"), &batch).await;

    let paused = app.create_campaign(&format!("paused {round}")).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(app
        .post(&format!("/v1/campaigns/{paused}/start"), &json!({}))
        .await)
    .await;
    ok(app
        .post(&format!("/v1/campaigns/{paused}/pause"), &json!({}))
        .await)
    .await;
    let done = app.create_campaign(&format!("done {round}")).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    for step in ["start", "complete"] {
        ok(app
            .post(&format!("/v1/campaigns/{done}/{step}"), &json!({}))
            .await)
        .await;
    }

    let budget = ok(app
        .post("/v1/budgets", &json!({"name": "AI", "limit": "1000.00"}))
        .await)
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    for (amount, model) in [("1.25", "gpt-x"), ("0.10", "gpt-y"), ("3.333333", "gpt-x")] {
        ok(app
            .post(
                &format!("/v1/budgets/{budget}/spend"),
                &json!({"amount": amount, "category": "ai", "model": model,
                        "input_tokens": 100, "output_tokens": 20}),
            )
            .await)
        .await;
    }
    let hold = ok(app
        .post(
            &format!("/v1/budgets/{budget}/reservations"),
            &json!({"amount": "5.00", "category": "enrichment"}),
        )
        .await)
    .await["reservation_id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(app
        .post(
            &format!("/v1/budgets/{budget}/reservations/{hold}/capture"),
            &json!({"amount": "4.50"}),
        )
        .await)
    .await;
    let released = ok(app
        .post(
            &format!("/v1/budgets/{budget}/reservations"),
            &json!({"amount": "2.00", "category": "outreach"}),
        )
        .await)
    .await["reservation_id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(app
        .post(
            &format!("/v1/budgets/{budget}/reservations/{released}/release"),
            &json!({}),
        )
        .await)
    .await;
    // A hold left open, so `budget_holds` has rows.
    ok(app
        .post(
            &format!("/v1/budgets/{budget}/reservations"),
            &json!({"amount": "1.00", "category": "ai"}),
        )
        .await)
    .await;
}

/// Waits until every projection and reactor has applied the last event committed, and no
/// new one comes (a reactor writes events of its own). Returns it.
pub(crate) async fn settle(pool: &PgPool) -> Position {
    let mut names = projections::names();
    names.push("webhook_parking");
    let mut head = Position::default();
    loop {
        let before = head;
        let mut conn = pool.acquire().await.unwrap();
        head = feed::head(&mut conn).await.unwrap().unwrap_or_default();
        drop(conn);
        assert!(
            projections::runner::wait_for(pool, head, &names, Duration::from_secs(30))
                .await
                .unwrap(),
            "the live projections reach the head"
        );
        if head == before {
            return head;
        }
    }
}

/// Every event, in another valid order: stream by stream (streams in descending id order,
/// each in its own order), applied in batches of 7 into fresh copies of the tables, then
/// compared with the live tables. Returns the differences.
async fn replay_in_stream_order(pool: &PgPool) -> Vec<(String, Value)> {
    let mut conn = PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    let mut all: Vec<FeedEvent> = Vec::new();
    loop {
        let after = all.last().map(|e| e.at).unwrap_or_default();
        let events = feed::read(&mut conn, after, 10_000).await.unwrap();
        if events.is_empty() {
            break;
        }
        all.extend(events);
    }
    all.sort_by(|a, b| {
        (&b.aggregate_id, &a.aggregate_type)
            .cmp(&(&a.aggregate_id, &b.aggregate_type))
            .then(a.sequence.cmp(&b.sequence))
    });
    sqlx::query("SELECT leadledger_rebuild_prepare($1, '{}')")
        .bind(tables())
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("SET search_path TO leadledger_rebuild, public")
        .execute(&mut conn)
        .await
        .unwrap();
    let mut tx = conn.begin().await.unwrap();
    for chunk in all.chunks(7) {
        for projection in rebuild::select(&[]).unwrap() {
            projection.apply_batch(&mut tx, chunk).await.unwrap();
        }
    }
    tx.commit().await.unwrap();
    let mut differences = Vec::new();
    for table in tables() {
        let rows: Vec<(Value, Option<Value>, Option<Value>)> =
            sqlx::query_as("SELECT key, live, rebuilt FROM leadledger_rebuild_diff($1)")
                .bind(&table)
                .fetch_all(&mut conn)
                .await
                .unwrap();
        for (key, live, rebuilt) in rows {
            differences.push((
                table.clone(),
                json!({"key": key, "live": live, "rebuilt": rebuilt}),
            ));
        }
    }
    sqlx::query("SELECT leadledger_rebuild_discard()")
        .execute(&mut conn)
        .await
        .unwrap();
    differences
}

#[derive(Default)]
struct Collect {
    batches: u64,
    differences: Vec<Difference>,
    /// What each `started` said: events already applied, events left.
    started: Vec<(u64, u64)>,
}

impl Observer for Collect {
    fn started(&mut self, already_applied: u64, remaining: u64) {
        self.started.push((already_applied, remaining));
    }
    fn applied(&mut self, _: u64) {
        self.batches += 1;
    }
    fn difference(&mut self, d: &Difference) {
        self.differences.push(d.clone());
    }
}

fn options(verify: bool) -> Options {
    Options {
        batch_size: 10,
        verify,
        ..Options::default()
    }
}

/// Rebuilds every projection with `--verify`.
async fn verified_rebuild(pool: &PgPool, observer: &mut dyn Observer) -> rebuild::Report {
    rebuild::rebuild(
        pool,
        &rebuild::select(&[]).unwrap(),
        &options(true),
        observer,
    )
    .await
    .unwrap()
}

/// Index names of the projections' tables, to check a swap keeps them.
async fn index_names(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public' AND tablename = ANY($1)
         ORDER BY 1",
    )
    .bind(tables())
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Writes a round once the rebuild has read the feed to its head and filled its copies'
/// totals, before it swaps: the swap's last catch-up applies that round to the copies.
struct WriteBeforeSwap<'a> {
    app: &'a TestApp,
    hooks: &'a Source,
    written: Option<Position>,
    seen: Collect,
}

impl Observer for WriteBeforeSwap<'_> {
    fn phase(&mut self, phase: &str) {
        if phase == "indexing" && self.written.is_none() {
            let (app, hooks) = (self.app, self.hooks);
            self.written = Some(tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    write_round(app, hooks, 50).await;
                    settle(&app.pool).await
                })
            }));
        }
    }
    fn difference(&mut self, d: &Difference) {
        self.seen.difference(d);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_fills_its_counts_from_the_rows_and_its_last_catch_up_moves_them() {
    let app = spawn_app().await;
    let hooks = source(&app, "esp").await;
    for round in 0..2 {
        write_round(&app, &hooks, round).await;
    }
    settle(&app.pool).await;

    let mut observer = WriteBeforeSwap {
        app: &app,
        hooks: &hooks,
        written: None,
        seen: Collect::default(),
    };
    let report = verified_rebuild(&app.pool, &mut observer).await;
    let written = observer
        .written
        .expect("a round was written before the swap");
    assert!(
        report.swapped && report.differences == 0,
        "the copies' counts equal the live ones: {:?}",
        observer.seen.differences
    );
    assert!(
        report.position >= written,
        "the swap caught up on the round written after the copies were filled"
    );
    // The round's campaign is counted in the tables swapped in.
    let counted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM campaign_days_view d JOIN campaigns_view c ON c.id = d.campaign_id
         WHERE c.name = 'round 50'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(counted > 0, "the late round's days are counted");
}

#[tokio::test]
async fn rebuilding_every_projection_while_writes_continue_equals_the_live_models_and_a_reordered_replay()
 {
    let app = Arc::new(spawn_app().await);
    let hooks = source(&app, "esp").await;
    for round in 0..3 {
        write_round(&app, &hooks, round).await;
    }
    settle(&app.pool).await;
    let indexes_before = index_names(&app.pool).await;

    // Writers keep going during the rebuild.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let hooks = source(&app, "esp-live").await;
            let mut round = 100;
            while !stop.load(Ordering::Relaxed) {
                write_round(&app, &hooks, round).await;
                round += 1;
            }
            round - 100
        })
    };
    let mut observer = Collect::default();
    let report = verified_rebuild(&app.pool, &mut observer).await;
    // One more round after the swap: the live runners write it into the new tables.
    write_round(&app, &hooks, 99).await;
    stop.store(true, Ordering::Relaxed);
    let rounds_meanwhile = writer.await.unwrap();

    assert!(report.swapped, "{report:?}");
    assert_eq!(report.differences, 0, "{:?}", observer.differences);
    assert!(
        observer.batches > 10,
        "read in many batches: {}",
        observer.batches
    );
    assert!(rounds_meanwhile >= 1, "writes went on during the rebuild");
    assert_eq!(index_names(&app.pool).await, indexes_before);
    // Swapped in analyzed, and autovacuum's again like every other table.
    let (reloptions, unanalyzed): (Vec<String>, Vec<String>) = sqlx::query_as(
        "SELECT coalesce(array_agg(c.relname::text || ' ' || c.reloptions::text)
                     FILTER (WHERE c.reloptions IS NOT NULL), '{}'),
                coalesce(array_agg(c.relname::text)
                     FILTER (WHERE NOT EXISTS (SELECT 1 FROM pg_stats s
                                               WHERE s.schemaname = 'public'
                                                 AND s.tablename = c.relname)), '{}')
         FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace
           AND c.relname = ANY(ARRAY['contacts_view', 'enrollments_view', 'campaigns_view'])",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        reloptions,
        Vec::<String>::new(),
        "storage options left behind"
    );
    assert_eq!(
        unanalyzed,
        Vec::<String>::new(),
        "swapped in without statistics"
    );

    let head = settle(&app.pool).await;
    assert!(head > report.position, "events arrived after the swap");
    assert_eq!(replay_in_stream_order(&app.pool).await, Vec::new());
    // And a second rebuild, of models the runners kept after the swap, finds them equal.
    let mut observer = Collect::default();
    let again = verified_rebuild(&app.pool, &mut observer).await;
    assert!(
        again.swapped && again.differences == 0,
        "{:?}",
        observer.differences
    );
    let contacts: i64 = sqlx::query_scalar("SELECT contacts FROM contact_totals_view")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(contacts, 6 * (4 + rounds_meanwhile as i64));
    let mut conn = app.pool.acquire().await.unwrap();
    for status in projections::status::all(&mut conn).await.unwrap() {
        assert_eq!(status.failed_error, None, "{}", status.name);
    }
}

#[tokio::test]
async fn rows_a_fill_holds_until_its_commit_equal_the_live_ones_whatever_the_batches_and_commits() {
    let app = spawn_app().await;
    let hooks = source(&app, "esp").await;
    for round in 0..2 {
        write_round(&app, &hooks, round).await;
    }
    settle(&app.pool).await;
    // An enrollment's reports fall in its own batch, the next one, or later; the batch
    // that enrolls it may end a transaction (its rows then written before the commit).
    for (batch_size, batches_per_commit) in [(1, 1), (2, 3), (3, 1), (5, 2), (7, 4), (10, 8)] {
        let mut observer = Collect::default();
        let report = rebuild::rebuild(
            &app.pool,
            &rebuild::select(&["enrollments".into()]).unwrap(),
            &Options {
                batch_size,
                batches_per_commit,
                verify: true,
                ..Options::default()
            },
            &mut observer,
        )
        .await
        .unwrap();
        assert!(
            report.swapped && report.differences == 0,
            "batches of {batch_size}, {batches_per_commit} a commit: {:?}",
            observer.differences
        );
    }
}

/// A digest of every live table, to show a rebuild left them alone.
async fn digest(pool: &PgPool) -> Vec<String> {
    let mut out = Vec::new();
    for table in tables() {
        let sql = format!(
            "SELECT coalesce(md5(string_agg(to_jsonb(t)::text, '|' ORDER BY to_jsonb(t)::text)), '') FROM public.{table} t"
        );
        out.push(sqlx::query_scalar(&sql).fetch_one(pool).await.unwrap());
    }
    out
}

/// How PostgreSQL keeps the projections' tables and their indexes in `schema` (`p`
/// logged, `u` unlogged): each kind found, once.
async fn persistence(pool: &PgPool, schema: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT DISTINCT c.relpersistence::text FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
         LEFT JOIN pg_index i ON i.indexrelid = c.oid
         LEFT JOIN pg_class t ON t.oid = i.indrelid
         WHERE n.nspname = $1 AND coalesce(t.relname, c.relname) = ANY($2)
           AND c.relkind IN ('r', 'i')",
    )
    .bind(schema)
    .bind(tables())
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The storage options of the projections' tables in `schema` that have any, by table.
async fn storage_options(pool: &PgPool, schema: &str) -> Vec<(String, Vec<String>)> {
    sqlx::query_as(
        "SELECT c.relname::text, c.reloptions FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = ANY($2) AND c.reloptions IS NOT NULL
         ORDER BY 1",
    )
    .bind(schema)
    .bind(tables())
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Starts a rebuild of every projection in batches of 5 and drops it after three batches.
async fn interrupt_a_rebuild(app: &TestApp) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut observer = InterruptAfter {
        after: 3,
        seen: 0,
        tx: Some(tx),
    };
    let selected = rebuild::select(&[]).unwrap();
    let slow = Options {
        batch_size: 5,
        ..options(false)
    };
    tokio::select! {
        outcome = rebuild::rebuild(&app.pool, &selected, &slow, &mut observer) => {
            panic!("the rebuild should have been interrupted: {outcome:?}")
        }
        _ = rx => {}
    }
}

/// Rebuilds every projection with `--verify`, waiting while an interrupted run's
/// connections are still going away.
async fn rebuild_when_free(app: &TestApp) -> (rebuild::Report, Collect) {
    let selected = rebuild::select(&[]).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut observer = Collect::default();
        match rebuild::rebuild(&app.pool, &selected, &options(true), &mut observer).await {
            Err(RebuildError::Busy) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => break (other.unwrap(), observer),
        }
    }
}

/// Stops after `after` batches: the rebuild is interrupted there.
struct InterruptAfter {
    after: u64,
    seen: u64,
    tx: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Observer for InterruptAfter {
    fn applied(&mut self, _: u64) {
        self.seen += 1;
        if self.seen == self.after
            && let Some(tx) = self.tx.take()
        {
            let _ = tx.send(());
        }
    }
}

#[tokio::test]
async fn an_interrupted_rebuild_leaves_the_live_models_untouched_and_the_next_run_resumes() {
    let app = spawn_app().await;
    let hooks = source(&app, "esp").await;
    for round in 0..3 {
        write_round(&app, &hooks, round).await;
    }
    let head = settle(&app.pool).await;
    let before = digest(&app.pool).await;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();

    interrupt_a_rebuild(&app).await;
    // The rebuild's connections are gone with its future; the live models are as they were.
    assert_eq!(digest(&app.pool).await, before);
    let done: i64 = sqlx::query_scalar("SELECT events FROM projection_rebuilds")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(done >= 10, "progress kept: {done}");
    assert_eq!(
        persistence(&app.pool, "leadledger_rebuild").await,
        ["p"],
        "the tables being built are logged"
    );
    let building = storage_options(&app.pool, "leadledger_rebuild").await;
    assert_eq!(
        building
            .iter()
            .filter(|(_, options)| options.contains(&"fillfactor=50".to_string()))
            .map(|(table, _)| table.as_str())
            .collect::<Vec<_>>(),
        ["enrollments_view"],
        "only the copy whose rows are rewritten leaves room on its pages: {building:?}"
    );

    // The next run resumes (once the server has seen the old connections go).
    let (report, observer) = rebuild_when_free(&app).await;
    assert!(
        report.resumed && report.swapped && report.differences == 0,
        "{report:?}"
    );
    assert_eq!(
        report.events as i64,
        total - done,
        "only the rest was applied"
    );
    assert_eq!(
        observer.started,
        [(done as u64, (total - done) as u64)],
        "the observer heard once what was applied before and what was left"
    );
    assert_eq!(report.position, head);
    assert_eq!(digest(&app.pool).await, before, "rebuilt equals live");
    assert_eq!(
        persistence(&app.pool, "public").await,
        ["p"],
        "the tables swapped in and their indexes are logged"
    );
    assert_eq!(
        storage_options(&app.pool, "public").await,
        [],
        "the tables swapped in keep no option of the build (autovacuum, fillfactor)"
    );
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM projection_rebuilds)
              + (SELECT count(*) FROM projection_rebuild_positions)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn verify_reports_every_difference_keeps_the_live_tables_and_a_plain_rebuild_repairs_them() {
    let app = spawn_app().await;
    let hooks = source(&app, "esp").await;
    write_round(&app, &hooks, 0).await;
    settle(&app.pool).await;
    let tampered: uuid::Uuid = sqlx::query_scalar(
        "UPDATE contacts_view SET first_name = 'Tampered'
         WHERE id = (SELECT id FROM contacts_view ORDER BY id LIMIT 1) RETURNING id",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "DELETE FROM campaign_days_view WHERE (campaign_id, day) =
         (SELECT campaign_id, day FROM campaign_days_view ORDER BY 1, 2 LIMIT 1)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO budget_holds_view (reservation_id, budget_id, amount, expires_at, position)
         VALUES (gen_random_uuid(), gen_random_uuid(), 1, now(), 0)",
    )
    .execute(&app.pool)
    .await
    .unwrap();

    let mut observer = Collect::default();
    let report = verified_rebuild(&app.pool, &mut observer).await;
    assert!(!report.swapped);
    assert_eq!(report.differences, 3);
    let mut seen: Vec<(&str, bool, bool)> = observer
        .differences
        .iter()
        .map(|d| (d.table.as_str(), d.live.is_some(), d.rebuilt.is_some()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("budget_holds_view", true, false),
            ("campaign_days_view", false, true),
            ("contacts_view", true, true),
        ]
    );
    let contact = observer
        .differences
        .iter()
        .find(|d| d.table == "contacts_view")
        .unwrap();
    assert_eq!(contact.key, json!({"id": tampered}));
    assert_eq!(contact.live.as_ref().unwrap()["first_name"], "Tampered");
    let stream: Value = app
        .read(&format!("/v1/contacts/{tampered}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        contact.rebuilt.as_ref().unwrap()["first_name"],
        stream["first_name"]
    );
    let name: String = sqlx::query_scalar("SELECT first_name FROM contacts_view WHERE id = $1")
        .bind(tampered)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(name, "Tampered", "the live tables were kept");

    let repaired = rebuild::rebuild(
        &app.pool,
        &rebuild::select(&[]).unwrap(),
        &options(false),
        &mut Collect::default(),
    )
    .await
    .unwrap();
    assert!(repaired.swapped && repaired.resumed);
    assert_eq!(replay_in_stream_order(&app.pool).await, Vec::new());
}

#[tokio::test]
async fn a_rebuild_meeting_an_event_its_projection_cannot_apply_names_that_event_and_swaps_nothing()
{
    // No live runner: the live tables stay as they are while the rebuild runs.
    let app = spawn_app_with(false).await;
    app.create_campaign("first").await;
    app.create_campaign("second").await;
    // Third in a batch of three: the batch fails as a whole and is located event by event.
    let bad_id = uuid::Uuid::now_v7().to_string();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload)
         VALUES ('campaign', $1, 1, 'CampaignCreated', '1.0', '{\"CampaignCreated\": {\"name\": 42}}')",
    )
    .bind(&bad_id)
    .execute(&app.pool)
    .await
    .unwrap();
    let bad: i64 = sqlx::query_scalar("SELECT position FROM events WHERE aggregate_id = $1")
        .bind(&bad_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    app.create_campaign("after").await;
    let live = digest(&app.pool).await;
    // The feed stops before the oldest transaction still running anywhere in the cluster
    // (another test's, too); with no live runner to wait for, wait until it delivers the
    // head, so that the rebuild reads every event.
    let mut conn = app.pool.acquire().await.unwrap();
    let head = feed::head(&mut conn).await.unwrap();
    let last_read = read_until(
        async || {
            feed::read(&mut conn, Position::default(), 100)
                .await
                .unwrap()
                .last()
                .map(|e| e.at)
        },
        |last| *last == head,
    )
    .await;
    assert_eq!(last_read, head, "the feed reaches its head");
    drop(conn);

    let outcome = rebuild::rebuild(
        &app.pool,
        &rebuild::select(&["campaigns".into()]).unwrap(),
        &Options {
            batch_size: 3,
            ..options(false)
        },
        &mut Collect::default(),
    )
    .await;
    match outcome {
        Err(RebuildError::Failed {
            projection,
            position,
            error,
        }) => {
            assert_eq!(projection, "campaigns");
            assert_eq!(position.position, bad, "{error}");
            assert!(error.contains("CampaignCreated"), "{error}");
        }
        other => panic!("the rebuild should have failed at the bad event: {other:?}"),
    }
    assert_eq!(digest(&app.pool).await, live);
}

#[tokio::test]
async fn one_rebuild_at_a_time_and_only_projections_can_be_rebuilt() {
    let app = spawn_app().await;
    let mut holder = app.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(x'4c52'::int, 0)")
        .execute(&mut *holder)
        .await
        .unwrap();
    let busy = rebuild::rebuild(
        &app.pool,
        &rebuild::select(&["contacts".into()]).unwrap(),
        &options(false),
        &mut Collect::default(),
    )
    .await;
    assert!(matches!(busy, Err(RebuildError::Busy)), "{busy:?}");
    sqlx::query("SELECT pg_advisory_unlock(x'4c52'::int, 0)")
        .execute(&mut *holder)
        .await
        .unwrap();
    for name in ["nope", "webhook_parking", ""] {
        assert!(
            matches!(rebuild::select(&[name.to_string()]), Err(RebuildError::Unknown(n)) if n == name),
            "{name:?}"
        );
    }
    let report = rebuild::rebuild(
        &app.pool,
        &rebuild::select(&["contacts".into()]).unwrap(),
        &options(true),
        &mut Collect::default(),
    )
    .await
    .unwrap();
    assert!(report.swapped);
    assert_eq!(report.projections, vec!["contacts".to_string()]);
}

#[tokio::test]
async fn the_rebuild_command_verifies_reports_differences_with_status_1_and_discards() {
    let app = spawn_app().await;
    let hooks = source(&app, "esp").await;
    write_round(&app, &hooks, 0).await;
    settle(&app.pool).await;
    let url = crate::helpers::harness().url(&app.database);
    let (_keep, data) = crate::lifecycle::data_dir();
    let run = |args: &[&str]| {
        // The key the contacts were encrypted under: a rebuild reads them.
        let out = crate::lifecycle::leadledger(&data)
            .env("DATABASE_URL", &url)
            .env("LEADLEDGER_SECRET_KEY", crate::helpers::TEST_SECRET_KEY)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&["projections", "rebuild", "--all", "--verify"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("verified: no differences"), "{out}");
    assert!(out.contains("events/s"), "{out}");

    let (code, _, err) = run(&["projections", "rebuild", "nope"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("no projection named nope"), "{err}");

    sqlx::query("UPDATE campaigns_view SET name = 'Tampered' WHERE name = 'paused 0'")
        .execute(&app.pool)
        .await
        .unwrap();
    let (code, out, err) = run(&["projections", "rebuild", "campaigns", "--verify"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("campaigns_view"), "{out}");
    assert!(
        out.contains("Tampered") && out.contains("paused 0"),
        "{out}"
    );
    assert!(out.contains("1 rows differ"), "{out}");
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_rebuilds")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(pending, 1, "kept for a later run");
    let (code, out, _) = run(&["projections", "status"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("rebuild of campaigns in progress or unfinished"),
        "{out}"
    );
    let (code, out, err) = run(&["projections", "rebuild", "--discard"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_rebuilds")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(pending, 0);
    let still: i64 =
        sqlx::query_scalar("SELECT count(*) FROM campaigns_view WHERE name = 'Tampered'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        still, 1,
        "the live table is untouched by verify and discard"
    );
}
