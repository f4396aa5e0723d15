//! Where each projection stands: checkpoint, events behind, failure, and which process
//! holds it. Used by `leadledger projections status` and `/metrics`.

use serde::Serialize;
use sqlx::PgConnection;

use crate::feed::{self, Position};
use crate::runner::LOCK_CLASS;

#[derive(Debug, Clone, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub checkpoint: Position,
    pub behind: i64,
    /// `running` (held by a process), `idle` (nobody holds it), or `failed`.
    pub state: &'static str,
    pub failed_position: Option<i64>,
    pub failed_error: Option<String>,
    /// The application name of the connection holding it (`leadledger-projection:GROUP:pidN`;
    /// a server's group, read models and reactors, is `projections`).
    pub held_by: Option<String>,
}

pub async fn all(conn: &mut PgConnection) -> Result<Vec<ProjectionStatus>, sqlx::Error> {
    // The registered projections, and any other consumer of the feed with a checkpoint
    // (the service's reactors).
    let mut names: Vec<String> = crate::names().into_iter().map(str::to_string).collect();
    for other in sqlx::query_scalar!("SELECT name FROM projection_checkpoints ORDER BY name")
        .fetch_all(&mut *conn)
        .await?
    {
        if !names.contains(&other) {
            names.push(other);
        }
    }
    let mut out = Vec::new();
    for name in names {
        let name = name.as_str();
        // `pg_locks` lists the advisory locks of every database on the server: another
        // database's runner holding the same key is not this one's.
        let row = sqlx::query!(
            r#"SELECT c.transaction_id::text AS "transaction_id!", c.position, c.failed_position,
                      c.failed_error,
                      (SELECT a.application_name
                       FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                       WHERE l.locktype = 'advisory' AND l.granted
                         AND l.database = (SELECT oid FROM pg_database
                                           WHERE datname = current_database())
                         AND l.classid = $2::int::oid AND l.objid = hashtext($1)::oid
                       LIMIT 1) AS held_by
               FROM projection_checkpoints c WHERE c.name = $1"#,
            name,
            LOCK_CLASS
        )
        .fetch_optional(&mut *conn)
        .await?;
        let (checkpoint, failed_position, failed_error, held_by) = match row {
            Some(r) => (
                Position::stored(&r.transaction_id, r.position)?,
                r.failed_position,
                r.failed_error,
                r.held_by,
            ),
            None => (Position::default(), None, None, None),
        };
        let behind = feed::count_after(conn, checkpoint).await?;
        let state = if failed_position.is_some() {
            "failed"
        } else if held_by.is_some() {
            "running"
        } else {
            "idle"
        };
        out.push(ProjectionStatus {
            name: name.to_string(),
            checkpoint,
            behind,
            state,
            failed_position,
            failed_error,
            held_by,
        });
    }
    Ok(out)
}

/// A rebuild in progress (or left unfinished): what it rebuilds and how far it has read.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildInProgress {
    pub projections: Vec<String>,
    pub position: Position,
    pub events: i64,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

pub async fn rebuild(conn: &mut PgConnection) -> Result<Option<RebuildInProgress>, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT projections, transaction_id::text AS "transaction_id!", position, events,
                  started_at, updated_at
           FROM projection_rebuilds"#
    )
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| {
        Ok(RebuildInProgress {
            projections: r.projections,
            position: Position::stored(&r.transaction_id, r.position)?,
            events: r.events,
            started_at: r.started_at,
            updated_at: r.updated_at,
        })
    })
    .transpose()
}
