//! Contacts: one contact per email under any concurrency, upserts, enrichment, search, and
//! imports whose reports tell exactly what was written.

use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, harness, spawn_app};

async fn contacts_in_db(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(DISTINCT aggregate_id) FROM events WHERE aggregate_type = 'contact'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

async fn import(app: &TestApp, mode: &str, content_type: &str, body: String) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/v1/contacts/import?mode={mode}")))
        .bearer_auth(&app.write_key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn fifty_concurrent_creates_of_one_address_in_mixed_case_make_one_contact() {
    let app = spawn_app().await;
    let requests = (0..50).map(|i| {
        let email = match i % 3 {
            0 => "Ada.Lovelace@Example.COM".to_string(),
            1 => "  ada.lovelace@example.com ".to_string(),
            _ => "ADA.LOVELACE@EXAMPLE.COM".to_string(),
        };
        let request = app
            .client
            .post(app.url("/v1/contacts"))
            .bearer_auth(&app.write_key)
            .json(&json!({"email": email, "first_name": "Ada"}));
        tokio::spawn(async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    });
    let results: Vec<(u16, Value)> = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(
        results.iter().all(|(s, _)| *s == 200 || *s == 201),
        "{results:?}"
    );
    assert_eq!(
        results.iter().filter(|(s, _)| *s == 201).count(),
        1,
        "exactly one 201"
    );
    assert!(results.iter().all(|(_, b)| b["id"] == results[0].1["id"]));
    assert!(
        results
            .iter()
            .all(|(s, b)| b["created"] == json!(*s == 201))
    );
    assert_eq!(contacts_in_db(&app).await, 1, "one stream");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(events, 1, "the other 49 changed nothing, so wrote nothing");
    assert_eq!(results[0].1["email"], "ada.lovelace@example.com");
}

#[tokio::test]
async fn a_known_email_updates_the_given_fields_and_keeps_the_others() {
    let app = spawn_app().await;
    let first = app
        .post("/v1/contacts", &json!({"email": "grace@example.com", "first_name": "Grace", "company": "Navy", "custom": {"tier": "a"}}))
        .await;
    assert_eq!(first.status().as_u16(), 201);
    assert!(first.headers().contains_key("location"));
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["created"], true);
    let second = app
        .post(
            "/v1/contacts",
            &json!({"email": "Grace@Example.com", "company": "Harvard"}),
        )
        .await;
    assert_eq!(second.status().as_u16(), 200);
    let second: Value = second.json().await.unwrap();
    assert_eq!(second["created"], false);
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["first_name"], "Grace", "left out: kept");
    assert_eq!(second["company"], "Harvard", "given: overwritten");
    assert_eq!(second["custom"]["tier"], "a");
    assert_eq!(second["version"], 2);
    let id = first["id"].as_str().unwrap();
    let read: Value = app
        .read(&format!("/v1/contacts/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(read["company"], "Harvard");
    assert!(read["enrichment"].is_null());
}

#[tokio::test]
async fn invalid_contacts_are_422_with_every_field_at_fault_and_write_nothing() {
    let app = spawn_app().await;
    let cases = [
        (json!({"email": "not an email"}), "email"),
        (json!({"email": ""}), "email"),
        (
            json!({"email": format!("{}@example.com", "a".repeat(250))}),
            "email",
        ),
        (
            json!({"email": "a@example.com", "first_name": "x".repeat(201)}),
            "first_name",
        ),
        (
            json!({"email": "a@example.com", "phone": "1".repeat(51)}),
            "phone",
        ),
        (
            json!({"email": "a@example.com", "linkedin_url": "javascript:alert(1)"}),
            "linkedin_url",
        ),
        (
            json!({"email": "a@example.com", "company_domain": "not a domain"}),
            "company_domain",
        ),
        (
            json!({"email": "a@example.com", "title": "bell\u{0007}"}),
            "title",
        ),
        (
            json!({"email": "a@example.com", "first_name": 42}),
            "first_name",
        ),
        (
            json!({"email": "a@example.com", "custom": {"k": 1}}),
            "custom.k",
        ),
        (
            json!({"email": "a@example.com", "favourite_colour": "red"}),
            "favourite_colour",
        ),
        (json!({"first_name": "No Email"}), "body"),
    ];
    for (body, field) in cases {
        let problem = assert_problem(app.post("/v1/contacts", &body).await, 422).await;
        let fields: Vec<&str> = problem["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert!(fields.contains(&field), "{body}: {fields:?}");
    }
    let both = assert_problem(
        app.post(
            "/v1/contacts",
            &json!({"email": "bad", "first_name": "y".repeat(300)}),
        )
        .await,
        422,
    )
    .await;
    assert_eq!(
        both["errors"].as_array().unwrap().len(),
        2,
        "every invalid field at once: {both}"
    );
    assert_eq!(app.count("events").await, 0);
}

#[tokio::test]
async fn text_with_quotes_semicolons_and_sql_is_stored_and_returned_exactly() {
    let app = spawn_app().await;
    let nasty = "O'Brien\"; DROP TABLE contacts_view; --";
    let created: Value = app
        .post("/v1/contacts", &json!({"email": "obrien@example.com", "last_name": nasty, "company": "Robert'); SELECT 1; --", "custom": {"note": "a;b'c\"d"}}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(created["last_name"], nasty);
    let token = created["position"].as_str().unwrap();
    let list: Value = app
        .read(&format!(
            "/v1/contacts?email=obrien@example.com&min_position={token}"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"][0]["last_name"], nasty);
    assert_eq!(list["items"][0]["company"], "Robert'); SELECT 1; --");
    assert_eq!(list["items"][0]["custom"]["note"], "a;b'c\"d");
}

#[tokio::test]
async fn contacts_are_found_by_email_and_by_text_and_paged() {
    let app = spawn_app().await;
    let mut token = String::new();
    for (email, name, company) in [
        ("linus@kernel.org", "Linus", "Linux Foundation"),
        ("ken@bell-labs.com", "Ken", "Bell Labs"),
        ("dennis@bell-labs.com", "Dennis", "Bell Labs"),
        ("pct@example.com", "100%_sure", "Wild_Cards"),
    ] {
        let c: Value = app
            .post(
                "/v1/contacts",
                &json!({"email": email, "first_name": name, "company": company}),
            )
            .await
            .json()
            .await
            .unwrap();
        token = c["position"].as_str().unwrap().to_string();
    }
    let q = |query: &str| {
        let path = format!("/v1/contacts?{query}&min_position={token}");
        let app = &app;
        async move {
            let page: Value = app.read(&path).await.json().await.unwrap();
            let mut emails: Vec<String> = page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["email"].as_str().unwrap().to_string())
                .collect();
            emails.sort();
            emails
        }
    };
    assert_eq!(
        q("email=KEN@bell-labs.com").await,
        vec!["ken@bell-labs.com"]
    );
    assert_eq!(
        q("q=bell").await,
        vec!["dennis@bell-labs.com", "ken@bell-labs.com"]
    );
    assert_eq!(q("q=LINUS").await, vec!["linus@kernel.org"]);
    assert_eq!(
        q("q=100%25_").await,
        vec!["pct@example.com"],
        "% and _ are literal"
    );
    assert_eq!(q("q=%25").await, vec!["pct@example.com"]);
    assert!(q("q=nobody").await.is_empty());
    let first: Value = app
        .read(&format!("/v1/contacts?limit=3&min_position={token}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["items"].as_array().unwrap().len(), 3);
    let cursor = first["next_cursor"].as_str().unwrap();
    let rest: Value = app
        .read(&format!("/v1/contacts?limit=3&cursor={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert!(rest["next_cursor"].is_null());
    for bad in ["email=nope", "limit=0", "cursor=zzz", "unknown=1"] {
        assert_problem(app.read(&format!("/v1/contacts?{bad}")).await, 400).await;
    }
}

#[tokio::test]
async fn patch_changes_fields_with_if_match_and_enrichment_is_recorded() {
    let app = spawn_app().await;
    let c: Value = app
        .post("/v1/contacts", &json!({"email": "p@example.com"}))
        .await
        .json()
        .await
        .unwrap();
    let id = c["id"].as_str().unwrap();
    let patch = |if_match: &'static str, body: Value| {
        app.client
            .patch(app.url(&format!("/v1/contacts/{id}")))
            .bearer_auth(&app.write_key)
            .header("if-match", if_match)
            .json(&body)
            .send()
    };
    let ok = patch("\"1\"", json!({"title": "CTO"})).await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(ok.headers()["etag"], "\"2\"");
    assert_problem(patch("\"1\"", json!({"title": "CEO"})).await.unwrap(), 412).await;
    assert_problem(
        patch("\"2\"", json!({"email": "new@example.com"}))
            .await
            .unwrap(),
        422,
    )
    .await;

    let path = format!("/v1/contacts/{id}/enrichment");
    let enrich = |body: Value| {
        let path = path.clone();
        let app = &app;
        async move { app.post(&path, &body).await }
    };
    for bad in [
        json!({"data": {}, "quality_score": 1.5, "sources": []}),
        json!({"data": {}, "quality_score": -0.1, "sources": []}),
        json!({"data": "text", "quality_score": 0.5, "sources": []}),
        json!({"data": {}, "quality_score": "high", "sources": []}),
    ] {
        assert_problem(enrich(bad).await, 422).await;
    }
    let enriched = enrich(
        json!({"data": {"seniority": "exec"}, "quality_score": 0.87, "sources": ["clearbit"]}),
    )
    .await;
    assert_eq!(enriched.status().as_u16(), 200);
    let enriched: Value = enriched.json().await.unwrap();
    assert_eq!(enriched["enrichment"]["quality_score"], 0.87);
    assert_eq!(enriched["enrichment"]["data"]["seniority"], "exec");
    assert_eq!(enriched["title"], "CTO");
    let token = enriched["position"].as_str().unwrap();
    let listed: Value = app
        .read(&format!(
            "/v1/contacts?email=p@example.com&min_position={token}"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"][0]["enrichment"]["sources"][0], "clearbit");
    assert_eq!(listed["items"][0]["version"], 3);
    assert_problem(
        app.post(
            "/v1/contacts/0190f1b4-0000-7000-8000-000000000000/enrichment",
            &json!({"data": {}, "quality_score": 0.5, "sources": []}),
        )
        .await,
        404,
    )
    .await;
}

#[tokio::test]
async fn a_partial_import_reports_exactly_the_invalid_rows_and_stores_the_rest() {
    let app = spawn_app().await;
    app.post(
        "/v1/contacts",
        &json!({"email": "known@example.com", "first_name": "Known"}),
    )
    .await;
    let csv = "\u{feff}email,first_name,company,custom.source\r\n\
               new1@example.com,New,\"Acme, Inc.\",fair\r\n\
               not-an-email,Bad,,\r\n\
               known@example.com,Known,,\r\n\
               known@example.com,Renamed,,\r\n\
               new2@example.com,New2,,\"met at\nthe \"\"fair\"\"\"\r\n\
               ,NoEmail,,\r\n\
               NEW1@example.com,New,\"Acme, Inc.\",fair\r\n";
    let response = import(&app, "partial", "text/csv", csv.to_string()).await;
    assert_eq!(response.status().as_u16(), 200);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["received"], 7);
    assert_eq!(report["created"], 2, "{report}");
    assert_eq!(
        report["updated"], 1,
        "row 4 renames the known contact: {report}"
    );
    assert_eq!(
        report["unchanged"], 2,
        "rows 3 and 7 change nothing: {report}"
    );
    assert_eq!(report["failed"], 2);
    let rows: Vec<u64> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["row"].as_u64().unwrap())
        .collect();
    assert_eq!(rows, vec![2, 6]);
    assert_eq!(report["errors"][0]["email"], "not-an-email");
    assert_eq!(contacts_in_db(&app).await, 3);

    let token = report["position"].as_str().unwrap();
    let acme: Value = app
        .read(&format!(
            "/v1/contacts?email=new1@example.com&min_position={token}"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(acme["items"][0]["company"], "Acme, Inc.", "quoted comma");
    assert_eq!(acme["items"][0]["custom"]["source"], "fair");
    let multi: Value = app
        .read("/v1/contacts?email=new2@example.com")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        multi["items"][0]["custom"]["source"], "met at\nthe \"fair\"",
        "quoted newline and quotes"
    );
    let known: Value = app
        .read("/v1/contacts?email=known@example.com")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(known["items"][0]["first_name"], "Renamed");
}

#[tokio::test]
async fn an_atomic_import_with_one_bad_row_stores_nothing_and_answers_422_with_the_report() {
    let app = spawn_app().await;
    let rows: Vec<Value> = (0..20)
        .map(|i| {
            if i == 13 {
                json!({"email": "broken", "first_name": "Bad"})
            } else {
                json!({"email": format!("row{i}@example.com")})
            }
        })
        .collect();
    let response = import(
        &app,
        "atomic",
        "application/json",
        serde_json::to_string(&rows).unwrap(),
    )
    .await;
    let report = assert_problem(response, 422).await;
    assert_eq!(report["received"], 20);
    assert_eq!(report["failed"], 1);
    assert_eq!(report["created"], 0);
    assert_eq!(report["errors"][0]["row"], 14);
    assert_eq!(app.count("events").await, 0, "nothing written");

    let good: Vec<Value> = (0..20)
        .map(|i| json!({"email": format!("row{i}@example.com")}))
        .collect();
    let ok: Value = import(
        &app,
        "atomic",
        "application/json",
        serde_json::to_string(&good).unwrap(),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(ok["created"], 20);
    assert_eq!(contacts_in_db(&app).await, 20);
}

#[tokio::test]
async fn json_import_rows_of_the_wrong_shape_are_row_errors() {
    let app = spawn_app().await;
    let body = json!([{"email": "ok@example.com"}, "just a string", {"email": "x@example.com", "phone": 5}, {"email": "y@example.com", "nope": 1}]);
    let report: Value = import(&app, "partial", "application/json", body.to_string())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(report["created"], 1);
    assert_eq!(report["failed"], 3);
    let rows: Vec<u64> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["row"].as_u64().unwrap())
        .collect();
    assert_eq!(rows, vec![2, 3, 4]);
    assert_problem(
        import(
            &app,
            "partial",
            "application/json",
            "{\"email\": \"a@b.c\"}".into(),
        )
        .await,
        400,
    )
    .await;
    assert_problem(
        import(&app, "partial", "application/json", "[{".into()).await,
        400,
    )
    .await;
    assert_problem(
        import(&app, "sometimes", "application/json", "[]".into()).await,
        400,
    )
    .await;
    assert_problem(
        import(&app, "partial", "text/csv", "mail,name\nx,y\n".into()).await,
        400,
    )
    .await;
    assert_problem(
        import(&app, "partial", "application/xml", "<contacts/>".into()).await,
        415,
    )
    .await;
    let too_many: Vec<Value> = (0..10_001)
        .map(|i| json!({"email": format!("m{i}@example.com")}))
        .collect();
    assert_problem(
        import(
            &app,
            "partial",
            "application/json",
            serde_json::to_string(&too_many).unwrap(),
        )
        .await,
        413,
    )
    .await;
    assert_eq!(contacts_in_db(&app).await, 1);
}

#[tokio::test]
async fn two_concurrent_overlapping_imports_make_no_duplicates_and_their_reports_add_up() {
    let app = spawn_app().await;
    let file = |range: std::ops::Range<usize>, name: &'static str| -> String {
        let mut csv = String::from("email,first_name\n");
        for i in range {
            csv.push_str(&format!("person{i}@example.com,{name}\n"));
        }
        csv
    };
    let a = import(&app, "partial", "text/csv", file(0..600, "A"));
    let b = import(&app, "partial", "text/csv", file(300..900, "B"));
    let (a, b) = tokio::join!(a, b);
    let (a, b): (Value, Value) = (a.json().await.unwrap(), b.json().await.unwrap());
    assert_eq!(contacts_in_db(&app).await, 900, "one contact per address");
    let created = a["created"].as_u64().unwrap() + b["created"].as_u64().unwrap();
    assert_eq!(
        created, 900,
        "each contact was created by exactly one import: {a} {b}"
    );
    for r in [&a, &b] {
        let sum = ["created", "updated", "unchanged", "failed"]
            .iter()
            .map(|k| r[k].as_u64().unwrap())
            .sum::<u64>();
        assert_eq!(sum, 600, "{r}");
    }
    let updated = a["updated"].as_u64().unwrap() + b["updated"].as_u64().unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        events as u64,
        created + updated,
        "the reports are what the events say"
    );
}

#[tokio::test]
async fn an_import_retried_with_its_idempotency_key_writes_once() {
    let app = spawn_app().await;
    let send = || {
        app.client
            .post(app.url("/v1/contacts/import"))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", "import-1")
            .header("content-type", "text/csv")
            .body("email\na@example.com\nb@example.com\n")
            .send()
    };
    let first: Value = send().await.unwrap().json().await.unwrap();
    let again = send().await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(first, again);
    assert_eq!(first["created"], 2);
    assert_eq!(app.count("events").await, 2);
}

#[tokio::test]
async fn the_command_line_imports_a_file_and_prints_the_report() {
    let harness = harness();
    let database = harness.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("contacts.csv");
    std::fs::write(
        &file,
        "email,company\nx@example.com,X\nbad,Y\ny@example.com,Y\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leadledger"))
        .args(["contacts", "import"])
        .arg(&file)
        .env("DATABASE_URL", harness.url(&database))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("received 3  created 2  updated 0  unchanged 0  failed 1"),
        "{stdout}"
    );
    assert!(stdout.contains("row      2  bad"), "{stdout}");
    let atomic = std::process::Command::new(env!("CARGO_BIN_EXE_leadledger"))
        .args(["contacts", "import", "--mode", "atomic"])
        .arg(&file)
        .env("DATABASE_URL", harness.url(&database))
        .output()
        .unwrap();
    assert!(
        !atomic.status.success(),
        "an atomic import with a bad row fails"
    );
    harness.drop_database(database);
}
