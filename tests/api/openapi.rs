//! The OpenAPI document and the docs page describe every route the server has.

use serde_json::Value;

use crate::helpers::spawn_app;

#[tokio::test]
async fn every_documented_route_exists_in_the_router() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(doc["openapi"].as_str().unwrap().chars().next(), Some('3'));
    let paths = doc["paths"].as_object().unwrap();
    let mut checked = 0;
    for (path, item) in paths {
        let concrete = path.replace("{id}", "0190f1b4-0000-7000-8000-000000000000");
        for method in item.as_object().unwrap().keys() {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = app
                .client
                .request(m, app.url(&concrete))
                .bearer_auth(&app.admin_key)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            if status == 404 || status == 405 {
                let body: Value = response.json().await.unwrap_or_default();
                assert!(
                    !body["detail"]
                        .as_str()
                        .unwrap_or("")
                        .contains("no such route")
                        && status != 405,
                    "{method} {path} is documented but not routed"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "the document lists the routes ({checked})");
}

#[tokio::test]
async fn every_route_in_the_code_is_registered_through_the_documented_router() {
    // Routes added with `.route(...)` would bypass the OpenAPI document; only the metrics
    // endpoint (Prometheus text, not an API route) is allowed to.
    let mut offenders = Vec::new();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/http")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            if line.contains(".route(") && !line.contains("\"/metrics\"") {
                offenders.push(format!("{}: {line}", path.display()));
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:#?}");
}

#[tokio::test]
async fn the_docs_page_lists_the_routes_without_outside_assets() {
    let app = spawn_app().await;
    let response = app.get("/docs").await;
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = response.text().await.unwrap();
    for path in [
        "/v1/campaigns",
        "/v1/campaigns/{id}/start",
        "/health/ready",
        "/openapi.json",
    ] {
        assert!(html.contains(path), "{path} on the docs page");
    }
    assert!(!html.contains("<script src=\"http"), "no outside scripts");
}

#[tokio::test]
async fn every_schema_reference_in_the_document_resolves() {
    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    let mut found = Vec::new();
    refs(&doc, &mut found);
    assert!(!found.is_empty());
    let dangling: Vec<&str> = found
        .into_iter()
        .filter(|r| {
            r.strip_prefix("#")
                .is_none_or(|pointer| doc.pointer(pointer).is_none())
        })
        .collect();
    assert!(dangling.is_empty(), "unresolvable references: {dangling:?}");
}
