//! Provider sources, each kind as its provider sends: the payloads their documentation
//! shows (field names, nesting, extra fields we ignore), authenticated the way the
//! provider authenticates (SendGrid's ECDSA signature with a key pair made here, Mailgun's
//! HMAC over timestamp and token, Postmark's Basic credentials, tokens). Out of order and
//! twice equals in order once; every authentication failure is 401 with nothing recorded;
//! hostile bodies never give a 5xx; rotation keeps the old credential for its grace.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::EncodePublicKey;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::helpers::{TestApp, assert_problem, spawn_app};
use crate::webhooks::signature;

/// Every kind of source.
const KINDS: [&str; 7] = [
    "standard",
    "sendgrid",
    "mailgun",
    "postmark",
    "instantly",
    "smartlead",
    "custom",
];

/// A source made in a test, with what its deliveries need.
struct Source {
    name: String,
    kind: &'static str,
    /// standard: the HMAC key; mailgun: the signing key's bytes.
    key: Vec<u8>,
    /// sendgrid: the private half of the key pair whose public half the source holds.
    signer: Option<SigningKey>,
    /// postmark: `user:password`; instantly, smartlead, custom: the token.
    credential: String,
}

fn custom_mapping() -> Value {
    json!({
        "events": "/data/events",
        "id": "/event_id",
        "type": "/kind",
        "email": "/lead/email",
        "occurred_at": "/at",
        "campaign": "/campaign",
        "types": {"mail_sent": "sent", "mail_opened": "opened", "link_click": "clicked",
                  "got_reply": "replied", "hard_bounce": "bounced"}
    })
}

async fn create_source(app: &TestApp, name: &str, kind: &'static str) -> Source {
    let signer = (kind == "sendgrid").then(|| SigningKey::random(&mut rand_core::OsRng));
    let mut body = json!({"name": name, "kind": kind});
    if let Some(signer) = &signer {
        let der = signer.verifying_key().to_public_key_der().unwrap();
        body["public_key"] = json!(STANDARD.encode(der.as_bytes()));
    }
    let mailgun_key = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0";
    if kind == "mailgun" {
        body["signing_key"] = json!(mailgun_key);
    }
    if kind == "custom" {
        body["mapping"] = custom_mapping();
    }
    let response = app
        .client
        .post(app.url("/v1/webhook-sources"))
        .bearer_auth(&app.admin_key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201, "creating a {kind} source");
    let made: Value = response.json().await.unwrap();
    assert_eq!(made["kind"], kind);
    let text = |k: &str| made[k].as_str().unwrap_or_default().to_string();
    let (key, credential) = match kind {
        "standard" => (
            STANDARD
                .decode(text("secret").strip_prefix("whsec_").unwrap())
                .unwrap(),
            String::new(),
        ),
        "mailgun" => (mailgun_key.as_bytes().to_vec(), String::new()),
        "postmark" => (
            Vec::new(),
            format!("{}:{}", text("username"), text("password")),
        ),
        "sendgrid" => (Vec::new(), String::new()),
        _ => (Vec::new(), text("token")),
    };
    for k in ["secret", "username", "password", "token"] {
        assert_eq!(
            made.get(k).is_some_and(|v| !v.is_null()),
            match kind {
                "standard" => k == "secret",
                "postmark" => k == "username" || k == "password",
                "instantly" | "smartlead" | "custom" => k == "token",
                _ => false,
            },
            "{kind} shows {k}?"
        );
    }
    Source {
        name: name.to_string(),
        kind,
        key,
        signer,
        credential,
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn random_hex(n: usize) -> String {
    use rand::RngCore;
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn mailgun_signature(key: &[u8], timestamp: &str, token: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(token.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// A request as the provider makes it: headers, query and body.
struct Request {
    headers: Vec<(String, String)>,
    query: String,
    body: Vec<u8>,
}

/// What a delivery of `events` (in the provider's own event shape) looks like, signed
/// or authenticated as the provider does. Kinds that send one event per request get one.
fn request(source: &Source, events: &[Value]) -> Request {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut query = String::new();
    let body: Vec<u8> = match source.kind {
        "standard" => {
            let body = serde_json::to_vec(&Value::Array(events.to_vec())).unwrap();
            let id = format!("msg_{}", random_hex(8));
            let ts = now();
            headers.push(("webhook-id".into(), id.clone()));
            headers.push(("webhook-timestamp".into(), ts.to_string()));
            headers.push((
                "webhook-signature".into(),
                signature(&source.key, &id, ts, &body),
            ));
            body
        }
        "sendgrid" => {
            let body = serde_json::to_vec(&Value::Array(events.to_vec())).unwrap();
            let ts = now().to_string();
            let mut signed = ts.as_bytes().to_vec();
            signed.extend_from_slice(&body);
            let signature: Signature = source.signer.as_ref().unwrap().sign(&signed);
            headers.push((
                "X-Twilio-Email-Event-Webhook-Signature".into(),
                STANDARD.encode(signature.to_der().as_bytes()),
            ));
            headers.push(("X-Twilio-Email-Event-Webhook-Timestamp".into(), ts));
            body
        }
        "mailgun" => {
            assert_eq!(events.len(), 1, "Mailgun posts one event at a time");
            let ts = now().to_string();
            let token = random_hex(25);
            let signature = mailgun_signature(&source.key, &ts, &token);
            serde_json::to_vec(&json!({
                "signature": {"timestamp": ts, "token": token, "signature": signature},
                "event-data": events[0],
            }))
            .unwrap()
        }
        "postmark" => {
            assert_eq!(events.len(), 1, "Postmark posts one record at a time");
            headers.push((
                "authorization".into(),
                format!("Basic {}", STANDARD.encode(&source.credential)),
            ));
            serde_json::to_vec(&events[0]).unwrap()
        }
        "instantly" => {
            assert_eq!(events.len(), 1, "Instantly posts one event at a time");
            query = format!("token={}", source.credential);
            serde_json::to_vec(&events[0]).unwrap()
        }
        "smartlead" => {
            assert_eq!(events.len(), 1, "Smartlead posts one event at a time");
            let mut event = events[0].clone();
            if let Some(o) = event.as_object_mut() {
                o.insert("secret_key".into(), json!(source.credential));
            }
            serde_json::to_vec(&event).unwrap()
        }
        "custom" => {
            headers.push((
                "authorization".into(),
                format!("Bearer {}", source.credential),
            ));
            serde_json::to_vec(&json!({"data": {"events": events}, "sent_by": "in-house mailer"}))
                .unwrap()
        }
        other => unreachable!("{other}"),
    };
    Request {
        headers,
        query,
        body,
    }
}

async fn send(app: &TestApp, source: &str, request: &Request) -> reqwest::Response {
    let mut url = app.url(&format!("/webhooks/{source}"));
    if !request.query.is_empty() {
        url = format!("{url}?{}", request.query);
    }
    let mut builder = app
        .client
        .post(url)
        .header("content-type", "application/json")
        .body(request.body.clone());
    for (k, v) in &request.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    builder.send().await.unwrap()
}

async fn deliver(app: &TestApp, source: &Source, events: &[Value]) -> Value {
    let response = send(app, &source.name, &request(source, events)).await;
    assert_eq!(response.status().as_u16(), 200, "{} delivery", source.kind);
    response.json().await.unwrap()
}

/// Whom the events are for: our ids, and the engagement tool's campaign id.
struct Target {
    campaign: String,
    enrollment: String,
    email: String,
    their_campaign: String,
}

/// A milestone as each provider names it, with where in time it happened; `None` for a
/// step the provider has no event for.
#[derive(Clone, Copy)]
enum Step {
    Sent,
    Delivered,
    Opened,
    Clicked,
    /// Replied for engagement tools; unsubscribed for email providers.
    Last,
    /// A type that carries no milestone.
    Noise,
}

const STEPS: [(Step, &str); 7] = [
    (Step::Sent, "2026-11-01T09:00:00Z"),
    (Step::Delivered, "2026-11-01T09:00:05Z"),
    (Step::Opened, "2026-11-01T09:30:00Z"),
    (Step::Clicked, "2026-11-01T09:31:00Z"),
    (Step::Opened, "2026-11-01T09:10:00Z"),
    (Step::Noise, "2026-11-01T09:45:00Z"),
    (Step::Last, "2026-11-01T10:00:00Z"),
];

fn unix(at: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(at)
        .unwrap()
        .timestamp()
}

/// Event `n` of the documented shape of `kind`, for `target`; `None` when the provider
/// has no such step (Postmark has no "sent", engagement tools no "delivered").
fn provider_event(kind: &str, n: usize, step: Step, at: &str, t: &Target) -> Option<Value> {
    let id = format!("{}-{n}", t.enrollment);
    Some(match kind {
        "standard" => {
            let kind = match step {
                Step::Sent => "sent",
                Step::Delivered => "delivered",
                Step::Opened => "opened",
                Step::Clicked => "clicked",
                Step::Last => "unsubscribed",
                Step::Noise => return None,
            };
            json!({"id": id, "type": kind, "occurred_at": at, "campaign_id": t.campaign,
                   "email": t.email})
        }
        "sendgrid" => {
            let event = match step {
                Step::Sent => "processed",
                Step::Delivered => "delivered",
                Step::Opened => "open",
                Step::Clicked => "click",
                Step::Last => "unsubscribe",
                Step::Noise => "group_resubscribe",
            };
            json!({
                "email": t.email, "timestamp": unix(at), "event": event,
                "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
                "category": ["cat facts"], "sg_event_id": format!("sg{id}"),
                "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
                "useragent": "Mozilla/4.0", "ip": "255.255.255.255",
                "url": "https://example.com/offer", "response": "250 OK",
                "leadledger_campaign_id": t.campaign
            })
        }
        "mailgun" => {
            let event = match step {
                Step::Sent => "accepted",
                Step::Delivered => "delivered",
                Step::Opened => "opened",
                Step::Clicked => "clicked",
                Step::Last => "unsubscribed",
                Step::Noise => "stored",
            };
            json!({
                "event": event, "timestamp": unix(at) as f64 + 0.329574,
                "id": format!("mg{id}"), "log-level": "info", "recipient": t.email,
                "recipient-domain": "example.com", "tags": ["my_tag_1"],
                "envelope": {"transport": "smtp", "sender": "bob@sandbox.mailgun.org"},
                "message": {"headers": {"message-id": "20130503182626.18666.16540@sandbox.mailgun.org",
                            "subject": "Hello"}},
                "flags": {"is-routed": false, "is-authenticated": true, "is-test-mode": false},
                "user-variables": {"leadledger_enrollment_id": t.enrollment, "my_var": "x"}
            })
        }
        "postmark" => {
            let mut record = match step {
                Step::Sent => return None,
                Step::Delivered => json!({"RecordType": "Delivery", "DeliveredAt": at,
                    "Details": "Test delivery webhook details", "Recipient": t.email}),
                Step::Opened => json!({"RecordType": "Open", "FirstOpen": true, "ReceivedAt": at,
                    "Client": {"Name": "Chrome 35.0.1916.153"}, "Platform": "WebMail",
                    "ReadSeconds": 5, "Recipient": t.email}),
                Step::Clicked => json!({"RecordType": "Click", "ClickLocation": "HTML",
                    "OriginalLink": "https://example.com", "ReceivedAt": at, "Recipient": t.email}),
                Step::Last => json!({"RecordType": "SubscriptionChange", "ChangedAt": at,
                    "Origin": "Recipient", "SuppressSending": true,
                    "SuppressionReason": "ManualSuppression", "Recipient": t.email}),
                Step::Noise => json!({"RecordType": "SubscriptionChange", "ChangedAt": at,
                    "Origin": "Customer", "SuppressSending": false, "Recipient": t.email}),
            };
            let o = record.as_object_mut().unwrap();
            o.insert(
                "MessageID".into(),
                json!(format!("883953f4-6105-42a2-a16a-{n:012}")),
            );
            o.insert("ServerID".into(), json!(23));
            o.insert("MessageStream".into(), json!("outbound"));
            o.insert("Tag".into(), json!("welcome-email"));
            o.insert(
                "Metadata".into(),
                json!({"leadledger_campaign_id": t.campaign, "a_key": "a_value"}),
            );
            record
        }
        "instantly" => {
            let event = match step {
                Step::Sent => "email_sent",
                Step::Delivered => return None,
                Step::Opened => "email_opened",
                Step::Clicked => "link_clicked",
                Step::Last => "reply_received",
                Step::Noise => "lead_interested",
            };
            json!({
                "timestamp": at, "event_type": event,
                "workspace": "f4bb8f1e-0c1b-4e6b-8a8c-2b2c3b1d2e3f",
                "campaign_id": t.their_campaign, "campaign_name": "Q4 outbound",
                "lead_email": t.email, "email_account": "sales@ourco.example",
                "unibox_url": "https://app.instantly.ai/app/unibox", "step": 1, "variant": 1,
                "is_first": n == 0
            })
        }
        "smartlead" => {
            let event = match step {
                Step::Sent => "EMAIL_SENT",
                Step::Delivered => return None,
                Step::Opened => "EMAIL_OPEN",
                Step::Clicked => "EMAIL_LINK_CLICK",
                Step::Last => "EMAIL_REPLY",
                Step::Noise => "LEAD_CATEGORY_UPDATED",
            };
            json!({
                "webhook_id": 1234, "webhook_name": "leadledger", "event_type": event,
                "event_timestamp": at, "campaign_id": t.their_campaign.parse::<i64>().unwrap(),
                "campaign_name": "Q4 outbound", "sequence_number": 1,
                "to_email": t.email, "to_name": "Ann", "from_email": "sales@ourco.example",
                "subject": "Quick question", "stats_id": format!("st-{n}"),
                "app_url": "https://app.smartlead.ai/app/master-inbox"
            })
        }
        "custom" => {
            let event = match step {
                Step::Sent => "mail_sent",
                Step::Delivered => return None,
                Step::Opened => "mail_opened",
                Step::Clicked => "link_click",
                Step::Last => "got_reply",
                Step::Noise => "lead_scored",
            };
            json!({"event_id": format!("c{id}"), "kind": event, "lead": {"email": t.email,
                   "name": "Ann"}, "at": at, "campaign": t.their_campaign, "score": 7})
        }
        other => unreachable!("{other}"),
    })
}

/// A campaign with `email` enrolled, linked to `their_campaign` for engagement tools.
async fn target(app: &TestApp, source: &Source, email: &str, their_campaign: &str) -> Target {
    let (campaign, enrollment) = crate::webhooks::enrolled(app, email).await;
    if matches!(source.kind, "instantly" | "smartlead" | "custom") {
        let response = app
            .client
            .patch(app.url(&format!("/v1/campaigns/{campaign}")))
            .bearer_auth(&app.write_key)
            .json(&json!({"external_ids": {source.name.clone(): their_campaign}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
    }
    Target {
        campaign,
        enrollment,
        email: email.to_string(),
        their_campaign: their_campaign.to_string(),
    }
}

/// The enrollment and its campaign's metrics, without what differs between campaigns.
async fn outcome(app: &TestApp, t: &Target, expect_last: &str) -> (Value, Value) {
    let mut one: Value = app
        .read(&format!("/v1/enrollments/{}", t.enrollment))
        .await
        .json()
        .await
        .unwrap();
    let mut metrics = Value::Null;
    for _ in 0..200 {
        metrics = app
            .read(&format!("/v1/campaigns/{}/metrics", t.campaign))
            .await
            .json()
            .await
            .unwrap();
        // Events arrive in any order, so wait for the last count each one moves; every
        // milestone of the steps implies the ones before it.
        if metrics[expect_last] == 1 && metrics["clicked"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for k in ["id", "campaign_id", "contact_id", "enrolled_at"] {
        one.as_object_mut().unwrap().remove(k);
    }
    metrics.as_object_mut().unwrap().remove("campaign_id");
    (one, metrics)
}

fn outcomes(response: &Value) -> Vec<String> {
    response["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn each_kinds_documented_events_out_of_order_and_twice_equal_them_in_order_once() {
    let app = spawn_app().await;
    for (k, kind) in KINDS.into_iter().enumerate() {
        let source = create_source(&app, &format!("{kind}-src"), kind).await;
        let ordered = target(
            &app,
            &source,
            &format!("ordered-{kind}@example.com"),
            &format!("{}01", k + 1),
        )
        .await;
        let shuffled = target(
            &app,
            &source,
            &format!("shuffled-{kind}@example.com"),
            &format!("{}02", k + 1),
        )
        .await;
        let events = |t: &Target| -> Vec<Value> {
            STEPS
                .iter()
                .enumerate()
                .filter_map(|(n, (step, at))| provider_event(kind, n, *step, at, t))
                .collect()
        };
        let batched = matches!(kind, "standard" | "sendgrid" | "custom");
        // In order, once.
        let in_order = events(&ordered);
        let mut results = Vec::new();
        if batched {
            results.extend(outcomes(&deliver(&app, &source, &in_order).await));
        } else {
            for e in &in_order {
                results.extend(outcomes(
                    &deliver(&app, &source, std::slice::from_ref(e)).await,
                ));
            }
        }
        let noise = STEPS
            .iter()
            .filter(|(s, _)| matches!(s, Step::Noise))
            .count();
        let ignored = results.iter().filter(|o| *o == "ignored").count();
        assert_eq!(
            ignored,
            if kind == "standard" { 0 } else { noise },
            "{kind}: a type without a milestone is ignored: {results:?}"
        );
        assert!(
            results.iter().all(|o| o == "applied" || o == "ignored"),
            "{kind}: {results:?}"
        );
        // Reversed, each delivery twice (the batch kinds also split in two).
        let mut reversed = events(&shuffled);
        reversed.reverse();
        let deliveries: Vec<Vec<Value>> = if batched {
            let (a, b) = reversed.split_at(reversed.len() / 2);
            vec![a.to_vec(), b.to_vec()]
        } else {
            reversed.iter().map(|e| vec![e.clone()]).collect()
        };
        for delivery in &deliveries {
            for _ in 0..2 {
                let answer = deliver(&app, &source, delivery).await;
                assert!(
                    !outcomes(&answer).iter().any(|o| o == "rejected"),
                    "{kind}: {answer}"
                );
            }
        }
        let last = if matches!(kind, "instantly" | "smartlead" | "custom") {
            "replied"
        } else {
            "unsubscribed"
        };
        let a = outcome(&app, &ordered, last).await;
        let b = outcome(&app, &shuffled, last).await;
        assert_eq!(
            a, b,
            "{kind}: the same state whatever the order and repeats"
        );
        assert_eq!(a.0["status"], last, "{kind}: {}", a.0);
        assert!(
            a.0["opened_at"]
                .as_str()
                .unwrap()
                .starts_with("2026-11-01T09:10:00"),
            "{kind}: the earliest open: {}",
            a.0
        );
        assert_eq!(a.1["clicked"], 1, "{kind}: {}", a.1);
    }
    // Per-source counts include ignored events; no credential is listed.
    let listed = app
        .client
        .get(app.url("/v1/webhook-sources"))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let sendgrid = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "sendgrid-src")
        .unwrap();
    assert_eq!(sendgrid["kind"], "sendgrid");
    assert_eq!(
        sendgrid["counts"]["ignored"], 2,
        "one ignored event per contact; a replayed delivery counts once: {sendgrid}"
    );
    for item in listed["items"].as_array().unwrap() {
        for k in ["secret", "token", "password", "public_key", "signing_key"] {
            assert!(item.get(k).is_none(), "{item}");
        }
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"webhook_deliveries_total{source="mailgun-src",kind="mailgun"}"#),
        "per-source delivery counts in /metrics"
    );
}

/// The tables a delivery writes to.
async fn recorded(app: &TestApp) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in [
        "events",
        "webhook_event_ids",
        "webhook_parked",
        "webhook_deliveries",
        "webhook_once_tokens",
    ] {
        counts.push(app.count(table).await);
    }
    counts
}

#[tokio::test]
async fn every_authentication_failure_of_every_kind_is_401_and_records_nothing() {
    let app = spawn_app().await;
    for kind in KINDS {
        let source = create_source(&app, &format!("{kind}-auth"), kind).await;
        let t = target(&app, &source, &format!("auth-{kind}@example.com"), "77").await;
        let event = provider_event(kind, 0, Step::Opened, "2026-11-01T09:30:00Z", &t).unwrap();
        let good = request(&source, std::slice::from_ref(&event));
        // Variations of the good request, each of which must be refused.
        let mut bad: Vec<(&str, Request)> = Vec::new();
        let with_header = |name: &str, value: Option<String>| {
            let mut r = request(&source, std::slice::from_ref(&event));
            r.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            if let Some(v) = value {
                r.headers.push((name.to_string(), v));
            }
            r
        };
        match kind {
            "standard" => {
                bad.push(("no signature", with_header("webhook-signature", None)));
                bad.push(("no id", with_header("webhook-id", None)));
                let mut r = with_header(
                    "webhook-signature",
                    Some(signature(
                        b"another key of 32 bytes, exactly",
                        "x",
                        now(),
                        b"{}",
                    )),
                );
                r.body.push(b' ');
                bad.push(("wrong signature", r));
                let ts = now() - 301;
                let mut r = request(&source, std::slice::from_ref(&event));
                let id = r.headers[0].1.clone();
                r.headers[1].1 = ts.to_string();
                r.headers[2].1 = signature(&source.key, &id, ts, &r.body);
                bad.push(("stale", r));
            }
            "sendgrid" => {
                bad.push((
                    "no signature",
                    with_header("X-Twilio-Email-Event-Webhook-Signature", None),
                ));
                bad.push((
                    "no timestamp",
                    with_header("X-Twilio-Email-Event-Webhook-Timestamp", None),
                ));
                let mut r = request(&source, std::slice::from_ref(&event));
                r.body.extend_from_slice(b"\n");
                bad.push(("tampered body", r));
                let other = SigningKey::random(&mut rand_core::OsRng);
                let mut r = request(&source, std::slice::from_ref(&event));
                let mut signed = r.headers[1].1.as_bytes().to_vec();
                signed.extend_from_slice(&r.body);
                let sig: Signature = other.sign(&signed);
                r.headers[0].1 = STANDARD.encode(sig.to_der().as_bytes());
                bad.push(("another account's key", r));
                let ts = (now() - 301).to_string();
                let mut r = request(&source, std::slice::from_ref(&event));
                let mut signed = ts.as_bytes().to_vec();
                signed.extend_from_slice(&r.body);
                let sig: Signature = source.signer.as_ref().unwrap().sign(&signed);
                r.headers = vec![
                    (
                        "X-Twilio-Email-Event-Webhook-Signature".into(),
                        STANDARD.encode(sig.to_der().as_bytes()),
                    ),
                    ("X-Twilio-Email-Event-Webhook-Timestamp".into(), ts),
                ];
                bad.push(("stale", r));
            }
            "mailgun" => {
                let body = |ts: String, token: String, sig: String| Request {
                    headers: vec![],
                    query: String::new(),
                    body: serde_json::to_vec(&json!({
                        "signature": {"timestamp": ts, "token": token, "signature": sig},
                        "event-data": event,
                    }))
                    .unwrap(),
                };
                let token = random_hex(25);
                let ts = now().to_string();
                bad.push((
                    "wrong key",
                    body(
                        ts.clone(),
                        token.clone(),
                        mailgun_signature(b"not-the-key", &ts, &token),
                    ),
                ));
                let old = (now() - 301).to_string();
                bad.push((
                    "stale",
                    body(
                        old.clone(),
                        token.clone(),
                        mailgun_signature(&source.key, &old, &token),
                    ),
                ));
                bad.push((
                    "no signature",
                    Request {
                        headers: vec![],
                        query: String::new(),
                        body: serde_json::to_vec(&json!({"event-data": event})).unwrap(),
                    },
                ));
            }
            "postmark" => {
                bad.push(("no credentials", with_header("authorization", None)));
                bad.push((
                    "wrong password",
                    with_header(
                        "authorization",
                        Some(format!(
                            "Basic {}",
                            STANDARD.encode(format!("{}x", source.credential))
                        )),
                    ),
                ));
                bad.push((
                    "not basic",
                    with_header(
                        "authorization",
                        Some(format!("Bearer {}", source.credential)),
                    ),
                ));
            }
            "instantly" | "custom" => {
                let mut r = request(&source, std::slice::from_ref(&event));
                r.query = format!("token={}x", source.credential);
                r.headers.clear();
                bad.push(("wrong token", r));
                let mut r = request(&source, std::slice::from_ref(&event));
                r.query.clear();
                r.headers.clear();
                bad.push(("no token", r));
            }
            "smartlead" => {
                let mut e = event.clone();
                e["secret_key"] = json!("guess");
                bad.push((
                    "wrong secret_key",
                    Request {
                        headers: vec![],
                        query: String::new(),
                        body: serde_json::to_vec(&e).unwrap(),
                    },
                ));
                bad.push((
                    "no secret_key",
                    Request {
                        headers: vec![],
                        query: String::new(),
                        body: serde_json::to_vec(&event).unwrap(),
                    },
                ));
            }
            other => unreachable!("{other}"),
        }
        let before = recorded(&app).await;
        for (what, r) in &bad {
            let problem = assert_problem(send(&app, &source.name, r).await, 401).await;
            assert!(problem["detail"].as_str().is_some(), "{kind} {what}");
            assert_eq!(
                recorded(&app).await,
                before,
                "{kind} {what}: nothing recorded"
            );
        }
        // The good request still passes afterwards; for Mailgun, its token once only.
        let response = send(&app, &source.name, &good).await;
        assert_eq!(response.status().as_u16(), 200, "{kind}");
        if kind == "mailgun" {
            let after = recorded(&app).await;
            let problem = assert_problem(send(&app, &source.name, &good).await, 401).await;
            assert!(
                problem["detail"].as_str().unwrap().contains("replay"),
                "{problem}"
            );
            assert_eq!(
                recorded(&app).await,
                after,
                "a replayed token records nothing"
            );
        }
    }
    // A source that does not exist.
    let source = create_source(&app, "exists", "instantly").await;
    let t = target(&app, &source, "nosuch@example.com", "88").await;
    let event = provider_event("instantly", 0, Step::Opened, "2026-11-01T09:30:00Z", &t).unwrap();
    let before = recorded(&app).await;
    assert_problem(
        send(&app, "no-such-source", &request(&source, &[event])).await,
        401,
    )
    .await;
    assert_eq!(recorded(&app).await, before);
}

#[tokio::test]
async fn svix_and_resend_header_names_are_accepted_for_standard_sources() {
    let app = spawn_app().await;
    let source = create_source(&app, "resend", "standard").await;
    let t = target(&app, &source, "svix@example.com", "1").await;
    let event = provider_event("standard", 0, Step::Delivered, "2026-11-01T09:30:00Z", &t).unwrap();
    let mut r = request(&source, &[event]);
    for (name, _) in r.headers.iter_mut() {
        *name = name.replace("webhook-", "svix-");
    }
    let response = send(&app, &source.name, &r).await;
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(outcomes(&body), ["applied"]);
}

#[tokio::test]
async fn hostile_bodies_of_every_kind_never_give_a_5xx_and_good_events_beside_bad_ones_count() {
    let app = spawn_app().await;
    for kind in KINDS {
        let source = create_source(&app, &format!("{kind}-hostile"), kind).await;
        let t = target(&app, &source, &format!("hostile-{kind}@example.com"), "99").await;
        let good = provider_event(kind, 1, Step::Opened, "2026-11-01T09:30:00Z", &t).unwrap();
        // Wrong types and missing fields, one event at a time: answered, never a 5xx.
        let mut broken: Vec<Value> = Vec::new();
        for (field, value) in good.as_object().unwrap() {
            let mut e = good.clone();
            e.as_object_mut().unwrap().remove(field);
            broken.push(e);
            for wrong in [json!(null), json!(12), json!({"a": [1]}), json!("\u{0}x")] {
                if &wrong != value {
                    let mut e = good.clone();
                    e[field.as_str()] = wrong;
                    broken.push(e);
                }
            }
        }
        for e in broken
            .iter()
            .chain([json!(7), json!([]), json!("x")].iter())
        {
            let response = send(
                &app,
                &source.name,
                &request(&source, std::slice::from_ref(e)),
            )
            .await;
            let status = response.status().as_u16();
            assert!(status < 500, "{kind}: {status} for {e}");
            if status != 200 {
                assert_problem(response, status).await;
            }
        }
        // Deep nesting and oversize bodies, authenticated: 400 and 413.
        let mut deep = json!(1);
        for _ in 0..200 {
            deep = json!([deep]);
        }
        let mut nested = good.clone();
        nested["extra"] = deep;
        let response = send(&app, &source.name, &request(&source, &[nested])).await;
        assert!(
            response.status().as_u16() < 500,
            "{kind} deep: {}",
            response.status()
        );
        let mut big = good.clone();
        let limit = if kind == "sendgrid" {
            1024 * 1024
        } else {
            256 * 1024
        };
        big["padding"] = json!("x".repeat(limit));
        let response = send(&app, &source.name, &request(&source, &[big])).await;
        assert_problem(response, 413).await;
        if matches!(kind, "standard" | "sendgrid" | "custom") {
            let many: Vec<Value> = (0..1001).map(|_| json!({})).collect();
            assert_problem(
                send(&app, &source.name, &request(&source, &many)).await,
                413,
            )
            .await;
            // One bad event does not stop the rest.
            let mut bad = good.clone();
            bad.as_object_mut()
                .unwrap()
                .retain(|k, _| k == "email" || k == "lead");
            let fresh = provider_event(kind, 2, Step::Clicked, "2026-11-01T09:40:00Z", &t).unwrap();
            let answer = deliver(&app, &source, &[bad, fresh]).await;
            assert_eq!(
                outcomes(&answer),
                ["rejected", "applied"],
                "{kind}: {answer}"
            );
            assert!(answer["results"][0]["reason"].as_str().is_some());
        }
    }
}

#[tokio::test]
async fn a_sendgrid_batch_of_1000_events_is_one_delivery_in_one_transaction() {
    let app = spawn_app().await;
    let source = create_source(&app, "sendgrid-bulk", "sendgrid").await;
    let campaign = app.create_campaign("bulk").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut events = Vec::new();
    for i in 0..1000 {
        let t = Target {
            campaign: campaign.clone(),
            enrollment: format!("e{i}"),
            email: format!("bulk{i}@example.com"),
            their_campaign: String::new(),
        };
        events.push(
            provider_event("sendgrid", i, Step::Delivered, "2026-11-01T09:00:00Z", &t).unwrap(),
        );
    }
    let answer = deliver(&app, &source, &events).await;
    let results = outcomes(&answer);
    assert_eq!(results.len(), 1000);
    assert!(
        results.iter().all(|o| o == "parked"),
        "no enrollments yet: all parked"
    );
    assert_eq!(app.count("webhook_deliveries").await, 1);
    let transactions: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM webhook_parked")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(transactions, 1, "one transaction wrote every parked event");
}

async fn rotate(app: &TestApp, name: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/v1/webhook-sources/{name}/rotate")))
        .bearer_auth(&app.admin_key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_rotated_credential_is_accepted_beside_the_old_one_until_its_grace_ends() {
    let app = spawn_app().await;
    for kind in ["standard", "postmark", "sendgrid", "smartlead"] {
        let mut source = create_source(&app, &format!("{kind}-rot"), kind).await;
        let t = target(&app, &source, &format!("rot-{kind}@example.com"), "5").await;
        let event = |n| provider_event(kind, n, Step::Opened, "2026-11-01T09:30:00Z", &t).unwrap();
        let old_request = request(&source, &[event(1)]);
        let new_signer = (kind == "sendgrid").then(|| SigningKey::random(&mut rand_core::OsRng));
        let body = match &new_signer {
            Some(signer) => {
                json!({"public_key": STANDARD.encode(signer.verifying_key().to_public_key_der().unwrap().as_bytes())})
            }
            None => json!({}),
        };
        let response = rotate(&app, &source.name, body).await;
        assert_eq!(response.status().as_u16(), 200, "{kind}");
        let rotated: Value = response.json().await.unwrap();
        assert!(
            rotated["previous_valid_until"].as_str().is_some(),
            "{rotated}"
        );
        match kind {
            "standard" => {
                source.key = STANDARD
                    .decode(
                        rotated["secret"]
                            .as_str()
                            .unwrap()
                            .strip_prefix("whsec_")
                            .unwrap(),
                    )
                    .unwrap()
            }
            "postmark" => {
                source.credential = format!(
                    "{}:{}",
                    rotated["username"].as_str().unwrap(),
                    rotated["password"].as_str().unwrap()
                )
            }
            "sendgrid" => source.signer = new_signer,
            _ => source.credential = rotated["token"].as_str().unwrap().to_string(),
        }
        assert_eq!(
            send(&app, &source.name, &old_request)
                .await
                .status()
                .as_u16(),
            200,
            "{kind}: the old credential during the grace"
        );
        assert_eq!(
            send(&app, &source.name, &request(&source, &[event(2)]))
                .await
                .status()
                .as_u16(),
            200,
            "{kind}: the new one"
        );
        sqlx::query("UPDATE webhook_sources SET previous_expires_at = now() - interval '1 second' WHERE name = $1")
            .bind(&source.name)
            .execute(&app.pool)
            .await
            .unwrap();
        let before = recorded(&app).await;
        assert_problem(send(&app, &source.name, &old_request).await, 401).await;
        assert_eq!(recorded(&app).await, before, "{kind}");
        assert_eq!(
            send(&app, &source.name, &request(&source, &[event(3)]))
                .await
                .status()
                .as_u16(),
            200
        );
    }
    assert_problem(rotate(&app, "no-such", json!({})).await, 404).await;
    assert_problem(
        rotate(&app, "standard-rot", json!({"public_key": "x"})).await,
        422,
    )
    .await;
    assert_problem(rotate(&app, "sendgrid-rot", json!({})).await, 422).await;
}

#[tokio::test]
async fn source_creation_checks_kind_and_credentials_and_replays_them_for_its_key() {
    let app = spawn_app().await;
    let post = |body: Value, key: Option<&str>| {
        let mut r = app
            .client
            .post(app.url("/v1/webhook-sources"))
            .bearer_auth(&app.admin_key)
            .json(&body);
        if let Some(key) = key {
            r = r.header("Idempotency-Key", key);
        }
        r.send()
    };
    for (body, field) in [
        (json!({"name": "a", "kind": "Sendgrid"}), "kind"),
        (json!({"name": "a", "kind": "sendgrid"}), "public_key"),
        (
            json!({"name": "a", "kind": "sendgrid", "public_key": "bm90IGEga2V5"}),
            "public_key",
        ),
        (json!({"name": "a", "kind": "mailgun"}), "signing_key"),
        (
            json!({"name": "a", "kind": "mailgun", "signing_key": "with space"}),
            "signing_key",
        ),
        (json!({"name": "a", "kind": "custom"}), "mapping"),
        (
            json!({"name": "a", "kind": "custom", "mapping": {"id": "no-slash"}}),
            "mapping",
        ),
        (
            json!({"name": "a", "kind": "postmark", "signing_key": "k"}),
            "signing_key",
        ),
        (
            json!({"name": "a", "kind": "standard", "mapping": {}}),
            "mapping",
        ),
    ] {
        let problem = assert_problem(post(body.clone(), None).await.unwrap(), 422).await;
        assert!(
            problem.to_string().contains(field),
            "{body} names {field}: {problem}"
        );
    }
    assert_eq!(app.count("webhook_sources").await, 0);
    let first: Value = post(json!({"name": "pm", "kind": "postmark"}), Some("k1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let again: Value = post(json!({"name": "pm", "kind": "postmark"}), Some("k1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        first, again,
        "a retry with the key gets the same credentials"
    );
    let password = first["password"].as_str().unwrap();
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM idempotency_records
         WHERE position(convert_to($1, 'UTF8') IN response_body) > 0",
    )
    .bind(password)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, 0, "the recorded answer keeps the password sealed");
    assert_eq!(
        app.count("idempotency_records").await,
        1,
        "the answer is recorded"
    );
    assert_problem(
        post(json!({"name": "pm", "kind": "instantly"}), None)
            .await
            .unwrap(),
        409,
    )
    .await;
}

#[tokio::test]
async fn a_campaign_links_one_external_id_per_source_and_unlinked_events_are_rejected() {
    let app = spawn_app().await;
    let source = create_source(&app, "inst", "instantly").await;
    let a = target(&app, &source, "link-a@example.com", "camp-1").await;
    let b = app.create_campaign("other").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let patch = |campaign: String, body: Value| {
        app.client
            .patch(app.url(&format!("/v1/campaigns/{campaign}")))
            .bearer_auth(&app.write_key)
            .json(&body)
            .send()
    };
    let got: Value = app
        .read(&format!("/v1/campaigns/{}", a.campaign))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["external_ids"], json!({"inst": "camp-1"}));
    // The same id for another campaign: 409, nothing changed.
    let events_before = app.count("events").await;
    let problem = assert_problem(
        patch(b.clone(), json!({"external_ids": {"inst": "camp-1"}}))
            .await
            .unwrap(),
        409,
    )
    .await;
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("external-id-taken"),
        "{problem}"
    );
    assert_problem(
        patch(b.clone(), json!({"external_ids": {"nosuch": "x"}}))
            .await
            .unwrap(),
        422,
    )
    .await;
    assert_problem(
        patch(b.clone(), json!({"external_ids": {"inst": ""}}))
            .await
            .unwrap(),
        422,
    )
    .await;
    assert_problem(patch(b.clone(), json!({})).await.unwrap(), 422).await;
    assert_eq!(app.count("events").await, events_before);
    // An event for an unlinked campaign of theirs is rejected with the reason.
    let stray = Target {
        their_campaign: "camp-2".into(),
        ..a
    };
    let e = provider_event("instantly", 0, Step::Opened, "2026-11-01T09:30:00Z", &stray).unwrap();
    let answer = deliver(&app, &source, &[e]).await;
    assert_eq!(outcomes(&answer), ["rejected"]);
    assert!(
        answer["results"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("camp-2"),
        "{answer}"
    );
    // Unlinking frees the id for another campaign, renaming in the same request.
    let response = patch(
        stray.campaign.clone(),
        json!({"external_ids": {"inst": null}}),
    )
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let response = patch(
        b.clone(),
        json!({"name": "renamed", "external_ids": {"inst": "camp-1"}}),
    )
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let got: Value = response.json().await.unwrap();
    assert_eq!(got["name"], "renamed");
    assert_eq!(got["external_ids"], json!({"inst": "camp-1"}));
}
