//! Read model `costs`: one row per spend and per captured reservation of every budget
//! (tracking-only ones included), and the cost report behind `GET /v1/analytics/costs`
//! and `leadledger analytics costs`.

use aggregates::budget::{Budget, BudgetEvent};
use chrono::NaiveDate;
use cqrs_es::Aggregate;
use sqlx::PgConnection;
use sqlx::types::Decimal;
use uuid::Uuid;

use crate::{FeedEvent, Projection, ProjectionError, decode, uuid_of};

pub struct CostsProjection;

#[async_trait::async_trait]
impl Projection for CostsProjection {
    fn name(&self) -> &'static str {
        "costs"
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &FeedEvent,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_type != Budget::TYPE {
            return Ok(());
        }
        let budget_id = uuid_of(event)?;
        let position = event.at.position;
        match decode::<BudgetEvent>(event)? {
            BudgetEvent::SpendRecorded {
                spend_id,
                amount,
                category,
                model,
                input_tokens,
                output_tokens,
                spent_at,
                ..
            } => {
                // The aggregate bounds token counts far below i64::MAX (MAX_TOKENS).
                let tokens = |n: Option<u64>| n.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
                sqlx::query!(
                    "INSERT INTO costs_view
                         (id, kind, budget_id, category, model, input_tokens, output_tokens, amount, spent_at, day, position)
                     VALUES ($1, 'spend', $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    spend_id,
                    budget_id,
                    category.as_str(),
                    model,
                    tokens(input_tokens),
                    tokens(output_tokens),
                    amount.money().as_decimal(),
                    spent_at,
                    spent_at.date_naive(),
                    position
                )
                .execute(&mut *conn)
                .await?;
            }
            BudgetEvent::ReservationCaptured {
                reservation_id,
                amount,
                category,
                captured_at,
                ..
            } => {
                sqlx::query!(
                    "INSERT INTO costs_view
                         (id, kind, budget_id, category, amount, spent_at, day, position)
                     VALUES ($1, 'capture', $2, $3, $4, $5, $6, $7)",
                    reservation_id,
                    budget_id,
                    category.as_str(),
                    amount.money().as_decimal(),
                    captured_at,
                    captured_at.date_naive(),
                    position
                )
                .execute(&mut *conn)
                .await?;
            }
            BudgetEvent::BudgetCreated { .. }
            | BudgetEvent::ReservationMade { .. }
            | BudgetEvent::ReservationReleased { .. }
            | BudgetEvent::ReservationExpired { .. }
            | BudgetEvent::BudgetLimitSet { .. }
            | BudgetEvent::BudgetThresholdCrossed { .. } => {}
        }
        Ok(())
    }
}

/// What a cost report adds up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupBy {
    #[default]
    Day,
    Model,
    Category,
    Budget,
}

impl GroupBy {
    pub const ALL: [GroupBy; 4] = [Self::Day, Self::Model, Self::Category, Self::Budget];

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Model => "model",
            Self::Category => "category",
            Self::Budget => "budget",
        }
    }
}

/// One line of a cost report. Only the column of the report's `GroupBy` is set (for
/// `Model`, `None` is the line of costs recorded without a model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostRow {
    pub day: Option<NaiveDate>,
    pub model: Option<String>,
    pub category: Option<String>,
    pub budget_id: Option<Uuid>,
    pub cost: Decimal,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// Spends and captures counted.
    pub requests: i64,
}

/// Costs recorded on the UTC days `from..=to`, added up by `group_by`: by day oldest
/// first, otherwise the largest cost first.
///
/// The grouping column is chosen by comparing a bound parameter, so the statement is one
/// fixed, compile-checked text whatever the caller asks for.
pub async fn report(
    conn: &mut PgConnection,
    from: NaiveDate,
    to: NaiveDate,
    group_by: GroupBy,
) -> Result<Vec<CostRow>, sqlx::Error> {
    // Token sums are numeric in PostgreSQL; they are capped at i64::MAX rather than fail
    // (reaching it would take millions of spends at the per-spend maximum).
    sqlx::query_as!(
        CostRow,
        r#"SELECT
               CASE WHEN $3 = 'day' THEN day END AS "day?: NaiveDate",
               CASE WHEN $3 = 'model' THEN model END AS "model?",
               CASE WHEN $3 = 'category' THEN category END AS "category?",
               CASE WHEN $3 = 'budget' THEN budget_id END AS "budget_id?: Uuid",
               sum(amount) AS "cost!",
               LEAST(coalesce(sum(input_tokens), 0), 9223372036854775807)::bigint AS "input_tokens!",
               LEAST(coalesce(sum(output_tokens), 0), 9223372036854775807)::bigint AS "output_tokens!",
               count(*) AS "requests!"
           FROM costs_view
           WHERE day >= $1 AND day <= $2
           GROUP BY 1, 2, 3, 4
           ORDER BY 1, 5 DESC, 2, 3, 4"#,
        from,
        to,
        group_by.as_str()
    )
    .fetch_all(&mut *conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_by_reads_and_writes_its_api_names_only() {
        for g in GroupBy::ALL {
            assert_eq!(GroupBy::parse(g.as_str()), Some(g));
        }
        assert_eq!(GroupBy::parse("Day"), None);
        assert_eq!(GroupBy::parse("day;DROP TABLE events"), None);
        assert_eq!(GroupBy::default(), GroupBy::Day);
    }
}
