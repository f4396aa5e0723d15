//! Limits every request meets before a route sees it: a bounded `X-Request-Id`, URI and
//! header sizes answered as problem+json, `Connection: close` when a request is refused
//! before its body was read, and a time limit for one request.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{App, REQUEST_ID};
use crate::http::error::ApiError;

/// The longest `X-Request-Id` taken from a client; it is copied into every event's
/// metadata and every log line of the request, so it must stay small.
pub const MAX_REQUEST_ID_CHARS: usize = 128;
/// The longest request target (path and query).
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// The most header bytes (names and values) one request may carry.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A client's `X-Request-Id` is kept when it is 1 to 128 visible ASCII characters;
/// otherwise it is dropped and the server makes one (the layer after this one).
pub async fn request_id(mut request: Request, next: Next) -> Response {
    let acceptable = request.headers().get(REQUEST_ID).map(|v| {
        let bytes = v.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID_CHARS
            && bytes.iter().all(|b| (0x21..=0x7e).contains(b))
    });
    if acceptable == Some(false) || request.headers().get_all(REQUEST_ID).iter().count() > 1 {
        request.headers_mut().remove(REQUEST_ID);
    }
    next.run(request).await
}

/// 414 and 431 as problem+json (the HTTP parser's own, larger limits answer without a
/// body), and `Connection: close` on any refusal sent before the request's body was
/// read, so a client does not write its body into a connection that will not read it.
pub async fn limits(request: Request, next: Next) -> Response {
    let has_body = request.headers().contains_key(header::TRANSFER_ENCODING)
        || request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > 0);
    let uri_len = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    let mut response = if uri_len > MAX_URI_BYTES {
        ApiError::UriTooLong(format!(
            "the request target is {uri_len} bytes; at most {MAX_URI_BYTES} are accepted"
        ))
        .into_response()
    } else if header_bytes > MAX_HEADER_BYTES {
        ApiError::HeadersTooLarge(format!(
            "the request's headers are {header_bytes} bytes; \
             at most {MAX_HEADER_BYTES} are accepted"
        ))
        .into_response()
    } else {
        next.run(request).await
    };
    let refused_unread = matches!(
        response.status(),
        StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::URI_TOO_LONG
            | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    if has_body && refused_unread {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// One request may run for at most the configured time: past it the client gets 503
/// (problem+json) and the work is dropped, rolling back what it had not committed. A
/// hung database thus never holds a request until shutdown's grace runs out.
pub async fn deadline(State(state): State<App>, request: Request, next: Next) -> Response {
    let limit: Duration = state.limits.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(
                limit_secs = limit.as_secs_f64(),
                "request stopped at its time limit"
            );
            ApiError::TimedOut.into_response()
        }
    }
}
