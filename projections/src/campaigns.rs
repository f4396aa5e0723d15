//! Read model `campaigns`: the campaign list with status, behind `GET /v1/campaigns`.

use std::collections::BTreeMap;

use aggregates::campaign::{Campaign, CampaignEvent};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    FeedEvent, Position, Projection, ProjectionError, column, events_of, ids, missing_row,
};

/// The read model's name: its checkpoint, its advisory lock, what `min_position` waits for.
pub const NAME: &str = "campaigns";

pub struct CampaignsProjection;

/// What a batch does to one campaign: creates it (with the batch's later events folded
/// in), or changes one that existed before the batch.
struct Change {
    /// `stop_on_reply` and `created_at`, for a campaign created in the batch.
    created: Option<(bool, DateTime<Utc>)>,
    name: Option<String>,
    status: Option<&'static str>,
    updated_at: DateTime<Utc>,
    /// Events applied: `version` counts them, so an event applied twice would show.
    events: i64,
    last_position: i64,
    first: Position,
}

#[async_trait::async_trait]
impl Projection for CampaignsProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &["campaigns_view"]
    }

    /// Folds the batch per campaign, then one insert for the new campaigns and one update
    /// for the others.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        let mut changes: BTreeMap<Uuid, Change> = BTreeMap::new();
        for (event, id, decoded) in events_of::<CampaignEvent>(events, Campaign::TYPE)? {
            let (name, status, at) = match decoded {
                CampaignEvent::CampaignCreated {
                    name,
                    stop_on_reply,
                    created_at,
                } => {
                    if changes.contains_key(&id) {
                        return Err(ProjectionError::Inconsistent {
                            position: event.at,
                            message: "a campaign created twice".into(),
                        });
                    }
                    changes.insert(
                        id,
                        Change {
                            created: Some((stop_on_reply, created_at)),
                            name: Some(name.as_str().to_string()),
                            status: Some("draft"),
                            updated_at: created_at,
                            events: 1,
                            last_position: event.at.position,
                            first: event.at,
                        },
                    );
                    continue;
                }
                CampaignEvent::CampaignRenamed { name, renamed_at } => {
                    (Some(name.as_str().to_string()), None, renamed_at)
                }
                CampaignEvent::CampaignStarted { started_at } => {
                    (None, Some("running"), started_at)
                }
                CampaignEvent::CampaignPaused { paused_at } => (None, Some("paused"), paused_at),
                CampaignEvent::CampaignCompleted { completed_at } => {
                    (None, Some("completed"), completed_at)
                }
                CampaignEvent::CampaignExternalIdsChanged { changed_at, .. } => {
                    (None, None, changed_at)
                }
            };
            let change = changes.entry(id).or_insert_with(|| Change {
                created: None,
                name: None,
                status: None,
                updated_at: at,
                events: 0,
                last_position: event.at.position,
                first: event.at,
            });
            if name.is_some() {
                change.name = name;
            }
            if status.is_some() {
                change.status = status;
            }
            change.updated_at = at;
            change.events += 1;
            change.last_position = event.at.position;
        }
        let (created, changed): (Vec<_>, Vec<_>) =
            changes.into_iter().partition(|(_, c)| c.created.is_some());
        if !created.is_empty() {
            insert(conn, &created).await?;
        }
        if !changed.is_empty() {
            update(conn, &changed).await?;
        }
        Ok(())
    }
}

async fn insert(conn: &mut PgConnection, rows: &[(Uuid, Change)]) -> Result<(), ProjectionError> {
    let created = |c: &Change| c.created.unwrap_or((false, c.updated_at));
    sqlx::query!(
        "INSERT INTO campaigns_view
             (id, name, status, stop_on_reply, created_at, updated_at, version, last_position)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bool[], $5::timestamptz[],
             $6::timestamptz[], $7::int8[], $8::int8[])",
        &ids(rows),
        &column(rows, |c| c.name.clone().unwrap_or_default()),
        &column(rows, |c| c.status.unwrap_or("draft").to_string()),
        &column(rows, |c| created(c).0),
        &column(rows, |c| created(c).1),
        &column(rows, |c| c.updated_at),
        &column(rows, |c| c.events),
        &column(rows, |c| c.last_position),
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn update(conn: &mut PgConnection, rows: &[(Uuid, Change)]) -> Result<(), ProjectionError> {
    let updated = sqlx::query!(
        "UPDATE campaigns_view c
         SET name = coalesce(u.name, c.name), status = coalesce(u.status, c.status),
             updated_at = u.updated_at, version = c.version + u.events,
             last_position = u.last_position
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::int8[], $6::int8[])
             AS u(id, name, status, updated_at, events, last_position)
         WHERE c.id = u.id",
        &ids(rows),
        &column(rows, |c| c.name.clone()) as _,
        &column(rows, |c| c.status.map(str::to_string)) as _,
        &column(rows, |c| c.updated_at),
        &column(rows, |c| c.events),
        &column(rows, |c| c.last_position),
    )
    .execute(&mut *conn)
    .await?;
    if updated.rows_affected() == rows.len() as u64 {
        return Ok(());
    }
    let present: Vec<Uuid> = sqlx::query_scalar!(
        "SELECT id FROM campaigns_view WHERE id = ANY($1)",
        &ids(rows)
    )
    .fetch_all(&mut *conn)
    .await?;
    Err(missing_row(
        rows,
        &present,
        |c| c.first,
        "an event for a campaign the read model does not have",
    ))
}

/// One campaign of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignRow {
    pub id: Uuid,
    pub name: String,
    pub status: String,
    pub stop_on_reply: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
}

/// Campaigns newest first, with `status` if given, after the one at `after`
/// (its creation time and id).
pub async fn page(
    conn: &mut PgConnection,
    status: Option<&str>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<CampaignRow>, sqlx::Error> {
    let (after_at, after_id) = after.unzip();
    sqlx::query_as!(
        CampaignRow,
        "SELECT id, name, status, stop_on_reply, created_at, updated_at, version
         FROM campaigns_view
         WHERE ($1::text IS NULL OR status = $1)
           AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
         ORDER BY created_at DESC, id DESC
         LIMIT $4",
        status,
        after_at,
        after_id,
        limit
    )
    .fetch_all(conn)
    .await
}

/// Campaigns by status: each status that has any, with how many.
pub async fn count_by_status(conn: &mut PgConnection) -> Result<Vec<StatusCount>, sqlx::Error> {
    sqlx::query_as!(
        StatusCount,
        r#"SELECT status, count(*) AS "n!" FROM campaigns_view GROUP BY status"#
    )
    .fetch_all(conn)
    .await
}

/// A status and how many campaigns have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusCount {
    pub status: String,
    pub n: i64,
}

/// Whether the read model has the campaign `id`.
pub async fn exists(conn: &mut PgConnection, id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM campaigns_view WHERE id = $1) AS "exists!""#,
        id
    )
    .fetch_one(conn)
    .await
}
