//! What can go wrong in an application call, whatever the transport: the caller's
//! mistakes, refusals of the domain (typed, as the aggregates name them), and failures of
//! the database, which keep their `sqlx::Error` as their source. `http::error` decides the
//! status code and problem+json of each, and logs a failure once, where it becomes an
//! answer.

use serde::Serialize;

use crate::store::StoreError;

/// One field at fault in an invalid request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The input cannot be read at all (malformed JSON or CSV, a bad parameter).
    #[error("{0}")]
    BadRequest(String),
    /// The caller could not be authenticated (a webhook's source or signature).
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    /// A business-rule conflict, typed by `kind`.
    #[error("{detail}")]
    Conflict { kind: &'static str, detail: String },
    /// The resource is not at the version the caller expected (`If-Match`).
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Well-formed input with invalid values, field by field.
    #[error("{detail}")]
    Unprocessable {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error(transparent)]
    Campaign(#[from] aggregates::CampaignError),
    #[error(transparent)]
    Contact(#[from] aggregates::contact::ContactError),
    #[error(transparent)]
    Enrollment(#[from] aggregates::enrollment::EnrollmentError),
    #[error(transparent)]
    Budget(#[from] aggregates::budget::BudgetError),
    /// The database failed; the source is kept for the one place that logs it.
    #[error("{}", database_summary(.0))]
    Database(#[from] sqlx::Error),
    /// A defect: what should not happen did (the detail is logged, never shown).
    #[error("internal error")]
    Internal(String),
}

impl AppError {
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

/// What a database failure is, in the words an answer may use (never the driver's).
fn database_summary(e: &sqlx::Error) -> &'static str {
    if matches!(e, sqlx::Error::PoolTimedOut) || is_out_of_descriptors(e) {
        "the server is busy"
    } else if is_unavailable(e) {
        "database unavailable"
    } else if is_unstorable_text(e) {
        "the request holds a character that cannot be stored (NUL)"
    } else {
        "internal error"
    }
}

/// 22021 (character not in repertoire) and 22P05 (untranslatable character): text the
/// database cannot store, which only a NUL character can cause in UTF-8.
pub fn is_unstorable_text(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("22021" | "22P05"))
    )
}

/// EMFILE / ENFILE: this process (or the system) has no descriptor for a new connection.
pub fn is_out_of_descriptors(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(io) if matches!(io.raw_os_error(), Some(23 | 24)))
}

/// Errors that mean "the database cannot be reached now", as opposed to a defect.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 57P01..57P03: admin shutdown, crash shutdown, cannot connect now;
            // 08xxx: connection exceptions; 53300: too many connections.
            code.starts_with("57P") || code.starts_with("08") || code == "53300"
        }),
        _ => false,
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Database(e) => Self::Database(e),
            too_large @ StoreError::EventTooLarge { .. } => {
                Self::PayloadTooLarge(too_large.to_string())
            }
            other => Self::Internal(other.to_string()),
        }
    }
}
