//! Hostile input on the write routes (contacts, campaigns, enrollments, budget spends,
//! webhook deliveries): arbitrary bytes, arbitrary JSON, and valid bodies with one member
//! replaced by anything. No input may cause a 5xx; every refusal is problem+json and
//! changes nothing.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Number, Value, json};
use sha2::Sha256;

use crate::helpers::{TestApp, spawn_app};

/// Cases per property: enough to reach every route with many shapes, in a few seconds.
const CASES: u32 = 300;

#[derive(Debug, Clone, Copy)]
enum Route {
    Contacts,
    Campaigns,
    Enrollments,
    Spend,
    Webhook,
}

const ROUTES: [Route; 5] = [
    Route::Contacts,
    Route::Campaigns,
    Route::Enrollments,
    Route::Spend,
    Route::Webhook,
];

/// A fresh server with one of everything the routes refer to.
struct Target {
    app: TestApp,
    campaign: String,
    contact: String,
    budget: String,
    webhook_key: Vec<u8>,
}

impl Target {
    async fn new() -> Self {
        let app = spawn_app().await;
        let campaign = app.create_campaign("fuzzed").await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let contact: Value = app
            .post("/v1/contacts", &json!({"email": "fuzz@example.com"}))
            .await
            .json()
            .await
            .unwrap();
        let budget: Value = app
            .post("/v1/budgets", &json!({"name": "fuzzed", "limit": "100"}))
            .await
            .json()
            .await
            .unwrap();
        let source: Value = app
            .client
            .post(app.url("/v1/webhook-sources"))
            .bearer_auth(&app.admin_key)
            .json(&json!({"name": "fuzz"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let secret = source["secret"].as_str().unwrap();
        Self {
            campaign,
            contact: contact["id"].as_str().unwrap().to_string(),
            budget: budget["id"].as_str().unwrap().to_string(),
            webhook_key: STANDARD
                .decode(secret.strip_prefix("whsec_").unwrap())
                .unwrap(),
            app,
        }
    }

    fn path(&self, route: Route) -> String {
        match route {
            Route::Contacts => "/v1/contacts".into(),
            Route::Campaigns => "/v1/campaigns".into(),
            Route::Enrollments => format!("/v1/campaigns/{}/enrollments", self.campaign),
            Route::Spend => format!("/v1/budgets/{}/spend", self.budget),
            Route::Webhook => "/webhooks/fuzz".into(),
        }
    }

    /// A body the route accepts, every optional member given.
    fn valid_body(&self, route: Route) -> Map<String, Value> {
        let body = match route {
            Route::Contacts => json!({
                "email": "fuzz@example.com", "first_name": "Ada", "last_name": "Lovelace",
                "company": "Engines", "company_domain": "example.com", "title": "Analyst",
                "phone": "+44 20 7946 0000", "linkedin_url": "https://www.linkedin.com/in/ada",
                "custom": {"tier": "gold"}
            }),
            Route::Campaigns => json!({"name": "fuzzed", "stop_on_reply": true}),
            Route::Enrollments => json!({"contact_ids": [self.contact]}),
            Route::Spend => json!({
                "amount": "0.01", "category": "ai", "description": "call", "model": "m",
                "input_tokens": 10, "output_tokens": 2
            }),
            Route::Webhook => json!({
                "id": "evt-1", "type": "opened", "campaign_id": self.campaign,
                "email": "fuzz@example.com", "occurred_at": "2026-11-01T09:00:00Z"
            }),
        };
        body.as_object().unwrap().clone()
    }

    /// Rows that a refused request must leave as they were.
    async fn state(&self) -> Vec<i64> {
        let mut counts = Vec::new();
        for table in [
            "events",
            "idempotency_records",
            "webhook_deliveries",
            "webhook_event_ids",
            "webhook_parked",
        ] {
            counts.push(self.app.count(table).await);
        }
        counts
    }

    /// Posts `body` as JSON to `route` (signed, for the webhook route) and checks the answer.
    async fn check(&self, route: Route, body: Vec<u8>) -> Result<(), TestCaseError> {
        let before = self.state().await;
        let mut request = self
            .app
            .client
            .post(self.app.url(&self.path(route)))
            .header("content-type", "application/json");
        request = match route {
            Route::Webhook => {
                let id = uuid::Uuid::new_v4().to_string();
                let ts = chrono::Utc::now().timestamp();
                let mut mac = Hmac::<Sha256>::new_from_slice(&self.webhook_key).unwrap();
                mac.update(format!("{id}.{ts}.").as_bytes());
                mac.update(&body);
                let signature = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
                request
                    .header("webhook-id", id)
                    .header("webhook-timestamp", ts.to_string())
                    .header("webhook-signature", signature)
            }
            _ => request.bearer_auth(&self.app.write_key),
        };
        let response = request.body(body.clone()).send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = response.text().await.unwrap();
        let input = String::from_utf8_lossy(&body);
        prop_assert!(
            status < 500,
            "{route:?} answered {status} to {input:?}: {text}"
        );
        if (400..500).contains(&status) {
            prop_assert_eq!(
                &content_type,
                "application/problem+json",
                "{:?} {} to {:?}",
                route,
                status,
                input
            );
            let problem: Value = serde_json::from_str(&text)
                .map_err(|e| TestCaseError::fail(format!("{status} body is not JSON: {e}")))?;
            prop_assert_eq!(&problem["status"], &json!(status), "{}", text);
            prop_assert!(problem["type"].as_str().is_some_and(|t| !t.is_empty()));
            prop_assert!(problem["title"].as_str().is_some_and(|t| !t.is_empty()));
            let after = self.state().await;
            prop_assert_eq!(
                before,
                after,
                "{:?} refused {:?} with {} but changed the state",
                route,
                input,
                status
            );
        }
        Ok(())
    }
}

/// Strings chosen to break parsers, validators and SQL: controls, bidi overrides, lone
/// escapes, numbers as text, wildcards, injection attempts, and the very long.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[\\x00-\\x1f\\x7f]{1,5}",
        Just(String::new()),
        Just(" ".into()),
        Just("NaN".into()),
        Just("Infinity".into()),
        Just("-0".into()),
        Just("1e400".into()),
        Just("0.0000001".into()),
        Just("99999999999999999999999999".into()),
        Just("%_\\".into()),
        Just("'; DROP TABLE events; --".into()),
        Just("\u{202e}gro.elpmaxe@evil".into()),
        Just("a@b".into()),
        Just("x".repeat(300)),
        Just("y".repeat(70_000)),
        Just("00000000-0000-0000-0000-000000000000".into()),
        Just("https://".into()),
        Just("javascript:alert(1)".into()),
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    let number = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number,
        hostile_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let key = prop_oneof![
            prop::sample::select(vec![
                "email",
                "name",
                "first_name",
                "custom",
                "contact_ids",
                "amount",
                "category",
                "input_tokens",
                "id",
                "type",
                "campaign_id",
                "enrollment_id",
                "occurred_at",
                "stop_on_reply",
            ])
            .prop_map(str::to_string),
            ".{0,12}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON tokens `serde_json::Value` cannot hold, written into a body as raw text.
fn raw_token() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "1e400",
        "-1e400",
        "-0",
        "NaN",
        "Infinity",
        "-Infinity",
        "123456789012345678901234567890",
        "0.1e-999",
        "\"\\ud800\"",
        "\"\\u0000\"",
        "[]",
        "{}",
    ])
    .prop_map(str::to_string)
}

/// A value for one member: anything, or a raw token.
#[derive(Debug, Clone)]
enum Replacement {
    Json(Value),
    Raw(String),
}

fn run(property: &str, strategy: impl Strategy<Value = (usize, Vec<u8>)>, target: &Target) {
    let runtime = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |(route, body)| {
        tokio::task::block_in_place(|| runtime.block_on(target.check(ROUTES[route], body)))
    });
    if let Err(e) = result {
        panic!("{property}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_bytes_posted_to_write_routes_never_cause_a_5xx_and_refusals_change_nothing() {
    let target = Target::new().await;
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        // Almost JSON: a valid text with bytes cut or flipped.
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| {
            let mut text = br#"{"email": "a@example.com", "name": "n", "amount": "1"}"#.to_vec();
            let at = at % text.len();
            text[at] = byte;
            text
        }),
    ];
    run("arbitrary bytes", (0..ROUTES.len(), bytes), &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_json_posted_to_write_routes_never_causes_a_5xx_and_refusals_change_nothing() {
    let target = Target::new().await;
    let strategy = (0..ROUTES.len(), any_json())
        .prop_map(|(route, value)| (route, serde_json::to_vec(&value).unwrap()));
    run("arbitrary JSON", strategy, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_bodies_with_one_member_replaced_by_anything_never_cause_a_5xx() {
    let target = Target::new().await;
    let bodies: Vec<Map<String, Value>> = ROUTES.iter().map(|r| target.valid_body(*r)).collect();
    let replacement = prop_oneof![
        3 => any_json().prop_map(Replacement::Json),
        1 => raw_token().prop_map(Replacement::Raw),
    ];
    let strategy = (0..ROUTES.len(), any::<prop::sample::Index>(), replacement).prop_map(
        move |(route, member, replacement)| {
            let body = &bodies[route];
            let name = body.keys().nth(member.index(body.len())).unwrap().clone();
            // Written member by member, so a raw token can stand as a value.
            let members: Vec<String> = body
                .iter()
                .map(|(k, v)| {
                    let value = if *k == name {
                        match &replacement {
                            Replacement::Json(v) => v.to_string(),
                            Replacement::Raw(raw) => raw.clone(),
                        }
                    } else {
                        v.to_string()
                    };
                    format!("{}: {value}", Value::String(k.clone()))
                })
                .collect();
            (route, format!("{{{}}}", members.join(", ")).into_bytes())
        },
    );
    run("one member replaced", strategy, &target);
}

// What fuzzing found, pinned down: NUL characters, which PostgreSQL cannot store as text
// or jsonb, reached the database from these inputs and made 500s.

#[tokio::test]
async fn enrichment_data_holding_a_nul_character_is_refused_with_422() {
    let target = Target::new().await;
    let app = &target.app;
    let before = app.count("events").await;
    for data in [json!({"k": "a\u{0}b"}), json!({"nested": {"k\u{0}": 1}})] {
        let response = app
            .post(
                &format!("/v1/contacts/{}/enrichment", target.contact),
                &json!({"data": data, "quality_score": 0.5, "sources": []}),
            )
            .await;
        let problem = crate::helpers::assert_problem(response, 422).await;
        assert_eq!(problem["errors"][0]["field"], "data", "{problem}");
    }
    assert_eq!(app.count("events").await, before);
}

#[tokio::test]
async fn a_contact_search_holding_a_control_character_is_a_400() {
    let target = Target::new().await;
    let response = target.app.read("/v1/contacts?q=a%00b").await;
    crate::helpers::assert_problem(response, 400).await;
}

#[tokio::test]
async fn a_webhook_event_id_holding_a_nul_is_rejected_and_the_rest_of_the_delivery_counts() {
    let target = Target::new().await;
    let valid = target.valid_body(Route::Webhook);
    let mut bad = valid.clone();
    bad.insert("id".into(), json!("evt\u{0}1"));
    let mut odd = valid.clone();
    odd.insert("id".into(), json!({"\u{0}": null}));
    let body = serde_json::to_vec(&json!([bad, odd, valid])).unwrap();
    let id = uuid::Uuid::new_v4().to_string();
    let ts = chrono::Utc::now().timestamp();
    let mut mac = Hmac::<Sha256>::new_from_slice(&target.webhook_key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&body);
    let response = target
        .app
        .client
        .post(target.app.url("/webhooks/fuzz"))
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header(
            "webhook-signature",
            format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let results: Value = response.json().await.unwrap();
    let outcomes: Vec<&str> = results["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    // The enrollment does not exist: the valid event waits for it.
    assert_eq!(outcomes, ["rejected", "rejected", "parked"], "{results}");
    assert_eq!(results["results"][1]["id"], Value::Null, "{results}");
}

#[tokio::test]
async fn a_webhook_source_name_holding_a_nul_is_an_unknown_source() {
    let target = Target::new().await;
    let response = target
        .app
        .client
        .post(target.app.url("/webhooks/fu%00zz"))
        .header("webhook-id", "m")
        .header(
            "webhook-timestamp",
            chrono::Utc::now().timestamp().to_string(),
        )
        .header("webhook-signature", "v1,AAAA")
        .body("{}")
        .send()
        .await
        .unwrap();
    crate::helpers::assert_problem(response, 401).await;
}
