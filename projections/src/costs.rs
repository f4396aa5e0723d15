//! Read model `costs`: one row per spend and per captured reservation of every budget
//! (tracking-only ones included), and the cost report behind `GET /v1/analytics/costs`
//! and `leadledger analytics costs`.

use aggregates::budget::{Budget, BudgetEvent};
use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use cqrs_es::Aggregate;
use sqlx::PgConnection;
use sqlx::types::Decimal;
use uuid::Uuid;

use crate::{FeedEvent, Mode, Projection, ProjectionError, events_of, utc_day};

/// The read model's name: its checkpoint, its advisory lock, what `min_position` waits for.
pub const NAME: &str = "costs";

pub struct CostsProjection;

/// One row of `costs_view`.
struct Cost {
    id: Uuid,
    kind: &'static str,
    budget_id: Uuid,
    category: String,
    model: Option<String>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    amount: Decimal,
    spent_at: DateTime<Utc>,
    position: i64,
}

#[async_trait::async_trait]
impl Projection for CostsProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &["costs_view", "cost_days_view", "cost_groups_view"]
    }

    fn totals(&self) -> &'static [&'static str] {
        &["cost_days_view", "cost_groups_view"]
    }

    /// Every cost of the batch in one insert, and each day's sums moved once.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        apply(conn, events, Mode::Live).await
    }

    async fn apply_rows(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        apply(conn, events, Mode::Fill).await
    }

    /// Each day's and each (day, budget, category, model)'s sums of the costs.
    async fn fill_totals(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query!("DELETE FROM cost_groups_view")
            .execute(&mut *conn)
            .await?;
        sqlx::query!(
            "INSERT INTO cost_groups_view
                 (day, budget_id, category, model_key, model, cost, input_tokens,
                  output_tokens, requests)
             SELECT day, budget_id, category,
                    CASE WHEN model IS NULL THEN '-' ELSE 'm:' || model END, model,
                    sum(amount), sum(coalesce(input_tokens, 0)),
                    sum(coalesce(output_tokens, 0)), count(*)
             FROM costs_view GROUP BY day, budget_id, category, model"
        )
        .execute(&mut *conn)
        .await?;
        sqlx::query!("DELETE FROM cost_days_view")
            .execute(&mut *conn)
            .await?;
        sqlx::query!(
            "INSERT INTO cost_days_view (day, cost, requests)
             SELECT day, sum(amount), count(*) FROM costs_view GROUP BY day"
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

async fn apply(
    conn: &mut PgConnection,
    events: &[FeedEvent],
    mode: Mode,
) -> Result<(), ProjectionError> {
    // The aggregate bounds token counts far below i64::MAX (MAX_TOKENS).
    let tokens = |n: Option<u64>| n.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    let mut costs = Vec::new();
    for (event, budget_id, decoded) in events_of::<BudgetEvent>(events, Budget::TYPE)? {
        let position = event.at.position;
        match decoded {
            BudgetEvent::SpendRecorded {
                spend_id,
                amount,
                category,
                model,
                input_tokens,
                output_tokens,
                spent_at,
                ..
            } => costs.push(Cost {
                id: spend_id,
                kind: "spend",
                budget_id,
                category: category.as_str().to_string(),
                model,
                input_tokens: tokens(input_tokens),
                output_tokens: tokens(output_tokens),
                amount: amount.money().as_decimal(),
                spent_at,
                position,
            }),
            BudgetEvent::ReservationCaptured {
                reservation_id,
                amount,
                category,
                captured_at,
                ..
            } => costs.push(Cost {
                id: reservation_id,
                kind: "capture",
                budget_id,
                category: category.as_str().to_string(),
                model: None,
                input_tokens: None,
                output_tokens: None,
                amount: amount.money().as_decimal(),
                spent_at: captured_at,
                position,
            }),
            BudgetEvent::BudgetCreated { .. }
            | BudgetEvent::ReservationMade { .. }
            | BudgetEvent::ReservationReleased { .. }
            | BudgetEvent::ReservationExpired { .. }
            | BudgetEvent::BudgetLimitSet { .. }
            | BudgetEvent::BudgetThresholdCrossed { .. } => {}
        }
    }
    if costs.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "INSERT INTO costs_view
             (id, kind, budget_id, category, model, input_tokens, output_tokens, amount,
              spent_at, day, position)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[],
                              $6::int8[], $7::int8[], $8::numeric[], $9::timestamptz[],
                              $10::date[], $11::int8[])",
        &costs.iter().map(|c| c.id).collect::<Vec<_>>(),
        &costs.iter().map(|c| c.kind.to_string()).collect::<Vec<_>>(),
        &costs.iter().map(|c| c.budget_id).collect::<Vec<_>>(),
        &costs.iter().map(|c| c.category.clone()).collect::<Vec<_>>(),
        &costs.iter().map(|c| c.model.clone()).collect::<Vec<_>>() as _,
        &costs.iter().map(|c| c.input_tokens).collect::<Vec<_>>() as _,
        &costs.iter().map(|c| c.output_tokens).collect::<Vec<_>>() as _,
        &costs.iter().map(|c| c.amount).collect::<Vec<_>>(),
        &costs.iter().map(|c| c.spent_at).collect::<Vec<_>>(),
        &costs
            .iter()
            .map(|c| utc_day(c.spent_at))
            .collect::<Vec<_>>(),
        &costs.iter().map(|c| c.position).collect::<Vec<_>>(),
    )
    .execute(&mut *conn)
    .await?;
    if mode == Mode::Fill {
        return Ok(());
    }
    // Each (day, budget, category, model)'s sums, moved once per batch.
    type GroupKey = (NaiveDate, Uuid, String, Option<String>);
    let mut groups: BTreeMap<GroupKey, (Decimal, Decimal, Decimal, i64)> = BTreeMap::new();
    for c in &costs {
        let key = (
            utc_day(c.spent_at),
            c.budget_id,
            c.category.clone(),
            c.model.clone(),
        );
        let group = groups.entry(key).or_default();
        group.0 += c.amount;
        group.1 += Decimal::from(c.input_tokens.unwrap_or(0));
        group.2 += Decimal::from(c.output_tokens.unwrap_or(0));
        group.3 += 1;
    }
    sqlx::query!(
        "INSERT INTO cost_groups_view
             (day, budget_id, category, model_key, model, cost, input_tokens,
              output_tokens, requests)
         SELECT u.day, u.budget_id, u.category,
                CASE WHEN u.model IS NULL THEN '-' ELSE 'm:' || u.model END, u.model,
                u.cost, u.input_tokens, u.output_tokens, u.requests
         FROM UNNEST($1::date[], $2::uuid[], $3::text[], $4::text[], $5::numeric[],
                     $6::numeric[], $7::numeric[], $8::int8[])
              AS u(day, budget_id, category, model, cost, input_tokens, output_tokens,
                   requests)
         ON CONFLICT (day, budget_id, category, model_key) DO UPDATE SET
             cost = cost_groups_view.cost + EXCLUDED.cost,
             input_tokens = cost_groups_view.input_tokens + EXCLUDED.input_tokens,
             output_tokens = cost_groups_view.output_tokens + EXCLUDED.output_tokens,
             requests = cost_groups_view.requests + EXCLUDED.requests",
        &groups.keys().map(|k| k.0).collect::<Vec<_>>(),
        &groups.keys().map(|k| k.1).collect::<Vec<_>>(),
        &groups.keys().map(|k| k.2.clone()).collect::<Vec<_>>(),
        &groups.keys().map(|k| k.3.clone()).collect::<Vec<_>>() as _,
        &groups.values().map(|g| g.0).collect::<Vec<_>>(),
        &groups.values().map(|g| g.1).collect::<Vec<_>>(),
        &groups.values().map(|g| g.2).collect::<Vec<_>>(),
        &groups.values().map(|g| g.3).collect::<Vec<_>>(),
    )
    .execute(&mut *conn)
    .await?;
    let mut days: BTreeMap<NaiveDate, (Decimal, i64)> = BTreeMap::new();
    for c in &costs {
        let day = days.entry(utc_day(c.spent_at)).or_default();
        day.0 += c.amount;
        day.1 += 1;
    }
    sqlx::query!(
        "INSERT INTO cost_days_view (day, cost, requests)
         SELECT * FROM UNNEST($1::date[], $2::numeric[], $3::int8[])
         ON CONFLICT (day) DO UPDATE SET cost = cost_days_view.cost + EXCLUDED.cost,
             requests = cost_days_view.requests + EXCLUDED.requests",
        &days.keys().copied().collect::<Vec<_>>(),
        &days.values().map(|d| d.0).collect::<Vec<_>>(),
        &days.values().map(|d| d.1).collect::<Vec<_>>(),
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The cost recorded on the UTC days `from..=to`, and how many spends and captures.
pub async fn total(
    conn: &mut PgConnection,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<(Decimal, i64), sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT coalesce(sum(cost), 0) AS "cost!",
                  coalesce(sum(requests), 0)::bigint AS "requests!"
           FROM cost_days_view WHERE day >= $1 AND day <= $2"#,
        from,
        to
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok((row.cost, row.requests))
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
/// fixed, compile-checked text whatever the caller asks for. It adds up the kept sums of
/// `cost_groups_view`, a few per day, never the spends themselves.
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
               sum(cost) AS "cost!",
               LEAST(coalesce(sum(input_tokens), 0), 9223372036854775807)::bigint
                   AS "input_tokens!",
               LEAST(coalesce(sum(output_tokens), 0), 9223372036854775807)::bigint
                   AS "output_tokens!",
               sum(requests)::bigint AS "requests!"
           FROM cost_groups_view
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
