//! Contact routes: upsert by email, get, list and search, patch, enrichment, import.

use aggregates::contact::{Contact, ContactCommand, ContactEmail, QualityScore};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::App;
use crate::app::contacts::{
    self, ContactInput, FieldsInput, ImportMode, ImportOutcome, ImportReport, field_error,
};
use crate::http::command::{self, Reply, Written};
use crate::http::error::{ApiError, FieldError};
use crate::http::extract::{
    ApiQuery, CommandRequest, MinPosition, PageQuery, cut_page, json_with_etag,
};
use crate::store::Loaded;

const TAG: &str = "contacts";
const READ_MODEL: &str = projections::contacts::NAME;
/// 10,000 rows of a few hundred bytes each, with room to spare.
const IMPORT_BODY_LIMIT: usize = 32 << 20;

pub fn router() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(upsert_contact, list_contacts))
        .routes(routes!(get_contact, patch_contact, erase_contact))
        .routes(routes!(record_enrichment))
        // Only the import takes large bodies; the other routes keep the default limit.
        .merge(
            OpenApiRouter::new()
                .routes(routes!(import_contacts))
                .layer(DefaultBodyLimit::max(IMPORT_BODY_LIMIT)),
        )
}

/// A contact as its stream says.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContactBody {
    id: Uuid,
    email: String,
    first_name: Option<String>,
    last_name: Option<String>,
    company: Option<String>,
    company_domain: Option<String>,
    title: Option<String>,
    phone: Option<String>,
    linkedin_url: Option<String>,
    custom: std::collections::BTreeMap<String, String>,
    enrichment: Option<EnrichmentBody>,
    /// The latest consent recorded (`POST /v1/contacts/{id}/consent`).
    consent: Option<ConsentBody>,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    version: u64,
}

/// What a write on a contact answers: the contact, and the write's position.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContactWritten {
    #[serde(flatten)]
    contact: ContactBody,
    /// Read-your-writes token of the write: pass it as `?min_position=`.
    position: String,
}

/// What `POST /v1/contacts` answers: the contact, whether it was new, and the position.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContactUpserted {
    #[serde(flatten)]
    contact: ContactBody,
    /// true: a new contact (201); false: the email was known, given fields overwritten (200).
    created: bool,
    /// Read-your-writes token of the write: pass it as `?min_position=`.
    position: String,
}

/// A contact's consent.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConsentBody {
    /// granted | withdrawn
    status: String,
    /// consent | legitimate_interest | contract
    basis: Option<String>,
    source: Option<String>,
    recorded_at: DateTime<Utc>,
}

impl ConsentBody {
    pub(crate) fn of(c: &aggregates::contact::Consent) -> Self {
        Self {
            status: serde_name(&c.status),
            basis: c.basis.as_ref().map(serde_name),
            source: c.source.clone(),
            recorded_at: c.recorded_at,
        }
    }
}

/// The name serde gives a unit enum value (`legitimate_interest`).
fn serde_name<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrichmentBody {
    data: Value,
    quality_score: f64,
    sources: Vec<String>,
    enriched_at: DateTime<Utc>,
}

fn text<T: Clone + Into<String>>(v: &Option<T>) -> Option<String> {
    v.clone().map(Into::into)
}

pub(crate) fn body(id: Uuid, loaded: &Loaded<Contact>) -> ContactBody {
    let c = &loaded.aggregate;
    ContactBody {
        id,
        email: c
            .email
            .as_ref()
            .map(|e| e.as_str().to_string())
            .unwrap_or_default(),
        first_name: text(&c.first_name),
        last_name: text(&c.last_name),
        company: text(&c.company),
        company_domain: text(&c.company_domain),
        title: text(&c.title),
        phone: text(&c.phone),
        linkedin_url: text(&c.linkedin_url),
        custom: c.custom.as_map().clone(),
        enrichment: c.enrichment.as_ref().map(|e| EnrichmentBody {
            data: e.data.clone(),
            quality_score: e.quality_score.value(),
            sources: e.sources.clone(),
            enriched_at: e.enriched_at,
        }),
        consent: c.consent.as_ref().map(ConsentBody::of),
        created_at: c.created_at,
        updated_at: c.updated_at,
        version: loaded.version,
    }
}

pub(crate) fn reply(id: Uuid, written: &Written<Contact>) -> Reply {
    let b = ContactWritten {
        contact: body(id, &written.loaded),
        position: written.position().to_string(),
    };
    Reply::ok(serde_json::to_value(b).unwrap_or_default()).with_etag(written.version())
}

pub(crate) fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound("no contact with this id".into()))
}

/// Create a contact, or update the one with this email (201 `created: true` / 200 `created: false`).
#[utoipa::path(post, path = "/v1/contacts", tag = TAG, request_body = ContactInput,
    params(("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, body = ContactUpserted, description = "Created"), (status = 200, body = ContactUpserted, description = "Existed; given fields overwritten"), (status = 422)))]
async fn upsert_contact(
    State(state): State<App>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let input: ContactInput = request.json()?;
    let (email, fields) = input.parse().map_err(ApiError::invalid)?;
    let id = contacts::id_for(&state, &email).await?;
    let at = Utc::now();
    // An erased contact whose erasure was released is created again by this upsert.
    let was_erased = std::sync::atomic::AtomicBool::new(false);
    command::execute::<Contact, _, _>(
        &state,
        &request,
        &id.to_string(),
        &(),
        |loaded| {
            was_erased.store(
                loaded.aggregate.erased_at.is_some(),
                std::sync::atomic::Ordering::Relaxed,
            );
            Ok(ContactCommand::Upsert {
                email: email.clone(),
                fields: fields.clone(),
                at,
            })
        },
        |written| {
            let existed =
                written.existed_before && !was_erased.load(std::sync::atomic::Ordering::Relaxed);
            let b = ContactUpserted {
                contact: body(id, &written.loaded),
                created: !existed,
                position: written.position().to_string(),
            };
            let r =
                Reply::ok(serde_json::to_value(b).unwrap_or_default()).with_etag(written.version());
            if existed {
                r
            } else {
                r.with_status(StatusCode::CREATED)
                    .with_location(format!("/v1/contacts/{id}"))
            }
        },
    )
    .await
}

/// Change a contact's fields (not its email). Honours `If-Match`.
#[utoipa::path(patch, path = "/v1/contacts/{id}", tag = TAG, request_body = FieldsInput,
    params(("id" = Uuid, Path), ("If-Match" = Option<String>, Header)),
    responses((status = 200, body = ContactWritten), (status = 404), (status = 412), (status = 422)))]
async fn patch_contact(
    State(state): State<App>,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let input: FieldsInput = request.json()?;
    let fields = input.parse().map_err(ApiError::invalid)?;
    let at = Utc::now();
    command::execute::<Contact, _, _>(
        &state,
        &request,
        &id.to_string(),
        &(),
        |_| {
            Ok(ContactCommand::Update {
                fields: fields.clone(),
                at,
            })
        },
        |written| reply(id, written),
    )
    .await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrichmentInput {
    /// A JSON object of at most 64 KiB; numbers must be ones JSON can hold exactly
    /// (send longer ones as strings).
    #[schema(value_type = Object)]
    data: Box<serde_json::value::RawValue>,
    /// 0..=1
    quality_score: f64,
    /// At most 50 names of up to 200 characters.
    sources: Vec<String>,
}

/// Record a contact's enrichment (replaces the previous one).
#[utoipa::path(post, path = "/v1/contacts/{id}/enrichment", tag = TAG, request_body = EnrichmentInput,
    params(("id" = Uuid, Path)), responses((status = 200, body = ContactWritten), (status = 404), (status = 422)))]
async fn record_enrichment(
    State(state): State<App>,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let input: EnrichmentInput = request.json()?;
    let raw = input.data.get();
    if raw.len() > aggregates::contact::MAX_ENRICHMENT_BYTES {
        return Err(ApiError::invalid(vec![FieldError::new(
            "data",
            format!(
                "must be at most {} bytes of JSON; it is {}",
                aggregates::contact::MAX_ENRICHMENT_BYTES,
                raw.len()
            ),
        )]));
    }
    if let Some(number) = aggregates::text::inexact_number(raw) {
        let shown: String = number.chars().take(40).collect();
        return Err(ApiError::invalid(vec![FieldError::new(
            "data",
            format!("the number {shown} cannot be kept exactly; send it as a string"),
        )]));
    }
    let data: Value = serde_json::from_str(raw)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON in data: {e}")))?;
    let mut errors = Vec::new();
    if !data.is_object() {
        errors.push(FieldError::new("data", "must be a JSON object"));
    } else if aggregates::text::json_has_nul(&data) {
        errors.push(FieldError::new("data", aggregates::contact::NUL_IN_DATA));
    }
    let score = QualityScore::new(input.quality_score).map_err(field_error);
    if let Err(e) = &score {
        errors.push(e.clone());
    }
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let quality_score = score.map_err(|e| ApiError::invalid(vec![e]))?;
    let at = Utc::now();
    command::execute::<Contact, _, _>(
        &state,
        &request,
        &id.to_string(),
        &(),
        |_| {
            Ok(ContactCommand::RecordEnrichment {
                data: data.clone(),
                quality_score,
                sources: input.sources.clone(),
                at,
            })
        },
        |written| reply(id, written),
    )
    .await
}

/// A contact, from its event stream.
#[utoipa::path(get, path = "/v1/contacts/{id}", tag = TAG, params(("id" = Uuid, Path), ("min_position" = Option<String>, Query, description = "Position token of a write; always reached here")),
    responses((status = 200, body = ContactBody), (status = 404)))]
async fn get_contact(
    State(state): State<App>,
    Path(id): Path<String>,
    // Read from the stream, which holds every committed write: a valid token is already
    // reached. It is still checked, like on every read.
    _min_position: MinPosition,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let loaded: Loaded<Contact> = command::load_existing(
        &state,
        id,
        |c: &Contact| c.created,
        "no contact with this id",
    )
    .await?;
    if let Some(erased_at) = loaded.aggregate.erased_at {
        return Err(ApiError::erased(erased_at));
    }
    Ok(json_with_etag(&body(id, &loaded), loaded.version))
}

/// Erase a contact: its personal data is destroyed (crypto-shredding) and its email
/// suppressed; enrollments and metrics remain without it. Idempotent.
#[utoipa::path(delete, path = "/v1/contacts/{id}", tag = TAG,
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = crate::app::privacy::ContactErased), (status = 404)))]
async fn erase_contact(
    State(state): State<App>,
    Path(id): Path<String>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let answer = crate::app::privacy::erase(&state, &request.context(), id).await?;
    Ok(answer.into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListContacts {
    /// Exact email (normalised before comparing).
    email: Option<String>,
    /// Text that name, company, domain or email contain (case-insensitive).
    q: Option<String>,
    /// 1..=500, default 50
    limit: Option<i64>,
    cursor: Option<String>,
    /// Wait until the list includes this write.
    #[allow(dead_code)]
    min_position: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ContactListItem {
    id: Uuid,
    email: String,
    first_name: Option<String>,
    last_name: Option<String>,
    company: Option<String>,
    company_domain: Option<String>,
    title: Option<String>,
    phone: Option<String>,
    linkedin_url: Option<String>,
    custom: Value,
    enrichment: Option<Value>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
}

impl From<projections::contacts::ContactRow> for ContactListItem {
    fn from(r: projections::contacts::ContactRow) -> Self {
        Self {
            id: r.id,
            email: r.email,
            first_name: r.first_name,
            last_name: r.last_name,
            company: r.company,
            company_domain: r.company_domain,
            title: r.title,
            phone: r.phone,
            linkedin_url: r.linkedin_url,
            custom: r.custom,
            enrichment: r.enrichment,
            created_at: r.created_at,
            updated_at: r.updated_at,
            version: r.version,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ContactPage {
    items: Vec<ContactListItem>,
    next_cursor: Option<String>,
}

/// Contacts, newest first (read model `contacts`), by email or text query.
#[utoipa::path(get, path = "/v1/contacts", tag = TAG, params(ListContacts),
    responses((status = 200, body = ContactPage), (status = 400), (status = 503)))]
async fn list_contacts(
    State(state): State<App>,
    ApiQuery(query): ApiQuery<ListContacts>,
    min_position: MinPosition,
) -> Result<Response, ApiError> {
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor.clone(),
    };
    let limit = page.limit()?;
    let cursor: Option<(DateTime<Utc>, Uuid)> = page.cursor()?;
    let email = match &query.email {
        Some(raw) => Some(
            ContactEmail::parse(raw)
                .map_err(|_| ApiError::BadRequest("email is not a valid address".into()))?
                .as_str()
                .to_string(),
        ),
        None => None,
    };
    let pattern = match query.q.as_deref().map(str::trim) {
        Some("") | None => None,
        Some(q) if q.chars().count() > 200 => {
            return Err(ApiError::BadRequest("q is at most 200 characters".into()));
        }
        // Stored text has none, and PostgreSQL cannot take a NUL as text.
        Some(q) if q.chars().any(char::is_control) => {
            return Err(ApiError::BadRequest(
                "q must not contain control characters".into(),
            ));
        }
        // LIKE's wildcards in the text are matched literally.
        Some(q) => Some(format!(
            "%{}%",
            q.to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        )),
    };
    let mut conn = min_position.connection(&state, &[READ_MODEL]).await?;
    let rows = projections::contacts::page(
        &mut conn,
        email.as_deref(),
        pattern.as_deref(),
        cursor,
        limit + 1,
    )
    .await?;
    let mut items: Vec<ContactListItem> = rows.into_iter().map(ContactListItem::from).collect();
    let next_cursor = cut_page(&mut items, limit, |c| (c.created_at, c.id));
    Ok(axum::Json(ContactPage { items, next_cursor }).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ImportQuery {
    /// `partial` (default): store the valid rows, report the others. `atomic`: all or nothing.
    #[param(inline)]
    mode: Option<ImportMode>,
}

/// Import up to 10,000 contacts from a JSON array or a CSV file (`text/csv`, header row of
/// field names, `custom.<key>` columns).
#[utoipa::path(post, path = "/v1/contacts/import", tag = TAG, params(ImportQuery),
    request_body(content = Vec<ContactInput>, description = "JSON array, or text/csv"),
    responses((status = 200, body = ImportReport), (status = 422, body = ImportReport, content_type = "application/problem+json", description = "atomic import with invalid rows: nothing written"), (status = 413)))]
async fn import_contacts(
    State(state): State<App>,
    ApiQuery(query): ApiQuery<ImportQuery>,
    request: CommandRequest,
) -> Result<Response, ApiError> {
    let mode = query.mode.unwrap_or_default();
    let essence = request
        .content_type
        .as_deref()
        .and_then(|ct| ct.split(';').next())
        .map(|ct| ct.trim().to_ascii_lowercase());
    let rows = match essence.as_deref() {
        Some("text/csv") => contacts::rows_from_csv(&request.body)?,
        _ => {
            request.require_json()?;
            contacts::rows_from_json(&request.body)?
        }
    };
    let outcome = contacts::import(
        &state,
        rows,
        mode,
        Some(&request.context()),
        request.metadata(),
        &|_| {},
    )
    .await?;
    match outcome {
        ImportOutcome::Replayed(recorded) => Ok(recorded.into_response()),
        ImportOutcome::Done {
            report,
            written: true,
        } => {
            // Rendered from the same value the idempotency record keeps, so a replay is
            // byte for byte the first answer.
            let body = serde_json::to_value(&report).unwrap_or_default();
            Ok(command::Reply::ok(body).into_response())
        }
        // A problem+json whose extension members are the report.
        ImportOutcome::Done {
            report,
            written: false,
        } => {
            let mut problem = serde_json::to_value(&report).unwrap_or_default();
            problem["type"] = json!("https://leadledger.dev/problems/import-rejected");
            problem["title"] = json!("Import rejected");
            problem["status"] = json!(422);
            problem["detail"] = json!(format!(
                "{} of {} rows are invalid; an atomic import writes nothing",
                report.failed, report.received
            ));
            Ok((
                StatusCode::UNPROCESSABLE_ENTITY,
                [(header::CONTENT_TYPE, "application/problem+json")],
                serde_json::to_vec(&problem).unwrap_or_default(),
            )
                .into_response())
        }
    }
}
