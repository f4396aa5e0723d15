//! Health, metrics, request ids and the answers for routes that do not exist.

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test]
async fn live_answers_200() {
    let app = spawn_app().await;
    let response = app.get("/health/live").await;
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn ready_answers_200_when_the_database_is_migrated() {
    let app = spawn_app().await;
    let response = app.get("/health/ready").await;
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ready");
}

#[tokio::test]
async fn ready_answers_503_while_a_migration_is_missing() {
    let app = spawn_app().await;
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let response = app.get("/health/ready").await;
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["reason"], "migrations pending");
}

#[tokio::test]
async fn ready_answers_503_when_the_database_is_gone() {
    let app = spawn_app().await;
    app.pool.close().await;
    let response = app.get("/health/ready").await;
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn an_unknown_route_is_a_problem_json_404() {
    let app = spawn_app().await;
    let body = assert_problem(app.get("/no/such/route").await, 404).await;
    assert!(body["type"].as_str().unwrap().ends_with("not-found"));
}

#[tokio::test]
async fn a_wrong_method_is_a_problem_json_405() {
    let app = spawn_app().await;
    let response = app
        .client
        .delete(app.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_problem(response, 405).await;
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_keeps_the_callers() {
    let app = spawn_app().await;
    let generated = app.get("/health/live").await;
    let id = generated.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "generated id is a uuid: {id}"
    );

    let given = app
        .client
        .get(app.url("/health/live"))
        .header("x-request-id", "caller-chosen-id")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "caller-chosen-id");
}

#[tokio::test]
async fn metrics_count_requests_and_time_them_by_route_and_status() {
    let app = spawn_app().await;
    for _ in 0..3 {
        app.get("/health/live").await;
    }
    app.get("/no/such/route").await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    let count = |needle: &str| -> f64 {
        text.lines()
            .find(|l| {
                l.starts_with("http_requests_total{") && needle.split(',').all(|n| l.contains(n))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        count(r#"route="/health/live",status="200""#) >= 3.0,
        "{text}"
    );
    assert!(count(r#"route="unmatched",status="404""#) >= 1.0, "{text}");
    assert!(
        text.contains(r#"http_request_duration_seconds_bucket{"#)
            && text.contains(r#"route="/health/live""#),
        "latency histogram by route: {text}"
    );
    assert!(
        !text.contains("/no/such/route"),
        "raw paths never become labels"
    );
}
