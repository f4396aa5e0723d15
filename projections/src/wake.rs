//! Waking projection runners when events are committed, without a `NOTIFY` inside the
//! writers' transactions: PostgreSQL takes a global lock on its notification queue when a
//! transaction that notified commits, so a `NOTIFY` in every write transaction would
//! serialise every commit behind it.
//!
//! Instead the writer calls [`Wakeup::committed`] after its commit. That wakes this
//! process's runners at once and asks the sender for one `NOTIFY`, sent in a transaction of
//! its own; commits that come while one is in flight, or within [`NOTIFY_INTERVAL`] of the
//! last, share the next, so a process sends at most one notification per interval whatever
//! its write rate (each one is a commit, and a wake-up of every listening connection and
//! process, this one's included). A commit after a quiet spell is notified at once. Other processes' listeners turn
//! it into their own wake-ups; a process ignores its own (its payload is the process's
//! token), since its runners were woken at the commit already and a second wake-up per
//! commit would double every runner's feed reads. Runners still poll as a fallback, so a
//! notification lost with a connection delays a read model, never stops it.
//!
//! A wake-up can find the new events still behind the feed's horizon: a transaction that
//! took its id before theirs (most often another projection's batch) has not ended. No
//! event commits when it ends, so a second signal says so: [`Wakeup::horizon_moved`], sent
//! when a batch of this process commits and when another process's checkpoint moves. Only
//! a runner waiting for the horizon (its last wake-up found nothing) reads again on it, so
//! the many batch commits do not multiply the reads of runners that are up to date.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// Channel notified after the commit of events.
pub const EVENTS_CHANNEL: &str = "leadledger_events";
/// Channel notified at the commit of a checkpoint move: the horizon may have moved.
pub const CHECKPOINTS_CHANNEL: &str = "leadledger_checkpoints";

/// The least time between two notifications of one process: what busy writing adds at
/// most to the other processes' read-model lag (their runners batch busy traffic over
/// longer than this anyway).
pub const NOTIFY_INTERVAL: Duration = Duration::from_millis(5);

/// A process's wake-ups of its runners, and its notifications to the others. Cheap to
/// clone; every clone is the same.
#[derive(Clone)]
pub struct Wakeup {
    local: watch::Sender<u64>,
    horizon: watch::Sender<u64>,
    pending: Arc<AtomicBool>,
    send: Arc<Notify>,
    /// What this process's notifications carry, so that it can tell them from the others'.
    token: Arc<str>,
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
            horizon: watch::channel(0).0,
            pending: Arc::new(AtomicBool::new(false)),
            send: Arc::new(Notify::new()),
            token: format!("{:016x}", rand::random::<u64>()).into(),
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

    /// A transaction that may have held the feed's horizon ended (a projection's batch
    /// committed): runners waiting for it look again.
    pub fn horizon_moved(&self) {
        self.horizon.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// What a runner waiting for the horizon waits on.
    pub fn subscribe_horizon(&self) -> watch::Receiver<u64> {
        self.horizon.subscribe()
    }

    fn wake_here(&self) {
        self.local.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Sends the notification now if a commit asked for one and no sender runs (a command
    /// line process that wrote and is about to exit).
    pub async fn flush(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        if self.pending.swap(false, Ordering::AcqRel) {
            notify(pool, &self.token).await?;
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
            match notify(&pool, &self.token).await {
                // Commits meanwhile wait for the next, after the interval.
                Ok(()) => sleep_or_cancel(NOTIFY_INTERVAL, &cancel).await,
                Err(e) => {
                    // The others' runners poll meanwhile; try again shortly.
                    tracing::warn!(error = %e, "notifying other processes of new events failed");
                    self.pending.store(true, Ordering::Release);
                    self.send.notify_one();
                    sleep_or_cancel(Duration::from_millis(100), &cancel).await;
                }
            }
        }
    }
}

async fn notify(pool: &PgPool, token: &str) -> Result<(), sqlx::Error> {
    sqlx::query!("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, token)
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
                    // Another process's batch committed: only the horizon may have moved.
                    Ok(n) if n.channel() == CHECKPOINTS_CHANNEL => wakeup.horizon_moved(),
                    Ok(n) if n.payload() == &*wakeup.token => {}
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

    /// Whether the last wake-up found nothing yet (the events may be behind the horizon).
    pub fn pending(&self) -> bool {
        self.next.is_some()
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

/// Waits `d`, or less if `cancel` is cancelled meanwhile.
pub async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(d) => {},
        () = cancel.cancelled() => {},
    }
}
