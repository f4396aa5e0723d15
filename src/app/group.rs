//! Group commit: commands for one aggregate that arrive together in one process share one
//! write. The first to come leads a group: it opens it and loads the aggregate once; the
//! others join while it is open (from its start until the turns are done, so at least for
//! the load's round trip: the commands that came while the group before was writing) and
//! each takes its turn deciding its command on the state the earlier
//! ones left, adding its events and its own answer to the group's write; then the leader
//! writes them all in one statement (which commits on its own, or with the transaction an
//! aggregate that needs one holds). On a hot aggregate (one budget taking many spends) this
//! replaces a storm of whole-transaction retries against itself with one commit for many
//! commands; for a command alone it is the whole write.
//!
//! Each member keeps its own idempotency record and answer, and a refusal (of the domain,
//! or of `If-Match`) is that member's alone. A member that fails after it wrote, or a
//! conflict with another process (the optimistic check still decides across processes),
//! rolls the whole group back, and every member tries again in a new group. A member whose
//! request is dropped mid-turn poisons the group for the same reason: its events must not
//! commit without its idempotency record.
//!
//! Across aggregates of one type, the groups' loads and writes are batched ([`Batch`]):
//! those that come while another of that type is under way are done together by the
//! next, in one statement, and each group gets its own outcome.
//!
//! While an aggregate type's commands lately found their aggregates new ([`Newness`]), a
//! leader may guess that its aggregate is new too and not load it: the group decides on
//! the empty state, and its write (which appends from sequence 1, makes the data key and
//! records each answer) holds only if nobody wrote the stream or answered a key before
//! it. A guess that does not hold rolls the group back, and the leader loads and leads
//! again; every decision taken on the guess is given only once the write committed.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock};

use cqrs_es::Aggregate;
use sqlx::PgConnection;
use tokio::sync::{Mutex, Notify, oneshot, watch};

use crate::lock;
use crate::store::{Loaded, Metadata, Position, RecordRow, StoreError, StoredAnswer};

/// The connection a group works on: a plain one, whose write commits by itself, or the
/// transaction of an aggregate whose turns also write (or lock) beside the events.
pub(crate) enum Conn {
    Plain(sqlx::pool::PoolConnection<sqlx::Postgres>),
    Tx(sqlx::Transaction<'static, sqlx::Postgres>),
}

impl Deref for Conn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        match self {
            Self::Plain(c) => c,
            Self::Tx(t) => t,
        }
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Self::Plain(c) => c,
            Self::Tx(t) => t,
        }
    }
}

/// A group's connection, the aggregate as its members have left it and what they decided
/// to write.
pub(crate) struct Work<A: Aggregate> {
    pub conn: Conn,
    /// The state after the turns so far, its version counting their events, and its last
    /// position a placeholder when that is one of theirs (see `command::pending`).
    pub loaded: Loaded<A>,
    /// The version and last position as loaded: where the group's events go.
    pub base: (u64, Option<Position>),
    pub events: Vec<A::Event>,
    /// One per event.
    pub metadata: Vec<Metadata>,
    /// The members' answers, for their idempotency keys.
    pub records: Vec<RecordRow>,
}

impl<A: Aggregate> Work<A> {
    pub fn new(conn: Conn, loaded: Loaded<A>) -> Self {
        Self {
            conn,
            base: (loaded.version, loaded.last_position),
            loaded,
            events: Vec::new(),
            metadata: Vec::new(),
            records: Vec::new(),
        }
    }
}

/// How a group ended, as its members learn it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Committed,
    /// Rolled back: every member tries again.
    RolledBack,
}

pub(crate) struct Group<A: Aggregate> {
    pub work: Mutex<Option<Work<A>>>,
    /// Its leader guessed that the aggregate is new instead of loading it: what a turn
    /// decides holds only once the group committed (see [`Newness`]).
    pub guessed: bool,
    /// Where the group's events landed, by sequence, once it committed.
    pub positions: OnceLock<HashMap<u64, Position>>,
    /// Members that joined and have not finished their turn.
    joined: AtomicUsize,
    turn_done: Notify,
    poisoned: AtomicBool,
    ended: watch::Sender<Option<Ended>>,
}

impl<A: Aggregate> Group<A> {
    /// A group whose work its leader has yet to load, or to start on a guess (it holds
    /// `work`'s lock until it has, and members take their turns after it).
    pub fn new(guessed: bool) -> Self {
        Self {
            work: Mutex::new(None),
            guessed,
            positions: OnceLock::new(),
            joined: AtomicUsize::new(0),
            turn_done: Notify::new(),
            poisoned: AtomicBool::new(false),
            ended: watch::channel(None).0,
        }
    }

    /// Something was written that must not commit: roll the group back.
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Waits for the group's end; a leader that went away ended it rolled back.
    pub async fn ended(&self) -> Ended {
        let mut receiver = self.ended.subscribe();
        match receiver.wait_for(Option::is_some).await {
            Ok(value) => value.unwrap_or(Ended::RolledBack),
            Err(_) => Ended::RolledBack,
        }
    }

    pub fn end(&self, how: Ended) {
        self.ended.send_replace(Some(how));
    }
}

/// A member's turn: when dropped (finished, or its request dropped midway), the leader
/// is told; dropped before [`Turn::done`], it poisons the group.
pub(crate) struct Turn<A: Aggregate + 'static> {
    group: Arc<Group<A>>,
    done: bool,
}

impl<A: Aggregate + 'static> Turn<A> {
    pub fn done(mut self) {
        self.done = true;
    }
}

impl<A: Aggregate + 'static> Drop for Turn<A> {
    fn drop(&mut self) {
        if !self.done {
            self.group.poison();
        }
        self.group.joined.fetch_sub(1, Ordering::AcqRel);
        self.group.turn_done.notify_one();
    }
}

/// One aggregate's groups in this process: one at a time (`turn`), and the one taking
/// members (`open`).
#[derive(Default)]
pub(crate) struct Stream {
    pub turn: Mutex<()>,
    open: StdMutex<Option<Arc<dyn Any + Send + Sync>>>,
    /// Told when a group opens and when a leader is done: commands waiting to lead look
    /// again, and join the new group rather than queue for the next.
    pub changed: Notify,
}

impl Stream {
    /// Joins the group taking members, if there is one.
    pub fn join<A: Aggregate + 'static>(&self) -> Option<(Arc<Group<A>>, Turn<A>)> {
        let open = lock(&self.open);
        let group = open.as_ref()?.clone().downcast::<Group<A>>().ok()?;
        group.joined.fetch_add(1, Ordering::AcqRel);
        let turn = Turn {
            group: group.clone(),
            done: false,
        };
        Some((group, turn))
    }

    /// Opens `group` for members (the caller holds `turn`).
    pub fn open<A: Aggregate + 'static>(&self, group: &Arc<Group<A>>) {
        *lock(&self.open) = Some(group.clone());
        self.changed.notify_waiters();
    }

    /// Waits until every member that joined has taken its turn, and closes the group to
    /// new members at that moment (a member joins under the same lock).
    pub async fn close<A: Aggregate + 'static>(&self, group: &Arc<Group<A>>) {
        loop {
            let notified = group.turn_done.notified();
            {
                let mut open = lock(&self.open);
                if group.joined.load(Ordering::Acquire) == 0 {
                    *open = None;
                    return;
                }
            }
            notified.await;
        }
    }

    /// Closes the group without waiting (its leader is going away).
    pub fn abandon(&self) {
        *lock(&self.open) = None;
    }
}

/// A stream's key: its aggregate type and id.
type StreamKey = (&'static str, String);

/// What a group's write ended with: where its events landed, by sequence, or why it did
/// not (`F`: the command's own terms).
pub(crate) type Written<F> = Result<HashMap<u64, Position>, F>;

/// What a group's leader hands in to be loaded: its connection, the stream and its
/// command's idempotency key (its owner and the key).
pub(crate) struct Load {
    pub conn: Conn,
    pub id: String,
    pub key: Option<(uuid::Uuid, String)>,
}

/// A [`Load`] done: the connection back, with the stream and the answer recorded for the
/// key.
pub(crate) type Loading<A> = (Conn, Result<(Loaded<A>, Option<StoredAnswer>), StoreError>);

/// Requests waiting for a batch, each with where its outcome goes.
type Queued<T, R> = Vec<(T, oneshot::Sender<R>)>;

/// Requests of one kind to the database that come while another of them is under way, done
/// together by the next: the first to come runs at once; those that come while it runs
/// queue, and when it ends the same task runs every queued request in one go (one
/// statement, one round trip for all) while the next ones queue, until none is left. Each
/// gets its own outcome: when requests run together fail, each runs again alone. The
/// batches run in a task of their own, so that every request in them is told even if the
/// caller that started it goes away; going on from one batch to the next in that task
/// puts no hand-over between tasks between one statement and the next. Each batch's size
/// is counted in `command_batch_size{aggregate, step}`, and the time it took (until every
/// request in it was told) in `command_batch_duration_seconds{aggregate, step}`.
pub(crate) struct Batch<T, R> {
    aggregate: &'static str,
    step: &'static str,
    queue: Arc<StdMutex<Queued<T, R>>>,
    /// Held by the task running the batches.
    running: Arc<Mutex<()>>,
}

impl<T: Send + 'static, R: Send + 'static> Batch<T, R> {
    fn new(aggregate: &'static str, step: &'static str) -> Self {
        Self {
            aggregate,
            step,
            queue: Arc::default(),
            running: Arc::default(),
        }
    }

    /// `item`'s outcome, from the batch of every request queued when it was taken. The
    /// caller that finds no batch running starts the task that runs them. `together` runs
    /// several requests and gives an outcome for each, in order, or the requests back when
    /// it failed; `alone` runs one. Each is handed `with` (the application, say). `None`:
    /// the batch that took it ended without telling it.
    pub async fn run<C, F, FF, G, GF>(&self, item: T, with: C, alone: F, together: G) -> Option<R>
    where
        C: Clone + Send + 'static,
        F: Fn(C, T) -> FF + Send + Sync + 'static,
        FF: Future<Output = R> + Send + 'static,
        G: Fn(C, Vec<T>) -> GF + Send + Sync + 'static,
        GF: Future<Output = Result<Vec<R>, Vec<T>>> + Send + 'static,
    {
        let (sender, mut done) = oneshot::channel();
        lock(&self.queue).push((item, sender));
        tokio::select! {
            biased;
            // A batch took it.
            outcome = &mut done => return outcome.ok(),
            running = self.running.clone().lock_owned() => {
                let queue = self.queue.clone();
                let (aggregate, step) = (self.aggregate, self.step);
                tokio::spawn(async move {
                    let _running = running;
                    // Looked up once for every batch this task runs.
                    let sizes = metrics::histogram!(
                        "command_batch_size", "aggregate" => aggregate, "step" => step
                    );
                    let durations = metrics::histogram!(
                        "command_batch_duration_seconds", "aggregate" => aggregate, "step" => step
                    );
                    loop {
                        // Nothing queued: the next caller starts the task again (it waits
                        // for this lock, which is let go after this).
                        let ready = std::mem::take(&mut *lock(&queue));
                        if ready.is_empty() {
                            break;
                        }
                        sizes.record(ready.len() as f64);
                        let started = std::time::Instant::now();
                        Self::run_batch(ready, with.clone(), &alone, &together).await;
                        durations.record(started.elapsed().as_secs_f64());
                    }
                });
            }
        }
        done.await.ok()
    }

    /// How many requests wait for the next batch.
    #[cfg(feature = "test-hooks")]
    pub fn queued(&self) -> usize {
        lock(&self.queue).len()
    }

    /// Runs `ready` together (or the one alone) and tells each how it ended; if together
    /// failed, runs each alone.
    async fn run_batch<C, F, FF, G, GF>(ready: Queued<T, R>, with: C, alone: &F, together: &G)
    where
        C: Clone,
        F: Fn(C, T) -> FF,
        FF: Future<Output = R>,
        G: Fn(C, Vec<T>) -> GF,
        GF: Future<Output = Result<Vec<R>, Vec<T>>>,
    {
        let (items, senders): (Vec<T>, Vec<_>) = ready.into_iter().unzip();
        let outcomes = if items.len() > 1 {
            together(with.clone(), items).await
        } else {
            Err(items)
        };
        match outcomes {
            Ok(outcomes) => {
                for (outcome, sender) in outcomes.into_iter().zip(senders) {
                    let _ = sender.send(outcome);
                }
            }
            Err(items) => {
                for (item, sender) in items.into_iter().zip(senders) {
                    let _ = sender.send(alone(with.clone(), item).await);
                }
            }
        }
    }
}

/// The loads and the writes of an aggregate type's groups (of different aggregates),
/// each batched, and how often its groups lately found their aggregate new.
pub(crate) struct Batches<A: Aggregate, F> {
    pub loads: Batch<Load, Loading<A>>,
    pub writes: Batch<Work<A>, Written<F>>,
    pub newness: Newness,
}

impl<A: Aggregate + 'static, F: Send + 'static> Batches<A, F> {
    fn new() -> Self {
        Self {
            loads: Batch::new(A::TYPE, "load"),
            writes: Batch::new(A::TYPE, "write"),
            newness: Newness::default(),
        }
    }
}

/// The share of an aggregate type's groups that lately found their aggregate new: an
/// exponentially weighted average over about the last [`Newness::WINDOW`] groups that
/// learnt it, from a load or from a guess that held.
///
/// A guess that holds saves the group its load, one statement and one round trip; one
/// that does not costs a write that fails (which makes the groups batched with it write
/// alone) and the load after it. So leaders guess only while nearly all groups found
/// their aggregate new: contacts pushed one by one by a sign-up form or a CRM sync, say.
/// At most two wrong guesses in a row stop it (from the threshold or above, each takes a
/// [`Newness::WINDOW`]th of the way to 0); the loads that follow learn when guessing
/// pays again. A process starts out expecting new aggregates: at worst that costs each
/// aggregate type two wrong guesses.
pub(crate) struct Newness(AtomicU32);

impl Newness {
    /// The average in units of 2^-16.
    const ONE: u32 = 1 << 16;
    const WINDOW: u32 = 32;
    /// 0.95.
    const THRESHOLD: u32 = Self::ONE / 20 * 19;

    /// Learns that a group found its aggregate new, or not.
    pub fn learn(&self, new: bool) {
        let target = if new { Self::ONE } else { 0 };
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |share| {
                Some(if target > share {
                    share + (target - share).div_ceil(Self::WINDOW)
                } else {
                    share - (share - target).div_ceil(Self::WINDOW)
                })
            });
    }

    /// Whether a leader should guess that its aggregate is new.
    pub fn likely(&self) -> bool {
        self.0.load(Ordering::Relaxed) >= Self::THRESHOLD
    }
}

impl Default for Newness {
    fn default() -> Self {
        Self(AtomicU32::new(Self::ONE))
    }
}

/// Every aggregate's [`Stream`] in this process, while one is in use, and each aggregate
/// type's [`Batches`].
#[derive(Clone, Default)]
pub struct Groups {
    streams: Arc<StdMutex<HashMap<StreamKey, Arc<Stream>>>>,
    batches: Arc<StdMutex<HashMap<&'static str, Arc<dyn Any + Send + Sync>>>>,
}

impl Groups {
    /// The batches of aggregate type `A`, whose writes fail with `F`.
    pub(crate) fn batches<A: Aggregate + 'static, F: Send + 'static>(&self) -> Arc<Batches<A, F>> {
        let mut batches = lock(&self.batches);
        batches
            .entry(A::TYPE)
            .or_insert_with(|| Arc::new(Batches::<A, F>::new()))
            .clone()
            .downcast::<Batches<A, F>>()
            .expect("one aggregate type per name")
    }

    pub(crate) fn stream(&self, aggregate: &'static str, id: &str) -> Arc<Stream> {
        let mut streams = lock(&self.streams);
        streams
            .entry((aggregate, id.to_string()))
            .or_default()
            .clone()
    }

    /// Forgets the stream when nobody else holds it (the map does not grow with every
    /// aggregate ever written).
    pub(crate) fn release(&self, aggregate: &'static str, id: &str, stream: Arc<Stream>) {
        let mut streams = lock(&self.streams);
        // Ours and the map's: nobody else is using it, and nobody can take it but from
        // the map, under this lock.
        if Arc::strong_count(&stream) == 2 {
            streams.remove(&(aggregate, id.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Newness;

    #[test]
    fn guessing_stops_after_two_wrong_guesses_and_comes_back_once_nearly_all_groups_find_their_aggregate_new()
     {
        let newness = Newness::default();
        assert!(newness.likely(), "a process starts out guessing");
        newness.learn(false);
        assert!(newness.likely(), "one wrong guess may be chance");
        newness.learn(false);
        assert!(!newness.likely(), "two are not");
        // Nine in ten new is not enough: a wrong guess costs more than a load.
        for n in 0..1000 {
            newness.learn(n % 10 != 0);
        }
        assert!(!newness.likely());
        let mut loads = 0;
        while !newness.likely() {
            newness.learn(true);
            loads += 1;
        }
        assert!(
            (10..=100).contains(&loads),
            "back after {loads} new aggregates"
        );
        for _ in 0..10_000 {
            newness.learn(true);
        }
        assert!(newness.likely(), "and stays, without overflowing");
    }
}
