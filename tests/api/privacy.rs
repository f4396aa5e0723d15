//! Personal data: encryption at rest per contact, erasure by crypto-shredding (checked on a
//! whole-database dump, before and after a rebuild of every projection), erasure racing
//! updates, and the suppression list.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, harness, spawn_app, spawn_app_with};
use crate::webhooks::{deliver, event, source};

/// Every personal value the person of these tests has.
const PERSONAL: &[&str] = &[
    "ada.shredded@example.org",
    "Adelheid",
    "Quintessa",
    "+44 20 7946 0958",
    "https://www.linkedin.com/in/adelheid-quintessa",
    "loves-chess-openings",
    "Babbage Engines Unlimited",
    "enriched-secret-hobby",
];

/// The whole database as `pg_dump` writes it: schema and data of every table.
fn dump(app: &TestApp) -> String {
    let url = harness().url(&app.database);
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|dirs| {
            let mut versions: Vec<_> = dirs.flatten().map(|d| d.path()).collect();
            versions.sort();
            versions.pop()
        })
        .map(|v| v.join("bin/pg_dump"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "pg_dump".into());
    let out = std::process::Command::new(bin)
        .arg("--no-owner")
        .arg(&url)
        .output()
        .expect("pg_dump runs");
    assert!(
        out.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("a UTF-8 dump")
}

/// The personal values the dump holds, as text or inside a `bytea` (which pg_dump writes
/// in hex).
fn leaks(dump: &str) -> Vec<&'static str> {
    let lower = dump.to_lowercase();
    PERSONAL
        .iter()
        .copied()
        .filter(|p| lower.contains(&p.to_lowercase()) || lower.contains(&hex::encode(p)))
        .collect()
}

/// `projections rebuild --all`, in this process.
async fn rebuild_everything(app: &TestApp) {
    let selected = projections::rebuild::select(&[]).unwrap();
    projections::rebuild::rebuild(
        &app.pool,
        &selected,
        &projections::rebuild::Options::default(),
        &mut projections::rebuild::Quiet,
    )
    .await
    .unwrap();
}

async fn delete(app: &TestApp, path: &str) -> reqwest::Response {
    app.client
        .delete(app.url(path))
        .bearer_auth(&app.write_key)
        .send()
        .await
        .unwrap()
}

async fn metrics(app: &TestApp, campaign: &str, position: &str) -> Value {
    let r = app
        .read(&format!(
            "/v1/campaigns/{campaign}/metrics?min_position={position}"
        ))
        .await;
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.unwrap()
}

async fn wait_for_projections(app: &TestApp, position: &str) {
    let r = app
        .read(&format!("/v1/contacts?min_position={position}&limit=1"))
        .await;
    assert_eq!(r.status().as_u16(), 200, "projections caught up");
}

#[tokio::test]
async fn an_erased_person_is_nowhere_in_a_dump_of_the_database_even_after_a_rebuild() {
    let app = spawn_app().await;
    let email = PERSONAL[0];
    let created: Value = app
        .post(
            "/v1/contacts",
            &json!({"email": email, "first_name": "Adelheid", "last_name": "Quintessa",
                    "phone": "+44 20 7946 0958",
                    "linkedin_url": "https://www.linkedin.com/in/adelheid-quintessa",
                    "custom": {"hobby": "loves-chess-openings"}}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    // Replies recorded for idempotency keys hold the person too.
    let patch_with_a_key = || {
        app.client
            .patch(app.url(&format!("/v1/contacts/{id}")))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", "patch-1")
            .json(&json!({"company": "Babbage Engines Unlimited"}))
            .send()
    };
    let patched = patch_with_a_key().await.unwrap();
    assert_eq!(patched.status().as_u16(), 200);
    let enriched = app
        .post(
            &format!("/v1/contacts/{id}/enrichment"),
            &json!({"data": {"hobby": "enriched-secret-hobby"}, "quality_score": 0.8,
                    "sources": ["clearbit"]}),
        )
        .await;
    assert_eq!(enriched.status().as_u16(), 200);
    // Stored encrypted: nothing personal in the events or snapshots even before erasure.
    let events: Vec<String> =
        sqlx::query_scalar("SELECT payload::text FROM events WHERE aggregate_type = 'contact'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    for payload in &events {
        assert!(
            leaks(payload).is_empty(),
            "plaintext in an event: {payload}"
        );
    }
    let campaign = app.create_campaign("privacy").await["id"].clone();
    let campaign = campaign.as_str().unwrap().to_string();
    let enrolled = app
        .post(
            &format!("/v1/campaigns/{campaign}/enrollments"),
            &json!({"contact_ids": [id]}),
        )
        .await;
    assert_eq!(enrolled.status().as_u16(), 200);
    let esp = source(&app, "esp").await;
    let at = chrono::Utc::now().to_rfc3339();
    let delivered = deliver(
        &app.address,
        &esp,
        "delivery-1",
        &json!([
            event("e1", "sent", &campaign, email, &at),
            event("e2", "opened", &campaign, email, &at),
        ]),
    )
    .await;
    assert_eq!(delivered["results"][1]["outcome"], "applied", "{delivered}");
    let before_position: String = sqlx::query_scalar(
        "SELECT transaction_id::text || '-' || position FROM events ORDER BY position DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let before = metrics(&app, &campaign, &before_position).await;
    assert_eq!(before["opened"], 1, "{before}");

    let erased = delete(&app, &format!("/v1/contacts/{id}")).await;
    assert_eq!(erased.status().as_u16(), 200);
    let erased: Value = erased.json().await.unwrap();
    assert_eq!(erased["id"], id.as_str());
    let position = erased["position"].as_str().unwrap().to_string();
    assert!(erased["erased_at"].is_string());
    wait_for_projections(&app, &position).await;

    let gone = assert_problem(app.read(&format!("/v1/contacts/{id}")).await, 410).await;
    assert_eq!(gone["erased_at"], erased["erased_at"]);
    let again = delete(&app, &format!("/v1/contacts/{id}")).await;
    assert_eq!(again.status().as_u16(), 200, "erasure is idempotent");
    // The reply recorded for the earlier patch is replayed without the person in it.
    let replayed = patch_with_a_key().await.unwrap();
    assert_eq!(replayed.status().as_u16(), 200);
    let replayed = replayed.text().await.unwrap();
    assert!(replayed.contains("redacted"), "{replayed}");
    assert!(leaks(&replayed).is_empty(), "{replayed}");
    let patch = app
        .client
        .patch(app.url(&format!("/v1/contacts/{id}")))
        .bearer_auth(&app.write_key)
        .json(&json!({"first_name": "Back"}))
        .send()
        .await
        .unwrap();
    assert_problem(patch, 410).await;
    let recreate = app.post("/v1/contacts", &json!({"email": email})).await;
    let problem = assert_problem(recreate, 409).await;
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("contact-erased")
    );
    let imported = app
        .post(
            "/v1/contacts/import",
            &json!([{"email": "someone.else@example.net"}, {"email": email}]),
        )
        .await;
    assert_eq!(imported.status().as_u16(), 200);
    let report: Value = imported.json().await.unwrap();
    assert_eq!(report["created"], 1, "{report}");
    assert_eq!(report["errors"][0]["row"], 2);
    assert_eq!(report["errors"][0]["code"], "contact-erased");

    let after = metrics(&app, &campaign, &position).await;
    assert_eq!(after, before, "campaign numbers do not change");
    let leaked = leaks(&dump(&app));
    assert!(leaked.is_empty(), "found in the dump: {leaked:?}");

    rebuild_everything(&app).await;
    let leaked = leaks(&dump(&app));
    assert!(leaked.is_empty(), "found after a rebuild: {leaked:?}");
    assert_eq!(metrics(&app, &campaign, &position).await, before);
    let list: Value = app
        .read(&format!("/v1/contacts?email={email}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        list["items"],
        json!([]),
        "the read model holds nothing of them"
    );
}

#[tokio::test]
async fn an_erased_email_comes_back_as_a_new_contact_once_its_suppression_is_removed() {
    let app = spawn_app().await;
    let (email, other) = ("reborn@example.org", "reborn.import@example.org");
    for e in [email, other] {
        let created = app
            .post(
                "/v1/contacts",
                &json!({"email": e, "first_name": "Adelheid", "phone": "+44 20 7946 0958",
                        "custom": {"hobby": "loves-chess-openings"}}),
            )
            .await;
        assert_eq!(created.status().as_u16(), 201);
        let id = created.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            delete(&app, &format!("/v1/contacts/{id}")).await.status(),
            200
        );
    }
    let refused = app.post("/v1/contacts", &json!({"email": email})).await;
    assert_problem(refused, 409).await;
    let erased_entry = suppression_of(&app, email).await.unwrap();
    let id = erased_entry["contact_id"].as_str().unwrap().to_string();

    // Removing the suppression releases the erasure, once.
    let removed = delete(&app, &format!("/v1/suppressions?email={email}")).await;
    assert_eq!(removed.status().as_u16(), 204, "{:?}", removed.text().await);
    assert_eq!(suppression_of(&app, email).await, None);
    let twice = delete(&app, &format!("/v1/suppressions?email={email}")).await;
    assert_problem(twice, 404).await;
    let still_gone = assert_problem(app.read(&format!("/v1/contacts/{id}")).await, 410).await;
    assert!(
        still_gone["erased_at"].is_string(),
        "released, not yet created"
    );
    let campaign = app.create_campaign("reborn").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = enroll(&app, &campaign, &id).await;
    assert_eq!(refused["rejected"][0]["reason"], "erased", "{refused}");

    // Created again: a new contact with none of the old life's data.
    let again = app
        .post(
            "/v1/contacts",
            &json!({"email": email, "last_name": "Newlife"}),
        )
        .await;
    assert_eq!(again.status().as_u16(), 201);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["created"], true);
    assert_eq!(again["id"], id.as_str(), "the same stream, a new life");
    assert_eq!(again["last_name"], "Newlife");
    assert_eq!(again["first_name"], Value::Null);
    assert_eq!(again["phone"], Value::Null);
    assert_eq!(again["custom"], json!({}));
    let position = again["position"].as_str().unwrap().to_string();
    let read: Value = app
        .read(&format!("/v1/contacts/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(read["email"], email);
    assert_eq!(read["version"], 4, "created, erased, released, created");
    let update = app
        .post("/v1/contacts", &json!({"email": email, "title": "CTO"}))
        .await;
    assert_eq!(update.status().as_u16(), 200);

    // The import path creates a released email again too.
    let removed = delete(&app, &format!("/v1/suppressions?email={other}")).await;
    assert_eq!(removed.status().as_u16(), 204);
    let imported: Value = app
        .post("/v1/contacts/import", &json!([{"email": other}]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(imported["created"], 1, "{imported}");
    assert_eq!(imported["failed"], 0, "{imported}");

    // The export shows the old life emptied, the release attributed, the new life open.
    let export: Value = app
        .read(&format!("/v1/contacts/{id}/export"))
        .await
        .json()
        .await
        .unwrap();
    let types: Vec<&str> = export["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "ContactCreated",
            "ContactErased",
            "ErasureReleased",
            "ContactCreated",
            "ContactUpdated"
        ]
    );
    assert_eq!(
        export["events"][0]["data"],
        json!({}),
        "the old life unreadable"
    );
    assert_eq!(export["events"][3]["data"]["email"], email);
    let history: Value = app
        .read(&format!("/v1/contacts/{id}/history"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(history["items"][2]["event_type"], "ErasureReleased");
    assert_eq!(history["items"][2]["actor"]["name"], "test write");

    // Neither the database nor a rebuild brings back the old life.
    let old_life = ["Adelheid", "+44 20 7946 0958", "loves-chess-openings"];
    wait_for_projections(&app, &position).await;
    rebuild_everything(&app).await;
    let dumped = dump(&app);
    for value in old_life {
        assert!(!dumped.contains(value), "{value} in the dump");
    }
    let list: Value = app
        .read(&format!("/v1/contacts?email={email}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["items"][0]["last_name"], "Newlife");
    assert_eq!(list["items"][0]["title"], "CTO");
    assert_eq!(list["items"][0]["first_name"], Value::Null);

    // Erased again: the new life's key goes the same way, and the email is suppressed.
    let erased = delete(&app, &format!("/v1/contacts/{id}")).await;
    assert_eq!(erased.status().as_u16(), 200);
    let erased: Value = erased.json().await.unwrap();
    wait_for_projections(&app, erased["position"].as_str().unwrap()).await;
    assert_problem(app.read(&format!("/v1/contacts/{id}")).await, 410).await;
    let keys: Vec<(i32, bool)> = sqlx::query_as(
        "SELECT generation, wrapped_key IS NULL FROM contact_keys
         WHERE contact_id = $1 ORDER BY generation",
    )
    .bind(&id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(keys, [(0, true), (1, true)]);
    assert_eq!(
        suppression_of(&app, email).await.unwrap()["reason"],
        "erased"
    );
    assert!(!dump(&app).contains("Newlife"));
}

#[tokio::test]
async fn updates_racing_an_erasure_never_leave_readable_data_or_bring_the_contact_back() {
    let app = spawn_app().await;
    for round in 0..12 {
        let email = format!("racer{round}@example.org");
        let created: Value = app
            .post(
                "/v1/contacts",
                &json!({"email": email, "first_name": "Racer"}),
            )
            .await
            .json()
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap().to_string();
        let updates = (0..6).map(|i| {
            let request = app
                .client
                .patch(app.url(&format!("/v1/contacts/{id}")))
                .bearer_auth(&app.write_key)
                .json(&json!({"last_name": format!("Secret-{round}-{i}")}));
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        });
        let erase = {
            let request = app
                .client
                .delete(app.url(&format!("/v1/contacts/{id}")))
                .bearer_auth(&app.write_key);
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        };
        let statuses: Vec<u16> = futures::future::join_all(updates)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(erase.await.unwrap(), 200);
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 410),
            "{statuses:?}"
        );
        // Nothing of the stream opens any more, and the contact stays erased.
        let r = app.read(&format!("/v1/contacts/{id}")).await;
        assert_eq!(r.status().as_u16(), 410, "round {round}");
        let plain: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE aggregate_id = $1 AND payload::text LIKE '%Secret-%'",
        )
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(plain, 0);
        let key: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT wrapped_key FROM contact_keys WHERE contact_id = $1")
                .bind(&id)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert!(key.is_none(), "the key is destroyed");
        let last: String = sqlx::query_scalar(
            "SELECT event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence DESC LIMIT 1",
        )
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(last, "ContactErased", "nothing after the erasure");
    }
    // The read model forgets them all.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let head: String = sqlx::query_scalar(
        "SELECT transaction_id::text || '-' || position FROM events ORDER BY position DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    wait_for_projections(&app, &head).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts_view")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn erasing_an_unknown_or_malformed_contact_is_404_and_writes_nothing() {
    let app = spawn_app().await;
    let before = app.count("events").await;
    let r = delete(&app, &format!("/v1/contacts/{}", uuid::Uuid::new_v4())).await;
    assert_problem(r, 404).await;
    let r = delete(&app, "/v1/contacts/not-a-uuid").await;
    assert_problem(r, 404).await;
    let r = app
        .client
        .delete(app.url(&format!("/v1/contacts/{}", uuid::Uuid::new_v4())))
        .bearer_auth(&app.read_key)
        .send()
        .await
        .unwrap();
    assert_problem(r, 403).await;
    assert_eq!(app.count("events").await, before);
    assert_eq!(app.count("contact_keys").await, 0);
}

async fn suppression_of(app: &TestApp, email: &str) -> Option<Value> {
    let r = app.read(&format!("/v1/suppressions?email={email}")).await;
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    body["items"].as_array().unwrap().first().cloned()
}

/// Waits (a few seconds at most) for the automatic suppression of `email`.
async fn suppressed_soon(app: &TestApp, email: &str) -> Value {
    for _ in 0..200 {
        if let Some(entry) = suppression_of(app, email).await {
            return entry;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{email} was not suppressed");
}

async fn enroll(app: &TestApp, campaign: &str, contact: &str) -> Value {
    let r = app
        .post(
            &format!("/v1/campaigns/{campaign}/enrollments"),
            &json!({"contact_ids": [contact]}),
        )
        .await;
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn a_complaint_suppresses_the_contact_and_enrolling_it_is_rejected_until_the_suppression_is_removed()
 {
    let app = spawn_app().await;
    let email = "complainer@example.org";
    let contact: Value = app
        .post("/v1/contacts", &json!({"email": email}))
        .await
        .json()
        .await
        .unwrap();
    let id = contact["id"].as_str().unwrap();
    // The list reads the email from the contacts read model: once it has the contact.
    wait_for_projections(&app, contact["position"].as_str().unwrap()).await;
    let first = app.create_campaign("first").await["id"].clone();
    let first = first.as_str().unwrap();
    assert_eq!(
        enroll(&app, first, id).await["enrolled"][0]["contact_id"],
        id
    );
    assert!(suppression_of(&app, email).await.is_none());
    let esp = source(&app, "esp").await;
    let at = chrono::Utc::now().to_rfc3339();
    let delivered = deliver(
        &app.address,
        &esp,
        "complaint-1",
        &json!([event("c1", "complained", first, email, &at)]),
    )
    .await;
    assert_eq!(delivered["results"][0]["outcome"], "applied", "{delivered}");
    let entry = suppressed_soon(&app, email).await;
    assert_eq!(entry["reason"], "complained");
    assert_eq!(entry["contact_id"], id);
    assert_eq!(entry["email"], email, "shown while the contact exists");

    let second = app.create_campaign("second").await["id"].clone();
    let second = second.as_str().unwrap();
    let refused = enroll(&app, second, id).await;
    assert_eq!(refused["enrolled"], json!([]));
    assert_eq!(refused["rejected"][0]["reason"], "suppressed", "{refused}");

    let removed = app
        .client
        .delete(app.url(&format!("/v1/suppressions?email={email}")))
        .bearer_auth(&app.write_key)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status().as_u16(), 204);
    assert!(suppression_of(&app, email).await.is_none());
    let allowed = enroll(&app, second, id).await;
    assert_eq!(allowed["enrolled"][0]["contact_id"], id, "{allowed}");
    // Nothing in the table says which address it is.
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM suppressions WHERE encode(email_hash, 'escape') LIKE '%complainer%'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn manual_suppressions_are_added_listed_and_removed_and_bad_input_is_refused() {
    let app = spawn_app().await;
    let add = |body: Value| {
        let request = app
            .client
            .post(app.url("/v1/suppressions"))
            .bearer_auth(&app.write_key)
            .json(&body);
        async move { request.send().await.unwrap() }
    };
    let created = add(json!({"email": "Nobody@Example.org"})).await;
    assert_eq!(created.status().as_u16(), 201);
    let created: Value = created.json().await.unwrap();
    assert_eq!(created["reason"], "manual");
    assert!(
        created.get("email").is_none(),
        "no contact: no email to show"
    );
    assert_eq!(
        add(json!({"email": "nobody@example.org", "reason": "manual"}))
            .await
            .status()
            .as_u16(),
        200,
        "the same address after normalisation"
    );
    for bad in [
        json!({"email": "not an address"}),
        json!({"email": "x@example.org", "reason": "bounced"}),
    ] {
        assert_problem(add(bad).await, 422).await;
    }
    assert_problem(
        add(json!({"email": "x@example.org", "extra": 1})).await,
        422,
    )
    .await;
    assert_eq!(app.count("suppressions").await, 1);
    let bad_reason = app.read("/v1/suppressions?reason=annoyed").await;
    assert_problem(bad_reason, 400).await;
    let bad_cursor = app.read("/v1/suppressions?cursor=nope").await;
    assert_problem(bad_cursor, 400).await;
    let list: Value = app
        .read("/v1/suppressions?reason=manual")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let missing = app
        .client
        .delete(app.url("/v1/suppressions?email=other@example.org"))
        .bearer_auth(&app.write_key)
        .send()
        .await
        .unwrap();
    assert_problem(missing, 404).await;
    let no_email = app
        .client
        .delete(app.url("/v1/suppressions"))
        .bearer_auth(&app.write_key)
        .send()
        .await
        .unwrap();
    assert_problem(no_email, 400).await;
    assert_eq!(app.count("suppressions").await, 1);
}

#[tokio::test]
async fn withdrawn_consent_is_recorded_shown_and_suppresses() {
    let app = spawn_app().await;
    let email = "consenting@example.org";
    let contact: Value = app
        .post("/v1/contacts", &json!({"email": email}))
        .await
        .json()
        .await
        .unwrap();
    let id = contact["id"].as_str().unwrap();
    let granted = app
        .post(
            &format!("/v1/contacts/{id}/consent"),
            &json!({"status": "granted", "basis": "consent", "source": "signup form"}),
        )
        .await;
    assert_eq!(granted.status().as_u16(), 200);
    let granted: Value = granted.json().await.unwrap();
    assert_eq!(granted["consent"]["status"], "granted");
    assert_eq!(granted["consent"]["basis"], "consent");
    assert_eq!(granted["consent"]["source"], "signup form");
    for bad in [
        json!({"status": "maybe"}),
        json!({"status": "granted", "basis": "whim"}),
        json!({}),
        json!({"status": "granted", "source": "x".repeat(201)}),
    ] {
        let r = app.post(&format!("/v1/contacts/{id}/consent"), &bad).await;
        assert_problem(r, 422).await;
    }
    let unknown = app
        .post(
            &format!("/v1/contacts/{}/consent", uuid::Uuid::new_v4()),
            &json!({"status": "granted"}),
        )
        .await;
    assert_problem(unknown, 404).await;
    assert!(suppression_of(&app, email).await.is_none());
    let withdrawn = app
        .post(
            &format!("/v1/contacts/{id}/consent"),
            &json!({"status": "withdrawn"}),
        )
        .await;
    assert_eq!(withdrawn.status().as_u16(), 200);
    let shown: Value = app
        .read(&format!("/v1/contacts/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["consent"]["status"], "withdrawn");
    assert_eq!(
        suppressed_soon(&app, email).await["reason"],
        "consent_withdrawn"
    );
}

#[tokio::test]
async fn the_export_holds_everything_about_the_person_and_the_history_says_who_did_what() {
    let app = spawn_app().await;
    let created: Value = app
        .post(
            "/v1/contacts",
            &json!({"email": "exported@example.org", "first_name": "Ex"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap();
    let patched = app
        .client
        .patch(app.url(&format!("/v1/contacts/{id}")))
        .bearer_auth(&app.write_key)
        .header("x-request-id", "req-patch-1")
        .json(&json!({"last_name": "Port"}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status().as_u16(), 200);
    let campaign = app.create_campaign("export").await["id"].clone();
    let campaign = campaign.as_str().unwrap();
    let enrolled = enroll(&app, campaign, id).await;
    let position = enrolled["position"].as_str().unwrap();
    // The enrollments read model has it once this position is reached.
    let r = app
        .read(&format!(
            "/v1/campaigns/{campaign}/enrollments?min_position={position}"
        ))
        .await;
    assert_eq!(r.status().as_u16(), 200);

    let export: Value = app
        .read(&format!("/v1/contacts/{id}/export"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(export["contact"]["email"], "exported@example.org");
    assert_eq!(export["contact"]["last_name"], "Port");
    let events = export["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["event_type"], "ContactCreated");
    assert_eq!(
        events[0]["data"]["email"], "exported@example.org",
        "decrypted"
    );
    assert_eq!(events[1]["data"]["changes"]["last_name"], "Port");
    assert_eq!(export["enrollments"][0]["campaign_id"], campaign);
    assert_eq!(export["suppression"], Value::Null);

    let page: Value = app
        .read(&format!("/v1/contacts/{id}/history?limit=1"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"][0]["sequence"], 1);
    assert_eq!(page["items"][0]["actor"]["name"], "test write");
    assert!(page["items"][0]["actor"]["key_id"].is_string());
    let cursor = page["next_cursor"].as_str().unwrap();
    let next: Value = app
        .read(&format!(
            "/v1/contacts/{id}/history?limit=1&cursor={cursor}"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(next["items"][0]["event_type"], "ContactUpdated");
    assert_eq!(next["items"][0]["request_id"], "req-patch-1");
    assert_eq!(next["items"][0]["changes"]["changes"]["last_name"], "Port");
    assert_eq!(next["next_cursor"], Value::Null);
    for bad in ["limit=0", "limit=501", "cursor=zzz", "extra=1"] {
        let r = app.read(&format!("/v1/contacts/{id}/history?{bad}")).await;
        assert_problem(r, 400).await;
    }
    let unknown = app
        .read(&format!("/v1/contacts/{}/export", uuid::Uuid::new_v4()))
        .await;
    assert_problem(unknown, 404).await;

    let erased = delete(&app, &format!("/v1/contacts/{id}")).await;
    assert_eq!(erased.status().as_u16(), 200);
    let erased: Value = erased.json().await.unwrap();
    // The list reads the email from the contacts read model: once it has the erasure.
    wait_for_projections(&app, erased["position"].as_str().unwrap()).await;
    for path in ["export", "history"] {
        let r = app.read(&format!("/v1/contacts/{id}/{path}")).await;
        assert_problem(r, 410).await;
    }
    let entry = suppression_of(&app, "exported@example.org").await.unwrap();
    assert_eq!(entry["reason"], "erased");
    assert!(
        entry.get("email").is_none(),
        "the contact is gone, so is its email"
    );
}

/// A fresh database with the app built on it (migrated, the test key installed), for
/// tests that store rows as an earlier release did and call the app directly: its name and
/// a pool.
async fn app_database() -> (String, sqlx::PgPool) {
    let database = harness().fresh_database().await;
    let pool = sqlx::PgPool::connect_with(harness().options(&database))
        .await
        .unwrap();
    let _app = crate::helpers::build_app(pool.clone());
    (database, pool)
}

/// A clear-text contact event as an earlier release stored it.
fn clear_event(i: usize, sequence: i64) -> Value {
    if sequence == 1 {
        json!({"ContactCreated": {
            "email": format!("legacy{i}@example.org"),
            "fields": {"first_name": format!("Legacy{i}"), "phone": "+1 555 0100"},
            "created_at": "2026-01-01T00:00:00Z"}})
    } else {
        json!({"ContactUpdated": {
            "changes": {"last_name": format!("Person{i}")},
            "updated_at": "2026-01-02T00:00:00Z"}})
    }
}

#[tokio::test]
async fn encrypting_clear_events_killed_midway_and_run_again_seals_each_event_once() {
    use leadledger::store::Store;
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    const CONTACTS: usize = 3_000;
    let (database, pool) = app_database().await;
    let ids: Vec<String> = (0..CONTACTS)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    for sequence in [1i64, 2] {
        let payloads: Vec<Value> = (0..CONTACTS).map(|i| clear_event(i, sequence)).collect();
        let kind = if sequence == 1 {
            "ContactCreated"
        } else {
            "ContactUpdated"
        };
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload)
             SELECT 'contact', u.id, $2, $3, '1.0', u.payload
             FROM UNNEST($1::text[], $4::jsonb[]) AS u(id, payload)",
        )
        .bind(&ids)
        .bind(sequence)
        .bind(kind)
        .bind(&payloads)
        .execute(&pool)
        .await
        .unwrap();
    }
    let store = Store::default();
    let load_all = || async {
        let mut conn = pool.acquire().await.unwrap();
        let loaded = store
            .load_many::<aggregates::Contact>(&mut conn, &ids)
            .await
            .unwrap();
        ids.iter()
            .map(|id| serde_json::to_value(&loaded[id].aggregate).unwrap())
            .collect::<Vec<Value>>()
    };
    let before = load_all().await;
    assert_eq!(before[7]["first_name"], "Legacy7");
    let total = (CONTACTS * 2) as i64;
    let sealed = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM events WHERE payload::text LIKE '%\"pii\"%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };

    let url = harness().url(&database);
    let (_keep, data) = crate::lifecycle::data_dir();
    let command = || {
        let mut cmd = crate::lifecycle::leadledger(&data);
        cmd.env("DATABASE_URL", &url)
            .env("LEADLEDGER_SECRET_KEY", crate::helpers::TEST_SECRET_KEY)
            .args(["contacts", "encrypt", "--batch-size", "10"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd
    };
    let mut child = command().spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while sealed().await < 400 {
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let midway = sealed().await;
    assert!(midway < total, "killed midway: {midway} of {total}");
    // The service reads a half-encrypted log as it read the clear one.
    assert_eq!(load_all().await, before);

    let out = command()
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(sealed().await, total, "every event sealed");
    let rows: Vec<(String, i64, Value)> = sqlx::query_as(
        "SELECT aggregate_id, sequence, payload FROM events ORDER BY aggregate_id, sequence",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let index: std::collections::HashMap<&String, usize> =
        ids.iter().enumerate().map(|(i, id)| (id, i)).collect();
    let mut conn = pool.acquire().await.unwrap();
    let keys = projections::pii::keys(&mut conn, "contact", &ids)
        .await
        .unwrap();
    for (id, sequence, payload) in rows {
        let text = payload.to_string();
        assert!(!text.contains("example.org"), "{text}");
        // Opened once, it is the original: sealed exactly once.
        let opened = projections::pii::open_event(&keys, "contact", &id, payload).unwrap();
        assert_eq!(opened, clear_event(index[&id], sequence));
    }
    assert_eq!(load_all().await, before, "every aggregate loads as before");
    drop(conn);
    pool.close().await;
    harness().drop_database(database);
}

#[tokio::test]
async fn serve_refuses_to_start_with_a_key_that_cannot_open_the_contact_keys() {
    let app = spawn_app().await;
    let created = app
        .post("/v1/contacts", &json!({"email": "keyed@example.org"}))
        .await;
    assert_eq!(created.status().as_u16(), 201);
    let url = harness().url(&app.database);
    let (_keep, data) = crate::lifecycle::data_dir();
    let wrong = "d3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmctd3I=";
    let mut child = crate::lifecycle::leadledger(&data)
        .env("DATABASE_URL", &url)
        .env("LEADLEDGER_SECRET_KEY", wrong)
        .args(["serve", "--addr", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("serve kept running with a key that opens nothing");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(
        stderr.contains("cannot be opened with the configured secret key"),
        "{stderr}"
    );
    // With the right key it serves.
    let mut right = crate::lifecycle::leadledger(&data);
    right
        .env("DATABASE_URL", &url)
        .env("LEADLEDGER_SECRET_KEY", crate::helpers::TEST_SECRET_KEY);
    let server = crate::lifecycle::serve(right);
    assert!(server.address.starts_with("http://127.0.0.1:"));
}

#[tokio::test]
async fn the_feed_opens_a_contacts_personal_data_only_for_readers_of_it() {
    let app = spawn_app().await;
    let email = "feed.reader@example.org";
    let created = app
        .post(
            "/v1/contacts",
            &json!({"email": email, "first_name": "Ottilie"}),
        )
        .await;
    assert_eq!(created.status().as_u16(), 201);
    let created: Value = created.json().await.unwrap();
    // Once a projection has applied it, the feed delivers it to every reader.
    wait_for_projections(&app, created["position"].as_str().unwrap()).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let start = projections::Position::default();
    let contact_event = |events: Vec<projections::FeedEvent>| {
        events
            .into_iter()
            .find(|e| e.aggregate_type == "contact" && e.event_type == "ContactCreated")
            .expect("the contact's first event is in the feed")
            .payload
            .to_string()
    };
    let opened = projections::feed::read_opening(&mut conn, start, 100, &|_, _| true)
        .await
        .unwrap();
    let opened = contact_event(opened);
    assert!(
        opened.contains(email) && opened.contains("Ottilie"),
        "{opened}"
    );
    // A group whose projections read no contact data (the reactors, but for consent).
    let as_stored = projections::feed::read_opening(&mut conn, start, 100, &|_, event| {
        event == "ConsentRecorded"
    })
    .await
    .unwrap();
    let as_stored = contact_event(as_stored);
    assert!(
        !as_stored.contains(email) && !as_stored.contains("Ottilie"),
        "delivered sealed: {as_stored}"
    );
    assert!(
        as_stored.contains("created_at"),
        "clear members stay: {as_stored}"
    );
}

#[tokio::test]
async fn sealing_clear_replies_at_start_locks_and_rewrites_only_the_replies_in_the_clear() {
    use projections::pii::{is_sealed_record, open_record, seal_record};

    let (database, pool) = app_database().await;
    let scope = uuid::Uuid::new_v4();
    let aad = |key: &str| leadledger::app::command::record_aad(scope, key);
    let reply = |i: usize| format!(r#"{{"id":"reply {i}"}}"#).into_bytes();
    // 300 replies sealed (as this release writes them), 5 in the clear (as an earlier
    // release did) and one not answered yet.
    let mut keys = Vec::new();
    let mut bodies = Vec::new();
    let mut statuses = Vec::new();
    for i in 0..306 {
        let key = format!("key-{i}");
        bodies.push(match i {
            0..300 => seal_record(&aad(&key), &reply(i)),
            _ => reply(i),
        });
        statuses.push((i < 305).then_some(201i16));
        keys.push(key);
    }
    sqlx::query(
        "INSERT INTO idempotency_records
             (api_key_id, idempotency_key, request_hash, response_status, response_body,
              response_headers)
         SELECT $1, u.key, '\\x00', u.status, u.body, '{}'
         FROM UNNEST($2::text[], $3::int2[], $4::bytea[]) AS u(key, status, body)",
    )
    .bind(scope)
    .bind(&keys)
    .bind(&statuses)
    .bind(&bodies)
    .execute(&pool)
    .await
    .unwrap();

    let done = leadledger::app::privacy::encrypt_plaintext(&pool, 2, &|_| {})
        .await
        .unwrap();
    assert_eq!(done.records, 5, "{done:?}");

    let rows: Vec<(String, Vec<u8>, String)> = sqlx::query_as(
        "SELECT idempotency_key, response_body, xmax::text FROM idempotency_records",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 306);
    for (key, body, xmax) in rows {
        let i: usize = key["key-".len()..].parse().unwrap();
        // A row locked keeps its locker in `xmax` (and cost a WAL record).
        let untouched = |xmax: &str| assert_eq!(xmax, "0", "{key} was locked");
        match i {
            0..300 => {
                untouched(&xmax);
                assert_eq!(body, bodies[i], "{key} left as it was");
            }
            300..305 => {
                assert!(is_sealed_record(&body), "{key} sealed");
                assert_eq!(open_record(&aad(&key), &body).unwrap(), reply(i));
            }
            _ => {
                untouched(&xmax);
                assert_eq!(body, reply(i), "{key}, not answered yet, left alone");
            }
        }
    }
    pool.close().await;
    harness().drop_database(database);
}

/// Inserts `payloads` as a contact's events in the clear, as an earlier release stored them,
/// through `db` (a pool, or a transaction of the caller's).
async fn insert_clear_events<'a>(
    db: impl sqlx::Acquire<'a, Database = sqlx::Postgres>,
    id: &str,
    payloads: &[Value],
) {
    let mut conn = db.acquire().await.unwrap();
    for (i, payload) in payloads.iter().enumerate() {
        let kind = payload.as_object().unwrap().keys().next().unwrap().clone();
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload)
             VALUES ('contact', $1, $2, $3, '1.0', $4)",
        )
        .bind(id)
        .bind(i as i64 + 1)
        .bind(kind)
        .bind(payload)
        .execute(&mut *conn)
        .await
        .unwrap();
    }
}

/// A clear contact whose data holds the text `"pii"` (the sealed member's name) as a value.
fn clear_event_mentioning_pii() -> Value {
    json!({"ContactCreated": {
        "email": "legacy-pii@example.org",
        "fields": {"first_name": "pii", "phone": "+1 555 0199"},
        "created_at": "2026-01-01T00:00:00Z"}})
}

#[tokio::test]
async fn encrypting_seals_clear_events_by_their_members_and_locks_no_event_it_leaves() {
    let (database, pool) = app_database().await;
    let (mentioning, plain) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    // Personal data in the clear whose text mentions "pii"; and a contact whose second
    // event holds nothing personal (a status, its basis and a time).
    insert_clear_events(&pool, &mentioning, &[clear_event_mentioning_pii()]).await;
    let nothing_personal = json!({"ConsentRecorded": {
        "status": "granted", "basis": "consent", "recorded_at": "2026-01-02T00:00:00Z"}});
    insert_clear_events(
        &pool,
        &plain,
        &[clear_event(1, 1), nothing_personal.clone()],
    )
    .await;

    let done = leadledger::app::privacy::encrypt_plaintext(&pool, 10, &|_| {})
        .await
        .unwrap();
    assert_eq!((done.events, done.redacted), (2, 0), "{done:?}");

    let rows: Vec<(String, i64, Value, String)> = sqlx::query_as(
        "SELECT aggregate_id, sequence, payload, xmax::text FROM events ORDER BY position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let keys = projections::pii::keys(&mut conn, "contact", &[mentioning.clone(), plain.clone()])
        .await
        .unwrap();
    for (id, sequence, payload, xmax) in rows {
        let text = payload.to_string();
        let original = match (id == mentioning, sequence) {
            (true, _) => clear_event_mentioning_pii(),
            (false, 1) => clear_event(1, 1),
            _ => {
                // Read past: neither rewritten nor locked (a lock leaves its locker in `xmax`).
                assert_eq!(payload, nothing_personal);
                assert_eq!(xmax, "0", "an event with nothing personal was locked");
                continue;
            }
        };
        assert!(!text.contains("example.org"), "{text}");
        // The phone as written (its spaces are never in base64: no sealed text holds it by
        // chance, as it may hold "555").
        assert!(!text.contains("+1 555 01"), "{text}");
        let opened = projections::pii::open_event(&keys, "contact", &id, payload).unwrap();
        assert_eq!(opened, original);
    }
    drop(conn);
    pool.close().await;
    harness().drop_database(database);
}

#[tokio::test]
async fn an_erasure_finds_the_replies_naming_the_person_by_whom_they_name_and_opens_the_others_of_an_earlier_release_only()
 {
    use projections::pii::{open_record, reply_names, seal_record};
    let app = spawn_app().await;
    let email = "erin.ostrander@example.org";
    let id = app
        .create_contact(&json!({"email": email, "first_name": "Erin"}))
        .await;
    let scope = uuid::Uuid::new_v4();
    let naming_by_email = json!({"errors": [{"row": 1, "email": "Erin.Ostrander@Example.ORG"}]});
    let someone_else = json!({"errors": [{"row": 1, "email": "someone@example.org"}]});
    // (key, reply, the subjects stored with it: `None` as an earlier release wrote it)
    let records = [
        (
            "by-email",
            naming_by_email.clone(),
            Some(reply_names(naming_by_email.to_string().as_bytes())),
        ),
        ("earlier-release", json!({"id": id, "email": email}), None),
        (
            "someone-else",
            someone_else.clone(),
            Some(reply_names(someone_else.to_string().as_bytes())),
        ),
        // Said to name no one: an erasure does not open it.
        ("said-to-name-no-one", json!({"id": id}), Some(vec![])),
    ];
    for (key, reply, subjects) in &records {
        let aad = leadledger::app::command::record_aad(scope, key);
        sqlx::query(
            "INSERT INTO idempotency_records
                 (api_key_id, idempotency_key, request_hash, response_status, response_body,
                  subjects)
             VALUES ($1, $2, '\\x00', 200, $3, $4)",
        )
        .bind(scope)
        .bind(key)
        .bind(seal_record(&aad, reply.to_string().as_bytes()))
        .bind(subjects)
        .execute(&app.pool)
        .await
        .unwrap();
    }

    let erased = delete(&app, &format!("/v1/contacts/{id}")).await;
    assert_eq!(erased.status().as_u16(), 200);
    for (key, reply, _) in &records {
        let body: Vec<u8> = sqlx::query_scalar(
            "SELECT response_body FROM idempotency_records
             WHERE api_key_id = $1 AND idempotency_key = $2",
        )
        .bind(scope)
        .bind(key)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        let aad = leadledger::app::command::record_aad(scope, key);
        let now: Value = serde_json::from_slice(&open_record(&aad, &body).unwrap()).unwrap();
        let redacted = now.get("redacted").is_some();
        match *key {
            "by-email" | "earlier-release" => assert!(redacted, "{key}: {now}"),
            _ => assert_eq!(&now, reply, "{key} left as it was"),
        }
    }
}

/// Whether the one event of contact `id` is still in the clear.
async fn still_clear(pool: &sqlx::PgPool, id: &str) -> bool {
    let payload: Value = sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_type = 'contact' AND aggregate_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap();
    projections::pii::is_clear_personal("contact", &payload)
}

#[tokio::test]
async fn each_sealing_pass_reads_only_the_events_of_transactions_from_the_oldest_running_at_the_last_ones_start()
 {
    use leadledger::app::privacy::encrypt_plaintext;
    let (database, pool) = app_database().await;
    let id = || uuid::Uuid::new_v4().to_string();
    let (first, during, below, after) = (id(), id(), id(), id());
    insert_clear_events(&pool, &first, &[clear_event(1, 1)]).await;
    // Written by a transaction still running while the first pass runs to its end.
    let mut running = pool.begin().await.unwrap();
    insert_clear_events(&mut *running, &during, &[clear_event(2, 1)]).await;

    let done = encrypt_plaintext(&pool, 10, &|_| {}).await.unwrap();
    assert_eq!(done.events, 1, "{done:?}");
    assert!(!still_clear(&pool, &first).await);
    running.commit().await.unwrap();

    // An event of a transaction below the mark the first pass left (as none can be in the
    // clear, short of writing it by hand), and one written after the pass.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                             event_version, payload, transaction_id)
         VALUES ('contact', $1, 1, 'ContactCreated', '1.0', $2, '3'::xid8)",
    )
    .bind(&below)
    .bind(clear_event(3, 1))
    .execute(&pool)
    .await
    .unwrap();
    insert_clear_events(&pool, &after, &[clear_event(4, 1)]).await;

    let done = encrypt_plaintext(&pool, 10, &|_| {}).await.unwrap();
    assert_eq!(done.events, 2, "{done:?}");
    assert!(
        !still_clear(&pool, &during).await,
        "the running transaction's event is read by the next pass"
    );
    assert!(!still_clear(&pool, &after).await);
    assert!(
        still_clear(&pool, &below).await,
        "an event below the mark is not read again"
    );
    pool.close().await;
    harness().drop_database(database);
}

#[tokio::test]
async fn an_erasure_meeting_the_sealing_pass_on_one_contact_waits_for_it_without_a_deadlock() {
    let app = spawn_app_with(false).await;
    let id = uuid::Uuid::new_v4().to_string();
    insert_clear_events(&app.pool, &id, &[clear_event_mentioning_pii()]).await;
    // Another transaction takes the rows as the start-up pass that seals clear events
    // does: the clear event, then (while the erasure waits for that event) the contact's
    // new data key. The erasure takes them in the same order, so it holds no key the
    // other could wait for: the key goes in at once, well before PostgreSQL would look
    // for a deadlock (after a second).
    let mut other = app.pool.begin().await.unwrap();
    lock_events(&mut other, &id).await.unwrap();
    let path = format!("/v1/contacts/{id}");
    let erasing = delete(&app, &path);
    let sealing = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        sqlx::query("SET LOCAL lock_timeout = '500ms'")
            .execute(&mut *other)
            .await
            .unwrap();
        let made = make_key(&mut other, &id).await;
        other.commit().await.unwrap();
        made
    };
    let (erased, made) = tokio::join!(erasing, sealing);
    made.expect("the key went in without waiting for the erasure");
    assert_eq!(erased.status().as_u16(), 200, "{:?}", erased.text().await);
    assert_clear_event_stripped(&app, &id).await;
    let destroyed: bool = sqlx::query_scalar(
        "SELECT bool_and(wrapped_key IS NULL AND destroyed_at IS NOT NULL)
         FROM contact_keys WHERE contact_id = $1",
    )
    .bind(&id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(destroyed, "the key the other transaction made is destroyed");
}

#[tokio::test]
async fn an_erasure_ended_by_a_deadlock_runs_again_and_erases() {
    let app = spawn_app_with(false).await;
    let id = uuid::Uuid::new_v4().to_string();
    insert_clear_events(&app.pool, &id, &[clear_event_mentioning_pii()]).await;
    // Another transaction makes the contact's data key and then, once the erasure has
    // stripped the clear event and waits for that key, asks for the event: each waits for
    // the other, and PostgreSQL ends the erasure, which waited first.
    let mut other = app.pool.begin().await.unwrap();
    make_key(&mut other, &id).await.unwrap();
    let path = format!("/v1/contacts/{id}");
    let erasing = delete(&app, &path);
    let locking = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let locked = lock_events(&mut other, &id).await;
        other.rollback().await.unwrap();
        locked
    };
    let (erased, locked) = tokio::join!(erasing, locking);
    locked.expect("the other transaction went on once the erasure was ended");
    assert_eq!(erased.status().as_u16(), 200, "{:?}", erased.text().await);
    assert_clear_event_stripped(&app, &id).await;
}

/// Locks the events of contact `id` on `conn`, as the start-up pass that seals clear
/// events does before sealing them.
async fn lock_events(conn: &mut sqlx::PgConnection, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1 FROM events WHERE aggregate_id = $1 FOR UPDATE")
        .bind(id)
        .execute(conn)
        .await
        .map(drop)
}

/// Makes a data key (of no use) for contact `id` on `conn`, as that pass makes a contact's
/// key to seal its events with.
async fn make_key(conn: &mut sqlx::PgConnection, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO contact_keys (contact_id, generation, wrapped_key) VALUES ($1, 0, '\\x00')",
    )
    .bind(id)
    .execute(conn)
    .await
    .map(drop)
}

/// The events of `id`, inserted in the clear by [`clear_event_mentioning_pii`], hold
/// nothing of the person.
async fn assert_clear_event_stripped(app: &TestApp, id: &str) {
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT payload::text FROM events WHERE aggregate_id = $1")
            .bind(id)
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert!(!stored.is_empty());
    for text in stored {
        assert!(!text.contains("legacy-pii@example.org"), "{text}");
        assert!(!text.contains("555 0199"), "{text}");
    }
}

#[tokio::test]
async fn erasing_a_contact_stored_in_the_clear_strips_every_event_even_one_mentioning_pii() {
    let app = spawn_app().await;
    let id = uuid::Uuid::new_v4().to_string();
    insert_clear_events(&app.pool, &id, &[clear_event_mentioning_pii()]).await;

    let erased = delete(&app, &format!("/v1/contacts/{id}")).await;
    assert_eq!(erased.status().as_u16(), 200, "{:?}", erased.text().await);
    assert_clear_event_stripped(&app, &id).await;
}

/// Creates a contact with an idempotency key, so that its reply is recorded; returns its id.
async fn create_recorded(app: &TestApp, email: &str) -> String {
    app.create_contact_recorded(&json!({"email": email}), &format!("create-{email}"))
        .await
}

#[tokio::test]
async fn the_names_a_command_stores_with_its_reply_wait_in_the_index_pending_list_until_merged_and_are_found_there()
 {
    use leadledger::app::privacy::merge_reply_names;
    // No workers: nothing merges but this test.
    let app = spawn_app_with(false).await;
    let id = create_recorded(&app, "pending.pia@example.org").await;
    for n in 0..4 {
        create_recorded(&app, &format!("pending.{n}@example.org")).await;
    }
    // The batches' writes appended the names to the pending list instead of the index.
    let merged = merge_reply_names(&app.pool).await.expect("merged");
    assert!(merged > 0, "nothing was pending: {merged} pages");
    assert_eq!(merge_reply_names(&app.pool).await.expect("merged"), 0);

    // A name still pending is found by an erasure as a merged one is.
    let again = create_recorded(&app, "pending.again@example.org").await;
    for erased in [&id, &again] {
        let response = delete(&app, &format!("/v1/contacts/{erased}")).await;
        assert_eq!(
            response.status().as_u16(),
            200,
            "{:?}",
            response.text().await
        );
        let named: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM idempotency_records WHERE $1::uuid = ANY(subjects)",
        )
        .bind(uuid::Uuid::parse_str(erased).unwrap())
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(named, 0, "a reply naming an erased contact is still there");
    }
}

#[tokio::test]
async fn every_server_process_merges_the_pending_names_of_stored_replies_within_seconds() {
    use leadledger::app::privacy::{MERGE_REPLY_NAMES_EVERY, merge_reply_names};
    let app = spawn_app().await;
    for n in 0..5 {
        create_recorded(&app, &format!("merged.{n}@example.org")).await;
    }
    // A merge comes at most one interval after the writes; the rest is room for a busy
    // machine.
    tokio::time::sleep(MERGE_REPLY_NAMES_EVERY * 5).await;
    assert_eq!(
        merge_reply_names(&app.pool).await.expect("merged"),
        0,
        "the workers left names pending"
    );
}
