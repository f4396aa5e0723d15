//! The one place where errors become HTTP answers: `application/problem+json` (RFC 9457)
//! with the status table of the README ("Errors"). Server-side details are logged, never sent.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

const PROBLEM_JSON: &str = "application/problem+json";
const TYPE_BASE: &str = "https://leadledger.dev/problems/";

use crate::app::error::AppError;
pub use crate::app::error::FieldError;

/// Every error an HTTP route can answer with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid credentials")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The resource existed and was removed for good (an erased contact).
    #[error("{0}")]
    Gone(String),
    #[error("{detail}")]
    Conflict { kind: &'static str, detail: String },
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{detail}")]
    Unprocessable {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("database unavailable")]
    Unavailable(String),
    /// Every pooled connection is busy: the database is up, this process is saturated.
    #[error("the server is busy")]
    Busy,
    /// `?min_position=` was not reached by the read models in time.
    #[error("the read models have not caught up with min_position yet")]
    NotCaughtUp,
    /// The request ran past the server's time limit for one request.
    #[error("the request took too long")]
    TimedOut,
    #[error("{0}")]
    UriTooLong(String),
    #[error("{0}")]
    HeadersTooLarge(String),
    #[error("internal error")]
    Internal(String),
    /// Any of the above with extension members in its problem body (RFC 9457 §3.2), such
    /// as the amount still available in a budget-exceeded conflict. Standard members win.
    #[error("{inner}")]
    Extended {
        inner: Box<ApiError>,
        members: serde_json::Map<String, serde_json::Value>,
    },
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<&'a [FieldError]>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Gone(_) => StatusCode::GONE,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) | Self::Busy | Self::NotCaughtUp | Self::TimedOut => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Extended { inner, .. } => inner.status(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad-request",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not-found",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::Gone(_) => "gone",
            Self::Conflict { kind, .. } => kind,
            Self::PreconditionFailed(_) => "precondition-failed",
            Self::PayloadTooLarge(_) => "payload-too-large",
            Self::UnsupportedMediaType(_) => "unsupported-media-type",
            Self::Unprocessable { .. } => "validation-failed",
            Self::Unavailable(_) => "service-unavailable",
            Self::Busy => "server-busy",
            Self::NotCaughtUp => "not-caught-up",
            Self::TimedOut => "request-timeout",
            Self::UriTooLong(_) => "uri-too-long",
            Self::HeadersTooLarge(_) => "headers-too-large",
            Self::Internal(_) => "internal-error",
            Self::Extended { inner, .. } => inner.kind(),
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "Bad request",
            Self::Unauthorized(_) => "Unauthorized",
            Self::Forbidden(_) => "Forbidden",
            Self::NotFound(_) => "Not found",
            Self::MethodNotAllowed => "Method not allowed",
            Self::Gone(_) => "Gone",
            Self::Conflict { .. } => "Conflict",
            Self::PreconditionFailed(_) => "Precondition failed",
            Self::PayloadTooLarge(_) => "Payload too large",
            Self::UnsupportedMediaType(_) => "Unsupported media type",
            Self::Unprocessable { .. } => "Invalid request",
            Self::Unavailable(_) | Self::Busy | Self::NotCaughtUp | Self::TimedOut => {
                "Service unavailable"
            }
            Self::UriTooLong(_) => "URI too long",
            Self::HeadersTooLarge(_) => "Request header fields too large",
            Self::Internal(_) => "Internal server error",
            Self::Extended { inner, .. } => inner.title(),
        }
    }

    /// 410 for an erased contact, with when it was erased.
    pub fn erased(erased_at: chrono::DateTime<chrono::Utc>) -> Self {
        let mut members = serde_json::Map::new();
        members.insert("erased_at".into(), serde_json::json!(erased_at));
        Self::Extended {
            inner: Box::new(Self::Gone("the contact was erased".into())),
            members,
        }
    }

    /// A business-rule conflict, typed by `kind` (the end of the problem `type`).
    pub fn conflict(kind: &'static str, detail: impl Into<String>) -> Self {
        Self::Conflict {
            kind,
            detail: detail.into(),
        }
    }

    pub fn invalid(errors: Vec<FieldError>) -> Self {
        let detail = match errors.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            _ => format!("{} fields are invalid", errors.len()),
        };
        Self::Unprocessable { detail, errors }
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        match e {
            AppError::BadRequest(detail) => Self::BadRequest(detail),
            AppError::Unauthorized(detail) => Self::Unauthorized(detail),
            AppError::NotFound(detail) => Self::NotFound(detail),
            AppError::Conflict { kind, detail } => Self::Conflict { kind, detail },
            AppError::PreconditionFailed(detail) => Self::PreconditionFailed(detail),
            AppError::PayloadTooLarge(detail) => Self::PayloadTooLarge(detail),
            AppError::Unprocessable { detail, errors } => Self::Unprocessable { detail, errors },
            AppError::Campaign(e) => e.into(),
            AppError::Contact(e) => e.into(),
            AppError::Enrollment(e) => e.into(),
            AppError::Budget(e) => e.into(),
            AppError::Database(e) => e.into(),
            AppError::Internal(detail) => Self::Internal(detail),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if matches!(e, sqlx::Error::PoolTimedOut) || is_out_of_descriptors(&e) {
            // The pool is exhausted, or this process out of descriptors for a new
            // connection: the database is not down, and the answer must not say it is.
            Self::Busy
        } else if is_unavailable(&e) {
            Self::Unavailable(e.to_string())
        } else if is_unstorable_text(&e) {
            // Every route refuses NUL characters before it writes; this is the net under
            // a check that was missed, so that such input is a client error, never a 500.
            Self::BadRequest("the request holds a character that cannot be stored (NUL)".into())
        } else {
            Self::Internal(e.to_string())
        }
    }
}

pub use crate::app::error::{is_out_of_descriptors, is_unavailable, is_unstorable_text};

impl From<aggregates::CampaignError> for ApiError {
    fn from(e: aggregates::CampaignError) -> Self {
        use aggregates::CampaignError as E;
        match e {
            E::InvalidName(_) => Self::invalid(vec![FieldError::new("name", e.to_string())]),
            E::NotFound => Self::NotFound("no campaign with this id".into()),
            E::AlreadyExists => Self::conflict("already-exists", e.to_string()),
            E::InvalidTransition { .. } => Self::conflict("invalid-transition", e.to_string()),
            E::InvalidExternalId(ref reason) => {
                Self::invalid(vec![FieldError::new("external_ids", reason.clone())])
            }
        }
    }
}

impl From<aggregates::contact::ContactError> for ApiError {
    fn from(e: aggregates::contact::ContactError) -> Self {
        use aggregates::contact::ContactError as E;
        match e {
            E::InvalidField { field, reason } => {
                Self::invalid(vec![FieldError::new(field, reason)])
            }
            E::NotFound => Self::NotFound("no contact with this id".into()),
            E::EmailMismatch => Self::conflict("email-mismatch", e.to_string()),
            E::Erased { erased_at } => Self::erased(erased_at),
            E::EmailErased => Self::conflict("contact-erased", e.to_string()),
            E::NotErased => Self::conflict("not-erased", e.to_string()),
        }
    }
}

impl From<aggregates::enrollment::EnrollmentError> for ApiError {
    fn from(e: aggregates::enrollment::EnrollmentError) -> Self {
        use aggregates::enrollment::EnrollmentError as E;
        match e {
            E::AlreadyEnrolled => Self::conflict("already-enrolled", e.to_string()),
            E::NotEnrolled => Self::NotFound("no enrollment with this id".into()),
            E::InvalidProviderEventId(_) => {
                Self::invalid(vec![FieldError::new("id", e.to_string())])
            }
        }
    }
}

impl ApiError {
    /// The problem+json body; server-side details are logged here and never sent.
    pub fn problem(&self) -> serde_json::Value {
        if let Self::Extended { inner, members } = self {
            let mut body = inner.problem();
            if let Some(object) = body.as_object_mut() {
                for (name, value) in members {
                    object.entry(name.clone()).or_insert_with(|| value.clone());
                }
            }
            return body;
        }
        let status = self.status();
        let detail = match self {
            Self::Internal(inner) => {
                tracing::error!(error = %inner, "internal error");
                "an unexpected error occurred; it has been logged".to_string()
            }
            Self::Unavailable(inner) => {
                tracing::warn!(error = %inner, "database unavailable");
                "the database is unavailable; retry shortly".to_string()
            }
            Self::Busy => {
                tracing::warn!("no database connection free within the acquire timeout");
                "every database connection of this server is busy; retry shortly".to_string()
            }
            Self::NotCaughtUp => "the read models have not caught up with min_position within 5 \
                                  seconds; retry shortly"
                .to_string(),
            Self::TimedOut => {
                "the request took longer than this server allows; it was stopped and \
                 nothing it had not committed was kept"
                    .to_string()
            }
            Self::Unauthorized(detail) => detail.clone(),
            other => other.to_string(),
        };
        let errors = match self {
            Self::Unprocessable { errors, .. } if !errors.is_empty() => Some(errors.as_slice()),
            _ => None,
        };
        let body = Problem {
            kind: format!("{TYPE_BASE}{}", self.kind()),
            title: self.title(),
            status: status.as_u16(),
            detail,
            errors,
        };
        serde_json::to_value(&body).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let bytes = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (status, bytes).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"leadledger\""),
            );
        }
        response
    }
}

impl ApiError {
    /// This error with extension members added to its problem body.
    pub fn with_members(self, members: serde_json::Map<String, serde_json::Value>) -> Self {
        Self::Extended {
            inner: Box::new(self),
            members,
        }
    }
}

impl From<aggregates::budget::BudgetError> for ApiError {
    fn from(e: aggregates::budget::BudgetError) -> Self {
        use aggregates::budget::BudgetError as E;
        match e {
            E::InvalidField { field, reason } => {
                Self::invalid(vec![FieldError::new(field, reason)])
            }
            E::NotFound => Self::NotFound("no budget with this id".into()),
            E::AlreadyExists => Self::conflict("already-exists", e.to_string()),
            E::BudgetExceeded {
                remaining,
                available,
            } => {
                let mut members = serde_json::Map::new();
                members.insert("remaining".into(), remaining.to_string().into());
                members.insert("available".into(), available.to_string().into());
                Self::conflict(
                    "budget-exceeded",
                    format!(
                        "this would take the budget over its limit: {remaining} remaining, \
                         {available} available"
                    ),
                )
                .with_members(members)
            }
            E::ReservationNotFound => Self::NotFound("no reservation with this id".into()),
            E::ReservationAlreadyExists => Self::conflict("reservation-exists", e.to_string()),
            E::ReservationReleased => Self::conflict("reservation-released", e.to_string()),
            E::ReservationExpired => Self::conflict("reservation-expired", e.to_string()),
            E::CaptureExceedsHold { held } => Self::invalid(vec![FieldError::new(
                "amount",
                format!("must be at most the {held} held by the reservation"),
            )]),
            E::AmountOverflow => Self::invalid(vec![FieldError::new(
                "amount",
                "takes the budget's total out of range",
            )]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exhausted_pool_is_told_apart_from_a_database_outage() {
        let busy = ApiError::from(sqlx::Error::PoolTimedOut).problem();
        assert_eq!(busy["status"], 503);
        assert!(busy["type"].as_str().unwrap().ends_with("server-busy"));
        assert!(!busy["detail"].as_str().unwrap().contains("unavailable"));
        let emfile = std::io::Error::from_raw_os_error(24);
        let no_fd = ApiError::from(sqlx::Error::Io(emfile)).problem();
        assert!(no_fd["type"].as_str().unwrap().ends_with("server-busy"));
        let down = ApiError::from(sqlx::Error::PoolClosed).problem();
        assert!(
            down["type"]
                .as_str()
                .unwrap()
                .ends_with("service-unavailable")
        );
    }
}
