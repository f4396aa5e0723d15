//! The global feed: every event in commit order, without gaps.
//!
//! Positions come from a sequence at insert time, so a transaction that started first may
//! commit last with a lower position. Reading "events after position P" would skip it. The
//! feed therefore orders by (writing transaction id, position) and reads only transactions
//! older than every transaction still running (`pg_snapshot_xmin`): those are all finished,
//! and any transaction that commits later has a larger id than everything already read.
//! Nothing is skipped, nothing is read twice, and no timeout guesses at gaps.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use cqrs_es::persist::SerializedEvent;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::PgConnection;

/// A place in the feed: the writing transaction and the event's position.
/// Clients see it as an opaque string, `"<transaction>-<position>"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub transaction_id: i64,
    pub position: i64,
}

impl Position {
    /// A position as stored: the `xid8` as text (PostgreSQL's form) and the position.
    pub fn stored(transaction_id: &str, position: i64) -> Result<Self, sqlx::Error> {
        Ok(Self {
            transaction_id: parse_xid(transaction_id)?,
            position,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.transaction_id, self.position)
    }
}

impl FromStr for Position {
    type Err = InvalidPosition;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (xid, pos) = s.split_once('-').ok_or(InvalidPosition)?;
        let parse = |t: &str| {
            (!t.is_empty() && t.len() <= 19 && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse::<i64>().ok())
                .flatten()
                .ok_or(InvalidPosition)
        };
        Ok(Self {
            transaction_id: parse(xid)?,
            position: parse(pos)?,
        })
    }
}

impl Serialize for Position {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a position token")]
pub struct InvalidPosition;

/// Parses PostgreSQL's text form of an `xid8`.
pub fn parse_xid(text: &str) -> Result<i64, sqlx::Error> {
    text.parse::<i64>()
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// One event as the feed delivers it, already upcast to the current version.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedEvent {
    pub at: Position,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Payload,
    pub metadata: serde_json::Value,
    pub recorded_at: DateTime<Utc>,
}

impl FeedEvent {
    /// The payload as `E`, the event enum of the aggregate named `aggregate_type`.
    pub fn decode<E: DeserializeOwned>(&self) -> Result<E, serde_json::Error> {
        self.payload.decode()
    }
}

/// An event's payload as the feed delivers it: its JSON text as stored, decoded straight
/// into the type each reader wants (no `serde_json::Value` tree to build and drop for
/// every event; personal data opened into the text), or the tree that upcasting it made.
#[derive(Clone)]
pub struct Payload(Form);

#[derive(Clone)]
enum Form {
    Text(Box<str>),
    Tree(Value),
}

impl Payload {
    /// The payload as `E`.
    pub fn decode<E: DeserializeOwned>(&self) -> Result<E, serde_json::Error> {
        match &self.0 {
            Form::Text(text) => serde_json::from_str(text),
            // Straight from the borrowed tree: copying it first cost more than decoding.
            Form::Tree(tree) => E::deserialize(tree),
        }
    }

    /// The payload as a JSON tree.
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        match &self.0 {
            Form::Text(text) => serde_json::from_str(text),
            Form::Tree(tree) => Ok(tree.clone()),
        }
    }
}

impl From<Value> for Payload {
    fn from(tree: Value) -> Self {
        Self(Form::Tree(tree))
    }
}

impl fmt::Display for Payload {
    /// Compact JSON, the same for both forms.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_value() {
            Ok(tree) => tree.fmt(f),
            Err(e) => write!(f, "<unreadable payload: {e}>"),
        }
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl PartialEq for Payload {
    /// Equal as JSON values, whatever their forms.
    fn eq(&self, other: &Self) -> bool {
        match (self.to_value(), other.to_value()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

/// Up to `limit` events after `after`, in commit order.
pub async fn read(
    conn: &mut PgConnection,
    after: Position,
    limit: i64,
) -> Result<Vec<FeedEvent>, sqlx::Error> {
    read_opening(conn, after, limit, &|_, _| true).await
}

/// [`read`] for readers that need only some events' personal data: an event of a personal
/// type is opened when `opens(aggregate_type, event_type)` says so, and is otherwise
/// delivered as stored (its personal members sealed, its other members as they are).
pub async fn read_opening(
    conn: &mut PgConnection,
    after: Position,
    limit: i64,
    opens: &(dyn Fn(&str, &str) -> bool + Sync),
) -> Result<Vec<FeedEvent>, sqlx::Error> {
    let rows = read_sealed(conn, after, limit).await?;
    upcast_all(conn, rows.0, opens).await
}

/// Events as stored: personal data still sealed, not yet upcast (see [`open`]).
pub struct Sealed(Vec<Row>);

impl Sealed {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Where the last of them stands.
    pub fn last(&self) -> Result<Option<Position>, sqlx::Error> {
        self.0
            .last()
            .map(|r| Position::stored(&r.transaction_id, r.position))
            .transpose()
    }
}

/// [`read`] in two steps, so that a reader can fetch the next events while it opens these
/// (on another connection).
pub async fn read_sealed(
    conn: &mut PgConnection,
    after: Position,
    limit: i64,
) -> Result<Sealed, sqlx::Error> {
    let rows = sqlx::query_as!(
        Row,
        r#"SELECT position, transaction_id::text AS "transaction_id!", aggregate_type, aggregate_id,
                  sequence, event_type, event_version,
                  payload::text AS "payload!", metadata, recorded_at
           FROM events
           WHERE (transaction_id, position) > ($1::text::xid8, $2)
             AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
           ORDER BY transaction_id, position
           LIMIT $3"#,
        after.transaction_id.to_string(),
        after.position,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(Sealed(rows))
}

/// [`read_sealed`]'s statement as a binary `COPY`. `COPY` takes no parameters, so the
/// statement is constant and reads its bounds from settings of the session, which
/// [`copy_sealed_without_metadata`] sets first. The output's transaction id is named `xid`:
/// under its own name the `ORDER BY` would sort its text instead of the `xid8`.
const FEED_COPY: &str = "COPY (
    SELECT position, transaction_id::text AS xid, aggregate_type, aggregate_id, sequence,
           event_type, event_version, payload::text, recorded_at
    FROM events
    WHERE (transaction_id, position) > (current_setting('leadledger.feed_after_transaction')::xid8,
                                        current_setting('leadledger.feed_after_position')::bigint)
      AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY transaction_id, position
    LIMIT current_setting('leadledger.feed_limit')::bigint
) TO STDOUT (FORMAT binary)";

/// [`read_sealed`] for a rebuild: the events without their metadata (`null`), which no
/// projection reads (who acted and why is for the log's other readers; producing it as
/// text and parsing it into a tree is work a rebuild would do for every event), read by a
/// binary `COPY`: its rows come as one stream of fields instead of a result row each to
/// decode column by column (over a million events, about 0.4 of the 1.1 CPU seconds the
/// rebuild process spent reading the feed by the query).
pub async fn copy_sealed_without_metadata(
    conn: &mut PgConnection,
    after: Position,
    limit: i64,
) -> Result<Sealed, sqlx::Error> {
    sqlx::query!(
        "SELECT set_config('leadledger.feed_after_transaction', $1, false) AS after_transaction,
                set_config('leadledger.feed_after_position', $2, false) AS after_position,
                set_config('leadledger.feed_limit', $3, false) AS limit",
        after.transaction_id.to_string(),
        after.position.to_string(),
        limit.to_string()
    )
    .fetch_one(&mut *conn)
    .await?;
    let data = crate::copy::copy_out(conn, FEED_COPY).await?;
    let mut tuples = crate::copy::Tuples::new(&data)?;
    let mut rows = Vec::with_capacity(usize::try_from(limit).unwrap_or(0).min(1 << 16));
    while tuples.next_row(9)? {
        rows.push(Row {
            position: tuples.int8()?,
            transaction_id: tuples.text()?,
            aggregate_type: tuples.text()?,
            aggregate_id: tuples.text()?,
            sequence: tuples.int8()?,
            event_type: tuples.text()?,
            event_version: tuples.text()?,
            payload: tuples.text()?,
            metadata: Value::Null,
            recorded_at: tuples.timestamptz()?,
        });
    }
    Ok(Sealed(rows))
}

/// Events read by [`read_sealed`], opened and upcast.
pub async fn open(conn: &mut PgConnection, rows: Sealed) -> Result<Vec<FeedEvent>, sqlx::Error> {
    upcast_all(conn, rows.0, &|_, _| true).await
}

/// Up to `limit` events after `after` and up to `until` included, in commit order.
/// `until` must be a position the feed has delivered (a checkpoint): everything before it
/// had committed when it was read, so no transaction-horizon condition is needed and this
/// may run inside a transaction that holds its own id.
pub async fn read_until(
    conn: &mut PgConnection,
    after: Position,
    until: Position,
    limit: i64,
) -> Result<Vec<FeedEvent>, sqlx::Error> {
    let rows = sqlx::query_as!(
        Row,
        r#"SELECT position, transaction_id::text AS "transaction_id!", aggregate_type, aggregate_id,
                  sequence, event_type, event_version,
                  payload::text AS "payload!", metadata, recorded_at
           FROM events
           WHERE (transaction_id, position) > ($1::text::xid8, $2)
             AND (transaction_id, position) <= ($3::text::xid8, $4)
           ORDER BY transaction_id, position
           LIMIT $5"#,
        after.transaction_id.to_string(),
        after.position,
        until.transaction_id.to_string(),
        until.position,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    upcast_all(conn, rows, &|_, _| true).await
}

/// Rows opened (personal data, through [`crate::pii`], for the events `opens` names) and
/// upcast, in order.
async fn upcast_all(
    conn: &mut PgConnection,
    rows: Vec<Row>,
    opens: &(dyn Fn(&str, &str) -> bool + Sync),
) -> Result<Vec<FeedEvent>, sqlx::Error> {
    let opened: Vec<bool> = rows
        .iter()
        .map(|r| {
            crate::pii::is_personal(&r.aggregate_type) && opens(&r.aggregate_type, &r.event_type)
        })
        .collect();
    let mut personal: Vec<String> = rows
        .iter()
        .zip(&opened)
        .filter(|(_, open)| **open)
        .map(|(r, _)| r.aggregate_id.clone())
        .collect();
    personal.sort();
    personal.dedup();
    let keys = crate::pii::keys(conn, crate::pii::PERSONAL_TYPES[0], &personal)
        .await
        .map_err(pii_error)?;
    rows.into_iter()
        .zip(opened)
        .map(|(r, open)| r.upcast(open.then_some(&keys)))
        .collect()
}

fn pii_error(e: crate::pii::PiiError) -> sqlx::Error {
    match e {
        crate::pii::PiiError::Database(e) => e,
        other => sqlx::Error::Decode(Box::new(other)),
    }
}

/// A row of `events` as read.
struct Row {
    position: i64,
    transaction_id: String,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    /// jsonb's text: valid JSON by construction, so not parsed to be checked.
    payload: String,
    metadata: serde_json::Value,
    recorded_at: DateTime<Utc>,
}

impl Row {
    /// Opened with `keys` (`None`: delivered as stored) and upcast.
    fn upcast(self, keys: Option<&crate::pii::Keys>) -> Result<FeedEvent, sqlx::Error> {
        let at = Position::stored(&self.transaction_id, self.position)?;
        // An upcaster that takes the stored type and version starts the chain; without
        // one, and with nothing to open, the payload goes on as stored.
        let upcast = upcasters()
            .iter()
            .any(|u| u.can_upcast(&self.event_type, &self.event_version));
        // Opened in its text when it can be (see `pii::open_event_text`); otherwise as a tree.
        let stored = match keys {
            None if !upcast => Ok(self.payload.into_boxed_str()),
            Some(keys) if !upcast => crate::pii::open_event_text(
                keys,
                &self.aggregate_type,
                &self.aggregate_id,
                &self.payload,
            )
            .map_err(pii_error)?
            .map(String::into_boxed_str)
            .ok_or(self.payload),
            _ => Err(self.payload),
        };
        let stored = match stored {
            Ok(text) => {
                return Ok(FeedEvent {
                    at,
                    aggregate_type: self.aggregate_type,
                    aggregate_id: self.aggregate_id,
                    sequence: self.sequence,
                    event_type: self.event_type,
                    event_version: self.event_version,
                    payload: Payload(Form::Text(text)),
                    metadata: self.metadata,
                    recorded_at: self.recorded_at,
                });
            }
            Err(stored) => stored,
        };
        let mut tree: Value =
            serde_json::from_str(&stored).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        if let Some(keys) = keys {
            tree = crate::pii::open_event(keys, &self.aggregate_type, &self.aggregate_id, tree)
                .map_err(pii_error)?;
        }
        let mut serialized = SerializedEvent::new(
            self.aggregate_id,
            self.sequence as usize,
            self.aggregate_type,
            self.event_type,
            self.event_version,
            tree,
            self.metadata,
        );
        for u in upcasters().iter() {
            if u.can_upcast(&serialized.event_type, &serialized.event_version) {
                serialized = u.upcast(serialized);
            }
        }
        Ok(FeedEvent {
            at,
            aggregate_type: serialized.aggregate_type,
            aggregate_id: serialized.aggregate_id,
            sequence: self.sequence,
            event_type: serialized.event_type,
            event_version: serialized.event_version,
            payload: serialized.payload.into(),
            metadata: serialized.metadata,
            recorded_at: self.recorded_at,
        })
    }
}

fn upcasters() -> &'static [Box<dyn cqrs_es::persist::EventUpcaster>] {
    static UPCASTERS: std::sync::OnceLock<Vec<Box<dyn cqrs_es::persist::EventUpcaster>>> =
        std::sync::OnceLock::new();
    UPCASTERS.get_or_init(aggregates::upcasters::all)
}

/// The last event committed (`None` for an empty log). It may lie beyond what the feed
/// delivers yet (a transaction still running may take an earlier place); a reader that
/// waits for the projections to reach it waits for that too.
pub async fn head(conn: &mut PgConnection) -> Result<Option<Position>, sqlx::Error> {
    // Aliased: ORDER BY must sort the xid8 column, not its text.
    let row = sqlx::query!(
        r#"SELECT transaction_id::text AS "transaction_id!", position
           FROM events ORDER BY transaction_id DESC, position DESC LIMIT 1"#
    )
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| Position::stored(&r.transaction_id, r.position))
        .transpose()
}

/// How many events lie after `after` (committed or not yet readable).
pub async fn count_after(conn: &mut PgConnection, after: Position) -> Result<i64, sqlx::Error> {
    let n = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM events
           WHERE (transaction_id, position) > ($1::text::xid8, $2)"#,
        after.transaction_id.to_string(),
        after.position
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_reads_the_same_from_its_stored_text_as_from_a_tree() {
        // PostgreSQL's text form of a jsonb value, spaces and all.
        let text = r#"{"SpendRecorded": {"amount": "1.50", "tags": [1, 2], "note": null}}"#;
        let stored = Payload(Form::Text(text.into()));
        let tree = Payload::from(serde_json::from_str::<Value>(text).unwrap());
        assert_eq!(stored, tree);
        assert_eq!(
            stored.to_string(),
            r#"{"SpendRecorded":{"amount":"1.50","note":null,"tags":[1,2]}}"#
        );
        assert_eq!(stored.to_string(), tree.to_string());
        let from_text: std::collections::BTreeMap<String, Value> = stored.decode().unwrap();
        let from_tree: std::collections::BTreeMap<String, Value> = tree.decode().unwrap();
        assert_eq!(from_text, from_tree);
        assert_eq!(stored.to_value().unwrap(), tree.to_value().unwrap());
        let other = Payload::from(serde_json::json!({"SpendRecorded": {}}));
        assert_ne!(stored, other);
    }

    #[test]
    fn a_position_token_round_trips_and_orders_by_transaction_first() {
        let a = Position {
            transaction_id: 7,
            position: 90,
        };
        let b = Position {
            transaction_id: 8,
            position: 3,
        };
        assert_eq!(a.to_string(), "7-90");
        assert_eq!("7-90".parse::<Position>(), Ok(a));
        assert!(a < b, "a later transaction is later whatever its positions");
    }

    #[test]
    fn malformed_position_tokens_are_refused() {
        for bad in [
            "",
            "7",
            "-1",
            "7-",
            "x-1",
            "7-1-2",
            "1 -2",
            "99999999999999999999-1",
        ] {
            assert_eq!(bad.parse::<Position>(), Err(InvalidPosition), "{bad:?}");
        }
    }
}
