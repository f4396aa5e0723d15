//! The event store: append-only streams per aggregate in PostgreSQL, with optimistic
//! concurrency, snapshots, upcasting and read-your-writes positions.
//!
//! The store never opens transactions of its own in [`Store::load`] and [`Store::append`]:
//! the caller passes a connection (usually inside a transaction), so that several
//! aggregates, an idempotency record and the events can commit together or not at all.
//! [`PgEventStore`] wraps it as cqrs-es's `EventStore`, with one transaction per commit.
//!
//! A note on cqrs-es: `EventSink::write` applies each event to the aggregate while the
//! command is handled. The state after `handle` is therefore already the new state; the
//! store must not apply the events again (doing so is how cqrs-es's own persisted store
//! corrupts snapshots).

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use cqrs_es::{Aggregate, AggregateContext, AggregateError, DomainEvent, EventEnvelope};
use projections::pii;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};

pub use projections::feed::{InvalidPosition, Position};

/// Who and what caused an event; stored as the event's `metadata`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl Metadata {
    fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::new();
        let fields = [
            ("correlation_id", &self.correlation_id),
            ("causation_id", &self.causation_id),
            ("actor", &self.actor),
            ("idempotency_key", &self.idempotency_key),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                map.insert(k.to_string(), v.clone());
            }
        }
        map
    }

    fn from_map(map: &HashMap<String, String>) -> Self {
        Self {
            correlation_id: map.get("correlation_id").cloned(),
            causation_id: map.get("causation_id").cloned(),
            actor: map.get("actor").cloned(),
            idempotency_key: map.get("idempotency_key").cloned(),
        }
    }
}

impl From<projections::pii::PiiError> for StoreError {
    fn from(e: projections::pii::PiiError) -> Self {
        match e {
            projections::pii::PiiError::Database(e) => Self::Database(e),
            other => Self::Pii(other),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer appended to the stream first (optimistic concurrency).
    #[error("the stream was changed by another writer")]
    Conflict,
    #[error("stored data does not match the aggregate's types: {0}")]
    Deserialize(#[from] serde_json::Error),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Personal data could not be sealed or opened (see `projections::pii`). A database
    /// failure while reading data keys is a [`StoreError::Database`], so that an outage
    /// is told apart from a defect.
    #[error(transparent)]
    Pii(projections::pii::PiiError),
    /// An event larger than [`MAX_EVENT_BYTES`]: refused before anything is written.
    #[error(
        "an event of {bytes} bytes is larger than the {MAX_EVENT_BYTES} bytes one event may carry"
    )]
    EventTooLarge { bytes: usize },
}

/// The most one event's payload may carry, as JSON text. Every command on an aggregate
/// replays the events since its last snapshot, so a bound per event (with snapshots by
/// size, [`SNAPSHOT_BYTES`]) bounds the work and memory of one command.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;
/// A snapshot is also written once the events after the last one add up to this many
/// bytes, whatever their number: a few large events cost as much to replay as many.
pub const SNAPSHOT_BYTES: u64 = 512 * 1024;

/// PostgreSQL ended the transaction so that another could go on: a deadlock (`40P01`) or
/// a serialization failure (`40001`). Running it again from the start is the remedy.
pub fn is_ended_for_another(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40P01" | "40001")))
}

impl StoreError {
    fn from_insert(e: sqlx::Error) -> Self {
        // A clash on a stream's sequence, or on a data key made with the stream's next
        // events: either way another writer appended first.
        // An idempotency key answered by another request while this write was decided
        // (see `leadledger_require_recorded`) is a clash of the same kind: the next attempt
        // finds the answer. Two writes of overlapping streams and keys may also wait on
        // each other; the one PostgreSQL picks to end tries again.
        let conflict = is_ended_for_another(&e)
            || e.as_database_error().is_some_and(|d| {
                d.code().is_some_and(|c| c == "23505")
                    && d.constraint().is_some_and(|c| {
                        c == "events_stream_sequence"
                            || c == "contact_keys_pkey"
                            || c == "idempotency_records_pkey"
                    })
            });
        if conflict {
            Self::Conflict
        } else {
            Self::Database(e)
        }
    }
}

/// Refuses an event of `bytes` (as JSON text) over [`MAX_EVENT_BYTES`].
fn check_size(bytes: usize) -> Result<(), StoreError> {
    if bytes > MAX_EVENT_BYTES {
        return Err(StoreError::EventTooLarge { bytes });
    }
    Ok(())
}

/// An idempotency key with the request it came with: what a command's load looks its
/// answer up by ([`Store::load_answering`]).
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// The API key the idempotency key belongs to.
    pub api_key_id: uuid::Uuid,
    pub key: &'a str,
    /// The hash of the request that came with the key.
    pub request_hash: &'a [u8],
}

impl Claim<'_> {
    /// What the key's transaction-scoped advisory lock is taken on (hashed), by the
    /// writes that claim a key before they decide (`command::replay`).
    pub fn lock_name(&self) -> String {
        format!("{}:{}", self.api_key_id, self.key)
    }
}

/// One stream's part of [`Store::append_recorded_many`]: the stream as loaded, its events,
/// their metadata (one per event) and the records that answer for it.
pub type RecordedWrite<'a, A> = (
    &'a mut Loaded<A>,
    &'a [<A as Aggregate>::Event],
    &'a [Metadata],
    &'a [RecordRow],
);

/// An idempotency record as stored.
#[derive(Debug, Clone)]
pub struct StoredAnswer {
    pub request_hash: Vec<u8>,
    /// `None`: a claim committed without an answer (its command was refused before it
    /// had one).
    pub status: Option<i16>,
    /// Sealed.
    pub body: Vec<u8>,
    pub headers: serde_json::Value,
    /// The position the reply names, when it was recorded with the events it names (the
    /// body then holds a placeholder in its `position`).
    pub position: Option<Position>,
}

impl StoredAnswer {
    /// The record of `key`, if any.
    pub async fn read(
        conn: &mut PgConnection,
        api_key_id: uuid::Uuid,
        key: &str,
    ) -> Result<Option<Self>, StoreError> {
        let row = sqlx::query!(
            r#"SELECT request_hash, response_status, response_body, response_headers,
                      response_position, response_transaction_id::text AS response_transaction_id
               FROM idempotency_records WHERE api_key_id = $1 AND idempotency_key = $2"#,
            api_key_id,
            key
        )
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|r| {
            Ok(Self {
                request_hash: r.request_hash,
                status: r.response_status,
                body: r.response_body,
                headers: r.response_headers,
                position: stored_position(r.response_transaction_id, r.response_position)?,
            })
        })
        .transpose()
    }
}

fn stored_position(
    transaction_id: Option<String>,
    position: Option<i64>,
) -> Result<Option<Position>, StoreError> {
    Ok(match (transaction_id, position) {
        (Some(t), Some(p)) => Some(Position::stored(&t, p)?),
        _ => None,
    })
}

/// An answer recorded for an idempotency key by the statement that appends the events it
/// answers for ([`Store::append_recorded`]).
#[derive(Debug, Clone)]
pub struct RecordRow {
    pub api_key_id: uuid::Uuid,
    pub key: String,
    pub request_hash: Vec<u8>,
    pub status: i16,
    /// Sealed.
    pub body: Vec<u8>,
    pub headers: serde_json::Value,
    /// The sequence (in the stream written) of the event whose position the reply names,
    /// if it is one of this write's: the record stores that event's position.
    pub names_sequence: Option<u64>,
    /// Whom the reply names (`pii::reply_names`): what an erasure finds it by.
    pub subjects: Vec<uuid::Uuid>,
}

/// An aggregate as loaded: its state, its version (events so far) and where its last
/// event stands in the feed.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    pub id: String,
    pub aggregate: A,
    pub version: u64,
    pub last_position: Option<Position>,
    /// Bytes of the events since the last snapshot (replayed by every load).
    pub unsnapshotted_bytes: u64,
    /// For a stream with personal data: its data key's generations, read by the load in
    /// the same snapshot as its events, so that a write needs no second look. `None`: not
    /// read (the write reads them).
    pub keys: Option<pii::Generations>,
}

impl<A: Aggregate> Loaded<A> {
    /// A stream nobody has written, as a load finds it: no events and, for a type with
    /// personal data, no data key yet.
    pub fn unwritten(id: &str) -> Self {
        Self {
            id: id.to_string(),
            aggregate: A::default(),
            version: 0,
            last_position: None,
            unsnapshotted_bytes: 0,
            keys: pii::is_personal(A::TYPE).then(pii::Generations::default),
        }
    }
}

impl<A: Aggregate> AggregateContext<A> for Loaded<A> {
    fn aggregate(&mut self) -> &mut A {
        &mut self.aggregate
    }
}

/// A stream's latest snapshot as stored.
struct SnapshotRow {
    aggregate_id: String,
    last_sequence: i64,
    last_position: i64,
    last_transaction_id: String,
    payload: serde_json::Value,
}

/// A row of a load's statement: a snapshot (kind 0), an event (1), a data key (2) or an
/// idempotency record (3), in the columns they share.
struct LoadPart {
    kind: i32,
    aggregate_id: String,
    sequence: i64,
    event_type: Option<String>,
    event_version: Option<String>,
    payload: Option<serde_json::Value>,
    metadata: Option<serde_json::Value>,
    position: Option<i64>,
    transaction_id: Option<String>,
    bytes: Option<i64>,
    wrapped_key: Option<Vec<u8>>,
    request_hash: Option<Vec<u8>>,
}

/// A row of `events` as a load reads it.
struct EventRow {
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: serde_json::Value,
    metadata: serde_json::Value,
    position: i64,
    transaction_id: String,
    bytes: i64,
}

/// An event as [`Store::read_stream`] gives it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub sequence: i64,
    pub event_type: String,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    pub metadata: Metadata,
    /// Opened and upcast: `{"<variant>": {...}}`.
    pub payload: serde_json::Value,
}

/// What an append wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The aggregate's version after the append.
    pub version: u64,
    /// (sequence, position) of each event written, in order.
    pub events: Vec<(u64, Position)>,
}

impl Appended {
    pub fn last_position(&self) -> Option<Position> {
        self.events.last().map(|(_, p)| *p)
    }
}

/// The store's settings and upcasters; cheap to clone.
#[derive(Clone)]
pub struct Store {
    snapshot_every: u64,
    upcasters: Arc<Vec<Box<dyn EventUpcaster>>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("snapshot_every", &self.snapshot_every)
            .field("upcasters", &self.upcasters.len())
            .finish()
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new(DEFAULT_SNAPSHOT_EVERY)
    }
}

/// How [`Store::hold_stream`] holds a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    Exclusive,
    Shared,
}

/// A snapshot every this many events keeps loads bounded: at most this many events are
/// replayed on top of a snapshot.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 100;

impl Store {
    /// `snapshot_every = 0` turns snapshots off (every load replays the whole stream).
    pub fn new(snapshot_every: u64) -> Self {
        Self {
            snapshot_every,
            upcasters: Arc::new(aggregates::upcasters::all()),
        }
    }

    pub fn with_upcasters(mut self, upcasters: Vec<Box<dyn EventUpcaster>>) -> Self {
        self.upcasters = Arc::new(upcasters);
        self
    }

    /// Holds stream `id` of `A` for the rest of the transaction: exclusively for a writer
    /// whose events change what other commands may do (a campaign's lifecycle), shared for
    /// the commands that depend on it (enrollments). Optimistic concurrency orders writes
    /// to one stream; this orders a write to one stream against a decision that read
    /// another, so a decision never commits after a change that would have refused it.
    pub async fn hold_stream<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &str,
        hold: Hold,
    ) -> Result<(), StoreError> {
        let key = format!("{}:{id}", A::TYPE);
        match hold {
            Hold::Exclusive => {
                sqlx::query!("SELECT pg_advisory_xact_lock(hashtextextended($1, 3))", key)
                    .execute(&mut *conn)
                    .await?;
            }
            Hold::Shared => {
                sqlx::query!(
                    "SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 3))",
                    key
                )
                .execute(&mut *conn)
                .await?;
            }
        }
        Ok(())
    }

    /// The latest snapshot, then the events after it.
    pub async fn load<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &str,
    ) -> Result<Loaded<A>, StoreError> {
        let mut loaded = self.load_many(conn, &[id.to_string()]).await?;
        Ok(loaded.remove(id).expect("one result per id"))
    }

    /// Events of stream `id` after sequence `after` (at most `limit`), as stored but with
    /// their personal data opened (or redacted) and upcast: for exports and histories.
    pub async fn read_stream<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = sqlx::query!(
            r#"SELECT sequence, event_type, event_version, payload, metadata, recorded_at
               FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3
               ORDER BY sequence LIMIT $4"#,
            A::TYPE,
            id,
            after,
            limit
        )
        .fetch_all(&mut *conn)
        .await?;
        let keys = pii::keys(conn, A::TYPE, &[id.to_string()]).await?;
        rows.into_iter()
            .map(|row| {
                let payload = pii::open_event(&keys, A::TYPE, id, row.payload)?;
                let mut event = SerializedEvent::new(
                    id.to_string(),
                    row.sequence as usize,
                    A::TYPE.to_string(),
                    row.event_type,
                    row.event_version,
                    payload,
                    row.metadata.clone(),
                );
                for upcaster in self.upcasters.iter() {
                    if upcaster.can_upcast(&event.event_type, &event.event_version) {
                        event = upcaster.upcast(event);
                    }
                }
                Ok(StoredEvent {
                    sequence: row.sequence,
                    event_type: event.event_type,
                    recorded_at: row.recorded_at,
                    metadata: serde_json::from_value(row.metadata).unwrap_or_default(),
                    payload: event.payload,
                })
            })
            .collect()
    }

    /// Every event of a stream, upcast, in order.
    pub async fn load_events<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &str,
    ) -> Result<Vec<EventEnvelope<A>>, StoreError> {
        let rows = sqlx::query!(
            r#"SELECT sequence, event_type, event_version, payload, metadata
               FROM events WHERE aggregate_type = $1 AND aggregate_id = $2
               ORDER BY sequence"#,
            A::TYPE,
            id
        )
        .fetch_all(&mut *conn)
        .await?;
        let keys = pii::keys(conn, A::TYPE, &[id.to_string()]).await?;
        rows.into_iter()
            .map(|row| {
                let metadata: HashMap<String, String> =
                    serde_json::from_value(row.metadata.clone()).unwrap_or_default();
                let payload = self.deserialize::<A>(
                    &keys,
                    id,
                    row.sequence,
                    row.event_type,
                    row.event_version,
                    row.payload,
                    row.metadata,
                )?;
                Ok(EventEnvelope {
                    aggregate_id: id.to_string(),
                    sequence: row.sequence as usize,
                    payload,
                    metadata,
                })
            })
            .collect()
    }

    /// The one way a stored event becomes an event: its personal data opened (or redacted
    /// when the stream was erased), then upcast, then decoded.
    #[allow(clippy::too_many_arguments)]
    fn deserialize<A: Aggregate>(
        &self,
        keys: &pii::Keys,
        id: &str,
        sequence: i64,
        event_type: String,
        event_version: String,
        payload: serde_json::Value,
        metadata: serde_json::Value,
    ) -> Result<A::Event, StoreError> {
        let payload = pii::open_event(keys, A::TYPE, id, payload)?;
        let mut event = SerializedEvent::new(
            id.to_string(),
            sequence as usize,
            A::TYPE.to_string(),
            event_type,
            event_version,
            payload,
            metadata,
        );
        for upcaster in self.upcasters.iter() {
            if upcaster.can_upcast(&event.event_type, &event.event_version) {
                event = upcaster.upcast(event);
            }
        }
        Ok(serde_json::from_value(event.payload)?)
    }

    /// Appends `events` to the loaded stream (whose state already includes them: see the
    /// module note) and writes a snapshot when the stream crosses a multiple of
    /// `snapshot_every`. Fails with [`StoreError::Conflict`] if another writer got there
    /// first; the caller's transaction is then unusable and must be rolled back.
    pub async fn append<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        loaded: &mut Loaded<A>,
        events: &[A::Event],
        metadata: &Metadata,
    ) -> Result<Appended, StoreError> {
        let mut written = self
            .append_many(conn, &mut [(loaded, events)], metadata)
            .await?;
        Ok(written.pop().expect("one result per stream"))
    }

    /// Appends to several streams in one statement (one round trip however many), each
    /// with its own concurrency check. Streams are written in id order, so that two
    /// transactions appending to overlapping sets of streams cannot deadlock.
    pub async fn append_many<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        streams: &mut [(&mut Loaded<A>, &[A::Event])],
        metadata: &Metadata,
    ) -> Result<Vec<Appended>, StoreError> {
        self.write(conn, streams, std::slice::from_ref(metadata), &[])
            .await
    }

    /// Appends `events` to the loaded stream, each with its own metadata, and records
    /// `records` (idempotency answers) in the same statement: a write that stands alone
    /// needs no transaction around it. A record whose key was answered by another request
    /// meanwhile fails the whole statement with [`StoreError::Conflict`]. Writes nothing
    /// when given nothing.
    pub async fn append_recorded<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        loaded: &mut Loaded<A>,
        events: &[A::Event],
        metadata: &[Metadata],
        records: &[RecordRow],
    ) -> Result<Appended, StoreError> {
        let mut written = self
            .append_recorded_many(conn, &mut [(loaded, events, metadata, records)])
            .await?;
        Ok(written.pop().expect("one result per stream"))
    }

    /// [`Store::append_recorded`] for several streams in one statement: each stream's
    /// events with their metadata (one per event) and the records that answer for it. The
    /// statement fails whole (a conflict on any stream or record fails them all).
    pub async fn append_recorded_many<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        writes: &mut [RecordedWrite<'_, A>],
    ) -> Result<Vec<Appended>, StoreError> {
        let metadata: Vec<Metadata> = writes
            .iter()
            .flat_map(|(_, events, metadata, _)| {
                debug_assert_eq!(events.len(), metadata.len());
                metadata.iter().cloned()
            })
            .collect();
        let records: Vec<(usize, &RecordRow)> = writes
            .iter()
            .enumerate()
            .flat_map(|(i, (_, _, _, records))| records.iter().map(move |r| (i, r)))
            .collect();
        let mut streams: Vec<(&mut Loaded<A>, &[A::Event])> = writes
            .iter_mut()
            .map(|(loaded, events, _, _)| (&mut **loaded, *events))
            .collect();
        self.write(conn, &mut streams, &metadata, &records).await
    }

    /// Refuses an event larger than [`MAX_EVENT_BYTES`] before anything is written.
    pub fn check_sizes<A: Aggregate>(events: &[A::Event]) -> Result<(), StoreError> {
        for e in events {
            check_size(serde_json::to_string(e)?.len())?;
        }
        Ok(())
    }

    /// [`Store::append_many`] and [`Store::append_recorded_many`]: `metadata` is one for
    /// every event, or one per event in the order of `streams`; each record with the index
    /// in `streams` of the stream it answers for.
    async fn write<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        streams: &mut [(&mut Loaded<A>, &[A::Event])],
        metadata: &[Metadata],
        records: &[(usize, &RecordRow)],
    ) -> Result<Vec<Appended>, StoreError> {
        // Where each stream's events start in the order given (for their metadata).
        let mut offsets = Vec::with_capacity(streams.len());
        let mut offset = 0;
        for (_, events) in streams.iter() {
            offsets.push(offset);
            offset += events.len();
        }
        let metadata: Vec<serde_json::Value> = metadata
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?;
        let mut metadatas = Vec::new();
        let mut order: Vec<usize> = (0..streams.len()).collect();
        order.sort_by(|a, b| streams[*a].0.id.cmp(&streams[*b].0.id));
        let total: usize = streams.iter().map(|(_, e)| e.len()).sum();
        let mut ids = Vec::with_capacity(total);
        let mut sequences = Vec::with_capacity(total);
        let mut types = Vec::with_capacity(total);
        let mut versions = Vec::with_capacity(total);
        let mut payloads = Vec::with_capacity(total);
        // Bytes appended to each stream (by its index in `streams`), for snapshots by size.
        let mut bytes = vec![0u64; streams.len()];
        let mut values = Vec::with_capacity(total);
        for &i in &order {
            let (loaded, events) = &streams[i];
            for (k, e) in events.iter().enumerate() {
                ids.push(loaded.id.clone());
                metadatas.push(if metadata.len() == 1 {
                    metadata[0].clone()
                } else {
                    metadata[offsets[i] + k].clone()
                });
                sequences.push((loaded.version + 1 + k as u64) as i64);
                types.push(e.event_type());
                versions.push(e.event_version());
                let value = serde_json::to_value(e)?;
                check_size(serde_json::to_string(&value)?.len())?;
                values.push((i, value));
            }
        }
        // Personal data is sealed under each stream's data key (made on its first write).
        let mut keyed: Vec<String> = values
            .iter()
            .filter(|(_, v)| pii::SEALING && pii::event_needs_key(A::TYPE, v))
            .map(|(i, _)| streams[*i].0.id.clone())
            .collect();
        keyed.dedup();
        let mut new_keys = pii::NewKeys::default();
        let data_keys = if keyed.is_empty() {
            HashMap::new()
        } else {
            // A stream whose write starts a new life (its erased email created again) gets
            // the next generation of its key.
            let renew: Vec<String> = streams
                .iter()
                .filter(|(_, events)| {
                    events
                        .iter()
                        .any(|e| pii::NEW_LIFE_EVENTS.contains(&e.event_type().as_str()))
                })
                .map(|(l, _)| l.id.clone())
                .collect();
            let loaded_keys: HashMap<&str, Option<&pii::Generations>> = streams
                .iter()
                .map(|(l, _)| (l.id.as_str(), l.keys.as_ref()))
                .collect();
            let known: Option<Vec<(String, pii::Generations)>> = keyed
                .iter()
                .map(|id| {
                    loaded_keys
                        .get(id.as_str())
                        .copied()
                        .flatten()
                        .map(|g| (id.clone(), g.clone()))
                })
                .collect();
            // A destroyed key otherwise: the stream was erased by a writer that got there
            // first.
            let destroyed = |e| match e {
                pii::PiiError::Destroyed => StoreError::Conflict,
                other => other.into(),
            };
            match known {
                // The load read the keys: new ones are stored by the insert of the events.
                Some(known) => {
                    let (chosen, made) = pii::plan_write_keys(&known, &renew).map_err(destroyed)?;
                    new_keys = made;
                    chosen
                }
                None => pii::keys_for_writing(conn, &keyed, &renew)
                    .await
                    .map_err(destroyed)?,
            }
        };
        for (n, (i, mut value)) in values.into_iter().enumerate() {
            if let Some(key) = data_keys.get(&ids[n]) {
                pii::seal_event(key, A::TYPE, &ids[n], &mut value);
            }
            let payload = serde_json::to_string(&value)?;
            bytes[i] += payload.len() as u64;
            payloads.push(payload);
        }
        let mut positions: HashMap<(String, i64), Position> = HashMap::with_capacity(total);
        if total > 0 || !records.is_empty() {
            let mut record_ids = Vec::with_capacity(records.len());
            let mut record_sequences = Vec::with_capacity(records.len());
            let mut record_headers = Vec::with_capacity(records.len());
            let mut record_subjects = Vec::with_capacity(records.len());
            for (stream, r) in records {
                record_ids.push(
                    streams
                        .get(*stream)
                        .map(|(l, _)| l.id.clone())
                        .unwrap_or_default(),
                );
                record_sequences.push(r.names_sequence.map(|s| s as i64));
                record_headers.push(r.headers.to_string());
                // One text a record, space-separated: a parameter cannot be an array of
                // arrays of different lengths (split back in the statement).
                record_subjects.push(
                    r.subjects
                        .iter()
                        .map(uuid::Uuid::to_string)
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            }
            let records: Vec<&RecordRow> = records.iter().map(|(_, r)| *r).collect();
            // The data keys made for this write go in with its first events: a writer that
            // made one first also appended at these sequences, so either clash is a
            // conflict. The answers go in with the events they answer for, each naming
            // the position of the event its reply names; a key answered meanwhile by
            // another request fails the statement (`leadledger_require_recorded`).
            let rows = sqlx::query!(
                r#"WITH made AS (
                       INSERT INTO contact_keys (contact_id, generation, wrapped_key)
                       SELECT * FROM UNNEST($8::text[], $9::int4[], $10::bytea[])
                   ), ins AS (
                       INSERT INTO events
                           (aggregate_type, aggregate_id, sequence, event_type, event_version,
                            payload, metadata)
                       SELECT $1, u.aggregate_id, u.sequence, u.event_type, u.event_version,
                              u.payload, u.metadata
                       FROM UNNEST($2::text[], $3::bigint[], $4::text[], $5::text[],
                                   $6::text[]::jsonb[], $7::jsonb[])
                            AS u(aggregate_id, sequence, event_type, event_version, payload,
                                 metadata)
                       RETURNING aggregate_id, sequence, position, transaction_id
                   ), rec AS (
                       INSERT INTO idempotency_records
                           (api_key_id, idempotency_key, request_hash, response_status,
                            response_body, response_headers, response_transaction_id,
                            response_position, subjects)
                       SELECT r.api_key_id, r.idempotency_key, r.request_hash, r.status,
                              r.body, r.headers, i.transaction_id, i.position,
                              string_to_array(r.subjects, ' ')::uuid[]
                       FROM UNNEST($11::uuid[], $12::text[], $13::bytea[], $14::int2[],
                                   $15::bytea[], $16::text[]::jsonb[], $17::text[],
                                   $18::bigint[], $19::text[])
                            AS r(api_key_id, idempotency_key, request_hash, status, body,
                                 headers, aggregate_id, sequence, subjects)
                       LEFT JOIN ins i
                         ON i.aggregate_id = r.aggregate_id AND i.sequence = r.sequence
                       ON CONFLICT (api_key_id, idempotency_key) DO UPDATE
                       SET request_hash = EXCLUDED.request_hash,
                           response_status = EXCLUDED.response_status,
                           response_body = EXCLUDED.response_body,
                           response_headers = EXCLUDED.response_headers,
                           response_transaction_id = EXCLUDED.response_transaction_id,
                           response_position = EXCLUDED.response_position,
                           subjects = EXCLUDED.subjects
                       WHERE idempotency_records.response_status IS NULL
                       RETURNING 1
                   )
                   SELECT i.aggregate_id AS "aggregate_id?", i.sequence AS "sequence?",
                          i.position AS "position?",
                          i.transaction_id::text AS "transaction_id?",
                          leadledger_require_recorded(cardinality($11::uuid[]),
                                                      (SELECT count(*) FROM rec))
                              AS "recorded!"
                   FROM (SELECT 1) AS one
                   LEFT JOIN ins i ON true"#,
                A::TYPE,
                &ids,
                &sequences,
                &types,
                &versions,
                &payloads,
                &metadatas,
                &new_keys.ids,
                &new_keys.generations,
                &new_keys.wrapped,
                &records.iter().map(|r| r.api_key_id).collect::<Vec<_>>(),
                &records.iter().map(|r| r.key.clone()).collect::<Vec<_>>(),
                &records
                    .iter()
                    .map(|r| r.request_hash.clone())
                    .collect::<Vec<_>>(),
                &records.iter().map(|r| r.status).collect::<Vec<_>>(),
                &records.iter().map(|r| r.body.clone()).collect::<Vec<_>>(),
                &record_headers,
                &record_ids,
                &record_sequences as &[Option<i64>],
                &record_subjects
            )
            .fetch_all(&mut *conn)
            .await
            .map_err(StoreError::from_insert)?;
            for row in rows {
                if let (Some(id), Some(sequence), Some(position), Some(transaction_id)) = (
                    row.aggregate_id,
                    row.sequence,
                    row.position,
                    row.transaction_id,
                ) {
                    positions.insert((id, sequence), Position::stored(&transaction_id, position)?);
                }
            }
        }
        let mut results = Vec::with_capacity(streams.len());
        for (i, (loaded, events)) in streams.iter_mut().enumerate() {
            let old_version = loaded.version;
            let mut written = Vec::with_capacity(events.len());
            for k in 0..events.len() as u64 {
                let sequence = old_version + 1 + k;
                let position = positions
                    .get(&(loaded.id.clone(), sequence as i64))
                    .copied()
                    .ok_or_else(|| {
                        StoreError::Database(sqlx::Error::Protocol(
                            "an appended event was not returned".into(),
                        ))
                    })?;
                written.push((sequence, position));
            }
            loaded.version = old_version + events.len() as u64;
            if let (Some(generations), Some(key)) = (&loaded.keys, data_keys.get(&loaded.id)) {
                loaded.keys = Some(generations.with_written(key));
            }
            if let Some((_, last)) = written.last() {
                loaded.last_position = Some(*last);
            }
            loaded.unsnapshotted_bytes += bytes[i];
            if self.snapshot_every > 0
                && (loaded.version / self.snapshot_every > old_version / self.snapshot_every
                    || (!events.is_empty() && loaded.unsnapshotted_bytes >= SNAPSHOT_BYTES))
            {
                // A snapshot only saves later loads work: the events are written whether or
                // not it is (in a transaction, a failed one fails the commit after it).
                match self.write_snapshot(conn, loaded).await {
                    Ok(()) => loaded.unsnapshotted_bytes = 0,
                    Err(e) => tracing::warn!(
                        aggregate_type = A::TYPE,
                        error = %e,
                        "snapshot not written; the next load replays further"
                    ),
                }
            }
            results.push(Appended {
                version: loaded.version,
                events: written,
            });
        }
        Ok(results)
    }

    /// Loads several streams at once: one statement however many (for bulk commands).
    pub async fn load_many<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        ids: &[String],
    ) -> Result<HashMap<String, Loaded<A>>, StoreError> {
        // One statement, so one round trip and one snapshot of the database: the latest
        // snapshot of each stream, the events after it and (for personal data) the data
        // keys. A key commits with the first event sealed under it, and an erasure's
        // destroyed key with its `ContactErased`, so every sealed event read has its key
        // as of the same moment.
        let parts = sqlx::query_as!(
            LoadPart,
            r#"WITH s AS (
                   SELECT aggregate_id, last_sequence, last_position, last_transaction_id,
                          payload
                   FROM snapshots
                   WHERE $3 AND aggregate_type = $1 AND aggregate_id = ANY($2)
               )
               SELECT 0 AS "kind!", s.aggregate_id AS "aggregate_id!",
                      s.last_sequence AS "sequence!", NULL::text AS event_type,
                      NULL::text AS event_version, s.payload, NULL::jsonb AS metadata,
                      s.last_position AS position,
                      s.last_transaction_id::text AS transaction_id,
                      0::bigint AS bytes, NULL::bytea AS wrapped_key,
                      NULL::bytea AS request_hash
               FROM s
               UNION ALL
               SELECT 1, e.aggregate_id, e.sequence, e.event_type, e.event_version,
                      e.payload, e.metadata, e.position, e.transaction_id::text,
                      octet_length(e.payload::text)::bigint, NULL, NULL
               FROM UNNEST($2::text[]) AS u(id)
               LEFT JOIN s ON s.aggregate_id = u.id
               -- Per stream, through its index: a join the planner may turn into a scan of
               -- every event of the type (a generic plan made while the log was small).
               CROSS JOIN LATERAL (
                   SELECT e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload,
                          e.metadata, e.position, e.transaction_id
                   FROM events e
                   WHERE e.aggregate_type = $1 AND e.aggregate_id = u.id
                     AND e.sequence > coalesce(s.last_sequence, 0)
                   ORDER BY e.sequence
               ) e
               UNION ALL
               SELECT 2, k.contact_id, k.generation, NULL, NULL, NULL, NULL, NULL, NULL,
                      0, k.wrapped_key, NULL
               FROM contact_keys k
               WHERE $4 AND k.contact_id = ANY($2)
               ORDER BY 1, 2, 3"#,
            A::TYPE,
            ids,
            self.snapshot_every > 0,
            pii::is_personal(A::TYPE),
        )
        .fetch_all(&mut *conn)
        .await?;
        Ok(self.assemble(conn, ids, parts).await?.0)
    }

    /// One stream, as [`Store::load_many`] loads it, with the answer recorded for `key`
    /// (an idempotency key) read in the same statement: a command's first round trip.
    /// `None` for the answer: no key given, or no record of it.
    pub async fn load_answering<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &str,
        key: Option<&Claim<'_>>,
    ) -> Result<(Loaded<A>, Option<StoredAnswer>), StoreError> {
        let mut loaded = self.load_answering_many::<A>(conn, &[(id, key)]).await?;
        Ok(loaded.remove(id).expect("one result per id"))
    }

    /// [`Store::load_answering`] for several streams (each named once) in one statement,
    /// each with the answer recorded for its own key. The statement is the function
    /// `leadledger_load_answering`, which keeps one generic plan per connection: as a
    /// prepared statement of its own, skewed statistics made PostgreSQL plan it again for
    /// every execution's values, which took longer than running it.
    pub async fn load_answering_many<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        streams: &[(&str, Option<&Claim<'_>>)],
    ) -> Result<HashMap<String, (Loaded<A>, Option<StoredAnswer>)>, StoreError> {
        let ids: Vec<String> = streams.iter().map(|(id, _)| id.to_string()).collect();
        let keys: Vec<Option<String>> = streams
            .iter()
            .map(|(_, c)| c.map(|c| c.key.to_string()))
            .collect();
        let owners: Vec<Option<uuid::Uuid>> = streams
            .iter()
            .map(|(_, c)| c.map(|c| c.api_key_id))
            .collect();
        let parts = sqlx::query_as!(
            LoadPart,
            r#"SELECT kind AS "kind!", aggregate_id AS "aggregate_id!", sequence AS "sequence!",
                      event_type, event_version, payload, metadata, position, transaction_id,
                      bytes, wrapped_key, request_hash
               FROM leadledger_load_answering($1, $2, $3, $4, $5, $6)
               ORDER BY 1, 2, 3"#,
            A::TYPE,
            &ids,
            self.snapshot_every > 0,
            pii::is_personal(A::TYPE),
            &keys as &[Option<String>],
            &owners as &[Option<uuid::Uuid>]
        )
        .fetch_all(&mut *conn)
        .await?;
        let (loaded, mut answers) = self.assemble(conn, &ids, parts).await?;
        Ok(loaded
            .into_iter()
            .map(|(id, l)| {
                let answer = answers.remove(&id);
                (id, (l, answer))
            })
            .collect())
    }

    /// The streams `ids` from the rows of a load's statement (and the answers it read, by
    /// stream).
    async fn assemble<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        ids: &[String],
        parts: Vec<LoadPart>,
    ) -> Result<(HashMap<String, Loaded<A>>, HashMap<String, StoredAnswer>), StoreError> {
        let mut loaded: HashMap<String, Loaded<A>> = ids
            .iter()
            .map(|id| (id.clone(), Loaded::unwritten(id)))
            .collect();
        let mut snapshot_rows = Vec::new();
        let mut rows = Vec::new();
        let mut key_rows = Vec::new();
        let mut answers = HashMap::new();
        for part in parts {
            match part.kind {
                3 => {
                    let answer = StoredAnswer {
                        request_hash: part.request_hash.unwrap_or_default(),
                        status: (part.sequence >= 0).then_some(part.sequence as i16),
                        body: part.wrapped_key.unwrap_or_default(),
                        headers: part.payload.unwrap_or_default(),
                        position: stored_position(part.transaction_id, part.position)?,
                    };
                    answers.insert(part.aggregate_id, answer);
                }
                0 => snapshot_rows.push(SnapshotRow {
                    aggregate_id: part.aggregate_id,
                    last_sequence: part.sequence,
                    last_position: part.position.unwrap_or_default(),
                    last_transaction_id: part.transaction_id.unwrap_or_default(),
                    payload: part.payload.unwrap_or_default(),
                }),
                1 => rows.push(EventRow {
                    aggregate_id: part.aggregate_id,
                    sequence: part.sequence,
                    event_type: part.event_type.unwrap_or_default(),
                    event_version: part.event_version.unwrap_or_default(),
                    payload: part.payload.unwrap_or_default(),
                    metadata: part.metadata.unwrap_or_default(),
                    position: part.position.unwrap_or_default(),
                    transaction_id: part.transaction_id.unwrap_or_default(),
                    bytes: part.bytes.unwrap_or_default(),
                }),
                _ => key_rows.push((part.aggregate_id, part.sequence as i32, part.wrapped_key)),
            }
        }
        let keys = pii::Keys::from_rows(key_rows)?;
        if pii::is_personal(A::TYPE) {
            for (id, l) in loaded.iter_mut() {
                l.keys = Some(keys.generations(id));
            }
        }
        let after = |skip: &HashMap<&str, i64>| -> Vec<i64> {
            ids.iter()
                .map(|id| skip.get(id.as_str()).copied().unwrap_or(0))
                .collect()
        };
        let mut unreadable = false;
        for s in snapshot_rows.iter() {
            let Some(l) = loaded.get_mut(&s.aggregate_id) else {
                continue;
            };
            // A snapshot of an erased stream cannot be opened: replay instead.
            let state = pii::open_state(&keys, A::TYPE, &s.aggregate_id, s.payload.clone())?;
            match state.map(serde_json::from_value::<A>) {
                Some(Ok(aggregate)) => {
                    l.aggregate = aggregate;
                    l.version = s.last_sequence as u64;
                    l.last_position =
                        Some(Position::stored(&s.last_transaction_id, s.last_position)?);
                }
                // A snapshot of an older shape of the state: replay instead; the next
                // snapshot written replaces it.
                Some(Err(e)) => {
                    unreadable = true;
                    tracing::warn!(
                        aggregate_type = A::TYPE,
                        error = %e,
                        "snapshot unreadable; replaying the whole stream"
                    );
                }
                None => unreadable = true,
            }
        }
        // A snapshot that could not be used: read its stream's events from the start.
        if unreadable {
            let versions: HashMap<&str, i64> = loaded
                .iter()
                .map(|(id, l)| (id.as_str(), l.version as i64))
                .collect();
            rows = Self::events_after::<A>(conn, ids, &after(&versions)).await?;
        }
        for row in rows {
            if loaded
                .get(&row.aggregate_id)
                .is_some_and(|l| row.sequence as u64 <= l.version)
            {
                continue;
            }
            let event: A::Event = self.deserialize::<A>(
                &keys,
                &row.aggregate_id,
                row.sequence,
                row.event_type,
                row.event_version,
                row.payload,
                row.metadata,
            )?;
            if let Some(l) = loaded.get_mut(&row.aggregate_id) {
                l.unsnapshotted_bytes += row.bytes as u64;
                l.aggregate.apply(event);
                l.version = row.sequence as u64;
                l.last_position = Some(Position::stored(&row.transaction_id, row.position)?);
            }
        }
        Ok((loaded, answers))
    }

    /// The events of streams `ids` after the sequence `after` gives each, in order.
    async fn events_after<A: Aggregate>(
        conn: &mut PgConnection,
        ids: &[String],
        after: &[i64],
    ) -> Result<Vec<EventRow>, StoreError> {
        Ok(sqlx::query_as!(
            EventRow,
            r#"SELECT e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload,
                      e.metadata, e.position, e.transaction_id::text AS "transaction_id!",
                      octet_length(e.payload::text)::bigint AS "bytes!"
               FROM UNNEST($2::text[], $3::bigint[]) AS u(id, after)
               JOIN events e
                 ON e.aggregate_type = $1 AND e.aggregate_id = u.id AND e.sequence > u.after
               ORDER BY e.aggregate_id, e.sequence"#,
            A::TYPE,
            ids,
            after
        )
        .fetch_all(&mut *conn)
        .await?)
    }

    async fn write_snapshot<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        loaded: &Loaded<A>,
    ) -> Result<(), StoreError> {
        let Some(last) = loaded.last_position else {
            return Ok(());
        };
        let mut payload = serde_json::to_value(&loaded.aggregate)?;
        if pii::is_personal(A::TYPE) && pii::SEALING {
            // An erased stream keeps no snapshot (its key is gone; its state is empty).
            // The key the write just used, as the load and the append left it; read (or
            // made) only for a stream loaded without its keys.
            let known = match loaded.keys.as_ref().map(pii::Generations::write_key) {
                Some(Ok(key)) => key,
                Some(Err(pii::PiiError::Destroyed)) => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                None => None,
            };
            let key = match known {
                Some(key) => key,
                None => {
                    match pii::keys_for_writing(conn, std::slice::from_ref(&loaded.id), &[]).await {
                        Ok(mut keys) => match keys.remove(&loaded.id) {
                            Some(key) => key,
                            None => return Ok(()),
                        },
                        Err(pii::PiiError::Destroyed) => return Ok(()),
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            pii::seal_state(&key, A::TYPE, &loaded.id, &mut payload);
        }
        sqlx::query!(
            r#"INSERT INTO snapshots
                   (aggregate_type, aggregate_id, last_sequence, last_position,
                    last_transaction_id, payload)
               VALUES ($1, $2, $3, $4, $5::text::xid8, $6)
               ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
               SET last_sequence = EXCLUDED.last_sequence, last_position = EXCLUDED.last_position,
                   last_transaction_id = EXCLUDED.last_transaction_id, payload = EXCLUDED.payload,
                   recorded_at = now()
               WHERE snapshots.last_sequence < EXCLUDED.last_sequence"#,
            A::TYPE,
            loaded.id,
            loaded.version as i64,
            last.position,
            last.transaction_id.to_string(),
            payload
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// cqrs-es's `EventStore` on [`Store`]: each commit is one transaction of its own.
pub struct PgEventStore<A> {
    pool: PgPool,
    store: Store,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A> PgEventStore<A> {
    pub fn new(pool: PgPool, store: Store) -> Self {
        Self {
            pool,
            store,
            _aggregate: PhantomData,
        }
    }
}

fn aggregate_error<E: std::error::Error>(e: StoreError) -> AggregateError<E> {
    match e {
        StoreError::Conflict => AggregateError::AggregateConflict,
        StoreError::Deserialize(e) => AggregateError::DeserializationError(Box::new(e)),
        StoreError::Database(e) => AggregateError::DatabaseConnectionError(Box::new(e)),
        other @ (StoreError::EventTooLarge { .. } | StoreError::Pii(_)) => {
            AggregateError::UnexpectedError(Box::new(other))
        }
    }
}

impl<A: Aggregate> cqrs_es::EventStore<A> for PgEventStore<A> {
    type AC = Loaded<A>;

    async fn load_events(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| aggregate_error(e.into()))?;
        self.store
            .load_events(&mut conn, aggregate_id)
            .await
            .map_err(aggregate_error)
    }

    async fn load_aggregate(
        &self,
        aggregate_id: &str,
    ) -> Result<Loaded<A>, AggregateError<A::Error>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| aggregate_error(e.into()))?;
        self.store
            .load(&mut conn, aggregate_id)
            .await
            .map_err(aggregate_error)
    }

    async fn commit(
        &self,
        events: Vec<A::Event>,
        mut context: Loaded<A>,
        metadata: HashMap<String, String>,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        let metadata_struct = Metadata::from_map(&metadata);
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| aggregate_error(e.into()))?;
        let appended = self
            .store
            .append(&mut tx, &mut context, &events, &metadata_struct)
            .await
            .map_err(aggregate_error)?;
        tx.commit().await.map_err(|e| aggregate_error(e.into()))?;
        let stored_metadata = metadata_struct.to_map();
        Ok(events
            .into_iter()
            .zip(appended.events)
            .map(|(payload, (sequence, _))| EventEnvelope {
                aggregate_id: context.id.clone(),
                sequence: sequence as usize,
                payload,
                metadata: stored_metadata.clone(),
            })
            .collect())
    }
}
