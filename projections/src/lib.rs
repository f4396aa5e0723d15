//! leadledger's read side: the global feed, the projection runner, and one module per read
//! model, each owning its tables and saying how every event changes them.
//!
//! Projections are deterministic and replayable: they read no clock, draw no random
//! numbers and touch nothing but their own tables, so a rebuild from the feed gives the
//! same tables as the live run.

pub mod budget_holds;
pub mod budgets;
pub mod campaigns;
pub mod contacts;
mod copy;
pub mod costs;
pub mod enrollments;
pub mod feed;
pub mod pii;
pub mod rebuild;
pub mod runner;
pub mod status;
pub mod wake;

use std::sync::Arc;

use sqlx::PgConnection;

pub use feed::{FeedEvent, Position};
pub use wake::Wakeup;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("event {event_type} at {position} cannot be decoded: {source}")]
    Decode {
        event_type: String,
        position: Position,
        #[source]
        source: serde_json::Error,
    },
    #[error("event at {position} is inconsistent with the read model: {message}")]
    Inconsistent { position: Position, message: String },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A read model, fed by the runner as events commit and by a rebuild from the start of
/// the feed: both call the same [`Projection::apply_batch`], except that a rebuild fills its
/// copies with [`Projection::apply_rows`] and then their totals with
/// [`Projection::fill_totals`].
#[async_trait::async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Stable name: the checkpoint's key and the advisory lock's.
    fn name(&self) -> &'static str;

    /// The tables this projection owns and writes, and nothing else writes: what a
    /// rebuild builds anew and swaps in. Its queries name them unqualified, so a rebuild
    /// points them at its own copies through `search_path`.
    fn tables(&self) -> &'static [&'static str];

    /// Applies `events`, in feed order, inside the caller's transaction. Events of other
    /// aggregates are ignored. The result must equal applying the events one at a time,
    /// whatever the batch boundaries. A projection reads the events' payloads and places,
    /// never their metadata: a rebuild feeds them without it.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError>;

    /// The tables among [`Projection::tables`] that only hold totals of the projection's
    /// other tables (counts a read model keeps so that its readers need not add up rows).
    /// Every batch moves them; a rebuild instead leaves them alone while it applies the
    /// feed ([`Projection::apply_rows`]) and fills them once at the end
    /// ([`Projection::fill_totals`]).
    fn totals(&self) -> &'static [&'static str] {
        &[]
    }

    /// The tables among [`Projection::tables`] whose rows later events rewrite, most of
    /// them soon after (an enrollment's reports): a rebuild fills their copies with
    /// half-empty pages, so that a rewrite stays on its row's page without a new index
    /// entry.
    fn rewritten(&self) -> &'static [&'static str] {
        &[]
    }

    /// [`Projection::apply_batch`] without moving the totals: what a rebuild's [`Fill`]
    /// runs on each batch unless the projection has a fill of its own
    /// ([`Projection::fill`]).
    async fn apply_rows(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        self.apply_batch(conn, events).await
    }

    /// How a rebuild fills this projection's copies: [`Projection::apply_rows`] on each
    /// batch, unless the projection keeps rows between batches to write each of them once.
    fn fill(&self) -> Box<dyn Fill + '_> {
        Box::new(ByBatch(self))
    }

    /// Sets the totals from the other tables, as applying every event that built them
    /// would have moved them, inside the caller's transaction.
    async fn fill_totals(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        let _ = conn;
        Ok(())
    }

    /// Whether applying a batch may append events (reactors do): the runner then wakes the
    /// process's runners after the batch commits.
    fn writes_events(&self) -> bool {
        false
    }

    /// Whether it reads the personal data of events of this type (contact events are
    /// sealed in the log). The runner opens an event only for a group that has a
    /// projection saying so; the others may get it as stored (personal members sealed).
    fn opens(&self, aggregate_type: &str, event_type: &str) -> bool {
        let _ = (aggregate_type, event_type);
        true
    }
}

/// A rebuild's fill of one projection's copies. The rebuild gives it the feed batch after
/// batch and commits every few batches in one transaction, each commit with the place the
/// projection has reached; before each commit it calls [`Fill::flush`]. A fill may hold
/// rows a batch made until a later batch of the same transaction, or until the flush,
/// when later events are likely to change them soon (an enrollment's reports follow it):
/// each is then written once. What is committed is always every event up to
/// the committed place, applied.
#[async_trait::async_trait]
pub trait Fill: Send {
    /// Applies `events`, in feed order, in the caller's transaction, leaving the totals
    /// alone (as [`Projection::apply_rows`]).
    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError>;

    /// Writes every row it holds, in the caller's transaction, which commits next.
    async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        let _ = conn;
        Ok(())
    }
}

/// The fill that holds nothing: [`Projection::apply_rows`] on each batch.
struct ByBatch<'a, P: ?Sized>(&'a P);

#[async_trait::async_trait]
impl<P: Projection + ?Sized> Fill for ByBatch<'_, P> {
    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        self.0.apply_rows(conn, events).await
    }
}

/// How a batch is applied: live ([`Projection::apply_batch`]), moving the projection's
/// totals ([`Projection::totals`]) with every batch, or in a rebuild's fill
/// ([`Projection::apply_rows`]), which leaves the totals until it fills them and inserts
/// a batch's new rows by binary `COPY` ([`copy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Live,
    Fill,
}

/// A side-effecting event handler: it answers events by running commands (writing events
/// of its own), owns no tables and is never rebuilt — replaying it would repeat its
/// effects. The runner feeds it like a projection, each batch in one transaction with its
/// checkpoint, so its effects happen exactly once.
#[async_trait::async_trait]
pub trait Reactor: Send + Sync + 'static {
    /// Stable name: the checkpoint's key and the advisory lock's.
    fn name(&self) -> &'static str;

    /// Reacts to `events`, in feed order, inside the caller's transaction (committed with
    /// the checkpoint). Events it has no interest in are ignored.
    async fn react(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError>;

    /// Whether it reads the personal data of events of this type: see
    /// [`Projection::opens`].
    fn opens(&self, aggregate_type: &str, event_type: &str) -> bool {
        let _ = (aggregate_type, event_type);
        true
    }
}

/// Applies one event: a batch of one.
pub async fn apply(
    projection: &dyn Projection,
    conn: &mut PgConnection,
    event: &FeedEvent,
) -> Result<(), ProjectionError> {
    projection
        .apply_batch(conn, std::slice::from_ref(event))
        .await
}

/// Every projection the service runs.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(campaigns::CampaignsProjection),
        Arc::new(contacts::ContactsProjection),
        Arc::new(enrollments::EnrollmentsProjection),
        Arc::new(costs::CostsProjection),
        Arc::new(budget_holds::BudgetHoldsProjection),
        Arc::new(budgets::BudgetsProjection),
    ]
}

/// The names of every projection.
pub fn names() -> Vec<&'static str> {
    all().iter().map(|p| p.name()).collect()
}

/// The projection called `name`.
pub fn by_name(name: &str) -> Option<Arc<dyn Projection>> {
    all().into_iter().find(|p| p.name() == name)
}

/// Every event of `batch` of the aggregate type `aggregate_type`, decoded, with its id.
fn events_of<'a, E: serde::de::DeserializeOwned>(
    batch: &'a [FeedEvent],
    aggregate_type: &str,
) -> Result<Vec<(&'a FeedEvent, uuid::Uuid, E)>, ProjectionError> {
    events_typed(batch, aggregate_type, |_| true)
}

/// [`events_of`] for a projection that reads only the event types `event_types`: the
/// others are not decoded (an aggregate's events are shared by several projections, and
/// most of them are of types a projection skips).
fn events_of_types<'a, E: serde::de::DeserializeOwned>(
    batch: &'a [FeedEvent],
    aggregate_type: &str,
    event_types: &[&str],
) -> Result<Vec<(&'a FeedEvent, uuid::Uuid, E)>, ProjectionError> {
    events_typed(batch, aggregate_type, |e| {
        event_types.contains(&e.event_type.as_str())
    })
}

fn events_typed<'a, E: serde::de::DeserializeOwned>(
    batch: &'a [FeedEvent],
    aggregate_type: &str,
    wanted: impl Fn(&FeedEvent) -> bool,
) -> Result<Vec<(&'a FeedEvent, uuid::Uuid, E)>, ProjectionError> {
    batch
        .iter()
        .filter(|e| e.aggregate_type == aggregate_type && wanted(e))
        .map(|e| Ok((e, uuid_of(e)?, decode(e)?)))
        .collect()
}

/// One column of a batch's rows, for a statement that takes the batch as `UNNEST` arrays.
fn column<K, R, T>(rows: &[(K, R)], f: impl Fn(&R) -> T) -> Vec<T> {
    rows.iter().map(|(_, r)| f(r)).collect()
}

/// The ids of a batch's rows, for `UNNEST`.
fn ids<R>(rows: &[(uuid::Uuid, R)]) -> Vec<uuid::Uuid> {
    rows.iter().map(|(id, _)| *id).collect()
}

/// After an update of `rows` matched fewer rows than it was given: the error that names
/// the earliest event (`first`) of a row missing from the read model (`present` holds the
/// ids the table has).
fn missing_row<R>(
    rows: &[(uuid::Uuid, R)],
    present: &[uuid::Uuid],
    first: impl Fn(&R) -> Position,
    message: &str,
) -> ProjectionError {
    let position = rows
        .iter()
        .filter(|(id, _)| !present.contains(id))
        .map(|(_, r)| first(r))
        .min()
        .unwrap_or_default();
    ProjectionError::Inconsistent {
        position,
        message: message.to_string(),
    }
}

/// The UTC day of a time: the bucket of every per-day read model.
fn utc_day(at: chrono::DateTime<chrono::Utc>) -> chrono::NaiveDate {
    at.date_naive()
}

fn decode<E: serde::de::DeserializeOwned>(event: &FeedEvent) -> Result<E, ProjectionError> {
    event.decode().map_err(|source| ProjectionError::Decode {
        event_type: event.event_type.clone(),
        position: event.at,
        source,
    })
}

fn uuid_of(event: &FeedEvent) -> Result<uuid::Uuid, ProjectionError> {
    uuid::Uuid::parse_str(&event.aggregate_id).map_err(|e| ProjectionError::Inconsistent {
        position: event.at,
        message: format!("aggregate id is not a uuid: {e}"),
    })
}
