//! The peer: the same aggregate (`Contact`) and command (an upsert of a new email) through
//! plain cqrs-es 0.5 with postgres-es 0.5 in event-store mode (`postgres_cqrs`:
//! `PersistedEventStore::new_event_store` over `PostgresEventRepository`), in-process,
//! called with `CqrsFramework::execute` from concurrent tasks.
//!
//! It runs on the same PostgreSQL server as the server under test, in a database of its own
//! (`leadledger_peer`): postgres-es's tables are named `events` and `snapshots` like ours,
//! with its documented schema (its `db/init.sql`). Its pool has the size of the server's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aggregates::contact::{Contact, contact_id_for};
use chrono::Utc;
use postgres_es::{PostgresCqrs, postgres_cqrs};
use sqlx::PgPool;

use crate::Server;
use crate::measure::{Measured, Outcome, closed_loop};

pub const DATABASE: &str = "leadledger_peer";

/// postgres-es 0.5's schema, as its `db/init.sql` gives it (events, and the snapshots table
/// the event-store mode does not use but the crate documents).
const SCHEMA: [&str; 2] = [
    "CREATE TABLE events (
         aggregate_type text                         NOT NULL,
         aggregate_id   text                         NOT NULL,
         sequence       bigint CHECK (sequence >= 0) NOT NULL,
         event_type     text                         NOT NULL,
         event_version  text                         NOT NULL,
         payload        json                         NOT NULL,
         metadata       json                         NOT NULL,
         PRIMARY KEY (aggregate_type, aggregate_id, sequence)
     )",
    "CREATE TABLE snapshots (
         aggregate_type   text                                 NOT NULL,
         aggregate_id     text                                 NOT NULL,
         last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
         current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
         payload          json                                 NOT NULL,
         PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
     )",
];

/// Contact ids are a keyed hash of the email, as in the server; the key is the peer's own.
const ID_KEY: &[u8] = b"leadledger-bench peer contact ids";

pub struct Peer {
    cqrs: PostgresCqrs<Contact>,
    pool: PgPool,
}

impl Peer {
    /// Creates the peer's database and tables on the server's PostgreSQL.
    pub async fn prepare(server: &Server, pool_size: u32) -> anyhow::Result<Arc<Self>> {
        // Identifiers cannot be bound; this one is a constant.
        sqlx::query("CREATE DATABASE leadledger_peer")
            .execute(&server.pool)
            .await?;
        let options = (*server.pool.connect_options()).clone().database(DATABASE);
        let pool = leadledger::db::pool_options(pool_size)
            .connect_with(options)
            .await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        Ok(Arc::new(Self {
            cqrs: postgres_cqrs(pool.clone(), vec![], ()),
            pool,
        }))
    }

    /// `tasks` concurrent tasks, each executing its next upsert of a new contact as soon as
    /// the last one returns, for `duration`.
    pub async fn upserts(
        self: &Arc<Self>,
        tasks: usize,
        duration: Duration,
        tag: &str,
    ) -> anyhow::Result<Measured> {
        let this = self.clone();
        let next = Arc::new(AtomicU64::new(0));
        let tag = tag.to_string();
        closed_loop(tasks, duration, move |_| {
            let this = this.clone();
            let n = next.fetch_add(1, Ordering::Relaxed);
            let tag = tag.clone();
            async move {
                let (email, command) = crate::contacts::command(&tag, n, Utc::now())?;
                let id = contact_id_for(ID_KEY, &email).to_string();
                Ok(match this.cqrs.execute(&id, command).await {
                    Ok(()) => Outcome::Done(1),
                    Err(e) => Outcome::Failed(e.to_string()),
                })
            }
        })
        .await
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
