//! Read model `budgets`: one row per budget (id, name, when it was made), behind
//! `GET /v1/budgets` and the names in the cost report grouped by budget. The rest of a
//! budget (limit, spent, reserved) is read from its stream, where it is always current.

use aggregates::budget::{Budget, BudgetEvent};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{FeedEvent, Projection, ProjectionError, events_of_types};

/// The read model's name: its checkpoint, its advisory lock, what `min_position` waits for.
pub const NAME: &str = "budgets";

pub struct BudgetsProjection;

#[async_trait::async_trait]
impl Projection for BudgetsProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &["budgets_view"]
    }

    /// Every budget created in the batch, in one insert.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        let mut ids: Vec<Uuid> = Vec::new();
        let mut names: Vec<String> = Vec::new();
        let mut created: Vec<DateTime<Utc>> = Vec::new();
        let mut positions: Vec<i64> = Vec::new();
        for (event, id, decoded) in
            events_of_types::<BudgetEvent>(events, Budget::TYPE, &["BudgetCreated"])?
        {
            if let BudgetEvent::BudgetCreated {
                name, created_at, ..
            } = decoded
            {
                ids.push(id);
                names.push(name.as_str().to_string());
                created.push(created_at);
                positions.push(event.at.position);
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query!(
            "INSERT INTO budgets_view (id, name, created_at, position)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::bigint[])",
            &ids,
            &names,
            &created,
            &positions
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// One budget of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRow {
    pub id: Uuid,
    pub name: String,
    pub position: i64,
}

/// Budgets in creation order, after the one at position `after`.
pub async fn page(
    conn: &mut PgConnection,
    after: Option<i64>,
    limit: i64,
) -> Result<Vec<BudgetRow>, sqlx::Error> {
    sqlx::query_as!(
        BudgetRow,
        "SELECT id, name, position FROM budgets_view
         WHERE $1::bigint IS NULL OR position > $1
         ORDER BY position
         LIMIT $2",
        after,
        limit
    )
    .fetch_all(conn)
    .await
}

/// The names of the budgets `ids` (those the model has).
pub async fn names(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, String>, sqlx::Error> {
    let rows = sqlx::query!("SELECT id, name FROM budgets_view WHERE id = ANY($1)", ids)
        .fetch_all(conn)
        .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.name)).collect())
}
