//! Provider webhooks: ingestion of a delivery (one event or up to 1,000) from a source of
//! any kind, and parked events. (Sources and their credentials: [`super::sources`]; how
//! each provider authenticates and names its events: [`crate::providers`].)
//!
//! Ingestion is one transaction per delivery: it records each provider event id (a
//! second delivery of one is a `duplicate`), applies each event to its enrollment, parks
//! the events whose enrollment does not exist yet, and records the response for the
//! delivery's `webhook-id` — all or nothing.
//!
//! A parked event is applied as soon as its enrollment is created: [`ParkingReactor`]
//! reads `ContactEnrolled` from the event feed (through the projection runner, so applying
//! and moving its checkpoint commit together). The feed can miss one race — an event
//! parked in a transaction that commits after its enrollment's was read — so parked events
//! are also retried on a timer with exponential backoff and jitter, and dead-lettered after
//! [`MAX_ATTEMPTS`] attempts or [`MAX_PARKED_AGE`].

use std::collections::{HashMap, HashSet};

use aggregates::campaign::Campaign;
use aggregates::contact::{ContactEmail, contact_id_for};
use aggregates::enrollment::{
    Enrollment, EnrollmentCommand, EnrollmentEvent, ProviderEventKind, enrollment_id_for,
};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use projections::{FeedEvent, ProjectionError, Reactor};
use rand::Rng;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::app::command::{self, Abort, Answer, CommandContext, Reply, Retried};
use crate::app::error::AppError;
use crate::app::{App, campaigns, sources};
use crate::providers::{self, BodyError, Delivery, Parsed, ProviderEvent, SourceKind, Target};
use crate::store::{Loaded, Metadata, Store, StoreError};

/// The largest delivery taken, but for SendGrid's batches.
pub const MAX_BODY: usize = 256 * 1024;
/// The largest SendGrid delivery taken: SendGrid batches up to 1,000 events of about
/// 400 to 900 bytes each into one request.
pub const MAX_BATCH_BODY: usize = 1024 * 1024;
pub const MAX_ATTEMPTS: i32 = 12;
pub const MAX_PARKED_AGE: chrono::TimeDelta = chrono::TimeDelta::days(7);
/// An event that says it happened further ahead than this is refused: it would put
/// milestones on days that have not come.
pub const MAX_FUTURE_SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(5);
/// The longest `webhook-id` taken (it is stored and indexed).
pub const MAX_WEBHOOK_ID_CHARS: usize = 255;

/// What putting a dead letter back answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Requeued {
    pub id: Uuid,
    pub requeued: bool,
}

/// Puts the dead letter `id` back among the parked events, due now, honouring the
/// idempotency key: a retry answers as the first did and requeues nothing again.
pub async fn requeue_dead_letter(
    app: &App,
    context: &CommandContext,
    id: Uuid,
) -> Result<Answer, AppError> {
    let mut tx = app.pool.begin().await?;
    if let Some(recorded) = command::replay(&mut tx, context).await? {
        tx.commit().await?;
        return Ok(Answer::Replayed(recorded));
    }
    if !retry_dead_letter(&mut tx, id).await? {
        return Err(AppError::NotFound("no dead letter with this id".into()));
    }
    let body = serde_json::to_value(Requeued { id, requeued: true }).unwrap_or_default();
    let reply = Reply::ok(body);
    command::record(&mut tx, context, &reply).await?;
    tx.commit().await?;
    Ok(Answer::Fresh(reply))
}

/// One event's result in the response.
#[derive(Debug, Clone, Serialize)]
pub struct EventResult {
    pub id: Value,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A valid event, resolved to its enrollment.
#[derive(Debug, Clone)]
struct Resolved {
    index: usize,
    event_id: String,
    kind: ProviderEventKind,
    occurred_at: DateTime<Utc>,
    enrollment_id: Uuid,
    campaign_id: Option<Uuid>,
}

/// What an event of a delivery comes to before the enrollments are consulted.
#[derive(Debug, Clone)]
enum Placed {
    Event(Resolved),
    /// A type that carries no milestone.
    Ignored(String),
    Rejected(String),
}

/// One event of a delivery: the id its result repeats, and where it goes.
#[derive(Debug, Clone)]
pub struct Item {
    id: Value,
    placed: Placed,
}

/// Places a parsed provider event: on its enrollment (found from our ids, or from a
/// campaign linked by `external_ids` under this source), or ignored, or rejected.
fn place(
    index: usize,
    parsed: &Parsed,
    key: &[u8],
    linked: &HashMap<String, Uuid>,
    now: DateTime<Utc>,
) -> Item {
    let event = match parsed {
        Ok(event) => event,
        Err(reason) => {
            return Item {
                id: Value::Null,
                placed: Placed::Rejected(reason.clone()),
            };
        }
    };
    let id = Value::String(event.id.clone());
    let placed = (|| {
        let Some(kind) = event.kind else {
            return Ok(Placed::Ignored(format!(
                "{:?} carries no milestone",
                event.provider_type
            )));
        };
        if event.occurred_at > now + MAX_FUTURE_SKEW {
            return Err("occurred_at is more than 5 minutes in the future".to_string());
        }
        let by_email = |campaign: Uuid, email: &str| {
            ContactEmail::parse(email)
                .map(|email| enrollment_id_for(campaign, contact_id_for(key, &email)))
                .map_err(|_| "email must be a valid address".to_string())
        };
        let (enrollment_id, campaign_id) = match &event.target {
            Target::Enrollment(id) => (*id, None),
            Target::CampaignEmail { campaign, email } => {
                (by_email(*campaign, email)?, Some(*campaign))
            }
            Target::External {
                their_campaign,
                email,
            } => {
                let campaign = *linked.get(their_campaign).ok_or_else(|| {
                    format!(
                        "no campaign is linked to this source's campaign {their_campaign:?} \
                         (link it with the campaign's external_ids)"
                    )
                })?;
                (by_email(campaign, email)?, Some(campaign))
            }
            Target::Unknown => {
                return Err(
                    "the event names no leadledger enrollment or campaign: send the \
                     message with leadledger_enrollment_id (or leadledger_campaign_id) in \
                     its metadata"
                        .to_string(),
                );
            }
        };
        Ok(Placed::Event(Resolved {
            index,
            event_id: event.id.clone(),
            kind,
            occurred_at: event.occurred_at,
            enrollment_id,
            campaign_id,
        }))
    })();
    Item {
        id,
        placed: placed.unwrap_or_else(Placed::Rejected),
    }
}

/// The provider event id as the enrollment remembers it: qualified by its source.
fn qualified(source: &str, event_id: &str) -> String {
    format!("{source}:{event_id}")
}

/// The outcome of one event of a delivery, as its result says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Applied,
    Duplicate,
    Parked,
    Rejected,
    Ignored,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Self::Applied,
        Self::Duplicate,
        Self::Parked,
        Self::Rejected,
        Self::Ignored,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Parked => "parked",
            Self::Rejected => "rejected",
            Self::Ignored => "ignored",
        }
    }
}

/// How many events of a delivery had each outcome.
#[derive(Debug, Clone, Copy, Default)]
struct Tally([i32; 5]);

impl Tally {
    fn of(results: &[EventResult]) -> Self {
        let mut tally = Self::default();
        for result in results {
            tally.0[result.outcome as usize] += 1;
        }
        tally
    }

    fn count(&self, outcome: Outcome) -> i32 {
        self.0[outcome as usize]
    }
}

/// What becomes of the new events of a delivery.
#[derive(Debug, Default)]
struct Decision<'a> {
    /// By the event's index in the delivery: its outcome and, when refused, why.
    decided: HashMap<usize, (Outcome, Option<String>)>,
    /// By enrollment id: the events to append.
    new_events: HashMap<String, Vec<EnrollmentEvent>>,
    /// Events whose enrollment does not exist yet but whose campaign does.
    parked: Vec<&'a Resolved>,
    /// Ids of refused events, to forget (a corrected redelivery is not a duplicate).
    refused_ids: Vec<String>,
}

/// Decides each new event of a delivery from the enrollments (which take the events
/// decided, in order) and campaigns as loaded:
/// applied (or a duplicate the enrollment already knows), parked until its enrollment
/// exists, or rejected with a reason. Pure: no database, no clock (it is `async` only
/// because the aggregate's `handle` is).
async fn decide<'a>(
    source: &str,
    new: &[&'a Resolved],
    loaded: &mut HashMap<String, Loaded<Enrollment>>,
    campaigns: &HashMap<String, Loaded<Campaign>>,
) -> Decision<'a> {
    let mut decided: HashMap<usize, (Outcome, Option<String>)> = HashMap::new();
    let mut new_events: HashMap<String, Vec<EnrollmentEvent>> = HashMap::new();
    let mut parked: Vec<&Resolved> = Vec::new();
    let mut refused_ids: Vec<String> = Vec::new();
    for &r in new {
        let enrollment = loaded
            .get_mut(&r.enrollment_id.to_string())
            .expect("loaded every id");
        if !enrollment.aggregate.enrolled {
            let refusal = match r.campaign_id {
                None => Some("no enrollment with this enrollment_id"),
                Some(campaign)
                    if !campaigns
                        .get(&campaign.to_string())
                        .is_some_and(|c| c.aggregate.created) =>
                {
                    Some("no campaign with this campaign_id")
                }
                Some(_) => None,
            };
            match refusal {
                Some(reason) => {
                    refused_ids.push(r.event_id.clone());
                    decided.insert(r.index, (Outcome::Rejected, Some(reason.into())));
                }
                None => {
                    parked.push(r);
                    decided.insert(r.index, (Outcome::Parked, None));
                }
            }
            continue;
        }
        let sink = EventSink::default();
        let handled = enrollment
            .aggregate
            .handle(
                EnrollmentCommand::RecordProviderEvent {
                    provider_event_id: qualified(source, &r.event_id),
                    kind: r.kind,
                    occurred_at: r.occurred_at,
                },
                &(),
                &sink,
            )
            .await;
        if let Err(refused) = handled {
            refused_ids.push(r.event_id.clone());
            decided.insert(r.index, (Outcome::Rejected, Some(refused.to_string())));
            continue;
        }
        let written = sink.collect().await;
        let kind = if written.is_empty() {
            Outcome::Duplicate
        } else {
            Outcome::Applied
        };
        decided.insert(r.index, (kind, None));
        new_events
            .entry(r.enrollment_id.to_string())
            .or_default()
            .extend(written);
    }
    Decision {
        decided,
        new_events,
        parked,
        refused_ids,
    }
}

/// The result of every event of a delivery, in its order: as placed, and for the events
/// placed on an enrollment as decided (one not decided repeated an earlier one of the
/// delivery).
fn results(
    items: &[Item],
    decided: &mut HashMap<usize, (Outcome, Option<String>)>,
) -> Vec<EventResult> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let (outcome, reason) = match &item.placed {
                Placed::Rejected(reason) => (Outcome::Rejected, Some(reason.clone())),
                Placed::Ignored(reason) => (Outcome::Ignored, Some(reason.clone())),
                Placed::Event(_) => decided.remove(&i).unwrap_or((Outcome::Duplicate, None)),
            };
            EventResult {
                id: item.id.clone(),
                outcome,
                reason,
            }
        })
        .collect()
}

/// One HTTP delivery to `/webhooks/{source}`, as the transport hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// Header (name, value) pairs; names in lower case.
    pub headers: &'a [(String, String)],
    /// The raw query string, without the `?`.
    pub query: &'a str,
    /// The raw body: signatures cover these bytes.
    pub body: &'a [u8],
}

/// Takes one delivery for source `name`: authenticates it as the source's kind says (401
/// and nothing recorded on any failure), reads its events with the provider's own field
/// names, places each on its enrollment, and applies or parks them in one transaction;
/// returns the response body, one result per event.
pub async fn receive(app: &App, name: &str, incoming: Incoming<'_>) -> Result<Value, AppError> {
    let source = sources::load(&app.pool, &app.secrets, name)
        .await?
        .ok_or_else(|| AppError::Unauthorized("unknown webhook source".into()))?;
    let limit = match source.kind {
        SourceKind::Sendgrid => MAX_BATCH_BODY,
        _ => MAX_BODY,
    };
    if incoming.body.len() > limit {
        return Err(AppError::PayloadTooLarge(format!(
            "a {} delivery is at most {} KiB",
            source.kind,
            limit / 1024
        )));
    }
    let now = Utc::now();
    let delivery = Delivery {
        headers: incoming.headers,
        query: incoming.query,
        body: incoming.body,
        now: now.timestamp(),
    };
    let authenticated = source.authenticate(&delivery).map_err(|refused| {
        metrics::counter!("webhook_auth_failures_total", "source" => name.to_string()).increment(1);
        tracing::info!(source = name, reason = %refused, "webhook delivery refused");
        AppError::Unauthorized(format!("webhook delivery refused: {refused}"))
    })?;
    if let Some(id) = &authenticated.delivery_id
        && id.chars().count() > MAX_WEBHOOK_ID_CHARS
    {
        return Err(AppError::BadRequest(format!(
            "webhook-id must be at most {MAX_WEBHOOK_ID_CHARS} characters"
        )));
    }
    let parsed =
        providers::parse(source.kind, &source.current, incoming.body).map_err(|e| match e {
            BodyError::TooManyEvents(_) => AppError::PayloadTooLarge(e.to_string()),
            _ => AppError::BadRequest(e.to_string()),
        })?;
    let request_hash = Sha256::digest(incoming.body).to_vec();
    // Providers that name no delivery are deduplicated per event; the delivery is
    // recorded under its body's hash, so an identical redelivery gets the same answer.
    let delivery_id = authenticated
        .delivery_id
        .unwrap_or_else(|| format!("sha256:{}", hex::encode(&request_hash)));
    let mut their_campaigns: Vec<String> = parsed
        .iter()
        .filter_map(|p| match p {
            Ok(ProviderEvent {
                kind: Some(_),
                target: Target::External { their_campaign, .. },
                ..
            }) => Some(their_campaign.clone()),
            _ => None,
        })
        .collect();
    their_campaigns.sort();
    their_campaigns.dedup();
    let linked = campaigns::linked_campaigns(&app.pool, name, &their_campaigns).await?;
    let key = crate::app::contacts::id_key(app).await?;
    let items: Vec<Item> = parsed
        .iter()
        .enumerate()
        .map(|(i, p)| place(i, p, key, &linked, now))
        .collect();
    let response = ingest(
        app,
        name,
        &delivery_id,
        &request_hash,
        authenticated.once_token.as_deref(),
        &items,
    )
    .await?;
    metrics::counter!(
        "webhook_deliveries_total",
        "source" => name.to_string(),
        "kind" => source.kind.as_str()
    )
    .increment(1);
    Ok(response)
}

/// Applies or parks the placed events of one authenticated delivery, in one transaction;
/// returns the response body.
///
/// Each event gets its own outcome: one that cannot be applied (its enrollment refuses
/// it, its campaign does not exist) is `rejected` with a reason and the rest of the batch
/// still counts. A rejected or ignored event's id is not remembered, so a corrected
/// redelivery of it is not taken for a duplicate. `once_token` (Mailgun's) is spent in the
/// same transaction: a delivery that fails leaves it unspent, a replay finds it spent.
async fn ingest(
    state: &App,
    source: &str,
    webhook_id: &str,
    request_hash: &[u8],
    once_token: Option<&str>,
    items: &[Item],
) -> Result<Value, AppError> {
    let metadata = Metadata {
        correlation_id: Some(format!("webhook:{source}:{webhook_id}")),
        actor: Some(format!("webhook_source:{source}")),
        ..Metadata::default()
    };
    let metadata = &metadata;
    let outcome = state
        .retrying(Enrollment::TYPE, |mut tx| async move {
            let outcome = async {
                if let Some(token) = once_token {
                    let spent = sqlx::query!(
                        "INSERT INTO webhook_once_tokens (source, token) VALUES ($1, $2)
                         ON CONFLICT DO NOTHING",
                        source,
                        token
                    )
                    .execute(&mut *tx)
                    .await?;
                    if spent.rows_affected() == 0 {
                        return Err(AppError::Unauthorized(
                            "webhook delivery refused: its token was accepted before (a replay)"
                                .into(),
                        )
                        .into());
                    }
                }
                // One delivery at a time per webhook-id: a concurrent repeat waits, then replays.
                sqlx::query!(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2, 1))",
                    source,
                    webhook_id
                )
                .execute(&mut *tx)
                .await?;
                let earlier = sqlx::query!(
                    "SELECT request_hash, response FROM webhook_deliveries
             WHERE source = $1 AND webhook_id = $2",
                    source,
                    webhook_id
                )
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(earlier) = earlier {
                    if earlier.request_hash != request_hash {
                        return Err(AppError::conflict(
                            "webhook-id-reused",
                            "this webhook-id was delivered before with a different body",
                        )
                        .into());
                    }
                    // A repeated delivery: the first response again, counted once already.
                    return Ok((earlier.response, None));
                }
                let valid: Vec<&Resolved> = items
                    .iter()
                    .filter_map(|item| match &item.placed {
                        Placed::Event(r) => Some(r),
                        _ => None,
                    })
                    .collect();
                let ids: Vec<String> = valid.iter().map(|r| r.event_id.clone()).collect();
                let fresh: HashSet<String> = sqlx::query_scalar!(
                    "INSERT INTO webhook_event_ids (source, event_id)
             SELECT $1, unnest($2::text[])
             ON CONFLICT DO NOTHING
             RETURNING event_id",
                    source,
                    &ids
                )
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
                // The first event of the delivery with a new id counts; later ones repeat it.
                let mut first_seen = HashSet::new();
                let new: Vec<&Resolved> = valid
                    .iter()
                    .copied()
                    .filter(|r| {
                        fresh.contains(&r.event_id) && first_seen.insert(r.event_id.clone())
                    })
                    .collect();
                let mut enrollment_ids: Vec<String> =
                    new.iter().map(|r| r.enrollment_id.to_string()).collect();
                enrollment_ids.sort();
                enrollment_ids.dedup();
                // Busy deliveries touch overlapping enrollments. Queue on them (in one order, so no
                // deadlock) rather than race and retry whole batches; the stream's unique key
                // still decides, this only keeps contention from turning into retries.
                sqlx::query!(
                    "SELECT count(pg_advisory_xact_lock(hashtextextended(id, 2)))
             FROM (SELECT unnest($1::text[]) AS id ORDER BY 1) ids",
                    &enrollment_ids
                )
                .fetch_one(&mut *tx)
                .await?;
                let mut loaded: HashMap<String, Loaded<Enrollment>> =
                    state.store.load_many(&mut tx, &enrollment_ids).await?;
                // An event for an enrollment that does not exist yet is parked only when its
                // campaign exists: one naming an unknown campaign would wait for nothing.
                let mut campaign_ids: Vec<String> = new
                    .iter()
                    .filter(|r| !loaded[&r.enrollment_id.to_string()].aggregate.enrolled)
                    .filter_map(|r| r.campaign_id.map(|c| c.to_string()))
                    .collect();
                campaign_ids.sort();
                campaign_ids.dedup();
                let campaigns: HashMap<String, Loaded<Campaign>> = if campaign_ids.is_empty() {
                    HashMap::new()
                } else {
                    state.store.load_many(&mut tx, &campaign_ids).await?
                };
                let Decision {
                    mut decided,
                    new_events,
                    parked,
                    refused_ids,
                } = decide(source, &new, &mut loaded, &campaigns).await;
                if !refused_ids.is_empty() {
                    sqlx::query!(
                        "DELETE FROM webhook_event_ids WHERE source = $1 AND event_id = ANY($2)",
                        source,
                        &refused_ids
                    )
                    .execute(&mut *tx)
                    .await?;
                }
                let mut streams: Vec<(&mut Loaded<Enrollment>, &[EnrollmentEvent])> = loaded
                    .iter_mut()
                    .filter_map(|(id, l)| new_events.get(id).map(|e| (l, e.as_slice())))
                    .collect();
                state
                    .store
                    .append_many(&mut tx, &mut streams, metadata)
                    .await?;
                park(&mut tx, source, &parked).await?;
                let results = results(items, &mut decided);
                let tally = Tally::of(&results);
                let response = json!({ "results": results });
                sqlx::query!(
                    "INSERT INTO webhook_deliveries
                 (source, webhook_id, request_hash, response,
                  applied, duplicate, parked, rejected, ignored)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    source,
                    webhook_id,
                    request_hash,
                    response,
                    tally.count(Outcome::Applied),
                    tally.count(Outcome::Duplicate),
                    tally.count(Outcome::Parked),
                    tally.count(Outcome::Rejected),
                    tally.count(Outcome::Ignored),
                )
                .execute(&mut *tx)
                .await?;
                Ok::<_, Abort>((response, Some((tally, results))))
            }
            .await;
            (tx, outcome)
        })
        .await?;
    match outcome {
        Retried::Done((response, counted)) => {
            if let Some((tally, results)) = counted {
                report(source, webhook_id, &tally, &results);
            }
            Ok(response)
        }
        Retried::Exhausted => Err(AppError::conflict(
            "concurrency-conflict",
            "the enrollments kept changing under this delivery; deliver it again",
        )),
    }
}

/// Deletes spent once-tokens that can no longer be replayed: a delivery's signed
/// timestamp is taken up to 5 minutes either side of receipt, so after 15 minutes no
/// delivery carrying the token can pass.
pub async fn purge_once_tokens(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let done = sqlx::query!(
        "DELETE FROM webhook_once_tokens WHERE seen_at < now() - interval '15 minutes'"
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Counts a committed delivery's outcomes in `/metrics`, by source, and logs the events it
/// refused or ignored: their position in the delivery and the reason, never their content
/// (which holds addresses).
fn report(source: &str, webhook_id: &str, tally: &Tally, results: &[EventResult]) {
    for outcome in Outcome::ALL {
        let n = tally.count(outcome);
        if n > 0 {
            metrics::counter!(
                "webhook_events_total",
                "source" => source.to_string(),
                "outcome" => outcome.as_str()
            )
            .increment(n as u64);
        }
    }
    for (index, result) in results.iter().enumerate() {
        if matches!(result.outcome, Outcome::Rejected | Outcome::Ignored) {
            tracing::info!(
                source,
                webhook_id,
                index,
                outcome = result.outcome.as_str(),
                reason = result.reason.as_deref().unwrap_or(""),
                "webhook event not applied"
            );
        }
    }
}

async fn park(
    conn: &mut PgConnection,
    source: &str,
    events: &[&Resolved],
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
    let event_ids: Vec<String> = events.iter().map(|r| r.event_id.clone()).collect();
    let enrollments: Vec<Uuid> = events.iter().map(|r| r.enrollment_id).collect();
    let campaigns: Vec<Option<Uuid>> = events.iter().map(|r| r.campaign_id).collect();
    let kinds: Vec<String> = events.iter().map(|r| r.kind.as_str().to_string()).collect();
    let times: Vec<DateTime<Utc>> = events.iter().map(|r| r.occurred_at).collect();
    sqlx::query!(
        r#"INSERT INTO webhook_parked
               (id, source, event_id, enrollment_id, campaign_id, kind, occurred_at,
                next_attempt_at)
           SELECT u.id, $1, u.event_id, u.enrollment_id, u.campaign_id, u.kind, u.occurred_at,
                  now() + interval '1 second'
           FROM UNNEST($2::uuid[], $3::text[], $4::uuid[], $5::uuid[], $6::text[],
                       $7::timestamptz[])
                AS u(id, event_id, enrollment_id, campaign_id, kind, occurred_at)"#,
        source,
        &ids,
        &event_ids,
        &enrollments,
        &campaigns as &[Option<Uuid>],
        &kinds,
        &times
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A parked event as stored.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ParkedEvent {
    pub id: Uuid,
    pub source: String,
    pub event_id: String,
    pub enrollment_id: Uuid,
    pub campaign_id: Option<Uuid>,
    #[serde(rename = "type")]
    pub kind: String,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub dead_lettered_at: Option<DateTime<Utc>>,
}

/// What applying an enrollment's parked events came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unparked {
    /// The enrollment does not exist yet: they stay parked.
    NotEnrolled,
    /// Another writer changed the enrollment meanwhile: they stay parked, and trying
    /// again soon is all it takes (it says nothing about the enrollment's existence).
    Conflict,
    /// Each was applied (or was a duplicate) and left the queue, or was refused by the
    /// enrollment and became a dead letter with the reason: none is ever dropped.
    Settled { applied: usize, refused: usize },
}

/// Applies the parked events of `enrollment` that it now accepts, in the caller's
/// transaction (inside a savepoint: a conflict leaves them parked for the retry worker).
async fn apply_parked(
    conn: &mut PgConnection,
    store: &Store,
    rows: Vec<ParkedEvent>,
) -> Result<Unparked, sqlx::Error> {
    let Some(first) = rows.first() else {
        return Ok(Unparked::Settled {
            applied: 0,
            refused: 0,
        });
    };
    let enrollment_id = first.enrollment_id.to_string();
    let mut savepoint = conn.begin().await?;
    let mut loaded: Loaded<Enrollment> = match store.load(&mut savepoint, &enrollment_id).await {
        Ok(l) => l,
        Err(StoreError::Database(e)) => return Err(e),
        Err(e) => return Err(sqlx::Error::Protocol(e.to_string())),
    };
    if !loaded.aggregate.enrolled {
        return Ok(Unparked::NotEnrolled);
    }
    let mut events = Vec::new();
    let mut done: Vec<Uuid> = Vec::new();
    let mut refused: Vec<(Uuid, String)> = Vec::new();
    for row in &rows {
        let Some(kind) = ProviderEventKind::parse(&row.kind) else {
            refused.push((row.id, format!("unknown event type {:?}", row.kind)));
            continue;
        };
        let sink = EventSink::default();
        let command = EnrollmentCommand::RecordProviderEvent {
            provider_event_id: qualified(&row.source, &row.event_id),
            kind,
            occurred_at: row.occurred_at,
        };
        match loaded.aggregate.handle(command, &(), &sink).await {
            Ok(()) => {
                events.extend(sink.collect().await);
                done.push(row.id);
            }
            Err(e) => refused.push((row.id, format!("the enrollment refused it: {e}"))),
        }
    }
    let metadata = Metadata {
        actor: Some(PARKING_REACTOR.into()),
        ..Metadata::default()
    };
    match store
        .append(&mut savepoint, &mut loaded, &events, &metadata)
        .await
    {
        Ok(_) => {}
        Err(StoreError::Conflict) => {
            savepoint.rollback().await?;
            return Ok(Unparked::Conflict);
        }
        Err(StoreError::Database(e)) => return Err(e),
        Err(e) => return Err(sqlx::Error::Protocol(e.to_string())),
    }
    sqlx::query!("DELETE FROM webhook_parked WHERE id = ANY($1)", &done)
        .execute(&mut *savepoint)
        .await?;
    if !refused.is_empty() {
        let (ids, errors): (Vec<Uuid>, Vec<String>) = refused.iter().cloned().unzip();
        sqlx::query!(
            "UPDATE webhook_parked SET last_error = u.error, dead_lettered_at = now()
             FROM UNNEST($1::uuid[], $2::text[]) AS u(id, error)
             WHERE webhook_parked.id = u.id",
            &ids,
            &errors
        )
        .execute(&mut *savepoint)
        .await?;
        tracing::warn!(
            enrollment_id = %first.enrollment_id,
            count = refused.len(),
            "parked webhook events refused by their enrollment were dead-lettered"
        );
        count_by_source(
            &rows,
            |r| refused.iter().any(|(id, _)| *id == r.id),
            "dead_lettered",
        );
    }
    savepoint.commit().await?;
    count_by_source(&rows, |r| done.contains(&r.id), "unparked");
    Ok(Unparked::Settled {
        applied: done.len(),
        refused: refused.len(),
    })
}

/// Counts the parked `rows` that `which` picks in `webhook_events_total{source, outcome}`.
fn count_by_source(
    rows: &[ParkedEvent],
    which: impl Fn(&ParkedEvent) -> bool,
    outcome: &'static str,
) {
    let mut by_source: HashMap<&str, u64> = HashMap::new();
    for row in rows.iter().filter(|r| which(r)) {
        *by_source.entry(&row.source).or_default() += 1;
    }
    for (source, n) in by_source {
        metrics::counter!(
            "webhook_events_total",
            "source" => source.to_string(),
            "outcome" => outcome
        )
        .increment(n);
    }
}

/// Applies parked events when their enrollment is created, driven by the event feed. It
/// runs in the projection runner (exactly once per `ContactEnrolled`, with its
/// checkpoint), but unlike a projection it writes events: it is never rebuilt.
/// The name (and checkpoint) of [`ParkingReactor`].
pub const PARKING_REACTOR: &str = "webhook_parking";

pub struct ParkingReactor {
    store: Store,
}

impl ParkingReactor {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

#[async_trait::async_trait]
impl Reactor for ParkingReactor {
    fn name(&self) -> &'static str {
        PARKING_REACTOR
    }

    /// It reads enrollments only: no contact's personal data.
    fn opens(&self, _aggregate_type: &str, _event_type: &str) -> bool {
        false
    }

    async fn react(
        &self,
        conn: &mut PgConnection,
        events: &[FeedEvent],
    ) -> Result<(), ProjectionError> {
        for event in events {
            if event.aggregate_type != Enrollment::TYPE || event.event_type != "ContactEnrolled" {
                continue;
            }
            let Ok(enrollment) = Uuid::parse_str(&event.aggregate_id) else {
                continue;
            };
            let rows = sqlx::query_as!(
                ParkedEvent,
                "SELECT id, source, event_id, enrollment_id, campaign_id, kind, occurred_at,
                        received_at, attempts, next_attempt_at, last_error, dead_lettered_at
                 FROM webhook_parked
                 WHERE enrollment_id = $1 AND dead_lettered_at IS NULL
                 ORDER BY received_at
                 FOR UPDATE SKIP LOCKED",
                enrollment
            )
            .fetch_all(&mut *conn)
            .await?;
            apply_parked(conn, &self.store, rows).await?;
        }
        Ok(())
    }
}

/// One round of the retry worker: due parked events are applied if their enrollment
/// exists now, else retried later (exponential backoff with jitter, capped at an hour) or
/// dead-lettered. `SKIP LOCKED` lets several processes share the work. Returns
/// (applied, dead-lettered).
pub async fn retry_due(
    pool: &PgPool,
    store: &Store,
    limit: i64,
) -> Result<(usize, usize), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let due = sqlx::query_as!(
        ParkedEvent,
        "SELECT id, source, event_id, enrollment_id, campaign_id, kind, occurred_at, received_at,
                attempts, next_attempt_at, last_error, dead_lettered_at
         FROM webhook_parked
         WHERE dead_lettered_at IS NULL AND next_attempt_at <= now()
         ORDER BY next_attempt_at
         LIMIT $1
         FOR UPDATE SKIP LOCKED",
        limit
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut by_enrollment: HashMap<Uuid, Vec<ParkedEvent>> = HashMap::new();
    for row in due {
        by_enrollment
            .entry(row.enrollment_id)
            .or_default()
            .push(row);
    }
    let (mut applied, mut dead) = (0, 0);
    let mut gave_up: Vec<ParkedEvent> = Vec::new();
    let now = Utc::now();
    for (_, rows) in by_enrollment {
        let (error, counts) = match apply_parked(&mut tx, store, rows.clone()).await? {
            Unparked::Settled {
                applied: a,
                refused,
            } => {
                applied += a;
                dead += refused;
                continue;
            }
            Unparked::NotEnrolled => ("the enrollment does not exist yet", true),
            // Not an attempt: the enrollment exists and was busy; come back soon.
            Unparked::Conflict => ("the enrollment was being written; retrying", false),
        };
        for row in rows {
            let attempts = if counts {
                row.attempts + 1
            } else {
                row.attempts
            };
            let give_up =
                counts && (attempts >= MAX_ATTEMPTS || now - row.received_at > MAX_PARKED_AGE);
            let backoff_secs = if counts {
                2f64.powi(attempts.min(12)).min(3600.0)
            } else {
                1.0
            };
            let jittered = backoff_secs * rand::rng().random_range(0.5..1.0);
            let next = now + chrono::TimeDelta::milliseconds((jittered * 1000.0) as i64);
            sqlx::query!(
                "UPDATE webhook_parked SET attempts = $2, next_attempt_at = $3, last_error = $4,
                     dead_lettered_at = CASE WHEN $5 THEN now() ELSE NULL END
                 WHERE id = $1",
                row.id,
                attempts,
                next,
                error,
                give_up
            )
            .execute(&mut *tx)
            .await?;
            if give_up {
                dead += 1;
                gave_up.push(row);
            }
        }
    }
    tx.commit().await?;
    count_by_source(&gave_up, |_| true, "dead_lettered");
    Ok((applied, dead))
}

/// Parked (`dead = false`) or dead-lettered events, oldest first, after `cursor`.
pub async fn list_parked(
    pool: &PgPool,
    dead: bool,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<ParkedEvent>, sqlx::Error> {
    let (after_at, after_id) = after.map_or((None, None), |(a, i)| (Some(a), Some(i)));
    if dead {
        sqlx::query_as!(
            ParkedEvent,
            "SELECT id, source, event_id, enrollment_id, campaign_id, kind, occurred_at,
                    received_at, attempts, next_attempt_at, last_error, dead_lettered_at
             FROM webhook_parked
             WHERE dead_lettered_at IS NOT NULL
               AND ($1::timestamptz IS NULL OR (dead_lettered_at, id) > ($1, $2))
             ORDER BY dead_lettered_at, id
             LIMIT $3",
            after_at,
            after_id,
            limit
        )
        .fetch_all(pool)
        .await
    } else {
        sqlx::query_as!(
            ParkedEvent,
            "SELECT id, source, event_id, enrollment_id, campaign_id, kind, occurred_at,
                    received_at, attempts, next_attempt_at, last_error, dead_lettered_at
             FROM webhook_parked
             WHERE dead_lettered_at IS NULL
               AND ($1::timestamptz IS NULL OR (received_at, id) > ($1, $2))
             ORDER BY received_at, id
             LIMIT $3",
            after_at,
            after_id,
            limit
        )
        .fetch_all(pool)
        .await
    }
}

/// Puts a dead letter back in the queue, due now. False when there is no such dead letter.
pub async fn retry_dead_letter(conn: &mut PgConnection, id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query!(
        "UPDATE webhook_parked SET dead_lettered_at = NULL, attempts = 0, next_attempt_at = now(),
             received_at = now(), last_error = NULL
         WHERE id = $1 AND dead_lettered_at IS NOT NULL",
        id
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded<A>(id: String, aggregate: A) -> Loaded<A> {
        Loaded {
            id,
            aggregate,
            version: 1,
            last_position: None,
            unsnapshotted_bytes: 0,
            keys: None,
        }
    }

    fn event(index: usize, id: &str, enrollment: Uuid, campaign: Option<Uuid>) -> Resolved {
        Resolved {
            index,
            event_id: id.into(),
            kind: ProviderEventKind::Opened,
            occurred_at: Utc::now(),
            enrollment_id: enrollment,
            campaign_id: campaign,
        }
    }

    #[tokio::test]
    async fn a_delivery_is_decided_event_by_event_without_a_database() {
        let now = Utc::now();
        let campaign = Uuid::now_v7();
        let (enrolled, waiting, orphan, unknown_campaign) = (
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        let mut enrollment = Enrollment::default();
        enrollment.apply(EnrollmentEvent::ContactEnrolled {
            campaign_id: campaign,
            contact_id: Uuid::now_v7(),
            stop_on_reply: true,
            enrolled_at: now,
        });
        enrollment.apply(EnrollmentEvent::ProviderEventRecorded {
            provider_event_id: qualified("esp", "seen"),
            kind: ProviderEventKind::Delivered,
            occurred_at: now,
        });
        let mut created = Campaign::default();
        created.apply(aggregates::campaign::CampaignEvent::CampaignCreated {
            name: aggregates::campaign::CampaignName::parse("launch").unwrap(),
            stop_on_reply: true,
            created_at: now,
        });
        let mut loaded_enrollments: HashMap<String, Loaded<Enrollment>> = [
            (enrolled, enrollment),
            (waiting, Enrollment::default()),
            (orphan, Enrollment::default()),
            (unknown_campaign, Enrollment::default()),
        ]
        .into_iter()
        .map(|(id, e)| (id.to_string(), loaded(id.to_string(), e)))
        .collect();
        let campaigns: HashMap<String, Loaded<Campaign>> =
            [(campaign.to_string(), loaded(campaign.to_string(), created))].into();
        let events = [
            event(0, "new", enrolled, None),
            event(1, "seen", enrolled, None),
            event(2, "early", waiting, Some(campaign)),
            event(3, "lost", orphan, None),
            event(4, "stray", unknown_campaign, Some(Uuid::now_v7())),
        ];
        let new: Vec<&Resolved> = events.iter().collect();
        let decision = decide("esp", &new, &mut loaded_enrollments, &campaigns).await;

        let outcome = |i: usize| decision.decided[&i].0;
        assert_eq!(outcome(0), Outcome::Applied);
        assert_eq!(
            outcome(1),
            Outcome::Duplicate,
            "the enrollment knows esp:seen"
        );
        assert_eq!(outcome(2), Outcome::Parked);
        assert_eq!(outcome(3), Outcome::Rejected);
        assert_eq!(
            decision.decided[&3].1.as_deref(),
            Some("no enrollment with this enrollment_id")
        );
        assert_eq!(
            decision.decided[&4].1.as_deref(),
            Some("no campaign with this campaign_id")
        );
        assert_eq!(decision.new_events[&enrolled.to_string()].len(), 1);
        assert_eq!(
            decision.new_events.len(),
            1,
            "only the applied event writes"
        );
        assert_eq!(decision.parked.len(), 1);
        assert_eq!(decision.parked[0].event_id, "early");
        assert_eq!(decision.refused_ids, ["lost", "stray"]);

        // The results list every event of the delivery in order, unreadable and ignored
        // ones too.
        let items = vec![
            Item {
                id: json!("new"),
                placed: Placed::Event(event(0, "new", enrolled, None)),
            },
            Item {
                id: Value::Null,
                placed: Placed::Rejected("type must be…".into()),
            },
            Item {
                id: json!("d1"),
                placed: Placed::Ignored("\"dropped\" carries no milestone".into()),
            },
        ];
        let mut decided = decision.decided;
        let results = results(&items, &mut decided);
        assert_eq!(results[0].outcome.as_str(), "applied");
        assert_eq!(results[1].outcome.as_str(), "rejected");
        assert_eq!(results[1].reason.as_deref(), Some("type must be…"));
        assert_eq!(results[2].outcome, Outcome::Ignored);
    }
}
