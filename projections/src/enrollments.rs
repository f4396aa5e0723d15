//! Read model `enrollments`: every enrollment's effective milestones and status (behind
//! `GET /v1/campaigns/{id}/enrollments`), per-campaign milestone counts (behind
//! `GET /v1/campaigns/{id}/metrics` and the dashboard) and per-campaign, per-UTC-day
//! counts (behind `GET /v1/analytics/campaigns/{id}/timeseries`).
//!
//! The row keeps the effective (implied) times. Recording a report on them and implying
//! again gives the same times as doing so on the reported ones (the implication takes
//! minimums), so the row needs no history. A campaign count moves up by one when an
//! enrollment reaches a milestone for the first time; milestones are never lost, so those
//! counts never move down and never count an enrollment twice. A day count follows the
//! day of the milestone's effective time: when a late report moves a milestone earlier,
//! its old day loses one and its new day gains one.

use std::collections::{BTreeMap, HashSet};

use aggregates::enrollment::{Enrollment, EnrollmentEvent, Milestones};
use chrono::{DateTime, NaiveDate, Utc};
use cqrs_es::Aggregate;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::copy::Rows;
use crate::{FeedEvent, Projection, ProjectionError, column, events_of, ids, utc_day};

/// The read model's name: its checkpoint, its advisory lock, what `min_position` waits for.
pub const NAME: &str = "enrollments";

pub struct EnrollmentsProjection;

/// One enrollment as the read model keeps it.
#[derive(Debug, Clone, Copy)]
struct Row {
    campaign_id: Uuid,
    contact_id: Uuid,
    stop_on_reply: bool,
    enrolled_at: DateTime<Utc>,
    milestones: Milestones,
    version: i64,
}

/// The counted steps: `enrolled`, then the eight milestones, in the order of the count
/// columns of `campaign_metrics_view` and `campaign_days_view`.
type Counts = [i64; 9];

impl Row {
    /// When the enrollment reached each counted step.
    fn steps(&self) -> [Option<DateTime<Utc>>; 9] {
        let m = &self.milestones;
        [
            Some(self.enrolled_at),
            m.sent_at,
            m.delivered_at,
            m.opened_at,
            m.clicked_at,
            m.replied_at,
            m.bounced_at,
            m.unsubscribed_at,
            m.complained_at,
        ]
    }
}

/// An enrollment the batch touches: as the read model has it before the batch (`None`:
/// it has no row yet) and as it is after.
struct Change {
    before: Option<Row>,
    after: Row,
}

#[async_trait::async_trait]
impl Projection for EnrollmentsProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "enrollments_view",
            "campaign_metrics_view",
            "campaign_days_view",
        ]
    }

    fn rewritten(&self) -> &'static [&'static str] {
        &["enrollments_view"]
    }

    fn totals(&self) -> &'static [&'static str] {
        &["campaign_metrics_view", "campaign_days_view"]
    }

    /// Loads the enrollments the batch changes in one query, folds the batch in memory,
    /// then writes new rows, changed rows, campaign counts and day counts with one
    /// statement each.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        apply(conn, events).await
    }

    fn fill(&self) -> Box<dyn crate::Fill + '_> {
        Box::new(Filling::default())
    }

    /// Counts each campaign's enrollments that reached each step, and each campaign's
    /// steps by the UTC day of their effective time: the counts every enrollment's first
    /// reaching of a step, and every move of a step to another day, add up to.
    async fn fill_totals(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query!("DELETE FROM campaign_metrics_view")
            .execute(&mut *conn)
            .await?;
        sqlx::query!(
            "INSERT INTO campaign_metrics_view
                 (campaign_id, enrolled, sent, delivered, opened, clicked, replied, bounced,
                  unsubscribed, complained)
             SELECT campaign_id, count(*), count(sent_at), count(delivered_at),
                    count(opened_at), count(clicked_at), count(replied_at), count(bounced_at),
                    count(unsubscribed_at), count(complained_at)
             FROM enrollments_view GROUP BY campaign_id"
        )
        .execute(&mut *conn)
        .await?;
        sqlx::query!("DELETE FROM campaign_days_view")
            .execute(&mut *conn)
            .await?;
        // The steps in the order of `Row::steps`, each on the UTC day of its time.
        sqlx::query!(
            "INSERT INTO campaign_days_view
                 (campaign_id, day, enrolled, sent, delivered, opened, clicked, replied,
                  bounced, unsubscribed, complained)
             SELECT e.campaign_id, (s.at AT TIME ZONE 'UTC')::date,
                    count(*) FILTER (WHERE s.step = 0), count(*) FILTER (WHERE s.step = 1),
                    count(*) FILTER (WHERE s.step = 2), count(*) FILTER (WHERE s.step = 3),
                    count(*) FILTER (WHERE s.step = 4), count(*) FILTER (WHERE s.step = 5),
                    count(*) FILTER (WHERE s.step = 6), count(*) FILTER (WHERE s.step = 7),
                    count(*) FILTER (WHERE s.step = 8)
             FROM enrollments_view e
             CROSS JOIN LATERAL (VALUES (0, e.enrolled_at), (1, e.sent_at),
                 (2, e.delivered_at), (3, e.opened_at), (4, e.clicked_at), (5, e.replied_at),
                 (6, e.bounced_at), (7, e.unsubscribed_at), (8, e.complained_at)) AS s(step, at)
             WHERE s.at IS NOT NULL
             GROUP BY 1, 2"
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

async fn apply(conn: &mut PgConnection, events: &[FeedEvent]) -> Result<(), ProjectionError> {
    let changes = fold(conn, events, &mut BTreeMap::new()).await?;
    write(conn, changes).await
}

/// A rebuild's fill ([`crate::Fill`]): the enrollments enrolled since the last commit are
/// held in memory, with the reports that follow them (closely, as a rule) folded on
/// them, and written once, by `COPY`, just before the commit, instead of being inserted
/// and then rewritten by each later batch. Memory holds the rows of one commit's batches.
#[derive(Default)]
struct Filling {
    held: BTreeMap<Uuid, Row>,
}

#[async_trait::async_trait]
impl crate::Fill for Filling {
    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        let mut changed = Vec::new();
        for (id, change) in fold(conn, events, &mut self.held).await? {
            match change.before {
                None => {
                    self.held.insert(id, change.after);
                }
                Some(_) => changed.push((id, change.after)),
            }
        }
        if !changed.is_empty() {
            update(conn, &changed).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        let held: Vec<(Uuid, Row)> = std::mem::take(&mut self.held).into_iter().collect();
        if !held.is_empty() {
            copy_in(conn, &held).await?;
        }
        Ok(())
    }
}

/// Folds the enrollment events of `events` on the enrollments they touch: those `held`
/// (enrolled earlier, not yet written; the ones touched are taken out of it), those the
/// batch enrolls, and the others as the read model has them.
async fn fold(
    conn: &mut PgConnection,
    events: &[FeedEvent],
    held: &mut BTreeMap<Uuid, Row>,
) -> Result<BTreeMap<Uuid, Change>, ProjectionError> {
    let events = events_of::<EnrollmentEvent>(events, Enrollment::TYPE)?;
    if events.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut enrolled_here = HashSet::new();
    let mut wanted = Vec::new();
    let mut changes = BTreeMap::new();
    for (_, id, event) in &events {
        match event {
            EnrollmentEvent::ContactEnrolled { .. } => {
                enrolled_here.insert(*id);
            }
            EnrollmentEvent::ProviderEventRecorded { .. } => {
                if let Some(row) = held.remove(id) {
                    changes.insert(
                        *id,
                        Change {
                            before: None,
                            after: row,
                        },
                    );
                } else if !enrolled_here.contains(id) && !changes.contains_key(id) {
                    wanted.push(*id);
                }
            }
        }
    }
    changes.extend(load(conn, &wanted).await?);
    for (event, id, decoded) in events {
        match decoded {
            EnrollmentEvent::ContactEnrolled {
                campaign_id,
                contact_id,
                stop_on_reply,
                enrolled_at,
            } => {
                if changes.contains_key(&id) || held.contains_key(&id) {
                    return Err(ProjectionError::Inconsistent {
                        position: event.at,
                        message: "an enrollment enrolled twice".into(),
                    });
                }
                let after = Row {
                    campaign_id,
                    contact_id,
                    stop_on_reply,
                    enrolled_at,
                    milestones: Milestones::default(),
                    version: 1,
                };
                changes.insert(
                    id,
                    Change {
                        before: None,
                        after,
                    },
                );
            }
            EnrollmentEvent::ProviderEventRecorded {
                kind, occurred_at, ..
            } => {
                let change = changes
                    .get_mut(&id)
                    .ok_or_else(|| ProjectionError::Inconsistent {
                        position: event.at,
                        message: "a provider event for an enrollment the read model \
                                      does not have"
                            .into(),
                    })?;
                let mut m = change.after.milestones;
                m.record(kind, occurred_at);
                change.after.milestones = m.implied();
                change.after.version += 1;
            }
        }
    }
    Ok(changes)
}

/// The enrollments `ids` as the read model has them.
async fn load(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<BTreeMap<Uuid, Change>, ProjectionError> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let rows = sqlx::query!(
        "SELECT id, campaign_id, contact_id, stop_on_reply, enrolled_at, sent_at, delivered_at,
                opened_at, clicked_at, replied_at, bounced_at, unsubscribed_at, complained_at,
                version
         FROM enrollments_view WHERE id = ANY($1)",
        ids
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let row = Row {
                campaign_id: r.campaign_id,
                contact_id: r.contact_id,
                stop_on_reply: r.stop_on_reply,
                enrolled_at: r.enrolled_at,
                milestones: Milestones {
                    sent_at: r.sent_at,
                    delivered_at: r.delivered_at,
                    opened_at: r.opened_at,
                    clicked_at: r.clicked_at,
                    replied_at: r.replied_at,
                    bounced_at: r.bounced_at,
                    unsubscribed_at: r.unsubscribed_at,
                    complained_at: r.complained_at,
                },
                version: r.version,
            };
            (
                r.id,
                Change {
                    before: Some(row),
                    after: row,
                },
            )
        })
        .collect())
}

async fn write(
    conn: &mut PgConnection,
    changes: BTreeMap<Uuid, Change>,
) -> Result<(), ProjectionError> {
    // A campaign count moves when an enrollment first reaches a step; a day count moves
    // when a step's day changes.
    let mut campaigns: BTreeMap<Uuid, Counts> = BTreeMap::new();
    let mut days: BTreeMap<(Uuid, NaiveDate), Counts> = BTreeMap::new();
    let mut new = Vec::new();
    let mut changed = Vec::new();
    for (id, change) in changes {
        if change.before.is_none() {
            new.push((id, change.after));
        } else {
            changed.push((id, change.after));
        }
        let campaign = change.after.campaign_id;
        let before = change.before.map_or([None; 9], |b| b.steps());
        for (k, (old, now)) in before.into_iter().zip(change.after.steps()).enumerate() {
            if old.is_none() && now.is_some() {
                campaigns.entry(campaign).or_default()[k] += 1;
            }
            let (old, now) = (old.map(utc_day), now.map(utc_day));
            if old != now {
                if let Some(day) = old {
                    days.entry((campaign, day)).or_default()[k] -= 1;
                }
                if let Some(day) = now {
                    days.entry((campaign, day)).or_default()[k] += 1;
                }
            }
        }
    }
    if !new.is_empty() {
        insert(conn, &new).await?;
    }
    if !changed.is_empty() {
        update(conn, &changed).await?;
    }
    campaigns.retain(|_, c| c.iter().any(|n| *n != 0));
    if !campaigns.is_empty() {
        let counts: Vec<&Counts> = campaigns.values().collect();
        let col = |k: usize| counts.iter().map(|c| c[k]).collect::<Vec<i64>>();
        sqlx::query!(
            "INSERT INTO campaign_metrics_view
                 (campaign_id, enrolled, sent, delivered, opened, clicked, replied, bounced,
                  unsubscribed, complained)
             SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::int8[], $5::int8[],
                 $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::int8[])
             ON CONFLICT (campaign_id) DO UPDATE SET
                 enrolled = campaign_metrics_view.enrolled + EXCLUDED.enrolled,
                 sent = campaign_metrics_view.sent + EXCLUDED.sent,
                 delivered = campaign_metrics_view.delivered + EXCLUDED.delivered,
                 opened = campaign_metrics_view.opened + EXCLUDED.opened,
                 clicked = campaign_metrics_view.clicked + EXCLUDED.clicked,
                 replied = campaign_metrics_view.replied + EXCLUDED.replied,
                 bounced = campaign_metrics_view.bounced + EXCLUDED.bounced,
                 unsubscribed = campaign_metrics_view.unsubscribed + EXCLUDED.unsubscribed,
                 complained = campaign_metrics_view.complained + EXCLUDED.complained",
            &campaigns.keys().copied().collect::<Vec<_>>(),
            &col(0),
            &col(1),
            &col(2),
            &col(3),
            &col(4),
            &col(5),
            &col(6),
            &col(7),
            &col(8),
        )
        .execute(&mut *conn)
        .await?;
    }
    days.retain(|_, c| c.iter().any(|n| *n != 0));
    if !days.is_empty() {
        let counts: Vec<&Counts> = days.values().collect();
        let col = |k: usize| counts.iter().map(|c| c[k]).collect::<Vec<i64>>();
        let campaign_ids: Vec<Uuid> = days.keys().map(|(c, _)| *c).collect();
        let day_list: Vec<NaiveDate> = days.keys().map(|(_, d)| *d).collect();
        // Update the days that have a row, then insert the others: a delta may be
        // negative, and PostgreSQL checks an insert's row against the table's CHECKs
        // before it looks for a conflict.
        sqlx::query!(
            "WITH d AS (
                 SELECT * FROM UNNEST($1::uuid[], $2::date[], $3::int8[], $4::int8[], $5::int8[],
                     $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[])
                     AS d(campaign_id, day, enrolled, sent, delivered, opened, clicked, replied,
                          bounced, unsubscribed, complained)
             ), updated AS (
                 UPDATE campaign_days_view v SET
                     enrolled = v.enrolled + d.enrolled, sent = v.sent + d.sent,
                     delivered = v.delivered + d.delivered, opened = v.opened + d.opened,
                     clicked = v.clicked + d.clicked, replied = v.replied + d.replied,
                     bounced = v.bounced + d.bounced,
                     unsubscribed = v.unsubscribed + d.unsubscribed,
                     complained = v.complained + d.complained
                 FROM d WHERE v.campaign_id = d.campaign_id AND v.day = d.day
                 RETURNING v.campaign_id, v.day
             )
             INSERT INTO campaign_days_view
             SELECT d.* FROM d
             WHERE NOT EXISTS (
                 SELECT 1 FROM updated u WHERE u.campaign_id = d.campaign_id AND u.day = d.day
             )",
            &campaign_ids,
            &day_list,
            &col(0),
            &col(1),
            &col(2),
            &col(3),
            &col(4),
            &col(5),
            &col(6),
            &col(7),
            &col(8),
        )
        .execute(&mut *conn)
        .await?;
        // A day whose every count went back to zero has no row, as if never counted.
        sqlx::query!(
            "DELETE FROM campaign_days_view d
             USING UNNEST($1::uuid[], $2::date[]) AS k(campaign_id, day)
             WHERE d.campaign_id = k.campaign_id AND d.day = k.day
               AND d.enrolled = 0 AND d.sent = 0 AND d.delivered = 0 AND d.opened = 0
               AND d.clicked = 0 AND d.replied = 0 AND d.bounced = 0 AND d.unsubscribed = 0
               AND d.complained = 0",
            &campaign_ids,
            &day_list
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// A milestone column of every row.
fn milestone(
    rows: &[(Uuid, Row)],
    f: fn(&Milestones) -> Option<DateTime<Utc>>,
) -> Vec<Option<DateTime<Utc>>> {
    column(rows, |r| f(&r.milestones))
}

async fn insert(conn: &mut PgConnection, rows: &[(Uuid, Row)]) -> Result<(), ProjectionError> {
    sqlx::query!(
        "INSERT INTO enrollments_view
            (id, campaign_id, contact_id, status, stop_on_reply, enrolled_at,
             sent_at, delivered_at, opened_at, clicked_at, replied_at, bounced_at, unsubscribed_at,
             complained_at, sequence_ended_at, version)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::bool[],
             $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::timestamptz[],
             $10::timestamptz[], $11::timestamptz[], $12::timestamptz[], $13::timestamptz[],
             $14::timestamptz[], $15::timestamptz[], $16::int8[])",
        &ids(rows),
        &column(rows, |r| r.campaign_id),
        &column(rows, |r| r.contact_id),
        &column(rows, |r| r.milestones.status().as_str().to_string()),
        &column(rows, |r| r.stop_on_reply),
        &column(rows, |r| r.enrolled_at),
        &milestone(rows, |m| m.sent_at) as _,
        &milestone(rows, |m| m.delivered_at) as _,
        &milestone(rows, |m| m.opened_at) as _,
        &milestone(rows, |m| m.clicked_at) as _,
        &milestone(rows, |m| m.replied_at) as _,
        &milestone(rows, |m| m.bounced_at) as _,
        &milestone(rows, |m| m.unsubscribed_at) as _,
        &milestone(rows, |m| m.complained_at) as _,
        &column(rows, |r| sequence_end(&r.milestones, r.stop_on_reply)) as _,
        &column(rows, |r| r.version),
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// [`insert`] by binary `COPY`, for a rebuild's fill.
async fn copy_in(conn: &mut PgConnection, rows: &[(Uuid, Row)]) -> Result<(), ProjectionError> {
    let mut copy = Rows::new();
    for (id, r) in rows {
        let m = &r.milestones;
        copy.push(&[
            id,
            &r.campaign_id,
            &r.contact_id,
            &m.status().as_str(),
            &r.stop_on_reply,
            &r.enrolled_at,
            &m.sent_at,
            &m.delivered_at,
            &m.opened_at,
            &m.clicked_at,
            &m.replied_at,
            &m.bounced_at,
            &m.unsubscribed_at,
            &m.complained_at,
            &sequence_end(m, r.stop_on_reply),
            &r.version,
        ]);
    }
    copy.copy(
        conn,
        "COPY enrollments_view
            (id, campaign_id, contact_id, status, stop_on_reply, enrolled_at,
             sent_at, delivered_at, opened_at, clicked_at, replied_at, bounced_at, unsubscribed_at,
             complained_at, sequence_ended_at, version)
         FROM STDIN (FORMAT binary)",
    )
    .await?;
    Ok(())
}

async fn update(conn: &mut PgConnection, rows: &[(Uuid, Row)]) -> Result<(), ProjectionError> {
    sqlx::query!(
        "UPDATE enrollments_view e SET status = u.status, sent_at = u.sent_at,
             delivered_at = u.delivered_at, opened_at = u.opened_at, clicked_at = u.clicked_at,
             replied_at = u.replied_at, bounced_at = u.bounced_at,
             unsubscribed_at = u.unsubscribed_at, complained_at = u.complained_at,
             sequence_ended_at = u.sequence_ended_at, version = u.version
         FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[],
             $5::timestamptz[], $6::timestamptz[], $7::timestamptz[], $8::timestamptz[],
             $9::timestamptz[], $10::timestamptz[], $11::timestamptz[], $12::int8[])
             AS u(id, status, sent_at, delivered_at, opened_at, clicked_at, replied_at, bounced_at,
                  unsubscribed_at, complained_at, sequence_ended_at, version)
         WHERE e.id = u.id",
        &ids(rows),
        &column(rows, |r| r.milestones.status().as_str().to_string()),
        &milestone(rows, |m| m.sent_at) as _,
        &milestone(rows, |m| m.delivered_at) as _,
        &milestone(rows, |m| m.opened_at) as _,
        &milestone(rows, |m| m.clicked_at) as _,
        &milestone(rows, |m| m.replied_at) as _,
        &milestone(rows, |m| m.bounced_at) as _,
        &milestone(rows, |m| m.unsubscribed_at) as _,
        &milestone(rows, |m| m.complained_at) as _,
        &column(rows, |r| sequence_end(&r.milestones, r.stop_on_reply)) as _,
        &column(rows, |r| r.version),
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// When the sequence stops, as the aggregate decides it (see `Enrollment::sequence_ended_at`).
fn sequence_end(m: &Milestones, stop_on_reply: bool) -> Option<DateTime<Utc>> {
    let mut ends = vec![m.bounced_at, m.complained_at, m.unsubscribed_at];
    if stop_on_reply {
        ends.push(m.replied_at);
    }
    ends.into_iter().flatten().min()
}

/// One enrollment of a campaign's list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentRow {
    pub id: Uuid,
    pub campaign_id: Uuid,
    pub contact_id: Uuid,
    pub status: String,
    pub enrolled_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub opened_at: Option<DateTime<Utc>>,
    pub clicked_at: Option<DateTime<Utc>>,
    pub replied_at: Option<DateTime<Utc>>,
    pub bounced_at: Option<DateTime<Utc>>,
    pub unsubscribed_at: Option<DateTime<Utc>>,
    pub complained_at: Option<DateTime<Utc>>,
    pub sequence_ended_at: Option<DateTime<Utc>>,
    pub version: i64,
}

/// A campaign's enrollments newest first, with `status` if given, after the one at
/// `after` (its enrollment time and id).
pub async fn page(
    conn: &mut PgConnection,
    campaign: Uuid,
    status: Option<&str>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<EnrollmentRow>, sqlx::Error> {
    let (after_at, after_id) = after.unzip();
    sqlx::query_as!(
        EnrollmentRow,
        "SELECT id, campaign_id, contact_id, status, enrolled_at, sent_at, delivered_at, opened_at,
                clicked_at, replied_at, bounced_at, unsubscribed_at, complained_at,
                sequence_ended_at, version
         FROM enrollments_view
         WHERE campaign_id = $1
           AND ($2::text IS NULL OR status = $2)
           AND ($3::timestamptz IS NULL OR (enrolled_at, id) < ($3, $4))
         ORDER BY enrolled_at DESC, id DESC
         LIMIT $5",
        campaign,
        status,
        after_at,
        after_id,
        limit
    )
    .fetch_all(conn)
    .await
}

/// A campaign's milestone counts: enrollments that reached each milestone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsRow {
    pub enrolled: i64,
    pub sent: i64,
    pub delivered: i64,
    pub opened: i64,
    pub clicked: i64,
    pub replied: i64,
    pub bounced: i64,
    pub unsubscribed: i64,
    pub complained: i64,
}

/// The counts of `campaign`, if the read model has any.
pub async fn campaign_metrics(
    conn: &mut PgConnection,
    campaign: Uuid,
) -> Result<Option<MetricsRow>, sqlx::Error> {
    sqlx::query_as!(
        MetricsRow,
        "SELECT enrolled, sent, delivered, opened, clicked, replied, bounced, unsubscribed,
                complained
         FROM campaign_metrics_view WHERE campaign_id = $1",
        campaign
    )
    .fetch_optional(conn)
    .await
}

/// A campaign's counts beside its id, for a page of campaigns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CampaignMetricsRow {
    pub campaign_id: Uuid,
    pub enrolled: i64,
    pub sent: i64,
    pub delivered: i64,
    pub opened: i64,
    pub clicked: i64,
    pub replied: i64,
    pub bounced: i64,
    pub unsubscribed: i64,
    pub complained: i64,
}

/// The counts of each of `campaigns` that has any, read by the primary key.
pub async fn metrics_of(
    conn: &mut PgConnection,
    campaigns: &[Uuid],
) -> Result<Vec<CampaignMetricsRow>, sqlx::Error> {
    sqlx::query_as!(
        CampaignMetricsRow,
        "SELECT campaign_id, enrolled, sent, delivered, opened, clicked, replied, bounced,
                unsubscribed, complained
         FROM campaign_metrics_view WHERE campaign_id = ANY($1)",
        campaigns
    )
    .fetch_all(conn)
    .await
}

/// A contact's enrollments newest first, after the one at `after` (its enrollment time
/// and id).
pub async fn of_contact(
    conn: &mut PgConnection,
    contact: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<EnrollmentRow>, sqlx::Error> {
    let (after_at, after_id) = after.unzip();
    sqlx::query_as!(
        EnrollmentRow,
        "SELECT id, campaign_id, contact_id, status, enrolled_at, sent_at, delivered_at, opened_at,
                clicked_at, replied_at, bounced_at, unsubscribed_at, complained_at,
                sequence_ended_at, version
         FROM enrollments_view
         WHERE contact_id = $1
           AND ($2::timestamptz IS NULL OR (enrolled_at, id) < ($2, $3))
         ORDER BY enrolled_at DESC, id DESC
         LIMIT $4",
        contact,
        after_at,
        after_id,
        limit
    )
    .fetch_all(conn)
    .await
}

/// One UTC day of a campaign: enrollments that reached each milestone that day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayRow {
    pub day: NaiveDate,
    pub enrolled: i64,
    pub sent: i64,
    pub delivered: i64,
    pub opened: i64,
    pub clicked: i64,
    pub replied: i64,
    pub bounced: i64,
    pub unsubscribed: i64,
    pub complained: i64,
}

/// Every UTC day from `from` to `to` of `campaign`, oldest first, days without a
/// milestone included (all zero).
pub async fn campaign_days(
    conn: &mut PgConnection,
    campaign: Uuid,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<DayRow>, sqlx::Error> {
    sqlx::query_as!(
        DayRow,
        r#"SELECT d.day AS "day!",
                  coalesce(v.enrolled, 0) AS "enrolled!", coalesce(v.sent, 0) AS "sent!",
                  coalesce(v.delivered, 0) AS "delivered!", coalesce(v.opened, 0) AS "opened!",
                  coalesce(v.clicked, 0) AS "clicked!", coalesce(v.replied, 0) AS "replied!",
                  coalesce(v.bounced, 0) AS "bounced!",
                  coalesce(v.unsubscribed, 0) AS "unsubscribed!",
                  coalesce(v.complained, 0) AS "complained!"
           FROM generate_series($2::date, $3::date, interval '1 day') AS g(at)
           CROSS JOIN LATERAL (SELECT g.at::date AS day) AS d
           LEFT JOIN campaign_days_view v ON v.campaign_id = $1 AND v.day = d.day
           ORDER BY d.day"#,
        campaign,
        from,
        to
    )
    .fetch_all(conn)
    .await
}

/// The counts of every campaign added up.
pub async fn totals(conn: &mut PgConnection) -> Result<MetricsRow, sqlx::Error> {
    sqlx::query_as!(
        MetricsRow,
        r#"SELECT coalesce(sum(enrolled), 0)::bigint AS "enrolled!",
                  coalesce(sum(sent), 0)::bigint AS "sent!",
                  coalesce(sum(delivered), 0)::bigint AS "delivered!",
                  coalesce(sum(opened), 0)::bigint AS "opened!",
                  coalesce(sum(clicked), 0)::bigint AS "clicked!",
                  coalesce(sum(replied), 0)::bigint AS "replied!",
                  coalesce(sum(bounced), 0)::bigint AS "bounced!",
                  coalesce(sum(unsubscribed), 0)::bigint AS "unsubscribed!",
                  coalesce(sum(complained), 0)::bigint AS "complained!"
           FROM campaign_metrics_view"#
    )
    .fetch_one(conn)
    .await
}

/// A campaign with its delivered and replied counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRow {
    pub campaign_id: Uuid,
    pub name: String,
    pub status: String,
    pub delivered: i64,
    pub replied: i64,
}

/// The `limit` campaigns with the best reply rate (replied / delivered), ties by replies,
/// then by id; their names and statuses from the campaigns read model.
pub async fn top_by_reply_rate(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<ReplyRow>, sqlx::Error> {
    sqlx::query_as!(
        ReplyRow,
        "SELECT m.campaign_id, c.name, c.status, m.delivered, m.replied
         FROM campaign_metrics_view m JOIN campaigns_view c ON c.id = m.campaign_id
         WHERE m.delivered > 0
         ORDER BY m.replied::numeric / m.delivered DESC, m.replied DESC, m.campaign_id
         LIMIT $1",
        limit
    )
    .fetch_all(conn)
    .await
}
