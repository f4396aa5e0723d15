//! Read model `budget_holds`: reservations still holding money, so that the expiry worker
//! finds the budgets with a hold past its time without loading every budget.

use aggregates::budget::{Budget, BudgetEvent};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{FeedEvent, Projection, ProjectionError, events_of_types};

/// The read model's name: its checkpoint, its advisory lock, what `min_position` waits for.
pub const NAME: &str = "budget_holds";

/// The budget events that make or settle a hold; the others (spends above all) are not
/// decoded.
const HOLD_EVENTS: &[&str] = &[
    "ReservationMade",
    "ReservationCaptured",
    "ReservationReleased",
    "ReservationExpired",
];

pub struct BudgetHoldsProjection;

#[async_trait::async_trait]
impl Projection for BudgetHoldsProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &["budget_holds_view"]
    }

    /// Holds are few next to spends, so each event is its own statement.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        for (event, budget_id, decoded) in
            events_of_types::<BudgetEvent>(events, Budget::TYPE, HOLD_EVENTS)?
        {
            apply_one(conn, event, budget_id, decoded).await?;
        }
        Ok(())
    }
}

async fn apply_one(
    conn: &mut PgConnection,
    event: &FeedEvent,
    budget_id: Uuid,
    decoded: BudgetEvent,
) -> Result<(), ProjectionError> {
    let settled = match decoded {
        BudgetEvent::ReservationMade {
            reservation_id,
            amount,
            expires_at,
            ..
        } => {
            sqlx::query!(
                "INSERT INTO budget_holds_view
                         (reservation_id, budget_id, amount, expires_at, position)
                     VALUES ($1, $2, $3, $4, $5)",
                reservation_id,
                budget_id,
                amount.money().as_decimal(),
                expires_at,
                event.at.position
            )
            .execute(&mut *conn)
            .await?;
            return Ok(());
        }
        BudgetEvent::ReservationCaptured { reservation_id, .. }
        | BudgetEvent::ReservationReleased { reservation_id, .. }
        | BudgetEvent::ReservationExpired { reservation_id, .. } => reservation_id,
        BudgetEvent::BudgetCreated { .. }
        | BudgetEvent::SpendRecorded { .. }
        | BudgetEvent::BudgetLimitSet { .. }
        | BudgetEvent::BudgetThresholdCrossed { .. } => return Ok(()),
    };
    let deleted = sqlx::query!(
        "DELETE FROM budget_holds_view WHERE reservation_id = $1 AND budget_id = $2",
        settled,
        budget_id
    )
    .execute(&mut *conn)
    .await?;
    // Every hold ends exactly once, after it was made: anything else means the read
    // model and the streams disagree.
    if deleted.rows_affected() == 1 {
        Ok(())
    } else {
        Err(ProjectionError::Inconsistent {
            position: event.at,
            message: format!(
                "{} for a reservation the read model does not hold",
                event.event_type
            ),
        })
    }
}

/// Budgets with at least one hold due at `now`, those with the oldest due hold first.
pub async fn budgets_with_due_holds(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT budget_id FROM budget_holds_view
         WHERE expires_at <= $1
         GROUP BY budget_id
         ORDER BY min(expires_at)
         LIMIT $2",
        now,
        limit
    )
    .fetch_all(&mut *conn)
    .await
}
