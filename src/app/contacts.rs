//! Contacts on the service side: request values into domain values, the id key, and the
//! bulk import shared by `POST /v1/contacts/import` and `leadledger contacts import`.
//!
//! An import validates every row first, then writes every valid row in one transaction:
//! all the contacts it touches are loaded in bulk, each row becomes an upsert on its
//! contact (two rows of one email: the second updates the first, or changes nothing), and
//! all the events are appended in one statement with a concurrency check per contact. A
//! concurrent import of overlapping contacts makes one of the two retry from a fresh load,
//! so no contact is ever made twice. The report counts the events the committed
//! transaction wrote, row by row.

use std::collections::{BTreeMap, HashMap};

use aggregates::contact::{
    Contact, ContactCommand, ContactEmail, ContactError, ContactEvent, ContactFields,
    ContactFieldsInput, contact_id_for,
};
use chrono::Utc;
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::app::App;
use crate::app::command::{self, Abort, CommandContext, Recorded, Reply, Retried};
use crate::app::error::{AppError, FieldError};
use crate::store::{Loaded, Metadata, Position};

/// Rows an import takes at most.
pub const MAX_IMPORT_ROWS: usize = 10_000;

/// A contact as sent: the body of `POST /v1/contacts` and one row of an import.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactInput {
    /// Trimmed and lower-cased; at most 254 characters.
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub company: Option<String>,
    pub company_domain: Option<String>,
    pub title: Option<String>,
    pub phone: Option<String>,
    pub linkedin_url: Option<String>,
    pub custom: Option<BTreeMap<String, String>>,
}

/// The fields besides email (`PATCH /v1/contacts/{id}` takes these alone). Text fields are
/// trimmed, without control characters: names, title and company at most 200 characters,
/// `company_domain` 253, `phone` 50, `linkedin_url` 500 (http or https); `custom` at most
/// 50 entries, keys up to 100 and values up to 1,000 characters. A field left out keeps
/// its value; `custom` given replaces the whole map.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldsInput {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub company: Option<String>,
    pub company_domain: Option<String>,
    pub title: Option<String>,
    pub phone: Option<String>,
    pub linkedin_url: Option<String>,
    pub custom: Option<BTreeMap<String, String>>,
}

impl FieldsInput {
    /// Domain values, or every invalid field at once.
    pub fn parse(self) -> Result<ContactFields, Vec<FieldError>> {
        ContactFields::parse(ContactFieldsInput {
            first_name: self.first_name,
            last_name: self.last_name,
            company: self.company,
            company_domain: self.company_domain,
            title: self.title,
            phone: self.phone,
            linkedin_url: self.linkedin_url,
            custom: self.custom,
        })
        .map_err(|errors| errors.into_iter().map(field_error).collect())
    }
}

impl ContactInput {
    pub fn parse(self) -> Result<(ContactEmail, ContactFields), Vec<FieldError>> {
        let email = ContactEmail::parse(&self.email).map_err(field_error);
        let fields = FieldsInput {
            first_name: self.first_name,
            last_name: self.last_name,
            company: self.company,
            company_domain: self.company_domain,
            title: self.title,
            phone: self.phone,
            linkedin_url: self.linkedin_url,
            custom: self.custom,
        }
        .parse();
        match (email, fields) {
            (Ok(email), Ok(fields)) => Ok((email, fields)),
            (email, fields) => {
                let mut errors = Vec::new();
                if let Err(e) = email {
                    errors.push(e);
                }
                if let Err(mut e) = fields {
                    errors.append(&mut e);
                }
                Err(errors)
            }
        }
    }
}

pub fn field_error(e: ContactError) -> FieldError {
    match e {
        ContactError::InvalidField { field, reason } => FieldError::new(field, reason),
        other => FieldError::new("body", other.to_string()),
    }
}

/// The key of contact ids, read from the database on first use and kept in the state
/// (one database per state: a process serving several databases keeps each one's key).
pub async fn id_key(state: &App) -> Result<&[u8], sqlx::Error> {
    let key = state
        .contact_id_key
        .get_or_try_init(|| async {
            sqlx::query_scalar!("SELECT value FROM server_secrets WHERE name = 'contact_id_key'")
                .fetch_one(&state.pool)
                .await
        })
        .await?;
    Ok(key.as_slice())
}

/// The most characters of a client's value an import report repeats: enough to find the
/// row, never a whole oversized cell.
pub const MAX_ECHOED_CHARS: usize = 256;

/// `text` cut to `max` characters, with `…` when it was cut.
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// The id of the contact with this email.
pub async fn id_for(state: &App, email: &ContactEmail) -> Result<Uuid, sqlx::Error> {
    Ok(contact_id_for(id_key(state).await?, email))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImportMode {
    /// Store every valid row; report the invalid ones.
    #[default]
    Partial,
    /// Store every row or none.
    Atomic,
}

/// One row of an import as read: its 1-based number among data rows, and its contact or
/// why it could not be read.
#[derive(Debug, Clone)]
pub struct ImportRow {
    pub row: usize,
    pub input: Result<ContactInput, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct RowError {
    pub row: usize,
    pub email: Option<String>,
    pub message: String,
    /// The problem type of a refusal with one (`contact-erased`: the email belongs to an
    /// erased contact).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ImportReport {
    pub received: usize,
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub failed: usize,
    pub errors: Vec<RowError>,
    /// The contact each created or updated row wrote, by row (unchanged and failed rows
    /// are not listed).
    pub contacts: Vec<ImportedContact>,
    /// Read-your-writes token of the import's last event (null when it wrote none).
    pub position: Option<String>,
}

/// A row that created or updated a contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ImportedContact {
    pub row: usize,
    pub contact_id: Uuid,
}

/// The rows of a JSON array of contact objects. A body that is not an array is 400; an
/// element that is not a valid contact object is a row error.
pub fn rows_from_json(body: &[u8]) -> Result<Vec<ImportRow>, AppError> {
    rows_from_json_up_to(body, MAX_IMPORT_ROWS)
}

/// [`rows_from_json`] with another row limit (the command line imports any number, in
/// batches).
pub fn rows_from_json_up_to(body: &[u8], max_rows: usize) -> Result<Vec<ImportRow>, AppError> {
    let values: Vec<serde_json::Value> = crate::app::parse_json(body).map_err(|e| match e {
        AppError::Unprocessable { .. } => {
            AppError::BadRequest("the body must be a JSON array of contact objects".into())
        }
        other => other,
    })?;
    check_row_count(values.len(), max_rows)?;
    Ok(values
        .into_iter()
        .enumerate()
        .map(|(i, value)| ImportRow {
            row: i + 1,
            input: serde_json::from_value::<ContactInput>(value).map_err(|e| e.to_string()),
        })
        .collect())
}

/// The rows of a CSV file with a header row of field names (`email` required; `custom.KEY`
/// columns fill `custom`). Quoted fields, embedded commas and newlines, a UTF-8 BOM and
/// CRLF line ends are all read; an empty cell leaves its field out.
pub fn rows_from_csv(body: &[u8]) -> Result<Vec<ImportRow>, AppError> {
    rows_from_csv_up_to(body, MAX_IMPORT_ROWS)
}

/// [`rows_from_csv`] with another row limit.
pub fn rows_from_csv_up_to(body: &[u8], max_rows: usize) -> Result<Vec<ImportRow>, AppError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(body);
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| AppError::BadRequest(format!("the CSV header row cannot be read: {e}")))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    const KNOWN: [&str; 8] = [
        "email",
        "first_name",
        "last_name",
        "company",
        "company_domain",
        "title",
        "phone",
        "linkedin_url",
    ];
    for h in &headers {
        let custom_column = h.starts_with("custom.") && h.len() > "custom.".len();
        if !(KNOWN.contains(&h.as_str()) || custom_column) {
            return Err(AppError::BadRequest(format!(
                "unknown CSV column {h:?}: columns are {} and custom.<key>",
                KNOWN.join(", ")
            )));
        }
    }
    if !headers.iter().any(|h| h == "email") {
        return Err(AppError::BadRequest(
            "the CSV needs an `email` column".into(),
        ));
    }
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        check_row_count(i + 1, max_rows)?;
        let input = record
            .map_err(|e| format!("unreadable CSV row: {e}"))
            .map(|record| {
                let mut input = ContactInput::default();
                let mut custom = BTreeMap::new();
                for (h, value) in headers.iter().zip(record.iter()) {
                    if value.trim().is_empty() {
                        continue;
                    }
                    let v = Some(value.to_string());
                    match h.as_str() {
                        "email" => input.email = value.to_string(),
                        "first_name" => input.first_name = v,
                        "last_name" => input.last_name = v,
                        "company" => input.company = v,
                        "company_domain" => input.company_domain = v,
                        "title" => input.title = v,
                        "phone" => input.phone = v,
                        "linkedin_url" => input.linkedin_url = v,
                        other => {
                            custom.insert(other["custom.".len()..].to_string(), value.to_string());
                        }
                    }
                }
                if !custom.is_empty() {
                    input.custom = Some(custom);
                }
                input
            });
        rows.push(ImportRow { row: i + 1, input });
    }
    Ok(rows)
}

fn check_row_count(n: usize, max_rows: usize) -> Result<(), AppError> {
    if n > max_rows {
        Err(AppError::PayloadTooLarge(format!(
            "an import takes at most {max_rows} rows"
        )))
    } else {
        Ok(())
    }
}

/// A validated row, ready to write.
struct Planned {
    row: usize,
    id: String,
    email: ContactEmail,
    fields: ContactFields,
}

/// What an import did.
pub enum ImportOutcome {
    /// The report; `written` is false when an atomic import refused invalid rows.
    Done { report: ImportReport, written: bool },
    /// A retry of an idempotent import: the first response again.
    Replayed(Recorded),
}

/// Validates and writes `rows`. `context` carries the idempotency key, if any (the command
/// line has none).
pub async fn import(
    state: &App,
    rows: Vec<ImportRow>,
    mode: ImportMode,
    context: Option<&CommandContext>,
    metadata: Metadata,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<ImportOutcome, AppError> {
    let key = id_key(state).await?;
    let mut report = ImportReport {
        received: rows.len(),
        ..ImportReport::default()
    };
    let mut planned = Vec::with_capacity(rows.len());
    for (done, row) in rows.into_iter().enumerate() {
        progress(done + 1);
        let input = match row.input {
            Ok(input) => input,
            Err(message) => {
                report.errors.push(RowError {
                    row: row.row,
                    email: None,
                    message: clip(&message, MAX_ECHOED_CHARS * 2),
                    code: None,
                });
                continue;
            }
        };
        let raw_email = input.email.trim().to_lowercase();
        match input.parse() {
            Ok((email, fields)) => planned.push(Planned {
                row: row.row,
                id: contact_id_for(key, &email).to_string(),
                email,
                fields,
            }),
            Err(errors) => report.errors.push(RowError {
                row: row.row,
                email: (!raw_email.is_empty()).then(|| clip(&raw_email, MAX_ECHOED_CHARS)),
                message: clip(
                    &errors
                        .iter()
                        .map(|e| format!("{}: {}", e.field, e.message))
                        .collect::<Vec<_>>()
                        .join("; "),
                    MAX_ECHOED_CHARS * 2,
                ),
                code: None,
            }),
        }
    }
    report.failed = report.errors.len();
    if mode == ImportMode::Atomic && report.failed > 0 {
        return Ok(ImportOutcome::Done {
            report,
            written: false,
        });
    }
    let mut ids: Vec<String> = planned.iter().map(|p| p.id.clone()).collect();
    ids.sort();
    ids.dedup();
    let at = Utc::now();
    let (planned, ids, report, metadata) = (&planned, &ids, &report, &metadata);
    let outcome = state
        .retrying(Contact::TYPE, |mut tx| async move {
            let outcome = async {
                if let Some(context) = context
                    && let Some(recorded) = command::replay(&mut tx, context).await?
                {
                    return Ok(ImportOutcome::Replayed(recorded));
                }
                let mut loaded: HashMap<String, Loaded<Contact>> =
                    state.store.load_many(&mut tx, ids).await?;
                // Each row's command on its contact, in file order; the state moves on with each.
                let mut events: HashMap<String, Vec<ContactEvent>> = HashMap::new();
                // Per valid row: its contact, and the index of its event in that contact's new
                // events (none: the row changed nothing).
                let mut row_event: Vec<(usize, String, Option<usize>)> =
                    Vec::with_capacity(planned.len());
                let mut row_errors = Vec::new();
                for p in planned {
                    let contact = loaded.get_mut(&p.id).expect("loaded every id");
                    let sink = EventSink::default();
                    let command = ContactCommand::Upsert {
                        email: p.email.clone(),
                        fields: p.fields.clone(),
                        at,
                    };
                    match contact.aggregate.handle(command, &(), &sink).await {
                        Ok(()) => {
                            let new = sink.collect().await;
                            let stream = events.entry(p.id.clone()).or_default();
                            let index = (!new.is_empty()).then_some(stream.len());
                            stream.extend(new);
                            row_event.push((p.row, p.id.clone(), index));
                        }
                        Err(e) => row_errors.push(RowError {
                            row: p.row,
                            email: Some(p.email.as_str().to_string()),
                            code: (e == ContactError::EmailErased).then_some("contact-erased"),
                            message: e.to_string(),
                        }),
                    }
                }
                let mut report = report.clone();
                report.failed += row_errors.len();
                report.errors.extend(row_errors);
                report.errors.sort_by_key(|e| e.row);
                if mode == ImportMode::Atomic && report.failed > 0 {
                    return Ok(ImportOutcome::Done {
                        report,
                        written: false,
                    });
                }
                let (ids_written, mut streams): (Vec<&String>, Vec<_>) = loaded
                    .iter_mut()
                    .filter_map(|(id, l)| {
                        let e = events.get(id).filter(|e| !e.is_empty())?;
                        Some((id, (l, e.as_slice())))
                    })
                    .unzip();
                let appended = state
                    .store
                    .append_many(&mut tx, &mut streams, metadata)
                    .await?;
                // What the statement returned, by stream: the sequence and position of each event.
                let written: HashMap<&String, &crate::store::Appended> =
                    ids_written.into_iter().zip(appended.iter()).collect();
                let mut last: Option<Position> = None;
                for (row, id, index) in &row_event {
                    let Some(index) = index else {
                        report.unchanged += 1;
                        continue;
                    };
                    let Some(appended) = written.get(id) else {
                        return Err(AppError::Internal(
                            "an import row's event was not written".into(),
                        )
                        .into());
                    };
                    let (_, position) = appended.events[*index];
                    last = last.max(Some(position));
                    // A row created its contact when its event was the creation (the first
                    // of the stream, or the first of an erased email's new life).
                    let creation = events.get(id).and_then(|e| e.get(*index));
                    if matches!(creation, Some(ContactEvent::ContactCreated { .. })) {
                        report.created += 1;
                    } else {
                        report.updated += 1;
                    }
                    if let Ok(contact_id) = Uuid::parse_str(id) {
                        report.contacts.push(ImportedContact {
                            row: *row,
                            contact_id,
                        });
                    }
                }
                report.position = last.map(|p| p.to_string());
                if let Some(context) = context {
                    let reply = Reply::ok(serde_json::to_value(&report).unwrap_or_default());
                    command::record(&mut tx, context, &reply).await?;
                }
                Ok::<_, Abort>(ImportOutcome::Done {
                    report,
                    written: true,
                })
            }
            .await;
            (tx, outcome)
        })
        .await?;
    match outcome {
        Retried::Done(done) => Ok(done),
        Retried::Exhausted => Err(AppError::conflict(
            "concurrency-conflict",
            "the contacts kept changing under this import; retry it",
        )),
    }
}
