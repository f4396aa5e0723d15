//! Campaign routes: create, rename, start/pause/complete (commands on the Campaign
//! aggregate), get one (from its stream) and list (from the `campaigns` read model).

use aggregates::campaign::{Campaign, CampaignCommand, CampaignName};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use std::collections::BTreeMap;

use crate::app::App;
use crate::app::campaigns;
use crate::http::command::{self, Reply, Written};
use crate::http::error::{ApiError, FieldError};
use crate::http::extract::{
    ApiQuery, CommandRequest, MinPosition, PageQuery, cut_page, json_with_etag,
};
use crate::store::{Loaded, Position};

const TAG: &str = "campaigns";
const READ_MODEL: &str = projections::campaigns::NAME;

pub fn router() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(create_campaign, list_campaigns))
        .routes(routes!(get_campaign, update_campaign))
        .routes(routes!(start_campaign))
        .routes(routes!(pause_campaign))
        .routes(routes!(complete_campaign))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCampaign {
    /// 1..=200 characters, trimmed.
    name: String,
    /// End an enrollment's sequence when the contact replies. Default true.
    stop_on_reply: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateCampaign {
    /// A new name, 1..=200 characters, trimmed.
    name: Option<String>,
    /// Links to the campaign's ids in engagement tools, by webhook source name: a string
    /// links (or replaces), `null` unlinks; sources not named are left as they are. One of
    /// their ids names at most one campaign per source (409 otherwise).
    #[schema(value_type = Option<BTreeMap<String, Option<String>>>, example = json!({"instantly": "5f8c1b2e-campaign", "smartlead": null}))]
    external_ids: Option<BTreeMap<String, Option<String>>>,
}

/// A campaign as its stream says (strongly consistent).
#[derive(Debug, Serialize, ToSchema)]
pub struct CampaignBody {
    id: Uuid,
    name: String,
    /// draft | running | paused | completed
    status: String,
    stop_on_reply: bool,
    /// Its ids in engagement tools, by webhook source name.
    external_ids: BTreeMap<String, String>,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    /// Events in the campaign's stream; the ETag.
    version: u64,
    /// Read-your-writes token of the campaign's last event (pass as `min_position`).
    position: String,
}

/// The campaign as loaded; `position` is its last event's, or the write's that answers.
fn body(id: Uuid, loaded: &Loaded<Campaign>, position: Position) -> CampaignBody {
    let c = &loaded.aggregate;
    CampaignBody {
        id,
        name: c.name.clone(),
        status: c.status.as_str().to_string(),
        stop_on_reply: c.stop_on_reply,
        external_ids: c.external_ids.clone(),
        created_at: c.created_at,
        updated_at: c.updated_at,
        version: loaded.version,
        position: position.to_string(),
    }
}

fn reply(id: Uuid, written: &Written<Campaign>) -> Reply {
    let b = body(id, &written.loaded, written.position());
    Reply::ok(serde_json::to_value(b).unwrap_or_default()).with_etag(written.version())
}

fn parse_name(raw: &str) -> Result<CampaignName, ApiError> {
    CampaignName::parse(raw)
        .map_err(|e| ApiError::invalid(vec![FieldError::new("name", e.to_string())]))
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound("no campaign with this id".into()))
}

/// Create a campaign (status `draft`).
#[utoipa::path(post, path = "/v1/campaigns", tag = TAG, request_body = CreateCampaign,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retry-safe key")),
    responses((status = 201, body = CampaignBody), (status = 422, description = "Invalid values")))]
async fn create_campaign(
    State(state): State<App>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let input: CreateCampaign = request.json()?;
    let name = parse_name(&input.name)?;
    let stop_on_reply = input.stop_on_reply.unwrap_or(true);
    let id = Uuid::now_v7();
    let at = Utc::now();
    command::execute::<Campaign, _, _>(
        &state,
        &request,
        &id.to_string(),
        &(),
        |_| {
            Ok(CampaignCommand::Create {
                name: name.clone(),
                stop_on_reply,
                at,
            })
        },
        |written| {
            reply(id, written)
                .with_status(StatusCode::CREATED)
                .with_location(format!("/v1/campaigns/{id}"))
        },
    )
    .await
}

/// Rename a campaign and/or link its ids in engagement tools (`external_ids`). Honours
/// `If-Match`.
#[utoipa::path(patch, path = "/v1/campaigns/{id}", tag = TAG, request_body = UpdateCampaign,
    params(("id" = Uuid, Path), ("If-Match" = Option<String>, Header, description = "Expected version, e.g. \"3\"")),
    responses((status = 200, body = CampaignBody), (status = 404),
        (status = 409, description = "One of the ids is linked to another campaign for that source"),
        (status = 412), (status = 422)))]
async fn update_campaign(
    State(state): State<App>,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let input: UpdateCampaign = request.json()?;
    if input.name.is_none() && input.external_ids.is_none() {
        return Err(ApiError::invalid(vec![FieldError::new(
            "name",
            "give a name, external_ids or both",
        )]));
    }
    let name = input.name.as_deref().map(parse_name).transpose()?;
    let external_ids = input.external_ids.unwrap_or_default();
    let at = Utc::now();
    let answer = crate::app::command::execute_guarded::<Campaign, ApiError, _, _, _, _>(
        &state,
        &request.context(),
        &id.to_string(),
        &(),
        |_| {
            Ok(CampaignCommand::Update {
                name: name.clone(),
                external_ids: external_ids.clone(),
                at,
            })
        },
        |conn, events| Box::pin(campaigns::guard_external_ids(conn, id, events)),
        |written| reply(id, written),
        command::error_reply,
    )
    .await?;
    Ok(answer.into_response())
}

async fn transition(
    state: App,
    id: String,
    request: CommandRequest,
    make: fn(DateTime<Utc>) -> CampaignCommand,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    request.no_fields()?;
    let at = Utc::now();
    command::execute::<Campaign, _, _>(
        &state,
        &request,
        &id.to_string(),
        &(),
        |_| Ok(make(at)),
        |written| reply(id, written),
    )
    .await
}

/// Start (or resume) a campaign.
#[utoipa::path(post, path = "/v1/campaigns/{id}/start", tag = TAG, params(("id" = Uuid, Path)),
    responses((status = 200, body = CampaignBody), (status = 404), (status = 409, description = "Not allowed from its status")))]
async fn start_campaign(
    State(state): State<App>,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    transition(state, id, request, |at| CampaignCommand::Start { at }).await
}

/// Pause a running campaign.
#[utoipa::path(post, path = "/v1/campaigns/{id}/pause", tag = TAG, params(("id" = Uuid, Path)),
    responses((status = 200, body = CampaignBody), (status = 404), (status = 409)))]
async fn pause_campaign(
    State(state): State<App>,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    transition(state, id, request, |at| CampaignCommand::Pause { at }).await
}

/// Complete a running or paused campaign.
#[utoipa::path(post, path = "/v1/campaigns/{id}/complete", tag = TAG, params(("id" = Uuid, Path)),
    responses((status = 200, body = CampaignBody), (status = 404), (status = 409)))]
async fn complete_campaign(
    State(state): State<App>,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    transition(state, id, request, |at| CampaignCommand::Complete { at }).await
}

/// A campaign, from its event stream.
#[utoipa::path(get, path = "/v1/campaigns/{id}", tag = TAG, params(("id" = Uuid, Path), ("min_position" = Option<String>, Query, description = "Position token of a write; always reached here")),
    responses((status = 200, body = CampaignBody), (status = 404)))]
async fn get_campaign(
    State(state): State<App>,
    Path(id): Path<String>,
    // Read from the stream, which holds every committed write: a valid token is already
    // reached. It is still checked, like on every read.
    _min_position: MinPosition,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let loaded: Loaded<Campaign> = command::load_existing(
        &state,
        id,
        |c: &Campaign| c.created,
        "no campaign with this id",
    )
    .await?;
    let position = loaded.last_position.unwrap_or_default();
    Ok(json_with_etag(&body(id, &loaded, position), loaded.version))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListCampaigns {
    /// draft | running | paused | completed
    status: Option<String>,
    /// 1..=500, default 50
    limit: Option<i64>,
    cursor: Option<String>,
    /// Wait until the list includes this write.
    min_position: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CampaignListItem {
    id: Uuid,
    name: String,
    status: String,
    stop_on_reply: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
}

impl From<projections::campaigns::CampaignRow> for CampaignListItem {
    fn from(r: projections::campaigns::CampaignRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            status: r.status,
            stop_on_reply: r.stop_on_reply,
            created_at: r.created_at,
            updated_at: r.updated_at,
            version: r.version,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CampaignPage {
    items: Vec<CampaignListItem>,
    next_cursor: Option<String>,
}

/// Campaigns, newest first (read model `campaigns`).
#[utoipa::path(get, path = "/v1/campaigns", tag = TAG, params(ListCampaigns),
    responses((status = 200, body = CampaignPage), (status = 400), (status = 503, description = "min_position not reached in 5 s")))]
async fn list_campaigns(
    State(state): State<App>,
    ApiQuery(query): ApiQuery<ListCampaigns>,
    min_position: MinPosition,
) -> Result<Response, ApiError> {
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor.clone(),
    };
    let limit = page.limit()?;
    let cursor: Option<(DateTime<Utc>, Uuid)> = page.cursor()?;
    if let Some(s) = &query.status
        && !["draft", "running", "paused", "completed"].contains(&s.as_str())
    {
        return Err(ApiError::BadRequest(
            "status must be draft, running, paused or completed".into(),
        ));
    }
    let _ = &query.min_position;
    let mut conn = min_position.connection(&state, &[READ_MODEL]).await?;
    let rows =
        projections::campaigns::page(&mut conn, query.status.as_deref(), cursor, limit + 1).await?;
    let mut items: Vec<CampaignListItem> = rows.into_iter().map(CampaignListItem::from).collect();
    let next_cursor = cut_page(&mut items, limit, |c| (c.created_at, c.id));
    Ok(axum::Json(CampaignPage { items, next_cursor }).into_response())
}
