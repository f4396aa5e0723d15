//! Read model `enrollments`: every enrollment's effective milestones and status (behind
//! `GET /v1/campaigns/{id}/enrollments`) and per-campaign milestone counts (behind
//! `GET /v1/campaigns/{id}/metrics`).
//!
//! The row keeps the effective (implied) times. Recording a report on them and implying
//! again gives the same times as doing so on the reported ones (the implication takes
//! minimums), so the row needs no history. A count moves up by one when an enrollment
//! reaches a milestone for the first time; milestones are never lost, so counts never
//! move down and never count an enrollment twice.

use aggregates::enrollment::{Enrollment, EnrollmentEvent, Milestones};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use sqlx::PgConnection;

use crate::{FeedEvent, Projection, ProjectionError, decode, uuid_of};

pub struct EnrollmentsProjection;

/// The eight counted milestones (besides `enrolled`), in the order of `campaign_metrics_view`'s columns.
fn reached(m: &Milestones) -> [bool; 8] {
    [
        m.sent_at.is_some(),
        m.delivered_at.is_some(),
        m.opened_at.is_some(),
        m.clicked_at.is_some(),
        m.replied_at.is_some(),
        m.bounced_at.is_some(),
        m.unsubscribed_at.is_some(),
        m.complained_at.is_some(),
    ]
}

#[async_trait::async_trait]
impl Projection for EnrollmentsProjection {
    fn name(&self) -> &'static str {
        "enrollments"
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &FeedEvent,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_type != Enrollment::TYPE {
            return Ok(());
        }
        let id = uuid_of(event)?;
        match decode::<EnrollmentEvent>(event)? {
            EnrollmentEvent::ContactEnrolled {
                campaign_id,
                contact_id,
                stop_on_reply,
                enrolled_at,
            } => {
                sqlx::query!(
                    "INSERT INTO enrollments_view (id, campaign_id, contact_id, status, stop_on_reply, enrolled_at, version)
                     VALUES ($1, $2, $3, 'enrolled', $4, $5, 1)",
                    id,
                    campaign_id,
                    contact_id,
                    stop_on_reply,
                    enrolled_at
                )
                .execute(&mut *conn)
                .await?;
                sqlx::query!(
                    "INSERT INTO campaign_metrics_view (campaign_id, enrolled) VALUES ($1, 1)
                     ON CONFLICT (campaign_id) DO UPDATE SET enrolled = campaign_metrics_view.enrolled + 1",
                    campaign_id
                )
                .execute(&mut *conn)
                .await?;
                Ok(())
            }
            EnrollmentEvent::ProviderEventRecorded {
                kind, occurred_at, ..
            } => {
                let row = sqlx::query!(
                    "SELECT campaign_id, stop_on_reply, sent_at, delivered_at, opened_at, clicked_at, replied_at,
                            bounced_at, unsubscribed_at, complained_at
                     FROM enrollments_view WHERE id = $1 FOR UPDATE",
                    id
                )
                .fetch_optional(&mut *conn)
                .await?
                .ok_or_else(|| ProjectionError::Inconsistent {
                    position: event.at,
                    message: "a provider event for an enrollment the read model does not have"
                        .into(),
                })?;
                let before = Milestones {
                    sent_at: row.sent_at,
                    delivered_at: row.delivered_at,
                    opened_at: row.opened_at,
                    clicked_at: row.clicked_at,
                    replied_at: row.replied_at,
                    bounced_at: row.bounced_at,
                    unsubscribed_at: row.unsubscribed_at,
                    complained_at: row.complained_at,
                };
                let mut after = before;
                after.record(kind, occurred_at);
                let after = after.implied();
                let ended = sequence_end(&after, row.stop_on_reply);
                sqlx::query!(
                    "UPDATE enrollments_view SET status = $2, sent_at = $3, delivered_at = $4,
                         opened_at = $5, clicked_at = $6, replied_at = $7, bounced_at = $8,
                         unsubscribed_at = $9, complained_at = $10, sequence_ended_at = $11,
                         version = version + 1
                     WHERE id = $1",
                    id,
                    after.status().as_str(),
                    after.sent_at,
                    after.delivered_at,
                    after.opened_at,
                    after.clicked_at,
                    after.replied_at,
                    after.bounced_at,
                    after.unsubscribed_at,
                    after.complained_at,
                    ended
                )
                .execute(&mut *conn)
                .await?;
                let (old, new) = (reached(&before), reached(&after));
                let newly: Vec<i64> = old
                    .iter()
                    .zip(new)
                    .map(|(o, n)| i64::from(n && !o))
                    .collect();
                if newly.iter().any(|n| *n > 0) {
                    sqlx::query!(
                        "UPDATE campaign_metrics_view SET sent = sent + $2, delivered = delivered + $3,
                             opened = opened + $4, clicked = clicked + $5, replied = replied + $6,
                             bounced = bounced + $7, unsubscribed = unsubscribed + $8,
                             complained = complained + $9
                         WHERE campaign_id = $1",
                        row.campaign_id,
                        newly[0],
                        newly[1],
                        newly[2],
                        newly[3],
                        newly[4],
                        newly[5],
                        newly[6],
                        newly[7]
                    )
                    .execute(&mut *conn)
                    .await?;
                }
                Ok(())
            }
        }
    }
}

/// When the sequence stops, as the aggregate decides it (see `Enrollment::sequence_ended_at`).
fn sequence_end(m: &Milestones, stop_on_reply: bool) -> Option<DateTime<Utc>> {
    let mut ends = vec![m.bounced_at, m.complained_at, m.unsubscribed_at];
    if stop_on_reply {
        ends.push(m.replied_at);
    }
    ends.into_iter().flatten().min()
}
