//! Read model `contacts`: every contact with its fields and enrichment, behind
//! `GET /v1/contacts` (lookup by email, text search over name, company and email).

use aggregates::contact::{Contact, ContactEvent, ContactFields};
use cqrs_es::Aggregate;
use serde_json::json;
use sqlx::PgConnection;

use crate::{FeedEvent, Projection, ProjectionError, decode, uuid_of};

pub struct ContactsProjection;

fn text<T: Clone + Into<String>>(v: &Option<T>) -> Option<String> {
    v.clone().map(Into::into)
}

#[async_trait::async_trait]
impl Projection for ContactsProjection {
    fn name(&self) -> &'static str {
        "contacts"
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &FeedEvent,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_type != Contact::TYPE {
            return Ok(());
        }
        let id = uuid_of(event)?;
        let rows = match decode::<ContactEvent>(event)? {
            ContactEvent::ContactCreated {
                email,
                fields,
                created_at,
            } => {
                let custom = custom_json(&fields);
                sqlx::query!(
                    "INSERT INTO contacts_view (id, email, first_name, last_name, company, company_domain,
                         title, phone, linkedin_url, custom, created_at, updated_at, version)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, 1)",
                    id,
                    email.as_str(),
                    text(&fields.first_name),
                    text(&fields.last_name),
                    text(&fields.company),
                    text(&fields.company_domain),
                    text(&fields.title),
                    text(&fields.phone),
                    text(&fields.linkedin_url),
                    custom.unwrap_or_else(|| json!({})),
                    created_at
                )
                .execute(&mut *conn)
                .await?
                .rows_affected()
            }
            // Only the fields that changed are present; the others keep their value.
            ContactEvent::ContactUpdated {
                changes,
                updated_at,
            } => sqlx::query!(
                "UPDATE contacts_view SET
                     first_name = coalesce($2, first_name),
                     last_name = coalesce($3, last_name),
                     company = coalesce($4, company),
                     company_domain = coalesce($5, company_domain),
                     title = coalesce($6, title),
                     phone = coalesce($7, phone),
                     linkedin_url = coalesce($8, linkedin_url),
                     custom = coalesce($9, custom),
                     updated_at = $10,
                     version = version + 1
                 WHERE id = $1",
                id,
                text(&changes.first_name),
                text(&changes.last_name),
                text(&changes.company),
                text(&changes.company_domain),
                text(&changes.title),
                text(&changes.phone),
                text(&changes.linkedin_url),
                custom_json(&changes),
                updated_at
            )
            .execute(&mut *conn)
            .await?
            .rows_affected(),
            ContactEvent::EnrichmentRecorded {
                data,
                quality_score,
                sources,
                enriched_at,
            } => {
                let enrichment = json!({
                    "data": data,
                    "quality_score": quality_score.value(),
                    "sources": sources,
                    "enriched_at": enriched_at,
                });
                sqlx::query!(
                    "UPDATE contacts_view SET enrichment = $2, updated_at = $3, version = version + 1
                     WHERE id = $1",
                    id,
                    enrichment,
                    enriched_at
                )
                .execute(&mut *conn)
                .await?
                .rows_affected()
            }
        };
        if rows == 1 {
            Ok(())
        } else {
            Err(ProjectionError::Inconsistent {
                position: event.at,
                message: format!(
                    "{} for a contact the read model does not have",
                    event.event_type
                ),
            })
        }
    }
}

fn custom_json(fields: &ContactFields) -> Option<serde_json::Value> {
    fields
        .custom
        .as_ref()
        .map(|c| serde_json::to_value(c.as_map()).unwrap_or_else(|_| json!({})))
}
