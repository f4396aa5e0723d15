//! Command routes' side of command execution (`app::command`): the request's
//! [`CommandContext`] in, the [`Answer`] out as a response.

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use cqrs_es::Aggregate;

use crate::app::App;
pub use crate::app::command::{Answer, CommandContext, Recorded, Reply, Written, load_existing};
use crate::app::error::AppError;
use crate::http::error::ApiError;
use crate::http::extract::CommandRequest;
use crate::store::Loaded;
use crate::store::StoreError;

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let headers = self.headers();
        let body = serde_json::to_vec(&self.body).unwrap_or_default();
        (self.status, headers, body).into_response()
    }
}

impl IntoResponse for Recorded {
    fn into_response(mut self) -> Response {
        self.headers
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        (self.status, self.headers, self.body).into_response()
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self {
            Self::Fresh(reply) => reply.into_response(),
            Self::Replayed(recorded) => recorded.into_response(),
        }
    }
}

/// [`crate::app::command::execute`] for a route.
pub async fn execute<A, M, R>(
    state: &App,
    request: &CommandRequest,
    id: &str,
    services: &A::Services,
    make: M,
    render: R,
) -> Result<Response, ApiError>
where
    A: Aggregate + Clone + 'static,
    A::Error: Into<ApiError>,
    M: Fn(&Loaded<A>) -> Result<A::Command, ApiError>,
    R: Fn(&Written<A>) -> Reply,
{
    crate::app::command::execute::<A, ApiError, _, _, _>(
        state,
        &request.context(),
        id,
        services,
        make,
        render,
        error_reply,
    )
    .await
    .map(IntoResponse::into_response)
}

/// An error as a recordable reply (problem+json).
pub fn error_reply(error: &ApiError) -> Reply {
    let response = error.problem();
    Reply {
        status: error.status(),
        body: response,
        etag_version: None,
        location: None,
    }
}

/// A store failure as an answer.
pub fn store_error(e: StoreError) -> ApiError {
    AppError::from(e).into()
}
