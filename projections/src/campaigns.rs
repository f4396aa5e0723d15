//! Read model `campaigns`: the campaign list with status, behind `GET /v1/campaigns`.

use aggregates::campaign::{Campaign, CampaignEvent};
use cqrs_es::Aggregate;
use sqlx::PgConnection;

use uuid::Uuid;

use crate::{FeedEvent, Projection, ProjectionError, events_of};

pub struct CampaignsProjection;

#[async_trait::async_trait]
impl Projection for CampaignsProjection {
    fn name(&self) -> &'static str {
        "campaigns"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["campaigns_view"]
    }

    /// Campaign events are few (a handful per campaign), so each is its own statement.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        for (event, id, decoded) in events_of::<CampaignEvent>(events, Campaign::TYPE)? {
            apply_one(conn, event, id, decoded).await?;
        }
        Ok(())
    }
}

async fn apply_one(
    conn: &mut PgConnection,
    event: &FeedEvent,
    id: Uuid,
    decoded: CampaignEvent,
) -> Result<(), ProjectionError> {
    let position = event.at.position;
    // `version` counts the events applied, so an event applied twice would show.
    let (status, updated_at) = match decoded {
        CampaignEvent::CampaignCreated {
            name,
            stop_on_reply,
            created_at,
        } => {
            sqlx::query!(
                    "INSERT INTO campaigns_view (id, name, status, stop_on_reply, created_at, updated_at, version, last_position)
                     VALUES ($1, $2, 'draft', $3, $4, $4, 1, $5)",
                    id,
                    name.as_str(),
                    stop_on_reply,
                    created_at,
                    position
                )
                .execute(&mut *conn)
                .await?;
            return Ok(());
        }
        CampaignEvent::CampaignRenamed { name, renamed_at } => {
            let updated = sqlx::query!(
                    "UPDATE campaigns_view SET name = $2, updated_at = $3, version = version + 1, last_position = $4
                     WHERE id = $1",
                    id,
                    name.as_str(),
                    renamed_at,
                    position
                )
                .execute(&mut *conn)
                .await?;
            return expect_one(updated.rows_affected(), event);
        }
        CampaignEvent::CampaignStarted { started_at } => ("running", started_at),
        CampaignEvent::CampaignPaused { paused_at } => ("paused", paused_at),
        CampaignEvent::CampaignCompleted { completed_at } => ("completed", completed_at),
    };
    let updated = sqlx::query!(
            "UPDATE campaigns_view SET status = $2, updated_at = $3, version = version + 1, last_position = $4
             WHERE id = $1",
            id,
            status,
            updated_at,
            position
        )
        .execute(&mut *conn)
        .await?;
    expect_one(updated.rows_affected(), event)
}

fn expect_one(rows: u64, event: &FeedEvent) -> Result<(), ProjectionError> {
    if rows == 1 {
        Ok(())
    } else {
        Err(ProjectionError::Inconsistent {
            position: event.at,
            message: format!(
                "{} for a campaign the read model does not have",
                event.event_type
            ),
        })
    }
}
