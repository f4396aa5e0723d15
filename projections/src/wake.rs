//! Waking projection runners when events are committed, without a `NOTIFY` inside the
//! writers' transactions: PostgreSQL takes a global lock on its notification queue when a
//! transaction that notified commits, so a `NOTIFY` in every write transaction would
//! serialise every commit behind it.
//!
//! Instead the writer calls [`Wakeup::committed`] after its commit. That wakes this
//! process's runners at once and asks the sender for one `NOTIFY`, sent in a transaction of
//! its own; commits that come while one is in flight share the next, so a process has at
//! most one notification in flight whatever its write rate. Other processes' listeners turn
//! it into their own wake-ups. Runners still poll as a fallback, so a notification lost
//! with a connection delays a read model, never stops it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// Channel notified after the commit of events.
pub const EVENTS_CHANNEL: &str = "leadledger_events";
/// Channel notified at the commit of a checkpoint move.
pub const CHECKPOINTS_CHANNEL: &str = "leadledger_checkpoints";

/// A process's wake-ups of its runners, and its notifications to the others. Cheap to
/// clone; every clone is the same.
#[derive(Clone)]
pub struct Wakeup {
    local: watch::Sender<u64>,
    pending: Arc<AtomicBool>,
    send: Arc<Notify>,
}

impl Default for Wakeup {
    fn default() -> Self {
        Self::new()
    }
}

impl Wakeup {
    pub fn new() -> Self {
        Self {
            local: watch::channel(0).0,
            pending: Arc::new(AtomicBool::new(false)),
            send: Arc::new(Notify::new()),
        }
    }

    /// Events were committed: wake this process's runners now, and the other processes'
    /// through the next notification.
    pub fn committed(&self) {
        self.wake_here();
        self.pending.store(true, Ordering::Release);
        self.send.notify_one();
    }

    /// What a runner waits on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.local.subscribe()
    }

    fn wake_here(&self) {
        self.local.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Sends the notification now if a commit asked for one and no sender runs (a command
    /// line process that wrote and is about to exit).
    pub async fn flush(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        if self.pending.swap(false, Ordering::AcqRel) {
            notify(pool).await?;
        }
        Ok(())
    }

    /// Listens for other processes' notifications and sends this one's, until `cancel`.
    pub async fn run(self, pool: PgPool, cancel: CancellationToken) {
        tokio::join!(
            listen(pool.clone(), self.clone(), cancel.clone()),
            self.send_loop(pool, cancel)
        );
    }

    async fn send_loop(self, pool: PgPool, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.send.notified() => {},
            }
            if !self.pending.swap(false, Ordering::AcqRel) {
                continue;
            }
            if let Err(e) = notify(&pool).await {
                // The others' runners poll meanwhile; try again shortly.
                tracing::warn!(error = %e, "notifying other processes of new events failed");
                self.pending.store(true, Ordering::Release);
                self.send.notify_one();
                sleep_or_cancel(Duration::from_millis(100), &cancel).await;
            }
        }
    }
}

async fn notify(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query!("SELECT pg_notify($1, '')", EVENTS_CHANNEL)
        .execute(pool)
        .await?;
    Ok(())
}

/// Turns notifications into wake-ups; reconnects when the connection drops, waking the
/// runners on each (re)connection for what was missed meanwhile.
async fn listen(pool: PgPool, wakeup: Wakeup, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "projection listener cannot connect; polling meanwhile");
                sleep_or_cancel(backoff, &cancel).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(e) = listener
            .listen_all([EVENTS_CHANNEL, CHECKPOINTS_CHANNEL])
            .await
        {
            tracing::warn!(error = %e, "LISTEN failed; polling meanwhile");
            sleep_or_cancel(backoff, &cancel).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        wakeup.wake_here();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                message = listener.recv() => match message {
                    Ok(_) => wakeup.wake_here(),
                    Err(e) => {
                        tracing::warn!(error = %e, "projection listener lost its connection");
                        break;
                    }
                },
            }
        }
    }
}

/// When to read again after a wake-up that found nothing: the committed events may still
/// be behind the feed's horizon (a transaction anywhere in the cluster that began earlier
/// has not ended), and no second notification will come for them. Soon at first, then
/// less and less often, up to the reader's own poll.
#[derive(Debug, Clone, Copy)]
pub struct Recheck {
    first: Duration,
    next: Option<Duration>,
}

impl Recheck {
    pub fn new(first: Duration) -> Self {
        Self { first, next: None }
    }

    /// How long to wait before reading again, at most `poll`.
    pub fn wait(&self, poll: Duration) -> Duration {
        self.next.map_or(poll, |r| r.min(poll))
    }

    /// A read found events: no more looking again until the next wake-up.
    pub fn found(&mut self) {
        self.next = None;
    }

    /// Woken: look again soon if this read finds nothing.
    pub fn woken(&mut self) {
        self.next = Some(self.first);
    }

    /// Waited without a wake-up: look again later, until the poll takes over.
    pub fn waited(&mut self, poll: Duration) {
        self.next = self.next.map(|r| r * 2).filter(|r| *r < poll);
    }
}

pub(crate) async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(d) => {},
        () = cancel.cancelled() => {},
    }
}
