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

/// The official OpenAPI 3.1 schema (2022-10-07), vendored: validating needs no network.
const OPENAPI_31_SCHEMA: &str = include_str!("../data/openapi-3.1-schema.json");

#[tokio::test]
async fn the_openapi_document_is_valid_openapi_3_1() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    let schema: Value = serde_json::from_str(OPENAPI_31_SCHEMA).unwrap();
    let validator = jsonschema::draft202012::new(&schema).expect("the vendored schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "invalid OpenAPI 3.1: {errors:#?}");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    // Every schema in it is a valid JSON Schema (2020-12) too.
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        assert!(
            jsonschema::meta::is_valid(schema),
            "components.schemas.{name} is not a valid JSON Schema"
        );
    }
}

#[tokio::test]
async fn the_validator_refuses_a_document_with_a_response_lacking_its_description() {
    // The check above must be able to fail: a response without `description` is invalid.
    let schema: Value = serde_json::from_str(OPENAPI_31_SCHEMA).unwrap();
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    let doc = serde_json::json!({
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {"/x": {"get": {"responses": {"200": {}}}}}
    });
    assert!(!validator.is_valid(&doc));
}

#[tokio::test]
async fn the_docs_page_teaches_every_body_with_an_example_and_the_webhook_format() {
    let app = spawn_app().await;
    let html = app.get("/docs").await.text().await.unwrap();
    // A table of contents linking to each operation.
    assert!(html.contains("<nav"), "a table of contents");
    assert!(
        html.contains("href=\"#post-v1-contacts\""),
        "the contents link to POST /v1/contacts"
    );
    // Markdown is rendered, not shown with its backticks.
    assert!(!html.contains('`'), "literal backticks on the page");
    // Each body of POST /v1/contacts: fields and an example, request and response.
    let start = html
        .find("id=\"post-v1-contacts\"")
        .expect("POST /v1/contacts section");
    let section = &html[start..];
    let section = &section[..section[1..]
        .find("class=\"op ")
        .unwrap_or(section.len() - 1)];
    for needle in [
        "Request body",
        "first_name",
        "linkedin_url",
        "Example",
        "&quot;email&quot;: &quot;",
        "201",
        "created",
        "version",
        "application/problem+json",
    ] {
        assert!(
            section.contains(needle),
            "{needle} in the POST /v1/contacts section"
        );
    }
    // The webhook delivery: its event format, with the types and an example.
    let start = html
        .find("id=\"post-webhooks-source\"")
        .expect("the delivery section");
    let section = &html[start..];
    let section = &section[..section[1..]
        .find("class=\"op ")
        .unwrap_or(section.len() - 1)];
    for needle in [
        "occurred_at",
        "campaign_id",
        "enrollment_id",
        "soft_bounced",
        "webhook-signature",
        "outcome",
        "parked",
        "Example",
    ] {
        assert!(
            section.contains(needle),
            "{needle} in the webhook delivery section"
        );
    }
    assert!(html.contains("/metrics"), "/metrics is documented");
    // Every operation with a request body shows an example of it.
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if let Some(content) = op["requestBody"]["content"].as_object() {
                for (media, body) in content {
                    assert!(
                        body.get("example").is_some() || body["schema"].get("example").is_some(),
                        "{method} {path} ({media}) has no request example"
                    );
                }
            }
            for (status, response) in op["responses"].as_object().unwrap() {
                if let Some(content) = response["content"].as_object()
                    && status.starts_with('2')
                {
                    for (media, body) in content {
                        if media == "application/json" {
                            assert!(
                                body.get("example").is_some(),
                                "{method} {path} {status} has no response example"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn the_repository_refers_to_no_file_it_does_not_contain() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut texts = vec![root.join("README.md")];
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("rs" | "md" | "toml" | "sql")
            ) {
                out.push(path);
            }
        }
    }
    for dir in [
        "src",
        "aggregates",
        "projections",
        "bench",
        "docs",
        "migrations",
        "tests",
        "scripts",
    ] {
        walk(&root.join(dir), &mut texts);
    }
    let mut missing = Vec::new();
    for file in &texts {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || "_-./".contains(c))) {
            let word = word.trim_end_matches('.');
            if !word.ends_with(".md") || word.len() <= ".md".len() || word.starts_with("http") {
                continue;
            }
            let found = root.join(word).exists()
                || file.parent().is_some_and(|p| p.join(word).exists())
                || root.join("docs").join(word).exists();
            if !found {
                missing.push(format!(
                    "{}: {word}",
                    file.strip_prefix(root).unwrap().display()
                ));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "references to files not here: {missing:#?}"
    );
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains("cargo install --path ."),
        "the README says how to put leadledger on the PATH"
    );
}
