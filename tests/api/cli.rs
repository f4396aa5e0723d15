//! The command line in scripts: quiet and colourless unless asked, plain error messages,
//! honest `--help`, imports of any size, and reports whose CSV a spreadsheet can sort.

use std::process::Output;

use serde_json::json;

use crate::helpers::{harness, spawn_app};
use crate::lifecycle::{data_dir, leadledger};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn commands_other_than_serve_are_quiet_without_colour_unless_asked() {
    let harness = harness();
    let database = harness.fresh_database().await;
    let url = harness.url(&database);
    let run = |args: &[&str]| {
        let mut cmd = leadledger(&data_dir().1);
        cmd.env("DATABASE_URL", &url)
            .env_remove("RUST_LOG")
            .args(args);
        cmd.output().unwrap()
    };
    let out = run(&["keys", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "no log lines by default");
    let verbose = run(&["-v", "keys", "list"]);
    assert!(verbose.status.success(), "{}", stderr(&verbose));
    let log = stderr(&verbose);
    assert!(log.contains("INFO"), "-v shows info lines: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "no colour codes when stderr is not a terminal: {log:?}"
    );
    harness.drop_database(database);
}

#[tokio::test]
async fn a_user_error_prints_its_message_and_never_a_backtrace() {
    let harness = harness();
    let database = harness.fresh_database().await;
    let url = harness.url(&database);
    let add = || {
        let mut cmd = leadledger(&data_dir().1);
        cmd.env("DATABASE_URL", &url)
            .env_remove("RUST_LOG")
            .env("RUST_BACKTRACE", "1")
            .args(["webhooks", "add-source", "esp"]);
        cmd.output().unwrap()
    };
    assert!(add().status.success());
    let again = add();
    assert!(!again.status.success());
    let err = stderr(&again);
    assert!(
        err.contains("a webhook source with this name exists"),
        "{err}"
    );
    assert!(!err.contains("Stack backtrace"), "{err}");
    assert!(!err.contains("backtrace"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let bad_flag = leadledger(&data_dir().1)
        .env("RUST_BACKTRACE", "1")
        .args(["analytics", "costs", "--days", "0"])
        .output()
        .unwrap();
    assert_eq!(bad_flag.status.code(), Some(2));
    assert!(!stderr(&bad_flag).contains("backtrace"));
    harness.drop_database(database);
}

#[test]
fn help_shows_environment_variables_without_pretending_they_are_set_to_empty() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leadledger"))
        .env_remove("LEADLEDGER_DATA_DIR")
        .env_remove("DATABASE_URL")
        .arg("--help")
        .output()
        .unwrap();
    let help = stdout(&out);
    assert!(help.contains("LEADLEDGER_DATA_DIR"), "{help}");
    assert!(!help.contains("="), "no `[env: X=]`: {help}");
}

#[tokio::test]
async fn the_command_line_imports_more_than_10000_rows_in_batches_with_one_report() {
    let harness = harness();
    let database = harness.fresh_database().await;
    let url = harness.url(&database);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.csv");
    let mut csv = String::from("email,company\n");
    for i in 0..10_005 {
        csv.push_str(&format!("p{i}@example.com,Co {i}\n"));
    }
    csv.push_str("not-an-email,Bad\n");
    std::fs::write(&file, csv).unwrap();
    let out = leadledger(&data_dir().1)
        .env("DATABASE_URL", &url)
        .args(["contacts", "import"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(
        printed.contains("received 10006  created 10005  updated 0  unchanged 0  failed 1"),
        "{printed}"
    );
    assert!(printed.contains("row  10006  not-an-email"), "{printed}");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let contacts: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT aggregate_id) FROM events WHERE aggregate_type = 'contact'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(contacts, 10_005);
    // All or nothing cannot span batches: an atomic import that large is refused, clearly.
    let atomic = leadledger(&data_dir().1)
        .env("DATABASE_URL", &url)
        .args(["contacts", "import", "--mode", "atomic"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!atomic.status.success());
    assert!(stderr(&atomic).contains("10000"), "{}", stderr(&atomic));
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let before = contacts;
    assert_eq!(after, before, "nothing written by the refused import");
    pool.close().await;
    harness.drop_database(database);
}

#[tokio::test]
async fn the_dashboard_csv_has_dates_and_campaigns_in_columns() {
    let app = spawn_app().await;
    let campaign = app.create_campaign("Spring, \"launch\"").await;
    let id = campaign["id"].as_str().unwrap().to_string();
    app.post(&format!("/v1/campaigns/{id}/start"), &json!({}))
        .await;
    let contact: serde_json::Value = app
        .post("/v1/contacts", &json!({"email": "x@example.com"}))
        .await
        .json()
        .await
        .unwrap();
    let enrolled = app
        .post(
            &format!("/v1/campaigns/{id}/enrollments"),
            &json!({"contact_ids": [contact["id"]]}),
        )
        .await;
    let enrolled: serde_json::Value = enrolled.json().await.unwrap();
    assert_eq!(
        enrolled["enrolled"].as_array().map(Vec::len),
        Some(1),
        "{enrolled}"
    );
    let source = crate::webhooks::source(&app, "esp").await;
    let now = chrono::Utc::now().to_rfc3339();
    let delivered = crate::webhooks::deliver(
        &app.address,
        &source,
        "m1",
        &json!([crate::webhooks::event(
            "e1",
            "replied",
            &id,
            "x@example.com",
            &now
        )]),
    )
    .await;
    assert_eq!(delivered["results"][0]["outcome"], "applied", "{delivered}");
    // On the blocking pool: the server runs on this test's runtime, and its projection
    // runner must keep going while the command waits for the read models.
    let mut cmd = leadledger(&data_dir().1);
    cmd.env("DATABASE_URL", harness().url(&app.database)).args([
        "analytics",
        "dashboard",
        "--format",
        "csv",
    ]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("catching up"), "{}", stderr(&out));
    let text = stdout(&out);
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_string)
        .collect();
    for column in [
        "metric",
        "value",
        "from",
        "to",
        "rank",
        "campaign_id",
        "name",
        "status",
        "delivered",
        "replied",
        "reply_rate",
    ] {
        assert!(
            headers.contains(&column.to_string()),
            "{column} in {headers:?}"
        );
    }
    let rows: Vec<std::collections::HashMap<String, String>> =
        reader.deserialize().map(Result::unwrap).collect();
    let month = chrono::Utc::now().date_naive();
    let spend = rows
        .iter()
        .find(|r| r["metric"] == "spend_this_month")
        .expect("spend row");
    assert_eq!(spend["value"], "0.00");
    assert_eq!(spend["to"], month.to_string());
    assert!(!spend["metric"].contains(' '), "no dates inside the key");
    let top = rows
        .iter()
        .find(|r| r["metric"] == "top_campaign")
        .expect("top campaign row");
    assert_eq!(top["rank"], "1");
    assert_eq!(top["campaign_id"], id);
    assert_eq!(top["name"], "Spring, \"launch\"");
    assert_eq!(top["reply_rate"], "100");
    assert_eq!(top["delivered"], "1");
    let contacts = rows.iter().find(|r| r["metric"] == "contacts").unwrap();
    assert_eq!(contacts["value"], "1");
}

#[tokio::test]
async fn add_source_makes_each_kind_and_prints_only_what_the_server_made() {
    let harness = harness();
    let database = harness.fresh_database().await;
    let url = harness.url(&database);
    let dir = data_dir();
    let run = |args: &[&str]| {
        let mut cmd = leadledger(&dir.1);
        cmd.env("DATABASE_URL", &url)
            .env_remove("RUST_LOG")
            .args(args);
        cmd.output().unwrap()
    };
    let last_line = |out: &Output| {
        stdout(out)
            .trim()
            .lines()
            .last()
            .unwrap_or_default()
            .to_string()
    };
    let postmark = run(&["webhooks", "add-source", "pm", "--kind", "postmark"]);
    assert!(postmark.status.success(), "{}", stderr(&postmark));
    let credentials = last_line(&postmark);
    assert!(
        credentials.starts_with("postmark-") && credentials.contains(':'),
        "user:password on the last line: {credentials}"
    );
    let token = run(&["webhooks", "add-source", "inst", "--kind", "instantly"]);
    assert!(last_line(&token).starts_with("llt_"), "{}", stdout(&token));
    let mailgun = run(&[
        "webhooks",
        "add-source",
        "mg",
        "--kind",
        "mailgun",
        "--signing-key",
        "key-abc123",
    ]);
    assert!(mailgun.status.success(), "{}", stderr(&mailgun));
    assert!(
        !stdout(&mailgun).contains("key-abc123"),
        "a given key is not shown back"
    );
    let mapping = dir.0.path().join("mapping.json");
    std::fs::write(
        &mapping,
        json!({"id": "/id", "type": "/t", "email": "/e", "occurred_at": "/at",
               "campaign": "/c", "types": {"x": "sent"}})
        .to_string(),
    )
    .unwrap();
    let custom = run(&[
        "webhooks",
        "add-source",
        "crm",
        "--kind",
        "custom",
        "--mapping",
        mapping.to_str().unwrap(),
    ]);
    assert!(custom.status.success(), "{}", stderr(&custom));
    // Refusals: one line naming the field, nothing made.
    for args in [
        &["webhooks", "add-source", "sg", "--kind", "sendgrid"][..],
        &["webhooks", "add-source", "x", "--kind", "nope"][..],
        &[
            "webhooks",
            "add-source",
            "pm2",
            "--kind",
            "postmark",
            "--public-key",
            "k",
        ][..],
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    }
    assert!(
        stderr(&run(&[
            "webhooks",
            "add-source",
            "sg",
            "--kind",
            "sendgrid"
        ]))
        .contains("public_key")
    );
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM webhook_sources ORDER BY name")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(kinds, ["custom", "instantly", "mailgun", "postmark"]);
    pool.close().await;
    harness.drop_database(database);
}
