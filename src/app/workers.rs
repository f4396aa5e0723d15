//! Background work of a server process: the projection runner, the purge of old
//! idempotency records, the expiry of budget holds and the delivery of subscriptions.
//! Every worker is safe with several processes on one database.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::app::command::purge_idempotency_records;

/// Idempotency records are kept at least this long (the contract: at least 24 hours).
pub const IDEMPOTENCY_RETENTION: Duration = Duration::from_secs(25 * 3600);

/// Runs `step` until `stop` is cancelled, waiting after each run for as long as it says
/// (a cancellation during the wait ends it at once).
async fn every(stop: CancellationToken, mut step: impl AsyncFnMut() -> Duration) {
    loop {
        let wait = step().await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {},
        }
    }
}

pub struct Workers {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

pub fn start(state: &App) -> Workers {
    let cancel = CancellationToken::new();
    // The read models and the reactors in one group: one feed read, one transaction and
    // one move of the checkpoints a batch for all of them.
    let runner = projections::runner::Runner::new(
        state.pool.clone(),
        projections::all(),
        projections::runner::RunnerConfig::default(),
    )
    .with_reactors(vec![
        std::sync::Arc::new(crate::app::webhooks::ParkingReactor::new(
            state.store.clone(),
        )),
        std::sync::Arc::new(crate::app::suppressions::SuppressionReactor::new(state)),
    ])
    .with_wakeup(state.wakeup.clone());
    let mut tasks = vec![
        // Other processes' notifications in, this one's out (coalesced, after commit).
        tokio::spawn(state.wakeup.clone().run(state.pool.clone(), cancel.clone())),
        tokio::spawn(runner.run(cancel.clone())),
        // Key revocations in any process clear this one's key cache.
        tokio::spawn(crate::app::keys::listen_for_revocations(
            state.pool.clone(),
            state.keys.clone(),
            cancel.clone(),
        )),
    ];
    // Parked webhook events are applied by their reactor when their enrollment appears in
    // the feed, and retried on a timer for what the feed cannot see.
    let (pool, store, stop) = (state.pool.clone(), state.store.clone(), cancel.clone());
    let wakeup = state.wakeup.clone();
    tasks.push(tokio::spawn(every(stop, async move || {
        match crate::app::webhooks::retry_due(&pool, &store, 200).await {
            Ok((0, _)) => {}
            Ok(_) => wakeup.committed(),
            Err(e) => tracing::warn!(error = %e, "retrying parked webhook events failed"),
        }
        Duration::from_secs(1)
    })));
    let pool = state.pool.clone();
    let stop = cancel.clone();
    tasks.push(tokio::spawn(every(stop, async move || {
        match purge_idempotency_records(&pool, IDEMPOTENCY_RETENTION).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "old idempotency records purged"),
            Err(e) => tracing::warn!(error = %e, "purging idempotency records failed"),
        }
        Duration::from_secs(3600)
    })));
    // The index of whom stored replies name is merged beside the commands, not in them.
    let pool = state.pool.clone();
    let stop = cancel.clone();
    tasks.push(tokio::spawn(every(stop, async move || {
        match crate::app::privacy::merge_reply_names(&pool).await {
            Ok(_) => crate::app::privacy::MERGE_REPLY_NAMES_EVERY,
            // A role that does not own the index may not merge it: the writes then merge
            // the list themselves at its limit. Said once a minute, not a second.
            Err(e) => {
                tracing::warn!(error = %e, "merging the stored replies' names failed");
                Duration::from_secs(60)
            }
        }
    })));
    // Spent Mailgun tokens are kept only while their signed timestamp could still pass.
    let pool = state.pool.clone();
    let stop = cancel.clone();
    tasks.push(tokio::spawn(every(stop, async move || {
        if let Err(e) = crate::app::webhooks::purge_once_tokens(&pool).await {
            tracing::warn!(error = %e, "purging spent webhook tokens failed");
        }
        Duration::from_secs(60)
    })));
    // Contact events an earlier release stored in the clear are sealed while serving.
    if projections::pii::SEALING {
        let pool = state.pool.clone();
        let stop = cancel.clone();
        tasks.push(tokio::spawn(async move {
            let quiet = |_| {};
            tokio::select! {
                () = stop.cancelled() => {},
                done = crate::app::privacy::encrypt_plaintext(&pool, 500, &quiet) => match done {
                    Ok(done) if done.events + done.redacted > 0 => tracing::info!(
                        events = done.events,
                        redacted = done.redacted,
                        "contact events stored in the clear were encrypted"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "encrypting contact events failed"),
                },
            }
        }));
    } else {
        tracing::warn!(
            "built with the `unsealed` feature: contact data is written in the clear \
             (for measuring what sealing costs, never for real data)"
        );
    }
    // Expired budget holds are released by a command even if no one touches the budget.
    let budgets = state.clone();
    tasks.push(tokio::spawn(every(cancel.clone(), async move || {
        match crate::app::budgets::expire_due_holds(&budgets, chrono::Utc::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "budget reservations expired"),
            Err(e) => tracing::warn!(error = ?e, "expiring budget reservations failed"),
        }
        crate::app::budgets::EXPIRY_SWEEP_EVERY
    })));
    // Subscriptions: each delivered by the one process holding its lock.
    tasks.push(crate::app::delivery::spawn(state.clone(), cancel.clone()));
    Workers { cancel, tasks }
}

impl Workers {
    /// Asks every worker to stop without waiting (for drop paths that cannot await).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Whether the workers were asked to stop.
    pub fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Asks every worker to stop and waits until each has finished its current batch.
    pub async fn stop(self) {
        self.cancel.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
