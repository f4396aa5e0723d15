//! Campaign links to other systems: the `campaign_external_ids` guard that keeps one of an
//! engagement tool's campaign ids naming at most one campaign per source, and the lookup
//! deliveries use to find a campaign by that id.

use std::collections::HashMap;

use aggregates::campaign::CampaignEvent;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::app::command::Abort;
use crate::app::error::{AppError, FieldError};

/// Keeps `campaign_external_ids` equal to what `events` (of campaign `campaign`) link,
/// in the command's transaction. Refuses (422) a link to a source that does not exist and
/// (409) one of their ids another campaign holds for the same source.
pub async fn guard_external_ids<E: From<AppError>>(
    conn: &mut PgConnection,
    campaign: Uuid,
    events: &[CampaignEvent],
) -> Result<(), Abort<E>> {
    for event in events {
        let CampaignEvent::CampaignExternalIdsChanged {
            linked, unlinked, ..
        } = event
        else {
            continue;
        };
        let (sources, ids): (Vec<String>, Vec<String>) =
            unlinked.iter().map(|(s, i)| (s.clone(), i.clone())).unzip();
        sqlx::query!(
            "DELETE FROM campaign_external_ids c
             USING UNNEST($1::text[], $2::text[]) AS u(source, external_id)
             WHERE c.source = u.source AND c.external_id = u.external_id AND c.campaign_id = $3",
            &sources,
            &ids,
            campaign
        )
        .execute(&mut *conn)
        .await?;
        if linked.is_empty() {
            continue;
        }
        let (sources, ids): (Vec<String>, Vec<String>) =
            linked.iter().map(|(s, i)| (s.clone(), i.clone())).unzip();
        let known: Vec<String> = sqlx::query_scalar!(
            "SELECT name FROM webhook_sources WHERE name = ANY($1)",
            &sources
        )
        .fetch_all(&mut *conn)
        .await?;
        let unknown: Vec<FieldError> = sources
            .iter()
            .filter(|s| !known.contains(s))
            .map(|s| {
                FieldError::new(
                    format!("external_ids.{s}"),
                    "no webhook source has this name",
                )
            })
            .collect();
        if !unknown.is_empty() {
            return Err(Abort::Fail(AppError::invalid(unknown).into()));
        }
        // A concurrent link of the same id by another campaign waits here on the key and
        // then finds it taken: answered below as the refusal it is.
        let inserted = sqlx::query!(
            "INSERT INTO campaign_external_ids (source, external_id, campaign_id)
             SELECT u.source, u.external_id, $3
             FROM UNNEST($1::text[], $2::text[]) AS u(source, external_id)
             ON CONFLICT (source, external_id) DO NOTHING",
            &sources,
            &ids,
            campaign
        )
        .execute(&mut *conn)
        .await?;
        if inserted.rows_affected() < linked.len() as u64 {
            let taken: Vec<(String, String)> = sqlx::query!(
                "SELECT c.source, c.external_id FROM campaign_external_ids c
                 JOIN UNNEST($1::text[], $2::text[]) AS u(source, external_id)
                   ON c.source = u.source AND c.external_id = u.external_id
                 WHERE c.campaign_id <> $3
                 ORDER BY 1",
                &sources,
                &ids,
                campaign
            )
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|r| (r.source, r.external_id))
            .collect();
            let named: Vec<String> = taken
                .iter()
                .map(|(s, i)| format!("{s} campaign {i:?}"))
                .collect();
            return Err(Abort::Fail(
                AppError::conflict(
                    "external-id-taken",
                    format!(
                        "another campaign is linked to {}; unlink it there first",
                        named.join(", ")
                    ),
                )
                .into(),
            ));
        }
    }
    Ok(())
}

/// Our campaigns linked to `their_ids` under `source`, by their id.
pub async fn linked_campaigns(
    pool: &PgPool,
    source: &str,
    their_ids: &[String],
) -> Result<HashMap<String, Uuid>, sqlx::Error> {
    if their_ids.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(sqlx::query!(
        "SELECT external_id, campaign_id FROM campaign_external_ids
         WHERE source = $1 AND external_id = ANY($2)",
        source,
        their_ids
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.external_id, r.campaign_id))
    .collect())
}
