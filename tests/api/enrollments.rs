//! Enrollments: at most one per (campaign, contact) under any concurrency, statuses and
//! campaign metrics from milestones alone, whatever order provider reports arrive in.

use aggregates::enrollment::{Enrollment, EnrollmentCommand, ProviderEventKind};
use chrono::{DateTime, Duration, Utc};
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use leadledger::store::{Loaded, Metadata, Store};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, assert_problem, spawn_app};

async fn contact(app: &TestApp, email: &str) -> String {
    let c: Value = app
        .post("/v1/contacts", &json!({"email": email}))
        .await
        .json()
        .await
        .unwrap();
    c["id"].as_str().unwrap().to_string()
}

async fn enroll(app: &TestApp, campaign: &str, ids: &[&str]) -> reqwest::Response {
    app.post(
        &format!("/v1/campaigns/{campaign}/enrollments"),
        &json!({"contact_ids": ids}),
    )
    .await
}

/// Records a provider report on an enrollment through the real store (the webhook route
/// does the same after verifying the delivery).
async fn report(
    app: &TestApp,
    enrollment: &str,
    id: &str,
    kind: ProviderEventKind,
    at: DateTime<Utc>,
) -> String {
    let store = Store::default();
    let mut tx = app.pool.begin().await.unwrap();
    let mut loaded: Loaded<Enrollment> = store.load(&mut tx, enrollment).await.unwrap();
    let sink = EventSink::default();
    loaded
        .aggregate
        .handle(
            EnrollmentCommand::RecordProviderEvent {
                provider_event_id: id.to_string(),
                kind,
                occurred_at: at,
            },
            &(),
            &sink,
        )
        .await
        .unwrap();
    let events = sink.collect().await;
    let appended = store
        .append(&mut tx, &mut loaded, &events, &Metadata::default())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    appended
        .last_position()
        .or(loaded.last_position)
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn bulk_enrollment_reports_enrolled_already_enrolled_and_rejected() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("bulk").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a = contact(&app, "a@example.com").await;
    let b = contact(&app, "b@example.com").await;
    let unknown = Uuid::now_v7().to_string();
    let first: Value = enroll(&app, &campaign, &[&a]).await.json().await.unwrap();
    assert_eq!(first["enrolled"][0]["contact_id"], a);
    let response = enroll(&app, &campaign, &[&a, &b, &unknown, &b]).await;
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["enrolled"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["enrolled"][0]["contact_id"], b);
    assert_eq!(body["already_enrolled"][0]["contact_id"], a);
    assert_eq!(
        body["already_enrolled"][0]["enrollment_id"],
        first["enrolled"][0]["enrollment_id"]
    );
    assert_eq!(body["rejected"][0]["contact_id"], unknown);
    assert_eq!(body["rejected"][0]["reason"], "unknown contact");
    let enrollment = body["enrolled"][0]["enrollment_id"].as_str().unwrap();
    let one: Value = app
        .read(&format!("/v1/enrollments/{enrollment}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["status"], "enrolled");
    assert_eq!(one["campaign_id"], campaign);
    assert_eq!(one["version"], 1);
}

#[tokio::test]
async fn invalid_enrollment_requests_are_refused_and_write_nothing() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("strict").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = app.count("events").await;
    assert_problem(enroll(&app, &campaign, &[]).await, 422).await;
    let too_many: Vec<String> = (0..1001).map(|_| Uuid::now_v7().to_string()).collect();
    let refs: Vec<&str> = too_many.iter().map(String::as_str).collect();
    assert_problem(enroll(&app, &campaign, &refs).await, 422).await;
    assert_problem(enroll(&app, &campaign, &["not-a-uuid"]).await, 422).await;
    assert_problem(
        enroll(
            &app,
            "0190f1b4-0000-7000-8000-000000000000",
            &[&Uuid::now_v7().to_string()],
        )
        .await,
        404,
    )
    .await;
    let c = contact(&app, "late@example.com").await;
    let before_complete = app.count("events").await;
    for step in ["start", "complete"] {
        app.post(&format!("/v1/campaigns/{campaign}/{step}"), &json!({}))
            .await;
    }
    let problem = assert_problem(enroll(&app, &campaign, &[&c]).await, 409).await;
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("campaign-completed")
    );
    assert_eq!(
        app.count("events").await,
        before_complete + 2,
        "only the two transitions"
    );
    assert!(before_complete > before);
}

#[tokio::test]
async fn concurrent_overlapping_bulk_enrollments_never_enroll_a_contact_twice() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("race").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rows: Vec<Value> = (0..60)
        .map(|i| json!({"email": format!("c{i}@example.com")}))
        .collect();
    let report: Value = app
        .client
        .post(app.url("/v1/contacts/import"))
        .bearer_auth(&app.write_key)
        .json(&rows)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["created"], 60);
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT aggregate_id FROM events WHERE aggregate_type = 'contact' ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let requests = (0..6).map(|k| {
        // Each request takes 30 contacts; neighbouring requests overlap by 20.
        let slice: Vec<String> = ids.iter().cycle().skip(k * 10).take(30).cloned().collect();
        let request = app
            .client
            .post(app.url(&format!("/v1/campaigns/{campaign}/enrollments")))
            .bearer_auth(&app.write_key)
            .json(&json!({"contact_ids": slice}));
        tokio::spawn(async move { request.send().await.unwrap().json::<Value>().await.unwrap() })
    });
    let bodies: Vec<Value> = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let enrolled: usize = bodies
        .iter()
        .map(|b| b["enrolled"].as_array().unwrap().len())
        .sum();
    assert_eq!(
        enrolled, 60,
        "every contact enrolled by exactly one request"
    );
    let streams: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'ContactEnrolled'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(streams, 60);
    let last = bodies
        .iter()
        .filter_map(|b| b["position"].as_str())
        .max()
        .unwrap();
    let metrics: Value = app
        .read(&format!(
            "/v1/campaigns/{campaign}/metrics?min_position={last}"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(metrics["enrolled"], 60);
}

#[tokio::test]
async fn provider_reports_in_any_order_give_the_same_status_milestones_and_metrics() {
    let app = spawn_app().await;
    let t0: DateTime<Utc> = "2026-11-01T09:00:00Z".parse().unwrap();
    let reports = [
        ("e1", ProviderEventKind::Sent, t0),
        (
            "e2",
            ProviderEventKind::Delivered,
            t0 + Duration::minutes(1),
        ),
        ("e3", ProviderEventKind::Opened, t0 + Duration::minutes(5)),
        ("e4", ProviderEventKind::Replied, t0 + Duration::minutes(30)),
        ("e5", ProviderEventKind::Opened, t0 + Duration::minutes(40)),
        (
            "e6",
            ProviderEventKind::SoftBounced,
            t0 + Duration::minutes(2),
        ),
    ];
    let orders: [[usize; 6]; 4] = [
        [0, 1, 2, 3, 4, 5],
        [5, 4, 3, 2, 1, 0],
        [3, 0, 4, 1, 5, 2],
        [4, 3, 2, 1, 0, 5],
    ];
    let mut seen = Vec::new();
    for (n, order) in orders.iter().enumerate() {
        let campaign = app.create_campaign(&format!("order {n}")).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let c = contact(&app, &format!("perm{n}@example.com")).await;
        let body: Value = enroll(&app, &campaign, &[&c]).await.json().await.unwrap();
        let enrollment = body["enrolled"][0]["enrollment_id"]
            .as_str()
            .unwrap()
            .to_string();
        let mut token = String::new();
        for &i in order {
            let (id, kind, at) = reports[i];
            token = report(&app, &enrollment, id, kind, at).await;
            // Every report delivered twice: the second is a no-op.
            report(&app, &enrollment, id, kind, at).await;
        }
        let one: Value = app
            .read(&format!("/v1/enrollments/{enrollment}"))
            .await
            .json()
            .await
            .unwrap();
        let page: Value = app
            .read(&format!(
                "/v1/campaigns/{campaign}/enrollments?min_position={token}"
            ))
            .await
            .json()
            .await
            .unwrap();
        let metrics: Value = app
            .read(&format!(
                "/v1/campaigns/{campaign}/metrics?min_position={token}"
            ))
            .await
            .json()
            .await
            .unwrap();
        let mut view = page["items"][0].clone();
        let mut stream = one.clone();
        for v in [&mut view, &mut stream] {
            let o = v.as_object_mut().unwrap();
            for k in ["id", "campaign_id", "contact_id", "enrolled_at", "version"] {
                o.remove(k);
            }
        }
        assert_eq!(view, stream, "read model and stream agree");
        let mut m = metrics.clone();
        m.as_object_mut().unwrap().remove("campaign_id");
        assert_eq!(
            one["version"], 7,
            "enrolled + one event per distinct report, none for repeats"
        );
        seen.push((stream, m));
    }
    for s in &seen[1..] {
        assert_eq!(s, &seen[0]);
    }
    let (stream, metrics) = &seen[0];
    assert_eq!(
        stream["status"], "replied",
        "a late open does not lower a reply"
    );
    assert_eq!(
        stream["opened_at"], "2026-11-01T09:05:00Z",
        "the earliest open wins"
    );
    assert!(
        stream["sequence_ended_at"].is_string(),
        "stop_on_reply ends the sequence"
    );
    assert_eq!(metrics["replied"], 1);
    assert_eq!(
        metrics["opened"], 1,
        "two opens are one enrollment that opened"
    );
    assert_eq!(metrics["delivery_rate"], 100.0);
    assert_eq!(metrics["bounce_rate"], 0.0);
    assert!(metrics["open_rate"].is_number());
}

#[tokio::test]
async fn an_unsubscribe_is_final_and_counts_and_rates_are_numbers() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("unsub").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a = contact(&app, "u1@example.com").await;
    let b = contact(&app, "u2@example.com").await;
    let body: Value = enroll(&app, &campaign, &[&a, &b])
        .await
        .json()
        .await
        .unwrap();
    let ea = body["enrolled"][0]["enrollment_id"]
        .as_str()
        .unwrap()
        .to_string();
    let eb = body["enrolled"][1]["enrollment_id"]
        .as_str()
        .unwrap()
        .to_string();
    let t0: DateTime<Utc> = "2026-11-02T09:00:00Z".parse().unwrap();
    report(&app, &ea, "u-1", ProviderEventKind::Unsubscribed, t0).await;
    report(
        &app,
        &ea,
        "u-2",
        ProviderEventKind::Opened,
        t0 + Duration::hours(1),
    )
    .await;
    let token = report(&app, &eb, "u-3", ProviderEventKind::Bounced, t0).await;
    let one: Value = app
        .read(&format!("/v1/enrollments/{ea}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        one["status"], "unsubscribed",
        "an open after an unsubscribe leaves it"
    );
    let m: Value = app
        .read(&format!(
            "/v1/campaigns/{campaign}/metrics?min_position={token}"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(m["enrolled"], 2);
    assert_eq!(m["sent"], 2, "a bounce was sent");
    assert_eq!(
        m["delivered"], 1,
        "an unsubscribe was delivered; a bounce was not"
    );
    assert_eq!(m["bounced"], 1);
    assert_eq!(m["unsubscribed"], 1);
    assert_eq!(m["bounce_rate"], 50.0);
    assert_eq!(m["delivery_rate"], 50.0);
    assert_eq!(m["unsubscribe_rate"], 100.0);
    let unsubscribed: Value = app
        .read(&format!(
            "/v1/campaigns/{campaign}/enrollments?status=unsubscribed&min_position={token}"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(unsubscribed["items"].as_array().unwrap().len(), 1);
    assert_problem(
        app.read(&format!("/v1/campaigns/{campaign}/enrollments?status=lost"))
            .await,
        400,
    )
    .await;
    assert_problem(
        app.read("/v1/campaigns/0190f1b4-0000-7000-8000-000000000000/metrics")
            .await,
        404,
    )
    .await;
}

#[tokio::test]
async fn no_enrollment_ever_commits_after_its_campaign_is_completed() {
    let app = spawn_app().await;
    let import: Vec<Value> = (0..120)
        .map(|i| json!({"email": format!("race{i}@example.com")}))
        .collect();
    let imported = app.post("/v1/contacts/import", &json!(import)).await;
    assert_eq!(imported.status().as_u16(), 200);
    let mut contacts = Vec::new();
    for i in 0..120 {
        contacts.push(contact(&app, &format!("race{i}@example.com")).await);
    }
    for round in 0..15 {
        let campaign = app.create_campaign(&format!("race {round}")).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let started = app
            .post(&format!("/v1/campaigns/{campaign}/start"), &json!({}))
            .await;
        assert_eq!(started.status().as_u16(), 200);
        let mut tasks = Vec::new();
        for chunk in contacts.chunks(10) {
            let client = app.client.clone();
            let url = app.url(&format!("/v1/campaigns/{campaign}/enrollments"));
            let key = app.write_key.clone();
            let ids: Vec<String> = chunk.to_vec();
            tasks.push(tokio::spawn(async move {
                client
                    .post(url)
                    .bearer_auth(key)
                    .json(&json!({"contact_ids": ids}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }));
        }
        // Completion lands in the middle of the enrollments, at a different point each round.
        tokio::time::sleep(std::time::Duration::from_millis(round * 3)).await;
        let completed = app
            .post(&format!("/v1/campaigns/{campaign}/complete"), &json!({}))
            .await;
        assert_eq!(completed.status().as_u16(), 200);
        for task in tasks {
            let status = task.await.unwrap();
            assert!(status == 200 || status == 409, "{status}");
        }
        // Commit order is the feed's order: (transaction id, position).
        let late: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events e, events c
             WHERE e.event_type = 'ContactEnrolled' AND strpos(e.payload::text, $1) > 0
               AND c.aggregate_id = $1 AND c.event_type = 'CampaignCompleted'
               AND (e.transaction_id, e.position) > (c.transaction_id, c.position)",
        )
        .bind(&campaign)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(late, 0, "round {round}: enrollments after completion");
    }
}
