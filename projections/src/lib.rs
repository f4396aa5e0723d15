//! leadledger's read side: the global feed, the projection runner, and one module per read
//! model, each owning its tables and saying how every event changes them.
//!
//! Projections are deterministic and replayable: they read no clock, draw no random
//! numbers and touch nothing but their own tables, so a rebuild from the feed gives the
//! same tables as the live run.

pub mod budget_holds;
pub mod campaigns;
pub mod contacts;
pub mod costs;
pub mod enrollments;
pub mod feed;
pub mod runner;
pub mod status;

use std::sync::Arc;

use sqlx::PgConnection;

pub use feed::{FeedEvent, Position};

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("event {event_type} at {position} cannot be decoded: {source}")]
    Decode {
        event_type: String,
        position: Position,
        #[source]
        source: serde_json::Error,
    },
    #[error("event at {position} is inconsistent with the read model: {message}")]
    Inconsistent { position: Position, message: String },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A read model fed by the runner.
#[async_trait::async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Stable name: the checkpoint's key and the advisory lock's.
    fn name(&self) -> &'static str;

    /// Applies one event inside the batch's transaction. Events of other aggregates are
    /// ignored by returning `Ok(())`.
    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &FeedEvent,
    ) -> Result<(), ProjectionError>;
}

/// Every projection the service runs.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(campaigns::CampaignsProjection),
        Arc::new(contacts::ContactsProjection),
        Arc::new(enrollments::EnrollmentsProjection),
        Arc::new(costs::CostsProjection),
        Arc::new(budget_holds::BudgetHoldsProjection),
    ]
}

/// The names of every projection.
pub fn names() -> Vec<&'static str> {
    all().iter().map(|p| p.name()).collect()
}

fn decode<E: serde::de::DeserializeOwned>(event: &FeedEvent) -> Result<E, ProjectionError> {
    event.decode().map_err(|source| ProjectionError::Decode {
        event_type: event.event_type.clone(),
        position: event.at,
        source,
    })
}

fn uuid_of(event: &FeedEvent) -> Result<uuid::Uuid, ProjectionError> {
    uuid::Uuid::parse_str(&event.aggregate_id).map_err(|e| ProjectionError::Inconsistent {
        position: event.at,
        message: format!("aggregate id is not a uuid: {e}"),
    })
}
