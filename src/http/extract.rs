//! Request parsing shared by every route, with the API's status codes (README, "Errors"): malformed JSON,
//! query parameters and headers are 400; well-formed JSON with invalid values is 422 with
//! the failing field's path in `errors[]`; a wrong content type is 415.

use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::app::App;
use crate::app::command::{CommandContext, Idempotency, IfMatch};
use crate::app::keys::ApiKey;
use crate::http::error::ApiError;
use crate::store::{Metadata, Position};

/// How long a read waits for `?min_position=` before answering 503.
pub const MIN_POSITION_WAIT: Duration = Duration::from_secs(5);

/// Parses a JSON body into `T`, telling syntax errors (400) from invalid values (422).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    Ok(crate::app::parse_json(body)?)
}

/// The query string as `T`; anything malformed or unknown is 400.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(ApiQuery)
            .map_err(|e| {
                let path = e.path().to_string();
                ApiError::BadRequest(format!("query parameter {path}: {}", e.into_inner()))
            })
    }
}

/// `?min_position=<token>`: the read waits until the read models include that write.
#[derive(Debug, Clone, Copy, Default)]
pub struct MinPosition(pub Option<Position>);

impl<S: Send + Sync> FromRequestParts<S> for MinPosition {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let raw = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "min_position")
            .map(|(_, v)| v.into_owned());
        match raw {
            None => Ok(Self(None)),
            Some(v) => v.parse().map(|p| Self(Some(p))).map_err(|_| {
                ApiError::BadRequest(
                    "min_position must be a position token returned by a write".into(),
                )
            }),
        }
    }
}

impl MinPosition {
    /// Waits for `projections` to include the position; 503 with `Retry-After` if they do
    /// not within [`MIN_POSITION_WAIT`].
    pub async fn wait(self, state: &App, projections: &[&str]) -> Result<(), ApiError> {
        let Some(position) = self.0 else {
            return Ok(());
        };
        let reached =
            projections::runner::wait_for(&state.pool, position, projections, MIN_POSITION_WAIT)
                .await?;
        if reached {
            Ok(())
        } else {
            Err(ApiError::NotCaughtUp)
        }
    }
}

impl MinPosition {
    /// A connection for reading `projections`' read models once they include the position:
    /// the read replica's when it is configured, up and caught up in time, else the
    /// primary's (see `app::replica`). 503 with `Retry-After` if neither is in time.
    pub async fn connection(
        self,
        state: &App,
        projections: &[&str],
    ) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, ApiError> {
        match state
            .read_connection(self.0, projections, MIN_POSITION_WAIT)
            .await?
        {
            crate::app::replica::ReadTarget::Ready(conn) => Ok(conn),
            crate::app::replica::ReadTarget::NotCaughtUp => Err(ApiError::NotCaughtUp),
        }
    }
}

/// `?limit=` (1..=500, default 50) and `?cursor=`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PageQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

impl PageQuery {
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(50),
            Some(n @ 1..=500) => Ok(n),
            Some(_) => Err(ApiError::BadRequest(
                "limit must be between 1 and 500".into(),
            )),
        }
    }

    /// The decoded cursor, if any: the sort key of the last item of the previous page.
    pub fn cursor<T: DeserializeOwned>(&self) -> Result<Option<T>, ApiError> {
        let Some(raw) = &self.cursor else {
            return Ok(None);
        };
        let bad = || ApiError::BadRequest("cursor is not one this server returned".into());
        let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| bad())?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
        // Every time this server puts in a cursor is one PostgreSQL can hold; a crafted
        // one (year -5000) would fail in the database instead of here.
        if !times_in_range(&value) {
            return Err(bad());
        }
        serde_json::from_value(value).map(Some).map_err(|_| bad())
    }
}

/// True unless a string in `value` is an RFC 3339 time outside the years 1 to 9999.
fn times_in_range(value: &serde_json::Value) -> bool {
    use chrono::Datelike;
    match value {
        serde_json::Value::String(_) => {
            serde_json::from_value::<chrono::DateTime<chrono::Utc>>(value.clone())
                .map_or(true, |t| (1..=9999).contains(&t.year()))
        }
        serde_json::Value::Array(items) => items.iter().all(times_in_range),
        serde_json::Value::Object(members) => members.values().all(times_in_range),
        _ => true,
    }
}

pub fn encode_cursor<T: serde::Serialize>(key: &T) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(key).unwrap_or_default())
}

/// Cuts a page read with `limit + 1` rows down to `limit`. When there was more, returns
/// the cursor of the next page: the sort key of the last item kept.
pub fn cut_page<T, K: serde::Serialize>(
    items: &mut Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> K,
) -> Option<String> {
    if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|item| encode_cursor(&key(item)))
    } else {
        None
    }
}

/// A JSON response carrying the resource's version as its `ETag`.
pub fn json_with_etag<T: serde::Serialize>(body: &T, version: u64) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response = axum::Json(body).into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(axum::http::header::ETAG, v);
    }
    response
}

/// Everything a command route needs from its request: the caller's key, the idempotency
/// key, `If-Match`, a hash of the request (method, target, body) and the raw body.
#[derive(Debug, Clone)]
pub struct CommandRequest {
    pub key: ApiKey,
    pub idempotency_key: Option<String>,
    pub if_match: Option<IfMatch>,
    pub request_hash: Vec<u8>,
    pub request_id: Option<String>,
    pub content_type: Option<String>,
    pub body: Bytes,
    /// Held while a large body is read and handled (see `Limits::large_bodies`).
    pub large_body: Option<std::sync::Arc<tokio::sync::OwnedSemaphorePermit>>,
}

impl CommandRequest {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        self.require_json()?;
        parse_json(&self.body)
    }

    /// For commands that take no fields: no body, or a JSON object with no members
    /// (`{}`). Malformed JSON is 400 and any member 422, as for every other command.
    pub fn no_fields(&self) -> Result<(), ApiError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct NoFields {}
        self.require_json()?;
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        parse_json::<NoFields>(&self.body).map(|_| ())
    }

    /// 415 unless the body is declared JSON (an empty body needs no declaration).
    pub fn require_json(&self) -> Result<(), ApiError> {
        if self.body.is_empty() {
            return Ok(());
        }
        match self.content_type.as_deref() {
            Some(ct) if is_json(ct) => Ok(()),
            _ => Err(ApiError::UnsupportedMediaType(
                "send the body as application/json".into(),
            )),
        }
    }

    /// What command execution needs of this request.
    pub fn context(&self) -> CommandContext {
        CommandContext {
            actor: Some(format!("api_key:{}", self.key.id)),
            correlation_id: self.request_id.clone(),
            if_match: self.if_match.clone(),
            idempotency: self.idempotency_key.as_ref().map(|key| Idempotency {
                scope: self.key.id,
                key: key.clone(),
                request_hash: self.request_hash.clone(),
            }),
        }
    }

    pub fn metadata(&self) -> Metadata {
        self.context().metadata()
    }
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.to_ascii_lowercase().starts_with("application/")
            && essence.to_ascii_lowercase().ends_with("+json"))
}

impl<S> FromRequest<S> for CommandRequest
where
    S: Send + Sync,
    App: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = request.into_parts();
        let app = <App as axum::extract::FromRef<S>>::from_ref(state);
        // A body of unknown length may be large too.
        let declared = parts
            .headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let large = match declared {
            Some(n) => n > crate::http::LARGE_BODY_BYTES,
            None => parts
                .headers
                .contains_key(axum::http::header::TRANSFER_ENCODING),
        };
        let key = ApiKey::from_request_parts(&mut parts, state).await?;
        let idempotency_key = idempotency_key(&parts.headers)?;
        let if_match = if_match(&parts.headers)?;
        let request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let method = parts.method.clone();
        let target = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let large_body = if large {
            let permit = app
                .limits
                .large_bodies
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| ApiError::Busy)?;
            Some(std::sync::Arc::new(permit))
        } else {
            None
        };
        let request = Request::from_parts(parts, body);
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge("the body is larger than this route accepts".into())
                } else {
                    ApiError::BadRequest(format!("the body could not be read: {rejection}"))
                }
            })?;
        Ok(Self {
            key,
            idempotency_key,
            if_match,
            request_hash: request_hash(&method, &target, &body),
            request_id,
            content_type,
            body,
            large_body,
        })
    }
}

fn request_hash(method: &Method, target: &str, body: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update([0]);
    h.update(target.as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().to_vec()
}

/// `Idempotency-Key`: 1..=255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(ApiError::BadRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        ));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// `If-Match: "<version>"`, a list of such tags, or `*`. Weak tags (`W/"3"`) are
/// well-formed but never match: a write needs strong comparison. A bare number is read as
/// its quoted form.
fn if_match(headers: &HeaderMap) -> Result<Option<IfMatch>, ApiError> {
    let Some(value) = headers.get("if-match") else {
        return Ok(None);
    };
    let bad =
        || ApiError::BadRequest("If-Match must be an ETag this server returned, like \"3\"".into());
    let text = value.to_str().map_err(|_| bad())?.trim();
    if text == "*" {
        return Ok(Some(IfMatch::Any));
    }
    let mut versions = Vec::new();
    for tag in text.split(',').map(str::trim) {
        let (weak, tag) = match tag.strip_prefix("W/") {
            Some(rest) => (true, rest),
            None => (false, tag),
        };
        let tag = tag
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(tag);
        let version = tag.parse::<u64>().map_err(|_| bad())?;
        if !weak {
            versions.push(version);
        }
    }
    Ok(Some(IfMatch::Versions(versions)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: Option<u32>,
    }

    #[test]
    fn syntax_errors_are_400_and_value_errors_are_422_with_the_field() {
        assert!(matches!(
            parse_json::<Body>(b"{\"name\": "),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            parse_json::<Body>(b"   "),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            parse_json::<Body>(b"{\"name\": \"a\"} trailing"),
            Err(ApiError::BadRequest(_))
        ));
        match parse_json::<Body>(b"{\"name\": \"a\", \"count\": \"three\"}") {
            Err(ApiError::Unprocessable { errors, .. }) => {
                assert_eq!(errors[0].field, "count");
                assert!(!errors[0].message.contains("line"), "{}", errors[0].message);
            }
            other => panic!("{other:?}"),
        }
        match parse_json::<Body>(b"{\"name\": \"a\", \"extra\": 1}") {
            Err(ApiError::Unprocessable { errors, .. }) => {
                assert!(errors[0].message.contains("unknown field"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn idempotency_keys_must_be_visible_ascii_up_to_255() {
        let mut h = HeaderMap::new();
        h.insert("idempotency-key", "abc-123".parse().unwrap());
        assert_eq!(idempotency_key(&h).unwrap().as_deref(), Some("abc-123"));
        h.insert("idempotency-key", "has space".parse().unwrap());
        assert!(idempotency_key(&h).is_err());
        h.insert("idempotency-key", "x".repeat(256).parse().unwrap());
        assert!(idempotency_key(&h).is_err());
        h.insert("idempotency-key", "x".repeat(255).parse().unwrap());
        assert!(idempotency_key(&h).is_ok());
    }

    #[test]
    fn if_match_reads_strong_tags_lists_and_star_and_never_matches_weak_tags() {
        let mut h = HeaderMap::new();
        let versions = |v: &[u64]| Some(IfMatch::Versions(v.to_vec()));
        for (raw, want) in [
            ("\"3\"", versions(&[3])),
            ("W/\"4\"", versions(&[])),
            ("5", versions(&[5])),
            ("\"1\", W/\"2\", \"3\"", versions(&[1, 3])),
            ("*", Some(IfMatch::Any)),
        ] {
            h.insert("if-match", raw.parse().unwrap());
            assert_eq!(if_match(&h).unwrap(), want, "{raw}");
        }
        h.insert("if-match", "\"abc\"".parse().unwrap());
        assert!(if_match(&h).is_err());
        assert!(IfMatch::Any.matches(1));
        assert!(!IfMatch::Any.matches(0), "`*` needs the resource to exist");
        assert!(!IfMatch::Versions(vec![]).matches(4));
    }
}
