//! `leadledger backup` and `leadledger restore`: a backup taken while writes go on restores
//! to exactly the log its snapshot held, the restored service answers the same reads and
//! its read models verify against a rebuild; restores never write over existing data.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::helpers::{TEST_SECRET_KEY, TestApp, harness, spawn_app};
use crate::lifecycle::{data_dir, db_url, leadledger, serve};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the binary on `url`'s database off the async runtime.
async fn run_on(url: &str, args: &[&str]) -> Output {
    let (_parent, data) = data_dir();
    let mut cmd = leadledger(&data);
    cmd.env("DATABASE_URL", url)
        .env("LEADLEDGER_SECRET_KEY", TEST_SECRET_KEY)
        .env_remove("RUST_LOG")
        .args(args);
    tokio::task::spawn_blocking(move || {
        let out = cmd.output().unwrap();
        drop(_parent);
        out
    })
    .await
    .unwrap()
}

async fn upsert(app: &TestApp, email: &str) -> bool {
    app.post(
        "/v1/contacts",
        &json!({"email": email, "first_name": "Backup"}),
    )
    .await
    .status()
    .is_success()
}

/// Each stored event as text, by position.
async fn events(conn: &mut PgConnection) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT position, aggregate_type || '/' || aggregate_id || '/' || sequence || '/' \
         || event_type || '/' || payload::text FROM events ORDER BY position",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_during_writes_restores_to_the_log_of_its_snapshot_and_verifies() {
    let harness = harness();
    let app = spawn_app().await;
    for i in 0..20 {
        assert!(upsert(&app, &format!("before-{i}@example.com")).await);
    }
    let app = Arc::new(app);
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3 {
        let (app, stop) = (app.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = 0;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                if upsert(&app, &format!("during-{w}-{i}@example.com")).await {
                    acked += 1;
                }
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let backups = tempfile::tempdir().unwrap();
    let dest = backups.path().join("b1");
    let source_url = harness.url(&app.database);
    let out = run_on(&source_url, &["backup", dest.to_str().unwrap()]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = 0;
    for w in writers {
        acked += w.await.unwrap();
    }
    assert!(out.status.success(), "backup: {}", text(&out.stderr));
    assert!(acked > 0, "writes went on during the backup");
    assert!(
        text(&out.stderr).contains("the secret key is not in this backup"),
        "a backup without the key says so: {}",
        text(&out.stderr)
    );
    assert!(!dest.join("secret.key").exists());
    let manifest = manifest(&dest);
    let in_backup = manifest["events"].as_i64().unwrap();

    let mut source = PgConnection::connect_with(&harness.options(&app.database))
        .await
        .unwrap();
    let source_events = events(&mut source).await;
    assert!(in_backup >= 20, "the writes before the backup are in it");
    assert!(
        (source_events.len() as i64) > in_backup,
        "writes after the snapshot are not in the backup ({} now, {in_backup} in it)",
        source_events.len()
    );

    let target = harness.empty_database().await;
    let target_url = harness.url(&target);
    let out = run_on(&target_url, &["restore", dest.to_str().unwrap()]).await;
    assert!(out.status.success(), "restore: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("restored {in_backup} events")),
        "{}",
        text(&out.stdout)
    );
    let mut restored = PgConnection::connect_with(&harness.options(&target))
        .await
        .unwrap();
    let restored_events = events(&mut restored).await;
    assert_eq!(restored_events.len() as i64, in_backup);
    // Every restored event is the source's event at that position, unchanged.
    let by_position: std::collections::HashMap<i64, &String> =
        source_events.iter().map(|(p, e)| (*p, e)).collect();
    for (position, event) in &restored_events {
        assert_eq!(
            by_position.get(position),
            Some(&event),
            "event at {position}"
        );
    }

    let verify = run_on(
        &target_url,
        &["projections", "rebuild", "--all", "--verify"],
    )
    .await;
    assert!(
        verify.status.success(),
        "verify after restore: {}{}",
        text(&verify.stdout),
        text(&verify.stderr)
    );

    // The restored service starts and answers the reads the source answered for it.
    let (_parent, data) = data_dir();
    let mut cmd = leadledger(&data);
    cmd.env("DATABASE_URL", &target_url)
        .env("LEADLEDGER_SECRET_KEY", TEST_SECRET_KEY);
    let server = tokio::task::spawn_blocking(move || serve(cmd))
        .await
        .unwrap();
    // The restored read models stand where the verifying rebuild left them, which may be
    // short of the last restored event (the feed it read ends where every older transaction
    // of the cluster has ended): read them once they include it.
    let head = projections::feed::head(&mut restored)
        .await
        .unwrap()
        .expect("events were restored");
    let client = reqwest::Client::new();
    let page: Value = client
        .get(format!(
            "{}/v1/contacts?limit=500&min_position={head}",
            server.address
        ))
        .bearer_auth(&app.read_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = page["items"].as_array().unwrap();
    let streams: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT aggregate_id) FROM events WHERE aggregate_type = 'contact'",
    )
    .fetch_one(&mut restored)
    .await
    .unwrap();
    assert_eq!(
        items.len() as i64,
        streams,
        "one list item per restored contact"
    );
    for item in items.iter().take(25) {
        let id = item["id"].as_str().unwrap();
        let there: Value = app
            .read(&format!("/v1/contacts/{id}"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(item["email"], there["email"]);
    }
    drop(server);
    let _ = restored.close().await;
    let _ = source.close().await;
    harness.drop_database(target);
}

#[tokio::test]
async fn a_restore_never_writes_over_a_database_or_a_data_directory_in_use() {
    let harness = harness();
    let app = spawn_app().await;
    assert!(upsert(&app, "kept@example.com").await);
    let backups = tempfile::tempdir().unwrap();
    let dest = backups.path().join("b");
    let url = harness.url(&app.database);
    let out = run_on(&url, &["backup", dest.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Into the same, non-empty database: refused, nothing changed.
    let before = app.count("events").await;
    let out = run_on(&url, &["restore", dest.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not empty"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(app.count("events").await, before);

    // Into a directory that is not empty: the backup is refused too.
    let again = run_on(&url, &["backup", dest.to_str().unwrap()]).await;
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("not empty"),
        "{}",
        text(&again.stderr)
    );

    // Not a backup at all.
    let empty = tempfile::tempdir().unwrap();
    let target = harness.empty_database().await;
    let out = run_on(
        &harness.url(&target),
        &["restore", empty.path().to_str().unwrap()],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("manifest"),
        "{}",
        text(&out.stderr)
    );
    harness.drop_database(target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_backup_with_its_key_restores_into_a_new_data_directory_that_serves_on() {
    // The source: a served data directory with a contact and a webhook source.
    let (_parent_a, a) = data_dir();
    let cmd = leadledger(&a);
    let server = tokio::task::spawn_blocking(move || serve(cmd))
        .await
        .unwrap();
    let key = std::fs::read_to_string(a.join("admin.key")).unwrap();
    let key = key.trim().to_string();
    let client = reqwest::Client::new();
    for i in 0..5 {
        let r = client
            .post(format!("{}/v1/contacts", server.address))
            .bearer_auth(&key)
            .json(&json!({"email": format!("emb-{i}@example.com")}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let backups = tempfile::tempdir().unwrap();
    let dest = backups.path().join("b");
    let (a2, dest2) = (a.clone(), dest.clone());
    let out = tokio::task::spawn_blocking(move || {
        leadledger(&a2)
            .args(["backup", "--include-secret-key", dest2.to_str().unwrap()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "backup: {}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("not in this backup"));
    assert_eq!(
        std::fs::read_to_string(dest.join("secret.key"))
            .unwrap()
            .trim(),
        std::fs::read_to_string(a.join("secret.key"))
            .unwrap()
            .trim()
    );
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait().success());
    let manifest = manifest(&dest);

    // Restored into a new data directory.
    let (_parent_b, b) = data_dir();
    let (b2, dest2) = (b.clone(), dest.clone());
    let out = tokio::task::spawn_blocking(move || {
        leadledger(&b2)
            .args(["restore", dest2.to_str().unwrap()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "restore: {}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(b.join("secret.key"))
            .unwrap()
            .trim(),
        std::fs::read_to_string(a.join("secret.key"))
            .unwrap()
            .trim()
    );
    let cmd = leadledger(&b);
    let server = tokio::task::spawn_blocking(move || serve(cmd))
        .await
        .unwrap();
    // Its transaction counter is past the backup's, so new events follow the restored
    // ones in the feed.
    let b2 = b.clone();
    let url = tokio::task::spawn_blocking(move || db_url(&b2))
        .await
        .unwrap();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let next: String = sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
    assert!(next.parse::<u64>().unwrap() >= manifest["next_transaction_id"].as_u64().unwrap());

    let written: Value = client
        .post(format!("{}/v1/contacts", server.address))
        .bearer_auth(&key)
        .json(&json!({"email": "after-restore@example.com"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let position = written["position"].as_str().unwrap();
    let page: Value = client
        .get(format!(
            "{}/v1/contacts?limit=50&min_position={position}",
            server.address
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let emails: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails.len(), 6, "{emails:?}");
    assert!(emails.contains(&"after-restore@example.com"));
    assert!(emails.contains(&"emb-0@example.com"));
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait().success());

    let b2 = b.clone();
    let verify = tokio::task::spawn_blocking(move || {
        leadledger(&b2)
            .args(["projections", "rebuild", "--all", "--verify"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        text(&verify.stdout),
        text(&verify.stderr)
    );

    // A second restore into the same data directory is refused.
    let out = leadledger(&b)
        .args(["restore", dest.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("already holds a database"));
}
