//! Read model `contacts`: every contact with its fields and enrichment, behind
//! `GET /v1/contacts` (lookup by email, text search over name, company and email).

use std::collections::BTreeMap;

use aggregates::contact::{Contact, ContactEvent, ContactFields};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::copy::Rows;
use crate::{
    FeedEvent, Mode, Position, Projection, ProjectionError, column, events_of, ids, missing_row,
};

/// The read model's name: its checkpoint, its advisory lock, what `min_position` waits for.
pub const NAME: &str = "contacts";

pub struct ContactsProjection;

fn text<T: Clone + Into<String>>(v: &Option<T>) -> Option<String> {
    v.clone().map(Into::into)
}

/// The writable columns of a contact, as text; `None` leaves a column as it is.
#[derive(Default, Clone)]
struct Columns {
    first_name: Option<String>,
    last_name: Option<String>,
    company: Option<String>,
    company_domain: Option<String>,
    title: Option<String>,
    phone: Option<String>,
    linkedin_url: Option<String>,
    custom: Option<serde_json::Value>,
}

impl Columns {
    fn of(fields: &ContactFields) -> Self {
        Self {
            first_name: text(&fields.first_name),
            last_name: text(&fields.last_name),
            company: text(&fields.company),
            company_domain: text(&fields.company_domain),
            title: text(&fields.title),
            phone: text(&fields.phone),
            linkedin_url: text(&fields.linkedin_url),
            custom: custom_json(fields),
        }
    }

    /// The columns `later` sets overwrite these (a change event names only what changed).
    fn overwrite(&mut self, later: Columns) {
        fn keep<T>(slot: &mut Option<T>, later: Option<T>) {
            if later.is_some() {
                *slot = later;
            }
        }
        keep(&mut self.first_name, later.first_name);
        keep(&mut self.last_name, later.last_name);
        keep(&mut self.company, later.company);
        keep(&mut self.company_domain, later.company_domain);
        keep(&mut self.title, later.title);
        keep(&mut self.phone, later.phone);
        keep(&mut self.linkedin_url, later.linkedin_url);
        keep(&mut self.custom, later.custom);
    }
}

/// What a batch does to one contact: creates it (with every later change of the batch
/// folded in), or changes one that existed before the batch.
struct Change {
    created: Option<(String, DateTime<Utc>)>,
    columns: Columns,
    enrichment: Option<serde_json::Value>,
    updated_at: DateTime<Utc>,
    /// The stream's version after the batch: the sequence of its last event.
    version: i64,
    first: Position,
}

#[async_trait::async_trait]
impl Projection for ContactsProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &["contacts_view", "contact_totals_view"]
    }

    /// Folds the batch per contact in memory, then writes the new contacts in one insert
    /// and the changed ones in one update.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        apply(conn, events, Mode::Live).await
    }

    async fn apply_rows(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        apply(conn, events, Mode::Fill).await
    }
}

async fn apply(
    conn: &mut PgConnection,
    events: &[FeedEvent],
    mode: Mode,
) -> Result<(), ProjectionError> {
    let mut changes: BTreeMap<Uuid, Change> = BTreeMap::new();
    // Contacts erased in this batch: their rows go, whatever the batch did to them.
    let mut erased: Vec<Uuid> = Vec::new();
    for (event, id, decoded) in events_of::<ContactEvent>(events, Contact::TYPE)? {
        let (columns, enrichment, at) = match decoded {
            // Personal data already shredded: nothing of it may reach the table.
            ContactEvent::ContactRedacted {} => continue,
            // An erased contact has no row; its email may now be created again.
            ContactEvent::ErasureReleased { .. } => continue,
            ContactEvent::ContactErased { .. } => {
                changes.remove(&id);
                erased.push(id);
                continue;
            }
            ContactEvent::ContactCreated {
                email,
                fields,
                created_at,
            } => {
                if changes.contains_key(&id) {
                    return Err(ProjectionError::Inconsistent {
                        position: event.at,
                        message: "a contact created twice".into(),
                    });
                }
                let mut columns = Columns::of(&fields);
                columns.custom.get_or_insert_with(|| json!({}));
                changes.insert(
                    id,
                    Change {
                        created: Some((email.as_str().to_string(), created_at)),
                        columns,
                        enrichment: None,
                        updated_at: created_at,
                        version: event.sequence,
                        first: event.at,
                    },
                );
                continue;
            }
            ContactEvent::ContactUpdated {
                changes,
                updated_at,
            } => (Columns::of(&changes), None, updated_at),
            ContactEvent::ConsentRecorded { recorded_at, .. } => {
                (Columns::default(), None, recorded_at)
            }
            ContactEvent::EnrichmentRecorded {
                data,
                quality_score,
                sources,
                enriched_at,
            } => (
                Columns::default(),
                Some(json!({
                    "data": data,
                    "quality_score": quality_score.value(),
                    "sources": sources,
                    "enriched_at": enriched_at,
                })),
                enriched_at,
            ),
        };
        let change = changes.entry(id).or_insert_with(|| Change {
            created: None,
            columns: Columns::default(),
            enrichment: None,
            updated_at: at,
            version: event.sequence,
            first: event.at,
        });
        change.columns.overwrite(columns);
        if enrichment.is_some() {
            change.enrichment = enrichment;
        }
        change.updated_at = at;
        change.version = event.sequence;
    }
    if !erased.is_empty() {
        let gone = sqlx::query!("DELETE FROM contacts_view WHERE id = ANY($1)", &erased)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        if gone > 0 {
            sqlx::query!(
                "UPDATE contact_totals_view SET contacts = contacts - $1",
                gone as i64
            )
            .execute(&mut *conn)
            .await?;
        }
    }
    let (created, changed): (Vec<_>, Vec<_>) =
        changes.into_iter().partition(|(_, c)| c.created.is_some());
    if !created.is_empty() {
        match mode {
            Mode::Live => insert(conn, &created).await?,
            Mode::Fill => copy_in(conn, &created).await?,
        }
        sqlx::query!(
            "INSERT INTO contact_totals_view (singleton, contacts) VALUES (true, $1)
             ON CONFLICT (singleton)
             DO UPDATE SET contacts = contact_totals_view.contacts + EXCLUDED.contacts",
            created.len() as i64
        )
        .execute(&mut *conn)
        .await?;
    }
    if !changed.is_empty() {
        update(conn, &changed).await?;
    }
    Ok(())
}

async fn insert(conn: &mut PgConnection, rows: &[(Uuid, Change)]) -> Result<(), ProjectionError> {
    let created = |c: &Change| c.created.clone().unwrap_or_default();
    sqlx::query!(
        "INSERT INTO contacts_view (id, email, first_name, last_name, company, company_domain,
             title, phone, linkedin_url, custom, enrichment, created_at, updated_at, version)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
             $6::text[], $7::text[], $8::text[], $9::text[], $10::jsonb[], $11::jsonb[],
             $12::timestamptz[],
             $13::timestamptz[], $14::int8[])",
        &ids(rows),
        &column(rows, |c| created(c).0),
        &column(rows, |c| c.columns.first_name.clone()) as _,
        &column(rows, |c| c.columns.last_name.clone()) as _,
        &column(rows, |c| c.columns.company.clone()) as _,
        &column(rows, |c| c.columns.company_domain.clone()) as _,
        &column(rows, |c| c.columns.title.clone()) as _,
        &column(rows, |c| c.columns.phone.clone()) as _,
        &column(rows, |c| c.columns.linkedin_url.clone()) as _,
        &column(rows, |c| c
            .columns
            .custom
            .clone()
            .unwrap_or_else(|| json!({}))),
        &column(rows, |c| c.enrichment.clone()) as _,
        &column(rows, |c| created(c).1),
        &column(rows, |c| c.updated_at),
        &column(rows, |c| c.version),
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// [`insert`] by binary `COPY`, for a rebuild's fill.
async fn copy_in(conn: &mut PgConnection, rows: &[(Uuid, Change)]) -> Result<(), ProjectionError> {
    let empty = json!({});
    let mut copy = Rows::new();
    for (id, c) in rows {
        let (email, created_at) = c
            .created
            .as_ref()
            .map(|(e, at)| (e.as_str(), *at))
            .unwrap_or_default();
        let columns = &c.columns;
        copy.push(&[
            id,
            &email,
            &columns.first_name,
            &columns.last_name,
            &columns.company,
            &columns.company_domain,
            &columns.title,
            &columns.phone,
            &columns.linkedin_url,
            &columns.custom.as_ref().unwrap_or(&empty),
            &c.enrichment,
            &created_at,
            &c.updated_at,
            &c.version,
        ]);
    }
    copy.copy(
        conn,
        "COPY contacts_view (id, email, first_name, last_name, company, company_domain, title,
             phone, linkedin_url, custom, enrichment, created_at, updated_at, version)
         FROM STDIN (FORMAT binary)",
    )
    .await?;
    Ok(())
}

async fn update(conn: &mut PgConnection, rows: &[(Uuid, Change)]) -> Result<(), ProjectionError> {
    let updated = sqlx::query!(
        "UPDATE contacts_view c SET
             first_name = coalesce(u.first_name, c.first_name),
             last_name = coalesce(u.last_name, c.last_name),
             company = coalesce(u.company, c.company),
             company_domain = coalesce(u.company_domain, c.company_domain),
             title = coalesce(u.title, c.title),
             phone = coalesce(u.phone, c.phone),
             linkedin_url = coalesce(u.linkedin_url, c.linkedin_url),
             custom = coalesce(u.custom, c.custom),
             enrichment = coalesce(u.enrichment, c.enrichment),
             updated_at = u.updated_at,
             version = u.version
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::jsonb[], $10::jsonb[], $11::timestamptz[],
                     $12::int8[])
             AS u(id, first_name, last_name, company, company_domain, title, phone, linkedin_url,
                  custom, enrichment, updated_at, version)
         WHERE c.id = u.id",
        &ids(rows),
        &column(rows, |c| c.columns.first_name.clone()) as _,
        &column(rows, |c| c.columns.last_name.clone()) as _,
        &column(rows, |c| c.columns.company.clone()) as _,
        &column(rows, |c| c.columns.company_domain.clone()) as _,
        &column(rows, |c| c.columns.title.clone()) as _,
        &column(rows, |c| c.columns.phone.clone()) as _,
        &column(rows, |c| c.columns.linkedin_url.clone()) as _,
        &column(rows, |c| c.columns.custom.clone()) as _,
        &column(rows, |c| c.enrichment.clone()) as _,
        &column(rows, |c| c.updated_at),
        &column(rows, |c| c.version),
    )
    .execute(&mut *conn)
    .await?;
    if updated.rows_affected() == rows.len() as u64 {
        return Ok(());
    }
    let present: Vec<Uuid> = sqlx::query_scalar!(
        "SELECT id FROM contacts_view WHERE id = ANY($1)",
        &ids(rows)
    )
    .fetch_all(&mut *conn)
    .await?;
    Err(missing_row(
        rows,
        &present,
        |c| c.first,
        "a change to a contact the read model does not have",
    ))
}

fn custom_json(fields: &ContactFields) -> Option<serde_json::Value> {
    fields
        .custom
        .as_ref()
        .map(|c| serde_json::to_value(c.as_map()).unwrap_or_else(|_| json!({})))
}

/// One contact of the list.
#[derive(Debug, Clone, PartialEq)]
pub struct ContactRow {
    pub id: Uuid,
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub company: Option<String>,
    pub company_domain: Option<String>,
    pub title: Option<String>,
    pub phone: Option<String>,
    pub linkedin_url: Option<String>,
    pub custom: serde_json::Value,
    pub enrichment: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
}

/// Contacts newest first: the one with `email` if given, those whose search text matches
/// the LIKE `pattern` if given, after the one at `after` (its creation time and id).
pub async fn page(
    conn: &mut PgConnection,
    email: Option<&str>,
    pattern: Option<&str>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<ContactRow>, sqlx::Error> {
    let (after_at, after_id) = after.unzip();
    sqlx::query_as!(
        ContactRow,
        "SELECT id, email, first_name, last_name, company, company_domain, title, phone,
                linkedin_url, custom, enrichment, created_at, updated_at, version
         FROM contacts_view
         WHERE ($1::text IS NULL OR email = $1)
           AND ($2::text IS NULL OR search LIKE $2)
           AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
         ORDER BY created_at DESC, id DESC
         LIMIT $5",
        email,
        pattern,
        after_at,
        after_id,
        limit
    )
    .fetch_all(conn)
    .await
}

/// How many contacts there are.
pub async fn total(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT coalesce((SELECT contacts FROM contact_totals_view), 0) AS "n!""#)
        .fetch_one(conn)
        .await
}
