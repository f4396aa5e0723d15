//! `GET /openapi.json` (the OpenAPI 3 document of every route) and `GET /docs`, a page
//! rendered from it on the server: no scripts or assets from elsewhere, so it works on a
//! machine with no internet access.

use std::fmt::Write;
use std::sync::Arc;

use axum::Extension;
use axum::response::{Html, IntoResponse};
use utoipa::openapi::OpenApi;
use utoipa::openapi::path::{HttpMethod, Operation};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(openapi_json))
        .routes(routes!(docs_page))
}

/// The OpenAPI 3 document of every route.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", security(),
    responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json")))]
async fn openapi_json(Extension(doc): Extension<Arc<OpenApi>>) -> impl IntoResponse {
    axum::Json(doc.as_ref().clone())
}

/// A browsable page of the OpenAPI document.
#[utoipa::path(get, path = "/docs", tag = "operations", security(),
    responses((status = 200, description = "HTML", content_type = "text/html")))]
async fn docs_page(Extension(doc): Extension<Arc<OpenApi>>) -> impl IntoResponse {
    Html(render(&doc))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn render(doc: &OpenApi) -> String {
    let mut html = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>leadledger API</title>\
         <style>body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}\
         h2{border-bottom:1px solid #ddd;margin-top:2rem}.op{margin:1rem 0;padding:.5rem 1rem;border-left:4px solid #888;background:#f7f7f7}\
         .m{font-weight:700;font-family:monospace;margin-right:.5rem}.get{border-color:#2a7}.post{border-color:#27c}.patch{border-color:#c82}.delete{border-color:#c33}\
         code{background:#eee;padding:0 .2rem}table{border-collapse:collapse}td{padding:0 1rem 0 0;vertical-align:top}</style></head><body>",
    );
    let _ = write!(
        html,
        "<h1>{}</h1><p>{}</p><p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a>. \
         Routes under <code>/v1</code> need <code>Authorization: Bearer &lt;api key&gt;</code>.</p>",
        escape(&doc.info.title),
        escape(doc.info.description.as_deref().unwrap_or(""))
    );
    let mut by_tag: std::collections::BTreeMap<String, Vec<(String, &str, &Operation)>> =
        Default::default();
    for (path, item) in doc.paths.paths.iter() {
        let ops = [
            (HttpMethod::Get, &item.get),
            (HttpMethod::Post, &item.post),
            (HttpMethod::Patch, &item.patch),
            (HttpMethod::Put, &item.put),
            (HttpMethod::Delete, &item.delete),
        ];
        for (method, op) in ops {
            if let Some(op) = op {
                let tag = op
                    .tags
                    .as_ref()
                    .and_then(|t| t.first().cloned())
                    .unwrap_or_else(|| "other".into());
                let m = match method {
                    HttpMethod::Get => "get",
                    HttpMethod::Post => "post",
                    HttpMethod::Patch => "patch",
                    HttpMethod::Put => "put",
                    _ => "delete",
                };
                by_tag.entry(tag).or_default().push((path.clone(), m, op));
            }
        }
    }
    for (tag, ops) in by_tag {
        let _ = write!(html, "<h2>{}</h2>", escape(&tag));
        for (path, method, op) in ops {
            let _ = write!(
                html,
                "<div class=\"op {method}\"><div><span class=\"m\">{}</span><code>{}</code></div>",
                method.to_uppercase(),
                escape(&path)
            );
            if let Some(summary) = &op.summary {
                let _ = write!(html, "<p>{}</p>", escape(summary));
            }
            if let Some(desc) = &op.description {
                let _ = write!(html, "<p>{}</p>", escape(desc));
            }
            if let Some(params) = &op.parameters
                && !params.is_empty()
            {
                html.push_str("<table>");
                for p in params {
                    let utoipa::openapi::RefOr::T(p) = p else {
                        continue;
                    };
                    let _ = write!(
                        html,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                        escape(&p.name),
                        match p.parameter_in {
                            utoipa::openapi::path::ParameterIn::Query
                            | utoipa::openapi::path::ParameterIn::QueryString => "query",
                            utoipa::openapi::path::ParameterIn::Path => "path",
                            utoipa::openapi::path::ParameterIn::Header => "header",
                            utoipa::openapi::path::ParameterIn::Cookie => "cookie",
                        },
                        escape(p.description.as_deref().unwrap_or(""))
                    );
                }
                html.push_str("</table>");
            }
            let codes: Vec<String> = op.responses.responses.keys().map(|c| escape(c)).collect();
            let _ = write!(html, "<p>Responses: {}</p></div>", codes.join(", "));
        }
    }
    html.push_str("</body></html>");
    html
}
