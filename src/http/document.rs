//! Completes the OpenAPI document the handlers' annotations make, so that it is valid
//! OpenAPI 3.1 and teaches by itself: every response gets its required `description`,
//! every error answer its `application/problem+json` body, every JSON body an example
//! (made from its schema, with plausible values by field name), and the webhook
//! delivery the schema of its events and results.

use serde_json::{Map, Value, json};

/// The finished document served at `/openapi.json` and rendered at `/docs`.
pub fn complete(doc: utoipa::openapi::OpenApi) -> Value {
    let mut doc = serde_json::to_value(doc).unwrap_or_else(|_| json!({}));
    add_schemas(&mut doc);
    let components = doc["components"]["schemas"].clone();
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in item.iter_mut() {
                if !matches!(method.as_str(), "get" | "post" | "put" | "patch" | "delete") {
                    continue;
                }
                complete_operation(path, method, op, &components);
            }
        }
    }
    doc
}

/// Problem details, and the webhook delivery's event and results (the delivery handler
/// reads raw bytes to check their signature, so its annotation cannot name them).
fn add_schemas(doc: &mut Value) {
    let schemas = &mut doc["components"]["schemas"];
    if !schemas.is_object() {
        *schemas = json!({});
    }
    schemas["Problem"] = json!({
        "type": "object",
        "description": "An error (RFC 9457). `type` ends in a kind such as `validation-failed` or `budget-exceeded`.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "description": "A URI naming the kind of problem."},
            "title": {"type": "string"},
            "status": {"type": "integer", "description": "The HTTP status code again."},
            "detail": {"type": "string", "description": "What went wrong, for people."},
            "errors": {
                "type": "array",
                "description": "The fields at fault, all at once (422).",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {
                        "field": {"type": "string"},
                        "message": {"type": "string"}
                    }
                }
            }
        },
        "example": {
            "type": "https://leadledger.dev/problems/validation-failed",
            "title": "Invalid request",
            "status": 422,
            "detail": "1 field is invalid",
            "errors": [{"field": "email", "message": "is not a valid email address"}]
        }
    });
    schemas["WebhookEvent"] = json!({
        "type": "object",
        "description": "One provider event. Give `campaign_id` and `email`, or `enrollment_id`.",
        "required": ["id", "type", "occurred_at"],
        "properties": {
            "id": {"type": "string", "description": "The provider's event id (1 to 255 characters); a second delivery of one id by this source is a `duplicate`."},
            "type": {"type": "string", "enum": ["sent", "delivered", "opened", "clicked", "replied", "bounced", "soft_bounced", "deferred", "unsubscribed", "complained"]},
            "campaign_id": {"type": "string", "format": "uuid"},
            "email": {"type": "string", "description": "The recipient, with `campaign_id`."},
            "enrollment_id": {"type": "string", "format": "uuid", "description": "Instead of `campaign_id` and `email`."},
            "occurred_at": {"type": "string", "format": "date-time", "description": "When it happened (RFC 3339)."}
        },
        "example": {
            "id": "evt_01",
            "type": "opened",
            "campaign_id": "0190f1b4-0000-7000-8000-000000000001",
            "email": "ada@example.com",
            "occurred_at": "2026-11-29T12:00:00Z"
        }
    });
    schemas["WebhookResults"] = json!({
        "type": "object",
        "description": "One result per event, in the order sent. A repeated delivery (same `webhook-id`) gets the same answer again.",
        "required": ["results"],
        "properties": {
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "outcome"],
                    "properties": {
                        "id": {"description": "The event's `id` as sent."},
                        "outcome": {
                            "type": "string",
                            "enum": ["applied", "duplicate", "parked", "rejected"],
                            "description": "`applied`: recorded on its enrollment. `duplicate`: this source delivered this id before. `parked`: the enrollment does not exist yet; kept and applied when it does. `rejected`: the event is invalid (see `reason`)."
                        },
                        "reason": {"type": "string"}
                    }
                }
            }
        },
        "example": {"results": [
            {"id": "evt_01", "outcome": "applied"},
            {"id": "evt_02", "outcome": "parked"},
            {"id": "evt_03", "outcome": "rejected", "reason": "occurred_at must be an RFC 3339 time"}
        ]}
    });
}

fn complete_operation(path: &str, method: &str, op: &mut Value, components: &Value) {
    if path == "/webhooks/{source}" && method == "post" {
        op["requestBody"] = json!({
            "description": "One event, or an array of up to 1,000 events. Signed per Standard Webhooks v1: `webhook-signature` holds `v1,<base64 HMAC-SHA256>` of `{webhook-id}.{webhook-timestamp}.{raw body}` under the base64-decoded part of the source's secret after `whsec_`.",
            "required": true,
            "content": {"application/json": {
                "schema": {"oneOf": [
                    {"$ref": "#/components/schemas/WebhookEvent"},
                    {"type": "array", "maxItems": 1000, "items": {"$ref": "#/components/schemas/WebhookEvent"}}
                ]},
                "example": [
                    components["WebhookEvent"]["example"],
                    {"id": "evt_02", "type": "replied", "enrollment_id": "0190f1b4-0000-7000-8000-000000000002", "occurred_at": "2026-11-29T12:05:00Z"}
                ]
            }}
        });
        op["responses"]["200"] = json!({
            "description": "Results per event",
            "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/WebhookResults"},
                "example": components["WebhookResults"]["example"]
            }}
        });
    }
    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
        for p in params {
            let missing = p
                .get("description")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty);
            let text = match p["name"].as_str().unwrap_or_default() {
                "Idempotency-Key" => {
                    "1 to 255 visible ASCII characters: a retry with the same key and request gets the first answer again (`Idempotent-Replayed: true`) and has no second effect; the same key with another request is 422"
                }
                "If-Match" => {
                    "`\"<version>\"` (the ETag), a list of them, or `*` (the resource exists): otherwise 412 and nothing written"
                }
                _ => "",
            };
            if missing && !text.is_empty() {
                p["description"] = json!(text);
            }
        }
    }
    if let Some(body) = op
        .get_mut("requestBody")
        .and_then(|b| b.get_mut("content"))
        .and_then(Value::as_object_mut)
    {
        for (media, content) in body.iter_mut() {
            if media.contains("json") && content.get("example").is_none() {
                let example = example_of(&content["schema"], components, "", 0);
                content["example"] = example;
            } else if media == "text/csv" && content.get("example").is_none() {
                content["example"] = json!(
                    "email,first_name,company,custom.source\nada@example.com,Ada,Analytical Engines,fair\n"
                );
            }
        }
    }
    let versioned = path.starts_with("/v1/");
    let responses = op
        .as_object_mut()
        .map(|o| o.entry("responses").or_insert_with(|| json!({})));
    let Some(responses) = responses.and_then(Value::as_object_mut) else {
        return;
    };
    if versioned {
        responses
            .entry("401")
            .or_insert_with(|| json!({"description": describe("401")}));
    }
    for (status, response) in responses.iter_mut() {
        let Some(response) = response.as_object_mut() else {
            continue;
        };
        let missing = response
            .get("description")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty);
        if missing {
            response.insert("description".into(), json!(describe(status)));
        }
        let is_error = status.starts_with('4') || status.starts_with('5');
        if is_error && response.get("content").is_none() {
            response.insert(
                "content".into(),
                json!({"application/problem+json": {
                    "schema": {"$ref": "#/components/schemas/Problem"},
                    "example": problem_example(status)
                }}),
            );
        }
        if let Some(content) = response.get_mut("content").and_then(Value::as_object_mut) {
            for (media, body) in content.iter_mut() {
                if media.contains("json") && body.get("example").is_none() {
                    let example = if media == "application/problem+json" {
                        problem_example(status)
                    } else {
                        example_of(&body["schema"], components, "", 0)
                    };
                    body["example"] = example;
                }
            }
        }
    }
}

/// What a status code means on this API (the README's table under "Errors").
fn describe(status: &str) -> &'static str {
    match status {
        "200" => "OK",
        "201" => "Created",
        "202" => "Accepted",
        "204" => "No content",
        "307" | "308" => "Redirect",
        "400" => "Malformed JSON, query parameter or header",
        "401" => "Missing or invalid credentials (an API key, or a webhook signature)",
        "403" => "The API key lacks the scope",
        "404" => "No such resource",
        "405" => "Method not allowed",
        "409" => {
            "Conflict: a business rule, an idempotency key still in flight, or retries exhausted"
        }
        "410" => "Gone",
        "412" => "If-Match does not match the current version",
        "413" => "Body over the route's limit",
        "415" => "Unsupported Content-Type",
        "422" => "Invalid values; or an Idempotency-Key reused with another request",
        "503" => "Database unavailable, or min_position not reached within 5 s (Retry-After)",
        _ => "See the status code",
    }
}

fn problem_example(status: &str) -> Value {
    let code: u16 = status.parse().unwrap_or(400);
    let (kind, title, detail) = match code {
        400 => (
            "bad-request",
            "Bad request",
            "limit must be between 1 and 500",
        ),
        401 => (
            "unauthorized",
            "Unauthorized",
            "missing or invalid credentials",
        ),
        403 => (
            "forbidden",
            "Forbidden",
            "this route needs a key with the write scope",
        ),
        404 => ("not-found", "Not found", "no resource with this id"),
        409 => (
            "conflict",
            "Conflict",
            "the request conflicts with the resource's state",
        ),
        412 => (
            "precondition-failed",
            "Precondition failed",
            "If-Match is \"2\" but the resource is at version \"3\"",
        ),
        413 => (
            "payload-too-large",
            "Payload too large",
            "the body is larger than this route accepts",
        ),
        415 => (
            "unsupported-media-type",
            "Unsupported media type",
            "send the body as application/json",
        ),
        422 => ("validation-failed", "Invalid request", "1 field is invalid"),
        503 => (
            "service-unavailable",
            "Service unavailable",
            "database unavailable",
        ),
        _ => ("internal-error", "Error", "see the status"),
    };
    let mut example = json!({
        "type": format!("https://leadledger.dev/problems/{kind}"),
        "title": title,
        "status": code,
        "detail": detail,
    });
    if code == 422 {
        example["errors"] = json!([{"field": "email", "message": "is not a valid email address"}]);
    }
    example
}

/// A plausible instance of `schema`: its own `example` if it has one, else one made from
/// its type, with values chosen by the field's name so that examples read like real use.
pub fn example_of(schema: &Value, components: &Value, field: &str, depth: usize) -> Value {
    if depth > 8 {
        return Value::Null;
    }
    if let Some(example) = schema.get("example") {
        return example.clone();
    }
    if let Some(examples) = schema.get("examples").and_then(Value::as_array)
        && let Some(first) = examples.first()
    {
        return first.clone();
    }
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference.rsplit('/').next().unwrap_or_default();
        return example_of(&components[name], components, field, depth + 1);
    }
    if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
        let mut merged = Map::new();
        for part in parts {
            if let Value::Object(fields) = example_of(part, components, field, depth + 1) {
                merged.extend(fields);
            }
        }
        return Value::Object(merged);
    }
    for combinator in ["oneOf", "anyOf"] {
        if let Some(first) =
            schema
                .get(combinator)
                .and_then(Value::as_array)
                .and_then(|alternatives| {
                    alternatives
                        .iter()
                        .find(|s| s.get("type") != Some(&json!("null")))
                })
        {
            return example_of(first, components, field, depth + 1);
        }
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array)
        && let Some(first) = values.iter().find(|v| !v.is_null())
    {
        return first.clone();
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ if schema.get("properties").is_some() => vec!["object"],
        _ => vec![],
    };
    let kind = types.iter().find(|t| **t != "null").copied().unwrap_or("");
    match kind {
        "object" => {
            let mut out = Map::new();
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for (name, property) in properties {
                    out.insert(
                        name.clone(),
                        example_of(property, components, name, depth + 1),
                    );
                }
            } else if let Some(values) = schema.get("additionalProperties")
                && values.is_object()
            {
                out.insert(
                    "source".into(),
                    example_of(values, components, "source", depth + 1),
                );
            }
            Value::Object(out)
        }
        "array" => {
            let item = example_of(&schema["items"], components, field, depth + 1);
            if item.is_null() {
                json!([])
            } else {
                json!([item])
            }
        }
        "integer" => json!(integer_for(field, schema)),
        "number" => json!(number_for(field)),
        "boolean" => json!(true),
        "string" => json!(string_for(field, schema)),
        _ if types.contains(&"null") => Value::Null,
        _ => json!({}),
    }
}

fn integer_for(field: &str, schema: &Value) -> i64 {
    if let Some(min) = schema.get("minimum").and_then(Value::as_i64)
        && min > 0
    {
        return min;
    }
    match field {
        "version" => 3,
        "row" => 1,
        "status" => 422,
        "ttl_seconds" => 3600,
        "input_tokens" => 1200,
        "output_tokens" => 300,
        "grace_percent" => 0,
        "limit" => 50,
        _ => 1,
    }
}

fn number_for(field: &str) -> f64 {
    match field {
        "quality_score" => 0.8,
        f if f.ends_with("_rate") => 12.5,
        _ => 1.0,
    }
}

fn string_for(field: &str, schema: &Value) -> String {
    let format = schema.get("format").and_then(Value::as_str).unwrap_or("");
    match format {
        "uuid" => return "0190f1b4-0000-7000-8000-000000000001".into(),
        "date-time" => return "2026-11-29T12:00:00Z".into(),
        "date" => return "2026-11-29".into(),
        _ => {}
    }
    let text = match field {
        "email" => "ada@example.com",
        "first_name" => "Ada",
        "last_name" => "Lovelace",
        "company" => "Analytical Engines",
        "company_domain" => "analytical.example",
        "title" => "Head of Research",
        "phone" => "+44 20 7946 0000",
        "linkedin_url" => "https://www.linkedin.com/in/ada",
        "source" => "trade fair",
        "name" => "Q4 launch",
        "description" => "Enrichment of the Q4 list",
        "model" => "claude-sonnet",
        "position" | "min_position" => "812-40",
        "secret" => "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "url" => "/webhooks/mailer",
        "next_cursor" | "cursor" => "eyJrIjoxfQ",
        "reason" => "suppressed",
        "message" => "is not a valid email address",
        "field" => "email",
        "id" | "event_id" => "evt_01",
        "kind" => "standard",
        "type" => "opened",
        "last_error" => "the enrollment does not exist yet",
        "period" => "monthly",
        "group_by" => "day",
        "amount" | "cost" | "limit" | "spent" | "reserved" | "remaining" | "spent_total"
        | "available" => "12.50",
        _ => "text",
    };
    text.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_follow_references_types_and_field_names() {
        let components = json!({
            "Contact": {"type": "object", "properties": {
                "email": {"type": "string"},
                "id": {"type": "string", "format": "uuid"},
                "score": {"type": ["number", "null"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "status": {"type": "string", "enum": ["draft", "running"]}
            }}
        });
        let example = example_of(
            &json!({"$ref": "#/components/schemas/Contact"}),
            &components,
            "",
            0,
        );
        assert_eq!(example["email"], "ada@example.com");
        assert_eq!(example["id"], "0190f1b4-0000-7000-8000-000000000001");
        assert_eq!(example["score"], 1.0);
        assert_eq!(example["tags"], json!(["text"]));
        assert_eq!(example["status"], "draft");
    }
}
