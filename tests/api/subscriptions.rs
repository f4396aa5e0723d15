//! Outbound subscriptions against a real receiver (a TCP server in the test on port 0)
//! that checks every message with the official `standardwebhooks` crate: order, ids,
//! retries through failures, the breaker, replay, rotation, refused targets and bad input.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leadledger::app::App;
use leadledger::app::outbound::OutboundConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::{TestApp, assert_problem, read_until, spawn_app_configured, spawn_beside};

/// What the receiver does with one request.
#[derive(Debug, Clone)]
pub enum Behaviour {
    Status(u16),
    /// 429 or 503 with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// Reads the request and answers nothing for this long.
    Hang(Duration),
    /// Reads the request and closes the connection without an answer.
    Close,
    /// 302 to this location.
    Redirect(String),
    /// 200 after this long (to see whether deliveries overlap).
    Slow(Duration),
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub body: Value,
    pub signature: String,
    /// The status answered; `None` when it hung or closed.
    pub answered: Option<u16>,
    pub at: Instant,
}

#[derive(Default)]
struct ReceiverState {
    script: VecDeque<Behaviour>,
    /// Once the script is used up: this, or 200.
    otherwise: Option<Behaviour>,
    secrets: Vec<String>,
    /// Every secret must verify each message (a rotation), not just one of them.
    all_secrets: bool,
    received: Vec<Received>,
    unverified: Vec<String>,
    connections: usize,
    in_flight: usize,
    max_in_flight: usize,
}

#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    pub port: u16,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.lock().unwrap().connections += 1;
                tokio::spawn(serve_connection(stream, shared.clone()));
            }
        });
        Self {
            url: format!("http://127.0.0.1:{port}/hook"),
            port,
            state,
        }
    }

    /// Secrets the messages must verify with (each one, separately).
    pub fn verify_with(&self, secret: &str) {
        self.state.lock().unwrap().secrets.push(secret.to_string());
    }

    /// Each message must verify with every secret given (not just one).
    pub fn require_all_secrets(&self) {
        self.state.lock().unwrap().all_secrets = true;
    }

    pub fn script(&self, behaviours: impl IntoIterator<Item = Behaviour>) {
        self.state.lock().unwrap().script.extend(behaviours);
    }

    pub fn otherwise(&self, behaviour: Option<Behaviour>) {
        self.state.lock().unwrap().otherwise = behaviour;
    }

    pub fn received(&self) -> Vec<Received> {
        let state = self.state.lock().unwrap();
        assert!(
            state.unverified.is_empty(),
            "messages failed verification: {:?}",
            state.unverified
        );
        state.received.clone()
    }

    /// Ids answered 2xx, in the order they were.
    pub fn delivered(&self) -> Vec<String> {
        self.received()
            .into_iter()
            .filter(|r| r.answered.is_some_and(|s| (200..300).contains(&s)))
            .map(|r| r.id)
            .collect()
    }

    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.lock().unwrap().max_in_flight
    }
}

/// A minimal HTTP/1.1 server: keep-alive, `Content-Length` bodies, scripted answers.
async fn serve_connection(mut stream: TcpStream, state: Arc<Mutex<ReceiverState>>) {
    let mut buffer = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
        let mut headers = http::HeaderMap::new();
        for line in head.lines().skip(1) {
            if let Some((name, value)) = line.split_once(':')
                && let (Ok(name), Ok(value)) = (
                    http::HeaderName::from_bytes(name.trim().as_bytes()),
                    http::HeaderValue::from_str(value.trim()),
                )
            {
                headers.append(name, value);
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buffer[head_end..head_end + length].to_vec();
        buffer.drain(..head_end + length);

        let id = headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let signature = headers
            .get("webhook-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        // Recorded on arrival (the order messages came in), answered once answered.
        let arrived = Instant::now();
        let (behaviour, index) = {
            let mut s = state.lock().unwrap();
            let results: Vec<bool> = s
                .secrets
                .iter()
                .map(|secret| {
                    standardwebhooks::Webhook::new(secret)
                        .and_then(|w| w.verify(&body, &headers))
                        .is_ok()
                })
                .collect();
            let verified = if s.all_secrets {
                results.iter().all(|ok| *ok)
            } else {
                results.iter().any(|ok| *ok)
            };
            if !verified || results.is_empty() {
                s.unverified.push(id.clone());
            }
            s.in_flight += 1;
            s.max_in_flight = s.max_in_flight.max(s.in_flight);
            s.received.push(Received {
                id: id.clone(),
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                signature: signature.clone(),
                answered: None,
                at: arrived,
            });
            let index = s.received.len() - 1;
            let behaviour = s
                .script
                .pop_front()
                .or_else(|| s.otherwise.clone())
                .unwrap_or(Behaviour::Status(200));
            (behaviour, index)
        };
        let record = |answered: Option<u16>| {
            let mut s = state.lock().unwrap();
            s.in_flight -= 1;
            s.received[index].answered = answered;
        };
        let (status, extra) = match behaviour {
            Behaviour::Status(s) => (s, String::new()),
            Behaviour::RetryAfter(s, secs) => (s, format!("retry-after: {secs}\r\n")),
            Behaviour::Redirect(to) => (302, format!("location: {to}\r\n")),
            Behaviour::Slow(d) => {
                tokio::time::sleep(d).await;
                (200, String::new())
            }
            Behaviour::Hang(d) => {
                tokio::time::sleep(d).await;
                record(None);
                return;
            }
            Behaviour::Close => {
                record(None);
                return;
            }
        };
        record(Some(status));
        let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n{extra}\r\nok");
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Fast retries for tests: the schedule at 1/1000 (5 ms, 300 ms, 1.8 s, …), a short
/// attempt timeout, private addresses and plain http allowed.
pub fn fast(app: &mut App) {
    app.outbound = OutboundConfig {
        allow_private: true,
        timeout: Duration::from_millis(400),
        connect_timeout: Duration::from_millis(400),
        retry_scale: 0.001,
        breaker_threshold: 50,
        breaker_cooldown: Duration::from_secs(60),
    };
}

async fn admin_post(app: &TestApp, path: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .bearer_auth(&app.admin_key)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn admin_get(app: &TestApp, path: &str) -> Value {
    let response = app
        .client
        .get(app.url(path))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

async fn admin_patch(app: &TestApp, path: &str, body: &Value) -> reqwest::Response {
    app.client
        .patch(app.url(path))
        .bearer_auth(&app.admin_key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Creates a subscription to `receiver` (which then verifies with its secret).
async fn subscribe(app: &TestApp, receiver: &Receiver, body: Value) -> Value {
    let mut body = body;
    body["url"] = json!(receiver.url);
    let response = admin_post(app, "/v1/subscriptions", &body).await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"));
    receiver.verify_with(secret);
    created
}

/// Writes `n` campaigns, `concurrency` at a time.
async fn write_campaigns(app: &TestApp, n: usize, concurrency: usize) {
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(|i| async move { app.create_campaign(&format!("campaign {i}")).await })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
}

/// The message ids the subscription should deliver: events after `after` (a position
/// number), in feed order.
async fn expected_ids(app: &TestApp, after: i64, event_type: Option<&str>) -> Vec<String> {
    let positions: Vec<i64> = sqlx::query_scalar(
        "SELECT position FROM events WHERE position > $1 AND ($2::text IS NULL OR event_type = $2)
         ORDER BY transaction_id, position",
    )
    .bind(after)
    .bind(event_type)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    positions.into_iter().map(|p| format!("evt_{p}")).collect()
}

async fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every id in `received` is expected, and none comes before one already answered 2xx
/// after it: redelivery only of the message in flight, never out of order.
fn assert_in_order(received: &[Received], expected: &[String]) {
    let index = |id: &str| {
        expected
            .iter()
            .position(|e| e == id)
            .unwrap_or_else(|| panic!("unexpected message {id}"))
    };
    let mut next = 0usize;
    for r in received {
        let i = index(&r.id);
        assert!(
            i == next || (next > 0 && i == next - 1),
            "{} arrived when {} was next",
            r.id,
            expected.get(next).map(String::as_str).unwrap_or("nothing")
        );
        if r.answered.is_some_and(|s| (200..300).contains(&s)) && i == next {
            next += 1;
        }
    }
}

#[tokio::test]
async fn every_event_arrives_once_in_feed_order_signed_and_verified() {
    let app = spawn_app_configured(fast).await;
    let receiver = Receiver::start().await;
    let created = subscribe(&app, &receiver, json!({"description": "crm sync"})).await;
    assert_eq!(created["event_types"], json!(["*"]));
    assert_eq!(created["status"], "active");

    write_campaigns(&app, 40, 8).await;
    let expected = expected_ids(&app, 0, None).await;
    assert_eq!(expected.len(), 40);
    wait_until("all delivered", Duration::from_secs(30), || {
        receiver.delivered().len() >= 40
    })
    .await;
    assert_eq!(receiver.delivered(), expected, "each once, in feed order");

    let first = &receiver.received()[0];
    assert_eq!(first.body["type"], "CampaignCreated");
    assert_eq!(first.body["data"]["aggregate_type"], "campaign");
    assert_eq!(first.body["data"]["sequence"], 1);
    assert!(
        first.body["data"]["event"]["name"].is_string(),
        "{}",
        first.body
    );
    let position = first.body["data"]["position"].as_str().unwrap();
    assert!(first.id.ends_with(position.rsplit('-').next().unwrap()));
    assert!(first.signature.starts_with("v1,"));

    let id = created["id"].as_str().unwrap();
    // The receiver answers before the server records the delivery (and its log line, in
    // the same statement): read until the last is recorded.
    let view_path = format!("/v1/subscriptions/{id}");
    let view = read_until(
        async || admin_get(&app, &view_path).await,
        |view| view["backlog"] == 0,
    )
    .await;
    assert_eq!(view["backlog"], 0);
    assert_eq!(view["breaker"], "closed");
    assert!(view["last_success_at"].is_string());
    assert!(view.get("secret").is_none(), "never shown again");
    let log = admin_get(&app, &format!("/v1/subscriptions/{id}/deliveries?limit=5")).await;
    assert_eq!(log["items"].as_array().unwrap().len(), 5);
    assert_eq!(log["items"][0]["message_id"], expected[39]);
    assert_eq!(log["items"][0]["status_code"], 200);
    assert!(log["next_cursor"].is_string());
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("subscription_deliveries_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn only_the_event_types_asked_for_are_sent_and_the_rest_are_passed_over() {
    let app = spawn_app_configured(fast).await;
    let receiver = Receiver::start().await;
    subscribe(&app, &receiver, json!({"event_types": ["CampaignStarted"]})).await;
    for i in 0..5 {
        let c = app.create_campaign(&format!("c{i}")).await;
        let id = c["id"].as_str().unwrap();
        let r = app
            .post(&format!("/v1/campaigns/{id}/start"), &json!({}))
            .await;
        assert_eq!(r.status(), 200);
    }
    let expected = expected_ids(&app, 0, Some("CampaignStarted")).await;
    assert_eq!(expected.len(), 5);
    wait_until("started events delivered", Duration::from_secs(20), || {
        receiver.delivered().len() >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.delivered(), expected);
    assert!(
        receiver
            .received()
            .iter()
            .all(|r| r.body["type"] == "CampaignStarted")
    );
}

#[tokio::test]
async fn receiver_failures_delay_deliveries_but_never_lose_or_reorder_them() {
    let app = spawn_app_configured(fast).await;
    let receiver = Receiver::start().await;
    let created = subscribe(&app, &receiver, json!({})).await;
    receiver.script([
        Behaviour::Status(500),
        Behaviour::Status(500),
        Behaviour::Close,
        Behaviour::Status(200),
        Behaviour::Hang(Duration::from_millis(900)),
        Behaviour::Status(503),
        Behaviour::Status(200),
        Behaviour::RetryAfter(429, 1),
        Behaviour::Status(200),
        Behaviour::Status(502),
        Behaviour::Close,
    ]);
    write_campaigns(&app, 12, 4).await;
    let expected = expected_ids(&app, 0, None).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.delivered().len() < expected.len() {
        let seen: Vec<_> = receiver
            .received()
            .into_iter()
            .map(|r| (r.id, r.answered))
            .collect();
        if Instant::now() > deadline {
            let log = admin_get(
                &app,
                &format!(
                    "/v1/subscriptions/{}/deliveries?limit=50",
                    created["id"].as_str().unwrap()
                ),
            )
            .await;
            panic!("not all delivered: {seen:?} {log:#}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = receiver.received();
    assert_eq!(receiver.delivered(), expected, "each once, in order");
    assert_in_order(&received, &expected);
    assert!(
        received.len() >= expected.len() + 8,
        "the failures were retried"
    );

    // Retry-After was honoured: the attempt after the 429 came at least a second later,
    // although the scaled schedule alone would have retried within milliseconds.
    let after_429 = received
        .iter()
        .position(|r| r.answered == Some(429))
        .unwrap();
    let gap = received[after_429 + 1].at - received[after_429].at;
    assert!(gap >= Duration::from_millis(900), "{gap:?}");
    assert_eq!(received[after_429 + 1].id, received[after_429].id);

    let id = created["id"].as_str().unwrap();
    let log = admin_get(
        &app,
        &format!("/v1/subscriptions/{id}/deliveries?limit=500"),
    )
    .await;
    let attempts = log["items"].as_array().unwrap();
    let failed: Vec<&Value> = attempts
        .iter()
        .filter(|a| a["status_code"] != 200)
        .collect();
    assert!(failed.len() >= 8, "{log}");
    assert!(
        failed
            .iter()
            .any(|a| a["error"].as_str().is_some_and(|e| e.contains("timed out"))),
        "the hang is logged as a timeout: {log}"
    );
    assert!(failed.iter().all(|a| a["next_attempt_at"].is_string()));
    assert!(failed.iter().any(|a| a["attempt"].as_i64() > Some(1)));
    let view = admin_get(&app, &format!("/v1/subscriptions/{id}")).await;
    assert_eq!(view["status"], "active");
    assert!(view["last_failure_at"].is_string());
    assert_eq!(view["attempts"], 0);
}

#[tokio::test]
async fn an_exhausted_schedule_disables_the_subscription_and_resuming_loses_nothing() {
    let app = spawn_app_configured(|app| {
        fast(app);
        // Seven retries in at most a few seconds.
        app.outbound.retry_scale = 0.00005;
    })
    .await;
    let receiver = Receiver::start().await;
    let created = subscribe(&app, &receiver, json!({})).await;
    let id = created["id"].as_str().unwrap().to_string();
    receiver.otherwise(Some(Behaviour::Status(500)));
    write_campaigns(&app, 3, 1).await;
    let expected = expected_ids(&app, 0, None).await;
    let path = format!("/v1/subscriptions/{id}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let view = loop {
        let view = admin_get(&app, &path).await;
        if view["status"] == "disabled" {
            break view;
        }
        assert!(Instant::now() < deadline, "not disabled: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        view["disabled_reason"]
            .as_str()
            .is_some_and(|r| r.contains("exhausted")),
        "{view}"
    );
    assert_eq!(view["backlog"], 3);
    let tries = receiver.received();
    assert_eq!(tries.len(), 8, "the first attempt and seven retries");
    assert!(tries.iter().all(|r| r.id == expected[0]));

    receiver.otherwise(None);
    let r = admin_patch(&app, &path, &json!({"status": "active"})).await;
    assert_eq!(r.status(), 200);
    wait_until(
        "resumed from the checkpoint",
        Duration::from_secs(20),
        || receiver.delivered().len() >= 3,
    )
    .await;
    assert_eq!(receiver.delivered(), expected);
}

#[tokio::test]
async fn a_410_disables_the_subscription_at_once() {
    let app = spawn_app_configured(fast).await;
    let receiver = Receiver::start().await;
    let created = subscribe(&app, &receiver, json!({})).await;
    receiver.script([Behaviour::Status(410)]);
    write_campaigns(&app, 2, 1).await;
    let path = format!("/v1/subscriptions/{}", created["id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = admin_get(&app, &path).await;
        if view["status"] == "disabled" {
            assert!(view["disabled_reason"].as_str().unwrap().contains("410"));
            break;
        }
        assert!(Instant::now() < deadline, "not disabled: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 1, "nothing after the 410");
}

#[tokio::test]
async fn an_open_breaker_holds_the_host_and_spends_no_retries_then_a_probe_closes_it() {
    let app = spawn_app_configured(|app| {
        fast(app);
        app.outbound.breaker_threshold = 3;
        // 3 s once scaled.
        app.outbound.breaker_cooldown = Duration::from_secs(3000);
    })
    .await;
    let receiver = Receiver::start().await;
    let a = subscribe(&app, &receiver, json!({})).await;
    receiver.script([
        Behaviour::Status(500),
        Behaviour::Status(500),
        Behaviour::Status(500),
    ]);
    write_campaigns(&app, 1, 1).await;
    let path = |s: &Value| format!("/v1/subscriptions/{}", s["id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = admin_get(&app, &path(&a)).await;
        if view["breaker"] == "open" {
            break;
        }
        assert!(Instant::now() < deadline, "breaker never opened: {view}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let opened = Instant::now();
    assert_eq!(receiver.received().len(), 3);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let host_line = format!(
        "outbound_breaker_state{{host=\"127.0.0.1:{}\"}} 1",
        receiver.port
    );
    assert!(metrics.contains(&host_line), "{metrics}");

    // A second subscription to the same host waits too, and spends none of its retries.
    let b = subscribe(&app, &receiver, json!({})).await;
    write_campaigns(&app, 1, 1).await;
    let expected = expected_ids(&app, 0, None).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        opened.elapsed() < Duration::from_millis(1900),
        "the test was too slow"
    );
    assert_eq!(receiver.received().len(), 3, "nothing sent while open");
    let view_a = admin_get(&app, &path(&a)).await;
    assert_eq!(view_a["attempts"], 3, "{view_a}");
    assert_eq!(view_a["breaker"], "open");
    let view_b = admin_get(&app, &path(&b)).await;
    assert_eq!(view_b["attempts"], 0, "{view_b}");
    assert!(view_b["last_failure_at"].is_null());
    assert_eq!(view_b["backlog"], 1);

    wait_until(
        "both delivered after the probe",
        Duration::from_secs(20),
        || receiver.delivered().len() == 3,
    )
    .await;
    let probe = &receiver.received()[3];
    assert!(probe.at.duration_since(opened) >= Duration::from_millis(2500));
    // Either subscription may win the probe; A delivers both events, B the second.
    let delivered = receiver.delivered();
    let count = |id: &String| delivered.iter().filter(|d| *d == id).count();
    assert_eq!(
        (count(&expected[0]), count(&expected[1])),
        (1, 2),
        "{delivered:?}"
    );
    assert_eq!(admin_get(&app, &path(&a)).await["breaker"], "closed");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let closed = format!(
        "outbound_breaker_state{{host=\"127.0.0.1:{}\"}} 0",
        receiver.port
    );
    assert!(metrics.contains(&closed), "{metrics}");
}

#[tokio::test]
async fn replay_sends_again_with_the_same_ids_and_pause_holds_deliveries() {
    let app = spawn_app_configured(fast).await;
    let receiver = Receiver::start().await;
    let created = subscribe(&app, &receiver, json!({})).await;
    let id = created["id"].as_str().unwrap();
    let path = format!("/v1/subscriptions/{id}");
    write_campaigns(&app, 3, 1).await;
    let expected = expected_ids(&app, 0, None).await;
    wait_until("delivered", Duration::from_secs(20), || {
        receiver.delivered().len() >= 3
    })
    .await;

    let r = admin_patch(&app, &path, &json!({"status": "paused"})).await;
    assert_eq!(r.status(), 200);
    let paused: Value = r.json().await.unwrap();
    assert_eq!(paused["status"], "paused");
    write_campaigns(&app, 2, 1).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(receiver.delivered().len(), 3, "nothing while paused");
    assert_eq!(admin_get(&app, &path).await["backlog"], 2);

    let first = receiver.received()[0].body["data"]["position"].clone();
    let r = admin_post(
        &app,
        &format!("{path}/replay"),
        &json!({"from_position": first}),
    )
    .await;
    assert_eq!(r.status(), 202);
    let r = admin_patch(&app, &path, &json!({"status": "active"})).await;
    assert_eq!(r.status(), 200);
    let all = expected_ids(&app, 0, None).await;
    wait_until("replayed and caught up", Duration::from_secs(20), || {
        receiver.delivered().len() >= 3 + 5
    })
    .await;
    let delivered = receiver.delivered();
    assert_eq!(delivered[..3], expected[..]);
    assert_eq!(delivered[3..], all[..], "the same ids again, then the rest");
}

#[tokio::test]
async fn after_a_rotation_messages_verify_with_the_old_and_the_new_secret() {
    let app = spawn_app_configured(fast).await;
    let receiver = Receiver::start().await;
    let created = subscribe(&app, &receiver, json!({})).await;
    let id = created["id"].as_str().unwrap();
    let r = admin_post(
        &app,
        &format!("/v1/subscriptions/{id}/rotate-secret"),
        &json!({}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let rotated: Value = r.json().await.unwrap();
    let new_secret = rotated["secret"].as_str().unwrap();
    assert_ne!(new_secret, created["secret"].as_str().unwrap());
    receiver.verify_with(new_secret);
    receiver.require_all_secrets();
    write_campaigns(&app, 2, 1).await;
    wait_until("delivered", Duration::from_secs(20), || {
        receiver.delivered().len() >= 2
    })
    .await;
    for r in receiver.received() {
        assert_eq!(r.signature.split(' ').count(), 2, "{}", r.signature);
    }
}

#[tokio::test]
async fn two_servers_on_one_database_never_deliver_one_subscription_at_once() {
    // A generous attempt timeout: an overlap can only come from two deliverers.
    let patient = |app: &mut App| {
        fast(app);
        app.outbound.timeout = Duration::from_secs(10);
    };
    let first = spawn_app_configured(patient).await;
    let second = spawn_beside(&first, patient).await;
    let receiver = Receiver::start().await;
    receiver.otherwise(Some(Behaviour::Slow(Duration::from_millis(15))));
    subscribe(&first, &receiver, json!({})).await;
    write_campaigns(&first, 15, 3).await;
    write_campaigns(&second, 15, 3).await;
    let expected = expected_ids(&first, 0, None).await;
    wait_until("all delivered", Duration::from_secs(30), || {
        receiver.delivered().len() >= 30
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.delivered(), expected);
    assert_eq!(receiver.max_in_flight(), 1, "never two deliveries at once");
    let holders: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1 AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(leadledger::app::delivery::LOCK_CLASS)
    .fetch_one(&first.pool)
    .await
    .unwrap();
    assert_eq!(holders, 1);
}

#[tokio::test]
async fn loopback_private_and_metadata_targets_are_refused_with_the_protection_on() {
    let app = spawn_app_configured(|app| {
        fast(app);
        app.outbound.allow_private = false;
    })
    .await;
    for url in [
        "https://127.0.0.1/hook",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/hook",
        "https://[fd00:ec2::254]/",
        "https://2130706433/",
        "http://example.com/hook",
    ] {
        let r = admin_post(&app, "/v1/subscriptions", &json!({"url": url})).await;
        let problem = assert_problem(r, 422).await;
        assert_eq!(problem["errors"][0]["field"], "url", "{url}: {problem}");
    }
    assert_eq!(app.count("subscriptions").await, 0);

    // A name that resolves to loopback passes the URL check, and is refused when resolved:
    // no connection is ever made to it.
    let receiver = Receiver::start().await;
    let url = format!("https://localhost:{}/hook", receiver.port);
    let r = admin_post(&app, "/v1/subscriptions", &json!({"url": url})).await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    write_campaigns(&app, 1, 1).await;
    let log_path = format!(
        "/v1/subscriptions/{}/deliveries",
        created["id"].as_str().unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = admin_get(&app, &log_path).await;
        if !log["items"].as_array().unwrap().is_empty() {
            break log;
        }
        assert!(Instant::now() < deadline, "no attempt logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let error = log["items"][0]["error"].as_str().unwrap();
    assert!(error.contains("refused"), "{error}");
    assert!(log["items"][0]["status_code"].is_null());
    assert_eq!(receiver.connections(), 0, "never reached");
}

#[tokio::test]
async fn a_redirect_is_never_followed() {
    let app = spawn_app_configured(fast).await;
    let inside = Receiver::start().await;
    let outside = Receiver::start().await;
    outside.script([Behaviour::Redirect(inside.url.clone())]);
    let created = subscribe(&app, &outside, json!({})).await;
    write_campaigns(&app, 1, 1).await;
    wait_until(
        "delivered after the redirect",
        Duration::from_secs(20),
        || outside.delivered().len() == 1,
    )
    .await;
    assert_eq!(outside.received()[0].answered, Some(302));
    assert_eq!(
        inside.connections(),
        0,
        "the redirect target was never reached"
    );
    // The receiver answers before the server logs the attempt: read until both are there.
    let log_path = format!(
        "/v1/subscriptions/{}/deliveries",
        created["id"].as_str().unwrap()
    );
    let log = read_until(
        async || admin_get(&app, &log_path).await,
        |log| {
            log["items"]
                .as_array()
                .is_some_and(|items| items.len() >= 2)
        },
    )
    .await;
    let codes: Vec<&Value> = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["status_code"])
        .collect();
    assert_eq!(codes, [&json!(200), &json!(302)]);
}

#[tokio::test]
async fn invalid_requests_are_refused_with_problems_and_store_nothing() {
    let app = spawn_app_configured(fast).await;
    let cases = [
        (json!({"url": "not a url"}), 422),
        (json!({"url": "ftp://example.com/"}), 422),
        (json!({"url": "https://user:pw@example.com/"}), 422),
        (
            json!({"url": "https://example.com/", "event_types": ["NoSuchEvent"]}),
            422,
        ),
        (
            json!({"url": "https://example.com/", "event_types": ["widget.*"]}),
            422,
        ),
        (
            json!({"url": "https://example.com/", "event_types": []}),
            422,
        ),
        (
            json!({"url": "https://example.com/", "event_types": "ContactCreated"}),
            422,
        ),
        (
            json!({"url": "https://example.com/", "secret": "mine"}),
            422,
        ),
        (json!({"event_types": ["*"]}), 422),
        (json!({"url": 7}), 422),
        (
            json!({"url": "https://example.com/", "description": "x".repeat(501)}),
            422,
        ),
    ];
    for (body, status) in cases {
        let r = admin_post(&app, "/v1/subscriptions", &body).await;
        assert_problem(r, status).await;
    }
    let r = app
        .client
        .post(app.url("/v1/subscriptions"))
        .bearer_auth(&app.admin_key)
        .header("content-type", "application/json")
        .body("{\"url\": ")
        .send()
        .await
        .unwrap();
    assert_problem(r, 400).await;
    let r = app
        .client
        .post(app.url("/v1/subscriptions"))
        .bearer_auth(&app.write_key)
        .json(&json!({"url": "https://example.com/"}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403).await;
    assert_eq!(app.count("subscriptions").await, 0);
    assert_eq!(app.count("subscription_secrets").await, 0);

    let r = admin_post(
        &app,
        "/v1/subscriptions",
        &json!({"url": "https://example.com/"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let path = format!("/v1/subscriptions/{}", created["id"].as_str().unwrap());
    let before = admin_get(&app, &path).await;
    for body in [
        json!({"status": "disabled"}),
        json!({"status": "running"}),
        json!({"event_types": ["Nope"]}),
        json!({"backlog": 0}),
    ] {
        let r = admin_patch(&app, &path, &body).await;
        assert_problem(r, 422).await;
    }
    for body in [
        json!({"from_position": "yesterday"}),
        json!({"from_position": -1}),
        json!({"from_position": 999999}),
        json!({"from_position": null}),
        json!({}),
    ] {
        let r = admin_post(&app, &format!("{path}/replay"), &body).await;
        assert_problem(r, 422).await;
    }
    let after = admin_get(&app, &path).await;
    assert_eq!(before, after, "nothing changed");
    assert_problem(
        app.client
            .get(app.url("/v1/subscriptions/not-an-id"))
            .bearer_auth(&app.admin_key)
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    assert_problem(
        app.client
            .get(app.url(&format!("/v1/subscriptions/{}", uuid::Uuid::new_v4())))
            .bearer_auth(&app.admin_key)
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    assert_problem(
        app.client
            .get(app.url("/v1/subscriptions?limit=0"))
            .bearer_auth(&app.admin_key)
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;

    let r = app
        .client
        .delete(app.url(&path))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(app.count("subscriptions").await, 0);
    assert_eq!(app.count("subscription_secrets").await, 0);
}

#[tokio::test]
async fn a_retried_create_with_its_idempotency_key_shows_the_same_secret_and_makes_one() {
    let app = spawn_app_configured(fast).await;
    let send = || {
        app.client
            .post(app.url("/v1/subscriptions"))
            .bearer_auth(&app.admin_key)
            .header("idempotency-key", "sub-1")
            .json(&json!({"url": "https://example.com/hook"}))
            .send()
    };
    let first: Value = send().await.unwrap().json().await.unwrap();
    let again = send().await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(first, again);
    assert_eq!(app.count("subscriptions").await, 1);
    let stored: String = sqlx::query_scalar(
        "SELECT convert_from(response_body, 'UTF8') FROM idempotency_records LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap_or_default();
    assert!(!stored.contains(first["secret"].as_str().unwrap()));
}

/// `serve` as a process, with the outbound settings of these tests.
fn serve_delivering(data: &std::path::Path) -> crate::lifecycle::Server {
    let mut cmd = crate::lifecycle::leadledger(data);
    cmd.env("LEADLEDGER_OUTBOUND_ALLOW_PRIVATE", "true")
        .env("LEADLEDGER_SUBSCRIPTION_RETRY_SCALE", "0.001")
        .env("LEADLEDGER_OUTBOUND_TIMEOUT_MS", "3000");
    crate::lifecycle::serve(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_killed_mid_stream_and_restarted_redelivers_at_most_the_message_in_flight() {
    use nix::sys::signal::Signal;
    let data = crate::faults::DataDir::new();
    let server = serve_delivering(&data.path);
    let key = crate::faults::admin_key(&data.path);
    let client = reqwest::Client::new();
    let receiver = Receiver::start().await;
    // Slow answers keep a message in flight most of the time.
    receiver.otherwise(Some(Behaviour::Slow(Duration::from_millis(25))));
    let created: Value = client
        .post(format!("{}/v1/subscriptions", server.address))
        .bearer_auth(&key)
        .json(&json!({"url": receiver.url}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    receiver.verify_with(created["secret"].as_str().unwrap());
    for i in 0..60 {
        let r = client
            .post(format!("{}/v1/campaigns", server.address))
            .bearer_auth(&key)
            .json(&json!({"name": format!("c{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    wait_until("a third delivered", Duration::from_secs(60), || {
        receiver.received().len() >= 20
    })
    .await;
    server.signal(Signal::SIGKILL);
    server.wait();
    let before_kill = receiver.received();
    assert!(before_kill.len() < 60, "the kill came mid-stream");
    let in_flight = before_kill.last().unwrap().id.clone();

    let server = serve_delivering(&data.path);
    let url = crate::lifecycle::db_url(&data.path);
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let positions: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM events ORDER BY transaction_id, position")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let expected: Vec<String> = positions.iter().map(|p| format!("evt_{p}")).collect();
    assert_eq!(expected.len(), 60);
    wait_until(
        "all delivered after the restart",
        Duration::from_secs(90),
        || {
            receiver
                .received()
                .last()
                .is_some_and(|r| r.id == expected[59])
                && receiver.delivered().len() >= 60
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received: Vec<String> = receiver.received().into_iter().map(|r| r.id).collect();
    let mut unique = received.clone();
    unique.dedup();
    assert_eq!(unique, expected, "every event, in order");
    let repeated: Vec<&String> = received
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| &w[0])
        .collect();
    assert!(
        repeated.is_empty() || repeated == [&in_flight],
        "only the message in flight at the kill comes again: {repeated:?} (in flight: {in_flight})"
    );
    server.signal(Signal::SIGTERM);
    assert!(server.wait().success());
}

#[tokio::test]
async fn subscriptions_are_managed_from_the_command_line() {
    let data = crate::faults::DataDir::new();
    let run = |args: &[&str], allow_private: bool| {
        let mut cmd = crate::lifecycle::leadledger(&data.path);
        if allow_private {
            cmd.env("LEADLEDGER_OUTBOUND_ALLOW_PRIVATE", "true");
        }
        let out = cmd.arg("subscriptions").args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, _, stderr) = run(&["create", "https://10.0.0.1/hook"], false);
    assert!(!ok);
    assert!(stderr.contains("url:"), "{stderr}");
    let (ok, _, stderr) = run(
        &["create", "https://example.com/hook", "--event-type", "Nope"],
        false,
    );
    assert!(!ok);
    assert!(stderr.contains("event_types[0]"), "{stderr}");

    let (ok, stdout, stderr) = run(
        &[
            "create",
            "http://127.0.0.1:9/hook",
            "--event-type",
            "contact.*",
        ],
        true,
    );
    assert!(ok, "{stderr}");
    let secret = stdout.lines().last().unwrap();
    assert!(secret.starts_with("whsec_"), "{stdout}");
    let id = stdout
        .split_whitespace()
        .nth(2)
        .expect("the id in the first line")
        .to_string();
    let (ok, stdout, _) = run(&["list"], false);
    assert!(ok);
    assert!(
        stdout.contains(&id) && stdout.contains("active"),
        "{stdout}"
    );
    assert!(!stdout.contains(secret));
    let (ok, _, stderr) = run(&["pause", &id], false);
    assert!(ok, "{stderr}");
    let (ok, stdout, _) = run(&["show", &id], false);
    assert!(ok);
    let shown: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["status"], "paused");
    assert_eq!(shown["event_types"], json!(["contact.*"]));
    let (ok, stdout, _) = run(&["rotate-secret", &id], false);
    assert!(ok);
    assert!(stdout.lines().last().unwrap().starts_with("whsec_"));
    let (ok, _, _) = run(&["replay", &id, "--from", "0"], false);
    assert!(ok);
    let (ok, _, _) = run(&["deliveries", &id], false);
    assert!(ok);
    let (ok, _, _) = run(&["delete", &id], false);
    assert!(ok);
    let (ok, _, stderr) = run(&["show", &id], false);
    assert!(!ok);
    assert!(stderr.contains("no subscription"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_server_delivering_a_subscription_is_killed_the_other_takes_it_over() {
    use base64::Engine;
    use nix::sys::signal::Signal;
    let secret_key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let first_data = crate::faults::DataDir::new();
    let mut cmd = crate::lifecycle::leadledger(&first_data.path);
    cmd.env("LEADLEDGER_SECRET_KEY", &secret_key)
        .env("LEADLEDGER_OUTBOUND_ALLOW_PRIVATE", "true")
        .env("LEADLEDGER_SUBSCRIPTION_RETRY_SCALE", "0.001");
    let first = crate::lifecycle::serve(cmd);
    let key = crate::faults::admin_key(&first_data.path);
    let url = crate::lifecycle::db_url(&first_data.path);
    let (_keep, second_data) = crate::lifecycle::data_dir();
    let mut cmd = crate::lifecycle::leadledger(&second_data);
    cmd.env("DATABASE_URL", &url)
        .env("LEADLEDGER_SECRET_KEY", &secret_key)
        .env("LEADLEDGER_OUTBOUND_ALLOW_PRIVATE", "true")
        .env("LEADLEDGER_SUBSCRIPTION_RETRY_SCALE", "0.001");
    let second = crate::lifecycle::serve(cmd);

    let client = reqwest::Client::new();
    let receiver = Receiver::start().await;
    receiver.otherwise(Some(Behaviour::Slow(Duration::from_millis(25))));
    let created: Value = client
        .post(format!("{}/v1/subscriptions", first.address))
        .bearer_auth(&key)
        .json(&json!({"url": receiver.url}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    receiver.verify_with(created["secret"].as_str().unwrap());
    for i in 0..40 {
        let r = client
            .post(format!("{}/v1/campaigns", second.address))
            .bearer_auth(&key)
            .json(&json!({"name": format!("c{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    wait_until("some delivered", Duration::from_secs(60), || {
        receiver.received().len() >= 10
    })
    .await;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let holder: String = sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity
         WHERE application_name LIKE 'leadledger-sub:%'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let (killed, survivor) = if holder.contains(&format!(":pid{}:", first.pid())) {
        (first, second)
    } else {
        assert!(
            holder.contains(&format!(":pid{}:", second.pid())),
            "{holder}"
        );
        (second, first)
    };
    killed.signal(Signal::SIGKILL);
    killed.wait();
    let in_flight = receiver.received().last().unwrap().id.clone();

    let positions: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM events ORDER BY transaction_id, position")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let expected: Vec<String> = positions.iter().map(|p| format!("evt_{p}")).collect();
    wait_until(
        "all delivered by the survivor",
        Duration::from_secs(90),
        || {
            receiver.delivered().len() >= expected.len()
                && receiver
                    .received()
                    .last()
                    .is_some_and(|r| r.id == expected[39])
        },
    )
    .await;
    let holder: String = sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity
         WHERE application_name LIKE 'leadledger-sub:%'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(
        holder.contains(&format!(":pid{}:", survivor.pid())),
        "{holder}"
    );
    let received: Vec<String> = receiver.received().into_iter().map(|r| r.id).collect();
    let mut unique = received.clone();
    unique.dedup();
    assert_eq!(unique, expected, "every event, in order");
    assert!(received.len() <= expected.len() + 1, "{received:?}");
    if received.len() == expected.len() + 1 {
        assert!(
            received
                .windows(2)
                .any(|w| w[0] == w[1] && w[0] == in_flight)
        );
    }
    assert_eq!(receiver.max_in_flight(), 1);
    survivor.signal(Signal::SIGTERM);
    assert!(survivor.wait().success());
}

#[tokio::test]
async fn personal_data_goes_out_readable_and_an_erased_persons_events_go_out_redacted() {
    let app = spawn_app_configured(fast).await;
    let receiver = Receiver::start().await;
    let created = subscribe(&app, &receiver, json!({"event_types": ["contact.*"]})).await;
    let subscription = created["id"].as_str().unwrap().to_string();
    let contact: Value = app
        .post(
            "/v1/contacts",
            &json!({"email": "sub.person@example.com", "first_name": "Subby"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = contact["id"].as_str().unwrap().to_string();
    wait_until("ContactCreated delivered", Duration::from_secs(20), || {
        !receiver.delivered().is_empty()
    })
    .await;
    let first = receiver.received()[0].clone();
    assert_eq!(first.body["type"], "ContactCreated");
    assert!(
        first.body.to_string().contains("sub.person@example.com"),
        "decrypted at send time: {}",
        first.body
    );
    let erased = app
        .client
        .delete(app.url(&format!("/v1/contacts/{id}")))
        .bearer_auth(&app.write_key)
        .send()
        .await
        .unwrap();
    assert_eq!(erased.status(), 200);
    wait_until("ContactErased delivered", Duration::from_secs(20), || {
        receiver.delivered().len() >= 2
    })
    .await;
    let r = admin_post(
        &app,
        &format!("/v1/subscriptions/{subscription}/replay"),
        &json!({"from_position": first.body["data"]["position"]}),
    )
    .await;
    assert_eq!(r.status(), 202);
    wait_until("replayed", Duration::from_secs(20), || {
        receiver.delivered().len() >= 4
    })
    .await;
    let received = receiver.received();
    let again = received
        .iter()
        .skip(2)
        .find(|r| r.id == first.id)
        .expect("the creation sent again, with its id");
    let text = again.body.to_string();
    assert!(
        !text.contains("sub.person@example.com") && !text.contains("Subby"),
        "an erased person's events go out redacted: {text}"
    );
}
