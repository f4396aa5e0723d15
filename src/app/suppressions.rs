//! The suppression list: addresses not to contact, kept as a keyed hash of the normalised
//! email (never the address). Entries are added by hand (`manual`), by an erasure
//! (`erased`), by a withdrawn consent (`consent_withdrawn`) and, from the event log
//! whatever webhook source reported them, by applied hard bounces, complaints and
//! unsubscribes ([`SuppressionReactor`]). Enrolling a suppressed contact is rejected.

use aggregates::contact::{Contact, ContactCommand, ContactEmail, ContactEvent, contact_id_for};
use aggregates::enrollment::{Enrollment, EnrollmentEvent, ProviderEventKind};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use hmac::{Hmac, Mac};
use projections::{FeedEvent, ProjectionError, Reactor};
use serde::Serialize;
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::app::App;
use crate::app::command::{Abort, Retried, decide_and_append};
use crate::app::error::{AppError, FieldError};
use crate::store::{Loaded, Metadata, Store};

/// Every reason an entry can have.
pub const REASONS: &[&str] = &[
    "manual",
    "erased",
    "bounced",
    "complained",
    "unsubscribed",
    "consent_withdrawn",
];

/// The name (and checkpoint) of [`SuppressionReactor`].
pub const SUPPRESSION_REACTOR: &str = "suppressions";

/// One entry of the list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Suppression {
    pub contact_id: Uuid,
    /// The address, only while its contact exists (the list itself never holds it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// The keyed hash of a normalised email, under `key`.
pub fn hash_with(key: &[u8; 32], email: &ContactEmail) -> Vec<u8> {
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(email.as_str().as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// The purpose (see `SecretBox::derive`) of the key of the list's email hashes.
pub const SUPPRESSION_PURPOSE: &str = "suppression-email-hash";

/// The key of the list's hashes.
pub fn hash_key(app: &App) -> [u8; 32] {
    app.secrets.derive(SUPPRESSION_PURPOSE)
}

fn parse_email(raw: &str) -> Result<ContactEmail, AppError> {
    ContactEmail::parse(raw)
        .map_err(|e| AppError::invalid(vec![crate::app::contacts::field_error(e)]))
}

/// Puts an entry on the list (an existing entry keeps its first reason). Whether it was new.
pub async fn insert(
    conn: &mut PgConnection,
    hash: &[u8],
    contact_id: Uuid,
    reason: &str,
    source: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query!(
        "INSERT INTO suppressions (email_hash, contact_id, reason, source)
         VALUES ($1, $2, $3, $4) ON CONFLICT (email_hash) DO NOTHING",
        hash,
        contact_id,
        reason,
        source
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Adds `email` by hand (`reason` may only be `manual`). The entry, and whether it is new.
pub async fn add(
    app: &App,
    email: &str,
    reason: Option<&str>,
) -> Result<(Suppression, bool), AppError> {
    let email = parse_email(email)?;
    if let Some(reason) = reason
        && reason != "manual"
    {
        return Err(AppError::invalid(vec![FieldError::new(
            "reason",
            "must be \"manual\" (the others are added by the service itself)",
        )]));
    }
    let contact_id = contact_id_for(crate::app::contacts::id_key(app).await?, &email);
    let hash = hash_with(&hash_key(app), &email);
    let mut conn = app.pool.acquire().await?;
    let created = insert(&mut conn, &hash, contact_id, "manual", Some("api")).await?;
    let entry = find(&mut conn, &hash)
        .await?
        .ok_or_else(|| AppError::Internal("a suppression just written cannot be read".into()))?;
    Ok((entry, created))
}

/// The entry of contact `id`, if it is suppressed (for pages that show one contact).
pub async fn of_contact_id(app: &App, id: Uuid) -> Result<Option<Suppression>, AppError> {
    let mut conn = app.pool.acquire().await?;
    Ok(of_contact(&mut conn, id).await?)
}

/// Removes the entry of `email`; whether there was one. When the email belongs to an
/// erased contact, the same transaction appends `ErasureReleased` to its stream (attributed
/// by `metadata`), so the email may be created again as a new contact; that counts as a
/// removal even if the entry itself was already gone.
pub async fn remove(app: &App, email: &str, metadata: &Metadata) -> Result<bool, AppError> {
    let email = parse_email(email)?;
    let hash = &hash_with(&hash_key(app), &email);
    let stream = &contact_id_for(crate::app::contacts::id_key(app).await?, &email).to_string();
    let outcome = app
        .retrying(Contact::TYPE, |mut tx| async move {
            let outcome = async {
                let removed = sqlx::query!("DELETE FROM suppressions WHERE email_hash = $1", hash)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                    > 0;
                let mut loaded: Loaded<Contact> = app.store.load(&mut tx, stream).await?;
                let contact = &loaded.aggregate;
                if contact.erased_at.is_none() || contact.erasure_released_at.is_some() {
                    return Ok(removed);
                }
                let command = ContactCommand::ReleaseErasure { at: Utc::now() };
                decide_and_append(app, &mut tx, &mut loaded, command, &(), metadata).await?;
                Ok::<_, Abort>(true)
            }
            .await;
            (tx, outcome)
        })
        .await?;
    match outcome {
        Retried::Done(removed) => Ok(removed),
        Retried::Exhausted => Err(AppError::conflict(
            "concurrency-conflict",
            "the contact kept changing while its suppression was removed; retry it",
        )),
    }
}

async fn find(conn: &mut PgConnection, hash: &[u8]) -> Result<Option<Suppression>, sqlx::Error> {
    sqlx::query_as!(
        Suppression,
        "SELECT s.contact_id, c.email AS \"email?\", s.reason, s.source, s.created_at
         FROM suppressions s LEFT JOIN contacts_view c ON c.id = s.contact_id
         WHERE s.email_hash = $1",
        hash
    )
    .fetch_optional(&mut *conn)
    .await
}

/// A page of the list, newest first, after `after` (a created time and contact id).
pub async fn list(
    app: &App,
    email: Option<&str>,
    reason: Option<&str>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Suppression>, AppError> {
    let hash = match email {
        Some(raw) => Some(hash_with(&hash_key(app), &parse_email(raw)?)),
        None => None,
    };
    if let Some(reason) = reason
        && !REASONS.contains(&reason)
    {
        return Err(AppError::BadRequest(format!(
            "reason must be one of {}",
            REASONS.join(", ")
        )));
    }
    let (after_at, after_id) = after.unzip();
    let rows = sqlx::query_as!(
        Suppression,
        "SELECT s.contact_id, c.email AS \"email?\", s.reason, s.source, s.created_at
         FROM suppressions s LEFT JOIN contacts_view c ON c.id = s.contact_id
         WHERE ($1::bytea IS NULL OR s.email_hash = $1)
           AND ($2::text IS NULL OR s.reason = $2)
           AND ($3::timestamptz IS NULL OR (s.created_at, s.contact_id) < ($3, $4))
         ORDER BY s.created_at DESC, s.contact_id DESC
         LIMIT $5",
        hash,
        reason,
        after_at,
        after_id,
        limit
    )
    .fetch_all(&app.pool)
    .await?;
    Ok(rows)
}

/// Which of `contacts` are suppressed.
pub async fn suppressed_among(
    conn: &mut PgConnection,
    contacts: &[Uuid],
) -> Result<std::collections::HashSet<Uuid>, sqlx::Error> {
    let rows = sqlx::query_scalar!(
        "SELECT contact_id FROM suppressions WHERE contact_id = ANY($1)",
        contacts
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Suppresses the contacts that hard-bounced, complained or unsubscribed (as recorded on
/// their enrollments, whatever source reported it) and those who withdrew consent: read
/// from the feed like a projection, each batch committed with its checkpoint.
pub struct SuppressionReactor {
    store: Store,
    key: [u8; 32],
}

impl SuppressionReactor {
    pub fn new(app: &App) -> Self {
        Self {
            store: app.store.clone(),
            key: hash_key(app),
        }
    }

    async fn suppress_contact(
        &self,
        conn: &mut PgConnection,
        contact: Uuid,
        reason: &str,
        source: &str,
    ) -> Result<(), ProjectionError> {
        let loaded: Loaded<Contact> = self
            .store
            .load(conn, &contact.to_string())
            .await
            .map_err(|e| ProjectionError::Database(sqlx::Error::Decode(Box::new(e))))?;
        // An erased contact is suppressed already, and its email is gone.
        let Some(email) = loaded.aggregate.email else {
            return Ok(());
        };
        insert(
            conn,
            &hash_with(&self.key, &email),
            contact,
            reason,
            Some(source),
        )
        .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Reactor for SuppressionReactor {
    fn name(&self) -> &'static str {
        SUPPRESSION_REACTOR
    }

    /// Of contact events it reads only consent (an erased contact's reads as redacted, and
    /// is passed over).
    fn opens(&self, _aggregate_type: &str, event_type: &str) -> bool {
        event_type == "ConsentRecorded"
    }

    async fn react(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        for event in events {
            if event.aggregate_type == Enrollment::TYPE
                && event.event_type == "ProviderEventRecorded"
            {
                let Ok(EnrollmentEvent::ProviderEventRecorded { kind, .. }) = event.decode() else {
                    continue;
                };
                let reason = match kind {
                    ProviderEventKind::Bounced => "bounced",
                    ProviderEventKind::Complained => "complained",
                    ProviderEventKind::Unsubscribed => "unsubscribed",
                    _ => continue,
                };
                let enrolled = sqlx::query_scalar!(
                    "SELECT payload FROM events
                     WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = 1",
                    Enrollment::TYPE,
                    event.aggregate_id
                )
                .fetch_optional(&mut *conn)
                .await?;
                let contact = enrolled
                    .and_then(|p| serde_json::from_value::<EnrollmentEvent>(p).ok())
                    .and_then(|e| match e {
                        EnrollmentEvent::ContactEnrolled { contact_id, .. } => Some(contact_id),
                        _ => None,
                    });
                if let Some(contact) = contact {
                    let source = format!("enrollment:{}", event.aggregate_id);
                    self.suppress_contact(conn, contact, reason, &source)
                        .await?;
                }
            } else if event.aggregate_type == Contact::TYPE
                && event.event_type == "ConsentRecorded"
                && let Ok(ContactEvent::ConsentRecorded { status, .. }) = event.decode()
                && status == aggregates::contact::ConsentStatus::Withdrawn
                && let Ok(contact) = Uuid::parse_str(&event.aggregate_id)
            {
                self.suppress_contact(conn, contact, "consent_withdrawn", "consent")
                    .await?;
            }
        }
        Ok(())
    }
}

/// The entry of contact `id`, if it is suppressed.
pub async fn of_contact(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<Suppression>, sqlx::Error> {
    sqlx::query_as!(
        Suppression,
        "SELECT s.contact_id, c.email AS \"email?\", s.reason, s.source, s.created_at
         FROM suppressions s LEFT JOIN contacts_view c ON c.id = s.contact_id
         WHERE s.contact_id = $1 ORDER BY s.created_at LIMIT 1",
        id
    )
    .fetch_optional(&mut *conn)
    .await
}
