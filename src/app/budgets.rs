//! Budgets' background work: the sweep that expires reservations past their time, in
//! every process at once without two of them expiring a hold twice.

use std::time::Duration;

use aggregates::budget::{Budget, BudgetCommand};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use uuid::Uuid;

use crate::app::App;
use crate::app::command::{Abort, Retried, decide_and_append};
use crate::app::error::AppError;
use crate::store::{Loaded, Metadata};

/// The read model that lists budgets.
pub const BUDGETS_READ_MODEL: &str = projections::budgets::NAME;

/// How often the expiry sweep (one of the server's workers) looks for holds past their time.
pub const EXPIRY_SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Budgets handled by one sweep at most; the next sweep takes the rest.
const EXPIRY_BATCH: i64 = 500;
/// The advisory lock (with `projections::runner::LOCK_CLASS`) that lets one process sweep
/// at a time.
const EXPIRY_LOCK: &str = "worker:budget-expiry";

/// One sweep: sends `ExpireReservations` to every budget the `budget_holds` read model
/// shows with a hold due at `now`. Returns how many holds it expired.
///
/// Safe with several processes: a sweep runs only while it holds a transaction-scoped
/// advisory lock (released however the sweep ends, even if its task is dropped), so one
/// process sweeps at a time; and each expiry is an ordinary command under optimistic
/// concurrency, so a hold can only expire once even if two sweeps met.
pub async fn expire_due_holds(state: &App, now: DateTime<Utc>) -> Result<usize, AppError> {
    // This transaction only holds the lock: it writes nothing, so it takes no
    // transaction id and does not hold back the event feed.
    let mut guard = state.pool.begin().await?;
    let locked = sqlx::query_scalar!(
        r#"SELECT pg_try_advisory_xact_lock($1, hashtext($2)) AS "locked!""#,
        projections::runner::LOCK_CLASS,
        EXPIRY_LOCK
    )
    .fetch_one(&mut *guard)
    .await?;
    if !locked {
        return Ok(0);
    }
    let due =
        projections::budget_holds::budgets_with_due_holds(&mut guard, now, EXPIRY_BATCH).await?;
    let mut expired = 0;
    for budget_id in due {
        match expire_budget(state, budget_id, now).await {
            Ok(n) => expired += n,
            // One budget's failure must not keep the others' holds: the next sweep tries
            // it again.
            Err(e) => tracing::warn!(%budget_id, error = ?e, "expiring a budget's holds failed"),
        }
    }
    guard.rollback().await?;
    Ok(expired)
}

/// `ExpireReservations` on one budget, retried on conflicts like any command.
async fn expire_budget(state: &App, budget_id: Uuid, at: DateTime<Utc>) -> Result<usize, AppError> {
    let id = budget_id.to_string();
    let metadata = Metadata {
        actor: Some("worker:budget-expiry".into()),
        ..Metadata::default()
    };
    let (id, metadata) = (&id, &metadata);
    let outcome = state
        .retrying(Budget::TYPE, |mut tx| async move {
            let outcome = async {
                let mut loaded: Loaded<Budget> = state.store.load(&mut tx, id).await?;
                let command = BudgetCommand::ExpireReservations { at };
                let appended =
                    decide_and_append(state, &mut tx, &mut loaded, command, &(), metadata).await?;
                Ok::<_, Abort>(appended.events.len())
            }
            .await;
            (tx, outcome)
        })
        .await?;
    match outcome {
        Retried::Done(expired) => Ok(expired),
        // The budget kept changing: its next command or the next sweep expires the holds.
        Retried::Exhausted => Ok(0),
    }
}
