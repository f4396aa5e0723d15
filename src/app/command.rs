//! Command execution for every entry point: load, handle, commit — with optimistic-concurrency
//! retries, `If-Match` (RFC 9110) and idempotency keys (scoped to the API key, recorded with
//! the events they guard; see the README's "Using the API"). What a command needs of its
//! caller is a [`CommandContext`]; what it answers is an [`Answer`], which `http` turns into
//! a response.
//!
//! A command on one aggregate ([`execute`]) takes a turn in a group ([`super::group`]):
//! commands for the aggregate arriving together in this process share one write. The
//! group's leader loads the aggregate together with the answer recorded for its
//! idempotency key; a turn replays a recorded answer if there is one, checks `If-Match`,
//! handles the command on the state the turns before left and adds its events and its
//! answer to the group's write. The leader then writes them all in one statement: the
//! events, and each answer with the position its reply names (see [`pending`]). So a
//! command alone is two round trips, its load and its write, and needs no transaction
//! around them: the write checks the stream's version and that no other request answered
//! the key meanwhile, and fails whole if either moved. Under load, the loads and the
//! writes of groups of different aggregates of one type are batched ([`load_group`],
//! [`write_group`]). While nearly all of a type's groups lately found their aggregate
//! new, a leader guesses that its own is new and skips the load: its write tests the
//! guess, and one that does not hold is led again with a load (see [`group::Newness`]).
//! Writes of several aggregates go
//! through [`App::retrying`], in a transaction that claims the key first ([`replay`]). A
//! conflict with another writer rolls the attempt back and tries again after a jittered,
//! growing pause; only when attempts run out does the client see 409.

use std::time::Duration;

use std::future::Future;

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use rand::Rng;
use serde_json::Value;
use sqlx::PgConnection;

use std::sync::Arc;

use crate::app::error::AppError;
use crate::app::group::{Conn, Work};
use crate::app::{App, group};
use aggregates::campaign::Campaign;

use crate::store::{
    Appended, Claim, Hold, Loaded, Metadata, Position, RecordRow, Store, StoreError, StoredAnswer,
};

/// What a command needs of whoever sends it, whatever the transport.
#[derive(Debug, Clone, Default)]
pub struct CommandContext {
    /// Who acts, as recorded with the events (`api_key:<id>`, `cli`, `worker:<name>`).
    pub actor: Option<String>,
    /// Ties the events to the request that caused them (the request id).
    pub correlation_id: Option<String>,
    /// The versions the caller expects the aggregate at (`If-Match`).
    pub if_match: Option<IfMatch>,
    /// The idempotency key, if the caller sent one.
    pub idempotency: Option<Idempotency>,
}

/// An idempotency key with its scope (the API key) and the hash of the request it came
/// with: the same key with another request is refused.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub scope: uuid::Uuid,
    pub key: String,
    pub request_hash: Vec<u8>,
}

impl CommandContext {
    pub fn metadata(&self) -> Metadata {
        Metadata {
            correlation_id: self.correlation_id.clone(),
            causation_id: None,
            actor: self.actor.clone(),
            idempotency_key: self.idempotency.as_ref().map(|i| i.key.clone()),
        }
    }
}

/// `If-Match` (RFC 9110 §13.1.1): `*`, or a list of entity tags compared strongly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// `*`: true when the resource exists.
    Any,
    /// The versions of the strong tags listed (weak tags never match, so are left out).
    Versions(Vec<u64>),
}

impl IfMatch {
    /// Whether a resource at `version` (0: it does not exist) passes the precondition.
    pub fn matches(&self, version: u64) -> bool {
        match self {
            Self::Any => version > 0,
            Self::Versions(versions) => version > 0 && versions.contains(&version),
        }
    }

    /// The header as given, for the 412's detail.
    pub fn describe(&self) -> String {
        match self {
            Self::Any => "*".into(),
            Self::Versions(v) if v.is_empty() => "a weak ETag (never matches)".into(),
            Self::Versions(v) => v
                .iter()
                .map(|v| format!("\"{v}\""))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// Bounds of the retry loop on optimistic-concurrency conflicts.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 60,
            base: Duration::from_millis(1),
            cap: Duration::from_millis(50),
        }
    }
}

impl RetryPolicy {
    /// "Full jitter": a random pause up to an exponentially growing bound.
    pub fn pause(&self, attempt: u32) -> Duration {
        let bound = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.cap);
        let micros = rand::rng().random_range(0..=bound.as_micros() as u64);
        Duration::from_micros(micros)
    }
}

/// What a successful command wrote.
#[derive(Debug)]
pub struct Written<A> {
    /// The aggregate after the command.
    pub loaded: Loaded<A>,
    /// Whether the aggregate had events before this command.
    pub existed_before: bool,
    pub appended: Appended,
}

impl<A> Written<A> {
    pub fn version(&self) -> u64 {
        self.loaded.version
    }

    /// The read-your-writes token: the last event written, or when the command changed
    /// nothing, the aggregate's last event.
    pub fn position(&self) -> Position {
        self.appended
            .last_position()
            .or(self.loaded.last_position)
            .unwrap_or_default()
    }
}

/// The response a command route sends (and records for its idempotency key).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    pub etag_version: Option<u64>,
    pub location: Option<String>,
}

impl Reply {
    pub fn ok(body: Value) -> Self {
        Self {
            status: StatusCode::OK,
            body,
            etag_version: None,
            location: None,
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn with_etag(mut self, version: u64) -> Self {
        self.etag_version = Some(version);
        self
    }

    pub fn with_location(mut self, location: String) -> Self {
        self.location = Some(location);
        self
    }

    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let content_type = if self.status.is_success() {
            "application/json"
        } else {
            "application/problem+json"
        };
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(v) = self.etag_version
            && let Ok(value) = HeaderValue::from_str(&format!("\"{v}\""))
        {
            headers.insert(header::ETAG, value);
        }
        if let Some(location) = &self.location
            && let Ok(value) = HeaderValue::from_str(location)
        {
            headers.insert(header::LOCATION, value);
        }
        headers
    }
}

/// Why one attempt of a transaction did not finish. `E` is the error the caller answers
/// with: [`AppError`] in the services, the transport's own where a route hands in closures
/// that refuse in its terms (see [`execute`]).
pub enum Abort<E = AppError> {
    /// Another writer got to a stream first: roll back and try again.
    Conflict,
    /// Give up and answer with this error; nothing is committed.
    Fail(E),
}

impl<E: From<AppError>> From<AppError> for Abort<E> {
    fn from(e: AppError) -> Self {
        match e {
            // PostgreSQL ended this transaction so that another could go on (a deadlock,
            // a serialization failure): nothing of it is kept, and it runs again.
            AppError::Database(ref d) if crate::store::is_ended_for_another(d) => Self::Conflict,
            e => Self::Fail(e.into()),
        }
    }
}

impl<E: From<AppError>> From<sqlx::Error> for Abort<E> {
    fn from(e: sqlx::Error) -> Self {
        Self::from(AppError::from(e))
    }
}

impl<E: From<AppError>> From<StoreError> for Abort<E> {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Self::Conflict,
            other => Self::Fail(AppError::from(other).into()),
        }
    }
}

/// Decides `command` on `loaded` (whose state moves on with the events decided) and
/// appends those events in the caller's transaction: a command of the service's own,
/// outside the HTTP command path (which records an idempotent answer besides).
pub async fn decide_and_append<A>(
    app: &App,
    conn: &mut PgConnection,
    loaded: &mut Loaded<A>,
    command: A::Command,
    services: &A::Services,
    metadata: &Metadata,
) -> Result<Appended, Abort>
where
    A: Aggregate,
    AppError: From<A::Error>,
{
    let sink = EventSink::default();
    loaded
        .aggregate
        .handle(command, services, &sink)
        .await
        .map_err(AppError::from)?;
    let events = sink.collect().await;
    Ok(app.store.append(conn, loaded, &events, metadata).await?)
}

/// One attempt's transaction, handed to the attempt and back with its outcome.
pub type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

/// How a write ended: committed with its result, or given up after conflicts on every
/// attempt (each caller says what that means for its client).
#[derive(Debug)]
pub enum Retried<T> {
    Done(T),
    Exhausted,
}

impl App {
    /// After a conflict: counts it (`command_conflicts_total{aggregate}`) and pauses
    /// (jittered, growing) before attempt `attempts + 1`; `false` when attempts have run
    /// out.
    async fn try_again(&self, aggregate: &'static str, attempts: &mut u32) -> bool {
        metrics::counter!("command_conflicts_total", "aggregate" => aggregate).increment(1);
        *attempts += 1;
        if *attempts >= self.retry.max_attempts {
            return false;
        }
        tokio::time::sleep(self.retry.pause(*attempts - 1)).await;
        true
    }
    /// The attempts of one write that spans several aggregates (a command on one goes
    /// through [`execute`]'s groups): each attempt runs `attempt` in a fresh transaction,
    /// which hands the transaction back with its outcome; committing and rolling back
    /// happen here, and after a conflict [`App::try_again`] counts and pauses.
    pub async fn retrying<T, E, F, Fut>(
        &self,
        aggregate: &'static str,
        mut attempt: F,
    ) -> Result<Retried<T>, E>
    where
        E: From<AppError>,
        F: FnMut(Tx) -> Fut,
        Fut: Future<Output = (Tx, Result<T, Abort<E>>)>,
    {
        let database = |e: sqlx::Error| E::from(AppError::from(e));
        let mut attempts = 0;
        loop {
            let tx = self.pool.begin().await.map_err(database)?;
            let (tx, outcome) = attempt(tx).await;
            match outcome {
                Ok(done) => {
                    tx.commit().await.map_err(database)?;
                    // Wake the runners whether or not this attempt wrote events: a spurious
                    // wake-up costs one empty feed read, a missed one a poll interval.
                    self.wakeup.committed();
                    return Ok(Retried::Done(done));
                }
                Err(Abort::Fail(e)) => return Err(e),
                Err(Abort::Conflict) => {
                    let _ = tx.rollback().await;
                    if !self.try_again(aggregate, &mut attempts).await {
                        return Ok(Retried::Exhausted);
                    }
                }
            }
        }
    }
}

/// Begins a command's transaction (for an aggregate whose group needs one). Its statements
/// (the load, the guards, the write) look rows up by key, so one generic plan made once
/// per connection serves every execution: planning each one again with its values cost
/// about a tenth of a command's time in the database. The setting lasts for this
/// transaction only and costs no round trip of its own; the load reads each stream
/// through its index whatever plan it runs (see `Store::load_answering`).
async fn begin_command(pool: &sqlx::PgPool) -> Result<Tx, sqlx::Error> {
    pool.begin_with("BEGIN; SET LOCAL plan_cache_mode = force_generic_plan")
        .await
}

/// What a command answers: a reply it made now, or the one recorded for its idempotency
/// key, replayed.
#[derive(Debug, Clone)]
pub enum Answer {
    Fresh(Reply),
    Replayed(Recorded),
}

/// Runs a command on aggregate `id` and answers with `render`'s reply.
///
/// `make` builds the command from the loaded aggregate (it runs again on each retry) and
/// may refuse. `E` is the caller's error type; a refusal of the domain is an answer like a
/// success (a retry with the idempotency key gets it again), which `refusal` renders.
pub async fn execute<A, E, M, R, F>(
    app: &App,
    context: &CommandContext,
    id: &str,
    services: &A::Services,
    make: M,
    render: R,
    refusal: F,
) -> Result<Answer, E>
where
    A: Aggregate + Clone + 'static,
    A::Error: Into<E>,
    E: From<AppError>,
    M: Fn(&Loaded<A>) -> Result<A::Command, E>,
    R: Fn(&Written<A>) -> Reply,
    F: Fn(&E) -> Reply,
{
    execute_guarded(
        app,
        context,
        id,
        services,
        make,
        |_, _| Box::pin(async { Ok(()) }),
        render,
        refusal,
    )
    .await
}

/// What a guard of [`execute_guarded`] answers, boxed: a future that borrows the
/// transaction and stays `Send`.
pub type Guarded<'c, E> = std::pin::Pin<Box<dyn Future<Output = Result<(), Abort<E>>> + Send + 'c>>;

/// [`execute`], with `guard` run on the events decided, in the group's transaction and
/// before they are written: it keeps what must be unique across streams (a table written
/// with the events) and may refuse, which rolls everything back and records nothing. Only
/// the groups of an aggregate that [`in_transaction`] names have a transaction.
#[allow(clippy::too_many_arguments)]
pub async fn execute_guarded<A, E, M, G, R, F>(
    app: &App,
    context: &CommandContext,
    id: &str,
    services: &A::Services,
    make: M,
    guard: G,
    render: R,
    refusal: F,
) -> Result<Answer, E>
where
    A: Aggregate + Clone + 'static,
    A::Error: Into<E>,
    E: From<AppError>,
    M: Fn(&Loaded<A>) -> Result<A::Command, E>,
    G: for<'c> Fn(&'c mut PgConnection, &'c [A::Event]) -> Guarded<'c, E>,
    R: Fn(&Written<A>) -> Reply,
    F: Fn(&E) -> Reply,
{
    let metadata = context.metadata();
    let stream = app.groups.stream(A::TYPE, id);
    let grouped = Grouped {
        app,
        context,
        id,
        services,
        make: &make,
        guard: &guard,
        render: &render,
        refusal: &refusal,
        metadata: &metadata,
    };
    let outcome = grouped.run(&stream).await;
    app.groups.release(A::TYPE, id, stream);
    match outcome {
        Ok(Retried::Done(answer)) => {
            metrics::counter!("commands_total", "aggregate" => A::TYPE, "outcome" => "ok")
                .increment(1);
            Ok(answer)
        }
        Ok(Retried::Exhausted) => {
            metrics::counter!(
                "commands_total",
                "aggregate" => A::TYPE,
                "outcome" => "retries_exhausted"
            )
            .increment(1);
            Err(AppError::conflict(
                "concurrency-conflict",
                "the resource kept changing under this command; retry it",
            )
            .into())
        }
        Err(e) => Err(e),
    }
}

/// Whether the groups of an aggregate type run in a transaction: a campaign's commands
/// take its lock against bulk enrollment, which holds it shared while it decides, so that
/// no enrollment commits after the campaign's completion, and its guards write beside its
/// events. Any other group's write is one statement, which commits by itself (so a guard,
/// which writes beside the events, is for these aggregates only).
fn in_transaction(aggregate_type: &str) -> bool {
    aggregate_type == Campaign::TYPE
}

/// How a leader's group ended for its own command.
enum Led {
    Answered(Answer),
    /// Rolled back: try again after a pause, as after any conflict.
    RolledBack,
    /// Its guess that the aggregate was new did not hold, or nothing tested it: load it
    /// and lead again.
    Misguessed,
}

/// How one command's turn in a group ended.
enum TurnOutcome<E> {
    /// Its answer, added to the group's write: given once the group commits.
    Answer(Answer),
    /// Refused before it wrote anything: its answer, whatever becomes of the group.
    Refused(E),
    /// Failed after it may have written: the group must roll back. `None`: a conflict
    /// with another writer (try again); `Some`: this command's error.
    Failed(Option<E>),
}

/// One command of [`execute_guarded`], with what it takes a turn with.
struct Grouped<'a, A: Aggregate, M, G, R, F> {
    app: &'a App,
    context: &'a CommandContext,
    id: &'a str,
    services: &'a A::Services,
    make: &'a M,
    guard: &'a G,
    render: &'a R,
    refusal: &'a F,
    metadata: &'a Metadata,
}

/// Ends a group rolled back if its leader goes away before ending it (its request was
/// dropped), so that members do not wait for nothing and new commands do not join it.
struct Leading<'a, A: Aggregate> {
    stream: &'a group::Stream,
    group: Arc<group::Group<A>>,
    ended: bool,
}

impl<A: Aggregate> Drop for Leading<'_, A> {
    fn drop(&mut self) {
        if !self.ended {
            self.stream.abandon();
            self.group.end(group::Ended::RolledBack);
        }
    }
}

impl<A, E, M, G, R, F> Grouped<'_, A, M, G, R, F>
where
    A: Aggregate + Clone + 'static,
    A::Error: Into<E>,
    E: From<AppError>,
    M: Fn(&Loaded<A>) -> Result<A::Command, E>,
    G: for<'c> Fn(&'c mut PgConnection, &'c [A::Event]) -> Guarded<'c, E>,
    R: Fn(&Written<A>) -> Reply,
    F: Fn(&E) -> Reply,
{
    /// Joins the group taking members, or leads a new one; again in a new group after a
    /// rollback, up to the retry policy's attempts.
    async fn run(&self, stream: &group::Stream) -> Result<Retried<Answer>, E> {
        let mut attempts = 0;
        // Until a guess did not hold: after one, this command's groups load.
        let mut may_guess = !in_transaction(A::TYPE) && self.context.if_match.is_none();
        loop {
            // Registered before looking, so that a group opening or a leader finishing
            // in between is not missed.
            let changed = stream.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let retry = match stream.join::<A>() {
                Some((group, turn)) => {
                    let outcome = {
                        let mut work = group.work.lock().await;
                        match work.as_mut() {
                            // A turn before failed: the transaction may be aborted and the
                            // group rolls back; try again in the next one.
                            Some(_) if group.is_poisoned() => TurnOutcome::Failed(None),
                            Some(work) => self.take_turn(work, None).await,
                            // The leader could not load (or went away): try again.
                            None => TurnOutcome::Failed(None),
                        }
                    };
                    #[cfg(feature = "test-hooks")]
                    super::pauses::reach(super::pauses::Point::MemberTurnTaken, A::TYPE, self.id)
                        .await;
                    match outcome {
                        // Refused on a guessed state: true only if the guess held.
                        TurnOutcome::Refused(e) if group.guessed => {
                            turn.done();
                            match group.ended().await {
                                group::Ended::Committed => return Err(e),
                                group::Ended::RolledBack => true,
                            }
                        }
                        TurnOutcome::Refused(e) => {
                            turn.done();
                            return Err(e);
                        }
                        TurnOutcome::Failed(failure) => {
                            group.poison();
                            turn.done();
                            if let Some(e) = failure {
                                return Err(e);
                            }
                            group.ended().await;
                            true
                        }
                        TurnOutcome::Answer(answer) => {
                            turn.done();
                            match group.ended().await {
                                group::Ended::Committed => {
                                    return Ok(Retried::Done(written(answer, &group)));
                                }
                                group::Ended::RolledBack => true,
                            }
                        }
                    }
                }
                None => match stream.turn.try_lock() {
                    Ok(turn) => {
                        let guess = may_guess && batches::<A>(self.app).newness.likely();
                        let led = self.lead(stream, guess).await;
                        drop(turn);
                        stream.changed.notify_waiters();
                        match led? {
                            Led::Answered(answer) => return Ok(Retried::Done(answer)),
                            Led::RolledBack => true,
                            // Not a conflict: load and lead again at once.
                            Led::Misguessed => {
                                may_guess = false;
                                false
                            }
                        }
                    }
                    // A group is being opened or committed: wait for either.
                    Err(_) => {
                        changed.await;
                        false
                    }
                },
            };
            #[cfg(feature = "test-hooks")]
            if retry {
                super::pauses::reach(super::pauses::Point::TryingAgain, A::TYPE, self.id).await;
            }
            if retry && !self.app.try_again(A::TYPE, &mut attempts).await {
                return Ok(Retried::Exhausted);
            }
        }
    }

    /// Leads a group (the caller holds the stream's turn): loads the aggregate with the
    /// answer recorded for its own key (or, when `guess`, takes it to be new and its key
    /// unanswered), takes the first turn, lets the members who join take theirs, and
    /// writes (or drops) what they all decided.
    async fn lead(&self, stream: &group::Stream, guess: bool) -> Result<Led, E> {
        let app = self.app;
        let database = |e: sqlx::Error| E::from(AppError::from(e));
        let stored = |e: StoreError| E::from(AppError::from(e));
        // Open from the start, so that the commands that came while the group before was
        // being written join this one while it loads. The leader holds the work until it
        // has loaded it: members take their turns after its own.
        let group = Arc::new(group::Group::<A>::new(guess));
        let mut slot = group.work.lock().await;
        stream.open(&group);
        let mut leading = Leading {
            stream,
            group: group.clone(),
            ended: false,
        };
        let conn = if in_transaction(A::TYPE) {
            let mut tx = begin_command(&app.pool).await.map_err(database)?;
            app.store
                .hold_stream::<A>(&mut tx, self.id, Hold::Exclusive)
                .await
                .map_err(stored)?;
            Conn::Tx(tx)
        } else {
            Conn::Plain(app.warm.acquire().await.map_err(database)?)
        };
        let batches = batches::<A>(app);
        let newness = &batches.newness;
        let (conn, loaded, answer) = if guess {
            (conn, Loaded::unwritten(self.id), None)
        } else {
            let load = group::Load {
                conn,
                id: self.id.to_string(),
                key: self
                    .context
                    .idempotency
                    .as_ref()
                    .map(|i| (i.scope, i.key.clone())),
            };
            // The load that took this one went away before it told it: try again.
            let Some((conn, loaded)) = load_group::<A>(app, load).await else {
                return Ok(Led::RolledBack);
            };
            let (loaded, answer) = loaded.map_err(stored)?;
            newness.learn(loaded.version == 0);
            (conn, loaded, answer)
        };
        let work = slot.insert(Work::new(conn, loaded));
        let own = self.take_turn(work, Some(answer)).await;
        // A guess is tested by the write of the events the leader's command decided on
        // it; without any (a refusal, a command that changed nothing) nothing would test
        // what was said of a stream nobody read.
        let untested = guess && (work.events.is_empty() || !matches!(own, TurnOutcome::Answer(_)));
        // Before the members take their turns: they would only be rolled back.
        if untested || matches!(own, TurnOutcome::Failed(_)) {
            group.poison();
        }
        drop(slot);
        #[cfg(feature = "test-hooks")]
        super::pauses::reach(super::pauses::Point::LeaderTurnTaken, A::TYPE, self.id).await;
        stream.close(&group).await;
        let work = group.work.lock().await.take();
        // The write runs to its end, and tells the members how it ended, even if this
        // request goes away meanwhile: a member told "rolled back" of a write that had in
        // fact committed would run its command a second time.
        let poisoned = group.is_poisoned();
        let finish = tokio::spawn({
            let (app, group) = (app.clone(), group.clone());
            async move {
                let written = match work {
                    Some(work) if !poisoned => write_group(&app, work).await,
                    // Dropping a transaction rolls it back.
                    _ => Err(Abort::Conflict),
                };
                let ended = match written {
                    Ok(positions) => {
                        let _ = group.positions.set(positions);
                        app.wakeup.committed();
                        Ok(group::Ended::Committed)
                    }
                    Err(Abort::Conflict) => Ok(group::Ended::RolledBack),
                    Err(Abort::Fail(e)) => Err(e),
                };
                group.end(*ended.as_ref().unwrap_or(&group::Ended::RolledBack));
                ended
            }
        });
        leading.ended = true;
        let ended = match finish.await {
            Ok(ended) => ended.map_err(E::from)?,
            Err(e) => return Err(E::from(AppError::Internal(e.to_string()))),
        };
        if guess {
            let held = ended == group::Ended::Committed;
            if held {
                newness.learn(true);
            }
            metrics::counter!(
                "command_guesses_total",
                "aggregate" => A::TYPE,
                "outcome" => if untested { "untested" } else if held { "held" } else { "wrong" }
            )
            .increment(1);
            if !held {
                return Ok(Led::Misguessed);
            }
        }
        match (ended, own) {
            (_, TurnOutcome::Refused(e)) | (_, TurnOutcome::Failed(Some(e))) => Err(e),
            (group::Ended::Committed, TurnOutcome::Answer(answer)) => {
                Ok(Led::Answered(written(answer, &group)))
            }
            _ => Ok(Led::RolledBack),
        }
    }

    /// One command's turn on the aggregate as the turns before it left it: replay a
    /// recorded answer, or check `If-Match`, decide, and add the events and the answer
    /// to the group's write. `answer`: the record of this command's key as the leader's
    /// load read it (`None`: a member, which reads it now).
    async fn take_turn(
        &self,
        work: &mut Work<A>,
        answer: Option<Option<StoredAnswer>>,
    ) -> TurnOutcome<E> {
        let recorded = match (answer, &self.context.idempotency) {
            (Some(answer), _) => Ok(answer),
            (None, Some(i)) => StoredAnswer::read(&mut work.conn, i.scope, &i.key)
                .await
                .map_err(AppError::from),
            (None, None) => Ok(None),
        };
        match recorded.and_then(|r| replay_answer(self.context, r)) {
            Ok(Some(recorded)) => return TurnOutcome::Answer(Answer::Replayed(recorded)),
            Ok(None) => {}
            // The transaction (if any) is unusable after a database error.
            Err(e @ AppError::Database(_)) => return TurnOutcome::Failed(Some(e.into())),
            Err(e) => return TurnOutcome::Refused(e.into()),
        }
        // The key is answered by an earlier turn of this group, not yet written.
        if let Some(i) = &self.context.idempotency
            && work
                .records
                .iter()
                .any(|r| r.api_key_id == i.scope && r.key == i.key)
        {
            return TurnOutcome::Refused(E::from(in_flight()));
        }
        let Work {
            conn,
            loaded,
            events: decided,
            metadata,
            records,
            ..
        } = work;
        if let Some(expected) = &self.context.if_match
            && !expected.matches(loaded.version)
        {
            return TurnOutcome::Refused(E::from(AppError::PreconditionFailed(
                if loaded.version == 0 {
                    format!(
                        "If-Match is {} but the resource does not exist",
                        expected.describe()
                    )
                } else {
                    format!(
                        "If-Match is {} but the resource is at version \"{}\"",
                        expected.describe(),
                        loaded.version
                    )
                },
            )));
        }
        let existed_before = loaded.version > 0;
        let command = match (self.make)(loaded) {
            Ok(command) => command,
            Err(e) => return TurnOutcome::Refused(e),
        };
        // Handling applies events to the state as it writes them: a refusal (or a failed
        // guard) must leave the state as the next turn should see it.
        let before = loaded.aggregate.clone();
        let sink = EventSink::default();
        let reply = match loaded.aggregate.handle(command, self.services, &sink).await {
            // The outcome of executing the command: a retry with the key gets it again.
            Err(domain) => {
                loaded.aggregate = before;
                (self.refusal)(&domain.into())
            }
            Ok(()) => {
                let events = sink.collect().await;
                if let Err(e) = Store::check_sizes::<A>(&events) {
                    loaded.aggregate = before;
                    return TurnOutcome::Refused(E::from(AppError::from(e)));
                }
                match (self.guard)(conn, &events).await {
                    Ok(()) => {}
                    Err(Abort::Conflict) => return TurnOutcome::Failed(None),
                    Err(Abort::Fail(e)) => return TurnOutcome::Failed(Some(e)),
                }
                let first = loaded.version + 1;
                let appended: Vec<(u64, Position)> = (first..first + events.len() as u64)
                    .map(|sequence| (sequence, pending(sequence)))
                    .collect();
                if let Some((_, last)) = appended.last() {
                    loaded.version += events.len() as u64;
                    loaded.last_position = Some(*last);
                }
                metadata.extend(std::iter::repeat_n(self.metadata.clone(), events.len()));
                decided.extend(events);
                (self.render)(&Written {
                    loaded: loaded.clone(),
                    existed_before,
                    appended: Appended {
                        version: loaded.version,
                        events: appended,
                    },
                })
            }
        };
        if let Some(i) = &self.context.idempotency {
            records.push(record_row(i, &reply));
        }
        TurnOutcome::Answer(Answer::Fresh(reply))
    }
}

/// What a group's write ended with: where its events landed, by sequence.
type GroupWritten = group::Written<Abort>;

/// The batches of the groups of aggregate type `A` in this process.
fn batches<A: Aggregate + 'static>(app: &App) -> Arc<group::Batches<A, Abort>> {
    app.groups.batches::<A, Abort>()
}

/// Writes what a group's turns decided, in one statement (and commits the group's
/// transaction, if it has one): the positions its events landed at, by sequence. A group
/// without a transaction is written together with the other groups of its aggregate type
/// that are ready while a write of that type is under way ([`group::Batch`]): one
/// statement and one commit for all of them, as a group does for its members.
async fn write_group<A: Aggregate + 'static>(app: &App, work: Work<A>) -> GroupWritten {
    if matches!(work.conn, Conn::Tx(_)) {
        return write_alone(app, work).await;
    }
    batches::<A>(app)
        .writes
        .run(
            work,
            app.clone(),
            |app, work| async move { write_alone(&app, work).await },
            |app, works| async move { write_together(&app, works).await },
        )
        .await
        .unwrap_or(Err(Abort::Conflict))
}

/// How many groups' writes of aggregate type `A` wait for the next batch (for tests that
/// hold a batch at [`super::pauses::Point::Writing`] while others queue behind it).
#[cfg(feature = "test-hooks")]
pub fn queued_writes<A: Aggregate + 'static>(app: &App) -> usize {
    batches::<A>(app).writes.queued()
}

/// Loads a group's aggregate with the answer recorded for its leader's key. A group
/// without a transaction is loaded together with the other groups of its aggregate type
/// whose loads come while one of that type is under way ([`group::Batch`]).
async fn load_group<A: Aggregate + 'static>(
    app: &App,
    load: group::Load,
) -> Option<group::Loading<A>> {
    if matches!(load.conn, Conn::Tx(_)) {
        return Some(load_alone(app, load).await);
    }
    batches::<A>(app)
        .loads
        .run(
            load,
            app.clone(),
            |app, load| async move { load_alone(&app, load).await },
            |app, loads| async move { load_together(&app, loads).await },
        )
        .await
}

/// Loads the groups `loads` in one statement: what each loaded, in order, or the loads
/// back if the statement failed.
async fn load_together<A: Aggregate>(
    app: &App,
    mut loads: Vec<group::Load>,
) -> Result<Vec<group::Loading<A>>, Vec<group::Load>> {
    let ids: Vec<String> = loads.iter().map(|l| l.id.clone()).collect();
    let keys: Vec<Option<(uuid::Uuid, String)>> = loads.iter().map(|l| l.key.clone()).collect();
    let claims: Vec<Option<Claim>> = keys.iter().map(claim_for_load).collect();
    let streams: Vec<(&str, Option<&Claim>)> = ids
        .iter()
        .zip(&claims)
        .map(|(id, c)| (id.as_str(), c.as_ref()))
        .collect();
    let together = app
        .store
        .load_answering_many::<A>(&mut loads[0].conn, &streams)
        .await;
    match together {
        Ok(mut loaded) => Ok(loads
            .into_iter()
            .map(|load| {
                let outcome = loaded
                    .remove(&load.id)
                    .ok_or_else(|| StoreError::Database(sqlx::Error::RowNotFound));
                (load.conn, outcome)
            })
            .collect()),
        Err(_) => Err(loads),
    }
}

/// An idempotency key as a load looks its answer up by (the request's hash is compared
/// after, by [`replay_answer`]).
fn claim_for_load(key: &Option<(uuid::Uuid, String)>) -> Option<Claim<'_>> {
    key.as_ref().map(|(owner, key)| Claim {
        api_key_id: *owner,
        key,
        request_hash: &[],
    })
}

/// [`load_group`] for one group, on its own connection.
async fn load_alone<A: Aggregate>(app: &App, load: group::Load) -> group::Loading<A> {
    let group::Load { mut conn, id, key } = load;
    let claim = claim_for_load(&key);
    let loaded = app
        .store
        .load_answering::<A>(&mut conn, &id, claim.as_ref())
        .await;
    (conn, loaded)
}

/// Writes the groups `works` in one statement: how each write ended, in order, or the
/// works back if the statement failed (a conflict on one group's stream or key fails it
/// whole, and it wrote nothing and left each state as loaded).
async fn write_together<A: Aggregate>(
    app: &App,
    mut works: Vec<Work<A>>,
) -> Result<Vec<GroupWritten>, Vec<Work<A>>> {
    #[cfg(feature = "test-hooks")]
    for work in &works {
        super::pauses::reach(super::pauses::Point::Writing, A::TYPE, &work.loaded.id).await;
    }
    let together = {
        let mut conns = Vec::with_capacity(works.len());
        let mut writes = Vec::with_capacity(works.len());
        for work in works.iter_mut() {
            let Work {
                conn,
                loaded,
                base,
                events,
                metadata,
                records,
            } = work;
            // Each write starts from its stream as loaded; the state already holds the
            // events.
            (loaded.version, loaded.last_position) = *base;
            conns.push(conn);
            writes.push((
                loaded,
                events.as_slice(),
                metadata.as_slice(),
                records.as_slice(),
            ));
        }
        app.store
            .append_recorded_many(conns.swap_remove(0), &mut writes)
            .await
    };
    match together {
        Ok(appended) => {
            // The statement ran to its end: every group's connection is clean.
            for work in works {
                keep(app, work.conn);
            }
            Ok(appended
                .into_iter()
                .map(|appended| Ok(appended.events.into_iter().collect()))
                .collect())
        }
        Err(_) => Err(works),
    }
}

/// [`write_group`] for one group, on its own connection.
async fn write_alone<A: Aggregate>(app: &App, work: Work<A>) -> GroupWritten {
    #[cfg(feature = "test-hooks")]
    super::pauses::reach(super::pauses::Point::Writing, A::TYPE, &work.loaded.id).await;
    let Work {
        mut conn,
        mut loaded,
        base,
        events,
        metadata,
        records,
    } = work;
    // The write starts from the stream as loaded; the state already holds the events.
    (loaded.version, loaded.last_position) = base;
    let appended = app
        .store
        .append_recorded(&mut conn, &mut loaded, &events, &metadata, &records)
        .await?;
    match conn {
        Conn::Tx(tx) => tx.commit().await?,
        plain => keep(app, plain),
    }
    Ok(appended.events.into_iter().collect())
}

/// Keeps a group's connection for the next command, once its write ran to its end (a
/// transaction's connection goes back to the pool as it commits).
fn keep(app: &App, conn: Conn) {
    if let Conn::Plain(connection) = conn {
        app.warm.keep(connection);
    }
}

/// The placeholder position of a group's event at `sequence`: replies are made before
/// their events are written (with the rest of the group's), so a reply names this, and is
/// given out ([`written`]) and replayed ([`replay_answer`]) with the event's position put
/// in. No written event has transaction 0.
fn pending(sequence: u64) -> Position {
    Position {
        transaction_id: 0,
        position: sequence as i64,
    }
}

/// The sequence of the event a reply's `position` names, when that is a placeholder.
fn pending_in(body: &Value) -> Option<u64> {
    let position: Position = body.get("position")?.as_str()?.parse().ok()?;
    (position.transaction_id == 0 && position.position > 0).then_some(position.position as u64)
}

/// A member's answer once its group committed: its reply with the position it names put
/// in.
fn written<A: Aggregate>(answer: Answer, group: &group::Group<A>) -> Answer {
    match answer {
        Answer::Fresh(mut reply) => {
            if let Some(position) = pending_in(&reply.body)
                .and_then(|sequence| group.positions.get()?.get(&sequence).copied())
            {
                reply.body["position"] = Value::String(position.to_string());
            }
            Answer::Fresh(reply)
        }
        replayed => replayed,
    }
}

fn in_flight() -> AppError {
    AppError::conflict(
        "idempotency-key-in-flight",
        "a request with this Idempotency-Key is still being processed; retry shortly",
    )
}

/// The aggregate `id` as its stream says, or 404 with `missing` when `exists` says it was
/// never created.
pub async fn load_existing<A: Aggregate>(
    app: &App,
    id: uuid::Uuid,
    exists: impl Fn(&A) -> bool,
    missing: &str,
) -> Result<Loaded<A>, AppError> {
    let mut conn = app.warm.acquire().await?;
    let loaded: Loaded<A> = app.store.load(&mut conn, &id.to_string()).await?;
    app.warm.keep(conn);
    if exists(&loaded.aggregate) {
        Ok(loaded)
    } else {
        Err(AppError::NotFound(missing.to_string()))
    }
}

/// A response recorded for an idempotency key, as stored.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// The context's idempotency key, checked inside the attempt's transaction of a write
/// that spans several aggregates: the reply recorded for it, if any (`None` also when
/// there is no key). The key is locked for the transaction, so a second such request with
/// it while the first runs gets 409.
pub async fn replay(
    conn: &mut PgConnection,
    context: &CommandContext,
) -> Result<Option<Recorded>, AppError> {
    let Some(claim) = claim_of(context) else {
        return Ok(None);
    };
    // One round trip on the way of a new command: the key's lock, and a claim on the key
    // (a placeholder the answer fills). The claim's conflict check sees records committed
    // after this statement's snapshot, so a record committed by the lock's previous holder
    // is never missed.
    let gate = sqlx::query!(
        r#"WITH gate AS (
               SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0)) AS locked
           ), claimed AS (
               INSERT INTO idempotency_records
                   (api_key_id, idempotency_key, request_hash, response_status, response_body,
                    subjects)
               SELECT $3, $2, $4, NULL, '', '{}' FROM gate WHERE gate.locked
               ON CONFLICT (api_key_id, idempotency_key) DO NOTHING
               RETURNING 1
           )
           SELECT (SELECT locked FROM gate) AS "locked!",
                  EXISTS (SELECT 1 FROM claimed) AS "claimed!""#,
        claim.lock_name(),
        claim.key,
        claim.api_key_id,
        claim.request_hash
    )
    .fetch_one(&mut *conn)
    .await?;
    if !gate.locked {
        return Err(in_flight());
    }
    if gate.claimed {
        return Ok(None);
    }
    let record = StoredAnswer::read(conn, claim.api_key_id, claim.key).await?;
    replay_answer(context, record)
}

/// The context's idempotency key, as the load of a command's aggregate looks its answer
/// up and as [`replay`] claims it (`None` without a key).
fn claim_of(context: &CommandContext) -> Option<Claim<'_>> {
    context.idempotency.as_ref().map(|i| Claim {
        api_key_id: i.scope,
        key: &i.key,
        request_hash: &i.request_hash,
    })
}

/// The answer to give again from the context's key's record, if it has one: refused when
/// the key came with another request. `None` without a key, a record, or an answer in it
/// (a claim committed without one: its command was refused before it had one, and this
/// request runs the command and fills it).
fn replay_answer(
    context: &CommandContext,
    record: Option<StoredAnswer>,
) -> Result<Option<Recorded>, AppError> {
    let (Some(idempotency), Some(record)) = (&context.idempotency, record) else {
        return Ok(None);
    };
    let Some(status) = record.status else {
        return Ok(None);
    };
    if record.request_hash != idempotency.request_hash {
        return Err(AppError::invalid(vec![crate::app::error::FieldError::new(
            "Idempotency-Key",
            "this key was already used with a different request",
        )]));
    }
    let status = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK);
    let mut headers = HeaderMap::new();
    if let Some(map) = record.headers.as_object() {
        for (name, value) in map {
            if let (Ok(name), Some(Ok(value))) = (
                header::HeaderName::from_bytes(name.as_bytes()),
                value.as_str().map(HeaderValue::from_str),
            ) {
                headers.insert(name, value);
            }
        }
    }
    let mut body = projections::pii::open_record(
        &record_aad(idempotency.scope, &idempotency.key),
        &record.body,
    )
    .map_err(|e| AppError::Internal(e.to_string()))?;
    // Recorded with its events: the reply names a placeholder, the record the position.
    if let Some(position) = record.position {
        let mut reply: Value =
            serde_json::from_slice(&body).map_err(|e| AppError::Internal(e.to_string()))?;
        reply["position"] = Value::String(position.to_string());
        body = serde_json::to_vec(&reply).map_err(|e| AppError::Internal(e.to_string()))?;
    }
    Ok(Some(Recorded {
        status,
        headers,
        body,
    }))
}

/// A reply as recorded: sealed (a reply can name a person, a contact's answer, or hold a
/// secret), with its headers and whom it names.
fn sealed_reply(scope: uuid::Uuid, key: &str, reply: &Reply) -> (Vec<u8>, Value, Vec<uuid::Uuid>) {
    let headers: serde_json::Map<String, Value> = reply
        .headers()
        .iter()
        .filter_map(|(k, v)| {
            Some((
                k.as_str().to_string(),
                Value::String(v.to_str().ok()?.to_string()),
            ))
        })
        .collect();
    let clear = serde_json::to_vec(&reply.body).unwrap_or_default();
    let subjects = projections::pii::reply_names(&clear);
    let body = projections::pii::seal_record(&record_aad(scope, key), &clear);
    (body, Value::Object(headers), subjects)
}

/// `reply` as a record for a group's write, naming the event its position stands for.
fn record_row(idempotency: &Idempotency, reply: &Reply) -> RecordRow {
    let (body, headers, subjects) = sealed_reply(idempotency.scope, &idempotency.key, reply);
    RecordRow {
        api_key_id: idempotency.scope,
        key: idempotency.key.clone(),
        request_hash: idempotency.request_hash.clone(),
        status: reply.status.as_u16() as i16,
        body,
        headers,
        names_sequence: pending_in(&reply.body),
        subjects,
    }
}

/// Records `reply` for the context's idempotency key, in the caller's transaction (no-op
/// without a key).
pub async fn record(
    conn: &mut PgConnection,
    context: &CommandContext,
    reply: &Reply,
) -> Result<(), AppError> {
    let Some(Idempotency {
        scope,
        key,
        request_hash,
    }) = &context.idempotency
    else {
        return Ok(());
    };
    let (body, headers, subjects) = sealed_reply(*scope, key, reply);
    let recorded = sqlx::query!(
        "INSERT INTO idempotency_records
             (api_key_id, idempotency_key, request_hash,
              response_status, response_body, response_headers, subjects)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (api_key_id, idempotency_key) DO UPDATE
         SET request_hash = EXCLUDED.request_hash,
             response_status = EXCLUDED.response_status,
             response_body = EXCLUDED.response_body,
             response_headers = EXCLUDED.response_headers,
             subjects = EXCLUDED.subjects
         WHERE idempotency_records.response_status IS NULL",
        scope,
        key,
        request_hash,
        reply.status.as_u16() as i16,
        body,
        headers,
        &subjects
    )
    .execute(&mut *conn)
    .await?;
    // Filled the claim (or wrote a new record): anything else is another answer already
    // recorded for the key, and this one must not commit beside it.
    if recorded.rows_affected() != 1 {
        return Err(AppError::conflict(
            "idempotency-key-in-flight",
            "another request with this Idempotency-Key was answered first; retry to get its answer",
        ));
    }
    Ok(())
}

/// What a sealed reply is bound to: its record's key, so it cannot be moved to another.
pub fn record_aad(scope: uuid::Uuid, key: &str) -> Vec<u8> {
    format!("idempotency:{scope}:{key}").into_bytes()
}

/// Deletes idempotency records older than `keep`; returns how many.
pub async fn purge_idempotency_records(
    pool: &sqlx::PgPool,
    keep: Duration,
) -> Result<u64, sqlx::Error> {
    let secs = keep.as_secs_f64();
    let done = sqlx::query!(
        "DELETE FROM idempotency_records WHERE created_at < now() - make_interval(secs => $1)",
        secs
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
