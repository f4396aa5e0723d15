//! Personal data: erasure by crypto-shredding, the suppression list (a keyed hash of each
//! address, never the address) and the check at start that the secret key opens the
//! database's data keys. Encryption itself lives in `projections::pii`, the one path every
//! read of a stored contact goes through.
//!
//! An erasure is one transaction: `ContactErased` (no personal data) is appended to the
//! contact's stream — which orders it against every other write of that stream, so an
//! update racing it either commits before (and is shredded with the rest) or conflicts,
//! reloads and is refused — then events stored in the clear before encryption existed are
//! stripped of their personal members, the data key is destroyed, the snapshot deleted,
//! stored responses naming the person (idempotency records, webhook delivery answers) are
//! redacted, and the email goes on the suppression list with reason `erased`.

use aggregates::contact::{Contact, ContactCommand, ContactEmail};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use futures::TryStreamExt;
use serde::Serialize;
use serde_json::json;
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::app::App;
use crate::app::command::{self, Abort, Answer, CommandContext, Reply, Retried};
use crate::app::error::AppError;
use crate::app::suppressions;
use crate::store::Loaded;

/// The purpose (see `SecretBox::derive`) of the key that seals contacts' data keys.
pub const DATA_KEYS_PURPOSE: &str = "contact-data-keys";

/// What `DELETE /v1/contacts/{id}` answers.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ContactErased {
    pub id: Uuid,
    pub erased_at: DateTime<Utc>,
    /// Read-your-writes token of the erasure (its `ContactErased` event).
    pub position: String,
}

/// Erases contact `id` (see the module note). Erasing an erased contact answers as the
/// first erasure did, without writing.
pub async fn erase(app: &App, context: &CommandContext, id: Uuid) -> Result<Answer, AppError> {
    let metadata = context.metadata();
    let (metadata, stream) = (&metadata, id.to_string());
    let stream = &stream;
    let outcome = app
        .retrying(Contact::TYPE, |mut tx| async move {
            let outcome = async {
                if let Some(recorded) = command::replay(&mut tx, context).await? {
                    return Ok(Answer::Replayed(recorded));
                }
                let mut loaded: Loaded<Contact> = app.store.load(&mut tx, stream).await?;
                if let Some(erased_at) = loaded.aggregate.erased_at {
                    let body = ContactErased {
                        id,
                        erased_at,
                        position: loaded.last_position.unwrap_or_default().to_string(),
                    };
                    return Ok(Answer::Fresh(Reply::ok(json!(body))));
                }
                let email = loaded.aggregate.email.clone();
                let at = Utc::now();
                let command = ContactCommand::Erase { at };
                let appended =
                    command::decide_and_append(app, &mut tx, &mut loaded, command, &(), metadata)
                        .await?;
                shred(&mut tx, stream, at).await?;
                if let Some(email) = &email {
                    redact_stored_responses(&mut tx, id, email).await?;
                    let hash = suppressions::hash_with(&suppressions::hash_key(app), email);
                    suppressions::insert(&mut tx, &hash, id, "erased", None).await?;
                }
                let body = ContactErased {
                    id,
                    erased_at: at,
                    position: appended.last_position().unwrap_or_default().to_string(),
                };
                let reply = Reply::ok(json!(body));
                command::record(&mut tx, context, &reply).await?;
                Ok::<_, Abort>(Answer::Fresh(reply))
            }
            .await;
            (tx, outcome)
        })
        .await?;
    match outcome {
        Retried::Done(answer) => Ok(answer),
        Retried::Exhausted => Err(AppError::conflict(
            "concurrency-conflict",
            "the contact kept changing under the erasure; retry it",
        )),
    }
}

/// Strips personal members from stream `id`'s events stored in the clear (before
/// encryption), destroys its data key and deletes its snapshot.
///
/// In that order: the start-up pass that seals clear events ([`encrypt_plaintext`]) locks
/// them, then makes or reads their contacts' keys, then deletes their snapshots. Taking the
/// rows in the same order, an erasure meeting the pass on one contact waits for it (or the
/// pass skips the events the erasure holds) instead of each waiting for the other until
/// PostgreSQL ends one of them.
async fn shred(conn: &mut PgConnection, id: &str, at: DateTime<Utc>) -> Result<(), AppError> {
    // Each of the stream's events is looked at: the clear personal ones (stored by an
    // earlier release) are told apart by their members, not by the text they hold.
    let events = sqlx::query!(
        "SELECT position, payload FROM events WHERE aggregate_type = $1 AND aggregate_id = $2",
        Contact::TYPE,
        id
    )
    .fetch_all(&mut *conn)
    .await?;
    for row in events {
        if projections::pii::is_clear_personal(Contact::TYPE, &row.payload) {
            let mut payload = row.payload;
            projections::pii::redact_event(&mut payload);
            sqlx::query!(
                "UPDATE events SET payload = $2 WHERE position = $1",
                row.position,
                payload
            )
            .execute(&mut *conn)
            .await?;
        }
    }
    sqlx::query!(
        "INSERT INTO contact_keys (contact_id, generation, wrapped_key, destroyed_at)
         SELECT $1, coalesce(max(generation), 0), NULL, $2::timestamptz
         FROM contact_keys WHERE contact_id = $1
         ON CONFLICT (contact_id, generation) DO UPDATE SET wrapped_key = NULL,
             destroyed_at = coalesce(contact_keys.destroyed_at, EXCLUDED.destroyed_at)",
        id,
        at
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "DELETE FROM snapshots WHERE aggregate_type = $1 AND aggregate_id = $2",
        Contact::TYPE,
        id
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Replaces the stored responses that name the person (by email or contact id): the
/// idempotency records' replies and the webhook deliveries' answers.
async fn redact_stored_responses(
    conn: &mut PgConnection,
    id: Uuid,
    email: &ContactEmail,
) -> Result<(), AppError> {
    let redacted = json!({"redacted": "the contact this response named was erased"});
    let body = serde_json::to_vec(&redacted).unwrap_or_default();
    let subjects: Vec<Uuid> = std::iter::once(id)
        .chain(projections::pii::email_name(email))
        .collect();
    let (email, id) = (email.as_str(), id.to_string());
    // Replies are sealed, so the database cannot search them. Each record keeps whom its
    // reply names (`subjects`, indexed): the candidates are those naming the person, and
    // the records of an earlier release, which have no `subjects` (kept 25 hours, like
    // every record). Each candidate is opened, and its names (or, as before the names,
    // the text of the id or the email) found in it. They are read as a stream and
    // only the keys of those that name the person are kept, so that memory does not grow
    // with the number of records.
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    let mut naming = Vec::new();
    {
        let mut records = sqlx::query!(
            "SELECT api_key_id, idempotency_key, response_body FROM idempotency_records
             WHERE subjects && $1
             UNION ALL
             (SELECT api_key_id, idempotency_key, response_body FROM idempotency_records
              WHERE subjects IS NULL ORDER BY created_at)",
            &subjects
        )
        .fetch(&mut *conn);
        while let Some(r) = records.try_next().await? {
            let (Some(api_key_id), Some(idempotency_key), Some(response_body)) =
                (r.api_key_id, r.idempotency_key, r.response_body)
            else {
                continue;
            };
            let aad = command::record_aad(api_key_id, &idempotency_key);
            let Ok(reply) = projections::pii::open_record(&aad, &response_body) else {
                continue;
            };
            let names = projections::pii::reply_names(&reply);
            if subjects.iter().any(|s| names.contains(s))
                || contains(&reply, email)
                || contains(&reply, &id)
            {
                naming.push((api_key_id, idempotency_key, aad));
            }
        }
    }
    for (api_key_id, idempotency_key, aad) in naming {
        let sealed = projections::pii::seal_record(&aad, &body);
        store_reply(conn, api_key_id, &idempotency_key, &sealed, &[]).await?;
    }
    sqlx::query!(
        "UPDATE webhook_deliveries SET response = $3
         WHERE strpos(response::text, $1) > 0 OR strpos(response::text, $2) > 0",
        email,
        id,
        redacted
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "UPDATE webhook_parked SET last_error = 'redacted'
         WHERE strpos(last_error, $1) > 0",
        email
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// How often every server process merges the pending entries of the index of whom stored
/// replies name ([`merge_reply_names`]).
pub const MERGE_REPLY_NAMES_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Merges the entries that writes appended to the pending list of the index of whom stored
/// replies name (`idempotency_records_subjects`, built with `fastupdate`), so that the
/// write statement of a command batch only appends to the list and never merges it
/// itself; returns the pages of the list merged. An erasure searches the list and the
/// index alike, so this changes what a lookup costs, never what it finds.
pub async fn merge_reply_names(pool: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    let pages = sqlx::query_scalar!(
        r#"SELECT gin_clean_pending_list('idempotency_records_subjects'::regclass) AS "pages!""#
    )
    .fetch_one(pool)
    .await?;
    Ok(pages)
}

#[derive(Debug, thiserror::Error)]
pub enum KeyCheckError {
    #[error(transparent)]
    Key(#[from] projections::pii::PiiError),
}

/// Refuses a secret key that cannot open the database's data keys (checked by `serve`
/// before it listens): a wrong key must stop the process, not serve garbage or errors.
pub async fn check_secret_key(pool: &sqlx::PgPool) -> Result<(), KeyCheckError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(projections::pii::PiiError::from)?;
    projections::pii::check_secret_key(&mut conn).await?;
    Ok(())
}

/// Who wrote an event, as the history shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Actor {
    /// The API key's id, when an API key wrote it.
    pub key_id: Option<Uuid>,
    /// The API key's name, or `cli` / `worker:<name>`.
    pub name: String,
}

/// One entry of a contact's history.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HistoryItem {
    pub sequence: i64,
    pub event_type: String,
    pub recorded_at: DateTime<Utc>,
    pub actor: Option<Actor>,
    /// The id of the request that wrote it.
    pub request_id: Option<String>,
    /// What the event says (for an update: only the fields that changed); empty for the
    /// events of an erased contact.
    #[schema(value_type = Object)]
    pub changes: serde_json::Value,
}

/// The members of an event's variant object: what it says, without the envelope.
fn inner(payload: serde_json::Value) -> serde_json::Value {
    match payload {
        serde_json::Value::Object(map) if map.len() == 1 => {
            map.into_iter().next().map(|(_, v)| v).unwrap_or_default()
        }
        other => other,
    }
}

/// The stream of a contact that exists (404) and is not erased (410).
async fn existing(
    conn: &mut PgConnection,
    app: &App,
    id: Uuid,
) -> Result<Loaded<Contact>, AppError> {
    let loaded: Loaded<Contact> = app.store.load(conn, &id.to_string()).await?;
    if let Some(erased_at) = loaded.aggregate.erased_at {
        return Err(aggregates::contact::ContactError::Erased { erased_at }.into());
    }
    if !loaded.aggregate.created {
        return Err(AppError::NotFound("no contact with this id".into()));
    }
    Ok(loaded)
}

/// A page of contact `id`'s history after sequence `after`, with who wrote each event.
pub async fn history(
    app: &App,
    id: Uuid,
    after: i64,
    limit: i64,
) -> Result<Vec<HistoryItem>, AppError> {
    let mut conn = app.pool.acquire().await?;
    existing(&mut conn, app, id).await?;
    let events = app
        .store
        .read_stream::<Contact>(&mut conn, &id.to_string(), after, limit)
        .await?;
    let key_ids: Vec<Uuid> = events
        .iter()
        .filter_map(|e| e.metadata.actor.as_deref()?.strip_prefix("api_key:"))
        .filter_map(|k| Uuid::parse_str(k).ok())
        .collect();
    let names: std::collections::HashMap<Uuid, String> =
        sqlx::query!("SELECT id, name FROM api_keys WHERE id = ANY($1)", &key_ids)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|r| (r.id, r.name))
            .collect();
    Ok(events
        .into_iter()
        .map(|e| {
            let actor = e.metadata.actor.as_deref().map(|actor| {
                match actor
                    .strip_prefix("api_key:")
                    .and_then(|k| Uuid::parse_str(k).ok())
                {
                    Some(key) => Actor {
                        key_id: Some(key),
                        name: names.get(&key).cloned().unwrap_or_default(),
                    },
                    None => Actor {
                        key_id: None,
                        name: actor.to_string(),
                    },
                }
            });
            HistoryItem {
                sequence: e.sequence,
                event_type: e.event_type,
                recorded_at: e.recorded_at,
                actor,
                request_id: e.metadata.correlation_id,
                changes: inner(e.payload),
            }
        })
        .collect())
}

/// One event of an export.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ExportedEvent {
    pub sequence: i64,
    pub event_type: String,
    pub recorded_at: DateTime<Utc>,
    pub actor: Option<String>,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// Everything held about a person, but the profile (which the transport renders).
pub struct Export {
    pub contact: Loaded<Contact>,
    pub events: Vec<ExportedEvent>,
    pub enrollments: Vec<projections::enrollments::EnrollmentRow>,
    pub suppression: Option<suppressions::Suppression>,
}

/// Everything held about contact `id`: its state, every event of its stream opened, its
/// enrollments with their milestones and its suppression.
pub async fn export(app: &App, id: Uuid) -> Result<Export, AppError> {
    let mut conn = app.pool.acquire().await?;
    let contact = existing(&mut conn, app, id).await?;
    let events = app
        .store
        .read_stream::<Contact>(&mut conn, &id.to_string(), 0, i64::MAX)
        .await?
        .into_iter()
        .map(|e| ExportedEvent {
            sequence: e.sequence,
            event_type: e.event_type,
            recorded_at: e.recorded_at,
            actor: e.metadata.actor,
            data: inner(e.payload),
        })
        .collect();
    // Every enrollment, oldest first, read a page at a time.
    let mut enrollments = Vec::new();
    loop {
        let after = enrollments
            .last()
            .map(|e: &projections::enrollments::EnrollmentRow| (e.enrolled_at, e.id));
        let page = projections::enrollments::of_contact(&mut conn, id, after, 500).await?;
        if page.is_empty() {
            break;
        }
        enrollments.extend(page);
    }
    enrollments.reverse();
    let suppression = suppressions::of_contact(&mut conn, id).await?;
    Ok(Export {
        contact,
        events,
        enrollments,
        suppression,
    })
}

/// What [`encrypt_plaintext`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Encrypted {
    /// Events sealed under their contact's key.
    pub events: u64,
    /// Events of erased contacts stripped of their personal members instead.
    pub redacted: u64,
    /// Snapshots in the clear, deleted (the next one written is sealed).
    pub snapshots: u64,
    /// Idempotency records' replies stored in the clear, sealed.
    pub records: u64,
}

/// Replaces the stored reply (as sealed) of an idempotency record, and whom it names.
async fn store_reply(
    conn: &mut PgConnection,
    scope: Uuid,
    key: &str,
    body: &[u8],
    subjects: &[Uuid],
) -> Result<(), AppError> {
    sqlx::query!(
        "UPDATE idempotency_records SET response_body = $3, subjects = $4
         WHERE api_key_id = $1 AND idempotency_key = $2",
        scope,
        key,
        body,
        subjects
    )
    .execute(conn)
    .await?;
    Ok(())
}

// The records' sealed mark, as the query of [`seal_clear_records`] and the partial index it
// reads write it.
const _: () = assert!(matches!(projections::pii::SEALED_RECORD, b"LLS1"));

/// Seals the idempotency records' replies an earlier release stored in the clear, `batch`
/// per transaction. Only replies in the clear are read and locked: `serve` runs this at
/// every start, and the records already sealed (all of them, but for a database written by
/// an earlier release) are left alone, with no lock taken and nothing written.
async fn seal_clear_records(pool: &sqlx::PgPool, batch: i64) -> Result<u64, AppError> {
    use projections::pii::{is_sealed_record, seal_record};
    let mut sealed = 0;
    loop {
        let mut tx = pool.begin().await?;
        // Answered replies not starting with the sealed mark; SKIP LOCKED: one a request
        // holds is taken by the next run. The predicate of the partial index
        // `idempotency_records_clear`, word for word and with its constants (the sealed
        // mark, `SEALED_RECORD`), and the index's order: PostgreSQL then reads that index
        // (empty once everything is sealed). It cannot tell how few records match, and
        // without the order it reads the table.
        let records = sqlx::query!(
            "SELECT api_key_id, idempotency_key, response_body FROM idempotency_records
             WHERE response_status IS NOT NULL
               AND substr(response_body, 1, 4) IS DISTINCT FROM 'LLS1'::bytea
             ORDER BY created_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED",
            batch
        )
        .fetch_all(&mut *tx)
        .await?;
        if records.is_empty() {
            tx.commit().await?;
            return Ok(sealed);
        }
        for r in records {
            let aad = command::record_aad(r.api_key_id, &r.idempotency_key);
            let body = seal_record(&aad, &r.response_body);
            if !is_sealed_record(&body) {
                // No key to seal with: nothing can be sealed, and the same rows would come
                // back for ever.
                return Err(AppError::Internal(
                    "idempotency replies in the clear cannot be sealed: no secret key".into(),
                ));
            }
            let subjects = projections::pii::reply_names(&r.response_body);
            store_reply(&mut tx, r.api_key_id, &r.idempotency_key, &body, &subjects).await?;
            sealed += 1;
        }
        tx.commit().await?;
    }
}

/// The name of [`encrypt_plaintext`]'s row in `sealing_marks`.
const CONTACT_EVENTS_MARK: &str = "contact_events";

/// Seals every contact event still stored in the clear (written before encryption),
/// `batch` events per transaction, while the service runs. Each batch locks its rows and
/// commits with its contacts' new keys, and an event already sealed is never touched
/// again, so a run killed at any point leaves every event either in the clear or sealed
/// once, and running it again finishes the work. `progress` hears the running totals.
///
/// A run reads only the events written since the last run that reached its end: the
/// events of transactions from the mark in `sealing_marks` on. It then moves the mark to
/// the oldest transaction that was still running when it started; every event of a
/// transaction below that one was there to be read from its first batch on.
pub async fn encrypt_plaintext(
    pool: &sqlx::PgPool,
    batch: i64,
    progress: &(dyn Fn(Encrypted) + Sync),
) -> Result<Encrypted, AppError> {
    use projections::pii;
    let marks = sqlx::query!(
        r#"SELECT coalesce((SELECT transaction_id::text FROM sealing_marks WHERE name = $1),
                           '0') AS "from!",
                  pg_snapshot_xmin(pg_current_snapshot())::text AS "reached!""#,
        CONTACT_EVENTS_MARK
    )
    .fetch_one(pool)
    .await?;
    let mut done = Encrypted::default();
    let mut after = 0i64;
    loop {
        let mut tx = pool.begin().await?;
        // The events with personal data in the clear, and only those, are read and
        // locked: not sealed (no `pii` member in the variant object, a member no event of
        // an earlier release has: the cheap test), and with a member that is neither clear
        // nor sealed. An event with nothing personal is read past. A row another holds
        // (an erasure stripping it, another process's pass) is waited for and then read
        // as it is: none may be skipped, or the mark would pass over it.
        let rows = sqlx::query!(
            r#"SELECT position, aggregate_id, payload FROM events
               WHERE aggregate_type = $1 AND position > $2
                 AND transaction_id >= $5::text::xid8
                 AND NOT payload @? '$.*.pii'
                 AND EXISTS (
                     SELECT 1
                     FROM jsonb_each(CASE WHEN jsonb_typeof(payload) = 'object'
                                          THEN payload ELSE '{}' END) AS v(name, value),
                          jsonb_object_keys(CASE WHEN jsonb_typeof(v.value) = 'object'
                                                 THEN v.value ELSE '{}' END) AS m(name)
                     WHERE m.name <> ALL($4::text[]))
               ORDER BY position LIMIT $3
               FOR UPDATE"#,
            Contact::TYPE,
            after,
            batch,
            &pii::clear_or_sealed_members() as &[&str],
            marks.from
        )
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last().map(|r| r.position) else {
            sqlx::query!(
                "INSERT INTO sealing_marks (name, transaction_id) VALUES ($1, $2::text::xid8)
                 ON CONFLICT (name) DO UPDATE
                 SET transaction_id = greatest(sealing_marks.transaction_id,
                                               EXCLUDED.transaction_id),
                     updated_at = now()",
                CONTACT_EVENTS_MARK,
                marks.reached
            )
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            done.records += seal_clear_records(pool, batch).await?;
            return Ok(done);
        };
        after = last;
        let clear: Vec<_> = rows
            .into_iter()
            .filter(|r| pii::is_clear_personal(Contact::TYPE, &r.payload))
            .collect();
        let mut ids: Vec<String> = clear.iter().map(|r| r.aggregate_id.clone()).collect();
        ids.sort();
        ids.dedup();
        let existing = pii::keys(&mut tx, Contact::TYPE, &ids)
            .await
            .map_err(crate::store::StoreError::from)?;
        let erased: std::collections::HashSet<&String> = ids
            .iter()
            .filter(|id| matches!(existing.get(id), Some(pii::DataKey::Destroyed)))
            .collect();
        let live: Vec<String> = ids
            .iter()
            .filter(|id| !erased.contains(id))
            .cloned()
            .collect();
        let keys = pii::keys_for_writing(&mut tx, &live, &[])
            .await
            .map_err(crate::store::StoreError::from)?;
        let mut positions = Vec::with_capacity(clear.len());
        let mut payloads = Vec::with_capacity(clear.len());
        for row in clear {
            let mut payload = row.payload;
            match keys.get(&row.aggregate_id) {
                Some(key) => {
                    pii::seal_event(key, Contact::TYPE, &row.aggregate_id, &mut payload);
                    done.events += 1;
                }
                None => {
                    pii::redact_event(&mut payload);
                    done.redacted += 1;
                }
            }
            positions.push(row.position);
            payloads.push(payload);
        }
        sqlx::query!(
            "UPDATE events e SET payload = u.payload
             FROM UNNEST($1::bigint[], $2::jsonb[]) AS u(position, payload)
             WHERE e.position = u.position",
            &positions,
            &payloads
        )
        .execute(&mut *tx)
        .await?;
        let snapshots = sqlx::query!(
            r#"DELETE FROM snapshots
               WHERE aggregate_type = $1 AND aggregate_id = ANY($2)
                 AND NOT jsonb_exists(payload, $3)"#,
            Contact::TYPE,
            &ids,
            pii::SEALED_MEMBER
        )
        .execute(&mut *tx)
        .await?;
        done.snapshots += snapshots.rows_affected();
        tx.commit().await?;
        progress(done);
    }
}
