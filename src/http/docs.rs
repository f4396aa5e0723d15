//! `GET /openapi.json` (the OpenAPI 3.1 document of every route), `GET /docs`, a page
//! rendered from it on the server, and `GET /`, which sends newcomers to the web console. The page has
//! no scripts or assets from elsewhere, so it works on a machine with no internet access;
//! it shows every parameter, request body and response body with its fields and an
//! example, so that a newcomer can use the API from it alone.

use std::fmt::Write;
use std::sync::Arc;

use axum::Extension;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::App;

pub fn router() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(root))
        .routes(routes!(openapi_json))
        .routes(routes!(docs_page))
}

/// The way in: a redirect to the web console (which signs people in with an API key).
#[utoipa::path(get, path = "/", tag = "operations", security(),
    responses((status = 308, description = "To `/console`, the web console",
        headers(("location" = String, description = "/console")))))]
async fn root() -> impl IntoResponse {
    (
        axum::http::StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, "/console")],
    )
}

/// The OpenAPI 3.1 document of every route.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", security(),
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json(Extension(doc): Extension<Arc<Value>>) -> impl IntoResponse {
    axum::Json(doc.as_ref().clone())
}

/// A browsable page of the OpenAPI document: every route with its parameters, bodies and
/// examples.
#[utoipa::path(get, path = "/docs", tag = "operations", security(),
    responses((status = 200, description = "HTML", content_type = "text/html")))]
async fn docs_page(Extension(doc): Extension<Arc<Value>>) -> impl IntoResponse {
    Html(render(&doc))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The Markdown the descriptions use, as HTML: paragraphs, `code` and **bold**.
fn markdown(text: &str) -> String {
    let mut html = String::new();
    for paragraph in text.split("\n\n") {
        let mut out = String::new();
        for (i, part) in paragraph.split('`').enumerate() {
            if i % 2 == 1 {
                let _ = write!(out, "<code>{}</code>", escape(part));
            } else {
                let mut bold = false;
                for (j, piece) in escape(part).split("**").enumerate() {
                    if j > 0 {
                        out.push_str(if bold { "</b>" } else { "<b>" });
                        bold = !bold;
                    }
                    out.push_str(piece);
                }
                if bold {
                    out.push_str("</b>");
                }
            }
        }
        let _ = write!(html, "<p>{}</p>", out.replace('\n', " "));
    }
    html
}

/// [`markdown`] inside a table cell or a line: no paragraph margins.
fn inline(text: &str) -> String {
    markdown(text)
        .replace("</p><p>", " ")
        .replace("<p>", "")
        .replace("</p>", "")
}

/// The anchor of an operation: `post-v1-contacts` for `POST /v1/contacts`.
fn anchor(method: &str, path: &str) -> String {
    let mut out = method.to_string();
    for part in path.split(|c: char| !c.is_ascii_alphanumeric()) {
        if !part.is_empty() {
            out.push('-');
            out.push_str(&part.to_ascii_lowercase());
        }
    }
    out
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

const STYLE: &str = "body{font:15px/1.5 system-ui,sans-serif;margin:0;color:#222;display:flex}\
nav{position:sticky;top:0;height:100vh;overflow:auto;width:19rem;flex:none;padding:1rem;background:#f3f3f3;font-size:13px;box-sizing:border-box}\
nav a{color:#245;text-decoration:none;display:block}nav h3{margin:.8rem 0 .2rem}\
main{max-width:62rem;padding:1rem 2rem;min-width:0}\
h2{border-bottom:1px solid #ddd;margin-top:2rem}.op{margin:1rem 0;padding:.5rem 1rem;border-left:4px solid #888;background:#f9f9f9}\
.m{font-weight:700;font-family:monospace;margin-right:.5rem}.get{border-color:#2a7}.post{border-color:#27c}.patch{border-color:#c82}.delete{border-color:#c33}\
code{background:#eee;padding:0 .2rem}table{border-collapse:collapse;margin:.3rem 0}td,th{padding:.1rem .8rem .1rem 0;vertical-align:top;text-align:left}\
pre{background:#272822;color:#f8f8f2;padding:.5rem;overflow:auto;font-size:13px}h4{margin:.8rem 0 .2rem}.st{font-weight:700}";

fn render(doc: &Value) -> String {
    let mut html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>leadledger API</title><style>{STYLE}</style></head><body>"
    );
    let mut by_tag: std::collections::BTreeMap<String, Vec<(&str, &str, &Value)>> =
        Default::default();
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            for method in METHODS {
                if let Some(op) = item.get(method) {
                    let tag = op["tags"][0].as_str().unwrap_or("other").to_string();
                    by_tag.entry(tag).or_default().push((path, method, op));
                }
            }
        }
    }
    html.push_str("<nav><b>leadledger API</b><a href=\"#intro\">Introduction</a>");
    for (tag, ops) in &by_tag {
        let _ = write!(html, "<h3><a href=\"#tag-{0}\">{0}</a></h3>", escape(tag));
        for (path, method, _) in ops {
            let _ = write!(
                html,
                "<a href=\"#{}\">{} {}</a>",
                anchor(method, path),
                method.to_uppercase(),
                escape(path)
            );
        }
    }
    html.push_str("</nav><main>");
    let _ = write!(
        html,
        "<h1 id=\"intro\">{}</h1>{}\
         <p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a> (OpenAPI 3.1).</p>\
         <p>Routes under <code>/v1</code> need <code>Authorization: Bearer &lt;api key&gt;</code>; \
         keys have the scope <code>read</code> (GET), <code>write</code> (and commands) or <code>admin</code> \
         (and key and webhook-source management). Bodies are JSON (<code>Content-Type: application/json</code>). \
         Every error is <code>application/problem+json</code> (RFC 9457). Money is a decimal string such as \
         <code>\"12.50\"</code>; times are RFC 3339 in UTC.</p>\
         <p>Writes take <code>Idempotency-Key</code>: a retry with the same key and request gets the first \
         answer again and has no second effect. Resources carry <code>ETag: \"&lt;version&gt;\"</code>; \
         <code>If-Match</code> makes a write conditional (412 when it does not match). Every write answers \
         with a <code>position</code>: pass it as <code>?min_position=</code> to a read to see your write.</p>",
        escape(doc["info"]["title"].as_str().unwrap_or("API")),
        markdown(doc["info"]["description"].as_str().unwrap_or("")),
    );
    let components = &doc["components"]["schemas"];
    for (tag, ops) in &by_tag {
        let _ = write!(html, "<h2 id=\"tag-{0}\">{0}</h2>", escape(tag));
        for (path, method, op) in ops {
            operation(&mut html, path, method, op, components);
        }
    }
    html.push_str("</main></body></html>");
    html
}

fn operation(html: &mut String, path: &str, method: &str, op: &Value, components: &Value) {
    let _ = write!(
        html,
        "<div class=\"op {method}\" id=\"{}\"><div><span class=\"m\">{}</span><code>{}</code></div>",
        anchor(method, path),
        method.to_uppercase(),
        escape(path)
    );
    for key in ["summary", "description"] {
        if let Some(text) = op[key].as_str() {
            html.push_str(&markdown(text));
        }
    }
    if let Some(params) = op["parameters"].as_array()
        && !params.is_empty()
    {
        html.push_str("<h4>Parameters</h4><table>");
        for p in params {
            let _ = write!(
                html,
                "<tr><td><code>{}</code></td><td>{}{}</td><td>{}</td><td>{}</td></tr>",
                escape(p["name"].as_str().unwrap_or("")),
                escape(p["in"].as_str().unwrap_or("")),
                if p["required"] == Value::Bool(true) {
                    ", required"
                } else {
                    ""
                },
                escape(&type_name(&p["schema"])),
                inline(p["description"].as_str().unwrap_or("")),
            );
        }
        html.push_str("</table>");
    }
    if let Some(body) = op.get("requestBody") {
        html.push_str("<h4>Request body</h4>");
        if let Some(text) = body["description"].as_str() {
            html.push_str(&markdown(text));
        }
        content(html, &body["content"], components);
    }
    html.push_str("<h4>Responses</h4>");
    if let Some(responses) = op["responses"].as_object() {
        for (status, response) in responses {
            let _ = write!(
                html,
                "<div><span class=\"st\">{}</span> {}</div>",
                escape(status),
                inline(response["description"].as_str().unwrap_or(""))
            );
            // Error bodies share one shape: shown once per route, briefly.
            if status.starts_with('2') {
                content(html, &response["content"], components);
            } else if let Some(media) = response["content"].as_object() {
                for (name, body) in media {
                    let _ = write!(html, "<div><code>{}</code></div>", escape(name));
                    example(html, &body["example"]);
                }
            }
        }
    }
    html.push_str("</div>");
}

/// Each media type of a body: its fields and its example.
fn content(html: &mut String, content: &Value, components: &Value) {
    let Some(media) = content.as_object() else {
        return;
    };
    for (name, body) in media {
        let _ = write!(
            html,
            "<div><code>{}</code> {}</div>",
            escape(name),
            escape(&type_name(&body["schema"]))
        );
        fields(html, &body["schema"], components, 0);
        example(html, &body["example"]);
    }
}

fn example(html: &mut String, example: &Value) {
    if example.is_null() {
        return;
    }
    let text = match example {
        Value::String(s) => s.clone(),
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    };
    let _ = write!(html, "<div>Example</div><pre>{}</pre>", escape(&text));
}

/// The schema `schema` names, with references followed.
fn resolve<'a>(schema: &'a Value, components: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => &components[r.rsplit('/').next().unwrap_or_default()],
        None => schema,
    }
}

/// A table of an object's fields (of an array's items), with nested objects inside.
fn fields(html: &mut String, schema: &Value, components: &Value, depth: usize) {
    if depth > 3 {
        return;
    }
    let schema = resolve(schema, components);
    if let Some(parts) = schema["allOf"].as_array() {
        for part in parts {
            fields(html, part, components, depth);
        }
        return;
    }
    if let Some(alternatives) = schema["oneOf"].as_array() {
        for alternative in alternatives {
            let _ = write!(
                html,
                "<div>one of: {}</div>",
                escape(&type_name(alternative))
            );
            fields(html, alternative, components, depth + 1);
        }
        return;
    }
    if schema["type"] == "array"
        || schema["type"]
            .as_array()
            .is_some_and(|t| t.contains(&"array".into()))
    {
        fields(html, &schema["items"], components, depth);
        return;
    }
    let Some(properties) = schema["properties"].as_object() else {
        return;
    };
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    html.push_str("<table><tr><th>field</th><th>type</th><th></th><th>meaning</th></tr>");
    for (name, property) in properties {
        let _ = write!(
            html,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}",
            escape(name),
            escape(&type_name(property)),
            if required.contains(&name.as_str()) {
                "required"
            } else {
                "optional"
            },
            inline(
                property["description"]
                    .as_str()
                    .or_else(|| resolve(property, components)["description"].as_str())
                    .unwrap_or("")
            ),
        );
        let inner = resolve(property, components);
        let items = resolve(&inner["items"], components);
        if depth < 2 && (inner.get("properties").is_some() || items.get("properties").is_some()) {
            fields(html, property, components, depth + 1);
        }
        html.push_str("</td></tr>");
    }
    html.push_str("</table>");
}

/// A short type: `string (uuid)`, `Contact`, `array of Contact`, `"a" | "b"`, `… | null`.
fn type_name(schema: &Value) -> String {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        return r.rsplit('/').next().unwrap_or_default().to_string();
    }
    if let Some(parts) = schema["allOf"].as_array() {
        return parts
            .iter()
            .map(type_name)
            .filter(|t| !t.is_empty() && t != "object")
            .collect::<Vec<_>>()
            .join(" + ");
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(alternatives) = schema[key].as_array() {
            return alternatives
                .iter()
                .map(type_name)
                .collect::<Vec<_>>()
                .join(" | ");
        }
    }
    if let Some(values) = schema["enum"].as_array() {
        return values
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(" | ");
    }
    let types: Vec<String> = match &schema["type"] {
        Value::String(t) => vec![t.clone()],
        Value::Array(ts) => ts
            .iter()
            .filter_map(|t| t.as_str().map(String::from))
            .collect(),
        _ => vec![],
    };
    types
        .iter()
        .map(|t| match t.as_str() {
            "array" => format!("array of {}", type_name(&schema["items"])),
            other => match schema["format"].as_str() {
                Some(f) if other != "null" => format!("{other} ({f})"),
                _ => other.to_string(),
            },
        })
        .collect::<Vec<_>>()
        .join(" | ")
}
