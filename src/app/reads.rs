//! Reads and campaign lifecycle commands for entry points beyond the JSON routes (the web
//! console): the same read-model queries and stream loads the API answers from, so every
//! number agrees with it. Each read is a page or a kept total; none scans the event log.

use aggregates::budget::Budget;
use aggregates::campaign::{Campaign, CampaignCommand};
use aggregates::contact::Contact;
use aggregates::money::Money;
use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use http::StatusCode;
use uuid::Uuid;

pub use projections::campaigns::CampaignRow;
pub use projections::contacts::ContactRow;
pub use projections::costs::GroupBy;
pub use projections::enrollments::{CampaignMetricsRow, EnrollmentRow, MetricsRow};
pub use projections::status::{ProjectionStatus, RebuildInProgress};

use crate::app::App;
use crate::app::command::{self, Answer, CommandContext, Reply};
use crate::app::error::AppError;
use crate::store::Loaded;

/// The statuses a campaign can have, in lifecycle order.
pub const CAMPAIGN_STATUSES: [&str; 4] = ["draft", "running", "paused", "completed"];
/// The statuses an enrollment can have.
pub const ENROLLMENT_STATUSES: [&str; 9] = [
    "enrolled",
    "sent",
    "delivered",
    "opened",
    "clicked",
    "replied",
    "bounced",
    "unsubscribed",
    "complained",
];

/// Campaigns newest first (`GET /v1/campaigns`), each with its counts (zero when it has
/// no enrollment).
pub async fn campaigns(
    app: &App,
    status: Option<&str>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<(CampaignRow, MetricsRow)>, sqlx::Error> {
    let mut conn = app.pool.acquire().await?;
    let rows = projections::campaigns::page(&mut conn, status, after, limit).await?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let metrics = projections::enrollments::metrics_of(&mut conn, &ids).await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let m = metrics
                .iter()
                .find(|m| m.campaign_id == row.id)
                .map(|m| MetricsRow {
                    enrolled: m.enrolled,
                    sent: m.sent,
                    delivered: m.delivered,
                    opened: m.opened,
                    clicked: m.clicked,
                    replied: m.replied,
                    bounced: m.bounced,
                    unsubscribed: m.unsubscribed,
                    complained: m.complained,
                })
                .unwrap_or_else(zero_metrics);
            (row, m)
        })
        .collect())
}

fn zero_metrics() -> MetricsRow {
    MetricsRow {
        enrolled: 0,
        sent: 0,
        delivered: 0,
        opened: 0,
        clicked: 0,
        replied: 0,
        bounced: 0,
        unsubscribed: 0,
        complained: 0,
    }
}

/// A campaign from its stream (`GET /v1/campaigns/{id}`) with its counts
/// (`GET /v1/campaigns/{id}/metrics`).
pub async fn campaign(app: &App, id: Uuid) -> Result<(Loaded<Campaign>, MetricsRow), AppError> {
    let loaded = command::load_existing(
        app,
        id,
        |c: &Campaign| c.created,
        "no campaign with this id",
    )
    .await?;
    let mut conn = app.pool.acquire().await?;
    let metrics = projections::enrollments::campaign_metrics(&mut conn, id)
        .await?
        .unwrap_or_else(zero_metrics);
    Ok((loaded, metrics))
}

/// A campaign's enrollments newest first (`GET /v1/campaigns/{id}/enrollments`).
pub async fn enrollments(
    app: &App,
    campaign: Uuid,
    status: Option<&str>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<EnrollmentRow>, sqlx::Error> {
    let mut conn = app.pool.acquire().await?;
    projections::enrollments::page(&mut conn, campaign, status, after, limit).await
}

/// What the console may do to a campaign's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Start,
    Pause,
    Complete,
}

impl Transition {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "start" => Some(Self::Start),
            "pause" => Some(Self::Pause),
            "complete" => Some(Self::Complete),
            _ => None,
        }
    }
}

/// Starts, pauses or completes a campaign, as `POST /v1/campaigns/{id}/{transition}` does.
/// A transition its status does not allow is a conflict, with the domain's words.
pub async fn transition(
    app: &App,
    context: &CommandContext,
    id: Uuid,
    transition: Transition,
) -> Result<(), AppError> {
    let at = Utc::now();
    let answer = command::execute::<Campaign, AppError, _, _, _>(
        app,
        context,
        &id.to_string(),
        &(),
        |loaded: &Loaded<Campaign>| {
            if !loaded.aggregate.created {
                return Err(AppError::NotFound("no campaign with this id".into()));
            }
            Ok(match transition {
                Transition::Start => CampaignCommand::Start { at },
                Transition::Pause => CampaignCommand::Pause { at },
                Transition::Complete => CampaignCommand::Complete { at },
            })
        },
        |_| Reply::ok(serde_json::Value::Null),
        |refused: &AppError| {
            Reply::ok(serde_json::Value::String(refused.to_string()))
                .with_status(StatusCode::CONFLICT)
        },
    )
    .await?;
    match answer {
        Answer::Fresh(reply) if reply.status == StatusCode::CONFLICT => Err(AppError::conflict(
            "invalid-transition",
            reply.body.as_str().unwrap_or("not allowed from its status"),
        )),
        _ => Ok(()),
    }
}

/// Contacts newest first whose name, company, domain or email holds `q`
/// (`GET /v1/contacts?q=`), case-insensitive, `%` and `_` literal.
pub async fn contacts(
    app: &App,
    q: Option<&str>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<ContactRow>, AppError> {
    let pattern = match q.map(str::trim) {
        Some("") | None => None,
        Some(q) if q.chars().count() > 200 => {
            return Err(AppError::BadRequest(
                "search is at most 200 characters".into(),
            ));
        }
        Some(q) if q.chars().any(char::is_control) => {
            return Err(AppError::BadRequest(
                "search must not contain control characters".into(),
            ));
        }
        Some(q) => Some(format!(
            "%{}%",
            q.to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        )),
    };
    let mut conn = app.pool.acquire().await?;
    Ok(projections::contacts::page(&mut conn, None, pattern.as_deref(), after, limit).await?)
}

/// One entry of a contact's history: what happened, in its stream's order.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub sequence: usize,
    pub event_type: String,
    pub actor: Option<String>,
}

/// A contact from its stream (`GET /v1/contacts/{id}`), its history (the most recent
/// `history` events of its own stream) and its latest enrollments.
pub async fn contact(
    app: &App,
    id: Uuid,
    history: usize,
    enrollments: i64,
) -> Result<(Loaded<Contact>, Vec<HistoryEntry>, Vec<EnrollmentRow>), AppError> {
    let loaded =
        command::load_existing(app, id, |c: &Contact| c.created, "no contact with this id").await?;
    let mut conn = app.pool.acquire().await?;
    let events = app
        .store
        .load_events::<Contact>(&mut conn, &id.to_string())
        .await?;
    let skip = events.len().saturating_sub(history);
    let entries = events
        .into_iter()
        .skip(skip)
        .rev()
        .map(|e| HistoryEntry {
            sequence: e.sequence,
            event_type: e.payload.event_type(),
            actor: e.metadata.get("actor").cloned(),
        })
        .collect();
    let rows = projections::enrollments::of_contact(&mut conn, id, None, enrollments).await?;
    Ok((loaded, entries, rows))
}

/// A budget as `GET /v1/budgets` shows it: spent and reserved in its period as of `now`.
#[derive(Debug, Clone)]
pub struct BudgetView {
    pub id: Uuid,
    pub name: String,
    pub period: String,
    pub limit: Option<Money>,
    pub spent: Money,
    pub reserved: Money,
    pub remaining: Option<Money>,
}

/// Budgets oldest first after position `after` (`GET /v1/budgets`), with the position of
/// each for the next page.
pub async fn budgets(
    app: &App,
    after: Option<i64>,
    limit: i64,
    now: DateTime<Utc>,
) -> Result<Vec<(i64, BudgetView)>, AppError> {
    let mut conn = app.pool.acquire().await?;
    let rows = projections::budgets::page(&mut conn, after, limit).await?;
    let ids: Vec<String> = rows.iter().map(|r| r.id.to_string()).collect();
    let loaded = app.store.load_many::<Budget>(&mut conn, &ids).await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let b = &loaded.get(&r.id.to_string())?.aggregate;
            Some((
                r.position,
                BudgetView {
                    id: r.id,
                    name: b.name.clone(),
                    period: b.period.as_str().to_string(),
                    limit: b.limit.map(Money::from),
                    spent: b.spent_at(now),
                    reserved: b.reserved_at(now),
                    remaining: b.remaining_at(now),
                },
            ))
        })
        .collect())
}

/// How far the event feed can be read: it stops below the oldest transaction still open
/// that has written (or may write) to the log.
#[derive(Debug, Clone)]
pub struct FeedHorizon {
    /// The last event in the feed (its position), if any.
    pub head: Option<String>,
    /// How long the oldest open transaction holding the horizon back has been open.
    pub held_for_secs: Option<f64>,
}

/// Where each projection stands (`leadledger projections status`), a rebuild in progress,
/// and the feed's horizon.
pub async fn operations(
    app: &App,
) -> Result<
    (
        Vec<ProjectionStatus>,
        Option<RebuildInProgress>,
        FeedHorizon,
    ),
    sqlx::Error,
> {
    let mut conn = app.pool.acquire().await?;
    let status = projections::status::all(&mut conn).await?;
    let rebuild = projections::status::rebuild(&mut conn).await?;
    let head = projections::feed::head(&mut conn).await?;
    let held_for_secs = sqlx::query_scalar!(
        r#"SELECT extract(epoch FROM now() - min(xact_start))::float8 AS "secs"
           FROM pg_stat_activity
           WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()"#
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok((
        status,
        rebuild,
        FeedHorizon {
            head: head.map(|p| p.to_string()),
            held_for_secs,
        },
    ))
}
