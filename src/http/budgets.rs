//! Budget routes: create, read (from its stream), change the limit, spend, and
//! reserve / capture / release (commands on the Budget aggregate); and the background
//! worker that expires holds past their time.
//!
//! The limit check and the spend are one decision inside the aggregate, committed under
//! optimistic concurrency by `command::execute`: two spends that both fit alone but not
//! together cannot both commit, whatever the number of server processes.

use aggregates::budget::{
    Budget, BudgetCommand, BudgetName, BudgetPeriod, GracePercent, MAX_HOLD, ReservationOutcome,
    SpendCategory,
};
use aggregates::money::{Limit, Money, PositiveAmount};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::App;
use crate::http::command::{self, Reply, Written};
use crate::http::error::{ApiError, FieldError};
use crate::http::extract::{
    ApiQuery, CommandRequest, MinPosition, PageQuery, cut_page, json_with_etag, parse_json,
};
use crate::store::Loaded;

const TAG: &str = "budgets";

/// Hold length when a reservation names none (`ttl_seconds` defaults to 3600).
pub const DEFAULT_TTL_SECONDS: i64 = 3600;

pub fn router() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(create_budget, list_budgets))
        .routes(routes!(get_budget, set_limit))
        .routes(routes!(spend))
        .routes(routes!(reserve))
        .routes(routes!(capture))
        .routes(routes!(release))
}

/// Reads a field that must be present but may be `null` (`limit`): a missing field stays
/// `None` through `#[serde(default)]`, a present one is `Some(value or None)`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBudget {
    /// 1..=200 characters, trimmed.
    name: String,
    /// Required: an amount (decimal string or JSON number, ≥ 0, ≤ 10^12, at most 6
    /// decimals), or `null` for a tracking-only budget.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, example = "100.00")]
    limit: Option<Option<Limit>>,
    /// none | daily | monthly (UTC calendar periods). Default none.
    #[schema(value_type = Option<String>, example = "monthly")]
    period: Option<BudgetPeriod>,
    /// How far past its limit the budget may go, in percent (0..=100). Default 0.
    #[schema(value_type = Option<u8>)]
    grace_percent: Option<GracePercent>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetLimit {
    /// Required: an amount, or `null` to stop limiting (tracking only).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, example = "250")]
    limit: Option<Option<Limit>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpendRequest {
    /// More than 0, at most 1,000,000, at most 6 decimals; a decimal string or a JSON
    /// number (read from its text, never through a float).
    #[schema(value_type = String, example = "0.25")]
    amount: PositiveAmount,
    /// enrichment | ai | outreach | other
    #[schema(value_type = String, example = "ai")]
    category: SpendCategory,
    /// Up to 1000 characters.
    description: Option<String>,
    /// Up to 200 characters, e.g. the AI model that was billed.
    model: Option<String>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    #[schema(value_type = String, example = "5")]
    amount: PositiveAmount,
    #[schema(value_type = String, example = "ai")]
    category: SpendCategory,
    /// How long the hold lasts: 1..=86400 seconds, default 3600.
    ttl_seconds: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    /// At most the amount held; the rest of the hold is freed.
    #[schema(value_type = String, example = "3.20")]
    amount: PositiveAmount,
}

/// A release takes no fields; an empty body or `{}` will do.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {}

/// A budget as its stream says (strongly consistent). Money is always a decimal string.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetBody {
    id: Uuid,
    name: String,
    /// null: tracking only.
    #[schema(value_type = Option<String>)]
    limit: Option<Money>,
    /// none | daily | monthly
    period: String,
    grace_percent: u8,
    /// Spent in the current period (for `none`, ever).
    #[schema(value_type = String)]
    spent: Money,
    /// Held by reservations not yet captured, released or expired.
    #[schema(value_type = String)]
    reserved: Money,
    /// limit − spent − reserved, never below 0; null when tracking only.
    #[schema(value_type = Option<String>)]
    remaining: Option<Money>,
    /// Spent over the budget's whole life.
    #[schema(value_type = String)]
    spent_total: Money,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    /// Events in the budget's stream; the ETag.
    version: u64,
    /// Read-your-writes token of the budget's last event.
    position: String,
}

/// The answer to a spend.
#[derive(Debug, Serialize, ToSchema)]
pub struct SpendBody {
    spend_id: Uuid,
    budget_id: Uuid,
    #[schema(value_type = String)]
    amount: Money,
    #[schema(value_type = String)]
    spent: Money,
    #[schema(value_type = String)]
    reserved: Money,
    #[schema(value_type = Option<String>)]
    remaining: Option<Money>,
    version: u64,
    position: String,
}

/// The answer to a new reservation.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReservationCreatedBody {
    reservation_id: Uuid,
    budget_id: Uuid,
    #[schema(value_type = String)]
    amount: Money,
    category: String,
    expires_at: DateTime<Utc>,
    #[schema(value_type = String)]
    spent: Money,
    #[schema(value_type = String)]
    reserved: Money,
    #[schema(value_type = Option<String>)]
    remaining: Option<Money>,
    version: u64,
    position: String,
}

/// The answer to a capture or a release: where the reservation stands now.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReservationStateBody {
    reservation_id: Uuid,
    budget_id: Uuid,
    /// held | captured | released | expired
    status: String,
    /// The amount spent by the capture, when captured.
    #[schema(value_type = Option<String>)]
    captured: Option<Money>,
    #[schema(value_type = String)]
    spent: Money,
    #[schema(value_type = String)]
    reserved: Money,
    #[schema(value_type = Option<String>)]
    remaining: Option<Money>,
    version: u64,
    position: String,
}

fn budget_body(id: Uuid, loaded: &Loaded<Budget>, now: DateTime<Utc>) -> BudgetBody {
    let b = &loaded.aggregate;
    BudgetBody {
        id,
        name: b.name.clone(),
        limit: b.limit.map(Money::from),
        period: b.period.as_str().to_string(),
        grace_percent: b.grace_percent.value(),
        spent: b.spent_at(now),
        reserved: b.reserved_at(now),
        remaining: b.remaining_at(now),
        spent_total: b.spent_total,
        created_at: b.created_at,
        updated_at: b.updated_at,
        version: loaded.version,
        position: loaded.last_position.unwrap_or_default().to_string(),
    }
}

/// A reply from a serializable body, with the budget's version as ETag.
fn reply<T: Serialize>(body: &T, version: u64) -> Reply {
    Reply::ok(serde_json::to_value(body).unwrap_or_default()).with_etag(version)
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound("no budget with this id".into()))
}

fn parse_reservation_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound("no reservation with this id".into()))
}

fn required<T>(value: Option<T>, field: &str, what: &str) -> Result<T, ApiError> {
    value.ok_or_else(|| {
        ApiError::invalid(vec![FieldError::new(field, format!("is required: {what}"))])
    })
}

/// The body as `T`, as `CommandRequest::json` reads it, with one difference: the bare
/// `NaN`, `Infinity` and `-Infinity` that JavaScript and Python encoders write for
/// non-finite floats are not JSON, but in these bodies they are an amount that is not a
/// number, which the API answers with 422. Each is quoted and the body read again, so
/// that the field's own check names it; any other malformed body stays a 400.
fn parse_body<T: DeserializeOwned>(request: &CommandRequest) -> Result<T, ApiError> {
    match request.json::<T>() {
        Err(ApiError::BadRequest(detail)) => match quote_non_finite(&request.body) {
            Some(quoted) => match parse_json::<T>(&quoted) {
                Err(invalid @ ApiError::Unprocessable { .. }) => Err(invalid),
                _ => Err(ApiError::BadRequest(detail)),
            },
            None => Err(ApiError::BadRequest(detail)),
        },
        other => other,
    }
}

/// The body with every bare `NaN`, `Infinity` and `-Infinity` in a value position
/// (after `:`, `[` or `,`, and not followed by `:` as a key would be) quoted, or `None` if
/// it has none. Outside strings JSON has no other bare words than `true`, `false` and
/// `null`, so nothing valid is changed.
fn quote_non_finite(body: &[u8]) -> Option<Vec<u8>> {
    const WORDS: [&[u8]; 3] = [b"-Infinity", b"Infinity", b"NaN"];
    let mut out = Vec::with_capacity(body.len() + 8);
    let mut in_string = false;
    let mut escaped = false;
    let mut changed = false;
    // The last byte outside strings that was not whitespace.
    let mut last = 0u8;
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            out.push(b);
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            last = b;
            out.push(b);
            i += 1;
            continue;
        }
        let word = WORDS.iter().find(|w| {
            let rest = &body[i + w.len().min(body.len() - i)..];
            let next = rest.iter().find(|c| !c.is_ascii_whitespace());
            matches!(last, b':' | b'[' | b',')
                && body[i..].starts_with(w)
                && rest.first().is_none_or(|c| !c.is_ascii_alphanumeric())
                && next != Some(&b':')
        });
        if !b.is_ascii_whitespace() {
            last = b;
        }
        match word {
            Some(w) => {
                out.push(b'"');
                out.extend_from_slice(w);
                out.push(b'"');
                i += w.len();
                changed = true;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    changed.then_some(out)
}

/// Create a budget. `limit: null` makes a tracking-only budget.
#[utoipa::path(post, path = "/v1/budgets", tag = TAG, request_body = CreateBudget,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 201, body = BudgetBody), (status = 422, description = "Invalid values")))]
async fn create_budget(
    State(state): State<App>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let input: CreateBudget = parse_body(&request)?;
    let name = BudgetName::parse(&input.name).map_err(ApiError::from)?;
    let limit = required(
        input.limit,
        "limit",
        "an amount, or null for a tracking-only budget",
    )?;
    let period = input.period.unwrap_or_default();
    let grace_percent = input.grace_percent.unwrap_or_default();
    let id = Uuid::now_v7();
    let at = Utc::now();
    command::execute::<Budget, _, _>(
        &state,
        &request,
        &id.to_string(),
        &(),
        |_| {
            Ok(BudgetCommand::Create {
                name: name.clone(),
                limit,
                period,
                grace_percent,
                at,
            })
        },
        |written| {
            let mut body = budget_body(id, &written.loaded, at);
            body.position = written.position().to_string();
            reply(&body, written.version())
                .with_status(StatusCode::CREATED)
                .with_location(format!("/v1/budgets/{id}"))
        },
    )
    .await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListBudgets {
    /// 1..=500, default 50.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Wait until the list includes this write.
    min_position: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetPage {
    items: Vec<BudgetBody>,
    /// The next page's cursor; null on the last page.
    next_cursor: Option<String>,
}

pub use crate::app::budgets::BUDGETS_READ_MODEL;

/// Every budget, oldest first, each as `GET /v1/budgets/{id}` shows it (read from its
/// stream; the list itself from the read model `budgets`, so it takes `min_position`).
#[utoipa::path(get, path = "/v1/budgets", tag = TAG, params(ListBudgets),
    responses((status = 200, body = BudgetPage), (status = 400, description = "limit or cursor invalid"),
        (status = 503, description = "min_position not reached in 5 s")))]
async fn list_budgets(
    State(state): State<App>,
    ApiQuery(query): ApiQuery<ListBudgets>,
    min_position: MinPosition,
) -> Result<Response, ApiError> {
    let _ = &query.min_position;
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    };
    let limit = page.limit()?;
    let after: Option<i64> = page.cursor()?;
    let mut conn = min_position
        .connection(&state, &[BUDGETS_READ_MODEL])
        .await?;
    let mut rows = projections::budgets::page(&mut conn, after, limit + 1).await?;
    let next_cursor = cut_page(&mut rows, limit, |r| r.position);
    let ids: Vec<String> = rows.iter().map(|r| r.id.to_string()).collect();
    let loaded: std::collections::HashMap<String, Loaded<Budget>> = state
        .store
        .load_many(&mut conn, &ids)
        .await
        .map_err(command::store_error)?;
    let now = Utc::now();
    let items = rows
        .iter()
        .filter_map(|r| {
            let l = loaded.get(&r.id.to_string())?;
            Some(budget_body(r.id, l, now))
        })
        .collect();
    Ok(axum::Json(BudgetPage { items, next_cursor }).into_response())
}

/// A budget, from its event stream: spent and reserved as of now.
#[utoipa::path(get, path = "/v1/budgets/{id}", tag = TAG, params(("id" = Uuid, Path), ("min_position" = Option<String>, Query, description = "Position token of a write; always reached here")),
    responses((status = 200, body = BudgetBody), (status = 404)))]
async fn get_budget(
    State(state): State<App>,
    Path(id): Path<String>,
    // Read from the stream, which holds every committed write: a valid token is already
    // reached. It is still checked, like on every read.
    _min_position: MinPosition,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let loaded: Loaded<Budget> =
        command::load_existing(&state, id, |b: &Budget| b.created, "no budget with this id")
            .await?;
    Ok(json_with_etag(
        &budget_body(id, &loaded, Utc::now()),
        loaded.version,
    ))
}

/// Change a budget's limit (`null`: tracking only). Honours `If-Match`. Lowering it below
/// what is spent is allowed: further spends are refused.
#[utoipa::path(patch, path = "/v1/budgets/{id}", tag = TAG, request_body = SetLimit,
    params(("id" = Uuid, Path), ("If-Match" = Option<String>, Header, description = "Expected version, e.g. \"3\"")),
    responses((status = 200, body = BudgetBody), (status = 404), (status = 412), (status = 422)))]
async fn set_limit(
    State(state): State<App>,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let input: SetLimit = parse_body(&request)?;
    let limit = required(input.limit, "limit", "an amount, or null for tracking only")?;
    let at = Utc::now();
    command::execute::<Budget, _, _>(
        &state,
        &request,
        &id.to_string(),
        &(),
        |_| Ok(BudgetCommand::SetLimit { limit, at }),
        |written| {
            let mut body = budget_body(id, &written.loaded, at);
            body.position = written.position().to_string();
            reply(&body, written.version())
        },
    )
    .await
}

/// Record a spend. Refused with 409 `budget-exceeded` (and `remaining`, `available` in the
/// problem body) when `spent + reserved + amount` would pass the limit; nothing changes then.
#[utoipa::path(post, path = "/v1/budgets/{id}/spend", tag = TAG, request_body = SpendRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 201, body = SpendBody), (status = 404),
        (status = 409, description = "budget-exceeded: the problem body carries `remaining` and `available`"),
        (status = 422, description = "Invalid amount or fields")))]
async fn spend(
    State(state): State<App>,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let input: SpendRequest = parse_body(&request)?;
    let spend_id = Uuid::now_v7();
    let at = Utc::now();
    command::execute::<Budget, _, _>(
        &state,
        &request,
        &id.to_string(),
        &(),
        |_| {
            Ok(BudgetCommand::Spend {
                spend_id,
                amount: input.amount,
                category: input.category,
                description: input.description.clone(),
                model: input.model.clone(),
                input_tokens: input.input_tokens,
                output_tokens: input.output_tokens,
                at,
            })
        },
        |written| {
            let b = &written.loaded.aggregate;
            let body = SpendBody {
                spend_id,
                budget_id: id,
                amount: input.amount.money(),
                spent: b.spent_at(at),
                reserved: b.reserved_at(at),
                remaining: b.remaining_at(at),
                version: written.version(),
                position: written.position().to_string(),
            };
            reply(&body, written.version()).with_status(StatusCode::CREATED)
        },
    )
    .await
}

/// Hold money until it is captured, released or expires. Counts against the limit like a
/// spend (409 `budget-exceeded` when it does not fit).
#[utoipa::path(post, path = "/v1/budgets/{id}/reservations", tag = TAG, request_body = ReserveRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 201, body = ReservationCreatedBody), (status = 404),
        (status = 409, description = "budget-exceeded"), (status = 422)))]
async fn reserve(
    State(state): State<App>,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let input: ReserveRequest = parse_body(&request)?;
    let ttl = input.ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS);
    if !(1..=MAX_HOLD.num_seconds()).contains(&ttl) {
        return Err(ApiError::invalid(vec![FieldError::new(
            "ttl_seconds",
            format!("must be from 1 to {}", MAX_HOLD.num_seconds()),
        )]));
    }
    let reservation_id = Uuid::now_v7();
    let at = Utc::now();
    let expires_at = at + chrono::Duration::seconds(ttl);
    command::execute::<Budget, _, _>(
        &state,
        &request,
        &id.to_string(),
        &(),
        |_| {
            Ok(BudgetCommand::Reserve {
                reservation_id,
                amount: input.amount,
                category: input.category,
                expires_at,
                at,
            })
        },
        |written| {
            let b = &written.loaded.aggregate;
            let body = ReservationCreatedBody {
                reservation_id,
                budget_id: id,
                amount: input.amount.money(),
                category: input.category.as_str().to_string(),
                expires_at,
                spent: b.spent_at(at),
                reserved: b.reserved_at(at),
                remaining: b.remaining_at(at),
                version: written.version(),
                position: written.position().to_string(),
            };
            reply(&body, written.version()).with_status(StatusCode::CREATED)
        },
    )
    .await
}

fn reservation_state(
    id: Uuid,
    reservation_id: Uuid,
    written: &Written<Budget>,
    at: DateTime<Utc>,
) -> Reply {
    let b = &written.loaded.aggregate;
    let (status, captured) = match (b.holds.get(&reservation_id), b.settled.get(&reservation_id)) {
        (Some(_), _) => ("held", None),
        (None, Some(s)) => match s.outcome {
            ReservationOutcome::Captured { amount } => ("captured", Some(amount.money())),
            ReservationOutcome::Released => ("released", None),
            ReservationOutcome::Expired => ("expired", None),
        },
        // The command succeeded, so the aggregate knows the hold; kept total all the same.
        (None, None) => ("settled", None),
    };
    let body = ReservationStateBody {
        reservation_id,
        budget_id: id,
        status: status.to_string(),
        captured,
        spent: b.spent_at(at),
        reserved: b.reserved_at(at),
        remaining: b.remaining_at(at),
        version: written.version(),
        position: written.position().to_string(),
    };
    reply(&body, written.version())
}

/// Spend up to the held amount; the rest of the hold is freed. Capturing a captured
/// reservation again changes nothing and answers 200 with how it was captured.
#[utoipa::path(post, path = "/v1/budgets/{id}/reservations/{reservation_id}/capture", tag = TAG,
    request_body = CaptureRequest,
    params(("id" = Uuid, Path), ("reservation_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 200, body = ReservationStateBody), (status = 404),
        (status = 409, description = "reservation-released or reservation-expired"),
        (status = 422, description = "Invalid amount, or more than is held")))]
async fn capture(
    State(state): State<App>,
    Path((id, reservation_id)): Path<(String, String)>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let reservation_id = parse_reservation_id(&reservation_id)?;
    let input: CaptureRequest = parse_body(&request)?;
    let at = Utc::now();
    command::execute::<Budget, _, _>(
        &state,
        &request,
        &id.to_string(),
        &(),
        |_| {
            Ok(BudgetCommand::Capture {
                reservation_id,
                amount: input.amount,
                at,
            })
        },
        |written| reservation_state(id, reservation_id, written, at),
    )
    .await
}

/// Free a hold. Releasing one that is already released, captured or expired changes
/// nothing and answers 200 with its status.
#[utoipa::path(post, path = "/v1/budgets/{id}/reservations/{reservation_id}/release", tag = TAG,
    params(("id" = Uuid, Path), ("reservation_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 200, body = ReservationStateBody), (status = 404)))]
async fn release(
    State(state): State<App>,
    Path((id, reservation_id)): Path<(String, String)>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let reservation_id = parse_reservation_id(&reservation_id)?;
    if request.body.iter().any(|b| !b.is_ascii_whitespace()) {
        let _: ReleaseRequest = parse_body(&request)?;
    } else {
        request.require_json()?;
    }
    let at = Utc::now();
    command::execute::<Budget, _, _>(
        &state,
        &request,
        &id.to_string(),
        &(),
        |_| Ok(BudgetCommand::Release { reservation_id, at }),
        |written| reservation_state(id, reservation_id, written, at),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_non_finite_numbers_are_quoted_and_nothing_else_changes() {
        let quoted =
            |s: &str| quote_non_finite(s.as_bytes()).map(|b| String::from_utf8(b).unwrap());
        assert_eq!(
            quoted(r#"{"amount": NaN}"#).as_deref(),
            Some(r#"{"amount": "NaN"}"#)
        );
        assert_eq!(
            quoted(r#"{"amount":-Infinity,"x":[Infinity]}"#).as_deref(),
            Some(r#"{"amount":"-Infinity","x":["Infinity"]}"#)
        );
        assert_eq!(quoted(r#"{"description": "NaN \" NaN"}"#), None);
        assert_eq!(quoted(r#"{"amount": 1.5, "ok": true}"#), None);
        assert_eq!(quoted(r#"{"amount": NaNa}"#), None);
        // Not in a value position: a malformed document, left for the 400.
        assert_eq!(quoted(r#"{NaN: 1}"#), None);
        assert_eq!(quoted(r#"{"a": 1, NaN : 2}"#), None);
        assert_eq!(quoted("NaN"), None);
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Amount {
        #[allow(dead_code)]
        amount: PositiveAmount,
    }

    #[test]
    fn amounts_in_bodies_are_read_from_their_text_through_the_request_parser() {
        // parse_json wraps the deserializer (serde_path_to_error); the number's own text
        // must still reach Money, or 0.1000000000000000001 would pass as 0.1.
        match parse_json::<Amount>(br#"{"amount": 0.1000000000000000001}"#) {
            Err(ApiError::Unprocessable { errors, .. }) => {
                assert_eq!(errors[0].field, "amount");
                assert!(
                    errors[0].message.contains("fractional digits"),
                    "{errors:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        let ok: Amount = parse_json(br#"{"amount": 0.3}"#).unwrap();
        assert_eq!(ok.amount.money().to_string(), "0.30");
        assert!(matches!(
            parse_json::<Amount>(br#"{"amount": 1e400}"#),
            Err(ApiError::Unprocessable { .. })
        ));
    }
}
