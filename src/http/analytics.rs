//! Analytics routes over the read models: `GET /v1/analytics/costs` (read model `costs`).
//! The report itself, [`cost_report`], is shared with `leadledger analytics costs`, so the
//! command line prints exactly the rows the API answers with.

use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{NaiveDate, Utc};
use projections::costs::{self, CostRow, GroupBy};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::error::ApiError;
use crate::http::AppState;
use crate::http::extract::{ApiQuery, MinPosition};
use crate::store::Position;

const TAG: &str = "analytics";
const COSTS_READ_MODEL: &str = "costs";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(cost_analytics))
}

/// What a cost report covers: the last `days` UTC days (today included), added up by
/// `group_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostsParams {
    pub days: u16,
    pub group_by: GroupBy,
}

impl CostsParams {
    pub const DEFAULT_DAYS: u16 = 30;
    pub const MAX_DAYS: u16 = 365;

    /// The query parameters as given (absent: the defaults).
    pub fn parse(days: Option<&str>, group_by: Option<&str>) -> Result<Self, ApiError> {
        Ok(Self {
            days: days
                .map(parse_days)
                .transpose()
                .map_err(ApiError::BadRequest)?
                .unwrap_or(Self::DEFAULT_DAYS),
            group_by: group_by
                .map(parse_group_by)
                .transpose()
                .map_err(ApiError::BadRequest)?
                .unwrap_or_default(),
        })
    }
}

/// `days`: digits only, 1..=365. Anything else (signs, spaces, `30;…`) is refused rather
/// than read leniently.
pub fn parse_days(text: &str) -> Result<u16, String> {
    let refuse = || {
        format!(
            "days must be a whole number from 1 to {}",
            CostsParams::MAX_DAYS
        )
    };
    if text.is_empty() || text.len() > 3 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refuse());
    }
    match text.parse::<u16>() {
        Ok(n) if (1..=CostsParams::MAX_DAYS).contains(&n) => Ok(n),
        _ => Err(refuse()),
    }
}

/// `group_by`: day | model | category | budget.
pub fn parse_group_by(text: &str) -> Result<GroupBy, String> {
    GroupBy::parse(text)
        .ok_or_else(|| "group_by must be one of day, model, category, budget".to_string())
}

/// One line of a cost report. Only the grouping field is present (`model` may be null:
/// the costs recorded without a model).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct CostItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<NaiveDate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub model: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_id: Option<Uuid>,
    /// Exact decimal string.
    pub cost: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// Spends and captured reservations counted.
    pub requests: i64,
}

impl CostItem {
    fn new(row: CostRow, group_by: GroupBy) -> Self {
        Self {
            day: row.day,
            model: (group_by == GroupBy::Model).then_some(row.model),
            category: row.category,
            budget_id: row.budget_id,
            // Written like every other amount (at least two decimals); a sum of amounts
            // that each fit Money fits it too, and the fallback only guards that.
            cost: aggregates::money::Money::from_decimal(row.cost)
                .map(|m| m.to_string())
                .unwrap_or_else(|_| row.cost.normalize().to_string()),
            input_tokens: row.input_tokens,
            output_tokens: row.output_tokens,
            requests: row.requests,
        }
    }

    /// The value of the grouping column, as text (for tables and CSV).
    pub fn key(&self) -> String {
        if let Some(day) = self.day {
            return day.to_string();
        }
        if let Some(model) = &self.model {
            return model.clone().unwrap_or_default();
        }
        if let Some(category) = &self.category {
            return category.clone();
        }
        self.budget_id.map(|b| b.to_string()).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CostReport {
    /// First UTC day covered.
    pub from: NaiveDate,
    /// Last UTC day covered (today).
    pub to: NaiveDate,
    /// day | model | category | budget
    pub group_by: String,
    pub items: Vec<CostItem>,
}

/// The cost report for `params`, with `today` as the last day.
pub async fn cost_report(
    conn: &mut PgConnection,
    params: CostsParams,
    today: NaiveDate,
) -> Result<CostReport, sqlx::Error> {
    let from = today - chrono::Days::new(u64::from(params.days) - 1);
    let rows = costs::report(conn, from, today, params.group_by).await?;
    Ok(CostReport {
        from,
        to: today,
        group_by: params.group_by.as_str().to_string(),
        items: rows
            .into_iter()
            .map(|row| CostItem::new(row, params.group_by))
            .collect(),
    })
}

impl CostReport {
    /// The name of the grouping column in tables and CSV.
    fn key_header(&self) -> &str {
        if self.group_by == "budget" {
            "budget_id"
        } else {
            &self.group_by
        }
    }

    /// Aligned columns for people; a model-less line shows as `(none)`.
    pub fn to_table(&self) -> String {
        let keys: Vec<String> = self
            .items
            .iter()
            .map(|i| match &i.model {
                Some(None) => "(none)".to_string(),
                _ => i.key(),
            })
            .collect();
        let width = keys
            .iter()
            .map(|k| k.chars().count())
            .chain([self.key_header().len()])
            .max()
            .unwrap_or(0);
        let cost_width = self
            .items
            .iter()
            .map(|i| i.cost.len())
            .chain([4])
            .max()
            .unwrap_or(4);
        let mut out = format!(
            "costs from {} to {} (UTC) by {}\n{:<width$}  {:>cost_width$}  {:>13}  {:>13}  {:>8}\n",
            self.from,
            self.to,
            self.group_by,
            self.key_header(),
            "cost",
            "input_tokens",
            "output_tokens",
            "requests",
        );
        for (item, key) in self.items.iter().zip(&keys) {
            out.push_str(&format!(
                "{key:<width$}  {:>cost_width$}  {:>13}  {:>13}  {:>8}\n",
                item.cost, item.input_tokens, item.output_tokens, item.requests
            ));
        }
        if self.items.is_empty() {
            out.push_str("(no costs recorded in these days)\n");
        }
        out
    }

    /// RFC 4180 CSV with a header row; a model-less line has an empty model.
    pub fn to_csv(&self) -> String {
        let mut out = format!(
            "{},cost,input_tokens,output_tokens,requests\r\n",
            self.key_header()
        );
        for item in &self.items {
            out.push_str(&format!(
                "{},{},{},{},{}\r\n",
                csv_field(&item.key()),
                item.cost,
                item.input_tokens,
                item.output_tokens,
                item.requests
            ));
        }
        out
    }
}

/// Quotes a field that holds a comma, a quote or a line break (model names are free text).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CostsQuery {
    /// UTC days back, today included: 1..=365, default 30.
    days: Option<String>,
    /// day | model | category | budget (default day)
    group_by: Option<String>,
    /// Wait until the report includes this write.
    min_position: Option<String>,
}

/// Costs (spends and captured reservations of every budget, tracking-only ones
/// included), by day (oldest first), model, category or budget (largest cost first).
#[utoipa::path(get, path = "/v1/analytics/costs", tag = TAG, params(CostsQuery),
    responses((status = 200, body = CostReport), (status = 400, description = "days or group_by out of range"),
        (status = 503, description = "min_position not reached in 5 s")))]
async fn cost_analytics(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<CostsQuery>,
    min_position: MinPosition,
) -> Result<Response, ApiError> {
    let params = CostsParams::parse(query.days.as_deref(), query.group_by.as_deref())?;
    let _ = &query.min_position;
    min_position.wait(&state, &[COSTS_READ_MODEL]).await?;
    let mut conn = state.pool.acquire().await?;
    let report = cost_report(&mut conn, params, Utc::now().date_naive()).await?;
    Ok(axum::Json(report).into_response())
}

/// Brings the `costs` read model up to the last event committed, for a reader outside the
/// server (the command line). It runs the projection the way a server process does, under
/// the same advisory lock: if a server is running, that server applies the events and this
/// only waits. Returns whether the read model got there within `timeout`.
pub async fn catch_up_costs(pool: &PgPool, timeout: Duration) -> Result<bool, sqlx::Error> {
    let head = sqlx::query!(
        r#"SELECT transaction_id::text AS "transaction_id!", position
           FROM events ORDER BY transaction_id DESC, position DESC LIMIT 1"#
    )
    .fetch_optional(pool)
    .await?;
    let Some(head) = head else {
        return Ok(true);
    };
    let head = Position {
        transaction_id: projections::feed::parse_xid(&head.transaction_id)?,
        position: head.position,
    };
    let cancel = CancellationToken::new();
    let runner = projections::runner::Runner::new(
        pool.clone(),
        projections::all()
            .into_iter()
            .filter(|p| p.name() == COSTS_READ_MODEL)
            .collect(),
        projections::runner::RunnerConfig::default(),
    );
    let task = tokio::spawn(runner.run(cancel.clone()));
    let reached = projections::runner::wait_for(pool, head, &[COSTS_READ_MODEL], timeout).await;
    cancel.cancel();
    let _ = task.await;
    reached
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_digits_from_1_to_365_and_nothing_else() {
        for ok in ["1", "30", "365", "007"] {
            assert!(parse_days(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "0",
            "366",
            "abc",
            "+30",
            "-1",
            " 30",
            "30 ",
            "30;DROP TABLE events",
            "1e2",
            "3.0",
            "99999999999999999999",
        ] {
            assert!(parse_days(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn absent_parameters_mean_30_days_by_day() {
        let params = CostsParams::parse(None, None).unwrap();
        assert_eq!(params.days, 30);
        assert_eq!(params.group_by, GroupBy::Day);
        assert!(matches!(
            CostsParams::parse(None, Some("week")),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn an_item_shows_its_grouping_field_only_and_money_as_a_string() {
        let row = CostRow {
            day: None,
            model: None,
            category: None,
            budget_id: None,
            cost: sqlx::types::Decimal::new(9_900_000, 6),
            input_tokens: 10,
            output_tokens: 20,
            requests: 3,
        };
        let item = serde_json::to_value(CostItem::new(row, GroupBy::Model)).unwrap();
        assert_eq!(
            item,
            serde_json::json!({"model": null, "cost": "9.90", "input_tokens": 10, "output_tokens": 20, "requests": 3})
        );
    }
}
