//! The web console: server-rendered pages (maud) on the same `app` calls as the JSON API,
//! one stylesheet, charts as inline SVG, no script and no outside asset.
//!
//! Sign-in takes an API key and keeps it in an `HttpOnly`, `SameSite=Strict` cookie scoped
//! to `/console` (`Secure` behind TLS, as `X-Forwarded-Proto: https` says). Every request
//! looks the key up again, so a revoked key is signed out at once. Read keys look; write
//! and admin keys act. Every form that changes something carries a CSRF token derived from
//! the key (an HMAC under it), which a page of another origin can neither read nor make;
//! the sign-in form carries one tied to a cookie of its own. Every answer carries a
//! `Content-Security-Policy` that allows nothing from elsewhere and no script at all.

// A refused request's answer is the page itself, made once per request and sent as it
// is: boxing it would buy nothing.
#![allow(clippy::result_large_err)]

pub mod charts;
pub mod format;
pub mod pages;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use sha2::Sha256;

use crate::app::App;
use crate::app::command::CommandContext;
use crate::app::error::AppError;
use crate::app::keys::{self, ApiKey, Scope};

/// The cookie holding the signed-in key.
pub const SESSION_COOKIE: &str = "ll_console";
/// The cookie the sign-in form's token is tied to.
const SIGN_IN_COOKIE: &str = "ll_console_signin";

/// What every console answer says about where its parts may come from: only this server,
/// no script, no framing, forms only to itself.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
    form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const STYLE: &str = include_str!("style.css");
const ICON: &str = include_str!("icon.svg");

pub fn router() -> Router<App> {
    Router::new()
        .route("/console", get(pages::overview))
        .route("/console/", get(|| async { Redirect::to("/console") }))
        .route(
            "/console/sign-in",
            get(pages::sign_in_page).post(pages::sign_in),
        )
        .route("/console/sign-out", post(pages::sign_out))
        .route("/console/style.css", get(stylesheet))
        .route("/console/icon.svg", get(icon))
        .route("/console/campaigns", get(pages::campaigns))
        .route("/console/campaigns/{id}", get(pages::campaign))
        .route(
            "/console/campaigns/{id}/{transition}",
            post(pages::campaign_transition),
        )
        .route("/console/contacts", get(pages::contacts))
        .route("/console/contacts/{id}", get(pages::contact))
        .route(
            "/console/contacts/{id}/{action}",
            post(pages::contact_action),
        )
        .route("/console/webhooks", get(pages::webhooks))
        .route(
            "/console/webhooks/dead-letters/{id}/retry",
            post(pages::retry_dead_letter),
        )
        .route("/console/budgets", get(pages::budgets))
        .route("/console/operations", get(pages::operations))
        .route(
            "/console/{*rest}",
            get(|| async { error_page(StatusCode::NOT_FOUND, "No such page.") }),
        )
        .layer(axum::middleware::from_fn(headers))
}

/// The security headers of every console answer.
async fn headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        // Pages show live data and who is signed in: never from a cache.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        STYLE,
    )
        .into_response()
}

async fn icon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        ICON,
    )
        .into_response()
}

/// The signed-in key: who it is and the token its forms carry.
#[derive(Debug, Clone)]
pub struct Session {
    pub key: ApiKey,
    pub csrf: String,
    /// The request id, recorded with the events an action writes.
    pub request_id: Option<String>,
}

impl Session {
    pub fn can_act(&self) -> bool {
        self.key.scope >= Scope::Write
    }

    /// How a command from this session is recorded.
    pub fn context(&self) -> CommandContext {
        CommandContext {
            actor: Some(format!("api_key:{}", self.key.id)),
            correlation_id: self.request_id.clone(),
            if_match: None,
            idempotency: None,
        }
    }
}

/// The value of cookie `name`, if the request has it.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// `HMAC-SHA256(secret, purpose)`, URL-safe base64: a token only a holder of `secret` can
/// make.
fn token(secret: &str, purpose: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(purpose.as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The session of a request, or the answer to send instead: to the sign-in page when it
/// has none (or its key was revoked).
pub async fn session(app: &App, headers: &HeaderMap) -> Result<Session, Response> {
    let Some(raw) = cookie(headers, SESSION_COOKIE).filter(|k| !k.is_empty()) else {
        return Err(Redirect::to("/console/sign-in").into_response());
    };
    match keys::lookup_cached(&app.pool, &app.keys, raw).await {
        Ok(Some(key)) => Ok(Session {
            key,
            csrf: token(raw, "leadledger-console-csrf"),
            request_id: headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        }),
        Ok(None) => Err((
            [(header::SET_COOKIE, clear_cookie(SESSION_COOKIE, headers))],
            Redirect::to("/console/sign-in?expired=1"),
        )
            .into_response()),
        Err(e) => Err(app_error(e)),
    }
}

/// The session of a form that changes something: signed in, the form's CSRF token right,
/// and a key that may act. Anything else is refused with nothing changed.
pub async fn acting(app: &App, headers: &HeaderMap, form_token: &str) -> Result<Session, Response> {
    let session = match session(app, headers).await {
        Ok(s) => s,
        Err(_) => {
            return Err(error_page(
                StatusCode::UNAUTHORIZED,
                "Sign in again: this session has ended.",
            ));
        }
    };
    if !same(form_token, &session.csrf) {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "This form did not come from this console (its CSRF token is missing or wrong). Nothing was changed.",
        ));
    }
    if !session.can_act() {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "This key is a read key: it can look, not act. Sign in with a write key to do this. Nothing was changed.",
        ));
    }
    Ok(session)
}

/// Whether the request reached the server over TLS (through a proxy that says so).
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

fn set_cookie(name: &str, value: &str, headers: &HeaderMap) -> HeaderValue {
    let secure = if over_tls(headers) { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/console; HttpOnly; SameSite=Strict{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn clear_cookie(name: &str, headers: &HeaderMap) -> HeaderValue {
    let secure = if over_tls(headers) { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// An application error as a page; database failures are logged here, once.
pub fn app_error(e: AppError) -> Response {
    let status = match &e {
        AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
        AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        AppError::NotFound(_) => StatusCode::NOT_FOUND,
        AppError::Conflict { .. }
        | AppError::Campaign(_)
        | AppError::Contact(_)
        | AppError::Enrollment(_)
        | AppError::Budget(_) => StatusCode::CONFLICT,
        AppError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
        AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        AppError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        AppError::Database(db) if crate::app::error::is_unavailable(db) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        AppError::Database(_) | AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status.is_server_error() {
        tracing::error!(error = ?e, "console page failed");
    }
    error_page(status, &e.to_string())
}

/// A page saying what went wrong, with the status.
pub fn error_page(status: StatusCode, message: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    let body = page_shell(
        title,
        None,
        "",
        html! {
            section.panel.error {
                h1 { (status.as_u16()) " " (title) }
                p data-error=(status.as_u16()) { (message) }
                p { a href="/console" { "Back to the overview" } }
            }
        },
    );
    (status, body).into_response()
}

const NAV: [(&str, &str); 6] = [
    ("overview", "Overview"),
    ("campaigns", "Campaigns"),
    ("contacts", "Contacts"),
    ("webhooks", "Webhooks"),
    ("budgets", "Budgets & costs"),
    ("operations", "Operations"),
];

/// A whole page: head, navigation (when signed in), the content.
pub fn page_shell(
    title: &str,
    session: Option<&Session>,
    current: &str,
    content: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · leadledger" }
                link rel="stylesheet" href="/console/style.css";
                link rel="icon" href="/console/icon.svg" type="image/svg+xml";
            }
            body {
                header.top {
                    a.brand href="/console" { (PreEscaped(ICON)) span { "leadledger" } }
                    @if let Some(s) = session {
                        nav {
                            @for (slug, label) in NAV {
                                @let href = if slug == "overview" { "/console".to_string() } else { format!("/console/{slug}") };
                                a href=(href) aria-current=[(slug == current).then_some("page")] { (label) }
                            }
                        }
                        form.signout method="post" action="/console/sign-out" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            span.scope title="The scope of the signed-in key" { (s.key.scope.as_str()) " key" }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (content) }
            }
        }
    }
}

/// A hidden CSRF field for a form of `session`.
pub fn csrf_field(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// A page cursor: the sort key of the last item shown, as URL-safe text.
pub fn encode_cursor<T: serde::Serialize>(key: &T) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(key).unwrap_or_default())
}

/// A cursor this console made, or a 400 page.
pub fn decode_cursor<T: serde::de::DeserializeOwned>(
    raw: Option<&str>,
) -> Result<Option<T>, Response> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(None);
    };
    let bad = || {
        error_page(
            StatusCode::BAD_REQUEST,
            "That page link is not one this console made.",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| bad())?;
    let value: T = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    Ok(Some(value))
}

/// A cursor made of a time and an id, with the time within what PostgreSQL holds.
pub fn time_cursor(
    raw: Option<&str>,
) -> Result<Option<(chrono::DateTime<chrono::Utc>, uuid::Uuid)>, Response> {
    use chrono::Datelike;
    let cursor: Option<(chrono::DateTime<chrono::Utc>, uuid::Uuid)> = decode_cursor(raw)?;
    if cursor.is_some_and(|(t, _)| !(1..=9999).contains(&t.year())) {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "That page link is not one this console made.",
        ));
    }
    Ok(cursor)
}

/// Sign-in cookies and tokens, for the pages module.
pub(crate) mod signin {
    use super::*;

    /// A fresh random token for the sign-in form, and the cookie that carries it.
    pub fn fresh(headers: &HeaderMap) -> (String, HeaderValue) {
        let bytes: [u8; 32] = rand::random();
        let value = URL_SAFE_NO_PAD.encode(bytes);
        let cookie = set_cookie(SIGN_IN_COOKIE, &value, headers);
        (value, cookie)
    }

    /// Whether the form's token is the one its cookie carries.
    pub fn valid(headers: &HeaderMap, form_token: &str) -> bool {
        cookie(headers, SIGN_IN_COOKIE).is_some_and(|c| !c.is_empty() && same(c, form_token))
    }

    /// The cookies that sign `key` in (and drop the sign-in token).
    pub fn signed_in(key: &str, headers: &HeaderMap) -> [HeaderValue; 2] {
        [
            set_cookie(SESSION_COOKIE, key, headers),
            clear_cookie(SIGN_IN_COOKIE, headers),
        ]
    }

    /// The cookie that signs out.
    pub fn signed_out(headers: &HeaderMap) -> HeaderValue {
        clear_cookie(SESSION_COOKIE, headers)
    }
}
