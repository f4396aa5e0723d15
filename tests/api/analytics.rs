//! Analytics over the read models: the campaign timeseries per UTC day, the dashboard,
//! read-your-writes on every read route, refused parameters, and the command line
//! (`analytics campaign|dashboard`, `projections rebuild`).

use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, harness, spawn_app};
use crate::lifecycle::{data_dir, leadledger};
use crate::rebuild::settle;
use crate::webhooks::{deliver, event, source};

fn day(days_ago: i64) -> (String, String) {
    let at = chrono::Utc::now() - chrono::Duration::days(days_ago);
    (at.to_rfc3339(), at.date_naive().to_string())
}

async fn body(response: reqwest::Response, status: u16) -> Value {
    let got = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(got, status, "{body}");
    body
}

/// A started campaign with `emails` enrolled: (campaign id, contact ids).
async fn campaign_with(app: &TestApp, name: &str, emails: &[&str]) -> (String, Vec<String>) {
    let campaign = app.create_campaign(name).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    body(
        app.post(&format!("/v1/campaigns/{campaign}/start"), &json!({}))
            .await,
        200,
    )
    .await;
    let mut ids = Vec::new();
    for email in emails {
        let c = body(
            app.post("/v1/contacts", &json!({"email": email})).await,
            201,
        )
        .await;
        ids.push(c["id"].as_str().unwrap().to_string());
    }
    body(
        app.post(
            &format!("/v1/campaigns/{campaign}/enrollments"),
            &json!({"contact_ids": ids}),
        )
        .await,
        200,
    )
    .await;
    (campaign, ids)
}

fn day_of<'a>(series: &'a Value, date: &str) -> &'a Value {
    series["days"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["day"] == date)
        .unwrap_or_else(|| panic!("{date} in {series}"))
}

#[tokio::test]
async fn the_timeseries_counts_each_milestone_on_its_utc_day_and_follows_a_late_earlier_report() {
    let app = spawn_app().await;
    let hooks = source(&app, "esp").await;
    let (campaign, _) = campaign_with(&app, "spring", &["a@x.io", "b@x.io"]).await;
    let (d1, day1) = day(1);
    let (d3, day3) = day(3);
    let (_, today) = day(0);
    deliver(
        &app.address,
        &hooks,
        "m1",
        &json!([
            event("e1", "opened", &campaign, "a@x.io", &d1),
            event("e2", "replied", &campaign, "b@x.io", &d1),
        ]),
    )
    .await;
    settle(&app.pool).await;
    let path = format!("/v1/analytics/campaigns/{campaign}/timeseries?days=5");
    let series = body(app.read(&path).await, 200).await;
    assert_eq!(series["days"].as_array().unwrap().len(), 5);
    assert_eq!(series["to"], today);
    assert_eq!(series["days"][4]["day"], today);
    assert_eq!(day_of(&series, &today)["enrolled"], 2);
    let one = day_of(&series, &day1);
    assert_eq!(
        (
            one["sent"].clone(),
            one["delivered"].clone(),
            one["opened"].clone(),
            one["replied"].clone()
        ),
        (json!(2), json!(2), json!(1), json!(1)),
        "a reply implies delivery; an open implies sending"
    );
    assert_eq!(day_of(&series, &day3)["sent"], 0);

    // A late report that `a` was sent three days ago moves its `sent` to that day.
    deliver(
        &app.address,
        &hooks,
        "m2",
        &json!(event("e3", "sent", &campaign, "a@x.io", &d3)),
    )
    .await;
    settle(&app.pool).await;
    let series = body(app.read(&path).await, 200).await;
    assert_eq!(day_of(&series, &day1)["sent"], 1);
    assert_eq!(day_of(&series, &day3)["sent"], 1);
    assert_eq!(day_of(&series, &day3)["delivered"], 0);
    let totals: i64 = series["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["sent"].as_i64().unwrap())
        .sum();
    assert_eq!(totals, 2, "each enrollment counted once");
    // Defaults to 30 days.
    let month = body(
        app.read(&format!("/v1/analytics/campaigns/{campaign}/timeseries"))
            .await,
        200,
    )
    .await;
    assert_eq!(month["days"].as_array().unwrap().len(), 30);
}

#[tokio::test]
async fn timeseries_and_dashboard_refuse_bad_parameters_with_problems_and_change_nothing() {
    let app = spawn_app().await;
    let (campaign, _) = campaign_with(&app, "c", &["a@x.io"]).await;
    let events = app.count("events").await;
    for query in [
        "days=0", "days=366", "days=abc", "days=7;x", "days=-1", "week=1",
    ] {
        let path = format!("/v1/analytics/campaigns/{campaign}/timeseries?{query}");
        let problem = assert_problem(app.read(&path).await, 400).await;
        assert!(problem["detail"].as_str().is_some(), "{query}: {problem}");
    }
    for id in ["not-a-uuid", "00000000-0000-0000-0000-000000000000"] {
        assert_problem(
            app.read(&format!("/v1/analytics/campaigns/{id}/timeseries"))
                .await,
            404,
        )
        .await;
    }
    assert_problem(app.read("/v1/analytics/dashboard?top=9").await, 400).await;
    assert_problem(app.get("/v1/analytics/dashboard").await, 401).await;
    assert_eq!(app.count("events").await, events);
}

#[tokio::test]
async fn the_dashboard_totals_every_read_model_and_ranks_campaigns_by_reply_rate() {
    let app = spawn_app().await;
    let hooks = source(&app, "esp").await;
    let (good, _) = campaign_with(&app, "good", &["g1@x.io"]).await;
    let (fair, _) = campaign_with(&app, "=fair", &["f1@x.io", "f2@x.io"]).await;
    let (quiet, _) = campaign_with(&app, "quiet", &["q1@x.io"]).await;
    body(
        app.post(&format!("/v1/campaigns/{quiet}/pause"), &json!({}))
            .await,
        200,
    )
    .await;
    app.create_campaign("draft").await;
    let (d0, _) = day(0);
    deliver(
        &app.address,
        &hooks,
        "m1",
        &json!([
            event("e1", "replied", &good, "g1@x.io", &d0),
            event("e2", "delivered", &fair, "f1@x.io", &d0),
            event("e3", "replied", &fair, "f2@x.io", &d0),
            event("e4", "sent", &quiet, "q1@x.io", &d0),
        ]),
    )
    .await;
    let budget = body(
        app.post("/v1/budgets", &json!({"name": "AI", "limit": null}))
            .await,
        201,
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut position = String::new();
    for amount in ["1.10", "2.25"] {
        let spend = body(
            app.post(
                &format!("/v1/budgets/{budget}/spend"),
                &json!({"amount": amount, "category": "ai"}),
            )
            .await,
            201,
        )
        .await;
        position = spend["position"].as_str().unwrap().to_string();
    }
    settle(&app.pool).await;
    let dashboard = body(
        app.read(&format!("/v1/analytics/dashboard?min_position={position}"))
            .await,
        200,
    )
    .await;
    assert_eq!(dashboard["contacts"], 4);
    assert_eq!(
        dashboard["campaigns"],
        json!({"total": 4, "draft": 1, "running": 2, "paused": 1, "completed": 0})
    );
    assert_eq!(dashboard["enrollments"], 4);
    assert_eq!(
        dashboard["milestones"],
        json!({"sent": 4, "delivered": 3, "opened": 0, "clicked": 0, "replied": 2,
               "bounced": 0, "unsubscribed": 0, "complained": 0})
    );
    assert_eq!(dashboard["spend_this_month"]["cost"], "3.35");
    assert_eq!(dashboard["spend_this_month"]["requests"], 2);
    let top: Vec<(Value, Value)> = dashboard["top_campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].clone(), c["reply_rate"].clone()))
        .collect();
    assert_eq!(
        top,
        vec![(json!("good"), json!(100.0)), (json!("=fair"), json!(50.0))],
        "a campaign that delivered nothing is not ranked"
    );

    // The command line prints the same dashboard, and guards spreadsheet formulas in CSV.
    let url = harness().url(&app.database);
    let json_out = leadledger(&data_dir().1)
        .env("DATABASE_URL", &url)
        .args(["analytics", "dashboard", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        json_out.status.success(),
        "{}",
        String::from_utf8_lossy(&json_out.stderr)
    );
    let printed: Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(printed["contacts"], dashboard["contacts"]);
    assert_eq!(printed["top_campaigns"], dashboard["top_campaigns"]);
    let csv = leadledger(&data_dir().1)
        .env("DATABASE_URL", &url)
        .args(["analytics", "dashboard", "--format", "csv"])
        .output()
        .unwrap();
    let csv = String::from_utf8(csv.stdout).unwrap();
    assert!(
        csv.starts_with(
            "metric,value,from,to,rank,campaign_id,name,status,delivered,replied,reply_rate\r\n"
        ),
        "{csv}"
    );
    assert!(csv.contains("contacts,4,,,,,,,,,\r\n"), "{csv}");
    assert!(csv.contains("top_campaign,50,,,2,"), "{csv}");
    assert!(csv.contains(",'=fair,"), "{csv}");
    let series = leadledger(&data_dir().1)
        .env("DATABASE_URL", &url)
        .args([
            "analytics",
            "campaign",
            &fair,
            "--days",
            "2",
            "--format",
            "csv",
        ])
        .output()
        .unwrap();
    assert!(
        series.status.success(),
        "{}",
        String::from_utf8_lossy(&series.stderr)
    );
    let lines: Vec<String> = String::from_utf8(series.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        lines[0],
        "day,enrolled,sent,delivered,opened,clicked,replied,bounced,unsubscribed,complained"
    );
    assert_eq!(lines.len(), 3);
    assert!(lines[2].ends_with(",2,2,2,0,0,1,0,0,0"), "{lines:?}");
    let unknown = leadledger(&data_dir().1)
        .env("DATABASE_URL", &url)
        .args(["analytics", "campaign", &uuid::Uuid::nil().to_string()])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no campaign"));
}

#[tokio::test]
async fn every_read_route_answers_with_the_write_whose_position_it_is_given() {
    let app = spawn_app().await;
    let (campaign, contacts) = campaign_with(&app, "ryw", &["r@x.io"]).await;
    let contact = body(
        app.post(
            "/v1/contacts",
            &json!({"email": "late@x.io", "company": "Late Inc"}),
        )
        .await,
        201,
    )
    .await;
    let position = contact["position"].as_str().unwrap();
    let found = body(
        app.read(&format!(
            "/v1/contacts?email=late@x.io&min_position={position}"
        ))
        .await,
        200,
    )
    .await;
    assert_eq!(found["items"][0]["id"], contact["id"]);
    let dashboard = body(
        app.read(&format!("/v1/analytics/dashboard?min_position={position}"))
            .await,
        200,
    )
    .await;
    assert_eq!(dashboard["contacts"], 2);

    let enrolled = body(
        app.post(
            &format!("/v1/campaigns/{campaign}/enrollments"),
            &json!({"contact_ids": [contact["id"]]}),
        )
        .await,
        200,
    )
    .await;
    let position = enrolled["position"].as_str().unwrap();
    for (path, check) in [
        (format!("/v1/campaigns/{campaign}/enrollments"), "items"),
        (format!("/v1/campaigns/{campaign}/metrics"), "enrolled"),
        (
            format!("/v1/analytics/campaigns/{campaign}/timeseries?days=1"),
            "days",
        ),
    ] {
        let sep = if path.contains('?') { '&' } else { '?' };
        let got = body(
            app.read(&format!("{path}{sep}min_position={position}"))
                .await,
            200,
        )
        .await;
        match check {
            "items" => assert_eq!(got["items"].as_array().unwrap().len(), 2, "{path}"),
            "enrolled" => assert_eq!(got["enrolled"], 2, "{path}"),
            _ => assert_eq!(got["days"][0]["enrolled"], 2, "{path}"),
        }
    }
    let renamed = body(
        app.client
            .patch(app.url(&format!("/v1/campaigns/{campaign}")))
            .bearer_auth(&app.write_key)
            .json(&json!({"name": "renamed"}))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let position = renamed["position"].as_str().unwrap();
    let list = body(
        app.read(&format!("/v1/campaigns?min_position={position}"))
            .await,
        200,
    )
    .await;
    assert_eq!(list["items"][0]["name"], "renamed");

    // Every GET that reads data checks the token, stream-backed ones included.
    let events = app.count("events").await;
    for path in [
        "/v1/contacts".to_string(),
        format!("/v1/contacts/{}", contacts[0]),
        "/v1/campaigns".to_string(),
        format!("/v1/campaigns/{campaign}"),
        format!("/v1/campaigns/{campaign}/enrollments"),
        format!("/v1/campaigns/{campaign}/metrics"),
        format!(
            "/v1/enrollments/{}",
            enrolled["enrolled"][0]["enrollment_id"].as_str().unwrap()
        ),
        format!("/v1/analytics/campaigns/{campaign}/timeseries"),
        "/v1/analytics/dashboard".to_string(),
        "/v1/analytics/costs".to_string(),
        "/v1/budgets/00000000-0000-0000-0000-000000000000".to_string(),
    ] {
        for bad in ["x", "12", "1-2-3", "-5"] {
            let problem =
                assert_problem(app.read(&format!("{path}?min_position={bad}")).await, 400).await;
            assert!(
                problem["detail"].as_str().unwrap().contains("min_position"),
                "{path}: {problem}"
            );
        }
    }
    for path in ["/v1/webhooks/parked", "/v1/webhooks/dead-letters"] {
        let response = app
            .client
            .get(app.url(&format!("{path}?min_position=x")))
            .bearer_auth(&app.admin_key)
            .send()
            .await
            .unwrap();
        assert_problem(response, 400).await;
    }
    assert_eq!(app.count("events").await, events);
}
