//! The `/v1` middleware that checks API keys (see `app::keys`), and the extractors of the
//! key a request was authenticated with.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::Method;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;

use crate::app::App;
use crate::app::keys::{self, ApiKey, Scope};
use crate::http::error::ApiError;

/// `/v1` middleware: 401 without a valid key; 403 when a read key sends a command.
pub async fn authenticate(
    State(state): State<App>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = request.headers().get(AUTHORIZATION).ok_or_else(|| {
        ApiError::Unauthorized("an `Authorization: Bearer <api key>` header is required".into())
    })?;
    let key = header
        .to_str()
        .ok()
        // The scheme is case-insensitive (RFC 9110 §11.1): `bearer` and `BEARER` too.
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            ApiError::Unauthorized("the Authorization header must be `Bearer <api key>`".into())
        })?;
    let Some(ApiKey { id, scope }) = keys::lookup_cached(&state.pool, &state.keys, key).await?
    else {
        return Err(ApiError::Unauthorized("unknown or revoked API key".into()));
    };
    let reads = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !reads && scope < Scope::Write {
        return Err(ApiError::Forbidden("this API key may only read".into()));
    }
    request.extensions_mut().insert(ApiKey { id, scope });
    Ok(next.run(request).await)
}

impl<S: Send + Sync> FromRequestParts<S> for ApiKey {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<ApiKey>()
            .copied()
            .ok_or_else(|| ApiError::Unauthorized("an API key is required".into()))
    }
}

/// Extractor for admin-only routes.
#[derive(Debug, Clone, Copy)]
pub struct AdminKey(pub ApiKey);

impl<S: Send + Sync> FromRequestParts<S> for AdminKey {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let key = ApiKey::from_request_parts(parts, state).await?;
        if key.scope == Scope::Admin {
            Ok(Self(key))
        } else {
            Err(ApiError::Forbidden("this route needs an admin key".into()))
        }
    }
}
